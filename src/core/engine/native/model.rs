//! The dense decoder (Llama / Mistral / Qwen2 / Qwen3) written once against `Backend`: weights, the paged KV
//! cache of every layer, and the forward pass over one step's batch of chunks from many sequences.
//!
//! Each layer writes the whole batch's K/V into the pages before any row attends, so a row always sees every
//! earlier position of its sequence, whether computed in an earlier step or in this one.
use super::backend::{AttentionSeq, AttentionShape, Backend, BackendError, KvDtype, Op, Product};
use super::config::{ModelConfig, RopeScaling};
use super::vision::VisionTower;
use super::weights::{WeightError, WeightFiles};
use std::sync::Arc;

struct Layer<B: Backend> {
    input_norm: B::Vector,
    q: B::Matrix,
    k: B::Matrix,
    v: B::Matrix,
    o: B::Matrix,
    qkv_bias: Option<[B::Vector; 3]>,
    /// Qwen3's per-head RMS norm of queries and keys.
    qk_norm: Option<[B::Vector; 2]>,
    post_norm: B::Vector,
    gate: B::Matrix,
    up: B::Matrix,
    down: B::Matrix,
}

pub struct Transformer<B: Backend> {
    pub config: ModelConfig,
    backend: B,
    embed: B::Matrix,
    layers: Vec<Layer<B>>,
    norm: B::Vector,
    /// `None` when tied to the embedding.
    lm_head: Option<B::Matrix>,
    inv_freq: Vec<f32>,
    weight_bytes: u64,
    macs_per_token: u64,
    kv_dtype: KvDtype,
    /// A LLaVA-style checkpoint's vision tower and projector.
    vision: Option<VisionTower<B>>,
}

/// Every layer's K and V pages, and the activations of the steps that fill them.
pub struct KvCache<B: Backend> {
    layers: Vec<(B::Pages, B::Pages)>,
    activations: Activations<B>,
}

/// One step's intermediate values, kept from step to step: allocated afresh, the vocabulary-wide logits
/// (3 MB at batch 16 through a 49k vocabulary) came back from the allocator as new pages each step, and
/// faulting them in cost a tenth of a CPU decode step.
struct Activations<B: Backend> {
    hidden: B::Vector,
    x: B::Vector,
    q: B::Vector,
    k: B::Vector,
    v: B::Vector,
    attn: B::Vector,
    projected: B::Vector,
    gate: B::Vector,
    up: B::Vector,
    logits: B::Vector,
}

impl<B: Backend> Activations<B> {
    fn new(b: &B) -> Op<Self> {
        Ok(Self {
            hidden: b.zeros(0)?,
            x: b.zeros(0)?,
            q: b.zeros(0)?,
            k: b.zeros(0)?,
            v: b.zeros(0)?,
            attn: b.zeros(0)?,
            projected: b.zeros(0)?,
            gate: b.zeros(0)?,
            up: b.zeros(0)?,
            logits: b.zeros(0)?,
        })
    }
}

/// Some pages of a KV cache on the host, every layer's K and V: what moves between workers when one prefills
/// and another decodes. Page `i` of `ids` at export is page `i` here.
#[derive(Debug, Clone, PartialEq)]
pub struct KvBlocks {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Per layer: K then V, `num_blocks × block_size × kv heads × head_dim` each.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("KV blocks do not fit this model's cache: {0}")]
pub struct KvShapeError(String);

/// One step's rows, flattened over its sequences.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Page slot each row's K/V goes to.
    pub slots: Vec<u32>,
    pub seqs: Vec<AttentionSeq>,
    /// Rows whose logits are wanted (the last row of each sequence that samples).
    pub logit_rows: Vec<usize>,
    /// Rows that take given embeddings (an image's) instead of their tokens' own.
    pub embeds: Vec<RowEmbeds>,
}

/// Embeddings for consecutive rows of a batch: rows `from..from + rows` of `values` (`hidden_size` each)
/// go to batch rows `first_row..`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowEmbeds {
    pub first_row: usize,
    pub values: Arc<Vec<f32>>,
    pub from: usize,
    pub rows: usize,
}

impl ForwardBatch {
    /// Adds tokens `start..end` of a sequence whose block table is `pages`.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        start: usize,
        end: usize,
        pages: &[u32],
        block_size: usize,
        wants_logits: bool,
    ) {
        let first_row = self.token_ids.len();
        for position in start..end {
            self.token_ids.push(tokens[position]);
            self.positions.push(position as u32);
            self.slots.push(pages[position / block_size] * block_size as u32 + (position % block_size) as u32);
        }
        self.seqs.push(AttentionSeq {
            first_row,
            rows: end - start,
            first_position: start,
            block_table: pages.to_vec(),
        });
        if wants_logits && end > start {
            self.logit_rows.push(first_row + end - start - 1);
        }
    }
}

impl<B: Backend> Transformer<B> {
    pub fn load(
        backend: B,
        config: ModelConfig,
        files: &WeightFiles,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, WeightError> {
        let (h, kv) = (config.hidden_size, config.num_kv_heads * config.head_dim);
        let q_width = config.num_heads * config.head_dim;
        let weight_bytes = std::cell::Cell::new(0u64);
        let bf16_weights = std::cell::Cell::new(false);
        let vector = |name: &str, len: usize| -> Result<B::Vector, WeightError> {
            weight_bytes.set(weight_bytes.get() + 4 * len as u64);
            Ok(backend.vector(&files.read(name, &[len], false)?.data.to_f32())?)
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<B::Matrix, WeightError> {
            let tensor = files.read(name, &[rows, cols], true)?;
            weight_bytes.set(weight_bytes.get() + backend.matrix_bytes(&tensor));
            bf16_weights.set(bf16_weights.get() || matches!(tensor.data, super::weights::HostData::Bf16(_)));
            Ok(backend.matrix(tensor)?)
        };
        let (body, head) = text_names(files);
        let embed = matrix(&format!("{body}embed_tokens.weight"), config.vocab_size, h)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            progress(i, config.num_layers);
            let p = format!("{body}layers.{i}");
            let qkv_bias = if config.qkv_bias {
                Some([
                    vector(&format!("{p}.self_attn.q_proj.bias"), q_width)?,
                    vector(&format!("{p}.self_attn.k_proj.bias"), kv)?,
                    vector(&format!("{p}.self_attn.v_proj.bias"), kv)?,
                ])
            } else {
                None
            };
            let qk_norm = if config.qk_norm {
                Some([
                    vector(&format!("{p}.self_attn.q_norm.weight"), config.head_dim)?,
                    vector(&format!("{p}.self_attn.k_norm.weight"), config.head_dim)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                input_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                q: matrix(&format!("{p}.self_attn.q_proj.weight"), q_width, h)?,
                k: matrix(&format!("{p}.self_attn.k_proj.weight"), kv, h)?,
                v: matrix(&format!("{p}.self_attn.v_proj.weight"), kv, h)?,
                o: matrix(&format!("{p}.self_attn.o_proj.weight"), h, q_width)?,
                qkv_bias,
                qk_norm,
                post_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate: matrix(&format!("{p}.mlp.gate_proj.weight"), config.intermediate_size, h)?,
                up: matrix(&format!("{p}.mlp.up_proj.weight"), config.intermediate_size, h)?,
                down: matrix(&format!("{p}.mlp.down_proj.weight"), h, config.intermediate_size)?,
            });
        }
        progress(config.num_layers, config.num_layers);
        let norm = vector(&format!("{body}norm.weight"), h)?;
        // Some tied checkpoints still ship lm_head; the embedding is the same matrix then.
        let lm_head = if config.tie_word_embeddings || !files.contains(head) {
            if !config.tie_word_embeddings {
                return Err(WeightError::Missing { name: head.into() });
            }
            None
        } else {
            Some(matrix(head, config.vocab_size, h)?)
        };
        let vision = match &config.multimodal {
            Some(multimodal) => Some(VisionTower::load(&backend, multimodal.clone(), h, files)?),
            None => None,
        };
        let inv_freq = inverse_frequencies(&config);
        let weight_bytes = weight_bytes.get();
        let kv_dtype = backend.kv_dtype(bf16_weights.get());
        let (c, q_width) = (&config, config.num_heads * config.head_dim);
        let per_layer = 2 * h * q_width + 2 * h * kv + 3 * h * c.intermediate_size;
        let macs_per_token = (c.num_layers * per_layer + c.vocab_size * h) as u64;
        Ok(Self {
            config,
            backend,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            weight_bytes,
            macs_per_token,
            kv_dtype,
            vision,
        })
    }

    pub fn vision(&self) -> Option<&VisionTower<B>> {
        self.vision.as_ref()
    }

    pub fn vision_mut(&mut self) -> Option<&mut VisionTower<B>> {
        self.vision.as_mut()
    }

    /// The embeddings of image files, each `tokens_per_image × hidden_size` values, one after another.
    pub fn encode_image_files(&self, files: &[&[u8]]) -> Op<Vec<f32>> {
        let tower = self.vision.as_ref().ok_or_else(|| BackendError("this model has no vision tower".into()))?;
        self.backend.run(|| tower.encode_files(&self.backend, files))
    }

    /// Each image's embeddings (see `VisionTower::encode`); an error for a model without a vision tower.
    pub fn encode_images(&self, images: &[&[f32]]) -> Op<Vec<f32>> {
        let tower = self.vision.as_ref().ok_or_else(|| BackendError("this model has no vision tower".into()))?;
        self.backend.run(|| tower.encode(&self.backend, images))
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Multiply-adds of the matrix products for one token (attention over the context not counted).
    pub fn macs_per_token(&self) -> u64 {
        self.macs_per_token
    }

    /// Multiply-adds of a causal prefill's attention over `tokens` positions: every query head scores, then
    /// weighs, the positions up to its own (n(n+1)/2 pairs), in every layer.
    pub fn attention_macs(&self, tokens: u64) -> u64 {
        let c = &self.config;
        2 * (c.num_layers * c.num_heads * c.head_dim) as u64 * (tokens * (tokens + 1) / 2)
    }

    /// Bytes of weights as stored (a decode step streams all of them once).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    pub fn new_cache(&self, num_pages: usize, block_size: usize) -> Op<KvCache<B>> {
        let page_len = block_size * self.config.num_kv_heads * self.config.head_dim;
        let layers = (0..self.config.num_layers)
            .map(|_| {
                let pages = || self.backend.pages(num_pages, page_len, self.kv_dtype);
                Ok((pages()?, pages()?))
            })
            .collect::<Op<_>>()?;
        Ok(KvCache { layers, activations: Activations::new(&self.backend)? })
    }

    /// The memory of `cache`'s pages, layer by layer, K then V: `2 × layers` regions of `num_pages` pages of
    /// `kv_page_bytes` each, so page `p` of region `r` is bytes `p × kv_page_bytes ..` (`None` where the
    /// backend keeps its pages to itself).
    pub fn cache_memory(&self, cache: &KvCache<B>) -> Option<Vec<std::sync::Arc<crate::core::transfer::Region>>> {
        cache.layers.iter().flat_map(|(k, v)| [k, v]).map(|pages| self.backend.page_memory(pages)).collect()
    }

    /// Bytes of one layer's K (or V) for one block: the unit a KV transfer moves.
    pub fn kv_page_bytes(&self, block_size: usize) -> u64 {
        (block_size * self.config.num_kv_heads * self.config.head_dim * self.kv_dtype.bytes()) as u64
    }

    /// Copies pages `ids` of `cache` out, in order.
    pub fn export_blocks(&self, cache: &KvCache<B>, ids: &[u32], block_size: usize) -> Op<KvBlocks> {
        let page_len = block_size * self.config.num_kv_heads * self.config.head_dim;
        let layers = cache
            .layers
            .iter()
            .map(|(k, v)| Ok((self.backend.read_pages(k, ids, page_len)?, self.backend.read_pages(v, ids, page_len)?)))
            .collect::<Op<_>>()?;
        Ok(KvBlocks { block_size, num_blocks: ids.len(), layers })
    }

    /// Writes exported blocks into pages `ids` of `cache` (which may differ from the pages they came from).
    pub fn import_blocks(&self, cache: &mut KvCache<B>, ids: &[u32], blocks: &KvBlocks) -> Result<(), KvShapeError> {
        let page_len = blocks.block_size * self.config.num_kv_heads * self.config.head_dim;
        if blocks.num_blocks != ids.len() || blocks.layers.len() != cache.layers.len() {
            return Err(KvShapeError(format!(
                "{} blocks of {} layers into {} pages of {} layers",
                blocks.num_blocks,
                blocks.layers.len(),
                ids.len(),
                cache.layers.len()
            )));
        }
        if let Some((k, _)) = blocks.layers.iter().find(|(k, v)| k.len() != ids.len() * page_len || v.len() != k.len())
        {
            return Err(KvShapeError(format!("a layer holds {} values, expected {}", k.len(), ids.len() * page_len)));
        }
        for ((k_pages, v_pages), (k, v)) in cache.layers.iter_mut().zip(&blocks.layers) {
            self.backend.write_pages(k_pages, ids, page_len, k).map_err(|e| KvShapeError(e.to_string()))?;
            self.backend.write_pages(v_pages, ids, page_len, v).map_err(|e| KvShapeError(e.to_string()))?;
        }
        Ok(())
    }

    /// What the KV cache's pages hold.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Bytes of KV one page holds over all layers.
    pub fn page_bytes(&self, block_size: usize) -> usize {
        let c = &self.config;
        2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * self.kv_dtype.bytes()
    }

    /// Runs the batch, writing its K/V into `cache`; returns `logit_rows.len() × vocab` logits.
    pub fn forward(&self, cache: &mut KvCache<B>, batch: &ForwardBatch, block_size: usize) -> Op<Vec<f32>> {
        self.backend.run(|| self.forward_layers(cache, batch, block_size, false)).map(|(logits, _)| logits)
    }

    /// `forward`, and with `hidden` also the final hidden states (after the last norm) of the rows that get
    /// logits, `hidden_size` values each: what embedding requests return.
    pub fn forward_with_hidden(
        &self,
        cache: &mut KvCache<B>,
        batch: &ForwardBatch,
        block_size: usize,
        hidden: bool,
    ) -> Op<(Vec<f32>, Option<Vec<f32>>)> {
        self.backend.run(|| self.forward_layers(cache, batch, block_size, hidden))
    }

    fn forward_layers(
        &self,
        cache: &mut KvCache<B>,
        batch: &ForwardBatch,
        block_size: usize,
        want_hidden: bool,
    ) -> Op<(Vec<f32>, Option<Vec<f32>>)> {
        let b = &self.backend;
        let c = &self.config;
        let shape =
            AttentionShape { num_heads: c.num_heads, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim, block_size };
        let Activations { hidden, x, q, k, v, attn, projected, gate, up, logits } = &mut cache.activations;
        b.embedding(&self.embed, &batch.token_ids, hidden)?;
        for embeds in &batch.embeds {
            let span = embeds.from * c.hidden_size..(embeds.from + embeds.rows) * c.hidden_size;
            let values = embeds.values.get(span).ok_or_else(|| {
                BackendError(format!("rows {}.. of embeddings holding {} values", embeds.from, embeds.values.len()))
            })?;
            b.write_rows(hidden, c.hidden_size, embeds.first_row, values)?;
        }
        for (layer, (k_pages, v_pages)) in self.layers.iter().zip(cache.layers.iter_mut()) {
            b.rms_norm(hidden, &layer.input_norm, c.hidden_size, c.rms_norm_eps, x)?;
            let [q_bias, k_bias, v_bias] = match &layer.qkv_bias {
                Some([qb, kb, vb]) => [Some(qb), Some(kb), Some(vb)],
                None => [None, None, None],
            };
            b.matmuls(
                x,
                &mut [
                    Product { weight: &layer.q, bias: q_bias, out: q },
                    Product { weight: &layer.k, bias: k_bias, out: k },
                    Product { weight: &layer.v, bias: v_bias, out: v },
                ],
            )?;
            if let Some([q_norm, k_norm]) = &layer.qk_norm {
                b.rms_norm(q, q_norm, c.head_dim, c.rms_norm_eps, attn)?;
                std::mem::swap(q, attn);
                b.rms_norm(k, k_norm, c.head_dim, c.rms_norm_eps, attn)?;
                std::mem::swap(k, attn);
            }
            b.rope(q, &batch.positions, c.num_heads, c.head_dim, &self.inv_freq)?;
            b.rope(k, &batch.positions, c.num_kv_heads, c.head_dim, &self.inv_freq)?;
            b.write_kv(k, v, &batch.slots, k_pages, v_pages)?;
            b.paged_attention(q, k_pages, v_pages, &batch.seqs, &shape, attn)?;
            b.matmul(attn, &layer.o, None, projected)?;
            b.add(hidden, projected)?;

            b.rms_norm(hidden, &layer.post_norm, c.hidden_size, c.rms_norm_eps, x)?;
            b.matmuls(
                x,
                &mut [
                    Product { weight: &layer.gate, bias: None, out: gate },
                    Product { weight: &layer.up, bias: None, out: up },
                ],
            )?;
            b.silu_mul(gate, up)?;
            b.matmul(gate, &layer.down, None, projected)?;
            b.add(hidden, projected)?;
        }
        // Only the rows that sample need the (vocabulary-wide, expensive) head.
        let last = b.gather_rows(hidden, c.hidden_size, &batch.logit_rows)?;
        b.rms_norm(&last, &self.norm, c.hidden_size, c.rms_norm_eps, x)?;
        let pooled = match want_hidden {
            true => {
                let mut rows = b.to_host(x)?;
                rows.truncate(batch.logit_rows.len() * c.hidden_size);
                Some(rows)
            }
            false => None,
        };
        b.matmul(x, self.lm_head.as_ref().unwrap_or(&self.embed), None, logits)?;
        Ok((b.to_host(logits)?, pooled))
    }
}

/// Where the language model's tensors are: `model.` for a text checkpoint, `model.language_model.` in a
/// multimodal one as transformers 5 writes it, `language_model.model.` as hub checkpoints before it did.
fn text_names(files: &WeightFiles) -> (&'static str, &'static str) {
    if files.contains("model.language_model.embed_tokens.weight") {
        ("model.language_model.", "lm_head.weight")
    } else if files.contains("language_model.model.embed_tokens.weight") {
        ("language_model.model.", "language_model.lm_head.weight")
    } else {
        ("model.", "lm_head.weight")
    }
}

/// Rotary frequencies, in f32 as transformers computes them, with Llama 3's scaling applied.
fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / config.rope_theta.powf((2 * i) as f32 / dim as f32);
            match config.rope_scaling {
                RopeScaling::None => freq,
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    let (low_wavelen, high_wavelen) =
                        (original_max_position / low_freq_factor, original_max_position / high_freq_factor);
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth =
                            (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                }
            }
        })
        .collect()
}
