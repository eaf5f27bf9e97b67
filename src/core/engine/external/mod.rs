//! An engine that is another server: a vLLM process (its OpenAI-compatible API, its KV-event publisher and
//! its `/metrics`) put behind this worker, so routers, the planner and `dynamo top` treat it as any worker.
//! The router has already tokenized and templated the request; the engine gets token ids and this worker's
//! stop conditions, and streams token ids back, so detokenization, stop strings and usage stay the frontend's.
//! Dropping a request's stream drops its HTTP response, which closes the connection: vLLM aborts a request
//! whose client went away.
//!
//! Each engine's dialect is a module (`vllm`, `sglang`, `trtllm`): the request it takes, the chunks it streams,
//! the gauges it exposes; `handoff` is how each one's own connector moves KV between a prefill and a decode
//! engine.
mod events;
mod handoff;
pub use handoff::SGLANG_BOOTSTRAP_PORT;
mod http;
mod metrics;
mod sglang;
mod trtllm;
mod vllm;

use super::{Engine, EngineError, KvLedger, ResponseStream, check_adapter, check_fits};
use crate::core::protocol::{
    EngineOutput, FinishReason, HandOff, KvEvent, KvEventBatch, LoadMetrics, PreprocessedRequest, TokenLogprob,
    WorkerId,
};
use http::{EngineHttp, EventStream};
use serde::Deserialize;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// The external engines a worker can wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalKind {
    Vllm,
    Sglang,
    Trtllm,
}

impl ExternalKind {
    pub fn name(self) -> &'static str {
        match self {
            ExternalKind::Vllm => "vllm",
            ExternalKind::Sglang => "sglang",
            ExternalKind::Trtllm => "trtllm",
        }
    }

    /// Where its Prometheus metrics are, unless told otherwise.
    fn metrics_path(self) -> &'static str {
        match self {
            ExternalKind::Trtllm => trtllm::METRICS_PATH,
            ExternalKind::Vllm | ExternalKind::Sglang => "/metrics",
        }
    }

    /// Why the engine cannot answer `request` as asked, if it cannot.
    fn refuses(self, request: &PreprocessedRequest) -> Option<String> {
        if !request.media().is_empty() {
            return Some(
                "images are not forwarded to external engines yet; serve this model with the built-in engine".into(),
            );
        }
        match self {
            ExternalKind::Trtllm => trtllm::refuses(request),
            ExternalKind::Sglang => sglang::refuses(request),
            ExternalKind::Vllm => None,
        }
    }

    /// Where a streamed request goes, and its body.
    fn request(self, request: &PreprocessedRequest, model: &str) -> (&'static str, Value) {
        match self {
            ExternalKind::Vllm => ("/v1/completions", vllm::completion_body(request, model)),
            ExternalKind::Sglang => ("/generate", sglang::generate_body(request)),
            ExternalKind::Trtllm => ("/v1/completions", trtllm::completion_body(request, model)),
        }
    }

    /// One streamed event's data, of a request of which `delivered` tokens were already taken.
    fn parse(self, data: &str, logprobs: bool, delivered: usize) -> Result<Delta, String> {
        match self {
            ExternalKind::Vllm => vllm::parse_chunk(data, logprobs),
            ExternalKind::Sglang => sglang::parse_chunk(data, logprobs, delivered),
            ExternalKind::Trtllm => trtllm::parse_chunk(data, logprobs),
        }
    }

    fn gauges(self, samples: &metrics::Samples) -> EngineGauges {
        match self {
            ExternalKind::Vllm => vllm::gauges(samples),
            ExternalKind::Sglang => sglang::gauges(samples),
            ExternalKind::Trtllm => trtllm::gauges(samples),
        }
    }
}

/// What one streamed chunk adds to the request.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    /// From the usage chunk, when the server counts cached prompt tokens (`--enable-prompt-tokens-details`).
    pub cached_tokens: Option<u32>,
    /// A usage chunk: the stream's last before `[DONE]`.
    pub usage: bool,
}

/// The message of an OpenAI-style error body (`{"error": {"message"}}`, or vLLM's older `{"message"}`).
pub fn error_message(body: &Value) -> String {
    let message = body.get("error").map_or(body, |e| e).get("message").and_then(Value::as_str);
    match message {
        Some(message) => message.to_string(),
        None => body.to_string().chars().take(300).collect(),
    }
}

/// The served model: its name (what requests must say) and context length, from `/v1/models`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedModel {
    pub id: String,
    pub max_model_len: Option<u32>,
    /// The LoRA adapters it serves too: the entries whose `parent` is the base model (vLLM lists each
    /// `--lora-modules` adapter so, and the ones loaded later through its API).
    pub adapters: Vec<String>,
}

pub fn parse_models(body: &[u8]) -> Result<ServedModel, String> {
    #[derive(Deserialize)]
    struct Models {
        data: Vec<Model>,
    }
    #[derive(Deserialize)]
    struct Model {
        id: String,
        #[serde(default)]
        max_model_len: Option<u32>,
        #[serde(default)]
        parent: Option<String>,
    }
    let models: Models =
        serde_json::from_slice(body).map_err(|e| format!("/v1/models is not an OpenAI model list: {e}"))?;
    let base =
        (models.data.iter()).find(|m| m.parent.is_none()).or(models.data.first()).ok_or("/v1/models lists no model")?;
    let adapters = (models.data.iter())
        .filter(|m| m.parent.as_ref() == Some(&base.id) && m.id != base.id)
        .map(|m| m.id.clone())
        .collect();
    Ok(ServedModel { id: base.id.clone(), max_model_len: base.max_model_len, adapters })
}

/// What the engine's `/metrics` says about its load and KV cache.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineGauges {
    pub running: u32,
    pub waiting: u32,
    /// Of the KV cache in use, 0 to 1.
    pub kv_usage: f64,
    pub block_size: Option<u32>,
    pub num_blocks: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExternalSettings {
    pub kind: ExternalKind,
    /// `http://host:port` of the engine's OpenAI-compatible server.
    pub url: String,
    /// The engine's KV-event publisher (`tcp://host:port`), when it publishes them.
    pub kv_events: Option<String>,
    /// Its replay socket (vLLM's `replay_endpoint`), for the history of those events.
    pub kv_events_replay: Option<String>,
    /// Where its Prometheus metrics are [default: `/metrics` of `url`].
    pub metrics_url: Option<String>,
    /// Tokens per KV block, which must be the engine's (its events are split into blocks of this size).
    pub block_size: usize,
    /// The engine moves KV to or from its peers itself (vLLM's NixlConnector), so this worker takes part in
    /// disaggregated serving through the engine's protocol: its record offers `vllm://HOST:PORT` as its
    /// transfer address, and a router pairs it only with workers that offer the same kind.
    pub kv_connector: bool,
    /// SGLang: the prefill engine's `--disaggregation-bootstrap-port`, which decode engines fetch KV through.
    pub bootstrap_port: u16,
    /// How fast the engine is, measured earlier by `dynamo profile` (`Engine::profile`).
    pub profile: Option<crate::core::protocol::profile::Profile>,
    /// vLLM with `--data-parallel-size` > 1: the rank this worker fronts. Its KV events come from the
    /// publisher's port + rank (as vLLM offsets each rank's, replay socket too), its load from that rank's
    /// series (label `engine`), and every request is pinned to it (`X-data-parallel-rank`); one worker per rank.
    pub data_parallel_rank: Option<u32>,
}

/// `endpoint` (`tcp://HOST:PORT`) with its port moved up by `rank`, as vLLM places a data-parallel rank's
/// publisher; port 0 (the system's pick) stays.
fn offset_for_rank(endpoint: &str, rank: Option<u32>) -> Result<String, ExternalError> {
    let Some(rank) = rank.filter(|&rank| rank > 0) else { return Ok(endpoint.to_string()) };
    let bad =
        || ExternalError::Settings(format!("{endpoint:?} is not tcp://HOST:PORT, which a rank's port is offset in"));
    let (host, port) = endpoint.rsplit_once(':').filter(|(host, _)| host.starts_with("tcp://")).ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Ok(endpoint.to_string());
    }
    let moved = u16::try_from(u32::from(port) + rank).map_err(|_| bad())?;
    Ok(format!("{host}:{moved}"))
}

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("{0}")]
    Settings(String),
    #[error("the {kind} server at {url} does not answer: {reason}; start it first (or fix --engine-url)")]
    Unreachable { kind: &'static str, url: String, reason: String },
    #[error("the {kind} server at {url}: {reason}")]
    Mismatch { kind: &'static str, url: String, reason: String },
}

/// How often the engine's `/metrics` is read for its load.
const METRICS_INTERVAL: Duration = Duration::from_millis(250);
/// Failed reads in a row that make the engine down: one slow answer from a busy engine's server must not take
/// a healthy engine out of every router (and its clients' requests with it); a dead one refuses at once, so
/// it is down within this many intervals.
const DOWN_AFTER_FAILURES: u32 = 3;
/// How often the engine's `/v1/models` is read again for the LoRA adapters it serves.
const ADAPTERS_INTERVAL: Duration = Duration::from_secs(2);

pub struct ExternalEngine {
    shared: Arc<Shared>,
    profile: Option<Arc<crate::core::protocol::profile::Profile>>,
    _tasks: Vec<crate::core::AbortOnDrop>,
}

pub(crate) struct Shared {
    id: WorkerId,
    kind: ExternalKind,
    http: EngineHttp,
    metrics: EngineHttp,
    metrics_path: String,
    /// The name the engine serves its model under (what each request must say).
    model: String,
    /// Its LoRA adapters (`ServedModel::adapters`): a request under one names it instead of `model`. Read
    /// again every `ADAPTERS_INTERVAL`, since the engine may load and unload them while it serves.
    adapters: std::sync::RwLock<Vec<String>>,
    max_sequence_tokens: usize,
    events: broadcast::Sender<KvEventBatch>,
    /// Recorded before each broadcast, so a snapshot covers what was sent.
    ledger: Mutex<KvLedger>,
    gauges: Mutex<EngineGauges>,
    /// Requests this worker has forwarded and not seen end.
    in_flight: AtomicU32,
    kv_connector: bool,
    bootstrap_port: u16,
    /// The data-parallel rank fronted (`ExternalSettings::data_parallel_rank`): its gauges only.
    rank: Option<u32>,
    alive: AtomicBool,
}

impl Shared {
    fn adapters(&self) -> Vec<String> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the engine's model list again for the adapters it serves now (vLLM's `/v1/load_lora_adapter`
    /// and `/v1/unload_lora_adapter` change them while it runs).
    async fn refresh_adapters(&self) {
        let adapters = match served_model(&self.http, self.kind).await {
            Ok(served) => served.adapters,
            Err(error) => return tracing::debug!("the engine's adapters could not be read again: {error}"),
        };
        let mut held = self.adapters.write().unwrap_or_else(|e| e.into_inner());
        if *held != adapters {
            tracing::info!("the {} engine now serves LoRA adapters {adapters:?} (was {held:?})", self.kind.name());
            *held = adapters;
        }
    }

    fn publish_kv(&self, events: Vec<KvEvent>) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.record(&events);
        // No subscriber yet is no error: the ledger has it for whoever asks.
        let _ = self.events.send(KvEventBatch { worker_id: self.id, events });
    }

    async fn read_gauges(&self) -> Result<EngineGauges, String> {
        let (status, body) = self.metrics.get(&self.metrics_path).await?;
        if !status.is_success() {
            return Err(format!("{}{} answered {status}", self.metrics.base(), self.metrics_path));
        }
        let samples = metrics::Samples::parse(&String::from_utf8_lossy(&body));
        let samples = match self.rank {
            Some(rank) => samples.of_rank(rank),
            None => samples,
        };
        Ok(self.kind.gauges(&samples))
    }
}

impl ExternalEngine {
    /// Connects to the engine: its model and context from `/v1/models`, its KV cache from `/metrics`
    /// (refused if its block size is not `settings.block_size`), then follows its load and KV events.
    pub async fn connect(id: WorkerId, settings: &ExternalSettings) -> Result<Self, ExternalError> {
        let kind = settings.kind.name();
        if settings.data_parallel_rank.is_some() && settings.kind != ExternalKind::Vllm {
            return Err(ExternalError::Settings(format!(
                "--data-parallel-rank is for vLLM's data-parallel engines; {kind} is not one"
            )));
        }
        let http = EngineHttp::new(&settings.url)
            .map_err(|e| ExternalError::Settings(format!("--engine-url {e}")))?
            .pinned_to_rank(settings.data_parallel_rank);
        let (metrics, metrics_path) = match &settings.metrics_url {
            Some(url) => split_url(url)?,
            None => (http.clone(), settings.kind.metrics_path().to_string()),
        };
        let unreachable = |reason: String| ExternalError::Unreachable { kind, url: settings.url.clone(), reason };
        let mismatch = |reason: String| ExternalError::Mismatch { kind, url: settings.url.clone(), reason };
        let served = served_model(&http, settings.kind).await?;
        let shared = Arc::new(Shared {
            id,
            kind: settings.kind,
            http,
            metrics,
            metrics_path,
            model: served.id,
            adapters: std::sync::RwLock::new(served.adapters),
            max_sequence_tokens: served.max_model_len.map_or(usize::MAX, |n| n as usize),
            events: broadcast::channel(4096).0,
            ledger: Mutex::default(),
            gauges: Mutex::default(),
            in_flight: AtomicU32::new(0),
            kv_connector: settings.kv_connector,
            bootstrap_port: settings.bootstrap_port,
            rank: settings.data_parallel_rank,
            alive: AtomicBool::new(true),
        });
        let gauges = shared.read_gauges().await.map_err(|e| {
            let hint = match settings.kind {
                ExternalKind::Sglang => " (SGLang serves them with --enable-metrics)",
                ExternalKind::Vllm | ExternalKind::Trtllm => "",
            };
            unreachable(format!("its metrics{hint}: {e}"))
        })?;
        if let Some(block_size) = gauges.block_size.filter(|&b| b as usize != settings.block_size) {
            return Err(mismatch(format!(
                "it keeps KV in blocks of {block_size} tokens, this worker was told {} (pass --block-size {block_size})",
                settings.block_size
            )));
        }
        *shared.gauges.lock().unwrap_or_else(|e| e.into_inner()) = gauges;
        let mut tasks = vec![
            crate::core::AbortOnDrop(tokio::spawn(watch_load(shared.clone()))),
            crate::core::AbortOnDrop(tokio::spawn(watch_adapters(shared.clone()))),
        ];
        if let Some(endpoint) = &settings.kv_events {
            let sink = shared.clone();
            let publish = move |events| sink.publish_kv(events);
            let task = match endpoint.starts_with("http://") {
                // TensorRT-LLM's are drained by asking (`POST /kv_cache_events`).
                true => {
                    let http =
                        EngineHttp::new(endpoint).map_err(|e| ExternalError::Settings(format!("--kv-events {e}")))?;
                    tokio::spawn(events::poll(http, settings.block_size, publish))
                }
                false => {
                    let rank = settings.data_parallel_rank;
                    let replay = settings.kv_events_replay.as_deref().map(|r| offset_for_rank(r, rank)).transpose()?;
                    let endpoint = offset_for_rank(endpoint, rank)?;
                    tokio::spawn(events::follow(endpoint, replay, settings.block_size, publish))
                }
            };
            tasks.push(crate::core::AbortOnDrop(task));
        }
        Ok(Self { shared, profile: settings.profile.clone().map(Arc::new), _tasks: tasks })
    }

    /// The longest sequence the engine serves (its `max_model_len`; unbounded when it does not say).
    pub fn max_sequence_tokens(&self) -> usize {
        self.shared.max_sequence_tokens
    }
}

/// The model an engine at `url` serves (its name and context), from its `/v1/models`.
pub async fn served_model_at(url: &str, kind: ExternalKind) -> Result<ServedModel, ExternalError> {
    served_model(&EngineHttp::new(url).map_err(|e| ExternalError::Settings(format!("--engine-url {e}")))?, kind).await
}

async fn served_model(http: &EngineHttp, kind: ExternalKind) -> Result<ServedModel, ExternalError> {
    let url = http.base().to_string();
    let (status, body) = http.get("/v1/models").await.map_err(|reason| ExternalError::Unreachable {
        kind: kind.name(),
        url: url.clone(),
        reason,
    })?;
    if !status.is_success() {
        let reason = format!("/v1/models answered {status}");
        return Err(ExternalError::Unreachable { kind: kind.name(), url, reason });
    }
    parse_models(&body).map_err(|reason| ExternalError::Mismatch { kind: kind.name(), url, reason })
}

/// Reads the engine's LoRA adapters again every `ADAPTERS_INTERVAL`.
async fn watch_adapters(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(ADAPTERS_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        shared.refresh_adapters().await;
    }
}

/// Reads the engine's gauges every `METRICS_INTERVAL`; an engine that fails `DOWN_AFTER_FAILURES` reads in a
/// row is not alive until it answers again (a restart), and the routers skip it meanwhile.
async fn watch_load(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(METRICS_INTERVAL);
    let mut failures = 0u32;
    loop {
        tick.tick().await;
        match shared.read_gauges().await {
            Ok(gauges) => {
                failures = 0;
                *shared.gauges.lock().unwrap_or_else(|e| e.into_inner()) = gauges;
                if !shared.alive.swap(true, Ordering::Relaxed) {
                    tracing::warn!("the {} engine at {} answers again", shared.kind.name(), shared.http.base());
                }
            }
            Err(error) => {
                failures += 1;
                if failures < DOWN_AFTER_FAILURES {
                    tracing::debug!(
                        "the {} engine's load could not be read ({failures} in a row): {error}",
                        shared.kind.name()
                    );
                } else if shared.alive.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "the {} engine stopped answering ({failures} reads in a row): {error}",
                        shared.kind.name()
                    );
                }
            }
        }
    }
}

fn split_url(url: &str) -> Result<(EngineHttp, String), ExternalError> {
    let uri: hyper::Uri = url.parse().map_err(|e| ExternalError::Settings(format!("--engine-metrics {url:?}: {e}")))?;
    let path = uri.path_and_query().map_or("/metrics".to_string(), |p| p.as_str().to_string());
    let base = format!("{}://{}", uri.scheme_str().unwrap_or("http"), uri.authority().map_or("", |a| a.as_str()));
    Ok((EngineHttp::new(&base).map_err(|e| ExternalError::Settings(format!("--engine-metrics {e}")))?, path))
}

impl Engine for ExternalEngine {
    fn profile(&self) -> Option<Arc<crate::core::protocol::profile::Profile>> {
        self.profile.clone()
    }

    fn worker_id(&self) -> WorkerId {
        self.shared.id
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        check_fits(&request, self.shared.max_sequence_tokens)?;
        check_adapter(&request, || self.shared.adapters())?;
        if request.pooling.is_some() {
            return Err(EngineError::InvalidRequest(format!(
                "embeddings are not forwarded to {} by this worker yet: serve the embedding model on the native \
                 engine, or ask the engine's own /v1/embeddings",
                self.shared.kind.name()
            )));
        }
        if let Some(why) = self.shared.kind.refuses(&request) {
            return Err(EngineError::InvalidRequest(why));
        }
        if !self.shared.alive.load(Ordering::Relaxed) {
            return Err(EngineError::Stopped);
        }
        let holds = matches!(request.hand_off, HandOff::Hold);
        if holds && !self.shared.kv_connector {
            return Err(EngineError::InvalidRequest(
                "this worker's engine keeps no KV for a peer: only one behind dynamo prefill --engine vllm|sglang|trtllm does"
                    .into(),
            ));
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        let shared = self.shared.clone();
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let closed = sender.clone();
            // A dropped stream ends the forwarding, which drops the response and closes its connection.
            tokio::select! {
                () = async {
                    if holds {
                        handoff::prefill(&shared, request, &sender).await
                    } else {
                        forward(&shared, request, &sender).await
                    }
                } => {}
                () = closed.closed() => {}
            }
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(ResponseStream::new(receiver))
    }

    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch> {
        self.shared.events.subscribe()
    }

    fn device(&self) -> String {
        format!("{} at {}", self.shared.kind.name(), self.shared.http.base())
    }

    /// The engine's own server: it serves this engine alone and takes OpenAI requests as they come (vLLM's and
    /// TensorRT-LLM's; SGLang's too), so an endpoint picker holding it sends a gateway's request straight there.
    fn http_addr(&self) -> Option<String> {
        let host_port = self.shared.http.base().strip_prefix("http://")?.trim_end_matches('/');
        Some(format!("tcp://{host_port}"))
    }

    fn adapters(&self) -> Vec<String> {
        self.shared.adapters()
    }

    fn load(&self) -> LoadMetrics {
        let gauges = *self.shared.gauges.lock().unwrap_or_else(|e| e.into_inner());
        let total = gauges.num_blocks.unwrap_or(0);
        let active = (gauges.kv_usage.clamp(0.0, 1.0) * total as f64).round() as u64;
        let stored = self.shared.ledger.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        // Ours count from the moment a request is sent; the engine's gauges lag by up to a metrics read.
        let in_flight = self.shared.in_flight.load(Ordering::Relaxed);
        let running = gauges.running.max(in_flight.saturating_sub(gauges.waiting));
        LoadMetrics {
            requests_running: running,
            requests_waiting: gauges.waiting,
            kv_active_blocks: active,
            kv_cached_blocks: stored.saturating_sub(active),
            kv_total_blocks: total,
            engine_down: !self.shared.alive.load(Ordering::Relaxed),
            max_running: 0,
            ..LoadMetrics::default()
        }
    }

    fn resend_kv_state(&self) -> bool {
        let ledger = self.shared.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let mut events = vec![KvEvent::Cleared];
        events.extend(ledger.snapshot());
        let _ = self.shared.events.send(KvEventBatch { worker_id: self.shared.id, events });
        true
    }

    fn kv_snapshot(&self) -> Option<Vec<KvEvent>> {
        Some(self.shared.ledger.lock().unwrap_or_else(|e| e.into_inner()).snapshot())
    }

    fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Relaxed)
    }

    fn transfer_addr(&self) -> Option<String> {
        let authority = self.shared.http.base().split_once("://").map_or(self.shared.http.base(), |(_, rest)| rest);
        self.shared.kv_connector.then(|| format!("{}://{authority}", self.shared.kind.name()))
    }
}

/// Sends `request` to the engine and streams what comes back into `sender`. A request the engine refuses, or
/// answers with what this worker cannot read, ends with `FinishReason::Error`; one it loses (unreachable, a 5xx,
/// a stream cut off) ends with no final output, which the worker's request plane turns into a refusal that
/// moves the request, with what it generated so far, to another worker.
async fn forward(shared: &Shared, request: PreprocessedRequest, sender: &mpsc::UnboundedSender<EngineOutput>) {
    let kind = shared.kind.name();
    let failed = |reason: String| {
        let _ =
            sender.send(EngineOutput { finish_reason: Some(FinishReason::Error(reason)), ..EngineOutput::default() });
    };
    let lost =
        |reason: String| tracing::warn!(request = %request.request_id, "the {kind} engine lost a request: {reason}");
    let (path, mut body) = shared.kind.request(&request, &shared.model);
    // KV a prefill worker's engine holds for this request: this engine pulls it (a decode worker without a
    // connector, or KV held otherwise, computes the prompt itself).
    if let HandOff::From(held) = &request.hand_off
        && let (true, Some(params)) = (shared.kv_connector, &held.engine_params)
    {
        handoff::decode_leg(shared.kind, params, &mut body);
    }
    // Lost, not down: whether the engine is down is the load watcher's to say (an overloaded server times out
    // a connection now and then and is still serving).
    let response = match shared.http.post_json(path, &body, &request.request_id).await {
        Ok(response) => response,
        Err(error) => return lost(format!("unreachable: {error}")),
    };
    let status = response.status();
    if !status.is_success() {
        let body = http::read_bounded(response.into_body()).await.unwrap_or_default();
        let message = serde_json::from_slice(&body)
            .map_or_else(|_| String::from_utf8_lossy(&body).chars().take(300).collect(), |json| error_message(&json));
        if status.is_server_error() {
            return lost(format!("it answered {status}: {message}"));
        }
        // The request as asked, not the engine, is at fault: the client's to change (a 400), not to retry.
        let reason = format!("the {kind} engine refused the request ({status}): {message}");
        let _ =
            sender.send(EngineOutput { finish_reason: Some(FinishReason::Invalid(reason)), ..EngineOutput::default() });
        return;
    }
    let mut stream = EventStream::new(response.into_body());
    let logprobs = request.logprobs.is_some();
    // The last tokens are held until the usage chunk after them says how many prompt tokens were cached.
    let mut last: Option<EngineOutput> = None;
    let mut delivered = 0;
    let mut cached_said = false;
    loop {
        let data = match stream.next().await {
            Ok(Some(data)) if data.trim() == "[DONE]" => break,
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(error) => return lost(error),
        };
        let delta = match shared.kind.parse(&data, logprobs, delivered) {
            Ok(delta) => delta,
            Err(error) => return failed(error),
        };
        if delta.usage {
            if let Some(last) = last.as_mut() {
                last.cached_tokens = delta.cached_tokens;
            }
            continue;
        }
        delivered += delta.token_ids.len();
        // Engines that say it on every chunk (SGLang) say it once here.
        let cached_tokens = delta.cached_tokens.filter(|_| !std::mem::replace(&mut cached_said, true));
        let output = EngineOutput {
            token_ids: delta.token_ids,
            logprobs: delta.logprobs,
            finish_reason: delta.finish_reason,
            cached_tokens,
            ..EngineOutput::default()
        };
        if output.finish_reason.is_some() {
            last = Some(output);
        } else if !output.token_ids.is_empty() && sender.send(output).is_err() {
            return;
        }
    }
    match last {
        Some(last) => {
            let _ = sender.send(last);
        }
        None => lost("its stream ended before the request finished".into()),
    }
}
