//! LLaVA-style checkpoints (`LlavaForConditionalGeneration`): their config (`LlavaConfig`: the CLIP vision
//! tower, which of its layers feed the projector, the image token) and the tower itself (`VisionTower`),
//! which turns an image's pixel values into the embeddings its placeholder tokens take in the language model.
//!
//! The language model is the dense decoder of `model`, read from `text_config`; hub checkpoints leave out
//! of `text_config` and `vision_config` whatever equals transformers' defaults, so the defaults of Llama and
//! CLIP are filled in here as transformers does.
use super::backend::{Backend, BackendError, Op, Product};
use super::config::{ConfigError, ModelConfig};
use super::host::Activation;
use super::weights::{WeightError, WeightFiles};
use crate::core::multimodal::{DecodeLimits, ImageProcessor, decode};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Side of the square image the tower reads, in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
    pub activation: Activation,
}

/// Which positions of the chosen hidden states become image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Every patch, without the class token.
    Default,
    /// The class token and every patch.
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub vision: VisionConfig,
    /// The placeholder token, repeated `tokens_per_image` times where an image goes.
    pub image_token_id: u32,
    /// Hidden states of the tower concatenated for the projector: 0 is the embeddings after the pre-norm,
    /// `i` the output of layer `i` (`vision_feature_layer`, negative counting from the last).
    pub feature_layers: Vec<usize>,
    pub select: FeatureSelect,
    pub projector_activation: Activation,
    pub projector_bias: bool,
}

impl LlavaConfig {
    pub fn patches(&self) -> usize {
        let side = self.vision.image_size / self.vision.patch_size;
        side * side
    }

    /// Embeddings (and so placeholder tokens) per image.
    pub fn tokens_per_image(&self) -> usize {
        self.patches() + usize::from(self.select == FeatureSelect::Full)
    }
}

/// What `LlamaConfig()` and `CLIPVisionConfig()` give a field a checkpoint's config leaves out.
const LLAMA_DEFAULTS: [(&str, u64); 6] = [
    ("vocab_size", 32_000),
    ("hidden_size", 4096),
    ("intermediate_size", 11_008),
    ("num_hidden_layers", 32),
    ("num_attention_heads", 32),
    ("max_position_embeddings", 2048),
];

/// A `model_type: "llava"` config: the text model with its multimodal part.
pub(super) fn parse_llava(config: &Value) -> Result<ModelConfig, ConfigError> {
    let mut text = config.get("text_config").cloned().unwrap_or_else(|| json!({}));
    let Some(fields) = text.as_object_mut() else {
        return Err(ConfigError::Missing { field: "text_config", expected: "object" });
    };
    let text_type = fields.entry("model_type").or_insert_with(|| json!("llama")).clone();
    if text_type == "llama" {
        for (field, default) in LLAMA_DEFAULTS {
            fields.entry(field).or_insert_with(|| json!(default));
        }
    }
    let mut model = ModelConfig::parse(&text)?;
    // transformers carries a tie declared in either config over to the model.
    model.tie_word_embeddings |= config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
    model.multimodal = Some(parse_multimodal(config)?);
    Ok(model)
}

fn parse_multimodal(config: &Value) -> Result<LlavaConfig, ConfigError> {
    let vision = match config.get("vision_config").filter(|v| !v.is_null()) {
        Some(v) => parse_vision(v, &CLIP_DEFAULTS)?,
        None => parse_vision(&json!({}), &LLAVA_VISION_DEFAULTS)?,
    };
    let layer_count = vision.num_layers as i64;
    let resolve = |layer: i64| {
        let index = if layer < 0 { layer_count + 1 + layer } else { layer };
        (0..=layer_count).contains(&index).then_some(index as usize).ok_or_else(|| {
            unsupported(
                "vision_feature_layer",
                &format!("layer {layer} of a tower with {layer_count} layers (hidden states 0..={layer_count})"),
            )
        })
    };
    let feature_layers = match config.get("vision_feature_layer") {
        None | Some(Value::Null) => vec![resolve(-2)?],
        Some(Value::Number(n)) => vec![resolve(n.as_i64().ok_or(LAYER_TYPE)?)?],
        Some(Value::Array(layers)) if !layers.is_empty() => {
            layers.iter().map(|l| resolve(l.as_i64().ok_or(LAYER_TYPE)?)).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(LAYER_TYPE),
    };
    let select = match config.get("vision_feature_select_strategy").and_then(Value::as_str).unwrap_or("default") {
        "default" => FeatureSelect::Default,
        "full" => FeatureSelect::Full,
        other => {
            return Err(unsupported(
                &format!("vision_feature_select_strategy \"{other}\""),
                "supported: default, full",
            ));
        }
    };
    let projector_activation = activation(config, "projector_hidden_act", "gelu")?;
    let image_token_id = ["image_token_index", "image_token_id"]
        .iter()
        .find_map(|f| config.get(*f).and_then(Value::as_u64))
        .unwrap_or(32_000)
        .try_into()
        .map_err(|_| ConfigError::Missing { field: "image_token_index", expected: "token id" })?;
    Ok(LlavaConfig {
        vision,
        image_token_id,
        feature_layers,
        select,
        projector_activation,
        projector_bias: config.get("multimodal_projector_bias").and_then(Value::as_bool).unwrap_or(true),
    })
}

const LAYER_TYPE: ConfigError =
    ConfigError::Missing { field: "vision_feature_layer", expected: "integer or list of integers" };

/// `CLIPVisionConfig()`'s defaults, and `LlavaConfig`'s (CLIP ViT-L/14 at 336 pixels) when a config has no
/// `vision_config` at all.
const CLIP_DEFAULTS: [(&str, u64); 6] = [
    ("hidden_size", 768),
    ("intermediate_size", 3072),
    ("num_hidden_layers", 12),
    ("num_attention_heads", 12),
    ("image_size", 224),
    ("patch_size", 32),
];
const LLAVA_VISION_DEFAULTS: [(&str, u64); 6] = [
    ("hidden_size", 1024),
    ("intermediate_size", 4096),
    ("num_hidden_layers", 24),
    ("num_attention_heads", 16),
    ("image_size", 336),
    ("patch_size", 14),
];

fn parse_vision(v: &Value, defaults: &[(&'static str, u64); 6]) -> Result<VisionConfig, ConfigError> {
    let kind = v.get("model_type").and_then(Value::as_str).unwrap_or("clip_vision_model");
    if kind != "clip_vision_model" {
        return Err(unsupported(&format!("vision_config.model_type \"{kind}\""), "supported: clip_vision_model"));
    }
    let field = |name: &'static str| -> Result<usize, ConfigError> {
        let default = defaults.iter().find(|(f, _)| *f == name).map_or(0, |(_, d)| *d);
        let value = match v.get(name) {
            None | Some(Value::Null) => Some(default),
            // A square size may be given as [side, side].
            Some(Value::Array(sides)) if sides.len() == 2 && sides[0] == sides[1] => sides[0].as_u64(),
            Some(other) => other.as_u64(),
        };
        value.filter(|&n| n > 0).map(|n| n as usize).ok_or(ConfigError::Missing {
            field: name,
            expected: "positive integer (in vision_config; a square size for image_size and patch_size)",
        })
    };
    if v.get("num_channels").and_then(Value::as_u64).is_some_and(|c| c != 3) {
        return Err(unsupported("vision_config.num_channels", "only RGB (3 channels)"));
    }
    let (hidden_size, num_heads) = (field("hidden_size")?, field("num_attention_heads")?);
    let (image_size, patch_size) = (field("image_size")?, field("patch_size")?);
    if hidden_size % num_heads != 0 {
        return Err(unsupported("vision_config.num_attention_heads", "does not divide hidden_size"));
    }
    if image_size % patch_size != 0 {
        return Err(unsupported("vision_config.patch_size", "does not divide image_size"));
    }
    Ok(VisionConfig {
        hidden_size,
        intermediate_size: field("intermediate_size")?,
        num_layers: field("num_hidden_layers")?,
        num_heads,
        image_size,
        patch_size,
        layer_norm_eps: v.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5) as f32,
        activation: activation(v, "hidden_act", "quick_gelu")?,
    })
}

fn activation(config: &Value, field: &str, default: &str) -> Result<Activation, ConfigError> {
    let name = config.get(field).and_then(Value::as_str).unwrap_or(default);
    Activation::from_name(name).ok_or_else(|| {
        unsupported(&format!("{field} \"{name}\""), "supported: gelu, gelu_pytorch_tanh, gelu_new, quick_gelu")
    })
}

fn unsupported(what: &str, detail: &str) -> ConfigError {
    ConfigError::Unsupported { what: what.to_string(), detail: detail.to_string() }
}

struct Norm<B: Backend> {
    weight: B::Vector,
    bias: B::Vector,
}

struct Linear<B: Backend> {
    weight: B::Matrix,
    bias: Option<B::Vector>,
}

struct EncoderLayer<B: Backend> {
    norm1: Norm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
    norm2: Norm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// The vision tower and the projector: pixel values in, the language model's input embeddings out.
pub struct VisionTower<B: Backend> {
    pub config: LlavaConfig,
    /// The patch convolution as a matrix over flattened `[channel, y, x]` patches (it has no bias).
    patch: B::Matrix,
    /// One image's position embeddings, with the class embedding added to row 0: the class row's input to
    /// the patch product is all zeros, so after it every row needs only this added.
    positions: Vec<f32>,
    pre_norm: Norm<B>,
    /// Only the layers up to the deepest one the projector reads.
    layers: Vec<EncoderLayer<B>>,
    projector: [Linear<B>; 2],
    text_hidden: usize,
    /// The checkpoint's image processor (set by `native::load` from the model's directory).
    pub processor: Option<ImageProcessor>,
}

/// Where a checkpoint keeps the tower and projector: transformers 5 writes `model.vision_tower.…`, hub
/// checkpoints from before it `vision_tower.vision_model.…`.
fn prefixes(files: &WeightFiles) -> Result<(&'static str, &'static str), WeightError> {
    let tower =
        ["model.vision_tower.", "model.vision_tower.vision_model.", "vision_tower.vision_model.", "vision_tower."]
            .into_iter()
            .find(|p| files.contains(&format!("{p}embeddings.patch_embedding.weight")))
            .ok_or(WeightError::Missing {
                name: "vision_tower.vision_model.embeddings.patch_embedding.weight".into(),
            })?;
    let projector = ["model.multi_modal_projector.", "multi_modal_projector."]
        .into_iter()
        .find(|p| files.contains(&format!("{p}linear_1.weight")))
        .ok_or(WeightError::Missing { name: "multi_modal_projector.linear_1.weight".into() })?;
    Ok((tower, projector))
}

impl<B: Backend> VisionTower<B> {
    pub fn load(
        backend: &B,
        config: LlavaConfig,
        text_hidden: usize,
        files: &WeightFiles,
    ) -> Result<Self, WeightError> {
        let (tower, projector) = prefixes(files)?;
        let c = &config.vision;
        let (h, p) = (c.hidden_size, c.patch_size);
        let read = |name: &str, shape: &[usize]| files.read(name, shape, false);
        let vector = |name: &str, len: usize| -> Result<B::Vector, WeightError> {
            Ok(backend.vector(&read(name, &[len])?.data.to_f32())?)
        };
        let norm = |name: &str| -> Result<Norm<B>, WeightError> {
            Ok(Norm { weight: vector(&format!("{name}.weight"), h)?, bias: vector(&format!("{name}.bias"), h)? })
        };
        let linear = |name: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear<B>, WeightError> {
            let weight = backend.matrix(files.read(&format!("{name}.weight"), &[rows, cols], true)?)?;
            let bias = if bias { Some(vector(&format!("{name}.bias"), rows)?) } else { None };
            Ok(Linear { weight, bias })
        };
        let patch =
            backend.matrix(files.read(&format!("{tower}embeddings.patch_embedding.weight"), &[h, 3, p, p], true)?)?;
        let class = read(&format!("{tower}embeddings.class_embedding"), &[h])?.data.to_f32();
        let positions_count = config.patches() + 1;
        let mut positions =
            read(&format!("{tower}embeddings.position_embedding.weight"), &[positions_count, h])?.data.to_f32();
        positions.iter_mut().zip(&class).for_each(|(p, c)| *p += c);
        let deepest = config.feature_layers.iter().copied().max().unwrap_or(0);
        let layers = (0..deepest)
            .map(|i| {
                let l = format!("{tower}encoder.layers.{i}");
                Ok(EncoderLayer {
                    norm1: norm(&format!("{l}.layer_norm1"))?,
                    q: linear(&format!("{l}.self_attn.q_proj"), h, h, true)?,
                    k: linear(&format!("{l}.self_attn.k_proj"), h, h, true)?,
                    v: linear(&format!("{l}.self_attn.v_proj"), h, h, true)?,
                    out: linear(&format!("{l}.self_attn.out_proj"), h, h, true)?,
                    norm2: norm(&format!("{l}.layer_norm2"))?,
                    fc1: linear(&format!("{l}.mlp.fc1"), c.intermediate_size, h, true)?,
                    fc2: linear(&format!("{l}.mlp.fc2"), h, c.intermediate_size, true)?,
                })
            })
            .collect::<Result<_, WeightError>>()?;
        let features = h * config.feature_layers.len();
        let bias = config.projector_bias;
        let projector = [
            linear(&format!("{projector}linear_1"), text_hidden, features, bias)?,
            linear(&format!("{projector}linear_2"), text_hidden, text_hidden, bias)?,
        ];
        let pre_norm = norm(&format!("{tower}pre_layrnorm"))?;
        Ok(Self { config, patch, positions, pre_norm, layers, projector, text_hidden, processor: None })
    }

    /// The embeddings of image files (PNG, JPEG, WebP as clients send them): decoded within the default limits,
    /// preprocessed by the checkpoint's image processor, encoded.
    pub fn encode_files(&self, b: &B, files: &[&[u8]]) -> Op<Vec<f32>> {
        let processor = self.processor.as_ref().ok_or_else(|| BackendError("no image processor was loaded".into()))?;
        let side = self.config.vision.image_size;
        let pixels = files
            .iter()
            .map(|file| {
                let image = decode(file, &DecodeLimits::default()).map_err(|e| BackendError(e.to_string()))?;
                let pixels = processor.preprocess(&image);
                if (pixels.height, pixels.width) != (side, side) {
                    return Err(BackendError(format!(
                        "the image processor gives {}x{} pixels but the vision tower reads {side}x{side}: \
                         preprocessor_config.json does not fit config.json",
                        pixels.width, pixels.height
                    )));
                }
                Ok(pixels.data)
            })
            .collect::<Op<Vec<_>>>()?;
        self.encode(b, &pixels.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    /// Multiply-adds of one image through the tower and projector, attention's included.
    pub fn macs_per_image(&self) -> u64 {
        let c = &self.config.vision;
        let (h, seq) = (c.hidden_size, self.config.patches() + 1);
        let patch = self.config.patches() * 3 * c.patch_size * c.patch_size * h;
        let layer = seq * (4 * h * h + 2 * h * c.intermediate_size) + 2 * seq * seq * h;
        let tokens = self.config.tokens_per_image();
        let projector = tokens * (h * self.config.feature_layers.len() + self.text_hidden) * self.text_hidden;
        (patch + self.layers.len() * layer + projector) as u64
    }

    /// Length of one image's pixel values (`3 × side × side`, channel-major).
    pub fn pixels_per_image(&self) -> usize {
        3 * self.config.vision.image_size * self.config.vision.image_size
    }

    /// The embeddings of each image, `tokens_per_image × text hidden` values each, one image after another.
    pub fn encode(&self, b: &B, images: &[&[f32]]) -> Op<Vec<f32>> {
        let c = &self.config.vision;
        if let Some(bad) = images.iter().find(|i| i.len() != self.pixels_per_image()) {
            return Err(BackendError(format!(
                "an image of {} pixel values given to a tower that reads {side}x{side} RGB ({} values)",
                bad.len(),
                self.pixels_per_image(),
                side = c.image_size
            )));
        }
        let (h, seq) = (c.hidden_size, self.config.patches() + 1);
        let mut hidden = b.zeros(0)?;
        b.matmul(&b.vector(&self.patch_rows(images))?, &self.patch, None, &mut hidden)?;
        b.add(&mut hidden, &b.vector(&self.positions.repeat(images.len()))?)?;
        let mut state = b.zeros(0)?;
        b.layer_norm(&hidden, &self.pre_norm.weight, &self.pre_norm.bias, h, c.layer_norm_eps, &mut state)?;
        let mut kept: Vec<(usize, Vec<f32>)> = Vec::new();
        if self.config.feature_layers.contains(&0) {
            kept.push((0, b.to_host(&state)?));
        }
        let (mut x, mut q, mut k, mut v) = (b.zeros(0)?, b.zeros(0)?, b.zeros(0)?, b.zeros(0)?);
        let (mut attn, mut projected, mut mid) = (b.zeros(0)?, b.zeros(0)?, b.zeros(0)?);
        for (i, layer) in self.layers.iter().enumerate() {
            b.layer_norm(&state, &layer.norm1.weight, &layer.norm1.bias, h, c.layer_norm_eps, &mut x)?;
            b.matmuls(
                &x,
                &mut [
                    Product { weight: &layer.q.weight, bias: layer.q.bias.as_ref(), out: &mut q },
                    Product { weight: &layer.k.weight, bias: layer.k.bias.as_ref(), out: &mut k },
                    Product { weight: &layer.v.weight, bias: layer.v.bias.as_ref(), out: &mut v },
                ],
            )?;
            b.bidirectional_attention(&q, &k, &v, seq, c.num_heads, h / c.num_heads, &mut attn)?;
            b.matmul(&attn, &layer.out.weight, layer.out.bias.as_ref(), &mut projected)?;
            b.add(&mut state, &projected)?;
            b.layer_norm(&state, &layer.norm2.weight, &layer.norm2.bias, h, c.layer_norm_eps, &mut x)?;
            b.matmul(&x, &layer.fc1.weight, layer.fc1.bias.as_ref(), &mut mid)?;
            b.activate(&mut mid, c.activation)?;
            b.matmul(&mid, &layer.fc2.weight, layer.fc2.bias.as_ref(), &mut projected)?;
            b.add(&mut state, &projected)?;
            if self.config.feature_layers.contains(&(i + 1)) {
                kept.push((i + 1, b.to_host(&state)?));
            }
        }
        let chosen: Vec<&[f32]> = self
            .config
            .feature_layers
            .iter()
            .map(|layer| kept.iter().find(|(l, _)| l == layer).map(|(_, v)| v.as_slice()).unwrap_or(&[]))
            .collect();
        let skip = usize::from(self.config.select == FeatureSelect::Default);
        let mut features = Vec::with_capacity(images.len() * (seq - skip) * h * chosen.len());
        for image in 0..images.len() {
            for position in skip..seq {
                let row = (image * seq + position) * h;
                for layer in &chosen {
                    features.extend_from_slice(&layer[row..row + h]);
                }
            }
        }
        let [first, second] = &self.projector;
        b.matmul(&b.vector(&features)?, &first.weight, first.bias.as_ref(), &mut mid)?;
        b.activate(&mut mid, self.config.projector_activation)?;
        b.matmul(&mid, &second.weight, second.bias.as_ref(), &mut projected)?;
        let embeddings = b.to_host(&projected)?;
        debug_assert_eq!(embeddings.len(), images.len() * self.config.tokens_per_image() * self.text_hidden);
        Ok(embeddings)
    }

    /// Each image's patches flattened as the convolution's weight is (`[channel, y, x]`), one row per patch,
    /// after an all-zero row where the class token goes.
    fn patch_rows(&self, images: &[&[f32]]) -> Vec<f32> {
        let (side, p) = (self.config.vision.image_size, self.config.vision.patch_size);
        let (grid, width) = (side / p, 3 * p * p);
        let mut rows = vec![0.0; images.len() * (grid * grid + 1) * width];
        for (n, image) in images.iter().enumerate() {
            for patch in 0..grid * grid {
                let (py, px) = (patch / grid, patch % grid);
                let row = &mut rows[((n * (grid * grid + 1)) + 1 + patch) * width..][..width];
                for channel in 0..3 {
                    for y in 0..p {
                        let src = channel * side * side + (py * p + y) * side + px * p;
                        row[(channel * p + y) * p..][..p].copy_from_slice(&image[src..src + p]);
                    }
                }
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llava(extra: Value) -> Value {
        let mut config = json!({
            "model_type": "llava", "image_token_index": 7,
            "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 30, "patch_size": 6},
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    }

    #[test]
    fn a_llava_config_gives_its_text_model_and_vision_part_with_transformers_defaults() {
        let config = ModelConfig::parse(&llava(json!({}))).unwrap();
        assert_eq!((config.hidden_size, config.model_type.as_str()), (64, "llama"));
        let mm = config.multimodal.unwrap();
        assert_eq!(mm.image_token_id, 7);
        assert_eq!(mm.feature_layers, vec![2], "-2 is the output of the second-to-last layer");
        assert_eq!((mm.select, mm.tokens_per_image()), (FeatureSelect::Default, 25));
        assert_eq!((mm.vision.activation, mm.projector_activation), (Activation::QuickGelu, Activation::Gelu));
        // A hub llava-1.5 config: text and vision configs hold only what differs from the defaults.
        let hub = json!({"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
                         "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "vocab_size": 32064},
                         "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                           "model_type": "clip_vision_model", "num_attention_heads": 16,
                                           "num_hidden_layers": 24, "patch_size": 14}});
        let config = ModelConfig::parse(&hub).unwrap();
        assert_eq!((config.hidden_size, config.num_layers, config.vocab_size), (4096, 32, 32064));
        let mm = config.multimodal.unwrap();
        assert_eq!((mm.tokens_per_image(), mm.feature_layers.clone()), (576, vec![23]));
        let full = ModelConfig::parse(&llava(json!({"vision_feature_layer": [-3, 0, 3],
                                                    "vision_feature_select_strategy": "full"})))
        .unwrap();
        let mm = full.multimodal.unwrap();
        assert_eq!((mm.feature_layers.clone(), mm.tokens_per_image()), (vec![1, 0, 3], 26));
    }

    #[test]
    fn what_it_cannot_run_is_refused_by_name() {
        for (extra, named) in [
            (json!({"vision_feature_layer": 4}), "vision_feature_layer"),
            (json!({"vision_feature_layer": "last"}), "vision_feature_layer"),
            (json!({"vision_feature_select_strategy": "cls"}), "cls"),
            (json!({"projector_hidden_act": "relu"}), "projector_hidden_act"),
            (json!({"vision_config": {"model_type": "siglip_vision_model"}}), "siglip_vision_model"),
            (json!({"vision_config": {"patch_size": 7, "image_size": 30}}), "patch_size"),
            (json!({"vision_config": {"num_channels": 1}}), "num_channels"),
            (json!({"text_config": {"model_type": "gpt2"}}), "gpt2"),
        ] {
            let error = ModelConfig::parse(&llava(extra.clone())).unwrap_err().to_string();
            assert!(error.contains(named), "{extra}: {error}");
        }
    }
}
