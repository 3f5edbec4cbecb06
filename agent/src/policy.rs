//! L4 authorization: AuthorizationPolicies evaluated for a connection arriving at a local
//! workload, by source identity (when it came through mutual TLS), source address and
//! destination port.
//!
//! Semantics (docs/security.md):
//! - a DENY policy that matches refuses the connection; DENY wins over ALLOW;
//! - if any ALLOW policy selects the workload, only connections matching one of them get in;
//! - AUDIT policies only mark matching connections in the access log and metrics;
//! - dry-run policies are evaluated the same way, logged as what they would do, and never
//!   enforced;
//! - a policy with no rules matches nothing (so an ALLOW policy without rules denies all);
//! - rules naming HTTP methods or paths cannot be evaluated at L4: such an ALLOW rule never
//!   matches and such a DENY rule matches on its L4 parts alone (both fail closed).
//!
//! The waypoint evaluates the same policies ([`evaluate_policies`]) with the request's method,
//! path and headers ([`Request`]); without them (opaque TCP) it gets the L4 semantics above.

use std::net::IpAddr;

use serde::Serialize;
use weft_api::WorkloadInfo;
use weft_api::model::{
    PolicyAction, PolicyDestinationInfo, PolicyInfo, PolicyRuleInfo, PolicySourceInfo,
};

/// What is known about a connection's source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Namespace of the authenticated identity (mutual TLS only).
    pub namespace: Option<String>,
    /// SPIFFE ID of the authenticated peer (mutual TLS only).
    pub principal: Option<String>,
    pub ip: IpAddr,
}

/// The outcome of evaluating every policy selecting a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided a denial (empty: no ALLOW policy matched).
    pub denied_by: Option<String>,
    /// Why the connection was denied, for the log and the client.
    pub reason: Option<String>,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    /// What dry-run policies would have done, when it differs from allowing:
    /// `Some("ns/name")` of a dry-run policy that would deny.
    pub dry_run_denied_by: Option<String>,
}

impl Verdict {
    /// Short label for metrics and logs.
    pub fn decision(&self) -> &'static str {
        if self.allowed { "allow" } else { "deny" }
    }
}

/// An HTTP request's attributes, for L7 rules (`to[].methods`, `to[].paths`, `when`).
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub headers: &'a hyper::HeaderMap,
}

/// Evaluates the policies selecting `dst` for a connection from `src` to `port`.
pub fn evaluate(policies: &[PolicyInfo], dst: &WorkloadInfo, src: &Source, port: u16) -> Verdict {
    let selecting: Vec<&PolicyInfo> = policies.iter().filter(|p| p.selects(dst)).collect();
    evaluate_policies(&selecting, src, port, None)
}

/// Evaluates `policies` (already chosen for the destination) for a connection or request
/// from `src` to `port`; with `request`, L7 conditions are evaluated instead of failing closed.
pub fn evaluate_policies(
    selecting: &[&PolicyInfo],
    src: &Source,
    port: u16,
    request: Option<&Request<'_>>,
) -> Verdict {
    let mut v = decide(
        selecting.iter().copied().filter(|p| !p.dry_run),
        src,
        port,
        request,
    );
    let dry = decide(
        selecting.iter().copied().filter(|p| p.dry_run),
        src,
        port,
        request,
    );
    if !dry.allowed {
        v.dry_run_denied_by = Some(
            dry.denied_by
                .unwrap_or_else(|| "(no dry-run ALLOW matched)".into()),
        );
    }
    v.audited = selecting
        .iter()
        .filter(|p| {
            p.action == PolicyAction::Audit
                && p.rules
                    .iter()
                    .any(|r| rule_matches(r, src, port, request, true))
        })
        .map(|p| p.key())
        .collect();
    v
}

fn decide<'a>(
    policies: impl Iterator<Item = &'a PolicyInfo> + Clone,
    src: &Source,
    port: u16,
    request: Option<&Request<'_>>,
) -> Verdict {
    for p in policies.clone().filter(|p| p.action == PolicyAction::Deny) {
        if p.rules
            .iter()
            .any(|r| rule_matches(r, src, port, request, true))
        {
            return Verdict {
                allowed: false,
                denied_by: Some(p.key()),
                reason: Some(format!("denied by DENY policy {}", p.key())),
                ..Default::default()
            };
        }
    }
    let mut allows = policies
        .filter(|p| p.action == PolicyAction::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Verdict {
            allowed: true,
            ..Default::default()
        };
    }
    let mut names = Vec::new();
    for p in allows {
        if p.rules
            .iter()
            .any(|r| rule_matches(r, src, port, request, false))
        {
            return Verdict {
                allowed: true,
                ..Default::default()
            };
        }
        names.push(p.key());
    }
    Verdict {
        allowed: false,
        denied_by: None,
        reason: Some(format!(
            "no rule of the ALLOW policies selecting the workload ({}) matches this source and port",
            names.join(", ")
        )),
        ..Default::default()
    }
}

/// Whether a rule matches. Without `request`, `l7_matches` says what an L7-only condition
/// counts as: `true` for DENY (deny on the L4 parts), `false` for ALLOW (never allow what
/// cannot be checked).
fn rule_matches(
    r: &PolicyRuleInfo,
    src: &Source,
    port: u16,
    request: Option<&Request<'_>>,
    l7_matches: bool,
) -> bool {
    if r.is_l7() && request.is_none() && !l7_matches {
        return false;
    }
    let from = r.from.is_empty() || r.from.iter().any(|s| source_matches(s, src));
    let to = r.to.is_empty()
        || r.to.iter().any(|d| {
            destination_matches(d, port) && request.is_none_or(|req| request_matches(d, req))
        });
    let when = match request {
        None => true,
        Some(req) => r.when.iter().all(|c| {
            req.headers
                .get_all(c.header.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| c.values.iter().any(|pattern| principal_matches(pattern, v)))
        }),
    };
    from && to && when
}

/// `to[].methods` (exact) and `to[].paths` (exact, `prefix*`, `*suffix`, `*`).
fn request_matches(d: &PolicyDestinationInfo, req: &Request<'_>) -> bool {
    let method = d.methods.is_empty() || d.methods.iter().any(|m| m == req.method);
    let path = d.paths.is_empty() || d.paths.iter().any(|p| principal_matches(p, req.path));
    method && path
}

fn source_matches(s: &PolicySourceInfo, src: &Source) -> bool {
    let ns = s.namespaces.is_empty()
        || src
            .namespace
            .as_ref()
            .is_some_and(|n| s.namespaces.iter().any(|x| x == n || x == "*"));
    let principal = s.principals.is_empty()
        || src
            .principal
            .as_ref()
            .is_some_and(|p| s.principals.iter().any(|x| principal_matches(x, p)));
    let ip = s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|b| b.contains(&src.ip));
    ns && principal && ip
}

/// Exact, `*` (any authenticated peer, any value), `prefix*` or `*suffix`.
fn principal_matches(pattern: &str, principal: &str) -> bool {
    if pattern == "*" || pattern == principal {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return principal.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return principal.ends_with(suffix);
    }
    false
}

fn destination_matches(d: &PolicyDestinationInfo, port: u16) -> bool {
    d.ports.is_empty() || d.ports.contains(&port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::CaptureSettings;

    fn api() -> WorkloadInfo {
        WorkloadInfo {
            name: "api".into(),
            namespace: "shop".into(),
            service_account: "api".into(),
            node: "n2".into(),
            ip4: "198.18.2.11".parse().ok(),
            ip6: None,
            netns: "/x".into(),
            labels: [("app".to_string(), "api".to_string())].into(),
            capture: CaptureSettings::default(),
        }
    }

    fn policy(name: &str, action: PolicyAction, rules: Vec<PolicyRuleInfo>) -> PolicyInfo {
        PolicyInfo {
            name: name.into(),
            namespace: "shop".into(),
            selector: None,
            action,
            rules,
            dry_run: false,
            targets: vec![],
            agent_workloads: None,
        }
    }

    fn from_ns(ns: &str) -> PolicyRuleInfo {
        PolicyRuleInfo {
            from: vec![PolicySourceInfo {
                namespaces: vec![ns.into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn mtls(ns: &str, sa: &str) -> Source {
        Source {
            namespace: Some(ns.into()),
            principal: Some(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")),
            ip: "198.18.1.11".parse().expect("ip"),
        }
    }

    #[test]
    fn no_policy_allows() {
        assert!(evaluate(&[], &api(), &mtls("shop", "web"), 80).allowed);
    }

    #[test]
    fn allow_means_default_deny_and_deny_wins() {
        let allow = policy("allow-shop", PolicyAction::Allow, vec![from_ns("shop")]);
        let ps = vec![allow.clone()];
        assert!(evaluate(&ps, &api(), &mtls("shop", "web"), 80).allowed);
        let v = evaluate(&ps, &api(), &mtls("legacy", "batch"), 80);
        assert!(!v.allowed);
        assert!(
            v.reason
                .as_deref()
                .unwrap_or("")
                .contains("shop/allow-shop"),
            "{v:?}"
        );
        // Plaintext has no namespace: a namespace rule cannot match.
        let plain = Source {
            namespace: None,
            principal: None,
            ip: "198.18.1.12".parse().expect("ip"),
        };
        assert!(!evaluate(&ps, &api(), &plain, 80).allowed);
        let deny = policy(
            "deny-web",
            PolicyAction::Deny,
            vec![PolicyRuleInfo {
                from: vec![PolicySourceInfo {
                    principals: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
                    ..Default::default()
                }],
                to: vec![PolicyDestinationInfo {
                    ports: vec![80],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let ps = vec![allow, deny];
        let v = evaluate(&ps, &api(), &mtls("shop", "web"), 80);
        assert_eq!(v.denied_by.as_deref(), Some("shop/deny-web"));
        assert!(evaluate(&ps, &api(), &mtls("shop", "web"), 81).allowed);
        assert!(evaluate(&ps, &api(), &mtls("shop", "other"), 80).allowed);
    }

    #[test]
    fn ip_blocks_principal_patterns_and_selectors() {
        let rule = PolicyRuleInfo {
            from: vec![PolicySourceInfo {
                ip_blocks: vec!["198.18.1.0/24".parse().expect("net")],
                principals: vec!["spiffe://cluster.local/ns/shop/*".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut p = policy("allow", PolicyAction::Allow, vec![rule]);
        assert!(evaluate(std::slice::from_ref(&p), &api(), &mtls("shop", "web"), 80).allowed);
        let mut far = mtls("shop", "web");
        far.ip = "198.18.2.12".parse().expect("ip");
        assert!(!evaluate(std::slice::from_ref(&p), &api(), &far, 80).allowed);
        // A selector that does not match the workload: the policy does not apply.
        p.selector = Some([("app".to_string(), "db".to_string())].into());
        assert!(evaluate(&[p], &api(), &far, 80).allowed);
    }

    #[test]
    fn l7_rules_fail_closed_and_empty_rules_match_nothing() {
        let l7 = PolicyRuleInfo {
            from: vec![],
            to: vec![PolicyDestinationInfo {
                methods: vec!["GET".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let allow = policy("allow-get", PolicyAction::Allow, vec![l7.clone()]);
        assert!(!evaluate(&[allow], &api(), &mtls("shop", "web"), 80).allowed);
        let deny = policy("deny-get", PolicyAction::Deny, vec![l7]);
        assert!(!evaluate(&[deny], &api(), &mtls("shop", "web"), 80).allowed);
        let deny_nothing = policy("deny-none", PolicyAction::Deny, vec![]);
        assert!(evaluate(&[deny_nothing], &api(), &mtls("shop", "web"), 80).allowed);
        let allow_nothing = policy("allow-none", PolicyAction::Allow, vec![]);
        assert!(!evaluate(&[allow_nothing], &api(), &mtls("shop", "web"), 80).allowed);
    }

    #[test]
    fn dry_run_and_audit_are_reported_not_enforced() {
        let mut deny = policy(
            "deny-all",
            PolicyAction::Deny,
            vec![PolicyRuleInfo::default()],
        );
        deny.dry_run = true;
        let audit = policy(
            "audit-all",
            PolicyAction::Audit,
            vec![PolicyRuleInfo::default()],
        );
        let v = evaluate(&[deny, audit], &api(), &mtls("shop", "web"), 80);
        assert!(v.allowed);
        assert_eq!(v.dry_run_denied_by.as_deref(), Some("shop/deny-all"));
        assert_eq!(v.audited, vec!["shop/audit-all".to_string()]);
    }
}
