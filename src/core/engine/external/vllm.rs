//! vLLM's OpenAI-compatible server as this worker speaks to it: a `/v1/completions` request whose prompt is
//! the router's token ids (so vLLM neither tokenizes nor applies a template) and whose stop conditions are
//! ours (`ignore_eos` with our stop ids, EOS among them), streamed back as token ids (`return_token_ids`) and
//! logprobs keyed `token_id:N` (`return_tokens_as_token_ids`); `/v1/models` for the model's name and context;
//! and the `vllm:` gauges of `/metrics` for load.
use super::metrics::Samples;
use super::{Delta, EngineGauges};
use crate::core::protocol::{Constraint, FinishReason, PreprocessedRequest, TokenLogprob};
use serde::Deserialize;
use serde_json::{Value, json};

/// The streamed completion request for `request`, to the engine's model `model`.
pub fn completion_body(request: &PreprocessedRequest, model: &str) -> Value {
    let mut body = openai_body(request, model);
    body["return_token_ids"] = json!(true);
    if let Some(k) = request.sampling.top_k {
        body["top_k"] = json!(k);
    }
    if let Some(top) = request.logprobs {
        body["logprobs"] = json!(top);
        body["return_tokens_as_token_ids"] = json!(true);
    }
    if let Some(constraint) = &request.constraint {
        body["structured_outputs"] = structured_outputs(constraint);
    }
    body
}

/// vLLM's `structured_outputs`, which its own structured-output backend enforces. A Lark grammar is
/// read as Lark only by vLLM's `guidance` backend; the others answer with an error, which reaches the client.
fn structured_outputs(constraint: &Constraint) -> Value {
    match constraint {
        // Text this frontend wrote from a parsed schema, so it parses.
        Constraint::JsonSchema(schema) => {
            json!({"json": serde_json::from_str::<Value>(schema).unwrap_or(json!(schema))})
        }
        Constraint::Regex(pattern) => json!({"regex": pattern}),
        Constraint::Choice(choices) => json!({"choice": choices}),
        Constraint::Lark(grammar) => json!({"grammar": grammar}),
    }
}

/// The fields of a streamed `/v1/completions` request that vLLM and TensorRT-LLM read alike: the router's
/// token ids, this worker's stop conditions, the sampling options; under a LoRA adapter, the adapter's name
/// as the model, as both engines name one.
pub fn openai_body(request: &PreprocessedRequest, model: &str) -> Value {
    let s = &request.sampling;
    let mut body = json!({
        "model": request.adapter.as_deref().unwrap_or(model),
        "prompt": request.token_ids,
        "max_tokens": request.stop.max_tokens,
        "min_tokens": request.stop.min_tokens,
        "stop_token_ids": request.stop.stop_token_ids,
        // EOS is in our stop ids unless the client asked to ignore it, so the engine's own EOS check would
        // only stop what the client said not to.
        "ignore_eos": true,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repetition_penalty": s.repetition_penalty,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(seed) = s.seed {
        body["seed"] = json!(seed);
    }
    body
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    logprobs: Option<Logprobs>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    stop_reason: Option<Value>,
}

#[derive(Deserialize)]
struct Logprobs {
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    token_logprobs: Vec<Option<f32>>,
    #[serde(default)]
    top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

/// One `data:` payload of the stream. An error from the engine, or a chunk without the token ids this
/// worker asked for (a server too old for `return_token_ids`), is an `Err` with what to do about it.
pub fn parse_chunk(data: &str, logprobs_asked: bool) -> Result<Delta, String> {
    parse_openai_chunk(data, logprobs_asked, Naming::VLLM)
}

/// How an engine's OpenAI-style chunks name what this worker reads.
pub struct Naming {
    pub engine: &'static str,
    /// Logprob alternatives are keyed `token_id:N` (vLLM's `return_tokens_as_token_ids`); otherwise they are
    /// keyed by text, which names no token for certain, and only the sampled token's logprob is read.
    pub alternatives_by_id: bool,
    /// Why a chunk may lack `token_ids`, and what to do.
    pub without_ids: &'static str,
}

impl Naming {
    const VLLM: Naming = Naming {
        engine: "vLLM",
        alternatives_by_id: true,
        without_ids: "the server predates return_token_ids (vLLM 0.10.2); upgrade it",
    };
}

/// A completion chunk as vLLM streams it, and TensorRT-LLM (`detokenize: false`) in the same shape.
pub fn parse_openai_chunk(data: &str, logprobs_asked: bool, naming: Naming) -> Result<Delta, String> {
    let engine = naming.engine;
    let chunk: Chunk =
        serde_json::from_str(data).map_err(|e| format!("an unreadable stream chunk from {engine}: {e}"))?;
    if let Some(error) = chunk.error {
        return Err(format!("{engine} failed the request: {}", super::error_message(&error)));
    }
    let mut delta = Delta::default();
    if let Some(usage) = chunk.usage {
        delta.usage = true;
        delta.cached_tokens = usage.prompt_tokens_details.and_then(|d| d.cached_tokens);
    }
    let Some(choice) = chunk.choices.into_iter().next() else { return Ok(delta) };
    delta.token_ids = choice
        .token_ids
        .ok_or_else(|| format!("{engine} streamed a chunk without token_ids: {}", naming.without_ids))?;
    if logprobs_asked {
        let logprobs =
            choice.logprobs.ok_or_else(|| format!("{engine} streamed tokens without the logprobs asked for"))?;
        delta.logprobs = token_logprobs(&delta.token_ids, logprobs, &naming)?;
    }
    delta.finish_reason =
        choice.finish_reason.map(|reason| finish(engine, &reason, choice.stop_reason, &delta.token_ids));
    Ok(delta)
}

fn token_logprobs(ids: &[u32], logprobs: Logprobs, naming: &Naming) -> Result<Vec<TokenLogprob>, String> {
    if logprobs.token_logprobs.len() != ids.len() || (naming.alternatives_by_id && logprobs.tokens.len() != ids.len()) {
        return Err(format!(
            "{} streamed {} tokens with {} logprobs: they must pair up",
            naming.engine,
            ids.len(),
            logprobs.token_logprobs.len()
        ));
    }
    let mut top = logprobs.top_logprobs.into_iter();
    ids.iter()
        .zip(logprobs.token_logprobs)
        .map(|(&token_id, logprob)| {
            let named = top.next().flatten().unwrap_or_default();
            let mut alternatives = match naming.alternatives_by_id {
                true => named
                    .into_iter()
                    .map(|(token, logprob)| {
                        Ok((token_id_of(&token)?, logprob.as_f64().unwrap_or(f64::NEG_INFINITY) as f32))
                    })
                    .collect::<Result<Vec<_>, String>>()?,
                false => Vec::new(),
            };
            alternatives.sort_by(|a, b| b.1.total_cmp(&a.1));
            Ok(TokenLogprob { token_id, logprob: logprob.unwrap_or(f32::NEG_INFINITY), top: alternatives })
        })
        .collect()
}

/// `token_id:N`, as vLLM names tokens when asked to (`return_tokens_as_token_ids`).
fn token_id_of(token: &str) -> Result<u32, String> {
    token
        .strip_prefix("token_id:")
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| format!("vLLM named a logprob's token {token:?}, not token_id:N"))
}

/// vLLM's reason in ours: `stop` after a stop id names it in `stop_reason` (the id is the last token, as ours
/// is); `length` is ours; anything else (`abort`, a stop string this worker never sends) ends in error.
fn finish(engine: &str, reason: &str, stop_reason: Option<Value>, ids: &[u32]) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        "stop" => match stop_reason.as_ref().and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok()) {
            Some(id) => FinishReason::StopToken(id),
            None => match ids.last() {
                Some(&id) => FinishReason::StopToken(id),
                None => FinishReason::Error(format!("{engine} stopped without saying on which token")),
            },
        },
        "abort" => FinishReason::Error(format!("{engine} aborted the request")),
        other => FinishReason::Error(format!(
            "{engine} finished the request with {other:?}, which this worker never asks for"
        )),
    }
}

/// Summed over the engine's data-parallel ranks (one series each, label `engine`).
pub fn gauges(samples: &Samples) -> EngineGauges {
    let info = samples.labels_of("vllm:cache_config_info");
    let label = |name: &str| info.and_then(|labels| labels.get(name)).and_then(|v| v.parse::<u64>().ok());
    EngineGauges {
        running: samples.sum("vllm:num_requests_running") as u32,
        waiting: samples.sum("vllm:num_requests_waiting") as u32,
        // `gpu_cache_usage_perc` is the name before vLLM 0.10.
        kv_usage: samples
            .mean("vllm:kv_cache_usage_perc")
            .or_else(|| samples.mean("vllm:gpu_cache_usage_perc"))
            .unwrap_or(0.0),
        block_size: label("block_size").and_then(|b| u32::try_from(b).ok()),
        num_blocks: label("num_gpu_blocks"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::SamplingOptions;

    #[test]
    fn the_request_carries_token_ids_and_our_stop_conditions() {
        let mut request = PreprocessedRequest::greedy("r", vec![5, 6, 7], 9);
        request.stop.stop_token_ids = vec![2, 50];
        request.stop.min_tokens = 3;
        request.sampling =
            SamplingOptions { temperature: 0.5, top_k: Some(4), seed: Some(1), ..SamplingOptions::default() };
        request.logprobs = Some(3);
        let body = completion_body(&request, "org/model");
        assert_eq!(body["model"], "org/model");
        assert_eq!(body["prompt"], json!([5, 6, 7]));
        assert_eq!((body["max_tokens"].as_u64(), body["min_tokens"].as_u64()), (Some(9), Some(3)));
        assert_eq!(body["stop_token_ids"], json!([2, 50]));
        assert_eq!((body["ignore_eos"].as_bool(), body["stream"].as_bool()), (Some(true), Some(true)));
        assert_eq!(
            (body["top_k"].as_u64(), body["seed"].as_u64(), body["logprobs"].as_u64()),
            (Some(4), Some(1), Some(3))
        );
        assert_eq!(body["return_tokens_as_token_ids"], true);
        // Unset options are left to the engine's defaults rather than sent as nulls.
        let plain = completion_body(&PreprocessedRequest::greedy("r", vec![1], 1), "m");
        assert!(plain.get("top_k").is_none() && plain.get("seed").is_none() && plain.get("logprobs").is_none());
        assert!(plain.get("structured_outputs").is_none());
    }

    #[test]
    fn a_constraint_goes_to_vllm_as_its_structured_outputs() {
        let with = |constraint| {
            let request =
                PreprocessedRequest { constraint: Some(constraint), ..PreprocessedRequest::greedy("r", vec![1], 4) };
            completion_body(&request, "m")["structured_outputs"].clone()
        };
        assert_eq!(with(Constraint::JsonSchema(r#"{"type":"object"}"#.into())), json!({"json": {"type": "object"}}));
        assert_eq!(with(Constraint::Regex("a+".into())), json!({"regex": "a+"}));
        assert_eq!(with(Constraint::Choice(vec!["x".into(), "y".into()])), json!({"choice": ["x", "y"]}));
        assert_eq!(with(Constraint::Lark("start: \"a\"".into())), json!({"grammar": "start: \"a\""}));
    }

    #[test]
    fn chunks_become_tokens_logprobs_and_our_finish_reasons() {
        let chunk = r#"{"choices":[{"index":0,"text":"a","token_ids":[17],"finish_reason":null,
            "logprobs":{"tokens":["token_id:17"],"token_logprobs":[-0.25],
                        "top_logprobs":[{"token_id:3":-2.0,"token_id:17":-0.25}],"text_offset":[0]}}]}"#;
        let delta = parse_chunk(chunk, true).unwrap();
        assert_eq!(delta.token_ids, vec![17]);
        assert_eq!(delta.logprobs[0].logprob, -0.25);
        assert_eq!(delta.logprobs[0].top, vec![(17, -0.25), (3, -2.0)]);
        assert_eq!(delta.finish_reason, None);

        let stop = |body: &str| parse_chunk(body, false).unwrap().finish_reason;
        let stopped = r#"{"choices":[{"token_ids":[50],"finish_reason":"stop","stop_reason":50}]}"#;
        assert_eq!(stop(stopped), Some(FinishReason::StopToken(50)));
        let eos = r#"{"choices":[{"token_ids":[2],"finish_reason":"stop","stop_reason":null}]}"#;
        assert_eq!(stop(eos), Some(FinishReason::StopToken(2)));
        let length = r#"{"choices":[{"token_ids":[9],"finish_reason":"length"}]}"#;
        assert_eq!(stop(length), Some(FinishReason::Length));
        let abort = r#"{"choices":[{"token_ids":[],"finish_reason":"abort"}]}"#;
        assert!(matches!(stop(abort), Some(FinishReason::Error(_))));

        let usage = r#"{"choices":[],"usage":{"prompt_tokens":40,"prompt_tokens_details":{"cached_tokens":32}}}"#;
        let delta = parse_chunk(usage, false).unwrap();
        assert!(delta.usage && delta.cached_tokens == Some(32));
    }

    #[test]
    fn what_this_worker_cannot_use_is_an_error_that_says_why() {
        let old_server = r#"{"choices":[{"text":"a","finish_reason":null}]}"#;
        assert!(parse_chunk(old_server, false).unwrap_err().contains("return_token_ids"));
        let unpaired =
            r#"{"choices":[{"token_ids":[1,2],"logprobs":{"tokens":["token_id:1"],"token_logprobs":[-1.0]}}]}"#;
        assert!(parse_chunk(unpaired, true).unwrap_err().contains("pair up"));
        let named = r#"{"choices":[{"token_ids":[1],"logprobs":{"tokens":["a"],"token_logprobs":[-1.0],"top_logprobs":[{"a":-1.0}]}}]}"#;
        assert!(parse_chunk(named, true).unwrap_err().contains("token_id:N"));
        let error = r#"{"error":{"message":"out of memory","code":500}}"#;
        assert!(parse_chunk(error, false).unwrap_err().contains("out of memory"));
        assert!(parse_chunk("not json", false).is_err());
    }

    #[test]
    fn the_model_list_names_the_model_its_context_and_its_adapters() {
        use super::super::{ServedModel, parse_models};
        let body = br#"{"object":"list","data":[{"id":"Qwen/Qwen3-0.6B","object":"model","max_model_len":4096}]}"#;
        let plain = ServedModel { id: "Qwen/Qwen3-0.6B".into(), max_model_len: Some(4096), adapters: Vec::new() };
        assert_eq!(parse_models(body).unwrap(), plain);
        assert!(parse_models(br#"{"data":[]}"#).unwrap_err().contains("no model"));
        // vLLM with --lora-modules: each adapter its own entry, its base model as `parent`, whatever the order.
        let body = br#"{"object":"list","data":[
            {"id":"sql","object":"model","root":"/loras/sql","parent":"Qwen/Qwen3-0.6B","max_model_len":4096},
            {"id":"Qwen/Qwen3-0.6B","object":"model","root":"Qwen/Qwen3-0.6B","parent":null,"max_model_len":4096},
            {"id":"chat","object":"model","root":"/loras/chat","parent":"Qwen/Qwen3-0.6B","max_model_len":4096}]}"#;
        assert_eq!(parse_models(body).unwrap(), ServedModel { adapters: vec!["sql".into(), "chat".into()], ..plain });
    }

    #[test]
    fn a_request_under_an_adapter_names_it_as_the_model() {
        let request =
            PreprocessedRequest { adapter: Some("sql".into()), ..PreprocessedRequest::greedy("r", vec![1], 4) };
        assert_eq!(openai_body(&request, "org/model")["model"], "sql");
    }

    #[test]
    fn gauges_sum_ranks_and_read_the_cache_config() {
        let samples = super::super::metrics::Samples::parse(
            "vllm:num_requests_running{engine=\"0\"} 2\nvllm:num_requests_running{engine=\"1\"} 3\n\
             vllm:num_requests_waiting{engine=\"0\"} 4\nvllm:gpu_cache_usage_perc{engine=\"0\"} 0.5\n\
             vllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"777\"} 1\n",
        );
        let g = gauges(&samples);
        assert_eq!((g.running, g.waiting, g.kv_usage, g.block_size, g.num_blocks), (5, 4, 0.5, Some(32), Some(777)));
        // A worker in front of one rank reads that rank's series, and the ones of no rank (the cache config).
        let g = gauges(&samples.of_rank(1));
        assert_eq!((g.running, g.waiting, g.block_size, g.num_blocks), (3, 0, Some(32), Some(777)));
    }

    #[test]
    fn a_ranks_publisher_is_on_the_port_after_the_ranks_before_it() {
        use super::super::offset_for_rank;
        assert_eq!(offset_for_rank("tcp://10.0.0.5:5557", Some(3)).unwrap(), "tcp://10.0.0.5:5560");
        assert_eq!(offset_for_rank("tcp://[::1]:5557", Some(1)).unwrap(), "tcp://[::1]:5558");
        assert_eq!(offset_for_rank("tcp://h:5557", Some(0)).unwrap(), "tcp://h:5557");
        assert_eq!(offset_for_rank("tcp://h:5557", None).unwrap(), "tcp://h:5557");
        assert_eq!(offset_for_rank("tcp://h:0", Some(2)).unwrap(), "tcp://h:0");
        for bad in ["ipc:///tmp/kv", "tcp://h:65535", "tcp://h:port"] {
            assert!(offset_for_rank(bad, Some(1)).is_err(), "{bad}");
        }
    }
}
