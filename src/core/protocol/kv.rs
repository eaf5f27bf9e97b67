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

/// The events of one engine step, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventBatch {
    pub worker_id: WorkerId,
    pub events: Vec<KvEvent>,
}

mod wire {
    use super::{KvEvent, StoredBlock};
    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::ser::{SerializeTuple, Serializer};
    use serde::{Deserialize, Serialize};
    use smallvec::SmallVec;
    use std::fmt;

    const STORED: u8 = 0;
    const REMOVED: u8 = 1;
    const CLEARED: u8 = 2;

    /// Little-endian u64 words written as one byte string (`bin`); a step's events fit on the stack.
    struct Words<I>(I);

    impl<I: Iterator<Item = u64> + Clone> Serialize for Words<I> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut bytes: SmallVec<[u8; 512]> = SmallVec::new();
            self.0.clone().for_each(|w| bytes.extend_from_slice(&w.to_le_bytes()));
            serializer.serialize_bytes(&bytes)
        }
    }

    impl Serialize for KvEvent {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            match self {
                KvEvent::Stored { parent_hash, blocks } => {
                    let mut tuple = serializer.serialize_tuple(3)?;
                    tuple.serialize_element(&STORED)?;
                    tuple.serialize_element(parent_hash)?;
                    tuple.serialize_element(&Words(blocks.iter().flat_map(|b| [b.hash, b.tokens_hash])))?;
                    tuple.end()
                }
                KvEvent::Removed { hashes } => {
                    let mut tuple = serializer.serialize_tuple(2)?;
                    tuple.serialize_element(&REMOVED)?;
                    tuple.serialize_element(&Words(hashes.iter().copied()))?;
                    tuple.end()
                }
                KvEvent::Cleared => {
                    let mut tuple = serializer.serialize_tuple(1)?;
                    tuple.serialize_element(&CLEARED)?;
                    tuple.end()
                }
            }
        }
    }

    /// Reads a byte string of little-endian u64 words, borrowed from the input where the format allows.
    struct WordsOf<T>(Vec<T>);

    trait FromWords: Sized {
        const WORDS: usize;
        fn from_words(words: &[u64]) -> Self;
    }

    impl FromWords for u64 {
        const WORDS: usize = 1;
        fn from_words(words: &[u64]) -> Self {
            words[0]
        }
    }

    impl FromWords for StoredBlock {
        const WORDS: usize = 2;
        fn from_words(words: &[u64]) -> Self {
            StoredBlock { hash: words[0], tokens_hash: words[1] }
        }
    }

    impl<'de, T: FromWords> Deserialize<'de> for WordsOf<T> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct BytesVisitor<T>(std::marker::PhantomData<T>);

            impl<T: FromWords> Visitor<'_> for BytesVisitor<T> {
                type Value = WordsOf<T>;

                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    write!(f, "a byte string of {}-byte records", T::WORDS * 8)
                }

                fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
                    let record = T::WORDS * 8;
                    if !bytes.len().is_multiple_of(record) {
                        return Err(E::invalid_length(bytes.len(), &self));
                    }
                    let mut words = [0u64; 2];
                    let values = bytes
                        .chunks_exact(record)
                        .map(|chunk| {
                            for (word, raw) in words.iter_mut().zip(chunk.chunks_exact(8)) {
                                *word = u64::from_le_bytes(raw.try_into().unwrap_or_default());
                            }
                            T::from_words(&words[..T::WORDS])
                        })
                        .collect();
                    Ok(WordsOf(values))
                }
            }
            deserializer.deserialize_bytes(BytesVisitor(std::marker::PhantomData))
        }
    }

    impl<'de> Deserialize<'de> for KvEvent {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct EventVisitor;

            impl<'de> Visitor<'de> for EventVisitor {
                type Value = KvEvent;

                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a KV event: [0, parent, blocks], [1, hashes] or [2]")
                }

                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KvEvent, A::Error> {
                    let missing = |what: &str| de::Error::custom(format!("KV event without its {what}"));
                    let tag: u8 = seq.next_element()?.ok_or_else(|| missing("tag"))?;
                    Ok(match tag {
                        STORED => {
                            let parent_hash: Option<u64> = seq.next_element()?.ok_or_else(|| missing("parent"))?;
                            let WordsOf(blocks) = seq.next_element()?.ok_or_else(|| missing("blocks"))?;
                            KvEvent::Stored { parent_hash, blocks }
                        }
                        REMOVED => {
                            let WordsOf(hashes) = seq.next_element()?.ok_or_else(|| missing("hashes"))?;
                            KvEvent::Removed { hashes }
                        }
                        CLEARED => KvEvent::Cleared,
                        other => return Err(de::Error::custom(format!("unknown KV event tag {other}"))),
                    })
                }
            }
            deserializer.deserialize_seq(EventVisitor)
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::plane::{decode_payload, encode_payload};
    use rand::{Rng, SeedableRng};

    fn stored(parent_hash: Option<u64>, hashes: std::ops::Range<u64>) -> KvEvent {
        KvEvent::Stored { parent_hash, blocks: hashes.map(|h| StoredBlock { hash: h, tokens_hash: !h }).collect() }
    }

    #[test]
    fn every_event_round_trips() {
        let batch = KvEventBatch {
            worker_id: u64::MAX,
            events: vec![
                stored(None, 1..2),
                stored(Some(u64::MAX), 5..300),
                KvEvent::Removed { hashes: vec![0, 7, u64::MAX] },
                KvEvent::Removed { hashes: vec![] },
                KvEvent::Cleared,
            ],
        };
        assert_eq!(decode_payload::<KvEventBatch>(&encode_payload(&batch)), Ok(batch));
    }

    #[test]
    fn hashes_travel_as_one_byte_string() {
        let bytes = encode_payload(&stored(Some(9), 1..2));
        // [0, 9, bin8 of 16 bytes: hash 1 then tokens hash !1, little-endian]
        let mut expected = vec![0x93, 0x00, 0x09, 0xc4, 16];
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(&(!1u64).to_le_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn malformed_events_say_what_is_wrong() {
        let error = |bytes: &[u8]| decode_payload::<KvEvent>(bytes).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error(&[0x93, 0x00, 0xc0, 0xc4, 3, 1, 2, 3]).contains("16-byte records"), "a torn block");
        assert!(error(&[0x91, 0x07]).contains("unknown KV event tag 7"));
        assert!(error(&[0x92, 0x00, 0xc0]).contains("without its blocks"));
        assert!(error(&[0x90]).contains("without its tag"));
    }

    #[test]
    fn mangled_batches_are_errors_not_panics() {
        let valid = encode_payload(&KvEventBatch {
            worker_id: 3,
            events: vec![stored(None, 1..4), KvEvent::Removed { hashes: vec![2, 3] }, KvEvent::Cleared],
        });
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
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
            let _ = decode_payload::<KvEventBatch>(&bytes);
        }
    }
}
