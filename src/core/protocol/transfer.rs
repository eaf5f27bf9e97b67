//! The transfer layer's connections (tcp data streams and the same-host shm control socket): a fixed
//! 36-byte frame header, then `len` bytes of body for the kinds that carry one.
//!
//! `magic "DXF1" | kind u8 | flags u8 | reserved u16 | region u32 | request u64 | offset u64 | len u64`, all
//! big-endian. Data frames carry raw bytes (KV pages, embeddings) that the receiver reads straight into the
//! region the header names, after checking the range against what is registered there; every other body is
//! small (`MAX_CONTROL_BYTES`) and msgpack or text.
//!
//! A connection opens with `Hello` (initiator: its agent id in `request`, a 32-byte nonce as body), answered
//! by `Metadata` (the target's `AgentMetadata`, msgpack), then `Proof` both ways when the cluster has a key
//! (each side's keyed hash over the other's nonce). Only then do data frames flow:
//! - `Write` (region, offset, len + that many bytes): put them there;
//! - `Read` (region, offset, len): send them back as one `Data` frame of the same range;
//! - `Flush` (request): answered `Done` once everything before it on this connection is done;
//! - `Notify` (request, body): the initiator's message, delivered to the target's owner after the request's
//!   data landed; answered `Done`;
//! - `Failed` (request, body: why, text): the request cannot be done; the connection stays usable unless the
//!   failure was in framing;
//! - `Nixl` (request, empty): asks for the target's `NixlOffer`, answered by a `Nixl` frame carrying it
//!   (msgpack). Only after the handshake: NIXL's metadata lets its holder write the target's memory.
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"DXF1";
pub const HEADER_BYTES: usize = 36;
/// The most a body other than data may hold: a notification, an error's text, an agent's metadata.
pub const MAX_CONTROL_BYTES: u64 = 256 * 1024;
pub const NONCE_BYTES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Metadata = 2,
    Proof = 3,
    Write = 4,
    Read = 5,
    Data = 6,
    Flush = 7,
    Done = 8,
    Notify = 9,
    Failed = 10,
    Nixl = 11,
}

impl FrameKind {
    const ALL: [FrameKind; 11] = [
        FrameKind::Hello,
        FrameKind::Metadata,
        FrameKind::Proof,
        FrameKind::Write,
        FrameKind::Read,
        FrameKind::Data,
        FrameKind::Flush,
        FrameKind::Done,
        FrameKind::Notify,
        FrameKind::Failed,
        FrameKind::Nixl,
    ];

    /// Whether its body is raw region bytes (bounded by the region) rather than a control message.
    pub fn carries_data(self) -> bool {
        matches!(self, FrameKind::Write | FrameKind::Data)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferFrame {
    pub kind: FrameKind,
    pub region: u32,
    pub request: u64,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferFrameError {
    #[error("not a transfer frame (bad magic {0:02x?}); is something else listening at that address?")]
    Magic([u8; 4]),
    #[error("unknown transfer frame kind {0}")]
    Kind(u8),
    #[error("a {kind:?} frame of {len} bytes is over the {MAX_CONTROL_BYTES}-byte limit for control messages")]
    Oversized { kind: FrameKind, len: u64 },
    #[error("unexpected {got:?} frame: expected {expected}")]
    Unexpected { got: FrameKind, expected: &'static str },
    #[error("unreadable {what}: {reason}")]
    Body { what: &'static str, reason: String },
}

impl TransferFrame {
    /// A frame with no region range (control frames).
    pub fn control(kind: FrameKind, request: u64, len: u64) -> Self {
        Self { kind, region: 0, request, offset: 0, len }
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = self.kind as u8;
        out[8..12].copy_from_slice(&self.region.to_be_bytes());
        out[12..20].copy_from_slice(&self.request.to_be_bytes());
        out[20..28].copy_from_slice(&self.offset.to_be_bytes());
        out[28..36].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a header and checks what can be checked without knowing the regions: magic, kind, and the
    /// size of a control body.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, TransferFrameError> {
        let magic: [u8; 4] = bytes[..4].try_into().unwrap_or_default();
        if magic != MAGIC {
            return Err(TransferFrameError::Magic(magic));
        }
        let kind =
            FrameKind::ALL.into_iter().find(|k| *k as u8 == bytes[4]).ok_or(TransferFrameError::Kind(bytes[4]))?;
        let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let frame = Self {
            kind,
            region: u32::from_be_bytes(bytes[8..12].try_into().unwrap_or_default()),
            request: be64(12),
            offset: be64(20),
            len: be64(28),
        };
        // A Read names a range to send back, so its own body is empty; a data body is bounded by its region.
        let body = if kind == FrameKind::Read { 0 } else { frame.len };
        if !kind.carries_data() && body > MAX_CONTROL_BYTES {
            return Err(TransferFrameError::Oversized { kind, len: frame.len });
        }
        Ok(frame)
    }

    /// Bytes of body that follow this header on the connection.
    pub fn body_len(&self) -> u64 {
        if self.kind == FrameKind::Read { 0 } else { self.len }
    }
}

/// What an agent tells a peer that connects: enough to address its regions and to pick the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    pub agent: u64,
    /// This machine and boot (machine id and boot id): peers with the same one may use shared memory.
    pub host: String,
    /// The abstract unix socket that hands out its regions' memory to same-host peers, if it offers shm.
    pub shm: Option<String>,
    pub regions: Vec<RegionInfo>,
    /// The nonce the connecting peer must prove the cluster key over (empty in an open cluster).
    #[serde(with = "serde_bytes_compat")]
    pub nonce: Vec<u8>,
    /// The agent's proof over the connecting peer's nonce (empty in an open cluster).
    #[serde(with = "serde_bytes_compat")]
    pub proof: Vec<u8>,
}

/// What an agent that runs NIXL gives a proven peer: its NIXL agent's name and metadata (`getLocalMD`: the
/// transport's address and the keys to its registered memory), and where each of its regions starts in its
/// address space, in region order, since NIXL descriptors name addresses rather than regions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NixlOffer {
    pub name: String,
    #[serde(with = "serde_bytes_compat")]
    pub metadata: Vec<u8>,
    pub addresses: Vec<u64>,
}

impl NixlOffer {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data: encoding cannot fail.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TransferFrameError> {
        rmp_serde::from_slice(bytes).map_err(|e| TransferFrameError::Body { what: "NIXL offer", reason: e.to_string() })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub id: u32,
    pub len: u64,
}

impl AgentMetadata {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data with no maps keyed by non-strings: encoding cannot fail.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TransferFrameError> {
        rmp_serde::from_slice(bytes)
            .map_err(|e| TransferFrameError::Body { what: "agent metadata", reason: e.to_string() })
    }
}

/// Byte strings as msgpack bin rather than arrays of integers.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
                Ok(bytes.to_vec())
            }

            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(bytes)
            }
        }
        deserializer.deserialize_byte_buf(Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_frame_round_trips_and_a_control_body_is_bounded() {
        let frame = TransferFrame { kind: FrameKind::Write, region: 3, request: 9, offset: 1 << 40, len: 1 << 33 };
        assert_eq!(TransferFrame::decode(&frame.encode()), Ok(frame));
        let read = TransferFrame { kind: FrameKind::Read, ..frame };
        assert_eq!(read.body_len(), 0, "a read's range is what comes back, not what follows");
        assert_eq!(TransferFrame::decode(&read.encode()), Ok(read));
        let notify = TransferFrame::control(FrameKind::Notify, 9, MAX_CONTROL_BYTES + 1);
        assert!(matches!(TransferFrame::decode(&notify.encode()), Err(TransferFrameError::Oversized { .. })));
        let mut bad = frame.encode();
        bad[4] = 77;
        assert_eq!(TransferFrame::decode(&bad), Err(TransferFrameError::Kind(77)));
        bad[0] = b'X';
        assert!(matches!(TransferFrame::decode(&bad), Err(TransferFrameError::Magic(_))));
    }

    #[test]
    fn metadata_round_trips_and_garbage_is_an_error() {
        let metadata = AgentMetadata {
            agent: 7,
            host: "m:b".into(),
            shm: Some("dynamo-xfer-7".into()),
            regions: vec![RegionInfo { id: 0, len: 4096 }],
            nonce: vec![1; NONCE_BYTES],
            proof: vec![],
        };
        assert_eq!(AgentMetadata::from_bytes(&metadata.to_bytes()), Ok(metadata));
        assert!(AgentMetadata::from_bytes(b"\xc1garbage").is_err());
        let offer = NixlOffer { name: "dynamo-7".into(), metadata: vec![0, 1, 2], addresses: vec![1 << 40, 4096] };
        assert_eq!(NixlOffer::from_bytes(&offer.to_bytes()), Ok(offer));
        assert!(NixlOffer::from_bytes(b"\xc1").is_err());
    }

    proptest! {
        #![proptest_config(crate::core::protocol::fuzz::config(2048))]

        #[test]
        fn any_header_decodes_or_is_refused_without_panicking(bytes in prop::array::uniform32(any::<u8>()), tail in prop::array::uniform4(any::<u8>()), kind in 0u8..13) {
            let mut header = [0u8; HEADER_BYTES];
            header[..32].copy_from_slice(&bytes);
            header[32..].copy_from_slice(&tail);
            header[..4].copy_from_slice(&MAGIC);
            header[4] = kind;
            if let Ok(frame) = TransferFrame::decode(&header) {
                prop_assert!(frame.kind.carries_data() || frame.body_len() <= MAX_CONTROL_BYTES);
                prop_assert_eq!(TransferFrame::decode(&frame.encode()), Ok(frame));
            }
        }

        #[test]
        fn any_metadata_bytes_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = AgentMetadata::from_bytes(&bytes);
        }
    }
}
