//! How roles find each other: a worker `register`s its record; a router `watch`es for peers to contact.
//!
//! A discovery backend only says where a peer's request endpoint is. Everything else (id, role, model card,
//! event endpoint) the router learns from the worker itself, in the `Hello` that answers its ping, so a
//! hand-written static file needs one line per worker and a stale entry costs nothing but a failed ping.
//! Liveness is the request plane's heartbeat for every backend alike.
mod mdns;
mod static_file;

pub use mdns::Mdns;
#[cfg(test)]
pub use static_file::TempClusterFile;
pub use static_file::{StaticFile, entry_tag};

use crate::core::protocol::discovery::Instance;
use crate::core::trust::ClusterKey;
use std::path::PathBuf;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A request endpoint to contact (`tcp://host:port`).
    Added(String),
    Removed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot {action} the cluster file {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the cluster file {path} is not valid {format}: {message}")]
    Parse { path: PathBuf, format: &'static str, message: String },
    #[error("cannot write the cluster file {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("mDNS: {0}")]
    Mdns(String),
    #[error(
        "unknown discovery {0:?}: use mdns, mdns:PORT (another UDP port than 5353) or file:PATH (a TOML or JSON cluster file)"
    )]
    Spec(String),
}

/// Keeps a registration alive; dropping it takes the record back (a clean exit's goodbye).
pub struct Registration {
    _guard: Box<dyn Send + Sync>,
}

impl Registration {
    pub fn new(guard: Box<dyn Send + Sync>) -> Self {
        Self { _guard: guard }
    }
}

pub trait Discovery: Send + Sync {
    /// Makes `instance` findable by routers of its namespace until the registration is dropped.
    fn register(&self, instance: &Instance) -> Result<Registration, DiscoveryError>;

    /// The request endpoints of `namespace`'s workers: every current one as `Added` first, then changes.
    /// Must run inside a tokio runtime.
    fn watch(&self, namespace: &str) -> mpsc::UnboundedReceiver<DiscoveryEvent>;
}

/// The UDP port of multicast DNS (RFC 6762).
pub const MDNS_PORT: u16 = 5353;

/// Parses `--discovery`: `mdns`, `mdns:PORT` or `file:PATH`. With `key`, the records and entries this process
/// writes are signed and only signed ones are seen.
pub fn from_spec(spec: &str, key: Option<&ClusterKey>) -> Result<Box<dyn Discovery>, DiscoveryError> {
    if spec == "mdns" {
        return Ok(Box::new(Mdns::new(MDNS_PORT, key.cloned())?));
    }
    match spec.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(Box::new(StaticFile::new(path.into()).with_key(key.cloned()))),
        Some(("mdns", port)) => match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Box::new(Mdns::new(port, key.cloned())?)),
            _ => Err(DiscoveryError::Spec(spec.to_string())),
        },
        _ => Err(DiscoveryError::Spec(spec.to_string())),
    }
}
