//! A worker process (`dynamo decode`; the role is a parameter, so prefill and encode workers are this same
//! composition): one engine exposed on the planes. It serves requests on its ROUTER
//! socket, publishes its KV events and load on its PUB socket, and registers its record with discovery until
//! it shuts down.
//!
//! Load is published on every KV change and at least every `LOAD_INTERVAL`, so a router's view of it is
//! never older than that, even when nothing else happens.
use crate::core::discovery::{Discovery, DiscoveryError, Registration};
use crate::core::encode::{EncodeEngine, EncodeSettings};
use crate::core::engine::KvFollower;
use crate::core::engine::native;
use crate::core::engine::{Engine, EngineSettings, SpawnError, start_engine};
use crate::core::handoff::HandOffEngine;
use crate::core::model::{Model, ModelError, ModelSource};
use crate::core::plane::request::{RequestServer, Served, ServerStats};
use crate::core::plane::{EventPublisher, HIGH_WATER_MARK, PlaneError};
use crate::core::protocol::discovery::{Instance, ModelCardSummary, Role, tcp_endpoint};
use crate::core::protocol::plane::Topic;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod probe;

pub const LOAD_INTERVAL: Duration = Duration::from_millis(200);

/// Requests in flight per worker past which new ones are refused as busy, unless set otherwise.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Request-plane totals go out this often (`stats` topic).
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub model: ModelSource,
    pub model_options: crate::core::model::ModelOptions,
    pub engine: EngineSettings,
    pub planes: PlaneSettings,
    /// How long a worker told to stop keeps serving what it has in flight.
    pub drain_timeout: Duration,
}

/// How long a worker that is told to stop finishes its requests, unless set otherwise.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an engine's planes listen, and what its record says beyond the engine itself.
#[derive(Debug, Clone)]
pub struct PlaneSettings {
    /// What the record says this worker does; routers give whole requests only to `decode` workers.
    pub role: Role,
    pub namespace: String,
    /// The address other machines reach this worker at (its sockets bind there).
    pub host: IpAddr,
    /// 0 picks a free port.
    pub request_port: u16,
    pub event_port: u16,
    /// Requests in flight past which new ones are refused as busy.
    pub max_in_flight: usize,
    /// The cluster's secret: with it, every plane message is sealed and only routers that hold it are heard.
    pub key: Option<crate::core::trust::ClusterKey>,
    /// A transfer agent that offers this worker's KV pages to other roles; `None` for an aggregated worker,
    /// which hands nothing on.
    pub transfer: Option<TransferSettings>,
    /// The OpenAI server that serves this worker (its record's `http_addr`): this process's, when it serves this
    /// worker alone, or a frontend beside it that follows an endpoint picker's choice.
    pub http: Option<std::net::SocketAddr>,
    /// A port of its own for `/metrics` (vLLM's gauge names too), `/health` and `/live`, on `host`; 0 picks a
    /// free one.
    pub metrics_port: Option<u16>,
}

/// How a worker's transfer agent listens (on the planes' host) and reaches its peers.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    /// 0 picks a free port.
    pub port: u16,
    /// Forces one backend; `None` picks shm for same-host peers and tcp for the rest.
    pub backend: Option<crate::core::transfer::Backend>,
    pub streams: usize,
    /// How long a prefill worker keeps a prompt's pages for a decode worker that has not read them.
    pub lease: std::time::Duration,
}

#[cfg(test)]
impl PlaneSettings {
    /// The planes of a worker exposed on loopback at free ports, for tests.
    pub fn loopback(role: Role, namespace: &str, key: Option<crate::core::trust::ClusterKey>) -> Self {
        Self {
            role,
            namespace: namespace.into(),
            host: [127, 0, 0, 1].into(),
            request_port: 0,
            event_port: 0,
            max_in_flight: 64,
            key,
            transfer: None,
            http: None,
            metrics_port: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] SpawnError),
    #[error("cannot open the {plane} plane on {endpoint}: {source}; pick another port (0 picks a free one)")]
    Plane { plane: &'static str, endpoint: String, source: PlaneError },
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    HandOff(#[from] crate::core::handoff::HandOffError),
    #[error(transparent)]
    Encode(#[from] crate::core::encode::EncodeError),
    #[error("cannot serve metrics on {addr}: {source}; pick another --metrics-port (0 picks a free one)")]
    Metrics { addr: std::net::SocketAddr, source: std::io::Error },
}

/// One engine on the planes: requests on its ROUTER socket, its KV events and load on its PUB socket, its
/// record in discovery. Dropped, it takes the record back first, then closes its sockets.
pub struct Exposed {
    pub instance: Instance,
    /// Where its `/metrics` and `/health` answer, when it has a metrics port.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Set when it starts to drain: its `/health` then says 503.
    draining: Arc<std::sync::atomic::AtomicBool>,
    _probe: Option<crate::core::AbortOnDrop>,
    // Fields drop in this order: the record goes before the sockets close.
    registration: Option<Registration>,
    server: RequestServer,
    engine: Arc<dyn Engine>,
    _events: crate::core::AbortOnDrop,
    _context: crate::core::plane::Context,
}

/// How often a drain looks whether KV held for a peer has been read.
const DRAIN_POLL: Duration = Duration::from_millis(20);

impl Exposed {
    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.server.in_flight()
    }

    /// Stops taking work without losing any: the record leaves discovery, new requests are refused as
    /// draining (routers that have not yet seen it leave send them elsewhere), the ones in flight run to their
    /// end, and KV held for a decode worker waits to be read. Resolves when all that is done (true) or
    /// `timeout` has passed (false); the planes stay open until this is dropped.
    pub async fn drain(&mut self, timeout: Duration) -> bool {
        self.draining.store(true, Ordering::Release);
        if let Some(registration) = self.registration.take() {
            registration.leave().await;
        }
        let finished = async {
            self.server.drain().await;
            // Pages stay active while a lease holds them for a peer, and until then its read would fail.
            while self.engine.load().kv_active_blocks > 0 {
                tokio::time::sleep(DRAIN_POLL).await;
            }
        };
        tokio::time::timeout(timeout, finished).await.is_ok()
    }
}

/// Serves `engine` (of `model`, with KV blocks of `block_size` tokens) on the planes and registers it; with
/// `planes.transfer`, behind a transfer agent that hands its KV to and from other workers (an engine that
/// already has one keeps it). Must run inside a tokio runtime.
pub fn expose(
    mut engine: Arc<dyn Engine>,
    model: &Model,
    block_size: usize,
    planes: &PlaneSettings,
    discovery: &dyn Discovery,
) -> Result<Exposed, WorkerError> {
    let id = engine.worker_id();
    let context = crate::core::plane::Context::with_key(planes.key.as_ref());
    let tcp = |port: u16| tcp_endpoint(planes.host, port);
    let event_endpoint = tcp(planes.event_port);
    let publisher = EventPublisher::bind(&context, &event_endpoint, id, HIGH_WATER_MARK)
        .map_err(|source| WorkerError::Plane { plane: "event", endpoint: event_endpoint, source })?;
    if let (Some(settings), None) = (&planes.transfer, engine.transfer_addr()) {
        engine = Arc::new(HandOffEngine::start(engine, agent_settings(planes, settings))?.with_lease(settings.lease));
    }
    // The record a router's ping is answered with: everything but the request address, which the router
    // already knows.
    let instance = Instance {
        id,
        role: planes.role,
        model: model.card.name.clone(),
        namespace: planes.namespace.clone(),
        request_addr: String::new(),
        event_addr: publisher.endpoint().to_string(),
        transfer_addr: engine.transfer_addr(),
        card: ModelCardSummary {
            block_size: block_size as u32,
            context_length: model.card.context_length,
            kv_blocks: engine.load().kv_total_blocks,
            tokenizer_hash: model.tokenizer_hash,
        },
        device: engine.device(),
        http_addr: planes.http.map(|http| tcp_endpoint(http.ip(), http.port())),
        adapters: engine.adapters(),
    };
    let request_endpoint = tcp(planes.request_port);
    let kv_published = Arc::new(AtomicU64::new(0));
    let served = Served {
        engine: engine.clone(),
        instance: instance.clone(),
        model_files: model.text_files().to_vec(),
        max_in_flight: planes.max_in_flight,
        kv_published: kv_published.clone(),
    };
    let server = RequestServer::bind(&context, &request_endpoint, served).map_err(|source| WorkerError::Plane {
        plane: "request",
        endpoint: request_endpoint,
        source,
    })?;
    let instance = Instance { request_addr: server.endpoint().to_string(), ..instance };
    let events =
        crate::core::AbortOnDrop(tokio::spawn(publish(engine.clone(), publisher, kv_published, server.stats.clone())));
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (probe, metrics_addr) = match planes.metrics_port {
        Some(port) => {
            let listener = listen((planes.host, port).into())?;
            let addr = listener
                .local_addr()
                .map_err(|source| WorkerError::Metrics { addr: (planes.host, port).into(), source })?;
            // An encode worker holds no KV: it has no model server's gauges to give.
            let model = (planes.role != Role::Encode).then(|| (instance.model.clone(), block_size));
            (Some(probe::serve(listener, engine.clone(), server.stats.clone(), model, draining.clone())), Some(addr))
        }
        None => (None, None),
    };
    let registration = Some(discovery.register(&instance)?);
    Ok(Exposed {
        instance,
        metrics_addr,
        draining,
        _probe: probe,
        registration,
        server,
        engine,
        _events: events,
        _context: context,
    })
}

/// A listening socket for the worker's metrics port, made without awaiting (`expose` is not async).
fn listen(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, WorkerError> {
    let bound = std::net::TcpListener::bind(addr)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .and_then(tokio::net::TcpListener::from_std);
    bound.map_err(|source| WorkerError::Metrics { addr, source })
}

/// How a worker's transfer agent listens (on the planes' host, with the planes' key).
pub fn agent_settings(planes: &PlaneSettings, settings: &TransferSettings) -> crate::core::transfer::AgentSettings {
    crate::core::transfer::AgentSettings {
        host: planes.host,
        port: settings.port,
        streams: settings.streams,
        backend: settings.backend,
        timeout: crate::core::transfer::DEFAULT_TIMEOUT,
        key: planes.key.clone(),
    }
}

/// `dynamo decode`: serves until the first `signal`, then drains (`Exposed::drain`) until done, the drain
/// timeout, or a second `signal`.
pub async fn run<S: Future<Output = ()>>(
    settings: WorkerSettings,
    discovery: Box<dyn Discovery>,
    signal: impl Fn() -> S,
) -> Result<(), WorkerError> {
    let model = Model::load_with(&settings.model, &settings.model_options)?;
    let id = rand::random::<u64>();
    let engine = start_engine(&model, &settings.model, &settings.engine, id).await?;
    let served =
        Serving { model: &model, block_size: settings.engine.block_size(), describe: settings.engine.describe() };
    serve(engine, served, &settings.planes, settings.drain_timeout, discovery, signal).await
}

/// `dynamo encode`: the vision tower and projector of `model` alone, as an encode worker that holds images'
/// embeddings for the workers that prefill their prompts; served and drained as `run` does.
pub async fn run_encoder<S: Future<Output = ()>>(
    settings: EncoderSettings,
    discovery: Box<dyn Discovery>,
    signal: impl Fn() -> S,
) -> Result<(), WorkerError> {
    let model = Model::load_with(&settings.model, &settings.model_options)?;
    let id = rand::random::<u64>();
    let encoder = native::load_image_encoder(&settings.model, settings.device, settings.threads)
        .map_err(|e| WorkerError::Engine(SpawnError::from(e)))?;
    let transfer = settings.planes.transfer.clone().unwrap_or(TransferSettings {
        port: 0,
        backend: None,
        streams: crate::core::transfer::DEFAULT_STREAMS,
        lease: settings.encode.lease,
    });
    let describe = format!("its vision tower on {}", encoder.device());
    let engine = EncodeEngine::start(id, encoder, agent_settings(&settings.planes, &transfer), &settings.encode)?;
    let served = Serving { model: &model, block_size: ENCODER_BLOCK_SIZE, describe };
    serve(Arc::new(engine), served, &settings.planes, settings.drain_timeout, discovery, signal).await
}

/// What an encode worker's record says its KV blocks hold: it has none, and routers do not compare it.
const ENCODER_BLOCK_SIZE: usize = 16;

/// What `dynamo encode` runs.
#[derive(Debug, Clone)]
pub struct EncoderSettings {
    pub model: ModelSource,
    pub model_options: crate::core::model::ModelOptions,
    pub device: native::Device,
    pub threads: usize,
    pub encode: EncodeSettings,
    pub planes: PlaneSettings,
    pub drain_timeout: Duration,
}

/// What a served engine's banner and record say about it.
struct Serving<'a> {
    model: &'a Model,
    block_size: usize,
    describe: String,
}

/// Exposes `engine` until the first `signal`, then drains it.
async fn serve<S: Future<Output = ()>>(
    engine: Arc<dyn Engine>,
    served: Serving<'_>,
    planes: &PlaneSettings,
    drain_timeout: Duration,
    discovery: Box<dyn Discovery>,
    signal: impl Fn() -> S,
) -> Result<(), WorkerError> {
    let id = engine.worker_id();
    let exposed = expose(engine, served.model, served.block_size, planes, discovery.as_ref())?;
    let instance = &exposed.instance;
    let transfer = instance.transfer_addr.as_ref().map(|addr| format!(", transfer {addr}")).unwrap_or_default();
    let metrics = exposed.metrics_addr.map(|addr| format!(", metrics http://{addr}/metrics")).unwrap_or_default();
    println!(
        "dynamo: {} worker {id:016x} serving {} with {} on {} (events {}{transfer}{metrics}), namespace {}",
        planes.role.name(),
        instance.model,
        served.describe,
        instance.request_addr,
        instance.event_addr,
        instance.namespace
    );
    if planes.host.is_loopback() {
        eprintln!(
            "dynamo: listening on {} only, so only routers on this machine can reach this worker; pass --host \
             with an address other machines reach it at to serve them",
            planes.host
        );
    } else if planes.host.is_unspecified() {
        eprintln!(
            "dynamo: listening on every interface; routers reach it at the address discovery resolves (mDNS) \
             — a cluster file needs --host with one address instead"
        );
    }
    signal().await;
    let mut exposed = exposed;
    eprintln!(
        "dynamo: draining: left discovery, finishing {} requests in flight (at most {drain_timeout:?}; stop again \
         to stop now)",
        exposed.in_flight()
    );
    let drained = tokio::select! {
        drained = exposed.drain(drain_timeout) => drained,
        () = signal() => false,
    };
    match drained {
        true => eprintln!("dynamo: drained; stopping"),
        false => eprintln!("dynamo: stopping with {} requests in flight", exposed.in_flight()),
    }
    Ok(())
}

/// Forwards the engine's KV events and load to the event plane until the engine stops, counting the KV
/// messages published for the snapshots the request plane answers from the engine's ledger.
async fn publish(
    engine: Arc<dyn Engine>,
    mut publisher: EventPublisher,
    kv_published: Arc<AtomicU64>,
    stats: Arc<ServerStats>,
) {
    // A lag becomes `Cleared` and then the engine's whole state, so routers forget rather than trust a stale
    // view, and relearn it.
    let mut kv = KvFollower::new(&engine);
    let mut tick = tokio::time::interval(LOAD_INTERVAL);
    let mut stats_tick = tokio::time::interval(STATS_INTERVAL);
    let mut last_load = None;
    loop {
        let load_now = tokio::select! {
            batch = kv.next() => {
                let Some(batch) = batch else { return };
                if let Err(error) = publisher.publish(&batch) {
                    tracing::warn!("could not publish KV events: {error}");
                }
                // After it went out: the engine recorded these events before broadcasting them, so a snapshot
                // taken once this is read covers every message numbered below it.
                kv_published.store(publisher.next_seq(Topic::Kv), Ordering::Release);
                false
            }
            _ = tick.tick() => true,
            _ = stats_tick.tick() => {
                let snapshot = probe::worker_stats(engine.as_ref(), &stats);
                if let Err(error) = publisher.publish(&snapshot) {
                    tracing::warn!("could not publish request-plane stats: {error}");
                }
                false
            }
        };
        let load = engine.load();
        if load_now || last_load != Some(load) {
            last_load = Some(load);
            if let Err(error) = publisher.publish(&load) {
                tracing::warn!("could not publish load: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::mocker::{MockerConfig, MockerEngine};
    use crate::core::engine::native::{Device, NativeSettings};
    use crate::core::engine::scheduler::SchedulerConfig;
    use crate::core::transfer::{Agent, AgentSettings};

    #[tokio::test]
    async fn a_worker_with_kv_transfer_offers_its_pages_at_the_address_in_its_record() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let cluster = crate::core::discovery::TempClusterFile::new();
        let discovery = &cluster.discovery;
        let scheduler = SchedulerConfig { num_blocks: 64, block_size: 16, ..SchedulerConfig::default() };
        let native = EngineSettings::Native(NativeSettings {
            device: Device::Cpu,
            threads: 1,
            kv_cache_gib: 0.0,
            num_blocks: Some(64),
            scheduler,
            profile: None,
            quantization: Default::default(),
        });
        let engine =
            crate::core::engine::spawn_engines(&model, &ModelSource::Builtin, &native, &[7]).unwrap().remove(0);
        let transfer = TransferSettings { port: 0, backend: None, streams: 2, lease: crate::core::handoff::LEASE };
        let planes =
            PlaneSettings { transfer: Some(transfer.clone()), ..PlaneSettings::loopback(Role::Prefill, "x", None) };
        let worker = expose(engine.clone(), &model, 16, &planes, discovery).unwrap();
        let request_addr = &worker.instance.request_addr;
        let address = worker.instance.transfer_endpoint_from(request_addr).expect("the record names the agent");

        let (peer_agent, _) = Agent::start(8, AgentSettings::loopback(None)).unwrap();
        let peer = peer_agent.connect(&address).await.unwrap();
        let memory = engine.kv_pages().unwrap().memory().clone();
        assert_eq!(peer.agent(), 7, "the agent speaks for the worker");
        assert_eq!(peer.regions().len(), 2 * model_layers(&model), "each layer's K and V pages");
        assert!(peer.regions().iter().all(|r| r.len == memory.pages * memory.page_bytes), "{:?}", peer.regions());
        assert_eq!(memory.pages, 64);

        // A mocker's pages are simulated: its agent offers none, and ends leases all the same.
        let mocker: Arc<dyn Engine> = Arc::new(MockerEngine::spawn(9, MockerConfig::default(), (0..100).collect()));
        let mocker = expose(mocker, &model, 16, &planes, discovery).unwrap();
        let address = mocker.instance.transfer_endpoint_from(&mocker.instance.request_addr).expect("an agent");
        let peer = peer_agent.connect(&address).await.unwrap();
        assert_eq!((peer.agent(), peer.regions().len()), (9, 0));
        drop(worker);
    }

    fn model_layers(model: &Model) -> usize {
        let config: serde_json::Value = serde_json::from_str(
            &model.text_files().iter().find(|(name, _)| name == "config.json").expect("a config").1,
        )
        .unwrap();
        config["num_hidden_layers"].as_u64().unwrap() as usize
    }
}
