//! Other engines' KV events in our terms: blocks re-hashed from their token ids with our block hash, and a
//! per-worker map from the engine's hash to ours so that later removals resolve.
//!
//! Re-hashing means the index never depends on an engine's hash function, seed or extra keys. Events this
//! index cannot use are dropped and counted, never half-applied: a stored run whose parent the engine never
//! told us about, tokens that do not split into the stated blocks, a block size other than the router's, and
//! tiers other than the GPU's (one index is one tier).
use crate::core::protocol::external::ExternalEvent;
use crate::core::protocol::{KvEvent, StoredBlock};
use crate::core::tokens::{chain_hash, local_block_hash};
use std::collections::HashMap;

pub struct EventTranslator {
    block_size: usize,
    ours: HashMap<u64, u64>,
    /// Events dropped as unusable, for metrics and logs.
    pub dropped: u64,
}

impl EventTranslator {
    pub fn new(block_size: usize) -> Self {
        Self { block_size: block_size.max(1), ours: HashMap::new(), dropped: 0 }
    }

    pub fn translate(&mut self, event: &ExternalEvent) -> Option<KvEvent> {
        let translated = match event {
            ExternalEvent::Stored { medium, .. } | ExternalEvent::Removed { medium, .. } if !is_gpu(medium) => None,
            ExternalEvent::Stored { hashes, parent, token_ids, block_size, .. } => {
                self.stored(hashes, *parent, token_ids, block_size.unwrap_or(self.block_size))
            }
            ExternalEvent::Removed { hashes, .. } => {
                let hashes: Vec<u64> = hashes.iter().filter_map(|h| self.ours.remove(h)).collect();
                (!hashes.is_empty()).then_some(KvEvent::Removed { hashes })
            }
            ExternalEvent::Cleared => {
                self.ours.clear();
                Some(KvEvent::Cleared)
            }
        };
        if translated.is_none() && !matches!(event, ExternalEvent::Removed { .. }) {
            self.dropped += 1;
        }
        translated
    }

    fn stored(&mut self, hashes: &[u64], parent: Option<u64>, tokens: &[u32], block_size: usize) -> Option<KvEvent> {
        if block_size != self.block_size || tokens.len() != hashes.len() * block_size || hashes.is_empty() {
            return None;
        }
        let parent_hash = match parent {
            Some(engine_parent) => Some(*self.ours.get(&engine_parent)?),
            None => None,
        };
        let mut previous = parent_hash;
        let blocks = hashes
            .iter()
            .zip(tokens.chunks_exact(block_size))
            .map(|(&engine_hash, block)| {
                let tokens_hash = local_block_hash(block);
                let hash = chain_hash(previous, tokens_hash);
                self.ours.insert(engine_hash, hash);
                previous = Some(hash);
                StoredBlock { hash, tokens_hash }
            })
            .collect();
        Some(KvEvent::Stored { parent_hash, blocks })
    }
}

fn is_gpu(medium: &Option<String>) -> bool {
    medium.as_deref().is_none_or(|m| m.eq_ignore_ascii_case("GPU"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::indexer::{FlashIndexer, Indexer};
    use crate::core::protocol::external::{ExternalBatch, decode_msgpack_batch, decode_trtllm_json};
    use crate::core::tokens::block_hashes;

    fn golden(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/kv_events").join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The files hold one msgpack batch after another.
    fn msgpack_batches(name: &str) -> Vec<ExternalBatch> {
        let bytes = golden(name);
        let mut rest = bytes.as_slice();
        let mut batches = Vec::new();
        while !rest.is_empty() {
            let before = rest.len();
            let value = rmpv::decode::read_value(&mut rest).unwrap();
            let mut encoded = Vec::new();
            rmpv::encode::write_value(&mut encoded, &value).unwrap();
            assert!(rest.len() < before);
            batches.push(decode_msgpack_batch(&encoded).unwrap());
        }
        batches
    }

    /// Replays the golden scenario and checks the index after each batch against our own hashes.
    fn replay(batches: &[ExternalBatch]) {
        let ours: Vec<u64> = block_hashes(&(1..=12).collect::<Vec<u32>>(), 4).iter().map(|b| b.sequence).collect();
        let index = FlashIndexer::new();
        let mut translator = EventTranslator::new(4);
        let expected_depths = [2, 3, 0];
        assert_eq!(batches.len(), 3);
        for (batch, expected) in batches.iter().zip(expected_depths) {
            for event in &batch.events {
                if let Some(event) = translator.translate(event) {
                    index.apply(1, &event);
                }
            }
            assert_eq!(index.find_matches(&ours).of(1), expected, "after batch at ts {}", batch.ts);
        }
        assert_eq!(translator.dropped, 0);
    }

    #[test]
    fn vllm_array_encoding() {
        let batches = msgpack_batches("vllm_array.msgpack");
        assert_eq!(batches[0].dp_rank, Some(0));
        let ExternalEvent::Stored { hashes, parent, token_ids, block_size, medium } = &batches[0].events[0] else {
            panic!("{:?}", batches[0])
        };
        assert_eq!((hashes.as_slice(), *parent, token_ids.len(), *block_size), (&[111, 222][..], None, 8, Some(4)));
        assert_eq!(medium.as_deref(), Some("GPU"));
        replay(&batches);
    }

    #[test]
    fn vllm_map_encoding_with_digest_hashes() {
        let batches = msgpack_batches("vllm_map.msgpack");
        assert_eq!(batches[0].dp_rank, None);
        let ExternalEvent::Stored { hashes, .. } = &batches[0].events[0] else { panic!("{:?}", batches[0]) };
        assert_eq!(hashes[0], xxhash_rust::xxh3::xxh3_64(&[1u8; 32]));
        replay(&batches);
    }

    #[test]
    fn sglang_signed_hashes_and_attn_dp_rank() {
        let batches = msgpack_batches("sglang.msgpack");
        assert_eq!(batches[0].dp_rank, Some(1));
        let ExternalEvent::Stored { hashes, .. } = &batches[0].events[0] else { panic!("{:?}", batches[0]) };
        assert_eq!(hashes[0], -5i64 as u64);
        replay(&batches);
    }

    #[test]
    fn trtllm_json() {
        let batch = decode_trtllm_json(&golden("trtllm.json")).unwrap();
        assert_eq!((batch.events.len(), batch.skipped), (3, 1));
        // TensorRT-LLM reports no clear in this scenario; split its events like the others' batches.
        let batches = [
            ExternalBatch { events: batch.events[..1].to_vec(), ..batch.clone() },
            ExternalBatch { events: batch.events[1..2].to_vec(), ..batch.clone() },
            ExternalBatch { events: [batch.events[2..].to_vec(), vec![ExternalEvent::Cleared]].concat(), ..batch },
        ];
        replay(&batches);
    }

    #[test]
    fn unusable_events_are_dropped_and_counted() {
        let mut translator = EventTranslator::new(4);
        let stored = |parent, medium: Option<&str>, block_size| ExternalEvent::Stored {
            hashes: vec![1],
            parent,
            token_ids: vec![1, 2, 3, 4],
            block_size: Some(block_size),
            medium: medium.map(str::to_string),
        };
        assert!(translator.translate(&stored(Some(99), None, 4)).is_none(), "unknown parent");
        assert!(translator.translate(&stored(None, Some("CPU"), 4)).is_none(), "another tier");
        assert!(translator.translate(&stored(None, None, 2)).is_none(), "another block size");
        assert_eq!(translator.dropped, 3);
        assert!(translator.translate(&stored(None, Some("GPU"), 4)).is_some());
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let seeds = [golden("vllm_array.msgpack"), golden("vllm_map.msgpack"), golden("sglang.msgpack")];
        for i in 0..20_000 {
            let mut bytes = seeds[i % seeds.len()].clone();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            bytes.truncate(rng.random_range(0..=bytes.len()));
            if let Ok(batch) = decode_msgpack_batch(&bytes) {
                let mut translator = EventTranslator::new(4);
                batch.events.iter().for_each(|e| drop(translator.translate(e)));
            }
            let _ = decode_trtllm_json(&bytes);
        }
    }
}
