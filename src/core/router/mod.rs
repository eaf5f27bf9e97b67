//! Picks the worker for each request and keeps the router's own account of what it sent where.
//!
//! Modes: `kv` (the cost function in `cost`, over overlaps from a `FlashIndexer` fed by every worker's KV
//! events), `latency` (each worker's predicted time to first token, `latency`, over the same overlaps and
//! the workers' performance profiles), `round-robin`, `random`, `least-loaded`. The account is the router's own bookkeeping, exact
//! between load reports: a routed request adds to its worker's in-flight count and active prefill blocks;
//! its first token moves those blocks to decode; dropping its stream takes them off. The kv cost takes the
//! larger of that account and the worker's own reported active blocks. When every worker is at
//! the busy threshold the router refuses, so the frontend can answer 503 instead of queueing without bound.
//! Choosing takes no lock: counters are atomics, the index is sharded. For engines without KV events,
//! `approx` stands in: the router's own decisions, expiring after a TTL.
mod approx;
mod cost;
mod disagg;
mod encode;
mod latency;
mod migration;

pub use approx::ApproxTracker;
pub use cost::{Candidate, cheapest, choose, cost};
pub use latency::{Backlog, predicted_ttft_ms};
pub use migration::{MigratingStream, Pins};

use crate::core::engine::{Engine, EngineError, KvFollower, ResponseStream};
use crate::core::indexer::{FlashIndexer, Indexer, OverlapScores};
use crate::core::protocol::profile::Profile;
use crate::core::protocol::{EngineOutput, KvEvent, PreprocessedRequest, WorkerId};
use crate::core::tokens::{MediaSpan, block_hashes_with_media};
use futures::Stream;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("every worker is at its limit of {threshold} in-flight requests; retry shortly")]
    Busy { threshold: usize },
    #[error("no worker is serving this model")]
    NoWorkers,
    #[error("no worker of this model can take requests now (each is lost or its engine is down); retry shortly")]
    Unavailable,
    #[error(
        "this request needs {needed} streams (prompts × n) and the workers can take {room} more now; retry \
         shortly, or ask for fewer prompts or a smaller n"
    )]
    NoRoom { needed: usize, room: usize },
    #[error("worker {0} ({0:016x}), which the request names, is not a {1} worker of this router; pick again")]
    NotHere(WorkerId, &'static str),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterMode {
    Kv,
    Latency,
    RoundRobin,
    Random,
    LeastLoaded,
}

impl RouterMode {
    /// Its name on the command line (`--router-mode`).
    pub fn name(self) -> &'static str {
        match self {
            RouterMode::Kv => "kv",
            RouterMode::Latency => "latency",
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
            RouterMode::LeastLoaded => "least-loaded",
        }
    }

    /// Whether it weighs what each worker has cached of a prompt.
    pub fn uses_overlaps(self) -> bool {
        matches!(self, RouterMode::Kv | RouterMode::Latency)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub mode: RouterMode,
    /// In-flight requests per worker past which the router refuses new ones.
    pub busy_threshold: usize,
    /// Tokens per KV block of the workers (prompt hashes must match theirs).
    pub block_size: usize,
    pub overlap_weight: f64,
    pub temperature: f64,
    /// Workers publish KV events; when false (engines without events), `kv` mode instead assumes a worker
    /// holds what it was sent for `approximate_ttl`.
    pub kv_events: bool,
    pub approximate_ttl: Duration,
    /// Times a request whose worker is lost mid-stream is continued on another one (`migration`).
    pub migration_limit: u32,
    /// With prefill workers up: prompts whose part the chosen decode worker has not cached is at least this
    /// many tokens are prefilled on a prefill worker, shorter ones on the decode worker itself (0: every one).
    pub disagg_threshold: usize,
    /// Prefills in flight on a prefill worker past which it takes no more; when every prefill worker is
    /// there, prompts are prefilled on their decode worker rather than wait.
    pub prefill_queue_limit: usize,
    /// With prefill workers up: a prompt stays on its decode worker when moving its KV there, spread over the
    /// tokens the request may generate, would add more than this to its mean time between tokens (`None`: no
    /// such limit). The move's time is the decode worker's own measure (`LoadMetrics::kv_read_bytes_per_s`).
    pub disagg_itl_budget: Option<Duration>,
    /// Requests in flight on an encode worker past which it takes no more; when every encode worker is there,
    /// images are encoded by the worker that prefills their prompt rather than wait.
    pub encode_queue_limit: usize,
}

/// `disagg_itl_budget` unless told otherwise: half of a 40 ms ITL target (what Dynamo's planner and this
/// one aim at by default), leaving the other half to the decode steps.
pub const DISAGG_ITL_BUDGET: Duration = Duration::from_millis(20);

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            mode: RouterMode::Latency,
            busy_threshold: 1024,
            block_size: 16,
            overlap_weight: 1.0,
            temperature: 0.0,
            kv_events: true,
            approximate_ttl: Duration::from_secs(120),
            migration_limit: 3,
            disagg_threshold: 0,
            prefill_queue_limit: 8,
            disagg_itl_budget: Some(DISAGG_ITL_BUDGET),
            encode_queue_limit: 8,
        }
    }
}

impl RouterConfig {
    /// Whether workers' KV events feed this router's index; otherwise it has no use for them.
    pub fn indexes_events(&self) -> bool {
        self.mode.uses_overlaps() && self.kv_events
    }
}

#[derive(Default)]
struct WorkerLoad {
    in_flight: AtomicUsize,
    prefill_blocks: AtomicU64,
    decode_blocks: AtomicU64,
    /// Requests whose first token has not come, and their uncached prompt tokens.
    prefilling: AtomicUsize,
    prefill_tokens: AtomicU64,
}

struct Worker {
    engine: Arc<dyn Engine>,
    /// The engine's, taken once when it joined (latency mode prices in it).
    profile: Option<Arc<Profile>>,
    load: Arc<WorkerLoad>,
    /// The task feeding this worker's KV events into the index (kv mode with events).
    feed: Option<tokio::task::JoinHandle<()>>,
}

impl Worker {
    /// What the kv cost knows of this worker for a prompt with these overlaps.
    fn candidate(&self, overlaps: &OverlapScores) -> Candidate {
        let prefill_blocks = self.load.prefill_blocks.load(Ordering::Relaxed);
        // The worker's own report corrects the account (it sees blocks the router cannot predict, e.g. other
        // routers' requests); the account covers decisions the report does not show yet.
        let reported = self.engine.load().kv_active_blocks.saturating_sub(prefill_blocks);
        Candidate {
            overlap_blocks: overlaps.of(self.engine.worker_id()),
            prefill_blocks,
            decode_blocks: self.load.decode_blocks.load(Ordering::Relaxed).max(reported),
            in_flight: self.load.in_flight.load(Ordering::Relaxed),
        }
    }

    /// What is ahead of a new prompt there, for the latency cost: the account's queue, and the larger of the
    /// account's and the worker's own count of KV held by decoding sequences (as `candidate`).
    fn backlog(&self, block_size: usize) -> Backlog {
        let in_flight = self.load.in_flight.load(Ordering::Relaxed);
        let prefilling = self.load.prefilling.load(Ordering::Relaxed);
        let candidate = self.candidate(&OverlapScores::default());
        Backlog {
            queued_prefill_tokens: self.load.prefill_tokens.load(Ordering::Relaxed),
            decoding: in_flight.saturating_sub(prefilling) as u64,
            decode_kv_tokens: candidate.decode_blocks.saturating_mul(block_size as u64),
        }
    }

    /// Alive and under the busy threshold: a request sent now would be taken.
    fn open(&self, busy_threshold: usize) -> bool {
        self.load.in_flight.load(Ordering::Acquire) < busy_threshold && self.engine.is_alive()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(feed) = &self.feed {
            feed.abort();
        }
    }
}

/// Where a prompt is prefilled, once prefill workers are up (`dynamo_router_disagg_decisions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disagg {
    /// On a prefill worker, its KV then read by the decode worker.
    Remote,
    /// On the decode worker: the uncached part is below the threshold, or there is one token to generate.
    Short,
    /// On the decode worker: every prefill worker is at its queue limit.
    Busy,
    /// On the decode worker: moving the prompt's KV would cost the request more time between its tokens than
    /// `disagg_itl_budget` (a long prompt with a short answer).
    SlowTransfer,
    /// On the decode worker: it cannot take KV from a peer (no transfer agent).
    Unsupported,
    /// On the decode worker after all: the prefill worker was lost or refused.
    Fallback,
}

impl Disagg {
    pub fn label(self) -> &'static str {
        match self {
            Disagg::Remote => "remote",
            Disagg::Short => "local_short",
            Disagg::Busy => "local_busy",
            Disagg::SlowTransfer => "local_slow_transfer",
            Disagg::Unsupported => "local_unsupported",
            Disagg::Fallback => "local_fallback",
        }
    }
}

/// The workers a request may be sent to: decode (aggregated) workers take whole requests, prefill workers
/// only prompts whose KV a decode worker then reads, encode workers only images whose embeddings the worker
/// that prefills then reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Decode,
    Prefill,
    Encode,
}

impl Pool {
    pub const ALL: [Pool; 3] = [Pool::Decode, Pool::Prefill, Pool::Encode];

    pub fn name(self) -> &'static str {
        match self {
            Pool::Decode => "decode",
            Pool::Prefill => "prefill",
            Pool::Encode => "encode",
        }
    }
}

pub struct Router {
    /// Replaced whole when a worker joins or leaves; a request routes over the snapshot it took.
    workers: RwLock<Arc<[Arc<Worker>]>>,
    prefill: RwLock<Arc<[Arc<Worker>]>>,
    encode: RwLock<Arc<[Arc<Worker>]>>,
    /// Where decisions are counted, once a frontend serves this router.
    metrics: std::sync::OnceLock<Arc<crate::core::telemetry::Metrics>>,
    config: RouterConfig,
    next: AtomicUsize,
    indexer: Arc<FlashIndexer>,
    /// Only in approximate mode; held for one record or expiry, never across I/O.
    approx: Option<Mutex<ApproxTracker>>,
}

impl Router {
    /// In `kv` mode this subscribes to every engine's KV events, so it must run inside a tokio runtime.
    pub fn new(engines: Vec<Arc<dyn Engine>>, mut config: RouterConfig) -> Self {
        config.busy_threshold = config.busy_threshold.max(1);
        config.block_size = config.block_size.max(1);
        let kv = config.mode.uses_overlaps();
        let approx = (kv && !config.kv_events).then(|| Mutex::new(ApproxTracker::new(config.approximate_ttl)));
        let router = Self {
            workers: RwLock::new(Arc::new([])),
            prefill: RwLock::new(Arc::new([])),
            encode: RwLock::new(Arc::new([])),
            metrics: std::sync::OnceLock::new(),
            config,
            next: AtomicUsize::new(0),
            indexer: Arc::new(FlashIndexer::new()),
            approx,
        };
        engines.into_iter().for_each(|engine| router.add_worker(engine, Pool::Decode));
        router
    }

    /// Counts this router's decisions in `metrics` from now on (the first call wins).
    pub fn report_to(&self, metrics: Arc<crate::core::telemetry::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    fn record(&self, decision: Disagg) {
        if let Some(metrics) = self.metrics.get() {
            metrics.disagg_decision(decision.label());
        }
    }

    /// Starts routing to a worker (replacing one with the same id) of `pool`. In `kv` mode this subscribes to
    /// its KV events, so it must run inside a tokio runtime.
    pub fn add_worker(&self, engine: Arc<dyn Engine>, pool: Pool) {
        let feed = self.indexes_events().then(|| spawn_feed(&engine, self.indexer.clone()));
        self.insert_worker(engine, feed, pool);
    }

    /// Starts routing to a worker whose KV events the caller brings with `apply_kv_events` (the cluster, from
    /// the event plane, where each batch is decoded and applied in one place instead of passing through a
    /// channel and another task).
    pub fn add_remote_worker(&self, engine: Arc<dyn Engine>, pool: Pool) {
        self.insert_worker(engine, None, pool);
    }

    fn pool(&self, pool: Pool) -> &RwLock<Arc<[Arc<Worker>]>> {
        match pool {
            Pool::Decode => &self.workers,
            Pool::Prefill => &self.prefill,
            Pool::Encode => &self.encode,
        }
    }

    /// Requests in flight on one worker of `pool` past which it is passed over.
    fn limit(&self, pool: Pool) -> usize {
        match pool {
            Pool::Decode => self.config.busy_threshold,
            Pool::Prefill => self.config.prefill_queue_limit.max(1),
            Pool::Encode => self.config.encode_queue_limit.max(1),
        }
    }

    /// A worker's KV events, in its order; ignored unless this router indexes them.
    pub fn apply_kv_events(&self, worker: WorkerId, events: &[KvEvent]) {
        if self.indexes_events() {
            self.indexer.apply_all(worker, events);
        }
    }

    fn indexes_events(&self) -> bool {
        self.config.indexes_events()
    }

    fn insert_worker(&self, engine: Arc<dyn Engine>, feed: Option<tokio::task::JoinHandle<()>>, pool: Pool) {
        let id = engine.worker_id();
        self.remove_from_pools(id);
        let profile = engine.profile();
        let worker = Arc::new(Worker { engine, profile, load: Arc::default(), feed });
        let mut workers = self.pool(pool).write().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<Arc<Worker>> = workers.iter().cloned().collect();
        next.push(worker);
        *workers = next.into();
    }

    fn remove_from_pools(&self, id: WorkerId) -> bool {
        let mut removed = false;
        for pool in Pool::ALL {
            let mut workers = self.pool(pool).write().unwrap_or_else(|p| p.into_inner());
            let next: Vec<Arc<Worker>> = workers.iter().filter(|w| w.engine.worker_id() != id).cloned().collect();
            removed |= next.len() != workers.len();
            *workers = next.into();
        }
        removed
    }

    /// Stops routing to a worker and forgets what it held; its requests in flight are not touched.
    pub fn remove_worker(&self, id: WorkerId) -> bool {
        let removed = self.remove_from_pools(id);
        if removed {
            self.indexer.remove_worker(id);
        }
        removed
    }

    /// Tokens per KV block of the workers it routes to.
    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    fn snapshot(&self) -> Arc<[Arc<Worker>]> {
        self.snapshot_of(Pool::Decode)
    }

    fn snapshot_of(&self, pool: Pool) -> Arc<[Arc<Worker>]> {
        self.pool(pool).read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The decode (aggregated) workers.
    pub fn engines(&self) -> Vec<Arc<dyn Engine>> {
        self.engines_of(Pool::Decode)
    }

    pub fn engines_of(&self, pool: Pool) -> Vec<Arc<dyn Engine>> {
        self.snapshot_of(pool).iter().map(|w| w.engine.clone()).collect()
    }

    /// The LoRA adapters some worker of any pool serves, each once, in the order first met.
    pub fn adapters(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for worker in Pool::ALL.iter().flat_map(|&pool| self.snapshot_of(pool).to_vec()) {
            for name in worker.engine.adapters() {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
    }

    pub fn worker_count(&self) -> usize {
        self.snapshot().len()
    }

    /// Each worker's charges (requests routed or picks held, not yet ended), every pool's.
    pub fn charged(&self) -> Vec<(WorkerId, usize)> {
        (Pool::ALL.iter().flat_map(|&pool| self.snapshot_of(pool).to_vec()))
            .map(|w| (w.engine.worker_id(), w.load.in_flight.load(Ordering::Relaxed)))
            .collect()
    }

    /// Requests routed and not yet finished, over all workers.
    pub fn in_flight(&self) -> usize {
        self.snapshot().iter().map(|w| w.load.in_flight.load(Ordering::Relaxed)).sum()
    }

    /// Refuses, before any work is done for it, a request of `streams` engine requests that the live workers
    /// cannot all take now (each up to the busy threshold).
    pub fn check_room(&self, streams: usize) -> Result<(), RouteError> {
        let workers = self.snapshot();
        if workers.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        if !workers.iter().any(|w| w.engine.is_alive()) {
            return Err(RouteError::Unavailable);
        }
        let room: usize = workers
            .iter()
            .filter(|w| w.engine.is_alive())
            .map(|w| self.config.busy_threshold.saturating_sub(w.load.in_flight.load(Ordering::Acquire)))
            .fold(0, usize::saturating_add);
        match room {
            0 => Err(RouteError::Busy { threshold: self.config.busy_threshold }),
            room if room < streams => Err(RouteError::NoRoom { needed: streams, room }),
            _ => Ok(()),
        }
    }

    pub fn route(&self, request: PreprocessedRequest) -> Result<RoutedStream, RouteError> {
        self.route_avoiding(request, &[])
    }

    /// Routes like `route`, never to a worker in `avoid` (ones that just refused or lost this request).
    pub fn route_avoiding(&self, request: PreprocessedRequest, avoid: &[WorkerId]) -> Result<RoutedStream, RouteError> {
        let adapter = request.adapter.as_deref();
        self.choose_in(Pool::Decode, &request.token_ids, &request.media_spans(), adapter, avoid)?.dispatch(request)
    }

    /// The worker a prompt of `token_ids` would go to (never one in `avoid`), charged with its load as if it
    /// had been sent: the charge is the returned value's, given back when it is dropped unless `dispatch`
    /// hands it on to the request's stream. Nothing is submitted.
    pub fn choose(&self, token_ids: &[u32], avoid: &[WorkerId]) -> Result<Choice, RouteError> {
        self.choose_in(Pool::Decode, token_ids, &[], None, avoid)
    }

    /// `choose` over one pool's workers, each up to that pool's limit; under a LoRA `adapter`, only over the
    /// workers that serve it (`media` then holds its key, as `PreprocessedRequest::media_spans` puts it).
    pub fn choose_in(
        &self,
        pool: Pool,
        token_ids: &[u32],
        media: &[MediaSpan],
        adapter: Option<&str>,
        avoid: &[WorkerId],
    ) -> Result<Choice, RouteError> {
        let workers = self.snapshot_of(pool);
        if workers.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        let limit = self.limit(pool);
        let (hashes, overlaps) = self.overlaps(token_ids, media);
        let lacks = |w: &Worker| adapter.is_some_and(|name| !w.engine.adapters().iter().any(|a| a == name));
        let mut excluded: Vec<bool> =
            workers.iter().map(|w| avoid.contains(&w.engine.worker_id()) || lacks(w)).collect();
        if !workers.iter().zip(&excluded).any(|(w, &excluded)| !excluded && w.engine.is_alive()) {
            return Err(RouteError::Unavailable);
        }
        let prompt = Prompt { tokens: token_ids.len(), blocks: hashes.len() as u32 };
        let (index, overlap, predicted_ms) = loop {
            let Some((index, predicted_ms)) = self.pick(&workers, &excluded, &overlaps, prompt, limit) else {
                return Err(RouteError::Busy { threshold: limit });
            };
            let worker = &workers[index];
            if worker.load.in_flight.fetch_add(1, Ordering::AcqRel) < limit {
                break (index, overlaps.of(worker.engine.worker_id()), predicted_ms);
            }
            worker.load.in_flight.fetch_sub(1, Ordering::AcqRel);
            excluded[index] = true;
        };
        let worker = workers[index].clone();
        if let Some(approx) = &self.approx {
            let mut approx = approx.lock().unwrap_or_else(|p| p.into_inner());
            approx.record(self.indexer.as_ref(), worker.engine.worker_id(), &hashes, Instant::now());
        }
        let prompt_blocks = token_ids.len().div_ceil(self.config.block_size) as u64;
        let prefill_blocks = prompt_blocks.saturating_sub(u64::from(overlap));
        let prefill_tokens = uncached_tokens(token_ids.len(), overlap, self.config.block_size);
        worker.load.prefill_blocks.fetch_add(prefill_blocks, Ordering::Relaxed);
        worker.load.prefill_tokens.fetch_add(prefill_tokens, Ordering::Relaxed);
        worker.load.prefilling.fetch_add(1, Ordering::Relaxed);
        let account = Account {
            load: worker.load.clone(),
            prefill_blocks,
            prefill_tokens,
            prefilling: true,
            decode_blocks: prompt_blocks,
            decoding: false,
            generated: 0,
            block_size: self.config.block_size,
            prediction: predicted_ms.zip(self.metrics.get()).map(|(predicted_ms, metrics)| Prediction {
                predicted_ms,
                sent: Instant::now(),
                worker_id: worker.engine.worker_id(),
                metrics: metrics.clone(),
            }),
        };
        Ok(Choice { worker_id: worker.engine.worker_id(), overlap_blocks: overlap, worker, account })
    }

    /// `choose_in` with one candidate: worker `id` of `pool`, charged as any choice is.
    pub fn choose_pinned(
        &self,
        pool: Pool,
        id: WorkerId,
        token_ids: &[u32],
        media: &[MediaSpan],
        adapter: Option<&str>,
    ) -> Result<Choice, RouteError> {
        let workers = self.snapshot_of(pool);
        let others: Vec<WorkerId> = workers.iter().map(|w| w.engine.worker_id()).filter(|&w| w != id).collect();
        if others.len() == workers.len() {
            return Err(RouteError::NotHere(id, pool.name()));
        }
        self.choose_in(pool, token_ids, media, adapter, &others)
    }

    /// Every worker's price for a prompt of `token_ids`, as `choose` would weigh it, with nothing charged and
    /// nothing recorded: for callers that compare workers before committing to one (a prefill/decode pair, an
    /// endpoint picker scoring its pods). Cost is the kv cost whatever the mode; lower is better.
    pub fn quote(&self, token_ids: &[u32], media: &[MediaSpan]) -> Vec<Quote> {
        let workers = self.snapshot();
        let (_, overlaps) = self.overlaps(token_ids, media);
        // Whole blocks, as the index counts them.
        let prompt_blocks = (token_ids.len() / self.config.block_size) as u32;
        workers
            .iter()
            .map(|worker| {
                let candidate = worker.candidate(&overlaps);
                Quote {
                    worker_id: worker.engine.worker_id(),
                    overlap_blocks: candidate.overlap_blocks,
                    cost: cost(&candidate, prompt_blocks, self.config.overlap_weight),
                    in_flight: candidate.in_flight,
                    open: worker.open(self.config.busy_threshold),
                }
            })
            .collect()
    }

    /// The prompt's block hashes (kv and latency modes only) and what each worker holds of them.
    fn overlaps(&self, token_ids: &[u32], media: &[MediaSpan]) -> (Vec<u64>, OverlapScores) {
        let hashes: Vec<u64> = match self.config.mode {
            RouterMode::Kv | RouterMode::Latency => {
                block_hashes_with_media(token_ids, self.config.block_size, media).iter().map(|b| b.sequence).collect()
            }
            _ => Vec::new(),
        };
        if let Some(approx) = &self.approx {
            approx.lock().unwrap_or_else(|p| p.into_inner()).expire(self.indexer.as_ref(), Instant::now());
        }
        let overlaps = if hashes.is_empty() { OverlapScores::default() } else { self.indexer.find_matches(&hashes) };
        (hashes, overlaps)
    }

    /// The open worker to send a prompt to, and in latency mode the time to first token predicted there.
    fn pick(
        &self,
        workers: &[Arc<Worker>],
        excluded: &[bool],
        overlaps: &OverlapScores,
        prompt: Prompt,
        limit: usize,
    ) -> Option<(usize, Option<f64>)> {
        let open: Vec<usize> = (0..workers.len()).filter(|&i| !excluded[i] && workers[i].open(limit)).collect();
        if open.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let load = |i: usize| &workers[i].load;
        let draw = || if self.config.temperature > 0.0 { rand::random::<f64>() } else { 0.0 };
        let chosen = match self.config.mode {
            RouterMode::RoundRobin => open[start % open.len()],
            RouterMode::Random => open[rand::random_range(0..open.len())],
            RouterMode::LeastLoaded => (0..open.len())
                .map(|k| open[(start + k) % open.len()])
                .min_by_key(|&i| load(i).in_flight.load(Ordering::Relaxed))?,
            RouterMode::Latency => match self.predictions(workers, &open, overlaps, prompt) {
                Some(predicted) => {
                    let in_flight: Vec<usize> =
                        open.iter().map(|&i| load(i).in_flight.load(Ordering::Relaxed)).collect();
                    let at = cheapest(&predicted, &in_flight, self.config.temperature, draw(), start)?;
                    return Some((open[at], Some(predicted[at])));
                }
                None => self.cheapest_kv(workers, &open, overlaps, prompt, start, draw())?,
            },
            RouterMode::Kv => self.cheapest_kv(workers, &open, overlaps, prompt, start, draw())?,
        };
        Some((chosen, None))
    }

    fn cheapest_kv(
        &self,
        workers: &[Arc<Worker>],
        open: &[usize],
        overlaps: &OverlapScores,
        prompt: Prompt,
        start: usize,
        draw: f64,
    ) -> Option<usize> {
        let candidates: Vec<Candidate> = open.iter().map(|&i| workers[i].candidate(overlaps)).collect();
        let at = choose(&candidates, prompt.blocks, self.config.overlap_weight, self.config.temperature, draw, start)?;
        Some(open[at])
    }

    /// Each open worker's predicted time to first token for the prompt, in `open`'s order. A worker that
    /// sent no profile is priced with another worker's of the same set (they serve one model, almost always
    /// on like hardware); `None` when none has one, and the kv cost decides instead (said once in the log).
    fn predictions(
        &self,
        workers: &[Arc<Worker>],
        open: &[usize],
        overlaps: &OverlapScores,
        prompt: Prompt,
    ) -> Option<Vec<f64>> {
        let Some(stand_in) = workers.iter().find_map(|w| w.profile.clone()) else {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::info!(
                    "latency routing: no worker sent a performance profile (start native workers with --profile \
                     FILE from `dynamo profile`); routing by the kv cost meanwhile"
                )
            });
            return None;
        };
        let block_size = self.config.block_size;
        let predicted = open
            .iter()
            .map(|&i| {
                let worker = &workers[i];
                let profile = worker.profile.as_deref().unwrap_or(&stand_in);
                let overlap = overlaps.of(worker.engine.worker_id());
                let new_tokens = uncached_tokens(prompt.tokens, overlap, block_size);
                predicted_ttft_ms(profile, &worker.backlog(block_size), new_tokens)
            })
            .collect();
        Some(predicted)
    }
}

/// A prompt's size, as the costs read it: tokens, and whole blocks the index can hold.
#[derive(Debug, Clone, Copy)]
struct Prompt {
    tokens: usize,
    blocks: u32,
}

/// The prompt tokens a worker holding `overlap_blocks` of them must compute.
fn uncached_tokens(prompt_tokens: usize, overlap_blocks: u32, block_size: usize) -> u64 {
    prompt_tokens.saturating_sub(overlap_blocks as usize * block_size) as u64
}

/// Feeds one engine's KV events into the index; a lag becomes `Cleared` and then the engine's state again.
fn spawn_feed(engine: &Arc<dyn Engine>, indexer: Arc<FlashIndexer>) -> tokio::task::JoinHandle<()> {
    let mut events = KvFollower::new(engine);
    tokio::spawn(async move {
        while let Some(batch) = events.next().await {
            indexer.apply_all(batch.worker_id, &batch.events);
        }
    })
}

/// One request's share of its worker's load, given back when the stream is dropped.
struct Account {
    load: Arc<WorkerLoad>,
    prefill_blocks: u64,
    prefill_tokens: u64,
    /// Counted in its worker's `prefilling` until its first output (or until it is known not to prefill).
    prefilling: bool,
    decode_blocks: u64,
    decoding: bool,
    generated: usize,
    block_size: usize,
    /// The time to first token latency mode predicted, checked against the first output's arrival.
    prediction: Option<Prediction>,
}

struct Prediction {
    predicted_ms: f64,
    sent: Instant,
    worker_id: WorkerId,
    metrics: Arc<crate::core::telemetry::Metrics>,
}

impl Account {
    fn observe(&mut self, output: &EngineOutput) {
        if !self.decoding {
            self.decoding = true;
            self.end_prefill();
            self.load.decode_blocks.fetch_add(self.decode_blocks, Ordering::Relaxed);
            if let Some(prediction) = self.prediction.take() {
                let observed = prediction.sent.elapsed().as_secs_f64();
                prediction.metrics.ttft_prediction(prediction.worker_id, prediction.predicted_ms / 1e3, observed);
            }
        }
        let before = self.generated / self.block_size;
        self.generated += output.token_ids.len();
        let grown = (self.generated / self.block_size - before) as u64;
        if grown > 0 {
            self.decode_blocks += grown;
            self.load.decode_blocks.fetch_add(grown, Ordering::Relaxed);
        }
    }
}

impl Account {
    /// Takes this request's prompt off its worker's prefill queue.
    fn end_prefill(&mut self) {
        if !std::mem::take(&mut self.prefilling) {
            return;
        }
        self.load.prefill_blocks.fetch_sub(std::mem::take(&mut self.prefill_blocks), Ordering::Relaxed);
        self.load.prefill_tokens.fetch_sub(std::mem::take(&mut self.prefill_tokens), Ordering::Relaxed);
        self.load.prefilling.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        if self.decoding {
            self.load.decode_blocks.fetch_sub(self.decode_blocks, Ordering::Relaxed);
        } else {
            self.end_prefill();
        }
        self.load.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One worker's price for a prompt (`Router::quote`).
#[derive(Debug, Clone, PartialEq)]
pub struct Quote {
    pub worker_id: WorkerId,
    /// Prompt blocks the index says the worker already holds.
    pub overlap_blocks: u32,
    pub cost: f64,
    pub in_flight: usize,
    /// Would take a request now (alive, under the busy threshold).
    pub open: bool,
}

/// A worker chosen for a request, and the load it was charged with until the request ends.
pub struct Choice {
    pub worker_id: WorkerId,
    /// Prompt blocks the index says the worker already holds.
    pub overlap_blocks: u32,
    worker: Arc<Worker>,
    account: Account,
}

impl Choice {
    /// For a request whose prompt a prefill worker computes: this worker will only decode it, so it is not
    /// charged with the prompt's prefill meanwhile (its blocks count once its first output comes).
    pub(super) fn without_prefill(&mut self) {
        let account = &mut self.account;
        if !account.decoding {
            account.end_prefill();
            // Its first token waits on another worker's prefill and the hand-off: not this worker's to predict.
            account.prediction = None;
        }
    }

    /// What the chosen worker's engine last said of its load.
    pub fn load(&self) -> crate::core::protocol::LoadMetrics {
        self.worker.engine.load()
    }

    /// Where the chosen worker's transfer agent listens, if it can hand KV over.
    pub fn transfer_addr(&self) -> Option<String> {
        self.worker.engine.transfer_addr()
    }

    /// Sends the request to the chosen worker; its stream carries the charge from here on.
    pub fn dispatch(self, request: PreprocessedRequest) -> Result<RoutedStream, RouteError> {
        let stream = self.worker.engine.submit(request)?;
        Ok(RoutedStream {
            stream,
            worker_id: self.worker_id,
            overlap_blocks: self.overlap_blocks,
            account: self.account,
        })
    }
}

/// An engine's stream that keeps its worker's account and gives it back when dropped.
pub struct RoutedStream {
    stream: ResponseStream,
    pub worker_id: WorkerId,
    /// Prompt blocks the index said the worker already held.
    pub overlap_blocks: u32,
    account: Account,
}

impl Stream for RoutedStream {
    type Item = EngineOutput;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EngineOutput>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_next(cx);
        if let Poll::Ready(Some(output)) = &polled {
            this.account.observe(output);
        }
        polled
    }
}

#[cfg(test)]
mod tests;
