//! The HTTP server under the frontend: accepts connections, bounds them, and serves any axum app over HTTP/1.1.
//!
//! What a client can hold is bounded before it is given: at most `max_connections` connections (past that a
//! new one is answered 503 and closed, so a flood of idle sockets cannot starve the process of file
//! descriptors), each must send a request's headers within `header_timeout` (which also closes a kept-alive
//! connection that stays idle that long), and its body within `body_timeout` (`body`). The API key and the
//! body limits are applied here to whatever app is served, so the waiting frontend of `dynamo route` and the
//! full one are protected alike. HTTP/2 is not offered: OpenAI clients speak HTTP/1.1, and an idle HTTP/2
//! connection has no header deadline to close it.
use super::auth::{self, ApiKey};
use super::body::BodyLimits;
use super::error::ApiError;
use axum::Router as HttpRouter;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// What the HTTP server allows a client: sizes, times, connections, and the key it must present.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest request body; a larger one is answered 413 before it is read.
    pub max_request_bytes: usize,
    /// Open connections past which a new one is answered 503 (lowered to what the file-descriptor limit
    /// allows).
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and to start the next request on a kept-alive
    /// connection.
    pub header_timeout: Duration,
    /// Time a client has to send a whole request body once its headers arrived.
    pub body_timeout: Duration,
    /// With a key, every endpoint but `/health`, `/live` (and `/metrics`, unless `protect_metrics`) asks for
    /// `Authorization: Bearer KEY`.
    pub api_key: Option<ApiKey>,
    pub protect_metrics: bool,
    /// Web origins whose pages may call the API from a browser (CORS), `*` for any; none by default.
    pub allowed_origins: Vec<String>,
    /// The format models' tool calls are read in, over the one each chat template names.
    pub tool_parser: Option<super::tools::ToolParser>,
    /// What images a request may bring.
    pub media: super::media::MediaSettings,
}

impl HttpSettings {
    pub const DEFAULT_MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
    pub const DEFAULT_HEADER_TIMEOUT_S: f64 = 30.0;
    pub const DEFAULT_BODY_TIMEOUT_S: f64 = 60.0;
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs_f64(Self::DEFAULT_HEADER_TIMEOUT_S),
            body_timeout: Duration::from_secs_f64(Self::DEFAULT_BODY_TIMEOUT_S),
            api_key: None,
            protect_metrics: false,
            allowed_origins: Vec::new(),
            tool_parser: None,
            media: super::media::MediaSettings::default(),
        }
    }
}

/// What browsers are told about cross-origin calls: the listed origins (or any, for `*`) may call every
/// endpoint with GET and POST, sending an API key and JSON. `None` when no origin is allowed.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Checked when the flag was parsed (`valid_origin`); one that is not a header value is left out.
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(Duration::from_secs(3600)),
    )
}

/// Parses an `--allowed-origin`: `*`, or a scheme, host and optional port, as browsers send `Origin`.
pub fn valid_origin(text: &str) -> Result<String, String> {
    let text = text.trim().trim_end_matches('/');
    let well_formed = text == "*"
        || ((text.starts_with("http://") || text.starts_with("https://"))
            && !text.split_once("://").is_some_and(|(_, rest)| rest.is_empty() || rest.contains('/'))
            && axum::http::HeaderValue::from_str(text).is_ok());
    if well_formed {
        Ok(text.to_string())
    } else {
        Err(format!("expected an origin such as https://app.example.com or http://localhost:3000, or *, got `{text}`"))
    }
}

/// File descriptors kept for everything but client connections: plane sockets, model files, logs.
const RESERVED_FDS: u64 = 256;

/// Connections being told 503 at once; past this an extra connection is closed without an answer.
const MAX_REFUSING: usize = 64;

/// Serves `app` on `listener` until `shutdown` resolves, then lets the requests in flight finish.
pub async fn serve_app(
    listener: TcpListener,
    app: HttpRouter,
    settings: HttpSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = auth::protect(app, settings.api_key, settings.protect_metrics)
        .layer(axum::Extension(Arc::new(BodyLimits::new(settings.max_request_bytes, settings.body_timeout))));
    // Outside the key check: a browser's preflight carries no credentials, and gets its answer here.
    let app = match cors(&settings.allowed_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    let cap = connection_cap(settings.max_connections);
    let slots = Arc::new(Semaphore::new(cap));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(settings.header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    // Out of file descriptors (or a connection reset before it was taken): wait a little
                    // rather than spin; connections closing free descriptors.
                    tracing::debug!("accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(tcp, cap).await;
                    drop(refusal);
                });
            }
            continue;
        };
        // Without TCP_NODELAY a small SSE chunk can wait ~40 ms for the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answers a connection past the cap with a 503 and closes it. The request is drained briefly first: closing
/// a socket with unread bytes resets it, and a reset can destroy the answer before the client reads it.
async fn refuse(mut tcp: TcpStream, cap: usize) {
    let body = serde_json::to_string(
        &ApiError::unavailable(format!("the server has its limit of {cap} open connections; retry shortly")).body(),
    )
    .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: \
         close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let deadline = Duration::from_millis(500);
    let _ = tokio::time::timeout(deadline, async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < 64 * 1024 {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

/// `requested`, lowered so that that many connections fit in this process's file-descriptor limit (raised
/// to its hard limit first, as a server should).
fn connection_cap(requested: usize) -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return requested;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let fits = usize::try_from(limit.rlim_cur.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX).max(1);
    if fits < requested {
        tracing::warn!(
            "at most {fits} HTTP connections fit in the file-descriptor limit of {} (ulimit -n); raise it to allow \
             --max-connections {requested}",
            limit.rlim_cur
        );
    }
    requested.min(fits)
}
