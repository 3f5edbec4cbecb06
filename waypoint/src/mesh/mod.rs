//! Mesh mode (`--controller`): the waypoint as an ambient-style waypoint of the mesh.
//!
//! * [`MeshView`] / [`Mesh`]: the controller's view of the mesh (services, their VIPs, ports
//!   and endpoints, workload identities, the trust bundle), indexed for the data path and
//!   published on a `tokio::sync::watch` channel. The binary feeds it from the agent library's
//!   config stream ([`weft_agent::discovery::run`]); tests feed a static
//!   [`weft_api::MeshState`] through [`Mesh::fixed`].
//! * [`Svid`] / [`SvidSource`]: the waypoint's own workload certificate, from the controller's
//!   CA through [`weft_agent::identity::CertManager`] ([`ManagedSvid`], renewed at half-life)
//!   or fixed ([`StaticSvid`], tests).
//! * [`server`]: HBONE termination on `--hbone-address` (mutual TLS 1.3, CONNECT to
//!   `<service VIP>:<port>`, HTTP served inside each tunnel with the listener attached to that
//!   Service port, or the implicit default route); or opaque TCP ([`tcp`]) when the port's
//!   `appProtocol` or the first bytes ([`detect`]) say it is not HTTP.
//! * [`forward`]: Service backends reached through HBONE (TLS to `<endpoint>:15008` requiring
//!   the endpoint workload's SPIFFE ID, `CONNECT <endpoint>:<targetPort>`), with pooled HBONE
//!   connections and HTTP connections per tunnel.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use weft_agent::identity::{CertManager, Certified};
use weft_agent::pool::Pool;
use weft_api::MeshState;
use weft_api::model::ServiceInfo;
use weft_tunnel::{Identity, TrustBundle};

use crate::layers::balance::EndpointSource;

pub mod detect;
pub mod forward;
pub mod routes;
pub mod server;
pub mod tcp;

/// The port HBONE listens on at every meshed pod (and the waypoint's default).
pub const HBONE_PORT: u16 = weft_tunnel::hbone::HBONE_PORT;

/// How long opening an HBONE connection (TCP, TLS, HTTP/2) to an endpoint may take, and how
/// long an inbound TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an HBONE connection to an endpoint stays open without tunnels.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why mesh mode cannot do something; each says what to check.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MeshError {
    /// The waypoint's own certificate is not available.
    #[error(
        "no workload certificate for the waypoint ({identity}): {detail}; check that the controller is reachable and that a workload with this identity (--namespace, --service-account) runs on --node"
    )]
    Certificate {
        /// The waypoint's SPIFFE ID.
        identity: String,
        /// Why.
        detail: String,
    },
    /// The certificate or key the CA issued cannot be used.
    #[error("the waypoint's certificate for {identity} is unusable: {detail}")]
    BadCertificate {
        /// The waypoint's SPIFFE ID.
        identity: String,
        /// Why.
        detail: String,
    },
    /// No trust bundle to verify peers with.
    #[error(
        "no trust bundle to verify peers with: {0}; the controller sends it with the mesh view"
    )]
    Trust(String),
}

static VIEW_VERSION: AtomicU64 = AtomicU64::new(1);

/// The mesh as the waypoint needs it, built once per change of the controller's view.
pub struct MeshView {
    version: u64,
    received: bool,
    trust_domain: String,
    services_by_vip: HashMap<IpAddr, Arc<ServiceInfo>>,
    services_by_key: HashMap<String, Arc<ServiceInfo>>,
    /// Workload `namespace/name` -> SPIFFE ID.
    identities: HashMap<String, Arc<str>>,
    /// Address -> workload `namespace/name`.
    workloads_by_ip: HashMap<IpAddr, Arc<str>>,
    trust: Result<Arc<TrustBundle>, String>,
    trust_pem: Vec<String>,
    /// HTTPRoutes and GRPCRoutes, in key order.
    routes: Vec<Arc<weft_api::routes::RouteInfo>>,
    /// Per Service with a waypoint: the AuthorizationPolicies targeting it there.
    policies: HashMap<String, crate::layers::authz::ServicePolicies>,
}

impl fmt::Debug for MeshView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshView")
            .field("version", &self.version)
            .field("received", &self.received)
            .field("services", &self.services_by_key.len())
            .field("workloads", &self.identities.len())
            .finish_non_exhaustive()
    }
}

impl MeshView {
    /// The view before the controller answered: no services, no trust bundle.
    pub fn empty(trust_domain: &str) -> Self {
        MeshView {
            version: VIEW_VERSION.fetch_add(1, Ordering::Relaxed),
            received: false,
            trust_domain: trust_domain.to_string(),
            services_by_vip: HashMap::new(),
            services_by_key: HashMap::new(),
            identities: HashMap::new(),
            workloads_by_ip: HashMap::new(),
            trust: Err("the controller has not sent the mesh view yet".into()),
            trust_pem: Vec::new(),
            routes: Vec::new(),
            policies: HashMap::new(),
        }
    }

    /// Indexes `state`; identities are `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`.
    pub fn build(state: &MeshState, trust_domain: &str) -> Self {
        let mut view = MeshView::empty(trust_domain);
        view.received = true;
        for w in state.workloads.values() {
            let key: Arc<str> = w.key().into();
            let id = format!(
                "spiffe://{trust_domain}/ns/{}/sa/{}",
                w.namespace, w.service_account
            );
            view.identities.insert(key.to_string(), id.into());
            for ip in w
                .ip4
                .map(IpAddr::V4)
                .into_iter()
                .chain(w.ip6.map(IpAddr::V6))
            {
                view.workloads_by_ip.insert(ip, key.clone());
            }
        }
        for s in state.services.values() {
            let s = Arc::new(s.clone());
            for vip in &s.vips {
                view.services_by_vip.insert(vip.to_canonical(), s.clone());
            }
            view.services_by_key.insert(s.key(), s);
        }
        view.routes = state.routes.values().cloned().map(Arc::new).collect();
        for s in state.services.values().filter(|s| s.waypoint.is_some()) {
            view.policies.insert(
                s.key(),
                crate::layers::authz::ServicePolicies::for_service(state.policies.values(), s),
            );
        }
        view.trust_pem = state.trust_bundle.clone();
        view.trust = if state.trust_bundle.is_empty() {
            Err("the mesh view carries no trust bundle".into())
        } else {
            TrustBundle::from_pems(state.trust_bundle.iter().map(String::as_bytes))
                .map(Arc::new)
                .map_err(|e| format!("the mesh view's trust bundle does not parse: {e}"))
        };
        view
    }

    /// Changes with every view (unique per process).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether this view came from the controller (false before its first answer).
    pub fn received(&self) -> bool {
        self.received
    }

    /// The trust domain identities are built in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Service with virtual IP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<ServiceInfo>> {
        self.services_by_vip.get(&ip.to_canonical())
    }

    /// The Service `namespace/name`.
    pub fn service(&self, key: &str) -> Option<&Arc<ServiceInfo>> {
        self.services_by_key.get(key)
    }

    /// `namespace/name` of the workload with address `ip`.
    pub fn workload_at(&self, ip: IpAddr) -> Option<&Arc<str>> {
        self.workloads_by_ip.get(&ip.to_canonical())
    }

    /// The SPIFFE ID of workload `namespace/name`.
    pub fn identity_of(&self, workload: &str) -> Option<&Arc<str>> {
        self.identities.get(workload)
    }

    /// The roots peers' certificates must chain to.
    pub fn trust(&self) -> Result<Arc<TrustBundle>, String> {
        self.trust.clone()
    }

    /// The AuthorizationPolicies the waypoint enforces for Service `key` (`None`: the Service
    /// has no waypoint).
    pub fn policies_for(&self, key: &str) -> Option<&crate::layers::authz::ServicePolicies> {
        self.policies.get(key)
    }

    /// The HTTPRoutes and GRPCRoutes of the mesh, in key order.
    pub fn routes(&self) -> &[Arc<weft_api::routes::RouteInfo>] {
        &self.routes
    }

    /// The trust bundle as sent by the controller (PEM), to notice changes.
    pub fn trust_pem(&self) -> &[String] {
        &self.trust_pem
    }

    /// The ready endpoints of Service `key` for its port `port`: each endpoint's address with
    /// the port mapped to the port's `targetPort`, and the SPIFFE ID its workload must present.
    /// Endpoints whose workload is not in the view (so whose identity is unknown) are left out.
    pub fn endpoints(&self, key: &str, port: u16) -> Vec<(SocketAddr, Option<Arc<str>>)> {
        let Some(service) = self.services_by_key.get(key) else {
            return Vec::new();
        };
        let Some(target) = service
            .ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port)
        else {
            return Vec::new();
        };
        service
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| {
                let ip = e.ip4.map(IpAddr::V4).or(e.ip6.map(IpAddr::V6))?;
                match self.identities.get(&e.workload) {
                    Some(id) => Some((SocketAddr::new(ip, target), Some(id.clone()))),
                    None => {
                        tracing::debug!(service = key, workload = %e.workload, "endpoint without a known workload identity left out");
                        None
                    }
                }
            })
            .collect()
    }
}

/// The current mesh view, shared by every part of the waypoint (cheap to clone).
#[derive(Clone)]
pub struct Mesh {
    rx: watch::Receiver<Arc<MeshView>>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Mesh").field(&*self.current()).finish()
    }
}

impl Mesh {
    /// Views published on `rx`.
    pub fn new(rx: watch::Receiver<Arc<MeshView>>) -> Self {
        Mesh { rx }
    }

    /// A mesh fed by hand (tests, fixed setups): publish new views on the returned sender.
    pub fn fixed(state: &MeshState, trust_domain: &str) -> (watch::Sender<Arc<MeshView>>, Mesh) {
        let (tx, rx) = watch::channel(Arc::new(MeshView::build(state, trust_domain)));
        (tx, Mesh { rx })
    }

    /// Follows the config stream's states (`None` until the first one), indexing each.
    /// Must be called inside a tokio runtime.
    pub fn follow(mut states: watch::Receiver<Option<Arc<MeshState>>>, trust_domain: &str) -> Mesh {
        let (tx, rx) = watch::channel(Arc::new(MeshView::empty(trust_domain)));
        let trust_domain = trust_domain.to_string();
        tokio::spawn(async move {
            loop {
                let state = states.borrow_and_update().clone();
                if let Some(state) = state {
                    let view = MeshView::build(&state, &trust_domain);
                    tracing::debug!(services = view.services_by_key.len(), "mesh view updated");
                    tx.send_replace(Arc::new(view));
                }
                if states.changed().await.is_err() {
                    return;
                }
            }
        });
        Mesh { rx }
    }

    /// The view in force.
    pub fn current(&self) -> Arc<MeshView> {
        self.rx.borrow().clone()
    }

    /// A receiver of every new view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshView>> {
        self.rx.clone()
    }
}

/// The ready endpoints of a Service port in the current view (a mesh backend's endpoints).
#[derive(Debug)]
pub struct ServiceEndpoints {
    mesh: Mesh,
    /// `namespace/name`.
    key: String,
    port: u16,
}

impl ServiceEndpoints {
    /// Endpoints of Service `key` (`namespace/name`), port `port`.
    pub fn new(mesh: Mesh, key: String, port: u16) -> Self {
        ServiceEndpoints { mesh, key, port }
    }
}

impl EndpointSource for ServiceEndpoints {
    fn version(&self) -> u64 {
        self.mesh.current().version()
    }

    fn resolve(&self) -> Vec<(SocketAddr, Option<Arc<str>>)> {
        self.mesh.current().endpoints(&self.key, self.port)
    }
}

/// A workload certificate (SVID) with its key, ready for TLS.
pub struct Svid {
    /// The SPIFFE ID it proves.
    pub identity: Identity,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// Changes with every new certificate (its expiry, Unix seconds): pooled connections are
    /// per generation, so a renewed certificate is used by new connections.
    pub generation: i64,
    /// The roots the CA sent with the certificate (used when the view has none).
    pub trust_pem: Vec<String>,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("identity", &self.identity)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// An SVID from PEM text (chain leaf first, PKCS#8 key).
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        generation: i64,
        trust_pem: Vec<String>,
    ) -> Result<Svid, MeshError> {
        let bad = |detail: String| MeshError::BadCertificate {
            identity: "?".into(),
            detail,
        };
        let chain =
            weft_tunnel::certs_from_pem(chain_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad("no certificate in the chain".into()))?;
        let identity = weft_tunnel::identity_of(leaf).map_err(|e| bad(e.to_string()))?;
        let key = weft_tunnel::private_key_from_pem(key_pem.as_bytes()).map_err(|e| {
            MeshError::BadCertificate {
                identity: identity.to_string(),
                detail: e.to_string(),
            }
        })?;
        Ok(Svid {
            identity,
            chain,
            key,
            generation,
            trust_pem,
        })
    }
}

/// A boxed future borrowing its source.
pub type SvidFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<Svid>, MeshError>> + Send + 'a>>;

/// Where the waypoint's certificate comes from.
pub trait SvidSource: Send + Sync + 'static {
    /// The current certificate (obtained now if there is none yet).
    fn svid(&self) -> SvidFuture<'_>;
}

/// A fixed certificate (tests).
pub struct StaticSvid(pub Arc<Svid>);

impl SvidSource for StaticSvid {
    fn svid(&self) -> SvidFuture<'_> {
        let svid = self.0.clone();
        Box::pin(async move { Ok(svid) })
    }
}

/// The certificate of `identity` from a [`CertManager`] (the controller's CA), which renews
/// it at half-life; converted for TLS once per certificate.
pub struct ManagedSvid {
    certs: Arc<CertManager>,
    identity: String,
    converted: Mutex<Option<(Arc<Certified>, Arc<Svid>)>>,
}

impl ManagedSvid {
    /// The certificate of `identity` (a SPIFFE ID) from `certs`.
    pub fn new(certs: Arc<CertManager>, identity: String) -> Self {
        ManagedSvid {
            certs,
            identity,
            converted: Mutex::new(None),
        }
    }
}

impl SvidSource for ManagedSvid {
    fn svid(&self) -> SvidFuture<'_> {
        Box::pin(async move {
            let cert =
                self.certs
                    .get(&self.identity)
                    .await
                    .map_err(|e| MeshError::Certificate {
                        identity: self.identity.clone(),
                        detail: e.to_string(),
                    })?;
            let mut converted = match self.converted.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some((from, svid)) = converted.as_ref()
                && Arc::ptr_eq(from, &cert)
            {
                return Ok(svid.clone());
            }
            let svid = Svid::from_pem(
                &cert.chain_pem.concat(),
                &cert.key_pem,
                cert.not_after,
                cert.trust_bundle_pem.clone(),
            )
            .map_err(|e| MeshError::BadCertificate {
                identity: self.identity.clone(),
                detail: e.to_string(),
            })?;
            let svid = Arc::new(svid);
            *converted = Some((cert, svid.clone()));
            Ok(svid)
        })
    }
}

/// Everything mesh mode needs, shared by the HBONE server and the Service backends.
pub struct MeshContext {
    /// The waypoint's namespace: listeners and backends name Services in it.
    pub namespace: String,
    /// The mesh view.
    pub mesh: Mesh,
    /// The waypoint's certificate.
    pub svid: Arc<dyn SvidSource>,
    /// HBONE connections to endpoints, per (destination, expected identity, certificate).
    pub pool: Arc<Pool>,
    /// TCP + TLS + HTTP/2 handshake limit toward endpoints; TLS handshake limit inbound.
    pub handshake_timeout: Duration,
    /// The port endpoints' HBONE listens on (15008).
    pub hbone_port: u16,
    /// How long a tunnel of a port without a declared protocol waits for the client's first
    /// bytes before it is served as opaque TCP (`--protocol-detect-timeout`).
    pub protocol_detect_timeout: Duration,
}

impl fmt::Debug for MeshContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshContext")
            .field("namespace", &self.namespace)
            .field("hbone_port", &self.hbone_port)
            .finish_non_exhaustive()
    }
}

impl MeshContext {
    /// A context with the default port and timeouts.
    pub fn new(namespace: &str, mesh: Mesh, svid: Arc<dyn SvidSource>) -> Self {
        MeshContext {
            namespace: namespace.to_string(),
            mesh,
            svid,
            pool: Pool::new(POOL_IDLE_TIMEOUT),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            hbone_port: HBONE_PORT,
            protocol_detect_timeout: detect::DEFAULT_DETECT_TIMEOUT,
        }
    }

    /// The roots to verify peers with: the view's, else those the CA sent with `svid`.
    pub fn trust(&self, view: &MeshView, svid: &Svid) -> Result<Arc<TrustBundle>, MeshError> {
        match view.trust() {
            Ok(t) => Ok(t),
            Err(from_view) if !svid.trust_pem.is_empty() => {
                TrustBundle::from_pems(svid.trust_pem.iter().map(String::as_bytes))
                    .map(Arc::new)
                    .map_err(|e| MeshError::Trust(format!("{from_view}; and the CA's: {e}")))
            }
            Err(e) => Err(MeshError::Trust(e)),
        }
    }
}

/// `<name>.<namespace>.svc.cluster.local` and the shorter names clients in the cluster use
/// for a Service (`<name>.<namespace>.svc`, `<name>.<namespace>`, `<name>`).
pub fn service_hostnames(name: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{name}.{namespace}.svc.cluster.local"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}"),
        name.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::WorkloadInfo;
    use weft_api::model::{EndpointInfo, ServicePort};

    fn workload(name: &str, sa: &str, ip: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
            node: "n1".into(),
            ip4: ip.parse().ok(),
            ip6: None,
            netns: "/x".into(),
            labels: Default::default(),
            capture: Default::default(),
        }
    }

    fn endpoint(workload: &str, ip: &str, ready: bool) -> EndpointInfo {
        EndpointInfo {
            workload: workload.into(),
            ip4: ip.parse().ok(),
            ip6: None,
            ready,
        }
    }

    #[test]
    fn view_maps_vips_endpoints_and_identities() {
        let mut state = MeshState::default();
        for w in [
            workload("r1", "reviews", "10.0.0.1"),
            workload("r2", "reviews", "10.0.0.2"),
        ] {
            state.workloads.insert(w.key(), w);
        }
        let svc = ServiceInfo {
            name: "reviews".into(),
            namespace: "shop".into(),
            hostname: "reviews.shop.svc.cluster.local".into(),
            vips: vec!["10.96.0.10".parse().expect("vip")],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 9080,
                target_port: 8080,
                app_protocol: String::new(),
            }],
            endpoints: vec![
                endpoint("shop/r1", "10.0.0.1", true),
                endpoint("shop/r2", "10.0.0.2", false),
                endpoint("shop/gone", "10.0.0.3", true),
            ],
            waypoint: None,
        };
        state.services.insert(svc.key(), svc);
        let view = MeshView::build(&state, "cluster.local");
        assert!(view.received());
        let vip: IpAddr = "::ffff:10.96.0.10".parse().expect("v4-mapped");
        assert_eq!(
            view.service_by_vip(vip).map(|s| s.key()),
            Some("shop/reviews".to_string())
        );
        // Ready endpoints with a known workload, at the target port, with their identity.
        let endpoints = view.endpoints("shop/reviews", 9080);
        assert_eq!(
            endpoints,
            vec![(
                "10.0.0.1:8080".parse().expect("addr"),
                Some("spiffe://cluster.local/ns/shop/sa/reviews".into())
            )]
        );
        assert!(view.endpoints("shop/reviews", 80).is_empty());
        assert_eq!(
            view.workload_at("10.0.0.2".parse().expect("ip"))
                .map(|w| w.to_string()),
            Some("shop/r2".to_string())
        );
        assert!(view.trust().is_err(), "no trust bundle in this state");
        assert!(!MeshView::empty("cluster.local").received());
    }
}
