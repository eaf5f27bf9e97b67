//! One worker's KV events on their way into the router's index, and their repair. When the router cannot
//! trust what it has (it just joined, or the event plane showed a gap or a restarted publisher) it asks the
//! worker for a snapshot and holds the events that keep coming until the snapshot is there; then it
//! replaces the worker's entries with the snapshot and applies the held events the snapshot does not cover.
use crate::core::plane::request::KvSnapshot;
use crate::core::protocol::{KvEvent, KvEventBatch, WorkerId};

#[derive(Debug, Default)]
pub struct KvFeed {
    /// Events held (with their sequence numbers) while a snapshot is on its way.
    held: Option<Vec<(u64, KvEventBatch)>>,
}

impl KvFeed {
    /// Starts a repair unless one is under way; true when a snapshot must be asked for.
    pub fn begin_resync(&mut self) -> bool {
        if self.held.is_some() {
            return false;
        }
        self.held = Some(Vec::new());
        true
    }

    /// A KV message from the event plane: true when it is to be applied now; while a snapshot is awaited
    /// a copy is held instead.
    pub fn receive(&mut self, seq: u64, batch: &KvEventBatch) -> bool {
        match &mut self.held {
            Some(held) => {
                held.push((seq, batch.clone()));
                false
            }
            None => true,
        }
    }

    /// The snapshot arrived (or did not, `None`): what to apply, in order. Without a snapshot the worker's
    /// entries are dropped, which loses hits but never sends a request after blocks that are gone.
    pub fn finish(&mut self, worker: WorkerId, snapshot: Option<KvSnapshot>) -> Vec<KvEventBatch> {
        let held = self.held.take().unwrap_or_default();
        let (first_uncovered, mut events) = match snapshot {
            Some(snapshot) => (snapshot.next_seq, snapshot.events),
            None => (0, Vec::new()),
        };
        events.insert(0, KvEvent::Cleared);
        let mut batches = vec![KvEventBatch { worker_id: worker, events }];
        batches.extend(held.into_iter().filter(|(seq, _)| *seq >= first_uncovered).map(|(_, batch)| batch));
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::StoredBlock;

    fn stored(hash: u64) -> KvEventBatch {
        let blocks = vec![StoredBlock { hash, tokens_hash: hash }];
        KvEventBatch { worker_id: 1, events: vec![KvEvent::Stored { parent_hash: None, blocks }] }
    }

    #[test]
    fn events_the_snapshot_covers_are_skipped_and_later_ones_applied_after_it() {
        let mut feed = KvFeed::default();
        assert!(feed.receive(0, &stored(10)), "live: straight through");
        assert!(feed.begin_resync());
        assert!(!feed.begin_resync(), "one snapshot at a time");
        assert!(!feed.receive(5, &stored(15)));
        assert!(!feed.receive(6, &stored(16)));
        let snapshot = KvSnapshot { next_seq: 6, events: stored(15).events };
        let applied = feed.finish(1, Some(snapshot));
        let mut expected = vec![KvEvent::Cleared];
        expected.extend(stored(15).events);
        assert_eq!(applied, vec![KvEventBatch { worker_id: 1, events: expected }, stored(16)]);
        assert!(feed.receive(7, &stored(17)), "live again");
    }

    #[test]
    fn without_a_snapshot_the_workers_entries_are_dropped_and_held_events_kept() {
        let mut feed = KvFeed::default();
        feed.begin_resync();
        assert!(!feed.receive(3, &stored(3)));
        let applied = feed.finish(1, None);
        assert_eq!(applied, vec![KvEventBatch { worker_id: 1, events: vec![KvEvent::Cleared] }, stored(3)]);
    }
}
