//! The request plane: a worker serves its engine on a ZMQ ROUTER socket (`RequestServer`); a router reaches
//! each worker through a DEALER socket (`WorkerClient`), many requests at once over one connection.
//!
//! Liveness is part of the plane, not an add-on: the client pings every `heartbeat`; the worker's `Hello`
//! answer carries its record. A worker silent for `dead_after`, or whose connection dropped (a crash: seen at
//! the next ping, within a heartbeat), is declared lost: its open streams end without a finish reason (which
//! the router's migration picks up) and the owner is told. The worker, in
//! turn, cancels the requests of a peer that stopped pinging, so a crashed router leaks no KV blocks.
use crate::core::engine::{Engine, EngineError, ResponseStream};
use crate::core::protocol::discovery::Instance;
use crate::core::protocol::profile::Profile;
use crate::core::protocol::request::{
    FromWorker, MAX_FRAME_BYTES, PROTOCOL_VERSION, Refusal, ToWorker, decode, encode,
};
use crate::core::protocol::{EngineOutput, FinishReason, KvEvent, KvEvents, PreprocessedRequest, WorkerStats};
use futures::stream::{AbortHandle, SelectAll};
use futures::{FutureExt, Stream, StreamExt};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{Context, PlaneError, Seals, SocketReader, bound_endpoint};
use crate::core::AbortOnDrop;
use crate::core::trust::{Seen, Unopened};
use std::borrow::Cow;

/// Snapshot blocks per frame: a million-block cache is about 20 MB of msgpack, well past what one frame
/// should carry.
const SNAPSHOT_BLOCKS_PER_FRAME: usize = 1 << 16;

/// Blocks one snapshot may gather: a cache of millions of blocks fits, a worker that never says `last` does
/// not grow its router without bound.
const MAX_SNAPSHOT_ENTRIES: usize = 1 << 24;

/// How often a client pings; a worker cancels the requests of a peer silent for `PEER_TIMEOUT_PINGS` of these.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
const PEER_TIMEOUT_PINGS: u32 = 20;

/// Messages a client queues for a connected worker that is slow to take them. Past it a request is ended at
/// once, which sends it to another worker.
const CLIENT_QUEUE: i32 = 10_000;

/// How soon a client pings again when a ping could not go out (no connection yet): joining waits for this,
/// not for a whole heartbeat.
const RETRY_PING: Duration = Duration::from_millis(20);

/// Messages past `MAX_FRAME_BYTES` cannot be decoded: a peer that sends one is disconnected by libzmq as it
/// announces the size, before anything is buffered.
const MAX_MESSAGE: i64 = MAX_FRAME_BYTES as i64;

/// What a sealed message is bound to besides its bytes: its direction, so that a worker's message cannot be
/// passed off as a router's.
const TO_WORKER: &[u8] = b"dynamo request plane: to a worker";
const TO_ROUTER: &[u8] = b"dynamo request plane: to a router";

/// `body` sealed for `direction` in a keyed cluster, as it is in an open one.
fn sealed(seals: Option<&Seals>, direction: &[u8], body: Vec<u8>) -> Vec<u8> {
    match seals {
        Some(seals) => seals.request.seal(direction, &body),
        None => body,
    }
}

/// The plain bytes of a received body, which `seen` (the receiver's) had not had before.
fn opened<'a>(
    seals: Option<&Seals>,
    direction: &[u8],
    body: &'a [u8],
    seen: &mut Seen,
) -> Result<Cow<'a, [u8]>, Unopened> {
    match seals {
        Some(seals) => seals.request.open(direction, body, seen, 0).map(Cow::Owned),
        None => Ok(Cow::Borrowed(body)),
    }
}

/// A ROUTER socket as a worker serves on, bound to `endpoint`. A ROUTER drops, silently, what does not fit
/// under its high-water mark: with 64 streams of tokens in flight the default 1000 lost outputs. The engine's
/// pace bounds what waits here, so no limit. What is sent to a router that is gone fails (`EHOSTUNREACH`)
/// instead of vanishing, so that its requests can be stopped at once.
pub fn router_socket(context: &Context, endpoint: &str) -> Result<zmq::Socket, PlaneError> {
    let socket = context.socket(zmq::ROUTER)?;
    socket.set_linger(0)?;
    socket.set_router_mandatory(true)?;
    socket.set_sndhwm(0)?;
    socket.set_rcvhwm(0)?;
    socket.set_maxmsgsize(MAX_MESSAGE)?;
    socket.bind(endpoint)?;
    Ok(socket)
}

/// A DEALER socket as a router reaches a worker through, connected to `endpoint`. Messages are queued only
/// while the connection is up (`ZMQ_IMMEDIATE`): a send while it is down fails at once instead of waiting for
/// whoever listens there next, which could be a restarted worker handed requests their router gave up on.
pub fn dealer_socket(context: &Context, endpoint: &str) -> Result<zmq::Socket, PlaneError> {
    let socket = context.socket(zmq::DEALER)?;
    socket.set_linger(0)?;
    socket.set_immediate(true)?;
    socket.set_sndhwm(CLIENT_QUEUE)?;
    socket.set_rcvhwm(0)?;
    socket.set_maxmsgsize(MAX_MESSAGE)?;
    socket.connect(endpoint)?;
    Ok(socket)
}

/// What a worker serves on the request plane.
pub struct Served {
    pub engine: Arc<dyn Engine>,
    /// Answered to every ping; `RequestServer::bind` sets its `request_addr` to the endpoint it bound.
    pub instance: Instance,
    /// The model's text files, for routers that have no copy.
    pub model_files: Vec<(String, String)>,
    /// Requests in flight past which new ones are refused as busy (back-pressure).
    pub max_in_flight: usize,
    /// KV messages published on the event plane so far (the sequence number the next one will carry). Read
    /// before the engine's snapshot is taken, so the snapshot covers at least every message before it; the
    /// messages after it that it covers too replay harmlessly (a suffix of the cache's history, applied
    /// again, leaves the same blocks).
    pub kv_published: Arc<AtomicU64>,
}

/// Counters of what a server took, refused or skipped.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub accepted: AtomicU64,
    pub unreadable: AtomicU64,
    pub refused: AtomicU64,
    pub cancelled: AtomicU64,
}

pub struct RequestServer {
    endpoint: String,
    pub stats: Arc<ServerStats>,
    admission: Arc<Admission>,
    _task: AbortOnDrop,
}

/// Whether a server still takes new requests, and how many it is serving.
#[derive(Debug)]
struct Admission {
    draining: AtomicBool,
    in_flight: watch::Sender<usize>,
}

impl Admission {
    /// Tells waiting drains how many are in flight, when that changed since `last` (the serve loop calls this
    /// every turn, so the lock is taken only on a change).
    fn count(&self, streams: &Streams, last: &mut usize) {
        if streams.len() != *last {
            *last = streams.len();
            self.in_flight.send_replace(*last);
        }
    }
}

/// An engine output tagged with its (router, stream); `None` once the engine's stream has ended.
type Tagged = ((Vec<u8>, u64), Option<EngineOutput>);

/// The requests a server is serving. Their engine streams are polled by the server's one task, so an output
/// goes from the engine to the socket with no task or channel of its own per request.
#[derive(Default)]
struct Streams {
    open: HashMap<(Vec<u8>, u64), Open>,
    outputs: SelectAll<Pin<Box<dyn Stream<Item = Tagged> + Send>>>,
}

struct Open {
    abort: AbortHandle,
    /// Its final output (one with a finish reason) went out.
    finished: bool,
}

impl Streams {
    fn len(&self) -> usize {
        self.open.len()
    }

    fn add(&mut self, peer: Vec<u8>, stream: u64, outputs: ResponseStream) {
        let key = (peer, stream);
        let tag = key.clone();
        let ended = futures::stream::once(std::future::ready(None));
        let tagged = outputs.map(Some).chain(ended).map(move |output| (tag.clone(), output));
        let (tagged, abort) = futures::stream::abortable(tagged);
        self.outputs.push(Box::pin(tagged));
        self.open.insert(key, Open { abort, finished: false });
    }

    /// What goes to the router for one item of a request's engine stream: its output, or, when the stream ended
    /// before a final output (an engine that lost the request: an external server that went away), a refusal
    /// that sends the request, with what it generated so far, to another worker. Nothing for the end of a
    /// finished or cancelled request.
    fn settle(&mut self, peer: &[u8], stream: u64, output: Option<EngineOutput>) -> Option<FromWorker> {
        // The key is built only at a request's end: not once per token.
        match output {
            Some(output) => {
                if output.finish_reason.is_some()
                    && let Some(open) = self.open.get_mut(&(peer.to_vec(), stream))
                {
                    open.finished = true;
                }
                Some(FromWorker::Output { stream, output })
            }
            None => match self.open.remove(&(peer.to_vec(), stream)) {
                Some(Open { finished: false, .. }) => Some(FromWorker::Refused {
                    stream,
                    reason: Refusal::Unavailable("the engine lost the request before it finished".into()),
                }),
                _ => None,
            },
        }
    }

    /// Stops a request: its engine stream is dropped, which cancels it in the engine. False if not open.
    fn cancel(&mut self, key: &(Vec<u8>, u64)) -> bool {
        self.open.remove(key).inspect(|open| open.abort.abort()).is_some()
    }

    /// Stops every request of `peer`; returns how many.
    fn cancel_peer(&mut self, peer: &[u8]) -> u64 {
        let before = self.open.len();
        self.open.retain(|(owner, _), open| {
            let keep = owner != peer;
            if !keep {
                open.abort.abort();
            }
            keep
        });
        (before - self.open.len()) as u64
    }
}

impl ServerStats {
    pub fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            unreadable: self.unreadable.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

impl RequestServer {
    /// Binds `endpoint` (`tcp://host:0` picks a free port; `endpoint()` tells which) and serves until dropped.
    pub fn bind(context: &Context, endpoint: &str, mut served: Served) -> Result<Self, PlaneError> {
        let socket = router_socket(context, endpoint)?;
        let endpoint = bound_endpoint(&socket)?;
        let socket = SocketReader::new(socket)?;
        let stats = Arc::new(ServerStats::default());
        served.instance.request_addr = endpoint.clone();
        let seals = context.seals().cloned();
        let admission = Arc::new(Admission { draining: AtomicBool::new(false), in_flight: watch::Sender::new(0) });
        let task = tokio::spawn(serve(socket, Arc::new(served), stats.clone(), admission.clone(), seals));
        Ok(Self { endpoint, stats, admission, _task: AbortOnDrop(task) })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        *self.admission.in_flight.borrow()
    }

    /// Refuses new requests from now on (as draining: routers send them to another worker) and resolves once
    /// every request in flight has sent its last output.
    pub async fn drain(&self) {
        self.admission.draining.store(true, Ordering::Release);
        let mut in_flight = self.admission.in_flight.subscribe();
        let _ = in_flight.wait_for(|count| *count == 0).await;
    }
}

async fn serve(
    mut socket: SocketReader,
    served: Arc<Served>,
    stats: Arc<ServerStats>,
    admission: Arc<Admission>,
    seals: Option<Arc<Seals>>,
) {
    // One task owns the socket, reading and writing: a socket's reads and writes share libzmq's one
    // edge-triggered descriptor, and a reader on another task could sleep through a wake-up a send took.
    // Snapshot frames, made on a blocking thread, come back through `queue`; every other reply is made here.
    let (replies, mut queue) = mpsc::unbounded_channel::<(Vec<u8>, FromWorker)>();
    let mut streams = Streams::default();
    let mut counted = 0;
    let mut last_ping: HashMap<Vec<u8>, Instant> = HashMap::new();
    let mut sweep = tokio::time::interval(HEARTBEAT * 4);
    let mut seen = Seen::default();
    loop {
        let mut outbox = Outbox::default();
        tokio::select! {
            frames = socket.recv() => {
                let Ok(frames) = frames else { break };
                let mut parts = frames.into_iter();
                let (Some(peer), Some(body)) = (parts.next(), parts.next()) else {
                    stats.unreadable.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let body = match opened(seals.as_deref(), TO_WORKER, &body, &mut seen) {
                    Ok(body) => body,
                    Err(why) => {
                        // A stranger, a router with another key, or a replay: no answer, and it is not a peer.
                        stats.unreadable.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("request plane: dropped {why}");
                        continue;
                    }
                };
                let peer = peer.to_vec();
                last_ping.insert(peer.clone(), Instant::now());
                match decode::<ToWorker>(&body) {
                    Ok(ToWorker::Generate { stream, .. }) if admission.draining.load(Ordering::Acquire) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        outbox.push(peer, FromWorker::Refused { stream, reason: Refusal::Draining });
                    }
                    Ok(message) => handle(message, peer, &served, &stats, &mut streams, &mut outbox, &replies),
                    Err(error) => {
                        stats.unreadable.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("request plane: skipped an unreadable message: {error}");
                        outbox.push(peer, FromWorker::Unreadable { reason: error.to_string() });
                    }
                }
            }
            Some(((peer, stream), output)) = streams.outputs.next(), if !streams.outputs.is_empty() => {
                if let Some(message) = streams.settle(&peer, stream, output) {
                    outbox.push(peer, message);
                }
            }
            Some((peer, message)) = queue.recv() => outbox.push(peer, message),
            _ = sweep.tick() => {
                let silent: Vec<Vec<u8>> = last_ping
                    .iter()
                    .filter(|(_, seen)| seen.elapsed() > HEARTBEAT * PEER_TIMEOUT_PINGS)
                    .map(|(peer, _)| peer.clone())
                    .collect();
                for peer in silent {
                    last_ping.remove(&peer);
                    stats.cancelled.fetch_add(streams.cancel_peer(&peer), Ordering::Relaxed);
                }
                admission.count(&streams, &mut counted);
                continue;
            }
        }
        // Whatever else is ready goes out with it: one engine step yields an output per running request.
        for _ in 1..MAX_OUTPUTS_PER_FRAME {
            match streams.outputs.next().now_or_never() {
                Some(Some(((peer, stream), output))) => {
                    if let Some(message) = streams.settle(&peer, stream, output) {
                        outbox.push(peer, message);
                    }
                }
                _ => match queue.try_recv() {
                    Ok((peer, message)) => outbox.push(peer, message),
                    Err(_) => break,
                },
            }
        }
        match send(&socket, outbox.drain(), seals.as_deref()) {
            Ok(gone) => {
                for peer in gone {
                    // A router that crashed or closed: nobody reads what its requests would still generate.
                    last_ping.remove(&peer);
                    stats.cancelled.fetch_add(streams.cancel_peer(&peer), Ordering::Relaxed);
                }
            }
            Err(error) => {
                tracing::warn!("request plane: the worker's socket failed: {error}");
                break;
            }
        }
        // Only once their last outputs went out: a drain that sees none in flight may close the socket.
        admission.count(&streams, &mut counted);
    }
}

/// Sends each (peer, body); returns the peers that are gone. Never blocks: a ROUTER without a high-water mark
/// queues.
fn send(
    socket: &SocketReader,
    frames: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
    seals: Option<&Seals>,
) -> Result<Vec<Vec<u8>>, zmq::Error> {
    let mut gone: Vec<Vec<u8>> = Vec::new();
    for (peer, body) in frames {
        // The peer's frame is where a ROUTER says it does not know the peer; a body for one is never sent.
        match socket.socket().send(&peer[..], zmq::SNDMORE | zmq::DONTWAIT) {
            Ok(()) => socket.socket().send(sealed(seals, TO_ROUTER, body), zmq::DONTWAIT)?,
            Err(zmq::Error::EHOSTUNREACH) => {
                if !gone.contains(&peer) {
                    gone.push(peer);
                }
            }
            Err(error) => return Err(error),
        }
    }
    Ok(gone)
}

/// Outputs coalesced per peer before a frame is sent; at most this many are taken at once.
const MAX_OUTPUTS_PER_FRAME: usize = 256;

/// Frames to send, in order. Outputs ready together go to each router as one frame; anything else (a snapshot
/// frame can be megabytes) goes as its own, after the outputs that were ready before it.
#[derive(Default)]
struct Outbox {
    frames: Vec<(Vec<u8>, Vec<u8>)>,
    outputs: Vec<(Vec<u8>, Vec<FromWorker>)>,
}

impl Outbox {
    fn push(&mut self, peer: Vec<u8>, message: FromWorker) {
        if !matches!(message, FromWorker::Output { .. }) {
            self.flush_outputs();
            self.frames.push((peer, encode(&message)));
            return;
        }
        match self.outputs.iter_mut().find(|(p, _)| *p == peer) {
            Some((_, messages)) => messages.push(message),
            None => self.outputs.push((peer, vec![message])),
        }
    }

    /// One frame per peer: a lone output as itself, several as a `Batch`.
    fn flush_outputs(&mut self) {
        for (peer, mut messages) in std::mem::take(&mut self.outputs) {
            let body = match messages.len() {
                1 => encode(&messages.remove(0)),
                _ => encode(&FromWorker::Batch(messages)),
            };
            self.frames.push((peer, body));
        }
    }

    fn drain(&mut self) -> std::vec::Drain<'_, (Vec<u8>, Vec<u8>)> {
        self.flush_outputs();
        self.frames.drain(..)
    }
}

fn handle(
    message: ToWorker,
    peer: Vec<u8>,
    served: &Arc<Served>,
    stats: &ServerStats,
    streams: &mut Streams,
    outbox: &mut Outbox,
    replies: &mpsc::UnboundedSender<(Vec<u8>, FromWorker)>,
) {
    let mut reply = |message| outbox.push(peer.clone(), message);
    match message {
        ToWorker::Ping { .. } => {
            // The adapters as they are now: an external engine loads and unloads them while it serves.
            let instance = Instance { adapters: served.engine.adapters(), ..served.instance.clone() };
            reply(FromWorker::Hello { version: PROTOCOL_VERSION, instance });
        }
        ToWorker::ModelFiles => reply(FromWorker::ModelFiles { files: served.model_files.clone() }),
        ToWorker::Profile => {
            reply(FromWorker::Profile { profile: served.engine.profile().map(|profile| (*profile).clone()) })
        }
        ToWorker::KvSnapshot => {
            let (served, replies) = (served.clone(), replies.clone());
            // Sorting a big cache takes a while; the socket's task must not wait for it.
            tokio::task::spawn_blocking(move || {
                let next_seq = served.kv_published.load(Ordering::Acquire);
                let events = served.engine.kv_snapshot().unwrap_or_else(|| {
                    tracing::warn!("asked for a KV snapshot by a router, but this engine keeps no ledger");
                    Vec::new()
                });
                for message in snapshot_frames(next_seq, events) {
                    if replies.send((peer.clone(), message)).is_err() {
                        return;
                    }
                }
            });
        }
        ToWorker::Cancel { stream } => {
            if streams.cancel(&(peer, stream)) {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        ToWorker::Generate { stream, request } => {
            if streams.len() >= served.max_in_flight {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                return reply(FromWorker::Refused { stream, reason: Refusal::Busy { limit: served.max_in_flight } });
            }
            let outputs = match served.engine.submit(request) {
                Ok(outputs) => outputs,
                Err(EngineError::InvalidRequest(reason)) => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    return reply(FromWorker::Refused { stream, reason: Refusal::Invalid(reason) });
                }
                Err(error @ EngineError::Stopped) => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    return reply(FromWorker::Refused { stream, reason: Refusal::Unavailable(error.to_string()) });
                }
            };
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            streams.add(peer, stream, outputs);
        }
    }
}

/// Cuts a snapshot into frames of at most `SNAPSHOT_BLOCKS_PER_FRAME` blocks, splitting a long chain where
/// needed (its next piece names the previous piece's last block as parent); an empty cache is one frame.
fn snapshot_frames(next_seq: u64, events: Vec<KvEvent>) -> Vec<FromWorker> {
    let mut frames = Vec::new();
    let mut current: Vec<KvEvent> = Vec::new();
    let mut room = SNAPSHOT_BLOCKS_PER_FRAME;
    let mut flush = |current: &mut Vec<KvEvent>, room: &mut usize| {
        frames.push(FromWorker::KvSnapshot { next_seq, events: KvEvents(std::mem::take(current)), last: false });
        *room = SNAPSHOT_BLOCKS_PER_FRAME;
    };
    for event in events {
        let KvEvent::Stored { mut parent_hash, mut blocks } = event else {
            if room == 0 {
                flush(&mut current, &mut room);
            }
            room -= 1;
            current.push(event);
            continue;
        };
        while !blocks.is_empty() {
            if room == 0 {
                flush(&mut current, &mut room);
            }
            let rest = blocks.split_off(blocks.len().min(room));
            room -= blocks.len();
            let next_parent = blocks.last().map(|b| b.hash);
            current.push(KvEvent::Stored { parent_hash, blocks: std::mem::replace(&mut blocks, rest) });
            parent_hash = next_parent;
        }
    }
    frames.push(FromWorker::KvSnapshot { next_seq, events: KvEvents(current), last: true });
    frames
}

/// What a client tells its owner about the worker behind it.
// Sent once per change of a worker's state, never stored in bulk: boxing the record would cost every match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerStatus {
    /// The worker answered a ping (first time, or again after being lost, possibly restarted with a new id).
    Alive(Instance),
    /// No answer for `dead_after`; streams in flight were ended without a finish reason.
    Lost,
    /// The worker speaks another protocol version; it is not used.
    Incompatible { theirs: u32 },
}

enum Command {
    Open { stream: u64, request: Box<PreprocessedRequest>, outputs: mpsc::UnboundedSender<EngineOutput> },
    Cancel { stream: u64 },
    ModelFiles(oneshot::Sender<Vec<(String, String)>>),
    Profile(oneshot::Sender<Option<Profile>>),
    KvSnapshot(oneshot::Sender<KvSnapshot>),
}

/// A worker's whole prefix cache, as of the KV messages numbered below `next_seq`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvSnapshot {
    pub next_seq: u64,
    pub events: Vec<KvEvent>,
}

/// One router's connection to one worker.
pub struct WorkerClient {
    commands: mpsc::UnboundedSender<Command>,
    next_stream: AtomicU64,
    alive: Arc<AtomicBool>,
    dropped: Arc<Dropped>,
    /// The LoRA adapters the worker's last `Hello` named.
    adapters: Arc<std::sync::Mutex<Vec<String>>>,
    /// Shared with every stream in flight: a worker that leaves discovery to drain (or a router that stops
    /// watching it) still sends the rest of what it is generating.
    connection: Arc<AbortOnDrop>,
}

/// Messages from the worker that were dropped unread, since the owner last took the counts.
#[derive(Debug, Default)]
pub struct Dropped {
    /// Not sealed with this cluster's key.
    pub unsealed: AtomicU64,
    /// Snapshot frames nobody asked for.
    pub unsolicited: AtomicU64,
    /// Sealed answers received before: copies sent again by someone who captured them.
    pub replayed: AtomicU64,
}

impl WorkerClient {
    /// Connects to a worker's request endpoint and starts pinging it; `status` hears when it answers or is lost.
    pub fn connect(
        context: &Context,
        endpoint: &str,
        dead_after: Duration,
        status: mpsc::UnboundedSender<WorkerStatus>,
    ) -> Result<Self, PlaneError> {
        let socket = SocketReader::new(dealer_socket(context, endpoint)?)?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let alive = Arc::new(AtomicBool::new(false));
        let liveness = Liveness { dead_after, status, alive: alive.clone() };
        let dropped = Arc::new(Dropped::default());
        let adapters = Arc::default();
        let link = Link {
            endpoint: endpoint.to_string(),
            seals: context.seals().cloned(),
            dropped: dropped.clone(),
            adapters: Arc::clone(&adapters),
        };
        let task = tokio::spawn(client(socket, receiver, liveness, link));
        let connection = Arc::new(AbortOnDrop(task));
        Ok(Self { commands, next_stream: AtomicU64::new(0), alive, dropped, adapters, connection })
    }

    /// `connect` for an owner watching many workers on one channel: each status comes with the endpoint.
    pub fn connect_labelled(
        context: &Context,
        endpoint: String,
        dead_after: Duration,
        statuses: &mpsc::UnboundedSender<(String, WorkerStatus)>,
    ) -> Result<Self, PlaneError> {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let client = Self::connect(context, &endpoint, dead_after, sender)?;
        let statuses = statuses.clone();
        tokio::spawn(async move {
            while let Some(status) = receiver.recv().await {
                if statuses.send((endpoint.clone(), status)).is_err() {
                    return;
                }
            }
        });
        Ok(client)
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// The LoRA adapters the worker serves, as its last answer to a ping named them: the record it joined
    /// with may be older (its engine loads and unloads adapters while it serves).
    pub fn adapters(&self) -> Vec<String> {
        self.adapters.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Messages dropped unread since the last call: (unsealed, unsolicited).
    /// What was dropped unread since the last call, by reason (as the router's metric names them).
    pub fn take_dropped(&self) -> [(&'static str, u64); 3] {
        let take = |count: &AtomicU64| count.swap(0, Ordering::Relaxed);
        let dropped = &self.dropped;
        [
            ("unsealed", take(&dropped.unsealed)),
            ("unsolicited", take(&dropped.unsolicited)),
            ("replayed", take(&dropped.replayed)),
        ]
    }

    /// Sends a request; the stream ends with a finish reason, or without one if the worker is lost.
    /// Dropping the stream cancels the request on the worker.
    pub fn submit(&self, request: PreprocessedRequest) -> ResponseStream {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (outputs, receiver) = mpsc::unbounded_channel();
        let _ = self.commands.send(Command::Open { stream, request: Box::new(request), outputs });
        let cancel = CancelOnDrop { commands: self.commands.clone(), stream, _connection: self.connection.clone() };
        ResponseStream::with_drop_guard(receiver, Box::new(cancel))
    }

    /// The worker's model files (tokenizer, configs), or `None` if it does not answer within `timeout`.
    pub async fn model_files(&self, timeout: Duration) -> Option<Vec<(String, String)>> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::ModelFiles(reply)).ok()?;
        tokio::time::timeout(timeout, answer).await.ok()?.ok()
    }

    /// The worker's performance profile, checked: `None` when it has none, sends one that does not hold
    /// together (said in the log), or does not answer within `timeout`.
    pub async fn profile(&self, timeout: Duration) -> Option<Profile> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Profile(reply)).ok()?;
        let profile = tokio::time::timeout(timeout, answer).await.ok()?.ok()??;
        match profile.check() {
            Ok(()) => Some(profile),
            Err(reason) => {
                tracing::warn!("the worker sent a performance profile that does not hold together: {reason}");
                None
            }
        }
    }

    /// The worker's whole prefix cache, or `None` if it does not arrive within `timeout`.
    pub async fn kv_snapshot(&self, timeout: Duration) -> Option<KvSnapshot> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::KvSnapshot(reply)).ok()?;
        tokio::time::timeout(timeout, answer).await.ok()?.ok()
    }
}

/// Tells the worker to stop a request whose stream was dropped (a no-op for one that already finished).
struct CancelOnDrop {
    commands: mpsc::UnboundedSender<Command>,
    stream: u64,
    _connection: Arc<AbortOnDrop>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Cancel { stream: self.stream });
    }
}

/// The worker a client talks to, and how its messages are sealed.
struct Link {
    endpoint: String,
    seals: Option<Arc<Seals>>,
    dropped: Arc<Dropped>,
    adapters: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Link {
    fn seal(&self, body: Vec<u8>) -> Vec<u8> {
        sealed(self.seals.as_deref(), TO_WORKER, body)
    }
}

/// How a client decides that its worker is lost, and whom it tells.
struct Liveness {
    /// Silence for this long: a worker that hangs, or a connection that died without a word. A connection
    /// that dropped is noticed sooner: the next ping cannot be sent (`ZMQ_IMMEDIATE`).
    dead_after: Duration,
    status: mpsc::UnboundedSender<WorkerStatus>,
    alive: Arc<AtomicBool>,
}

impl Liveness {
    /// Ends every open stream without a finish reason (the router migrates them) and says the worker is lost.
    /// Each is also cancelled on the worker: a worker that only hung still holds the connection, so the
    /// cancels wait in it and are the first thing it reads when it resumes, instead of it generating, for
    /// nobody, requests that continue elsewhere. (On a dropped connection they cannot go, and need not.)
    fn lose(&self, open: &mut HashMap<u64, mpsc::UnboundedSender<EngineOutput>>, socket: &zmq::Socket, link: &Link) {
        if self.alive.swap(false, Ordering::AcqRel) {
            for (stream, _) in open.drain() {
                let _ = socket.send(link.seal(encode(&ToWorker::Cancel { stream })), zmq::DONTWAIT);
            }
            let _ = self.status.send(WorkerStatus::Lost);
        }
    }
}

async fn client(
    mut socket: SocketReader,
    mut commands: mpsc::UnboundedReceiver<Command>,
    liveness: Liveness,
    link: Link,
) {
    let (status, alive) = (liveness.status.clone(), liveness.alive.clone());
    let mut open: HashMap<u64, mpsc::UnboundedSender<EngineOutput>> = HashMap::new();
    let mut files_wanted: Vec<oneshot::Sender<Vec<(String, String)>>> = Vec::new();
    let mut profile_wanted: Vec<oneshot::Sender<Option<Profile>>> = Vec::new();
    // Answers arrive whole and in order, so one snapshot in the making serves everyone waiting.
    let mut snapshot_wanted: Vec<oneshot::Sender<KvSnapshot>> = Vec::new();
    let mut snapshot = KvSnapshot::default();
    let mut snapshot_entries = 0;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut known: Option<u64> = None;
    let mut unsent_pings = 0u32;
    let mut warned_unsealed = false;
    let mut seen = Seen::default();
    loop {
        let send = tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Open { stream, request, outputs }) => {
                    if !alive.load(Ordering::Acquire) {
                        // Ends the stream without a finish reason: the router treats it like a lost worker.
                        continue;
                    }
                    open.insert(stream, outputs);
                    ToWorker::Generate { stream, request: *request }
                }
                Some(Command::Cancel { stream }) => {
                    if open.remove(&stream).is_none() {
                        continue;
                    }
                    ToWorker::Cancel { stream }
                }
                Some(Command::ModelFiles(reply)) => {
                    files_wanted.push(reply);
                    ToWorker::ModelFiles
                }
                Some(Command::Profile(reply)) => {
                    profile_wanted.push(reply);
                    ToWorker::Profile
                }
                Some(Command::KvSnapshot(reply)) => {
                    snapshot_wanted.push(reply);
                    ToWorker::KvSnapshot
                }
            },
            frames = socket.recv() => {
                let Ok(frames) = frames else { return };
                let Some(body) = frames.into_iter().next() else { continue };
                let body = match opened(link.seals.as_deref(), TO_ROUTER, &body, &mut seen) {
                    Ok(body) => body,
                    Err(Unopened::Replayed) => {
                        // A copy of an earlier answer: its tokens were delivered once already.
                        link.dropped.replayed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(Unopened::Unsealed) => {
                    link.dropped.unsealed.fetch_add(1, Ordering::Relaxed);
                    if !warned_unsealed {
                        warned_unsealed = true;
                        tracing::warn!(
                            "request plane: the worker at {} answers without this cluster's key (started with another \
                             --cluster-key-file, or none); it is not used",
                            link.endpoint
                        );
                    }
                    continue;
                    }
                };
                // Only what this worker sealed, once, says it is alive.
                last_heard = Instant::now();
                let messages = match decode::<FromWorker>(&body) {
                    Ok(FromWorker::Batch(messages)) => messages,
                    Ok(message) => vec![message],
                    Err(error) => {
                        tracing::warn!("request plane: skipped an unreadable message from a worker: {error}");
                        continue;
                    }
                };
                for message in messages {
                    match message {
                        FromWorker::Hello { version, .. } if version != PROTOCOL_VERSION => {
                            alive.store(false, Ordering::Release);
                            let _ = status.send(WorkerStatus::Incompatible { theirs: version });
                        }
                        FromWorker::Hello { instance, .. } => {
                            {
                                let mut adapters = link.adapters.lock().unwrap_or_else(|e| e.into_inner());
                                if *adapters != instance.adapters {
                                    adapters.clone_from(&instance.adapters);
                                }
                            }
                            if known != Some(instance.id) || !alive.load(Ordering::Acquire) {
                                known = Some(instance.id);
                                alive.store(true, Ordering::Release);
                                let _ = status.send(WorkerStatus::Alive(instance));
                            }
                        }
                        FromWorker::ModelFiles { files } => {
                            files_wanted.drain(..).for_each(|reply| {
                                let _ = reply.send(files.clone());
                            });
                        }
                        FromWorker::Profile { profile } => {
                            profile_wanted.drain(..).for_each(|reply| {
                                let _ = reply.send(profile.clone());
                            });
                        }
                        FromWorker::KvSnapshot { next_seq, events, last } => {
                            if snapshot_wanted.is_empty() {
                                // Nobody asked: a frame that would only pile up.
                                link.dropped.unsolicited.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            snapshot.next_seq = next_seq;
                            snapshot_entries += events.0.iter().map(KvEvent::entries).sum::<usize>();
                            snapshot.events.extend(events.0);
                            if snapshot_entries > MAX_SNAPSHOT_ENTRIES {
                                tracing::warn!(
                                    "request plane: a worker's snapshot passed {MAX_SNAPSHOT_ENTRIES} blocks; dropped, \
                                     its asker will try again"
                                );
                                (snapshot, snapshot_entries) = (KvSnapshot::default(), 0);
                                snapshot_wanted.clear();
                                continue;
                            }
                            if last {
                                snapshot_entries = 0;
                                let whole = std::mem::take(&mut snapshot);
                                if let Some(first) = snapshot_wanted.pop() {
                                    snapshot_wanted.drain(..).for_each(|reply| {
                                        let _ = reply.send(whole.clone());
                                    });
                                    let _ = first.send(whole);
                                }
                            }
                        }
                        FromWorker::Output { stream, output } => {
                            let finished = output.finish_reason.is_some();
                            if let Some(outputs) = open.get(&stream) {
                                let _ = outputs.send(output);
                            }
                            if finished {
                                open.remove(&stream);
                            }
                        }
                        FromWorker::Refused { stream, reason } => {
                            if let Some(outputs) = open.remove(&stream) {
                                let finish = match reason {
                                    // Ending without a finish reason sends the request to another worker.
                                    Refusal::Busy { limit } => {
                                        tracing::debug!("a worker at its limit of {limit} requests in flight refused one");
                                        continue;
                                    }
                                    Refusal::Draining => {
                                        tracing::debug!("a draining worker refused a request");
                                        continue;
                                    }
                                    Refusal::Unavailable(reason) => {
                                        tracing::debug!("a worker whose engine is unavailable refused a request: {reason}");
                                        continue;
                                    }
                                    Refusal::Invalid(message) => FinishReason::Invalid(message),
                                    Refusal::Version { ours, yours } => FinishReason::Error(format!("the worker speaks request-plane version {ours}, not {yours}")),
                                };
                                let _ = outputs.send(EngineOutput { finish_reason: Some(finish), ..Default::default() });
                            }
                        }
                        FromWorker::Unreadable { reason } => {
                            tracing::warn!("a worker could not read our message: {reason}");
                        }
                        FromWorker::Batch(_) => tracing::warn!("request plane: a worker sent a nested batch; skipped"),
                    }
                }
                continue;
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > liveness.dead_after {
                    liveness.lose(&mut open, socket.socket(), &link);
                }
                ToWorker::Ping { version: PROTOCOL_VERSION }
            }
        };
        // A message that cannot go now (no connection, or the queue to a slow worker full) is dropped, and
        // whoever waits for its answer is told at once: a request ends without a finish reason, so that the
        // router sends it to another worker; a ping is tried again soon.
        match socket.socket().send(link.seal(encode(&send)), zmq::DONTWAIT) {
            Ok(()) => unsent_pings = 0,
            Err(zmq::Error::EAGAIN) => match send {
                ToWorker::Generate { stream, .. } => drop(open.remove(&stream)),
                ToWorker::ModelFiles => drop(files_wanted.pop()),
                ToWorker::Profile => drop(profile_wanted.pop()),
                ToWorker::KvSnapshot => drop(snapshot_wanted.pop()),
                ToWorker::Ping { .. } => {
                    // No connection (or a queue of thousands the worker does not take): whatever was in
                    // flight on it cannot come back, since a new connection is a new peer to the worker.
                    liveness.lose(&mut open, socket.socket(), &link);
                    // Soon for a worker that is starting, then every heartbeat for an address nobody is at.
                    heartbeat.reset_after((RETRY_PING * 2u32.pow(unsent_pings.min(4))).min(HEARTBEAT));
                    unsent_pings += 1;
                }
                ToWorker::Cancel { .. } => {}
            },
            Err(error) => {
                tracing::warn!("request plane: the socket to a worker failed: {error}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
