//! Starts `dynamo` processes for tests and always stops them.
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn dynamo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dynamo"))
}

/// A `dynamo run` on a free loopback port; killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
}

impl Server {
    /// Starts `dynamo run --engine mocker --http-port 0 ARGS…` and waits for its "serving … on http://…" line.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(dynamo().args(["run", "--engine", "mocker", "--http-port", "0"]).args(args))
    }

    /// Starts `dynamo run` with the built-in engine (its default).
    pub fn native(args: &[&str]) -> Server {
        Self::start_with(dynamo().args(["run", "--http-port", "0", "--threads", "2"]).args(args))
    }

    pub fn start_with(command: &mut Command) -> Server {
        Self::start_saying(command).0
    }

    /// `start_with`, and the line it printed with its address.
    pub fn start_saying(command: &mut Command) -> (Server, String) {
        let (child, line) = spawn_until(command, "http://");
        let at = line.find("http://").unwrap_or_default();
        let base = line[at..].split_whitespace().next().unwrap_or_default().to_string();
        (Server { child, base }, line)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new().post(self.url(path)).json(&body).send().await.expect("request reaches the server")
    }

    /// POSTs and returns (status, JSON body).
    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.post(path, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("the body is JSON"))
    }

    /// POSTs a streaming request and returns each `data:` payload, `[DONE]` included.
    pub async fn post_sse(&self, path: &str, body: Value) -> Vec<String> {
        let response = self.post(path, body).await;
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap_or_default().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        let text = response.text().await.expect("the stream completes");
        sse_payloads(&text)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics")).await.expect("metrics answer").text().await.expect("metrics text")
    }

    /// Polls /metrics until `check` holds; panics with the last scrape after `timeout`.
    pub async fn wait_for_metrics(&self, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await;
            if check(&text) {
                return text;
            }
            if Instant::now() > deadline {
                panic!("metrics never reached the expected state:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Spawns `command` and waits for a stdout line containing `marker`; returns the child and that line. Its
/// stderr goes where the command says (the test's, unless set).
pub fn spawn_until(command: &mut Command, marker: &str) -> (Child, String) {
    let mut child = command.stdout(Stdio::piped()).spawn().expect("the dynamo binary starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(marker) => return (child, line),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dynamo did not print {marker:?} within {READY_TIMEOUT:?}");
            }
        }
    }
}

/// A `dynamo decode` worker; killed (SIGKILL) when dropped.
pub struct Worker {
    child: Child,
    /// Its worker id, as its start line prints it (`… worker <16 hex digits> serving …`).
    pub id: u64,
}

impl Worker {
    pub fn start(args: &[&str]) -> Worker {
        Self::start_with(dynamo().arg("decode").args(args))
    }

    /// Starts a worker from a whole command (`dynamo decode …`, with its environment).
    pub fn start_with(command: &mut Command) -> Worker {
        Self::start_as("decode", command)
    }

    /// Starts a worker of `role` (`dynamo prefill …` for "prefill") from a whole command.
    pub fn start_as(role: &str, command: &mut Command) -> Worker {
        Self::start_saying(role, command).0
    }

    /// `start_as`, and the line it printed with its addresses.
    pub fn start_saying(role: &str, command: &mut Command) -> (Worker, String) {
        let (child, line) = spawn_until(command, &format!("{role} worker"));
        let hex = line.split(" worker ").nth(1).and_then(|rest| rest.get(..16));
        let id = hex.and_then(|hex| u64::from_str_radix(hex, 16).ok());
        let id = id.unwrap_or_else(|| panic!("no worker id in {line:?}"));
        (Worker { child, id }, line)
    }

    /// Sends it a signal by name (`STOP` freezes it: alive to the kernel, silent to its peers).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
    }

    /// How it exited, if it did within `timeout`.
    pub fn exit_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        exit_within(&mut self.child, timeout)
    }

    /// Ends it the way a clean shutdown does (SIGTERM), so it takes its record back.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Sends it SIGTERM and waits at most `timeout` for it to exit; how it exited, if it did.
    pub fn terminate_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        exit_within(&mut self.child, timeout)
    }
}

/// How `child` exited, if it did within `timeout`.
fn exit_within(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            event.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data event: {event:?}")).to_string()
        })
        .collect()
}

/// The value of one Prometheus sample, e.g. `metric(text, "dynamo_frontend_inflight_requests{model=\"tiny-chat\"}")`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
}

/// A venv under the target directory with `packages` installed, made once; `Err` says why it could not be
/// (no python3, no PyPI), so a test can skip loudly.
pub fn python_venv(name: &str, packages: &[&str]) -> Result<std::path::PathBuf, String> {
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    // Tests sharing a venv run at once: without the lock, one saw the other's half-installed wheel (no library
    // yet) and reported the backend unavailable.
    let lock = std::fs::File::create(venv.with_extension("lock")).map_err(|e| format!("{name}.lock: {e}"))?;
    lock.lock().map_err(|e| format!("{name}.lock: {e}"))?;
    let ready = venv.join(".installed");
    if ready.exists() {
        return Ok(venv);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        .args(packages))?;
    std::fs::write(&ready, "").map_err(|e| e.to_string())?;
    Ok(venv)
}
