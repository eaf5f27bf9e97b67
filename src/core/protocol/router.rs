//! What a router says of its traffic on the event plane (`router` topic), every few seconds, for `dynamo top`.
use serde::{Deserialize, Serialize};

/// A router's traffic over the last `interval_s` seconds, every model together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouterReport {
    pub interval_s: f64,
    /// Requests that reached a worker, per second.
    pub requests_per_s: f64,
    /// Requests refused before reaching one (bad input, busy, no worker), per second.
    pub refused_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Mean time to first token and between tokens, ms; `None` without one in the interval.
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
    /// Their medians and 99th percentiles over the interval, ms (of a uniform sample when it had many).
    #[serde(default)]
    pub ttft_p50_ms: Option<f64>,
    #[serde(default)]
    pub ttft_p99_ms: Option<f64>,
    #[serde(default)]
    pub itl_p50_ms: Option<f64>,
    #[serde(default)]
    pub itl_p99_ms: Option<f64>,
    /// Prompt tokens found in the chosen workers' caches, over all prompt tokens; `None` without prompts.
    pub prefix_hit: Option<f64>,
    /// Workers it routes to.
    pub workers: u32,
    /// The same per model, for a router that serves several (empty when it serves one).
    #[serde(default)]
    pub models: Vec<ModelReport>,
    /// Where its requests went: each worker it chose over the interval, busiest first.
    #[serde(default)]
    pub routed: Vec<RoutedTo>,
    /// Its disaggregation decisions over the interval (`remote`, `local_short`, …; as
    /// `dynamo_router_disagg_decisions_total` labels them), per second; empty when it made none.
    #[serde(default)]
    pub disagg: Vec<(String, f64)>,
}

/// The requests a router sent one worker over the interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutedTo {
    /// Its id as the hex every view shows (a number past 2^53 is rounded by JSON readers).
    pub worker: String,
    pub requests_per_s: f64,
    /// Median time to first token of its requests, ms; `None` without one in the interval.
    #[serde(default)]
    pub ttft_p50_ms: Option<f64>,
}

/// One model's share of a router's traffic over the interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    pub model: String,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub prefix_hit: Option<f64>,
}
