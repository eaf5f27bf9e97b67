//! One process, whole stack: what `dynamo run` starts. Loads the model, spawns N in-process workers, puts
//! the router and the OpenAI frontend in front of them, and serves until shutdown.
//!
//! It is only a composition of the same pieces the separate roles use, so there is no second code path.
use crate::core::discovery::Discovery;
use crate::core::engine::Engine;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::engine::native::{self, NativeError, NativeSettings};
use crate::core::frontend::{self, FrontendState, HttpSettings};
use crate::core::model::{Model, ModelError, ModelSource};
use crate::core::protocol::WorkerId;
use crate::core::router::{Router, RouterConfig};
use crate::core::telemetry::Metrics;
use crate::core::worker::{self, PlaneSettings, WorkerError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub model: ModelSource,
    pub served_model_name: Option<String>,
    pub workers: usize,
    pub engine: EngineSettings,
    /// Its block size is taken from the engine's, so prompt hashes match the workers'.
    pub router: RouterConfig,
    pub listen: SocketAddr,
    pub http: HttpSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineSettings {
    Mocker(MockerConfig),
    Native(NativeSettings),
}

impl EngineSettings {
    pub fn block_size(&self) -> usize {
        match self {
            EngineSettings::Mocker(config) => config.scheduler.block_size,
            EngineSettings::Native(settings) => settings.scheduler.block_size,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            EngineSettings::Mocker(config) => format!("mocker (speedup {})", config.speedup),
            EngineSettings::Native(settings) => match settings.device {
                native::Device::Cpu => format!("native (cpu, {} threads)", settings.threads),
                device => format!("native ({device})"),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Serve(#[from] frontend::ServeError),
    #[error("no engine was started")]
    NoEngine,
    #[error(transparent)]
    Announce(#[from] Box<WorkerError>),
}

/// `dynamo run --discovery`: its workers also go on the planes and into discovery, as `dynamo decode`
/// workers do, so `dynamo top` and other routers of the namespace see them.
pub struct Announce {
    pub discovery: Box<dyn Discovery>,
    pub planes: PlaneSettings,
}

/// Loads the model and starts the workers and router; must run inside a tokio runtime. Workers are numbered
/// from 0 unless `unique_ids` (workers that other processes see need ids no other process has).
pub fn build(settings: &LocalSettings, unique_ids: bool) -> Result<Arc<FrontendState>, LocalError> {
    let model = Arc::new(Model::load(&settings.model, settings.served_model_name.as_deref())?);
    let ids: Vec<WorkerId> = match unique_ids {
        true => (0..settings.workers).map(|_| rand::random()).collect(),
        false => (0..settings.workers as WorkerId).collect(),
    };
    let engines = spawn_engines(&model, &settings.model, &settings.engine, &ids)?;
    let config = RouterConfig { block_size: settings.engine.block_size(), ..settings.router.clone() };
    let router = Arc::new(Router::new(engines, config));
    Ok(Arc::new(FrontendState::new(model, router, Arc::new(Metrics::new()))))
}

/// Starts one engine per id on `model` (native workers of one process share one copy of the weights), with a
/// progress bar while weights load. Must run inside a tokio runtime.
pub fn spawn_engines(
    model: &Model,
    source: &ModelSource,
    engine: &EngineSettings,
    ids: &[WorkerId],
) -> Result<Vec<Arc<dyn Engine>>, LocalError> {
    Ok(match engine {
        EngineSettings::Mocker(config) => {
            let vocab: Arc<[u32]> = model.tokenizer.printable_ids().into();
            ids.iter()
                .map(|&id| Arc::new(MockerEngine::spawn(id, config.clone(), vocab.clone())) as Arc<dyn Engine>)
                .collect()
        }
        EngineSettings::Native(native_settings) => {
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template("loading weights {bar:30} {pos}/{len} layers")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            // indicatif draws nothing when stderr is not a terminal.
            let spawned = native::spawn_workers(source, native_settings, ids, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            });
            bar.finish_and_clear();
            spawned?.into_iter().map(|e| Arc::new(e) as Arc<dyn Engine>).collect()
        }
    })
}

/// Serves until `shutdown` resolves. Prints one line with the address once it accepts connections.
pub async fn run(
    settings: LocalSettings,
    announce: Option<Announce>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), LocalError> {
    let state = build(&settings, announce.is_some())?;
    // Held while serving: dropping one takes its worker off the planes and out of discovery.
    let mut exposed = Vec::new();
    if let Some(Announce { discovery, planes }) = &announce {
        let (served, block_size) = (state.first(), settings.engine.block_size());
        for engine in served.router.engines() {
            let worker = worker::expose(engine, &served.model, block_size, planes, discovery.as_ref());
            exposed.push(worker.map_err(|e| LocalError::Announce(Box::new(e)))?);
        }
        let endpoints: Vec<&str> = exposed.iter().map(|e| e.instance.request_addr.as_str()).collect();
        println!("dynamo: workers announced in namespace {:?} at {}", planes.namespace, endpoints.join(", "));
    }
    let banner = |addr| {
        format!(
            "dynamo: serving {} on http://{addr} with {} {} worker(s), {:?} routing; try: curl http://{addr}/v1/models",
            state.first().model.card.name,
            settings.workers,
            settings.engine.describe(),
            settings.router.mode
        )
    };
    frontend::bind_and_serve(settings.listen, &settings.http, state.clone(), banner, shutdown).await?;
    drop(exposed);
    Ok(())
}
