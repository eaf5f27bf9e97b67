//! `dynamo route --epp-port`: a gateway's ext_proc stream (played by a tonic client, as Envoy sends it with
//! GAIE's configuration) against a real router whose workers are `dynamo run` model servers.
use crate::cluster::{cluster_file, wait_for_workers};
use crate::util::{Server, Worker, dynamo};
use dynamo::core::epp::gateway::{self, Gateway};
use dynamo::core::protocol::ext_proc::{ProcessingRequest, ProcessingResponse, Response};
use serde_json::json;

/// A model server: one mocker worker behind its own OpenAI server, announced in `namespace`.
fn model_server(file: &str, namespace: &str) -> Server {
    Server::start(&["--workers", "1", "--discovery", file, "--namespace", namespace])
}

/// Sends a POST to `path` with `body` as Envoy would, with the gateway's `subset` if any, over h2c; the
/// picker's first answer.
async fn ask(picker: &str, path: &str, body: &serde_json::Value, subset: Option<&str>) -> ProcessingResponse {
    let messages = gateway::post(path, body.to_string().as_bytes(), subset);
    exchange(picker, messages).await.expect("an answer")
}

/// A stream of `messages` over h2c: the picker's first answer, or the gRPC status it ended the stream with.
async fn exchange(picker: &str, messages: Vec<ProcessingRequest>) -> Result<ProcessingResponse, tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{picker}")).expect("a URI");
    Gateway::connect(endpoint).await.expect("the picker accepts").exchange(messages).await
}

fn destination(answer: &ProcessingResponse) -> String {
    gateway::destination(answer).unwrap_or_else(|| panic!("not a pick: {answer:?}"))
}

/// The address after `marker` in a line the router printed.
fn printed(line: &str, marker: &str) -> String {
    let after = line.split(marker).nth(1).unwrap_or_else(|| panic!("{marker:?} is not in {line:?}"));
    after.split(|c: char| c.is_whitespace() || c == ')').next().expect("an address").to_string()
}

fn host_port(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn the_picker_sends_a_request_to_the_model_server_that_holds_its_prefix_within_the_gateways_subset() {
    let namespace = format!("epp-{}", std::process::id());
    let (_, file) = cluster_file("epp");
    let (a, b) = (model_server(&file, &namespace), model_server(&file, &namespace));
    let (router, line) =
        Server::start_saying(dynamo().args(["route", "--http-port", "0", "--epp-port", "0", "--epp-insecure"]).args([
            "--discovery",
            &file,
            "--namespace",
            &namespace,
        ]));
    let picker = printed(&line, "h2c) on ");
    wait_for_workers(&router, 2).await;

    // A's worker computes a long prompt's KV; its events reach the router's index.
    let prompt = "The gateway asks the picker where to send each request. ".repeat(12);
    let warm = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 1});
    let (status, body) = a.post_json("/v1/completions", warm).await;
    assert_eq!(status, 200, "{body}");
    let request = json!({"model": "tiny-chat", "prompt": format!("{prompt} And then?"), "max_tokens": 4});
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while destination(&ask(&picker, "/v1/completions", &request, None).await) != host_port(&a) {
        assert!(std::time::Instant::now() < deadline, "the picker never chose the worker that holds the prefix");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for _ in 0..4 {
        assert_eq!(destination(&ask(&picker, "/v1/completions", &request, None).await), host_port(&a));
    }
    // Within a subset without A, B; with nothing eligible, 503; a bad request, the frontend's 400.
    let only_b = host_port(&b);
    assert_eq!(destination(&ask(&picker, "/v1/completions", &request, Some(&only_b)).await), only_b);
    let answer = ask(&picker, "/v1/completions", &request, Some("10.255.0.1:9")).await;
    let Some(Response::ImmediateResponse(refused)) = &answer.response else { panic!("{answer:?}") };
    assert_eq!(refused.status.as_ref().map(|s| s.code), Some(503));
    let answer = ask(&picker, "/v1/completions", &json!({"model": "tiny-chat", "max_tokens": 4}), None).await;
    let Some(Response::ImmediateResponse(refused)) = &answer.response else { panic!("{answer:?}") };
    assert_eq!(refused.status.as_ref().map(|s| s.code), Some(400), "{}", String::from_utf8_lossy(&refused.body));
    // A malformed message ends its stream with a gRPC error; the picker goes on.
    let error = exchange(&picker, vec![ProcessingRequest::default()]).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
    // The destination serves the request.
    let chosen =
        if destination(&ask(&picker, "/v1/completions", &request, None).await) == host_port(&a) { &a } else { &b };
    let (status, body) = chosen.post_json("/v1/completions", request).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_picker_speaks_tls_by_default_or_with_a_given_certificate_and_says_when_it_is_ready() {
    let namespace = format!("epp-tls-{}", std::process::id());
    let (_, file) = cluster_file("epp-tls");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("epp-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    let (certificate, key) = (dir.join("picker.pem"), dir.join("picker.key"));
    std::fs::write(&certificate, made.cert.pem()).expect("written");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("written");
    let route =
        |tls: &[&str]| {
            Server::start_saying(
                dynamo()
                    .args(["route", "--http-port", "0", "--epp-port", "0", "--epp-health-port", "0"])
                    .args(tls)
                    .args(["--discovery", &file, "--namespace", &namespace]),
            )
        };
    let health = |at: String, service: &'static str| async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{at}")).unwrap().connect().await.unwrap();
        let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
        let answer = tonic_health::pb::health_client::HealthClient::new(channel).check(request).await;
        answer.expect("the health service answers").into_inner().status
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

    let given = ["--epp-cert-file", certificate.to_str().unwrap(), "--epp-key-file", key.to_str().unwrap()];
    let (router, line) = route(&given);
    let (picker, health_at) = (printed(&line, "TLS) on "), printed(&line, "gRPC health on "));
    // Alive at once, not ready until a worker has joined.
    assert_eq!(health(health_at.clone(), "liveness").await, serving);
    assert_eq!(health(health_at.clone(), "readiness").await, not_serving);
    let _server = model_server(&file, &namespace);
    wait_for_workers(&router, 1).await;
    assert_eq!(health(health_at.clone(), "readiness").await, serving);
    assert_eq!(health(health_at, "envoy.service.ext_proc.v3.ExternalProcessor").await, serving);
    // A client that trusts the given certificate is answered over TLS.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(made.cert.pem()))
        .domain_name("localhost");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{picker}")).unwrap();
    let gateway = Gateway::connect(endpoint.tls_config(tls).expect("a TLS client")).await.expect("the TLS handshake");
    let answer = gateway.exchange(vec![ProcessingRequest::default()]).await.unwrap_err();
    assert_eq!(answer.code(), tonic::Code::InvalidArgument, "{answer}");
    drop(router);

    // By default a self-signed certificate: plaintext h2c is not answered.
    let (_router, line) = route(&[]);
    let picker = printed(&line, "TLS) on ");
    let plaintext =
        Gateway::connect(tonic::transport::Endpoint::from_shared(format!("http://{picker}")).unwrap()).await;
    let answered = match plaintext {
        Ok(gateway) => gateway.exchange(vec![ProcessingRequest::default()]).await.map(|_| ()),
        Err(error) => Err(tonic::Status::unavailable(error)),
    };
    assert!(answered.is_err_and(|status| status.code() != tonic::Code::InvalidArgument));
}

/// The picker's headers in a headers answer: (name, value) pairs.
fn set_headers(answer: &ProcessingResponse) -> Vec<(String, String)> {
    let Some(Response::RequestHeaders(headers)) = &answer.response else { panic!("not a pick: {answer:?}") };
    let mutation = headers.response.as_ref().and_then(|r| r.header_mutation.as_ref()).expect("headers set");
    (mutation.set_headers.iter().filter_map(|h| h.header.as_ref()))
        .map(|h| (h.key.clone(), String::from_utf8_lossy(&h.raw_value).into_owned()))
        .collect()
}

#[tokio::test]
async fn with_prefill_workers_the_picker_names_the_pair_and_the_frontend_beside_the_decode_worker_follows_it() {
    let (_, file) = cluster_file("epp-disagg");
    let native = ["--threads", "1", "--discovery", &file];
    // The decode worker's own frontend (a pod's sidecar): it sees the whole cluster and follows the picker.
    let sidecar = Server::start_with(dynamo().args(["route", "--http-port", "0", "--discovery", &file]));
    let prefill = Worker::start_as("prefill", dynamo().arg("prefill").args(native));
    let decode = Worker::start_as(
        "decode",
        dynamo().args(["decode", "--kv-transfer", "--http-addr", &host_port(&sidecar)]).args(native),
    );
    let (prefill_id, decode_id) = (prefill.id, decode.id);
    let (router, line) = Server::start_saying(dynamo().args([
        "route",
        "--http-port",
        "0",
        "--epp-port",
        "0",
        "--epp-insecure",
        "--disagg-threshold",
        "0",
        "--discovery",
        &file,
    ]));
    let picker = printed(&line, "h2c) on ");
    crate::cluster::wait_for_roles(&router, 1, 1).await;
    crate::cluster::wait_for_roles(&sidecar, 1, 1).await;

    let request = json!({"model": "tiny-chat", "prompt": "Prefilled there, decoded here.", "max_tokens": 6,
                         "temperature": 0, "ignore_eos": true});
    let answer = ask(&picker, "/v1/completions", &request, None).await;
    assert_eq!(destination(&answer), host_port(&sidecar), "the decode worker's frontend");
    let headers = set_headers(&answer);
    let header = |name: &str| headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
    assert_eq!(header("x-worker-instance-id"), Some(decode_id.to_string()), "{headers:?}");
    assert_eq!(header("x-prefill-instance-id"), Some(prefill_id.to_string()), "{headers:?}");
    assert_eq!(header("x-dynamo-routing-mode").as_deref(), Some("disaggregated"), "{headers:?}");
    let metrics = router.metrics().await;
    let remote = "dynamo_router_disagg_decisions_total{decision=\"remote\"}";
    assert_eq!(crate::util::metric(&metrics, remote), Some(1.0), "the picker's decision: {metrics}");

    // The frontend follows the names: a remote prefill on that worker, the same text as its own choice.
    let (status, own) = sidecar.post_json("/v1/completions", request.clone()).await;
    assert_eq!(status, 200, "{own}");
    let send = |pins: Vec<(&'static str, String)>| {
        let mut post = reqwest::Client::new().post(sidecar.url("/v1/completions")).json(&request);
        for (name, value) in pins {
            post = post.header(name, value);
        }
        async move {
            let response = post.send().await.expect("the frontend answers");
            (response.status().as_u16(), response.json::<serde_json::Value>().await.expect("JSON"))
        }
    };
    let named = |name: &'static str| (name, header(name).unwrap_or_default());
    let pins = vec![named("x-worker-instance-id"), named("x-prefill-instance-id")];
    let before = crate::util::metric(&sidecar.metrics().await, remote).unwrap_or(0.0);
    let (status, followed) = send(pins).await;
    assert_eq!(status, 200, "{followed}");
    assert_eq!(followed["choices"][0]["text"], own["choices"][0]["text"]);
    let after = crate::util::metric(&sidecar.metrics().await, remote).unwrap_or(0.0);
    assert_eq!(after, before + 1.0, "prefilled on the named prefill worker");
    // The decode worker alone (no prefill worker named): it prefills the prompt itself.
    let (status, alone) = send(vec![("x-worker-instance-id", decode_id.to_string())]).await;
    assert_eq!(status, 200, "{alone}");
    assert_eq!(crate::util::metric(&sidecar.metrics().await, remote).unwrap_or(0.0), after, "no remote prefill");
    // A prefill worker that is not there: the decode worker prefills instead, counted as a fallback.
    let fallback = "dynamo_router_disagg_decisions_total{decision=\"local_fallback\"}";
    let gone = vec![named("x-worker-instance-id"), ("x-prefill-instance-id", (prefill_id ^ 1).to_string())];
    let (status, body) = send(gone).await;
    assert_eq!((status, &body["choices"][0]["text"]), (200, &own["choices"][0]["text"]), "{body}");
    assert_eq!(crate::util::metric(&sidecar.metrics().await, fallback), Some(1.0));
    // A decode worker that is not there, and an id that is not one.
    let (status, body) = send(vec![("x-worker-instance-id", (decode_id ^ 1).to_string())]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("not a decode worker"), "{body}");
    let (status, body) = send(vec![("x-worker-instance-id", format!("{decode_id:016x}z"))]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("x-worker-instance-id"), "{body}");
}
