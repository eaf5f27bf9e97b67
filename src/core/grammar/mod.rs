//! Structured output: a request's `Constraint` compiled against the model's vocabulary (llguidance), and the
//! per-sequence `Guide` that says which tokens may come next and when the output is whole.
//!
//! One `Grammars` per model, built on first use (it indexes every token's bytes): the frontend compiles a
//! request's constraint there to refuse a bad one with a 400 before any work, and the engines of the same
//! process find it compiled in the cache. Masks are computed by the guide, off the sampler's path where the
//! executor can overlap them with its forward pass (`Guide::prepare`).
mod vocab;

use crate::core::protocol::{Constraint, FinishReason, PreprocessedRequest};
use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::toktrie::SimpleVob;
use llguidance::{Matcher, ParserFactory, TokenParser};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// Distinct constraints kept compiled (each a lexer and grammar, from kilobytes to a few MB: llguidance's
/// own limits bound one).
const CACHED_GRAMMARS: usize = 64;

/// A compiled structured-output constraint could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    #[error("structured output needs the token bytes of this tokenizer, which cannot be read: {0}")]
    Vocabulary(String),
    #[error("{0}")]
    Invalid(String),
    #[error("this engine cannot constrain its output (structured output is not available on it)")]
    Unavailable,
}

/// A model's `Grammars`, built on first use and shared by every clone (the frontend's and each engine's).
#[derive(Clone)]
pub struct Compiler {
    tokenizer_json: Arc<str>,
    tokenizer: Arc<tokenizers::Tokenizer>,
    eos_ids: Arc<[u32]>,
    built: Arc<std::sync::OnceLock<Result<Arc<Grammars>, GrammarError>>>,
}

impl Compiler {
    /// From the model's `tokenizer.json` text and the tokenizer made of it.
    pub fn new(tokenizer_json: &str, tokenizer: Arc<tokenizers::Tokenizer>, eos_ids: &[u32]) -> Self {
        Self { tokenizer_json: tokenizer_json.into(), tokenizer, eos_ids: eos_ids.into(), built: Arc::default() }
    }

    pub fn grammars(&self) -> Result<Arc<Grammars>, GrammarError> {
        self.built
            .get_or_init(|| Grammars::new(&self.tokenizer_json, self.tokenizer.clone(), &self.eos_ids).map(Arc::new))
            .clone()
    }

    /// A guide for a request's constraint (see `Grammars::guide`); `None` when it has none.
    pub fn guide_for(&self, request: &PreprocessedRequest) -> Option<Result<Guide, GrammarError>> {
        let constraint = request.constraint.as_ref()?;
        let generated = &request.token_ids[request.token_ids.len().saturating_sub(request.generated as usize)..];
        Some(self.grammars().and_then(|grammars| grammars.guide(constraint, generated)))
    }
}

/// A model's vocabulary as llguidance sees it, and the constraints compiled against it.
pub struct Grammars {
    factory: ParserFactory,
    /// Keyed by the constraint's 128-bit hash: a schema may be megabytes, which the cache need not keep.
    compiled: Mutex<lru::LruCache<u128, TokenParser>>,
    eos_ids: Arc<[u32]>,
}

impl Grammars {
    /// From the model's `tokenizer.json` text and its tokenizer; `eos_ids` end a sequence (the first is the one
    /// grammars name).
    pub fn new(
        tokenizer_json: &str,
        tokenizer: Arc<tokenizers::Tokenizer>,
        eos_ids: &[u32],
    ) -> Result<Self, GrammarError> {
        let env = vocab::token_env(tokenizer_json, tokenizer, eos_ids)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        // Warnings and errors come back as values, named in the client's 400; nothing is printed.
        factory.quiet();
        let capacity = NonZeroUsize::new(CACHED_GRAMMARS).unwrap_or(NonZeroUsize::MIN);
        Ok(Self { factory, compiled: Mutex::new(lru::LruCache::new(capacity)), eos_ids: eos_ids.into() })
    }

    /// A guide for one sequence under `constraint`, having already read `generated` (the tokens this
    /// request produced elsewhere: its prefill on a prefill worker, a worker lost mid-stream).
    pub fn guide(&self, constraint: &Constraint, generated: &[u32]) -> Result<Guide, GrammarError> {
        let parser = self.compile(constraint)?;
        let mut matcher = Matcher::new(Ok(parser));
        for &token in generated.iter().filter(|t| !self.eos_ids.contains(t)) {
            matcher.consume_token(token).map_err(|e| {
                GrammarError::Invalid(format!("the tokens generated so far do not match the constraint: {e}"))
            })?;
        }
        Ok(Guide { matcher, mask: None, eos_ids: self.eos_ids.clone() })
    }

    /// Compiles `constraint` (or finds it compiled): what the frontend calls to refuse a bad one.
    pub fn compile(&self, constraint: &Constraint) -> Result<TokenParser, GrammarError> {
        let key = {
            let mut hasher = xxhash_rust::xxh3::Xxh3::default();
            std::hash::Hash::hash(constraint, &mut hasher);
            hasher.digest128()
        };
        if let Some(parser) = self.compiled.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(parser.clone());
        }
        let grammar = top_level(constraint)?;
        let parser = self.factory.create_parser(grammar).map_err(|e| GrammarError::Invalid(e.to_string()))?;
        self.compiled.lock().unwrap_or_else(|p| p.into_inner()).put(key, parser.clone());
        Ok(parser)
    }
}

/// The llguidance grammar of a constraint. JSON is written compactly (`,` and `:` with no whitespace
/// around them): free whitespace lets a model pad forever between tokens, which the whitespace-free form
/// cannot, and any JSON parser reads both.
fn top_level(constraint: &Constraint) -> Result<TopLevelGrammar, GrammarError> {
    Ok(match constraint {
        Constraint::JsonSchema(text) => {
            let mut schema: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| GrammarError::Invalid(format!("the JSON schema is not valid JSON: {e}")))?;
            let Some(object) = schema.as_object_mut() else {
                return Err(GrammarError::Invalid("the JSON schema must be an object".into()));
            };
            object.entry("x-guidance").or_insert_with(
                || serde_json::json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"}),
            );
            TopLevelGrammar::from_json_schema(schema)
        }
        Constraint::Regex(pattern) => TopLevelGrammar::from_regex(pattern),
        Constraint::Choice(choices) => {
            if choices.is_empty() {
                return Err(GrammarError::Invalid("the choice list is empty: give at least one string".into()));
            }
            // Lark strings are JSON strings, so JSON's escaping makes any choice a literal.
            let literals: Vec<String> =
                choices.iter().map(|c| serde_json::Value::from(c.as_str()).to_string()).collect();
            TopLevelGrammar::from_lark(format!("start: {}", literals.join(" | ")))
        }
        Constraint::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
    })
}

/// One sequence's place in its constraint.
pub struct Guide {
    matcher: Matcher,
    /// The tokens allowed next, once computed for this step.
    mask: Option<SimpleVob>,
    eos_ids: Arc<[u32]>,
}

impl Guide {
    /// Computes the mask of the next token, if not yet done: executors call this while their forward pass
    /// runs, so sampling finds it ready.
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            // A matcher in error allows nothing; `consume` then ends the sequence with its error.
            self.mask = Some(self.matcher.compute_mask_or_eos().unwrap_or_else(|_| SimpleVob::new()));
        }
    }

    /// Sets every logit the constraint rules out to minus infinity.
    pub fn mask_logits(&mut self, logits: &mut [f32]) {
        self.prepare();
        let Some(mask) = &self.mask else { return };
        let eos_allowed = self.eos_ids.first().is_some_and(|&eos| (eos as usize) < mask.len() && mask.is_allowed(eos));
        let known = mask.len().min(logits.len());
        // The grammar knows one EOS; the model may end with any of its own (Llama 3's `<|eot_id|>` beside
        // `<|end_of_text|>`), so all of them follow the one the grammar allows or not.
        let kept = |token: usize| eos_allowed && self.eos_ids.contains(&(token as u32));
        mask.iter_unset_entries(|token| {
            if token < known && !kept(token) {
                logits[token] = f32::NEG_INFINITY;
            }
        });
        for (token, logit) in logits.iter_mut().enumerate().skip(known) {
            if !kept(token) {
                *logit = f32::NEG_INFINITY;
            }
        }
        if !eos_allowed {
            for &eos in self.eos_ids.iter() {
                if let Some(logit) = logits.get_mut(eos as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Every token allowed next, in id order, the model's EOS ids included where the output may end.
    pub fn allowed(&mut self) -> Vec<u32> {
        self.prepare();
        let Some(mask) = &self.mask else { return Vec::new() };
        let mut allowed = mask.to_list();
        if let Some(&eos) = self.eos_ids.first()
            && allowed.contains(&eos)
        {
            allowed.retain(|t| !self.eos_ids.contains(t));
            allowed.extend(self.eos_ids.iter().copied());
        }
        allowed
    }

    /// Reads the sampled `token`; says how the sequence ends if the constraint ends it: `Complete` when
    /// nothing more can follow, an error when the token broke it (which a masked sampler never does).
    pub fn consume(&mut self, token: u32) -> Option<FinishReason> {
        self.mask = None;
        if self.eos_ids.contains(&token) {
            // Allowed only where the output could end: it is whole.
            return Some(FinishReason::Complete);
        }
        if let Err(e) = self.matcher.consume_token(token) {
            return Some(FinishReason::Error(format!("structured output: token {token} broke the constraint: {e}")));
        }
        match self.matcher.stop_reason() {
            StopReason::NotStopped => None,
            StopReason::NoExtension | StopReason::NoExtensionBias | StopReason::EndOfSentence => {
                Some(FinishReason::Complete)
            }
            other => Some(FinishReason::Error(format!(
                "structured output stopped: {other:?}{}",
                self.matcher.get_error().map(|e| format!(" ({e})")).unwrap_or_default()
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
