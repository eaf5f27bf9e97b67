//! Where the Kubernetes API is and who this process is to it: a kubeconfig (`$KUBECONFIG`, else
//! `~/.kube/config`) when there is one, as kubectl does, else the pod's service account (in-cluster).
use super::KubeError;
use base64::Engine as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The service account's files in every pod (token, CA, namespace).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// `https://host:port` (or `http://…`, as `kubectl proxy` serves), without a trailing slash.
    pub server: String,
    /// PEM certificates that sign the API server's; none: the web's public roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The kubeconfig's `insecure-skip-tls-verify`.
    pub insecure: bool,
    pub auth: Auth,
    /// The namespace this process's objects live in, and the one it watches.
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Bearer(String),
    /// Read again for every request: a pod's projected token is rotated by the kubelet.
    BearerFile(PathBuf),
    /// A client certificate and its key, PEM, one after the other.
    ClientCertificate(Vec<u8>),
}

impl ApiConfig {
    /// A kubeconfig when one exists (as kubectl finds it), else the pod's service account. `POD_NAMESPACE`
    /// (the downward API's) overrides the namespace either gives.
    pub fn infer() -> Result<Self, KubeError> {
        let kubeconfig = match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
            // kubectl merges a list; this reads the first file of it.
            Some(list) => std::env::split_paths(&list).next(),
            None => std::env::var_os("HOME").map(|home| Path::new(&home).join(".kube/config")).filter(|p| p.exists()),
        };
        let mut config = match kubeconfig {
            Some(path) => Self::from_kubeconfig(&path)?,
            None => Self::in_cluster(
                std::env::var("KUBERNETES_SERVICE_HOST").ok(),
                std::env::var("KUBERNETES_SERVICE_PORT").ok(),
                Path::new(SERVICE_ACCOUNT_DIR),
            )?,
        };
        if let Ok(namespace) = std::env::var("POD_NAMESPACE")
            && !namespace.is_empty()
        {
            config.namespace = namespace;
        }
        Ok(config)
    }

    /// The pod's service account: the API at `KUBERNETES_SERVICE_HOST:PORT`, its token, CA and namespace
    /// from `dir`.
    pub fn in_cluster(host: Option<String>, port: Option<String>, dir: &Path) -> Result<Self, KubeError> {
        let (Some(host), Some(port)) = (host.filter(|h| !h.is_empty()), port.filter(|p| !p.is_empty())) else {
            return Err(KubeError::Config(
                "no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a pod (KUBERNETES_SERVICE_HOST and \
                 KUBERNETES_SERVICE_PORT are unset): point KUBECONFIG at the cluster's"
                    .into(),
            ));
        };
        // An IPv6 service address needs brackets in a URL.
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let ca = dir.join("ca.crt");
        let ca_pem = std::fs::read(&ca).map_err(|source| KubeError::Io { path: ca, source })?;
        let namespace = std::fs::read_to_string(dir.join("namespace")).map(|n| n.trim().to_string());
        Ok(Self {
            server: format!("https://{host}:{port}"),
            ca_pem: Some(ca_pem),
            insecure: false,
            auth: Auth::BearerFile(dir.join("token")),
            namespace: namespace.ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into()),
        })
    }

    /// The current context of the kubeconfig at `path`: its cluster's server and CA, its user's token or
    /// client certificate, its namespace (`default` when it names none).
    pub fn from_kubeconfig(path: &Path) -> Result<Self, KubeError> {
        let text = std::fs::read_to_string(path).map_err(|source| KubeError::Io { path: path.into(), source })?;
        let file: Kubeconfig = serde_yaml_ng::from_str(&text)
            .map_err(|e| KubeError::Config(format!("the kubeconfig {} is not valid: {e}", path.display())))?;
        let bad = |what: String| KubeError::Config(format!("the kubeconfig {}: {what}", path.display()));
        let Some(current) = file.current_context.as_deref().filter(|c| !c.is_empty()) else {
            return Err(bad("it has no current-context (`kubectl config use-context NAME`)".into()));
        };
        let context = (file.contexts.iter().find(|c| c.name == current))
            .ok_or_else(|| bad(format!("its current-context {current:?} is not among its contexts")))?;
        let context = &context.context;
        let cluster = (file.clusters.iter().find(|c| c.name == context.cluster))
            .ok_or_else(|| bad(format!("context {current:?} names cluster {:?}, which it lacks", context.cluster)))?;
        let cluster = &cluster.cluster;
        let user = match context.user.as_deref() {
            None | Some("") => User::default(),
            Some(name) => (file.users.iter().find(|u| u.name == name))
                .ok_or_else(|| bad(format!("context {current:?} names user {name:?}, which it lacks")))?
                .user
                .clone(),
        };
        // Relative file names in a kubeconfig are relative to the kubeconfig.
        let base = path.parent().unwrap_or(Path::new("."));
        let read = |file: &str| {
            let path = base.join(file);
            std::fs::read(&path).map_err(|source| KubeError::Io { path, source })
        };
        let decode = |field: &str, data: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| bad(format!("its {field} is not base64: {e}")))
        };
        let ca_pem = match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
            (Some(data), _) => Some(decode("certificate-authority-data", data)?),
            (None, Some(file)) => Some(read(file)?),
            (None, None) => None,
        };
        if user.exec.is_some() || user.auth_provider.is_some() {
            return Err(bad(format!(
                "user {:?} signs in through an exec or auth-provider plugin, which this binary does not run: give \
                 it a token or a client certificate, or run `kubectl proxy` and use a kubeconfig whose server is \
                 its http://127.0.0.1:8001",
                context.user.as_deref().unwrap_or_default()
            )));
        }
        let auth = if let Some(token) = user.token.filter(|t| !t.is_empty()) {
            Auth::Bearer(token)
        } else if let Some(file) = user.token_file {
            Auth::BearerFile(base.join(file))
        } else {
            let certificate = match (&user.client_certificate_data, &user.client_certificate) {
                (Some(data), _) => Some(decode("client-certificate-data", data)?),
                (None, Some(file)) => Some(read(file)?),
                (None, None) => None,
            };
            let key = match (&user.client_key_data, &user.client_key) {
                (Some(data), _) => Some(decode("client-key-data", data)?),
                (None, Some(file)) => Some(read(file)?),
                (None, None) => None,
            };
            match (certificate, key) {
                (Some(mut pem), Some(key)) => {
                    pem.push(b'\n');
                    pem.extend_from_slice(&key);
                    Auth::ClientCertificate(pem)
                }
                (None, None) => Auth::None,
                _ => return Err(bad("its user has a client certificate without a key, or a key without one".into())),
            }
        };
        let server = cluster.server.trim_end_matches('/').to_string();
        if !(server.starts_with("https://") || server.starts_with("http://")) {
            return Err(bad(format!("cluster {:?} has server {server:?}, not an http(s) URL", context.cluster)));
        }
        Ok(Self {
            server,
            ca_pem,
            insecure: cluster.insecure_skip_tls_verify,
            auth,
            namespace: context.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into()),
        })
    }
}

#[derive(Deserialize)]
struct Kubeconfig {
    #[serde(rename = "current-context", default)]
    current_context: Option<String>,
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    users: Vec<NamedUser>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    #[serde(default)]
    certificate_authority: Option<String>,
    #[serde(default)]
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "kebab-case")]
struct User {
    #[serde(default)]
    token: Option<String>,
    #[serde(rename = "tokenFile", default)]
    token_file: Option<String>,
    #[serde(default)]
    client_certificate: Option<String>,
    #[serde(default)]
    client_certificate_data: Option<String>,
    #[serde(default)]
    client_key: Option<String>,
    #[serde(default)]
    client_key_data: Option<String>,
    #[serde(default)]
    exec: Option<serde_yaml_ng::Value>,
    #[serde(rename = "auth-provider", default)]
    auth_provider: Option<serde_yaml_ng::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("dynamo-kube-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
current-context: prod
clusters:
- name: other
  cluster: {server: "https://other:6443"}
- name: main
  cluster:
    server: https://10.0.0.1:6443/
    certificate-authority: ca.pem
contexts:
- name: dev
  context: {cluster: other, user: nobody}
- name: prod
  context: {cluster: main, user: ops, namespace: llm}
users:
- name: ops
  user:
    client-certificate-data: Q0VSVA==
    client-key-data: S0VZ
"#;

    #[test]
    fn a_kubeconfigs_current_context_gives_server_ca_identity_and_namespace() {
        let dir = Dir::new();
        dir.write("ca.pem", "CA");
        let path = dir.write("config", KUBECONFIG);
        let config = ApiConfig::from_kubeconfig(&path).unwrap();
        assert_eq!(
            config,
            ApiConfig {
                server: "https://10.0.0.1:6443".into(),
                ca_pem: Some(b"CA".to_vec()),
                insecure: false,
                auth: Auth::ClientCertificate(b"CERT\nKEY".to_vec()),
                namespace: "llm".into(),
            }
        );
        let token = KUBECONFIG.replace("client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ", "tokenFile: t");
        let config = ApiConfig::from_kubeconfig(&dir.write("token", &token)).unwrap();
        assert_eq!(config.auth, Auth::BearerFile(dir.0.join("t")));
    }

    #[test]
    fn what_a_kubeconfig_lacks_or_cannot_do_is_named() {
        let dir = Dir::new();
        let ca = dir.write("ca.pem", "CA");
        let error = |text: &str| ApiConfig::from_kubeconfig(&dir.write("config", text)).unwrap_err().to_string();
        let exec = KUBECONFIG.replace(
            "client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ",
            "exec: {command: aws, args: [eks, get-token]}",
        );
        assert!(error(&exec).contains("exec or auth-provider plugin"), "{}", error(&exec));
        assert!(error(&KUBECONFIG.replace("prod\nclusters", "gone\nclusters")).contains("\"gone\" is not among"));
        assert!(error(&KUBECONFIG.replace("current-context: prod", "")).contains("no current-context"));
        assert!(error(&KUBECONFIG.replace("S0VZ", "ab$c")).contains("client-key-data is not base64"));
        assert!(error(&KUBECONFIG.replace("client-key-data: S0VZ", "")).contains("without a key"));
        // The CA file it names is missing.
        std::fs::remove_file(ca).unwrap();
        assert!(error(KUBECONFIG).contains("ca.pem"), "{}", error(KUBECONFIG));
        assert!(error("{{{").contains("is not valid"));
    }

    #[test]
    fn in_a_pod_the_service_account_is_used() {
        let dir = Dir::new();
        dir.write("ca.crt", "CA");
        dir.write("namespace", "serving\n");
        let config = ApiConfig::in_cluster(Some("fd00::1".into()), Some("443".into()), &dir.0).unwrap();
        assert_eq!(config.server, "https://[fd00::1]:443");
        assert_eq!(config.auth, Auth::BearerFile(dir.0.join("token")));
        assert_eq!((config.namespace.as_str(), config.ca_pem.as_deref()), ("serving", Some(&b"CA"[..])));
        let outside = ApiConfig::in_cluster(None, Some("443".into()), &dir.0).unwrap_err().to_string();
        assert!(outside.contains("not in a pod"), "{outside}");
    }
}
