//! The transfer layer against a second `dynamo` process (`dynamo bench transfer-target`, an agent with
//! registered regions): a peer that dies while a transfer waits on it fails that transfer at once, on every
//! backend, rather than after the transfer timeout.
use crate::util::dynamo;
use dynamo::core::transfer::{Agent, AgentSettings, Backend, DEFAULT_TIMEOUT, Descriptor, Direction, Region};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A target process and its agent's address.
fn target() -> (std::process::Child, String) {
    let mut child = dynamo()
        .args(["bench", "transfer-target", "--layout", "contiguous", "--blocks", "16"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("dynamo starts");
    let stdout = child.stdout.take().expect("its stdout");
    let line = std::io::BufReader::new(stdout).lines().next().expect("a line").expect("readable");
    let agent = line.split_whitespace().nth(1).unwrap_or_else(|| panic!("it said {line:?}")).to_string();
    (child, agent)
}

fn signal(child: &std::process::Child, name: &str) {
    Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().expect("kill runs");
}

#[tokio::test]
async fn a_peer_killed_while_a_transfer_waits_on_it_fails_the_transfer_at_once() {
    for backend in [Backend::Tcp, Backend::Shm] {
        for direction in [Direction::Read, Direction::Write] {
            let (mut child, address) = target();
            let settings = AgentSettings { backend: Some(backend), ..AgentSettings::loopback(None) };
            let (agent, _) = Agent::start(1, settings).unwrap();
            let peer = agent.connect(&address).await.unwrap();
            assert_eq!(peer.backend(), backend);
            let len = peer.regions()[0].len;
            let (region, _) = agent.register(Region::new(len).unwrap());
            let whole = move |region| Descriptor { region, offset: 0, len };
            // Stopped, the target neither moves data nor takes the notification: the transfer waits on it.
            signal(&child, "STOP");
            let agent = std::sync::Arc::new(agent);
            let started = Instant::now();
            let transfer = tokio::spawn({
                let agent = agent.clone();
                async move { agent.transfer(&peer, direction, &[whole(region)], &[whole(0)], Some(b"lease")).await }
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!transfer.is_finished(), "{backend:?} {direction:?}: a transfer completed against a stopped peer");
            signal(&child, "KILL");
            let _ = child.wait();
            let outcome = tokio::time::timeout(Duration::from_secs(3), transfer)
                .await
                .unwrap_or_else(|_| panic!("{backend:?} {direction:?}: still waiting 3 s after the peer died"))
                .expect("the task ran");
            let error =
                outcome.err().unwrap_or_else(|| panic!("{backend:?} {direction:?}: succeeded against a dead peer"));
            assert!(
                started.elapsed() < DEFAULT_TIMEOUT,
                "{backend:?} {direction:?}: failed only by timing out ({error})"
            );
        }
    }
}
