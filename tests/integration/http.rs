//! The OpenAI frontend over real HTTP: field-by-field responses, streaming, stops, errors, busy, cancel, metrics.
use crate::util::{Server, metric};
use dynamo::core::model::{Model, ModelSource, TemplateInput};
use serde_json::{Value, json};
use std::time::Duration;

/// Fast enough for tests, slow enough that a 1000-token request is still running when we look.
const FAST: &[&str] = &["--speedup", "200"];

fn chat_prompt_tokens(messages: Value) -> usize {
    let model = Model::load(&ModelSource::Builtin, None).unwrap();
    let messages = messages.as_array().unwrap().clone();
    let input = TemplateInput { messages: &messages, tools: None, add_generation_prompt: true, extra: None };
    let text = model.chat_template.unwrap().render(&input).unwrap();
    model.tokenizer.encode(&text, false).unwrap().len()
}

fn chunks(payloads: &[String]) -> Vec<Value> {
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"), "{payloads:?}");
    payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).unwrap()).collect()
}

#[tokio::test]
async fn chat_completion_fields_and_usage() {
    let server = Server::start(FAST);
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]);
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            json!({"model": "tiny-chat", "messages": messages, "max_tokens": 7, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny-chat");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(choice["finish_reason"], "length");
    let prompt_tokens = chat_prompt_tokens(messages) as u64;
    assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(body["usage"]["total_tokens"], prompt_tokens + 7);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn chat_streaming_matches_non_streaming_and_ends_with_usage_and_done() {
    let server = Server::start(FAST);
    let request = json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_completion_tokens": 12, "temperature": 0});
    let (_, whole) = server.post_json("/v1/chat/completions", request.clone()).await;
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let chunks = chunks(&server.post_sse("/v1/chat/completions", streaming).await);

    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks.iter().all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let finishes: Vec<_> = chunks.iter().filter_map(|c| c["choices"].get(0)?["finish_reason"].as_str()).collect();
    assert_eq!(finishes, vec!["length"]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    // Without include_usage, no chunk carries usage.
    let mut plain = request;
    plain["stream"] = json!(true);
    let chunks = crate::http::chunks(&server.post_sse("/v1/chat/completions", plain).await);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}

#[tokio::test]
async fn completions_take_text_token_ids_batches_n_and_echo() {
    let server = Server::start(FAST);
    let (status, body) =
        server.post_json("/v1/completions", json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["usage"]["completion_tokens"], 3);
    // Without max_tokens the legacy endpoint stops at 16, as OpenAI's and vLLM's do.
    let (_, unbounded) =
        server.post_json("/v1/completions", json!({"prompt": "Hello", "temperature": 0, "ignore_eos": true})).await;
    assert_eq!(unbounded["usage"]["completion_tokens"], 16, "{unbounded}");
    assert_eq!(unbounded["choices"][0]["finish_reason"], "length");

    let (_, batch) = server
        .post_json("/v1/completions", json!({"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "n": 2, "temperature": 0}))
        .await;
    let indexes: Vec<_> = batch["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, vec![0, 1, 2, 3]);
    assert_eq!(batch["usage"]["prompt_tokens"], 5);
    assert_eq!(batch["usage"]["completion_tokens"], 8);
    // Greedy: both samples of a prompt agree; the two prompts differ.
    assert_eq!(batch["choices"][0]["text"], batch["choices"][1]["text"]);

    let (_, single) =
        server.post_json("/v1/completions", json!({"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0})).await;
    assert_eq!(single["choices"][0]["text"], batch["choices"][0]["text"]);

    let (_, echoed) = server
        .post_json("/v1/completions", json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "echo": true}))
        .await;
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("Hello{}", body["choices"][0]["text"].as_str().unwrap())
    );

    let stream = server
        .post_sse("/v1/completions", json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": true}))
        .await;
    let text: String =
        chunks(&stream).iter().filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string)).collect();
    assert_eq!(text, body["choices"][0]["text"].as_str().unwrap());
}

/// `body` with the fields of `extra` added.
fn with(body: &Value, extra: Value) -> Value {
    let mut merged = body.clone();
    if let (Some(fields), Some(extra)) = (merged.as_object_mut(), extra.as_object()) {
        fields.extend(extra.clone());
    }
    merged
}

#[tokio::test]
async fn return_token_ids_gives_the_prompts_and_the_generated_ids_as_vllm_does() {
    let server = Server::start(FAST);
    let tokenizer = Model::load(&ModelSource::Builtin, None).unwrap().tokenizer;
    let body = json!({"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 4, "temperature": 0, "ignore_eos": true,
                      "return_token_ids": true});
    let (status, whole) = server.post_json("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{whole}");
    for (choice, prompt) in whole["choices"].as_array().unwrap().iter().zip([json!([5, 6, 7]), json!([8, 9])]) {
        assert_eq!(choice["prompt_token_ids"], prompt, "{whole}");
        let ids: Vec<u32> = serde_json::from_value(choice["token_ids"].clone()).unwrap();
        assert_eq!(ids.len(), 4, "{whole}");
        assert_eq!(choice["text"].as_str().unwrap(), tokenizer.decode(&ids, true), "{whole}");
    }
    // Streamed: the prompt's ids on each choice's first chunk only, and the chunks' ids add up to the whole.
    let stream = server.post_sse("/v1/completions", with(&body, json!({"stream": true}))).await;
    let parts = chunks(&stream);
    let of_choice = |index: u64| parts.iter().filter(move |c| c["choices"][0]["index"] == index);
    for (index, whole_choice) in whole["choices"].as_array().unwrap().iter().enumerate() {
        let with_prompt: Vec<&Value> =
            of_choice(index as u64).filter(|c| c["choices"][0].get("prompt_token_ids").is_some()).collect();
        assert_eq!(with_prompt.len(), 1, "{parts:?}");
        let ids: Vec<Value> = of_choice(index as u64)
            .flat_map(|c| c["choices"][0]["token_ids"].as_array().cloned().unwrap_or_default())
            .collect();
        assert_eq!(Value::from(ids), whole_choice["token_ids"], "{parts:?}");
    }
    // Chat: the prompt's ids once, on the response (the first chunk when streamed), each choice's its own.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
                      "ignore_eos": true, "return_token_ids": true});
    let (_, answer) = server.post_json("/v1/chat/completions", chat.clone()).await;
    let prompt = answer["prompt_token_ids"].as_array().map_or(0, Vec::len);
    assert_eq!(prompt as u64, answer["usage"]["prompt_tokens"].as_u64().unwrap(), "{answer}");
    assert_eq!(answer["choices"][0]["token_ids"].as_array().map(Vec::len), Some(3), "{answer}");
    let stream = server.post_sse("/v1/chat/completions", with(&chat, json!({"stream": true}))).await;
    let parts = chunks(&stream);
    assert_eq!(parts.iter().filter(|c| c.get("prompt_token_ids").is_some()).count(), 1, "{parts:?}");
    // Without it, none of that.
    let (_, plain) = server.post_json("/v1/completions", json!({"prompt": [5], "max_tokens": 2})).await;
    assert!(plain["choices"][0].get("token_ids").is_none() && plain["choices"][0].get("prompt_token_ids").is_none());
}

#[tokio::test]
async fn seeded_sampling_is_reproducible() {
    let server = Server::start(FAST);
    let request = json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0.8, "seed": 42});
    let (_, a) = server.post_json("/v1/completions", request.clone()).await;
    let (_, b) = server.post_json("/v1/completions", request).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[tokio::test]
async fn stop_strings_cut_the_text_and_finish_with_stop() {
    let server = Server::start(FAST);
    let base = json!({"prompt": "The router", "max_tokens": 24, "temperature": 0});
    let (_, free) = server.post_json("/v1/completions", base.clone()).await;
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 12, "{text:?}");
    let stop: String = chars[8..11].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut request = base.clone();
        request["stop"] = json!(["never-in-output", stop]);
        request["stream"] = json!(stream);
        let (got, finish) = if stream {
            let chunks = chunks(&server.post_sse("/v1/completions", request).await);
            let text: String =
                chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string)).collect();
            (text, chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let (_, body) = server.post_json("/v1/completions", request).await;
            (body["choices"][0]["text"].as_str().unwrap().to_string(), body["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(got, expected, "stream={stream}");
        assert_eq!(finish, "stop");
    }
}

#[tokio::test]
async fn stop_token_ids_and_min_tokens() {
    let server = Server::start(FAST);
    let request = json!({"prompt": "Hello", "max_tokens": 10, "temperature": 0, "logprobs": 0, "return_tokens_as_token_ids": true});
    let (_, free) = server.post_json("/v1/completions", request.clone()).await;
    let ids: Vec<u32> = free["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().strip_prefix("token_id:").unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 10);
    let stop = ids[2];
    let first = ids.iter().position(|&t| t == stop).unwrap();
    let mut stopped = request.clone();
    stopped["stop_token_ids"] = json!([stop]);
    let (_, body) = server.post_json("/v1/completions", stopped.clone()).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], first as u64 + 1);
    stopped["min_tokens"] = json!(first + 2);
    let (_, body) = server.post_json("/v1/completions", stopped).await;
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() >= first as u64 + 2);
}

#[tokio::test]
async fn chat_logprobs_have_the_openai_shape() {
    let server = Server::start(FAST);
    let (_, body) = server
        .post_json(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": true, "top_logprobs": 3}),
        )
        .await;
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    for entry in content {
        let token = entry["token"].as_str().unwrap();
        assert_eq!(entry["bytes"], json!(token.as_bytes()));
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 3);
        assert_eq!(entry["top_logprobs"][0]["token"], entry["token"]);
    }
    let (_, ids) = server
        .post_json(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": true, "return_tokens_as_token_ids": true}),
        )
        .await;
    let token = ids["choices"][0]["logprobs"]["content"][0]["token"].as_str().unwrap().to_string();
    assert!(token.strip_prefix("token_id:").unwrap().parse::<u32>().is_ok(), "{token}");
}

#[tokio::test]
async fn a_repeated_prefix_shows_up_in_cached_tokens() {
    let server = Server::start(FAST);
    let prompt: Vec<u32> = (100..140).collect();
    let request = json!({"prompt": prompt, "max_tokens": 2});
    let (_, cold) = server.post_json("/v1/completions", request.clone()).await;
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, warm) = server.post_json("/v1/completions", request).await;
    // 40 tokens = 2 full blocks of 16 (the last token is always computed).
    assert_eq!(warm["usage"]["prompt_tokens_details"]["cached_tokens"], 32);
}

#[tokio::test]
async fn bad_input_gets_openai_errors_that_name_the_field() {
    let server = Server::start(FAST);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (chat(json!({"temperature": "hot"})), "temperature"),
        (chat(json!({"top_p": 1.5})), "top_p"),
        (chat(json!({"n": 0})), "n"),
        (chat(json!({"top_logprobs": 3})), "top_logprobs"),
        (chat(json!({"logprobs": true, "top_logprobs": 30})), "top_logprobs"),
        (chat(json!({"max_tokens": 100000})), "max_tokens"),
        (chat(json!({"stop": {"a": 1}})), "stop"),
        (json!({"messages": [{"content": "no role"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content[0]",
        ),
        (json!({"messages": []}), "messages"),
    ];
    for (body, field) in cases {
        let (status, error) = server.post_json("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} → {error}");
        assert_eq!(error["error"]["code"], 400);
        assert_eq!(error["error"]["type"], "BadRequestError");
        assert_eq!(error["error"]["param"], field, "{error}");
        assert!(error["error"]["message"].as_str().unwrap().contains(field), "{error}");
    }
    let (status, error) = server.post_json("/v1/completions", json!({"prompt": [1, 99999], "max_tokens": 1})).await;
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("prompt")));
    let (status, error) = server.post_json("/v1/completions", json!({"max_tokens": 1})).await;
    assert_eq!(status, 400);
    assert!(error["error"]["message"].as_str().unwrap().contains("prompt"), "{error}");

    let raw = reqwest::Client::new().post(server.url("/v1/completions")).body("{not json").send().await.unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let error: Value = raw.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("not valid JSON"));

    let (status, error) = server.post_json("/v1/completions", json!({"model": "gpt-9", "prompt": "x"})).await;
    assert_eq!(status, 404);
    assert!(error["error"]["message"].as_str().unwrap().contains("gpt-9"));

    // Unknown fields are ignored, as vLLM does.
    let (status, _) = server.post_json("/v1/chat/completions", chat(json!({"frobnicate": true, "user": "u1"}))).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn busy_workers_get_503_with_retry_after() {
    let server = Server::start(&["--speedup", "1", "--busy-threshold", "1"]);
    let long = json!({"prompt": "Hello", "max_tokens": 2000, "stream": true});
    let mut held = server.post("/v1/completions", long.clone()).await;
    assert_eq!(held.status().as_u16(), 200);
    held.chunk().await.unwrap();
    let refused = server.post("/v1/completions", long).await;
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], 503);
    drop(held);
    // Once the held request is gone, the worker takes requests again.
    let mut accepted = false;
    for _ in 0..100 {
        if server.post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 1})).await.status().as_u16() == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted, "the worker stayed busy after the client left");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_request_in_the_engine() {
    let server = Server::start(&["--speedup", "1"]);
    let mut response = server
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3000, "stream": true}),
        )
        .await;
    response.chunk().await.unwrap();
    server
        .wait_for_metrics(Duration::from_secs(10), |m| {
            metric(m, "dynamo_component_requests_running{worker_id=\"0\"}") == Some(1.0)
        })
        .await;
    drop(response);
    let text = server
        .wait_for_metrics(Duration::from_secs(10), |m| {
            metric(m, "dynamo_component_requests_running{worker_id=\"0\"}") == Some(0.0)
                && metric(m, "dynamo_component_kvstats_active_blocks{worker_id=\"0\"}") == Some(0.0)
        })
        .await;
    assert_eq!(metric(&text, "dynamo_frontend_inflight_requests{model=\"tiny-chat\"}"), Some(0.0));
    let cancelled = "dynamo_frontend_requests_total{endpoint=\"chat_completions\",model=\"tiny-chat\",request_type=\"stream\",status=\"cancelled\"}";
    assert_eq!(metric(&text, cancelled), Some(1.0), "{text}");
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_latency() {
    let server = Server::start(FAST);
    for stream in [false, true] {
        let response =
            server.post("/v1/completions", json!({"prompt": "Hello", "max_tokens": 5, "stream": stream})).await;
        assert_eq!(response.status().as_u16(), 200);
        response.text().await.unwrap();
    }
    let text = server.metrics().await;
    for (request_type, count) in [("unary", 1.0), ("stream", 1.0)] {
        let sample = format!(
            "dynamo_frontend_requests_total{{endpoint=\"completions\",model=\"tiny-chat\",request_type=\"{request_type}\",status=\"success\"}}"
        );
        assert_eq!(metric(&text, &sample), Some(count), "{sample}\n{text}");
    }
    let m = |name: &str| metric(&text, &format!("{name}{{model=\"tiny-chat\"}}"));
    assert_eq!(m("dynamo_frontend_time_to_first_token_seconds_count"), Some(2.0));
    assert_eq!(m("dynamo_frontend_inter_token_latency_seconds_count"), Some(8.0));
    assert_eq!(m("dynamo_frontend_output_sequence_tokens_sum"), Some(10.0));
    assert_eq!(m("dynamo_frontend_request_duration_seconds_count"), Some(2.0));
    assert!(m("dynamo_frontend_input_sequence_tokens_sum").unwrap() >= 2.0);
    assert_eq!(m("dynamo_frontend_inflight_requests"), Some(0.0));
    // vLLM's names for the same load, for tools that read vLLM's /metrics.
    let v = |name: &str| metric(&text, &format!("{name}{{model_name=\"tiny-chat\"}}"));
    assert_eq!((v("vllm:num_requests_running"), v("vllm:num_requests_waiting")), (Some(0.0), Some(0.0)), "{text}");
    assert_eq!(v("vllm:kv_cache_usage_perc"), Some(0.0), "{text}");
    let info = "vllm:cache_config_info{block_size=\"16\",model_name=\"tiny-chat\",num_gpu_blocks=\"16384\"}";
    assert_eq!(metric(&text, info), Some(1.0), "{text}");
}

#[tokio::test]
async fn models_health_live_and_unknown_routes() {
    let server = Server::start(&["--workers", "3"]);
    let models: Value = reqwest::get(server.url("/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-chat");
    assert_eq!(models["data"][0]["max_model_len"], 4096);
    // One model by id, as `client.models.retrieve` asks; an unknown one is OpenAI's 404.
    let one: Value = reqwest::get(server.url("/v1/models/tiny-chat")).await.unwrap().json().await.unwrap();
    assert_eq!(one, models["data"][0]);
    let unknown = reqwest::get(server.url("/v1/models/org/other-model")).await.unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    let error: Value = unknown.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("org/other-model"), "{error}");
    let health = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["workers"], 3);
    assert_eq!(reqwest::get(server.url("/live")).await.unwrap().text().await.unwrap(), "ok");
    let missing = reqwest::get(server.url("/v2/nothing")).await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], 404);
}

#[tokio::test]
async fn a_non_streaming_client_that_disconnects_cancels_too() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(&["--speedup", "1"]);
    let body = json!({"prompt": "Hello", "max_tokens": 3000}).to_string();
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let running = "dynamo_component_requests_running{worker_id=\"0\"}";
    server.wait_for_metrics(Duration::from_secs(10), |m| metric(m, running) == Some(1.0)).await;
    drop(socket);
    let text = server.wait_for_metrics(Duration::from_secs(10), |m| metric(m, running) == Some(0.0)).await;
    let cancelled = "dynamo_frontend_requests_total{endpoint=\"completions\",model=\"tiny-chat\",request_type=\"unary\",status=\"cancelled\"}";
    assert_eq!(metric(&text, cancelled), Some(1.0), "{text}");
}

#[tokio::test]
async fn kv_routing_sends_a_repeated_prompt_to_the_worker_that_cached_it() {
    let server = Server::start(&["--speedup", "200", "--workers", "3", "--router-mode", "kv"]);
    let prompt: Vec<u32> = (100..140).collect();
    let request = json!({"prompt": prompt, "max_tokens": 2});
    let (_, cold) = server.post_json("/v1/completions", request.clone()).await;
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    for _ in 0..4 {
        let (_, warm) = server.post_json("/v1/completions", request.clone()).await;
        assert_eq!(warm["usage"]["prompt_tokens_details"]["cached_tokens"], 32, "{warm}");
    }
    let text = server.metrics().await;
    assert_eq!(metric(&text, "dynamo_router_overlap_blocks_count{model=\"tiny-chat\"}"), Some(5.0), "{text}");
    assert_eq!(metric(&text, "dynamo_router_overlap_blocks_sum{model=\"tiny-chat\"}"), Some(4.0 * 2.0), "{text}");
}

#[tokio::test]
async fn tools_need_a_known_call_format_and_then_are_read_from_the_output() {
    let tools = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
    let body = json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "Weather in Oslo?"}],
                      "tools": tools, "max_tokens": 6, "temperature": 0});
    // The built-in model's template names no tool-call format: its calls could not be read, so it says so.
    let plain = Server::start(FAST);
    let (status, error) = plain.post_json("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 400, "{error}");
    assert!(error["error"]["message"].as_str().unwrap_or_default().contains("--tool-call-parser"), "{error}");
    let (status, answer) = plain.post_json("/v1/chat/completions", with(&body, json!({"tool_choice": "none"}))).await;
    assert_eq!(status, 200, "declined tools need no format: {answer}");

    // With a format named, the request is served; the mocker's text holds no call, so it is all content.
    let hermes = Server::start(&["--speedup", "200", "--tool-call-parser", "hermes"]);
    let (status, answer) = hermes.post_json("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    assert!(choice["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{answer}");
    assert!(choice["message"].get("tool_calls").is_none(), "{answer}");
    assert_eq!(choice["finish_reason"], "length");
    let streamed = hermes.post_sse("/v1/chat/completions", with(&body, json!({"stream": true}))).await;
    let text: String = chunks(&streamed)
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, choice["message"]["content"].as_str().unwrap_or_default(), "streamed as whole");
}
