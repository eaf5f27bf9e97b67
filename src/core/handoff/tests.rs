use super::*;
use crate::core::engine::native::{Device, NativeSettings};
use crate::core::engine::scheduler::SchedulerConfig;
use crate::core::engine::{EngineSettings, spawn_engines};
use crate::core::model::{Model, ModelSource};
use std::time::Instant;

const BLOCK: usize = 4;

fn engine(id: WorkerId, model: &Model) -> Arc<dyn Engine> {
    engine_of(id, model, &ModelSource::Builtin)
}

/// The built-in model's KV pages are f32, the Qwen3 fixture's (bf16 weights) bf16.
fn sources() -> [ModelSource; 2] {
    let qwen3 = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/qwen3");
    [ModelSource::Builtin, ModelSource::Dir(qwen3)]
}

fn engine_of(id: WorkerId, model: &Model, source: &ModelSource) -> Arc<dyn Engine> {
    let scheduler = SchedulerConfig { block_size: BLOCK, num_blocks: 64, ..SchedulerConfig::default() };
    let settings = EngineSettings::Native(NativeSettings {
        device: Device::Cpu,
        threads: 1,
        kv_cache_gib: 0.0,
        num_blocks: Some(64),
        scheduler,
        profile: None,
        quantization: Default::default(),
    });
    spawn_engines(model, source, &settings, &[id]).unwrap().remove(0)
}

fn hand_off(id: WorkerId, model: &Model) -> HandOffEngine {
    hand_off_of(id, model, &ModelSource::Builtin)
}

fn hand_off_of(id: WorkerId, model: &Model, source: &ModelSource) -> HandOffEngine {
    HandOffEngine::start(engine_of(id, model, source), AgentSettings::loopback(None)).unwrap()
}

fn prompt() -> Vec<u32> {
    // Many blocks and a partial last one: every page boundary is crossed.
    (0..45).map(|i| 17 + (i * 37) % 200).collect()
}

async fn outputs(stream: ResponseStream) -> Vec<EngineOutput> {
    stream.collect().await
}

fn tokens(outputs: &[EngineOutput]) -> Vec<u32> {
    outputs.iter().flat_map(|o| o.token_ids.clone()).collect()
}

fn with(request: PreprocessedRequest, hand_off: HandOff) -> PreprocessedRequest {
    PreprocessedRequest { hand_off, ..request }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Prefills `prompt` on `prefill`, holding its KV; the first output and what is held.
async fn prefill_holding(prefill: &HandOffEngine, prompt: &[u32]) -> (Vec<u32>, HeldKv) {
    let request = with(PreprocessedRequest::greedy("p", prompt.to_vec(), 1), HandOff::Hold);
    let outputs = outputs(prefill.submit(request).unwrap()).await;
    let last = outputs.last().expect("one output");
    assert_eq!(last.finish_reason, Some(FinishReason::Length));
    let held = last.held.clone().expect("the held pages are named");
    (tokens(&outputs), HeldKv { agent: prefill.address(), ..held })
}

#[tokio::test]
async fn a_prompt_prefilled_on_one_worker_is_decoded_on_another_with_the_same_tokens() {
    for source in sources() {
        handed_over_equals_computed_here(&source).await;
    }
}

async fn handed_over_equals_computed_here(source: &ModelSource) {
    let model = Model::load(source, None).unwrap();
    let prompt = prompt();
    let alone = engine_of(1, &model, source);
    let expected = tokens(&outputs(alone.submit(PreprocessedRequest::greedy("a", prompt.clone(), 8)).unwrap()).await);

    let (prefill, decode) = (hand_off_of(2, &model, source), hand_off_of(3, &model, source));
    let (first, held) = prefill_holding(&prefill, &prompt).await;
    assert_eq!(first, expected[..1], "the prefill's first token is the aggregated one");
    assert_eq!(held.tokens as usize, prompt.len());
    assert_eq!(held.pages.len(), prompt.len().div_ceil(BLOCK));
    assert!(prefill.load().kv_active_blocks >= held.pages.len() as u64, "held until read");

    let continued = [prompt.clone(), first.clone()].concat();
    let request = with(PreprocessedRequest::greedy("d", continued, 7), HandOff::From(Box::new(held)));
    let rest = tokens(&outputs(decode.submit(request).unwrap()).await);
    assert_eq!([first, rest].concat(), expected, "handed over, the same tokens");
    eventually("the read ends the prefill's lease", || prefill.load().kv_active_blocks == 0).await;
    // The decode worker says it holds the prompt's blocks, as if it had computed them.
    let stored: usize = (decode.kv_snapshot().unwrap().iter())
        .map(|event| match event {
            KvEvent::Stored { blocks, .. } => blocks.len(),
            _ => 0,
        })
        .sum();
    assert!(stored >= prompt.len() / BLOCK, "{stored} blocks stored on the decode worker");
}

#[tokio::test]
async fn kv_that_cannot_be_read_is_computed_on_the_decode_worker() {
    let model = Model::load(&ModelSource::Builtin, None).unwrap();
    let prompt = prompt();
    let (prefill, decode) = (hand_off(2, &model), hand_off(3, &model));
    let (first, held) = prefill_holding(&prefill, &prompt).await;
    let expected =
        tokens(&outputs(engine(1, &model).submit(PreprocessedRequest::greedy("a", prompt.clone(), 8)).unwrap()).await);
    let continued = [prompt.clone(), first.clone()].concat();
    let decode_with = |held: HeldKv| async {
        let request = with(PreprocessedRequest::greedy("d", continued.clone(), 7), HandOff::From(Box::new(held)));
        tokens(&outputs(decode.submit(request).unwrap()).await)
    };

    // The holder is gone (nothing listens there).
    let gone = {
        let (agent, _) = Agent::start(9, AgentSettings::loopback(None)).unwrap();
        agent.address()
    };
    let rest = decode_with(HeldKv { agent: gone, ..held.clone() }).await;
    assert_eq!([first.clone(), rest].concat(), expected, "computed here, the same tokens");
    // Pages of another shape are never copied.
    let other = KvLayout { page_bytes: held.layout.page_bytes * 2, ..held.layout };
    let rest = decode_with(HeldKv { layout: other, ..held.clone() }).await;
    assert_eq!([first.clone(), rest].concat(), expected);
    // KV that claims more than the request has is refused before anything is allocated.
    let request = with(
        PreprocessedRequest::greedy("d", prompt.clone(), 7),
        HandOff::From(Box::new(HeldKv { tokens: prompt.len() as u32, ..held })),
    );
    let refused = decode.submit(request).err().expect("a hand-off larger than the request");
    assert!(refused.to_string().contains("does not fit"), "{refused}");
    // Unread, the prefill's lease is still held; an engine without an agent takes no hand-off at all.
    assert!(prefill.load().kv_active_blocks > 0);
    let plain = engine(4, &model);
    let refused = plain.submit(with(PreprocessedRequest::greedy("h", prompt, 1), HandOff::Hold)).err().unwrap();
    assert!(refused.to_string().contains("--kv-transfer"), "{refused}");
}

#[tokio::test]
async fn a_prefill_that_ends_for_good_or_is_cancelled_holds_nothing() {
    let model = Model::load(&ModelSource::Builtin, None).unwrap();
    let prompt = prompt();
    let prefill = hand_off(2, &model);
    let (first, _) = prefill_holding(&prefill, &prompt).await;
    // Read by nobody: that one stays held until its lease ends (another engine's test reads it).
    let held_before = prefill.load().kv_active_blocks;

    // Its first token is a stop token: the request is over, nothing to hand on.
    let mut request = with(PreprocessedRequest::greedy("s", prompt.clone(), 1), HandOff::Hold);
    request.stop.stop_token_ids = first.clone();
    let outputs = outputs(prefill.submit(request).unwrap()).await;
    assert_eq!(outputs.last().unwrap().finish_reason, Some(FinishReason::StopToken(first[0])));
    assert!(outputs.iter().all(|o| o.held.is_none()));
    eventually("the stopped prefill's pages are freed", || prefill.load().kv_active_blocks == held_before).await;

    // The router went away before the prefill ended.
    let long: Vec<u32> = (0..200).map(|i| 3 + i % 150).collect();
    let stream = prefill.submit(with(PreprocessedRequest::greedy("c", long, 1), HandOff::Hold)).unwrap();
    drop(stream);
    eventually("the cancelled prefill's pages are freed", || prefill.load().kv_active_blocks == held_before).await;
}

#[tokio::test]
async fn a_decode_worker_reads_only_the_blocks_it_has_not_cached() {
    let model = Model::load(&ModelSource::Builtin, None).unwrap();
    let (prefill, decode) = (hand_off(2, &model), hand_off(3, &model));
    let alone = engine(1, &model);
    let prompt = prompt();
    let extended: Vec<u32> = prompt.iter().copied().chain((0..20).map(|i| 300 + i)).collect();
    let mut read_bytes = Vec::new();
    for prompt in [&prompt, &extended] {
        let expected =
            tokens(&outputs(alone.submit(PreprocessedRequest::greedy("a", prompt.clone(), 6)).unwrap()).await);
        let (first, held) = prefill_holding(&prefill, prompt).await;
        let continued = [prompt.clone(), first.clone()].concat();
        let request = with(PreprocessedRequest::greedy("d", continued, 5), HandOff::From(Box::new(held)));
        let rest = tokens(&outputs(decode.submit(request).unwrap()).await);
        assert_eq!([first, rest].concat(), expected, "a prompt of {} tokens", prompt.len());
        read_bytes.push(decode.kv_transfers().unwrap().read_bytes);
    }
    let page = decode.layout().page_bytes * u64::from(decode.layout().regions);
    // The first prompt's 11 full blocks stayed cached on the decode worker: of the extended prompt's 17
    // blocks, 6 are read.
    assert_eq!(read_bytes[0], 12 * page, "the whole first prompt");
    assert_eq!(read_bytes[1] - read_bytes[0], 6 * page, "only what the decode worker lacked");
    assert_eq!(decode.kv_transfers().unwrap().read_failed, 0);
}

#[test]
fn the_read_rate_follows_the_last_reads_not_the_whole_life() {
    let mut rate = RecentRate::default();
    assert_eq!(rate.per_second(), 0, "nothing timed yet");
    // A thousand reads of 8 MB at 8 GB/s, then the link slows to 1 GB/s.
    for _ in 0..1000 {
        rate.record(8_000_000, 0.001);
    }
    assert_eq!(rate.per_second(), 8_000_000_000);
    for _ in 0..30 {
        rate.record(8_000_000, 0.008);
    }
    // A lifetime average would still say 7.8 GB/s.
    let now = rate.per_second();
    assert!((1_000_000_000..1_100_000_000).contains(&now), "{now}");
    // A zero-time read (a clock that did not move) neither divides by zero nor jumps.
    rate.record(8_000_000, 0.0);
    assert!(rate.per_second() < 1_200_000_000, "{}", rate.per_second());
}
