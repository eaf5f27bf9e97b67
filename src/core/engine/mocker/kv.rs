//! The mocker's paged KV cache bookkeeping: which blocks exist, who references them, which to evict.
//!
//! Full blocks are keyed by their sequence hash, so two requests with a common prefix share them. A block
//! nobody references stays cached (reusable) until space is needed; then the least recently released one is
//! evicted. A sequence's last, partly filled block has no hash yet and is never shared. Every change that a
//! router should know about becomes a `KvEvent`, merged so that a run of stored blocks is one event.
use crate::core::protocol::{KvEvent, StoredBlock};
use crate::core::tokens::BlockHash;
use lru::LruCache;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvFull;

pub struct KvManager {
    capacity: usize,
    /// Full blocks referenced by at least one sequence, with their reference count.
    active: HashMap<u64, usize>,
    /// Full blocks nobody references, least recently released first.
    cached: LruCache<u64, ()>,
    partial: usize,
    events: Vec<KvEvent>,
}

impl KvManager {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, active: HashMap::new(), cached: LruCache::unbounded(), partial: 0, events: Vec::new() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn active_blocks(&self) -> usize {
        self.active.len() + self.partial
    }

    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Blocks a new allocation can get, counting those eviction would free.
    pub fn available(&self) -> usize {
        self.capacity - self.active_blocks()
    }

    /// How many leading hashes are held (active or cached).
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.active.contains_key(&h.sequence) || self.cached.contains(&h.sequence)).count()
    }

    /// How many of these hashes sit in the cache unreferenced (taking them shrinks what eviction can free).
    pub fn count_unreferenced(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().filter(|h| self.cached.contains(&h.sequence)).count()
    }

    /// References a full block, reusing the cached one or storing a new one (evicting if needed).
    pub fn acquire_full(&mut self, parent: Option<u64>, block: BlockHash) -> Result<(), KvFull> {
        if let Some(refs) = self.active.get_mut(&block.sequence) {
            *refs += 1;
            return Ok(());
        }
        if self.cached.pop(&block.sequence).is_some() {
            self.active.insert(block.sequence, 1);
            return Ok(());
        }
        self.make_room()?;
        self.active.insert(block.sequence, 1);
        self.record_stored(parent, StoredBlock { hash: block.sequence, tokens_hash: block.local });
        Ok(())
    }

    pub fn release_full(&mut self, hash: u64) {
        match self.active.get_mut(&hash) {
            Some(refs) if *refs > 1 => *refs -= 1,
            Some(_) => {
                self.active.remove(&hash);
                self.cached.put(hash, ());
            }
            None => debug_assert!(false, "released block {hash:x} that is not active"),
        }
    }

    pub fn acquire_partial(&mut self) -> Result<(), KvFull> {
        self.make_room()?;
        self.partial += 1;
        Ok(())
    }

    pub fn release_partial(&mut self) {
        debug_assert!(self.partial > 0);
        self.partial = self.partial.saturating_sub(1);
    }

    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    fn make_room(&mut self) -> Result<(), KvFull> {
        if self.active_blocks() + self.cached.len() < self.capacity {
            return Ok(());
        }
        let (evicted, ()) = self.cached.pop_lru().ok_or(KvFull)?;
        match self.events.last_mut() {
            Some(KvEvent::Removed { hashes }) => hashes.push(evicted),
            _ => self.events.push(KvEvent::Removed { hashes: vec![evicted] }),
        }
        Ok(())
    }

    fn record_stored(&mut self, parent: Option<u64>, block: StoredBlock) {
        if let Some(KvEvent::Stored { blocks, .. }) = self.events.last_mut()
            && parent.is_some()
            && blocks.last().map(|b| b.hash) == parent
        {
            blocks.push(block);
            return;
        }
        self.events.push(KvEvent::Stored { parent_hash: parent, blocks: vec![block] });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tokens::block_hashes;

    fn chain(seed: u32, n: usize) -> Vec<BlockHash> {
        let tokens: Vec<u32> = (0..(n * 4) as u32).map(|t| t + seed * 1000).collect();
        block_hashes(&tokens, 4)
    }

    fn store(kv: &mut KvManager, blocks: &[BlockHash]) {
        let mut parent = None;
        for b in blocks {
            kv.acquire_full(parent, *b).unwrap();
            parent = Some(b.sequence);
        }
    }

    #[test]
    fn a_run_of_new_blocks_is_one_stored_event() {
        let mut kv = KvManager::new(8);
        let blocks = chain(1, 3);
        store(&mut kv, &blocks);
        let events = kv.drain_events();
        assert_eq!(events.len(), 1);
        let KvEvent::Stored { parent_hash, blocks: stored } = &events[0] else { panic!("{events:?}") };
        assert_eq!(*parent_hash, None);
        assert_eq!(
            stored.iter().map(|b| b.hash).collect::<Vec<_>>(),
            blocks.iter().map(|b| b.sequence).collect::<Vec<_>>()
        );
    }

    #[test]
    fn shared_blocks_are_reference_counted_and_reused_without_events() {
        let mut kv = KvManager::new(8);
        let blocks = chain(1, 2);
        store(&mut kv, &blocks);
        kv.drain_events();
        store(&mut kv, &blocks);
        assert!(kv.drain_events().is_empty());
        assert_eq!(kv.active_blocks(), 2);
        for b in &blocks {
            kv.release_full(b.sequence);
        }
        assert_eq!(kv.active_blocks(), 2, "still referenced once");
        for b in &blocks {
            kv.release_full(b.sequence);
        }
        assert_eq!((kv.active_blocks(), kv.cached_blocks()), (0, 2));
        assert_eq!(kv.cached_prefix(&blocks), 2);
    }

    #[test]
    fn eviction_takes_the_least_recently_released_block_and_emits_removed() {
        let mut kv = KvManager::new(2);
        let (a, b) = (chain(1, 1), chain(2, 1));
        store(&mut kv, &a);
        store(&mut kv, &b);
        kv.release_full(a[0].sequence);
        kv.release_full(b[0].sequence);
        kv.drain_events();
        let c = chain(3, 1);
        store(&mut kv, &c);
        let events = kv.drain_events();
        assert_eq!(events[0], KvEvent::Removed { hashes: vec![a[0].sequence] });
        assert!(matches!(events[1], KvEvent::Stored { .. }));
        assert_eq!(kv.cached_prefix(&a), 0);
        assert_eq!(kv.cached_prefix(&b), 1);
    }

    #[test]
    fn full_of_referenced_blocks_refuses() {
        let mut kv = KvManager::new(1);
        store(&mut kv, &chain(1, 1));
        assert_eq!(kv.acquire_partial(), Err(KvFull));
        assert_eq!(kv.available(), 0);
    }
}
