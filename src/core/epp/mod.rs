//! The Gateway API Inference Extension's endpoint picker (`dynamo route --epp-port`): Envoy's ext_proc
//! gRPC stream, one per HTTP request, answered as GAIE's protocol asks with the gateway's ext_proc filter
//! configured as GAIE configures it (request and response bodies `FULL_DUPLEX_STREAMED`):
//!
//! - the request's headers and body are read whole (bounded), then a worker is picked (`Picker`);
//! - the headers answer names it in `x-gateway-destination-endpoint` (and the same value in dynamic
//!   metadata `envoy.lb`), clears the route cache, and the body is sent on unchanged in chunks;
//! - the gateway's `envoy.lb.subset_hint` limits the candidates (503 when none of them is eligible); a
//!   refusal is an `ImmediateResponse` with the frontend's status and JSON error;
//! - the response passes through; the pick stays charged to the worker's load until the response ends
//!   (its last body chunk or trailers), or the stream does.
//!
//! Served over TLS with a certificate made at start-up (self-signed: GAIE's gateways do not verify it), or
//! one given, or over h2c; and the gRPC health service on a plaintext port of its own, as GAIE's pickers do
//! (`liveness` at once; `readiness` and the ext_proc service once a worker has joined).
use crate::core::frontend::ApiError;
use crate::core::protocol::ext_proc::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMap, HeaderMutation, HeaderValueOption, HeadersResponse,
    HttpStatus, ImmediateResponse, Metadata, Mutation, PROCESS_PATH, ProcessingRequest, ProcessingResponse, Request,
    Response, SERVICE_NAME, StreamedBodyResponse, TrailersResponse,
};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use prost_types::value::Kind;
use std::pin::Pin;
use std::sync::Arc;

mod frontend;
pub mod gateway;
pub use frontend::FrontendPicker;

/// The header (and `envoy.lb` metadata key) that names the destination.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The gateway's candidate subset: metadata namespace and key.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// The namespace of the destination in dynamic metadata.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Body chunks sent back are at most this long (GAIE's limit, under Envoy's 64 KiB frame).
pub const CHUNK: usize = 62_000;

/// What a request asks of the picker.
pub struct PickRequest {
    /// `:path`, with its query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
    /// `host:port` of the only endpoints allowed, when the gateway gave a subset.
    pub subset: Option<Vec<String>>,
}

/// A worker picked: where to send the request, headers to add, and the charge held until the response ends.
pub struct Pick {
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub held: Box<dyn Send + Sync>,
}

/// No worker for this request: the status and JSON body the client gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The frontend's error, status and body, as the client would get it from the frontend itself.
impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self { status: error.status.as_u16(), body: serde_json::to_vec(&error.body()).unwrap_or_default() }
    }
}

pub trait Picker: Send + Sync + 'static {
    fn pick(&self, request: PickRequest) -> BoxFuture<'static, Result<Pick, Refusal>>;
}

/// One HTTP request's exchange with the gateway.
struct Exchange {
    picker: Arc<dyn Picker>,
    max_body: usize,
    headers: Option<HeaderMap>,
    subset: Option<Vec<String>>,
    body: Vec<u8>,
    picked: Option<Pick>,
    /// An immediate response was sent: nothing more is answered.
    over: bool,
}

impl Exchange {
    fn new(picker: Arc<dyn Picker>, max_body: usize) -> Self {
        Self { picker, max_body, headers: None, subset: None, body: Vec::new(), picked: None, over: false }
    }

    /// The answers to one message of the gateway (none while the request's body is still coming).
    async fn on(&mut self, message: ProcessingRequest) -> Result<Vec<ProcessingResponse>, tonic::Status> {
        if self.over || message.observability_mode {
            return Ok(Vec::new());
        }
        if let Some(subset) = message.metadata_context.as_ref().and_then(subset_of) {
            self.subset = Some(subset);
        }
        let Some(request) = message.request else {
            return Err(tonic::Status::invalid_argument("a ProcessingRequest without a request"));
        };
        match request {
            Request::RequestHeaders(headers) => {
                if self.headers.is_some() {
                    return Err(tonic::Status::invalid_argument("request headers came twice"));
                }
                self.headers = Some(headers.headers.unwrap_or_default());
                if headers.end_of_stream {
                    return Ok(self.pick().await);
                }
                Ok(Vec::new())
            }
            Request::RequestBody(body) => {
                if self.headers.is_none() || self.picked.is_some() {
                    return Err(tonic::Status::invalid_argument("a request body before its headers, or after its end"));
                }
                if self.body.len() + body.body.len() > self.max_body {
                    self.over = true;
                    let message = format!("the request body is larger than {} bytes", self.max_body);
                    return Ok(vec![immediate(&ApiError::too_large(message).into())]);
                }
                self.body.extend_from_slice(&body.body);
                if body.end_of_stream {
                    return Ok(self.pick().await);
                }
                Ok(Vec::new())
            }
            Request::RequestTrailers(_) => Ok(vec![response(Response::RequestTrailers(TrailersResponse::default()))]),
            Request::ResponseHeaders(headers) => {
                if headers.end_of_stream {
                    self.picked = None;
                }
                Ok(vec![response(Response::ResponseHeaders(HeadersResponse::default()))])
            }
            Request::ResponseBody(body) => {
                if body.end_of_stream {
                    self.picked = None;
                }
                let chunk = StreamedBodyResponse { body: body.body, end_of_stream: body.end_of_stream };
                Ok(vec![response(Response::ResponseBody(streamed(chunk)))])
            }
            Request::ResponseTrailers(_) => {
                self.picked = None;
                Ok(vec![response(Response::ResponseTrailers(TrailersResponse::default()))])
            }
        }
    }

    /// Picks for the whole request: the headers answer, then the body sent on.
    async fn pick(&mut self) -> Vec<ProcessingResponse> {
        let headers = self.headers.clone().unwrap_or_default();
        let path = headers.get(":path").unwrap_or_default();
        let body = bytes::Bytes::from(std::mem::take(&mut self.body));
        let request = PickRequest { path, headers, body: body.clone(), subset: self.subset.clone() };
        let pick = match self.picker.pick(request).await {
            Ok(pick) => pick,
            Err(refusal) => {
                self.over = true;
                return vec![immediate(&refusal)];
            }
        };
        let mut set_headers = vec![HeaderValueOption::set(DESTINATION, &pick.endpoint)];
        set_headers.extend(pick.headers.iter().map(|(key, value)| HeaderValueOption::set(key, value)));
        let headers = ProcessingResponse {
            response: Some(Response::RequestHeaders(HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation { set_headers, remove_headers: Vec::new() }),
                    clear_route_cache: true,
                    ..Default::default()
                }),
            })),
            dynamic_metadata: Some(structure([(
                LB_NAMESPACE,
                Kind::StructValue(structure([(DESTINATION, string(&pick.endpoint))])),
            )])),
        };
        self.picked = Some(pick);
        let mut answers = vec![headers];
        if !body.is_empty() {
            let chunks: Vec<&[u8]> = body.chunks(CHUNK).collect();
            for (at, chunk) in chunks.iter().enumerate() {
                let chunk = StreamedBodyResponse { body: chunk.to_vec(), end_of_stream: at + 1 == chunks.len() };
                answers.push(response(Response::RequestBody(streamed(chunk))));
            }
        }
        answers
    }
}

fn response(response: Response) -> ProcessingResponse {
    ProcessingResponse { response: Some(response), dynamic_metadata: None }
}

fn streamed(chunk: StreamedBodyResponse) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation { mutation: Some(Mutation::StreamedResponse(chunk)) }),
            ..Default::default()
        }),
    }
}

fn immediate(refusal: &Refusal) -> ProcessingResponse {
    response(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code: i32::from(refusal.status) }),
        headers: Some(HeaderMutation {
            set_headers: vec![HeaderValueOption::set("content-type", "application/json")],
            remove_headers: Vec::new(),
        }),
        body: refusal.body.clone(),
        details: "dynamo_endpoint_picker".into(),
    }))
}

fn string(value: &str) -> Kind {
    Kind::StringValue(value.to_string())
}

fn structure<'a>(fields: impl IntoIterator<Item = (&'a str, Kind)>) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields.into_iter().map(|(k, v)| (k.to_string(), prost_types::Value { kind: Some(v) })).collect(),
    }
}

/// The gateway's subset: a list of `host:port` strings, or one comma-separated string.
fn subset_of(metadata: &Metadata) -> Option<Vec<String>> {
    let value = metadata.filter_metadata.get(SUBSET_NAMESPACE)?.fields.get(SUBSET_KEY)?;
    let split = |text: &str| text.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect();
    match value.kind.as_ref()? {
        Kind::StringValue(text) => Some(split(text)),
        Kind::ListValue(list) => Some(
            (list.values.iter())
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(text)) => Some(split(text)),
                    _ => None,
                })
                .flatten()
                .collect(),
        ),
        _ => None,
    }
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, tonic::Status>> + Send>>;

/// The ext_proc service, for a gRPC server.
#[derive(Clone)]
pub struct ExternalProcessor {
    picker: Arc<dyn Picker>,
    max_body: usize,
}

impl ExternalProcessor {
    pub fn new(picker: Arc<dyn Picker>, max_body: usize) -> Self {
        Self { picker, max_body }
    }

    /// Answers one gateway stream: each message in turn, until the gateway ends it or a message is bad.
    /// Driven by the response stream itself (no task of its own): a gateway that goes away drops it, and
    /// the pick it holds with it.
    fn process(&self, messages: tonic::Streaming<ProcessingRequest>) -> Answers {
        let exchange = Exchange::new(self.picker.clone(), self.max_body);
        let state = (messages, exchange, std::collections::VecDeque::new(), false);
        let answers =
            futures::stream::unfold(state, |(mut messages, mut exchange, mut queued, mut ended)| async move {
                loop {
                    if let Some(answer) = queued.pop_front() {
                        return Some((Ok(answer), (messages, exchange, queued, ended)));
                    }
                    if ended {
                        return None;
                    }
                    let failed = match messages.message().await {
                        Ok(Some(message)) => match exchange.on(message).await {
                            Ok(answers) => {
                                queued.extend(answers);
                                continue;
                            }
                            Err(status) => status,
                        },
                        Ok(None) => return None,
                        Err(status) => status,
                    };
                    ended = true;
                    return Some((Err(failed), (messages, exchange, queued, ended)));
                }
            });
        Box::pin(answers)
    }
}

impl tonic::server::NamedService for ExternalProcessor {
    const NAME: &'static str = SERVICE_NAME;
}

struct Process(ExternalProcessor);

impl tonic::server::StreamingService<ProcessingRequest> for Process {
    type Response = ProcessingResponse;
    type ResponseStream = Answers;
    type Future = BoxFuture<'static, Result<tonic::Response<Answers>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<ProcessingRequest>>) -> Self::Future {
        let answers = self.0.process(request.into_inner());
        Box::pin(async move { Ok(tonic::Response::new(answers)) })
    }
}

impl tower::Service<axum::http::Request<tonic::body::Body>> for ExternalProcessor {
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != PROCESS_PATH {
            let status = tonic::Status::unimplemented(format!("{} is not served here", request.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let service = Process(self.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<ProcessingResponse, ProcessingRequest>::default();
            Ok(tonic::server::Grpc::new(codec).streaming(service, request).await)
        })
    }
}

/// Where and how the picker is served.
#[derive(Debug, Clone)]
pub struct EppSettings {
    pub listen: std::net::SocketAddr,
    /// The plaintext gRPC health service's address.
    pub health: Option<std::net::SocketAddr>,
    pub tls: Tls,
}

/// How the picker's gRPC is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// h2c: plaintext HTTP/2.
    Insecure,
    /// A certificate made at start-up for these names (and IPs), self-signed.
    SelfSigned(Vec<String>),
    /// A certificate chain and its key, PEM files.
    Files { certificate: std::path::PathBuf, key: std::path::PathBuf },
}

impl Tls {
    /// The certificate chain and key to serve; `None` for h2c.
    pub fn identity(&self) -> Result<Option<tonic::transport::Identity>, String> {
        match self {
            Tls::Insecure => Ok(None),
            Tls::SelfSigned(names) => {
                let made = rcgen::generate_simple_self_signed(names.clone())
                    .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
                Ok(Some(tonic::transport::Identity::from_pem(made.cert.pem(), made.signing_key.serialize_pem())))
            }
            Tls::Files { certificate, key } => {
                let read = |path: &std::path::Path| {
                    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
                };
                Ok(Some(tonic::transport::Identity::from_pem(read(certificate)?, read(key)?)))
            }
        }
    }
}

/// Serves the picker on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    processor: ExternalProcessor,
    identity: Option<tonic::transport::Identity>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let mut server = tonic::transport::Server::builder();
    if let Some(identity) = identity {
        let config = tonic::transport::ServerTlsConfig::new().identity(identity);
        server = server.tls_config(config).map_err(|e| format!("the certificate or key is not usable: {e}"))?;
    }
    server
        .add_service(processor)
        .serve_with_incoming_shutdown(accepted(listener), shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// The connections `listener` accepts, with Nagle's algorithm off: an answer is a few small frames, and
/// held back for the gateway's ACK (which waits for its next request) it took as long as the gap between
/// requests, 10 ms at 100 picks/s.
fn accepted(listener: tokio::net::TcpListener) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// The gRPC health service (`grpc.health.v1.Health`) for the picker: `liveness` serving from the start,
/// `readiness` and the ext_proc service once `ready` is called.
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
}

impl Health {
    pub async fn serve(listener: tokio::net::TcpListener) -> (Self, crate::core::AbortOnDrop) {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("liveness", tonic_health::ServingStatus::Serving).await;
        for name in ["readiness", SERVICE_NAME] {
            reporter.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
        }
        let task = tokio::spawn(async move {
            let served =
                tonic::transport::Server::builder().add_service(service).serve_with_incoming(accepted(listener)).await;
            if let Err(error) = served {
                tracing::error!("the endpoint picker's health service stopped: {error}");
            }
        });
        (Self { reporter }, crate::core::AbortOnDrop(task))
    }

    pub async fn ready(&self) {
        for name in ["readiness", SERVICE_NAME] {
            self.reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
        }
    }
}

#[cfg(test)]
mod tests;
