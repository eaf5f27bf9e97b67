//! Child `dynamo` processes for the benchmarks that run a real cluster (`soak`, `http --engine-url`):
//! started with their stdout piped, read until they say they are ready, the rest of their output drained so
//! they never block on a full pipe, and killed when dropped.
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{0} did not become ready within {READY_TIMEOUT:?}")]
    NotReady(String),
}

pub type Output = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts `command` and reads its stdout up to a line containing `marker`; the rest is the caller's.
pub async fn spawn_until(command: &mut Command, marker: &str, what: &str) -> Result<(Child, Output), ProcessError> {
    use std::process::Stdio;
    command.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| ProcessError::Spawn { what: what.to_string(), source })?;
    let stdout = child.stdout.take().ok_or_else(|| ProcessError::NotReady(what.to_string()))?;
    let mut lines = BufReader::new(stdout).lines();
    match tokio::time::timeout(READY_TIMEOUT, read_until(&mut lines, marker)).await {
        Ok(Some(_)) => Ok((child, lines)),
        _ => Err(ProcessError::NotReady(what.to_string())),
    }
}

pub async fn read_until(lines: &mut Output, marker: &str) -> Option<String> {
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains(marker) {
            return Some(line);
        }
    }
    None
}

/// Reads the rest of a child's output, so that it never blocks on a full pipe.
pub fn drain(mut lines: Output) {
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

/// Reads `output` until a router says where it serves (once a worker has joined), and returns that address.
pub async fn router_address(mut output: Output) -> Result<String, ProcessError> {
    let serving = tokio::time::timeout(READY_TIMEOUT, read_until(&mut output, "serving ")).await;
    drain(output);
    let line = serving.ok().flatten().ok_or_else(|| ProcessError::NotReady("the router".into()))?;
    let at = line.find("http://").unwrap_or(line.len());
    Ok(line[at..].split_whitespace().next().unwrap_or_default().to_string())
}
