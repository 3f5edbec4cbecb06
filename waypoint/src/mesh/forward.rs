//! Service backends in mesh mode: the innermost service of a backend whose endpoints come from
//! the mesh view. Each request goes to the [`SelectedEndpoint`](crate::layers::SelectedEndpoint) through HBONE: TLS 1.3 to
//! `<endpoint ip>:15008` with the waypoint's certificate, requiring the endpoint workload's
//! SPIFFE ID, then `CONNECT <endpoint ip>:<target port>` with `Forwarded: for=<client ip>`,
//! then HTTP/1.1 or HTTP/2 (the backend's `protocol`) inside the tunnel.
//!
//! HBONE connections are pooled per (destination address, expected identity, certificate
//! generation) by [`weft_agent::pool::Pool`] and carry many tunnels. A tunnel carries one HTTP
//! connection, pooled per (endpoint, expected identity, original client address, certificate
//! generation) — the tunnel names its original client, so requests of different clients never
//! share one ([`crate::pool`]). Failing to open either is a connect failure
//! (`ProxyError::Connect`): retried on `connect-failure` and counted by outlier detection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsConnector;
use tower::Service;
use weft_agent::pool::{Lease, PoolKey};
use weft_tunnel::Identity;
use weft_tunnel::hbone::{Client, HboneError, Tunnel};

use super::{MeshContext, MeshView, Svid};
use crate::body::Request;
use crate::config::BackendProtocol;
use crate::error::ProxyError;
use crate::forward::upstream_request;
use crate::layers::{BoxFuture, ProxyResult, RequestContext, context_of};
use crate::pool::{self, Pool, Sender};

/// What an HTTP connection inside a tunnel is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ConnKey {
    endpoint: SocketAddr,
    identity: Arc<str>,
    client: Option<IpAddr>,
    generation: i64,
}

struct Inner {
    protocol: BackendProtocol,
    ctx: Arc<MeshContext>,
    pool: Arc<Pool<ConnKey>>,
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
                pool: Pool::new(protocol, max_connections),
            }),
        }
    }
}

impl Inner {
    /// Opens a tunnel to the endpoint and starts HTTP on it.
    async fn connect(
        &self,
        key: &ConnKey,
        svid: &Svid,
        traceparent: Option<&str>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Sender, String> {
        let (tunnel, lease) = open_tunnel(
            &self.ctx,
            svid,
            key.endpoint,
            &key.identity,
            key.client,
            traceparent,
        )
        .await?;
        pool::start(TokioIo::new(tunnel), self.protocol, (lease, slot))
            .await
            .map_err(|e| {
                format!(
                    "HTTP handshake inside the tunnel to {} failed: {e}",
                    key.endpoint
                )
            })
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

    fn call(&mut self, mut request: Request) -> Self::Future {
        let inner = self.inner.clone();
        let selected = crate::layers::take_selected(&mut request);
        Box::pin(async move {
            let Some(target) = selected else {
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
                unsent: None,
            };
            let traceparent = request
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            // Sent as is; a pooled connection found closed gives it back for a new one (no
            // copy of the headers per request).
            let upstream = upstream_request(request, &target, inner.protocol)?;
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
            let sent = inner
                .pool
                .send(key.clone(), upstream, |slot| {
                    inner.connect(&key, &svid, traceparent.as_deref(), slot)
                })
                .await;
            crate::forward::answer(sent, &target)
        })
    }
}
