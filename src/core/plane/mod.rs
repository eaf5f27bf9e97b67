//! The two planes between processes: `request` (a router's requests and their streamed outputs, with
//! heartbeats) and the event plane below. Both use libzmq's sockets (the `zmq` crate, libzmq built from
//! source) read through `reader`, which makes no system call per message.
//!
//! The event plane: each worker publishes on a ZMQ PUB socket; routers and `dynamo top` subscribe to every
//! publisher they discover (frames in `protocol::plane`).
//!
//! A subscriber must never be silently behind (a known Dynamo failure: a router that stopped getting
//! events without noticing). So:
//! 1. every (publisher, topic) numbers its messages from 0;
//! 2. the subscriber tracks the next expected number; a jump is a gap (messages lost: slow joiner at start,
//!    high-water-mark drops under load), counted and reported with the message after it;
//! 3. a number that goes back means the publisher restarted: its old state is gone;
//! 4. on either, the reader rebuilds that publisher's KV state from a snapshot asked over the request plane
//!    (the engine's `KvLedger` keeps what the snapshot needs, the worker says how many messages it covers;
//!    `route` does the asking).
//!
//! Malformed messages are counted and skipped; the socket stays up.
//!
//! With a cluster key every message of both planes is sealed (`trust`): the `Context` every socket of a
//! process is made from carries the seals, so no socket of a keyed process speaks in the clear, and a
//! message that does not open is dropped and counted like a malformed one.
mod event;
mod reader;
pub mod request;

pub use event::{
    Continuity, Delivery, EventBytes, EventPublisher, EventSubscriber, HIGH_WATER_MARK, MAX_EVENT_MESSAGE, PlaneError,
    SeqTracker, publish_socket, subscribe_socket,
};
pub use reader::SocketReader;

use crate::core::trust::{ClusterKey, Plane, Seal};
use std::sync::Arc;

/// What every plane socket of a process is made from: one libzmq context, and the cluster's seals when the
/// process was given a key.
#[derive(Clone, Default)]
pub struct Context {
    zmq: zmq::Context,
    seals: Option<Arc<Seals>>,
}

pub struct Seals {
    pub request: Seal,
    pub event: Seal,
}

impl Context {
    /// An open cluster's: nothing is sealed.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_key(key: Option<&ClusterKey>) -> Self {
        let seals = key.map(|key| Arc::new(Seals { request: key.seal(Plane::Request), event: key.seal(Plane::Event) }));
        Self { zmq: zmq::Context::new(), seals }
    }

    pub fn socket(&self, kind: zmq::SocketType) -> Result<zmq::Socket, zmq::Error> {
        self.zmq.socket(kind)
    }

    pub fn seals(&self) -> Option<&Arc<Seals>> {
        self.seals.as_ref()
    }
}

/// The endpoint a socket was bound to, with the port the system picked for `tcp://host:*` or `:0`.
pub fn bound_endpoint(socket: &zmq::Socket) -> Result<String, PlaneError> {
    socket.get_last_endpoint()?.map_err(|_| PlaneError::Endpoint)
}
