//! `dynamo profile`: a worker's performance profile, for the planner's profile-based sizing
//! (`dynamo route --planner … --planner-profile PATH`).
use super::args::EngineArgs;
use crate::core::engine::profile::{self, Grid};
use crate::core::model::ModelSource;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// HF model directory [default: the built-in tiny-chat]
    #[arg(long, env = "DYNAMO_MODEL", value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Where the profile goes (JSON).
    #[arg(long, short, value_name = "PATH")]
    pub out: PathBuf,

    /// Longest prompt prefilled (64, 128, … up to this; never past the model's context length).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..))]
    pub max_prompt: u32,

    /// Longest context decoded (64, 128, … up to this).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(64..))]
    pub max_context: u32,

    /// Largest batch decoded (1, 2, 4, … up to this, as far as the KV cache holds them).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: u32,

    /// Tokens each decoding sequence generates.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=4096))]
    pub decode_tokens: u32,

    /// Times each prefill is measured (the median counts).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeats: u32,

    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    let source = args.model.map(ModelSource::Dir).unwrap_or(ModelSource::Builtin);
    let settings = args.engine.settings()?;
    let grid = Grid {
        max_prompt: args.max_prompt,
        max_context: args.max_context,
        max_batch: args.max_batch.min(args.engine.max_num_seqs()),
        decode_tokens: args.decode_tokens,
        repeats: args.repeats,
    };
    let profile = super::runtime()?.block_on(profile::of_worker(&source, &settings, &grid))?;
    let text = serde_json::to_string_pretty(&profile)?;
    std::fs::write(&args.out, text + "\n")
        .map_err(|error| anyhow::anyhow!("cannot write the profile to {}: {error}", args.out.display()))?;
    println!(
        "dynamo profile: {} ({} prefill and {} decode points, {} KV tokens) written to {}",
        profile.source,
        profile.prefill.len(),
        profile.decode.len(),
        profile.kv_tokens,
        args.out.display()
    );
    Ok(())
}
