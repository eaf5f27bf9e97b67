//! The mocker: a simulated vLLM-style engine with real KV bookkeeping and fitted step timing, for testing
//! routers and planners at scale without a GPU. Many run in one process (`dynamo run --workers 64`).
//!
//! It is the shared scheduler and block pool with an executor that computes nothing: each step's duration
//! comes from `timing` (slept, divided by `speedup`), and each token is a deterministic function of the seed
//! and every token before it, so a request re-issued with its generated tokens appended (migration)
//! continues exactly as it would have.
pub mod timing;

use super::SimulatedKv;
use super::batch::{BatchEngine, Pacing};
use super::scheduler::{Chunk, ExecError, Executed, Executor, Sampled, Scheduler, SchedulerConfig};
use crate::core::protocol::{PreprocessedRequest, TokenLogprob, WorkerId};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct MockerConfig {
    pub scheduler: SchedulerConfig,
    /// Simulated time runs this many times faster than real time.
    pub speedup: f64,
    /// KV bytes per token of the simulated model: what a hand-off between mockers would move.
    pub kv_bytes_per_token: u64,
    /// Bandwidth that KV moves at between mockers (prefill to decode).
    pub transfer_bytes_per_s: f64,
}

/// Llama-3-8B's KV in bf16: 32 layers × 8 KV heads × 128 dimensions × K and V × 2 bytes.
pub const DEFAULT_KV_BYTES_PER_TOKEN: u64 = 131_072;
/// A hand-off's bandwidth when none is given: about what one 200 Gb/s NIC moves.
pub const DEFAULT_TRANSFER_BYTES_PER_S: f64 = 25e9;

impl Default for MockerConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            speedup: 1.0,
            kv_bytes_per_token: DEFAULT_KV_BYTES_PER_TOKEN,
            transfer_bytes_per_s: DEFAULT_TRANSFER_BYTES_PER_S,
        }
    }
}

impl MockerConfig {
    /// What a hand-off of this mocker's KV costs.
    pub fn simulated_kv(&self) -> SimulatedKv {
        SimulatedKv {
            bytes_per_token: self.kv_bytes_per_token,
            transfer_bytes_per_s: self.transfer_bytes_per_s,
            speedup: self.speedup,
        }
    }
}

pub struct MockerEngine;

impl MockerEngine {
    /// Starts a mocker on the current tokio runtime. `vocab` lists the token ids it samples from.
    pub fn spawn(worker_id: WorkerId, config: MockerConfig, vocab: Arc<[u32]>) -> BatchEngine {
        let executor = MockExecutor::new(vocab, config.scheduler.num_blocks, config.scheduler.block_size)
            .with_kv(config.simulated_kv());
        let profile = crate::core::engine::profile::Profile::mocker(&config);
        let scheduler = Scheduler::new(config.scheduler, executor);
        BatchEngine::spawn(worker_id, scheduler, Pacing { blocking: false, speedup: config.speedup }, usize::MAX)
            .with_profile(profile)
    }
}

/// Simulates the model: step time from the fitted formula, tokens from a hash of everything before them.
pub struct MockExecutor {
    vocab: Arc<[u32]>,
    /// The simulated KV cache: decode time is relative to its capacity.
    num_blocks: usize,
    block_size: usize,
    kv: SimulatedKv,
}

impl MockExecutor {
    pub fn new(vocab: Arc<[u32]>, num_blocks: usize, block_size: usize) -> Self {
        let vocab = if vocab.is_empty() { (0..1000).collect() } else { vocab };
        Self { vocab, num_blocks, block_size, kv: MockerConfig::default().simulated_kv() }
    }

    /// What handing this mocker's KV over costs.
    pub fn with_kv(self, kv: SimulatedKv) -> Self {
        Self { kv, ..self }
    }
}

impl Executor for MockExecutor {
    /// A mix of the seed and every token so far; decides the next token.
    type Sampler = u64;

    fn device(&self) -> String {
        "mocker (simulated)".into()
    }

    fn sampler(&self, request: &PreprocessedRequest, seed: u64) -> u64 {
        request.token_ids.iter().fold(splitmix64(seed), |s, &t| mix(s, t))
    }

    fn execute(&mut self, chunks: &mut [Chunk<'_, u64>]) -> Result<Executed, ExecError> {
        let (mut prefill_tokens, mut decoding, mut active_kv_tokens) = (0, 0, 0);
        for chunk in chunks.iter() {
            if chunk.decoding {
                decoding += 1;
                active_kv_tokens += chunk.end;
            } else {
                prefill_tokens += chunk.end - chunk.start;
            }
        }
        let sampled = chunks
            .iter_mut()
            .map(|chunk| {
                chunk.samples().then(|| {
                    if chunk.pooling {
                        return Sampled { token: 0, logprob: None, hidden: Some(fake_embedding(*chunk.sampler)) };
                    }
                    let draw = splitmix64(*chunk.sampler ^ 0x5DEE_CE66_D1CE_4E5B);
                    let token = match chunk.guide.as_deref_mut() {
                        None => self.vocab[(draw % self.vocab.len() as u64) as usize],
                        Some(guide) => guided_token(guide, draw),
                    };
                    *chunk.sampler = mix(*chunk.sampler, token);
                    let logprob = chunk.logprobs.map(|top| fake_logprob(token, draw, top, &self.vocab));
                    Sampled { token, logprob, hidden: None }
                })
            })
            .collect();
        let capacity = self.num_blocks * self.block_size;
        let simulated_ms = timing::step_ms(prefill_tokens, decoding, active_kv_tokens, capacity);
        Ok(Executed { sampled, simulated_ms })
    }

    /// Pages without memory: a hand-off between mockers keeps the real bookkeeping (leases, arrivals) and
    /// takes the simulated time of moving them.
    fn kv_memory(&self) -> Option<crate::core::engine::KvMemory> {
        Some(crate::core::engine::KvMemory {
            regions: Vec::new(),
            pages: self.num_blocks as u64,
            page_bytes: 0,
            block_size: self.block_size as u32,
            simulated: Some(self.kv),
        })
    }
}

/// Values in a simulated embedding: a model's hidden size is not the mocker's to know, so a small fixed one.
pub const MOCK_EMBEDDING_DIM: usize = 64;

/// A deterministic vector of the prompt (`state` mixes its tokens): equal prompts embed equally, others not.
fn fake_embedding(state: u64) -> Vec<f32> {
    let mut x = state;
    (0..MOCK_EMBEDDING_DIM)
        .map(|_| {
            x = splitmix64(x);
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// A token the constraint allows, drawn as freely as an unconstrained one (the model's EOS among them where
/// the output may end). With none allowed, any: the guide then ends the sequence with its error.
fn guided_token(guide: &mut crate::core::grammar::Guide, draw: u64) -> u32 {
    let allowed = guide.allowed();
    match allowed.len() {
        0 => 0,
        n => allowed[(draw % n as u64) as usize],
    }
}

/// A plausible, deterministic distribution: the sampled token is the most likely, alternatives less so.
fn fake_logprob(token: u32, draw: u64, top: u32, vocab: &[u32]) -> TokenLogprob {
    let logprob = -((draw >> 40) as f32 / (1u64 << 24) as f32) * 0.5;
    let mut alternatives = vec![(token, logprob)];
    let mut state = draw;
    while alternatives.len() < top as usize && alternatives.len() < vocab.len() {
        state = splitmix64(state);
        let id = vocab[(state % vocab.len() as u64) as usize];
        if alternatives.iter().all(|(t, _)| *t != id) {
            alternatives.push((id, logprob - alternatives.len() as f32 * 0.75));
        }
    }
    alternatives.truncate(top as usize);
    TokenLogprob { token_id: token, logprob, top: alternatives }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix(state: u64, token: u32) -> u64 {
    splitmix64(state ^ u64::from(token).wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::Engine;
    use crate::core::protocol::FinishReason;
    use futures::StreamExt;
    use std::time::Duration;

    fn request(tokens: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
        PreprocessedRequest::greedy("r", tokens, max_tokens)
    }

    fn fast_engine() -> BatchEngine {
        MockerEngine::spawn(1, MockerConfig { speedup: 1000.0, ..Default::default() }, (10..500).collect())
    }

    #[tokio::test]
    async fn a_resent_state_rebuilds_the_index_its_events_built() {
        use crate::core::indexer::{Indexer, ReferenceIndexer};
        let scheduler = SchedulerConfig { num_blocks: 40, ..Default::default() };
        let engine = MockerEngine::spawn(
            1,
            MockerConfig { speedup: 1000.0, scheduler, ..Default::default() },
            (10..500).collect(),
        );
        let mut events = engine.subscribe_kv_events();
        let prompts: Vec<Vec<u32>> = (0..12u32).map(|p| (0..64).map(|t| t * 7 + p % 4 * 1000 + p).collect()).collect();
        for prompt in &prompts {
            let _: Vec<_> = engine.submit(request(prompt.clone(), 4)).unwrap().collect().await;
        }
        let from_events = ReferenceIndexer::new();
        while let Ok(batch) = events.try_recv() {
            from_events.apply_all(1, &batch.events);
        }
        assert!(from_events.block_counts()[0].1 > 0);
        assert!(engine.resend_kv_state());
        let resent = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
        assert_eq!(resent.events.first(), Some(&crate::core::protocol::KvEvent::Cleared));
        let from_resend = ReferenceIndexer::new();
        from_resend.apply_all(1, &resent.events);
        assert_eq!(from_resend.block_counts(), from_events.block_counts());
        for prompt in &prompts {
            let hashes: Vec<u64> = crate::core::tokens::block_hashes(prompt, 16).iter().map(|h| h.sequence).collect();
            assert_eq!(from_resend.find_matches(&hashes), from_events.find_matches(&hashes));
        }
    }

    #[tokio::test]
    async fn constrained_requests_follow_their_grammar_and_are_refused_where_none_is_known() {
        use crate::core::model::{Model, ModelSource};
        use crate::core::protocol::Constraint;
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let mut constrained = request((0..40).collect(), 50);
        constrained.constraint = Some(Constraint::Choice(vec!["alpha".into(), "beta gamma".into()]));
        let refused = fast_engine().submit(constrained.clone()).err().unwrap();
        assert!(refused.to_string().contains("structured output"), "{refused}");

        let engine = fast_engine().with_grammars(model.grammars().clone());
        let mut written = std::collections::HashSet::new();
        for seed in 0..8 {
            let mut constrained = constrained.clone();
            constrained.token_ids.push(seed);
            let outputs: Vec<_> = engine.submit(constrained).unwrap().collect().await;
            let tokens: Vec<u32> = outputs.iter().flat_map(|o| o.token_ids.clone()).collect();
            let last = outputs.last().and_then(|o| o.finish_reason.clone());
            assert!(matches!(last, Some(FinishReason::Complete | FinishReason::StopToken(_))), "{last:?}");
            let shown = match last {
                Some(FinishReason::StopToken(_)) => &tokens[..tokens.len() - 1],
                _ => &tokens[..],
            };
            written.insert(model.tokenizer.decode(shown, false));
        }
        assert!(written.iter().all(|w| w == "alpha" || w == "beta gamma"), "{written:?}");

        let mut broken = request((0..40).collect(), 5);
        broken.constraint = Some(Constraint::Regex("(".into()));
        let refused = engine.submit(broken).err().unwrap();
        assert!(matches!(refused, crate::core::engine::EngineError::InvalidRequest(_)), "{refused}");
    }

    #[tokio::test]
    async fn streams_max_tokens_then_finishes_with_length() {
        let engine = fast_engine();
        let outputs: Vec<_> = engine.submit(request((0..40).collect(), 5)).unwrap().collect().await;
        assert_eq!(outputs.len(), 5);
        assert_eq!(outputs[4].finish_reason, Some(FinishReason::Length));
        assert_eq!(outputs[0].cached_tokens, Some(0));
    }

    #[tokio::test]
    async fn dropping_the_stream_frees_the_request() {
        let engine = fast_engine();
        let mut stream = engine.submit(request((0..40).collect(), 100_000)).unwrap();
        stream.next().await.unwrap();
        assert_eq!(engine.load().requests_running, 1);
        drop(stream);
        for _ in 0..200 {
            if engine.load().requests_running == 0 {
                assert_eq!(engine.load().kv_active_blocks, 0);
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("request still running after its stream was dropped: {:?}", engine.load());
    }

    #[tokio::test]
    async fn oversized_requests_are_refused_up_front() {
        let engine = fast_engine();
        let err = engine.submit(request(vec![1; 10], u32::MAX / 2)).err().unwrap();
        assert!(err.to_string().contains("KV cache"), "{err}");
    }

    #[tokio::test]
    async fn publishes_stored_events() {
        let engine = fast_engine();
        let mut events = engine.subscribe_kv_events();
        let _: Vec<_> = engine.submit(request((0..40).collect(), 2)).unwrap().collect().await;
        let batch = events.recv().await.unwrap();
        assert_eq!(batch.worker_id, 1);
        assert!(matches!(batch.events[0], crate::core::protocol::KvEvent::Stored { parent_hash: None, .. }));
    }

    /// Wall-clock check that the simulated time really is slept: the ratio of the measured time to the
    /// formula's prediction, not an absolute duration.
    #[tokio::test]
    async fn wall_time_tracks_the_formula_divided_by_speedup() {
        let speedup = 4.0;
        let engine = MockerEngine::spawn(1, MockerConfig { speedup, ..Default::default() }, (10..500).collect());
        let (prompt, max_tokens) = (1000usize, 40usize);
        let predicted_ms = (timing::prefill_ms(prompt)
            + (1..max_tokens).map(|i| timing::decode_ms(prompt + i, 16_384 * 16)).sum::<f64>())
            / speedup;
        let start = std::time::Instant::now();
        let outputs: Vec<_> =
            engine.submit(request((0..prompt as u32).collect(), max_tokens as u32)).unwrap().collect().await;
        let measured_ms = start.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(outputs.len(), max_tokens);
        let ratio = measured_ms / predicted_ms;
        assert!((0.9..1.6).contains(&ratio), "measured {measured_ms:.1} ms vs predicted {predicted_ms:.1} ms");
    }
}
