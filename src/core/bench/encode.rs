//! `dynamo bench encode`: images through a vision model's tower and projector on the CPU (decoded from PNG,
//! preprocessed by the checkpoint's processor, encoded), against the CPU's matrix-product peak measured in
//! the same run: the tower is dense products, so multiply-adds per image ÷ that peak is the fastest possible.
//!
//! Without `--model` it generates a random LLaVA-1.5-shaped vision side (CLIP ViT-L/14 at 336 pixels, the
//! 23 layers LLaVA reads, the 1024→4096→4096 projector; bf16) with a one-layer language model to hang it on.
//!
//! Then what the encode role is for (`interference`): text requests decoding on the native engine while
//! image requests arrive one after another, first on one aggregated worker (each image's encoding is part of
//! an engine step, so every text stream waits for it), then with an encode worker beside it; the gaps between
//! the text streams' tokens, p50 and p99, side by side in the same run. The text worker has the same threads
//! in both; the encode worker has as many again of its own, as it would have its own GPU.
use super::engine::{EngineBenchError, GeneratedModel, decoder_shapes, synthetic_tokenizer};
use crate::core::engine::native::load_cpu;
use crate::core::model::ModelSource;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct EncodeBenchSettings {
    pub model: Option<PathBuf>,
    pub threads: usize,
    /// Images per tower pass.
    pub batch: usize,
    /// Timed passes.
    pub rounds: usize,
    /// Text requests decoding while images arrive (0: no interference runs).
    pub text_streams: usize,
    /// Image requests sent, one after another, during the interference runs.
    pub images: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EncodeBenchResult {
    pub model: String,
    pub threads: usize,
    pub batch: usize,
    pub tokens_per_image: usize,
    pub macs_per_image: u64,
    pub median_ms_per_image: f64,
    pub p90_ms_per_image: f64,
    pub images_per_s: f64,
    /// Of those milliseconds, decoding the PNG and preprocessing it.
    pub preprocess_ms_per_image: f64,
    /// Multiply-adds per second through the tower, and the CPU's product peak measured in this run.
    pub macs_per_s: f64,
    pub peak_macs_per_s: f64,
    pub fraction_of_peak: f64,
    /// The interference runs, unless skipped.
    pub interference: Option<InterferenceResult>,
}

/// Text decoding while images arrive, aggregated and with an encode worker, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct InterferenceResult {
    pub text_streams: usize,
    pub images: usize,
    /// Compute threads of the text worker (both runs), and of the encode worker.
    pub text_threads: usize,
    pub encoder_threads: usize,
    pub aggregated: Interference,
    pub with_encode_worker: Interference,
    /// How many times longer the aggregated worker's p99 gap between tokens is.
    pub itl_p99_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Interference {
    /// Gaps between consecutive tokens of the text streams while the images were being served.
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    pub itl_max_ms: f64,
    pub gaps: usize,
    /// Time to the first token of the image requests.
    pub image_ttft_p50_ms: f64,
}

pub fn run(settings: &EncodeBenchSettings) -> Result<EncodeBenchResult, EngineBenchError> {
    let generated;
    let (dir, name) = match &settings.model {
        Some(dir) => (dir.clone(), dir.display().to_string()),
        None => {
            generated = llava_15_vision_shape()?;
            (generated.dir.clone(), "random LLaVA-1.5 vision shape (CLIP ViT-L/14-336, bf16)".to_string())
        }
    };
    let model = load_cpu(&ModelSource::Dir(dir), settings.threads, Default::default(), |_, _| {})?;
    let tower = model.vision().ok_or_else(|| {
        EngineBenchError::Encode("the model has no vision tower: name a LLaVA-style checkpoint".into())
    })?;
    let files: Vec<Vec<u8>> = (0..settings.batch.max(1)).map(picture).collect();
    let files: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    let per_image = |elapsed: f64| elapsed * 1e3 / files.len() as f64;
    // One untimed pass: page faults of the weights, the thread pool's start.
    model.encode_image_files(&files)?;
    let mut times = Vec::with_capacity(settings.rounds);
    for _ in 0..settings.rounds.max(1) {
        let start = Instant::now();
        model.encode_image_files(&files)?;
        times.push(per_image(start.elapsed().as_secs_f64()));
    }
    let processor = tower.processor.as_ref();
    let start = Instant::now();
    for file in &files {
        let image = crate::core::multimodal::decode(file, &Default::default())
            .map_err(|e| EngineBenchError::Encode(format!("a generated picture did not decode: {e}")))?;
        if let Some(processor) = processor {
            std::hint::black_box(processor.preprocess(&image));
        }
    }
    let preprocess_ms_per_image = per_image(start.elapsed().as_secs_f64());
    times.sort_by(f64::total_cmp);
    let median_ms_per_image = times[times.len() / 2];
    let p90_ms_per_image = times[(times.len() * 9 / 10).min(times.len() - 1)];
    let macs_per_image = tower.macs_per_image();
    let macs_per_s = macs_per_image as f64 / ((median_ms_per_image - preprocess_ms_per_image).max(1e-6) / 1e3);
    let peak_macs_per_s = model.backend().peak_macs_per_s();
    Ok(EncodeBenchResult {
        model: name,
        threads: settings.threads,
        batch: files.len(),
        tokens_per_image: tower.config.tokens_per_image(),
        macs_per_image,
        median_ms_per_image,
        p90_ms_per_image,
        images_per_s: 1e3 / median_ms_per_image,
        preprocess_ms_per_image,
        macs_per_s,
        peak_macs_per_s,
        fraction_of_peak: macs_per_s / peak_macs_per_s,
        interference: None,
    })
}

/// The interference runs on the model in `settings` (or the generated one); must run inside a tokio runtime.
pub async fn interference(settings: &EncodeBenchSettings) -> Result<InterferenceResult, EngineBenchError> {
    let generated;
    let dir = match &settings.model {
        Some(dir) => dir.clone(),
        None => {
            generated = llava_15_vision_shape()?;
            generated.dir.clone()
        }
    };
    let threads = (settings.threads / 2).max(1);
    let aggregated = interference_run(&dir, threads, 0, settings).await?;
    let with_encode_worker = interference_run(&dir, threads, 1, settings).await?;
    Ok(InterferenceResult {
        text_streams: settings.text_streams,
        images: settings.images,
        text_threads: threads,
        encoder_threads: threads,
        itl_p99_ratio: aggregated.itl_p99_ms / with_encode_worker.itl_p99_ms,
        aggregated,
        with_encode_worker,
    })
}

/// One stack (a worker, and `encode_workers` encode workers): text streams started, then images one after
/// another, the text streams' gaps measured meanwhile.
async fn interference_run(
    dir: &Path,
    threads: usize,
    encode_workers: usize,
    settings: &EncodeBenchSettings,
) -> Result<Interference, EngineBenchError> {
    use crate::core::engine::native::{Device, NativeSettings};
    use crate::core::protocol::{MediaInput, PreprocessedRequest};
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};
    let failed = |what: &str, why: String| EngineBenchError::Encode(format!("{what}: {why}"));
    let scheduler = crate::core::engine::scheduler::SchedulerConfig { num_blocks: 4096, ..Default::default() };
    let run = crate::core::run::RunSettings {
        model: ModelSource::Dir(dir.to_path_buf()),
        model_options: Default::default(),
        workers: 1,
        prefill_workers: 0,
        encode_workers,
        engine: crate::core::engine::EngineSettings::Native(NativeSettings {
            device: Device::Cpu,
            threads,
            kv_cache_gib: 1.0,
            num_blocks: Some(scheduler.num_blocks),
            scheduler,
            profile: None,
            quantization: Default::default(),
        }),
        router: Default::default(),
        listen: ([127, 0, 0, 1], 0).into(),
        http: Default::default(),
    };
    let served = crate::core::run::build(&run, false).map_err(|e| failed("the stack did not start", e.to_string()))?;
    let served = served.first();
    let image = served.model.card.image.ok_or_else(|| failed("the model", "takes no images".into()))?;
    let (router, context) = (served.router.clone(), served.model.card.context_length as usize);

    // Text streams long enough to outlast the images; their gaps count only while `measuring`.
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started, mut first_tokens) = tokio::sync::mpsc::channel(settings.text_streams.max(1));
    let mut streams = Vec::new();
    for i in 0..settings.text_streams {
        let prompt: Vec<u32> = (0..32).map(|p| 3 + ((i * 7919 + p * 104_729) % 500) as u32).collect();
        let max_tokens = context.saturating_sub(prompt.len() + 1).max(1) as u32;
        let request = PreprocessedRequest::greedy(format!("text-{i}"), prompt, max_tokens);
        let mut stream = router.route_migrating(request).await.map_err(|e| failed("a text request", e.to_string()))?;
        let (gaps, measuring, started) = (gaps.clone(), measuring.clone(), started.clone());
        streams.push(crate::core::AbortOnDrop(tokio::spawn(async move {
            let mut last = None;
            while let Some(output) = stream.next().await {
                let now = Instant::now();
                match last {
                    None => drop(started.send(()).await),
                    Some(then) if measuring.load(std::sync::atomic::Ordering::Relaxed) => {
                        let gap = now.duration_since(then).as_secs_f64() * 1e3;
                        gaps.lock().unwrap_or_else(|p| p.into_inner()).push(gap);
                    }
                    Some(_) => {}
                }
                if !output.token_ids.is_empty() {
                    last = Some(now);
                }
            }
        })));
    }
    drop(started);
    for _ in 0..settings.text_streams {
        first_tokens.recv().await.ok_or_else(|| failed("a text request", "ended before its first token".into()))?;
    }

    measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    let per_image = image.per_image as usize;
    let mut ttfts = Vec::with_capacity(settings.images);
    for i in 0..settings.images {
        let data = picture(1000 + i);
        let decoded = crate::core::multimodal::decode(&data, &Default::default())
            .map_err(|e| failed("a generated picture", e.to_string()))?;
        let mut prompt = vec![3u32];
        prompt.extend(std::iter::repeat_n(image.token_id, per_image));
        prompt.extend([5, 6, 7]);
        let media = MediaInput {
            start: 1,
            end: (1 + per_image) as u32,
            hash: crate::core::multimodal::content_hash(&decoded),
            data: data.into(),
            encoded: None,
        };
        let request = PreprocessedRequest {
            media: Some(Arc::new(vec![media])),
            ..PreprocessedRequest::greedy(format!("image-{i}"), prompt, 4)
        };
        let sent = Instant::now();
        let mut stream =
            router.route_migrating(request).await.map_err(|e| failed("an image request", e.to_string()))?;
        let first = stream.next().await.ok_or_else(|| failed("an image request", "ended without output".into()))?;
        if let Some(crate::core::protocol::FinishReason::Error(why)) = first.finish_reason {
            return Err(failed("an image request", why));
        }
        ttfts.push(sent.elapsed().as_secs_f64() * 1e3);
        while stream.next().await.is_some() {}
    }
    measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    drop(streams);

    let mut gaps = std::mem::take(&mut *gaps.lock().unwrap_or_else(|p| p.into_inner()));
    gaps.sort_by(f64::total_cmp);
    ttfts.sort_by(f64::total_cmp);
    Ok(Interference {
        itl_p50_ms: super::percentile(&gaps, 0.5),
        itl_p99_ms: super::percentile(&gaps, 0.99),
        itl_max_ms: gaps.last().copied().unwrap_or(f64::NAN),
        gaps: gaps.len(),
        image_ttft_p50_ms: super::percentile(&ttfts, 0.5),
    })
}

pub fn report(r: &EncodeBenchResult) -> String {
    format!(
        "model: {}\n{} thread(s), {} image(s) a pass, {} tokens an image, {:.1} GMAC an image\n\
         encode: {:.2} images/s: p50 {:.1} ms an image, p90 {:.1} ms (decode + preprocess {:.1} ms of it)\n\
         tower: {:.1} GMAC/s = {:.2}x the CPU's product peak measured now ({:.1} GMAC/s)\n",
        r.model,
        r.threads,
        r.batch,
        r.tokens_per_image,
        r.macs_per_image as f64 / 1e9,
        r.images_per_s,
        r.median_ms_per_image,
        r.p90_ms_per_image,
        r.preprocess_ms_per_image,
        r.macs_per_s / 1e9,
        r.fraction_of_peak,
        r.peak_macs_per_s / 1e9,
    ) + &r.interference.as_ref().map(interference_report).unwrap_or_default()
}

fn interference_report(r: &InterferenceResult) -> String {
    let side = |name: &str, i: &Interference| {
        format!(
            "  {name:<22} gaps between tokens p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} gaps); image TTFT p50 {:.0} ms\n",
            i.itl_p50_ms, i.itl_p99_ms, i.itl_max_ms, i.gaps, i.image_ttft_p50_ms
        )
    };
    format!(
        "{} text streams decoding while {} images arrive one after another (text worker {} threads; encode \
         worker {} more):\n{}{}  aggregated p99 / with an encode worker p99: {:.2}x\n",
        r.text_streams,
        r.images,
        r.text_threads,
        r.encoder_threads,
        side("aggregated", &r.aggregated),
        side("with an encode worker", &r.with_encode_worker),
        r.itl_p99_ratio
    )
}

/// A 640×480 PNG, different for each `seed`, as a client would send a photo.
fn picture(seed: usize) -> Vec<u8> {
    let image = image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x as usize * 3 + seed * 17) as u8, (y as usize * 5 + seed) as u8, ((x ^ y) as usize + seed) as u8])
    });
    let mut png = Vec::new();
    // Writing to a Vec cannot fail for lack of room; an encoder error would leave it empty and fail decoding.
    let _ = image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png);
    png
}

fn llava_15_vision_shape() -> Result<GeneratedModel, EngineBenchError> {
    let (h, inter, layers, side, patch) = (1024usize, 4096usize, 23usize, 336usize, 14usize);
    let (text, vocab) = (4096usize, 1024usize);
    let config = serde_json::json!({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 1000,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "text_config": {"model_type": "llama", "hidden_size": text, "intermediate_size": 128, "num_hidden_layers": 1,
                        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": vocab,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": h, "intermediate_size": inter,
                          "num_hidden_layers": layers + 1, "num_attention_heads": 16, "image_size": side,
                          "patch_size": patch}
    });
    let processor = serde_json::json!({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": side},
        "crop_size": {"height": side, "width": side}, "resample": 3, "do_center_crop": true, "do_resize": true,
        "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true, "do_convert_rgb": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]
    });
    let v = "model.vision_tower.";
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (format!("{v}embeddings.patch_embedding.weight"), vec![h, 3, patch, patch]),
        (format!("{v}embeddings.class_embedding"), vec![h]),
        (format!("{v}embeddings.position_embedding.weight"), vec![(side / patch).pow(2) + 1, h]),
        (format!("{v}pre_layrnorm.weight"), vec![h]),
        (format!("{v}pre_layrnorm.bias"), vec![h]),
        ("model.multi_modal_projector.linear_1.weight".into(), vec![text, h]),
        ("model.multi_modal_projector.linear_1.bias".into(), vec![text]),
        ("model.multi_modal_projector.linear_2.weight".into(), vec![text, text]),
        ("model.multi_modal_projector.linear_2.bias".into(), vec![text]),
        ("model.language_model.norm.weight".into(), vec![text]),
        ("lm_head.weight".into(), vec![vocab, text]),
    ];
    for i in 0..layers {
        let l = format!("{v}encoder.layers.{i}");
        for (name, shape) in [
            ("layer_norm1.weight", vec![h]),
            ("layer_norm1.bias", vec![h]),
            ("layer_norm2.weight", vec![h]),
            ("layer_norm2.bias", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.q_proj.bias", vec![h]),
            ("self_attn.k_proj.weight", vec![h, h]),
            ("self_attn.k_proj.bias", vec![h]),
            ("self_attn.v_proj.weight", vec![h, h]),
            ("self_attn.v_proj.bias", vec![h]),
            ("self_attn.out_proj.weight", vec![h, h]),
            ("self_attn.out_proj.bias", vec![h]),
            ("mlp.fc1.weight", vec![inter, h]),
            ("mlp.fc1.bias", vec![inter]),
            ("mlp.fc2.weight", vec![h, inter]),
            ("mlp.fc2.bias", vec![h]),
        ] {
            shapes.push((format!("{l}.{name}"), shape));
        }
    }
    shapes.extend(decoder_shapes("model.language_model.", text, 128, 1, vocab, 512));
    let files = [
        ("config.json", config.to_string()),
        ("tokenizer.json", synthetic_tokenizer(vocab)),
        ("preprocessor_config.json", processor.to_string()),
    ];
    GeneratedModel::random("llava-vision-shape", &files, &shapes)
}
