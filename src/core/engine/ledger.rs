//! A worker's record of what its prefix cache holds, kept from the same KV events it publishes, so that a
//! router that missed some (a gap, a restart, a late join) can ask for the whole picture instead of
//! routing on a stale index. Built from the events rather than asked of the engine, it serves every engine
//! alike (built-in, mocker, external adapters).
use crate::core::protocol::{KvEvent, StoredBlock};
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct KvLedger {
    blocks: HashMap<u64, Entry>,
    next_order: u64,
    /// The sequence number the next KV message on the event plane will carry.
    next_seq: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    parent: Option<u64>,
    tokens_hash: u64,
    /// When it was stored: a parent is always stored before its children, so this order replays safely.
    order: u64,
}

impl KvLedger {
    /// Records one published KV message: its events and the sequence number after it.
    pub fn record(&mut self, events: &[KvEvent], next_seq: u64) {
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
        self.next_seq = next_seq;
    }

    /// The cache as `Stored` events in storing order (chains merged into one event each), and the
    /// sequence number of the first KV message it does not reflect.
    pub fn snapshot(&self) -> (u64, Vec<KvEvent>) {
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
        (self.next_seq, events)
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
        for (seq, event) in history.iter().enumerate() {
            ledger.record(std::slice::from_ref(event), seq as u64 + 1);
            live.apply(5, event);
        }
        let (next_seq, events) = ledger.snapshot();
        assert_eq!(next_seq, history.len() as u64);
        // One event per chain in storing order: [1, 2, 20, 21, 22] (3 and 7 are gone), then [9, 10].
        assert_eq!(events.len(), 2, "{events:?}");
        let rebuilt = ReferenceIndexer::new();
        rebuilt.apply_all(5, &events);
        for query in [vec![1, 2, 20, 21, 22], vec![1, 2, 3], vec![9, 10], vec![7]] {
            assert_eq!(rebuilt.find_matches(&query).of(5), live.find_matches(&query).of(5), "{query:?}");
        }
        ledger.record(&[KvEvent::Cleared], 9);
        assert_eq!(ledger.snapshot(), (9, vec![]));
    }
}
