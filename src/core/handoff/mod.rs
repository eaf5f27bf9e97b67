//! Disaggregated serving's KV hand-off between two workers' engines, over the transfer layer.
//!
//! A prefill worker runs a `HandOff::Hold` request: it computes the prompt, streams the first token and keeps
//! the prompt's pages for a lease; its final output names them (`HeldKv`). The router sends the rest of the
//! request to a decode worker as `HandOff::From`: its engine allocates pages, this module reads the prefill
//! worker's pages into them, and the engine decodes from there. The read carries the lease, so the prefill
//! worker frees its pages as soon as they are copied; pages nobody reads are freed when the lease expires.
//!
//! The decode side reads, rather than the prefill side writing, so that pages are allocated only once the
//! decode worker is about to use them and a failure is handled where the request lives (vLLM's NIXL connector
//! reads the same way). A holder that is gone, a read that fails or times out, pages laid out otherwise: the
//! decode engine computes the prompt itself, and the client gets the same tokens, later.
//!
//! The mocker's pages are not memory: its agent registers none, and a read between mockers moves no bytes but
//! takes the time the simulated model's KV would take over the mockers' bandwidth (`SimulatedKv`), then ends
//! the holder's lease with the same notification. Everything else, across processes too, is the same code.
//!
//! The same agent reads what encode workers hold for a request's images (`embeddings`) before the request
//! starts, whatever its KV hand-off.
use crate::core::engine::{ArrivingPages, Engine, EngineError, KvPages, ResponseStream, SimulatedKv};
use crate::core::protocol::{
    EngineOutput, FinishReason, HandOff, HeldKv, KvEvent, KvEventBatch, KvLayout, KvTransferStats, LoadMetrics,
    PreprocessedRequest, WorkerId,
};
use crate::core::transfer::{Agent, AgentSettings, Descriptor, Direction, Notification, Peer, layered_page};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

mod embeddings;

/// How long a prefill worker keeps a request's pages for the decode worker that should read them, unless
/// told otherwise (`with_lease`). The router sends the decode half as soon as the prefill ends, so this only
/// has to outlast a slow read; it is also how long a decode worker that died before reading costs the pages.
pub const LEASE: Duration = Duration::from_secs(60);
/// How long a decode engine waits for a read before it computes the prompt itself: a connect and a read,
/// each bounded by the transfer timeout, fit in it.
pub const ARRIVAL_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HandOffError {
    #[error(
        "this engine's KV cache cannot be handed to other workers ({0}); prefill workers and --kv-transfer need the \
         native engine on the CPU, or the mocker"
    )]
    NoKvPages(&'static str),
    #[error("cannot start the transfer agent: {0}")]
    Transfer(#[from] crate::core::transfer::TransferError),
}

/// An engine whose requests can hold their KV for a peer or read it from one: the engine, with a transfer
/// agent that offers its pages. Requests without a hand-off go straight to the engine.
pub struct HandOffEngine {
    core: Core,
    notifications: Option<tokio::task::JoinHandle<()>>,
}

/// What a request's hand-off needs, cheap to clone into the task that waits for its images' embeddings.
#[derive(Clone)]
struct Core {
    inner: Arc<dyn Engine>,
    shared: Arc<Shared>,
    lease: Duration,
}

struct Shared {
    agent: Agent,
    /// The engine's pages are simulated: reads take this time and move nothing.
    simulated: Option<SimulatedKv>,
    address: String,
    layout: KvLayout,
    /// Agents read from, by address; a connection that failed is dropped and made again next time.
    peers: tokio::sync::Mutex<HashMap<String, Arc<Peer>>>,
    counts: Counts,
    /// For a model that takes images: where embeddings read from encode workers land.
    landing: Option<embeddings::Landing>,
}

#[derive(Default)]
struct Counts {
    held: AtomicU64,
    read: AtomicU64,
    read_failed: AtomicU64,
    read_bytes: AtomicU64,
    /// Reads of at least `RATED_READ` (timed from the pages' allocation to the holder's notification, the
    /// connection to it already made), which `load` reports as a rate.
    rate: std::sync::Mutex<RecentRate>,
}

/// The rate of the last reads: their bytes over their time, each sum decayed by `RECENT_WEIGHT` per read,
/// so a network that slowed (a congested link, a busier peer) shows within a few dozen reads rather than
/// being averaged into a worker's whole life.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct RecentRate {
    bytes: f64,
    seconds: f64,
}

/// Each read's weight in the rate (about the last 1/0.1 = 10 reads count).
const RECENT_WEIGHT: f64 = 0.1;

impl RecentRate {
    fn record(&mut self, bytes: u64, seconds: f64) {
        self.bytes = (1.0 - RECENT_WEIGHT) * self.bytes + bytes as f64;
        self.seconds = (1.0 - RECENT_WEIGHT) * self.seconds + seconds.max(0.0);
    }

    /// Bytes per second; 0 before any read was timed.
    fn per_second(&self) -> u64 {
        match self.seconds > 0.0 {
            true => (self.bytes / self.seconds).min(u64::MAX as f64) as u64,
            false => 0,
        }
    }
}

/// Reads smaller than this do not count toward the rate a decode worker reports: their time is mostly a
/// round trip (or a first NIXL read's set-up), which says nothing of how long a big prompt's KV takes.
const RATED_READ: u64 = 1 << 20;

impl Drop for HandOffEngine {
    fn drop(&mut self) {
        if let Some(task) = &self.notifications {
            task.abort();
        }
    }
}

impl HandOffEngine {
    /// Starts a transfer agent for `engine`'s pages; must run inside a tokio runtime.
    pub fn start(engine: Arc<dyn Engine>, settings: AgentSettings) -> Result<Self, HandOffError> {
        let memory = (engine.kv_pages().map(|pages| pages.memory()))
            .filter(|memory| !memory.regions.is_empty() || memory.simulated.is_some());
        let memory = memory.ok_or(HandOffError::NoKvPages(
            "an external engine's pages are its own; the CUDA backend's device pages have no transfer seam yet",
        ))?;
        let (agent, notifications) = Agent::start(engine.worker_id(), settings)?;
        let mut first_region = None;
        for region in &memory.regions {
            let (id, _) = agent.register(region.clone());
            first_region.get_or_insert(id);
        }
        let layout = KvLayout {
            block_size: memory.block_size,
            page_bytes: memory.page_bytes,
            first_region: first_region.unwrap_or(0),
            regions: memory.regions.len() as u32,
        };
        let notifications = Some(tokio::spawn(end_leases(engine.clone(), notifications)));
        let address = agent.address();
        let landing = match engine.embeddings() {
            Some(cache) => Some(embeddings::Landing::register(&agent, cache)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            agent,
            simulated: memory.simulated,
            address,
            layout,
            peers: Default::default(),
            counts: Counts::default(),
            landing,
        });
        Ok(Self { core: Core { inner: engine, shared, lease: LEASE }, notifications })
    }

    /// Held pages are kept for a reader this long at most.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.core.lease = lease;
        self
    }

    /// Where peers reach this engine's agent (`tcp://host:port`).
    pub fn address(&self) -> String {
        self.core.shared.address.clone()
    }

    pub fn layout(&self) -> KvLayout {
        self.core.shared.layout
    }
}

impl Core {
    /// Starts the request's hand-off, once the embeddings encode workers hold for its images are read.
    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        if request.media().iter().all(|m| m.encoded.is_none()) {
            return self.start(request);
        }
        let (outputs, receiver) = mpsc::unbounded_channel();
        let core = self.clone();
        tokio::spawn(async move {
            let request = core.shared.take_embeddings(request).await;
            let mut stream = match core.start(request) {
                Ok(stream) => stream,
                Err(error) => {
                    let finish_reason = Some(FinishReason::Error(error.to_string()));
                    let _ = outputs.send(EngineOutput { finish_reason, ..Default::default() });
                    return;
                }
            };
            loop {
                tokio::select! {
                    output = stream.next() => match output {
                        Some(output) => if outputs.send(output).is_err() { return },
                        None => return,
                    },
                    // The router went away: dropping the stream cancels the request.
                    _ = outputs.closed() => return,
                }
            }
        });
        Ok(ResponseStream::new(receiver))
    }

    fn start(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        match request.hand_off.clone() {
            HandOff::None => self.inner.submit(request),
            HandOff::Hold => self.hold(request),
            HandOff::From(held) => self.receive(request, *held),
        }
    }

    fn pages(&self) -> Result<&dyn KvPages, EngineError> {
        // `start` checked that the engine has them; an engine does not lose them.
        self.inner.kv_pages().ok_or(EngineError::Stopped)
    }

    /// Prefill for a peer: the outputs pass through, the last one naming the held pages.
    fn hold(&self, mut request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        request.hand_off = HandOff::None;
        let tokens = request.token_ids.len() as u32;
        let (id, mut stream) = self.pages()?.submit_holding(request, self.lease)?;
        let (outputs, receiver) = mpsc::unbounded_channel();
        let (engine, shared) = (self.inner.clone(), self.shared.clone());
        tokio::spawn(async move {
            let release = || {
                if let Some(pages) = engine.kv_pages() {
                    let _ = pages.release_lease(id);
                }
            };
            loop {
                let mut output: EngineOutput = tokio::select! {
                    output = stream.next() => match output {
                        Some(output) => output,
                        None => return,
                    },
                    // The router went away: dropping the stream cancels the prefill.
                    _ = outputs.closed() => return release(),
                };
                let finished = output.finish_reason.clone();
                if finished == Some(FinishReason::Length) {
                    let layout = shared.layout;
                    output.held = output.held.take().map(|held| HeldKv { tokens, layout, ..held });
                    if output.held.is_some() {
                        shared.counts.held.fetch_add(1, Ordering::Relaxed);
                    }
                } else if finished.is_some() {
                    // Ended for good (a stop token, an error): nobody will read it.
                    output.held = None;
                    release();
                }
                if outputs.send(output).is_err() {
                    return release();
                }
                if finished.is_some() {
                    return;
                }
            }
        });
        Ok(ResponseStream::new(receiver))
    }

    /// Decode after a peer's prefill: read its pages into ours, then generate.
    fn receive(&self, mut request: PreprocessedRequest, held: HeldKv) -> Result<ResponseStream, EngineError> {
        request.hand_off = HandOff::None;
        let from_peer = held.tokens as usize;
        let fits = from_peer < request.token_ids.len()
            && held.pages.len() >= from_peer.div_ceil(self.shared.layout.block_size.max(1) as usize);
        if !fits {
            return Err(EngineError::InvalidRequest(format!(
                "the KV handed over covers {from_peer} tokens in {} pages, which does not fit a request of {} tokens",
                held.pages.len(),
                request.token_ids.len()
            )));
        }
        if let Some(why) = held.layout.mismatch(&self.shared.layout) {
            self.shared.counts.read_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "KV from the agent at {} cannot be used here ({why}); computing the prompt here",
                held.agent
            );
            return self.inner.submit(request);
        }
        let pages = self.pages()?;
        let (id, target, stream) = pages.submit_arriving(request, from_peer, ARRIVAL_WAIT)?;
        let (engine, shared) = (self.inner.clone(), self.shared.clone());
        tokio::spawn(async move {
            let read = shared.read(&held, target).await;
            let counts = &shared.counts;
            match &read {
                Ok(bytes) => {
                    counts.read.fetch_add(1, Ordering::Relaxed);
                    counts.read_bytes.fetch_add(*bytes, Ordering::Relaxed);
                }
                Err(_) => drop(counts.read_failed.fetch_add(1, Ordering::Relaxed)),
            }
            if let Err(why) = &read {
                tracing::warn!(
                    "could not read the KV held by the agent at {}: {why}; computing the prompt here",
                    held.agent
                );
            }
            if let Some(pages) = engine.kv_pages() {
                let _ = pages.arrived(id, read.is_ok());
            }
        });
        Ok(stream)
    }
}

impl Shared {
    /// Copies the held pages into the pages the engine allocated, telling the holder (by the lease) once done.
    /// Bytes moved, or why nothing was.
    async fn read(&self, held: &HeldKv, target: ArrivingPages) -> Result<u64, String> {
        let target = target.await.map_err(|e| e.to_string())?;
        self.peer(&held.agent).await?;
        let started = std::time::Instant::now();
        let read = self.read_pages(held, target).await;
        if let Ok(bytes) = read
            && bytes >= RATED_READ
        {
            let mut rate = self.counts.rate.lock().unwrap_or_else(|p| p.into_inner());
            rate.record(bytes, started.elapsed().as_secs_f64());
        }
        read
    }

    async fn read_pages(
        &self,
        held: &HeldKv,
        target: crate::core::engine::scheduler::ArrivalPages,
    ) -> Result<u64, String> {
        let block_size = self.layout.block_size.max(1) as usize;
        let pages = (held.tokens as usize).div_ceil(block_size);
        // Blocks this worker had cached already are not read.
        let (from, to) = (target.cached.min(pages), pages.min(target.pages.len()));
        if let Some(kv) = self.simulated {
            let tokens = (held.tokens as usize).min(to * block_size).saturating_sub(from * block_size) as u64;
            tokio::time::sleep(kv.transfer_time(tokens)).await;
            return self.transfer(&held.agent, &[], &[], held.lease).await.map(|_| kv.bytes(tokens));
        }
        let descriptors = |layout: &KvLayout, pages: &[u32]| -> Vec<Descriptor> {
            pages
                .iter()
                .flat_map(|&page| layered_page(layout.first_region, layout.regions, page.into(), layout.page_bytes))
                .collect()
        };
        let local = descriptors(&self.layout, &target.pages[from..to]);
        let remote = descriptors(&held.layout, &held.pages[from..to]);
        self.transfer(&held.agent, &local, &remote, held.lease).await
    }

    /// Reads `remote` ranges of the agent at `address` into `local` ones and ends `lease` there (with nothing
    /// to move, the notification still goes: it is how a holder learns its pages are not needed). Bytes moved.
    async fn transfer(
        &self,
        address: &str,
        local: &[Descriptor],
        remote: &[Descriptor],
        lease: u64,
    ) -> Result<u64, String> {
        let peer = self.peer(address).await?;
        let lease = lease.to_le_bytes();
        match self.agent.transfer(&peer, Direction::Read, local, remote, Some(&lease)).await {
            Ok(stats) => Ok(stats.bytes),
            Err(error) => {
                self.peers.lock().await.remove(address);
                Err(error.to_string())
            }
        }
    }

    async fn peer(&self, address: &str) -> Result<Arc<Peer>, String> {
        if let Some(peer) = self.peers.lock().await.get(address) {
            return Ok(peer.clone());
        }
        let peer = Arc::new(self.agent.connect(address).await.map_err(|e| e.to_string())?);
        self.peers.lock().await.insert(address.to_string(), peer.clone());
        Ok(peer)
    }
}

/// Frees the pages a peer has read: its read's notification names the lease.
async fn end_leases(engine: Arc<dyn Engine>, mut notifications: mpsc::Receiver<Notification>) {
    while let Some(notification) = notifications.recv().await {
        let Some(lease) = notification.lease() else { continue };
        if let Some(pages) = engine.kv_pages() {
            let _ = pages.release_lease(lease);
        }
    }
}

impl Engine for HandOffEngine {
    fn worker_id(&self) -> WorkerId {
        self.core.inner.worker_id()
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        self.core.submit(request)
    }

    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch> {
        self.core.inner.subscribe_kv_events()
    }

    fn load(&self) -> LoadMetrics {
        let shared = &self.core.shared;
        let layout = shared.layout;
        let kv_bytes_per_token = match shared.simulated {
            Some(kv) => kv.bytes_per_token,
            None => layout.page_bytes * layout.regions as u64 / layout.block_size.max(1) as u64,
        };
        let kv_read_bytes_per_s = shared.counts.rate.lock().unwrap_or_else(|p| p.into_inner()).per_second();
        LoadMetrics { kv_bytes_per_token, kv_read_bytes_per_s, ..self.core.inner.load() }
    }

    fn device(&self) -> String {
        self.core.inner.device()
    }

    fn adapters(&self) -> Vec<String> {
        self.core.inner.adapters()
    }

    fn resend_kv_state(&self) -> bool {
        self.core.inner.resend_kv_state()
    }

    fn kv_snapshot(&self) -> Option<Vec<KvEvent>> {
        self.core.inner.kv_snapshot()
    }

    fn kv_pages(&self) -> Option<&dyn KvPages> {
        self.core.inner.kv_pages()
    }

    fn embeddings(&self) -> Option<Arc<crate::core::multimodal::EmbeddingCache>> {
        self.core.inner.embeddings()
    }

    fn transfer_addr(&self) -> Option<String> {
        Some(self.address())
    }

    fn kv_transfers(&self) -> Option<KvTransferStats> {
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counts = &self.core.shared.counts;
        Some(KvTransferStats {
            held: count(&counts.held),
            read: count(&counts.read),
            read_failed: count(&counts.read_failed),
            read_bytes: count(&counts.read_bytes),
        })
    }

    fn profile(&self) -> Option<std::sync::Arc<crate::core::protocol::profile::Profile>> {
        self.core.inner.profile()
    }

    fn is_alive(&self) -> bool {
        self.core.inner.is_alive()
    }
}

#[cfg(test)]
mod tests;
