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
