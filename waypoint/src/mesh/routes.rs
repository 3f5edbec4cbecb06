//! Gateway API routes from the control plane: the HTTPRoutes and GRPCRoutes the controller
//! streams (validated, as [`RouteInfo`]) become listeners and backends of the waypoint's
//! [`Config`], next to those of its file.
//!
//! For every Service of the waypoint's namespace bound to this waypoint (its `waypoint` field
//! is `<namespace>/<name>` of this waypoint) and every route attached to one of its ports, the
//! rules of all those routes form the listener `gamma:<service>:<port>` (route precedence is
//! Gateway API's, computed by the route table). A listener of the file for the same Service
//! port wins: the routes are then not served, with a warning. Backends are
//! `<service>:<port>`, speaking HTTP/2 for GRPCRoutes and for Service ports whose
//! `appProtocol` says so, else HTTP/1.1. Route names in metrics are `<route>/<rule name or
//! index>`. `URLRewrite` and `RequestRedirect` become the file's filters of the same name; a
//! redirect without `scheme` or `port` keeps the Service port the client used (Gateway API: the
//! listener's port).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use weft_api::routes::{
    HeaderModifierInfo, PathKind, PathModifierInfo, RedirectInfo, RouteInfo, RouteKind,
    UrlRewriteInfo,
};

use super::MeshView;
use crate::config::{
    BackendConfig, BackendProtocol, BackendRef, BackoffConfig, Config, FilterConfig,
    GrpcMethodMatch, HeaderModifierConfig, ListenerConfig, MatchConfig, NameValue, PathMatch,
    PathMatchType, PathModifier, RedirectConfig, RetryBudgetConfig, RetryConfig, RetryOn,
    RouteConfig, TimeoutsConfig, UrlRewriteConfig,
};
use crate::duration::GatewayDuration;

/// Prefix of the listeners built from routes.
pub const LISTENER_PREFIX: &str = "gamma:";

fn modifier(m: &HeaderModifierInfo) -> HeaderModifierConfig {
    let nv = |v: &[(String, String)]| {
        v.iter()
            .map(|(name, value)| NameValue {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    };
    HeaderModifierConfig {
        set: nv(&m.set),
        add: nv(&m.add),
        remove: m.remove.clone(),
    }
}

fn path_modifier(p: &PathModifierInfo) -> PathModifier {
    match p {
        PathModifierInfo::ReplaceFullPath(path) => PathModifier::ReplaceFullPath {
            replace_full_path: path.clone(),
        },
        PathModifierInfo::ReplacePrefixMatch(path) => PathModifier::ReplacePrefixMatch {
            replace_prefix_match: path.clone(),
        },
    }
}

fn url_rewrite(u: &UrlRewriteInfo) -> UrlRewriteConfig {
    UrlRewriteConfig {
        hostname: u.hostname.clone(),
        path: u.path.as_ref().map(path_modifier),
    }
}

/// The redirect of a rule served on Service port `port`: without `scheme` and `port`, the
/// `Location` keeps `port` (Gateway API: the listener's port; the filter leaves out 80 for
/// http), as the client reached the Service there.
fn redirect(r: &RedirectInfo, port: u16) -> RedirectConfig {
    RedirectConfig {
        scheme: r.scheme.map(|s| s.as_str().to_string()),
        hostname: r.hostname.clone(),
        port: r.port.or(r.scheme.is_none().then_some(port)),
        path: r.path.as_ref().map(path_modifier),
        status_code: r.status_code,
    }
}

fn backend_name(service: &str, port: u16) -> String {
    format!("{service}:{port}")
}

/// `file` plus the listeners and backends of the routes in `view` for Services bound to the
/// waypoint `waypoint` (`<namespace>/<name>`) in `namespace`.
pub fn with_routes(file: &Config, view: &MeshView, namespace: &str, waypoint: &str) -> Config {
    let mut config = file.clone();
    let taken: BTreeSet<(String, u16)> = file
        .listeners
        .iter()
        .filter_map(|l| Some((l.service.clone()?, l.port?)))
        .collect();
    // (service, port) -> routes attached, in key order.
    let mut attached: BTreeMap<(String, u16), Vec<&RouteInfo>> = BTreeMap::new();
    for route in view.routes() {
        if route.namespace != namespace {
            continue;
        }
        for parent in &route.parents {
            let key = format!("{namespace}/{}", parent.service);
            let Some(service) = view.service(&key) else {
                tracing::debug!(route = %route.key(), service = %key, "route attached to an unknown Service");
                continue;
            };
            if service.waypoint.as_deref() != Some(waypoint) {
                continue;
            }
            for port in service
                .ports
                .iter()
                .map(|p| p.port)
                .filter(|p| parent.port.is_none_or(|want| want == *p))
            {
                if taken.contains(&(parent.service.clone(), port)) {
                    tracing::warn!(route = %route.key(), service = %key, port, "the waypoint's config file has a listener for this Service port: it wins, the route is not served there");
                    continue;
                }
                let list = attached.entry((parent.service.clone(), port)).or_default();
                if !list.iter().any(|r| r.key() == route.key()) {
                    list.push(route);
                }
            }
        }
    }
    let mut backends: BTreeMap<String, BackendConfig> = BTreeMap::new();
    let file_backends: BTreeSet<String> = file.backends.iter().map(|b| b.name.clone()).collect();
    for ((service, port), routes) in attached {
        let mut listener = ListenerConfig {
            name: format!("{LISTENER_PREFIX}{service}:{port}"),
            address: None,
            service: Some(service.clone()),
            port: Some(port),
            routes: Vec::new(),
        };
        for route in routes {
            for (i, rule) in route.rules.iter().enumerate() {
                let rule_name = if rule.name.is_empty() {
                    i.to_string()
                } else {
                    rule.name.clone()
                };
                let matches = rule
                    .matches
                    .iter()
                    .map(|m| {
                        let grpc =
                            (m.grpc_service.is_some() || m.grpc_method.is_some()).then(|| {
                                GrpcMethodMatch {
                                    service: m.grpc_service.clone(),
                                    method: m.grpc_method.clone(),
                                }
                            });
                        MatchConfig {
                            path: m.path.as_ref().map(|(kind, value)| PathMatch {
                                kind: match kind {
                                    PathKind::Exact => PathMatchType::Exact,
                                    PathKind::PathPrefix => PathMatchType::PathPrefix,
                                    PathKind::RegularExpression => PathMatchType::RegularExpression,
                                },
                                value: value.clone(),
                            }),
                            headers: m
                                .headers
                                .iter()
                                .map(|(name, value)| NameValue {
                                    name: name.clone(),
                                    value: value.clone(),
                                })
                                .collect(),
                            query_params: m
                                .query_params
                                .iter()
                                .map(|(name, value)| NameValue {
                                    name: name.clone(),
                                    value: value.clone(),
                                })
                                .collect(),
                            method: m.method.clone(),
                            grpc,
                        }
                    })
                    .collect();
                let mut filters = Vec::new();
                if !rule.request_headers.is_empty() {
                    filters.push(FilterConfig::RequestHeaderModifier {
                        request_header_modifier: modifier(&rule.request_headers),
                    });
                }
                if !rule.response_headers.is_empty() {
                    filters.push(FilterConfig::ResponseHeaderModifier {
                        response_header_modifier: modifier(&rule.response_headers),
                    });
                }
                if let Some(u) = &rule.url_rewrite {
                    filters.push(FilterConfig::UrlRewrite {
                        url_rewrite: url_rewrite(u),
                    });
                }
                if let Some(r) = &rule.redirect {
                    filters.push(FilterConfig::RequestRedirect {
                        request_redirect: redirect(r, port),
                    });
                }
                let mut backend_refs = Vec::new();
                for b in &rule.backends {
                    let mut name = backend_name(&b.service, b.port);
                    if file_backends.contains(&name) {
                        name = format!("{LISTENER_PREFIX}{name}");
                    }
                    let declared_h2 = view
                        .service(&format!("{namespace}/{}", b.service))
                        .and_then(|s| s.ports.iter().find(|p| p.port == b.port))
                        .is_some_and(|p| {
                            matches!(
                                p.app_protocol.to_ascii_lowercase().as_str(),
                                "http2" | "grpc" | "h2c" | "kubernetes.io/h2c"
                            )
                        });
                    let protocol = if route.kind == RouteKind::Grpc || declared_h2 {
                        BackendProtocol::Http2
                    } else {
                        BackendProtocol::Http1
                    };
                    let entry = backends.entry(name.clone()).or_insert(BackendConfig {
                        name: name.clone(),
                        endpoints: Vec::new(),
                        service: Some(b.service.clone()),
                        port: Some(b.port),
                        protocol,
                        circuit_breaker: None,
                        outlier_detection: None,
                        load_balancer: Default::default(),
                    });
                    if protocol == BackendProtocol::Http2 {
                        entry.protocol = BackendProtocol::Http2;
                    }
                    backend_refs.push(BackendRef {
                        name,
                        weight: b.weight,
                    });
                }
                let ms = |v: Option<u64>| v.map(|ms| GatewayDuration(Duration::from_millis(ms)));
                let timeouts = (rule.request_timeout_ms.is_some()
                    || rule.backend_timeout_ms.is_some())
                .then(|| TimeoutsConfig {
                    request: ms(rule.request_timeout_ms),
                    backend_request: ms(rule.backend_timeout_ms),
                });
                listener.routes.push(RouteConfig {
                    name: Some(format!("{}/{rule_name}", route.name)),
                    hostnames: route.hostnames.clone(),
                    matches,
                    filters,
                    backend_refs,
                    timeouts,
                    retry: rule.retry.as_ref().and_then(retry_config),
                    ..Default::default()
                });
            }
        }
        config.listeners.push(listener);
    }
    config.backends.extend(backends.into_values());
    config
}

/// An HTTPRoute's `retry` as the retry layer's config: `attempts` retries (none: no layer),
/// on connection failures and resets (Gateway API's connection errors), on attempts that ran
/// past `timeouts.backendRequest` and on `codes`, no
/// sooner than `backoff` (then exponential with jitter, capped at ten times it), within the
/// default retry budget so that retries cannot multiply the load on a failing backend.
fn retry_config(retry: &weft_api::routes::RetryInfo) -> Option<RetryConfig> {
    if retry.attempts == 0 {
        return None;
    }
    // Gateway API: connection errors always; an attempt past `timeouts.backendRequest` is a
    // retryable error too.
    let mut retry_on = vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::AttemptTimeout,
    ];
    retry_on.extend(retry.codes.iter().map(|c| RetryOn::Status(*c)));
    let backoff = match retry.backoff_ms {
        None => BackoffConfig::default(),
        Some(ms) => {
            let floor = Duration::from_millis(ms);
            BackoffConfig {
                base: GatewayDuration(floor),
                max: GatewayDuration(floor.saturating_mul(10)),
                min: Some(GatewayDuration(floor)),
            }
        }
    };
    Some(RetryConfig {
        attempts: retry.attempts + 1,
        backoff,
        retry_on,
        budget: RetryBudgetConfig::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(extra: &str) -> weft_api::MeshState {
        let base = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled, weft.dev/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: greeter, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 50051, targetPort: 50051}]}
---
apiVersion: v1
kind: Service
metadata: {name: direct, namespace: shop, labels: {weft.dev/use-waypoint: none}}
spec: {clusterIP: 10.96.0.12, ports: [{port: 80, targetPort: 80}]}
"#;
        let docs =
            weft_api::parse_documents(&format!("{base}---{extra}"), "t.yaml").expect("parse");
        weft_api::MeshState::from_resources(&docs).expect("valid")
    }

    const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}, {group: "", kind: Service, name: direct}]
  rules:
    - name: v2
      matches: [{path: {type: PathPrefix, value: /v2}}]
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: gamma}]}}]
      backendRefs: [{name: greeter, port: 50051, weight: 1}, {name: api, port: 80, weight: 3}]
      timeouts: {request: 2s}
      retry: {codes: [502, 503], attempts: 2, backoff: 40ms}
    - matches: [{path: {type: PathPrefix, value: /once}}]
      backendRefs: [{name: api, port: 80}]
      retry: {attempts: 0}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter}]
  rules:
    - matches: [{method: {service: shop.Greeter}}]
      backendRefs: [{name: greeter, port: 50051}]
"#;

    fn empty_file() -> Config {
        Config::from_yaml_for("listeners: []\nbackends: []\n", crate::config::Mode::Mesh)
            .expect("empty config")
    }

    #[test]
    fn routes_of_bound_services_become_listeners_and_backends() {
        let view = MeshView::build(&state(ROUTES), "cluster.local");
        let config = with_routes(&empty_file(), &view, "shop", "shop/waypoint");
        let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        // `direct` is opted out of the waypoint: its parent is not served here.
        assert_eq!(names, ["gamma:api:80", "gamma:greeter:50051"]);
        let api = &config.listeners[0];
        assert_eq!(api.routes[0].name.as_deref(), Some("api/v2"));
        assert_eq!(api.routes[0].backend_refs[1].name, "api:80");
        assert_eq!(api.routes[0].backend_refs[1].weight, 3);
        assert_eq!(
            api.routes[0].timeouts.as_ref().and_then(|t| t.request),
            Some(GatewayDuration(Duration::from_secs(2)))
        );
        let retry = api.routes[0].retry.as_ref().expect("retry");
        assert_eq!(retry.attempts, 3, "2 retries after the first attempt");
        assert_eq!(
            retry.retry_on,
            [
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::AttemptTimeout,
                RetryOn::Status(502),
                RetryOn::Status(503)
            ]
        );
        let floor = GatewayDuration(Duration::from_millis(40));
        assert_eq!(retry.backoff.min, Some(floor));
        assert_eq!(retry.backoff.base, floor);
        assert_eq!(retry.budget, RetryBudgetConfig::default());
        assert!(
            api.routes
                .iter()
                .any(|r| r.name.as_deref().is_some_and(|n| n.starts_with("api/"))
                    && r.retry.is_none()),
            "attempts: 0 means no retries"
        );
        let greeter = config
            .backends
            .iter()
            .find(|b| b.name == "greeter:50051")
            .expect("greeter backend");
        assert_eq!(
            greeter.protocol,
            BackendProtocol::Http2,
            "a GRPCRoute backend"
        );
        let api_backend = config
            .backends
            .iter()
            .find(|b| b.name == "api:80")
            .expect("api backend");
        assert_eq!(api_backend.protocol, BackendProtocol::Http1);
        config
            .validate_for(crate::config::Mode::Mesh)
            .expect("valid");
    }

    const FILTERS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.13, ports: [{port: 80, targetPort: 8080}, {name: alt, port: 8080, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
    - name: old
      matches: [{path: {type: PathPrefix, value: /old}}]
      filters: [{type: URLRewrite, urlRewrite: {hostname: web.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
      backendRefs: [{name: web, port: 80}]
    - name: moved
      matches: [{path: {type: PathPrefix, value: /moved}}]
      filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /here}, statusCode: 301}}]
    - name: secure
      filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: login.example.com, path: {type: ReplaceFullPath, replaceFullPath: /login}}}]
"#;

    #[test]
    fn rewrites_and_redirects_become_the_files_filters() {
        let view = MeshView::build(&state(FILTERS), "cluster.local");
        let config = with_routes(&empty_file(), &view, "shop", "shop/waypoint");
        config
            .validate_for(crate::config::Mode::Mesh)
            .expect("redirect rules without backends are valid");
        let listener = |name: &str| {
            config
                .listeners
                .iter()
                .find(|l| l.name == name)
                .unwrap_or_else(|| panic!("listener {name}"))
        };
        // The same rules written in the waypoint's file compile to the same routes.
        let file = Config::from_yaml_for(
            r#"
listeners:
  - name: web
    service: web
    port: 80
    routes:
      - name: web/old
        matches: [{path: {type: PathPrefix, value: /old}}]
        filters: [{type: URLRewrite, urlRewrite: {hostname: web.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
        backendRefs: [{name: "web:80"}]
      - name: web/moved
        matches: [{path: {type: PathPrefix, value: /moved}}]
        filters: [{type: RequestRedirect, requestRedirect: {port: 80, path: {type: ReplacePrefixMatch, replacePrefixMatch: /here}, statusCode: 301}}]
      - name: web/secure
        filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: login.example.com, path: {type: ReplaceFullPath, replaceFullPath: /login}}}]
backends:
  - {name: "web:80", service: web, port: 80}
"#,
            crate::config::Mode::Mesh,
        )
        .expect("file config");
        assert_eq!(listener("gamma:web:80").routes, file.listeners[0].routes);
        assert!(listener("gamma:web:80").routes[1].backend_refs.is_empty());
        // Without scheme and port a redirect keeps the Service port the client used; with a
        // scheme, the scheme's port (none in the Location).
        let redirect_port = |listener_name: &str, rule: usize| match &listener(listener_name).routes
            [rule]
            .filters[..]
        {
            [FilterConfig::RequestRedirect { request_redirect }] => request_redirect.port,
            other => panic!("not a redirect: {other:?}"),
        };
        assert_eq!(redirect_port("gamma:web:80", 1), Some(80));
        assert_eq!(redirect_port("gamma:web:8080", 1), Some(8080));
        assert_eq!(redirect_port("gamma:web:8080", 2), None);
    }

    #[test]
    fn another_waypoint_or_namespace_gets_nothing_and_the_file_wins() {
        let view = MeshView::build(&state(ROUTES), "cluster.local");
        let config = with_routes(&empty_file(), &view, "shop", "shop/other-waypoint");
        assert!(config.listeners.is_empty());
        let config = with_routes(&empty_file(), &view, "legacy", "legacy/waypoint");
        assert!(config.listeners.is_empty());
        let file = Config::from_yaml_for(
            "listeners:\n  - {name: mine, service: api, port: 80, routes: [{backendRefs: [{name: b}]}]}\nbackends:\n  - {name: b, service: api, port: 80}\n",
            crate::config::Mode::Mesh,
        )
        .expect("file config");
        let config = with_routes(&file, &view, "shop", "shop/waypoint");
        let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["mine", "gamma:greeter:50051"]);
    }
}
