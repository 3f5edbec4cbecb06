//! The waypoint's configuration: listeners with HTTPRoute-style routes, and backends.
//!
//! The shape follows Gateway API `HTTPRoute` (matches, filters, backendRefs, timeouts), with
//! Weft extensions on each route (`retry`, `fault`, `rateLimit`) and on each backend
//! (`circuitBreaker`, `outlierDetection`, `loadBalancer`). [`Config::from_yaml`] parses and
//! validates; every validation error names the field path (`listeners[0].routes[2].matches[0]
//! .path.value`) and how to fix it.
//!
//! ```yaml
//! listeners:
//!   - name: reviews
//!     address: 0.0.0.0:15080
//!     routes:
//!       - name: v2-canary
//!         matches:
//!           - path: { type: PathPrefix, value: /api }
//!             headers: [{ name: x-canary, value: "true" }]
//!         backendRefs: [{ name: reviews-v2, weight: 1 }]
//!         timeouts: { request: 5s, backendRequest: 1s }
//!         retry: { attempts: 3, retryOn: [connect-failure, "503"] }
//! backends:
//!   - name: reviews-v2
//!     endpoints: ["10.0.0.7:8080", "10.0.0.8:8080"]
//! ```

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::duration::GatewayDuration;

/// The whole waypoint configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The sockets (or, in mesh mode, Service ports) the waypoint serves, each with its own
    /// route table.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// The backends routes send traffic to.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Largest request body buffered (so that retries can resend it); a larger body is
    /// forwarded as it arrives, without retries.
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: usize,
}

fn default_max_body() -> usize {
    4 * 1024 * 1024
}

/// One listening socket and its routes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, used in metrics.
    pub name: String,
    /// `ip:port` to listen on (a plain listener). Exactly one of `address` and
    /// `service` + `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Mesh mode: the Service (in the waypoint's namespace) whose traffic this listener's
    /// routes serve, as HBONE tunnels to `<service VIP>:<port>` arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Mesh mode: the Service port (with `service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The routes, in the order that breaks precedence ties.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One HTTPRoute rule with its hostnames and Weft extensions.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs; defaults to `<listener>/<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Hosts this route serves (exact, or `*.example.com`); empty means any host.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Any one of these must match; empty means `PathPrefix /`.
    #[serde(default)]
    pub matches: Vec<MatchConfig>,
    /// Applied in order before the request is forwarded.
    #[serde(default)]
    pub filters: Vec<FilterConfig>,
    /// Weighted backends; may be empty only when a `RequestRedirect` filter answers.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Request and per-attempt timeouts.
    #[serde(default)]
    pub timeouts: Option<TimeoutsConfig>,
    /// Weft extension: retries.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Weft extension: fault injection.
    #[serde(default)]
    pub fault: Option<FaultConfig>,
    /// Weft extension: local rate limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// One HTTPRouteMatch: every present condition must hold.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchConfig {
    /// Path condition; absent means `PathPrefix /`.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Exact header conditions (names are case-insensitive).
    #[serde(default)]
    pub headers: Vec<NameValue>,
    /// Exact query parameter conditions.
    #[serde(default)]
    pub query_params: Vec<NameValue>,
    /// HTTP method.
    #[serde(default)]
    pub method: Option<String>,
    /// gRPC method (Gateway API GRPCRoute `matches[].method`, named `grpc` here because
    /// `method` is the HTTP method): `/<service>/<method>`; exclusive with `path`.
    #[serde(default)]
    pub grpc: Option<GrpcMethodMatch>,
}

/// A gRPC method condition: the request path is `/<service>/<method>`. Either may be absent
/// (any service / any method), not both.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// Fully qualified service, e.g. `shop.Greeter`.
    #[serde(default)]
    pub service: Option<String>,
    /// Method name, e.g. `SayHello`.
    #[serde(default)]
    pub method: Option<String>,
}

impl GrpcMethodMatch {
    /// The equivalent path condition.
    pub fn to_path(&self) -> Option<PathMatch> {
        match (self.service.as_deref(), self.method.as_deref()) {
            (Some(s), Some(m)) => Some(PathMatch {
                kind: PathMatchType::Exact,
                value: format!("/{s}/{m}"),
            }),
            (Some(s), None) => Some(PathMatch {
                kind: PathMatchType::PathPrefix,
                value: format!("/{s}/"),
            }),
            (None, Some(m)) => Some(PathMatch {
                kind: PathMatchType::RegularExpression,
                value: format!("/[^/]+/{}", regex::escape(m)),
            }),
            (None, None) => None,
        }
    }
}

/// Whether `v` can be a gRPC service or method name (no `/`, no whitespace, not empty).
fn grpc_name_ok(v: &str) -> bool {
    !v.is_empty() && !v.contains('/') && !v.chars().any(char::is_whitespace)
}

/// A path condition.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// How `value` is compared.
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    /// The path, prefix or regular expression.
    pub value: String,
}

/// Path comparison, as in Gateway API.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub enum PathMatchType {
    /// The whole path equals the value.
    Exact,
    /// The path starts with the value, element-wise (`/foo` matches `/foo/bar`, not `/foobar`).
    #[default]
    PathPrefix,
    /// The whole path matches the regular expression.
    RegularExpression,
}

/// A name and a value (headers, query parameters).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NameValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A reference from a route to a backend, with its share of the traffic.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// Name of an entry of `backends`.
    pub name: String,
    /// Relative weight (Gateway API default 1); 0 sends no traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// An HTTPRoute filter.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "type")]
pub enum FilterConfig {
    /// Changes request headers before forwarding.
    RequestHeaderModifier {
        /// The changes.
        #[serde(rename = "requestHeaderModifier")]
        request_header_modifier: HeaderModifierConfig,
    },
    /// Changes response headers before answering.
    ResponseHeaderModifier {
        /// The changes.
        #[serde(rename = "responseHeaderModifier")]
        response_header_modifier: HeaderModifierConfig,
    },
    /// Rewrites the path and/or host before forwarding.
    #[serde(rename = "URLRewrite")]
    UrlRewrite {
        /// The rewrite.
        #[serde(rename = "urlRewrite")]
        url_rewrite: UrlRewriteConfig,
    },
    /// Answers with a redirect instead of forwarding.
    RequestRedirect {
        /// The redirect.
        #[serde(rename = "requestRedirect")]
        request_redirect: RedirectConfig,
    },
}

/// Header changes: `set` replaces, `add` appends, `remove` deletes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifierConfig {
    /// Headers set, replacing existing values.
    #[serde(default)]
    pub set: Vec<NameValue>,
    /// Headers appended to existing values.
    #[serde(default)]
    pub add: Vec<NameValue>,
    /// Header names removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A URL rewrite.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct UrlRewriteConfig {
    /// New `Host`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// How a rewrite or redirect changes the path.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "type")]
pub enum PathModifier {
    /// Replaces the whole path.
    ReplaceFullPath {
        /// The new path.
        #[serde(rename = "replaceFullPath")]
        replace_full_path: String,
    },
    /// Replaces the part matched by the route's `PathPrefix`.
    ReplacePrefixMatch {
        /// The new prefix.
        #[serde(rename = "replacePrefixMatch")]
        replace_prefix_match: String,
    },
}

/// A redirect answer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedirectConfig {
    /// `http` or `https`; default: unchanged.
    #[serde(default)]
    pub scheme: Option<String>,
    /// New host; default: the request's.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New port; default: none in the Location (80 for http and 443 for https are left out).
    #[serde(default)]
    pub port: Option<u16>,
    /// New path; default: the request's.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// 301 or 302 (default 302).
    #[serde(default = "default_redirect_status")]
    pub status_code: u16,
}

fn default_redirect_status() -> u16 {
    302
}

/// Gateway API timeouts.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Whole request, retries and delays included, until the response headers.
    #[serde(default)]
    pub request: Option<GatewayDuration>,
    /// Each attempt to a backend, until its response headers.
    #[serde(default)]
    pub backend_request: Option<GatewayDuration>,
}

/// Weft extension: retries.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts including the first (1 disables retries).
    pub attempts: u32,
    /// Exponential backoff between attempts, with full jitter.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Conditions that trigger a retry.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Cap on retries relative to requests.
    #[serde(default)]
    pub budget: RetryBudgetConfig,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::Status(503),
    ]
}

/// Exponential backoff: retry `n` waits `min` plus a random time in
/// `[0, min(max, base * 2^(n-1)) - min]`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffConfig {
    /// First backoff ceiling.
    pub base: GatewayDuration,
    /// Largest backoff ceiling.
    pub max: GatewayDuration,
    /// No retry waits less than this (HTTPRoute `retry.backoff`); 0 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<GatewayDuration>,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: GatewayDuration(std::time::Duration::from_millis(25)),
            max: GatewayDuration(std::time::Duration::from_millis(250)),
            min: None,
        }
    }
}

/// A retry condition. In YAML: a name (`connect-failure`, `5xx`, ...) or a response status
/// code 400-599 (`503`, quoted or not).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(try_from = "RawRetryOn", into = "String")]
pub enum RetryOn {
    /// The TCP connection to the endpoint failed.
    ConnectFailure,
    /// The connection broke before the response headers.
    Reset,
    /// The attempt ran past `timeouts.backendRequest` (also covered by `5xx`).
    AttemptTimeout,
    /// Any 5xx response.
    Status5xx,
    /// One response status (400-599): a backend's response with it, or a failure the waypoint
    /// answers with it (503 for no healthy endpoint or a full circuit, 504 for an attempt
    /// timeout).
    Status(u16),
    /// gRPC status CANCELLED (1).
    GrpcCancelled,
    /// gRPC status DEADLINE_EXCEEDED (4).
    GrpcDeadlineExceeded,
    /// gRPC status RESOURCE_EXHAUSTED (8).
    GrpcResourceExhausted,
    /// gRPC status INTERNAL (13).
    GrpcInternal,
    /// gRPC status UNAVAILABLE (14).
    GrpcUnavailable,
}

impl RetryOn {
    /// Whether this is a gRPC status condition (read from `grpc-status`).
    pub fn is_grpc(&self) -> bool {
        matches!(
            self,
            RetryOn::GrpcCancelled
                | RetryOn::GrpcDeadlineExceeded
                | RetryOn::GrpcResourceExhausted
                | RetryOn::GrpcInternal
                | RetryOn::GrpcUnavailable
        )
    }
}

/// A retry condition as written: a name or a status code.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawRetryOn {
    Code(u64),
    Name(String),
}

const RETRY_ON_NAMES: [(&str, RetryOn); 9] = [
    ("connect-failure", RetryOn::ConnectFailure),
    ("reset", RetryOn::Reset),
    ("attempt-timeout", RetryOn::AttemptTimeout),
    ("5xx", RetryOn::Status5xx),
    ("cancelled", RetryOn::GrpcCancelled),
    ("deadline-exceeded", RetryOn::GrpcDeadlineExceeded),
    ("resource-exhausted", RetryOn::GrpcResourceExhausted),
    ("internal", RetryOn::GrpcInternal),
    ("unavailable", RetryOn::GrpcUnavailable),
];

impl TryFrom<RawRetryOn> for RetryOn {
    type Error = String;

    fn try_from(raw: RawRetryOn) -> Result<Self, String> {
        let code = match raw {
            RawRetryOn::Code(code) => code,
            RawRetryOn::Name(name) => match RETRY_ON_NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, on)) => return Ok(*on),
                None => name.parse().map_err(|_| {
                    format!(
                        "`{name}` is not a retry condition; use connect-failure, reset, attempt-timeout, 5xx, a status code 400-599 (e.g. 503), or a gRPC status: cancelled, deadline-exceeded, resource-exhausted, internal, unavailable"
                    )
                })?,
            },
        };
        match u16::try_from(code) {
            Ok(code @ 400..=599) => Ok(RetryOn::Status(code)),
            _ => Err(format!(
                "retry status code {code} is out of range; retryable codes are 400-599"
            )),
        }
    }
}

impl From<RetryOn> for String {
    fn from(on: RetryOn) -> String {
        match on {
            RetryOn::Status(code) => code.to_string(),
            other => RETRY_ON_NAMES
                .iter()
                .find(|(_, on)| *on == other)
                .map_or_else(String::new, |(name, _)| (*name).to_string()),
        }
    }
}

/// Retry budget: over a sliding window, retries may not exceed `ratio` times the requests
/// plus `minRetriesPerSecond` times the window length in seconds.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries allowed per request (0.2 = one retry per five requests).
    pub ratio: f64,
    /// Retries always allowed per second, so that low traffic can still retry.
    #[serde(default = "default_min_retries")]
    pub min_retries_per_second: u32,
    /// Window length.
    #[serde(default = "default_budget_window")]
    pub window: GatewayDuration,
}

fn default_min_retries() -> u32 {
    1
}

fn default_budget_window() -> GatewayDuration {
    GatewayDuration(std::time::Duration::from_secs(10))
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            min_retries_per_second: default_min_retries(),
            window: default_budget_window(),
        }
    }
}

/// Weft extension: fault injection (delay first, then abort).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultConfig {
    /// Delay a share of requests.
    #[serde(default)]
    pub delay: Option<DelayFault>,
    /// Answer a share of requests with an error status without forwarding.
    #[serde(default)]
    pub abort: Option<AbortFault>,
}

/// A fixed delay on a percentage of requests.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelayFault {
    /// The delay.
    pub fixed_delay: GatewayDuration,
    /// Share of requests delayed, 0 to 100.
    pub percentage: f64,
}

/// An error answer on a percentage of requests: an HTTP status, or a gRPC status (exactly one).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortFault {
    /// HTTP status answered, 200 to 599.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// gRPC status answered, 1 (CANCELLED) to 16 (UNAUTHENTICATED): HTTP 200 with
    /// `grpc-status` and `grpc-message` and no message (a trailers-only gRPC response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// Share of requests aborted, 0 to 100.
    pub percentage: f64,
}

/// Weft extension: local token-bucket rate limits.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// One bucket shared by every request of the route.
    #[serde(default)]
    pub route: Option<TokenBucketConfig>,
    /// One bucket per source identity.
    #[serde(default)]
    pub per_source: Option<PerSourceLimit>,
}

/// A token bucket.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Burst size (bucket capacity, starts full).
    pub capacity: u32,
    /// Tokens added per second.
    pub refill_per_second: f64,
}

/// A token bucket per source.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerSourceLimit {
    /// Burst size per source.
    pub capacity: u32,
    /// Tokens added per second per source.
    pub refill_per_second: f64,
    /// Header carrying the source identity; without it (or when absent) the peer IP is the key.
    #[serde(default)]
    pub identity_header: Option<String>,
}

/// A backend: a set of endpoints behind one name.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name referenced by routes' `backendRefs`.
    pub name: String,
    /// `ip:port` endpoints, reached in plain TCP. Exactly one of `endpoints` and
    /// `service` + `port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Mesh mode: a Service in the waypoint's namespace whose ready endpoints (from the mesh
    /// view, followed live) this backend balances over, reached through HBONE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Mesh mode: the Service port (with `service`); requests go to its `targetPort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: BackendProtocol,
    /// Concurrency limits.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionConfig>,
    /// Endpoint choice.
    #[serde(default)]
    pub load_balancer: LoadBalancerConfig,
}

/// Protocol spoken to a backend's endpoints.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// Per-backend limits: above `maxConcurrentRequests` requests queue, above
/// `maxPendingRequests` queued ones they are answered 503 at once; at most `maxConnections`
/// connections are open (a request needing another waits up to 3 s for one to free).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Requests in flight to the backend (default 1024).
    #[serde(default = "default_circuit_limit")]
    pub max_concurrent_requests: usize,
    /// Requests waiting for a slot (default 1024).
    #[serde(default = "default_circuit_limit")]
    pub max_pending_requests: usize,
    /// Connections open to the backend's endpoints together; unbounded when absent.
    #[serde(default)]
    pub max_connections: Option<usize>,
}

/// Outlier detection: per-endpoint circuit (closed -> open -> half-open -> closed).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    /// Consecutive 5xx (or resets) that eject an endpoint; 0 disables.
    #[serde(default = "default_consecutive_5xx", rename = "consecutive5xx")]
    pub consecutive_5xx: u32,
    /// Consecutive connect failures that eject an endpoint; 0 disables.
    #[serde(default = "default_consecutive_connect")]
    pub consecutive_connect_failures: u32,
    /// First ejection length; the n-th consecutive ejection lasts n times as long.
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time: GatewayDuration,
    /// Longest ejection.
    #[serde(default = "default_max_ejection")]
    pub max_ejection_time: GatewayDuration,
    /// Largest share of the backend's endpoints ejected at once (default 10); at least one
    /// endpoint may always be ejected.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// Below this percentage of endpoints in service, balance over all of them, ejected or
    /// not (default 50, as Envoy; 0 disables, then a fully ejected backend answers 503).
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u32,
}

fn default_circuit_limit() -> usize {
    1024
}

fn default_consecutive_5xx() -> u32 {
    5
}
fn default_consecutive_connect() -> u32 {
    3
}
fn default_panic_threshold() -> u32 {
    50
}
fn default_max_ejection_percent() -> u32 {
    10
}
fn default_base_ejection() -> GatewayDuration {
    GatewayDuration(std::time::Duration::from_secs(30))
}
fn default_max_ejection() -> GatewayDuration {
    GatewayDuration(std::time::Duration::from_secs(300))
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        OutlierDetectionConfig {
            consecutive_5xx: default_consecutive_5xx(),
            consecutive_connect_failures: default_consecutive_connect(),
            base_ejection_time: default_base_ejection(),
            max_ejection_time: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
            panic_threshold: default_panic_threshold(),
        }
    }
}

/// Endpoint choice: power of two choices over a peak-sensitive EWMA of latency.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerConfig {
    /// Decay time of the latency average.
    #[serde(default = "default_decay")]
    pub decay: GatewayDuration,
    /// Latency assumed for an endpoint never measured.
    #[serde(default = "default_initial_latency")]
    pub initial_latency: GatewayDuration,
}

fn default_decay() -> GatewayDuration {
    GatewayDuration(std::time::Duration::from_secs(10))
}
fn default_initial_latency() -> GatewayDuration {
    GatewayDuration(std::time::Duration::from_millis(1))
}

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        LoadBalancerConfig {
            decay: default_decay(),
            initial_latency: default_initial_latency(),
        }
    }
}

/// One validation problem, with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// E.g. `listeners[0].routes[2].matches[0].path.value`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The YAML does not parse or does not have the expected shape.
    #[error(
        "the waypoint config is not valid YAML of the expected shape: {0}; fix the field named at that line and column"
    )]
    Parse(#[from] serde_yaml::Error),
    /// The config parses but is inconsistent.
    #[error("the waypoint config has {} problem(s):\n{}", .0.len(), render(.0))]
    Invalid(Vec<FieldError>),
    /// The config file could not be read.
    #[error(
        "could not read the waypoint config file {path}: {source}; check the path and its permissions"
    )]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn render(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How the waypoint runs, which decides the fields a config may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Plain TCP on both sides (no `--controller`): listeners take an `address`, backends
    /// `endpoints`.
    #[default]
    Standalone,
    /// In the mesh (`--controller`): listeners may also attach to a `service` + `port`
    /// (HBONE), backends may name a `service` + `port`.
    Mesh,
}

impl Config {
    /// Parses and validates a YAML config (standalone mode).
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_for(text, Mode::Standalone)
    }

    /// Parses and validates a YAML config for `mode`.
    pub fn from_yaml_for(text: &str, mode: Mode) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml::from_str(text)?;
        config.validate_for(mode)?;
        Ok(config)
    }

    /// Reads, parses and validates a YAML config file (standalone mode).
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        Config::from_file_for(path, Mode::Standalone)
    }

    /// Reads, parses and validates a YAML config file for `mode`.
    pub fn from_file_for(path: &std::path::Path, mode: Mode) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml_for(&text, mode)
    }

    /// Checks everything serde cannot (standalone mode).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_for(Mode::Standalone)
    }

    /// Checks everything serde cannot: references, ranges, syntax of paths, regexes, headers,
    /// and that mesh-only fields are used in mesh mode only.
    pub fn validate_for(&self, mode: Mode) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err = |path: String, message: String| errors.push(FieldError { path, message });

        let mut backend_names = HashSet::new();
        for (b, backend) in self.backends.iter().enumerate() {
            let at = format!("backends[{b}]");
            if backend.name.is_empty() {
                err(
                    format!("{at}.name"),
                    "is empty; give the backend a name routes can reference".into(),
                );
            } else if !backend_names.insert(backend.name.as_str()) {
                err(
                    format!("{at}.name"),
                    format!(
                        "`{}` is used by another backend; backend names must be unique",
                        backend.name
                    ),
                );
            }
            let mesh_backend = backend.service.is_some() || backend.port.is_some();
            if mesh_backend {
                if mode != Mode::Mesh {
                    err(
                        format!("{at}.service"),
                        "Service backends need mesh mode: run the waypoint with --controller (standalone backends list `endpoints`)".into(),
                    );
                }
                if !backend.endpoints.is_empty() {
                    err(
                        format!("{at}.endpoints"),
                        "cannot be combined with `service`; give either `endpoints` or `service` and `port`".into(),
                    );
                }
                match &backend.service {
                    None => err(
                        format!("{at}.service"),
                        "is missing: `port` needs the Service it belongs to".into(),
                    ),
                    Some(name) if !is_dns_label(name) => err(
                        format!("{at}.service"),
                        format!(
                            "`{name}` is not a Service name (a DNS label in the waypoint's namespace, such as `reviews`)"
                        ),
                    ),
                    Some(_) => {}
                }
                if matches!(backend.port, None | Some(0)) {
                    err(
                        format!("{at}.port"),
                        "is missing or 0: name the Service port (1-65535) requests go to".into(),
                    );
                }
            } else if backend.endpoints.is_empty() {
                err(
                    format!("{at}.endpoints"),
                    "is empty; list at least one `ip:port` endpoint".into(),
                );
            }
            for (e, endpoint) in backend.endpoints.iter().enumerate() {
                if endpoint.parse::<SocketAddr>().is_err() {
                    err(
                        format!("{at}.endpoints[{e}]"),
                        format!(
                            "`{endpoint}` is not an `ip:port` address; write e.g. `10.0.0.7:8080` (names are not resolved)"
                        ),
                    );
                }
            }
            if let Some(cb) = &backend.circuit_breaker {
                if cb.max_concurrent_requests == 0 {
                    err(format!("{at}.circuitBreaker.maxConcurrentRequests"), "is 0, which would reject every request; set at least 1 or remove circuitBreaker".into());
                }
                if cb.max_connections == Some(0) {
                    err(
                        format!("{at}.circuitBreaker.maxConnections"),
                        "is 0, which would fail every request; set at least 1 or remove it".into(),
                    );
                }
            }
            if let Some(od) = &backend.outlier_detection {
                if od.base_ejection_time.0.is_zero() {
                    err(
                        format!("{at}.outlierDetection.baseEjectionTime"),
                        "is 0; set a positive duration such as 30s".into(),
                    );
                }
                if od.panic_threshold > 100 {
                    err(
                        format!("{at}.outlierDetection.panicThreshold"),
                        format!("{} is above 100; use 0 to 100", od.panic_threshold),
                    );
                }
                if od.max_ejection_percent > 100 {
                    err(
                        format!("{at}.outlierDetection.maxEjectionPercent"),
                        format!("{} is above 100; use 0 to 100", od.max_ejection_percent),
                    );
                }
                if od.max_ejection_time < od.base_ejection_time {
                    err(
                        format!("{at}.outlierDetection.maxEjectionTime"),
                        "is shorter than baseEjectionTime; make it at least as long".into(),
                    );
                }
            }
            if backend.load_balancer.decay.0.is_zero() {
                err(
                    format!("{at}.loadBalancer.decay"),
                    "is 0; set a positive duration such as 10s".into(),
                );
            }
        }

        let mut listener_names = HashSet::new();
        let mut addresses = HashSet::new();
        let mut attachments = HashSet::new();
        // In mesh mode a waypoint without listeners still forwards every Service bound to it
        // (the implicit default route).
        if self.listeners.is_empty() && mode == Mode::Standalone {
            err(
                "listeners".into(),
                "is empty; declare at least one listener with a name, an address and routes".into(),
            );
        }
        for (l, listener) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{l}]");
            if !listener_names.insert(listener.name.as_str()) {
                err(
                    format!("{at}.name"),
                    format!(
                        "`{}` is used by another listener; listener names must be unique",
                        listener.name
                    ),
                );
            }
            let attached = listener.service.is_some() || listener.port.is_some();
            match (&listener.address, attached) {
                (Some(_), true) => err(
                    format!("{at}.address"),
                    "cannot be combined with `service` and `port`; a listener either listens on an address or attaches to a Service".into(),
                ),
                (None, false) => err(
                    format!("{at}.address"),
                    match mode {
                        Mode::Standalone => "is missing; give the `ip:port` to listen on".into(),
                        Mode::Mesh => "is missing; give the `ip:port` to listen on, or attach the listener to a `service` and `port`".into(),
                    },
                ),
                (Some(address), false) => match address.parse::<SocketAddr>() {
                    Ok(addr) => {
                        if mode == Mode::Mesh && !addr.ip().is_loopback() {
                            err(
                                format!("{at}.address"),
                                format!(
                                    "`{addr}` would take plaintext from other nodes, without identities or AuthorizationPolicies, beside the mesh's mTLS; in mesh mode attach the listener to a `service` and `port` (its traffic then arrives through HBONE), or listen on a loopback address (e.g. 127.0.0.1:{}) for local use",
                                    addr.port()
                                ),
                            );
                        }
                        if !addresses.insert(addr) {
                            err(
                                format!("{at}.address"),
                                format!(
                                    "{addr} is used by another listener; give each listener its own port"
                                ),
                            );
                        }
                    }
                    Err(_) => err(
                        format!("{at}.address"),
                        format!(
                            "`{address}` is not an `ip:port` address; write e.g. `0.0.0.0:15080`"
                        ),
                    ),
                },
                (None, true) => {
                    if mode != Mode::Mesh {
                        err(
                            format!("{at}.service"),
                            "listeners attached to a Service need mesh mode: run the waypoint with --controller (standalone listeners take an `address`)".into(),
                        );
                    }
                    match &listener.service {
                        None => err(
                            format!("{at}.service"),
                            "is missing: `port` needs the Service it belongs to".into(),
                        ),
                        Some(name) if !is_dns_label(name) => err(
                            format!("{at}.service"),
                            format!("`{name}` is not a Service name (a DNS label in the waypoint's namespace, such as `reviews`)"),
                        ),
                        Some(_) => {}
                    }
                    match (listener.port, &listener.service) {
                        (None | Some(0), _) => err(
                            format!("{at}.port"),
                            "is missing or 0: name the Service port (1-65535) whose traffic the listener serves".into(),
                        ),
                        (Some(port), Some(service)) => {
                            if !attachments.insert((service.as_str(), port)) {
                                err(
                                    format!("{at}.port"),
                                    format!("Service `{service}` port {port} already has a listener; merge their routes"),
                                );
                            }
                        }
                        (Some(_), None) => {}
                    }
                }
            }
            let mut route_names = HashSet::new();
            for (r, route) in listener.routes.iter().enumerate() {
                if let Some(name) = &route.name
                    && !route_names.insert(name.as_str())
                {
                    err(
                        format!("{at}.routes[{r}].name"),
                        format!(
                            "`{name}` is used by another route of this listener; route names must be unique (they label metrics)"
                        ),
                    );
                }
                validate_route(
                    &format!("{at}.routes[{r}]"),
                    route,
                    &backend_names,
                    &mut err,
                );
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// Whether `name` can name a Service: a DNS-1123 label.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn validate_route(
    at: &str,
    route: &RouteConfig,
    backends: &HashSet<&str>,
    err: &mut impl FnMut(String, String),
) {
    for (h, host) in route.hostnames.iter().enumerate() {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if bare.is_empty() || bare.contains(['*', ':', '/']) {
            err(
                format!("{at}.hostnames[{h}]"),
                format!(
                    "`{host}` is not a hostname; write `example.com` or `*.example.com` (no port)"
                ),
            );
        }
    }
    for (m, matching) in route.matches.iter().enumerate() {
        let at = format!("{at}.matches[{m}]");
        if let Some(grpc) = &matching.grpc {
            if matching.path.is_some() {
                err(
                    format!("{at}.grpc"),
                    "is set together with `path`; a gRPC method match is a path match, use one of them".into(),
                );
            }
            if grpc.service.is_none() && grpc.method.is_none() {
                err(
                    format!("{at}.grpc"),
                    "names neither `service` nor `method`; set at least one (or drop the match)"
                        .into(),
                );
            }
            for (field, v) in [("service", &grpc.service), ("method", &grpc.method)] {
                if let Some(v) = v
                    && !grpc_name_ok(v)
                {
                    err(
                        format!("{at}.grpc.{field}"),
                        format!(
                            "`{v}` is not a gRPC {field} name; write it without `/` or spaces, e.g. `shop.Greeter` / `SayHello`"
                        ),
                    );
                }
            }
        }
        if let Some(path) = &matching.path {
            match path.kind {
                PathMatchType::Exact | PathMatchType::PathPrefix => {
                    if !path.value.starts_with('/') {
                        err(
                            format!("{at}.path.value"),
                            format!(
                                "`{}` does not start with `/`; paths are absolute",
                                path.value
                            ),
                        );
                    }
                }
                PathMatchType::RegularExpression => {
                    if let Err(e) = regex::Regex::new(&path.value) {
                        err(
                            format!("{at}.path.value"),
                            format!("is not a valid regular expression ({e}); fix the syntax"),
                        );
                    }
                }
            }
        }
        for (h, header) in matching.headers.iter().enumerate() {
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                err(
                    format!("{at}.headers[{h}].name"),
                    format!(
                        "`{}` is not a valid header name; use letters, digits and `-`",
                        header.name
                    ),
                );
            }
            if http::HeaderValue::from_str(&header.value).is_err() {
                err(
                    format!("{at}.headers[{h}].value"),
                    "is not a valid header value; remove control characters".into(),
                );
            }
        }
        for (q, param) in matching.query_params.iter().enumerate() {
            if param.name.is_empty() {
                err(
                    format!("{at}.queryParams[{q}].name"),
                    "is empty; name the query parameter".into(),
                );
            }
        }
        if let Some(method) = &matching.method
            && http::Method::from_bytes(method.as_bytes()).is_err()
        {
            err(
                format!("{at}.method"),
                format!("`{method}` is not an HTTP method; write e.g. GET or POST"),
            );
        }
    }
    let mut redirects = false;
    for (f, filter) in route.filters.iter().enumerate() {
        let at = format!("{at}.filters[{f}]");
        match filter {
            FilterConfig::RequestHeaderModifier {
                request_header_modifier: m,
            } => validate_headers(&format!("{at}.requestHeaderModifier"), m, err),
            FilterConfig::ResponseHeaderModifier {
                response_header_modifier: m,
            } => validate_headers(&format!("{at}.responseHeaderModifier"), m, err),
            FilterConfig::UrlRewrite { url_rewrite } => validate_path_modifier(
                &format!("{at}.urlRewrite.path"),
                url_rewrite.path.as_ref(),
                route,
                err,
            ),
            FilterConfig::RequestRedirect { request_redirect } => {
                redirects = true;
                if !matches!(request_redirect.status_code, 301 | 302) {
                    err(
                        format!("{at}.requestRedirect.statusCode"),
                        format!(
                            "{} is not allowed; use 301 or 302",
                            request_redirect.status_code
                        ),
                    );
                }
                if let Some(scheme) = &request_redirect.scheme
                    && scheme != "http"
                    && scheme != "https"
                {
                    err(
                        format!("{at}.requestRedirect.scheme"),
                        format!("`{scheme}` is not allowed; use http or https"),
                    );
                }
                validate_path_modifier(
                    &format!("{at}.requestRedirect.path"),
                    request_redirect.path.as_ref(),
                    route,
                    err,
                )
            }
        }
    }
    if redirects && !route.backend_refs.is_empty() {
        err(format!("{at}.backendRefs"), "must be empty on a route with a RequestRedirect filter (the redirect answers); remove one of them".into());
    }
    if !redirects && route.backend_refs.is_empty() {
        err(
            format!("{at}.backendRefs"),
            "is empty; reference at least one backend (or add a RequestRedirect filter)".into(),
        );
    }
    for (b, backend_ref) in route.backend_refs.iter().enumerate() {
        if !backends.contains(backend_ref.name.as_str()) {
            err(
                format!("{at}.backendRefs[{b}].name"),
                format!(
                    "backend `{}` is not declared; add it to `backends` or fix the name",
                    backend_ref.name
                ),
            );
        }
    }
    if !route.backend_refs.is_empty() && route.backend_refs.iter().all(|b| b.weight == 0) {
        err(
            format!("{at}.backendRefs"),
            "all weights are 0, so no traffic can be sent; give one backend a positive weight"
                .into(),
        );
    }
    if let Some(timeouts) = &route.timeouts {
        if timeouts.request.is_some_and(|d| d.0.is_zero()) {
            err(
                format!("{at}.timeouts.request"),
                "is 0; set a positive duration or remove it".into(),
            );
        }
        if timeouts.backend_request.is_some_and(|d| d.0.is_zero()) {
            err(
                format!("{at}.timeouts.backendRequest"),
                "is 0; set a positive duration or remove it".into(),
            );
        }
        if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request)
            && backend > request
        {
            err(
                format!("{at}.timeouts.backendRequest"),
                "is longer than timeouts.request; make it at most as long".into(),
            );
        }
    }
    if let Some(retry) = &route.retry {
        if !(1..=10).contains(&retry.attempts) {
            err(
                format!("{at}.retry.attempts"),
                format!(
                    "{} is out of range; use 1 to 10 (attempts include the first one)",
                    retry.attempts
                ),
            );
        }
        if retry.backoff.base > retry.backoff.max {
            err(
                format!("{at}.retry.backoff.base"),
                "is longer than backoff.max; make base at most max".into(),
            );
        }
        if retry.retry_on.is_empty() {
            err(
                format!("{at}.retry.retryOn"),
                "is empty, so nothing is retried; list conditions or remove retry".into(),
            );
        }
        if !(retry.budget.ratio > 0.0 && retry.budget.ratio <= 1.0) {
            err(
                format!("{at}.retry.budget.ratio"),
                format!(
                    "{} is out of range; use a ratio in (0, 1], e.g. 0.2",
                    retry.budget.ratio
                ),
            );
        }
        if retry.budget.window.0 < std::time::Duration::from_secs(1) {
            err(
                format!("{at}.retry.budget.window"),
                "is shorter than 1s; use e.g. 10s".into(),
            );
        }
    }
    if let Some(fault) = &route.fault {
        if let Some(delay) = &fault.delay
            && !(0.0..=100.0).contains(&delay.percentage)
        {
            err(
                format!("{at}.fault.delay.percentage"),
                format!("{} is out of range; use 0 to 100", delay.percentage),
            );
        }
        if let Some(abort) = &fault.abort {
            if !(0.0..=100.0).contains(&abort.percentage) {
                err(
                    format!("{at}.fault.abort.percentage"),
                    format!("{} is out of range; use 0 to 100", abort.percentage),
                );
            }
            match (abort.http_status, abort.grpc_status) {
                (Some(status), None) if !(200..=599).contains(&status) => err(
                    format!("{at}.fault.abort.httpStatus"),
                    format!("{status} is not a status code; use 200 to 599"),
                ),
                (None, Some(status)) if !(1..=16).contains(&status) => err(
                    format!("{at}.fault.abort.grpcStatus"),
                    format!(
                        "{status} is not a gRPC error status; use 1 (CANCELLED) to 16 (UNAUTHENTICATED), e.g. 14 for UNAVAILABLE (0 is OK)"
                    ),
                ),
                (None, None) => err(
                    format!("{at}.fault.abort"),
                    "answers nothing; set httpStatus (e.g. 503) or grpcStatus (e.g. 14)".into(),
                ),
                (Some(_), Some(_)) => err(
                    format!("{at}.fault.abort"),
                    "has both httpStatus and grpcStatus; set one (grpcStatus for gRPC routes)"
                        .into(),
                ),
                _ => {}
            }
        }
    }
    if let Some(limit) = &route.rate_limit {
        if let Some(bucket) = &limit.route {
            validate_bucket(
                &format!("{at}.rateLimit.route"),
                bucket.capacity,
                bucket.refill_per_second,
                err,
            );
        }
        if let Some(per_source) = &limit.per_source {
            validate_bucket(
                &format!("{at}.rateLimit.perSource"),
                per_source.capacity,
                per_source.refill_per_second,
                err,
            );
            if let Some(header) = &per_source.identity_header
                && http::HeaderName::from_bytes(header.as_bytes()).is_err()
            {
                err(
                    format!("{at}.rateLimit.perSource.identityHeader"),
                    format!("`{header}` is not a valid header name"),
                );
            }
        }
    }
}

fn validate_bucket(at: &str, capacity: u32, refill: f64, err: &mut impl FnMut(String, String)) {
    if capacity == 0 {
        err(
            format!("{at}.capacity"),
            "is 0, which rejects every request; set at least 1".into(),
        );
    }
    if !(refill > 0.0 && refill.is_finite()) {
        err(
            format!("{at}.refillPerSecond"),
            format!("{refill} is not a positive number; set e.g. 10"),
        );
    }
}

fn validate_headers(
    at: &str,
    modifier: &HeaderModifierConfig,
    err: &mut impl FnMut(String, String),
) {
    for (kind, list) in [("set", &modifier.set), ("add", &modifier.add)] {
        for (i, header) in list.iter().enumerate() {
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                err(
                    format!("{at}.{kind}[{i}].name"),
                    format!(
                        "`{}` is not a valid header name; use letters, digits and `-`",
                        header.name
                    ),
                );
            }
            if http::HeaderValue::from_str(&header.value).is_err() {
                err(
                    format!("{at}.{kind}[{i}].value"),
                    "is not a valid header value; remove control characters".into(),
                );
            }
        }
    }
    for (i, name) in modifier.remove.iter().enumerate() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            err(
                format!("{at}.remove[{i}]"),
                format!("`{name}` is not a valid header name"),
            );
        }
    }
}

fn validate_path_modifier(
    at: &str,
    modifier: Option<&PathModifier>,
    route: &RouteConfig,
    err: &mut impl FnMut(String, String),
) {
    match modifier {
        Some(PathModifier::ReplaceFullPath {
            replace_full_path: path,
        }) if !path.starts_with('/') => {
            err(
                format!("{at}.replaceFullPath"),
                format!("`{path}` does not start with `/`"),
            );
        }
        Some(PathModifier::ReplacePrefixMatch {
            replace_prefix_match: path,
        }) => {
            if !path.starts_with('/') {
                err(
                    format!("{at}.replacePrefixMatch"),
                    format!("`{path}` does not start with `/`"),
                );
            }
            let all_prefix = !route.matches.is_empty()
                && route.matches.iter().all(|m| {
                    m.path
                        .as_ref()
                        .is_some_and(|p| p.kind == PathMatchType::PathPrefix)
                });
            if !all_prefix {
                err(format!("{at}.replacePrefixMatch"), "needs every match of the route to have a PathPrefix path; use ReplaceFullPath or add PathPrefix matches".into());
            }
        }
        Some(PathModifier::ReplaceFullPath { .. }) | None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:15080
    routes:
      - name: api
        hostnames: [reviews.default.svc]
        matches:
          - path: { type: PathPrefix, value: /api }
            headers: [{ name: x-canary, value: "true" }]
            queryParams: [{ name: debug, value: "1" }]
            method: GET
        filters:
          - type: RequestHeaderModifier
            requestHeaderModifier: { set: [{ name: x-a, value: b }], remove: [x-drop] }
          - type: URLRewrite
            urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /v2 } }
        backendRefs: [{ name: v1, weight: 90 }, { name: v2, weight: 10 }]
        timeouts: { request: 5s, backendRequest: 1s }
        retry:
          attempts: 3
          backoff: { base: 10ms, max: 100ms }
          retryOn: [connect-failure, reset, "503", unavailable]
          budget: { ratio: 0.25 }
        fault:
          delay: { fixedDelay: 100ms, percentage: 1 }
          abort: { httpStatus: 503, percentage: 0.5 }
        rateLimit:
          route: { capacity: 100, refillPerSecond: 50 }
          perSource: { capacity: 10, refillPerSecond: 5, identityHeader: x-weft-identity }
      - matches: [{ path: { type: Exact, value: /old } }]
        filters:
          - type: RequestRedirect
            requestRedirect: { path: { type: ReplaceFullPath, replaceFullPath: /new }, statusCode: 301 }
backends:
  - name: v1
    endpoints: ["10.0.0.1:8080", "10.0.0.2:8080"]
    circuitBreaker: { maxConcurrentRequests: 100, maxPendingRequests: 10 }
    outlierDetection: { consecutive5xx: 5, baseEjectionTime: 30s }
  - name: v2
    endpoints: ["10.0.0.3:8080"]
    protocol: http2
"#;

    #[test]
    fn shipped_example_is_valid() {
        let config = Config::from_yaml(include_str!("../waypoint.example.yaml"))
            .expect("the example config is valid");
        assert_eq!(config.listeners[0].routes.len(), 4);
    }

    #[test]
    fn duplicate_route_names_are_rejected() {
        let bad = GOOD.replace(
            "      - matches: [{ path: { type: Exact, value: /old } }]",
            "      - name: api\n        matches: [{ path: { type: Exact, value: /old } }]",
        );
        let errors = problems(&bad);
        assert!(
            errors
                .iter()
                .any(|e| e.path == "listeners[0].routes[1].name" && e.message.contains("unique")),
            "{errors:?}"
        );
    }

    #[test]
    fn full_example_parses_and_validates() {
        let config = Config::from_yaml(GOOD).expect("valid");
        let route = &config.listeners[0].routes[0];
        assert_eq!(route.backend_refs[1].weight, 10);
        assert_eq!(route.retry.as_ref().map(|r| r.attempts), Some(3));
        assert_eq!(config.backends[1].protocol, BackendProtocol::Http2);
        assert!(matches!(route.filters[1], FilterConfig::UrlRewrite { .. }));
        assert_eq!(config.max_request_body_bytes, 4 * 1024 * 1024);
    }

    fn problems(yaml: &str) -> Vec<FieldError> {
        match Config::from_yaml(yaml) {
            Err(ConfigError::Invalid(errors)) => errors,
            other => panic!("expected validation errors, got {other:?}"),
        }
    }

    #[test]
    fn grpc_matches_are_checked() {
        // (The fixture's ReplacePrefixMatch rewrite needs PathPrefix matches: drop it.)
        let ok = GOOD
            .replace(
                "path: { type: PathPrefix, value: /api }",
                "grpc: { service: shop.Greeter, method: SayHello }",
            )
            .replace(
                "type: ReplacePrefixMatch, replacePrefixMatch: /v2",
                "type: ReplaceFullPath, replaceFullPath: /v2",
            );
        assert_ne!(ok, GOOD, "the fixture changed: update this test");
        Config::from_yaml(&ok).expect("a gRPC method match is valid");
        let errors = problems(&GOOD.replace(
            "path: { type: PathPrefix, value: /api }",
            "grpc: { service: shop/Greeter }\n            path: { type: PathPrefix, value: /api }",
        ));
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"listeners[0].routes[0].matches[0].grpc"),
            "{errors:?}"
        );
        assert!(
            paths.contains(&"listeners[0].routes[0].matches[0].grpc.service"),
            "{errors:?}"
        );
        let errors = problems(&GOOD.replace("path: { type: PathPrefix, value: /api }", "grpc: {}"));
        assert!(errors[0].message.contains("neither"), "{errors:?}");
    }

    #[test]
    fn errors_name_the_field_path() {
        let bad = GOOD
            .replace("value: /api", "value: api")
            .replace("{ name: v2, weight: 10 }", "{ name: v3, weight: 10 }")
            .replace("\"10.0.0.3:8080\"", "\"backend:80\"")
            .replace("attempts: 3", "attempts: 0")
            .replace("percentage: 0.5", "percentage: 150");
        let errors = problems(&bad);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "backends[1].endpoints[0]",
            "listeners[0].routes[0].matches[0].path.value",
            "listeners[0].routes[0].backendRefs[1].name",
            "listeners[0].routes[0].retry.attempts",
            "listeners[0].routes[0].fault.abort.percentage",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
        let text = ConfigError::Invalid(errors).to_string();
        assert!(text.contains("backend `v3` is not declared"), "{text}");
    }

    #[test]
    fn an_abort_answers_one_http_or_grpc_status() {
        let grpc = GOOD.replace("httpStatus: 503", "grpcStatus: 14");
        let config = Config::from_yaml(&grpc).expect("a gRPC abort is valid");
        let abort = config.listeners[0].routes[0]
            .fault
            .as_ref()
            .and_then(|f| f.abort)
            .expect("abort");
        assert_eq!((abort.http_status, abort.grpc_status), (None, Some(14)));
        for (replacement, field, says) in [
            ("grpcStatus: 0", "fault.abort.grpcStatus", "0 is OK"),
            (
                "grpcStatus: 17",
                "fault.abort.grpcStatus",
                "use 1 (CANCELLED) to 16",
            ),
            ("httpStatus: 99", "fault.abort.httpStatus", "use 200 to 599"),
            ("httpStatus: 503, grpcStatus: 14", "fault.abort", "set one"),
            ("", "fault.abort", "set httpStatus (e.g. 503) or grpcStatus"),
        ] {
            let bad = GOOD.replace(
                "httpStatus: 503, ",
                &format!(
                    "{replacement}{}",
                    if replacement.is_empty() { "" } else { ", " }
                ),
            );
            let errors = problems(&bad);
            assert!(
                errors
                    .iter()
                    .any(|e| e.path == format!("listeners[0].routes[0].{field}")
                        && e.message.contains(says)),
                "{replacement}: {errors:?}"
            );
        }
    }

    #[test]
    fn prefix_rewrite_needs_prefix_matches() {
        let bad = GOOD.replace("type: PathPrefix, value: /api", "type: Exact, value: /api");
        let errors = problems(&bad);
        assert!(
            errors.iter().any(|e| e
                .path
                .ends_with("filters[1].urlRewrite.path.replacePrefixMatch")),
            "{errors:?}"
        );
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_parse_errors() {
        let err = Config::from_yaml(&GOOD.replace("backendRequest: 1s", "backendRequest: 1sec"))
            .expect_err("bad");
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err =
            Config::from_yaml(&GOOD.replace("attempts: 3", "attempts: 3\n          tries: 3"))
                .expect_err("bad");
        assert!(err.to_string().contains("tries"), "{err}");
    }

    #[test]
    fn redirect_and_backends_are_exclusive() {
        let bad = GOOD.replace(
            "statusCode: 301 }",
            "statusCode: 301 }\n        backendRefs: [{ name: v1 }]",
        );
        let errors = problems(&bad);
        assert!(
            errors
                .iter()
                .any(|e| e.path == "listeners[0].routes[1].backendRefs"),
            "{errors:?}"
        );
    }

    const MESH: &str = r#"
listeners:
  - name: frontend
    service: frontend
    port: 80
    routes:
      - matches: [{ path: { type: PathPrefix, value: /reviews } }]
        backendRefs: [{ name: reviews }]
  - name: admin
    address: 127.0.0.1:15081
    routes:
      - backendRefs: [{ name: static }]
backends:
  - name: reviews
    service: reviews
    port: 9080
    protocol: http2
  - name: static
    endpoints: ["10.0.0.1:8080"]
"#;

    fn problems_for(yaml: &str, mode: Mode) -> Vec<FieldError> {
        match Config::from_yaml_for(yaml, mode) {
            Err(ConfigError::Invalid(errors)) => errors,
            other => panic!("expected validation errors, got {other:?}"),
        }
    }

    #[test]
    fn mesh_fields_are_valid_in_mesh_mode_only() {
        let config = Config::from_yaml_for(MESH, Mode::Mesh).expect("valid in mesh mode");
        assert_eq!(config.listeners[0].service.as_deref(), Some("frontend"));
        assert_eq!(config.backends[0].port, Some(9080));
        let errors = problems_for(MESH, Mode::Standalone);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["backends[0].service", "listeners[0].service"],
            "{errors:?}"
        );
        assert!(
            errors.iter().all(|e| e.message.contains("--controller")),
            "{errors:?}"
        );
    }

    #[test]
    fn mesh_mode_refuses_plaintext_listeners_off_loopback() {
        let plain = |address: &str| {
            format!(
                "listeners:\n  - name: plain\n    address: \"{address}\"\n    routes: [{{backendRefs: [{{name: b}}]}}]\nbackends:\n  - {{name: b, endpoints: [\"127.0.0.1:1\"]}}\n"
            )
        };
        for address in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080"] {
            let errors = problems_for(&plain(address), Mode::Mesh);
            assert!(
                errors.iter().any(|e| e.path == "listeners[0].address"
                    && e.message.contains("plaintext from other nodes")),
                "{address}: {errors:?}"
            );
            assert!(Config::from_yaml_for(&plain(address), Mode::Standalone).is_ok());
        }
        for address in ["127.0.0.1:8080", "[::1]:8080"] {
            assert!(Config::from_yaml_for(&plain(address), Mode::Mesh).is_ok());
        }
    }

    #[test]
    fn mesh_listeners_need_exactly_one_of_address_and_service() {
        let both = MESH.replace(
            "    service: frontend\n",
            "    service: frontend\n    address: 0.0.0.0:80\n",
        );
        let errors = problems_for(&both, Mode::Mesh);
        assert!(
            errors
                .iter()
                .any(|e| e.path == "listeners[0].address"
                    && e.message.contains("cannot be combined")),
            "{errors:?}"
        );
        let neither = MESH.replace("    service: frontend\n    port: 80\n", "");
        let errors = problems_for(&neither, Mode::Mesh);
        assert!(
            errors
                .iter()
                .any(|e| e.path == "listeners[0].address" && e.message.contains("is missing")),
            "{errors:?}"
        );
        let no_port = MESH.replace("    port: 80\n", "");
        let errors = problems_for(&no_port, Mode::Mesh);
        assert!(
            errors.iter().any(|e| e.path == "listeners[0].port"),
            "{errors:?}"
        );
        let twice = MESH.replace(
            "    address: 127.0.0.1:15081\n",
            "    service: frontend\n    port: 80\n",
        );
        let errors = problems_for(&twice, Mode::Mesh);
        assert!(
            errors
                .iter()
                .any(|e| e.path == "listeners[1].port"
                    && e.message.contains("already has a listener")),
            "{errors:?}"
        );
        let bad_backend = MESH.replace(
            "    service: reviews\n",
            "    service: reviews\n    endpoints: [\"10.0.0.2:80\"]\n",
        );
        let errors = problems_for(&bad_backend, Mode::Mesh);
        assert!(
            errors.iter().any(|e| e.path == "backends[0].endpoints"),
            "{errors:?}"
        );
        // A mesh waypoint may have no listeners at all (every Service gets the default route).
        Config::from_yaml_for("listeners: []\n", Mode::Mesh).expect("valid");
        assert!(Config::from_yaml("listeners: []\n").is_err());
    }
}
