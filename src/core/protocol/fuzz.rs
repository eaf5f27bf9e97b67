//! Property tests over every decoder of bytes a peer chooses: arbitrary bytes never panic (nor allocate what
//! their length prefixes claim), valid encodings round-trip, and every truncation or flipped byte of a valid
//! encoding is refused or decoded, never a crash. Seeded by proptest; a few hundred cases each keeps the
//! suite quick while covering the shapes. The discovery records and the HTTP bodies have their own next to
//! their decoders (`discovery`, `frontend`).
use super::external::{decode_msgpack_batch, decode_trtllm_json};
use super::plane::{Payload, decode_header};
use super::request::{FromWorker, Refusal, ToWorker, decode, encode};
use super::{
    Constraint, EngineOutput, FinishReason, HandOff, HeldEmbeddings, HeldKv, KvEvent, KvEventBatch, KvEvents, KvLayout,
    LoadMetrics, MediaInput, Pooling, PreprocessedRequest, SamplingOptions, StopConditions, StoredBlock, TokenLogprob,
    WorkerStats,
};
use proptest::prelude::*;

/// No regression files in the source tree; failures print their seed and shrunk case.
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn event() -> impl Strategy<Value = KvEvent> {
    prop_oneof![
        (any::<Option<u64>>(), prop::collection::vec((any::<u64>(), any::<u64>()), 0..20)).prop_map(
            |(parent_hash, blocks)| KvEvent::Stored {
                parent_hash,
                blocks: blocks.into_iter().map(|(hash, tokens_hash)| StoredBlock { hash, tokens_hash }).collect(),
            }
        ),
        prop::collection::vec(any::<u64>(), 0..20).prop_map(|hashes| KvEvent::Removed { hashes }),
        Just(KvEvent::Cleared),
    ]
}

fn batch() -> impl Strategy<Value = KvEventBatch> {
    (any::<u64>(), prop::collection::vec(event(), 0..8))
        .prop_map(|(worker_id, events)| KvEventBatch { worker_id, events })
}

fn held() -> impl Strategy<Value = HeldKv> {
    (".{0,20}", any::<u64>(), any::<u32>(), prop::collection::vec(any::<u32>(), 0..8), any::<(u32, u64, u32, u32)>())
        .prop_map(|(agent, lease, tokens, pages, (block_size, page_bytes, first_region, regions))| HeldKv {
            agent,
            lease,
            tokens,
            pages,
            layout: KvLayout { block_size, page_bytes, first_region, regions },
            engine_params: None,
        })
}

fn request() -> impl Strategy<Value = PreprocessedRequest> {
    let hand_off =
        prop_oneof![Just(HandOff::None), Just(HandOff::Hold), held().prop_map(|held| HandOff::From(Box::new(held)))];
    (
        ".{0,12}",
        prop::collection::vec(any::<u32>(), 0..64),
        any::<Option<u64>>(),
        0u32..100_000,
        any::<Option<u32>>(),
        (
            hand_off,
            any::<u32>(),
            constraint(),
            prop::option::of(any::<bool>()),
            media(),
            prop::option::of("[a-z-]{1,12}"),
        ),
    )
        .prop_map(
            |(
                request_id,
                token_ids,
                seed,
                max_tokens,
                logprobs,
                (hand_off, generated, constraint, pooling, media, adapter),
            )| {
                PreprocessedRequest {
                    request_id,
                    token_ids,
                    sampling: SamplingOptions { seed, ..SamplingOptions::default() },
                    stop: StopConditions { max_tokens, min_tokens: 0, stop_token_ids: vec![max_tokens] },
                    logprobs,
                    hand_off,
                    generated,
                    constraint,
                    pooling: pooling.map(|normalize| Pooling { normalize }),
                    media: (!media.is_empty()).then(|| media.into()),
                    adapter,
                }
            },
        )
}

fn media() -> impl Strategy<Value = Vec<MediaInput>> {
    let one = (any::<u32>(), any::<u32>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..48), held_embeddings())
        .prop_map(|(start, end, hash, data, encoded)| MediaInput { start, end, hash, data: data.into(), encoded });
    prop::collection::vec(one, 0..3)
}

fn held_embeddings() -> impl Strategy<Value = Option<HeldEmbeddings>> {
    let held = (".{0,24}", any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>());
    prop::option::of(held.prop_map(|(agent, lease, region, offset, len, checksum)| HeldEmbeddings {
        agent,
        lease,
        region,
        offset,
        len,
        checksum,
    }))
}

fn constraint() -> impl Strategy<Value = Option<Constraint>> {
    prop_oneof![
        Just(None),
        ".{0,40}".prop_map(|text| Some(Constraint::JsonSchema(text))),
        ".{0,40}".prop_map(|text| Some(Constraint::Regex(text))),
        prop::collection::vec(".{0,8}", 0..4).prop_map(|choices| Some(Constraint::Choice(choices))),
        ".{0,40}".prop_map(|text| Some(Constraint::Lark(text))),
    ]
}

fn to_worker() -> impl Strategy<Value = ToWorker> {
    prop_oneof![
        any::<u32>().prop_map(|version| ToWorker::Ping { version }),
        Just(ToWorker::ModelFiles),
        (any::<u64>(), request()).prop_map(|(stream, request)| ToWorker::Generate { stream, request }),
        any::<u64>().prop_map(|stream| ToWorker::Cancel { stream }),
        Just(ToWorker::KvSnapshot),
    ]
}

fn from_worker() -> impl Strategy<Value = FromWorker> {
    let embedding = prop::option::of(prop::collection::vec(-1.0f32..1.0, 0..8));
    let output = (
        prop::collection::vec(any::<u32>(), 0..8),
        any::<Option<u32>>(),
        any::<bool>(),
        prop::option::of(held()),
        embedding,
        prop::collection::vec(held_embeddings(), 0..3),
    )
        .prop_map(|(token_ids, cached_tokens, finished, held, embedding, encoded)| EngineOutput {
            logprobs: token_ids.iter().map(|&token_id| TokenLogprob { token_id, logprob: -1.0, top: vec![] }).collect(),
            token_ids,
            cached_tokens,
            finish_reason: finished.then_some(FinishReason::Length),
            held,
            embedding,
            encoded: encoded.into_iter().flatten().collect(),
        });
    let single = prop_oneof![
        (any::<u64>(), output).prop_map(|(stream, output)| FromWorker::Output { stream, output }),
        (any::<u64>(), prop::collection::vec(event(), 0..4), any::<bool>()).prop_map(|(next_seq, events, last)| {
            FromWorker::KvSnapshot { next_seq, events: KvEvents(events), last }
        }),
        (any::<u64>(), ".{0,20}")
            .prop_map(|(stream, message)| FromWorker::Refused { stream, reason: Refusal::Invalid(message) }),
        ".{0,20}".prop_map(|reason| FromWorker::Unreadable { reason }),
        prop::collection::vec((".{0,8}", ".{0,30}"), 0..3).prop_map(|files| FromWorker::ModelFiles { files }),
    ];
    prop_oneof![single.clone(), prop::collection::vec(single, 0..4).prop_map(FromWorker::Batch)]
}

/// Every prefix, and a copy with each of a few bytes flipped: decoded or refused, never a panic.
fn mangle(bytes: &[u8], flips: &[(usize, u8)], decode: impl Fn(&[u8])) {
    for end in 0..bytes.len() {
        decode(&bytes[..end]);
    }
    let mut flipped = bytes.to_vec();
    for &(at, mask) in flips {
        if !flipped.is_empty() {
            let at = at % flipped.len();
            flipped[at] ^= mask.max(1);
            decode(&flipped);
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<ToWorker>(&bytes);
        let _ = decode::<FromWorker>(&bytes);
        let _ = KvEventBatch::decode(&bytes);
        let _ = LoadMetrics::from_bytes(&bytes);
        let _ = WorkerStats::from_bytes(&bytes);
        let _ = decode_msgpack_batch(&bytes);
        let _ = decode_trtllm_json(&bytes);
        let frames: Vec<&[u8]> = bytes.chunks(8).collect();
        let _ = decode_header(&frames);
    }

    #[test]
    fn huge_length_prefixes_are_refused_without_reserving_them(tag in prop::sample::select(vec![0xdcu8, 0xddu8]), rest in prop::collection::vec(any::<u8>(), 0..16)) {
        // array16 / array32 headers claiming up to 4 G elements, then too few bytes for them.
        let mut bytes = vec![tag, 0xff, 0xff, 0xff, 0xff];
        bytes.extend_from_slice(&rest);
        prop_assert!(KvEventBatch::decode(&bytes).is_err());
        prop_assert!(decode::<FromWorker>(&bytes).is_err());
        prop_assert!(decode_msgpack_batch(&bytes).is_err());
        let mut nested = vec![0x92, 0x01];
        nested.extend_from_slice(&bytes);
        prop_assert!(KvEventBatch::decode(&nested).is_err());
    }

    #[test]
    fn kv_batches_round_trip_and_survive_mangling(batch in batch(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6)) {
        let bytes = batch.encode();
        prop_assert_eq!(KvEventBatch::decode(&bytes).unwrap(), batch.clone());
        let mut reused = KvEventBatch { worker_id: 9, events: vec![KvEvent::Cleared; 3] };
        reused.decode_into(&bytes).unwrap();
        prop_assert_eq!(&reused, &batch);
        for end in 0..bytes.len() {
            prop_assert!(KvEventBatch::decode(&bytes[..end]).is_err(), "a cut batch decoded");
        }
        mangle(&bytes, &flips, |b| { let _ = KvEventBatch::decode(b); });
    }

    #[test]
    fn request_plane_messages_round_trip_and_survive_mangling(
        to in to_worker(),
        from in from_worker(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
    ) {
        let bytes = encode(&to);
        prop_assert_eq!(decode::<ToWorker>(&bytes).unwrap(), to);
        mangle(&bytes, &flips, |b| { let _ = decode::<ToWorker>(b); });
        let bytes = encode(&from);
        prop_assert_eq!(decode::<FromWorker>(&bytes).unwrap(), from);
        mangle(&bytes, &flips, |b| { let _ = decode::<FromWorker>(b); });
    }

    #[test]
    fn engine_event_payloads_survive_mangling(
        hashes in prop::collection::vec(any::<u64>(), 1..6),
        tokens in prop::collection::vec(any::<u32>(), 0..32),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
    ) {
        use rmpv::Value;
        let ints = |v: &[u64]| Value::Array(v.iter().map(|&h| Value::from(h)).collect());
        // vLLM's array form: [ts, [[tag, hashes, parent, tokens, block_size, lora, medium], …], rank].
        let stored = Value::Array(vec![
            "BlockStored".into(), ints(&hashes), Value::Nil,
            Value::Array(tokens.iter().map(|&t| Value::from(t)).collect()), 16.into(), Value::Nil, "GPU".into(),
        ]);
        let removed = Value::Array(vec!["BlockRemoved".into(), ints(&hashes), "GPU".into()]);
        let batch = Value::Array(vec![1.5.into(), Value::Array(vec![stored, removed, Value::Array(vec!["AllBlocksCleared".into()])]), 0.into()]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &batch).unwrap();
        let decoded = decode_msgpack_batch(&bytes).unwrap();
        prop_assert_eq!(decoded.events.len(), 3);
        mangle(&bytes, &flips, |b| { let _ = decode_msgpack_batch(b); });
        let json = serde_json::json!([{"id": 1, "data": {"type": "stored", "parent_hash": null, "blocks": hashes.iter().map(|h| serde_json::json!({"block_hash": h, "tokens": tokens.iter().map(|t| serde_json::json!({"token_id": t})).collect::<Vec<_>>()})).collect::<Vec<_>>()}}]);
        let bytes = serde_json::to_vec(&json).unwrap();
        mangle(&bytes, &flips, |b| { let _ = decode_trtllm_json(b); });
    }
}
