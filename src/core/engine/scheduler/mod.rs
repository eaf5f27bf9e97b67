//! The vLLM-style continuous-batching scheduler every engine that owns its KV cache shares, synchronous and
//! free of I/O so tests can step it by hand. What a step *computes* is the `Executor`'s business: the native
//! engine runs the model, the mocker simulates the time it would take.
//!
//! One `step()`:
//! 1. Running sequences, oldest first, each get their next chunk of uncomputed tokens (1 when decoding, up to
//!    the step's token budget when prefilling: chunked prefill). When pages run out, the newest running
//!    sequence is preempted: its pages are released and it goes back to the front of the queue to be
//!    recomputed.
//! 2. Waiting sequences are admitted in order while the budget, `max_num_seqs` and free pages (keeping a
//!    watermark) allow. Admission first reuses the longest committed prefix, which becomes `cached_tokens`.
//! 3. The executor computes every chunk's KV into its pages and samples a token for each sequence whose
//!    tokens are now all computed. Blocks that became full are committed (shared from then on). A sequence
//!    that reaches a stop token (after `min_tokens`) or `max_tokens` finishes and releases its pages.
//!
//! Two states hand KV between workers (disaggregated serving):
//! - **held for a peer** (`add_holding`): a sequence that finishes keeps its pages under a lease until the
//!   peer has read them (`release_lease`), the peer is declared dead (the same), or the lease expires;
//! - **arriving from a peer** (`add_arriving`): pages are allocated for the prompt's KV, which a transfer
//!   writes; the sequence is not scheduled until `arrived` (then it continues from there, its full blocks
//!   committed as if computed) or `arrival_failed` or its wait is over (then it is computed here from the
//!   start, as vLLM recomputes when a KV load fails: a peer that died costs time, never the request).
use super::blocks::{BlockPool, KvFull, PageId};
use crate::core::grammar::{Compiler, GrammarError, Guide};
use crate::core::protocol::{
    EngineOutput, FinishReason, HeldKv, KvEvent, KvLayout, LoadMetrics, MediaInput, Pooling, PreprocessedRequest,
    TokenLogprob,
};
use crate::core::tokens::{BlockHash, MediaSpan, block_hashes_with_media, chain_hash, local_block_hash_at};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

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

/// Runs the model (or its stand-in) over one step's chunks.
pub trait Executor: Send + 'static {
    /// Per-sequence sampling state (random generator, penalty counts, …).
    type Sampler: Send;

    /// The sampling state of a new request; `seed` is already resolved (random when the client gave none).
    fn sampler(&self, request: &PreprocessedRequest, seed: u64) -> Self::Sampler;

    /// Computes the KV of every chunk into its pages and samples one token for each chunk where
    /// `chunk.samples()`. Returns one entry per chunk, in order (`None` where nothing was sampled).
    fn execute(&mut self, chunks: &mut [Chunk<'_, Self::Sampler>]) -> Result<Executed, ExecError>;

    /// The KV pages it computes into, as memory a transfer agent can register (see `Engine::kv_memory`).
    fn kv_memory(&self) -> Option<super::KvMemory> {
        None
    }

    /// What it computes on, for operators (`Engine::device`).
    fn device(&self) -> String {
        String::new()
    }

    /// Bytes its device has in use and in all (`Backend::memory_use`), where it can say.
    fn memory_use(&self) -> Option<(u64, u64)> {
        None
    }

    /// Where it keeps images' embeddings, for a model that takes images (`Engine::embeddings`).
    fn embedding_cache(&self) -> Option<std::sync::Arc<crate::core::multimodal::EmbeddingCache>> {
        None
    }
}

/// The part of one sequence a step computes: tokens `start..end` of `tokens`, whose KV goes into `pages`.
pub struct Chunk<'a, S> {
    pub id: SeqId,
    pub tokens: &'a [u32],
    pub start: usize,
    pub end: usize,
    /// The sequence's block table: page `i` holds tokens `i * block_size ..`.
    pub pages: &'a [PageId],
    /// One new token of a sequence that has generated before (as opposed to prompt tokens).
    pub decoding: bool,
    pub logprobs: Option<u32>,
    pub sampler: &'a mut S,
    /// What the sampled token must keep to (structured output): mask the logits with it.
    pub guide: Option<&'a mut Guide>,
    /// Return the final hidden state at the chunk's last token instead of a token (an embedding request).
    pub pooling: bool,
    /// The sequence's images: the rows of their placeholders take their embeddings.
    pub media: &'a [MediaInput],
}

impl<S> Chunk<'_, S> {
    /// Whether this chunk completes the sequence's tokens, so the step samples its next one.
    pub fn samples(&self) -> bool {
        self.end == self.tokens.len()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<TokenLogprob>,
    /// For a pooling chunk (`Chunk::pooling`): the final hidden state at its last token, and no token.
    pub hidden: Option<Vec<f32>>,
}

#[derive(Debug, Default)]
pub struct Executed {
    pub sampled: Vec<Option<Sampled>>,
    /// How long the step would have taken on real hardware (mocker only; real engines take real time).
    pub simulated_ms: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ExecError(pub String);

struct Sequence<S> {
    id: SeqId,
    tokens: Vec<u32>,
    computed: usize,
    /// Block table; the first `committed.len()` pages are committed under these hashes.
    pages: Vec<PageId>,
    committed: Vec<BlockHash>,
    generated: u32,
    max_tokens: u32,
    min_tokens: u32,
    stop_token_ids: Vec<u32>,
    logprobs: Option<u32>,
    sampler: S,
    /// Its structured output's place in the constraint (an error only if it stopped compiling since the
    /// engine accepted it).
    guide: Option<Result<Guide, GrammarError>>,
    /// An embedding request: it ends after its prompt, with the pooled hidden state.
    pooling: Option<Pooling>,
    cached_tokens: Option<u32>,
    reported_cached: bool,
    /// Keep the pages this long for a peer once finished.
    hold_for: Option<Duration>,
    /// While arriving: when to stop waiting for the peer's KV.
    arrive_by: Option<Instant>,
    /// The prompt's images (their hashes fold into the blocks holding their placeholders).
    media: Option<std::sync::Arc<Vec<MediaInput>>>,
    spans: Vec<MediaSpan>,
}

/// A finished sequence's pages, kept for a peer until `expires`.
struct Lease {
    id: SeqId,
    pages: Vec<PageId>,
    expires: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandOffError {
    #[error("no room for {needed} KV blocks from a peer ({available} free)")]
    Full { needed: usize, available: usize },
    #[error("KV for {from_peer} tokens of a {tokens}-token sequence: at least its last token is computed here")]
    TooMany { from_peer: usize, tokens: usize },
}

/// The pages an arriving sequence's KV goes to: block `i` in `pages[i]`, of which the first `cached` already
/// hold theirs (this worker's prefix cache had them) and the rest wait for the peer's.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivalPages {
    pub cached: usize,
    pub pages: Vec<PageId>,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct StepOutcome {
    pub simulated_ms: f64,
    pub prefill_tokens: usize,
    pub decoding: usize,
    pub outputs: Vec<(SeqId, EngineOutput)>,
}

pub struct Scheduler<X: Executor> {
    config: SchedulerConfig,
    pool: BlockPool,
    waiting: VecDeque<Sequence<X::Sampler>>,
    running: Vec<Sequence<X::Sampler>>,
    /// Sequences whose first tokens' KV a peer is writing into their pages.
    arriving: Vec<Sequence<X::Sampler>>,
    leases: Vec<Lease>,
    executor: X,
    /// Compiles the constraints of structured-output requests; `None` refuses them.
    grammars: Option<Compiler>,
}

impl<X: Executor> Scheduler<X> {
    pub fn new(config: SchedulerConfig, executor: X) -> Self {
        Self {
            grammars: None,
            pool: BlockPool::new(config.num_blocks),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            arriving: Vec::new(),
            leases: Vec::new(),
            executor,
        }
    }

    pub fn executor(&self) -> &X {
        &self.executor
    }

    /// Lets requests constrain their output (structured output) by this model's vocabulary.
    pub fn set_grammars(&mut self, grammars: Compiler) {
        self.grammars = Some(grammars);
    }

    /// The most tokens (prompt + generated) one request may need.
    pub fn max_sequence_tokens(&self) -> usize {
        self.config.num_blocks * self.config.block_size
    }

    pub fn add(&mut self, id: SeqId, request: &PreprocessedRequest, seed: u64) {
        let seq = self.sequence(id, request, seed);
        self.waiting.push_back(seq);
    }

    /// Adds a request whose pages are held for a peer for `lease` once it finishes (a prefill for a decode
    /// worker); `held_pages` names them meanwhile.
    pub fn add_holding(&mut self, id: SeqId, request: &PreprocessedRequest, seed: u64, lease: Duration) {
        let seq = Sequence { hold_for: Some(lease), ..self.sequence(id, request, seed) };
        self.waiting.push_back(seq);
    }

    /// Adds a request whose first `from_peer` tokens' KV a peer will write, and returns the pages it must
    /// write them to (block `i` of the sequence in page `i`). Nothing runs until `arrived`, `arrival_failed`
    /// or `wait` has passed.
    pub fn add_arriving(
        &mut self,
        id: SeqId,
        request: &PreprocessedRequest,
        seed: u64,
        from_peer: usize,
        wait: Duration,
    ) -> Result<ArrivalPages, HandOffError> {
        let mut seq = Sequence { arrive_by: Some(Instant::now() + wait), ..self.sequence(id, request, seed) };
        if from_peer >= seq.tokens.len() {
            return Err(HandOffError::TooMany { from_peer, tokens: seq.tokens.len() });
        }
        let block_size = self.config.block_size;
        let blocks = from_peer.div_ceil(block_size);
        // What this worker's prefix cache holds of it is not read again, but the last block always is: the
        // read's notification is what ends the peer's lease.
        let prefix = if self.config.enable_prefix_caching {
            let hashes = block_hashes_with_media(&seq.tokens[..from_peer], block_size, &seq.spans);
            let matched = self.pool.cached_prefix(&hashes).min(blocks.saturating_sub(1));
            hashes[..matched].to_vec()
        } else {
            Vec::new()
        };
        let needed = blocks - prefix.len();
        let available = self.pool.available().saturating_sub(self.pool.count_unreferenced(&prefix));
        if available < needed {
            return Err(HandOffError::Full { needed, available });
        }
        for block in &prefix {
            // Cannot fail: `cached_prefix` just saw every one of them committed.
            if let Some(page) = self.pool.acquire(block.sequence) {
                seq.pages.push(page);
                seq.committed.push(*block);
            }
        }
        for _ in 0..needed {
            match self.pool.allocate() {
                Ok(page) => seq.pages.push(page),
                Err(KvFull) => {
                    release(&mut self.pool, &mut seq);
                    return Err(HandOffError::Full { needed, available: 0 });
                }
            }
        }
        // Counted as computed only once it has arrived; until then it is only pages.
        seq.computed = from_peer;
        seq.cached_tokens = Some((seq.committed.len() * block_size) as u32);
        let pages = ArrivalPages { cached: seq.committed.len(), pages: seq.pages.clone() };
        self.arriving.push(seq);
        Ok(pages)
    }

    /// The peer's KV for `id` has landed: it is scheduled from there on. False if `id` is not arriving.
    pub fn arrived(&mut self, id: SeqId) -> bool {
        let Some(at) = self.arriving.iter().position(|s| s.id == id) else { return false };
        let mut seq = self.arriving.remove(at);
        seq.arrive_by = None;
        if self.config.enable_prefix_caching {
            commit_full_blocks(&mut self.pool, &mut seq, self.config.block_size);
        }
        self.waiting.push_front(seq);
        true
    }

    /// The peer's KV for `id` will not come: its pages (holding nothing usable) are freed and it is computed
    /// here from the start. False if `id` is not arriving.
    pub fn arrival_failed(&mut self, id: SeqId) -> bool {
        let Some(at) = self.arriving.iter().position(|s| s.id == id) else { return false };
        let mut seq = self.arriving.remove(at);
        seq.arrive_by = None;
        release(&mut self.pool, &mut seq);
        self.waiting.push_front(seq);
        true
    }

    /// The pages a finished sequence holds for a peer, in block order.
    pub fn held_pages(&self, id: SeqId) -> Option<&[PageId]> {
        self.leases.iter().find(|l| l.id == id).map(|l| l.pages.as_slice())
    }

    /// Ends `id`'s lease (the peer read its pages, or is gone); false if it holds none.
    pub fn release_lease(&mut self, id: SeqId) -> bool {
        let Some(at) = self.leases.iter().position(|l| l.id == id) else { return false };
        let lease = self.leases.swap_remove(at);
        lease.pages.into_iter().rev().for_each(|page| self.pool.release(page));
        true
    }

    /// Ends every lease past its expiry at `now`, and computes here every arriving sequence whose wait is
    /// over; returns whose.
    pub fn expire(&mut self, now: Instant) -> Vec<SeqId> {
        let leases: Vec<SeqId> = self.leases.iter().filter(|l| l.expires <= now).map(|l| l.id).collect();
        for &id in &leases {
            tracing::warn!("the KV of request {id} was held for a peer that never took it; its lease expired");
            self.release_lease(id);
        }
        let overdue: Vec<SeqId> =
            self.arriving.iter().filter(|s| s.arrive_by.is_some_and(|by| by <= now)).map(|s| s.id).collect();
        for &id in &overdue {
            tracing::warn!("the KV of request {id} never came from its peer; computing it here");
            self.arrival_failed(id);
        }
        [leases, overdue].concat()
    }

    fn sequence(&self, id: SeqId, request: &PreprocessedRequest, seed: u64) -> Sequence<X::Sampler> {
        Sequence {
            id,
            tokens: request.token_ids.clone(),
            computed: 0,
            pages: Vec::new(),
            committed: Vec::new(),
            generated: 0,
            max_tokens: request.stop.max_tokens,
            min_tokens: request.stop.min_tokens,
            stop_token_ids: request.stop.stop_token_ids.clone(),
            logprobs: request.logprobs,
            sampler: self.executor.sampler(request, seed),
            guide: match &self.grammars {
                Some(grammars) => grammars.guide_for(request),
                None => request.constraint.as_ref().map(|_| Err(GrammarError::Unavailable)),
            },
            pooling: request.pooling,
            cached_tokens: None,
            reported_cached: false,
            hold_for: None,
            arrive_by: None,
            media: request.media.clone(),
            spans: request.media_spans(),
        }
    }

    /// Drops a request wherever it is and frees its pages; false if it was not here.
    pub fn abort(&mut self, id: SeqId) -> bool {
        if self.release_lease(id) {
            return true;
        }
        if let Some(at) = self.arriving.iter().position(|s| s.id == id) {
            let mut seq = self.arriving.remove(at);
            release(&mut self.pool, &mut seq);
            return true;
        }
        if let Some(at) = self.running.iter().position(|s| s.id == id) {
            let mut seq = self.running.remove(at);
            release(&mut self.pool, &mut seq);
            return true;
        }
        if let Some(at) = self.waiting.iter().position(|s| s.id == id) {
            if let Some(mut seq) = self.waiting.remove(at) {
                release(&mut self.pool, &mut seq);
            }
            return true;
        }
        false
    }

    /// Whether a step would compute anything (sequences waiting for a peer's KV, or holding pages for one,
    /// are not work).
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// When the next lease expires or the next arrival's wait is over.
    pub fn next_deadline(&self) -> Option<Instant> {
        let leases = self.leases.iter().map(|l| l.expires);
        leases.chain(self.arriving.iter().filter_map(|s| s.arrive_by)).min()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty() && self.arriving.is_empty()
    }

    pub fn load(&self) -> LoadMetrics {
        LoadMetrics {
            requests_running: self.running.len() as u32,
            requests_waiting: (self.waiting.len() + self.arriving.len()) as u32,
            kv_active_blocks: self.pool.active_blocks() as u64,
            kv_cached_blocks: self.pool.cached_blocks() as u64,
            kv_total_blocks: self.pool.capacity() as u64,
            engine_down: false,
            max_running: self.config.max_num_seqs as u32,
            ..LoadMetrics::default()
        }
    }

    pub fn drain_events(&mut self) -> Vec<KvEvent> {
        self.pool.drain_events()
    }

    pub fn step(&mut self) -> StepOutcome {
        if !self.leases.is_empty() || !self.arriving.is_empty() {
            self.expire(Instant::now());
        }
        let mut budget = self.config.max_num_batched_tokens;
        let mut sizes: Vec<usize> = Vec::new();
        self.schedule_running(&mut budget, &mut sizes);
        self.admit_waiting(&mut budget, &mut sizes);

        let mut outcome = StepOutcome::default();
        let mut chunks: Vec<Chunk<'_, X::Sampler>> = self
            .running
            .iter_mut()
            .zip(&sizes)
            .map(|(seq, &size)| {
                let decoding = size == 1 && seq.generated > 0 && seq.computed + 1 == seq.tokens.len();
                if decoding {
                    outcome.decoding += 1;
                } else {
                    outcome.prefill_tokens += size;
                }
                Chunk {
                    id: seq.id,
                    tokens: &seq.tokens,
                    start: seq.computed,
                    end: seq.computed + size,
                    pages: &seq.pages,
                    decoding,
                    logprobs: seq.logprobs,
                    sampler: &mut seq.sampler,
                    guide: seq.guide.as_mut().and_then(|g| g.as_mut().ok()),
                    pooling: seq.pooling.is_some(),
                    media: seq.media.as_deref().map_or(&[], Vec::as_slice),
                }
            })
            .collect();
        let executed = match self.executor.execute(&mut chunks) {
            Ok(executed) if executed.sampled.len() == sizes.len() => Ok(executed),
            Ok(executed) => Err(ExecError(format!(
                "the executor returned {} results for {} chunks",
                executed.sampled.len(),
                sizes.len()
            ))),
            Err(e) => Err(e),
        };
        drop(chunks);
        let executed = match executed {
            Ok(executed) => executed,
            Err(e) => {
                self.fail_batch(sizes.len(), &e, &mut outcome);
                return outcome;
            }
        };
        outcome.simulated_ms = executed.simulated_ms;

        let mut finished = Vec::new();
        for (at, (&size, sampled)) in sizes.iter().zip(executed.sampled).enumerate() {
            let seq = &mut self.running[at];
            seq.computed += size;
            if self.config.enable_prefix_caching {
                commit_full_blocks(&mut self.pool, seq, self.config.block_size);
            }
            let Some(sampled) = sampled else {
                continue;
            };
            let output = match seq.pooling {
                Some(pooling) => finish_pooled(seq, pooling, sampled),
                None => finish_token(seq, sampled),
            };
            if output.finish_reason.is_some() {
                finished.push(at);
            }
            outcome.outputs.push((seq.id, output));
        }
        for at in finished.into_iter().rev() {
            let mut seq = self.running.remove(at);
            match seq.hold_for {
                Some(lease) => {
                    let pages = std::mem::take(&mut seq.pages);
                    // Named on the final output itself: asking for them after the step would wait a whole
                    // next step (a long prefill, perhaps) while the peer waits to read them.
                    let held = HeldKv {
                        agent: String::new(),
                        lease: seq.id,
                        tokens: seq.computed as u32,
                        pages: pages.clone(),
                        layout: KvLayout { block_size: self.config.block_size as u32, ..KvLayout::default() },
                        engine_params: None,
                    };
                    if let Some((_, output)) = outcome.outputs.iter_mut().rev().find(|(id, _)| *id == seq.id) {
                        output.held = Some(held);
                    }
                    self.leases.push(Lease { id: seq.id, pages, expires: Instant::now() + lease });
                }
                None => release(&mut self.pool, &mut seq),
            }
        }
        outcome
    }

    /// Finishes every scheduled sequence with an error (a failed step leaves their KV undefined).
    fn fail_batch(&mut self, scheduled: usize, error: &ExecError, outcome: &mut StepOutcome) {
        tracing::error!("engine step failed: {error}");
        for mut seq in self.running.drain(..scheduled).collect::<Vec<_>>() {
            release(&mut self.pool, &mut seq);
            let output = EngineOutput {
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: Some(FinishReason::Error(error.0.clone())),
                cached_tokens: None,
                ..Default::default()
            };
            outcome.outputs.push((seq.id, output));
        }
    }

    fn schedule_running(&mut self, budget: &mut usize, sizes: &mut Vec<usize>) {
        let mut at = 0;
        while at < self.running.len() && *budget > 0 {
            let need = self.running[at].tokens.len() - self.running[at].computed;
            let size = need.min(*budget);
            match reserve(&mut self.pool, &mut self.running[at], size, self.config.block_size) {
                Ok(()) => {
                    sizes.push(size);
                    *budget -= size;
                    at += 1;
                }
                Err(KvFull) => {
                    // Preempt the newest sequence; if that is this one, it simply waits.
                    if let Some(mut victim) = self.running.pop() {
                        release(&mut self.pool, &mut victim);
                        self.waiting.push_front(victim);
                    }
                }
            }
        }
        // Sequences past `at` sit this step out. The budget is spent then, so nothing is admitted after them
        // and `sizes[i]` stays the chunk size of `running[i]`.
    }

    fn admit_waiting(&mut self, budget: &mut usize, sizes: &mut Vec<usize>) {
        let block_size = self.config.block_size;
        let watermark = (self.config.watermark * self.config.num_blocks as f64).ceil() as usize;
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            // At least one prompt token is always computed, so the whole prompt is never a cache hit. A
            // sequence whose KV arrived from a peer has its pages already.
            let prefix = if self.config.enable_prefix_caching && seq.pages.is_empty() {
                let hashes = block_hashes_with_media(&seq.tokens[..seq.tokens.len() - 1], block_size, &seq.spans);
                let matched = self.pool.cached_prefix(&hashes);
                hashes[..matched].to_vec()
            } else {
                Vec::new()
            };
            let start = if seq.pages.is_empty() { prefix.len() * block_size } else { seq.computed };
            let size = (seq.tokens.len() - start).min(*budget);
            let needed = (start + size).div_ceil(block_size).saturating_sub(prefix.len() + seq.pages.len());
            let available = self.pool.available().saturating_sub(self.pool.count_unreferenced(&prefix));
            let keep_free = if self.running.is_empty() { 0 } else { watermark };
            if available < needed + keep_free {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            for block in &prefix {
                // Cannot fail: `cached_prefix` just saw every one of them committed.
                if let Some(page) = self.pool.acquire(block.sequence) {
                    seq.pages.push(page);
                    seq.committed.push(*block);
                }
            }
            if seq.pages.is_empty() || !prefix.is_empty() {
                seq.computed = seq.committed.len() * block_size;
                seq.cached_tokens.get_or_insert(seq.computed as u32);
            }
            if reserve(&mut self.pool, &mut seq, size, block_size).is_err() {
                release(&mut self.pool, &mut seq);
                self.waiting.push_front(seq);
                break;
            }
            sizes.push(size);
            *budget -= size;
            self.running.push(seq);
        }
    }
}

/// Returns every page of `seq` to the pool, tail first so the tail is evicted first.
fn release<S>(pool: &mut BlockPool, seq: &mut Sequence<S>) {
    for page in seq.pages.drain(..).rev() {
        pool.release(page);
    }
    seq.committed.clear();
    seq.computed = 0;
}

/// Gives `seq` the pages for its next `size` tokens, all or nothing.
fn reserve<S>(pool: &mut BlockPool, seq: &mut Sequence<S>, size: usize, block_size: usize) -> Result<(), KvFull> {
    let needed = (seq.computed + size).div_ceil(block_size).saturating_sub(seq.pages.len());
    if pool.available() < needed {
        return Err(KvFull);
    }
    for _ in 0..needed {
        seq.pages.push(pool.allocate()?);
    }
    Ok(())
}

/// Commits the blocks of `seq` whose tokens are now all computed.
fn commit_full_blocks<S>(pool: &mut BlockPool, seq: &mut Sequence<S>, block_size: usize) {
    while seq.committed.len() < seq.computed / block_size {
        let at = seq.committed.len();
        let parent = seq.committed.last().map(|b| b.sequence);
        let local = local_block_hash_at(&seq.tokens, at, block_size, &seq.spans);
        let block = BlockHash { local, sequence: chain_hash(parent, local) };
        seq.pages[at] = pool.commit(seq.pages[at], parent, block);
        seq.committed.push(block);
    }
}

/// Appends a sampled token and decides whether the sequence is done.
fn finish_token<S>(seq: &mut Sequence<S>, sampled: Sampled) -> EngineOutput {
    let token = sampled.token;
    let ends = match &mut seq.guide {
        None => None,
        Some(Ok(guide)) => guide.consume(token),
        Some(Err(e)) => Some(FinishReason::Error(e.to_string())),
    };
    seq.tokens.push(token);
    seq.generated += 1;
    let finish_reason = if seq.generated >= seq.min_tokens && seq.stop_token_ids.contains(&token) {
        Some(FinishReason::StopToken(token))
    } else if let Some(ends) = ends {
        Some(ends)
    } else if seq.generated >= seq.max_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    let cached_tokens = if seq.reported_cached { None } else { seq.cached_tokens };
    seq.reported_cached = true;
    EngineOutput {
        token_ids: vec![token],
        logprobs: sampled.logprob.into_iter().collect(),
        finish_reason,
        cached_tokens,
        ..Default::default()
    }
}

/// A pooling sequence's one output: its embedding, nothing generated.
fn finish_pooled<S>(seq: &mut Sequence<S>, pooling: Pooling, sampled: Sampled) -> EngineOutput {
    let finish_reason = match sampled.hidden {
        Some(_) => FinishReason::Length,
        None => FinishReason::Error("the engine returned no hidden state for an embedding request".into()),
    };
    let embedding = sampled.hidden.map(|mut hidden| {
        if pooling.normalize {
            let norm = hidden.iter().map(|v| v * v).sum::<f32>().sqrt();
            // A zero vector stays zero rather than turning into NaNs.
            if norm > 0.0 {
                hidden.iter_mut().for_each(|v| *v /= norm);
            }
        }
        hidden
    });
    let cached_tokens = if seq.reported_cached { None } else { seq.cached_tokens };
    seq.reported_cached = true;
    EngineOutput {
        token_ids: Vec::new(),
        logprobs: Vec::new(),
        finish_reason: Some(finish_reason),
        cached_tokens,
        embedding,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
