//! `POST /v1/completions`: raw prompts (text or token ids, one or many), then the shared generation path.
use super::body::JsonBody;
use super::error::ApiError;
use super::generate::{self, ChoiceDelta, ChoiceSpec, ChunkRenderer, Tracker};
use super::params::{
    EndpointOptions, build_choices, check_prompt_text, choices_per_prompt, fields, parse_body, refuse_unsupported,
};
use super::{FrontendState, Served};
use crate::core::model::Model;
use crate::core::protocol::openai::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, SamplingParams, Usage,
};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Arc;

const ENDPOINT: &str = "completions";

/// Tokens generated when a request names no `max_tokens`.
const LEGACY_DEFAULT_MAX_TOKENS: u32 = 16;

pub async fn handle(State(state): State<Arc<FrontendState>>, body: Result<JsonBody, ApiError>) -> Response {
    let mut model = None;
    let result = match body {
        Ok(body) => complete(&state, body, &mut model).await,
        Err(refused) => Err(refused),
    };
    state.answer(ENDPOINT, model.as_deref(), result)
}

/// A completion request, parsed and tokenized, with its choices ready to route.
pub(super) struct Prepared {
    served: Served,
    specs: Vec<ChoiceSpec>,
    prompt_lens: Vec<usize>,
    renderer: CompletionChunks,
    stream: bool,
    include_usage: bool,
}

impl Prepared {
    /// Its model and the engine request of its first choice: what an endpoint picker prices.
    pub(super) fn into_first(self) -> (Served, Option<crate::core::protocol::PreprocessedRequest>) {
        (self.served, self.specs.into_iter().next().map(|spec| spec.request))
    }
}

/// `model` is set to the served model's name once the request has named one.
async fn complete(
    state: &Arc<FrontendState>,
    body: JsonBody,
    model: &mut Option<String>,
) -> Result<Response, ApiError> {
    let pins = body.pins;
    let Prepared { served, specs, prompt_lens, renderer, stream, include_usage } =
        state.prepare(model, move |state, model| prepare(state, &body.bytes, model)).await?;
    let choices = specs.len();
    let deltas = generate::start(state, &served, specs, pins).await?;
    let metrics = state.metrics.request(&served.model.card.name, ENDPOINT, stream);
    let mut tracker = Tracker::new(metrics, prompt_lens, choices);
    if stream {
        return Ok(generate::sse(deltas, tracker, Vec::new(), renderer, include_usage).into_response());
    }
    let deltas = generate::collect(deltas, &mut tracker).await?;
    Ok(axum::Json(renderer.whole(deltas, choices, tracker.usage())).into_response())
}

/// The request's CPU work, in the preprocessing pool: the number of prompts × n and the room for them are
/// checked before any prompt is tokenized, and each text's length before it is.
pub(super) fn prepare(state: &FrontendState, body: &[u8], model: &mut Option<String>) -> Result<Prepared, ApiError> {
    let value = parse_body(body)?;
    let request: CompletionRequest = fields(&value)?;
    let params: SamplingParams = fields(&value)?;
    let (served, adapter) = state.resolve_generation(request.model.as_deref())?;
    *model = Some(served.model.card.name.clone());
    refuse_unsupported(&value)?;
    if request.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "is not supported"));
    }
    if request.echo && request.logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "together with `logprobs` would need prompt logprobs, which are not supported yet",
        ));
    }
    let n = choices_per_prompt(&params, prompt_count(&request.prompt))?;
    served.router.check_room(prompt_count(&request.prompt) * n as usize)?;
    let model = &served.model;
    let prompts = prompts(model, &request.prompt, "prompt")?;
    // Its embeddings would be the placeholder's own, which the model never saw in training.
    if let Some(image) = model.card.image
        && prompts.iter().any(|p| p.contains(&image.token_id))
    {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "holds the image placeholder (token {}) but no image; send images as image_url parts to \
                 /v1/chat/completions",
                image.token_id
            ),
        ));
    }
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let options = EndpointOptions {
        // The legacy endpoint's default, in OpenAI's API and vLLM alike (chat's is the rest of the context).
        max_tokens: params.max_tokens.or(Some(LEGACY_DEFAULT_MAX_TOKENS)),
        logprobs: request.logprobs,
        request_id: id.clone(),
        prompt_field: "prompt",
        max_tokens_field: "max_tokens",
    };
    let mut specs = build_choices(model, &params, &prompts, &options)?;
    for spec in &mut specs {
        spec.request.adapter = adapter.clone();
    }
    let choices = specs.len();
    let echoes = if request.echo {
        let texts: Vec<String> = prompts.iter().map(|p| model.tokenizer.decode(p, true)).collect();
        specs.iter().map(|s| texts[s.prompt_index].clone()).collect()
    } else {
        Vec::new()
    };
    let renderer = CompletionChunks {
        id,
        created: super::unix_now(),
        model: adapter.unwrap_or_else(|| model.card.name.clone()),
        logprobs: request.logprobs.is_some(),
        echoes,
        echoed: HashSet::new(),
        offsets: vec![0; choices],
    };
    Ok(Prepared {
        prompt_lens: prompts.iter().map(Vec::len).collect(),
        served,
        specs,
        renderer,
        stream: request.stream,
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// How many prompts the field holds, by its shape alone (a list of strings or of id lists is one per item).
pub(super) fn prompt_count(prompt: &Value) -> usize {
    match prompt {
        Value::Array(items) if items.first().is_some_and(|i| i.is_string() || i.is_array()) => items.len(),
        _ => 1,
    }
}

const PROMPT_SHAPES: &str = "must be a string, a list of strings, a list of token ids, or a list of lists of token ids";

/// The prompt field (`field`: `prompt`, or `input` for embeddings) in its four OpenAI shapes, as token ids.
/// Text is encoded with the model's special tokens.
pub(super) fn prompts(model: &Model, prompt: &Value, field: &str) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| {
        check_prompt_text(model, text, field)?;
        model.tokenizer.encode(text, true).map_err(|e| ApiError::internal(e.to_string()))
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                let id = v.as_u64().ok_or_else(|| ApiError::invalid(field, PROMPT_SHAPES))?;
                if id >= u64::from(model.card.vocab_size) {
                    return Err(ApiError::invalid(
                        field,
                        format!("contains token id {id}, outside the vocabulary of {}", model.card.vocab_size),
                    ));
                }
                Ok(id as u32)
            })
            .collect()
    };
    let prompts = match prompt {
        Value::String(text) => vec![encode(text)?],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid(field, "must not be empty"));
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.iter().map(|t| encode(t.as_str().unwrap_or_default())).collect::<Result<_, _>>()?
        }
        Value::Array(items) if items.iter().all(Value::is_number) => vec![ids(items)?],
        Value::Array(items) if items.iter().all(Value::is_array) => {
            items.iter().map(|p| ids(p.as_array().map(Vec::as_slice).unwrap_or_default())).collect::<Result<_, _>>()?
        }
        _ => return Err(ApiError::invalid(field, PROMPT_SHAPES)),
    };
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid(field, "has no tokens; send some text or token ids"));
    }
    Ok(prompts)
}

struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    /// Prompt text per choice, when `echo` is on.
    echoes: Vec<String>,
    echoed: HashSet<u32>,
    /// Characters emitted so far per choice, for `text_offset`.
    offsets: Vec<u32>,
}

impl CompletionChunks {
    fn completion(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// The delta's text (with the echoed prompt in front the first time) and its logprobs.
    fn choice(&mut self, delta: &ChoiceDelta) -> CompletionChoice {
        let mut text = String::new();
        if let Some(echo) = self.echoes.get(delta.index as usize)
            && self.echoed.insert(delta.index)
        {
            text.push_str(echo);
        }
        text.push_str(&delta.text);
        let logprobs = self.logprobs.then(|| {
            let offset = &mut self.offsets[delta.index as usize];
            let mut out = CompletionLogprobs::default();
            for entry in &delta.logprobs {
                out.tokens.push(entry.token.clone());
                out.token_logprobs.push(entry.logprob);
                let top: Map<String, Value> = entry.top.iter().map(|(t, p)| (t.clone(), Value::from(*p))).collect();
                out.top_logprobs.push(top);
                out.text_offset.push(*offset);
                *offset += entry.token.chars().count() as u32;
            }
            out
        });
        CompletionChoice {
            index: delta.index,
            text,
            logprobs,
            finish_reason: delta.finish_reason.map(str::to_string),
            prompt_token_ids: delta.prompt_token_ids.clone(),
            token_ids: delta.token_ids.clone(),
        }
    }

    fn whole(mut self, deltas: Vec<ChoiceDelta>, choices: usize, usage: Usage) -> Completion {
        let mut out: Vec<CompletionChoice> = (0..choices as u32)
            .map(|index| CompletionChoice {
                index,
                text: String::new(),
                logprobs: self.logprobs.then(CompletionLogprobs::default),
                finish_reason: None,
                prompt_token_ids: None,
                token_ids: None,
            })
            .collect();
        for delta in &deltas {
            let part = self.choice(delta);
            let Some(choice) = out.get_mut(delta.index as usize) else {
                continue;
            };
            choice.text.push_str(&part.text);
            if let (Some(all), Some(new)) = (choice.logprobs.as_mut(), part.logprobs) {
                all.tokens.extend(new.tokens);
                all.token_logprobs.extend(new.token_logprobs);
                all.top_logprobs.extend(new.top_logprobs);
                all.text_offset.extend(new.text_offset);
            }
            if part.finish_reason.is_some() {
                choice.finish_reason = part.finish_reason;
            }
            if let Some(ids) = part.token_ids {
                choice.token_ids.get_or_insert_default().extend(ids);
            }
            if part.prompt_token_ids.is_some() {
                choice.prompt_token_ids = part.prompt_token_ids;
            }
        }
        self.completion(out, Some(usage))
    }
}

impl ChunkRenderer for CompletionChunks {
    fn delta(&mut self, delta: &ChoiceDelta) -> Option<String> {
        let echo_pending = !self.echoes.is_empty() && !self.echoed.contains(&delta.index);
        // A step's tokens are sent even before their text is complete (see the chat renderer).
        if !delta.carries_anything() && !echo_pending {
            return None;
        }
        let choice = self.choice(delta);
        serde_json::to_string(&self.completion(vec![choice], None)).ok()
    }

    fn usage(&mut self, usage: Usage) -> String {
        serde_json::to_string(&self.completion(Vec::new(), Some(usage))).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_whose_text_is_not_complete_yet_still_sends_its_chunk() {
        let mut chunks = CompletionChunks {
            id: "cmpl-1".into(),
            created: 0,
            model: "m".into(),
            logprobs: false,
            echoes: Vec::new(),
            echoed: HashSet::new(),
            offsets: vec![0],
        };
        let partial = ChoiceDelta { index: 0, new_tokens: 1, ..ChoiceDelta::default() };
        let chunk: serde_json::Value = serde_json::from_str(&chunks.delta(&partial).expect("a chunk")).unwrap();
        assert_eq!(chunk["choices"][0]["text"], "");
        assert!(chunks.delta(&ChoiceDelta::default()).is_none());
    }
}
