//! A worker in another process, as an `Engine`: requests go over its request-plane connection, its load
//! arrives from the event plane (fed by the cluster's subscriber). Its KV events do not pass through it: the
//! cluster applies them to the router's index where it decodes them.
use crate::core::engine::{Engine, EngineError, ResponseStream, check_adapter, check_fits};
use crate::core::plane::request::WorkerClient;
use crate::core::protocol::discovery::Instance;
use crate::core::protocol::profile::Profile;
use crate::core::protocol::{KvEventBatch, LoadMetrics, PreprocessedRequest, WorkerId};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

pub struct RemoteEngine {
    instance: Instance,
    client: Arc<WorkerClient>,
    load: Arc<Mutex<LoadMetrics>>,
    /// Asked of the worker once it joined (latency routing only).
    profile: Option<Arc<Profile>>,
}

impl RemoteEngine {
    pub fn new(instance: Instance, client: Arc<WorkerClient>) -> Self {
        let load = LoadMetrics { kv_total_blocks: instance.card.kv_blocks, ..LoadMetrics::default() };
        Self { instance, client, load: Arc::new(Mutex::new(load)), profile: None }
    }

    /// The profile the worker sent (`WorkerClient::profile`).
    pub fn with_profile(mut self, profile: Option<Profile>) -> Self {
        self.profile = profile.map(Arc::new);
        self
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Where the event plane puts this worker's load reports.
    pub fn load_cell(&self) -> Arc<Mutex<LoadMetrics>> {
        self.load.clone()
    }
}

impl Engine for RemoteEngine {
    fn worker_id(&self) -> WorkerId {
        self.instance.id
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::Stopped);
        }
        // Checked here as the worker would, so the client gets the same 400 as from `dynamo run` rather than
        // an error inside a stream that has already begun.
        let card = &self.instance.card;
        // No KV capacity in the record is one the worker does not know (an external engine that does not say
        // it): the context is the limit, and the worker checks the engine's own.
        let kv_tokens = match card.kv_blocks {
            0 => usize::MAX,
            blocks => usize::try_from(blocks.saturating_mul(u64::from(card.block_size))).unwrap_or(usize::MAX),
        };
        check_fits(&request, kv_tokens.min(card.context_length as usize))?;
        check_adapter(&request, || self.client.adapters())?;
        Ok(self.client.submit(request))
    }

    /// Closed at once: this worker's events reach the index from the cluster (`Router::apply_kv_events`).
    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch> {
        broadcast::channel(1).1
    }

    fn load(&self) -> LoadMetrics {
        *self.load.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn profile(&self) -> Option<Arc<Profile>> {
        self.profile.clone()
    }

    fn transfer_addr(&self) -> Option<String> {
        self.instance.transfer_endpoint_from(&self.instance.request_addr)
    }

    fn http_addr(&self) -> Option<String> {
        self.instance.http_endpoint_from(&self.instance.request_addr)
    }

    /// As its last heartbeat answer named them (its engine may load adapters while it serves).
    fn adapters(&self) -> Vec<String> {
        self.client.adapters()
    }

    /// Answering, and its engine too (a worker whose external engine is down says so in its load).
    fn is_alive(&self) -> bool {
        self.client.is_alive() && !self.load().engine_down
    }
}
