//! Requests that outlive their worker. A stream that ends without a finish reason means the worker was lost
//! (killed, its machine gone, its heartbeat silent) or refused the request as busy before starting it; the
//! request continues on another worker (never one that already failed it) with the tokens generated so far
//! appended to the prompt and `max_tokens` reduced by them, up to the router's `migration_limit`. The client sees one uninterrupted stream; with greedy sampling (or the mocker's
//! deterministic tokens) exactly the tokens an uninterrupted run would give, because the continuation's
//! prompt is the same sequence.
//!
//! Disaggregated serving is a planned migration: the request starts on a prefill worker that generates the
//! first token and holds the prompt's KV; its continuation goes to the decode worker chosen up front, told
//! where that KV is. A prefill worker lost or refusing hands the whole request to the decode worker instead.
use super::{Choice, Disagg, Pool, RouteError, RoutedStream, Router};
use crate::core::protocol::{
    EngineOutput, FinishReason, HandOff, HeldKv, PreprocessedRequest, StopConditions, WorkerId,
};
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
    /// Whether `current` continues tokens another part generated: its prompt hits its own cache, so the
    /// cached count it reports is not the client's (the first part's, on whichever output it came).
    continues: bool,
    /// While a prefill worker computes the prompt: the decode worker that continues, and where the prefill
    /// worker's agent listens.
    prefilling: Option<(Choice, String)>,
}

/// Workers a request names for itself (`x-worker-instance-id`, `x-prefill-instance-id`: an endpoint
/// picker's choice, made in front of this router): it goes to them rather than to the router's own choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pins {
    /// The worker that decodes it (and, with no prefill worker named, prefills it too).
    pub decode: Option<WorkerId>,
    /// The prefill worker that computes its prompt, whose KV the decode worker then reads.
    pub prefill: Option<WorkerId>,
}

impl Router {
    /// Routes like `route`, and continues the request elsewhere if its worker is lost mid-stream.
    /// With prefill workers up, the prompt may be prefilled on one of them first (`disagg`).
    /// With encode workers up, an encode worker may compute the request's images first (`encode`).
    pub async fn route_migrating(
        self: &Arc<Self>,
        request: PreprocessedRequest,
    ) -> Result<MigratingStream, RouteError> {
        self.route_pinned(request, Pins::default()).await
    }

    /// `route_migrating` to the workers `pins` names, where it names them. A named decode worker that is not
    /// here is an error; a named prefill worker that is not here (or busy) leaves the prompt to the decode
    /// worker, counted as a fallback, and one that cannot hand its KV to the decode worker as unsupported. A named decode worker with no prefill
    /// worker named prefills the prompt itself: the picker that named it decided so.
    pub async fn route_pinned(
        self: &Arc<Self>,
        mut request: PreprocessedRequest,
        pins: Pins,
    ) -> Result<MigratingStream, RouteError> {
        let (media, adapter) = (request.media_spans(), request.adapter.clone());
        let adapter = adapter.as_deref();
        let mut decode = match pins.decode {
            Some(id) => self.choose_pinned(Pool::Decode, id, &request.token_ids, &media, adapter)?,
            None => self.choose_in(Pool::Decode, &request.token_ids, &media, adapter, &[])?,
        };
        let prefill = match (pins.prefill, pins.decode) {
            (Some(id), _) => match self.choose_pinned(Pool::Prefill, id, &request.token_ids, &media, adapter) {
                Ok(prefill) if super::disagg::same_transfer(&prefill, &decode) => {
                    self.record(Disagg::Remote);
                    Some(prefill)
                }
                Ok(_) => {
                    self.record(Disagg::Unsupported);
                    None
                }
                Err(_) => {
                    self.record(Disagg::Fallback);
                    None
                }
            },
            (None, Some(_)) => None,
            (None, None) => self.prefill_choice(&request, &decode),
        };
        self.encode_images(&mut request, prefill.as_ref().unwrap_or(&decode)).await;
        let (current, prefilling) = match prefill {
            None => (decode.dispatch(request.clone())?, None),
            Some(prefill) => {
                let agent = prefill.transfer_addr().unwrap_or_default();
                let stop = StopConditions { max_tokens: 1, ..request.stop.clone() };
                let hold = PreprocessedRequest { hand_off: HandOff::Hold, stop, ..request.clone() };
                match prefill.dispatch(hold) {
                    Ok(stream) => {
                        decode.without_prefill();
                        (stream, Some((decode, agent)))
                    }
                    Err(error) => {
                        tracing::warn!(request = %request.request_id, "prefill worker refused ({error}); prefilling on the decode worker");
                        self.record(Disagg::Fallback);
                        (decode.dispatch(request.clone())?, None)
                    }
                }
            }
        };
        Ok(MigratingStream {
            router: self.clone(),
            overlap_blocks: current.overlap_blocks,
            migrations_left: self.config.migration_limit,
            request,
            generated: Vec::new(),
            current,
            failed: Vec::new(),
            continues: false,
            prefilling,
        })
    }
}

impl MigratingStream {
    /// The worker serving it now.
    pub fn worker_id(&self) -> WorkerId {
        self.current.worker_id
    }

    /// The request that continues where the lost worker stopped, if there is anything left to generate.
    fn continuation(&self) -> Option<PreprocessedRequest> {
        // The original request: whatever hand-off a part of it had, the continuation has its own.
        let done = self.generated.len() as u32;
        let mut next = self.request.clone();
        next.stop.max_tokens = next.stop.max_tokens.checked_sub(done).filter(|&left| left > 0)?;
        next.stop.min_tokens = next.stop.min_tokens.saturating_sub(done);
        next.token_ids.extend_from_slice(&self.generated);
        next.generated = self.request.generated + done;
        Some(next)
    }

    fn continue_on(&mut self, stream: RoutedStream) {
        self.continues |= !self.generated.is_empty();
        self.current = stream;
    }
}

impl MigratingStream {
    /// At the end of a prefill worker's part: sends the rest to the decode worker, with the prefill's held
    /// KV, and keeps `output` from ending the client's stream. A prefill that ended the request (a stop token,
    /// an error) ends it.
    fn hand_to_decode(&mut self, output: &mut EngineOutput) {
        let held = output.held.take();
        let Some((decode, agent)) = self.prefilling.take() else { return };
        if output.finish_reason != Some(FinishReason::Length) {
            return;
        }
        let Some(mut next) = self.continuation() else { return };
        // Without held KV (a prefill worker that could not keep it) the decode worker computes the prompt.
        if let Some(held) = held {
            next = super::encode::without_embeddings(next);
            next.hand_off = HandOff::From(Box::new(HeldKv { agent, ..held }));
        }
        let decode_id = decode.worker_id;
        let continued = decode.dispatch(next).or_else(|error| {
            // It went away meanwhile: another decode worker computes the prompt itself.
            tracing::warn!(request = %self.request.request_id, "decode worker {decode_id:016x} refused ({error}); routing elsewhere");
            let plain = self.continuation().ok_or(error)?;
            self.router.route_avoiding(plain, &[decode_id])
        });
        match continued {
            Ok(stream) => {
                output.finish_reason = None;
                self.continue_on(stream);
            }
            Err(error) => {
                output.finish_reason = Some(FinishReason::Error(format!("no decode worker took the request: {error}")));
            }
        }
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
                    if output.finish_reason.is_some() {
                        this.hand_to_decode(&mut output);
                    }
                    if this.continues {
                        output.cached_tokens = None;
                    }
                    return Poll::Ready(Some(output));
                }
                Poll::Ready(None) => {
                    if let Some((decode, _)) = this.prefilling.take() {
                        // The prefill worker was lost or refused: the decode worker does it all.
                        this.router.record(Disagg::Fallback);
                        let Some(next) = this.continuation() else { return Poll::Ready(None) };
                        tracing::warn!(
                            request = %this.request.request_id,
                            "prefill worker {:016x} was lost or busy; prefilling on decode worker {:016x}",
                            this.current.worker_id,
                            decode.worker_id
                        );
                        match decode.dispatch(next) {
                            Ok(stream) => this.continue_on(stream),
                            Err(error) => {
                                tracing::warn!(request = %this.request.request_id, "cannot continue: {error}");
                                return Poll::Ready(None);
                            }
                        }
                        continue;
                    }
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
                            this.continue_on(stream);
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
