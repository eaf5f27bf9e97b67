//! `dynamo completions SHELL`: shell completions generated from the clap definitions.
use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// Shell to generate completions for.
    #[arg(value_enum)]
    pub shell: Shell,
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut command = super::Cli::command();
    // Generated whole first: clap_complete panics when its writer fails, as stdout does when piped into
    // `head`.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "dynamo", &mut script);
    match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => Ok(written?),
    }
}
