//! `dynamo bench plane`: both planes against raw libzmq carrying the same bytes, in the same run over
//! loopback TCP. Event plane: KV events end to end — encode, publish, receive, check sequence, decode,
//! apply to a FlashIndexer — against PUB/SUB with no encoding, tracking or decoding. Request plane:
//! streamed requests through `RequestServer`/`WorkerClient` against a bare DEALER/ROUTER echo.
use crate::core::engine::{Engine, EngineError, ResponseStream};
use crate::core::indexer::{FlashIndexer, Indexer};
use crate::core::plane::Context;
use crate::core::plane::request::{RequestServer, Served, WorkerClient, WorkerStatus, dealer_socket, router_socket};
use crate::core::plane::{
    EventPublisher, EventSubscriber, PlaneError, SocketReader, bound_endpoint, publish_socket, subscribe_socket,
};
use crate::core::protocol::discovery::{Instance, ModelCardSummary, Role};
use crate::core::protocol::plane::{Payload, Topic};
use crate::core::protocol::request::{FromWorker, ToWorker, encode};
use crate::core::protocol::{
    EngineOutput, FinishReason, KvEvent, KvEventBatch, LoadMetrics, PreprocessedRequest, StoredBlock, WorkerId,
};
use crate::core::trust::ClusterKey;
use futures::StreamExt;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PlaneRun {
    /// KV events delivered (and, for the plane, applied) per second.
    pub events_per_s: f64,
    pub messages: u64,
    /// Messages published but never received (high-water-mark drops).
    pub lost: u64,
    /// CPU time of the whole process (both ends, libzmq's threads) per KV event, in µs: on a machine where the
    /// run saturates every core, what the plane adds beyond raw libzmq is what its ratio loses.
    pub cpu_us_per_event: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PlaneResult {
    /// The median round of each path.
    pub plane: PlaneRun,
    pub raw_zmq: PlaneRun,
    /// Plane over raw libzmq, events/s: the median of the rounds' ratios.
    pub ratio: f64,
    /// Raw libzmq's CPU time per event over the plane's, medians of each: where both paths keep every core
    /// busy this is what the throughput ratio tends to, with less of the machine's noise.
    pub cpu_ratio: Option<f64>,
    pub rounds: usize,
}

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Both paths buffer without limit, so neither drops and both measure throughput alone.
const UNLIMITED: i32 = 0;

/// Credit-based flow control between a path's publisher and subscriber: the publisher runs at most `WINDOW`
/// messages ahead, as a real subscriber's queue is bounded by its high-water mark. Without it the slower
/// subscriber's queue grew through the whole run, and the kernel zeroing fresh pages for libzmq's buffers was
/// 8 % of the plane's profile against 1 % of raw's: a measure of the allocator, charged to whichever side
/// was slower. Credits move in chunks so that neither side pays a synchronisation per message.
struct Credits(tokio::sync::Semaphore);

const CREDIT_CHUNK: u32 = 256;
const WINDOW: usize = 16 * CREDIT_CHUNK as usize;

impl Credits {
    fn new() -> Arc<Self> {
        Arc::new(Self(tokio::sync::Semaphore::new(WINDOW)))
    }

    /// Before sending message `sent`; false once the subscriber has stopped.
    async fn before_send(&self, sent: usize) -> bool {
        if !sent.is_multiple_of(CREDIT_CHUNK as usize) {
            return true;
        }
        self.0.acquire_many(CREDIT_CHUNK).await.map(|permits| permits.forget()).is_ok()
    }

    /// After receiving message `received` (counted from 1).
    fn received(&self, received: u64) {
        if received.is_multiple_of(u64::from(CREDIT_CHUNK)) {
            self.0.add_permits(CREDIT_CHUNK as usize);
        }
    }

    /// The subscriber is done: a publisher waiting for credit stops.
    fn close(&self) {
        self.0.close();
    }
}

/// Blocks a simulated worker keeps cached; past it each message also evicts the oldest message's blocks,
/// so the index stays at a worker's size instead of growing for ever.
pub const CACHED_BLOCKS: u64 = 65_536;

/// Message `i`: `stored` Stored events of one block each, extending a chain, as a worker would publish per
/// step; once the cache is full, also one Removed event evicting the chain stored `CACHED_BLOCKS` blocks
/// earlier, leaf first.
fn batch(i: u64, stored: usize) -> KvEventBatch {
    let hash = |message: u64, e: u64| (message * 1024 + e + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut events: Vec<KvEvent> = (0..stored as u64)
        .map(|e| {
            let parent_hash = (e > 0).then(|| hash(i, e - 1));
            KvEvent::Stored { parent_hash, blocks: vec![StoredBlock { hash: hash(i, e), tokens_hash: hash(i, e) }] }
        })
        .collect();
    let messages_cached = CACHED_BLOCKS / stored as u64;
    if let Some(evicted) = i.checked_sub(messages_cached) {
        events.push(KvEvent::Removed { hashes: (0..stored as u64).rev().map(|e| hash(evicted, e)).collect() });
    }
    KvEventBatch { worker_id: 1, events }
}

/// Rounds of both paths, one after the other, and what the round-by-round comparison says.
struct Alternated<R> {
    runs: Vec<(R, R)>,
    /// Each path's median round.
    plane: R,
    raw_zmq: R,
    /// The median of the rounds' plane/raw ratios.
    ratio: f64,
}

/// `rounds` alternate runs of each path, compared by `rate`: on a shared machine one run of either can land in
/// a noisy moment, and the two halves of a round share the moment they ran in.
async fn alternate<R: Copy, P, Q>(
    rounds: usize,
    mut plane: impl FnMut() -> P,
    mut raw: impl FnMut() -> Q,
    rate: fn(&R) -> f64,
) -> Result<Alternated<R>, PlaneError>
where
    P: std::future::Future<Output = Result<R, PlaneError>>,
    Q: std::future::Future<Output = Result<R, PlaneError>>,
{
    let mut runs = Vec::new();
    for _ in 0..rounds.max(1) {
        let plane_run = plane().await?;
        runs.push((plane_run, raw().await?));
    }
    let median = |pick: fn(&(R, R)) -> R| {
        let mut values: Vec<R> = runs.iter().map(pick).collect();
        values.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
        values[values.len() / 2]
    };
    let (plane, raw_zmq) = (median(|r| r.0), median(|r| r.1));
    let mut ratios: Vec<f64> = runs.iter().map(|(plane, raw)| rate(plane) / rate(raw)).collect();
    ratios.sort_by(f64::total_cmp);
    Ok(Alternated { plane, raw_zmq, ratio: ratios[ratios.len() / 2], runs })
}

/// `key`: seal the plane's messages as a keyed cluster does (the raw path stays clear, so the ratio shows
/// what sealing costs).
pub async fn run(
    messages: u64,
    events_per_message: usize,
    rounds: usize,
    key: Option<&ClusterKey>,
) -> Result<PlaneResult, PlaneError> {
    let alternated = alternate(
        rounds,
        || run_plane(messages, events_per_message, key),
        || run_raw(messages, events_per_message),
        |run: &PlaneRun| run.events_per_s,
    )
    .await?;
    let cpu_median = |of: fn(&(PlaneRun, PlaneRun)) -> Option<f64>| {
        let mut values: Vec<f64> = alternated.runs.iter().filter_map(of).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    let cpu_plane = cpu_median(|r| r.0.cpu_us_per_event);
    let cpu_raw = cpu_median(|r| r.1.cpu_us_per_event);
    Ok(PlaneResult {
        plane: alternated.plane,
        raw_zmq: alternated.raw_zmq,
        ratio: alternated.ratio,
        cpu_ratio: cpu_raw
            .zip(cpu_plane)
            .filter(|&(raw, plane)| raw > 0.0 && plane > 0.0)
            .map(|(raw, plane)| raw / plane),
        rounds: alternated.runs.len(),
    })
}

async fn run_plane(messages: u64, events_per_message: usize, key: Option<&ClusterKey>) -> Result<PlaneRun, PlaneError> {
    let context = Context::with_key(key);
    let mut publisher = EventPublisher::bind(&context, "tcp://127.0.0.1:*", 1, UNLIMITED)?;
    let mut subscriber = EventSubscriber::connect(&context, &[publisher.endpoint()], &[Topic::Kv], UNLIMITED)?;
    // Out-wait ZMQ's slow joiner: publish until one message arrives, then drain.
    let warmup = batch(u64::MAX / 2048, 1);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        publisher.publish(&warmup)?;
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(2), subscriber.next()).await {
            break;
        }
        if Instant::now() > deadline {
            return Err(PlaneError::Endpoint);
        }
    }
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(20), subscriber.next()).await {}
    let lost_before = subscriber.lost;

    // The engine's work, done before the clock starts as the raw path's frames are: the plane is timed from
    // encoding on.
    let batches: Vec<KvEventBatch> = (0..messages).map(|i| batch(i, events_per_message)).collect();
    let index = FlashIndexer::new();
    let mut kv_batch = KvEventBatch { worker_id: 0, events: Vec::new() };
    let (mut events, mut last) = (0u64, Instant::now());
    let credits = Credits::new();
    let (start, cpu_start) = (Instant::now(), super::process_cpu_seconds());
    let sender = tokio::spawn({
        let credits = credits.clone();
        async move {
            for (sent, batch) in batches.iter().enumerate() {
                if !credits.before_send(sent).await {
                    break;
                }
                publisher.publish(batch)?;
            }
            // Both returned, not dropped: freeing the batches would land in the timed window.
            Ok::<_, PlaneError>((publisher, batches))
        }
    });
    let mut received = 0u64;
    while received + (subscriber.lost - lost_before) < messages {
        let Ok(delivery) = tokio::time::timeout(Duration::from_millis(500), subscriber.next()).await else {
            break;
        };
        let delivery = delivery?;
        // As in a router: decoded (into the last batch's memory) and applied where the socket is read.
        if kv_batch.decode_into(&delivery.payload).is_ok() {
            index.apply_all(kv_batch.worker_id, &kv_batch.events);
            events += kv_batch.events.len() as u64;
            last = Instant::now();
        }
        received += 1;
        credits.received(received);
    }
    let run = PlaneRun::measured(events, last - start, cpu_start, messages, received);
    credits.close();
    let _sent = sender.await.map_err(|_| PlaneError::Endpoint)??;
    Ok(run)
}

/// The same sockets and frames through the same socket code (`publish_socket`, `subscribe_socket`,
/// `SocketReader`, libzmq's `send_multipart`), with nothing of the plane: no encoding, numbering, tracking,
/// decoding or index.
async fn run_raw(messages: u64, events_per_message: usize) -> Result<PlaneRun, PlaneError> {
    let context = Context::new();
    let publisher = publish_socket(&context, "tcp://127.0.0.1:*", UNLIMITED)?;
    let endpoint = bound_endpoint(&publisher)?;
    let subscriber = subscribe_socket(&context, &[Topic::Kv], UNLIMITED)?;
    subscriber.connect(&endpoint)?;
    let mut subscriber = SocketReader::new(subscriber)?;
    // The same bytes the plane sends for one message, encoded once.
    let payload = batch(CACHED_BLOCKS, events_per_message).to_bytes();
    let frame = |seq: u64| -> Vec<Vec<u8>> {
        vec![Topic::Kv.name().to_vec(), 1u64.to_be_bytes().to_vec(), seq.to_be_bytes().to_vec(), payload.clone()]
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        publisher.send_multipart(frame(u64::MAX), zmq::DONTWAIT)?;
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(2), subscriber.recv()).await {
            break;
        }
        if Instant::now() > deadline {
            return Err(PlaneError::Endpoint);
        }
    }
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(20), subscriber.recv()).await {}

    let frames: Vec<Vec<Vec<u8>>> = (0..messages).map(frame).collect();
    let credits = Credits::new();
    let (start, cpu_start) = (Instant::now(), super::process_cpu_seconds());
    let sender = tokio::spawn({
        let credits = credits.clone();
        async move {
            for (sent, f) in frames.into_iter().enumerate() {
                if !credits.before_send(sent).await {
                    break;
                }
                publisher.send_multipart(f, zmq::DONTWAIT)?;
            }
            // Returned, not dropped: with linger 0, dropping the socket would discard what is still queued.
            Ok::<_, zmq::Error>(publisher)
        }
    });
    let mut received = 0u64;
    let mut last = start;
    while received < messages {
        let Ok(message) = tokio::time::timeout(Duration::from_millis(500), subscriber.recv()).await else {
            break;
        };
        message?;
        received += 1;
        credits.received(received);
        last = Instant::now();
    }
    let events = received * batch(CACHED_BLOCKS, events_per_message).events.len() as u64;
    let run = PlaneRun::measured(events, last - start, cpu_start, messages, received);
    credits.close();
    let _publisher = sender.await.map_err(|_| PlaneError::Endpoint)??;
    Ok(run)
}

impl PlaneRun {
    /// A run's figures, read when its last event is in (the CPU time too, so it excludes the tear-down).
    fn measured(events: u64, elapsed: Duration, cpu_start: Option<f64>, messages: u64, received: u64) -> Self {
        PlaneRun {
            events_per_s: events as f64 / elapsed.as_secs_f64(),
            messages: received,
            lost: messages - received,
            cpu_us_per_event: cpu_per_event(cpu_start, events),
        }
    }
}

fn cpu_per_event(cpu_start: Option<f64>, events: u64) -> Option<f64> {
    let used = super::process_cpu_seconds()? - cpu_start?;
    (events > 0).then(|| used * 1e6 / events as f64)
}

pub fn table(r: &PlaneResult) -> String {
    let mut out =
        format!("{:<10} {:>14} {:>10} {:>8} {:>16}\n", "path", "KV events/s", "messages", "lost", "CPU µs/event");
    for (name, run) in [("plane", &r.plane), ("raw zmq", &r.raw_zmq)] {
        let cpu = run.cpu_us_per_event.map_or("-".to_string(), |us| format!("{us:.3}"));
        out.push_str(&format!(
            "{:<10} {:>14.0} {:>10} {:>8} {:>16}\n",
            name, run.events_per_s, run.messages, run.lost, cpu
        ));
    }
    out.push_str(&format!("plane / raw libzmq: {:.2} (median of {} alternating rounds)", r.ratio, r.rounds));
    if let Some(cpu) = r.cpu_ratio {
        out.push_str(&format!("; by CPU per event: {cpu:.2}"));
    }
    out.push('\n');
    out
}

/// One path's request-plane throughput.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RequestRun {
    pub requests_per_s: f64,
    /// Streamed outputs (one token each) per second.
    pub outputs_per_s: f64,
    pub requests: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RequestResult {
    /// The median round of each path.
    pub plane: RequestRun,
    pub raw_zmq: RequestRun,
    /// Plane over raw libzmq, requests/s: the median of the rounds' ratios.
    pub ratio: f64,
    pub rounds: usize,
}

/// Requests a router keeps open at once on the one connection.
const CONCURRENCY: usize = 64;
/// Prompt tokens per request: a short chat turn.
const PROMPT_TOKENS: u32 = 256;

/// Streams `max_tokens` outputs of one token each at once: the request plane is all that is measured.
struct EchoEngine;

impl Engine for EchoEngine {
    fn worker_id(&self) -> WorkerId {
        1
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        let (outputs, receiver) = tokio::sync::mpsc::unbounded_channel();
        let last = request.stop.max_tokens.saturating_sub(1);
        for i in 0..=last {
            let finish_reason = (i == last).then_some(FinishReason::Length);
            let _ = outputs.send(EngineOutput { token_ids: vec![i], finish_reason, ..Default::default() });
        }
        Ok(ResponseStream::new(receiver))
    }

    fn subscribe_kv_events(&self) -> tokio::sync::broadcast::Receiver<KvEventBatch> {
        tokio::sync::broadcast::channel(1).1
    }

    fn load(&self) -> LoadMetrics {
        LoadMetrics::default()
    }
}

fn bench_request(tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest::greedy("bench", (0..PROMPT_TOKENS).collect(), tokens)
}

/// Requests through `RequestServer` and `WorkerClient` (msgpack, stream ids, an engine stream and a channel
/// per request, the heartbeat running), against a bare DEALER/ROUTER pair sending the same bytes,
/// `CONCURRENCY` in flight.
pub async fn run_requests(
    requests: u64,
    tokens: u32,
    rounds: usize,
    key: Option<&ClusterKey>,
) -> Result<RequestResult, PlaneError> {
    let alternated = alternate(
        rounds,
        || run_request_plane(requests, tokens, key),
        || run_request_raw(requests, tokens),
        |run: &RequestRun| run.requests_per_s,
    )
    .await?;
    Ok(RequestResult {
        plane: alternated.plane,
        raw_zmq: alternated.raw_zmq,
        ratio: alternated.ratio,
        rounds: alternated.runs.len(),
    })
}

fn request_run(requests: u64, tokens: u32, seconds: f64) -> RequestRun {
    RequestRun {
        requests_per_s: requests as f64 / seconds,
        outputs_per_s: (requests * u64::from(tokens)) as f64 / seconds,
        requests,
    }
}

async fn run_request_plane(requests: u64, tokens: u32, key: Option<&ClusterKey>) -> Result<RequestRun, PlaneError> {
    let context = Context::with_key(key);
    let card = ModelCardSummary { block_size: 16, context_length: 1 << 20, kv_blocks: 0, tokenizer_hash: 0 };
    let instance = Instance {
        id: 1,
        role: Role::Decode,
        model: "bench".into(),
        namespace: "bench".into(),
        request_addr: String::new(),
        event_addr: String::new(),
        transfer_addr: None,
        card,
        device: String::new(),
        http_addr: None,
        adapters: Vec::new(),
    };
    let served = Served {
        engine: Arc::new(EchoEngine),
        instance,
        model_files: Vec::new(),
        max_in_flight: CONCURRENCY * 2,
        kv_published: Arc::default(),
    };
    let server = RequestServer::bind(&context, "tcp://127.0.0.1:*", served)?;
    let (status, mut statuses) = tokio::sync::mpsc::unbounded_channel();
    let client = WorkerClient::connect(&context, server.endpoint(), Duration::from_secs(5), status)?;
    match tokio::time::timeout(READY_TIMEOUT, statuses.recv()).await {
        Ok(Some(WorkerStatus::Alive(_))) => {}
        other => return Err(PlaneError::Incomplete(format!("the bench worker never answered: {other:?}"))),
    }
    let request = bench_request(tokens);
    let one = |client: &WorkerClient| {
        let stream = client.submit(request.clone());
        async move { stream.fold(0u32, |n, output| async move { n + output.token_ids.len() as u32 }).await }
    };
    let start = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut sent = 0;
    while sent < requests.min(CONCURRENCY as u64) {
        in_flight.push(one(&client));
        sent += 1;
    }
    let mut completed = 0;
    while let Some(streamed) = in_flight.next().await {
        if streamed != tokens {
            return Err(PlaneError::Incomplete(format!("a request streamed {streamed} of its {tokens} outputs")));
        }
        completed += 1;
        if sent < requests {
            in_flight.push(one(&client));
            sent += 1;
        }
    }
    Ok(request_run(completed, tokens, start.elapsed().as_secs_f64()))
}

async fn run_request_raw(requests: u64, tokens: u32) -> Result<RequestRun, PlaneError> {
    let context = Context::new();
    let router = router_socket(&context, "tcp://127.0.0.1:*")?;
    let endpoint = bound_endpoint(&router)?;
    let mut router = SocketReader::new(router)?;
    let mut dealer = SocketReader::new(dealer_socket(&context, &endpoint)?)?;
    // The bytes the plane carries: the request one way, one output per token the other.
    let request = encode(&ToWorker::Generate { stream: 0, request: bench_request(tokens) });
    let outputs: Vec<Vec<u8>> = (0..tokens)
        .map(|i| {
            let finish_reason = (i + 1 == tokens).then_some(FinishReason::Length);
            let output = EngineOutput { token_ids: vec![i], finish_reason, ..Default::default() };
            encode(&FromWorker::Output { stream: 0, output })
        })
        .collect();
    let server = tokio::spawn(async move {
        while let Ok(frames) = router.recv().await {
            let Some(peer) = frames.first() else { continue };
            for output in &outputs {
                router.socket().send_multipart([peer.to_vec(), output.clone()], zmq::DONTWAIT)?;
            }
        }
        Ok::<_, PlaneError>(())
    });
    // One round trip before the clock starts: the DEALER queues nothing until its connection is up.
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match dealer.socket().send(request.clone(), zmq::DONTWAIT) {
            Ok(()) => break,
            Err(zmq::Error::EAGAIN) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    for _ in 0..tokens {
        tokio::time::timeout(READY_TIMEOUT, dealer.recv())
            .await
            .map_err(|_| PlaneError::Incomplete("raw zmq: the echo never answered".into()))??;
    }
    let start = Instant::now();
    let mut sent = 0;
    while sent < requests.min(CONCURRENCY as u64) {
        dealer.socket().send(request.clone(), zmq::DONTWAIT)?;
        sent += 1;
    }
    // Outputs of different requests interleave; every `tokens` of them complete one request on average,
    // which keeps the window full just as the plane's does.
    let mut received = 0u64;
    let expected = requests * u64::from(tokens);
    while received < expected {
        let Ok(message) = tokio::time::timeout(READY_TIMEOUT, dealer.recv()).await else {
            return Err(PlaneError::Incomplete(format!("raw zmq: {received} of {expected} outputs arrived")));
        };
        message?;
        received += 1;
        if received.is_multiple_of(u64::from(tokens)) && sent < requests {
            dealer.socket().send(request.clone(), zmq::DONTWAIT)?;
            sent += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    server.abort();
    Ok(request_run(requests, tokens, seconds))
}

pub fn request_table(r: &RequestResult) -> String {
    let mut out = format!("{:<10} {:>14} {:>14} {:>10}\n", "path", "requests/s", "outputs/s", "requests");
    for (name, run) in [("plane", &r.plane), ("raw zmq", &r.raw_zmq)] {
        out.push_str(&format!(
            "{:<10} {:>14.0} {:>14.0} {:>10}\n",
            name, run.requests_per_s, run.outputs_per_s, run.requests
        ));
    }
    out.push_str(&format!("plane / raw libzmq: {:.2} (median of {} alternating rounds)\n", r.ratio, r.rounds));
    out
}
