//! The router's side of the picker: a request priced and charged as this router's frontend would route it
//! (`FrontendState::pick`), among the workers with an OpenAI server of their own in the gateway's subset.
use super::{Pick, PickRequest, Picker, Refusal};
use crate::core::engine::Engine;
use crate::core::frontend::{ApiError, FrontendState};
use crate::core::protocol::discovery::split_endpoint;
use crate::core::protocol::openai::{PREFILL_ID_HEADER, ROUTING_MODE_HEADER, WORKER_ID_HEADER};
use futures::future::BoxFuture;
use std::sync::Arc;

/// Listens before any worker has joined (answering 503 with why), and picks from the moment `ready` is
/// called, as the router's HTTP server does.
#[derive(Clone)]
pub struct FrontendPicker {
    state: Arc<std::sync::OnceLock<Arc<FrontendState>>>,
    waiting: Arc<String>,
}

impl FrontendPicker {
    /// A picker that refuses with `reason` until it is ready.
    pub fn waiting(reason: String) -> Self {
        Self { state: Arc::default(), waiting: Arc::new(reason) }
    }

    pub fn ready(&self, state: Arc<FrontendState>) {
        let _ = self.state.set(state);
    }
}

impl Picker for FrontendPicker {
    fn pick(&self, request: PickRequest) -> BoxFuture<'static, Result<Pick, Refusal>> {
        let Some(state) = self.state.get().cloned() else {
            let refusal = Refusal::from(ApiError::unavailable(self.waiting.as_str()));
            return Box::pin(async move { Err(refusal) });
        };
        Box::pin(async move {
            let subset = request.subset;
            // Workers with an OpenAI server of their own (a `dynamo run --discovery`'s), in the gateway's subset.
            let eligible = |engine: &dyn Engine| {
                let endpoint = host_port(&engine.http_addr()?)?;
                subset.as_ref().is_none_or(|subset| subset.contains(&endpoint)).then_some(endpoint)
            };
            match state.pick(&request.path, request.body, eligible).await {
                Ok(picked) => {
                    // The ids in decimal, as Dynamo's picker writes them; the frontend at the endpoint follows them.
                    let mut headers = vec![(WORKER_ID_HEADER.to_string(), picked.worker_id.to_string())];
                    let mode = match &picked.prefill {
                        Some(prefill) => {
                            headers.push((PREFILL_ID_HEADER.to_string(), prefill.worker_id.to_string()));
                            "disaggregated"
                        }
                        None => "aggregated",
                    };
                    headers.push((ROUTING_MODE_HEADER.to_string(), mode.to_string()));
                    Ok(Pick { endpoint: picked.endpoint, headers, held: Box::new((picked.choice, picked.prefill)) })
                }
                Err(error) => Err(Refusal::from(error)),
            }
        })
    }
}

/// `tcp://host:port` as `host:port`, the form a gateway's destination takes.
fn host_port(address: &str) -> Option<String> {
    let (host, port) = split_endpoint(address)?;
    Some(format!("{host}:{port}"))
}
