//! `dynamo top`: the cluster as its workers report it. Every worker discovery finds is pinged on the request
//! plane (its answer is its record: model, role, KV capacity) and subscribed to on the event plane, and what
//! it publishes there — load, request totals, KV-cache activity — is folded into a `ClusterView`. The view
//! knows nothing of terminals: `ui` draws it live, `ClusterView::text` prints it once; `history` keeps the
//! last minutes of it for sparklines.
pub mod history;
pub mod ui;

use history::History;

use crate::core::discovery::Discovery;
use crate::core::members::{Change, Members};
use crate::core::plane::request::WorkerStatus;
use crate::core::plane::{Continuity, Delivery, PlaneError};
use crate::core::protocol::discovery::Instance;
use crate::core::protocol::discovery::Role;
use crate::core::protocol::plane::{Payload, Topic};
use crate::core::protocol::{KvEvent, KvEventBatch, LoadMetrics, Plan, RouterReport, WorkerStats};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How far back the KV event rate looks: long enough to smooth engine steps, short enough to follow a burst.
const RATE_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Found by discovery, no answer yet.
    Connecting,
    /// Found by discovery, and no answer for longer than a worker may stay silent (a stale cluster-file
    /// entry, a firewall, the wrong address): not a worker that is starting.
    Unreachable,
    Alive,
    /// Stopped answering the heartbeat (it stays listed: discovery still names it).
    Lost,
    /// Speaks another request-plane version.
    Incompatible {
        theirs: u32,
    },
}

/// KV events a worker published, and how fast lately.
#[derive(Debug, Default)]
pub struct KvActivity {
    pub events: u64,
    pub stored_blocks: u64,
    pub removed_blocks: u64,
    /// (when a batch came, events before it) over the last `RATE_WINDOW`.
    samples: VecDeque<(Instant, u64)>,
}

impl KvActivity {
    fn record(&mut self, batch: &KvEventBatch, now: Instant) {
        self.samples.push_back((now, self.events));
        self.events += batch.events.len() as u64;
        for event in &batch.events {
            match event {
                KvEvent::Stored { blocks, .. } => self.stored_blocks += blocks.len() as u64,
                KvEvent::Removed { hashes } => self.removed_blocks += hashes.len() as u64,
                KvEvent::Cleared => {}
            }
        }
        while self.samples.front().is_some_and(|&(at, _)| now - at > RATE_WINDOW) {
            self.samples.pop_front();
        }
    }

    /// Events per second over the window, as of `now` (a worker gone quiet decays to zero). Samples are
    /// pruned only when a batch comes, so the window is applied here too: an old sample still held must not
    /// hide the batches after it.
    pub fn rate(&self, now: Instant) -> f64 {
        let within = self.samples.iter().find(|&&(at, _)| now.saturating_duration_since(at) <= RATE_WINDOW);
        let Some(&(first, before_first)) = within else { return 0.0 };
        // At least a second: one batch just in is not an infinite rate.
        (self.events - before_first) as f64 / now.saturating_duration_since(first).as_secs_f64().max(1.0)
    }
}

#[derive(Debug)]
pub struct WorkerView {
    pub endpoint: String,
    pub state: PeerState,
    pub instance: Option<Instance>,
    pub load: Option<LoadMetrics>,
    pub stats: Option<WorkerStats>,
    /// A planner's latest plan.
    pub plan: Option<Plan>,
    /// A router's latest traffic report.
    pub report: Option<RouterReport>,
    pub kv: KvActivity,
    /// Its load reports over the last minutes.
    pub history: History,
    /// Event-plane messages from it that never arrived.
    pub lost_messages: u64,
    /// When discovery named it.
    pub found: Instant,
}

impl WorkerView {
    /// A planner's or a router's record, not a worker's.
    pub fn is_not_worker(&self) -> bool {
        self.instance.as_ref().is_some_and(|i| matches!(i.role, Role::Planner | Role::Router))
    }

    /// An alive worker at its record's request address that has reported `load` (a view of workers known
    /// otherwise than through the planes: in-process ones, tests).
    pub fn reporting(instance: Instance, load: LoadMetrics) -> Self {
        let endpoint = instance.request_addr.clone();
        Self { state: PeerState::Alive, instance: Some(instance), load: Some(load), ..Self::new(endpoint) }
    }

    fn new(endpoint: String) -> Self {
        Self {
            found: Instant::now(),
            endpoint,
            state: PeerState::Connecting,
            instance: None,
            load: None,
            stats: None,
            plan: None,
            report: None,
            kv: KvActivity::default(),
            history: History::default(),
            lost_messages: 0,
        }
    }
}

/// What `dynamo top` knows of one namespace.
#[derive(Debug)]
pub struct ClusterView {
    pub namespace: String,
    /// By request endpoint, as discovery names workers.
    pub workers: BTreeMap<String, WorkerView>,
    /// Event-plane messages that did not decode.
    pub malformed: u64,
    /// How long a worker found by discovery may take to answer before it is shown as unreachable.
    pub answer_within: Duration,
    /// The cluster's totals over the last minutes.
    pub history: History,
}

impl ClusterView {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            workers: BTreeMap::new(),
            malformed: 0,
            answer_within: Duration::from_secs(5),
            history: History::default(),
        }
    }

    /// A worker's state as of `now`: one still connecting past `answer_within` is unreachable.
    pub fn state(&self, worker: &WorkerView, now: Instant) -> PeerState {
        match worker.state {
            PeerState::Connecting if now.saturating_duration_since(worker.found) > self.answer_within => {
                PeerState::Unreachable
            }
            ref state => state.clone(),
        }
    }

    fn discovered(&mut self, endpoint: String) {
        self.workers.entry(endpoint.clone()).or_insert_with(|| WorkerView::new(endpoint));
    }

    fn removed(&mut self, endpoint: &str) {
        self.workers.remove(endpoint);
    }

    /// A worker's answer to a ping. False when it says the worker belongs to another namespace (only a
    /// hand-written cluster-file entry, which names no namespace, lets one through discovery): it leaves the
    /// view, as a router does not use it either.
    fn status(&mut self, endpoint: &str, status: WorkerStatus) -> bool {
        if let WorkerStatus::Alive(instance) = &status
            && instance.namespace != self.namespace
        {
            self.removed(endpoint);
            return false;
        }
        let Some(worker) = self.workers.get_mut(endpoint) else { return true };
        match status {
            WorkerStatus::Alive(instance) => {
                worker.state = PeerState::Alive;
                if let Some(previous) = worker.instance.replace(instance.clone())
                    && previous.id != instance.id
                {
                    // Restarted under a new id: what the old process published is history.
                    worker.load = None;
                    worker.stats = None;
                    worker.plan = None;
                    worker.report = None;
                    worker.kv = KvActivity::default();
                    worker.history = History::default();
                }
            }
            WorkerStatus::Lost => worker.state = PeerState::Lost,
            WorkerStatus::Incompatible { theirs } => worker.state = PeerState::Incompatible { theirs },
        }
        true
    }

    /// A message from the worker at `endpoint` (`Members` delivers only from the process that answered
    /// there last).
    fn deliver(&mut self, endpoint: &str, delivery: Delivery, now: Instant) {
        let Some(worker) = self.workers.get_mut(endpoint) else { return };
        if let Continuity::Gap(lost) = delivery.continuity {
            worker.lost_messages += lost;
        }
        let topic = delivery.header.topic;
        let decoded = match topic {
            Topic::Kv => KvEventBatch::from_bytes(&delivery.payload).map(|batch| worker.kv.record(&batch, now)),
            Topic::Load => LoadMetrics::from_bytes(&delivery.payload).map(|load| {
                worker.history.record_load(now, &load, worker.stats);
                worker.load = Some(load);
            }),
            Topic::Stats => WorkerStats::from_bytes(&delivery.payload).map(|stats| worker.stats = Some(stats)),
            Topic::Plan => Plan::from_bytes(&delivery.payload).map(|plan| worker.plan = Some(plan)),
            Topic::Router => RouterReport::from_bytes(&delivery.payload).map(|report| worker.report = Some(report)),
        };
        if decoded.is_err() {
            self.malformed += 1;
            return;
        }
        if topic == Topic::Router {
            self.note_routed_ttft(endpoint);
        }
        if matches!(topic, Topic::Load | Topic::Router) && self.history.cluster_sample_due(now) {
            let totals = self.totals(now);
            self.history.record_cluster(totals);
        }
    }

    /// The median TTFT the router at `endpoint` saw from each worker, into that worker's history.
    fn note_routed_ttft(&mut self, endpoint: &str) {
        let Some(report) = self.workers.get(endpoint).and_then(|w| w.report.clone()) else { return };
        for routed in &report.routed {
            let (Some(ttft), Ok(id)) = (routed.ttft_p50_ms, u64::from_str_radix(&routed.worker, 16)) else { continue };
            let worker = self.workers.values_mut().find(|w| w.instance.as_ref().is_some_and(|i| i.id == id));
            if let Some(worker) = worker {
                worker.history.note_ttft(ttft);
            }
        }
    }

    /// The cluster as of `now`: what alive workers run and wait on and their KV in use, and what its routers
    /// report (requests per second, summed; the slowest median TTFT).
    pub fn totals(&self, now: Instant) -> history::Sample {
        // A worker that stopped answering runs nothing any more, whatever it last reported.
        let alive = self.workers.values().filter(|w| w.state == PeerState::Alive);
        let loads = alive.filter_map(|w| w.load.as_ref());
        let (running, waiting, active, total) = loads.fold((0, 0, 0, 0), |(r, w, a, t), load| {
            let (running, waiting) = (u64::from(load.requests_running), u64::from(load.requests_waiting));
            (r + running, w + waiting, a + load.kv_active_blocks, t + load.kv_total_blocks)
        });
        let reports: Vec<&RouterReport> = self.workers.values().filter_map(|w| w.report.as_ref()).collect();
        let requests_per_s = (!reports.is_empty()).then(|| reports.iter().map(|r| r.requests_per_s).sum());
        let ttft_ms = reports.iter().filter_map(|r| r.ttft_p50_ms.or(r.ttft_ms)).reduce(f64::max);
        let moving = self.workers.values().filter(|w| w.state == PeerState::Alive);
        let kv_read_per_s =
            moving.clone().filter_map(|w| w.history.last().and_then(|s| s.kv_read_per_s)).reduce(|a, b| a + b);
        let images_per_s = moving.filter_map(|w| w.history.last().and_then(|s| s.images_per_s)).reduce(|a, b| a + b);
        history::Sample {
            at: now,
            running: running as f64,
            waiting: waiting as f64,
            kv_active: if total > 0 { active as f64 / total as f64 } else { f64::NAN },
            requests_per_s,
            ttft_ms,
            kv_read_per_s,
            images_per_s,
        }
    }

    /// Alive workers (planners are members, not workers).
    pub fn alive(&self) -> usize {
        self.workers.values().filter(|w| w.state == PeerState::Alive && !w.is_not_worker()).count()
    }

    /// Each router's latest traffic and each planner's latest plan, one line each: what `top` shows under its
    /// summary.
    pub fn members(&self) -> Vec<String> {
        let members = self.workers.values().filter(|w| w.is_not_worker());
        members
            .flat_map(|w| {
                let id = w.instance.as_ref().map_or_else(|| "-".into(), |i| format!("{:016x}", i.id));
                if w.instance.as_ref().is_some_and(|i| i.role == Role::Router) {
                    return router_lines(&id, w.report.as_ref());
                }
                let Some(plan) = &w.plan else { return vec![format!("planner {id}: no plan yet")] };
                let forecast = plan.forecast.map_or_else(String::new, |f| {
                    format!(
                        "; next interval {:.0} requests, {:.0} prompt and {:.0} output tokens",
                        f.requests, f.input_tokens, f.output_tokens
                    )
                });
                vec![format!(
                    "planner {id}: {} decode, {} prefill workers{forecast} ({})",
                    plan.decode, plan.prefill, plan.reason
                )]
            })
            .collect()
    }

    /// KV events per second from every worker.
    pub fn kv_rate(&self, now: Instant) -> f64 {
        // Folded from +0: an empty float sum is -0, which prints as "-0".
        self.workers.values().fold(0.0, |sum, w| sum + w.kv.rate(now))
    }

    /// The namespace in one line: workers, requests, KV use and event-plane health over every worker.
    pub fn summary(&self, now: Instant) -> String {
        let totals = self.totals(now);
        let (running, waiting) = (totals.running, totals.waiting);
        let used = if totals.kv_active.is_nan() { "-".into() } else { format!("{:.1}%", 100.0 * totals.kv_active) };
        let workers = self.workers.values().filter(|w| !w.is_not_worker()).count();
        format!(
            "namespace {:?}: {workers} worker{}, {} alive; {running} running, {waiting} waiting; KV {used} active; \
             {:.0} KV events/s; {} lost and {} malformed event-plane messages",
            self.namespace,
            if workers == 1 { "" } else { "s" },
            self.alive(),
            self.kv_rate(now),
            self.workers.values().map(|w| w.lost_messages).sum::<u64>(),
            self.malformed
        )
    }

    /// One row per worker, in `COLUMNS` order: what both the live table and the text snapshot show.
    pub fn rows(&self, now: Instant) -> Vec<[String; COLUMNS.len()]> {
        self.workers.values().map(|worker| row(worker, &self.state(worker, now), now)).collect()
    }

    /// The view as one JSON object, for scripts: the same facts as the table, with numbers as numbers.
    pub fn json(&self, now: Instant) -> serde_json::Value {
        let workers: Vec<serde_json::Value> = self.workers.values().map(|w| self.member_json(w, now)).collect();
        serde_json::json!({"namespace": self.namespace, "workers": workers, "malformed": self.malformed})
    }

    /// One member as `json` gives it (the detail view shows it too).
    pub fn member_json(&self, w: &WorkerView, now: Instant) -> serde_json::Value {
        // Ids as the hex the table and the logs show: as JSON numbers past 2^53, JavaScript and jq round them.
        let mut record = serde_json::json!(w.instance);
        if let (Some(instance), Some(fields)) = (&w.instance, record.as_object_mut()) {
            fields.insert("id".into(), format!("{:016x}", instance.id).into());
        }
        serde_json::json!({
            // What changes first, the record last: the detail view shows this, and a short terminal cuts the end.
            "endpoint": w.endpoint,
            "state": self.state(w, now),
            "load": w.load,
            "stats": w.stats,
            "plan": w.plan,
            "report": w.report,
            "kv_events": w.kv.events,
            "kv_stored_blocks": w.kv.stored_blocks,
            "kv_removed_blocks": w.kv.removed_blocks,
            "kv_events_per_s": w.kv.rate(now),
            "lost_messages": w.lost_messages,
            "record": record,
        })
    }

    /// The view as aligned text: the summary, then the table.
    pub fn text(&self, now: Instant) -> String {
        let rows = self.rows(now);
        let widths = column_widths(&rows);
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let padded: Vec<String> = cells.zip(&widths).map(|(cell, &width)| format!("{cell:<width$}")).collect();
            padded.join("  ").trim_end().to_string()
        };
        let mut out = format!("{}\n", self.summary(now));
        for member in self.members() {
            out.push_str(&member);
            out.push('\n');
        }
        out.push_str(&line(&mut COLUMNS.iter().copied()));
        out.push('\n');
        for row in &rows {
            out.push_str(&line(&mut row.iter().map(String::as_str)));
            out.push('\n');
        }
        out
    }
}

/// ROUTED and REFUSED count what came over the request plane (from routers); a `dynamo run`'s own frontend
/// reaches its workers directly, so its requests show in RUN and WAIT only. KV XFER is where the worker's
/// transfer agent takes peers (`--kv-transfer`), `-` for a worker that hands nothing on. RUN is out of the
/// most it runs at once where it says (`--max-num-seqs`); RUN TREND is its running requests over its last
/// `TREND_SAMPLES` load reports. DEVICE is what it computes on, as its answer to a ping says. IMAGES, for
/// workers of a model that takes them: images encoded (and read from encode workers), and the rate lately.
pub const COLUMNS: [&str; 17] = [
    "WORKER",
    "MODEL",
    "ROLE",
    "DEVICE",
    "STATE",
    "RUN",
    "WAIT",
    "RUN TREND",
    "KV ACTIVE",
    "KV HELD",
    "KV EV/S",
    "ROUTED",
    "REFUSED",
    "ENDPOINT",
    "KV XFER",
    "HANDOFFS",
    "IMAGES",
];

/// Load reports a RUN TREND cell draws (a worker reports about once a second).
pub const TREND_SAMPLES: usize = 16;

/// Each column as wide as its widest cell or its title.
pub fn column_widths(rows: &[[String; COLUMNS.len()]]) -> [usize; COLUMNS.len()] {
    let mut widths = COLUMNS.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

fn row(worker: &WorkerView, state: &PeerState, now: Instant) -> [String; COLUMNS.len()] {
    let unknown = || "-".to_string();
    let instance = worker.instance.as_ref();
    let state = match state {
        PeerState::Connecting => "connecting".to_string(),
        PeerState::Unreachable => "no answer".to_string(),
        PeerState::Alive if worker.load.is_some_and(|l| l.engine_down) => "engine down".to_string(),
        PeerState::Alive => "alive".to_string(),
        PeerState::Lost => "lost".to_string(),
        PeerState::Incompatible { theirs } => format!("protocol v{theirs}"),
    };
    let load = worker.load.as_ref();
    let used = load.filter(|l| l.kv_total_blocks > 0).map(|l| {
        let held = l.kv_active_blocks as f64 / l.kv_total_blocks as f64;
        format!("{:.1}%", 100.0 * held)
    });
    [
        instance.map_or_else(unknown, |i| format!("{:016x}", i.id)),
        instance.map_or_else(unknown, |i| i.model.clone()),
        instance.map_or_else(unknown, |i| i.role.name().to_string()),
        device(instance, load),
        state,
        load.map_or_else(unknown, |l| match l.max_running {
            0 => l.requests_running.to_string(),
            most => format!("{}/{most}", l.requests_running),
        }),
        load.map_or_else(unknown, |l| l.requests_waiting.to_string()),
        match worker.history.is_empty() {
            true => unknown(),
            false => history::sparkline(&worker.history.series(|s| Some(s.running)), TREND_SAMPLES, 1.0),
        },
        used.unwrap_or_else(unknown),
        load.map_or_else(unknown, |l| format!("{}/{}", l.kv_active_blocks + l.kv_cached_blocks, l.kv_total_blocks)),
        format!("{:.0}", worker.kv.rate(now)),
        worker.stats.map_or_else(unknown, |s| s.accepted.to_string()),
        worker.stats.map_or_else(unknown, |s| s.refused.to_string()),
        worker.endpoint.clone(),
        instance.and_then(|i| i.transfer_endpoint_from(&worker.endpoint)).unwrap_or_else(unknown),
        handoffs(worker),
        images(worker),
    ]
}

/// Images a worker encoded (an encode worker's, or a prefilling worker's own), those whose embeddings it
/// read from encode workers, the reads that failed, and how fast it encodes lately.
fn images(worker: &WorkerView) -> String {
    let Some(images) = worker.stats.map(|s| s.images).filter(|i| *i != Default::default()) else {
        return "-".to_string();
    };
    let mut cell = format!("{} encoded", images.encoded);
    if images.read + images.read_failed > 0 {
        cell.push_str(&format!(", {} read", images.read));
    }
    if images.read_failed > 0 {
        cell.push_str(&format!(" ({} failed)", images.read_failed));
    }
    if let Some(rate) = worker.history.last().and_then(|s| s.images_per_s).filter(|&r| r > 0.0) {
        cell.push_str(&format!(" {rate:.1}/s"));
    }
    cell
}

/// What a worker computes on, and how much of its memory is in use where it says.
fn device(instance: Option<&Instance>, load: Option<&LoadMetrics>) -> String {
    let name = instance.map(|i| i.device.as_str()).filter(|d| !d.is_empty()).unwrap_or("-");
    match load.filter(|l| l.device_memory_total > 0) {
        Some(l) => {
            let gb = |bytes: u64| bytes as f64 / 1e9;
            format!("{name} {:.1}/{:.0} GB", gb(l.device_memory_used), gb(l.device_memory_total))
        }
        None => name.to_string(),
    }
}

/// A router's traffic in one line, and one more per model when it serves several.
fn router_lines(id: &str, report: Option<&RouterReport>) -> Vec<String> {
    let Some(r) = report else { return vec![format!("router {id}: no report yet")] };
    let hit = |hit: Option<f64>| hit.map_or_else(|| "-".to_string(), |hit| format!("{:.0}%", hit * 100.0));
    let models = r.models.iter().map(|m| {
        format!(
            "  model {}: {:.1} requests/s, {:.0} tokens/s, TTFT {}, prefix hit {}",
            m.model,
            m.requests_per_s,
            m.output_tokens_per_s,
            latency(None, m.ttft_p50_ms, m.ttft_p99_ms),
            hit(m.prefix_hit)
        )
    });
    let disagg = (!r.disagg.is_empty()).then(|| {
        let decisions: Vec<String> =
            r.disagg.iter().map(|(decision, rate)| format!("{decision} {rate:.1}/s")).collect();
        format!("  prefill: {}", decisions.join(" · "))
    });
    std::iter::once(router_line(id, r)).chain(models).chain(routed_line(&r.routed)).chain(disagg).collect()
}

/// Workers a router's report names past this are summed up in one "more".
const ROUTED_SHOWN: usize = 8;

/// Where a router's requests went over its last interval, busiest first; nothing when none went anywhere.
fn routed_line(routed: &[crate::core::protocol::RoutedTo]) -> Option<String> {
    let total: f64 = routed.iter().map(|r| r.requests_per_s).sum();
    if total <= 0.0 {
        return None;
    }
    let mut shown: Vec<String> = (routed.iter().take(ROUTED_SHOWN))
        .map(|r| {
            let ttft = r.ttft_p50_ms.map_or_else(String::new, |ms| format!(", TTFT p50 {ms:.0} ms"));
            format!("{} {:.1}/s ({:.0}%{ttft})", r.worker, r.requests_per_s, 100.0 * r.requests_per_s / total)
        })
        .collect();
    if routed.len() > ROUTED_SHOWN {
        let rest: f64 = routed[ROUTED_SHOWN..].iter().map(|r| r.requests_per_s).sum();
        shown.push(format!("{} more {rest:.1}/s", routed.len() - ROUTED_SHOWN));
    }
    Some(format!("  routed to: {}", shown.join(" · ")))
}

/// Median / 99th percentile when the report has them, else the mean.
fn latency(mean: Option<f64>, p50: Option<f64>, p99: Option<f64>) -> String {
    match (p50, p99, mean) {
        (Some(p50), Some(p99), _) => format!("p50 {p50:.1} / p99 {p99:.1} ms"),
        (_, _, Some(mean)) => format!("{mean:.1} ms"),
        _ => "-".to_string(),
    }
}

/// A router's traffic, every model together, in one line.
fn router_line(id: &str, r: &RouterReport) -> String {
    let hit = r.prefix_hit.map_or_else(|| "-".to_string(), |hit| format!("{:.0}%", hit * 100.0));
    format!(
        "router {id}: {:.1} requests/s ({:.1} refused), {:.0} tokens/s, TTFT {}, ITL {}, prefix hit {hit}, {} workers",
        r.requests_per_s,
        r.refused_per_s,
        r.output_tokens_per_s,
        latency(r.ttft_ms, r.ttft_p50_ms, r.ttft_p99_ms),
        latency(r.itl_ms, r.itl_p50_ms, r.itl_p99_ms),
        r.workers
    )
}

/// Prompts' KV a worker held for decode workers or read from prefill workers, the reads that failed, and how
/// fast it reads lately.
fn handoffs(worker: &WorkerView) -> String {
    let offers = worker.instance.as_ref().is_some_and(|i| i.transfer_addr.is_some());
    let Some(kv) = worker.stats.map(|s| s.kv).filter(|_| offers) else { return "-".to_string() };
    let mut cell = (kv.held + kv.read).to_string();
    if kv.read_failed > 0 {
        cell.push_str(&format!(" ({} failed)", kv.read_failed));
    }
    if let Some(rate) = worker.history.last().and_then(|s| s.kv_read_per_s).filter(|&r| r > 0.0) {
        cell.push_str(&format!(" {}", bytes_per_s(rate)));
    }
    cell
}

/// A rate of bytes as people read it.
pub fn bytes_per_s(rate: f64) -> String {
    match rate {
        r if r >= 1e9 => format!("{:.1} GB/s", r / 1e9),
        r if r >= 1e6 => format!("{:.1} MB/s", r / 1e6),
        r => format!("{:.0} kB/s", r / 1e3),
    }
}

/// Follows `namespace` into `view` until discovery ends: pings every worker discovery names and subscribes
/// to the event plane of every one that answers.
pub async fn watch(
    discovery: Box<dyn Discovery>,
    namespace: String,
    dead_after: Duration,
    key: Option<crate::core::trust::ClusterKey>,
    view: Arc<Mutex<ClusterView>>,
) -> Result<(), PlaneError> {
    let mut members = Members::watch(discovery.as_ref(), &namespace, dead_after, key.as_ref(), &Topic::ALL)?;
    let view = || view.lock().unwrap_or_else(|p| p.into_inner());
    view().answer_within = dead_after;
    while let Some(change) = members.next().await {
        match change {
            Change::Found(endpoint) => view().discovered(endpoint),
            Change::Left(endpoint) => view().removed(&endpoint),
            Change::Answered { endpoint, instance } => {
                if !view().status(&endpoint, WorkerStatus::Alive(instance.clone())) {
                    tracing::warn!("worker at {endpoint} answered for another namespace than {namespace:?}; not shown");
                    members.forget(&endpoint);
                } else if let Err(error) = members.subscribe(&endpoint, &instance) {
                    tracing::warn!("cannot subscribe to the events of worker at {endpoint}: {error}");
                }
            }
            Change::Lost(endpoint) => {
                view().status(&endpoint, WorkerStatus::Lost);
            }
            Change::Incompatible { endpoint, theirs } => {
                view().status(&endpoint, WorkerStatus::Incompatible { theirs });
            }
            Change::Delivered { endpoint, delivery } => view().deliver(&endpoint, delivery, Instant::now()),
            Change::Malformed(_) => view().malformed += 1,
            Change::Dropped(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
