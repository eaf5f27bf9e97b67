use super::*;
use crate::core::protocol::ext_proc::{HeaderValue, HttpBody, HttpHeaders, HttpTrailers};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Picks the first endpoint of the subset (or `default`), records what it was asked, and counts the
/// picks still held.
/// What the picker was asked: path, body, subset.
type Asked = (String, Vec<u8>, Option<Vec<String>>);

struct FakePicker {
    asked: Mutex<Vec<Asked>>,
    held: Arc<AtomicUsize>,
    refuse: Option<Refusal>,
}

struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FakePicker {
    fn new(refuse: Option<Refusal>) -> Arc<Self> {
        Arc::new(Self { asked: Mutex::default(), held: Arc::default(), refuse })
    }
}

impl Picker for FakePicker {
    fn pick(&self, request: PickRequest) -> BoxFuture<'static, Result<Pick, Refusal>> {
        self.asked.lock().unwrap().push((request.path, request.body.to_vec(), request.subset.clone()));
        let outcome = match &self.refuse {
            Some(refusal) => Err(refusal.clone()),
            None => {
                self.held.fetch_add(1, Ordering::SeqCst);
                let endpoint = request.subset.and_then(|s| s.first().cloned()).unwrap_or("10.0.0.1:8000".into());
                Ok(Pick {
                    endpoint,
                    headers: vec![(crate::core::protocol::openai::WORKER_ID_HEADER.into(), "7".into())],
                    held: Box::new(Held(self.held.clone())),
                })
            }
        };
        Box::pin(async move { outcome })
    }
}

fn headers(path: &str, end_of_stream: bool, subset: Option<prost_types::Value>) -> ProcessingRequest {
    let header =
        |key: &str, value: &str| HeaderValue { key: key.into(), value: String::new(), raw_value: value.into() };
    let metadata_context = subset.map(|subset| Metadata {
        filter_metadata: [(
            SUBSET_NAMESPACE.to_string(),
            prost_types::Struct { fields: [(SUBSET_KEY.to_string(), subset)].into() },
        )]
        .into(),
    });
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers: vec![header(":method", "POST"), header(":path", path)] }),
            end_of_stream,
        })),
        metadata_context,
        observability_mode: false,
    }
}

fn body(bytes: &[u8], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestBody(HttpBody { body: bytes.to_vec(), end_of_stream })),
        metadata_context: None,
        observability_mode: false,
    }
}

fn message(request: Request) -> ProcessingRequest {
    ProcessingRequest { request: Some(request), metadata_context: None, observability_mode: false }
}

/// The destination header and metadata of a headers answer.
fn destination(answer: &ProcessingResponse) -> (String, String, bool) {
    let Some(Response::RequestHeaders(HeadersResponse { response: Some(common) })) = &answer.response else {
        panic!("not a headers answer: {answer:?}")
    };
    let set = &common.header_mutation.as_ref().unwrap().set_headers;
    let header = set.iter().find_map(|h| h.header.as_ref().filter(|h| h.key == DESTINATION)).unwrap();
    let metadata = answer.dynamic_metadata.as_ref().unwrap().fields[LB_NAMESPACE].kind.clone();
    let Some(Kind::StructValue(lb)) = metadata else { panic!("{metadata:?}") };
    let Some(Kind::StringValue(in_metadata)) = lb.fields[DESTINATION].kind.clone() else { panic!("{lb:?}") };
    (String::from_utf8(header.raw_value.clone()).unwrap(), in_metadata, common.clear_route_cache)
}

fn streamed_chunk(answer: &ProcessingResponse) -> (Vec<u8>, bool) {
    let (Some(Response::RequestBody(BodyResponse { response: Some(common) }))
    | Some(Response::ResponseBody(BodyResponse { response: Some(common) }))) = &answer.response
    else {
        panic!("not a body answer: {answer:?}")
    };
    let Some(Mutation::StreamedResponse(chunk)) = common.body_mutation.as_ref().and_then(|m| m.mutation.clone()) else {
        panic!("not streamed: {common:?}")
    };
    (chunk.body, chunk.end_of_stream)
}

#[tokio::test]
async fn a_request_is_picked_once_whole_its_body_goes_on_and_its_pick_is_held_until_the_response_ends() {
    let picker = FakePicker::new(None);
    let mut exchange = Exchange::new(picker.clone(), 1 << 20);
    assert!(exchange.on(headers("/v1/completions", false, None)).await.unwrap().is_empty());
    // A body longer than one chunk, in two pieces: nothing is answered until its end.
    let text = vec![b'a'; CHUNK + 10];
    assert!(exchange.on(body(&text[..100], false)).await.unwrap().is_empty());
    let answers = exchange.on(body(&text[100..], true)).await.unwrap();
    assert_eq!(picker.asked.lock().unwrap()[0], ("/v1/completions".to_string(), text.clone(), None));
    assert_eq!(answers.len(), 3, "headers, then the body in two chunks");
    assert_eq!(destination(&answers[0]), ("10.0.0.1:8000".into(), "10.0.0.1:8000".into(), true));
    let (first, last) = (streamed_chunk(&answers[1]), streamed_chunk(&answers[2]));
    assert_eq!((first.0.len(), first.1, last.0.len(), last.1), (CHUNK, false, 10, true));
    assert_eq!(picker.held.load(Ordering::SeqCst), 1);

    // The response passes through; its end gives the pick back.
    let answers = exchange.on(message(Request::ResponseHeaders(HttpHeaders::default()))).await.unwrap();
    assert!(matches!(answers[0].response, Some(Response::ResponseHeaders(_))));
    let answers =
        exchange.on(message(Request::ResponseBody(HttpBody { body: b"data: x".to_vec(), end_of_stream: false }))).await;
    assert_eq!(streamed_chunk(&answers.unwrap()[0]), (b"data: x".to_vec(), false));
    assert_eq!(picker.held.load(Ordering::SeqCst), 1);
    let answers = exchange.on(message(Request::ResponseBody(HttpBody { body: Vec::new(), end_of_stream: true }))).await;
    assert_eq!(streamed_chunk(&answers.unwrap()[0]), (Vec::new(), true));
    assert_eq!(picker.held.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_gateways_subset_is_passed_on_as_a_list_or_a_comma_string() {
    let picker = FakePicker::new(None);
    let list = prost_types::Value {
        kind: Some(Kind::ListValue(prost_types::ListValue {
            values: vec![prost_types::Value { kind: Some(string("10.0.0.9:8000")) }],
        })),
    };
    let mut first = Exchange::new(picker.clone(), 1 << 20);
    let answers = first.on(headers("/v1/models", true, Some(list))).await.unwrap();
    assert_eq!(destination(&answers[0]).0, "10.0.0.9:8000");
    let comma = prost_types::Value { kind: Some(string("10.0.0.2:8000, 10.0.0.3:8000")) };
    let mut exchange = Exchange::new(picker.clone(), 1 << 20);
    exchange.on(headers("/v1/completions", true, Some(comma))).await.unwrap();
    let asked = picker.asked.lock().unwrap();
    assert_eq!(asked[1].2.as_deref(), Some(&["10.0.0.2:8000".to_string(), "10.0.0.3:8000".to_string()][..]));
    // A stream that ends holds nothing.
    drop(asked);
    drop((first, exchange));
    assert_eq!(picker.held.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_refusal_an_oversized_body_and_a_bad_sequence_are_answered_not_crashed_on() {
    let refusal = Refusal::from(crate::core::frontend::ApiError::unavailable("no worker"));
    let mut exchange = Exchange::new(FakePicker::new(Some(refusal.clone())), 1 << 20);
    exchange.on(headers("/v1/completions", false, None)).await.unwrap();
    let answers = exchange.on(body(b"{}", true)).await.unwrap();
    let Some(Response::ImmediateResponse(immediate)) = &answers[0].response else { panic!("{answers:?}") };
    assert_eq!((immediate.status.as_ref().unwrap().code, immediate.body.clone()), (503, refusal.body));
    // After an immediate response nothing more is answered.
    assert!(exchange.on(message(Request::ResponseHeaders(HttpHeaders::default()))).await.unwrap().is_empty());

    let mut exchange = Exchange::new(FakePicker::new(None), 8);
    exchange.on(headers("/v1/completions", false, None)).await.unwrap();
    let answers = exchange.on(body(b"0123456789", false)).await.unwrap();
    let Some(Response::ImmediateResponse(immediate)) = &answers[0].response else { panic!("{answers:?}") };
    assert_eq!(immediate.status.as_ref().unwrap().code, 413);
    // The frontend's own error body.
    let error: serde_json::Value = serde_json::from_slice(&immediate.body).unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("larger than 8 bytes"), "{error}");

    let mut exchange = Exchange::new(FakePicker::new(None), 8);
    let error = exchange.on(body(b"{}", true)).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    let error = exchange.on(ProcessingRequest::default()).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    exchange.on(headers("/", false, None)).await.unwrap();
    assert!(exchange.on(headers("/", false, None)).await.is_err());
    let trailers = exchange.on(message(Request::RequestTrailers(HttpTrailers::default()))).await.unwrap();
    assert!(matches!(trailers[0].response, Some(Response::RequestTrailers(_))));
}
