//! One shard's blocks: an open-addressing table (linear probing, backward-shift deletion) of 32-byte entries,
//! aligned so that each lies in one cache line: hash and holders (what a lookup reads), then the parent and
//! the first child (what updates add). Further children live in a side map.
//!
//! Why not `HashMap`s: a hashbrown probe reads a control group and then the entry, two cache lines, and the
//! index kept its holders and its tree links in two maps, so an update probed four lines and a removal more.
//! Why one entry and not two parallel arrays (16-byte heads for lookups, 24-byte links beside them, as this
//! was): updates of cold blocks are memory-bound, and the two arrays cost an update two cache misses where one
//! entry costs one. Replaying the Mooncake trace went from 18–21 to 27–28 M block ops/s with lookups
//! unchanged, and a block costs 32 bytes instead of 40. Most blocks have at most one child (a chain), so the
//! second inline child the arrays had rarely saved a side-map probe.
//!
//! A free slot is one with no holders: a block nobody holds is deleted, so `holders == 0` needs no separate
//! marker. A link that points at the block's own hash means "none", since no block is its own parent or child.
use super::worker_set::{LOW_MASK, LOW_SLOTS, Slot, WorkerSet};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// `holders` flag: more holders are listed in `Table::overflow`.
const FAR_LIST: u64 = 1 << 63;
/// `holders` flag: the block's one holder is a slot past the mask, kept in the low 32 bits. In a cluster of
/// thousands of workers most blocks are held by one worker past the mask; this keeps them out of the side map.
const FAR_ONE: u64 = 1 << 62;

const _: () = assert!(LOW_MASK & (FAR_LIST | FAR_ONE) == 0);

/// Fibonacci hashing: the top bits of the product depend on every bit of the hash, so even hashes built from
/// small counters (tests, synthetic traces) spread over the table.
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

const MIN_CAPACITY: usize = 16;

/// Block hashes are xxh3 outputs already: the side maps need not hash them again.
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
        self.0 = n.wrapping_mul(SPREAD);
    }
}

type SideMap<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

fn prefetch_line<T>(value: &T) {
    // SAFETY: SSE is part of every x86_64 CPU, and a prefetch is only a hint: it reads nothing into the program
    // and never faults, whatever the address.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((value as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// One block. 32 bytes at a 32-byte boundary: never split across two cache lines.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
struct Entry {
    key: u64,
    holders: u64,
    parent: u64,
    /// The first child; further ones are in `Table::more_children`.
    child: u64,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 32);

/// What is left to do after a worker let go of a block.
pub struct Unheld {
    /// Where the cascade goes next: the worker may hold extensions of the block.
    pub children: SmallVec<[u64; 4]>,
    /// Nobody holds the block any more, so it was deleted: its parent must forget it.
    pub unlink_from: Option<u64>,
}

pub struct Table {
    /// Power-of-two length.
    entries: Vec<Entry>,
    /// `64 - log2(entries.len())`: a hash's home slot is the top bits of its spread.
    shift: u32,
    len: usize,
    /// Holders past the mask (sorted), for blocks whose `holders` has the `OVERFLOW` bit.
    overflow: SideMap<Vec<Slot>>,
    /// Children past the inline one (a shared system prompt can have thousands).
    more_children: SideMap<Vec<u64>>,
}

impl Default for Table {
    fn default() -> Self {
        Self::with_capacity(MIN_CAPACITY)
    }
}

impl Table {
    fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.next_power_of_two().max(MIN_CAPACITY);
        Table {
            entries: vec![Entry::default(); capacity],
            shift: 64 - capacity.trailing_zeros(),
            len: 0,
            overflow: SideMap::default(),
            more_children: SideMap::default(),
        }
    }

    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(SPREAD) >> self.shift) as usize
    }

    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// The slot holding `key`, or the free slot where it would go.
    fn probe(&self, key: u64) -> Result<usize, usize> {
        let mut at = self.home(key);
        loop {
            let entry = &self.entries[at];
            if entry.holders == 0 {
                return Err(at);
            }
            if entry.key == key {
                return Ok(at);
            }
            at = (at + 1) & self.mask();
        }
    }

    /// Starts loading the line where `key`'s probe begins, so that probes of several keys overlap their misses.
    pub fn warm(&self, key: u64) {
        std::hint::black_box(self.entries[self.home(key)].holders);
    }

    /// Asks the CPU for the line an update of `key` will touch (its home slot) without waiting for it: an
    /// update that comes later finds it loaded, and the misses of many keys overlap.
    pub fn prefetch(&self, key: u64) {
        prefetch_line(&self.entries[self.home(key)]);
    }

    pub fn holders(&self, key: u64) -> Option<WorkerSet> {
        let holders = self.entries[self.probe(key).ok()?].holders;
        Some(match holders {
            _ if holders & FAR_ONE != 0 => WorkerSet::from_parts(0, &[holders as Slot]),
            _ if holders & FAR_LIST != 0 => {
                WorkerSet::from_parts(holders, self.overflow.get(&key).map_or(&[][..], Vec::as_slice))
            }
            _ => WorkerSet::from_parts(holders, &[]),
        })
    }

    pub fn contains(&self, key: u64, slot: Slot) -> bool {
        let Ok(at) = self.probe(key) else { return false };
        let holders = self.entries[at].holders;
        match slot {
            _ if holders & FAR_ONE != 0 => holders as Slot == slot,
            0..LOW_SLOTS => holders & (1 << slot) != 0,
            _ => holders & FAR_LIST != 0 && self.overflow.get(&key).is_some_and(|o| o.binary_search(&slot).is_ok()),
        }
    }

    /// Adds `slot` to the block's holders, creating the block under `parent`; returns (created, added).
    pub fn insert(&mut self, key: u64, parent: Option<u64>, slot: Slot) -> (bool, bool) {
        if (self.len + 1) * 4 > self.entries.len() * 3 {
            self.grow();
        }
        let at = match self.probe(key) {
            Ok(at) => at,
            Err(at) => {
                let holders = if slot < LOW_SLOTS { 1 << slot } else { FAR_ONE | u64::from(slot) };
                self.entries[at] = Entry { key, holders, parent: parent.unwrap_or(key), child: key };
                self.len += 1;
                return (true, true);
            }
        };
        let holders = &mut self.entries[at].holders;
        if *holders & FAR_ONE != 0 {
            let far = *holders as Slot;
            if far == slot {
                return (false, false);
            }
            // A second holder: the far one moves to the list.
            *holders = FAR_LIST;
            self.overflow.insert(key, vec![far]);
        }
        if slot < LOW_SLOTS {
            let bit = 1 << slot;
            let added = *holders & bit == 0;
            *holders |= bit;
            return (false, added);
        }
        *holders |= FAR_LIST;
        let list = self.overflow.entry(key).or_default();
        match list.binary_search(&slot) {
            Ok(_) => (false, false),
            Err(i) => {
                list.insert(i, slot);
                (false, true)
            }
        }
    }

    /// Takes `slot` off the block; `None` if the worker did not hold it.
    pub fn remove(&mut self, key: u64, slot: Slot) -> Option<Unheld> {
        let at = self.probe(key).ok()?;
        let holders = &mut self.entries[at].holders;
        if *holders & FAR_ONE != 0 {
            if *holders as Slot != slot {
                return None;
            }
            *holders = 0;
        } else if slot < LOW_SLOTS {
            let bit = 1 << slot;
            if *holders & bit == 0 {
                return None;
            }
            *holders &= !bit;
        } else {
            let list = self.overflow.get_mut(&key)?;
            let i = list.binary_search(&slot).ok()?;
            list.remove(i);
            match (list.as_slice(), *holders & LOW_MASK) {
                ([], _) => *holders &= !FAR_LIST,
                (&[last], 0) => *holders = FAR_ONE | u64::from(last),
                _ => {}
            }
            if *holders & FAR_LIST == 0 {
                self.overflow.remove(&key);
            }
        }
        let entry = self.entries[at];
        let mut children: SmallVec<[u64; 4]> = SmallVec::new();
        if entry.child != key {
            children.push(entry.child);
        }
        // Most blocks never spill: skip the side map's probe when it is empty.
        if !self.more_children.is_empty()
            && let Some(more) = self.more_children.get(&key)
        {
            children.extend_from_slice(more);
        }
        if entry.holders != 0 {
            return Some(Unheld { children, unlink_from: None });
        }
        if !self.more_children.is_empty() {
            self.more_children.remove(&key);
        }
        self.delete(at);
        Some(Unheld { children, unlink_from: (entry.parent != key).then_some(entry.parent) })
    }

    /// Records `child` under `parent`; false if the parent is not here.
    pub fn add_child(&mut self, parent: u64, child: u64) -> bool {
        let Ok(at) = self.probe(parent) else { return false };
        let first = &mut self.entries[at].child;
        if *first == parent {
            *first = child;
        } else {
            self.more_children.entry(parent).or_default().push(child);
        }
        true
    }

    pub fn remove_child(&mut self, parent: u64, child: u64) {
        let Ok(at) = self.probe(parent) else { return };
        let first = &mut self.entries[at].child;
        if *first == child {
            // Refill the inline place from the spill list, so inline stays full before anything spills.
            let more = if self.more_children.is_empty() { None } else { self.more_children.get_mut(&parent) };
            *first = match more {
                Some(more) => {
                    let moved = more.pop().unwrap_or(parent);
                    if more.is_empty() {
                        self.more_children.remove(&parent);
                    }
                    moved
                }
                None => parent,
            };
        } else if let Some(more) = self.more_children.get_mut(&parent) {
            more.retain(|c| *c != child);
            if more.is_empty() {
                self.more_children.remove(&parent);
            }
        }
    }

    /// Every block `slot` holds here.
    pub fn held_by(&self, slot: Slot) -> Vec<u64> {
        self.entries.iter().filter(|e| e.holders != 0).map(|e| e.key).filter(|&key| self.contains(key, slot)).collect()
    }

    /// Every block here with its parent and children, for checks that the links stay true.
    #[cfg(test)]
    pub fn links(&self) -> Vec<(u64, Option<u64>, Vec<u64>)> {
        let held = self.entries.iter().filter(|entry| entry.holders != 0);
        held.map(|entry| {
            let key = entry.key;
            let mut children: Vec<u64> = (entry.child != key).then_some(entry.child).into_iter().collect();
            children.extend(self.more_children.get(&key).into_iter().flatten());
            (key, (entry.parent != key).then_some(entry.parent), children)
        })
        .collect()
    }

    pub fn memory_bytes(&self) -> usize {
        let map_slot = |value: usize| std::mem::size_of::<u64>() + value + 1;
        self.entries.len() * std::mem::size_of::<Entry>()
            + self.overflow.capacity() * map_slot(std::mem::size_of::<Vec<Slot>>())
            + self.overflow.values().map(|o| o.capacity() * std::mem::size_of::<Slot>()).sum::<usize>()
            + self.more_children.capacity() * map_slot(std::mem::size_of::<Vec<u64>>())
            + self.more_children.values().map(|c| c.capacity() * 8).sum::<usize>()
    }

    /// Empties slot `at`, shifting back the entries after it that probed past it, so probes never need
    /// tombstones.
    fn delete(&mut self, mut at: usize) {
        self.entries[at].holders = 0;
        self.len -= 1;
        let mut next = (at + 1) & self.mask();
        while self.entries[next].holders != 0 {
            let home = self.home(self.entries[next].key);
            // The entry at `next` may move back to `at` unless its home lies in (at, next] (cyclically).
            let stays = if at <= next { at < home && home <= next } else { at < home || home <= next };
            if !stays {
                self.entries[at] = self.entries[next];
                self.entries[next].holders = 0;
                at = next;
            }
            next = (next + 1) & self.mask();
        }
    }

    fn grow(&mut self) {
        let capacity = self.entries.len() * 2;
        let entries = std::mem::replace(&mut self.entries, vec![Entry::default(); capacity]);
        self.shift = 64 - capacity.trailing_zeros();
        for entry in entries.into_iter().filter(|e| e.holders != 0) {
            let Err(at) = self.probe(entry.key) else { continue };
            self.entries[at] = entry;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_keeps_every_other_key_reachable() {
        // Keys sharing home slots 5 and 6 form one run of collisions; deleting from its middle must shift
        // later entries back without moving any before its home.
        let mut table = Table::with_capacity(1024);
        let shift = table.shift;
        let home = |k: u64| (k.wrapping_mul(SPREAD) >> shift) as usize;
        let keys: Vec<u64> = (1u64..).filter(|&k| matches!(home(k), 5 | 6)).take(12).collect();
        for &k in &keys {
            table.insert(k, None, 0);
        }
        for &k in keys.iter().step_by(3) {
            assert!(table.remove(k, 0).is_some());
        }
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(table.contains(k, 0), i % 3 != 0, "key {k}");
        }
    }

    #[test]
    fn agrees_with_a_set_under_random_churn() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut table = Table::default();
        let mut model = std::collections::HashSet::new();
        for _ in 0..20_000 {
            // A small key space keeps the table dense, with long runs that wrap around its end.
            let key = rng.random_range(0..300u64);
            if rng.random_bool(0.5) {
                table.insert(key, None, 1);
                model.insert(key);
            } else {
                assert_eq!(table.remove(key, 1).is_some(), model.remove(&key), "removing {key}");
            }
        }
        for key in 0..300 {
            assert_eq!(table.contains(key, 1), model.contains(&key), "key {key}");
        }
        assert_eq!(table.len, model.len());
    }

    #[test]
    fn children_spill_past_one_and_come_back() {
        let mut table = Table::default();
        table.insert(100, None, 0);
        for child in 1..=5 {
            table.insert(child, Some(100), 0);
            assert!(table.add_child(100, child));
        }
        table.remove_child(100, 1);
        table.remove_child(100, 4);
        let mut left: Vec<u64> = table.remove(100, 0).map(|u| u.children.to_vec()).unwrap_or_default();
        left.sort_unstable();
        assert_eq!(left, vec![2, 3, 5]);
        assert!(table.more_children.is_empty(), "a deleted block's spilled children are dropped too");
    }

    #[test]
    fn holders_past_the_mask_live_inline_alone_and_in_the_list_together() {
        let mut table = Table::default();
        let far = |table: &Table| table.overflow.get(&7).cloned().unwrap_or_default();
        assert_eq!(table.insert(7, None, 70), (true, true));
        assert_eq!(table.insert(7, None, 70), (false, false));
        assert!(far(&table).is_empty(), "one far holder needs no list");
        assert_eq!(table.insert(7, None, 3), (false, true));
        assert_eq!(table.insert(7, None, 900), (false, true));
        assert_eq!(far(&table), vec![70, 900]);
        assert!(table.contains(7, 70) && table.contains(7, 3) && table.contains(7, 900) && !table.contains(7, 71));
        assert_eq!(table.holders(7).map(|set| set.iter().collect::<Vec<_>>()), Some(vec![3, 70, 900]));
        assert!(table.remove(7, 3).is_some() && table.remove(7, 70).is_some());
        assert!(far(&table).is_empty(), "back to one far holder, stored inline");
        assert!(table.contains(7, 900) && table.remove(7, 70).is_none());
        assert!(table.remove(7, 900).is_some_and(|u| u.unlink_from.is_none()), "a root has no parent to unlink");
        assert!(table.holders(7).is_none());
    }
}
