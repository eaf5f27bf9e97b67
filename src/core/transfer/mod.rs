//! Moving KV blocks and embeddings between processes: NIXL's model, written for this project.
//!
//! Each worker runs one `Agent`. It owns registered `Region`s (shared memory: KV pages, embedding buffers) and
//! listens for peers. A peer that connects learns the agent's metadata (region ids and sizes, its host, its
//! shm socket) over the connection itself, as NIXL's `fetchRemoteMD` does, so discovery only carries the
//! transfer address. A transfer is one request: pairs of (local region, offset, len) ↔ (remote region,
//! offset, len), written to the peer or read from it; adjacent pairs are merged first, so a run of pages moves
//! as one range. The initiator learns completion or failure from the returned future; the target's owner
//! learns of it from a `Notification`, delivered only after the data has landed.
//!
//! Backends, chosen per peer: `shm` for a peer on the same host (and network namespace): the target hands
//! its regions' memfds over an abstract unix socket, and a transfer is a copy between mappings; `tcp`
//! otherwise: several data connections, each range read or written straight from and into region memory.
//! Both open with the same handshake (`wire`), which proves the cluster key both ways when there is one;
//! shm peers must also run as the same user. A third, `nixl`, is NVIDIA's library (UCX), asked for by name:
//! both agents run it, and its metadata travels over a proven connection (`nixl`).
//!
//! With a cluster key, a tcp connection's bytes after the handshake are sealed (`sealed`): KV pages and
//! embeddings cross the network encrypted and authenticated. shm's control connection stays clear: it never
//! leaves the host, only a same-user process can open it, and the data it moves goes between mappings, not
//! over it. NIXL's data path is UCX's own and is not encrypted.
mod nixl;
mod region;
mod sealed;
mod shm;
mod tcp;
mod wire;

pub use nixl::available as nixl_available;
pub use region::{Region, RegionError};

use crate::core::protocol::transfer::{AgentMetadata, RegionInfo, TransferFrameError};
use crate::core::trust::ClusterKey;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;

pub type AgentId = u64;
pub type RegionId = u32;

/// Data connections a tcp peer gets unless set otherwise: enough to fill loopback and a 100 Gb/s NIC's
/// queues on this class of machine, few enough not to matter for file descriptors.
pub const DEFAULT_STREAMS: usize = 4;
/// Notifications waiting for the agent's owner past which more are dropped (peers send them; a peer must not
/// be able to fill memory with them).
const NOTIFICATION_QUEUE: usize = 4096;
/// How long a transfer may take before it fails and its connections are dropped.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Shm,
    Tcp,
    /// NVIDIA's NIXL (UCX), loaded at run time; only when asked for.
    Nixl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Shm => "shm",
            Backend::Tcp => "tcp",
            Backend::Nixl => "nixl",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The address the tcp listener binds (peers reach the agent there).
    pub host: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// Data connections per tcp peer.
    pub streams: usize,
    /// Forces one backend for every peer; `None` picks shm for same-host peers and tcp for the rest. `nixl`
    /// also starts a NIXL agent, without which no peer can reach this one through NIXL.
    pub backend: Option<Backend>,
    pub timeout: Duration,
    pub key: Option<ClusterKey>,
}

impl AgentSettings {
    /// On loopback at a free port, with the defaults.
    pub fn loopback(key: Option<ClusterKey>) -> Self {
        Self {
            host: [127, 0, 0, 1].into(),
            port: 0,
            streams: DEFAULT_STREAMS,
            backend: None,
            timeout: DEFAULT_TIMEOUT,
            key,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("transfer connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("transfer connection: {0}")]
    Frame(#[from] TransferFrameError),
    #[error("the peer closed the transfer connection")]
    Closed,
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("transfer peer not trusted: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Descriptors(String),
    #[error("the transfer took longer than {0:?}; its connections were dropped")]
    Timeout(Duration),
    #[error("the peer is gone (its connection closed)")]
    PeerLost,
    #[error("{backend} transfers to this peer are not possible: {why}")]
    Unavailable { backend: &'static str, why: String },
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// A range of a region: `len` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Local ranges into the peer's.
    Write,
    /// The peer's ranges into local ones.
    Read,
}

/// A message the initiator attached to a transfer, delivered after the transfer's data landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub from: AgentId,
    pub message: Vec<u8>,
}

impl Notification {
    /// The lease a reader's notification ends (8 bytes, little-endian), or `None` (logged) for another message.
    pub fn lease(&self) -> Option<u64> {
        let lease = <[u8; 8]>::try_from(self.message.as_slice()).ok().map(u64::from_le_bytes);
        if lease.is_none() {
            tracing::warn!(
                "agent {:016x} sent a notification that names no lease ({} bytes); ignored",
                self.from,
                self.message.len()
            );
        }
        lease
    }
}

/// What one transfer moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferStats {
    pub bytes: u64,
    /// Ranges after merging adjacent descriptors.
    pub ranges: usize,
}

pub struct Agent {
    inner: Arc<Inner>,
    address: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|task| task.abort());
    }
}

/// What the agent's listeners share with it.
pub(crate) struct Inner {
    id: AgentId,
    settings: AgentSettings,
    key: Option<ClusterKey>,
    regions: RwLock<Vec<Arc<Region>>>,
    host: String,
    shm: Option<String>,
    notifications: mpsc::Sender<Notification>,
    nixl: Option<Arc<nixl::NixlAgent>>,
}

impl Inner {
    fn region(&self, id: RegionId) -> Option<Arc<Region>> {
        self.regions.read().unwrap_or_else(|p| p.into_inner()).get(id as usize).cloned()
    }

    fn metadata(&self) -> AgentMetadata {
        let regions = self.regions.read().unwrap_or_else(|p| p.into_inner());
        AgentMetadata {
            agent: self.id,
            host: self.host.clone(),
            shm: self.shm.clone(),
            regions: regions.iter().enumerate().map(|(id, r)| RegionInfo { id: id as u32, len: r.len() }).collect(),
            nonce: Vec::new(),
            proof: Vec::new(),
        }
    }
}

impl Agent {
    /// Starts listening (tcp on `settings.host`, and the shm socket); notifications for this agent come on
    /// the returned receiver. Must run inside a tokio runtime.
    pub fn start(id: AgentId, settings: AgentSettings) -> Result<(Self, mpsc::Receiver<Notification>), TransferError> {
        let listener = std::net::TcpListener::bind((settings.host, settings.port))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let address = listener.local_addr()?;
        let (notifications, received) = mpsc::channel(NOTIFICATION_QUEUE);
        let shm_listener = match settings.backend {
            Some(Backend::Tcp) => None,
            _ => shm::listen(id).inspect_err(|e| tracing::warn!("no shm transfers from this agent: {e}")).ok(),
        };
        let nixl = match settings.backend {
            Some(Backend::Nixl) => Some(Arc::new(nixl::NixlAgent::start(id, notifications.clone())?)),
            _ => None,
        };
        let inner = Arc::new(Inner {
            id,
            key: settings.key.clone(),
            settings,
            regions: RwLock::default(),
            host: host_identity(),
            shm: shm_listener.as_ref().map(|(name, _)| name.clone()),
            notifications,
            nixl,
        });
        let mut tasks = vec![tokio::spawn(tcp::serve(inner.clone(), listener))];
        if let Some((_, listener)) = shm_listener {
            tasks.push(tokio::spawn(shm::serve(inner.clone(), listener)));
        }
        Ok((Self { inner, address, tasks }, received))
    }

    pub fn id(&self) -> AgentId {
        self.inner.id
    }

    /// Where peers reach it: `tcp://host:port`.
    pub fn address(&self) -> String {
        crate::core::protocol::discovery::tcp_endpoint(self.address.ip(), self.address.port())
    }

    /// Makes `region` movable; peers that connect from now on see it under the returned id.
    pub fn register(&self, region: impl Into<Arc<Region>>) -> (RegionId, Arc<Region>) {
        let region = region.into();
        let mut regions = self.inner.regions.write().unwrap_or_else(|p| p.into_inner());
        if let Some(nixl) = &self.inner.nixl
            && let Err(error) = nixl.register(region.as_mut_ptr() as u64, region.len())
        {
            tracing::error!("region {} cannot move through NIXL: {error}", regions.len());
        }
        regions.push(region.clone());
        ((regions.len() - 1) as RegionId, region)
    }

    pub fn region(&self, id: RegionId) -> Option<Arc<Region>> {
        self.inner.region(id)
    }

    /// Connects to the agent at `address` (`tcp://host:port` or `host:port`) and picks the backend for it.
    pub async fn connect(&self, address: &str) -> Result<Peer, TransferError> {
        self.connect_using(address, self.inner.settings.backend).await
    }

    /// Connects as `connect` does, with `backend` forced (or picked, when `None`) instead of the settings'.
    /// A peer that does not complete the handshake within the transfer timeout is given up on.
    pub async fn connect_using(&self, address: &str, backend: Option<Backend>) -> Result<Peer, TransferError> {
        let timeout = self.inner.settings.timeout;
        tokio::time::timeout(timeout, self.connect_now(address, backend))
            .await
            .unwrap_or(Err(TransferError::Timeout(timeout)))
    }

    async fn connect_now(&self, address: &str, backend: Option<Backend>) -> Result<Peer, TransferError> {
        let addr = address.strip_prefix("tcp://").unwrap_or(address);
        let tcp = tcp::TcpPeer::connect(self.inner.clone(), addr.to_string()).await?;
        let metadata = tcp.metadata.clone();
        let same_host = metadata.host == self.inner.host && metadata.shm.is_some();
        let link = match (backend, same_host) {
            (Some(Backend::Nixl), _) => {
                let Some(nixl) = &self.inner.nixl else {
                    return Err(TransferError::Unavailable {
                        backend: "nixl",
                        why: "this agent was not started with the nixl backend".into(),
                    });
                };
                let offer = tcp.nixl_offer().await?;
                if offer.addresses.len() != metadata.regions.len() {
                    return Err(TransferError::Descriptors(format!(
                        "the agent at {address} offers {} regions through NIXL but lists {}",
                        offer.addresses.len(),
                        metadata.regions.len()
                    )));
                }
                Link::Nixl { remote: nixl.load(&offer)?, _control: tcp }
            }
            (Some(Backend::Tcp), _) | (None, false) => Link::Tcp(tcp),
            (Some(Backend::Shm), false) => {
                return Err(TransferError::Unavailable {
                    backend: "shm",
                    why: format!("the agent at {address} is on another host or network namespace"),
                });
            }
            (_, true) => match shm::ShmPeer::connect(&self.inner, &metadata).await {
                Ok(shm) => Link::Shm(shm),
                Err(error) if backend.is_none() => {
                    tracing::warn!("shm to the agent at {address} failed ({error}); using tcp");
                    Link::Tcp(tcp)
                }
                Err(error) => return Err(error),
            },
        };
        Ok(Peer { metadata, link })
    }

    /// Moves `local[i]` ↔ `remote[i]` for every i, in `direction`, as one request; `notification` is
    /// delivered to the peer's owner after the data has landed.
    pub async fn transfer(
        &self,
        peer: &Peer,
        direction: Direction,
        local: &[Descriptor],
        remote: &[Descriptor],
        notification: Option<&[u8]>,
    ) -> Result<TransferStats, TransferError> {
        let ranges = self.plan(peer, local, remote)?;
        let bytes = ranges.iter().map(|r| r.local.len).sum();
        let stats = TransferStats { bytes, ranges: ranges.len() };
        let timeout = self.inner.settings.timeout;
        let moved = match &peer.link {
            Link::Tcp(tcp) => tokio::time::timeout(timeout, tcp.transfer(direction, &ranges, notification)).await,
            Link::Shm(shm) => tokio::time::timeout(timeout, shm.transfer(direction, &ranges, notification)).await,
            Link::Nixl { remote, .. } => {
                tokio::time::timeout(timeout, remote.transfer(direction, &ranges, notification, timeout)).await
            }
        };
        match moved {
            Ok(result) => result.map(|()| stats),
            Err(_) => {
                peer.drop_connections().await;
                Err(TransferError::Timeout(timeout))
            }
        }
    }

    /// Checks every descriptor against its region (the peer's as its metadata says; the peer checks again)
    /// and merges adjacent pairs.
    fn plan(&self, peer: &Peer, local: &[Descriptor], remote: &[Descriptor]) -> Result<Vec<Range>, TransferError> {
        if local.len() != remote.len() {
            return Err(TransferError::Descriptors(format!(
                "{} local descriptors for {} remote ones; a transfer pairs them one to one",
                local.len(),
                remote.len()
            )));
        }
        let mut ranges: Vec<Range> = Vec::with_capacity(local.len());
        for (l, r) in local.iter().zip(remote) {
            if l.len != r.len {
                return Err(TransferError::Descriptors(format!(
                    "a local range of {} bytes is paired with a remote one of {}",
                    l.len, r.len
                )));
            }
            let region = self.region(l.region).ok_or_else(|| no_region("local", l.region))?;
            if !region.holds(l.offset, l.len) {
                return Err(outside("local", l, region.len()));
            }
            let remote_len = peer.region_len(r.region).ok_or_else(|| no_region("remote", r.region))?;
            if r.offset.checked_add(r.len).is_none_or(|end| end > remote_len) {
                return Err(outside("remote", r, remote_len));
            }
            if l.len == 0 {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.local.follows(l) && last.remote.follows(r) => {
                    last.local.len += l.len;
                    last.remote.len += l.len;
                }
                _ => ranges.push(Range { local: *l, remote: *r, region }),
            }
        }
        Ok(ranges)
    }
}

fn no_region(side: &str, region: RegionId) -> TransferError {
    TransferError::Descriptors(format!(
        "{side} region {region} is not registered{}",
        if side == "remote" { " with the peer (as of when it was connected to)" } else { "" }
    ))
}

fn outside(side: &str, d: &Descriptor, region_len: u64) -> TransferError {
    TransferError::Descriptors(format!(
        "{side} range {}..{} (+{}) is outside region {} of {region_len} bytes",
        d.offset,
        d.offset.saturating_add(d.len),
        d.len,
        d.region
    ))
}

/// The descriptors of KV page `page` in an engine's layered cache (`Transformer::cache_memory`): one per
/// region of `regions` regions from `first` (each layer's K, then V), `page_bytes` at `page × page_bytes`.
pub fn layered_page(first: RegionId, regions: u32, page: u64, page_bytes: u64) -> impl Iterator<Item = Descriptor> {
    (first..first + regions).map(move |region| Descriptor { region, offset: page * page_bytes, len: page_bytes })
}

impl Descriptor {
    /// Whether `next` starts where this one ends, in the same region.
    fn follows(&self, next: &Descriptor) -> bool {
        self.region == next.region && self.offset.checked_add(self.len) == Some(next.offset)
    }
}

/// One merged pair, with the local region it reads or writes.
#[derive(Debug, Clone)]
struct Range {
    local: Descriptor,
    remote: Descriptor,
    region: Arc<Region>,
}

/// A connected peer agent.
pub struct Peer {
    metadata: AgentMetadata,
    link: Link,
}

enum Link {
    Tcp(tcp::TcpPeer),
    Shm(shm::ShmPeer),
    /// The tcp connection stays open: the peer's NIXL metadata was loaded on it, and it is kept for the
    /// peer's lifetime as the other backends keep theirs.
    Nixl {
        remote: nixl::RemoteAgent,
        _control: tcp::TcpPeer,
    },
}

impl Peer {
    pub fn agent(&self) -> AgentId {
        self.metadata.agent
    }

    pub fn backend(&self) -> Backend {
        match self.link {
            Link::Tcp(_) => Backend::Tcp,
            Link::Shm(_) => Backend::Shm,
            Link::Nixl { .. } => Backend::Nixl,
        }
    }

    /// The peer's regions as it listed them when connected.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.metadata.regions
    }

    fn region_len(&self, id: RegionId) -> Option<u64> {
        self.metadata.regions.iter().find(|r| r.id == id).map(|r| r.len)
    }

    async fn drop_connections(&self) {
        if let Link::Tcp(tcp) = &self.link {
            tcp.drop_connections().await;
        }
    }
}

/// This machine, boot and network namespace: peers that share all three can share memory.
fn host_identity() -> String {
    let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default();
    let machine = [read("/etc/machine-id"), read("/var/lib/dbus/machine-id")].into_iter().find(|s| !s.is_empty());
    let net = std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default();
    format!("{}/{}/{net}", machine.unwrap_or_default(), read("/proc/sys/kernel/random/boot_id"))
}

#[cfg(test)]
mod tests;
