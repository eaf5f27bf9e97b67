//! Publisher and subscriber sockets of the event plane, and the sequence tracking that makes loss visible.
use super::reader::SocketReader;
use super::{Context, Seals};
use crate::core::protocol::plane::{FrameError, FrameHeader, Payload, Topic, decode_header};
use crate::core::trust::{Seen, Unopened};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::Arc;

/// Frames (four per message) a socket buffers for a slow peer before dropping (ZMQ's high-water mark);
/// drops show as gaps. 0 buffers without limit.
pub const HIGH_WATER_MARK: i32 = 400_000;

#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("plane socket: {0}")]
    Socket(#[from] zmq::Error),
    #[error("plane socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("event plane socket has no usable endpoint")]
    Endpoint,
    /// A message that is not an event-plane frame; it was skipped and the socket stays up.
    #[error("skipped a message that is not an event-plane frame: {0}")]
    Malformed(#[from] FrameError),
    /// A measurement that could not complete (benchmarks).
    #[error("{0}")]
    Incomplete(String),
}

/// A PUB socket set up as the event plane's are (high-water mark, no linger), bound to `endpoint`.
pub fn publish_socket(context: &Context, endpoint: &str, hwm: i32) -> Result<zmq::Socket, PlaneError> {
    let socket = context.socket(zmq::PUB)?;
    socket.set_sndhwm(hwm)?;
    socket.set_linger(0)?;
    socket.bind(endpoint)?;
    Ok(socket)
}

/// Largest event message a subscriber takes: a step's KV events for a million-token prompt are a few MB. A
/// publisher that sends more is disconnected by libzmq as it announces the size, before anything is buffered.
pub const MAX_EVENT_MESSAGE: i64 = 16 << 20;

/// A SUB socket set up as the event plane's are, subscribed to `topics` and connected to no publisher yet.
pub fn subscribe_socket(context: &Context, topics: &[Topic], hwm: i32) -> Result<zmq::Socket, PlaneError> {
    let socket = context.socket(zmq::SUB)?;
    socket.set_rcvhwm(hwm)?;
    socket.set_maxmsgsize(MAX_EVENT_MESSAGE)?;
    socket.set_linger(0)?;
    for topic in topics {
        socket.set_subscribe(topic.name())?;
    }
    Ok(socket)
}

pub struct EventPublisher {
    socket: zmq::Socket,
    publisher: u64,
    /// Per topic, in `Topic::ALL` order.
    next_seq: [u64; Topic::ALL.len()],
    endpoint: String,
    /// The payload of the message being sent, kept between messages for its capacity.
    payload: Vec<u8>,
    seals: Option<Arc<Seals>>,
}

impl EventPublisher {
    /// Binds `endpoint` (`tcp://127.0.0.1:*` picks a free port; `endpoint()` tells which).
    pub fn bind(context: &Context, endpoint: &str, publisher: u64, hwm: i32) -> Result<Self, PlaneError> {
        let socket = publish_socket(context, endpoint, hwm)?;
        let endpoint = super::bound_endpoint(&socket)?;
        let seals = context.seals().cloned();
        Ok(Self { socket, publisher, next_seq: [0; Topic::ALL.len()], endpoint, payload: Vec::new(), seals })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The sequence number the next message on `topic` will carry.
    pub fn next_seq(&self, topic: Topic) -> u64 {
        self.next_seq[topic as usize]
    }

    /// Loses the next message on `topic` on purpose, as a full high-water mark would.
    #[cfg(test)]
    pub(crate) fn skip(&mut self, topic: Topic) {
        self.next_seq[topic as usize] += 1;
    }

    /// Sends `value` on its type's topic. Never waits: a PUB socket drops what a slow subscriber's queue has
    /// no room for (which the subscriber sees as a gap) instead of blocking the publisher.
    pub fn publish<T: Payload>(&mut self, value: &T) -> Result<(), PlaneError> {
        let topic = T::TOPIC;
        self.payload.clear();
        value.write_to(&mut self.payload);
        let next = &mut self.next_seq[topic as usize];
        let (publisher, seq) = (self.publisher.to_be_bytes(), next.to_be_bytes());
        *next += 1;
        let sealed;
        let payload = match &self.seals {
            Some(seals) => {
                sealed = seals.event.seal(&frame_context(topic.name(), &publisher, &seq), &self.payload);
                &sealed
            }
            None => &self.payload,
        };
        // libzmq copies each frame into its own message, so the buffer is free again once this returns.
        let frames: [&[u8]; 4] = [topic.name(), &publisher, &seq, payload];
        self.socket.send_multipart(frames, zmq::DONTWAIT)?;
        Ok(())
    }
}

/// How a message relates to the ones before it from the same publisher and topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    InOrder,
    /// This many messages before this one never arrived.
    Gap(u64),
    /// The number went back: the publisher restarted and its earlier state is gone.
    Restarted,
}

/// Next expected sequence number per (publisher, topic).
#[derive(Debug, Default)]
pub struct SeqTracker {
    // foldhash, not SipHash: looked up once per message, and the keys are few (one per publisher and topic).
    expected: HashMap<(u64, Topic), u64, foldhash::fast::RandomState>,
}

impl SeqTracker {
    pub fn observe(&mut self, header: FrameHeader) -> Continuity {
        let expected = self.expected.insert((header.publisher, header.topic), header.seq + 1);
        match expected {
            // A subscriber that joins late sees its first message mid-stream; that is no loss.
            None => Continuity::InOrder,
            Some(next) if header.seq == next => Continuity::InOrder,
            Some(next) if header.seq > next => Continuity::Gap(header.seq - next),
            Some(_) => Continuity::Restarted,
        }
    }
}

/// One message as a subscriber receives it.
#[derive(Debug)]
pub struct Delivery {
    pub header: FrameHeader,
    pub continuity: Continuity,
    pub payload: EventBytes,
}

/// A delivered payload: libzmq's own message in an open cluster, the opened copy in a keyed one.
#[derive(Debug)]
pub enum EventBytes {
    Received(zmq::Message),
    Opened(Vec<u8>),
}

impl std::ops::Deref for EventBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            EventBytes::Received(message) => message,
            EventBytes::Opened(bytes) => bytes,
        }
    }
}

/// What a sealed event payload is bound to: its frame's header, so it cannot be re-labelled.
fn frame_context(topic: &[u8], publisher: &[u8], seq: &[u8]) -> SmallVec<[u8; 24]> {
    let mut context = SmallVec::new();
    context.extend_from_slice(topic);
    context.extend_from_slice(publisher);
    context.extend_from_slice(seq);
    context
}

pub struct EventSubscriber {
    reader: SocketReader,
    tracker: SeqTracker,
    /// Messages lost, summed over every gap seen.
    pub lost: u64,
    pub restarts: u64,
    /// Messages that were not event-plane frames (or not sealed with the cluster's key), skipped.
    pub malformed: u64,
    seals: Option<Arc<Seals>>,
    seen: Seen,
}

impl EventSubscriber {
    /// Subscribes to `topics` of the publishers at `endpoints`; more can be added with `add_publisher`.
    pub fn connect(context: &Context, endpoints: &[&str], topics: &[Topic], hwm: i32) -> Result<Self, PlaneError> {
        let mut subscriber = Self::new(context, topics, hwm)?;
        for endpoint in endpoints {
            subscriber.add_publisher(endpoint)?;
        }
        Ok(subscriber)
    }

    /// A subscriber with no publisher yet (a router before discovery finds its workers).
    pub fn new(context: &Context, topics: &[Topic], hwm: i32) -> Result<Self, PlaneError> {
        let socket = subscribe_socket(context, topics, hwm)?;
        Ok(Self {
            reader: SocketReader::new(socket)?,
            tracker: SeqTracker::default(),
            lost: 0,
            restarts: 0,
            malformed: 0,
            seals: context.seals().cloned(),
            seen: Seen::default(),
        })
    }

    /// Adds a publisher discovered later.
    pub fn add_publisher(&mut self, endpoint: &str) -> Result<(), PlaneError> {
        self.reader.socket().connect(endpoint)?;
        Ok(())
    }

    /// Stops listening to a publisher that left.
    pub fn remove_publisher(&mut self, endpoint: &str) -> Result<(), PlaneError> {
        self.reader.socket().disconnect(endpoint)?;
        Ok(())
    }

    /// The next message, or `PlaneError::Malformed` for one that is not an event-plane frame (counted, and
    /// skipped: the next call reads on). Cancel-safe (see `SocketReader::recv`).
    pub async fn next(&mut self) -> Result<Delivery, PlaneError> {
        loop {
            let frames = self.reader.recv().await?;
            // On the stack: every well-formed message has four frames.
            let header = decode_header(&frames.iter().map(|m| &m[..]).collect::<SmallVec<[&[u8]; 4]>>());
            let header = match header {
                Ok(header) => header,
                Err(error) => {
                    self.malformed += 1;
                    return Err(error.into());
                }
            };
            let Some(payload) = frames.into_iter().nth(3) else { continue };
            // Opened before its numbering counts: a stranger's frame must not move the sequence.
            let payload = match &self.seals {
                None => EventBytes::Received(payload),
                Some(seals) => {
                    let context =
                        frame_context(header.topic.name(), &header.publisher.to_be_bytes(), &header.seq.to_be_bytes());
                    // Per publisher: one process's publishers share a sealer, and reach here over their own
                    // connections, each in its own order.
                    match seals.event.open(&context, &payload, &mut self.seen, header.publisher) {
                        Ok(opened) => EventBytes::Opened(opened),
                        Err(why) => {
                            self.malformed += 1;
                            return Err(match why {
                                Unopened::Unsealed => FrameError::Unsealed,
                                // A replay would read as the publisher restarting, and clear its blocks.
                                Unopened::Replayed => FrameError::Replayed,
                            }
                            .into());
                        }
                    }
                }
            };
            let continuity = self.tracker.observe(header);
            match continuity {
                Continuity::Gap(n) => self.lost += n,
                Continuity::Restarted => self.restarts += 1,
                Continuity::InOrder => {}
            }
            return Ok(Delivery { header, continuity, payload });
        }
    }
}

#[cfg(test)]
mod tests;
