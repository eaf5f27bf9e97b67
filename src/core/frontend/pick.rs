//! A request priced as this frontend would route it, without running it: parsed, templated and tokenized by
//! the same `prepare` as `/v1/chat/completions` and `/v1/completions` (so a bad request gets the same
//! error), then the router's choice among the workers the caller finds eligible, and the prefill worker for
//! it where the router would disaggregate. What an endpoint picker asks; the choices are charged to the
//! workers' load until the caller drops them.
use super::{ApiError, FrontendState, chat, completions};
use crate::core::engine::Engine;
use crate::core::protocol::WorkerId;
use crate::core::router::{Choice, Pool};
use std::sync::Arc;

/// The worker chosen, where its OpenAI server is (`host:port`), and the charge held for it; with prefill
/// workers up, the prefill worker chosen to compute the prompt for it, when disaggregation applies.
pub struct Picked {
    pub endpoint: String,
    pub worker_id: WorkerId,
    pub overlap_blocks: u32,
    pub choice: Choice,
    pub prefill: Option<Choice>,
}

impl FrontendState {
    /// Chooses a worker for the request to `path` with `body`, among those `eligible` gives an endpoint
    /// (where the request is to be sent). A path other than the two generation endpoints is priced by load
    /// alone.
    pub async fn pick(
        self: &Arc<Self>,
        path: &str,
        body: bytes::Bytes,
        eligible: impl Fn(&dyn Engine) -> Option<String>,
    ) -> Result<Picked, ApiError> {
        let path = path.split('?').next().unwrap_or_default();
        let mut model = None;
        let (served, request) = match path {
            "/v1/chat/completions" => {
                let fetched = self.fetch_images(&body).await;
                let prepared =
                    self.prepare(&mut model, move |state, model| chat::prepare(state, &body, &fetched, model)).await?;
                prepared.into_first()
            }
            "/v1/completions" => self
                .prepare(&mut model, move |state, model| completions::prepare(state, &body, model))
                .await?
                .into_first(),
            _ => (self.first(), None),
        };
        let (token_ids, media, adapter) = match &request {
            Some(request) => (request.token_ids.as_slice(), request.media_spans(), request.adapter.as_deref()),
            None => (&[][..], Vec::new(), None),
        };
        let mut endpoints = Vec::new();
        let mut avoid = Vec::new();
        for engine in served.router.engines_of(Pool::Decode) {
            match eligible(engine.as_ref()) {
                Some(endpoint) => endpoints.push((engine.worker_id(), endpoint)),
                None => avoid.push(engine.worker_id()),
            }
        }
        if endpoints.is_empty() {
            return Err(ApiError::unavailable("no worker is eligible for this request"));
        }
        let mut choice = served.router.choose_in(Pool::Decode, token_ids, &media, adapter, &avoid)?;
        let endpoint = (endpoints.into_iter())
            .find_map(|(id, endpoint)| (id == choice.worker_id).then_some(endpoint))
            .ok_or_else(|| ApiError::internal("the router chose a worker it was told to avoid"))?;
        let prefill = request.as_ref().and_then(|request| served.router.prefill_for(request, &mut choice));
        Ok(Picked { endpoint, worker_id: choice.worker_id, overlap_blocks: choice.overlap_blocks, choice, prefill })
    }
}
