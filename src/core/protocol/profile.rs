//! A worker's performance profile as it travels: measured by `dynamo profile` (or derived from the mocker's
//! timing fit), read by the planner's replica maths and by a `latency` router, which asks each worker for its
//! own (`ToWorker::Profile`). The maths over it lives in `engine::profile`.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// What it describes (engine, model, device), for people.
    pub source: String,
    /// KV tokens a worker holds: a decode batch's sequences must fit in it together.
    pub kv_tokens: u64,
    /// Most sequences in a worker's batch.
    pub max_batch: u32,
    /// Most prompt tokens one engine step computes (chunked prefill): a queue of prompts is worked through
    /// this many tokens a step, each step also advancing every decoding sequence by one token. Profiles
    /// written before it was recorded read as vLLM's default.
    #[serde(default = "default_step_tokens")]
    pub step_tokens: u32,
    /// By prompt length, ascending.
    pub prefill: Vec<PrefillPoint>,
    /// By context, then batch, ascending.
    pub decode: Vec<DecodePoint>,
}

fn default_step_tokens() -> u32 {
    8192
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillPoint {
    pub prompt_tokens: u32,
    pub ttft_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodePoint {
    pub context_tokens: u32,
    pub batch: u32,
    pub itl_ms: f64,
}

/// A profile is a few hundred points; one from a peer past this many is refused.
pub const MAX_PROFILE_POINTS: usize = 4096;

impl Profile {
    /// What must hold for the maths to mean anything (a profile from a file or a peer is checked before use).
    pub fn check(&self) -> Result<(), String> {
        if self.prefill.is_empty() || self.decode.is_empty() {
            return Err("it needs at least one prefill and one decode point".into());
        }
        if self.prefill.len() + self.decode.len() > MAX_PROFILE_POINTS {
            return Err(format!("it has more than {MAX_PROFILE_POINTS} points"));
        }
        if self.kv_tokens == 0 || self.max_batch == 0 || self.step_tokens == 0 {
            return Err("kv_tokens, max_batch and step_tokens must be above 0".into());
        }
        let positive = |ms: f64| ms.is_finite() && ms > 0.0;
        if !self.prefill.iter().all(|p| p.prompt_tokens > 0 && positive(p.ttft_ms)) {
            return Err("every prefill point needs prompt_tokens and ttft_ms above 0".into());
        }
        if !self.decode.iter().all(|p| p.context_tokens > 0 && p.batch > 0 && positive(p.itl_ms)) {
            return Err("every decode point needs context_tokens, batch and itl_ms above 0".into());
        }
        if !self.prefill.windows(2).all(|w| w[0].prompt_tokens < w[1].prompt_tokens) {
            return Err("prefill points must be by prompt_tokens, ascending, each once".into());
        }
        let key = |p: &DecodePoint| (p.context_tokens, p.batch);
        if !self.decode.windows(2).all(|w| key(&w[0]) < key(&w[1])) {
            return Err("decode points must be by context_tokens then batch, ascending, each once".into());
        }
        Ok(())
    }
}
