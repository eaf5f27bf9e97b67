//! Other engines' KV events in our terms: blocks re-hashed from their token ids with our block hash, and a
//! per-worker map from the engine's hash to ours so that later removals resolve.
//!
//! Re-hashing means the index never depends on an engine's hash function, seed or extra keys. Events this
//! index cannot use are dropped and counted, never half-applied: a stored run whose parent the engine never
//! told us about, tokens that do not split into the stated blocks, a block size other than the router's, and
//! tiers other than the GPU's (one index is one tier).
//!
//! Blocks the engine keyed by more than their tokens (a LoRA adapter, media, a cache salt) fold that key into
//! their hash, as this project's own media blocks do, so a plain prompt never matches them. Of a hybrid
//! model's KV-cache groups only the first full-attention one is indexed: a sliding-window group evicts
//! blocks whose prefix the full-attention group still holds, and merging them would lose it.
use crate::core::protocol::external::{ExternalEvent, KvGroup};
use crate::core::protocol::{KvEvent, StoredBlock};
use crate::core::tokens::{chain_hash, local_block_hash, local_block_hash_with_media};
use std::collections::HashMap;

pub struct EventTranslator {
    block_size: usize,
    ours: HashMap<u64, u64>,
    /// The KV-cache group indexed, once a hybrid model's engine has named one.
    group: Option<u32>,
    /// Events dropped as unusable, for metrics and logs.
    pub dropped: u64,
    /// Events of the groups not indexed (sliding-window, state-space, a second full-attention group).
    pub other_groups: u64,
}

impl EventTranslator {
    pub fn new(block_size: usize) -> Self {
        Self { block_size: block_size.max(1), ours: HashMap::new(), group: None, dropped: 0, other_groups: 0 }
    }

    pub fn translate(&mut self, event: &ExternalEvent) -> Option<KvEvent> {
        let group = match event {
            ExternalEvent::Stored { group: Some(group), .. } => Some(self.indexes(group)),
            ExternalEvent::Removed { group: Some(index), .. } => Some(self.group.is_none_or(|ours| ours == *index)),
            _ => None,
        };
        if group == Some(false) {
            self.other_groups += 1;
            return None;
        }
        let translated = match event {
            ExternalEvent::Stored { medium, .. } | ExternalEvent::Removed { medium, .. } if !is_gpu(medium) => None,
            ExternalEvent::Stored { hashes, parent, token_ids, block_size, extra, .. } => {
                self.stored(hashes, *parent, token_ids, block_size.unwrap_or(self.block_size), extra)
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

    /// Whether `group`'s events are indexed: the first full-attention group seen (a group of no stated kind
    /// counts as one) and no other.
    fn indexes(&mut self, group: &KvGroup) -> bool {
        let full_attention = group.kind.as_deref().is_none_or(|kind| kind == "full_attention");
        match self.group {
            Some(ours) => ours == group.index,
            None if full_attention => {
                self.group = Some(group.index);
                true
            }
            None => false,
        }
    }

    fn stored(
        &mut self,
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u32],
        block_size: usize,
        extra: &[Option<u64>],
    ) -> Option<KvEvent> {
        let keyed = !extra.is_empty();
        if block_size != self.block_size
            || tokens.len() != hashes.len() * block_size
            || hashes.is_empty()
            || (keyed && extra.len() != hashes.len())
        {
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
            .enumerate()
            .map(|(i, (&engine_hash, block))| {
                let tokens_hash = match extra.get(i).copied().flatten() {
                    Some(key) => local_block_hash_with_media(block, &[key]),
                    None => local_block_hash(block),
                };
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
        let ExternalEvent::Stored { hashes, parent, token_ids, block_size, medium, .. } = &batches[0].events[0] else {
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
            extra: Vec::new(),
            group: None,
        };
        assert!(translator.translate(&stored(Some(99), None, 4)).is_none(), "unknown parent");
        assert!(translator.translate(&stored(None, Some("CPU"), 4)).is_none(), "another tier");
        assert!(translator.translate(&stored(None, None, 2)).is_none(), "another block size");
        assert_eq!(translator.dropped, 3);
        assert!(translator.translate(&stored(None, Some("GPU"), 4)).is_some());
    }

    /// One vLLM batch (positional, as before the map encoding) of the events given as msgpack values.
    fn batch(events: Vec<rmpv::Value>) -> ExternalBatch {
        let mut bytes = Vec::new();
        let value = rmpv::Value::Array(vec![1.0.into(), rmpv::Value::Array(events), rmpv::Value::Nil]);
        rmpv::encode::write_value(&mut bytes, &value).unwrap();
        decode_msgpack_batch(&bytes).unwrap()
    }

    /// `BlockStored` in vLLM's field order: hashes, parent, tokens, block size, lora_id, medium, lora_name,
    /// extra_keys, group_idx, kv_cache_spec_kind.
    fn stored_event(hashes: &[u64], tokens: std::ops::Range<u32>, tail: Vec<rmpv::Value>) -> rmpv::Value {
        use rmpv::Value as M;
        let mut fields = vec![
            M::from("BlockStored"),
            M::Array(hashes.iter().map(|&h| M::from(h)).collect()),
            M::Nil,
            M::Array(tokens.map(M::from).collect()),
            M::from(4),
        ];
        fields.extend(tail);
        M::Array(fields)
    }

    fn depth_after(batches: &[ExternalBatch]) -> usize {
        let ours: Vec<u64> = block_hashes(&(0..8).collect::<Vec<u32>>(), 4).iter().map(|b| b.sequence).collect();
        let index = FlashIndexer::new();
        let mut translator = EventTranslator::new(4);
        for event in batches.iter().flat_map(|b| &b.events) {
            if let Some(event) = translator.translate(event) {
                index.apply(1, &event);
            }
        }
        index.find_matches(&ours).of(1) as usize
    }

    #[test]
    fn adapter_and_extra_keyed_blocks_never_match_a_plain_prompt() {
        use rmpv::Value as M;
        let plain = batch(vec![stored_event(&[1, 2], 0..8, vec![])]);
        assert_eq!(depth_after(&[plain]), 2);
        // Under a LoRA adapter (by name, or by the deprecated id): the same tokens are other KV.
        let by_name = batch(vec![stored_event(&[1, 2], 0..8, vec![M::Nil, M::from("GPU"), M::from("sql-adapter")])]);
        assert_eq!(depth_after(&[by_name]), 0);
        let by_id = batch(vec![stored_event(&[1, 2], 0..8, vec![M::from(3)])]);
        assert_eq!(depth_after(&[by_id]), 0);
        // Extra keys on the second block only (an image starting there): the first still matches.
        let keys = M::Array(vec![M::Nil, M::Array(vec![M::from("mm-hash"), M::from(0)])]);
        let media = batch(vec![stored_event(&[1, 2], 0..8, vec![M::Nil, M::from("GPU"), M::Nil, keys])]);
        assert_eq!(depth_after(&[media]), 1);
    }

    /// A request under an adapter hashes its blocks as the engine's events under that adapter translate:
    /// its prompt finds them, the same tokens on the base model or under another adapter do not.
    #[test]
    fn a_request_under_an_adapter_names_the_blocks_its_engine_stored_under_it() {
        use crate::core::protocol::PreprocessedRequest;
        use crate::core::tokens::block_hashes_with_media;
        use rmpv::Value as M;
        let index = FlashIndexer::new();
        let mut translator = EventTranslator::new(4);
        let under = batch(vec![stored_event(&[1, 2], 0..8, vec![M::Nil, M::from("GPU"), M::from("sql-adapter")])]);
        for event in &under.events {
            index.apply(1, &translator.translate(event).expect("translated"));
        }
        let depth = |adapter: Option<&str>| {
            let request = PreprocessedRequest {
                adapter: adapter.map(String::from),
                ..PreprocessedRequest::greedy("r", (0..8).collect(), 1)
            };
            let hashes = block_hashes_with_media(&request.token_ids, 4, &request.media_spans());
            index.find_matches(&hashes.iter().map(|b| b.sequence).collect::<Vec<_>>()).of(1)
        };
        assert_eq!((depth(Some("sql-adapter")), depth(None), depth(Some("other"))), (2, 0, 0));
        // vLLM 0.32 names the adapter among each block's extra keys as well: the same blocks.
        let index_again = FlashIndexer::new();
        let repeated = M::Array(vec![M::Array(vec![M::from("sql-adapter")]); 2]);
        let tail = vec![M::from(1), M::from("GPU"), M::from("sql-adapter"), repeated];
        for event in &batch(vec![stored_event(&[1, 2], 0..8, tail)]).events {
            index_again.apply(1, &translator.translate(event).expect("translated"));
        }
        let request = PreprocessedRequest {
            adapter: Some("sql-adapter".into()),
            ..PreprocessedRequest::greedy("r", (0..8).collect(), 1)
        };
        let hashes = block_hashes_with_media(&request.token_ids, 4, &request.media_spans());
        assert_eq!(index_again.find_matches(&hashes.iter().map(|b| b.sequence).collect::<Vec<_>>()).of(1), 2);
    }

    #[test]
    fn only_the_first_full_attention_group_of_a_hybrid_model_is_indexed() {
        use rmpv::Value as M;
        let group =
            |index: u64, kind: &str| vec![M::Nil, M::from("GPU"), M::Nil, M::Nil, M::from(index), M::from(kind)];
        let removed = |hash: u64, index: u64| {
            M::Array(vec![M::from("BlockRemoved"), M::Array(vec![M::from(hash)]), M::from("GPU"), M::from(index)])
        };
        let batches = [
            batch(vec![stored_event(&[10, 11], 0..8, group(0, "sliding_window"))]),
            batch(vec![stored_event(&[20, 21], 0..8, group(1, "full_attention"))]),
            // The sliding window evicts its copy of the first block; the full-attention group keeps its own.
            batch(vec![removed(10, 0)]),
        ];
        assert_eq!(depth_after(&batches), 2);
        let evicted = [&batches[..], &[batch(vec![removed(21, 1)])]].concat();
        assert_eq!(depth_after(&evicted), 1);
        let mut translator = EventTranslator::new(4);
        batches.iter().flat_map(|b| &b.events).for_each(|e| drop(translator.translate(e)));
        assert_eq!((translator.other_groups, translator.dropped), (2, 0));
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
