//! `dynamo bench index`: the KV index under a replayed trace, FlashIndexer against the reference index.
//!
//! 1. Simulate: route each trace request to the worker with the longest cached prefix (ties to the worker
//!    holding fewest blocks), let that worker's KV manager (the mocker's: LRU eviction under a per-worker
//!    capacity) store the prompt's blocks, and record the lookup and the Stored/Removed events it emits.
//! 2. Replay the recorded operations into a fresh index of each kind, timing the whole replay (sustained
//!    block ops/s: a lookup counts its query's blocks, an event the blocks it stores or removes) and each
//!    lookup (p50/p99).
//! 3. Concurrent: the same operations with the events applied on one thread while the lookups run on
//!    another, so a lookup that has to wait for writes shows in its tail latency.
//! 4. Micro: `find_matches` on an index of `micro_blocks` distinct blocks in 64-block chains over
//!    `micro_workers` workers, full-chain queries; once with each chain held whole by a few workers, once
//!    with every worker holding a different-length prefix of every chain (the most bisection steps).
use super::trace::{TraceRequest, sequence_hashes};
use crate::core::engine::blocks::BlockPool;
use crate::core::indexer::{FlashIndexer, Indexer, ReferenceIndexer};
use crate::core::protocol::{KvEvent, WorkerId};
use crate::core::tokens::BlockHash;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct IndexBenchSettings {
    pub workers: usize,
    /// KV blocks per simulated worker.
    pub capacity: usize,
    /// Disjoint copies of the trace replayed one after the other.
    pub repeat: usize,
    pub micro_blocks: usize,
    pub micro_workers: usize,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReplayStats {
    pub block_ops_per_s: f64,
    pub lookup_p50_us: f64,
    pub lookup_p99_us: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IndexBenchResult {
    pub requests: usize,
    pub block_ops: u64,
    pub flash: ReplayStats,
    pub reference: ReplayStats,
    pub concurrent_flash: ReplayStats,
    pub concurrent_reference: ReplayStats,
    /// Flash over reference, sustained block ops/s.
    pub ratio: f64,
    /// Flash index memory over (worker, block) pairs held at the end of the replay.
    pub bytes_per_entry: f64,
    pub entries: usize,
    pub micro: MicroStats,
}

enum Op {
    Lookup(Vec<u64>),
    Event(WorkerId, KvEvent),
}

pub fn run(trace: &[TraceRequest], settings: &IndexBenchSettings) -> IndexBenchResult {
    let ops = simulate(trace, settings);
    let block_ops: u64 = ops.iter().map(block_ops_of).sum();
    let flash_index = FlashIndexer::new();
    let flash = replay(&flash_index, &ops, block_ops);
    let reference = replay(&ReferenceIndexer::new(), &ops, block_ops);
    let concurrent_flash = replay_concurrent(&FlashIndexer::new(), &ops, block_ops);
    let concurrent_reference = replay_concurrent(&ReferenceIndexer::new(), &ops, block_ops);
    let entries: usize = flash_index.block_counts().iter().map(|(_, n)| n).sum();
    let bytes_per_entry = flash_index.memory_bytes() as f64 / entries.max(1) as f64;
    let micro = micro(settings.micro_blocks, settings.micro_workers);
    IndexBenchResult {
        requests: trace.len() * settings.repeat,
        block_ops,
        ratio: flash.block_ops_per_s / reference.block_ops_per_s,
        flash,
        reference,
        concurrent_flash,
        concurrent_reference,
        bytes_per_entry,
        entries,
        micro,
    }
}

fn block_ops_of(op: &Op) -> u64 {
    match op {
        Op::Lookup(hashes) => hashes.len() as u64,
        Op::Event(_, KvEvent::Stored { blocks, .. }) => blocks.len() as u64,
        Op::Event(_, KvEvent::Removed { hashes }) => hashes.len() as u64,
        Op::Event(_, KvEvent::Cleared) => 1,
    }
}

fn simulate(trace: &[TraceRequest], settings: &IndexBenchSettings) -> Vec<Op> {
    let index = FlashIndexer::new();
    let mut workers: Vec<BlockPool> = (0..settings.workers.max(1)).map(|_| BlockPool::new(settings.capacity)).collect();
    let mut ops = Vec::new();
    for salt in 0..settings.repeat as u64 {
        for request in trace {
            let hashes = sequence_hashes(&request.hash_ids, salt);
            let scores = index.find_matches(&hashes);
            let chosen = (0..workers.len())
                .max_by_key(|&w| {
                    let kv = &workers[w];
                    (scores.of(w as WorkerId), std::cmp::Reverse(kv.active_blocks() + kv.cached_blocks()))
                })
                .unwrap_or(0);
            ops.push(Op::Lookup(hashes.clone()));
            let kv = &mut workers[chosen];
            let mut held = Vec::new();
            let mut parent = None;
            for &sequence in &hashes {
                let page = match kv.acquire(sequence) {
                    Some(page) => page,
                    None => match kv.allocate() {
                        Ok(page) => kv.commit(page, parent, BlockHash { local: sequence, sequence }),
                        Err(_) => break,
                    },
                };
                held.push(page);
                parent = Some(sequence);
            }
            for page in held.into_iter().rev() {
                kv.release(page);
            }
            for event in kv.drain_events() {
                index.apply(chosen as WorkerId, &event);
                ops.push(Op::Event(chosen as WorkerId, event));
            }
        }
    }
    ops
}

fn replay(index: &dyn Indexer, ops: &[Op], block_ops: u64) -> ReplayStats {
    let mut lookups = Vec::new();
    let start = Instant::now();
    for op in ops {
        match op {
            Op::Lookup(hashes) => {
                let t = Instant::now();
                std::hint::black_box(index.find_matches(hashes));
                lookups.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Op::Event(worker, event) => index.apply(*worker, event),
        }
    }
    replay_stats(lookups, block_ops, start.elapsed().as_secs_f64())
}

fn replay_stats(mut lookups: Vec<f64>, block_ops: u64, seconds: f64) -> ReplayStats {
    lookups.sort_by(f64::total_cmp);
    ReplayStats {
        block_ops_per_s: block_ops as f64 / seconds,
        lookup_p50_us: super::percentile(&lookups, 0.5),
        lookup_p99_us: super::percentile(&lookups, 0.99),
        seconds,
    }
}

/// Events on a writer thread, lookups on this one; both start together and the clock stops when both end.
fn replay_concurrent(index: &(dyn Indexer + Sync), ops: &[Op], block_ops: u64) -> ReplayStats {
    let start = Instant::now();
    let mut lookups = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for op in ops {
                if let Op::Event(worker, event) = op {
                    index.apply(*worker, event);
                }
            }
        });
        for op in ops {
            if let Op::Lookup(hashes) = op {
                let t = Instant::now();
                std::hint::black_box(index.find_matches(hashes));
                lookups.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    });
    replay_stats(lookups, block_ops, start.elapsed().as_secs_f64())
}

const MICRO_CHAIN: usize = 64;
const MICRO_QUERIES: usize = 100_000;

/// `find_matches` p50 in µs over `blocks` distinct blocks in 64-block chains and `workers` workers.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MicroStats {
    /// Each chain held whole by 1–4 workers: the common case of requests landing where their prefix is.
    pub whole_p50_us: f64,
    pub whole_reference_p50_us: f64,
    /// Every worker holds a different-length prefix of every chain: the most bisection steps.
    pub divergent_p50_us: f64,
    pub divergent_reference_p50_us: f64,
    /// One random memory access missing every cache, measured in the same run: the physical floor of a
    /// lookup in an index bigger than the caches.
    pub dram_miss_us: f64,
}

fn micro(blocks: usize, workers: usize) -> MicroStats {
    let (whole_p50_us, whole_reference_p50_us) = micro_case(blocks, workers, false);
    let (divergent_p50_us, divergent_reference_p50_us) = micro_case(blocks, workers, true);
    let dram_miss_us = if blocks == 0 { f64::NAN } else { dram_miss_us() };
    MicroStats { whole_p50_us, whole_reference_p50_us, divergent_p50_us, divergent_reference_p50_us, dram_miss_us }
}

/// Average latency of dependent random loads over 128 MiB (a single cycle through a shuffled array, so the
/// prefetchers cannot guess and no two loads overlap).
fn dram_miss_us() -> f64 {
    const SLOTS: usize = 32 << 20;
    const STEPS: usize = 200_000;
    let mut rng = StdRng::seed_from_u64(11);
    // Sattolo's shuffle: a random permutation that is one single cycle.
    let mut next: Vec<u32> = (0..SLOTS as u32).collect();
    for i in (1..SLOTS).rev() {
        next.swap(i, rng.random_range(0..i));
    }
    let mut at = 0u32;
    let start = Instant::now();
    for _ in 0..STEPS {
        at = next[at as usize];
    }
    std::hint::black_box(at);
    start.elapsed().as_secs_f64() * 1e6 / STEPS as f64
}

fn micro_case(blocks: usize, workers: usize, divergent: bool) -> (f64, f64) {
    if blocks == 0 || workers == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = StdRng::seed_from_u64(7);
    let ids: Vec<u64> = (0..MICRO_CHAIN as u64).collect();
    let chains: Vec<Vec<u64>> =
        (0..blocks.div_ceil(MICRO_CHAIN)).map(|c| sequence_hashes(&ids, c as u64 + 1_000_000)).collect();
    let (flash, reference) = (FlashIndexer::new(), ReferenceIndexer::new());
    for chain in &chains {
        let holders: Vec<(WorkerId, usize)> = if divergent {
            (0..workers as WorkerId).map(|w| (w, rng.random_range(1..=MICRO_CHAIN))).collect()
        } else {
            (0..rng.random_range(1..=4)).map(|_| (rng.random_range(0..workers as WorkerId), MICRO_CHAIN)).collect()
        };
        for (worker, depth) in holders {
            let blocks = chain[..depth]
                .iter()
                .map(|&hash| crate::core::protocol::StoredBlock { hash, tokens_hash: hash })
                .collect();
            let event = KvEvent::Stored { parent_hash: None, blocks };
            flash.apply(worker, &event);
            reference.apply(worker, &event);
        }
    }
    let queries: Vec<&Vec<u64>> = (0..MICRO_QUERIES).map(|_| &chains[rng.random_range(0..chains.len())]).collect();
    let p50 = |index: &dyn Indexer, queries: &[&Vec<u64>]| {
        let mut times: Vec<f64> = queries
            .iter()
            .map(|q| {
                // A router has just computed its query's hashes, so they are in cache: copy them there first
                // rather than timing misses on the benchmark's own chain store.
                let q = std::hint::black_box(q.to_vec());
                let t = Instant::now();
                std::hint::black_box(index.find_matches(&q));
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        times.sort_by(f64::total_cmp);
        super::percentile(&times, 0.5)
    };
    (p50(&flash, &queries), p50(&reference, &queries[..queries.len() / 10]))
}

/// The readable report of `dynamo bench index`.
pub fn table(r: &IndexBenchResult) -> String {
    let mut out =
        format!("{:<22} {:>16} {:>14} {:>14} {:>10}\n", "index", "block ops/s", "lookup p50", "lookup p99", "seconds");
    for (name, s) in [
        ("flash", &r.flash),
        ("reference", &r.reference),
        ("flash, 2 threads", &r.concurrent_flash),
        ("reference, 2 threads", &r.concurrent_reference),
    ] {
        out.push_str(&format!(
            "{:<22} {:>16.0} {:>12.2}µs {:>12.2}µs {:>10.3}\n",
            name, s.block_ops_per_s, s.lookup_p50_us, s.lookup_p99_us, s.seconds
        ));
    }
    out.push_str(&format!(
        "flash/reference: {:.2}x over {} block ops; {:.1} bytes per (worker, block) entry ({} entries)\n",
        r.ratio, r.block_ops, r.bytes_per_entry, r.entries
    ));
    let m = &r.micro;
    if m.whole_p50_us.is_nan() {
        out.push_str("micro find_matches: skipped (--micro-blocks 0)\n");
        return out;
    }
    out.push_str(&format!(
        "micro find_matches p50, chains held whole: flash {:.3}µs, reference {:.3}µs ({:.1}x); \
         {:.2} random DRAM accesses ({:.3}µs each, same run)\n",
        m.whole_p50_us,
        m.whole_reference_p50_us,
        m.whole_reference_p50_us / m.whole_p50_us,
        m.whole_p50_us / m.dram_miss_us,
        m.dram_miss_us
    ));
    out.push_str(&format!(
        "micro find_matches p50, every worker a different depth: flash {:.3}µs, reference {:.3}µs ({:.1}x)\n",
        m.divergent_p50_us,
        m.divergent_reference_p50_us,
        m.divergent_reference_p50_us / m.divergent_p50_us
    ));
    out
}
