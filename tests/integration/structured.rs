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
    let mut body = json!({
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
        "max_tokens": 64,
    });
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
