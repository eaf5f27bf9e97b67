//! Metrics (Prometheus text format, Dynamo's metric names so its dashboards work) and log setup.
//!
//! Frontend metrics are recorded per request by a `RequestMetrics` guard: created when a request is
//! admitted, fed each token, and recorded when dropped, so a request cut short by a disconnect still
//! counts (as `cancelled`). Worker gauges are read from each engine's load at scrape time.
use crate::core::protocol::{KvTransferStats, LoadMetrics, WorkerId, WorkerStats};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder, exponential_buckets,
};
use std::sync::Arc;
use std::time::Instant;

pub struct Metrics {
    registry: Registry,
    requests_total: IntCounterVec,
    inflight: IntGaugeVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    input_tokens: HistogramVec,
    output_tokens: HistogramVec,
    cached_tokens: HistogramVec,
    duration: HistogramVec,
    overlap_blocks: HistogramVec,
    worker_gauges: Vec<(IntGaugeVec, ReadLoad)>,
    /// What the event plane lost or could not read, and the KV resyncs that repaired it: never silent.
    plane: IntCounterVec,
    /// Request-plane messages a router's clients dropped unread, by reason.
    request_plane_dropped: IntCounterVec,
    /// Requests the preprocessing pool turned away because its queue was full.
    preprocess_refused: IntCounterVec,
    /// Where prompts were prefilled once prefill workers were up.
    disagg_decisions: IntCounterVec,
    /// Each remote worker's request-plane totals, as its `stats` reports say.
    worker_requests: IntGaugeVec,
    /// Each worker's KV hand-offs, as its `stats` reports (or, in this process, its engine) say.
    worker_kv_transfers: IntGaugeVec,
}

/// Reads one gauge's value out of a worker's load.
type ReadLoad = fn(&LoadMetrics) -> i64;

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    let vec = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["model"])
        .expect("static histogram definition is valid");
    registry.register(Box::new(vec.clone())).expect("metric names are unique");
    vec
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("static counter definition is valid");
    registry.register(Box::new(vec.clone())).expect("metric names are unique");
    vec
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("static gauge definition is valid");
    registry.register(Box::new(vec.clone())).expect("metric names are unique");
    vec
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new("dynamo_frontend_requests_total", "Requests handled by the frontend"),
            &["model", "endpoint", "request_type", "status"],
        )
        .expect("static counter definition is valid");
        registry.register(Box::new(requests_total.clone())).expect("metric names are unique");
        let latency = exponential_buckets(0.001, 2.0, 18).expect("valid buckets");
        let tokens = exponential_buckets(1.0, 2.0, 20).expect("valid buckets");
        let worker_gauges: Vec<(IntGaugeVec, ReadLoad)> = vec![
            (
                gauge(
                    &registry,
                    "dynamo_component_requests_running",
                    "Requests in the worker's running batch",
                    &["worker_id"],
                ),
                |l| l.requests_running.into(),
            ),
            (
                gauge(&registry, "dynamo_component_requests_waiting", "Requests queued in the worker", &["worker_id"]),
                |l| l.requests_waiting.into(),
            ),
            (
                gauge(
                    &registry,
                    "dynamo_component_kvstats_active_blocks",
                    "KV blocks held by requests",
                    &["worker_id"],
                ),
                |l| l.kv_active_blocks as i64,
            ),
            (
                gauge(&registry, "dynamo_component_kvstats_total_blocks", "KV blocks of the worker", &["worker_id"]),
                |l| l.kv_total_blocks as i64,
            ),
        ];
        Self {
            inflight: gauge(&registry, "dynamo_frontend_inflight_requests", "Requests being processed", &["model"]),
            ttft: histogram(
                &registry,
                "dynamo_frontend_time_to_first_token_seconds",
                "Time to first token",
                latency.clone(),
            ),
            itl: histogram(
                &registry,
                "dynamo_frontend_inter_token_latency_seconds",
                "Time between tokens",
                latency.clone(),
            ),
            input_tokens: histogram(
                &registry,
                "dynamo_frontend_input_sequence_tokens",
                "Prompt length",
                tokens.clone(),
            ),
            output_tokens: histogram(
                &registry,
                "dynamo_frontend_output_sequence_tokens",
                "Generated tokens",
                tokens.clone(),
            ),
            cached_tokens: histogram(
                &registry,
                "dynamo_frontend_cached_tokens",
                "Prompt tokens found in KV cache",
                tokens,
            ),
            duration: histogram(&registry, "dynamo_frontend_request_duration_seconds", "Request duration", latency),
            overlap_blocks: histogram(
                &registry,
                "dynamo_router_overlap_blocks",
                "Prompt blocks the chosen worker already held, as the router's index saw it",
                exponential_buckets(1.0, 2.0, 16).expect("valid buckets"),
            ),
            requests_total,
            worker_gauges,
            plane: counter(
                &registry,
                "dynamo_router_event_plane_total",
                "Event-plane trouble and repairs: lost_messages, publisher_restarts, malformed, resync_ok, \
                 resync_failed",
                &["event"],
            ),
            request_plane_dropped: counter(
                &registry,
                "dynamo_router_request_plane_dropped_total",
                "Messages from workers dropped unread: unsealed (not sealed with this cluster's key), unsolicited \
                 (a snapshot frame nobody asked for)",
                &["reason"],
            ),
            preprocess_refused: counter(
                &registry,
                "dynamo_frontend_preprocess_refused_total",
                "Requests answered 503 because every tokenizer thread was busy and its queue full",
                &[],
            ),
            disagg_decisions: counter(
                &registry,
                "dynamo_router_disagg_decisions_total",
                "Where prompts were prefilled while prefill workers were up: remote (a prefill worker), local_short \
                 (uncached part below --disagg-threshold), local_busy (every prefill worker at its queue limit), \
                 local_unsupported (the decode worker cannot take KV), local_fallback (the prefill worker was lost)",
                &["decision"],
            ),
            worker_requests: gauge(
                &registry,
                "dynamo_component_request_plane_requests",
                "A worker's requests since it started, by outcome (accepted, refused, cancelled, unreadable)",
                &["worker_id", "outcome"],
            ),
            worker_kv_transfers: gauge(
                &registry,
                "dynamo_component_kv_transfers",
                "A worker's KV hand-offs since it started: prompts held for a decode worker (held), read from a \
                 prefill worker (read, read_bytes), or computed because the read failed (read_failed)",
                &["worker_id", "what"],
            ),
            registry,
        }
    }

    /// Records a remote worker's request-plane totals.
    pub fn worker_stats(&self, worker: WorkerId, stats: &WorkerStats) {
        let id = worker.to_string();
        for (outcome, value) in Self::outcomes(stats) {
            self.worker_requests.with_label_values(&[&id, outcome]).set(value as i64);
        }
        self.kv_transfers(worker, &stats.kv);
    }

    /// Records a worker's KV hand-off totals.
    pub fn kv_transfers(&self, worker: WorkerId, stats: &KvTransferStats) {
        let id = worker.to_string();
        for (what, value) in Self::transfers(stats) {
            self.worker_kv_transfers.with_label_values(&[&id, what]).set(value as i64);
        }
    }

    fn transfers(stats: &KvTransferStats) -> [(&'static str, u64); 4] {
        [
            ("held", stats.held),
            ("read", stats.read),
            ("read_failed", stats.read_failed),
            ("read_bytes", stats.read_bytes),
        ]
    }

    /// Drops a departed worker's series, so dashboards do not show its last values for ever.
    pub fn forget_worker(&self, worker: WorkerId) {
        let id = worker.to_string();
        for (gauge, _) in &self.worker_gauges {
            let _ = gauge.remove_label_values(&[&id]);
        }
        for (outcome, _) in Self::outcomes(&WorkerStats::default()) {
            let _ = self.worker_requests.remove_label_values(&[&id, outcome]);
        }
        for (what, _) in Self::transfers(&KvTransferStats::default()) {
            let _ = self.worker_kv_transfers.remove_label_values(&[&id, what]);
        }
    }

    fn outcomes(stats: &WorkerStats) -> [(&'static str, u64); 4] {
        [
            ("accepted", stats.accepted),
            ("refused", stats.refused),
            ("cancelled", stats.cancelled),
            ("unreadable", stats.unreadable),
        ]
    }

    /// Counts request-plane messages a router dropped unread (`reason`: unsealed, unsolicited).
    pub fn request_plane_dropped(&self, reason: &str, count: u64) {
        if count > 0 {
            self.request_plane_dropped.with_label_values(&[reason]).inc_by(count);
        }
    }

    /// Counts a request the preprocessing pool refused.
    pub fn preprocess_refused(&self) {
        self.preprocess_refused.with_label_values::<&str>(&[]).inc();
    }

    /// Counts one disaggregation decision (`router::Disagg`'s label).
    pub fn disagg_decision(&self, decision: &str) {
        self.disagg_decisions.with_label_values(&[decision]).inc();
    }

    /// Counts event-plane trouble or a repair (`PlaneEvent`).
    pub fn plane(&self, event: PlaneEvent, count: u64) {
        self.plane.with_label_values(&[event.label()]).inc_by(count);
    }

    /// Starts tracking one admitted request.
    pub fn request(self: &Arc<Self>, model: &str, endpoint: &'static str, streaming: bool) -> RequestMetrics {
        self.inflight.with_label_values(&[model]).inc();
        RequestMetrics {
            metrics: self.clone(),
            model: model.to_string(),
            endpoint,
            request_type: if streaming { "stream" } else { "unary" },
            start: Instant::now(),
            last_token: None,
            output_tokens: 0,
            status: None,
        }
    }

    /// Records one routing decision's overlap with the chosen worker's cache.
    pub fn routed(&self, model: &str, overlap_blocks: u32) {
        self.overlap_blocks.with_label_values(&[model]).observe(f64::from(overlap_blocks));
    }

    /// Counts a request refused before it reached an engine (bad input, busy).
    pub fn rejected(&self, model: &str, endpoint: &str, streaming: bool) {
        let request_type = if streaming { "stream" } else { "unary" };
        self.requests_total.with_label_values(&[model, endpoint, request_type, "error"]).inc();
    }

    /// The Prometheus text exposition, with worker gauges read now.
    pub fn render(&self, workers: &[(WorkerId, LoadMetrics)]) -> String {
        for (worker, load) in workers {
            let id = worker.to_string();
            for (gauge, read) in &self.worker_gauges {
                gauge.with_label_values(&[&id]).set(read(load));
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaneEvent {
    /// Messages that never arrived (a gap in a publisher's numbering).
    LostMessages,
    /// A publisher's numbering went back.
    PublisherRestart,
    /// A frame that did not decode.
    Malformed,
    /// A worker's KV state rebuilt from its snapshot.
    ResyncOk,
    /// No snapshot came; the worker's KV entries were dropped instead.
    ResyncFailed,
}

impl PlaneEvent {
    fn label(self) -> &'static str {
        match self {
            Self::LostMessages => "lost_messages",
            Self::PublisherRestart => "publisher_restarts",
            Self::Malformed => "malformed",
            Self::ResyncOk => "resync_ok",
            Self::ResyncFailed => "resync_failed",
        }
    }
}

/// Records one request's metrics; whatever is not marked finished counts as cancelled when dropped.
pub struct RequestMetrics {
    metrics: Arc<Metrics>,
    model: String,
    endpoint: &'static str,
    request_type: &'static str,
    start: Instant,
    last_token: Option<Instant>,
    output_tokens: u64,
    status: Option<&'static str>,
}

impl RequestMetrics {
    pub fn prompt(&self, prompt_tokens: usize, cached_tokens: u32) {
        self.metrics.input_tokens.with_label_values(&[&self.model]).observe(prompt_tokens as f64);
        self.metrics.cached_tokens.with_label_values(&[&self.model]).observe(cached_tokens as f64);
    }

    pub fn tokens(&mut self, count: usize) {
        if count == 0 {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.ttft.with_label_values(&[&self.model]).observe((now - self.start).as_secs_f64()),
            Some(last) => {
                let gap = (now - last).as_secs_f64() / count as f64;
                let itl = self.metrics.itl.with_label_values(&[&self.model]);
                for _ in 0..count {
                    itl.observe(gap);
                }
            }
        }
        self.last_token = Some(now);
        self.output_tokens += count as u64;
    }

    pub fn finish(&mut self, success: bool) {
        self.status = Some(if success { "success" } else { "error" });
    }
}

impl Drop for RequestMetrics {
    fn drop(&mut self) {
        let m = &self.metrics;
        let status = self.status.unwrap_or("cancelled");
        m.requests_total.with_label_values(&[&self.model, self.endpoint, self.request_type, status]).inc();
        m.inflight.with_label_values(&[&self.model]).dec();
        m.output_tokens.with_label_values(&[&self.model]).observe(self.output_tokens as f64);
        m.duration.with_label_values(&[&self.model]).observe(self.start.elapsed().as_secs_f64());
    }
}

/// Logs to stderr, or into `tail` while a full-screen UI owns the terminal; `RUST_LOG` (or `DYNAMO_LOG`)
/// overrides the level.
pub fn init_logging(verbose: u8, tail: Option<LogTail>) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("DYNAMO_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match tail {
        Some(tail) => logs.with_ansi(false).without_time().with_target(false).with_writer(tail).try_init(),
        None => logs.with_writer(std::io::stderr).try_init(),
    };
}

/// The last log lines, kept for a full-screen UI to show (written to the terminal, they would tear it).
#[derive(Clone, Default)]
pub struct LogTail(Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl LogTail {
    const KEPT: usize = 100;

    pub fn last(&self, count: usize) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().skip(lines.len().saturating_sub(count)).cloned().collect()
    }
}

impl LogTail {
    fn push(&self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        if line.trim().is_empty() {
            return;
        }
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == Self::KEPT {
            lines.pop_front();
        }
        lines.push_back(line.trim().to_string());
    }
}

/// One event's writer: whole lines go into the tail as they complete, a last partial one when dropped.
pub struct TailWriter {
    tail: LogTail,
    pending: Vec<u8>,
}

impl std::io::Write for TailWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.tail.push(&line);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TailWriter {
    fn drop(&mut self) {
        self.tail.push(&self.pending);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogTail {
    type Writer = TailWriter;

    fn make_writer(&'a self) -> TailWriter {
        TailWriter { tail: self.clone(), pending: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tail_keeps_the_last_lines_whole() {
        use std::io::Write;
        use tracing_subscriber::fmt::MakeWriter;
        let tail = LogTail::default();
        assert!(tail.last(3).is_empty());
        write!(tail.make_writer(), "  WARN first\n\n").unwrap();
        let mut writer = tail.make_writer();
        write!(writer, "INFO second\nINFO th").unwrap();
        write!(writer, "ird").unwrap();
        assert_eq!(tail.last(2), ["WARN first", "INFO second"], "a line is shown once it is whole");
        drop(writer);
        assert_eq!(tail.last(2), ["INFO second", "INFO third"]);
        for n in 0..LogTail::KEPT {
            writeln!(tail.make_writer(), "line {n}").unwrap();
        }
        assert_eq!(tail.last(LogTail::KEPT + 5).len(), LogTail::KEPT, "bounded");
        assert_eq!(tail.last(1), [format!("line {}", LogTail::KEPT - 1)]);
    }

    #[test]
    fn a_dropped_request_counts_as_cancelled_and_leaves_inflight() {
        let metrics = Arc::new(Metrics::new());
        {
            let mut request = metrics.request("m", "chat_completions", true);
            request.tokens(1);
            let text = metrics.render(&[]);
            assert!(text.contains("dynamo_frontend_inflight_requests{model=\"m\"} 1"), "{text}");
        }
        let text = metrics.render(&[(3, LoadMetrics { kv_total_blocks: 7, ..Default::default() })]);
        assert!(text.contains(
            "dynamo_frontend_requests_total{endpoint=\"chat_completions\",model=\"m\",request_type=\"stream\",status=\"cancelled\"} 1"
        ), "{text}");
        assert!(text.contains("dynamo_frontend_inflight_requests{model=\"m\"} 0"));
        assert!(text.contains("dynamo_frontend_time_to_first_token_seconds_count{model=\"m\"} 1"));
        assert!(text.contains("dynamo_component_kvstats_total_blocks{worker_id=\"3\"} 7"));
    }
}
