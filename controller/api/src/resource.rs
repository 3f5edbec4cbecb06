//! Kubernetes-style documents as users write them (YAML), before validation.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// `apiVersion` of Weft's own kinds.
pub const API_VERSION: &str = "weft.dev/v1alpha1";

/// Object metadata (the subset Weft reads; other Kubernetes fields are accepted and ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A Kubernetes Namespace (`apiVersion: v1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

/// A workload: a Pod, or a VM / bare-metal process standing in for one
/// (`apiVersion: weft.dev/v1alpha1`, `kind: Workload`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub metadata: ObjectMeta,
    pub spec: WorkloadSpec,
}

/// `Workload.spec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Kubernetes service account; the workload's identity is
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Name of the node whose agent serves this workload.
    pub node: String,
    /// The workload's addresses (at most one IPv4 and one IPv6).
    pub ips: Vec<IpAddr>,
    /// Path of the workload's network namespace on its node (`/run/netns/NAME` or
    /// `/proc/PID/ns/net`).
    pub netns: String,
}

fn default_service_account() -> String {
    "default".to_string()
}

/// A Kubernetes Service (`apiVersion: v1`): virtual IPs and ports in front of the workloads its
/// selector matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
}

/// `Service.spec` (the fields Weft reads; other Kubernetes fields are accepted and ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Virtual IPs (one per family). `clusterIP` alone is accepted too.
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(default)]
    pub ports: Vec<ServicePortSpec>,
    /// Workloads in the Service's namespace whose labels include all of these are its endpoints.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// Port on the endpoints (default: `port`). Named target ports are not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// `TCP` (default); other protocols are not meshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// e.g. `http`, `kubernetes.io/h2c`, `grpc` (used by the waypoint later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// A Weft AuthorizationPolicy (`apiVersion: weft.dev/v1alpha1`). Same shape as the CRD in
/// Kubernetes mode (controller/src/crd.rs), so one validation serves both modes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub spec: PolicySpec,
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// Workloads of the policy's namespace it applies to; absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<PolicySelector>,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: String,
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
    #[serde(default)]
    pub dry_run: bool,
    /// Services (or the namespace's waypoint, `kind: Gateway`) the policy applies to, enforced
    /// by their waypoint; exclusive with `selector`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetRef>,
}

/// `spec.targetRefs[]`: `kind` is `Service` or `Gateway` (a waypoint), in the policy's
/// namespace; `group` is ignored (`""` or `gateway.networking.k8s.io`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// `spec.rules[].when[]`: `key` is `request.headers[<name>]`; the header must have one of
/// `values` (exact, or `prefix*` / `*suffix`, or `*` for present).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyCondition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// `spec.selector`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `spec.rules[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    #[serde(default)]
    pub from: Vec<PolicySource>,
    #[serde(default)]
    pub to: Vec<PolicyDestination>,
    /// L7 conditions on request headers (waypoint only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<PolicyCondition>,
}

/// `spec.rules[].from[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySource {
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
}

/// `spec.rules[].to[]`. `methods` and `paths` are L7: only a waypoint can enforce them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDestination {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
}

/// `apiVersion` of the Gateway API kinds Weft reads (HTTPRoute, GRPCRoute).
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// A Gateway API route attached to a Service (GAMMA): the waypoint bound to that Service
/// applies its rules. `Rule` is [`HttpRouteRule`] or [`GrpcRouteRule`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRoute<Rule> {
    pub metadata: ObjectMeta,
    pub spec: RouteSpec<Rule>,
}

/// `HTTPRoute.spec` / `GRPCRoute.spec` (the standard-channel fields the waypoint implements;
/// any other field is rejected so that nothing is silently ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec<Rule> {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default = "Vec::new")]
    pub rules: Vec<Rule>,
}

/// A Gateway API HTTPRoute.
pub type HttpRoute = GatewayRoute<HttpRouteRule>;

/// A Gateway API GRPCRoute.
pub type GrpcRoute = GatewayRoute<GrpcRouteRule>;

/// `spec.parentRefs[]`: for the mesh, a Service (`group: ""`, `kind: Service`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// `HTTPRoute.spec.rules[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<RouteBackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RouteRetry>,
}

/// `GRPCRoute.spec.rules[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<RouteBackendRef>,
}

/// `HTTPRoute.spec.rules[].matches[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    #[serde(default)]
    pub headers: Vec<NameMatch>,
    #[serde(default)]
    pub query_params: Vec<NameMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A header or query parameter condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NameMatch {
    /// `Exact` (default); `RegularExpression` is not implemented.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

/// `GRPCRoute.spec.rules[].matches[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<NameMatch>,
}

/// `GRPCRoute.spec.rules[].matches[].method`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (default); `RegularExpression` is not implemented.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// `rules[].filters[]`: the header modifiers, `URLRewrite` and `RequestRedirect` (HTTPRoute
/// only) are implemented; other types are read so that they can be refused by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewriteSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirectSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<serde_yaml::Value>,
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<NameValueSpec>,
    #[serde(default)]
    pub add: Vec<NameValueSpec>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `URLRewrite` (Gateway API `HTTPURLRewriteFilter`): what the request is forwarded with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewriteSpec {
    /// Replaces the `Host` header (a DNS name, no wildcard, no port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifierSpec>,
}

/// `RequestRedirect` (Gateway API `HTTPRequestRedirectFilter`): the parts of the `Location`
/// of the redirect answer; absent parts come from the request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirectSpec {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifierSpec>,
    /// 1-65535 (read wide so that a bad value is reported by validation, with its fix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// 301 or 302 (default 302).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i64>,
}

/// Gateway API `HTTPPathModifier`: `type` `ReplaceFullPath` with `replaceFullPath`, or
/// `ReplacePrefixMatch` with `replacePrefixMatch`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifierSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

/// A header name and value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NameValueSpec {
    pub name: String,
    pub value: String,
}

/// `rules[].backendRefs[]`: a Service port of the route's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteBackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
}

/// `HTTPRoute.spec.rules[].timeouts` (Gateway API durations, e.g. `10s`, `500ms`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTimeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

/// `HTTPRoute.spec.rules[].retry` (Gateway API, standard since v1.7; GEP-1731). Numbers are
/// kept wide here so that out-of-range values get a validation error naming the field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRetry {
    /// Response status codes (400-599) to retry on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<i64>,
    /// Retries after the first attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i64>,
    /// The least time between attempts (Gateway API duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// One parsed document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Namespace(Namespace),
    Workload(Workload),
    Service(Service),
    AuthorizationPolicy(AuthorizationPolicy),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
}

/// A document that could not be read, located precisely.
#[derive(Debug, thiserror::Error)]
#[error("{file}: document {document}{}: {message}", field.as_ref().map(|f| format!(", field `{f}`")).unwrap_or_default())]
pub struct ParseError {
    /// File name (or any label the caller passed).
    pub file: String,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    /// Dotted path of the offending field, when known.
    pub field: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// Parses every document of a multi-document YAML text. `file` only labels errors.
pub fn parse_documents(text: &str, file: &str) -> Result<Vec<Resource>, ParseError> {
    let mut out = Vec::new();
    for (document, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |field: Option<String>, message: String| ParseError {
            file: file.to_string(),
            document,
            field,
            message,
        };
        let value = serde_yaml::Value::deserialize(de).map_err(|e| err(None, e.to_string()))?;
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let tm: TypeMeta = serde_yaml::from_value(value.clone())
            .map_err(|e| err(None, format!("not a Kubernetes-style object: {e}")))?;
        let kind = tm.kind.ok_or_else(|| {
            err(
                Some("kind".into()),
                "missing `kind` (expected Namespace, Workload or Service)".into(),
            )
        })?;
        let typed = |expected_api: &str| -> Result<(), ParseError> {
            match tm.api_version.as_deref() {
                Some(v) if v == expected_api => Ok(()),
                Some(v) => Err(err(
                    Some("apiVersion".into()),
                    format!("`{v}` is not served for kind {kind}; use `{expected_api}`"),
                )),
                None => Err(err(
                    Some("apiVersion".into()),
                    format!("missing `apiVersion` (use `{expected_api}`)"),
                )),
            }
        };
        let res = match kind.as_str() {
            "Namespace" => {
                typed("v1")?;
                Resource::Namespace(from_value(value).map_err(|(f, m)| err(f, m))?)
            }
            "Workload" => {
                typed(API_VERSION)?;
                Resource::Workload(from_value(value).map_err(|(f, m)| err(f, m))?)
            }
            "Service" => {
                typed("v1")?;
                Resource::Service(from_value(value).map_err(|(f, m)| err(f, m))?)
            }
            "AuthorizationPolicy" => {
                typed(API_VERSION)?;
                Resource::AuthorizationPolicy(from_value(value).map_err(|(f, m)| err(f, m))?)
            }
            "HTTPRoute" => {
                typed(GATEWAY_API_VERSION)?;
                Resource::HttpRoute(from_value(value).map_err(|(f, m)| err(f, m))?)
            }
            "GRPCRoute" => {
                typed(GATEWAY_API_VERSION)?;
                Resource::GrpcRoute(from_value(value).map_err(|(f, m)| err(f, m))?)
            }
            other => {
                return Err(err(
                    Some("kind".into()),
                    format!(
                        "unsupported kind `{other}` (supported: Namespace, Workload, Service, AuthorizationPolicy, HTTPRoute, GRPCRoute)"
                    ),
                ));
            }
        };
        out.push(res);
    }
    Ok(out)
}

fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
) -> Result<T, (Option<String>, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        (field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {weft.dev/mesh: enabled}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop}
spec:
  serviceAccount: web
  node: n1
  ips: [198.18.1.11, "fd77:6566:1::b"]
  netns: /run/netns/x
---
"#;

    #[test]
    fn parses_namespaces_and_workloads() {
        let docs = parse_documents(GOOD, "a.yaml").expect("valid");
        assert_eq!(docs.len(), 2);
        let Resource::Workload(w) = &docs[1] else {
            panic!("expected a workload")
        };
        assert_eq!(w.spec.ips.len(), 2);
        assert_eq!(w.spec.service_account, "web");
    }

    #[test]
    fn a_bad_field_is_located_by_document_and_path() {
        let text = GOOD.replace("198.18.1.11", "not-an-ip");
        let e = parse_documents(&text, "a.yaml").expect_err("invalid ip");
        assert_eq!(e.document, 1);
        assert_eq!(e.field.as_deref(), Some("spec.ips[0]"));
        assert!(
            e.to_string()
                .starts_with("a.yaml: document 1, field `spec.ips[0]`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_spec_fields_and_kinds_are_rejected() {
        let text = GOOD.replace("node: n1", "node: n1\n  nodee: n2");
        let e = parse_documents(&text, "a.yaml").expect_err("typo");
        assert!(e.message.contains("nodee"), "{e}");
        let text = GOOD.replace("kind: Namespace", "kind: Nemaspace");
        let e = parse_documents(&text, "a.yaml").expect_err("kind");
        assert_eq!(e.document, 0);
        assert!(e.message.contains("Nemaspace"), "{e}");
    }

    #[test]
    fn wrong_api_version_says_which_to_use() {
        let text = GOOD.replace("weft.dev/v1alpha1", "v1");
        let e = parse_documents(&text, "a.yaml").expect_err("api");
        assert!(e.message.contains("weft.dev/v1alpha1"), "{e}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in ["{", "- a\n- b", "kind: [1", "\u{0}"] {
            let _ = parse_documents(text, "g.yaml");
        }
    }
}
