//! Approximate KV tracking for engines that publish no KV events: the router assumes a worker holds the
//! prompt blocks it was last sent, for a TTL.
//!
//! Every routed prompt renews the deadline of each of its blocks on the chosen worker. Because a prompt
//! renews its whole prefix, a block's deadline is never earlier than any of its extensions', so expiring a
//! block (a `Removed`, which drops the worker's extensions too) never takes away something still fresh.
use crate::core::indexer::Indexer;
use crate::core::protocol::{KvEvent, StoredBlock, WorkerId};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub struct ApproxTracker {
    ttl: Duration,
    deadlines: HashMap<(WorkerId, u64), Instant>,
    /// Deadlines in the order they were set; stale ones (renewed since) are skipped when popped.
    queue: VecDeque<(Instant, WorkerId, u64)>,
}

impl ApproxTracker {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, deadlines: HashMap::new(), queue: VecDeque::new() }
    }

    /// Records that `worker` was sent a prompt with these block hashes (a chain from the root).
    pub fn record(&mut self, index: &dyn Indexer, worker: WorkerId, hashes: &[u64], now: Instant) {
        if hashes.is_empty() {
            return;
        }
        let deadline = now + self.ttl;
        for &hash in hashes {
            self.deadlines.insert((worker, hash), deadline);
            self.queue.push_back((deadline, worker, hash));
        }
        let blocks = hashes.iter().map(|&hash| StoredBlock { hash, tokens_hash: 0 }).collect();
        index.apply(worker, &KvEvent::Stored { parent_hash: None, blocks });
    }

    /// Removes from the index every block whose deadline passed.
    pub fn expire(&mut self, index: &dyn Indexer, now: Instant) {
        while let Some(&(deadline, worker, hash)) = self.queue.front() {
            if deadline > now {
                break;
            }
            self.queue.pop_front();
            if self.deadlines.get(&(worker, hash)) == Some(&deadline) {
                self.deadlines.remove(&(worker, hash));
                index.apply(worker, &KvEvent::Removed { hashes: vec![hash] });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::indexer::FlashIndexer;

    #[test]
    fn decisions_count_as_cached_until_their_ttl_runs_out() {
        let index = FlashIndexer::new();
        let mut tracker = ApproxTracker::new(Duration::from_secs(10));
        let t0 = Instant::now();
        tracker.record(&index, 1, &[10, 11, 12], t0);
        assert_eq!(index.find_matches(&[10, 11, 12]).of(1), 3);
        // A shorter prompt sharing the prefix renews only the prefix.
        tracker.record(&index, 1, &[10, 11], t0 + Duration::from_secs(5));
        tracker.expire(&index, t0 + Duration::from_secs(11));
        assert_eq!(index.find_matches(&[10, 11, 12]).of(1), 2);
        tracker.expire(&index, t0 + Duration::from_secs(16));
        assert_eq!(index.find_matches(&[10, 11, 12]).of(1), 0);
        assert!(tracker.queue.is_empty() && tracker.deadlines.is_empty());
    }
}
