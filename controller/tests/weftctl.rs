//! `weftctl waypoint deploy|delete|list` against the fake API server (real HTTP, kube's real
//! client), and the `weftctl` binary itself: `--dry-run` (no request at all), a deploy, list
//! and delete through a kubeconfig context, and an unreachable API.

use std::path::Path;
use std::process::Output;

use serde_json::{Value, json};
use weft_controller::weftctl::{self, Binding, CtlError, Format, Waypoint};
use weft_tests::fake_apiserver::FakeApiServer;

fn waypoint(binding: Binding) -> Waypoint {
    Waypoint {
        image: "weft/waypoint:test".into(),
        binding,
        ..Waypoint::new("shop")
    }
}

/// The kinds of a waypoint's objects without a config file, in the order they are applied.
const KINDS: [&str; 4] = [
    "ServiceAccount",
    "Deployment",
    "PodDisruptionBudget",
    "Service",
];

const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

/// A fake API server with namespace `shop` (meshed) and its Services `web` and `api`, and the
/// controller's CA in `weft-system`.
async fn server() -> FakeApiServer {
    let s = server_without_ca().await;
    s.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "weft-controller-ca", "namespace": "weft-system"},
        "data": {"ca.pem": CA_PEM}}));
    s
}

/// [`server`] without the controller's CA.
async fn server_without_ca() -> FakeApiServer {
    let s = FakeApiServer::start().await;
    s.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}}}));
    for (name, ip) in [("web", "10.96.0.10"), ("api", "10.96.0.11")] {
        s.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}));
    }
    s
}

fn label(v: &Option<Value>, key: &str) -> Option<String> {
    v.as_ref()?["metadata"]["labels"][key]
        .as_str()
        .map(String::from)
}

/// The writes (anything but GET) the server answered.
fn writes(s: &FakeApiServer) -> Vec<String> {
    s.requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// An object without what the server adds on every write.
fn stable(mut v: Value) -> Value {
    if let Some(m) = v["metadata"].as_object_mut() {
        for k in ["resourceVersion", "managedFields", "generation"] {
            m.remove(k);
        }
    }
    v
}

#[tokio::test]
async fn weftctl_deploy_creates_the_objects_and_labels_the_namespace() {
    let s = server().await;
    let done = weftctl::deploy(&s.client(), &waypoint(Binding::Namespace))
        .await
        .expect("deploy");
    assert!(done.meshed);
    assert_eq!(done.rebound_from, None);

    let sa = s.get("v1", "ServiceAccount", "shop", "waypoint");
    assert_eq!(label(&sa, "weft.dev/waypoint").as_deref(), Some("waypoint"));
    assert_eq!(
        label(&sa, "app.kubernetes.io/managed-by").as_deref(),
        Some("weftctl")
    );

    let d = s.get("apps/v1", "Deployment", "shop", "waypoint");
    for (k, v) in [
        ("weft.dev/waypoint", "waypoint"),
        ("app.kubernetes.io/name", "weft-waypoint"),
        ("app.kubernetes.io/managed-by", "weftctl"),
    ] {
        assert_eq!(label(&d, k).as_deref(), Some(v), "deployment label {k}");
    }
    let d = d.expect("deployment");
    let pod = &d["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["weft.dev/waypoint"], "waypoint");
    assert_eq!(
        pod["metadata"]["labels"]["app.kubernetes.io/name"],
        "weft-waypoint"
    );
    assert_eq!(
        d["spec"]["selector"]["matchLabels"],
        json!({"weft.dev/waypoint": "waypoint"})
    );
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["name"], "waypoint");
    assert_eq!(c["image"], "weft/waypoint:test");
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for pair in [
        [
            "--controller",
            "https://weft-controller.weft-system.svc:15010",
        ],
        ["--namespace", "$(POD_NAMESPACE)"],
        ["--service-account", "waypoint"],
        ["--node", "$(NODE_NAME)"],
        [
            "--service-account-token-file",
            "/var/run/secrets/weft/token",
        ],
        ["--controller-ca", "/var/run/secrets/weft-ca/ca.pem"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    assert_eq!(
        c["env"],
        json!([
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ])
    );
    let ports: Vec<(&str, u64)> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?, p["containerPort"].as_u64()?)))
        .collect();
    assert_eq!(ports, [("hbone", 15008), ("metrics", 15090)]);
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/ready", "port": 15090})
    );
    assert_eq!(
        c["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}})
    );
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert!(
        c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["mountPath"] == "/var/run/secrets/weft" && m["name"] == "weft-token")
    );
    let token = &pod["spec"]["volumes"][0];
    assert_eq!(token["name"], "weft-token");
    let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sat["audience"], "weft-controller");
    assert_eq!(sat["path"], "token");

    let svc = s.get("v1", "Service", "shop", "waypoint");
    assert_eq!(
        label(&svc, "weft.dev/waypoint").as_deref(),
        Some("waypoint")
    );
    let svc = svc.expect("service");
    assert_eq!(
        svc["spec"]["selector"],
        json!({"weft.dev/waypoint": "waypoint"})
    );
    let ports = svc["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], 15008);
    assert_eq!(ports[0]["name"], "hbone");
    assert_eq!(ports[0]["protocol"], "TCP");
    assert_eq!(ports[0]["appProtocol"], "weft.dev/hbone");

    let pdb = s
        .get("policy/v1", "PodDisruptionBudget", "shop", "waypoint")
        .expect("pod disruption budget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"],
        json!({"matchLabels": {"weft.dev/waypoint": "waypoint"}})
    );

    let ns = s.get("v1", "Namespace", "", "shop");
    assert_eq!(
        label(&ns, "weft.dev/use-waypoint").as_deref(),
        Some("waypoint")
    );
    assert_eq!(
        label(&ns, "weft.dev/mesh").as_deref(),
        Some("enabled"),
        "kept"
    );
    for svc in ["web", "api"] {
        let o = s.get("v1", "Service", "shop", svc);
        assert_eq!(label(&o, "weft.dev/use-waypoint"), None, "{svc} untouched");
    }

    // Every object write is a forced server-side apply by field manager weftctl.
    let applies: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/waypoint"))
        .collect();
    assert_eq!(applies.len(), 4, "{applies:?}");
    for r in &applies {
        assert_eq!(
            r.query.get("fieldManager").map(String::as_str),
            Some("weftctl"),
            "{r:?}"
        );
        assert_eq!(
            r.query.get("force").map(String::as_str),
            Some("true"),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn weftctl_deploy_twice_is_idempotent_and_applies_changes() {
    let s = server().await;
    let c = s.client();
    let w = waypoint(Binding::Namespace);
    weftctl::deploy(&c, &w).await.expect("first deploy");
    let snapshot = |s: &FakeApiServer| {
        [
            s.get("v1", "ServiceAccount", "shop", "waypoint"),
            s.get("apps/v1", "Deployment", "shop", "waypoint"),
            s.get("policy/v1", "PodDisruptionBudget", "shop", "waypoint"),
            s.get("v1", "Service", "shop", "waypoint"),
            s.get("v1", "Namespace", "", "shop"),
        ]
        .map(|o| stable(o.expect("object")))
    };
    let first = snapshot(&s);
    let done = weftctl::deploy(&c, &w).await.expect("second deploy");
    assert_eq!(done.rebound_from, None, "same waypoint: no rebinding");
    assert_eq!(snapshot(&s), first);
    assert_eq!(weftctl::list(&c, None).await.expect("list").len(), 1);

    let w3 = Waypoint {
        replicas: 3,
        image: "weft/waypoint:next".into(),
        ..w
    };
    weftctl::deploy(&c, &w3).await.expect("update");
    let d = s
        .get("apps/v1", "Deployment", "shop", "waypoint")
        .expect("deployment");
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "weft/waypoint:next"
    );
}

#[tokio::test]
async fn weftctl_deploy_for_one_service_labels_only_that_service() {
    let s = server().await;
    let c = s.client();
    weftctl::deploy(&c, &waypoint(Binding::Service("web".into())))
        .await
        .expect("deploy");
    let web = s.get("v1", "Service", "shop", "web");
    assert_eq!(
        label(&web, "weft.dev/use-waypoint").as_deref(),
        Some("waypoint")
    );
    let api = s.get("v1", "Service", "shop", "api");
    assert_eq!(label(&api, "weft.dev/use-waypoint"), None);
    let ns = s.get("v1", "Namespace", "", "shop");
    assert_eq!(
        label(&ns, "weft.dev/use-waypoint"),
        None,
        "namespace untouched"
    );
    assert!(s.get("apps/v1", "Deployment", "shop", "waypoint").is_some());
    let rows = weftctl::list(&c, Some("shop")).await.expect("list");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].bound, "web");

    let before = writes(&s).len();
    let e = weftctl::deploy(&c, &waypoint(Binding::Service("nope".into())))
        .await
        .expect_err("no such service");
    assert!(matches!(e, CtlError::NoService { .. }), "{e}");
    assert!(
        e.to_string().contains("service shop/nope does not exist"),
        "{e}"
    );
    let e = weftctl::deploy(&c, &waypoint(Binding::Service("waypoint".into())))
        .await
        .expect_err("a waypoint's own Service");
    assert!(matches!(e, CtlError::WaypointService { .. }), "{e}");
    assert_eq!(writes(&s).len(), before, "refused before any write");

    let none = Waypoint {
        name: "other".into(),
        ..waypoint(Binding::None)
    };
    weftctl::deploy(&c, &none)
        .await
        .expect("deploy, no binding");
    assert!(s.get("apps/v1", "Deployment", "shop", "other").is_some());
    let ns = s.get("v1", "Namespace", "", "shop");
    assert_eq!(label(&ns, "weft.dev/use-waypoint"), None);
}

#[tokio::test]
async fn weftctl_deploy_copies_the_controller_ca_and_fails_clearly_without_it() {
    let s = server().await;
    weftctl::deploy(&s.client(), &waypoint(Binding::Namespace))
        .await
        .expect("deploy");
    let copy = s
        .get("v1", "ConfigMap", "shop", "weft-controller-ca")
        .expect("the CA next to the waypoint");
    assert_eq!(copy["data"]["ca.pem"], CA_PEM);
    let d = s
        .get("apps/v1", "Deployment", "shop", "waypoint")
        .expect("deployment");
    let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--controller-ca"), "{args}");
    assert!(args.contains("--service-account-token-file"), "{args}");
    let s = server_without_ca().await;
    let e = weftctl::deploy(&s.client(), &waypoint(Binding::Namespace))
        .await
        .expect_err("no CA");
    assert!(matches!(e, CtlError::NoControllerCa), "{e}");
    assert!(
        e.to_string()
            .contains("kubectl -n weft-system create configmap weft-controller-ca")
    );
    assert_eq!(writes(&s), Vec::<String>::new());
}

#[tokio::test]
async fn weftctl_deploy_into_a_missing_namespace_fails_clearly_and_writes_nothing() {
    let s = server().await;
    let w = Waypoint {
        namespace: "absent".into(),
        ..waypoint(Binding::Namespace)
    };
    let e = weftctl::deploy(&s.client(), &w)
        .await
        .expect_err("no namespace");
    assert!(
        matches!(e, CtlError::NoNamespace(ref n) if n == "absent"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("namespace absent does not exist"), "{msg}");
    assert!(msg.contains("kubectl create namespace absent"), "{msg}");
    assert_eq!(writes(&s), Vec::<String>::new());
}

#[tokio::test]
async fn weftctl_deploy_reports_an_unmeshed_namespace_and_a_rebinding() {
    let s = server().await;
    s.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "plain", "labels": {"weft.dev/use-waypoint": "old"}}}));
    let w = Waypoint {
        namespace: "plain".into(),
        ..waypoint(Binding::Namespace)
    };
    let done = weftctl::deploy(&s.client(), &w).await.expect("deploy");
    assert!(!done.meshed);
    assert_eq!(done.rebound_from.as_deref(), Some("old"));
    let ns = s.get("v1", "Namespace", "", "plain");
    assert_eq!(
        label(&ns, "weft.dev/use-waypoint").as_deref(),
        Some("waypoint")
    );
}

#[tokio::test]
async fn weftctl_deploy_ships_the_config_file_and_delete_removes_it() {
    let s = server().await;
    let c = s.client();
    let config = "listeners: []\nbackends: []\n";
    let w = Waypoint {
        config: Some(config.into()),
        ..waypoint(Binding::Namespace)
    };
    weftctl::deploy(&c, &w).await.expect("deploy");
    let cm = s
        .get("v1", "ConfigMap", "shop", "waypoint-config")
        .expect("config ConfigMap");
    assert_eq!(cm["data"]["waypoint.yaml"], config);
    assert_eq!(
        label(&Some(cm.clone()), "app.kubernetes.io/managed-by").as_deref(),
        Some("weftctl")
    );
    let d = s
        .get("apps/v1", "Deployment", "shop", "waypoint")
        .expect("deployment");
    let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("\"--config\",\"/etc/weft-waypoint/waypoint.yaml\""),
        "{args}"
    );
    let done = weftctl::delete(&c, "shop", "waypoint")
        .await
        .expect("delete");
    assert!(
        done.removed
            .iter()
            .any(|r| r == "configmap shop/waypoint-config"),
        "{:?}",
        done.removed
    );
    assert!(
        s.get("v1", "ConfigMap", "shop", "waypoint-config")
            .is_none()
    );
}

#[tokio::test]
async fn weftctl_delete_removes_the_objects_and_the_bindings_and_keeps_foreign_objects() {
    let s = server().await;
    let c = s.client();
    weftctl::deploy(&c, &waypoint(Binding::Namespace))
        .await
        .expect("deploy");
    weftctl::deploy(&c, &waypoint(Binding::Service("web".into())))
        .await
        .expect("deploy for web too");
    // A ServiceAccount of the same name that weftctl did not create stays.
    s.apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "waypoint", "namespace": "shop", "labels": {"team": "payments"}}}));

    let done = weftctl::delete(&c, "shop", "waypoint")
        .await
        .expect("delete");
    assert_eq!(
        done.removed,
        [
            "deployment shop/waypoint",
            "poddisruptionbudget shop/waypoint",
            "service shop/waypoint",
            "label weft.dev/use-waypoint from namespace shop",
            "label weft.dev/use-waypoint from service shop/web",
        ],
    );
    assert_eq!(done.kept, ["serviceaccount shop/waypoint"]);
    assert!(s.get("apps/v1", "Deployment", "shop", "waypoint").is_none());
    assert!(
        s.get("policy/v1", "PodDisruptionBudget", "shop", "waypoint")
            .is_none()
    );
    assert!(s.get("v1", "Service", "shop", "waypoint").is_none());
    assert!(s.get("v1", "ServiceAccount", "shop", "waypoint").is_some());
    let ns = s.get("v1", "Namespace", "", "shop");
    assert_eq!(label(&ns, "weft.dev/use-waypoint"), None);
    assert_eq!(
        label(&ns, "weft.dev/mesh").as_deref(),
        Some("enabled"),
        "kept"
    );
    let web = s.get("v1", "Service", "shop", "web");
    assert_eq!(label(&web, "weft.dev/use-waypoint"), None);
    assert!(web.is_some(), "application Service kept");
    assert!(weftctl::list(&c, None).await.expect("list").is_empty());

    let again = weftctl::delete(&c, "shop", "waypoint")
        .await
        .expect("delete again");
    assert!(again.removed.is_empty(), "{again:?}");
}

#[tokio::test]
async fn weftctl_list_shows_waypoints_readiness_and_bindings() {
    let s = server().await;
    let c = s.client();
    s.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "blog"}}));
    s.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "front", "namespace": "blog"},
        "spec": {"clusterIP": "10.96.1.10", "ports": [{"port": 80}]}}));
    weftctl::deploy(&c, &waypoint(Binding::Namespace))
        .await
        .expect("deploy shop");
    s.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": "shop", "labels": {"weft.dev/use-waypoint": "none"}},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}}));
    let blog = Waypoint {
        namespace: "blog".into(),
        name: "edge".into(),
        replicas: 2,
        ..waypoint(Binding::Service("front".into()))
    };
    weftctl::deploy(&c, &blog).await.expect("deploy blog");
    // The kubelet's view: one of the two blog replicas is ready.
    let mut d = s
        .get("apps/v1", "Deployment", "blog", "edge")
        .expect("deployment");
    d["status"] = json!({"replicas": 2, "readyReplicas": 1});
    s.apply(d);

    let all = weftctl::list(&c, None).await.expect("list -A");
    let summary: Vec<_> = all
        .iter()
        .map(|r| {
            (
                r.namespace.as_str(),
                r.name.as_str(),
                r.ready,
                r.desired,
                r.bound.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("blog", "edge", 1, 2, "front"),
            ("shop", "waypoint", 0, 1, "namespace (except api)"),
        ]
    );
    let shop = weftctl::list(&c, Some("shop")).await.expect("list -n shop");
    assert_eq!(shop, all[1..]);
    let table = weftctl::table(&all);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAMESPACE"), "{table}");
    assert!(
        lines[1].contains("edge") && lines[1].contains("1/2"),
        "{table}"
    );
    assert!(lines[2].ends_with("namespace (except api)"), "{table}");
}

#[tokio::test]
async fn weftctl_refuses_invalid_names_before_any_request() {
    let s = server().await;
    let c = s.client();
    for (ns, name, what) in [
        ("Shop", "waypoint", "namespace"),
        ("shop", "way_point", "waypoint"),
        ("shop", "-waypoint", "waypoint"),
        ("shop", &"w".repeat(64), "waypoint"),
    ] {
        let w = Waypoint {
            namespace: ns.into(),
            name: name.into(),
            ..waypoint(Binding::Namespace)
        };
        let e = weftctl::deploy(&c, &w).await.expect_err("invalid name");
        assert!(matches!(e, CtlError::BadName(_, w) if w == what), "{e}");
        assert!(e.to_string().contains("is not a valid"), "{e}");
        let e = weftctl::delete(&c, ns, name)
            .await
            .expect_err("invalid name");
        assert!(matches!(e, CtlError::BadName(_, w) if w == what), "{e}");
    }
    assert!(matches!(
        weftctl::list(&c, Some("Shop")).await,
        Err(CtlError::BadName(_, "namespace"))
    ));
    assert!("service:Web".parse::<Binding>().is_err());
    assert_eq!(s.requests(), Vec::new(), "no request at all");
}

#[tokio::test]
async fn weftctl_names_an_unreachable_api_and_the_fix() {
    let port = closed_port();
    let uri = format!("http://127.0.0.1:{port}").parse().expect("uri");
    let c = kube::Client::try_from(kube::Config::new(uri)).expect("client");
    let e = weftctl::deploy(&c, &waypoint(Binding::Namespace))
        .await
        .expect_err("nothing listens");
    assert!(matches!(e, CtlError::Unreachable(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("cannot reach the Kubernetes API ("),
        "{msg}"
    );
    assert!(
        msg.contains("check KUBECONFIG / --kubeconfig, or use --dry-run"),
        "{msg}"
    );
}

#[test]
fn weftctl_renders_json_as_a_list() {
    let text = waypoint(Binding::Namespace)
        .render(Format::Json)
        .expect("json");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["kind"], "List");
    let kinds: Vec<&str> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert_eq!(kinds, KINDS);
}

// --- the binary ---

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A kubeconfig with context `fake` (the fake API server, namespace `shop`) and the current
/// context `down` (nothing listens).
fn kubeconfig(dir: &Path, fake_url: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: down\n\
         clusters:\n- name: fake\n  cluster:\n    server: {fake_url}\n\
         - name: down\n  cluster:\n    server: http://127.0.0.1:{}\n\
         users:\n- name: me\n  user: {{}}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: me\n    namespace: shop\n\
         - name: down\n  context:\n    cluster: down\n    user: me\n",
        closed_port()
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weftctl-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Runs the built `weftctl` off the runtime thread (the fake API server lives on it).
async fn weftctl_bin(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_weftctl"))
            .args(&args)
            .env_remove("KUBECONFIG")
            .env("HOME", "/nonexistent")
            .output()
            .expect("run weftctl")
    })
    .await
    .expect("join")
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn weftctl_binary_dry_run_prints_yaml_documents_without_any_request() {
    let s = server().await;
    let dir = tempdir("dry");
    let kc = kubeconfig(&dir, &s.url());
    let kc = kc.to_string_lossy().to_string();
    let out = weftctl_bin(args(&[
        "--kubeconfig",
        &kc,
        "--context",
        "fake",
        "waypoint",
        "deploy",
        "-n",
        "shop",
        "--dry-run",
    ]))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, KINDS, "{text}");
    let d = &docs[1];
    assert_eq!(
        d["metadata"]["labels"]["weft.dev/waypoint"].as_str(),
        Some("waypoint")
    );
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["weft.dev/waypoint"].as_str(),
        Some("waypoint")
    );
    let image = d["spec"]["template"]["spec"]["containers"][0]["image"].as_str();
    assert_eq!(
        image,
        Some(concat!(
            "ghcr.io/weft-mesh/weft-waypoint:",
            env!("CARGO_PKG_VERSION")
        ))
    );
    assert!(
        stderr.contains("kubectl label --overwrite namespace shop weft.dev/use-waypoint=waypoint"),
        "{stderr}"
    );

    let out = weftctl_bin(args(&[
        "--kubeconfig",
        &kc,
        "--context",
        "fake",
        "waypoint",
        "deploy",
        "-n",
        "shop",
        "-o",
        "json",
        "--replicas",
        "2",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["items"][1]["spec"]["replicas"], 2);

    assert_eq!(
        s.requests(),
        Vec::new(),
        "the dry run talked to the cluster"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn weftctl_binary_deploys_lists_and_deletes_through_a_kubeconfig_context() {
    let s = server().await;
    let dir = tempdir("live");
    let kc = kubeconfig(&dir, &s.url());
    let kc = kc.to_string_lossy().to_string();
    let run = |a: &[&str]| {
        let mut v = args(&["--kubeconfig", &kc, "--context", "fake"]);
        v.extend(args(a));
        weftctl_bin(v)
    };
    let out = run(&["waypoint", "deploy", "-n", "shop", "--for", "service:web"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("waypoint shop/waypoint deployed, bound to service shop/web"),
        "{stdout}"
    );
    assert!(s.get("apps/v1", "Deployment", "shop", "waypoint").is_some());

    // The context's namespace is the default of `list`.
    let out = run(&["waypoint", "list"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout.lines().nth(1).unwrap_or_default();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols, ["shop", "waypoint", "0/1", "web"], "{stdout}");

    let out = run(&["waypoint", "delete", "-n", "shop"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.get("apps/v1", "Deployment", "shop", "waypoint").is_none());
    let web = s.get("v1", "Service", "shop", "web");
    assert_eq!(label(&web, "weft.dev/use-waypoint"), None);

    // Missing namespace: the message, exit status 1.
    let out = run(&["waypoint", "deploy", "-n", "absent"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("namespace absent does not exist"),
        "{stderr}"
    );

    // Unmeshed namespace: deployed, with the warning.
    s.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plain"}}));
    let out = run(&["waypoint", "deploy", "-n", "plain"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the waypoint only receives traffic from meshed namespaces"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn weftctl_binary_explains_an_unreachable_api_and_an_invalid_name() {
    let s = server().await;
    let dir = tempdir("down");
    let kc = kubeconfig(&dir, &s.url());
    let kc = kc.to_string_lossy().to_string();
    // The current context, `down`: nothing listens there.
    let out = weftctl_bin(args(&["--kubeconfig", &kc, "waypoint", "list", "-A"])).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the Kubernetes API ("),
        "{stderr}"
    );
    assert!(
        stderr.contains("check KUBECONFIG / --kubeconfig, or use --dry-run to print the objects"),
        "{stderr}"
    );

    let out = weftctl_bin(args(&[
        "--kubeconfig",
        &kc,
        "--context",
        "fake",
        "waypoint",
        "deploy",
        "-n",
        "Shop",
    ]))
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`Shop` is not a valid namespace name"),
        "{stderr}"
    );
    assert_eq!(s.requests(), Vec::new(), "refused before any request");
    let _ = std::fs::remove_dir_all(&dir);
}
