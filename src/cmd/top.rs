//! `dynamo top`: a live table of every worker in a namespace, from discovery and the event plane.
use super::args::ClusterArgs;
use crate::core::telemetry::LogTail;
use crate::core::top::{self, ClusterView};
use clap::Args;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Args)]
#[command(after_help = format!("Keys of the live table:\n{}", crate::core::top::ui::KEYS))]
pub struct TopArgs {
    /// Print the table once, after watching for --wait seconds, instead of taking over the terminal.
    #[arg(long)]
    pub once: bool,

    /// With --once: print JSON (the same facts, numbers as numbers) instead of the table.
    #[arg(long, requires = "once")]
    pub json: bool,

    /// Seconds to watch before printing with --once (workers answer within a heartbeat; load and request
    /// totals arrive every second).
    #[arg(long, default_value_t = 2.0, value_parser = super::args::positive_f64)]
    pub wait: f64,

    /// Seconds between redraws of the live table.
    #[arg(long, default_value_t = 0.5, value_parser = super::args::positive_f64)]
    pub refresh: f64,

    /// Seconds without an answer to the heartbeat after which a worker shows as lost.
    #[arg(long, default_value_t = 1.5, value_parser = super::args::positive_f64)]
    pub worker_timeout: f64,

    #[command(flatten)]
    pub cluster: ClusterArgs,
}

pub fn run(args: TopArgs, logs: LogTail) -> anyhow::Result<()> {
    if !args.once && !std::io::stdout().is_terminal() {
        anyhow::bail!("dynamo top draws a live table and needs a terminal; use --once to print it as text");
    }
    let key = args.cluster.key.key()?;
    let discovery = crate::core::discovery::from_spec(&args.cluster.discovery, key.as_ref())?;
    let view = Arc::new(Mutex::new(ClusterView::new(&args.cluster.namespace)));
    let runtime = super::runtime()?;
    let watcher = runtime.spawn(top::watch(
        discovery,
        args.cluster.namespace,
        super::args::seconds(args.worker_timeout),
        key,
        view.clone(),
    ));
    if args.once {
        runtime.block_on(async { tokio::time::sleep(super::args::seconds(args.wait)).await });
    } else {
        top::ui::run(&view, &logs, super::args::seconds(args.refresh))?;
    }
    if watcher.is_finished() {
        // The watcher only ends early on an event-plane error: say it rather than show an empty table.
        runtime.block_on(watcher)??;
    }
    if args.once {
        let view = view.lock().unwrap_or_else(|p| p.into_inner());
        if view.workers.is_empty() {
            eprintln!(
                "dynamo top: no worker found in namespace {:?} through {}; workers must be started with the same \
                 --discovery and --namespace",
                view.namespace, args.cluster.discovery
            );
        }
        match args.json {
            true => println!("{}", view.json(Instant::now())),
            false => print!("{}", view.text(Instant::now())),
        }
    }
    Ok(())
}
