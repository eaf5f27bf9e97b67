//! Event-plane frames: `[topic][publisher id u64 BE][seq u64 BE][msgpack payload]`, four ZMQ frames.
//!
//! The topic frame comes first because ZMQ SUB filters on a message's first frame. Sequence numbers count
//! per (publisher, topic) from 0, so a subscriber to some topics sees no false gaps from the others.
use super::kv::{KvEventBatch, LoadMetrics, WorkerStats};
use serde::de::DeserializeOwned;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Kv,
    Load,
    Stats,
    /// A planner's decisions.
    Plan,
    /// A router's traffic.
    Router,
}

impl Topic {
    /// In declaration order, so `topic as usize` indexes it (per-topic state lives in arrays).
    pub const ALL: [Topic; 5] = [Topic::Kv, Topic::Load, Topic::Stats, Topic::Plan, Topic::Router];

    /// What workers publish.
    pub const WORKER: [Topic; 3] = [Topic::Kv, Topic::Load, Topic::Stats];

    pub fn name(self) -> &'static [u8] {
        match self {
            Topic::Kv => b"kv",
            Topic::Load => b"load",
            Topic::Stats => b"stats",
            Topic::Plan => b"plan",
            Topic::Router => b"router",
        }
    }

    pub fn from_name(name: &[u8]) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.name() == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("expected 4 frames (topic, publisher, seq, payload), got {0}")]
    FrameCount(usize),
    #[error("unknown topic {0:?}")]
    Topic(String),
    #[error("the {0} frame must be 8 bytes")]
    Header(&'static str),
    #[error("payload does not decode: {0}")]
    Payload(String),
    #[error("the payload is not sealed with this cluster's key (a worker with another --cluster-key-file, or none)")]
    Unsealed,
    #[error("a sealed message received before, sent again (a replay by someone who captured it)")]
    Replayed,
    #[error("a message from worker {worker:016x}'s connection under another worker's id, {claimed:016x}")]
    NotItsWorker { worker: u64, claimed: u64 },
}

/// A decoded frame's header; the payload stays bytes until the reader knows what it wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub topic: Topic,
    pub publisher: u64,
    pub seq: u64,
}

/// What one topic carries, and how it becomes a frame's msgpack bytes and back.
pub trait Payload: Sized {
    /// The topic it travels on; each topic carries one type.
    const TOPIC: Topic;

    /// Appends the payload's bytes to `out` (a publisher reuses one buffer for every message).
    fn write_to(&self, out: &mut Vec<u8>);
    fn from_bytes(payload: &[u8]) -> Result<Self, FrameError>;

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

/// Hot: a worker publishes one per engine step and a router decodes every one, so it has its own codec.
impl Payload for KvEventBatch {
    const TOPIC: Topic = Topic::Kv;

    fn write_to(&self, out: &mut Vec<u8>) {
        self.encode_into(out)
    }

    fn from_bytes(payload: &[u8]) -> Result<Self, FrameError> {
        KvEventBatch::decode(payload).map_err(|e| FrameError::Payload(e.to_string()))
    }
}

/// A few a second per worker: serde's msgpack.
macro_rules! serde_payload {
    ($($payload:ty => $topic:expr),*) => {$(
        impl Payload for $payload {
            const TOPIC: Topic = $topic;

            fn write_to(&self, out: &mut Vec<u8>) {
                // Plain data types serialize infallibly to msgpack.
                let _ = rmp_serde::encode::write(out, self);
            }

            fn from_bytes(payload: &[u8]) -> Result<Self, FrameError> {
                decode_serde(payload)
            }
        }
    )*};
}

serde_payload!(LoadMetrics => Topic::Load, WorkerStats => Topic::Stats, super::Plan => Topic::Plan, super::RouterReport => Topic::Router);

fn decode_serde<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(payload).map_err(|e| FrameError::Payload(e.to_string()))
}

/// Checks the frame layout and reads the header.
pub fn decode_header(frames: &[&[u8]]) -> Result<FrameHeader, FrameError> {
    let [topic, publisher, seq, _payload] = frames else { return Err(FrameError::FrameCount(frames.len())) };
    let topic = Topic::from_name(topic).ok_or_else(|| FrameError::Topic(String::from_utf8_lossy(topic).into()))?;
    let u64_be = |bytes: &[u8], name| bytes.try_into().map(u64::from_be_bytes).map_err(|_| FrameError::Header(name));
    Ok(FrameHeader { topic, publisher: u64_be(publisher, "publisher")?, seq: u64_be(seq, "seq")? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::{KvEvent, StoredBlock};

    #[test]
    fn header_and_payload_round_trip() {
        let batch = KvEventBatch {
            worker_id: 3,
            events: vec![KvEvent::Stored {
                parent_hash: Some(1),
                blocks: vec![StoredBlock { hash: 2, tokens_hash: 5 }],
            }],
        };
        let payload = batch.to_bytes();
        let frames: [&[u8]; 4] = [b"kv", &7u64.to_be_bytes(), &9u64.to_be_bytes(), &payload];
        assert_eq!(decode_header(&frames), Ok(FrameHeader { topic: Topic::Kv, publisher: 7, seq: 9 }));
        assert_eq!(KvEventBatch::from_bytes(&payload), Ok(batch));
        let load = LoadMetrics { requests_running: 3, kv_total_blocks: 1 << 40, ..Default::default() };
        assert_eq!(LoadMetrics::from_bytes(&load.to_bytes()), Ok(load));
    }

    #[test]
    fn a_topic_indexes_its_place_in_all() {
        for (i, topic) in Topic::ALL.into_iter().enumerate() {
            assert_eq!(topic as usize, i);
            assert_eq!(Topic::from_name(topic.name()), Some(topic));
        }
    }

    #[test]
    fn bad_frames_are_errors_that_say_what_is_wrong() {
        assert_eq!(decode_header(&[b"kv"]), Err(FrameError::FrameCount(1)));
        assert!(matches!(decode_header(&[b"nope", &[0; 8], &[0; 8], b""]), Err(FrameError::Topic(_))));
        assert_eq!(decode_header(&[b"kv", &[0; 3], &[0; 8], b""]), Err(FrameError::Header("publisher")));
        assert!(KvEventBatch::from_bytes(b"\xc1garbage").is_err());
        assert!(LoadMetrics::from_bytes(b"\xc1garbage").is_err());
    }
}
