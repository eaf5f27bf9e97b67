use clap::Parser;

/// mimalloc keeps freed memory for reuse instead of handing it back to the kernel: with glibc's malloc, every
/// decode step page-faulted its buffers in afresh (a sixth of a batch-16 step on the CPU engine).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
