//! Per-node views: which resources each node's agent needs, kept up to date incrementally.
//!
//! One updater applies each new [`MeshState`]: a single pass finds the workloads that changed,
//! and only the nodes they belong to (before and after) get a new generation. Streams of other
//! nodes are not woken, and a woken stream diffs only its own node's (small) view against what
//! it already sent: work per change is proportional to the change.
//!
//! Services, AuthorizationPolicies and peers (every workload, slimmed to what the data path needs
//! to reach and name it: addresses, identity, node, mesh mode) are needed by every node (any pod
//! may call any service or pod; policies are small and an agent picks the ones selecting its
//! workloads), so they live in one shared map that every view includes; a change to one wakes
//! every stream. Changes that only matter to a workload's own node (network namespace, labels,
//! capture exclusions) leave its peer entry unchanged and wake that node alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use weft_api::wire::{self, pb};
use weft_api::{MeshState, WorkloadInfo};

/// What one node's agent should hold.
#[derive(Default)]
struct NodeView {
    resources: BTreeMap<String, Arc<pb::Resource>>,
    generation: watch::Sender<u64>,
}

/// All node views.
#[derive(Default)]
pub struct Views {
    nodes: RwLock<HashMap<String, NodeView>>,
    /// Resources every node gets (services).
    shared: RwLock<BTreeMap<String, Arc<pb::Resource>>>,
    current: RwLock<Arc<MeshState>>,
}

/// A diff for one stream: what to send so the agent matches its node's view.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub upserts: Vec<pb::Resource>,
    pub removes: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty()
    }
}

impl Views {
    /// Applies a new state; returns the nodes whose view changed.
    pub fn apply(&self, next: Arc<MeshState>) -> Vec<String> {
        let prev = {
            let mut cur = match self.current.write() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            std::mem::replace(&mut *cur, next.clone())
        };
        let mut nodes = match self.nodes.write() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        let mut touched: Vec<String> = Vec::new();
        let touch = |node: &str, touched: &mut Vec<String>| {
            if !touched.iter().any(|n| n == node) {
                touched.push(node.to_string());
            }
        };
        // Removed or changed workloads.
        for (key, old) in &prev.workloads {
            match next.workloads.get(key) {
                Some(new) if new == old => {}
                Some(new) if new.node == old.node => {}
                _ => {
                    if let Some(v) = nodes.get_mut(&old.node) {
                        v.resources
                            .remove(&wire::workload_key(&old.namespace, &old.name));
                    }
                    touch(&old.node, &mut touched);
                }
            }
        }
        // Added or changed workloads.
        for (key, new) in &next.workloads {
            if prev.workloads.get(key) == Some(new) {
                continue;
            }
            let v = nodes.entry(new.node.clone()).or_default();
            let r = wire::workload_resource(new);
            v.resources.insert(r.key.clone(), Arc::new(r));
            touch(&new.node, &mut touched);
        }
        // Services: shared by every view.
        let mut shared_changed = false;
        {
            let mut shared = match self.shared.write() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            shared_changed |= sync_shared(
                &mut shared,
                &prev.services,
                &next.services,
                |s| wire::service_key(&s.namespace, &s.name),
                wire::service_resource,
            );
            shared_changed |= sync_shared(
                &mut shared,
                &prev.policies,
                &next.policies,
                |p| wire::policy_key(&p.namespace, &p.name),
                wire::policy_resource,
            );
            shared_changed |= sync_shared(
                &mut shared,
                &prev.routes,
                &next.routes,
                |r| r.key(),
                wire::route_resource,
            );
            shared_changed |= sync_peers(&mut shared, &prev.workloads, &next.workloads);
        }
        if shared_changed {
            touched = nodes.keys().cloned().collect();
        }
        for n in &touched {
            if let Some(v) = nodes.get(n) {
                v.generation.send_modify(|g| *g += 1);
            }
        }
        touched
    }

    /// Sets the roots every agent trusts (streamed as `TrustBundle/mesh`); wakes every stream
    /// when it changes (root rotation).
    pub fn set_trust_bundle(&self, roots_pem: &[String]) {
        let r = wire::trust_bundle_resource(roots_pem);
        {
            let mut shared = match self.shared.write() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if shared
                .get(&r.key)
                .is_some_and(|old| old.version == r.version)
            {
                return;
            }
            shared.insert(r.key.clone(), Arc::new(r));
        }
        let nodes = match self.nodes.read() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        for v in nodes.values() {
            v.generation.send_modify(|g| *g += 1);
        }
    }

    /// Subscribes to a node's generation counter (creating an empty view if needed).
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        let mut nodes = match self.nodes.write() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        nodes
            .entry(node.to_string())
            .or_default()
            .generation
            .subscribe()
    }

    /// What to send a node's agent that holds `known` (key -> version).
    pub fn delta(&self, node: &str, known: &HashMap<String, String>) -> Delta {
        let nodes = match self.nodes.read() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        let shared = match self.shared.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let empty = BTreeMap::new();
        let own = nodes.get(node).map_or(&empty, |v| &v.resources);
        let mut d = Delta::default();
        for (key, r) in own.iter().chain(shared.iter()) {
            if known.get(key) != Some(&r.version) {
                d.upserts.push((**r).clone());
            }
        }
        d.removes = known
            .keys()
            .filter(|k| !own.contains_key(*k) && !shared.contains_key(*k))
            .cloned()
            .collect();
        d.removes.sort();
        d
    }

    /// Number of resources in a node's view.
    pub fn len(&self, node: &str) -> usize {
        match self.nodes.read() {
            Ok(n) => n.get(node).map_or(0, |v| v.resources.len()),
            Err(p) => p.into_inner().get(node).map_or(0, |v| v.resources.len()),
        }
    }
}

/// Applies the difference between two maps of shared resources; returns whether anything
/// changed.
fn sync_shared<T: PartialEq>(
    shared: &mut BTreeMap<String, Arc<pb::Resource>>,
    prev: &BTreeMap<String, T>,
    next: &BTreeMap<String, T>,
    key: impl Fn(&T) -> String,
    resource: impl Fn(&T) -> pb::Resource,
) -> bool {
    let mut changed = false;
    for (k, old) in prev {
        if !next.contains_key(k) {
            shared.remove(&key(old));
            changed = true;
        }
    }
    for (k, new) in next {
        if prev.get(k) != Some(new) {
            let r = resource(new);
            shared.insert(r.key.clone(), Arc::new(r));
            changed = true;
        }
    }
    changed
}

/// Keeps the shared `Peer/` entries in line with the workloads; returns whether any changed
/// (a change to a workload's netns, labels or exclusions leaves its peer entry as it was).
fn sync_peers(
    shared: &mut BTreeMap<String, Arc<pb::Resource>>,
    prev: &BTreeMap<String, WorkloadInfo>,
    next: &BTreeMap<String, WorkloadInfo>,
) -> bool {
    let mut changed = false;
    for (k, old) in prev {
        if !next.contains_key(k) {
            shared.remove(&wire::peer_key(&old.namespace, &old.name));
            changed = true;
        }
    }
    for (k, new) in next {
        if prev.get(k) == Some(new) {
            continue;
        }
        let r = wire::peer_resource(new);
        if shared
            .get(&r.key)
            .is_some_and(|old| old.version == r.version)
        {
            continue;
        }
        shared.insert(r.key.clone(), Arc::new(r));
        changed = true;
    }
    changed
}

/// The workloads a view would hold for `node` (for tests and `weftctl`).
pub fn node_workloads<'a>(state: &'a MeshState, node: &'a str) -> Vec<&'a WorkloadInfo> {
    state.workloads_on_node(node).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::{CaptureSettings, WorkloadInfo};

    fn wl(name: &str, node: &str, meshed: bool) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            node: node.into(),
            ip4: Some(std::net::Ipv4Addr::new(198, 18, 1, name.len() as u8)),
            ip6: None,
            netns: "/x".into(),
            labels: Default::default(),
            capture: CaptureSettings {
                namespace_meshed: meshed,
                ..Default::default()
            },
        }
    }

    fn state(ws: &[WorkloadInfo]) -> Arc<MeshState> {
        Arc::new(MeshState {
            workloads: ws.iter().map(|w| (w.key(), w.clone())).collect(),
            ..Default::default()
        })
    }

    fn keys(d: &Delta) -> Vec<&str> {
        d.upserts.iter().map(|r| r.key.as_str()).collect()
    }

    /// The same workload with other capture exclusions (a change only its node cares about).
    fn excluding(mut w: WorkloadInfo, port: u16) -> WorkloadInfo {
        w.capture.exclusions.outbound_ports = vec![port];
        w
    }

    #[test]
    fn first_sync_sends_own_workloads_in_full_and_every_peer() {
        let v = Views::default();
        v.apply(state(&[wl("a", "n1", true), wl("bb", "n2", true)]));
        let d = v.delta("n1", &HashMap::new());
        assert_eq!(keys(&d), vec!["Workload/ns/a", "Peer/ns/a", "Peer/ns/bb"]);
        assert!(d.removes.is_empty());
        // Peers carry no netns or labels.
        let Some(pb::resource::Kind::Workload(p)) = &d.upserts[2].kind else {
            panic!("peer is a workload");
        };
        assert!(p.netns.is_empty() && p.labels.is_empty());
    }

    #[test]
    fn a_local_change_touches_only_its_node_and_resumes_without_resend() {
        let v = Views::default();
        let s1 = state(&[wl("a", "n1", true), wl("bb", "n2", true)]);
        v.apply(s1);
        let known: HashMap<String, String> = v
            .delta("n1", &HashMap::new())
            .upserts
            .into_iter()
            .map(|r| (r.key, r.version))
            .collect();
        // Resume with everything known: nothing to send.
        assert!(v.delta("n1", &known).is_empty());
        let touched = v.apply(state(&[
            excluding(wl("a", "n1", true), 5432),
            wl("bb", "n2", true),
        ]));
        assert_eq!(touched, vec!["n1".to_string()]);
        let d = v.delta("n1", &known);
        assert_eq!(keys(&d), vec!["Workload/ns/a"]);
        assert!(d.removes.is_empty());
        // Leaving the mesh changes the peer entry: every node hears of it.
        let mut touched = v.apply(state(&[wl("a", "n1", false), wl("bb", "n2", true)]));
        touched.sort();
        assert_eq!(touched, vec!["n1".to_string(), "n2".to_string()]);
        assert_eq!(
            keys(&v.delta("n2", &known)),
            vec!["Workload/ns/bb", "Peer/ns/a"]
        );
    }

    #[test]
    fn removed_and_moved_workloads_are_removed_from_the_old_node() {
        let v = Views::default();
        v.apply(state(&[wl("a", "n1", true), wl("bb", "n1", true)]));
        let known: HashMap<String, String> = v
            .delta("n1", &HashMap::new())
            .upserts
            .into_iter()
            .map(|r| (r.key, r.version))
            .collect();
        let mut touched = v.apply(state(&[wl("bb", "n2", true)]));
        touched.sort();
        assert_eq!(touched, vec!["n1".to_string(), "n2".to_string()]);
        let d = v.delta("n1", &known);
        assert_eq!(
            d.removes,
            vec![
                "Peer/ns/a".to_string(),
                "Workload/ns/a".to_string(),
                "Workload/ns/bb".to_string()
            ]
        );
        assert_eq!(v.len("n2"), 1);
        // An unknown node gets told to forget the workloads it claims to have.
        assert_eq!(v.delta("n9", &known).removes.len(), 3);
    }

    #[test]
    fn services_reach_every_node_and_wake_every_stream() {
        let v = Views::default();
        let mut s = (*state(&[wl("a", "n1", true), wl("bb", "n2", true)])).clone();
        v.apply(Arc::new(s.clone()));
        let r1 = v.subscribe("n1");
        let r2 = v.subscribe("n2");
        let svc = weft_api::model::ServiceInfo {
            name: "web".into(),
            namespace: "ns".into(),
            hostname: "web.ns.svc.cluster.local".into(),
            vips: vec!["198.18.100.1".parse().expect("ip")],
            ports: vec![],
            endpoints: vec![],
            waypoint: None,
        };
        s.services.insert(svc.key(), svc);
        v.apply(Arc::new(s.clone()));
        assert!(r1.has_changed().unwrap_or(false) && r2.has_changed().unwrap_or(false));
        for node in ["n1", "n2", "n-new"] {
            let d = v.delta(node, &HashMap::new());
            assert!(
                d.upserts.iter().any(|r| r.key == "Service/ns/web"),
                "{node}"
            );
        }
        let known: HashMap<String, String> = v
            .delta("n1", &HashMap::new())
            .upserts
            .into_iter()
            .map(|r| (r.key, r.version))
            .collect();
        s.services.clear();
        v.apply(Arc::new(s));
        assert_eq!(
            v.delta("n1", &known).removes,
            vec!["Service/ns/web".to_string()]
        );
    }

    #[test]
    fn generations_wake_only_affected_nodes() {
        let v = Views::default();
        v.apply(state(&[wl("a", "n1", true), wl("bb", "n2", true)]));
        let r1 = v.subscribe("n1");
        let r2 = v.subscribe("n2");
        v.apply(state(&[
            excluding(wl("a", "n1", true), 22),
            wl("bb", "n2", true),
        ]));
        assert!(r1.has_changed().unwrap_or(false));
        assert!(!r2.has_changed().unwrap_or(true));
    }
}
