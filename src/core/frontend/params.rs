//! Request validation shared by both endpoints: JSON in, checked `ChoiceSpec`s out.
//!
//! Every check names the field it rejects, and the limits follow vLLM's (e.g. `top_logprobs` ≤ 20, the
//! prompt plus `max_tokens` within the model's context).
use super::error::ApiError;
use super::generate::{ChoiceSpec, TextOptions};
use crate::core::model::Model;
use crate::core::protocol::openai::SamplingParams;
use crate::core::protocol::{HandOff, PreprocessedRequest, SamplingOptions, StopConditions};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub const MAX_N: u32 = 128;
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Engine requests one HTTP request may start (prompts × n): each is routed and streamed on its own.
pub const MAX_CHOICES: usize = 1024;
/// Prompt tokens summed over a request's generations: each generation carries its prompt to a worker, so n
/// samples of a long prompt hold n copies (128 of a 128k-token prompt would be 64 MiB from one request).
pub const MAX_CHOICE_TOKENS: usize = 1 << 22;

/// Reads the body as JSON, reporting syntax errors plainly.
pub fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(None, format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(None, "the request body must be a JSON object"));
    }
    Ok(value)
}

/// Deserializes `T` from the body, naming the offending field on error.
pub fn fields<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request(None, inner.to_string())
        } else {
            ApiError::invalid(&path, format!("is invalid: {inner}"))
        }
    })
}

/// What an endpoint adds to the shared sampling fields.
pub struct EndpointOptions {
    /// `max_completion_tokens` (chat) takes precedence over `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Alternatives per token, when logprobs were asked for.
    pub logprobs: Option<u32>,
    /// Prefix of the engine request ids (`chatcmpl-…`, `cmpl-…`).
    pub request_id: String,
    /// The request field holding the prompt (`messages`, `prompt`) and the limit (`max_completion_tokens`,
    /// `max_tokens`), for errors to name.
    pub prompt_field: &'static str,
    pub max_tokens_field: &'static str,
}

/// The `n` of a request of `prompts` prompts, checked, and checked that prompts × n stays within
/// `MAX_CHOICES`: before any work is done per prompt or per choice.
pub fn choices_per_prompt(params: &SamplingParams, prompts: usize) -> Result<u32, ApiError> {
    let n = params.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid("n", format!("must be between 1 and {MAX_N}, got {n}")));
    }
    if prompts.saturating_mul(n as usize) > MAX_CHOICES {
        let field = if prompts > 1 { "prompt" } else { "n" };
        return Err(ApiError::bad_request(
            Some(field),
            format!(
                "{prompts} prompt(s) × n = {n} would start {} generations; at most {MAX_CHOICES} are allowed per \
                 request: send fewer prompts or a smaller n",
                prompts.saturating_mul(n as usize)
            ),
        ));
    }
    Ok(n)
}

/// Refuses a text prompt that cannot fit the model's context, from its length alone, before it is tokenized:
/// tokenizing megabytes takes seconds and gigabytes, only to be refused afterwards.
pub fn check_prompt_text(model: &Model, text: &str, field: &str) -> Result<(), ApiError> {
    let context = model.card.context_length;
    let fewest = model.tokenizer.fewest_tokens(text);
    if fewest >= context as usize {
        return Err(ApiError::bad_request(
            Some(field),
            format!(
                "This model's maximum context length is {context} tokens, but the prompt has {} characters, more \
                 than {context} tokens can hold. Please shorten the prompt.",
                text.chars().count()
            ),
        ));
    }
    Ok(())
}

/// Fields that would change the output and that this server does not implement yet: refused by name rather
/// than ignored, so a client never takes free text for what it asked.
pub fn refuse_unsupported(body: &Value) -> Result<(), ApiError> {
    let set = |field: &str| body.get(field).is_some_and(|v| !v.is_null());
    let not_yet = |field: &str, what: &str| Err(ApiError::invalid(field, format!("is not supported yet: {what}")));
    // As OpenAI and vLLM answer: the options describe a stream that is not asked for.
    if set("stream_options") && body.get("stream").and_then(Value::as_bool) != Some(true) {
        return Err(ApiError::invalid("stream_options", "can only be set together with `stream: true`"));
    }
    if body.get("logit_bias").is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty())) {
        return not_yet("logit_bias", "biasing tokens is not implemented; leave it out");
    }
    for (field, what) in [
        ("functions", "the legacy function-calling fields are not implemented; leave them out"),
        ("function_call", "the legacy function-calling fields are not implemented; leave them out"),
        ("prompt_logprobs", "prompt logprobs are not computed"),
        ("allowed_token_ids", "restricting the vocabulary is not implemented"),
        ("bad_words", "banning words is not implemented"),
        ("truncate_prompt_tokens", "prompts are never truncated; shorten the prompt instead"),
        ("use_beam_search", "beam search is not implemented"),
    ] {
        if set(field) && body.get(field) != Some(&Value::Bool(false)) {
            return not_yet(field, what);
        }
    }
    if let Some(best_of) = body.get("best_of").and_then(Value::as_u64)
        && best_of > body.get("n").and_then(Value::as_u64).unwrap_or(1)
    {
        return not_yet(
            "best_of",
            "ranking more samples than are returned is not implemented; leave it out or set it to n",
        );
    }
    Ok(())
}

pub fn build_choices(
    model: &Model,
    params: &SamplingParams,
    prompts: &[Vec<u32>],
    options: &EndpointOptions,
) -> Result<Vec<ChoiceSpec>, ApiError> {
    let sampling = sampling_options(params)?;
    let n = choices_per_prompt(params, prompts.len())?;
    if let Some(top) = options.logprobs
        && top > MAX_TOP_LOGPROBS
    {
        return Err(ApiError::invalid("top_logprobs", format!("must be at most {MAX_TOP_LOGPROBS}, got {top}")));
    }
    let copied: usize = prompts.iter().map(|prompt| prompt.len().saturating_mul(n as usize)).sum();
    if copied > MAX_CHOICE_TOKENS {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} generation(s) of these prompts would carry {copied} prompt tokens to the workers; at most \
                 {MAX_CHOICE_TOKENS} per request: lower n or send the prompts in several requests",
                prompts.len() * n as usize
            ),
        ));
    }
    let stop = stop_strings(params.stop.as_ref())?;
    let constraint = super::structured::constraint(model, params)?;
    let card = &model.card;
    let mut stop_token_ids = params.stop_token_ids.clone().unwrap_or_default();
    if let Some(bad) = stop_token_ids.iter().find(|&&id| id >= card.vocab_size) {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("contains {bad}, outside the vocabulary of {}", card.vocab_size),
        ));
    }
    if !params.ignore_eos.unwrap_or(false) {
        stop_token_ids
            .extend(card.eos_token_ids.iter().filter(|id| !stop_token_ids.contains(id)).copied().collect::<Vec<_>>());
    }
    let text = TextOptions {
        skip_special_tokens: params.skip_special_tokens.unwrap_or(true),
        stop,
        include_stop_str: params.include_stop_str_in_output.unwrap_or(false),
        tokens_as_ids: params.return_tokens_as_token_ids.unwrap_or(false),
        token_ids: params.return_token_ids.unwrap_or(false),
    };

    let mut specs = Vec::with_capacity(prompts.len() * n as usize);
    for (prompt_index, prompt) in prompts.iter().enumerate() {
        let max_tokens = max_tokens_for(card.context_length, prompt.len(), options)?;
        let min_tokens = params.min_tokens.unwrap_or(0);
        if min_tokens > max_tokens {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("({min_tokens}) must not exceed max_tokens ({max_tokens})"),
            ));
        }
        for sample in 0..n {
            let mut sampling = sampling.clone();
            sampling.seed = sampling.seed.map(|seed| choice_seed(seed, sample));
            specs.push(ChoiceSpec {
                index: prompt_index as u32 * n + sample,
                prompt_index,
                request: PreprocessedRequest {
                    request_id: format!("{}-{}", options.request_id, prompt_index as u32 * n + sample),
                    token_ids: prompt.clone(),
                    sampling,
                    stop: StopConditions { max_tokens, min_tokens, stop_token_ids: stop_token_ids.clone() },
                    logprobs: options.logprobs,
                    hand_off: HandOff::None,
                    generated: 0,
                    constraint: constraint.clone(),
                    pooling: None,
                    media: None,
                    adapter: None,
                },
                text: text.clone(),
            });
        }
    }
    Ok(specs)
}

/// Each of n samples needs its own stream of randomness, reproducible from the request's seed, and
/// independent of every other request's: `seed + i` made neighbouring seeds share samples (a seed sweep was
/// mostly duplicates). The first keeps the seed itself, so `n: 1` samples as it always did.
fn choice_seed(seed: u64, choice: u32) -> u64 {
    if choice == 0 {
        return seed;
    }
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..].copy_from_slice(&choice.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

fn max_tokens_for(context: u32, prompt_len: usize, options: &EndpointOptions) -> Result<u32, ApiError> {
    let prompt_len = prompt_len as u64;
    if prompt_len >= u64::from(context) {
        return Err(ApiError::bad_request(
            Some(options.prompt_field),
            format!(
                "This model's maximum context length is {context} tokens, but the prompt has {prompt_len} tokens. Please shorten the prompt."
            ),
        ));
    }
    let field = options.max_tokens_field;
    match options.max_tokens {
        Some(0) => Err(ApiError::invalid(field, "must be at least 1, got 0")),
        Some(max) if prompt_len + u64::from(max) > u64::from(context) => Err(ApiError::bad_request(
            Some(field),
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {max} in `{field}`). Please reduce the length of the prompt or `{field}`.",
                prompt_len + u64::from(max)
            ),
        )),
        Some(max) => Ok(max),
        None => Ok((u64::from(context) - prompt_len) as u32),
    }
}

fn sampling_options(p: &SamplingParams) -> Result<SamplingOptions, ApiError> {
    let defaults = SamplingOptions::default();
    let temperature = p.temperature.unwrap_or(defaults.temperature);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(ApiError::invalid("temperature", format!("must be 0 or more, got {temperature}")));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("must be in (0, 1], got {top_p}")));
    }
    let top_k = match p.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k >= 1 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(ApiError::invalid("top_k", format!("must be -1 (off) or at least 1, got {k}")));
        }
    };
    let min_p = p.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid("min_p", format!("must be in [0, 1], got {min_p}")));
    }
    for (name, value) in [("presence_penalty", p.presence_penalty), ("frequency_penalty", p.frequency_penalty)] {
        if let Some(v) = value
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(ApiError::invalid(name, format!("must be in [-2, 2], got {v}")));
        }
    }
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("must be greater than 0, got {repetition_penalty}"),
        ));
    }
    Ok(SamplingOptions {
        temperature,
        top_p,
        top_k,
        min_p,
        seed: p.seed.map(|s| s as u64),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        repetition_penalty,
    })
}

fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "must be a string or a list of strings")),
        Some(_) => Err(ApiError::invalid("stop", "must be a string or a list of strings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::ModelSource;
    use serde_json::json;

    fn choices(body: Value, prompt_len: usize) -> Result<Vec<ChoiceSpec>, ApiError> {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let params: SamplingParams = fields(&body)?;
        let options = EndpointOptions {
            max_tokens: params.max_tokens,
            logprobs: None,
            request_id: "x".into(),
            prompt_field: "prompt",
            max_tokens_field: "max_tokens",
        };
        build_choices(&model, &params, &[vec![5; prompt_len]], &options)
    }

    #[test]
    fn bad_fields_are_named() {
        for (body, field) in [
            (json!({"temperature": -1}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -5}), "top_k"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 5000}), "max_tokens"),
            (json!({"min_tokens": 9, "max_tokens": 3}), "min_tokens"),
            (json!({"stop": 5}), "stop"),
            (json!({"stop_token_ids": [100000]}), "stop_token_ids"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
        ] {
            let err = choices(body.clone(), 10).err().unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(err.param.as_deref(), Some(field), "{body}: {err:?}");
            assert!(err.message.contains(field), "{body}: {}", err.message);
        }
    }

    #[test]
    fn defaults_fill_the_context_and_add_eos() {
        let specs = choices(json!({"n": 2, "seed": 5, "stop": "x"}), 96).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].request.stop.max_tokens, 4096 - 96);
        assert_eq!(specs[0].request.sampling.seed, Some(5), "the first sample keeps the request's seed");
        // Neighbouring seeds share no sample's seed.
        let seeds = |seed: u64| -> Vec<u64> {
            let specs = choices(json!({"n": 8, "seed": seed}), 4).unwrap();
            specs.iter().map(|s| s.request.sampling.seed.unwrap()).collect()
        };
        let (five, six) = (seeds(5), seeds(6));
        assert!(five.iter().all(|s| !six.contains(s)), "{five:?} {six:?}");
        assert_eq!(five, seeds(5), "reproducible");
        assert_eq!(specs[0].request.stop.stop_token_ids.len(), 2);
        assert_eq!(specs[0].text.stop, vec!["x".to_string()]);
        let no_eos = choices(json!({"ignore_eos": true}), 4).unwrap();
        assert!(no_eos[0].request.stop.stop_token_ids.is_empty());
    }

    #[test]
    fn a_prompt_longer_than_the_context_is_refused() {
        let err = choices(json!({}), 5000).err().unwrap();
        assert!(err.message.contains("maximum context length is 4096"), "{}", err.message);
        assert_eq!(err.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn prompts_times_n_is_bounded_before_any_choice_exists() {
        let ok = SamplingParams { n: Some(128), ..SamplingParams::default() };
        assert_eq!(choices_per_prompt(&ok, 8).unwrap(), 128);
        let err = choices_per_prompt(&ok, 9).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"));
        assert!(err.message.contains("at most 1024"), "{}", err.message);
        // The crash case: two million prompts, n = 128. Refused from the counts alone.
        assert!(choices_per_prompt(&ok, 2_000_000).is_err());
        let n = SamplingParams { n: Some(129), ..SamplingParams::default() };
        assert_eq!(choices_per_prompt(&n, 1).unwrap_err().param.as_deref(), Some("n"));
    }

    #[test]
    fn many_samples_of_a_long_prompt_are_bounded_in_prompt_tokens() {
        let mut long = Model::load(&ModelSource::Builtin, None).unwrap();
        let options = EndpointOptions {
            max_tokens: Some(1),
            logprobs: None,
            request_id: "x".into(),
            prompt_field: "prompt",
            max_tokens_field: "max_tokens",
        };
        let params = SamplingParams { n: Some(128), max_tokens: Some(1), ..SamplingParams::default() };
        // A context of 128k tokens, as real models have: the prompt alone is within it.
        long.card.context_length = 1 << 17;
        let fits = vec![vec![5; MAX_CHOICE_TOKENS / 128]];
        assert_eq!(build_choices(&long, &params, &fits, &options).unwrap().len(), 128);
        let past = vec![vec![5; MAX_CHOICE_TOKENS / 128 + 1]];
        let err = build_choices(&long, &params, &past, &options).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("n"));
        assert!(err.message.contains("at most 4194304"), "{}", err.message);
    }

    #[test]
    fn a_text_far_past_the_context_is_refused_untokenized() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        assert!(check_prompt_text(&model, &"word ".repeat(100), "prompt").is_ok());
        let err = check_prompt_text(&model, &"x".repeat(10_000_000), "messages").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages"));
        assert!(err.message.contains("10000000 characters"), "{}", err.message);
    }

    #[test]
    fn fields_that_would_change_the_output_are_refused_by_name() {
        for (body, field) in [
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (json!({"prompt_logprobs": 1}), "prompt_logprobs"),
            (json!({"best_of": 3, "n": 1}), "best_of"),
            (json!({"use_beam_search": true}), "use_beam_search"),
            (json!({"stream_options": {"include_usage": true}}), "stream_options"),
            (json!({"stream": false, "stream_options": {"include_usage": true}}), "stream_options"),
        ] {
            let err = refuse_unsupported(&body).err().unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(err.param.as_deref(), Some(field), "{body}");
            assert!(err.message.contains(field), "{}", err.message);
        }
        for body in [
            json!({}),
            json!({"logit_bias": {}}),
            json!({"logit_bias": null}),
            json!({"response_format": {"type": "json_object"}}),
            json!({"guided_json": {}, "structured_outputs": {"regex": "a"}}),
            json!({"tools": [{"type": "function"}], "tool_choice": "auto"}),
            json!({"tool_choice": "none"}),
            json!({"best_of": 2, "n": 2}),
            json!({"use_beam_search": false}),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
            json!({"stream_options": null}),
        ] {
            assert!(refuse_unsupported(&body).is_ok(), "{body}");
        }
    }
}
