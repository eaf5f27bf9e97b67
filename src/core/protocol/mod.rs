//! Every wire type, defined once: what the frontend hands an engine (`engine`), what workers publish about
//! their KV cache and load (`kv`, framed by `plane`), what routers and workers say on the request plane
//! (`request`), the record each role registers (`discovery`), a planner's decisions (`plan`), a router's
//! traffic (`router`), the OpenAI HTTP JSON (`openai`), and Envoy's external processing for the Gateway API
//! endpoint picker (`ext_proc`).
//!
//! Types here carry data only; behaviour lives with the concept that owns it. The engine and KV types derive
//! serde so the same structs go over msgpack between processes.
pub mod discovery;
pub mod engine;
pub mod ext_proc;
pub mod external;
pub mod kv;
pub mod openai;
pub mod plan;
pub mod plane;
pub mod profile;
pub mod request;
pub mod router;
pub mod transfer;

pub use engine::{
    Constraint, EngineOutput, FinishReason, HandOff, HeldEmbeddings, HeldKv, KvLayout, MediaInput, Pooling,
    PreprocessedRequest, SamplingOptions, StopConditions, TokenLogprob,
};
pub use kv::{
    ImageStats, KvEvent, KvEventBatch, KvEvents, KvTransferStats, LoadMetrics, StoredBlock, WorkerId, WorkerStats,
};
pub use plan::{Forecast, Plan};
pub use router::{ModelReport, RoutedTo, RouterReport};
#[cfg(test)]
pub(crate) mod fuzz;
