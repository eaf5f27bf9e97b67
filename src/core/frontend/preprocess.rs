//! Where a request's CPU work runs: parsing its JSON, rendering the chat template, tokenizing. Off the async
//! runtime (a long prompt takes seconds to tokenize and would stall every other connection meanwhile), on at
//! most `threads` blocking threads at once, with at most `queue` requests waiting; past that the frontend
//! answers 503 rather than pile up work it cannot start.
use super::error::ApiError;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Why work did not run.
#[derive(Debug)]
pub enum Refused {
    /// The queue was full: the request is turned away (503).
    Full(ApiError),
    Failed(ApiError),
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Full(error) | Refused::Failed(error) => error,
        }
    }
}

pub struct Preprocessor {
    threads: usize,
    queue: usize,
    /// Requests admitted: running or waiting.
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

/// Requests that may wait for a thread: more than the default connection cap, so that ordinary load (each
/// connection has one request at a time) never meets it; it bounds the queue if the cap is raised.
const QUEUE: usize = 4096;

impl Default for Preprocessor {
    /// A thread per CPU.
    fn default() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()), QUEUE)
    }
}

impl Preprocessor {
    pub fn new(threads: usize, queue: usize) -> Self {
        let threads = threads.max(1);
        Self {
            threads,
            queue,
            admitted: Arc::new(Semaphore::new(threads + queue)),
            running: Arc::new(Semaphore::new(threads)),
        }
    }

    /// Runs `work` on a blocking thread once one of ours is free, or refuses at once when the queue is full.
    /// The slots stay taken until `work` returns, even if the caller stops waiting: a running tokenization
    /// cannot be interrupted, so it still counts.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Refused> {
        let admitted = self.admitted.clone().try_acquire_owned().map_err(|_| {
            Refused::Full(ApiError::unavailable(format!(
                "{} requests are already waiting to be tokenized on {} threads; retry shortly",
                self.queue, self.threads
            )))
        })?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refused::Failed(ApiError::internal("the tokenizer pool was closed")))?;
        tokio::task::spawn_blocking(move || {
            let out = work();
            drop((running, admitted));
            out
        })
        .await
        .map_err(|e| Refused::Failed(ApiError::internal(format!("preprocessing the request failed: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[tokio::test]
    async fn past_the_queue_requests_are_refused_and_slots_come_back() {
        let pool = Arc::new(Preprocessor::new(1, 1));
        let (release, wait) = mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel();
        let first = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(move || {
                    let _ = started.send(());
                    wait.recv().ok()
                })
                .await
            }
        });
        running.await.unwrap();
        // One runs, one waits: a third is refused.
        let second = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(|| 2).await }
        });
        while pool.admitted.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let Err(Refused::Full(refused)) = pool.run(|| 3).await else { panic!("a third is turned away") };
        assert_eq!(refused.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.message.contains("waiting to be tokenized"), "{}", refused.message);
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), Some(()));
        assert_eq!(second.await.unwrap().unwrap(), 2);
        assert_eq!(pool.run(|| 4).await.unwrap(), 4);
    }
}
