//! The Kubernetes API as this binary speaks it: where the API is and who this process is (`config`), the
//! few calls roles make (server-side apply, merge patch, delete, list, watch), and a reflector that keeps a
//! list current through watches (`reflect`). Plain HTTPS through reqwest and rustls, which the binary already
//! carries, rather than the kube crate: these calls are all it needs, and kube with k8s-openapi costs about
//! four more minutes of build on two cores (measured: crates.md).
//!
//! Every answer is read up to a bound before it is parsed: the API server is trusted, but whatever answers at
//! a misconfigured address is not.
mod config;
mod reflect;

pub use config::{ApiConfig, Auth, SERVICE_ACCOUNT_DIR};
pub use reflect::{Change, reflect};

use futures::StreamExt;
use serde_json::Value;
use std::time::Duration;

/// A list or a single object: at most this much is read.
pub const MAX_ANSWER: usize = 64 << 20;
/// One watch event (one line of the stream).
pub const MAX_WATCH_EVENT: usize = 4 << 20;
/// Of an error answer, this much is kept for the message.
const MAX_ERROR_TEXT: usize = 512;
/// Connecting and any call but a watch.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes: {0}")]
    Config(String),
    #[error("Kubernetes: cannot read {path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("Kubernetes API: cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("Kubernetes API: {method} {path} answered {code}: {message}")]
    Status { method: String, path: String, code: u16, message: String },
    #[error("Kubernetes API: {0}")]
    Answer(String),
}

impl KubeError {
    /// The HTTP status of a refusal (404, 409, 410…).
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub struct KubeClient {
    http: reqwest::Client,
    server: String,
    auth: Auth,
    pub namespace: String,
}

impl KubeClient {
    pub fn new(config: ApiConfig) -> Result<Self, KubeError> {
        let mut builder =
            reqwest::Client::builder().connect_timeout(TIMEOUT).danger_accept_invalid_certs(config.insecure);
        if let Some(pem) = &config.ca_pem {
            for certificate in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| KubeError::Config(format!("the API server's CA is not PEM: {e}")))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Auth::ClientCertificate(pem) = &config.auth {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| KubeError::Config(format!("the client certificate or its key is not PEM: {e}")))?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(|e| KubeError::Config(format!("cannot make an HTTP client: {e}")))?;
        Ok(Self { http, server: config.server, auth: config.auth, namespace: config.namespace })
    }

    /// As kubectl would: `ApiConfig::infer`.
    pub fn infer() -> Result<Self, KubeError> {
        Self::new(ApiConfig::infer()?)
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends one request to `path` (with its query) and answers its response if it succeeded.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, KubeError> {
        let url = format!("{}{path}", self.server);
        let mut request = self.http.request(method.clone(), &url).header("accept", "application/json");
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        request = match &self.auth {
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::BearerFile(file) => {
                let token =
                    std::fs::read_to_string(file).map_err(|source| KubeError::Io { path: file.clone(), source })?;
                request.bearer_auth(token.trim())
            }
            Auth::None | Auth::ClientCertificate(_) => request,
        };
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let unreachable = |e: reqwest::Error| KubeError::Unreachable { url: url.clone(), message: error_chain(&e) };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // The API's refusals are `Status` objects; say their message, or the start of whatever came.
        let text = read_bounded(response, MAX_ANSWER).await.unwrap_or_default();
        let message = serde_json::from_slice::<Value>(&text)
            .ok()
            .and_then(|status| status.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&text[..text.len().min(MAX_ERROR_TEXT)]).into_owned());
        Err(KubeError::Status { method: method.to_string(), path: path.to_string(), code: status.as_u16(), message })
    }

    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Value, KubeError> {
        let response = self.send(method, path, body, Some(TIMEOUT)).await?;
        let bytes = read_bounded(response, MAX_ANSWER).await?;
        serde_json::from_slice(&bytes).map_err(|e| KubeError::Answer(format!("{path} answered JSON that is not: {e}")))
    }

    pub async fn get(&self, path: &str) -> Result<Value, KubeError> {
        self.json(reqwest::Method::GET, path, None).await
    }

    /// Creates or updates `object` at `path` as `manager` owns it (server-side apply, taking over fields
    /// another manager set).
    pub async fn apply(&self, path: &str, manager: &str, object: &Value) -> Result<Value, KubeError> {
        let path = format!("{path}?fieldManager={manager}&force=true");
        // JSON is YAML, which is what an apply patch is written in.
        let body = ("application/apply-patch+yaml", object.to_string().into_bytes());
        self.json(reqwest::Method::PATCH, &path, Some(body)).await
    }

    /// A JSON merge patch (RFC 7386) of the object at `path`.
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, KubeError> {
        let body = ("application/merge-patch+json", patch.to_string().into_bytes());
        self.json(reqwest::Method::PATCH, path, Some(body)).await
    }

    /// Deletes the object at `path`; one already gone is no error.
    pub async fn delete(&self, path: &str) -> Result<(), KubeError> {
        match self.json(reqwest::Method::DELETE, path, None).await {
            Ok(_) => Ok(()),
            Err(error) if error.code() == Some(404) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Watches the collection at `path` from `resource_version` (with `query`, e.g. a label selector, already
    /// escaped): its events, one per line, until the server ends the watch after `timeout`.
    pub async fn watch(
        &self,
        path: &str,
        query: &str,
        resource_version: &str,
        timeout: Duration,
    ) -> Result<WatchEvents, KubeError> {
        let seconds = timeout.as_secs().max(1);
        let path = format!(
            "{path}?watch=1&allowWatchBookmarks=true&resourceVersion={resource_version}&timeoutSeconds={seconds}{query}"
        );
        // The server ends the watch after its timeout; a little more here covers a silent connection.
        let response = self.send(reqwest::Method::GET, &path, None, Some(timeout + TIMEOUT)).await?;
        Ok(WatchEvents { body: Box::pin(response.bytes_stream()), buffer: Vec::new() })
    }
}

/// One event of a watch: `ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` or `ERROR`, with its object.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub object: Value,
}

/// The events of one watch, read line by line, each bounded by `MAX_WATCH_EVENT`.
pub struct WatchEvents {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
}

impl WatchEvents {
    /// The next event; `None` when the server ended the watch.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, KubeError>> {
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.buffer) {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(
                    serde_json::from_slice(&line)
                        .map_err(|e| KubeError::Answer(format!("a watch event is not one: {e}"))),
                );
            }
            if self.buffer.len() > MAX_WATCH_EVENT {
                return Some(Err(KubeError::Answer(format!("a watch event is longer than {MAX_WATCH_EVENT} bytes"))));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => return Some(Err(KubeError::Answer(format!("the watch broke: {}", error_chain(&e))))),
                // A last event without its newline is still one.
                None if !self.buffer.iter().all(u8::is_ascii_whitespace) => {
                    let line = std::mem::take(&mut self.buffer);
                    return Some(
                        serde_json::from_slice(&line)
                            .map_err(|e| KubeError::Answer(format!("a watch event is not one: {e}"))),
                    );
                }
                None => return None,
            }
        }
    }
}

/// The body of `response`, refused past `limit` bytes.
async fn read_bounded(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, KubeError> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(KubeError::Answer(format!("an answer is longer than {limit} bytes")));
    }
    let mut body = response.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| KubeError::Answer(format!("the answer broke: {}", error_chain(&e))))?;
        if bytes.len() + chunk.len() > limit {
            return Err(KubeError::Answer(format!("an answer is longer than {limit} bytes")));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// reqwest's error with its causes (its own message alone says only "error sending request").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
pub mod fake;
