//! `dynamo decode`, `dynamo prefill` and `dynamo encode`: a worker process that registers itself and serves
//! its engine on the planes, in the role it was started as.
use super::args::{ClusterArgs, EngineArgs, ModelArgs};
use crate::core::engine::EngineSettings;
use crate::core::model::ModelSource;
use crate::core::protocol::discovery::Role;
use crate::core::worker::{self, PlaneSettings, WorkerSettings};
use clap::Args;
use std::net::IpAddr;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub planes: PlaneArgs,

    #[command(flatten)]
    pub transfer: TransferArgs,

    #[command(flatten)]
    pub cluster: ClusterArgs,

    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `dynamo encode`'s flags: a worker's, less the generating engine's and KV's.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub planes: PlaneArgs,

    /// Port of the transfer agent that serves the embeddings (0 picks a free one).
    #[arg(long, env = "DYNAMO_TRANSFER_PORT", default_value_t = 0, help_heading = "Transfer")]
    pub transfer_port: u16,

    /// How embeddings move: shm to workers on this host and tcp to the rest (auto), or one of them always.
    #[arg(long, env = "DYNAMO_TRANSFER_BACKEND", value_enum, default_value = "auto", help_heading = "Transfer")]
    pub transfer_backend: TransferBackend,

    /// Data connections per tcp peer.
    #[arg(long, default_value_t = crate::core::transfer::DEFAULT_STREAMS as u32, value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "Transfer")]
    pub transfer_streams: u32,

    /// Memory for images' embeddings, in MiB: held for their readers, then kept so a repeated image is not
    /// encoded again (LLaVA-1.5-7B: 9 MiB an image).
    #[arg(long, env = "DYNAMO_ENCODE_CACHE_MIB", default_value_t = crate::core::encode::DEFAULT_CACHE_BYTES >> 20, value_parser = clap::value_parser!(u64).range(1..=1 << 20), help_heading = "Encoder")]
    pub encode_cache_mib: u64,

    /// Seconds an image's embeddings are kept for the worker that should read them; past it the memory may
    /// go to another image.
    #[arg(long, default_value_t = crate::core::encode::LEASE.as_secs_f64(), value_parser = lease_seconds, help_heading = "Encoder")]
    pub embeddings_lease: f64,

    /// Where to compute: auto (a GPU when CUDA and one are present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "DYNAMO_DEVICE", default_value = "auto", value_parser = super::args::parse_device, help_heading = "Encoder")]
    pub device: crate::core::engine::native::Device,

    /// Compute threads [default: the CPUs this process may use]
    #[arg(long, env = "DYNAMO_THREADS", value_parser = clap::value_parser!(u32).range(1..=4096), help_heading = "Encoder")]
    pub threads: Option<u32>,

    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Where a worker's planes listen and how it stops.
#[derive(Debug, Args)]
pub struct PlaneArgs {
    /// Address routers reach this worker at; its sockets bind there.
    #[arg(long, env = "DYNAMO_HOST", default_value = "127.0.0.1", help_heading = "Planes")]
    pub host: IpAddr,

    /// Port of the request plane (0 picks a free one).
    #[arg(long, env = "DYNAMO_REQUEST_PORT", default_value_t = 0, help_heading = "Planes")]
    pub request_port: u16,

    /// Port of the event plane (0 picks a free one).
    #[arg(long, env = "DYNAMO_EVENT_PORT", default_value_t = 0, help_heading = "Planes")]
    pub event_port: u16,

    /// Requests in flight past which new ones are refused as busy (routers then pick another worker).
    #[arg(long, default_value_t = worker::DEFAULT_MAX_IN_FLIGHT as u32, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Planes")]
    pub max_in_flight: u32,

    /// Seconds a worker told to stop (SIGTERM, Ctrl-C) keeps serving the requests it has, having left
    /// discovery; a second signal stops it at once.
    #[arg(long, env = "DYNAMO_DRAIN_TIMEOUT", default_value_t = worker::DEFAULT_DRAIN_TIMEOUT.as_secs_f64(), value_parser = super::args::non_negative_f64, help_heading = "Planes")]
    pub drain_timeout: f64,

    /// Serve /metrics (this worker's load, also under vLLM's gauge names for endpoint pickers), /health (503
    /// once it drains: a readiness probe) and /live on this port of --host (0 picks a free one).
    #[arg(long, env = "DYNAMO_METRICS_PORT", help_heading = "Planes")]
    pub metrics_port: Option<u16>,

    /// Where an OpenAI frontend serving this worker listens (a `dynamo route` beside it, e.g. in the same
    /// pod, which follows the x-worker-instance-id an endpoint picker sets): written in its record, so a
    /// Gateway API endpoint picker can send the worker's requests there.
    #[arg(long, env = "DYNAMO_HTTP_ADDR", value_parser = reachable_addr, help_heading = "Planes")]
    pub http_addr: Option<std::net::SocketAddr>,
}

/// A socket address peers can reach: not 0.0.0.0 or [::].
fn reachable_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr =
        text.parse().map_err(|_| format!("expected IP:PORT (e.g. 10.0.0.7:8000), got `{text}`"))?;
    match addr.ip().is_unspecified() {
        true => Err(format!("`{text}` is every interface, which no peer can reach; give the address they reach")),
        false => Ok(addr),
    }
}

impl PlaneArgs {
    fn settings(
        &self,
        role: Role,
        cluster: &ClusterArgs,
        key: Option<crate::core::trust::ClusterKey>,
        transfer: Option<worker::TransferSettings>,
    ) -> PlaneSettings {
        PlaneSettings {
            role,
            namespace: cluster.namespace.clone(),
            host: self.host,
            request_port: self.request_port,
            event_port: self.event_port,
            max_in_flight: self.max_in_flight as usize,
            key,
            transfer,
            http: self.http_addr,
            metrics_port: self.metrics_port,
        }
    }
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Take prompts' KV from prefill workers, and images' embeddings from encode workers, through a transfer
    /// agent (disaggregated serving; the native engine on the CPU). Its address goes in the worker's record.
    /// Prefill workers always have one. With --engine vllm: the engine runs a KV connector (NixlConnector)
    /// and takes KV from vLLM prefill workers.
    #[arg(long, env = "DYNAMO_KV_TRANSFER", help_heading = "KV transfer")]
    pub kv_transfer: bool,

    /// Port of the transfer agent (0 picks a free one).
    #[arg(long, env = "DYNAMO_TRANSFER_PORT", default_value_t = 0, help_heading = "KV transfer")]
    pub transfer_port: u16,

    /// How KV moves: shm to workers on this host and tcp to the rest (auto), or one of them always. nixl is
    /// NVIDIA's NIXL (UCX), loaded from libnixl_capi.so on LD_LIBRARY_PATH; the workers it reads from must
    /// run it too.
    #[arg(long, env = "DYNAMO_TRANSFER_BACKEND", value_enum, default_value = "auto", help_heading = "KV transfer")]
    pub transfer_backend: TransferBackend,

    /// Data connections per tcp peer.
    #[arg(long, default_value_t = crate::core::transfer::DEFAULT_STREAMS as u32, value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "KV transfer")]
    pub transfer_streams: u32,

    /// Seconds a prefill worker keeps a prompt's KV for the decode worker that should read it; past it the
    /// pages go back to the pool (a decode worker that died before reading costs no more than this).
    #[arg(long, default_value_t = crate::core::handoff::LEASE.as_secs_f64(), value_parser = lease_seconds, help_heading = "KV transfer")]
    pub kv_lease: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransferBackend {
    Auto,
    Shm,
    Tcp,
    Nixl,
}

impl TransferBackend {
    /// The backend forced, or `None` to pick per peer; nixl only where its library loads.
    fn backend(self) -> anyhow::Result<Option<crate::core::transfer::Backend>> {
        use crate::core::transfer::Backend;
        Ok(match self {
            TransferBackend::Auto => None,
            TransferBackend::Shm => Some(Backend::Shm),
            TransferBackend::Tcp => Some(Backend::Tcp),
            TransferBackend::Nixl => {
                crate::core::transfer::nixl_available()
                    .map_err(|why| anyhow::anyhow!("--transfer-backend nixl: {why}"))?;
                Some(Backend::Nixl)
            }
        })
    }
}

/// A lease: more than nothing, at most an hour (past that, pages a dead reader held are as good as lost).
fn lease_seconds(text: &str) -> Result<f64, String> {
    match super::args::positive_f64(text)? {
        seconds if seconds <= 3600.0 => Ok(seconds),
        _ => Err(format!("expected at most 3600 seconds, got `{text}`")),
    }
}

impl TransferArgs {
    fn settings(&self, role: Role) -> anyhow::Result<Option<worker::TransferSettings>> {
        let defaults = (0, TransferBackend::Auto, crate::core::transfer::DEFAULT_STREAMS as u32);
        let given = (self.transfer_port, self.transfer_backend, self.transfer_streams);
        anyhow::ensure!(
            role == Role::Prefill || self.kv_lease == crate::core::handoff::LEASE.as_secs_f64(),
            "--kv-lease is how long a prefill worker keeps KV for its reader; a decode worker holds none"
        );
        if role == Role::Decode && !self.kv_transfer {
            anyhow::ensure!(
                given == defaults,
                "--transfer-port, --transfer-backend and --transfer-streams set up the transfer agent that \
                 --kv-transfer starts; add --kv-transfer"
            );
            return Ok(None);
        }
        Ok(Some(worker::TransferSettings {
            port: self.transfer_port,
            backend: self.transfer_backend.backend()?,
            streams: self.transfer_streams as usize,
            lease: super::args::seconds(self.kv_lease),
        }))
    }
}

pub fn run(args: WorkerArgs, role: Role) -> anyhow::Result<()> {
    let key = args.cluster.key.key()?;
    let discovery = crate::core::discovery::from_spec(&args.cluster.discovery, key.as_ref())?;
    let model = args.model.source();
    let mut engine = args.engine.settings()?;
    if let (EngineSettings::External(external), ModelSource::Builtin) = (&engine, &model) {
        anyhow::bail!(
            "--engine {} needs --model DIR: the engine's checkpoint directory, whose tokenizer, chat template and \
             context the routers use for the requests they send it",
            external.kind.name()
        );
    }
    // An external engine's KV moves through the engine's own connector, never dynamo's transfer agent.
    let mut transfer = args.transfer.settings(role)?;
    if let EngineSettings::External(external) = &mut engine {
        let kind = external.kind;
        anyhow::ensure!(
            args.transfer.transfer_port == 0 && args.transfer.transfer_backend == TransferBackend::Auto,
            "--engine {} moves KV through its own connector: --transfer-port and --transfer-backend do not apply",
            kind.name()
        );
        external.kv_connector = transfer.take().is_some();
    }
    let settings = WorkerSettings {
        model,
        model_options: args.model.options(),
        engine,
        planes: args.planes.settings(role, &args.cluster, key, transfer),
        drain_timeout: super::args::seconds(args.planes.drain_timeout),
    };
    super::runtime()?.block_on(worker::run(settings, discovery, super::shutdown_signal))?;
    Ok(())
}

pub fn run_encoder(args: EncodeArgs) -> anyhow::Result<()> {
    let key = args.cluster.key.key()?;
    let discovery = crate::core::discovery::from_spec(&args.cluster.discovery, key.as_ref())?;
    let lease = super::args::seconds(args.embeddings_lease);
    let transfer = worker::TransferSettings {
        port: args.transfer_port,
        backend: args.transfer_backend.backend()?,
        streams: args.transfer_streams as usize,
        lease,
    };
    let settings = worker::EncoderSettings {
        model: args.model.source(),
        model_options: args.model.options(),
        device: args.device,
        threads: args.threads.map_or_else(super::args::available_cpus, |t| t as usize),
        encode: crate::core::encode::EncodeSettings { cache_bytes: args.encode_cache_mib << 20, lease },
        planes: args.planes.settings(Role::Encode, &args.cluster, key, Some(transfer)),
        drain_timeout: super::args::seconds(args.planes.drain_timeout),
    };
    super::runtime()?.block_on(worker::run_encoder(settings, discovery, super::shutdown_signal))?;
    Ok(())
}
