//! Gateway API HTTPRoute and GRPCRoute attached to Services (GAMMA), validated into
//! [`RouteInfo`]: what a waypoint needs to serve them. Both modes (directory, Kubernetes) and
//! the wire use these types; every problem names the field and the fix.

use serde::Serialize;

use crate::duration::GatewayDuration;
use crate::resource::{
    GatewayRoute, GrpcRoute, GrpcRouteRule, HeaderModifierSpec, HttpRoute, HttpRouteRule,
    NameMatch, ParentRef, RouteBackendRef, RouteFilter,
};

/// Which Gateway API kind a route came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RouteKind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute` (backends speak HTTP/2).
    Grpc,
}

impl RouteKind {
    /// The Gateway API kind.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

/// A Service port a route is attached to (`port: None`: every port of the Service).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteParent {
    /// Service name, in the route's namespace.
    pub service: String,
    pub port: Option<u16>,
}

/// How a path is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PathKind {
    Exact,
    PathPrefix,
    RegularExpression,
}

/// One match: every present condition must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteMatchInfo {
    pub path: Option<(PathKind, String)>,
    /// Exact header conditions.
    pub headers: Vec<(String, String)>,
    /// Exact query parameter conditions.
    pub query_params: Vec<(String, String)>,
    pub method: Option<String>,
    /// GRPCRoute method match: service and/or method.
    pub grpc_service: Option<String>,
    pub grpc_method: Option<String>,
}

/// A header modifier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifierInfo {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderModifierInfo {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A weighted backend: a Service port in the route's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteBackendInfo {
    pub service: String,
    pub port: u16,
    pub weight: u32,
}

/// One rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteRuleInfo {
    /// `rules[].name`, else empty.
    pub name: String,
    /// Empty: every request.
    pub matches: Vec<RouteMatchInfo>,
    pub request_headers: HeaderModifierInfo,
    pub response_headers: HeaderModifierInfo,
    pub backends: Vec<RouteBackendInfo>,
    /// `timeouts.request` / `timeouts.backendRequest`, milliseconds.
    pub request_timeout_ms: Option<u64>,
    pub backend_timeout_ms: Option<u64>,
}

/// A validated HTTPRoute or GRPCRoute attached to Services.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteInfo {
    pub namespace: String,
    pub name: String,
    pub kind: RouteKind,
    pub parents: Vec<RouteParent>,
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRuleInfo>,
}

impl RouteInfo {
    /// `<Kind>/<namespace>/<name>`: unique across both kinds.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.kind.as_str(), self.namespace, self.name)
    }

    /// Whether the route is attached to port `port` of Service `service` (in its namespace).
    pub fn attached_to(&self, namespace: &str, service: &str, port: u16) -> bool {
        self.namespace == namespace
            && self
                .parents
                .iter()
                .any(|p| p.service == service && p.port.is_none_or(|p| p == port))
    }
}

/// Why a route is invalid: `field` is the path in the document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {field}: {problem}")]
pub struct RouteError {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub problem: String,
}

struct Check<'a> {
    kind: RouteKind,
    namespace: &'a str,
    name: &'a str,
    errors: Vec<RouteError>,
}

impl Check<'_> {
    fn fail(&mut self, field: String, problem: impl Into<String>) {
        self.errors.push(RouteError {
            kind: self.kind.as_str(),
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            field,
            problem: problem.into(),
        });
    }

    fn parents(&mut self, refs: &[ParentRef]) -> Vec<RouteParent> {
        if refs.is_empty() {
            self.fail(
                "spec.parentRefs".into(),
                "is empty; attach the route to a Service: parentRefs: [{group: \"\", kind: Service, name: <service>}]",
            );
        }
        let mut out = Vec::new();
        for (i, p) in refs.iter().enumerate() {
            let at = format!("spec.parentRefs[{i}]");
            let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            if !(matches!(group, "" | "core") && kind == "Service") {
                self.fail(
                    at,
                    format!("`{group}/{kind}` is not supported: Weft's waypoints serve routes attached to a Service (group: \"\", kind: Service, the GAMMA mesh pattern)"),
                );
                continue;
            }
            if p.namespace
                .as_deref()
                .is_some_and(|ns| ns != self.namespace)
            {
                self.fail(
                    format!("{at}.namespace"),
                    "routes attached to a Service of another namespace (consumer routes) are not supported; create the route in the Service's namespace",
                );
                continue;
            }
            if p.section_name.is_some() {
                self.fail(
                    format!("{at}.sectionName"),
                    "is not supported for Service parents; use `port` to attach to one port",
                );
                continue;
            }
            if p.port == Some(0) {
                self.fail(format!("{at}.port"), "must be 1-65535");
                continue;
            }
            out.push(RouteParent {
                service: p.name.clone(),
                port: p.port,
            });
        }
        out
    }

    fn hostnames(&mut self, hostnames: &[String]) {
        for (i, h) in hostnames.iter().enumerate() {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if bare.is_empty() || bare.contains(['*', ':', '/']) {
                self.fail(
                    format!("spec.hostnames[{i}]"),
                    format!("`{h}` is not a hostname; write `example.com` or `*.example.com`"),
                );
            }
        }
    }

    fn names(&mut self, at: &str, what: &str, list: &[NameMatch]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, m) in list.iter().enumerate() {
            let kind = m.kind.as_deref().unwrap_or("Exact");
            if kind != "Exact" {
                self.fail(
                    format!("{at}.{what}[{i}].type"),
                    format!("`{kind}` is not implemented by Weft's waypoint; use `Exact`"),
                );
                continue;
            }
            if m.name.is_empty() || m.name.contains([' ', ':', '\r', '\n']) {
                self.fail(
                    format!("{at}.{what}[{i}].name"),
                    format!("`{}` is not a valid name", m.name),
                );
                continue;
            }
            out.push((m.name.to_ascii_lowercase(), m.value.clone()));
        }
        out
    }

    fn modifier(&mut self, at: &str, m: &HeaderModifierSpec) -> HeaderModifierInfo {
        let pairs = |v: &[crate::resource::NameValueSpec]| {
            v.iter()
                .map(|nv| (nv.name.clone(), nv.value.clone()))
                .collect::<Vec<_>>()
        };
        for (i, nv) in m.set.iter().chain(&m.add).enumerate() {
            if nv.name.is_empty() || nv.name.contains([' ', ':', '\r', '\n']) {
                self.fail(
                    at.to_string(),
                    format!("header #{i}: `{}` is not a valid header name", nv.name),
                );
            }
            if nv.value.contains(['\r', '\n']) {
                self.fail(
                    at.to_string(),
                    format!("header `{}`: the value contains a line break", nv.name),
                );
            }
        }
        HeaderModifierInfo {
            set: pairs(&m.set),
            add: pairs(&m.add),
            remove: m.remove.clone(),
        }
    }

    fn filters(&mut self, at: &str, filters: &[RouteFilter], rule: &mut RouteRuleInfo) {
        for (i, f) in filters.iter().enumerate() {
            let at = format!("{at}.filters[{i}]");
            match (
                f.kind.as_str(),
                &f.request_header_modifier,
                &f.response_header_modifier,
            ) {
                ("RequestHeaderModifier", Some(m), _) => {
                    rule.request_headers = self.modifier(&format!("{at}.requestHeaderModifier"), m);
                }
                ("ResponseHeaderModifier", _, Some(m)) => {
                    rule.response_headers =
                        self.modifier(&format!("{at}.responseHeaderModifier"), m);
                }
                ("RequestHeaderModifier" | "ResponseHeaderModifier", _, _) => self.fail(
                    at,
                    format!(
                        "type {} needs its configuration field ({}{})",
                        f.kind,
                        f.kind[..1].to_ascii_lowercase(),
                        &f.kind[1..]
                    ),
                ),
                (other, _, _) => self.fail(
                    format!("{at}.type"),
                    format!(
                        "`{other}` is not implemented for routes from the control plane (RequestHeaderModifier and ResponseHeaderModifier are); an unenforceable rule is refused, not ignored"
                    ),
                ),
            }
        }
    }

    fn backends(&mut self, at: &str, refs: &[RouteBackendRef]) -> Vec<RouteBackendInfo> {
        let mut out = Vec::new();
        for (i, b) in refs.iter().enumerate() {
            let at = format!("{at}.backendRefs[{i}]");
            let group = b.group.as_deref().unwrap_or("");
            let kind = b.kind.as_deref().unwrap_or("Service");
            if !(matches!(group, "" | "core") && kind == "Service") {
                self.fail(
                    at,
                    format!("`{group}/{kind}` is not supported; backends are Services"),
                );
                continue;
            }
            if b.namespace
                .as_deref()
                .is_some_and(|ns| ns != self.namespace)
            {
                self.fail(
                    format!("{at}.namespace"),
                    "backends in another namespace (ReferenceGrant) are not supported; use a Service of the route's namespace",
                );
                continue;
            }
            if !b.filters.is_empty() {
                self.fail(
                    format!("{at}.filters"),
                    "per-backend filters are not implemented; put the filter on the rule",
                );
            }
            let Some(port) = b.port.filter(|p| *p != 0) else {
                self.fail(
                    format!("{at}.port"),
                    "is required for a Service backend (the Service port to send to)",
                );
                continue;
            };
            out.push(RouteBackendInfo {
                service: b.name.clone(),
                port,
                weight: b.weight.unwrap_or(1),
            });
        }
        if !refs.is_empty() && out.iter().all(|b| b.weight == 0) && !out.is_empty() {
            self.fail(
                format!("{at}.backendRefs"),
                "every weight is 0: no request could be sent; give one backend a weight",
            );
        }
        out
    }

    fn duration(&mut self, at: String, v: &Option<String>) -> Option<u64> {
        let v = v.as_deref()?;
        match GatewayDuration::parse(v) {
            Ok(d) => Some(u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)),
            Err(e) => {
                self.fail(at, e.to_string());
                None
            }
        }
    }

    fn finish(self, info: RouteInfo) -> Result<RouteInfo, Vec<RouteError>> {
        if self.errors.is_empty() {
            Ok(info)
        } else {
            Err(self.errors)
        }
    }
}

fn is_grpc_name(v: &str) -> bool {
    !v.is_empty() && !v.contains('/') && !v.chars().any(char::is_whitespace)
}

/// Validates a route of either kind: metadata, parents and hostnames here, each rule's matches
/// with `matches` (which fills `info.matches`, the rest being common).
fn route_info<R>(
    kind: RouteKind,
    r: &GatewayRoute<R>,
    rule_parts: fn(&R) -> RuleParts<'_>,
    matches: impl Fn(&mut Check<'_>, &str, &R, &mut RouteRuleInfo),
) -> Result<RouteInfo, Vec<RouteError>> {
    let namespace = r.metadata.namespace.as_deref().unwrap_or("default");
    let mut c = Check {
        kind,
        namespace,
        name: &r.metadata.name,
        errors: Vec::new(),
    };
    let parents = c.parents(&r.spec.parent_refs);
    c.hostnames(&r.spec.hostnames);
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let parts = rule_parts(rule);
        let mut info = RouteRuleInfo {
            name: parts.name.clone().unwrap_or_default(),
            ..Default::default()
        };
        matches(&mut c, &at, rule, &mut info);
        c.filters(&at, parts.filters, &mut info);
        info.backends = c.backends(&at, parts.backend_refs);
        if let Some(t) = parts.timeouts {
            info.request_timeout_ms = c.duration(format!("{at}.timeouts.request"), &t.request);
            info.backend_timeout_ms =
                c.duration(format!("{at}.timeouts.backendRequest"), &t.backend_request);
        }
        if parts.backend_refs.is_empty() {
            c.fail(
                format!("{at}.backendRefs"),
                "is empty; name at least one Service backend (redirects are not implemented for routes from the control plane)",
            );
        }
        rules.push(info);
    }
    let info = RouteInfo {
        namespace: namespace.to_string(),
        name: r.metadata.name.clone(),
        kind,
        parents,
        hostnames: r.spec.hostnames.clone(),
        rules,
    };
    c.finish(info)
}

/// What both kinds of rule have.
struct RuleParts<'a> {
    name: &'a Option<String>,
    filters: &'a [RouteFilter],
    backend_refs: &'a [RouteBackendRef],
    timeouts: Option<&'a crate::resource::RouteTimeouts>,
}

fn http_parts(rule: &HttpRouteRule) -> RuleParts<'_> {
    RuleParts {
        name: &rule.name,
        filters: &rule.filters,
        backend_refs: &rule.backend_refs,
        timeouts: rule.timeouts.as_ref(),
    }
}

fn grpc_parts(rule: &GrpcRouteRule) -> RuleParts<'_> {
    RuleParts {
        name: &rule.name,
        filters: &rule.filters,
        backend_refs: &rule.backend_refs,
        timeouts: None,
    }
}

/// Validates an HTTPRoute.
pub fn http_route_info(r: &HttpRoute) -> Result<RouteInfo, Vec<RouteError>> {
    route_info(RouteKind::Http, r, http_parts, |c, at, rule, info| {
        for (m, matching) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{m}]");
            let path = matching.path.as_ref().and_then(|p| {
                let value = p.value.clone().unwrap_or_else(|| "/".into());
                let kind = match p.kind.as_deref().unwrap_or("PathPrefix") {
                    "Exact" => PathKind::Exact,
                    "PathPrefix" => PathKind::PathPrefix,
                    "RegularExpression" => PathKind::RegularExpression,
                    other => {
                        c.fail(
                            format!("{at}.path.type"),
                            format!("`{other}` is not one of Exact, PathPrefix, RegularExpression"),
                        );
                        return None;
                    }
                };
                if kind != PathKind::RegularExpression && !value.starts_with('/') {
                    c.fail(
                        format!("{at}.path.value"),
                        format!("`{value}` does not start with `/`"),
                    );
                }
                Some((kind, value))
            });
            let headers = c.names(&at, "headers", &matching.headers);
            let query_params = c.names(&at, "queryParams", &matching.query_params);
            info.matches.push(RouteMatchInfo {
                path,
                headers,
                query_params,
                method: matching.method.clone(),
                ..Default::default()
            });
        }
    })
}

/// Validates a GRPCRoute.
pub fn grpc_route_info(r: &GrpcRoute) -> Result<RouteInfo, Vec<RouteError>> {
    route_info(RouteKind::Grpc, r, grpc_parts, |c, at, rule, info| {
        for (m, matching) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{m}]");
            let mut out = RouteMatchInfo {
                headers: c.names(&at, "headers", &matching.headers),
                ..Default::default()
            };
            if let Some(method) = &matching.method {
                let kind = method.kind.as_deref().unwrap_or("Exact");
                if kind != "Exact" {
                    c.fail(
                        format!("{at}.method.type"),
                        format!("`{kind}` is not implemented by Weft's waypoint; use `Exact`"),
                    );
                }
                if method.service.is_none() && method.method.is_none() {
                    c.fail(
                        format!("{at}.method"),
                        "names neither `service` nor `method`; set at least one",
                    );
                }
                for (field, v) in [("service", &method.service), ("method", &method.method)] {
                    if let Some(v) = v
                        && !is_grpc_name(v)
                    {
                        c.fail(
                            format!("{at}.method.{field}"),
                            format!("`{v}` is not a gRPC {field} name (no `/` or spaces)"),
                        );
                    }
                }
                out.grpc_service = method.service.clone();
                out.grpc_method = method.method.clone();
            }
            info.matches.push(out);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Resource, parse_documents};

    fn parse(yaml: &str) -> Result<RouteInfo, Vec<RouteError>> {
        match parse_documents(yaml, "t.yaml").expect("parses").remove(0) {
            Resource::HttpRoute(r) => http_route_info(&r),
            Resource::GrpcRoute(r) => grpc_route_info(&r),
            other => panic!("not a route: {other:?}"),
        }
    }

    const HTTP: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: X-Canary, value: "true"}]}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-a, value: b}], remove: [x-drop]}
      backendRefs: [{name: api-v2, port: 80, weight: 90}, {name: api, port: 80, weight: 10}]
      timeouts: {request: 2s, backendRequest: 500ms}
    - backendRefs: [{name: api, port: 80}]
"#;

    #[test]
    fn http_route_validates_into_the_model() {
        let r = parse(HTTP).expect("valid");
        assert_eq!(r.key(), "HTTPRoute/shop/api");
        assert!(r.attached_to("shop", "api", 80));
        assert!(!r.attached_to("shop", "api", 81));
        assert!(!r.attached_to("other", "api", 80));
        let rule = &r.rules[0];
        assert_eq!(
            rule.matches[0].path,
            Some((PathKind::PathPrefix, "/v2".into()))
        );
        assert_eq!(
            rule.matches[0].headers,
            vec![("x-canary".into(), "true".into())]
        );
        assert_eq!(rule.request_headers.set, vec![("x-a".into(), "b".into())]);
        assert_eq!(rule.backends[0].weight, 90);
        assert_eq!(rule.request_timeout_ms, Some(2000));
        assert_eq!(rule.backend_timeout_ms, Some(500));
        assert_eq!(r.rules[1].backends[0].weight, 1);
    }

    #[test]
    fn grpc_route_validates_into_the_model() {
        let r = parse(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter}]
  rules:
    - matches: [{method: {service: shop.Greeter, method: SayHello}}]
      backendRefs: [{name: greeter-v2, port: 50051}]
"#,
        )
        .expect("valid");
        assert_eq!(r.kind, RouteKind::Grpc);
        assert!(r.attached_to("shop", "greeter", 50051));
        assert_eq!(
            r.rules[0].matches[0].grpc_service.as_deref(),
            Some("shop.Greeter")
        );
    }

    #[test]
    fn every_problem_is_named_with_its_field() {
        let bad = HTTP
            .replace(
                "{group: \"\", kind: Service, name: api, port: 80}",
                "{name: gw}",
            )
            .replace("type: PathPrefix, value: /v2", "type: Prefix, value: /v2")
            .replace("type: RequestHeaderModifier\n", "type: URLRewrite\n")
            .replace(
                "{name: api-v2, port: 80, weight: 90}",
                "{name: api-v2, weight: 90}",
            )
            .replace("request: 2s", "request: 2 seconds");
        let errors = parse(&bad).expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.parentRefs[0]",
            "spec.rules[0].matches[0].path.type",
            "spec.rules[0].filters[0].type",
            "spec.rules[0].backendRefs[0].port",
            "spec.rules[0].timeouts.request",
        ] {
            assert!(fields.contains(&f), "{f} missing from {errors:?}");
        }
        assert!(
            errors[0].to_string().starts_with("HTTPRoute shop/api: "),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unknown_fields_are_refused_at_parse() {
        let e = parse_documents(
            &HTTP.replace("  rules:\n", "  sessionPersistence: {}\n  rules:\n"),
            "t.yaml",
        )
        .expect_err("unknown field");
        assert!(e.to_string().contains("sessionPersistence"), "{e}");
    }
}
