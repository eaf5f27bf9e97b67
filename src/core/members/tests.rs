use super::*;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::model::{Model, ModelSource};
use crate::core::protocol::discovery::Role;
use crate::core::worker::{PlaneSettings, expose};

/// The next change that `wanted` accepts, skipping others; panics after 10 s.
async fn next_matching(members: &mut Members, wanted: impl Fn(&Change) -> bool) -> Change {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, members.next()).await {
            Ok(Some(change)) if wanted(&change) => return change,
            Ok(Some(_)) => {}
            Ok(None) => panic!("discovery stopped"),
            Err(_) => panic!("no such change in 10 s"),
        }
    }
}

#[tokio::test]
async fn a_worker_is_followed_from_discovery_to_its_events_and_its_departure() {
    let model = Model::load(&ModelSource::Builtin, None).unwrap();
    let cluster = crate::core::discovery::TempClusterFile::new();
    let discovery = &cluster.discovery;
    let engine = Arc::new(MockerEngine::spawn(7, MockerConfig::default(), (0..1000).collect()));
    let worker =
        expose(engine, &model, 16, &PlaneSettings::loopback(Role::Decode, "members", None), discovery).unwrap();
    let endpoint = worker.instance.request_addr.clone();
    let mut members = Members::watch(discovery, "members", Duration::from_secs(5), None, &Topic::ALL).unwrap();

    let found = next_matching(&mut members, |c| matches!(c, Change::Found(_))).await;
    assert!(matches!(&found, Change::Found(e) if *e == endpoint), "{found:?}");
    let Change::Answered { endpoint: at, instance } =
        next_matching(&mut members, |c| matches!(c, Change::Answered { .. })).await
    else {
        unreachable!()
    };
    assert_eq!((at.as_str(), instance.id), (endpoint.as_str(), 7));
    assert!(members.client(&endpoint).is_some());

    // Nothing is delivered before the owner subscribes; once it has, the worker's load reports come.
    members.subscribe(&endpoint, &instance).unwrap();
    let delivered = next_matching(&mut members, |c| matches!(c, Change::Delivered { .. })).await;
    let Change::Delivered { endpoint: from, delivery } = delivered else { unreachable!() };
    assert_eq!((from.as_str(), delivery.header.publisher), (endpoint.as_str(), 7));

    // Subscribed as another process (a restart under a new id): the old publisher's messages are not its.
    members.subscribe(&endpoint, &Instance { id: 8, ..instance.clone() }).unwrap();
    let quiet = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Some(Change::Delivered { delivery, .. }) = members.next().await {
                return delivery.header.publisher;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "a message from publisher {quiet:?} was delivered for id 8");

    drop(worker);
    let left = next_matching(&mut members, |c| matches!(c, Change::Left(_))).await;
    assert!(matches!(&left, Change::Left(e) if *e == endpoint), "{left:?}");
    assert!(members.client(&endpoint).is_none(), "its connection is closed with its departure");
}

#[tokio::test]
async fn events_count_as_the_worker_whose_connection_they_came_over_whatever_id_they_claim() {
    use crate::core::plane::EventPublisher;
    use crate::core::protocol::plane::Payload;
    use crate::core::protocol::{KvEvent, KvEventBatch};
    let cluster = crate::core::discovery::TempClusterFile::new();
    let mut members =
        Members::watch(&cluster.discovery, "members", Duration::from_secs(5), None, &[Topic::Kv]).unwrap();
    let context = Context::new();
    // Worker 7, and a member (worker 9 by its record) that publishes under 7's id from its own socket.
    let mut honest = EventPublisher::bind(&context, "tcp://127.0.0.1:*", 7, HIGH_WATER_MARK).unwrap();
    let mut forger = EventPublisher::bind(&context, "tcp://127.0.0.1:*", 7, HIGH_WATER_MARK).unwrap();
    let record = |id: u64, events: &str| Instance {
        id,
        role: Role::Decode,
        model: "m".into(),
        namespace: "members".into(),
        request_addr: String::new(),
        event_addr: events.to_string(),
        transfer_addr: None,
        card: crate::core::protocol::discovery::ModelCardSummary {
            block_size: 16,
            context_length: 4096,
            kv_blocks: 1024,
            tokenizer_hash: 1,
        },
        device: String::new(),
        http_addr: None,
        adapters: Vec::new(),
    };
    members.subscribe("tcp://127.0.0.1:1", &record(7, honest.endpoint())).unwrap();
    members.subscribe("tcp://127.0.0.1:2", &record(9, forger.endpoint())).unwrap();
    let batch = |hash: u64| KvEventBatch { worker_id: 7, events: vec![KvEvent::Removed { hashes: vec![hash] }] };
    let (mut honest_heard, mut forgery_refused) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(honest_heard && forgery_refused) {
        assert!(tokio::time::Instant::now() < deadline, "heard {honest_heard}, refused {forgery_refused}");
        honest.publish(&batch(1)).unwrap();
        forger.publish(&batch(2)).unwrap();
        let Ok(Some(change)) = tokio::time::timeout(Duration::from_millis(20), members.next()).await else { continue };
        match change {
            Change::Delivered { endpoint, delivery } => {
                assert_eq!(endpoint, "tcp://127.0.0.1:1", "a forgery was delivered as worker 7's");
                let batch = KvEventBatch::from_bytes(&delivery.payload).unwrap();
                assert_eq!(batch.events, [KvEvent::Removed { hashes: vec![1] }]);
                honest_heard = true;
            }
            Change::Malformed(PlaneError::Malformed(FrameError::NotItsWorker { worker: 9, claimed: 7 })) => {
                forgery_refused = true;
            }
            other => panic!("{other:?}"),
        }
    }
}
