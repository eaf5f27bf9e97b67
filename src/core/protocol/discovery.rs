//! The record every role publishes about itself, the same in mDNS TXT properties, a static file and a
//! worker's `Hello` on the request plane.
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefill and decode in one worker (aggregated serving).
    Decode,
    Prefill,
    Encode,
    /// A router's planner: it serves no requests, and publishes its plans on the event plane.
    Planner,
    /// A router: it publishes its traffic on the event plane.
    Router,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Decode, Role::Prefill, Role::Encode, Role::Planner, Role::Router];

    /// As it is written in records and shown to people (the same as its serde name).
    pub fn name(self) -> &'static str {
        match self {
            Role::Decode => "decode",
            Role::Prefill => "prefill",
            Role::Encode => "encode",
            Role::Planner => "planner",
            Role::Router => "router",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: u64,
    pub role: Role,
    /// The name clients use in `"model"`.
    pub model: String,
    /// Clusters sharing a network see only their own namespace.
    pub namespace: String,
    /// ZMQ endpoint of the worker's ROUTER socket (`tcp://host:port`).
    pub request_addr: String,
    /// ZMQ endpoint of the worker's PUB socket.
    pub event_addr: String,
    /// Where the worker's transfer agent takes and serves KV blocks or embeddings for the next role
    /// (`tcp://host:port`, or another backend's address). `None` for a worker that hands nothing to another
    /// role: an aggregated worker, which prefills and decodes its own requests.
    pub transfer_addr: Option<String>,
    pub card: ModelCardSummary,
    /// What it computes on (`Engine::device`), for operators. A worker's answer to a ping carries it;
    /// discovery records do not (empty).
    #[serde(default)]
    pub device: String,
    /// The OpenAI HTTP server that serves this worker alone (`tcp://host:port`), when its process has one:
    /// a `dynamo run --discovery` worker, which a Gateway API endpoint picker can send requests to.
    #[serde(default)]
    pub http_addr: Option<String>,
    /// The LoRA adapters its engine serves besides the base model, by the names clients put in `"model"`
    /// (an external engine's, as its `/v1/models` lists them). A worker's answer to a ping carries them;
    /// discovery records do not (empty).
    #[serde(default)]
    pub adapters: Vec<String>,
}

impl Instance {
    /// Its event endpoint as reachable by a peer that reached its request endpoint at `request_endpoint`: a
    /// worker bound to every interface reports `tcp://0.0.0.0:PORT` for its events.
    pub fn event_endpoint_from(&self, request_endpoint: &str) -> String {
        reached_from(&self.event_addr, request_endpoint)
    }

    /// Its transfer agent's address as reachable by a peer that reached its request endpoint at
    /// `request_endpoint` (as `event_endpoint_from`); `None` for a worker without one.
    pub fn transfer_endpoint_from(&self, request_endpoint: &str) -> Option<String> {
        Some(reached_from(self.transfer_addr.as_deref()?, request_endpoint))
    }

    /// Its own OpenAI server's endpoint as reachable by a peer that reached its request endpoint at
    /// `request_endpoint` (as `event_endpoint_from`); `None` for a worker without one.
    pub fn http_endpoint_from(&self, request_endpoint: &str) -> Option<String> {
        Some(reached_from(self.http_addr.as_deref()?, request_endpoint))
    }
}

/// `endpoint` (of the process whose request endpoint a peer reached at `request_endpoint`) as that peer
/// reaches it.
fn reached_from(endpoint: &str, request_endpoint: &str) -> String {
    match split_endpoint(request_endpoint) {
        Some((host, _)) => reached_at(endpoint, host),
        None => endpoint.to_string(),
    }
}

/// What a router must agree on with a worker before sending it anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCardSummary {
    /// Tokens per KV block: prompt hashes are computed with it.
    pub block_size: u32,
    pub context_length: u32,
    pub kv_blocks: u64,
    /// xxh3 of `tokenizer.json`: two workers with different tokenizers cannot share one router.
    pub tokenizer_hash: u64,
}

/// `tcp://HOST:PORT` split into its host (an IP, a bracketed IPv6, or a name) and port.
pub fn split_endpoint(endpoint: &str) -> Option<(&str, u16)> {
    let (host, port) = endpoint.strip_prefix("tcp://")?.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

/// How `ip` is written as the host of an endpoint (IPv6 in brackets).
pub fn endpoint_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}

pub fn tcp_endpoint(ip: IpAddr, port: u16) -> String {
    format!("tcp://{}:{port}", endpoint_host(ip))
}

/// The IP of an endpoint's host, if it is one rather than a name.
pub fn endpoint_ip(endpoint: &str) -> Option<IpAddr> {
    let (host, _) = split_endpoint(endpoint)?;
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// A process bound to every interface reports `tcp://0.0.0.0:PORT` (or `[::]`); others reach it at `host`
/// (written as in an endpoint). Any other endpoint is returned as it is.
pub fn reached_at(endpoint: &str, host: &str) -> String {
    match split_endpoint(endpoint) {
        Some((bound, port)) if endpoint_ip(endpoint).is_some_and(|ip| ip.is_unspecified()) && bound != host => {
            format!("tcp://{host}:{port}")
        }
        _ => endpoint.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_is_named_as_serde_writes_it() {
        for role in Role::ALL {
            assert_eq!(serde_json::to_value(role).unwrap(), role.name());
            assert_eq!(Role::from_name(role.name()), Some(role));
        }
        assert_eq!(Role::from_name("frontend"), None);
    }

    #[test]
    fn endpoints_bound_to_every_interface_are_reached_at_a_real_host() {
        assert_eq!(reached_at("tcp://0.0.0.0:7001", "10.1.2.3"), "tcp://10.1.2.3:7001");
        assert_eq!(reached_at("tcp://[::]:7001", "node5"), "tcp://node5:7001");
        assert_eq!(reached_at("tcp://10.9.9.9:7001", "10.1.2.3"), "tcp://10.9.9.9:7001");
        assert_eq!(split_endpoint("tcp://node5:7100"), Some(("node5", 7100)));
        assert_eq!(endpoint_ip("tcp://[::1]:7100"), Some("::1".parse().unwrap()));
        assert_eq!(tcp_endpoint("::1".parse().unwrap(), 7), "tcp://[::1]:7");
    }
}
