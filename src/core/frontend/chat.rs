//! `POST /v1/chat/completions`: messages through the chat template, then the shared generation path.
use super::body::JsonBody;
use super::error::ApiError;
use super::generate::{self, ChoiceDelta, ChoiceSpec, ChunkRenderer, LogprobEntry, Tracker};
use super::media;
use super::params::{
    EndpointOptions, build_choices, check_prompt_text, choices_per_prompt, fields, parse_body, refuse_unsupported,
};
use super::tools::{self, CallPiece, Calls, ToolCall, ToolParser, ToolStream};
use super::{FrontendState, Served};
use crate::core::model::TemplateInput;
use crate::core::protocol::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatLogprobs,
    ChatMessage, ChatTokenLogprob, FunctionCallOut, SamplingParams, ToolCallOut, TopLogprob, Usage,
};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use std::sync::Arc;

const ENDPOINT: &str = "chat_completions";

pub async fn handle(State(state): State<Arc<FrontendState>>, body: Result<JsonBody, ApiError>) -> Response {
    let mut model = None;
    let result = match body {
        Ok(body) => chat(&state, body, &mut model).await,
        Err(refused) => Err(refused),
    };
    state.answer(ENDPOINT, model.as_deref(), result)
}

/// A chat request, parsed, templated and tokenized, with its choices ready to route.
pub(super) struct Prepared {
    served: Served,
    /// The name the request asked for and the response carries: the model's, or its LoRA adapter's.
    served_as: String,
    /// The format tool calls are read in, when the request offers tools and lets the model call them.
    tool_parser: Option<Calls>,
    specs: Vec<ChoiceSpec>,
    prompt_len: usize,
    id: String,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

impl Prepared {
    /// Its model and the engine request of its first choice: what an endpoint picker prices.
    pub(super) fn into_first(self) -> (Served, Option<crate::core::protocol::PreprocessedRequest>) {
        (self.served, self.specs.into_iter().next().map(|spec| spec.request))
    }
}

/// `model` is set to the served model's name once the request has named one.
async fn chat(state: &Arc<FrontendState>, body: JsonBody, model: &mut Option<String>) -> Result<Response, ApiError> {
    let pins = body.pins;
    let fetched = state.fetch_images(&body.bytes).await;
    let Prepared { served, served_as, tool_parser, specs, prompt_len, id, stream, include_usage, logprobs } =
        state.prepare(model, move |state, model| prepare(state, &body.bytes, &fetched, model)).await?;
    let choices = specs.len();
    let model = &served.model;
    let deltas = generate::start(state, &served, specs, pins).await?;
    let metrics = state.metrics.request(&model.card.name, ENDPOINT, stream);
    let mut tracker = Tracker::new(metrics, vec![prompt_len], choices);
    let renderer = ChatChunks::new(id, served_as, logprobs, tool_parser, choices);

    if stream {
        let first = (0..choices as u32).map(|index| renderer.role_chunk(index)).collect();
        return Ok(generate::sse(deltas, tracker, first, renderer, include_usage).into_response());
    }
    let deltas = generate::collect(deltas, &mut tracker).await?;
    Ok(axum::Json(renderer.whole(deltas, choices, tracker.usage())).into_response())
}

/// The request's CPU work, in the preprocessing pool: every bound is checked before the work it guards.
pub(super) fn prepare(
    state: &FrontendState,
    body: &[u8],
    fetched: &media::Fetched,
    model: &mut Option<String>,
) -> Result<Prepared, ApiError> {
    let value = parse_body(body)?;
    let request: ChatCompletionRequest = fields(&value)?;
    let mut params: SamplingParams = fields(&value)?;
    let (served, adapter) = state.resolve_generation(request.model.as_deref())?;
    *model = Some(served.model.card.name.clone());
    refuse_unsupported(&value)?;
    let n = choices_per_prompt(&params, 1)?;
    served.router.check_room(n as usize)?;
    let model = &served.model;
    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request(None, "this model has no chat template (no chat_template.jinja, chat_template.json nor chat_template in tokenizer_config.json); use /v1/completions")
    })?;
    let images_allowed = model.card.image.is_some().then(|| (state.media_settings(), fetched));
    let (messages, images) = normalize_messages(&request.messages, images_allowed)?;
    let parallel = value.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
    let (tool_parser, forced) = tool_calls(state, template, &request, parallel)?.unzip();
    // The markers that open a call are special tokens in many tokenizers (Mistral's [TOOL_CALLS], Hermes's
    // <tool_call>): kept in the text the parser reads unless the client says otherwise, as vLLM does.
    if matches!(tool_parser, Some(Calls::Parsed(_))) && params.skip_special_tokens.is_none() {
        params.skip_special_tokens = Some(false);
    }
    let forced = forced.flatten();
    if let Some(schema) = forced.clone() {
        if params.constrains() {
            return Err(ApiError::invalid(
                "tool_choice",
                "forces a call by a grammar of its own, so it cannot be combined with response_format or the \
                 guided fields",
            ));
        }
        params.guided_json = Some(schema);
    }
    let prompt = template
        .render(&TemplateInput {
            messages: &messages,
            tools: request.tools.as_deref(),
            add_generation_prompt: request.add_generation_prompt.unwrap_or(true),
            extra: request.chat_template_kwargs.as_ref(),
        })
        .map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
    check_prompt_text(model, &prompt, "messages")?;
    let token_ids = model.tokenizer.encode(&prompt, false).map_err(|e| ApiError::internal(e.to_string()))?;
    let (token_ids, media) = match model.card.image {
        Some(placeholder) => media::place(&token_ids, images, placeholder)?,
        None => (token_ids, Vec::new()),
    };
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => Some(top.unwrap_or(0)),
        (_, Some(top)) if top > 0 => {
            return Err(ApiError::invalid("top_logprobs", "needs `logprobs: true`"));
        }
        _ => None,
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let options = EndpointOptions {
        max_tokens: request.max_completion_tokens.or(params.max_tokens),
        logprobs,
        request_id: id.clone(),
        prompt_field: "messages",
        max_tokens_field: if request.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" },
    };
    let prompt_len = token_ids.len();
    let mut specs = build_choices(model, &params, &[token_ids], &options).map_err(|error| {
        // The forcing schema went in as guided_json; its faults are the tools' parameters'.
        match (&forced, error.param.as_deref()) {
            (Some(_), Some("guided_json")) => ApiError::invalid(
                "tools",
                format!("have parameters that cannot be enforced for tool_choice: {}", error.message),
            ),
            _ => error,
        }
    })?;
    let media = (!media.is_empty()).then(|| Arc::new(media));
    for spec in &mut specs {
        spec.request.media = media.clone();
        spec.request.adapter = adapter.clone();
    }
    Ok(Prepared {
        served_as: adapter.unwrap_or_else(|| served.model.card.name.clone()),
        served,
        tool_parser,
        specs,
        prompt_len,
        id,
        stream: request.stream,
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
        logprobs: logprobs.is_some(),
    })
}

/// How the output is read for tool calls, and the schema that forces a call when `tool_choice` asks for one
/// (`required`, or a named function: the output is then JSON held to the tools' parameters, as vLLM does,
/// whatever format the model was taught). `None` when the request offers no tools or says `"none"`. Offered
/// with `auto` to a model whose format is unknown, they are refused (as vLLM does without a parser), since
/// its calls would come back as plain text.
fn tool_calls(
    state: &FrontendState,
    template: &crate::core::model::ChatTemplate,
    request: &ChatCompletionRequest,
    parallel: bool,
) -> Result<Option<(Calls, Option<Value>)>, ApiError> {
    let tools = request.tools.as_deref().unwrap_or_default();
    let choice = request.tool_choice.as_ref().filter(|c| !c.is_null());
    match choice {
        Some(Value::String(choice)) if choice == "none" => return Ok(None),
        Some(Value::String(choice)) if choice == "auto" => {}
        None => {}
        Some(Value::String(choice)) if choice == "required" => {
            if tools.is_empty() {
                return Err(ApiError::invalid("tool_choice", "is \"required\" but no `tools` are offered"));
            }
            let calls = tools
                .iter()
                .enumerate()
                .map(|(i, tool)| {
                    let (name, parameters) = function_of(tool, i)?;
                    Ok(json!({
                        "type": "object",
                        "properties": {"name": {"const": name}, "parameters": parameters},
                        "required": ["name", "parameters"],
                        "additionalProperties": false,
                    }))
                })
                .collect::<Result<Vec<Value>, ApiError>>()?;
            let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
            if !parallel {
                schema["maxItems"] = json!(1);
            }
            return Ok(Some((Calls::Required, Some(schema))));
        }
        Some(Value::Object(named)) => {
            let wanted = named.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid("tool_choice", "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}")
            })?;
            for (i, tool) in tools.iter().enumerate() {
                let (name, parameters) = function_of(tool, i)?;
                if name == wanted {
                    return Ok(Some((Calls::Named(name.to_string()), Some(parameters))));
                }
            }
            return Err(ApiError::invalid("tool_choice", format!("names `{wanted}`, which is not among `tools`")));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("must be \"none\", \"auto\", \"required\" or a named function, got {other}"),
            ));
        }
    }
    if tools.is_empty() {
        return Ok(None);
    }
    if !parallel {
        return Err(ApiError::invalid(
            "parallel_tool_calls",
            "is false, which only tool_choice \"required\" or a named function can enforce; every call the model \
             writes under \"auto\" is returned",
        ));
    }
    match state.tool_parser.get().copied().or_else(|| ToolParser::of_template(template.source())) {
        Some(parser) => Ok(Some((Calls::Parsed(parser), None))),
        None => Err(ApiError::invalid(
            "tools",
            "this model's chat template names no tool-call format, so calls could not be read from its output; \
             start the server with --tool-call-parser hermes|mistral|llama3_json, send tool_choice \"none\", or \
             force a call with tool_choice \"required\" or a named function",
        )),
    }
}

/// The name and parameters' schema of `tools[at]` (`{"type": "function", "function": {"name", "parameters"}}`).
fn function_of(tool: &Value, at: usize) -> Result<(&str, Value), ApiError> {
    let function = tool.get("function");
    let name = function.and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(&format!("tools[{at}]"), "must be {\"type\": \"function\", \"function\": {\"name\": …}}")
    })?;
    let parameters = function
        .and_then(|f| f.get("parameters"))
        .filter(|p| !p.is_null())
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    Ok((name, parameters))
}

/// Checks each message, and reads its list-of-parts content: flattened into text for a text model (as
/// text-only templates expect), kept as parts for a vision model, whose template places `{"type": "image"}`
/// parts as HF templates do. Returns the messages and the images, in order.
fn normalize_messages(
    messages: &[Map<String, Value>],
    images_allowed: Option<(&media::MediaSettings, &media::Fetched)>,
) -> Result<(Vec<Value>, Vec<media::ImagePart>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "must contain at least one message"));
    }
    let mut images = Vec::new();
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            if !message.get("role").is_some_and(Value::is_string) {
                return Err(ApiError::invalid(&format!("messages[{i}].role"), "must be a string"));
            }
            let mut message = message.clone();
            match message.get("content") {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(Value::Array(parts)) => {
                    let content = read_parts(i, parts, images_allowed, &mut images)?;
                    message.insert("content".into(), content);
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].content"),
                        "must be a string or a list of parts",
                    ));
                }
            }
            Ok(Value::Object(message))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((messages, images))
}

fn read_parts(
    message: usize,
    parts: &[Value],
    images_allowed: Option<(&media::MediaSettings, &media::Fetched)>,
    images: &mut Vec<media::ImagePart>,
) -> Result<Value, ApiError> {
    let takes_images = images_allowed.is_some();
    let mut texts = Vec::with_capacity(parts.len());
    let mut kept = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let field = format!("messages[{message}].content[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(text) => {
                    texts.push(text);
                    kept.push(json!({"type": "text", "text": text}));
                }
                None => {
                    return Err(ApiError::invalid(&field, "is a text part without a `text` string"));
                }
            },
            Some("image_url") if let Some((settings, fetched)) = images_allowed => {
                if images.len() >= settings.max_images {
                    return Err(ApiError::invalid(
                        &field,
                        format!(
                            "is one image too many: at most {} per prompt (--limit-images-per-prompt)",
                            settings.max_images
                        ),
                    ));
                }
                images.push(media::read_image(&field, part, settings, fetched)?);
                if images.iter().map(media::ImagePart::size).sum::<usize>() > media::MAX_PROMPT_IMAGE_BYTES {
                    return Err(ApiError::invalid(
                        &field,
                        format!(
                            "takes the prompt's images past {} MiB together; send fewer or smaller ones",
                            media::MAX_PROMPT_IMAGE_BYTES >> 20
                        ),
                    ));
                }
                kept.push(json!({"type": "image"}));
            }
            Some("image_url") => {
                return Err(ApiError::invalid(&field, "is an image, and this model does not take images"));
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    &field,
                    format!(
                        "has type `{other}`, which this model does not accept; send text{} parts",
                        if takes_images { " and image_url" } else { "" }
                    ),
                ));
            }
            None => return Err(ApiError::invalid(&field, "needs a `type`")),
        }
    }
    Ok(match takes_images {
        true => Value::Array(kept),
        false => Value::String(texts.join("\n")),
    })
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    tool_parser: Option<Calls>,
    /// Each choice's output as it streams, read for tool calls.
    tool_streams: Vec<ToolStream>,
}

impl ChatChunks {
    fn new(id: String, model: String, logprobs: bool, tool_parser: Option<Calls>, choices: usize) -> Self {
        let tool_streams = tool_parser
            .as_ref()
            .map_or_else(Vec::new, |reading| (0..choices).map(|_| ToolStream::new(reading.clone())).collect());
        Self { id, created: super::unix_now(), model, logprobs, tool_parser, tool_streams }
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>, prompt_token_ids: Option<Vec<u32>>) -> String {
        let chunk = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            prompt_token_ids,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    fn role_chunk(&self, index: u32) -> String {
        let delta = ChatDelta { role: Some("assistant".into()), content: Some(String::new()), tool_calls: None };
        self.chunk(
            vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: None, token_ids: None }],
            None,
            None,
        )
    }

    fn whole(&self, deltas: Vec<ChoiceDelta>, choices: usize, usage: Usage) -> ChatCompletion {
        let mut out: Vec<ChatChoice> = (0..choices as u32)
            .map(|index| ChatChoice {
                index,
                message: ChatMessage { role: "assistant".into(), content: Some(String::new()), tool_calls: None },
                logprobs: self.logprobs.then(ChatLogprobs::default),
                finish_reason: None,
                token_ids: None,
            })
            .collect();
        let mut prompt_token_ids = None;
        for delta in deltas {
            let Some(choice) = out.get_mut(delta.index as usize) else {
                continue;
            };
            choice.message.content.get_or_insert_default().push_str(&delta.text);
            if let Some(logprobs) = choice.logprobs.as_mut() {
                logprobs.content.extend(delta.logprobs.iter().map(chat_logprob));
            }
            if delta.finish_reason.is_some() {
                choice.finish_reason = delta.finish_reason.map(str::to_string);
            }
            if let Some(ids) = delta.token_ids {
                choice.token_ids.get_or_insert_default().extend(ids);
            }
            // Every choice continues the one prompt a chat request has.
            prompt_token_ids = prompt_token_ids.or(delta.prompt_token_ids);
        }
        if let Some(reading) = &self.tool_parser {
            for choice in &mut out {
                let (content, calls) = tools::parse_whole(reading, choice.message.content.as_deref().unwrap_or(""));
                if calls.is_empty() {
                    continue;
                }
                choice.message.content = (!content.is_empty()).then_some(content);
                choice.message.tool_calls = Some(calls.into_iter().map(|call| tool_call_out(None, call)).collect());
                if choice.finish_reason.as_deref() == Some("stop") {
                    choice.finish_reason = Some(reading.finish_reason().into());
                }
            }
        }
        ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: out,
            usage,
            prompt_token_ids,
        }
    }
}

impl ChunkRenderer for ChatChunks {
    fn delta(&mut self, delta: &ChoiceDelta) -> Option<String> {
        if !delta.carries_anything() {
            return None;
        }
        // A step that generated tokens whose text is not complete yet (part of a UTF-8 character, a possible
        // stop string) still sends its chunk, with empty content, as vLLM does: a client timing chunks sees
        // every token arrive.
        let mut content = (delta.new_tokens > 0 || !delta.text.is_empty()).then(|| delta.text.clone());
        let mut tool_calls = None;
        let mut finish_reason = delta.finish_reason.map(str::to_string);
        if let Some(stream) = self.tool_streams.get_mut(delta.index as usize) {
            // Text that may be a call is held back until it is known; a call goes out as soon as its name is
            // read, then its arguments as they come.
            let (text, pieces) = stream.read(&delta.text, delta.finish_reason.is_some());
            let calls = call_deltas(pieces);
            content = match (content, text.is_empty()) {
                (_, false) => Some(text),
                (content, true) => content.map(|_| String::new()),
            };
            tool_calls = (!calls.is_empty()).then_some(calls);
            if stream.calls > 0 && finish_reason.as_deref() == Some("stop") {
                finish_reason = self.tool_parser.as_ref().map(|reading| reading.finish_reason().to_string());
            }
        }
        let choice = ChatChunkChoice {
            index: delta.index,
            delta: ChatDelta { role: None, content, tool_calls },
            logprobs: self
                .logprobs
                .then(|| ChatLogprobs { content: delta.logprobs.iter().map(chat_logprob).collect() }),
            finish_reason,
            token_ids: delta.token_ids.clone(),
        };
        Some(self.chunk(vec![choice], None, delta.prompt_token_ids.clone()))
    }

    fn usage(&mut self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(usage), None)
    }
}

/// A call as OpenAI writes it, with a fresh id; `index` (its place among the choice's calls) in a stream.
fn tool_call_out(index: Option<u32>, call: ToolCall) -> ToolCallOut {
    ToolCallOut {
        index,
        id: Some(call_id()),
        kind: Some("function".into()),
        function: FunctionCallOut { name: Some(call.name), arguments: call.arguments },
    }
}

fn call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

/// A stream delta's call entries: a call's first piece with its id, type and name, the others with argument
/// text only; pieces of one call in a row are one entry.
fn call_deltas(pieces: Vec<CallPiece>) -> Vec<ToolCallOut> {
    let mut out: Vec<ToolCallOut> = Vec::new();
    for piece in pieces {
        let index = Some(piece.index as u32);
        match out.last_mut() {
            Some(last) if last.index == index && piece.name.is_none() => {
                last.function.arguments.push_str(&piece.arguments)
            }
            _ => out.push(ToolCallOut {
                index,
                id: piece.name.as_ref().map(|_| call_id()),
                kind: piece.name.as_ref().map(|_| "function".to_string()),
                function: FunctionCallOut { name: piece.name, arguments: piece.arguments },
            }),
        }
    }
    out
}

fn chat_logprob(entry: &LogprobEntry) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: entry.token.clone(),
        logprob: entry.logprob,
        bytes: entry.token.as_bytes().to_vec(),
        top_logprobs: entry
            .top
            .iter()
            .map(|(token, logprob)| TopLogprob {
                token: token.clone(),
                logprob: *logprob,
                bytes: token.as_bytes().to_vec(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(index: u32, text: &str, finish_reason: Option<&'static str>) -> ChoiceDelta {
        ChoiceDelta { index, text: text.into(), new_tokens: 1, finish_reason, ..ChoiceDelta::default() }
    }

    #[test]
    fn a_streamed_tool_call_goes_out_by_name_then_argument_fragments() {
        let mut chunks =
            ChatChunks::new("chatcmpl-1".into(), "m".into(), false, Some(Calls::Parsed(ToolParser::Hermes)), 1);
        let pieces = [
            text(0, "Checking <tool", None),
            text(0, "_call>{\"name\": \"weather\", ", None),
            text(0, "\"arguments\": {\"city\": ", None),
            text(0, "\"Oslo\"}}</tool_call>", Some("stop")),
        ];
        let sent: Vec<serde_json::Value> =
            pieces.iter().map(|d| serde_json::from_str(&chunks.delta(d).expect("a chunk")).unwrap()).collect();
        assert_eq!(sent[0]["choices"][0]["delta"]["content"], "Checking ");
        assert_eq!(sent[1]["choices"][0]["delta"]["content"], "", "held back: it may be a call");
        // Named as soon as the name is read: index, id, type and name on the first entry.
        let first = &sent[1]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!((first["index"].as_u64(), first["type"].as_str()), (Some(0), Some("function")), "{first}");
        assert!(first["id"].as_str().is_some_and(|id| id.starts_with("call_")));
        assert_eq!(first["function"]["name"], "weather");
        // Then argument text only, as it comes.
        let fragments: Vec<&serde_json::Value> =
            sent[2..].iter().map(|chunk| &chunk["choices"][0]["delta"]["tool_calls"][0]).collect();
        assert!(
            fragments.iter().all(|f| f.get("id").is_none() && f["function"].get("name").is_none()),
            "{fragments:?}"
        );
        let arguments: String =
            std::iter::once(first).chain(fragments).filter_map(|f| f["function"]["arguments"].as_str()).collect();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&arguments).unwrap(), serde_json::json!({"city": "Oslo"}));
        assert_eq!(sent[3]["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn a_whole_answer_splits_content_and_tool_calls() {
        let chunks =
            ChatChunks::new("chatcmpl-1".into(), "m".into(), false, Some(Calls::Parsed(ToolParser::Hermes)), 2);
        let deltas = vec![
            text(0, "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>", Some("stop")),
            text(1, "no call here", Some("length")),
        ];
        let usage = Usage { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3, prompt_tokens_details: None };
        let whole = serde_json::to_value(chunks.whole(deltas, 2, usage)).unwrap();
        let (first, second) = (&whole["choices"][0], &whole["choices"][1]);
        assert_eq!(first["message"]["content"], serde_json::Value::Null);
        assert_eq!(first["message"]["tool_calls"][0]["function"]["name"], "f");
        assert!(first["message"]["tool_calls"][0].get("index").is_none(), "a message's calls carry no index");
        assert_eq!(first["finish_reason"], "tool_calls");
        assert_eq!(second["message"]["content"], "no call here");
        assert!(second["message"].get("tool_calls").is_none());
        assert_eq!(second["finish_reason"], "length");
    }

    #[test]
    fn a_token_whose_text_is_not_complete_yet_still_sends_its_chunk() {
        let mut chunks = ChatChunks::new("chatcmpl-1".into(), "m".into(), false, None, 1);
        // The first byte of a three-byte character: a token, no text yet.
        let partial = ChoiceDelta { index: 0, new_tokens: 1, ..ChoiceDelta::default() };
        let chunk: serde_json::Value = serde_json::from_str(&chunks.delta(&partial).expect("a chunk")).unwrap();
        assert_eq!(chunk["choices"][0]["delta"]["content"], "");
        // Nothing generated and nothing to say: no chunk.
        assert!(chunks.delta(&ChoiceDelta::default()).is_none());
    }
}
