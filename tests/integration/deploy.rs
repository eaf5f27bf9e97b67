//! `deploy/kubernetes`: every manifest parses, and what the binary relies on in them agrees with the binary:
//! its flags, the record's resource, the discovery Service's label, the downward-API variables, the RBAC
//! verbs each role's calls need, the ports its probes and Service name, the grace period past the drain.
use clap::Parser;
use dynamo::core::discovery::{KUBE_API_VERSION, KUBE_KIND, KUBE_PLURAL, KUBE_SELECTOR};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// Every document of every manifest the kustomizations list (the cluster's, and the gateway's).
fn documents() -> Vec<Value> {
    let mut documents = Vec::new();
    for dir in [Path::new(DIR).to_path_buf(), Path::new(DIR).join("gateway")] {
        let kustomization = yaml(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())[0].clone();
        let files = kustomization["resources"].as_array().expect("the kustomization lists resources");
        for file in files {
            let path = dir.join(file.as_str().expect("a file name"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            documents.extend(yaml(&text));
        }
        let listed = (std::fs::read_dir(&dir).unwrap())
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "yaml"))
            .count();
        assert_eq!(listed, files.len() + 1, "every manifest of {} is in its kustomization", dir.display());
    }
    documents
}

fn yaml(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("each document is valid YAML"))
        .filter(|document| !document.is_null())
        .collect()
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    (of_kind(documents, kind).into_iter())
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| a == flag).and_then(|at| args.get(at + 1)).map(String::as_str)
}

/// Whether the Role bound to `account` allows `verb` on `resource` of `group`.
fn allowed(documents: &[Value], account: &str, group: &str, resource: &str, verb: &str) -> bool {
    of_kind(documents, "RoleBinding")
        .into_iter()
        .filter(|b| {
            b["subjects"].as_array().unwrap().iter().any(|s| s["kind"] == "ServiceAccount" && s["name"] == account)
        })
        .map(|b| named(documents, "Role", b["roleRef"]["name"].as_str().unwrap()))
        .flat_map(|role| role["rules"].as_array().unwrap().iter())
        .any(|rule| {
            let has = |field: &str, value: &str| rule[field].as_array().unwrap().iter().any(|v| v == value || v == "*");
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
}

#[test]
fn the_crd_is_the_resource_workers_write() {
    let documents = documents();
    let crd = named(&documents, "CustomResourceDefinition", &format!("{KUBE_PLURAL}.dynamo.rs"));
    let (group, version) = KUBE_API_VERSION.split_once('/').unwrap();
    assert_eq!(crd["spec"]["group"], group);
    assert_eq!(crd["spec"]["names"]["kind"], KUBE_KIND);
    assert_eq!(crd["spec"]["names"]["plural"], KUBE_PLURAL);
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert!(versions.iter().any(|v| v["name"] == version && v["served"] == true && v["storage"] == true), "{crd}");
}

#[test]
fn every_container_is_one_the_binary_runs_with_what_its_discovery_and_planner_need() {
    let documents = documents();
    let deployments = of_kind(&documents, "Deployment");
    assert!(deployments.len() >= 3);
    for deployment in &deployments {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = &deployment["spec"]["template"]["spec"];
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        for (key, value) in deployment["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&labels[key], value, "{name}: its selector selects its pods");
        }
        let account = pod["serviceAccountName"].as_str().unwrap_or_else(|| panic!("{name} has a service account"));
        for container in pod["containers"].as_array().unwrap() {
            container_runs(&documents, deployment, container, account);
        }
    }
}

/// One container of `deployment`: its args are the binary's, with what its role needs.
fn container_runs(documents: &[Value], deployment: &Value, container: &Value, account: &str) {
    let name = format!("{}/{}", deployment["metadata"]["name"].as_str().unwrap(), container["name"].as_str().unwrap());
    let pod = &deployment["spec"]["template"]["spec"];
    let args = args_of(container);
    // As the kubelet expands $(POD_IP) from the container's environment.
    let expanded = args.iter().map(|a| a.replace("$(POD_IP)", "10.0.0.7"));
    if let Err(error) = dynamo::cmd::Cli::try_parse_from(std::iter::once("dynamo".to_string()).chain(expanded)) {
        panic!("{name}'s args are not the binary's: {error}");
    }
    let role = args[0].as_str();
    assert_eq!(flag(&args, "--discovery"), Some("k8s"), "{name}");
    let env = container["env"].as_array().unwrap();
    for (variable, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_UID", "metadata.uid"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
    ] {
        assert!(
            env.iter().any(|e| e["name"] == variable && e["valueFrom"]["fieldRef"]["fieldPath"] == field),
            "{name} lacks {variable} from {field}"
        );
    }
    // Every role registers (workers, and routers as event-plane members) and leaves.
    for verb in ["patch", "delete"] {
        assert!(allowed(documents, account, "dynamo.rs", KUBE_PLURAL, verb), "{name} may not {verb} its record");
    }
    if role == "route" {
        for (group, resource) in [("dynamo.rs", KUBE_PLURAL), ("discovery.k8s.io", "endpointslices")] {
            for verb in ["list", "watch"] {
                assert!(allowed(documents, account, group, resource, verb), "{name} may not {verb} {resource}");
            }
        }
    }
    if flag(&args, "--planner-connector") == Some("kubernetes") {
        assert!(allowed(documents, account, "apps", "deployments/scale", "patch"), "{name}'s planner may not scale");
        for scaled in ["--kube-decode-deployment", "--kube-prefill-deployment"].iter().filter_map(|f| flag(&args, f)) {
            named(documents, "Deployment", scaled);
        }
    }
    if let Some(key) = flag(&args, "--cluster-key-file") {
        let mounts = container["volumeMounts"].as_array().unwrap();
        assert!(
            mounts.iter().any(|m| key.starts_with(m["mountPath"].as_str().unwrap())),
            "{name}: {key} is not mounted"
        );
    }
    let ports = container["ports"].as_array().unwrap();
    let port = |named: &str| ports.iter().find(|p| p["name"] == named).map(|p| p["containerPort"].as_u64().unwrap());
    let probe = container["readinessProbe"].as_object().unwrap_or_else(|| panic!("{name} has a readiness probe"));
    let probed = probe.values().find_map(|p| p["port"].as_str()).expect("the probe names its port");
    assert!(port(probed).is_some(), "{name} probes a port it does not declare: {probed}");
    let port_of = |flag_name: &str| flag(&args, flag_name).map(|p| p.parse::<u64>().unwrap());
    if role == "route" || role == "run" {
        assert_eq!(port("http"), port_of("--http-port"), "{name}");
    }
    if role == "route" {
        assert_eq!(port("epp"), port_of("--epp-port"), "{name}");
        assert_eq!(port("epp-health"), port_of("--epp-health-port"), "{name}");
    } else if role == "run" {
        assert_eq!(flag(&args, "--http-host"), Some("0.0.0.0"), "{name}: its planes listen where its HTTP does");
    } else {
        for (named, flag_name) in [
            ("request", "--request-port"),
            ("event", "--event-port"),
            ("transfer", "--transfer-port"),
            ("metrics", "--metrics-port"),
        ] {
            assert_eq!(port(named), flag(&args, flag_name).map(|p| p.parse().unwrap()), "{name}: {named}");
        }
        let drain: f64 = flag(&args, "--drain-timeout").unwrap_or("30").parse().unwrap();
        let grace = pod["terminationGracePeriodSeconds"].as_f64().unwrap_or(30.0);
        assert!(grace > drain, "{name}: a grace period of {grace} s cuts a drain of {drain} s");
        assert_eq!(flag(&args, "--host"), Some("0.0.0.0"), "{name} listens where peers reach it (its POD_IP)");
        // Ready while it serves, unready once it drains: only its /health says so (its sockets stay open).
        assert_eq!(probe["httpGet"]["path"], "/health", "{name}");
        assert_eq!(probed, "metrics", "{name}");
    }
    // A frontend beside the worker, where its record sends the picker's requests, is in the same pod.
    if let Some(http) = flag(&args, "--http-addr") {
        let port = http.strip_prefix("$(POD_IP):").unwrap_or_else(|| panic!("{name}: {http} is not the pod's"));
        let beside = pod["containers"].as_array().unwrap().iter().map(args_of).any(|other| {
            other[0] == "route"
                && flag(&other, "--http-port") == Some(port)
                && flag(&other, "--http-host") == Some("0.0.0.0")
        });
        assert!(beside, "{name}: no frontend of its pod listens on {port}");
    }
}

fn args_of(container: &Value) -> Vec<String> {
    (container["args"].as_array().unwrap().iter()).map(|a| a.as_str().expect("args are strings").to_string()).collect()
}

fn selects(selector: &serde_json::Map<String, Value>, deployment: &Value) -> bool {
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    selector.iter().all(|(k, v)| &labels[k] == v)
}

fn role(deployment: &Value) -> &str {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"][0].as_str().unwrap()
}

/// The container port named `name` of `deployment`'s pods.
fn named_port(deployment: &Value, name: &str) -> Option<u64> {
    let ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"].as_array()?;
    ports.iter().find(|p| p["name"] == name).and_then(|p| p["containerPort"].as_u64())
}

#[test]
fn the_discovery_services_select_every_worker_and_only_workers() {
    let documents = documents();
    let (key, value) = KUBE_SELECTOR.split_once('=').unwrap();
    let services: Vec<&Value> =
        of_kind(&documents, "Service").into_iter().filter(|s| s["metadata"]["labels"][key] == value).collect();
    assert!(!services.is_empty(), "a Service carries the discovery label");
    for deployment in of_kind(&documents, "Deployment") {
        let selecting: Vec<&&Value> =
            services.iter().filter(|s| selects(s["spec"]["selector"].as_object().unwrap(), deployment)).collect();
        let name = &deployment["metadata"]["name"];
        // Every role that registers a worker (all but the router) is ready in a labelled Service's slices:
        // which needs a port of its pods for the Service to name.
        assert_eq!(selecting.len(), usize::from(role(deployment) != "route"), "{name}");
        for service in selecting {
            for port in service["spec"]["ports"].as_array().unwrap() {
                let target = port["targetPort"].as_str().unwrap();
                assert!(named_port(deployment, target).is_some(), "{name} lacks the port {target} its Service names");
            }
        }
    }
}

#[test]
fn the_inference_pool_is_the_decode_pods_frontends_picked_by_the_routers_picker() {
    let documents = documents();
    let pool = named(&documents, "InferencePool", "dynamo");
    let selector = pool["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let pods: Vec<&Value> = of_kind(&documents, "Deployment").into_iter().filter(|d| selects(selector, d)).collect();
    assert!(!pods.is_empty() && pods.iter().all(|d| role(d) == "decode"), "the pool is decode pods only");
    let target = pool["spec"]["targetPorts"][0]["number"].as_u64().unwrap().to_string();
    for pod in pods {
        let containers: Vec<Vec<String>> =
            pod["spec"]["template"]["spec"]["containers"].as_array().unwrap().iter().map(args_of).collect();
        // The worker names the frontend beside it, which listens on the pool's port.
        assert_eq!(flag(&containers[0], "--http-addr"), Some(format!("$(POD_IP):{target}").as_str()));
        assert!(containers.iter().any(|c| c[0] == "route" && flag(c, "--http-port") == Some(target.as_str())));
    }
    // The picker's Service reaches the router's --epp-port.
    let picker = &pool["spec"]["endpointPickerRef"];
    let service = named(&documents, "Service", picker["name"].as_str().unwrap());
    let port = (service["spec"]["ports"].as_array().unwrap().iter())
        .find(|p| p["port"] == picker["port"]["number"])
        .expect("the Service has the picker's port");
    let router = named(&documents, "Deployment", "dynamo-route");
    assert!(selects(service["spec"]["selector"].as_object().unwrap(), router));
    assert_eq!(named_port(router, port["targetPort"].as_str().unwrap()), Some(9002));
    let route = named(&documents, "HTTPRoute", "dynamo");
    let backend = &route["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!((backend["kind"].as_str(), backend["name"].as_str()), (Some("InferencePool"), Some("dynamo")));
}

#[test]
fn kubectl_builds_the_kustomizations() {
    let mut built = 0;
    for dir in [DIR.to_string(), format!("{DIR}/gateway")] {
        let Ok(output) = std::process::Command::new("kubectl").args(["kustomize", &dir]).output() else {
            eprintln!("SKIPPED: kubectl is not on PATH; the manifests were checked as YAML only");
            return;
        };
        assert!(output.status.success(), "{dir}: {}", String::from_utf8_lossy(&output.stderr));
        built += yaml(&String::from_utf8_lossy(&output.stdout)).len();
    }
    assert_eq!(built, documents().len());
}
