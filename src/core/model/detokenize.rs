//! Token ids back to text, one step at a time, and stop strings over that text.
//!
//! `IncrementalDecoder` decodes a window that starts a few tokens back, so tokenizers that encode a leading
//! space into the token (SentencePiece's `▁`) keep it, and holds text back while it ends in U+FFFD: a
//! multi-byte character split across tokens is emitted whole once its last byte arrives, never broken.
//!
//! `StopStringMatcher` holds back any tail that could still become a stop string, so text a client has
//! already seen never has to be taken back.
use super::Tokenizer;

/// How many prompt tokens give the first generated token its context.
const CONTEXT_TOKENS: usize = 5;

pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let tokens = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let read_offset = tokens.len();
        Self { tokens, prefix_offset: 0, read_offset, skip_special_tokens }
    }

    /// Adds a token; returns the text it completes (possibly empty while a character is incomplete).
    pub fn step(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let prefix = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset], self.skip_special_tokens);
        let full = tokenizer.decode(&self.tokens[self.prefix_offset..], self.skip_special_tokens);
        if full.ends_with('\u{FFFD}') || full.len() <= prefix.len() {
            return String::new();
        }
        let delta = new_suffix(&prefix, &full);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        delta
    }

    /// Text still held back at the end of generation (an incomplete character shows as U+FFFD).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        if self.read_offset >= self.tokens.len() {
            return String::new();
        }
        let prefix = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset], self.skip_special_tokens);
        let full = tokenizer.decode(&self.tokens[self.prefix_offset..], self.skip_special_tokens);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        new_suffix(&prefix, &full)
    }
}

/// The part of `full` after `prefix`; when the decoder rewrote the shared part, the part after the common
/// character prefix.
fn new_suffix(prefix: &str, full: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common: usize = prefix.chars().zip(full.chars()).take_while(|(a, b)| a == b).map(|(c, _)| c.len_utf8()).sum();
    full[common..].to_string()
}

/// Finds the first stop string in streamed text.
pub struct StopStringMatcher {
    stops: Vec<String>,
    include_stop: bool,
    pending: String,
}

/// What a push releases.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string was found: `text` ends before it (or with it, when it is included) and nothing follows.
    pub stopped: bool,
}

impl StopStringMatcher {
    pub fn new(stops: Vec<String>, include_stop: bool) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stops, include_stop, pending: String::new() }
    }

    pub fn push(&mut self, text: &str) -> Released {
        if self.stops.is_empty() {
            return Released { text: text.to_string(), stopped: false };
        }
        self.pending.push_str(text);
        let earliest = self.stops.iter().filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s.len()))).min();
        if let Some((at, len)) = earliest {
            let end = if self.include_stop { at + len } else { at };
            let text = self.pending[..end].to_string();
            self.pending.clear();
            return Released { text, stopped: true };
        }
        let keep = self.longest_stop_prefix_suffix();
        let text = self.pending[..self.pending.len() - keep].to_string();
        self.pending.drain(..self.pending.len() - keep);
        Released { text, stopped: false }
    }

    /// Releases what was held back, at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest tail of `pending` that is the start of some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.pending.char_indices() {
            let tail = &self.pending[start..];
            if tail.len() <= best {
                break;
            }
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                best = tail.len();
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{Model, ModelSource};

    fn decode_stepwise(model: &Model, ids: &[u32]) -> Vec<String> {
        let mut decoder = IncrementalDecoder::new(&[], true);
        let mut pieces: Vec<String> = ids.iter().map(|&id| decoder.step(&model.tokenizer, id)).collect();
        pieces.push(decoder.flush(&model.tokenizer));
        pieces
    }

    #[test]
    fn multibyte_characters_split_across_tokens_are_never_broken() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let text = "漢字テスト 😀 日本語 Grüße";
        let ids = model.tokenizer.encode(text, false).unwrap();
        let split_somewhere = ids.iter().any(|&id| model.tokenizer.decode(&[id], false).contains('\u{FFFD}'));
        assert!(split_somewhere, "the fixture should split a character between tokens");
        let pieces = decode_stepwise(&model, &ids);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn first_token_keeps_leading_space_with_prompt_context() {
        let model = Model::load(&ModelSource::Builtin, None).unwrap();
        let ids = model.tokenizer.encode("Hello world", false).unwrap();
        let (prompt, generated) = ids.split_at(1);
        let mut decoder = IncrementalDecoder::new(prompt, true);
        let text: String = generated.iter().map(|&id| decoder.step(&model.tokenizer, id)).collect();
        assert_eq!(text, " world");
    }

    #[test]
    fn stop_string_across_pushes_is_cut_and_nothing_after_it_leaks() {
        let mut m = StopStringMatcher::new(vec!["STOP".into()], false);
        assert_eq!(m.push("abc S"), Released { text: "abc ".into(), stopped: false });
        assert_eq!(m.push("TO"), Released { text: "".into(), stopped: false });
        assert_eq!(m.push("Pxyz"), Released { text: "".into(), stopped: true });
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopStringMatcher::new(vec!["STOP".into()], false);
        assert_eq!(m.push("ST").text, "");
        assert_eq!(m.push("ART").text, "START");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn earliest_stop_wins_and_can_be_included() {
        let mut m = StopStringMatcher::new(vec!["world".into(), "lo".into()], true);
        assert_eq!(m.push("hello world"), Released { text: "hello".into(), stopped: true });
    }

    #[test]
    fn held_back_text_is_flushed_at_the_end() {
        let mut m = StopStringMatcher::new(vec!["<end>".into()], false);
        assert_eq!(m.push("done <e").text, "done ");
        assert_eq!(m.flush(), "<e");
    }
}
