//! The cluster secret: what lets a process into a cluster and keeps strangers out of it.
//!
//! One 32-byte key, made by `dynamo keygen`, is given to every role (`--cluster-key-file`,
//! `DYNAMO_CLUSTER_KEY`). From it BLAKE3 derives one subkey per use, so a key's use on one plane says nothing
//! about another's. Every message of the request and event planes is sealed with XChaCha20-Poly1305 under its
//! plane's subkey: encrypted (prompts, outputs and block hashes are unreadable on the wire) and authenticated
//! together with what frames it (its direction on the request plane; topic, publisher id and sequence number
//! on the event plane), so a stranger can neither read a message, nor forge one, nor pass one off as another
//! worker's or as the other direction's. Nonces are a random 16-byte prefix per sealer and a counter, never
//! repeated under one key.
//!
//! Why not ZMQ CURVE: the vendored libzmq is built without libsodium, so it has no CURVE; and one shared
//! secret, which an operator copies like an SSH key, is what bare-metal clusters are set up with. Its limit:
//! every holder of the key is trusted alike (a member could speak for another member), and a captured message
//! replayed on the same plane is accepted again (it reveals and forges nothing, but costs a worker the work).
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::TryRngCore;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
/// What sealing adds to a message.
pub const SEAL_OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the cluster key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin} is not a cluster key: expected {} hexadecimal digits (make one with `dynamo keygen`)", KEY_BYTES * 2)]
    Malformed { origin: String },
    #[error("no random bytes from the system for a key: {0}")]
    Random(String),
}

/// The cluster secret. Never printed: `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; KEY_BYTES]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(…)")
    }
}

/// Which plane a subkey seals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    Request,
    Event,
}

impl ClusterKey {
    /// A new key from the operating system's randomness.
    pub fn generate() -> Result<Self, TrustError> {
        let mut key = [0u8; KEY_BYTES];
        rand::rngs::OsRng.try_fill_bytes(&mut key).map_err(|e| TrustError::Random(e.to_string()))?;
        Ok(Self(key))
    }

    /// Reads a key written as hexadecimal (surrounding whitespace allowed), as `dynamo keygen` writes it.
    pub fn parse(text: &str, origin: &str) -> Result<Self, TrustError> {
        let malformed = || TrustError::Malformed { origin: origin.to_string() };
        let text = text.trim().as_bytes();
        if text.len() != KEY_BYTES * 2 {
            return Err(malformed());
        }
        let mut key = [0u8; KEY_BYTES];
        for (byte, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| malformed())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| malformed())?;
        }
        Ok(Self(key))
    }

    pub fn read(path: &Path) -> Result<Self, TrustError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TrustError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A tag over a discovery record's bytes that only holders of the key can make.
    pub fn sign(&self, record: &[u8]) -> [u8; 32] {
        let key = blake3::derive_key("dynamo 2026 discovery record v1", &self.0);
        *blake3::keyed_hash(&key, record).as_bytes()
    }

    /// Whether `tag` is this key's over `record` (in constant time).
    pub fn verify(&self, record: &[u8], tag: &[u8]) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.sign(record)[..], tag).into()
    }

    /// The sealer of one plane's messages.
    pub fn seal(&self, plane: Plane) -> Seal {
        let context = match plane {
            Plane::Request => "dynamo 2026 request plane v1",
            Plane::Event => "dynamo 2026 event plane v1",
        };
        Seal::new(&blake3::derive_key(context, &self.0))
    }
}

/// Seals and opens one plane's messages: `nonce ‖ ciphertext ‖ tag`.
pub struct Seal {
    cipher: XChaCha20Poly1305,
    prefix: [u8; 16],
    counter: AtomicU64,
}

/// A message that was not sealed with this cluster's key (or was changed on the way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a message not sealed with this cluster's key (a peer with another --cluster-key-file, or none)")]
pub struct Unsealed;

impl Seal {
    fn new(key: &[u8; KEY_BYTES]) -> Self {
        let prefix: [u8; 16] = rand::random();
        Self { cipher: XChaCha20Poly1305::new(key.into()), prefix, counter: AtomicU64::new(0) }
    }

    /// `plain`, encrypted and bound to `context` (sent alongside, or known to both ends).
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        nonce[..16].copy_from_slice(&self.prefix);
        nonce[16..].copy_from_slice(&self.counter.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut body = out.split_off(NONCE_BYTES);
        // Encryption into a Vec only fails when the buffer cannot grow; the tag's room is reserved above.
        if self.cipher.encrypt_in_place(XNonce::from_slice(&nonce), context, &mut body).is_err() {
            return Vec::new();
        }
        out.extend_from_slice(&body);
        out
    }

    /// The plain message, if `sealed` was sealed by this cluster under `context` and not changed since.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Unsealed> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Unsealed);
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let mut plain = body.to_vec();
        self.cipher.decrypt_in_place(XNonce::from_slice(nonce), context, &mut plain).map_err(|_| Unsealed)?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_through_its_text_and_bad_text_is_refused() {
        let key = ClusterKey::generate().unwrap();
        assert_eq!(ClusterKey::parse(&format!("  {}\n", key.to_hex()), "test").unwrap(), key);
        assert_ne!(ClusterKey::generate().unwrap(), key);
        for bad in ["", "abc", &"zz".repeat(32), &"a".repeat(63), &"é".repeat(32)] {
            let error = ClusterKey::parse(bad, "the file").unwrap_err();
            assert!(error.to_string().contains("dynamo keygen"), "{error}");
        }
        assert_eq!(format!("{key:?}"), "ClusterKey(…)");
    }

    #[test]
    fn sealed_messages_open_only_with_the_same_key_plane_and_context() {
        let key = ClusterKey::generate().unwrap();
        let (request, event) = (key.seal(Plane::Request), key.seal(Plane::Event));
        let sealed = request.seal(b"to worker", b"the prompt");
        assert_eq!(sealed.len(), b"the prompt".len() + SEAL_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"prompt"), "the text is not visible");
        assert_eq!(key.seal(Plane::Request).open(b"to worker", &sealed).unwrap(), b"the prompt");
        assert_eq!(request.open(b"to router", &sealed), Err(Unsealed), "another context");
        assert_eq!(event.open(b"to worker", &sealed), Err(Unsealed), "another plane");
        let stranger = ClusterKey::generate().unwrap().seal(Plane::Request);
        assert_eq!(stranger.open(b"to worker", &sealed), Err(Unsealed), "another key");
        for at in 0..sealed.len() {
            let mut changed = sealed.clone();
            changed[at] ^= 1;
            assert_eq!(request.open(b"to worker", &changed), Err(Unsealed), "a flipped bit at {at}");
        }
        assert_eq!(request.open(b"to worker", &sealed[..10]), Err(Unsealed));
        assert_ne!(request.seal(b"c", b"same"), request.seal(b"c", b"same"), "a fresh nonce each time");
    }
}
