//! Disaggregated serving through the engines' own protocols: their KV moves engine to engine (vLLM's NIXL
//! connector, SGLang's bootstrap), and the workers only carry what pairs the two legs of a request.
//!
//! - vLLM: the prefill leg sends the prompt unstreamed with `max_tokens: 1` and
//!   `kv_transfer_params.do_remote_decode`; what vLLM returns in `kv_transfer_params` goes verbatim with the
//!   original request to the decode engine, which pulls the KV and generates every token.
//! - SGLang: both legs carry the same `bootstrap_host`, `bootstrap_port` (the prefill engine's) and a random
//!   `bootstrap_room`, and run at once: the decode engine fetches the KV from the prefill engine's bootstrap
//!   server. The prefill leg's own answer is read and dropped.
//! - TensorRT-LLM: the prefill leg sends the prompt unstreamed with `disaggregated_params.request_type:
//!   context_only`; the `disaggregated_params` it answers with (the first token, the context request's id, the
//!   engine's opaque state) go to the decode engine as `generation_only`, which pulls the KV through its cache
//!   transceiver and streams every token, the first one included.
use super::{ExternalKind, Shared, error_message, http};
use crate::core::protocol::{EngineOutput, FinishReason, HeldKv, PreprocessedRequest};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// SGLang's default `--disaggregation-bootstrap-port`.
pub const SGLANG_BOOTSTRAP_PORT: u16 = 8998;

/// The prefill leg of `request` (a `HandOff::Hold`): its final output names the held KV by the engine's
/// parameters (`HeldKv::engine_params`), with no token.
pub async fn prefill(shared: &Arc<Shared>, request: PreprocessedRequest, sender: &mpsc::UnboundedSender<EngineOutput>) {
    let output = match shared.kind {
        ExternalKind::Vllm => vllm_prefill(shared, &request).await,
        ExternalKind::Sglang => sglang_prefill(shared, &request),
        ExternalKind::Trtllm => trtllm_prefill(shared, &request).await,
    };
    let _ = sender.send(output.unwrap_or_else(|error| EngineOutput {
        finish_reason: Some(FinishReason::Error(error)),
        ..EngineOutput::default()
    }));
}

/// Adds the prefill leg's `params` to the decode leg's `body`.
pub fn decode_leg(kind: ExternalKind, params: &str, body: &mut Value) {
    let params: Value = serde_json::from_str(params).unwrap_or(Value::Null);
    match kind {
        ExternalKind::Vllm => body["kv_transfer_params"] = params,
        ExternalKind::Sglang => {
            if let (Some(body), Some(params)) = (body.as_object_mut(), params.as_object()) {
                body.extend(params.clone());
            }
        }
        ExternalKind::Trtllm => {
            if let Value::Object(mut params) = params {
                params.insert("request_type".into(), "generation_only".into());
                body["disaggregated_params"] = Value::Object(params);
            }
        }
    }
}

fn held(request: &PreprocessedRequest, params: &Value) -> HeldKv {
    HeldKv {
        agent: String::new(),
        lease: 0,
        tokens: request.token_ids.len() as u32,
        pages: Vec::new(),
        layout: Default::default(),
        engine_params: Some(params.to_string()),
    }
}

/// SGLang's legs run together: the prefill leg is sent and left running (its answer read and dropped, its
/// failure logged), and the output that names the bootstrap goes back at once.
fn sglang_prefill(shared: &Arc<Shared>, request: &PreprocessedRequest) -> Result<EngineOutput, String> {
    let host = shared.http.host().ok_or("the engine's URL names no host to bootstrap from")?;
    let params = json!({
        "bootstrap_host": host,
        "bootstrap_port": shared.bootstrap_port,
        "bootstrap_room": rand::random::<u64>() >> 1,
    });
    let (_, mut body) = shared.kind.request(request, &shared.model);
    decode_leg(ExternalKind::Sglang, &params.to_string(), &mut body);
    body["stream"] = false.into();
    let (shared_leg, id) = (shared.clone(), request.request_id.clone());
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let answer = async {
            let response = shared_leg.http.post_json("/generate", &body, &id).await?;
            let status = response.status();
            let body = http::read_bounded(response.into_body()).await?;
            match status.is_success() {
                true => Ok(()),
                false => {
                    Err(format!("{status}: {}", String::from_utf8_lossy(&body).chars().take(300).collect::<String>()))
                }
            }
        };
        if let Err(error) = answer.await {
            tracing::warn!(request = %id, "SGLang's prefill leg failed: {error}");
        }
        shared_leg.in_flight.fetch_sub(1, Ordering::Relaxed);
    });
    Ok(EngineOutput {
        finish_reason: Some(FinishReason::Length),
        held: Some(held(request, &params)),
        ..EngineOutput::default()
    })
}

/// The prefill leg of vLLM's disaggregated serving: the prompt computed with one token to generate and its KV
/// kept for a decode worker (`kv_transfer_params.do_remote_decode`); the final output names it by the
/// parameters vLLM returns, for the decode worker's engine to pull. The token is left out: the decode worker
/// generates from the prompt, as vLLM's own proxies do. When vLLM kept nothing (the one token ended the
/// request, or no connector), the output says so and the decode worker computes the prompt.
async fn vllm_prefill(shared: &Shared, request: &PreprocessedRequest) -> Result<EngineOutput, String> {
    let (_, mut body) = shared.kind.request(request, &shared.model);
    if let Some(fields) = body.as_object_mut() {
        for field in ["stream_options", "min_tokens"] {
            fields.remove(field);
        }
    }
    body["stream"] = false.into();
    body["max_tokens"] = 1.into();
    body["kv_transfer_params"] = json!({
        "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null, "remote_block_ids": null,
        "remote_host": null, "remote_port": null,
    });
    let answer = post_prefill(shared, request, &body, "vLLM").await?;
    let params = answer.get("kv_transfer_params").cloned();
    Ok(prefill_output(request, &answer, params, &["length"], "vLLM"))
}

/// The prefill leg of TensorRT-LLM's disaggregated serving: the prompt sent unstreamed as a `context_only`
/// request (with the router's one-token limit, as TensorRT-LLM's earlier orchestrator sent it), whose answer's
/// `disaggregated_params` (first token, context request id, opaque state) name the KV its cache transceiver
/// keeps for the decode engine. TensorRT-LLM's own orchestrator goes on to the generation leg when the context
/// phase ends `length` or `not_finished`; any other end is the whole answer.
async fn trtllm_prefill(shared: &Shared, request: &PreprocessedRequest) -> Result<EngineOutput, String> {
    let (_, mut body) = shared.kind.request(request, &shared.model);
    if let Some(fields) = body.as_object_mut() {
        fields.remove("stream_options");
    }
    body["stream"] = false.into();
    body["disaggregated_params"] = json!({"request_type": "context_only"});
    let answer = post_prefill(shared, request, &body, "TensorRT-LLM").await?;
    let params = answer["choices"][0].get("disaggregated_params").cloned();
    Ok(prefill_output(request, &answer, params, &["length", "not_finished"], "TensorRT-LLM"))
}

/// Sends a sequential prefill leg (`body`, unstreamed) to the engine's `/v1/completions`; its JSON answer.
async fn post_prefill(
    shared: &Shared,
    request: &PreprocessedRequest,
    body: &Value,
    engine: &str,
) -> Result<Value, String> {
    let response = shared.http.post_json("/v1/completions", body, &request.request_id).await?;
    let status = response.status();
    let body = http::read_bounded(response.into_body()).await?;
    let json: Value =
        serde_json::from_slice(&body).map_err(|e| format!("{engine}'s prefill answer is not JSON ({status}): {e}"))?;
    if !status.is_success() {
        return Err(format!("{engine} refused the prefill ({status}): {}", error_message(&json)));
    }
    Ok(json)
}

/// What a sequential prefill leg's `answer` makes of the request: KV held under `params` for the decode leg when
/// the answer ended as one of `continues`, or the whole answer when its first token was a stop token.
fn prefill_output(
    request: &PreprocessedRequest,
    answer: &Value,
    params: Option<Value>,
    continues: &[&str],
    engine: &str,
) -> EngineOutput {
    let choice = &answer["choices"][0];
    let cached_tokens = answer["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().map(|c| c as u32);
    let params = params.filter(Value::is_object);
    match choice["finish_reason"].as_str() {
        Some(reason) if continues.contains(&reason) => EngineOutput {
            finish_reason: Some(FinishReason::Length),
            cached_tokens,
            held: params.map(|params| held(request, &params)),
            ..EngineOutput::default()
        },
        // The first token ended the request (a stop token): that is the whole answer.
        Some("stop") => {
            let token_ids: Vec<u32> = serde_json::from_value(choice["token_ids"].clone()).unwrap_or_default();
            let stop = choice["stop_reason"].as_u64().map(|id| id as u32).or(token_ids.last().copied());
            match stop {
                Some(id) => EngineOutput {
                    token_ids: vec![id],
                    finish_reason: Some(FinishReason::StopToken(id)),
                    cached_tokens,
                    ..EngineOutput::default()
                },
                None => EngineOutput {
                    finish_reason: Some(FinishReason::Error(format!("{engine} stopped the prefill on no token"))),
                    ..EngineOutput::default()
                },
            }
        }
        other => EngineOutput {
            finish_reason: Some(FinishReason::Error(format!("{engine} ended the prefill with {other:?}"))),
            ..EngineOutput::default()
        },
    }
}
