//! Structured output through the real binary: the built-in model (random weights, so only the grammar makes
//! its text JSON) answers in the requested shape, whole or cut by `max_tokens`, aggregated and disaggregated.
use crate::util::Server;
use serde_json::{Value, json};

fn verdict_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "confidence": {"type": "integer", "minimum": 1, "maximum": 5},
            "sure": {"type": "boolean"},
        },
        "required": ["answer", "confidence", "sure"],
        "additionalProperties": false,
    })
}

fn assert_verdict(text: &str) {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"));
    assert!(["yes", "no"].contains(&value["answer"].as_str().unwrap_or("")), "{text}");
    assert!((1..=5).contains(&value["confidence"].as_i64().unwrap_or(0)), "{text}");
    assert!(value["sure"].is_boolean(), "{text}");
}

fn chat(extra: Value) -> Value {
    let body = json!({
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
        "max_tokens": 64,
    });
    merged(body, &extra)
}

/// `body` with `extra`'s fields set over its own.
fn merged(mut body: Value, extra: &Value) -> Value {
    for (key, value) in extra.as_object().into_iter().flatten() {
        body[key] = value.clone();
    }
    body
}

/// Every way of asking for a schema, greedy and sampled, whole and streamed.
async fn answers_in_shape(server: &Server) {
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "verdict", "schema": verdict_schema(), "strict": true}});
    for (extra, sampled) in [
        (json!({"response_format": format, "temperature": 0}), false),
        (json!({"response_format": format, "temperature": 1.0, "seed": 7, "n": 3}), true),
        (json!({"guided_json": verdict_schema(), "temperature": 0.8}), true),
        (json!({"structured_outputs": {"json": verdict_schema()}}), true),
    ] {
        let (status, body) = server.post_json("/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(status, 200, "{body}");
        for choice in body["choices"].as_array().unwrap() {
            assert_eq!(choice["finish_reason"], "stop", "{extra} (sampled: {sampled}): {body}");
            assert_verdict(choice["message"]["content"].as_str().unwrap_or(""));
        }
    }
    let payloads =
        server.post_sse("/v1/chat/completions", chat(json!({"response_format": format, "stream": true}))).await;
    let mut text = String::new();
    let mut finish = Value::Null;
    for payload in payloads.iter().filter(|p| *p != "[DONE]") {
        let chunk: Value = serde_json::from_str(payload).unwrap();
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
            }
        }
    }
    assert_eq!(finish, "stop", "{payloads:?}");
    assert_verdict(&text);
}

#[tokio::test]
async fn the_built_in_model_answers_in_the_requested_shape() {
    let server = Server::native(&[]);
    answers_in_shape(&server).await;

    let choices = ["red", "green", "light blue"];
    let (status, body) = server
        .post_json(
            "/v1/completions",
            json!({"model": "tiny-chat", "prompt": "Colour:", "max_tokens": 16, "guided_choice": choices, "n": 4, "temperature": 1.0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for choice in body["choices"].as_array().unwrap() {
        assert!(choices.contains(&choice["text"].as_str().unwrap_or("")), "{body}");
        assert_eq!(choice["finish_reason"], "stop", "{body}");
    }
    let (status, body) = server
        .post_json(
            "/v1/completions",
            json!({"model": "tiny-chat", "prompt": "Code:", "max_tokens": 16, "guided_regex": "[A-Z]{2}-[0-9]{3}"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let code = body["choices"][0]["text"].as_str().unwrap_or("").to_string();
    assert!(code.len() == 6 && code.as_bytes()[2] == b'-', "{body}");
}

#[tokio::test]
async fn output_cut_by_max_tokens_ends_for_length_and_bad_schemas_are_refused_by_name() {
    let server = Server::native(&[]);
    // Three tokens cannot hold the object, and the answer says so rather than calling it done.
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": verdict_schema()}}, "max_tokens": 3})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    for (extra, param) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "no-such-type"}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "v"}}}),
            "response_format.json_schema.schema",
        ),
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (json!({"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
    ] {
        let (status, body) = server.post_json("/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(body["error"]["param"], param, "{extra}: {body}");
    }
}

#[tokio::test]
async fn a_prefill_worker_hands_the_constrained_output_on_in_shape() {
    let server = Server::native(&["--prefill-workers", "1", "--disagg-threshold", "0"]);
    answers_in_shape(&server).await;
    let metrics = server.metrics().await;
    let remote = crate::util::metric(&metrics, "dynamo_router_disagg_decisions_total{decision=\"remote\"}");
    assert!(remote >= Some(5.0), "the prompts were not prefilled remotely: {metrics}");
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "time", "parameters": {
            "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
            "additionalProperties": false}}},
    ])
}

fn assert_weather_arguments(arguments: &str) {
    let value: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{arguments}: {e}"));
    assert!(["Oslo", "Lima"].contains(&value["city"].as_str().unwrap_or("")), "{arguments}");
    assert!((1..=7).contains(&value["days"].as_i64().unwrap_or(0)), "{arguments}");
}

/// `tool_choice` forcing a call works on a model that was never taught a tool format (the built-in one): the
/// output is the call's JSON, held to the tools' schemas, as vLLM does it.
#[tokio::test]
async fn a_forced_tool_call_is_made_whatever_format_the_model_knows() {
    let server = Server::native(&[]);
    let ask = |extra: Value| chat(merged(json!({"tools": weather_tools(), "max_tokens": 200}), &extra));
    let named = json!({"tool_choice": {"type": "function", "function": {"name": "weather"}}, "temperature": 0});
    let (status, body) = server.post_json("/v1/chat/completions", ask(named.clone())).await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    assert!(message["content"].is_null(), "{body}");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "weather", "{body}");
    assert_weather_arguments(message["tool_calls"][0]["function"]["arguments"].as_str().unwrap_or(""));
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "OpenAI answers a named function with stop: {body}");

    let mut streamed = named.clone();
    streamed["stream"] = json!(true);
    let payloads = server.post_sse("/v1/chat/completions", ask(streamed)).await;
    let chunks: Vec<Value> =
        payloads.iter().filter(|p| *p != "[DONE]").map(|p| serde_json::from_str(p).unwrap()).collect();
    let calls: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
    // The first entry names the call; the rest add argument text, all to call 0.
    assert!(calls.iter().all(|c| c["index"] == 0), "{payloads:?}");
    assert_eq!(calls[0]["function"]["name"], "weather", "{payloads:?}");
    assert!(calls[1..].iter().all(|c| c.get("id").is_none()), "{payloads:?}");
    let streamed: String = calls.iter().filter_map(|c| c["function"]["arguments"].as_str()).collect();
    assert_eq!(streamed, message["tool_calls"][0]["function"]["arguments"], "the same arguments as whole");

    for (extra, most) in [
        (json!({"tool_choice": "required", "parallel_tool_calls": false}), 1),
        (json!({"tool_choice": "required", "temperature": 1.0, "seed": 3}), usize::MAX),
    ] {
        let (status, body) = server.post_json("/v1/chat/completions", ask(extra.clone())).await;
        assert_eq!(status, 200, "{body}");
        let calls = body["choices"][0]["message"]["tool_calls"].as_array().cloned().unwrap_or_default();
        assert!(!calls.is_empty() && calls.len() <= most, "{extra}: {body}");
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{body}");
        for call in &calls {
            let arguments = call["function"]["arguments"].as_str().unwrap_or("");
            match call["function"]["name"].as_str() {
                Some("weather") => assert_weather_arguments(arguments),
                Some("time") => {
                    assert!(arguments == r#"{"zone":"UTC"}"# || arguments == r#"{"zone":"CET"}"#, "{arguments}")
                }
                other => panic!("a call to {other:?}: {body}"),
            }
        }
    }

    for (extra, param) in [
        (json!({"tool_choice": {"type": "function", "function": {"name": "nowhere"}}}), "tool_choice"),
        (json!({"tool_choice": "required", "tools": []}), "tool_choice"),
        (json!({"tool_choice": "required", "response_format": {"type": "json_object"}}), "tool_choice"),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tool_choice": "auto", "parallel_tool_calls": false}), "parallel_tool_calls"),
        (
            json!({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]}),
            "tools",
        ),
    ] {
        let (status, body) = server.post_json("/v1/chat/completions", ask(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(body["error"]["param"], param, "{extra}: {body}");
    }
}

/// Across processes: the constraint travels on the request plane to a `dynamo decode` worker, and the router
/// compiles it against the model files the worker sent; embeddings come back the same way.
#[tokio::test]
async fn a_router_and_a_worker_in_other_processes_answer_in_shape_and_embed() {
    let (_, file) = crate::cluster::cluster_file("structured");
    let _worker = crate::util::Worker::start(&["--threads", "1", "--discovery", &file]);
    let router = crate::cluster::route(&file);
    crate::cluster::wait_for_workers(&router, 1).await;
    answers_in_shape(&router).await;
    let (status, body) = router.post_json("/v1/chat/completions", chat(json!({"guided_regex": "(unclosed"}))).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("guided_regex")), "{body}");
    let (status, body) = router.post_json("/v1/embeddings", json!({"input": ["one", "two"]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][1]["embedding"].as_array().map(Vec::len), Some(64), "{body}");
}
