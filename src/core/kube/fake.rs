//! A fake Kubernetes API server on 127.0.0.1 for tests: namespaced collections of JSON objects with list
//! (equality label selectors), watch (history from a version, then live; bookmarks; `410 Gone` below the
//! compacted version; watches dropped on demand), server-side apply, merge patch and delete, over plain
//! HTTP. It refuses what a real server would refuse in ways the code under test must handle, and logs every
//! request. Shared by the unit tests and, through `#[path]`, the integration tests, so it names no `crate::`.
#![allow(dead_code)]

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

pub struct FakeApi {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    version: u64,
    /// Collection path → object name → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Every change: (version, collection, type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Watches from a version below this are answered `410 Gone`.
    compacted: u64,
    watchers: Vec<Watcher>,
    /// Watches are answered 503, as by an API server that is restarting.
    refusing_watches: bool,
    /// `METHOD path?query` of every request.
    requests: Vec<String>,
}

struct Watcher {
    collection: String,
    selector: Vec<(String, String)>,
    lines: mpsc::UnboundedSender<Bytes>,
}

impl FakeApi {
    pub async fn start() -> Self {
        let state: Arc<Mutex<State>> = Arc::default();
        let served = state.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = served.clone();
            async move { handle(&state, method, uri, headers, body) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port for the fake API");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, server }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces `object` in `collection` as a controller would (e.g. an EndpointSlice).
    pub fn put(&self, collection: &str, object: Value) {
        let name = object.pointer("/metadata/name").and_then(Value::as_str).expect("a named object").to_string();
        self.state().store(collection, &name, object);
    }

    pub fn remove(&self, collection: &str, name: &str) {
        self.state().delete(collection, name);
    }

    pub fn object(&self, collection: &str, name: &str) -> Option<Value> {
        self.state().objects.get(collection)?.get(name).cloned()
    }

    pub fn names(&self, collection: &str) -> Vec<String> {
        self.state().objects.get(collection).map(|o| o.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    /// Tells every watch the current version.
    pub fn bookmark(&self) {
        let mut state = self.state();
        let version = state.version.to_string();
        let line = event_line("BOOKMARK", &json!({"metadata": {"resourceVersion": version}}));
        state.watchers.retain(|w| w.lines.send(line.clone()).is_ok());
    }

    /// Forgets the history: a watch from any version before now is answered `410 Gone`.
    pub fn compact(&self) {
        let mut state = self.state();
        state.compacted = state.version;
        state.history.clear();
    }

    /// Ends every open watch, as a restarted API server or a dropped connection does.
    pub fn drop_watches(&self) {
        self.state().watchers.clear();
    }

    /// While set, every new watch is answered `503 Service Unavailable`.
    pub fn refuse_watches(&self, refuse: bool) {
        self.state().refusing_watches = refuse;
    }

    pub fn watching(&self) -> usize {
        let mut state = self.state();
        state.watchers.retain(|w| !w.lines.is_closed());
        state.watchers.len()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn store(&mut self, collection: &str, name: &str, mut object: Value) -> Value {
        let version = self.bump();
        let objects = self.objects.entry(collection.to_string()).or_default();
        let kind = if objects.contains_key(name) { "MODIFIED" } else { "ADDED" };
        let uid = (objects.get(name))
            .and_then(|o| o.pointer("/metadata/uid").cloned())
            .unwrap_or_else(|| json!(format!("uid-{collection}-{name}-{version}")));
        if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("name".into(), json!(name));
            metadata.insert("resourceVersion".into(), json!(version.to_string()));
            metadata.insert("uid".into(), uid);
        }
        objects.insert(name.to_string(), object.clone());
        self.announce(version, collection, kind, &object);
        object
    }

    fn delete(&mut self, collection: &str, name: &str) -> Option<Value> {
        let mut object = self.objects.get_mut(collection)?.remove(name)?;
        let version = self.bump();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        self.announce(version, collection, "DELETED", &object);
        Some(object)
    }

    fn announce(&mut self, version: u64, collection: &str, kind: &'static str, object: &Value) {
        self.history.push((version, collection.to_string(), kind, object.clone()));
        let line = event_line(kind, object);
        self.watchers.retain(|w| {
            if w.collection != collection || !matches(&w.selector, object) {
                return !w.lines.is_closed();
            }
            w.lines.send(line.clone()).is_ok()
        });
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// `key=value,key2=value2` (the only selectors the code under test writes).
fn selector(query: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let Some(selector) = query.get("labelSelector") else { return Vec::new() };
    (selector.split(',').filter_map(|term| term.split_once('=')))
        .map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
        .collect()
}

fn matches(selector: &[(String, String)], object: &Value) -> bool {
    selector.iter().all(|(key, value)| {
        object.pointer("/metadata/labels").and_then(|l| l.get(key)).and_then(Value::as_str) == Some(value.as_str())
    })
}

fn status(code: StatusCode, message: &str) -> axum::response::Response {
    let body = json!({"kind": "Status", "status": "Failure", "code": code.as_u16(), "message": message});
    (code, [("content-type", "application/json")], body.to_string()).into_response()
}

use axum::response::IntoResponse;

/// `/api/v1/namespaces/NS/PLURAL[/NAME]` or `/apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME]`: the
/// collection's path and the name.
fn split(path: &str) -> Option<(String, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let prefix = match parts.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return None,
    };
    if parts.get(prefix) != Some(&"namespaces") {
        return None;
    }
    let collection_end = prefix + 3;
    match parts.len() {
        n if n == collection_end => Some((format!("/{}", parts.join("/")), None)),
        n if n == collection_end + 1 => {
            Some((format!("/{}", parts[..collection_end].join("/")), Some(parts[collection_end].to_string())))
        }
        _ => None,
    }
}

fn handle(
    state: &Arc<Mutex<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    let state = &mut *guard;
    state.requests.push(format!("{method} {uri}"));
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    let Some((collection, name)) = split(uri.path()) else {
        return status(StatusCode::NOT_FOUND, "the fake API serves namespaced collections only");
    };
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    match (method, name) {
        (Method::GET, None) if query.get("watch").is_some_and(|w| w == "1" || w == "true") => {
            if state.refusing_watches {
                return status(StatusCode::SERVICE_UNAVAILABLE, "the fake API is refusing watches");
            }
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let selector = selector(&query);
            let (lines, receiver) = mpsc::unbounded_channel();
            if from < state.compacted {
                let gone =
                    json!({"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"});
                let _ = lines.send(event_line("ERROR", &gone));
            } else {
                for (version, of, kind, object) in &state.history {
                    if *version > from && *of == collection && matches(&selector, object) {
                        let _ = lines.send(event_line(kind, object));
                    }
                }
                state.watchers.push(Watcher { collection, selector, lines });
            }
            let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver);
            let stream = futures::StreamExt::map(stream, Ok::<_, std::convert::Infallible>);
            (StatusCode::OK, [("content-type", "application/json")], Body::from_stream(stream)).into_response()
        }
        (Method::GET, None) => {
            let selector = selector(&query);
            let items: Vec<&Value> = (state.objects.get(&collection).into_iter())
                .flat_map(|objects| objects.values())
                .filter(|object| matches(&selector, object))
                .collect();
            let list =
                json!({"kind": "List", "metadata": {"resourceVersion": state.version.to_string()}, "items": items});
            (StatusCode::OK, [("content-type", "application/json")], list.to_string()).into_response()
        }
        (Method::GET, Some(name)) => match state.objects.get(&collection).and_then(|o| o.get(&name)) {
            Some(object) => axum::Json(object.clone()).into_response(),
            None => status(StatusCode::NOT_FOUND, &format!("{name} not found")),
        },
        (Method::PATCH, Some(name)) => {
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return status(StatusCode::BAD_REQUEST, "the patch is not JSON");
            };
            let existing = state.objects.get(&collection).and_then(|o| o.get(&name)).cloned();
            let object = match content_type {
                "application/apply-patch+yaml" => {
                    if !query.contains_key("fieldManager") {
                        return status(StatusCode::BAD_REQUEST, "fieldManager is required for apply");
                    }
                    if patch.pointer("/metadata/name").and_then(Value::as_str) != Some(name.as_str()) {
                        return status(StatusCode::BAD_REQUEST, "the applied object's name is not the path's");
                    }
                    patch
                }
                "application/merge-patch+json" => {
                    let Some(mut object) = existing else {
                        return status(StatusCode::NOT_FOUND, &format!("{name} not found"));
                    };
                    merge(&mut object, &patch);
                    object
                }
                other => return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, &format!("{other} is not a patch type")),
            };
            axum::Json(state.store(&collection, &name, object)).into_response()
        }
        (Method::DELETE, Some(name)) => match state.delete(&collection, &name) {
            Some(object) => axum::Json(object).into_response(),
            None => status(StatusCode::NOT_FOUND, &format!("{name} not found")),
        },
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "the fake API does not do that"),
    }
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in fields {
        if value.is_null() {
            if let Some(object) = target.as_object_mut() {
                object.remove(key);
            }
        } else {
            merge(&mut target[key], value);
        }
    }
}
