//! Discovery through a cluster file (TOML, or JSON when the name ends in `.json`) that every machine can read:
//!
//! ```toml
//! [[worker]]
//! request_addr = "tcp://10.0.0.5:7100"
//! namespace = "prod"          # optional; entries without one belong to every namespace
//! ```
//!
//! Workers started with `--discovery file:PATH` add their own entry (with id, role, model, event endpoint and
//! transfer endpoint if any, for people reading the file) and remove it on a clean exit. An entry left by a killed worker is harmless:
//! its pings go unanswered and the router does not use it. The file is polled, so it may live on NFS.
use super::{Discovery, DiscoveryError, DiscoveryEvent, Registration};
use crate::core::protocol::discovery::{Instance, Role};
use crate::core::trust::ClusterKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

const POLL: Duration = Duration::from_millis(300);

#[derive(Debug, Default, Serialize, Deserialize)]
struct ClusterFile {
    #[serde(default)]
    worker: Vec<Entry>,
}

impl ClusterFile {
    /// The file's text as TOML, or JSON; an error names the format and what is wrong.
    fn parse(text: &str, json: bool) -> Result<Self, (&'static str, String)> {
        if json {
            serde_json::from_str(text).map_err(|e| ("JSON", e.to_string()))
        } else {
            toml::from_str(text).map_err(|e| ("TOML", e.to_string()))
        }
    }
}

/// One worker's entry: a cluster file's line, and the record of a Kubernetes worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Entry {
    pub(super) request_addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) namespace: Option<String>,
    /// Hexadecimal: TOML integers stop at 2^63 and ids are random u64s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transfer_addr: Option<String>,
    /// With a cluster key: the key's tag over `request_addr` and `namespace` (`entry_tag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

pub struct StaticFile {
    path: PathBuf,
    key: Option<ClusterKey>,
}

/// The tag a keyed cluster's entry for `request_addr` (in `namespace`, or every one) must carry, in hex: what
/// a worker writes for itself, and what `dynamo keygen --sign` prints for an entry written by hand.
pub fn entry_tag(key: &ClusterKey, request_addr: &str, namespace: Option<&str>) -> String {
    key.sign(&entry_bytes(request_addr, namespace))
}

fn entry_bytes(request_addr: &str, namespace: Option<&str>) -> Vec<u8> {
    format!("dynamo cluster-file entry\n{request_addr}\n{}", namespace.unwrap_or("*")).into_bytes()
}

impl Entry {
    /// `instance`'s entry, signed with `key` when there is one.
    pub(super) fn of(instance: &Instance, key: Option<&ClusterKey>) -> Self {
        Entry {
            request_addr: instance.request_addr.clone(),
            namespace: Some(instance.namespace.clone()),
            id: Some(format!("{:016x}", instance.id)),
            role: Some(instance.role),
            model: Some(instance.model.clone()),
            event_addr: Some(instance.event_addr.clone()),
            transfer_addr: instance.transfer_addr.clone(),
            mac: key.map(|key| entry_tag(key, &instance.request_addr, Some(&instance.namespace))),
        }
    }

    /// Whether `key` signed it (in constant time).
    pub(super) fn signed_by(&self, key: &ClusterKey) -> bool {
        let Some(mac) = self.mac.as_deref() else { return false };
        key.verify(&entry_bytes(&self.request_addr, self.namespace.as_deref()), mac)
    }
}

/// A cluster file in a directory of its own, removed when dropped: tests' discovery.
#[cfg(test)]
pub struct TempClusterFile {
    pub discovery: StaticFile,
    dir: std::path::PathBuf,
}

#[cfg(test)]
impl Default for TempClusterFile {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
impl TempClusterFile {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("dynamo-cluster-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        Self { discovery: StaticFile::new(dir.join("cluster.toml")), dir }
    }
}

#[cfg(test)]
impl Drop for TempClusterFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl StaticFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path, key: None }
    }

    /// With a key, the entries this process writes are signed, and only signed entries are seen.
    pub fn with_key(self, key: Option<ClusterKey>) -> Self {
        Self { key, ..self }
    }

    fn is_json(&self) -> bool {
        self.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
    }

    fn read(&self) -> Result<ClusterFile, DiscoveryError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ClusterFile::default()),
            Err(source) => return Err(DiscoveryError::Io { action: "read", path: self.path.clone(), source }),
        };
        ClusterFile::parse(&text, self.is_json()).map_err(|(format, message)| DiscoveryError::Parse {
            path: self.path.clone(),
            format,
            message,
        })
    }

    fn write(&self, file: &ClusterFile) -> Result<(), DiscoveryError> {
        let text = if self.is_json() {
            serde_json::to_string_pretty(file).map_err(|e| e.to_string())
        } else {
            toml::to_string(file).map_err(|e| e.to_string())
        }
        .map_err(|message| DiscoveryError::Write { path: self.path.clone(), message })?;
        // Readers must never see half a file: write a sibling, then rename over.
        let temporary = self.path.with_extension(format!("tmp-{}", std::process::id()));
        let io = |action, source| DiscoveryError::Io { action, path: self.path.clone(), source };
        std::fs::write(&temporary, text).map_err(|e| io("write", e))?;
        std::fs::rename(&temporary, &self.path).map_err(|e| io("replace", e))
    }

    /// Read-modify-write under an exclusive lock on a sibling `.lock` file (workers start at once).
    fn update(&self, change: impl FnOnce(&mut ClusterFile)) -> Result<(), DiscoveryError> {
        let lock_path = lock_path(&self.path);
        let io = |action, source| DiscoveryError::Io { action, path: lock_path.clone(), source };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("open the lock of", e))?;
        lock.lock().map_err(|e| io("lock", e))?;
        let mut file = self.read()?;
        change(&mut file);
        self.write(&file)
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

struct Unregister {
    file: StaticFile,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        let id = format!("{:016x}", self.id);
        if let Err(error) = self.file.update(|file| file.worker.retain(|e| e.id.as_ref() != Some(&id))) {
            tracing::warn!("could not take this worker out of the cluster file: {error}");
        }
    }
}

impl Discovery for StaticFile {
    fn register(&self, instance: &Instance) -> Result<Registration, DiscoveryError> {
        let entry = Entry::of(instance, self.key.as_ref());
        self.update(|file| {
            // A worker restarted on the same endpoint replaces its old entry.
            file.worker.retain(|e| e.request_addr != entry.request_addr);
            file.worker.push(entry);
        })?;
        Ok(Registration::new(Box::new(Unregister { file: StaticFile::new(self.path.clone()), id: instance.id })))
    }

    fn watch(&self, namespace: &str) -> mpsc::UnboundedReceiver<DiscoveryEvent> {
        let (events, receiver) = mpsc::unbounded_channel();
        let file = StaticFile::new(self.path.clone());
        let namespace = namespace.to_string();
        let key = self.key.clone();
        tokio::spawn(async move {
            let mut known = BTreeSet::new();
            let mut unsigned_warned = BTreeSet::new();
            let mut seen_version: Option<(SystemTime, u64)> = None;
            let mut reported_error = false;
            loop {
                let version = std::fs::metadata(&file.path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
                if version.is_none() || version != seen_version {
                    match file.read() {
                        Ok(contents) => {
                            seen_version = version;
                            reported_error = false;
                            let now: BTreeSet<String> = contents
                                .worker
                                .into_iter()
                                .filter(|e| e.namespace.as_deref().is_none_or(|n| n == namespace))
                                .filter(|e| {
                                    let signed = key.as_ref().is_none_or(|key| e.signed_by(key));
                                    if !signed && unsigned_warned.insert(e.request_addr.clone()) {
                                        tracing::warn!(
                                            "the cluster file lists {} without this cluster key's mac; ignored (sign a \
                                             hand-written entry with `dynamo keygen --sign ADDR`)",
                                            e.request_addr
                                        );
                                    }
                                    signed
                                })
                                .map(|e| e.request_addr)
                                .collect();
                            for added in now.difference(&known) {
                                if events.send(DiscoveryEvent::Added(added.clone())).is_err() {
                                    return;
                                }
                            }
                            for removed in known.difference(&now) {
                                if events.send(DiscoveryEvent::Removed(removed.clone())).is_err() {
                                    return;
                                }
                            }
                            known = now;
                        }
                        // Keep the last good view; say so once per bad version of the file.
                        Err(error) if !reported_error => {
                            tracing::warn!("{error}; keeping the workers it listed before");
                            reported_error = true;
                        }
                        Err(_) => {}
                    }
                }
                if events.is_closed() {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        });
        receiver
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::core::protocol::discovery::ModelCardSummary;

    /// A decode worker's record with its request and event endpoints on loopback ports `port` and `port + 1`.
    pub(in crate::core::discovery) fn instance(id: u64, port: u16, namespace: &str) -> Instance {
        Instance {
            id,
            role: Role::Decode,
            model: "m".into(),
            namespace: namespace.into(),
            request_addr: format!("tcp://127.0.0.1:{port}"),
            event_addr: format!("tcp://127.0.0.1:{}", port + 1),
            transfer_addr: None,
            card: ModelCardSummary { block_size: 16, context_length: 64, kv_blocks: 8, tokenizer_hash: 0 },
            device: String::new(),
            http_addr: None,
            adapters: Vec::new(),
        }
    }

    async fn next(events: &mut mpsc::UnboundedReceiver<DiscoveryEvent>) -> DiscoveryEvent {
        tokio::time::timeout(Duration::from_secs(5), events.recv()).await.ok().flatten().expect("an event")
    }

    #[tokio::test]
    async fn workers_register_and_leave_and_watchers_see_only_their_namespace() {
        for name in ["cluster.toml", "cluster.json"] {
            let dir = std::env::temp_dir().join(format!("dynamo-discovery-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let discovery = StaticFile::new(dir.join(name));
            let mut events = discovery.watch("a");
            let first = discovery.register(&instance(u64::MAX - 1, 7000, "a")).unwrap();
            assert_eq!(next(&mut events).await, DiscoveryEvent::Added("tcp://127.0.0.1:7000".into()));
            let _other = discovery.register(&instance(2, 7100, "b")).unwrap();
            let _second = discovery.register(&instance(3, 7200, "a")).unwrap();
            assert_eq!(next(&mut events).await, DiscoveryEvent::Added("tcp://127.0.0.1:7200".into()));
            drop(first);
            assert_eq!(next(&mut events).await, DiscoveryEvent::Removed("tcp://127.0.0.1:7000".into()));
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            assert!(text.contains("7100") && text.contains("7200") && !text.contains("7000"), "{text}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[tokio::test]
    async fn a_hand_written_file_needs_only_addresses_and_a_broken_edit_keeps_the_old_view() {
        let dir = std::env::temp_dir().join(format!("dynamo-discovery-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        std::fs::write(&path, "[[worker]]\nrequest_addr = \"tcp://10.0.0.5:7100\"\n").unwrap();
        let discovery = StaticFile::new(path.clone());
        let mut events = discovery.watch("anything");
        assert_eq!(next(&mut events).await, DiscoveryEvent::Added("tcp://10.0.0.5:7100".into()));
        std::fs::write(&path, "[[worker]\nthis is not toml").unwrap();
        assert!(matches!(discovery.read(), Err(DiscoveryError::Parse { format: "TOML", .. })));
        tokio::time::sleep(POLL * 3).await;
        std::fs::write(&path, "[[worker]]\nrequest_addr = \"tcp://10.0.0.6:7100\"\n").unwrap();
        assert_eq!(next(&mut events).await, DiscoveryEvent::Added("tcp://10.0.0.6:7100".into()));
        assert_eq!(next(&mut events).await, DiscoveryEvent::Removed("tcp://10.0.0.5:7100".into()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn specs_other_than_a_file_are_refused_with_the_accepted_form() {
        assert!(super::super::from_spec("file:/tmp/x.toml", None).is_ok());
        let Err(error) = super::super::from_spec("etcd://host", None) else { panic!() };
        assert!(error.to_string().contains("file:PATH"), "{error}");
    }

    #[tokio::test]
    async fn with_a_key_only_signed_entries_are_seen() {
        let dir = std::env::temp_dir().join(format!("dynamo-discovery-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        let key = ClusterKey::generate().unwrap();
        let stranger = ClusterKey::generate().unwrap();
        let signed = |addr: &str, key: &ClusterKey| {
            format!("[[worker]]\nrequest_addr = \"{addr}\"\nmac = \"{}\"\n", entry_tag(key, addr, None))
        };
        // Unsigned, signed with another key, and a signed entry whose address was changed: none is seen.
        let forged = signed("tcp://10.0.0.8:7100", &key).replace("10.0.0.8", "10.6.6.6");
        let text = format!(
            "[[worker]]\nrequest_addr = \"tcp://10.0.0.5:7100\"\n{}{forged}{}",
            signed("tcp://10.0.0.6:7100", &stranger),
            signed("tcp://10.0.0.7:7100", &key)
        );
        std::fs::write(&path, text).unwrap();
        let discovery = StaticFile::new(path.clone()).with_key(Some(key.clone()));
        let mut events = discovery.watch("ns");
        assert_eq!(next(&mut events).await, DiscoveryEvent::Added("tcp://10.0.0.7:7100".into()));
        // A keyed worker signs the entry it writes for itself.
        let _registration = discovery.register(&instance(9, 7200, "ns")).unwrap();
        assert_eq!(next(&mut events).await, DiscoveryEvent::Added("tcp://127.0.0.1:7200".into()));
        let mut unkeyed_events = StaticFile::new(path.clone()).watch("ns");
        let mut everything = Vec::new();
        for _ in 0..5 {
            everything.push(next(&mut unkeyed_events).await);
        }
        assert_eq!(everything.len(), 5, "an open watcher still sees every entry");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(crate::core::protocol::fuzz::config(256))]

        #[test]
        fn any_cluster_file_text_parses_or_is_refused(text in ".{0,200}", entries in proptest::collection::vec(("[a-z:/.0-9]{0,24}", proptest::option::of("[a-z]{0,6}")), 0..4)) {
            let _ = ClusterFile::parse(&text, false);
            let _ = ClusterFile::parse(&text, true);
            let mut toml_text = String::new();
            for (addr, namespace) in &entries {
                toml_text.push_str(&format!("[[worker]]\nrequest_addr = {addr:?}\n"));
                if let Some(namespace) = namespace {
                    toml_text.push_str(&format!("namespace = {namespace:?}\n"));
                }
            }
            let parsed = ClusterFile::parse(&toml_text, false).unwrap();
            proptest::prop_assert_eq!(parsed.worker.len(), entries.len());
            for end in 0..toml_text.len() {
                if toml_text.is_char_boundary(end) {
                    let _ = ClusterFile::parse(&toml_text[..end], false);
                }
            }
        }
    }
}
