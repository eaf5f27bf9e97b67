//! `dynamo bench …`: benchmarks that print a table, or with `--json` one JSON object on the last line.
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {}
}
