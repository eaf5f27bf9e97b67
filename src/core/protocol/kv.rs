//! What a worker publishes about itself: KV-cache events (which prefix blocks it holds) and load.
use serde::{Deserialize, Serialize};

pub type WorkerId = u64;

/// One full block a worker now holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlock {
    /// Sequence hash (chained), see `core::tokens`.
    pub hash: u64,
    /// Local hash of the block's tokens alone.
    pub tokens_hash: u64,
}

/// On the wire (see `wire` below) an event is a msgpack array led by a small integer tag, and its hashes are
/// one `bin` of little-endian u64s, so decoding a block is a copy rather than a dispatch per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks that extend `parent_hash` (or start a sequence when `None`), in order.
    Stored {
        parent_hash: Option<u64>,
        blocks: Vec<StoredBlock>,
    },
    Removed {
        hashes: Vec<u64>,
    },
    Cleared,
}

impl KvEvent {
    /// Blocks it names (a `Cleared` counts one): what it costs to hold.
    pub fn entries(&self) -> usize {
        match self {
            KvEvent::Stored { blocks, .. } => blocks.len(),
            KvEvent::Removed { hashes } => hashes.len(),
            KvEvent::Cleared => 1,
        }
    }
}

/// The events of one engine step, in the order they happened. The event plane's `kv` payload:
/// `[worker_id, [event, ...]]` in msgpack (`encode` / `decode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventBatch {
    pub worker_id: WorkerId,
    pub events: Vec<KvEvent>,
}

impl KvEventBatch {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Room for a typical step's batch up front: no regrowth while writing.
        out.reserve(64 + 24 * self.events.len());
        wire::write_array_len(out, 2);
        wire::write_uint(out, self.worker_id);
        wire::write_events(out, &self.events);
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KvWireError> {
        let mut batch = Self { worker_id: 0, events: Vec::new() };
        batch.decode_into(bytes)?;
        Ok(batch)
    }

    /// `decode` over this batch, reusing its memory (see `wire::read_events_into`): a router decodes every
    /// batch of every worker. On an error the batch's contents are meaningless.
    pub fn decode_into(&mut self, bytes: &[u8]) -> Result<(), KvWireError> {
        let mut input = bytes;
        let fields = wire::read_array_len(&mut input, "a KV event batch")?;
        if fields != 2 {
            return Err(KvWireError::Shape { what: "a KV event batch", fields });
        }
        self.worker_id = wire::read_uint(&mut input, "the batch's worker id")?;
        wire::read_events_into(&mut input, &mut self.events)?;
        match input.len() {
            0 => Ok(()),
            extra => Err(KvWireError::Trailing(extra)),
        }
    }
}

/// A list of events inside a request-plane message (a snapshot's frame): one `bin` holding the same
/// encoding as a batch's event list, so both planes share one codec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvEvents(pub Vec<KvEvent>);

impl Serialize for KvEvents {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(8 + 24 * self.0.len());
        wire::write_events(&mut bytes, &self.0);
        serializer.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for KvEvents {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EventsVisitor;

        impl serde::de::Visitor<'_> for EventsVisitor {
            type Value = KvEvents;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string of encoded KV events")
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<KvEvents, E> {
                let mut input = bytes;
                let events = wire::read_events(&mut input).map_err(E::custom)?;
                match input.len() {
                    0 => Ok(KvEvents(events)),
                    extra => Err(E::custom(KvWireError::Trailing(extra))),
                }
            }
        }
        deserializer.deserialize_bytes(EventsVisitor)
    }
}

/// Why bytes are not a KV event batch; says which part was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvWireError {
    #[error("expected {0}, found other bytes or the end")]
    Expected(&'static str),
    #[error("{what} has {fields} fields")]
    Shape { what: &'static str, fields: u32 },
    #[error("unknown KV event tag {0}")]
    UnknownTag(u64),
    #[error("a byte string of {record}-byte records has {len} bytes")]
    Records { record: usize, len: usize },
    #[error("{0} bytes after the end of the batch")]
    Trailing(usize),
}

/// The codec, written against msgpack's markers directly (`rmp`): through serde a batch took 230 ns to
/// encode and 310 ns to decode, as much CPU as libzmq spends carrying it; this is a third of that.
mod wire {
    use super::{KvEvent, KvWireError, StoredBlock};

    const STORED: u64 = 0;
    const REMOVED: u64 = 1;
    const CLEARED: u64 = 2;
    const NIL: u8 = 0xc0;

    // Each reader and writer handles the forms a batch is made of in line (small arrays and tags, 64-bit
    // hashes, short byte strings) and leaves the rest to `rmp`, which picks the same smallest forms.
    const FIXARRAY: u8 = 0x90;
    const UINT64: u8 = 0xcf;
    const BIN8: u8 = 0xc4;

    // Writing into a `Vec` cannot fail, so the writers' `Result`s carry nothing.
    pub fn write_array_len(out: &mut Vec<u8>, len: usize) {
        match len {
            0..16 => out.push(FIXARRAY | len as u8),
            _ => {
                let _ = rmp::encode::write_array_len(out, len as u32);
            }
        }
    }

    pub fn write_uint(out: &mut Vec<u8>, value: u64) {
        match value {
            0..0x80 => out.push(value as u8),
            0x1_0000_0000.. => {
                out.push(UINT64);
                out.extend_from_slice(&value.to_be_bytes());
            }
            _ => {
                let _ = rmp::encode::write_uint(out, value);
            }
        }
    }

    pub fn write_bin_len(out: &mut Vec<u8>, len: usize) {
        match u8::try_from(len) {
            Ok(len) => out.extend_from_slice(&[BIN8, len]),
            Err(_) => {
                let _ = rmp::encode::write_bin_len(out, len as u32);
            }
        }
    }

    fn write_words(out: &mut Vec<u8>, words: impl ExactSizeIterator<Item = u64>) {
        write_bin_len(out, words.len() * 8);
        words.for_each(|word| out.extend_from_slice(&word.to_le_bytes()));
    }

    pub fn write_events(out: &mut Vec<u8>, events: &[KvEvent]) {
        write_array_len(out, events.len());
        for event in events {
            match event {
                KvEvent::Stored { parent_hash, blocks } => {
                    write_array_len(out, 3);
                    write_uint(out, STORED);
                    match parent_hash {
                        Some(parent) => write_uint(out, *parent),
                        None => {
                            let _ = rmp::encode::write_nil(out);
                        }
                    }
                    write_bin_len(out, blocks.len() * 16);
                    for block in blocks {
                        out.extend_from_slice(&block.hash.to_le_bytes());
                        out.extend_from_slice(&block.tokens_hash.to_le_bytes());
                    }
                }
                KvEvent::Removed { hashes } => {
                    write_array_len(out, 2);
                    write_uint(out, REMOVED);
                    write_words(out, hashes.iter().copied());
                }
                KvEvent::Cleared => {
                    write_array_len(out, 1);
                    write_uint(out, CLEARED);
                }
            }
        }
    }

    pub fn read_array_len(input: &mut &[u8], what: &'static str) -> Result<u32, KvWireError> {
        if let Some((&marker @ FIXARRAY..=0x9f, rest)) = input.split_first() {
            *input = rest;
            return Ok(u32::from(marker & 0x0f));
        }
        read_array_len_rmp(input, what)
    }

    #[cold]
    fn read_array_len_rmp(input: &mut &[u8], what: &'static str) -> Result<u32, KvWireError> {
        rmp::decode::read_array_len(input).map_err(|_| KvWireError::Expected(what))
    }

    #[cold]
    fn read_uint_rmp(input: &mut &[u8], what: &'static str) -> Result<u64, KvWireError> {
        rmp::decode::read_int(input).map_err(|_| KvWireError::Expected(what))
    }

    #[cold]
    fn read_bin_len_rmp(input: &mut &[u8], what: &'static str) -> Result<usize, KvWireError> {
        rmp::decode::read_bin_len(input).map(|len| len as usize).map_err(|_| KvWireError::Expected(what))
    }

    pub fn read_uint(input: &mut &[u8], what: &'static str) -> Result<u64, KvWireError> {
        match input.split_first() {
            Some((&value @ 0..0x80, rest)) => {
                *input = rest;
                Ok(u64::from(value))
            }
            Some((&UINT64, rest)) if rest.len() >= 8 => {
                let (word, rest) = rest.split_at(8);
                *input = rest;
                let mut bytes = [0; 8];
                bytes.copy_from_slice(word);
                Ok(u64::from_be_bytes(bytes))
            }
            _ => read_uint_rmp(input, what),
        }
    }

    /// A `bin` of `record`-byte records, borrowed from the input.
    fn read_records<'a>(input: &mut &'a [u8], record: usize, what: &'static str) -> Result<&'a [u8], KvWireError> {
        let len = match input.split_first_chunk() {
            Some((&[BIN8, len], rest)) => {
                *input = rest;
                usize::from(len)
            }
            _ => read_bin_len_rmp(input, what)?,
        };
        if len > input.len() {
            return Err(KvWireError::Expected(what));
        }
        if !len.is_multiple_of(record) {
            return Err(KvWireError::Records { record, len });
        }
        let (records, rest) = input.split_at(len);
        *input = rest;
        Ok(records)
    }

    fn word(bytes: &[u8]) -> u64 {
        let mut word = [0; 8];
        word.copy_from_slice(bytes);
        u64::from_le_bytes(word)
    }

    pub fn read_events(input: &mut &[u8]) -> Result<Vec<KvEvent>, KvWireError> {
        let mut events = Vec::new();
        read_events_into(input, &mut events)?;
        Ok(events)
    }

    /// `read_events` into `events`, reusing its entries and their lists where the shapes agree, so that a
    /// subscriber decoding one batch after another allocates nothing once it has seen a batch of each
    /// shape. On an error `events` holds a mix of old and new and must not be used.
    pub fn read_events_into(input: &mut &[u8], events: &mut Vec<KvEvent>) -> Result<(), KvWireError> {
        let count = read_array_len(input, "a list of KV events")? as usize;
        events.truncate(count);
        // Each event takes at least two bytes: a length from the wire cannot reserve more than that allows.
        events.reserve(count.min(input.len() / 2).saturating_sub(events.len()));
        for at in 0..count {
            let fields = read_array_len(input, "a KV event")?;
            let shape = |expected: u32| match fields == expected {
                true => Ok(()),
                false => Err(KvWireError::Shape { what: "a KV event", fields }),
            };
            if fields == 0 {
                return Err(KvWireError::Expected("a KV event's tag"));
            }
            let reused = events.get_mut(at);
            let event = match read_uint(input, "a KV event's tag")? {
                STORED => {
                    shape(3)?;
                    let parent = match input.first() {
                        Some(&NIL) => {
                            *input = &input[1..];
                            None
                        }
                        _ => Some(read_uint(input, "a Stored event's parent hash or nil")?),
                    };
                    let records = read_records(input, 16, "a Stored event's blocks")?;
                    let read = records
                        .chunks_exact(16)
                        .map(|block| StoredBlock { hash: word(&block[..8]), tokens_hash: word(&block[8..]) });
                    match reused {
                        Some(KvEvent::Stored { parent_hash, blocks }) => {
                            *parent_hash = parent;
                            blocks.clear();
                            blocks.extend(read);
                            continue;
                        }
                        _ => KvEvent::Stored { parent_hash: parent, blocks: read.collect() },
                    }
                }
                REMOVED => {
                    shape(2)?;
                    let read = read_records(input, 8, "a Removed event's hashes")?.chunks_exact(8).map(word);
                    match reused {
                        Some(KvEvent::Removed { hashes }) => {
                            hashes.clear();
                            hashes.extend(read);
                            continue;
                        }
                        _ => KvEvent::Removed { hashes: read.collect() },
                    }
                }
                CLEARED => {
                    shape(1)?;
                    KvEvent::Cleared
                }
                other => return Err(KvWireError::UnknownTag(other)),
            };
            match events.get_mut(at) {
                Some(slot) => *slot = event,
                None => events.push(event),
            }
        }
        Ok(())
    }
}

/// A worker's load, as a router or planner sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadMetrics {
    pub requests_running: u32,
    pub requests_waiting: u32,
    /// Blocks referenced by running requests.
    pub kv_active_blocks: u64,
    /// Blocks no request holds but kept for prefix reuse.
    pub kv_cached_blocks: u64,
    pub kv_total_blocks: u64,
    /// Its engine cannot take requests now (an external engine that stopped answering): routers skip the
    /// worker until it says otherwise.
    #[serde(default)]
    pub engine_down: bool,
    /// The most requests it runs at once (`--max-num-seqs`); 0 where unknown (an external engine).
    #[serde(default)]
    pub max_running: u32,
    /// Bytes its device has in use and in all (a GPU's memory; on the CPU the process's resident memory and
    /// the machine's); 0 where unknown.
    #[serde(default)]
    pub device_memory_used: u64,
    #[serde(default)]
    pub device_memory_total: u64,
    /// Bytes of KV a token of its prompts takes to move (the model's KV per token; the mocker's simulated
    /// one); 0 where it cannot take KV from a peer.
    #[serde(default)]
    pub kv_bytes_per_token: u64,
    /// How fast its last reads of peers' KV have gone, bytes per second over its reads of a MiB or more (about
    /// the last ten weigh most); 0 before its first.
    #[serde(default)]
    pub kv_read_bytes_per_s: u64,
}

/// A worker's running totals on the request plane since it started, published on the `stats` topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Requests the engine took.
    pub accepted: u64,
    /// Requests turned away (busy, invalid).
    pub refused: u64,
    /// Requests stopped because their client went away.
    pub cancelled: u64,
    /// Messages that did not decode.
    pub unreadable: u64,
    /// Its KV hand-offs (disaggregated serving), for workers with a transfer agent.
    #[serde(default)]
    pub kv: KvTransferStats,
    /// Its images, for workers of a model that takes them.
    #[serde(default)]
    pub images: ImageStats,
}

/// A worker's images since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStats {
    /// Images it ran through its vision tower (an encode worker's, or a prefilling worker's own).
    pub encoded: u64,
    /// Images whose embeddings it read from an encode worker instead.
    pub read: u64,
    /// Embeddings an encode worker held for it that it could not read, so it encoded the image itself.
    pub read_failed: u64,
}

/// A worker's KV hand-offs since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTransferStats {
    /// Prompts' KV it held for a decode worker (as a prefill worker).
    pub held: u64,
    /// Prompts' KV it read from a prefill worker (as a decode worker).
    pub read: u64,
    /// Reads that did not happen or failed, so it computed the prompt itself.
    pub read_failed: u64,
    pub read_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn stored(parent_hash: Option<u64>, hashes: std::ops::Range<u64>) -> KvEvent {
        KvEvent::Stored { parent_hash, blocks: hashes.map(|h| StoredBlock { hash: h, tokens_hash: !h }).collect() }
    }

    fn every_event() -> Vec<KvEvent> {
        vec![
            stored(None, 1..2),
            stored(Some(u64::MAX), 5..300),
            KvEvent::Removed { hashes: vec![0, 7, u64::MAX] },
            KvEvent::Removed { hashes: vec![] },
            KvEvent::Cleared,
        ]
    }

    #[test]
    fn every_event_round_trips() {
        let batch = KvEventBatch { worker_id: u64::MAX, events: every_event() };
        assert_eq!(KvEventBatch::decode(&batch.encode()), Ok(batch));
    }

    #[test]
    fn a_request_plane_message_carries_events_in_the_same_encoding() {
        let events = KvEvents(every_event());
        let bytes = rmp_serde::to_vec(&events).unwrap();
        assert_eq!(rmp_serde::from_slice::<KvEvents>(&bytes).unwrap(), events);
        // A bin whose content is the event list of a batch, byte for byte.
        let batch = KvEventBatch { worker_id: 1, events: events.0.clone() }.encode();
        assert!(bytes.ends_with(&batch[2..]), "the batch after its [2, worker id] header");
    }

    #[test]
    fn hashes_travel_as_one_byte_string() {
        let bytes = KvEventBatch { worker_id: 3, events: vec![stored(Some(9), 1..2)] }.encode();
        // [3, [[0, 9, bin8 of 16 bytes: hash 1 then tokens hash !1, little-endian]]]
        let mut expected = vec![0x92, 0x03, 0x91, 0x93, 0x00, 0x09, 0xc4, 16];
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(&(!1u64).to_le_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn the_forms_written_in_line_are_the_smallest_ones_as_rmp_writes_them() {
        for value in [0, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, 0xffff_ffff, 0x1_0000_0000, u64::MAX] {
            let (mut ours, mut reference) = (Vec::new(), Vec::new());
            wire::write_uint(&mut ours, value);
            rmp::encode::write_uint(&mut reference, value).unwrap();
            assert_eq!(ours, reference, "{value:#x}");
            assert_eq!(wire::read_uint(&mut &ours[..], "a number"), Ok(value));
            // Cut short, the in-line form is refused like any other.
            assert!(wire::read_uint(&mut &ours[..ours.len() - 1], "a number").is_err() || ours.len() == 1);
        }
        for len in [0, 1, 15, 16, 0xff, 0x100, 0xffff, 0x1_0000] {
            let (mut ours, mut reference) = (Vec::new(), Vec::new());
            wire::write_array_len(&mut ours, len);
            rmp::encode::write_array_len(&mut reference, len as u32).unwrap();
            assert_eq!(ours, reference, "{len}");
            assert_eq!(wire::read_array_len(&mut &ours[..], "an array"), Ok(len as u32));
            let (mut ours, mut reference) = (Vec::new(), Vec::new());
            wire::write_bin_len(&mut ours, len);
            rmp::encode::write_bin_len(&mut reference, len as u32).unwrap();
            assert_eq!(ours, reference, "bin of {len}");
        }
    }

    #[test]
    fn malformed_batches_say_what_is_wrong() {
        let error = |events: &[u8]| {
            let mut bytes = vec![0x92, 0x03, 0x91];
            bytes.extend_from_slice(events);
            KvEventBatch::decode(&bytes).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(error(&[0x93, 0x00, 0xc0, 0xc4, 3, 1, 2, 3]).contains("16-byte records has 3 bytes"), "a torn block");
        assert!(error(&[0x93, 0x00, 0xc0, 0xc4, 16, 1, 2, 3]).contains("Stored event's blocks"), "cut short");
        assert!(error(&[0x91, 0x07]).contains("unknown KV event tag 7"));
        assert!(error(&[0x92, 0x00, 0xc0]).contains("a KV event has 2 fields"));
        assert!(error(&[0x90]).contains("KV event's tag"));
        assert!(error(&[0x91, 0x02, 0x00]).contains("1 bytes after the end"));
        assert!(KvEventBatch::decode(&[0x93, 0x03, 0x90, 0x00]).is_err_and(|e| e.to_string().contains("3 fields")));
        assert!(KvEventBatch::decode(b"").is_err_and(|e| e.to_string().contains("a KV event batch")));
    }

    #[test]
    fn decoding_over_a_used_batch_gives_what_a_fresh_decode_gives() {
        let batch = |events: Vec<KvEvent>| KvEventBatch { worker_id: events.len() as u64, events };
        let removed = |hashes: Vec<u64>| KvEvent::Removed { hashes };
        // Each next batch has more or fewer events than the one before, or another kind at the same place.
        let sequence = [
            batch(every_event()),
            batch(vec![stored(Some(1), 1..9), removed(vec![4])]),
            batch(vec![stored(None, 3..4), removed(vec![1, 2, 3]), KvEvent::Cleared, stored(Some(5), 0..0)]),
            batch(vec![]),
            batch(vec![stored(None, 1..2), stored(Some(1), 2..3), stored(Some(2), 3..4), removed(vec![9])]),
            batch(every_event()),
        ];
        let mut reused = KvEventBatch { worker_id: 0, events: Vec::new() };
        for expected in sequence {
            assert_eq!(reused.decode_into(&expected.encode()), Ok(()));
            assert_eq!(reused, expected);
            // A refused one in between leaves nothing behind that the next decode would keep.
            assert!(reused.decode_into(&[0x92, 0x03, 0x92, 0x91, 0x02, 0x91, 0x07]).is_err());
        }
    }

    #[test]
    fn a_huge_count_from_the_wire_reserves_nothing_it_cannot_fill() {
        // [3, array32 of 4 billion events] and nothing after.
        let bytes = [0x92, 0x03, 0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(KvEventBatch::decode(&bytes).is_err());
    }

    #[test]
    fn mangled_batches_are_errors_not_panics() {
        let valid = KvEventBatch {
            worker_id: 3,
            events: vec![stored(None, 1..4), KvEvent::Removed { hashes: vec![2, 3] }, KvEvent::Cleared],
        }
        .encode();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random(),
                    1 => bytes.truncate(at.max(1)),
                    _ => bytes.insert(at, rng.random()),
                }
            }
            // What decodes must be what it says: encoding it again gives back bytes that decode the same.
            let fresh = KvEventBatch::decode(&bytes);
            // Decoding over the memory of a previous batch accepts and refuses the same bytes.
            let mut reused = KvEventBatch::decode(&valid).unwrap();
            let over = reused.decode_into(&bytes);
            assert_eq!(over.clone().map(|()| &reused), fresh.as_ref().map_err(Clone::clone), "{bytes:x?}");
            if let Ok(batch) = fresh {
                decoded += 1;
                assert_eq!(KvEventBatch::decode(&batch.encode()), Ok(batch));
            }
        }
        assert!(decoded > 0, "some single-byte changes (a hash's bytes) still decode");
    }
}
