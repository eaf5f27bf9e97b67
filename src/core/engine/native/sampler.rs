//! Turning one row of logits into a token: penalties, then greedy or temperature / top-k / top-p / min-p
//! sampling from a per-request generator (seeded, so a request with a seed is reproducible). Logprobs are of
//! the model's raw distribution, before any of that (vLLM's default).
use super::cpu::math::{exp_nonpositive, lanes};
use crate::core::engine::scheduler::Sampled;
use crate::core::grammar::Guide;
use crate::core::protocol::{PreprocessedRequest, SamplingOptions, TokenLogprob};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

pub struct SeqSampler {
    options: SamplingOptions,
    rng: StdRng,
    prompt_len: usize,
    /// Kept between steps so a sampled sequence allocates its vocabulary-sized rows once.
    scratch: Scratch,
}

#[derive(Default)]
struct Scratch {
    weights: Vec<f32>,
    candidates: Vec<(u32, f32)>,
    /// The logits with what a structured output's constraint rules out at minus infinity.
    masked: Vec<f32>,
}

impl SeqSampler {
    /// A continuation (`request.generated` > 0) draws past the tokens its earlier parts sampled, one draw
    /// each, so a seeded request samples what it would have sampled without moving.
    pub fn new(request: &PreprocessedRequest, seed: u64) -> Self {
        let options = request.sampling.clone();
        let mut rng = StdRng::seed_from_u64(seed);
        // `check_fits` bounds `generated` by the prompt, so this is at most a context's worth of draws.
        if draws(&options) {
            for _ in 0..request.generated {
                let _: f32 = rng.random();
            }
        }
        let prompt_len = request.token_ids.len().saturating_sub(request.generated as usize);
        Self { options, rng, prompt_len, scratch: Scratch::default() }
    }

    /// Picks the token that follows `tokens` (prompt and everything generated so far), among those `guide`
    /// allows when the request constrains its output.
    pub fn sample(
        &mut self,
        logits: &[f32],
        tokens: &[u32],
        logprobs: Option<u32>,
        guide: Option<&mut Guide>,
    ) -> Sampled {
        let raw_logprob = logprobs.map(|top| log_softmax_top(logits, top));
        let penalised = self.penalised(logits, tokens);
        let mut masked = std::mem::take(&mut self.scratch.masked);
        let logits = match guide {
            Some(guide) => {
                masked.clear();
                masked.extend_from_slice(penalised.as_deref().unwrap_or(logits));
                guide.mask_logits(&mut masked);
                &masked
            }
            None => penalised.as_deref().unwrap_or(logits),
        };
        let o = &self.options;
        let token = if draws(o) {
            let uniform: f32 = self.rng.random();
            draw(logits, o, uniform, &mut self.scratch)
        } else {
            argmax(logits)
        };
        self.scratch.masked = masked;
        let logprob = raw_logprob.map(|(all, top)| TokenLogprob { token_id: token, logprob: all[token as usize], top });
        Sampled { token, logprob, hidden: None }
    }

    /// The logits after the request's penalties, or `None` when it sets none: most requests, whose row is then
    /// read in place (copying a 49k vocabulary's row per sequence per step showed in batch decode profiles).
    fn penalised(&self, logits: &[f32], tokens: &[u32]) -> Option<Vec<f32>> {
        let o = &self.options;
        let repetition = o.repetition_penalty != 1.0 && o.repetition_penalty > 0.0;
        let counted = o.frequency_penalty != 0.0 || o.presence_penalty != 0.0;
        if !repetition && !counted {
            return None;
        }
        let mut logits = logits.to_vec();
        if repetition {
            let mut seen = vec![false; logits.len()];
            for &t in tokens {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (logit, _) in logits.iter_mut().zip(seen).filter(|(_, s)| *s) {
                *logit = if *logit > 0.0 { *logit / o.repetition_penalty } else { *logit * o.repetition_penalty };
            }
        }
        if counted {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in &tokens[self.prompt_len.min(tokens.len())..] {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(logit) = logits.get_mut(t as usize) {
                    *logit -= o.frequency_penalty * n as f32 + o.presence_penalty;
                }
            }
        }
        Some(logits)
    }
}

/// Whether a token is drawn at random (one draw of the generator each) rather than taken greedily.
fn draws(options: &SamplingOptions) -> bool {
    options.temperature > 0.0 && options.top_k != Some(1)
}

/// The first position of the largest logit (NaNs never win). Two passes, the maximum in eight lanes and then
/// its first position, both of which vectorise; a running (index, value) comparison did not.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = lanes(logits, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// The token that `uniform` (in [0, 1)) picks from the distribution the options leave: softmax at
/// `temperature`, then min-p, top-k and top-p, each over what the one before left (vLLM's order). One uniform
/// per token, so a continuation replays its earlier draws by count. Nothing is sorted unless top-p needs it, and
/// then only the part of the candidates the nucleus's edge falls in: sorting a 49k vocabulary for every
/// sequence at every step was most of a sampled step.
fn draw(logits: &[f32], o: &SamplingOptions, uniform: f32, scratch: &mut Scratch) -> u32 {
    let max = lanes(logits, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    let inverse_temperature = 1.0 / o.temperature;
    let weights = &mut scratch.weights;
    weights.clear();
    // Relative to the most likely token, whose weight is 1; NaNs and what underflows weigh nothing.
    weights.extend(logits.iter().map(|&l| {
        let x = (l - max) * inverse_temperature;
        if x >= -87.0 { exp_nonpositive(x) } else { 0.0 }
    }));
    let top_k = o.top_k.filter(|&k| k > 0).map_or(usize::MAX, |k| k as usize);
    if o.min_p <= 0.0 && top_k >= weights.len() && o.top_p >= 1.0 {
        return pick_unfiltered(weights, uniform).unwrap_or_else(|| argmax(logits));
    }
    let candidates = &mut scratch.candidates;
    candidates.clear();
    let floor = o.min_p.max(0.0);
    let survives = |w: f32| w > 0.0 && w >= floor;
    candidates.extend(weights.iter().enumerate().filter(|(_, w)| survives(**w)).map(|(t, &w)| (t as u32, w)));
    if candidates.is_empty() {
        return argmax(logits);
    }
    if top_k < candidates.len() {
        candidates.select_nth_unstable_by(top_k - 1, most_likely_first);
        candidates.truncate(top_k);
    }
    if o.top_p < 1.0 {
        let total: f32 = candidates.iter().map(|(_, w)| w).sum();
        let kept = nucleus(candidates, o.top_p * total);
        candidates.truncate(kept.max(1));
    }
    let total: f32 = candidates.iter().map(|(_, w)| w).sum();
    let mut target = uniform * total;
    for &(token, weight) in candidates.iter() {
        if target < weight {
            return token;
        }
        target -= weight;
    }
    // Only rounding gets here (the running difference fell short of the last weight).
    candidates.last().map_or_else(|| argmax(logits), |(token, _)| *token)
}

/// The inverse-CDF pick over every token's weight, in vocabulary order, skipping whole blocks by their sums
/// (summed in lanes, so the skip runs at vector speed and only the block the draw lands in is walked).
fn pick_unfiltered(weights: &[f32], uniform: f32) -> Option<u32> {
    const BLOCK: usize = 256;
    let sums: Vec<f32> = weights.chunks(BLOCK).map(|block| lanes(block, 0.0, |a, b| a + b)).collect();
    let mut target = uniform * sums.iter().sum::<f32>();
    let mut last = None;
    for (b, (block, &sum)) in weights.chunks(BLOCK).zip(&sums).enumerate() {
        if sum <= 0.0 {
            continue;
        }
        if target < sum {
            for (i, &weight) in block.iter().enumerate() {
                if weight > 0.0 {
                    last = Some((b * BLOCK + i) as u32);
                    if target < weight {
                        return last;
                    }
                    target -= weight;
                }
            }
            // The block's lane sum and this running difference disagree in the last bits: its last token.
            return last;
        }
        target -= sum;
        last = block.iter().rposition(|&w| w > 0.0).map(|i| (b * BLOCK + i) as u32);
    }
    last
}

fn most_likely_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1)
}

/// Rearranges `candidates` so that the first `n` are the `n` most likely and the fewest whose weights reach
/// `mass`, and returns `n` (all of them when rounding leaves the mass short). Halving selections instead of a
/// sort: each round keeps only the half the edge falls in, so the work is linear, not n log n.
fn nucleus(candidates: &mut [(u32, f32)], mass: f32) -> usize {
    let (mut lo, mut hi, mut needed) = (0, candidates.len(), mass);
    while hi - lo > 64 {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable_by(mid - lo, most_likely_first);
        let upper: f32 = candidates[lo..=mid].iter().map(|(_, w)| w).sum();
        if upper >= needed {
            hi = mid + 1;
        } else {
            needed -= upper;
            lo = mid + 1;
        }
    }
    candidates[lo..hi].sort_unstable_by(most_likely_first);
    let mut reached = 0.0;
    for (i, (_, weight)) in candidates[lo..hi].iter().enumerate() {
        reached += weight;
        if reached >= needed {
            return lo + i + 1;
        }
    }
    hi
}
/// Every token's log-probability and the `top` most likely.
fn log_softmax_top(logits: &[f32], top: u32) -> (Vec<f32>, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    let all: Vec<f32> = logits.iter().map(|l| l - log_total).collect();
    let mut ranked: Vec<(u32, f32)> = all.iter().enumerate().map(|(t, &l)| (t as u32, l)).collect();
    let top = (top as usize).min(ranked.len());
    if top > 0 {
        ranked.select_nth_unstable_by(top - 1, |a, b| b.1.total_cmp(&a.1));
    }
    ranked.truncate(top);
    ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    (all, ranked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(options: SamplingOptions, seed: u64) -> SeqSampler {
        let mut request = PreprocessedRequest::greedy("t", vec![1, 2], 4);
        request.sampling = options;
        SeqSampler::new(&request, seed)
    }

    fn sampled(temperature: f32) -> SamplingOptions {
        SamplingOptions { temperature, ..SamplingOptions::default() }
    }

    #[test]
    fn greedy_takes_the_largest_logit_and_reports_raw_logprobs() {
        let mut s = sampler(sampled(0.0), 0);
        let out = s.sample(&[0.0, 3.0, 1.0], &[0], Some(2), None);
        assert_eq!(out.token, 1);
        let lp = out.logprob.unwrap();
        let expected = 3.0 - (1.0f32 + 3.0f32.exp() + 1.0f32.exp()).ln();
        assert!((lp.logprob - expected).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima_wherever_they_fall() {
        // Rows longer and shorter than the eight lanes, with the maximum in the lanes, in the tail, repeated
        // (the first one counts), next to NaNs, and nothing but negative infinity.
        for len in [1, 7, 8, 9, 23, 64, 49_157] {
            for at in [0, len / 2, len - 1] {
                let mut logits: Vec<f32> = (0..len).map(|i| ((i * 37) % 101) as f32 / 101.0 - 1.0).collect();
                logits[at] = 3.0;
                if at + 3 < len {
                    logits[at + 3] = 3.0;
                }
                if at > 0 {
                    logits[at - 1] = f32::NAN;
                }
                assert_eq!(argmax(&logits), at as u32, "length {len}, maximum at {at}");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 11]), 0);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_top_k_1_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = sampler(sampled(1.0), seed);
            (0..20).map(|_| s.sample(&logits, &[], None, None).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut k1 = sampler(SamplingOptions { top_k: Some(1), ..sampled(1.0) }, 3);
        assert_eq!(k1.sample(&logits, &[], None, None).token, argmax(&logits));
    }

    /// The distribution the options define, computed the plain way (sort everything, cut, normalise): what
    /// `draw` must reproduce without sorting.
    fn reference(logits: &[f32], o: &SamplingOptions) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut ranked: Vec<(usize, f64)> =
            logits.iter().enumerate().map(|(t, &l)| (t, (((l - max) / o.temperature) as f64).exp())).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked.retain(|(_, w)| *w > 0.0 && *w >= f64::from(o.min_p));
        if let Some(k) = o.top_k.filter(|&k| k > 0) {
            ranked.truncate(k as usize);
        }
        if o.top_p < 1.0 {
            let total: f64 = ranked.iter().map(|(_, w)| w).sum();
            let mut reached = 0.0;
            let keep = ranked
                .iter()
                .position(|(_, w)| {
                    reached += w / total;
                    reached >= f64::from(o.top_p)
                })
                .map_or(ranked.len(), |at| at + 1);
            ranked.truncate(keep);
        }
        let total: f64 = ranked.iter().map(|(_, w)| w).sum();
        let mut p = vec![0.0; logits.len()];
        for (t, w) in ranked {
            p[t] = w / total;
        }
        p
    }

    /// Each token's share of `n` evenly spaced uniforms: an inverse-CDF draw gives every token its probability
    /// to within 1/n, so this is the distribution itself, with no sampling noise for a test to tolerate.
    fn drawn(logits: &[f32], o: &SamplingOptions, n: usize) -> Vec<f64> {
        let mut scratch = Scratch::default();
        let mut counts = vec![0usize; logits.len()];
        for i in 0..n {
            counts[draw(logits, o, (i as f32 + 0.5) / n as f32, &mut scratch) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn draws_follow_the_distribution_each_filter_leaves() {
        let n = 10_000;
        // A peaked row (the filters cut hard) and a flat 1,200-token one without ties (the nucleus's halving
        // runs, and the unfiltered path crosses blocks).
        let peaked: Vec<f32> = (0..40).map(|i| -(i as f32) * 0.35 + (i as f32 * 1.7).sin()).collect();
        let flat: Vec<f32> = (0..1_200).map(|i| ((i * 7919) % 1_200) as f32 / 500.0).collect();
        let cases = [
            sampled(1.0),
            sampled(0.6),
            SamplingOptions { top_k: Some(5), ..sampled(1.0) },
            SamplingOptions { top_p: 0.8, ..sampled(1.0) },
            SamplingOptions { min_p: 0.2, ..sampled(1.0) },
            SamplingOptions { top_k: Some(30), top_p: 0.9, min_p: 0.05, ..sampled(0.8) },
        ];
        for logits in [&peaked, &flat] {
            for o in &cases {
                let want = reference(logits, o);
                let got = drawn(logits, o, n);
                let worst = want.iter().zip(&got).map(|(w, g)| (w - g).abs()).fold(0.0, f64::max);
                let support = |p: &[f64]| p.iter().filter(|&&x| x > 0.0).count();
                assert!(worst < 3.0 / n as f64 + 1e-4, "{o:?} on {} tokens: off by {worst}", logits.len());
                assert!(support(&got) <= support(&want), "{o:?} drew a token the filters cut");
            }
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities ∝ 8, 4, 2, 1, …: top_p 0.5 keeps only the first; min_p 0.3 the first two; top_k 3 three.
        let logits: Vec<f32> = (0..6).map(|i| -(i as f32) * std::f32::consts::LN_2).collect();
        let support = |o: SamplingOptions| drawn(&logits, &o, 1000).iter().filter(|&&p| p > 0.0).count();
        assert_eq!(support(SamplingOptions { top_p: 0.5, ..sampled(1.0) }), 1);
        assert_eq!(support(SamplingOptions { min_p: 0.3, ..sampled(1.0) }), 2);
        assert_eq!(support(SamplingOptions { top_k: Some(3), ..sampled(1.0) }), 3);
        assert_eq!(support(sampled(1.0)), 6);
    }

    #[test]
    fn masked_and_nan_logits_are_never_drawn() {
        let logits = [f32::NEG_INFINITY, 0.5, f32::NAN, -200.0, 0.0, f32::NEG_INFINITY];
        for o in [sampled(1.0), SamplingOptions { top_p: 0.99, ..sampled(2.0) }] {
            let got = drawn(&logits, &o, 5000);
            assert!(got[0] == 0.0 && got[2] == 0.0 && got[5] == 0.0, "{got:?}");
            assert!(got[1] > got[4] && got[4] > 0.3, "{got:?}");
        }
        // The last uniform below 1 lands on the last token that has weight, not past it.
        assert_eq!(draw(&logits, &sampled(1.0), 0.999_999_9, &mut Scratch::default()), 4);
    }

    #[test]
    fn penalties_push_down_repeated_tokens() {
        let options = SamplingOptions { repetition_penalty: 2.0, ..sampled(0.0) };
        let mut s = sampler(options, 0);
        // Token 0 leads but appeared before: 2.0 / 2 = 1.0 < 1.5.
        assert_eq!(s.sample(&[2.0, 1.5], &[0], None, None).token, 1);
        let options = SamplingOptions { frequency_penalty: 1.0, ..sampled(0.0) };
        let mut s = sampler(options, 0);
        // The prompt (2 tokens) does not count; token 0 generated twice: 2.0 - 2 = 0 < 1.5.
        assert_eq!(s.sample(&[2.0, 1.5], &[1, 1, 0, 0], None, None).token, 1);
    }
}
