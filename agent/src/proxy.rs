//! The data path for captured connections.
//!
//! Outbound: the application's connect was rewritten to `<pod ip>:15001`; the agent accepts it
//! inside the pod's network namespace, recovers the original destination, and opens the
//! upstream connection from the same namespace (so it leaves with the pod's address), marked so
//! the kernel programs let it through.
//!
//! Inbound: sk_lookup steered a connection for `<pod ip>:<any port>` to the agent's 15006
//! listener; the accepted socket's local address is the original destination. The agent
//! delivers it to the application from inside the pod (source = the pod's own address, which
//! sk_lookup never steers).
//!
//! For now both directions forward plaintext; the mTLS tunnel replaces the outbound leg later.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_netns::NetNs;

use weft_ebpf_common::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};

use crate::capture::OrigDstMap;

/// Shared by every pod's accept loops.
pub struct ProxyContext {
    /// The agent's own network namespace (every runtime thread lives there).
    pub home: NetNs,
    pub orig: Arc<OrigDstMap>,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
}

/// What the data path knows about one enrolled pod.
#[derive(Debug)]
pub struct PodMeta {
    pub pod_id: u32,
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    pub netns: NetNs,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
}

/// Why a captured connection was refused before any byte was forwarded.
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

/// Accepts captured outbound connections until the task is aborted.
pub async fn run_outbound(listener: TcpListener, pod: Arc<PodMeta>, ctx: Arc<ProxyContext>) {
    accept_loop(listener, pod, ctx, Direction::Outbound).await
}

/// Accepts steered inbound connections until the task is aborted.
pub async fn run_inbound(listener: TcpListener, pod: Arc<PodMeta>, ctx: Arc<ProxyContext>) {
    accept_loop(listener, pod, ctx, Direction::Inbound).await
}

async fn accept_loop(
    listener: TcpListener,
    pod: Arc<PodMeta>,
    ctx: Arc<ProxyContext>,
    dir: Direction,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                let ctx = ctx.clone();
                tokio::spawn(async move { handle(stream, peer, &pod, &ctx, dir).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(pod = %pod.name, direction = dir.as_str(), error = %e, "accept failed");
                metrics::counter!("weft_accept_errors_total", "direction" => dir.as_str())
                    .increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: &PodMeta,
    ctx: &ProxyContext,
    dir: Direction,
) {
    let start = Instant::now();
    let peer = canonical(peer);
    let dst = match dir {
        Direction::Outbound => outbound_destination(peer, pod, ctx),
        Direction::Inbound => inbound_destination(&client, peer, pod),
    };
    let result = match dst {
        Ok(dst) => match connect_from(pod, ctx, dst).await {
            Ok(upstream) => Ok((dst, upstream)),
            Err(e) => Err((Some(dst), e)),
        },
        Err(e) => Err((None, e)),
    };
    let (dst, mut upstream) = match result {
        Ok(ok) => ok,
        Err((dst, reason)) => {
            metrics::counter!("weft_connections_rejected_total",
                "direction" => dir.as_str(), "reason" => reason.label())
            .increment(1);
            tracing::warn!(
                target: "weft::access",
                direction = dir.as_str(),
                pod = %pod.name,
                src = %peer,
                dst = %dst.map(|d| d.to_string()).unwrap_or_default(),
                result = reason.label(),
                error = %reason,
                "connection refused"
            );
            // Reset rather than a clean close: the client must not mistake this for a reply.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return;
        }
    };
    let _ = client.set_nodelay(true);
    // A peer that vanishes without FIN or RST (node loss, partition) is detected by keepalive
    // rather than holding the relay forever.
    let _ = socket2::SockRef::from(&client).set_tcp_keepalive(&keepalive());
    metrics::counter!("weft_tcp_connections_opened_total", "direction" => dir.as_str())
        .increment(1);
    let counts = Arc::new(Counts::default());
    let outcome = relay(&mut client, &mut upstream, &counts).await;
    let sent = counts.client_to_upstream.load(Ordering::Relaxed);
    let received = counts.upstream_to_client.load(Ordering::Relaxed);
    let close = match &outcome {
        Ok(()) => "eof",
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset",
        Err(_) => "error",
    };
    metrics::counter!("weft_tcp_connections_closed_total",
        "direction" => dir.as_str(), "reason" => close)
    .increment(1);
    metrics::counter!("weft_tcp_sent_bytes_total", "direction" => dir.as_str()).increment(sent);
    metrics::counter!("weft_tcp_received_bytes_total", "direction" => dir.as_str())
        .increment(received);
    tracing::info!(
        target: "weft::access",
        direction = dir.as_str(),
        pod = %pod.name,
        src = %peer,
        dst = %dst,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = start.elapsed().as_secs_f64() * 1e3,
        close_reason = close,
        error = %outcome.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
        "connection closed"
    );
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
    if [PORT_OUTBOUND, PORT_INBOUND, PORT_HBONE].contains(&dst.port()) {
        return Err(RejectReason::AgentPort { peer, dst });
    }
    Ok(dst)
}

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

/// TCP keepalive for both legs of a relay: probes after 60 s idle, every 10 s, 6 tries.
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

#[derive(Default)]
struct Counts {
    client_to_upstream: AtomicU64,
    upstream_to_client: AtomicU64,
}

/// Copies both ways until both sides are done; half-closes are forwarded. Byte counts survive
/// errors (they are updated as bytes move).
async fn relay(a: &mut TcpStream, b: &mut TcpStream, counts: &Counts) -> io::Result<()> {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let up = copy_counted(&mut ar, &mut bw, &counts.client_to_upstream);
    let down = copy_counted(&mut br, &mut aw, &counts.upstream_to_client);
    // The first error ends both directions (dropping the other copy closes its sockets), so a
    // reset on one side is never left hanging on the other.
    tokio::try_join!(up, down).map(|_| ())
}

const RELAY_BUF: usize = 16 * 1024;

async fn copy_counted<R, W>(r: &mut R, w: &mut W, count: &AtomicU64) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Forward the half-close.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}
