//! Frames on a transfer connection (`protocol::transfer`) read and written over any byte stream, and the
//! handshake both backends open with: the target's metadata, and proof of the cluster key both ways.
use super::sealed::StreamCiphers;
use super::{Inner, TransferError};
use crate::core::protocol::transfer::{
    AgentMetadata, FrameKind, HEADER_BYTES, MAX_CONTROL_BYTES, NONCE_BYTES, TransferFrame, TransferFrameError,
};
use crate::core::trust::ClusterKey;
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A frame and its body in one write.
pub async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frame: TransferFrame,
    body: &[u8],
) -> std::io::Result<()> {
    let header = frame.encode();
    write_all_vectored(stream, &mut [IoSlice::new(&header), IoSlice::new(body)]).await
}

/// Frames per vectored write: two slices each, under the kernel's 1024 (`IOV_MAX`).
const FRAMES_PER_WRITE: usize = 256;

/// Many frames with their bodies, in as few writes as the kernel takes: small bodies (a 6 KiB KV page)
/// cost a system call each otherwise.
pub async fn write_frames<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frames: &[(TransferFrame, &[u8])],
) -> std::io::Result<()> {
    for batch in frames.chunks(FRAMES_PER_WRITE) {
        let headers: Vec<_> = batch.iter().map(|(frame, _)| frame.encode()).collect();
        let mut slices: Vec<IoSlice> = headers
            .iter()
            .zip(batch)
            .flat_map(|(header, (_, body))| [IoSlice::new(header), IoSlice::new(body)])
            .collect();
        write_all_vectored(stream, &mut slices).await?;
    }
    Ok(())
}

async fn write_all_vectored<S: AsyncWrite + Unpin>(
    stream: &mut S,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let written = stream.write_vectored(slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// The next frame's header, `None` at a clean end of stream.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<TransferFrame>, TransferError> {
    let mut header = [0u8; HEADER_BYTES];
    match stream.read_exact(&mut header).await {
        Ok(_) => Ok(Some(TransferFrame::decode(&header)?)),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// A control frame's body (bounded by the header's decode).
pub async fn read_body<S: AsyncRead + Unpin>(stream: &mut S, frame: &TransferFrame) -> Result<Vec<u8>, TransferError> {
    let len = frame.body_len().min(MAX_CONTROL_BYTES) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// The next frame, which must be of `kind` (a `Failed` from the peer becomes its reason), with its body.
pub async fn expect<S: AsyncRead + Unpin>(
    stream: &mut S,
    kind: FrameKind,
    expected: &'static str,
) -> Result<(TransferFrame, Vec<u8>), TransferError> {
    let frame = read_header(stream).await?.ok_or(TransferError::Closed)?;
    if frame.kind == FrameKind::Failed {
        let reason = read_body(stream, &frame).await?;
        return Err(TransferError::Refused(String::from_utf8_lossy(&reason).into_owned()));
    }
    if frame.kind != kind || frame.kind.carries_data() {
        return Err(TransferFrameError::Unexpected { got: frame.kind, expected }.into());
    }
    let body = read_body(stream, &frame).await?;
    Ok((frame, body))
}

fn nonce() -> [u8; NONCE_BYTES] {
    rand::random()
}

/// Opens a connection as the initiator: says who it is, learns the target's metadata, and proves the
/// cluster key when there is one (and checks the target's proof); with a key, the ciphers the connection's
/// bytes may be sealed with from here on (`sealed`).
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    agent: u64,
    key: Option<&ClusterKey>,
) -> Result<(AgentMetadata, Option<StreamCiphers>), TransferError> {
    let mine = nonce();
    write_frame(stream, TransferFrame::control(FrameKind::Hello, agent, NONCE_BYTES as u64), &mine).await?;
    let (_, body) = expect(stream, FrameKind::Metadata, "the target's metadata").await?;
    let metadata = AgentMetadata::from_bytes(&body)?;
    match key {
        None if !metadata.nonce.is_empty() => Err(TransferError::Unauthenticated(
            "the peer belongs to a cluster with a key; give this process the same --cluster-key-file".into(),
        )),
        None => Ok((metadata, None)),
        Some(key) => {
            if !key.verify_transfer_proof("target", &mine, metadata.agent, &metadata.proof) {
                return Err(TransferError::Unauthenticated(
                    "the peer did not prove this cluster's key (another --cluster-key-file, or none)".into(),
                ));
            }
            let proof = key.transfer_proof("initiator", &metadata.nonce, agent);
            write_frame(stream, TransferFrame::control(FrameKind::Proof, agent, proof.len() as u64), &proof).await?;
            expect(stream, FrameKind::Done, "the target's acceptance").await?;
            let [send, receive] = key.transfer_ciphers(&mine, &metadata.nonce);
            Ok((metadata, Some(StreamCiphers { send, receive })))
        }
    }
}

/// Answers a connection's opening as the target; returns the initiator's agent id once it may send data (and,
/// with a key, the ciphers its bytes may be sealed with from here on). A connection that has not proven
/// itself within the transfer timeout is dropped: strangers must not hold descriptors and tasks by saying
/// nothing.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    inner: &Inner,
) -> Result<(u64, Option<StreamCiphers>), TransferError> {
    let timeout = inner.settings.timeout;
    tokio::time::timeout(timeout, accept_now(stream, inner)).await.unwrap_or(Err(TransferError::Timeout(timeout)))
}

async fn accept_now<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    inner: &Inner,
) -> Result<(u64, Option<StreamCiphers>), TransferError> {
    let (hello, theirs) = expect(stream, FrameKind::Hello, "Hello").await?;
    if theirs.len() != NONCE_BYTES {
        return Err(TransferError::Refused(format!(
            "a Hello carries a {NONCE_BYTES}-byte nonce, not {}",
            theirs.len()
        )));
    }
    let initiator = hello.request;
    let (nonce, proof) = match &inner.key {
        Some(key) => (nonce().to_vec(), key.transfer_proof("target", &theirs, inner.id).to_vec()),
        None => (Vec::new(), Vec::new()),
    };
    let metadata = AgentMetadata { nonce: nonce.clone(), proof, ..inner.metadata() };
    let body = metadata.to_bytes();
    write_frame(stream, TransferFrame::control(FrameKind::Metadata, inner.id, body.len() as u64), &body).await?;
    if let Some(key) = &inner.key {
        let refuse = "not a member of this cluster: no proof of its key";
        let (frame, proof) = match expect(stream, FrameKind::Proof, "a proof of the cluster key").await {
            Ok(proven) => proven,
            Err(error) => {
                let _ = fail(stream, 0, refuse).await;
                return Err(error);
            }
        };
        if frame.request != initiator || !key.verify_transfer_proof("initiator", &nonce, initiator, &proof) {
            let _ = fail(stream, 0, refuse).await;
            return Err(TransferError::Unauthenticated(format!("agent {initiator:016x}: {refuse}")));
        }
        write_frame(stream, TransferFrame::control(FrameKind::Done, 0, 0), &[]).await?;
        let [receive, send] = key.transfer_ciphers(&theirs, &nonce);
        return Ok((initiator, Some(StreamCiphers { send, receive })));
    }
    Ok((initiator, None))
}

/// Tells the peer why `request` (0: the connection) cannot be done.
pub async fn fail<S: AsyncWrite + Unpin>(stream: &mut S, request: u64, why: &str) -> std::io::Result<()> {
    let why = &why.as_bytes()[..why.len().min(MAX_CONTROL_BYTES as usize)];
    write_frame(stream, TransferFrame::control(FrameKind::Failed, request, why.len() as u64), why).await?;
    stream.flush().await
}

/// Sends the initiator's `message` for `request` and waits until the target has taken it.
pub async fn notify<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: u64,
    message: &[u8],
) -> Result<(), TransferError> {
    write_frame(stream, TransferFrame::control(FrameKind::Notify, request, message.len() as u64), message).await?;
    expect(stream, FrameKind::Done, "Done").await.map(|_| ())
}
