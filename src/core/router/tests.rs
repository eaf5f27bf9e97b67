use super::*;
use crate::core::engine::batch::BatchEngine;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::protocol::{KvEvent, KvEventBatch, LoadMetrics, StoredBlock};
use crate::core::tokens::block_hashes;
use futures::StreamExt;

fn request(tokens: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest::greedy("r", tokens, max_tokens)
}

fn router(workers: u64, mode: RouterMode, busy_threshold: usize) -> Router {
    let config = MockerConfig { speedup: 1000.0, ..Default::default() };
    let engines = (0..workers)
        .map(|id| Arc::new(MockerEngine::spawn(id, config.clone(), (10..20).collect())) as Arc<dyn Engine>)
        .collect();
    Router::new(engines, RouterConfig { mode, busy_threshold, ..Default::default() })
}

#[tokio::test]
async fn least_loaded_spreads_requests_evenly() {
    let router = router(3, RouterMode::LeastLoaded, 10);
    let streams: Vec<_> = (0..6).map(|_| router.route(request(vec![1, 2, 3], 1000)).unwrap()).collect();
    let mut per_worker = [0; 3];
    for s in &streams {
        per_worker[s.worker_id as usize] += 1;
    }
    assert_eq!(per_worker, [2, 2, 2]);
}

#[tokio::test]
async fn refuses_past_the_busy_threshold_and_recovers_when_streams_end() {
    let router = router(2, RouterMode::RoundRobin, 2);
    let mut streams: Vec<_> = (0..4).map(|_| router.route(request(vec![1, 2, 3], 1000)).unwrap()).collect();
    assert!(matches!(router.route(request(vec![1], 10)), Err(RouteError::Busy { threshold: 2 })));
    streams.pop();
    assert_eq!(router.in_flight(), 3);
    assert!(router.route(request(vec![1], 10)).is_ok());
}

#[tokio::test]
async fn a_choice_charges_its_worker_until_dropped_or_dispatched() {
    let router = router(2, RouterMode::LeastLoaded, 10);
    let first = router.choose(&[1, 2, 3], &[]).unwrap();
    let second = router.choose(&[1, 2, 3], &[]).unwrap();
    assert_ne!(first.worker_id, second.worker_id, "the first choice's charge counts for the second");
    assert_eq!(router.in_flight(), 2, "nothing was submitted, but both are charged");
    drop(second);
    assert_eq!(router.in_flight(), 1);
    let avoided = router.choose(&[1], &[first.worker_id]).unwrap();
    assert_ne!(avoided.worker_id, first.worker_id);
    drop(avoided);
    let chosen = first.worker_id;
    let stream = first.dispatch(request(vec![1, 2, 3], 2)).unwrap();
    assert_eq!((stream.worker_id, router.in_flight()), (chosen, 1), "the stream holds the charge now");
    let outputs: Vec<_> = stream.collect().await;
    assert!(!outputs.is_empty());
    assert_eq!(router.in_flight(), 0);
}

#[tokio::test]
async fn a_request_of_more_streams_than_the_workers_can_take_is_refused_before_routing() {
    let router = router(2, RouterMode::RoundRobin, 3);
    assert!(router.check_room(6).is_ok());
    assert!(matches!(router.check_room(7), Err(RouteError::NoRoom { needed: 7, room: 6 })));
    let streams: Vec<_> = (0..5).map(|_| router.route(request(vec![1, 2, 3], 1000)).unwrap()).collect();
    assert!(router.check_room(1).is_ok());
    assert!(matches!(router.check_room(2), Err(RouteError::NoRoom { needed: 2, room: 1 })));
    let _last = router.route(request(vec![1], 10)).unwrap();
    assert!(matches!(router.check_room(1), Err(RouteError::Busy { threshold: 3 })));
    drop(streams);
    assert!(router.check_room(5).is_ok());
}

#[tokio::test]
async fn kv_mode_sends_a_repeated_prompt_back_to_the_worker_that_cached_it() {
    let router = router(4, RouterMode::Kv, 100);
    let prompt: Vec<u32> = (0..200).collect();
    let first = router.route(request(prompt.clone(), 2)).unwrap();
    let home = first.worker_id;
    let _: Vec<_> = first.collect().await;
    // The Stored events reach the index through the feed task; wait for them, bounded.
    let hashes: Vec<u64> = block_hashes(&prompt, 16).iter().map(|b| b.sequence).collect();
    for _ in 0..500 {
        if router.indexer.find_matches(&hashes).of(home) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let quotes = router.quote(&prompt, &[]);
    assert_eq!(router.quote(&prompt, &[]), quotes, "a quote changes nothing");
    assert_eq!(router.in_flight(), 0, "a quote charges nothing");
    let best = quotes.iter().min_by(|a, b| a.cost.total_cmp(&b.cost)).unwrap();
    assert_eq!((best.worker_id, best.overlap_blocks, best.open), (home, 12, true));
    assert!(quotes.iter().filter(|q| q.worker_id != home).all(|q| q.overlap_blocks == 0 && q.cost > best.cost));
    for _ in 0..3 {
        let again = router.route(request(prompt.clone(), 2)).unwrap();
        assert_eq!(again.worker_id, home);
        assert_eq!(again.overlap_blocks, 12);
        let outputs: Vec<_> = again.collect().await;
        assert_eq!(outputs[0].cached_tokens, Some(192));
    }
}

#[tokio::test]
async fn the_account_moves_prefill_to_decode_and_is_given_back() {
    let router = router(1, RouterMode::Kv, 10);
    let mut stream = router.route(request((0..64).collect(), 40)).unwrap();
    let load = router.snapshot()[0].load.clone();
    assert_eq!(load.prefill_blocks.load(Ordering::Relaxed), 4);
    stream.next().await.unwrap();
    assert_eq!(load.prefill_blocks.load(Ordering::Relaxed), 0);
    assert_eq!(load.decode_blocks.load(Ordering::Relaxed), 4);
    for _ in 0..16 {
        stream.next().await.unwrap();
    }
    assert_eq!(load.decode_blocks.load(Ordering::Relaxed), 5, "17 tokens generated add one block");
    drop(stream);
    assert_eq!(load.decode_blocks.load(Ordering::Relaxed), 0);
    assert_eq!(load.in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn approximate_mode_follows_its_own_decisions_without_events() {
    let config = MockerConfig { speedup: 1000.0, ..Default::default() };
    let engines = (0..4)
        .map(|id| Arc::new(MockerEngine::spawn(id, config.clone(), (10..20).collect())) as Arc<dyn Engine>)
        .collect();
    let router = Router::new(engines, RouterConfig { kv_events: false, ..Default::default() });
    assert!(router.snapshot().iter().all(|w| w.feed.is_none()), "approximate mode must not listen to events");
    let prompt: Vec<u32> = (0..64).collect();
    let first = router.route(request(prompt.clone(), 1)).unwrap();
    assert_eq!(first.overlap_blocks, 0);
    let home = first.worker_id;
    // Finished, so its queued prefill no longer weighs against its worker.
    let _: Vec<_> = first.collect().await;
    let again = router.route(request(prompt, 1)).unwrap();
    assert_eq!((again.worker_id, again.overlap_blocks), (home, 4));
}

/// An engine whose KV events a test writes by hand, with a tiny channel so the router's feed can be made to
/// lag; `resend_kv_state` sends `state` (what the engine really holds) when `can_resend`.
struct HandFedEngine {
    events: tokio::sync::broadcast::Sender<KvEventBatch>,
    state: Vec<KvEvent>,
    can_resend: bool,
}

impl Engine for HandFedEngine {
    fn worker_id(&self) -> WorkerId {
        7
    }

    fn submit(&self, _: PreprocessedRequest) -> Result<crate::core::engine::ResponseStream, EngineError> {
        Err(EngineError::Stopped)
    }

    fn subscribe_kv_events(&self) -> tokio::sync::broadcast::Receiver<KvEventBatch> {
        self.events.subscribe()
    }

    fn load(&self) -> LoadMetrics {
        LoadMetrics::default()
    }

    fn resend_kv_state(&self) -> bool {
        let events = std::iter::once(KvEvent::Cleared).chain(self.state.iter().cloned()).collect();
        self.can_resend && self.events.send(KvEventBatch { worker_id: 7, events }).is_ok()
    }
}

/// Lets the (current-thread) runtime run the feed task until it has nothing left to do.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// The router's feed applies one chain, then misses two of four messages (one of them removing that chain).
/// Returns the overlaps it ends up with for the removed chain, the missed block and a received one.
async fn overlaps_after_a_lag(can_resend: bool) -> [u32; 3] {
    let root = |hash: u64| KvEvent::Stored { parent_hash: None, blocks: vec![StoredBlock { hash, tokens_hash: hash }] };
    let events = tokio::sync::broadcast::channel(2).0;
    let state = vec![root(30), root(40), root(50)];
    let engine = HandFedEngine { events: events.clone(), state, can_resend };
    let router = Router::new(vec![Arc::new(engine)], RouterConfig::default());
    let send = |events_of_step: Vec<KvEvent>| {
        let _ = events.send(KvEventBatch { worker_id: 7, events: events_of_step });
    };
    send(vec![KvEvent::Stored {
        parent_hash: None,
        blocks: [1, 2].map(|hash| StoredBlock { hash, tokens_hash: hash }).to_vec(),
    }]);
    settle().await;
    assert_eq!(router.indexer.find_matches(&[1, 2]).of(7), 2, "the feed runs");
    // Four messages into a channel of two, before the feed runs again: the first two are lost to it.
    send(vec![KvEvent::Removed { hashes: vec![1] }]);
    send(vec![root(30)]);
    send(vec![root(40)]);
    send(vec![root(50)]);
    settle().await;
    let index = &router.indexer;
    [index.find_matches(&[1, 2]).of(7), index.find_matches(&[30]).of(7), index.find_matches(&[50]).of(7)]
}

#[tokio::test(flavor = "current_thread")]
async fn a_lagging_feed_resyncs_from_the_engine() {
    assert_eq!(overlaps_after_a_lag(true).await, [0, 1, 1], "exactly what the engine holds");
}

#[tokio::test(flavor = "current_thread")]
async fn a_lagging_feed_that_cannot_resync_forgets_rather_than_routes_on_removed_blocks() {
    assert_eq!(
        overlaps_after_a_lag(false).await,
        [0, 0, 1],
        "the removed chain is not claimed, the missed block is lost"
    );
}

/// Waits (bounded) until the index says `worker` holds the first block of `prompt`.
async fn indexed(router: &Router, prompt: &[u32], worker: WorkerId) {
    let hashes: Vec<u64> = block_hashes(prompt, 16).iter().map(|b| b.sequence).collect();
    for _ in 0..500 {
        if router.indexer.find_matches(&hashes).of(worker) > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    panic!("worker {worker} never indexed the prompt");
}

#[tokio::test]
async fn latency_mode_waits_for_a_hit_only_while_waiting_is_faster() {
    let router = router(2, RouterMode::Latency, 100);
    assert!(router.snapshot().iter().all(|w| w.profile.is_some()), "mockers bring their profile");
    let prompt: Vec<u32> = (0..2048).collect();
    let first = router.route(request(prompt.clone(), 1)).unwrap();
    let home = first.worker_id;
    let _: Vec<_> = first.collect().await;
    indexed(&router, &prompt, home).await;
    let again = router.route(request(prompt.clone(), 1)).unwrap();
    assert_eq!((again.worker_id, again.overlap_blocks), (home, 128), "an idle holder wins");
    drop(again);
    // Two long prompts queued on the holder: computing the whole prompt on the idle worker is faster than
    // waiting behind them for the hit; one short prompt queued there is not.
    let short = router.choose_in(Pool::Decode, &(5000..5100).collect::<Vec<u32>>(), &[], None, &[1 - home]).unwrap();
    let with_short_queue = router.route(request(prompt.clone(), 1)).unwrap();
    assert_eq!(with_short_queue.worker_id, home);
    drop((short, with_short_queue));
    let long: Vec<u32> = (10_000..18_000).collect();
    let queued: Vec<_> =
        (0..2).map(|_| router.choose_in(Pool::Decode, &long, &[], None, &[1 - home]).unwrap()).collect();
    let busy_holder = router.route(request(prompt.clone(), 1)).unwrap();
    assert_ne!(busy_holder.worker_id, home, "the queue costs more than the hit saves");
    drop(queued);
}

#[tokio::test]
async fn latency_mode_reports_its_predictions_against_what_happened() {
    let router = router(2, RouterMode::Latency, 100);
    let metrics = Arc::new(crate::core::telemetry::Metrics::new());
    router.report_to(metrics.clone());
    for i in 0..3u32 {
        let stream = router.route(request((i * 1000..i * 1000 + 300).collect(), 2)).unwrap();
        let _: Vec<_> = stream.collect().await;
    }
    let text = metrics.render(&[], &[]);
    let count: f64 = text
        .lines()
        .filter(|l| l.starts_with("dynamo_router_ttft_prediction_error_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(count, 3.0, "{text}");
    assert!(text.contains("dynamo_router_ttft_predicted_seconds_total{worker_id="));
    assert!(text.contains("dynamo_router_ttft_observed_seconds_total{worker_id="));
    let load = router.snapshot()[0].load.clone();
    assert_eq!((load.prefilling.load(Ordering::Relaxed), load.prefill_tokens.load(Ordering::Relaxed)), (0, 0));
}

/// A mocker that does not say how fast it is, as a native engine started without a profile.
struct Unprofiled(BatchEngine);

impl Engine for Unprofiled {
    fn worker_id(&self) -> WorkerId {
        self.0.worker_id()
    }

    fn submit(&self, request: PreprocessedRequest) -> Result<crate::core::engine::ResponseStream, EngineError> {
        self.0.submit(request)
    }

    fn subscribe_kv_events(&self) -> tokio::sync::broadcast::Receiver<KvEventBatch> {
        self.0.subscribe_kv_events()
    }

    fn load(&self) -> LoadMetrics {
        self.0.load()
    }
}

#[tokio::test]
async fn latency_mode_without_any_profile_routes_by_the_kv_cost() {
    let engines: Vec<Arc<dyn Engine>> = (0..2)
        .map(|id| Arc::new(Unprofiled(MockerEngine::spawn(id, MockerConfig::default(), (10..20).collect()))) as _)
        .collect();
    let router = Router::new(engines, RouterConfig { mode: RouterMode::Latency, ..Default::default() });
    assert!(router.snapshot().iter().all(|w| w.profile.is_none()));
    let a = router.choose(&[1, 2, 3], &[]).unwrap();
    let b = router.choose(&[1, 2, 3], &[]).unwrap();
    assert_ne!(a.worker_id, b.worker_id, "the kv cost spreads equal workers");
}

#[tokio::test]
async fn a_request_that_names_its_worker_goes_there_whatever_the_cost() {
    let router = Arc::new(router(3, RouterMode::Kv, 100));
    let prompt: Vec<u32> = (0..200).collect();
    let first = router.route(request(prompt.clone(), 2)).unwrap();
    let home = first.worker_id;
    let _: Vec<_> = first.collect().await;
    indexed(&router, &prompt, home).await;
    let elsewhere = (home + 1) % 3;
    let pins = Pins { decode: Some(elsewhere), prefill: None };
    let named = router.route_pinned(request(prompt.clone(), 2), pins).await.unwrap();
    assert_eq!((named.worker_id(), named.overlap_blocks), (elsewhere, 0), "named, though another holds the prefix");
    drop(named);
    let unpinned = router.route_pinned(request(prompt.clone(), 2), Pins::default()).await.unwrap();
    assert_eq!(unpinned.worker_id(), home, "no name: the router's own choice");
    drop(unpinned);
    let missing = Pins { decode: Some(7), prefill: None };
    assert!(matches!(router.route_pinned(request(prompt, 2), missing).await, Err(RouteError::NotHere(7, "decode"))));
    assert_eq!(router.in_flight(), 0, "nothing left charged");
}
