//! The latency cost: a worker's predicted time to first token for a prompt, in milliseconds, from the
//! worker's performance profile and what is ahead of the prompt there.
//!
//! The engines schedule as vLLM does: prompts are computed first come, first served, at most `step_tokens`
//! prompt tokens a step (chunked prefill), and every step also advances each decoding sequence by one token.
//! So a prompt whose uncached part is `new` tokens, queued behind `queued` prompt tokens not yet computed,
//! has its first token once `queued + new` tokens are computed: the profile's prefill time of one prompt that
//! long (measured alone, in the same chunks), plus one decode step of the worker's batch for each of those
//! chunks and half a step for the one under way when the prompt arrives. A cache hit is worth the prefill time it saves; a queue costs the time it takes, so a worker that
//! holds a prefix but is busy loses to an idle one exactly when waiting there would be slower.
//!
//! Not modelled: a full batch (`max_batch` sequences running) or a full cache, where a prompt waits for a
//! sequence to finish; a router that sees other routers' requests only through the workers' reports.
use crate::core::protocol::profile::Profile;

/// What is ahead of a new prompt on one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Prompt tokens sent to it whose first token has not come (their cached parts left out).
    pub queued_prefill_tokens: u64,
    /// Sequences it is decoding, and the KV tokens they hold between them.
    pub decoding: u64,
    pub decode_kv_tokens: u64,
}

/// The time to first token of a prompt of `new_tokens` uncached tokens on a worker of `profile` with
/// `backlog` ahead of it.
pub fn predicted_ttft_ms(profile: &Profile, backlog: &Backlog, new_tokens: u64) -> f64 {
    // A prompt cached whole still computes its last token to sample the first output.
    let tokens = backlog.queued_prefill_tokens.saturating_add(new_tokens.max(1));
    let prefill = profile.prefill_ms(tokens as f64);
    let decode = match backlog.decoding {
        0 => 0.0,
        decoding => {
            let steps = tokens.div_ceil(u64::from(profile.step_tokens.max(1)));
            let context = backlog.decode_kv_tokens as f64 / decoding as f64;
            // A worker that is decoding is always mid-step when the prompt arrives: on average half a step
            // passes before the next one can take it.
            (steps as f64 + 0.5) * profile.itl_ms(context.max(1.0), decoding as f64)
        }
    };
    prefill + decode
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::mocker::{MockerConfig, timing};

    fn mocker() -> Profile {
        Profile::mocker(&MockerConfig::default())
    }

    #[test]
    fn an_idle_worker_takes_the_prefill_of_what_it_lacks() {
        let profile = mocker();
        let idle = Backlog::default();
        assert!((predicted_ttft_ms(&profile, &idle, 1024) - timing::prefill_ms(1024)).abs() < 1e-9);
        // Fully cached: one token's step.
        assert!((predicted_ttft_ms(&profile, &idle, 0) - profile.prefill_ms(1.0)).abs() < 1e-9);
    }

    #[test]
    fn a_queue_and_a_decode_batch_add_their_time() {
        let profile = mocker();
        let alone = predicted_ttft_ms(&profile, &Backlog::default(), 2000);
        let queued = Backlog { queued_prefill_tokens: 4000, ..Backlog::default() };
        let behind = predicted_ttft_ms(&profile, &queued, 2000);
        assert!((behind - profile.prefill_ms(6000.0)).abs() < 1e-9, "{behind}");
        let decoding = Backlog { decoding: 32, decode_kv_tokens: 32 * 2048, ..Backlog::default() };
        let capacity = 16_384 * 16;
        let with_batch = predicted_ttft_ms(&profile, &decoding, 2000);
        let step = timing::decode_ms(32 * 2048, capacity);
        assert!((with_batch - alone - 1.5 * step).abs() < 0.05, "{with_batch}");
        // Two chunks of 8,192 tokens: two decode steps, and the half under way.
        let long = predicted_ttft_ms(&profile, &decoding, 9000) - profile.prefill_ms(9000.0);
        assert!((long - 2.5 * step).abs() < 0.1, "{long}");
    }

    #[test]
    fn a_long_cached_prefix_beats_a_short_queue_but_not_a_long_one() {
        let profile = mocker();
        // 2,064-token prompts; one worker holds 2,000 of them.
        let holder = |queued| Backlog { queued_prefill_tokens: queued, ..Backlog::default() };
        let idle_miss = predicted_ttft_ms(&profile, &Backlog::default(), 2064);
        // Queued prompts share steps with it, so waiting behind half a prompt is cheaper than computing it all.
        assert!(predicted_ttft_ms(&profile, &holder(1000), 64) < idle_miss, "half a prompt ahead: wait for the hit");
        assert!(predicted_ttft_ms(&profile, &holder(4 * 2064), 64) > idle_miss, "four ahead: go elsewhere");
    }
}
