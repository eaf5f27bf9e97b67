//! The paged KV cache's block pool: which physical pages exist, who references them, which hold a known
//! prefix, which to evict. Shared by every engine that owns its KV cache (native and mocker), so the
//! bookkeeping a router sees is the same whether the pages hold real tensors or nothing.
//!
//! A page is private to one sequence until its block of tokens is fully computed; then it is *committed*
//! under the block's chained hash, and other sequences with the same prefix may share it. A committed page
//! nobody references stays cached until space is needed; then the least recently released one is evicted.
//! Only committed pages are ever matched, so nobody reads KV that is not written yet. Every change a router
//! should know about becomes a `KvEvent`, merged so that a run of stored blocks is one event.
use crate::core::protocol::{KvEvent, StoredBlock};
use crate::core::tokens::BlockHash;
use lru::LruCache;
use std::collections::HashMap;

/// Index of a physical KV page (one block of tokens, all layers).
pub type PageId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvFull;

#[derive(Debug, Clone, Copy, Default)]
struct Page {
    refs: u32,
    /// Set once the page is committed.
    hash: Option<u64>,
}

pub struct BlockPool {
    pages: Vec<Page>,
    free: Vec<PageId>,
    committed: HashMap<u64, PageId>,
    /// Committed pages nobody references, least recently released first.
    cached: LruCache<PageId, ()>,
    events: Vec<KvEvent>,
}

impl BlockPool {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(PageId::MAX as usize);
        Self {
            pages: vec![Page::default(); capacity],
            // Reversed so page 0 is handed out first: easier to read in tests and dumps.
            free: (0..capacity as PageId).rev().collect(),
            committed: HashMap::new(),
            cached: LruCache::unbounded(),
            events: Vec::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.pages.len()
    }

    /// Pages some sequence references.
    pub fn active_blocks(&self) -> usize {
        self.capacity() - self.available()
    }

    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Pages an allocation can get, counting those eviction would free.
    pub fn available(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    /// How many leading hashes are committed (shared or cached).
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.committed.contains_key(&h.sequence)).count()
    }

    /// How many of these hashes sit in the cache unreferenced (taking them shrinks what eviction can free).
    pub fn count_unreferenced(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .filter(|h| self.committed.get(&h.sequence).is_some_and(|&p| self.pages[p as usize].refs == 0))
            .count()
    }

    /// References the committed page holding `hash`, if any.
    pub fn acquire(&mut self, hash: u64) -> Option<PageId> {
        let page = *self.committed.get(&hash)?;
        if self.pages[page as usize].refs == 0 {
            self.cached.pop(&page);
        }
        self.pages[page as usize].refs += 1;
        Some(page)
    }

    /// A private page for new tokens, evicting the least recently released cached page if none is free.
    pub fn allocate(&mut self) -> Result<PageId, KvFull> {
        let page = match self.free.pop() {
            Some(page) => page,
            None => self.evict()?,
        };
        self.pages[page as usize] = Page { refs: 1, hash: None };
        Ok(page)
    }

    /// Publishes a private, fully computed page under its block hash and returns the page the sequence should
    /// use from now on: the same one, or an already committed page with identical content (then the private one
    /// is freed).
    pub fn commit(&mut self, page: PageId, parent: Option<u64>, block: BlockHash) -> PageId {
        debug_assert!(self.pages[page as usize].hash.is_none(), "page {page} committed twice");
        if let Some(existing) = self.acquire(block.sequence) {
            self.release(page);
            return existing;
        }
        self.pages[page as usize].hash = Some(block.sequence);
        self.committed.insert(block.sequence, page);
        self.record_stored(parent, StoredBlock { hash: block.sequence, tokens_hash: block.local });
        page
    }

    pub fn release(&mut self, page: PageId) {
        let entry = &mut self.pages[page as usize];
        debug_assert!(entry.refs > 0, "released page {page} that nobody holds");
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs > 0 {
            return;
        }
        if entry.hash.is_some() {
            self.cached.put(page, ());
        } else {
            self.free.push(page);
        }
    }

    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    fn evict(&mut self) -> Result<PageId, KvFull> {
        let (page, ()) = self.cached.pop_lru().ok_or(KvFull)?;
        if let Some(hash) = self.pages[page as usize].hash.take() {
            self.committed.remove(&hash);
            match self.events.last_mut() {
                Some(KvEvent::Removed { hashes }) => hashes.push(hash),
                _ => self.events.push(KvEvent::Removed { hashes: vec![hash] }),
            }
        }
        Ok(page)
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

    /// Computes and commits a chain of blocks the way a sequence does; returns its pages.
    fn store(pool: &mut BlockPool, blocks: &[BlockHash]) -> Vec<PageId> {
        let mut parent = None;
        let mut pages = Vec::new();
        for b in blocks {
            let page = match pool.acquire(b.sequence) {
                Some(page) => page,
                None => {
                    let page = pool.allocate().unwrap();
                    pool.commit(page, parent, *b)
                }
            };
            pages.push(page);
            parent = Some(b.sequence);
        }
        pages
    }

    fn release_all(pool: &mut BlockPool, pages: &[PageId]) {
        for &p in pages.iter().rev() {
            pool.release(p);
        }
    }

    #[test]
    fn a_run_of_new_blocks_is_one_stored_event() {
        let mut pool = BlockPool::new(8);
        let blocks = chain(1, 3);
        store(&mut pool, &blocks);
        let events = pool.drain_events();
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
        let mut pool = BlockPool::new(8);
        let blocks = chain(1, 2);
        let first = store(&mut pool, &blocks);
        pool.drain_events();
        let second = store(&mut pool, &blocks);
        assert_eq!(first, second);
        assert!(pool.drain_events().is_empty());
        assert_eq!(pool.active_blocks(), 2);
        release_all(&mut pool, &first);
        assert_eq!(pool.active_blocks(), 2, "still referenced once");
        release_all(&mut pool, &second);
        assert_eq!((pool.active_blocks(), pool.cached_blocks()), (0, 2));
        assert_eq!(pool.cached_prefix(&blocks), 2);
    }

    #[test]
    fn committing_a_duplicate_switches_to_the_existing_page_and_frees_the_copy() {
        let mut pool = BlockPool::new(4);
        let block = chain(1, 1)[0];
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        let a = pool.commit(a, None, block);
        assert_eq!(pool.commit(b, None, block), a);
        assert_eq!(pool.active_blocks(), 1);
        assert_eq!(pool.drain_events().len(), 1, "stored once");
    }

    #[test]
    fn private_pages_are_never_matched() {
        let mut pool = BlockPool::new(4);
        let blocks = chain(1, 1);
        let page = pool.allocate().unwrap();
        assert_eq!(pool.cached_prefix(&blocks), 0);
        pool.release(page);
        assert_eq!((pool.available(), pool.cached_blocks()), (4, 0));
    }

    #[test]
    fn eviction_takes_the_least_recently_released_block_and_emits_removed() {
        let mut pool = BlockPool::new(2);
        let (a, b) = (chain(1, 1), chain(2, 1));
        let pa = store(&mut pool, &a);
        let pb = store(&mut pool, &b);
        release_all(&mut pool, &pa);
        release_all(&mut pool, &pb);
        pool.drain_events();
        store(&mut pool, &chain(3, 1));
        let events = pool.drain_events();
        assert_eq!(events[0], KvEvent::Removed { hashes: vec![a[0].sequence] });
        assert!(matches!(events[1], KvEvent::Stored { .. }));
        assert_eq!(pool.cached_prefix(&a), 0);
        assert_eq!(pool.cached_prefix(&b), 1);
    }

    #[test]
    fn full_of_referenced_blocks_refuses() {
        let mut pool = BlockPool::new(1);
        store(&mut pool, &chain(1, 1));
        assert_eq!(pool.allocate(), Err(KvFull));
        assert_eq!(pool.available(), 0);
    }
}
