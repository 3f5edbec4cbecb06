//! Service backends in mesh mode: the innermost service of a backend whose endpoints come from
//! the mesh view. Each request goes to the [`SelectedEndpoint`] through HBONE: TLS 1.3 to
//! `<endpoint ip>:15008` with the waypoint's certificate, requiring the endpoint workload's
//! SPIFFE ID, then `CONNECT <endpoint ip>:<target port>` with `Forwarded: for=<client ip>`,
//! then HTTP/1.1 or HTTP/2 (the backend's `protocol`) inside the tunnel.
//!
//! HBONE connections are pooled per (destination address, expected identity, certificate
//! generation) by [`weft_agent::pool::Pool`] and carry many tunnels. A tunnel carries one HTTP
//! connection, pooled per (endpoint, expected identity, original client address, certificate
//! generation) — the tunnel names its original client, so requests of different clients never
//! share one. Failing to open either is a connect failure (`ProxyError::Connect`): retried on
//! `connect-failure` and counted by outlier detection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{HeaderValue, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tower::Service;
use weft_agent::pool::{Lease, PoolKey};
use weft_tunnel::Identity;
use weft_tunnel::hbone::{Client, HboneError, Tunnel};

use super::{MeshContext, MeshView, Svid};
use crate::body::Request;
use crate::config::BackendProtocol;
use crate::connect::CONNECTION_WAIT;
use crate::error::ProxyError;
use crate::forward::strip_hop_by_hop;
use crate::layers::{BoxFuture, ProxyResult, RequestContext, SelectedEndpoint, context_of};

/// An HTTP connection unused for this long is closed.
const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE_PER_KEY: usize = 64;
/// How often idle connections are swept (on use).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// What an HTTP connection inside a tunnel is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ConnKey {
    endpoint: SocketAddr,
    identity: Arc<str>,
    client: Option<IpAddr>,
    generation: i64,
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends `request`. When the connection turned out closed before the request was written,
    /// the error gives the request back for another connection.
    async fn send(
        &mut self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, SendError> {
        let sent = match self {
            Sender::H1(s) => match s.ready().await {
                Ok(()) => s.try_send_request(request).await,
                Err(e) => return Err(SendError::NotSent(Box::new(request), e)),
            },
            Sender::H2(s) => match s.ready().await {
                Ok(()) => s.try_send_request(request).await,
                Err(e) => return Err(SendError::NotSent(Box::new(request), e)),
            },
        };
        sent.map_err(|mut e| match e.take_message() {
            Some(request) => SendError::NotSent(Box::new(request), e.into_error()),
            None => SendError::Failed(e.into_error()),
        })
    }
}

/// Why [`Sender::send`] failed.
enum SendError {
    /// The connection was closed before the request went out: the request, untouched.
    NotSent(Box<http::Request<Full<Bytes>>>, hyper::Error),
    /// The request was (maybe partly) sent and failed.
    Failed(hyper::Error),
}

struct Idle {
    sender: Sender,
    since: Instant,
}

struct Conns {
    by_key: HashMap<ConnKey, Vec<Idle>>,
    swept: Instant,
}

/// Why no HTTP connection could be had.
enum ConnectError {
    /// `circuitBreaker.maxConnections` stayed full.
    Limit(usize),
    /// The tunnel could not be opened (HBONE, TLS, TCP) or HTTP did not start on it.
    Failed(String),
}

struct Inner {
    protocol: BackendProtocol,
    ctx: Arc<MeshContext>,
    conns: Mutex<Conns>,
    slots: Option<(Arc<Semaphore>, usize)>,
}

/// Forwards requests to mesh endpoints through HBONE.
#[derive(Clone)]
pub struct MeshForwarder {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MeshForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshForwarder")
            .field("protocol", &self.inner.protocol)
            .finish_non_exhaustive()
    }
}

impl MeshForwarder {
    /// A forwarder speaking `protocol` inside tunnels, holding at most `max_connections` HTTP
    /// connections (tunnels) open (unbounded when `None`).
    pub fn new(
        ctx: Arc<MeshContext>,
        protocol: BackendProtocol,
        max_connections: Option<usize>,
    ) -> Self {
        MeshForwarder {
            inner: Arc::new(Inner {
                protocol,
                ctx,
                conns: Mutex::new(Conns {
                    by_key: HashMap::new(),
                    swept: Instant::now(),
                }),
                slots: max_connections.map(|m| (Arc::new(Semaphore::new(m)), m)),
            }),
        }
    }
}

impl Inner {
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        match self.conns.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A pooled connection ready for a request.
    fn checkout(&self, key: &ConnKey) -> Option<Sender> {
        let now = Instant::now();
        let mut conns = self.conns();
        if now.saturating_duration_since(conns.swept) > SWEEP_EVERY {
            conns.swept = now;
            for list in conns.by_key.values_mut() {
                list.retain(|idle| {
                    !idle.sender.is_closed()
                        && now.saturating_duration_since(idle.since) < HTTP_IDLE_TIMEOUT
                });
            }
            conns.by_key.retain(|_, list| !list.is_empty());
        }
        let list = conns.by_key.get_mut(key)?;
        list.retain(|idle| !idle.sender.is_closed());
        let index = list.iter().position(|idle| idle.sender.is_ready())?;
        match &list[index].sender {
            // HTTP/2 multiplexes: the connection stays in the pool for others.
            Sender::H2(s) => {
                let s = s.clone();
                list[index].since = now;
                Some(Sender::H2(s))
            }
            Sender::H1(_) => Some(list.swap_remove(index).sender),
        }
    }

    /// Returns an HTTP/1.1 connection (busy until its response body ends) or registers a new
    /// HTTP/2 one.
    fn checkin(&self, key: ConnKey, sender: Sender) {
        let mut conns = self.conns();
        let list = conns.by_key.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Opens a tunnel to the endpoint and starts HTTP on it.
    async fn connect(
        &self,
        key: &ConnKey,
        svid: &Svid,
        traceparent: Option<&str>,
    ) -> Result<Sender, ConnectError> {
        let permit: Option<OwnedSemaphorePermit> = match &self.slots {
            None => None,
            Some((semaphore, max)) => {
                match tokio::time::timeout(CONNECTION_WAIT, semaphore.clone().acquire_owned()).await
                {
                    Ok(Ok(permit)) => Some(permit),
                    _ => return Err(ConnectError::Limit(*max)),
                }
            }
        };
        let (tunnel, lease) = open_tunnel(
            &self.ctx,
            svid,
            key.endpoint,
            &key.identity,
            key.client,
            traceparent,
        )
        .await
        .map_err(ConnectError::Failed)?;
        let io = TokioIo::new(tunnel);
        let failed = |e: hyper::Error| {
            ConnectError::Failed(format!(
                "HTTP handshake inside the tunnel to {} failed: {e}",
                key.endpoint
            ))
        };
        match self.protocol {
            BackendProtocol::Http1 => {
                let (sender, connection) = http1::handshake(io).await.map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "HTTP/1.1 connection in a tunnel ended");
                    }
                    drop((lease, permit));
                });
                let sender = Sender::H1(sender);
                Ok(sender)
            }
            BackendProtocol::Http2 => {
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "HTTP/2 connection in a tunnel ended");
                    }
                    drop((lease, permit));
                });
                Ok(Sender::H2(sender))
            }
        }
    }
}

/// Opens a tunnel to `dst` (an endpoint's `ip:targetPort`) whose workload must be `expected`,
/// on a pooled HBONE connection (or a new one). The lease holds the connection's stream slot.
pub async fn open_tunnel(
    ctx: &MeshContext,
    svid: &Svid,
    dst: SocketAddr,
    expected: &str,
    client: Option<IpAddr>,
    traceparent: Option<&str>,
) -> Result<(Tunnel, Lease), String> {
    let view = ctx.mesh.current();
    let key = PoolKey {
        pod: 0,
        source: svid.identity.to_string(),
        destination: dst.ip(),
        expected: expected.to_string(),
        generation: svid.generation,
    };
    for attempt in 0..2 {
        let lease = ctx
            .pool
            .get(&key, || connect_hbone(ctx, &view, svid, dst.ip(), expected))
            .await?;
        let mut client_conn = lease.client.clone();
        match client_conn.connect(dst, client, traceparent).await {
            Ok(tunnel) => return Ok((tunnel, lease)),
            Err(HboneError::Refused { status, reason, .. }) => {
                return Err(format!(
                    "the endpoint refused the tunnel (CONNECT {dst}): {status} {reason}"
                ));
            }
            Err(e) => {
                ctx.pool.evict(&key, lease.connection_id());
                if lease.fresh || attempt == 1 {
                    return Err(format!("the tunnel to {dst} could not be opened: {e}"));
                }
                tracing::debug!(%dst, error = %e, "pooled HBONE connection failed; opening a new one");
            }
        }
    }
    Err(format!("the tunnel to {dst} could not be opened"))
}

/// TCP to `<ip>:15008`, TLS 1.3 with the waypoint's certificate requiring `expected`, HTTP/2.
async fn connect_hbone(
    ctx: &MeshContext,
    view: &MeshView,
    svid: &Svid,
    ip: IpAddr,
    expected: &str,
) -> Result<Client, String> {
    let addr = SocketAddr::new(ip, ctx.hbone_port);
    let trust = ctx.trust(view, svid).map_err(|e| e.to_string())?;
    let expected_id: Identity = expected
        .parse()
        .map_err(|e| format!("the endpoint's identity `{expected}` is not a SPIFFE ID: {e}"))?;
    let config = weft_tunnel::client_config(
        svid.chain.clone(),
        svid.key.clone_key(),
        &trust,
        expected_id,
    )
    .map_err(|e| format!("cannot use the waypoint's certificate: {e}"))?;
    let handshake = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("TCP connect to {addr} failed: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::IpAddress(ip.into());
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {addr} (expecting {expected}) failed: {e}"))?;
        Client::handshake(tls).await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(ctx.handshake_timeout, handshake)
        .await
        .map_err(|_| {
            format!(
                "the HBONE handshake with {addr} took longer than {:?}",
                ctx.handshake_timeout
            )
        })?
}

impl Service<Request> for MeshForwarder {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some(target) = request.extensions().get::<SelectedEndpoint>().cloned() else {
                return Err(ProxyError::Internal(
                    "the mesh forwarder ran without a selected endpoint",
                ));
            };
            let Some(identity) = target.identity.clone() else {
                return Err(ProxyError::Internal(
                    "a mesh endpoint was selected without its identity",
                ));
            };
            let context = context_of(&request);
            let client = context
                .and_then(RequestContext::source)
                .map(|s| s.ip)
                .or_else(|| context.and_then(RequestContext::peer).map(|p| p.ip()));
            let connect_error = |reason: String| ProxyError::Connect {
                backend: target.backend.to_string(),
                endpoint: target.addr,
                reason,
            };
            let (mut parts, body) = request.into_parts();
            let traceparent = parts
                .headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if !parts.headers.contains_key(header::HOST)
                && let Some(authority) = parts.uri.authority()
                && let Ok(value) = HeaderValue::from_str(authority.as_str())
            {
                parts.headers.insert(header::HOST, value);
            }
            strip_hop_by_hop(&mut parts.headers);
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let (uri, version) = match inner.protocol {
                BackendProtocol::Http1 => (Uri::try_from(path), Version::HTTP_11),
                BackendProtocol::Http2 => {
                    let authority = parts
                        .headers
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map_or_else(|| target.addr.to_string(), str::to_string);
                    let uri = Uri::try_from(format!("http://{authority}{path}"))
                        .or_else(|_| Uri::try_from(format!("http://{}{path}", target.addr)));
                    (uri, Version::HTTP_2)
                }
            };
            parts.uri =
                uri.map_err(|_| ProxyError::Internal("could not build the upstream URI"))?;
            parts.version = version;
            // Sent as is; a pooled connection found closed gives it back for a new one (no
            // copy of the headers per request).
            let mut upstream = http::Request::from_parts(parts, Full::new(body));
            let svid = inner
                .ctx
                .svid
                .svid()
                .await
                .map_err(|e| connect_error(e.to_string()))?;
            let key = ConnKey {
                endpoint: target.addr,
                identity,
                client,
                generation: svid.generation,
            };
            let mut fresh = false;
            loop {
                let pooled = if fresh { None } else { inner.checkout(&key) };
                let (mut sender, reused) = match pooled {
                    Some(sender) => (sender, true),
                    None => match inner.connect(&key, &svid, traceparent.as_deref()).await {
                        Ok(sender) => (sender, false),
                        Err(ConnectError::Limit(max)) => {
                            return Err(ProxyError::ConnectionLimit {
                                backend: target.backend.to_string(),
                                max,
                            });
                        }
                        Err(ConnectError::Failed(reason)) => return Err(connect_error(reason)),
                    },
                };
                match sender.send(upstream).await {
                    Ok(response) => {
                        match sender {
                            Sender::H1(_) => inner.checkin(key, sender),
                            // A new HTTP/2 connection joins the pool; a pooled one never left.
                            Sender::H2(_) if !reused => inner.checkin(key, sender),
                            Sender::H2(_) => {}
                        }
                        let (mut parts, body) = response.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        return Ok(http::Response::from_parts(parts, body.boxed()));
                    }
                    // A pooled connection closed before the request went out: once more on
                    // a new one.
                    Err(SendError::NotSent(back, e)) if reused => {
                        tracing::debug!(endpoint = %target.addr, error = %e, "pooled connection closed; retrying on a new one");
                        upstream = *back;
                        fresh = true;
                    }
                    Err(SendError::NotSent(_, e) | SendError::Failed(e)) => {
                        return Err(ProxyError::Upstream {
                            backend: target.backend.to_string(),
                            endpoint: target.addr,
                            reason: crate::forward::error_chain(&e),
                        });
                    }
                }
            }
        })
    }
}
