//! The engine's own KV events, read as it publishes them (a ZMQ PUB socket sending `[topic, seq (8 bytes,
//! big-endian), payload]`, vLLM's `--kv-events-config` and SGLang's alike) and handed on in this project's
//! terms: re-hashed from their token ids (`EventTranslator`), recorded in the engine's ledger, broadcast to
//! the worker's event plane.
//!
//! With the engine's replay socket (vLLM's `replay_endpoint`: a ROUTER that answers `["", start seq]` with
//! every batch it still buffers from there, `["", topic, seq, payload]` each (before vLLM 0.32 without the
//! topic), then the end marker with 2^64 - 1 for its number), the worker
//! starts from the engine's history, so blocks stored before it joined keep their children, and a gap in the
//! numbers is filled from it. Without one, or when the history no longer reaches back far enough, a gap
//! clears what the routers know of the engine and what it stores from then on is relearned. Numbers that go
//! back mean the engine restarted: its cache is gone, and so is the routers' view of it.
use super::http::EngineHttp;
use crate::core::indexer::EventTranslator;
use crate::core::plane::{Context, MAX_EVENT_MESSAGE, SocketReader};
use crate::core::protocol::KvEvent;
use crate::core::protocol::external::{ExternalEvent, decode_msgpack_batch, decode_trtllm_json};
use std::time::Duration;

/// How long the engine's history may take to arrive.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most batches taken from one replay (vLLM buffers 10,000 steps by default), and most bytes: a history is
/// held whole before it is applied, so a peer must not be able to size it past this.
const MAX_REPLAY: usize = 100_000;
const MAX_REPLAY_BYTES: usize = 512 << 20;
/// The replay's end marker's sequence number.
const END_OF_REPLAY: u64 = u64::MAX;

/// Follows `endpoint` (and reads history from `replay`, when given) until the engine is dropped. Messages that
/// are not the engines' framing or payload are skipped and counted in the log, never fatal.
pub async fn follow(endpoint: String, replay: Option<String>, block_size: usize, publish: impl Fn(Vec<KvEvent>)) {
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
    let mut stream = Stream { translator: EventTranslator::new(block_size), expected: None, replayed_to: None };
    let mut unreadable = 0u64;
    // Subscribed before asking, so nothing falls between the history and the live messages; those the history
    // already had are skipped by number.
    if let Some(replay) = &replay {
        let events = stream.catch_up(&context, replay, 0).await;
        if !events.is_empty() {
            publish(events);
        }
    }
    loop {
        let frames = match reader.recv().await {
            Ok(frames) => frames,
            Err(error) => {
                tracing::error!("the engine's KV events at {endpoint} stopped: {error}");
                return;
            }
        };
        let (seq, payload) = match &frames[..] {
            [_topic, seq, payload] => match seq_of(seq) {
                Some(seq) => (seq, payload),
                None => continue,
            },
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
        if stream.replayed_to.is_some_and(|last| seq <= last) {
            continue;
        }
        stream.replayed_to = None;
        if let Some(next) = stream.expected.filter(|&next| seq > next) {
            match &replay {
                Some(replay) => events.extend(stream.catch_up(&context, replay, next).await),
                None => events.extend(stream.forget(&format!("its numbers jumped from {next} to {seq}"))),
            }
            if stream.replayed_to.is_some_and(|last| seq <= last) {
                publish_nonempty(&publish, events);
                continue;
            }
        } else if stream.expected.is_some_and(|next| seq < next) {
            events.extend(
                stream.forget(&format!("its numbers went back from {:?} to {seq} (it restarted)", stream.expected)),
            );
        }
        if let Err(error) = stream.apply(seq, payload, &mut events) {
            unreadable += 1;
            tracing::warn!("skipped an unreadable KV-event batch from {endpoint} ({unreadable} so far): {error}");
        }
        publish_nonempty(&publish, events);
    }
}

fn publish_nonempty(publish: &impl Fn(Vec<KvEvent>), events: Vec<KvEvent>) {
    if !events.is_empty() {
        publish(events);
    }
}

fn seq_of(frame: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(frame.try_into().ok()?))
}

/// How often TensorRT-LLM's events are asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Drains an engine's events by asking for them (`POST` to `http`, TensorRT-LLM's `/kv_cache_events`, a JSON
/// list of what happened since the last ask) until the engine is dropped. An ask that fails after the engine
/// may have drained its list (an answer cut off, over the size bound, unreadable) lost events: what the
/// routers know of the engine is cleared and relearned, rather than kept wrong.
pub async fn poll(http: EngineHttp, block_size: usize, publish: impl Fn(Vec<KvEvent>)) {
    let mut translator = EventTranslator::new(block_size);
    let mut cleared = false;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let answer = async {
            let response = http.post_json("", &serde_json::json!({}), "kv-events").await?;
            let status = response.status();
            let body = super::http::read_bounded(response.into_body()).await?;
            match status.is_success() {
                true => decode_trtllm_json(&body).map_err(|e| e.to_string()),
                false => Err(format!("it answered {status}")),
            }
        };
        match answer.await {
            Ok(batch) => {
                let events: Vec<KvEvent> = batch.events.iter().filter_map(|e| translator.translate(e)).collect();
                publish_nonempty(&publish, events);
                cleared = false;
            }
            Err(error) => {
                tracing::debug!("the engine's KV events at {} could not be read: {error}", http.base());
                // Once per outage: an engine that is down has nothing more to lose.
                if !std::mem::replace(&mut cleared, true) {
                    publish_nonempty(&publish, translator.translate(&ExternalEvent::Cleared).into_iter().collect());
                }
            }
        }
    }
}

/// Where the engine's numbered batches stand.
struct Stream {
    translator: EventTranslator,
    /// The next batch's number, once one was seen.
    expected: Option<u64>,
    /// The last batch a replay gave, until a live one past it arrives (live ones up to it are duplicates).
    replayed_to: Option<u64>,
}

impl Stream {
    /// Translates batch `seq` into `events`.
    fn apply(&mut self, seq: u64, payload: &[u8], events: &mut Vec<KvEvent>) -> Result<(), String> {
        self.expected = Some(seq.wrapping_add(1));
        let batch = decode_msgpack_batch(payload).map_err(|e| e.to_string())?;
        events.extend(batch.events.iter().filter_map(|event| self.translator.translate(event)));
        Ok(())
    }

    /// A clear, for when what was missed cannot be had.
    fn forget(&mut self, why: &str) -> Option<KvEvent> {
        tracing::warn!("the engine's KV events: {why}; its index is rebuilt from what it stores next");
        self.translator.translate(&ExternalEvent::Cleared)
    }

    /// The events of the engine's history from batch `from` on, or a clear when it no longer reaches back
    /// that far (or cannot be read).
    async fn catch_up(&mut self, context: &Context, replay: &str, from: u64) -> Vec<KvEvent> {
        let mut events = Vec::new();
        let history = match tokio::time::timeout(REPLAY_TIMEOUT, history(context, replay, from)).await {
            Ok(Ok(history)) => history,
            Ok(Err(error)) => {
                events.extend(self.forget(&format!("its history at {replay} could not be read ({error})")));
                return events;
            }
            Err(_) => {
                events.extend(self.forget(&format!("its history at {replay} did not come within {REPLAY_TIMEOUT:?}")));
                return events;
            }
        };
        // A first start may find the history trimmed (nothing before it had children to lose); a gap must be
        // filled from exactly where it began.
        match history.first() {
            Some((first, _)) if from > 0 && *first != from => {
                events.extend(self.forget(&format!("its history starts at {first}, after the gap at {from}")));
            }
            None if from > 0 => events.extend(self.forget(&format!("its history has nothing from {from} on"))),
            _ => {}
        }
        for (seq, payload) in &history {
            if let Err(error) = self.apply(*seq, payload, &mut events) {
                tracing::warn!("skipped an unreadable KV-event batch of the engine's history: {error}");
            }
        }
        self.replayed_to = history.last().map(|(seq, _)| *seq);
        events
    }
}

/// The batches the engine's replay socket still holds from `from` on, in order.
async fn history(context: &Context, replay: &str, from: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let socket = context.socket(zmq::DEALER).map_err(|e| e.to_string())?;
    socket.set_maxmsgsize(MAX_EVENT_MESSAGE).map_err(|e| e.to_string())?;
    socket.set_linger(0).map_err(|e| e.to_string())?;
    socket.connect(replay).map_err(|e| e.to_string())?;
    socket.send_multipart([&b""[..], &from.to_be_bytes()], 0).map_err(|e| e.to_string())?;
    let mut reader = SocketReader::new(socket).map_err(|e| e.to_string())?;
    let (mut batches, mut bytes) = (Vec::new(), 0usize);
    loop {
        let frames = reader.recv().await.map_err(|e| e.to_string())?;
        let (seq, payload) = match &frames[..] {
            [_, _, seq, payload] | [_, seq, payload] => (seq, payload),
            _ => return Err(format!("a reply of {} frames", frames.len())),
        };
        bytes = bytes.saturating_add(payload.len());
        match seq_of(seq) {
            Some(END_OF_REPLAY) => return Ok(batches),
            Some(seq) if batches.len() < MAX_REPLAY && bytes <= MAX_REPLAY_BYTES => {
                batches.push((seq, payload.to_vec()))
            }
            Some(_) => return Err(format!("more than {MAX_REPLAY} batches or {MAX_REPLAY_BYTES} bytes")),
            None => return Err("a reply whose number is not 8 bytes".into()),
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
        let _follow = crate::core::AbortOnDrop(tokio::spawn(follow(endpoint, None, 4, move |events| {
            sink.lock().unwrap().extend(events)
        })));
        let send =
            |seq: u64, payload: &[u8]| publisher.send_multipart([&b"kv"[..], &seq.to_be_bytes(), payload], 0).unwrap();
        // PUB drops what it sends before the subscriber is connected: send, numbered on, until one arrives (the
        // first one seen is where this subscriber starts; no loss).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut seq = 0;
        while seen.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no event arrived");
            send(seq, &stored(&[11, 12], None, 0..8));
            seq += 1;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // One still on its way when the first arrived would land after this.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
        send(seq + 7, &stored(&[13], Some(12), 8..12));
        let events = wait_for(before + 1).await;
        assert_eq!(events[before], KvEvent::Cleared, "{events:?}");
        // The child of a block stored before the clear has no known parent now: dropped, not guessed.
        assert_eq!(events.len(), before + 1, "{events:?}");
    }

    /// The batches an engine keeps for replay: (number, payload).
    type Buffered = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// vLLM's replay socket: a ROUTER answering `["", start]` with the buffered batches from there, then the end
    /// marker, each with a topic frame before its number as vLLM 0.32 sends them when `topic` is given; serves
    /// until `stop`.
    fn replay_server(
        context: &zmq::Context,
        buffer: Buffered,
        stop: Arc<std::sync::atomic::AtomicBool>,
        topic: Option<&'static [u8]>,
    ) -> (String, std::thread::JoinHandle<()>) {
        let router = context.socket(zmq::ROUTER).unwrap();
        router.bind("tcp://127.0.0.1:*").unwrap();
        router.set_rcvtimeo(50).unwrap();
        let endpoint = router.get_last_endpoint().unwrap().unwrap();
        let thread = std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(frames) = router.recv_multipart(0) else { continue };
                let [identity, _, start] = &frames[..] else { continue };
                let start = u64::from_be_bytes(start[..].try_into().unwrap());
                let reply = |seq: u64, payload: &[u8]| {
                    let mut frames = vec![&identity[..], b""];
                    frames.extend(topic);
                    let seq = seq.to_be_bytes();
                    frames.extend([&seq[..], payload]);
                    router.send_multipart(frames, 0).unwrap();
                };
                for (seq, payload) in buffer.lock().unwrap().iter().filter(|(seq, _)| *seq >= start) {
                    reply(*seq, payload);
                }
                reply(u64::MAX, b"");
            }
        });
        (endpoint, thread)
    }

    #[tokio::test]
    async fn history_from_the_replay_socket_keeps_old_parents_and_fills_gaps() {
        history_keeps_old_parents_and_fills_gaps(Some(b"kv")).await;
    }

    #[tokio::test]
    async fn history_from_a_replay_socket_before_vllm_0_32_without_topics_too() {
        history_keeps_old_parents_and_fills_gaps(None).await;
    }

    async fn history_keeps_old_parents_and_fills_gaps(topic: Option<&'static [u8]>) {
        let context = zmq::Context::new();
        let publisher = context.socket(zmq::PUB).unwrap();
        publisher.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = publisher.get_last_endpoint().unwrap().unwrap();
        let buffer: Buffered = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (replay, server) = replay_server(&context, buffer.clone(), stop.clone(), topic);
        // Batch k stores block k (tokens 4k..4k+4), child of block k - 1: one chain.
        let batch =
            |k: u32| stored(&[100 + u64::from(k)], k.checked_sub(1).map(|p| 100 + u64::from(p)), 4 * k..4 * k + 4);
        let record = |k: u32| buffer.lock().unwrap().push((u64::from(k), batch(k)));
        let send = |k: u32| publisher.send_multipart([&b"kv"[..], &u64::from(k).to_be_bytes(), &batch(k)], 0).unwrap();
        // Two batches before the worker joins: without the history, every later block would be an orphan.
        record(0);
        record(1);
        let seen: Arc<Mutex<Vec<KvEvent>>> = Arc::default();
        let sink = seen.clone();
        let _follow = crate::core::AbortOnDrop(tokio::spawn(follow(endpoint, Some(replay), 4, move |events| {
            sink.lock().unwrap().extend(events)
        })));
        let stored_blocks = |seen: &[KvEvent]| -> Vec<u64> {
            seen.iter()
                .flat_map(|e| match e {
                    KvEvent::Stored { blocks, .. } => blocks.iter().map(|b| b.hash).collect(),
                    _ => vec![],
                })
                .collect()
        };
        // Live batches from 2 on; the first ones are lost while the subscription connects, and come from
        // the history as gaps instead.
        let mut k = 2;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stored_blocks(&seen.lock().unwrap()).len() < k as usize {
            assert!(std::time::Instant::now() < deadline, "{:?}", seen.lock().unwrap());
            record(k);
            send(k);
            k += 1;
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        // One more lost on purpose, then the next: the gap is filled.
        record(k);
        record(k + 1);
        send(k + 1);
        let total = k as usize + 2;
        while stored_blocks(&seen.lock().unwrap()).len() < total {
            assert!(std::time::Instant::now() < deadline, "{:?}", seen.lock().unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.join().unwrap();
        let seen = seen.lock().unwrap();
        assert!(!seen.contains(&KvEvent::Cleared), "{seen:?}");
        // Every block, in order, under our own chained hashes of one prompt.
        let tokens: Vec<u32> = (0..4 * total as u32).collect();
        let ours: Vec<u64> = crate::core::tokens::block_hashes(&tokens, 4).iter().map(|h| h.sequence).collect();
        assert_eq!(stored_blocks(&seen), ours);
    }

    #[tokio::test]
    async fn a_failed_poll_clears_what_the_routers_know_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // TensorRT-LLM's JSON: one stored block, then a failure, then nothing new.
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let app = axum::Router::new().route(
            "/kv_cache_events",
            axum::routing::post(move || {
                let call = counter.fetch_add(1, Ordering::Relaxed);
                async move {
                    let stored = r#"[{"event_id":1,"data":{"type":"stored","parent_hash":null,"blocks":[{"type":"stored_block","block_hash":7,"tokens":[{"type":"unique_token","token_id":1},{"type":"unique_token","token_id":2},{"type":"unique_token","token_id":3},{"type":"unique_token","token_id":4}]}]}}]"#;
                    match call {
                        0 => (axum::http::StatusCode::OK, stored.to_string()),
                        1 | 2 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down".to_string()),
                        _ => (axum::http::StatusCode::OK, "[]".to_string()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/kv_cache_events", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let seen: Arc<Mutex<Vec<KvEvent>>> = Arc::default();
        let sink = seen.clone();
        let http = EngineHttp::new(&url).unwrap();
        let _poll =
            crate::core::AbortOnDrop(tokio::spawn(poll(http, 4, move |events| sink.lock().unwrap().extend(events))));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while calls.load(Ordering::Relaxed) < 5 {
            assert!(std::time::Instant::now() < deadline, "the engine was not asked again");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let seen = seen.lock().unwrap();
        assert!(matches!(seen.first(), Some(KvEvent::Stored { .. })), "{seen:?}");
        // Two failed asks in a row: one clear.
        assert_eq!(seen[1..], [KvEvent::Cleared], "{seen:?}");
    }
}
