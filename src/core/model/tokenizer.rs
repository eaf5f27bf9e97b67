//! The HF `tokenizers` tokenizer of a model, behind the few calls serving makes.
use super::ModelError;
use std::collections::HashSet;

pub struct Tokenizer {
    /// Shared with structured output's vocabulary (`grammar`), which tokenizes forced text with it.
    inner: std::sync::Arc<tokenizers::Tokenizer>,
    special_ids: HashSet<u32>,
    /// The most characters any one token stands for (its vocabulary entry, which is never shorter than the
    /// text it matches: byte-level entries spell each byte as one character, SentencePiece's `▁` stands for
    /// one space, byte fallbacks `<0x41>` for at most one character).
    max_token_chars: usize,
}

impl Tokenizer {
    pub fn from_json(json: &str, origin: &str) -> Result<Self, ModelError> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e: tokenizers::Error| ModelError::Tokenizer {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        let special_ids =
            inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        let max_token_chars = inner.get_vocab(true).keys().map(|t| t.chars().count()).max().unwrap_or(1).max(1);
        Ok(Self { inner: std::sync::Arc::new(inner), special_ids, max_token_chars })
    }

    /// Fewer tokens than `text` can possibly encode to, known without encoding it: what lets a prompt far too
    /// long for the context be refused at once. Halved, for normalizers that compose characters.
    pub fn fewest_tokens(&self, text: &str) -> usize {
        text.chars().count() / (2 * self.max_token_chars)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        let encoding =
            self.inner.encode_fast(text, add_special_tokens).map_err(|e| ModelError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids; bytes that are not valid UTF-8 (a character cut between tokens) become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.inner.decode(ids, skip_special_tokens).unwrap_or_default()
    }

    /// One token's text, as logprobs show it.
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id], false)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The HF tokenizer itself, shared.
    pub fn shared(&self) -> std::sync::Arc<tokenizers::Tokenizer> {
        self.inner.clone()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> u32 {
        self.inner.get_vocab_size(true) as u32
    }

    /// Ids that decode on their own to whole, printable text: what a simulated engine samples from so
    /// its output reads like words rather than stray bytes.
    pub fn printable_ids(&self) -> Vec<u32> {
        (0..self.vocab_size())
            .filter(|&id| !self.is_special(id))
            .filter(|&id| {
                let text = self.decode(&[id], false);
                !text.is_empty() && !text.contains('\u{FFFD}') && text.chars().all(|c| !c.is_control())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::core::model::{Model, ModelSource};

    #[test]
    fn round_trips_text_including_multibyte_characters() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let text = "Hello! Grüße aus München, 日本語 🚀";
        let ids = model.tokenizer.encode(text, false).unwrap();
        assert_eq!(model.tokenizer.decode(&ids, true), text);
    }

    #[test]
    fn special_tokens_are_known_and_skippable() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let ids = model.tokenizer.encode("<|im_start|>user", false).unwrap();
        assert!(model.tokenizer.is_special(ids[0]));
        assert_eq!(model.tokenizer.decode(&ids, true), "user");
        assert!(model.tokenizer.printable_ids().len() > 500);
    }

    #[test]
    fn fewest_tokens_is_a_lower_bound() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let tokenizer = &model.tokenizer;
        for text in [
            "",
            "a",
            "Hello! Grüße aus München, 日本語 🚀",
            &"the ".repeat(5000),
            &"x".repeat(20_000),
            &"日本".repeat(3000),
        ] {
            let tokens = tokenizer.encode(text, false).unwrap().len();
            let bound = tokenizer.fewest_tokens(text);
            assert!(bound <= tokens, "{bound} > {tokens} for a text of {} bytes", text.len());
        }
        assert!(tokenizer.fewest_tokens(&"x".repeat(1_000_000)) > 4096);
    }
}
