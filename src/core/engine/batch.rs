//! An `Engine` made of a `Scheduler` and its `Executor`: one tokio task per worker that owns both.
//!
//! The task sleeps while idle (never spins), and otherwise loops:
//! 1. take new requests; abort those whose client dropped the stream;
//! 2. run one scheduler step: inline when the executor is cheap (mocker), on tokio's blocking pool when it
//!    computes for real (native), so the runtime's threads stay free for I/O;
//! 3. when the executor simulates time, sleep it divided by `speedup` (measured from a running deadline, so
//!    timer granularity does not add up across steps);
//! 4. publish the step's KV events, send each request its token, update the load snapshot.
//!
//! The published events are also recorded in a `KvLedger`, so a subscriber that lagged can have the whole
//! state sent again (`resend_kv_state`), and a worker can answer a router's snapshot request (`kv_snapshot`).
use super::scheduler::{ArrivalPages, Executor, HandOffError, Scheduler, SeqId};
use super::{ArrivingPages, Engine, EngineError, KvLedger, KvMemory, KvPages, ResponseStream};
use crate::core::grammar::{Compiler, GrammarError};
use crate::core::protocol::{EngineOutput, HandOff, KvEvent, KvEventBatch, LoadMetrics, PreprocessedRequest, WorkerId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

/// How far behind its deadline a simulated loop may fall before it stops trying to catch up (e.g. after a stall).
const MAX_LAG: Duration = Duration::from_millis(20);
const EVENT_BUFFER: usize = 4096;

struct Submission {
    id: SeqId,
    request: PreprocessedRequest,
    outputs: mpsc::UnboundedSender<EngineOutput>,
    hand_off: Shared,
}

/// What a request does with KV shared with a peer worker.
enum Shared {
    None,
    /// Keep its pages for this long once finished.
    Hold(Duration),
    /// Its first tokens' KV comes from a peer; the pages to write it to are sent back.
    Arriving {
        from_peer: usize,
        wait: Duration,
        pages: oneshot::Sender<Result<ArrivalPages, HandOffError>>,
    },
}

/// What the engine's task is asked to do.
// Submissions are most commands, one per request: boxing them would add an allocation to each.
#[allow(clippy::large_enum_variant)]
enum Command {
    Submit(Submission),
    /// The peer's KV for a request landed (true) or will not come (false).
    Arrived(SeqId, bool),
    ReleaseLease(SeqId),
    /// Structured output's compiler, given once before the first request.
    Grammars(Compiler),
}

pub struct BatchEngine {
    worker_id: WorkerId,
    inbox: mpsc::UnboundedSender<Command>,
    next_id: std::sync::atomic::AtomicU64,
    load: Arc<Mutex<LoadMetrics>>,
    events: Publisher,
    max_sequence_tokens: usize,
    kv_memory: Option<super::KvMemory>,
    embeddings: Option<Arc<crate::core::multimodal::EmbeddingCache>>,
    profile: Option<Arc<crate::core::protocol::profile::Profile>>,
    /// Checks a request's constraint before it is queued; `None` refuses constrained requests.
    grammars: Option<Compiler>,
    device: String,
}

/// The engine's KV events: the broadcast, and the ledger of what it has said, kept under one lock so that a
/// resent state lands in order between two steps' events.
#[derive(Clone)]
struct Publisher {
    sender: broadcast::Sender<KvEventBatch>,
    ledger: Arc<Mutex<KvLedger>>,
}

impl Publisher {
    fn publish(&self, batch: KvEventBatch) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        ledger.record(&batch.events);
        // No subscriber is fine: events are for whoever listens.
        let _ = self.sender.send(batch);
    }

    fn resend(&self, worker_id: WorkerId) {
        let ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let events = std::iter::once(KvEvent::Cleared).chain(ledger.snapshot()).collect();
        let _ = self.sender.send(KvEventBatch { worker_id, events });
    }
}

/// How the task treats the executor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// Run steps on the blocking pool (they take real CPU time).
    pub blocking: bool,
    /// Simulated time runs this many times faster than real time.
    pub speedup: f64,
}

impl BatchEngine {
    /// Says how fast it is (`Engine::profile`): the mocker knows from its fit, the native engine from a
    /// profile measured earlier.
    pub fn with_profile(mut self, profile: crate::core::protocol::profile::Profile) -> Self {
        self.profile = Some(Arc::new(profile));
        self
    }

    /// Lets requests constrain their output (structured output) by the model whose vocabulary this is.
    pub fn with_grammars(mut self, grammars: Compiler) -> Self {
        // The task is only gone if it panicked; then submissions fail as `Stopped` anyway.
        let _ = self.inbox.send(Command::Grammars(grammars.clone()));
        self.grammars = Some(grammars);
        self
    }

    /// Starts the engine's task on the current tokio runtime. `max_sequence_tokens` also counts the model's
    /// context limit, not only the KV cache's.
    pub fn spawn<X: Executor>(
        worker_id: WorkerId,
        scheduler: Scheduler<X>,
        pacing: Pacing,
        max_sequence_tokens: usize,
    ) -> Self {
        let max_sequence_tokens = max_sequence_tokens.min(scheduler.max_sequence_tokens());
        let kv_memory = scheduler.executor().kv_memory();
        let embeddings = scheduler.executor().embedding_cache();
        let device = scheduler.executor().device();
        let (inbox, receiver) = mpsc::unbounded_channel();
        let load = Arc::new(Mutex::new(scheduler.load()));
        let events = Publisher { sender: broadcast::channel(EVENT_BUFFER).0, ledger: Arc::default() };
        let worker = Worker {
            worker_id,
            scheduler: Some(scheduler),
            receiver,
            load: load.clone(),
            events: events.clone(),
            memory: None,
        };
        tokio::spawn(worker.run(pacing));
        Self {
            worker_id,
            inbox,
            next_id: 0.into(),
            load,
            events,
            max_sequence_tokens,
            kv_memory,
            embeddings,
            profile: None,
            grammars: None,
            device,
        }
    }

    fn submit_with(
        &self,
        request: PreprocessedRequest,
        hand_off: Shared,
    ) -> Result<(SeqId, ResponseStream), EngineError> {
        super::check_fits(&request, self.max_sequence_tokens)?;
        super::check_adapter(&request, Vec::new)?;
        if let Some(constraint) = &request.constraint {
            // Compiled here, on the caller's thread, so a bad one is refused at once and the engine's task
            // finds it in the cache.
            let grammars = self.grammars.as_ref().ok_or(GrammarError::Unavailable).and_then(Compiler::grammars);
            grammars
                .and_then(|grammars| grammars.compile(constraint))
                .map_err(|e| EngineError::InvalidRequest(format!("structured output: {e}")))?;
        }
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (outputs, receiver) = mpsc::unbounded_channel();
        let submission = Submission { id, request, outputs, hand_off };
        self.inbox.send(Command::Submit(submission)).map_err(|_| EngineError::Stopped)?;
        Ok((id, ResponseStream::new(receiver)))
    }
}

impl KvPages for BatchEngine {
    fn memory(&self) -> &KvMemory {
        // `Engine::kv_pages` offers this only to engines that have movable pages.
        self.kv_memory.as_ref().unwrap_or(&NO_MEMORY)
    }

    fn submit_holding(
        &self,
        request: PreprocessedRequest,
        lease: Duration,
    ) -> Result<(SeqId, ResponseStream), EngineError> {
        self.submit_with(request, Shared::Hold(lease))
    }

    fn submit_arriving(
        &self,
        request: PreprocessedRequest,
        from_peer: usize,
        wait: Duration,
    ) -> Result<(SeqId, ArrivingPages, ResponseStream), EngineError> {
        let (pages, reply) = oneshot::channel();
        let (id, stream) = self.submit_with(request, Shared::Arriving { from_peer, wait, pages })?;
        let pages = Box::pin(async move {
            match reply.await {
                Ok(Ok(pages)) => Ok(pages),
                Ok(Err(refused)) => Err(EngineError::InvalidRequest(refused.to_string())),
                Err(_) => Err(EngineError::Stopped),
            }
        });
        Ok((id, pages, stream))
    }

    fn arrived(&self, id: SeqId, landed: bool) -> Result<(), EngineError> {
        self.inbox.send(Command::Arrived(id, landed)).map_err(|_| EngineError::Stopped)
    }

    fn release_lease(&self, id: SeqId) -> Result<(), EngineError> {
        self.inbox.send(Command::ReleaseLease(id)).map_err(|_| EngineError::Stopped)
    }
}

static NO_MEMORY: KvMemory = KvMemory { regions: Vec::new(), pages: 0, page_bytes: 0, block_size: 0, simulated: None };

impl Engine for BatchEngine {
    fn worker_id(&self) -> WorkerId {
        self.worker_id
    }

    fn device(&self) -> String {
        self.device.clone()
    }

    fn profile(&self) -> Option<Arc<crate::core::protocol::profile::Profile>> {
        self.profile.clone()
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        if request.hand_off != HandOff::None {
            return Err(EngineError::InvalidRequest(
                "this worker has no transfer agent, so it can neither hold KV for a peer nor read it from one; start \
                 it with --kv-transfer (or as `dynamo prefill`)"
                    .into(),
            ));
        }
        self.submit_with(request, Shared::None).map(|(_, stream)| stream)
    }

    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch> {
        self.events.sender.subscribe()
    }

    fn resend_kv_state(&self) -> bool {
        self.events.resend(self.worker_id);
        true
    }

    fn kv_pages(&self) -> Option<&dyn KvPages> {
        self.kv_memory.as_ref().map(|_| self as &dyn KvPages)
    }

    fn embeddings(&self) -> Option<Arc<crate::core::multimodal::EmbeddingCache>> {
        self.embeddings.clone()
    }

    fn kv_snapshot(&self) -> Option<Vec<KvEvent>> {
        Some(self.events.ledger.lock().unwrap_or_else(|p| p.into_inner()).snapshot())
    }

    fn load(&self) -> LoadMetrics {
        *self.load.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Worker<X: Executor> {
    worker_id: WorkerId,
    /// Taken while a step runs on the blocking pool.
    scheduler: Option<Scheduler<X>>,
    receiver: mpsc::UnboundedReceiver<Command>,
    load: Arc<Mutex<LoadMetrics>>,
    events: Publisher,
    /// The device's memory use and when it was read: at most once a `MEMORY_EVERY`, since a read costs a
    /// system call (or a driver call) and load is published after every step.
    memory: Option<(Instant, Option<(u64, u64)>)>,
}

const MEMORY_EVERY: Duration = Duration::from_secs(1);

impl<X: Executor> Worker<X> {
    async fn run(mut self, pacing: Pacing) {
        let Some(mut scheduler) = self.scheduler.take() else {
            return;
        };
        let mut streams: HashMap<SeqId, mpsc::UnboundedSender<EngineOutput>> = HashMap::new();
        let mut deadline = Instant::now();
        self.refresh_memory(&scheduler);
        loop {
            // Sequences waiting for a peer's KV and pages held for one are no work: wait for a command (or
            // for the next lease to expire).
            if !scheduler.has_work() {
                self.refresh_memory(&scheduler);
                self.publish_load(&scheduler);
                let command = match scheduler.next_deadline() {
                    Some(expiry) => tokio::select! {
                        command = self.receiver.recv() => command,
                        _ = tokio::time::sleep_until(Instant::from_std(expiry)) => {
                            scheduler.expire(std::time::Instant::now());
                            continue;
                        }
                    },
                    None => self.receiver.recv().await,
                };
                let Some(command) = command else { return };
                obey(&mut scheduler, command, &mut streams);
                deadline = Instant::now();
            }
            while let Ok(command) = self.receiver.try_recv() {
                obey(&mut scheduler, command, &mut streams);
            }
            streams.retain(|id, sender| {
                let open = !sender.is_closed();
                if !open {
                    scheduler.abort(*id);
                }
                open
            });
            if !scheduler.has_work() {
                continue;
            }

            let outcome = if pacing.blocking {
                let stepped = tokio::task::spawn_blocking(move || {
                    let outcome = scheduler.step();
                    (scheduler, outcome)
                })
                .await;
                match stepped {
                    Ok((returned, outcome)) => {
                        scheduler = returned;
                        outcome
                    }
                    Err(e) => {
                        // The streams close as `streams` drops, so every client sees its request end.
                        tracing::error!(worker = self.worker_id, "engine step panicked; this worker stops: {e}");
                        return;
                    }
                }
            } else {
                scheduler.step()
            };
            if outcome.simulated_ms > 0.0 {
                deadline += Duration::from_secs_f64(outcome.simulated_ms / 1000.0 / pacing.speedup);
                let now = Instant::now();
                if deadline > now {
                    tokio::time::sleep_until(deadline).await;
                } else {
                    if now - deadline > MAX_LAG {
                        deadline = now;
                    }
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::task::yield_now().await;
            }

            // Events first: a router that sees a request finish should already know what it left cached.
            let events = scheduler.drain_events();
            if !events.is_empty() {
                self.events.publish(KvEventBatch { worker_id: self.worker_id, events });
            }
            // Load too: whoever sees a request finish should see the pages it left held (a prefill's lease).
            self.publish_load(&scheduler);
            let mut aborted = false;
            for (id, output) in outcome.outputs {
                let finished = output.finish_reason.is_some();
                let delivered = streams.get(&id).is_some_and(|s| s.send(output).is_ok());
                if finished || !delivered {
                    streams.remove(&id);
                    if !finished {
                        scheduler.abort(id);
                        aborted = true;
                    }
                }
            }
            if aborted {
                self.publish_load(&scheduler);
            }
            // Read after the outputs went out, so the system call never delays a token.
            self.refresh_memory(&scheduler);
        }
    }

    fn refresh_memory(&mut self, scheduler: &Scheduler<X>) {
        let now = Instant::now();
        if self.memory.is_none_or(|(at, _)| now.duration_since(at) >= MEMORY_EVERY) {
            self.memory = Some((now, scheduler.executor().memory_use()));
        }
    }

    fn publish_load(&mut self, scheduler: &Scheduler<X>) {
        let mut load = scheduler.load();
        if let Some((_, Some((used, total)))) = self.memory {
            (load.device_memory_used, load.device_memory_total) = (used, total);
        }
        *self.load.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = load;
    }
}

fn obey<X: Executor>(
    scheduler: &mut Scheduler<X>,
    command: Command,
    streams: &mut HashMap<SeqId, mpsc::UnboundedSender<EngineOutput>>,
) {
    let submission = match command {
        Command::Submit(submission) => submission,
        Command::Arrived(id, true) => {
            scheduler.arrived(id);
            return;
        }
        Command::Arrived(id, false) => {
            scheduler.arrival_failed(id);
            return;
        }
        Command::ReleaseLease(id) => {
            scheduler.release_lease(id);
            return;
        }
        Command::Grammars(grammars) => {
            scheduler.set_grammars(grammars);
            return;
        }
    };
    let Submission { id, request, outputs, hand_off } = submission;
    let sampling = &request.sampling;
    // Greedy output depends on the tokens alone; sampled output on the seed, random when none is given.
    let seed = if sampling.temperature == 0.0 { 0 } else { sampling.seed.unwrap_or_else(rand::random) };
    match hand_off {
        Shared::None => scheduler.add(id, &request, seed),
        Shared::Hold(lease) => scheduler.add_holding(id, &request, seed, lease),
        Shared::Arriving { from_peer, wait, pages } => {
            let added = scheduler.add_arriving(id, &request, seed, from_peer, wait);
            if added.is_err() {
                // No room for the peer's KV now: the request queues as any other and computes its prompt here.
                scheduler.add(id, &request, seed);
            }
            // The asker may be gone; then its stream is closed and the next pass aborts the request.
            let _ = pages.send(added);
        }
    }
    streams.insert(id, outputs);
}
