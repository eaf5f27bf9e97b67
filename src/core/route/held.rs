//! Engines a router holds itself (`dynamo route --kv-events-from vllm:tcp://HOST:PORT=http://HOST:PORT`):
//! vLLM, SGLang or TensorRT-LLM servers started without a `dynamo` worker beside them. The router connects to
//! each as a worker process would (its OpenAI API, its KV-event publisher, its `/metrics`), so they are
//! routed to, indexed and watched like in-process workers, beside the workers that discovery finds. An endpoint
//! picker (`--epp-port`) sends a gateway's request for a held engine straight to the engine's own server, as
//! Dynamo's standalone picker fronts plain vLLM pods.
use crate::core::engine::Engine;
use crate::core::engine::external::{ExternalEngine, ExternalError, ExternalKind, ExternalSettings};
use crate::core::frontend::Served;
use crate::core::model::{Model, ModelError, ModelOptions, ModelSource};
use crate::core::router::{Router, RouterConfig};
use std::sync::Arc;

/// One `--kv-events-from` engine: which kind, where its KV events are published, where it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldEngine {
    pub kind: ExternalKind,
    pub kv_events: String,
    /// vLLM's (and SGLang's) replay socket: the router starts from the engine's event history, so blocks
    /// stored before it joined keep their children.
    pub replay: Option<String>,
    pub url: String,
}

impl std::str::FromStr for HeldEngine {
    type Err = String;

    /// `KIND:EVENTS[,REPLAY]=URL`, as `vllm:tcp://10.0.0.7:5557,tcp://10.0.0.7:5558=http://10.0.0.7:8000`
    /// (TensorRT-LLM's events are its `http://HOST:PORT/kv_cache_events`, and it has no replay).
    fn from_str(spec: &str) -> Result<Self, String> {
        let usage = "expected KIND:EVENTS[,REPLAY]=URL, e.g. vllm:tcp://10.0.0.7:5557=http://10.0.0.7:8000 (KIND: \
                     vllm, sglang or trtllm)";
        let (kind, rest) = spec.split_once(':').ok_or_else(|| format!("{usage}, got `{spec}`"))?;
        let kind = match kind {
            "vllm" => ExternalKind::Vllm,
            "sglang" => ExternalKind::Sglang,
            "trtllm" => ExternalKind::Trtllm,
            other => return Err(format!("`{other}` is no engine this router can hold; {usage}")),
        };
        let (events, url) = rest.split_once('=').ok_or_else(|| format!("{usage}, got `{spec}`"))?;
        let (kv_events, replay) = match events.split_once(',') {
            Some((events, replay)) => (events, Some(replay)),
            None => (events, None),
        };
        let events_scheme = match kind {
            ExternalKind::Trtllm => "http://",
            ExternalKind::Vllm | ExternalKind::Sglang => "tcp://",
        };
        if !kv_events.starts_with(events_scheme) || kv_events.len() == events_scheme.len() {
            return Err(format!(
                "{}'s KV events are read from {events_scheme}HOST:PORT{}, got `{kv_events}`; {usage}",
                kind.name(),
                if kind == ExternalKind::Trtllm { "/kv_cache_events" } else { "" }
            ));
        }
        if let Some(replay) =
            replay.filter(|r| kind == ExternalKind::Trtllm || r.len() <= 6 || !r.starts_with("tcp://"))
        {
            return Err(match kind {
                ExternalKind::Trtllm => format!("TensorRT-LLM has no replay socket, got `{replay}`; {usage}"),
                _ => format!("the replay socket is tcp://HOST:PORT, got `{replay}`; {usage}"),
            });
        }
        if !url.starts_with("http://") || url.len() == "http://".len() {
            return Err(format!("the engine's server is http://HOST:PORT, got `{url}`; {usage}"));
        }
        let replay = replay.map(str::to_string);
        Ok(Self { kind, kv_events: kv_events.to_string(), replay, url: url.to_string() })
    }
}

/// The spec it was parsed from, as errors name it.
impl std::fmt::Display for HeldEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.kv_events)?;
        if let Some(replay) = &self.replay {
            write!(f, ",{replay}")?;
        }
        write!(f, "={}", self.url)
    }
}

/// What `dynamo route` is told to hold: the engines and the model they serve.
#[derive(Debug, Clone)]
pub struct HeldSettings {
    /// The engines' model directory: its tokenizer and chat template prepare their requests.
    pub model: ModelSource,
    pub model_options: ModelOptions,
    /// Tokens per KV block, which must be every engine's.
    pub block_size: usize,
    pub engines: Vec<HeldEngine>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("--kv-events-from {spec}: {source}")]
    Engine { spec: String, source: ExternalError },
}

impl HeldSettings {
    /// Loads the model and connects to every engine (each must answer now); the model's context is cut to the
    /// shortest an engine serves, so a request none can take is refused before it is routed.
    pub async fn connect(&self, router: &RouterConfig) -> Result<Served, HeldError> {
        let mut model = Model::load_with(&self.model, &self.model_options)?;
        let mut engines: Vec<Arc<dyn Engine>> = Vec::with_capacity(self.engines.len());
        for held in &self.engines {
            let settings = ExternalSettings {
                kind: held.kind,
                url: held.url.clone(),
                kv_events: Some(held.kv_events.clone()),
                kv_events_replay: held.replay.clone(),
                metrics_url: None,
                block_size: self.block_size,
                kv_connector: false,
                bootstrap_port: crate::core::engine::external::SGLANG_BOOTSTRAP_PORT,
                profile: None,
                data_parallel_rank: None,
            };
            let engine = (ExternalEngine::connect(rand::random(), &settings).await)
                .map_err(|source| HeldError::Engine { spec: held.to_string(), source })?;
            let context = u32::try_from(engine.max_sequence_tokens()).unwrap_or(u32::MAX);
            model.card.context_length = model.card.context_length.min(context);
            engines.push(Arc::new(engine));
        }
        let config = RouterConfig { block_size: self.block_size, ..router.clone() };
        Ok(Served { model: Arc::new(model), router: Arc::new(Router::new(engines, config)) })
    }

    /// The engines, for the serving line.
    pub fn describe(&self) -> String {
        let engines: Vec<String> = self.engines.iter().map(|e| format!("{} at {}", e.kind.name(), e.url)).collect();
        engines.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_spec_is_kind_events_and_url() {
        let held: HeldEngine = "vllm:tcp://10.0.0.7:5557=http://10.0.0.7:8000".parse().unwrap();
        assert_eq!(
            held,
            HeldEngine {
                kind: ExternalKind::Vllm,
                kv_events: "tcp://10.0.0.7:5557".into(),
                replay: None,
                url: "http://10.0.0.7:8000".into()
            }
        );
        let replayed: HeldEngine = "vllm:tcp://h:5557,tcp://h:5558=http://h:8000".parse().unwrap();
        assert_eq!(
            (replayed.kv_events.as_str(), replayed.replay.as_deref(), replayed.url.as_str()),
            ("tcp://h:5557", Some("tcp://h:5558"), "http://h:8000")
        );
        for spec in ["vllm:tcp://h:5557=http://h:8000", "sglang:tcp://h:5557,tcp://h:5558=http://h:8000"] {
            assert_eq!(spec.parse::<HeldEngine>().unwrap().to_string(), spec, "errors name the spec as given");
        }
        let trtllm: HeldEngine = "trtllm:http://h:8000/kv_cache_events=http://h:8000".parse().unwrap();
        assert_eq!((trtllm.kind, trtllm.kv_events.as_str()), (ExternalKind::Trtllm, "http://h:8000/kv_cache_events"));
        assert_eq!("sglang:tcp://h:1=http://h:2".parse::<HeldEngine>().unwrap().kind, ExternalKind::Sglang);
    }

    #[test]
    fn a_malformed_engine_spec_says_what_is_expected() {
        for (spec, says) in [
            ("http://10.0.0.7:8000", "no engine this router can hold"),
            ("ollama:tcp://h:1=http://h:2", "`ollama` is no engine"),
            ("vllm:tcp://h:1", "expected KIND:EVENTS"),
            ("vllm:http://h:1=http://h:2", "vllm's KV events are read from tcp://HOST:PORT"),
            ("trtllm:tcp://h:1=http://h:2", "/kv_cache_events"),
            ("vllm:tcp://h:1=h:2", "the engine's server is http://HOST:PORT"),
            ("vllm:tcp://=http://h:2", "tcp://HOST:PORT"),
            ("vllm:tcp://h:1,h:3=http://h:2", "the replay socket is tcp://HOST:PORT"),
            ("vllm:tcp://h:1,=http://h:2", "the replay socket is tcp://HOST:PORT"),
            ("trtllm:http://h:1/kv_cache_events,tcp://h:3=http://h:2", "TensorRT-LLM has no replay socket"),
            ("", "expected KIND:EVENTS"),
        ] {
            let error = spec.parse::<HeldEngine>().unwrap_err();
            assert!(error.contains(says), "{spec:?}: {error}");
        }
    }
}
