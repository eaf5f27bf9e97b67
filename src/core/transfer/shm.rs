//! The shm backend, for peers on the same host and network namespace: the target hands its regions' memfds
//! over an abstract unix socket (after the handshake, and only to a process of its own user), the initiator
//! maps them, and a transfer is a copy between the two mappings. The socket stays open as the control
//! connection: notifications go over it, and its end is how the initiator learns the peer is gone.
//!
//! The descriptors travel as `SCM_RIGHTS` with `sendmsg`/`recvmsg` through libc: std's ancillary-data API is
//! not stable, and the few lines here do not justify another crate.
use super::wire;
use super::{Direction, Inner, Range, Region, TransferError};
use crate::core::protocol::transfer::AgentMetadata;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

/// Descriptors per message: the kernel takes at most 253 (`SCM_MAX_FD`).
const FDS_PER_MESSAGE: usize = 250;
/// Copies at least this big run on the blocking pool, not on the runtime's threads.
const BLOCKING_COPY: u64 = 1 << 20;

/// Binds this agent's abstract socket; its name goes in the agent's metadata.
pub(super) fn listen(agent: u64) -> std::io::Result<(String, UnixListener)> {
    // Random too: agent ids are only as unique as their makers made them, and abstract names are per host.
    let name = format!("dynamo-xfer-{agent:016x}-{:016x}", rand::random::<u64>());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    listener.set_nonblocking(true)?;
    Ok((name, UnixListener::from_std(listener)?))
}

pub(super) async fn serve(inner: Arc<Inner>, listener: UnixListener) {
    // Owned here, so dropping the agent (which aborts this task) closes every connection too.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!("shm transfer listener: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let inner = inner.clone();
        connections.spawn(async move {
            // SAFETY: getuid cannot fail.
            let own = unsafe { libc::getuid() };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == own => {}
                Ok(cred) => {
                    let _ = wire::fail(&mut stream, 0, "shm peers must run as the same user").await;
                    tracing::warn!("refused an shm transfer peer of uid {} (this agent runs as {own})", cred.uid());
                    return;
                }
                Err(error) => {
                    tracing::warn!("shm transfer peer of unknown user refused: {error}");
                    return;
                }
            }
            let served = async {
                // Left clear, keyed or not: this socket never leaves the host (see the module's doc).
                let (initiator, _) = wire::accept(&mut stream, &inner).await?;
                let regions: Vec<RawFd> = {
                    let regions = inner.regions.read().unwrap_or_else(|p| p.into_inner());
                    regions.iter().map(|r| r.fd()).collect()
                };
                send_fds(&stream, &regions).await?;
                super::tcp::serve_frames(&inner, &mut stream, initiator).await
            };
            if let Err(error) = served.await {
                tracing::debug!("shm transfer connection: {error}");
            }
        });
    }
}

/// A same-host peer: its regions mapped here, and the control connection.
pub(super) struct ShmPeer {
    regions: Vec<Arc<Region>>,
    control: Mutex<UnixStream>,
    request: std::sync::atomic::AtomicU64,
}

impl ShmPeer {
    pub async fn connect(inner: &Inner, metadata: &AgentMetadata) -> Result<Self, TransferError> {
        let unavailable = |why: String| TransferError::Unavailable { backend: "shm", why };
        let name = metadata.shm.as_deref().ok_or_else(|| unavailable("the peer offers no shm socket".into()))?;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let stream = std::os::unix::net::UnixStream::connect_addr(&addr)
            .map_err(|e| unavailable(format!("cannot reach its socket {name:?}: {e}")))?;
        stream.set_nonblocking(true)?;
        let mut stream = UnixStream::from_std(stream)?;
        let (answered, _) = wire::initiate(&mut stream, inner.id, inner.key.as_ref()).await?;
        if answered.agent != metadata.agent {
            return Err(unavailable(format!("agent {:016x} answers at its socket", answered.agent)));
        }
        let fds = recv_fds(&stream, answered.regions.len()).await?;
        let mut regions = Vec::with_capacity(fds.len());
        for (fd, info) in fds.into_iter().zip(&answered.regions) {
            let region = Region::from_fd(fd)?;
            if region.len() != info.len {
                return Err(unavailable(format!("region {} maps {} bytes, not {}", info.id, region.len(), info.len)));
            }
            regions.push(Arc::new(region));
        }
        Ok(Self { regions, control: Mutex::new(stream), request: 1.into() })
    }

    pub async fn transfer(
        &self,
        direction: Direction,
        ranges: &[Range],
        notification: Option<&[u8]>,
    ) -> Result<(), TransferError> {
        let mut control = self.control.lock().await;
        // A peer that is gone has closed its end: nothing is copied into memory nobody will read.
        let mut probe = [0u8; 1];
        match control.try_read(&mut probe) {
            Ok(_) => return Err(TransferError::PeerLost),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error.into()),
        }
        let mut copies = Vec::with_capacity(ranges.len());
        for range in ranges {
            let remote = self.regions.get(range.remote.region as usize).ok_or_else(|| {
                TransferError::Descriptors(format!("remote region {} is not mapped", range.remote.region))
            })?;
            let (from, to) = match direction {
                Direction::Write => ((range.region.clone(), range.local.offset), (remote.clone(), range.remote.offset)),
                Direction::Read => ((remote.clone(), range.remote.offset), (range.region.clone(), range.local.offset)),
            };
            copies.push((from, to, range.local.len));
        }
        let copy_all = move || copies.iter().all(|((from, at), (to, to_at), len)| from.copy_to(*at, to, *to_at, *len));
        let total: u64 = ranges.iter().map(|r| r.local.len).sum();
        let copied = if total >= BLOCKING_COPY {
            tokio::task::spawn_blocking(copy_all).await.map_err(|e| std::io::Error::other(e.to_string()))?
        } else {
            copy_all()
        };
        if !copied {
            return Err(TransferError::Descriptors("a range is outside its mapped region".into()));
        }
        if let Some(message) = notification {
            let request = self.request.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            wire::notify(&mut *control, request, message).await?;
        }
        Ok(())
    }
}

/// Sends `fds` in messages of at most `FDS_PER_MESSAGE`, each with its count as 4 bytes of data.
async fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> std::io::Result<()> {
    if fds.is_empty() {
        return Ok(());
    }
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        let count = (batch.len() as u32).to_be_bytes();
        stream.async_io(Interest::WRITABLE, || send_with_fds(stream.as_raw_fd(), &count, batch)).await?;
    }
    Ok(())
}

/// Receives `count` descriptors sent by `send_fds`.
async fn recv_fds(stream: &UnixStream, count: usize) -> Result<Vec<OwnedFd>, TransferError> {
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let mut data = [0u8; 4];
        let mut got = 0;
        while got < data.len() {
            let n = stream
                .async_io(Interest::READABLE, || recv_with_fds(stream.as_raw_fd(), &mut data[got..], &mut fds))
                .await?;
            if n == 0 {
                return Err(TransferError::Closed);
            }
            got += n;
        }
        if fds.len() > count + FDS_PER_MESSAGE {
            return Err(TransferError::Refused("the peer sent more descriptors than regions".into()));
        }
    }
    // Regions registered after the metadata was sent are not this peer's to use.
    fds.truncate(count);
    Ok(fds)
}

fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    message.msg_controllen = space as _;
    // SAFETY: the control buffer has room for one header and `fds`, as CMSG_SPACE said.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(header), fd_bytes);
    }
    // SAFETY: a valid socket and message.
    let sent = unsafe { libc::sendmsg(socket, &message, libc::MSG_NOSIGNAL) };
    if sent < 0 { Err(std::io::Error::last_os_error()) } else { Ok(sent as usize) }
}

fn recv_with_fds(socket: RawFd, data: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let fd_bytes = FDS_PER_MESSAGE * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: as in `send_with_fds`.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    message.msg_controllen = space as _;
    // SAFETY: a valid socket and message; descriptors arrive close-on-exec.
    let received = unsafe { libc::recvmsg(socket, &mut message, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote, within `msg_controllen`.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header) as *const RawFd;
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if message.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other("descriptors were cut off in transit"));
    }
    Ok(received as usize)
}
