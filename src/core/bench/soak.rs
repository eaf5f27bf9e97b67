//! `dynamo bench soak`: a hostile mixed load on a real `dynamo route` with mocker workers in their own
//! processes, for minutes: valid requests (streamed and not), invalid and hostile ones (bad fields, no API
//! key, oversized bodies, the wrong content type, too many choices, prompts far past the context), clients
//! that disconnect mid-stream, and workers killed with SIGKILL and replaced while it runs.
//!
//! It counts requests served, refused with the status they should get, lost (a valid request that did not
//! complete: the goal is none, since migration hides a killed worker), and answered with any other status;
//! and the router's resident memory and open file descriptors after the warm-up and at the end (goal: flat
//! within 10 %; the reference is the same process at the start of the run).
use super::percentile;
use super::processes::{ProcessError, drain, router_address, spawn_until};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

#[derive(Debug, Clone)]
pub struct SoakSettings {
    /// The `dynamo` binary to start the router and workers from.
    pub binary: PathBuf,
    pub duration: Duration,
    pub workers: usize,
    /// Requests started per second, of every kind.
    pub rate: f64,
    /// A worker is killed and replaced this often.
    pub kill_every: Duration,
    pub speedup: f64,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot prepare the run's directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
}

const API_KEY: &str = "sk-soak";
/// The router's body limit in this run: small, so an oversized body fits the socket buffers and its 413 is
/// read rather than lost to a reset.
const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// A request that takes longer than this counts as lost (valid) or unexpected (hostile).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    ChatStream,
    Completion,
    Disconnect,
    BadField,
    NoKey,
    Oversized,
    WrongType,
    TooManyChoices,
    HugePrompt,
}

impl Kind {
    /// Each kind's share of the load, out of 100.
    const MIX: [(Kind, u32); 9] = [
        (Kind::ChatStream, 40),
        (Kind::Completion, 20),
        (Kind::Disconnect, 10),
        (Kind::BadField, 6),
        (Kind::NoKey, 6),
        (Kind::Oversized, 4),
        (Kind::WrongType, 6),
        (Kind::TooManyChoices, 4),
        (Kind::HugePrompt, 4),
    ];

    fn pick(rng: &mut StdRng) -> Kind {
        let mut roll = rng.random_range(0..100);
        for (kind, share) in Self::MIX {
            if roll < share {
                return kind;
            }
            roll -= share;
        }
        Kind::ChatStream
    }

    /// The status a correct server answers with.
    fn expected(self) -> u16 {
        match self {
            Kind::ChatStream | Kind::Completion | Kind::Disconnect => 200,
            Kind::BadField | Kind::TooManyChoices | Kind::HugePrompt => 400,
            Kind::NoKey => 401,
            Kind::Oversized => 413,
            Kind::WrongType => 415,
        }
    }

    fn valid(self) -> bool {
        self.expected() == 200
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindResult {
    pub kind: Option<Kind>,
    pub sent: usize,
    pub as_expected: usize,
    pub other: usize,
    /// The first answer that was not what this kind should get.
    pub first_other: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    pub seconds: f64,
    pub requests: usize,
    pub served: usize,
    pub disconnected: usize,
    pub refused_as_expected: usize,
    /// Valid requests that did not complete.
    pub lost: usize,
    /// Hostile requests answered with another status than the one they should get.
    pub wrong_status: usize,
    pub worker_kills: usize,
    pub valid_p50_ms: f64,
    pub valid_p99_ms: f64,
    pub rss_mib_start: f64,
    pub rss_mib_end: f64,
    pub rss_ratio: f64,
    pub fds_start: usize,
    pub fds_end: usize,
    pub kinds: Vec<KindResult>,
}

/// The processes of the run; killed when dropped.
struct Cluster {
    binary: PathBuf,
    cluster_file: PathBuf,
    speedup: f64,
    router: Child,
    workers: Vec<Child>,
}

impl Cluster {
    async fn start(settings: &SoakSettings, dir: &Path) -> Result<(Self, String), SoakError> {
        let cluster_file = dir.join("cluster.toml");
        let discovery = format!("file:{}", cluster_file.display());
        let mut router = Command::new(&settings.binary);
        router.args(["route", "--http-port", "0", "--discovery", &discovery, "--namespace", "soak"]);
        router.args(["--api-key", API_KEY, "--max-request-bytes", &MAX_REQUEST_BYTES.to_string()]);
        let (router, output) = spawn_until(&mut router, "router on http://", "the router").await?;
        let mut cluster = Cluster {
            binary: settings.binary.clone(),
            cluster_file,
            speedup: settings.speedup,
            router,
            workers: vec![],
        };
        for _ in 0..settings.workers {
            let worker = cluster.start_worker().await?;
            cluster.workers.push(worker);
        }
        Ok((cluster, router_address(output).await?))
    }

    async fn start_worker(&self) -> Result<Child, SoakError> {
        let discovery = format!("file:{}", self.cluster_file.display());
        let mut worker = Command::new(&self.binary);
        worker.args(["decode", "--engine", "mocker", "--discovery", &discovery, "--namespace", "soak"]);
        worker.args(["--speedup", &self.speedup.to_string()]);
        let (worker, output) = spawn_until(&mut worker, "decode worker", "a worker").await?;
        drain(output);
        Ok(worker)
    }

    /// SIGKILLs one worker and starts another in its place.
    async fn kill_one(&mut self, rng: &mut StdRng) -> Result<(), SoakError> {
        if self.workers.is_empty() {
            return Ok(());
        }
        let index = rng.random_range(0..self.workers.len());
        let mut victim = self.workers.swap_remove(index);
        let _ = victim.kill().await;
        let worker = self.start_worker().await?;
        self.workers.push(worker);
        Ok(())
    }
}

/// One request's outcome: the status (0 when the connection failed) and whether a valid one completed.
struct Outcome {
    kind: Kind,
    status: u16,
    complete: bool,
    millis: f64,
    detail: String,
}

#[derive(Clone)]
struct SoakClient {
    http: Client<HttpConnector, Full<Bytes>>,
    base: Arc<str>,
}

impl SoakClient {
    async fn send(&self, kind: Kind, rng_word: u64) -> Outcome {
        let start = Instant::now();
        let (path, content_type, key, body) = request_for(kind, rng_word);
        let mut request = hyper::Request::post(format!("{}{path}", self.base)).header("content-type", content_type);
        if key {
            request = request.header("authorization", format!("Bearer {API_KEY}"));
        }
        let outcome = async {
            let request = request.body(Full::new(Bytes::from(body))).map_err(|e| (0, e.to_string()))?;
            let response = self.http.request(request).await.map_err(|e| (0, e.to_string()))?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            if kind == Kind::Disconnect && status == 200 {
                // Read the first chunk and hang up.
                let first = body.frame().await;
                return Ok((status, first.is_some_and(|f| f.is_ok()), String::new()));
            }
            let bytes = body.collect().await.map_err(|e| (status, e.to_string()))?.to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let complete = match kind {
                Kind::ChatStream => text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\""),
                Kind::Completion => serde_json::from_slice::<serde_json::Value>(&bytes)
                    .is_ok_and(|v| v["choices"][0]["finish_reason"].is_string()),
                _ => true,
            };
            Ok((status, complete, text.chars().take(200).collect()))
        };
        let (status, complete, detail) = match tokio::time::timeout(REQUEST_TIMEOUT, outcome).await {
            Ok(Ok(done)) => done,
            Ok(Err((status, error))) => (status, false, error),
            Err(_) => (0, false, format!("no answer within {REQUEST_TIMEOUT:?}")),
        };
        Outcome { kind, status, complete, millis: start.elapsed().as_secs_f64() * 1e3, detail }
    }
}

/// Path, content type, whether the API key is sent, and the body of one request of `kind`.
fn request_for(kind: Kind, word: u64) -> (&'static str, &'static str, bool, Vec<u8>) {
    let json = "application/json";
    let chat = |extra: serde_json::Value| {
        let mut body = serde_json::json!({
            "messages": [{"role": "user", "content": format!("Tell me about the number {}.", word % 1000)}],
            "max_tokens": 16 + word % 48,
            "stream": true,
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        serde_json::to_vec(&body).unwrap_or_default()
    };
    match kind {
        Kind::ChatStream | Kind::Disconnect => ("/v1/chat/completions", json, true, chat(serde_json::json!({}))),
        Kind::Completion => {
            let body =
                serde_json::json!({"prompt": format!("Once upon a time {}", word % 977), "max_tokens": 8 + word % 24});
            ("/v1/completions", json, true, serde_json::to_vec(&body).unwrap_or_default())
        }
        Kind::BadField => ("/v1/chat/completions", json, true, chat(serde_json::json!({"temperature": -3}))),
        Kind::NoKey => ("/v1/chat/completions", json, false, chat(serde_json::json!({}))),
        Kind::Oversized => ("/v1/completions", json, true, vec![b' '; MAX_REQUEST_BYTES + 4096]),
        Kind::WrongType => ("/v1/completions", "text/plain", true, br#"{"prompt": "Hi"}"#.to_vec()),
        Kind::TooManyChoices => {
            let body = serde_json::json!({"prompt": vec!["a"; 64], "n": 128, "max_tokens": 1});
            ("/v1/completions", json, true, serde_json::to_vec(&body).unwrap_or_default())
        }
        Kind::HugePrompt => {
            let body = serde_json::json!({"prompt": "lorem ipsum ".repeat(20_000), "max_tokens": 1});
            ("/v1/completions", json, true, serde_json::to_vec(&body).unwrap_or_default())
        }
    }
}

/// Resident memory (MiB) and open file descriptors of a process.
fn footprint(pid: u32) -> (f64, usize) {
    let rss = crate::core::telemetry::resident_bytes(pid).map_or(f64::NAN, |bytes| bytes as f64);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss / (1 << 20) as f64, fds)
}

pub async fn run(settings: SoakSettings) -> Result<SoakResult, SoakError> {
    let dir = std::env::temp_dir().join(format!("dynamo-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| SoakError::Dir { path: dir.clone(), source })?;
    let result = soak(&settings, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn soak(settings: &SoakSettings, dir: &Path) -> Result<SoakResult, SoakError> {
    let (cluster, base) = Cluster::start(settings, dir).await?;
    let router_pid = cluster.router.id().unwrap_or(0);
    let cluster = Arc::new(Mutex::new(cluster));
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = SoakClient {
        http: Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build(connector),
        base: base.into(),
    };
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let warm_up = (settings.duration / 5).min(Duration::from_secs(30));
    let start = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / settings.rate.max(1e-3)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_kill = start + settings.kill_every;
    let mut kills = 0;
    let mut tasks = Vec::new();
    let mut first_footprint = None;
    while start.elapsed() < settings.duration {
        ticks.tick().await;
        if first_footprint.is_none() && start.elapsed() >= warm_up {
            first_footprint = Some(footprint(router_pid));
        }
        if Instant::now() >= next_kill {
            next_kill += settings.kill_every;
            let (cluster, seed) = (cluster.clone(), rng.random::<u64>());
            kills += 1;
            // Off the load loop: a replacement worker takes a moment to start.
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed);
                if let Err(error) = cluster.lock().await.kill_one(&mut rng).await {
                    tracing::warn!("soak: {error}");
                }
            });
        }
        let (client, kind, word) = (client.clone(), Kind::pick(&mut rng), rng.random::<u64>());
        tasks.push(tokio::spawn(async move { client.send(kind, word).await }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(outcome) = task.await {
            outcomes.push(outcome);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let (rss_start, fds_start) = first_footprint.unwrap_or_else(|| footprint(router_pid));
    let (rss_end, fds_end) = footprint(router_pid);
    drop(cluster);
    Ok(summarize(outcomes, seconds, kills, (rss_start, fds_start), (rss_end, fds_end)))
}

fn summarize(
    outcomes: Vec<Outcome>,
    seconds: f64,
    worker_kills: usize,
    (rss_mib_start, fds_start): (f64, usize),
    (rss_mib_end, fds_end): (f64, usize),
) -> SoakResult {
    let mut kinds: Vec<KindResult> =
        Kind::MIX.iter().map(|&(kind, _)| KindResult { kind: Some(kind), ..KindResult::default() }).collect();
    let mut valid_ms = Vec::new();
    let (mut served, mut disconnected, mut refused, mut lost, mut wrong) = (0, 0, 0, 0, 0);
    for outcome in &outcomes {
        let Some(slot) = kinds.iter_mut().find(|k| k.kind == Some(outcome.kind)) else { continue };
        slot.sent += 1;
        let right = outcome.status == outcome.kind.expected() && outcome.complete;
        if right {
            slot.as_expected += 1;
        } else {
            slot.other += 1;
            slot.first_other.get_or_insert_with(|| format!("HTTP {}: {}", outcome.status, outcome.detail));
        }
        match (outcome.kind, right) {
            (Kind::Disconnect, true) => disconnected += 1,
            (kind, true) if kind.valid() => {
                served += 1;
                valid_ms.push(outcome.millis);
            }
            (kind, false) if kind.valid() => lost += 1,
            (_, true) => refused += 1,
            (_, false) => wrong += 1,
        }
    }
    valid_ms.sort_by(f64::total_cmp);
    SoakResult {
        seconds,
        requests: outcomes.len(),
        served,
        disconnected,
        refused_as_expected: refused,
        lost,
        wrong_status: wrong,
        worker_kills,
        valid_p50_ms: percentile(&valid_ms, 0.5),
        valid_p99_ms: percentile(&valid_ms, 0.99),
        rss_mib_start,
        rss_mib_end,
        rss_ratio: rss_mib_end / rss_mib_start,
        fds_start,
        fds_end,
        kinds,
    }
}

/// The readable report `dynamo bench soak` prints.
pub fn table(result: &SoakResult) -> String {
    let mut out =
        format!("{:<18} {:>7} {:>12} {:>7}  first unexpected answer\n", "kind", "sent", "as expected", "other");
    for k in &result.kinds {
        let name = k.kind.map(|kind| format!("{kind:?}")).unwrap_or_default();
        let first = k.first_other.as_deref().unwrap_or("");
        out.push_str(&format!("{name:<18} {:>7} {:>12} {:>7}  {first}\n", k.sent, k.as_expected, k.other));
    }
    out.push_str(&format!(
        "{} requests in {:.0} s: {} served, {} disconnected on purpose, {} refused with the right status, {} \
         LOST, {} with a wrong status; {} workers killed\n",
        result.requests,
        result.seconds,
        result.served,
        result.disconnected,
        result.refused_as_expected,
        result.lost,
        result.wrong_status,
        result.worker_kills
    ));
    out.push_str(&format!(
        "valid requests p50 {:.1} ms, p99 {:.1} ms; router RSS {:.1} -> {:.1} MiB ({:.2}x the start), fds {} -> {}\n",
        result.valid_p50_ms,
        result.valid_p99_ms,
        result.rss_mib_start,
        result.rss_mib_end,
        result.rss_ratio,
        result.fds_start,
        result.fds_end
    ));
    out
}
