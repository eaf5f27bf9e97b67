//! From engine token streams to the text a client sees, for one request of one or more choices.
//!
//! Each choice is an engine request routed on its own; its tokens are turned into text incrementally
//! (`IncrementalDecoder`), cut at stop strings (`StopStringMatcher`) and paired with logprobs. The choices'
//! deltas are merged into one stream. Dropping that stream, as axum does when a client disconnects, drops
//! every engine stream, which cancels the requests in the engines. A `Tracker` follows the merged stream to
//! count usage and record metrics.
use super::error::ApiError;
use super::{FrontendState, Served};
use crate::core::model::{IncrementalDecoder, Model, StopStringMatcher};
use crate::core::protocol::openai::{PromptTokensDetails, Usage};
use crate::core::protocol::{FinishReason, PreprocessedRequest};
use crate::core::router::{MigratingStream, Pins};
use crate::core::telemetry::RequestMetrics;
use axum::response::sse::{Event, Sse};
use futures::stream::{self, BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;

/// How a choice's tokens become text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextOptions {
    pub skip_special_tokens: bool,
    pub stop: Vec<String>,
    pub include_stop_str: bool,
    /// vLLM's `return_tokens_as_token_ids`: logprob tokens read `token_id:N`.
    pub tokens_as_ids: bool,
    /// vLLM's `return_token_ids`: the prompt's and the generated token ids go with the text.
    pub token_ids: bool,
}

/// One choice to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceSpec {
    pub index: u32,
    /// Which prompt of the request this choice continues.
    pub prompt_index: usize,
    pub request: PreprocessedRequest,
    pub text: TextOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    pub token: String,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(String, f32)>,
}

/// What one engine step added to one choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceDelta {
    pub index: u32,
    pub prompt_index: usize,
    pub text: String,
    pub logprobs: Vec<LogprobEntry>,
    /// Tokens generated in this step (a hidden stop token counts).
    pub new_tokens: usize,
    /// `stop`, `length` or `abort`; set on the last delta of the choice.
    pub finish_reason: Option<&'static str>,
    pub error: Option<String>,
    /// The error is the request's (a worker refused it as asked), not the server's.
    pub invalid: bool,
    pub cached_tokens: Option<u32>,
    /// With `return_token_ids`: this step's tokens (a stop token too, as vLLM lists it), and on the choice's
    /// first delta its prompt's.
    pub token_ids: Option<Vec<u32>>,
    pub prompt_token_ids: Option<Vec<u32>>,
    /// An embedding request's result, on its one delta.
    pub embedding: Option<Vec<f32>>,
    /// The worker its first token came from, on the delta that carries that token.
    pub first_token_from: Option<crate::core::protocol::WorkerId>,
}

impl ChoiceDelta {
    /// Whether a streaming client is sent a chunk for it: text, tokens (even with no text yet), logprobs or
    /// the end.
    pub fn carries_anything(&self) -> bool {
        !self.text.is_empty() || self.new_tokens > 0 || !self.logprobs.is_empty() || self.finish_reason.is_some()
    }
}

pub type Deltas = SelectAll<BoxStream<'static, ChoiceDelta>>;

/// Routes every choice (to the workers `pins` names, where it names them); if one is refused, the ones
/// already started are dropped (and so cancelled).
pub async fn start(
    state: &FrontendState,
    served: &Served,
    specs: Vec<ChoiceSpec>,
    pins: Pins,
) -> Result<Deltas, ApiError> {
    let mut streams = Vec::with_capacity(specs.len());
    for spec in specs {
        let engine = served.router.route_pinned(spec.request.clone(), pins).await?;
        state.metrics.routed(&served.model.card.name, engine.worker_id(), engine.overlap_blocks);
        streams.push(choice_stream(served.model.clone(), spec, engine));
    }
    Ok(stream::select_all(streams))
}

struct ChoiceState {
    spec: ChoiceSpec,
    model: Arc<Model>,
    engine: MigratingStream,
    decoder: IncrementalDecoder,
    stops: StopStringMatcher,
    started: bool,
    /// Whether a token came yet.
    answered: bool,
}

fn choice_stream(model: Arc<Model>, spec: ChoiceSpec, engine: MigratingStream) -> BoxStream<'static, ChoiceDelta> {
    let decoder = IncrementalDecoder::new(&spec.request.token_ids, spec.text.skip_special_tokens);
    let stops = StopStringMatcher::new(spec.text.stop.clone(), spec.text.include_stop_str);
    let state = ChoiceState { spec, model, engine, decoder, stops, started: false, answered: false };
    stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let delta = state.next_delta().await;
        let more = delta.finish_reason.is_none();
        Some((delta, more.then_some(state)))
    })
    .boxed()
}

impl ChoiceState {
    async fn next_delta(&mut self) -> ChoiceDelta {
        let mut delta =
            ChoiceDelta { index: self.spec.index, prompt_index: self.spec.prompt_index, ..Default::default() };
        let Some(mut output) = self.engine.next().await else {
            delta.finish_reason = Some("abort");
            delta.error = Some("the worker stopped before finishing the request".into());
            return delta;
        };
        let tokenizer = &self.model.tokenizer;
        delta.cached_tokens = output.cached_tokens;
        delta.new_tokens = output.token_ids.len();
        delta.embedding = output.embedding.take();
        if delta.new_tokens > 0 && !std::mem::replace(&mut self.answered, true) {
            delta.first_token_from = Some(self.engine.worker_id());
        }
        if self.spec.text.token_ids {
            delta.token_ids = Some(output.token_ids.clone());
            if !std::mem::replace(&mut self.started, true) {
                delta.prompt_token_ids = Some(self.spec.request.token_ids.clone());
            }
        }
        let hidden = match output.finish_reason {
            Some(FinishReason::StopToken(token)) => Some(token),
            _ => None,
        };
        let mut text = String::new();
        let shown = output.token_ids.len() - usize::from(hidden.is_some());
        for &token in &output.token_ids[..shown] {
            text.push_str(&self.decoder.step(tokenizer, token));
        }
        let as_text = |id: u32| {
            if self.spec.text.tokens_as_ids { format!("token_id:{id}") } else { tokenizer.token_text(id) }
        };
        delta.logprobs = output
            .logprobs
            .iter()
            .map(|lp| LogprobEntry {
                token: as_text(lp.token_id),
                logprob: lp.logprob,
                top: lp.top.iter().map(|&(id, p)| (as_text(id), p)).collect(),
            })
            .collect();
        let finish = match &output.finish_reason {
            None => None,
            Some(FinishReason::StopToken(_) | FinishReason::Complete) => Some("stop"),
            Some(FinishReason::Length) => Some("length"),
            Some(FinishReason::Cancelled) => Some("abort"),
            Some(FinishReason::Error(message)) => {
                delta.error = Some(message.clone());
                Some("abort")
            }
            Some(FinishReason::Invalid(message)) => {
                delta.error = Some(message.clone());
                delta.invalid = true;
                Some("abort")
            }
        };
        if finish.is_some() {
            text.push_str(&self.decoder.flush(tokenizer));
        }
        let released = self.stops.push(&text);
        delta.text = released.text;
        if released.stopped {
            delta.finish_reason = Some("stop");
        } else if finish.is_some() {
            delta.text.push_str(&self.stops.flush());
            delta.finish_reason = finish;
        }
        delta
    }
}

/// Follows a request's deltas: usage, and the request's metrics (recorded when the tracker is dropped).
pub struct Tracker {
    metrics: RequestMetrics,
    prompt_tokens: Vec<usize>,
    completion_tokens: usize,
    cached_tokens: Vec<Option<u32>>,
    unfinished: usize,
    failed: bool,
}

impl Tracker {
    pub fn new(metrics: RequestMetrics, prompt_tokens: Vec<usize>, choices: usize) -> Self {
        let cached_tokens = vec![None; prompt_tokens.len()];
        Self { metrics, prompt_tokens, completion_tokens: 0, cached_tokens, unfinished: choices, failed: false }
    }

    pub fn observe(&mut self, delta: &ChoiceDelta) {
        self.completion_tokens += delta.new_tokens;
        self.metrics.tokens(delta.new_tokens);
        if let Some(worker) = delta.first_token_from {
            self.metrics.first_token_from(worker);
        }
        if let (Some(cached), Some(slot)) = (delta.cached_tokens, self.cached_tokens.get_mut(delta.prompt_index)) {
            // Choices of one prompt may land on different workers; report the best hit.
            let best = slot.map_or(cached, |c| c.max(cached));
            if slot.is_none() {
                self.metrics.prompt(self.prompt_tokens[delta.prompt_index], cached);
            }
            *slot = Some(best);
        }
        self.failed |= delta.error.is_some();
        if delta.finish_reason.is_some() {
            self.unfinished = self.unfinished.saturating_sub(1);
            if self.unfinished == 0 {
                self.metrics.finish(!self.failed);
            }
        }
    }

    pub fn usage(&self) -> Usage {
        let prompt_tokens = self.prompt_tokens.iter().sum::<usize>() as u32;
        let completion_tokens = self.completion_tokens as u32;
        let cached_tokens = self.cached_tokens.iter().map(|c| c.unwrap_or(0)).sum();
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
        }
    }
}

/// Collects a whole request (non-streaming); the first error a choice hit fails the request.
pub async fn collect(mut deltas: Deltas, tracker: &mut Tracker) -> Result<Vec<ChoiceDelta>, ApiError> {
    let mut all = Vec::new();
    while let Some(delta) = deltas.next().await {
        tracker.observe(&delta);
        if let Some(error) = &delta.error {
            return Err(match delta.invalid {
                true => ApiError::bad_request(None, error.clone()),
                false => ApiError::internal(error.clone()),
            });
        }
        all.push(delta);
    }
    Ok(all)
}

/// How a streaming endpoint renders chunks.
pub trait ChunkRenderer: Send + 'static {
    /// The JSON of the chunk for this delta, or `None` when it carries nothing to send.
    fn delta(&mut self, delta: &ChoiceDelta) -> Option<String>;
    /// The closing usage chunk (`stream_options.include_usage`).
    fn usage(&mut self, usage: Usage) -> String;
}

/// SSE: `first` chunks, one chunk per delta, the usage chunk if asked for, then `data: [DONE]`.
pub fn sse<R: ChunkRenderer>(
    deltas: Deltas,
    tracker: Tracker,
    first: Vec<String>,
    renderer: R,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let body = stream::unfold(Some((deltas, tracker, renderer)), move |state| async move {
        let (mut deltas, mut tracker, mut renderer) = state?;
        loop {
            match deltas.next().await {
                Some(delta) => {
                    tracker.observe(&delta);
                    let chunk = match &delta.error {
                        Some(message) => Some(error_json(message)),
                        None => renderer.delta(&delta),
                    };
                    if let Some(chunk) = chunk {
                        return Some((vec![chunk], Some((deltas, tracker, renderer))));
                    }
                }
                None => {
                    let mut tail = Vec::new();
                    if include_usage {
                        tail.push(renderer.usage(tracker.usage()));
                    }
                    tail.push("[DONE]".to_string());
                    return Some((tail, None));
                }
            }
        }
    });
    let events = stream::iter(first.into_iter().map(|chunk| vec![chunk]))
        .chain(body)
        .flat_map(|chunks| stream::iter(chunks.into_iter().map(|c| Ok(Event::default().data(c)))));
    Sse::new(events)
}

fn error_json(message: &str) -> String {
    serde_json::to_string(&ApiError::internal(message).body()).unwrap_or_default()
}
