//! The model card: the few facts about a model that serving needs, resolved once from the HF config files.
use super::{ModelError, Tokenizer};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    /// The name clients put in `"model"`, and the one answers carry.
    pub name: String,
    /// Other names it is served under (vLLM's `--served-model-name a b`: every name after the first).
    pub aliases: Vec<String>,
    /// Prompt plus generated tokens may not exceed this.
    pub context_length: u32,
    pub vocab_size: u32,
    /// Sampling one of these ends a request (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// How images enter its prompts, for a model that reads them.
    pub image: Option<ImageTokens>,
}

/// A vision model's placeholder: the chat template writes `token_id` once per image, and the prompt holds it
/// `per_image` times (one position per embedding), as the checkpoint's processor expands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokens {
    pub token_id: u32,
    pub per_image: u32,
}

/// What a LLaVA-style config says about its images; `None` for a text model, or one whose vision part the
/// built-in engine cannot read (which then takes no images, with a warning).
fn image_tokens(config: Option<&Value>) -> Option<ImageTokens> {
    let config = config.filter(|c| c.get("model_type").and_then(Value::as_str) == Some("llava"))?;
    match crate::core::engine::native::config::ModelConfig::parse(config) {
        Ok(parsed) => parsed
            .multimodal
            .map(|m| ImageTokens { token_id: m.image_token_id, per_image: m.tokens_per_image() as u32 }),
        Err(e) => {
            tracing::warn!("this model will take no images: {e}");
            None
        }
    }
}

impl ModelCard {
    /// Whether clients may address it as `name`.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|alias| alias == name)
    }

    /// Reads `config.json`, `generation_config.json` and `tokenizer_config.json` (any may be absent) and
    /// the tokenizer itself. Precedence follows transformers: generation_config's EOS over config's.
    pub fn resolve(
        name: String,
        config: Option<&Value>,
        generation_config: Option<&Value>,
        tokenizer_config: Option<&Value>,
        tokenizer: &Tokenizer,
    ) -> Result<Self, ModelError> {
        // A multimodal checkpoint keeps its language model's facts in `text_config`.
        let text_config = config.and_then(|c| c.get("text_config")).filter(|t| t.is_object());
        let field = |name: &str| config.and_then(|c| c.get(name)).or_else(|| text_config.and_then(|t| t.get(name)));
        let context_length = field("max_position_embeddings")
            .and_then(Value::as_u64)
            .or_else(|| tokenizer_config.and_then(|t| t.get("model_max_length")).and_then(Value::as_u64))
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                ModelError::Config(
                    "config.json has no max_position_embeddings (and tokenizer_config.json no model_max_length); \
                     cannot tell the context length"
                        .to_string(),
                )
            })?;
        let vocab_size = field("vocab_size")
            .and_then(Value::as_u64)
            .map(|v| v as u32)
            .unwrap_or_else(|| tokenizer.vocab_size())
            .max(tokenizer.vocab_size());
        let mut eos_token_ids = [generation_config, config, text_config]
            .into_iter()
            .flatten()
            .find_map(|c| c.get("eos_token_id").map(token_ids))
            .unwrap_or_default();
        if eos_token_ids.is_empty() {
            let eos = tokenizer_config.and_then(|t| t.get("eos_token")).and_then(special_token_text);
            eos_token_ids.extend(eos.and_then(|text| tokenizer.token_to_id(&text)));
        }
        let context_length = context_length.min(u32::MAX as u64) as u32;
        let image = image_tokens(config);
        Ok(Self { name, aliases: Vec::new(), context_length, vocab_size, eos_token_ids, image })
    }
}

fn token_ids(value: &Value) -> Vec<u32> {
    match value {
        Value::Number(n) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Value::Array(ids) => ids.iter().filter_map(Value::as_u64).map(|id| id as u32).collect(),
        _ => Vec::new(),
    }
}

/// A special token in tokenizer_config.json is either a string or an AddedToken object with `content`.
pub(crate) fn special_token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{Model, ModelSource};
    use serde_json::json;

    #[test]
    fn builtin_card_reads_eos_from_generation_config() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let im_end = model.tokenizer.token_to_id("<|im_end|>").unwrap();
        let eot = model.tokenizer.token_to_id("<|endoftext|>").unwrap();
        assert_eq!(model.card.eos_token_ids, vec![im_end, eot]);
        assert_eq!(model.card.context_length, 4096);
    }

    #[test]
    fn eos_falls_back_to_the_tokenizer_config_token() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let card = ModelCard::resolve(
            "m".into(),
            Some(&json!({"max_position_embeddings": 128})),
            None,
            Some(&json!({"eos_token": {"content": "<|im_end|>"}})),
            &model.tokenizer,
        )
        .unwrap();
        assert_eq!(card.eos_token_ids, vec![model.tokenizer.token_to_id("<|im_end|>").unwrap()]);
    }

    #[test]
    fn missing_context_length_names_the_field() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let err = ModelCard::resolve("m".into(), Some(&json!({})), None, None, &model.tokenizer).unwrap_err();
        assert!(err.to_string().contains("max_position_embeddings"));
    }

    #[test]
    fn a_multimodal_config_is_read_through_its_text_config() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let config = json!({"model_type": "llava",
                            "text_config": {"max_position_embeddings": 512, "vocab_size": 5000, "eos_token_id": 7}});
        let card = ModelCard::resolve("m".into(), Some(&config), None, None, &model.tokenizer).unwrap();
        assert_eq!((card.context_length, card.vocab_size, card.eos_token_ids.clone()), (512, 5000, vec![7]));
        assert_eq!(card.image, Some(ImageTokens { token_id: 32000, per_image: 576 }), "llava-1.5's defaults");
        let text_only =
            ModelCard::resolve("m".into(), Some(&json!({"max_position_embeddings": 8})), None, None, &model.tokenizer);
        assert_eq!(text_only.unwrap().image, None);
    }
}
