//! A member that is not a worker (a planner, a router): it registers in discovery under its role, answers
//! pings with its record on a request socket that serves no requests, and publishes what it has to say on its
//! event socket (msgpack like every event-plane payload, sealed with the cluster key when there is one), for
//! `dynamo top` and for whoever else subscribes.
use crate::core::discovery::{Discovery, Registration};
use crate::core::engine::{Engine, EngineError, ResponseStream};
use crate::core::plane::request::{RequestServer, Served};
use crate::core::plane::{Context, EventPublisher, HIGH_WATER_MARK};
use crate::core::protocol::discovery::{Instance, ModelCardSummary, Role, tcp_endpoint};
use crate::core::protocol::plane::Payload;
use crate::core::protocol::{KvEventBatch, LoadMetrics, PreprocessedRequest, WorkerId};
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
    /// Binds both sockets on `host` (free ports) and registers as `role`; must run inside a tokio runtime.
    pub fn start(
        discovery: &dyn Discovery,
        namespace: &str,
        role: Role,
        host: IpAddr,
        key: Option<&crate::core::trust::ClusterKey>,
    ) -> Result<Self, String> {
        let what = role.name();
        let id = rand::random::<u64>();
        let context = Context::with_key(key);
        let publisher = EventPublisher::bind(&context, &tcp_endpoint(host, 0), id, HIGH_WATER_MARK)
            .map_err(|error| format!("cannot open the {what}'s event socket on {host}: {error}"))?;
        let instance = Instance {
            id,
            role,
            model: String::new(),
            namespace: namespace.to_string(),
            request_addr: String::new(),
            event_addr: publisher.endpoint().to_string(),
            transfer_addr: None,
            card: ModelCardSummary { block_size: 0, context_length: 0, kv_blocks: 0, tokenizer_hash: 0 },
            device: String::new(),
            http_addr: None,
            adapters: Vec::new(),
        };
        let served = Served {
            engine: Arc::new(NoEngine(id)),
            instance: instance.clone(),
            model_files: Vec::new(),
            max_in_flight: 1,
            kv_published: Arc::new(AtomicU64::new(0)),
        };
        let server = RequestServer::bind(&context, &tcp_endpoint(host, 0), served)
            .map_err(|error| format!("cannot open the {what}'s request socket on {host}: {error}"))?;
        let instance = Instance { request_addr: server.endpoint().to_string(), ..instance };
        let registration =
            discovery.register(&instance).map_err(|error| format!("the {what} cannot register: {error}"))?;
        Ok(Self { publisher, _registration: registration, _server: server, _context: context })
    }

    pub fn publish<T: Payload>(&mut self, value: &T) {
        if let Err(error) = self.publisher.publish(value) {
            tracing::warn!("could not publish on the event plane: {error}");
        }
    }
}

/// What a member's request socket serves: nothing.
struct NoEngine(WorkerId);

impl Engine for NoEngine {
    fn worker_id(&self) -> WorkerId {
        self.0
    }

    fn submit(&self, _request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        Err(EngineError::InvalidRequest("this member is not a worker; it serves no requests".into()))
    }

    fn subscribe_kv_events(&self) -> tokio::sync::broadcast::Receiver<KvEventBatch> {
        tokio::sync::broadcast::channel(1).1
    }

    fn load(&self) -> LoadMetrics {
        LoadMetrics::default()
    }
}
