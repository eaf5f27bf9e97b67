//! Request-plane messages: a router's DEALER socket talks to a worker's ROUTER socket, one msgpack frame per
//! message (ROUTER adds the peer's identity frame in front on the worker side).
//!
//! Every message names its `stream`, a number the router picks per request, so one connection carries many
//! requests at once. The router pings each worker every heartbeat; the `Hello` answer carries the worker's
//! whole record, so a ping is at the same time the health check and the way a router learns who is there.
use super::discovery::Instance;
use super::engine::{EngineOutput, PreprocessedRequest};
use super::kv::KvEvents;
use super::profile::Profile;
use serde::{Deserialize, Serialize};

/// Raised whenever a message changes meaning; a peer with another version is refused with both numbers.
pub const PROTOCOL_VERSION: u32 = 12;

/// Frames above this are refused unread (a prompt of a million tokens is about 5 MB of msgpack).
pub const MAX_FRAME_BYTES: usize = 64 << 20;

// A request is most of what crosses to a worker, one message each: boxing it would add an allocation to every
// request to save bytes in the rare pings.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    Ping {
        version: u32,
    },
    /// The model's text files (tokenizer, templates, configs), so a router needs no copy of the model.
    ModelFiles,
    /// How fast the worker is, for a router that prices workers in time.
    Profile,
    Generate {
        stream: u64,
        request: PreprocessedRequest,
    },
    /// The client went away: stop the request and free its KV blocks, in prefill as well as in decode.
    Cancel {
        stream: u64,
    },
    /// Everything the worker's prefix cache holds, for a router that missed KV events or just joined.
    KvSnapshot,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    Hello {
        version: u32,
        instance: Instance,
    },
    ModelFiles {
        files: Vec<(String, String)>,
    },
    /// `None` from a worker whose engine has none.
    Profile {
        profile: Option<Profile>,
    },
    /// One piece of a snapshot (a big cache takes several frames); `last` ends it. The snapshot reflects
    /// exactly the KV messages numbered below `next_seq` on the event plane: a router applies it, then
    /// the messages it buffered from `next_seq` on.
    KvSnapshot {
        next_seq: u64,
        events: KvEvents,
        last: bool,
    },
    /// Outputs end with one that has a `finish_reason`.
    Output {
        stream: u64,
        output: EngineOutput,
    },
    /// The request never started: invalid, or the worker is at its limit of requests in flight.
    Refused {
        stream: u64,
        reason: Refusal,
    },
    /// A message the worker could not read; the connection stays up.
    Unreadable {
        reason: String,
    },
    /// Outputs that were ready at once (a batched engine step yields one per running request), in one
    /// frame instead of one each. Never nested.
    Batch(Vec<FromWorker>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Refusal {
    Busy {
        limit: usize,
    },
    /// The worker is shutting down: it finishes what it serves but takes nothing new.
    Draining,
    Invalid(String),
    Version {
        ours: u32,
        yours: u32,
    },
    /// Its engine cannot take requests now (an external engine that stopped answering); another worker can.
    Unavailable(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    #[error("message of {0} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("message does not decode: {0}")]
    Decode(String),
}

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Plain data types serialize infallibly to msgpack.
    rmp_serde::to_vec(message).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, MessageError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    rmp_serde::from_slice(bytes).map_err(|e| MessageError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::discovery::{ModelCardSummary, Role};
    use rand::{Rng, SeedableRng};

    fn instance() -> Instance {
        Instance {
            id: 7,
            role: Role::Decode,
            model: "m".into(),
            namespace: "dynamo".into(),
            request_addr: "tcp://127.0.0.1:1".into(),
            event_addr: "tcp://127.0.0.1:2".into(),
            transfer_addr: None,
            card: ModelCardSummary { block_size: 16, context_length: 4096, kv_blocks: 100, tokenizer_hash: 3 },
            device: String::new(),
            http_addr: None,
            adapters: Vec::new(),
        }
    }

    #[test]
    fn messages_round_trip() {
        let messages = vec![
            FromWorker::Hello { version: PROTOCOL_VERSION, instance: instance() },
            FromWorker::Hello {
                version: PROTOCOL_VERSION,
                instance: Instance { transfer_addr: Some("tcp://127.0.0.1:3".into()), ..instance() },
            },
            FromWorker::Output { stream: 3, output: EngineOutput { token_ids: vec![1, 2], ..Default::default() } },
            FromWorker::Refused { stream: 4, reason: Refusal::Busy { limit: 8 } },
            FromWorker::KvSnapshot {
                next_seq: 12,
                events: KvEvents(vec![crate::core::protocol::KvEvent::Cleared]),
                last: true,
            },
            FromWorker::Batch(vec![FromWorker::Output { stream: 5, output: EngineOutput::default() }]),
        ];
        for message in messages {
            assert_eq!(decode::<FromWorker>(&encode(&message)), Ok(message));
        }
        let generate = ToWorker::Generate { stream: 9, request: PreprocessedRequest::greedy("r", vec![1, 2, 3], 4) };
        assert_eq!(decode::<ToWorker>(&encode(&generate)), Ok(generate));
    }

    #[test]
    fn a_prompt_travels_as_one_byte_string_and_json_keeps_the_array() {
        let tokens = vec![0, 1, 127, 128, 65_535, 151_935, u32::MAX];
        let request = PreprocessedRequest::greedy("r", tokens.clone(), 4);
        let bytes = encode(&ToWorker::Generate { stream: 1, request: request.clone() });
        let raw: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        assert!(bytes.windows(raw.len()).any(|w| w == raw), "the ids as little-endian u32s, in one piece");
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(json["token_ids"], serde_json::json!(tokens));
        assert_eq!(serde_json::from_value::<PreprocessedRequest>(json).unwrap(), request);
        // A byte string cut inside an id is refused with what was wrong.
        let mut cut = rmp_serde::to_vec(&request).unwrap();
        let at = cut.windows(raw.len()).position(|w| w == raw).unwrap();
        cut[at - 1] -= 1;
        cut.remove(at);
        let error = rmp_serde::from_slice::<PreprocessedRequest>(&cut).unwrap_err().to_string();
        assert!(error.contains("not a whole number of 4-byte ids"), "{error}");
    }

    #[test]
    fn oversized_and_mangled_messages_are_errors_not_panics() {
        assert_eq!(
            decode::<ToWorker>(&vec![0x90; MAX_FRAME_BYTES + 1]),
            Err(MessageError::TooLarge(MAX_FRAME_BYTES + 1))
        );
        let valid =
            encode(&ToWorker::Generate { stream: 1, request: PreprocessedRequest::greedy("r", vec![5; 40], 4) });
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random(),
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, rng.random()),
                }
            }
            let _ = decode::<ToWorker>(&bytes);
            let _ = decode::<FromWorker>(&bytes);
        }
    }
}
