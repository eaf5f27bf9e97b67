//! The mocker: a simulated vLLM-style engine with real KV bookkeeping and fitted step timing, for testing
//! routers and planners at scale without a GPU. Many run in one process (`dynamo run --workers 64`).
//!
//! Each mocker is one tokio task owning a `Scheduler`. It sleeps while idle (never spins), and otherwise loops:
//! 1. take new requests; abort those whose client dropped the stream;
//! 2. run one scheduler step and sleep its simulated duration divided by `speedup` (sleeps are measured
//!    from a running deadline, so timer granularity does not add up across steps);
//! 3. publish the step's KV events, send each request its token, update the load snapshot.
pub mod kv;
mod scheduler;
pub mod timing;

pub use scheduler::{Scheduler, SchedulerConfig, SeqId, StepOutcome};

use super::{Engine, EngineError, ResponseStream};
use crate::core::protocol::{EngineOutput, KvEventBatch, LoadMetrics, PreprocessedRequest, WorkerId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub struct MockerConfig {
    pub scheduler: SchedulerConfig,
    /// Simulated time runs this many times faster than real time.
    pub speedup: f64,
}

impl Default for MockerConfig {
    fn default() -> Self {
        Self { scheduler: SchedulerConfig::default(), speedup: 1.0 }
    }
}

/// How far behind its deadline the loop may fall before it stops trying to catch up (e.g. after a stall).
const MAX_LAG: Duration = Duration::from_millis(20);
const EVENT_BUFFER: usize = 4096;

struct Submission {
    request: PreprocessedRequest,
    outputs: mpsc::UnboundedSender<EngineOutput>,
}

pub struct MockerEngine {
    worker_id: WorkerId,
    inbox: mpsc::UnboundedSender<Submission>,
    load: Arc<Mutex<LoadMetrics>>,
    events: broadcast::Sender<KvEventBatch>,
    max_sequence_tokens: usize,
}

impl MockerEngine {
    /// Starts the engine's task on the current tokio runtime. `vocab` lists the token ids it samples from.
    pub fn spawn(worker_id: WorkerId, config: MockerConfig, vocab: Arc<[u32]>) -> Self {
        let scheduler = Scheduler::new(config.scheduler.clone(), vocab);
        let max_sequence_tokens = scheduler.max_sequence_tokens();
        let (inbox, receiver) = mpsc::unbounded_channel();
        let load = Arc::new(Mutex::new(scheduler.load()));
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let worker = Worker { worker_id, scheduler, receiver, load: load.clone(), events: events.clone(), config };
        tokio::spawn(worker.run());
        Self { worker_id, inbox, load, events, max_sequence_tokens }
    }
}

impl Engine for MockerEngine {
    fn worker_id(&self) -> WorkerId {
        self.worker_id
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        let needed = request.token_ids.len() + request.stop.max_tokens as usize;
        if request.token_ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt has no tokens".into()));
        }
        if needed > self.max_sequence_tokens {
            return Err(EngineError::InvalidRequest(format!(
                "prompt plus max_tokens is {needed} tokens but this worker's KV cache holds {}",
                self.max_sequence_tokens
            )));
        }
        let (outputs, receiver) = mpsc::unbounded_channel();
        self.inbox.send(Submission { request, outputs }).map_err(|_| EngineError::Stopped)?;
        Ok(ResponseStream::new(receiver))
    }

    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch> {
        self.events.subscribe()
    }

    fn load(&self) -> LoadMetrics {
        *self.load.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Worker {
    worker_id: WorkerId,
    scheduler: Scheduler,
    receiver: mpsc::UnboundedReceiver<Submission>,
    load: Arc<Mutex<LoadMetrics>>,
    events: broadcast::Sender<KvEventBatch>,
    config: MockerConfig,
}

impl Worker {
    async fn run(mut self) {
        let mut streams: HashMap<SeqId, mpsc::UnboundedSender<EngineOutput>> = HashMap::new();
        let mut next_id: SeqId = 0;
        let mut deadline = Instant::now();
        loop {
            if self.scheduler.is_idle() {
                self.publish_load();
                let Some(submission) = self.receiver.recv().await else {
                    return;
                };
                self.accept(submission, &mut next_id, &mut streams);
                deadline = Instant::now();
            }
            while let Ok(submission) = self.receiver.try_recv() {
                self.accept(submission, &mut next_id, &mut streams);
            }
            streams.retain(|id, sender| {
                let open = !sender.is_closed();
                if !open {
                    self.scheduler.abort(*id);
                }
                open
            });
            if self.scheduler.is_idle() {
                continue;
            }

            let outcome = self.scheduler.step();
            deadline += Duration::from_secs_f64(outcome.duration_ms / 1000.0 / self.config.speedup);
            let now = Instant::now();
            if deadline > now {
                tokio::time::sleep_until(deadline).await;
            } else {
                if now - deadline > MAX_LAG {
                    deadline = now;
                }
                tokio::task::yield_now().await;
            }

            // Events first: a router that sees a request finish should already know what it left cached.
            let events = self.scheduler.drain_events();
            if !events.is_empty() {
                // No subscriber is fine: events are for whoever listens.
                let _ = self.events.send(KvEventBatch { worker_id: self.worker_id, events });
            }
            for (id, output) in outcome.outputs {
                let finished = output.finish_reason.is_some();
                let delivered = streams.get(&id).is_some_and(|s| s.send(output).is_ok());
                if finished || !delivered {
                    streams.remove(&id);
                    if !finished {
                        self.scheduler.abort(id);
                    }
                }
            }
            self.publish_load();
        }
    }

    fn accept(
        &mut self,
        submission: Submission,
        next_id: &mut SeqId,
        streams: &mut HashMap<SeqId, mpsc::UnboundedSender<EngineOutput>>,
    ) {
        let id = *next_id;
        *next_id += 1;
        let sampling = &submission.request.sampling;
        // Greedy output depends on the tokens alone; sampled output on the seed, random when none is given.
        let seed = if sampling.temperature == 0.0 { 0 } else { sampling.seed.unwrap_or_else(rand::random) };
        self.scheduler.add(id, &submission.request, seed);
        streams.insert(id, submission.outputs);
    }

    fn publish_load(&self) {
        *self.load.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = self.scheduler.load();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::FinishReason;
    use futures::StreamExt;

    fn request(tokens: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
        PreprocessedRequest::greedy("r", tokens, max_tokens)
    }

    fn fast_engine() -> MockerEngine {
        MockerEngine::spawn(1, MockerConfig { speedup: 1000.0, ..Default::default() }, (10..500).collect())
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
            + (1..max_tokens).map(|i| timing::decode_ms(prompt + i)).sum::<f64>())
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
