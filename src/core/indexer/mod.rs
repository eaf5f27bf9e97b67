//! The KV index: which worker holds which prompt prefix, built from the workers' KV events.
//!
//! Semantics every implementation shares (the differential suite in `tests.rs` holds them to it):
//! 1. Blocks are keyed by their sequence hash (`core::tokens`), so a hash names a whole prefix.
//! 2. A worker holds a block only together with its whole prefix, because an engine cannot use a block whose
//!    parent it lost. A `Stored` run whose parent the worker does not hold is ignored; `Removed` of a block
//!    also drops the worker's blocks that extend it; `Cleared` drops all of them.
//! 3. `find_matches(hashes)` gives, per worker, how many leading blocks of `hashes` it holds (workers with
//!    none are left out).
//! 4. Each worker's events are applied in order; different workers' events and lookups may run concurrently.
//!
//! `ReferenceIndexer` is the obvious version (per-worker sets, a lock around everything): the oracle for
//! tests and the baseline for benchmarks. `FlashIndexer` is the fast one.
mod flash;
mod reference;
mod table;
mod translate;
mod worker_set;

pub use flash::FlashIndexer;
pub use reference::ReferenceIndexer;
pub use translate::EventTranslator;

use crate::core::protocol::{KvEvent, WorkerId};

/// Leading blocks of a query each worker holds, sorted by worker id; workers with zero are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlapScores {
    pub scores: Vec<(WorkerId, u32)>,
}

impl OverlapScores {
    pub fn of(&self, worker: WorkerId) -> u32 {
        self.scores.iter().find(|(w, _)| *w == worker).map_or(0, |(_, depth)| *depth)
    }
}

pub trait Indexer: Send + Sync {
    fn apply(&self, worker: WorkerId, event: &KvEvent);

    /// One worker's events in order (a step's batch).
    fn apply_all(&self, worker: WorkerId, events: &[KvEvent]) {
        events.iter().for_each(|event| self.apply(worker, event));
    }

    /// Forgets a worker and everything it held.
    fn remove_worker(&self, worker: WorkerId);

    fn find_matches(&self, hashes: &[u64]) -> OverlapScores;

    /// Blocks each worker holds, sorted by worker id; workers holding none are left out.
    fn block_counts(&self) -> Vec<(WorkerId, usize)>;
}

#[cfg(test)]
mod tests;
