//! The KV-aware choice, free of I/O: cost per worker and the pick among them.
//!
//! cost = overlap_weight × (prompt blocks the worker lacks + its active prefill blocks) + its active decode
//! blocks. Prefill work is what a cache hit saves, decode blocks are the memory and step time a worker is
//! already committed to. With temperature 0 the lowest cost wins (ties: fewest requests in flight, then a
//! rotating start so equal workers share the load); above 0 a softmax over costs normalised to [0, 1] is
//! sampled, trading some hits for spread.

/// What the router knows about one worker when choosing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub overlap_blocks: u32,
    pub prefill_blocks: u64,
    pub decode_blocks: u64,
    pub in_flight: usize,
}

pub fn cost(candidate: &Candidate, prompt_blocks: u32, overlap_weight: f64) -> f64 {
    let uncached = prompt_blocks.saturating_sub(candidate.overlap_blocks) as f64;
    overlap_weight * (uncached + candidate.prefill_blocks as f64) + candidate.decode_blocks as f64
}

/// The index of the chosen candidate; `draw` in [0, 1) drives the sampling when `temperature` > 0.
pub fn choose(
    candidates: &[Candidate],
    prompt_blocks: u32,
    overlap_weight: f64,
    temperature: f64,
    draw: f64,
    tie_start: usize,
) -> Option<usize> {
    let costs: Vec<f64> = candidates.iter().map(|c| cost(c, prompt_blocks, overlap_weight)).collect();
    let in_flight: Vec<usize> = candidates.iter().map(|c| c.in_flight).collect();
    cheapest(&costs, &in_flight, temperature, draw, tie_start)
}

/// The index of the cheapest of `costs` (any unit, lower is better), as `choose` picks: ties to the fewest
/// `in_flight`, then from `tie_start` on; with `temperature` above 0 a softmax over the costs normalised to
/// [0, 1], sampled by `draw`.
pub fn cheapest(costs: &[f64], in_flight: &[usize], temperature: f64, draw: f64, tie_start: usize) -> Option<usize> {
    let n = costs.len();
    if n == 0 {
        return None;
    }
    if temperature > 0.0 {
        let max = costs.iter().copied().fold(0.0, f64::max);
        let scale = if max > 0.0 { max } else { 1.0 };
        let weights: Vec<f64> = costs.iter().map(|c| (-(c / scale) / temperature).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut target = draw * total;
        for (i, w) in weights.iter().enumerate() {
            if target < *w {
                return Some(i);
            }
            target -= w;
        }
        return Some(n - 1);
    }
    (0..n)
        .map(|i| (tie_start + i) % n)
        .min_by(|&a, &b| costs[a].total_cmp(&costs[b]).then(in_flight[a].cmp(&in_flight[b])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(overlap_blocks: u32) -> Candidate {
        Candidate { overlap_blocks, prefill_blocks: 0, decode_blocks: 0, in_flight: 0 }
    }

    #[test]
    fn the_longest_cached_prefix_wins_when_loads_are_equal() {
        assert_eq!(choose(&[idle(1), idle(6), idle(3)], 8, 1.0, 0.0, 0.0, 0), Some(1));
    }

    #[test]
    fn load_outweighs_a_small_hit() {
        let busy = Candidate { overlap_blocks: 2, prefill_blocks: 0, decode_blocks: 50, in_flight: 5 };
        assert_eq!(choose(&[busy, idle(0)], 8, 1.0, 0.0, 0.0, 0), Some(1));
        // A heavier overlap weight makes the hit matter more than the decode load.
        assert_eq!(choose(&[busy, idle(0)], 8, 100.0, 0.0, 0.0, 0), Some(0));
    }

    #[test]
    fn ties_go_to_fewer_in_flight_then_rotate() {
        let mut a = idle(0);
        a.in_flight = 2;
        assert_eq!(choose(&[a, idle(0)], 4, 1.0, 0.0, 0.0, 0), Some(1));
        let picks: Vec<_> = (0..3).map(|start| choose(&[idle(0); 3], 4, 1.0, 0.0, 0.0, start)).collect();
        assert_eq!(picks, vec![Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn temperature_samples_cheaper_workers_more_often() {
        let candidates = [idle(0), idle(8)];
        let picks: Vec<usize> =
            (0..1000).map(|i| choose(&candidates, 8, 1.0, 0.5, (i as f64 + 0.5) / 1000.0, 0).unwrap_or(9)).collect();
        let cheap = picks.iter().filter(|&&p| p == 1).count();
        // Costs 8 and 0, normalised 1 and 0: weights e^-2 and 1, so the cheap one gets 1/(1+e^-2) ≈ 88 %.
        assert!((850..=910).contains(&cheap), "{cheap}");
    }
}
