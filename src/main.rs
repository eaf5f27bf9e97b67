use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = dynamo::cmd::Cli::parse();
    match dynamo::cmd::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dynamo: error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
