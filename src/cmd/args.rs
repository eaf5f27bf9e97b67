//! Flag groups more than one subcommand takes.
use crate::core::engine::mocker::{MockerConfig, SchedulerConfig};
use clap::Args;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Mocker engine")]
pub struct MockerArgs {
    /// Simulated time runs this many times faster than the fitted real timing.
    #[arg(long, env = "DYNAMO_MOCKER_SPEEDUP", default_value_t = 1.0, value_parser = positive_f64)]
    pub speedup: f64,

    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub block_size: u32,

    /// KV blocks per worker.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub num_blocks: u32,

    /// Most requests in a worker's running batch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,

    /// Token budget of one engine step (prefill chunks plus decodes).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_batched_tokens: u32,

    /// Turn off prefix caching (no block reuse between requests).
    #[arg(long)]
    pub no_prefix_caching: bool,
}

impl MockerArgs {
    pub fn config(&self) -> MockerConfig {
        MockerConfig {
            scheduler: SchedulerConfig {
                block_size: self.block_size as usize,
                num_blocks: self.num_blocks as usize,
                max_num_seqs: self.max_num_seqs as usize,
                max_num_batched_tokens: self.max_num_batched_tokens as usize,
                enable_prefix_caching: !self.no_prefix_caching,
                ..SchedulerConfig::default()
            },
            speedup: self.speedup,
        }
    }
}

fn positive_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a number greater than 0, got `{text}`")),
    }
}
