//! Disaggregated serving with real processes: prefill workers compute prompts and hand their KV to decode
//! workers through the transfer layer, and greedy output stays what aggregated serving gives.
use crate::cluster::{over_workers, streamed_text};
use crate::util::{Server, Worker, dynamo, metric, sse_payloads};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn golden() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/tiny-chat.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Prompts that span one block, many blocks, and one that extends another (its prefix cached wherever the
/// first went).
fn prompts() -> Vec<Vec<u64>> {
    let golden: Vec<u64> = serde_json::from_value(golden()["prompt_ids"].clone()).unwrap();
    let long: Vec<u64> = (0..150).map(|i| 20 + (i * 37) % 900).collect();
    let extended: Vec<u64> = long.iter().copied().chain((0..40).map(|i| 30 + i * 11)).collect();
    vec![golden, long, extended]
}

/// Greedy token ids, read back from `token_id:N` logprob entries.
async fn greedy(server: &Server, prompt: &[u64], max_tokens: usize) -> Vec<u64> {
    let body = json!({
        "model": "tiny-chat", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
        "logprobs": 1, "return_tokens_as_token_ids": true,
    });
    let (status, body) = server.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{body}");
    (body["choices"][0]["logprobs"]["tokens"].as_array().unwrap().iter())
        .map(|t| t.as_str().unwrap().trim_start_matches("token_id:").parse().unwrap())
        .collect()
}

pub async fn disaggregated_equals_aggregated(disaggregated: &Server) {
    let golden_ids: Vec<u64> = serde_json::from_value(golden()["greedy_ids"].clone()).unwrap();
    let aggregated = Server::native(&[]);
    let prompts = prompts();
    assert_eq!(greedy(disaggregated, &prompts[0], golden_ids.len()).await, golden_ids, "transformers' tokens");
    for prompt in &prompts[1..] {
        let expected = greedy(&aggregated, prompt, 12).await;
        assert_eq!(greedy(disaggregated, prompt, 12).await, expected, "a prompt of {} tokens", prompt.len());
    }
    // Cached on both workers now: the same again.
    assert_eq!(greedy(disaggregated, &prompts[2], 12).await, greedy(&aggregated, &prompts[2], 12).await);
    let metrics = disaggregated.metrics().await;
    let remote = metric(&metrics, "dynamo_router_disagg_decisions_total{decision=\"remote\"}");
    assert_eq!(remote, Some(4.0), "every prompt went to the prefill worker:\n{metrics}");
    // Their KV moved: the decode worker read every one (a remote worker reports it each second).
    let transfers = |what: &str, metrics: &str| over_workers(metrics, "dynamo_component_kv_transfers", what);
    // Each worker reports on its own second: wait for both.
    let metrics = disaggregated
        .wait_for_metrics(Duration::from_secs(10), |m| {
            transfers("what=\"read\"", m) == Some(4.0) && transfers("what=\"held\"", m) == Some(4.0)
        })
        .await;
    assert_eq!(transfers("what=\"held\"", &metrics), Some(4.0), "{metrics}");
    assert_eq!(transfers("what=\"read_failed\"", &metrics), Some(0.0), "{metrics}");
    assert!(transfers("what=\"read_bytes\"", &metrics) > Some(0.0), "{metrics}");
    // The holder's pages go back to its pool when the read's notification reaches it: seconds, not the
    // lease's 60 s expiry (a lost notification fails this).
    disaggregated
        .wait_for_metrics(Duration::from_secs(10), |m| {
            over_workers(m, "dynamo_component_kvstats_active_blocks", "worker_id") == Some(0.0)
        })
        .await;
}

#[tokio::test]
async fn run_with_a_prefill_worker_gives_the_tokens_of_aggregated_serving() {
    let server = Server::native(&["--prefill-workers", "1"]);
    disaggregated_equals_aggregated(&server).await;
}

fn cluster_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()))
}

/// The discovery spec of the cluster `name` (its file made by `split_cluster_with`).
fn discovery_of(name: &str) -> String {
    format!("file:{}", cluster_dir(name).join("cluster.toml").display())
}

/// A fresh cluster `name`: its directory emptied, its discovery spec.
fn cluster_file(name: &str) -> String {
    let dir = cluster_dir(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    discovery_of(name)
}

/// Another decode worker that takes KV, in the cluster `name` (as `split_cluster` starts its first).
fn another_decode_worker(name: &str) -> Worker {
    let discovery = discovery_of(name);
    Worker::start_as("decode", dynamo().args(["decode", "--kv-transfer", "--threads", "1", "--discovery", &discovery]))
}

/// A prefill worker, a decode worker that takes KV, and a router over them, found through a cluster file.
async fn split_cluster(name: &str) -> (Worker, Worker, Server) {
    split_cluster_with(name, NATIVE, |_, _| {}).await
}

/// The built-in engine on one thread each, so that two workers and a router share two cores.
pub const NATIVE: &[&str] = &["--threads", "1"];

/// As `split_cluster`, the workers running the engine `engine` says (its flags), with each worker's command
/// completed by `worker` (given its role: flags, environment).
pub async fn split_cluster_with(
    name: &str,
    engine: &[&str],
    worker: impl Fn(&str, &mut std::process::Command),
) -> (Worker, Worker, Server) {
    let file = cluster_file(name);
    let (mut prefill, mut decode) = (dynamo(), dynamo());
    prefill.arg("prefill").args(engine).args(["--discovery", &file]);
    decode.args(["decode", "--kv-transfer"]).args(engine).args(["--discovery", &file]);
    worker("prefill", &mut prefill);
    worker("decode", &mut decode);
    let prefill = Worker::start_as("prefill", &mut prefill);
    let decode = Worker::start_as("decode", &mut decode);
    let router =
        Server::start_with(dynamo().args(["route", "--http-port", "0", "--worker-timeout", "1", "--discovery", &file]));
    crate::cluster::wait_for_roles(&router, 1, 1).await;
    (prefill, decode, router)
}

#[tokio::test]
async fn prefill_decode_and_route_processes_give_the_tokens_of_aggregated_serving() {
    let (_prefill, _decode, router) = split_cluster("disagg").await;
    disaggregated_equals_aggregated(&router).await;
}

#[tokio::test]
async fn a_prefill_worker_that_freezes_mid_prefill_leaves_the_prompt_to_the_decode_worker() {
    let (prefill, _decode, router) = split_cluster("disagg-frozen").await;
    let prompt = &prompts()[1];
    let expected = greedy(&Server::native(&[]), prompt, 12).await;
    // Frozen, it takes the prompt and never answers; the router gives up on it after --worker-timeout.
    prefill.signal("STOP");
    assert_eq!(greedy(&router, prompt, 12).await, expected, "one uninterrupted answer");
    let metrics = router.metrics().await;
    let decisions = |d: &str| metric(&metrics, &format!("dynamo_router_disagg_decisions_total{{decision=\"{d}\"}}"));
    assert_eq!((decisions("remote"), decisions("local_fallback")), (Some(1.0), Some(1.0)), "{metrics}");
    prefill.signal("CONT");
}

/// A greedy completion of `prompt`'s token ids, streamed or not.
fn completion(prompt: &[u64], stream: bool) -> Value {
    json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": stream})
}

#[tokio::test]
async fn a_prefill_worker_killed_during_its_hand_off_costs_the_decode_worker_no_pages() {
    let (prefill, _decode, router) = split_cluster("disagg-lost-holder").await;
    let prompt = &prompts()[1];
    let (_, expected) = Server::native(&[]).post_json("/v1/completions", completion(prompt, false)).await;
    // The first token comes from the prefill worker; the decode worker reads its KV at that moment. Killed
    // then, the holder is gone before, during or just after the read, and in every case the client gets the
    // whole answer and the decode worker's pages (set aside for the read, or computed into) go back.
    let mut response = router.post("/v1/completions", completion(prompt, true)).await;
    assert_eq!(response.status().as_u16(), 200);
    let (mut text, mut holder) = (String::new(), Some(prefill));
    while let Some(chunk) = response.chunk().await.expect("the stream continues") {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if holder.is_some() && text.contains("data:") {
            drop(holder.take()); // SIGKILL
        }
    }
    assert_eq!(streamed_text(&sse_payloads(&text)), expected["choices"][0]["text"].as_str().unwrap(), "{text}");
    // Once the lost worker is forgotten, what is left is the decode worker's: nothing in use.
    router
        .wait_for_metrics(Duration::from_secs(10), |m| {
            m.matches("dynamo_component_kvstats_active_blocks{").count() == 1
                && over_workers(m, "dynamo_component_kvstats_active_blocks", "worker_id") == Some(0.0)
        })
        .await;
}

#[tokio::test]
async fn a_decode_worker_lost_before_it_reads_holds_the_prefill_workers_pages_only_for_the_lease() {
    let lease = |role: &str, command: &mut std::process::Command| {
        if role == "prefill" {
            command.args(["--kv-lease", "2"]);
        }
    };
    let (_prefill, decode, router) = split_cluster_with("disagg-lost-reader", NATIVE, lease).await;
    // Frozen, the decode worker is still chosen (the router has not missed its heartbeat yet), the prefill
    // worker holds the prompt's KV for it, and nobody reads it; then it dies.
    decode.signal("STOP");
    let request = router.post("/v1/completions", completion(&prompts()[1], false));
    let _ = tokio::time::timeout(Duration::from_secs(1), request).await;
    decode.signal("KILL");
    let held = |m: &str| over_workers(m, "dynamo_component_kv_transfers", "what=\"held\"") == Some(1.0);
    router.wait_for_metrics(Duration::from_secs(10), held).await;
    // The lease (2 s) ends and the pages go back; without it they would be held for good.
    router
        .wait_for_metrics(Duration::from_secs(10), |m| {
            held(m)
                && m.matches("dynamo_component_kvstats_active_blocks{").count() == 1
                && over_workers(m, "dynamo_component_kvstats_active_blocks", "worker_id") == Some(0.0)
        })
        .await;
}

/// A stream whose prompt went through the prefill worker, killed on its decode worker mid-stream: the router
/// continues it on the other decode worker, and the client gets the tokens of one uninterrupted run.
#[tokio::test]
async fn a_decode_worker_killed_mid_stream_of_a_disaggregated_request_is_invisible_to_the_client() {
    let name = "disagg-decode-killed";
    let (_prefill, first, router) = split_cluster(name).await;
    let first_id = first.id.to_string();
    // The first decode worker computes the first prompt's KV (one token to generate: no hand-off), so the
    // second prompt, which extends it, is routed there, and a prefill worker computes the extension.
    let prompts = prompts();
    greedy(&router, &prompts[1], 1).await;
    let _second = another_decode_worker(name);
    crate::cluster::wait_for_roles(&router, 2, 1).await;

    let body = |stream: bool| {
        json!({"model": "tiny-chat", "prompt": prompts[2], "max_tokens": 1500, "temperature": 0,
               "ignore_eos": true, "stream": stream})
    };
    let (_, expected) = Server::native(&[]).post_json("/v1/completions", body(false)).await;
    let mut response = router.post("/v1/completions", body(true)).await;
    assert_eq!(response.status().as_u16(), 200);
    let (mut text, mut killer) = (String::new(), Some(first));
    while let Some(chunk) = response.chunk().await.expect("the stream continues") {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if killer.is_some() && text.matches("data:").count() >= 10 {
            let metrics = router.metrics().await;
            let in_flight = metric(&metrics, &format!("dynamo_router_worker_in_flight{{worker_id=\"{first_id}\"}}"));
            assert_eq!(in_flight, Some(1.0), "the stream decodes on the first worker:\n{metrics}");
            drop(killer.take()); // SIGKILL
        }
    }
    assert!(killer.is_none(), "the stream ended before its decode worker could be killed");
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_text(&payloads), expected["choices"][0]["text"].as_str().unwrap_or_default());
    let metrics = router.metrics().await;
    let remote = metric(&metrics, "dynamo_router_disagg_decisions_total{decision=\"remote\"}");
    assert_eq!(remote, Some(1.0), "the streamed prompt went through the prefill worker:\n{metrics}");
}

/// A client gone while its prompt is on the prefill worker: the cancellation reaches the prefill worker (as
/// Dynamo's does not), which holds nothing for the decode worker. The prefill worker is frozen while the
/// client goes, so the cancellation is waiting for it when it resumes mid-prefill.
#[tokio::test]
async fn a_client_gone_mid_prefill_cancels_it_on_the_prefill_worker() {
    let (prefill, _decode, router) = split_cluster("disagg-cancelled").await;
    let prefill_id = prefill.id.to_string();

    let prompt: Vec<u64> = (0..3500).map(|i| 20 + (i * 53) % 900).collect();
    let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 50, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    // By hand, so that the connection closes when the client lets go (an HTTP client library's pool would
    // keep it open until the response ends).
    use tokio::io::AsyncWriteExt;
    let addr = router.base.trim_start_matches("http://").to_string();
    let body = serde_json::to_vec(&body).expect("JSON");
    let mut client = tokio::net::TcpStream::connect(&addr).await.expect("the router accepts");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.expect("the request's head");
    client.write_all(&body).await.expect("the request's body");
    let on_prefill = format!("dynamo_router_worker_in_flight{{worker_id=\"{prefill_id}\"}}");
    router.wait_for_metrics(Duration::from_secs(10), |m| metric(m, &on_prefill) == Some(1.0)).await;
    prefill.signal("STOP");
    drop(client);
    router.wait_for_metrics(Duration::from_secs(5), |m| metric(m, &on_prefill) == Some(0.0)).await;
    prefill.signal("CONT");
    let cancelled =
        format!("dynamo_component_request_plane_requests{{outcome=\"cancelled\",worker_id=\"{prefill_id}\"}}");
    let metrics = router
        .wait_for_metrics(Duration::from_secs(10), |m| {
            metric(m, &cancelled) == Some(1.0)
                && over_workers(m, "dynamo_component_kvstats_active_blocks", "worker_id") == Some(0.0)
        })
        .await;
    let held = format!("dynamo_component_kv_transfers{{what=\"held\",worker_id=\"{prefill_id}\"}}");
    assert_eq!(metric(&metrics, &held), Some(0.0), "the prefill was stopped before it held pages:\n{metrics}");
}

/// Mocker flags that make a hand-off slow enough to see: a 150-token prompt's simulated KV (1 MB a token) at
/// 0.01 GB/s takes 15 simulated seconds, 1.5 s at speedup 10.
const SLOW_MOCKER_HAND_OFF: [&str; 8] =
    ["--engine", "mocker", "--speedup", "10", "--kv-bytes-per-token", "1000000", "--transfer-gbps", "0.01"];

/// Mocker workers hand a prompt over as native ones do, with the simulated KV's transfer time charged: the
/// client gets the tokens of an aggregated mocker, its first token at once (from the prefill worker) and the
/// second once the decode worker's read has taken its simulated time; the decode worker counts the simulated
/// bytes read, and the prefill worker's pages go back as soon as the read's notification reaches it. Once the
/// decode worker has measured its reads, a long prompt with a short answer stays where it decodes.
async fn mocker_hand_off_is_aggregated_serving_later(disaggregated: &Server) {
    let aggregated = Server::start(&["--speedup", "10"]);
    let prompt = &prompts()[1];
    assert_eq!(greedy(disaggregated, prompt, 12).await, greedy(&aggregated, prompt, 12).await);

    let body = |stream: bool| {
        json!({"model": "tiny-chat", "prompt": prompts()[2], "max_tokens": 200, "temperature": 0,
               "ignore_eos": true, "stream": stream})
    };
    let mut response = disaggregated.post("/v1/completions", body(true)).await;
    assert_eq!(response.status().as_u16(), 200);
    let (mut text, mut arrivals) = (String::new(), Vec::new());
    while let Some(chunk) = response.chunk().await.expect("the stream continues") {
        text.push_str(&String::from_utf8_lossy(&chunk));
        let tokens = sse_payloads(&text).iter().filter(|p| p.contains("\"choices\":[{")).count();
        arrivals.resize(tokens, std::time::Instant::now());
    }
    let (_, expected) = aggregated.post_json("/v1/completions", body(false)).await;
    assert_eq!(streamed_text(&sse_payloads(&text)), expected["choices"][0]["text"].as_str().unwrap(), "{text}");
    // Only what the decode worker lacks moves: it holds the first prompt's 9 full blocks (its tenth ended in
    // the first answer), so 190 - 144 = 46 tokens, 46 MB at 0.01 GB/s: 0.46 s at speedup 10.
    let gap = arrivals[1] - arrivals[0];
    assert!(gap >= Duration::from_millis(350), "the second token came {gap:?} after the first");

    let transfers = |what: &str, metrics: &str| over_workers(metrics, "dynamo_component_kv_transfers", what);
    let rate = |m: &str| over_workers(m, "dynamo_component_kv_read_bytes_per_second", "worker_id").unwrap_or(0.0);
    let metrics = disaggregated
        .wait_for_metrics(Duration::from_secs(10), |m| {
            transfers("what=\"read\"", m) == Some(2.0) && transfers("what=\"held\"", m) == Some(2.0) && rate(m) > 0.0
        })
        .await;
    // Simulated bytes: the first prompt's 150 tokens, then the second's 46.
    assert_eq!(transfers("what=\"read_bytes\"", &metrics), Some(196e6), "{metrics}");
    assert_eq!(transfers("what=\"read_failed\"", &metrics), Some(0.0), "{metrics}");
    // 0.01 GB/s of simulated time is 0.1 GB/s of real time, less what reading around the wait costs.
    assert!(rate(&metrics) > 0.5e8 && rate(&metrics) <= 1e8, "{metrics}");
    disaggregated
        .wait_for_metrics(Duration::from_secs(10), |m| {
            over_workers(m, "dynamo_component_kvstats_active_blocks", "worker_id") == Some(0.0)
        })
        .await;

    // A fresh 150-token prompt would take 1.5 s to move, all of it between the two tokens asked for: far over
    // the 20 ms budget, so the decode worker prefills it, with the same answer.
    let fresh: Vec<u64> = (0..150).map(|i| 25 + (i * 41) % 900).collect();
    assert_eq!(greedy(disaggregated, &fresh, 2).await, greedy(&aggregated, &fresh, 2).await);
    let metrics = disaggregated.metrics().await;
    let decisions =
        |decision: &str| metric(&metrics, &format!("dynamo_router_disagg_decisions_total{{decision=\"{decision}\"}}"));
    assert_eq!((decisions("remote"), decisions("local_slow_transfer")), (Some(2.0), Some(1.0)), "{metrics}");
}

#[tokio::test]
async fn mocker_prefill_decode_and_route_processes_hand_off_in_simulated_time() {
    let (_prefill, _decode, router) = split_cluster_with("disagg-mocker", &SLOW_MOCKER_HAND_OFF, |_, _| {}).await;
    mocker_hand_off_is_aggregated_serving_later(&router).await;
}

#[tokio::test]
async fn run_with_a_mocker_prefill_worker_hands_off_in_simulated_time() {
    let server = Server::start_with(
        dynamo().args(["run", "--http-port", "0", "--prefill-workers", "1"]).args(SLOW_MOCKER_HAND_OFF),
    );
    mocker_hand_off_is_aggregated_serving_later(&server).await;
}
