//! Picks the worker for each request and keeps the router's own count of what it sent where.
//!
//! Here the policy is least-loaded by in-flight requests (ties rotate); the KV-aware cost function comes
//! with the indexer. The count is the router's own bookkeeping, exact between load reports: it rises when a
//! request is routed and falls when its stream is dropped. When every worker is at the busy threshold the
//! router refuses, so the frontend can answer 503 instead of queueing without bound. No lock is taken.
use crate::core::engine::{Engine, EngineError, ResponseStream};
use crate::core::protocol::{EngineOutput, PreprocessedRequest, WorkerId};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("every worker is at its limit of {threshold} in-flight requests; retry shortly")]
    Busy { threshold: usize },
    #[error("no worker is serving this model")]
    NoWorkers,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

struct Worker {
    engine: Arc<dyn Engine>,
    in_flight: Arc<AtomicUsize>,
}

pub struct Router {
    workers: Vec<Worker>,
    busy_threshold: usize,
    next: AtomicUsize,
}

impl Router {
    /// `busy_threshold`: in-flight requests per worker past which the router refuses new ones.
    pub fn new(engines: Vec<Arc<dyn Engine>>, busy_threshold: usize) -> Self {
        let workers = engines.into_iter().map(|engine| Worker { engine, in_flight: Arc::default() }).collect();
        Self { workers, busy_threshold: busy_threshold.max(1), next: AtomicUsize::new(0) }
    }

    pub fn engines(&self) -> impl Iterator<Item = &Arc<dyn Engine>> {
        self.workers.iter().map(|w| &w.engine)
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Requests routed and not yet finished, over all workers.
    pub fn in_flight(&self) -> usize {
        self.workers.iter().map(|w| w.in_flight.load(Ordering::Relaxed)).sum()
    }

    pub fn route(&self, request: PreprocessedRequest) -> Result<RoutedStream, RouteError> {
        let worker = self.claim()?;
        let guard = InFlight(worker.in_flight.clone());
        let stream = worker.engine.submit(request)?;
        Ok(RoutedStream { stream, worker_id: worker.engine.worker_id(), _in_flight: guard })
    }

    /// Takes one in-flight slot on the least-loaded worker that has one.
    fn claim(&self) -> Result<&Worker, RouteError> {
        let n = self.workers.len();
        if n == 0 {
            return Err(RouteError::NoWorkers);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for _ in 0..4 * n {
            let (worker, load) = (0..n)
                .map(|i| &self.workers[(start + i) % n])
                .map(|w| (w, w.in_flight.load(Ordering::Acquire)))
                .min_by_key(|(_, load)| *load)
                .ok_or(RouteError::NoWorkers)?;
            if load >= self.busy_threshold {
                break;
            }
            if worker.in_flight.compare_exchange(load, load + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return Ok(worker);
            }
        }
        Err(RouteError::Busy { threshold: self.busy_threshold })
    }
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An engine's stream that gives its in-flight slot back when dropped.
pub struct RoutedStream {
    stream: ResponseStream,
    pub worker_id: WorkerId,
    _in_flight: InFlight,
}

impl Stream for RoutedStream {
    type Item = EngineOutput;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EngineOutput>> {
        Pin::new(&mut self.stream).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::mocker::{MockerConfig, MockerEngine};
    use crate::core::protocol::{SamplingOptions, StopConditions};

    fn request() -> PreprocessedRequest {
        PreprocessedRequest {
            request_id: "r".into(),
            token_ids: vec![1, 2, 3],
            sampling: SamplingOptions::default(),
            stop: StopConditions { max_tokens: 1000, min_tokens: 0, stop_token_ids: vec![] },
            logprobs: None,
        }
    }

    fn router(workers: u64, threshold: usize) -> Router {
        let engines = (0..workers)
            .map(|id| Arc::new(MockerEngine::spawn(id, MockerConfig::default(), (10..20).collect())) as Arc<dyn Engine>)
            .collect();
        Router::new(engines, threshold)
    }

    #[tokio::test]
    async fn spreads_requests_over_the_least_loaded_workers() {
        let router = router(3, 10);
        let streams: Vec<_> = (0..6).map(|_| router.route(request()).unwrap()).collect();
        let mut per_worker = [0; 3];
        for s in &streams {
            per_worker[s.worker_id as usize] += 1;
        }
        assert_eq!(per_worker, [2, 2, 2]);
    }

    #[tokio::test]
    async fn refuses_past_the_busy_threshold_and_recovers_when_streams_end() {
        let router = router(2, 2);
        let mut streams: Vec<_> = (0..4).map(|_| router.route(request()).unwrap()).collect();
        assert!(matches!(router.route(request()), Err(RouteError::Busy { threshold: 2 })));
        streams.pop();
        assert_eq!(router.in_flight(), 3);
        assert!(router.route(request()).is_ok());
    }
}
