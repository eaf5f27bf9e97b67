//! `dynamo bench http`: what the HTTP frontend adds on top of the engine.
//!
//! The same stack `dynamo run` builds, with mocker workers at a very high speedup so engine time is
//! negligible, is loaded twice per level: through HTTP (a streaming chat completion: JSON parsing, chat
//! template, tokenization, routing, detokenization, SSE) and directly (the same token ids routed to the
//! same workers, the stream drained). The difference is the frontend's added latency; the client shares the
//! machine with the server, so it is an upper bound. The frontend runs hardened, as it would face the
//! internet: every bound at its default and an API key that each request presents.
//!
//! With `--engine-url` (`run_external`) the engine is a real server (vLLM, or anything that speaks its API):
//! the same streaming chat completion goes to it directly, and through a `dynamo route` and a `dynamo decode
//! --engine vllm` in front of it, started as processes as a user would; the difference is what the worker and
//! the router add.
use super::{Load, RunStats, drive};
use crate::core::frontend::{self, FrontendState, Served};
use crate::core::model::TemplateInput;
use crate::core::protocol::PreprocessedRequest;
use crate::core::router::Router;
use crate::core::run::{self, RunError, RunSettings};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct HttpBenchSettings {
    pub stack: RunSettings,
    pub loads: Vec<Load>,
    pub requests: usize,
    pub max_tokens: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    pub load: String,
    pub direct: RunStats,
    pub http: RunStats,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    /// HTTP requests/s over direct requests/s.
    pub throughput_ratio: f64,
}

/// What each benchmark request presents; the server is started with the key in it.
const AUTHORIZATION: &str = "Bearer sk-bench";

const PROMPT: &str = "Tell me a story about a small robot who learned to paint the sea at night.";

pub async fn run(settings: HttpBenchSettings) -> Result<Vec<LevelResult>, RunError> {
    let state = run::build(&settings.stack, false)?;
    let any_port = ([127, 0, 0, 1], 0).into();
    let listener = tokio::net::TcpListener::bind(any_port)
        .await
        .map_err(|source| frontend::ServeError::Bind { addr: any_port, source })?;
    let addr = listener.local_addr().map_err(frontend::ServeError::Serve)?;
    let key = frontend::ApiKey::new(AUTHORIZATION.trim_start_matches("Bearer "))
        .map_err(|e| frontend::ServeError::Serve(std::io::Error::other(e)))?;
    let http_settings = frontend::HttpSettings { api_key: Some(key), ..settings.stack.http.clone() };
    let server = tokio::spawn(frontend::serve_app(
        listener,
        frontend::app(state.clone()),
        http_settings,
        std::future::pending(),
    ));

    let messages = [serde_json::json!({"role": "user", "content": PROMPT})];
    let body = serde_json::json!({
        "messages": messages, "max_tokens": settings.max_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let http = HttpCaller::new(format!("http://{addr}/v1/chat/completions"), body);
    let direct = DirectCaller::new(&state, &messages, settings.max_tokens);

    let results = compare(&settings.loads, settings.requests, &direct, &http).await;
    server.abort();
    Ok(results)
}

#[derive(Debug, Clone)]
pub struct ExternalBenchSettings {
    /// The `dynamo` binary to start the router and the worker from.
    pub binary: std::path::PathBuf,
    pub engine: crate::core::engine::external::ExternalSettings,
    /// The engine's checkpoint directory (the worker's `--model`).
    pub model_dir: std::path::PathBuf,
    pub loads: Vec<Load>,
    pub requests: usize,
    pub max_tokens: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ExternalBenchError {
    #[error(transparent)]
    Engine(#[from] crate::core::engine::external::ExternalError),
    #[error(transparent)]
    Process(#[from] super::processes::ProcessError),
    #[error("cannot prepare the run's directory {path}: {source}")]
    Dir { path: std::path::PathBuf, source: std::io::Error },
}

/// Each level loads the engine directly (`direct`), then through dynamo (`http`).
pub async fn run_external(settings: ExternalBenchSettings) -> Result<Vec<LevelResult>, ExternalBenchError> {
    use super::processes::{router_address, spawn_until};
    let engine = &settings.engine;
    let served = crate::core::engine::external::served_model_at(&engine.url, engine.kind).await?;
    let dir = std::env::temp_dir().join(format!("dynamo-bench-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| ExternalBenchError::Dir { path: dir.clone(), source })?;
    let discovery = format!("file:{}", dir.join("cluster.toml").display());
    let namespace = format!("bench-http-{}", std::process::id());
    let mut router = tokio::process::Command::new(&settings.binary);
    router.args(["route", "--http-port", "0", "--discovery", &discovery, "--namespace", &namespace]);
    let (_router, output) = spawn_until(&mut router, "router on http://", "the router").await?;
    let mut worker = tokio::process::Command::new(&settings.binary);
    worker.args(["decode", "--engine", engine.kind.name(), "--engine-url", &engine.url]);
    worker.args(["--block-size", &engine.block_size.to_string()]);
    worker.arg("--model").arg(&settings.model_dir);
    worker.args(["--discovery", &discovery, "--namespace", &namespace]);
    if let Some(events) = &engine.kv_events {
        worker.args(["--kv-events", events]);
    }
    if let Some(metrics) = &engine.metrics_url {
        worker.args(["--engine-metrics", metrics]);
    }
    let (_worker, worker_output) = spawn_until(&mut worker, "decode worker", "the worker").await?;
    super::processes::drain(worker_output);
    let base = router_address(output).await?;

    let messages = [serde_json::json!({"role": "user", "content": PROMPT})];
    let body = |model: Option<&str>| {
        let mut body = serde_json::json!({
            "messages": messages, "max_tokens": settings.max_tokens, "temperature": 0, "ignore_eos": true,
            "stream": true,
        });
        if let Some(model) = model {
            body["model"] = model.into();
        }
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    };
    let direct =
        HttpCaller::new(format!("{}/v1/chat/completions", engine.url.trim_end_matches('/')), body(Some(&served.id)));
    let through = HttpCaller::new(format!("{base}/v1/chat/completions"), body(None));
    let results = compare(&settings.loads, settings.requests, &direct, &through).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(results)
}

/// Warms both paths up (connections, allocations, caches), then loads each level on `direct` and then on
/// `http`.
async fn compare(loads: &[Load], requests: usize, direct: &impl Caller, http: &impl Caller) -> Vec<LevelResult> {
    drive(Load::Concurrency(8), 200, calls(http)).await;
    drive(Load::Concurrency(8), 200, calls(direct)).await;
    let mut results = Vec::new();
    for &load in loads {
        let direct_stats = drive(load, requests, calls(direct)).await;
        let http_stats = drive(load, requests, calls(http)).await;
        results.push(LevelResult {
            load: load.to_string(),
            added_p50_ms: http_stats.p50_ms - direct_stats.p50_ms,
            added_p99_ms: http_stats.p99_ms - direct_stats.p99_ms,
            throughput_ratio: http_stats.requests_per_s / direct_stats.requests_per_s,
            direct: direct_stats,
            http: http_stats,
        });
    }
    results
}

/// One request of a benchmark path; cloned per call.
trait Caller: Clone + Send + Sync + 'static {
    fn call(self) -> impl Future<Output = Result<(), String>> + Send;
}

fn calls<C: Caller>(caller: &C) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static {
    let caller = caller.clone();
    move || Box::pin(caller.clone().call())
}

/// One streaming chat completion over HTTP, read to the end.
#[derive(Clone)]
struct HttpCaller {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: Arc<str>,
    body: Bytes,
}

impl HttpCaller {
    fn new(url: String, body: Bytes) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector);
        Self { client, url: url.into(), body }
    }
}

impl Caller for HttpCaller {
    async fn call(self) -> Result<(), String> {
        let request = hyper::Request::post(&*self.url)
            .header("content-type", "application/json")
            .header("authorization", AUTHORIZATION)
            .body(Full::new(self.body.clone()))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if !status.is_success() || !body.ends_with(b"data: [DONE]\n\n") {
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
        }
        Ok(())
    }
}

/// The same request as token ids straight to the router, stream drained.
#[derive(Clone)]
struct DirectCaller {
    router: Arc<Router>,
    request: PreprocessedRequest,
}

impl DirectCaller {
    fn new(state: &Arc<FrontendState>, messages: &[serde_json::Value], max_tokens: u32) -> Self {
        let Served { model, router } = state.first();
        let input = TemplateInput { messages, tools: None, add_generation_prompt: true, extra: None };
        let text = model.chat_template.as_ref().and_then(|t| t.render(&input).ok()).unwrap_or_default();
        let token_ids = model.tokenizer.encode(&text, false).unwrap_or_default();
        let request = PreprocessedRequest::greedy("bench", token_ids, max_tokens);
        Self { router, request }
    }
}

impl Caller for DirectCaller {
    async fn call(self) -> Result<(), String> {
        let mut stream = self.router.route(self.request.clone()).map_err(|e| e.to_string())?;
        let mut tokens = 0;
        while let Some(output) = stream.next().await {
            tokens += output.token_ids.len();
        }
        if tokens == 0 { Err("no tokens".to_string()) } else { Ok(()) }
    }
}

/// The readable table `dynamo bench http` prints.
pub fn table(results: &[LevelResult]) -> String {
    let mut out = format!(
        "{:<18} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}\n",
        "load", "direct rps", "http rps", "ratio", "dir p50", "http p50", "dir p99", "http p99", "added p99"
    );
    for r in results {
        out.push_str(&format!(
            "{:<18} {:>11.0} {:>11.0} {:>9.2} {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>9.3}ms {:>9.3}ms\n",
            r.load,
            r.direct.requests_per_s,
            r.http.requests_per_s,
            r.throughput_ratio,
            r.direct.p50_ms,
            r.http.p50_ms,
            r.direct.p99_ms,
            r.http.p99_ms,
            r.added_p99_ms,
        ));
        if r.direct.errors + r.http.errors > 0 {
            out.push_str(&format!("  ! {} direct and {} http requests failed\n", r.direct.errors, r.http.errors));
        }
    }
    out
}
