//! A router process's view of its workers (`dynamo route`). Discovery says where workers are; the request
//! plane's heartbeat says whether they are alive and who they are; the event plane brings their KV events
//! and load. A worker that answers joins the router, one that goes silent (or leaves discovery) leaves it.
//!
//! The router needs no copy of the model: the first compatible worker sends its text files (tokenizer,
//! configs, template). Later workers must agree with it on model name, tokenizer and block size, or they
//! are refused with the reason in the log.
mod remote;

pub use remote::RemoteEngine;

use crate::core::discovery::{Discovery, DiscoveryEvent};
use crate::core::frontend::FrontendState;
use crate::core::model::{Model, ModelError};
use crate::core::plane::request::{WorkerClient, WorkerStatus};
use crate::core::plane::{EventSubscriber, HIGH_WATER_MARK, PlaneError};
use crate::core::protocol::discovery::Instance;
use crate::core::protocol::plane::{Topic, decode_payload};
use crate::core::protocol::{KvEventBatch, LoadMetrics, WorkerId};
use crate::core::router::{Router, RouterConfig};
use crate::core::telemetry::Metrics;
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
}

/// Everything the frontend needs, once the first worker has answered.
pub struct Cluster {
    pub state: Arc<FrontendState>,
    membership: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.membership.abort();
    }
}

impl Cluster {
    /// Watches discovery and waits for the first compatible worker; must run inside a tokio runtime.
    pub async fn join(discovery: &dyn Discovery, settings: ClusterSettings) -> Result<Self, ClusterError> {
        let context = tmq::Context::new();
        let subscriber = EventSubscriber::new(&context, &Topic::ALL, HIGH_WATER_MARK)?;
        let watch = discovery.watch(&settings.namespace);
        let (ready, first) = oneshot::channel();
        let membership =
            Membership { context, settings, clients: HashMap::new(), members: HashMap::new(), router: None };
        let membership = tokio::spawn(membership.run(watch, subscriber, ready));
        match first.await {
            Ok(Ok(state)) => Ok(Self { state, membership }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ClusterError::NoWorkers),
        }
    }
}

/// `dynamo route`: waits for the first worker, then serves the OpenAI API until `shutdown` resolves.
pub async fn serve(
    discovery: Box<dyn Discovery>,
    settings: ClusterSettings,
    listen: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ClusterError> {
    eprintln!("dynamo: waiting for workers in namespace {:?}", settings.namespace);
    let mode = settings.router.mode;
    let cluster = Cluster::join(discovery.as_ref(), settings).await?;
    let banner = |addr| {
        format!(
            "dynamo: serving {} on http://{addr} with the workers discovery finds, {mode:?} routing; try: curl \
             http://{addr}/v1/models",
            cluster.state.model.card.name
        )
    };
    Ok(crate::core::frontend::bind_and_serve(listen, cluster.state.clone(), banner, shutdown).await?)
}

struct Member {
    id: WorkerId,
    event_addr: String,
    kv: tokio::sync::broadcast::Sender<KvEventBatch>,
    load: Arc<std::sync::Mutex<LoadMetrics>>,
}

struct Membership {
    context: tmq::Context,
    settings: ClusterSettings,
    /// One connection per discovered request endpoint, alive or not.
    clients: HashMap<String, Arc<WorkerClient>>,
    /// Endpoints whose worker is in the router.
    members: HashMap<String, Member>,
    router: Option<(Arc<Router>, Arc<Model>)>,
}

type Ready = oneshot::Sender<Result<Arc<FrontendState>, ClusterError>>;

impl Membership {
    async fn run(
        mut self,
        mut watch: mpsc::UnboundedReceiver<DiscoveryEvent>,
        mut subscriber: EventSubscriber,
        ready: Ready,
    ) {
        let (status_sender, mut statuses) = mpsc::unbounded_channel::<(String, WorkerStatus)>();
        let mut ready = Some(ready);
        loop {
            tokio::select! {
                event = watch.recv() => match event {
                    None => return,
                    Some(DiscoveryEvent::Added(addr)) => self.connect(addr, &status_sender),
                    Some(DiscoveryEvent::Removed(addr)) => {
                        self.clients.remove(&addr);
                        self.leave(&addr, &mut subscriber, "left discovery");
                    }
                },
                Some((addr, status)) = statuses.recv() => match status {
                    WorkerStatus::Alive(instance) => {
                        self.leave(&addr, &mut subscriber, "restarted");
                        if let Err(error) = self.admit(&addr, instance, &mut subscriber, &mut ready).await {
                            tracing::warn!("{error}");
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(Err(error));
                                return;
                            }
                        }
                    }
                    WorkerStatus::Lost => self.leave(&addr, &mut subscriber, "stopped answering"),
                    WorkerStatus::Incompatible { theirs } => tracing::warn!(
                        "worker at {addr} speaks request-plane version {theirs}, this router {}; not used",
                        crate::core::protocol::request::PROTOCOL_VERSION
                    ),
                },
                delivery = subscriber.next() => match delivery {
                    Some(Ok(delivery)) => self.deliver(delivery),
                    Some(Err(error)) => tracing::warn!("event plane: {error}"),
                    None => return,
                },
            }
        }
    }

    fn connect(&mut self, addr: String, statuses: &mpsc::UnboundedSender<(String, WorkerStatus)>) {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        match WorkerClient::connect(&self.context, &addr, self.settings.dead_after, sender) {
            Ok(client) => {
                self.clients.insert(addr.clone(), Arc::new(client));
                let statuses = statuses.clone();
                tokio::spawn(async move {
                    while let Some(status) = receiver.recv().await {
                        if statuses.send((addr.clone(), status)).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(error) => tracing::warn!("cannot connect to worker at {addr}: {error}"),
        }
    }

    async fn admit(
        &mut self,
        addr: &str,
        instance: Instance,
        subscriber: &mut EventSubscriber,
        ready: &mut Option<Ready>,
    ) -> Result<(), ClusterError> {
        let Some(client) = self.clients.get(addr).cloned() else { return Ok(()) };
        if instance.namespace != self.settings.namespace {
            tracing::warn!(
                "worker at {addr} is in namespace {:?}, this router in {:?}; not used",
                instance.namespace,
                self.settings.namespace
            );
            return Ok(());
        }
        let router = match &self.router {
            Some((router, model)) => {
                if let Some(reason) = incompatibility(model, router.block_size(), &instance) {
                    tracing::warn!("worker {:016x} at {addr} {reason}; not used", instance.id);
                    return Ok(());
                }
                router.clone()
            }
            None => {
                let Some(files) = client.model_files(Duration::from_secs(30)).await else {
                    tracing::warn!("worker at {addr} did not send its model files; will retry when it answers again");
                    return Ok(());
                };
                let model = Model::from_text_files(format!("worker at {addr}"), files, instance.model.clone())
                    .map_err(|source| ClusterError::Model { addr: addr.to_string(), source })?;
                let config =
                    RouterConfig { block_size: instance.card.block_size as usize, ..self.settings.router.clone() };
                let router = Arc::new(Router::new(Vec::new(), config));
                let model = Arc::new(model);
                self.router = Some((router.clone(), model.clone()));
                if let Some(ready) = ready.take() {
                    let state = FrontendState::new(model, router.clone(), Arc::new(Metrics::new()));
                    let _ = ready.send(Ok(Arc::new(state)));
                }
                router
            }
        };
        subscriber.add_publisher(&instance.event_addr)?;
        let engine = RemoteEngine::new(instance.clone(), client);
        let member = Member {
            id: instance.id,
            event_addr: instance.event_addr.clone(),
            kv: engine.kv_sender(),
            load: engine.load_cell(),
        };
        router.add_worker(Arc::new(engine));
        self.members.insert(addr.to_string(), member);
        tracing::info!(
            "worker {:016x} joined: {} at {addr}, {} KV blocks of {} tokens ({} workers)",
            instance.id,
            instance.model,
            instance.card.kv_blocks,
            instance.card.block_size,
            self.members.len()
        );
        Ok(())
    }

    fn leave(&mut self, addr: &str, subscriber: &mut EventSubscriber, why: &str) {
        let Some(member) = self.members.remove(addr) else { return };
        if let Some((router, _)) = &self.router {
            router.remove_worker(member.id);
        }
        if let Err(error) = subscriber.remove_publisher(&member.event_addr) {
            tracing::debug!("event plane: {error}");
        }
        tracing::info!("worker {:016x} at {addr} {why}; {} workers left", member.id, self.members.len());
    }

    fn deliver(&mut self, delivery: crate::core::plane::Delivery) {
        let publisher = delivery.header.publisher;
        let Some(member) = self.members.values().find(|m| m.id == publisher) else { return };
        match delivery.continuity {
            crate::core::plane::Continuity::InOrder => {}
            // Resync from a snapshot is not built yet: the index heals as the worker's blocks churn.
            gap => {
                tracing::warn!("event plane: {gap:?} from worker {publisher:016x}; its KV index entries may be stale")
            }
        }
        match delivery.header.topic {
            Topic::Kv => match decode_payload::<KvEventBatch>(&delivery.payload) {
                Ok(batch) => {
                    let _ = member.kv.send(batch);
                }
                Err(error) => tracing::warn!("worker {publisher:016x} sent unreadable KV events: {error}"),
            },
            Topic::Load => match decode_payload::<LoadMetrics>(&delivery.payload) {
                Ok(load) => *member.load.lock().unwrap_or_else(|p| p.into_inner()) = load,
                Err(error) => tracing::warn!("worker {publisher:016x} sent an unreadable load report: {error}"),
            },
        }
    }
}

/// Why a worker cannot join a router serving `model`, if it cannot.
fn incompatibility(model: &Model, block_size: usize, instance: &Instance) -> Option<String> {
    if instance.model != model.card.name {
        return Some(format!("serves model {:?}, this router {:?}", instance.model, model.card.name));
    }
    if instance.card.tokenizer_hash != model.tokenizer_hash {
        return Some("has another tokenizer than the router's other workers".into());
    }
    if instance.card.block_size as usize != block_size {
        return Some(format!("uses KV blocks of {} tokens, the router {block_size}", instance.card.block_size));
    }
    None
}
