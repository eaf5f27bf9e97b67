//! The command line as a user meets it: help, completions kept in the repo, flag and path errors.
use crate::util::{Server, dynamo};

fn output(args: &[&str]) -> (bool, String, String) {
    let out = dynamo().args(args).output().expect("dynamo runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `dynamo route ARGS` exits with an error that says each of `says`.
fn route_refuses(args: &[&str], says: &[&str]) {
    let (ok, _, err) =
        output(&[&["route", "--http-port", "0", "--discovery", "file:/nonexistent/c.toml"], args].concat());
    assert!(!ok, "{args:?} was accepted");
    assert!(says.iter().all(|s| err.contains(s)), "{args:?}: {err}");
}

#[test]
fn help_lists_the_working_subcommands_and_env_fallbacks() {
    let (ok, help, _) = output(&["--help"]);
    assert!(ok);
    for command in ["run", "bench", "selftest", "completions"] {
        assert!(help.contains(command), "{help}");
    }
    let (ok, run_help, _) = output(&["run", "--help"]);
    assert!(ok);
    for expected in [
        "--model",
        "--http-port",
        "DYNAMO_HTTP_PORT",
        "--workers",
        "--speedup",
        "--threads",
        "--kv-cache-gib",
        "HTTP frontend",
        "Engine",
    ] {
        assert!(run_help.contains(expected), "missing {expected} in:\n{run_help}");
    }
}

#[test]
fn completions_piped_into_a_reader_that_went_away_exit_cleanly() {
    let mut child = dynamo()
        .args(["completions", "zsh"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dynamo runs");
    // Closed before the child has written anything, as `| head -1` closes it after one line.
    drop(child.stdout.take());
    let status = child.wait().expect("it exits");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr).ok();
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn completions_in_the_repo_are_up_to_date() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("completions");
    for (shell, file) in [("bash", "dynamo.bash"), ("zsh", "_dynamo"), ("fish", "dynamo.fish")] {
        let (ok, generated, _) = output(&["completions", shell]);
        assert!(ok);
        let kept = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            kept == generated,
            "completions/{file} is stale; regenerate with: cargo run -- completions {shell} > completions/{file}"
        );
    }
}

#[test]
fn bad_flags_and_paths_fail_with_a_message_that_says_what_to_do() {
    let (ok, _, err) = output(&["run", "--speedup", "0"]);
    assert!(!ok);
    assert!(err.contains("greater than 0"), "{err}");
    let (ok, _, err) = output(&["run", "--http-port", "0", "--model", "/no/such/model"]);
    assert!(!ok);
    assert!(err.contains("/no/such/model") && err.contains("--model"), "{err}");
}

#[test]
fn encode_workers_without_a_vision_model_or_the_native_engine_are_refused_saying_why() {
    let llava = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-llava");
    let cases: [(&[&str], &str); 3] = [
        (&["encode", "--discovery", "file:/nonexistent/c.toml"], "no vision tower"),
        (&["run", "--http-port", "0", "--encode-workers", "1"], "no vision tower"),
        (
            &[
                "run",
                "--http-port",
                "0",
                "--encode-workers",
                "1",
                "--engine",
                "mocker",
                "--model",
                llava.to_str().unwrap(),
            ],
            "need the native engine",
        ),
    ];
    for (args, says) in cases {
        let (ok, _, err) = output(args);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(says) && err.contains("encode"), "{args:?}: {err}");
    }
}

#[test]
fn a_planner_that_could_not_work_is_refused_before_anything_starts() {
    let refused = route_refuses;
    refused(&["--planner", "arima"], &["unknown predictor", "ewma-A"]);
    refused(&["--", "--engine", "mocker"], &["after `--`", "--planner"]);
    refused(&["--planner", "auto", "--", "--engine", "nonsense"], &["would not start", "nonsense"]);
    // An external engine is one server: starting more workers in front of it scales nothing.
    let external = ["--engine", "vllm", "--engine-url", "http://127.0.0.1:1", "--model", "testdata/tiny-chat"];
    refused(&[&["--planner", "auto", "--"][..], &external].concat(), &["local connector", "kubernetes"]);
    refused(&["--planner", "auto", "--min-workers", "4", "--max-workers", "2"], &["--min-workers"]);
    refused(
        &["--planner", "auto", "--min-workers", "8", "--min-prefill-workers", "2", "--max-prefill-workers", "2"],
        &["--worker-budget"],
    );
    refused(&["--min-workers", "2"], &["--planner"]);
    refused(
        &["--planner", "auto", "--planner-profile", "/no/such/profile.json"],
        &["cannot read the profile", "/no/such"],
    );
    refused(&["--planner", "auto", "--ttft-target-ms", "100"], &["--planner-profile"]);
    refused(&["--planner", "auto", "--planner-profile", "workers", "--router-mode", "kv"], &["--router-mode latency"]);
    refused(&["--planner", "auto", "--planner-profile", ""], &["`workers`"]);
    refused(&["--planner", "auto", "--planner-connector", "kubernetes"], &["--kube-decode-deployment"]);
    refused(&["--planner", "auto", "--planner-interval", "1e-10"], &["--planner-interval", "too short"]);
    let kube = ["--planner", "auto", "--planner-connector", "kubernetes", "--kube-decode-deployment", "d"];
    refused(&[&kube[..], &["--kube-api", "10.0.0.1:443"]].concat(), &["not an http:// or https:// URL"]);
    refused(&[&kube[..], &["--kube-token-file", "/no/such/token"]].concat(), &["--kube-token-file is the token"]);
    let api = ["--kube-api", "https://10.0.0.1:443", "--kube-token-file", "/no/such/token"];
    refused(&[&kube[..], &api[..]].concat(), &["cannot read /no/such/token"]);
    refused(&[&kube[..], &["--max-prefill-workers", "2"]].concat(), &["--kube-prefill-deployment"]);
    refused(&["--planner", "auto", "--kube-decode-deployment", "d"], &["--planner-connector kubernetes"]);
}

#[test]
fn a_profile_written_by_dynamo_profile_is_read_by_the_planner() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join("mocker.json");
    let (ok, out, err) =
        output(&["profile", "--engine", "mocker", "--num-blocks", "1024", "--out", &path.to_string_lossy()]);
    assert!(ok && out.contains("written to"), "{out}{err}");
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("written")).expect("JSON");
    assert_eq!(profile["kv_tokens"], 1024 * 16);
    // Read back by the planner: the router gets past its planner flags (and stops at its discovery).
    let (ok, _, err) = output(&[
        "route",
        "--discovery",
        "bogus:x",
        "--planner",
        "auto",
        "--planner-connector",
        "virtual",
        "--planner-profile",
        &path.to_string_lossy(),
    ]);
    assert!(!ok && !err.contains("profile") && err.contains("bogus"), "{err}");
}

#[tokio::test]
async fn env_vars_stand_in_for_flags() {
    let server =
        Server::start_with(dynamo().arg("run").env("DYNAMO_HTTP_PORT", "0").env("DYNAMO_SERVED_MODEL_NAME", "envy"));
    assert!(!server.base.ends_with(":8000"), "{}", server.base);
    let models: serde_json::Value = reqwest::get(server.url("/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "envy");
}

#[test]
fn endpoint_picker_flags_that_cannot_work_are_refused_before_anything_starts() {
    let refused = route_refuses;
    refused(&["--epp-insecure"], &["--epp-port"]);
    refused(&["--epp-port", "0", "--epp-cert-file", "/no/cert.pem"], &["--epp-key-file"]);
    refused(&["--epp-port", "0", "--epp-insecure", "--epp-cert-file", "c", "--epp-key-file", "k"], &["cannot be used"]);
    let files = ["--epp-port", "0", "--epp-cert-file", "/no/cert.pem", "--epp-key-file", "/no/key.pem"];
    refused(&files, &["endpoint picker", "cannot read /no/cert.pem"]);
}
