//! `dynamo route`: the OpenAI frontend and router in front of the workers discovery finds.
use super::args::{ClusterArgs, RouterArgs};
use crate::core::cluster::{self, ClusterSettings};
use clap::Args;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Debug, Args)]
pub struct RouteArgs {
    /// Address the OpenAI HTTP frontend listens on.
    #[arg(long, env = "DYNAMO_HTTP_HOST", default_value = "127.0.0.1", help_heading = "HTTP frontend")]
    pub http_host: IpAddr,

    /// Port of the OpenAI HTTP frontend (0 picks a free one).
    #[arg(long, env = "DYNAMO_HTTP_PORT", default_value_t = 8000, help_heading = "HTTP frontend")]
    pub http_port: u16,

    /// Seconds without an answer to the heartbeat after which a worker leaves the routing set.
    #[arg(long, default_value_t = 1.5, value_parser = super::args::positive_f64, help_heading = "Planes")]
    pub worker_timeout: f64,

    #[command(flatten)]
    pub cluster: ClusterArgs,

    #[command(flatten)]
    pub router: RouterArgs,
}

pub fn run(args: RouteArgs) -> anyhow::Result<()> {
    let discovery = crate::core::discovery::from_spec(&args.cluster.discovery)?;
    let settings = ClusterSettings {
        namespace: args.cluster.namespace,
        dead_after: Duration::from_secs_f64(args.worker_timeout),
        router: args.router.config(),
    };
    let listen = SocketAddr::new(args.http_host, args.http_port);
    super::runtime()?.block_on(cluster::serve(discovery, settings, listen, super::shutdown_signal()))?;
    Ok(())
}
