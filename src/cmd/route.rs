//! `dynamo route`: the OpenAI frontend and router in front of the workers discovery finds, and optionally
//! the planner that sizes the cluster.
use super::args::{ClusterArgs, HttpArgs, RouterArgs, RouterModeArg};
use crate::core::engine::profile::Profile;
use crate::core::epp::{EppSettings, Tls};
use crate::core::kube::{ApiConfig, Auth, SERVICE_ACCOUNT_DIR};
use crate::core::planner::kubernetes::{KubernetesConnector, KubernetesSettings};
use crate::core::planner::load::{Bounds, Thresholds};
use crate::core::planner::local::{LocalConnector, LocalSettings};
use crate::core::planner::sla::Targets;
use crate::core::planner::{
    Connector, PlannerSettings, PlannerStart, ProfileSource, SlaSettings, Virtual, WorkerProfile,
};
use crate::core::route::{self, ClusterSettings, HeldEngine, HeldSettings};
use crate::core::trust::ClusterKey;
use clap::{Args, ValueEnum};
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct RouteArgs {
    #[command(flatten)]
    pub http: HttpArgs,

    /// Also serve the Gateway API Inference Extension's endpoint picker (Envoy ext_proc over h2c) on this
    /// port of --http-host (0 picks a free one): a gateway asks it which worker each request goes to, among
    /// workers served by an OpenAI server of their own (`dynamo run --workers 1 --discovery …`).
    #[arg(long, value_name = "PORT", help_heading = "Gateway API endpoint picker")]
    pub epp_port: Option<u16>,

    /// The picker's gRPC health service (grpc.health.v1: liveness, readiness and the ext_proc service), in
    /// plaintext on this port of --http-host.
    #[arg(long, value_name = "PORT", requires = "epp_port", help_heading = "Gateway API endpoint picker")]
    pub epp_health_port: Option<u16>,

    /// Serve the picker over h2c (plaintext HTTP/2) rather than TLS.
    #[arg(long, requires = "epp_port", conflicts_with = "epp_cert_file", help_heading = "Gateway API endpoint picker")]
    pub epp_insecure: bool,

    /// The picker's TLS certificate chain (PEM) [default: a self-signed one made at start-up, which gateways
    /// configured as GAIE's accept].
    #[arg(long, value_name = "PATH", requires_all = ["epp_port", "epp_key_file"], help_heading = "Gateway API endpoint picker")]
    pub epp_cert_file: Option<std::path::PathBuf>,

    /// The key of --epp-cert-file (PEM).
    #[arg(long, value_name = "PATH", requires = "epp_cert_file", help_heading = "Gateway API endpoint picker")]
    pub epp_key_file: Option<std::path::PathBuf>,

    /// Seconds without an answer to the heartbeat after which a worker leaves the routing set.
    #[arg(long, default_value_t = 1.5, value_parser = super::args::positive_f64, help_heading = "Planes")]
    pub worker_timeout: f64,

    #[command(flatten)]
    pub cluster: ClusterArgs,

    #[command(flatten)]
    pub router: RouterArgs,

    #[command(flatten)]
    pub held: HeldArgs,

    #[command(flatten)]
    pub planner: PlannerArgs,
}

/// Engines this router holds itself, without a `dynamo` worker beside them.
#[derive(Debug, Args)]
#[command(next_help_heading = "Engines without a worker")]
pub struct HeldArgs {
    /// A vLLM, SGLang or TensorRT-LLM server this router routes to itself, with no `dynamo decode` beside it:
    /// KIND:EVENTS[,REPLAY]=URL, its KV-event publisher, optionally its replay socket, and its HTTP server
    /// (vllm:tcp://10.0.0.7:5557,tcp://10.0.0.7:5558=http://10.0.0.7:8000; TensorRT-LLM:
    /// trtllm:http://HOST:PORT/kv_cache_events=http://HOST:PORT). Once per engine; they serve --model and must
    /// answer at start. The workers discovery finds serve beside them.
    #[arg(long, value_name = "KIND:EVENTS[,REPLAY]=URL", requires = "model")]
    pub kv_events_from: Vec<HeldEngine>,

    /// The held engines' model directory (tokenizer, chat template, config.json), as the engines were given it.
    #[arg(long, value_name = "DIR", requires = "kv_events_from")]
    pub model: Option<std::path::PathBuf>,

    /// Names clients use in "model" for the held engines' model [default: the model directory's name]
    #[arg(long, value_name = "NAME", num_args = 1.., value_delimiter = ',', requires = "kv_events_from")]
    pub served_model_name: Vec<String>,

    /// Tokens per KV block of the held engines (each must keep its KV in blocks of this size).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024), requires = "kv_events_from")]
    pub block_size: u32,
}

impl HeldArgs {
    fn settings(&self) -> Option<HeldSettings> {
        let model = self.model.clone().filter(|_| !self.kv_events_from.is_empty())?;
        Some(HeldSettings {
            model: crate::core::model::ModelSource::Dir(model),
            model_options: crate::core::model::ModelOptions {
                served_names: self.served_model_name.clone(),
                ..Default::default()
            },
            block_size: self.block_size as usize,
            engines: self.kv_events_from.clone(),
        })
    }
}

/// The planner: how many workers of each role, and who starts them.
#[derive(Debug, Args)]
#[command(next_help_heading = "Planner")]
pub struct PlannerArgs {
    /// Plan the cluster's size, forecasting traffic with this predictor: auto, constant, mavg-N, ewma-A,
    /// kalman, kalman-log1p, kalman-adaptive, kalman-adaptive-log1p (`dynamo bench planner` compares them).
    /// Workers are sized on their KV pressure (load-based scaling); the forecast is exported meanwhile.
    #[arg(long, value_name = "PREDICTOR")]
    pub planner: Option<String>,

    /// Who carries the plan out: local (starts and drains `dynamo decode`/`prefill` processes on this machine,
    /// with the router's discovery, namespace and key, and the worker flags after `--`), kubernetes (sets the
    /// replicas of the --kube-*-deployment Deployments), or virtual (an orchestrator, which reads it on the
    /// event plane, where every plan is published).
    #[arg(long, value_enum, default_value = "local", requires = "planner")]
    pub planner_connector: ConnectorArg,

    /// Seconds between plans.
    #[arg(long, default_value_t = 5.0, value_parser = super::args::positive_f64, requires = "planner")]
    pub planner_interval: f64,

    /// Fewest decode workers.
    #[arg(long, default_value_t = 1, requires = "planner")]
    pub min_workers: u32,

    /// Most decode workers.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..), requires = "planner")]
    pub max_workers: u32,

    /// Fewest prefill workers.
    #[arg(long, default_value_t = 0, requires = "planner")]
    pub min_prefill_workers: u32,

    /// Most prefill workers (0: aggregated serving, decode workers only).
    #[arg(long, default_value_t = 0, requires = "planner")]
    pub max_prefill_workers: u32,

    /// Most workers of every role together (Dynamo's max GPU budget).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..), requires = "planner")]
    pub worker_budget: u32,

    /// KV pressure (KV needed over KV held) past which a role gets one more worker; past 1, requests queue.
    #[arg(long, default_value_t = Thresholds::default().up, value_parser = super::args::positive_f64, requires = "planner")]
    pub scale_up_pressure: f64,

    /// KV pressure every sample of an interval must stay under for a role to lose a worker.
    #[arg(long, default_value_t = Thresholds::default().down, value_parser = super::args::non_negative_f64, requires = "planner")]
    pub scale_down_pressure: f64,

    /// Size each role for the latency targets from this performance profile (`dynamo profile` writes one)
    /// and the traffic forecast; load-based steps still add workers beyond that. `workers`: the profile the
    /// workers send the router (the mocker's own; a native worker's `--profile`), once one has.
    #[arg(long, value_name = "PATH|workers", value_parser = planner_profile, requires = "planner")]
    pub planner_profile: Option<PlannerProfile>,

    /// Mean time to first token the profile-based sizing aims at, in ms.
    #[arg(long, default_value_t = Targets::default().ttft_ms, value_parser = super::args::positive_f64, requires = "planner_profile")]
    pub ttft_target_ms: f64,

    /// Mean time between tokens the profile-based sizing aims at, in ms.
    #[arg(long, default_value_t = Targets::default().itl_ms, value_parser = super::args::positive_f64, requires = "planner_profile")]
    pub itl_target_ms: f64,

    /// The share of requests that must meet the latency targets (0.95: 95 %); without it, their means must
    /// (as Dynamo's SLA planner sizes).
    #[arg(long, value_parser = share, requires = "planner_profile")]
    pub sla_attainment: Option<f64>,

    /// Seconds a worker the planner stops may take to finish its requests.
    #[arg(long, default_value_t = crate::core::worker::DEFAULT_DRAIN_TIMEOUT.as_secs_f64(), value_parser = super::args::non_negative_f64, requires = "planner")]
    pub drain_timeout: f64,

    /// Kubernetes: the API's URL, e.g. `kubectl proxy`'s http://127.0.0.1:8001 [default: the kubeconfig's
    /// ($KUBECONFIG, ~/.kube/config), else the pod's service account]
    #[arg(long, value_name = "URL", help_heading = "Planner on Kubernetes", requires = "planner")]
    pub kube_api: Option<String>,

    /// Kubernetes: the namespace of the Deployments [default: the kubeconfig context's, or the pod's own]
    #[arg(long, value_name = "NAMESPACE", help_heading = "Planner on Kubernetes", requires = "planner")]
    pub kube_namespace: Option<String>,

    /// Kubernetes: the Deployment of decode workers.
    #[arg(long, value_name = "NAME", help_heading = "Planner on Kubernetes", requires = "planner")]
    pub kube_decode_deployment: Option<String>,

    /// Kubernetes: the Deployment of prefill workers (needed with --max-prefill-workers above 0).
    #[arg(long, value_name = "NAME", help_heading = "Planner on Kubernetes", requires = "planner")]
    pub kube_prefill_deployment: Option<String>,

    /// Kubernetes: a file holding a bearer token for the --kube-api URL (not needed through `kubectl proxy`).
    #[arg(long, value_name = "PATH", help_heading = "Planner on Kubernetes", requires = "planner")]
    pub kube_token_file: Option<std::path::PathBuf>,

    /// Flags for the workers the local connector starts (model, engine, …), after `--`.
    #[arg(last = true, value_name = "WORKER FLAGS")]
    pub worker_flags: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConnectorArg {
    Local,
    Kubernetes,
    Virtual,
}

impl PlannerArgs {
    fn start(
        &self,
        cluster: &ClusterArgs,
        key: Option<&ClusterKey>,
        host: std::net::IpAddr,
        worker_profile: &WorkerProfile,
    ) -> anyhow::Result<Option<PlannerStart>> {
        let Some(predictor) = &self.planner else {
            anyhow::ensure!(
                self.worker_flags.is_empty(),
                "flags after `--` go to the workers the planner starts; add --planner"
            );
            return Ok(None);
        };
        crate::core::planner::forecast::by_name(predictor).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            self.min_workers <= self.max_workers && self.min_prefill_workers <= self.max_prefill_workers,
            "--min-workers and --min-prefill-workers may not be above --max-workers and --max-prefill-workers"
        );
        anyhow::ensure!(
            self.min_workers + self.min_prefill_workers <= self.worker_budget,
            "the fewest workers ({} decode, {} prefill) are more than --worker-budget {}",
            self.min_workers,
            self.min_prefill_workers,
            self.worker_budget
        );
        anyhow::ensure!(
            self.scale_down_pressure < self.scale_up_pressure,
            "--scale-down-pressure must be below --scale-up-pressure"
        );
        anyhow::ensure!(
            self.planner_interval >= 0.1,
            "--planner-interval {} is too short: the planner samples its workers ten times an interval; at least 0.1",
            self.planner_interval
        );
        let interval = super::args::seconds(self.planner_interval);
        let settings = PlannerSettings {
            interval,
            sample_every: (interval / SAMPLES_PER_INTERVAL).max(MIN_SAMPLE_EVERY),
            predictor: predictor.clone(),
            decode: Bounds { min: self.min_workers as usize, max: self.max_workers as usize },
            prefill: Bounds { min: self.min_prefill_workers as usize, max: self.max_prefill_workers as usize },
            budget: self.worker_budget as usize,
            thresholds: Thresholds { up: self.scale_up_pressure, down: self.scale_down_pressure },
            sla: match &self.planner_profile {
                Some(source) => Some(SlaSettings {
                    profile: match source {
                        PlannerProfile::File(path) => ProfileSource::File(Arc::new(Profile::read(path)?)),
                        PlannerProfile::Workers => ProfileSource::Workers(worker_profile.clone()),
                    },
                    targets: Targets {
                        ttft_ms: self.ttft_target_ms,
                        itl_ms: self.itl_target_ms,
                        attainment: self.sla_attainment,
                    },
                }),
                None => None,
            },
        };
        let connector: Box<dyn Connector> = match self.planner_connector {
            ConnectorArg::Virtual => {
                anyhow::ensure!(
                    self.worker_flags.is_empty(),
                    "the virtual connector starts no workers: drop the flags after `--`"
                );
                Box::new(Virtual)
            }
            ConnectorArg::Local => Box::new(LocalConnector::new(self.local(cluster)?)),
            ConnectorArg::Kubernetes => Box::new(KubernetesConnector::new(self.kubernetes()?)?),
        };
        let kube_flags = self.kube_decode_deployment.is_some()
            || self.kube_prefill_deployment.is_some()
            || self.kube_api.is_some()
            || self.kube_namespace.is_some()
            || self.kube_token_file.is_some();
        anyhow::ensure!(
            self.planner_connector == ConnectorArg::Kubernetes || !kube_flags,
            "the --kube-* flags are for --planner-connector kubernetes"
        );
        let discovery = crate::core::discovery::from_spec(&cluster.discovery, key)?;
        Ok(Some(PlannerStart { discovery, settings, connector, host }))
    }

    /// Which Deployments the Kubernetes connector scales, and how it reaches the API.
    fn kubernetes(&self) -> anyhow::Result<KubernetesSettings> {
        anyhow::ensure!(
            self.worker_flags.is_empty(),
            "the kubernetes connector starts no processes: drop the flags after `--`"
        );
        let Some(decode) = self.kube_decode_deployment.clone() else {
            anyhow::bail!("--planner-connector kubernetes needs --kube-decode-deployment NAME");
        };
        anyhow::ensure!(
            self.max_prefill_workers == 0 || self.kube_prefill_deployment.is_some(),
            "--max-prefill-workers above 0 needs --kube-prefill-deployment NAME"
        );
        let mut api = match &self.kube_api {
            Some(url) => {
                anyhow::ensure!(
                    url.starts_with("http://") || url.starts_with("https://"),
                    "--kube-api {url} is not an http:// or https:// URL"
                );
                let auth = match &self.kube_token_file {
                    Some(path) => {
                        // Read again for every call (tokens rotate); said here if it cannot be read at all.
                        std::fs::metadata(path)
                            .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
                        Auth::BearerFile(path.clone())
                    }
                    None => Auth::None,
                };
                let pod_namespace = std::path::Path::new(SERVICE_ACCOUNT_DIR).join("namespace");
                let namespace = std::fs::read_to_string(pod_namespace).map(|n| n.trim().to_string());
                ApiConfig {
                    server: url.trim_end_matches('/').to_string(),
                    ca_pem: None,
                    insecure: false,
                    auth,
                    namespace: namespace.ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into()),
                }
            }
            None => {
                anyhow::ensure!(self.kube_token_file.is_none(), "--kube-token-file is the token for --kube-api URL");
                ApiConfig::infer()?
            }
        };
        if let Some(namespace) = &self.kube_namespace {
            api.namespace = namespace.clone();
        }
        Ok(KubernetesSettings { api, decode, prefill: self.kube_prefill_deployment.clone() })
    }

    /// How the local connector starts workers: the router's cluster flags, then the ones after `--`, checked
    /// here as the worker will read them.
    fn local(&self, cluster: &ClusterArgs) -> anyhow::Result<LocalSettings> {
        let mut args =
            vec!["--discovery".to_string(), cluster.discovery.clone(), "--namespace".into(), cluster.namespace.clone()];
        if let Some(path) = &cluster.key.cluster_key_file {
            args.extend(["--cluster-key-file".into(), path.display().to_string()]);
        }
        args.extend(self.worker_flags.iter().cloned());
        let kv_transfer = self.max_prefill_workers > 0;
        let mut whole = vec!["dynamo".to_string(), "decode".into()];
        whole.extend(args.iter().cloned());
        if kv_transfer {
            whole.push("--kv-transfer".into());
        }
        let parsed = <super::Cli as clap::Parser>::try_parse_from(&whole).map_err(|error| {
            anyhow::anyhow!(
                "the planner's workers would not start with `{}`: {}",
                whole.join(" "),
                error.render().to_string().trim()
            )
        })?;
        if let super::Command::Decode(worker) = &parsed.command {
            use super::args::EngineKind;
            anyhow::ensure!(
                matches!(worker.engine.engine, EngineKind::Native | EngineKind::Mocker),
                "the local connector starts workers that each run an engine; an external engine is one server that \
                 its own worker wraps: scale those with --planner-connector kubernetes (one engine and its worker \
                 per pod) or virtual"
            );
        }
        Ok(LocalSettings {
            program: std::env::current_exe()?,
            args,
            kv_transfer,
            drain_timeout: super::args::seconds(self.drain_timeout),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PlannerProfile {
    File(std::path::PathBuf),
    Workers,
}

fn planner_profile(text: &str) -> Result<PlannerProfile, String> {
    match text {
        "" => Err("expected a profile's path, or `workers`".into()),
        "workers" => Ok(PlannerProfile::Workers),
        path => Ok(PlannerProfile::File(path.into())),
    }
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.5 && v < 1.0 => Ok(v),
        _ => Err(format!("expected a share above 0.5 and below 1 (0.95 for 95 %), got `{text}`")),
    }
}

/// Load samples per planner interval (Dynamo's load planner takes 10).
const SAMPLES_PER_INTERVAL: u32 = 10;
const MIN_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

pub fn run(args: RouteArgs) -> anyhow::Result<()> {
    let key = args.cluster.key.key()?;
    let by_worker_profile = args.planner.planner_profile == Some(PlannerProfile::Workers);
    anyhow::ensure!(
        !by_worker_profile || args.router.router_mode == RouterModeArg::Latency,
        "--planner-profile workers sizes by the profile the router asks each worker for, which it does only with \
         --router-mode latency; route by latency, or give the profile's file (`dynamo profile` writes one)"
    );
    let worker_profile = WorkerProfile::default();
    let planner = args.planner.start(&args.cluster, key.as_ref(), args.http.listen().ip(), &worker_profile)?;
    let discovery = crate::core::discovery::from_spec(&args.cluster.discovery, key.as_ref())?;
    let settings = ClusterSettings {
        namespace: args.cluster.namespace,
        dead_after: super::args::seconds(args.worker_timeout),
        router: args.router.config(),
        key,
        held: args.held.settings(),
        worker_profile: by_worker_profile.then_some(worker_profile),
    };
    let (listen, http) = (args.http.listen(), args.http.settings()?);
    let epp = args.epp_port.map(|port| {
        let tls = match (&args.epp_cert_file, &args.epp_key_file) {
            _ if args.epp_insecure => Tls::Insecure,
            (Some(certificate), Some(key)) => Tls::Files { certificate: certificate.clone(), key: key.clone() },
            // Named for where it listens; gateways configured as GAIE's do not check it.
            _ => Tls::SelfSigned(vec!["localhost".into(), listen.ip().to_string()]),
        };
        let health = args.epp_health_port.map(|port| std::net::SocketAddr::new(listen.ip(), port));
        EppSettings { listen: std::net::SocketAddr::new(listen.ip(), port), health, tls }
    });
    let serving = route::serve(discovery, settings, listen, &http, planner, epp, super::shutdown_signal());
    super::runtime()?.block_on(serving)?;
    Ok(())
}
