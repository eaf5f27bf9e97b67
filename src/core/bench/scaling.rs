//! `dynamo bench planner --simulate`: a trace replayed in simulated time on mocker workers that the planner
//! sizes, against static pools of mocker workers, in one run: for each, the share of requests that met both
//! latency targets (SLA attainment) and the worker-hours it spent.
//!
//! The planner runs as `dynamo route --planner … --planner-profile` does, with the mocker's own profile and
//! a connector that starts in-process mocker workers (each joins the router after a start-up delay, as a
//! real worker loads its weights first) and stops them as a drained worker stops: out of the router at once,
//! gone once its last request has ended. Its predictors are warmed up on the trace's first interval (Dynamo's
//! warm-up trace), and the workers of its first plan are up from the start, as a static pool's are.
//! Worker-hours count from a worker's start to its end. The static pools: the fewest workers that reach the
//! target attainment, found by bisection (attainment grows with workers), with every pool tried reported.
use super::route::{Judged, Pace, Replayed, judge, replay};
use super::trace::TraceRequest;
use crate::core::engine::Engine;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::engine::profile::Profile;
use crate::core::engine::scheduler::SchedulerConfig;
use crate::core::planner::load::{Bounds, Thresholds};
use crate::core::planner::sla::Targets;
use crate::core::planner::{Connector, Plan, Planner, PlannerSettings, ProfileSource, SlaSettings};
use crate::core::protocol::WorkerId;
use crate::core::protocol::discovery::{Instance, ModelCardSummary, Role};
use crate::core::router::{Pool, Router, RouterConfig};
use crate::core::telemetry::{Metrics, Traffic};
use crate::core::top::{ClusterView, WorkerView};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ScalingSettings {
    pub speedup: f64,
    pub scheduler: SchedulerConfig,
    /// Tokens per trace block id.
    pub block_tokens: usize,
    /// In simulated ms (their `attainment` is this struct's).
    pub targets: Targets,
    /// The share of requests that must meet both targets.
    pub attainment: f64,
    pub max_workers: usize,
    /// The planner's interval and a worker's start-up, in simulated seconds.
    pub interval_s: f64,
    pub startup_s: f64,
    pub predictor: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScalingResult {
    pub setup: String,
    pub workers_mean: f64,
    pub workers_max: usize,
    /// Simulated hours of every worker, start to end.
    pub worker_hours: f64,
    pub requests: usize,
    pub errors: usize,
    /// Share of requests that met both targets (failed ones did not).
    pub attainment: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p90_ms: f64,
}

pub async fn run(trace: &[TraceRequest], settings: &ScalingSettings) -> Result<Vec<ScalingResult>, String> {
    let mut results = vec![run_planner(trace, settings).await?];
    let mut statics = BTreeMap::new();
    let meets = |result: &ScalingResult| result.attainment >= settings.attainment;
    let (mut low, mut high) = (1, settings.max_workers.max(1));
    let most = run_static(trace, settings, high).await;
    let enough = meets(&most);
    statics.insert(high, most);
    if enough {
        while low < high {
            let middle = (low + high) / 2;
            let result = run_static(trace, settings, middle).await;
            if meets(&result) {
                high = middle;
            } else {
                low = middle + 1;
            }
            statics.insert(middle, result);
        }
    }
    results.extend(statics.into_values());
    Ok(results)
}

/// The best static pool of a run: the fewest workers that met the target, if any did.
pub fn best_static(results: &[ScalingResult], attainment: f64) -> Option<&ScalingResult> {
    results.iter().filter(|r| r.setup.starts_with("static") && r.attainment >= attainment).min_by_key(|r| r.workers_max)
}

fn mocker_config(settings: &ScalingSettings) -> MockerConfig {
    MockerConfig { scheduler: settings.scheduler.clone(), speedup: settings.speedup, ..MockerConfig::default() }
}

fn router_config(settings: &ScalingSettings) -> RouterConfig {
    RouterConfig {
        busy_threshold: usize::MAX / 2,
        block_size: settings.scheduler.block_size,
        ..RouterConfig::default()
    }
}

fn vocab() -> Arc<[u32]> {
    (0..32_000).collect()
}

async fn run_static(trace: &[TraceRequest], settings: &ScalingSettings, workers: usize) -> ScalingResult {
    let (config, vocab) = (mocker_config(settings), vocab());
    let engines: Vec<Arc<dyn Engine>> = (0..workers)
        .map(|id| Arc::new(MockerEngine::spawn(id as u64, config.clone(), vocab.clone())) as Arc<dyn Engine>)
        .collect();
    let router = Arc::new(Router::new(engines, router_config(settings)));
    let replayed = replay(trace, &router, settings.speedup, settings.block_tokens, Pace::Timestamps, None).await;
    let worker_seconds = workers as f64 * replayed.elapsed_s;
    result(format!("static {workers}"), settings, &replayed, worker_seconds, workers)
}

fn result(
    setup: String,
    settings: &ScalingSettings,
    replayed: &Replayed,
    worker_seconds: f64,
    workers_max: usize,
) -> ScalingResult {
    let Targets { ttft_ms, itl_ms, .. } = settings.targets;
    let Judged { ttfts, itls, good } = judge(&replayed.outcomes, settings.speedup, ttft_ms, itl_ms);
    let requests = replayed.outcomes.len() + replayed.errors;
    ScalingResult {
        setup,
        workers_mean: worker_seconds / replayed.elapsed_s.max(1e-9),
        workers_max,
        worker_hours: worker_seconds * settings.speedup / 3600.0,
        requests: replayed.outcomes.len(),
        errors: replayed.errors,
        attainment: good as f64 / requests.max(1) as f64,
        ttft_p50_ms: super::percentile(&ttfts, 0.5),
        ttft_p90_ms: super::percentile(&ttfts, 0.9),
        itl_p50_ms: super::percentile(&itls, 0.5),
        itl_p90_ms: super::percentile(&itls, 0.9),
    }
}

async fn run_planner(trace: &[TraceRequest], settings: &ScalingSettings) -> Result<ScalingResult, String> {
    let real = |simulated_s: f64| Duration::from_secs_f64((simulated_s / settings.speedup).max(1e-3));
    let interval = real(settings.interval_s);
    // Planned in real time: the mocker's profile and the targets at its speedup.
    let profile = Profile::mocker(&mocker_config(settings));
    let targets = Targets {
        ttft_ms: settings.targets.ttft_ms / settings.speedup,
        itl_ms: settings.targets.itl_ms / settings.speedup,
        attainment: Some(settings.attainment),
    };
    let planner_settings = PlannerSettings {
        interval,
        sample_every: interval / 10,
        predictor: settings.predictor.clone(),
        decode: Bounds { min: 1, max: settings.max_workers.max(1) },
        prefill: Bounds { min: 0, max: 0 },
        budget: settings.max_workers.max(1),
        thresholds: Thresholds::default(),
        sla: Some(SlaSettings { profile: ProfileSource::File(Arc::new(profile)), targets }),
    };
    let router = Arc::new(Router::new(Vec::new(), router_config(settings)));
    let fleet = Arc::new(Mutex::new(Fleet::default()));
    let connector = SimulatedConnector {
        fleet: fleet.clone(),
        router: router.clone(),
        config: mocker_config(settings),
        vocab: vocab(),
        startup: real(settings.startup_s),
    };
    let (view, metrics) = (Arc::new(Mutex::new(ClusterView::new("bench"))), Arc::new(Metrics::new()));
    let mut planner = Planner::new(planner_settings, view.clone(), metrics.clone(), Box::new(connector))?;
    planner.warm_up(&[first_interval(trace, settings.interval_s)]);
    let refresh = crate::core::AbortOnDrop(tokio::spawn(refresh_view(fleet.clone(), view, interval / 20)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let planning = tokio::spawn(planner.run(async move {
        let _ = stopped.await;
    }));
    while fleet.lock().unwrap_or_else(|p| p.into_inner()).joined() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let replayed =
        replay(trace, &router, settings.speedup, settings.block_tokens, Pace::Timestamps, Some(&metrics)).await;
    let _ = stop.send(());
    let _ = planning.await;
    drop(refresh);
    let fleet = fleet.lock().unwrap_or_else(|p| p.into_inner());
    Ok(result("planner".into(), settings, &replayed, fleet.worker_seconds(), fleet.most))
}

/// The traffic of the trace's first `interval_s` simulated seconds.
fn first_interval(trace: &[TraceRequest], interval_s: f64) -> Traffic {
    let start = trace.first().map_or(0, |r| r.timestamp);
    let within = trace.iter().filter(|r| (r.timestamp.saturating_sub(start) as f64) < interval_s * 1000.0);
    within.fold(Traffic::default(), |t, r| Traffic {
        requests: t.requests + 1,
        input_tokens: t.input_tokens + r.input_length,
        output_tokens: t.output_tokens + r.output_length,
        ..t
    })
}

/// The planner's mocker workers.
#[derive(Default)]
struct Fleet {
    workers: Vec<SimulatedWorker>,
    next_id: WorkerId,
    /// Real seconds of workers that have ended.
    ended_seconds: f64,
    /// Most workers at once.
    most: usize,
}

struct SimulatedWorker {
    id: WorkerId,
    engine: Arc<dyn Engine>,
    started: Instant,
    joined: Arc<std::sync::atomic::AtomicBool>,
    joining: Option<crate::core::AbortOnDrop>,
    stopping: bool,
}

impl SimulatedWorker {
    fn has_joined(&self) -> bool {
        self.joined.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Fleet {
    fn joined(&self) -> usize {
        self.workers.iter().filter(|w| w.has_joined() && !w.stopping).count()
    }

    fn worker_seconds(&self) -> f64 {
        self.ended_seconds + self.workers.iter().map(|w| w.started.elapsed().as_secs_f64()).sum::<f64>()
    }

    /// Ends stopped workers whose last request has ended.
    fn reap(&mut self) {
        let mut ended = 0.0;
        self.workers.retain(|worker| {
            let load = worker.engine.load();
            let done = worker.stopping && load.requests_running + load.requests_waiting == 0;
            if done {
                ended += worker.started.elapsed().as_secs_f64();
            }
            !done
        });
        self.ended_seconds += ended;
    }
}

/// Starts and stops in-process mocker workers of one router.
struct SimulatedConnector {
    fleet: Arc<Mutex<Fleet>>,
    router: Arc<Router>,
    config: MockerConfig,
    vocab: Arc<[u32]>,
    startup: Duration,
}

impl Connector for SimulatedConnector {
    fn apply(&mut self, plan: &Plan, _view: &ClusterView) {
        let mut fleet = self.fleet.lock().unwrap_or_else(|p| p.into_inner());
        fleet.reap();
        let first = fleet.workers.is_empty() && fleet.next_id == 0;
        let running = fleet.workers.iter().filter(|w| !w.stopping).count();
        for _ in running..plan.decode {
            let id = fleet.next_id;
            fleet.next_id += 1;
            let engine: Arc<dyn Engine> = Arc::new(MockerEngine::spawn(id, self.config.clone(), self.vocab.clone()));
            // The first plan's workers are up from the start, as a static pool's are (and before this returns,
            // so the replay that follows finds them).
            let joined = Arc::new(std::sync::atomic::AtomicBool::new(first));
            let joining = match first {
                true => {
                    self.router.add_worker(engine.clone(), Pool::Decode);
                    None
                }
                false => {
                    let (router, engine, flag, delay) =
                        (self.router.clone(), engine.clone(), joined.clone(), self.startup);
                    Some(crate::core::AbortOnDrop(tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        router.add_worker(engine, Pool::Decode);
                        flag.store(true, std::sync::atomic::Ordering::Release);
                    })))
                }
            };
            fleet.workers.push(SimulatedWorker {
                id,
                engine,
                started: Instant::now(),
                joined,
                joining,
                stopping: false,
            });
        }
        let surplus = running.saturating_sub(plan.decode);
        // Those still starting go first, then the least loaded.
        let mut candidates: Vec<usize> = (0..fleet.workers.len()).filter(|&at| !fleet.workers[at].stopping).collect();
        candidates.sort_by_key(|&at| {
            let worker = &fleet.workers[at];
            let load = worker.engine.load();
            (worker.has_joined(), u64::from(load.requests_running + load.requests_waiting) + load.kv_active_blocks)
        });
        for at in candidates.into_iter().take(surplus) {
            let worker = &mut fleet.workers[at];
            worker.joining = None;
            self.router.remove_worker(worker.id);
            worker.stopping = true;
        }
        let live = fleet.workers.len();
        fleet.most = fleet.most.max(live);
        fleet.reap();
    }

    fn settling(&mut self, _view: &ClusterView) -> Option<String> {
        let mut fleet = self.fleet.lock().unwrap_or_else(|p| p.into_inner());
        fleet.reap();
        let starting = fleet.workers.iter().filter(|w| !w.stopping && !w.has_joined()).count();
        let draining = fleet.workers.iter().filter(|w| w.stopping).count();
        (starting + draining > 0).then(|| format!("{starting} workers starting, {draining} draining"))
    }

    fn shutdown(&mut self) {}
}

/// Keeps `view` showing the fleet's joined workers as a watch of the cluster would.
async fn refresh_view(fleet: Arc<Mutex<Fleet>>, view: Arc<Mutex<ClusterView>>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    loop {
        tick.tick().await;
        let workers: Vec<WorkerView> = {
            let fleet = fleet.lock().unwrap_or_else(|p| p.into_inner());
            let live = fleet.workers.iter().filter(|w| w.has_joined() && !w.stopping);
            live.map(|w| worker_view(w.id, w.engine.load())).collect()
        };
        let mut view = view.lock().unwrap_or_else(|p| p.into_inner());
        view.workers = workers.into_iter().map(|w| (w.endpoint.clone(), w)).collect();
    }
}

fn worker_view(id: WorkerId, load: crate::core::protocol::LoadMetrics) -> WorkerView {
    let endpoint = format!("inproc://{id}");
    let instance = Instance {
        id,
        role: Role::Decode,
        model: "bench".into(),
        namespace: "bench".into(),
        request_addr: endpoint.clone(),
        event_addr: String::new(),
        transfer_addr: None,
        card: ModelCardSummary { block_size: 0, context_length: 0, kv_blocks: load.kv_total_blocks, tokenizer_hash: 0 },
        device: "mocker (simulated)".into(),
        http_addr: None,
        adapters: Vec::new(),
    };
    WorkerView::reporting(instance, load)
}

/// The readable report.
pub fn table(results: &[ScalingResult], settings: &ScalingSettings) -> String {
    let mut out = format!(
        "{:<10} {:>8} {:>7} {:>12} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9}\n",
        "setup", "workers", "most", "worker-h", "requests", "errors", "attained", "ttft p50", "itl p50", "itl p90"
    );
    for r in results {
        out.push_str(&format!(
            "{:<10} {:>8.2} {:>7} {:>12.3} {:>9} {:>7} {:>9.1}% {:>8.0}ms {:>7.1}ms {:>7.1}ms\n",
            r.setup,
            r.workers_mean,
            r.workers_max,
            r.worker_hours,
            r.requests,
            r.errors,
            r.attainment * 100.0,
            r.ttft_p50_ms,
            r.itl_p50_ms,
            r.itl_p90_ms
        ));
    }
    let planner = results.iter().find(|r| r.setup == "planner");
    match (planner, best_static(results, settings.attainment)) {
        (Some(planner), Some(best)) => out.push_str(&format!(
            "planner / {}: {:.2}× the worker-hours, attainment {:.1}% against {:.1}% (target {:.0}%)\n",
            best.setup,
            planner.worker_hours / best.worker_hours.max(1e-12),
            planner.attainment * 100.0,
            best.attainment * 100.0,
            settings.attainment * 100.0
        )),
        _ => out.push_str(&format!(
            "no static pool of at most {} workers reached {:.0}% attainment\n",
            settings.max_workers,
            settings.attainment * 100.0
        )),
    }
    out
}
