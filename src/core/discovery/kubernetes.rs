//! Discovery through the Kubernetes API (`--discovery k8s[:SELECTOR]`), on Dynamo's model: no lease and no
//! heartbeat to the API. Each worker writes its entry (the cluster file's, signed the same way) as a
//! `DynamoWorker` object (`dynamo.rs/v1alpha1`) owned by its pod, so Kubernetes deletes it with the pod; its
//! liveness is its pod's readiness in the EndpointSlices of the Services labelled SELECTOR
//! (`dynamo.rs/discovery=enabled` by default). A watcher sees a worker iff its pod is ready and its object
//! holds a valid entry; an update that is not valid keeps the last valid entry rather than dropping a live
//! worker.
//!
//! One object per worker (`POD-ID`), where Dynamo keeps one per pod holding all of its workers: nothing
//! is shared between two writers, so a plain apply writes it and a delete is a worker's goodbye.
//!
//! A worker reads who it is from the downward API's `POD_NAME`, `POD_UID` and `POD_NAMESPACE` (and `POD_IP`
//! when it listens on every interface); the API from a kubeconfig, or in a pod its service account.
use super::static_file::Entry;
use super::{Discovery, DiscoveryError, DiscoveryEvent, Registration};
use crate::core::AbortOnDrop;
use crate::core::kube::{Change, KubeClient, reflect};
use crate::core::protocol::discovery::{Instance, endpoint_ip, split_endpoint};
use crate::core::trust::ClusterKey;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub const API_VERSION: &str = "dynamo.rs/v1alpha1";
pub const KIND: &str = "DynamoWorker";
pub const PLURAL: &str = "dynamoworkers";
/// Labels the Services whose EndpointSlices say which worker pods are ready.
pub const DEFAULT_SELECTOR: &str = "dynamo.rs/discovery=enabled";
/// The field manager of a worker's server-side apply.
const MANAGER: &str = "dynamo-worker";
/// Changes within this long of the first are seen as one: a rollout's burst of slice updates becomes one
/// diff.
const DEBOUNCE: Duration = Duration::from_millis(250);
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Invalid record versions remembered so each is warned about once.
const MAX_WARNED: usize = 4096;
const LAST_RETRY: Duration = Duration::from_secs(30);

pub struct Kubernetes {
    client: Arc<KubeClient>,
    selector: String,
    key: Option<ClusterKey>,
}

fn workers_path(namespace: &str) -> String {
    format!("/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}")
}

fn slices_path(namespace: &str) -> String {
    format!("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices")
}

impl Kubernetes {
    pub fn new(client: KubeClient, selector: Option<&str>, key: Option<ClusterKey>) -> Self {
        let selector = selector.filter(|s| !s.is_empty()).unwrap_or(DEFAULT_SELECTOR).to_string();
        Self { client: Arc::new(client), selector, key }
    }

    /// The object that holds `instance`'s entry, owned by `pod`.
    fn object(&self, instance: &Instance, pod: &Pod) -> Result<(String, Value), DiscoveryError> {
        let request_addr = reachable(&instance.request_addr, pod.ip.as_deref())?;
        let instance = Instance { request_addr, ..instance.clone() };
        let name = format!("{}-{:016x}", pod.name, instance.id);
        // An object's name is a DNS subdomain.
        if name.len() > 253 {
            return Err(DiscoveryError::Kube(format!("the pod name {:?} is too long to name a record", pod.name)));
        }
        let entry = serde_json::to_value(Entry::of(&instance, self.key.as_ref()))
            .map_err(|e| DiscoveryError::Kube(format!("cannot write the record: {e}")))?;
        let object = json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": self.client.namespace,
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod.name,
                    "uid": pod.uid,
                    "controller": false,
                    "blockOwnerDeletion": false,
                }],
            },
            "spec": entry,
        });
        Ok((format!("{}/{name}", workers_path(&self.client.namespace)), object))
    }
}

/// Who this process's pod is, from the downward API.
struct Pod {
    name: String,
    uid: String,
    ip: Option<String>,
}

impl Pod {
    fn from_env() -> Result<Self, DiscoveryError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (var("POD_NAME"), var("POD_UID")) {
            (Some(name), Some(uid)) => Ok(Self { name, uid, ip: var("POD_IP") }),
            _ => Err(DiscoveryError::Kube(
                "this process needs POD_NAME and POD_UID from the downward API (env valueFrom fieldRef metadata.name \
                 and metadata.uid) to own its record"
                    .into(),
            )),
        }
    }
}

/// `endpoint` as others reach it: one bound to every interface is reached at the pod's IP.
fn reachable(endpoint: &str, pod_ip: Option<&str>) -> Result<String, DiscoveryError> {
    let Some((_, port)) = split_endpoint(endpoint) else {
        return Err(DiscoveryError::Kube(format!("cannot publish {endpoint:?}: not tcp://HOST:PORT")));
    };
    if !endpoint_ip(endpoint).is_some_and(|ip| ip.is_unspecified()) {
        return Ok(endpoint.to_string());
    }
    match pod_ip.map(|ip| ip.parse::<std::net::IpAddr>()) {
        Some(Ok(ip)) => Ok(crate::core::protocol::discovery::tcp_endpoint(ip, port)),
        Some(Err(_)) => Err(DiscoveryError::Kube(format!("POD_IP {:?} is not an IP address", pod_ip.unwrap_or("")))),
        None => Err(DiscoveryError::Kube(format!(
            "{endpoint} listens on every interface: set POD_IP from the downward API (fieldRef status.podIP) so \
             routers know where to reach it, or pass --host with the pod's IP"
        ))),
    }
}

/// How long a worker leaving waits for its record's delete.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);

impl Kubernetes {
    fn register_as(&self, instance: &Instance, pod: &Pod) -> Result<Registration, DiscoveryError> {
        let (path, object) = self.object(instance, pod)?;
        let (client, at) = (self.client.clone(), path.clone());
        // Written in the background, as the other backends announce: a worker is serving before the API
        // has its record, and one the API refuses (no CRD, no RBAC) says why and tries again.
        let apply = tokio::spawn(async move {
            let mut pause = FIRST_RETRY;
            let mut said = false;
            loop {
                match client.apply(&at, MANAGER, &object).await {
                    Ok(_) => {
                        tracing::info!("registered with Kubernetes as {at} on {}", client.server());
                        return;
                    }
                    Err(error) => {
                        if !said {
                            tracing::warn!(
                                "cannot write this worker's record {at}: {error}; trying again (is the DynamoWorker \
                                 CRD installed, and may this pod's service account apply it?)"
                            );
                            said = true;
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(LAST_RETRY);
                    }
                }
            }
        });
        let client = self.client.clone();
        // A record left behind (a killed worker's) goes with its pod; until then its pings go unanswered.
        let goodbye = async move {
            match tokio::time::timeout(GOODBYE_TIMEOUT, client.delete(&path)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!("cannot delete this worker's record {path}: {error}"),
                Err(_) => tracing::warn!("cannot delete this worker's record {path} within {GOODBYE_TIMEOUT:?}"),
            }
        };
        Ok(Registration::with_goodbye(Box::new(AbortOnDrop(apply)), goodbye))
    }
}

impl Discovery for Kubernetes {
    fn register(&self, instance: &Instance) -> Result<Registration, DiscoveryError> {
        self.register_as(instance, &Pod::from_env()?)
    }

    fn watch(&self, namespace: &str) -> mpsc::UnboundedReceiver<DiscoveryEvent> {
        let (events, receiver) = mpsc::unbounded_channel();
        let (workers_sender, workers) = mpsc::channel(64);
        let (slices_sender, slices) = mpsc::channel(64);
        let at = &self.client.namespace;
        let reflectors = [
            AbortOnDrop(tokio::spawn(reflect(self.client.clone(), workers_path(at), None, workers_sender))),
            AbortOnDrop(tokio::spawn(reflect(
                self.client.clone(),
                slices_path(at),
                Some(self.selector.clone()),
                slices_sender,
            ))),
        ];
        let view = View::new(namespace, self.key.clone());
        tokio::spawn(async move {
            let _reflectors = reflectors;
            view.run(workers, slices, events).await
        });
        receiver
    }
}

/// What a watcher knows: the valid records and which pods are ready.
struct View {
    namespace: String,
    key: Option<ClusterKey>,
    /// Object name → the owning pod's uid and the entry, as last valid.
    records: HashMap<String, (String, Entry)>,
    /// Slice name → the uids of the pods it says are ready.
    ready: HashMap<String, HashSet<String>>,
    /// (object name, version) of invalid records already warned about.
    warned: HashSet<(String, String)>,
}

impl View {
    fn new(namespace: &str, key: Option<ClusterKey>) -> Self {
        Self {
            namespace: namespace.to_string(),
            key,
            records: HashMap::new(),
            ready: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    async fn run(
        mut self,
        mut workers: mpsc::Receiver<Change>,
        mut slices: mpsc::Receiver<Change>,
        events: mpsc::UnboundedSender<DiscoveryEvent>,
    ) {
        let mut known = BTreeSet::new();
        loop {
            tokio::select! {
                _ = events.closed() => return,
                Some(change) = workers.recv() => self.worker_changed(change),
                Some(change) = slices.recv() => self.slice_changed(change),
                else => return,
            }
            let settled = tokio::time::sleep(DEBOUNCE);
            tokio::pin!(settled);
            loop {
                tokio::select! {
                    _ = &mut settled => break,
                    Some(change) = workers.recv() => self.worker_changed(change),
                    Some(change) = slices.recv() => self.slice_changed(change),
                }
            }
            let now = self.visible();
            let added = now.difference(&known).map(|a| DiscoveryEvent::Added(a.clone()));
            let removed = known.difference(&now).map(|r| DiscoveryEvent::Removed(r.clone()));
            for event in added.chain(removed) {
                if events.send(event).is_err() {
                    return;
                }
            }
            known = now;
        }
    }

    fn worker_changed(&mut self, change: Change) {
        match change {
            Change::Listed(objects) => {
                let mut records = HashMap::new();
                for object in objects {
                    let name = object_name(&object);
                    if let Some(record) = self.record(&object).or_else(|| self.records.remove(&name)) {
                        records.insert(name, record);
                    }
                }
                self.records = records;
            }
            Change::Applied(object) => {
                if let Some(record) = self.record(&object) {
                    self.records.insert(object_name(&object), record);
                }
            }
            Change::Deleted(object) => {
                self.records.remove(&object_name(&object));
            }
        }
    }

    fn slice_changed(&mut self, change: Change) {
        match change {
            Change::Listed(slices) => self.ready = slices.iter().map(|s| (object_name(s), ready_pods(s))).collect(),
            Change::Applied(slice) => {
                self.ready.insert(object_name(&slice), ready_pods(&slice));
            }
            Change::Deleted(slice) => {
                self.ready.remove(&object_name(&slice));
            }
        }
    }

    /// The owning pod's uid and the entry of a valid record; an invalid one is warned about once.
    fn record(&mut self, object: &Value) -> Option<(String, Entry)> {
        let owner = object
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .and_then(|owners| owners.iter().find(|o| o.get("kind").and_then(Value::as_str) == Some("Pod")))
            .and_then(|pod| pod.get("uid").and_then(Value::as_str));
        let entry = object.get("spec").map(|spec| serde_json::from_value::<Entry>(spec.clone()));
        let why = match (owner, entry) {
            (None, _) => "no owning Pod",
            (_, None) => "no spec",
            (_, Some(Err(_))) => "a spec that is not a worker's entry",
            (Some(_), Some(Ok(entry))) if self.key.as_ref().is_some_and(|key| !entry.signed_by(key)) => {
                "an entry without this cluster key's mac"
            }
            (Some(owner), Some(Ok(entry))) => return Some((owner.to_string(), entry)),
        };
        let version = object.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or_default();
        // Bounded: whoever may write records could write invalid ones without end.
        if self.warned.len() >= MAX_WARNED {
            self.warned.clear();
        }
        if self.warned.insert((object_name(object), version.to_string())) {
            tracing::warn!(
                "the worker record {} has {why}; ignored (a valid one before it is kept)",
                object_name(object)
            );
        }
        None
    }

    /// The request endpoints of this namespace's workers whose pods are ready.
    fn visible(&self) -> BTreeSet<String> {
        let ready: HashSet<&String> = self.ready.values().flatten().collect();
        (self.records.values())
            .filter(|(pod, entry)| {
                ready.contains(pod) && entry.namespace.as_deref().is_none_or(|n| n == self.namespace)
            })
            .map(|(_, entry)| entry.request_addr.clone())
            .collect()
    }
}

fn object_name(object: &Value) -> String {
    object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string()
}

/// The uids of the pods an EndpointSlice says are ready (a missing `ready` means ready, as the API says).
fn ready_pods(slice: &Value) -> HashSet<String> {
    let endpoints = slice.get("endpoints").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    (endpoints.iter())
        .filter(|e| e.pointer("/conditions/ready").and_then(Value::as_bool).unwrap_or(true))
        .filter_map(|e| e.get("targetRef"))
        .filter(|target| target.get("kind").and_then(Value::as_str) == Some("Pod"))
        .filter_map(|target| target.get("uid").and_then(Value::as_str).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::discovery::static_file::tests::instance;
    use crate::core::kube::fake::FakeApi;
    use crate::core::kube::{ApiConfig, Auth};

    const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices";
    const WORKERS: &str = "/apis/dynamo.rs/v1alpha1/namespaces/llm/dynamoworkers";

    fn kubernetes(api: &FakeApi, key: Option<ClusterKey>) -> Kubernetes {
        let config = ApiConfig {
            server: api.url.clone(),
            ca_pem: None,
            insecure: false,
            auth: Auth::Bearer("t0ken".into()),
            namespace: "llm".into(),
        };
        Kubernetes::new(KubeClient::new(config).unwrap(), None, key)
    }

    fn pod(name: &str) -> Pod {
        Pod { name: name.into(), uid: format!("uid-{name}"), ip: None }
    }

    /// The EndpointSlice of a Service labelled for discovery, listing `pods` (name, ready).
    fn slice(name: &str, pods: &[(&str, bool)]) -> Value {
        let endpoints: Vec<Value> = (pods.iter())
            .map(|(pod, ready)| {
                json!({
                    "addresses": ["10.0.0.1"],
                    "conditions": {"ready": ready},
                    "targetRef": {"kind": "Pod", "name": pod, "uid": format!("uid-{pod}")},
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"dynamo.rs/discovery": "enabled"}},
            "endpoints": endpoints,
        })
    }

    async fn next(events: &mut mpsc::UnboundedReceiver<DiscoveryEvent>) -> DiscoveryEvent {
        tokio::time::timeout(Duration::from_secs(10), events.recv()).await.ok().flatten().expect("an event")
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} did not happen within 10 s");
    }

    fn added(port: u16) -> DiscoveryEvent {
        DiscoveryEvent::Added(format!("tcp://127.0.0.1:{port}"))
    }

    fn removed(port: u16) -> DiscoveryEvent {
        DiscoveryEvent::Removed(format!("tcp://127.0.0.1:{port}"))
    }

    #[tokio::test]
    async fn a_worker_is_seen_while_its_pod_is_ready_and_until_it_leaves() {
        let api = FakeApi::start().await;
        let discovery = kubernetes(&api, None);
        let registration = discovery.register_as(&instance(7, 7100, "dynamo"), &pod("w0")).unwrap();
        let name = "w0-0000000000000007";
        until("the record's apply", || api.object(WORKERS, name).is_some()).await;
        let record = api.object(WORKERS, name).unwrap();
        assert_eq!(record["spec"]["request_addr"], "tcp://127.0.0.1:7100");
        assert_eq!(record["metadata"]["ownerReferences"][0]["uid"], "uid-w0", "{record}");
        let apply = api.requests().into_iter().find(|r| r.starts_with("PATCH")).unwrap();
        assert!(apply.contains("fieldManager=dynamo-worker&force=true"), "{apply}");

        // Not ready, then ready: seen only from then; another namespace's worker never.
        api.put(SLICES, slice("decode-1", &[("w0", false)]));
        let _other = discovery.register_as(&instance(8, 7200, "other"), &pod("w1")).unwrap();
        let mut events = discovery.watch("dynamo");
        api.put(SLICES, slice("decode-1", &[("w0", true), ("w1", true)]));
        assert_eq!(next(&mut events).await, added(7100));
        api.put(SLICES, slice("decode-1", &[("w0", false), ("w1", true)]));
        assert_eq!(next(&mut events).await, removed(7100));
        api.put(SLICES, slice("decode-1", &[("w0", true), ("w1", true)]));
        assert_eq!(next(&mut events).await, added(7100));
        // A clean exit deletes the record.
        drop(registration);
        assert_eq!(next(&mut events).await, removed(7100));
        assert!(api.object(WORKERS, name).is_none());
    }

    #[tokio::test]
    async fn an_invalid_update_keeps_the_last_valid_record_and_unsigned_ones_are_not_seen() {
        let api = FakeApi::start().await;
        let key = ClusterKey::generate().unwrap();
        let discovery = kubernetes(&api, Some(key.clone()));
        let _w0 = discovery.register_as(&instance(1, 7100, "dynamo"), &pod("w0")).unwrap();
        api.put(SLICES, slice("decode-1", &[("w0", true), ("w1", true), ("w2", true)]));
        let mut events = discovery.watch("dynamo");
        assert_eq!(next(&mut events).await, added(7100));
        // Someone breaks w0's record; it stays seen.
        let name = "w0-0000000000000001";
        let mut broken = api.object(WORKERS, name).unwrap();
        broken["spec"] = json!({"request_addr": 5});
        api.put(WORKERS, broken);
        // An unsigned record of a ready pod is not seen; a signed one is, and is the next event.
        let unsigned = kubernetes(&api, None);
        let _w1 = unsigned.register_as(&instance(2, 7200, "dynamo"), &pod("w1")).unwrap();
        until("the unsigned apply", || api.names(WORKERS).len() == 2).await;
        let _w2 = discovery.register_as(&instance(3, 7300, "dynamo"), &pod("w2")).unwrap();
        assert_eq!(next(&mut events).await, added(7300));
        // The next change is w2's own: w0 was not dropped meanwhile.
        api.put(SLICES, slice("decode-1", &[("w0", true), ("w1", true), ("w2", false)]));
        assert_eq!(next(&mut events).await, removed(7300));
        // Deleting the broken record does remove it.
        api.remove(WORKERS, name);
        assert_eq!(next(&mut events).await, removed(7100));
    }

    fn lists(api: &FakeApi, collection: &str) -> usize {
        api.requests().iter().filter(|r| r.starts_with(&format!("GET {collection}")) && !r.contains("watch=1")).count()
    }

    #[tokio::test]
    async fn watches_resume_from_their_version_and_list_again_after_410() {
        let api = FakeApi::start().await;
        let discovery = kubernetes(&api, None);
        let _w0 = discovery.register_as(&instance(1, 7100, "dynamo"), &pod("w0")).unwrap();
        until("the record's apply", || !api.names(WORKERS).is_empty()).await;
        let mut events = discovery.watch("dynamo");
        until("both watches", || api.watching() == 2).await;
        api.put(SLICES, slice("s", &[("w0", true)]));
        assert_eq!(next(&mut events).await, added(7100));

        // A dropped watch resumes from its version: what happened meanwhile is seen, with no new list.
        api.drop_watches();
        api.put(SLICES, slice("s", &[("w0", false)]));
        assert_eq!(next(&mut events).await, removed(7100));
        assert_eq!(lists(&api, SLICES), 1);

        // A bookmark moves the version on, so a watch resumed after the history is compacted needs no list.
        until("both watches again", || api.watching() == 2).await;
        api.put(WORKERS, json!({"metadata": {"name": "unrelated"}}));
        api.bookmark();
        let watches = api.requests().len();
        api.drop_watches();
        until("the watches reopened", || api.watching() == 2).await;
        api.compact();
        api.drop_watches();
        until("the watches reopened", || api.watching() == 2).await;
        assert_eq!((lists(&api, SLICES), lists(&api, WORKERS)), (1, 1), "{:?}", &api.requests()[watches..]);

        // Without one, a compacted version is 410 Gone: listed again, and nothing is missed.
        api.put(SLICES, slice("s", &[("w0", true)]));
        assert_eq!(next(&mut events).await, added(7100));
        api.refuse_watches(true);
        api.drop_watches();
        api.put(SLICES, slice("s", &[("w0", false)]));
        api.compact();
        api.refuse_watches(false);
        assert_eq!(next(&mut events).await, removed(7100));
        assert_eq!(lists(&api, SLICES), 2);
    }

    #[test]
    fn a_worker_on_every_interface_is_published_at_its_pods_ip() {
        assert_eq!(reachable("tcp://10.1.2.3:7100", None).unwrap(), "tcp://10.1.2.3:7100");
        assert_eq!(reachable("tcp://0.0.0.0:7100", Some("10.1.2.3")).unwrap(), "tcp://10.1.2.3:7100");
        assert_eq!(reachable("tcp://[::]:7100", Some("fd00::5")).unwrap(), "tcp://[fd00::5]:7100");
        let error = reachable("tcp://0.0.0.0:7100", None).unwrap_err().to_string();
        assert!(error.contains("set POD_IP"), "{error}");
        assert!(reachable("tcp://0.0.0.0:7100", Some("pod")).unwrap_err().to_string().contains("not an IP"));
    }
}
