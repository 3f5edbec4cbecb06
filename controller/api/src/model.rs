//! The validated internal model. Documents are converted into it once; nothing downstream
//! re-parses labels or annotations.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Serialize;

use crate::labels;
use crate::resource::{AuthorizationPolicy, Namespace, Resource, Service, Workload};

/// A model-level problem (the documents parsed, but they do not make sense together).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("workload {namespace}/{name}: missing `metadata.namespace`")]
    NoNamespace { namespace: String, name: String },
    #[error(
        "workload {namespace}/{name}: annotation {annotation}: `{value}` is not a valid {what} ({hint})"
    )]
    BadAnnotation {
        namespace: String,
        name: String,
        annotation: &'static str,
        value: String,
        what: &'static str,
        hint: &'static str,
    },
    #[error(
        "workload {namespace}/{name}: `spec.ips` must hold at most one IPv4 and one IPv6 address, and at least one"
    )]
    BadIps { namespace: String, name: String },
    #[error("workload {namespace}/{name} is defined twice")]
    Duplicate { namespace: String, name: String },
    #[error(
        "workloads {first} and {second} both claim address {ip}; each address belongs to one workload"
    )]
    DuplicateIp {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("service {namespace}/{name}: {problem}")]
    BadService {
        namespace: String,
        name: String,
        problem: String,
    },
    #[error(transparent)]
    BadRoute(#[from] crate::routes::RouteError),
    #[error("AuthorizationPolicy {namespace}/{name}: {problem}")]
    BadPolicy {
        namespace: String,
        name: String,
        problem: String,
    },
    #[error("services {first} and {second} both claim virtual IP {ip}")]
    DuplicateVip {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("label {label} on {object}: `{value}` is not one of `enabled`, `disabled`")]
    BadMeshLabel {
        object: String,
        label: &'static str,
        value: String,
    },
    #[error("{what} weft.dev/mtls on {object}: `{value}` is not one of `strict`, `permissive`")]
    BadMtlsMode {
        object: String,
        what: &'static str,
        value: String,
    },
    #[error(
        "label weft.dev/use-waypoint on {object}: `{value}` is not a waypoint name (the name of the waypoint's Service in the same namespace, a DNS label such as `waypoint`; `none` on a Service opts it out)"
    )]
    BadWaypoint { object: String, value: String },
}

/// What capture should skip for one workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Exclusions {
    pub outbound_ports: Vec<u16>,
    pub inbound_ports: Vec<u16>,
    pub outbound_cidrs: Vec<IpNet>,
    pub inbound_cidrs: Vec<IpNet>,
}

/// How a workload takes part in capture.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CaptureSettings {
    /// The namespace is meshed (`weft.dev/mesh=enabled`).
    pub namespace_meshed: bool,
    /// The pod opted out (`weft.dev/mesh=disabled` on the pod).
    pub opted_out: bool,
    pub exclusions: Exclusions,
    /// Inbound plaintext from outside the mesh is refused (`weft.dev/mtls: strict`).
    pub strict_mtls: bool,
}

impl CaptureSettings {
    /// Whether the agent should capture this workload's traffic at all.
    pub fn captured(&self) -> bool {
        self.namespace_meshed && !self.opted_out
    }
}

/// A validated workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ip4: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub netns: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub capture: CaptureSettings,
}

impl WorkloadInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A port of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub app_protocol: String,
}

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointInfo {
    /// `namespace/name` of the workload.
    pub workload: String,
    pub ip4: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub ready: bool,
}

/// A validated service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.cluster.local`.
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Sorted by workload key.
    pub endpoints: Vec<EndpointInfo>,
    /// `namespace/name` of the waypoint's Service that traffic to this service goes through
    /// (from the Service's or its namespace's `weft.dev/use-waypoint` label).
    pub waypoint: Option<String>,
}

impl ServiceInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What a policy does with matching connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
    Audit,
}

/// Where a connection comes from; every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicySourceInfo {
    pub namespaces: Vec<String>,
    /// SPIFFE IDs.
    pub principals: Vec<String>,
    pub ip_blocks: Vec<IpNet>,
}

/// Where a connection goes. `methods`/`paths` are L7 (waypoint only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicyDestinationInfo {
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    pub paths: Vec<String>,
}

/// A condition on a request header (L7): the header (lowercase name) has one of `values`
/// (exact, `prefix*`, `*suffix`, or `*`: present).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderCondition {
    pub header: String,
    pub values: Vec<String>,
}

/// One rule: a source entry and a destination entry must match (empty lists match anything),
/// and every `when` condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicyRuleInfo {
    pub from: Vec<PolicySourceInfo>,
    pub to: Vec<PolicyDestinationInfo>,
    pub when: Vec<HeaderCondition>,
}

impl PolicyRuleInfo {
    /// Whether the rule needs L7 information (methods, paths or headers) to be evaluated.
    pub fn is_l7(&self) -> bool {
        !self.when.is_empty()
            || self
                .to
                .iter()
                .any(|d| !d.methods.is_empty() || !d.paths.is_empty())
    }
}

/// What a policy with `targetRefs` applies to (in its namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PolicyTarget {
    /// A Service: enforced by the Service's waypoint; when the Service has none, by the agents
    /// of its endpoints (at L4, L7 rules failing closed).
    Service(String),
    /// A waypoint (Gateway API `kind: Gateway`, named like the waypoint's Service): every
    /// request through it.
    Waypoint(String),
}

/// A validated AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyInfo {
    pub name: String,
    pub namespace: String,
    /// Labels a workload must have; `None`: every workload of the namespace.
    pub selector: Option<BTreeMap<String, String>>,
    pub action: PolicyAction,
    pub rules: Vec<PolicyRuleInfo>,
    pub dry_run: bool,
    /// `spec.targetRefs`: when not empty, `selector` is `None` and the policy applies to these
    /// (see [`PolicyTarget`]) rather than to workloads by label.
    pub targets: Vec<PolicyTarget>,
    /// Agent-side only (never on the wire): for a policy with `targets`, the workloads
    /// (`namespace/name`) a node agent enforces it on — endpoints of targeted Services that
    /// have no waypoint. Filled in by the agent when it builds its view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_workloads: Option<BTreeSet<String>>,
}

impl PolicyInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy applies to a workload at its node agent.
    pub fn selects(&self, w: &WorkloadInfo) -> bool {
        if !self.targets.is_empty() {
            return self
                .agent_workloads
                .as_ref()
                .is_some_and(|set| set.contains(&w.key()));
        }
        w.namespace == self.namespace
            && self
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }

    /// Whether a waypoint enforces the policy for a request to `service` (`namespace/name`)
    /// through waypoint `waypoint` (`namespace/name` of its Service).
    pub fn targets_at_waypoint(&self, service: &str, waypoint: &str) -> bool {
        self.targets.iter().any(|t| match t {
            PolicyTarget::Service(s) => format!("{}/{s}", self.namespace) == service,
            PolicyTarget::Waypoint(w) => format!("{}/{w}", self.namespace) == waypoint,
        })
    }
}

/// Validates a policy document (both modes use this).
pub fn policy_info(p: &AuthorizationPolicy) -> Result<PolicyInfo, ModelError> {
    let name = p.metadata.name.clone();
    let namespace = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let bad = |problem: String| ModelError::BadPolicy {
        namespace: namespace.clone(),
        name: name.clone(),
        problem,
    };
    let action = match p.spec.action.as_str() {
        "ALLOW" => PolicyAction::Allow,
        "DENY" => PolicyAction::Deny,
        "AUDIT" => PolicyAction::Audit,
        other => {
            return Err(bad(format!(
                "spec.action `{other}` is not one of ALLOW, DENY, AUDIT"
            )));
        }
    };
    let mut rules = Vec::new();
    for (i, r) in p.spec.rules.iter().enumerate() {
        let mut from = Vec::new();
        for (j, s) in r.from.iter().enumerate() {
            for pr in &s.principals {
                let parts: Vec<&str> = pr
                    .strip_prefix("spiffe://")
                    .unwrap_or("")
                    .split('/')
                    .collect();
                if parts.len() != 5 || parts[0].is_empty() || parts[1] != "ns" || parts[3] != "sa" {
                    return Err(bad(format!(
                        "spec.rules[{i}].from[{j}].principals: `{pr}` is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
                    )));
                }
            }
            let mut ip_blocks = Vec::new();
            for b in &s.ip_blocks {
                let net = b
                    .parse::<IpNet>()
                    .or_else(|_| b.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|e| bad(format!("spec.rules[{i}].from[{j}].ipBlocks: `{b}`: {e}")))?;
                if net.trunc() != net {
                    return Err(bad(format!(
                        "spec.rules[{i}].from[{j}].ipBlocks: `{b}` has host bits set (did you mean {}?)",
                        net.trunc()
                    )));
                }
                ip_blocks.push(net);
            }
            from.push(PolicySourceInfo {
                namespaces: s.namespaces.clone(),
                principals: s.principals.clone(),
                ip_blocks,
            });
        }
        let mut to = Vec::new();
        for (j, d) in r.to.iter().enumerate() {
            if d.ports.contains(&0) {
                return Err(bad(format!(
                    "spec.rules[{i}].to[{j}].ports: 0 is not a port"
                )));
            }
            to.push(PolicyDestinationInfo {
                ports: d.ports.clone(),
                methods: d.methods.clone(),
                paths: d.paths.clone(),
            });
        }
        let mut when = Vec::new();
        for (j, c) in r.when.iter().enumerate() {
            let header = header_condition_key(&c.key).ok_or_else(|| {
                bad(format!(
                    "spec.rules[{i}].when[{j}].key: `{}` is not supported (only `request.headers[<name>]`)",
                    c.key
                ))
            })?;
            if c.values.is_empty() {
                return Err(bad(format!(
                    "spec.rules[{i}].when[{j}].values: give at least one value (`*` for any)"
                )));
            }
            when.push(HeaderCondition {
                header,
                values: c.values.clone(),
            });
        }
        rules.push(PolicyRuleInfo { from, to, when });
    }
    if p.spec.selector.is_some() && !p.spec.target_refs.is_empty() {
        return Err(bad(
            "spec.selector and spec.targetRefs are exclusive: select workloads (enforced by node agents) or target Services / a waypoint (enforced by the waypoint), not both".into(),
        ));
    }
    let mut targets = Vec::new();
    for (i, t) in p.spec.target_refs.iter().enumerate() {
        if !valid_waypoint_name(&t.name) {
            return Err(bad(format!(
                "spec.targetRefs[{i}].name: `{}` is not a Service name",
                t.name
            )));
        }
        targets.push(match t.kind.as_str() {
            "Service" => PolicyTarget::Service(t.name.clone()),
            "Gateway" => PolicyTarget::Waypoint(t.name.clone()),
            k => {
                return Err(bad(format!(
                    "spec.targetRefs[{i}].kind: `{k}` is not `Service` or `Gateway` (a waypoint)"
                )));
            }
        });
    }
    Ok(PolicyInfo {
        selector: p.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        name,
        namespace,
        action,
        rules,
        dry_run: p.spec.dry_run,
        targets,
        agent_workloads: None,
    })
}

/// The header name of a `request.headers[<name>]` condition key, lowercased.
pub fn header_condition_key(key: &str) -> Option<String> {
    let name = key.strip_prefix("request.headers[")?.strip_suffix(']')?;
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    ok.then(|| name.to_ascii_lowercase())
}

/// Everything known about the mesh, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshState {
    /// Namespaces by name, with whether they are meshed.
    pub namespaces: BTreeMap<String, bool>,
    /// Workloads by `namespace/name`.
    pub workloads: BTreeMap<String, WorkloadInfo>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, ServiceInfo>,
    /// AuthorizationPolicies by `namespace/name`.
    pub policies: BTreeMap<String, PolicyInfo>,
    /// HTTPRoutes and GRPCRoutes attached to Services, by `<Kind>/<namespace>/<name>`.
    pub routes: BTreeMap<String, crate::routes::RouteInfo>,
    /// Root certificates (PEM) workload certificates chain to. Set by the controller's CA, not
    /// by sources.
    pub trust_bundle: Vec<String>,
}

/// Whether `v` can name a waypoint (a Service name: a DNS-1123 label).
fn valid_waypoint_name(v: &str) -> bool {
    labels::is_dns_label(v)
}

/// The waypoint a namespace's `weft.dev/use-waypoint` label names, validated.
pub fn namespace_waypoint(ns: &Namespace) -> Result<Option<String>, ModelError> {
    match ns.metadata.labels.get(labels::USE_WAYPOINT) {
        None => Ok(None),
        Some(v) if valid_waypoint_name(v) && v != labels::USE_WAYPOINT_NONE => Ok(Some(v.clone())),
        Some(v) => Err(ModelError::BadWaypoint {
            object: format!("namespace {}", ns.metadata.name),
            value: v.clone(),
        }),
    }
}

/// The waypoint (`namespace/name` of its Service) that traffic to service `s` goes through:
/// the Service's own `weft.dev/use-waypoint` label (`none`: no waypoint), else its namespace's
/// (`namespace_waypoint`). A waypoint's own Service (label `weft.dev/waypoint`) never has one.
fn service_waypoint(
    s: &Service,
    namespace: &str,
    namespace_waypoint: Option<&str>,
) -> Result<Option<String>, ModelError> {
    if s.metadata.labels.contains_key(labels::WAYPOINT) {
        return Ok(None);
    }
    let name = match s.metadata.labels.get(labels::USE_WAYPOINT) {
        Some(v) if v == labels::USE_WAYPOINT_NONE => None,
        Some(v) if valid_waypoint_name(v) => Some(v.as_str()),
        Some(v) => {
            return Err(ModelError::BadWaypoint {
                object: format!("service {namespace}/{}", s.metadata.name),
                value: v.clone(),
            });
        }
        None => namespace_waypoint,
    };
    Ok(name.map(|n| format!("{namespace}/{n}")))
}

impl MeshState {
    /// Builds the state from parsed documents. All problems are collected, not just the first.
    pub fn from_resources(resources: &[Resource]) -> Result<Self, Vec<ModelError>> {
        let mut errors = Vec::new();
        let mut namespaces = BTreeMap::new();
        let mut strict = BTreeMap::new();
        let mut waypoints = BTreeMap::new();
        for r in resources {
            if let Resource::Namespace(ns) = r {
                match namespace_waypoint(ns) {
                    Ok(Some(w)) => {
                        waypoints.insert(ns.metadata.name.clone(), w);
                    }
                    Ok(None) => {}
                    Err(e) => errors.push(e),
                }
                match namespace_meshed(ns) {
                    Ok(m) => {
                        namespaces.insert(ns.metadata.name.clone(), m);
                    }
                    Err(e) => errors.push(e),
                }
                let object = format!("namespace {}", ns.metadata.name);
                match mtls_mode(ns.metadata.labels.get(labels::MTLS), object, "label") {
                    Ok(m) => {
                        strict.insert(ns.metadata.name.clone(), m.unwrap_or(false));
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        let mut workloads = BTreeMap::new();
        let mut by_ip: BTreeMap<IpAddr, String> = BTreeMap::new();
        for r in resources {
            let Resource::Workload(w) = r else { continue };
            let info = match workload_info(w, &namespaces, &strict) {
                Ok(i) => i,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let key = info.key();
            for ip in info
                .ip4
                .map(IpAddr::V4)
                .into_iter()
                .chain(info.ip6.map(IpAddr::V6))
            {
                if let Some(first) = by_ip.insert(ip, key.clone()) {
                    errors.push(ModelError::DuplicateIp {
                        ip,
                        first,
                        second: key.clone(),
                    });
                }
            }
            if workloads.insert(key, info.clone()).is_some() {
                errors.push(ModelError::Duplicate {
                    namespace: info.namespace,
                    name: info.name,
                });
            }
        }
        let mut services = BTreeMap::new();
        let mut by_vip: BTreeMap<IpAddr, String> = BTreeMap::new();
        for r in resources {
            let Resource::Service(s) = r else { continue };
            match service_info(s, &workloads, &waypoints) {
                Ok(info) => {
                    for vip in &info.vips {
                        if let Some(first) = by_vip.insert(*vip, info.key()) {
                            errors.push(ModelError::DuplicateVip {
                                ip: *vip,
                                first,
                                second: info.key(),
                            });
                        }
                    }
                    services.insert(info.key(), info);
                }
                Err(e) => errors.push(e),
            }
        }
        let mut policies = BTreeMap::new();
        for r in resources {
            let Resource::AuthorizationPolicy(p) = r else {
                continue;
            };
            match policy_info(p) {
                Ok(info) => {
                    policies.insert(info.key(), info);
                }
                Err(e) => errors.push(e),
            }
        }
        let mut routes = BTreeMap::new();
        for r in resources {
            let info = match r {
                Resource::HttpRoute(r) => crate::routes::http_route_info(r),
                Resource::GrpcRoute(r) => crate::routes::grpc_route_info(r),
                _ => continue,
            };
            match info {
                Ok(info) => {
                    routes.insert(info.key(), info);
                }
                Err(e) => errors.extend(e.into_iter().map(ModelError::BadRoute)),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                namespaces,
                workloads,
                services,
                policies,
                routes,
                trust_bundle: Vec::new(),
            })
        } else {
            Err(errors)
        }
    }

    /// Workloads served by `node`.
    pub fn workloads_on_node<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a WorkloadInfo> {
        self.workloads.values().filter(move |w| w.node == node)
    }
}

/// A service whose endpoints come from its selector over `workloads` (the directory mode).
fn service_info(
    s: &Service,
    workloads: &BTreeMap<String, WorkloadInfo>,
    waypoints: &BTreeMap<String, String>,
) -> Result<ServiceInfo, ModelError> {
    let namespace = s.metadata.namespace.as_deref().unwrap_or("default");
    let endpoints = if s.spec.selector.is_empty() {
        Vec::new()
    } else {
        workloads
            .values()
            .filter(|w| w.namespace == namespace)
            .filter(|w| {
                s.spec
                    .selector
                    .iter()
                    .all(|(k, v)| w.labels.get(k) == Some(v))
            })
            .map(|w| EndpointInfo {
                workload: w.key(),
                ip4: w.ip4,
                ip6: w.ip6,
                ready: true,
            })
            .collect()
    };
    service_from_parts(s, endpoints, waypoints.get(namespace).map(String::as_str))
}

/// Validates a service document (virtual IPs, ports) and gives it `endpoints`, sorted by
/// workload key (then addresses). `spec.selector` is not read: the directory mode selects the
/// endpoints from its workloads, Kubernetes mode reads them from EndpointSlices. Both modes
/// validate services here. `namespace_waypoint` is the waypoint the namespace's
/// `weft.dev/use-waypoint` label names ([`namespace_waypoint`]).
pub fn service_from_parts(
    s: &Service,
    mut endpoints: Vec<EndpointInfo>,
    namespace_waypoint: Option<&str>,
) -> Result<ServiceInfo, ModelError> {
    let name = s.metadata.name.clone();
    let namespace = s
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let bad = |problem: String| ModelError::BadService {
        namespace: namespace.clone(),
        name: name.clone(),
        problem,
    };
    let mut vips = s.spec.cluster_ips.clone();
    if let Some(ip) = s
        .spec
        .cluster_ip
        .as_deref()
        .filter(|ip| *ip != "None" && !ip.is_empty())
    {
        let ip: IpAddr = ip
            .parse()
            .map_err(|e| bad(format!("spec.clusterIP `{ip}`: {e}")))?;
        if !vips.contains(&ip) {
            vips.insert(0, ip);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in s.spec.ports.iter().enumerate() {
        if p.port == 0 {
            return Err(bad(format!("spec.ports[{i}].port must be 1-65535")));
        }
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue; // not meshed
        }
        if ports.iter().any(|q: &ServicePort| q.port == p.port) {
            return Err(bad(format!(
                "spec.ports[{i}]: port {} listed twice",
                p.port
            )));
        }
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port: p.port,
            target_port: p.target_port.filter(|t| *t != 0).unwrap_or(p.port),
            app_protocol: p.app_protocol.clone().unwrap_or_default(),
        });
    }
    endpoints.sort_by(|a, b| (&a.workload, a.ip4, a.ip6).cmp(&(&b.workload, b.ip4, b.ip6)));
    let waypoint = service_waypoint(s, &namespace, namespace_waypoint)?;
    Ok(ServiceInfo {
        waypoint,
        hostname: format!("{name}.{namespace}.svc.cluster.local"),
        name,
        namespace,
        vips,
        ports,
        endpoints,
    })
}

fn namespace_meshed(ns: &Namespace) -> Result<bool, ModelError> {
    match ns.metadata.labels.get(labels::MESH).map(String::as_str) {
        None => Ok(false),
        Some(labels::MESH_ENABLED) => Ok(true),
        Some(labels::MESH_DISABLED) => Ok(false),
        Some(v) => Err(ModelError::BadMeshLabel {
            object: format!("namespace {}", ns.metadata.name),
            label: labels::MESH,
            value: v.to_string(),
        }),
    }
}

/// `Some(true)` for `strict`, `Some(false)` for `permissive`, `None` when unset.
fn mtls_mode(
    value: Option<&String>,
    object: String,
    what: &'static str,
) -> Result<Option<bool>, ModelError> {
    match value.map(String::as_str) {
        None => Ok(None),
        Some(labels::MTLS_STRICT) => Ok(Some(true)),
        Some(labels::MTLS_PERMISSIVE) => Ok(Some(false)),
        Some(v) => Err(ModelError::BadMtlsMode {
            object,
            what,
            value: v.to_string(),
        }),
    }
}

fn workload_info(
    w: &Workload,
    namespaces: &BTreeMap<String, bool>,
    strict_namespaces: &BTreeMap<String, bool>,
) -> Result<WorkloadInfo, ModelError> {
    let name = w.metadata.name.clone();
    let Some(namespace) = w.metadata.namespace.clone() else {
        return Err(ModelError::NoNamespace {
            namespace: "?".into(),
            name,
        });
    };
    let mut ip4 = None;
    let mut ip6 = None;
    for ip in &w.spec.ips {
        let dup = match ip {
            IpAddr::V4(a) => ip4.replace(*a).is_some(),
            IpAddr::V6(a) => ip6.replace(*a).is_some(),
        };
        if dup {
            return Err(ModelError::BadIps { namespace, name });
        }
    }
    if ip4.is_none() && ip6.is_none() {
        return Err(ModelError::BadIps { namespace, name });
    }
    // A waypoint speaks HBONE itself: its traffic is never captured.
    let is_waypoint = w.metadata.labels.contains_key(labels::WAYPOINT);
    let opted_out = is_waypoint
        || match w.metadata.labels.get(labels::MESH).map(String::as_str) {
            None | Some(labels::MESH_ENABLED) => false,
            Some(labels::MESH_DISABLED) => true,
            Some(v) => {
                return Err(ModelError::BadMeshLabel {
                    object: format!("workload {namespace}/{name}"),
                    label: labels::MESH,
                    value: v.to_string(),
                });
            }
        };
    let ann = &w.metadata.annotations;
    let ports = |a: &'static str| -> Result<Vec<u16>, ModelError> {
        parse_list(ann.get(a), |s| s.parse::<u16>().ok().filter(|p| *p != 0)).map_err(|value| {
            ModelError::BadAnnotation {
                namespace: namespace.clone(),
                name: name.clone(),
                annotation: a,
                value,
                what: "port list",
                hint: "comma-separated ports 1-65535, e.g. \"5432,6379\"",
            }
        })
    };
    let cidrs = |a: &'static str| -> Result<Vec<IpNet>, ModelError> {
        parse_list(ann.get(a), |s| {
            s.parse::<IpNet>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
                .map(|n| n.trunc())
        })
        .map_err(|value| ModelError::BadAnnotation {
            namespace: namespace.clone(),
            name: name.clone(),
            annotation: a,
            value,
            what: "CIDR list",
            hint: "comma-separated CIDRs or addresses, e.g. \"203.0.113.0/24,2001:db8::/32\"",
        })
    };
    let exclusions = Exclusions {
        outbound_ports: ports(labels::EXCLUDE_OUTBOUND_PORTS)?,
        inbound_ports: ports(labels::EXCLUDE_INBOUND_PORTS)?,
        outbound_cidrs: cidrs(labels::EXCLUDE_OUTBOUND_CIDRS)?,
        inbound_cidrs: cidrs(labels::EXCLUDE_INBOUND_CIDRS)?,
    };
    let strict_mtls = mtls_mode(
        ann.get(labels::MTLS),
        format!("workload {namespace}/{name}"),
        "annotation",
    )?
    .unwrap_or_else(|| strict_namespaces.get(&namespace).copied().unwrap_or(false));
    Ok(WorkloadInfo {
        capture: CaptureSettings {
            namespace_meshed: namespaces.get(&namespace).copied().unwrap_or(false),
            opted_out,
            exclusions,
            strict_mtls,
        },
        name,
        namespace,
        service_account: w.spec.service_account.clone(),
        node: w.spec.node.clone(),
        ip4,
        ip6,
        netns: PathBuf::from(&w.spec.netns),
        labels: w.metadata.labels.clone(),
    })
}

/// Parses a comma-separated list; on failure returns the offending item.
fn parse_list<T>(
    value: Option<&String>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, String> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).ok_or_else(|| s.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_documents;

    fn state(
        extra_ann: &str,
        ns_label: &str,
        pod_label: &str,
    ) -> Result<MeshState, Vec<ModelError>> {
        let text = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{{ns_label}}}}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata:
  name: web
  namespace: shop
  labels: {{{pod_label}}}
  annotations: {{{extra_ann}}}
spec: {{node: n1, ips: [198.18.1.11], netns: /run/netns/x}}
"#
        );
        MeshState::from_resources(&parse_documents(&text, "t.yaml").expect("parses"))
    }

    #[test]
    fn services_select_endpoints_and_reject_duplicate_vips() {
        let text = r#"
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {node: n1, ips: [198.18.1.11], netns: /x}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {node: n1, ips: [198.18.1.12], netns: /y}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.18.100.1
  type: ClusterIP
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}, {port: 53, protocol: UDP}]
"#;
        let s = MeshState::from_resources(&parse_documents(text, "s.yaml").expect("parses"))
            .expect("valid");
        let svc = &s.services["shop/web"];
        assert_eq!(svc.hostname, "web.shop.svc.cluster.local");
        assert_eq!(
            svc.vips,
            vec!["198.18.100.1".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(svc.ports.len(), 1, "UDP ports are not meshed");
        assert_eq!(svc.ports[0].target_port, 8080);
        assert_eq!(svc.endpoints.len(), 1);
        assert_eq!(svc.endpoints[0].workload, "shop/web-1");
        let dup = format!(
            "{text}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web2, namespace: shop}}\nspec: {{clusterIP: 198.18.100.1}}\n"
        );
        let e = MeshState::from_resources(&parse_documents(&dup, "s.yaml").expect("parses"))
            .expect_err("duplicate vip");
        assert!(e[0].to_string().contains("198.18.100.1"), "{:?}", e);
    }

    #[test]
    fn policies_are_validated_with_precise_messages() {
        let doc = |spec: &str| {
            format!(
                "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n"
            )
        };
        let ok = doc(
            "{action: ALLOW, selector: {matchLabels: {app: api}}, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/web\"], ipBlocks: [10.0.0.0/8]}], to: [{ports: [8080], methods: [GET]}]}]}",
        );
        let s = MeshState::from_resources(&parse_documents(&ok, "p.yaml").expect("parses"))
            .expect("valid");
        let p = &s.policies["shop/p"];
        assert_eq!(p.action, PolicyAction::Allow);
        assert!(p.rules[0].is_l7());
        for (spec, needle) in [
            ("{action: PERMIT}", "PERMIT"),
            (
                "{action: DENY, rules: [{from: [{principals: [web]}]}]}",
                "principals: `web`",
            ),
            (
                "{action: DENY, rules: [{from: [{ipBlocks: [10.1.2.3/8]}]}]}",
                "did you mean 10.0.0.0/8",
            ),
            (
                "{action: DENY, rules: [{to: [{ports: [0]}]}]}",
                "0 is not a port",
            ),
        ] {
            let e =
                MeshState::from_resources(&parse_documents(&doc(spec), "p.yaml").expect("parses"))
                    .expect_err(spec);
            assert!(e[0].to_string().contains(needle), "{spec}: {}", e[0]);
        }
        let e = parse_documents(&doc("{action: DENY, rulez: []}"), "p.yaml").expect_err("typo");
        assert!(e.message.contains("rulez"), "{e}");
    }

    #[test]
    fn policy_targets_and_header_conditions_are_validated() {
        let doc = |spec: &str| {
            let text = format!(
                "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n"
            );
            MeshState::from_resources(&parse_documents(&text, "t.yaml").expect("parses"))
        };
        let ok = doc(
            "{action: ALLOW, targetRefs: [{kind: Service, name: api}, {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}], rules: [{when: [{key: 'request.headers[X-User]', values: [admin]}]}]}",
        )
        .expect("valid");
        let p = &ok.policies["shop/p"];
        assert_eq!(
            p.targets,
            vec![
                PolicyTarget::Service("api".into()),
                PolicyTarget::Waypoint("waypoint".into())
            ]
        );
        assert_eq!(p.rules[0].when[0].header, "x-user");
        assert!(p.rules[0].is_l7());
        for (spec, want) in [
            (
                "{action: ALLOW, selector: {matchLabels: {a: b}}, targetRefs: [{kind: Service, name: api}]}",
                "exclusive",
            ),
            (
                "{action: ALLOW, targetRefs: [{kind: Pod, name: api}]}",
                "not `Service` or `Gateway`",
            ),
            (
                "{action: ALLOW, rules: [{when: [{key: source.ip, values: [x]}]}]}",
                "only `request.headers[<name>]`",
            ),
            (
                "{action: ALLOW, rules: [{when: [{key: 'request.headers[x]'}]}]}",
                "at least one value",
            ),
        ] {
            let e = doc(spec).expect_err(spec);
            assert!(e[0].to_string().contains(want), "{spec}: {}", e[0]);
        }
    }

    #[test]
    fn waypoint_bindings_from_namespace_and_service_labels() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled, weft.dev/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain, labels: {weft.dev/mesh: enabled}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: waypoint-1, namespace: shop, labels: {weft.dev/waypoint: waypoint}}
spec: {node: n1, ips: [198.18.1.20], netns: /w}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {node: n1, ips: [198.18.1.11], netns: /x}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}], selector: {app: web}}
---
apiVersion: v1
kind: Service
metadata: {name: direct, namespace: shop, labels: {weft.dev/use-waypoint: none}}
spec: {clusterIP: 198.18.100.2, ports: [{port: 80}], selector: {app: web}}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop, labels: {weft.dev/waypoint: waypoint}}
spec: {clusterIP: 198.18.100.3, ports: [{port: 15008}], selector: {weft.dev/waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: plain, labels: {weft.dev/use-waypoint: wp2}}
spec: {clusterIP: 198.18.100.4, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: unbound, namespace: plain}
spec: {clusterIP: 198.18.100.5, ports: [{port: 80}]}
"#;
        let s = MeshState::from_resources(&parse_documents(text, "t.yaml").expect("parses"))
            .expect("valid");
        let wp = |k: &str| s.services[k].waypoint.clone();
        assert_eq!(wp("shop/web").as_deref(), Some("shop/waypoint"));
        assert_eq!(wp("shop/direct"), None, "`none` opts a service out");
        assert_eq!(wp("shop/waypoint"), None, "a waypoint's own service");
        assert_eq!(wp("plain/other").as_deref(), Some("plain/wp2"));
        assert_eq!(wp("plain/unbound"), None);
        assert_eq!(s.services["shop/waypoint"].endpoints.len(), 1);
        let w = &s.workloads["shop/waypoint-1"];
        assert!(
            w.capture.namespace_meshed && !w.capture.captured(),
            "waypoints are not captured"
        );
        assert!(s.workloads["shop/web-1"].capture.captured());

        let bad = text.replace("use-waypoint: wp2", "use-waypoint: Not_A_Name");
        let e = MeshState::from_resources(&parse_documents(&bad, "t.yaml").expect("parses"))
            .expect_err("invalid");
        let msg = e[0].to_string();
        assert!(
            msg.contains("service plain/other") && msg.contains("Not_A_Name"),
            "{msg}"
        );
        let bad = text.replace("use-waypoint: waypoint}", "use-waypoint: none}");
        let e = MeshState::from_resources(&parse_documents(&bad, "t.yaml").expect("parses"))
            .expect_err("`none` names no waypoint on a namespace");
        assert!(e[0].to_string().contains("namespace shop"), "{}", e[0]);
    }

    #[test]
    fn namespace_label_enrols_and_pod_label_opts_out() {
        let s = state("", "weft.dev/mesh: enabled", "").expect("valid");
        assert!(s.workloads["shop/web"].capture.captured());
        let s = state("", "", "").expect("valid");
        assert!(!s.workloads["shop/web"].capture.captured());
        let s = state("", "weft.dev/mesh: enabled", "weft.dev/mesh: disabled").expect("valid");
        let c = &s.workloads["shop/web"].capture;
        assert!(c.opted_out && !c.captured());
    }

    #[test]
    fn exclusion_annotations_are_parsed() {
        let s = state(
            r#"weft.dev/exclude-outbound-ports: "5432, 6379", weft.dev/exclude-inbound-cidrs: "10.1.2.3/8,2001:db8::1""#,
            "weft.dev/mesh: enabled",
            "",
        )
        .expect("valid");
        let e = &s.workloads["shop/web"].capture.exclusions;
        assert_eq!(e.outbound_ports, vec![5432, 6379]);
        assert_eq!(e.inbound_cidrs[0].to_string(), "10.0.0.0/8");
        assert_eq!(e.inbound_cidrs[1].to_string(), "2001:db8::1/128");
    }

    #[test]
    fn bad_annotations_name_the_annotation_and_value() {
        let e = state(r#"weft.dev/exclude-outbound-ports: "80,http""#, "", "").expect_err("bad");
        let msg = e[0].to_string();
        assert!(
            msg.contains("weft.dev/exclude-outbound-ports") && msg.contains("`http`"),
            "{msg}"
        );
        let e =
            state(r#"weft.dev/exclude-outbound-cidrs: "10.0.0.0/33""#, "", "").expect_err("bad");
        assert!(e[0].to_string().contains("10.0.0.0/33"));
        let e = state("", "weft.dev/mesh: yes", "").expect_err("bad label");
        assert!(e[0].to_string().contains("`yes`"));
    }
}
