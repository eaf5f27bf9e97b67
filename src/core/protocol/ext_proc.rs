//! Envoy's external processing protocol (`envoy.service.ext_proc.v3.ExternalProcessor/Process`), the part
//! a Gateway API endpoint picker speaks: the messages written out with prost's derive, with the field
//! numbers of Envoy's `external_processor.proto`, `config/core/v3/base.proto` and `type/v3/http_status.proto`.
//! Fields this project never reads or writes are left out; prost skips them on the wire.
use prost_types::Struct;
use std::collections::HashMap;

/// The gRPC method's path.
pub const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";
/// The service's name, as gRPC health and reflection know it.
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// `envoy.config.core.v3.HeaderValue`: Envoy sends values in `raw_value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD`.
pub const OVERWRITE_IF_EXISTS_OR_ADD: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueOption {
    #[prost(message, optional, tag = "1")]
    pub header: Option<HeaderValue>,
    #[prost(int32, tag = "3")]
    pub append_action: i32,
}

/// `envoy.config.core.v3.Metadata`: filter namespace → values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(map = "string, message", tag = "1")]
    pub filter_metadata: HashMap<String, Struct>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingRequest {
    #[prost(oneof = "Request", tags = "2, 3, 4, 5, 6, 7")]
    pub request: Option<Request>,
    #[prost(message, optional, tag = "8")]
    pub metadata_context: Option<Metadata>,
    /// The server must not answer (Envoy only observes).
    #[prost(bool, tag = "10")]
    pub observability_mode: bool,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "2")]
    RequestHeaders(HttpHeaders),
    #[prost(message, tag = "3")]
    ResponseHeaders(HttpHeaders),
    #[prost(message, tag = "4")]
    RequestBody(HttpBody),
    #[prost(message, tag = "5")]
    ResponseBody(HttpBody),
    #[prost(message, tag = "6")]
    RequestTrailers(HttpTrailers),
    #[prost(message, tag = "7")]
    ResponseTrailers(HttpTrailers),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpHeaders {
    #[prost(message, optional, tag = "1")]
    pub headers: Option<HeaderMap>,
    #[prost(bool, tag = "3")]
    pub end_of_stream: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpBody {
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub end_of_stream: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpTrailers {
    #[prost(message, optional, tag = "1")]
    pub trailers: Option<HeaderMap>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingResponse {
    #[prost(oneof = "Response", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub response: Option<Response>,
    #[prost(message, optional, tag = "8")]
    pub dynamic_metadata: Option<Struct>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    RequestHeaders(HeadersResponse),
    #[prost(message, tag = "2")]
    ResponseHeaders(HeadersResponse),
    #[prost(message, tag = "3")]
    RequestBody(BodyResponse),
    #[prost(message, tag = "4")]
    ResponseBody(BodyResponse),
    #[prost(message, tag = "5")]
    RequestTrailers(TrailersResponse),
    #[prost(message, tag = "6")]
    ResponseTrailers(TrailersResponse),
    #[prost(message, tag = "7")]
    ImmediateResponse(ImmediateResponse),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeadersResponse {
    #[prost(message, optional, tag = "1")]
    pub response: Option<CommonResponse>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BodyResponse {
    #[prost(message, optional, tag = "1")]
    pub response: Option<CommonResponse>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TrailersResponse {
    #[prost(message, optional, tag = "1")]
    pub header_mutation: Option<HeaderMutation>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CommonResponse {
    /// 0: CONTINUE.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(message, optional, tag = "2")]
    pub header_mutation: Option<HeaderMutation>,
    #[prost(message, optional, tag = "3")]
    pub body_mutation: Option<BodyMutation>,
    #[prost(bool, tag = "5")]
    pub clear_route_cache: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMutation {
    #[prost(message, repeated, tag = "1")]
    pub set_headers: Vec<HeaderValueOption>,
    #[prost(string, repeated, tag = "2")]
    pub remove_headers: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BodyMutation {
    #[prost(oneof = "Mutation", tags = "1, 2, 3")]
    pub mutation: Option<Mutation>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Mutation {
    #[prost(bytes, tag = "1")]
    Body(Vec<u8>),
    #[prost(bool, tag = "2")]
    ClearBody(bool),
    /// A chunk of the body sent on in FULL_DUPLEX_STREAMED mode.
    #[prost(message, tag = "3")]
    StreamedResponse(StreamedBodyResponse),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamedBodyResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    #[prost(bool, tag = "2")]
    pub end_of_stream: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImmediateResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<HttpStatus>,
    #[prost(message, optional, tag = "2")]
    pub headers: Option<HeaderMutation>,
    #[prost(bytes = "vec", tag = "3")]
    pub body: Vec<u8>,
    #[prost(string, tag = "5")]
    pub details: String,
}

/// `envoy.type.v3.HttpStatus`: the code is the HTTP status itself.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
}

impl HeaderMap {
    /// The value of header `name` (lower case, as Envoy sends them), from `raw_value` or else `value`.
    pub fn get(&self, name: &str) -> Option<String> {
        let header = self.headers.iter().find(|h| h.key == name)?;
        Some(if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8_lossy(&header.raw_value).into_owned()
        })
    }
}

impl HeaderValueOption {
    /// Sets `key` to `value`, replacing any value it had.
    pub fn set(key: &str, value: &str) -> Self {
        Self {
            header: Some(HeaderValue { key: key.into(), value: String::new(), raw_value: value.as_bytes().to_vec() }),
            append_action: OVERWRITE_IF_EXISTS_OR_ADD,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Bytes as protoc writes them for the same messages (field numbers and wire types checked by hand
    /// against Envoy's protos): a request-headers message with one raw header and end_of_stream, and a
    /// streamed body chunk.
    #[test]
    fn messages_have_envoys_field_numbers() {
        let request = ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue { key: ":path".into(), value: String::new(), raw_value: b"/v".to_vec() }],
                }),
                end_of_stream: true,
            })),
            metadata_context: None,
            observability_mode: false,
        };
        // 0x12: field 2 (request_headers), length-delimited; inside, 0x0a: field 1 (headers), then
        // 0x0a: HeaderValue, its 0x0a key ":path" and 0x1a raw_value "/v"; 0x18 0x01: end_of_stream.
        let expected = [
            0x12, 0x11, 0x0a, 0x0d, 0x0a, 0x0b, 0x0a, 0x05, b':', b'p', b'a', b't', b'h', 0x1a, 0x02, b'/', b'v', 0x18,
            0x01,
        ];
        assert_eq!(request.encode_to_vec(), expected);
        let chunk = BodyMutation {
            mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                body: b"x".to_vec(),
                end_of_stream: true,
            })),
        };
        // 0x1a: field 3 (streamed_response); 0x0a body "x"; 0x10 0x01: end_of_stream.
        assert_eq!(chunk.encode_to_vec(), [0x1a, 0x05, 0x0a, 0x01, b'x', 0x10, 0x01]);
        let immediate = ProcessingResponse {
            response: Some(Response::ImmediateResponse(ImmediateResponse {
                status: Some(HttpStatus { code: 503 }),
                ..Default::default()
            })),
            dynamic_metadata: None,
        };
        // 0x3a: field 7 (immediate_response); 0x0a status { 0x08 code 503 as a varint }.
        assert_eq!(immediate.encode_to_vec(), [0x3a, 0x05, 0x0a, 0x03, 0x08, 0xf7, 0x03]);
    }
}
