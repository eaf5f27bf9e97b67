//! Separate processes: `dynamo route` and `dynamo decode` workers that find each other through a cluster file.
use crate::util::{Server, Worker, dynamo};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A fresh cluster file, and the `--discovery` spec that names it.
pub fn cluster_file(name: &str) -> (PathBuf, String) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join("cluster.toml");
    let spec = format!("file:{}", path.display());
    (path, spec)
}

fn worker(file: &str, extra: &[&str]) -> Worker {
    let mut args = vec!["--engine", "mocker", "--speedup", "20", "--discovery", file];
    args.extend_from_slice(extra);
    Worker::start(&args)
}

pub fn route(file: &str) -> Server {
    route_with(file, &[])
}

/// `route` with more flags.
pub fn route_with(file: &str, extra: &[&str]) -> Server {
    Server::start_with(
        dynamo().args(["route", "--http-port", "0", "--worker-timeout", "1", "--discovery", file]).args(extra),
    )
}

async fn workers(server: &Server) -> u64 {
    let health: Value = reqwest::get(server.url("/health")).await.expect("health").json().await.expect("json");
    health["workers"].as_u64().unwrap_or(0)
}

pub async fn wait_for_workers(server: &Server, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while workers(server).await != count {
        assert!(Instant::now() < deadline, "the router never had {count} workers (has {})", workers(server).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the router has `decode` decode workers and `prefill` prefill workers.
pub async fn wait_for_roles(router: &Server, decode: u64, prefill: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let health: Value = reqwest::get(router.url("/health")).await.unwrap().json().await.unwrap();
        if health["workers"] == decode && health["prefill_workers"] == prefill {
            return;
        }
        assert!(Instant::now() < deadline, "the router never saw {decode} + {prefill} workers: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn completion(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

#[tokio::test]
async fn workers_join_serve_leave_and_a_late_one_is_used() {
    let (path, file) = cluster_file("join-leave");
    let first = worker(&file, &[]);
    let second = worker(&file, &[]);
    let router = route(&file);
    wait_for_workers(&router, 2).await;

    let prompt = "The router sends each request to the worker that already holds the longest prefix of its prompt.";
    let (status, body) = router.post_json("/v1/completions", completion(prompt, 8)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
    // The worker's Stored events travel over the event plane; the repeat must land where they say.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, again) = router.post_json("/v1/completions", completion(prompt, 8)).await;
        assert_eq!(again["choices"][0]["text"], body["choices"][0]["text"], "the mocker is deterministic");
        if again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) >= 16 {
            break;
        }
        assert!(Instant::now() < deadline, "a repeated prompt never reached the worker that cached it: {again}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    drop(first); // SIGKILL: no goodbye, only silence.
    wait_for_workers(&router, 1).await;
    for _ in 0..4 {
        let (status, body) = router.post_json("/v1/completions", completion("after the loss", 4)).await;
        assert_eq!(status, 200, "the remaining worker serves: {body}");
    }

    let late = worker(&file, &[]);
    wait_for_workers(&router, 2).await;
    second.stop();
    wait_for_workers(&router, 1).await;
    let text = std::fs::read_to_string(&path).expect("the cluster file");
    // The router has an entry of its own (its traffic goes out on the event plane).
    assert_eq!(text.matches(r#"role = "decode""#).count(), 2, "the stopped worker took its entry back:\n{text}");
    assert_eq!(text.matches(r#"role = "router""#).count(), 1, "{text}");
    drop(late);
}

#[tokio::test]
async fn a_worker_of_another_namespace_is_not_used() {
    let (_, file) = cluster_file("namespaces");
    let _ours = worker(&file, &[]);
    let _theirs = worker(&file, &["--namespace", "other"]);
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(workers(&router).await, 1);
}

#[tokio::test]
async fn a_latency_router_prices_remote_workers_by_the_profiles_they_send() {
    let (_, file) = cluster_file("latency-profiles");
    let _workers = [worker(&file, &[]), worker(&file, &[])];
    let router = route_with(&file, &["--router-mode", "latency"]);
    wait_for_workers(&router, 2).await;
    for i in 0..4 {
        let (status, body) = router.post_json("/v1/completions", completion(&format!("prompt number {i}"), 4)).await;
        assert_eq!(status, 200, "{body}");
    }
    // Predictions are only made (and checked) with a profile: the mockers' came over the request plane.
    let text = router.metrics().await;
    let checked: f64 = text
        .lines()
        .filter(|l| l.starts_with("dynamo_router_ttft_prediction_error_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(checked, 4.0, "{text}");
}

#[tokio::test]
async fn a_native_worker_sends_the_profile_it_was_given_and_a_bad_one_is_refused_at_start() {
    let (path, file) = cluster_file("native-profile");
    let dir = path.parent().expect("the cluster file's dir");
    let profile = dir.join("profile.json");
    std::fs::write(
        &profile,
        r#"{"source": "by hand", "kv_tokens": 4096, "max_batch": 8,
            "prefill": [{"prompt_tokens": 16, "ttft_ms": 4.0}, {"prompt_tokens": 256, "ttft_ms": 20.0}],
            "decode": [{"context_tokens": 64, "batch": 1, "itl_ms": 2.0}]}"#,
    )
    .unwrap();
    let profile = profile.to_str().unwrap();
    let _native = Worker::start(&["--threads", "1", "--discovery", &file, "--profile", profile]);
    let router = route_with(&file, &["--router-mode", "latency"]);
    wait_for_workers(&router, 1).await;
    let (status, body) = router.post_json("/v1/completions", completion("a prompt priced in time", 2)).await;
    assert_eq!(status, 200, "{body}");
    let text = router.metrics().await;
    assert!(text.contains("dynamo_router_ttft_prediction_error_seconds_count{worker_id="), "{text}");

    let broken = dir.join("broken.json");
    std::fs::write(&broken, r#"{"source": "x", "kv_tokens": 1, "max_batch": 1, "prefill": [], "decode": []}"#).unwrap();
    let out =
        dynamo().args(["decode", "--threads", "1", "--discovery", &file, "--profile"]).arg(&broken).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("at least one prefill"), "{stderr}");
    let out =
        dynamo().args(["decode", "--engine", "mocker", "--discovery", &file, "--profile", profile]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("timing fit"), "{stderr}");
}

/// 120 greedy tokens whatever they are: long enough to do something to a worker mid-stream.
fn long_completion(prompt: &str, stream: bool) -> Value {
    json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 120, "temperature": 0, "ignore_eos": true,
           "stream": stream})
}

pub fn streamed_text(payloads: &[String]) -> String {
    payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_worker_killed_mid_stream_is_invisible_to_the_client() {
    let (_, file) = cluster_file("migration");
    a_killed_worker_is_invisible(&["--discovery", &file]).await;
}

#[tokio::test]
async fn a_worker_found_by_mdns_and_killed_mid_stream_is_invisible_to_the_client() {
    let Some(port) = mdns_port_or_skip("the cluster-file variant covers migration").await else { return };
    let (discovery, namespace) = (format!("mdns:{port}"), format!("migration-{}", std::process::id()));
    a_killed_worker_is_invisible(&["--discovery", &discovery, "--namespace", &namespace]).await;
}

/// Kills the worker a stream runs on, mid-stream; the client must get the text an uninterrupted run gives.
async fn a_killed_worker_is_invisible(discovery: &[&str]) {
    let start_worker = || Worker::start(&[&["--engine", "mocker"][..], discovery].concat());
    let first = start_worker();
    let router =
        Server::start_with(dynamo().args(["route", "--http-port", "0", "--worker-timeout", "1"]).args(discovery));
    wait_for_workers(&router, 1).await;
    let prompt = "A stream that outlives its worker: the router continues it on another one with the tokens so far.";
    let body = |stream: bool| long_completion(prompt, stream);
    let (status, reference) = router.post_json("/v1/completions", body(false)).await;
    assert_eq!(status, 200, "{reference}");

    let _second = start_worker();
    wait_for_workers(&router, 2).await;
    // The prompt's blocks are cached on the first worker, so the stream goes there; kill it once it is going.
    let response = router.post("/v1/completions", body(true)).await;
    assert_eq!(response.status().as_u16(), 200);
    let mut response = response;
    let mut text = String::new();
    let mut killer = Some(first);
    while let Some(chunk) = response.chunk().await.expect("the stream continues") {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if killer.is_some() && text.matches("data:").count() >= 10 {
            drop(killer.take()); // SIGKILL
        }
    }
    assert!(killer.is_none(), "the stream ended before the worker could be killed");
    let payloads = crate::util::sse_payloads(&text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_text(&payloads), reference["choices"][0]["text"].as_str().unwrap_or_default());
    let finish = payloads
        .iter()
        .rev()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .find_map(|v| v["choices"][0]["finish_reason"].as_str().map(str::to_string));
    assert_eq!(finish.as_deref(), Some("length"));
}

#[tokio::test]
async fn a_worker_told_to_stop_finishes_its_stream_before_it_exits_and_new_requests_go_elsewhere() {
    let (_, file) = cluster_file("drain");
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("drain-{}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).expect("a log file");
    let mut first = Worker::start_with(
        dynamo().args(["decode", "--engine", "mocker", "--discovery", &file, "--drain-timeout", "60"]).stderr(stderr),
    );
    // The kv cost, so the stream follows its prefix to the first worker (a latency router would rightly
    // prefer the second, which runs 20 times faster).
    let router = route_with(&file, &["--router-mode", "kv"]);
    wait_for_workers(&router, 1).await;
    let prompt = "A worker that is told to stop finishes what it serves: nothing moves, nothing is computed twice.";
    let body = |stream: bool| long_completion(prompt, stream);
    let (status, reference) = router.post_json("/v1/completions", body(false)).await;
    assert_eq!(status, 200, "{reference}");
    let _second = worker(&file, &[]);
    wait_for_workers(&router, 2).await;

    // The prompt's blocks are on the first worker, so the stream goes there; it is told to stop mid-stream.
    let mut response = router.post("/v1/completions", body(true)).await;
    assert_eq!(response.status().as_u16(), 200);
    let mut text = String::new();
    let mut signalled = false;
    while let Some(chunk) = response.chunk().await.expect("the stream continues") {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if !signalled && text.matches("data:").count() >= 10 {
            first.signal("TERM");
            signalled = true;
            // It has left discovery: the router stops sending it work while its stream goes on.
            wait_for_workers(&router, 1).await;
            let (status, body) = router.post_json("/v1/completions", completion("sent while it drains", 4)).await;
            assert_eq!(status, 200, "the other worker serves: {body}");
        }
    }
    assert!(signalled, "the stream ended before the worker could be told to stop");
    let payloads = crate::util::sse_payloads(&text);
    assert_eq!(streamed_text(&payloads), reference["choices"][0]["text"].as_str().unwrap_or_default());
    let exit = first.exit_within(Duration::from_secs(20)).expect("the drained worker exits");
    assert!(exit.success(), "{exit:?}");
    let said = std::fs::read_to_string(&log).expect("its log");
    assert!(said.contains("finishing 1 requests in flight") && said.contains("drained; stopping"), "{said}");
}

/// Whether two mDNS daemons on this host hear each other over loopback multicast on `port`.
async fn multicast_works(port: u16) -> bool {
    use dynamo::core::discovery::{Discovery, Mdns};
    use dynamo::core::protocol::discovery::{Instance, ModelCardSummary, Role};
    let (Ok(announcer), Ok(listener)) = (Mdns::new(port, None), Mdns::new(port, None)) else { return false };
    let namespace = format!("probe-{}", std::process::id());
    let mut events = listener.watch(&namespace);
    let card = ModelCardSummary { block_size: 16, context_length: 16, kv_blocks: 1, tokenizer_hash: 0 };
    let probe = Instance {
        id: u64::from(std::process::id()),
        role: Role::Decode,
        model: "probe".into(),
        namespace,
        request_addr: "tcp://127.0.0.1:9".into(),
        event_addr: "tcp://127.0.0.1:9".into(),
        transfer_addr: None,
        card,
        device: String::new(),
        http_addr: None,
        adapters: Vec::new(),
    };
    let Ok(_registration) = announcer.register(&probe) else { return false };
    tokio::time::timeout(Duration::from_secs(10), events.recv()).await.ok().flatten().is_some()
}

/// This process's mDNS port, or `None` (having said SKIPPED and what still covers the test) where loopback
/// multicast does not work.
async fn mdns_port_or_skip(covered_by: &str) -> Option<u16> {
    let port = 40000 + (std::process::id() % 20000) as u16;
    if multicast_works(port).await {
        return Some(port);
    }
    eprintln!("SKIPPED: loopback multicast does not work here; {covered_by}");
    None
}

#[tokio::test]
async fn workers_found_by_mdns_join_and_a_clean_exit_leaves_at_once() {
    let Some(port) = mdns_port_or_skip("the cluster-file tests cover discovery").await else { return };
    let discovery = format!("mdns:{port}");
    let namespace = format!("mdns-{}", std::process::id());
    let args = ["--discovery", &discovery, "--namespace", &namespace];
    let first = worker(&discovery, &args[2..]);
    let router = Server::start_with(dynamo().args(["route", "--http-port", "0", "--worker-timeout", "1"]).args(args));
    let second = worker(&discovery, &args[2..]);
    let _stranger = worker(&discovery, &["--namespace", "someone-else"]);
    wait_for_workers(&router, 2).await;
    let (status, body) = router.post_json("/v1/completions", completion("found by multicast DNS", 4)).await;
    assert_eq!(status, 200, "{body}");

    // SIGTERM: the worker sends its goodbye, and the router drops it without waiting for the heartbeat.
    let stopped = Instant::now();
    second.stop();
    wait_for_workers(&router, 1).await;
    assert!(stopped.elapsed() < Duration::from_secs(5), "a clean exit took {:?} to leave", stopped.elapsed());
    drop(first); // SIGKILL: no goodbye; the heartbeat notices.
    wait_for_workers(&router, 0).await;
}

#[tokio::test]
async fn a_router_that_joins_late_learns_the_workers_cache_from_a_snapshot() {
    let (_, file) = cluster_file("snapshot");
    let _worker = worker(&file, &[]);
    let first_router = route(&file);
    wait_for_workers(&first_router, 1).await;
    let prompt = "Cached before the second router existed: only the worker's snapshot can tell it about these blocks.";
    let (status, body) = first_router.post_json("/v1/completions", completion(prompt, 4)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) >= 32, "the prompt spans two blocks: {body}");

    // The worker's Stored events went out before this router subscribed; the snapshot is all it can know.
    let second_router = route(&file);
    wait_for_workers(&second_router, 1).await;
    let resynced = "dynamo_router_event_plane_total{event=\"resync_ok\"}";
    second_router
        .wait_for_metrics(Duration::from_secs(10), |text| crate::util::metric(text, resynced).unwrap_or(0.0) >= 1.0)
        .await;
    let (status, body) = second_router.post_json("/v1/completions", completion(prompt, 4)).await;
    assert_eq!(status, 200, "{body}");
    let metrics = second_router.metrics().await;
    let overlap = crate::util::metric(&metrics, "dynamo_router_overlap_blocks_sum{model=\"tiny-chat\"}");
    assert!(overlap.unwrap_or(0.0) >= 2.0, "the router's own index saw the cached prefix:\n{metrics}");
}

#[tokio::test]
async fn a_worker_at_its_limit_refuses_and_the_request_is_served_elsewhere() {
    let (_, file) = cluster_file("busy");
    // Slow, and one request at a time: round-robin sends it every other request.
    let _small = Worker::start(&["--engine", "mocker", "--max-in-flight", "1", "--discovery", &file]);
    let _large = worker(&file, &[]);
    let router = Server::start_with(dynamo().args([
        "route",
        "--http-port",
        "0",
        "--router-mode",
        "round-robin",
        "--discovery",
        &file,
    ]));
    wait_for_workers(&router, 2).await;
    let requests = (0..6).map(|i| router.post_json("/v1/completions", completion(&format!("request {i}"), 40)));
    for (status, body) in futures::future::join_all(requests).await {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 40, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    }
    // The workers' request-plane totals reach the router on the stats topic.
    let total = |metrics: &str, outcome: &str| {
        let label = format!("outcome=\"{outcome}\"");
        over_workers(metrics, "dynamo_component_request_plane_requests", &label).unwrap_or(0.0)
    };
    let metrics = router
        .wait_for_metrics(Duration::from_secs(10), |m| total(m, "refused") >= 1.0 && total(m, "accepted") >= 6.0)
        .await;
    // A round-robin router has no index: it neither takes KV events nor asks for snapshots of them.
    for event in ["resync_ok", "resync_failed"] {
        let name = format!("dynamo_router_event_plane_total{{event=\"{event}\"}}");
        assert_eq!(crate::util::metric(&metrics, &name).unwrap_or(0.0), 0.0, "{event}:\n{metrics}");
    }
}

/// The sum of a metric's samples whose labels include `label` over every worker (worker ids are random in
/// these tests); `None` if there are none.
pub fn over_workers(metrics: &str, name: &str, label: &str) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_request_on_the_remote_worker() {
    let (_, file) = cluster_file("cancel");
    let _worker = Worker::start(&["--engine", "mocker", "--speedup", "1", "--discovery", &file]);
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    let body = json!({"model": "tiny-chat", "prompt": "a long story", "max_tokens": 3000, "ignore_eos": true,
                      "stream": true});
    let mut response = router.post("/v1/completions", body).await;
    response.chunk().await.expect("the stream starts");
    let running = "dynamo_component_requests_running";
    router.wait_for_metrics(Duration::from_secs(10), |m| over_workers(m, running, "") == Some(1.0)).await;
    drop(response);
    // The worker's own load report, over the event plane, says the request is gone and its blocks freed.
    router
        .wait_for_metrics(Duration::from_secs(10), |m| {
            over_workers(m, running, "") == Some(0.0)
                && over_workers(m, "dynamo_component_kvstats_active_blocks", "") == Some(0.0)
        })
        .await;
}

#[tokio::test]
async fn a_router_started_before_its_workers_answers_at_once_and_serves_when_one_joins() {
    let (_, file) = cluster_file("early-router");
    let router = route(&file);
    let live = reqwest::get(router.url("/live")).await.expect("live answers");
    assert_eq!(live.status().as_u16(), 200);
    let health = reqwest::get(router.url("/health")).await.expect("health answers");
    assert_eq!(health.status().as_u16(), 503);
    let (status, body) = router.post_json("/v1/completions", completion("too early", 4)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("dynamo decode"), "{body}");
    let models: Value = reqwest::get(router.url("/v1/models")).await.expect("models").json().await.expect("json");
    assert_eq!(models["data"], json!([]), "{models}");

    let _worker = worker(&file, &[]);
    wait_for_workers(&router, 1).await;
    let (status, body) = router.post_json("/v1/completions", completion("now there is a worker", 4)).await;
    assert_eq!(status, 200, "{body}");
    let models: Value = reqwest::get(router.url("/v1/models")).await.expect("models").json().await.expect("json");
    assert_eq!(models["data"][0]["id"], "tiny-chat", "{models}");
}

#[tokio::test]
async fn workers_of_two_models_are_served_by_one_router_each_to_its_own() {
    let (_, file) = cluster_file("two-models");
    let _chat = worker(&file, &[]);
    // Served under two names (vLLM's `--served-model-name a b`, or a comma list): the router answers to both.
    let _other = worker(&file, &["--served-model-name", "tiny-other", "other-alias"]);
    let _other_too = worker(&file, &["--served-model-name", "tiny-other,other-alias"]);
    let router = route(&file);
    wait_for_workers(&router, 3).await;

    let health: Value = reqwest::get(router.url("/health")).await.expect("health").json().await.expect("json");
    assert_eq!(health["models"], json!({"tiny-chat": 1, "tiny-other": 2}), "{health}");
    let models: Value = reqwest::get(router.url("/v1/models")).await.expect("models").json().await.expect("json");
    let mut ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["other-alias", "tiny-chat", "tiny-other"], "{models}");
    let alias: Value =
        reqwest::get(router.url("/v1/models/other-alias")).await.expect("model").json().await.expect("json");
    assert_eq!(alias["id"], "other-alias", "{alias}");

    for (name, answered) in [("tiny-chat", "tiny-chat"), ("tiny-other", "tiny-other"), ("other-alias", "tiny-other")] {
        let request = json!({"model": name, "prompt": "to the right workers", "max_tokens": 4, "ignore_eos": true});
        let (status, body) = router.post_json("/v1/completions", request).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], answered, "answers carry the first name, as vLLM's: {body}");
        assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    }
    // Each model's requests go to its own workers only: without its one worker, tiny-chat is unavailable
    // while tiny-other still serves.
    drop(_chat);
    wait_for_workers(&router, 2).await;
    let request = |model: &str| json!({"model": model, "prompt": "after the loss", "max_tokens": 2});
    let (status, body) = router.post_json("/v1/completions", request("tiny-chat")).await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = router.post_json("/v1/completions", request("tiny-other")).await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = router.post_json("/v1/completions", json!({"prompt": "which one?", "max_tokens": 2})).await;
    assert_eq!(status, 400, "with two models the request must name one: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("tiny-chat") && message.contains("tiny-other"), "{body}");
    let (status, body) =
        router.post_json("/v1/completions", json!({"model": "tiny-missing", "prompt": "x", "max_tokens": 2})).await;
    assert_eq!(status, 404, "{body}");
}

/// Runs `dynamo top --once` against the cluster file and returns what it printed.
pub fn top_once(file: &str, namespace: &str, extra: &[&str]) -> String {
    let mut child = dynamo()
        .args(["top", "--once", "--wait", "2.5", "--discovery", file, "--namespace", namespace])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the dynamo binary starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("top's status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dynamo top --once did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("top's output");
    assert!(output.status.success(), "dynamo top failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `dynamo top`'s table rows of workers (routers have rows too, with role `router`).
fn worker_rows(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|line| line.contains("tcp://") && !line.contains(" router "))
}

/// The cells of `dynamo top`'s column `name`, one per worker row.
fn column(text: &str, name: &str) -> Vec<String> {
    let header = text.lines().find(|line| line.starts_with("WORKER")).expect("a header line");
    let at = header.find(name).unwrap_or_else(|| panic!("no column {name}:\n{text}"));
    // In characters: the RUN TREND column's bars are several bytes each.
    let at = header[..at].chars().count();
    let rows = worker_rows(text);
    rows.map(|row| row.chars().skip(at).collect::<String>().split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn top_shows_every_worker_of_its_namespace_with_its_load_and_requests() {
    let (_, file) = cluster_file("top");
    let _chat = worker(&file, &[]);
    let _other = worker(&file, &["--served-model-name", "tiny-other"]);
    let _elsewhere = worker(&file, &["--namespace", "elsewhere"]);
    let router = route(&file);
    wait_for_workers(&router, 2).await;
    for _ in 0..3 {
        let (status, body) = router.post_json("/v1/completions", completion("counted by top", 4)).await;
        assert_eq!(status, 200, "{body}");
    }

    let text = tokio::task::spawn_blocking(move || top_once(&file, "dynamo", &[])).await.expect("top ran");
    assert!(text.contains("2 workers, 2 alive"), "{text}");
    let rows: Vec<&str> = worker_rows(&text).collect();
    assert_eq!(rows.len(), 2, "the other namespace's worker is not shown:\n{text}");
    assert!(rows.iter().any(|r| r.contains("tiny-chat")) && rows.iter().any(|r| r.contains("tiny-other")), "{text}");
    // Load arrived from both and the requests were counted.
    assert!(column(&text, "KV HELD").iter().all(|cell| cell.contains('/')), "{text}");
    assert!(column(&text, "DEVICE").iter().all(|cell| cell == "mocker"), "each worker's answer names it:\n{text}");
    assert!(column(&text, "RUN").iter().all(|cell| cell.ends_with("/256")), "out of --max-num-seqs:\n{text}");
    let requests: u64 = column(&text, "ROUTED").iter().map(|cell| cell.parse::<u64>().unwrap_or(0)).sum();
    assert_eq!(requests, 3, "{text}");
}

#[tokio::test]
async fn a_dynamo_run_that_announces_its_workers_is_seen_by_top_and_served_by_other_routers() {
    let (_, file) = cluster_file("run-announced");
    let run = Server::start(&["--workers", "2", "--discovery", &file, "--namespace", "dev"]);
    let (status, body) = run.post_json("/v1/completions", completion("through the run's own frontend", 4)).await;
    assert_eq!(status, 200, "{body}");

    let spec = file.clone();
    let text = tokio::task::spawn_blocking(move || top_once(&spec, "dev", &[])).await.expect("top ran");
    assert!(text.contains("2 workers, 2 alive"), "{text}");
    // The same workers, reached over the planes by a separate router.
    let router =
        Server::start_with(dynamo().args(["route", "--http-port", "0", "--discovery", &file, "--namespace", "dev"]));
    wait_for_workers(&router, 2).await;
    let (status, body) = router.post_json("/v1/completions", completion("through another router", 4)).await;
    assert_eq!(status, 200, "{body}");
    let json = tokio::task::spawn_blocking(move || top_once(&file, "dev", &["--json"])).await.expect("top ran");
    let view: Value = serde_json::from_str(&json).expect("top --json prints JSON");
    let members = view["workers"].as_array().expect("a list of workers");
    let workers: Vec<&Value> = members.iter().filter(|m| m["record"]["role"] != "router").collect();
    assert_eq!(workers.len(), 2, "{view}");
    assert!(workers.iter().all(|w| w["state"] == "alive" && w["load"]["kv_total_blocks"].as_u64() > Some(0)));
    // Its OpenAI server serves two workers, so neither record names it as its own.
    assert!(workers.iter().all(|w| w["record"]["http_addr"].is_null()), "{view}");
    let routed: u64 = workers.iter().filter_map(|w| w["stats"]["accepted"].as_u64()).sum();
    assert_eq!(routed, 1, "only the request that came over the request plane is counted as routed: {view}");
}

#[tokio::test]
async fn a_request_past_a_workers_kv_capacity_gets_the_same_400_from_run_and_route() {
    // 4 blocks of 16 tokens: at most 64 tokens per sequence.
    let small = ["--num-blocks", "4", "--block-size", "16"];
    let body = completion("a prompt that fits, with far too many tokens asked for", 100);
    let alone = Server::start(&small);
    let (file_path, file) = cluster_file("capacity");
    let _worker = worker(&file, &small);
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    let (run_status, run_error) = alone.post_json("/v1/completions", body.clone()).await;
    let (route_status, route_error) = router.post_json("/v1/completions", body.clone()).await;
    assert_eq!(run_status, 400, "{run_error}");
    assert_eq!((route_status, &route_error), (run_status, &run_error));
    assert!(run_error["error"]["message"].as_str().unwrap().contains("at most 64"), "{run_error}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, error) = router.post_json("/v1/completions", streamed).await;
    assert_eq!((status, &error), (400, &run_error), "streaming or not, the same answer");
    let _ = std::fs::remove_dir_all(file_path.parent().unwrap());
}

#[tokio::test]
async fn a_keyed_cluster_serves_its_members_and_says_when_it_is_open() {
    let (file_path, file) = cluster_file("keyed");
    let key_file = file_path.with_file_name("cluster.key");
    let made = dynamo().args(["keygen", "--out"]).arg(&key_file).output().expect("keygen runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let key = std::fs::read_to_string(&key_file).unwrap();
    let key_file = key_file.to_str().unwrap();
    // One worker reads the key from the environment, the router from the file.
    let _member = Worker::start_with(
        dynamo()
            .args(["decode", "--engine", "mocker", "--speedup", "20", "--discovery", &file])
            .env("DYNAMO_CLUSTER_KEY", key.trim()),
    );
    let router = route_with(&file, &["--cluster-key-file", key_file]);
    wait_for_workers(&router, 1).await;
    let (status, body) = router.post_json("/v1/completions", completion("sealed on the wire", 4)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    let top = |args: &[&str]| {
        let out = dynamo()
            .args(["top", "--once", "--json", "--wait", "1.5", "--discovery", &file])
            .args(args)
            .output()
            .expect("top runs");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (seen, said) = top(&["--cluster-key-file", key_file]);
    assert!(seen.contains("tiny-chat"), "top with the key sees the worker's record: {seen}");
    assert!(!said.contains("cluster is open"), "{said}");
    let (unseen, said) = top(&[]);
    assert!(!unseen.contains("tiny-chat"), "top without the key read a sealed record: {unseen}");
    assert!(said.contains("the cluster is open"), "{said}");
    // A hand-written entry's mac, printed for pasting; without a key there is nothing to sign with.
    let signed = dynamo().args(["keygen", "--sign", "tcp://10.0.0.9:7100", "--cluster-key-file", key_file]).output();
    let signed = String::from_utf8_lossy(&signed.expect("keygen runs").stdout).into_owned();
    assert!(signed.starts_with("mac = \"") && signed.trim_end().len() == "mac = \"\"".len() + 64, "{signed}");
    let unsigned = dynamo().args(["keygen", "--sign", "tcp://10.0.0.9:7100"]).env_remove("DYNAMO_CLUSTER_KEY").output();
    let unsigned = unsigned.expect("keygen runs");
    assert!(!unsigned.status.success());
    assert!(String::from_utf8_lossy(&unsigned.stderr).contains("--sign needs the cluster key"));
    let _ = std::fs::remove_dir_all(file_path.parent().unwrap());
}

#[tokio::test]
async fn a_router_publishes_its_traffic_which_top_shows_under_its_summary() {
    let (_, file) = cluster_file("router-report");
    let _worker = worker(&file, &[]);
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    let (status, body) = router.post_json("/v1/completions", completion("counted by the router", 4)).await;
    assert_eq!(status, 200, "{body}");
    let text = tokio::task::spawn_blocking(move || top_once(&file, "dynamo", &[])).await.expect("top ran");
    let line = text.lines().find(|line| line.starts_with("router ")).unwrap_or_else(|| panic!("no router:\n{text}"));
    assert!(line.contains("requests/s") && line.ends_with("1 workers"), "{text}");
    assert!(text.contains("1 worker, 1 alive"), "the router is a member, not a worker:\n{text}");
}

#[tokio::test]
async fn a_workers_max_model_len_and_chat_template_hold_at_a_router_in_another_process() {
    let (dir, file) = cluster_file("max-model-len");
    let template = dir.parent().unwrap().join("fixed.jinja");
    std::fs::write(&template, "{% for m in messages %}Q: {{ m.content }}\nA:{% endfor %}").unwrap();
    let _worker = worker(&file, &["--max-model-len", "64", "--chat-template", template.to_str().unwrap()]);
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    // Without max_tokens a chat gets the rest of the 64 tokens, not of the model's own context (which the
    // worker would refuse).
    let chat = json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": true});
    let (status, answer) = router.post_json("/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{answer}");
    let usage = &answer["usage"];
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap(), 64, "{answer}");
    // The worker's template, not the model's: the prompt is "Q: hi\nA:".
    let tokenizer =
        dynamo::core::model::Model::load(&dynamo::core::model::ModelSource::Builtin, None).unwrap().tokenizer;
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(tokenizer.encode("Q: hi\nA:", false).unwrap().len() as u64));
    let (status, refused) = router.post_json("/v1/completions", completion("hello", 100)).await;
    assert_eq!(status, 400, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("64"), "{refused}");
}

/// The first sample of `family` in a Prometheus text (whatever its labels), e.g. `vllm:num_requests_running`.
fn sample(text: &str, family: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|line| line.starts_with(&format!("{family}{{")) || line.starts_with(&format!("{family} ")))?;
    line.rsplit(' ').next()?.parse().ok()
}

#[tokio::test]
async fn a_workers_metrics_port_shows_its_load_under_vllms_names_and_its_health_fails_once_it_drains() {
    let (_, file) = cluster_file("worker-metrics");
    let (mut worker, line) = Worker::start_saying(
        "decode",
        // Slowed down, so the stream is still running when the worker is told to stop.
        dynamo().args([
            "decode",
            "--engine",
            "mocker",
            "--speedup",
            "0.1",
            "--discovery",
            &file,
            "--metrics-port",
            "0",
        ]),
    );
    let at = line.find("metrics http://").expect("the banner names the metrics port") + "metrics ".len();
    let metrics_url = line[at..].split([',', ')', ' ']).next().unwrap_or_default().to_string();
    let health_url = metrics_url.replace("/metrics", "/health");
    let scrape = || async { reqwest::get(&metrics_url).await.expect("metrics answer").text().await.expect("text") };
    let health = || async {
        let response = reqwest::get(&health_url).await.expect("health answers");
        (response.status().as_u16(), response.json::<Value>().await.expect("JSON"))
    };

    let idle = scrape().await;
    assert_eq!(sample(&idle, "vllm:num_requests_running"), Some(0.0), "{idle}");
    assert_eq!(sample(&idle, "vllm:num_requests_waiting"), Some(0.0), "{idle}");
    assert_eq!(sample(&idle, "vllm:kv_cache_usage_perc"), Some(0.0), "{idle}");
    let config = idle.lines().find(|l| l.starts_with("vllm:cache_config_info{")).expect("cache config");
    assert!(config.contains("block_size=\"16\"") && config.contains("model_name=\"tiny-chat\""), "{config}");
    assert!(sample(&idle, "dynamo_component_kvstats_total_blocks").is_some_and(|b| b > 0.0), "{idle}");
    let (status, body) = health().await;
    assert_eq!((status, body["status"].as_str()), (200, Some("healthy")), "{body}");

    // A stream in flight is the worker's load, as its gauges say.
    let router = route(&file);
    wait_for_workers(&router, 1).await;
    let mut response = router.post("/v1/completions", long_completion("Gauges a gateway can read.", true)).await;
    assert_eq!(response.status().as_u16(), 200);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let busy = scrape().await;
        if sample(&busy, "vllm:num_requests_running") == Some(1.0) {
            assert!(sample(&busy, "vllm:kv_cache_usage_perc").is_some_and(|u| u > 0.0), "{busy}");
            let accepted = busy.lines().find(|l| {
                l.starts_with("dynamo_component_request_plane_requests{") && l.contains("outcome=\"accepted\"")
            });
            assert!(accepted.is_some_and(|l| l.ends_with(" 1")), "the request plane's totals: {busy}");
            break;
        }
        assert!(Instant::now() < deadline, "the running stream never showed: {busy}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Told to stop, it fails its readiness at once, and still finishes the stream.
    worker.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = health().await;
        if status == 503 {
            assert_eq!(body["status"], "draining", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "health never said draining: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while let Some(chunk) = response.chunk().await.expect("the stream continues") {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(worker.exit_within(Duration::from_secs(20)).is_some_and(|s| s.success()), "the worker exits");
}
