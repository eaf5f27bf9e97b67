//! Turning one row of logits into a token: penalties, then greedy or temperature / top-k / top-p / min-p
//! sampling from a per-request generator (seeded, so a request with a seed is reproducible). Logprobs are of
//! the model's raw distribution, before any of that (vLLM's default).
use super::cpu::math::lanes;
use crate::core::engine::scheduler::Sampled;
use crate::core::protocol::{PreprocessedRequest, SamplingOptions, TokenLogprob};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

pub struct SeqSampler {
    options: SamplingOptions,
    rng: StdRng,
    prompt_len: usize,
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
        Self { options, rng, prompt_len }
    }

    /// Picks the token that follows `tokens` (prompt and everything generated so far).
    pub fn sample(&mut self, logits: &[f32], tokens: &[u32], logprobs: Option<u32>) -> Sampled {
        let raw_logprob = logprobs.map(|top| log_softmax_top(logits, top));
        let o = &self.options;
        let penalised = self.penalised(logits, tokens);
        let logits = penalised.as_deref().unwrap_or(logits);
        let token = if !draws(o) {
            argmax(logits)
        } else {
            let candidates = filter(logits, o.temperature, o.top_k, o.top_p, o.min_p);
            let total: f32 = candidates.iter().map(|(_, p)| p).sum();
            let mut draw = self.rng.random::<f32>() * total;
            let mut chosen = candidates.first().map_or(0, |(t, _)| *t);
            for &(t, p) in &candidates {
                chosen = t;
                if draw < p {
                    break;
                }
                draw -= p;
            }
            chosen
        };
        let logprob = raw_logprob.map(|(all, top)| TokenLogprob { token_id: token, logprob: all[token as usize], top });
        Sampled { token, logprob }
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

/// Probabilities (unnormalised) of the tokens that survive top-k, top-p and min-p, most likely first.
fn filter(logits: &[f32], temperature: f32, top_k: Option<u32>, top_p: f32, min_p: f32) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(t, &l)| (t as u32, ((l - max) / temperature).exp())).collect();
    probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = top_k.filter(|&k| k > 0) {
        probs.truncate(k as usize);
    }
    let total: f32 = probs.iter().map(|(_, p)| p).sum();
    if min_p > 0.0 {
        let floor = probs[0].1 * min_p;
        probs.retain(|(_, p)| *p >= floor);
    }
    if top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|(_, p)| {
                cumulative += p / total;
                cumulative >= top_p
            })
            .map_or(probs.len(), |at| at + 1);
        probs.truncate(keep.max(1));
    }
    probs
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
        let out = s.sample(&[0.0, 3.0, 1.0], &[0], Some(2));
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
            (0..20).map(|_| s.sample(&logits, &[], None).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut k1 = sampler(SamplingOptions { top_k: Some(1), ..sampled(1.0) }, 3);
        assert_eq!(k1.sample(&logits, &[], None).token, argmax(&logits));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities ∝ 8, 4, 2, 1, …: top_p 0.5 keeps only the first; min_p 0.3 keeps the first two.
        let logits: Vec<f32> = (0..6).map(|i| -(i as f32) * std::f32::consts::LN_2).collect();
        assert_eq!(filter(&logits, 1.0, None, 0.5, 0.0).len(), 1);
        assert_eq!(filter(&logits, 1.0, None, 1.0, 0.3).len(), 2);
        assert_eq!(filter(&logits, 1.0, Some(3), 1.0, 0.0).len(), 3);
    }

    #[test]
    fn penalties_push_down_repeated_tokens() {
        let options = SamplingOptions { repetition_penalty: 2.0, ..sampled(0.0) };
        let mut s = sampler(options, 0);
        // Token 0 leads but appeared before: 2.0 / 2 = 1.0 < 1.5.
        assert_eq!(s.sample(&[2.0, 1.5], &[0], None).token, 1);
        let options = SamplingOptions { frequency_penalty: 1.0, ..sampled(0.0) };
        let mut s = sampler(options, 0);
        // The prompt (2 tokens) does not count; token 0 generated twice: 2.0 - 2 = 0 < 1.5.
        assert_eq!(s.sample(&[2.0, 1.5], &[1, 1, 0, 0], None).token, 1);
    }
}
