//! A worker in another process, as an `Engine`: requests go over its request-plane connection, KV events
//! and load arrive from the event plane (fed by the cluster's subscriber).
use crate::core::engine::{Engine, EngineError, ResponseStream};
use crate::core::plane::request::WorkerClient;
use crate::core::protocol::discovery::Instance;
use crate::core::protocol::{KvEventBatch, LoadMetrics, PreprocessedRequest, WorkerId};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc};

const EVENT_BUFFER: usize = 4096;

pub struct RemoteEngine {
    instance: Instance,
    client: Arc<WorkerClient>,
    kv: broadcast::Sender<KvEventBatch>,
    load: Arc<Mutex<LoadMetrics>>,
    /// Where to ask for this worker's state again: the cluster resyncs it from a snapshot.
    resync: mpsc::UnboundedSender<WorkerId>,
}

impl RemoteEngine {
    pub fn new(instance: Instance, client: Arc<WorkerClient>, resync: mpsc::UnboundedSender<WorkerId>) -> Self {
        let load = LoadMetrics { kv_total_blocks: instance.card.kv_blocks, ..LoadMetrics::default() };
        let (kv, _) = broadcast::channel(EVENT_BUFFER);
        Self { instance, client, kv, load: Arc::new(Mutex::new(load)), resync }
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Where the event plane puts this worker's KV events.
    pub fn kv_sender(&self) -> broadcast::Sender<KvEventBatch> {
        self.kv.clone()
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
        if !self.client.is_alive() {
            return Err(EngineError::Stopped);
        }
        Ok(self.client.submit(request))
    }

    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch> {
        self.kv.subscribe()
    }

    fn load(&self) -> LoadMetrics {
        *self.load.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resend_kv_state(&self) -> bool {
        self.resync.send(self.instance.id).is_ok()
    }

    fn is_alive(&self) -> bool {
        self.client.is_alive()
    }
}
