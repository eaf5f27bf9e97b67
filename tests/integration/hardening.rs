//! A hostile client against the real server: oversized and slow requests, connection floods, the API key.
//! Each test ends by showing the server still serves an ordinary request.
use crate::util::{Server, dynamo};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FAST: &[&str] = &["--speedup", "200"];

/// Longest a test waits for the server to do something it must do by itself (close, answer).
const PATIENCE: Duration = Duration::from_secs(20);

async fn still_serves(server: &Server) {
    let (status, body) = server.post_json("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{body}");
}

fn tcp_address(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection; what it sent.
async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let read = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut all)).await;
    assert!(read.is_ok(), "the server kept the connection open for {PATIENCE:?}");
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn the_request_that_crashed_the_server_is_refused_and_serving_goes_on() {
    let server = Server::start(FAST);
    // The reported crash: ~2 M prompts and n = 128 in a 10 MB body.
    let prompts = vec![Value::from("a"); 2_500_000];
    let body = serde_json::to_vec(&json!({"prompt": prompts, "n": 128, "max_tokens": 1})).unwrap();
    assert!(body.len() > 10_000_000);
    let response = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    // The server may answer 413 from Content-Length and close before the whole body is sent.
    if let Ok(response) = response {
        assert_eq!(response.status().as_u16(), 413);
        let error: Value = response.json().await.unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains("--max-request-bytes"), "{error}");
    }
    // Under the size limit, prompts × n is refused from the counts, before any prompt is tokenized.
    let prompts = vec![Value::from("a"); 100_000];
    let (status, error) =
        server.post_json("/v1/completions", json!({"prompt": prompts, "n": 128, "max_tokens": 1})).await;
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("prompt")), "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("at most 1024"), "{error}");
    still_serves(&server).await;
}

#[tokio::test]
async fn a_prompt_far_past_the_context_is_refused_from_its_length() {
    let server = Server::start(FAST);
    let huge = "lorem ipsum ".repeat(500_000);
    let (status, error) = server
        .post_json("/v1/chat/completions", json!({"messages": [{"role": "user", "content": huge}], "max_tokens": 1}))
        .await;
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("messages")), "{error}");
    // Only the check before tokenization speaks in characters.
    assert!(error["error"]["message"].as_str().unwrap().contains("characters"), "{error}");
    let (status, error) = server.post_json("/v1/completions", json!({"prompt": ["Hi", huge], "max_tokens": 1})).await;
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("prompt")), "{error}");
    still_serves(&server).await;
}

#[tokio::test]
async fn connections_past_the_cap_get_503_and_idle_ones_are_closed() {
    let server = Server::start(&["--speedup", "200", "--max-connections", "4", "--http-header-timeout", "2"]);
    let address = tcp_address(&server);
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(&address).await.unwrap());
    }
    // The server takes connections in order: once a fifth is refused, the four above hold every slot.
    let mut fifth = TcpStream::connect(&address).await.unwrap();
    fifth.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut fifth).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1") && answer.contains("open connections"), "{answer}");
    // An idle connection is closed once it has sent no request for the header timeout.
    for tcp in &mut idle {
        assert_eq!(read_to_close(tcp).await, "");
    }
    still_serves(&server).await;
}

#[tokio::test]
async fn a_body_that_never_arrives_times_out_with_408() {
    let server = Server::start(&["--speedup", "200", "--http-body-timeout", "0.5"]);
    let mut tcp = TcpStream::connect(tcp_address(&server)).await.unwrap();
    let head =
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    tcp.write_all(format!("{head}{{\"prompt\":").as_bytes()).await.unwrap();
    let answer = read_to_close(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    still_serves(&server).await;
}

#[tokio::test]
async fn sizes_types_and_unsupported_fields_are_refused_by_name() {
    let server = Server::start(&["--speedup", "200", "--max-request-bytes", "2048"]);
    let client = reqwest::Client::new();
    let big = json!({"prompt": "x".repeat(4096), "max_tokens": 1});
    let response = client.post(server.url("/v1/completions")).json(&big).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let response = client
        .post(server.url("/v1/completions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"prompt": "Hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 415);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("application/json"), "{error}");

    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 0});
    let (status, error) = server.post_json("/v1/chat/completions", chat).await;
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("max_completion_tokens")), "{error}");
    let ids = vec![1; 5000];
    let response = client.post(server.url("/v1/completions")).json(&json!({"prompt": ids})).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 413);
    for (body, field) in [
        (json!({"prompt": "Hi", "logit_bias": {"5": 100}}), "logit_bias"),
        (json!({"prompt": "Hi", "prompt_logprobs": 1}), "prompt_logprobs"),
        (
            json!({"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}}),
            "response_format",
        ),
    ] {
        let (status, error) = server.post_json("/v1/completions", body).await;
        assert_eq!((status, error["error"]["param"].as_str()), (400, Some(field)), "{error}");
    }
    still_serves(&server).await;
}

#[tokio::test]
async fn a_request_of_more_choices_than_the_workers_can_take_is_refused_whole() {
    let server = Server::start(&["--speedup", "200", "--busy-threshold", "3", "--workers", "2"]);
    let (status, error) = server.post_json("/v1/completions", json!({"prompt": ["a", "b"], "n": 4})).await;
    assert_eq!(status, 503, "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("needs 8 streams"), "{error}");
    let (status, body) =
        server.post_json("/v1/completions", json!({"prompt": ["a", "b"], "n": 3, "max_tokens": 2})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_api_key_guards_everything_but_the_probes() {
    let server = Server::start(&["--speedup", "200", "--api-key", "sk-test-123"]);
    let client = reqwest::Client::new();
    let models = |key: Option<&str>| {
        let request = client.get(server.url("/v1/models"));
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
        .send()
    };
    let missing = models(None).await.unwrap();
    assert_eq!(missing.status().as_u16(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["type"], "AuthenticationError");
    assert!(error["error"]["message"].as_str().unwrap().contains("No API key"), "{error}");
    assert_eq!(models(Some("sk-test-124")).await.unwrap().status().as_u16(), 401);
    assert_eq!(models(Some("sk-test-123")).await.unwrap().status().as_u16(), 200);
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let answered = client.post(server.url("/v1/chat/completions")).bearer_auth("sk-test-123").json(&chat);
    assert_eq!(answered.send().await.unwrap().status().as_u16(), 200);
    assert_eq!(server.post("/v1/chat/completions", chat).await.status().as_u16(), 401);
    for open in ["/health", "/live", "/metrics"] {
        assert_eq!(client.get(server.url(open)).send().await.unwrap().status().as_u16(), 200, "{open}");
    }

    let guarded = Server::start(&["--speedup", "200", "--protect-metrics"]);
    // --protect-metrics without a key changes nothing; with one (from the environment) it guards /metrics.
    assert_eq!(client.get(guarded.url("/metrics")).send().await.unwrap().status().as_u16(), 200);
    let keyed = Server::start_with(
        dynamo()
            .args(["run", "--engine", "mocker", "--http-port", "0", "--protect-metrics"])
            .env("DYNAMO_API_KEY", "from-env"),
    );
    assert_eq!(client.get(keyed.url("/metrics")).send().await.unwrap().status().as_u16(), 401);
    let scraped = client.get(keyed.url("/metrics")).bearer_auth("from-env").send().await.unwrap();
    assert_eq!(scraped.status().as_u16(), 200);
    assert_eq!(client.get(keyed.url("/health")).send().await.unwrap().status().as_u16(), 200);
}

#[tokio::test]
async fn browsers_from_an_allowed_origin_get_their_preflight_and_others_do_not() {
    let page = "http://localhost:3000";
    let server = Server::start(&["--speedup", "200", "--api-key", "sk-web", "--allowed-origin", page]);
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization,content-type")
            .send()
    };
    // A preflight carries no key, and is answered anyway.
    let allowed = preflight(page).await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers()["access-control-allow-origin"], page);
    let methods = allowed.headers()["access-control-allow-methods"].to_str().unwrap().to_string();
    assert!(methods.contains("POST"), "{methods}");
    let headers = allowed.headers()["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"), "{headers}");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none(), "{:?}", other.headers());
    // The call itself still needs the key, and its answer names the origin for the browser.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let call = client.post(server.url("/v1/chat/completions")).header("Origin", page).bearer_auth("sk-web").json(&chat);
    let answered = call.send().await.unwrap();
    assert_eq!(answered.status().as_u16(), 200);
    assert_eq!(answered.headers()["access-control-allow-origin"], page);
    // Without the flag nothing is allowed cross-origin, and a bad origin is refused at start.
    let closed = Server::start(&["--speedup", "200"]);
    let options = client.request(reqwest::Method::OPTIONS, closed.url("/v1/models")).header("Origin", page);
    assert!(options.send().await.unwrap().headers().get("access-control-allow-origin").is_none());
    let refused = dynamo().args(["run", "--engine", "mocker", "--allowed-origin", "localhost:3000"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("expected an origin"));
}

/// The binary needs only glibc: libstdc++ (from the vendored libzmq's C++) is linked in.
#[test]
fn the_binary_does_not_load_libstdcxx() {
    let Ok(out) = std::process::Command::new("ldd").arg(env!("CARGO_BIN_EXE_dynamo")).output() else {
        eprintln!("SKIPPED: no ldd on this machine");
        return;
    };
    let libraries = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!libraries.contains("libstdc++"), "{libraries}");
    assert!(libraries.contains("libc.so"), "{libraries}");
}
