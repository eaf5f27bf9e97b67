//! An engine's record of what its prefix cache holds, kept from the same KV events it publishes, so that a
//! consumer that missed some (an in-process feed that lagged; over the planes, a router after a gap, a
//! restart or a late join) can have the whole picture instead of routing on a stale index. Built from the
//! events rather than asked of the cache, it serves every engine alike (built-in, mocker, external adapters).
//! One per engine: the worker that puts the engine on the planes answers snapshots from it too.
use crate::core::protocol::{KvEvent, StoredBlock};
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct KvLedger {
    blocks: HashMap<u64, Entry>,
    next_order: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    parent: Option<u64>,
    tokens_hash: u64,
    /// When it was stored: a parent is always stored before its children, so this order replays safely.
    order: u64,
}

impl KvLedger {
    /// Records events as they are published.
    pub fn record(&mut self, events: &[KvEvent]) {
        for event in events {
            match event {
                KvEvent::Stored { parent_hash, blocks } => {
                    let mut parent = *parent_hash;
                    for block in blocks {
                        let order = self.next_order;
                        self.next_order += 1;
                        self.blocks.insert(block.hash, Entry { parent, tokens_hash: block.tokens_hash, order });
                        parent = Some(block.hash);
                    }
                }
                KvEvent::Removed { hashes } => hashes.iter().for_each(|hash| {
                    self.blocks.remove(hash);
                }),
                KvEvent::Cleared => self.blocks.clear(),
            }
        }
    }

    /// Blocks the cache holds.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The cache as `Stored` events in storing order (chains merged into one event each).
    pub fn snapshot(&self) -> Vec<KvEvent> {
        let mut entries: Vec<(&u64, &Entry)> = self.blocks.iter().collect();
        entries.sort_unstable_by_key(|(_, entry)| entry.order);
        let mut events = Vec::new();
        let mut chain_end: Option<u64> = None;
        for (&hash, entry) in entries {
            let block = StoredBlock { hash, tokens_hash: entry.tokens_hash };
            match events.last_mut() {
                Some(KvEvent::Stored { blocks, .. }) if chain_end.is_some() && entry.parent == chain_end => {
                    blocks.push(block)
                }
                _ => events.push(KvEvent::Stored { parent_hash: entry.parent, blocks: vec![block] }),
            }
            chain_end = Some(hash);
        }
        events
    }
}

/// An engine whose snapshot is a ledger its test records into by hand (its events otherwise the wrapped
/// engine's), for tests of what is done with snapshots.
#[cfg(test)]
pub struct HandKeptLedger {
    pub engine: std::sync::Arc<dyn super::Engine>,
    pub ledger: std::sync::Mutex<KvLedger>,
}

#[cfg(test)]
impl super::Engine for HandKeptLedger {
    fn worker_id(&self) -> crate::core::protocol::WorkerId {
        self.engine.worker_id()
    }

    fn submit(
        &self,
        request: crate::core::protocol::PreprocessedRequest,
    ) -> Result<super::ResponseStream, super::EngineError> {
        self.engine.submit(request)
    }

    fn subscribe_kv_events(&self) -> tokio::sync::broadcast::Receiver<crate::core::protocol::KvEventBatch> {
        self.engine.subscribe_kv_events()
    }

    fn load(&self) -> crate::core::protocol::LoadMetrics {
        self.engine.load()
    }

    fn kv_snapshot(&self) -> Option<Vec<KvEvent>> {
        Some(self.ledger.lock().unwrap_or_else(|p| p.into_inner()).snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::indexer::{Indexer, ReferenceIndexer};

    fn stored(parent: Option<u64>, hashes: &[u64]) -> KvEvent {
        KvEvent::Stored {
            parent_hash: parent,
            blocks: hashes.iter().map(|&hash| StoredBlock { hash, tokens_hash: hash ^ 0xff }).collect(),
        }
    }

    #[test]
    fn a_snapshot_rebuilds_the_same_index_as_the_events_did() {
        let history = [
            stored(None, &[1, 2, 3]),
            stored(Some(2), &[20, 21]),
            KvEvent::Removed { hashes: vec![3] },
            stored(None, &[7]),
            stored(Some(21), &[22]),
            KvEvent::Removed { hashes: vec![7] },
            stored(None, &[9, 10]),
        ];
        let mut ledger = KvLedger::default();
        let live = ReferenceIndexer::new();
        for event in &history {
            ledger.record(std::slice::from_ref(event));
            live.apply(5, event);
        }
        let events = ledger.snapshot();
        // One event per chain in storing order: [1, 2, 20, 21, 22] (3 and 7 are gone), then [9, 10].
        assert_eq!(events.len(), 2, "{events:?}");
        let rebuilt = ReferenceIndexer::new();
        rebuilt.apply_all(5, &events);
        for query in [vec![1, 2, 20, 21, 22], vec![1, 2, 3], vec![9, 10], vec![7]] {
            assert_eq!(rebuilt.find_matches(&query).of(5), live.find_matches(&query).of(5), "{query:?}");
        }
        ledger.record(&[KvEvent::Cleared]);
        assert_eq!(ledger.snapshot(), vec![]);
    }

    /// What an engine could say, one step at a time: store a chain under a block it holds (or a new root),
    /// remove a block it holds, or clear everything. `pick` chooses among what it holds.
    #[derive(Debug, Clone)]
    enum Step {
        Store { under: Option<usize>, len: u64 },
        Remove { pick: usize },
        Clear,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (proptest::option::of(any::<usize>()), 1..4u64).prop_map(|(under, len)| Step::Store { under, len }),
            3 => any::<usize>().prop_map(|pick| Step::Remove { pick }),
            1 => Just(Step::Clear),
        ]
    }

    proptest::proptest! {
        #![proptest_config(crate::core::protocol::fuzz::config(256))]

        /// Why a worker may read how many KV messages it published before it takes the engine's snapshot:
        /// the router then replays every message from that number on, some of which the snapshot already
        /// holds; a suffix of a consistent history replayed onto a later state still ends where the whole
        /// history does.
        #[test]
        fn a_history_suffix_replayed_onto_a_later_snapshot_ends_where_the_history_does(
            steps in proptest::collection::vec(step(), 1..60),
            cut in (0.0..1.0f64, 0.0..1.0f64),
        ) {
            let truth = ReferenceIndexer::new();
            // Every block ever stored, as the path of hashes from its root.
            let mut paths: std::collections::HashMap<u64, Vec<u64>> = Default::default();
            let mut history = Vec::new();
            let mut next_hash = 1u64;
            for step in steps {
                let held: Vec<u64> = {
                    let mut held: Vec<u64> = paths.iter().filter(|(_, p)| truth.find_matches(p).of(1) as usize == p.len()).map(|(&h, _)| h).collect();
                    held.sort_unstable();
                    held
                };
                let event = match step {
                    Step::Store { under, len } => {
                        let parent = under.filter(|_| !held.is_empty()).map(|i| held[i % held.len()]);
                        let mut path = parent.map_or_else(Vec::new, |p| paths[&p].clone());
                        let blocks = (0..len).map(|_| {
                            let hash = next_hash;
                            next_hash += 1;
                            path.push(hash);
                            paths.insert(hash, path.clone());
                            StoredBlock { hash, tokens_hash: hash }
                        }).collect();
                        KvEvent::Stored { parent_hash: parent, blocks }
                    }
                    Step::Remove { pick } if !held.is_empty() => KvEvent::Removed { hashes: vec![held[pick % held.len()]] },
                    Step::Remove { .. } | Step::Clear => KvEvent::Cleared,
                };
                truth.apply(1, &event);
                history.push(event);
            }
            // The snapshot is taken after `taken` events; replay starts at `from` ≤ `taken`.
            let taken = (cut.0 * (history.len() + 1) as f64) as usize;
            let from = (cut.1 * (taken + 1) as f64) as usize;
            let mut ledger = KvLedger::default();
            ledger.record(&history[..taken]);
            let replayed = ReferenceIndexer::new();
            replayed.apply_all(1, &ledger.snapshot());
            replayed.apply_all(1, &history[from..]);
            for path in paths.values() {
                proptest::prop_assert_eq!(replayed.find_matches(path).of(1), truth.find_matches(path).of(1), "{:?}", path);
            }
        }
    }
}
