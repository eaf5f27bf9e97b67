//! The engine contract: everything above it (router, frontend, roles) is engine-agnostic.
//!
//! An engine takes a `PreprocessedRequest` and streams `EngineOutput`s; dropping the stream cancels the
//! request and frees its KV blocks at the engine's next step. It publishes KV-cache events (which prefix
//! blocks it holds) and reports its load. Engines that own their KV cache share the block pool (`blocks`),
//! the continuous-batching `scheduler` and the task around them (`batch`); they differ in the `Executor`:
//! `mocker` simulates timing, `native` runs the model. `external` is another server (vLLM) put behind a
//! worker.
pub mod batch;
pub mod blocks;
pub mod external;
mod follow;
mod ledger;
pub mod mocker;
pub mod native;
pub mod profile;
pub mod scheduler;
mod spawn;

pub use follow::KvFollower;
#[cfg(test)]
pub use ledger::HandKeptLedger;
pub use ledger::KvLedger;
pub use spawn::{EngineSettings, SpawnError, spawn_engines, start_engine};

use crate::core::protocol::profile::Profile;
use crate::core::protocol::{EngineOutput, KvEvent, KvEventBatch, LoadMetrics, PreprocessedRequest, WorkerId};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{broadcast, mpsc};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the engine has stopped")]
    Stopped,
    #[error("{0}")]
    InvalidRequest(String),
}

/// Refuses a request under a LoRA adapter the engine does not serve (`adapters`, asked only for a request
/// that names one: most do not, and the list is a copy): run on the base model it would answer as another
/// model than the client asked for.
pub fn check_adapter(request: &PreprocessedRequest, adapters: impl FnOnce() -> Vec<String>) -> Result<(), EngineError> {
    let Some(name) = &request.adapter else { return Ok(()) };
    let adapters = adapters();
    match adapters.contains(name) {
        true => Ok(()),
        false => Err(EngineError::InvalidRequest(format!(
            "this worker serves no LoRA adapter named {name:?} (it serves {})",
            if adapters.is_empty() { "none".to_string() } else { format!("{adapters:?}") }
        ))),
    }
}

/// Refuses a request that can never run on an engine that holds at most `max_sequence_tokens` tokens per
/// sequence (its KV cache, or its model's context), before it is queued. Engines in this process and remote
/// ones both check with it, so `dynamo run` and `dynamo route` answer such a request alike.
pub fn check_fits(request: &PreprocessedRequest, max_sequence_tokens: usize) -> Result<(), EngineError> {
    let needed = request.token_ids.len() + request.stop.max_tokens as usize;
    if request.token_ids.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt has no tokens".into()));
    }
    if request.generated as usize >= request.token_ids.len() {
        return Err(EngineError::InvalidRequest(format!(
            "{} of the {} tokens are said to be generated, but a request has at least one prompt token",
            request.generated,
            request.token_ids.len()
        )));
    }
    if needed > max_sequence_tokens {
        return Err(EngineError::InvalidRequest(format!(
            "prompt plus max_tokens is {needed} tokens but this worker holds at most {max_sequence_tokens} per \
             sequence (its KV cache or the model's context length); shorten the prompt or lower max_tokens"
        )));
    }
    // Images in order, each over placeholders of the prompt, none sharing one: what the executor reads.
    let mut end = 0;
    for media in request.media() {
        if media.start < end || media.end <= media.start || media.end as usize > request.token_ids.len() {
            return Err(EngineError::InvalidRequest(format!(
                "an image over positions {}..{} of a {}-token prompt (after one ending at {end})",
                media.start,
                media.end,
                request.token_ids.len()
            )));
        }
        end = media.end;
    }
    Ok(())
}

/// An engine's KV pages as memory a transfer agent can register: `regions` (each layer's K, then its V, as
/// `transfer::layered_page` addresses them), each `pages` pages of `page_bytes`.
#[derive(Debug, Clone)]
pub struct KvMemory {
    pub regions: Vec<std::sync::Arc<crate::core::transfer::Region>>,
    pub pages: u64,
    pub page_bytes: u64,
    /// Tokens whose KV one page holds.
    pub block_size: u32,
    /// Pages that are not memory (the mocker's, with no `regions`): what moving them between workers costs.
    pub simulated: Option<SimulatedKv>,
}

/// The KV of a simulated engine as the hand-off sees it: no bytes move, but a read takes the time the real
/// model's KV would take over the given bandwidth, in the engine's simulated time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedKv {
    /// KV bytes per token of the model being simulated.
    pub bytes_per_token: u64,
    /// Bandwidth KV moves at between workers.
    pub transfer_bytes_per_s: f64,
    /// Simulated time runs this many times faster than real time.
    pub speedup: f64,
}

impl SimulatedKv {
    /// The bytes `tokens` tokens' KV would be.
    pub fn bytes(&self, tokens: u64) -> u64 {
        tokens.saturating_mul(self.bytes_per_token)
    }

    /// How long moving `tokens` tokens' KV takes, in real time (the simulated time over the speedup).
    pub fn transfer_time(&self, tokens: u64) -> std::time::Duration {
        let simulated = self.bytes(tokens) as f64 / self.transfer_bytes_per_s.max(1.0);
        // Past a day it makes no difference: the reader gives up long before and computes the prompt itself.
        let day = std::time::Duration::from_secs(86_400);
        std::time::Duration::try_from_secs_f64(simulated / self.speedup.max(1e-9)).map_or(day, |time| time.min(day))
    }
}

/// The pages an arriving request's KV goes to, once the engine has allocated them.
pub type ArrivingPages = futures::future::BoxFuture<'static, Result<scheduler::ArrivalPages, EngineError>>;

/// What an engine whose KV pages can move offers disaggregated serving (`core::handoff`): its pages as memory,
/// requests that keep their KV for a peer, and requests whose prompt's KV a peer writes.
pub trait KvPages: Send + Sync {
    fn memory(&self) -> &KvMemory;

    /// Runs a request (a prefill for a peer, `max_tokens` 1) whose pages are held for `lease` once it
    /// finishes: its final output names them (`EngineOutput::held`, the layout left to the caller), and
    /// `release_lease` frees them when the peer has read them.
    fn submit_holding(
        &self,
        request: PreprocessedRequest,
        lease: std::time::Duration,
    ) -> Result<(scheduler::SeqId, ResponseStream), EngineError>;

    /// Queues a request whose first `from_peer` tokens' KV a peer writes into the pages named once they are
    /// allocated; its stream starts once `arrived` says the KV is there (or once `wait` has passed without
    /// it: then the request is computed here).
    fn submit_arriving(
        &self,
        request: PreprocessedRequest,
        from_peer: usize,
        wait: std::time::Duration,
    ) -> Result<(scheduler::SeqId, ArrivingPages, ResponseStream), EngineError>;

    /// Says whether the peer's KV for request `id` landed; if not, the request is computed here instead.
    fn arrived(&self, id: scheduler::SeqId, landed: bool) -> Result<(), EngineError>;

    /// Frees what request `id` holds for a peer (read, or the peer is gone).
    fn release_lease(&self, id: scheduler::SeqId) -> Result<(), EngineError>;
}

pub trait Engine: Send + Sync {
    fn worker_id(&self) -> WorkerId;

    /// Starts generating. The stream ends after an output with a `finish_reason`.
    fn submit(&self, request: PreprocessedRequest) -> Result<ResponseStream, EngineError>;

    /// KV-cache events from now on, one batch per engine step that changed the cache.
    fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEventBatch>;

    fn load(&self) -> LoadMetrics;

    /// Sends the engine's whole KV state again on its KV events (`Cleared`, then `Stored`, in order with the
    /// rest), for a subscriber that lagged and lost some. False when the engine cannot.
    fn resend_kv_state(&self) -> bool {
        false
    }

    /// The engine's whole KV cache as `Stored` events in storing order, from the ledger of what it has
    /// published (everything broadcast so far, and possibly a step more). An engine that publishes KV events
    /// must answer; `None` from one that publishes none.
    fn kv_snapshot(&self) -> Option<Vec<KvEvent>> {
        None
    }

    /// Its KV pages as shared memory a transfer agent can offer peers, and the requests that share them;
    /// `None` where they cannot move (the mocker only simulates them; the CUDA backend's device pages await
    /// its transfer seam).
    fn kv_pages(&self) -> Option<&dyn KvPages> {
        None
    }

    /// Where its transfer agent listens (`tcp://host:port`), for an engine whose KV can be handed to or from
    /// other workers; `None` for one that serves whole requests only.
    fn transfer_addr(&self) -> Option<String> {
        None
    }

    /// Where the OpenAI server that serves this worker alone listens (`tcp://host:port`): where an endpoint
    /// picker sends a request it chose this worker for. `None` for a worker reached over the planes only.
    fn http_addr(&self) -> Option<String> {
        None
    }

    /// What it computes on, for operators: `cpu (16 threads)`, `cuda:0`, `mocker`, `vllm at URL`; empty
    /// where it cannot say.
    fn device(&self) -> String {
        String::new()
    }

    /// Where a model that takes images keeps their embeddings, so that ones computed elsewhere (an encode
    /// worker's) can be put in before the request that needs them; `None` for other engines.
    fn embeddings(&self) -> Option<Arc<crate::core::multimodal::EmbeddingCache>> {
        None
    }

    /// Its images so far, for an engine of a model that takes them.
    fn images(&self) -> Option<crate::core::protocol::ImageStats> {
        self.embeddings().map(|cache| cache.stats())
    }

    /// Its KV hand-offs so far, for an engine that hands KV over in this process; `None` otherwise (a remote
    /// worker's come with its stats reports).
    fn kv_transfers(&self) -> Option<crate::core::protocol::KvTransferStats> {
        None
    }

    /// How fast it computes prompts and steps batches, for a router that prices workers in time (`latency`
    /// mode); `None` for an engine that does not know (a native or external one started without a profile).
    fn profile(&self) -> Option<Arc<Profile>> {
        None
    }

    /// The LoRA adapters it serves now besides the base model, by the names clients put in `"model"` (an
    /// external engine's, as its `/v1/models` lists them, which changes as it loads and unloads them); the
    /// native engine and the mocker serve none.
    fn adapters(&self) -> Vec<String> {
        Vec::new()
    }

    /// False once the engine is known to be gone (a remote worker that stopped answering); routers skip it.
    fn is_alive(&self) -> bool {
        true
    }
}

/// The outputs of one request. Dropping it cancels the request.
pub struct ResponseStream {
    receiver: mpsc::UnboundedReceiver<EngineOutput>,
    /// Dropped with the stream, for engines that must say "cancel" rather than notice a closed channel.
    _on_drop: Option<Box<dyn Send + Sync>>,
}

impl ResponseStream {
    /// An engine in this process notices the receiver's drop on its own.
    pub fn new(receiver: mpsc::UnboundedReceiver<EngineOutput>) -> Self {
        Self { receiver, _on_drop: None }
    }

    /// `on_drop` is dropped with the stream (after the receiver), e.g. to send a cancel message.
    pub fn with_drop_guard(receiver: mpsc::UnboundedReceiver<EngineOutput>, on_drop: Box<dyn Send + Sync>) -> Self {
        Self { receiver, _on_drop: Some(on_drop) }
    }
}

impl Stream for ResponseStream {
    type Item = EngineOutput;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EngineOutput>> {
        self.receiver.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapter_the_engine_lacks_is_refused_and_a_base_request_never_asks_for_the_list() {
        let mut request = PreprocessedRequest::greedy("m", vec![7; 10], 2);
        assert!(check_adapter(&request, || unreachable!("a base-model request needs no adapter list")).is_ok());
        request.adapter = Some("sql".into());
        assert!(check_adapter(&request, || vec!["chat".into(), "sql".into()]).is_ok());
        let Err(EngineError::InvalidRequest(why)) = check_adapter(&request, || vec!["chat".into()]) else {
            panic!("an adapter the engine lacks was accepted")
        };
        assert!(why.contains("\"sql\"") && why.contains("[\"chat\"]"), "{why}");
        let Err(EngineError::InvalidRequest(why)) = check_adapter(&request, Vec::new) else { panic!("accepted") };
        assert!(why.contains("it serves none"), "{why}");
    }
    use crate::core::protocol::MediaInput;

    #[test]
    fn images_must_lie_in_order_over_the_prompt() {
        let with = |spans: &[(u32, u32)]| {
            let mut request = PreprocessedRequest::greedy("m", vec![7; 10], 2);
            let media = spans.iter().map(|&(start, end)| MediaInput {
                start,
                end,
                hash: 1,
                data: Default::default(),
                encoded: None,
            });
            request.media = Some(std::sync::Arc::new(media.collect()));
            check_fits(&request, 100)
        };
        assert!(with(&[(1, 4), (4, 9)]).is_ok());
        for bad in [&[(1, 4), (3, 9)][..], &[(5, 5)], &[(8, 11)], &[(6, 9), (1, 3)]] {
            let error = with(bad).unwrap_err().to_string();
            assert!(error.contains("an image over positions"), "{bad:?}: {error}");
        }
    }
}
