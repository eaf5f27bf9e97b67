//! `dynamo top` live, as an operator runs it: in a real terminal (tmux: `new -d`, `send-keys`,
//! `capture-pane`), over mocker workers and a router under load, with one worker killed. Where tmux is not
//! installed the test says SKIPPED.
use crate::cluster::{cluster_file, route, wait_for_workers};
use crate::util::Worker;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server of its own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").args(["-L", &self.socket]).args(args).output().expect("tmux runs")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// Waits until the screen satisfies `check` (the screen is the signal), or fails showing it.
    async fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "the screen never showed {what}:\n{screen}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[tokio::test]
async fn top_in_a_terminal_follows_workers_under_load_and_shows_one_killed() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED top_in_a_terminal_follows_workers_under_load_and_shows_one_killed: no tmux here");
        return;
    }
    let (_, file) = cluster_file("top-tmux");
    let worker = |_| Worker::start(&["--engine", "mocker", "--speedup", "2", "--discovery", &file]);
    let (first, _second) = (worker(0), worker(1));
    let router = route(&file);
    wait_for_workers(&router, 2).await;
    let load = tokio::spawn({
        let base = router.base.clone();
        async move {
            let client = reqwest::Client::new();
            // Prompts of their own, so no worker's cache draws them all.
            for i in 0u64.. {
                let prompt = format!("{i} a load for top to see");
                let body = json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 64});
                let _ = client.post(format!("{base}/v1/completions")).json(&body).send().await;
            }
        }
    });

    let tmux = Tmux { socket: format!("dynamo-top-{}", std::process::id()) };
    let top = format!("{} top --discovery {file} --worker-timeout 1 --refresh 0.2", env!("CARGO_BIN_EXE_dynamo"));
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "200", "-y", "40", &top]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));

    // Every check is part of what is waited for: a capture can land mid-redraw.
    let alive = |screen: &str| screen.lines().filter(|l| l.contains(" decode ") && l.contains(" alive ")).count();
    tmux.wait_for("two workers alive and a router's traffic", |s| {
        alive(s) == 2 && s.contains("requests/s") && s.contains("dynamo top · ? help, q quits")
    })
    .await;
    // Under load, history builds: the cluster's line and each worker's trend; the router says where its
    // requests went, and how soon each worker answered.
    tmux.wait_for("the cluster's history", |s| s.contains("cluster, last minutes:") && s.contains("req/s")).await;
    let routed = |screen: &str| screen.lines().find(|l| l.trim_start().starts_with("routed to:")).map(str::to_string);
    let ids = |screen: &str| -> Vec<String> {
        (screen.lines())
            .filter(|l| l.contains(" decode "))
            .filter_map(|l| {
                l.split(|c: char| c == '│' || c.is_whitespace()).find(|w| w.len() == 16).map(str::to_string)
            })
            .collect()
    };
    tmux.wait_for("both workers by id, with their TTFT, on the router's routed line", |s| {
        let (line, ids) = (routed(s).unwrap_or_default(), ids(s));
        ids.len() == 2 && ids.iter().all(|id| line.contains(id.as_str())) && line.contains("TTFT p50")
    })
    .await;

    drop(first); // SIGKILL
    let lost = |screen: &str| screen.lines().any(|l| l.contains(" decode ") && l.contains(" lost "));
    tmux.wait_for("the killed worker as lost, counted out", |s| {
        alive(s) == 1 && lost(s) && s.contains("2 workers, 1 alive")
    })
    .await;

    tmux.run(&["send-keys", "-t", "top", "?"]);
    tmux.wait_for("the help overlay", |s| s.contains("any key closes") && s.contains("sort by the next column")).await;
    tmux.run(&["send-keys", "-t", "top", "Escape"]);
    // Filtered to the workers (the router has a row too), the first one's detail charts its history.
    tmux.run(&["send-keys", "-t", "top", "/", "d", "e", "c", "o", "d", "e", "Enter", "Enter"]);
    // Waited for whole: a capture can land mid-redraw.
    let whole = |s: &str| {
        ["Esc back", "running: now", "requests/s: now", "\"state\":", "KV active"].iter().all(|p| s.contains(p))
    };
    tmux.wait_for("a worker's detail: its gauges, charts and state", whole).await;
    tmux.run(&["send-keys", "-t", "top", "Escape"]);
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.run(&["has-session", "-t", "top"]).status.success() {
        assert!(Instant::now() < deadline, "q did not end dynamo top:\n{}", tmux.screen());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.abort();
}
