//! The encode role: an engine that runs only a vision model's tower and projector. A request's images become
//! the language model's input embeddings, held in the transfer agent's memory for the worker that prefills
//! the prompt; that worker reads them (`handoff`) instead of encoding the images itself.
//!
//! Embeddings sit in one registered region of fixed slots, an image each. A slot outlives its read, so a
//! repeated image is neither encoded again nor given another slot: the next request is pointed at the same
//! one. A slot is pinned while a lease on it is unread; a read ends its lease by its notification, and a
//! lease nobody reads expires (a reader that died). With every slot pinned, a request with new images is
//! refused, and the router has the prefill worker encode them.
//!
//! Requests that arrive while the tower is busy wait in one queue, and go through it together: one pass for
//! all their images (up to `MAX_BATCH_IMAGES`), as a GPU would want them and as the CPU's products run
//! closer to their peak with more rows.
use crate::core::engine::native::ImageEncoder;
use crate::core::engine::{Engine, EngineError, ResponseStream};
use crate::core::protocol::{
    EngineOutput, FinishReason, HeldEmbeddings, KvEventBatch, LoadMetrics, MediaInput, PreprocessedRequest, WorkerId,
};
use crate::core::transfer::{Agent, AgentSettings, Notification, Region, RegionId, TransferError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};

/// Memory for held embeddings unless set otherwise: 54 images of LLaVA-1.5-7B (576 × 4096 f32s each).
pub const DEFAULT_CACHE_BYTES: u64 = 512 << 20;
/// How long an image's embeddings are kept for their reader unless set otherwise. The router sends the
/// request on as soon as they are ready, so this only has to outlast a slow read.
pub const LEASE: Duration = Duration::from_secs(60);
/// How long a request may wait for its turn through the tower and be encoded before its slots are given up.
const ENCODE_ALLOWANCE: Duration = Duration::from_secs(600);
/// Images one pass through the tower takes at most, from however many queued requests.
pub const MAX_BATCH_IMAGES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "--encode-cache-mib {mib} holds no image's embeddings ({image_bytes} bytes each for this model); give it more"
    )]
    NoRoom { mib: u64, image_bytes: u64 },
    #[error("cannot start the transfer agent: {0}")]
    Transfer(#[from] TransferError),
}

#[derive(Debug, Clone)]
pub struct EncodeSettings {
    /// Memory for held and cached embeddings.
    pub cache_bytes: u64,
    /// How long embeddings are kept for a reader that has not read them.
    pub lease: Duration,
}

impl Default for EncodeSettings {
    fn default() -> Self {
        Self { cache_bytes: DEFAULT_CACHE_BYTES, lease: LEASE }
    }
}

pub struct EncodeEngine {
    worker_id: WorkerId,
    shared: Arc<Shared>,
    /// Never sends: an encode worker has no KV cache, but the planes subscribe to every engine's events.
    kv_events: broadcast::Sender<KvEventBatch>,
    /// Ending leases, and passing queued images through the tower.
    _tasks: [crate::core::AbortOnDrop; 2],
}

struct Shared {
    encoder: Arc<dyn ImageEncoder>,
    agent: Agent,
    region: Arc<Region>,
    region_id: RegionId,
    slots: Mutex<Slots>,
    /// Requests waiting for the tower; one pass at a time takes what is queued (the backend already spreads
    /// one pass over every thread).
    queue: mpsc::UnboundedSender<Job>,
    lease: Duration,
    running: AtomicU32,
    waiting: AtomicU32,
    encoded: AtomicU64,
    /// Passes through the tower so far.
    passes: AtomicU64,
}

/// One request's images to encode: each with its slot, and where to say how it went.
struct Job {
    images: Vec<(usize, bytes::Bytes)>,
    /// The request's outputs: closed once its client went away, and then it is not encoded.
    client: mpsc::UnboundedSender<EngineOutput>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl EncodeEngine {
    /// An encode worker computing with `encoder`, its transfer agent started with `agent`; must run inside a
    /// tokio runtime.
    pub fn start(
        worker_id: WorkerId,
        encoder: Arc<dyn ImageEncoder>,
        agent: AgentSettings,
        settings: &EncodeSettings,
    ) -> Result<Self, EncodeError> {
        let image_bytes = encoder.image_len() as u64 * 4;
        let count = settings.cache_bytes / image_bytes.max(1);
        if count == 0 || image_bytes == 0 {
            return Err(EncodeError::NoRoom { mib: settings.cache_bytes >> 20, image_bytes });
        }
        let (agent, notifications) = Agent::start(worker_id, agent)?;
        let (region_id, region) = agent.register(Region::new(count * image_bytes).map_err(TransferError::from)?);
        let (queue, jobs) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            encoder,
            agent,
            region,
            region_id,
            slots: Mutex::new(Slots::new(count as usize, image_bytes)),
            queue,
            lease: settings.lease,
            running: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            encoded: AtomicU64::new(0),
            passes: AtomicU64::new(0),
        });
        let tasks =
            [tokio::spawn(end_leases(shared.clone(), notifications)), tokio::spawn(passes(shared.clone(), jobs))];
        Ok(Self { worker_id, shared, kv_events: broadcast::channel(1).0, _tasks: tasks.map(crate::core::AbortOnDrop) })
    }

    /// Images encoded so far (a repeated image that was still held counts once).
    pub fn images_encoded(&self) -> u64 {
        self.shared.encoded.load(Ordering::Relaxed)
    }

    /// Passes through the tower so far (requests queued together share one).
    pub fn passes(&self) -> u64 {
        self.shared.passes.load(Ordering::Relaxed)
    }
}

impl Engine for EncodeEngine {
    fn worker_id(&self) -> WorkerId {
        self.worker_id
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        let media = request.media.clone().unwrap_or_default();
        if media.is_empty() {
            return Err(EngineError::InvalidRequest(
                "an encode worker takes the images of a prompt, and this request has none".into(),
            ));
        }
        let shared = &self.shared;
        let (held, missing) = shared.slots().reserve(&media, Instant::now() + ENCODE_ALLOWANCE)?;
        let (outputs, receiver) = mpsc::unbounded_channel();
        tokio::spawn(shared.clone().encode(media, held, missing, outputs));
        Ok(ResponseStream::new(receiver))
    }

    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch> {
        self.kv_events.subscribe()
    }

    fn load(&self) -> LoadMetrics {
        let shared = &self.shared;
        let mut slots = shared.slots();
        // Expired leases count as free here too, or a drain would wait on readers that died.
        slots.expire(Instant::now());
        LoadMetrics {
            requests_running: shared.running.load(Ordering::Relaxed),
            requests_waiting: shared.waiting.load(Ordering::Relaxed),
            kv_active_blocks: slots.pinned() as u64,
            kv_cached_blocks: slots.cached() as u64,
            kv_total_blocks: slots.slots.len() as u64,
            max_running: MAX_BATCH_IMAGES as u32,
            ..Default::default()
        }
    }

    fn device(&self) -> String {
        self.shared.encoder.device()
    }

    fn images(&self) -> Option<crate::core::protocol::ImageStats> {
        Some(crate::core::protocol::ImageStats { encoded: self.images_encoded(), ..Default::default() })
    }

    fn transfer_addr(&self) -> Option<String> {
        Some(self.shared.agent.address())
    }
}

impl Shared {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encodes the images `missing` names into their slots, then answers with where every image is held.
    async fn encode(
        self: Arc<Self>,
        media: Arc<Vec<MediaInput>>,
        held: Vec<(usize, u64)>,
        missing: Vec<(usize, usize)>,
        outputs: mpsc::UnboundedSender<EngineOutput>,
    ) {
        let release = |shared: &Self| {
            let mut slots = shared.slots();
            for &(_, lease) in &held {
                slots.release(lease);
            }
        };
        let encoded = match missing.is_empty() {
            true => Ok(()),
            false => self.clone().encode_missing(&media, &missing, &outputs).await,
        };
        let output = match encoded {
            Ok(()) => {
                let mut slots = self.slots();
                let until = Instant::now() + self.lease;
                missing.iter().for_each(|&(slot, image)| slots.filled(slot, media[image].hash));
                let encoded = held
                    .iter()
                    .map(|&(slot, lease)| {
                        slots.renew(lease, until);
                        let offset = slot as u64 * slots.slot_bytes;
                        HeldEmbeddings {
                            agent: self.agent.address(),
                            lease,
                            region: self.region_id,
                            offset,
                            len: slots.slot_bytes,
                            checksum: slots.slots[slot].checksum,
                        }
                    })
                    .collect();
                EngineOutput { finish_reason: Some(FinishReason::Length), encoded, ..Default::default() }
            }
            Err(why) => {
                let mut slots = self.slots();
                missing.iter().for_each(|&(slot, _)| slots.forget(slot));
                EngineOutput { finish_reason: Some(FinishReason::Error(why)), ..Default::default() }
            }
        };
        let failed = output.encoded.is_empty();
        if outputs.send(output).is_err() || failed {
            release(&self);
        }
    }

    /// Queues the missing images for the tower and waits for their pass.
    async fn encode_missing(
        self: Arc<Self>,
        media: &Arc<Vec<MediaInput>>,
        missing: &[(usize, usize)],
        outputs: &mpsc::UnboundedSender<EngineOutput>,
    ) -> Result<(), String> {
        let images = missing.iter().map(|&(slot, image)| (slot, media[image].data.clone())).collect();
        let (done, finished) = tokio::sync::oneshot::channel();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let queued = self.queue.send(Job { images, client: outputs.clone(), done });
        if queued.is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err("the encoder stopped".into());
        }
        finished.await.map_err(|_| "the encoder stopped".to_string())?
    }

    /// One pass through the tower for every image of `jobs`, each written into its slot. A pass that fails
    /// (an image that does not decode) is tried again a request at a time, so only that request fails.
    fn pass(&self, jobs: &[Job]) -> Vec<Result<(), String>> {
        let run = |jobs: &[Job]| -> Result<(), String> {
            let images: Vec<&(usize, bytes::Bytes)> = jobs.iter().flat_map(|job| &job.images).collect();
            let files: Vec<&[u8]> = images.iter().map(|(_, data)| data.as_ref()).collect();
            self.passes.fetch_add(1, Ordering::Relaxed);
            let values = self.encoder.encode_files(&files)?;
            let image_len = self.encoder.image_len();
            if values.len() != image_len * images.len() {
                return Err(format!("the tower gave {} values for {} images", values.len(), images.len()));
            }
            for (&&(slot, _), image) in images.iter().zip(values.chunks_exact(image_len)) {
                let checksum = self.write(slot, image)?;
                self.slots().slots[slot].checksum = checksum;
            }
            self.encoded.fetch_add(images.len() as u64, Ordering::Relaxed);
            Ok(())
        };
        match run(jobs) {
            Ok(()) => jobs.iter().map(|_| Ok(())).collect(),
            Err(why) if jobs.len() == 1 => vec![Err(why)],
            Err(_) => jobs.iter().map(|job| run(std::slice::from_ref(job))).collect(),
        }
    }

    /// Writes one image's embeddings into its slot as little-endian f32s; their checksum.
    fn write(&self, slot: usize, image: &[f32]) -> Result<u64, String> {
        let slot_bytes = self.slots().slot_bytes;
        // SAFETY: the slot is reserved for this request and not yet filled, so no lease names it and no
        // reader reads it; nothing else writes it.
        let bytes = unsafe { self.region.bytes_mut(slot as u64 * slot_bytes, slot_bytes) };
        let bytes = bytes.ok_or_else(|| format!("slot {slot} is outside the embeddings region"))?;
        bytes.chunks_exact_mut(4).zip(image).for_each(|(out, value)| out.copy_from_slice(&value.to_le_bytes()));
        Ok(xxhash_rust::xxh3::xxh3_64(bytes))
    }
}

/// Takes the queued requests a pass at a time: whatever waits when the tower comes free goes through
/// together, up to `MAX_BATCH_IMAGES` images (a request is never split).
async fn passes(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        let mut images = batch[0].images.len();
        while images < MAX_BATCH_IMAGES {
            let Ok(job) = jobs.try_recv() else { break };
            images += job.images.len();
            batch.push(job);
        }
        shared.waiting.fetch_sub(batch.len() as u32, Ordering::Relaxed);
        let (cancelled, batch): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|job| job.client.is_closed());
        for job in cancelled {
            let _ = job.done.send(Err("the request was cancelled".into()));
        }
        if batch.is_empty() {
            continue;
        }
        let running = batch.len() as u32;
        shared.running.fetch_add(running, Ordering::Relaxed);
        let pass = shared.clone();
        let done = tokio::task::spawn_blocking(move || {
            let results = pass.pass(&batch);
            (batch, results)
        })
        .await;
        shared.running.fetch_sub(running, Ordering::Relaxed);
        // A pass that panicked took its jobs' senders with it: their requests answer with an error.
        if let Ok((batch, results)) = done {
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.done.send(result);
            }
        }
    }
}

/// Ends the lease each read's notification names.
async fn end_leases(shared: Arc<Shared>, mut notifications: mpsc::Receiver<Notification>) {
    while let Some(notification) = notifications.recv().await {
        if let Some(lease) = notification.lease() {
            shared.slots().release(lease);
        }
    }
}

/// Which image each slot holds, and the leases on them.
struct Slots {
    slot_bytes: u64,
    slots: Vec<Slot>,
    /// Filled slots by image hash.
    by_hash: HashMap<u64, usize>,
    /// Unread leases: their slot, and when they expire.
    leases: HashMap<u64, (usize, Instant)>,
    next_lease: u64,
    /// Counts uses, so the least recently used free slot is the one given to a new image.
    clock: u64,
}

#[derive(Default)]
struct Slot {
    /// The image it holds, once filled.
    hash: Option<u64>,
    checksum: u64,
    pins: u32,
    used: u64,
}

impl Slots {
    fn new(count: usize, slot_bytes: u64) -> Self {
        Self {
            slot_bytes,
            slots: (0..count).map(|_| Slot::default()).collect(),
            by_hash: HashMap::new(),
            leases: HashMap::new(),
            // Leases are told apart from a guess: a stale notification must not end a live lease.
            next_lease: rand::random(),
            clock: 0,
        }
    }

    /// Pins a slot for every image of a request: the one already holding it, or a free one to encode it
    /// into. Returns each image's `(slot, lease)`, in order, and the `(slot, image)` pairs to encode (an
    /// image repeated within the request is encoded once). Refused, with nothing pinned, when there are not
    /// enough free slots.
    #[allow(clippy::type_complexity)]
    fn reserve(
        &mut self,
        media: &[MediaInput],
        until: Instant,
    ) -> Result<(Vec<(usize, u64)>, Vec<(usize, usize)>), EngineError> {
        self.expire(Instant::now());
        let mut held = Vec::with_capacity(media.len());
        let mut missing: Vec<(usize, usize)> = Vec::new();
        for (image, m) in media.iter().enumerate() {
            let known = self.by_hash.get(&m.hash).copied();
            let pending = missing.iter().find(|&&(_, other)| media[other].hash == m.hash).map(|&(slot, _)| slot);
            let slot = match known.or(pending) {
                Some(slot) => slot,
                None => match self.free_slot() {
                    Some(slot) => {
                        missing.push((slot, image));
                        slot
                    }
                    None => {
                        let busy = self.slots.len();
                        for &(_, lease) in &held {
                            self.release(lease);
                        }
                        missing.iter().for_each(|&(slot, _)| self.forget(slot));
                        return Err(EngineError::InvalidRequest(format!(
                            "all {busy} embedding slots of this encode worker are held for readers; the prefill \
                             worker encodes these images itself (or give encode workers more --encode-cache-mib)"
                        )));
                    }
                },
            };
            held.push((slot, self.pin(slot, until)));
        }
        Ok((held, missing))
    }

    /// The least recently used unpinned slot, emptied for a new image.
    fn free_slot(&mut self) -> Option<usize> {
        let slot = (0..self.slots.len()).filter(|&s| self.slots[s].pins == 0).min_by_key(|&s| self.slots[s].used)?;
        self.forget(slot);
        Some(slot)
    }

    fn pin(&mut self, slot: usize, until: Instant) -> u64 {
        self.clock += 1;
        self.next_lease = self.next_lease.wrapping_add(1);
        let lease = self.next_lease;
        let entry = &mut self.slots[slot];
        entry.pins += 1;
        entry.used = self.clock;
        self.leases.insert(lease, (slot, until));
        lease
    }

    fn renew(&mut self, lease: u64, until: Instant) {
        if let Some((_, expires)) = self.leases.get_mut(&lease) {
            *expires = until;
        }
    }

    /// Ends a lease; false for one that is not (or no longer) held.
    fn release(&mut self, lease: u64) -> bool {
        let Some((slot, _)) = self.leases.remove(&lease) else { return false };
        let entry = &mut self.slots[slot];
        entry.pins = entry.pins.saturating_sub(1);
        true
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self.leases.iter().filter(|(_, (_, until))| *until <= now).map(|(&l, _)| l).collect();
        for lease in expired {
            self.release(lease);
        }
    }

    /// The slot now holds this image.
    fn filled(&mut self, slot: usize, hash: u64) {
        self.slots[slot].hash = Some(hash);
        self.by_hash.insert(hash, slot);
    }

    /// The slot holds no image (given to another, or its encoding failed).
    fn forget(&mut self, slot: usize) {
        if let Some(hash) = self.slots[slot].hash.take() {
            self.by_hash.remove(&hash);
        }
    }

    fn pinned(&self) -> usize {
        self.slots.iter().filter(|s| s.pins > 0).count()
    }

    /// Filled and free: images a later request finds without encoding.
    fn cached(&self) -> usize {
        self.slots.iter().filter(|s| s.pins == 0 && s.hash.is_some()).count()
    }
}

#[cfg(test)]
mod tests;
