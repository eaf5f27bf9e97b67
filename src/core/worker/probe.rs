//! A worker's own HTTP port (`--metrics-port`): `/metrics` for Prometheus and for endpoint pickers that read
//! a model server's gauges under vLLM's names (the Gateway API Inference Extension's, llm-d's), `/health` for
//! readiness probes and `/live` for liveness.
//!
//! `/health` turns 503 the moment the worker starts to drain, so Kubernetes takes the pod out of its Service's
//! endpoints (and routers watching them stop counting it) while its last requests finish.
use crate::core::engine::Engine;
use crate::core::frontend::{HttpSettings, serve_app};
use crate::core::plane::request::ServerStats;
use crate::core::protocol::WorkerStats;
use crate::core::telemetry::{Metrics, ModelLoad};
use axum::Json;
use axum::Router as HttpRouter;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the port reports on: the engine, its request-plane totals, and whether it drains.
struct Probed {
    engine: Arc<dyn Engine>,
    stats: Arc<ServerStats>,
    /// vLLM's gauges for this model; `None` for a worker that holds no KV (an encode worker).
    model: Option<(String, usize)>,
    draining: Arc<AtomicBool>,
    metrics: Metrics,
}

/// The worker's totals as its `stats` reports say them: the request plane's, its KV hand-offs and images.
pub fn worker_stats(engine: &dyn Engine, stats: &ServerStats) -> WorkerStats {
    WorkerStats {
        kv: engine.kv_transfers().unwrap_or_default(),
        images: engine.images().unwrap_or_default(),
        ..stats.snapshot()
    }
}

/// Serves the port on `listener` until the returned task is aborted (dropped with the exposed worker).
pub fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<dyn Engine>,
    stats: Arc<ServerStats>,
    model: Option<(String, usize)>,
    draining: Arc<AtomicBool>,
) -> crate::core::AbortOnDrop {
    let probed = Arc::new(Probed { engine, stats, model, draining, metrics: Metrics::new() });
    let app = HttpRouter::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/live", get(|| async { "ok" }))
        .with_state(probed);
    // The frontend's bounds (connections, header and body timeouts) hold here too.
    crate::core::AbortOnDrop(tokio::spawn(async move {
        if let Err(error) = serve_app(listener, app, HttpSettings::default(), std::future::pending()).await {
            tracing::warn!("the worker's metrics port stopped: {error}");
        }
    }))
}

async fn metrics(axum::extract::State(probed): axum::extract::State<Arc<Probed>>) -> Response {
    let engine = probed.engine.as_ref();
    let id = engine.worker_id();
    let load = engine.load();
    probed.metrics.worker_stats(id, &worker_stats(engine, &probed.stats));
    let models: Vec<ModelLoad> = (probed.model.iter())
        .map(|(model, block_size)| ModelLoad { model: model.clone(), block_size: *block_size, load })
        .collect();
    let text = probed.metrics.render(&[(id, load)], &models);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn health(axum::extract::State(probed): axum::extract::State<Arc<Probed>>) -> Response {
    let id = format!("{:016x}", probed.engine.worker_id());
    match probed.draining.load(Ordering::Acquire) {
        false => (StatusCode::OK, Json(serde_json::json!({"status": "healthy", "worker_id": id}))),
        true => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "draining", "worker_id": id}))),
    }
    .into_response()
}
