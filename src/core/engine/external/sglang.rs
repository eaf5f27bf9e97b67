//! SGLang's native server as this worker speaks to it: `/generate` with the router's token ids
//! (`input_ids`) and this worker's stop conditions in `sampling_params`, streamed back as `output_ids` with
//! `meta_info` (finish reason, cached prompt tokens, logprobs as `[logprob, id, text]`); `/v1/models` for
//! the model's name; the `sglang:` gauges of `/metrics` (served with `--enable-metrics`) for load.
//!
//! SGLang streams each chunk's `output_ids` either whole so far (its default) or as the step's new ones
//! (`--incremental-streaming-output`); `meta_info.completion_tokens` always counts them all, so the new ones
//! are the last `completion_tokens - delivered` of either.
use super::metrics::Samples;
use super::{Delta, EngineGauges};
use crate::core::protocol::{Constraint, FinishReason, PreprocessedRequest, TokenLogprob};
use serde::Deserialize;
use serde_json::{Value, json};

/// The streamed `/generate` request for `request`.
/// What SGLang cannot do of a request, said before it is sent.
pub fn refuses(request: &PreprocessedRequest) -> Option<String> {
    matches!(request.constraint, Some(Constraint::Lark(_))).then(|| {
        "SGLang takes grammars in EBNF, not Lark: this worker cannot forward a Lark grammar; use a JSON schema, a \
         regex or a choice"
            .to_string()
    })
}

/// One of the choices, whole, as a regex.
fn choice_regex(choices: &[String]) -> String {
    choices.iter().map(|c| regex_syntax::escape(c)).collect::<Vec<_>>().join("|")
}

pub fn generate_body(request: &PreprocessedRequest) -> Value {
    let s = &request.sampling;
    let mut sampling = json!({
        "max_new_tokens": request.stop.max_tokens,
        "min_new_tokens": request.stop.min_tokens,
        "stop_token_ids": request.stop.stop_token_ids,
        // EOS is among our stop ids unless the client asked to ignore it.
        "ignore_eos": true,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k.map_or(-1, i64::from),
        "min_p": s.min_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repetition_penalty": s.repetition_penalty,
    });
    if let Some(seed) = s.seed {
        sampling["sampling_seed"] = json!(seed);
    }
    match &request.constraint {
        Some(Constraint::JsonSchema(schema)) => sampling["json_schema"] = json!(schema),
        Some(Constraint::Regex(pattern)) => sampling["regex"] = json!(pattern),
        Some(Constraint::Choice(choices)) => sampling["regex"] = json!(choice_regex(choices)),
        // Refused before (`refuses`): SGLang reads EBNF, not Lark.
        Some(Constraint::Lark(_)) | None => {}
    }
    let mut body = json!({
        "input_ids": request.token_ids,
        "sampling_params": sampling,
        "stream": true,
        "rid": request.request_id,
    });
    if let Some(top) = request.logprobs {
        body["return_logprob"] = json!(true);
        body["top_logprobs_num"] = json!(top);
    }
    // SGLang names a loaded adapter by `lora_path` (its `--lora-paths NAME=PATH` name).
    if let Some(adapter) = &request.adapter {
        body["lora_path"] = json!(adapter);
    }
    body
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    output_ids: Vec<u32>,
    #[serde(default)]
    meta_info: MetaInfo,
    #[serde(default)]
    error: Option<Value>,
}

/// `[logprob, token id, text or null]`.
type Logprob = (Option<f32>, u32, Value);

#[derive(Deserialize, Default)]
struct MetaInfo {
    #[serde(default)]
    completion_tokens: Option<usize>,
    #[serde(default)]
    cached_tokens: Option<u32>,
    #[serde(default)]
    finish_reason: Option<Value>,
    /// One per generated token.
    #[serde(default)]
    output_token_logprobs: Vec<Logprob>,
    /// Per generated token, its alternatives.
    #[serde(default)]
    output_top_logprobs: Vec<Option<Vec<Logprob>>>,
}

/// One `data:` payload of the stream, of which `delivered` tokens were already taken.
pub fn parse_chunk(data: &str, logprobs_asked: bool, delivered: usize) -> Result<Delta, String> {
    let chunk: Chunk =
        serde_json::from_str(data).map_err(|e| format!("an unreadable stream chunk from SGLang: {e}"))?;
    if let Some(error) = chunk.error {
        return Err(format!("SGLang failed the request: {}", super::error_message(&error)));
    }
    let meta = chunk.meta_info;
    let total = meta.completion_tokens.ok_or("SGLang streamed a chunk without meta_info.completion_tokens")?;
    let new = total.saturating_sub(delivered);
    if new > chunk.output_ids.len() {
        return Err(format!(
            "SGLang says {total} tokens were generated but sent {} after {delivered}",
            chunk.output_ids.len()
        ));
    }
    let mut delta = Delta {
        token_ids: chunk.output_ids[chunk.output_ids.len() - new..].to_vec(),
        cached_tokens: meta.cached_tokens,
        ..Delta::default()
    };
    if logprobs_asked && new > 0 {
        let (lps, tops) = (&meta.output_token_logprobs, &meta.output_top_logprobs);
        if lps.len() < new {
            return Err(format!("SGLang streamed {new} tokens with {} logprobs", lps.len()));
        }
        let tops_from = tops.len().saturating_sub(new);
        delta.logprobs = lps[lps.len() - new..]
            .iter()
            .enumerate()
            .map(|(i, (logprob, token_id, _))| {
                let mut top: Vec<(u32, f32)> = (tops.get(tops_from + i).cloned().flatten().unwrap_or_default())
                    .into_iter()
                    .map(|(lp, id, _)| (id, lp.unwrap_or(f32::NEG_INFINITY)))
                    .collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1));
                TokenLogprob { token_id: *token_id, logprob: logprob.unwrap_or(f32::NEG_INFINITY), top }
            })
            .collect();
    }
    if let Some(reason) = meta.finish_reason.filter(|r| !r.is_null()) {
        let finish = finish(&reason);
        // A stop token ends the output as ours does; SGLang may leave it out of the ids.
        if let FinishReason::StopToken(id) = finish
            && delta.token_ids.last() != Some(&id)
        {
            delta.token_ids.push(id);
        }
        delta.finish_reason = Some(finish);
    }
    Ok(delta)
}

/// SGLang's `{"type": "stop" | "length" | "abort", "matched": …, "message": …}` in ours.
fn finish(reason: &Value) -> FinishReason {
    let kind = reason.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "length" => FinishReason::Length,
        "stop" => match reason.get("matched").and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok()) {
            Some(id) => FinishReason::StopToken(id),
            None => FinishReason::Error(format!("SGLang stopped on {reason}, which this worker never asks for")),
        },
        "abort" => FinishReason::Error(format!(
            "SGLang aborted the request: {}",
            reason.get("message").and_then(Value::as_str).unwrap_or("no reason given")
        )),
        _ => FinishReason::Error(format!("SGLang finished the request with {reason}")),
    }
}

/// SGLang's gauges (`--enable-metrics`), summed over its data-parallel ranks.
pub fn gauges(samples: &Samples) -> EngineGauges {
    let info = samples.labels_of("sglang:cache_config_info");
    let label = |name: &str| info.and_then(|labels| labels.get(name)).and_then(|v| v.parse::<u64>().ok());
    EngineGauges {
        running: samples.sum("sglang:num_running_reqs") as u32,
        waiting: samples.sum("sglang:num_queue_reqs") as u32,
        kv_usage: samples.mean("sglang:token_usage").unwrap_or(0.0),
        block_size: label("page_size").and_then(|b| u32::try_from(b).ok()),
        num_blocks: label("num_pages"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_token_ids_and_our_stop_conditions() {
        let mut request = PreprocessedRequest::greedy("r-1", vec![5, 6, 7], 9);
        request.stop.stop_token_ids = vec![2];
        request.logprobs = Some(2);
        let body = generate_body(&request);
        assert_eq!(body["input_ids"], json!([5, 6, 7]));
        assert_eq!(body["rid"], "r-1");
        let sampling = &body["sampling_params"];
        assert_eq!((sampling["max_new_tokens"].as_u64(), sampling["top_k"].as_i64()), (Some(9), Some(-1)));
        assert_eq!((sampling["ignore_eos"].as_bool(), sampling["stop_token_ids"].clone()), (Some(true), json!([2])));
        assert_eq!((body["return_logprob"].as_bool(), body["top_logprobs_num"].as_u64()), (Some(true), Some(2)));
    }

    #[test]
    fn a_constraint_goes_to_sglang_as_a_schema_or_regex_and_lark_is_refused() {
        let with = |constraint| PreprocessedRequest {
            constraint: Some(constraint),
            ..PreprocessedRequest::greedy("r", vec![1], 4)
        };
        let schema = generate_body(&with(Constraint::JsonSchema(r#"{"type":"object"}"#.into())));
        assert_eq!(schema["sampling_params"]["json_schema"], r#"{"type":"object"}"#);
        let choice = generate_body(&with(Constraint::Choice(vec!["a.b".into(), "c d".into()])));
        assert_eq!(choice["sampling_params"]["regex"], r"a\.b|c d");
        assert!(refuses(&with(Constraint::Regex("x".into()))).is_none());
        assert!(refuses(&with(Constraint::Lark("start: \"a\"".into()))).is_some_and(|why| why.contains("EBNF")));
    }

    #[test]
    fn cumulative_and_incremental_streams_give_the_same_tokens() {
        let chunk = |ids: &str, total: usize, finish: &str| {
            format!(
                r#"{{"text":null,"output_ids":{ids},"meta_info":{{"completion_tokens":{total},"cached_tokens":16,"finish_reason":{finish}}}}}"#
            )
        };
        // SGLang's default: every chunk holds all ids so far.
        let first = parse_chunk(&chunk("[4,5]", 2, "null"), false, 0).unwrap();
        let last = parse_chunk(&chunk("[4,5,6,2]", 4, r#"{"type":"stop","matched":2}"#), false, 2).unwrap();
        assert_eq!((first.token_ids, last.token_ids.clone()), (vec![4, 5], vec![6, 2]));
        assert_eq!(last.finish_reason, Some(FinishReason::StopToken(2)));
        assert_eq!(first.cached_tokens, Some(16));
        // --incremental-streaming-output: only the new ones.
        let last = parse_chunk(&chunk("[6,2]", 4, r#"{"type":"stop","matched":2}"#), false, 2).unwrap();
        assert_eq!(last.token_ids, vec![6, 2]);
        // A stop token SGLang left out of the ids is put back, so the frontend hides it as ours.
        let trimmed = parse_chunk(&chunk("[6]", 3, r#"{"type":"stop","matched":2}"#), false, 2).unwrap();
        assert_eq!(trimmed.token_ids, vec![6, 2]);
        let length = parse_chunk(&chunk("[7]", 1, r#"{"type":"length","length":1}"#), false, 0).unwrap();
        assert_eq!(length.finish_reason, Some(FinishReason::Length));
        let abort = parse_chunk(&chunk("[]", 0, r#"{"type":"abort","message":"oom"}"#), false, 0).unwrap();
        assert!(matches!(abort.finish_reason, Some(FinishReason::Error(m)) if m.contains("oom")));
        assert!(parse_chunk(&chunk("[1]", 5, "null"), false, 0).unwrap_err().contains("5 tokens"));
    }

    #[test]
    fn logprobs_are_the_new_tokens_and_their_alternatives() {
        let data = r#"{"output_ids":[4,5],"meta_info":{"completion_tokens":2,
            "output_token_logprobs":[[-0.1,4,null],[-0.2,5,null]],
            "output_top_logprobs":[[[-0.1,4,null],[-3.0,9,null]],[[-0.2,5,null],[-2.0,8,null]]]}}"#;
        let delta = parse_chunk(data, true, 1).unwrap();
        assert_eq!(delta.token_ids, vec![5]);
        assert_eq!(delta.logprobs, vec![TokenLogprob { token_id: 5, logprob: -0.2, top: vec![(5, -0.2), (8, -2.0)] }]);
    }

    #[test]
    fn gauges_read_sglangs_names() {
        let samples = Samples::parse(
            "sglang:num_running_reqs{tp_rank=\"0\"} 3\nsglang:num_queue_reqs{tp_rank=\"0\"} 1\n\
             sglang:token_usage{tp_rank=\"0\"} 0.25\nsglang:cache_config_info{page_size=\"64\",num_pages=\"900\"} 1\n",
        );
        let g = gauges(&samples);
        assert_eq!((g.running, g.waiting, g.kv_usage, g.block_size, g.num_blocks), (3, 1, 0.25, Some(64), Some(900)));
    }
}
