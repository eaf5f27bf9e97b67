//! The local connector: the plan carried out on this machine, by starting `dynamo decode` / `dynamo prefill`
//! processes of this same binary and stopping them.
//!
//! A worker it stops is sent SIGTERM, so it drains (it leaves discovery, finishes its requests, then exits):
//! scaling down loses no request. It stops the least loaded of its own workers, never one it did not start;
//! workers started by hand count toward a role's size, so it runs only what the plan wants beyond them. Its
//! workers die with it (SIGTERM from the kernel when the router process ends, on Linux).
use super::{Connector, Plan, ROLES};
use crate::core::protocol::discovery::{Role, tcp_endpoint};
use crate::core::top::{ClusterView, PeerState};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the local connector starts workers.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// The `dynamo` binary.
    pub program: PathBuf,
    /// Arguments every worker gets after its role: discovery, namespace, key, model, engine.
    pub args: Vec<String>,
    /// Decode workers take KV from prefill workers (when the plan may have any).
    pub kv_transfer: bool,
    /// How long a stopped worker may drain before it is killed.
    pub drain_timeout: Duration,
}

struct LocalWorker {
    role: Role,
    /// Its request endpoint, as discovery and the view name it.
    endpoint: String,
    process: Child,
    /// When it was told to stop.
    stopping: Option<Instant>,
    /// Whether it was ever seen answering.
    answered: bool,
}

pub struct LocalConnector {
    settings: LocalSettings,
    workers: Vec<LocalWorker>,
    /// Workers in a row that exited by themselves before they ever answered.
    failed_starts: u32,
}

/// After this many workers in a row exit before answering (a model that does not load, a port taken), no
/// more are started: each would fail the same way.
const MOST_FAILED_STARTS: u32 = 3;

/// The host local workers listen on: routers on this machine reach them, nobody else.
const HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

impl LocalConnector {
    pub fn new(settings: LocalSettings) -> Self {
        Self { settings, workers: Vec::new(), failed_starts: 0 }
    }

    fn start(&mut self, role: Role) -> std::io::Result<()> {
        // The port is picked here, so that the worker's endpoint is known before it answers (the view names
        // workers by it). Another process could take it in between; the worker then fails to bind, exits, and
        // the next interval starts another.
        let port = std::net::TcpListener::bind((HOST, 0))?.local_addr()?.port();
        let mut command = Command::new(&self.settings.program);
        command
            .arg(role.name())
            .args(["--host", &HOST.to_string(), "--request-port", &port.to_string()])
            .args(["--drain-timeout", &self.settings.drain_timeout.as_secs_f64().to_string()])
            .args(&self.settings.args)
            .stdin(Stdio::null());
        if role == Role::Decode && self.settings.kv_transfer {
            command.arg("--kv-transfer");
        }
        // Its own process group: a Ctrl-C at the terminal reaches the router alone, which then drains it.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        die_with_parent(&mut command);
        let process = command.spawn()?;
        let endpoint = tcp_endpoint(HOST, port);
        tracing::info!("planner: started {} worker (pid {}) at {endpoint}", role.name(), process.id());
        self.workers.push(LocalWorker { role, endpoint, process, stopping: None, answered: false });
        Ok(())
    }

    /// Tells the worker to drain and exit.
    fn stop(worker: &mut LocalWorker) {
        tracing::info!(
            "planner: stopping {} worker at {} (pid {})",
            worker.role.name(),
            worker.endpoint,
            worker.process.id()
        );
        terminate(&worker.process);
        worker.stopping = Some(Instant::now());
    }

    /// Notes which workers answer; forgets those that exited; kills those that drained past their timeout.
    fn reap(&mut self, view: &ClusterView) {
        let timeout = self.settings.drain_timeout + KILL_GRACE;
        for worker in &mut self.workers {
            if view.workers.get(&worker.endpoint).is_some_and(|v| v.state == PeerState::Alive) {
                worker.answered = true;
                self.failed_starts = 0;
            }
        }
        let failed_starts = &mut self.failed_starts;
        self.workers.retain_mut(|worker| match worker.process.try_wait() {
            Ok(None) => {
                if worker.stopping.is_some_and(|since| since.elapsed() > timeout) {
                    tracing::warn!("planner: worker at {} did not exit after draining; killed", worker.endpoint);
                    let _ = worker.process.kill();
                    let _ = worker.process.wait();
                    return false;
                }
                true
            }
            Ok(Some(status)) => {
                if worker.stopping.is_none() {
                    tracing::warn!(
                        "planner: {} worker at {} exited by itself ({status})",
                        worker.role.name(),
                        worker.endpoint
                    );
                    if !worker.answered {
                        *failed_starts += 1;
                        if *failed_starts == MOST_FAILED_STARTS {
                            tracing::error!(
                                "planner: {MOST_FAILED_STARTS} workers in a row exited before they answered (their \
                                 output is above); starting no more: fix their flags and restart the router"
                            );
                        }
                    }
                }
                false
            }
            Err(error) => {
                tracing::warn!("planner: cannot tell whether worker at {} runs: {error}", worker.endpoint);
                false
            }
        });
    }

    fn running(&self, role: Role) -> impl Iterator<Item = &LocalWorker> {
        self.workers.iter().filter(move |w| w.role == role && w.stopping.is_none())
    }
}

/// A drained worker that has not exited this long after its drain timeout is killed.
const KILL_GRACE: Duration = Duration::from_secs(5);

impl Connector for LocalConnector {
    fn apply(&mut self, plan: &Plan, view: &ClusterView) {
        self.reap(view);
        let given_up = self.failed_starts >= MOST_FAILED_STARTS;
        for role in ROLES {
            let ours = self.running(role).count();
            // Its draining workers may still be in the view until discovery says they left: never others.
            let others = view
                .workers
                .values()
                .filter(|w| w.state == PeerState::Alive && !self.workers.iter().any(|o| o.endpoint == w.endpoint))
                .filter(|w| w.instance.as_ref().is_some_and(|i| i.role == role))
                .count();
            let wanted = plan.workers(role).saturating_sub(others);
            let starting = if given_up { 0 } else { wanted.saturating_sub(ours) };
            for _ in 0..starting {
                if let Err(error) = self.start(role) {
                    tracing::warn!("planner: cannot start a {} worker: {error}", role.name());
                    break;
                }
            }
            let surplus = ours.saturating_sub(wanted);
            if surplus == 0 {
                continue;
            }
            // Those not yet answering go first, then the least loaded.
            let busy = |endpoint: &str| {
                view.workers.get(endpoint).and_then(|w| w.load).map_or(0, |load| {
                    u64::from(load.requests_running) + u64::from(load.requests_waiting) + load.kv_active_blocks
                })
            };
            let mut candidates: Vec<usize> = (0..self.workers.len())
                .filter(|&at| self.workers[at].role == role && self.workers[at].stopping.is_none())
                .collect();
            candidates.sort_by_key(|&at| busy(&self.workers[at].endpoint));
            for at in candidates.into_iter().take(surplus) {
                Self::stop(&mut self.workers[at]);
            }
        }
    }

    fn settling(&mut self, view: &ClusterView) -> Option<String> {
        self.reap(view);
        let alive = |w: &LocalWorker| view.workers.get(&w.endpoint).is_some_and(|v| v.state == PeerState::Alive);
        let starting = self.workers.iter().filter(|w| w.stopping.is_none() && !alive(w)).count();
        let draining = self.workers.iter().filter(|w| w.stopping.is_some()).count();
        match (starting, draining) {
            (0, 0) => None,
            _ => Some(format!("{starting} workers starting, {draining} draining")),
        }
    }

    fn shutdown(&mut self) {
        for worker in self.workers.iter_mut().filter(|w| w.stopping.is_none()) {
            Self::stop(worker);
        }
        let deadline = Instant::now() + self.settings.drain_timeout + KILL_GRACE;
        let nobody = ClusterView::new("");
        while !self.workers.is_empty() && Instant::now() < deadline {
            self.reap(&nobody);
            std::thread::sleep(Duration::from_millis(20));
        }
        for worker in &mut self.workers {
            let _ = worker.process.kill();
            let _ = worker.process.wait();
        }
        self.workers.clear();
    }
}

impl Drop for LocalConnector {
    /// Whatever happens to the planner, its workers do not outlive it unattended.
    fn drop(&mut self) {
        for worker in self.workers.iter().filter(|w| w.stopping.is_none()) {
            terminate(&worker.process);
        }
    }
}

/// SIGTERM: the worker drains.
fn terminate(process: &Child) {
    #[cfg(unix)]
    if let Ok(pid) = libc::pid_t::try_from(process.id()) {
        // SAFETY: kill(2) with a pid this process spawned and has not reaped; it touches no memory.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    #[cfg(not(unix))]
    let _ = process;
}

/// Has the kernel send the worker SIGTERM when this process ends, however it ends. (Strictly, when the thread
/// that spawned it ends: the planner runs on the runtime's worker threads, which live as long as the router.)
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: runs in the forked child before exec; prctl is async-signal-safe and touches no memory.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}
