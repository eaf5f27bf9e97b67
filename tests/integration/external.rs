//! `dynamo decode --engine vllm` in front of an engine double: a server on loopback that speaks vLLM's
//! OpenAI API as the worker uses it (token-id prompts, `return_token_ids`, logprobs keyed `token_id:N`, usage
//! with cached tokens, `/v1/models` with `max_model_len`, `vllm:` gauges on `/metrics`) and publishes KV events
//! as vLLM 0.26+ does (`[topic, seq, msgpack [ts, [{"type": "BlockStored", …}], rank]]`). Its tokens follow a
//! fixed rule, so what a client gets through the router can be told apart from anything else.
use crate::cluster::{cluster_file, route, route_with, wait_for_workers};
use crate::util::{Server, Worker, dynamo, metric};
use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: usize = 16;
const MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-chat");

/// The double's next token after `last`: a rule no real model follows, within tiny-chat's vocabulary and
/// never its EOS (2).
fn next_token(last: u32) -> u32 {
    (last * 7 + 3) % 900 + 10
}

#[derive(Default)]
struct DoubleState {
    requests: Mutex<Vec<Value>>,
    running: AtomicU64,
    aborted: AtomicU64,
    /// Answers 503 to everything while set (a restarting engine).
    down: AtomicBool,
    /// Answers this many more `/metrics` reads with a 503 (a busy engine's server, slow to answer).
    metrics_failures: AtomicU64,
    token_delay_ms: AtomicU64,
    events: Mutex<Option<(zmq::Socket, u64)>>,
    /// Cuts the next stream (of whichever double shares it) off after two tokens, as an engine that dies does.
    cut_next: Arc<AtomicBool>,
    /// TensorRT-LLM's events since the last `POST /kv_cache_events`.
    trtllm_events: Mutex<Vec<Value>>,
    /// LoRA adapters it serves, listed in `/v1/models` as vLLM lists `--lora-modules`.
    adapters: Mutex<Vec<String>>,
    /// Data-parallel ranks 1 and up (`Double::start_ranked`): each its publisher on the port after the one
    /// before, as vLLM offsets them.
    ranks: Mutex<Vec<(zmq::Socket, u64)>>,
    /// Each completion's `X-data-parallel-rank` header.
    pinned: Mutex<Vec<Option<String>>>,
}

struct Double {
    base: String,
    kv_events: String,
    state: Arc<DoubleState>,
    _context: zmq::Context,
}

impl Double {
    async fn start() -> Double {
        Self::start_sharing(Arc::default()).await
    }

    /// A double that cuts the next stream off when `cut_next` is set, the flag shared with other doubles.
    async fn start_sharing(cut_next: Arc<AtomicBool>) -> Double {
        let context = zmq::Context::new();
        let publisher = context.socket(zmq::PUB).expect("a PUB socket");
        publisher.bind("tcp://127.0.0.1:*").expect("binds");
        let kv_events = publisher.get_last_endpoint().expect("endpoint").expect("utf-8");
        let state =
            Arc::new(DoubleState { events: Mutex::new(Some((publisher, 0))), cut_next, ..DoubleState::default() });
        let app = axum::Router::new()
            .route("/v1/models", axum::routing::get(models))
            .route("/metrics", axum::routing::get(gauges))
            .route("/v1/completions", axum::routing::post(complete))
            .route("/generate", axum::routing::post(generate))
            .route("/prometheus/metrics", axum::routing::get(trtllm_gauges))
            .route("/kv_cache_events", axum::routing::post(trtllm_events))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Double { base, kv_events, state, _context: context }
    }

    fn requests(&self) -> Vec<Value> {
        self.state.requests.lock().unwrap().clone()
    }

    /// A double of a vLLM with `ranks` data-parallel ranks, each publishing its KV events on its own port
    /// (`kv_events`' port + rank) with its rank in the batch; a request runs on the rank its header pins.
    async fn start_ranked(ranks: u16) -> Double {
        // The ports after the first one the system picked are usually free; when one is not, start over.
        for _ in 0..20 {
            let double = Self::start().await;
            let base: u16 = double.kv_events.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("a port");
            let sockets: Option<Vec<(zmq::Socket, u64)>> = (1..ranks)
                .map(|rank| {
                    let socket = double._context.socket(zmq::PUB).expect("a PUB socket");
                    socket.bind(&format!("tcp://127.0.0.1:{}", base.checked_add(rank)?)).ok()?;
                    Some((socket, 0))
                })
                .collect();
            if let Some(sockets) = sockets {
                *double.state.ranks.lock().unwrap() = sockets;
                return double;
            }
        }
        panic!("no {ranks} consecutive free ports for the ranks' publishers");
    }
}

async fn models(State(state): State<Arc<DoubleState>>) -> axum::response::Response {
    if state.down.load(Ordering::Relaxed) {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "restarting").into_response();
    }
    let base = json!({"id": "double/model", "object": "model", "max_model_len": 512, "parent": null});
    let adapters = state.adapters.lock().unwrap().clone();
    let adapters = adapters.iter().map(|name| {
        json!({"id": name, "object": "model", "max_model_len": 512, "root": format!("/loras/{name}"),
               "parent": "double/model"})
    });
    axum::Json(json!({"object": "list", "data": std::iter::once(base).chain(adapters).collect::<Vec<_>>()}))
        .into_response()
}

async fn gauges(State(state): State<Arc<DoubleState>>) -> axum::response::Response {
    let busy = state.metrics_failures.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
    if state.down.load(Ordering::Relaxed) || busy {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "restarting").into_response();
    }
    let running = state.running.load(Ordering::Relaxed);
    format!(
        "# TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"double/model\"}} {running}.0\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"double/model\"}} 0.0\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"double/model\"}} 0.125\n\
         vllm:cache_config_info{{block_size=\"{BLOCK}\",cache_dtype=\"auto\",num_gpu_blocks=\"1024\"}} 1.0\n\
         sglang:num_running_reqs{{tp_rank=\"0\"}} {running}.0\n\
         sglang:num_queue_reqs{{tp_rank=\"0\"}} 0.0\n\
         sglang:token_usage{{tp_rank=\"0\"}} 0.125\n\
         sglang:cache_config_info{{page_size=\"{BLOCK}\",num_pages=\"1024\"}} 1.0\n"
    )
    .into_response()
}

async fn trtllm_gauges(State(state): State<Arc<DoubleState>>) -> String {
    let running = state.running.load(Ordering::Relaxed);
    format!(
        "trtllm_num_requests_running{{model_name=\"m\"}} {running}\ntrtllm_num_requests_waiting{{model_name=\"m\"}} 0\n\
         trtllm_kv_cache_utilization{{model_name=\"m\"}} 0.25\ntrtllm_kv_cache_tokens_per_block {BLOCK}\n\
         trtllm_kv_cache_max_blocks 2048\n"
    )
}

async fn trtllm_events(State(state): State<Arc<DoubleState>>) -> axum::Json<Value> {
    axum::Json(Value::Array(std::mem::take(&mut *state.trtllm_events.lock().unwrap())))
}

/// Counts a stream that was dropped before its end: the client (the worker) went away.
struct Abort {
    state: Arc<DoubleState>,
    finished: bool,
}

impl Drop for Abort {
    fn drop(&mut self) {
        self.state.running.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.state.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn complete(
    State(state): State<Arc<DoubleState>>,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    if state.down.load(Ordering::Relaxed) {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "restarting").into_response();
    }
    state.requests.lock().unwrap().push(body.clone());
    let pinned = headers.get("x-data-parallel-rank").and_then(|v| v.to_str().ok()).map(str::to_string);
    state.pinned.lock().unwrap().push(pinned.clone());
    let rank: usize = pinned.and_then(|r| r.parse().ok()).unwrap_or(0);
    if body["seed"] == 666 {
        let error = json!({"error": {"message": "seed 666 is not allowed here", "code": 400}});
        return (axum::http::StatusCode::BAD_REQUEST, axum::Json(error)).into_response();
    }
    let Some(prompt) = body["prompt"].as_array().map(|p| p.iter().filter_map(|t| t.as_u64()).collect::<Vec<_>>())
    else {
        return (axum::http::StatusCode::BAD_REQUEST, axum::Json(json!({"error": {"message": "prompt must be ids"}})))
            .into_response();
    };
    // Under an adapter the engine keys the prompt's blocks by it, as vLLM does.
    let adapter = body["model"].as_str().filter(|name| state.adapters.lock().unwrap().iter().any(|a| a == name));
    publish_prompt_blocks(&state, &prompt, adapter, rank);
    if body["stream"] == false {
        return prefill_answer(&body, &prompt).into_response();
    }
    state.running.fetch_add(1, Ordering::Relaxed);
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(16);
    let stops: Vec<u64> =
        body["stop_token_ids"].as_array().map_or(vec![], |s| s.iter().filter_map(|t| t.as_u64()).collect());
    let logprobs = body["logprobs"].as_u64();
    let delay = Duration::from_millis(state.token_delay_ms.load(Ordering::Relaxed));
    let first = next_token(*prompt.last().unwrap_or(&0) as u32);
    let guard = Abort { state: state.clone(), finished: false };
    let cached = (prompt.len() / BLOCK * BLOCK) as u64;
    let cut = state.cut_next.clone();
    let chunks = futures::stream::unfold((guard, first, 0u64, false), move |(mut guard, token, sent, done)| {
        let (stops, cut) = (stops.clone(), cut.clone());
        async move {
            if done {
                return None;
            }
            tokio::time::sleep(delay).await;
            if sent == 2 && cut.swap(false, Ordering::Relaxed) {
                return Some((Err(std::io::Error::other("the engine died")), (guard, token, sent, true)));
            }
            let sent = sent + 1;
            let stop = stops.contains(&u64::from(token));
            let finish = if stop {
                json!("stop")
            } else if sent >= max_tokens {
                json!("length")
            } else {
                Value::Null
            };
            let mut choice = json!({"index": 0, "text": "x", "token_ids": [token], "finish_reason": finish,
                                "stop_reason": if stop { json!(token) } else { Value::Null }});
            if let Some(top) = logprobs {
                let alternatives: serde_json::Map<String, Value> = (0..top.max(1))
                    .map(|i| (format!("token_id:{}", token + i as u32), json!(-0.5 - i as f64)))
                    .collect();
                choice["logprobs"] = json!({"tokens": [format!("token_id:{token}")], "token_logprobs": [-0.5],
                                        "top_logprobs": [alternatives], "text_offset": [0]});
            }
            let mut text = format!("data: {}\n\n", json!({"object": "text_completion", "choices": [choice]}));
            let last = !finish.is_null();
            if last {
                guard.finished = true;
                let usage = json!({"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": sent,
                               "prompt_tokens_details": {"cached_tokens": cached}}});
                text.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
            }
            Some((Ok::<_, std::io::Error>(text), (guard, next_token(token), sent, last)))
        }
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(chunks))
        .unwrap()
}

/// A whole (unstreamed) completion, as vLLM's prefill leg answers: with `kv_transfer_params.do_remote_decode`,
/// the parameters a decode engine pulls the prompt's KV with. A TensorRT-LLM `context_only` request is
/// answered with its first token and the `disaggregated_params` the generation leg needs, or, when that token
/// is a stop token, as a finished request.
fn prefill_answer(body: &Value, prompt: &[u64]) -> axum::Json<Value> {
    if body["disaggregated_params"]["request_type"] == "context_only" {
        let first = next_token(*prompt.last().unwrap_or(&0) as u32);
        let stops = body["stop_token_ids"].as_array().cloned().unwrap_or_default();
        let stopped = stops.contains(&json!(first));
        let mut choice = json!({"index": 0, "text": "", "token_ids": [first],
                                "finish_reason": match (stopped, body["max_tokens"] == 1) {
                                    (true, _) => "stop",
                                    (false, true) => "length",
                                    (false, false) => "not_finished",
                                },
                                "stop_reason": if stopped { json!(first) } else { Value::Null }});
        if !stopped {
            choice["disaggregated_params"] = json!({"request_type": "context_only", "first_gen_tokens": [first],
                "ctx_request_id": 77, "encoded_opaque_state": "b3BhcXVlIHN0YXRl", "draft_tokens": null});
        }
        return axum::Json(json!({"object": "text_completion", "choices": [choice], "prompt_token_ids": prompt,
                                 "usage": {"prompt_tokens": prompt.len(), "completion_tokens": 1}}));
    }
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(16) as usize;
    let ids = expected_tokens(*prompt.last().unwrap_or(&0) as u32, max_tokens);
    let mut answer = json!({"object": "text_completion", "choices": [{"index": 0, "text": "x", "token_ids": ids,
                            "finish_reason": "length", "stop_reason": null}],
                            "usage": {"prompt_tokens": prompt.len(), "completion_tokens": max_tokens}});
    if body["kv_transfer_params"]["do_remote_decode"] == true {
        let blocks: Vec<usize> = (0..prompt.len().div_ceil(BLOCK)).collect();
        answer["kv_transfer_params"] = json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_block_ids": blocks, "remote_engine_id": "double-prefill", "remote_request_id": "p-1",
            "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1});
    }
    axum::Json(answer)
}

/// SGLang's `/generate`: `input_ids` in, every chunk's `output_ids` all so far (SGLang's default) with
/// `meta_info` counting them, the stop token kept, `[DONE]` at the end.
async fn generate(
    State(state): State<Arc<DoubleState>>,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    state.requests.lock().unwrap().push(body.clone());
    let prompt: Vec<u64> =
        body["input_ids"].as_array().map_or(vec![], |p| p.iter().filter_map(Value::as_u64).collect());
    publish_prompt_blocks(&state, &prompt, None, 0);
    if body["stream"] == false {
        // SGLang's prefill leg: answered whole.
        let ids = expected_tokens(*prompt.last().unwrap_or(&0) as u32, 1);
        let meta = json!({"finish_reason": {"type": "length", "length": 1}, "completion_tokens": 1});
        return axum::Json(json!({"text": "x", "output_ids": ids, "meta_info": meta})).into_response();
    }
    state.running.fetch_add(1, Ordering::Relaxed);
    let sampling = &body["sampling_params"];
    let max_tokens = sampling["max_new_tokens"].as_u64().unwrap_or(16) as usize;
    let stops: Vec<u64> =
        sampling["stop_token_ids"].as_array().map_or(vec![], |s| s.iter().filter_map(Value::as_u64).collect());
    let cached = (prompt.len() / BLOCK * BLOCK) as u64;
    let guard = Abort { state: state.clone(), finished: false };
    let first = next_token(*prompt.last().unwrap_or(&0) as u32);
    let chunks = futures::stream::unfold(
        (guard, first, Vec::<u32>::new(), false),
        move |(mut guard, token, mut out, done)| {
            let stops = stops.clone();
            async move {
                if done {
                    return None;
                }
                out.push(token);
                let stop = stops.contains(&u64::from(token));
                let finish = if stop {
                    json!({"type": "stop", "matched": token})
                } else if out.len() >= max_tokens {
                    json!({"type": "length", "length": out.len()})
                } else {
                    Value::Null
                };
                let meta = json!({"id": "rid", "finish_reason": finish, "prompt_tokens": 0, "completion_tokens": out.len(),
                              "cached_tokens": cached});
                let mut text = format!("data: {}\n\n", json!({"text": null, "output_ids": out, "meta_info": meta}));
                let last = !finish.is_null();
                if last {
                    guard.finished = true;
                    text.push_str("data: [DONE]\n\n");
                }
                Some((Ok::<_, std::convert::Infallible>(text), (guard, next_token(token), out, last)))
            }
        },
    );
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(chunks))
        .unwrap()
}

/// The prompt's full blocks as one `BlockStored` (vLLM's map encoding, integer hashes chained from the root),
/// under `lora_name` when the prompt ran under an adapter, on data-parallel rank `rank`'s publisher.
fn publish_prompt_blocks(state: &DoubleState, prompt: &[u64], adapter: Option<&str>, rank: usize) {
    use rmpv::Value as M;
    let blocks = prompt.len() / BLOCK;
    if blocks == 0 {
        return;
    }
    let mut hash = 1u64;
    let hashes: Vec<M> = prompt
        .chunks_exact(BLOCK)
        .map(|block| {
            hash = block.iter().fold(hash.wrapping_mul(0x100_0000_01b3), |h, &t| (h ^ t).wrapping_mul(0x100_0000_01b3));
            M::from(hash)
        })
        .collect();
    let tokens: Vec<M> = prompt[..blocks * BLOCK].iter().map(|&t| M::from(t)).collect();
    let event = M::Map(vec![
        (M::from("type"), M::from("BlockStored")),
        (M::from("block_hashes"), M::Array(hashes)),
        (M::from("parent_block_hash"), M::Nil),
        (M::from("token_ids"), M::Array(tokens)),
        (M::from("block_size"), M::from(BLOCK as u64)),
        (M::from("medium"), M::from("GPU")),
        (M::from("lora_name"), adapter.map_or(M::Nil, M::from)),
        // vLLM 0.32 names the adapter among each block's extra keys too.
        (M::from("extra_keys"), M::Array(vec![adapter.map_or(M::Nil, |a| M::Array(vec![M::from(a)])); blocks])),
    ]);
    let batch = M::Array(vec![M::from(1.0), M::Array(vec![event]), M::from(rank as u64)]);
    let mut payload = Vec::new();
    rmpv::encode::write_value(&mut payload, &batch).unwrap();
    // TensorRT-LLM's shape of the same event, for its polled endpoint.
    let blocks: Vec<Value> = prompt
        .chunks_exact(BLOCK)
        .enumerate()
        .map(|(i, block)| {
            let tokens: Vec<Value> =
                block.iter().map(|&t| json!({"type": "unique_token", "token_id": t, "token_extra_id": 0})).collect();
            json!({"type": "stored_block", "block_hash": 1000 + i, "tokens": tokens, "cache_level": 0, "priority": 35})
        })
        .collect();
    let stored =
        json!({"event_id": 1, "window_size": 1024, "data": {"type": "stored", "parent_hash": null, "blocks": blocks}});
    state.trtllm_events.lock().unwrap().push(stored);
    let (mut events, mut ranks) = (state.events.lock().unwrap(), state.ranks.lock().unwrap());
    let publisher = match rank {
        0 => events.as_mut(),
        rank => ranks.get_mut(rank - 1),
    };
    if let Some((socket, seq)) = publisher {
        socket.send_multipart([&b""[..], &seq.to_be_bytes(), &payload], 0).unwrap();
        *seq += 1;
    }
}

fn vllm_worker(double: &Double, file: &str, extra: &[&str]) -> Worker {
    engine_worker("vllm", double, file, extra)
}

fn engine_worker(engine: &str, double: &Double, file: &str, extra: &[&str]) -> Worker {
    engine_worker_as("decode", engine, double, file, extra)
}

fn engine_worker_as(role: &str, engine: &str, double: &Double, file: &str, extra: &[&str]) -> Worker {
    let mut command = dynamo();
    command.args([role, "--engine", engine, "--engine-url", &double.base, "--kv-events", &double.kv_events]);
    command.args(["--model", MODEL_DIR, "--discovery", file]).args(extra);
    Worker::start_as(role, &mut command)
}

/// A prefill worker in front of `prefill`, a decode worker that takes KV in front of `decoder`, and a router
/// that sees both.
async fn split_pair(
    engine: &str,
    prefill: &Double,
    decoder: &Double,
    file: &str,
    extra: &[&str],
) -> (Worker, Worker, Server) {
    let prefill_worker = engine_worker_as("prefill", engine, prefill, file, extra);
    let decode_worker = engine_worker(engine, decoder, file, &["--kv-transfer"]);
    let router = route(file);
    crate::cluster::wait_for_roles(&router, 1, 1).await;
    (prefill_worker, decode_worker, router)
}

/// Posts `body` (5 tokens) through a split pair and checks the shape both engines' sequential legs share: one
/// unstreamed one-token prefill leg, one streamed decode leg with the same prompt and the request's length, and
/// the decode engine's tokens as the answer. The prefill leg and the decode leg.
async fn two_legs(router: &Server, body: Value, prefill: &Double, decoder: &Double) -> (Value, Value) {
    let (status, answer) = router.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    let (legs, decoded) = (prefill.requests(), decoder.requests());
    assert_eq!((legs.len(), decoded.len()), (1, 1), "{legs:?} then {decoded:?}");
    let (leg, decoded) = (legs[0].clone(), decoded[0].clone());
    assert_eq!((leg["stream"].as_bool(), leg["max_tokens"].as_u64()), (Some(false), Some(1)), "{leg}");
    assert_eq!((&decoded["prompt"], decoded["stream"].as_bool()), (&leg["prompt"], Some(true)), "{decoded}");
    assert_eq!(decoded["max_tokens"], 5, "{decoded}");
    let prompt: Vec<u32> = serde_json::from_value(leg["prompt"].clone()).unwrap();
    assert_eq!(answer["choices"][0]["text"], decode(&expected_tokens(*prompt.last().unwrap(), 5)), "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 5, "{answer}");
    (leg, decoded)
}

fn expected_tokens(after: u32, count: usize) -> Vec<u32> {
    std::iter::successors(Some(next_token(after)), |&t| Some(next_token(t))).take(count).collect()
}

fn decode(ids: &[u32]) -> String {
    let tokenizer = tokenizers::Tokenizer::from_file(format!("{MODEL_DIR}/tokenizer.json")).expect("tokenizer");
    tokenizer.decode(ids, true).expect("decodes")
}

async fn wait_until(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Posts `body` until the answer's status is what `wanted` accepts (at most 10 s), and returns that answer.
async fn post_until(router: &Server, body: &Value, what: &str, wanted: impl Fn(u16) -> bool) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, answer) = router.post_json("/v1/completions", body.clone()).await;
        if wanted(status) {
            return (status, answer);
        }
        assert!(Instant::now() < deadline, "never got {what}: last {status} {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_worker_forwards_token_ids_and_streams_the_engines_tokens_back() {
    let double = Double::start().await;
    let (_, file) = cluster_file("vllm-forward");
    let _worker = vllm_worker(&double, &file, &[]);
    let router = route(&file);
    wait_for_workers(&router, 1).await;

    let body = json!({"model": "tiny-chat", "prompt": "hello there, engine", "max_tokens": 6, "temperature": 0.7,
                      "top_k": 5, "seed": 11, "logprobs": 2, "ignore_eos": false});
    let (status, answer) = router.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    let sent = double.requests();
    assert_eq!(sent.len(), 1);
    let request = &sent[0];
    // Token ids in, our stop conditions (EOS among the stop ids, vLLM's own EOS check off), token ids back.
    let prompt: Vec<u32> = request["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert!(!prompt.is_empty(), "{request}");
    assert_eq!(request["model"], "double/model", "{request}");
    assert_eq!((request["ignore_eos"].as_bool(), request["return_token_ids"].as_bool()), (Some(true), Some(true)));
    assert!(request["stop_token_ids"].as_array().unwrap().contains(&json!(2)), "{request}");
    assert_eq!(
        (request["max_tokens"].as_u64(), request["top_k"].as_u64(), request["seed"].as_u64()),
        (Some(6), Some(5), Some(11))
    );
    assert!((request["temperature"].as_f64().unwrap() - 0.7).abs() < 1e-6, "{request}");
    // What the client reads is the double's tokens, detokenized by the router.
    let ids = expected_tokens(*prompt.last().unwrap(), 6);
    assert_eq!(answer["choices"][0]["text"], decode(&ids), "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 6, "{answer}");
    let logprobs = &answer["choices"][0]["logprobs"];
    assert_eq!(logprobs["token_logprobs"].as_array().map(Vec::len), Some(6), "{answer}");
    assert_eq!(logprobs["token_logprobs"][0], -0.5, "{answer}");
    assert_eq!(logprobs["top_logprobs"][0].as_object().map(|o| o.len()), Some(2), "{answer}");
    // What the engine refuses as asked is the client's to change: a 400 with the engine's reason.
    let cursed = json!({"model": "tiny-chat", "prompt": "hi", "max_tokens": 2, "seed": 666});
    let (status, refused) = router.post_json("/v1/completions", cursed).await;
    assert_eq!(status, 400, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap_or_default().contains("seed 666"), "{refused}");
}

/// LoRA adapters as vLLM serves them (`--lora-modules`, listed by `/v1/models` under their base model): the
/// router lists them too, sends a request that names one only to a worker whose engine serves it, under that
/// name, and indexes the adapter's KV apart from the base model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_requests_go_to_the_engines_that_serve_the_adapter_and_match_only_its_kv() {
    let serving = Double::start().await;
    serving.state.adapters.lock().unwrap().push("sql-lora".into());
    let other = Double::start().await;
    let (_, file) = cluster_file("vllm-lora");
    let _workers = [vllm_worker(&serving, &file, &[]), vllm_worker(&other, &file, &[])];
    let router = route(&file);
    wait_for_workers(&router, 2).await;

    let models: Value = reqwest::get(router.url("/v1/models")).await.expect("models").json().await.expect("json");
    let listed: Vec<(&str, Option<&str>)> = (models["data"].as_array().expect("a list").iter())
        .map(|m| (m["id"].as_str().unwrap_or_default(), m["parent"].as_str()))
        .collect();
    assert_eq!(listed, [("tiny-chat", None), ("sql-lora", Some("tiny-chat"))], "{models}");
    let one: Value = reqwest::get(router.url("/v1/models/sql-lora")).await.expect("model").json().await.expect("json");
    assert_eq!(one["parent"], "tiny-chat", "{one}");

    for i in 0..4 {
        let body = json!({"model": "sql-lora", "prompt": format!("select {i} from t"), "max_tokens": 2});
        let (status, answer) = router.post_json("/v1/completions", body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["model"], "sql-lora", "{answer}");
    }
    let sent = serving.requests();
    assert_eq!((sent.len(), other.requests().len()), (4, 0), "every adapter request went to its engine");
    assert!(sent.iter().all(|r| r["model"] == "sql-lora"), "{sent:?}");
    let chat = json!({"model": "sql-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, answer) = router.post_json("/v1/chat/completions", chat).await;
    assert_eq!((status, &answer["model"]), (200, &json!("sql-lora")), "{answer}");
    assert_eq!(serving.requests().len(), 5);
    let unknown = json!({"model": "nosql-lora", "prompt": "hi", "max_tokens": 2});
    let (status, answer) = router.post_json("/v1/completions", unknown).await;
    assert_eq!(status, 404, "{answer}");
    let embed = json!({"model": "sql-lora", "input": "hi"});
    let (status, answer) = router.post_json("/v1/embeddings", embed).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap_or_default().contains("LoRA adapter"), "{answer}");

    // The adapter's blocks are the adapter's: a repeated adapter prompt finds them, the same prompt on the base
    // model does not.
    let prompt = "the same long prompt, told again and again so that it fills a few blocks of sixteen tokens each";
    let under = json!({"model": "sql-lora", "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    let overlap =
        |metrics: &str| metric(metrics, "dynamo_router_overlap_blocks_sum{model=\"tiny-chat\"}").unwrap_or(0.0);
    assert_eq!(router.post_json("/v1/completions", under.clone()).await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while overlap(&router.metrics().await) == 0.0 {
        assert!(Instant::now() < deadline, "the adapter's blocks never matched: {}", router.metrics().await);
        assert_eq!(router.post_json("/v1/completions", under.clone()).await.0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = overlap(&router.metrics().await);
    let base = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    assert_eq!(router.post_json("/v1/completions", base).await.0, 200);
    assert_eq!(overlap(&router.metrics().await), before, "a base-model prompt matched the adapter's KV");
}

/// Adapters an engine loads and unloads while it serves (vLLM's `/v1/load_lora_adapter`): the worker reads
/// its model list again and says so in its answers to the router's pings, and a router holding an engine
/// reads it itself; both routers then list the adapter and route to it, and stop when it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_loaded_while_the_engine_serves_is_routed_to_and_one_unloaded_is_not() {
    let (found, held) = (Double::start().await, Double::start().await);
    let (_, file) = cluster_file("vllm-lora-late");
    let _worker = vllm_worker(&found, &file, &[]);
    let router = route(&file);
    let (_, alone) = cluster_file("vllm-lora-late-held");
    let holder = route_with(
        &alone,
        &["--model", MODEL_DIR, "--kv-events-from", &format!("vllm:{}={}", held.kv_events, held.base)],
    );
    wait_for_workers(&router, 1).await;
    wait_for_workers(&holder, 1).await;
    let body = json!({"model": "late-lora", "prompt": "select 1", "max_tokens": 2});
    for (router, double) in [(&router, &found), (&holder, &held)] {
        assert_eq!(router.post_json("/v1/completions", body.clone()).await.0, 404);
        double.state.adapters.lock().unwrap().push("late-lora".into());
        let (_, answer) = post_until(router, &body, "the loaded adapter served", |status| status == 200).await;
        assert_eq!(answer["model"], "late-lora", "{answer}");
        assert_eq!(double.requests().last().map(|r| r["model"].clone()), Some(json!("late-lora")));
        let models: Value = reqwest::get(router.url("/v1/models")).await.unwrap().json().await.unwrap();
        assert_eq!(models["data"][1]["id"], "late-lora", "{models}");
        double.state.adapters.lock().unwrap().clear();
        post_until(router, &body, "the unloaded adapter refused", |status| status == 404).await;
    }
}

/// vLLM's data-parallel ranks, one worker each (`--data-parallel-rank`): each worker pins its requests to its
/// rank and hears only that rank's KV events (the publisher's port + rank), so a prompt a rank has run comes
/// back to that rank's worker and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_data_parallel_rank_is_a_worker_that_pins_its_requests_and_hears_its_own_events() {
    let double = Double::start_ranked(2).await;
    let (_, file) = cluster_file("vllm-ranks");
    let _workers = [
        vllm_worker(&double, &file, &["--data-parallel-rank", "0"]),
        vllm_worker(&double, &file, &["--data-parallel-rank", "1"]),
    ];
    let router = route(&file);
    wait_for_workers(&router, 2).await;
    // Distinct prompts spread over both workers; every request carries its worker's rank.
    for i in 0..6 {
        let body = json!({"model": "tiny-chat", "prompt": format!("question {i}"), "max_tokens": 2});
        assert_eq!(router.post_json("/v1/completions", body).await.0, 200);
    }
    let pinned: Vec<Option<String>> = double.state.pinned.lock().unwrap().clone();
    assert!(pinned.iter().all(|r| matches!(r.as_deref(), Some("0" | "1"))), "{pinned:?}");

    // A long prompt, repeated until the router matches it: the worker it then goes to is the one whose rank ran
    // it, since each worker hears only its rank's publisher.
    let prompt = "the same long prompt, told again and again so that it fills a few blocks of sixteen tokens each";
    let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    let overlap =
        |metrics: &str| metric(metrics, "dynamo_router_overlap_blocks_sum{model=\"tiny-chat\"}").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(router.post_json("/v1/completions", body.clone()).await.0, 200);
        if overlap(&router.metrics().await) > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the router never saw a rank's blocks: {}", router.metrics().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ranks: Vec<Option<String>> = double.state.pinned.lock().unwrap()[6..].to_vec();
    let (matched, before) = ranks.split_last().expect("requests");
    assert!(before.contains(matched), "the match went to rank {matched:?}, which never ran the prompt: {ranks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_aborts_the_engines_request_and_its_kv_events_reach_the_router() {
    let double = Double::start().await;
    let (_, file) = cluster_file("vllm-cancel");
    let _worker = vllm_worker(&double, &file, &[]);
    let router = route(&file);
    wait_for_workers(&router, 1).await;

    // Cancellation: the client goes away mid-stream, and the engine sees its request dropped.
    double.state.token_delay_ms.store(20, Ordering::Relaxed);
    let body = json!({"model": "tiny-chat", "prompt": "a long story", "max_tokens": 400, "ignore_eos": true,
                      "stream": true});
    let mut response = router.post("/v1/completions", body).await;
    response.chunk().await.expect("the stream starts");
    drop(response);
    wait_until("the engine's abort", Duration::from_secs(10), || double.state.aborted.load(Ordering::Relaxed) == 1)
        .await;
    double.state.token_delay_ms.store(0, Ordering::Relaxed);

    // KV events: the engine's stored blocks reach the router's index, so a repeated long prompt is routed as
    // one whose blocks the worker holds.
    let prompt = "the same long prompt, told again and again so that it fills a few blocks of sixteen tokens each";
    let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    assert_eq!(router.post_json("/v1/completions", body.clone()).await.0, 200);
    let overlap =
        |metrics: &str| metric(metrics, "dynamo_router_overlap_blocks_sum{model=\"tiny-chat\"}").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, answer) = router.post_json("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "{answer}");
        if overlap(&router.metrics().await) > 0.0 {
            // The engine's usage said how much of the prompt it had cached.
            assert!(answer["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) >= 16, "{answer}");
            break;
        }
        assert!(Instant::now() < deadline, "the router never saw the engine's blocks: {}", router.metrics().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_stops_answering_is_refused_and_served_again_when_it_is_back() {
    let double = Double::start().await;
    let (_, file) = cluster_file("vllm-restart");
    let _worker = vllm_worker(&double, &file, &[]);
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    let body = json!({"model": "tiny-chat", "prompt": "hi", "max_tokens": 3, "ignore_eos": true});
    assert_eq!(router.post_json("/v1/completions", body.clone()).await.0, 200);

    // Two failed reads of its load in a row (a busy server) leave it serving.
    double.state.metrics_failures.store(2, Ordering::Relaxed);
    while double.state.metrics_failures.load(Ordering::Relaxed) > 0 {
        let (status, answer) = router.post_json("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "a busy engine was taken for a dead one: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let (status, answer) = router.post_json("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "a busy engine was taken for a dead one: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    double.state.down.store(true, Ordering::Relaxed);
    // Once its metrics fail, the worker refuses, and the client hears that no worker can serve (not a hang).
    let (_, answer) = post_until(&router, &body, "a 503 with the engine down", |status| status == 503).await;
    assert!(answer["error"]["message"].as_str().unwrap_or_default().contains("engine is down"), "{answer}");
    double.state.down.store(false, Ordering::Relaxed);
    post_until(&router, &body, "a 200 once the engine is back", |status| status == 200).await;
}

/// `dynamo route --kv-events-from`: engines started with no `dynamo` worker beside them, which the router holds
/// itself (their API, KV events and load), served from the start and routed to by their KV like the worker
/// that discovery finds beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_holds_the_engines_it_is_given_beside_the_workers_it_finds() {
    let doubles = [Double::start().await, Double::start().await, Double::start().await];
    let (_, file) = cluster_file("vllm-held");
    let held = |double: &Double| format!("vllm:{}={}", double.kv_events, double.base);
    let (first, second) = (held(&doubles[0]), held(&doubles[1]));
    let router = route_with(&file, &["--model", MODEL_DIR, "--kv-events-from", &first, "--kv-events-from", &second]);
    // Served before any worker joins: the held engines are its workers.
    wait_for_workers(&router, 2).await;
    let models: Value = reqwest::get(router.url("/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-chat", "{models}");
    let _worker = vllm_worker(&doubles[2], &file, &[]);
    wait_for_workers(&router, 3).await;

    // Distinct long prompts, each run once and then repeated until the router matches it: every match goes
    // to the engine that ran the prompt, held or found, so the router hears each one's KV events.
    let ran = || doubles.iter().map(|d| d.requests().len()).collect::<Vec<_>>();
    let overlap = |metrics: &str| metric(metrics, "dynamo_router_overlap_blocks_sum{model=\"tiny-chat\"}");
    let mut matched_on = [0usize; 3];
    for i in 0..12 {
        let prompt = format!("prompt number {i} is long enough to fill a few blocks of sixteen tokens each, told once");
        let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
        let before = ran();
        let (status, answer) = router.post_json("/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "{answer}");
        let owner = (0..3).find(|&d| ran()[d] > before[d]).expect("an engine ran the prompt");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (seen, before) = (overlap(&router.metrics().await).unwrap_or(0.0), ran());
            assert_eq!(router.post_json("/v1/completions", body.clone()).await.0, 200);
            if overlap(&router.metrics().await).unwrap_or(0.0) > seen {
                let now = ran();
                assert!(now[owner] > before[owner], "prompt {i} ran on engine {owner}, its match went elsewhere");
                matched_on[owner] += 1;
                break;
            }
            assert!(Instant::now() < deadline, "the router never matched prompt {i} (engine {owner})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if matched_on.iter().all(|&n| n > 0) {
            return;
        }
    }
    panic!("not every engine ran a prompt the router then matched: {matched_on:?}");
}

/// The endpoint picker in front of held engines (`--epp-port` with `--kv-events-from`, as Dynamo's standalone
/// picker fronts plain vLLM pods): the gateway is told to send each request straight to an engine's own
/// server, the one whose KV holds the prompt's prefix, within the gateway's subset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picker_sends_the_gateway_straight_to_the_held_engine_that_holds_the_prefix() {
    use dynamo::core::epp::gateway::{self, Gateway};
    let doubles = [Double::start().await, Double::start().await];
    let (_, file) = cluster_file("vllm-held-epp");
    let held = |double: &Double| format!("vllm:{}={}", double.kv_events, double.base);
    let (first, second) = (held(&doubles[0]), held(&doubles[1]));
    let (router, line) =
        Server::start_saying(dynamo().args(["route", "--http-port", "0", "--discovery", &file]).args([
            "--epp-port",
            "0",
            "--epp-insecure",
            "--model",
            MODEL_DIR,
            "--kv-events-from",
            &first,
            "--kv-events-from",
            &second,
        ]));
    let picker =
        line.split("h2c) on ").nth(1).and_then(|at| at.split_whitespace().next()).expect("the picker's address");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{picker}")).expect("a URI");
    let gateway = Gateway::connect(endpoint).await.expect("the picker accepts");
    wait_for_workers(&router, 2).await;
    let address = |double: &Double| double.base.trim_start_matches("http://").to_string();
    let ask = |body: &Value, subset: Option<&str>| {
        let messages = gateway::post("/v1/completions", body.to_string().as_bytes(), subset);
        let gateway = gateway.clone();
        async move {
            let answer = gateway.exchange(messages).await.expect("an answer");
            gateway::destination(&answer).unwrap_or_else(|| panic!("not a pick: {answer:?}"))
        }
    };

    // A long prompt runs on one engine (through the router's own frontend), whose KV events then say so.
    let prompt = "The gateway asks the picker where to send each request. ".repeat(12);
    let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    let before: Vec<usize> = doubles.iter().map(|d| d.requests().len()).collect();
    assert_eq!(router.post_json("/v1/completions", body.clone()).await.0, 200);
    let owner = (0..2).find(|&d| doubles[d].requests().len() > before[d]).expect("an engine ran it");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(&body, None).await != address(&doubles[owner]) {
        assert!(Instant::now() < deadline, "the picker never chose the engine that holds the prefix");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..4 {
        assert_eq!(ask(&body, None).await, address(&doubles[owner]));
    }
    let other = address(&doubles[1 - owner]);
    assert_eq!(ask(&body, Some(&other)).await, other, "the gateway's subset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_refuses_to_start_with_a_held_engine_it_cannot_use() {
    let double = Double::start().await;
    let (_, file) = cluster_file("vllm-held-refused");
    let route = |extra: &[&str]| {
        let output =
            dynamo().args(["route", "--http-port", "0", "--discovery", &file]).args(extra).output().expect("runs");
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let held = format!("vllm:{}={}", double.kv_events, double.base);
    let stderr = route(&["--model", MODEL_DIR, "--kv-events-from", &held, "--block-size", "32"]);
    assert!(stderr.contains("blocks of 16 tokens") && stderr.contains(&held), "{stderr}");
    let stderr = route(&["--model", MODEL_DIR, "--kv-events-from", "vllm:tcp://127.0.0.1:1=http://127.0.0.1:1"]);
    assert!(stderr.contains("does not answer"), "{stderr}");
    assert!(route(&["--kv-events-from", &held]).contains("--model"));
    assert!(route(&["--block-size", "32"]).contains("--kv-events-from"), "a block size for no engine");
    let stderr = route(&["--model", MODEL_DIR, "--kv-events-from", &double.base]);
    assert!(stderr.contains("expected KIND:EVENTS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_worker_is_refused_without_its_model_or_with_another_block_size() {
    let double = Double::start().await;
    let (_, file) = cluster_file("vllm-refused");
    let run = |extra: &[&str]| {
        let output = dynamo()
            .args(["decode", "--engine", "vllm", "--engine-url", &double.base, "--discovery", &file])
            .args(extra)
            .output()
            .expect("runs");
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    assert!(run(&[]).contains("needs --model DIR"));
    let stderr = run(&["--model", MODEL_DIR, "--block-size", "32"]);
    assert!(stderr.contains("blocks of 16 tokens") && stderr.contains("--block-size 16"), "{stderr}");
    let output = dynamo().args(["decode", "--engine", "vllm", "--model", MODEL_DIR]).output().expect("runs");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--engine-url"), "{output:?}");
    let output =
        dynamo().args(["decode", "--engine", "mocker", "--engine-url", "http://127.0.0.1:1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("external engine"), "{output:?}");
    let unreachable = dynamo()
        .args(["decode", "--engine", "vllm", "--engine-url", "http://127.0.0.1:1", "--model", MODEL_DIR])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("does not answer"), "{unreachable:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sglang_worker_speaks_generate_and_streams_its_tokens_back() {
    let double = Double::start().await;
    let (_, file) = cluster_file("sglang-forward");
    let _worker = engine_worker("sglang", &double, &file, &[]);
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    let prompt = "a prompt long enough to fill two blocks of sixteen tokens, so that the cache has a say";
    let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 5, "temperature": 0, "seed": 3});
    let (status, answer) = router.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    let request = &double.requests()[0];
    let ids: Vec<u32> = serde_json::from_value(request["input_ids"].clone()).unwrap();
    let sampling = &request["sampling_params"];
    assert_eq!((sampling["max_new_tokens"].as_u64(), sampling["ignore_eos"].as_bool()), (Some(5), Some(true)));
    assert!(sampling["stop_token_ids"].as_array().unwrap().contains(&json!(2)), "{request}");
    // Cumulative output_ids in, each token once out; SGLang's cached count on the usage.
    assert_eq!(answer["choices"][0]["text"], decode(&expected_tokens(*ids.last().unwrap(), 5)), "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 5, "{answer}");
    assert_eq!(
        answer["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some((ids.len() / BLOCK * BLOCK) as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_its_engine_loses_moves_to_another_worker_with_what_it_generated() {
    let cut_next = Arc::new(AtomicBool::new(false));
    let (one, two) = (Double::start_sharing(cut_next.clone()).await, Double::start_sharing(cut_next.clone()).await);
    let (_, file) = cluster_file("vllm-lost");
    let _workers = (vllm_worker(&one, &file, &[]), vllm_worker(&two, &file, &[]));
    let router = route(&file);
    wait_for_workers(&router, 2).await;
    // Whichever engine gets it dies after two tokens; the other continues from there.
    cut_next.store(true, Ordering::Relaxed);
    let body = json!({"model": "tiny-chat", "prompt": "tell me more", "max_tokens": 6, "temperature": 0,
                      "ignore_eos": true});
    let (status, answer) = router.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(!cut_next.load(Ordering::Relaxed), "no stream was cut");
    let requests: Vec<Value> = [one.requests(), two.requests()].concat();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let prompt: Vec<u32> = serde_json::from_value(requests[0]["prompt"].clone()).unwrap();
    let prompt = if requests[0]["max_tokens"] == 6 {
        prompt
    } else {
        serde_json::from_value(requests[1]["prompt"].clone()).unwrap()
    };
    // The same text as an uninterrupted run: two tokens from the first engine, four from the second.
    assert_eq!(answer["choices"][0]["text"], decode(&expected_tokens(*prompt.last().unwrap(), 6)), "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 6, "{answer}");
    let continued = requests.iter().find(|r| r["max_tokens"] == 4).expect("a continuation of 4 tokens");
    assert_eq!(continued["prompt"].as_array().map(Vec::len), Some(prompt.len() + 2), "{continued}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_prefill_and_decode_workers_hand_kv_over_through_vllms_own_protocol() {
    let (prefill, decoder) = (Double::start().await, Double::start().await);
    let (_, file) = cluster_file("vllm-disagg");
    let (_prefill, _decode, router) = split_pair("vllm", &prefill, &decoder, &file, &[]).await;
    let body = json!({"model": "tiny-chat", "prompt": "a prompt for two roles", "max_tokens": 5, "temperature": 0,
                      "ignore_eos": true});
    let (leg, decoded) = two_legs(&router, body, &prefill, &decoder).await;
    // The prefill leg asks vLLM to keep the KV for a remote decode; the decode leg carries what it answered.
    assert_eq!(leg["kv_transfer_params"]["do_remote_decode"], true, "{leg}");
    assert_eq!(decoded["kv_transfer_params"]["remote_engine_id"], "double-prefill", "{decoded}");
    let sent: Vec<u64> = serde_json::from_value(leg["prompt"].clone()).unwrap();
    let params = prefill_answer(&leg, &sent).0["kv_transfer_params"].clone();
    assert_eq!(decoded["kv_transfer_params"], params, "the prefill's parameters, verbatim");
    let metrics = router.metrics().await;
    assert_eq!(metric(&metrics, "dynamo_router_disagg_decisions_total{decision=\"remote\"}"), Some(1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_prefill_and_decode_legs_share_one_bootstrap_room() {
    let (prefill, decoder) = (Double::start().await, Double::start().await);
    let (_, file) = cluster_file("sglang-disagg");
    let bootstrap = ["--engine-bootstrap-port", "9123"];
    let (_prefill, _decode, router) = split_pair("sglang", &prefill, &decoder, &file, &bootstrap).await;
    let body = json!({"model": "tiny-chat", "prompt": "two legs, one room", "max_tokens": 4, "temperature": 0,
                      "ignore_eos": true});
    let (status, answer) = router.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    // The prefill leg runs beside the decode leg; wait for it to have been sent.
    wait_until("the prefill leg", Duration::from_secs(10), || !prefill.requests().is_empty()).await;
    let (leg, decoded) = (prefill.requests()[0].clone(), decoder.requests()[0].clone());
    assert_eq!(leg["bootstrap_host"], "127.0.0.1", "{leg}");
    assert_eq!(leg["bootstrap_port"], 9123, "{leg}");
    for field in ["bootstrap_host", "bootstrap_port", "bootstrap_room", "input_ids"] {
        assert_eq!(leg[field], decoded[field], "{field}: {leg} vs {decoded}");
    }
    assert!(leg["bootstrap_room"].as_u64().is_some_and(|room| room < 1 << 63), "{leg}");
    let prompt: Vec<u32> = serde_json::from_value(decoded["input_ids"].clone()).unwrap();
    assert_eq!(answer["choices"][0]["text"], decode(&expected_tokens(*prompt.last().unwrap(), 4)), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trtllm_prefill_and_decode_legs_carry_its_disaggregated_params() {
    let (prefill, decoder) = (Double::start().await, Double::start().await);
    let (_, file) = cluster_file("trtllm-disagg");
    let (_prefill, _decode, router) = split_pair("trtllm", &prefill, &decoder, &file, &[]).await;
    let body = json!({"model": "tiny-chat", "prompt": "a context phase here, a generation phase there",
                      "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let (leg, decoded) = two_legs(&router, body, &prefill, &decoder).await;
    // The context leg is marked context_only and has no field TensorRT-LLM lacks; the generation leg carries
    // the context phase's parameters as generation_only.
    assert_eq!(leg["disaggregated_params"], json!({"request_type": "context_only"}), "{leg}");
    assert!(leg.get("stream_options").is_none() && leg.get("kv_transfer_params").is_none(), "{leg}");
    let sent: Vec<u64> = serde_json::from_value(leg["prompt"].clone()).unwrap();
    let mut params = prefill_answer(&leg, &sent).0["choices"][0]["disaggregated_params"].clone();
    params["request_type"] = json!("generation_only");
    assert_eq!(decoded["disaggregated_params"], params, "{decoded}");
    let expected = expected_tokens(*sent.last().unwrap() as u32, 5);

    // A context phase whose first token is a stop token is the whole answer: no generation leg.
    let body = json!({"model": "tiny-chat", "prompt": "a context phase here, a generation phase there",
                      "max_tokens": 5, "temperature": 0, "stop_token_ids": [expected[0]], "ignore_eos": true});
    let (status, answer) = router.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["choices"][0]["finish_reason"].as_str(), answer["usage"]["completion_tokens"].as_u64()),
        (Some("stop"), Some(1)),
        "{answer}"
    );
    assert_eq!(prefill.requests().len(), 2);
    assert_eq!(decoder.requests().len(), 1, "the generation leg was sent for a finished request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trtllm_worker_sends_only_its_fields_and_polls_its_kv_events() {
    let double = Double::start().await;
    let (_, file) = cluster_file("trtllm");
    let events = format!("{}/kv_cache_events", double.base);
    let mut command = dynamo();
    command.args(["decode", "--engine", "trtllm", "--engine-url", &double.base, "--kv-events", &events]);
    command.args(["--model", MODEL_DIR, "--discovery", &file]);
    let _worker = Worker::start_with(&mut command);
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    let prompt = "a long prompt, for a TensorRT-LLM engine whose events are asked for rather than published";
    let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": true,
                      "logprobs": 0});
    let (status, answer) = router.post_json("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let request = &double.requests()[0];
    assert_eq!(request["detokenize"], false, "{request}");
    assert!(request.get("return_token_ids").is_none() && request.get("return_tokens_as_token_ids").is_none());
    let ids: Vec<u32> = serde_json::from_value(request["prompt"].clone()).unwrap();
    assert_eq!(answer["choices"][0]["text"], decode(&expected_tokens(*ids.last().unwrap(), 3)), "{answer}");
    assert_eq!(answer["choices"][0]["logprobs"]["token_logprobs"][0], -0.5, "{answer}");
    // Alternatives keyed by text name no token: refused, not dropped.
    let (status, refused) =
        router.post_json("/v1/completions", json!({"model": "tiny-chat", "prompt": "x", "logprobs": 2})).await;
    assert_eq!(status, 400, "{refused}");
    // The polled events reach the router's index.
    let overlap =
        |metrics: &str| metric(metrics, "dynamo_router_overlap_blocks_sum{model=\"tiny-chat\"}").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while overlap(&router.metrics().await) == 0.0 {
        assert!(Instant::now() < deadline, "the router never saw the engine's blocks");
        assert_eq!(router.post_json("/v1/completions", body.clone()).await.0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamo_run_reports_its_kv_cache_as_vllm_does_to_a_worker_in_front_of_it() {
    // Its vllm: gauges are what a vLLM worker reads: its block size is checked against the worker's.
    let engine = Server::start(&["--speedup", "1000"]);
    let output = dynamo()
        .args(["decode", "--engine", "vllm", "--engine-url", &engine.base, "--model", MODEL_DIR, "--block-size", "32"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("blocks of 16 tokens"), "{stderr}");
}
