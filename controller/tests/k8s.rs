//! Kubernetes mode against the fake API server (real HTTP, kube's real client, watcher,
//! reflector and Controller). Every wait is bounded; nothing sleeps for a fixed time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use weft_api::MeshState;
use weft_controller::k8s::{self, K8sError, K8sOptions};
use weft_controller::source::{self, StateRx};
use weft_controller::{crd, crd::FIELD_MANAGER};
use weft_tests::fake_apiserver::{FakeApiServer, RequestRecord};

const WAIT: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn namespace(name: &str, mesh: Option<&str>) -> Value {
    let labels = mesh.map_or(json!({}), |m| json!({"weft.dev/mesh": m}));
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A running pod with one IPv4 address on node `n1`.
fn pod(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": "n1", "serviceAccountName": name,
                 "containers": [{"name": "main", "image": "example/app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// `v` with the field at `pointer` (whose parent must exist) set to `value`.
fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    match v.pointer_mut(parent).and_then(Value::as_object_mut) {
        Some(obj) => obj.insert(key.to_owned(), value),
        None => panic!("no object at {parent} in {v}"),
    };
    v
}

/// The fake server, Kubernetes mode running against it, and its output.
struct Harness {
    server: FakeApiServer,
    rx: StateRx,
    task: tokio::task::JoinHandle<Result<(), K8sError>>,
}

impl Harness {
    /// Starts Kubernetes mode on a server holding `objects`; returns after the first snapshot.
    async fn start(objects: Vec<Value>) -> Self {
        Self::start_with(FakeApiServer::start().await, objects).await
    }

    async fn start_with(server: FakeApiServer, objects: Vec<Value>) -> Self {
        let mut h = Self::spawn(server, objects);
        bounded("the first snapshot", h.rx.changed())
            .await
            .expect("sender alive");
        h
    }

    /// Starts Kubernetes mode on a server holding `objects`, without waiting for anything.
    fn spawn(server: FakeApiServer, objects: Vec<Value>) -> Self {
        init_tracing();
        for o in objects {
            server.apply(o);
        }
        let (tx, rx) = source::channel();
        let opts = K8sOptions {
            debounce: Duration::from_millis(20),
            ..K8sOptions::default()
        };
        let task = tokio::spawn(k8s::run(server.client(), tx, opts));
        Self { server, rx, task }
    }

    fn state(&self) -> Arc<MeshState> {
        self.rx.borrow().clone()
    }

    /// Waits until the published state satisfies `pred`.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&MeshState) -> bool) -> Arc<MeshState> {
        let rx = &mut self.rx;
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let s = rx.borrow_and_update().clone();
                if pred(&s) {
                    return s;
                }
                rx.changed().await.expect("Kubernetes mode stopped");
            }
        })
        .await;
        match found {
            Ok(s) => s,
            Err(_) => panic!(
                "timed out waiting for {what}; state: {:#?}",
                self.rx.borrow()
            ),
        }
    }

    fn count(&self, pred: impl Fn(&RequestRecord) -> bool) -> usize {
        self.server.requests().iter().filter(|r| pred(r)).count()
    }
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `cond` every 10 ms (for things only visible by polling, such as the fake's log).
async fn until(what: &str, cond: impl Fn() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn pod_lists(r: &RequestRecord) -> bool {
    r.path == "/api/v1/pods" && !r.is_watch() && r.method == "GET"
}

fn pod_watches(r: &RequestRecord) -> bool {
    r.path == "/api/v1/pods" && r.is_watch()
}

/// A ClusterIP Service with ports `[(name, port, targetPort)]`.
fn service(ns: &str, name: &str, vips: &[&str], ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": vips[0], "clusterIPs": vips,
                 "selector": {"app": name}, "ports": ports},
    })
}

/// An EndpointSlice of `service` with the given ports and endpoints
/// (address, targetRef pod, ready).
fn endpoint_slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: Value,
    endpoints: &[(&str, Option<&str>, bool)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(addr, pod, ready)| {
            let target = pod.map(|p| json!({"kind": "Pod", "namespace": ns, "name": p}));
            json!({"addresses": [addr], "conditions": {"ready": ready, "serving": ready},
                   "targetRef": target, "nodeName": "n1"})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// (workload, IPv4 address, ready) of each endpoint of a service.
fn endpoints(s: &MeshState, service: &str) -> Vec<(String, String, bool)> {
    s.services[service]
        .endpoints
        .iter()
        .map(|e| {
            let ip = e.ip4.map(|i| i.to_string()).unwrap_or_default();
            (e.workload.clone(), ip, e.ready)
        })
        .collect()
}

fn keys(s: &MeshState) -> Vec<&str> {
    s.workloads.keys().map(String::as_str).collect()
}

#[tokio::test]
async fn k8s_initial_list_builds_the_state() {
    let h = Harness::start(vec![
        namespace("shop", Some("enabled")),
        namespace("other", None),
        pod("shop", "web", "10.0.0.1"),
        with(
            pod("other", "db", "10.0.0.2"),
            "/status/podIPs",
            json!([{"ip": "10.0.0.2"}, {"ip": "fd00::2"}]),
        ),
        with(pod("shop", "pending", ""), "/spec/nodeName", json!(null)),
        with(
            pod("shop", "done", "10.0.0.4"),
            "/status/phase",
            json!("Succeeded"),
        ),
        with(
            pod("shop", "host", "192.168.0.1"),
            "/spec/hostNetwork",
            json!(true),
        ),
        with(pod("shop", "no-ip", ""), "/status/podIPs", json!([])),
    ])
    .await;
    let s = h.state();
    assert_eq!(
        keys(&s),
        ["other/db", "shop/web"],
        "the first snapshot is complete"
    );
    assert_eq!(s.namespaces.get("shop"), Some(&true));
    assert_eq!(s.namespaces.get("other"), Some(&false));
    let web = &s.workloads["shop/web"];
    assert_eq!(
        (web.service_account.as_str(), web.node.as_str()),
        ("web", "n1")
    );
    assert_eq!(web.ip4.map(|i| i.to_string()).as_deref(), Some("10.0.0.1"));
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
    assert!(web.capture.captured());
    let db = &s.workloads["other/db"];
    assert_eq!(db.ip6.map(|i| i.to_string()).as_deref(), Some("fd00::2"));
    assert!(!db.capture.captured());
    let watch = h
        .server
        .requests()
        .into_iter()
        .find(pod_watches)
        .expect("a pod watch");
    assert_eq!(
        watch.query.get("fieldSelector").map(String::as_str),
        Some(k8s::POD_FIELD_SELECTOR)
    );
    assert!(!h.task.is_finished());
}

#[tokio::test]
async fn k8s_first_snapshot_waits_for_all_lists_despite_errors() {
    let server = FakeApiServer::start().await;
    // One of the initial lists fails and is retried after kube's backoff; the first
    // snapshot must still hold both namespaces and pods.
    server.inject_errors(1);
    let h = Harness::start_with(
        server,
        vec![
            namespace("shop", Some("enabled")),
            pod("shop", "web", "10.0.0.1"),
        ],
    )
    .await;
    let s = h.state();
    assert_eq!(keys(&s), ["shop/web"]);
    assert!(s.workloads["shop/web"].capture.captured(), "{s:#?}");
    assert_eq!(h.count(|r| r.status == 500), 1);
}

#[tokio::test]
async fn k8s_namespace_label_change_enrols_and_unenrols_pods() {
    let mut h = Harness::start(vec![
        namespace("shop", None),
        pod("shop", "web", "10.0.0.1"),
    ])
    .await;
    assert!(!h.state().workloads["shop/web"].capture.captured());
    h.server.apply(namespace("shop", Some("enabled")));
    h.wait_for("enrolment", |s| s.workloads["shop/web"].capture.captured())
        .await;
    h.server.apply(namespace("shop", Some("disabled")));
    let s = h
        .wait_for("unenrolment", |s| {
            !s.workloads["shop/web"].capture.captured()
        })
        .await;
    assert_eq!(s.namespaces.get("shop"), Some(&false));
    h.server.apply(namespace("shop", Some("bogus")));
    h.server.apply(namespace("other", Some("enabled")));
    let s = h
        .wait_for("the next namespace", |s| s.namespaces.contains_key("other"))
        .await;
    assert_eq!(
        s.namespaces.get("shop"),
        Some(&false),
        "an invalid label is not meshed"
    );
    assert!(s.workloads.contains_key("shop/web"));
}

#[tokio::test]
async fn k8s_pod_add_update_delete() {
    let mut h = Harness::start(vec![namespace("shop", Some("enabled"))]).await;
    assert!(h.state().workloads.is_empty());
    h.server.apply(pod("shop", "web", "10.0.0.1"));
    h.wait_for("the new pod", |s| s.workloads.contains_key("shop/web"))
        .await;
    let moved = with(
        pod("shop", "web", "10.0.0.9"),
        "/status/podIPs",
        json!([{"ip": "10.0.0.9"}]),
    );
    h.server.apply(with(
        moved,
        "/metadata/labels",
        json!({"app": "web", "v": "2"}),
    ));
    let s = h
        .wait_for("the update", |s| {
            s.workloads
                .get("shop/web")
                .is_some_and(|w| w.ip4.is_some_and(|i| i.to_string() == "10.0.0.9"))
        })
        .await;
    assert_eq!(
        s.workloads["shop/web"].labels.get("v").map(String::as_str),
        Some("2")
    );
    h.server.apply(pod("shop", "api", "10.0.0.2"));
    h.wait_for("the second pod", |s| s.workloads.len() == 2)
        .await;
    // Terminal phase: the pod leaves the field-selected watch (a DELETED event).
    h.server.apply(with(
        pod("shop", "api", "10.0.0.2"),
        "/status/phase",
        json!("Failed"),
    ));
    h.wait_for("the failed pod to go", |s| keys(s) == ["shop/web"])
        .await;
    h.server.delete("v1", "Pod", "shop", "web");
    h.wait_for("the deletion", |s| s.workloads.is_empty()).await;
}

#[tokio::test]
async fn k8s_pod_opt_out_label_and_exclusion_annotations() {
    let excluded = with(
        pod("shop", "db", "10.0.0.2"),
        "/metadata/annotations",
        json!({
            "weft.dev/exclude-outbound-ports": "5432, 6379",
            "weft.dev/exclude-inbound-ports": "9090",
            "weft.dev/exclude-outbound-cidrs": "203.0.113.0/24",
            "weft.dev/exclude-inbound-cidrs": "198.18.0.1",
        }),
    );
    let bad = with(
        pod("shop", "bad", "10.0.0.3"),
        "/metadata/annotations",
        json!({"weft.dev/exclude-outbound-ports": "5432,postgres"}),
    );
    let mut h = Harness::start(vec![
        namespace("shop", Some("enabled")),
        with(
            pod("shop", "web", "10.0.0.1"),
            "/metadata/labels",
            json!({"weft.dev/mesh": "disabled"}),
        ),
        excluded,
        bad.clone(),
    ])
    .await;
    let s = h.state();
    assert_eq!(
        keys(&s),
        ["shop/db", "shop/web"],
        "the invalid pod is left out, not the rest"
    );
    let web = &s.workloads["shop/web"].capture;
    assert!(web.opted_out && web.namespace_meshed && !web.captured());
    let e = &s.workloads["shop/db"].capture.exclusions;
    assert_eq!(e.outbound_ports, [5432, 6379]);
    assert_eq!(e.inbound_ports, [9090]);
    assert_eq!(e.outbound_cidrs[0].to_string(), "203.0.113.0/24");
    assert_eq!(e.inbound_cidrs[0].to_string(), "198.18.0.1/32");
    // Fixing the annotation brings the pod in.
    h.server.apply(with(
        bad,
        "/metadata/annotations",
        json!({"weft.dev/exclude-outbound-ports": "5432"}),
    ));
    let s = h
        .wait_for("the fixed pod", |s| s.workloads.contains_key("shop/bad"))
        .await;
    assert_eq!(
        s.workloads["shop/bad"].capture.exclusions.outbound_ports,
        [5432]
    );
}

#[tokio::test]
async fn k8s_gone_causes_a_relist_and_the_state_stays_right() {
    let mut h = Harness::start(vec![
        namespace("shop", Some("enabled")),
        pod("shop", "web", "10.0.0.1"),
        pod("shop", "api", "10.0.0.2"),
    ])
    .await;
    let lists = h.count(pod_lists);
    h.server.delete("v1", "Pod", "shop", "api");
    h.server.compact();
    until("a pod watch answered 410", || {
        h.count(|r| pod_watches(r) && r.status == 410) >= 1
    })
    .await;
    until("a pod relist", || h.count(pod_lists) > lists).await;
    let s = h
        .wait_for("the deletion", |s| keys(s) == ["shop/web"])
        .await;
    assert!(s.workloads["shop/web"].capture.captured());
    // Watching resumes after the relist.
    h.server.apply(pod("shop", "late", "10.0.0.3"));
    h.wait_for("a pod added after the relist", |s| s.workloads.len() == 2)
        .await;
    assert!(!h.task.is_finished());
}

#[tokio::test]
async fn k8s_bookmarks_are_accepted() {
    let server = FakeApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(50));
    let mut h = Harness::start_with(
        server,
        vec![
            namespace("shop", Some("enabled")),
            pod("shop", "web", "10.0.0.1"),
        ],
    )
    .await;
    let lists = h.count(pod_lists);
    // Another kind moves the resourceVersion on; only a bookmark tells the pod watcher.
    let rv = h
        .server
        .apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": "shop"}}));
    let rv: u64 = rv["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("rv");
    let marks = |h: &Harness| {
        h.server
            .bookmarks()
            .iter()
            .filter(|(p, r)| p == "/v1/pods" && *r >= rv)
            .count()
    };
    until("two pod bookmarks past the ConfigMap", || marks(&h) >= 2).await;
    let watches = h.count(pod_watches);
    h.server.drop_watches();
    until("the pod watch to be reopened", || {
        h.count(pod_watches) > watches
    })
    .await;
    let rewatch = h
        .server
        .requests()
        .into_iter()
        .filter(pod_watches)
        .nth(watches)
        .expect("rewatch");
    let from: u64 = rewatch
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .expect("rv");
    assert!(
        from >= rv,
        "the watch resumed from the bookmark ({from} >= {rv})"
    );
    assert_eq!(h.count(pod_lists), lists, "no relist");
    h.server.apply(pod("shop", "api", "10.0.0.2"));
    h.wait_for("a pod after the rewatch", |s| s.workloads.len() == 2)
        .await;
}

#[tokio::test]
async fn k8s_injected_errors_and_dropped_watches_recover() {
    let mut h = Harness::start(vec![
        namespace("shop", Some("enabled")),
        pod("shop", "web", "10.0.0.1"),
    ])
    .await;
    let watches = h.count(|r| r.is_watch());
    h.server.inject_errors(4);
    h.server.drop_watches();
    // Changes made while the watches are down arrive once they recover.
    h.server.apply(pod("shop", "api", "10.0.0.2"));
    h.server.delete("v1", "Pod", "shop", "web");
    let s = h.wait_for("recovery", |s| keys(s) == ["shop/api"]).await;
    assert!(s.workloads["shop/api"].capture.captured());
    assert_eq!(
        h.count(|r| r.status == 500),
        4,
        "every injected error was served"
    );
    assert!(h.count(|r| r.is_watch() && r.status == 200) > watches);
    h.server.drop_watches();
    h.server.apply(namespace("shop", None));
    h.wait_for("a change after a plain drop", |s| {
        !s.workloads["shop/api"].capture.captured()
    })
    .await;
    assert!(
        !h.task.is_finished(),
        "transient errors never stop Kubernetes mode"
    );
}

#[tokio::test]
async fn k8s_initial_sync_timeout_is_reported() {
    init_tracing();
    let server = FakeApiServer::start().await;
    server.inject_errors(usize::MAX);
    let (tx, _rx) = source::channel();
    let opts = K8sOptions {
        initial_sync_timeout: Some(Duration::from_millis(500)),
        ..K8sOptions::default()
    };
    let err = bounded("the sync timeout", k8s::run(server.client(), tx, opts))
        .await
        .expect_err("no sync");
    let msg = err.to_string();
    assert!(
        msg.contains("namespaces, pods, services, endpointslices and authorizationpolicies")
            && msg.contains("injected fault"),
        "{msg}"
    );
    assert!(msg.contains("manifests/rbac.yaml"), "{msg}");
}

#[tokio::test]
async fn k8s_run_ends_when_nobody_listens() {
    let h = Harness::start(vec![namespace("shop", None)]).await;
    let Harness { server, rx, task } = h;
    drop(rx);
    let res = bounded("run to return", task).await.expect("no panic");
    assert!(res.is_ok(), "{res:?}");
    drop(server);
}

#[tokio::test]
async fn k8s_policy_status_is_written_by_server_side_apply() {
    init_tracing();
    let server = FakeApiServer::start().await;
    let policy = |name: &str, spec: Value| {
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
    };
    server.apply(policy(
        "good",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
               "rules": [{"from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/api"],
                                    "ipBlocks": ["10.0.0.0/8"]}],
                          "to": [{"ports": [8080]}]}]}),
    ));
    let bad_spec = json!({"action": "DENY", "dryRun": true,
        "rules": [{"from": [{"principals": ["api"], "ipBlocks": ["10.0.0.1/8"]}], "to": [{"ports": [0]}]}]});
    server.apply(policy("bad", bad_spec));
    let task = tokio::spawn(crd::run_status_controller(server.client()));
    let status = |name: &str| {
        server
            .get("weft.dev/v1alpha1", "AuthorizationPolicy", "shop", name)
            .map(|p| p["status"].clone())
            .unwrap_or_default()
    };
    until("both statuses", || {
        status("good").is_object() && status("bad").is_object()
    })
    .await;
    let good = status("good");
    assert_eq!(
        good,
        json!({"observedGeneration": 1, "accepted": true, "message": "valid"})
    );
    let bad = status("bad");
    assert_eq!(bad["accepted"], json!(false));
    let msg = bad["message"].as_str().unwrap_or_default();
    for needle in ["principals[0]: `api`", "host bits set", "ports[0]: port 0"] {
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
    let applies: Vec<RequestRecord> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
        .collect();
    assert_eq!(applies.len(), 2, "{applies:#?}");
    for a in &applies {
        assert_eq!(
            a.query.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER)
        );
        assert_eq!(a.query.get("force").map(String::as_str), Some("true"));
    }
    // Fixing the policy bumps its generation; the status follows.
    let fixed = json!({"action": "DENY", "dryRun": true,
        "rules": [{"from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/api"]}]}]});
    server.apply(policy("bad", fixed));
    until("the fixed status", || {
        status("bad")["accepted"] == json!(true)
    })
    .await;
    assert_eq!(status("bad")["observedGeneration"], json!(2));
    assert!(!task.is_finished());
    let patches = server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, 3, "no status write loop");
}

/// (API group, resource[/subresource], verb) of a request, as RBAC sees it.
fn rbac_request(r: &RequestRecord) -> (String, String, String) {
    let (group, resource, verb, _, _) = rbac_request_scoped(r);
    (group, resource, verb)
}

/// [`rbac_request`] plus the namespace and object name, when the path has them.
fn rbac_request_scoped(
    r: &RequestRecord,
) -> (String, String, String, Option<String>, Option<String>) {
    let segs: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", g, _, rest @ ..] => (*g, rest),
        _ => panic!("not an API path: {}", r.path),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() => (Some((*ns).to_owned()), r),
        _ => (None, rest),
    };
    let name = rest.get(1).map(|s| (*s).to_owned());
    let resource = rest.iter().enumerate().filter(|(i, _)| i % 2 == 0);
    let resource: Vec<&str> = resource.map(|(_, s)| *s).collect();
    let verb = match (r.method.as_str(), rest.len()) {
        ("GET", 1) if r.is_watch() => "watch",
        ("GET", 1) => "list",
        ("GET", _) => "get",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("POST", _) => "create",
        ("DELETE", _) => "delete",
        (m, _) => panic!("unexpected method {m}"),
    };
    (group.into(), resource.join("/"), verb.into(), ns, name)
}

#[tokio::test]
async fn k8s_rbac_allows_every_request_the_controller_makes() {
    use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/rbac.yaml");
    let text = std::fs::read_to_string(path).expect("manifests/rbac.yaml");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).expect("YAML"))
        .collect();
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind).cloned();
    let role: ClusterRole =
        serde_yaml::from_value(of_kind("ClusterRole").next().expect("a ClusterRole"))
            .expect("a valid ClusterRole");
    // Namespaced Roles (bound to the controller in their namespace).
    let roles: Vec<Role> = of_kind("Role")
        .map(|r| serde_yaml::from_value(r).expect("a valid Role"))
        .collect();
    let rule_allows =
        |rule: &PolicyRule, (group, resource, verb, name): (&str, &str, &str, Option<&str>)| {
            let has = |list: &Option<Vec<String>>, v: &str| {
                list.iter().flatten().any(|x| x == v || x == "*")
            };
            has(&rule.api_groups, group)
                && has(&rule.resources, resource)
                && rule.verbs.iter().any(|v| v == verb)
                && match &rule.resource_names {
                    Some(names) if !names.is_empty() => {
                        name.is_some_and(|n| names.iter().any(|x| x == n))
                    }
                    _ => true,
                }
        };
    let allowed = |(group, resource, verb, ns, name): &(
        String,
        String,
        String,
        Option<String>,
        Option<String>,
    )| {
        let req = (
            group.as_str(),
            resource.as_str(),
            verb.as_str(),
            name.as_deref(),
        );
        role.rules
            .iter()
            .flatten()
            .any(|rule| rule_allows(rule, req))
            || roles.iter().any(|r| {
                r.metadata.namespace == *ns
                    && r.rules.iter().flatten().any(|rule| rule_allows(rule, req))
            })
    };

    let mut h = Harness::start(vec![
        namespace("shop", Some("enabled")),
        pod("shop", "web", "10.0.0.1"),
    ])
    .await;
    h.server.apply(
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop"}, "spec": {"action": "DENY"}}),
    );
    let policies = tokio::spawn(crd::run_status_controller(h.server.client()));
    let server = &h.server;
    let status = || server.get("weft.dev/v1alpha1", "AuthorizationPolicy", "shop", "p");
    until("the policy status", || {
        status().is_some_and(|p| p["status"].is_object())
    })
    .await;
    // Route status (HTTPRoute attached to a Service).
    h.server.apply(http_route(
        "shop",
        "r",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
        }),
    ));
    h.server.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"namespace": "shop", "name": "g"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                 "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
    );
    let routes = tokio::spawn(weft_controller::route_status::run_route_status_controller(
        h.server.client(),
    ));
    until("the route status", || {
        server
            .get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", "r")
            .is_some_and(|r| r["status"]["parents"].is_array())
            && server
                .get("gateway.networking.k8s.io/v1", "GRPCRoute", "shop", "g")
                .is_some_and(|r| r["status"]["parents"].is_array())
    })
    .await;
    h.server.drop_watches();
    h.server.apply(pod("shop", "api", "10.0.0.2"));
    h.wait_for("the rewatch", |s| s.workloads.len() == 2).await;
    policies.abort();
    routes.abort();
    // Agent authentication (TokenReview, then the agent's pod for its node) and the CA Secret
    // (created, then read on the next start).
    let agent = h.server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent-1", "namespace": "weft-system"},
        "spec": {"nodeName": "n1", "containers": [{"name": "a", "image": "a"}]}}));
    let uid = agent["metadata"]["uid"].as_str().expect("uid").to_owned();
    h.server.add_token(
        "agent-token",
        weft_tests::fake_apiserver::TokenUser::service_account(
            "weft-system",
            "weft-agent",
            "weft-controller",
        )
        .bound_to("agent-1", &uid, None),
    );
    let reviewer = weft_controller::tokenreview::TokenReviewer::new(
        h.server.client(),
        weft_controller::tokenreview::DEFAULT_AUDIENCE,
        weft_controller::tokenreview::DEFAULT_AGENT_SERVICE_ACCOUNT,
    )
    .expect("reviewer");
    assert_eq!(reviewer.node_of("agent-token").await.expect("node"), "n1");
    for _ in 0..2 {
        weft_controller::ca_secret::load_or_create(
            h.server.client(),
            weft_controller::ca_secret::DEFAULT_CA_SECRET,
            weft_controller::ca::DEFAULT_WORKLOAD_TTL,
        )
        .await
        .expect("CA Secret");
    }

    let requests: Vec<_> = h
        .server
        .requests()
        .iter()
        .map(rbac_request_scoped)
        .collect();
    let plain: Vec<_> = h.server.requests().iter().map(rbac_request).collect();
    for needed in [
        ("", "pods", "watch"),
        ("", "namespaces", "list"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("weft.dev", "authorizationpolicies", "list"),
        ("weft.dev", "authorizationpolicies", "watch"),
        ("weft.dev", "authorizationpolicies/status", "patch"),
        ("gateway.networking.k8s.io", "httproutes", "watch"),
        ("gateway.networking.k8s.io", "httproutes/status", "patch"),
        ("gateway.networking.k8s.io", "grpcroutes/status", "patch"),
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "pods", "get"),
        ("", "secrets", "get"),
        ("", "secrets", "create"),
    ] {
        let needed = (
            needed.0.to_owned(),
            needed.1.to_owned(),
            needed.2.to_owned(),
        );
        assert!(
            plain.contains(&needed),
            "the test did not exercise {needed:?}"
        );
    }
    let denied: Vec<_> = requests.iter().filter(|r| !allowed(r)).collect();
    assert!(
        denied.is_empty(),
        "manifests/rbac.yaml does not allow: {denied:?}"
    );
}

#[tokio::test]
async fn k8s_services_take_their_endpoints_from_endpoint_slices() {
    let ports = json!([
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"},
        {"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
    ]);
    let slice_ports = json!([
        {"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"},
        {"name": "grpc", "port": 9090, "protocol": "TCP"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]);
    let mut h = Harness::start(vec![
        namespace("shop", Some("enabled")),
        pod("shop", "web-1", "10.0.0.1"),
        pod("shop", "web-2", "10.0.0.2"),
        service("shop", "web", &["10.96.0.10", "fd00:96::10"], ports),
        endpoint_slice(
            "shop",
            "web-abcde",
            "web",
            slice_ports.clone(),
            &[
                ("10.0.0.1", Some("web-1"), true),
                ("10.0.0.2", Some("web-2"), false),
                ("192.0.2.7", None, true),
            ],
        ),
        // Not tied to a Service: not even listed.
        with(
            endpoint_slice(
                "shop",
                "stray",
                "web",
                json!([]),
                &[("10.0.0.8", None, true)],
            ),
            "/metadata/labels",
            json!({}),
        ),
    ])
    .await;
    let s = h.state();
    let web = &s.services["shop/web"];
    assert_eq!(web.hostname, "web.shop.svc.cluster.local");
    let vips: Vec<String> = web.vips.iter().map(ToString::to_string).collect();
    assert_eq!(vips, ["10.96.0.10", "fd00:96::10"]);
    let ports: Vec<(&str, u16, u16, &str)> = web
        .ports
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.port,
                p.target_port,
                p.app_protocol.as_str(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [("http", 80, 8080, "http"), ("grpc", 9000, 9090, "")],
        "the named targetPort is resolved by the slice; UDP is not meshed"
    );
    let e = |w: &str, ip: &str, ready| (w.to_string(), ip.to_string(), ready);
    assert_eq!(
        endpoints(&s, "shop/web"),
        [
            e("", "192.0.2.7", true),
            e("shop/web-1", "10.0.0.1", true),
            e("shop/web-2", "10.0.0.2", false),
        ],
        "an address that is no workload is kept, with no workload"
    );
    let watch = h
        .server
        .requests()
        .into_iter()
        .find(|r| r.path == "/apis/discovery.k8s.io/v1/endpointslices" && r.is_watch())
        .expect("a slice watch");
    assert_eq!(
        watch.query.get("labelSelector").map(String::as_str),
        Some(k8s::SERVICE_NAME_LABEL)
    );

    // The slice changes: web-2 becomes ready, web-1 goes, a new pod comes in.
    h.server.apply(pod("shop", "web-3", "10.0.0.3"));
    h.server.apply(endpoint_slice(
        "shop",
        "web-abcde",
        "web",
        slice_ports.clone(),
        &[
            ("10.0.0.2", Some("web-2"), true),
            ("10.0.0.3", Some("web-3"), true),
        ],
    ));
    let s = h
        .wait_for("the slice update", |s| {
            endpoints(s, "shop/web")
                .iter()
                .map(|e| e.0.as_str())
                .eq(["shop/web-2", "shop/web-3"])
        })
        .await;
    assert!(endpoints(&s, "shop/web").iter().all(|e| e.2), "both ready");
    // A second slice of the same service adds to it.
    h.server.apply(endpoint_slice(
        "shop",
        "web-fghij",
        "web",
        slice_ports,
        &[("10.0.0.1", Some("web-1"), false)],
    ));
    h.wait_for("the second slice", |s| {
        s.services["shop/web"].endpoints.len() == 3
    })
    .await;
    // Deleting the Service removes it, even while its slices are still there.
    h.server.delete("v1", "Service", "shop", "web");
    let s = h
        .wait_for("the service deletion", |s| s.services.is_empty())
        .await;
    assert_eq!(s.workloads.len(), 3, "pods are unaffected");
}

#[tokio::test]
async fn k8s_accepted_policies_enter_the_state() {
    let good = json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
        "rules": [{"from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/api"]}],
                   "to": [{"ports": [8080]}]}]});
    // Invalid for both validators (the CRD's and the model's).
    let bad = json!({"action": "DENY", "rules": [{"from": [{"principals": ["api"]}]}]});
    // Only the CRD's checks catch this one: the state follows the status.
    let bad_ns = json!({"action": "DENY", "rules": [{"from": [{"namespaces": ["Shop"]}]}]});
    let mut h = Harness::start(vec![
        namespace("shop", Some("enabled")),
        policy("shop", "good", good),
        policy("shop", "bad", bad),
        policy("shop", "bad-ns", bad_ns),
    ])
    .await;
    let status_task = tokio::spawn(crd::run_status_controller(h.server.client()));
    let s = h.state();
    assert_eq!(s.policies.keys().collect::<Vec<_>>(), ["shop/good"]);
    let p = &s.policies["shop/good"];
    assert_eq!(p.action, weft_api::model::PolicyAction::Allow);
    assert_eq!(
        p.selector
            .as_ref()
            .and_then(|m| m.get("app"))
            .map(String::as_str),
        Some("web")
    );
    assert_eq!(p.rules[0].to[0].ports, [8080]);
    let status = |server: &FakeApiServer, name: &str| {
        server
            .get("weft.dev/v1alpha1", "AuthorizationPolicy", "shop", name)
            .map(|p| p["status"].clone())
            .unwrap_or_default()
    };
    until("the three statuses", || {
        ["good", "bad", "bad-ns"]
            .iter()
            .all(|n| status(&h.server, n).is_object())
    })
    .await;
    assert_eq!(status(&h.server, "good")["accepted"], json!(true));
    assert_eq!(status(&h.server, "bad")["accepted"], json!(false));
    assert_eq!(status(&h.server, "bad-ns")["accepted"], json!(false));
    // Fixing a policy brings it in; deleting one takes it out.
    h.server.apply(policy(
        "shop",
        "bad",
        json!({"action": "DENY", "dryRun": true,
               "rules": [{"from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/api"]}]}]}),
    ));
    let s = h
        .wait_for("the fixed policy", |s| s.policies.contains_key("shop/bad"))
        .await;
    assert!(s.policies["shop/bad"].dry_run);
    h.server
        .delete("weft.dev/v1alpha1", "AuthorizationPolicy", "shop", "good");
    h.wait_for("the deletion", |s| s.policies.keys().eq(["shop/bad"]))
        .await;
    until("the fixed status", || {
        status(&h.server, "bad")["accepted"] == json!(true)
    })
    .await;
    status_task.abort();
}

#[tokio::test]
async fn k8s_first_snapshot_waits_for_every_kind() {
    let server = FakeApiServer::start().await;
    // As if the CRD were not installed yet: policies cannot be listed.
    let policies = "/apis/weft.dev/v1alpha1/authorizationpolicies";
    server.fail_path(policies, 404, usize::MAX);
    let mut h = Harness::spawn(
        server,
        vec![
            namespace("shop", Some("enabled")),
            pod("shop", "web", "10.0.0.1"),
            service("shop", "web", &["10.96.0.10"], json!([{"port": 80}])),
            endpoint_slice(
                "shop",
                "web-1",
                "web",
                json!([]),
                &[("10.0.0.1", Some("web"), true)],
            ),
            policy("shop", "deny-all", json!({"action": "DENY", "rules": [{}]})),
        ],
    );
    // Every other kind completes its list and starts watching; the policies keep failing.
    let others = [
        "/api/v1/namespaces",
        "/api/v1/pods",
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ];
    until("the other watches and two failed policy lists", || {
        let requests = h.server.requests();
        others
            .iter()
            .all(|p| requests.iter().any(|r| r.path == *p && r.is_watch()))
            && requests
                .iter()
                .filter(|r| r.path == policies && r.status == 404)
                .count()
                >= 2
    })
    .await;
    assert!(
        !h.rx.has_changed().expect("sender alive"),
        "nothing is published before every initial list completed"
    );
    assert!(h.state().workloads.is_empty());
    h.server.fail_path(policies, 404, 0);
    bounded("the first snapshot", h.rx.changed())
        .await
        .expect("sender alive");
    let s = h.state();
    assert_eq!(keys(&s), ["shop/web"]);
    assert_eq!(endpoints(&s, "shop/web").len(), 1);
    assert!(s.policies.contains_key("shop/deny-all"), "{s:#?}");
}

fn http_route(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

#[tokio::test]
async fn k8s_httproutes_enter_the_state_and_missing_gateway_api_crds_mean_none() {
    let spec = json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
        "rules": [{"backendRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80, "weight": 1}]}],
    });
    let h = Harness::start(vec![
        namespace("shop", Some("enabled")),
        http_route("shop", "api", spec.clone()),
    ])
    .await;
    let s = h.state();
    assert_eq!(s.routes.keys().collect::<Vec<_>>(), ["HTTPRoute/shop/api"]);
    assert_eq!(
        s.routes["HTTPRoute/shop/api"].rules[0].backends[0].service,
        "api"
    );
    // Without the Gateway API CRDs (404 on both kinds) the state is published, with no routes.
    let server = FakeApiServer::start().await;
    for path in [
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
    ] {
        server.fail_path(path, 404, usize::MAX);
    }
    let mut h = Harness::spawn(
        server,
        vec![
            namespace("shop", Some("enabled")),
            pod("shop", "web", "10.0.0.1"),
        ],
    );
    bounded("the first snapshot without routes", h.rx.changed())
        .await
        .expect("sender alive");
    let s = h.state();
    assert_eq!(keys(&s), ["shop/web"]);
    assert!(s.routes.is_empty());
}

/// The `status.parents` of an HTTPRoute on the fake server (`Null` when it has none).
fn route_parents(server: &FakeApiServer, name: &str) -> Value {
    server
        .get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", name)
        .map(|r| r["status"]["parents"].clone())
        .unwrap_or_default()
}

/// The condition `type_` of Weft's entry (the last one) of `parents`.
fn weft_condition(parents: &Value, type_: &str) -> Value {
    parents
        .as_array()
        .and_then(|ps| {
            ps.iter()
                .rfind(|p| p["controllerName"] == weft_controller::route_status::CONTROLLER_NAME)
        })
        .and_then(|p| p["conditions"].as_array())
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or_default()
}

fn route_status_writes(server: &FakeApiServer) -> Vec<RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "PATCH" && r.path.contains("/httproutes/") && r.path.ends_with("/status")
        })
        .collect()
}

#[tokio::test]
async fn k8s_route_status_is_written_once_and_keeps_other_controllers_entries() {
    use weft_controller::route_status::run_route_status_controller;
    init_tracing();
    let server = FakeApiServer::start().await;
    let port = json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
    server.apply(service("shop", "api", &["10.96.0.1"], port.clone()));
    server.apply(service("shop", "api-v1", &["10.96.0.2"], port.clone()));
    let foreign = json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    });
    let good_spec = json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
        "rules": [{"backendRefs": [{"group": "", "kind": "Service", "name": "api-v1", "port": 80, "weight": 1}]}],
    });
    // Weft's entry from an earlier generation: Accepted already True since T0.
    let t0 = "2026-01-01T00:00:00Z";
    let earlier = json!({
        "parentRef": {"group": "", "kind": "Service", "name": "api", "port": 80},
        "controllerName": "weft.dev/waypoint",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "earlier", "observedGeneration": 0, "lastTransitionTime": t0}],
    });
    server.apply(with(
        http_route("shop", "good", good_spec.clone()),
        "/status",
        json!({"parents": [foreign.clone(), earlier]}),
    ));
    server.apply(http_route("shop", "bad", json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
        "rules": [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "x", "port": 80}}}],
                   "backendRefs": [{"name": "api", "port": 80}]}],
    })));
    let task = tokio::spawn(run_route_status_controller(server.client()));
    until("both route statuses", || {
        weft_condition(&route_parents(&server, "good"), "ResolvedRefs").is_object()
            && route_parents(&server, "bad").is_array()
    })
    .await;
    let good = route_parents(&server, "good");
    assert_eq!(good[0], foreign, "another controller's entry is kept");
    assert_eq!(
        good[1]["parentRef"],
        json!({"group": "", "kind": "Service", "name": "api", "port": 80})
    );
    assert_eq!(good[1]["controllerName"], "weft.dev/waypoint");
    let accepted = weft_condition(&good, "Accepted");
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&json!("True"), &json!("Accepted"))
    );
    assert_eq!(accepted["observedGeneration"], 1);
    assert_eq!(
        accepted["lastTransitionTime"], t0,
        "status unchanged: time kept"
    );
    assert_ne!(
        weft_condition(&good, "ResolvedRefs")["lastTransitionTime"],
        t0
    );
    assert_eq!(good.as_array().map(Vec::len), Some(2), "{good:#}");
    assert_eq!(
        weft_condition(&good, "ResolvedRefs")["reason"],
        "ResolvedRefs"
    );
    let bad = route_parents(&server, "bad");
    assert_eq!(bad.as_array().map(Vec::len), Some(1));
    let refused = weft_condition(&bad, "Accepted");
    assert_eq!(
        (&refused["status"], &refused["reason"]),
        (&json!("False"), &json!("UnsupportedValue"))
    );
    let msg = refused["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("spec.rules[0].filters[0].type") && msg.contains("RequestMirror"),
        "{msg}"
    );
    let writes = route_status_writes(&server);
    assert_eq!(writes.len(), 2, "{writes:#?}");
    for w in &writes {
        assert_eq!(
            w.query.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER)
        );
        assert!(
            !w.query.contains_key("force"),
            "a merge patch, not an apply: {w:?}"
        );
    }
    let rv = |name: &str| {
        server
            .get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", name)
            .map(|r| r["metadata"]["resourceVersion"].clone())
            .unwrap_or_default()
    };
    let (good_rv, bad_rv) = (rv("good"), rv("bad"));

    // Nothing changed for good and bad: adding a route (and seeing its status written, twice, so
    // the passes after the earlier writes are done) writes only the new routes' statuses.
    for (n, name) in ["later", "last"].into_iter().enumerate() {
        server.apply(http_route("shop", name, good_spec.clone()));
        until("the new route's status", || {
            route_parents(&server, name).is_array()
        })
        .await;
        assert_eq!(
            route_status_writes(&server).len(),
            3 + n,
            "no status write loop"
        );
    }
    assert_eq!((rv("good"), rv("bad")), (good_rv, bad_rv));

    // A backend Service that goes away: ResolvedRefs follows (Services are watched too).
    server.delete("v1", "Service", "shop", "api-v1");
    until("BackendNotFound", || {
        weft_condition(&route_parents(&server, "good"), "ResolvedRefs")["reason"]
            == "BackendNotFound"
    })
    .await;
    let good = route_parents(&server, "good");
    assert_eq!(good[0], foreign);
    assert_eq!(
        weft_condition(&good, "Accepted")["lastTransitionTime"],
        accepted["lastTransitionTime"],
        "an unchanged condition keeps its time"
    );
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn k8s_route_status_without_gateway_api_crds_writes_nothing_and_keeps_running() {
    init_tracing();
    let server = FakeApiServer::start().await;
    for path in [
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
    ] {
        server.fail_path(path, 404, usize::MAX);
    }
    let task = tokio::spawn(weft_controller::route_status::run_route_status_controller(
        server.client(),
    ));
    until("the route lists to be tried twice", || {
        server
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/httproutes") && r.status == 404)
            .count()
            >= 2
    })
    .await;
    assert!(!task.is_finished());
    assert!(server.requests().iter().all(|r| r.method == "GET"));
    task.abort();
}
