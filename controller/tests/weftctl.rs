//! `weftctl waypoint ...` against the fake API server (real HTTP, kube's real client), and the
//! binary's `--dry-run`, which needs no cluster.

use serde_json::json;
use weft_controller::weftctl::{self, Binding, CtlError, Waypoint};
use weft_tests::fake_apiserver::FakeApiServer;

fn waypoint(binding: Binding) -> Waypoint {
    Waypoint {
        namespace: "shop".into(),
        name: "waypoint".into(),
        image: "weft/waypoint:test".into(),
        replicas: 1,
        binding,
    }
}

async fn server() -> FakeApiServer {
    let s = FakeApiServer::start().await;
    s.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}}}));
    s.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}));
    s
}

fn label(v: &Option<serde_json::Value>, key: &str) -> Option<String> {
    v.as_ref()?["metadata"]["labels"][key]
        .as_str()
        .map(String::from)
}

#[tokio::test]
async fn weftctl_deploy_creates_the_waypoint_and_binds_the_namespace_idempotently() {
    let s = server().await;
    let c = s.client();
    for _ in 0..2 {
        weftctl::deploy(&c, &waypoint(Binding::Namespace))
            .await
            .expect("deploy");
    }
    let d = s.get("apps/v1", "Deployment", "shop", "waypoint");
    assert_eq!(label(&d, "weft.dev/waypoint").as_deref(), Some("waypoint"));
    let d = d.expect("deployment");
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["weft.dev/waypoint"],
        "waypoint"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["serviceAccountName"],
        "waypoint"
    );
    let svc = s.get("v1", "Service", "shop", "waypoint").expect("service");
    assert_eq!(svc["spec"]["ports"][0]["port"], 15008);
    assert_eq!(svc["spec"]["selector"]["weft.dev/waypoint"], "waypoint");
    assert!(s.get("v1", "ServiceAccount", "shop", "waypoint").is_some());
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
    let rows = weftctl::list(&c, Some("shop")).await.expect("list");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].name.as_str(), rows[0].bound.as_str()),
        ("waypoint", "namespace")
    );

    let removed = weftctl::delete(&c, "shop", "waypoint")
        .await
        .expect("delete");
    assert_eq!(removed.len(), 4, "{removed:?}");
    assert!(s.get("apps/v1", "Deployment", "shop", "waypoint").is_none());
    assert!(s.get("v1", "Service", "shop", "waypoint").is_none());
    let ns = s.get("v1", "Namespace", "", "shop");
    assert_eq!(label(&ns, "weft.dev/use-waypoint"), None);
    assert!(weftctl::list(&c, None).await.expect("list").is_empty());
}

#[tokio::test]
async fn weftctl_binds_one_service_and_refuses_missing_objects() {
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
    let ns = s.get("v1", "Namespace", "", "shop");
    assert_eq!(
        label(&ns, "weft.dev/use-waypoint"),
        None,
        "namespace untouched"
    );
    assert_eq!(weftctl::list(&c, None).await.expect("list")[0].bound, "web");
    let e = weftctl::deploy(&c, &waypoint(Binding::Service("nope".into())))
        .await
        .expect_err("no such service");
    assert!(matches!(e, CtlError::NoService { .. }), "{e}");
    let mut w = waypoint(Binding::Namespace);
    w.namespace = "absent".into();
    let e = weftctl::deploy(&c, &w).await.expect_err("no namespace");
    assert!(
        e.to_string().contains("namespace absent does not exist"),
        "{e}"
    );
    // delete removes the service's label too.
    weftctl::delete(&c, "shop", "waypoint")
        .await
        .expect("delete");
    let web = s.get("v1", "Service", "shop", "web");
    assert_eq!(label(&web, "weft.dev/use-waypoint"), None);
}

#[test]
fn weftctl_dry_run_prints_the_objects_without_a_cluster() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(["waypoint", "deploy", "-n", "shop", "--dry-run"])
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .expect("run weftctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ServiceAccount", "Deployment", "Service"], "{text}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(["waypoint", "deploy", "-n", "Shop", "--dry-run"])
        .output()
        .expect("run weftctl");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a valid namespace name"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
