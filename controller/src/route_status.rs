//! Gateway API status for the HTTPRoutes and GRPCRoutes Weft serves (Kubernetes mode).
//!
//! A route is Weft's when one of its `spec.parentRefs` is a Service (`group: ""`, `kind:
//! Service`, the GAMMA mesh pattern). For each such parentRef the controller writes one entry of
//! `status.parents` with `controllerName: weft.dev/waypoint` and two conditions:
//!
//! - `Accepted`: `True`/`Accepted` when the route validates (the same check that puts it in the
//!   mesh state, [`crate::k8s`]) and its Service exists; `False`/`UnsupportedValue` with every
//!   validation problem as the message; `False`/`NoMatchingParent` when the parent Service does
//!   not exist.
//! - `ResolvedRefs`: `True`/`ResolvedRefs`, or `False` with `InvalidKind` (a backend that is not
//!   a Service), `RefNotPermitted` (a backend in another namespace) or `BackendNotFound` (no such
//!   Service in the route's namespace); the message lists every such backend.
//!
//! `status.parents` is an **atomic** list in the Gateway API CRDs (`+listType=atomic`), so a
//! server-side apply would take the whole list and drop the entries of other controllers. The
//! status is therefore written with a JSON merge patch of the `status` subresource that carries
//! the whole list (other controllers' entries as they are, then Weft's) and the object's
//! `metadata.resourceVersion`, so a concurrent change by another controller makes the write fail
//! with 409 Conflict instead of being overwritten; the next watch event recomputes it.
//! A status is written only when it differs from the object's, and a condition's
//! `lastTransitionTime` changes only when its `status` does, so the controller's own writes
//! (which change `resourceVersion`, not `generation`) do not make it loop.
//! Documented in docs/kubernetes.md and docs/waypoint.md.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::pin;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::crd::FIELD_MANAGER;
use crate::k8s::{api_code, gateway_api_resource, route_info};

/// The `controllerName` of every `status.parents` entry Weft writes.
pub const CONTROLLER_NAME: &str = "weft.dev/waypoint";

/// metav1.Condition's `message` limit.
const MAX_MESSAGE: usize = 32768;

/// How long to gather changes before recomputing the statuses.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// When to retry a status write that failed.
const RETRY: Duration = Duration::from_secs(15);

/// Why a route status could not be written (logged; retried after 15 s).
#[derive(Debug, thiserror::Error)]
pub enum RouteStatusError {
    #[error(
        "{kind} {name} has no metadata.namespace; Gateway API routes are namespaced: reinstall the Gateway API CRDs"
    )]
    NoNamespace { kind: &'static str, name: String },
    #[error(
        "writing the status of {kind} {namespace}/{name}: forbidden ({source}); grant the controller's service account `patch` on {plural}/status in gateway.networking.k8s.io (manifests/rbac.yaml)"
    )]
    Forbidden {
        kind: &'static str,
        plural: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error(
        "writing the status of {kind} {namespace}/{name}: {source}; retrying in 15 s (a 409 Conflict means another controller changed the route: the next attempt uses the new version)"
    )]
    Write {
        kind: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// The two route kinds, with what the status controller needs of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    /// The Gateway API kind.
    pub fn kind(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }

    /// The resource name (as in RBAC).
    pub fn plural(self) -> &'static str {
        match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
        }
    }

    /// The kind as [`route_info`] names it.
    fn validation_kind(self) -> &'static str {
        match self {
            RouteKind::Http => "httproute",
            RouteKind::Grpc => "grpcroute",
        }
    }

    fn api_resource(self) -> ApiResource {
        gateway_api_resource(self.kind(), self.plural())
    }
}

/// Whether a parentRef names a Service (GAMMA): the parents Weft is responsible for.
fn is_service_ref(r: &Value) -> bool {
    let group = r
        .get("group")
        .and_then(Value::as_str)
        .unwrap_or("gateway.networking.k8s.io");
    let kind = r.get("kind").and_then(Value::as_str).unwrap_or("Gateway");
    matches!(group, "" | "core") && kind == "Service"
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn array_at<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The `ResolvedRefs` verdict: reason and message, or `None` when every backend resolves.
fn unresolved_refs(
    namespace: &str,
    spec: &Value,
    services: &BTreeSet<(String, String)>,
) -> Option<(&'static str, String)> {
    let mut reason = None;
    let mut problems = Vec::new();
    for (i, rule) in array_at(spec, "rules").iter().enumerate() {
        for (j, b) in array_at(rule, "backendRefs").iter().enumerate() {
            let at = format!("spec.rules[{i}].backendRefs[{j}]");
            let group = str_at(b, "group").unwrap_or("");
            let kind = str_at(b, "kind").unwrap_or("Service");
            let name = str_at(b, "name").unwrap_or("");
            let (why, problem) = if !(matches!(group, "" | "core") && kind == "Service") {
                (
                    "InvalidKind",
                    format!("{at}: `{group}/{kind}` is not supported; backends are Services"),
                )
            } else if str_at(b, "namespace").is_some_and(|ns| ns != namespace) {
                (
                    "RefNotPermitted",
                    format!(
                        "{at}.namespace: backends in another namespace (ReferenceGrant) are not supported; use a Service of the route's namespace"
                    ),
                )
            } else if !services.contains(&(namespace.to_string(), name.to_string())) {
                (
                    "BackendNotFound",
                    format!(
                        "{at}: Service {namespace}/{name} does not exist; create it, or fix the backend's name"
                    ),
                )
            } else {
                continue;
            };
            reason.get_or_insert(why);
            problems.push(problem);
        }
    }
    reason.map(|r| (r, problems.join("; ")))
}

/// Truncates `s` to at most [`MAX_MESSAGE`] bytes, on a character boundary.
fn limit(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// A condition, keeping `lastTransitionTime` from `previous` (the conditions of Weft's earlier
/// entry for the same parentRef) when its status did not change.
fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Value],
    now: &str,
) -> Value {
    let status = if ok { "True" } else { "False" };
    let last = previous
        .iter()
        .find(|c| str_at(c, "type") == Some(type_))
        .filter(|c| str_at(c, "status") == Some(status))
        .and_then(|c| str_at(c, "lastTransitionTime"))
        .unwrap_or(now);
    let mut c = json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": limit(message),
        "lastTransitionTime": last,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

/// The `status.parents` a route should have: the entries of other controllers as they are, then
/// one entry of Weft's per Service parentRef. `None` when the route is not Weft's and has no
/// entry of Weft's to remove. `services` holds `(namespace, name)` of every Service; `now` is
/// the RFC 3339 time for conditions whose status changes.
pub fn desired_parents(
    kind: RouteKind,
    route: &DynamicObject,
    services: &BTreeSet<(String, String)>,
    now: &str,
) -> Option<Vec<Value>> {
    let namespace = route.namespace().unwrap_or_default();
    let null = Value::Null;
    let spec = route.data.get("spec").unwrap_or(&null);
    let current: &[Value] = route
        .data
        .get("status")
        .map_or(&[], |s| array_at(s, "parents"));
    let ours = |e: &&Value| str_at(e, "controllerName") == Some(CONTROLLER_NAME);
    let refs: Vec<&Value> = array_at(spec, "parentRefs")
        .iter()
        .filter(|r| is_service_ref(r))
        .collect();
    if refs.is_empty() && !current.iter().any(|e| ours(&e)) {
        return None;
    }
    let generation = route.metadata.generation;
    let validity = route_info(kind.validation_kind(), route);
    let resolved = unresolved_refs(&namespace, spec, services);
    let mut parents: Vec<Value> = current.iter().filter(|e| !ours(e)).cloned().collect();
    for r in refs {
        let previous = current
            .iter()
            .filter(ours)
            .find(|e| e.get("parentRef") == Some(r))
            .map_or(&[][..], |e| array_at(e, "conditions"));
        let parent_ns = str_at(r, "namespace").unwrap_or(&namespace);
        let parent = str_at(r, "name").unwrap_or("");
        let (ok, reason, message) = match &validity {
            Err(problems) => (false, "UnsupportedValue", problems.clone()),
            Ok(_) if !services.contains(&(parent_ns.to_string(), parent.to_string())) => (
                false,
                "NoMatchingParent",
                format!(
                    "parent Service {parent_ns}/{parent} does not exist; create it, or fix spec.parentRefs"
                ),
            ),
            Ok(_) => (
                true,
                "Accepted",
                format!(
                    "valid; served by the waypoint Service {parent_ns}/{parent} is bound to (weft.dev/use-waypoint)"
                ),
            ),
        };
        let accepted = condition("Accepted", ok, reason, message, generation, previous, now);
        let refs = match &resolved {
            None => condition(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "every backend is a Service of the route's namespace that exists".into(),
                generation,
                previous,
                now,
            ),
            Some((reason, message)) => condition(
                "ResolvedRefs",
                false,
                reason,
                message.clone(),
                generation,
                previous,
                now,
            ),
        };
        parents.push(json!({
            "parentRef": r,
            "controllerName": CONTROLLER_NAME,
            "conditions": [accepted, refs],
        }));
    }
    Some(parents)
}

/// The merge patch that writes `parents` to `route`, or `None` when the route already has them.
pub fn status_patch(
    kind: RouteKind,
    route: &DynamicObject,
    services: &BTreeSet<(String, String)>,
    now: &str,
) -> Option<Value> {
    let parents = desired_parents(kind, route, services, now)?;
    let current = route
        .data
        .get("status")
        .and_then(|s| s.get("parents"))
        .and_then(Value::as_array);
    if current.map(Vec::as_slice) == Some(parents.as_slice())
        || (current.is_none() && parents.is_empty())
    {
        return None;
    }
    let mut patch = json!({"status": {"parents": parents}});
    if let Some(rv) = route.resource_version() {
        // Optimistic concurrency: another controller's change in between is a 409, not lost.
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    Some(patch)
}

/// Now, as metav1.Time writes it (RFC 3339, seconds, UTC).
fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Logs a watch error once per kind and HTTP status (a missing CRD is retried with backoff
/// forever, and must not fill the log).
fn on_watch_error(kind: &'static str, e: &watcher::Error, logged: &mut BTreeSet<String>) {
    let code = api_code(e);
    let key = format!("{kind} {code:?}");
    if code == Some(410) || !logged.insert(key) {
        return;
    }
    match code {
        Some(404) => tracing::info!(
            kind,
            "route status: not served by the API server (Gateway API CRDs not installed); no route status is written until they are"
        ),
        Some(403) => tracing::warn!(
            kind,
            error = %e,
            "route status: forbidden; grant the controller's service account get/list/watch on {kind} (manifests/rbac.yaml)"
        ),
        _ => tracing::warn!(kind, error = %e, "route status: watch error; retrying with backoff"),
    }
}

/// Writes the status of every HTTPRoute and GRPCRoute attached to a Service, and keeps it
/// current, until the process ends. Without the Gateway API CRDs (404) nothing is written and
/// nothing fails: the watches retry with backoff and pick the CRDs up once installed.
pub async fn run_route_status_controller(client: Client) {
    let config = watcher::Config::default();
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let services = watcher(Api::<Service>::all(client.clone()), config.clone())
        .modify(|s| {
            s.managed_fields_mut().clear();
            s.annotations_mut().clear();
            s.spec = None;
            s.status = None;
        })
        .default_backoff()
        .reflect(svc_writer);
    let route_watch = |kind: RouteKind| {
        let ar = kind.api_resource();
        let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let store = writer.as_reader();
        let stream = watcher(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            config.clone(),
        )
        .modify(|o| {
            o.managed_fields_mut().clear();
            o.annotations_mut().clear();
        })
        .default_backoff()
        .reflect(writer);
        (store, stream)
    };
    let (http_store, http) = route_watch(RouteKind::Http);
    let (grpc_store, grpc) = route_watch(RouteKind::Grpc);
    let mut services = pin!(services);
    let mut http = pin!(http);
    let mut grpc = pin!(grpc);
    let mut services_ready = false;
    let mut logged = BTreeSet::new();
    let mut failures = BTreeMap::new();
    let mut at: Option<Instant> = None;
    loop {
        let changed = tokio::select! {
            ev = services.next() => match ev {
                Some(Ok(watcher::Event::InitDone)) => { services_ready = true; true }
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => true,
                Some(Ok(_)) => false,
                Some(Err(e)) => { on_watch_error("services", &e, &mut logged); false }
                None => return,
            },
            ev = http.next() => match ev {
                Some(Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_))) => true,
                Some(Ok(_)) => false,
                Some(Err(e)) => { on_watch_error("httproutes", &e, &mut logged); false }
                None => return,
            },
            ev = grpc.next() => match ev {
                Some(Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_))) => true,
                Some(Ok(_)) => false,
                Some(Err(e)) => { on_watch_error("grpcroutes", &e, &mut logged); false }
                None => return,
            },
            () = sleep_until(at), if at.is_some() => {
                at = None;
                // Until the Services are listed every backend would look missing.
                if services_ready {
                    let retry = write_all(&client, &svc_store, &http_store, &grpc_store, &mut failures).await;
                    if retry {
                        at = Some(Instant::now() + RETRY);
                    }
                }
                false
            }
        };
        if changed {
            at.get_or_insert_with(|| Instant::now() + DEBOUNCE);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes every status that differs. Returns whether a write failed (and should be retried).
/// `failures` holds the last error of each route, so an error is logged once until it changes.
async fn write_all(
    client: &Client,
    services: &Store<Service>,
    http: &Store<DynamicObject>,
    grpc: &Store<DynamicObject>,
    failures: &mut BTreeMap<String, String>,
) -> bool {
    let services: BTreeSet<(String, String)> = services
        .state()
        .iter()
        .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
        .collect();
    let now = now_rfc3339();
    let mut failed = false;
    let mut seen = BTreeSet::new();
    for (kind, store) in [(RouteKind::Http, http), (RouteKind::Grpc, grpc)] {
        for route in store.state() {
            let key = format!(
                "{} {}/{}",
                kind.kind(),
                route.namespace().unwrap_or_default(),
                route.name_any()
            );
            seen.insert(key.clone());
            let Some(patch) = status_patch(kind, &route, &services, &now) else {
                if failures.remove(&key).is_some() {
                    tracing::info!(route = %key, "route status is current again");
                }
                continue;
            };
            match write(client, kind, &route, &patch).await {
                Ok(()) => {
                    failures.remove(&key);
                    tracing::info!(route = %key, "route status written");
                }
                Err(e) => {
                    failed = true;
                    let msg = e.to_string();
                    if failures.get(&key) != Some(&msg) {
                        tracing::warn!(route = %key, error = %msg, "route status not written");
                        failures.insert(key, msg);
                    }
                }
            }
        }
    }
    failures.retain(|k, _| seen.contains(k));
    failed
}

async fn write(
    client: &Client,
    kind: RouteKind,
    route: &DynamicObject,
    patch: &Value,
) -> Result<(), RouteStatusError> {
    let name = route.name_any();
    let Some(namespace) = route.namespace() else {
        return Err(RouteStatusError::NoNamespace {
            kind: kind.kind(),
            name,
        });
    };
    let api =
        Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &kind.api_resource());
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    match api.patch_status(&name, &params, &Patch::Merge(patch)).await {
        Ok(_) => Ok(()),
        // Deleted meanwhile: nothing to write.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) if matches!(&source, kube::Error::Api(s) if s.code == 403) => {
            Err(RouteStatusError::Forbidden {
                kind: kind.kind(),
                plural: kind.plural(),
                namespace,
                name,
                source,
            })
        }
        Err(source) => Err(RouteStatusError::Write {
            kind: kind.kind(),
            namespace,
            name,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-02T00:00:00Z";

    fn route(kind: RouteKind, spec: Value, status: Option<Value>) -> DynamicObject {
        let mut o = DynamicObject::new("api", &kind.api_resource()).within("shop");
        o.metadata.generation = Some(2);
        o.metadata.resource_version = Some("7".into());
        o.data = json!({"spec": spec});
        if let Some(s) = status {
            o.data["status"] = s;
        }
        o
    }

    fn services(names: &[&str]) -> BTreeSet<(String, String)> {
        names
            .iter()
            .map(|n| ("shop".to_string(), (*n).to_string()))
            .collect()
    }

    fn valid_spec() -> Value {
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
            "rules": [{"backendRefs": [{"group": "", "kind": "Service", "name": "api-v1", "port": 80, "weight": 1}]}],
        })
    }

    /// (type, status, reason) of each condition of Weft's entries.
    fn verdicts(parents: &[Value]) -> Vec<(String, String, String)> {
        parents
            .iter()
            .filter(|p| p["controllerName"] == CONTROLLER_NAME)
            .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("type"), s("status"), s("reason"))
            })
            .collect()
    }

    fn v(t: &str, s: &str, r: &str) -> (String, String, String) {
        (t.into(), s.into(), r.into())
    }

    #[test]
    fn a_valid_route_is_accepted_with_resolved_refs() {
        let r = route(RouteKind::Http, valid_spec(), None);
        let parents =
            desired_parents(RouteKind::Http, &r, &services(&["api", "api-v1"]), T0).expect("ours");
        assert_eq!(
            parents,
            [json!({
                "parentRef": {"group": "", "kind": "Service", "name": "api", "port": 80},
                "controllerName": "weft.dev/waypoint",
                "conditions": [
                    {"type": "Accepted", "status": "True", "reason": "Accepted",
                     "message": "valid; served by the waypoint Service shop/api is bound to (weft.dev/use-waypoint)",
                     "observedGeneration": 2, "lastTransitionTime": T0},
                    {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs",
                     "message": "every backend is a Service of the route's namespace that exists",
                     "observedGeneration": 2, "lastTransitionTime": T0},
                ],
            })]
        );
        let patch =
            status_patch(RouteKind::Http, &r, &services(&["api", "api-v1"]), T0).expect("a write");
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(patch["status"]["parents"], json!(parents));
    }

    #[test]
    fn an_invalid_route_is_not_accepted_and_says_why() {
        let mut spec = valid_spec();
        spec["rules"][0]["filters"] = json!([{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "x", "port": 80}}}]);
        let r = route(RouteKind::Http, spec, None);
        let parents =
            desired_parents(RouteKind::Http, &r, &services(&["api", "api-v1"]), T0).expect("ours");
        assert_eq!(
            verdicts(&parents),
            [
                v("Accepted", "False", "UnsupportedValue"),
                v("ResolvedRefs", "True", "ResolvedRefs")
            ]
        );
        let msg = parents[0]["conditions"][0]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            msg.contains("spec.rules[0].filters[0].type") && msg.contains("RequestMirror"),
            "{msg}"
        );
    }

    #[test]
    fn missing_backends_and_refused_refs_are_not_resolved() {
        let r = route(
            RouteKind::Grpc,
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
                "rules": [{"backendRefs": [{"name": "gone", "port": 50051}]}],
            }),
            None,
        );
        let parents = desired_parents(RouteKind::Grpc, &r, &services(&["api"]), T0).expect("ours");
        // Valid, served, but its backend does not exist.
        assert_eq!(
            verdicts(&parents),
            [
                v("Accepted", "True", "Accepted"),
                v("ResolvedRefs", "False", "BackendNotFound")
            ]
        );
        let msg = parents[0]["conditions"][1]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            msg.contains("spec.rules[0].backendRefs[0]: Service shop/gone does not exist"),
            "{msg}"
        );

        let r = route(
            RouteKind::Http,
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
                "rules": [{"backendRefs": [{"name": "api", "namespace": "other", "port": 80},
                                           {"group": "example.com", "kind": "Bucket", "name": "b"}]}],
            }),
            None,
        );
        let parents = desired_parents(RouteKind::Http, &r, &services(&["api"]), T0).expect("ours");
        assert_eq!(
            verdicts(&parents),
            [
                v("Accepted", "False", "UnsupportedValue"),
                v("ResolvedRefs", "False", "RefNotPermitted")
            ]
        );
        let msg = parents[0]["conditions"][1]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            msg.contains("backendRefs[0].namespace") && msg.contains("`example.com/Bucket`"),
            "{msg}"
        );
        let r = route(
            RouteKind::Http,
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
                "rules": [{"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "b"}]}],
            }),
            None,
        );
        let parents = desired_parents(RouteKind::Http, &r, &services(&["api"]), T0).expect("ours");
        assert_eq!(
            verdicts(&parents)[1],
            v("ResolvedRefs", "False", "InvalidKind")
        );
    }

    #[test]
    fn a_missing_parent_service_is_no_matching_parent() {
        let r = route(RouteKind::Http, valid_spec(), None);
        let parents =
            desired_parents(RouteKind::Http, &r, &services(&["api-v1"]), T0).expect("ours");
        assert_eq!(
            verdicts(&parents)[0],
            v("Accepted", "False", "NoMatchingParent")
        );
        let msg = parents[0]["conditions"][0]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(msg.contains("Service shop/api does not exist"), "{msg}");
    }

    #[test]
    fn transition_times_stay_while_statuses_do_and_nothing_is_rewritten() {
        let all = services(&["api", "api-v1"]);
        let first = route(RouteKind::Http, valid_spec(), None);
        let parents = desired_parents(RouteKind::Http, &first, &all, T0).expect("ours");
        // The route as written: the same computation later changes nothing, so no write.
        let written = route(
            RouteKind::Http,
            valid_spec(),
            Some(json!({"parents": parents})),
        );
        assert_eq!(status_patch(RouteKind::Http, &written, &all, T1), None);
        // A new generation changes observedGeneration, not the times of unchanged statuses.
        let mut newer = written.clone();
        newer.metadata.generation = Some(3);
        let again = desired_parents(RouteKind::Http, &newer, &all, T1).expect("ours");
        for c in again[0]["conditions"].as_array().expect("conditions") {
            assert_eq!(c["lastTransitionTime"], T0, "{c}");
            assert_eq!(c["observedGeneration"], 3, "{c}");
        }
        // A backend that disappears flips ResolvedRefs only: its time moves, Accepted's stays.
        let gone =
            desired_parents(RouteKind::Http, &written, &services(&["api"]), T1).expect("ours");
        assert_eq!(gone[0]["conditions"][0]["lastTransitionTime"], T0);
        assert_eq!(gone[0]["conditions"][1]["lastTransitionTime"], T1);
        assert_eq!(gone[0]["conditions"][1]["status"], "False");
    }

    #[test]
    fn other_controllers_entries_are_kept_and_stale_entries_of_ours_removed() {
        let foreign = json!({
            "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
            "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                            "lastTransitionTime": T0}],
        });
        let stale = json!({
            "parentRef": {"group": "", "kind": "Service", "name": "old"},
            "controllerName": CONTROLLER_NAME, "conditions": [],
        });
        let mut spec = valid_spec();
        spec["parentRefs"] = json!([
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
            {"group": "", "kind": "Service", "name": "api", "port": 80},
        ]);
        let r = route(
            RouteKind::Http,
            spec,
            Some(json!({"parents": [stale.clone(), foreign.clone()]})),
        );
        let parents =
            desired_parents(RouteKind::Http, &r, &services(&["api", "api-v1"]), T0).expect("ours");
        assert_eq!(parents.len(), 2, "{parents:#?}");
        assert_eq!(parents[0], foreign);
        assert_eq!(parents[1]["parentRef"]["name"], "api");
        // The Gateway parent is not Weft's: it gets no entry of ours. Weft refuses a route with
        // a parent that is not a Service as a whole (routes.rs), and its entry says so.
        assert_eq!(
            verdicts(&parents)[0],
            v("Accepted", "False", "UnsupportedValue")
        );
        let msg = parents[1]["conditions"][0]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(msg.contains("spec.parentRefs[0]"), "{msg}");

        // A route that is no longer Weft's loses only Weft's entries.
        let r = route(
            RouteKind::Http,
            json!({"parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}], "rules": []}),
            Some(json!({"parents": [foreign.clone(), stale]})),
        );
        let patch = status_patch(RouteKind::Http, &r, &services(&[]), T0).expect("a write");
        assert_eq!(patch["status"]["parents"], json!([foreign]));
        // A route that never was Weft's is left alone.
        let r = route(
            RouteKind::Http,
            json!({"parentRefs": [{"name": "edge"}], "rules": []}),
            Some(json!({"parents": [foreign]})),
        );
        assert_eq!(status_patch(RouteKind::Http, &r, &services(&[]), T0), None);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let m = limit("é".repeat(MAX_MESSAGE));
        assert!(m.len() <= MAX_MESSAGE && m.ends_with("..."));
        assert_eq!(now_rfc3339().len(), "2026-01-01T00:00:00Z".len());
    }
}
