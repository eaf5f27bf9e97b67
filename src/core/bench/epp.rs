//! `dynamo bench epp`: the endpoint picker's picks through Envoy's ext_proc stream (a gateway client in the
//! same process, h2c, one HTTP/2 connection as Envoy keeps, a stream per request) against the same picks
//! called on the router directly (`FrontendState::pick`: parse, template, tokenize, choose), at the same
//! open-loop rate, alternating rounds. The difference is what the picker adds: gRPC framing, the stream,
//! the body sent back. The client shares the machine with the server, so it is an upper bound.
use super::{Load, RunStats, drive};
use crate::core::engine::Engine;
use crate::core::epp::gateway::{self, Gateway};
use crate::core::epp::{ExternalProcessor, Pick, PickRequest, Picker, Refusal};
use crate::core::frontend::FrontendState;
use crate::core::run::{self, RunError, RunSettings};
use futures::future::BoxFuture;
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct EppBenchSettings {
    pub stack: RunSettings,
    /// Picks started per second.
    pub rate: f64,
    pub picks: usize,
    pub rounds: usize,
    /// Words of each prompt (distinct prompts share prefixes, as conversations do).
    pub prompt_words: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EppResult {
    pub rate: f64,
    /// The median round of each path (by p99).
    pub direct: RunStats,
    pub grpc: RunStats,
    /// What the picker adds to a pick, medians over rounds, µs.
    pub added_p50_us: f64,
    pub added_p99_us: f64,
    /// gRPC p50 over direct p50, median over rounds.
    pub ratio_p50: f64,
    /// CPU time of the whole process (client, server, workers) per pick, µs, medians over rounds: what the
    /// picker costs apart from waiting.
    pub direct_cpu_us_per_pick: Option<f64>,
    pub grpc_cpu_us_per_pick: Option<f64>,
    pub rounds: usize,
}

/// Every in-process worker is eligible, "served" at an address of its own (the bench has no model servers).
fn eligible(engine: &dyn Engine) -> Option<String> {
    Some(format!("worker-{:016x}:8000", engine.worker_id()))
}

/// The router's pick, called directly.
struct Direct(Arc<FrontendState>);

impl Picker for Direct {
    fn pick(&self, request: PickRequest) -> BoxFuture<'static, Result<Pick, Refusal>> {
        let state = self.0.clone();
        Box::pin(async move {
            match state.pick(&request.path, request.body, eligible).await {
                Ok(picked) => {
                    Ok(Pick { endpoint: picked.endpoint, headers: Vec::new(), held: Box::new(picked.choice) })
                }
                Err(error) => Err(Refusal::from(error)),
            }
        })
    }
}

pub async fn run(settings: EppBenchSettings) -> Result<EppResult, RunError> {
    let state = run::build(&settings.stack, false)?;
    let picker: Arc<dyn Picker> = Arc::new(Direct(state.clone()));
    let bodies: Arc<Vec<bytes::Bytes>> = Arc::new((0..64).map(|at| body(at, settings.prompt_words)).collect());

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.map_err(io)?;
    let address = listener.local_addr().map_err(io)?;
    let processor = ExternalProcessor::new(picker.clone(), 1 << 20);
    let server = crate::core::AbortOnDrop(tokio::spawn(async move {
        let _ = crate::core::epp::serve(listener, processor, None, std::future::pending()).await;
    }));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| io(std::io::Error::other(e)))?;
    let gateway = Gateway::connect(endpoint).await.map_err(|e| io(std::io::Error::other(e)))?;

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let direct_pick = {
        let (picker, bodies, next) = (picker.clone(), bodies.clone(), next.clone());
        move || {
            let body = bodies[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % bodies.len()].clone();
            let request =
                PickRequest { path: "/v1/completions".into(), headers: Default::default(), body, subset: None };
            let picked = picker.pick(request);
            Box::pin(async move { picked.await.map(drop).map_err(|r| String::from_utf8_lossy(&r.body).into_owned()) })
                as BoxFuture<'static, Result<(), String>>
        }
    };
    let grpc_pick = {
        let (gateway, bodies, next) = (gateway.clone(), bodies.clone(), next.clone());
        move || {
            let body = bodies[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % bodies.len()].clone();
            let gateway = gateway.clone();
            Box::pin(async move {
                let answer = gateway.exchange(gateway::post("/v1/completions", &body, None)).await;
                match answer {
                    Ok(answer) if gateway::destination(&answer).is_some() => Ok(()),
                    Ok(answer) => Err(format!("not a pick: {answer:?}")),
                    Err(status) => Err(status.to_string()),
                }
            }) as BoxFuture<'static, Result<(), String>>
        }
    };
    // Warm both paths (the tokenizer's caches, the connection) before anything is timed.
    drive(Load::Concurrency(8), 200, direct_pick.clone()).await;
    drive(Load::Concurrency(8), 200, grpc_pick.clone()).await;
    let load = Load::Rate(settings.rate);
    let mut rounds = Vec::new();
    let mut cpu = (Vec::new(), Vec::new());
    let per_pick =
        |before: Option<f64>, picks: usize| Some((super::process_cpu_seconds()? - before?) * 1e6 / picks.max(1) as f64);
    for _ in 0..settings.rounds.max(1) {
        let before = super::process_cpu_seconds();
        let direct = drive(load, settings.picks, direct_pick.clone()).await;
        cpu.0.extend(per_pick(before, settings.picks));
        let before = super::process_cpu_seconds();
        let grpc = drive(load, settings.picks, grpc_pick.clone()).await;
        cpu.1.extend(per_pick(before, settings.picks));
        rounds.push((direct, grpc));
    }
    drop(server);
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (direct_cpu_us_per_pick, grpc_cpu_us_per_pick) =
        ((!cpu.0.is_empty()).then(|| median(cpu.0.clone())), (!cpu.1.is_empty()).then(|| median(cpu.1.clone())));
    let added_p50_us = median(rounds.iter().map(|(d, g)| (g.p50_ms - d.p50_ms) * 1e3).collect());
    let added_p99_us = median(rounds.iter().map(|(d, g)| (g.p99_ms - d.p99_ms) * 1e3).collect());
    let ratio_p50 = median(rounds.iter().map(|(d, g)| g.p50_ms / d.p50_ms.max(1e-9)).collect());
    let by_p99 = |pick: fn(&(RunStats, RunStats)) -> &RunStats| {
        let mut stats: Vec<RunStats> = rounds.iter().map(|r| *pick(r)).collect();
        stats.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
        stats[stats.len() / 2]
    };
    let (direct, grpc) = (by_p99(|r| &r.0), by_p99(|r| &r.1));
    Ok(EppResult {
        rate: settings.rate,
        direct,
        grpc,
        added_p50_us,
        added_p99_us,
        ratio_p50,
        direct_cpu_us_per_pick,
        grpc_cpu_us_per_pick,
        rounds: rounds.len(),
    })
}

fn io(error: std::io::Error) -> RunError {
    RunError::Serve(crate::core::frontend::ServeError::Serve(error))
}

/// A completion request whose prompt shares its first half with every eighth other one.
fn body(at: usize, words: usize) -> bytes::Bytes {
    let shared = format!("Conversation {} about the sea and its lights at night. ", at % 8).repeat(words / 20 + 1);
    let own = format!(" Question {at}: what did the lighthouse keeper see?");
    let prompt: String = shared.split_whitespace().take(words.saturating_sub(8)).collect::<Vec<_>>().join(" ") + &own;
    let body = serde_json::json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 16});
    bytes::Bytes::from(body.to_string())
}

/// The result as a table.
pub fn table(result: &EppResult) -> String {
    format!(
        "path     picks/s   p50 µs   p99 µs  errors\n\
         direct  {:>8.0} {:>8.0} {:>8.0} {:>7}\n\
         grpc    {:>8.0} {:>8.0} {:>8.0} {:>7}\n\
         the picker adds {:.0} µs at p50 and {:.0} µs at p99 (gRPC over direct p50: {:.2}x; medians of {} rounds at {} picks/s)\n\
         CPU per pick, the whole process: direct {}, grpc {}\n",
        result.direct.requests_per_s,
        result.direct.p50_ms * 1e3,
        result.direct.p99_ms * 1e3,
        result.direct.errors,
        result.grpc.requests_per_s,
        result.grpc.p50_ms * 1e3,
        result.grpc.p99_ms * 1e3,
        result.grpc.errors,
        result.added_p50_us,
        result.added_p99_us,
        result.ratio_p50,
        result.rounds,
        result.rate,
        cpu(result.direct_cpu_us_per_pick),
        cpu(result.grpc_cpu_us_per_pick),
    )
}

fn cpu(us: Option<f64>) -> String {
    us.map_or_else(|| "unknown".into(), |us| format!("{us:.0} µs"))
}
