//! Kubernetes mode: watches Namespaces and Pods with kube-runtime's watcher and reflector and
//! publishes the validated [`MeshState`] they describe.
//!
//! Every Kubernetes object is converted into the same documents the YAML-directory mode reads
//! ([`weft_api::resource`]) and validated by [`MeshState::from_resources`], so both modes share
//! one validation path. An invalid pod (a bad annotation, say) is left out with a warning; it
//! never blocks the rest of the cluster. Documented in docs/kubernetes.md.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodStatus};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;
use weft_api::resource::{self, ObjectMeta, Resource, Workload, WorkloadSpec};
use weft_api::{MeshState, ModelError, labels};

use crate::source::StateTx;

/// Server-side filter for the pod watch: scheduled, not terminal. (Checked again client-side.)
pub const POD_FIELD_SELECTOR: &str = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed";

/// Options of [`run`].
#[derive(Clone, Debug)]
pub struct K8sOptions {
    /// How long to gather further changes after a change before publishing a snapshot.
    pub debounce: Duration,
    /// Server-side timeout of each watch request in seconds (`None`: kube's default, 290 s).
    pub watch_timeout: Option<u32>,
    /// Give up (return [`K8sError::InitialSync`]) when the initial lists have not completed by
    /// then. `None`: keep retrying forever.
    pub initial_sync_timeout: Option<Duration>,
}

impl Default for K8sOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(50),
            watch_timeout: None,
            initial_sync_timeout: None,
        }
    }
}

/// Why Kubernetes mode stopped. Transient API errors never stop it; they are logged and retried.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "the initial list of {pending} did not complete within {after:.1?} (last error: {last_error}); check that the API server is reachable and that the controller's service account may list and watch namespaces and pods (manifests/rbac.yaml)"
    )]
    InitialSync {
        pending: String,
        after: Duration,
        last_error: String,
    },
    #[error(
        "the {kind} watch ended unexpectedly (a bug in Weft or kube-runtime); restart the controller"
    )]
    WatchEnded { kind: &'static str },
}

/// A mesh state built from the cluster, with every object that was left out and why.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub state: MeshState,
    /// `pod NS/NAME` or `namespace NAME` -> why it was left out (or, for a namespace, treated
    /// as not meshed).
    pub skipped: BTreeMap<String, String>,
}

/// Watches the cluster and publishes a complete, validated snapshot on `out` after both
/// initial lists completed and then, debounced, whenever the cluster changes. Returns `Ok` when
/// every receiver of `out` is gone.
pub async fn run(client: Client, out: StateTx, opts: K8sOptions) -> Result<(), K8sError> {
    let mut config = watcher::Config::default();
    if let Some(t) = opts.watch_timeout {
        config = config.timeout(t);
    }
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let namespaces = watcher(Api::<Namespace>::all(client.clone()), config.clone())
        .modify(|ns| ns.managed_fields_mut().clear())
        .default_backoff()
        .reflect(ns_writer);
    let pods = watcher(Api::<Pod>::all(client), config.fields(POD_FIELD_SELECTOR))
        .modify(trim_pod)
        .default_backoff()
        .reflect(pod_writer);
    let mut namespaces = pin!(namespaces);
    let mut pods = pin!(pods);

    let started = Instant::now();
    let mut ready = [false, false]; // namespaces, pods
    let mut last_error = String::from("none");
    let mut publish_at: Option<Instant> = None;
    let mut published_once = false;
    let mut reported = BTreeMap::new();
    loop {
        let synced = ready[0] && ready[1];
        let sync_deadline = opts
            .initial_sync_timeout
            .filter(|_| !synced)
            .map(|t| started + t);
        tokio::select! {
            ev = namespaces.next() => {
                if on_event("namespaces", ev, &mut ready[0], &mut last_error)? {
                    publish_at.get_or_insert_with(|| Instant::now() + opts.debounce);
                }
            }
            ev = pods.next() => {
                if on_event("pods", ev, &mut ready[1], &mut last_error)? {
                    publish_at.get_or_insert_with(|| Instant::now() + opts.debounce);
                }
            }
            () = sleep_until(publish_at), if synced && publish_at.is_some() => {
                publish_at = None;
                publish(&ns_store, &pod_store, &out, &mut published_once, &mut reported);
            }
            () = sleep_until(sync_deadline), if sync_deadline.is_some() => {
                let pending: Vec<&str> = [("namespaces", ready[0]), ("pods", ready[1])]
                    .into_iter()
                    .filter(|(_, r)| !r)
                    .map(|(k, _)| k)
                    .collect();
                return Err(K8sError::InitialSync {
                    pending: pending.join(" and "),
                    after: started.elapsed(),
                    last_error,
                });
            }
            () = out.closed() => return Ok(()),
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Handles one item of a reflected watch stream; returns whether the store may have changed.
fn on_event<K: kube::Resource>(
    kind: &'static str,
    ev: Option<Result<watcher::Event<K>, watcher::Error>>,
    ready: &mut bool,
    last_error: &mut String,
) -> Result<bool, K8sError> {
    match ev {
        None => Err(K8sError::WatchEnded { kind }),
        Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => Ok(false),
        Some(Ok(watcher::Event::InitDone)) => {
            if !*ready {
                tracing::info!(kind, "initial list complete");
            }
            *ready = true;
            Ok(true)
        }
        Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => Ok(true),
        Some(Err(e)) => {
            let msg = e.to_string();
            if let watcher::Error::WatchError(status) = &e
                && status.code == 410
            {
                // Routine on a real cluster: the resourceVersion expired; the watcher relists.
                tracing::info!(kind, "watch expired (410 Gone); relisting");
                return Ok(false);
            }
            let hint = if msg.contains("403") || msg.contains("orbidden") {
                "forbidden: the controller's service account needs get/list/watch on namespaces and pods (manifests/rbac.yaml)"
            } else {
                "retrying with backoff; the last published state stays in effect"
            };
            tracing::warn!(kind, error = %msg, "Kubernetes watch error: {hint}");
            *last_error = msg;
            Ok(false)
        }
    }
}

fn publish(
    ns_store: &Store<Namespace>,
    pod_store: &Store<Pod>,
    out: &StateTx,
    published_once: &mut bool,
    reported: &mut BTreeMap<String, String>,
) {
    let snapshot = match build_state(&ns_store.state(), &pod_store.state()) {
        Ok(s) => s,
        Err(errors) => {
            // Every object was validated on its own before; this means the two disagree.
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            tracing::error!(
                errors = %errors.join("; "),
                "internal error: the cluster state failed validation as a whole; keeping the last published state"
            );
            return;
        }
    };
    for (object, reason) in &snapshot.skipped {
        if reported.get(object) != Some(reason) {
            tracing::warn!(%object, %reason, "left out of the mesh state");
        }
    }
    for object in reported.keys() {
        if !snapshot.skipped.contains_key(object) {
            tracing::info!(%object, "no longer left out (fixed or gone)");
        }
    }
    *reported = snapshot.skipped;
    let state = snapshot.state;
    tracing::debug!(
        namespaces = state.namespaces.len(),
        workloads = state.workloads.len(),
        "publishing mesh state"
    );
    if *published_once {
        out.send_if_modified(|cur| {
            if **cur == state {
                false
            } else {
                *cur = Arc::new(state);
                true
            }
        });
    } else {
        // The first snapshot is always sent, even when empty: it marks the end of the sync.
        out.send_replace(Arc::new(state));
        *published_once = true;
    }
}

/// Builds the mesh state from the cluster's namespaces and pods. Invalid objects are left out
/// and listed in [`Snapshot::skipped`]; only an internal inconsistency is an error.
pub fn build_state(
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<Pod>],
) -> Result<Snapshot, Vec<ModelError>> {
    let mut skipped = BTreeMap::new();
    let mut docs = Vec::with_capacity(namespaces.len() + pods.len());
    for ns in namespaces {
        let (doc, problem) = namespace_resource(ns);
        if let Some(problem) = problem {
            skipped.insert(format!("namespace {}", doc.metadata.name), problem);
        }
        docs.push(Resource::Namespace(doc));
    }
    // Oldest first: when two pods claim one address, the older one keeps it.
    let mut pods: Vec<&Arc<Pod>> = pods.iter().collect();
    pods.sort_by(|a, b| {
        (&a.metadata.creation_timestamp, a.namespace(), a.name_any()).cmp(&(
            &b.metadata.creation_timestamp,
            b.namespace(),
            b.name_any(),
        ))
    });
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for pod in pods {
        let object = format!(
            "pod {}/{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any()
        );
        let workload = match pod_resource(pod) {
            Ok(Some(w)) => w,
            Ok(None) => continue,
            Err(reason) => {
                skipped.insert(object, reason);
                continue;
            }
        };
        let doc = Resource::Workload(workload);
        // The same validation as the whole state, on this pod alone.
        if let Err(errors) = MeshState::from_resources(std::slice::from_ref(&doc)) {
            let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
            skipped.insert(object, reasons.join("; "));
            continue;
        }
        let Resource::Workload(w) = &doc else {
            continue;
        };
        if let Some((ip, owner)) = w
            .spec
            .ips
            .iter()
            .find_map(|ip| owners.get(ip).map(|o| (ip, o)))
        {
            skipped.insert(
                object,
                format!("address {ip} is also claimed by the older pod {owner}"),
            );
            continue;
        }
        for ip in &w.spec.ips {
            owners.insert(*ip, object.trim_start_matches("pod ").to_string());
        }
        docs.push(doc);
    }
    let state = MeshState::from_resources(&docs)?;
    Ok(Snapshot { state, skipped })
}

/// A Namespace as a model document, and the problem with it if it has one. A namespace whose
/// `weft.dev/mesh` label is invalid is kept, as not meshed.
pub fn namespace_resource(ns: &Namespace) -> (resource::Namespace, Option<String>) {
    let name = ns.name_any();
    let mut problem = None;
    let mut labels = BTreeMap::new();
    if let Some(value) = ns.labels().get(labels::MESH) {
        let candidate = resource::Namespace {
            metadata: ObjectMeta {
                name: name.clone(),
                labels: BTreeMap::from([(labels::MESH.to_string(), value.clone())]),
                ..ObjectMeta::default()
            },
        };
        match MeshState::from_resources(&[Resource::Namespace(candidate)]) {
            Ok(_) => {
                labels.insert(labels::MESH.to_string(), value.clone());
            }
            Err(errors) => {
                let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
                problem = Some(format!("{}; treated as not meshed", reasons.join("; ")));
            }
        }
    }
    let doc = resource::Namespace {
        metadata: ObjectMeta {
            name,
            labels,
            ..ObjectMeta::default()
        },
    };
    (doc, problem)
}

/// A Pod as a model document. `Ok(None)`: the pod is not part of the mesh (not scheduled, no
/// address yet, finished, or on the host network). `Err`: the pod's data cannot be used.
///
/// The network namespace path is left empty: Kubernetes does not publish it; the node agent
/// resolves it from the pod's sandbox.
pub fn pod_resource(pod: &Pod) -> Result<Option<Workload>, String> {
    let Some(spec) = &pod.spec else {
        return Ok(None);
    };
    let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if spec.host_network == Some(true) {
        return Ok(None); // shares the node's network namespace: nothing to capture
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let mut ips = Vec::new();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|l| l.iter().map(|p| p.ip.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    let listed = if listed.is_empty() {
        status.and_then(|s| s.pod_ip.clone()).into_iter().collect()
    } else {
        listed
    };
    for ip in listed.iter().filter(|ip| !ip.is_empty()) {
        let parsed = ip
            .parse::<IpAddr>()
            .map_err(|_| format!("status.podIPs: `{ip}` is not an IP address"))?;
        if !ips.contains(&parsed) {
            ips.push(parsed);
        }
    }
    if ips.is_empty() {
        return Ok(None);
    }
    let annotations = pod
        .annotations()
        .iter()
        .filter(|(k, _)| k.starts_with("weft.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Some(Workload {
        metadata: ObjectMeta {
            name: pod.name_any(),
            namespace: pod.namespace(),
            labels: pod.labels().clone(),
            annotations,
        },
        spec: WorkloadSpec {
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            node,
            ips,
            netns: String::new(),
        },
    }))
}

/// Drops what Weft never reads from a pod before it is cached (containers, volumes, managed
/// fields, other annotations...): the cache holds every pod of the cluster.
fn trim_pod(pod: &mut Pod) {
    pod.managed_fields_mut().clear();
    pod.annotations_mut()
        .retain(|k, _| k.starts_with("weft.dev/"));
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network,
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, mesh: Option<&str>) -> Arc<Namespace> {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        if let Some(m) = mesh {
            n.metadata.labels = Some(BTreeMap::from([(labels::MESH.into(), m.into())]));
        }
        Arc::new(n)
    }

    fn pod(ns: &str, name: &str, ips: &[&str], extra: serde_json::Value) -> Arc<Pod> {
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": []},
            "status": {"phase": "Running", "podIPs": ips.iter().map(|i| serde_json::json!({"ip": i})).collect::<Vec<_>>()},
        });
        merge(&mut v, extra);
        Arc::new(serde_json::from_value(v).expect("pod"))
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn pods_become_workloads() {
        let s = build_state(
            &[ns("shop", Some("enabled"))],
            &[pod("shop", "web", &["10.0.0.1", "fd00::1"], serde_json::json!({
                "metadata": {"labels": {"app": "web"},
                             "annotations": {"weft.dev/exclude-outbound-ports": "5432", "other": "x"}}
            }))],
        )
        .expect("valid");
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);
        let w = &s.state.workloads["shop/web"];
        assert_eq!(w.service_account, "web");
        assert_eq!(w.node, "n1");
        assert_eq!(w.ip4.map(|i| i.to_string()).as_deref(), Some("10.0.0.1"));
        assert_eq!(w.ip6.map(|i| i.to_string()).as_deref(), Some("fd00::1"));
        assert!(w.capture.captured());
        assert_eq!(w.capture.exclusions.outbound_ports, vec![5432]);
        assert_eq!(w.netns.as_os_str(), "");
    }

    #[test]
    fn ineligible_pods_are_ignored_and_invalid_ones_skipped() {
        let s = build_state(
            &[ns("shop", Some("yes"))],
            &[
                pod(
                    "shop",
                    "done",
                    &["10.0.0.2"],
                    serde_json::json!({"status": {"phase": "Succeeded"}}),
                ),
                pod(
                    "shop",
                    "host",
                    &["10.0.0.3"],
                    serde_json::json!({"spec": {"hostNetwork": true}}),
                ),
                pod("shop", "pending", &[], serde_json::json!({})),
                pod(
                    "shop",
                    "bad",
                    &["10.0.0.4"],
                    serde_json::json!({
                    "metadata": {"annotations": {"weft.dev/exclude-inbound-ports": "http"}}}),
                ),
                pod("shop", "garbage-ip", &["10.0.0.300"], serde_json::json!({})),
                pod(
                    "shop",
                    "ok",
                    &["10.0.0.5"],
                    serde_json::json!({"spec": {"serviceAccountName": null}}),
                ),
            ],
        )
        .expect("valid");
        assert_eq!(s.state.workloads.keys().collect::<Vec<_>>(), ["shop/ok"]);
        assert_eq!(s.state.workloads["shop/ok"].service_account, "default");
        assert_eq!(s.state.namespaces.get("shop"), Some(&false));
        assert!(s.skipped["namespace shop"].contains("`yes`"));
        assert!(s.skipped["pod shop/bad"].contains("weft.dev/exclude-inbound-ports"));
        assert!(s.skipped["pod shop/garbage-ip"].contains("10.0.0.300"));
        assert_eq!(s.skipped.len(), 3, "{:?}", s.skipped);
    }

    #[test]
    fn the_older_pod_keeps_a_contested_address() {
        let s = build_state(
            &[ns("a", None)],
            &[
                pod(
                    "a",
                    "new",
                    &["10.0.0.9"],
                    serde_json::json!({"metadata": {"creationTimestamp": "2026-01-02T00:00:00Z"}}),
                ),
                pod(
                    "a",
                    "old",
                    &["10.0.0.9"],
                    serde_json::json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}}),
                ),
            ],
        )
        .expect("valid");
        assert_eq!(s.state.workloads.keys().collect::<Vec<_>>(), ["a/old"]);
        assert!(s.skipped["pod a/new"].contains("a/old"));
    }

    #[test]
    fn trimming_keeps_what_the_model_reads() {
        let p = pod(
            "shop",
            "web",
            &["10.0.0.1"],
            serde_json::json!({
                "metadata": {"annotations": {"weft.dev/exclude-outbound-ports": "1", "big": "x"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            }),
        );
        let mut trimmed = (*p).clone();
        trim_pod(&mut trimmed);
        assert!(
            trimmed
                .spec
                .as_ref()
                .is_some_and(|s| s.containers.is_empty())
        );
        assert_eq!(trimmed.annotations().len(), 1);
        assert_eq!(pod_resource(&trimmed), pod_resource(&p));
    }
}
