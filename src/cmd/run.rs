//! `dynamo run`: the whole stack in one process.
use super::args::{EngineArgs, HttpArgs, KeyArgs, ModelArgs, RouterArgs};
use crate::core::protocol::discovery::Role;
use crate::core::run::{self, Announce, RunSettings};
use crate::core::worker::PlaneSettings;
use clap::Args;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// In-process workers.
    #[arg(long, env = "DYNAMO_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: u32,

    /// In-process workers that only prefill prompts and hand their KV to the workers above (disaggregated
    /// serving; 0 serves aggregated). Needs the native engine on the CPU.
    #[arg(long, env = "DYNAMO_PREFILL_WORKERS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub prefill_workers: u32,

    /// In-process workers that only run a vision model's image encoder and hand images' embeddings to the
    /// workers that prefill their prompts (a LLaVA-style --model on the native engine; 0 encodes in them).
    #[arg(long, env = "DYNAMO_ENCODE_WORKERS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub encode_workers: u32,

    #[command(flatten)]
    pub http: HttpArgs,

    /// Also put the workers on the planes and register them (mdns, mdns:PORT or file:PATH), as `dynamo
    /// decode` workers are, so `dynamo top` and other routers of the namespace see them.
    #[arg(long, env = "DYNAMO_DISCOVERY", value_name = "SPEC", help_heading = "Discovery")]
    pub discovery: Option<String>,

    /// The namespace the workers are announced in (with --discovery).
    #[arg(long, env = "DYNAMO_NAMESPACE", default_value = "dynamo", help_heading = "Discovery")]
    pub namespace: String,

    /// With --discovery: the cluster key the announced workers seal their planes with.
    #[command(flatten)]
    pub key: KeyArgs,

    #[command(flatten)]
    pub router: RouterArgs,

    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = RunSettings {
        model: args.model.source(),
        model_options: args.model.options(),
        workers: args.workers as usize,
        prefill_workers: args.prefill_workers as usize,
        encode_workers: args.encode_workers as usize,
        engine: args.engine.settings()?,
        router: args.router.config(),
        listen: args.http.listen(),
        http: args.http.settings()?,
    };
    // Their planes listen where the OpenAI server does: on loopback unless it is served beyond this machine.
    let plane_host = args.http.http_host;
    let announce = match args.discovery {
        Some(spec) => {
            let key = args.key.key()?;
            Some(Announce {
                discovery: crate::core::discovery::from_spec(&spec, key.as_ref())?,
                planes: PlaneSettings {
                    role: Role::Decode,
                    namespace: args.namespace,
                    host: plane_host,
                    request_port: 0,
                    event_port: 0,
                    max_in_flight: crate::core::worker::DEFAULT_MAX_IN_FLIGHT,
                    key,
                    transfer: None,
                    http: None,
                    // Its OpenAI server's /metrics already has its gauges.
                    metrics_port: None,
                },
            })
        }
        None => None,
    };
    super::runtime()?.block_on(run::serve(settings, announce, super::shutdown_signal()))?;
    Ok(())
}
