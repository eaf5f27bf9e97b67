//! TensorRT-LLM's server (`trtllm-serve`) as this worker speaks to it: `/v1/completions` with the router's
//! token ids and `detokenize: false`, so its stream carries `token_ids` and no text, in vLLM's chunk shape
//! otherwise; its request model forbids fields it does not know, so only its own are sent. Logprobs: the
//! sampled token's; its alternatives are keyed by text, which names no token for certain, so a request for
//! alternatives is refused rather than answered without them. Load from `/prometheus/metrics`
//! (`trtllm_num_requests_running`, `…_waiting`, `trtllm_kv_cache_utilization`, `…tokens_per_block`,
//! `…max_blocks`); KV events from its `/kv_cache_events`, which is polled (`--kv-events http://…`).
use super::metrics::Samples;
use super::vllm::{Naming, openai_body, parse_openai_chunk};
use super::{Delta, EngineGauges};
use crate::core::protocol::PreprocessedRequest;
use serde_json::{Value, json};

/// Where `trtllm-serve` exposes Prometheus metrics (its `/metrics` is JSON iteration stats).
pub const METRICS_PATH: &str = "/prometheus/metrics";

/// Why TensorRT-LLM cannot answer `request` as asked, if it cannot.
pub fn refuses(request: &PreprocessedRequest) -> Option<String> {
    if request.constraint.is_some() {
        return Some(
            "structured output is not forwarded to TensorRT-LLM by this worker yet: leave response_format and the \
             guided fields out, or serve with --engine vllm|sglang or the native engine"
                .into(),
        );
    }
    request.logprobs.filter(|&top| top > 0).map(|top| {
        format!(
            "TensorRT-LLM names logprob alternatives by their text, not their token ids, so {top} alternatives cannot \
             be returned: ask for logprobs without alternatives"
        )
    })
}

/// The streamed completion request for `request` (which `refuses` let through).
pub fn completion_body(request: &PreprocessedRequest, model: &str) -> Value {
    let mut body = openai_body(request, model);
    body["detokenize"] = json!(false);
    body["top_k"] = json!(request.sampling.top_k.unwrap_or(0));
    if request.logprobs.is_some() {
        body["logprobs"] = json!(1);
    }
    body
}

pub fn parse_chunk(data: &str, logprobs: bool) -> Result<Delta, String> {
    let naming = Naming {
        engine: "TensorRT-LLM",
        alternatives_by_id: false,
        without_ids: "it should stream token ids with detokenize: false; check its version",
    };
    parse_openai_chunk(data, logprobs, naming)
}

pub fn gauges(samples: &Samples) -> EngineGauges {
    EngineGauges {
        running: samples.sum("trtllm_num_requests_running") as u32,
        waiting: samples.sum("trtllm_num_requests_waiting") as u32,
        kv_usage: samples.mean("trtllm_kv_cache_utilization").unwrap_or(0.0),
        block_size: samples.mean("trtllm_kv_cache_tokens_per_block").map(|b| b as u32),
        num_blocks: samples.mean("trtllm_kv_cache_max_blocks").map(|b| b as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::FinishReason;

    #[test]
    fn the_request_has_only_fields_tensorrt_llm_knows() {
        let mut request = PreprocessedRequest::greedy("r", vec![5, 6], 3);
        request.logprobs = Some(0);
        assert!(refuses(&request).is_none());
        let body = completion_body(&request, "m");
        assert_eq!((body["detokenize"].as_bool(), body["logprobs"].as_u64()), (Some(false), Some(1)));
        assert_eq!(body["top_k"], 0);
        for vllm_only in ["return_token_ids", "return_tokens_as_token_ids"] {
            assert!(body.get(vllm_only).is_none(), "{vllm_only} would be refused");
        }
        request.logprobs = Some(3);
        assert!(refuses(&request).is_some_and(|why| why.contains("alternatives")));
    }

    #[test]
    fn chunks_give_ids_the_sampled_logprob_and_the_finish() {
        let data = r#"{"choices":[{"index":0,"text":"","token_ids":[7,2],"finish_reason":"stop","stop_reason":2,
            "logprobs":{"tokens":["a","</s>"],"token_logprobs":[-0.5,-0.1],"top_logprobs":[{"a":-0.5},{"</s>":-0.1}]}}]}"#;
        let delta = parse_chunk(data, true).unwrap();
        assert_eq!(delta.token_ids, vec![7, 2]);
        assert_eq!(delta.finish_reason, Some(FinishReason::StopToken(2)));
        assert_eq!((delta.logprobs[1].token_id, delta.logprobs[1].logprob), (2, -0.1));
        assert!(delta.logprobs[0].top.is_empty());
        let text_only = r#"{"choices":[{"index":0,"text":"a","finish_reason":null}]}"#;
        assert!(parse_chunk(text_only, false).unwrap_err().contains("detokenize"));
    }

    #[test]
    fn gauges_read_tensorrt_llms_names() {
        let samples = Samples::parse(
            "trtllm_num_requests_running{model_name=\"m\"} 4\ntrtllm_num_requests_waiting{model_name=\"m\"} 2\n\
             trtllm_kv_cache_utilization{model_name=\"m\"} 0.5\ntrtllm_kv_cache_tokens_per_block 32\n\
             trtllm_kv_cache_max_blocks 4096\n",
        );
        let g = gauges(&samples);
        assert_eq!((g.running, g.waiting, g.kv_usage, g.block_size, g.num_blocks), (4, 2, 0.5, Some(32), Some(4096)));
    }
}
