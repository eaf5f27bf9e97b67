use super::*;
use crate::core::protocol::plane::Payload;
use crate::core::protocol::{KvEvent, KvEventBatch};
use std::time::Duration;

fn header(publisher: u64, seq: u64) -> FrameHeader {
    FrameHeader { topic: Topic::Kv, publisher, seq }
}

#[test]
fn gaps_and_restarts_are_told_apart_per_publisher() {
    let mut tracker = SeqTracker::default();
    assert_eq!(tracker.observe(header(1, 5)), Continuity::InOrder, "joining mid-stream is no loss");
    assert_eq!(tracker.observe(header(1, 6)), Continuity::InOrder);
    assert_eq!(tracker.observe(header(2, 0)), Continuity::InOrder);
    assert_eq!(tracker.observe(header(1, 9)), Continuity::Gap(2));
    assert_eq!(tracker.observe(header(1, 0)), Continuity::Restarted);
    assert_eq!(tracker.observe(header(1, 1)), Continuity::InOrder);
    let load = FrameHeader { topic: Topic::Load, publisher: 1, seq: 0 };
    assert_eq!(tracker.observe(load), Continuity::InOrder, "topics count separately");
}

fn batch(n: u64) -> KvEventBatch {
    KvEventBatch { worker_id: 4, events: vec![KvEvent::Removed { hashes: vec![n] }] }
}

/// Publishes `batch(i)` for rising i until the subscriber has one (ZMQ's slow joiner drops the first ones);
/// returns the i it got.
async fn first_delivery(publisher: &mut EventPublisher, subscriber: &mut EventSubscriber) -> u64 {
    for i in 0..2000 {
        publisher.publish(&batch(i)).unwrap();
        if let Ok(delivery) = tokio::time::timeout(Duration::from_millis(5), subscriber.next()).await {
            let got = KvEventBatch::from_bytes(&delivery.unwrap().payload).unwrap();
            let KvEvent::Removed { hashes } = &got.events[0] else { panic!("{got:?}") };
            return hashes[0];
        }
    }
    panic!("the subscriber never received anything");
}

#[tokio::test]
async fn messages_arrive_in_order_over_loopback() {
    let context = Context::new();
    let mut publisher = EventPublisher::bind(&context, "tcp://127.0.0.1:*", 7, HIGH_WATER_MARK).unwrap();
    let mut subscriber =
        EventSubscriber::connect(&context, &[publisher.endpoint()], &[Topic::Kv], HIGH_WATER_MARK).unwrap();
    let first = first_delivery(&mut publisher, &mut subscriber).await;
    // Drain what the first round left in flight, then check a run arrives whole and in order.
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), subscriber.next()).await {}
    for i in 10_000..10_100 {
        publisher.publish(&batch(i)).unwrap();
    }
    for i in 10_000..10_100 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), subscriber.next()).await.unwrap().unwrap();
        assert_eq!((delivery.header.publisher, delivery.continuity), (7, Continuity::InOrder));
        let got = KvEventBatch::from_bytes(&delivery.payload).unwrap();
        assert_eq!(got, batch(i));
    }
    assert_eq!((subscriber.lost, subscriber.malformed), (0, 0), "first delivery was {first}");
}

#[tokio::test]
async fn malformed_messages_are_counted_and_skipped() {
    let context = Context::new();
    let raw = context.socket(zmq::PUB).unwrap();
    raw.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = raw.get_last_endpoint().unwrap().unwrap();
    let mut subscriber = EventSubscriber::connect(&context, &[&endpoint], &[Topic::Kv], HIGH_WATER_MARK).unwrap();
    // Wait out the slow joiner with well-formed frames.
    let mut seq = 0u64;
    loop {
        let frames: Vec<Vec<u8>> =
            vec![b"kv".to_vec(), 1u64.to_be_bytes().to_vec(), seq.to_be_bytes().to_vec(), batch(seq).to_bytes()];
        raw.send_multipart(frames, 0).unwrap();
        seq += 1;
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(5), subscriber.next()).await {
            break;
        }
        assert!(seq < 2000, "the subscriber never received anything");
    }
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), subscriber.next()).await {}
    raw.send_multipart(vec![b"kv".to_vec(), vec![1, 2, 3]], 0).unwrap();
    raw.send_multipart(vec![b"kv".to_vec(), vec![0; 3], vec![0; 8], vec![]], 0).unwrap();
    let frames = vec![b"kv".to_vec(), 1u64.to_be_bytes().to_vec(), seq.to_be_bytes().to_vec(), batch(seq).to_bytes()];
    raw.send_multipart(frames, 0).unwrap();
    for _ in 0..2 {
        let skipped = tokio::time::timeout(Duration::from_secs(5), subscriber.next()).await.unwrap();
        assert!(matches!(skipped, Err(PlaneError::Malformed(_))), "{skipped:?}");
    }
    let delivery = tokio::time::timeout(Duration::from_secs(5), subscriber.next()).await.unwrap().unwrap();
    assert_eq!(delivery.header.seq, seq);
    assert_eq!(subscriber.malformed, 2);
}

#[tokio::test]
async fn with_a_key_strangers_read_nothing_and_their_frames_are_dropped() {
    use crate::core::trust::ClusterKey;
    let key = ClusterKey::generate().unwrap();
    let keyed = Context::with_key(Some(&key));
    let mut publisher = EventPublisher::bind(&keyed, "tcp://127.0.0.1:*", 7, HIGH_WATER_MARK).unwrap();
    // A member reads the events as before.
    let mut member = EventSubscriber::connect(&keyed, &[publisher.endpoint()], &[Topic::Kv], HIGH_WATER_MARK).unwrap();
    first_delivery(&mut publisher, &mut member).await;
    // A stranger gets the frames but not the block hashes in them.
    let open = Context::new();
    let mut stranger = EventSubscriber::connect(&open, &[publisher.endpoint()], &[Topic::Kv], HIGH_WATER_MARK).unwrap();
    let received = loop {
        publisher.publish(&batch(1)).unwrap();
        if let Ok(delivery) = tokio::time::timeout(Duration::from_millis(5), stranger.next()).await {
            break delivery.unwrap();
        }
    };
    assert!(KvEventBatch::from_bytes(&received.payload).is_err(), "a stranger decoded a sealed batch");
    // A member with another key, or a stranger publishing into a member: dropped and counted.
    let other = Context::with_key(Some(&ClusterKey::generate().unwrap()));
    let mut outsider =
        EventSubscriber::connect(&other, &[publisher.endpoint()], &[Topic::Kv], HIGH_WATER_MARK).unwrap();
    let refused = loop {
        publisher.publish(&batch(2)).unwrap();
        if let Ok(delivery) = tokio::time::timeout(Duration::from_millis(5), outsider.next()).await {
            break delivery;
        }
    };
    assert!(matches!(refused, Err(PlaneError::Malformed(FrameError::Unsealed))), "{refused:?}");
    assert_eq!((outsider.malformed, outsider.lost), (1, 0), "an unopened frame moves no sequence");
}

#[tokio::test]
async fn with_a_key_a_captured_event_sent_again_is_dropped_not_taken_for_a_restart() {
    use crate::core::trust::ClusterKey;
    let keyed = Context::with_key(Some(&ClusterKey::generate().unwrap()));
    let mut publisher = EventPublisher::bind(&keyed, "tcp://127.0.0.1:*", 7, HIGH_WATER_MARK).unwrap();
    let mut member = EventSubscriber::connect(&keyed, &[publisher.endpoint()], &[Topic::Kv], HIGH_WATER_MARK).unwrap();
    // An eavesdropper records one message's frames as they go by.
    let open = Context::new();
    let tap = subscribe_socket(&open, &[Topic::Kv], HIGH_WATER_MARK).unwrap();
    tap.connect(publisher.endpoint()).unwrap();
    let mut tap = SocketReader::new(tap).unwrap();
    first_delivery(&mut publisher, &mut member).await;
    let captured = loop {
        publisher.publish(&batch(5)).unwrap();
        if let Ok(frames) = tokio::time::timeout(Duration::from_millis(5), tap.recv()).await {
            break frames.unwrap();
        }
    };
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), member.next()).await {}
    // and sends it again from a publisher of its own that the member hears.
    let replayer = publish_socket(&open, "tcp://127.0.0.1:*", HIGH_WATER_MARK).unwrap();
    member.add_publisher(&crate::core::plane::bound_endpoint(&replayer).unwrap()).unwrap();
    let replayed = loop {
        let frames: Vec<&[u8]> = captured.iter().map(|frame| &frame[..]).collect();
        replayer.send_multipart(frames, 0).unwrap();
        if let Ok(delivery) = tokio::time::timeout(Duration::from_millis(5), member.next()).await {
            break delivery;
        }
    };
    assert!(matches!(replayed, Err(PlaneError::Malformed(FrameError::Replayed))), "{replayed:?}");
    assert_eq!(member.restarts, 0, "an old number replayed would read as the publisher restarting");
    // The publisher's own next message is still in order.
    publisher.publish(&batch(6)).unwrap();
    let next = loop {
        match tokio::time::timeout(Duration::from_secs(5), member.next()).await.unwrap() {
            Ok(delivery) => break delivery,
            Err(PlaneError::Malformed(FrameError::Replayed)) => continue,
            Err(other) => panic!("{other}"),
        }
    };
    assert_eq!(next.continuity, Continuity::InOrder);
    assert_eq!(KvEventBatch::from_bytes(&next.payload).unwrap(), batch(6));
}
