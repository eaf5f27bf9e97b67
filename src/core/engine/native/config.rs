//! The architecture of a checkpoint, read from its `config.json` (transformers 4 and 5 spellings both).
//!
//! One dense decoder covers Llama (incl. Llama-3 rope scaling), Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k
//! norm). Anything that would silently produce wrong output (MoE, sliding windows, other rope scalings, …)
//! is refused with the field that says so.
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json: `{field}` is missing or not a {expected}")]
    Missing { field: &'static str, expected: &'static str },
    #[error(
        "config.json: {what} is not supported by the built-in engine ({detail}); serve this model with an external engine"
    )]
    Unsupported { what: String, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// The vision part of a LLaVA-style checkpoint (whose text model is the rest).
    pub multimodal: Option<super::vision::LlavaConfig>,
}

impl ModelConfig {
    pub fn parse(config: &Value) -> Result<Self, ConfigError> {
        let model_type = text(config, "model_type")?;
        if model_type == "llava" {
            return super::vision::parse_llava(config);
        }
        let (qkv_bias, qk_norm) = match model_type.as_str() {
            "llama" | "mistral" => (flag(config, "attention_bias", false), false),
            "qwen2" => (true, false),
            "qwen3" => (flag(config, "attention_bias", false), true),
            other => {
                return Err(ConfigError::Unsupported {
                    what: format!("model_type \"{other}\""),
                    detail: "supported: llama, mistral, qwen2, qwen3, and llava over one of them".into(),
                });
            }
        };
        refuse_present(config, &["num_experts", "num_local_experts", "n_routed_experts"], "mixture of experts")?;
        if flag(config, "mlp_bias", false) {
            return Err(unsupported("mlp_bias = true", "MLP biases"));
        }
        let sliding = match model_type.as_str() {
            // Qwen configs carry a window size but only use it when `use_sliding_window` is set.
            "qwen2" | "qwen3" => flag(config, "use_sliding_window", false),
            _ => config.get("sliding_window").is_some_and(|v| !v.is_null()),
        };
        let layer_types = config.get("layer_types").and_then(Value::as_array);
        if sliding || layer_types.is_some_and(|types| types.iter().any(|t| t.as_str() != Some("full_attention"))) {
            return Err(unsupported("sliding_window", "sliding-window attention"));
        }
        if let Some(act) = config.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(unsupported(&format!("hidden_act \"{act}\""), "only silu"));
        }

        let hidden_size = count(config, "hidden_size")?;
        let num_heads = count(config, "num_attention_heads")?;
        let num_kv_heads = optional_count(config, "num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(unsupported(
                "num_key_value_heads",
                &format!("{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads"),
            ));
        }
        let head_dim = optional_count(config, "head_dim").unwrap_or(hidden_size / num_heads.max(1));
        // transformers 5 moved rope_theta and rope_scaling into `rope_parameters`.
        let rope = config.get("rope_parameters").or_else(|| config.get("rope_scaling")).filter(|v| !v.is_null());
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| config.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0) as f32;
        let rope_scaling = match rope {
            None => RopeScaling::None,
            Some(r) => parse_rope_scaling(r)?,
        };
        Ok(Self {
            hidden_size,
            intermediate_size: count(config, "intermediate_size")?,
            num_layers: count(config, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: count(config, "vocab_size")?,
            rms_norm_eps: config.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: optional_count(config, "max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: flag(config, "tie_word_embeddings", false),
            qkv_bias,
            qk_norm,
            model_type,
            multimodal: None,
        })
    }
}

fn parse_rope_scaling(rope: &Value) -> Result<RopeScaling, ConfigError> {
    let kind = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
    match kind {
        "default" => Ok(RopeScaling::None),
        "llama3" => {
            let number = |field: &'static str| {
                rope.get(field)
                    .and_then(Value::as_f64)
                    .map(|v| v as f32)
                    .ok_or(ConfigError::Missing { field, expected: "number (in the llama3 rope scaling)" })
            };
            Ok(RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position: number("original_max_position_embeddings")?,
            })
        }
        other => Err(unsupported(&format!("rope type \"{other}\""), "supported: default, llama3")),
    }
}

fn unsupported(what: &str, detail: &str) -> ConfigError {
    ConfigError::Unsupported { what: what.to_string(), detail: detail.to_string() }
}

fn refuse_present(config: &Value, fields: &[&str], detail: &str) -> Result<(), ConfigError> {
    match fields.iter().find(|f| config.get(**f).is_some_and(|v| !v.is_null() && v.as_u64() != Some(0))) {
        Some(field) => Err(unsupported(field, detail)),
        None => Ok(()),
    }
}

fn text(config: &Value, field: &'static str) -> Result<String, ConfigError> {
    config
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or(ConfigError::Missing { field, expected: "string" })
}

fn count(config: &Value, field: &'static str) -> Result<usize, ConfigError> {
    optional_count(config, field).ok_or(ConfigError::Missing { field, expected: "positive integer" })
}

fn optional_count(config: &Value, field: &str) -> Option<usize> {
    config.get(field).and_then(Value::as_u64).filter(|&n| n > 0).map(|n| n as usize)
}

fn flag(config: &Value, field: &str, default: bool) -> bool {
    config.get(field).and_then(Value::as_bool).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rope_theta": 500000.0})
    }

    #[test]
    fn transformers_4_and_5_spellings_agree() {
        let mut v4 = llama();
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = llama();
        v5.as_object_mut().unwrap().remove("rope_theta");
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192});
        let (a, b) = (ModelConfig::parse(&v4).unwrap(), ModelConfig::parse(&v5).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.head_dim, 16);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
    }

    #[test]
    fn unsupported_features_name_the_field() {
        for (field, value) in [
            ("num_local_experts", json!(8)),
            ("sliding_window", json!(4096)),
            ("model_type", json!("gpt2")),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0})),
        ] {
            let mut config = llama();
            config[field] = value;
            let err = ModelConfig::parse(&config).err().unwrap().to_string();
            let named = if field == "rope_scaling" {
                "yarn"
            } else if field == "model_type" {
                "gpt2"
            } else {
                field
            };
            assert!(err.contains(named), "{field}: {err}");
        }
        let mut missing = llama();
        missing.as_object_mut().unwrap().remove("hidden_size");
        assert!(ModelConfig::parse(&missing).err().unwrap().to_string().contains("hidden_size"));
    }

    #[test]
    fn qwen_flags_follow_the_architecture() {
        let mut qwen2 = llama();
        qwen2["model_type"] = json!("qwen2");
        qwen2["sliding_window"] = json!(4096);
        qwen2["use_sliding_window"] = json!(false);
        let config = ModelConfig::parse(&qwen2).unwrap();
        assert!(config.qkv_bias && !config.qk_norm);
        let mut qwen3 = llama();
        qwen3["model_type"] = json!("qwen3");
        qwen3["head_dim"] = json!(32);
        let config = ModelConfig::parse(&qwen3).unwrap();
        assert!(!config.qkv_bias && config.qk_norm);
        assert_eq!(config.head_dim, 32);
    }
}
