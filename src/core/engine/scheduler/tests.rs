use super::*;
use crate::core::engine::mocker::{MockExecutor, timing};
use crate::core::protocol::KvEvent;

type Scheduler = super::Scheduler<MockExecutor>;

fn request(tokens: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest::greedy("r", tokens, max_tokens)
}

fn scheduler(num_blocks: usize, budget: usize) -> Scheduler {
    let config = SchedulerConfig {
        block_size: 4,
        num_blocks,
        max_num_seqs: 8,
        max_num_batched_tokens: budget,
        watermark: 0.0,
        enable_prefix_caching: true,
    };
    Scheduler::new(config, MockExecutor::new((100..200).collect(), num_blocks, 4))
}

/// Steps until idle; returns every output per sequence and every step.
fn run(s: &mut Scheduler) -> (Vec<(SeqId, EngineOutput)>, Vec<StepOutcome>) {
    let (mut outputs, mut steps) = (Vec::new(), Vec::new());
    for _ in 0..10_000 {
        if s.is_idle() {
            return (outputs, steps);
        }
        let step = s.step();
        outputs.extend(step.outputs.iter().cloned());
        steps.push(step);
    }
    panic!("scheduler did not finish");
}

fn tokens_of(outputs: &[(SeqId, EngineOutput)], id: SeqId) -> Vec<u32> {
    outputs.iter().filter(|(i, _)| *i == id).flat_map(|(_, o)| o.token_ids.clone()).collect()
}

#[test]
fn shared_prefix_is_reported_as_cached_tokens() {
    let mut s = scheduler(64, 1024);
    let prefix: Vec<u32> = (0..16).collect();
    s.add(1, &request([prefix.clone(), vec![50, 51, 52]].concat(), 2), 0);
    let (first, _) = run(&mut s);
    assert_eq!(first[0].1.cached_tokens, Some(0));
    s.add(2, &request([prefix, vec![60, 61]].concat(), 2), 0);
    let (second, _) = run(&mut s);
    assert_eq!(second[0].1.cached_tokens, Some(16));
    assert_eq!(second[1].1.cached_tokens, None, "reported once");
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_token() {
    let mut s = scheduler(64, 1024);
    let prompt: Vec<u32> = (0..16).collect();
    s.add(1, &request(prompt.clone(), 1), 0);
    run(&mut s);
    s.add(2, &request(prompt, 1), 0);
    let (out, steps) = run(&mut s);
    assert_eq!(out[0].1.cached_tokens, Some(12));
    assert_eq!(steps[0].prefill_tokens, 4);
}

#[test]
fn eviction_under_pressure_emits_removed_for_the_old_prefix() {
    let mut s = scheduler(4, 1024);
    let a: Vec<u32> = (0..12).collect();
    s.add(1, &request(a.clone(), 1), 0);
    run(&mut s);
    let stored: Vec<u64> = s
        .drain_events()
        .into_iter()
        .flat_map(|e| match e {
            KvEvent::Stored { blocks, .. } => blocks.into_iter().map(|b| b.hash).collect(),
            _ => vec![],
        })
        .collect();
    assert_eq!(stored.len(), 3);
    s.add(2, &request((500..512).collect(), 1), 0);
    run(&mut s);
    let removed: Vec<u64> = s
        .drain_events()
        .into_iter()
        .flat_map(|e| match e {
            KvEvent::Removed { hashes } => hashes,
            _ => vec![],
        })
        .collect();
    assert!(!removed.is_empty());
    assert!(removed.iter().all(|h| stored.contains(h)), "{removed:?} ⊄ {stored:?}");
    // The tail block was released first, so it went first.
    assert_eq!(removed[0], stored[2]);
}

#[test]
fn step_durations_follow_the_formula() {
    let mut s = scheduler(256, 8192);
    s.add(1, &request((0..100).collect(), 5), 0);
    let (_, steps) = run(&mut s);
    assert_eq!(steps.len(), 5);
    assert_eq!(steps[0].simulated_ms, timing::prefill_ms(100));
    for (i, step) in steps[1..].iter().enumerate() {
        // Decode step i computes the token at position 100 + i, so 101 + i tokens are in KV.
        assert_eq!(step.simulated_ms, timing::decode_ms(101 + i, 256 * 4), "relative to the cache's capacity");
    }
}

#[test]
fn long_prompts_prefill_in_chunks_under_the_budget() {
    let mut s = scheduler(256, 32);
    s.add(1, &request((0..100).collect(), 1), 0);
    let (_, steps) = run(&mut s);
    assert_eq!(steps.iter().map(|st| st.prefill_tokens).collect::<Vec<_>>(), vec![32, 32, 32, 4]);
    assert!(steps[..3].iter().all(|st| st.outputs.is_empty()));
    assert_eq!(steps[3].outputs.len(), 1);
}

#[test]
fn preempted_sequences_recompute_and_produce_the_same_tokens() {
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| (i * 100..i * 100 + 8).collect()).collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut s = scheduler(64, 1024);
            s.add(1, &request(p.clone(), 20), 7);
            tokens_of(&run(&mut s).0, 1)
        })
        .collect();
    // 3 sequences of up to 28 tokens need 21 blocks; 12 forces preemption.
    let mut s = scheduler(12, 1024);
    for (i, p) in prompts.iter().enumerate() {
        s.add(i as u64, &request(p.clone(), 20), 7);
    }
    let (outputs, steps) = run(&mut s);
    assert!(steps.iter().any(|st| st.prefill_tokens > 8), "expected a recompute after preemption");
    for (i, expected) in alone.iter().enumerate() {
        assert_eq!(&tokens_of(&outputs, i as u64), expected, "sequence {i}");
    }
    assert_eq!(s.load().kv_active_blocks, 0);
}

#[test]
fn continuing_from_generated_tokens_gives_the_same_continuation() {
    let prompt: Vec<u32> = (0..10).collect();
    let mut s = scheduler(64, 1024);
    s.add(1, &request(prompt.clone(), 10), 3);
    let full = tokens_of(&run(&mut s).0, 1);
    s.add(2, &request([prompt, full[..4].to_vec()].concat(), 6), 3);
    assert_eq!(tokens_of(&run(&mut s).0, 2), full[4..]);
}

#[test]
fn stop_tokens_finish_only_after_min_tokens() {
    let prompt: Vec<u32> = (0..10).collect();
    let mut s = scheduler(64, 1024);
    s.add(1, &request(prompt.clone(), 12), 0);
    let free_run = tokens_of(&run(&mut s).0, 1);
    let stop = free_run[1];
    let mut req = request(prompt, 12);
    req.stop.stop_token_ids = vec![stop];
    s.add(2, &req, 0);
    let out = run(&mut s).0;
    assert_eq!(out.last().unwrap().1.finish_reason, Some(FinishReason::StopToken(stop)));
    assert_eq!(tokens_of(&out, 2).len(), 2);
    req.stop.min_tokens = 5;
    s.add(3, &req, 0);
    let out = run(&mut s).0;
    // Same prompt and seed, so the same tokens as the free run, but the early stop token is ignored.
    let expected_len = free_run.iter().skip(4).position(|&t| t == stop).map_or(12, |at| at + 5);
    assert_eq!(tokens_of(&out, 3), free_run[..expected_len]);
}

#[test]
fn abort_frees_every_block() {
    let mut s = scheduler(64, 1024);
    s.add(1, &request((0..30).collect(), 100), 0);
    s.step();
    assert!(s.load().kv_active_blocks > 0);
    assert!(s.abort(1));
    assert_eq!(s.load().kv_active_blocks, 0);
    assert!(s.is_idle());
    assert!(!s.abort(1));
}

#[test]
fn logprobs_put_the_sampled_token_first() {
    let mut s = scheduler(64, 1024);
    let mut req = request((0..10).collect(), 3);
    req.logprobs = Some(4);
    s.add(1, &req, 0);
    for (_, out) in run(&mut s).0 {
        let lp = &out.logprobs[0];
        assert_eq!(lp.top.len(), 4);
        assert_eq!(lp.top[0], (out.token_ids[0], lp.logprob));
        assert!(lp.top.windows(2).all(|w| w[0].1 > w[1].1));
    }
}

#[test]
fn a_sequence_held_for_a_peer_keeps_its_pages_until_released_or_its_lease_expires() {
    let mut s = scheduler(16, 1024);
    let lease = std::time::Duration::from_secs(30);
    s.add_holding(1, &request((0..8).collect(), 1), 0, lease);
    s.add_holding(2, &request((20..28).collect(), 1), 0, lease);
    let (outputs, _) = run(&mut s);
    assert_eq!(outputs.len(), 2, "both finished");
    let held = |s: &Scheduler| s.load().kv_active_blocks;
    assert_eq!(s.held_pages(1).map(<[_]>::len), Some(2), "the prompt's two blocks are held");
    assert_eq!(held(&s), 4);
    assert!(s.release_lease(2), "the peer read them");
    assert_eq!((held(&s), s.held_pages(2)), (2, None));
    let now = std::time::Instant::now();
    assert!(s.expire(now).is_empty(), "not yet");
    assert_eq!(s.expire(now + lease * 2), vec![1]);
    assert_eq!((held(&s), s.load().kv_total_blocks), (0, 16), "every page is back");
    assert!(!s.release_lease(1));
    // The held blocks stayed committed: the same prompt is a cache hit afterwards.
    s.add(3, &request((0..8).collect(), 1), 0);
    let (outputs, _) = run(&mut s);
    assert_eq!(outputs[0].1.cached_tokens, Some(4));
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[test]
fn a_sequence_whose_kv_arrives_waits_for_it_then_computes_only_the_rest() {
    let mut s = scheduler(16, 1024);
    // A prefill worker computed the prompt's 8 tokens and sampled 77; the decode side gets all 9.
    let tokens: Vec<u32> = (0..8).chain([77]).collect();
    let pages = s.add_arriving(1, &request(tokens.clone(), 3), 0, 8, WAIT).unwrap();
    assert_eq!(pages.pages.len(), 2);
    assert_eq!((s.load().kv_active_blocks, s.load().requests_waiting), (2, 1));
    let idle = s.step();
    assert!(idle.outputs.is_empty() && idle.prefill_tokens == 0, "nothing runs before the KV has landed");
    assert!(s.arrived(1));
    let step = s.step();
    assert_eq!(step.prefill_tokens, 1, "only the token after the peer's KV is computed");
    assert_eq!(step.outputs.len(), 1);
    let stored: usize = s
        .drain_events()
        .iter()
        .map(|e| match e {
            KvEvent::Stored { blocks, .. } => blocks.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(stored, 2, "the arrived blocks are committed and announced like computed ones");
    run(&mut s);
    assert_eq!(s.load().kv_active_blocks, 0);

    // When the transfer fails, the sequence is computed here from the start (another prompt: this one's
    // blocks are cached now).
    let other: Vec<u32> = (100..108).chain([77]).collect();
    s.add_arriving(2, &request(other, 1), 0, 8, WAIT).unwrap();
    assert!(s.arrival_failed(2));
    let step = s.step();
    assert_eq!(step.prefill_tokens, 9);
    assert!(!s.arrived(2), "no longer arriving");
    run(&mut s);

    // When the peer never answers, the wait ends and the sequence is computed here.
    let third: Vec<u32> = (200..208).chain([77]).collect();
    s.add_arriving(3, &request(third, 1), 0, 8, WAIT).unwrap();
    let now = std::time::Instant::now();
    assert!(s.next_deadline().is_some_and(|d| d > now + WAIT / 2));
    assert!(s.expire(now).is_empty(), "still waiting");
    assert_eq!(s.expire(now + WAIT * 2), vec![3]);
    assert_eq!(s.step().prefill_tokens, 9, "computed here from the start");
}

#[test]
fn arriving_kv_is_refused_when_it_cannot_fit_or_would_leave_nothing_to_compute() {
    let mut s = scheduler(2, 1024);
    assert_eq!(
        s.add_arriving(1, &request((0..9).collect(), 1), 0, 9, WAIT),
        Err(HandOffError::TooMany { from_peer: 9, tokens: 9 })
    );
    assert_eq!(
        s.add_arriving(1, &request((0..13).collect(), 1), 0, 12, WAIT),
        Err(HandOffError::Full { needed: 3, available: 2 })
    );
    assert!(s.add_arriving(1, &request((0..9).collect(), 1), 0, 8, WAIT).is_ok());
    assert!(s.abort(1), "an arriving sequence can be aborted");
    assert_eq!(s.load().kv_active_blocks, 0);
}
