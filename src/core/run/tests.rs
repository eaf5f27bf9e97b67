use super::*;
use crate::core::engine::native::{Device, NativeSettings};
use crate::core::engine::scheduler::SchedulerConfig;
use crate::core::engine::{EngineError, ResponseStream};
use crate::core::protocol::{KvEventBatch, LoadMetrics, PreprocessedRequest};
use futures::StreamExt;
use std::time::{Duration, Instant};

const BLOCK: usize = 4;

fn settings(prefill_workers: usize, disagg_threshold: usize) -> RunSettings {
    let scheduler = SchedulerConfig { block_size: BLOCK, num_blocks: 128, ..SchedulerConfig::default() };
    RunSettings {
        model: ModelSource::Builtin,
        model_options: Default::default(),
        workers: 1,
        prefill_workers,
        encode_workers: 0,
        engine: EngineSettings::Native(NativeSettings {
            device: Device::Cpu,
            threads: 1,
            kv_cache_gib: 0.0,
            num_blocks: Some(128),
            scheduler,
            profile: None,
            quantization: Default::default(),
        }),
        router: RouterConfig { disagg_threshold, ..RouterConfig::default() },
        listen: ([127, 0, 0, 1], 0).into(),
        http: HttpSettings::default(),
    }
}

fn prompt(seed: u32) -> Vec<u32> {
    (0..57).map(|i| 11 + (i * 31 + seed * 7) % 230).collect()
}

async fn generate(router: &Arc<Router>, prompt: &[u32]) -> Vec<u32> {
    complete(router, PreprocessedRequest::greedy("r", prompt.to_vec(), 9)).await
}

async fn complete(router: &Arc<Router>, request: PreprocessedRequest) -> Vec<u32> {
    let stream = router.route_migrating(request).await.unwrap();
    stream.flat_map(|output| futures::stream::iter(output.token_ids)).collect().await
}

fn decisions(state: &FrontendState, decision: &str) -> f64 {
    let sample = format!("dynamo_router_disagg_decisions_total{{decision=\"{decision}\"}}");
    state.metrics.render(&[], &[]).lines().find_map(|l| l.strip_prefix(&sample)?.trim().parse().ok()).unwrap_or(0.0)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn prefill_workers_give_the_tokens_of_aggregated_serving() {
    let aggregated = build(&settings(0, 0), false).unwrap().first().router;
    let state = build(&settings(1, 0), false).unwrap();
    let router = state.first().router;
    let prefill = router.engines_of(Pool::Prefill).remove(0);
    let decode = router.engines().remove(0);

    let (a, b) = (prompt(1), prompt(2));
    let expected = generate(&aggregated, &a).await;
    assert_eq!(generate(&router, &a).await, expected, "prefilled on one worker, decoded on the other");
    assert_eq!(decisions(&state, "remote"), 1.0);
    eventually("the decode worker's read ends the prefill's lease", || prefill.load().kv_active_blocks == 0).await;

    // The decode worker already holds it all: with a threshold, it prefills the rest itself.
    let state = build(&settings(1, 8), false).unwrap();
    let router = state.first().router;
    let first = generate(&router, &a).await;
    assert_eq!(first, expected);
    assert_eq!(generate(&router, &a).await, expected, "cached on the decode worker, prefilled there");
    assert_eq!((decisions(&state, "remote"), decisions(&state, "local_short")), (1.0, 1.0));
    // A prompt cached on the prefill worker only, and one cached nowhere: both handed over, both right.
    let extended = [a.clone(), b.clone()].concat();
    let aggregated_extended = generate(&aggregated, &extended).await;
    assert_eq!(generate(&router, &extended).await, aggregated_extended);
    assert_eq!(generate(&router, &b).await, generate(&aggregated, &b).await);
    assert_eq!(decisions(&state, "remote"), 3.0);
    assert!(decode.load().kv_total_blocks > 0);
}

#[tokio::test]
async fn seeded_sampling_continues_on_the_decode_worker_as_if_it_had_never_moved() {
    use crate::core::protocol::SamplingOptions;
    let aggregated = build(&settings(0, 0), false).unwrap().first().router;
    let state = build(&settings(1, 0), false).unwrap();
    let router = state.first().router;
    for (seed, frequency_penalty) in [(7, 0.0), (8, 0.0), (9, 0.8)] {
        let sampling = SamplingOptions { temperature: 1.0, seed: Some(seed), frequency_penalty, ..Default::default() };
        let request = PreprocessedRequest { sampling, ..PreprocessedRequest::greedy("s", prompt(6), 12) };
        let expected = complete(&aggregated, request.clone()).await;
        assert_eq!(complete(&router, request).await, expected, "seed {seed}, frequency penalty {frequency_penalty}");
    }
    assert_eq!(decisions(&state, "remote"), 3.0);
    // A peer cannot make a worker draw without bound: what it says was generated is bounded by the prompt.
    let claimed = PreprocessedRequest { generated: 57, ..PreprocessedRequest::greedy("g", prompt(6), 2) };
    let refused = router.engines()[0].submit(claimed).err().expect("more generated than there are tokens");
    assert!(refused.to_string().contains("said to be generated"), "{refused}");
}

/// A prefill worker that is lost as soon as it is sent anything, or that takes prompts and never finishes
/// them (it stays at its queue).
struct FakePrefill {
    id: WorkerId,
    stuck: bool,
}

impl Engine for FakePrefill {
    fn worker_id(&self) -> WorkerId {
        self.id
    }

    fn submit(&self, _: PreprocessedRequest) -> Result<ResponseStream, EngineError> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        Ok(match self.stuck {
            // Held by the stream's own drop guard: open (never ending) until the router lets go of it.
            true => ResponseStream::with_drop_guard(receiver, Box::new(sender)),
            false => ResponseStream::new(receiver),
        })
    }

    fn subscribe_kv_events(&self) -> tokio::sync::broadcast::Receiver<KvEventBatch> {
        tokio::sync::broadcast::channel(1).1
    }

    fn load(&self) -> LoadMetrics {
        LoadMetrics::default()
    }

    fn transfer_addr(&self) -> Option<String> {
        Some("tcp://127.0.0.1:1".into())
    }
}

/// `router`'s prefill worker swapped for a fake one.
fn fake_prefill(router: &Router, id: WorkerId, stuck: bool) {
    for prefill in router.engines_of(Pool::Prefill) {
        router.remove_worker(prefill.worker_id());
    }
    router.add_worker(Arc::new(FakePrefill { id, stuck }), Pool::Prefill);
}

#[tokio::test]
async fn a_lost_prefill_worker_leaves_the_prompt_to_the_decode_worker() {
    let aggregated = build(&settings(0, 0), false).unwrap().first().router;
    let state = build(&settings(1, 0), false).unwrap();
    let router = state.first().router;
    fake_prefill(&router, 99, false);
    let a = prompt(3);
    assert_eq!(generate(&router, &a).await, generate(&aggregated, &a).await, "one uninterrupted stream");
    assert_eq!(decisions(&state, "local_fallback"), 1.0);
}

#[tokio::test]
async fn prompts_stay_on_the_decode_worker_while_every_prefill_worker_is_full_or_it_cannot_take_kv() {
    let aggregated = build(&settings(0, 0), false).unwrap().first().router;
    let mut full = settings(1, 0);
    full.router.prefill_queue_limit = 1;
    let state = build(&full, false).unwrap();
    let router = state.first().router;
    fake_prefill(&router, 98, true);
    let (a, b) = (prompt(4), prompt(5));
    // The first takes the prefill worker's only place and waits there.
    let waiting = router.route_migrating(PreprocessedRequest::greedy("w", a, 9)).await.unwrap();
    assert_eq!(generate(&router, &b).await, generate(&aggregated, &b).await, "prefilled where it decodes");
    assert_eq!((decisions(&state, "remote"), decisions(&state, "local_busy")), (1.0, 1.0));
    drop(waiting);

    // A decode worker without a transfer agent cannot take KV: its prompts stay with it.
    let router =
        Arc::new(Router::new(aggregated.engines(), RouterConfig { block_size: BLOCK, ..RouterConfig::default() }));
    let state = FrontendState::new(
        Arc::new(Model::load(&ModelSource::Builtin, None).unwrap()),
        router.clone(),
        Arc::new(Metrics::new()),
    );
    fake_prefill(&router, 97, true);
    assert_eq!(generate(&router, &b).await, generate(&aggregated, &b).await);
    assert_eq!((decisions(&state, "remote"), decisions(&state, "local_unsupported")), (0.0, 1.0));
}

#[tokio::test]
async fn a_decode_worker_is_not_charged_with_a_prompt_prefilled_elsewhere() {
    let state = build(&settings(1, 0), false).unwrap();
    let router = state.first().router;
    fake_prefill(&router, 96, true);
    let other = prompt(9);
    let cost = |router: &Router| router.quote(&other, &[]).iter().map(|q| q.cost).sum::<f64>();
    let before = cost(&router);
    // Its prompt waits at the prefill worker: the decode worker has nothing of it to compute.
    let waiting = router.route_migrating(PreprocessedRequest::greedy("w", prompt(8), 9)).await.unwrap();
    assert_eq!(decisions(&state, "remote"), 1.0);
    assert_eq!(cost(&router), before, "the decode worker's price for another prompt is unchanged");
    assert_eq!(router.in_flight(), 1, "though it counts the request as its own");
    drop(waiting);
}
