//! Benchmarks behind `dynamo bench …`. Each one measures a reference in the same run (these machines are
//! shared and noisy, so only same-run ratios mean anything) and reports medians and tails.
//!
//! `drive` is the one load generator every benchmark uses: closed loop at a fixed concurrency, or open
//! loop at a fixed request rate, timing each request from its start to its last byte.
pub mod disagg;
pub mod encode;
pub mod engine;
pub mod epp;
pub mod http;
pub mod index;
pub mod plane;
pub mod planner;
pub mod processes;
pub mod route;
pub mod scaling;
pub mod soak;
pub mod synth;
pub mod trace;
pub mod transfer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// This many requests always in flight.
    Concurrency(usize),
    /// Requests started at this rate per second, whatever the latency.
    Rate(f64),
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Concurrency(c) => write!(f, "concurrency {c}"),
            Load::Rate(r) => write!(f, "{r} req/s"),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RunStats {
    pub requests: usize,
    pub errors: usize,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Runs `requests` calls of `one` under `load` and times each.
pub async fn drive<F, Fut>(load: Load, requests: usize, one: F) -> RunStats
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let one = Arc::new(one);
    let start = Instant::now();
    let results: Vec<Result<Duration, String>> = match load {
        Load::Concurrency(concurrency) => {
            let next = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..concurrency.max(1))
                .map(|_| {
                    let (one, next) = (one.clone(), next.clone());
                    tokio::spawn(async move {
                        let mut mine = Vec::new();
                        while next.fetch_add(1, Ordering::Relaxed) < requests {
                            let t = Instant::now();
                            mine.push(one().await.map(|()| t.elapsed()));
                        }
                        mine
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(requests);
            for task in tasks {
                all.extend(task.await.unwrap_or_default());
            }
            all
        }
        Load::Rate(rate) => {
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1e-3)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = Vec::with_capacity(requests);
            for _ in 0..requests {
                ticks.tick().await;
                let one = one.clone();
                tasks.push(tokio::spawn(async move {
                    let t = Instant::now();
                    one().await.map(|()| t.elapsed())
                }));
            }
            let mut all = Vec::with_capacity(requests);
            for task in tasks {
                all.push(task.await.unwrap_or_else(|e| Err(e.to_string())));
            }
            all
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> =
        results.iter().filter_map(|r| r.as_ref().ok()).map(|d| d.as_secs_f64() * 1e3).collect();
    if let Some(Err(first)) = results.iter().find(|r| r.is_err()) {
        tracing::warn!("{} of {} requests failed; first: {first}", results.len() - latencies.len(), results.len());
    }
    latencies.sort_by(f64::total_cmp);
    RunStats {
        requests: results.len(),
        errors: results.len() - latencies.len(),
        requests_per_s: latencies.len() as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
    }
}

/// CPU time this process has used, user and system, every thread (`None` where the clock is missing).
pub fn process_cpu_seconds() -> Option<f64> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // Nanoseconds, where /proc/self/stat counts 10 ms ticks: a short run would read as no CPU at all.
    // SAFETY: `now` is a valid timespec the call writes into; the clock id is a constant the kernel knows.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    (status == 0).then_some(now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9)
}

/// Nearest-rank percentile of sorted values; NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work() {
        let Some(before) = process_cpu_seconds() else { return };
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let after = process_cpu_seconds().unwrap_or(before);
        assert!(after > before, "60 ms of spinning shows up: {before} -> {after}");
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[tokio::test]
    async fn drive_runs_every_request_and_counts_failures() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let stats = drive(Load::Concurrency(4), 40, move || {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            async move { if n.is_multiple_of(10) { Err("boom".to_string()) } else { Ok(()) } }
        })
        .await;
        assert_eq!(calls.load(Ordering::Relaxed), 40);
        assert_eq!((stats.requests, stats.errors), (40, 4));
    }
}
