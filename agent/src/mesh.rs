//! What the data path reads for every connection: peers by address, services by virtual IP,
//! this node's workloads, policies and the trust bundle. Built once per configuration change
//! (by the single mutator, [`crate::pods::PodManager`]) and swapped in whole; connections take
//! a reference-counted snapshot and never lock while they run.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use weft_api::model::{PolicyInfo, PolicyTarget, ServiceInfo};
use weft_api::{MeshState, WorkloadInfo};
use weft_tunnel::TrustBundle;

/// Any workload of the mesh, as a connection's other end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// `namespace/name`.
    pub workload: String,
    pub namespace: String,
    /// SPIFFE ID.
    pub identity: String,
    /// Traffic to it goes through an HBONE tunnel (its namespace is meshed, the pod did not
    /// opt out).
    pub meshed: bool,
}

/// A snapshot.
#[derive(Default)]
pub struct View {
    pub peers: HashMap<IpAddr, Arc<Peer>>,
    pub services: HashMap<IpAddr, Arc<ServiceInfo>>,
    /// Services by `namespace/name` (waypoints are looked up by it).
    pub services_by_key: HashMap<String, Arc<ServiceInfo>>,
    /// This node's workloads by `namespace/name`.
    pub local: HashMap<String, WorkloadInfo>,
    pub policies: Vec<PolicyInfo>,
    /// Roots from the config stream (`None` until one arrives or if it does not parse).
    pub trust: Option<Arc<TrustBundle>>,
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

fn ips(w: &WorkloadInfo) -> impl Iterator<Item = IpAddr> {
    w.ip4
        .map(IpAddr::V4)
        .into_iter()
        .chain(w.ip6.map(IpAddr::V6))
}

impl View {
    pub fn build(state: &MeshState, node: &str, trust_domain: &str) -> Self {
        let mut peers = HashMap::new();
        let mut local = HashMap::new();
        for w in state.workloads.values() {
            let peer = Arc::new(Peer {
                workload: w.key(),
                namespace: w.namespace.clone(),
                identity: spiffe_id(trust_domain, &w.namespace, &w.service_account),
                meshed: w.capture.captured(),
            });
            for ip in ips(w) {
                peers.insert(ip, peer.clone());
            }
            if w.node == node {
                local.insert(w.key(), w.clone());
            }
        }
        let mut services = HashMap::new();
        let mut services_by_key = HashMap::new();
        for s in state.services.values() {
            let s = Arc::new(s.clone());
            for vip in &s.vips {
                services.insert(*vip, s.clone());
            }
            services_by_key.insert(s.key(), s);
        }
        let trust = if state.trust_bundle.is_empty() {
            None
        } else {
            match TrustBundle::from_pems(state.trust_bundle.iter().map(String::as_bytes)) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::error!(error = %e, "the trust bundle from the controller does not parse; keeping certificates' own bundles");
                    None
                }
            }
        };
        Self {
            peers,
            services,
            services_by_key,
            local,
            policies: state
                .policies
                .values()
                .map(|p| agent_policy(p, state))
                .collect(),
            trust,
        }
    }

    /// The workload at an address, if the mesh knows it.
    pub fn peer(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        self.peers.get(&ip.to_canonical())
    }

    /// If `dst` is a service's virtual IP and port: the service, and the endpoint addresses and
    /// target port to choose from (ready endpoints of `dst`'s address family).
    pub fn service_target(&self, dst: SocketAddr) -> Option<ServiceTarget> {
        let svc = self.services.get(&dst.ip().to_canonical())?;
        let port = svc.ports.iter().find(|p| p.port == dst.port());
        let candidates = port
            .map(|_| ready_addresses(svc, dst.ip()))
            .unwrap_or_default();
        let waypoint = svc.waypoint.as_ref().map(|key| WaypointTarget {
            key: key.clone(),
            candidates: self
                .services_by_key
                .get(key)
                .map(|w| ready_addresses(w, dst.ip()))
                .unwrap_or_default(),
        });
        Some(ServiceTarget {
            service: svc.clone(),
            target_port: port.map(|p| p.target_port),
            candidates,
            waypoint,
        })
    }
}

/// A policy as this agent enforces it: a policy targeting Services (`targetRefs`) applies here
/// to the endpoints of those of its Services that have no waypoint (the waypoint enforces it
/// for the others; a `Gateway` target is the waypoint's alone).
fn agent_policy(p: &PolicyInfo, state: &MeshState) -> PolicyInfo {
    let mut p = p.clone();
    if !p.targets.is_empty() {
        let workloads = p
            .targets
            .iter()
            .filter_map(|t| match t {
                PolicyTarget::Service(name) => {
                    state.services.get(&format!("{}/{name}", p.namespace))
                }
                PolicyTarget::Waypoint(_) => None,
            })
            .filter(|s| s.waypoint.is_none())
            .flat_map(|s| s.endpoints.iter().map(|e| e.workload.clone()))
            .filter(|w| !w.is_empty())
            .collect();
        p.agent_workloads = Some(workloads);
    }
    p
}

/// Addresses of `svc`'s ready endpoints in `family`'s address family.
fn ready_addresses(svc: &ServiceInfo, family: IpAddr) -> Vec<IpAddr> {
    svc.endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| match family {
            IpAddr::V4(_) => e.ip4.map(IpAddr::V4),
            IpAddr::V6(_) => e.ip6.map(IpAddr::V6),
        })
        .collect()
}

/// The waypoint a service's traffic goes through.
pub struct WaypointTarget {
    /// `namespace/name` of the waypoint's Service.
    pub key: String,
    /// Its ready endpoints (waypoint pods) in the destination's address family; empty when the
    /// waypoint is not deployed or not ready (the connection is then refused: a waypoint may
    /// enforce policy, so it is never bypassed).
    pub candidates: Vec<IpAddr>,
}

/// A service destination to pick an endpoint for.
pub struct ServiceTarget {
    pub service: Arc<ServiceInfo>,
    /// `None`: the service has no such port.
    pub target_port: Option<u16>,
    pub candidates: Vec<IpAddr>,
    /// Set when the service is bound to a waypoint: connections go there instead.
    pub waypoint: Option<WaypointTarget>,
}

/// The current snapshot, swapped whole.
#[derive(Default)]
pub struct SharedView(RwLock<Arc<View>>);

impl SharedView {
    pub fn get(&self) -> Arc<View> {
        match self.0.read() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Publishes a new snapshot and returns it.
    pub fn set(&self, v: View) -> Arc<View> {
        let v = Arc::new(v);
        match self.0.write() {
            Ok(mut g) => *g = v.clone(),
            Err(p) => *p.into_inner() = v.clone(),
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targeted_policies_apply_at_the_agent_only_to_services_without_a_waypoint() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec: {node: n1, ips: [198.18.1.11], netns: /a}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {node: n1, ips: [198.18.1.12], netns: /b}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}], selector: {app: api}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {weft.dev/use-waypoint: waypoint}}
spec: {clusterIP: 198.18.100.2, ports: [{port: 80}], selector: {app: web}}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  action: DENY
  targetRefs: [{kind: Service, name: api}, {kind: Service, name: web}, {kind: Gateway, name: waypoint}]
  rules: [{to: [{methods: [DELETE]}]}]
"#;
        let docs = weft_api::parse_documents(text, "t.yaml").expect("parses");
        let state = MeshState::from_resources(&docs).expect("valid");
        let view = View::build(&state, "n1", "cluster.local");
        let p = &view.policies[0];
        assert!(
            p.selects(&state.workloads["shop/api-1"]),
            "no waypoint: the agent enforces"
        );
        assert!(
            !p.selects(&state.workloads["shop/web-1"]),
            "bound to a waypoint: the waypoint enforces"
        );
        assert!(p.targets_at_waypoint("shop/web", "shop/other"));
        assert!(p.targets_at_waypoint("shop/x", "shop/waypoint"));
        assert!(!p.targets_at_waypoint("shop/x", "shop/other"));
    }
}
