//! Disaggregated serving's decision, made per request once prefill workers are up: is the prompt prefilled
//! on a prefill worker, its KV then read by the decode worker, or on the decode worker itself?
//!
//! The decode worker is chosen first (KV-aware, as for any request), because what it already holds decides
//! whether moving the prompt's KV pays: only the part it lacks would be computed, and a short one costs less
//! to compute in place than to prefill elsewhere and move. Then the prefill worker is chosen among those
//! under their queue limit, KV-aware over its own cache; when all are at it, the decode worker prefills
//! rather than wait.
use super::{Choice, Disagg, Pool, RouteError, Router};
use crate::core::protocol::PreprocessedRequest;

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
        let adapter = request.adapter.as_deref();
        match self.choose_in(Pool::Prefill, &request.token_ids, &request.media_spans(), adapter, &[]) {
            Ok(prefill) if same_transfer(&prefill, decode) => Ok(prefill),
            Ok(_) => Err(Disagg::Unsupported),
            Err(RouteError::Busy { .. } | RouteError::Unavailable) => Err(Disagg::Busy),
            Err(_) => Err(Disagg::Unsupported),
        }
    }
}

/// Whether `prefill` can hand its KV to `decode`: both offer the same kind of transfer (`tcp://` agents of
/// this project, or one external engine's own connector, `vllm://`).
pub(super) fn same_transfer(prefill: &Choice, decode: &Choice) -> bool {
    let scheme = |addr: Option<String>| addr.and_then(|a| a.split_once("://").map(|(scheme, _)| scheme.to_string()));
    scheme(prefill.transfer_addr()).is_some_and(|kind| Some(kind) == scheme(decode.transfer_addr()))
}
