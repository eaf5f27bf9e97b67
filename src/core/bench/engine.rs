//! `dynamo bench engine`: the native engine's prefill and decode speed on the CPU, against the memory
//! bandwidth bound measured in the same run (decode must stream every weight once per step, so weight bytes ÷
//! bandwidth is the fastest batch-1 decode possible).
//!
//! Without `--model` it generates a random SmolLM2-135M-shaped checkpoint (bf16, 576 hidden, 30 layers, 9/3
//! heads, vocab 49152, tied) into a temporary directory and loads it through the same code as a real one.
use crate::core::engine::native::Device;
use crate::core::engine::native::backend::{Backend, BackendError};
use crate::core::engine::native::cpu::CpuBackend;
use crate::core::engine::native::cuda::CudaBackend;
use crate::core::engine::native::model::Transformer;
use crate::core::engine::native::{
    LogitsError, NativeError, NativeExecutor, Quantization, load, load_cpu, logits_error,
};
use crate::core::engine::scheduler::{Scheduler, SchedulerConfig};
use crate::core::grammar::Compiler;
use crate::core::model::{Model, ModelSource};
use crate::core::protocol::{Constraint, PreprocessedRequest};
use rayon::prelude::*;
use safetensors::{Dtype, tensor::TensorView};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct EngineBenchSettings {
    pub model: Option<PathBuf>,
    pub threads: usize,
    pub device: Device,
    pub prompt_lengths: Vec<usize>,
    pub batch_sizes: Vec<usize>,
    /// Sampling temperatures to decode at (0 is greedy); every batch size runs at each.
    pub temperatures: Vec<f32>,
    /// Timed decode steps per batch size.
    pub decode_steps: usize,
    /// Prefill runs per prompt length.
    pub repeats: usize,
    /// Also decode every batch under a JSON schema (structured output), to price the grammar's masks.
    pub structured: bool,
    pub quantization: Quantization,
}

/// What the structured runs are held to: nested objects, arrays, strings, numbers and an enum, the parts a
/// real extraction schema has. At least 64 records: no sequence can close it within a run, so every step
/// decodes the whole batch, as the unconstrained runs do.
const BENCH_SCHEMA: &str = r#"{"type":"object","properties":{"records":{"type":"array","minItems":64,"items":{"type":"object",
"properties":{"name":{"type":"string"},"kind":{"enum":["person","place","thing"]},"score":{"type":"number"},
"tags":{"type":"array","items":{"type":"string"}}},"required":["name","kind","score","tags"]}}},
"required":["records"]}"#;

#[derive(Debug, Clone, Serialize)]
pub struct Prefill {
    pub prompt_tokens: usize,
    pub median_ms: f64,
    pub tokens_per_s: f64,
    /// Of the compute bound for this prompt: its weight products and its causal attention at the
    /// matrix-product peak.
    pub fraction_of_compute_bound: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decode {
    pub batch: usize,
    pub temperature: f32,
    pub median_step_ms: f64,
    pub tokens_per_s: f64,
    /// Against batch-1 decode at the same temperature, measured in this run.
    pub speedup_vs_batch_1: f64,
    /// Against greedy decode of the same batch in this run (1 when this is greedy, absent without a greedy run).
    pub vs_greedy: Option<f64>,
    /// Whether the output was held to a JSON schema (`--structured`).
    pub structured: bool,
    /// A structured run against the same batch and temperature unconstrained, in this run.
    pub vs_unconstrained: Option<f64>,
    /// Of the median step, the median time spent turning logits into tokens.
    pub sampling_share: f64,
    /// Of the bound for this batch: streaming the weights once per step, or doing its multiply-adds at the
    /// kernel's peak, whichever is slower.
    pub fraction_of_bound: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchResult {
    pub model: String,
    pub device: String,
    pub threads: usize,
    pub quantization: Quantization,
    /// Quantized: how far its logits are from the checkpoint's over a 24-token prompt.
    pub logits_error: Option<LogitsError>,
    pub weight_bytes: u64,
    /// What the KV pages hold (`F32` or `Bf16`).
    pub kv_dtype: String,
    pub bandwidth_gb_s: f64,
    pub decode_bound_tokens_per_s: f64,
    /// Multiply-adds per second of the CPU's fastest matrix product on cache-resident weights.
    pub peak_gmacs: f64,
    /// What ran the fastest product: "AMX tiles", "AVX-512 BF16" (bf16 products) or "f32 FMA"; none on a GPU.
    pub product_unit: Option<String>,
    /// Tokens per second if every weight multiply ran at `peak_gmacs` (the ceiling for big batches and prefill).
    pub compute_bound_tokens_per_s: f64,
    pub prefill: Vec<Prefill>,
    pub decode: Vec<Decode>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineBenchError {
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("cannot write the generated model to {path}: {source}")]
    Generate { path: PathBuf, source: std::io::Error },
    #[error("--structured needs the model's tokenizer: {0}")]
    Structured(String),
    #[error("{0}")]
    Encode(String),
}

pub fn run(settings: &EngineBenchSettings) -> Result<EngineBenchResult, EngineBenchError> {
    let generated;
    let (dir, name) = match &settings.model {
        Some(dir) => (dir.clone(), dir.display().to_string()),
        None => {
            generated = GeneratedModel::smollm2_135m_shape()?;
            (generated.dir.clone(), "random SmolLM2-135M shape (bf16)".to_string())
        }
    };
    let source = ModelSource::Dir(dir);
    let grammars = match settings.structured {
        true => Some(
            Model::load(&source, None).map_err(|e| EngineBenchError::Structured(e.to_string()))?.grammars().clone(),
        ),
        false => None,
    };
    match settings.device.resolve() {
        Device::Cuda(_) if settings.quantization != Quantization::None => Err(NativeError::QuantizedOnGpu.into()),
        Device::Cuda(ordinal) => {
            let model = load(&source, CudaBackend::new(ordinal)?, |_, _| {})?;
            // The CPU's ceilings say nothing about a GPU; measuring the GPU's is still to do, so the
            // fractions are left out rather than made up.
            measure(&model, settings, grammars, name, None)
        }
        Device::Cpu | Device::Auto => {
            let model = load_cpu(&source, settings.threads, settings.quantization, |_, _| {})?;
            let bandwidth_gb_s = measure_bandwidth(settings.threads);
            let peak_macs = model.backend().peak_macs_per_s();
            let mut result = measure(&model, settings, grammars, name, Some((bandwidth_gb_s, peak_macs)))?;
            result.product_unit = Some(CpuBackend::product_unit().to_string());
            if settings.quantization != Quantization::None {
                // Under GEMM_MIN_ROWS, so its products are decode's (activations quantized too): the larger error.
                let prompt = random_tokens(24, model.config.vocab_size as u32, 7);
                result.logits_error = Some(logits_error(&source, settings.threads, settings.quantization, &prompt)?);
            }
            Ok(result)
        }
    }
}

/// Prefill and decode timings of a loaded model; `ceilings` is (bandwidth GB/s, peak MAC/s) when known.
fn measure<B: Backend>(
    model: &Arc<Transformer<B>>,
    settings: &EngineBenchSettings,
    grammars: Option<Compiler>,
    name: String,
    ceilings: Option<(f64, f64)>,
) -> Result<EngineBenchResult, EngineBenchError> {
    let weight_bytes = model.weight_bytes();
    let (bandwidth_gb_s, peak_macs) = ceilings.unwrap_or((f64::NAN, f64::NAN));
    let decode_bound = bandwidth_gb_s * 1e9 / weight_bytes as f64;
    let compute_bound = peak_macs / model.macs_per_token() as f64;

    let vocab = model.config.vocab_size as u32;
    let mut prefill = Vec::new();
    for &len in &settings.prompt_lengths {
        let mut times: Vec<f64> = (0..settings.repeats.max(1))
            .map(|rep| {
                let mut s = scheduler(model, len.max(16), 1, len + 1)?;
                s.add(0, &request(random_tokens(len, vocab, rep as u64), 1), 0);
                let start = Instant::now();
                while !s.is_idle() {
                    s.step();
                }
                Ok(start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, BackendError>>()?;
        let median_ms = median(&mut times);
        let tokens_per_s = len as f64 / (median_ms / 1e3);
        let macs = model.macs_per_token() as f64 * len as f64 + model.attention_macs(len as u64) as f64;
        let fraction_of_compute_bound = tokens_per_s / (peak_macs * len as f64 / macs);
        prefill.push(Prefill { prompt_tokens: len, median_ms, tokens_per_s, fraction_of_compute_bound });
    }

    // Every batch size's steps alternate, so a change in what else this machine is doing (memory bandwidth
    // swings by a third on a shared box) lands on all of them alike and the ratio to batch 1 holds.
    const PROMPT: usize = 32;
    let temperatures = if settings.temperatures.is_empty() { &[0.0][..] } else { &settings.temperatures[..] };
    let kinds: &[bool] = if grammars.is_some() { &[false, true] } else { &[false] };
    let mut runs = temperatures
        .iter()
        .flat_map(|&temperature| settings.batch_sizes.iter().map(move |&batch| (temperature, batch)))
        .flat_map(|run| kinds.iter().map(move |&structured| (run, structured)))
        .map(|((temperature, batch), structured)| {
            let mut s = scheduler(model, 8192, batch, PROMPT + settings.decode_steps + 2)?;
            if let Some(grammars) = grammars.as_ref().filter(|_| structured) {
                s.set_grammars(grammars.clone());
            }
            for i in 0..batch {
                let tokens = random_tokens(PROMPT, vocab, 1000 + i as u64);
                let mut request = request(tokens, settings.decode_steps as u32 + 1);
                request.sampling.temperature = temperature;
                if structured {
                    request.constraint = Some(Constraint::JsonSchema(BENCH_SCHEMA.into()));
                }
                s.add(i as u64, &request, i as u64);
            }
            // Prefill everyone (one step: the budget holds every prompt).
            s.step();
            Ok(((temperature, batch, structured), s, Vec::with_capacity(settings.decode_steps)))
        })
        .collect::<Result<Vec<_>, BackendError>>()?;
    for _ in 0..settings.decode_steps {
        for (_, s, steps) in &mut runs {
            let sampled_before = s.executor().sampling_time();
            let start = Instant::now();
            let produced = s.step().outputs.len();
            let step_ms = start.elapsed().as_secs_f64() * 1e3;
            let sampling_ms = (s.executor().sampling_time() - sampled_before).as_secs_f64() * 1e3;
            // A structured sequence may end early (its object closed): the rate counts what each step made.
            if produced > 0 {
                steps.push((step_ms, sampling_ms, produced as f64 / (step_ms / 1e3)));
            }
        }
    }
    let mut decode: Vec<Decode> = Vec::new();
    for ((temperature, batch, structured), _, steps) in runs {
        let median_step_ms = median(&mut steps.iter().map(|(step, _, _)| *step).collect::<Vec<_>>());
        let median_sampling_ms = median(&mut steps.iter().map(|(_, sampling, _)| *sampling).collect::<Vec<_>>());
        let tokens_per_s = median(&mut steps.iter().map(|(_, _, rate)| *rate).collect::<Vec<_>>());
        let same = |d: &&Decode, b: usize, t: f32| d.batch == b && d.temperature == t && d.structured == structured;
        let batch_1 = decode.iter().find(|d| same(d, 1, temperature)).map_or(tokens_per_s, |d| d.tokens_per_s);
        let greedy = decode.iter().find(|d| same(d, batch, 0.0)).map(|d| d.tokens_per_s);
        let unconstrained = decode
            .iter()
            .find(|d| d.batch == batch && d.temperature == temperature && !d.structured)
            .map(|d| d.tokens_per_s);
        decode.push(Decode {
            batch,
            temperature,
            median_step_ms,
            tokens_per_s,
            speedup_vs_batch_1: tokens_per_s / batch_1,
            vs_greedy: if temperature == 0.0 { Some(1.0) } else { greedy.map(|g| tokens_per_s / g) },
            structured,
            vs_unconstrained: unconstrained.filter(|_| structured).map(|u| tokens_per_s / u),
            sampling_share: median_sampling_ms / median_step_ms,
            fraction_of_bound: tokens_per_s / (decode_bound * batch as f64).min(compute_bound),
        });
    }
    Ok(EngineBenchResult {
        model: name,
        device: model.backend().describe(),
        threads: settings.threads,
        quantization: settings.quantization,
        logits_error: None,
        weight_bytes,
        kv_dtype: format!("{:?}", model.kv_dtype()),
        bandwidth_gb_s,
        decode_bound_tokens_per_s: decode_bound,
        peak_gmacs: peak_macs / 1e9,
        product_unit: None,
        compute_bound_tokens_per_s: compute_bound,
        prefill,
        decode,
    })
}

pub fn table(r: &EngineBenchResult) -> String {
    let quantized = match (r.quantization, r.logits_error) {
        (Quantization::None, _) => String::new(),
        (Quantization::Int8, Some(error)) => format!(
            ", int8 (logits within {:.4} of the checkpoint's, {:.2} % of the largest; the same top token at \
             {:.0} % of positions)",
            error.max,
            error.relative * 100.0,
            error.same_top_token * 100.0
        ),
        (Quantization::Int8, None) => ", int8".to_string(),
    };
    let mut out = format!(
        "model: {}{quantized} ({:.0} MB of weights, {} KV pages) on {}\n\
         memory bandwidth {:.1} GB/s → batch-1 decode bound {:.1} tok/s\n\
         matrix-product peak {:.1} GMAC/s{} → compute bound {:.1} tok/s (weights alone; each prompt's bound adds its \
         attention)\n",
        r.model,
        r.weight_bytes as f64 / 1e6,
        r.kv_dtype.to_lowercase(),
        r.device,
        r.bandwidth_gb_s,
        r.decode_bound_tokens_per_s,
        r.peak_gmacs,
        r.product_unit.as_ref().map(|unit| format!(" ({unit})")).unwrap_or_default(),
        r.compute_bound_tokens_per_s
    );
    out.push_str(&format!("{:<22} {:>12} {:>12} {:>10}\n", "prefill", "median ms", "tok/s", "of bound"));
    for p in &r.prefill {
        out.push_str(&format!(
            "{:<22} {:>12.1} {:>12.1} {:>9.0}%\n",
            format!("{} tokens", p.prompt_tokens),
            p.median_ms,
            p.tokens_per_s,
            p.fraction_of_compute_bound * 100.0
        ));
    }
    out.push_str(&format!(
        "{:<28} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}\n",
        "decode", "step ms", "tok/s", "× batch 1", "× greedy", "× free", "sampling", "of bound"
    ));
    let ratio = |r: Option<f64>| r.map_or("-".to_string(), |v| format!("{v:.2}"));
    for d in &r.decode {
        let label = format!("batch {} temp {}{}", d.batch, d.temperature, if d.structured { " json" } else { "" });
        out.push_str(&format!(
            "{:<28} {:>10.2} {:>10.1} {:>10.2} {:>9} {:>9} {:>8.1}% {:>8.0}%\n",
            label,
            d.median_step_ms,
            d.tokens_per_s,
            d.speedup_vs_batch_1,
            ratio(d.vs_greedy),
            ratio(d.vs_unconstrained),
            d.sampling_share * 100.0,
            d.fraction_of_bound * 100.0
        ));
    }
    out
}

/// Each quantized run's decode and prefill speeds against the unquantized run's, in the same run (one line
/// each); empty without both.
pub fn comparison(results: &[EngineBenchResult]) -> String {
    let Some(base) = results.iter().find(|r| r.quantization == Quantization::None) else { return String::new() };
    let mut out = String::new();
    for quantized in results.iter().filter(|r| r.quantization != Quantization::None) {
        for d in &quantized.decode {
            let same = base
                .decode
                .iter()
                .find(|b| (b.batch, b.temperature, b.structured) == (d.batch, d.temperature, d.structured));
            if let Some(b) = same {
                out.push_str(&format!(
                    "{:?} decode batch {} temp {}: {:.1} tok/s, {:.2}× unquantized ({:.1}); {:.2}× the unquantized \
                     model's memory bound\n",
                    quantized.quantization,
                    d.batch,
                    d.temperature,
                    d.tokens_per_s,
                    d.tokens_per_s / b.tokens_per_s,
                    b.tokens_per_s,
                    d.tokens_per_s / base.decode_bound_tokens_per_s / d.batch as f64,
                ));
            }
        }
        for p in &quantized.prefill {
            if let Some(b) = base.prefill.iter().find(|b| b.prompt_tokens == p.prompt_tokens) {
                out.push_str(&format!(
                    "{:?} prefill {} tokens: {:.1} tok/s, {:.2}× unquantized ({:.1})\n",
                    quantized.quantization,
                    p.prompt_tokens,
                    p.tokens_per_s,
                    p.tokens_per_s / b.tokens_per_s,
                    b.tokens_per_s
                ));
            }
        }
    }
    out
}

/// The runs as the issue's summary lists them: every decode and prefill row with its quantization.
pub fn json(results: &[EngineBenchResult]) -> serde_json::Value {
    let decode: Vec<serde_json::Value> = results
        .iter()
        .flat_map(|r| {
            r.decode.iter().map(|d| {
                serde_json::json!({"batch": d.batch, "temperature": d.temperature, "structured": d.structured,
                    "quantization": r.quantization, "tok_s": d.tokens_per_s})
            })
        })
        .collect();
    let prefill: Vec<serde_json::Value> = results
        .iter()
        .flat_map(|r| {
            r.prefill.iter().map(|p| {
                serde_json::json!({"tokens": p.prompt_tokens, "quantization": r.quantization, "tok_s": p.tokens_per_s})
            })
        })
        .collect();
    serde_json::json!({
        "bench": "engine",
        "results": results,
        "decode": decode,
        "prefill": prefill,
        "bandwidth_gbps": results.first().map(|r| r.bandwidth_gb_s),
    })
}

/// A scheduler with KV room for `seqs` sequences of `seq_len` tokens (and no more: faulting in an oversized
/// cache dominated the run).
fn scheduler<B: Backend>(
    model: &Arc<Transformer<B>>,
    budget: usize,
    seqs: usize,
    seq_len: usize,
) -> Result<Scheduler<NativeExecutor<B>>, BackendError> {
    let defaults = SchedulerConfig::default();
    let config = SchedulerConfig {
        num_blocks: seqs.max(1) * (seq_len.div_ceil(defaults.block_size) + 1),
        max_num_seqs: seqs.max(1),
        max_num_batched_tokens: budget,
        enable_prefix_caching: false,
        ..defaults
    };
    let executor = NativeExecutor::new(model.clone(), config.num_blocks, config.block_size)?;
    Ok(Scheduler::new(config, executor))
}

fn request(tokens: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest::greedy("bench", tokens, max_tokens)
}

fn random_tokens(len: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % u64::from(vocab)) as u32
        })
        .collect()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    super::percentile(values, 0.5)
}

/// Read bandwidth of this machine with the engine's thread count: sum a buffer far larger than the caches.
fn measure_bandwidth(threads: usize) -> f64 {
    let words = 64 << 20; // 512 MiB of u64
    let buffer: Vec<u64> = (0..words as u64).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build();
    let sum = || {
        buffer
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add)
    };
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let total = match &pool {
                Ok(pool) => pool.install(sum),
                Err(_) => sum(),
            };
            std::hint::black_box(total);
            (words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(&mut rates)
}

/// A random checkpoint in a temporary directory, removed when dropped.
pub(super) struct GeneratedModel {
    pub dir: PathBuf,
}

impl GeneratedModel {
    fn smollm2_135m_shape() -> Result<Self, EngineBenchError> {
        let (hidden, intermediate, layers, vocab, kv) = (576usize, 1536usize, 30usize, 49152usize, 192usize);
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": vocab, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "bos_token_id": 0, "eos_token_id": 2
        });
        let files = [("config.json", config.to_string()), ("tokenizer.json", synthetic_tokenizer(vocab))];
        let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.norm.weight".into(), vec![hidden])];
        shapes.extend(decoder_shapes("model.", hidden, intermediate, layers, vocab, kv));
        Self::random("smollm2-shape", &files, &shapes)
    }

    /// A checkpoint of `files` and random bf16 weights of `shapes` (norm weights 1, the rest uniform in
    /// ±0.05), written as one safetensors file.
    pub(super) fn random(
        label: &str,
        files: &[(&str, String)],
        shapes: &[(String, Vec<usize>)],
    ) -> Result<Self, EngineBenchError> {
        let dir = std::env::temp_dir().join(format!("dynamo-bench-{label}-{}", std::process::id()));
        let generated = Self { dir };
        let error = |source| EngineBenchError::Generate { path: generated.dir.clone(), source };
        std::fs::create_dir_all(&generated.dir).map_err(error)?;
        for (name, text) in files {
            std::fs::write(generated.dir.join(name), text).map_err(error)?;
        }
        let data: Vec<Vec<u8>> = shapes
            .par_iter()
            .enumerate()
            .map(|(at, (name, shape))| {
                let count: usize = shape.iter().product();
                let norm = name.ends_with("norm.weight") || name.contains("layer_norm") || name.contains("layrnorm");
                let mut state = (at as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                (0..count)
                    .flat_map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let value = if norm { 1.0 } else { ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1 };
                        half::bf16::from_f32(value).to_le_bytes()
                    })
                    .collect()
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = shapes
            .iter()
            .zip(&data)
            .map(|((name, shape), bytes)| {
                TensorView::new(Dtype::BF16, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
                    .map_err(|e| error(std::io::Error::other(e.to_string())))
            })
            .collect::<Result<_, _>>()?;
        safetensors::serialize_to_file(views, None, &generated.dir.join("model.safetensors"))
            .map_err(|e| error(std::io::Error::other(e.to_string())))?;
        Ok(generated)
    }
}

/// The tensors of a Llama decoder under `prefix` (`model.`), its embedding included, its final norm not.
pub fn decoder_shapes(
    prefix: &str,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    vocab: usize,
    kv: usize,
) -> Vec<(String, Vec<usize>)> {
    let mut shapes = vec![(format!("{prefix}embed_tokens.weight"), vec![vocab, hidden])];
    for i in 0..layers {
        let p = format!("{prefix}layers.{i}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![hidden]),
            (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
            (format!("{p}.self_attn.q_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, hidden]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, hidden]),
            (format!("{p}.self_attn.o_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.mlp.gate_proj.weight"), vec![intermediate, hidden]),
            (format!("{p}.mlp.up_proj.weight"), vec![intermediate, hidden]),
            (format!("{p}.mlp.down_proj.weight"), vec![hidden, intermediate]),
        ]);
    }
    shapes
}

/// A byte-level BPE tokenizer of `size` tokens: the built-in model's, then made-up words (with and without a
/// leading space, digits, punctuation runs) as a real vocabulary has, so a grammar's masks walk a trie of
/// realistic size and shape. Only its vocabulary is real; it encodes with the built-in merges alone.
pub(super) fn synthetic_tokenizer(size: usize) -> String {
    let builtin = Model::load(&ModelSource::Builtin, None).ok();
    let text = builtin
        .as_ref()
        .and_then(|m| m.text_files().iter().find(|(name, _)| name == "tokenizer.json"))
        .map(|(_, text)| text.clone());
    let Some(mut json) = text.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) else {
        return String::new();
    };
    let Some(vocab) = json["model"]["vocab"].as_object_mut() else { return String::new() };
    let mut state = 0x5EED_u64;
    let mut next = |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    const LETTERS: &[u8] = b"etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ";
    const MARKS: &[u8] = b"{}[]\",:.!?-_()'/;";
    let mut id = vocab.len();
    while id < size {
        let word: String = match next(20) {
            0..=1 => (0..1 + next(4)).map(|_| char::from(b'0' + next(10) as u8)).collect(),
            2 => (0..1 + next(3)).map(|_| char::from(MARKS[next(MARKS.len() as u64) as usize])).collect(),
            n => {
                let letters: String =
                    (0..2 + next(8)).map(|_| char::from(LETTERS[next(12 + n * 2) as usize])).collect();
                if n % 2 == 0 { format!("Ġ{letters}") } else { letters }
            }
        };
        if !vocab.contains_key(&word) {
            vocab.insert(word, serde_json::Value::from(id));
            id += 1;
        }
    }
    json.to_string()
}

impl Drop for GeneratedModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_vocabulary_has_its_size_and_compiles_the_bench_schema() {
        let json = synthetic_tokenizer(5000);
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        let ids: std::collections::HashSet<u64> =
            parsed["model"]["vocab"].as_object().unwrap().values().map(|id| id.as_u64().unwrap()).collect();
        assert_eq!(ids, (0..5000).collect());
        let tokenizer = crate::core::model::Tokenizer::from_json(&json, "synthetic").unwrap();
        let grammars = crate::core::grammar::Compiler::new(&json, tokenizer.shared(), &[2]).grammars().unwrap();
        let mut guide = grammars.guide(&Constraint::JsonSchema(BENCH_SCHEMA.into()), &[]).unwrap();
        assert!(!guide.allowed().is_empty(), "the schema's opening has no token");
    }
}
