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
//!    (`engine::KvLedger` on the worker side keeps what the snapshot needs; `cluster` does the asking).
//!
//! Malformed messages are counted and skipped; the socket stays up.
mod event;
mod reader;
pub mod request;

pub use event::{
    Continuity, Delivery, EventPublisher, EventSubscriber, HIGH_WATER_MARK, PlaneError, SeqTracker, publish_socket,
    subscribe_socket,
};
pub use reader::SocketReader;

/// The endpoint a socket was bound to, with the port the system picked for `tcp://host:*` or `:0`.
pub fn bound_endpoint(socket: &zmq::Socket) -> Result<String, PlaneError> {
    socket.get_last_endpoint()?.map_err(|_| PlaneError::Endpoint)
}
