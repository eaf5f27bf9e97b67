use super::*;
use crate::core::protocol::LoadMetrics;
use crate::core::protocol::discovery::{Instance, ModelCardSummary};
use crate::core::top::WorkerView;

/// A connector that only remembers what it was asked, and says it is settling while told to.
#[derive(Default, Clone)]
struct Recorder {
    plans: Arc<Mutex<Vec<(usize, usize)>>>,
    settling: Arc<Mutex<Option<String>>>,
}

impl Connector for Recorder {
    fn apply(&mut self, plan: &Plan, _view: &ClusterView) {
        self.plans.lock().unwrap().push((plan.decode, plan.prefill));
    }

    fn settling(&mut self, _view: &ClusterView) -> Option<String> {
        self.settling.lock().unwrap().clone()
    }

    fn shutdown(&mut self) {}
}

fn settings() -> PlannerSettings {
    PlannerSettings {
        interval: Duration::from_secs(1),
        sample_every: Duration::from_millis(100),
        predictor: "constant".into(),
        decode: Bounds { min: 1, max: 4 },
        prefill: Bounds { min: 0, max: 2 },
        budget: 4,
        thresholds: Thresholds::default(),
        sla: None,
    }
}

/// A view of `decode` and `prefill` workers, each with its KV `pressure` (no queue).
fn view(decode: usize, prefill: usize, pressure: f64) -> ClusterView {
    let mut view = ClusterView::new("test");
    let roles = std::iter::repeat_n(Role::Decode, decode).chain(std::iter::repeat_n(Role::Prefill, prefill));
    for (n, role) in roles.enumerate() {
        let endpoint = format!("tcp://127.0.0.1:{}", 1000 + n);
        let instance = Instance {
            id: n as u64,
            role,
            model: "m".into(),
            namespace: "test".into(),
            request_addr: endpoint.clone(),
            event_addr: String::new(),
            transfer_addr: None,
            card: ModelCardSummary { block_size: 16, context_length: 4096, kv_blocks: 100, tokenizer_hash: 1 },
            device: String::new(),
            http_addr: None,
            adapters: Vec::new(),
        };
        let load = LoadMetrics {
            requests_running: 1,
            kv_active_blocks: (pressure * 100.0) as u64,
            kv_total_blocks: 100,
            ..LoadMetrics::default()
        };
        let worker = WorkerView::reporting(instance, load);
        view.workers.insert(endpoint, worker);
    }
    view
}

struct Rig {
    planner: Planner,
    view: Arc<Mutex<ClusterView>>,
    connector: Recorder,
    metrics: Arc<Metrics>,
}

fn rig(settings: PlannerSettings) -> Rig {
    let view = Arc::new(Mutex::new(ClusterView::new("test")));
    let (connector, metrics) = (Recorder::default(), Arc::new(Metrics::new()));
    let planner = Planner::new(settings, view.clone(), metrics.clone(), Box::new(connector.clone())).unwrap();
    Rig { planner, view, connector, metrics }
}

impl Rig {
    /// One interval over `cluster`: ten samples, then the plan.
    fn interval(&mut self, cluster: ClusterView) -> (usize, usize) {
        *self.view.lock().unwrap() = cluster;
        for _ in 0..10 {
            let pools = sample(&self.view.lock().unwrap());
            self.planner.samples.push(pools);
        }
        self.planner.plan_next();
        *self.connector.plans.lock().unwrap().last().unwrap()
    }
}

#[test]
fn each_role_follows_its_own_pressure_one_worker_per_interval() {
    let mut rig = rig(PlannerSettings { budget: 8, ..settings() });
    rig.planner.act(true);
    assert_eq!(rig.connector.plans.lock().unwrap()[0], (1, 0), "it starts at the fewest workers");
    assert_eq!(rig.interval(view(1, 0, 1.5)), (2, 0));
    assert_eq!(rig.interval(view(2, 1, 1.5)), (3, 2), "decode and prefill each step up");
    assert_eq!(rig.interval(view(3, 2, 0.1)), (2, 1));
    let text = rig.metrics.render(&[], &[]);
    for line in [
        r#"dynamo_planner_decisions_total{decision="up",role="decode"} 2"#,
        r#"dynamo_planner_decisions_total{decision="down",role="prefill"} 1"#,
        r#"dynamo_planner_workers{role="decode",state="wanted"} 2"#,
        r#"dynamo_planner_workers{role="decode",state="observed"} 3"#,
        r#"dynamo_planner_kv_pressure{role="decode"} 0.1"#,
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[test]
fn steps_up_past_the_budget_are_taken_back_prefill_first() {
    let mut rig = rig(PlannerSettings { budget: 3, ..settings() });
    // 2 + 1 is the budget: both want one more, neither gets it.
    assert_eq!(rig.interval(view(2, 1, 1.5)), (2, 1));
    // Room for one: decode has it.
    assert_eq!(rig.interval(view(1, 1, 1.5)), (2, 1));
}

#[test]
fn a_cluster_still_settling_is_not_judged_and_the_forecast_follows_the_traffic() {
    let mut rig = rig(settings());
    *rig.connector.settling.lock().unwrap() = Some("1 workers starting".into());
    assert_eq!(rig.interval(view(1, 0, 1.5)), (1, 0), "a worker on its way may be the one the load needs");
    assert!(rig.planner.plan.reason.contains("1 workers starting"), "{}", rig.planner.plan.reason);
    assert!(
        rig.metrics.render(&[], &[]).contains(r#"dynamo_planner_decisions_total{decision="wait",role="decode"} 1"#)
    );

    *rig.connector.settling.lock().unwrap() = None;
    let request = rig.metrics.request("m", "completions", false);
    request.prompt(120, 0);
    drop(request);
    rig.interval(view(1, 0, 0.3));
    let forecast = rig.planner.plan.forecast.expect("a forecast after an interval");
    assert_eq!((forecast.requests, forecast.input_tokens), (1.0, 120.0), "the constant predictor: the last interval");
    assert!(rig.metrics.render(&[], &[]).contains(r#"dynamo_planner_forecast{series="input_tokens"} 120"#));
}

/// Requests through the frontend's metrics as the planner reads them: `count` of `prompt` tokens, each
/// generating `output` tokens, the first after `ttft_ms`, the others `itl_ms` apart.
fn traffic(metrics: &Arc<Metrics>, count: usize, prompt: usize, output: usize, ttft_ms: u64, itl_ms: u64) {
    for _ in 0..count {
        let mut request = metrics.request("m", "completions", true);
        request.prompt(prompt, 0);
        request.age(Duration::from_millis(ttft_ms));
        request.tokens(1);
        request.age(Duration::from_millis(itl_ms * (output as u64 - 1)));
        request.tokens(output - 1);
        request.finish(true);
    }
}

#[test]
fn with_a_profile_each_role_gets_at_least_what_its_latency_target_needs() {
    use super::sla::{Demand, Targets};
    use crate::core::engine::profile::Profile;
    let profile = Profile::mocker(&crate::core::engine::mocker::MockerConfig::default());
    let targets = Targets { ttft_ms: 500.0, itl_ms: 30.0, attainment: None };
    let planned = |ttft_ms: u64| {
        let sla = Some(SlaSettings { profile: ProfileSource::File(Arc::new(profile.clone())), targets });
        let bounds = Bounds { min: 1, max: 32 };
        let mut rig = rig(PlannerSettings { budget: 64, decode: bounds, prefill: bounds, sla, ..settings() });
        // One interval of 40 requests of 2048 + 100 tokens; the constant predictor forecasts the same again.
        traffic(&rig.metrics, 40, 2048, 100, ttft_ms, 20);
        let plan = rig.interval(view(1, 4, 0.1));
        (plan, rig)
    };
    let ((decode, prefill), first) = planned(100);
    let demand = Demand { requests_per_s: 40.0, prompt_tokens: 2048.0, output_tokens: 100.0 };
    let corrections = first.planner.corrections;
    assert!(corrections.prefill > 1.0 && corrections.prefill < 2.0, "100 ms seen, about 73 expected: {corrections:?}");
    let needed_prefill = super::sla::prefill_workers(&demand, &profile, &targets, corrections.prefill).unwrap();
    let needed_decode = super::sla::decode_workers(&demand, &profile, &targets, corrections.decode).unwrap();
    assert_eq!((decode, prefill), (needed_decode, needed_prefill));
    assert!(prefill >= 3, "40 prompts/s of 2048 tokens, 70 ms each, within 500 ms: {prefill}");
    let text = first.metrics.render(&[], &[]);
    assert!(text.contains(&format!(r#"dynamo_planner_workers{{role="prefill",state="needed"}} {prefill}"#)), "{text}");
    assert!(text.contains(r#"dynamo_planner_correction{phase="prefill"}"#), "{text}");

    // Clients that saw twice the TTFT: the correction doubles, and the need more than that.
    let ((_, more), second) = planned(200);
    assert!(second.planner.corrections.prefill > 1.9 * corrections.prefill);
    assert!(more > 2 * prefill, "{more} prefill workers after 200 ms TTFTs, {prefill} after 100 ms");
}

#[test]
fn without_traffic_or_within_reach_of_nothing_the_profile_sets_no_floor() {
    use super::sla::Targets;
    use crate::core::engine::profile::Profile;
    let profile = Profile::mocker(&crate::core::engine::mocker::MockerConfig::default());
    // No TTFT under 1 ms is possible: the load steps alone decide, and the reason says why.
    let sla = Some(SlaSettings {
        profile: ProfileSource::File(Arc::new(profile)),
        targets: Targets { ttft_ms: 1.0, itl_ms: 30.0, attainment: None },
    });
    let mut rig = rig(PlannerSettings { sla, ..settings() });
    traffic(&rig.metrics, 10, 2048, 100, 60, 10);
    assert_eq!(rig.interval(view(2, 0, 0.7)), (2, 0));
    assert!(rig.planner.plan.reason.contains("targets out of reach"), "{}", rig.planner.plan.reason);
    // An idle interval needs nothing beyond the fewest.
    assert_eq!(rig.interval(view(2, 0, 0.0)), (1, 0));
}
