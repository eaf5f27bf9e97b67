//! The reference index: per worker, the held blocks with their parents and children, all behind one lock.
//! Written to be obviously right, not fast.
use super::{Indexer, OverlapScores};
use crate::core::protocol::{KvEvent, WorkerId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Default)]
struct Held {
    parent: HashMap<u64, Option<u64>>,
    children: HashMap<u64, Vec<u64>>,
}

impl Held {
    fn store(&mut self, mut parent: Option<u64>, hashes: impl Iterator<Item = u64>) {
        if parent.is_some_and(|p| !self.parent.contains_key(&p)) {
            return;
        }
        for hash in hashes {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.parent.entry(hash) {
                slot.insert(parent);
                if let Some(p) = parent {
                    self.children.entry(p).or_default().push(hash);
                }
            }
            parent = Some(hash);
        }
    }

    fn remove(&mut self, hash: u64) {
        let Some(parent) = self.parent.get(&hash).copied() else { return };
        if let Some(siblings) = parent.and_then(|p| self.children.get_mut(&p)) {
            siblings.retain(|&c| c != hash);
        }
        let mut stack = vec![hash];
        while let Some(next) = stack.pop() {
            self.parent.remove(&next);
            stack.extend(self.children.remove(&next).unwrap_or_default());
        }
    }
}

#[derive(Default)]
pub struct ReferenceIndexer {
    workers: Mutex<BTreeMap<WorkerId, Held>>,
}

impl ReferenceIndexer {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<WorkerId, Held>> {
        self.workers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Indexer for ReferenceIndexer {
    fn apply(&self, worker: WorkerId, event: &KvEvent) {
        let mut workers = self.lock();
        let held = workers.entry(worker).or_default();
        match event {
            KvEvent::Stored { parent_hash, blocks } => held.store(*parent_hash, blocks.iter().map(|b| b.hash)),
            KvEvent::Removed { hashes } => hashes.iter().for_each(|&h| held.remove(h)),
            KvEvent::Cleared => *held = Held::default(),
        }
    }

    fn remove_worker(&self, worker: WorkerId) {
        self.lock().remove(&worker);
    }

    fn find_matches(&self, hashes: &[u64]) -> OverlapScores {
        let scores = self
            .lock()
            .iter()
            .map(|(&worker, held)| (worker, hashes.iter().take_while(|h| held.parent.contains_key(h)).count() as u32))
            .filter(|&(_, depth)| depth > 0)
            .collect();
        OverlapScores { scores }
    }

    fn block_counts(&self) -> Vec<(WorkerId, usize)> {
        self.lock()
            .iter()
            .map(|(&worker, held)| (worker, held.parent.len()))
            .filter(|&(_, blocks)| blocks > 0)
            .collect()
    }
}
