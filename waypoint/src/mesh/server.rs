//! HBONE termination: the waypoint's `--hbone-address` (port 15008).
//!
//! Node agents send the traffic of clients to a Service bound to this waypoint as HBONE: TLS
//! 1.3 to `<waypoint pod ip>:15008` with the client pod's certificate (required, chained to
//! the mesh's trust bundle, one SPIFFE ID in the mesh's trust domain), then
//! `CONNECT <service VIP>:<port>` with `Forwarded: for="<client ip>"`. Admission answers `400`
//! when the authority is not a Service port of the mesh view (the body says which part is
//! unknown) and `503` while draining or before the first mesh view. The tunnel's protocol is
//! the one the Service port's `appProtocol` declares, else detected from the client's first
//! bytes within `--protocol-detect-timeout` ([`super::detect`]); each choice counts
//! `weft_waypoint_protocol_detected_total{protocol, by}`. HTTP/1.1 or HTTP/2 is served with the
//! listener attached to that Service port, or the implicit default route to the Service itself;
//! each request carries a [`Source`] extension: the client's SPIFFE ID,
//! original address and workload. Anything else is proxied as opaque TCP ([`super::tcp`]).
//!
//! The TLS server config is built once per (certificate generation, trust bundle) and reused
//! by every connection until either changes.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use weft_api::model::ServiceInfo;
use weft_tunnel::hbone::{self, ConnectRequest, Handler, Refusal, Tunnel};

use super::detect::{self, DetectedBy, Protocol};
use super::tcp::OpaqueTcp;
use super::{MeshContext, MeshView, Svid};
use crate::layers::Source;
use crate::layers::accesslog::HttpService;
use crate::proxy::{Waypoint, accept, handle_from};

/// Binds the HBONE listener. When `address` is the IPv6 wildcard (`[::]:<port>`, the default)
/// and IPv6 is unavailable, falls back to `0.0.0.0:<port>`.
pub async fn bind_hbone(address: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(address).await {
        Ok(socket) => Ok(socket),
        Err(e) if address.ip().is_unspecified() && address.is_ipv6() && ipv6_unavailable(&e) => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), address.port());
            tracing::warn!(%address, error = %e, fallback = %v4, "IPv6 is unavailable; HBONE listens on IPv4 only");
            TcpListener::bind(v4).await
        }
        Err(e) => Err(e),
    }
}

/// Like [`bind_hbone`], `copies` sockets (`SO_REUSEPORT` when more than one: one per worker
/// thread, see [`crate::workers`]), not yet tied to a runtime.
pub fn bind_hbone_copies(
    address: SocketAddr,
    copies: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    match crate::workers::listen(address, copies) {
        Ok(sockets) => Ok(sockets),
        Err(e) if address.ip().is_unspecified() && address.is_ipv6() && ipv6_unavailable(&e) => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), address.port());
            tracing::warn!(%address, error = %e, fallback = %v4, "IPv6 is unavailable; HBONE listens on IPv4 only");
            crate::workers::listen(v4, copies)
        }
        Err(e) => Err(e),
    }
}

fn ipv6_unavailable(e: &std::io::Error) -> bool {
    // EAFNOSUPPORT (IPv6 compiled out), EADDRNOTAVAIL (disabled by sysctl).
    matches!(e.raw_os_error(), Some(97) | Some(99))
        || e.kind() == std::io::ErrorKind::AddrNotAvailable
}

struct Shared {
    waypoint: Arc<Waypoint>,
    ctx: Arc<MeshContext>,
    draining: AtomicBool,
    graceful: Mutex<Option<GracefulShutdown>>,
    /// Admitted tunnels that the HTTP graceful shutdown does not watch ([`Unwatched`]): opaque
    /// TCP, and tunnels still opening or detecting their protocol. `unwatched_closed` is notified when
    /// one ends (or is handed to HTTP).
    unwatched: AtomicUsize,
    unwatched_closed: tokio::sync::Notify,
    tls: TlsCache,
    tcp: OpaqueTcp,
}

/// Counts one tunnel in [`Shared::unwatched`] while it lives (or until it is handed to the
/// HTTP graceful shutdown), so that a drain waits for it too.
struct Unwatched(Arc<Shared>);

impl Unwatched {
    fn open(shared: &Arc<Shared>) -> Unwatched {
        shared.unwatched.fetch_add(1, Ordering::SeqCst);
        Unwatched(shared.clone())
    }
}

impl Drop for Unwatched {
    fn drop(&mut self) {
        self.0.unwatched.fetch_sub(1, Ordering::AcqRel);
        self.0.unwatched_closed.notify_waiters();
    }
}

impl Shared {
    /// Until no unwatched tunnel is open.
    async fn unwatched_closed(&self) {
        loop {
            let closed = self.unwatched_closed.notified();
            tokio::pin!(closed);
            // Registered before the count is read: a tunnel ending in between still wakes us.
            closed.as_mut().enable();
            if self.unwatched.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// The TLS server config of the last (certificate generation, trust bundle).
#[derive(Default)]
struct TlsCache {
    last: Mutex<Option<CachedTls>>,
}

struct CachedTls {
    generation: i64,
    trust_pem: Vec<String>,
    config: Arc<ServerConfig>,
}

impl TlsCache {
    /// The config for `svid` and the trust bundle in force (the view's, else the CA's), built
    /// only when either changed since the last call.
    fn get(
        &self,
        ctx: &MeshContext,
        view: &MeshView,
        svid: &Svid,
    ) -> Result<Arc<ServerConfig>, String> {
        let trust_pem = if view.trust().is_ok() {
            view.trust_pem()
        } else {
            &svid.trust_pem
        };
        let mut last = match self.last.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(cached) = last.as_ref()
            && cached.generation == svid.generation
            && cached.trust_pem == trust_pem
        {
            return Ok(cached.config.clone());
        }
        let trust = ctx.trust(view, svid).map_err(|e| e.to_string())?;
        let config = weft_tunnel::server_config(svid.chain.clone(), svid.key.clone_key(), &trust)
            .map_err(|e| e.to_string())?;
        let config = Arc::new(config);
        metrics::counter!("weft_waypoint_hbone_tls_config_builds_total").increment(1);
        *last = Some(CachedTls {
            generation: svid.generation,
            trust_pem: trust_pem.to_vec(),
            config: config.clone(),
        });
        Ok(config)
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("weft_waypoint_hbone_refused_total", "reason" => reason).increment(1);
}

/// Serves HBONE on `socket` forever.
pub async fn serve_hbone(socket: TcpListener, waypoint: Arc<Waypoint>) {
    serve_hbone_until(socket, waypoint, std::future::pending(), Duration::ZERO).await
}

/// Serves HBONE on `socket` until `shutdown` completes; then stops accepting, refuses new
/// tunnels (503), asks the HTTP connections in open tunnels to finish and waits up to `drain`
/// for them and for the open opaque TCP tunnels to close. Does nothing (logs an error) if
/// `waypoint` is not in mesh mode.
pub async fn serve_hbone_until(
    socket: TcpListener,
    waypoint: Arc<Waypoint>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let Some(ctx) = waypoint.mesh().cloned() else {
        tracing::error!("HBONE needs a waypoint in mesh mode (built with Waypoint::new_mesh)");
        return;
    };
    let shared = Arc::new(Shared {
        waypoint,
        tcp: OpaqueTcp::new(ctx.clone()),
        ctx,
        draining: AtomicBool::new(false),
        graceful: Mutex::new(Some(GracefulShutdown::new())),
        unwatched: AtomicUsize::new(0),
        unwatched_closed: tokio::sync::Notify::new(),
        tls: TlsCache::default(),
    });
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = accept(&socket, "HBONE") => accepted,
            () = &mut shutdown => break,
        };
        tokio::spawn(connection(shared.clone(), stream, peer));
    }
    shared.draining.store(true, Ordering::SeqCst);
    drop(socket);
    let graceful = match shared.graceful.lock() {
        Ok(mut g) => g.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    // Opaque TCP has no way to ask the client to finish: its open tunnels run until they
    // close or the drain time is up, while HTTP connections finish their requests.
    let http_tunnels = graceful.as_ref().map_or(0, GracefulShutdown::count);
    // Opaque TCP, and tunnels still detecting their protocol.
    let tcp_tunnels = shared.unwatched.load(Ordering::SeqCst);
    if http_tunnels + tcp_tunnels > 0 {
        tracing::info!(
            http_tunnels,
            tcp_tunnels,
            ?drain,
            "draining: HTTP tunnels finish their requests, opaque TCP tunnels run until they close"
        );
    }
    let drained = async {
        if let Some(graceful) = graceful {
            graceful.shutdown().await;
        }
        shared.unwatched_closed().await;
    };
    if tokio::time::timeout(drain, drained).await.is_err() {
        tracing::warn!(
            tcp_tunnels = shared.unwatched.load(Ordering::Acquire),
            ?drain,
            "tunnels still open after the drain timeout; closing them"
        );
    }
}

/// One HBONE connection: mutual TLS, then tunnels.
async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let fail = |reason: &'static str, detail: String| {
        refused(reason);
        tracing::warn!(%peer, reason, error = %detail, "HBONE connection refused");
    };
    if shared.draining.load(Ordering::Acquire) {
        return;
    }
    let ctx = &shared.ctx;
    let svid = match tokio::time::timeout(ctx.handshake_timeout, ctx.svid.svid()).await {
        Ok(Ok(svid)) => svid,
        Ok(Err(e)) => return fail("no_certificate", e.to_string()),
        Err(_) => {
            return fail(
                "no_certificate",
                "timed out waiting for the waypoint's certificate".into(),
            );
        }
    };
    let view = ctx.mesh.current();
    let config = match shared.tls.get(ctx, &view, &svid) {
        Ok(c) => c,
        Err(e) => return fail("no_certificate", e),
    };
    let _ = tcp.set_nodelay(true);
    let acceptor = TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(ctx.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return fail("tls_failed", e.to_string()),
        Err(_) => return fail("tls_timeout", "the TLS handshake timed out".into()),
    };
    let identity = match weft_tunnel::peer_identity(tls.get_ref().1) {
        Ok(identity) => identity,
        Err(e) => return fail("tls_peer_invalid", e.to_string()),
    };
    if identity.trust_domain().as_str() != view.trust_domain() {
        return fail(
            "tls_peer_wrong_trust_domain",
            format!(
                "the peer {identity} is not in this mesh's trust domain `{}`",
                view.trust_domain()
            ),
        );
    }
    let handler = Inbound {
        shared: shared.clone(),
        principal: identity.as_str().into(),
        peer,
    };
    if let Err(e) = hbone::serve(tls, handler).await {
        tracing::debug!(%peer, error = %e, "HBONE connection ended");
    }
}

/// Admits and serves the tunnels of one HBONE connection.
#[derive(Clone)]
struct Inbound {
    shared: Arc<Shared>,
    /// The peer's SPIFFE ID.
    principal: Arc<str>,
    peer: SocketAddr,
}

/// A tunnel admitted to a Service port.
struct Admitted {
    service: Arc<ServiceInfo>,
    port: u16,
    source: Source,
    /// Counted for the drain from admission on (before the 200 goes out).
    unwatched: Unwatched,
}

impl Handler for Inbound {
    type Admitted = Admitted;

    async fn admit(&self, req: ConnectRequest) -> Result<Admitted, Refusal> {
        let refuse = |reason: &'static str, status: StatusCode, why: String| {
            refused(reason);
            tracing::debug!(peer = %self.peer, principal = %self.principal, dst = %req.dst, reason, "tunnel refused");
            Err(Refusal::new(status, why))
        };
        // Counted before `draining` is read, and the drain sets `draining` before it reads the
        // count (both SeqCst): a tunnel admitted while the drain starts is always waited for.
        let unwatched = Unwatched::open(&self.shared);
        if self.shared.draining.load(Ordering::SeqCst) {
            return refuse(
                "draining",
                StatusCode::SERVICE_UNAVAILABLE,
                "the waypoint is draining (shutting down); retry on another waypoint pod".into(),
            );
        }
        let view = self.shared.ctx.mesh.current();
        if !view.received() {
            return refuse(
                "no_mesh_view",
                StatusCode::SERVICE_UNAVAILABLE,
                "the waypoint has no mesh view from the controller yet; retry shortly".into(),
            );
        }
        let dst = req.dst;
        let Some(service) = view.service_by_vip(dst.ip()).cloned() else {
            return refuse(
                "unknown_service",
                StatusCode::BAD_REQUEST,
                format!(
                    "{} is not the virtual IP of a Service in the mesh view: this waypoint accepts CONNECT <service VIP>:<port> for Services bound to it",
                    dst.ip()
                ),
            );
        };
        if !service.ports.iter().any(|p| p.port == dst.port()) {
            let ports: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
            return refuse(
                "unknown_port",
                StatusCode::BAD_REQUEST,
                format!(
                    "Service {} ({}) has no port {} (its ports: {})",
                    service.key(),
                    dst.ip(),
                    dst.port(),
                    ports.join(", ")
                ),
            );
        }
        let ip = req
            .forwarded_for
            .unwrap_or_else(|| self.peer.ip())
            .to_canonical();
        let source = Source {
            principal: self.principal.clone(),
            ip,
            workload: view.workload_at(ip).cloned(),
        };
        Ok(Admitted {
            service,
            port: dst.port(),
            source,
            unwatched,
        })
    }

    async fn run(&self, admitted: Admitted, tunnel: Tunnel) {
        // For an opaque connection's access log line: from the tunnel's start.
        let (start_time, start) = (std::time::SystemTime::now(), std::time::Instant::now());
        let Admitted {
            service,
            port,
            source,
            unwatched,
        } = admitted;
        let declared = service
            .ports
            .iter()
            .find(|p| p.port == port)
            .and_then(|p| detect::declared(&p.app_protocol));
        let (protocol, by, io) = match declared {
            Some(protocol) => (
                protocol,
                DetectedBy::Declared,
                detect::Rewind::new(bytes::Bytes::new(), tunnel),
            ),
            None => match detect::detect(tunnel, self.shared.ctx.protocol_detect_timeout).await {
                Ok(detected) => detected,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "tunnel failed while detecting its protocol");
                    return;
                }
            },
        };
        metrics::counter!(
            "weft_waypoint_protocol_detected_total",
            "protocol" => protocol.label(),
            "by" => by.label()
        )
        .increment(1);
        if protocol == Protocol::Tcp {
            let outcome = self.shared.tcp.proxy(io, &source, &service, port).await;
            if let Some(log) = self.shared.waypoint.access_log() {
                let entry = crate::layers::accesslog::TcpEntry::new(
                    start_time,
                    start,
                    &source,
                    service.key(),
                    port,
                    outcome,
                );
                log.write(entry.to_line());
            }
            drop(unwatched);
            return;
        }
        let waypoint = self.shared.waypoint.clone();
        let peer = SocketAddr::new(source.ip, 0);
        let log = waypoint.access_log().cloned();
        let http = HttpService::new(log, move |request| {
            let listener = waypoint.mesh_listener(&service, port);
            handle_from(listener, peer, Some(source.clone()), request)
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        let connection = builder.serve_connection(TokioIo::new(io), http);
        let watcher = match self.shared.graceful.lock() {
            Ok(g) => g.as_ref().map(GracefulShutdown::watcher),
            Err(poisoned) => poisoned
                .into_inner()
                .as_ref()
                .map(GracefulShutdown::watcher),
        };
        let result = match watcher {
            Some(watcher) => {
                // Watched by the HTTP graceful shutdown from here on.
                drop(unwatched);
                watcher.watch(connection).await
            }
            // Draining already: asked to finish at once, and waited for (up to the drain
            // time) like an opaque tunnel.
            None => {
                let _unwatched = unwatched;
                let mut connection = std::pin::pin!(connection);
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "HTTP in a tunnel ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use weft_api::MeshState;

    /// A root (PEM) and an SVID for the waypoint signed by it, with `generation`.
    fn ca_and_svid(generation: i64) -> (String, Svid) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).expect("root");
        let issuer = Issuer::new(params, key);
        let leaf_key = KeyPair::generate().expect("key");
        let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("params");
        leaf.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/waypoint"
                .try_into()
                .expect("uri"),
        )];
        let cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
        let svid = Svid::from_pem(
            &cert.pem(),
            &leaf_key.serialize_pem(),
            generation,
            Vec::new(),
        )
        .expect("svid");
        (root.pem(), svid)
    }

    fn context() -> MeshContext {
        let (_, mesh) = super::super::Mesh::fixed(&MeshState::default(), "cluster.local");
        let (_, svid) = ca_and_svid(1);
        MeshContext::new(
            "shop",
            mesh,
            Arc::new(super::super::StaticSvid(Arc::new(svid))),
        )
    }

    fn view(trust_pem: &str) -> MeshView {
        let state = MeshState {
            trust_bundle: vec![trust_pem.to_string()],
            ..MeshState::default()
        };
        MeshView::build(&state, "cluster.local")
    }

    #[test]
    fn tls_config_is_rebuilt_only_when_the_certificate_or_trust_changes() {
        let ctx = context();
        let cache = TlsCache::default();
        let (root, svid) = ca_and_svid(1);
        let first = cache.get(&ctx, &view(&root), &svid).expect("config");
        // A new view (endpoints changed) with the same bundle: the same config.
        let again = cache.get(&ctx, &view(&root), &svid).expect("config");
        assert!(Arc::ptr_eq(&first, &again));
        // A renewed certificate: a new config.
        let (_, renewed) = ca_and_svid(2);
        let after_renewal = cache.get(&ctx, &view(&root), &renewed).expect("config");
        assert!(!Arc::ptr_eq(&first, &after_renewal));
        // Another trust bundle: a new config.
        let (other_root, _) = ca_and_svid(3);
        let after_rotation = cache
            .get(&ctx, &view(&other_root), &renewed)
            .expect("config");
        assert!(!Arc::ptr_eq(&after_renewal, &after_rotation));
        assert!(Arc::ptr_eq(
            &after_rotation,
            &cache
                .get(&ctx, &view(&other_root), &renewed)
                .expect("config")
        ));
    }
}
