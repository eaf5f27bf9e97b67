//! Property tests of the two endpoints' request preparation over hostile bodies: arbitrary bytes, and JSON
//! objects whose known fields take arbitrary values of every type. Each must come back prepared or as an
//! OpenAI error with a client-error or busy status; never a panic, never a 500.
use super::{FrontendState, chat, completions, embeddings};
use crate::core::engine::Engine;
use crate::core::engine::mocker::{MockerConfig, MockerEngine};
use crate::core::model::{Model, ModelSource};
use crate::core::protocol::fuzz::config;
use crate::core::router::{Router, RouterConfig};
use crate::core::telemetry::Metrics;
use axum::http::StatusCode;
use proptest::prelude::*;
use serde_json::{Map, Value};
use std::sync::{Arc, OnceLock};

/// One server's state for every case: a mocker worker behind a kv router, on a runtime kept for the test.
fn state() -> &'static FrontendState {
    static STATE: OnceLock<(tokio::runtime::Runtime, Arc<FrontendState>)> = OnceLock::new();
    &STATE
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let state = runtime.block_on(async {
                let model = Arc::new(Model::load(&ModelSource::Builtin, None).unwrap());
                let engine = MockerEngine::spawn(0, MockerConfig::default(), (10..20).collect());
                let router = Router::new(vec![Arc::new(engine) as Arc<dyn Engine>], RouterConfig::default());
                Arc::new(FrontendState::new(model, Arc::new(router), Arc::new(Metrics::new())))
            });
            (runtime, state)
        })
        .1
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e3f64..1e3).prop_map(Value::from),
        prop::sample::select(vec![0u64, 1, 2, 5, 128, 129, 4095, 4096, 100_000, u64::MAX]).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec!["user", "system", "text", "image_url", "json_object", "required", "auto"])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS.to_vec()), inner), 0..4)
                .prop_map(|pairs| Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// The fields either endpoint reads, and a few they refuse.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "role",
    "content",
    "type",
    "text",
    "stream",
    "stream_options",
    "include_usage",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "ignore_eos",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "tools",
    "tool_choice",
    "response_format",
    "json_schema",
    "schema",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "parallel_tool_calls",
    "logit_bias",
    "best_of",
    "chat_template_kwargs",
    "add_generation_prompt",
    "skip_special_tokens",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "include_stop_str_in_output",
    "input",
    "encoding_format",
    "dimensions",
    "normalize",
    "add_special_tokens",
];

/// A body that starts out valid for both endpoints, then has some fields replaced by arbitrary values.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((prop::sample::select(FIELDS.to_vec()), json_value()), 0..6).prop_map(|fields| {
        let mut body = Map::new();
        body.insert("messages".into(), serde_json::json!([{"role": "user", "content": "Hi"}]));
        body.insert("prompt".into(), "Hi".into());
        body.insert("max_tokens".into(), 4.into());
        body.insert("input".into(), "Hi".into());
        for (field, value) in fields {
            body.insert(field.to_string(), value);
        }
        serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
    })
}

fn check(endpoint: &str, body: &[u8]) -> Result<(), TestCaseError> {
    let state = state();
    let outcome = match endpoint {
        "chat" => chat::prepare(state, body, &Default::default(), &mut None).map(|_| ()),
        "embeddings" => embeddings::prepare(state, body, &mut None).map(|_| ()),
        _ => completions::prepare(state, body, &mut None).map(|_| ()),
    };
    if let Err(error) = outcome {
        let expected = error.status.is_client_error() || error.status == StatusCode::SERVICE_UNAVAILABLE;
        prop_assert!(expected, "{endpoint}: {} for {}", error.status, String::from_utf8_lossy(body));
        prop_assert!(!error.message.is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_are_refused_as_bad_requests(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        check("chat", &bytes)?;
        check("completions", &bytes)?;
        check("embeddings", &bytes)?;
    }

    #[test]
    fn hostile_fields_are_prepared_or_refused_never_a_panic(body in body()) {
        check("chat", &body)?;
        check("completions", &body)?;
        check("embeddings", &body)?;
    }
}
