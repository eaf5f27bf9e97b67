//! Everything the binary does, one folder per concept. `cmd` calls in here; nothing in here knows about clap.
pub mod bench;
pub mod discovery;
pub mod encode;
pub mod engine;
pub mod epp;
pub mod frontend;
pub mod grammar;
pub mod handoff;
pub mod indexer;
pub mod kube;
pub mod members;
pub mod model;
pub mod multimodal;
pub mod plane;
pub mod planner;
pub mod protocol;
pub mod route;
pub mod router;
pub mod run;
pub mod telemetry;
pub mod tokens;
pub mod top;
pub mod transfer;
pub mod trust;
pub mod worker;

/// A spawned task that ends when its last owner is dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
