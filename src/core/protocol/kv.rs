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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
