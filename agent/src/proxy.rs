//! The data path for captured connections.
//!
//! Outbound: the application's connect was rewritten to `<pod ip>:15001`; the agent accepts it
//! inside the pod's network namespace and recovers the original destination. A Service virtual
//! IP becomes one of its ready endpoints (power of two choices over EWMA latency, [`crate::lb`]).
//! A meshed destination is reached through an HBONE tunnel (HTTP/2 CONNECT over mutual TLS 1.3)
//! to its port 15008, pooled per (source identity, destination pod) ([`crate::pool`]); any other
//! destination is passed through in plaintext (unless passthrough is denied). Every upstream
//! socket is opened from the pod's namespace (so it leaves with the pod's address) and marked so
//! the kernel programs let it through.
//!
//! Inbound: tunnels arrive on `<pod ip>:15008` (the agent listens inside each pod's namespace);
//! the peer's certificate names its identity, AuthorizationPolicies decide, and the agent
//! connects to the application from inside the pod. Plaintext steered to 15006 by sk_lookup (a
//! client outside the mesh) is refused for `strict` workloads, else authorized by address.
//!
//! Without a certificate authority (local configuration mode) mutual TLS is off: meshed
//! destinations are reached in plaintext, through the destination's 15006.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_netns::NetNs;
use weft_tunnel::hbone::{self, Client, ConnectRequest, Handler, Refusal, Tunnel};
use weft_tunnel::{Identity, TrustBundle, VerifyError};

use weft_ebpf_common::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};

use crate::capture::OrigDstMap;
use crate::conns::{Connections, Registration, Subject};
use crate::identity::{CertManager, Certified};
use crate::lb::{self, Balancer};
use crate::mesh::{Peer, SharedView, View};
use crate::policy::{self, Source, Verdict};
use crate::pool::{Lease, Pool, PoolKey};

/// Shared by every pod's accept loops.
pub struct ProxyContext {
    /// The agent's own network namespace (every runtime thread lives there).
    pub home: NetNs,
    pub orig: Arc<OrigDstMap>,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    /// The mesh as the data path sees it.
    pub view: SharedView,
    /// Workload certificates; `None`: no CA, mutual TLS off.
    pub certs: Option<Arc<CertManager>>,
    pub pool: Arc<Pool>,
    pub lb: Balancer,
    pub conns: Arc<Connections>,
    /// Whether plaintext to destinations outside the mesh is allowed.
    pub passthrough: bool,
    /// Set on SIGTERM: new tunnels are refused while live connections finish.
    pub draining: AtomicBool,
    /// This mesh's SPIFFE trust domain: tunnel peers from any other are refused.
    pub trust_domain: String,
}

impl ProxyContext {
    fn mtls(&self) -> bool {
        self.certs.is_some()
    }
}

/// What the data path knows about one enrolled pod.
#[derive(Debug)]
pub struct PodMeta {
    pub pod_id: u32,
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    /// SPIFFE ID.
    pub identity: String,
    pub netns: NetNs,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
}

/// Why a connection was refused before any byte was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum RejectReason {
    #[error(
        "connection to the outbound port came from {peer}, which is not pod {pod}'s own address: only captured connections may use port 15001"
    )]
    ForeignPeer { peer: SocketAddr, pod: String },
    #[error(
        "no original destination recorded for {peer} (not a captured connection, or it closed before the agent accepted it)"
    )]
    NoOriginalDestination { peer: SocketAddr },
    #[error(
        "connecting to {dst} failed: {source} (is the destination listening and reachable from pod {pod}?)"
    )]
    Connect {
        dst: SocketAddr,
        pod: String,
        source: io::Error,
    },
    #[error(
        "connecting to {dst} timed out after {after:?} (is the destination reachable from pod {pod}?)"
    )]
    ConnectTimeout {
        dst: SocketAddr,
        pod: String,
        after: Duration,
    },
    #[error("cannot create a socket in pod {pod}'s network namespace: {detail}")]
    Socket { pod: String, detail: String },
    #[error(
        "{peer} connected to the agent's own port {dst} directly; only captured connections are served there"
    )]
    AgentPort { peer: SocketAddr, dst: SocketAddr },
    #[error("service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error(
        "service {service} has no ready endpoint with an address of the destination's family (are its pods ready?)"
    )]
    NoHealthyEndpoint { service: String },
    #[error(
        "service {service} is bound to waypoint {waypoint}, which has no ready pod with an address of the destination's family (deploy it with `weftctl waypoint deploy`, or check its pods; traffic never bypasses a waypoint)"
    )]
    NoWaypoint { service: String, waypoint: String },
    #[error(
        "service {service} is bound to waypoint {waypoint}, but mutual TLS is off on this agent (no certificate authority): waypoints are reached only through HBONE"
    )]
    WaypointNeedsMtls { service: String, waypoint: String },
    #[error(
        "{dst} is outside the mesh and plaintext passthrough is denied (--outbound-passthrough=deny)"
    )]
    PassthroughDenied { dst: SocketAddr },
    #[error("no certificate for {identity}: {detail}")]
    Certificate { identity: String, detail: String },
    #[error("mutual TLS with {dst} (expected {expected}) failed: {detail}")]
    Tls {
        dst: SocketAddr,
        expected: String,
        detail: String,
        /// Stable label of the verification failure, when it was one.
        kind: &'static str,
    },
    #[error("the HBONE tunnel to {dst} could not be opened: {detail}")]
    Tunnel { dst: SocketAddr, detail: String },
    #[error("the destination's agent refused the tunnel to {dst}: {status} {reason}")]
    Refused {
        dst: SocketAddr,
        status: u16,
        reason: String,
    },
    #[error(
        "plaintext from {peer} refused: workload {workload} accepts only mutual TLS (weft.dev/mtls: strict)"
    )]
    StrictMtls { peer: SocketAddr, workload: String },
    #[error("{0}")]
    Denied(String),
    #[error("workload {0} is not in the agent's current configuration")]
    UnknownWorkload(String),
    #[error("the agent is draining (shutting down) and takes no new connections")]
    Draining,
    #[error(
        "the certificate {peer} proved its identity with on this connection expired at {not_after} (Unix): open a new connection with the renewed certificate"
    )]
    PeerExpired { peer: String, not_after: i64 },
}

impl RejectReason {
    /// Short, stable label for metrics and access logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ForeignPeer { .. } => "foreign_peer",
            Self::NoOriginalDestination { .. } => "no_original_destination",
            Self::Connect { .. } => "connect_failed",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Socket { .. } => "socket_error",
            Self::AgentPort { .. } => "agent_port",
            Self::NoServicePort { .. } => "no_service_port",
            Self::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            Self::NoWaypoint { .. } => "no_waypoint",
            Self::WaypointNeedsMtls { .. } => "waypoint_needs_mtls",
            Self::PassthroughDenied { .. } => "passthrough_denied",
            Self::Certificate { .. } => "no_certificate",
            Self::Tls { kind, .. } => kind,
            Self::Tunnel { .. } => "tunnel_failed",
            Self::Refused { status: 403, .. } => "denied_by_destination",
            Self::Refused { .. } => "refused_by_destination",
            Self::StrictMtls { .. } => "plaintext_refused",
            Self::Denied(_) => "policy_denied",
            Self::UnknownWorkload(_) => "unknown_workload",
            Self::Draining => "draining",
            Self::PeerExpired { .. } => "tls_peer_expired",
        }
    }

    /// Envoy-style response flag.
    fn flag(&self) -> &'static str {
        match self {
            Self::Connect { .. } | Self::Tls { .. } | Self::Tunnel { .. } => "UF",
            Self::ConnectTimeout { .. } => "UT",
            Self::NoHealthyEndpoint { .. }
            | Self::NoServicePort { .. }
            | Self::NoWaypoint { .. }
            | Self::WaypointNeedsMtls { .. } => "UH",
            Self::Denied(_)
            | Self::StrictMtls { .. }
            | Self::PassthroughDenied { .. }
            | Self::Refused { status: 403, .. } => "RBAC",
            Self::Refused { .. } => "UF",
            Self::Draining => "DR",
            _ => "DC",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::AgentPort { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Direction of a proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }

    fn reporter(self) -> &'static str {
        match self {
            Self::Outbound => "source",
            Self::Inbound => "destination",
        }
    }
}

/// Who talks to whom, for metric labels and the access log. Empty means the mesh does not know.
#[derive(Clone, Debug, Default)]
struct Parties {
    src_workload: String,
    src_namespace: String,
    src_principal: String,
    dst_workload: String,
    dst_namespace: String,
    dst_principal: String,
    dst_service: String,
    mtls: bool,
}

impl Parties {
    fn labels(&self, dir: Direction, flags: &'static str) -> Vec<metrics::Label> {
        let v = |s: &str| {
            if s.is_empty() {
                "unknown".to_string()
            } else {
                s.to_string()
            }
        };
        vec![
            metrics::Label::new("reporter", dir.reporter()),
            metrics::Label::new("source_workload", v(&self.src_workload)),
            metrics::Label::new("source_namespace", v(&self.src_namespace)),
            metrics::Label::new("source_principal", v(&self.src_principal)),
            metrics::Label::new("destination_workload", v(&self.dst_workload)),
            metrics::Label::new("destination_namespace", v(&self.dst_namespace)),
            metrics::Label::new("destination_principal", v(&self.dst_principal)),
            metrics::Label::new("destination_service", v(&self.dst_service)),
            metrics::Label::new(
                "connection_security_policy",
                if self.mtls { "mutual_tls" } else { "none" },
            ),
            metrics::Label::new("response_flags", flags),
        ]
    }

    fn set_src_peer(&mut self, p: Option<&Peer>) {
        if let Some(p) = p {
            self.src_workload = p.workload.clone();
            self.src_namespace = p.namespace.clone();
        }
    }

    fn set_dst_peer(&mut self, p: Option<&Peer>, mtls: bool) {
        if let Some(p) = p {
            self.dst_workload = p.workload.clone();
            self.dst_namespace = p.namespace.clone();
            if mtls {
                self.dst_principal = p.identity.clone();
            }
        }
    }
}

/// Creates a dual-stack listener on `[::]:port` inside a namespace.
pub fn listen_in(home: &NetNs, netns: &NetNs, port: u16) -> io::Result<std::net::TcpListener> {
    let sock = netns
        .run_from(home, || {
            Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))
        })
        .map_err(io::Error::other)??;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// Which of a pod's listeners an accept loop serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    Outbound,
    Inbound,
    Hbone,
}

/// Accepts connections on one of a pod's listeners until the task is aborted.
pub async fn accept_loop(
    listener: TcpListener,
    pod: Arc<PodMeta>,
    ctx: Arc<ProxyContext>,
    port: Port,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    match port {
                        Port::Outbound => outbound(stream, peer, &pod, &ctx).await,
                        Port::Inbound => inbound_plaintext(stream, peer, &pod, &ctx).await,
                        Port::Hbone => hbone_connection(stream, peer, pod, ctx).await,
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(pod = %pod.name, port = ?port, error = %e, "accept failed");
                metrics::counter!("weft_accept_errors_total", "listener" => format!("{port:?}").to_lowercase())
                    .increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Logs and counts a refused connection.
fn refused(
    dir: Direction,
    pod: &PodMeta,
    src: SocketAddr,
    dst: Option<SocketAddr>,
    parties: &Parties,
    reason: &RejectReason,
) {
    let mut labels = parties.labels(dir, reason.flag());
    labels.push(metrics::Label::new("reason", reason.label()));
    metrics::counter!("weft_tcp_connection_failures_total", labels).increment(1);
    tracing::warn!(
        target: "weft::access",
        direction = dir.as_str(),
        pod = %pod.name,
        src = %src,
        dst = %dst.map(|d| d.to_string()).unwrap_or_default(),
        src_workload = %parties.src_workload,
        src_principal = %parties.src_principal,
        dst_workload = %parties.dst_workload,
        dst_principal = %parties.dst_principal,
        dst_service = %parties.dst_service,
        security = if parties.mtls { "mutual_tls" } else { "none" },
        policy = if matches!(reason, RejectReason::Denied(_) | RejectReason::StrictMtls { .. }) { "deny" } else { "" },
        result = reason.label(),
        error = %reason,
        "connection refused"
    );
}

/// Reset rather than a clean close: the client must not mistake a refusal for a reply.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// A connection being forwarded, for its metrics and the access log line when it ends.
struct Flow<'a> {
    dir: Direction,
    pod: &'a PodMeta,
    src: SocketAddr,
    dst: SocketAddr,
    parties: Parties,
    verdict: Option<Verdict>,
    start: Instant,
}

impl Flow<'_> {
    /// Relays until both sides are done (or the registration is cancelled), then records.
    async fn run<A, B>(self, a: A, b: B, reg: Registration, buffers: (usize, usize))
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let labels = self.parties.labels(self.dir, "-");
        metrics::counter!("weft_tcp_connections_opened_total", labels.clone()).increment(1);
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let mut a = Counted {
            inner: a,
            count: sent.clone(),
        };
        let mut b = Counted {
            inner: b,
            count: received.clone(),
        };
        let outcome = tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, buffers.0, buffers.1) => r.map(|_| ()),
            () = reg.cancel.cancelled() => Err(io::Error::new(io::ErrorKind::PermissionDenied, "closed: the current policies deny this connection")),
        };
        let sent = sent.load(Ordering::Relaxed);
        let received = received.load(Ordering::Relaxed);
        let close = match &outcome {
            Ok(()) => "eof",
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => "policy",
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset",
            Err(_) => "error",
        };
        let duration = self.start.elapsed();
        metrics::counter!("weft_tcp_connections_closed_total", labels.clone()).increment(1);
        metrics::counter!("weft_tcp_sent_bytes_total", labels.clone()).increment(sent);
        metrics::counter!("weft_tcp_received_bytes_total", labels.clone()).increment(received);
        metrics::histogram!("weft_tcp_connection_duration_seconds", labels)
            .record(duration.as_secs_f64());
        if close == "policy" {
            metrics::counter!("weft_tcp_connections_closed_by_policy_total").increment(1);
        }
        let v = self.verdict.as_ref();
        tracing::info!(
            target: "weft::access",
            direction = self.dir.as_str(),
            pod = %self.pod.name,
            src = %self.src,
            dst = %self.dst,
            src_workload = %self.parties.src_workload,
            src_principal = %self.parties.src_principal,
            dst_workload = %self.parties.dst_workload,
            dst_principal = %self.parties.dst_principal,
            dst_service = %self.parties.dst_service,
            security = if self.parties.mtls { "mutual_tls" } else { "none" },
            policy = v.map(Verdict::decision).unwrap_or(""),
            audited = %v.map(|v| v.audited.join(",")).unwrap_or_default(),
            dry_run_denied_by = v.and_then(|v| v.dry_run_denied_by.as_deref()).unwrap_or(""),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = duration.as_secs_f64() * 1e3,
            close_reason = close,
            error = %outcome.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
            "connection closed"
        );
        drop(reg);
    }
}

/// Relay buffers: application sockets move small writes; tunnels carry HTTP/2 DATA frames of up
/// to 64 KiB, read in one go.
const BUF_TCP: usize = 16 * 1024;
const BUF_TUNNEL: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Outbound

async fn outbound(client: TcpStream, peer: SocketAddr, pod: &PodMeta, ctx: &ProxyContext) {
    let start = Instant::now();
    let peer = canonical(peer);
    let view = ctx.view.get();
    let mut parties = Parties {
        src_workload: pod.name.clone(),
        src_namespace: pod.namespace.clone(),
        src_principal: if ctx.mtls() {
            pod.identity.clone()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let orig = match outbound_destination(peer, pod, ctx) {
        Ok(_) if ctx.draining.load(Ordering::Acquire) => {
            refused(
                Direction::Outbound,
                pod,
                peer,
                None,
                &parties,
                &RejectReason::Draining,
            );
            return reset(&client);
        }
        Ok(d) => d,
        Err(e) => {
            refused(Direction::Outbound, pod, peer, None, &parties, &e);
            return reset(&client);
        }
    };
    // A service VIP becomes one of its endpoints, or, for a service bound to a waypoint, stays
    // the CONNECT authority of a tunnel to one of the waypoint's pods.
    let mut pick = None;
    let mut waypoint = None;
    let dst = match view.service_target(orig) {
        None => Ok(orig),
        Some(t) => {
            parties.dst_service = t.service.hostname.clone();
            match (t.target_port, &t.waypoint) {
                (None, _) => Err(RejectReason::NoServicePort {
                    service: t.service.key(),
                    port: orig.port(),
                }),
                (Some(_), Some(w)) => match ctx.lb.pick(&w.candidates) {
                    _ if !ctx.mtls() => Err(RejectReason::WaypointNeedsMtls {
                        service: t.service.key(),
                        waypoint: w.key.clone(),
                    }),
                    Some(p) if view.peer(p.ip).is_some() => {
                        waypoint = Some(p.ip);
                        pick = Some(p);
                        Ok(orig)
                    }
                    _ => Err(RejectReason::NoWaypoint {
                        service: t.service.key(),
                        waypoint: w.key.clone(),
                    }),
                },
                (Some(port), None) => match ctx.lb.pick(&t.candidates) {
                    None => Err(RejectReason::NoHealthyEndpoint {
                        service: t.service.key(),
                    }),
                    Some(p) => {
                        let dst = SocketAddr::new(p.ip, port);
                        pick = Some(p);
                        Ok(dst)
                    }
                },
            }
        }
    };
    let dst = match dst {
        Ok(d) => d,
        Err(e) => {
            refused(Direction::Outbound, pod, peer, Some(orig), &parties, &e);
            return reset(&client);
        }
    };
    // Through a waypoint: its pod is the tunnel's other end (it speaks HBONE, though its own
    // traffic is not captured).
    let hbone_ip = waypoint.unwrap_or(dst.ip());
    let dst_peer = view.peer(hbone_ip).cloned();
    let tunnelled =
        ctx.mtls() && (waypoint.is_some() || dst_peer.as_ref().is_some_and(|p| p.meshed));
    parties.mtls = tunnelled;
    parties.set_dst_peer(dst_peer.as_deref(), tunnelled);
    if dst_peer.is_none() && !ctx.passthrough {
        let e = RejectReason::PassthroughDenied { dst };
        refused(Direction::Outbound, pod, peer, Some(dst), &parties, &e);
        return reset(&client);
    }
    let reg = ctx.conns.register(None);
    let connect_start = Instant::now();
    let mut connected = match dst_peer.filter(|_| tunnelled) {
        Some(dst_peer) => open_tunnel(pod, ctx, &view, &dst_peer, hbone_ip, dst, peer.ip())
            .await
            .map(|(tunnel, lease)| Upstream::Tunnel(tunnel, lease)),
        None => connect_from(pod, ctx, dst).await.map(Upstream::Plain),
    };
    observe_connect(pick.as_ref(), &connected, connect_start);
    // A waypoint pod that cannot be reached (it crashed, or left its Service before this
    // agent's view says so) or that is draining hands the connection to another pod of the
    // same waypoint, once: nothing has been forwarded yet, and every pod of a waypoint is the
    // same proxy. A refusal by policy is final (any pod would refuse).
    if let (Some(failed), Err(e)) = (waypoint, &connected)
        && waypoint_may_fail_over(e)
        && let Some((next, next_peer)) = other_waypoint_pod(&view, ctx, orig, failed)
    {
        tracing::debug!(pod = %pod.name, %failed, next = %next.ip, error = %e, "waypoint pod unreachable; trying another pod of the waypoint");
        metrics::counter!("weft_waypoint_failovers_total", "reason" => e.label()).increment(1);
        parties.set_dst_peer(Some(&next_peer), true);
        let start = Instant::now();
        connected = open_tunnel(pod, ctx, &view, &next_peer, next.ip, dst, peer.ip())
            .await
            .map(|(tunnel, lease)| Upstream::Tunnel(tunnel, lease));
        observe_connect(Some(&next), &connected, start);
        pick = Some(next);
    }
    let upstream = match connected {
        Ok(u) => u,
        Err(e) => {
            refused(Direction::Outbound, pod, peer, Some(dst), &parties, &e);
            return reset(&client);
        }
    };
    let _ = client.set_nodelay(true);
    let _ = socket2::SockRef::from(&client).set_tcp_keepalive(&keepalive());
    let flow = Flow {
        dir: Direction::Outbound,
        pod,
        src: peer,
        dst,
        parties,
        verdict: None,
        start,
    };
    match upstream {
        Upstream::Tunnel(tunnel, lease) => {
            flow.run(client, tunnel, reg, (BUF_TCP, BUF_TUNNEL)).await;
            drop(lease);
        }
        Upstream::Plain(stream) => flow.run(client, stream, reg, (BUF_TCP, BUF_TCP)).await,
    }
    drop(pick);
}

/// Feeds the outcome of a connection attempt to the endpoint's latency estimate.
fn observe_connect(
    pick: Option<&lb::Pick>,
    connected: &Result<Upstream, RejectReason>,
    started: Instant,
) {
    if let Some(p) = pick {
        match connected {
            Ok(_) => p.observe(started.elapsed()),
            // A refusal by the destination's agent (policy, draining) says nothing about the
            // endpoint's health.
            Err(RejectReason::Refused { .. }) => {}
            Err(_) => p.observe(lb::FAILURE_PENALTY),
        }
    }
}

/// Whether a failure to reach a waypoint pod lets the connection try another pod of the
/// waypoint: the pod did not answer or broke off (connect, TLS, tunnel), or it is draining or
/// not ready yet (503). Refusals by policy (403) and this agent's own problems are final.
fn waypoint_may_fail_over(e: &RejectReason) -> bool {
    match e {
        RejectReason::Connect { .. }
        | RejectReason::ConnectTimeout { .. }
        | RejectReason::Tunnel { .. } => true,
        RejectReason::Tls { kind, .. } => *kind == "tls_failed",
        RejectReason::Refused { status, .. } => *status == 503,
        _ => false,
    }
}

/// Another ready pod (not `failed`) of the waypoint the service at `orig` is bound to, picked by
/// the balancer, with its peer entry.
fn other_waypoint_pod(
    view: &View,
    ctx: &ProxyContext,
    orig: SocketAddr,
    failed: IpAddr,
) -> Option<(lb::Pick, Arc<Peer>)> {
    let waypoint = view.service_target(orig)?.waypoint?;
    let others: Vec<IpAddr> = waypoint
        .candidates
        .into_iter()
        .filter(|ip| *ip != failed)
        .collect();
    let next = ctx.lb.pick(&others)?;
    let peer = view.peer(next.ip)?.clone();
    Some((next, peer))
}

/// Where an outbound connection goes: a tunnel (holding its pooled connection) or plain TCP.
enum Upstream {
    Tunnel(Tunnel, Lease),
    Plain(TcpStream),
}

fn outbound_destination(
    peer: SocketAddr,
    pod: &PodMeta,
    ctx: &ProxyContext,
) -> Result<SocketAddr, RejectReason> {
    // 15001 listens on the pod's address, so other pods could reach it: only the pod itself,
    // with a recorded original destination, may use it.
    if !pod.ips.contains(&peer.ip()) {
        return Err(RejectReason::ForeignPeer {
            peer,
            pod: pod.name.clone(),
        });
    }
    match ctx.orig.take(pod.netns_cookie, peer) {
        Some((dst, _pod_id)) => Ok(dst),
        None => Err(RejectReason::NoOriginalDestination { peer }),
    }
}

/// The roots to verify peers with: the config stream's, else the certificate's own.
fn trust_for(view: &View, cert: &Certified) -> Result<Arc<TrustBundle>, String> {
    if let Some(t) = &view.trust {
        return Ok(t.clone());
    }
    TrustBundle::from_pems(cert.trust_bundle_pem.iter().map(String::as_bytes))
        .map(Arc::new)
        .map_err(|e| format!("no usable trust bundle: {e}"))
}

fn certificate(
    pod: &PodMeta,
    cert: &Certified,
) -> Result<
    (
        Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
        tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
    ),
    RejectReason,
> {
    let bad = |detail: String| RejectReason::Certificate {
        identity: pod.identity.clone(),
        detail,
    };
    let chain = weft_tunnel::certs_from_pem(cert.chain_pem.concat().as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    let key = weft_tunnel::private_key_from_pem(cert.key_pem.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    Ok((chain, key))
}

/// A tunnel to `dst` (the CONNECT authority) through a pooled HBONE connection to the pod at
/// `hbone_ip`: the destination pod, or a waypoint.
async fn open_tunnel(
    pod: &PodMeta,
    ctx: &ProxyContext,
    view: &View,
    dst_peer: &Peer,
    hbone_ip: IpAddr,
    dst: SocketAddr,
    src_ip: IpAddr,
) -> Result<(Tunnel, Lease), RejectReason> {
    let certs = ctx.certs.as_ref().ok_or(RejectReason::Certificate {
        identity: pod.identity.clone(),
        detail: "mutual TLS is off (no certificate authority)".into(),
    })?;
    let cert = tokio::time::timeout(ctx.connect_timeout, certs.get(&pod.identity))
        .await
        .map_err(|_| RejectReason::Certificate {
            identity: pod.identity.clone(),
            detail: format!(
                "the CA did not answer within {:?} (is the controller reachable?)",
                ctx.connect_timeout
            ),
        })?
        .map_err(|e| RejectReason::Certificate {
            identity: pod.identity.clone(),
            detail: e.to_string(),
        })?;
    let key = PoolKey {
        pod: pod.pod_id,
        source: pod.identity.clone(),
        destination: hbone_ip,
        expected: dst_peer.identity.clone(),
        generation: cert.not_after,
    };
    // A pooled connection may have died since it was last used: it is evicted and the tunnel
    // retried once on a fresh connection.
    for attempt in 0..2 {
        let lease = ctx
            .pool
            .get(&key, || {
                connect_hbone(pod, ctx, view, &cert, dst_peer, hbone_ip)
            })
            .await?;
        let mut client = lease.client.clone();
        let opened =
            tokio::time::timeout(ctx.connect_timeout, client.connect(dst, Some(src_ip), None))
                .await
                .unwrap_or_else(|_| {
                    Err(hbone::HboneError::Header(format!(
                        "no answer to CONNECT within {:?}",
                        ctx.connect_timeout
                    )))
                });
        match opened {
            Ok(t) => return Ok((t, lease)),
            Err(hbone::HboneError::Refused { status, reason, .. }) => {
                return Err(RejectReason::Refused {
                    dst,
                    status: status.as_u16(),
                    reason,
                });
            }
            Err(e) => {
                ctx.pool.evict(&key, lease.connection_id());
                if lease.fresh || attempt == 1 {
                    return Err(RejectReason::Tunnel {
                        dst,
                        detail: e.to_string(),
                    });
                }
                tracing::debug!(%dst, error = %e, "pooled HBONE connection failed; opening a new one");
            }
        }
    }
    Err(RejectReason::Tunnel {
        dst,
        detail: "no connection".into(),
    })
}

/// TCP from the source pod to `<destination pod>:15008`, mutual TLS, HTTP/2.
async fn connect_hbone(
    pod: &PodMeta,
    ctx: &ProxyContext,
    view: &View,
    cert: &Certified,
    dst_peer: &Peer,
    dst_ip: IpAddr,
) -> Result<Client, RejectReason> {
    let hbone_addr = SocketAddr::new(dst_ip, PORT_HBONE);
    let (chain, key) = certificate(pod, cert)?;
    let trust = trust_for(view, cert).map_err(|detail| RejectReason::Certificate {
        identity: pod.identity.clone(),
        detail,
    })?;
    let expected: Identity = dst_peer.identity.parse().map_err(|e| RejectReason::Tls {
        dst: hbone_addr,
        expected: dst_peer.identity.clone(),
        detail: format!("the destination's identity is not a SPIFFE ID: {e}"),
        kind: "tls_bad_identity",
    })?;
    let config = weft_tunnel::client_config(chain, key, &trust, expected).map_err(|e| {
        RejectReason::Certificate {
            identity: pod.identity.clone(),
            detail: e.to_string(),
        }
    })?;
    let tcp = connect_from(pod, ctx, hbone_addr).await?;
    let connector = TlsConnector::from(Arc::new(config));
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(dst_ip.into());
    let tls = tokio::time::timeout(ctx.connect_timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| RejectReason::ConnectTimeout {
            dst: hbone_addr,
            pod: pod.name.clone(),
            after: ctx.connect_timeout,
        })?
        .map_err(|e| RejectReason::Tls {
            dst: hbone_addr,
            expected: dst_peer.identity.clone(),
            kind: VerifyError::from_io(&e).map_or("tls_failed", verify_label),
            detail: e.to_string(),
        })?;
    Client::handshake(tls)
        .await
        .map_err(|e| RejectReason::Tunnel {
            dst: hbone_addr,
            detail: e.to_string(),
        })
}

fn verify_label(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::Expired { .. } => "tls_peer_expired",
        VerifyError::Untrusted { .. } => "tls_peer_untrusted",
        VerifyError::WrongIdentity { .. } => "tls_peer_wrong_identity",
        _ => "tls_peer_invalid",
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound

/// Plaintext steered to 15006: a client outside the mesh (or a mesh without mutual TLS).
async fn inbound_plaintext(client: TcpStream, peer: SocketAddr, pod: &PodMeta, ctx: &ProxyContext) {
    let start = Instant::now();
    let peer = canonical(peer);
    let view = ctx.view.get();
    let mut parties = Parties {
        dst_workload: pod.name.clone(),
        dst_namespace: pod.namespace.clone(),
        ..Default::default()
    };
    parties.set_src_peer(view.peer(peer.ip()).map(|p| &**p));
    let dst = match inbound_destination(&client, peer, pod) {
        Ok(d) => d,
        Err(e) => {
            refused(Direction::Inbound, pod, peer, None, &parties, &e);
            return reset(&client);
        }
    };
    let source = Source {
        namespace: None,
        principal: None,
        ip: peer.ip(),
    };
    let admitted = admit(pod, ctx, &view, peer, source, dst, false).await;
    let (upstream, verdict, reg) = match admitted {
        Ok(a) => a,
        Err(e) => {
            refused(Direction::Inbound, pod, peer, Some(dst), &parties, &e);
            return reset(&client);
        }
    };
    let _ = client.set_nodelay(true);
    let _ = socket2::SockRef::from(&client).set_tcp_keepalive(&keepalive());
    let flow = Flow {
        dir: Direction::Inbound,
        pod,
        src: peer,
        dst,
        parties,
        verdict: Some(verdict),
        start,
    };
    flow.run(client, upstream, reg, (BUF_TCP, BUF_TCP)).await;
}

/// Checks mTLS mode and policy for a connection into `pod`, then connects to the application.
async fn admit(
    pod: &PodMeta,
    ctx: &ProxyContext,
    view: &Arc<View>,
    peer: SocketAddr,
    source: Source,
    dst: SocketAddr,
    mtls: bool,
) -> Result<(TcpStream, Verdict, Registration), RejectReason> {
    if ctx.draining.load(Ordering::Acquire) {
        return Err(RejectReason::Draining);
    }
    let w = view
        .local
        .get(&pod.name)
        .ok_or_else(|| RejectReason::UnknownWorkload(pod.name.clone()))?;
    if !mtls && w.capture.strict_mtls {
        return Err(RejectReason::StrictMtls {
            peer,
            workload: pod.name.clone(),
        });
    }
    let verdict = policy::evaluate(&view.policies, w, &source, dst.port());
    if let Some(d) = &verdict.dry_run_denied_by {
        tracing::info!(target: "weft::access", pod = %pod.name, src = %peer, dst = %dst, policy = %d, "dry-run: a policy would deny this connection");
        metrics::counter!("weft_authorization_decisions_total", "decision" => "dry_run_deny")
            .increment(1);
    }
    if !verdict.audited.is_empty() {
        metrics::counter!("weft_authorization_decisions_total", "decision" => "audit").increment(1);
    }
    metrics::counter!("weft_authorization_decisions_total", "decision" => verdict.decision())
        .increment(1);
    if !verdict.allowed {
        return Err(RejectReason::Denied(format!(
            "{} -> {}: {}",
            source
                .principal
                .as_deref()
                .unwrap_or(&peer.ip().to_string()),
            pod.name,
            verdict.reason.clone().unwrap_or_default()
        )));
    }
    let subject = Subject {
        workload: pod.name.clone(),
        source,
        port: dst.port(),
        mtls,
    };
    let reg = ctx.conns.register(Some(subject.clone()));
    // A configuration published between the check above and the registration was enforced
    // without this connection: check again against it.
    let now = ctx.view.get();
    if !Arc::ptr_eq(view, &now) && !crate::conns::allowed(&subject, &now.policies, &now.local) {
        return Err(RejectReason::Denied(format!(
            "{} -> {}: the configuration changed while the connection was being admitted and no longer allows it",
            peer.ip(),
            pod.name
        )));
    }
    let upstream = connect_from(pod, ctx, dst).await?;
    Ok((upstream, verdict, reg))
}

/// The original destination of a steered inbound connection: its local address. A connection
/// made straight to one of the agent's ports (not steered) is refused: "delivering" it would
/// connect the agent to itself, again and again.
fn inbound_destination(
    client: &TcpStream,
    peer: SocketAddr,
    pod: &PodMeta,
) -> Result<SocketAddr, RejectReason> {
    let dst = client
        .local_addr()
        .map(canonical)
        .map_err(|e| RejectReason::Socket {
            pod: pod.name.clone(),
            detail: e.to_string(),
        })?;
    check_not_agent_port(peer, dst)?;
    Ok(dst)
}

fn check_not_agent_port(peer: SocketAddr, dst: SocketAddr) -> Result<(), RejectReason> {
    if [PORT_OUTBOUND, PORT_INBOUND, PORT_HBONE].contains(&dst.port()) {
        return Err(RejectReason::AgentPort { peer, dst });
    }
    Ok(())
}

/// One mutual-TLS connection on a pod's port 15008, carrying any number of tunnels.
async fn hbone_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodMeta>,
    ctx: Arc<ProxyContext>,
) {
    let peer = canonical(peer);
    let fail = |reason: &str, detail: String| {
        metrics::counter!("weft_tls_handshake_failures_total", "reason" => reason.to_string())
            .increment(1);
        tracing::warn!(pod = %pod.name, src = %peer, reason, error = %detail, "inbound HBONE connection refused");
    };
    let Some(certs) = ctx.certs.clone() else {
        return fail(
            "mtls_off",
            "mutual TLS is off on this node (no certificate authority configured)".into(),
        );
    };
    if ctx.draining.load(Ordering::Acquire) {
        return;
    }
    let cert = match tokio::time::timeout(ctx.connect_timeout, certs.get(&pod.identity)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return fail("no_certificate", e.to_string()),
        Err(_) => return fail("no_certificate", "timed out waiting for the CA".into()),
    };
    let view = ctx.view.get();
    let config = certificate(&pod, &cert)
        .map_err(|e| e.to_string())
        .and_then(|(chain, key)| {
            let trust = trust_for(&view, &cert)?;
            weft_tunnel::server_config(chain, key, &trust).map_err(|e| e.to_string())
        });
    let config = match config {
        Ok(c) => c,
        Err(e) => return fail("no_certificate", e),
    };
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive());
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let tls = match tokio::time::timeout(ctx.connect_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let label = VerifyError::from_io(&e).map_or("tls_failed", verify_label);
            return fail(label, e.to_string());
        }
        Err(_) => return fail("tls_timeout", "handshake timed out".into()),
    };
    let identity = match weft_tunnel::peer_identity(tls.get_ref().1) {
        Ok(i) => i,
        Err(e) => return fail(verify_label(&e), e.to_string()),
    };
    let peer_expiry = match weft_tunnel::peer_not_after(tls.get_ref().1) {
        Ok(t) => t.unix(),
        Err(e) => return fail(verify_label(&e), e.to_string()),
    };
    if identity.trust_domain().as_str() != ctx.trust_domain {
        return fail(
            "tls_peer_wrong_trust_domain",
            format!(
                "the peer {identity} is not in this mesh's trust domain `{}` (a root of another trust domain is in the trust bundle?)",
                ctx.trust_domain
            ),
        );
    }
    let handler = Inbound {
        pod,
        ctx,
        peer,
        identity,
        peer_expiry,
    };
    if let Err(e) = hbone::serve(tls, handler).await {
        tracing::debug!(src = %peer, error = %e, "HBONE connection ended");
    }
}

/// Admits and runs the tunnels of one inbound HBONE connection.
#[derive(Clone)]
struct Inbound {
    pod: Arc<PodMeta>,
    ctx: Arc<ProxyContext>,
    peer: SocketAddr,
    identity: Identity,
    /// Expiry of the certificate the peer proved its identity with (Unix seconds): after it,
    /// the connection takes no new tunnels (live ones continue).
    peer_expiry: i64,
}

struct Admitted {
    upstream: TcpStream,
    verdict: Verdict,
    reg: Registration,
    parties: Parties,
    src: SocketAddr,
    dst: SocketAddr,
    start: Instant,
}

impl Handler for Inbound {
    type Admitted = Admitted;

    async fn admit(&self, req: ConnectRequest) -> Result<Admitted, Refusal> {
        let start = Instant::now();
        let pod = &*self.pod;
        let view = self.ctx.view.get();
        let dst = canonical(req.dst);
        // The tunnel's TCP peer is the source pod (the source agent connects from its
        // namespace); `Forwarded: for=` is the client's claim and is only logged.
        let src = self.peer;
        if let Some(f) = req.forwarded_for.filter(|f| f.to_canonical() != src.ip()) {
            tracing::debug!(%src, forwarded_for = %f, "CONNECT names another original source than the tunnel's peer");
        }
        let mut parties = Parties {
            dst_workload: pod.name.clone(),
            dst_namespace: pod.namespace.clone(),
            dst_principal: pod.identity.clone(),
            src_principal: self.identity.to_string(),
            src_namespace: self.identity.namespace().to_string(),
            mtls: true,
            ..Default::default()
        };
        parties.set_src_peer(view.peer(self.peer.ip()).map(|p| &**p));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let result = if now >= self.peer_expiry {
            Err(RejectReason::PeerExpired {
                peer: self.identity.to_string(),
                not_after: self.peer_expiry,
            })
        } else if !pod.ips.contains(&dst.ip()) {
            Err(RejectReason::Tunnel {
                dst,
                detail: format!(
                    "this tunnel endpoint serves pod {} ({:?}) only",
                    pod.name, pod.ips
                ),
            })
        } else {
            match check_not_agent_port(self.peer, dst) {
                Err(e) => Err(e),
                Ok(()) => {
                    let source = Source {
                        namespace: Some(self.identity.namespace().to_string()),
                        principal: Some(self.identity.to_string()),
                        ip: self.peer.ip(),
                    };
                    admit(pod, &self.ctx, &view, self.peer, source, dst, true).await
                }
            }
        };
        match result {
            Ok((upstream, verdict, reg)) => Ok(Admitted {
                upstream,
                verdict,
                reg,
                parties,
                src,
                dst,
                start,
            }),
            Err(e) => {
                refused(Direction::Inbound, pod, src, Some(dst), &parties, &e);
                let status = match &e {
                    RejectReason::Tunnel { .. } => StatusCode::BAD_REQUEST,
                    other => other.status(),
                };
                Err(Refusal::new(status, e.to_string()))
            }
        }
    }

    async fn run(&self, a: Admitted, tunnel: Tunnel) {
        let flow = Flow {
            dir: Direction::Inbound,
            pod: &self.pod,
            src: a.src,
            dst: a.dst,
            parties: a.parties,
            verdict: Some(a.verdict),
            start: a.start,
        };
        flow.run(tunnel, a.upstream, a.reg, (BUF_TUNNEL, BUF_TCP))
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets

/// Opens a marked connection from inside the pod's network namespace.
async fn connect_from(
    pod: &PodMeta,
    ctx: &ProxyContext,
    dst: SocketAddr,
) -> Result<TcpStream, RejectReason> {
    let sock_err = |detail: String| RejectReason::Socket {
        pod: pod.name.clone(),
        detail,
    };
    let sock = pod
        .netns
        .run_from(&ctx.home, || -> io::Result<Socket> {
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            s.set_mark(ctx.socket_mark)?;
            s.set_nonblocking(true)?;
            s.set_tcp_nodelay(true)?;
            s.set_tcp_keepalive(&keepalive())?;
            Ok(s)
        })
        .map_err(|e| sock_err(e.to_string()))?
        .map_err(|e| sock_err(format!("{e} (setting SO_MARK needs CAP_NET_ADMIN)")))?;
    let socket = tokio::net::TcpSocket::from_std_stream(sock.into());
    match tokio::time::timeout(ctx.connect_timeout, socket.connect(dst)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(RejectReason::Connect {
            dst,
            pod: pod.name.clone(),
            source,
        }),
        Err(_) => Err(RejectReason::ConnectTimeout {
            dst,
            pod: pod.name.clone(),
            after: ctx.connect_timeout,
        }),
    }
}

/// TCP keepalive for both legs of a relay: probes after 60 s idle, every 10 s, 6 tries. A peer
/// that vanishes without FIN or RST (node loss, partition) is detected rather than holding the
/// relay forever.
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// Counts the bytes read from a stream as they move (so counts survive errors).
struct Counted<S> {
    inner: S,
    count: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.count.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
