//! A tcp transfer connection's bytes after a keyed handshake: encrypted and authenticated, so KV pages and
//! embeddings (from which prompts can be read back) cross the network unreadable, and nobody on the path can
//! change or inject a frame (a header naming another range, a forged notification).
//!
//! The bytes go in records of at most `RECORD` plain bytes: `length (u32 LE) ‖ ciphertext ‖ tag`, sealed
//! with AES-256-GCM (`trust::Cipher`) under one key per direction that the cluster key and both sides'
//! handshake nonces make (`ClusterKey::transfer_ciphers`): fresh for each connection, so each direction numbers
//! its records from 0 as their nonces, and a record cannot be dropped, repeated, reordered or moved to another
//! connection without the next one failing to open. The length is authenticated as the record's context.
//!
//! Why records of our own rather than TLS: rustls has no pre-shared-key mode, and certificates would be a
//! second secret to distribute; the key both sides already proved is enough to key the stream.
//!
//! A write returns once its record is in the kernel (as a plain socket's does), so the frame code above,
//! which never flushes, works unchanged over either. A write left pending finishes the record it started on
//! the next call, which must pass the same bytes again (as `write_all` and the frame writers do).
use crate::core::trust::{Cipher, TAG_BYTES};
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Plain bytes a record carries at most: big enough that a record's header, tag and system call are noise
/// next to its bytes, small enough to stay in cache between the copy and the cipher.
pub const RECORD: usize = 64 * 1024;
const LENGTH_BYTES: usize = 4;
const OVERHEAD: usize = LENGTH_BYTES + TAG_BYTES;

/// The two ciphers of one connection, as this side uses them.
pub struct StreamCiphers {
    pub send: Cipher,
    pub receive: Cipher,
}

/// A byte stream, sealed when it was given ciphers, passed through as it is otherwise (an open cluster).
pub struct SealedStream<S> {
    inner: S,
    sealing: Option<Box<Sealing>>,
}

struct Sealing {
    ciphers: StreamCiphers,
    sent: u64,
    /// The record being written, from `written` on, and how many of the caller's bytes it carries.
    out: Vec<u8>,
    written: usize,
    carries: usize,
    received: u64,
    /// Bytes read from the peer: an opened record's plain bytes at `plain`, then whatever came after it.
    raw: Box<[u8]>,
    filled: usize,
    plain: std::ops::Range<usize>,
    /// Where the next record starts in `raw` once the plain bytes are all read.
    next: usize,
}

fn invalid(why: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

impl<S> SealedStream<S> {
    pub fn new(inner: S, ciphers: Option<StreamCiphers>) -> Self {
        let sealing = ciphers.map(|ciphers| {
            Box::new(Sealing {
                ciphers,
                sent: 0,
                out: Vec::with_capacity(RECORD + OVERHEAD),
                written: 0,
                carries: 0,
                received: 0,
                // Room for a whole record and the start of the next, so one read can take several small ones.
                raw: vec![0; 2 * (RECORD + OVERHEAD)].into_boxed_slice(),
                filled: 0,
                plain: 0..0,
                next: 0,
            })
        });
        Self { inner, sealing }
    }
}

impl Sealing {
    /// Seals the first `RECORD` bytes of `bufs` into `out`.
    fn seal(&mut self, bufs: &[IoSlice<'_>]) {
        self.out.clear();
        self.out.extend_from_slice(&[0; LENGTH_BYTES]);
        for buf in bufs {
            let room = RECORD + LENGTH_BYTES - self.out.len();
            self.out.extend_from_slice(&buf[..buf.len().min(room)]);
        }
        let carries = self.out.len() - LENGTH_BYTES;
        let length = (carries as u32).to_le_bytes();
        self.out[..LENGTH_BYTES].copy_from_slice(&length);
        let tag = self.ciphers.send.seal(self.sent, &length, &mut self.out[LENGTH_BYTES..]);
        self.out.extend_from_slice(&tag);
        self.sent += 1;
        self.written = 0;
        self.carries = carries;
    }

    /// Opens the record at the start of `raw[next..filled]` if it is all there: `Ok(false)` when more bytes
    /// are needed first.
    fn open_next(&mut self) -> std::io::Result<bool> {
        // What is left of the last record goes to the front, so the next one has room behind it.
        if self.next > 0 {
            self.raw.copy_within(self.next..self.filled, 0);
            self.filled -= self.next;
            self.next = 0;
        }
        if self.filled < LENGTH_BYTES {
            return Ok(false);
        }
        let length: [u8; LENGTH_BYTES] = self.raw[..LENGTH_BYTES].try_into().map_err(|_| invalid("short record"))?;
        let carries = u32::from_le_bytes(length) as usize;
        if carries > RECORD {
            return Err(invalid("a sealed transfer record longer than any this project sends"));
        }
        let end = LENGTH_BYTES + carries + TAG_BYTES;
        if self.filled < end {
            return Ok(false);
        }
        let (body, tag) = self.raw[LENGTH_BYTES..end].split_at_mut(carries);
        self.ciphers.receive.open(self.received, &length, body, tag).map_err(|_| {
            invalid("a transfer record that does not open: changed, replayed or injected on the way, or another key")
        })?;
        self.received += 1;
        self.plain = LENGTH_BYTES..LENGTH_BYTES + carries;
        self.next = end;
        Ok(true)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SealedStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(sealing) = this.sealing.as_deref_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            if !sealing.plain.is_empty() {
                let take = sealing.plain.len().min(buf.remaining());
                buf.put_slice(&sealing.raw[sealing.plain.start..sealing.plain.start + take]);
                sealing.plain.start += take;
                return Poll::Ready(Ok(()));
            }
            if sealing.open_next()? {
                continue;
            }
            let mut room = ReadBuf::new(&mut sealing.raw[sealing.filled..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut room))?;
            let got = room.filled().len();
            if got == 0 {
                // A clean end only between records.
                return Poll::Ready(match sealing.filled {
                    0 => Ok(()),
                    _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
                });
            }
            sealing.filled += got;
        }
    }
}

impl<S: AsyncWrite + Unpin> SealedStream<S> {
    /// Writes out what is left of the record being written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some(sealing) = self.sealing.as_deref_mut() else { return Poll::Ready(Ok(())) };
        while sealing.written < sealing.out.len() {
            let wrote = ready!(Pin::new(&mut self.inner).poll_write(cx, &sealing.out[sealing.written..]))?;
            if wrote == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            sealing.written += wrote;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SealedStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let Some(sealing) = this.sealing.as_deref_mut() else {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        };
        // A record left pending carries the front of these same bytes: it is finished, not sealed again.
        if sealing.written == sealing.out.len() {
            if bufs.iter().all(|buf| buf.is_empty()) {
                // Nothing to say: an empty record would be sent and answer the next write with 0.
                return Poll::Ready(Ok(0));
            }
            sealing.seal(bufs);
        }
        ready!(this.poll_drain(cx))?;
        let carried = this.sealing.as_deref().map_or(0, |sealing| sealing.carries);
        Poll::Ready(Ok(carried))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::trust::ClusterKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair(key: &ClusterKey) -> (StreamCiphers, StreamCiphers) {
        let [to_target, to_initiator] = key.transfer_ciphers(&[1; 32], &[2; 32]);
        let [to_target2, to_initiator2] = key.transfer_ciphers(&[1; 32], &[2; 32]);
        (
            StreamCiphers { send: to_target, receive: to_initiator },
            StreamCiphers { send: to_initiator2, receive: to_target2 },
        )
    }

    #[tokio::test]
    async fn bytes_cross_sealed_whatever_the_write_and_read_sizes() {
        let key = ClusterKey::generate().unwrap();
        let (initiator, target) = pair(&key);
        // A small pipe buffer, so writes go pending part way through a record.
        let (a, b) = tokio::io::duplex(10_000);
        let (mut a, mut b) = (SealedStream::new(a, Some(initiator)), SealedStream::new(b, Some(target)));
        let message: Vec<u8> = (0..3 * RECORD + 12_345).map(|i| (i % 251) as u8).collect();
        let sent = message.clone();
        let writer = tokio::spawn(async move {
            // An empty write says nothing and costs the next one nothing.
            assert_eq!(a.write(b"").await.unwrap(), 0);
            a.write_all(b"hello").await.unwrap();
            let mut slices = [IoSlice::new(&sent[..100]), IoSlice::new(&sent[100..])];
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let wrote = a.write_vectored(slices).await.unwrap();
                IoSlice::advance_slices(&mut slices, wrote);
            }
            a.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 7_777];
        loop {
            let n = b.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        assert_eq!(&got[..5], b"hello");
        assert!(got[5..] == message[..], "the bytes arrive whole and in order");
    }

    /// What the wire carries when `plain` is written sealed.
    async fn on_the_wire(ciphers: StreamCiphers, plain: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut sealed = SealedStream::new(&mut wire, Some(ciphers));
        sealed.write_all(plain).await.unwrap();
        sealed.flush().await.unwrap();
        drop(sealed);
        wire
    }

    async fn read_all(ciphers: Option<StreamCiphers>, wire: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut got = Vec::new();
        SealedStream::new(wire, ciphers).read_to_end(&mut got).await.map(|_| got)
    }

    #[tokio::test]
    async fn what_crosses_is_unreadable_and_any_change_is_refused() {
        let key = ClusterKey::generate().unwrap();
        let plain = b"the KV of a secret prompt".repeat(20_000);
        let wire = on_the_wire(pair(&key).0, &plain).await;
        assert!(!wire.windows(6).any(|w| w == b"secret"), "plain text on the wire");
        assert_eq!(read_all(Some(pair(&key).1), &wire).await.unwrap(), plain);
        // One flipped bit anywhere, a record dropped, or the stream cut short: refused, never wrong bytes.
        for at in [0, 3, 4, 100, RECORD + 20, wire.len() - 1] {
            let mut changed = wire.clone();
            changed[at] ^= 1;
            assert!(read_all(Some(pair(&key).1), &changed).await.is_err(), "a flipped bit at {at} passed");
        }
        assert!(read_all(Some(pair(&key).1), &wire[RECORD + OVERHEAD..]).await.is_err(), "a record dropped passed");
        assert!(read_all(Some(pair(&key).1), &wire[..wire.len() - 5]).await.is_err(), "a cut stream passed");
        // Another key, or another connection's nonces, opens nothing.
        let other = ClusterKey::generate().unwrap();
        assert!(read_all(Some(pair(&other).1), &wire).await.is_err());
        let [_, other_connection] = key.transfer_ciphers(&[9; 32], &[2; 32]);
        let [to_target, _] = key.transfer_ciphers(&[9; 32], &[2; 32]);
        let ciphers = StreamCiphers { send: to_target, receive: other_connection };
        assert!(read_all(Some(ciphers), &wire).await.is_err());
        // A length past any record is refused before anything is read into it.
        let mut huge = wire.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_all(Some(pair(&key).1), &huge).await.is_err());
        // Without a key the stream passes through.
        assert_eq!(read_all(None, &plain).await.unwrap(), plain);
    }

    proptest::proptest! {
        #![proptest_config(crate::core::protocol::fuzz::config(128))]

        /// A peer's arbitrary bytes, or a sealed stream with one byte changed, are refused: never a panic,
        /// never a byte handed up that the key did not seal.
        #[test]
        fn arbitrary_or_altered_bytes_never_open(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..2048),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let key = ClusterKey::generate().unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                assert!(read_all(Some(pair(&key).1), &bytes).await.is_err());
                let mut wire = on_the_wire(pair(&key).0, &bytes).await;
                let at = at.index(wire.len());
                wire[at] ^= flip;
                assert!(read_all(Some(pair(&key).1), &wire).await.is_err(), "a changed byte at {at} opened");
            });
        }
    }
}
