//! The tcp backend, and the target side every connection shares (`serve_connection`: the shm socket runs
//! it too). A peer gets `streams` data connections; a request's ranges are cut into pieces spread over them
//! by bytes, so one big request fills every stream and a small one (under `ONE_STREAM_BELOW`) costs one
//! round trip on one. In an open cluster bodies go straight from region memory into the socket, and big
//! ones straight from the socket into region memory (small ones, a few KiB each, come several to a read
//! through the connection's buffer); in a keyed one they pass through the connection's sealed records.
use super::sealed::SealedStream;
use super::wire::{self, read_header, write_frame};
use super::{Direction, Inner, Notification, Range, TransferError};
use crate::core::protocol::transfer::{AgentMetadata, FrameKind, NixlOffer, TransferFrame, TransferFrameError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

/// Requests smaller than this go over one stream: splitting them costs more round trips than it saves.
const ONE_STREAM_BELOW: u64 = 512 * 1024;
/// Pieces are at least this big, so a stream writes few headers per byte.
const MIN_PIECE: u64 = 256 * 1024;
/// Each connection's read buffer: many small frames come in one read, and a body bigger than the buffer is
/// read straight into region memory past it.
const READ_BUFFER: usize = 256 * 1024;
/// Bodies with at least this much left past the buffered bytes are read straight into place.
const DIRECT_READ: usize = 16 * 1024;
/// Reads sent ahead of their answers on one stream; bounded so neither side's socket buffer can fill with
/// what the other is not reading.
const READ_WINDOW: usize = 64;

/// Accepts peers until the agent is dropped.
pub(super) async fn serve(inner: Arc<Inner>, listener: TcpListener) {
    // Owned here, so dropping the agent (which aborts this task) closes every connection too.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!("transfer listener: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let inner = inner.clone();
        connections.spawn(async move {
            if let Err(error) = serve_connection(&inner, &mut stream).await {
                tracing::debug!("transfer connection from {peer}: {error}");
            }
        });
    }
}

/// The target's side of one connection, from its handshake to its end.
pub(super) async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    stream: &mut S,
) -> Result<(), TransferError> {
    let (initiator, ciphers) = wire::accept(stream, inner).await?;
    serve_frames(inner, &mut SealedStream::new(stream, ciphers), initiator).await
}

/// Serves data and control frames after the handshake. A range outside its region, or a frame out of
/// place, ends the connection after a `Failed` saying why: what follows on the stream cannot be trusted.
pub(super) async fn serve_frames<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    stream: &mut S,
    initiator: u64,
) -> Result<(), TransferError> {
    let stream = &mut BufReader::with_capacity(READ_BUFFER, stream);
    loop {
        let frame = match read_header(stream).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(error) => {
                let _ = wire::fail(stream, 0, &error.to_string()).await;
                return Err(error);
            }
        };
        match frame.kind {
            FrameKind::Write | FrameKind::Read => {
                let region = inner.region(frame.region);
                let Some(region) = region.filter(|r| r.holds(frame.offset, frame.len)) else {
                    let why = format!(
                        "range {}..+{} is not inside a region registered here (region {})",
                        frame.offset, frame.len, frame.region
                    );
                    let _ = wire::fail(stream, frame.request, &why).await;
                    return Err(TransferError::Descriptors(why));
                };
                if frame.kind == FrameKind::Write {
                    // SAFETY: in bounds (checked above); the owner keeps readers off ranges being transferred.
                    let Some(bytes) = (unsafe { region.bytes_mut(frame.offset, frame.len) }) else { continue };
                    read_body_into(stream, bytes).await?;
                } else {
                    // SAFETY: as above, with writers kept off.
                    let Some(bytes) = (unsafe { region.bytes(frame.offset, frame.len) }) else { continue };
                    write_frame(stream, TransferFrame { kind: FrameKind::Data, ..frame }, bytes).await?;
                }
            }
            FrameKind::Flush | FrameKind::Notify => {
                // A Flush may carry the request's notification: everything before it on this stream landed.
                let message = wire::read_body(stream, &frame).await?;
                if frame.kind == FrameKind::Notify || !message.is_empty() {
                    // Dropped when the owner stopped listening (shutting down) or is this far behind; the data
                    // landed all the same.
                    if let Err(mpsc::error::TrySendError::Full(_)) =
                        inner.notifications.try_send(Notification { from: initiator, message })
                    {
                        tracing::warn!("transfer notifications from agent {initiator:016x} dropped: nobody reads them");
                    }
                }
                write_frame(stream, TransferFrame::control(FrameKind::Done, frame.request, 0), &[]).await?;
            }
            FrameKind::Nixl => {
                // The connection is proven (accept ran first): only now may the NIXL keys go out.
                match inner.nixl.as_ref().map(|nixl| nixl.offer()) {
                    Some(Ok(offer)) => {
                        let body = offer.to_bytes();
                        write_frame(
                            stream,
                            TransferFrame::control(FrameKind::Nixl, frame.request, body.len() as u64),
                            &body,
                        )
                        .await?
                    }
                    Some(Err(error)) => wire::fail(stream, frame.request, &error.to_string()).await?,
                    None => {
                        let why = "this agent offers no NIXL transfers: start it with --transfer-backend nixl";
                        wire::fail(stream, frame.request, why).await?
                    }
                }
            }
            other => {
                let error = TransferFrameError::Unexpected { got: other, expected: "a data or control frame" };
                let _ = wire::fail(stream, frame.request, &error.to_string()).await;
                return Err(error.into());
            }
        }
    }
}

/// A tcp peer: its metadata and its data connections (reopened when one failed).
pub(super) struct TcpPeer {
    inner: Arc<Inner>,
    addr: String,
    pub metadata: AgentMetadata,
    streams: Vec<Mutex<Option<Connection>>>,
    requests: AtomicU64,
}

/// A data connection, sealed in a keyed cluster; writes pass through its read buffer.
type Connection = BufReader<SealedStream<TcpStream>>;

/// Part of a range that one stream moves.
struct Piece<'a> {
    range: &'a Range,
    /// From the start of the range.
    at: u64,
    len: u64,
}

impl TcpPeer {
    pub async fn connect(inner: Arc<Inner>, addr: String) -> Result<Self, TransferError> {
        let (first, metadata) = open(&inner, &addr).await?;
        let mut streams = vec![Mutex::new(Some(BufReader::with_capacity(READ_BUFFER, first)))];
        streams.extend((1..inner.settings.streams.max(1)).map(|_| Mutex::new(None)));
        Ok(Self { inner, addr, metadata, streams, requests: AtomicU64::new(1) })
    }

    pub async fn transfer(
        &self,
        direction: Direction,
        ranges: &[Range],
        notification: Option<&[u8]>,
    ) -> Result<(), TransferError> {
        let request = self.requests.fetch_add(1, Ordering::Relaxed);
        let total: u64 = ranges.iter().map(|r| r.local.len).sum();
        let streams = if total < ONE_STREAM_BELOW { 1 } else { self.streams.len() };
        let parts = split(ranges, total, streams);
        let used = parts.iter().filter(|part| !part.is_empty()).count();
        // On one stream the notification rides on its flush: one round trip for the whole request. With nothing
        // to move (the reader had it all already) it still goes, alone: it ends the holder's lease.
        let (with_flush, after) = if used == 1 { (notification, None) } else { (None, notification) };
        let moved = parts.iter().enumerate().filter(|(_, part)| !part.is_empty()).map(|(i, part)| async move {
            let mut slot = self.checkout(i).await?;
            let Some(stream) = slot.as_mut() else { return Err(TransferError::Closed) };
            let result = match direction {
                Direction::Write => write_pieces(stream, part).await,
                Direction::Read => read_pieces(stream, part).await,
            };
            let result = match result {
                Ok(()) => flush(stream, request, with_flush.unwrap_or_default()).await,
                Err(error) => Err(error),
            };
            if result.is_err() {
                // What is left unread on it is unknown.
                *slot = None;
            }
            result
        });
        futures::future::try_join_all(moved).await?;
        if let Some(message) = after {
            let mut slot = self.checkout(0).await?;
            let Some(stream) = slot.as_mut() else { return Err(TransferError::Closed) };
            let result = wire::notify(stream, request, message).await;
            if result.is_err() {
                *slot = None;
            }
            result?;
        }
        Ok(())
    }

    /// The peer's NIXL metadata and region addresses, asked for on the first stream.
    pub async fn nixl_offer(&self) -> Result<NixlOffer, TransferError> {
        let request = self.requests.fetch_add(1, Ordering::Relaxed);
        let mut slot = self.checkout(0).await?;
        let Some(stream) = slot.as_mut() else { return Err(TransferError::Closed) };
        write_frame(stream, TransferFrame::control(FrameKind::Nixl, request, 0), &[]).await?;
        let (_, body) = wire::expect(stream, FrameKind::Nixl, "the peer's NIXL offer").await?;
        Ok(NixlOffer::from_bytes(&body)?)
    }

    /// Stream `i`, opened first if it is not (or was dropped after a failure).
    async fn checkout(&self, i: usize) -> Result<tokio::sync::MutexGuard<'_, Option<Connection>>, TransferError> {
        let mut slot = self.streams[i].lock().await;
        if slot.is_none() {
            let (stream, metadata) = open(&self.inner, &self.addr).await?;
            if metadata.agent != self.metadata.agent {
                // Another process answers there now: this peer's regions are gone with the old one.
                return Err(TransferError::PeerLost);
            }
            *slot = Some(BufReader::with_capacity(READ_BUFFER, stream));
        }
        Ok(slot)
    }

    pub async fn drop_connections(&self) {
        for stream in &self.streams {
            // A stream busy with the timed-out transfer is dropped by it (its future was dropped).
            if let Ok(mut slot) = stream.try_lock() {
                *slot = None;
            }
        }
    }
}

impl Piece<'_> {
    /// The local offset, and the remote range as a frame header.
    fn ends(&self) -> (u64, TransferFrame) {
        let remote = &self.range.remote;
        let frame = TransferFrame {
            kind: FrameKind::Write,
            region: remote.region,
            request: 0,
            offset: remote.offset + self.at,
            len: self.len,
        };
        (self.range.local.offset + self.at, frame)
    }
}

async fn write_pieces(stream: &mut Connection, pieces: &[Piece<'_>]) -> Result<(), TransferError> {
    let mut frames = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let (local, remote) = piece.ends();
        // SAFETY: checked against the region when the transfer was planned; the owner keeps writers off ranges
        // being sent.
        let bytes = unsafe { piece.range.region.bytes(local, piece.len) };
        frames.push((remote, bytes.ok_or_else(|| TransferError::Descriptors("a local range left its region".into()))?));
    }
    Ok(wire::write_frames(stream, &frames).await?)
}

async fn read_pieces(stream: &mut Connection, pieces: &[Piece<'_>]) -> Result<(), TransferError> {
    for window in pieces.chunks(READ_WINDOW) {
        let asks: Vec<(TransferFrame, &[u8])> =
            window.iter().map(|piece| (TransferFrame { kind: FrameKind::Read, ..piece.ends().1 }, &[][..])).collect();
        wire::write_frames(stream, &asks).await?;
        for piece in window {
            let (local, remote) = piece.ends();
            let data = read_header(stream).await?.ok_or(TransferError::Closed)?;
            if data.kind == FrameKind::Failed {
                let why = wire::read_body(stream, &data).await?;
                return Err(TransferError::Refused(String::from_utf8_lossy(&why).into_owned()));
            }
            if data != (TransferFrame { kind: FrameKind::Data, ..remote }) {
                let expected = "the data of the range asked for";
                return Err(TransferFrameError::Unexpected { got: data.kind, expected }.into());
            }
            // SAFETY: as in `write_pieces`, with every other access kept off ranges being received.
            let bytes = unsafe { piece.range.region.bytes_mut(local, piece.len) };
            let bytes = bytes.ok_or_else(|| TransferError::Descriptors("a local range left its region".into()))?;
            read_body_into(stream, bytes).await?;
        }
    }
    Ok(())
}

/// Reads a frame's body into `body` (region memory): what the connection's buffer already holds, then the
/// rest of a big one straight from the socket, so the kernel copies it into place rather than into the
/// buffer for a second copy. Small bodies still come through the buffer: several per system call.
async fn read_body_into<S: AsyncRead + Unpin>(stream: &mut BufReader<S>, body: &mut [u8]) -> std::io::Result<()> {
    let buffered = stream.buffer().len().min(body.len());
    if body.len() - buffered < DIRECT_READ {
        return stream.read_exact(body).await.map(drop);
    }
    body[..buffered].copy_from_slice(&stream.buffer()[..buffered]);
    std::pin::Pin::new(&mut *stream).consume(buffered);
    stream.get_mut().read_exact(&mut body[buffered..]).await.map(drop)
}

/// Asks the target to confirm everything before it on this stream is done, handing it `notification`
/// (empty: none) once it is.
async fn flush(stream: &mut Connection, request: u64, notification: &[u8]) -> Result<(), TransferError> {
    let frame = TransferFrame::control(FrameKind::Flush, request, notification.len() as u64);
    write_frame(stream, frame, notification).await?;
    wire::expect(stream, FrameKind::Done, "Done").await.map(|_| ())
}

/// Cuts `ranges` into pieces over `streams` streams, each getting about the same bytes, in order.
fn split(ranges: &[Range], total: u64, streams: usize) -> Vec<Vec<Piece<'_>>> {
    let streams = streams.max(1);
    let share = total.div_ceil(streams as u64).max(MIN_PIECE);
    let mut parts: Vec<Vec<Piece>> = (0..streams).map(|_| Vec::new()).collect();
    let (mut stream, mut filled) = (0usize, 0u64);
    for range in ranges {
        let mut at = 0;
        while at < range.local.len {
            // The last stream takes whatever rounding left over.
            let room = if stream + 1 < streams { share - filled } else { u64::MAX };
            let len = (range.local.len - at).min(room);
            parts[stream].push(Piece { range, at, len });
            at += len;
            filled += len;
            if filled >= share && stream + 1 < streams {
                (stream, filled) = (stream + 1, 0);
            }
        }
    }
    parts
}

async fn open(inner: &Inner, addr: &str) -> Result<(SealedStream<TcpStream>, AgentMetadata), TransferError> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (metadata, ciphers) = wire::initiate(&mut stream, inner.id, inner.key.as_ref()).await?;
    stream.flush().await?;
    Ok((SealedStream::new(stream, ciphers), metadata))
}
