use super::*;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::plane::Context;
use crate::core::protocol::discovery::{ModelCardSummary, Role};

fn instance(id: u64) -> Instance {
    Instance {
        id,
        role: Role::Decode,
        model: "m".into(),
        namespace: "test".into(),
        request_addr: String::new(),
        event_addr: String::new(),
        transfer_addr: None,
        card: ModelCardSummary { block_size: 16, context_length: 4096, kv_blocks: 1024, tokenizer_hash: 1 },
        device: String::new(),
        http_addr: None,
        adapters: Vec::new(),
    }
}

fn mocker(speedup: f64) -> Arc<dyn Engine> {
    let config = MockerConfig { speedup, ..MockerConfig::default() };
    Arc::new(MockerEngine::spawn(1, config, (0..1000).collect()))
}

fn server(context: &Context, engine: Arc<dyn Engine>, max_in_flight: usize) -> RequestServer {
    server_with_published(context, engine, max_in_flight, 0)
}

/// A server that says `kv_published` KV messages went out before its engine's snapshot.
fn server_with_published(
    context: &Context,
    engine: Arc<dyn Engine>,
    max_in_flight: usize,
    kv_published: u64,
) -> RequestServer {
    let model_files = vec![("a.json".into(), "{}".into())];
    let kv_published = Arc::new(AtomicU64::new(kv_published));
    let served = Served { engine, instance: instance(1), model_files, max_in_flight, kv_published };
    RequestServer::bind(context, "tcp://127.0.0.1:*", served).unwrap()
}

async fn collect(mut stream: ResponseStream) -> Vec<EngineOutput> {
    let mut outputs = Vec::new();
    while let Some(output) = stream.next().await {
        outputs.push(output);
    }
    outputs
}

async fn alive(status: &mut mpsc::UnboundedReceiver<WorkerStatus>) -> Instance {
    match tokio::time::timeout(Duration::from_secs(10), status.recv()).await {
        Ok(Some(WorkerStatus::Alive(instance))) => instance,
        other => panic!("expected Alive, got {other:?}"),
    }
}

/// A client of `server` that has heard its worker's `Hello` (returned); `statuses` hears what comes after.
async fn connected(
    context: &Context,
    server: &RequestServer,
    dead_after: Duration,
) -> (WorkerClient, mpsc::UnboundedReceiver<WorkerStatus>, Instance) {
    let (status, mut statuses) = mpsc::unbounded_channel();
    let client = WorkerClient::connect(context, server.endpoint(), dead_after, status).unwrap();
    let instance = alive(&mut statuses).await;
    (client, statuses, instance)
}

/// A bare DEALER, as a router without its heartbeat, with one long request that has started generating.
async fn generating(context: &Context, server: &RequestServer, engine: &Arc<dyn Engine>) -> SocketReader {
    let mut raw = SocketReader::new(dealer_socket(context, server.endpoint()).unwrap()).unwrap();
    let request = PreprocessedRequest::greedy("long", (1..100).collect(), 100_000);
    raw.socket().send(encode(&ToWorker::Generate { stream: 3, request }), 0).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), raw.recv()).await.unwrap().unwrap();
    assert!(matches!(decode::<FromWorker>(&first[0]), Ok(FromWorker::Output { stream: 3, .. })));
    assert_eq!(engine.load().requests_running, 1);
    raw
}

/// Waits until the engine runs nothing, failing with `why` past `within`; the server must have counted the one
/// request it stopped.
async fn cancelled_within(within: Duration, engine: &Arc<dyn Engine>, server: &RequestServer, why: &str) {
    let deadline = Instant::now() + within;
    while engine.load().requests_running > 0 {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.stats.cancelled.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_remote_request_streams_what_the_engine_streams() {
    let context = Context::new();
    let engine = mocker(1000.0);
    let server = server(&context, engine.clone(), 8);
    let (client, _statuses, instance) = connected(&context, &server, Duration::from_secs(5)).await;
    assert_eq!(instance.id, 1, "the Hello carries the worker's record");
    assert_eq!(client.model_files(Duration::from_secs(5)).await, Some(vec![("a.json".into(), "{}".into())]));

    let request = PreprocessedRequest::greedy("r", (1..40).collect(), 12);
    let remote = collect(client.submit(request.clone())).await;
    let local = collect(engine.submit(request).unwrap()).await;
    let tokens = |outputs: &[EngineOutput]| outputs.iter().flat_map(|o| o.token_ids.clone()).collect::<Vec<_>>();
    assert_eq!(tokens(&remote), tokens(&local));
    assert_eq!(remote.last().and_then(|o| o.finish_reason.clone()), Some(FinishReason::Length));
}

#[tokio::test]
async fn dropping_the_stream_cancels_on_the_worker() {
    let context = Context::new();
    let engine = mocker(1.0);
    let server = server(&context, engine.clone(), 8);
    let (client, _statuses, _) = connected(&context, &server, Duration::from_secs(5)).await;
    let mut stream = client.submit(PreprocessedRequest::greedy("long", (1..100).collect(), 10_000));
    assert!(stream.next().await.is_some());
    assert_eq!(engine.load().requests_running, 1);
    drop(stream);
    cancelled_within(Duration::from_secs(5), &engine, &server, "the worker kept generating for a client that left")
        .await;
}

#[tokio::test]
async fn a_draining_worker_finishes_what_it_serves_and_refuses_the_rest() {
    let context = Context::new();
    let engine = mocker(20.0);
    let server = server(&context, engine.clone(), 8);
    let (client, _statuses, _) = connected(&context, &server, Duration::from_secs(5)).await;
    let mut running = client.submit(PreprocessedRequest::greedy("running", (1..40).collect(), 40));
    let first = running.next().await.expect("the request started");
    assert_eq!(server.in_flight(), 1);

    let mut drained = std::pin::pin!(server.drain());
    assert!(futures::poll!(drained.as_mut()).is_pending(), "a request is still in flight");
    let refused = collect(client.submit(PreprocessedRequest::greedy("new", vec![1, 2, 3], 5))).await;
    assert!(refused.is_empty(), "refused: no output and no finish reason, for another worker to take: {refused:?}");

    // The connection outlives its client: a router that stopped watching a worker still gets the rest.
    drop(client);
    let mut tokens = first.token_ids.len();
    let mut last = None;
    while let Some(output) = running.next().await {
        tokens += output.token_ids.len();
        last = output.finish_reason;
    }
    assert_eq!((tokens, last), (40, Some(FinishReason::Length)), "the request in flight ran to its end");
    tokio::time::timeout(Duration::from_secs(5), drained).await.expect("drained once nothing is in flight");
    assert_eq!(server.in_flight(), 0);
    assert_eq!(server.stats.refused.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn past_its_limit_a_worker_refuses_and_the_stream_ends_for_another_worker_to_take_it() {
    let context = Context::new();
    let server = server(&context, mocker(1.0), 1);
    let (client, _statuses, _) = connected(&context, &server, Duration::from_secs(5)).await;
    let mut first = client.submit(PreprocessedRequest::greedy("a", vec![1, 2, 3], 10_000));
    assert!(first.next().await.is_some());
    let second = collect(client.submit(PreprocessedRequest::greedy("b", vec![1, 2, 3], 5))).await;
    assert!(second.is_empty(), "busy: no output and no finish reason, as for a lost worker: {second:?}");
    assert_eq!(server.stats.refused.load(Ordering::Relaxed), 1);
    // Once the slot is free, an invalid request is refused with the reason, not as busy.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let invalid = loop {
        let outputs = collect(client.submit(PreprocessedRequest::greedy("c", vec![], 5))).await;
        if !outputs.is_empty() || Instant::now() > deadline {
            break outputs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        matches!(invalid.last().and_then(|o| o.finish_reason.clone()), Some(FinishReason::Invalid(_))),
        "{invalid:?}"
    );
}

#[tokio::test]
async fn a_worker_that_dies_is_lost_and_its_streams_end_without_a_finish_reason() {
    let context = Context::new();
    let server = server(&context, mocker(1.0), 8);
    let (client, mut statuses, _) = connected(&context, &server, Duration::from_millis(800)).await;
    let mut stream = client.submit(PreprocessedRequest::greedy("a", vec![1, 2, 3], 10_000));
    assert!(stream.next().await.is_some());
    drop(server);
    let rest = tokio::time::timeout(Duration::from_secs(10), collect(stream)).await.expect("the stream ends");
    assert!(rest.iter().all(|o| o.finish_reason.is_none()), "{rest:?}");
    assert_eq!(statuses.recv().await, Some(WorkerStatus::Lost));
    assert!(!client.is_alive());
    let after = collect(client.submit(PreprocessedRequest::greedy("b", vec![1], 3))).await;
    assert!(after.is_empty(), "a lost worker takes no requests");
}

#[tokio::test]
async fn unreadable_messages_are_counted_and_the_connection_stays() {
    let context = Context::new();
    let server = server(&context, mocker(1000.0), 8);
    let mut raw = SocketReader::new(dealer_socket(&context, server.endpoint()).unwrap()).unwrap();
    for garbage in [&b"\xc1\xc1"[..], b"", &[0x92, 0x01]] {
        raw.socket().send(garbage, 0).unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), raw.recv()).await.unwrap().unwrap();
        let message: FromWorker = decode(&reply[0]).unwrap();
        assert!(matches!(message, FromWorker::Unreadable { .. }), "{message:?}");
    }
    raw.socket().send(encode(&ToWorker::Ping { version: PROTOCOL_VERSION }), 0).unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), raw.recv()).await.unwrap().unwrap();
    assert!(matches!(decode::<FromWorker>(&reply[0]), Ok(FromWorker::Hello { .. })));
    assert_eq!(server.stats.unreadable.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_snapshot_bigger_than_one_frame_arrives_whole() {
    use crate::core::protocol::StoredBlock;
    let context = Context::new();
    let mut ledger = crate::core::engine::KvLedger::default();
    // Two chains, the first longer than a frame holds.
    let chain = |first: u64, len: u64, parent| KvEvent::Stored {
        parent_hash: parent,
        blocks: (first..first + len).map(|hash| StoredBlock { hash, tokens_hash: hash }).collect(),
    };
    let blocks = SNAPSHOT_BLOCKS_PER_FRAME as u64 + 10;
    ledger.record(&[chain(1, blocks, None), chain(1 << 40, 3, Some(5))]);
    let frames = snapshot_frames(42, ledger.snapshot()).len();
    let engine =
        Arc::new(crate::core::engine::HandKeptLedger { engine: mocker(1000.0), ledger: std::sync::Mutex::new(ledger) });
    let server = server_with_published(&context, engine, 8, 42);
    let (client, _statuses, _) = connected(&context, &server, Duration::from_secs(5)).await;
    let (first, second) =
        tokio::join!(client.kv_snapshot(Duration::from_secs(10)), client.kv_snapshot(Duration::from_secs(10)));
    let snapshot = first.expect("a snapshot");
    assert_eq!(second.as_ref(), Some(&snapshot), "a second asker gets the same picture");
    assert_eq!(snapshot.next_seq, 42);
    let stored: Vec<u64> = snapshot
        .events
        .iter()
        .flat_map(|event| match event {
            KvEvent::Stored { blocks, .. } => blocks.iter().map(|b| b.hash).collect(),
            _ => vec![],
        })
        .collect();
    assert_eq!(stored.len() as u64, blocks + 3);
    assert_eq!(stored[..blocks as usize], (1..=blocks).collect::<Vec<_>>()[..], "in storing order");
    assert_eq!(frames, 2);
}

#[tokio::test]
async fn a_router_that_stops_pinging_has_its_requests_cancelled() {
    let context = Context::new();
    let engine = mocker(1.0);
    let server = server(&context, engine.clone(), 8);
    // A router that sends one request and then nothing: no pings, as if it hung.
    let _raw = generating(&context, &server, &engine).await;
    cancelled_within(
        HEARTBEAT * (PEER_TIMEOUT_PINGS + 12),
        &engine,
        &server,
        "the worker kept generating for a router that went silent",
    )
    .await;
}

#[tokio::test]
async fn a_request_sent_after_the_workers_connection_dropped_ends_at_once() {
    let context = Context::new();
    let server = server(&context, mocker(1000.0), 8);
    // Long enough that the heartbeat does not declare the worker lost during the test.
    let dead_after = Duration::from_secs(30);
    let (client, _statuses, _) = connected(&context, &server, dead_after).await;
    drop(server);
    // Until libzmq sees the connection close, a request may still go into it (and wait for the heartbeat);
    // after, one ends at once, with no output and no finish reason, for the router to send elsewhere.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = client.submit(PreprocessedRequest::greedy("after", vec![1, 2, 3], 5));
        if let Ok(outputs) = tokio::time::timeout(Duration::from_millis(200), collect(stream)).await {
            assert!(outputs.is_empty(), "{outputs:?}");
            break;
        }
        assert!(Instant::now() < deadline, "requests still waited for a worker whose connection was gone");
    }
}

#[tokio::test]
async fn a_dropped_connection_ends_the_streams_at_once_not_after_the_heartbeat_timeout() {
    let context = Context::new();
    let server = server(&context, mocker(1.0), 8);
    let dead_after = Duration::from_secs(30);
    let (client, mut statuses, _) = connected(&context, &server, dead_after).await;
    let mut stream = client.submit(PreprocessedRequest::greedy("a", vec![1, 2, 3], 10_000));
    assert!(stream.next().await.is_some());
    drop(server);
    let rest = tokio::time::timeout(Duration::from_secs(5), collect(stream)).await.expect("the stream ends");
    assert!(rest.iter().all(|o| o.finish_reason.is_none()), "{rest:?}");
    let lost = tokio::time::timeout(Duration::from_secs(5), statuses.recv()).await;
    assert_eq!(lost, Ok(Some(WorkerStatus::Lost)));
    assert!(!client.is_alive());
}

#[tokio::test]
async fn a_router_whose_connection_closes_has_its_requests_cancelled_at_the_next_output() {
    let context = Context::new();
    let engine = mocker(1.0);
    let server = server(&context, engine.clone(), 8);
    drop(generating(&context, &server, &engine).await);
    // Well inside the silence it takes the ping sweep to give up on a router.
    cancelled_within(
        HEARTBEAT * PEER_TIMEOUT_PINGS / 2,
        &engine,
        &server,
        "the worker kept generating for a router that closed its connection",
    )
    .await;
}

/// The next message a bare ROUTER (standing in for a worker) receives, and who sent it.
async fn next_from_router(worker: &mut SocketReader) -> (Vec<u8>, ToWorker) {
    let frames = tokio::time::timeout(Duration::from_secs(5), worker.recv()).await;
    let frames = frames.expect("the client sends").unwrap();
    (frames[0].to_vec(), decode::<ToWorker>(&frames[1]).unwrap())
}

/// A bare ROUTER standing in for a worker, that has answered its client's first ping with a Hello.
async fn bare_worker(
    context: &Context,
    dead_after: Duration,
) -> (SocketReader, WorkerClient, mpsc::UnboundedReceiver<WorkerStatus>) {
    let mut worker = SocketReader::new(router_socket(context, "tcp://127.0.0.1:*").unwrap()).unwrap();
    let endpoint = bound_endpoint(worker.socket()).unwrap();
    let (status, mut statuses) = mpsc::unbounded_channel();
    let client = WorkerClient::connect(context, &endpoint, dead_after, status).unwrap();
    let (peer, ping) = next_from_router(&mut worker).await;
    assert!(matches!(ping, ToWorker::Ping { .. }));
    let hello = encode(&FromWorker::Hello { version: PROTOCOL_VERSION, instance: instance(7) });
    worker.socket().send_multipart([peer.as_slice(), hello.as_slice()], 0).unwrap();
    alive(&mut statuses).await;
    (worker, client, statuses)
}

#[tokio::test]
async fn snapshot_frames_nobody_asked_for_are_dropped() {
    use crate::core::protocol::StoredBlock;
    let context = Context::new();
    let (mut worker, client, mut statuses) = bare_worker(&context, Duration::from_secs(5)).await;
    let frame = |hash: u64, last: bool| {
        let blocks = vec![StoredBlock { hash, tokens_hash: hash }];
        let events = KvEvents(vec![KvEvent::Stored { parent_hash: None, blocks }]);
        encode(&FromWorker::KvSnapshot { next_seq: hash, events, last })
    };
    let (peer, _) = next_from_router(&mut worker).await;
    for hash in 100..110 {
        worker.socket().send_multipart([peer.as_slice(), frame(hash, false).as_slice()], 0).unwrap();
    }
    // A Hello with a new id is announced once the client has read everything sent before it.
    let hello = encode(&FromWorker::Hello { version: PROTOCOL_VERSION, instance: instance(8) });
    worker.socket().send_multipart([peer.as_slice(), hello.as_slice()], 0).unwrap();
    assert_eq!(alive(&mut statuses).await.id, 8);
    let asked = tokio::spawn(async move { client.kv_snapshot(Duration::from_secs(5)).await });
    while !matches!(next_from_router(&mut worker).await, (_, ToWorker::KvSnapshot)) {}
    worker.socket().send_multipart([peer.as_slice(), frame(7, true).as_slice()], 0).unwrap();
    let snapshot = asked.await.unwrap().expect("the snapshot asked for");
    assert_eq!(snapshot.next_seq, 7);
    assert_eq!(snapshot.events.len(), 1, "{:?}", snapshot.events);
}

#[tokio::test]
async fn a_worker_that_hangs_finds_its_migrated_requests_cancelled_when_it_resumes() {
    let context = Context::new();
    let (mut worker, client, mut statuses) = bare_worker(&context, Duration::from_millis(300)).await;
    let stream = client.submit(PreprocessedRequest::greedy("a", vec![1, 2, 3], 10_000));
    let stream_id = loop {
        if let (_, ToWorker::Generate { stream, .. }) = next_from_router(&mut worker).await {
            break stream;
        }
    };
    // It hangs: reads nothing, answers nothing. The router gives up on it and the stream ends for migration.
    let rest = tokio::time::timeout(Duration::from_secs(5), collect(stream)).await.expect("the stream ends");
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(statuses.recv().await, Some(WorkerStatus::Lost));
    // It resumes: waiting for it, among the pings, is the cancel of the request that went elsewhere.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "the resumed worker was never told to stop the request");
        if let (_, ToWorker::Cancel { stream }) = next_from_router(&mut worker).await {
            assert_eq!(stream, stream_id);
            break;
        }
    }
}

#[test]
fn plane_sockets_refuse_oversized_messages_as_they_are_announced() {
    let context = Context::new();
    let worker = router_socket(&context, "tcp://127.0.0.1:*").unwrap();
    assert_eq!(worker.get_maxmsgsize().unwrap(), MAX_MESSAGE);
    let router = dealer_socket(&context, &bound_endpoint(&worker).unwrap()).unwrap();
    assert_eq!(router.get_maxmsgsize().unwrap(), MAX_MESSAGE);
    let subscriber = crate::core::plane::event::subscribe_socket(&context, &[], 16).unwrap();
    assert_eq!(subscriber.get_maxmsgsize().unwrap(), crate::core::plane::event::MAX_EVENT_MESSAGE);
}

#[tokio::test]
async fn with_a_key_only_members_are_answered() {
    use crate::core::trust::ClusterKey;
    let key = ClusterKey::generate().unwrap();
    let keyed = Context::with_key(Some(&key));
    let server = server(&keyed, mocker(1000.0), 8);
    // A member joins and streams as in an open cluster.
    let (client, _statuses, instance) = connected(&keyed, &server, Duration::from_secs(5)).await;
    assert_eq!(instance.id, 1);
    let outputs = collect(client.submit(PreprocessedRequest::greedy("r", (1..40).collect(), 6))).await;
    assert_eq!(outputs.last().and_then(|o| o.finish_reason.clone()), Some(FinishReason::Length));
    // A stranger's pings and requests are dropped unanswered and counted.
    let mut stranger = SocketReader::new(dealer_socket(&Context::new(), server.endpoint()).unwrap()).unwrap();
    let ping = encode(&ToWorker::Ping { version: PROTOCOL_VERSION });
    let unreadable = server.stats.unreadable.load(Ordering::Relaxed);
    while server.stats.unreadable.load(Ordering::Relaxed) < unreadable + 3 {
        stranger.socket().send(&ping[..], zmq::DONTWAIT).ok();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = tokio::time::timeout(Duration::from_millis(200), stranger.recv()).await;
    assert!(answer.is_err(), "a stranger was answered");
    // A member with another key is no member.
    let other = Context::with_key(Some(&ClusterKey::generate().unwrap()));
    let (status, mut statuses) = mpsc::unbounded_channel();
    let _outsider = WorkerClient::connect(&other, server.endpoint(), Duration::from_secs(5), status).unwrap();
    let heard = tokio::time::timeout(Duration::from_millis(500), statuses.recv()).await;
    assert!(heard.is_err(), "a worker answered a router with another key: {heard:?}");
}

#[tokio::test]
async fn with_a_key_a_captured_request_sent_again_is_not_run_twice() {
    use crate::core::trust::ClusterKey;
    let keyed = Context::with_key(Some(&ClusterKey::generate().unwrap()));
    let server = server(&keyed, mocker(1000.0), 8);
    let seals = keyed.seals().unwrap().clone();
    let request = PreprocessedRequest::greedy("r", (1..40).collect(), 3);
    let captured = sealed(Some(&seals), TO_WORKER, encode(&ToWorker::Generate { stream: 1, request }));
    // The member's request runs and finishes.
    let mut member = SocketReader::new(dealer_socket(&keyed, server.endpoint()).unwrap()).unwrap();
    member.socket().send(&captured[..], 0).unwrap();
    let mut seen = Seen::default();
    loop {
        let frames = tokio::time::timeout(Duration::from_secs(5), member.recv()).await.unwrap().unwrap();
        let body = opened(Some(&seals), TO_ROUTER, &frames[0], &mut seen).unwrap();
        let finished = match decode::<FromWorker>(&body).unwrap() {
            FromWorker::Batch(messages) => messages
                .into_iter()
                .any(|m| matches!(m, FromWorker::Output { output: EngineOutput { finish_reason: Some(_), .. }, .. })),
            FromWorker::Output { output, .. } => output.finish_reason.is_some(),
            _ => false,
        };
        if finished {
            break;
        }
    }
    assert_eq!(server.stats.accepted.load(Ordering::Relaxed), 1);
    // Someone who captured it sends it again, from their own connection and from the member's: dropped unrun.
    let mut replayer = SocketReader::new(dealer_socket(&Context::new(), server.endpoint()).unwrap()).unwrap();
    let unreadable = server.stats.unreadable.load(Ordering::Relaxed);
    replayer.socket().send(&captured[..], 0).unwrap();
    member.socket().send(&captured[..], 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.stats.unreadable.load(Ordering::Relaxed) < unreadable + 2 {
        assert!(Instant::now() < deadline, "the replays were not dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.stats.accepted.load(Ordering::Relaxed), 1, "a replayed request ran again");
    assert!(tokio::time::timeout(Duration::from_millis(200), replayer.recv()).await.is_err(), "a replay was answered");
}

#[tokio::test]
async fn with_a_key_a_captured_answer_sent_again_is_not_delivered_twice() {
    use crate::core::trust::ClusterKey;
    let keyed = Context::with_key(Some(&ClusterKey::generate().unwrap()));
    // A bare worker with the key: its messages sealed as a worker's are.
    let mut worker = SocketReader::new(router_socket(&keyed, "tcp://127.0.0.1:*").unwrap()).unwrap();
    let endpoint = bound_endpoint(worker.socket()).unwrap();
    let seals = keyed.seals().unwrap().clone();
    let (status, mut statuses) = mpsc::unbounded_channel();
    let client = WorkerClient::connect(&keyed, &endpoint, Duration::from_secs(5), status).unwrap();
    let mut seen = Seen::default();
    async fn next(worker: &mut SocketReader, seals: &Seals, seen: &mut Seen) -> (Vec<u8>, ToWorker) {
        let frames = tokio::time::timeout(Duration::from_secs(5), worker.recv()).await.unwrap().unwrap();
        let body = opened(Some(seals), TO_WORKER, &frames[1], seen).unwrap();
        (frames[0].to_vec(), decode::<ToWorker>(&body).unwrap())
    }
    let (peer, _) = next(&mut worker, &seals, &mut seen).await;
    let send = |worker: &SocketReader, message: &[u8]| {
        worker.socket().send_multipart([peer.as_slice(), message], 0).unwrap();
    };
    let hello = FromWorker::Hello { version: PROTOCOL_VERSION, instance: instance(7) };
    send(&worker, &sealed(Some(&seals), TO_ROUTER, encode(&hello)));
    alive(&mut statuses).await;
    let stream = client.submit(PreprocessedRequest::greedy("a", vec![1, 2, 3], 2));
    let stream_id = loop {
        if let (_, ToWorker::Generate { stream, .. }) = next(&mut worker, &seals, &mut seen).await {
            break stream;
        }
    };
    let output = |token: u32, finish_reason| FromWorker::Output {
        stream: stream_id,
        output: EngineOutput { token_ids: vec![token], finish_reason, ..EngineOutput::default() },
    };
    let first = sealed(Some(&seals), TO_ROUTER, encode(&output(10, None)));
    send(&worker, &first);
    send(&worker, &first);
    send(&worker, &sealed(Some(&seals), TO_ROUTER, encode(&output(11, Some(FinishReason::Length)))));
    let tokens: Vec<u32> = collect(stream).await.into_iter().flat_map(|o| o.token_ids).collect();
    assert_eq!(tokens, [10, 11], "a replayed chunk repeated its tokens");
    assert_eq!(client.take_dropped()[2], ("replayed", 1));
}
