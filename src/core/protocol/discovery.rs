//! The record every role publishes about itself, the same in mDNS TXT properties, a static file and a
//! worker's `Hello` on the request plane.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefill and decode in one worker (aggregated serving).
    Decode,
    Prefill,
    Encode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: u64,
    pub role: Role,
    /// The name clients use in `"model"`.
    pub model: String,
    /// Clusters sharing a network see only their own namespace.
    pub namespace: String,
    /// ZMQ endpoint of the worker's ROUTER socket (`tcp://host:port`).
    pub request_addr: String,
    /// ZMQ endpoint of the worker's PUB socket.
    pub event_addr: String,
    pub card: ModelCardSummary,
}

/// What a router must agree on with a worker before sending it anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCardSummary {
    /// Tokens per KV block: prompt hashes are computed with it.
    pub block_size: u32,
    pub context_length: u32,
    pub kv_blocks: u64,
    /// xxh3 of `tokenizer.json`: two workers with different tokenizers cannot share one router.
    pub tokenizer_hash: u64,
}
