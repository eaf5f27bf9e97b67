//! FlashIndexer: a flat hash table from block hash to the workers holding it, sharded by hash.
//!
//! Why flat: a radix tree costs a pointer chase (a DRAM miss, ~350 ns here) per block and ~340 B per
//! (worker, block); a table keyed by the chained sequence hash reaches any block of a prompt in one probe.
//! Because a worker holds a block only with its whole prefix (rule 2 in `mod.rs`), the sets of workers along
//! a prompt only shrink, so `find_matches` needs no walk: it probes the first and last block, then bisects
//! only where the set changes — two probes when every holder holds the whole prompt, O(k log n) when k
//! different depths occur.
//!
//! Each shard is a flat open-addressing table (`table.rs`) of 32-byte entries, one cache line each: the hash
//! and its holders (a mask of the first 62 workers, or the block's one holder past them), which is all a
//! lookup reads, then the parent and first child, so removing a block can drop the worker's extensions of it
//! (the cascade that keeps rule 2 true). Further holders and children live in side maps.
//!
//! Concurrency: 64 shards, each behind a `RwLock` held for one block's update or one probe, never across
//! I/O or another shard, so a lookup waits at most for one block update on one shard, and workers' events
//! apply in parallel.
use super::table::{Table, Unheld};
use super::worker_set::{Slot, WorkerSet};
use super::{Indexer, OverlapScores};
use crate::core::protocol::{KvEvent, WorkerId};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const SHARD_BITS: u32 = 6;

/// Blocks of one batch loaded ahead of its updates: two lines each stay well inside L1 until they are used.
const PREFETCH_LIMIT: usize = 64;

#[derive(Default)]
struct Workers {
    /// foldhash, not SipHash: looked up once per batch of every worker.
    slots: HashMap<WorkerId, Slot, foldhash::fast::RandomState>,
    ids: Vec<WorkerId>,
    blocks: Vec<AtomicUsize>,
}

pub struct FlashIndexer {
    shards: Box<[RwLock<Table>]>,
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

    fn shard_index(hash: u64) -> usize {
        // Bits 32..38 pick the shard; the table inside spreads the whole hash to pick a slot.
        ((hash >> 32) as usize) & ((1 << SHARD_BITS) - 1)
    }

    fn shard(&self, hash: u64) -> &RwLock<Table> {
        &self.shards[Self::shard_index(hash)]
    }

    /// Holders of a query's first and last blocks, read under both locks at once so that the two cache misses
    /// overlap instead of following each other: most lookups need nothing else.
    fn holders_at_ends(&self, first: u64, last: u64) -> (Option<WorkerSet>, Option<WorkerSet>) {
        if Self::shard_index(first) == Self::shard_index(last) {
            let table = self.read(first);
            table.warm(first);
            table.warm(last);
            return (table.holders(first), table.holders(last));
        }
        // Two read locks at once cannot deadlock: no writer ever holds one shard while waiting for another.
        let (first_table, last_table) = (self.read(first), self.read(last));
        first_table.warm(first);
        last_table.warm(last);
        (first_table.holders(first), last_table.holders(last))
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, Table> {
        self.shard(hash).read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, Table> {
        self.shard(hash).write().unwrap_or_else(|p| p.into_inner())
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

    /// Starts loading every block a batch updates before the first update: a block stored now, or evicted long
    /// after it was stored, is rarely in cache, and one update after another would wait out one miss (two,
    /// heads then links) each.
    fn prefetch(&self, events: &[KvEvent]) {
        let mut budget = PREFETCH_LIMIT;
        let mut prefetch = |hash: u64| {
            if budget > 0 {
                budget -= 1;
                self.read(hash).prefetch(hash);
            }
        };
        for event in events {
            match event {
                KvEvent::Stored { blocks, .. } => blocks.iter().for_each(|b| prefetch(b.hash)),
                KvEvent::Removed { hashes } => hashes.iter().for_each(|&hash| prefetch(hash)),
                KvEvent::Cleared => {}
            }
        }
    }

    /// Adjusts the worker's block count once per batch of events rather than once per block.
    fn count(&self, slot: Slot, change: isize) {
        if change == 0 {
            return;
        }
        if let Some(blocks) = self.workers().blocks.get(slot as usize) {
            blocks.fetch_add(change as usize, Ordering::Relaxed);
        }
    }

    /// The workers holding `hash`, intersected with `within` (sets only shrink along a prompt).
    fn holders(&self, hash: u64, within: &WorkerSet) -> WorkerSet {
        self.read(hash).holders(hash).map(|set| set.intersection(within)).unwrap_or_default()
    }

    fn unlink(&self, parent: u64, child: u64) {
        self.write(parent).remove_child(parent, child);
    }

    /// Adds the run of blocks; returns how many the worker did not hold before.
    fn store(&self, slot: Slot, mut parent: Option<u64>, hashes: impl Iterator<Item = u64>) -> isize {
        // The parent is visited once per block, after the block is in: that one visit both checks that the
        // worker holds the parent (rule 2; first block only) and links a new child, where a check before and
        // a link after cost two lock round trips and two probes of the same entry.
        let mut parent_checked = parent.is_none();
        let mut added = 0;
        for hash in hashes {
            let (created, was_added) = self.write(hash).insert(hash, parent, slot);
            if let Some(p) = parent
                && (created || !parent_checked)
            {
                // Bound first: the guard must be gone before `remove` below locks shards again.
                let held = {
                    let mut shard = self.write(p);
                    let held = parent_checked || shard.contains(p, slot);
                    if held && created {
                        shard.add_child(p, hash);
                    }
                    held
                };
                if !held {
                    // A block stored under a parent the worker does not hold: take it back out.
                    if was_added {
                        added += 1 - self.remove(slot, hash);
                    }
                    break;
                }
                parent_checked = true;
            }
            added += isize::from(was_added);
            parent = Some(hash);
        }
        added
    }

    /// Drops `hash` and every extension of it from the worker; returns how many blocks it held of them.
    fn remove(&self, slot: Slot, hash: u64) -> isize {
        self.remove_all(slot, &[hash])
    }

    /// `remove` for each of `hashes`, in order. Engines evict a chain leaf first, so a deleted block's parent
    /// is often the next hash: cutting the parent's link to it and removing the parent then share one lock
    /// and one probe, where they cost two of each.
    fn remove_all(&self, slot: Slot, hashes: &[u64]) -> isize {
        let mut removed = 0;
        // (parent, child): the link from a deleted block's parent, not cut yet.
        let mut link: Option<(u64, u64)> = None;
        for &hash in hashes {
            if let Some((parent, child)) = link.take_if(|(parent, _)| *parent != hash) {
                self.unlink(parent, child);
            }
            let unheld = {
                let mut shard = self.write(hash);
                if let Some((parent, child)) = link.take() {
                    shard.remove_child(parent, child);
                }
                shard.remove(hash, slot)
            };
            let Some(unheld) = unheld else { continue };
            removed += 1;
            link = unheld.unlink_from.map(|parent| (parent, hash));
            // The worker's extensions of the block go with it (rule 2).
            let mut stack: SmallVec<[u64; 8]> = unheld.children.into_iter().collect();
            while let Some(next) = stack.pop() {
                let Some(unheld) = self.write(next).remove(next, slot) else { continue };
                removed += 1;
                stack.extend(unheld.children);
                if let Some(parent) = unheld.unlink_from {
                    self.unlink(parent, next);
                }
            }
        }
        if let Some((parent, child)) = link {
            self.unlink(parent, child);
        }
        removed
    }

    /// Drops every block of the worker: a scan of the table, fine for the rare Cleared or departure.
    fn clear(&self, slot: Slot) {
        let mut held = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            held.extend(shard.held_by(slot));
        }
        for hash in held {
            // Bound first: an `if let` would hold this shard's lock into the block, which may lock it again.
            let removed = self.write(hash).remove(hash, slot);
            if let Some(Unheld { unlink_from: Some(parent), .. }) = removed {
                self.unlink(parent, hash);
            }
        }
        if let Some(blocks) = self.workers().blocks.get(slot as usize) {
            blocks.store(0, Ordering::Relaxed);
        }
    }

    /// Links that are not true: a listed child that is gone or has another parent, a block whose parent is gone
    /// or does not list it. Removals must cut what they leave behind, or child lists grow without end.
    #[cfg(test)]
    pub fn false_links(&self) -> Vec<String> {
        let blocks: HashMap<u64, (Option<u64>, Vec<u64>)> = self
            .shards
            .iter()
            .flat_map(|shard| shard.read().unwrap_or_else(|p| p.into_inner()).links())
            .map(|(key, parent, children)| (key, (parent, children)))
            .collect();
        let mut wrong = Vec::new();
        for (&key, (parent, children)) in &blocks {
            for child in children {
                if blocks.get(child).map(|(p, _)| *p) != Some(Some(key)) {
                    wrong.push(format!("{key:x} lists child {child:x}, which is gone or not its child"));
                }
            }
            if let Some(parent) = parent
                && !blocks.get(parent).is_some_and(|(_, siblings)| siblings.contains(&key))
            {
                wrong.push(format!("{key:x} has parent {parent:x}, which is gone or does not list it"));
            }
        }
        wrong
    }

    /// Memory held by the tables, from their capacities.
    pub fn memory_bytes(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().unwrap_or_else(|p| p.into_inner()).memory_bytes()).sum()
    }
}

impl Indexer for FlashIndexer {
    fn apply(&self, worker: WorkerId, event: &KvEvent) {
        self.apply_all(worker, std::slice::from_ref(event));
    }

    /// Finds the worker's slot once and adjusts its block count once: per event, those two took a lock on
    /// the worker map each and cost as much as the blocks' own updates.
    fn apply_all(&self, worker: WorkerId, events: &[KvEvent]) {
        self.prefetch(events);
        let slot = self.slot(worker);
        let mut change = 0;
        for event in events {
            match event {
                KvEvent::Stored { parent_hash, blocks } => {
                    change += self.store(slot, *parent_hash, blocks.iter().map(|b| b.hash));
                }
                KvEvent::Removed { hashes } => change -= self.remove_all(slot, hashes),
                KvEvent::Cleared => {
                    // The count restarts from zero: what was pending is gone with the blocks.
                    change = 0;
                    self.clear(slot);
                }
            }
        }
        self.count(slot, change);
    }

    fn remove_worker(&self, worker: WorkerId) {
        let slot = self.workers().slots.get(&worker).copied();
        if let Some(slot) = slot {
            self.clear(slot);
        }
    }

    fn find_matches(&self, hashes: &[u64]) -> OverlapScores {
        let Some((&first_hash, _)) = hashes.split_first() else { return OverlapScores::default() };
        let last_index = hashes.len() - 1;
        let (first, last) = self.holders_at_ends(first_hash, hashes[last_index]);
        let Some(first) = first else { return OverlapScores::default() };
        let last = last.map(|set| set.intersection(&first)).unwrap_or_default();
        let mut depths: SmallVec<[(Slot, u32); 8]> = last.iter().map(|s| (s, hashes.len() as u32)).collect();
        // Bisect (lo, hi] for the positions where holders drop out; the sets at both ends are known.
        let mut pending: SmallVec<[_; 8]> = SmallVec::new();
        if first.len() != last.len() {
            pending.push((0usize, first, last_index, last));
        }
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
