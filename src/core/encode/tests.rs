use super::*;
use crate::core::engine::native::{Device, load_image_encoder};
use crate::core::model::ModelSource;
use crate::core::transfer::{Descriptor, Direction, Peer};
use futures::StreamExt;
use std::path::PathBuf;

fn tiny_llava() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-llava")
}

fn encoder() -> Arc<dyn ImageEncoder> {
    load_image_encoder(&ModelSource::Dir(tiny_llava()), Device::Cpu, 1).unwrap()
}

fn engine(settings: EncodeSettings) -> EncodeEngine {
    EncodeEngine::start(1, encoder(), AgentSettings::loopback(None), &settings).unwrap()
}

/// A request with these files as its images (their placeholders are not looked at here).
fn request(files: &[&[u8]]) -> PreprocessedRequest {
    let media = files
        .iter()
        .map(|data| MediaInput {
            start: 0,
            end: 0,
            hash: xxhash_rust::xxh3::xxh3_64(data),
            data: bytes::Bytes::copy_from_slice(data),
            encoded: None,
        })
        .collect();
    PreprocessedRequest { media: Some(Arc::new(media)), ..PreprocessedRequest::greedy("r", vec![1], 1) }
}

fn file(name: &str) -> Vec<u8> {
    std::fs::read(tiny_llava().join(name)).unwrap()
}

async fn answer(engine: &EncodeEngine, request: PreprocessedRequest) -> EngineOutput {
    engine.submit(request).unwrap().next().await.expect("one output")
}

/// Reads held embeddings as the prefilling worker does, ending the lease.
async fn read(reader: &Agent, peer: &Peer, region: RegionId, held: &HeldEmbeddings) -> Vec<f32> {
    let local = [Descriptor { region, offset: 0, len: held.len }];
    let remote = [Descriptor { region: held.region, offset: held.offset, len: held.len }];
    reader.transfer(peer, Direction::Read, &local, &remote, Some(&held.lease.to_le_bytes())).await.unwrap();
    // SAFETY: the read completed and nothing else uses the region.
    let bytes = unsafe { reader.region(region).unwrap().bytes(0, held.len).unwrap().to_vec() };
    assert_eq!(xxhash_rust::xxh3::xxh3_64(&bytes), held.checksum, "the checksum is the bytes'");
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn images_are_encoded_once_held_for_their_reader_and_found_again() {
    let engine = engine(EncodeSettings::default());
    let (wide, tall) = (file("wide.png"), file("tall-rgba.png"));
    let output = answer(&engine, request(&[&wide, &tall, &wide])).await;
    assert_eq!(output.finish_reason, Some(FinishReason::Length), "{output:?}");
    let held = &output.encoded;
    assert_eq!(held.len(), 3);
    assert_eq!(held[0].offset, held[2].offset, "an image repeated in a request is held once");
    assert_ne!(held[0].offset, held[1].offset);
    assert_eq!(engine.images_encoded(), 2);
    assert_eq!(engine.load().kv_active_blocks, 2, "two slots pinned by three leases");

    // What the reader gets is what transformers computes (the golden features of each picture).
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_llava().join("golden.json")).unwrap()).unwrap();
    // Rows of the projector's output, every image's in turn.
    let features = |case: usize, image: usize| -> Vec<f32> {
        let rows: Vec<Vec<f32>> = serde_json::from_value(golden["cases"][case]["features"].clone()).unwrap();
        let per_image = rows.len() / golden["cases"][case]["images"].as_array().unwrap().len();
        rows[image * per_image..(image + 1) * per_image].concat()
    };
    let (reader, _) = Agent::start(2, AgentSettings::loopback(None)).unwrap();
    let (region, _) = reader.register(Region::new(held[0].len).unwrap());
    let peer = reader.connect(&engine.transfer_addr().unwrap()).await.unwrap();
    for (at, expected) in [(0, features(0, 0)), (1, features(1, 1)), (2, features(0, 0))] {
        let values = read(&reader, &peer, region, &held[at]).await;
        assert_eq!(values.len(), expected.len());
        let worst = values.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "image {at}: off by {worst}");
    }
    eventually("every read ended its lease", || engine.load().kv_active_blocks == 0).await;
    assert_eq!(engine.load().kv_cached_blocks, 2, "both kept for later requests");

    // Later, the same picture is found, not encoded.
    let again = answer(&engine, request(&[&tall])).await;
    assert_eq!(again.encoded[0].offset, held[1].offset);
    assert_eq!(engine.images_encoded(), 2);
}

#[tokio::test]
async fn with_every_slot_held_new_images_are_refused_until_a_lease_ends_or_expires() {
    let image_bytes = encoder().image_len() as u64 * 4;
    let lease = Duration::from_millis(200);
    let engine = engine(EncodeSettings { cache_bytes: image_bytes, lease });
    let (wide, tall) = (file("wide.png"), file("tall-rgba.png"));
    let refused = engine.submit(request(&[&wide, &tall])).err().expect("two images do not fit one slot");
    assert!(refused.to_string().contains("all 1 embedding slots"), "{refused}");
    assert_eq!(engine.load().kv_active_blocks, 0, "a refused request pins nothing");

    let first = answer(&engine, request(&[&wide])).await;
    assert_eq!(first.encoded.len(), 1);
    assert!(engine.submit(request(&[&tall])).is_err(), "the one slot is held for wide's reader");
    assert!(engine.submit(request(&[&wide])).is_ok(), "wide itself is there to be held again");
    // Nobody reads: the leases expire, and the slot goes to the next image.
    tokio::time::sleep(lease * 2).await;
    assert_eq!(engine.load().kv_active_blocks, 0, "expired leases hold nothing (a drain waits on none)");
    let second = answer(&engine, request(&[&tall])).await;
    assert_eq!(second.encoded.len(), 1, "{second:?}");
    assert_eq!(engine.images_encoded(), 2);
}

#[tokio::test]
async fn a_request_without_images_or_with_one_that_does_not_decode_gets_an_error_and_holds_nothing() {
    let engine = engine(EncodeSettings::default());
    let none = engine.submit(PreprocessedRequest::greedy("r", vec![1], 1)).err().expect("no images");
    assert!(none.to_string().contains("has none"), "{none}");
    let output = answer(&engine, request(&[b"not an image"])).await;
    let Some(FinishReason::Error(why)) = &output.finish_reason else { panic!("{output:?}") };
    assert!(why.contains("PNG, JPEG or WebP"), "{why}");
    assert!(output.encoded.is_empty());
    let load = engine.load();
    assert_eq!((load.kv_active_blocks, load.kv_cached_blocks), (0, 0), "{load:?}");
}

/// The real encoder, but each pass waits for a go-ahead, and what each pass took is kept.
struct Gated {
    inner: Arc<dyn ImageEncoder>,
    gate: Mutex<std::sync::mpsc::Receiver<()>>,
    passes: Mutex<Vec<usize>>,
}

impl ImageEncoder for Gated {
    fn image_len(&self) -> usize {
        self.inner.image_len()
    }

    fn encode_files(&self, files: &[&[u8]]) -> Result<Vec<f32>, String> {
        self.passes.lock().unwrap().push(files.len());
        let _ = self.gate.lock().unwrap().recv_timeout(Duration::from_secs(10));
        self.inner.encode_files(files)
    }

    fn device(&self) -> String {
        "gated".into()
    }
}

/// A PNG of its own for each seed.
fn picture(seed: u8) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

#[tokio::test]
async fn requests_that_wait_for_the_tower_go_through_it_together_and_a_bad_image_fails_only_its_own() {
    let (go, gate) = std::sync::mpsc::channel();
    let gated = Arc::new(Gated { inner: encoder(), gate: Mutex::new(gate), passes: Mutex::new(Vec::new()) });
    let engine =
        EncodeEngine::start(1, gated.clone(), AgentSettings::loopback(None), &EncodeSettings::default()).unwrap();
    let submit = |files: &[&[u8]]| engine.submit(request(files)).unwrap();
    let first = submit(&[&picture(1)]);
    eventually("the first pass started", || gated.passes.lock().unwrap().len() == 1).await;
    // Two requests, one of them bad, queue behind it; then two good ones.
    let queued = [submit(&[&picture(2), &picture(3)]), submit(&[b"not an image"]), submit(&[&picture(4)])];
    eventually("three requests wait", || engine.load().requests_waiting == 3).await;
    // The first pass, the batch of three that fails, and each of the three again.
    for _ in 0..5 {
        go.send(()).unwrap();
    }
    let answer = |mut stream: ResponseStream| async move { stream.next().await.expect("one output") };
    assert_eq!(answer(first).await.encoded.len(), 1);
    let [two, bad, four] = queued;
    let (two, bad, four) = (answer(two).await, answer(bad).await, answer(four).await);
    assert_eq!((two.encoded.len(), four.encoded.len()), (2, 1), "{two:?} {four:?}");
    assert!(matches!(bad.finish_reason, Some(FinishReason::Error(ref why)) if why.contains("PNG")), "{bad:?}");
    // One pass for the three waiting requests (4 images); it failed on the bad one, so each went alone.
    assert_eq!(*gated.passes.lock().unwrap(), [1, 4, 2, 1, 1]);
    assert_eq!(engine.images_encoded(), 4);
    assert_eq!(engine.load().kv_active_blocks, 4, "the good requests' slots, held for their readers");
}
