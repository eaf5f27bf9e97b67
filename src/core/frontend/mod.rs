//! The OpenAI HTTP frontend (axum): chat and text completions, streaming and not, models, health, metrics.
//!
//! Requests are parsed and validated here (`params`), tokenized with the model's tokenizer and chat
//! template, routed to workers by the `Router`, and their token streams turned back into text (`generate`).
//! Every error is an OpenAI-shaped JSON body; a full cluster answers 503 with `Retry-After`. What a client
//! may send and hold (bodies, connections, time, the API key) is bounded in `server` and `body`; a request's
//! CPU work runs in `preprocess`, off the async runtime.
mod auth;
mod body;
mod chat;
mod completions;
mod embeddings;
mod error;
#[cfg(test)]
mod fuzz;
mod generate;
pub mod media;
mod params;
mod pick;
mod preprocess;
mod server;
mod structured;
pub mod tools;

pub use auth::ApiKey;
pub use error::ApiError;
pub use pick::Picked;
pub use server::{HttpSettings, serve_app, valid_origin};

use crate::core::model::Model;
use crate::core::protocol::LoadMetrics;
use crate::core::protocol::openai::{ModelList, ModelObject};
use crate::core::router::{Pool, Router};
use crate::core::telemetry::{Metrics, ModelLoad};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router as HttpRouter};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// One model the frontend serves, and the router over that model's workers.
#[derive(Clone)]
pub struct Served {
    pub model: Arc<Model>,
    pub router: Arc<Router>,
}

/// What every handler shares.
pub struct FrontendState {
    /// In the order they were first served: a cluster adds a model when the first worker serving it joins.
    served: std::sync::RwLock<Vec<Served>>,
    pub metrics: Arc<Metrics>,
    created: u64,
    preprocess: preprocess::Preprocessor,
    /// `--tool-call-parser`: the format models' tool calls are read in, over the one their templates name.
    tool_parser: std::sync::OnceLock<tools::ToolParser>,
    /// `--limit-images-per-prompt`, `--allowed-local-media-path`, `--allowed-media-domains`.
    media: std::sync::OnceLock<media::MediaSettings>,
    /// What fetches image URLs, made on the first request that names one.
    media_client: std::sync::OnceLock<Result<reqwest::Client, String>>,
}

impl FrontendState {
    pub fn new(model: Arc<Model>, router: Arc<Router>, metrics: Arc<Metrics>) -> Self {
        router.report_to(metrics.clone());
        Self {
            served: std::sync::RwLock::new(vec![Served { model, router }]),
            metrics,
            created: unix_now(),
            preprocess: preprocess::Preprocessor::default(),
            tool_parser: std::sync::OnceLock::new(),
            media: std::sync::OnceLock::new(),
            media_client: std::sync::OnceLock::new(),
        }
    }

    /// What images requests may bring (the first call wins; the defaults until then).
    pub fn use_media_settings(&self, settings: media::MediaSettings) {
        let _ = self.media.set(settings);
    }

    fn media_settings(&self) -> &media::MediaSettings {
        static DEFAULT: std::sync::OnceLock<media::MediaSettings> = std::sync::OnceLock::new();
        self.media.get().unwrap_or_else(|| DEFAULT.get_or_init(media::MediaSettings::default))
    }

    /// The images a chat request names by `http(s)` URL, fetched, when its model takes images. Only a body
    /// that names a URL is parsed for them, and off the async runtime (it may be megabytes).
    async fn fetch_images(&self, body: &bytes::Bytes) -> media::Fetched {
        if !media::names_urls(body) {
            return media::Fetched::default();
        }
        let settings = self.media_settings();
        let (body, limit) = (body.clone(), settings.max_images);
        let Ok(Some(remote)) = tokio::task::spawn_blocking(move || media::remote_images(&body, limit)).await else {
            return media::Fetched::default();
        };
        let takes_images = self.resolve(remote.model.as_deref()).is_ok_and(|s| s.model.card.image.is_some());
        if remote.urls.is_empty() || !takes_images {
            return media::Fetched::default();
        }
        let client = self.media_client.get_or_init(|| settings.client());
        media::fetch_images(remote.urls, settings, client).await
    }

    /// Reads every model's tool calls in `parser`'s format (`--tool-call-parser`; the first call wins).
    pub fn use_tool_parser(&self, parser: tools::ToolParser) {
        let _ = self.tool_parser.set(parser);
    }

    /// Serves one more model (its name must be new).
    pub fn add(&self, model: Arc<Model>, router: Arc<Router>) {
        router.report_to(self.metrics.clone());
        self.served.write().unwrap_or_else(|p| p.into_inner()).push(Served { model, router });
    }

    /// Every served model, first served first.
    pub fn served(&self) -> Vec<Served> {
        self.served.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The served model of this name.
    pub fn find(&self, name: &str) -> Option<Served> {
        self.served.read().unwrap_or_else(|p| p.into_inner()).iter().find(|s| s.model.card.answers_to(name)).cloned()
    }

    /// The model first served (a single-model server's only one).
    pub fn first(&self) -> Served {
        // `new` puts one in and nothing takes any out.
        self.served.read().unwrap_or_else(|p| p.into_inner())[0].clone()
    }

    /// The handler's response, or its error as an OpenAI error body (counted as a failed request of `model`,
    /// when the request got as far as naming one that is served).
    fn answer(&self, endpoint: &str, model: Option<&str>, result: Result<Response, ApiError>) -> Response {
        result.unwrap_or_else(|error| {
            self.metrics.rejected(model.unwrap_or(""), endpoint, false);
            error.into_response()
        })
    }

    /// Runs a request's CPU work (`prepare`) in the preprocessing pool. `model` is set to the model the
    /// request named even when the work then failed, so that the failure is counted against it.
    async fn prepare<T: Send + 'static>(
        self: &Arc<Self>,
        model: &mut Option<String>,
        prepare: impl FnOnce(&FrontendState, &mut Option<String>) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let state = self.clone();
        let ran = self.preprocess.run(move || {
            let mut named = None;
            let prepared = prepare(&state, &mut named);
            (named, prepared)
        });
        let (named, prepared) = ran.await.map_err(|refused| {
            if matches!(refused, preprocess::Refused::Full(_)) {
                self.metrics.preprocess_refused();
            }
            ApiError::from(refused)
        })?;
        *model = named;
        prepared
    }

    fn model_object(&self, served: &Served, id: &str) -> ModelObject {
        ModelObject {
            id: id.to_string(),
            object: "model".into(),
            created: self.created,
            owned_by: "dynamo".into(),
            max_model_len: served.model.card.context_length,
            parent: None,
        }
    }

    /// A LoRA adapter of `served`'s model, listed as vLLM lists one: its base model as `parent`.
    fn adapter_object(&self, served: &Served, adapter: &str) -> ModelObject {
        ModelObject { parent: Some(served.model.card.name.clone()), ..self.model_object(served, adapter) }
    }

    /// The served model a request for generation names, and the LoRA adapter when the name is one that a
    /// worker of that model serves (as vLLM, which serves each adapter under its own name).
    fn resolve_generation(&self, requested: Option<&str>) -> Result<(Served, Option<String>), ApiError> {
        if let Some((name, served)) = requested.and_then(|name| Some((name, self.adapter_of(name)?))) {
            return Ok((served, Some(name.to_string())));
        }
        self.resolve(requested).map(|served| (served, None))
    }

    /// The served model whose workers serve a LoRA adapter named `name`, when no model is named so.
    fn adapter_of(&self, name: &str) -> Option<Served> {
        if self.find(name).is_some() {
            return None;
        }
        self.served().into_iter().find(|s| s.router.adapters().iter().any(|a| a == name))
    }

    /// The served model a request names. Leaving `model` out is allowed while one model is served; any name
    /// not served is a 404, as in vLLM.
    fn resolve(&self, requested: Option<&str>) -> Result<Served, ApiError> {
        let served = self.served();
        let names = || served.iter().map(|s| format!("`{}`", s.model.card.name)).collect::<Vec<_>>().join(", ");
        match requested {
            Some(name) if self.adapter_of(name).is_some() => Err(ApiError::invalid(
                "model",
                format!("`{name}` is a LoRA adapter, served for /v1/completions and /v1/chat/completions only"),
            )),
            Some(name) => self.find(name).ok_or_else(|| {
                ApiError::not_found(format!(
                    "The model `{name}` does not exist; this server serves {} (see GET /v1/models).",
                    names()
                ))
            }),
            None if served.len() == 1 => Ok(served[0].clone()),
            None => Err(ApiError::invalid("model", format!("is required: this server serves {}", names()))),
        }
    }
}

pub fn app(state: Arc<FrontendState>) -> HttpRouter {
    HttpRouter::new()
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/embeddings", post(embeddings::handle))
        .route("/v1/models", get(models))
        // A wildcard: model names often hold a slash (`Qwen/Qwen3-0.6B`), which clients do not escape.
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Binds `listen`, prints one line (made by `banner` from the bound address, e.g. when the port was 0) once it
/// accepts connections, and serves until `shutdown` resolves.
pub async fn bind_and_serve(
    listen: std::net::SocketAddr,
    http: &HttpSettings,
    state: Arc<FrontendState>,
    banner: impl FnOnce(std::net::SocketAddr) -> String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_on(bind(listen).await?, http, state, banner, shutdown).await
}

pub async fn bind(listen: std::net::SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(listen).await.map_err(|source| ServeError::Bind { addr: listen, source })
}

/// `bind_and_serve` on a socket already bound.
pub async fn serve_on(
    listener: TcpListener,
    http: &HttpSettings,
    state: Arc<FrontendState>,
    banner: impl FnOnce(std::net::SocketAddr) -> String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    println!("{}", banner(addr));
    if let Some(parser) = http.tool_parser {
        state.use_tool_parser(parser);
    }
    state.use_media_settings(http.media.clone());
    serve_app(listener, app(state), http.clone(), shutdown).await.map_err(ServeError::Serve)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}; pick another --http-port (0 picks a free one)")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// An HTTP frontend that listens before it has anything to serve: a router started ahead of its workers
/// answers `/live` and `/metrics` at once, says 503 (with the reason) to everything else, and becomes the
/// full frontend the moment `ready` is called, on the same socket.
#[derive(Clone)]
pub struct LateApp {
    current: Arc<std::sync::RwLock<HttpRouter>>,
}

impl LateApp {
    pub fn waiting(metrics: Arc<Metrics>, reason: String) -> Self {
        let reason = Arc::new(reason);
        let unavailable = {
            let reason = reason.clone();
            move || {
                let reason = reason.clone();
                async move { ApiError::unavailable(reason.as_str()) }
            }
        };
        let waiting = HttpRouter::new()
            .route("/live", get(live))
            .route(
                "/health",
                get(move || {
                    let reason = reason.clone();
                    async move {
                        let body = serde_json::json!({"status": "waiting", "workers": 0, "reason": reason.as_str()});
                        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
                    }
                }),
            )
            .route("/v1/models", get(|| async { Json(ModelList { object: "list".into(), data: Vec::new() }) }))
            .route("/metrics", get(move || std::future::ready(metrics.render(&[], &[]))))
            .fallback(unavailable);
        Self { current: Arc::new(std::sync::RwLock::new(waiting)) }
    }

    /// From now on every request goes to the full frontend.
    pub fn ready(&self, state: Arc<FrontendState>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = app(state);
    }

    /// The app to serve: hands each request to whichever frontend is current.
    pub fn router(&self) -> HttpRouter {
        let current = self.current.clone();
        let service = tower::service_fn(move |request: axum::extract::Request| {
            let app = current.read().unwrap_or_else(|p| p.into_inner()).clone();
            tower::ServiceExt::oneshot(app, request)
        });
        HttpRouter::new().fallback_service(service)
    }
}

async fn models(State(state): State<Arc<FrontendState>>) -> Json<ModelList> {
    // Each name on its own, as vLLM lists its served names.
    let data = state
        .served()
        .iter()
        .flat_map(|served| {
            let card = &served.model.card;
            let adapters = served.router.adapters();
            std::iter::once(&card.name)
                .chain(&card.aliases)
                .map(|name| state.model_object(served, name))
                .chain(adapters.iter().map(|adapter| state.adapter_object(served, adapter)))
                .collect::<Vec<_>>()
        })
        .collect();
    Json(ModelList { object: "list".into(), data })
}

/// `GET /v1/models/{id}`: one served model, or OpenAI's 404.
async fn model(
    State(state): State<Arc<FrontendState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    Ok(Json(match state.resolve_generation(Some(&id))? {
        (served, Some(adapter)) => state.adapter_object(&served, &adapter),
        (served, None) => state.model_object(&served, &id),
    }))
}

/// Ready to serve: at least one worker (of any model) that takes whole requests; prefill and encode workers
/// are counted apart.
async fn health(State(state): State<Arc<FrontendState>>) -> Response {
    let served = state.served();
    let workers: usize = served.iter().map(|s| s.router.worker_count()).sum();
    let of = |pool| served.iter().map(|s| s.router.engines_of(pool).len()).sum::<usize>();
    let status = if workers > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let models: serde_json::Map<String, serde_json::Value> =
        served.iter().map(|s| (s.model.card.name.clone(), s.router.worker_count().into())).collect();
    let body = serde_json::json!({
        "status": if workers > 0 { "healthy" } else { "unhealthy" },
        "model": served[0].model.card.name,
        "models": models,
        "workers": workers,
        "prefill_workers": of(Pool::Prefill),
        "encode_workers": of(Pool::Encode),
    });
    (status, Json(body)).into_response()
}

/// The process is up.
async fn live() -> &'static str {
    "ok"
}

async fn metrics(State(state): State<Arc<FrontendState>>) -> Response {
    let engines: Vec<_> = (state.served().iter())
        .flat_map(|s| [Pool::Decode, Pool::Prefill].map(|pool| s.router.engines_of(pool)))
        .flatten()
        .collect();
    for engine in &engines {
        if let Some(transfers) = engine.kv_transfers() {
            state.metrics.kv_transfers(engine.worker_id(), &transfers);
        }
    }
    let encoders: Vec<_> = state.served().iter().flat_map(|s| s.router.engines_of(Pool::Encode)).collect();
    for engine in encoders.iter().chain(&engines) {
        if let Some(images) = engine.images() {
            state.metrics.images(engine.worker_id(), &images);
        }
    }
    state.metrics.keep_workers(encoders.iter().chain(&engines).map(|engine| engine.worker_id()));
    for served in state.served().iter() {
        state.metrics.charged(&served.router.charged());
    }
    let loads: Vec<_> = engines.iter().map(|e| (e.worker_id(), e.load())).collect();
    // Decode workers only: they run the requests, as a vLLM server's gauges count its own.
    let models: Vec<ModelLoad> = (state.served().iter())
        .map(|s| {
            let mut load = LoadMetrics::default();
            for engine in s.router.engines_of(Pool::Decode).iter().filter(|e| e.is_alive()) {
                let l = engine.load();
                load.requests_running += l.requests_running;
                load.requests_waiting += l.requests_waiting;
                load.kv_active_blocks += l.kv_active_blocks;
                load.kv_total_blocks += l.kv_total_blocks;
            }
            ModelLoad { model: s.model.card.name.clone(), block_size: s.router.block_size(), load }
        })
        .collect();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(&loads, &models)).into_response()
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}; see /v1/chat/completions, /v1/completions, /v1/models", uri.path()))
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::Engine;
    use crate::core::engine::mocker::{MockerConfig, MockerEngine};
    use crate::core::model::ModelSource;
    use crate::core::router::RouterConfig;

    #[tokio::test]
    async fn a_request_the_preprocessing_pool_turns_away_is_counted() {
        let model = Arc::new(Model::load(&ModelSource::Builtin, None).unwrap());
        let engine = MockerEngine::spawn(0, MockerConfig::default(), (10..20).collect());
        let router = Arc::new(Router::new(vec![Arc::new(engine) as Arc<dyn Engine>], RouterConfig::default()));
        let mut state = FrontendState::new(model, router, Arc::new(Metrics::new()));
        // One thread and no queue: while one request is being prepared, the next is turned away.
        state.preprocess = preprocess::Preprocessor::new(1, 0);
        let state = Arc::new(state);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let busy = state.clone();
        let blocker = tokio::spawn(async move {
            busy.prepare(&mut None, move |_, _| {
                let _ = started.send(());
                let _ = wait.recv();
                Ok(())
            })
            .await
        });
        running.await.expect("the first request is being prepared");
        let refused = state.prepare(&mut None, |_, _| Ok(())).await.expect_err("no thread and no queue left");
        assert_eq!(refused.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        let rendered = state.metrics.render(&[], &[]);
        assert!(rendered.contains("dynamo_frontend_preprocess_refused_total 1"), "{rendered}");
        release.send(()).unwrap();
        assert!(blocker.await.unwrap().is_ok());
    }
}
