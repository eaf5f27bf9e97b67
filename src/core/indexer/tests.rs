//! One seeded differential suite for every index: random event streams from several workers, checked against
//! the reference after every step, shrunk to a minimal failing sequence on disagreement.
use super::*;
use crate::core::protocol::StoredBlock;
use crate::core::tokens::chain_hash;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
enum Op {
    /// One worker's batch (an engine step's events), applied with `apply_all`.
    Apply(WorkerId, Vec<KvEvent>),
    RemoveWorker(WorkerId),
}

/// Prompts that share prefixes, as block-hash chains.
fn prompts(rng: &mut StdRng, count: usize) -> Vec<Vec<u64>> {
    let mut prompts: Vec<Vec<u64>> = Vec::new();
    for _ in 0..count {
        let mut chain = match prompts.len() {
            0 => Vec::new(),
            n => {
                let base = &prompts[rng.random_range(0..n)];
                base[..rng.random_range(0..=base.len())].to_vec()
            }
        };
        for _ in 0..rng.random_range(1..8) {
            chain.push(chain_hash(chain.last().copied(), rng.random()));
        }
        prompts.push(chain);
    }
    prompts
}

fn workload(seed: u64, steps: usize) -> (Vec<Op>, Vec<Vec<u64>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let prompts = prompts(&mut rng, 24);
    let mut ops = Vec::with_capacity(steps);
    for _ in 0..steps {
        let worker = rng.random_range(0..5u64);
        if rng.random_range(0..100) < 3 {
            ops.push(Op::RemoveWorker(worker));
            continue;
        }
        let events = (0..rng.random_range(1..=3))
            .map(|_| {
                let prompt = &prompts[rng.random_range(0..prompts.len())];
                match rng.random_range(0..100) {
                    0..=59 => {
                        let start = rng.random_range(0..prompt.len());
                        let end = rng.random_range(start + 1..=prompt.len());
                        let parent_hash = start.checked_sub(1).map(|i| prompt[i]);
                        let blocks = prompt[start..end]
                            .iter()
                            .map(|&hash| StoredBlock { hash, tokens_hash: hash ^ 1 })
                            .collect();
                        KvEvent::Stored { parent_hash, blocks }
                    }
                    60..=79 => {
                        let hashes =
                            (0..rng.random_range(1..3)).map(|_| prompt[rng.random_range(0..prompt.len())]).collect();
                        KvEvent::Removed { hashes }
                    }
                    80..=94 => {
                        // A chain's tail evicted leaf first, as engines do.
                        let start = rng.random_range(0..prompt.len());
                        KvEvent::Removed { hashes: prompt[start..].iter().rev().copied().collect() }
                    }
                    _ => KvEvent::Cleared,
                }
            })
            .collect();
        ops.push(Op::Apply(worker, events));
    }
    (ops, prompts)
}

fn run(index: &dyn Indexer, op: &Op) {
    match op {
        Op::Apply(worker, events) => index.apply_all(*worker, events),
        Op::RemoveWorker(worker) => index.remove_worker(*worker),
    }
}

/// The first step after which `make()`'s index disagrees with the reference, if any.
fn first_mismatch(make: &dyn Fn() -> Box<dyn Indexer>, ops: &[Op], prompts: &[Vec<u64>]) -> Option<String> {
    let (candidate, reference) = (make(), ReferenceIndexer::new());
    for (step, op) in ops.iter().enumerate() {
        run(candidate.as_ref(), op);
        run(&reference, op);
        for prompt in prompts {
            let (got, want) = (candidate.find_matches(prompt), reference.find_matches(prompt));
            if got != want {
                return Some(format!(
                    "after step {step} ({op:?}): find_matches {prompt:x?} gave {got:?}, want {want:?}"
                ));
            }
        }
        let (got, want) = (candidate.block_counts(), reference.block_counts());
        if got != want {
            return Some(format!("after step {step} ({op:?}): block_counts {got:?}, want {want:?}"));
        }
    }
    None
}

/// Removes ops while the failure persists, so a report shows only what matters.
fn shrink(make: &dyn Fn() -> Box<dyn Indexer>, mut ops: Vec<Op>, prompts: &[Vec<u64>]) -> Vec<Op> {
    let mut at = ops.len();
    while at > 0 {
        at -= 1;
        let mut fewer = ops.clone();
        fewer.remove(at);
        if first_mismatch(make, &fewer, prompts).is_some() {
            ops = fewer;
            at = at.min(ops.len());
        }
    }
    ops
}

fn check(make: &dyn Fn() -> Box<dyn Indexer>, seeds: std::ops::Range<u64>, steps: usize) -> Result<(), String> {
    for seed in seeds {
        let (ops, prompts) = workload(seed, steps);
        if first_mismatch(make, &ops, &prompts).is_some() {
            let minimal = shrink(make, ops, &prompts);
            let why = first_mismatch(make, &minimal, &prompts).unwrap_or_default();
            return Err(format!("seed {seed}: {why}\nminimal ops: {minimal:#?}"));
        }
    }
    Ok(())
}

#[test]
fn flash_indexer_agrees_with_the_reference() {
    if let Err(report) = check(&|| Box::new(FlashIndexer::new()), 0..200, 150) {
        panic!("{report}");
    }
}

#[test]
fn flash_indexer_agrees_past_64_workers() {
    // Workers 1000.. take the first 60 slots, so of the workload's five workers two land in the mask and three
    // past it: blocks move between a mask, one far holder kept inline, and the far list.
    let make = || {
        let index = FlashIndexer::new();
        (1000..1060).for_each(|w| index.apply(w, &KvEvent::Cleared));
        Box::new(index) as Box<dyn Indexer>
    };
    if let Err(report) = check(&make, 0..60, 150) {
        panic!("{report}");
    }
}

#[test]
fn flash_indexer_links_stay_true_through_removals_and_departures() {
    for seed in 0..60 {
        let (ops, _) = workload(seed, 150);
        let index = FlashIndexer::new();
        for (step, op) in ops.iter().enumerate() {
            run(&index, op);
            let wrong = index.false_links();
            assert!(wrong.is_empty(), "seed {seed}, after step {step} ({op:?}): {wrong:?}");
        }
    }
}

/// The harness must catch a broken index, or its green means nothing.
#[test]
fn the_harness_catches_an_index_that_forgets_removals() {
    struct ForgetsRemovals(FlashIndexer);
    impl Indexer for ForgetsRemovals {
        fn apply(&self, worker: WorkerId, event: &KvEvent) {
            if !matches!(event, KvEvent::Removed { .. }) {
                self.0.apply(worker, event);
            }
        }
        fn remove_worker(&self, worker: WorkerId) {
            self.0.remove_worker(worker);
        }
        fn find_matches(&self, hashes: &[u64]) -> OverlapScores {
            self.0.find_matches(hashes)
        }
        fn block_counts(&self) -> Vec<(WorkerId, usize)> {
            self.0.block_counts()
        }
    }
    let report = check(&|| Box::new(ForgetsRemovals(FlashIndexer::new())), 0..20, 150).unwrap_err();
    assert!(report.contains("Removed"), "{report}");
    // Shrinking leaves a handful of ops, not the whole stream.
    assert!(report.matches("Apply(").count() <= 6, "{report}");
}

#[test]
fn removing_a_block_drops_the_workers_extensions_of_it() {
    let index = FlashIndexer::new();
    let chain: Vec<u64> = (1..=4).collect();
    let blocks = chain.iter().map(|&hash| StoredBlock { hash, tokens_hash: hash }).collect();
    index.apply(7, &KvEvent::Stored { parent_hash: None, blocks });
    index.apply(8, &KvEvent::Stored { parent_hash: None, blocks: vec![StoredBlock { hash: 1, tokens_hash: 1 }] });
    assert_eq!(index.find_matches(&chain).scores, vec![(7, 4), (8, 1)]);
    index.apply(7, &KvEvent::Removed { hashes: vec![2] });
    assert_eq!(index.find_matches(&chain).scores, vec![(7, 1), (8, 1)]);
    assert_eq!(index.block_counts(), vec![(7, 1), (8, 1)]);
    // A run whose parent the worker lacks is ignored.
    index.apply(8, &KvEvent::Stored { parent_hash: Some(3), blocks: vec![StoredBlock { hash: 9, tokens_hash: 9 }] });
    assert_eq!(index.find_matches(&[1, 2, 3, 9]).of(8), 1);
    // Also when the block exists for others: they keep it, the newcomer does not get it.
    index.apply(9, &KvEvent::Stored { parent_hash: Some(3), blocks: vec![StoredBlock { hash: 1, tokens_hash: 1 }] });
    assert_eq!(index.find_matches(&[1]).scores, vec![(7, 1), (8, 1)]);
    assert_eq!(index.block_counts(), vec![(7, 1), (8, 1)]);
}
