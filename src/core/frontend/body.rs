//! Request bodies, read within bounds: a JSON content type (415), at most `max_bytes` (413, refused from
//! `Content-Length` before anything is read), whole within `timeout` (408), and all bodies being held at once
//! within one budget (503), so memory for bodies is bounded whatever many clients send together.
use super::error::ApiError;
use crate::core::protocol::WorkerId;
use crate::core::protocol::openai::{PREFILL_ID_HEADER, WORKER_ID_HEADER};
use crate::core::router::Pins;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use http_body_util::BodyExt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bodies of this many largest requests may be held at once.
const BUDGET_REQUESTS: usize = 32;

pub struct BodyLimits {
    max_bytes: usize,
    timeout: Duration,
    /// One permit per byte held in a body being read or parsed.
    budget: Arc<Semaphore>,
}

impl BodyLimits {
    pub fn new(max_bytes: usize, timeout: Duration) -> Self {
        let budget = max_bytes.saturating_mul(BUDGET_REQUESTS).min(Semaphore::MAX_PERMITS);
        Self { max_bytes, timeout, budget: Arc::new(Semaphore::new(budget)) }
    }

    fn budget_mib(&self) -> usize {
        self.max_bytes.saturating_mul(BUDGET_REQUESTS) >> 20
    }
}

/// A request's whole body, holding its share of the budget until dropped, and the workers its headers name.
pub struct JsonBody {
    pub bytes: Bytes,
    pub pins: Pins,
    _held: Option<OwnedSemaphorePermit>,
}

/// The workers `headers` name for the request (`x-worker-instance-id`, `x-prefill-instance-id`: decimal ids,
/// as an endpoint picker in front of this server sets them).
fn pins_of(headers: &header::HeaderMap) -> Result<Pins, ApiError> {
    let id = |name: &str| -> Result<Option<WorkerId>, ApiError> {
        let Some(value) = headers.get(name) else { return Ok(None) };
        let text = value.to_str().unwrap_or_default().trim();
        text.parse().map(Some).map_err(|_| {
            let shown: String = String::from_utf8_lossy(value.as_bytes()).chars().take(40).collect();
            ApiError::bad_request(None, format!("{name} must be a worker id in decimal, got `{shown}`"))
        })
    };
    Ok(Pins { decode: id(WORKER_ID_HEADER)?, prefill: id(PREFILL_ID_HEADER)? })
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let limits = match request.extensions().get::<Arc<BodyLimits>>() {
            Some(limits) => limits.clone(),
            None => default_limits(),
        };
        if let Some(kind) = request.headers().get(header::CONTENT_TYPE)
            && !is_json(kind.as_bytes())
        {
            return Err(ApiError::unsupported_media_type(format!(
                "the request body must be JSON (Content-Type: application/json), not {}",
                String::from_utf8_lossy(kind.as_bytes())
            )));
        }
        let pins = pins_of(request.headers())?;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limits.max_bytes as u64) {
            return Err(too_large(limits.max_bytes));
        }
        let read = read_body(request.into_body(), &limits);
        match tokio::time::timeout(limits.timeout, read).await {
            Ok(body) => body.map(|body| JsonBody { pins, ..body }),
            Err(_) => Err(ApiError::timeout(format!(
                "the request body did not arrive within {} s",
                limits.timeout.as_secs_f64()
            ))),
        }
    }
}

async fn read_body(mut body: axum::body::Body, limits: &BodyLimits) -> Result<JsonBody, ApiError> {
    let mut held: Option<OwnedSemaphorePermit> = None;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut length = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(None, format!("could not read the request body: {e}")))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        length += chunk.len();
        if length > limits.max_bytes {
            return Err(too_large(limits.max_bytes));
        }
        let permits = u32::try_from(chunk.len()).map_err(|_| too_large(limits.max_bytes))?;
        let share = limits.budget.clone().try_acquire_many_owned(permits).map_err(|_| {
            ApiError::unavailable(format!(
                "the server is holding its limit of {} MiB of request bodies; retry shortly",
                limits.budget_mib()
            ))
        })?;
        match held.as_mut() {
            Some(held) => held.merge(share),
            None => held = Some(share),
        }
        chunks.push(chunk);
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut whole = Vec::with_capacity(length);
            chunks.iter().for_each(|c| whole.extend_from_slice(c));
            Bytes::from(whole)
        }
    };
    Ok(JsonBody { bytes, pins: Pins::default(), _held: held })
}

/// `application/json`, or any `+json` type, with parameters.
fn is_json(content_type: &[u8]) -> bool {
    let essence = content_type.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
    let essence = essence.to_ascii_lowercase();
    essence == b"application/json" || (essence.starts_with(b"application/") && essence.ends_with(b"+json"))
}

fn too_large(max: usize) -> ApiError {
    ApiError::too_large(format!(
        "the request body is larger than this server's limit of {max} bytes; send a smaller request or raise \
         --max-request-bytes"
    ))
}

/// For an app served without `server::serve_app` (tests, benches): the default bounds.
fn default_limits() -> Arc<BodyLimits> {
    static DEFAULT: OnceLock<Arc<BodyLimits>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            let http = super::HttpSettings::default();
            Arc::new(BodyLimits::new(http.max_request_bytes, http.body_timeout))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        for ok in ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"]
        {
            assert!(is_json(ok.as_bytes()), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""] {
            assert!(!is_json(bad.as_bytes()), "{bad}");
        }
    }
}
