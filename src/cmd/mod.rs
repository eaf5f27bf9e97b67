//! The command line: clap types end here. Each subcommand turns its flags into a core settings struct.
mod args;
mod bench;
mod completions;
mod keygen;
mod profile;
mod route;
mod run;
mod selftest;
mod top;
mod worker;

use crate::core::protocol::discovery::Role;
use crate::core::telemetry::LogTail;
use clap::{Parser, Subcommand};

/// Serve large language models across many machines from one binary: OpenAI frontend, router, workers.
#[derive(Debug, Parser)]
#[command(name = "dynamo", version, propagate_version = true, max_term_width = 100)]
#[command(after_help = "Start here: `dynamo run`, then `curl http://127.0.0.1:8000/v1/models`.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything in one process: OpenAI HTTP frontend, router and workers.
    Run(run::RunArgs),
    /// Start a worker (prefill and decode in one) that registers itself and serves requests from routers.
    Decode(worker::WorkerArgs),
    /// Start a worker that only prefills prompts and hands their KV to decode workers (disaggregated serving).
    Prefill(worker::WorkerArgs),
    /// Start a worker that runs only a vision model's image encoder and hands images' embeddings to the
    /// workers that prefill their prompts (those need --kv-transfer, or to be prefill workers).
    Encode(worker::EncodeArgs),
    /// Start the OpenAI HTTP frontend and router in front of the workers discovery finds.
    Route(route::RouteArgs),
    /// Watch every worker of a namespace live: state, load, KV cache, requests.
    Top(top::TopArgs),
    /// Write a worker's performance profile (prefill time by prompt length, time between tokens by batch and
    /// context) for the planner's profile-based sizing: the mocker's from its timing fit, others measured.
    Profile(profile::ProfileArgs),
    /// Measure performance; each benchmark compares against a reference in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Check the CUDA backend against the CPU backend (or, with --compile-only, just compile its kernels).
    Selftest(selftest::SelftestArgs),
    /// Make a cluster key: with it, roles seal every plane message and ignore processes without it.
    Keygen(keygen::KeygenArgs),
    /// Print shell completions (bash, zsh, fish, …) to stdout.
    Completions(completions::CompletionsArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The live table owns the terminal: its log lines go into the table's footer.
    let log_tail = matches!(&cli.command, Command::Top(args) if !args.once).then(LogTail::default);
    crate::core::telemetry::init_logging(cli.verbose, log_tail.clone());
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Decode(args) => worker::run(args, Role::Decode),
        Command::Prefill(args) => worker::run(args, Role::Prefill),
        Command::Encode(args) => worker::run_encoder(args),
        Command::Route(args) => route::run(args),
        Command::Top(args) => top::run(args, log_tail.unwrap_or_default()),
        Command::Profile(args) => profile::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Selftest(args) => selftest::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Completions(args) => completions::run(args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::engine::EngineSettings;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from([&["dynamo"][..], args].concat()).map(|cli| cli.command).unwrap()
    }

    #[test]
    fn list_flags_default_to_what_their_help_shows_and_vllm_spellings_work() {
        // Shown as `[default: 1,64,512]`, the form the flag takes.
        let Command::Bench(bench::BenchCommand::Http(http)) = parse(&["bench", "http"]) else { panic!() };
        assert_eq!(http.concurrency, vec![1, 64, 512]);
        let Command::Bench(bench::BenchCommand::Planner(planner)) = parse(&["bench", "planner", "--trace", "t"]) else {
            panic!()
        };
        assert_eq!(planner.interval, vec![10.0, 60.0]);
        let Command::Run(run) = parse(&["run", "/models/qwen", "--port", "9000", "--host", "0.0.0.0"]) else {
            panic!()
        };
        assert_eq!(run.model.model_dir, Some("/models/qwen".into()));
        assert_eq!(run.http.listen(), "0.0.0.0:9000".parse().unwrap());
        let Command::Prefill(worker) = parse(&["prefill", "/models/qwen"]) else { panic!() };
        assert_eq!(worker.model.model_dir, Some("/models/qwen".into()));
        assert!(Cli::try_parse_from(["dynamo", "run", "/a", "--model", "/b"]).is_err(), "one model, not two");
    }
    #[test]
    fn an_engine_flag_given_to_an_engine_that_does_not_read_it_is_refused_not_ignored() {
        let settings = |args: &[&str]| {
            let Command::Decode(worker) = parse(&[&["decode"][..], args].concat()) else { panic!() };
            worker.engine.settings().map_err(|error| error.to_string())
        };
        let vllm = ["--engine", "vllm", "--engine-url", "http://127.0.0.1:1"];
        for (args, flag, engine) in [
            (&["--engine", "mocker", "--device", "cpu"][..], "--device (DYNAMO_DEVICE)", "mocker"),
            (&["--engine", "mocker", "--threads", "2"], "--threads", "mocker"),
            (&["--engine", "mocker", "--kv-cache-gib", "2"], "--kv-cache-gib", "mocker"),
            (&["--engine", "mocker", "--quantization", "int8"], "--quantization", "mocker"),
            (&["--engine", "mocker", "--profile", "p.json"], "--profile", "mocker"),
            (&["--speedup", "10"], "--speedup", "native"),
            (&["--transfer-gbps", "10"], "--transfer-gbps", "native"),
            (&["--engine-url", "http://127.0.0.1:1"], "--engine-url", "native"),
            (&["--engine", "mocker", "--kv-events", "tcp://127.0.0.1:1"], "--kv-events", "mocker"),
            (&[&vllm[..], &["--max-num-seqs", "8"]].concat(), "--max-num-seqs", "vllm"),
            (&[&vllm[..], &["--num-blocks", "8"]].concat(), "--num-blocks", "vllm"),
            (&[&vllm[..], &["--no-prefix-caching"]].concat(), "--no-prefix-caching", "vllm"),
            (&[&vllm[..], &["--device", "cpu"]].concat(), "--device", "vllm"),
            (&[&vllm[..], &["--speedup", "2"]].concat(), "--speedup", "vllm"),
        ] {
            let error = settings(args).expect_err(flag);
            assert!(error.starts_with(flag), "{args:?}: {error}");
            assert!(error.contains(&format!("this worker runs --engine {engine}: ")), "{args:?}: {error}");
            assert!(error.ends_with("drop the flag"), "{error}");
        }
        // What each engine reads, it takes; defaults where nothing was given.
        let Ok(EngineSettings::Mocker(mocker)) =
            settings(&["--engine", "mocker", "--speedup", "5", "--max-num-seqs", "8", "--num-blocks", "64"])
        else {
            panic!()
        };
        assert_eq!((mocker.speedup, mocker.scheduler.max_num_seqs, mocker.scheduler.num_blocks), (5.0, 8, 64));
        assert_eq!(mocker.scheduler.max_num_batched_tokens, 8192);
        let Ok(EngineSettings::Native(native)) =
            settings(&["--threads", "3", "--kv-cache-gib", "0.5", "--device", "cpu"])
        else {
            panic!()
        };
        assert_eq!((native.threads, native.kv_cache_gib, native.scheduler.max_num_seqs), (3, 0.5, 256));
        let Ok(EngineSettings::External(external)) = settings(&[&vllm[..], &["--block-size", "32"]].concat()) else {
            panic!()
        };
        assert_eq!(external.block_size, 32);
    }
}
