//! One process, whole stack: what `dynamo run` starts. Loads the model, spawns N in-process workers, puts
//! the router and the OpenAI frontend in front of them, and serves until shutdown.
//!
//! It is only a composition of the same pieces the separate roles use, so there is no second code path.
use crate::core::engine::Engine;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::frontend::{self, FrontendState};
use crate::core::model::{Model, ModelError, ModelSource};
use crate::core::router::{Router, RouterConfig};
use crate::core::telemetry::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub model: ModelSource,
    pub served_model_name: Option<String>,
    pub workers: usize,
    pub mocker: MockerConfig,
    /// Its block size is taken from the mocker's, so prompt hashes match the workers'.
    pub router: RouterConfig,
    pub listen: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot listen on {addr}: {source}; pick another --http-port (0 picks a free one)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Loads the model and starts the workers and router; must run inside a tokio runtime.
pub fn build(settings: &LocalSettings) -> Result<Arc<FrontendState>, LocalError> {
    let model = Arc::new(Model::load(&settings.model, settings.served_model_name.as_deref())?);
    let vocab: Arc<[u32]> = model.tokenizer.printable_ids().into();
    let engines: Vec<Arc<dyn Engine>> = (0..settings.workers)
        .map(|id| Arc::new(MockerEngine::spawn(id as u64, settings.mocker.clone(), vocab.clone())) as Arc<dyn Engine>)
        .collect();
    let config = RouterConfig { block_size: settings.mocker.scheduler.block_size, ..settings.router.clone() };
    let router = Arc::new(Router::new(engines, config));
    Ok(Arc::new(FrontendState::new(model, router, Arc::new(Metrics::new()))))
}

/// Serves until `shutdown` resolves. Prints one line with the address once it accepts connections.
pub async fn run(
    settings: LocalSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), LocalError> {
    let state = build(&settings)?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| LocalError::Bind { addr: settings.listen, source })?;
    let addr = listener.local_addr().map_err(LocalError::Serve)?;
    println!(
        "dynamo: serving {} on http://{addr} with {} mocker worker(s) (speedup {}, {:?} routing); try: curl http://{addr}/v1/models",
        state.model.card.name, settings.workers, settings.mocker.speedup, settings.router.mode
    );
    frontend::serve(listener, state, shutdown).await.map_err(LocalError::Serve)
}
