//! The cluster secret: what lets a process into a cluster and keeps strangers out of it.
//!
//! One 32-byte key, made by `dynamo keygen`, is given to every role (`--cluster-key-file`,
//! `DYNAMO_CLUSTER_KEY`). From it BLAKE3 derives one subkey per use, so a key's use on one plane says nothing
//! about another's. Every message of the request and event planes is sealed with AES-256-GCM under its
//! plane's subkey: encrypted (prompts, outputs and block hashes are unreadable on the wire) and authenticated
//! together with what frames it (its direction on the request plane; topic, publisher id and sequence number
//! on the event plane), so a stranger can neither read a message, nor forge one, nor pass one off as another
//! worker's or as the other direction's.
//!
//! The cipher is AES-256-GCM, `ring`'s (`Cipher`): with the AES and carry-less multiply instructions every
//! server CPU has, a small message seals in about 0.2 µs (RustCrypto's aes-gcm 0.4, XChaCha20-Poly1305
//! 2.5-3 µs), and bulk data at 6.5 GB/s a core (aes-gcm 1.2), which the transfer layer's streams need. GCM's 96-bit nonces must never repeat under a key, so each sealer draws a random 16-byte
//! salt, seals under a key derived from the plane's subkey and that salt, and counts its messages as nonces;
//! the salt travels in each message, and an opener keeps the keys of the salts it has opened with.
//!
//! A captured message sent again is refused: every receiver keeps a `Seen` window per sender (salt) over the
//! message numbers it opened, so an old request is not run twice and an old stream chunk does not repeat
//! tokens. The window is wide (`WINDOW` numbers) because one sender's numbers reach a receiver over several
//! connections (a router's watch and its planner's), a little out of order; a receiver remembers the last
//! `SENDERS` senders, far more than talk to one process.
//!
//! Why not ZMQ CURVE: the vendored libzmq is built without libsodium, so it has no CURVE; and one shared
//! secret, which an operator copies like an SSH key, is what bare-metal clusters are set up with. Its limit:
//! every holder of the key is trusted alike (a member could speak for another member).
use rand::TryRngCore;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const KEY_BYTES: usize = 32;
const SALT_BYTES: usize = 16;
const COUNTER_BYTES: usize = 8;
const HEADER_BYTES: usize = SALT_BYTES + COUNTER_BYTES;
pub const TAG_BYTES: usize = 16;
/// What sealing adds to a message.
pub const SEAL_OVERHEAD: usize = HEADER_BYTES + TAG_BYTES;
/// Senders' keys an opener keeps: a router hears one sealer per worker and plane.
const OPENERS: usize = 1024;
/// Senders a receiver remembers the numbers of.
const SENDERS: usize = 1024;
/// How far back of the newest number from a sender a message is still taken (once).
const WINDOW: u64 = 8192;

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
        unhex(text.trim()).map(Self).ok_or_else(|| TrustError::Malformed { origin: origin.to_string() })
    }

    pub fn read(path: &Path) -> Result<Self, TrustError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TrustError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A tag over a discovery record's bytes that only holders of the key can make, in hex.
    pub fn sign(&self, record: &[u8]) -> String {
        hex(self.tag(record).as_bytes())
    }

    /// Whether `tag` (hex) is this key's over `record`, compared in constant time.
    pub fn verify(&self, record: &[u8], tag: &str) -> bool {
        let Some(tag) = unhex::<32>(tag) else { return false };
        subtle::ConstantTimeEq::ct_eq(&self.tag(record).as_bytes()[..], &tag[..]).into()
    }

    fn tag(&self, record: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&blake3::derive_key("dynamo 2026 discovery record v1", &self.0), record)
    }

    /// What `role` ("initiator" or "target") of a transfer connection answers to the other side's `nonce`,
    /// as agent `agent`: only holders of the key can make it, and it is good for that connection only.
    pub fn transfer_proof(&self, role: &str, nonce: &[u8], agent: u64) -> [u8; 32] {
        let key = blake3::derive_key("dynamo 2026 transfer handshake v1", &self.0);
        let mut hasher = blake3::Hasher::new_keyed(&key);
        hasher.update(role.as_bytes()).update(&[0]).update(nonce).update(&agent.to_be_bytes());
        *hasher.finalize().as_bytes()
    }

    /// Whether `proof` is `transfer_proof(role, nonce, agent)`, compared in constant time.
    pub fn verify_transfer_proof(&self, role: &str, nonce: &[u8], agent: u64, proof: &[u8]) -> bool {
        proof.len() == 32 && subtle::ConstantTimeEq::ct_eq(&self.transfer_proof(role, nonce, agent)[..], proof).into()
    }

    /// The ciphers of one transfer connection after its handshake, `[to the target, to the initiator]`, from the
    /// key and both sides' nonces: fresh for every connection, so each direction may number from 0.
    pub fn transfer_ciphers(&self, initiator_nonce: &[u8], target_nonce: &[u8]) -> [Cipher; 2] {
        let key = blake3::derive_key("dynamo 2026 transfer stream v1", &self.0);
        let direction = |towards: &str| {
            let mut hasher = blake3::Hasher::new_keyed(&key);
            hasher.update(towards.as_bytes()).update(&[0]).update(initiator_nonce).update(&[0]).update(target_nonce);
            Cipher::new(hasher.finalize().as_bytes())
        };
        [direction("to the target"), direction("to the initiator")]
    }

    /// The sealer of one plane's messages.
    pub fn seal(&self, plane: Plane) -> Seal {
        let context = match plane {
            Plane::Request => "dynamo 2026 request plane v1",
            Plane::Event => "dynamo 2026 event plane v1",
        };
        Seal::new(blake3::derive_key(context, &self.0))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `N` bytes written as `2N` hexadecimal digits.
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut bytes = [0u8; N];
    for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(bytes)
}

/// Seals and opens one plane's messages: `salt ‖ counter ‖ ciphertext ‖ tag`.
pub struct Seal {
    plane_key: [u8; KEY_BYTES],
    salt: [u8; SALT_BYTES],
    cipher: Cipher,
    counter: AtomicU64,
    /// Ciphers of the senders' salts that opened a message: a stranger's salts never get in.
    openers: Mutex<lru::LruCache<[u8; SALT_BYTES], Cipher>>,
}

/// Why a sealed message was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unopened {
    /// Not sealed with this cluster's key, or changed on the way.
    #[error("a message not sealed with this cluster's key (a peer with another --cluster-key-file, or none)")]
    Unsealed,
    /// Opened before: a copy sent again, by someone who captured it.
    #[error("a sealed message received before, sent again (a replay)")]
    Replayed,
}

/// The messages one receiver has opened, per sender: what makes a replay visible.
pub struct Seen {
    senders: lru::LruCache<([u8; SALT_BYTES], u64), Window>,
}

impl Default for Seen {
    fn default() -> Self {
        Self { senders: lru::LruCache::new(NonZeroUsize::new(SENDERS).unwrap_or(NonZeroUsize::MIN)) }
    }
}

/// The newest number from one sender and which of the `WINDOW` before it have arrived (a bit per number,
/// at `number % WINDOW`).
struct Window {
    newest: u64,
    arrived: Box<[u64; (WINDOW / 64) as usize]>,
}

impl Window {
    fn new() -> Self {
        Self { newest: 0, arrived: Box::new([0; (WINDOW / 64) as usize]) }
    }

    fn bit(number: u64) -> (usize, u64) {
        let at = number % WINDOW;
        ((at / 64) as usize, 1 << (at % 64))
    }

    /// Whether `number` arrives for the first time (and is now marked).
    fn first_time(&mut self, number: u64) -> bool {
        if number > self.newest {
            if number - self.newest >= WINDOW {
                self.arrived.fill(0);
            } else {
                // Each bit from here to `number` last stood for a number a window older.
                for newer in self.newest + 1..=number {
                    let (word, bit) = Self::bit(newer);
                    self.arrived[word] &= !bit;
                }
            }
            self.newest = number;
        } else if self.newest - number >= WINDOW {
            return false;
        }
        let (word, bit) = Self::bit(number);
        let first = self.arrived[word] & bit == 0;
        self.arrived[word] |= bit;
        first
    }
}

/// AES-256-GCM under one key, whose nonces are message numbers: each number must be used once per key.
#[derive(Clone)]
pub struct Cipher(ring::aead::LessSafeKey);

impl Cipher {
    pub fn new(key: &[u8; KEY_BYTES]) -> Self {
        // AES-256-GCM takes any 32 bytes: this cannot fail.
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key).unwrap_or_else(|_| unreachable!());
        Self(ring::aead::LessSafeKey::new(key))
    }

    fn nonce(number: u64) -> ring::aead::Nonce {
        let mut nonce = [0u8; 12];
        nonce[..COUNTER_BYTES].copy_from_slice(&number.to_le_bytes());
        ring::aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts `in_out` in place as message `number`, bound to `context`; returns its tag.
    pub fn seal(&self, number: u64, context: &[u8], in_out: &mut [u8]) -> [u8; TAG_BYTES] {
        let aad = ring::aead::Aad::from(context);
        let mut tag = [0u8; TAG_BYTES];
        // Fails only past GCM's 64 GiB a message; nothing here is near it, and a zero tag never opens.
        if let Ok(sealed) = self.0.seal_in_place_separate_tag(Self::nonce(number), aad, in_out) {
            tag.copy_from_slice(sealed.as_ref());
        }
        tag
    }

    /// Decrypts `in_out` in place if `tag` is its tag as message `number` under `context`.
    pub fn open(&self, number: u64, context: &[u8], in_out: &mut [u8], tag: &[u8]) -> Result<(), Unopened> {
        let tag = ring::aead::Tag::try_from(tag).map_err(|_| Unopened::Unsealed)?;
        let aad = ring::aead::Aad::from(context);
        match self.0.open_in_place_separate_tag(Self::nonce(number), aad, tag, in_out, 0..) {
            Ok(_) => Ok(()),
            Err(_) => Err(Unopened::Unsealed),
        }
    }
}

fn salted_cipher(plane_key: &[u8; KEY_BYTES], salt: &[u8; SALT_BYTES]) -> Cipher {
    let mut material = [0u8; KEY_BYTES + SALT_BYTES];
    material[..KEY_BYTES].copy_from_slice(plane_key);
    material[KEY_BYTES..].copy_from_slice(salt);
    Cipher::new(&blake3::derive_key("dynamo 2026 sealer v1", &material))
}

impl Seal {
    fn new(plane_key: [u8; KEY_BYTES]) -> Self {
        let salt: [u8; SALT_BYTES] = rand::random();
        let openers = lru::LruCache::new(NonZeroUsize::new(OPENERS).unwrap_or(NonZeroUsize::MIN));
        Self {
            cipher: salted_cipher(&plane_key, &salt),
            plane_key,
            salt,
            counter: AtomicU64::new(0),
            openers: Mutex::new(openers),
        }
    }

    /// `plain`, encrypted and bound to `context` (sent alongside, or known to both ends).
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Vec<u8> {
        let number = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&number.to_le_bytes());
        out.extend_from_slice(plain);
        let tag = self.cipher.seal(number, context, &mut out[HEADER_BYTES..]);
        out.extend_from_slice(&tag);
        out
    }

    /// The plain message, if `sealed` was sealed by this cluster under `context`, not changed since, and not
    /// opened before by the receiver whose messages `seen` remembers. `stream` tells apart the streams a
    /// receiver hears from one sender (the event plane's publishers of one process); the request plane has one.
    pub fn open(&self, context: &[u8], sealed: &[u8], seen: &mut Seen, stream: u64) -> Result<Vec<u8>, Unopened> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Unopened::Unsealed);
        }
        let (header, rest) = sealed.split_at(HEADER_BYTES);
        let (body, tag) = rest.split_at(rest.len() - TAG_BYTES);
        let (salt, counter) = header.split_at(SALT_BYTES);
        let salt: [u8; SALT_BYTES] = salt.try_into().map_err(|_| Unopened::Unsealed)?;
        // Copied out of the cache (a key schedule, a few hundred bytes), so that many connections' tasks open at
        // once rather than one after another under the lock.
        let cached = self.openers.lock().unwrap_or_else(|p| p.into_inner()).get(&salt).cloned();
        let known = cached.is_some();
        let cipher = cached.unwrap_or_else(|| salted_cipher(&self.plane_key, &salt));
        let number = u64::from_le_bytes(counter.try_into().map_err(|_| Unopened::Unsealed)?);
        let mut plain = body.to_vec();
        cipher.open(number, context, &mut plain, tag)?;
        if !known {
            self.openers.lock().unwrap_or_else(|p| p.into_inner()).put(salt, cipher);
        }
        // Only after the tag held: a stranger's numbers must not move a window.
        if !seen.senders.get_or_insert_mut((salt, stream), Window::new).first_time(number) {
            return Err(Unopened::Replayed);
        }
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

    /// Opens as a receiver that has seen nothing yet.
    fn open_once(seal: &Seal, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Unopened> {
        seal.open(context, sealed, &mut Seen::default(), 0)
    }

    #[test]
    fn sealed_messages_open_only_with_the_same_key_plane_and_context() {
        use Unopened::Unsealed;
        let key = ClusterKey::generate().unwrap();
        let (request, event) = (key.seal(Plane::Request), key.seal(Plane::Event));
        let sealed = request.seal(b"to worker", b"the prompt");
        assert_eq!(sealed.len(), b"the prompt".len() + SEAL_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"prompt"), "the text is not visible");
        assert_eq!(open_once(&key.seal(Plane::Request), b"to worker", &sealed).unwrap(), b"the prompt");
        assert_eq!(open_once(&request, b"to router", &sealed), Err(Unsealed), "another context");
        assert_eq!(open_once(&event, b"to worker", &sealed), Err(Unsealed), "another plane");
        let stranger = ClusterKey::generate().unwrap().seal(Plane::Request);
        assert_eq!(open_once(&stranger, b"to worker", &sealed), Err(Unsealed), "another key");
        for at in 0..sealed.len() {
            let mut changed = sealed.clone();
            changed[at] ^= 1;
            assert_eq!(open_once(&request, b"to worker", &changed), Err(Unsealed), "a flipped bit at {at}");
        }
        assert_eq!(open_once(&request, b"to worker", &sealed[..10]), Err(Unsealed));
        assert_ne!(request.seal(b"c", b"same"), request.seal(b"c", b"same"), "a fresh nonce each time");
        // A stranger's salts never take an opener's place.
        assert_eq!(open_once(&request, b"to worker", &sealed).unwrap(), b"the prompt");
        for _ in 0..10 {
            let _ = open_once(&request, b"to worker", &stranger.seal(b"to worker", b"x"));
        }
        assert_eq!(request.openers.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_message_opens_once_per_receiver_however_late_or_out_of_order_it_comes() {
        let key = ClusterKey::generate().unwrap();
        let (sender, receiver) = (key.seal(Plane::Request), key.seal(Plane::Request));
        let messages: Vec<Vec<u8>> = (0..3 * WINDOW).map(|i| sender.seal(b"c", &i.to_le_bytes())).collect();
        let (mut seen, mut other) = (Seen::default(), Seen::default());
        // Out of order within the window: every one opens, once.
        for i in [5, 3, 4, 0, 1, 2] {
            assert!(receiver.open(b"c", &messages[i], &mut seen, 0).is_ok(), "message {i}");
        }
        for (i, message) in messages.iter().enumerate().take(6) {
            assert_eq!(receiver.open(b"c", message, &mut seen, 0), Err(Unopened::Replayed), "message {i} again");
        }
        // Another receiver (a second watch in the same process), or another stream of the same sender, is apart.
        assert!(receiver.open(b"c", &messages[0], &mut other, 0).is_ok());
        assert!(receiver.open(b"c", &messages[0], &mut seen, 1).is_ok());
        // Far ahead: what was skipped still opens while inside the window, and what fell out of it never does.
        let last = (3 * WINDOW - 1) as usize;
        assert!(receiver.open(b"c", &messages[last], &mut seen, 0).is_ok());
        assert!(receiver.open(b"c", &messages[last - 10], &mut seen, 0).is_ok());
        assert_eq!(receiver.open(b"c", &messages[last - 10], &mut seen, 0), Err(Unopened::Replayed));
        let fallen = last - WINDOW as usize;
        assert_eq!(receiver.open(b"c", &messages[fallen], &mut seen, 0), Err(Unopened::Replayed), "too old");
        assert!(receiver.open(b"c", &messages[fallen + 1], &mut seen, 0).is_ok(), "the oldest still inside");
        // A number skipped in a jump of less than the window is not mistaken for one seen a window ago.
        let mut jumped = Seen::default();
        assert!(receiver.open(b"c", &messages[1], &mut jumped, 0).is_ok());
        assert!(receiver.open(b"c", &messages[1 + WINDOW as usize - 1], &mut jumped, 0).is_ok());
        assert!(receiver.open(b"c", &messages[WINDOW as usize + 1], &mut jumped, 0).is_ok(), "shares 1's bit");
        // A forged message does not move the window: the one it claims to be still opens.
        let mut forged = messages[last - 20].clone();
        let tag_at = forged.len() - 1;
        forged[tag_at] ^= 1;
        assert_eq!(receiver.open(b"c", &forged, &mut seen, 0), Err(Unopened::Unsealed));
        assert!(receiver.open(b"c", &messages[last - 20], &mut seen, 0).is_ok());
    }
}
