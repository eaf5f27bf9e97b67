//! The router's side of the picker: a request priced and charged as this router's frontend would route it
//! (`FrontendState::pick`), among the workers with an OpenAI server of their own in the gateway's subset.
use super::{Pick, PickRequest, Picker, Refusal, WORKER_HEADER};
use crate::core::engine::Engine;
use crate::core::frontend::{ApiError, FrontendState};
use crate::core::protocol::discovery::split_endpoint;
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
                Ok(picked) => Ok(Pick {
                    endpoint: picked.endpoint,
                    headers: vec![(WORKER_HEADER.to_string(), format!("{:016x}", picked.worker_id))],
                    held: Box::new(picked.choice),
                }),
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
