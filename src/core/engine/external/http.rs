//! The worker's HTTP client to its engine: bounded reads of small answers, and a server-sent-event reader
//! over a streamed one that never holds more than one bounded event.
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Largest answer read whole (`/v1/models`, `/metrics`, an error body).
pub const MAX_BODY: usize = 4 << 20;
/// Largest single event of a stream: a chunk of one token with 20 alternatives' logprobs is ~2 kB.
pub const MAX_EVENT: usize = 1 << 20;
/// How long a small answer may take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct EngineHttp {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The engine's data-parallel rank every request is pinned to (vLLM's `X-data-parallel-rank` header).
    rank: Option<u32>,
}

impl EngineHttp {
    /// `base` is `http://host:port`; only plain HTTP (engines serve it on their own port).
    pub fn new(base: &str) -> Result<Self, String> {
        let base = base.trim_end_matches('/').to_string();
        let uri: hyper::Uri = base.parse().map_err(|e| format!("{base:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!("{base:?} must be http://HOST:PORT (plain HTTP to the engine's server)"));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { base, client, rank: None })
    }

    /// This client with every POST pinned to data-parallel rank `rank`.
    pub fn pinned_to_rank(self, rank: Option<u32>) -> Self {
        Self { rank, ..self }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The host of the engine's URL.
    pub fn host(&self) -> Option<String> {
        self.base.parse::<hyper::Uri>().ok()?.host().map(|h| h.trim_matches(['[', ']']).to_string())
    }

    /// GET `path`, its status and body (at most `MAX_BODY`), within `ANSWER_TIMEOUT`.
    pub async fn get(&self, path: &str) -> Result<(hyper::StatusCode, Bytes), String> {
        let request = hyper::Request::get(format!("{}{path}", self.base))
            .body(Full::default())
            .map_err(|e| format!("GET {path}: {e}"))?;
        let answer = async {
            let response = self.client.request(request).await.map_err(|e| format!("GET {}{path}: {e}", self.base))?;
            let status = response.status();
            Ok((status, read_bounded(response.into_body()).await?))
        };
        tokio::time::timeout(ANSWER_TIMEOUT, answer)
            .await
            .map_err(|_| format!("GET {}{path}: no answer within {ANSWER_TIMEOUT:?}", self.base))?
    }

    /// POST `body` as JSON to `path`; the response's body is the caller's to read (or drop, which closes the
    /// connection: how a streamed request is cancelled).
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
        request_id: &str,
    ) -> Result<hyper::Response<Incoming>, String> {
        let mut request = hyper::Request::post(format!("{}{path}", self.base))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("x-request-id", request_id);
        if let Some(rank) = self.rank {
            request = request.header("x-data-parallel-rank", rank);
        }
        let request =
            request.body(Full::new(Bytes::from(body.to_string()))).map_err(|e| format!("POST {path}: {e}"))?;
        self.client.request(request).await.map_err(|e| format!("POST {}{path}: {e}", self.base))
    }
}

/// A body read whole, refused past `MAX_BODY`.
pub async fn read_bounded(body: Incoming) -> Result<Bytes, String> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(format!("the engine's answer could not be read (or is over {MAX_BODY} bytes): {e}")),
    }
}

/// The `data:` payloads of a server-sent-event stream, one at a time.
pub struct EventStream {
    body: Incoming,
    buffer: BytesMut,
    done: bool,
}

impl EventStream {
    pub fn new(body: Incoming) -> Self {
        Self { body, buffer: BytesMut::new(), done: false }
    }

    /// The next event's data (its `data:` lines joined), or `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(event) = self.take_event()? {
                if event.is_empty() {
                    continue;
                }
                return Ok(Some(event));
            }
            if self.done {
                // A last event without its blank line still counts.
                let rest = std::mem::take(&mut self.buffer);
                return Ok(data_of(&rest).filter(|d| !d.is_empty()));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(format!("the engine's stream broke: {e}")),
                None => self.done = true,
            }
            if self.buffer.len() > MAX_EVENT {
                return Err(format!("the engine streamed an event over {MAX_EVENT} bytes"));
            }
        }
    }

    /// One whole event off the front of the buffer, if a blank line ends one.
    fn take_event(&mut self) -> Result<Option<String>, String> {
        let text = &self.buffer[..];
        let end = [&b"\n\n"[..], b"\r\n\r\n"]
            .iter()
            .filter_map(|separator| find(text, separator).map(|at| (at, separator.len())))
            .min();
        let Some((at, separator)) = end else { return Ok(None) };
        let event = data_of(&text[..at]);
        self.buffer.advance(at + separator);
        Ok(Some(event.unwrap_or_default()))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The data of one event's lines (comments and other fields skipped).
fn data_of(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let data: Vec<&str> =
        text.lines().filter_map(|line| line.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
    (!data.is_empty()).then(|| data.join("\n"))
}
