//! Images through encode workers, once any are up: before a request with images goes to the worker that
//! prefills it, an encode worker (the least loaded under its queue limit) computes their embeddings and
//! holds them, and the request goes on naming them, so that worker reads them instead of encoding. With
//! every encode worker at its limit, a prefilling worker that cannot read embeddings (no transfer agent),
//! or an encode worker that fails, is lost or is too slow, the request goes on without them and the
//! prefilling worker encodes its images itself: slower, never wrong.
use super::{Choice, Pool, RouteError, Router};
use crate::core::protocol::{HandOff, HeldEmbeddings, MediaInput, PreprocessedRequest};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// How long a request waits for an encode worker before its images are left to the prefilling worker.
pub const ENCODE_WAIT: Duration = Duration::from_secs(60);

impl Router {
    /// Has an encode worker encode the request's images for `reader`, the worker that will prefill it.
    pub(super) async fn encode_images(&self, request: &mut PreprocessedRequest, reader: &Choice) {
        let Some(media) = request.media.clone().filter(|media| !media.is_empty()) else { return };
        if self.snapshot_of(Pool::Encode).is_empty() {
            return;
        }
        // Embeddings move over this project's transfer agents only.
        if !reader.transfer_addr().is_some_and(|addr| addr.starts_with("tcp://")) {
            return self.record_encode("local_unsupported");
        }
        let encoder = match self.choose_in(Pool::Encode, &[], &[], None, &[]) {
            Ok(encoder) => encoder,
            Err(RouteError::Busy { .. }) => return self.record_encode("local_busy"),
            Err(_) => return self.record_encode("local_fallback"),
        };
        let (worker_id, agent) = (encoder.worker_id, encoder.transfer_addr().unwrap_or_default());
        let job = PreprocessedRequest { hand_off: HandOff::None, constraint: None, pooling: None, ..request.clone() };
        let answer = match encoder.dispatch(job) {
            Ok(mut stream) => tokio::time::timeout(ENCODE_WAIT, stream.next()).await,
            Err(error) => Ok(Some(crate::core::protocol::EngineOutput {
                finish_reason: Some(crate::core::protocol::FinishReason::Error(error.to_string())),
                ..Default::default()
            })),
        };
        let why = match answer {
            Ok(Some(output)) if output.encoded.len() == media.len() => {
                let encoded = media.iter().zip(output.encoded).map(|(m, held)| MediaInput {
                    encoded: Some(HeldEmbeddings { agent: agent.clone(), ..held }),
                    ..m.clone()
                });
                request.media = Some(Arc::new(encoded.collect()));
                return self.record_encode("remote");
            }
            Ok(Some(output)) => match output.finish_reason {
                Some(crate::core::protocol::FinishReason::Error(why)) => why,
                _ => format!("it answered for {} of {} images", output.encoded.len(), media.len()),
            },
            Ok(None) => "it was lost".into(),
            Err(_) => format!("it took longer than {ENCODE_WAIT:?}"),
        };
        tracing::warn!(
            request = %request.request_id,
            "encode worker {worker_id:016x} did not encode the images ({why}); the prefilling worker encodes them"
        );
        self.record_encode("local_fallback");
    }

    fn record_encode(&self, decision: &'static str) {
        if let Some(metrics) = self.metrics.get() {
            metrics.encode_decision(decision);
        }
    }
}

/// The request without its images' held embeddings: for a worker that will not compute the images (its KV
/// comes from the prefill worker), whose read would only find the leases ended.
pub(super) fn without_embeddings(mut request: PreprocessedRequest) -> PreprocessedRequest {
    if let Some(media) = &request.media
        && media.iter().any(|m| m.encoded.is_some())
    {
        let plain = media.iter().map(|m| MediaInput { encoded: None, ..m.clone() }).collect();
        request.media = Some(Arc::new(plain));
    }
    request
}
