//! `dynamo bench disagg`: aggregated against disaggregated serving on a replayed trace, at the same number of
//! simulated GPUs, in one run.
//!
//! Three set-ups of mocker workers, each fresh: `aggregated` (every GPU a decode worker that prefills too),
//! `disaggregated` (prefill workers take every prompt, whatever their queue) and `conditional` (prompts whose
//! uncached part is under the threshold stay on the decode worker, as do those whose KV would take longer to
//! move than the ITL budget allows for their answer's length, and all while every prefill worker is at its
//! queue limit). Prefill and decode time come from the mocker's fitted model; moving a prompt's KV
//! takes its bytes over the given bandwidth (the mockers' `SimulatedKv`, through real transfer agents on
//! loopback that move no bytes). Measured in simulated time: TTFT and ITL
//! percentiles, and goodput: requests per second that met both the TTFT target and the ITL target.
//!
//! ITL is each request's mean gap between tokens (what vLLM's benchmark calls TPOT), not single gaps: at a
//! speedup, the mockers' sleeps are rounded to the timer's millisecond and tokens arrive in bursts, so one
//! gap says little, while their mean over a request is the simulated time.
use super::route::{Judged, Pace, Replayed, judge, replay};
use super::trace::TraceRequest;
use crate::core::engine::Engine;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::handoff::{HandOffEngine, HandOffError};
use crate::core::router::{Pool, Router, RouterConfig};
use crate::core::transfer::AgentSettings;
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct DisaggBenchSettings {
    /// Simulated GPUs, one worker each, in every set-up.
    pub gpus: usize,
    /// Of those, prefill workers in the disaggregated set-ups.
    pub prefill_gpus: usize,
    /// `conditional`'s --disagg-threshold (tokens).
    pub threshold: usize,
    /// `conditional`'s --prefill-queue-limit.
    pub queue_limit: usize,
    /// `conditional`'s --disagg-itl-budget-ms, in simulated time.
    pub itl_budget: Option<std::time::Duration>,
    /// Every worker's mocker: its scheduler, speedup and what moving its KV costs.
    pub mocker: MockerConfig,
    /// Tokens per trace block id.
    pub block_tokens: usize,
    pub ttft_target_ms: f64,
    pub itl_target_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetupResult {
    pub setup: &'static str,
    pub prefill_workers: usize,
    pub decode_workers: usize,
    pub requests: usize,
    pub errors: usize,
    /// Prompts whose KV a decode worker read from a prefill worker, over all requests.
    pub remote_share: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
    pub itl_p99_ms: f64,
    /// Requests per simulated second that met both targets.
    pub goodput_rps: f64,
    /// Share of requests that met both targets.
    pub goodput_share: f64,
}

pub async fn run(trace: &[TraceRequest], settings: &DisaggBenchSettings) -> Result<Vec<SetupResult>, HandOffError> {
    let split = settings.prefill_gpus.min(settings.gpus.saturating_sub(1));
    let always = Decision { threshold: 0, queue_limit: usize::MAX / 2, itl_budget: None };
    let conditional = Decision {
        threshold: settings.threshold,
        queue_limit: settings.queue_limit,
        itl_budget: settings.itl_budget.map(|budget| budget.div_f64(settings.mocker.speedup)),
    };
    Ok(vec![
        run_setup(trace, settings, "aggregated", 0, always).await?,
        run_setup(trace, settings, "disaggregated", split, always).await?,
        run_setup(trace, settings, "conditional", split, conditional).await?,
    ])
}

/// How a set-up's router decides where prompts are prefilled (`RouterConfig`'s fields of the same names).
#[derive(Clone, Copy)]
struct Decision {
    threshold: usize,
    queue_limit: usize,
    /// In real time.
    itl_budget: Option<std::time::Duration>,
}

async fn run_setup(
    trace: &[TraceRequest],
    settings: &DisaggBenchSettings,
    setup: &'static str,
    prefill_workers: usize,
    decision: Decision,
) -> Result<SetupResult, HandOffError> {
    let config = &settings.mocker;
    let speedup = config.speedup;
    let vocab: Arc<[u32]> = (0..32_000).collect();
    let engines: Vec<Arc<dyn Engine>> = (0..settings.gpus.max(1))
        .map(|id| {
            let mocker: Arc<dyn Engine> = Arc::new(MockerEngine::spawn(id as u64, config.clone(), vocab.clone()));
            Ok(match prefill_workers {
                0 => mocker,
                _ => Arc::new(HandOffEngine::start(mocker, AgentSettings::loopback(None))?),
            })
        })
        .collect::<Result<_, HandOffError>>()?;
    let mut decode = engines;
    let prefill = decode.split_off(decode.len() - prefill_workers);
    let router_config = RouterConfig {
        busy_threshold: usize::MAX / 2,
        block_size: config.scheduler.block_size,
        disagg_threshold: decision.threshold,
        prefill_queue_limit: decision.queue_limit,
        disagg_itl_budget: decision.itl_budget,
        ..RouterConfig::default()
    };
    let router = Arc::new(Router::new(decode.clone(), router_config));
    prefill.iter().for_each(|engine| router.add_worker(engine.clone(), Pool::Prefill));
    let Replayed { outcomes, errors, elapsed_s } =
        replay(trace, &router, speedup, settings.block_tokens, Pace::Timestamps, None).await;
    let Judged { ttfts, itls, good } = judge(&outcomes, speedup, settings.ttft_target_ms, settings.itl_target_ms);
    let read: u64 = decode.iter().filter_map(|e| e.kv_transfers()).map(|t| t.read).sum();
    let requests = outcomes.len() + errors;
    Ok(SetupResult {
        setup,
        prefill_workers,
        decode_workers: decode.len(),
        requests: outcomes.len(),
        errors,
        remote_share: read as f64 / requests.max(1) as f64,
        ttft_p50_ms: super::percentile(&ttfts, 0.5),
        ttft_p90_ms: super::percentile(&ttfts, 0.9),
        ttft_p99_ms: super::percentile(&ttfts, 0.99),
        itl_p50_ms: super::percentile(&itls, 0.5),
        itl_p90_ms: super::percentile(&itls, 0.9),
        itl_p99_ms: super::percentile(&itls, 0.99),
        goodput_rps: good as f64 / (elapsed_s * speedup).max(1e-9),
        goodput_share: good as f64 / requests.max(1) as f64,
    })
}

/// The readable report of `dynamo bench disagg`.
pub fn table(results: &[SetupResult]) -> String {
    let mut out = format!(
        "{:<14} {:>5} {:>8} {:>7} {:>17} {:>17} {:>17} {:>17} {:>12}\n",
        "setup",
        "P+D",
        "requests",
        "remote",
        "TTFT p50/p90 ms",
        "TTFT p99 ms",
        "ITL p50/p90 ms",
        "ITL p99 ms",
        "goodput"
    );
    for r in results {
        out.push_str(&format!(
            "{:<14} {:>5} {:>8} {:>6.0}% {:>8.0}/{:<8.0} {:>17.0} {:>8.1}/{:<8.1} {:>17.1} {:>6.2} r/s {:>3.0}%\n",
            r.setup,
            format!("{}+{}", r.prefill_workers, r.decode_workers),
            r.requests,
            r.remote_share * 100.0,
            r.ttft_p50_ms,
            r.ttft_p90_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p90_ms,
            r.itl_p99_ms,
            r.goodput_rps,
            r.goodput_share * 100.0
        ));
        if r.errors > 0 {
            out.push_str(&format!("  ! {} requests failed\n", r.errors));
        }
    }
    out
}

/// The end-to-end comparison on a real engine (`dynamo bench disagg-native`): the same workers in one
/// process, all decoding (aggregated) or some only prefilling, under a closed loop of long and short prompts.
#[derive(Debug, Clone)]
pub struct NativeDisaggSettings {
    pub model: crate::core::model::ModelSource,
    pub engine: crate::core::engine::EngineSettings,
    pub workers: usize,
    pub prefill_workers: usize,
    pub requests: usize,
    pub concurrency: usize,
    pub long_tokens: usize,
    pub short_tokens: usize,
    /// Every this many requests, one has a long prompt.
    pub long_every: usize,
    pub max_tokens: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct NativeSetupResult {
    pub setup: &'static str,
    pub prefill_workers: usize,
    pub decode_workers: usize,
    pub requests: usize,
    pub errors: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    /// Over the short prompts only: what a long prompt in the same batch costs them.
    pub short_ttft_p90_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
    pub output_tokens_per_s: f64,
}

/// One request's timings (real time).
struct Timing {
    long: bool,
    ttft_ms: f64,
    itl_ms: Option<f64>,
    tokens: usize,
}

pub async fn run_native(settings: &NativeDisaggSettings) -> Result<Vec<NativeSetupResult>, crate::core::run::RunError> {
    let split = settings.prefill_workers.min(settings.workers.saturating_sub(1));
    Ok(vec![
        run_native_setup(settings, "aggregated", 0).await?,
        run_native_setup(settings, "disaggregated", split).await?,
    ])
}

async fn run_native_setup(
    settings: &NativeDisaggSettings,
    setup: &'static str,
    prefill_workers: usize,
) -> Result<NativeSetupResult, crate::core::run::RunError> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    let run = crate::core::run::RunSettings {
        model: settings.model.clone(),
        model_options: Default::default(),
        workers: settings.workers.max(1) - prefill_workers,
        prefill_workers,
        encode_workers: 0,
        engine: settings.engine.clone(),
        router: RouterConfig { busy_threshold: usize::MAX / 2, ..RouterConfig::default() },
        listen: ([127, 0, 0, 1], 0).into(),
        http: Default::default(),
    };
    let router = crate::core::run::build(&run, false)?.first().router;
    let timings = Arc::new(Mutex::new(Vec::with_capacity(settings.requests)));
    let next = Arc::new(AtomicUsize::new(0));
    let (long, short, every, max_tokens) =
        (settings.long_tokens, settings.short_tokens, settings.long_every.max(1), settings.max_tokens);
    let started = Instant::now();
    let recorded = timings.clone();
    let stats = super::drive(super::Load::Concurrency(settings.concurrency), settings.requests, move || {
        let (router, timings) = (router.clone(), recorded.clone());
        let i = next.fetch_add(1, Ordering::Relaxed);
        async move {
            let is_long = i.is_multiple_of(every);
            // Each prompt its own, so no request finds another's KV cached.
            let length = if is_long { long } else { short };
            let prompt = (0..length).map(|p| 3 + ((i * 7919 + p * 104_729) % 30_000) as u32).collect();
            let request = crate::core::protocol::PreprocessedRequest::greedy(format!("mix-{i}"), prompt, max_tokens);
            let start = Instant::now();
            let mut stream = router.route_migrating(request).await.map_err(|e| e.to_string())?;
            let first = futures::StreamExt::next(&mut stream).await.ok_or("no output")?;
            let ttft = start.elapsed();
            let mut tokens = first.token_ids.len();
            while let Some(output) = futures::StreamExt::next(&mut stream).await {
                tokens += output.token_ids.len();
            }
            let rest = start.elapsed() - ttft;
            let itl_ms = (tokens > 1).then(|| rest.as_secs_f64() * 1e3 / (tokens - 1) as f64);
            let timing = Timing { long: is_long, ttft_ms: ttft.as_secs_f64() * 1e3, itl_ms, tokens };
            timings.lock().unwrap_or_else(|p| p.into_inner()).push(timing);
            Ok(())
        }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let timings = std::mem::take(&mut *timings.lock().unwrap_or_else(|p| p.into_inner()));
    let sorted = |values: Vec<f64>| {
        let mut values = values;
        values.sort_by(f64::total_cmp);
        values
    };
    let ttfts = sorted(timings.iter().map(|t| t.ttft_ms).collect());
    let short_ttfts = sorted(timings.iter().filter(|t| !t.long).map(|t| t.ttft_ms).collect());
    let itls = sorted(timings.iter().filter_map(|t| t.itl_ms).collect());
    Ok(NativeSetupResult {
        setup,
        prefill_workers,
        decode_workers: run.workers,
        requests: timings.len(),
        errors: stats.errors,
        ttft_p50_ms: super::percentile(&ttfts, 0.5),
        ttft_p90_ms: super::percentile(&ttfts, 0.9),
        short_ttft_p90_ms: super::percentile(&short_ttfts, 0.9),
        itl_p50_ms: super::percentile(&itls, 0.5),
        itl_p90_ms: super::percentile(&itls, 0.9),
        output_tokens_per_s: timings.iter().map(|t| t.tokens).sum::<usize>() as f64 / elapsed,
    })
}

/// The readable report of `dynamo bench disagg-native`.
pub fn native_table(results: &[NativeSetupResult]) -> String {
    let mut out = format!(
        "{:<14} {:>5} {:>8} {:>17} {:>15} {:>15} {:>12}\n",
        "setup", "P+D", "requests", "TTFT p50/p90 ms", "short p90 ms", "ITL p50/p90 ms", "output tok/s"
    );
    for r in results {
        out.push_str(&format!(
            "{:<14} {:>5} {:>8} {:>8.0}/{:<8.0} {:>15.0} {:>7.1}/{:<7.1} {:>12.0}\n",
            r.setup,
            format!("{}+{}", r.prefill_workers, r.decode_workers),
            r.requests,
            r.ttft_p50_ms,
            r.ttft_p90_ms,
            r.short_ttft_p90_ms,
            r.itl_p50_ms,
            r.itl_p90_ms,
            r.output_tokens_per_s
        ));
        if r.errors > 0 {
            out.push_str(&format!("  ! {} requests failed\n", r.errors));
        }
    }
    out
}
