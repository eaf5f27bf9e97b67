//! Reading a ZMQ socket from tokio without a system call per message.
//!
//! libzmq signals a socket through one file descriptor that only says "look again"; whether a message is
//! there is what `ZMQ_EVENTS` says, and asking costs a `poll` of libzmq's mailbox (a system call). tmq, which
//! the planes used before, asks before every message, on both ends. A `SocketReader` takes messages for as
//! long as libzmq has them queued and asks only when it finds none, so a busy socket makes no system call per
//! message: the calls were about an eighth of a busy event plane's CPU. Every socket of both planes is read
//! through it; sends are libzmq's own, never blocking (`DONTWAIT`).
use super::PlaneError;
use smallvec::SmallVec;
use std::os::fd::{AsRawFd, RawFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// One message's frames; the event plane's have four.
pub type Frames = SmallVec<[zmq::Message; 4]>;

/// A socket with libzmq's signalling descriptor, which libzmq owns: open exactly as long as the socket is.
struct Signalled {
    socket: zmq::Socket,
    fd: RawFd,
}

impl AsRawFd for Signalled {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

pub struct SocketReader(AsyncFd<Signalled>);

impl SocketReader {
    /// Must be called inside a tokio runtime with I/O enabled.
    pub fn new(socket: zmq::Socket) -> Result<Self, PlaneError> {
        let fd = socket.get_fd()?;
        // SAFETY: the descriptor is the socket's own, open until the socket closes; the socket lives inside
        // the `AsyncFd`, which lets go of the descriptor before it drops the socket.
        let signal = unsafe { AsyncFd::register_with_interest(Signalled { socket, fd }, Interest::READABLE) };
        Ok(Self(signal.map_err(|e| e.into_parts().1)?))
    }

    pub fn socket(&self) -> &zmq::Socket {
        &self.0.get_ref().socket
    }

    /// The next message. Cancel-safe: a message is taken whole within one poll or not at all.
    pub async fn recv(&mut self) -> Result<Frames, PlaneError> {
        loop {
            if let Some(frames) = self.try_recv()? {
                return Ok(frames);
            }
            // The descriptor only changes when libzmq's commands arrive, and may have done so before this
            // look; `ZMQ_EVENTS` is libzmq's documented test for whether sleeping on it is safe. One call
            // per wait, not per message.
            if self.socket().get_events()?.contains(zmq::POLLIN) {
                continue;
            }
            self.0.readable_mut().await?.clear_ready();
        }
    }

    fn try_recv(&self) -> Result<Option<Frames>, zmq::Error> {
        let mut frames = Frames::new();
        loop {
            let mut frame = zmq::Message::new();
            match self.socket().recv(&mut frame, zmq::DONTWAIT) {
                Ok(()) => {
                    let more = frame.get_more();
                    frames.push(frame);
                    if !more {
                        return Ok(Some(frames));
                    }
                }
                // libzmq hands over a message's frames together: "none yet" can only come first.
                Err(zmq::Error::EAGAIN) if frames.is_empty() => return Ok(None),
                Err(error) => return Err(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connected pair over inproc: what is sent on the first arrives at the reader, with no slow joiner.
    fn pair(name: &str) -> (zmq::Context, zmq::Socket, SocketReader) {
        let context = zmq::Context::new();
        let (sender, receiver) = (context.socket(zmq::PAIR).unwrap(), context.socket(zmq::PAIR).unwrap());
        receiver.bind(&format!("inproc://{name}")).unwrap();
        sender.connect(&format!("inproc://{name}")).unwrap();
        (context, sender, SocketReader::new(receiver).unwrap())
    }

    fn texts(frames: &Frames) -> Vec<&str> {
        frames.iter().map(|frame| frame.as_str().unwrap_or("?")).collect()
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_for_each_message_sent_after_it_slept() {
        let (_context, sender, mut reader) = pair("wakes");
        for round in 0..50 {
            // Asleep first: nothing queued, so the reader waits on libzmq's descriptor.
            let waiting = tokio::spawn(async move {
                let frames = reader.recv().await.unwrap();
                (reader, texts(&frames).join(" "))
            });
            tokio::time::sleep(Duration::from_millis(2)).await;
            sender.send_multipart([format!("{round}").as_str(), "b"], 0).unwrap();
            let (back, got) = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
            assert_eq!(got, format!("{round} b"));
            reader = back;
        }
    }

    #[tokio::test]
    async fn queued_messages_come_whole_and_in_order_and_a_cancelled_wait_loses_none() {
        let (_context, sender, mut reader) = pair("drains");
        // Cancelled while waiting: nothing is taken.
        assert!(tokio::time::timeout(Duration::from_millis(5), reader.recv()).await.is_err());
        for i in 0..1000 {
            sender.send_multipart([format!("{i}").as_str(), "x", "y"], 0).unwrap();
        }
        for i in 0..1000 {
            let frames = tokio::time::timeout(Duration::from_secs(5), reader.recv()).await.unwrap().unwrap();
            assert_eq!(texts(&frames), [format!("{i}").as_str(), "x", "y"]);
        }
        assert!(tokio::time::timeout(Duration::from_millis(5), reader.recv()).await.is_err(), "nothing extra");
    }
}
