//! FlashIndexer: one flat hash table from block hash to the workers holding it, sharded by hash.
//!
//! Why flat: a radix tree costs a pointer chase (a DRAM miss, ~350 ns here) per block and ~340 B per
//! (worker, block); a table keyed by the chained sequence hash reaches any block of a prompt in one probe.
//! Because a worker holds a block only with its whole prefix (rule 2 in `mod.rs`), the sets of workers along
//! a prompt only shrink, so `find_matches` needs no walk: it probes the first and last block, then bisects
//! only where the set changes — two probes when every holder holds the whole prompt, O(k log n) when k
//! different depths occur.
//!
//! Concurrency: 64 shards, each a `RwLock` held for one block's update or one probe, never across I/O or
//! another shard, so a lookup waits at most for one block update on one shard and workers' events apply in
//! parallel. Each entry keeps its parent and children so that removing a block can drop the worker's
//! extensions of it (the cascade that keeps rule 2 true).
use super::worker_set::{Slot, WorkerSet};
use super::{Indexer, OverlapScores};
use crate::core::protocol::{KvEvent, WorkerId};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const SHARD_BITS: u32 = 6;

/// Block hashes are xxh3 outputs already: hashing them again buys nothing.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type BlockMap = HashMap<u64, Entry, BuildHasherDefault<IdentityHasher>>;

struct Entry {
    parent: Option<u64>,
    workers: WorkerSet,
    children: SmallVec<[u64; 2]>,
}

#[derive(Default)]
struct Workers {
    slots: HashMap<WorkerId, Slot>,
    ids: Vec<WorkerId>,
    blocks: Vec<AtomicUsize>,
}

pub struct FlashIndexer {
    shards: Box<[RwLock<BlockMap>]>,
    workers: RwLock<Workers>,
}

impl Default for FlashIndexer {
    fn default() -> Self {
        Self::new()
    }
}

impl FlashIndexer {
    pub fn new() -> Self {
        Self { shards: (0..1 << SHARD_BITS).map(|_| RwLock::default()).collect(), workers: RwLock::default() }
    }

    fn shard(&self, hash: u64) -> &RwLock<BlockMap> {
        // The high bits pick the shard; hashbrown uses the low bits and the top 7 inside it.
        &self.shards[((hash >> 32) as usize) & ((1 << SHARD_BITS) - 1)]
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, BlockMap> {
        self.shard(hash).read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, BlockMap> {
        self.shard(hash).write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `change` on the entry of `hash`, if there is one, under its shard's lock.
    fn with_entry(&self, hash: u64, change: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.write(hash).get_mut(&hash) {
            change(entry);
        }
    }

    fn workers(&self) -> RwLockReadGuard<'_, Workers> {
        self.workers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, worker: WorkerId) -> Slot {
        if let Some(&slot) = self.workers().slots.get(&worker) {
            return slot;
        }
        let mut workers = self.workers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&slot) = workers.slots.get(&worker) {
            return slot;
        }
        let slot = workers.ids.len() as Slot;
        workers.slots.insert(worker, slot);
        workers.ids.push(worker);
        workers.blocks.push(AtomicUsize::new(0));
        slot
    }

    fn count(&self, slot: Slot, added: bool) {
        if let Some(blocks) = self.workers().blocks.get(slot as usize) {
            if added {
                blocks.fetch_add(1, Ordering::Relaxed);
            } else {
                blocks.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn holds(&self, slot: Slot, hash: u64) -> bool {
        self.read(hash).get(&hash).is_some_and(|e| e.workers.contains(slot))
    }

    /// The workers holding `hash`, intersected with `within` (sets only shrink along a prompt).
    fn holders(&self, hash: u64, within: &WorkerSet) -> WorkerSet {
        match self.read(hash).get(&hash) {
            Some(entry) => entry.workers.intersection(within),
            None => WorkerSet::default(),
        }
    }

    fn store(&self, slot: Slot, mut parent: Option<u64>, hashes: impl Iterator<Item = u64>) {
        if parent.is_some_and(|p| !self.holds(slot, p)) {
            return;
        }
        for hash in hashes {
            let (created, added) = {
                let mut shard = self.write(hash);
                let mut created = false;
                let entry = shard.entry(hash).or_insert_with(|| {
                    created = true;
                    Entry { parent, workers: WorkerSet::default(), children: SmallVec::new() }
                });
                (created, entry.workers.insert(slot))
            };
            if added {
                self.count(slot, true);
            }
            if created && let Some(p) = parent {
                self.with_entry(p, |parent_entry| parent_entry.children.push(hash));
            }
            parent = Some(hash);
        }
    }

    /// Drops `hash` and every extension of it from the worker.
    fn remove(&self, slot: Slot, hash: u64) {
        let mut stack = vec![hash];
        while let Some(next) = stack.pop() {
            let emptied_parent = {
                let mut shard = self.write(next);
                let Some(entry) = shard.get_mut(&next) else { continue };
                if !entry.workers.remove(slot) {
                    continue;
                }
                stack.extend(entry.children.iter().copied());
                if entry.workers.is_empty() { shard.remove(&next).map(|e| e.parent) } else { None }
            };
            self.count(slot, false);
            if let Some(Some(parent)) = emptied_parent {
                self.with_entry(parent, |parent_entry| parent_entry.children.retain(|c| *c != next));
            }
        }
    }

    /// Drops every block of the worker: a scan of the table, fine for the rare Cleared or departure.
    fn clear(&self, slot: Slot) {
        let mut emptied = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            shard.retain(|&hash, entry| {
                entry.workers.remove(slot);
                let keep = !entry.workers.is_empty();
                if !keep {
                    emptied.push((hash, entry.parent));
                }
                keep
            });
        }
        for (hash, parent) in emptied {
            if let Some(parent) = parent {
                self.with_entry(parent, |parent_entry| parent_entry.children.retain(|c| *c != hash));
            }
        }
        if let Some(blocks) = self.workers().blocks.get(slot as usize) {
            blocks.store(0, Ordering::Relaxed);
        }
    }

    /// Memory held by the table, estimated from capacities (hashbrown: one control byte per bucket).
    pub fn memory_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(u64, Entry)>() + 1;
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.read().unwrap_or_else(|p| p.into_inner());
                let spilled: usize = shard
                    .values()
                    .map(|e| {
                        let children = if e.children.spilled() { e.children.capacity() * 8 } else { 0 };
                        e.workers.heap_bytes() + children
                    })
                    .sum();
                shard.capacity() * slot + spilled
            })
            .sum()
    }
}

impl Indexer for FlashIndexer {
    fn apply(&self, worker: WorkerId, event: &KvEvent) {
        let slot = self.slot(worker);
        match event {
            KvEvent::Stored { parent_hash, blocks } => self.store(slot, *parent_hash, blocks.iter().map(|b| b.hash)),
            KvEvent::Removed { hashes } => hashes.iter().for_each(|&h| self.remove(slot, h)),
            KvEvent::Cleared => self.clear(slot),
        }
    }

    fn remove_worker(&self, worker: WorkerId) {
        let slot = self.workers().slots.get(&worker).copied();
        if let Some(slot) = slot {
            self.clear(slot);
        }
    }

    fn find_matches(&self, hashes: &[u64]) -> OverlapScores {
        let Some((&first_hash, _)) = hashes.split_first() else { return OverlapScores::default() };
        let first = match self.read(first_hash).get(&first_hash) {
            Some(entry) => entry.workers.clone(),
            None => return OverlapScores::default(),
        };
        let last_index = hashes.len() - 1;
        let last = if last_index == 0 { first.clone() } else { self.holders(hashes[last_index], &first) };
        let mut depths: Vec<(Slot, u32)> = last.iter().map(|s| (s, hashes.len() as u32)).collect();
        // Bisect (lo, hi] for the positions where holders drop out; the sets at both ends are known.
        let mut pending = vec![(0usize, first, last_index, last)];
        while let Some((lo, at_lo, hi, at_hi)) = pending.pop() {
            if at_lo.len() == at_hi.len() {
                continue;
            }
            if hi == lo + 1 {
                depths.extend(at_lo.difference(&at_hi).map(|s| (s, hi as u32)));
                continue;
            }
            let mid = lo + (hi - lo) / 2;
            let at_mid = self.holders(hashes[mid], &at_lo);
            let at_hi = at_hi.intersection(&at_mid);
            pending.push((mid, at_mid.clone(), hi, at_hi));
            pending.push((lo, at_lo, mid, at_mid));
        }
        let workers = self.workers();
        let mut scores: Vec<(WorkerId, u32)> =
            depths.into_iter().filter_map(|(slot, depth)| Some((*workers.ids.get(slot as usize)?, depth))).collect();
        scores.sort_unstable();
        OverlapScores { scores }
    }

    fn block_counts(&self) -> Vec<(WorkerId, usize)> {
        let workers = self.workers();
        let mut counts: Vec<(WorkerId, usize)> = workers
            .ids
            .iter()
            .zip(&workers.blocks)
            .map(|(&id, n)| (id, n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        counts.sort_unstable();
        counts
    }
}
