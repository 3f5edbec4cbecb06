//! L7 authorization: the AuthorizationPolicies that target a Service bound to this waypoint
//! (`targetRefs: [{kind: Service, name}]`) or the waypoint itself (`kind: Gateway`), evaluated
//! for every request after the L4 identity check (HBONE mutual TLS gave the client's SPIFFE ID)
//! and before routing: a policy is about a Service, not about one route.
//!
//! Semantics are the node agents' (`weft_agent::policy`, Istio-compatible): a matching DENY
//! refuses; when ALLOW policies apply, only a request matching one of them passes; AUDIT marks
//! matching requests; dry-run policies are evaluated, logged and counted, never enforced. With
//! a request, `to[].methods`, `to[].paths` and `when` (request headers) are evaluated. Without
//! one (opaque TCP, [`Authorizer::check_connection`]) an ALLOW rule with L7 conditions never
//! matches and a DENY rule with L7 conditions matches on its L4 parts: both fail closed.
//!
//! The policies of each Service are chosen once per mesh view (in [`MeshView::build`]), not
//! per request. A denied request is answered `403` naming the policy and never reaches
//! rate limits, faults, retries or backends.

use std::sync::Arc;

use weft_agent::policy::{self, Request, Verdict};
use weft_api::model::{PolicyInfo, ServiceInfo};

use crate::body::{self, Response};
use crate::layers::Source;
use crate::mesh::MeshView;

/// The policies that apply to requests to one Service at this waypoint.
#[derive(Debug, Clone, Default)]
pub struct ServicePolicies {
    policies: Vec<Arc<PolicyInfo>>,
}

impl ServicePolicies {
    /// The policies of `all` that target `service` (or its waypoint).
    pub fn for_service<'a>(
        all: impl Iterator<Item = &'a PolicyInfo>,
        service: &ServiceInfo,
    ) -> ServicePolicies {
        let Some(waypoint) = service.waypoint.as_deref() else {
            return ServicePolicies::default();
        };
        let key = service.key();
        ServicePolicies {
            policies: all
                .filter(|p| p.targets_at_waypoint(&key, waypoint))
                .cloned()
                .map(Arc::new)
                .collect(),
        }
    }

    /// Whether no policy applies.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    fn evaluate(&self, source: &Source, port: u16, request: Option<&Request<'_>>) -> Verdict {
        let refs: Vec<&PolicyInfo> = self.policies.iter().map(|p| &**p).collect();
        let principal = source.principal.to_string();
        let namespace = principal
            .split("/ns/")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .map(String::from);
        let src = policy::Source {
            namespace,
            principal: (!principal.is_empty()).then_some(principal),
            ip: source.ip,
        };
        policy::evaluate_policies(&refs, &src, port, request)
    }
}

/// The authorization decision for one request or connection, already logged and counted.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Whether it may proceed.
    pub allowed: bool,
    /// Why not, for the client (names the policy).
    pub reason: Option<String>,
}

/// Evaluates requests and connections against the current view's policies.
pub struct Authorizer;

impl Authorizer {
    /// A request to `service` (`namespace/name`) port `port` from `source`; `None` source
    /// (no verified identity) is denied whenever a policy applies.
    pub fn check_request(
        view: &MeshView,
        service: &str,
        port: u16,
        source: Option<&Source>,
        parts: &http::request::Parts,
    ) -> Decision {
        let request = Request {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            headers: &parts.headers,
        };
        Self::check(view, service, port, source, Some(&request), "http")
    }

    /// An opaque TCP connection (no L7 attributes: L7 rules fail closed).
    pub fn check_connection(
        view: &MeshView,
        service: &str,
        port: u16,
        source: Option<&Source>,
    ) -> Decision {
        Self::check(view, service, port, source, None, "tcp")
    }

    fn check(
        view: &MeshView,
        service: &str,
        port: u16,
        source: Option<&Source>,
        request: Option<&Request<'_>>,
        protocol: &'static str,
    ) -> Decision {
        let Some(policies) = view.policies_for(service) else {
            return Decision {
                allowed: true,
                reason: None,
            };
        };
        if policies.is_empty() {
            return Decision {
                allowed: true,
                reason: None,
            };
        }
        let Some(source) = source else {
            count(service, "deny", "", protocol);
            return Decision {
                allowed: false,
                reason: Some(
                    "the client's identity is unknown and AuthorizationPolicies apply".into(),
                ),
            };
        };
        let v = policies.evaluate(source, port, request);
        for audited in &v.audited {
            count(service, "audit", audited, protocol);
            tracing::info!(target: "weft_waypoint::authz", policy = %audited, principal = %source.principal, service, method = request.map(|r| r.method), path = request.map(|r| r.path), "audited by policy");
        }
        if let Some(dry) = &v.dry_run_denied_by {
            count(service, "dry_run_deny", dry, protocol);
            tracing::info!(target: "weft_waypoint::authz", policy = %dry, principal = %source.principal, service, method = request.map(|r| r.method), path = request.map(|r| r.path), "a dry-run policy would deny this");
        }
        let by = v.denied_by.clone().unwrap_or_default();
        count(service, v.decision(), &by, protocol);
        if !v.allowed {
            tracing::info!(target: "weft_waypoint::authz", policy = %by, principal = %source.principal, service, method = request.map(|r| r.method), path = request.map(|r| r.path), reason = v.reason.as_deref().unwrap_or(""), "denied by policy");
        }
        Decision {
            allowed: v.allowed,
            reason: v.reason,
        }
    }
}

fn count(service: &str, decision: &'static str, policy: &str, protocol: &'static str) {
    metrics::counter!(
        "weft_waypoint_authz_decisions_total",
        "service" => service.to_string(),
        "decision" => decision,
        "policy" => policy.to_string(),
        "protocol" => protocol,
    )
    .increment(1);
}

/// The `403` for a denied request.
pub fn forbidden(decision: &Decision) -> Response {
    body::text_response(
        http::StatusCode::FORBIDDEN,
        format!(
            "RBAC: access denied: {}\n",
            decision
                .reason
                .as_deref()
                .unwrap_or("denied by an AuthorizationPolicy")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn view(policies: &str) -> MeshView {
        let text = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{weft.dev/mesh: enabled, weft.dev/use-waypoint: waypoint}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: shop}}
spec: {{clusterIP: 10.96.0.10, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: other, namespace: shop}}
spec: {{clusterIP: 10.96.0.11, ports: [{{port: 80, targetPort: 8080}}]}}
{policies}"#
        );
        let docs = weft_api::parse_documents(&text, "t.yaml").expect("parse");
        let state = weft_api::MeshState::from_resources(&docs).expect("valid");
        MeshView::build(&state, "cluster.local")
    }

    fn policy(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
        )
    }

    fn source(sa: &str) -> Source {
        Source {
            principal: format!("spiffe://cluster.local/ns/shop/sa/{sa}").into(),
            ip: "198.18.1.11".parse::<IpAddr>().expect("ip"),
            workload: None,
        }
    }

    fn parts(method: &str, path: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn allowed(v: &MeshView, sa: &str, method: &str, path: &str, h: &[(&str, &str)]) -> bool {
        Authorizer::check_request(
            v,
            "shop/api",
            80,
            Some(&source(sa)),
            &parts(method, path, h),
        )
        .allowed
    }

    const ALLOW_WEB_GET_PUBLIC: &str = "{action: ALLOW, targetRefs: [{kind: Service, name: api}], rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/web']}], to: [{methods: [GET], paths: ['/public*']}]}]}";

    #[test]
    fn no_policy_allows_everything() {
        let v = view("");
        assert!(allowed(&v, "web", "POST", "/x", &[]));
    }

    #[test]
    fn allow_by_principal_method_and_path_denies_the_rest() {
        let v = view(&policy("allow", ALLOW_WEB_GET_PUBLIC));
        assert!(allowed(&v, "web", "GET", "/public/a", &[]));
        assert!(!allowed(&v, "web", "POST", "/public/a", &[]));
        assert!(!allowed(&v, "web", "GET", "/private", &[]));
        assert!(!allowed(&v, "batch", "GET", "/public/a", &[]));
        // Another Service of the waypoint is not targeted.
        let d = Authorizer::check_request(
            &v,
            "shop/other",
            80,
            Some(&source("batch")),
            &parts("POST", "/", &[]),
        );
        assert!(d.allowed);
    }

    #[test]
    fn deny_on_a_header_wins_and_names_the_policy() {
        let v = view(&format!(
            "{}{}",
            policy("allow", ALLOW_WEB_GET_PUBLIC),
            policy(
                "block",
                "{action: DENY, targetRefs: [{kind: Service, name: api}], rules: [{when: [{key: 'request.headers[x-block]', values: ['yes', 'y*']}]}]}"
            )
        ));
        let d = Authorizer::check_request(
            &v,
            "shop/api",
            80,
            Some(&source("web")),
            &parts("GET", "/public/a", &[("x-block", "yeah")]),
        );
        assert!(!d.allowed);
        assert!(
            d.reason.as_deref().unwrap_or("").contains("shop/block"),
            "{d:?}"
        );
        assert!(forbidden(&d).status() == http::StatusCode::FORBIDDEN);
        assert!(allowed(&v, "web", "GET", "/public/a", &[("x-block", "no")]));
    }

    #[test]
    fn a_policy_on_the_waypoint_applies_to_every_bound_service() {
        let v = view(&policy(
            "gw",
            "{action: DENY, targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}], rules: [{to: [{methods: [DELETE]}]}]}",
        ));
        assert!(!allowed(&v, "web", "DELETE", "/x", &[]));
        let d = Authorizer::check_request(
            &v,
            "shop/other",
            80,
            Some(&source("web")),
            &parts("DELETE", "/", &[]),
        );
        assert!(!d.allowed);
        assert!(allowed(&v, "web", "GET", "/x", &[]));
    }

    #[test]
    fn dry_run_and_audit_never_change_the_decision() {
        let v = view(&format!(
            "{}{}",
            policy(
                "dry",
                "{action: DENY, dryRun: true, targetRefs: [{kind: Service, name: api}], rules: [{to: [{paths: ['/x']}]}]}"
            ),
            policy(
                "audit",
                "{action: AUDIT, targetRefs: [{kind: Service, name: api}], rules: [{to: [{paths: ['/x']}]}]}"
            )
        ));
        assert!(allowed(&v, "web", "GET", "/x", &[]));
    }

    #[test]
    fn connections_fail_closed_on_l7_rules_and_unknown_sources_are_denied() {
        let v = view(&policy("allow", ALLOW_WEB_GET_PUBLIC));
        // An ALLOW whose only rule needs HTTP cannot admit an opaque connection.
        assert!(!Authorizer::check_connection(&v, "shop/api", 80, Some(&source("web"))).allowed);
        let v = view(&policy(
            "deny-delete",
            "{action: DENY, targetRefs: [{kind: Service, name: api}], rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/batch']}], to: [{methods: [DELETE]}]}]}",
        ));
        // A DENY with an HTTP condition denies opaque connections from its L4 match...
        assert!(!Authorizer::check_connection(&v, "shop/api", 80, Some(&source("batch"))).allowed);
        // ...and not others.
        assert!(Authorizer::check_connection(&v, "shop/api", 80, Some(&source("web"))).allowed);
        assert!(!Authorizer::check_connection(&v, "shop/api", 80, None).allowed);
    }

    #[test]
    fn policies_follow_the_view() {
        let v = view(&policy("allow", ALLOW_WEB_GET_PUBLIC));
        assert!(!allowed(&v, "web", "POST", "/public", &[]));
        let v = view("");
        assert!(allowed(&v, "web", "POST", "/public", &[]));
    }
}
