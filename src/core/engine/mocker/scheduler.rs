//! The mocker's vLLM-style scheduler, synchronous and free of I/O so tests can step it by hand.
//!
//! One `step()`:
//! 1. Running sequences, oldest first, each get their next chunk of uncomputed tokens (1 when decoding, up to
//!    the step's token budget when prefilling: chunked prefill). When blocks run out, the newest running
//!    sequence is preempted: its blocks are released and it goes back to the front of the queue to be
//!    recomputed.
//! 2. Waiting sequences are admitted in order while the budget, `max_num_seqs` and free blocks (keeping a
//!    watermark) allow. Admission first reuses the longest cached prefix, which becomes `cached_tokens`.
//! 3. The step's simulated duration comes from `timing`; every sequence whose tokens are all computed samples
//!    one token. A sequence that reaches a stop token (after `min_tokens`) or `max_tokens` finishes and
//!    releases its blocks.
//!
//! Output tokens are a deterministic function of the seed and every token before them, so a request that is
//! re-issued with its generated tokens appended (migration) continues exactly as it would have.
use super::kv::{KvFull, KvManager};
use super::timing;
use crate::core::protocol::{EngineOutput, FinishReason, LoadMetrics, PreprocessedRequest, TokenLogprob};
use crate::core::tokens::{BlockHash, block_hashes, chain_hash, local_block_hash};
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Fraction of blocks kept free when admitting new sequences, so running ones can grow.
    pub watermark: f64,
    pub enable_prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 16384,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            watermark: 0.01,
            enable_prefix_caching: true,
        }
    }
}

pub type SeqId = u64;

struct Sequence {
    id: SeqId,
    tokens: Vec<u32>,
    computed: usize,
    blocks: Vec<BlockHash>,
    has_partial: bool,
    generated: u32,
    max_tokens: u32,
    min_tokens: u32,
    stop_token_ids: Vec<u32>,
    logprobs: Option<u32>,
    /// Mix of the seed and every token so far; decides the next token.
    state: u64,
    cached_tokens: Option<u32>,
    reported_cached: bool,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct StepOutcome {
    /// Simulated time of the step, before dividing by the speedup.
    pub duration_ms: f64,
    pub prefill_tokens: usize,
    pub decoding: usize,
    pub outputs: Vec<(SeqId, EngineOutput)>,
}

pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Token ids the simulated model samples from.
    vocab: Arc<[u32]>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, vocab: Arc<[u32]>) -> Self {
        let vocab = if vocab.is_empty() { (0..1000).collect() } else { vocab };
        Self { kv: KvManager::new(config.num_blocks), config, waiting: VecDeque::new(), running: Vec::new(), vocab }
    }

    /// The most tokens (prompt + generated) one request may need.
    pub fn max_sequence_tokens(&self) -> usize {
        self.config.num_blocks * self.config.block_size
    }

    pub fn add(&mut self, id: SeqId, request: &PreprocessedRequest, seed: u64) {
        let state = request.token_ids.iter().fold(splitmix64(seed), |s, &t| mix(s, t));
        self.waiting.push_back(Sequence {
            id,
            tokens: request.token_ids.clone(),
            computed: 0,
            blocks: Vec::new(),
            has_partial: false,
            generated: 0,
            max_tokens: request.stop.max_tokens,
            min_tokens: request.stop.min_tokens,
            stop_token_ids: request.stop.stop_token_ids.clone(),
            logprobs: request.logprobs,
            state,
            cached_tokens: None,
            reported_cached: false,
        });
    }

    /// Drops a request wherever it is and frees its blocks; false if it was not here.
    pub fn abort(&mut self, id: SeqId) -> bool {
        if let Some(at) = self.running.iter().position(|s| s.id == id) {
            let mut seq = self.running.remove(at);
            self.release(&mut seq);
            return true;
        }
        if let Some(at) = self.waiting.iter().position(|s| s.id == id) {
            if let Some(mut seq) = self.waiting.remove(at) {
                self.release(&mut seq);
            }
            return true;
        }
        false
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn load(&self) -> LoadMetrics {
        LoadMetrics {
            requests_running: self.running.len() as u32,
            requests_waiting: self.waiting.len() as u32,
            kv_active_blocks: self.kv.active_blocks() as u64,
            kv_cached_blocks: self.kv.cached_blocks() as u64,
            kv_total_blocks: self.kv.capacity() as u64,
        }
    }

    pub fn drain_events(&mut self) -> Vec<crate::core::protocol::KvEvent> {
        self.kv.drain_events()
    }

    pub fn step(&mut self) -> StepOutcome {
        let mut budget = self.config.max_num_batched_tokens;
        let mut chunks: Vec<usize> = Vec::new();
        self.schedule_running(&mut budget, &mut chunks);
        self.admit_waiting(&mut budget, &mut chunks);

        let mut outcome = StepOutcome::default();
        let mut active_kv_tokens = 0;
        for (seq, &chunk) in self.running.iter().zip(&chunks) {
            if chunk == 1 && seq.generated > 0 && seq.computed + 1 == seq.tokens.len() {
                outcome.decoding += 1;
                active_kv_tokens += seq.computed + 1;
            } else {
                outcome.prefill_tokens += chunk;
            }
        }
        outcome.duration_ms = timing::step_ms(outcome.prefill_tokens, outcome.decoding, active_kv_tokens);

        let mut finished = Vec::new();
        for (at, &chunk) in chunks.iter().enumerate() {
            let seq = &mut self.running[at];
            seq.computed += chunk;
            if seq.computed < seq.tokens.len() {
                continue;
            }
            let output = sample(seq, &self.vocab);
            if output.finish_reason.is_some() {
                finished.push(at);
            }
            outcome.outputs.push((seq.id, output));
        }
        for at in finished.into_iter().rev() {
            let mut seq = self.running.remove(at);
            self.release(&mut seq);
        }
        outcome
    }

    fn schedule_running(&mut self, budget: &mut usize, chunks: &mut Vec<usize>) {
        let mut at = 0;
        while at < self.running.len() && *budget > 0 {
            let need = self.running[at].tokens.len() - self.running[at].computed;
            let chunk = need.min(*budget);
            match reserve(&mut self.kv, &mut self.running[at], chunk, self.config.block_size) {
                Ok(()) => {
                    chunks.push(chunk);
                    *budget -= chunk;
                    at += 1;
                }
                Err(KvFull) => {
                    // Preempt the newest sequence; if that is this one, it simply waits.
                    if let Some(mut victim) = self.running.pop() {
                        self.release(&mut victim);
                        self.waiting.push_front(victim);
                    }
                }
            }
        }
        // Sequences past `at` sit this step out. The budget is spent then, so nothing is admitted after them
        // and `chunks[i]` stays the chunk of `running[i]`.
    }

    fn admit_waiting(&mut self, budget: &mut usize, chunks: &mut Vec<usize>) {
        let block_size = self.config.block_size;
        let watermark = (self.config.watermark * self.config.num_blocks as f64).ceil() as usize;
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            // At least one prompt token is always computed, so the whole prompt is never a cache hit.
            let prefix = if self.config.enable_prefix_caching {
                let hashes = block_hashes(&seq.tokens[..seq.tokens.len() - 1], block_size);
                let matched = self.kv.cached_prefix(&hashes);
                hashes[..matched].to_vec()
            } else {
                Vec::new()
            };
            let start = prefix.len() * block_size;
            let chunk = (seq.tokens.len() - start).min(*budget);
            let needed = (start + chunk).div_ceil(block_size) - prefix.len();
            let available = self.kv.available().saturating_sub(self.kv.count_unreferenced(&prefix));
            let keep_free = if self.running.is_empty() { 0 } else { watermark };
            if available < needed + keep_free {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let mut parent = None;
            for block in &prefix {
                // Cannot fail: every block in `prefix` is held by the cache.
                let _ = self.kv.acquire_full(parent, *block);
                parent = Some(block.sequence);
            }
            seq.blocks = prefix;
            seq.computed = start;
            seq.cached_tokens.get_or_insert(start as u32);
            if reserve(&mut self.kv, &mut seq, chunk, block_size).is_err() {
                self.release(&mut seq);
                self.waiting.push_front(seq);
                break;
            }
            chunks.push(chunk);
            *budget -= chunk;
            self.running.push(seq);
        }
    }

    /// Returns every block of `seq` to the cache, tail first so the tail is evicted first.
    fn release(&mut self, seq: &mut Sequence) {
        for block in seq.blocks.drain(..).rev() {
            self.kv.release_full(block.sequence);
        }
        if seq.has_partial {
            self.kv.release_partial();
            seq.has_partial = false;
        }
        seq.computed = 0;
    }
}

/// Gives `seq` the blocks for its next `chunk` tokens, all or nothing.
fn reserve(kv: &mut KvManager, seq: &mut Sequence, chunk: usize, block_size: usize) -> Result<(), KvFull> {
    let target = seq.computed + chunk;
    let full = target / block_size;
    let partial = !target.is_multiple_of(block_size);
    let needed = (full + usize::from(partial)).saturating_sub(seq.blocks.len() + usize::from(seq.has_partial));
    if kv.available() < needed {
        return Err(KvFull);
    }
    if seq.has_partial && (full > seq.blocks.len() || !partial) {
        kv.release_partial();
        seq.has_partial = false;
    }
    while seq.blocks.len() < full {
        let at = seq.blocks.len();
        let parent = seq.blocks.last().map(|b| b.sequence);
        let local = local_block_hash(&seq.tokens[at * block_size..(at + 1) * block_size]);
        let block = BlockHash { local, sequence: chain_hash(parent, local) };
        kv.acquire_full(parent, block)?;
        seq.blocks.push(block);
    }
    if partial && !seq.has_partial {
        kv.acquire_partial()?;
        seq.has_partial = true;
    }
    Ok(())
}

/// Samples the next token of a sequence whose tokens are all computed.
fn sample(seq: &mut Sequence, vocab: &[u32]) -> EngineOutput {
    let draw = splitmix64(seq.state ^ 0x5DEE_CE66_D1CE_4E5B);
    let token = vocab[(draw % vocab.len() as u64) as usize];
    let logprobs = seq.logprobs.map(|top| vec![fake_logprob(token, draw, top, vocab)]).unwrap_or_default();
    seq.state = mix(seq.state, token);
    seq.tokens.push(token);
    seq.generated += 1;
    let finish_reason = if seq.generated >= seq.min_tokens && seq.stop_token_ids.contains(&token) {
        Some(FinishReason::StopToken(token))
    } else if seq.generated >= seq.max_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    let cached_tokens = if seq.reported_cached { None } else { seq.cached_tokens };
    seq.reported_cached = true;
    EngineOutput { token_ids: vec![token], logprobs, finish_reason, cached_tokens }
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
mod tests;
