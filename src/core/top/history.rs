//! What `dynamo top` remembers: the last few minutes of each worker's load reports and of the cluster's
//! totals, drawn as sparklines (a text one in the table and the header, ratatui's in the detail view), as
//! btm and nvtop draw theirs.
use crate::core::protocol::{LoadMetrics, WorkerStats};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far back history goes.
pub const KEPT: Duration = Duration::from_secs(300);
/// At most this many samples, whatever the report rate (a worker reports load once a second, and more often
/// when it changes).
const MOST: usize = 1200;
/// The cluster's totals are sampled at most this often.
const CLUSTER_EVERY: Duration = Duration::from_secs(1);

/// One moment of a worker, or of the cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: Instant,
    pub running: f64,
    pub waiting: f64,
    /// Blocks in use by running requests, of all (0 to 1).
    pub kv_active: f64,
    /// Requests per second since the previous sample (a worker: accepted over the request plane; the
    /// cluster: what its routers report), `None` where unknown.
    pub requests_per_s: Option<f64>,
    /// Median time to first token the routers report, in ms (a worker's: as a router saw its requests).
    pub ttft_ms: Option<f64>,
    /// Prompts' KV read from prefill workers, bytes per second since the previous sample (a worker's; the
    /// cluster's: every worker's latest, summed), `None` where unknown.
    pub kv_read_per_s: Option<f64>,
    /// Images run through the worker's vision tower, per second since the previous sample (a worker's).
    pub images_per_s: Option<f64>,
}

#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    /// The worker's totals at the last sample (requests taken, KV bytes read), for the rates.
    totals: Option<(Instant, WorkerStats)>,
}

impl History {
    /// A worker's load report, with its totals so far (its latest stats) when known.
    pub fn record_load(&mut self, at: Instant, load: &LoadMetrics, stats: Option<WorkerStats>) {
        let rate = |pick: fn(&WorkerStats) -> u64| match (&self.totals, &stats) {
            (Some((then, before)), Some(now)) if at > *then => {
                Some(pick(now).saturating_sub(pick(before)) as f64 / at.duration_since(*then).as_secs_f64())
            }
            _ => None,
        };
        let (requests_per_s, kv_read_per_s) = (rate(|s| s.accepted), rate(|s| s.kv.read_bytes));
        let images_per_s = rate(|s| s.images.encoded);
        if let Some(stats) = stats {
            self.totals = Some((at, stats));
        }
        let kv_active = load.kv_active_blocks as f64 / load.kv_total_blocks.max(1) as f64;
        self.push(Sample {
            at,
            running: f64::from(load.requests_running),
            waiting: f64::from(load.requests_waiting),
            kv_active,
            requests_per_s,
            ttft_ms: None,
            kv_read_per_s,
            images_per_s,
        });
    }

    /// Whether a cluster sample taken at `now` would be kept: the last is a second old or more. Asked
    /// first, since summing the cluster costs a pass over every worker and reports come many a second.
    pub fn cluster_sample_due(&self, now: Instant) -> bool {
        self.samples.back().is_none_or(|last| now.saturating_duration_since(last.at) >= CLUSTER_EVERY)
    }

    /// A sample of the cluster's totals, unless the last is under a second old.
    pub fn record_cluster(&mut self, sample: Sample) {
        if self.cluster_sample_due(sample.at) {
            self.push(sample);
        }
    }

    fn push(&mut self, sample: Sample) {
        self.samples.push_back(sample);
        while self.samples.len() > MOST
            || self.samples.front().is_some_and(|s| sample.at.saturating_duration_since(s.at) > KEPT)
        {
            self.samples.pop_front();
        }
    }

    /// A router's median TTFT for this worker, on its latest sample (routers report every few seconds).
    pub fn note_ttft(&mut self, ms: f64) {
        if let Some(last) = self.samples.back_mut() {
            last.ttft_ms = Some(ms);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// One series, oldest first: `pick` of every sample (samples where it is unknown are skipped).
    pub fn series(&self, pick: impl Fn(&Sample) -> Option<f64>) -> Vec<f64> {
        self.samples.iter().filter_map(pick).collect()
    }

    pub fn last(&self) -> Option<&Sample> {
        self.samples.back()
    }
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The last `width` values as bars, scaled to the largest of them (or to `floor` when all are below it, so
/// a quiet worker's ones do not read as full bars).
pub fn sparkline(values: &[f64], width: usize, floor: f64) -> String {
    let shown = &values[values.len().saturating_sub(width)..];
    let top = shown.iter().copied().fold(floor, f64::max);
    shown
        .iter()
        .map(|&v| {
            let level = if top > 0.0 { (v.max(0.0) / top * (BARS.len() - 1) as f64).round() as usize } else { 0 };
            BARS[level.min(BARS.len() - 1)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(running: u32, waiting: u32, active: u64) -> LoadMetrics {
        LoadMetrics {
            requests_running: running,
            requests_waiting: waiting,
            kv_active_blocks: active,
            kv_total_blocks: 100,
            ..LoadMetrics::default()
        }
    }

    #[test]
    fn a_workers_history_keeps_the_last_minutes_and_its_request_rate() {
        let start = Instant::now();
        let mut history = History::default();
        for second in 0..400u64 {
            let at = start + Duration::from_secs(second);
            let stats = WorkerStats { accepted: second * 3, ..WorkerStats::default() };
            history.record_load(at, &load(second as u32 % 5, 1, second % 100), Some(stats));
        }
        let running = history.series(|s| Some(s.running));
        assert_eq!(running.len(), 301, "five minutes of one report a second, both ends included");
        assert_eq!(running.last(), Some(&4.0));
        let rates = history.series(|s| s.requests_per_s);
        assert!(rates.iter().all(|&r| (r - 3.0).abs() < 1e-9), "3 requests a second: {rates:?}");
        assert_eq!(history.last().map(|s| s.kv_active), Some(0.99));
    }

    #[test]
    fn the_cluster_is_sampled_once_a_second_at_most() {
        let start = Instant::now();
        let mut history = History::default();
        let sample = |ms: u64| Sample {
            at: start + Duration::from_millis(ms),
            running: ms as f64,
            waiting: 0.0,
            kv_active: 0.0,
            requests_per_s: None,
            ttft_ms: None,
            kv_read_per_s: None,
            images_per_s: None,
        };
        for ms in [0, 300, 999, 1000, 1500, 2100] {
            history.record_cluster(sample(ms));
        }
        assert_eq!(history.series(|s| Some(s.running)), vec![0.0, 1000.0, 2100.0]);
    }

    #[test]
    fn a_sparkline_scales_to_its_largest_value_or_the_floor() {
        assert_eq!(sparkline(&[0.0, 1.0, 2.0, 4.0, 8.0], 5, 1.0), "▁▂▃▅█");
        assert_eq!(sparkline(&[9.0, 0.0, 1.0, 1.0], 3, 1.0), "▁██", "the last `width` values only");
        assert_eq!(sparkline(&[0.0, 1.0], 2, 4.0), "▁▃", "one request of four possible is not a full bar");
        assert_eq!(sparkline(&[], 4, 1.0), "");
    }
}
