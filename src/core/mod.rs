//! Everything the binary does, one folder per concept. `cmd` calls in here; nothing in here knows about clap.
pub mod bench;
pub mod discovery;
pub mod engine;
pub mod frontend;
pub mod indexer;
pub mod members;
pub mod model;
pub mod plane;
pub mod protocol;
pub mod route;
pub mod router;
pub mod run;
pub mod telemetry;
pub mod tokens;
pub mod top;
pub mod trust;
pub mod worker;
