//! `dynamo route`: the OpenAI frontend and router in front of the workers discovery finds.
use super::args::{ClusterArgs, HttpArgs, RouterArgs};
use crate::core::route::{self, ClusterSettings};
use clap::Args;

#[derive(Debug, Args)]
pub struct RouteArgs {
    #[command(flatten)]
    pub http: HttpArgs,

    /// Seconds without an answer to the heartbeat after which a worker leaves the routing set.
    #[arg(long, default_value_t = 1.5, value_parser = super::args::positive_f64, help_heading = "Planes")]
    pub worker_timeout: f64,

    #[command(flatten)]
    pub cluster: ClusterArgs,

    #[command(flatten)]
    pub router: RouterArgs,
}

pub fn run(args: RouteArgs) -> anyhow::Result<()> {
    let key = args.cluster.key.key()?;
    let discovery = crate::core::discovery::from_spec(&args.cluster.discovery, key.as_ref())?;
    let settings = ClusterSettings {
        namespace: args.cluster.namespace,
        dead_after: super::args::seconds(args.worker_timeout),
        router: args.router.config(),
        key,
    };
    let (listen, http) = (args.http.listen(), args.http.settings());
    super::runtime()?.block_on(route::serve(discovery, settings, listen, &http, super::shutdown_signal()))?;
    Ok(())
}
