//! A planner's place in the cluster: a member of role `planner` in discovery, answering pings with its
//! record on a request socket that serves no requests, and publishing every plan on its event socket
//! (`plan` topic, msgpack like every event-plane payload, sealed with the cluster key when there is one):
//! `dynamo top` shows it, and an orchestrator that carries plans out itself subscribes to it.
use crate::core::discovery::{Discovery, Registration};
use crate::core::engine::{Engine, EngineError, ResponseStream};
use crate::core::plane::request::{RequestServer, Served};
use crate::core::plane::{Context, EventPublisher, HIGH_WATER_MARK};
use crate::core::protocol::discovery::{Instance, ModelCardSummary, Role, tcp_endpoint};
use crate::core::protocol::{KvEventBatch, LoadMetrics, Plan, PreprocessedRequest, WorkerId};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub struct Announcer {
    publisher: EventPublisher,
    // The record goes before the sockets close.
    _registration: Registration,
    _server: RequestServer,
    _context: Context,
}

impl Announcer {
    /// Binds both sockets on `host` (free ports) and registers; must run inside a tokio runtime.
    pub fn start(
        discovery: &dyn Discovery,
        namespace: &str,
        host: IpAddr,
        key: Option<&crate::core::trust::ClusterKey>,
    ) -> Result<Self, String> {
        let id = rand::random::<u64>();
        let context = Context::with_key(key);
        let publisher = EventPublisher::bind(&context, &tcp_endpoint(host, 0), id, HIGH_WATER_MARK)
            .map_err(|error| format!("cannot open the planner's event socket on {host}: {error}"))?;
        let instance = Instance {
            id,
            role: Role::Planner,
            model: String::new(),
            namespace: namespace.to_string(),
            request_addr: String::new(),
            event_addr: publisher.endpoint().to_string(),
            transfer_addr: None,
            card: ModelCardSummary { block_size: 0, context_length: 0, kv_blocks: 0, tokenizer_hash: 0 },
        };
        let served = Served {
            engine: Arc::new(NoEngine(id)),
            instance: instance.clone(),
            model_files: Vec::new(),
            max_in_flight: 1,
            kv_published: Arc::new(AtomicU64::new(0)),
        };
        let server = RequestServer::bind(&context, &tcp_endpoint(host, 0), served)
            .map_err(|error| format!("cannot open the planner's request socket on {host}: {error}"))?;
        let instance = Instance { request_addr: server.endpoint().to_string(), ..instance };
        let registration = discovery.register(&instance).map_err(|error| format!("cannot register: {error}"))?;
        Ok(Self { publisher, _registration: registration, _server: server, _context: context })
    }

    pub fn publish(&mut self, plan: &Plan) {
        if let Err(error) = self.publisher.publish(plan) {
            tracing::warn!("planner: could not publish its plan: {error}");
        }
    }
}

/// What a planner's request socket serves: nothing.
struct NoEngine(WorkerId);

impl Engine for NoEngine {
    fn worker_id(&self) -> WorkerId {
        self.0
    }

    fn submit(&self, _request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        Err(EngineError::InvalidRequest("this is a planner; it serves no requests".into()))
    }

    fn subscribe_kv_events(&self) -> tokio::sync::broadcast::Receiver<KvEventBatch> {
        tokio::sync::broadcast::channel(1).1
    }

    fn load(&self) -> LoadMetrics {
        LoadMetrics::default()
    }
}
