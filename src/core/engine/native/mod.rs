//! The built-in engine: a dense Llama/Qwen decoder run by the shared scheduler over a paged KV cache.
//!
//! `config` reads the architecture, `weights` the safetensors, `model` is the forward pass written against
//! the op-level `backend` seam (`cpu` implements it), and `sampler` picks tokens. `NativeExecutor` is what the
//! scheduler calls each step: it flattens the step's chunks into one batch, runs the model once, and samples.
pub mod backend;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod host;
pub mod model;
pub mod sampler;
pub mod selftest;
pub mod vision;
pub mod weights;

use super::batch::{BatchEngine, Pacing};
use super::blocks::PageId;
use super::scheduler::{Chunk, ExecError, Executed, Executor, Sampled, Scheduler, SchedulerConfig};
use crate::core::grammar::Guide;
use crate::core::model::{BUILTIN_WEIGHTS, ModelError, ModelSource, read_config};
use crate::core::multimodal::{EMBEDDINGS_CACHE_BYTES, EmbeddingCache};
use crate::core::protocol::{MediaInput, PreprocessedRequest, WorkerId};
use backend::{Backend, BackendError};
use config::{ConfigError, ModelConfig};
use cpu::CpuBackend;
use model::{ForwardBatch, KvCache, RowEmbeds, Transformer};
use rayon::prelude::*;
use sampler::SeqSampler;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vision::VisionTower;
use weights::{WeightError, WeightFiles};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("cannot start {threads} compute threads: {detail}")]
    Threads { threads: usize, detail: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot allocate {blocks} KV blocks: {detail}; lower --kv-cache-gib or --num-blocks")]
    KvCache { blocks: usize, detail: String },
    #[error(transparent)]
    Image(#[from] crate::core::multimodal::ImageError),
    #[error(
        "the model has a vision tower but no image processor: add its preprocessor_config.json (or a \
         processor_config.json with an `image_processor`)"
    )]
    NoImageProcessor,
    #[error("--kv-cache-gib {gib} holds no KV block of this model ({page_bytes} bytes each); give it more memory")]
    NoKvMemory { gib: f64, page_bytes: usize },
    #[error(
        "the model has no vision tower (config.json's model_type is not llava): an encode worker needs a \
         LLaVA-style checkpoint"
    )]
    NoVisionTower,
    #[error("--quantization int8 runs on the CPU backend only; on a GPU serve the checkpoint as it is")]
    QuantizedOnGpu,
}

/// How the native engine holds a model's matrices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// As the checkpoint stores them (f32, bf16; f16 is widened to f32).
    #[default]
    None,
    /// Symmetric int8 per output channel, quantized at load (CPU).
    Int8,
}

/// Where the native engine computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA device 0 when the driver, NVRTC and cuBLAS load and a GPU is present; otherwise the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Settles `Auto` by looking for a usable GPU.
    pub fn resolve(self) -> Device {
        match self {
            Device::Auto => {
                let libraries = cuda::CudaLibraries::probe();
                let has_gpu = libraries.missing().is_empty()
                    && cudarc::driver::CudaContext::device_count().is_ok_and(|count| count > 0);
                if has_gpu { Device::Cuda(0) } else { Device::Cpu }
            }
            device => device,
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NativeSettings {
    pub device: Device,
    /// Compute threads shared by this process's native workers (CPU device).
    pub threads: usize,
    /// Memory for each worker's KV cache; decides `scheduler.num_blocks` unless that is given.
    pub kv_cache_gib: f64,
    pub num_blocks: Option<usize>,
    pub scheduler: SchedulerConfig,
    /// How fast it is, measured earlier by `dynamo profile` (`Engine::profile`).
    pub profile: Option<crate::core::protocol::profile::Profile>,
    pub quantization: Quantization,
}

/// Loads a model on the CPU, reporting `(layers done, layers)` as it goes.
pub fn load_cpu(
    source: &ModelSource,
    threads: usize,
    quantization: Quantization,
    progress: impl FnMut(usize, usize),
) -> Result<Arc<Transformer<CpuBackend>>, NativeError> {
    let backend = CpuBackend::new(threads).map_err(|e| NativeError::Threads { threads, detail: e.to_string() })?;
    let backend = match quantization {
        Quantization::None => backend,
        Quantization::Int8 => backend.quantized_int8(),
    };
    load(source, backend, progress)
}

/// How far a quantization moves a model's logits from the checkpoint's, over every position of a prompt.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LogitsError {
    /// The largest difference.
    pub max: f32,
    /// `max` over the largest logit's magnitude.
    pub relative: f32,
    /// Positions whose most likely next token is the same.
    pub same_top_token: f32,
}

/// `LogitsError` of `quantization` on `prompt` (f32 compute throughout, so only the weights differ): what the
/// tests hold int8 to and `dynamo bench engine` prints.
pub fn logits_error(
    source: &ModelSource,
    threads: usize,
    quantization: Quantization,
    prompt: &[u32],
) -> Result<LogitsError, NativeError> {
    let backend = |quantization: Quantization| -> Result<CpuBackend, NativeError> {
        let backend =
            CpuBackend::reference(threads).map_err(|e| NativeError::Threads { threads, detail: e.to_string() })?;
        Ok(match quantization {
            Quantization::None => backend,
            Quantization::Int8 => backend.quantized_int8(),
        })
    };
    let logits = |backend: CpuBackend| -> Result<Vec<f32>, NativeError> {
        const BLOCK: usize = 16;
        let model = load(source, backend, |_, _| {})?;
        let pages: Vec<PageId> = (0..prompt.len().div_ceil(BLOCK) as PageId).collect();
        let mut batch = ForwardBatch::default();
        batch.push_seq(prompt, 0, prompt.len(), &pages, BLOCK, true);
        batch.logit_rows = (0..prompt.len()).collect();
        let mut cache = model.new_cache(pages.len(), BLOCK)?;
        Ok(model.forward(&mut cache, &batch, BLOCK)?)
    };
    let exact = logits(backend(Quantization::None)?)?;
    let approximate = logits(backend(quantization)?)?;
    let max = exact.iter().zip(&approximate).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let largest = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
    let top = |row: &[f32]| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
    let vocab = exact.len() / prompt.len().max(1);
    let same = exact.chunks(vocab.max(1)).zip(approximate.chunks(vocab.max(1))).filter(|(a, b)| top(a) == top(b));
    Ok(LogitsError {
        max,
        relative: max / largest.max(f32::MIN_POSITIVE),
        same_top_token: same.count() as f32 / prompt.len().max(1) as f32,
    })
}

/// Loads a model onto any backend.
pub fn load<B: Backend>(
    source: &ModelSource,
    backend: B,
    progress: impl FnMut(usize, usize),
) -> Result<Arc<Transformer<B>>, NativeError> {
    let config = ModelConfig::parse(&read_config(source)?)?;
    let files = match source {
        ModelSource::Dir(dir) => WeightFiles::open(dir)?,
        ModelSource::Builtin => WeightFiles::from_static("built-in tiny-chat weights", BUILTIN_WEIGHTS)?,
    };
    let mut model = Transformer::load(backend, config, &files, progress)?;
    if let Some(tower) = model.vision_mut() {
        let processor = match source {
            ModelSource::Dir(dir) => crate::core::multimodal::ImageProcessor::from_dir(dir)?,
            ModelSource::Builtin => None,
        };
        tower.processor = Some(processor.ok_or(NativeError::NoImageProcessor)?);
    }
    Ok(Arc::new(model))
}

/// What an encode worker computes with: image files in, a vision model's input embeddings out.
pub trait ImageEncoder: Send + Sync {
    /// Values of one image's embeddings (`tokens_per_image × hidden_size`).
    fn image_len(&self) -> usize;

    /// Each file's embeddings, one image after another; an image that does not decode fails them all.
    fn encode_files(&self, files: &[&[u8]]) -> Result<Vec<f32>, String>;

    /// What it computes on, as `Engine::device` says it.
    fn device(&self) -> String;
}

/// A whole model encodes with its own tower (`dynamo run`'s encode workers share its weights).
impl<B: Backend> ImageEncoder for Transformer<B> {
    fn image_len(&self) -> usize {
        self.vision().map_or(0, |tower| tower.config.tokens_per_image() * self.config.hidden_size)
    }

    fn encode_files(&self, files: &[&[u8]]) -> Result<Vec<f32>, String> {
        self.encode_image_files(files).map_err(|e| e.to_string())
    }

    fn device(&self) -> String {
        self.backend().describe()
    }
}

/// A vision model's tower and projector alone, with its image processor: what `dynamo encode` loads (a
/// fraction of the whole model's weights; the language model's are never read).
struct VisionOnly<B: Backend> {
    backend: B,
    tower: VisionTower<B>,
    hidden_size: usize,
}

impl<B: Backend> ImageEncoder for VisionOnly<B> {
    fn image_len(&self) -> usize {
        self.tower.config.tokens_per_image() * self.hidden_size
    }

    fn encode_files(&self, files: &[&[u8]]) -> Result<Vec<f32>, String> {
        self.backend.run(|| self.tower.encode_files(&self.backend, files)).map_err(|e| e.to_string())
    }

    fn device(&self) -> String {
        self.backend.describe()
    }
}

/// Loads only the vision tower and projector of a LLaVA-style checkpoint, on `device`.
pub fn load_image_encoder(
    source: &ModelSource,
    device: Device,
    threads: usize,
) -> Result<Arc<dyn ImageEncoder>, NativeError> {
    fn vision_only<B: Backend>(source: &ModelSource, backend: B) -> Result<Arc<dyn ImageEncoder>, NativeError> {
        let config = ModelConfig::parse(&read_config(source)?)?;
        let ModelSource::Dir(dir) = source else { return Err(NativeError::NoVisionTower) };
        let multimodal = config.multimodal.clone().ok_or(NativeError::NoVisionTower)?;
        let files = WeightFiles::open(dir)?;
        let mut tower = VisionTower::load(&backend, multimodal, config.hidden_size, &files)?;
        tower.processor =
            Some(crate::core::multimodal::ImageProcessor::from_dir(dir)?.ok_or(NativeError::NoImageProcessor)?);
        Ok(Arc::new(VisionOnly { backend, tower, hidden_size: config.hidden_size }))
    }
    match device.resolve() {
        Device::Cuda(ordinal) => vision_only(source, cuda::CudaBackend::new(ordinal)?),
        Device::Cpu | Device::Auto => vision_only(
            source,
            CpuBackend::new(threads).map_err(|e| NativeError::Threads { threads, detail: e.to_string() })?,
        ),
    }
}

/// Loads the model once on the settings' device and starts `workers` workers sharing it.
pub fn spawn_workers(
    source: &ModelSource,
    settings: &NativeSettings,
    ids: &[WorkerId],
    progress: impl FnMut(usize, usize),
) -> Result<Vec<BatchEngine>, NativeError> {
    let engines: Vec<BatchEngine> = match settings.device.resolve() {
        Device::Cuda(_) if settings.quantization != Quantization::None => return Err(NativeError::QuantizedOnGpu),
        Device::Cuda(ordinal) => {
            let model = load(source, cuda::CudaBackend::new(ordinal)?, progress)?;
            ids.iter().map(|&id| spawn(id, model.clone(), settings)).collect::<Result<_, _>>()?
        }
        Device::Cpu | Device::Auto => {
            let model = load_cpu(source, settings.threads, settings.quantization, progress)?;
            ids.iter().map(|&id| spawn(id, model.clone(), settings)).collect::<Result<_, _>>()?
        }
    };
    Ok(match &settings.profile {
        Some(profile) => engines.into_iter().map(|engine| engine.with_profile(profile.clone())).collect(),
        None => engines,
    })
}

/// Starts a worker on a loaded model (workers of one process share the weights, each has its own KV cache).
pub fn spawn<B: Backend>(
    worker_id: WorkerId,
    model: Arc<Transformer<B>>,
    settings: &NativeSettings,
) -> Result<BatchEngine, NativeError> {
    let mut scheduler_config = settings.scheduler.clone();
    let page_bytes = model.page_bytes(scheduler_config.block_size);
    scheduler_config.num_blocks =
        settings.num_blocks.unwrap_or((settings.kv_cache_gib * (1u64 << 30) as f64 / page_bytes as f64) as usize);
    if scheduler_config.num_blocks == 0 {
        return Err(NativeError::NoKvMemory { gib: settings.kv_cache_gib, page_bytes });
    }
    let context = model.config.max_position_embeddings;
    let executor = NativeExecutor::new(model, scheduler_config.num_blocks, scheduler_config.block_size)
        .map_err(|e| NativeError::KvCache { blocks: scheduler_config.num_blocks, detail: e.to_string() })?;
    let scheduler = Scheduler::new(scheduler_config, executor);
    Ok(BatchEngine::spawn(worker_id, scheduler, Pacing { blocking: true, speedup: 1.0 }, context))
}

/// The positions `start..end` of a chunk that hold `media`'s placeholders, if any.
fn overlap(media: &MediaInput, start: usize, end: usize) -> Option<(usize, usize)> {
    let (lo, hi) = (start.max(media.start as usize), end.min(media.end as usize));
    (lo < hi).then_some((lo, hi))
}

/// Runs the real model for the scheduler.
pub struct NativeExecutor<B: Backend> {
    model: Arc<Transformer<B>>,
    cache: KvCache<B>,
    block_size: usize,
    num_pages: usize,
    /// Time spent turning logits into tokens, for `dynamo bench engine` to report sampling's share of a step.
    sampling: Duration,
    /// For a vision model, the embeddings of the images seen lately (shared with the worker's transfer side,
    /// which puts in the ones encode workers computed).
    embeddings: Option<Arc<EmbeddingCache>>,
}

/// An image's content hash and its embeddings (`tokens_per_image × hidden_size`).
type ImageEmbeddings = (u64, Arc<Vec<f32>>);

impl<B: Backend> NativeExecutor<B> {
    pub fn new(model: Arc<Transformer<B>>, num_pages: usize, block_size: usize) -> Result<Self, BackendError> {
        let cache = model.new_cache(num_pages, block_size)?;
        let embeddings = model.vision().map(|tower| {
            let image_len = tower.config.tokens_per_image() * model.config.hidden_size;
            Arc::new(EmbeddingCache::new(image_len, EMBEDDINGS_CACHE_BYTES))
        });
        Ok(Self { model, cache, block_size, num_pages, sampling: Duration::ZERO, embeddings })
    }

    /// The embeddings of every image whose placeholders this step computes: from the cache, or encoded
    /// now, all the missing ones in one batch. Held for the step, whatever the cache evicts meanwhile.
    fn step_embeddings(&mut self, chunks: &[Chunk<'_, SeqSampler>]) -> Result<Vec<ImageEmbeddings>, ExecError> {
        let mut step: Vec<ImageEmbeddings> = Vec::new();
        let mut missing: Vec<&MediaInput> = Vec::new();
        let cache = self.embeddings.as_ref().ok_or_else(|| ExecError("this model takes no images".into()))?;
        for chunk in chunks {
            for media in chunk.media.iter().filter(|m| overlap(m, chunk.start, chunk.end).is_some()) {
                if step.iter().any(|(hash, _)| *hash == media.hash) || missing.iter().any(|m| m.hash == media.hash) {
                    continue;
                }
                match cache.get(media.hash) {
                    Some(values) => step.push((media.hash, values.clone())),
                    None => missing.push(media),
                }
            }
        }
        if missing.is_empty() {
            return Ok(step);
        }
        let files: Vec<&[u8]> = missing.iter().map(|m| m.data.as_ref()).collect();
        let values = self.model.encode_image_files(&files).map_err(|e| ExecError(format!("an image: {e}")))?;
        cache.count_encoded(missing.len());
        let per_image = values.len() / missing.len();
        for (media, embeddings) in missing.iter().zip(values.chunks_exact(per_image.max(1))) {
            let embeddings = Arc::new(embeddings.to_vec());
            cache.put(media.hash, embeddings.clone()).map_err(ExecError)?;
            step.push((media.hash, embeddings));
        }
        Ok(step)
    }

    /// The rows of `chunk` (whose first row is `first_row` of the batch) that its images' embeddings fill.
    fn image_rows(
        &self,
        chunk: &Chunk<'_, SeqSampler>,
        first_row: usize,
        step: &[ImageEmbeddings],
    ) -> Result<Vec<RowEmbeds>, ExecError> {
        let per_image = self.model.vision().map_or(0, |t| t.config.tokens_per_image());
        let mut rows = Vec::new();
        for media in chunk.media {
            let Some((lo, hi)) = overlap(media, chunk.start, chunk.end) else { continue };
            if (media.end - media.start) as usize != per_image {
                return Err(ExecError(format!(
                    "an image holds {} placeholder tokens; this model takes {per_image} per image",
                    media.end - media.start
                )));
            }
            let values = step
                .iter()
                .find(|(hash, _)| *hash == media.hash)
                .map(|(_, values)| values.clone())
                .ok_or_else(|| ExecError("an image was not encoded".into()))?;
            rows.push(RowEmbeds {
                first_row: first_row + lo - chunk.start,
                values,
                from: lo - media.start as usize,
                rows: hi - lo,
            });
        }
        Ok(rows)
    }

    /// Total time spent sampling since this executor was made.
    pub fn sampling_time(&self) -> Duration {
        self.sampling
    }
}

impl<B: Backend> Executor for NativeExecutor<B> {
    type Sampler = SeqSampler;

    fn sampler(&self, request: &PreprocessedRequest, seed: u64) -> SeqSampler {
        SeqSampler::new(request, seed)
    }

    fn device(&self) -> String {
        self.model.backend().describe()
    }

    fn memory_use(&self) -> Option<(u64, u64)> {
        self.model.backend().memory_use()
    }

    fn embedding_cache(&self) -> Option<Arc<EmbeddingCache>> {
        self.embeddings.clone()
    }

    fn kv_memory(&self) -> Option<super::KvMemory> {
        Some(super::KvMemory {
            regions: self.model.cache_memory(&self.cache)?,
            pages: self.num_pages as u64,
            page_bytes: self.model.kv_page_bytes(self.block_size),
            block_size: self.block_size as u32,
            simulated: None,
        })
    }

    fn execute(&mut self, chunks: &mut [Chunk<'_, SeqSampler>]) -> Result<Executed, ExecError> {
        let images = chunks.iter().any(|c| c.media.iter().any(|m| overlap(m, c.start, c.end).is_some()));
        let step = if images { self.step_embeddings(chunks)? } else { Vec::new() };
        let mut batch = ForwardBatch::default();
        for chunk in chunks.iter() {
            let first_row = batch.token_ids.len();
            if !chunk.media.is_empty() {
                batch.embeds.extend(self.image_rows(chunk, first_row, &step)?);
            }
            batch.push_seq(chunk.tokens, chunk.start, chunk.end, chunk.pages, self.block_size, chunk.samples());
        }
        // Structured outputs' masks depend only on the tokens so far: computed on a thread of their own
        // while the forward pass runs, so sampling finds them ready.
        let mut guides: Vec<(usize, &mut Guide)> = chunks
            .iter_mut()
            .enumerate()
            .filter(|(_, chunk)| chunk.samples())
            .filter_map(|(at, chunk)| chunk.guide.take().map(|guide| (at, guide)))
            .collect();
        let pooling = chunks.iter().any(|chunk| chunk.pooling && chunk.samples());
        let forward = |executor: &mut Self| {
            executor.model.forward_with_hidden(&mut executor.cache, &batch, executor.block_size, pooling)
        };
        let logits = if guides.is_empty() {
            forward(self)
        } else {
            std::thread::scope(|scope| {
                let preparing = scope.spawn(|| guides.iter_mut().for_each(|(_, guide)| guide.prepare()));
                let logits = forward(self);
                // A mask that panicked is computed again (and fails there, visibly) when sampling asks for it.
                let _ = preparing.join();
                logits
            })
        };
        for (at, guide) in guides {
            chunks[at].guide = Some(guide);
        }
        let (logits, hidden) = logits.map_err(|e| ExecError(e.to_string()))?;
        let started = Instant::now();
        let mut rows = logits.chunks_exact(self.model.config.vocab_size);
        let mut hidden_rows = hidden.as_deref().unwrap_or_default().chunks_exact(self.model.config.hidden_size);
        let mut pooled = Vec::new();
        let work = chunks
            .iter_mut()
            .enumerate()
            .map(|(at, chunk)| match chunk.samples() {
                false => Ok(None),
                true => {
                    let row = rows.next().ok_or_else(|| ExecError("the model returned too few logit rows".into()))?;
                    if chunk.pooling {
                        let state = hidden_rows.next().ok_or_else(|| ExecError("too few hidden rows".into()))?;
                        pooled.push((at, state.to_vec()));
                        return Ok(None);
                    }
                    // When a chunk pools, every logit row has its hidden row: keep the two in step.
                    hidden_rows.next();
                    Ok(Some((chunk, row)))
                }
            })
            .collect::<Result<Vec<_>, ExecError>>()?;
        // Each sequence's draw reads a whole vocabulary row: across the pool, a 16-sequence step samples in
        // about the time of one.
        let sampled = self.model.backend().run(|| {
            work.into_par_iter()
                .map(|job| {
                    job.map(|(chunk, row)| {
                        chunk.sampler.sample(row, chunk.tokens, chunk.logprobs, chunk.guide.as_deref_mut())
                    })
                })
                .collect()
        });
        let mut sampled: Vec<Option<Sampled>> = sampled;
        for (at, state) in pooled {
            sampled[at] = Some(Sampled { token: 0, logprob: None, hidden: Some(state) });
        }
        self.sampling += started.elapsed();
        Ok(Executed { sampled, simulated_ms: 0.0 })
    }
}

#[cfg(test)]
mod tests;
