use super::*;

/// Bytes that differ at every position and between regions.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn fill(region: &Region, seed: u8) {
    // SAFETY: no transfer is running on it.
    unsafe { region.bytes_mut(0, region.len()).unwrap().copy_from_slice(&pattern(seed, region.len() as usize)) };
}

fn read(region: &Region, offset: u64, len: u64) -> Vec<u8> {
    // SAFETY: no transfer is running on it.
    unsafe { region.bytes(offset, len).unwrap().to_vec() }
}

async fn agent(
    id: AgentId,
    backend: Option<Backend>,
    key: Option<ClusterKey>,
) -> (Agent, mpsc::Receiver<Notification>) {
    Agent::start(id, AgentSettings { backend, ..AgentSettings::loopback(key) }).unwrap()
}

fn d(region: RegionId, offset: u64, len: u64) -> Descriptor {
    Descriptor { region, offset, len }
}

async fn moves_blocks_both_ways(backend: Backend, key: Option<ClusterKey>) {
    let (source, _) = agent(1, Some(backend), key.clone()).await;
    let (target, mut notifications) = agent(2, Some(backend), key).await;
    // Two regions each, as an engine has K and V pages; 4 MiB so a request spreads over every tcp stream.
    let len = 4 << 20;
    let local: Vec<_> = (0..2).map(|_| source.register(Region::new(len).unwrap())).collect();
    let remote: Vec<_> = (0..2).map(|_| target.register(Region::new(len).unwrap())).collect();
    fill(&local[0].1, 1);
    fill(&local[1].1, 2);
    let peer = source.connect(&target.address()).await.unwrap();
    assert_eq!(peer.backend(), backend);
    // Blocks 0..4 of the first region land at blocks 8..12, block 5 of the second at block 0: adjacent blocks
    // merge, so that is two ranges.
    let block = 64 * 1024;
    let locals = [d(0, 0, block), d(0, block, block), d(0, 2 * block, 2 * block), d(1, 5 * block, block)];
    let remotes = [d(0, 8 * block, block), d(0, 9 * block, block), d(0, 10 * block, 2 * block), d(1, 0, block)];
    let stats = source.transfer(&peer, Direction::Write, &locals, &remotes, Some(b"req-1")).await.unwrap();
    assert_eq!(stats, TransferStats { bytes: 5 * block, ranges: 2 });
    let note = notifications.try_recv().expect("the notification is there once the transfer completed");
    assert_eq!(note, Notification { from: 1, message: b"req-1".to_vec() });
    assert_eq!(read(&remote[0].1, 8 * block, 4 * block), read(&local[0].1, 0, 4 * block));
    assert_eq!(read(&remote[1].1, 0, block), read(&local[1].1, 5 * block, block));
    assert!(read(&remote[0].1, 0, 8 * block).iter().all(|&b| b == 0), "nothing else was written");

    // A whole region's worth, read back into the second local region.
    fill(&remote[1].1, 9);
    let stats = source.transfer(&peer, Direction::Read, &[d(1, 0, len)], &[d(1, 0, len)], None).await.unwrap();
    assert_eq!(stats.bytes, len);
    assert_eq!(read(&local[1].1, 0, len), pattern(9, len as usize));
    assert!(notifications.try_recv().is_err(), "no notification was asked for");

    // Nothing to move (the reader had it all): the notification still goes, to end the holder's lease.
    let stats = source.transfer(&peer, Direction::Read, &[], &[], Some(b"lease")).await.unwrap();
    assert_eq!(stats.bytes, 0);
    let note = tokio::time::timeout(Duration::from_secs(10), notifications.recv()).await;
    assert_eq!(note.ok().flatten(), Some(Notification { from: 1, message: b"lease".to_vec() }));
}

#[tokio::test]
async fn tcp_moves_blocks_both_ways_and_notifies_after_the_data() {
    moves_blocks_both_ways(Backend::Tcp, None).await;
}

#[tokio::test]
async fn shm_moves_blocks_both_ways_and_notifies_after_the_data() {
    moves_blocks_both_ways(Backend::Shm, None).await;
}

#[tokio::test]
async fn with_a_key_both_backends_move_blocks_as_without() {
    for backend in [Backend::Tcp, Backend::Shm] {
        moves_blocks_both_ways(backend, Some(ClusterKey::generate().unwrap())).await;
    }
}

/// Passes bytes from `from` to `to`, keeping a copy in `record`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buffer).await {
        record.lock().unwrap().extend_from_slice(&buffer[..n]);
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
}

/// A tcp forwarder to `target` on loopback that keeps a copy of every byte it passes, both ways.
async fn tap(target: &str) -> (String, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (target, record) = (target.strip_prefix("tcp://").unwrap().to_string(), seen.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            let ((client_in, client_out), (server_in, server_out)) = (client.into_split(), server.into_split());
            tokio::spawn(pump(client_in, server_out, record.clone()));
            tokio::spawn(pump(server_in, client_out, record.clone()));
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn with_a_key_what_crosses_the_network_is_unreadable() {
    let secret = b"page of the KV of a secret prompt ";
    for key in [None, Some(ClusterKey::generate().unwrap())] {
        let (source, _) = agent(1, Some(Backend::Tcp), key.clone()).await;
        let (target, mut notifications) = agent(2, Some(Backend::Tcp), key.clone()).await;
        let len = 1 << 20;
        let (_, local) = source.register(Region::new(len).unwrap());
        let (_, remote) = target.register(Region::new(len).unwrap());
        // SAFETY: no transfer is running on it.
        unsafe {
            let bytes = local.bytes_mut(0, len).unwrap();
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = secret[i % secret.len()];
            }
        }
        let (addr, seen) = tap(&target.address()).await;
        let peer = source.connect(&addr).await.unwrap();
        source
            .transfer(&peer, Direction::Write, &[d(0, 0, len)], &[d(0, 0, len)], Some(b"the notification"))
            .await
            .unwrap();
        assert_eq!(read(&remote, 0, len), read(&local, 0, len));
        assert_eq!(notifications.recv().await.unwrap().message, b"the notification");
        let seen = seen.lock().unwrap();
        let visible = |what: &[u8]| seen.windows(what.len()).any(|w| w == what);
        assert!(seen.len() as u64 > len, "the tap saw the transfer");
        assert_eq!(visible(&secret[..]), key.is_none(), "KV bytes readable on the wire with key {}", key.is_some());
        assert_eq!(visible(b"the notification"), key.is_none());
    }
}

#[tokio::test]
async fn a_same_host_peer_gets_shm_unless_tcp_is_forced() {
    let (target, _) = agent(2, None, None).await;
    target.register(Region::new(4096).unwrap());
    let (chooser, _) = agent(1, None, None).await;
    assert_eq!(chooser.connect(&target.address()).await.unwrap().backend(), Backend::Shm);
    let (forced, _) = agent(3, Some(Backend::Tcp), None).await;
    assert_eq!(forced.connect(&target.address()).await.unwrap().backend(), Backend::Tcp);
}

#[tokio::test]
async fn bad_descriptors_are_refused_before_anything_moves() {
    for backend in [Backend::Tcp, Backend::Shm] {
        let (source, _) = agent(1, Some(backend), None).await;
        let (target, _) = agent(2, Some(backend), None).await;
        source.register(Region::new(4096).unwrap());
        let (_, remote) = target.register(Region::new(4096).unwrap());
        let peer = source.connect(&target.address()).await.unwrap();
        let refused = [
            (vec![d(0, 0, 16)], vec![], "pairs them one to one"),
            (vec![d(0, 0, 16)], vec![d(0, 0, 32)], "is paired with"),
            (vec![d(3, 0, 16)], vec![d(0, 0, 16)], "local region 3 is not registered"),
            (vec![d(0, 0, 16)], vec![d(7, 0, 16)], "remote region 7 is not registered"),
            (vec![d(0, 4090, 16)], vec![d(0, 0, 16)], "outside region 0"),
            (vec![d(0, 0, 16)], vec![d(0, u64::MAX - 4, 16)], "outside region 0"),
        ];
        for (local, remote_descs, why) in refused {
            let error = source.transfer(&peer, Direction::Write, &local, &remote_descs, None).await.unwrap_err();
            assert!(error.to_string().contains(why), "{backend:?}: {error} (expected {why:?})");
        }
        assert!(read(&remote, 0, 4096).iter().all(|&b| b == 0), "{backend:?}: nothing was written");
    }
}

#[tokio::test]
async fn a_target_refuses_ranges_outside_its_regions_whatever_the_initiator_believes() {
    use crate::core::protocol::transfer::{FrameKind, TransferFrame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (target, _) = agent(2, Some(Backend::Tcp), None).await;
    let (_, region) = target.register(Region::new(4096).unwrap());
    let addr = target.address();
    let mut stream = tokio::net::TcpStream::connect(addr.strip_prefix("tcp://").unwrap()).await.unwrap();
    wire::initiate(&mut stream, 9, None).await.unwrap();
    // A write that runs past the region's end: the target must not take a byte of it.
    let frame = TransferFrame { kind: FrameKind::Write, region: 0, request: 1, offset: 4000, len: 200 };
    stream.write_all(&frame.encode()).await.unwrap();
    stream.write_all(&[0xee; 200]).await.unwrap();
    let failed = wire::expect(&mut stream, FrameKind::Done, "").await.expect_err("the write is refused");
    assert!(failed.to_string().contains("not inside a region"), "{failed}");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    assert!(read(&region, 0, 4096).iter().all(|&b| b == 0), "nothing was written");
}

#[tokio::test]
async fn only_holders_of_the_cluster_key_get_through() {
    let key = ClusterKey::generate().unwrap();
    for backend in [Backend::Tcp, Backend::Shm] {
        let (target, _) = agent(2, Some(backend), Some(key.clone())).await;
        target.register(Region::new(4096).unwrap());
        let (member, _) = agent(1, Some(backend), Some(key.clone())).await;
        member.connect(&target.address()).await.expect("a member connects");
        let (open, _) = agent(3, Some(backend), None).await;
        let error = open.connect(&target.address()).await.err().expect("an open agent is refused");
        assert!(matches!(error, TransferError::Unauthenticated(_)), "{error}");
        let (stranger, _) = agent(4, Some(backend), Some(ClusterKey::generate().unwrap())).await;
        let error = stranger.connect(&target.address()).await.err().expect("another cluster's agent is refused");
        assert!(matches!(error, TransferError::Unauthenticated(_)), "{error}");
        // A keyed initiator does not trust an open target either.
        let (open_target, _) = agent(5, Some(backend), None).await;
        let error = member.connect(&open_target.address()).await.err().expect("an open target is not trusted");
        assert!(matches!(error, TransferError::Unauthenticated(_)), "{error}");
    }
}

#[tokio::test]
async fn a_transfer_to_a_peer_that_is_gone_fails_at_once() {
    for backend in [Backend::Tcp, Backend::Shm] {
        let (source, _) = agent(1, Some(backend), None).await;
        let (target, _) = agent(2, Some(backend), None).await;
        source.register(Region::new(1 << 20).unwrap());
        target.register(Region::new(1 << 20).unwrap());
        let peer = source.connect(&target.address()).await.unwrap();
        drop(target);
        // Its listener and connections close as its tasks end.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let result =
            source.transfer(&peer, Direction::Write, &[d(0, 0, 1 << 20)], &[d(0, 0, 1 << 20)], Some(b"x")).await;
        assert!(result.is_err(), "{backend:?}: a transfer to a dropped agent succeeded");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{backend:?}: took {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn a_target_fed_garbage_answers_or_closes_and_writes_nothing_out_of_bounds() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (target, _) = agent(2, Some(Backend::Tcp), None).await;
    let (_, region) = target.register(Region::new(4096).unwrap());
    let addr = target.address();
    let addr = addr.strip_prefix("tcp://").unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(crate::core::protocol::fuzz::config(200));
    let header = (0u8..12, any::<u32>(), any::<u64>(), 0u64..8192, 0u64..8192);
    let frames = prop::collection::vec((header, prop::collection::vec(any::<u8>(), 0..64)), 1..8);
    for _ in 0..200 {
        let input = frames.new_tree(&mut runner).unwrap().current();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        wire::initiate(&mut stream, 9, None).await.unwrap();
        for ((kind, region_id, request, offset, len), tail) in input {
            let mut bytes = crate::core::protocol::transfer::TransferFrame {
                kind: crate::core::protocol::transfer::FrameKind::Done,
                region: region_id % 3,
                request,
                offset,
                len,
            }
            .encode();
            bytes[4] = kind;
            if stream.write_all(&bytes).await.is_err() || stream.write_all(&tail).await.is_err() {
                break;
            }
        }
        let _ = stream.shutdown().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    }
    // The target still serves a well-behaved peer afterwards.
    let (source, _) = agent(1, Some(Backend::Tcp), None).await;
    let (_, local) = source.register(Region::new(4096).unwrap());
    fill(&local, 3);
    let peer = source.connect(&target.address()).await.unwrap();
    source.transfer(&peer, Direction::Write, &[d(0, 0, 4096)], &[d(0, 0, 4096)], None).await.unwrap();
    assert_eq!(read(&region, 0, 4096), pattern(3, 4096));
}

#[tokio::test]
async fn a_peer_that_says_nothing_is_given_up_on_by_either_side() {
    use tokio::io::AsyncReadExt;
    let quick = std::time::Duration::from_millis(200);
    let settings = || AgentSettings { timeout: quick, ..AgentSettings::loopback(None) };
    // A target that accepts and never answers: the initiator's connect fails within its timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let (initiator, _) = Agent::start(1, settings()).unwrap();
    let started = std::time::Instant::now();
    let error = initiator.connect(&silent_addr).await.err().expect("nobody answers");
    assert!(matches!(error, TransferError::Timeout(_)), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "{:?}", started.elapsed());
    drop(silent);
    // A client that connects to an agent and says nothing is disconnected.
    let (target, _) = Agent::start(2, settings()).unwrap();
    let addr = target.address();
    let mut idle = tokio::net::TcpStream::connect(addr.strip_prefix("tcp://").unwrap()).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the silent connection is still open");
}

#[tokio::test]
async fn an_agent_without_nixl_refuses_its_offer_by_name_and_keeps_the_connection() {
    let (source, _) = agent(1, Some(Backend::Tcp), None).await;
    let (target, _) = agent(2, Some(Backend::Tcp), None).await;
    let (_, local) = source.register(Region::new(4096).unwrap());
    let (_, remote) = target.register(Region::new(4096).unwrap());
    let peer = source.connect(&target.address()).await.unwrap();
    let Link::Tcp(tcp) = &peer.link else { panic!("a tcp peer") };
    match tcp.nixl_offer().await {
        Err(TransferError::Refused(why)) => assert!(why.contains("start it with --transfer-backend nixl"), "{why}"),
        other => panic!("expected a refusal, got {:?}", other.map(|o| o.name)),
    }
    fill(&local, 3);
    source.transfer(&peer, Direction::Write, &[d(0, 0, 4096)], &[d(0, 0, 4096)], None).await.unwrap();
    assert_eq!(read(&remote, 0, 4096), pattern(3, 4096), "the connection still moves data");
    // An agent that does not run NIXL cannot reach anyone through it.
    match source.connect_using(&target.address(), Some(Backend::Nixl)).await {
        Err(TransferError::Unavailable { backend: "nixl", why }) => assert!(why.contains("not started with"), "{why}"),
        other => panic!("expected nixl to be unavailable, got {:?}", other.map(|p| p.backend())),
    }
}

#[tokio::test]
async fn nixl_without_its_library_is_an_error_that_says_where_to_find_it() {
    let Err(missing) = nixl_available() else {
        eprintln!("SKIPPED: libnixl_capi.so loads in this process; the integration tests cover NIXL itself");
        return;
    };
    assert!(missing.contains("LD_LIBRARY_PATH"), "{missing}");
    match Agent::start(1, AgentSettings { backend: Some(Backend::Nixl), ..AgentSettings::loopback(None) }) {
        Err(TransferError::Unavailable { backend: "nixl", why }) => assert_eq!(why, missing),
        Err(other) => panic!("expected nixl to be unavailable, got {other}"),
        Ok(_) => panic!("an agent started without its library"),
    }
}
