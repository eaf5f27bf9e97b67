//! Disaggregated serving's decision, made per request once prefill workers are up: is the prompt prefilled
//! on a prefill worker, its KV then read by the decode worker, or on the decode worker itself?
//!
//! The decode worker is chosen first (KV-aware, as for any request), because what it already holds decides
//! whether moving the prompt's KV pays: only the part it lacks would be computed, and a short one costs less
//! to compute in place than to prefill elsewhere and move. Then the prefill worker is chosen among those
//! under their queue limit, KV-aware over its own cache; when all are at it, the decode worker prefills
//! rather than wait. A prompt whose KV would take long to move for the tokens the request may generate also
//! stays where it decodes: its second token waits for the move, and with a short answer that wait is most of
//! its time between tokens (the public trace's long prompts with a few tokens of answer lost their ITL target
//! to it).
use super::{Choice, Disagg, Pool, RouteError, Router};
use crate::core::protocol::{LoadMetrics, PreprocessedRequest};
use std::time::Duration;

impl Router {
    /// The prefill worker that would compute `request`'s prompt for `decode`, charged with it (and `decode`
    /// then no longer charged with its prefill), or `None` when `decode` would prefill it itself: the pair
    /// an endpoint picker names. Counted as `route_migrating`'s decisions are.
    pub fn prefill_for(&self, request: &PreprocessedRequest, decode: &mut Choice) -> Option<Choice> {
        let prefill = self.prefill_choice(request, decode)?;
        decode.without_prefill();
        Some(prefill)
    }

    /// The prefill worker for `request` (charged with it), or `None` when the decode worker chosen for it
    /// prefills it itself. Counts the decision whenever there are prefill workers to decide between.
    pub(super) fn prefill_choice(&self, request: &PreprocessedRequest, decode: &Choice) -> Option<Choice> {
        if self.snapshot_of(Pool::Prefill).is_empty() {
            return None;
        }
        let decided = self.decide(request, decode);
        self.record(match &decided {
            Ok(_) => Disagg::Remote,
            Err(local) => *local,
        });
        decided.ok()
    }

    fn decide(&self, request: &PreprocessedRequest, decode: &Choice) -> Result<Choice, Disagg> {
        if decode.transfer_addr().is_none() {
            return Err(Disagg::Unsupported);
        }
        let cached = decode.overlap_blocks as usize * self.config.block_size;
        let uncached = request.token_ids.len().saturating_sub(cached);
        // One token to generate is all prefill: there is nothing for the decode worker to continue.
        if request.stop.max_tokens <= 1 || uncached < self.config.disagg_threshold {
            return Err(Disagg::Short);
        }
        if let Some(budget) = self.config.disagg_itl_budget
            && added_itl(&decode.load(), uncached, request.stop.max_tokens).is_some_and(|added| added > budget)
        {
            return Err(Disagg::SlowTransfer);
        }
        let adapter = request.adapter.as_deref();
        match self.choose_in(Pool::Prefill, &request.token_ids, &request.media_spans(), adapter, &[]) {
            Ok(prefill) if same_transfer(&prefill, decode) => Ok(prefill),
            Ok(_) => Err(Disagg::Unsupported),
            Err(RouteError::Busy { .. } | RouteError::Unavailable) => Err(Disagg::Busy),
            Err(_) => Err(Disagg::Unsupported),
        }
    }
}

/// What moving `tokens` tokens' KV to a worker with `load` adds to the mean time between a request's
/// `max_tokens` tokens: its second token waits for the move (the first comes from the prefill worker), so
/// a long prompt with a short answer pays it over few gaps. `None` while the worker has measured no read.
fn added_itl(load: &LoadMetrics, tokens: usize, max_tokens: u32) -> Option<Duration> {
    if load.kv_read_bytes_per_s == 0 {
        return None;
    }
    let seconds = tokens as f64 * load.kv_bytes_per_token as f64 / load.kv_read_bytes_per_s as f64;
    Some(Duration::try_from_secs_f64(seconds / max_tokens.saturating_sub(1).max(1) as f64).unwrap_or(Duration::MAX))
}

/// Whether `prefill` can hand its KV to `decode`: both offer the same kind of transfer (`tcp://` agents of
/// this project, or one external engine's own connector, `vllm://`).
pub(super) fn same_transfer(prefill: &Choice, decode: &Choice) -> bool {
    let scheme = |addr: Option<String>| addr.and_then(|a| a.split_once("://").map(|(scheme, _)| scheme.to_string()));
    scheme(prefill.transfer_addr()).is_some_and(|kind| Some(kind) == scheme(decode.transfer_addr()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_off_costs_its_move_spread_over_the_gaps_between_the_tokens_asked_for() {
        let load =
            |rate| LoadMetrics { kv_bytes_per_token: 1_000_000, kv_read_bytes_per_s: rate, ..Default::default() };
        assert_eq!(added_itl(&load(0), 150, 2), None, "nothing measured yet: no price");
        // 150 tokens of 1 MB at 100 MB/s: 1.5 s, all of it before the second token.
        assert_eq!(added_itl(&load(100_000_000), 150, 2), Some(Duration::from_millis(1500)));
        assert_eq!(added_itl(&load(100_000_000), 150, 151), Some(Duration::from_millis(10)));
        assert_eq!(added_itl(&load(1), usize::MAX, 2), Some(Duration::MAX));
    }
}
