//! A collection kept current: list it, then watch from the list's version, as client-go's reflector does.
//! Bookmarks move the version on while nothing changes, so a watch ended by the server resumes where it
//! stopped without a new list; a version the server has compacted away (`410 Gone`) takes a new list.
use super::{KubeClient, KubeError};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What a reflector saw.
#[derive(Debug, Clone)]
pub enum Change {
    /// The whole collection, as listed: everything known before is replaced.
    Listed(Vec<Value>),
    /// An object created or changed.
    Applied(Value),
    Deleted(Value),
}

/// How long one watch asks to last; the server ends it then, and it is opened again from its version.
const WATCH_FOR: Duration = Duration::from_secs(290);
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// A watch that ends sooner than this having said nothing is reopened after a pause.
const QUICK_END: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// Keeps `path` (a collection, e.g. `/apis/discovery.k8s.io/v1/namespaces/NS/endpointslices`, of objects
/// with `selector` when given) current in `changes` until its receiver is dropped. Failures are logged and
/// tried again with a growing pause.
pub async fn reflect(client: Arc<KubeClient>, path: String, selector: Option<String>, changes: mpsc::Sender<Change>) {
    let query: String = match &selector {
        Some(selector) => {
            form_urlencoded::Serializer::new(String::new()).append_pair("labelSelector", selector).finish()
        }
        None => String::new(),
    };
    let mut retry = Retry::default();
    'list: loop {
        if changes.is_closed() {
            return;
        }
        let listed =
            if query.is_empty() { client.get(&path).await } else { client.get(&format!("{path}?{query}")).await };
        let (items, mut version) = match listed.and_then(|list| listed_items(&path, list)) {
            Ok(listed) => listed,
            Err(error) => {
                tokio::time::sleep(retry.failed("list", &path, &error)).await;
                continue;
            }
        };
        if changes.send(Change::Listed(items)).await.is_err() {
            return;
        }
        loop {
            let query = if query.is_empty() { String::new() } else { format!("&{query}") };
            let mut events = match client.watch(&path, &query, &version, WATCH_FOR).await {
                Ok(events) => events,
                Err(error) if error.code() == Some(410) => continue 'list,
                Err(error) => {
                    tokio::time::sleep(retry.failed("watch", &path, &error)).await;
                    continue;
                }
            };
            retry.succeeded(&path);
            let (opened, mut delivered) = (std::time::Instant::now(), false);
            while let Some(event) = events.next().await {
                delivered = true;
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::debug!("Kubernetes: the watch of {path} ended: {error}");
                        break;
                    }
                };
                if event.kind == "ERROR" {
                    // Most often 410: the version is too old to resume from.
                    let code = event.object.get("code").and_then(Value::as_u64);
                    if code != Some(410) {
                        tracing::warn!("Kubernetes: the watch of {path} failed: {}", event.object);
                    }
                    continue 'list;
                }
                if let Some(seen) = resource_version(&event.object) {
                    version = seen.to_string();
                }
                let change = match event.kind.as_str() {
                    "ADDED" | "MODIFIED" => Change::Applied(event.object),
                    "DELETED" => Change::Deleted(event.object),
                    "BOOKMARK" => continue,
                    other => {
                        tracing::debug!("Kubernetes: a watch event of an unknown type {other:?}, skipped");
                        continue;
                    }
                };
                if changes.send(change).await.is_err() {
                    return;
                }
            }
            // A server that ends every watch at once would otherwise be asked again without a pause.
            if !delivered && opened.elapsed() < QUICK_END {
                tokio::time::sleep(FIRST_RETRY).await;
            }
        }
    }
}

/// The pause before the next try, growing while tries fail. A failure is said once per run of them, and its
/// end too: a missing CRD or RBAC rule would otherwise fill the log every 30 seconds.
struct Retry {
    pause: Duration,
    failing: bool,
}

impl Default for Retry {
    fn default() -> Self {
        Self { pause: FIRST_RETRY, failing: false }
    }
}

impl Retry {
    fn failed(&mut self, what: &str, path: &str, error: &KubeError) -> Duration {
        if !self.failing {
            tracing::warn!("Kubernetes: cannot {what} {path}: {error}; trying again");
        }
        self.failing = true;
        let pause = self.pause;
        self.pause = (self.pause * 2).min(LAST_RETRY);
        pause
    }

    fn succeeded(&mut self, path: &str) {
        if self.failing {
            tracing::info!("Kubernetes: watching {path} again");
        }
        *self = Self::default();
    }
}

fn resource_version(object: &Value) -> Option<&str> {
    object.pointer("/metadata/resourceVersion").and_then(Value::as_str)
}

/// A list's items and version.
fn listed_items(path: &str, mut list: Value) -> Result<(Vec<Value>, String), KubeError> {
    let version = resource_version(&list)
        .ok_or_else(|| KubeError::Answer(format!("the list of {path} has no metadata.resourceVersion")))?
        .to_string();
    match list.get_mut("items").map(Value::take) {
        Some(Value::Array(items)) => Ok((items, version)),
        Some(Value::Null) | None => Ok((Vec::new(), version)),
        Some(_) => Err(KubeError::Answer(format!("the list of {path} has items that are not a list"))),
    }
}
