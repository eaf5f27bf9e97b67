//! Flag groups more than one subcommand takes.
use crate::core::engine::EngineSettings;
use crate::core::engine::external::{ExternalKind, ExternalSettings};
use crate::core::engine::mocker::{self, MockerConfig};
use crate::core::engine::native::{Device, NativeSettings, Quantization};
use crate::core::engine::scheduler::SchedulerConfig;
use crate::core::frontend::media::MediaSettings;
use crate::core::frontend::{ApiKey, HttpSettings};
use crate::core::model::{ModelOptions, ModelSource};
use crate::core::router::{RouterConfig, RouterMode};
use crate::core::trust::ClusterKey;
use clap::{Args, ValueEnum};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// The built-in engine: runs the model's weights (Llama / Mistral / Qwen2 / Qwen3 safetensors) on the CPU.
    Native,
    /// Simulated engine: real KV-cache bookkeeping, timing fitted to vLLM, no weights needed.
    Mocker,
    /// A running vLLM server (--engine-url), put behind this worker: its OpenAI API, KV events and metrics.
    Vllm,
    /// A running SGLang server (--engine-url): its /generate API, KV events and metrics (--enable-metrics).
    Sglang,
    /// A running TensorRT-LLM server (trtllm-serve, --engine-url): its OpenAI API, polled KV events, metrics.
    Trtllm,
}

/// Which model a process serves, and as what (shared by `run` and the worker roles).
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// HF model directory (config.json, tokenizer files, safetensors weights) [default: the built-in tiny-chat]
    #[arg(long, env = "DYNAMO_MODEL", value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// The model directory as vLLM takes it (`vllm serve DIR`): the same as --model.
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_dir: Option<PathBuf>,

    /// Names clients use in "model", the first the one answers carry (space- or comma-separated, as vLLM's)
    /// [default: the model directory's name]
    #[arg(long, env = "DYNAMO_SERVED_MODEL_NAME", value_name = "NAME", num_args = 1.., value_delimiter = ',')]
    pub served_model_name: Vec<String>,

    /// Longest sequence (prompt plus output) served, at most the model's context [default: the model's]
    #[arg(long, env = "DYNAMO_MAX_MODEL_LEN", value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_model_len: Option<u32>,

    /// A Jinja chat template file to use instead of the model's (routers get it with the model's files).
    #[arg(long, env = "DYNAMO_CHAT_TEMPLATE", value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

impl ModelArgs {
    pub fn source(&self) -> ModelSource {
        self.model.clone().or_else(|| self.model_dir.clone()).map(ModelSource::Dir).unwrap_or(ModelSource::Builtin)
    }

    pub fn options(&self) -> ModelOptions {
        ModelOptions {
            served_names: self.served_model_name.clone(),
            max_model_len: self.max_model_len,
            chat_template: self.chat_template.clone(),
        }
    }
}

/// Flags of the engine every worker runs (the scheduler's are shared by both engines).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Engine")]
pub struct EngineArgs {
    /// Engine the workers run.
    #[arg(long, env = "DYNAMO_ENGINE", value_enum, default_value_t = EngineKind::Native)]
    pub engine: EngineKind,

    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub block_size: u32,

    /// KV blocks per worker [default: 16384 for the mocker; for native, what --kv-cache-gib holds]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub num_blocks: Option<u32>,

    /// Most requests in a worker's running batch [default: 256]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: Option<u32>,

    /// Token budget of one engine step (prefill chunks plus decodes) [default: 8192]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_batched_tokens: Option<u32>,

    /// Turn off prefix caching (no block reuse between requests).
    #[arg(long)]
    pub no_prefix_caching: bool,

    /// Native: where to compute: auto (a GPU when CUDA and one are present, else the CPU), cpu, cuda or cuda:N
    /// [default: auto]
    #[arg(long, env = "DYNAMO_DEVICE", value_parser = parse_device)]
    pub device: Option<Device>,

    /// Native: compute threads shared by this process's workers [default: the CPUs this process may use]
    #[arg(long, env = "DYNAMO_THREADS", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,

    /// Native: memory for each worker's KV cache, in GiB [default: 1]
    #[arg(long, env = "DYNAMO_KV_CACHE_GIB", value_parser = positive_f64)]
    pub kv_cache_gib: Option<f64>,

    /// Native: how the weights are held: none (as the checkpoint stores them) or int8 (symmetric, one scale per
    /// output channel, quantized at load; CPU only: about half of bf16's bytes to stream per token).
    #[arg(long, env = "DYNAMO_QUANTIZATION", value_enum, default_value_t = Quantization::None)]
    pub quantization: Quantization,

    /// Mocker: simulated time runs this many times faster than the fitted real timing [default: 1]
    #[arg(long, env = "DYNAMO_MOCKER_SPEEDUP", value_parser = positive_f64)]
    pub speedup: Option<f64>,

    /// Mocker: KV bytes per token of the simulated model; a hand-off between mockers (prefill to decode) takes
    /// as long as moving that much would [default: 131072, Llama-3-8B in bf16]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_KV_BYTES_PER_TOKEN))]
    pub kv_bytes_per_token: Option<u64>,

    /// Mocker: the bandwidth of a hand-off between mockers, GB/s (measure yours with `dynamo bench transfer`)
    /// [default: 25]
    #[arg(long, value_parser = positive_f64)]
    pub transfer_gbps: Option<f64>,

    /// vLLM / SGLang / TensorRT-LLM: its server, http://HOST:PORT (required with those engines).
    #[arg(
        long,
        value_name = "URL",
        required_if_eq_any([("engine", "vllm"), ("engine", "sglang"), ("engine", "trtllm")])
    )]
    pub engine_url: Option<String>,

    /// vLLM / SGLang: its KV-event publisher (the endpoint of its --kv-events-config, e.g. tcp://HOST:5557);
    /// TensorRT-LLM: its events URL, asked every 100 ms (http://HOST:PORT/kv_cache_events). Without it the
    /// routers see no KV of this worker and route to it by load only.
    #[arg(long, value_name = "ENDPOINT")]
    pub kv_events: Option<String>,

    /// vLLM / SGLang: its KV-event replay socket (replay_endpoint of --kv-events-config, e.g. tcp://HOST:5558): the worker
    /// starts from the engine's event history and fills gaps from it.
    #[arg(long, value_name = "ENDPOINT", requires = "kv_events")]
    pub kv_events_replay: Option<String>,

    /// SGLang prefill worker: the engine's --disaggregation-bootstrap-port, which decode engines fetch KV from.
    #[arg(long, value_name = "PORT", default_value_t = crate::core::engine::external::SGLANG_BOOTSTRAP_PORT)]
    pub engine_bootstrap_port: u16,

    /// vLLM run with --data-parallel-size N: the rank (0..N) this worker fronts. Its KV events come from
    /// --kv-events' port + rank (where vLLM puts that rank's publisher; --kv-events-replay likewise), its load
    /// from that rank's series, and each request is pinned to the rank (X-data-parallel-rank), so the routers
    /// see every rank's cache on its own. Start one worker per rank.
    #[arg(long, value_name = "RANK", value_parser = clap::value_parser!(u32).range(0..1024))]
    pub data_parallel_rank: Option<u32>,

    /// Its Prometheus metrics [default: /metrics of --engine-url; TensorRT-LLM: /prometheus/metrics]
    #[arg(long, value_name = "URL")]
    pub engine_metrics: Option<String>,

    /// Native and external engines: their performance profile, written by `dynamo profile` on this model and
    /// hardware, which a --router-mode latency router prices this worker by (the mocker's is its timing fit).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<std::path::PathBuf>,
}

impl EngineKind {
    /// As `--engine` spells it.
    pub fn name(self) -> String {
        self.to_possible_value().map_or_else(|| format!("{self:?}"), |value| value.get_name().to_string())
    }
}

/// Far above any model's (DeepSeek-V3's MLA cache in bf16 is ~70 KB a token), so a typo is refused.
const MAX_KV_BYTES_PER_TOKEN: u64 = 1 << 30;

/// The mocker's KV blocks per worker when --num-blocks is not given.
const MOCKER_NUM_BLOCKS: usize = 16384;
const DEFAULT_MAX_NUM_SEQS: u32 = 256;
const DEFAULT_MAX_NUM_BATCHED_TOKENS: u32 = 8192;
const DEFAULT_KV_CACHE_GIB: f64 = 1.0;

impl EngineArgs {
    /// The most requests in a running batch, given or the default.
    pub fn max_num_seqs(&self) -> u32 {
        self.max_num_seqs.unwrap_or(DEFAULT_MAX_NUM_SEQS)
    }

    /// Refuses a flag given to an engine that does not read it, saying which engines do and why: a flag that
    /// silently does nothing would leave its user believing it took effect.
    fn check_engine_flags(&self) -> anyhow::Result<()> {
        use EngineKind::*;
        // Each group: the engines that read its flags, why the others do not, and its flags with whether given.
        /// Flags, each with whether it was given.
        type Flags<'a> = &'a [(&'a str, bool)];
        let groups: [(&[EngineKind], &str, Flags); 5] = [
            (
                &[Vllm, Sglang, Trtllm],
                "it points at an external engine (its server, events, metrics or rank)",
                &[
                    ("--engine-url", self.engine_url.is_some()),
                    ("--kv-events", self.kv_events.is_some()),
                    ("--kv-events-replay", self.kv_events_replay.is_some()),
                    ("--engine-metrics", self.engine_metrics.is_some()),
                    ("--data-parallel-rank", self.data_parallel_rank.is_some()),
                ],
            ),
            (
                &[Mocker],
                "it sets the mocker's simulated time; a real engine's runs as fast as it does",
                &[
                    ("--speedup (DYNAMO_MOCKER_SPEEDUP)", self.speedup.is_some()),
                    ("--kv-bytes-per-token", self.kv_bytes_per_token.is_some()),
                    ("--transfer-gbps", self.transfer_gbps.is_some()),
                ],
            ),
            (
                &[Native],
                "the mocker computes nothing, and an external engine takes its own flags for it",
                &[
                    ("--device (DYNAMO_DEVICE)", self.device.is_some()),
                    ("--threads (DYNAMO_THREADS)", self.threads.is_some()),
                    ("--kv-cache-gib (DYNAMO_KV_CACHE_GIB)", self.kv_cache_gib.is_some()),
                    ("--quantization (DYNAMO_QUANTIZATION)", self.quantization != Quantization::None),
                ],
            ),
            (
                &[Native, Vllm, Sglang, Trtllm],
                "the mocker's profile is its timing fit",
                &[("--profile", self.profile.is_some())],
            ),
            (
                &[Native, Mocker],
                "an external engine schedules and sizes its own cache: give it to the engine",
                &[
                    ("--num-blocks", self.num_blocks.is_some()),
                    ("--max-num-seqs", self.max_num_seqs.is_some()),
                    ("--max-num-batched-tokens", self.max_num_batched_tokens.is_some()),
                    ("--no-prefix-caching", self.no_prefix_caching),
                ],
            ),
        ];
        let refused = groups.iter().filter(|(engines, _, _)| !engines.contains(&self.engine)).find_map(
            |(engines, why, flags)| flags.iter().find(|(_, given)| *given).map(|(flag, _)| (flag, engines, why)),
        );
        if let Some((flag, engines, why)) = refused {
            let names: Vec<String> = engines.iter().map(|engine| engine.name()).collect();
            anyhow::bail!(
                "{flag} is read only by --engine {}, and this worker runs --engine {}: {why}; drop the flag",
                names.join(", "),
                self.engine.name()
            );
        }
        Ok(())
    }

    pub fn settings(&self) -> anyhow::Result<EngineSettings> {
        self.check_engine_flags()?;
        let profile = self.profile.as_deref().map(crate::core::engine::profile::Profile::read).transpose()?;
        let scheduler = SchedulerConfig {
            block_size: self.block_size as usize,
            num_blocks: self.num_blocks.map_or(MOCKER_NUM_BLOCKS, |n| n as usize),
            max_num_seqs: self.max_num_seqs() as usize,
            max_num_batched_tokens: self.max_num_batched_tokens.unwrap_or(DEFAULT_MAX_NUM_BATCHED_TOKENS) as usize,
            enable_prefix_caching: !self.no_prefix_caching,
            ..SchedulerConfig::default()
        };
        Ok(match self.engine {
            EngineKind::Mocker => EngineSettings::Mocker(MockerConfig {
                scheduler,
                speedup: self.speedup.unwrap_or(1.0),
                kv_bytes_per_token: self.kv_bytes_per_token.unwrap_or(mocker::DEFAULT_KV_BYTES_PER_TOKEN),
                transfer_bytes_per_s: self
                    .transfer_gbps
                    .map_or(mocker::DEFAULT_TRANSFER_BYTES_PER_S, |gbps| gbps * 1e9),
            }),
            EngineKind::Native => EngineSettings::Native(NativeSettings {
                // Settled here so the serving line names the device actually used.
                device: self.device.unwrap_or(Device::Auto).resolve(),
                threads: self.threads.map_or_else(available_cpus, |t| t as usize),
                kv_cache_gib: self.kv_cache_gib.unwrap_or(DEFAULT_KV_CACHE_GIB),
                num_blocks: self.num_blocks.map(|n| n as usize),
                scheduler,
                profile,
                quantization: self.quantization,
            }),
            EngineKind::Vllm | EngineKind::Sglang | EngineKind::Trtllm => EngineSettings::External(ExternalSettings {
                kind: match self.engine {
                    EngineKind::Sglang => ExternalKind::Sglang,
                    EngineKind::Trtllm => ExternalKind::Trtllm,
                    _ => ExternalKind::Vllm,
                },
                url: self.engine_url.clone().unwrap_or_default(),
                kv_events: self.kv_events.clone(),
                kv_events_replay: self.kv_events_replay.clone(),
                metrics_url: self.engine_metrics.clone(),
                block_size: self.block_size as usize,
                kv_connector: false,
                bootstrap_port: self.engine_bootstrap_port,
                data_parallel_rank: self.data_parallel_rank,
                profile,
            }),
        })
    }
}

fn parse_tool_parser(text: &str) -> Result<crate::core::frontend::tools::ToolParser, String> {
    crate::core::frontend::tools::ToolParser::from_name(text)
        .ok_or_else(|| format!("expected hermes, mistral or llama3_json, got `{text}`"))
}

pub fn parse_device(text: &str) -> Result<Device, String> {
    match text {
        "auto" => Ok(Device::Auto),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got `{text}`")),
    }
}

/// A sampling temperature: finite and 0 or more, as the HTTP API accepts it.
pub fn parse_temperature(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("expected a temperature of 0 or more (0 is greedy), got `{text}`")),
    }
}

pub(super) fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A flag's seconds as a duration; past what a duration holds, forever.
pub(super) fn seconds(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

pub(super) fn positive_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a number greater than 0, got `{text}`")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RouterModeArg {
    /// Lowest cost: uncached prompt blocks and queued prefill, weighed against decode load.
    Kv,
    /// Lowest predicted time to first token: the prefill of what the worker lacks, behind its queued prompts
    /// and beside its decode batch, timed by the worker's performance profile.
    Latency,
    RoundRobin,
    Random,
    /// Fewest requests in flight.
    LeastLoaded,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Router")]
pub struct RouterArgs {
    /// How requests are spread over workers.
    #[arg(long, env = "DYNAMO_ROUTER_MODE", value_enum, default_value_t = RouterModeArg::Latency)]
    pub router_mode: RouterModeArg,

    /// Weight of prefill work (uncached and queued prompt blocks) against decode blocks in the kv cost.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f64)]
    pub kv_overlap_score_weight: f64,

    /// 0 always takes the cheapest worker; above 0 samples a softmax over normalised costs.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub router_temperature: f64,

    /// The engines publish no KV events: route on the router's own past decisions instead.
    #[arg(long)]
    pub no_kv_events: bool,

    /// With --no-kv-events, seconds a worker is assumed to keep a prompt it was sent.
    #[arg(long, default_value_t = 120.0, value_parser = non_negative_f64)]
    pub router_ttl: f64,

    /// In-flight requests per worker past which the frontend answers 503 with Retry-After.
    #[arg(long, env = "DYNAMO_BUSY_THRESHOLD", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub busy_threshold: u32,

    /// Times a request whose worker is lost mid-stream continues on another worker (0: it fails instead).
    #[arg(long, env = "DYNAMO_MIGRATION_LIMIT", default_value_t = 3)]
    pub migration_limit: u32,

    /// With prefill workers up: prompts whose part not cached on their decode worker is at least this many
    /// tokens are prefilled on a prefill worker, shorter ones on the decode worker (0: every prompt).
    #[arg(long, env = "DYNAMO_DISAGG_THRESHOLD", default_value_t = 0, help_heading = "Disaggregation")]
    pub disagg_threshold: u32,

    /// Prefills in flight per prefill worker past which it takes no more; when all are full, prompts are
    /// prefilled on their decode worker rather than wait.
    #[arg(long, env = "DYNAMO_PREFILL_QUEUE_LIMIT", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Disaggregation")]
    pub prefill_queue_limit: u32,

    /// With prefill workers up: a prompt is prefilled on its decode worker when moving its KV there (at the
    /// rate that worker's reads have gone), spread over the tokens the request may generate, would add more
    /// than this many ms to its mean time between tokens: a long prompt with a short answer (0: no limit).
    #[arg(long, env = "DYNAMO_DISAGG_ITL_BUDGET_MS", default_value_t = crate::core::router::DISAGG_ITL_BUDGET.as_secs_f64() * 1e3, value_parser = non_negative_f64, help_heading = "Disaggregation")]
    pub disagg_itl_budget_ms: f64,

    /// Requests with images in flight per encode worker past which it takes no more; when all are full, the
    /// worker that prefills a prompt encodes its images itself rather than wait.
    #[arg(long, env = "DYNAMO_ENCODE_QUEUE_LIMIT", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Disaggregation")]
    pub encode_queue_limit: u32,
}

impl From<RouterModeArg> for RouterMode {
    fn from(mode: RouterModeArg) -> Self {
        match mode {
            RouterModeArg::Kv => RouterMode::Kv,
            RouterModeArg::Latency => RouterMode::Latency,
            RouterModeArg::RoundRobin => RouterMode::RoundRobin,
            RouterModeArg::Random => RouterMode::Random,
            RouterModeArg::LeastLoaded => RouterMode::LeastLoaded,
        }
    }
}

impl RouterArgs {
    pub fn config(&self) -> RouterConfig {
        RouterConfig {
            mode: self.router_mode.into(),
            busy_threshold: self.busy_threshold as usize,
            overlap_weight: self.kv_overlap_score_weight,
            temperature: self.router_temperature,
            kv_events: !self.no_kv_events,
            approximate_ttl: seconds(self.router_ttl),
            migration_limit: self.migration_limit,
            disagg_threshold: self.disagg_threshold as usize,
            prefill_queue_limit: self.prefill_queue_limit as usize,
            disagg_itl_budget: (self.disagg_itl_budget_ms > 0.0).then(|| seconds(self.disagg_itl_budget_ms / 1e3)),
            encode_queue_limit: self.encode_queue_limit as usize,
            ..RouterConfig::default()
        }
    }
}

pub(super) fn non_negative_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("expected a number of 0 or more, got `{text}`")),
    }
}

/// The OpenAI HTTP frontend: where it listens and what it allows a client.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP frontend")]
pub struct HttpArgs {
    /// Address the OpenAI HTTP frontend listens on.
    #[arg(long, visible_alias = "host", env = "DYNAMO_HTTP_HOST", default_value = "127.0.0.1")]
    pub http_host: IpAddr,

    /// Port of the OpenAI HTTP frontend (0 picks a free one).
    #[arg(long, visible_alias = "port", env = "DYNAMO_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,

    /// Clients must send `Authorization: Bearer KEY` (all but /health, /live and /metrics).
    #[arg(long, env = "DYNAMO_API_KEY", value_name = "KEY", hide_env_values = true, value_parser = ApiKey::new)]
    pub api_key: Option<ApiKey>,

    /// With --api-key, /metrics asks for the key too.
    #[arg(long)]
    pub protect_metrics: bool,

    /// Web origins whose pages may call the API from a browser (CORS), comma-separated; `*` for any.
    #[arg(long = "allowed-origin", env = "DYNAMO_ALLOWED_ORIGINS", value_name = "ORIGIN", value_delimiter = ',', value_parser = crate::core::frontend::valid_origin)]
    pub allowed_origins: Vec<String>,

    /// The format chat models write tool calls in (hermes, mistral, llama3_json), read from their output into
    /// `tool_calls` [default: the one the chat template names]
    #[arg(long, env = "DYNAMO_TOOL_CALL_PARSER", value_name = "FORMAT", value_parser = parse_tool_parser)]
    pub tool_call_parser: Option<crate::core::frontend::tools::ToolParser>,

    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, env = "DYNAMO_MAX_REQUEST_BYTES", default_value_t = HttpSettings::DEFAULT_MAX_REQUEST_BYTES as u64, value_parser = clap::value_parser!(u64).range(1024..=1 << 32))]
    pub max_request_bytes: u64,

    /// Open client connections past which a new one is answered 503 (lowered to fit `ulimit -n`).
    #[arg(long, env = "DYNAMO_MAX_CONNECTIONS", default_value_t = HttpSettings::DEFAULT_MAX_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Seconds a client has to send a request's headers; a kept-alive connection idle this long is closed.
    #[arg(long, default_value_t = HttpSettings::DEFAULT_HEADER_TIMEOUT_S, value_parser = positive_f64)]
    pub http_header_timeout: f64,

    /// Seconds a client has to send a whole request body (408 past it).
    #[arg(long, default_value_t = HttpSettings::DEFAULT_BODY_TIMEOUT_S, value_parser = positive_f64)]
    pub http_body_timeout: f64,

    /// Images one prompt may carry (vision models); more are answered 400.
    #[arg(long, env = "DYNAMO_LIMIT_IMAGES_PER_PROMPT", default_value_t = MediaSettings::DEFAULT_MAX_IMAGES, value_name = "N")]
    pub limit_images_per_prompt: usize,

    /// A directory whose image files requests may name as `file:///…` URLs (none by default: any client could
    /// then read what this server can read there).
    #[arg(long, env = "DYNAMO_ALLOWED_LOCAL_MEDIA_PATH", value_name = "DIR")]
    pub allowed_local_media_path: Option<std::path::PathBuf>,

    /// Hosts image URLs may be fetched from, redirects included (exact names, comma-separated) [default: any;
    /// on a server untrusted clients reach, set it: they could otherwise have it fetch internal addresses]
    #[arg(long, env = "DYNAMO_ALLOWED_MEDIA_DOMAINS", value_name = "HOST", num_args = 1.., value_delimiter = ',')]
    pub allowed_media_domains: Vec<String>,

    /// Seconds fetching one image URL may take.
    #[arg(long, env = "DYNAMO_MEDIA_FETCH_TIMEOUT", default_value_t = MediaSettings::DEFAULT_FETCH_TIMEOUT.as_secs_f64(), value_parser = positive_f64, value_name = "SECONDS")]
    pub media_fetch_timeout: f64,
}

impl HttpArgs {
    pub fn listen(&self) -> SocketAddr {
        SocketAddr::new(self.http_host, self.http_port)
    }

    pub fn settings(&self) -> anyhow::Result<HttpSettings> {
        let local_root = match &self.allowed_local_media_path {
            Some(dir) => Some(std::fs::canonicalize(dir).map_err(|e| {
                anyhow::anyhow!("--allowed-local-media-path {}: {e}; name a directory that exists", dir.display())
            })?),
            None => None,
        };
        Ok(HttpSettings {
            max_request_bytes: usize::try_from(self.max_request_bytes).unwrap_or(usize::MAX),
            max_connections: self.max_connections as usize,
            header_timeout: seconds(self.http_header_timeout),
            body_timeout: seconds(self.http_body_timeout),
            api_key: self.api_key.clone(),
            protect_metrics: self.protect_metrics,
            allowed_origins: self.allowed_origins.clone(),
            tool_parser: self.tool_call_parser,
            media: MediaSettings {
                max_images: self.limit_images_per_prompt,
                local_root,
                allowed_domains: (!self.allowed_media_domains.is_empty()).then(|| self.allowed_media_domains.clone()),
                fetch_timeout: seconds(self.media_fetch_timeout),
            },
        })
    }
}

/// The cluster secret every role of a cluster shares.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Discovery")]
pub struct KeyArgs {
    /// File holding the cluster key (`dynamo keygen --out PATH` makes one): every plane message is sealed
    /// with it and processes without it are ignored. Without a key (nor DYNAMO_CLUSTER_KEY) the cluster is
    /// open to anyone on the network.
    #[arg(long, env = "DYNAMO_CLUSTER_KEY_FILE", value_name = "PATH")]
    pub cluster_key_file: Option<std::path::PathBuf>,
}

impl KeyArgs {
    /// The key from the file, else from `DYNAMO_CLUSTER_KEY`; without one, says once that the cluster is open.
    pub fn key(&self) -> anyhow::Result<Option<ClusterKey>> {
        if let Some(path) = &self.cluster_key_file {
            return Ok(Some(ClusterKey::read(path)?));
        }
        if let Ok(text) = std::env::var("DYNAMO_CLUSTER_KEY") {
            return Ok(Some(ClusterKey::parse(&text, "DYNAMO_CLUSTER_KEY")?));
        }
        eprintln!(
            "dynamo: the cluster is open: anyone who can reach its ports can join it and read its prompts; make a key \
             with `dynamo keygen --out PATH` and pass --cluster-key-file PATH to every role"
        );
        Ok(None)
    }
}

/// How a role finds the others.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Discovery")]
pub struct ClusterArgs {
    /// Where roles find each other: mdns (multicast DNS on the local network, nothing to set up), mdns:PORT
    /// (the same on another UDP port), file:PATH (a TOML or JSON cluster file every machine can read;
    /// workers add and remove themselves), or k8s[:SELECTOR] (the Kubernetes API: workers write DynamoWorker
    /// records owned by their pods and are seen while ready in the EndpointSlices of the Services labelled
    /// SELECTOR, by default dynamo.rs/discovery=enabled).
    #[arg(long, env = "DYNAMO_DISCOVERY", value_name = "SPEC", default_value = "mdns")]
    pub discovery: String,

    /// Clusters sharing one network or file see only their own namespace.
    #[arg(long, env = "DYNAMO_NAMESPACE", default_value = "dynamo")]
    pub namespace: String,

    #[command(flatten)]
    pub key: KeyArgs,
}
