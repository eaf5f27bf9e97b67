//! Every token's bytes, read from `tokenizer.json`, as llguidance's token trie needs them.
//!
//! Written here rather than taken from llguidance's own reader, which panics on a malformed entry (the
//! file may come from another process), or from `toktrie_hf_tokenizers`, which pins an older `tokenizers`.
use super::GrammarError;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// How the vocabulary's strings spell bytes.
enum Spelling {
    /// GPT-2's byte-level BPE: each byte is one printable character.
    ByteLevel(HashMap<char, u8>),
    /// SentencePiece (with byte fallback or without): `<0x0A>` is a byte, this character is a space, the
    /// rest is UTF-8.
    ByteFallback { space: char },
}

pub fn token_env(
    tokenizer_json: &str,
    tokenizer: Arc<tokenizers::Tokenizer>,
    eos_ids: &[u32],
) -> Result<TokEnv, GrammarError> {
    let bad = |why: String| GrammarError::Vocabulary(why);
    let json: Value = serde_json::from_str(tokenizer_json).map_err(|e| bad(format!("tokenizer.json: {e}")))?;
    let spelling = spelling(&json["decoder"]).ok_or_else(|| {
        bad(format!(
            "its decoder ({}) is neither byte-level nor SentencePiece",
            json["decoder"]["type"].as_str().unwrap_or("none")
        ))
    })?;
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    let mut put = |id: u64, token: Vec<u8>| -> Result<(), GrammarError> {
        let id = usize::try_from(id).ok().filter(|&id| id < 1 << 24).ok_or_else(|| bad(format!("token id {id}")))?;
        if bytes.len() <= id {
            bytes.resize(id + 1, Vec::new());
        }
        bytes[id] = token;
        Ok(())
    };
    let vocab = json["model"]["vocab"].as_object().ok_or_else(|| bad("model.vocab is not an object".into()))?;
    for (text, id) in vocab {
        let id = id.as_u64().ok_or_else(|| bad(format!("the id of {text:?} is not a number")))?;
        put(id, spell(&spelling, text).ok_or_else(|| bad(format!("cannot spell token {text:?} as bytes")))?)?;
    }
    // Added tokens are matched whole, never by their bytes: special ones are marked so no text spells them.
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(bad(format!("an added token lacks its id or content: {added}")));
        };
        let mut token = content.as_bytes().to_vec();
        if added["special"].as_bool().unwrap_or(false) {
            token.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
        }
        put(id, token)?;
    }
    // Ids the file leaves out are no text: special, so no grammar ever allows them.
    for (id, token) in bytes.iter_mut().enumerate().filter(|(_, t)| t.is_empty()) {
        token.push(TokTrie::SPECIAL_TOKEN_MARKER);
        token.extend_from_slice(format!("<|unused_{id}|>").as_bytes());
    }
    let size = u32::try_from(bytes.len()).map_err(|_| bad("too many tokens".into()))?;
    let eos = eos_ids.first().copied().filter(|&eos| eos < size).unwrap_or(size.saturating_sub(1));
    let trie = TokTrie::from(&TokRxInfo::new(size, eos), &bytes);
    Ok(Arc::new(Env { trie, tokenizer }))
}

fn spelling(decoder: &Value) -> Option<Spelling> {
    match decoder["type"].as_str()? {
        "ByteLevel" => Some(Spelling::ByteLevel(byte_level_chars())),
        // SentencePiece written back by its space character alone (Mistral's newer tokenizers).
        "Metaspace" => {
            let space = decoder["replacement"].as_str().and_then(|r| r.chars().next()).unwrap_or('▁');
            Some(Spelling::ByteFallback { space })
        }
        "Sequence" => {
            let steps = decoder["decoders"].as_array()?;
            steps.iter().any(|d| d["type"] == "ByteFallback").then(|| {
                let space = steps
                    .iter()
                    .filter(|d| d["type"] == "Replace" && d["content"] == " ")
                    .find_map(|d| {
                        let mut chars = d["pattern"]["String"].as_str()?.chars();
                        chars.next().filter(|_| chars.next().is_none())
                    })
                    .unwrap_or('▁');
                Spelling::ByteFallback { space }
            })
        }
        _ => None,
    }
}

/// GPT-2's table: printable Latin-1 bytes stand for themselves, the others for 256, 257, … in byte order.
fn byte_level_chars() -> HashMap<char, u8> {
    let mut next = 256u32;
    (0..=255u8)
        .map(|byte| {
            let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable {
                char::from(byte)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, byte)
        })
        .collect()
}

fn spell(spelling: &Spelling, text: &str) -> Option<Vec<u8>> {
    match spelling {
        Spelling::ByteLevel(chars) => text.chars().map(|c| chars.get(&c).copied()).collect(),
        Spelling::ByteFallback { space } => {
            if let Some(hex) = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
                && hex.len() == 2
            {
                return u8::from_str_radix(hex, 16).ok().map(|byte| vec![byte]);
            }
            Some(text.replace(*space, " ").into_bytes())
        }
    }
}

/// The trie, and the model's own tokenizer for the text llguidance tokenizes (forced strings).
struct Env {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        let text = String::from_utf8_lossy(s);
        match self.tokenizer.encode_fast(text.as_ref(), false) {
            Ok(encoding) => encoding.get_ids().to_vec(),
            // Never fails for text; if it did, the trie's greedy tokenization is still a valid spelling.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_give_the_bytes_the_text_decodes_to() {
        let gpt2 = Spelling::ByteLevel(byte_level_chars());
        assert_eq!(spell(&gpt2, "Ġhello").unwrap(), b" hello");
        assert_eq!(spell(&gpt2, "Ċ").unwrap(), b"\n");
        // "é" is two bytes, each its own character in the table.
        assert_eq!(spell(&gpt2, "Ã©").unwrap(), "é".as_bytes());
        assert_eq!(spell(&gpt2, "\u{4e2d}"), None);
        let sentencepiece = Spelling::ByteFallback { space: '▁' };
        assert_eq!(spell(&sentencepiece, "▁hi").unwrap(), b" hi");
        assert_eq!(spell(&sentencepiece, "<0x0A>").unwrap(), b"\n");
        assert_eq!(spell(&sentencepiece, "<0xZZ>"), None);
        assert_eq!(spell(&sentencepiece, "<0x0A0>").unwrap(), b"<0x0A0>");
    }

    #[test]
    fn the_decoder_says_how_tokens_are_spelled() {
        use serde_json::json;
        assert!(matches!(spelling(&json!({"type": "ByteLevel"})), Some(Spelling::ByteLevel(_))));
        let llama2 = json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]});
        assert!(matches!(spelling(&llama2), Some(Spelling::ByteFallback { space: '▁' })));
        let mistral = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"});
        assert!(matches!(spelling(&mistral), Some(Spelling::ByteFallback { space: '▁' })));
        assert!(spelling(&json!({"type": "WordPiece"})).is_none());
        assert!(spelling(&json!({"type": "Sequence", "decoders": [{"type": "Fuse"}]})).is_none());
    }
}
