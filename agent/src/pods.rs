//! Enrolment: the one place that turns the desired state (which pods on this node are meshed)
//! into kernel state (map entries, sk_lookup links) and listeners. Single mutator, like
//! ztunnel's state updates: everything goes through [`PodManager::reconcile`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::task::AbortHandle;
use weft_api::{MeshState, WorkloadInfo};
use weft_ebpf_common::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};
use weft_netns::NetNs;

use crate::capture::{Capture, CaptureError, PodCapture};
use crate::events::EventLog;
use crate::mesh::{View, spiffe_id};
use crate::proxy::{self, PodMeta, Port, ProxyContext};

/// Why a pod could not be enrolled. It is retried on the next reconcile.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("pod {pod}: {source}")]
    NetNs {
        pod: String,
        source: weft_netns::NetNsError,
    },
    #[error(
        "pod {pod}: cannot listen on port {port} inside its network namespace: {source} (is another agent or process using it?)"
    )]
    Listen {
        pod: String,
        port: u16,
        source: std::io::Error,
    },
    #[error(
        "pod {pod}: the configuration does not say where its network namespace is (Kubernetes mode does not publish it yet: the agent cannot enrol such pods)"
    )]
    NoNetNs { pod: String },
    #[error(transparent)]
    Capture(Box<CaptureError>),
}

impl From<CaptureError> for EnrolError {
    fn from(e: CaptureError) -> Self {
        Self::Capture(Box::new(e))
    }
}

/// A pod the agent currently serves.
struct Enrolled {
    capture: PodCapture,
    netns_path: std::path::PathBuf,
    /// (device, inode) of the namespace when enrolled: a namespace recreated at the same path
    /// is a different pod sandbox and must be enrolled afresh.
    netns_id: (u64, u64),
    /// Accept loops, with the listener each serves.
    tasks: Vec<(Port, AbortHandle)>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        for (_, t) in &self.tasks {
            t.abort();
        }
    }
}

/// What `/config_dump` shows about one pod.
#[derive(Clone, Debug, Serialize)]
pub struct PodStatus {
    pub pod_id: u32,
    pub name: String,
    pub netns: String,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    pub opted_out: bool,
    pub exclusions: weft_api::Exclusions,
}

/// Enrols and unenrols this node's pods.
pub struct PodManager {
    node: String,
    capture: Arc<Mutex<Capture>>,
    ctx: Arc<ProxyContext>,
    events: Arc<EventLog>,
    runtime: tokio::runtime::Handle,
    pods: BTreeMap<String, Enrolled>,
    /// Services known from the last state (the data path balances over them from its own
    /// snapshot, [`crate::mesh::View`]; kept here for `/config_dump`).
    services: Vec<weft_api::model::ServiceInfo>,
    /// AuthorizationPolicies from the last state (enforced by the data path from its snapshot;
    /// kept here to notice changes and for `/config_dump`).
    policies: Vec<weft_api::model::PolicyInfo>,
    /// Roots workload certificates chain to (from the controller).
    trust_bundle: Vec<String>,
    errors: BTreeMap<String, String>,
    next_id: u32,
    trust_domain: String,
    /// Close live connections a policy change no longer allows.
    close_denied: bool,
    /// The state the data path's snapshot was built from: the once-a-second retry of failed
    /// enrolments reuses the snapshot instead of rebuilding it (O(workloads of the mesh)).
    applied: Option<Arc<MeshState>>,
}

impl PodManager {
    pub fn new(
        node: String,
        capture: Arc<Mutex<Capture>>,
        ctx: Arc<ProxyContext>,
        events: Arc<EventLog>,
        runtime: tokio::runtime::Handle,
        trust_domain: String,
        close_denied: bool,
    ) -> Self {
        Self {
            node,
            capture,
            ctx,
            events,
            runtime,
            pods: BTreeMap::new(),
            services: Vec::new(),
            policies: Vec::new(),
            trust_bundle: Vec::new(),
            errors: BTreeMap::new(),
            next_id: 1,
            trust_domain,
            close_denied,
            applied: None,
        }
    }

    /// Brings kernel state and listeners in line with `state`. Pods that fail are reported
    /// (and retried next time); the others are unaffected.
    pub fn reconcile(&mut self, state: &Arc<MeshState>) {
        if !self.applied.as_ref().is_some_and(|a| Arc::ptr_eq(a, state)) {
            self.apply_snapshot(state);
            self.applied = Some(state.clone());
        }
        self.reconcile_pods(state);
    }

    /// Everything derived from a new state that is not a pod: services, policies and the
    /// data path's snapshot (then live connections are checked against it).
    fn apply_snapshot(&mut self, state: &MeshState) {
        if !self.services.iter().eq(state.services.values()) {
            self.services = state.services.values().cloned().collect();
        }
        if self.trust_bundle != state.trust_bundle {
            self.trust_bundle = state.trust_bundle.clone();
        }
        let policies_changed = !self.policies.iter().eq(state.policies.values());
        if policies_changed {
            self.policies = state.policies.values().cloned().collect();
        }
        // The data path's snapshot first, so a pod enrolled below is known to it; then live
        // connections are checked against it (published first: a connection admitted
        // concurrently re-checks when it sees the snapshot changed under it).
        let view = View::build(state, &self.node, &self.trust_domain);
        let local_changed = self.ctx.view.get().local != view.local;
        let endpoints: std::collections::HashSet<IpAddr> = view
            .services
            .values()
            .flat_map(|s| s.endpoints.iter())
            .flat_map(|e| {
                e.ip4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(e.ip6.map(IpAddr::V6))
            })
            .collect();
        self.ctx.lb.retain(|ip| endpoints.contains(ip));
        let view = self.ctx.view.set(view);
        if (policies_changed || local_changed) && self.close_denied {
            let closed = self.ctx.conns.enforce(&view.policies, &view.local);
            if closed > 0 {
                tracing::info!(
                    closed,
                    "configuration change: closed live connections it no longer allows"
                );
            }
        }
    }

    /// Enrols, updates and unenrols this node's pods to match `state`.
    fn reconcile_pods(&mut self, state: &MeshState) {
        let node = self.node.clone();
        let desired: BTreeMap<String, &WorkloadInfo> = state
            .workloads_on_node(&node)
            .filter(|w| w.capture.namespace_meshed)
            // A waypoint pod serves HBONE (15008) itself: no agent listeners in its netns.
            .filter(|w| !w.labels.contains_key(weft_api::labels::WAYPOINT))
            .map(|w| (w.key(), w))
            .collect();

        // Unenrol first: stale pods, and pods whose network namespace or addresses changed.
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, p)| match desired.get(*k) {
                None => true,
                Some(w) => {
                    p.netns_path != w.netns
                        || p.capture.ip4 != w.ip4
                        || p.capture.ip6 != w.ip6
                        || netns_id(&w.netns) != Some(p.netns_id)
                }
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.unenrol(&key);
        }
        self.errors.retain(|k, _| desired.contains_key(k));

        for (key, w) in desired {
            let result = match self.pods.get(&key) {
                Some(p) => {
                    let next = PodCapture {
                        opted_out: w.capture.opted_out,
                        exclusions: w.capture.exclusions.clone(),
                        ..p.capture.clone()
                    };
                    if next == p.capture {
                        continue;
                    }
                    self.update(&key, next)
                }
                None => self.enrol(w),
            };
            match result {
                Ok(()) => {
                    self.errors.remove(&key);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.errors.get(&key) != Some(&msg) {
                        tracing::error!(pod = %key, error = %msg, "enrolment failed; will retry");
                    }
                    self.errors.insert(key, msg);
                }
            }
        }
        metrics::gauge!("weft_enrolled_pods").set(self.pods.len() as f64);
        metrics::gauge!("weft_enrolment_errors").set(self.errors.len() as f64);
    }

    fn lock_capture(&self) -> std::sync::MutexGuard<'_, Capture> {
        match self.capture.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        }
    }

    fn update(&mut self, key: &str, next: PodCapture) -> Result<(), EnrolError> {
        let Some(pod) = self.pods.get(key) else {
            return Ok(());
        };
        let prev = pod.capture.clone();
        self.lock_capture().upsert_pod(&next, Some(&prev))?;
        tracing::info!(pod = %key, opted_out = next.opted_out, exclusions = ?next.exclusions, "capture settings updated");
        if let Some(pod) = self.pods.get_mut(key) {
            pod.capture = next;
        }
        Ok(())
    }

    fn enrol(&mut self, w: &WorkloadInfo) -> Result<(), EnrolError> {
        let name = w.key();
        if w.netns.as_os_str().is_empty() {
            return Err(EnrolError::NoNetNs { pod: name });
        }
        let netns = NetNs::open(&w.netns).map_err(|source| EnrolError::NetNs {
            pod: name.clone(),
            source,
        })?;
        let file_id = {
            use std::os::unix::fs::MetadataExt as _;
            netns
                .file()
                .metadata()
                .map(|m| (m.dev(), m.ino()))
                .unwrap_or((0, 0))
        };
        let netns_cookie = netns.cookie().map_err(|source| EnrolError::NetNs {
            pod: name.clone(),
            source,
        })?;
        let listen = |port| {
            proxy::listen_in(&self.ctx.home, &netns, port).map_err(|source| EnrolError::Listen {
                pod: name.clone(),
                port,
                source,
            })
        };
        let outbound = listen(PORT_OUTBOUND)?;
        let inbound = listen(PORT_INBOUND)?;
        let hbone = listen(PORT_HBONE)?;
        let pod_id = self.allocate_id();
        let capture = PodCapture {
            pod_id,
            name: name.clone(),
            netns_cookie,
            ip4: w.ip4,
            ip6: w.ip6,
            opted_out: w.capture.opted_out,
            exclusions: w.capture.exclusions.clone(),
        };
        {
            let mut cap = self.lock_capture();
            // Listener registered and sk_lookup attached before the pod appears in the maps,
            // so no connection is ever steered to a socket that does not exist yet.
            let attached = cap
                .attach_inbound(&capture, &netns, &inbound)
                .and_then(|()| cap.upsert_pod(&capture, None));
            if let Err(e) = attached {
                cap.remove_pod(&capture);
                return Err(e.into());
            }
        }
        let meta = Arc::new(PodMeta {
            pod_id,
            name: name.clone(),
            namespace: w.namespace.clone(),
            identity: spiffe_id(&self.trust_domain, &w.namespace, &w.service_account),
            netns,
            netns_cookie,
            ips: w
                .ip4
                .map(IpAddr::V4)
                .into_iter()
                .chain(w.ip6.map(IpAddr::V6))
                .collect(),
        });
        let _guard = self.runtime.enter();
        let mut tasks = Vec::new();
        for (listener, port, number) in [
            (outbound, Port::Outbound, PORT_OUTBOUND),
            (inbound, Port::Inbound, PORT_INBOUND),
            (hbone, Port::Hbone, PORT_HBONE),
        ] {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => tasks.push((
                    port,
                    self.runtime
                        .spawn(proxy::accept_loop(l, meta.clone(), self.ctx.clone(), port))
                        .abort_handle(),
                )),
                Err(source) => {
                    for (_, t) in &tasks {
                        t.abort();
                    }
                    self.lock_capture().remove_pod(&capture);
                    return Err(EnrolError::Listen {
                        pod: name.clone(),
                        port: number,
                        source,
                    });
                }
            }
        }
        self.events.set_pod_name(pod_id, Some(name.clone()));
        tracing::info!(pod = %name, pod_id, netns_cookie, opted_out = capture.opted_out, "pod enrolled");
        self.pods.insert(
            name,
            Enrolled {
                capture,
                netns_path: w.netns.clone(),
                netns_id: file_id,
                tasks,
            },
        );
        Ok(())
    }

    fn unenrol(&mut self, key: &str) {
        if let Some(pod) = self.pods.remove(key) {
            // Map entries go first: capture stops before the listeners close.
            self.lock_capture().remove_pod(&pod.capture);
            self.events.set_pod_name(pod.capture.pod_id, None);
            tracing::info!(pod = %key, "pod unenrolled");
            drop(pod);
        }
    }

    /// Graceful drain: new connections are refused while live ones finish. The outbound
    /// listeners close (a new captured connect is refused by the kernel); the inbound ones stay
    /// open and refuse (reset, or `503` on a tunnel): closing them would empty the sk_lookup
    /// socket map, and inbound connections would then reach the applications directly,
    /// skipping STRICT mode and the policies.
    pub fn stop_accepting(&mut self) {
        self.ctx
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
        for p in self.pods.values_mut() {
            p.tasks.retain(|(port, t)| {
                let outbound = *port == Port::Outbound;
                if outbound {
                    t.abort();
                }
                !outbound
            });
        }
    }

    /// Unenrols everything (shutdown).
    pub fn clear(&mut self) {
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for k in keys {
            self.unenrol(&k);
        }
    }

    fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if id != u32::MAX && !self.pods.values().any(|p| p.capture.pod_id == id) {
                return id;
            }
        }
    }

    /// Number of trusted roots, for `/config_dump`.
    pub fn trust_roots(&self) -> usize {
        self.trust_bundle.len()
    }

    /// AuthorizationPolicies from the current state, for `/config_dump`.
    pub fn policies(&self) -> Vec<weft_api::model::PolicyInfo> {
        self.policies.clone()
    }

    /// Services from the current state, for `/config_dump`.
    pub fn services(&self) -> Vec<weft_api::model::ServiceInfo> {
        self.services.clone()
    }

    /// Current pods, for `/config_dump`.
    pub fn status(&self) -> (Vec<PodStatus>, BTreeMap<String, String>) {
        let pods = self
            .pods
            .values()
            .map(|p| PodStatus {
                pod_id: p.capture.pod_id,
                name: p.capture.name.clone(),
                netns: p.netns_path.display().to_string(),
                netns_cookie: p.capture.netns_cookie,
                ips: p
                    .capture
                    .ip4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(p.capture.ip6.map(IpAddr::V6))
                    .collect(),
                opted_out: p.capture.opted_out,
                exclusions: p.capture.exclusions.clone(),
            })
            .collect();
        (pods, self.errors.clone())
    }
}

/// (device, inode) of the namespace file at `path`, or `None` if it is gone.
fn netns_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}
