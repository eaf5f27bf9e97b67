//! `dynamo bench …`: benchmarks that print a table, or with `--json` one JSON object on the last line.
use crate::core::bench::Load;
use crate::core::bench::encode;
use crate::core::bench::engine::{self, EngineBenchSettings};
use crate::core::bench::epp;
use crate::core::bench::http::{self, HttpBenchSettings};
use crate::core::bench::index::{self, IndexBenchSettings};
use crate::core::bench::plane;
use crate::core::bench::route::{self, Pace, RouteBenchSettings};
use crate::core::bench::soak::{self, SoakSettings};
use crate::core::bench::trace;
use crate::core::bench::transfer::{self, Layout, TransferBenchSettings};
use crate::core::engine::EngineSettings;
use crate::core::engine::external::{ExternalKind, ExternalSettings};
use crate::core::engine::mocker::{self, MockerConfig};
use crate::core::engine::native::Device;
use crate::core::engine::scheduler::SchedulerConfig;
use crate::core::model::ModelSource;
use crate::core::router::{RouterConfig, RouterMode};
use crate::core::run::RunSettings;
use crate::core::transfer::Backend;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Requests/s and added latency of the HTTP frontend, against the same workers called directly.
    Http(HttpArgs),
    /// KV index under a replayed Mooncake trace: FlashIndexer against the reference index.
    Index(IndexArgs),
    /// Routing quality on a replayed trace: cached fraction, TTFT, ITL and load spread of latency vs kv vs
    /// round-robin vs random routing.
    Route(RouteArgs),
    /// Writes a synthetic Mooncake-format trace (shared prefixes, or multi-turn conversations in bursts) for
    /// the other benches.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Aggregated vs always-disaggregated vs conditional serving on a replayed trace, same simulated GPUs:
    /// TTFT, ITL and goodput.
    Disagg(DisaggArgs),
    /// Aggregated vs disaggregated serving on the native engine in one process: TTFT and ITL of a mix of
    /// long and short prompts under concurrency.
    DisaggNative(DisaggNativeArgs),
    /// Load forecasts on a trace: one-step-ahead WAPE of every predictor (constant, moving average, EWMA,
    /// Kalman) on requests, input and output tokens per interval.
    Planner(PlannerArgs),
    /// KV events through the ZMQ event plane end to end, against raw libzmq PUB/SUB of the same bytes.
    Plane(PlaneArgs),
    /// The Gateway API endpoint picker: picks through Envoy's ext_proc gRPC stream against the router's own
    /// pick called directly, at the same rate.
    Epp(EppArgs),
    /// Native engine prefill and decode speed on the CPU, against the memory-bandwidth bound.
    Engine(EngineArgs),
    /// Images through a vision model's tower on the CPU, against the CPU's matrix-product peak.
    Encode(EncodeArgs),
    /// KV blocks of real model shapes moved between two processes by each transfer backend, against memcpy
    /// and raw loopback TCP of the same bytes.
    Transfer(TransferArgs),
    /// The other process of `bench transfer` (started by it).
    #[command(hide = true)]
    TransferTarget(TransferTargetArgs),
    /// Minutes of valid, hostile and cut-off requests on `dynamo route` while workers are killed: served,
    /// refused, lost, and the router's memory and file descriptors from start to end.
    Soak(SoakArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransferBackendArg {
    Shm,
    Tcp,
    /// NVIDIA's NIXL (UCX), where libnixl_capi.so can be loaded; reported as unavailable otherwise.
    Nixl,
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "shm,tcp,nixl")]
    pub backend: Vec<TransferBackendArg>,

    /// KV blocks moved per request, of each model shape (SmolLM2-135M and Llama-3-8B).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub blocks: u64,

    /// How KV pages lie in memory.
    #[arg(long, value_enum, default_value = "layered")]
    pub layout: Layout,

    /// Timed rounds of each path; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,

    /// One-block requests timed for the latency percentiles.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub latency_requests: u32,

    /// Data connections of the tcp backend, and of the several-stream raw TCP reference.
    #[arg(long, default_value_t = crate::core::transfer::DEFAULT_STREAMS as u32, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub streams: u32,

    /// Both processes hold a fresh cluster key, as a keyed cluster's workers do: tcp's bytes are encrypted
    /// (the raw TCP references stay clear, so their ratio is what sealing costs).
    #[arg(long)]
    pub sealed: bool,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TransferTargetArgs {
    #[arg(long, value_enum)]
    pub layout: Layout,

    #[arg(long)]
    pub blocks: u64,

    /// Run NIXL too.
    #[arg(long)]
    pub nixl: bool,
}

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 1.0, value_parser = super::args::positive_f64)]
    pub minutes: f64,

    /// Mocker workers, each its own `dynamo decode` process.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub workers: u32,

    /// Requests started per second, of every kind.
    #[arg(long, default_value_t = 100.0, value_parser = super::args::positive_f64)]
    pub rate: f64,

    /// Seconds between worker kills (SIGKILL, then a new worker in its place).
    #[arg(long, default_value_t = 10.0, value_parser = super::args::positive_f64)]
    pub kill_every: f64,

    /// Mocker speedup.
    #[arg(long, default_value_t = 20.0, value_parser = super::args::positive_f64)]
    pub speedup: f64,

    /// Seed of the request mix and of which worker is killed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// LLaVA-style checkpoint directory [default: a generated random LLaVA-1.5-shaped vision tower, bf16]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Compute threads [default: the CPUs this process may use]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,

    /// Images per pass through the tower.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub batch: u32,

    /// Timed passes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rounds: u32,

    /// Text requests decoding while images arrive, aggregated and with an encode worker (0 skips that part).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=256))]
    pub text_streams: u32,

    /// Image requests that arrive, one after another, while the text requests decode.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub images: u32,

    /// Also print the result as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// HF checkpoint directory [default: a generated random SmolLM2-135M-shaped bf16 model]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Compute threads [default: the CPUs this process may use]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,

    /// Where to run: auto, cpu, cuda or cuda:N (the bandwidth and compute ceilings are measured on the CPU only).
    #[arg(long, default_value = "cpu", value_parser = super::args::parse_device)]
    pub device: Device,

    /// Prompt lengths to prefill.
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    pub prompt_tokens: Vec<usize>,

    /// Decode batch sizes (batch 1 first: the others are compared with it).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batch: Vec<usize>,

    /// Sampling temperatures to decode at, each with every batch size (0 is greedy, the others are compared
    /// with it).
    #[arg(long, value_delimiter = ',', default_value = "0,1", value_parser = super::args::parse_temperature)]
    pub temperature: Vec<f32>,

    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub decode_steps: u32,

    /// Prefill runs per prompt length.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: u32,

    /// Also decode each batch held to a JSON schema (structured output) and compare with it free ("× free").
    #[arg(long)]
    pub structured: bool,

    /// How the weights are held, each measured in turn: none (the checkpoint's), int8.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none")]
    pub quantization: Vec<crate::core::engine::native::Quantization>,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PlaneArgs {
    /// Messages to send on each path.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,

    /// KV events per message (a worker publishes one batch per engine step).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub events_per_message: u32,

    /// Alternating rounds of each plane and raw libzmq; the median of each is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,

    /// Requests to stream through each request-plane path (64 in flight at once).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Outputs (one token each) streamed back per request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub tokens: u32,

    /// Seal both planes' messages with a cluster key, as `--cluster-key-file` does (the raw paths stay clear).
    #[arg(long)]
    pub cluster_key: bool,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EppArgs {
    /// Picks started per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Picks per round and path.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..))]
    pub picks: u32,

    /// Rounds, each path in turn; the medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,

    /// Mocker workers the router picks among.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,

    /// Words of each request's prompt.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(8..=100_000))]
    pub prompt_words: u32,

    /// Print one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Shared prompt prefixes each used several times, in a shuffled order.
    SharedPrefix(SharedPrefixArgs),
    /// Multi-turn chat sessions arriving in bursts; each turn's prompt is the conversation so far.
    Conversations(ConversationsArgs),
}

#[derive(Debug, Args)]
pub struct TraceOutput {
    /// Tokens per block id in the trace (pass the same --block-tokens to the bench that replays it).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub block_tokens: u32,

    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Where to write it [default: standard output].
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SharedPrefixArgs {
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub prefixes: u32,
    /// Requests per prefix.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub uses: u32,
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub prefix_tokens: u32,
    /// Each request's own tokens after the prefix.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub suffix_tokens: u32,
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub output_tokens: u32,
    #[command(flatten)]
    pub output: TraceOutput,
}

#[derive(Debug, Args)]
pub struct ConversationsArgs {
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub sessions: u32,
    /// New sessions per second outside bursts.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f64)]
    pub rate: f64,
    /// The rate during a burst, as a multiple of --rate.
    #[arg(long, default_value_t = 6.0, value_parser = positive_f64)]
    pub burst: f64,
    #[arg(long, default_value_t = 5.0, value_parser = positive_f64)]
    pub mean_turns: f64,
    /// Distinct system prompts sessions start with.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub system_prompts: u32,
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub system_tokens: u32,
    #[arg(long, default_value_t = 200.0, value_parser = positive_f64)]
    pub mean_user_tokens: f64,
    #[arg(long, default_value_t = 300.0, value_parser = positive_f64)]
    pub mean_output_tokens: f64,
    /// Mean seconds between an answer's end and the next turn.
    #[arg(long, default_value_t = 20.0, value_parser = positive_f64)]
    pub mean_think_s: f64,
    /// Longest prompt; a conversation that would pass it ends.
    #[arg(long, default_value_t = 32_768, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_context: u32,
    #[command(flatten)]
    pub output: TraceOutput,
}

#[derive(Debug, Args)]
pub struct RouteArgs {
    #[command(flatten)]
    pub replay: ReplayArgs,

    /// Mocker workers.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,

    /// Router modes compared, each on fresh workers.
    #[arg(long, value_delimiter = ',', default_value = "latency,kv,round-robin,random")]
    pub modes: Vec<super::args::RouterModeArg>,

    /// Instead of the trace's timestamps, a closed loop of this many clients sending the requests in trace
    /// order; several (`1,8,32`) sweep the levels, each a run of every mode.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: Vec<u32>,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DisaggArgs {
    #[command(flatten)]
    pub replay: ReplayArgs,

    /// Simulated GPUs (one mocker worker each) in every set-up.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub gpus: u32,

    /// Of those, prefill workers in the disaggregated set-ups [default: half].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefill_gpus: Option<u32>,

    /// The conditional set-up's --disagg-threshold: prompts whose uncached part is shorter stay on the decode
    /// worker.
    #[arg(long, default_value_t = 2048)]
    pub threshold: u32,

    /// The conditional set-up's --prefill-queue-limit.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_limit: u32,

    /// The conditional set-up's --disagg-itl-budget-ms, in simulated ms (0: no limit).
    #[arg(long, default_value_t = crate::core::router::DISAGG_ITL_BUDGET.as_secs_f64() * 1e3, value_parser = super::args::non_negative_f64)]
    pub itl_budget_ms: f64,

    /// A request is good if its TTFT is at most this (simulated ms) …
    #[arg(long, default_value_t = 2000.0, value_parser = positive_f64)]
    pub ttft_target_ms: f64,

    /// … and its tokens came this fast on average (simulated ms between tokens).
    #[arg(long, default_value_t = 40.0, value_parser = positive_f64)]
    pub itl_target_ms: f64,

    /// Bandwidth a prompt's KV moves at between workers, GB/s (measure yours with `dynamo bench transfer`).
    #[arg(long, default_value_t = mocker::DEFAULT_TRANSFER_BYTES_PER_S / 1e9, value_parser = positive_f64)]
    pub transfer_gbps: f64,

    /// Multiplies every request's output length: the public trace's outputs are short, and how much decoding
    /// a long prefill stalls decides what disaggregation is worth.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f64)]
    pub output_scale: f64,

    /// KV bytes per token of the simulated model (Llama-3-8B in bf16: 128 KiB).
    #[arg(long, default_value_t = mocker::DEFAULT_KV_BYTES_PER_TOKEN, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub kv_bytes_per_token: u64,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PlannerArgs {
    /// Mooncake JSONL (timestamp ms, input_length, output_length) or Azure CSV (TIMESTAMP, ContextTokens,
    /// GeneratedTokens) trace.
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,

    /// Interval lengths, seconds.
    #[arg(long, value_delimiter = ',', default_value = "10,60", value_parser = positive_f64)]
    pub interval: Vec<f64>,

    /// Instead: replay the (Mooncake) trace in simulated time on mocker workers that the planner sizes, and
    /// on static pools of them; SLA attainment and worker-hours of each.
    #[arg(long)]
    pub simulate: bool,

    #[command(flatten)]
    pub simulation: SimulationArgs,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "With --simulate")]
pub struct SimulationArgs {
    /// Replay only the first N requests of the trace [default: all].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), requires = "simulate")]
    pub requests: Option<u32>,

    /// Simulated time (trace arrivals and mocker steps) runs this many times faster than real time.
    #[arg(long, default_value_t = 50.0, value_parser = positive_f64, requires = "simulate")]
    pub speedup: f64,

    /// KV blocks (of 16 tokens) per worker.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..), requires = "simulate")]
    pub num_blocks: u32,

    /// Tokens per trace block id.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..), requires = "simulate")]
    pub block_tokens: u32,

    /// Most workers, for the planner and the static pools alike.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256), requires = "simulate")]
    pub max_workers: u32,

    /// A request met its targets if its TTFT was at most this (simulated ms) …
    #[arg(long, default_value_t = 2000.0, value_parser = positive_f64, requires = "simulate")]
    pub ttft_target_ms: f64,

    /// … and its tokens came this fast on average (simulated ms between tokens).
    #[arg(long, default_value_t = 40.0, value_parser = positive_f64, requires = "simulate")]
    pub itl_target_ms: f64,

    /// The share of requests that must meet both.
    #[arg(long, default_value_t = 0.95, value_parser = positive_f64, requires = "simulate")]
    pub attainment: f64,

    /// The planner's interval, simulated seconds.
    #[arg(long, default_value_t = 30.0, value_parser = positive_f64, requires = "simulate")]
    pub planner_interval: f64,

    /// Simulated seconds a started worker takes to join (loading its weights).
    #[arg(long, default_value_t = 30.0, value_parser = super::args::non_negative_f64, requires = "simulate")]
    pub startup: f64,

    /// The planner's traffic predictor.
    #[arg(long, default_value = "auto", requires = "simulate")]
    pub predictor: String,
}

#[derive(Debug, Args)]
pub struct DisaggNativeArgs {
    /// HF model directory [default: the built-in tiny-chat]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Workers in each set-up (one process).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub workers: u32,

    /// Of those, prefill workers in the disaggregated set-up.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefill_workers: u32,

    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests: u32,

    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,

    /// Tokens of a long prompt.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(2..))]
    pub long_tokens: u32,

    /// Tokens of a short prompt.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..))]
    pub short_tokens: u32,

    /// One request in this many has a long prompt.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub long_every: u32,

    /// Tokens each request generates.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..))]
    pub max_tokens: u32,

    #[command(flatten)]
    pub engine: super::args::EngineArgs,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

/// A trace replayed on mocker workers (`bench route`, `bench disagg`).
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Mooncake-format trace (JSON lines with timestamp, input_length, output_length, hash_ids).
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,

    /// Replay only the first N requests of the trace [default: all].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests: Option<u32>,

    /// Simulated time (trace arrivals and mocker steps) runs this many times faster than real time. Steps are
    /// paced by a timer of about 1 ms real time: at 50, latencies of tens of simulated ms are noise; use 10
    /// or below to compare those.
    #[arg(long, default_value_t = 50.0, value_parser = positive_f64)]
    pub speedup: f64,

    /// KV blocks (of 16 tokens) per worker; the default, 1M tokens, is a 7-8B model on one 80 GB GPU.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..))]
    pub num_blocks: u32,

    /// Tokens per trace block id.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub block_tokens: u32,
}

impl ReplayArgs {
    fn trace(&self) -> anyhow::Result<Vec<trace::TraceRequest>> {
        let mut trace = trace::load(&self.trace)?;
        if let Some(requests) = self.requests {
            trace.truncate(requests as usize);
        }
        Ok(trace)
    }

    fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig { num_blocks: self.num_blocks as usize, ..SchedulerConfig::default() }
    }
}

fn positive_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a number above 0, got `{text}`")),
    }
}

#[derive(Debug, Args)]
pub struct IndexArgs {
    /// Mooncake-format trace (JSON lines with timestamp, input_length, output_length, hash_ids).
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,

    /// Simulated workers the trace is routed over.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,

    /// KV blocks per simulated worker (LRU eviction beyond it).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: u32,

    /// Disjoint copies of the trace to replay, for a longer run and a bigger index.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,

    /// Distinct blocks in the find_matches micro-benchmark (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub micro_blocks: usize,

    /// Workers in the find_matches micro-benchmark.
    #[arg(long, default_value_t = 16)]
    pub micro_workers: usize,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Closed-loop levels: requests kept in flight.
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    pub concurrency: Vec<usize>,

    /// Open-loop levels: requests started per second.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub rate: Vec<f64>,

    /// Requests per level and path.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests: u32,

    /// Tokens generated per request.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    /// Mocker workers behind the frontend [default: 1]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "engine_url")]
    pub workers: Option<u32>,

    /// Mocker speedup; high so the engine's simulated time does not hide the frontend [default: 1e6]
    #[arg(long, conflicts_with = "engine_url")]
    pub speedup: Option<f64>,

    /// A running vLLM server (or one that speaks its API): compare calling it directly with calling it
    /// through `dynamo route` and `dynamo decode --engine vllm`, started by the benchmark.
    #[arg(long, value_name = "URL", requires = "model")]
    pub engine_url: Option<String>,

    /// With --engine-url: which engine it is (vllm, sglang or trtllm) [default: vllm]
    #[arg(long, value_enum, requires = "engine_url")]
    pub engine: Option<super::args::EngineKind>,

    /// With --engine-url: the engine's checkpoint directory (the worker's --model).
    #[arg(long, value_name = "DIR", requires = "engine_url")]
    pub model: Option<PathBuf>,

    /// With --engine-url: the engine's KV-event publisher, passed to the worker.
    #[arg(long, value_name = "ENDPOINT", requires = "engine_url")]
    pub kv_events: Option<String>,

    /// With --engine-url: tokens per KV block of the engine.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub block_size: u32,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Http(args) => bench_http(args),
        BenchCommand::Index(args) => bench_index(args),
        BenchCommand::Route(args) => bench_route(args),
        BenchCommand::Trace(command) => bench_trace(command),
        BenchCommand::Disagg(args) => bench_disagg(args),
        BenchCommand::DisaggNative(args) => bench_disagg_native(args),
        BenchCommand::Planner(args) => bench_planner(args),
        BenchCommand::Plane(args) => bench_plane(args),
        BenchCommand::Epp(args) => bench_epp(args),
        BenchCommand::Engine(args) => bench_engine(args),
        BenchCommand::Encode(args) => bench_encode(args),
        BenchCommand::Soak(args) => bench_soak(args),
        BenchCommand::Transfer(args) => bench_transfer(args),
        BenchCommand::TransferTarget(args) => {
            // The key of a --sealed bench comes from its parent's environment, never from a command line.
            let key = match std::env::var("DYNAMO_CLUSTER_KEY") {
                Ok(text) => Some(crate::core::trust::ClusterKey::parse(&text, "DYNAMO_CLUSTER_KEY")?),
                Err(_) => None,
            };
            let target = transfer::serve_target(args.layout, args.blocks.clamp(1, 4096), args.nixl, key);
            super::runtime()?.block_on(target)
        }
    }
}

fn bench_transfer(args: TransferArgs) -> anyhow::Result<()> {
    let mut unavailable = Vec::new();
    let backends: Vec<Backend> = args
        .backend
        .iter()
        .filter_map(|b| match b {
            TransferBackendArg::Shm => Some(Backend::Shm),
            TransferBackendArg::Tcp => Some(Backend::Tcp),
            TransferBackendArg::Nixl => match crate::core::transfer::nixl_available() {
                Ok(()) => Some(Backend::Nixl),
                Err(why) => {
                    unavailable.push(("nixl", why));
                    None
                }
            },
        })
        .collect();
    let settings = TransferBenchSettings {
        binary: std::env::current_exe()?,
        blocks: args.blocks,
        layout: args.layout,
        backends,
        rounds: args.rounds as usize,
        latency_requests: args.latency_requests as usize,
        streams: args.streams as usize,
        key: args.sealed.then(crate::core::trust::ClusterKey::generate).transpose()?,
    };
    println!(
        "dynamo bench transfer: {} KV blocks per request ({:?} layout, scattered pages) written to another process, \
         medians of {} rounds{}",
        args.blocks,
        args.layout,
        args.rounds,
        if args.sealed { ", sealed with a cluster key" } else { "" }
    );
    let results = super::runtime()?.block_on(transfer::run(&settings))?;
    print!("{}", transfer::table(&results, &unavailable));
    if args.json {
        let mut summary = transfer::json(&results);
        summary["sealed"] = args.sealed.into();
        println!("{summary}");
    }
    Ok(())
}

fn bench_soak(args: SoakArgs) -> anyhow::Result<()> {
    let settings = SoakSettings {
        binary: std::env::current_exe()?,
        duration: super::args::seconds(args.minutes * 60.0),
        workers: args.workers as usize,
        rate: args.rate,
        kill_every: super::args::seconds(args.kill_every),
        speedup: args.speedup,
        seed: args.seed,
    };
    println!(
        "dynamo bench soak: {} min of mixed requests at {}/s on dynamo route with {} mocker workers, one killed every {} s",
        args.minutes, args.rate, args.workers, args.kill_every
    );
    let result = super::runtime()?.block_on(soak::run(settings))?;
    print!("{}", soak::table(&result));
    if args.json {
        println!("{}", serde_json::json!({"bench": "soak", "result": result}));
    }
    Ok(())
}

fn bench_engine(args: EngineArgs) -> anyhow::Result<()> {
    let settings = EngineBenchSettings {
        model: args.model,
        threads: args
            .threads
            .map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize),
        device: args.device,
        prompt_lengths: args.prompt_tokens.into_iter().filter(|&n| n > 0).collect(),
        batch_sizes: args.batch.into_iter().filter(|&n| n > 0).collect(),
        temperatures: args.temperature,
        decode_steps: args.decode_steps as usize,
        repeats: args.repeats as usize,
        structured: args.structured,
        quantization: Default::default(),
    };
    println!("dynamo bench engine: the native engine, medians, against ceilings measured in this run (CPU only)");
    let mut results = Vec::new();
    for &quantization in &args.quantization {
        let result = engine::run(&EngineBenchSettings { quantization, ..settings.clone() })?;
        print!("{}", engine::table(&result));
        results.push(result);
    }
    print!("{}", engine::comparison(&results));
    if args.json {
        println!("{}", engine::json(&results));
    }
    Ok(())
}

fn bench_encode(args: EncodeArgs) -> anyhow::Result<()> {
    let settings = encode::EncodeBenchSettings {
        model: args.model,
        threads: args
            .threads
            .map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize),
        batch: args.batch as usize,
        rounds: args.rounds as usize,
        text_streams: args.text_streams as usize,
        images: args.images as usize,
    };
    println!(
        "dynamo bench encode: images through the vision tower (CPU), medians, against the product peak measured now"
    );
    let mut result = encode::run(&settings)?;
    if settings.text_streams > 0 {
        result.interference = Some(super::runtime()?.block_on(encode::interference(&settings))?);
    }
    print!("{}", encode::report(&result));
    if args.json {
        println!("{}", serde_json::json!({"bench": "encode", "result": result}));
    }
    Ok(())
}

fn bench_http(args: HttpArgs) -> anyhow::Result<()> {
    let mut loads: Vec<Load> = args.concurrency.iter().map(|&c| Load::Concurrency(c.max(1))).collect();
    loads.extend(args.rate.iter().filter(|r| **r > 0.0).map(|&r| Load::Rate(r)));
    if let (Some(url), Some(model_dir)) = (args.engine_url, args.model) {
        use super::args::EngineKind;
        let kind = match args.engine.unwrap_or(EngineKind::Vllm) {
            EngineKind::Vllm => ExternalKind::Vllm,
            EngineKind::Sglang => ExternalKind::Sglang,
            EngineKind::Trtllm => ExternalKind::Trtllm,
            EngineKind::Native | EngineKind::Mocker => {
                anyhow::bail!("--engine with --engine-url names the engine at that URL: vllm, sglang or trtllm")
            }
        };
        let settings = http::ExternalBenchSettings {
            binary: std::env::current_exe()?,
            engine: ExternalSettings {
                kind,
                url,
                kv_events: args.kv_events,
                kv_events_replay: None,
                metrics_url: None,
                block_size: args.block_size as usize,
                kv_connector: false,
                bootstrap_port: crate::core::engine::external::SGLANG_BOOTSTRAP_PORT,
                data_parallel_rank: None,
                profile: None,
            },
            model_dir,
            loads,
            requests: args.requests as usize,
            max_tokens: args.max_tokens,
        };
        println!(
            "dynamo bench http: streaming chat completions, {} tokens each, {} requests per level and path: \
             direct = the engine at {}, http = through dynamo route and dynamo decode --engine {}",
            args.max_tokens,
            args.requests,
            settings.engine.url,
            kind.name()
        );
        let results = super::runtime()?.block_on(http::run_external(settings))?;
        print!("{}", http::table(&results));
        if args.json {
            println!("{}", serde_json::json!({"bench": "http", "engine": "external", "levels": results}));
        }
        return Ok(());
    }
    let (workers, speedup) = (args.workers.unwrap_or(1), args.speedup.unwrap_or(1e6));
    anyhow::ensure!(speedup > 0.0, "--speedup must be greater than 0");
    let settings = HttpBenchSettings {
        stack: RunSettings {
            model: ModelSource::Builtin,
            model_options: Default::default(),
            workers: workers as usize,
            prefill_workers: 0,
            encode_workers: 0,
            engine: EngineSettings::Mocker(MockerConfig {
                scheduler: SchedulerConfig { max_num_seqs: 4096, ..SchedulerConfig::default() },
                speedup,
                ..MockerConfig::default()
            }),
            router: RouterConfig { busy_threshold: usize::MAX / 2, ..RouterConfig::default() },
            listen: ([127, 0, 0, 1], 0).into(),
            http: crate::core::frontend::HttpSettings::default(),
        },
        loads,
        requests: args.requests as usize,
        max_tokens: args.max_tokens,
    };
    println!(
        "dynamo bench http: streaming chat completions, {} tokens each, {} requests per level and path, {} mocker worker(s) at speedup {}",
        args.max_tokens, args.requests, workers, speedup
    );
    let results = super::runtime()?.block_on(http::run(settings))?;
    print!("{}", http::table(&results));
    if args.json {
        println!("{}", serde_json::json!({"bench": "http", "levels": results}));
    }
    Ok(())
}

fn bench_epp(args: EppArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be a positive number of picks per second");
    let settings = epp::EppBenchSettings {
        stack: RunSettings {
            model: ModelSource::Builtin,
            model_options: Default::default(),
            workers: args.workers as usize,
            prefill_workers: 0,
            encode_workers: 0,
            engine: EngineSettings::Mocker(MockerConfig::default()),
            router: RouterConfig { busy_threshold: usize::MAX / 2, ..RouterConfig::default() },
            listen: ([127, 0, 0, 1], 0).into(),
            http: crate::core::frontend::HttpSettings::default(),
        },
        rate: args.rate,
        picks: args.picks as usize,
        rounds: args.rounds as usize,
        prompt_words: args.prompt_words as usize,
    };
    println!(
        "dynamo bench epp: {} picks per round and path at {} picks/s, {} rounds, {} mocker workers, prompts of {} \
         words: direct = the router's pick, grpc = through the ext_proc stream (h2c)",
        args.picks, args.rate, args.rounds, args.workers, args.prompt_words
    );
    let result = super::runtime()?.block_on(epp::run(settings))?;
    print!("{}", epp::table(&result));
    if args.json {
        println!("{}", serde_json::json!({"bench": "epp", "result": result}));
    }
    Ok(())
}

fn bench_index(args: IndexArgs) -> anyhow::Result<()> {
    let trace = trace::load(&args.trace)?;
    let settings = IndexBenchSettings {
        workers: args.workers as usize,
        capacity: args.capacity as usize,
        repeat: args.repeat as usize,
        micro_blocks: args.micro_blocks,
        micro_workers: args.micro_workers,
    };
    println!(
        "dynamo bench index: {} requests x {} copies over {} workers of {} blocks; micro: {} blocks x {} workers",
        trace.len(),
        args.repeat,
        args.workers,
        args.capacity,
        args.micro_blocks,
        args.micro_workers
    );
    let result = index::run(&trace, &settings);
    print!("{}", index::table(&result));
    if args.json {
        let json = serde_json::json!({
            "bench": "index",
            "block_ops_per_s": result.flash.block_ops_per_s,
            "lookup_p50_us": result.flash.lookup_p50_us,
            "lookup_p99_us": result.flash.lookup_p99_us,
            "baseline_block_ops_per_s": result.reference.block_ops_per_s,
            "baseline_lookup_p50_us": result.reference.lookup_p50_us,
            "baseline_lookup_p99_us": result.reference.lookup_p99_us,
            "ratio": result.ratio,
            "concurrent_block_ops_per_s": result.concurrent_flash.block_ops_per_s,
            "concurrent_lookup_p99_us": result.concurrent_flash.lookup_p99_us,
            "baseline_concurrent_block_ops_per_s": result.concurrent_reference.block_ops_per_s,
            "baseline_concurrent_lookup_p99_us": result.concurrent_reference.lookup_p99_us,
            "bytes_per_entry": result.bytes_per_entry,
            "entries": result.entries,
            "block_ops": result.block_ops,
            "requests": result.requests,
            "micro": result.micro,
        });
        println!("{json}");
    }
    Ok(())
}

fn bench_disagg(args: DisaggArgs) -> anyhow::Result<()> {
    use crate::core::bench::disagg::{self, DisaggBenchSettings};
    let mut trace = args.replay.trace()?;
    for request in &mut trace {
        request.output_length = ((request.output_length as f64 * args.output_scale).round() as u64).max(1);
    }
    let gpus = args.gpus as usize;
    let prefill_gpus = args.prefill_gpus.map_or(gpus / 2, |p| p as usize);
    anyhow::ensure!(prefill_gpus < gpus, "--prefill-gpus must leave at least one of the --gpus {gpus} to decode");
    let settings = DisaggBenchSettings {
        gpus,
        prefill_gpus,
        threshold: args.threshold as usize,
        queue_limit: args.queue_limit as usize,
        itl_budget: (args.itl_budget_ms > 0.0).then(|| super::args::seconds(args.itl_budget_ms / 1e3)),
        mocker: MockerConfig {
            scheduler: args.replay.scheduler(),
            speedup: args.replay.speedup,
            kv_bytes_per_token: args.kv_bytes_per_token,
            transfer_bytes_per_s: args.transfer_gbps * 1e9,
        },
        block_tokens: args.replay.block_tokens as usize,
        ttft_target_ms: args.ttft_target_ms,
        itl_target_ms: args.itl_target_ms,
    };
    println!(
        "dynamo bench disagg: {} trace requests (outputs ×{}) on {gpus} simulated GPUs ({prefill_gpus} prefill \
         when split), KV at {} GB/s ({} B/token), targets TTFT {} ms and ITL {} ms, speedup {}",
        trace.len(),
        args.output_scale,
        args.transfer_gbps,
        args.kv_bytes_per_token,
        args.ttft_target_ms,
        args.itl_target_ms,
        args.replay.speedup
    );
    let results = super::runtime()?.block_on(disagg::run(&trace, &settings))?;
    print!("{}", disagg::table(&results));
    if let [aggregated, disaggregated, conditional] = results.as_slice() {
        for (name, setup) in [("disaggregated", disaggregated), ("conditional", conditional)] {
            println!(
                "{name} / aggregated: ITL p90 {:.2}x, TTFT p50 {:.2}x, goodput {:.2}x (below 1 is lower)",
                setup.itl_p90_ms / aggregated.itl_p90_ms,
                setup.ttft_p50_ms / aggregated.ttft_p50_ms,
                setup.goodput_rps / aggregated.goodput_rps
            );
        }
    }
    if args.json {
        println!("{}", serde_json::json!({ "setups": results }));
    }
    Ok(())
}

fn bench_planner(args: PlannerArgs) -> anyhow::Result<()> {
    use crate::core::bench::planner;
    if args.simulate {
        return bench_scaling(&args.trace, &args.simulation, args.json);
    }
    let arrivals = planner::load_arrivals(&args.trace)?;
    println!(
        "dynamo bench planner: {} requests from {}, one-step-ahead WAPE per interval (lower is better, * the best); \
         the planner's default: {}",
        arrivals.len(),
        args.trace.display(),
        planner::DEFAULT_PREDICTOR
    );
    let results = planner::run(&arrivals, &args.interval);
    print!("{}", planner::table(&results));
    if args.json {
        println!("{}", serde_json::json!({ "default": planner::DEFAULT_PREDICTOR, "results": results }));
    }
    Ok(())
}

fn bench_scaling(path: &std::path::Path, args: &SimulationArgs, json: bool) -> anyhow::Result<()> {
    use crate::core::bench::scaling::{self, ScalingSettings};
    use crate::core::planner::sla::Targets;
    crate::core::planner::forecast::by_name(&args.predictor).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(args.attainment <= 1.0, "--attainment is a share: at most 1");
    let mut trace = trace::load(path)?;
    if let Some(requests) = args.requests {
        trace.truncate(requests as usize);
    }
    let settings = ScalingSettings {
        speedup: args.speedup,
        scheduler: SchedulerConfig { num_blocks: args.num_blocks as usize, ..SchedulerConfig::default() },
        block_tokens: args.block_tokens as usize,
        targets: Targets {
            ttft_ms: args.ttft_target_ms,
            itl_ms: args.itl_target_ms,
            attainment: Some(args.attainment),
        },
        attainment: args.attainment,
        max_workers: args.max_workers as usize,
        interval_s: args.planner_interval,
        startup_s: args.startup,
        predictor: args.predictor.clone(),
    };
    println!(
        "dynamo bench planner --simulate: {} trace requests; targets TTFT {} ms and ITL {} ms for {:.0}% of requests; \
         the planner (predictor {}, every {} s, workers start in {} s) against the fewest static workers that meet \
         them, at most {}; speedup {}",
        trace.len(),
        args.ttft_target_ms,
        args.itl_target_ms,
        args.attainment * 100.0,
        args.predictor,
        args.planner_interval,
        args.startup,
        args.max_workers,
        args.speedup
    );
    let results = super::runtime()?.block_on(scaling::run(&trace, &settings)).map_err(anyhow::Error::msg)?;
    print!("{}", scaling::table(&results, &settings));
    if json {
        let planner = results.iter().find(|r| r.setup == "planner");
        let best = scaling::best_static(&results, args.attainment);
        let ratio = planner.zip(best).map(|(p, b)| p.worker_hours / b.worker_hours.max(1e-12));
        println!(
            "{}",
            serde_json::json!({ "setups": results, "best_static": best.map(|b| &b.setup), "worker_hours_ratio": ratio })
        );
    }
    Ok(())
}

fn bench_disagg_native(args: DisaggNativeArgs) -> anyhow::Result<()> {
    use crate::core::bench::disagg::{self, NativeDisaggSettings};
    anyhow::ensure!(
        args.prefill_workers < args.workers,
        "--prefill-workers must leave at least one of the --workers {} to decode",
        args.workers
    );
    let settings = NativeDisaggSettings {
        model: args.model.map(ModelSource::Dir).unwrap_or(ModelSource::Builtin),
        engine: args.engine.settings()?,
        workers: args.workers as usize,
        prefill_workers: args.prefill_workers as usize,
        requests: args.requests as usize,
        concurrency: args.concurrency as usize,
        long_tokens: args.long_tokens as usize,
        short_tokens: args.short_tokens as usize,
        long_every: args.long_every as usize,
        max_tokens: args.max_tokens,
    };
    println!(
        "dynamo bench disagg-native: {} requests at concurrency {}, one in {} of {} prompt tokens, the rest {}, {} \
         tokens out; {} workers with {}",
        args.requests,
        args.concurrency,
        args.long_every,
        args.long_tokens,
        args.short_tokens,
        args.max_tokens,
        args.workers,
        settings.engine.describe()
    );
    let results = super::runtime()?.block_on(disagg::run_native(&settings))?;
    print!("{}", disagg::native_table(&results));
    if let [aggregated, disaggregated] = results.as_slice() {
        println!(
            "disaggregated / aggregated: ITL p90 {:.2}x, short-prompt TTFT p90 {:.2}x, TTFT p50 {:.2}x, output \
             {:.2}x (below 1 is lower)",
            disaggregated.itl_p90_ms / aggregated.itl_p90_ms,
            disaggregated.short_ttft_p90_ms / aggregated.short_ttft_p90_ms,
            disaggregated.ttft_p50_ms / aggregated.ttft_p50_ms,
            disaggregated.output_tokens_per_s / aggregated.output_tokens_per_s
        );
    }
    if args.json {
        println!("{}", serde_json::json!({ "setups": results }));
    }
    Ok(())
}

fn bench_trace(command: TraceCommand) -> anyhow::Result<()> {
    use crate::core::bench::synth;
    let (requests, output) = match command {
        TraceCommand::SharedPrefix(args) => {
            let spec = synth::SharedPrefix {
                prefixes: args.prefixes as usize,
                uses: args.uses as usize,
                prefix_tokens: args.prefix_tokens as usize,
                suffix_tokens: args.suffix_tokens as usize,
                output_tokens: args.output_tokens as usize,
                block_tokens: args.output.block_tokens as usize,
                seed: args.output.seed,
            };
            (synth::shared_prefix(&spec), args.output)
        }
        TraceCommand::Conversations(args) => {
            let spec = synth::Conversations {
                sessions: args.sessions as usize,
                rate: args.rate,
                burst: args.burst,
                mean_turns: args.mean_turns,
                system_prompts: args.system_prompts as usize,
                system_tokens: args.system_tokens as usize,
                mean_user_tokens: args.mean_user_tokens,
                mean_output_tokens: args.mean_output_tokens,
                mean_think_s: args.mean_think_s,
                answer_tokens_per_s: 50.0,
                max_context: args.max_context as usize,
                block_tokens: args.output.block_tokens as usize,
                seed: args.output.seed,
            };
            (synth::conversations(&spec), args.output)
        }
    };
    let text = synth::to_jsonl(&requests);
    match &output.out {
        Some(path) => {
            std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            eprintln!("wrote {} requests to {}", requests.len(), path.display());
        }
        None => {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`| head`) ends the output, not the process with a panic.
            if let Err(error) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush())
                && error.kind() != std::io::ErrorKind::BrokenPipe
            {
                return Err(error.into());
            }
        }
    }
    Ok(())
}

fn bench_route(args: RouteArgs) -> anyhow::Result<()> {
    let trace = args.replay.trace()?;
    let modes: Vec<RouterMode> = args.modes.iter().map(|&mode| mode.into()).collect();
    let paces: Vec<Pace> = match args.concurrency.as_slice() {
        [] => vec![Pace::Timestamps],
        levels => levels.iter().map(|&c| Pace::Concurrency(c as usize)).collect(),
    };
    let block_tokens = args.replay.block_tokens as usize;
    let scheduler = args.replay.scheduler();
    let ideal = route::ideal_cached_fraction(&trace, block_tokens, scheduler.block_size);
    println!(
        "dynamo bench route: {} trace requests over {} mocker workers ({} blocks each), speedup {}; ideal cached \
         fraction {:.1}% (one unbounded cache)",
        trace.len(),
        args.workers,
        args.replay.num_blocks,
        args.replay.speedup,
        ideal * 100.0
    );
    let runtime = super::runtime()?;
    let mut levels = Vec::new();
    for pace in paces {
        let settings = RouteBenchSettings {
            workers: args.workers as usize,
            speedup: args.replay.speedup,
            scheduler: scheduler.clone(),
            modes: modes.clone(),
            block_tokens,
            pace,
        };
        if let Pace::Concurrency(clients) = pace {
            println!("\nconcurrency {clients} (closed loop, trace order):");
        }
        let results = runtime.block_on(route::run(&trace, &settings));
        print!("{}", route::table(&results));
        if let Some(first) = modes.first() {
            print!("{}", route::comparison(&results, *first));
        }
        let by_mode: serde_json::Map<String, serde_json::Value> =
            results.iter().map(|r| (r.mode.name().to_string(), serde_json::to_value(r).unwrap_or_default())).collect();
        let concurrency = match pace {
            Pace::Concurrency(clients) => serde_json::json!(clients),
            Pace::Timestamps => serde_json::Value::Null,
        };
        levels.push(serde_json::json!({"concurrency": concurrency, "modes": by_mode}));
    }
    if args.json {
        let json = match levels.as_slice() {
            [one] => {
                let mut one = one.clone();
                if let Some(object) = one.as_object_mut() {
                    object.insert("bench".into(), "route".into());
                    object.insert("ideal_cached_fraction".into(), ideal.into());
                }
                one
            }
            _ => serde_json::json!({"bench": "route", "ideal_cached_fraction": ideal, "levels": levels}),
        };
        println!("{json}");
    }
    Ok(())
}

fn bench_plane(args: PlaneArgs) -> anyhow::Result<()> {
    println!(
        "dynamo bench plane: {} messages of {} Stored events (+1 Removed once {} blocks are cached) over loopback \
         TCP, plane vs raw libzmq",
        args.messages,
        args.events_per_message,
        plane::CACHED_BLOCKS
    );
    let key = args.cluster_key.then(crate::core::trust::ClusterKey::generate).transpose()?;
    if key.is_some() {
        println!("both planes seal every message with a cluster key; the raw paths stay in the clear");
    }
    let runtime = super::runtime()?;
    let rounds = args.rounds as usize;
    let result = runtime.block_on(plane::run(args.messages, args.events_per_message as usize, rounds, key.as_ref()))?;
    print!("{}", plane::table(&result));
    println!(
        "request plane: {} requests of {} prompt-sized tokens, {} outputs each streamed back, 64 in flight",
        args.requests, 256, args.tokens
    );
    let requests = runtime.block_on(plane::run_requests(args.requests, args.tokens, rounds, key.as_ref()))?;
    print!("{}", plane::request_table(&requests));
    if args.json {
        println!("{}", serde_json::json!({"bench": "plane", "result": result, "requests": requests}));
    }
    Ok(())
}
