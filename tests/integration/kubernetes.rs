//! `--discovery k8s`: real `dynamo decode` and `dynamo route` processes that find each other through a fake
//! Kubernetes API server, reached through a kubeconfig as from outside a cluster.
#[path = "../../src/core/kube/fake.rs"]
mod fake;

use crate::cluster::wait_for_workers;
use crate::util::{Server, Worker, dynamo};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices";
const WORKERS: &str = "/apis/dynamo.rs/v1alpha1/namespaces/llm/dynamoworkers";

/// A kubeconfig whose current context is the fake API, namespace `llm`, with a token.
fn kubeconfig(api: &fake::FakeApi) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join("config");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
         contexts:\n- name: fake\n  context: {{cluster: fake, user: ops, namespace: llm}}\nusers:\n- name: ops\n  \
         user: {{token: t0ken}}\n",
        api.url
    );
    std::fs::write(&path, text).expect("the kubeconfig is written");
    path
}

/// The EndpointSlice of the workers' Service, saying whether pod `name` is ready.
fn slice(name: &str, ready: bool) -> Value {
    json!({
        "metadata": {"name": "decode-abcde", "labels": {"dynamo.rs/discovery": "enabled"}},
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready},
                       "targetRef": {"kind": "Pod", "name": name, "uid": format!("uid-{name}")}}],
    })
}

async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Two threads: the fake API answers while this one waits on processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_found_through_the_kubernetes_api_serve_while_their_pods_are_ready() {
    let api = fake::FakeApi::start().await;
    let config = kubeconfig(&api);
    let worker = Worker::start_with(
        dynamo()
            .args(["decode", "--engine", "mocker", "--discovery", "k8s"])
            .env("KUBECONFIG", &config)
            .env("POD_NAME", "decode-0")
            .env("POD_UID", "uid-decode-0"),
    );
    until("the worker's record", || api.names(WORKERS).len() == 1).await;
    let record = api.object(WORKERS, &api.names(WORKERS)[0]).expect("the record");
    assert_eq!(record["metadata"]["ownerReferences"][0]["name"], "decode-0", "{record}");
    assert!(api.requests().iter().all(|r| !r.contains("dynamo.rs") || r.contains("dynamoworkers")));

    let router = Server::start_with(
        dynamo()
            .args(["route", "--http-port", "0", "--worker-timeout", "1", "--discovery", "k8s"])
            .env("KUBECONFIG", &config),
    );
    // Its pod is not ready yet: the router does not use it.
    api.put(SLICES, slice("decode-0", false));
    let (status, body) =
        router.post_json("/v1/completions", json!({"model": "tiny-chat", "prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(status, 503, "{body}");
    api.put(SLICES, slice("decode-0", true));
    wait_for_workers(&router, 1).await;
    let (status, body) =
        router.post_json("/v1/completions", json!({"model": "tiny-chat", "prompt": "hi", "max_tokens": 4})).await;
    assert_eq!(status, 200, "{body}");

    // `dynamo top` finds it the same way (run on a blocking thread: the fake API answers on this runtime).
    let config_for_top = config.clone();
    let top = tokio::task::spawn_blocking(move || {
        dynamo()
            .args(["top", "--once", "--wait", "2", "--discovery", "k8s"])
            .env("KUBECONFIG", &config_for_top)
            .output()
            .expect("dynamo top runs")
    })
    .await
    .expect("top's thread");
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(text.contains("1 worker, 1 alive"), "{text}{}", String::from_utf8_lossy(&top.stderr));

    // A clean exit deletes its record; the router lets the worker go.
    worker.stop();
    until("the record's deletion", || api.names(WORKERS).is_empty()).await;
    wait_for_workers(&router, 0).await;
}

#[test]
fn a_worker_outside_a_pod_is_told_what_the_downward_api_must_give() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kube-no-pod-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let config = dir.join("config");
    std::fs::write(&config, "apiVersion: v1\nclusters: []\n").expect("written");
    let output = dynamo()
        .args(["decode", "--engine", "mocker", "--discovery", "k8s"])
        .env("KUBECONFIG", &config)
        .env_remove("POD_NAME")
        .output()
        .expect("dynamo runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no current-context"), "{stderr}");
}
