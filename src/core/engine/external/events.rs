//! The engine's own KV events, read as it publishes them (a ZMQ PUB socket sending `[topic, seq (8 bytes,
//! big-endian), payload]`, vLLM's `--kv-events-config` and SGLang's alike) and handed on in this project's
//! terms: re-hashed from their token ids (`EventTranslator`), recorded in the engine's ledger, broadcast to
//! the worker's event plane. A gap in the engine's numbers, or numbers that went back (it restarted), clears
//! what the routers know of it; what it stores from then on is relearned.
use crate::core::indexer::EventTranslator;
use crate::core::plane::{Context, MAX_EVENT_MESSAGE, SocketReader};
use crate::core::protocol::KvEvent;
use crate::core::protocol::external::decode_msgpack_batch;

/// Follows `endpoint` until the engine is dropped. Messages that are not the engines' framing or payload are
/// skipped and counted in the log, never fatal.
pub async fn follow(endpoint: String, block_size: usize, publish: impl Fn(Vec<KvEvent>)) {
    let context = Context::new();
    let reader = context.socket(zmq::SUB).and_then(|socket| {
        socket.set_maxmsgsize(MAX_EVENT_MESSAGE)?;
        socket.set_linger(0)?;
        socket.set_subscribe(b"")?;
        socket.connect(&endpoint)?;
        Ok(socket)
    });
    let mut reader =
        match reader.map_err(|e| e.to_string()).and_then(|s| SocketReader::new(s).map_err(|e| e.to_string())) {
            Ok(reader) => reader,
            Err(error) => {
                tracing::error!("cannot subscribe to the engine's KV events at {endpoint}: {error}");
                return;
            }
        };
    let mut translator = EventTranslator::new(block_size);
    let mut expected: Option<u64> = None;
    let mut unreadable = 0u64;
    loop {
        let frames = match reader.recv().await {
            Ok(frames) => frames,
            Err(error) => {
                tracing::error!("the engine's KV events at {endpoint} stopped: {error}");
                return;
            }
        };
        let (seq, payload) = match &frames[..] {
            [_topic, seq, payload] if seq.len() == 8 => {
                (u64::from_be_bytes(seq[..].try_into().unwrap_or_default()), payload)
            }
            _ => {
                unreadable += 1;
                tracing::warn!(
                    "skipped a KV-event message of {} frames from {endpoint} ({unreadable} so far); the engines send \
                     [topic, 8-byte seq, payload]",
                    frames.len()
                );
                continue;
            }
        };
        let mut events = Vec::new();
        // A subscriber that joins late sees its first message mid-stream: no loss, but blocks stored before it
        // have no known parent, so their children are dropped until they are stored again.
        if expected.is_some_and(|next| seq != next) {
            tracing::warn!("the engine's KV events jumped from {expected:?} to {seq}: its index is rebuilt");
            events.extend(translator.translate(&crate::core::protocol::external::ExternalEvent::Cleared));
        }
        expected = Some(seq.wrapping_add(1));
        match decode_msgpack_batch(payload) {
            Ok(batch) => events.extend(batch.events.iter().filter_map(|event| translator.translate(event))),
            Err(error) => {
                unreadable += 1;
                tracing::warn!("skipped an unreadable KV-event batch from {endpoint} ({unreadable} so far): {error}");
            }
        }
        if !events.is_empty() {
            publish(events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as M;
    use std::sync::{Arc, Mutex};

    /// vLLM 0.26+'s encoding: a positional batch of map events.
    fn stored(hashes: &[u64], parent: Option<u64>, tokens: std::ops::Range<u32>) -> Vec<u8> {
        let event = M::Map(vec![
            (M::from("type"), M::from("BlockStored")),
            (M::from("block_hashes"), M::Array(hashes.iter().map(|&h| M::from(h)).collect())),
            (M::from("parent_block_hash"), parent.map_or(M::Nil, M::from)),
            (M::from("token_ids"), M::Array(tokens.map(M::from).collect())),
            (M::from("block_size"), M::from(4)),
            (M::from("medium"), M::from("GPU")),
        ]);
        let mut payload = Vec::new();
        rmpv::encode::write_value(&mut payload, &M::Array(vec![M::from(1.5), M::Array(vec![event]), M::Nil])).unwrap();
        payload
    }

    #[tokio::test]
    async fn an_engines_events_are_rehashed_and_a_gap_clears_them() {
        let context = zmq::Context::new();
        let publisher = context.socket(zmq::PUB).unwrap();
        publisher.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = publisher.get_last_endpoint().unwrap().unwrap();
        let seen: Arc<Mutex<Vec<KvEvent>>> = Arc::default();
        let sink = seen.clone();
        let _follow = crate::core::AbortOnDrop(tokio::spawn(follow(endpoint, 4, move |events| {
            sink.lock().unwrap().extend(events)
        })));
        let send =
            |seq: u64, payload: &[u8]| publisher.send_multipart([&b"kv"[..], &seq.to_be_bytes(), payload], 0).unwrap();
        // PUB drops what it sends before the subscriber is connected: send until the first arrives.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no event arrived");
            send(0, &stored(&[11, 12], None, 0..8));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let wait_for = |count: usize| {
            let seen = seen.clone();
            async move {
                while seen.lock().unwrap().len() < count {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                seen.lock().unwrap().clone()
            }
        };
        let first = wait_for(1).await;
        let KvEvent::Stored { parent_hash: None, blocks } = &first[0] else { panic!("{first:?}") };
        // Our hashes of the token blocks, not the engine's numbers.
        assert_eq!(
            blocks.iter().map(|b| b.hash).collect::<Vec<_>>(),
            crate::core::tokens::block_hashes(&(0..8).collect::<Vec<_>>(), 4)
                .iter()
                .map(|h| h.sequence)
                .collect::<Vec<_>>()
        );
        let before = seen.lock().unwrap().len();
        // A frame that is not the engines' framing, then a batch after a lost one: the index is cleared.
        publisher.send_multipart([&b"kv"[..], b"short"], 0).unwrap();
        send(7, &stored(&[13], Some(12), 8..12));
        let events = wait_for(before + 1).await;
        assert_eq!(events[before], KvEvent::Cleared, "{events:?}");
        // The child of a block stored before the clear has no known parent now: dropped, not guessed.
        assert_eq!(events.len(), before + 1, "{events:?}");
    }
}
