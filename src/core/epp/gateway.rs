//! The gateway's side of the stream, as Envoy configured as GAIE's sends it: headers, then the body. What
//! `dynamo bench epp` drives and the tests play.
use super::{DESTINATION, PROCESS_PATH, SUBSET_KEY, SUBSET_NAMESPACE};
use crate::core::protocol::ext_proc::{
    HeaderMap, HeaderValue, HttpBody, HttpHeaders, Metadata, ProcessingRequest, ProcessingResponse, Request, Response,
};

#[derive(Clone)]
pub struct Gateway {
    client: tonic::client::Grpc<tonic::transport::Channel>,
}

impl Gateway {
    /// One HTTP/2 connection to the picker, over which every exchange is a stream (as Envoy multiplexes).
    pub async fn connect(endpoint: tonic::transport::Endpoint) -> Result<Self, String> {
        let channel = endpoint.connect().await.map_err(|e| format!("cannot reach the picker: {e:?}"))?;
        Ok(Self { client: tonic::client::Grpc::new(channel) })
    }

    /// The picker's first answer to `messages`, or the gRPC status it ended the stream with.
    pub async fn exchange(&self, messages: Vec<ProcessingRequest>) -> Result<ProcessingResponse, tonic::Status> {
        let mut client = self.client.clone();
        client.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<ProcessingRequest, ProcessingResponse>::default();
        let path = axum::http::uri::PathAndQuery::from_static(PROCESS_PATH);
        let requests = tonic::Request::new(futures::stream::iter(messages));
        let mut answers = client.streaming(requests, path, codec).await?.into_inner();
        answers.message().await?.ok_or_else(|| tonic::Status::unknown("the stream ended unanswered"))
    }
}

/// A POST to `path` with `body`, as its headers then its body, with the gateway's candidate `subset`.
pub fn post(path: &str, body: &[u8], subset: Option<&str>) -> Vec<ProcessingRequest> {
    let header =
        |key: &str, value: &str| HeaderValue { key: key.into(), value: String::new(), raw_value: value.into() };
    let metadata_context = subset.map(|subset| {
        let value = prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(subset.into())) };
        let hint = prost_types::Struct { fields: [(SUBSET_KEY.to_string(), value)].into() };
        Metadata { filter_metadata: [(SUBSET_NAMESPACE.to_string(), hint)].into() }
    });
    let headers = vec![header(":method", "POST"), header(":path", path), header("content-type", "application/json")];
    vec![
        ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap { headers }),
                end_of_stream: false,
            })),
            metadata_context,
            observability_mode: false,
        },
        ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody { body: body.to_vec(), end_of_stream: true })),
            metadata_context: None,
            observability_mode: false,
        },
    ]
}

/// The destination a headers answer names; `None` for any other answer.
pub fn destination(answer: &ProcessingResponse) -> Option<String> {
    let Some(Response::RequestHeaders(headers)) = &answer.response else { return None };
    let mutation = headers.response.as_ref()?.header_mutation.as_ref()?;
    let header = mutation.set_headers.iter().find_map(|h| h.header.as_ref().filter(|h| h.key == DESTINATION))?;
    String::from_utf8(header.raw_value.clone()).ok()
}
