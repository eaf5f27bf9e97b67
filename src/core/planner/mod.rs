//! The planner (`dynamo route --planner`): each interval it reads the cluster's load and the frontend's
//! traffic, forecasts the next interval's traffic, decides how many workers of each role the cluster should
//! have, and hands that plan to a connector that makes it so.
//!
//! - `forecast`: the traffic forecast (one observation per interval in, the next interval's value out).
//! - `load`: load-based scaling, one worker up or down per role and interval, on KV pressure.
//! - `sla`: the fewest workers that meet latency targets, from a worker's performance profile (`engine::profile`).
//! - `local`: the connector that starts and drains `dynamo decode` / `dynamo prefill` processes on this box.
//! - `kubernetes`: the connector that sets the replicas of the Deployments running each role.
//!
//! The planner sees the cluster as `dynamo top` does (a `ClusterView` fed by its own watch of discovery and
//! the planes), so it needs nothing from the router but the traffic counts.
pub mod forecast;
pub mod kubernetes;
pub mod load;
pub mod local;
pub mod sla;

use crate::core::engine::profile::Profile;
use crate::core::members::announce::Announcer;
use crate::core::protocol::discovery::Role;
pub use crate::core::protocol::{Forecast, Plan};
use crate::core::telemetry::{Metrics, Traffic};
use crate::core::top::{ClusterView, PeerState};
use forecast::Predictor;
use load::{Bounds, PoolSample, Thresholds};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The roles a plan sizes.
pub const ROLES: [Role; 2] = [Role::Decode, Role::Prefill];

#[derive(Debug, Clone)]
pub struct PlannerSettings {
    /// How often the plan is made.
    pub interval: Duration,
    /// How often load is sampled within an interval.
    pub sample_every: Duration,
    /// The traffic predictor's name (`forecast::by_name`).
    pub predictor: String,
    pub decode: Bounds,
    pub prefill: Bounds,
    /// Most workers of all roles together.
    pub budget: usize,
    pub thresholds: Thresholds,
    /// Profile-based sizing: with it, each role has at least the workers its latency target needs for the
    /// forecast traffic; load-based steps still add to that.
    pub sla: Option<SlaSettings>,
}

#[derive(Debug, Clone)]
pub struct SlaSettings {
    pub profile: ProfileSource,
    pub targets: sla::Targets,
}

/// Where profile-based sizing takes its performance profile from.
#[derive(Debug, Clone)]
pub enum ProfileSource {
    /// A file `dynamo profile` wrote (`--planner-profile PATH`).
    File(Arc<Profile>),
    /// The profile the workers sent this process's router (`--planner-profile workers`), once one has.
    Workers(WorkerProfile),
}

/// The first performance profile a worker sent the router: what `ProfileSource::Workers` reads. Workers of one
/// model send the same one (the mocker's fit, or the file given to every native worker).
pub type WorkerProfile = Arc<std::sync::OnceLock<Arc<Profile>>>;

impl ProfileSource {
    pub fn get(&self) -> Option<Arc<Profile>> {
        match self {
            ProfileSource::File(profile) => Some(profile.clone()),
            ProfileSource::Workers(sent) => sent.get().cloned(),
        }
    }
}

impl PlannerSettings {
    pub fn bounds(&self, role: Role) -> Bounds {
        match role {
            Role::Prefill => self.prefill,
            _ => self.decode,
        }
    }

    /// The roles the plan may give workers (prefill only for disaggregated serving).
    fn roles(&self) -> impl Iterator<Item = (usize, Role)> + '_ {
        ROLES.into_iter().enumerate().filter(|&(_, role)| self.bounds(role).max > 0)
    }
}

/// What carries a plan out.
pub trait Connector: Send {
    /// Brings the workers it runs toward `plan`, given the cluster as `view` shows it. Does not wait for
    /// workers to join or to drain.
    fn apply(&mut self, plan: &Plan, view: &ClusterView);
    /// Why the cluster is not yet as the last plan asked (workers starting, draining), if it is not: the
    /// planner judges load only on a settled cluster.
    fn settling(&mut self, view: &ClusterView) -> Option<String>;
    /// Stops what it started, letting it drain; blocks until it has (or its drain timeout has passed).
    fn shutdown(&mut self);
}

/// Acts on nothing: an orchestrator carries the plan out, as it reads it on the event plane (where every
/// planner publishes its plans), in the log or in the metrics (Dynamo's virtual connector).
pub struct Virtual;

impl Connector for Virtual {
    fn apply(&mut self, _plan: &Plan, _view: &ClusterView) {}

    fn settling(&mut self, _view: &ClusterView) -> Option<String> {
        None
    }

    fn shutdown(&mut self) {}
}

/// Each role's load as sampled now: alive workers that reported it.
pub fn sample(view: &ClusterView) -> [PoolSample; 2] {
    let mut pools = [PoolSample::default(); 2];
    for worker in view.workers.values().filter(|w| w.state == PeerState::Alive) {
        let (Some(instance), Some(load)) = (&worker.instance, &worker.load) else { continue };
        if let Some(at) = ROLES.iter().position(|&role| role == instance.role) {
            pools[at].add(load);
        }
    }
    pools
}

/// What `dynamo route --planner` starts the planner with.
pub struct PlannerStart {
    /// Its own watch of the cluster (the router's is its own business).
    pub discovery: Box<dyn crate::core::discovery::Discovery>,
    pub settings: PlannerSettings,
    pub connector: Box<dyn Connector>,
    /// Where its member sockets listen (the router's HTTP host).
    pub host: std::net::IpAddr,
}

/// A planner at work; `stop` ends it and drains the workers it started.
pub struct Planning {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    _watch: crate::core::AbortOnDrop,
}

impl PlannerStart {
    /// Starts watching the namespace and planning; must run inside a tokio runtime.
    pub fn spawn(
        self,
        metrics: Arc<Metrics>,
        namespace: &str,
        dead_after: Duration,
        key: Option<crate::core::trust::ClusterKey>,
    ) -> Result<Planning, String> {
        let view = Arc::new(Mutex::new(ClusterView::new(namespace)));
        let mut planner = Planner::new(self.settings, view.clone(), metrics, self.connector)?;
        let discovery = self.discovery.as_ref();
        planner.announce_with(Announcer::start(discovery, namespace, Role::Planner, self.host, key.as_ref())?);
        let watch = crate::core::top::watch(self.discovery, namespace.to_string(), dead_after, key, view);
        let watch = crate::core::AbortOnDrop(tokio::spawn(async move {
            if let Err(error) = watch.await {
                tracing::warn!("planner: cannot watch the cluster: {error}");
            }
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(planner.run(async move {
            let _ = stopped.await;
        }));
        Ok(Planning { stop, task, _watch: watch })
    }
}

impl Planning {
    /// Stops planning; resolves once the workers it started have drained and exited.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The planner's state between intervals.
pub struct Planner {
    settings: PlannerSettings,
    view: Arc<Mutex<ClusterView>>,
    metrics: Arc<Metrics>,
    connector: Box<dyn Connector>,
    plan: Plan,
    samples: Vec<[PoolSample; 2]>,
    predictors: [Box<dyn Predictor>; 3],
    announcer: Option<Announcer>,
    traffic: Traffic,
    corrections: sla::Corrections,
    /// How much the profile-based need is raised because too few requests met the targets lately.
    margin: f64,
    /// The profile-based need of the interval before.
    last_need: Option<[usize; 2]>,
}

/// The attainment margin grows by this factor after an interval below the target share …
const MARGIN_UP: f64 = 1.15;
/// … shrinks by this one after an interval comfortably above it (half the way to all) …
const MARGIN_DOWN: f64 = 0.97;
/// … and stays within 1 and this.
const MARGIN_MOST: f64 = 3.0;

impl Planner {
    pub fn new(
        settings: PlannerSettings,
        view: Arc<Mutex<ClusterView>>,
        metrics: Arc<Metrics>,
        connector: Box<dyn Connector>,
    ) -> Result<Self, String> {
        let predictor = || forecast::by_name(&settings.predictor);
        let predictors = [predictor()?, predictor()?, predictor()?];
        let mut plan = Plan { decode: 0, prefill: 0, forecast: None, reason: "the fewest workers to start".into() };
        for role in ROLES {
            plan.set(role, settings.bounds(role).min);
        }
        let traffic = metrics.traffic();
        let corrections = sla::Corrections::default();
        if let Some(SlaSettings { targets, .. }) = &settings.sla {
            let ms = |ms: f64| Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX);
            metrics.judge_by(ms(targets.ttft_ms), ms(targets.itl_ms));
        }
        let samples = Vec::new();
        Ok(Self {
            settings,
            view,
            metrics,
            connector,
            plan,
            samples,
            predictors,
            announcer: None,
            traffic,
            corrections,
            margin: 1.0,
            last_need: None,
        })
    }

    /// Plans every interval until `stop` resolves, then stops (and drains) the workers its connector started.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        self.act(true);
        let mut sampling = tokio::time::interval(self.settings.sample_every);
        let first = tokio::time::Instant::now() + self.settings.interval;
        let mut planning = tokio::time::interval_at(first, self.settings.interval);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = sampling.tick() => {
                    let pools = sample(&self.view.lock().unwrap_or_else(|p| p.into_inner()));
                    self.samples.push(pools);
                }
                _ = planning.tick() => self.plan_next(),
                () = &mut stop => break,
            }
        }
        let mut connector = self.connector;
        let _ = tokio::task::spawn_blocking(move || connector.shutdown()).await;
    }

    /// One interval's decision: forecast, then each role's step unless the cluster is still settling.
    fn plan_next(&mut self) {
        let traffic = self.metrics.traffic();
        let interval = traffic.since(&self.traffic);
        self.traffic = traffic;
        self.observe(&interval);
        let samples = std::mem::take(&mut self.samples);
        let before = (self.plan.decode, self.plan.prefill);
        let settling = self.connector.settling(&self.view.lock().unwrap_or_else(|p| p.into_inner()));
        let mut reasons = Vec::new();
        match settling {
            Some(why) => {
                reasons.push(format!("waiting: {why}"));
                for (_, role) in self.settings.roles() {
                    self.metrics.planner_decision(role.name(), "wait");
                }
            }
            None => {
                let current = samples.last().map_or([0; 2], |pools| pools.map(|p| p.workers));
                let needed = self.sla_needs(&interval, &samples, &mut reasons);
                let mut next = self.plan.clone();
                for (at, role) in self.settings.roles() {
                    let pool: Vec<PoolSample> = samples.iter().map(|pools| pools[at]).collect();
                    let bounds = self.settings.bounds(role);
                    let step = load::step(&pool, current[at], bounds, self.settings.thresholds);
                    let need = needed.map_or(0, |needed| needed[at]);
                    next.set(role, bounds.clamp(step.workers.max(need)));
                    reasons.push(format!("{}: {}", role.name(), step.reason));
                }
                self.within_budget(&mut next, current);
                for (at, role) in self.settings.roles() {
                    let decision = match next.workers(role).cmp(&current[at]) {
                        std::cmp::Ordering::Greater => "up",
                        std::cmp::Ordering::Less => "down",
                        std::cmp::Ordering::Equal => "hold",
                    };
                    self.metrics.planner_decision(role.name(), decision);
                }
                self.plan = next;
            }
        }
        let changed = (self.plan.decode, self.plan.prefill) != before;
        self.plan.reason = reasons.join("; ");
        self.act(changed);
        if let Some(pools) = samples.last() {
            for (at, role) in self.settings.roles() {
                self.metrics.planner_pool(role.name(), pools[at].workers, pools[at].pressure());
            }
        }
    }

    /// Feeds the predictors one interval's traffic; the plan's forecast is theirs.
    fn observe(&mut self, interval: &Traffic) {
        let observed = [interval.requests as f64, interval.input_tokens as f64, interval.output_tokens as f64];
        for (predictor, value) in self.predictors.iter_mut().zip(observed) {
            predictor.observe(value);
        }
        let [requests, input_tokens, output_tokens] = self.predictors.each_ref().map(|p| p.forecast());
        self.plan.forecast = match (requests, input_tokens, output_tokens) {
            (Some(requests), Some(input_tokens), Some(output_tokens)) => {
                Some(Forecast { requests, input_tokens, output_tokens })
            }
            _ => None,
        };
    }

    /// Feeds the predictors the traffic of intervals before the planner started (Dynamo's warm-up trace),
    /// oldest first; with a profile, the first plan is then at least what that forecast needs.
    pub fn warm_up(&mut self, intervals: &[Traffic]) {
        intervals.iter().for_each(|interval| self.observe(interval));
        let mut reasons = vec!["warmed up".to_string()];
        if let Some(needed) = self.sla_needs(&Traffic::default(), &[], &mut reasons) {
            for (at, role) in self.settings.roles() {
                let bounds = self.settings.bounds(role);
                self.plan.set(role, bounds.clamp(self.plan.workers(role).max(needed[at])));
            }
        }
        self.plan.reason = reasons.join("; ");
    }

    /// Publishes every plan through `announcer` from now on.
    pub fn announce_with(&mut self, announcer: Announcer) {
        self.announcer = Some(announcer);
    }

    /// The plan as it stands.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The workers each role needs for its latency target with the forecast traffic (`None` without a
    /// profile, or before a forecast), after correcting the profile by the latency the last `interval` saw.
    fn sla_needs(
        &mut self,
        interval: &Traffic,
        samples: &[[PoolSample; 2]],
        reasons: &mut Vec<String>,
    ) -> Option<[usize; 2]> {
        let SlaSettings { profile, targets } = self.settings.sla.as_ref()?;
        let Some(profile) = profile.get() else {
            reasons.push("no worker has sent its performance profile yet: sized by load alone".into());
            return None;
        };
        let profile = profile.as_ref();
        let seconds = self.settings.interval.as_secs_f64();
        let disaggregated = self.settings.prefill.max > 0;
        // Whoever prefills: prefill workers, or the aggregated decode workers.
        let prefilling = usize::from(disaggregated);
        let mean = |read: &dyn Fn(&[PoolSample; 2]) -> f64| match samples.len() {
            0 => 0.0,
            n => samples.iter().map(read).sum::<f64>() / n as f64,
        };
        let observed = (interval.requests as f64, interval.input_tokens as f64, interval.output_tokens as f64);
        if let Some(demand) = sla::Demand::per_interval(observed.0, observed.1, observed.2, seconds) {
            let prefill_workers = mean(&|pools| pools[prefilling].workers as f64);
            let running = mean(&|pools| pools[0].running as f64 / pools[0].workers.max(1) as f64);
            let expected_ttft = sla::expected_ttft_ms(&demand, profile, prefill_workers);
            let expected_itl = sla::expected_itl_ms(&demand, profile, running);
            let corrections = &mut self.corrections;
            if let Some(c) = interval.mean_ttft_ms().and_then(|seen| sla::bounded_correction(seen, expected_ttft)) {
                corrections.prefill = c;
            }
            if let Some(c) = interval.mean_itl_ms().and_then(|seen| sla::bounded_correction(seen, expected_itl)) {
                corrections.decode = c;
            }
        }
        if let (Some(share), Some(seen)) = (targets.attainment, interval.attainment()) {
            self.metrics.planner_attainment(seen);
            if seen < share {
                self.margin = (self.margin * MARGIN_UP).min(MARGIN_MOST);
            } else if seen >= share + (1.0 - share) / 2.0 {
                self.margin = (self.margin * MARGIN_DOWN).max(1.0);
            }
        }
        self.metrics.planner_correction("prefill", self.corrections.prefill);
        self.metrics.planner_correction("decode", self.corrections.decode);
        self.metrics.planner_correction("attainment_margin", self.margin);
        let forecast = self.plan.forecast?;
        let Some(demand) =
            sla::Demand::per_interval(forecast.requests, forecast.input_tokens, forecast.output_tokens, seconds)
        else {
            return Some([0; 2]);
        };
        let corrections = &self.corrections;
        let needed = match disaggregated {
            true => sla::decode_workers(&demand, profile, targets, corrections.decode)
                .and_then(|decode| Ok([decode, sla::prefill_workers(&demand, profile, targets, corrections.prefill)?])),
            false => sla::aggregated_workers(&demand, profile, targets, corrections).map(|workers| [workers, 0]),
        };
        let needed = match needed {
            Ok(needed) => needed.map(|workers| (workers as f64 * self.margin).ceil() as usize),
            Err(why) => {
                reasons.push(format!("targets out of reach: {why}"));
                return None;
            }
        };
        // A need that falls for one interval is noise as often as not, and a worker stopped now and started
        // again next interval costs its start-up: the floor falls only once two needs in a row are lower.
        let floor = match self.last_need.replace(needed) {
            Some(last) => [needed[0].max(last[0]), needed[1].max(last[1])],
            None => needed,
        };
        reasons.push(format!(
            "the targets need {} decode, {} prefill workers for {:.1} requests/s of {:.0}+{:.0} tokens (margin {:.2}, \
             floor {} and {})",
            needed[0],
            needed[1],
            demand.requests_per_s,
            demand.prompt_tokens,
            demand.output_tokens,
            self.margin,
            floor[0],
            floor[1]
        ));
        for (at, role) in self.settings.roles() {
            self.metrics.planner_sizing(role.name(), needed[at]);
        }
        Some(floor)
    }

    /// Takes back steps up past the budget (prefill's first: decode workers serve whole requests too);
    /// `current` is each role's workers now.
    fn within_budget(&self, next: &mut Plan, current: [usize; 2]) {
        for role in [Role::Prefill, Role::Decode] {
            let over = (next.decode + next.prefill).saturating_sub(self.settings.budget);
            let at = ROLES.iter().position(|&r| r == role).unwrap_or(0);
            let back = over.min(next.workers(role).saturating_sub(current[at]));
            if back > 0 {
                next.set(role, next.workers(role) - back);
            }
        }
    }

    /// Tells the connector and the metrics what the plan is now; the log hears of it when it `changed`.
    fn act(&mut self, changed: bool) {
        let (decode, prefill, reason) = (self.plan.decode, self.plan.prefill, &self.plan.reason);
        match changed {
            true => tracing::info!("planner: {decode} decode, {prefill} prefill workers ({reason})"),
            false => tracing::debug!("planner: {decode} decode, {prefill} prefill workers ({reason})"),
        }
        for role in ROLES {
            self.metrics.planner_wanted(role.name(), self.plan.workers(role));
        }
        if let Some(forecast) = &self.plan.forecast {
            self.metrics.planner_forecast(forecast);
        }
        self.connector.apply(&self.plan, &self.view.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(announcer) = &mut self.announcer {
            announcer.publish(&self.plan);
        }
    }
}

#[cfg(test)]
mod tests;
