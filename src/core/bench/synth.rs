//! Synthetic Mooncake-format traces for routing benchmarks (`dynamo bench trace`), seeded so a run can be
//! repeated, in blocks of `block_tokens` tokens (pass the same `--block-tokens` to the benches).
//!
//! - `shared-prefix`: `prefixes` prompts of `prefix_tokens` shared tokens each used `uses` times, each use with
//!   its own suffix, in a shuffled order: the workload where a cost that counts requests in flight against
//!   cached blocks gives up half the possible hits under concurrency.
//! - `conversations`: multi-turn chat. Sessions start in bursts (a Poisson process whose rate jumps `burst`-fold
//!   for a few seconds now and then); every turn's prompt is the whole conversation so far (one of a few system
//!   prompts, then each earlier user message and answer) plus a new user message, sent a think time after the
//!   previous answer would have ended. Lengths are log-normal. The prefix shared with the previous turn is what
//!   a router can win by sending a conversation back to the worker that holds it, and the bursts are where
//!   piling conversations onto their holders makes them queue.
use super::trace::TraceRequest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SharedPrefix {
    pub prefixes: usize,
    pub uses: usize,
    pub prefix_tokens: usize,
    pub suffix_tokens: usize,
    pub output_tokens: usize,
    pub block_tokens: usize,
    pub seed: u64,
}

pub fn shared_prefix(spec: &SharedPrefix) -> Vec<TraceRequest> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let block = spec.block_tokens.max(1);
    let prefix_blocks = spec.prefix_tokens.div_ceil(block);
    let input = spec.prefix_tokens + spec.suffix_tokens;
    let total_blocks = input.div_ceil(block);
    let mut order: Vec<usize> = (0..spec.prefixes).flat_map(|p| std::iter::repeat_n(p, spec.uses)).collect();
    order.shuffle(&mut rng);
    let mut next_id = (spec.prefixes * prefix_blocks) as u64;
    order
        .into_iter()
        .map(|prefix| {
            let mut hash_ids: Vec<u64> = (0..prefix_blocks).map(|b| (prefix * prefix_blocks + b) as u64).collect();
            // A prefix that ends inside a block shares only its whole blocks; the rest is this use's own.
            if !spec.prefix_tokens.is_multiple_of(block) {
                hash_ids.pop();
            }
            while hash_ids.len() < total_blocks {
                hash_ids.push(next_id);
                next_id += 1;
            }
            TraceRequest {
                timestamp: 0,
                input_length: input as u64,
                output_length: spec.output_tokens.max(1) as u64,
                hash_ids,
            }
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conversations {
    pub sessions: usize,
    /// New sessions per second outside bursts.
    pub rate: f64,
    /// How many times the rate is during a burst.
    pub burst: f64,
    pub mean_turns: f64,
    pub system_prompts: usize,
    pub system_tokens: usize,
    pub mean_user_tokens: f64,
    pub mean_output_tokens: f64,
    pub mean_think_s: f64,
    /// Tokens per second an answer is assumed to stream at, to place the next turn after it.
    pub answer_tokens_per_s: f64,
    /// Longest prompt: a conversation that would pass it ends.
    pub max_context: usize,
    pub block_tokens: usize,
    pub seed: u64,
}

pub fn conversations(spec: &Conversations) -> Vec<TraceRequest> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let block = spec.block_tokens.max(1);
    let system_blocks = spec.system_tokens.div_ceil(block);
    let mut next_id = (spec.system_prompts.max(1) * system_blocks) as u64;
    let mut requests = Vec::new();
    let (mut now_s, mut burst_until_s) = (0.0_f64, 0.0_f64);
    for _ in 0..spec.sessions {
        // Bursts start at random, about one new session in twenty, and last a few seconds.
        if now_s >= burst_until_s && rng.random::<f64>() < 0.05 {
            burst_until_s = now_s + 2.0 + 6.0 * rng.random::<f64>();
        }
        let rate = if now_s < burst_until_s { spec.rate * spec.burst.max(1.0) } else { spec.rate };
        now_s += exponential(&mut rng, 1.0 / rate.max(1e-6));
        let system = rng.random_range(0..spec.system_prompts.max(1));
        let mut blocks: Vec<u64> = (0..system_blocks).map(|b| (system * system_blocks + b) as u64).collect();
        let mut context = spec.system_tokens;
        let mut at_s = now_s;
        // Geometric number of turns with the given mean, at least one.
        let turns = 1 + geometric(&mut rng, 1.0 / spec.mean_turns.max(1.0));
        for _ in 0..turns {
            let user = log_normal(&mut rng, spec.mean_user_tokens).max(1.0) as usize;
            let output = log_normal(&mut rng, spec.mean_output_tokens).max(1.0) as usize;
            let input = context + user;
            if input > spec.max_context {
                break;
            }
            // Whole blocks of the conversation so far are shared with the previous turn; the rest is new.
            blocks.truncate(context / block);
            while blocks.len() < input.div_ceil(block) {
                blocks.push(next_id);
                next_id += 1;
            }
            requests.push(TraceRequest {
                timestamp: (at_s * 1000.0) as u64,
                input_length: input as u64,
                output_length: output as u64,
                hash_ids: blocks.clone(),
            });
            context = input + output;
            at_s += output as f64 / spec.answer_tokens_per_s.max(1e-3) + exponential(&mut rng, spec.mean_think_s);
        }
    }
    requests.sort_by_key(|r| r.timestamp);
    requests
}

/// One line of JSON per request, as Mooncake traces are written.
pub fn to_jsonl(requests: &[TraceRequest]) -> String {
    requests
        .iter()
        .map(|r| {
            serde_json::json!({
                "timestamp": r.timestamp,
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": r.hash_ids,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

fn geometric(rng: &mut StdRng, p: f64) -> usize {
    let mut failures = 0;
    while rng.random::<f64>() >= p.clamp(1e-6, 1.0) && failures < 1000 {
        failures += 1;
    }
    failures
}

/// Log-normal with this mean and a spread (σ = 0.8) like chat turns'.
fn log_normal(rng: &mut StdRng, mean: f64) -> f64 {
    const SIGMA: f64 = 0.8;
    let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    (mean.max(1.0).ln() - SIGMA * SIGMA / 2.0 + SIGMA * normal).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bench::route::ideal_cached_fraction;

    #[test]
    fn shared_prefix_uses_each_prefix_as_often_as_asked_and_reaches_its_ideal() {
        let spec = SharedPrefix {
            prefixes: 50,
            uses: 4,
            prefix_tokens: 2000,
            suffix_tokens: 64,
            output_tokens: 16,
            block_tokens: 16,
            seed: 7,
        };
        let trace = shared_prefix(&spec);
        assert_eq!(trace.len(), 200);
        assert!(trace.iter().all(|r| r.input_length == 2064 && r.hash_ids.len() == 129));
        let first_blocks: std::collections::HashSet<u64> = trace.iter().map(|r| r.hash_ids[0]).collect();
        assert_eq!(first_blocks.len(), 50);
        // Three uses in four hit 2,000 of 2,064 tokens.
        let ideal = ideal_cached_fraction(&trace, 16, 16);
        assert!((ideal - 0.75 * 2000.0 / 2064.0).abs() < 1e-9, "{ideal}");
        assert_eq!(trace, shared_prefix(&spec), "the same seed gives the same trace");
    }

    #[test]
    fn a_conversations_turns_extend_its_previous_prompt() {
        let spec = Conversations {
            sessions: 30,
            rate: 1.0,
            burst: 5.0,
            mean_turns: 4.0,
            system_prompts: 2,
            system_tokens: 300,
            mean_user_tokens: 100.0,
            mean_output_tokens: 200.0,
            mean_think_s: 5.0,
            answer_tokens_per_s: 50.0,
            max_context: 8192,
            block_tokens: 16,
            seed: 1,
        };
        let trace = conversations(&spec);
        assert!(trace.len() > 30, "several turns per session: {}", trace.len());
        assert!(trace.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        assert!(trace.iter().all(|r| r.hash_ids.len() == (r.input_length as usize).div_ceil(16)));
        assert!(trace.iter().all(|r| r.input_length <= 8192));
        // Every prompt starts with one of the two system prompts' blocks.
        let starts: std::collections::HashSet<u64> = trace.iter().map(|r| r.hash_ids[0]).collect();
        assert!(starts.len() <= 2, "{starts:?}");
        // Later turns share more than the system prompt with an earlier request.
        let ideal = ideal_cached_fraction(&trace, 16, 16);
        let system_only = 300.0 / (trace.iter().map(|r| r.input_length).sum::<u64>() as f64 / trace.len() as f64);
        assert!(ideal > system_only, "{ideal} vs {system_only}");
    }
}
