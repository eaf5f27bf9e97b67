//! Other engines' KV-event payloads, decoded into one shape: vLLM's and SGLang's msgpack batches and
//! TensorRT-LLM's JSON event list.
//!
//! vLLM encodes a batch as `[ts, events, data_parallel_rank]` (SGLang: `attn_dp_rank`); each event is an
//! array with its tag first (older vLLM, SGLang) or a map with a `"type"` key (vLLM after the switch to map
//! encoding). Hashes are msgpack integers (SGLang: signed) or 32-byte digests. Trailing fields may be
//! missing, unknown fields and event types are skipped, so newer engines keep working. Engine hashes are
//! only ever used as keys, so a digest is folded to a u64 with xxh3 and a signed one keeps its bits.
use rmpv::Value;
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64;

#[derive(Debug, Clone, PartialEq)]
pub enum ExternalEvent {
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        /// Tokens of all the stored blocks, in order.
        token_ids: Vec<u32>,
        block_size: Option<usize>,
        /// Cache tier ("GPU", "CPU", …) when the engine says.
        medium: Option<String>,
        /// Per block, a digest of what the engine keyed it by besides its tokens: a LoRA adapter, a media
        /// item, a cache salt (vLLM's `lora_name`/`lora_id` and `extra_keys`). Empty when nothing did.
        extra: Vec<Option<u64>>,
        /// The KV-cache group of a hybrid model's blocks, when the engine says.
        group: Option<KvGroup>,
    },
    Removed {
        hashes: Vec<u64>,
        medium: Option<String>,
        group: Option<u32>,
    },
    Cleared,
}

/// One KV-cache group of a hybrid model (vLLM's `group_idx` and `kv_cache_spec_kind`).
#[derive(Debug, Clone, PartialEq)]
pub struct KvGroup {
    pub index: u32,
    /// `full_attention`, `sliding_window`, `mamba`, …, when the engine says.
    pub kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExternalBatch {
    pub ts: f64,
    pub events: Vec<ExternalEvent>,
    pub dp_rank: Option<i64>,
    /// Events of a type this decoder does not know.
    pub skipped: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a msgpack value: {0}")]
    Msgpack(String),
    #[error("not JSON: {0}")]
    Json(String),
    #[error("unexpected shape: {0}")]
    Shape(String),
}

fn shape(message: impl Into<String>) -> DecodeError {
    DecodeError::Shape(message.into())
}

/// Decodes one vLLM or SGLang batch (the payload frame of one ZMQ message).
pub fn decode_msgpack_batch(mut payload: &[u8]) -> Result<ExternalBatch, DecodeError> {
    let value = rmpv::decode::read_value(&mut payload).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    let (ts, events, rank) = match &value {
        Value::Array(fields) => (fields.first(), fields.get(1), fields.get(2)),
        Value::Map(_) => (
            field(&value, "ts"),
            field(&value, "events"),
            field(&value, "data_parallel_rank").or_else(|| field(&value, "attn_dp_rank")),
        ),
        _ => return Err(shape("a batch is an array [ts, events, dp_rank] or a map")),
    };
    let ts = ts.and_then(Value::as_f64).ok_or_else(|| shape("batch without a numeric ts"))?;
    let events = events.and_then(Value::as_array).ok_or_else(|| shape("batch without an events list"))?;
    let dp_rank = rank.and_then(Value::as_i64);
    let mut batch = ExternalBatch { ts, events: Vec::with_capacity(events.len()), dp_rank, skipped: 0 };
    for event in events {
        match decode_event(event)? {
            Some(event) => batch.events.push(event),
            None => batch.skipped += 1,
        }
    }
    Ok(batch)
}

/// Reads field `name` of a map event, or position `index` (counting the tag as 0) of an array event.
struct Fields<'a> {
    value: &'a Value,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str, index: usize) -> Option<&'a Value> {
        match self.value {
            Value::Array(items) => items.get(index),
            _ => field(self.value, name),
        }
        .filter(|v| !v.is_nil())
    }
}

fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    map.as_map()?.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v)
}

fn decode_event(value: &Value) -> Result<Option<ExternalEvent>, DecodeError> {
    let tag = match value {
        Value::Array(items) => items.first().and_then(Value::as_str),
        Value::Map(_) => field(value, "type").and_then(Value::as_str),
        _ => None,
    }
    .ok_or_else(|| shape("an event is an array with its tag first or a map with a \"type\""))?;
    let fields = Fields { value };
    let medium = fields.get("medium", 6).and_then(Value::as_str).map(str::to_string);
    let event = match tag {
        "BlockStored" => {
            let hashes = hash_list(fields.get("block_hashes", 1))?;
            let extra = block_keys(
                fields.get("lora_id", 5),
                fields.get("lora_name", 7),
                fields.get("extra_keys", 8),
                hashes.len(),
            );
            ExternalEvent::Stored {
                hashes,
                parent: fields.get("parent_block_hash", 2).map(engine_hash).transpose()?,
                token_ids: fields
                    .get("token_ids", 3)
                    .and_then(Value::as_array)
                    .ok_or_else(|| shape("BlockStored without token_ids"))?
                    .iter()
                    .map(|t| {
                        t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| shape("a token id is not a u32"))
                    })
                    .collect::<Result<_, _>>()?,
                block_size: fields.get("block_size", 4).and_then(Value::as_u64).map(|b| b as usize),
                medium,
                extra,
                group: fields.get("group_idx", 9).and_then(Value::as_u64).and_then(|g| u32::try_from(g).ok()).map(
                    |index| KvGroup {
                        index,
                        kind: fields.get("kv_cache_spec_kind", 10).and_then(Value::as_str).map(str::to_string),
                    },
                ),
            }
        }
        "BlockRemoved" => ExternalEvent::Removed {
            hashes: hash_list(fields.get("block_hashes", 1))?,
            medium: fields.get("medium", 2).and_then(Value::as_str).map(str::to_string),
            group: fields.get("group_idx", 3).and_then(Value::as_u64).and_then(|g| u32::try_from(g).ok()),
        },
        "AllBlocksCleared" => ExternalEvent::Cleared,
        _ => return Ok(None),
    };
    Ok(Some(event))
}

/// For each of `blocks` blocks, the digest of its adapter and its extra keys (either may be missing); empty
/// when no block has either. Digests of the values' msgpack encoding: equal keys give equal digests, whatever
/// they hold. vLLM (0.32) repeats the adapter's name among each block's extra keys: it is the adapter's part,
/// so it is left out of the extra keys, and an adapter's plain block is keyed the same whether or not the
/// engine repeats it (`adapter_key`).
fn block_keys(
    lora_id: Option<&Value>,
    lora_name: Option<&Value>,
    extra_keys: Option<&Value>,
    blocks: usize,
) -> Vec<Option<u64>> {
    // The name when there is one (the id is deprecated in its favour, and ids are per process).
    let lora = lora_name.or(lora_id).map(digest);
    let besides_adapter = |keys: &Value| -> Option<u64> {
        match (keys, lora_name) {
            (Value::Nil, _) => None,
            (Value::Array(items), Some(name)) => {
                let rest: Vec<Value> = items.iter().filter(|item| *item != name).cloned().collect();
                (!rest.is_empty()).then(|| digest(&Value::Array(rest)))
            }
            (keys, _) => Some(digest(keys)),
        }
    };
    let per_block: Vec<Option<u64>> = match extra_keys.and_then(Value::as_array) {
        Some(keys) => keys.iter().map(besides_adapter).collect(),
        None => Vec::new(),
    };
    if lora.is_none() && per_block.iter().all(Option::is_none) {
        return Vec::new();
    }
    // A LoRA keys every block of the run.
    (0..blocks)
        .map(|i| match (lora, per_block.get(i).copied().flatten()) {
            (None, None) => None,
            (lora, key) => Some(block_key(lora, key)),
        })
        .collect()
}

fn digest(value: &Value) -> u64 {
    let mut bytes = Vec::new();
    let _ = rmpv::encode::write_value(&mut bytes, value);
    xxh3_64(&bytes)
}

fn block_key(lora: Option<u64>, extra: Option<u64>) -> u64 {
    xxh3_64(&[lora.unwrap_or(0).to_le_bytes(), extra.unwrap_or(0).to_le_bytes()].concat())
}

/// The key a block of a prompt under the LoRA adapter `name` is stored under (and no extra keys): what an
/// engine's event for it folds in, so a request names the same blocks.
pub fn adapter_key(name: &str) -> u64 {
    block_key(Some(digest(&Value::from(name))), None)
}

fn hash_list(value: Option<&Value>) -> Result<Vec<u64>, DecodeError> {
    value
        .and_then(Value::as_array)
        .ok_or_else(|| shape("event without block_hashes"))?
        .iter()
        .map(engine_hash)
        .collect()
}

fn engine_hash(value: &Value) -> Result<u64, DecodeError> {
    match value {
        Value::Integer(i) => {
            i.as_u64().or_else(|| i.as_i64().map(|s| s as u64)).ok_or_else(|| shape("hash out of range"))
        }
        Value::Binary(bytes) => Ok(xxh3_64(bytes)),
        _ => Err(shape("a block hash is an integer or bytes")),
    }
}

#[derive(Deserialize)]
struct TrtEvent {
    data: TrtData,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TrtData {
    Stored {
        parent_hash: Option<u64>,
        blocks: Vec<TrtBlock>,
    },
    Removed {
        block_hashes: Vec<u64>,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct TrtBlock {
    block_hash: u64,
    tokens: Vec<TrtToken>,
}

#[derive(Deserialize)]
struct TrtToken {
    token_id: u32,
}

/// Decodes TensorRT-LLM's event list (`/kv_cache_events` or `get_kv_cache_events`); "created" and "updated"
/// events say nothing about which prefixes are held and are skipped.
pub fn decode_trtllm_json(payload: &[u8]) -> Result<ExternalBatch, DecodeError> {
    let events: Vec<TrtEvent> = serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
    let mut batch = ExternalBatch { ts: 0.0, events: Vec::new(), dp_rank: None, skipped: 0 };
    for event in events {
        match event.data {
            TrtData::Stored { parent_hash, blocks } => {
                let block_size = blocks.first().map(|b| b.tokens.len());
                batch.events.push(ExternalEvent::Stored {
                    hashes: blocks.iter().map(|b| b.block_hash).collect(),
                    parent: parent_hash,
                    token_ids: blocks.iter().flat_map(|b| b.tokens.iter().map(|t| t.token_id)).collect(),
                    block_size,
                    medium: None,
                    extra: Vec::new(),
                    group: None,
                });
            }
            TrtData::Removed { block_hashes } => {
                batch.events.push(ExternalEvent::Removed { hashes: block_hashes, medium: None, group: None })
            }
            TrtData::Other => batch.skipped += 1,
        }
    }
    Ok(batch)
}
