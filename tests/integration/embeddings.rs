//! `/v1/embeddings` through the real binary, on the built-in model (native engine) and the mocker.
use crate::util::Server;
use serde_json::{Value, json};

fn vector(item: &Value) -> Vec<f64> {
    item["embedding"]
        .as_array()
        .unwrap_or_else(|| panic!("no embedding in {item}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[tokio::test]
async fn inputs_in_every_shape_get_their_embeddings() {
    let server = Server::native(&[]);
    let (status, body) = server
        .post_json(
            "/v1/embeddings",
            json!({"model": "tiny-chat", "input": ["the sky is blue", "grass is green", "the sky is blue"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "tiny-chat");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.iter().map(|d| d["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2], "{body}");
    assert!(data.iter().all(|d| d["object"] == "embedding"));
    let vectors: Vec<Vec<f64>> = data.iter().map(vector).collect();
    assert_eq!(vectors[0].len(), 64, "the model's hidden size");
    assert!(vectors.iter().all(|v| (norm(v) - 1.0).abs() < 1e-4), "normalized by default");
    assert_eq!(vectors[0], vectors[2], "equal inputs, equal embeddings");
    assert_ne!(vectors[0], vectors[1]);
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 6 && body["usage"]["total_tokens"] == prompt_tokens, "{body}");

    // The same text as token ids, raw (not normalized), and as base64.
    let ids: Vec<u32> = {
        let (_, tokenized) = server
            .post_json(
                "/v1/completions",
                json!({"prompt": "the sky is blue", "max_tokens": 1, "return_token_ids": true}),
            )
            .await;
        tokenized["choices"][0]["prompt_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (_, by_ids) = server.post_json("/v1/embeddings", json!({"input": ids, "normalize": false})).await;
    let raw = vector(&by_ids["data"][0]);
    let scaled: Vec<f64> = raw.iter().map(|v| v / norm(&raw)).collect();
    assert!((norm(&raw) - 1.0).abs() > 1e-3, "normalize: false returns the hidden state as it is");
    assert!(scaled.iter().zip(&vectors[0]).all(|(a, b)| (a - b).abs() < 1e-4), "the same text as ids");
    let (_, encoded) =
        server.post_json("/v1/embeddings", json!({"input": "the sky is blue", "encoding_format": "base64"})).await;
    let text = encoded["data"][0]["embedding"].as_str().unwrap_or_else(|| panic!("{encoded}"));
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text).unwrap();
    let floats: Vec<f64> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect();
    assert!(floats.iter().zip(&vectors[0]).all(|(a, b)| (a - b).abs() < 1e-6), "base64 holds the same floats");

    for (body, param) in [
        (json!({"input": "x", "encoding_format": "hex"}), "encoding_format"),
        (json!({"input": "x", "dimensions": 8}), "dimensions"),
        (json!({"input": []}), "input"),
        (json!({"input": [999999]}), "input"),
        (json!({"input": 7}), "input"),
        (json!({"input": "word ".repeat(5000)}), "input"),
        (json!({"input": "x", "model": "nope"}), ""),
    ] {
        let (status, answer) = server.post_json("/v1/embeddings", body.clone()).await;
        match param {
            "" => assert_eq!(status, 404, "{body}: {answer}"),
            param => {
                assert_eq!(status, 400, "{body}: {answer}");
                assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
            }
        }
    }
}

#[tokio::test]
async fn the_mocker_embeds_deterministically() {
    let server = Server::start(&["--speedup", "1000", "--workers", "2"]);
    let request = json!({"input": ["a", "b", "a"]});
    let (status, body) = server.post_json("/v1/embeddings", request.clone()).await;
    assert_eq!(status, 200, "{body}");
    let vectors: Vec<Vec<f64>> = body["data"].as_array().unwrap().iter().map(vector).collect();
    assert_eq!(vectors[0], vectors[2]);
    assert_ne!(vectors[0], vectors[1]);
    let (_, again) = server.post_json("/v1/embeddings", request).await;
    assert_eq!(again["data"], body["data"], "the same on any worker, any time");
}
