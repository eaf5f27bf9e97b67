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
use super::scheduler::{Executor, Scheduler, SeqId};
use super::{Engine, EngineError, KvLedger, ResponseStream};
use crate::core::protocol::{EngineOutput, KvEvent, KvEventBatch, LoadMetrics, PreprocessedRequest, WorkerId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

/// How far behind its deadline a simulated loop may fall before it stops trying to catch up (e.g. after a stall).
const MAX_LAG: Duration = Duration::from_millis(20);
const EVENT_BUFFER: usize = 4096;

struct Submission {
    request: PreprocessedRequest,
    outputs: mpsc::UnboundedSender<EngineOutput>,
}

pub struct BatchEngine {
    worker_id: WorkerId,
    inbox: mpsc::UnboundedSender<Submission>,
    load: Arc<Mutex<LoadMetrics>>,
    events: Publisher,
    max_sequence_tokens: usize,
    kv_memory: Option<super::KvMemory>,
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
        let (inbox, receiver) = mpsc::unbounded_channel();
        let load = Arc::new(Mutex::new(scheduler.load()));
        let events = Publisher { sender: broadcast::channel(EVENT_BUFFER).0, ledger: Arc::default() };
        let worker =
            Worker { worker_id, scheduler: Some(scheduler), receiver, load: load.clone(), events: events.clone() };
        tokio::spawn(worker.run(pacing));
        Self { worker_id, inbox, load, events, max_sequence_tokens, kv_memory }
    }
}

impl Engine for BatchEngine {
    fn worker_id(&self) -> WorkerId {
        self.worker_id
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        super::check_fits(&request, self.max_sequence_tokens)?;
        let (outputs, receiver) = mpsc::unbounded_channel();
        self.inbox.send(Submission { request, outputs }).map_err(|_| EngineError::Stopped)?;
        Ok(ResponseStream::new(receiver))
    }

    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch> {
        self.events.sender.subscribe()
    }

    fn resend_kv_state(&self) -> bool {
        self.events.resend(self.worker_id);
        true
    }

    fn kv_memory(&self) -> Option<super::KvMemory> {
        self.kv_memory.clone()
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
    receiver: mpsc::UnboundedReceiver<Submission>,
    load: Arc<Mutex<LoadMetrics>>,
    events: Publisher,
}

impl<X: Executor> Worker<X> {
    async fn run(mut self, pacing: Pacing) {
        let Some(mut scheduler) = self.scheduler.take() else {
            return;
        };
        let mut streams: HashMap<SeqId, mpsc::UnboundedSender<EngineOutput>> = HashMap::new();
        let mut next_id: SeqId = 0;
        let mut deadline = Instant::now();
        loop {
            if scheduler.is_idle() {
                self.publish_load(&scheduler);
                let Some(submission) = self.receiver.recv().await else {
                    return;
                };
                accept(&mut scheduler, submission, &mut next_id, &mut streams);
                deadline = Instant::now();
            }
            while let Ok(submission) = self.receiver.try_recv() {
                accept(&mut scheduler, submission, &mut next_id, &mut streams);
            }
            streams.retain(|id, sender| {
                let open = !sender.is_closed();
                if !open {
                    scheduler.abort(*id);
                }
                open
            });
            if scheduler.is_idle() {
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
            for (id, output) in outcome.outputs {
                let finished = output.finish_reason.is_some();
                let delivered = streams.get(&id).is_some_and(|s| s.send(output).is_ok());
                if finished || !delivered {
                    streams.remove(&id);
                    if !finished {
                        scheduler.abort(id);
                    }
                }
            }
            self.publish_load(&scheduler);
        }
    }

    fn publish_load(&self, scheduler: &Scheduler<X>) {
        *self.load.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = scheduler.load();
    }
}

fn accept<X: Executor>(
    scheduler: &mut Scheduler<X>,
    submission: Submission,
    next_id: &mut SeqId,
    streams: &mut HashMap<SeqId, mpsc::UnboundedSender<EngineOutput>>,
) {
    let id = *next_id;
    *next_id += 1;
    let sampling = &submission.request.sampling;
    // Greedy output depends on the tokens alone; sampled output on the seed, random when none is given.
    let seed = if sampling.temperature == 0.0 { 0 } else { sampling.seed.unwrap_or_else(rand::random) };
    scheduler.add(id, &submission.request, seed);
    streams.insert(id, submission.outputs);
}
