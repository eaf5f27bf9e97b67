//! The built-in engine served by `dynamo run`: greedy output over HTTP equals what transformers generated.
use crate::util::Server;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn testdata(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(path)
}

fn golden(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(testdata(file)).unwrap()).unwrap()
}

/// Greedy token ids for the golden prompt, read back from `token_id:N` logprob entries.
async fn greedy_ids(server: &Server, model: &str, golden: &Value) -> (Vec<u64>, String) {
    let max_tokens = golden["greedy_ids"].as_array().unwrap().len();
    let body = json!({
        "model": model, "prompt": golden["prompt_ids"], "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "logprobs": 1, "return_tokens_as_token_ids": true,
    });
    let (status, body) = server.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let ids = choice["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().trim_start_matches("token_id:").parse().unwrap())
        .collect();
    (ids, choice["text"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn default_run_serves_the_builtin_model_with_transformers_greedy_output() {
    let server = Server::native(&[]);
    let golden = golden("golden/tiny-chat.json");
    let (ids, text) = greedy_ids(&server, "tiny-chat", &golden).await;
    assert_eq!(ids, serde_json::from_value::<Vec<u64>>(golden["greedy_ids"].clone()).unwrap());
    assert_eq!(text, golden["greedy_text"].as_str().unwrap());
}

#[tokio::test]
async fn a_checkpoint_directory_serves_with_the_same_greedy_tokens_as_transformers() {
    let dir = testdata("golden/llama");
    let server = Server::native(&["--model", dir.to_str().unwrap(), "--served-model-name", "llama"]);
    let golden = golden("golden/llama/golden.json");
    let (ids, _) = greedy_ids(&server, "llama", &golden).await;
    assert_eq!(ids, serde_json::from_value::<Vec<u64>>(golden["greedy_ids"].clone()).unwrap());
}

#[tokio::test]
async fn streaming_chat_with_the_native_engine_finishes_and_counts_cached_tokens() {
    let server = Server::native(&[]);
    let request = json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell me a story about a small robot."}],
                         "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let first = server.post_sse("/v1/chat/completions", request.clone()).await;
    let second = server.post_sse("/v1/chat/completions", request).await;
    let usage = |payloads: &[String]| -> Value {
        let last = &payloads[payloads.len() - 2];
        serde_json::from_str::<Value>(last).unwrap()["usage"].clone()
    };
    let text = |payloads: &[String]| -> String {
        payloads[..payloads.len() - 1]
            .iter()
            .filter_map(|p| serde_json::from_str::<Value>(p).ok())
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .collect()
    };
    assert!(!text(&first).is_empty());
    assert_eq!(text(&first), text(&second), "greedy is deterministic");
    assert_eq!(usage(&first)["prompt_tokens_details"]["cached_tokens"], 0);
    // The second request reuses every full block of the prompt but the last token's.
    assert!(usage(&second)["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 16, "{:?}", usage(&second));
}

#[test]
fn a_model_the_engine_cannot_run_is_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("dynamo-moe-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(testdata("golden/llama").join(f), dir.join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(testdata("golden/llama/config.json")).unwrap()).unwrap();
    config["num_local_experts"] = json!(8);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let output =
        crate::util::dynamo().args(["run", "--http-port", "0", "--model", dir.to_str().unwrap()]).output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("num_local_experts") && stderr.contains("external engine"), "{stderr}");
}

/// Two native workers share one copy of the weights; their KV events reach the router, which sends a
/// repeated prompt back to the worker that cached it.
#[tokio::test]
async fn kv_routing_across_native_workers_reuses_the_cached_prefix() {
    let server = Server::native(&["--workers", "2"]);
    let prompt =
        "The planner forecasts the load with a Kalman filter and decides how many prefill and decode workers to run.";
    let request = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 4, "temperature": 0});
    let (status, first) = server.post_json("/v1/completions", request.clone()).await;
    assert_eq!(status, 200, "{first}");
    // The worker publishes its blocks after the step that computed them; give the router a moment to index them.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Every repeat must go to the worker holding the prefix (round-robin would send the first to the other one).
    for attempt in 0..4 {
        let (_, again) = server.post_json("/v1/completions", request.clone()).await;
        assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"], "greedy is deterministic");
        let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
        assert!(cached >= 16, "repeat {attempt} reused no cached block (cached_tokens {cached}): {again}");
    }
}
