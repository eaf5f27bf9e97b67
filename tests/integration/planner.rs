//! `dynamo route --planner`: the planner sizes a real cluster of worker processes it starts and drains.
use crate::util::{Server, dynamo, metric};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A fresh directory, and the discovery spec of a cluster file in it.
fn cluster(name: &str) -> (std::path::PathBuf, String) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let discovery = format!("file:{}", dir.join("cluster.toml").display());
    (dir, discovery)
}

/// Decode workers the planner's last plan saw alive, and wanted.
fn decode_workers(metrics: &str) -> (f64, f64) {
    let read = |state: &str| metric(metrics, &format!("dynamo_planner_workers{{role=\"decode\",state=\"{state}\"}}"));
    (read("observed").unwrap_or(0.0), read("wanted").unwrap_or(0.0))
}

/// Clients that send long greedy requests back to back until told to stop; each checks its answer.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Load {
    fn start(router: &Server, clients: usize) -> Load {
        let (stop, done, failed) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::default());
        let clients = (0..clients)
            .map(|client| {
                let url = router.url("/v1/completions");
                let (stop, done, failed): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
                    (stop.clone(), Arc::clone(&done), Arc::clone(&failed));
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        // A prompt of its own each time: no prefix cache shrinks what it needs.
                        let prompt =
                            format!("client {client} request {n}: {}", "scale the cluster to its load ".repeat(12));
                        let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 200,
                                          "temperature": 0, "ignore_eos": true});
                        let answer = http.post(&url).json(&body).send().await;
                        let ok = match answer {
                            Ok(response) if response.status() == 200 => response
                                .json::<Value>()
                                .await
                                .is_ok_and(|body| body["usage"]["completion_tokens"] == 200),
                            _ => false,
                        };
                        let counter = if ok { &done } else { &failed };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { stop, clients, done, failed }
    }

    /// Stops sending and waits for the requests in flight; returns (succeeded, failed).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            let _ = client.await;
        }
        (self.done.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_planner_scales_up_under_load_and_drains_down_after_it_without_a_failed_request() {
    let (dir, discovery) = cluster("planner");
    let log = dir.join("route.log");
    let mut router = Server::start_with(
        dynamo()
            .args(["route", "--http-port", "0", "--worker-timeout", "2", "--discovery", &discovery])
            .args(["--planner", "auto", "--planner-interval", "1", "--min-workers", "1", "--max-workers", "3"])
            // Small KV caches, so that a few long requests fill one worker and queue.
            .args(["--", "--engine", "mocker", "--num-blocks", "48", "--speedup", "4"])
            .stderr(std::fs::File::create(&log).expect("a log file")),
    );
    let wait = Duration::from_secs(60);
    router.wait_for_metrics(wait, |m| decode_workers(m) == (1.0, 1.0)).await;

    let heavy = Load::start(&router, 8);
    router.wait_for_metrics(wait, |m| decode_workers(m).0 >= 3.0).await;
    let (done_heavy, failed_heavy) = heavy.finish().await;

    // Down one worker per interval, with a request still coming now and then.
    let light = Load::start(&router, 1);
    let metrics = router.wait_for_metrics(wait, |m| decode_workers(m) == (1.0, 1.0)).await;
    let (done_light, failed_light) = light.finish().await;
    assert_eq!((failed_heavy, failed_light), (0, 0), "{done_heavy} + {done_light} requests succeeded");
    assert!(done_heavy > 0 && done_light > 0);
    let decisions = |decision: &str| {
        metric(&metrics, &format!("dynamo_planner_decisions_total{{decision=\"{decision}\",role=\"decode\"}}"))
            .unwrap_or(0.0)
    };
    assert!(decisions("up") >= 2.0 && decisions("down") >= 2.0, "{metrics}");

    let exit = router.terminate_within(Duration::from_secs(40)).expect("the router exits once its workers drained");
    assert!(exit.success(), "{exit:?}");
    let said = std::fs::read_to_string(&log).expect("the router's log");
    // Three drains: two scaled down, the last at shutdown; none killed, none died.
    assert_eq!(said.matches("drained; stopping").count(), 3, "{said}");
    assert!(!said.contains("did not exit after draining") && !said.contains("exited by itself"), "{said}");
}

/// A disaggregated cluster of mocker processes, started by the planner: a prefill worker and a decode worker
/// that reads its KV, and a request handed from one to the other.
#[tokio::test]
async fn the_local_planner_starts_mocker_prefill_and_decode_workers_that_hand_off() {
    let (dir, discovery) = cluster("planner-disagg");
    let mut router = Server::start_with(
        dynamo()
            .args(["route", "--http-port", "0", "--worker-timeout", "2", "--discovery", &discovery])
            .args(["--planner", "auto", "--planner-interval", "1", "--min-workers", "1", "--max-workers", "1"])
            .args(["--min-prefill-workers", "1", "--max-prefill-workers", "1"])
            .args(["--", "--engine", "mocker", "--speedup", "10"])
            .stderr(std::fs::File::create(dir.join("route.log")).expect("a log file")),
    );
    let observed =
        |m: &str, role: &str| metric(m, &format!("dynamo_planner_workers{{role=\"{role}\",state=\"observed\"}}"));
    let wait = Duration::from_secs(60);
    router.wait_for_metrics(wait, |m| observed(m, "decode") == Some(1.0) && observed(m, "prefill") == Some(1.0)).await;

    let body =
        json!({"model": "tiny-chat", "prompt": "a prompt for the prefill worker", "max_tokens": 8, "ignore_eos": true});
    let (status, answer) = router.post_json("/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 8, "{answer}");
    let read = |m: &str| {
        crate::cluster::over_workers(m, "dynamo_component_kv_transfers", "what=\"read\"") == Some(1.0)
            && metric(m, "dynamo_router_disagg_decisions_total{decision=\"remote\"}") == Some(1.0)
    };
    router.wait_for_metrics(Duration::from_secs(10), read).await;
    let exit = router.terminate_within(Duration::from_secs(40)).expect("the router exits once its workers drained");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn workers_that_cannot_start_are_tried_three_times_and_no_more() {
    let (dir, discovery) = cluster("planner-bad");
    let log = dir.join("route.log");
    let _router = Server::start_with(
        dynamo()
            .args(["route", "--http-port", "0", "--discovery", &discovery])
            .args(["--planner", "auto", "--planner-interval", "0.2"])
            // Read as a flag, refused only when the worker loads it.
            .args(["--", "--model", "/no/such/model"])
            .stderr(std::fs::File::create(&log).expect("a log file")),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let said = loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.contains("starting no more") {
            break said;
        }
        assert!(std::time::Instant::now() < deadline, "the planner kept starting workers:\n{said}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(said.matches("started decode worker").count(), 3, "{said}");
    assert!(said.contains("/no/such/model"), "the workers' own error is in the router's output: {said}");
}

#[tokio::test]
async fn every_plan_goes_out_on_the_event_plane_where_top_shows_it() {
    let (_, discovery) = cluster("planner-virtual");
    let _worker = crate::util::Worker::start(&["--engine", "mocker", "--discovery", &discovery]);
    let router = Server::start_with(
        dynamo()
            .args(["route", "--http-port", "0", "--discovery", &discovery])
            .args(["--planner", "auto", "--planner-connector", "virtual", "--planner-interval", "0.5"])
            .args(["--min-workers", "2"]),
    );
    // It wants two, and starts none: that is the orchestrator's part.
    router.wait_for_metrics(Duration::from_secs(30), |m| decode_workers(m) == (1.0, 2.0)).await;
    let health: Value = reqwest::get(router.url("/health")).await.expect("health").json().await.expect("json");
    assert_eq!(health["workers"], 1, "the planner is not a worker the router routes to: {health}");

    let text = crate::cluster::top_once(&discovery, "dynamo", &["--json"]);
    let top: Value = serde_json::from_str(text.lines().last().unwrap_or_default()).expect("top's JSON");
    let members = top["workers"].as_array().expect("members");
    let planner = members.iter().find(|m| m["record"]["role"] == "planner").expect("the planner is a member");
    assert_eq!(planner["state"], "alive", "{planner}");
    assert_eq!(
        (planner["plan"]["decode"].as_u64(), planner["plan"]["prefill"].as_u64()),
        (Some(2), Some(0)),
        "{planner}"
    );
    let text = crate::cluster::top_once(&discovery, "dynamo", &[]);
    assert!(text.contains(": 2 decode, 0 prefill workers"), "{text}");
    assert!(text.contains("1 worker, 1 alive"), "{text}");
}

/// `--planner-profile workers`: the planner sizes by the profile the router got from its workers (the
/// mocker's), with no file: its profile-based corrections appear once the worker has joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planner_sizes_by_the_profile_the_workers_send() {
    let (_, discovery) = cluster("planner-worker-profile");
    let router = Server::start_with(
        dynamo()
            .args(["route", "--http-port", "0", "--discovery", &discovery])
            .args(["--planner", "auto", "--planner-connector", "virtual", "--planner-interval", "0.5"])
            .args(["--planner-profile", "workers", "--ttft-target-ms", "500"]),
    );
    let corrected = |m: &str| metric(m, "dynamo_planner_correction{phase=\"prefill\"}").is_some();
    // Sized by load alone until a worker has sent its profile.
    router.wait_for_metrics(Duration::from_secs(30), |m| decode_workers(m).1 >= 1.0).await;
    let before = reqwest::get(router.url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(!corrected(&before), "no worker, no profile: {before}");
    let _worker = crate::util::Worker::start(&["--engine", "mocker", "--discovery", &discovery]);
    router.wait_for_metrics(Duration::from_secs(30), corrected).await;
}

#[tokio::test]
async fn the_kubernetes_connector_sets_the_replicas_of_the_decode_deployment() {
    use axum::routing::patch;
    let (tx, mut patches) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let app = axum::Router::new().route(
        "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale",
        patch(move |uri: axum::http::Uri, body: String| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((uri.path().to_string(), body));
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let api = format!("http://{}", listener.local_addr().expect("its address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (_, discovery) = cluster("planner-kube");
    let _router = Server::start_with(
        dynamo()
            .args(["route", "--http-port", "0", "--discovery", &discovery])
            .args(["--planner", "auto", "--planner-connector", "kubernetes", "--planner-interval", "0.5"])
            .args(["--min-workers", "2", "--kube-api", &api, "--kube-namespace", "llm"])
            .args(["--kube-decode-deployment", "dynamo-decode"]),
    );
    let (path, body) = tokio::time::timeout(Duration::from_secs(30), patches.recv())
        .await
        .expect("a scale request within 30 s")
        .expect("the fake API runs");
    assert_eq!(path, "/apis/apps/v1/namespaces/llm/deployments/dynamo-decode/scale");
    assert_eq!(body, r#"{"spec":{"replicas":2}}"#);
}
