//! The wire protocol (protobuf, `proto/weft/discovery/v1/discovery.proto`) and its conversion
//! to and from the internal model. Wire types never travel further than the stream handlers:
//! they are converted once, here, with every problem named.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use prost::Message as _;

use crate::model::{
    CaptureSettings, EndpointInfo, Exclusions, HeaderCondition, PolicyAction,
    PolicyDestinationInfo, PolicyInfo, PolicyRuleInfo, PolicySourceInfo, PolicyTarget, ServiceInfo,
    ServicePort, WorkloadInfo,
};
use crate::routes::{
    HeaderModifierInfo, PathKind, PathModifierInfo, RedirectInfo, RedirectScheme, RouteBackendInfo,
    RouteInfo, RouteKind, RouteMatchInfo, RouteParent, RouteRuleInfo, UrlRewriteInfo,
};

/// Generated protobuf types and gRPC stubs.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("weft.discovery.v1");
}

/// A wire resource that cannot be turned into the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resource {key}: field `{field}`: {problem}")]
pub struct WireError {
    pub key: String,
    pub field: &'static str,
    pub problem: String,
}

/// Resource key of a workload: `Workload/<namespace>/<name>`.
pub fn workload_key(namespace: &str, name: &str) -> String {
    format!("Workload/{namespace}/{name}")
}

impl From<&WorkloadInfo> for pb::Workload {
    fn from(w: &WorkloadInfo) -> Self {
        let e = &w.capture.exclusions;
        Self {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            ips: w
                .ip4
                .map(IpAddr::V4)
                .into_iter()
                .chain(w.ip6.map(IpAddr::V6))
                .map(|ip| ip.to_string())
                .collect(),
            netns: w.netns.display().to_string(),
            labels: w.labels.clone(),
            namespace_meshed: w.capture.namespace_meshed,
            opted_out: w.capture.opted_out,
            exclude_outbound_ports: e.outbound_ports.iter().map(|p| u32::from(*p)).collect(),
            exclude_inbound_ports: e.inbound_ports.iter().map(|p| u32::from(*p)).collect(),
            exclude_outbound_cidrs: e.outbound_cidrs.iter().map(ToString::to_string).collect(),
            exclude_inbound_cidrs: e.inbound_cidrs.iter().map(ToString::to_string).collect(),
            strict_mtls: w.capture.strict_mtls,
        }
    }
}

/// Resource key of a peer (any workload of the mesh, slimmed): `Peer/<namespace>/<name>`.
pub fn peer_key(namespace: &str, name: &str) -> String {
    format!("Peer/{namespace}/{name}")
}

/// Prefix of [`peer_key`]s.
pub const PEER_PREFIX: &str = "Peer/";

/// What every agent learns about a workload, wherever it runs: addresses, identity, node and
/// whether it is meshed; not its network namespace, labels or capture exclusions.
pub fn peer_resource(w: &WorkloadInfo) -> pb::Resource {
    let mut wire = pb::Workload::from(w);
    wire.netns.clear();
    wire.labels.clear();
    wire.exclude_outbound_ports.clear();
    wire.exclude_inbound_ports.clear();
    wire.exclude_outbound_cidrs.clear();
    wire.exclude_inbound_cidrs.clear();
    pb::Resource {
        key: peer_key(&w.namespace, &w.name),
        version: content_version(&wire.encode_to_vec()),
        kind: Some(pb::resource::Kind::Workload(wire)),
    }
}

impl TryFrom<pb::Workload> for WorkloadInfo {
    type Error = WireError;

    fn try_from(w: pb::Workload) -> Result<Self, WireError> {
        let key = workload_key(&w.namespace, &w.name);
        let err = |field: &'static str, problem: String| WireError {
            key: key.clone(),
            field,
            problem,
        };
        if w.name.is_empty() || w.namespace.is_empty() || w.node.is_empty() {
            return Err(err("name/namespace/node", "must not be empty".into()));
        }
        let mut ip4 = None;
        let mut ip6 = None;
        for ip in &w.ips {
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if ip4.is_none() => ip4 = Some(a),
                Ok(IpAddr::V6(a)) if ip6.is_none() => ip6 = Some(a),
                Ok(_) => return Err(err("ips", "more than one address of a family".into())),
                Err(e) => return Err(err("ips", format!("`{ip}`: {e}"))),
            }
        }
        if ip4.is_none() && ip6.is_none() {
            return Err(err("ips", "no address".into()));
        }
        let ports = |field: &'static str, v: &[u32]| -> Result<Vec<u16>, WireError> {
            v.iter()
                .map(|p| {
                    u16::try_from(*p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| err(field, format!("{p} is not a port")))
                })
                .collect()
        };
        let cidrs = |field: &'static str, v: &[String]| -> Result<Vec<IpNet>, WireError> {
            v.iter()
                .map(|c| {
                    c.parse::<IpNet>()
                        .map_err(|e| err(field, format!("`{c}`: {e}")))
                })
                .collect()
        };
        let exclusions = Exclusions {
            outbound_ports: ports("exclude_outbound_ports", &w.exclude_outbound_ports)?,
            inbound_ports: ports("exclude_inbound_ports", &w.exclude_inbound_ports)?,
            outbound_cidrs: cidrs("exclude_outbound_cidrs", &w.exclude_outbound_cidrs)?,
            inbound_cidrs: cidrs("exclude_inbound_cidrs", &w.exclude_inbound_cidrs)?,
        };
        Ok(WorkloadInfo {
            name: w.name,
            namespace: w.namespace,
            service_account: if w.service_account.is_empty() {
                "default".into()
            } else {
                w.service_account
            },
            node: w.node,
            ip4,
            ip6,
            netns: PathBuf::from(w.netns),
            labels: w.labels,
            capture: CaptureSettings {
                namespace_meshed: w.namespace_meshed,
                opted_out: w.opted_out,
                exclusions,
                strict_mtls: w.strict_mtls,
            },
        })
    }
}

/// Resource key of a service: `Service/<namespace>/<name>`.
pub fn service_key(namespace: &str, name: &str) -> String {
    format!("Service/{namespace}/{name}")
}

fn ips_text(ip4: Option<std::net::Ipv4Addr>, ip6: Option<std::net::Ipv6Addr>) -> Vec<String> {
    ip4.map(IpAddr::V4)
        .into_iter()
        .chain(ip6.map(IpAddr::V6))
        .map(|ip| ip.to_string())
        .collect()
}

impl From<&ServiceInfo> for pb::Service {
    fn from(s: &ServiceInfo) -> Self {
        Self {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            vips: s.vips.iter().map(ToString::to_string).collect(),
            ports: s
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    target_port: u32::from(p.target_port),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| pb::Endpoint {
                    workload: e.workload.clone(),
                    ips: ips_text(e.ip4, e.ip6),
                    ready: e.ready,
                })
                .collect(),
            waypoint: s.waypoint.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::Service> for ServiceInfo {
    type Error = WireError;

    fn try_from(s: pb::Service) -> Result<Self, WireError> {
        let key = service_key(&s.namespace, &s.name);
        let err = |field: &'static str, problem: String| WireError {
            key: key.clone(),
            field,
            problem,
        };
        if s.name.is_empty() || s.namespace.is_empty() {
            return Err(err("name/namespace", "must not be empty".into()));
        }
        let vips = s
            .vips
            .iter()
            .map(|v| {
                v.parse::<IpAddr>()
                    .map_err(|e| err("vips", format!("`{v}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let port = |field: &'static str, p: u32| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err(field, format!("{p} is not a port")))
        };
        let mut ports = Vec::new();
        for p in s.ports {
            ports.push(ServicePort {
                port: port("ports.port", p.port)?,
                target_port: port("ports.target_port", p.target_port)?,
                name: p.name,
                app_protocol: p.app_protocol,
            });
        }
        let mut endpoints = Vec::new();
        for e in s.endpoints {
            let (mut ip4, mut ip6) = (None, None);
            for ip in &e.ips {
                match ip.parse::<IpAddr>() {
                    Ok(IpAddr::V4(a)) => ip4 = Some(a),
                    Ok(IpAddr::V6(a)) => ip6 = Some(a),
                    Err(x) => return Err(err("endpoints.ips", format!("`{ip}`: {x}"))),
                }
            }
            endpoints.push(EndpointInfo {
                workload: e.workload,
                ip4,
                ip6,
                ready: e.ready,
            });
        }
        let waypoint = match s.waypoint.as_str() {
            "" => None,
            w if w
                .split_once('/')
                .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty()) =>
            {
                Some(s.waypoint.clone())
            }
            w => {
                return Err(err(
                    "waypoint",
                    format!("`{w}` is not <namespace>/<name> of a waypoint's Service"),
                ));
            }
        };
        Ok(ServiceInfo {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            ports,
            endpoints,
            waypoint,
        })
    }
}

/// Resource key of the mesh's trust bundle.
pub const TRUST_BUNDLE_KEY: &str = "TrustBundle/mesh";

/// The trust bundle as a versioned wire resource.
pub fn trust_bundle_resource(roots_pem: &[String]) -> pb::Resource {
    let wire = pb::TrustBundle {
        roots_pem: roots_pem.to_vec(),
    };
    pb::Resource {
        key: TRUST_BUNDLE_KEY.to_string(),
        version: content_version(&wire.encode_to_vec()),
        kind: Some(pb::resource::Kind::TrustBundle(wire)),
    }
}

/// Resource key of a policy: `AuthorizationPolicy/<namespace>/<name>`.
pub fn policy_key(namespace: &str, name: &str) -> String {
    format!("AuthorizationPolicy/{namespace}/{name}")
}

impl From<&PolicyInfo> for pb::AuthorizationPolicy {
    fn from(p: &PolicyInfo) -> Self {
        Self {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            has_selector: p.selector.is_some(),
            selector: p.selector.clone().unwrap_or_default(),
            action: match p.action {
                PolicyAction::Allow => pb::PolicyAction::Allow,
                PolicyAction::Deny => pb::PolicyAction::Deny,
                PolicyAction::Audit => pb::PolicyAction::Audit,
            } as i32,
            rules: p
                .rules
                .iter()
                .map(|r| pb::PolicyRule {
                    from: r
                        .from
                        .iter()
                        .map(|s| pb::PolicySource {
                            namespaces: s.namespaces.clone(),
                            principals: s.principals.clone(),
                            ip_blocks: s.ip_blocks.iter().map(ToString::to_string).collect(),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|d| pb::PolicyDestination {
                            ports: d.ports.iter().map(|p| u32::from(*p)).collect(),
                            methods: d.methods.clone(),
                            paths: d.paths.clone(),
                        })
                        .collect(),
                    when: r
                        .when
                        .iter()
                        .map(|c| pb::PolicyCondition {
                            header: c.header.clone(),
                            values: c.values.clone(),
                        })
                        .collect(),
                })
                .collect(),
            dry_run: p.dry_run,
            target_refs: p
                .targets
                .iter()
                .map(|t| match t {
                    PolicyTarget::Service(name) => pb::PolicyTargetRef {
                        kind: pb::policy_target_ref::Kind::Service as i32,
                        name: name.clone(),
                    },
                    PolicyTarget::Waypoint(name) => pb::PolicyTargetRef {
                        kind: pb::policy_target_ref::Kind::Waypoint as i32,
                        name: name.clone(),
                    },
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::AuthorizationPolicy> for PolicyInfo {
    type Error = WireError;

    fn try_from(p: pb::AuthorizationPolicy) -> Result<Self, WireError> {
        let key = policy_key(&p.namespace, &p.name);
        let err = |field: &'static str, problem: String| WireError {
            key: key.clone(),
            field,
            problem,
        };
        let action = match pb::PolicyAction::try_from(p.action) {
            Ok(pb::PolicyAction::Allow) => PolicyAction::Allow,
            Ok(pb::PolicyAction::Deny) => PolicyAction::Deny,
            Ok(pb::PolicyAction::Audit) => PolicyAction::Audit,
            _ => {
                return Err(err(
                    "action",
                    format!("{} is not ALLOW, DENY or AUDIT", p.action),
                ));
            }
        };
        let mut rules = Vec::new();
        for r in p.rules {
            let mut from = Vec::new();
            for s in r.from {
                let ip_blocks = s
                    .ip_blocks
                    .iter()
                    .map(|b| {
                        b.parse::<IpNet>()
                            .map_err(|e| err("ip_blocks", format!("`{b}`: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                from.push(PolicySourceInfo {
                    namespaces: s.namespaces,
                    principals: s.principals,
                    ip_blocks,
                });
            }
            let mut to = Vec::new();
            for d in r.to {
                let ports = d
                    .ports
                    .iter()
                    .map(|p| {
                        u16::try_from(*p)
                            .ok()
                            .filter(|p| *p != 0)
                            .ok_or_else(|| err("ports", format!("{p} is not a port")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                to.push(PolicyDestinationInfo {
                    ports,
                    methods: d.methods,
                    paths: d.paths,
                });
            }
            let mut when = Vec::new();
            for c in r.when {
                if c.header.is_empty() || c.values.is_empty() {
                    return Err(err(
                        "when",
                        "a header condition needs a header and values".into(),
                    ));
                }
                when.push(HeaderCondition {
                    header: c.header.to_ascii_lowercase(),
                    values: c.values,
                });
            }
            rules.push(PolicyRuleInfo { from, to, when });
        }
        let mut targets = Vec::new();
        for t in p.target_refs {
            if t.name.is_empty() {
                return Err(err("target_refs", "a target needs a name".into()));
            }
            targets.push(match pb::policy_target_ref::Kind::try_from(t.kind) {
                Ok(pb::policy_target_ref::Kind::Service) => PolicyTarget::Service(t.name),
                Ok(pb::policy_target_ref::Kind::Waypoint) => PolicyTarget::Waypoint(t.name),
                _ => {
                    return Err(err(
                        "target_refs",
                        format!("kind {} is not SERVICE or WAYPOINT", t.kind),
                    ));
                }
            });
        }
        if p.has_selector && !targets.is_empty() {
            return Err(err(
                "target_refs",
                "a policy has a selector or targets, not both".into(),
            ));
        }
        Ok(PolicyInfo {
            selector: p.has_selector.then_some(p.selector),
            name: p.name,
            namespace: p.namespace,
            action,
            rules,
            dry_run: p.dry_run,
            targets,
            agent_workloads: None,
        })
    }
}

/// A policy as a versioned wire resource.
pub fn policy_resource(p: &PolicyInfo) -> pb::Resource {
    let wire = pb::AuthorizationPolicy::from(p);
    pb::Resource {
        key: policy_key(&p.namespace, &p.name),
        version: content_version(&wire.encode_to_vec()),
        kind: Some(pb::resource::Kind::AuthorizationPolicy(wire)),
    }
}

impl From<&RouteInfo> for pb::Route {
    fn from(r: &RouteInfo) -> Self {
        let nv = |v: &[(String, String)]| {
            v.iter()
                .map(|(name, value)| pb::NameValue {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect::<Vec<_>>()
        };
        let modifier = |m: &HeaderModifierInfo| pb::HeaderModifier {
            set: nv(&m.set),
            add: nv(&m.add),
            remove: m.remove.clone(),
        };
        let path_modifier = |p: &PathModifierInfo| {
            let (kind, value) = match p {
                PathModifierInfo::ReplaceFullPath(v) => {
                    (pb::path_modifier::Kind::ReplaceFullPath, v)
                }
                PathModifierInfo::ReplacePrefixMatch(v) => {
                    (pb::path_modifier::Kind::ReplacePrefixMatch, v)
                }
            };
            pb::PathModifier {
                kind: kind.into(),
                value: value.clone(),
            }
        };
        Self {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            kind: match r.kind {
                RouteKind::Http => pb::route::Kind::Http,
                RouteKind::Grpc => pb::route::Kind::Grpc,
            }
            .into(),
            parents: r
                .parents
                .iter()
                .map(|p| pb::RouteParent {
                    service: p.service.clone(),
                    port: p.port.map_or(0, u32::from),
                })
                .collect(),
            hostnames: r.hostnames.clone(),
            rules: r
                .rules
                .iter()
                .map(|rule| pb::RouteRule {
                    name: rule.name.clone(),
                    matches: rule
                        .matches
                        .iter()
                        .map(|m| {
                            let (path_kind, path) = match &m.path {
                                None => (pb::route_match::PathKind::None, String::new()),
                                Some((k, v)) => (
                                    match k {
                                        PathKind::Exact => pb::route_match::PathKind::Exact,
                                        PathKind::PathPrefix => {
                                            pb::route_match::PathKind::PathPrefix
                                        }
                                        PathKind::RegularExpression => {
                                            pb::route_match::PathKind::RegularExpression
                                        }
                                    },
                                    v.clone(),
                                ),
                            };
                            pb::RouteMatch {
                                path_kind: path_kind.into(),
                                path,
                                headers: nv(&m.headers),
                                query_params: nv(&m.query_params),
                                method: m.method.clone().unwrap_or_default(),
                                grpc_service: m.grpc_service.clone().unwrap_or_default(),
                                grpc_method: m.grpc_method.clone().unwrap_or_default(),
                            }
                        })
                        .collect(),
                    request_headers: Some(modifier(&rule.request_headers)),
                    response_headers: Some(modifier(&rule.response_headers)),
                    backends: rule
                        .backends
                        .iter()
                        .map(|b| pb::RouteBackend {
                            service: b.service.clone(),
                            port: u32::from(b.port),
                            weight: b.weight,
                        })
                        .collect(),
                    request_timeout_ms: rule.request_timeout_ms.unwrap_or(0),
                    backend_timeout_ms: rule.backend_timeout_ms.unwrap_or(0),
                    retry: rule.retry.as_ref().map(|r| pb::RouteRetry {
                        attempts: r.attempts,
                        codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
                        backoff_ms: r.backoff_ms.unwrap_or(0),
                    }),
                    url_rewrite: rule.url_rewrite.as_ref().map(|u| pb::UrlRewrite {
                        hostname: u.hostname.clone().unwrap_or_default(),
                        path: u.path.as_ref().map(path_modifier),
                    }),
                    redirect: rule.redirect.as_ref().map(|r| pb::RequestRedirect {
                        scheme: match r.scheme {
                            None => pb::request_redirect::Scheme::Unspecified,
                            Some(RedirectScheme::Http) => pb::request_redirect::Scheme::Http,
                            Some(RedirectScheme::Https) => pb::request_redirect::Scheme::Https,
                        }
                        .into(),
                        hostname: r.hostname.clone().unwrap_or_default(),
                        path: r.path.as_ref().map(path_modifier),
                        port: r.port.map_or(0, u32::from),
                        status_code: u32::from(r.status_code),
                    }),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::Route> for RouteInfo {
    type Error = WireError;

    fn try_from(r: pb::Route) -> Result<Self, WireError> {
        let kind = match pb::route::Kind::try_from(r.kind) {
            Ok(pb::route::Kind::Http) => RouteKind::Http,
            Ok(pb::route::Kind::Grpc) => RouteKind::Grpc,
            Err(_) => {
                return Err(WireError {
                    key: format!("Route/{}/{}", r.namespace, r.name),
                    field: "kind",
                    problem: format!("unknown route kind {}", r.kind),
                });
            }
        };
        let key = format!("{}/{}/{}", kind.as_str(), r.namespace, r.name);
        let err = |field: &'static str, problem: String| WireError {
            key: key.clone(),
            field,
            problem,
        };
        let port = |field: &'static str, v: u32| {
            u16::try_from(v).map_err(|_| err(field, format!("{v} is not a port")))
        };
        let pairs = |v: Vec<pb::NameValue>| -> Vec<(String, String)> {
            v.into_iter().map(|nv| (nv.name, nv.value)).collect()
        };
        let modifier = |m: Option<pb::HeaderModifier>| {
            let m = m.unwrap_or_default();
            HeaderModifierInfo {
                set: pairs(m.set),
                add: pairs(m.add),
                remove: m.remove,
            }
        };
        let opt = |v: String| (!v.is_empty()).then_some(v);
        let path_modifier = |field: &'static str, p: Option<pb::PathModifier>| {
            let Some(p) = p else {
                return Ok(None);
            };
            if !p.value.starts_with('/') {
                return Err(err(field, format!("`{}` does not start with `/`", p.value)));
            }
            match pb::path_modifier::Kind::try_from(p.kind) {
                Ok(pb::path_modifier::Kind::ReplaceFullPath) => {
                    Ok(Some(PathModifierInfo::ReplaceFullPath(p.value)))
                }
                Ok(pb::path_modifier::Kind::ReplacePrefixMatch) => {
                    Ok(Some(PathModifierInfo::ReplacePrefixMatch(p.value)))
                }
                _ => Err(err(
                    field,
                    format!(
                        "kind {} is not REPLACE_FULL_PATH or REPLACE_PREFIX_MATCH",
                        p.kind
                    ),
                )),
            }
        };
        let mut parents = Vec::new();
        for p in r.parents {
            let port = port("parents.port", p.port)?;
            parents.push(RouteParent {
                service: p.service,
                port: (port != 0).then_some(port),
            });
        }
        let mut rules = Vec::new();
        for rule in r.rules {
            let mut matches = Vec::new();
            for m in rule.matches {
                let path = match pb::route_match::PathKind::try_from(m.path_kind) {
                    Ok(pb::route_match::PathKind::None) => None,
                    Ok(pb::route_match::PathKind::Exact) => Some((PathKind::Exact, m.path)),
                    Ok(pb::route_match::PathKind::PathPrefix) => {
                        Some((PathKind::PathPrefix, m.path))
                    }
                    Ok(pb::route_match::PathKind::RegularExpression) => {
                        Some((PathKind::RegularExpression, m.path))
                    }
                    Err(_) => {
                        return Err(err(
                            "rules.matches.path_kind",
                            format!("unknown path kind {}", m.path_kind),
                        ));
                    }
                };
                matches.push(RouteMatchInfo {
                    path,
                    headers: pairs(m.headers),
                    query_params: pairs(m.query_params),
                    method: opt(m.method),
                    grpc_service: opt(m.grpc_service),
                    grpc_method: opt(m.grpc_method),
                });
            }
            let mut backends = Vec::new();
            for b in rule.backends {
                backends.push(RouteBackendInfo {
                    service: b.service,
                    port: port("rules.backends.port", b.port)?,
                    weight: b.weight,
                });
            }
            let url_rewrite = match rule.url_rewrite {
                None => None,
                Some(u) => Some(UrlRewriteInfo {
                    hostname: opt(u.hostname),
                    path: path_modifier("rules.url_rewrite.path", u.path)?,
                }),
            };
            let redirect = match rule.redirect {
                None => None,
                Some(r) => {
                    let scheme = match pb::request_redirect::Scheme::try_from(r.scheme) {
                        Ok(pb::request_redirect::Scheme::Unspecified) => None,
                        Ok(pb::request_redirect::Scheme::Http) => Some(RedirectScheme::Http),
                        Ok(pb::request_redirect::Scheme::Https) => Some(RedirectScheme::Https),
                        Err(_) => {
                            return Err(err(
                                "rules.redirect.scheme",
                                format!("unknown scheme {}", r.scheme),
                            ));
                        }
                    };
                    let status_code = match r.status_code {
                        301 => 301,
                        302 => 302,
                        c => {
                            return Err(err(
                                "rules.redirect.status_code",
                                format!("{c} is not 301 or 302"),
                            ));
                        }
                    };
                    let port = port("rules.redirect.port", r.port)?;
                    Some(RedirectInfo {
                        scheme,
                        hostname: opt(r.hostname),
                        path: path_modifier("rules.redirect.path", r.path)?,
                        port: (port != 0).then_some(port),
                        status_code,
                    })
                }
            };
            let retry = match rule.retry {
                None => None,
                Some(r) => {
                    if r.attempts > crate::routes::MAX_RETRY_ATTEMPTS {
                        return Err(err(
                            "rules.retry.attempts",
                            format!(
                                "{} is more than {}",
                                r.attempts,
                                crate::routes::MAX_RETRY_ATTEMPTS
                            ),
                        ));
                    }
                    let mut codes = Vec::with_capacity(r.codes.len());
                    for code in r.codes {
                        match u16::try_from(code) {
                            Ok(code @ 400..=599) => codes.push(code),
                            _ => {
                                return Err(err(
                                    "rules.retry.codes",
                                    format!("{code} is not a status code 400-599"),
                                ));
                            }
                        }
                    }
                    Some(crate::routes::RetryInfo {
                        attempts: r.attempts,
                        codes,
                        backoff_ms: (r.backoff_ms != 0).then_some(r.backoff_ms),
                    })
                }
            };
            if redirect.is_some() && (url_rewrite.is_some() || !backends.is_empty()) {
                return Err(err(
                    "rules.redirect",
                    "a rule with a redirect has no rewrite and no backends".into(),
                ));
            }
            rules.push(RouteRuleInfo {
                name: rule.name,
                matches,
                request_headers: modifier(rule.request_headers),
                response_headers: modifier(rule.response_headers),
                url_rewrite,
                redirect,
                backends,
                request_timeout_ms: (rule.request_timeout_ms != 0)
                    .then_some(rule.request_timeout_ms),
                backend_timeout_ms: (rule.backend_timeout_ms != 0)
                    .then_some(rule.backend_timeout_ms),
                retry,
            });
        }
        Ok(RouteInfo {
            namespace: r.namespace,
            name: r.name,
            kind,
            parents,
            hostnames: r.hostnames,
            rules,
        })
    }
}

/// A route as a versioned wire resource (key `<Kind>/<namespace>/<name>`).
pub fn route_resource(r: &RouteInfo) -> pb::Resource {
    let wire = pb::Route::from(r);
    pb::Resource {
        key: r.key(),
        version: content_version(&wire.encode_to_vec()),
        kind: Some(pb::resource::Kind::Route(wire)),
    }
}

/// A service as a versioned wire resource.
pub fn service_resource(s: &ServiceInfo) -> pb::Resource {
    let wire = pb::Service::from(s);
    pb::Resource {
        key: service_key(&s.namespace, &s.name),
        version: content_version(&wire.encode_to_vec()),
        kind: Some(pb::resource::Kind::Service(wire)),
    }
}

/// A workload as a versioned wire resource. The version is a hash of the encoded content, so
/// equal versions mean equal content (maps are ordered, so encoding is deterministic).
pub fn workload_resource(w: &WorkloadInfo) -> pb::Resource {
    let wire = pb::Workload::from(w);
    let version = content_version(&wire.encode_to_vec());
    pb::Resource {
        key: workload_key(&w.namespace, &w.name),
        version,
        kind: Some(pb::resource::Kind::Workload(wire)),
    }
}

/// FNV-1a 64 of the bytes, as 16 hex digits.
pub fn content_version(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkloadInfo {
        WorkloadInfo {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "n1".into(),
            ip4: "198.18.1.11".parse().ok(),
            ip6: "fd77:6566:1::b".parse().ok(),
            netns: "/run/netns/x".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            capture: CaptureSettings {
                namespace_meshed: true,
                opted_out: false,
                exclusions: Exclusions {
                    outbound_ports: vec![5432],
                    inbound_ports: vec![],
                    outbound_cidrs: vec!["10.0.0.0/8".parse().expect("cidr")],
                    inbound_cidrs: vec![],
                },
                strict_mtls: true,
            },
        }
    }

    #[test]
    fn workloads_round_trip_and_versions_are_stable() {
        let w = sample();
        let r1 = workload_resource(&w);
        let r2 = workload_resource(&w.clone());
        assert_eq!(r1.version, r2.version);
        let Some(pb::resource::Kind::Workload(wire)) = r1.kind else {
            panic!("not a workload")
        };
        assert_eq!(WorkloadInfo::try_from(wire).expect("valid"), w);
        let mut changed = sample();
        changed.capture.opted_out = true;
        assert_ne!(workload_resource(&changed).version, r2.version);
    }

    #[test]
    fn routes_round_trip() {
        let docs = crate::parse_documents(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}, {group: "", kind: Service, name: api-v2}]
  hostnames: [api.shop]
  rules:
    - name: canary
      matches: [{path: {type: Exact, value: /x}, headers: [{name: a, value: b}], queryParams: [{name: q, value: "1"}], method: POST}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: b}], add: [{name: x-c, value: d}], remove: [x-e]}}
        - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-r, value: s}]}}
      backendRefs: [{name: api-v2, port: 80, weight: 3}]
      timeouts: {request: 1s, backendRequest: 250ms}
      retry: {codes: [503, 504], attempts: 1, backoff: 50ms}
    - name: retry-defaults
      backendRefs: [{name: api-v2, port: 80}]
      retry: {}
    - name: rewrite
      matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - {type: URLRewrite, urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}
      backendRefs: [{name: api, port: 80}]
    - name: full
      matches: [{path: {type: Exact, value: /health}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /healthz}}}]
      backendRefs: [{name: api, port: 80}]
    - name: moved
      matches: [{path: {type: PathPrefix, value: /moved}}]
      filters:
        - {type: RequestRedirect, requestRedirect: {scheme: https, hostname: www.example.com, port: 8443, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /here}}}
    - name: bare-redirect
      filters: [{type: RequestRedirect, requestRedirect: {scheme: http, path: {type: ReplaceFullPath, replaceFullPath: /}}}]
    - name: default-redirect
      matches: [{method: DELETE}]
      filters: [{type: RequestRedirect, requestRedirect: {}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter, port: 50051}]
  rules:
    - matches: [{method: {service: shop.Greeter}}]
      backendRefs: [{name: greeter, port: 50051}]
"#,
            "t.yaml",
        )
        .expect("parse");
        let state = crate::MeshState::from_resources(&docs).expect("valid");
        assert_eq!(state.routes.len(), 2);
        let http = &state.routes["HTTPRoute/shop/api"];
        assert!(http.rules.iter().any(|r| r.url_rewrite.is_some()));
        assert!(
            http.rules
                .iter()
                .any(|r| r.redirect.as_ref().is_some_and(|d| d.port == Some(8443)))
        );
        for route in state.routes.values() {
            let r = route_resource(route);
            assert_eq!(r.key, route.key());
            let Some(pb::resource::Kind::Route(wire)) = r.kind else {
                panic!("not a route")
            };
            assert_eq!(&RouteInfo::try_from(wire).expect("back"), route);
        }
        // Routes without the new filters encode as before (their versions do not change).
        let plain = &state.routes["GRPCRoute/shop/g"];
        let wire = pb::Route::from(plain);
        assert!(
            wire.rules
                .iter()
                .all(|r| r.url_rewrite.is_none() && r.redirect.is_none() && r.retry.is_none())
        );
        assert!(
            http.rules
                .iter()
                .any(|r| r.retry.as_ref().is_some_and(|r| r.codes == [503, 504]))
        );
        // Out-of-range values on the wire are refused, not trusted.
        let mut wire = pb::Route::from(http);
        wire.rules[0].retry = Some(pb::RouteRetry {
            attempts: 1,
            codes: vec![200],
            backoff_ms: 0,
        });
        let err = RouteInfo::try_from(wire.clone()).expect_err("code 200");
        assert!(err.to_string().contains("400-599"), "{err}");
        wire.rules[0].retry = Some(pb::RouteRetry {
            attempts: 99,
            codes: vec![],
            backoff_ms: 0,
        });
        assert!(RouteInfo::try_from(wire).is_err());
    }

    /// A route with one rewrite rule and one redirect rule, on the wire.
    fn filter_route() -> pb::Route {
        let docs = crate::parse_documents(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
      backendRefs: [{name: api, port: 80}]
    - filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /x}}}]
"#,
            "t.yaml",
        )
        .expect("parse");
        let state = crate::MeshState::from_resources(&docs).expect("valid");
        pb::Route::from(&state.routes["HTTPRoute/shop/api"])
    }

    #[test]
    fn malformed_rewrites_and_redirects_from_the_wire_name_the_field() {
        let good = filter_route();
        RouteInfo::try_from(good.clone()).expect("valid");
        type Breaker = fn(&mut pb::Route);
        let cases: &[(Breaker, &str, &str)] = &[
            (
                |r| r.rules[1].redirect.as_mut().expect("redirect").status_code = 307,
                "rules.redirect.status_code",
                "307 is not 301 or 302",
            ),
            (
                |r| r.rules[1].redirect.as_mut().expect("redirect").status_code = 0,
                "rules.redirect.status_code",
                "0 is not 301 or 302",
            ),
            (
                |r| r.rules[1].redirect.as_mut().expect("redirect").scheme = 9,
                "rules.redirect.scheme",
                "unknown scheme 9",
            ),
            (
                |r| r.rules[1].redirect.as_mut().expect("redirect").port = 70000,
                "rules.redirect.port",
                "70000 is not a port",
            ),
            (
                |r| {
                    let redirect = r.rules[1].redirect.as_mut().expect("redirect");
                    redirect.path.as_mut().expect("path").kind = 0;
                },
                "rules.redirect.path",
                "kind 0 is not REPLACE_FULL_PATH",
            ),
            (
                |r| {
                    let rewrite = r.rules[0].url_rewrite.as_mut().expect("rewrite");
                    rewrite.path.as_mut().expect("path").kind = 42;
                },
                "rules.url_rewrite.path",
                "kind 42",
            ),
            (
                |r| {
                    let rewrite = r.rules[0].url_rewrite.as_mut().expect("rewrite");
                    rewrite.path.as_mut().expect("path").value = "new".into();
                },
                "rules.url_rewrite.path",
                "does not start with `/`",
            ),
            (
                |r| {
                    let backends = r.rules[0].backends.clone();
                    r.rules[1].backends = backends;
                },
                "rules.redirect",
                "no rewrite and no backends",
            ),
            (
                |r| {
                    let rewrite = r.rules[0].url_rewrite.clone();
                    r.rules[1].url_rewrite = rewrite;
                },
                "rules.redirect",
                "no rewrite and no backends",
            ),
        ];
        for (break_it, field, text) in cases {
            let mut wire = good.clone();
            break_it(&mut wire);
            let e = RouteInfo::try_from(wire).expect_err(field);
            assert_eq!(e.field, *field, "{e}");
            assert!(e.problem.contains(text), "{e}");
            assert!(
                e.to_string().starts_with("resource HTTPRoute/shop/api: "),
                "{e}"
            );
        }
    }

    #[test]
    fn services_round_trip() {
        let s = ServiceInfo {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            vips: vec!["198.18.100.1".parse().expect("ip")],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                app_protocol: "http".into(),
            }],
            endpoints: vec![EndpointInfo {
                workload: "shop/web-1".into(),
                ip4: "198.18.1.11".parse().ok(),
                ip6: None,
                ready: true,
            }],
            waypoint: Some("shop/waypoint".into()),
        };
        let r = service_resource(&s);
        assert_eq!(r.key, "Service/shop/web");
        let Some(pb::resource::Kind::Service(wire)) = r.kind else {
            panic!("not a service")
        };
        assert_eq!(ServiceInfo::try_from(wire.clone()).expect("valid"), s);
        let mut bad = wire;
        bad.ports[0].target_port = 0;
        assert_eq!(
            ServiceInfo::try_from(bad).expect_err("port").field,
            "ports.target_port"
        );
    }

    #[test]
    fn policies_round_trip_and_unspecified_actions_fail_closed() {
        let p = PolicyInfo {
            name: "p".into(),
            namespace: "shop".into(),
            selector: Some([("app".to_string(), "api".to_string())].into()),
            action: PolicyAction::Deny,
            rules: vec![PolicyRuleInfo {
                from: vec![PolicySourceInfo {
                    namespaces: vec!["legacy".into()],
                    principals: vec![],
                    ip_blocks: vec!["10.0.0.0/8".parse().expect("cidr")],
                }],
                to: vec![PolicyDestinationInfo {
                    ports: vec![8080],
                    methods: vec![],
                    paths: vec![],
                }],
                when: vec![HeaderCondition {
                    header: "x-user".into(),
                    values: vec!["admin*".into()],
                }],
            }],
            dry_run: false,
            targets: vec![],
            agent_workloads: None,
        };
        let Some(pb::resource::Kind::AuthorizationPolicy(wire)) = policy_resource(&p).kind else {
            panic!("not a policy")
        };
        assert_eq!(PolicyInfo::try_from(wire.clone()).expect("valid"), p);
        let targeted = PolicyInfo {
            selector: None,
            targets: vec![
                PolicyTarget::Service("api".into()),
                PolicyTarget::Waypoint("waypoint".into()),
            ],
            ..p.clone()
        };
        let Some(pb::resource::Kind::AuthorizationPolicy(w2)) = policy_resource(&targeted).kind
        else {
            panic!("not a policy")
        };
        assert_eq!(PolicyInfo::try_from(w2.clone()).expect("valid"), targeted);
        let mut bad = w2;
        bad.target_refs[0].kind = 0;
        assert_eq!(
            PolicyInfo::try_from(bad)
                .expect_err("unspecified kind")
                .field,
            "target_refs"
        );
        let mut bad = wire;
        bad.action = 0;
        assert_eq!(
            PolicyInfo::try_from(bad).expect_err("unspecified").field,
            "action"
        );
    }

    #[test]
    fn bad_wire_workloads_name_the_field() {
        let mut wire = pb::Workload::from(&sample());
        wire.ips = vec!["nope".into()];
        let e = WorkloadInfo::try_from(wire).expect_err("bad ip");
        assert_eq!(e.field, "ips");
        assert!(e.to_string().contains("Workload/shop/web"), "{e}");
        let mut wire = pb::Workload::from(&sample());
        wire.exclude_inbound_ports = vec![70000];
        assert_eq!(
            WorkloadInfo::try_from(wire).expect_err("port").field,
            "exclude_inbound_ports"
        );
        let mut wire = pb::Workload::from(&sample());
        wire.exclude_outbound_cidrs = vec!["10.0.0.0/99".into()];
        assert_eq!(
            WorkloadInfo::try_from(wire).expect_err("cidr").field,
            "exclude_outbound_cidrs"
        );
    }
}
