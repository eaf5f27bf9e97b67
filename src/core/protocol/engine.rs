//! The request an engine receives (token ids + sampling options, already validated) and the deltas it streams.
use serde::{Deserialize, Serialize};

/// A request after tokenization and validation: everything an engine needs, nothing HTTP-shaped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessedRequest {
    pub request_id: String,
    #[serde(with = "token_bytes")]
    pub token_ids: Vec<u32>,
    pub sampling: SamplingOptions,
    pub stop: StopConditions,
    /// Return the sampled token's logprob and this many alternatives; `None` returns no logprobs.
    pub logprobs: Option<u32>,
    /// Whether the prompt's KV is kept for, or comes from, another worker (disaggregated serving).
    #[serde(default)]
    pub hand_off: HandOff,
}

/// A request's part in disaggregated serving: a prefill worker computes the prompt and keeps its KV for a
/// decode worker, which reads it through the transfer layer and generates from there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum HandOff {
    /// The whole request here (aggregated serving).
    #[default]
    None,
    /// Generate the first token, then keep the prompt's KV for a peer to read: the final output says where
    /// (`EngineOutput::held`) when it ends for length, and nothing is kept when it ends otherwise.
    Hold,
    /// The prompt minus its last token (the prefill's first token) was computed by a peer, whose pages hold
    /// its KV: read them, then decode. If they cannot be read, the prompt is computed here.
    From(Box<HeldKv>),
}

/// KV a prefill worker holds for a decode worker: the pages of one request, for one lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldKv {
    /// The holder's transfer agent (`tcp://host:port`); the router fills it in from the holder's record.
    pub agent: String,
    /// Names the hold to its holder; a read that carries it ends the lease.
    pub lease: u64,
    /// Prompt tokens whose KV the pages hold, from the first.
    pub tokens: u32,
    /// Block `i` of the prompt is in page `i`.
    pub pages: Vec<u32>,
    pub layout: KvLayout,
}

/// How an engine's KV pages sit in its transfer agent's regions: `regions` consecutive region ids from
/// `first_region` (each layer's K, then its V), page `p` at `p * page_bytes` in each. Two engines can hand KV
/// to each other only if everything but `first_region` is equal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub block_size: u32,
    pub page_bytes: u64,
    pub first_region: u32,
    pub regions: u32,
}

impl KvLayout {
    /// Why pages of `self` cannot be copied into pages of `other`, if they cannot.
    pub fn mismatch(&self, other: &KvLayout) -> Option<String> {
        let ours = (self.block_size, self.page_bytes, self.regions);
        let theirs = (other.block_size, other.page_bytes, other.regions);
        (ours != theirs).then(|| {
            format!(
                "KV pages differ: {} tokens, {} bytes, {} regions against {} tokens, {} bytes, {} regions (another \
                 model, dtype or block size)",
                ours.0, ours.1, ours.2, theirs.0, theirs.1, theirs.2
            )
        })
    }
}

impl PreprocessedRequest {
    /// Greedy, no stop tokens, no logprobs: what benchmarks and tests send.
    pub fn greedy(request_id: impl Into<String>, token_ids: Vec<u32>, max_tokens: u32) -> Self {
        Self {
            request_id: request_id.into(),
            token_ids,
            sampling: SamplingOptions { temperature: 0.0, ..SamplingOptions::default() },
            stop: StopConditions { max_tokens, min_tokens: 0, stop_token_ids: Vec::new() },
            logprobs: None,
            hand_off: HandOff::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// `None` keeps the whole vocabulary.
    pub top_k: Option<u32>,
    pub min_p: f32,
    /// Makes sampling reproducible per request.
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

/// When the engine stops generating. Stop *strings* are not here: they need text, so the frontend owns them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopConditions {
    pub max_tokens: u32,
    /// Stop ids and EOS are ignored until this many tokens were generated.
    pub min_tokens: u32,
    /// The request's own stop ids plus, unless `ignore_eos`, the model's EOS ids.
    pub stop_token_ids: Vec<u32>,
}

/// One sampled token's log-probability and its best alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FinishReason {
    /// A stop token or EOS was sampled; it is the last id of the final output and is not shown as text.
    StopToken(u32),
    Length,
    Cancelled,
    Error(String),
}

/// What an engine streams per step for one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineOutput {
    pub token_ids: Vec<u32>,
    /// One entry per token id when logprobs were asked for, else empty.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens found in the prefix cache; set on the first output.
    pub cached_tokens: Option<u32>,
    /// On the final output of a request whose pages are held for a peer (`HandOff::Hold`, ended for
    /// length): where they are.
    #[serde(default)]
    pub held: Option<HeldKv>,
}

/// A prompt's token ids in binary formats: one byte string of little-endian `u32`s instead of an array of
/// msgpack integers, which cost a few ns per token each way (tens of µs of a long prompt's trip to a worker)
/// where this is a copy. Human-readable formats (JSON) keep the plain array.
mod token_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(tokens: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            return tokens.serialize(serializer);
        }
        let bytes: Vec<u8> = tokens.iter().flat_map(|token| token.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        struct TokenBytes;

        impl serde::de::Visitor<'_> for TokenBytes {
            type Value = Vec<u32>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string of 4-byte token ids")
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Vec<u32>, E> {
                if !bytes.len().is_multiple_of(4) {
                    return Err(E::custom(format!(
                        "token ids: {} bytes is not a whole number of 4-byte ids",
                        bytes.len()
                    )));
                }
                Ok(bytes.chunks_exact(4).map(|id| u32::from_le_bytes([id[0], id[1], id[2], id[3]])).collect())
            }
        }
        if deserializer.is_human_readable() {
            return Vec::deserialize(deserializer);
        }
        deserializer.deserialize_bytes(TokenBytes)
    }
}
