//! The Kubernetes connector: the plan carried out by setting the replicas of the Deployments that run each
//! role (`PATCH …/deployments/NAME/scale`, a JSON merge patch of `spec.replicas`), as Dynamo's planner scales
//! its graph's services. Kubernetes then starts pods, or stops them with SIGTERM, which a worker answers by
//! draining (give the pods a `terminationGracePeriodSeconds` past the workers' `--drain-timeout`). The API
//! is reached as `core::kube` reaches it: a kubeconfig, the pod's service account, or a URL given.
use super::{Connector, Plan, ROLES};
use crate::core::kube::{ApiConfig, KubeClient, KubeError};
use crate::core::protocol::discovery::Role;
use crate::core::top::{ClusterView, PeerState};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct KubernetesSettings {
    /// Where the API is and who the router is to it; its namespace is the Deployments'.
    pub api: ApiConfig,
    /// The Deployment of decode workers, and of prefill workers (if the plan may have any).
    pub decode: String,
    pub prefill: Option<String>,
}

pub struct KubernetesConnector {
    decode: String,
    prefill: Option<String>,
    client: Arc<KubeClient>,
    /// Replicas last set per role, and the error of the last attempt (shown while settling).
    state: Arc<Mutex<Scaled>>,
}

#[derive(Default)]
struct Scaled {
    replicas: [Option<usize>; 2],
    error: Option<String>,
}

impl KubernetesConnector {
    pub fn new(settings: KubernetesSettings) -> Result<Self, KubeError> {
        let client = Arc::new(KubeClient::new(settings.api)?);
        Ok(Self { decode: settings.decode, prefill: settings.prefill, client, state: Arc::default() })
    }

    fn deployment(&self, role: Role) -> Option<&str> {
        match role {
            Role::Prefill => self.prefill.as_deref(),
            _ => Some(&self.decode),
        }
    }
}

impl Connector for KubernetesConnector {
    fn apply(&mut self, plan: &Plan, _view: &ClusterView) {
        for (at, role) in ROLES.into_iter().enumerate() {
            let Some(name) = self.deployment(role) else { continue };
            let replicas = plan.workers(role);
            if self.state.lock().unwrap_or_else(|p| p.into_inner()).replicas[at] == Some(replicas) {
                continue;
            }
            let path = format!("/apis/apps/v1/namespaces/{}/deployments/{name}/scale", self.client.namespace);
            let (client, state, name) = (self.client.clone(), self.state.clone(), name.to_string());
            // Sent in the background: the planner's loop does not wait on the API server. A failed one is
            // sent again at the next plan, which has not been recorded as applied.
            tokio::spawn(async move {
                let patch = serde_json::json!({ "spec": { "replicas": replicas } });
                let outcome = client.merge_patch(&path, &patch).await.map_err(|error| error.to_string());
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Ok(_) => {
                        tracing::info!("planner: deployment {name} scaled to {replicas} replicas");
                        state.replicas[at] = Some(replicas);
                        state.error = None;
                    }
                    Err(error) => {
                        tracing::warn!("planner: cannot scale deployment {name} to {replicas}: {error}");
                        state.error = Some(format!("deployment {name}: {error}"));
                    }
                }
            });
        }
    }

    fn settling(&mut self, view: &ClusterView) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(error) = &state.error {
            return Some(error.clone());
        }
        // Settled once as many workers of each role answer as were last asked for.
        let mut waiting = Vec::new();
        for (at, role) in ROLES.into_iter().enumerate() {
            let Some(replicas) = state.replicas[at] else { continue };
            let alive = (view.workers.values())
                .filter(|w| w.state == PeerState::Alive && w.instance.as_ref().is_some_and(|i| i.role == role))
                .count();
            if alive != replicas {
                waiting.push(format!("{alive} of {replicas} {} workers answer", role.name()));
            }
        }
        (!waiting.is_empty()).then(|| waiting.join(", "))
    }

    /// The Deployments keep their replicas: the cluster outlives its planner.
    fn shutdown(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::kube::Auth;
    use axum::Router;
    use axum::routing::patch;

    /// A fake API server that records each request (method, path, headers that matter, body) and answers
    /// with `status`.
    async fn fake_api(status: u16) -> (String, Arc<Mutex<Vec<String>>>) {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = seen.clone();
        let app = Router::new().route(
            "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale",
            patch(move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let record = record.clone();
                async move {
                    let header =
                        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                    let line = format!("{} {} {} {body}", uri.path(), header("content-type"), header("authorization"));
                    record.lock().unwrap().push(line);
                    (axum::http::StatusCode::from_u16(status).unwrap(), "{}")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    fn api_config(server: String, auth: Auth) -> ApiConfig {
        ApiConfig { server, ca_pem: None, insecure: false, auth, namespace: "llm".into() }
    }

    fn plan(decode: usize, prefill: usize) -> Plan {
        Plan { decode, prefill, forecast: None, reason: String::new() }
    }

    async fn until(seen: &Arc<Mutex<Vec<String>>>, count: usize) -> Vec<String> {
        for _ in 0..500 {
            let now = seen.lock().unwrap().clone();
            if now.len() >= count {
                return now;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the fake API got {:?}", seen.lock().unwrap());
    }

    #[tokio::test]
    async fn a_plan_sets_each_roles_deployment_replicas_once() {
        let (api, seen) = fake_api(200).await;
        let settings = KubernetesSettings {
            api: api_config(api, Auth::Bearer("t0ken".into())),
            decode: "dynamo-decode".into(),
            prefill: Some("dynamo-prefill".into()),
        };
        let mut connector = KubernetesConnector::new(settings).unwrap();
        let view = ClusterView::new("dynamo");
        connector.apply(&plan(3, 1), &view);
        let mut requests = until(&seen, 2).await;
        requests.sort();
        assert_eq!(
            requests,
            [
                r#"/apis/apps/v1/namespaces/llm/deployments/dynamo-decode/scale application/merge-patch+json Bearer t0ken {"spec":{"replicas":3}}"#,
                r#"/apis/apps/v1/namespaces/llm/deployments/dynamo-prefill/scale application/merge-patch+json Bearer t0ken {"spec":{"replicas":1}}"#,
            ]
        );
        // Until the workers answer, it is settling; the same plan again sends nothing.
        while connector.state.lock().unwrap().replicas != [Some(3), Some(1)] {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            connector.settling(&view).as_deref(),
            Some("0 of 3 decode workers answer, 0 of 1 prefill workers answer")
        );
        connector.apply(&plan(3, 1), &view);
        connector.apply(&plan(2, 1), &view);
        let requests = until(&seen, 3).await;
        assert_eq!(requests.len(), 3, "{requests:?}");
        assert!(requests[2].contains("dynamo-decode") && requests[2].ends_with(r#"{"spec":{"replicas":2}}"#));
    }

    #[tokio::test]
    async fn a_refused_scale_is_said_while_settling_and_tried_again() {
        let (api, seen) = fake_api(403).await;
        let settings = KubernetesSettings { api: api_config(api, Auth::None), decode: "d".into(), prefill: None };
        let mut connector = KubernetesConnector::new(settings).unwrap();
        let view = ClusterView::new("dynamo");
        connector.apply(&plan(2, 0), &view);
        until(&seen, 1).await;
        let why = loop {
            if let Some(why) = connector.settling(&view) {
                break why;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert!(why.contains("deployment d") && why.contains("403"), "{why}");
        connector.apply(&plan(2, 0), &view);
        assert!(until(&seen, 2).await[1].ends_with(r#"{"spec":{"replicas":2}}"#));
    }
}
