//! `dynamo bench …`: benchmarks that print a table, or with `--json` one JSON object on the last line.
use crate::core::bench::Load;
use crate::core::bench::http::{self, HttpBenchSettings};
use crate::core::engine::mocker::{MockerConfig, SchedulerConfig};
use crate::core::local::LocalSettings;
use crate::core::model::ModelSource;
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Requests/s and added latency of the HTTP frontend, against the same workers called directly.
    Http(HttpArgs),
}

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Closed-loop levels: requests kept in flight.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 64, 512])]
    pub concurrency: Vec<usize>,

    /// Open-loop levels: requests started per second.
    #[arg(long, value_delimiter = ',', default_values_t = [1000.0f64])]
    pub rate: Vec<f64>,

    /// Requests per level and path.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests: u32,

    /// Tokens generated per request.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    /// Mocker workers behind the frontend.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,

    /// Mocker speedup; high so the engine's simulated time does not hide the frontend.
    #[arg(long, default_value_t = 1e6)]
    pub speedup: f64,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Http(args) => bench_http(args),
    }
}

fn bench_http(args: HttpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.speedup > 0.0, "--speedup must be greater than 0");
    let mut loads: Vec<Load> = args.concurrency.iter().map(|&c| Load::Concurrency(c.max(1))).collect();
    loads.extend(args.rate.iter().filter(|r| **r > 0.0).map(|&r| Load::Rate(r)));
    let settings = HttpBenchSettings {
        stack: LocalSettings {
            model: ModelSource::Builtin,
            served_model_name: None,
            workers: args.workers as usize,
            mocker: MockerConfig {
                scheduler: SchedulerConfig { max_num_seqs: 4096, ..SchedulerConfig::default() },
                speedup: args.speedup,
            },
            busy_threshold: usize::MAX / 2,
            listen: ([127, 0, 0, 1], 0).into(),
        },
        loads,
        requests: args.requests as usize,
        max_tokens: args.max_tokens,
    };
    println!(
        "dynamo bench http: streaming chat completions, {} tokens each, {} requests per level and path, {} mocker worker(s) at speedup {}",
        args.max_tokens, args.requests, args.workers, args.speedup
    );
    let results = super::runtime()?.block_on(http::run(settings))?;
    print!("{}", http::table(&results));
    if args.json {
        println!("{}", serde_json::json!({"bench": "http", "levels": results}));
    }
    Ok(())
}
