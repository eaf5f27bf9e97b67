//! Requests that outlive their worker. A stream that ends without a finish reason means the worker was lost
//! (killed, its machine gone, its heartbeat silent) or refused the request as busy before starting it; the
//! request continues on another worker (never one that already failed it) with the tokens generated so far
//! appended to the prompt and `max_tokens` reduced by them, up to the router's `migration_limit`. The client sees one uninterrupted stream; with greedy sampling (or the mocker's
//! deterministic tokens) exactly the tokens an uninterrupted run would give, because the continuation's
//! prompt is the same sequence.
use super::{RouteError, RoutedStream, Router};
use crate::core::protocol::{EngineOutput, PreprocessedRequest, WorkerId};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

pub struct MigratingStream {
    router: Arc<Router>,
    request: PreprocessedRequest,
    generated: Vec<u32>,
    migrations_left: u32,
    current: RoutedStream,
    /// Workers that lost or refused this request.
    failed: Vec<WorkerId>,
    /// Prompt blocks the first worker already held.
    pub overlap_blocks: u32,
    sent_first: bool,
}

impl Router {
    /// Routes like `route`, and continues the request elsewhere if its worker is lost mid-stream.
    pub fn route_migrating(self: &Arc<Self>, request: PreprocessedRequest) -> Result<MigratingStream, RouteError> {
        let current = self.route(request.clone())?;
        Ok(MigratingStream {
            router: self.clone(),
            overlap_blocks: current.overlap_blocks,
            migrations_left: self.config.migration_limit,
            request,
            generated: Vec::new(),
            current,
            failed: Vec::new(),
            sent_first: false,
        })
    }
}

impl MigratingStream {
    /// The request that continues where the lost worker stopped, if there is anything left to generate.
    fn continuation(&self) -> Option<PreprocessedRequest> {
        let done = self.generated.len() as u32;
        let mut next = self.request.clone();
        next.stop.max_tokens = next.stop.max_tokens.checked_sub(done).filter(|&left| left > 0)?;
        next.stop.min_tokens = next.stop.min_tokens.saturating_sub(done);
        next.token_ids.extend_from_slice(&self.generated);
        Some(next)
    }
}

impl Stream for MigratingStream {
    type Item = EngineOutput;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EngineOutput>> {
        let this = &mut *self;
        loop {
            match Pin::new(&mut this.current).poll_next(cx) {
                Poll::Ready(Some(mut output)) => {
                    this.generated.extend_from_slice(&output.token_ids);
                    if this.sent_first {
                        // The continuation's prompt hits its own cache; the client asked about the original.
                        output.cached_tokens = None;
                    }
                    this.sent_first = true;
                    return Poll::Ready(Some(output));
                }
                Poll::Ready(None) => {
                    if this.migrations_left == 0 {
                        return Poll::Ready(None);
                    }
                    this.migrations_left -= 1;
                    let Some(next) = this.continuation() else { return Poll::Ready(None) };
                    let lost = this.current.worker_id;
                    this.failed.push(lost);
                    match this.router.route_avoiding(next, &this.failed) {
                        Ok(stream) => {
                            tracing::warn!(
                                request = %this.request.request_id,
                                "worker {lost:016x} was lost or busy after {} tokens; continuing on worker {:016x}",
                                this.generated.len(),
                                stream.worker_id
                            );
                            this.current = stream;
                        }
                        Err(error) => {
                            tracing::warn!(request = %this.request.request_id, "cannot migrate: {error}");
                            return Poll::Ready(None);
                        }
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
