//! Integration tests: the real `dynamo` binary, started on 127.0.0.1 with a free port, driven over HTTP.
//! One test binary, one module per area, so everything links once.
mod bench;
mod cli;
mod cluster;
mod cuda;
mod deploy;
mod disagg;
mod embeddings;
mod envoy;
mod epp;
mod external;
mod hardening;
mod http;
mod kubernetes;
mod native;
mod nixl;
mod openai_client;
mod planner;
mod structured;
mod top;
mod transfer;
mod util;
mod vision;
mod vllm;
