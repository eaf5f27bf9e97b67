//! `dynamo`: one binary that serves LLMs across many machines.
//!
//! `cmd` turns command-line flags into settings; `core` owns every concept (protocol, engines, router,
//! frontend, …) and never sees clap.
pub mod cmd;
pub mod core;
