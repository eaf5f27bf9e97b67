//! `dynamo bench plane`: KV events through the event plane end to end — encode, publish, receive, check
//! sequence, decode, apply to a FlashIndexer — against raw libzmq PUB/SUB carrying the same bytes with no
//! encoding, tracking or decoding, in the same run over loopback TCP.
use crate::core::indexer::{FlashIndexer, Indexer};
use crate::core::plane::{EventPublisher, EventSubscriber, PlaneError};
use crate::core::protocol::plane::{Topic, decode_payload, encode_payload};
use crate::core::protocol::{KvEvent, KvEventBatch, StoredBlock};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use std::time::{Duration, Instant};
use tmq::{AsZmqSocket, Context};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PlaneRun {
    /// KV events delivered (and, for the plane, applied) per second.
    pub events_per_s: f64,
    pub messages: u64,
    /// Messages published but never received (high-water-mark drops).
    pub lost: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PlaneResult {
    pub plane: PlaneRun,
    pub raw_zmq: PlaneRun,
    /// Plane over raw libzmq, events/s.
    pub ratio: f64,
}

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Both paths buffer without limit, so neither drops and both measure throughput alone.
const UNLIMITED: i32 = 0;

/// Batch `i`: `events` Stored events of one block each, extending a chain, as a worker would publish.
fn batch(i: u64, events: usize) -> KvEventBatch {
    let events = (0..events as u64)
        .map(|e| {
            let hash = (i * 1024 + e + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let parent_hash = (e > 0).then(|| (i * 1024 + e).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            KvEvent::Stored { parent_hash, blocks: vec![StoredBlock { hash, tokens_hash: hash }] }
        })
        .collect();
    KvEventBatch { worker_id: 1, events }
}

pub async fn run(messages: u64, events_per_message: usize) -> Result<PlaneResult, PlaneError> {
    let plane = run_plane(messages, events_per_message).await?;
    let raw_zmq = run_raw(messages, events_per_message).await?;
    Ok(PlaneResult { ratio: plane.events_per_s / raw_zmq.events_per_s, plane, raw_zmq })
}

async fn run_plane(messages: u64, events_per_message: usize) -> Result<PlaneRun, PlaneError> {
    let context = Context::new();
    let mut publisher = EventPublisher::bind(&context, "tcp://127.0.0.1:*", 1, UNLIMITED)?;
    let mut subscriber = EventSubscriber::connect(&context, &[publisher.endpoint()], &[Topic::Kv], UNLIMITED)?;
    // Out-wait ZMQ's slow joiner: publish until one message arrives, then drain.
    let warmup = batch(u64::MAX / 2048, 1);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        publisher.publish(Topic::Kv, &warmup).await?;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(2), subscriber.next()).await {
            break;
        }
        if Instant::now() > deadline {
            return Err(PlaneError::Endpoint);
        }
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), subscriber.next()).await {}
    let lost_before = subscriber.lost;

    let index = FlashIndexer::new();
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..messages {
            publisher.publish(Topic::Kv, &batch(i, events_per_message)).await?;
        }
        Ok::<_, PlaneError>(publisher)
    });
    let mut received = 0u64;
    let mut last = start;
    let mut events = 0u64;
    while received + (subscriber.lost - lost_before) < messages {
        let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_millis(500), subscriber.next()).await else {
            break;
        };
        let delivery = delivery?;
        if let Ok(batch) = decode_payload::<KvEventBatch>(&delivery.payload) {
            for event in &batch.events {
                index.apply(batch.worker_id, event);
            }
            events += batch.events.len() as u64;
        }
        received += 1;
        last = Instant::now();
    }
    let seconds = (last - start).as_secs_f64();
    let _publisher = sender.await.map_err(|_| PlaneError::Endpoint)??;
    Ok(PlaneRun { events_per_s: events as f64 / seconds, messages: received, lost: messages - received })
}

async fn run_raw(messages: u64, events_per_message: usize) -> Result<PlaneRun, PlaneError> {
    let context = Context::new();
    let mut publisher = tmq::publish(&context).set_sndhwm(UNLIMITED).set_linger(0).bind("tcp://127.0.0.1:*")?;
    let endpoint =
        publisher.get_socket().get_last_endpoint().map_err(tmq::TmqError::from)?.map_err(|_| PlaneError::Endpoint)?;
    let mut subscriber =
        tmq::subscribe(&context).set_rcvhwm(UNLIMITED).set_linger(0).connect(&endpoint)?.subscribe(Topic::Kv.name())?;
    // The same bytes the plane sends for one message, encoded once.
    let payload = encode_payload(&batch(0, events_per_message));
    let frame = |seq: u64| -> Vec<Vec<u8>> {
        vec![Topic::Kv.name().to_vec(), 1u64.to_be_bytes().to_vec(), seq.to_be_bytes().to_vec(), payload.clone()]
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        publisher.send(frame(u64::MAX)).await?;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(2), subscriber.next()).await {
            break;
        }
        if Instant::now() > deadline {
            return Err(PlaneError::Endpoint);
        }
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), subscriber.next()).await {}

    let frames: Vec<Vec<Vec<u8>>> = (0..messages).map(frame).collect();
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for f in frames {
            publisher.send(f).await?;
        }
        // Returned, not dropped: with linger 0, dropping the socket would discard what is still queued.
        Ok::<_, tmq::TmqError>(publisher)
    });
    let mut received = 0u64;
    let mut last = start;
    while received < messages {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), subscriber.next()).await else {
            break;
        };
        message?;
        received += 1;
        last = Instant::now();
    }
    let seconds = (last - start).as_secs_f64();
    let _publisher = sender.await.map_err(|_| PlaneError::Endpoint)??;
    let events = received * events_per_message as u64;
    Ok(PlaneRun { events_per_s: events as f64 / seconds, messages: received, lost: messages - received })
}

pub fn table(r: &PlaneResult) -> String {
    let mut out = format!("{:<10} {:>14} {:>10} {:>8}\n", "path", "KV events/s", "messages", "lost");
    for (name, run) in [("plane", &r.plane), ("raw zmq", &r.raw_zmq)] {
        out.push_str(&format!("{:<10} {:>14.0} {:>10} {:>8}\n", name, run.events_per_s, run.messages, run.lost));
    }
    out.push_str(&format!("plane / raw libzmq: {:.2}\n", r.ratio));
    out
}
