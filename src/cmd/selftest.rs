//! `dynamo selftest`: the CUDA backend against the CPU backend, op by op and a whole forward pass.
use crate::core::engine::native::Device;
use crate::core::engine::native::selftest::{self, SelftestOptions};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Device to check: cuda or cuda:N.
    #[arg(long, default_value = "cuda:0", value_parser = parse_cuda_device)]
    pub device: usize,

    /// Only compile the CUDA kernels with NVRTC (needs libnvrtc, no GPU).
    #[arg(long)]
    pub compile_only: bool,

    /// Also compare the forward pass of this checkpoint (repeatable); the built-in model is always compared.
    #[arg(long, value_name = "DIR")]
    pub model: Vec<PathBuf>,

    /// CPU threads for the reference side.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: u32,

    /// Print one JSON object on the last line as well.
    #[arg(long)]
    pub json: bool,
}

/// The device flag of `run`, narrowed to CUDA: the CPU is the reference, not a subject.
fn parse_cuda_device(text: &str) -> Result<usize, String> {
    match super::args::parse_device(text)? {
        Device::Cuda(ordinal) => Ok(ordinal),
        _ => Err(format!("only CUDA devices have a selftest (the CPU is the reference); got `{text}`")),
    }
}

pub fn run(args: SelftestArgs) -> anyhow::Result<()> {
    let options = SelftestOptions {
        compile_only: args.compile_only,
        cuda_device: args.device,
        models: args.model,
        threads: args.threads as usize,
    };
    let report = selftest::run(&options)?;
    print!("{}", selftest::table(&report));
    if args.json {
        println!("{}", serde_json::json!({"selftest": report, "passed": report.passed()}));
    }
    anyhow::ensure!(report.passed(), "the CUDA backend disagrees with the CPU backend (see FAILED above)");
    Ok(())
}
