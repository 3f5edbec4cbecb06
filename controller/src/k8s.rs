//! Kubernetes mode: watches Namespaces, Pods, Services, EndpointSlices and Weft's
//! AuthorizationPolicies with kube-runtime's watcher and reflector and publishes the validated
//! [`MeshState`] they describe.
//!
//! Every Kubernetes object is converted into the same documents the YAML-directory mode reads
//! ([`weft_api::resource`]) and validated by the same code ([`MeshState::from_resources`],
//! [`weft_api::model::service_from_parts`], [`crate::crd::accept`]), so both modes share one
//! validation path. An invalid object (a bad annotation, say) is left out with a warning; it
//! never blocks the rest of the cluster. Documented in docs/kubernetes.md.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;
use weft_api::model::{EndpointInfo, ServiceInfo, service_from_parts};
use weft_api::resource::{self, ObjectMeta, Resource, Workload, WorkloadSpec};
use weft_api::{MeshState, ModelError, WorkloadInfo, labels};

use crate::crd::{self, AuthorizationPolicy};
use crate::source::StateTx;

/// Server-side filter for the pod watch: scheduled, not terminal. (Checked again client-side.)
pub const POD_FIELD_SELECTOR: &str = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed";

/// The label that ties an EndpointSlice to its Service (same namespace). The EndpointSlice
/// watch selects on it: slices without it belong to no Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The watched kinds (resource names, as in RBAC), in the order of the `ready` flags of [`run`].
const KINDS: [&str; 7] = [
    "namespaces",
    "pods",
    "services",
    "endpointslices",
    "authorizationpolicies",
    "httproutes",
    "grpcroutes",
];

/// Kinds whose CRDs may be absent (the Gateway API is optional): a 404 means "none".
const OPTIONAL_KINDS: [&str; 2] = ["httproutes", "grpcroutes"];

/// The Gateway API resource `kind` (`HTTPRoute`, `GRPCRoute`) served as `plural`.
pub(crate) fn gateway_api_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind),
        plural,
    )
}

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
        "the initial list of {pending} did not complete within {after:.1?} (last error: {last_error}); check that the API server is reachable, that the controller's service account may list and watch namespaces, pods, services, endpointslices and authorizationpolicies (manifests/rbac.yaml), and that the AuthorizationPolicy CRD is installed (manifests/crds/)"
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
    /// What was left out (or, for a namespace, treated as not meshed) and why, keyed
    /// `namespace NAME`, `pod NS/NAME`, `service NS/NAME`, `service NS/NAME port PORT` (one
    /// port of a service that is in the state), `endpointslice NS/NAME` (one of its endpoints)
    /// or `authorizationpolicy NS/NAME`.
    pub skipped: BTreeMap<String, String>,
}

/// Everything Kubernetes mode reads from the cluster (what its reflectors hold).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    /// Only slices labelled [`SERVICE_NAME_LABEL`] are read.
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub policies: Vec<Arc<AuthorizationPolicy>>,
    /// Gateway API HTTPRoutes (empty when the CRD is not installed).
    pub http_routes: Vec<Arc<DynamicObject>>,
    /// Gateway API GRPCRoutes (empty when the CRD is not installed).
    pub grpc_routes: Vec<Arc<DynamicObject>>,
}

/// The reflectors' stores.
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    policies: Store<AuthorizationPolicy>,
    http_routes: Store<DynamicObject>,
    grpc_routes: Store<DynamicObject>,
}

impl Stores {
    fn objects(&self) -> Objects {
        Objects {
            namespaces: self.namespaces.state(),
            pods: self.pods.state(),
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            policies: self.policies.state(),
            http_routes: self.http_routes.state(),
            grpc_routes: self.grpc_routes.state(),
        }
    }
}

/// Validates a Gateway API route object (`kind` `httproute` or `grpcroute`) as the directory
/// mode does; the error lists every problem.
pub(crate) fn route_info(
    kind: &str,
    o: &DynamicObject,
) -> Result<weft_api::routes::RouteInfo, String> {
    let doc = serde_json::json!({
        "metadata": {"name": o.name_any(), "namespace": o.namespace()},
        "spec": o.data.get("spec").cloned().unwrap_or_else(|| serde_json::json!({})),
    });
    let problems = |errors: Vec<weft_api::routes::RouteError>| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    let unreadable = |e: serde_json::Error| {
        format!("spec cannot be read ({e}); Weft implements the fields listed in docs/waypoint.md")
    };
    if kind == "grpcroute" {
        let r: resource::GrpcRoute = serde_json::from_value(doc).map_err(unreadable)?;
        weft_api::routes::grpc_route_info(&r).map_err(problems)
    } else {
        let r: resource::HttpRoute = serde_json::from_value(doc).map_err(unreadable)?;
        weft_api::routes::http_route_info(&r).map_err(problems)
    }
}

/// Watches the cluster and publishes a complete, validated snapshot on `out` after every
/// initial list (namespaces, pods, services, endpointslices, authorizationpolicies, and the
/// Gateway API's httproutes and grpcroutes, which may be absent) completed
/// and then, debounced, whenever the cluster changes. Returns `Ok` when every receiver of `out`
/// is gone.
pub async fn run(client: Client, out: StateTx, opts: K8sOptions) -> Result<(), K8sError> {
    let mut config = watcher::Config::default();
    if let Some(t) = opts.watch_timeout {
        config = config.timeout(t);
    }
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
    let (policy_store, policy_writer) = reflector::store::<AuthorizationPolicy>();
    let namespaces = watcher(Api::<Namespace>::all(client.clone()), config.clone())
        .modify(trim_metadata)
        .default_backoff()
        .reflect(ns_writer);
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        config.clone().fields(POD_FIELD_SELECTOR),
    )
    .modify(trim_pod)
    .default_backoff()
    .reflect(pod_writer);
    let services = watcher(Api::<Service>::all(client.clone()), config.clone())
        .modify(trim_metadata)
        .default_backoff()
        .reflect(svc_writer);
    let slices = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        config.clone().labels(SERVICE_NAME_LABEL),
    )
    .modify(trim_metadata)
    .default_backoff()
    .reflect(slice_writer);
    let policies = watcher(
        Api::<AuthorizationPolicy>::all(client.clone()),
        config.clone(),
    )
    .modify(trim_metadata)
    .default_backoff()
    .reflect(policy_writer);
    let http_ar = gateway_api_resource("HTTPRoute", "httproutes");
    let http_writer = reflector::store::Writer::<DynamicObject>::new(http_ar.clone());
    let http_store = http_writer.as_reader();
    let http_routes = watcher(
        Api::<DynamicObject>::all_with(client.clone(), &http_ar),
        config.clone(),
    )
    .modify(trim_metadata)
    .default_backoff()
    .reflect(http_writer);
    let grpc_ar = gateway_api_resource("GRPCRoute", "grpcroutes");
    let grpc_writer = reflector::store::Writer::<DynamicObject>::new(grpc_ar.clone());
    let grpc_store = grpc_writer.as_reader();
    let grpc_routes = watcher(Api::<DynamicObject>::all_with(client, &grpc_ar), config)
        .modify(trim_metadata)
        .default_backoff()
        .reflect(grpc_writer);
    let stores = Stores {
        namespaces: ns_store,
        pods: pod_store,
        services: svc_store,
        endpoint_slices: slice_store,
        policies: policy_store,
        http_routes: http_store,
        grpc_routes: grpc_store,
    };
    let mut namespaces = pin!(namespaces);
    let mut pods = pin!(pods);
    let mut services = pin!(services);
    let mut slices = pin!(slices);
    let mut policies = pin!(policies);
    let mut http_routes = pin!(http_routes);
    let mut grpc_routes = pin!(grpc_routes);

    let started = Instant::now();
    let mut ready = [false; KINDS.len()];
    let mut last_error = String::from("none");
    let mut publish_at: Option<Instant> = None;
    let mut published_once = false;
    let mut reported = BTreeMap::new();
    loop {
        let synced = ready.iter().all(|r| *r);
        let sync_deadline = opts
            .initial_sync_timeout
            .filter(|_| !synced)
            .map(|t| started + t);
        let changed = tokio::select! {
            ev = namespaces.next() => on_event(KINDS[0], ev, &mut ready[0], &mut last_error)?,
            ev = pods.next() => on_event(KINDS[1], ev, &mut ready[1], &mut last_error)?,
            ev = services.next() => on_event(KINDS[2], ev, &mut ready[2], &mut last_error)?,
            ev = slices.next() => on_event(KINDS[3], ev, &mut ready[3], &mut last_error)?,
            ev = policies.next() => on_event(KINDS[4], ev, &mut ready[4], &mut last_error)?,
            ev = http_routes.next() => on_event(KINDS[5], ev, &mut ready[5], &mut last_error)?,
            ev = grpc_routes.next() => on_event(KINDS[6], ev, &mut ready[6], &mut last_error)?,
            () = sleep_until(publish_at), if synced && publish_at.is_some() => {
                publish_at = None;
                publish(&stores.objects(), &out, &mut published_once, &mut reported);
                false
            }
            () = sleep_until(sync_deadline), if sync_deadline.is_some() => {
                let pending: Vec<&str> = KINDS
                    .iter()
                    .zip(ready)
                    .filter(|(_, r)| !r)
                    .map(|(k, _)| *k)
                    .collect();
                return Err(K8sError::InitialSync {
                    pending: join_and(&pending),
                    after: started.elapsed(),
                    last_error,
                });
            }
            () = out.closed() => return Ok(()),
        };
        if changed {
            publish_at.get_or_insert_with(|| Instant::now() + opts.debounce);
        }
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_and(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The HTTP status of an API error, if the error is one.
pub(crate) fn api_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
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
            let code = api_code(&e);
            if code == Some(404) && OPTIONAL_KINDS.contains(&kind) {
                // The Gateway API CRDs are not installed: no routes (the watcher retries with
                // backoff and picks them up once they are).
                if !*ready {
                    tracing::info!(
                        kind,
                        "not served by the API server (Gateway API CRDs not installed): no routes from it"
                    );
                    *ready = true;
                    return Ok(true);
                }
                return Ok(false);
            }
            if matches!(e, watcher::Error::WatchError(_)) && code == Some(410) {
                // Routine on a real cluster: the resourceVersion expired; the watcher relists.
                tracing::info!(kind, "watch expired (410 Gone); relisting");
                return Ok(false);
            }
            let hint = match code {
                Some(403) => format!(
                    "forbidden: the controller's service account needs get/list/watch on {kind} (manifests/rbac.yaml)"
                ),
                Some(404) if kind == "authorizationpolicies" => "not found: is the AuthorizationPolicy CRD installed? (kubectl apply -f manifests/crds/); no mesh state is published until policies can be listed".to_string(),
                _ => "retrying with backoff; the last published state stays in effect".to_string(),
            };
            tracing::warn!(kind, error = %msg, "Kubernetes watch error: {hint}");
            *last_error = msg;
            Ok(false)
        }
    }
}

fn publish(
    objects: &Objects,
    out: &StateTx,
    published_once: &mut bool,
    reported: &mut BTreeMap<String, String>,
) {
    let snapshot = match build_state(objects) {
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
        services = state.services.len(),
        policies = state.policies.len(),
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

/// Builds the mesh state from the cluster's objects. Invalid objects are left out and listed
/// in [`Snapshot::skipped`]; only an internal inconsistency is an error.
pub fn build_state(objects: &Objects) -> Result<Snapshot, Vec<ModelError>> {
    let mut skipped = BTreeMap::new();
    let mut docs = Vec::with_capacity(objects.namespaces.len() + objects.pods.len());
    let mut waypoints = BTreeMap::new();
    for ns in &objects.namespaces {
        let (doc, problem) = namespace_resource(ns);
        if let Some(problem) = problem {
            skipped.insert(format!("namespace {}", doc.metadata.name), problem);
        }
        if let Ok(Some(w)) = weft_api::model::namespace_waypoint(&doc) {
            waypoints.insert(doc.metadata.name.clone(), w);
        }
        docs.push(Resource::Namespace(doc));
    }
    // Oldest first: when two pods claim one address, the older one keeps it.
    let mut pods: Vec<&Arc<Pod>> = objects.pods.iter().collect();
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
    let mut state = MeshState::from_resources(&docs)?;
    add_services(
        &mut state,
        &objects.services,
        &objects.endpoint_slices,
        &waypoints,
        &mut skipped,
    );
    for policy in &objects.policies {
        match crd::accept(policy) {
            Ok(info) => {
                state.policies.insert(info.key(), info);
            }
            Err(problems) => {
                let object = format!(
                    "authorizationpolicy {}/{}",
                    policy.namespace().unwrap_or_default(),
                    policy.name_any()
                );
                skipped.insert(
                    object,
                    format!("{} (its status says so too)", problems.join("; ")),
                );
            }
        }
    }
    for (kind, objects) in [
        ("httproute", &objects.http_routes),
        ("grpcroute", &objects.grpc_routes),
    ] {
        for route in objects {
            let object = format!(
                "{kind} {}/{}",
                route.namespace().unwrap_or_default(),
                route.name_any()
            );
            match route_info(kind, route) {
                Ok(info) => {
                    state.routes.insert(info.key(), info);
                }
                Err(problem) => {
                    skipped.insert(object, problem);
                }
            }
        }
    }
    Ok(Snapshot { state, skipped })
}

/// Adds the services, each with the endpoints of its EndpointSlices. When two services claim
/// one virtual IP (only possible briefly), the older one keeps it.
fn add_services(
    state: &mut MeshState,
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    waypoints: &BTreeMap<String, String>,
    skipped: &mut BTreeMap<String, String>,
) {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) {
            let ns = slice.namespace().unwrap_or_default();
            by_service
                .entry((ns, service.clone()))
                .or_default()
                .push(slice);
        }
    }
    for list in by_service.values_mut() {
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    let addresses: BTreeMap<IpAddr, String> = state
        .workloads
        .values()
        .flat_map(|w| {
            let ips = w
                .ip4
                .map(IpAddr::V4)
                .into_iter()
                .chain(w.ip6.map(IpAddr::V6));
            ips.map(|ip| (ip, w.key()))
        })
        .collect();
    let mut services: Vec<&Arc<Service>> = services.iter().collect();
    services.sort_by(|a, b| {
        (&a.metadata.creation_timestamp, a.namespace(), a.name_any()).cmp(&(
            &b.metadata.creation_timestamp,
            b.namespace(),
            b.name_any(),
        ))
    });
    let mut vip_owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for svc in services {
        let id = (svc.namespace().unwrap_or_default(), svc.name_any());
        let key = format!("{}/{}", id.0, id.1);
        let slices = by_service.get(&id).map(Vec::as_slice).unwrap_or_default();
        let mut notes = Vec::new();
        let waypoint = waypoints.get(&id.0).map(String::as_str);
        let info = match service_info(
            svc,
            slices,
            &state.workloads,
            &addresses,
            waypoint,
            &mut notes,
        ) {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(reason) => {
                skipped.insert(format!("service {key}"), reason);
                continue;
            }
        };
        if let Some((ip, owner)) = info
            .vips
            .iter()
            .find_map(|ip| vip_owners.get(ip).map(|o| (ip, o)))
        {
            skipped.insert(
                format!("service {key}"),
                format!("virtual IP {ip} is also claimed by the older service {owner}"),
            );
            continue;
        }
        for ip in &info.vips {
            vip_owners.insert(*ip, key.clone());
        }
        skipped.extend(notes);
        state.services.insert(key, info);
    }
}

/// A Service with the endpoints of its EndpointSlices (`slices`, in name order), validated by
/// the model. `Ok(None)`: not part of the mesh (no spec, or `type: ExternalName`). `Err`: the
/// Service cannot be used. Ports and endpoints left out are added to `notes` (object, reason).
///
/// An endpoint's `workload` is the `namespace/name` of the workload it is (by its `targetRef`
/// Pod, or else by its address), or empty when it is none of the state's workloads (a pod left
/// out or not seen yet, a host-network pod, an address outside the cluster's pods).
pub fn service_info(
    svc: &Service,
    slices: &[&EndpointSlice],
    workloads: &BTreeMap<String, WorkloadInfo>,
    addresses: &BTreeMap<IpAddr, String>,
    namespace_waypoint: Option<&str>,
    notes: &mut Vec<(String, String)>,
) -> Result<Option<ServiceInfo>, String> {
    let Some(spec) = &svc.spec else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None); // a DNS alias: no virtual IP, no endpoints
    }
    let namespace = svc.namespace().unwrap_or_default();
    let object = format!("service {namespace}/{}", svc.name_any());
    let mut cluster_ips = Vec::new();
    for ip in spec.cluster_ips.iter().flatten() {
        if ip.is_empty() || ip == "None" {
            continue; // headless
        }
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("spec.clusterIPs: `{ip}` is not an IP address"))?;
        if !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    let mut unresolved = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        // Out of range: 0, which the model reports as not a port.
        let port = u16::try_from(p.port).unwrap_or(0);
        let tcp = p.protocol.as_deref().is_none_or(|proto| proto == "TCP");
        let target_port = match &p.target_port {
            None => None,
            Some(IntOrString::Int(n)) => Some(
                u16::try_from(*n)
                    .ok()
                    .filter(|n| *n != 0)
                    .ok_or_else(|| format!("spec.ports[{i}].targetPort: {n} is not a port"))?,
            ),
            Some(IntOrString::String(named)) => match named.parse::<u16>() {
                Ok(n) if n != 0 => Some(n),
                _ if !tcp => None, // not meshed anyway
                _ => match resolve_named_port(p.name.as_deref(), named, slices) {
                    Ok(n) => Some(n),
                    Err(why) => {
                        notes.push((format!("{object} port {port}"), why));
                        unresolved.insert(port);
                        None
                    }
                },
            },
        };
        ports.push(resource::ServicePortSpec {
            name: p.name.clone(),
            port,
            target_port,
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
        });
    }
    // The labels the model reads (waypoint binding).
    let labels = svc
        .labels()
        .iter()
        .filter(|(k, _)| *k == labels::USE_WAYPOINT || *k == labels::WAYPOINT)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let doc = resource::Service {
        metadata: ObjectMeta {
            name: svc.name_any(),
            namespace: Some(namespace.clone()),
            labels,
            ..ObjectMeta::default()
        },
        spec: resource::ServiceSpec {
            cluster_ips,
            cluster_ip: spec.cluster_ip.clone(),
            ports,
            selector: BTreeMap::new(), // endpoints come from the EndpointSlices
        },
    };
    let endpoints = slice_endpoints(&namespace, slices, workloads, addresses, notes);
    let mut info =
        service_from_parts(&doc, endpoints, namespace_waypoint).map_err(|e| e.to_string())?;
    info.ports.retain(|p| !unresolved.contains(&p.port));
    Ok(Some(info))
}

/// The port number a named `targetPort` stands for, from the EndpointSlices: their ports are
/// named after the Service's ports and hold the number resolved on the pods.
fn resolve_named_port(
    port_name: Option<&str>,
    target: &str,
    slices: &[&EndpointSlice],
) -> Result<u16, String> {
    let want = port_name.unwrap_or_default();
    let mut found: Vec<u16> = Vec::new();
    let ports = slices.iter().flat_map(|s| s.ports.iter().flatten());
    for p in ports.filter(|p| p.name.as_deref().unwrap_or_default() == want) {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let number = p
            .port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0);
        if let Some(n) = number.filter(|n| !found.contains(n)) {
            found.push(n);
        }
    }
    match found.as_slice() {
        [n] => Ok(*n),
        [] => Err(format!(
            "targetPort `{target}` is a named port and no EndpointSlice of the service resolves it (no endpoint yet, or no pod defines it); the port is left out until one does"
        )),
        many => {
            let many: Vec<String> = many.iter().map(ToString::to_string).collect();
            Err(format!(
                "targetPort `{target}` resolves to different ports on different endpoints ({}); Weft holds one target port per service port, so the port is left out until they agree",
                many.join(", ")
            ))
        }
    }
}

/// The endpoints of a service's EndpointSlices. The two families of a dual-stack endpoint
/// (one IPv4 and one IPv6 slice) are merged by their `targetRef` Pod (or workload); only the
/// first address of an endpoint is used (Kubernetes says they are fungible); a missing
/// `conditions.ready` means ready; FQDN slices are ignored.
fn slice_endpoints(
    namespace: &str,
    slices: &[&EndpointSlice],
    workloads: &BTreeMap<String, WorkloadInfo>,
    addresses: &BTreeMap<IpAddr, String>,
    notes: &mut Vec<(String, String)>,
) -> Vec<EndpointInfo> {
    let mut merged: BTreeMap<String, EndpointInfo> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for (i, ep) in slice.endpoints.iter().enumerate() {
            let Some(address) = ep.addresses.first() else {
                continue;
            };
            let Ok(ip) = address.parse::<IpAddr>() else {
                notes.push((
                    format!("endpointslice {namespace}/{}", slice.name_any()),
                    format!(
                        "endpoints[{i}].addresses[0]: `{address}` is not an IP address; the endpoint is left out"
                    ),
                ));
                continue;
            };
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let ns = r.namespace.as_deref().unwrap_or(namespace);
                    r.name.as_ref().map(|name| format!("{ns}/{name}"))
                });
            let workload = match &pod {
                Some(key) if workloads.contains_key(key) => key.clone(),
                Some(_) => String::new(),
                None => addresses.get(&ip).cloned().unwrap_or_default(),
            };
            let merge_key = match pod {
                Some(key) => key,
                None if !workload.is_empty() => workload.clone(),
                None => ip.to_string(),
            };
            let e = merged.entry(merge_key).or_insert_with(|| EndpointInfo {
                workload,
                ip4: None,
                ip6: None,
                ready: true,
            });
            e.ready &= ready;
            match ip {
                IpAddr::V4(a) => {
                    e.ip4.get_or_insert(a);
                }
                IpAddr::V6(a) => {
                    e.ip6.get_or_insert(a);
                }
            }
        }
    }
    merged.into_values().collect()
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
    if let Some(value) = ns.labels().get(labels::USE_WAYPOINT) {
        let candidate = resource::Namespace {
            metadata: ObjectMeta {
                name: name.clone(),
                labels: BTreeMap::from([(labels::USE_WAYPOINT.to_string(), value.clone())]),
                ..ObjectMeta::default()
            },
        };
        match weft_api::model::namespace_waypoint(&candidate) {
            Ok(_) => {
                labels.insert(labels::USE_WAYPOINT.to_string(), value.clone());
            }
            Err(e) => {
                let p = format!("{e}; no waypoint used");
                problem = Some(problem.map_or(p.clone(), |q| format!("{q}; {p}")));
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

/// Drops the managed fields and annotations (the last applied configuration, often the largest
/// part of an object) before an object is cached: Weft reads neither.
fn trim_metadata<K: kube::Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
    obj.annotations_mut().clear();
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

    fn objects(namespaces: &[Arc<Namespace>], pods: &[Arc<Pod>]) -> Objects {
        Objects {
            namespaces: namespaces.to_vec(),
            pods: pods.to_vec(),
            ..Objects::default()
        }
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
        let s = build_state(&objects(
            &[ns("shop", Some("enabled"))],
            &[pod("shop", "web", &["10.0.0.1", "fd00::1"], serde_json::json!({
                "metadata": {"labels": {"app": "web"},
                             "annotations": {"weft.dev/exclude-outbound-ports": "5432", "other": "x"}}
            }))],
        ))
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
        let s = build_state(&objects(
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
        ))
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
        let s = build_state(&objects(
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
        ))
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

    fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("a valid object"))
    }

    fn service(ns: &str, name: &str, spec: serde_json::Value) -> Arc<Service> {
        from_json(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
    }

    /// An EndpointSlice of `service`; `endpoints`: (address, targetRef pod, ready).
    fn slice(
        ns: &str,
        name: &str,
        service: &str,
        family: &str,
        ports: serde_json::Value,
        endpoints: &[(&str, Option<&str>, Option<bool>)],
    ) -> Arc<EndpointSlice> {
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(addr, pod, ready)| {
                let mut e =
                    serde_json::json!({"addresses": [addr], "conditions": {"ready": ready}});
                if let Some(pod) = pod {
                    e["targetRef"] =
                        serde_json::json!({"kind": "Pod", "namespace": ns, "name": pod});
                }
                e
            })
            .collect();
        from_json(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": family, "ports": ports, "endpoints": endpoints,
        }))
    }

    fn ip<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().expect("an address")
    }

    #[test]
    fn waypoint_labels_bind_services_and_waypoint_pods_are_not_captured() {
        let mut shop = (*ns("shop", Some("enabled"))).clone();
        shop.metadata
            .labels
            .get_or_insert_default()
            .insert(labels::USE_WAYPOINT.into(), "waypoint".into());
        let mut bad = (*ns("bad", Some("enabled"))).clone();
        bad.metadata
            .labels
            .get_or_insert_default()
            .insert(labels::USE_WAYPOINT.into(), "Bad Name".into());
        let pods = [pod(
            "shop",
            "waypoint-1",
            &["10.0.0.9"],
            serde_json::json!({"metadata": {"labels": {"weft.dev/waypoint": "waypoint"}}}),
        )];
        let spec = serde_json::json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]});
        let labelled = |ns: &str, name: &str, ip: &str, labels: serde_json::Value| {
            let mut v = serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": spec.clone(),
            });
            v["spec"]["clusterIP"] = ip.into();
            from_json(v)
        };
        let mut o = objects(&[Arc::new(shop), Arc::new(bad)], &pods);
        o.services = vec![
            service("shop", "web", spec.clone()),
            labelled(
                "shop",
                "db",
                "10.96.0.11",
                serde_json::json!({"weft.dev/use-waypoint": "none"}),
            ),
            labelled(
                "shop",
                "waypoint",
                "10.96.0.12",
                serde_json::json!({"weft.dev/waypoint": "waypoint"}),
            ),
            labelled(
                "bad",
                "one",
                "10.96.0.13",
                serde_json::json!({"weft.dev/use-waypoint": "wp"}),
            ),
            labelled("bad", "two", "10.96.0.14", serde_json::json!({})),
        ];
        let snap = build_state(&o).expect("state");
        let wp = |k: &str| snap.state.services[k].waypoint.clone();
        assert_eq!(wp("shop/web").as_deref(), Some("shop/waypoint"));
        assert_eq!(wp("shop/db"), None);
        assert_eq!(wp("shop/waypoint"), None);
        assert_eq!(
            wp("bad/one").as_deref(),
            Some("bad/wp"),
            "a service label still binds"
        );
        assert_eq!(
            wp("bad/two"),
            None,
            "an invalid namespace label binds nothing"
        );
        assert!(
            snap.skipped["namespace bad"].contains("Bad Name"),
            "{:?}",
            snap.skipped
        );
        assert!(!snap.state.workloads["shop/waypoint-1"].capture.captured());
    }

    #[test]
    fn services_take_vips_ports_and_endpoints_from_kubernetes() {
        let pods = [
            pod(
                "shop",
                "web-1",
                &["10.0.0.1", "fd00::1"],
                serde_json::json!({}),
            ),
            pod("shop", "web-2", &["10.0.0.2"], serde_json::json!({})),
            pod("shop", "web-3", &["10.0.0.3"], serde_json::json!({})),
            pod(
                "shop",
                "host",
                &["192.168.0.1"],
                serde_json::json!({"spec": {"hostNetwork": true}}),
            ),
        ];
        let web = service(
            "shop",
            "web",
            serde_json::json!({
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"},
                    {"name": "grpc", "port": 9000, "targetPort": "grpc"},
                    {"name": "admin", "port": 9901, "targetPort": "admin"},
                    {"name": "plain", "port": 7000},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                ],
            }),
        );
        let ports = serde_json::json!([
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "grpc", "port": 9090, "protocol": "TCP"},
        ]);
        let slices = [
            slice(
                "shop",
                "web-v4",
                "web",
                "IPv4",
                ports.clone(),
                &[
                    ("10.0.0.1", Some("web-1"), Some(true)),
                    ("10.0.0.2", Some("web-2"), Some(false)),
                    ("10.0.0.3", None, None),
                    ("192.168.0.1", Some("host"), Some(true)),
                    ("10.9.9.9", None, Some(true)),
                    ("10.0.0.300", None, Some(true)),
                ],
            ),
            slice(
                "shop",
                "web-v6",
                "web",
                "IPv6",
                ports,
                &[("fd00::1", Some("web-1"), Some(true))],
            ),
            slice(
                "shop",
                "other",
                "api",
                "IPv4",
                serde_json::json!([]),
                &[("10.0.0.7", None, None)],
            ),
            slice(
                "shop",
                "names",
                "web",
                "FQDN",
                serde_json::json!([]),
                &[("example.com", None, None)],
            ),
        ];
        let s = build_state(&Objects {
            namespaces: vec![ns("shop", Some("enabled"))],
            pods: pods.to_vec(),
            services: vec![web],
            endpoint_slices: slices.to_vec(),
            ..Objects::default()
        })
        .expect("valid");
        let svc = &s.state.services["shop/web"];
        assert_eq!(svc.hostname, "web.shop.svc.cluster.local");
        assert_eq!(svc.vips, [ip::<IpAddr>("10.96.0.10"), ip("fd00:96::10")]);
        let ports: Vec<(&str, u16, u16, &str)> = svc
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
            [
                ("http", 80, 8080, "http"),
                ("grpc", 9000, 9090, ""),
                ("plain", 7000, 7000, "")
            ],
            "admin (unresolved) and dns (UDP) are left out"
        );
        assert!(
            s.skipped["service shop/web port 9901"].contains("`admin`"),
            "{:?}",
            s.skipped
        );
        let eps: Vec<(&str, Option<String>, Option<String>, bool)> = svc
            .endpoints
            .iter()
            .map(|e| {
                let text = |ip: Option<String>| ip;
                (
                    e.workload.as_str(),
                    text(e.ip4.map(|i| i.to_string())),
                    text(e.ip6.map(|i| i.to_string())),
                    e.ready,
                )
            })
            .collect();
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            eps,
            [
                ("", some("10.9.9.9"), None, true),
                ("", some("192.168.0.1"), None, true),
                ("shop/web-1", some("10.0.0.1"), some("fd00::1"), true),
                ("shop/web-2", some("10.0.0.2"), None, false),
                ("shop/web-3", some("10.0.0.3"), None, true),
            ]
        );
        assert!(s.skipped["endpointslice shop/web-v4"].contains("10.0.0.300"));
        assert_eq!(s.skipped.len(), 2, "{:?}", s.skipped);
        assert_eq!(s.state.services.len(), 1, "no Service `api`, no entry");
    }

    #[test]
    fn headless_external_duplicate_and_invalid_services() {
        let created = |svc: Arc<Service>, at: &str| {
            let mut svc = (*svc).clone();
            let at = serde_json::from_value(serde_json::json!(at)).expect("time");
            svc.metadata.creation_timestamp = Some(at);
            Arc::new(svc)
        };
        let s = build_state(&Objects {
            services: vec![
                service("a", "headless", serde_json::json!({"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]})),
                service("a", "ext", serde_json::json!({"type": "ExternalName", "externalName": "example.com"})),
                created(service("a", "new", serde_json::json!({"clusterIPs": ["10.96.0.1"]})), "2026-01-02T00:00:00Z"),
                created(service("b", "old", serde_json::json!({"clusterIPs": ["10.96.0.1"]})), "2026-01-01T00:00:00Z"),
                service("a", "garbage", serde_json::json!({"clusterIPs": ["10.96.0.300"]})),
                service("a", "twice", serde_json::json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}, {"port": 80, "name": "again"}]})),
                service("a", "split", serde_json::json!({"clusterIP": "10.96.0.3", "ports": [{"name": "web", "port": 80, "targetPort": "http"}]})),
            ],
            endpoint_slices: vec![
                slice("a", "split-1", "split", "IPv4", serde_json::json!([{"name": "web", "port": 8080}]), &[("10.1.0.1", None, None)]),
                slice("a", "split-2", "split", "IPv4", serde_json::json!([{"name": "web", "port": 8081}]), &[("10.1.0.2", None, None)]),
            ],
            ..Objects::default()
        })
        .expect("valid");
        let keys: Vec<&str> = s.state.services.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a/headless", "a/split", "b/old"]);
        let headless = &s.state.services["a/headless"];
        assert!(headless.vips.is_empty() && headless.ports.len() == 1);
        assert!(s.skipped["service a/new"].contains("older service b/old"));
        assert!(s.skipped["service a/garbage"].contains("10.96.0.300"));
        assert!(
            s.skipped["service a/twice"].contains("port 80 listed twice"),
            "{:?}",
            s.skipped
        );
        let split = &s.state.services["a/split"];
        assert!(split.ports.is_empty() && split.endpoints.len() == 2);
        assert!(s.skipped["service a/split port 80"].contains("8080, 8081"));
        assert_eq!(s.skipped.len(), 4, "{:?}", s.skipped);
    }

    #[test]
    fn gateway_api_routes_enter_the_state_or_are_reported() {
        let route = |kind: &str, name: &str, spec: serde_json::Value| -> Arc<DynamicObject> {
            let plural = if kind == "HTTPRoute" {
                "httproutes"
            } else {
                "grpcroutes"
            };
            let ar = gateway_api_resource(kind, plural);
            let mut o = DynamicObject::new(name, &ar).within("shop");
            o.data = serde_json::json!({"spec": spec});
            Arc::new(o)
        };
        let s = build_state(&Objects {
            http_routes: vec![
                route("HTTPRoute", "good", serde_json::json!({
                    // As the API server returns it, defaults filled in.
                    "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
                    "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                               "backendRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80, "weight": 1}]}],
                })),
                route("HTTPRoute", "mirror", serde_json::json!({
                    "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
                    "rules": [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "x", "port": 80}}}],
                               "backendRefs": [{"name": "api", "port": 80}]}],
                })),
            ],
            grpc_routes: vec![route("GRPCRoute", "g", serde_json::json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "greeter"}],
                "rules": [{"matches": [{"method": {"type": "Exact", "service": "shop.Greeter"}}],
                           "backendRefs": [{"name": "greeter", "port": 50051}]}],
            }))],
            ..Objects::default()
        })
        .expect("valid");
        assert_eq!(
            s.state.routes.keys().collect::<Vec<_>>(),
            ["GRPCRoute/shop/g", "HTTPRoute/shop/good"]
        );
        let why = &s.skipped["httproute shop/mirror"];
        assert!(why.contains("RequestMirror"), "{why}");
    }

    #[test]
    fn accepted_policies_enter_the_state() {
        let policy = |name: &str, spec: serde_json::Value| -> Arc<AuthorizationPolicy> {
            from_json(serde_json::json!({
                "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
            }))
        };
        let s = build_state(&Objects {
            policies: vec![
                policy("good", serde_json::json!({
                    "selector": {"matchLabels": {"app": "web"}}, "action": "DENY", "dryRun": true,
                    "rules": [{"from": [{"namespaces": ["other"], "ipBlocks": ["10.0.0.0/8"]}],
                               "to": [{"ports": [80], "methods": ["GET"], "paths": ["/x"]}]}],
                })),
                policy("host-bits", serde_json::json!({"action": "ALLOW",
                    "rules": [{"from": [{"ipBlocks": ["10.0.0.1/8"]}]}]})),
                // Only the CRD checks catch this one; the state follows the status.
                policy("bad-ns", serde_json::json!({"action": "ALLOW",
                    "rules": [{"from": [{"namespaces": ["Shop"]}]}]})),
            ],
            ..Objects::default()
        })
        .expect("valid");
        assert_eq!(s.state.policies.keys().collect::<Vec<_>>(), ["shop/good"]);
        let p = &s.state.policies["shop/good"];
        assert_eq!(p.action, weft_api::model::PolicyAction::Deny);
        assert!(p.dry_run && p.rules[0].is_l7());
        assert_eq!(p.rules[0].from[0].ip_blocks[0].to_string(), "10.0.0.0/8");
        assert!(s.skipped["authorizationpolicy shop/host-bits"].contains("host bits"));
        assert!(s.skipped["authorizationpolicy shop/bad-ns"].contains("`Shop`"));
    }
}
