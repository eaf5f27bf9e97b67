//! `dynamo bench route`: routing quality on a replayed trace, KV-aware against round-robin and random.
//!
//! For each mode, fresh mocker workers and a router; the trace's requests are sent at their timestamps
//! (divided by the speedup, like the mockers' time) straight to the router, no HTTP. A trace block id
//! becomes `block_tokens` deterministic token ids, so requests sharing leading ids share a token prefix and
//! the workers' prefix caches see exactly the reuse the trace describes. Measured per mode: the share of
//! prompt tokens served from cache, TTFT p50/p90 and output throughput, all in simulated time.
use super::trace::TraceRequest;
use crate::core::engine::Engine;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::engine::scheduler::SchedulerConfig;
use crate::core::protocol::PreprocessedRequest;
use crate::core::router::{Router, RouterConfig, RouterMode};
use crate::core::telemetry::{Metrics, Predictions};
use futures::StreamExt;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RouteBenchSettings {
    pub workers: usize,
    pub speedup: f64,
    pub scheduler: SchedulerConfig,
    pub modes: Vec<RouterMode>,
    /// Tokens per trace block id (512 in the public Mooncake traces).
    pub block_tokens: usize,
    pub pace: Pace,
}

/// When a replayed request is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// At its timestamp (divided by the speedup).
    Timestamps,
    /// In trace order, as soon as fewer than this many are in flight (a closed loop of so many clients).
    Concurrency(usize),
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    #[serde(skip)]
    pub mode: RouterMode,
    pub requests: usize,
    pub errors: usize,
    /// Cached prompt tokens over all prompt tokens.
    pub cached_fraction: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    /// Each request's mean time between tokens, across requests (simulated ms): what a router that piles
    /// decoding onto a few workers costs.
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
    /// Output tokens per simulated second, first request to last token.
    pub output_tokens_per_s: f64,
    /// Requests each worker was sent, most to fewest: the load spread.
    pub requests_per_worker: Vec<usize>,
    /// Latency mode: its predicted times to first token against the observed ones, in simulated ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictions: Option<Predictions>,
}

/// The share of prompt tokens a single cache of unbounded size would have served: each request's leading
/// trace blocks seen in an earlier request, in whole blocks of `kv_block` tokens and never its last token
/// (an engine computes at least that one). No router can do better.
pub fn ideal_cached_fraction(trace: &[TraceRequest], block_tokens: usize, kv_block: usize) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let (mut cached, mut prompt) = (0usize, 0usize);
    for request in trace {
        let tokens = prompt_length(request, block_tokens);
        let hashes = super::trace::sequence_hashes(&request.hash_ids, 0);
        let matched = hashes.iter().take_while(|h| seen.contains(*h)).count();
        let hit = (matched * block_tokens).min(tokens.saturating_sub(1));
        cached += hit / kv_block.max(1) * kv_block.max(1);
        prompt += tokens;
        seen.extend(hashes);
    }
    cached as f64 / prompt.max(1) as f64
}

/// One replayed request, in real time (multiply by the speedup for simulated time).
pub(super) struct Outcome {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub output_tokens: usize,
    pub ttft: Duration,
    /// The worker it was sent to first.
    pub worker: crate::core::protocol::WorkerId,
    /// The gaps between consecutive outputs after the first.
    pub gaps: Vec<Duration>,
}

impl Outcome {
    /// Its mean gap between tokens in simulated ms (what vLLM's benchmark calls TPOT); `None` for one
    /// output.
    fn mean_gap_ms(&self, speedup: f64) -> Option<f64> {
        let total: Duration = self.gaps.iter().sum();
        (!self.gaps.is_empty()).then(|| total.as_secs_f64() * 1e3 * speedup / self.gaps.len() as f64)
    }
}

/// Replayed requests' latencies in simulated ms, sorted, and how many met both targets.
pub(super) struct Judged {
    pub ttfts: Vec<f64>,
    /// Each request's mean gap between tokens.
    pub itls: Vec<f64>,
    pub good: usize,
}

pub(super) fn judge(outcomes: &[Outcome], speedup: f64, ttft_target_ms: f64, itl_target_ms: f64) -> Judged {
    let ttft = |o: &Outcome| o.ttft.as_secs_f64() * 1e3 * speedup;
    let good = (outcomes.iter())
        .filter(|o| ttft(o) <= ttft_target_ms && o.mean_gap_ms(speedup).unwrap_or(0.0) <= itl_target_ms)
        .count();
    let mut ttfts: Vec<f64> = outcomes.iter().map(ttft).collect();
    let mut itls: Vec<f64> = outcomes.iter().filter_map(|o| o.mean_gap_ms(speedup)).collect();
    ttfts.sort_by(f64::total_cmp);
    itls.sort_by(f64::total_cmp);
    Judged { ttfts, itls, good }
}

/// A trace replayed against one router.
pub(super) struct Replayed {
    pub outcomes: Vec<Outcome>,
    pub errors: usize,
    /// Real seconds from the first request to the last token.
    pub elapsed_s: f64,
}

pub async fn run(trace: &[TraceRequest], settings: &RouteBenchSettings) -> Vec<ModeResult> {
    let mut results = Vec::new();
    for &mode in &settings.modes {
        results.push(run_mode(trace, settings, mode).await);
    }
    results
}

async fn run_mode(trace: &[TraceRequest], settings: &RouteBenchSettings, mode: RouterMode) -> ModeResult {
    let config =
        MockerConfig { scheduler: settings.scheduler.clone(), speedup: settings.speedup, ..MockerConfig::default() };
    let vocab: Arc<[u32]> = (0..32_000).collect();
    let engines: Vec<Arc<dyn Engine>> = (0..settings.workers)
        .map(|id| Arc::new(MockerEngine::spawn(id as u64, config.clone(), vocab.clone())) as Arc<dyn Engine>)
        .collect();
    let router_config = RouterConfig {
        mode,
        busy_threshold: usize::MAX / 2,
        block_size: settings.scheduler.block_size,
        ..RouterConfig::default()
    };
    let router = Arc::new(Router::new(engines, router_config));
    let metrics = Arc::new(Metrics::new());
    router.report_to(metrics.clone());
    let Replayed { outcomes, errors, elapsed_s } =
        replay(trace, &router, settings.speedup, settings.block_tokens, settings.pace, None).await;
    let elapsed = elapsed_s * settings.speedup;
    let prompt: usize = outcomes.iter().map(|o| o.prompt_tokens).sum();
    let cached: usize = outcomes.iter().map(|o| o.cached_tokens).sum();
    let output: usize = outcomes.iter().map(|o| o.output_tokens).sum();
    let Judged { ttfts, itls, .. } = judge(&outcomes, settings.speedup, f64::INFINITY, f64::INFINITY);
    let mut requests_per_worker = vec![0; settings.workers];
    for outcome in &outcomes {
        if let Some(count) = requests_per_worker.get_mut(outcome.worker as usize) {
            *count += 1;
        }
    }
    requests_per_worker.sort_unstable_by(|a, b| b.cmp(a));
    ModeResult {
        mode,
        requests: outcomes.len(),
        errors,
        cached_fraction: cached as f64 / prompt.max(1) as f64,
        ttft_p50_ms: super::percentile(&ttfts, 0.5),
        ttft_p90_ms: super::percentile(&ttfts, 0.9),
        ttft_p99_ms: super::percentile(&ttfts, 0.99),
        itl_p50_ms: super::percentile(&itls, 0.5),
        itl_p90_ms: super::percentile(&itls, 0.9),
        output_tokens_per_s: output as f64 / elapsed,
        requests_per_worker,
        predictions: (mode == RouterMode::Latency).then(|| {
            let real = metrics.predictions();
            let simulated = |ms: f64| ms * settings.speedup;
            Predictions {
                count: real.count,
                mean_error_ms: simulated(real.mean_error_ms),
                mean_predicted_ms: simulated(real.mean_predicted_ms),
                mean_observed_ms: simulated(real.mean_observed_ms),
            }
        }),
    }
}

/// Sends `trace`'s requests to `router` as `pace` says (timestamps divided by `speedup`) and follows each to
/// its end, recording each in `metrics` as the frontend would. A trace block id becomes `block_tokens` token
/// ids (`prompt_tokens`).
pub(super) async fn replay(
    trace: &[TraceRequest],
    router: &Arc<Router>,
    speedup: f64,
    block_tokens: usize,
    pace: Pace,
    metrics: Option<&Arc<Metrics>>,
) -> Replayed {
    let start = Instant::now();
    let first_timestamp = trace.first().map_or(0, |r| r.timestamp);
    let clients = match pace {
        Pace::Timestamps => None,
        Pace::Concurrency(clients) => Some(Arc::new(tokio::sync::Semaphore::new(clients.max(1)))),
    };
    let mut tasks = Vec::with_capacity(trace.len());
    for (i, request) in trace.iter().enumerate() {
        let client = match &clients {
            Some(clients) => clients.clone().acquire_owned().await.ok(),
            None => {
                let due = request.timestamp.saturating_sub(first_timestamp) as f64 / 1000.0 / speedup;
                tokio::time::sleep_until((start + Duration::from_secs_f64(due)).into()).await;
                None
            }
        };
        let engine_request = PreprocessedRequest::greedy(
            format!("trace-{i}"),
            prompt_tokens(request, block_tokens),
            request.output_length.max(1) as u32,
        );
        let (router, metrics) = (router.clone(), metrics.cloned());
        tasks.push(tokio::spawn(async move {
            let outcome = send(&router, engine_request, metrics).await;
            drop(client);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok(Some(outcome)) => outcomes.push(outcome),
            _ => errors += 1,
        }
    }
    Replayed { outcomes, errors, elapsed_s: start.elapsed().as_secs_f64() }
}

async fn send(router: &Arc<Router>, request: PreprocessedRequest, metrics: Option<Arc<Metrics>>) -> Option<Outcome> {
    let prompt_tokens = request.token_ids.len();
    let mut recorded = metrics.map(|metrics| metrics.request("trace", "completions", true));
    let start = Instant::now();
    let mut stream = router.route_migrating(request).await.ok()?;
    let worker = stream.worker_id();
    let first = stream.next().await?;
    let ttft = start.elapsed();
    let cached_tokens = first.cached_tokens.unwrap_or(0) as usize;
    if let Some(recorded) = &mut recorded {
        recorded.prompt(prompt_tokens, cached_tokens as u32);
        recorded.tokens(first.token_ids.len());
    }
    let mut output_tokens = first.token_ids.len();
    let (mut gaps, mut last) = (Vec::new(), Instant::now());
    while let Some(output) = stream.next().await {
        gaps.push(last.elapsed());
        last = Instant::now();
        output_tokens += output.token_ids.len();
        if let Some(recorded) = &mut recorded {
            recorded.tokens(output.token_ids.len());
        }
    }
    if let Some(recorded) = &mut recorded {
        recorded.finish(true);
    }
    Some(Outcome { prompt_tokens, cached_tokens, output_tokens, ttft, worker, gaps })
}

/// `input_length` token ids where trace block `i` contributes `block_tokens` ids derived from its hash id.
fn prompt_tokens(request: &TraceRequest, block_tokens: usize) -> Vec<u32> {
    (0..prompt_length(request, block_tokens))
        .map(|position| {
            let id = request.hash_ids.get(position / block_tokens).copied().unwrap_or(0);
            let mixed = (id << 16 | (position % block_tokens) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((mixed >> 33) % 32_000) as u32
        })
        .collect()
}

/// Its input length, at least one token and at most what its blocks hold.
fn prompt_length(request: &TraceRequest, block_tokens: usize) -> usize {
    (request.input_length as usize).clamp(1, request.hash_ids.len().max(1) * block_tokens)
}

/// The readable report of `dynamo bench route`.
pub fn table(results: &[ModeResult]) -> String {
    let mut out = format!(
        "{:<13} {:>9} {:>9} {:>11} {:>11} {:>11} {:>10} {:>10} {:>13}  {}\n",
        "router",
        "requests",
        "cached",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "ITL p50",
        "ITL p90",
        "output tok/s",
        "requests per worker"
    );
    for r in results {
        let spread: Vec<String> = r.requests_per_worker.iter().map(|n| n.to_string()).collect();
        out.push_str(&format!(
            "{:<13} {:>9} {:>8.1}% {:>9.0}ms {:>9.0}ms {:>9.0}ms {:>8.1}ms {:>8.1}ms {:>13.0}  {}\n",
            r.mode.name(),
            r.requests,
            r.cached_fraction * 100.0,
            r.ttft_p50_ms,
            r.ttft_p90_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p90_ms,
            r.output_tokens_per_s,
            spread.join(" ")
        ));
        if r.errors > 0 {
            out.push_str(&format!("  ! {} requests failed\n", r.errors));
        }
        if let Some(p) = &r.predictions {
            out.push_str(&format!(
                "  its TTFT predictions: mean {:.0}ms predicted, {:.0}ms observed, mean error {:.0}ms ({} requests)\n",
                p.mean_predicted_ms, p.mean_observed_ms, p.mean_error_ms, p.count
            ));
        }
    }
    out
}

/// How `mode` compares with each other mode of the same run, one line each: TTFT as its value over the
/// other's (below 1: `mode` is faster), cached fraction as the difference in points.
pub fn comparison(results: &[ModeResult], mode: RouterMode) -> String {
    let Some(ours) = results.iter().find(|r| r.mode == mode) else { return String::new() };
    let mut out = String::new();
    for other in results.iter().filter(|r| r.mode != mode) {
        out.push_str(&format!(
            "{} / {}: TTFT p50 {:.2}x, p90 {:.2}x, p99 {:.2}x, ITL p90 {:.2}x (below 1: {} is faster); cached \
             {:+.1} points\n",
            mode.name(),
            other.mode.name(),
            ours.ttft_p50_ms / other.ttft_p50_ms,
            ours.ttft_p90_ms / other.ttft_p90_ms,
            ours.ttft_p99_ms / other.ttft_p99_ms,
            ours.itl_p90_ms / other.itl_p90_ms,
            mode.name(),
            (ours.cached_fraction - other.cached_fraction) * 100.0
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_block_ids_give_shared_token_prefixes() {
        let a = TraceRequest { timestamp: 0, input_length: 1000, output_length: 1, hash_ids: vec![1, 2] };
        let b = TraceRequest { timestamp: 0, input_length: 700, output_length: 1, hash_ids: vec![1, 3] };
        let (ta, tb) = (prompt_tokens(&a, 512), prompt_tokens(&b, 512));
        assert_eq!((ta.len(), tb.len()), (1000, 700));
        assert_eq!(ta[..512], tb[..512]);
        assert_ne!(ta[512..700], tb[512..700]);
    }
}
