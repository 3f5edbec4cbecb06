//! Gateway API HTTPRoute and GRPCRoute attached to Services (GAMMA), validated into
//! [`RouteInfo`]: what a waypoint needs to serve them. Both modes (directory, Kubernetes) and
//! the wire use these types; every problem names the field and the fix.

use serde::Serialize;

use crate::duration::GatewayDuration;
use crate::resource::{
    GatewayRoute, GrpcRoute, GrpcRouteRule, HeaderModifierSpec, HttpRoute, HttpRouteRule,
    NameMatch, ParentRef, PathModifierSpec, RequestRedirectSpec, RouteBackendRef, RouteFilter,
    UrlRewriteSpec,
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

/// How a `URLRewrite` or a `RequestRedirect` changes the path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathModifierInfo {
    /// Replaces the whole path (starts with `/`).
    ReplaceFullPath(String),
    /// Replaces the part of the path the rule's `PathPrefix` match matched (starts with `/`;
    /// Gateway API's empty replacement is stored as `/`, which means the same).
    ReplacePrefixMatch(String),
}

/// A `URLRewrite` filter: what the request is forwarded with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UrlRewriteInfo {
    /// New `Host` header.
    pub hostname: Option<String>,
    pub path: Option<PathModifierInfo>,
}

/// The scheme of a redirect's `Location`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RedirectScheme {
    Http,
    Https,
}

impl RedirectScheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectScheme::Http => "http",
            RedirectScheme::Https => "https",
        }
    }
}

/// A `RequestRedirect` filter: the rule answers with a redirect instead of forwarding. Absent
/// parts of the `Location` come from the request (Gateway API semantics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RedirectInfo {
    /// `None`: the request's scheme.
    pub scheme: Option<RedirectScheme>,
    /// `None`: the request's host.
    pub hostname: Option<String>,
    /// `None`: the request's path.
    pub path: Option<PathModifierInfo>,
    /// `None`: the scheme's well-known port when `scheme` is set, else the port the client
    /// used (the Service port).
    pub port: Option<u16>,
    /// 301 or 302.
    pub status_code: u16,
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
    /// `URLRewrite` (HTTPRoute only; never with `redirect`).
    pub url_rewrite: Option<UrlRewriteInfo>,
    /// `RequestRedirect` (HTTPRoute only): the rule has no backends.
    pub redirect: Option<RedirectInfo>,
    pub backends: Vec<RouteBackendInfo>,
    /// `timeouts.request` / `timeouts.backendRequest`, milliseconds.
    pub request_timeout_ms: Option<u64>,
    pub backend_timeout_ms: Option<u64>,
    /// `retry` (HTTPRoute only).
    pub retry: Option<RetryInfo>,
}

/// Most retries a rule may ask for: each one is a whole new request to a backend.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Retries when `retry.attempts` is unset (Envoy Gateway's and Istio's default).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// An HTTPRoute rule's `retry`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryInfo {
    /// Retries after the first attempt (0: none).
    pub attempts: u32,
    /// Response status codes to retry on, 400-599, sorted, without repeats. Connection errors
    /// are always retried.
    pub codes: Vec<u16>,
    /// The least time between attempts, milliseconds.
    pub backoff_ms: Option<u64>,
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
        let mut seen: Vec<&str> = Vec::new();
        let mut prefix_replaced = None;
        for (i, f) in filters.iter().enumerate() {
            let at = format!("{at}.filters[{i}]");
            // Gateway API: a filter carries the configuration of its own type only.
            for (field, present, owner) in [
                (
                    "requestHeaderModifier",
                    f.request_header_modifier.is_some(),
                    "RequestHeaderModifier",
                ),
                (
                    "responseHeaderModifier",
                    f.response_header_modifier.is_some(),
                    "ResponseHeaderModifier",
                ),
                ("urlRewrite", f.url_rewrite.is_some(), "URLRewrite"),
                (
                    "requestRedirect",
                    f.request_redirect.is_some(),
                    "RequestRedirect",
                ),
                ("requestMirror", f.request_mirror.is_some(), "RequestMirror"),
                ("extensionRef", f.extension_ref.is_some(), "ExtensionRef"),
            ] {
                if present && f.kind != owner {
                    self.fail(
                        format!("{at}.{field}"),
                        format!(
                            "is set but the filter's type is `{}`; a filter holds only the field of its type: remove `{field}` or set `type: {owner}`",
                            f.kind
                        ),
                    );
                }
            }
            let implemented = match self.kind {
                RouteKind::Http => &[
                    "RequestHeaderModifier",
                    "ResponseHeaderModifier",
                    "URLRewrite",
                    "RequestRedirect",
                ][..],
                RouteKind::Grpc => &["RequestHeaderModifier", "ResponseHeaderModifier"][..],
            };
            if implemented.contains(&f.kind.as_str()) {
                if seen.contains(&f.kind.as_str()) {
                    self.fail(
                        format!("{at}.type"),
                        format!(
                            "`{}` appears more than once in this rule; Gateway API allows each of these filters once per rule: merge them into one",
                            f.kind
                        ),
                    );
                    continue;
                }
                seen.push(f.kind.as_str());
            }
            let needs_field = |c: &mut Self, field: &str| {
                c.fail(
                    at.clone(),
                    format!("type {} needs its configuration field `{field}`", f.kind),
                );
            };
            match (self.kind, f.kind.as_str()) {
                (_, "RequestHeaderModifier") => match &f.request_header_modifier {
                    Some(m) => {
                        rule.request_headers =
                            self.modifier(&format!("{at}.requestHeaderModifier"), m);
                    }
                    None => needs_field(self, "requestHeaderModifier"),
                },
                (_, "ResponseHeaderModifier") => match &f.response_header_modifier {
                    Some(m) => {
                        rule.response_headers =
                            self.modifier(&format!("{at}.responseHeaderModifier"), m);
                    }
                    None => needs_field(self, "responseHeaderModifier"),
                },
                (RouteKind::Http, "URLRewrite") => match &f.url_rewrite {
                    Some(spec) => {
                        let at = format!("{at}.urlRewrite");
                        let info = self.url_rewrite(&at, spec);
                        if matches!(info.path, Some(PathModifierInfo::ReplacePrefixMatch(_))) {
                            prefix_replaced = Some(format!("{at}.path"));
                        }
                        rule.url_rewrite = Some(info);
                    }
                    None => needs_field(self, "urlRewrite"),
                },
                (RouteKind::Http, "RequestRedirect") => match &f.request_redirect {
                    Some(spec) => {
                        let at = format!("{at}.requestRedirect");
                        let info = self.redirect(&at, spec);
                        if matches!(info.path, Some(PathModifierInfo::ReplacePrefixMatch(_))) {
                            prefix_replaced = Some(format!("{at}.path"));
                        }
                        rule.redirect = Some(info);
                    }
                    None => needs_field(self, "requestRedirect"),
                },
                (RouteKind::Grpc, other @ ("URLRewrite" | "RequestRedirect")) => self.fail(
                    format!("{at}.type"),
                    format!(
                        "`{other}` is not a GRPCRoute filter (GRPCRoute has RequestHeaderModifier, ResponseHeaderModifier, RequestMirror and ExtensionRef); use an HTTPRoute for rewrites and redirects"
                    ),
                ),
                (_, other) => self.fail(
                    format!("{at}.type"),
                    format!(
                        "`{other}` is not implemented for routes from the control plane ({} are); an unenforceable rule is refused, not ignored",
                        implemented.join(", ")
                    ),
                ),
            }
        }
        let at_filters = format!("{at}.filters");
        if rule.url_rewrite.is_some() && rule.redirect.is_some() {
            self.fail(
                at_filters.clone(),
                "has both URLRewrite and RequestRedirect; Gateway API does not allow them in one rule (a redirect answers, a rewrite forwards): keep one, or use two rules",
            );
        }
        if rule.redirect.is_some() && !rule.response_headers.is_empty() {
            self.fail(
                at_filters,
                "has both RequestRedirect and ResponseHeaderModifier; Weft's waypoint answers a redirect before the response header filter runs, so the modifier would be ignored: remove it",
            );
        }
        if let Some(field) = prefix_replaced {
            self.prefix_match_rule(field, rule);
        }
    }

    /// ReplacePrefixMatch replaces what a `PathPrefix` match matched: Gateway API requires the
    /// rule to have exactly one match, a `PathPrefix` one. A missing match or path is Gateway
    /// API's default (`PathPrefix /`, applied here as Kubernetes applies it).
    fn prefix_match_rule(&mut self, field: String, rule: &mut RouteRuleInfo) {
        if rule.matches.is_empty() {
            rule.matches.push(RouteMatchInfo::default());
        }
        let [only] = rule.matches.as_mut_slice() else {
            self.fail(
                field,
                format!(
                    "ReplacePrefixMatch needs the rule to have exactly one match, with a PathPrefix path (Gateway API), and it has {}: split the rule into one rule per match, or use ReplaceFullPath",
                    rule.matches.len()
                ),
            );
            return;
        };
        match &only.path {
            None => only.path = Some((PathKind::PathPrefix, "/".into())),
            Some((PathKind::PathPrefix, _)) => {}
            Some((kind, _)) => self.fail(
                field,
                format!(
                    "ReplacePrefixMatch needs the rule's match to be a PathPrefix path (Gateway API), not {kind:?}: use a PathPrefix match, or ReplaceFullPath"
                ),
            ),
        }
    }

    fn url_rewrite(&mut self, at: &str, spec: &UrlRewriteSpec) -> UrlRewriteInfo {
        if let Some(h) = &spec.hostname {
            self.precise_hostname(format!("{at}.hostname"), h);
        }
        UrlRewriteInfo {
            hostname: spec.hostname.clone(),
            path: spec
                .path
                .as_ref()
                .and_then(|p| self.path_modifier(&format!("{at}.path"), p)),
        }
    }

    fn redirect(&mut self, at: &str, spec: &RequestRedirectSpec) -> RedirectInfo {
        let scheme = match spec.scheme.as_deref() {
            None => None,
            Some("http") => Some(RedirectScheme::Http),
            Some("https") => Some(RedirectScheme::Https),
            Some(other) => {
                self.fail(
                    format!("{at}.scheme"),
                    format!("`{other}` is not a redirect scheme; use `http` or `https` (or leave it out to keep the request's)"),
                );
                None
            }
        };
        if let Some(h) = &spec.hostname {
            self.precise_hostname(format!("{at}.hostname"), h);
        }
        let port = spec.port.and_then(|p| match u16::try_from(p) {
            Ok(p) if p != 0 => Some(p),
            _ => {
                self.fail(
                    format!("{at}.port"),
                    format!("{p} is not a port; use 1-65535 (or leave it out: the scheme's port, else the Service port)"),
                );
                None
            }
        });
        let status_code = match spec.status_code {
            None => 302,
            Some(c @ (301 | 302)) => c as u16,
            Some(c @ (303 | 307 | 308)) => {
                self.fail(
                    format!("{at}.statusCode"),
                    format!("{c} is not implemented by Weft's waypoint; use 301 or 302"),
                );
                302
            }
            Some(c) => {
                self.fail(
                    format!("{at}.statusCode"),
                    format!("{c} is not a redirect status; use 301 or 302 (default 302)"),
                );
                302
            }
        };
        RedirectInfo {
            scheme,
            hostname: spec.hostname.clone(),
            path: spec
                .path
                .as_ref()
                .and_then(|p| self.path_modifier(&format!("{at}.path"), p)),
            port,
            status_code,
        }
    }

    fn path_modifier(&mut self, at: &str, spec: &PathModifierSpec) -> Option<PathModifierInfo> {
        let (full, prefix) = (&spec.replace_full_path, &spec.replace_prefix_match);
        let (value, own, other) = match spec.kind.as_str() {
            "ReplaceFullPath" => (full, "replaceFullPath", ("replacePrefixMatch", prefix)),
            "ReplacePrefixMatch" => (prefix, "replacePrefixMatch", ("replaceFullPath", full)),
            kind => {
                self.fail(
                    format!("{at}.type"),
                    format!(
                        "`{kind}` is not a path modifier; use ReplaceFullPath or ReplacePrefixMatch"
                    ),
                );
                return None;
            }
        };
        if other.1.is_some() {
            self.fail(
                format!("{at}.{}", other.0),
                format!(
                    "is set but `type` is {}; remove it, or set `{own}` instead",
                    spec.kind
                ),
            );
        }
        let Some(value) = value else {
            self.fail(
                format!("{at}.{own}"),
                format!("is required when `type` is {}", spec.kind),
            );
            return None;
        };
        let at = format!("{at}.{own}");
        // An empty ReplacePrefixMatch is Gateway API's "remove the prefix".
        let replaces_prefix_with_nothing = spec.kind == "ReplacePrefixMatch" && value.is_empty();
        if !replaces_prefix_with_nothing && !value.starts_with('/') {
            self.fail(
                at.clone(),
                format!("`{value}` does not start with `/`; paths are absolute"),
            );
            return None;
        }
        if value.len() > 1024 {
            self.fail(
                at.clone(),
                "is longer than 1024 characters (Gateway API's limit)",
            );
            return None;
        }
        if let Some(c) = value.chars().find(|c| !is_path_char(*c)) {
            self.fail(
                at,
                format!(
                    "`{value}` has `{}`, which a URL path cannot hold: percent-encode it (e.g. `%20` for a space); a query (`?`) or fragment (`#`) cannot be set here",
                    c.escape_default()
                ),
            );
            return None;
        }
        Some(if spec.kind == "ReplaceFullPath" {
            PathModifierInfo::ReplaceFullPath(value.clone())
        } else if value.is_empty() {
            PathModifierInfo::ReplacePrefixMatch("/".into())
        } else {
            PathModifierInfo::ReplacePrefixMatch(value.clone())
        })
    }

    /// Gateway API `PreciseHostname`: a DNS name (RFC 1123), lowercase, no wildcard, no port,
    /// not an IP address.
    fn precise_hostname(&mut self, at: String, h: &str) {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let valid = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(label_ok)
            && h.parse::<std::net::Ipv4Addr>().is_err();
        if !valid {
            self.fail(
                at,
                format!(
                    "`{h}` is not a DNS name; write a lowercase host such as `api.shop.svc.cluster.local` (letters, digits, `-` and `.`; no wildcard, port or IP address)"
                ),
            );
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

    fn retry(&mut self, at: &str, r: &crate::resource::RouteRetry) -> Option<RetryInfo> {
        let mut ok = true;
        let attempts = match r.attempts {
            None => DEFAULT_RETRY_ATTEMPTS,
            Some(n) => match u32::try_from(n) {
                Ok(n) if n <= MAX_RETRY_ATTEMPTS => n,
                _ => {
                    ok = false;
                    self.fail(
                        format!("{at}.attempts"),
                        format!(
                            "{n} is out of range: Weft allows 0 to {MAX_RETRY_ATTEMPTS} retries per request (each is a new request to a backend; the retry budget caps them further)"
                        ),
                    );
                    0
                }
            },
        };
        let mut codes = Vec::with_capacity(r.codes.len());
        for (i, code) in r.codes.iter().enumerate() {
            match u16::try_from(*code) {
                Ok(code @ 400..=599) => codes.push(code),
                _ => {
                    ok = false;
                    self.fail(
                        format!("{at}.codes[{i}]"),
                        format!("{code} is not a retryable status code; use 400-599 (e.g. 503)"),
                    );
                }
            }
        }
        codes.sort_unstable();
        codes.dedup();
        let backoff_ms = self.duration(format!("{at}.backoff"), &r.backoff);
        if r.backoff.is_some() && backoff_ms.is_none() {
            ok = false;
        }
        ok.then_some(RetryInfo {
            attempts,
            codes,
            backoff_ms,
        })
    }

    fn finish(self, info: RouteInfo) -> Result<RouteInfo, Vec<RouteError>> {
        if self.errors.is_empty() {
            Ok(info)
        } else {
            Err(self.errors)
        }
    }
}

/// RFC 3986 `pchar` and `/`: unreserved, `%` of a percent-encoding, sub-delims, `:`, `@`.
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~%!$&'()*+,;=:@/".contains(c)
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
        if let Some(r) = parts.retry {
            info.retry = c.retry(&format!("{at}.retry"), r);
        }
        if info.redirect.is_some() && parts.retry.is_some() {
            c.fail(
                format!("{at}.retry"),
                "has no effect in a rule with a RequestRedirect filter (the waypoint answers, nothing is forwarded to retry); remove retry, or the filter",
            );
        }
        match (&info.redirect, parts.backend_refs.is_empty()) {
            (Some(_), false) => c.fail(
                format!("{at}.backendRefs"),
                "must be empty in a rule with a RequestRedirect filter (Gateway API: the redirect answers, nothing is forwarded); remove backendRefs, or the filter",
            ),
            (None, true) => c.fail(
                format!("{at}.backendRefs"),
                "is empty; name at least one Service backend (or answer with a RequestRedirect filter)",
            ),
            _ => {}
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
    retry: Option<&'a crate::resource::RouteRetry>,
}

fn http_parts(rule: &HttpRouteRule) -> RuleParts<'_> {
    RuleParts {
        name: &rule.name,
        filters: &rule.filters,
        backend_refs: &rule.backend_refs,
        timeouts: rule.timeouts.as_ref(),
        retry: rule.retry.as_ref(),
    }
}

fn grpc_parts(rule: &GrpcRouteRule) -> RuleParts<'_> {
    RuleParts {
        name: &rule.name,
        filters: &rule.filters,
        backend_refs: &rule.backend_refs,
        timeouts: None,
        retry: None,
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
      retry: {codes: [504, 502, 503, 502], attempts: 3, backoff: 100ms}
    - backendRefs: [{name: api, port: 80}]
      retry: {}
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
        assert_eq!(
            rule.retry,
            Some(RetryInfo {
                attempts: 3,
                codes: vec![502, 503, 504],
                backoff_ms: Some(100)
            })
        );
        assert_eq!(r.rules[1].backends[0].weight, 1);
        // `retry: {}`: the default number of retries, on connection errors only.
        assert_eq!(
            r.rules[1].retry,
            Some(RetryInfo {
                attempts: DEFAULT_RETRY_ATTEMPTS,
                codes: vec![],
                backoff_ms: None
            })
        );
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
            .replace("type: RequestHeaderModifier\n", "type: RequestMirror\n")
            .replace(
                "{name: api-v2, port: 80, weight: 90}",
                "{name: api-v2, weight: 90}",
            )
            .replace("request: 2s", "request: 2 seconds")
            .replace("codes: [504, 502, 503, 502]", "codes: [504, 302, 600]")
            .replace("attempts: 3", "attempts: 11")
            .replace("backoff: 100ms", "backoff: soon");
        let errors = parse(&bad).expect_err("invalid");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.parentRefs[0]",
            "spec.rules[0].matches[0].path.type",
            "spec.rules[0].filters[0].type",
            "spec.rules[0].backendRefs[0].port",
            "spec.rules[0].timeouts.request",
            "spec.rules[0].retry.codes[1]",
            "spec.rules[0].retry.codes[2]",
            "spec.rules[0].retry.attempts",
            "spec.rules[0].retry.backoff",
        ] {
            assert!(fields.contains(&f), "{f} missing from {errors:?}");
        }
        assert!(
            errors[0].to_string().starts_with("HTTPRoute shop/api: "),
            "{}",
            errors[0]
        );
    }

    /// An HTTPRoute of namespace `shop` attached to Service `api` with `rules` (YAML list
    /// items indented by 4).
    fn http_rules(rules: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: api, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: api}}]\n  rules:\n{rules}"
        )
    }

    #[test]
    fn rewrites_and_redirects_validate_into_the_model() {
        let r = parse(&http_rules(
            r#"    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: URLRewrite
          urlRewrite: {hostname: internal.shop, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
      backendRefs: [{name: api, port: 80}]
    - matches: [{path: {type: Exact, value: /x}}, {path: {type: RegularExpression, value: "/y.*"}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /z}}}]
      backendRefs: [{name: api, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /moved}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, hostname: www.example.com, port: 8443, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}}
    - matches: [{headers: [{name: x-go, value: away}]}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: b}]}}
        - {type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    - filters: [{type: RequestRedirect, requestRedirect: {}}]
"#,
        ))
        .expect("valid");
        assert_eq!(
            r.rules[0].url_rewrite,
            Some(UrlRewriteInfo {
                hostname: Some("internal.shop".into()),
                path: Some(PathModifierInfo::ReplacePrefixMatch("/new".into())),
            })
        );
        assert_eq!(r.rules[0].redirect, None);
        assert_eq!(
            r.rules[1].url_rewrite.as_ref().and_then(|u| u.path.clone()),
            Some(PathModifierInfo::ReplaceFullPath("/z".into())),
            "ReplaceFullPath goes with any match"
        );
        assert_eq!(
            r.rules[2].redirect,
            Some(RedirectInfo {
                scheme: Some(RedirectScheme::Https),
                hostname: Some("www.example.com".into()),
                // Gateway API's empty replacement: the prefix is removed.
                path: Some(PathModifierInfo::ReplacePrefixMatch("/".into())),
                port: Some(8443),
                status_code: 301,
            })
        );
        assert!(r.rules[2].backends.is_empty());
        // A match without a path is Gateway API's default `PathPrefix /`, made explicit.
        assert_eq!(
            r.rules[3].matches[0].path,
            Some((PathKind::PathPrefix, "/".into()))
        );
        assert_eq!(r.rules[3].matches[0].headers.len(), 1);
        assert_eq!(
            r.rules[4].redirect,
            Some(RedirectInfo {
                scheme: None,
                hostname: None,
                path: None,
                port: None,
                status_code: 302,
            }),
            "statusCode defaults to 302"
        );
        assert!(
            r.rules[4].matches.is_empty(),
            "no prefix replaced: unchanged"
        );
    }

    #[test]
    fn prefix_replacement_of_a_rule_without_matches_gets_the_default_match() {
        let r = parse(&http_rules(
            "    - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]\n      backendRefs: [{name: api, port: 80}]\n",
        ))
        .expect("valid");
        assert_eq!(r.rules[0].matches.len(), 1);
        assert_eq!(
            r.rules[0].matches[0].path,
            Some((PathKind::PathPrefix, "/".into()))
        );
    }

    /// Each rule alone is refused with exactly this field and a message containing this text.
    #[test]
    fn rewrite_and_redirect_refusals_name_the_field_and_the_fix() {
        let at = "spec.rules[0]";
        let cases: &[(&str, &str, &str)] = &[
            (
                "    - matches: [{path: {type: Exact, value: /old}}]\n      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.path",
                "needs the rule's match to be a PathPrefix path",
            ),
            (
                "    - matches: [{path: {type: PathPrefix, value: /a}}, {path: {type: PathPrefix, value: /b}}]\n      filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]\n",
                "spec.rules[0].filters[0].requestRedirect.path",
                "exactly one match",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].backendRefs",
                "must be empty in a rule with a RequestRedirect filter",
            ),
            (
                "    - matches: [{path: {type: PathPrefix, value: /a}}]\n      filters: [{type: URLRewrite, urlRewrite: {hostname: b.shop}}, {type: RequestRedirect, requestRedirect: {scheme: https}}]\n",
                "spec.rules[0].filters",
                "both URLRewrite and RequestRedirect",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]\n      retry: {attempts: 1}\n",
                "spec.rules[0].retry",
                "has no effect in a rule with a RequestRedirect filter",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]\n",
                "spec.rules[0].filters[0].requestRedirect.statusCode",
                "use 301 or 302",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]\n",
                "spec.rules[0].filters[0].requestRedirect.statusCode",
                "200 is not a redirect status; use 301 or 302",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]\n",
                "spec.rules[0].filters[0].requestRedirect.scheme",
                "use `http` or `https`",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {port: 0}}]\n",
                "spec.rules[0].filters[0].requestRedirect.port",
                "use 1-65535",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {port: 70000}}]\n",
                "spec.rules[0].filters[0].requestRedirect.port",
                "70000 is not a port; use 1-65535",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {hostname: \"*.example.com\"}}]\n",
                "spec.rules[0].filters[0].requestRedirect.hostname",
                "is not a DNS name",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {hostname: Api.Shop}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.hostname",
                "write a lowercase host",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {hostname: \"api.shop:8080\"}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.hostname",
                "no wildcard, port or IP address",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {hostname: 10.0.0.1}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.hostname",
                "is not a DNS name",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {path: {type: Prefix, replacePrefixMatch: /a}}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.path.type",
                "use ReplaceFullPath or ReplacePrefixMatch",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
                "is required when `type` is ReplaceFullPath",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /a, replacePrefixMatch: /b}}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
                "is set but `type` is ReplaceFullPath",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: relative}}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
                "does not start with `/`",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: \"/a b?c\"}}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
                "percent-encode it",
            ),
            (
                "    - filters: [{type: URLRewrite, urlRewrite: {hostname: a.shop}}, {type: URLRewrite, urlRewrite: {hostname: b.shop}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[1].type",
                "appears more than once",
            ),
            (
                "    - filters: [{type: URLRewrite}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0]",
                "needs its configuration field `urlRewrite`",
            ),
            (
                "    - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}, urlRewrite: {hostname: a.shop}}]\n      backendRefs: [{name: api, port: 80}]\n",
                "spec.rules[0].filters[0].urlRewrite",
                "is set but the filter's type is `RequestHeaderModifier`",
            ),
            (
                "    - filters: [{type: RequestRedirect, requestRedirect: {}}, {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: a, value: b}]}}]\n",
                "spec.rules[0].filters",
                "the modifier would be ignored",
            ),
        ];
        for (rules, field, text) in cases {
            let errors = parse(&http_rules(rules)).expect_err(field);
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == *field && e.problem.contains(text)),
                "want {field}: ...{text}... for\n{rules}got {errors:#?}"
            );
            assert!(
                errors.iter().all(|e| e.field.starts_with(at)),
                "{errors:#?}"
            );
        }
    }

    #[test]
    fn grpc_routes_have_no_rewrites_or_redirects() {
        for filter in [
            "{type: URLRewrite, urlRewrite: {hostname: a.shop}}",
            "{type: RequestRedirect, requestRedirect: {scheme: https}}",
        ] {
            let errors = parse(&format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: greeter}}]\n  rules:\n    - filters: [{filter}]\n      backendRefs: [{{name: greeter, port: 50051}}]\n"
            ))
            .expect_err("refused");
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == "spec.rules[0].filters[0].type"
                        && e.problem.contains("is not a GRPCRoute filter")),
                "{errors:#?}"
            );
        }
    }

    #[test]
    fn unknown_fields_of_rewrites_and_redirects_are_refused_at_parse() {
        for (filter, field) in [
            (
                "{type: URLRewrite, urlRewrite: {hostname: a.shop, port: 80}}",
                "urlRewrite",
            ),
            (
                "{type: RequestRedirect, requestRedirect: {scheme: https, query: x}}",
                "requestRedirect",
            ),
            (
                "{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /a, value: /b}}}",
                "urlRewrite.path",
            ),
        ] {
            let e = parse_documents(
                &http_rules(&format!(
                    "    - filters: [{filter}]\n      backendRefs: [{{name: api, port: 80}}]\n"
                )),
                "t.yaml",
            )
            .expect_err("unknown field");
            assert!(
                e.field
                    .as_deref()
                    .is_some_and(|f| f.starts_with(&format!("spec.rules[0].filters[0].{field}"))),
                "{e}"
            );
            assert!(e.message.contains("unknown field"), "{e}");
        }
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
