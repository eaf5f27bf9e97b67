//! One process, whole stack: what `dynamo run` starts. Loads the model, spawns N in-process workers, puts
//! the router and the OpenAI frontend in front of them, and serves until shutdown.
//!
//! It is only a composition of the same pieces the separate roles use, so there is no second code path.
use crate::core::discovery::Discovery;
use crate::core::encode::EncodeEngine;
use crate::core::engine::Engine;
use crate::core::engine::{EngineSettings, SpawnError, spawn_engines};
use crate::core::frontend::{self, FrontendState, HttpSettings};
use crate::core::handoff::HandOffEngine;
use crate::core::model::{Model, ModelError, ModelSource};
use crate::core::protocol::WorkerId;
use crate::core::protocol::discovery::Role;
use crate::core::router::{Pool, Router, RouterConfig};
use crate::core::telemetry::Metrics;
use crate::core::worker::{self, PlaneSettings, WorkerError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct RunSettings {
    pub model: ModelSource,
    pub model_options: crate::core::model::ModelOptions,
    pub workers: usize,
    /// Workers that only prefill, handing the KV to the `workers` (0: aggregated serving).
    pub prefill_workers: usize,
    /// Workers that only encode images, handing their embeddings to the worker that prefills the prompt.
    pub encode_workers: usize,
    pub engine: EngineSettings,
    /// Its block size is taken from the engine's, so prompt hashes match the workers'.
    pub router: RouterConfig,
    pub listen: SocketAddr,
    pub http: HttpSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] SpawnError),
    #[error(transparent)]
    Serve(#[from] frontend::ServeError),
    #[error(transparent)]
    Announce(#[from] Box<WorkerError>),
    #[error(transparent)]
    HandOff(#[from] crate::core::handoff::HandOffError),
    #[error(transparent)]
    Encode(#[from] crate::core::encode::EncodeError),
    #[error("--encode-workers run a vision model's image encoder: {0}")]
    Encoder(String),
}

/// `dynamo run --discovery`: its workers also go on the planes and into discovery, as `dynamo decode`
/// workers do, so `dynamo top` and other routers of the namespace see them.
pub struct Announce {
    pub discovery: Box<dyn Discovery>,
    pub planes: PlaneSettings,
}

/// Loads the model and starts the workers and router; must run inside a tokio runtime. Workers are numbered
/// from 0 (decode workers first) unless `unique_ids` (workers that other processes see need ids no other
/// process has). With prefill or encode workers, every worker gets a transfer agent on loopback (shm between
/// them).
pub fn build(settings: &RunSettings, unique_ids: bool) -> Result<Arc<FrontendState>, RunError> {
    let model = Arc::new(Model::load_with(&settings.model, &settings.model_options)?);
    let count = settings.workers + settings.prefill_workers;
    let ids: Vec<WorkerId> = match unique_ids {
        true => (0..count).map(|_| rand::random()).collect(),
        false => (0..count as WorkerId).collect(),
    };
    let agent = crate::core::transfer::AgentSettings::loopback(None);
    // First: a model or engine they cannot work with is refused before anything else starts.
    let encoders = encode_workers(settings, unique_ids, &agent)?;
    let mut engines = spawn_engines(&model, &settings.model, &settings.engine, &ids)?;
    if settings.prefill_workers > 0 || settings.encode_workers > 0 {
        engines = (engines.into_iter())
            .map(|engine| Ok(Arc::new(HandOffEngine::start(engine, agent.clone())?) as Arc<dyn Engine>))
            .collect::<Result<_, RunError>>()?;
    }
    let prefill = engines.split_off(settings.workers);
    let config = RouterConfig { block_size: settings.engine.block_size(), ..settings.router.clone() };
    let router = Arc::new(Router::new(engines, config));
    prefill.into_iter().for_each(|engine| router.add_worker(engine, Pool::Prefill));
    for engine in encoders {
        router.add_worker(engine, Pool::Encode);
    }
    Ok(Arc::new(FrontendState::new(model, router, Arc::new(Metrics::new()))))
}

/// The settings' encode workers, sharing one load of the model's vision tower (numbered after the others).
fn encode_workers(
    settings: &RunSettings,
    unique_ids: bool,
    agent: &crate::core::transfer::AgentSettings,
) -> Result<Vec<Arc<dyn Engine>>, RunError> {
    if settings.encode_workers == 0 {
        return Ok(Vec::new());
    }
    let EngineSettings::Native(native) = &settings.engine else {
        return Err(RunError::Encoder("they need the native engine (--engine native, the default)".into()));
    };
    let encoder = crate::core::engine::native::load_image_encoder(&settings.model, native.device, native.threads)
        .map_err(|e| RunError::Encoder(e.to_string()))?;
    let first = (settings.workers + settings.prefill_workers) as WorkerId;
    (0..settings.encode_workers as WorkerId)
        .map(|i| {
            let id = if unique_ids { rand::random() } else { first + i };
            let encode = crate::core::encode::EncodeSettings::default();
            Ok(Arc::new(EncodeEngine::start(id, encoder.clone(), agent.clone(), &encode)?) as Arc<dyn Engine>)
        })
        .collect()
}

/// Serves until `shutdown` resolves. Prints one line with the address once it accepts connections.
pub async fn serve(
    settings: RunSettings,
    announce: Option<Announce>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let state = build(&settings, announce.is_some())?;
    let listener = frontend::bind(settings.listen).await?;
    let http = listener.local_addr().map_err(frontend::ServeError::Serve)?;
    // Held while serving: dropping one takes its worker off the planes and out of discovery.
    let mut exposed = Vec::new();
    if let Some(Announce { discovery, planes }) = &announce {
        let (served, block_size) = (state.first(), settings.engine.block_size());
        // One worker taking whole requests is the one this OpenAI server serves: its record says so, and an
        // endpoint picker can send a request meant for it here.
        let alone = served.router.engines_of(Pool::Decode).len() == 1;
        for (pool, role) in [(Pool::Decode, Role::Decode), (Pool::Prefill, Role::Prefill), (Pool::Encode, Role::Encode)]
        {
            let http = (alone && pool == Pool::Decode).then_some(http);
            let planes = PlaneSettings { role, http, ..planes.clone() };
            for engine in served.router.engines_of(pool) {
                let worker = worker::expose(engine, &served.model, block_size, &planes, discovery.as_ref());
                exposed.push(worker.map_err(|e| RunError::Announce(Box::new(e)))?);
            }
        }
        let endpoints: Vec<&str> = exposed.iter().map(|e| e.instance.request_addr.as_str()).collect();
        println!("dynamo: workers announced in namespace {:?} at {}", planes.namespace, endpoints.join(", "));
    }
    let banner = |addr| {
        format!(
            "dynamo: serving {} on http://{addr} with {} {} worker(s), {} routing; try: curl http://{addr}/v1/models",
            state.first().model.card.name,
            match (settings.prefill_workers, settings.encode_workers) {
                (0, 0) => settings.workers.to_string(),
                (0, e) => format!("{} aggregated + {e} encode", settings.workers),
                (p, 0) => format!("{} decode + {p} prefill", settings.workers),
                (p, e) => format!("{} decode + {p} prefill + {e} encode", settings.workers),
            },
            settings.engine.describe(),
            settings.router.mode.name()
        )
    };
    frontend::serve_on(listener, &settings.http, state.clone(), banner, shutdown).await?;
    drop(exposed);
    Ok(())
}

#[cfg(test)]
mod tests;
