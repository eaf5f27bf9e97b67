//! How roles find each other: a worker `register`s its record; a router `watch`es for peers to contact.
//!
//! A discovery backend only says where a peer's request endpoint is. Everything else (id, role, model card,
//! event endpoint) the router learns from the worker itself, in the `Hello` that answers its ping, so a
//! hand-written static file needs one line per worker and a stale entry costs nothing but a failed ping.
//! Liveness is the request plane's heartbeat for every backend alike.
mod kubernetes;
mod mdns;
mod static_file;

pub use kubernetes::{API_VERSION as KUBE_API_VERSION, DEFAULT_SELECTOR as KUBE_SELECTOR, KIND as KUBE_KIND};
pub use kubernetes::{Kubernetes, PLURAL as KUBE_PLURAL};
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
    #[error("Kubernetes discovery: {0}")]
    Kube(String),
    #[error(
        "unknown discovery {0:?}: use mdns, mdns:PORT (another UDP port than 5353), file:PATH (a TOML or JSON cluster \
         file) or k8s[:SELECTOR] (the Kubernetes API)"
    )]
    Spec(String),
}

/// Keeps a registration alive; dropping it takes the record back (a clean exit's goodbye).
pub struct Registration {
    guard: Option<Box<dyn Send + Sync>>,
    /// A goodbye that is a call to make (the Kubernetes record's delete): `leave` waits for it; a drop starts
    /// it in the background.
    goodbye: std::sync::Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
}

impl Registration {
    pub fn new(guard: Box<dyn Send + Sync>) -> Self {
        Self { guard: Some(guard), goodbye: std::sync::Mutex::new(None) }
    }

    /// A registration that `guard` keeps alive and `goodbye` ends.
    pub fn with_goodbye(
        guard: Box<dyn Send + Sync>,
        goodbye: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self { guard: Some(guard), goodbye: std::sync::Mutex::new(Some(Box::pin(goodbye))) }
    }

    /// Takes the record back and waits until that is done: what a process about to exit does.
    pub async fn leave(mut self) {
        self.guard = None;
        let goodbye = self.goodbye.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(goodbye) = goodbye {
            goodbye.await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.guard = None;
        let goodbye = self.goodbye.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let (Some(goodbye), Ok(runtime)) = (goodbye, tokio::runtime::Handle::try_current()) {
            runtime.spawn(goodbye);
        }
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

/// Parses `--discovery`: `mdns`, `mdns:PORT`, `file:PATH`, or `k8s[:SELECTOR]` (the label selector of the
/// Services whose EndpointSlices say which workers are ready). With `key`, the records and entries this process
/// writes are signed and only signed ones are seen.
pub fn from_spec(spec: &str, key: Option<&ClusterKey>) -> Result<Box<dyn Discovery>, DiscoveryError> {
    if spec == "mdns" {
        return Ok(Box::new(Mdns::new(MDNS_PORT, key.cloned())?));
    }
    if let Some(selector) = spec.strip_prefix("k8s").filter(|rest| rest.is_empty() || rest.starts_with(':')) {
        let client = crate::core::kube::KubeClient::infer().map_err(|e| DiscoveryError::Kube(e.to_string()))?;
        return Ok(Box::new(Kubernetes::new(client, selector.strip_prefix(':'), key.cloned())));
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
