//! Image preprocessing against Hugging Face's own image processors: `testdata/vision_reference.py` runs
//! transformers' CLIPImageProcessor (its PIL backend: transformers, pillow and numpy in a venv under target/,
//! no torch) over images of every kind, and ours must give the same pixel values. SKIPPED without PyPI.
use crate::util::python_venv;
use dynamo::core::multimodal::{DecodeLimits, ImageProcessor, decode};
use serde_json::Value;
use std::path::Path;

#[test]
fn preprocessing_gives_the_pixel_values_of_transformers_image_processor() {
    let venv = match python_venv("vision-venv", &["transformers>=5", "pillow>=13,<14", "numpy"]) {
        Ok(venv) => venv,
        Err(why) => {
            eprintln!("SKIPPED preprocessing_gives_the_pixel_values_of_transformers_image_processor: {why}");
            return;
        }
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vision-{}", std::process::id()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/vision_reference.py");
    let ran = std::process::Command::new(venv.join("bin/python")).arg(&script).arg(&out).output().expect("python runs");
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let manifest: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.len(), 18, "three configs by six images");
    for entry in &manifest {
        let (config, image) = (entry["config"].as_str().unwrap(), entry["image"].as_str().unwrap());
        let processor = ImageProcessor::from_dir(&out.join(config)).unwrap().expect("a processor config");
        let pixels = decode(&std::fs::read(out.join(image)).unwrap(), &DecodeLimits::default()).unwrap();
        let ours = processor.preprocess(&pixels);
        let bytes = std::fs::read(out.join(entry["values"].as_str().unwrap())).unwrap();
        let theirs: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
        assert_eq!(vec![3, ours.height, ours.width], shape, "{config} {image}");
        let worst = ours.data.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if image.ends_with(".jpg") {
            // JPEG decoders differ by a level here and there (IDCT, chroma upsampling); the rest is exact.
            let mean = ours.data.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).sum::<f32>() / theirs.len() as f32;
            assert!(worst <= 4.0 / 255.0 / 0.26 && mean < 0.01, "{config} {image}: worst {worst}, mean {mean}");
        } else {
            assert_eq!(worst, 0.0, "{config} {image}: not the same pixel values (worst difference {worst})");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn an_image_past_the_limits_or_not_an_image_is_refused_before_its_pixels_are_allocated() {
    // Past the side limit: refused from the header.
    let mut png = Vec::new();
    image::RgbImage::new(12, 9).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let error = decode(&png, &DecodeLimits { max_side: 10, ..DecodeLimits::default() }).unwrap_err().to_string();
    assert!(error.contains("12x9") && error.contains("10-pixel limit"), "{error}");
    // Past the allocation limit: the decoder refuses before it allocates.
    let error = decode(&png, &DecodeLimits { max_side: 100, max_alloc: 64 }).unwrap_err().to_string();
    assert!(error.contains("cannot be decoded"), "{error}");
    assert!(decode(&png, &DecodeLimits::default()).is_ok());
    let error = decode(b"not an image at all", &DecodeLimits::default()).unwrap_err().to_string();
    assert!(error.contains("send PNG, JPEG or WebP"), "{error}");
}

fn tiny_llava() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-llava")
}

fn data_url(file: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(tiny_llava().join(file)).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `dynamo run` serving tiny-llava as `llava`.
fn llava_server(extra: &[&str]) -> crate::util::Server {
    let dir = tiny_llava();
    let mut args = vec!["--model", dir.to_str().unwrap(), "--served-model-name", "llava"];
    args.extend_from_slice(extra);
    crate::util::Server::native(&args)
}

/// A chat message with these images, then the golden question.
fn ask(images: &[&str]) -> Value {
    let mut content: Vec<Value> =
        images.iter().map(|f| serde_json::json!({"type": "image_url", "image_url": {"url": data_url(f)}})).collect();
    content.push(serde_json::json!({"type": "text", "text": "What is in the picture?"}));
    serde_json::json!([{"role": "user", "content": content}])
}

/// Every golden case answered over HTTP with transformers' greedy tokens, twice (the second from the prefix
/// cache), and another picture behind the same text answered differently (its blocks are not the first's).
async fn answers_images_like_transformers(server: &crate::util::Server) {
    let models: Value = reqwest::get(server.url("/v1/models")).await.unwrap().json().await.unwrap();
    let model = models["data"][0]["id"].as_str().expect("a served model").to_string();
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_llava().join("golden.json")).unwrap()).unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let images: Vec<&str> = case["images"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
        let greedy = case["greedy_ids"].as_array().unwrap();
        let body = serde_json::json!({"model": model, "messages": ask(&images), "max_tokens": greedy.len(),
                                      "temperature": 0, "ignore_eos": true, "return_token_ids": true});
        for attempt in 0..2 {
            let (status, answer) = server.post_json("/v1/chat/completions", body.clone()).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(&answer["choices"][0]["token_ids"], &case["greedy_ids"], "{images:?}, attempt {attempt}");
            let prompt_tokens = case["prompt_ids"].as_array().unwrap().len();
            assert_eq!(answer["usage"]["prompt_tokens"], prompt_tokens, "the image tokens are counted");
        }
    }
    let one = |images: &[&str]| {
        serde_json::json!({"model": model, "messages": ask(images), "max_tokens": 12, "temperature": 0,
                           "ignore_eos": true, "return_token_ids": true})
    };
    let (_, wide) = server.post_json("/v1/chat/completions", one(&["wide.png"])).await;
    let (_, tall) = server.post_json("/v1/chat/completions", one(&["tall-rgba.png"])).await;
    assert_ne!(wide["choices"][0]["token_ids"], tall["choices"][0]["token_ids"]);
}

#[tokio::test]
async fn dynamo_run_on_a_llava_checkpoint_answers_images_with_transformers_greedy_tokens() {
    let dir = tiny_llava();
    answers_images_like_transformers(&crate::util::Server::native(&["--model", dir.to_str().unwrap()])).await;
}

#[tokio::test]
async fn images_give_the_same_tokens_when_prefill_and_decode_are_split() {
    let dir = tiny_llava();
    // In one process, and as route, prefill and decode processes (the images cross the request plane).
    let server = crate::util::Server::native(&["--model", dir.to_str().unwrap(), "--prefill-workers", "1"]);
    answers_images_like_transformers(&server).await;
    let model = ["--model", dir.to_str().unwrap()];
    let (_prefill, _decode, router) =
        crate::disagg::split_cluster_with("vision-disagg", crate::disagg::NATIVE, |_, command| {
            command.args(model);
        })
        .await;
    answers_images_like_transformers(&router).await;
    let metrics = router.metrics().await;
    let remote = crate::util::metric(&metrics, "dynamo_router_disagg_decisions_total{decision=\"remote\"}");
    assert!(remote >= Some(4.0), "the image prompts went to the prefill worker:\n{metrics}");
}

/// An encode worker, a decode worker with a transfer agent (with `split`, a prefill worker too) and a router,
/// as processes serving tiny-llava; ready once the router has them all.
async fn encode_cluster(name: &str, split: bool) -> (Vec<crate::util::Worker>, crate::util::Server) {
    use crate::util::{Worker, dynamo};
    let (_, file) = crate::cluster::cluster_file(name);
    let dir = tiny_llava();
    let common = ["--model", dir.to_str().unwrap(), "--threads", "1", "--discovery", &file];
    let mut workers = vec![Worker::start_as("encode", dynamo().arg("encode").args(common))];
    if split {
        workers.push(Worker::start_as("prefill", dynamo().arg("prefill").args(common)));
    }
    workers.push(Worker::start_as("decode", dynamo().args(["decode", "--kv-transfer"]).args(common)));
    let router = crate::util::Server::start_with(dynamo().args([
        "route",
        "--http-port",
        "0",
        "--worker-timeout",
        "1",
        "--discovery",
        &file,
    ]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let health: Value = reqwest::get(router.url("/health")).await.unwrap().json().await.unwrap();
        if health["workers"] == 1 && health["prefill_workers"] == u64::from(split) && health["encode_workers"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the router never saw every worker: {health}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    (workers, router)
}

/// After `answers_images_like_transformers`: its two pictures were encoded once each, by the encode worker
/// (none by the workers that prefilled), and read once each by the prefilling worker.
async fn encoded_by_the_encode_worker(server: &crate::util::Server) {
    let images = |m: &str, what: &str| crate::cluster::over_workers(m, "dynamo_component_images", what);
    let timeout = std::time::Duration::from_secs(10);
    let metrics = server
        .wait_for_metrics(timeout, |m| {
            images(m, "what=\"encoded\"") == Some(2.0) && images(m, "what=\"read\"") == Some(2.0)
        })
        .await;
    let decisions =
        |d: &str| crate::util::metric(&metrics, &format!("dynamo_router_encode_decisions_total{{decision=\"{d}\"}}"));
    assert_eq!(decisions("remote"), Some(6.0), "every request's images went to the encode worker:\n{metrics}");
    assert_eq!(decisions("local_fallback"), None, "{metrics}");
    assert_eq!(images(&metrics, "what=\"read_failed\""), Some(0.0), "{metrics}");
}

#[tokio::test]
async fn images_give_the_same_tokens_when_an_encode_worker_encodes_them() {
    // In one process (E/PD and E/P/D), then as processes: E/PD and E/P/D.
    for split in [&[][..], &["--prefill-workers", "1"]] {
        let server = llava_server(&[&["--encode-workers", "1"][..], split].concat());
        answers_images_like_transformers(&server).await;
        encoded_by_the_encode_worker(&server).await;
    }
    for split in [false, true] {
        let (_workers, router) = encode_cluster(&format!("vision-encode-{split}"), split).await;
        answers_images_like_transformers(&router).await;
        encoded_by_the_encode_worker(&router).await;
    }
}

#[tokio::test]
async fn an_encode_worker_that_freezes_or_dies_leaves_the_images_to_the_prefilling_worker() {
    let (mut workers, router) = encode_cluster("vision-encode-lost", false).await;
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_llava().join("golden.json")).unwrap()).unwrap();
    let case = &golden["cases"][1];
    let images: Vec<&str> = case["images"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    let body = serde_json::json!({"model": "tiny-llava", "messages": ask(&images), "max_tokens": case["greedy_ids"].as_array().unwrap().len(),
                                  "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    // Frozen, it takes the images and never answers; the router gives up on it after --worker-timeout.
    workers[0].signal("STOP");
    let (status, answer) = router.post_json("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["token_ids"], case["greedy_ids"], "one uninterrupted answer");
    let metrics = router.metrics().await;
    let decisions =
        |d: &str| crate::util::metric(&metrics, &format!("dynamo_router_encode_decisions_total{{decision=\"{d}\"}}"));
    assert_eq!((decisions("remote"), decisions("local_fallback")), (None, Some(1.0)), "{metrics}");
    // Killed, it is gone for good: the decode worker serves images alone.
    drop(workers.remove(0));
    let (status, answer) = router.post_json("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["token_ids"], case["greedy_ids"]);
}

#[tokio::test]
async fn local_image_files_are_read_only_under_the_allowed_path() {
    let dir = tiny_llava();
    let server = llava_server(&["--allowed-local-media-path", dir.to_str().unwrap()]);
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let case = &golden["cases"][0];
    let file = |path: &Path| {
        serde_json::json!({"model": "llava", "max_tokens": 12, "temperature": 0, "ignore_eos": true,
                           "return_token_ids": true, "messages": [{"role": "user", "content": [
                               {"type": "image_url", "image_url": {"url": format!("file://{}", path.display())}},
                               {"type": "text", "text": "What is in the picture?"}]}]})
    };
    let (status, answer) = server.post_json("/v1/chat/completions", file(&dir.join("wide.png"))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["token_ids"], case["greedy_ids"], "the file gives the inline image's answer");
    for outside in [dir.join("../tiny-chat/tokenizer.json"), dir.join("../golden/llava-full/wide.png")] {
        let (status, answer) = server.post_json("/v1/chat/completions", file(&outside)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("is not under"), "{answer}");
    }
    let (status, answer) = server.post_json("/v1/chat/completions", file(&dir.join("missing.png"))).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("cannot be read"), "{answer}");
    // Without the flag no file is read.
    let closed = llava_server(&[]);
    let (status, answer) = closed.post_json("/v1/chat/completions", file(&dir.join("wide.png"))).await;
    assert_eq!(status, 400);
    assert!(answer["error"]["message"].as_str().unwrap().contains("--allowed-local-media-path"), "{answer}");
}

#[tokio::test]
async fn image_urls_are_fetched_from_the_hosts_allowed() {
    let dir = tiny_llava();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let picture = std::fs::read(dir.join("wide.png")).unwrap();
    let app = axum::Router::new().route("/wide.png", axum::routing::get(move || std::future::ready(picture.clone())));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let server = llava_server(&["--allowed-media-domains", "127.0.0.1"]);
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let case = &golden["cases"][0];
    let ask = |url: String| {
        serde_json::json!({"model": "llava", "max_tokens": 12, "temperature": 0, "ignore_eos": true,
                           "return_token_ids": true, "messages": [{"role": "user", "content": [
                               {"type": "image_url", "image_url": {"url": url}},
                               {"type": "text", "text": "What is in the picture?"}]}]})
    };
    let (status, answer) =
        server.post_json("/v1/chat/completions", ask(format!("http://127.0.0.1:{port}/wide.png"))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["token_ids"], case["greedy_ids"], "the URL gives the inline image's answer");
    for (url, says) in [
        (format!("http://localhost:{port}/wide.png"), "localhost is not one of --allowed-media-domains"),
        (format!("http://127.0.0.1:{port}/gone.png"), "404"),
    ] {
        let (status, answer) = server.post_json("/v1/chat/completions", ask(url)).await;
        assert_eq!(status, 400, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says) && message.contains("messages[0].content[0]"), "{answer}");
    }
}

#[tokio::test]
async fn image_requests_that_cannot_be_served_are_refused_naming_the_part() {
    let server = llava_server(&["--limit-images-per-prompt", "2"]);
    let chat = |messages: Value| serde_json::json!({"model": "llava", "messages": messages, "max_tokens": 2});
    let url = |url: &str| serde_json::json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]);
    let cases = [
        (chat(url("data:image/png;base64,bm90IGFuIGltYWdl")), "messages[0].content[0]"),
        (chat(url("ftp://example.com/cat.png")), "`ftp:` URL"),
        // Nothing listens there (and no test reaches past loopback).
        (chat(url("http://127.0.0.1:9/cat.png")), "could not be used: http://127.0.0.1:9/cat.png"),
        (chat(ask(&["wide.png"; 3])), "at most 2 per prompt"),
        (chat(serde_json::json!([{"role": "user", "content": "<image> what is this?"}])), "placeholder"),
        (serde_json::json!({"model": "llava", "prompt": "<image> hi", "max_tokens": 2}), "no image"),
    ];
    for (body, says) in cases {
        let path = if body.get("prompt").is_some() { "/v1/completions" } else { "/v1/chat/completions" };
        let (status, answer) = server.post_json(path, body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(says), "{says}: {answer}");
    }
    // Two are within the limit.
    let (status, answer) = server.post_json("/v1/chat/completions", chat(ask(&["wide.png"; 2]))).await;
    assert_eq!(status, 200, "{answer}");
    // A text model refuses images outright.
    let text = crate::util::Server::native(&[]);
    let body = serde_json::json!({"model": "tiny-chat", "messages": ask(&["wide.png"]), "max_tokens": 2});
    let (status, answer) = text.post_json("/v1/chat/completions", body).await;
    assert_eq!(status, 400);
    assert!(answer["error"]["message"].as_str().unwrap().contains("does not take images"), "{answer}");
}
