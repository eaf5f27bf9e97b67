//! A router process's view of its workers (`dynamo route`). Discovery says where workers are; the request
//! plane's heartbeat says whether they are alive and who they are; the event plane brings their KV events
//! and load. A worker that answers joins the router, one that goes silent (or leaves discovery) leaves it.
//!
//! The router needs no copy of any model: the first worker serving a model sends its text files (tokenizer,
//! configs, template), and from then on the frontend serves that model too, with a router of its own. Later
//! workers of a model must agree with its first on tokenizer and block size, or they are refused with the
//! reason in the log.
mod held;
mod remote;
mod resync;

pub use held::{HeldEngine, HeldSettings};
pub use remote::RemoteEngine;
use resync::KvFeed;

use crate::core::AbortOnDrop;
use crate::core::discovery::Discovery;
use crate::core::frontend::{FrontendState, Served};
use crate::core::members::announce::Announcer;
use crate::core::members::{Change, Members};
use crate::core::model::{Model, ModelError};
use crate::core::plane::PlaneError;
use crate::core::plane::request::{KvSnapshot, WorkerClient};
use crate::core::protocol::discovery::{Instance, Role};
use crate::core::protocol::plane::{Payload, Topic};
use crate::core::protocol::{KvEventBatch, LoadMetrics, ModelReport, RoutedTo, RouterReport, WorkerId, WorkerStats};
use crate::core::router::{Pool, Router, RouterConfig, RouterMode};
use crate::core::telemetry::{Latencies, Metrics, ModelTraffic, PlaneEvent, Traffic, WorkerTraffic};
use crate::core::trust::ClusterKey;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub namespace: String,
    /// A worker that has not answered for this long leaves the routing set.
    pub dead_after: Duration,
    /// Its block size is replaced by the workers'.
    pub router: RouterConfig,
    /// The cluster's secret: with it, only workers that hold it too are heard.
    pub key: Option<ClusterKey>,
    /// Engines this router holds itself, besides the workers it finds; it serves their model from the start.
    pub held: Option<HeldSettings>,
    /// Filled with the first performance profile a worker sends (a planner sizing by the workers' reads it).
    pub worker_profile: Option<crate::core::planner::WorkerProfile>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("event plane: {0}")]
    Plane(#[from] PlaneError),
    #[error("the model files sent by worker at {addr} do not load: {source}")]
    Model { addr: String, source: ModelError },
    #[error("discovery stopped before any worker appeared")]
    NoWorkers,
    #[error(transparent)]
    Serve(#[from] crate::core::frontend::ServeError),
    #[error("planner: {0}")]
    Planner(String),
    #[error(
        "cannot listen on {addr} for the endpoint picker: {source}; pick another --epp-port or --epp-health-port (0 \
         picks a free one)"
    )]
    Epp { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("endpoint picker: {0}")]
    EppTls(String),
    #[error(transparent)]
    Held(#[from] held::HeldError),
}

/// Everything the frontend needs, once the first worker has answered.
pub struct Cluster {
    pub state: Arc<FrontendState>,
    _membership: AbortOnDrop,
}

impl Cluster {
    /// Watches discovery and waits for the first compatible worker (with held engines, connects to them and
    /// waits for nobody); must run inside a tokio runtime.
    pub async fn join(
        discovery: &dyn Discovery,
        settings: ClusterSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ClusterError> {
        // Publishers filter by topic: a router with no use for KV events is not sent them.
        let topics: &[Topic] =
            if settings.router.indexes_events() { &Topic::WORKER } else { &[Topic::Load, Topic::Stats] };
        let watch = Members::watch(discovery, &settings.namespace, settings.dead_after, settings.key.as_ref(), topics)?;
        let state = match &settings.held {
            Some(held) => {
                let served = held.connect(&settings.router).await?;
                Some(Arc::new(FrontendState::new(served.model, served.router, metrics.clone())))
            }
            None => None,
        };
        let (ready, first) = oneshot::channel();
        let (snapshots, snapshot_results) = mpsc::unbounded_channel();
        let membership = Membership {
            settings,
            members: HashMap::new(),
            state: state.clone(),
            metrics,
            snapshots,
            kv_batch: KvEventBatch { worker_id: 0, events: Vec::new() },
        };
        // Aborted when dropped: a caller that stops waiting (a timeout, a shutdown) takes the membership task
        // down with it instead of leaving it to watch for nobody.
        let waiting = state.is_none().then_some(ready);
        let membership = AbortOnDrop(tokio::spawn(membership.run(watch, snapshot_results, waiting)));
        if let Some(state) = state {
            return Ok(Self { state, _membership: membership });
        }
        match first.await {
            Ok(Ok(state)) => Ok(Self { state, _membership: membership }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ClusterError::NoWorkers),
        }
    }
}

/// `dynamo route`: listens at once, serves the OpenAI API from the first compatible worker on, until
/// `shutdown` resolves.
/// With `planner`, a planner sizes the cluster meanwhile; the workers it started drain before this returns.
pub async fn serve(
    discovery: Box<dyn Discovery>,
    settings: ClusterSettings,
    listen: std::net::SocketAddr,
    http: &crate::core::frontend::HttpSettings,
    planner: Option<crate::core::planner::PlannerStart>,
    epp: Option<crate::core::epp::EppSettings>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ClusterError> {
    use crate::core::frontend::ServeError;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|source| ServeError::Bind { addr: listen, source })?;
    let epp = match epp {
        Some(settings) => Some(EppListening::bind(&settings).await?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let planning = match planner {
        Some(planner) => {
            let (namespace, key) = (&settings.namespace, settings.key.clone());
            Some(planner.spawn(metrics.clone(), namespace, settings.dead_after, key).map_err(ClusterError::Planner)?)
        }
        None => None,
    };
    let served = serve_routes(discovery, settings, listener, epp, http, metrics, shutdown).await;
    if let Some(planning) = planning {
        planning.stop().await;
    }
    served
}

/// The picker's sockets, bound (and its certificate made or read) before anything is served, so that a
/// port taken or a bad certificate stops `dynamo route` at start.
struct EppListening {
    listener: tokio::net::TcpListener,
    health_listener: Option<tokio::net::TcpListener>,
    identity: Option<tonic::transport::Identity>,
}

impl EppListening {
    async fn bind(settings: &crate::core::epp::EppSettings) -> Result<Self, ClusterError> {
        let bind = |addr| async move {
            tokio::net::TcpListener::bind(addr).await.map_err(|source| ClusterError::Epp { addr, source })
        };
        let listener = bind(settings.listen).await?;
        let health_listener = match settings.health {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let identity = settings.tls.identity().map_err(ClusterError::EppTls)?;
        Ok(Self { listener, health_listener, identity })
    }
}

async fn serve_routes(
    discovery: Box<dyn Discovery>,
    settings: ClusterSettings,
    listener: tokio::net::TcpListener,
    epp: Option<EppListening>,
    http: &crate::core::frontend::HttpSettings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ClusterError> {
    use crate::core::frontend::{LateApp, ServeError};
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    let namespace = settings.namespace.clone();
    let waiting = format!("no worker of namespace {namespace:?} has joined yet; start one with `dynamo decode`");
    let app = LateApp::waiting(metrics.clone(), waiting.clone());
    let picker = crate::core::epp::FrontendPicker::waiting(waiting);
    let mut server = tokio::spawn(crate::core::frontend::serve_app(listener, app.router(), http.clone(), shutdown));
    // Ends with the router: aborted when this returns.
    let mut picker_at = String::new();
    let mut health = None;
    let _picking = match epp {
        Some(EppListening { listener, health_listener, identity }) => {
            let at = listener.local_addr().map_err(ServeError::Serve)?;
            let processor = crate::core::epp::ExternalProcessor::new(Arc::new(picker.clone()), http.max_request_bytes);
            let scheme = if identity.is_some() { "TLS" } else { "h2c" };
            picker_at = format!(" and endpoint picker (Envoy ext_proc, {scheme}) on {at}");
            if let Some(listener) = health_listener {
                let health_at = listener.local_addr().map_err(ServeError::Serve)?;
                picker_at.push_str(&format!(" (gRPC health on {health_at})"));
                health = Some(crate::core::epp::Health::serve(listener).await);
            }
            Some(AbortOnDrop(tokio::spawn(async move {
                if let Err(error) = crate::core::epp::serve(listener, processor, identity, std::future::pending()).await
                {
                    tracing::error!("the endpoint picker stopped: {error}");
                }
            })))
        }
        None => None,
    };
    println!("dynamo: router on http://{addr}{picker_at} waiting for workers in namespace {namespace:?}");
    let mode = settings.router.mode;
    let key = settings.key.clone();
    let held = settings.held.as_ref().map(|held| format!("{} and ", held.describe())).unwrap_or_default();
    let cluster = tokio::select! {
        cluster = Cluster::join(discovery.as_ref(), settings, metrics.clone()) => cluster,
        // Shut down (or failed) before any worker came.
        served = &mut server => return served_result(served),
    };
    let cluster = cluster.inspect_err(|_| server.abort())?;
    if let Some(parser) = http.tool_parser {
        cluster.state.use_tool_parser(parser);
    }
    app.ready(cluster.state.clone());
    picker.ready(cluster.state.clone());
    if let Some((health, _)) = &health {
        health.ready().await;
    }
    let _reporting = match Announcer::start(discovery.as_ref(), &namespace, Role::Router, addr.ip(), key.as_ref()) {
        Ok(announcer) => Some(AbortOnDrop(tokio::spawn(report_traffic(announcer, metrics, cluster.state.clone())))),
        Err(error) => {
            tracing::warn!("this router's traffic will not be on the event plane: {error}");
            None
        }
    };
    println!(
        "dynamo: serving {} on http://{addr} with {held}the workers discovery finds, {} routing; try: curl \
         http://{addr}/v1/models",
        cluster.state.first().model.card.name,
        mode.name()
    );
    served_result(server.await)
}

/// How often a router publishes its traffic (`router` topic).
const REPORT_INTERVAL: Duration = Duration::from_secs(2);

async fn report_traffic(mut announcer: Announcer, metrics: Arc<Metrics>, state: Arc<FrontendState>) {
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.tick().await;
    let mut last = (metrics.traffic(), std::time::Instant::now());
    loop {
        tick.tick().await;
        let now = (metrics.traffic(), std::time::Instant::now());
        let workers: usize = state.served().iter().map(|s| s.router.worker_count()).sum();
        let seconds = (now.1 - last.1).as_secs_f64();
        let mut report = traffic_report(&now.0.since(&last.0), &metrics.take_latencies(), seconds, workers);
        let models = metrics.take_model_traffic();
        if state.served().len() > 1 {
            report.models = models.into_iter().map(|(model, traffic)| model_report(model, traffic, seconds)).collect();
        }
        report.routed = routed_report(metrics.take_routed(), seconds);
        report.disagg = (metrics.take_disagg().into_iter())
            .map(|(decision, count)| (decision.to_string(), count as f64 / seconds.max(1e-9)))
            .collect();
        announcer.publish(&report);
        last = now;
    }
}

/// An interval's traffic as rates, means and percentiles.
pub fn traffic_report(interval: &Traffic, latencies: &Latencies, seconds: f64, workers: usize) -> RouterReport {
    let per_second = |count: u64| count as f64 / seconds.max(1e-9);
    let quantile = Latencies::quantile_ms;
    RouterReport {
        interval_s: seconds,
        requests_per_s: per_second(interval.requests),
        refused_per_s: per_second(interval.refused),
        output_tokens_per_s: per_second(interval.output_tokens),
        ttft_ms: interval.mean_ttft_ms(),
        itl_ms: interval.mean_itl_ms(),
        ttft_p50_ms: quantile(&latencies.ttft_us, 0.5),
        ttft_p99_ms: quantile(&latencies.ttft_us, 0.99),
        itl_p50_ms: quantile(&latencies.itl_us, 0.5),
        itl_p99_ms: quantile(&latencies.itl_us, 0.99),
        prefix_hit: (interval.input_tokens > 0).then(|| interval.cached_tokens as f64 / interval.input_tokens as f64),
        workers: u32::try_from(workers).unwrap_or(u32::MAX),
        models: Vec::new(),
        routed: Vec::new(),
        disagg: Vec::new(),
    }
}

/// Requests per worker over an interval, busiest first.
pub fn routed_report(mut routed: Vec<(u64, WorkerTraffic)>, seconds: f64) -> Vec<RoutedTo> {
    routed.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
    let per_second = |count: u64| count as f64 / seconds.max(1e-9);
    (routed.into_iter())
        .map(|(worker, mut traffic)| RoutedTo {
            worker: format!("{worker:016x}"),
            requests_per_s: per_second(traffic.requests),
            ttft_p50_ms: Latencies::quantile_ms(&traffic.ttft_us(), 0.5),
        })
        .collect()
}

/// One model's part of an interval's traffic.
pub fn model_report(model: String, mut traffic: ModelTraffic, seconds: f64) -> ModelReport {
    let per_second = |count: u64| count as f64 / seconds.max(1e-9);
    let ttft = traffic.ttft_us();
    ModelReport {
        model,
        requests_per_s: per_second(traffic.requests),
        output_tokens_per_s: per_second(traffic.output_tokens),
        ttft_p50_ms: Latencies::quantile_ms(&ttft, 0.5),
        ttft_p99_ms: Latencies::quantile_ms(&ttft, 0.99),
        prefix_hit: (traffic.input_tokens > 0).then(|| traffic.cached_tokens as f64 / traffic.input_tokens as f64),
    }
}

fn served_result(served: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), ClusterError> {
    use crate::core::frontend::ServeError;
    match served {
        Ok(result) => result.map_err(|e| ServeError::Serve(e).into()),
        Err(panicked) => Err(ServeError::Serve(std::io::Error::other(panicked.to_string())).into()),
    }
}

/// How long a router waits for a worker's KV snapshot before dropping that worker's index entries instead.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a joining worker has to send its performance profile (latency routing).
const PROFILE_TIMEOUT: Duration = Duration::from_secs(5);

struct Member {
    id: WorkerId,
    /// The router of the model this worker serves.
    router: Arc<Router>,
    client: Arc<WorkerClient>,
    feed: KvFeed,
    load: Arc<std::sync::Mutex<LoadMetrics>>,
}

/// A snapshot that arrived (or did not) for the worker with this id at this endpoint.
type SnapshotResult = (String, WorkerId, Option<KvSnapshot>);

struct Membership {
    settings: ClusterSettings,
    /// Endpoints whose worker is in the router.
    members: HashMap<String, Member>,
    /// What the frontend serves (every model, each with its router), from the first model on.
    state: Option<Arc<FrontendState>>,
    metrics: Arc<Metrics>,
    snapshots: mpsc::UnboundedSender<SnapshotResult>,
    /// The KV batch being applied, decoded into the last one's memory.
    kv_batch: KvEventBatch,
}

type Ready = oneshot::Sender<Result<Arc<FrontendState>, ClusterError>>;

impl Membership {
    async fn run(
        mut self,
        mut watch: Members,
        mut snapshot_results: mpsc::UnboundedReceiver<SnapshotResult>,
        mut ready: Option<Ready>,
    ) {
        loop {
            tokio::select! {
                change = watch.next() => match change {
                    None => return,
                    Some(Change::Found(_)) => {}
                    Some(Change::Left(endpoint)) => self.leave(&endpoint, &mut watch, "left discovery"),
                    Some(Change::Lost(endpoint)) => self.leave(&endpoint, &mut watch, "stopped answering"),
                    Some(Change::Answered { endpoint, instance }) => {
                        self.leave(&endpoint, &mut watch, "restarted");
                        if let Err(error) = self.admit(&endpoint, instance, &mut watch, &mut ready).await {
                            tracing::warn!("{error}");
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(Err(error));
                                return;
                            }
                        }
                    }
                    Some(Change::Incompatible { endpoint, theirs }) => {
                        self.metrics.worker_refused("protocol");
                        tracing::warn!(
                            "worker at {endpoint} speaks request-plane version {theirs}, this router {}; not used",
                            crate::core::protocol::request::PROTOCOL_VERSION
                        )
                    }
                    Some(Change::Delivered { endpoint, delivery }) => self.deliver(&endpoint, delivery),
                    Some(Change::Malformed(error)) => {
                        self.metrics.plane(PlaneEvent::Malformed, 1);
                        tracing::warn!("event plane: {error}");
                    }
                    Some(Change::Dropped(dropped)) => {
                        for (reason, count) in dropped {
                            self.metrics.request_plane_dropped(reason, count);
                        }
                    }
                },
                Some((addr, id, snapshot)) = snapshot_results.recv() => self.resynced(&addr, id, snapshot),
            }
        }
    }

    async fn admit(
        &mut self,
        addr: &str,
        instance: Instance,
        watch: &mut Members,
        ready: &mut Option<Ready>,
    ) -> Result<(), ClusterError> {
        let Some(client) = watch.client(addr) else { return Ok(()) };
        let pool = match instance.role {
            Role::Decode => Pool::Decode,
            Role::Prefill if instance.transfer_addr.is_some() => Pool::Prefill,
            Role::Prefill => {
                self.metrics.worker_refused("no_transfer_agent");
                tracing::warn!("prefill worker {:016x} at {addr} names no transfer agent; not used", instance.id);
                return Ok(());
            }
            Role::Encode if instance.transfer_addr.is_some() => Pool::Encode,
            Role::Encode => {
                self.metrics.worker_refused("no_transfer_agent");
                tracing::warn!("encode worker {:016x} at {addr} names no transfer agent; not used", instance.id);
                return Ok(());
            }
            role @ (Role::Planner | Role::Router) => {
                // Stays out of the routing set for good: it answers pings and nothing else.
                watch.forget(addr);
                tracing::debug!("the member at {addr} is a {}, not a worker", role.name());
                return Ok(());
            }
        };
        // Ids are random per process: a second endpoint answering with a live worker's id is an impostor (or a
        // copy of its state), and taking it would hand it the real worker's place and, when it left, remove both.
        if let Some(holder) = self.members.iter().find(|(at, m)| m.id == instance.id && at.as_str() != addr) {
            self.metrics.worker_refused("duplicate_id");
            tracing::warn!(
                "the member at {addr} answers as worker {:016x}, which the worker at {} is; not used",
                instance.id,
                holder.0
            );
            return Ok(());
        }
        if instance.namespace != self.settings.namespace {
            self.metrics.worker_refused("namespace");
            tracing::warn!(
                "worker at {addr} is in namespace {:?}, this router in {:?}; not used",
                instance.namespace,
                self.settings.namespace
            );
            return Ok(());
        }
        // Only latency routing prices workers in time; a worker that sends none is priced with another's.
        // Asked before the router is made ready below, so that no request finds it without this worker.
        let profile = match self.settings.router.mode {
            RouterMode::Latency => client.profile(PROFILE_TIMEOUT).await,
            _ => None,
        };
        if self.settings.router.mode == RouterMode::Latency && profile.is_none() {
            tracing::info!("worker {:016x} at {addr} sent no performance profile", instance.id);
        }
        if let (Some(sent), Some(profile)) = (&self.settings.worker_profile, &profile)
            && sent.set(Arc::new(profile.clone())).is_ok()
        {
            tracing::info!("the planner sizes by the performance profile of worker {:016x}", instance.id);
        }
        let router = match self.state.as_ref().and_then(|state| state.find(&instance.model)) {
            Some(served) => {
                if let Some(reason) = incompatibility(&served.model, served.router.block_size(), &instance) {
                    self.metrics.worker_refused("model");
                    tracing::warn!("worker {:016x} at {addr} {reason}; not used", instance.id);
                    return Ok(());
                }
                served.router.clone()
            }
            None => {
                let Some(files) = client.model_files(Duration::from_secs(30)).await else {
                    tracing::warn!("worker at {addr} did not send its model files; will retry when it answers again");
                    return Ok(());
                };
                let mut model = Model::from_text_files(format!("worker at {addr}"), files, instance.model.clone())
                    .map_err(|source| ClusterError::Model { addr: addr.to_string(), source })?;
                // The context the worker serves, which its --max-model-len may have shortened.
                model.card.context_length = instance.card.context_length;
                let config =
                    RouterConfig { block_size: instance.card.block_size as usize, ..self.settings.router.clone() };
                let served = Served { model: Arc::new(model), router: Arc::new(Router::new(Vec::new(), config)) };
                match &self.state {
                    Some(state) => {
                        state.add(served.model.clone(), served.router.clone());
                        tracing::info!("now serving model {:?} too (first worker at {addr})", instance.model);
                    }
                    None => {
                        let state = Arc::new(FrontendState::new(
                            served.model.clone(),
                            served.router.clone(),
                            self.metrics.clone(),
                        ));
                        self.state = Some(state.clone());
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Ok(state));
                        }
                    }
                }
                served.router
            }
        };
        watch.subscribe(addr, &instance)?;
        let engine = RemoteEngine::new(instance.clone(), client.clone()).with_profile(profile);
        let mut member = Member {
            id: instance.id,
            router: router.clone(),
            client,
            feed: KvFeed::default(),
            load: engine.load_cell(),
        };
        router.add_remote_worker(Arc::new(engine), pool);
        // The worker may have cached blocks before this router knew it (a router restarted, say).
        if self.settings.router.indexes_events() && pool != Pool::Encode {
            resync(&self.snapshots, addr, &mut member);
        }
        self.members.insert(addr.to_string(), member);
        tracing::info!(
            "{} worker {:016x} joined: {} at {addr}, {} KV blocks of {} tokens ({} workers)",
            instance.role.name(),
            instance.id,
            instance.model,
            instance.card.kv_blocks,
            instance.card.block_size,
            self.members.len()
        );
        Ok(())
    }

    fn leave(&mut self, addr: &str, watch: &mut Members, why: &str) {
        watch.unsubscribe(addr);
        let Some(member) = self.members.remove(addr) else { return };
        self.metrics.forget_worker(member.id);
        member.router.remove_worker(member.id);
        tracing::info!("worker {:016x} at {addr} {why}; {} workers left", member.id, self.members.len());
    }

    fn resynced(&mut self, addr: &str, id: WorkerId, snapshot: Option<KvSnapshot>) {
        let Some(member) = self.members.get_mut(addr).filter(|m| m.id == id) else { return };
        match &snapshot {
            Some(snapshot) => {
                self.metrics.plane(PlaneEvent::ResyncOk, 1);
                tracing::debug!(
                    "worker {id:016x}: KV index rebuilt from a snapshot of {} events",
                    snapshot.events.len()
                );
            }
            None => {
                self.metrics.plane(PlaneEvent::ResyncFailed, 1);
                tracing::warn!(
                    "worker {id:016x} sent no KV snapshot in {SNAPSHOT_TIMEOUT:?}; its index entries are dropped"
                );
            }
        }
        for batch in member.feed.finish(id, snapshot) {
            member.router.apply_kv_events(id, &batch.events);
        }
    }

    fn deliver(&mut self, addr: &str, delivery: crate::core::plane::Delivery) {
        let publisher = delivery.header.publisher;
        let Some(member) = self.members.get_mut(addr) else { return };
        match delivery.continuity {
            crate::core::plane::Continuity::InOrder => {}
            gap => {
                let (event, count) = match gap {
                    crate::core::plane::Continuity::Gap(lost) => (PlaneEvent::LostMessages, lost),
                    _ => (PlaneEvent::PublisherRestart, 1),
                };
                self.metrics.plane(event, count);
                tracing::warn!("event plane: {gap:?} in {:?} from worker {publisher:016x}", delivery.header.topic);
                if delivery.header.topic == Topic::Kv {
                    resync(&self.snapshots, addr, member);
                }
            }
        }
        match delivery.header.topic {
            Topic::Kv => match self.kv_batch.decode_into(&delivery.payload) {
                Ok(()) => {
                    // Indexed under the publisher it came from, whatever id the batch claims.
                    if member.feed.receive(delivery.header.seq, &self.kv_batch) {
                        member.router.apply_kv_events(member.id, &self.kv_batch.events);
                    }
                }
                Err(error) => {
                    self.metrics.plane(PlaneEvent::Malformed, 1);
                    tracing::warn!("worker {publisher:016x} sent unreadable KV events: {error}");
                    // What it meant is unknown, so what the index holds for it is too.
                    resync(&self.snapshots, addr, member);
                }
            },
            Topic::Stats => match WorkerStats::from_bytes(&delivery.payload) {
                Ok(stats) => self.metrics.worker_stats(publisher, &stats),
                Err(error) => {
                    self.metrics.plane(PlaneEvent::Malformed, 1);
                    tracing::warn!("worker {publisher:016x} sent unreadable stats: {error}");
                }
            },
            // Never subscribed to: routers take the workers' topics only.
            Topic::Plan | Topic::Router => {}
            Topic::Load => match LoadMetrics::from_bytes(&delivery.payload) {
                Ok(load) => *member.load.lock().unwrap_or_else(|p| p.into_inner()) = load,
                Err(error) => {
                    self.metrics.plane(PlaneEvent::Malformed, 1);
                    tracing::warn!("worker {publisher:016x} sent an unreadable load report: {error}");
                }
            },
        }
    }
}

/// Asks `member`'s worker for a snapshot unless one is on its way; its events are held until it comes.
fn resync(results: &mpsc::UnboundedSender<SnapshotResult>, addr: &str, member: &mut Member) {
    if !member.feed.begin_resync() {
        return;
    }
    let (client, results, addr, id) = (member.client.clone(), results.clone(), addr.to_string(), member.id);
    tokio::spawn(async move {
        let snapshot = client.kv_snapshot(SNAPSHOT_TIMEOUT).await;
        let _ = results.send((addr, id, snapshot));
    });
}

/// Why a worker cannot join the router of the model it serves (`model`), if it cannot.
fn incompatibility(model: &Model, block_size: usize, instance: &Instance) -> Option<String> {
    if instance.card.tokenizer_hash != model.tokenizer_hash {
        return Some(format!("has another tokenizer than the router's other workers of {:?}", instance.model));
    }
    // An encode worker keeps no KV: its blocks are nobody's concern.
    if instance.role != Role::Encode && instance.card.block_size as usize != block_size {
        return Some(format!("uses KV blocks of {} tokens, the router {block_size}", instance.card.block_size));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::mocker::{MockerConfig, MockerEngine};
    use crate::core::engine::{HandKeptLedger, KvLedger};
    use crate::core::model::ModelSource;
    use crate::core::plane::request::{RequestServer, Served};
    use crate::core::plane::{EventPublisher, HIGH_WATER_MARK};
    use crate::core::protocol::discovery::ModelCardSummary;
    use crate::core::protocol::{KvEvent, PreprocessedRequest, StoredBlock};
    use crate::core::tokens::block_hashes;
    use crate::core::worker::{PlaneSettings, expose};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    /// A worker's KV events for `tokens`, as one chain.
    fn stored(worker: WorkerId, tokens: &[u32]) -> KvEventBatch {
        let hashes = block_hashes(tokens, 16);
        let blocks = hashes.iter().map(|h| StoredBlock { hash: h.sequence, tokens_hash: h.local }).collect();
        KvEventBatch { worker_id: worker, events: vec![KvEvent::Stored { parent_hash: None, blocks }] }
    }

    fn overlap(router: &Router, tokens: &[u32]) -> u32 {
        // The stream is dropped at once, which cancels the request on the worker.
        router.route(PreprocessedRequest::greedy("probe", tokens.to_vec(), 1)).map_or(0, |s| s.overlap_blocks)
    }

    fn plane_count(metrics: &Metrics, event: &str) -> f64 {
        let sample = format!("dynamo_router_event_plane_total{{event=\"{event}\"}}");
        metrics.render(&[], &[]).lines().find_map(|l| l.strip_prefix(&sample)?.trim().parse().ok()).unwrap_or(0.0)
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_gap_is_repaired_from_the_workers_snapshot() {
        let context = crate::core::plane::Context::new();
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let id = 0xabc;
        let mut publisher = EventPublisher::bind(&context, "tcp://127.0.0.1:*", id, HIGH_WATER_MARK).unwrap();
        let card = ModelCardSummary {
            block_size: 16,
            context_length: 4096,
            kv_blocks: 1024,
            tokenizer_hash: model.tokenizer_hash,
        };
        let instance = Instance {
            id,
            role: Role::Decode,
            model: model.card.name.clone(),
            namespace: "gap".into(),
            request_addr: String::new(),
            event_addr: publisher.endpoint().to_string(),
            transfer_addr: None,
            card,
            device: String::new(),
            http_addr: None,
            adapters: Vec::new(),
        };
        let mocker =
            MockerEngine::spawn(id, MockerConfig { speedup: 100.0, ..MockerConfig::default() }, (0..1000).collect());
        // Its snapshot is what this test publishes by hand.
        let engine = Arc::new(HandKeptLedger { engine: Arc::new(mocker), ledger: Mutex::new(KvLedger::default()) });
        let kv_published = Arc::new(AtomicU64::new(0));
        let served = Served {
            engine: engine.clone(),
            instance: instance.clone(),
            model_files: model.text_files().to_vec(),
            max_in_flight: 64,
            kv_published: kv_published.clone(),
        };
        let server = RequestServer::bind(&context, "tcp://127.0.0.1:*", served).unwrap();
        let cluster = crate::core::discovery::TempClusterFile::new();
        let discovery = &cluster.discovery;
        let _registration =
            discovery.register(&Instance { request_addr: server.endpoint().to_string(), ..instance }).unwrap();
        let settings = ClusterSettings {
            namespace: "gap".into(),
            dead_after: Duration::from_secs(5),
            router: RouterConfig::default(),
            key: None,
            held: None,
            worker_profile: None,
        };
        let cluster = Cluster::join(discovery, settings, Arc::new(Metrics::new())).await.unwrap();
        let (router, metrics) = (cluster.state.first().router, cluster.state.metrics.clone());
        eventually("the join's snapshot", || plane_count(&metrics, "resync_ok") >= 1.0).await;

        let mut send = async |batch: &KvEventBatch, lose: bool| {
            engine.ledger.lock().unwrap().record(&batch.events);
            if lose {
                publisher.skip(Topic::Kv);
            } else {
                publisher.publish(batch).unwrap();
            }
            kv_published.store(publisher.next_seq(Topic::Kv), Ordering::Release);
        };
        let prompt = |first: u32| (first..first + 48).collect::<Vec<u32>>();
        // Until the subscription is up, messages vanish unseen (no gap either): repeat until one lands.
        let (seen, lost, after) = (prompt(100), prompt(200), prompt(300));
        let deadline = Instant::now() + Duration::from_secs(10);
        while overlap(&router, &seen) == 0 {
            assert!(Instant::now() < deadline, "the router never received an event");
            send(&stored(id, &seen), false).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        send(&stored(id, &lost), true).await;
        assert_eq!(overlap(&router, &lost), 0);
        send(&stored(id, &after), false).await;
        eventually("the second snapshot", || plane_count(&metrics, "resync_ok") >= 2.0).await;
        assert_eq!(overlap(&router, &lost), 3, "the lost message's blocks came with the snapshot");
        assert_eq!(overlap(&router, &after), 3, "the message after the gap was applied too");
        assert_eq!(overlap(&router, &seen), 3);
        assert_eq!(plane_count(&metrics, "lost_messages"), 1.0);
    }

    fn mocker(id: WorkerId) -> Arc<dyn crate::core::engine::Engine> {
        Arc::new(MockerEngine::spawn(id, MockerConfig::default(), (0..1000).collect()))
    }

    fn settings(namespace: &str, key: Option<crate::core::trust::ClusterKey>) -> ClusterSettings {
        ClusterSettings {
            namespace: namespace.into(),
            dead_after: Duration::from_secs(5),
            router: RouterConfig::default(),
            key,
            held: None,
            worker_profile: None,
        }
    }

    #[tokio::test]
    async fn a_join_given_up_on_takes_its_membership_task_down() {
        let cluster = crate::core::discovery::TempClusterFile::new();
        let metrics = Arc::new(Metrics::new());
        let join = Cluster::join(&cluster.discovery, settings("nobody", None), metrics.clone());
        assert!(tokio::time::timeout(Duration::from_millis(200), join).await.is_err(), "no worker, no cluster");
        // The task held the only other reference to the metrics.
        eventually("the membership task ends", || Arc::strong_count(&metrics) == 1).await;
    }

    #[tokio::test]
    async fn a_prefill_worker_is_never_given_whole_requests() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let cluster = crate::core::discovery::TempClusterFile::new();
        let discovery = &cluster.discovery;
        let _prefill =
            expose(mocker(1), &model, 16, &PlaneSettings::loopback(Role::Prefill, "roles", None), discovery).unwrap();
        // The prefill worker answers within milliseconds; the router must not take it as its first worker.
        let alone = tokio::time::timeout(
            Duration::from_secs(2),
            Cluster::join(discovery, settings("roles", None), Arc::new(Metrics::new())),
        )
        .await;
        assert!(alone.is_err(), "a router served with only a prefill worker");
        let _decode =
            expose(mocker(2), &model, 16, &PlaneSettings::loopback(Role::Decode, "roles", None), discovery).unwrap();
        let cluster = Cluster::join(discovery, settings("roles", None), Arc::new(Metrics::new())).await.unwrap();
        let router = cluster.state.first().router;
        let routed = router.route(PreprocessedRequest::greedy("r", vec![1, 2, 3], 1)).unwrap();
        assert_eq!(routed.worker_id, 2);
    }

    #[tokio::test]
    async fn a_second_endpoint_answering_with_a_live_workers_id_is_not_used() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let cluster = crate::core::discovery::TempClusterFile::new();
        let discovery = &cluster.discovery;
        let planes = PlaneSettings::loopback(Role::Decode, "ids", None);
        let honest = expose(mocker(5), &model, 16, &planes, discovery).unwrap();
        let metrics = Arc::new(Metrics::new());
        let cluster = Cluster::join(discovery, settings("ids", None), metrics.clone()).await.unwrap();
        // Another process says it is worker 5: taking it would give it 5's requests (and its leaving would
        // take 5 out of routing).
        let impostor = expose(mocker(5), &model, 16, &planes, discovery).unwrap();
        let refused = || {
            let sample = "dynamo_router_workers_refused_total{reason=\"duplicate_id\"}";
            let text = metrics.render(&[], &[]);
            text.lines().find_map(|l| l.strip_prefix(sample)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
        };
        eventually("the impostor is refused", || refused() >= 1.0).await;
        let router = cluster.state.first().router;
        assert_eq!(router.worker_count(), 1);
        let streams: Vec<_> = (0..3)
            .map(|i| router.route(PreprocessedRequest::greedy(format!("r{i}"), vec![1, 2, 3], 2000)).unwrap())
            .collect();
        eventually("the requests run on the real worker", || honest.in_flight() == 3).await;
        assert_eq!(impostor.in_flight(), 0, "the impostor was handed requests");
        drop(streams);
    }

    #[tokio::test]
    async fn a_router_with_a_key_hears_only_workers_with_it() {
        use crate::core::trust::ClusterKey;
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let cluster = crate::core::discovery::TempClusterFile::new();
        let discovery = &cluster.discovery;
        let key = ClusterKey::generate().unwrap();
        let planes = |key| PlaneSettings::loopback(Role::Decode, "keys", key);
        let _open = expose(mocker(1), &model, 16, &planes(None), discovery).unwrap();
        let _other = expose(mocker(2), &model, 16, &planes(Some(ClusterKey::generate().unwrap())), discovery).unwrap();
        let strangers_only = tokio::time::timeout(
            Duration::from_secs(2),
            Cluster::join(discovery, settings("keys", Some(key.clone())), Arc::new(Metrics::new())),
        )
        .await;
        assert!(strangers_only.is_err(), "a keyed router took a worker without its key");
        let _member = expose(mocker(3), &model, 16, &planes(Some(key.clone())), discovery).unwrap();
        let metrics = Arc::new(Metrics::new());
        let cluster = Cluster::join(discovery, settings("keys", Some(key)), metrics.clone()).await.unwrap();
        let router = cluster.state.first().router;
        let mut routed = router.route(PreprocessedRequest::greedy("r", vec![1, 2, 3], 4)).unwrap();
        assert_eq!(routed.worker_id, 3);
        let mut tokens = 0;
        while let Some(output) = futures::StreamExt::next(&mut routed).await {
            tokens += output.token_ids.len();
        }
        assert_eq!(tokens, 4, "the member's sealed stream arrives whole");
        // The strangers' answers are dropped unread, and counted.
        let dropped = || {
            let sample = "dynamo_router_request_plane_dropped_total{reason=\"unsealed\"}";
            metrics
                .render(&[], &[])
                .lines()
                .find_map(|l| l.strip_prefix(sample)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        eventually("the strangers' answers counted", || dropped() > 0.0).await;
    }
}
