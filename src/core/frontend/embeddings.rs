//! `POST /v1/embeddings`: each input's embedding, read from a decoder model as vLLM's `--task embed` does
//! (the final hidden state at the last token, normalized). Every input is an engine request of its own, routed
//! as a completion is (so repeated prefixes hit the cache), that ends after its prompt.
use super::body::JsonBody;
use super::completions::{prompt_count, prompts};
use super::error::ApiError;
use super::generate::{self, ChoiceSpec, TextOptions, Tracker};
use super::params::{MAX_CHOICES, fields, parse_body};
use super::{FrontendState, Served};
use crate::core::protocol::openai::{EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage};
use crate::core::protocol::{HandOff, Pooling, PreprocessedRequest, SamplingOptions, StopConditions};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::Value;
use std::sync::Arc;

const ENDPOINT: &str = "embeddings";

pub async fn handle(State(state): State<Arc<FrontendState>>, body: Result<JsonBody, ApiError>) -> Response {
    let mut model = None;
    let result = match body {
        Ok(body) => embed(&state, body, &mut model).await,
        Err(refused) => Err(refused),
    };
    state.answer(ENDPOINT, model.as_deref(), result)
}

pub(super) struct Prepared {
    served: Served,
    specs: Vec<ChoiceSpec>,
    prompt_lens: Vec<usize>,
    base64: bool,
    id: String,
}

async fn embed(state: &Arc<FrontendState>, body: JsonBody, model: &mut Option<String>) -> Result<Response, ApiError> {
    let pins = body.pins;
    let Prepared { served, specs, prompt_lens, base64, id } =
        state.prepare(model, move |state, model| prepare(state, &body.bytes, model)).await?;
    let inputs = specs.len();
    let deltas = generate::start(state, &served, specs, pins).await?;
    let metrics = state.metrics.request(&served.model.card.name, ENDPOINT, false);
    let mut tracker = Tracker::new(metrics, prompt_lens, inputs);
    let deltas = generate::collect(deltas, &mut tracker).await?;
    let mut data = Vec::with_capacity(inputs);
    for delta in deltas {
        let Some(vector) = delta.embedding else {
            return Err(ApiError::internal(format!("input {} came back without an embedding", delta.index)));
        };
        let embedding = match base64 {
            true => {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            false => vector.into_iter().map(Value::from).collect(),
        };
        data.push(EmbeddingData { index: delta.index, object: "embedding".into(), embedding });
    }
    data.sort_by_key(|d| d.index);
    let usage = tracker.usage();
    Ok(axum::Json(EmbeddingList {
        id,
        object: "list".into(),
        created: super::unix_now(),
        model: served.model.card.name.clone(),
        data,
        usage: EmbeddingUsage { prompt_tokens: usage.prompt_tokens, total_tokens: usage.prompt_tokens },
    })
    .into_response())
}

pub(super) fn prepare(state: &FrontendState, body: &[u8], model: &mut Option<String>) -> Result<Prepared, ApiError> {
    let value = parse_body(body)?;
    let request: EmbeddingRequest = fields(&value)?;
    let served = state.resolve(request.model.as_deref())?;
    *model = Some(served.model.card.name.clone());
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("must be \"float\" or \"base64\", got {other:?}"),
            ));
        }
    };
    if request.dimensions.is_some() {
        return Err(ApiError::invalid(
            "dimensions",
            "is not supported: embeddings have the model's hidden size (shortening needs a model trained for it)",
        ));
    }
    if value.get("truncate_prompt_tokens").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid("truncate_prompt_tokens", "is not supported: inputs are never truncated"));
    }
    let count = prompt_count(&request.input);
    if count > MAX_CHOICES {
        return Err(ApiError::invalid("input", format!("holds {count} inputs; at most {MAX_CHOICES} per request")));
    }
    served.router.check_room(count)?;
    let model = &served.model;
    let inputs = match request.add_special_tokens {
        Some(false) => text_without_special_tokens(model, &request.input)?,
        _ => prompts(model, &request.input, "input")?,
    };
    let context = model.card.context_length as usize;
    if let Some((at, long)) = inputs.iter().enumerate().find(|(_, input)| input.len() >= context) {
        return Err(ApiError::bad_request(
            Some("input"),
            format!(
                "input {at} has {} tokens; this model's maximum context length is {context} tokens. Please \
                 shorten it.",
                long.len()
            ),
        ));
    }
    let id = format!("embd-{}", uuid::Uuid::new_v4().simple());
    let pooling = Pooling { normalize: request.normalize.unwrap_or(true) };
    let specs = inputs
        .iter()
        .enumerate()
        .map(|(at, tokens)| ChoiceSpec {
            index: at as u32,
            prompt_index: at,
            request: PreprocessedRequest {
                request_id: format!("{id}-{at}"),
                token_ids: tokens.clone(),
                sampling: SamplingOptions { temperature: 0.0, ..SamplingOptions::default() },
                // One step, as a request that generates one token: the router prices and places it so.
                stop: StopConditions { max_tokens: 1, min_tokens: 0, stop_token_ids: Vec::new() },
                logprobs: None,
                hand_off: HandOff::None,
                generated: 0,
                constraint: None,
                pooling: Some(pooling),
                media: None,
                adapter: None,
            },
            text: TextOptions {
                skip_special_tokens: true,
                stop: Vec::new(),
                include_stop_str: false,
                tokens_as_ids: false,
                token_ids: false,
            },
        })
        .collect();
    Ok(Prepared { served, prompt_lens: inputs.iter().map(Vec::len).collect(), specs, base64, id })
}

/// Text inputs encoded without the tokenizer's special tokens (`add_special_tokens: false`); token ids as
/// they are.
fn text_without_special_tokens(model: &crate::core::model::Model, input: &Value) -> Result<Vec<Vec<u32>>, ApiError> {
    let texts: Vec<&str> = match input {
        Value::String(text) => vec![text],
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).collect()
        }
        _ => return prompts(model, input, "input"),
    };
    texts
        .into_iter()
        .map(|text| {
            super::params::check_prompt_text(model, text, "input")?;
            let ids = model.tokenizer.encode(text, false).map_err(|e| ApiError::internal(e.to_string()))?;
            if ids.is_empty() {
                return Err(ApiError::invalid("input", "has no tokens; send some text or token ids"));
            }
            Ok(ids)
        })
        .collect()
}
