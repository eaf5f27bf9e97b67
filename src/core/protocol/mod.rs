//! Every wire type, defined once: what the frontend hands an engine (`engine`), what workers publish about
//! their KV cache and load (`kv`), and the OpenAI HTTP JSON (`openai`).
//!
//! Types here carry data only; behaviour lives with the concept that owns it. The engine and KV types derive
//! serde so the same structs go over msgpack between processes.
pub mod engine;
pub mod external;
pub mod kv;
pub mod openai;
pub mod plane;

pub use engine::{EngineOutput, FinishReason, PreprocessedRequest, SamplingOptions, StopConditions, TokenLogprob};
pub use kv::{KvEvent, KvEventBatch, LoadMetrics, StoredBlock, WorkerId};
