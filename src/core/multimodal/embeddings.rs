//! Image embeddings by content hash, kept by a worker whose model takes images: its engine fills and reads
//! the cache while prefilling (a repeated image, or one whose prompt is prefilled over several steps, is
//! encoded once), and its transfer side puts in the embeddings an encode worker computed, so the engine
//! finds them there instead of encoding.
use crate::core::protocol::ImageStats;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Memory the cache may hold (LLaVA-1.5-7B: 9 MiB an image, so 28 images).
pub const EMBEDDINGS_CACHE_BYTES: usize = 256 << 20;

pub struct EmbeddingCache {
    images: Mutex<lru::LruCache<u64, Arc<Vec<f32>>>>,
    /// Values of one image's embeddings (`tokens_per_image × hidden_size`).
    image_len: usize,
    encoded: AtomicU64,
    read: AtomicU64,
    read_failed: AtomicU64,
}

impl EmbeddingCache {
    /// A cache of images of `image_len` values each, as many as `budget` bytes hold (at least one, at most
    /// 4096: the map is allocated whole up front).
    pub fn new(image_len: usize, budget: usize) -> Self {
        let images = (budget / (image_len * 4).max(1)).clamp(1, 4096);
        let images = lru::LruCache::new(NonZeroUsize::new(images).unwrap_or(NonZeroUsize::MIN));
        Self {
            images: Mutex::new(images),
            image_len,
            encoded: AtomicU64::new(0),
            read: AtomicU64::new(0),
            read_failed: AtomicU64::new(0),
        }
    }

    pub fn image_len(&self) -> usize {
        self.image_len
    }

    /// The image's embeddings, marking them recently used.
    pub fn get(&self, hash: u64) -> Option<Arc<Vec<f32>>> {
        self.lock().get(&hash).cloned()
    }

    /// Whether the image is in the cache now (it may be evicted right after).
    pub fn contains(&self, hash: u64) -> bool {
        self.lock().contains(&hash)
    }

    /// Keeps an image's embeddings; values of another length are refused, with why.
    pub fn put(&self, hash: u64, values: Arc<Vec<f32>>) -> Result<(), String> {
        if values.len() != self.image_len {
            return Err(format!(
                "embeddings of {} values for a model whose images have {} each",
                values.len(),
                self.image_len
            ));
        }
        self.lock().put(hash, values);
        Ok(())
    }

    /// Counts images the engine encoded itself.
    pub fn count_encoded(&self, images: usize) {
        self.encoded.fetch_add(images as u64, Ordering::Relaxed);
    }

    /// Counts an encode worker's embeddings read in (`true`) or given up on (`false`).
    pub fn count_read(&self, read: bool) {
        let counter = if read { &self.read } else { &self.read_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ImageStats {
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ImageStats { encoded: count(&self.encoded), read: count(&self.read), read_failed: count(&self.read_failed) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, lru::LruCache<u64, Arc<Vec<f32>>>> {
        self.images.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_its_budget_allows_and_refuses_other_shapes() {
        let cache = EmbeddingCache::new(4, 2 * 16);
        cache.put(1, Arc::new(vec![1.0; 4])).unwrap();
        cache.put(2, Arc::new(vec![2.0; 4])).unwrap();
        assert!(cache.get(1).is_some(), "1 is now the most recent");
        cache.put(3, Arc::new(vec![3.0; 4])).unwrap();
        assert!(!cache.contains(2), "the least recent went");
        assert!(cache.contains(1) && cache.contains(3));
        let refused = cache.put(4, Arc::new(vec![0.0; 5])).unwrap_err();
        assert!(refused.contains("5 values") && refused.contains("4 each"), "{refused}");
        assert_eq!(EmbeddingCache::new(1 << 30, 16).image_len(), 1 << 30, "at least one image, whatever it costs");
    }
}
