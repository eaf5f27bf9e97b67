use super::*;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
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
