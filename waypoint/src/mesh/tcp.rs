//! Opaque TCP: a tunnel whose protocol is not HTTP (declared or detected, see
//! [`super::detect`]) is proxied byte for byte to one ready endpoint of its Service port,
//! through HBONE like HTTP backends ([`super::forward::open_tunnel`]: TLS to
//! `<endpoint>:15008` requiring the endpoint workload's SPIFFE ID,
//! `CONNECT <endpoint ip>:<targetPort>` with `Forwarded: for=<original client>`).
//!
//! Endpoint choice: a random start in the port's ready endpoints, then the next ones on connect
//! failure, at most [`MAX_CONNECT_ATTEMPTS`] endpoints. (The HTTP balancer's P2C over request
//! latency EWMA has no meaning for long-lived byte streams; least-connections would be the
//! natural next step.) Both directions are copied until each side has closed its half
//! (`copy_bidirectional`: the end of one direction is passed on as a half-close).
//!
//! Metrics: `weft_waypoint_tcp_connections_total{service, result}` (`ok`, `no_endpoint`,
//! `connect_failed`, `denied`), and the bytes as they flow,
//! `weft_waypoint_tcp_received_bytes_total{service}` (from the client, toward the Service) and
//! `weft_waypoint_tcp_sent_bytes_total{service}` (to the client, from the Service).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use weft_api::model::ServiceInfo;

use super::MeshContext;
use super::forward::open_tunnel;
use crate::layers::Source;

/// How many endpoints one connection tries before giving up.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Proxies opaque TCP tunnels of Service ports to their endpoints.
#[derive(Clone)]
pub struct OpaqueTcp {
    ctx: Arc<MeshContext>,
}

impl std::fmt::Debug for OpaqueTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpaqueTcp").finish_non_exhaustive()
    }
}

fn connections(service: &str, result: &'static str) {
    metrics::counter!(
        "weft_waypoint_tcp_connections_total",
        "service" => service.to_string(),
        "result" => result
    )
    .increment(1);
}

impl OpaqueTcp {
    /// Opaque TCP over `ctx`'s mesh view and HBONE pool.
    pub fn new(ctx: Arc<MeshContext>) -> Self {
        OpaqueTcp { ctx }
    }

    /// Whether `source` may open a connection to `service`'s port `port`: the
    /// AuthorizationPolicies targeting the Service at this waypoint, without L7 attributes
    /// (an ALLOW rule with HTTP conditions never matches, a DENY rule with them matches on its
    /// L4 parts: both fail closed; see [`crate::layers::authz`]). `Err` says why not (logged,
    /// counted `result="denied"`, the tunnel closed).
    pub fn authorize_connection(
        &self,
        source: &Source,
        service: &ServiceInfo,
        port: u16,
    ) -> Result<(), String> {
        let view = self.ctx.mesh.current();
        let decision = crate::layers::authz::Authorizer::check_connection(
            &view,
            &service.key(),
            port,
            Some(source),
        );
        if decision.allowed {
            Ok(())
        } else {
            Err(decision
                .reason
                .unwrap_or_else(|| "denied by an AuthorizationPolicy".into()))
        }
    }

    /// Proxies `client` (the tunnel, with any detection bytes replayed) to an endpoint of
    /// `service`'s port `port`. Returns when both directions are done or on failure; dropping
    /// `client` closes the tunnel.
    pub async fn proxy<T>(
        &self,
        client: T,
        source: &Source,
        service: &ServiceInfo,
        port: u16,
    ) -> TcpOutcome
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut outcome = TcpOutcome::default();
        let key = service.key();
        if let Err(reason) = self.authorize_connection(source, service, port) {
            connections(&key, "denied");
            tracing::debug!(service = %key, port, principal = %source.principal, %reason, "opaque TCP connection denied");
            outcome.result = "denied";
            return outcome;
        }
        let mut endpoints = self.ctx.mesh.current().endpoints(&key, port);
        if endpoints.is_empty() {
            connections(&key, "no_endpoint");
            tracing::debug!(service = %key, port, "opaque TCP: no ready endpoint; closing the tunnel");
            outcome.result = "no_endpoint";
            return outcome;
        }
        let start = rand::random_range(0..endpoints.len());
        endpoints.rotate_left(start);
        let svid = match self.ctx.svid.svid().await {
            Ok(svid) => svid,
            Err(e) => {
                connections(&key, "connect_failed");
                tracing::warn!(service = %key, error = %e, "opaque TCP: no certificate to reach endpoints with");
                outcome.result = "connect_failed";
                return outcome;
            }
        };
        let mut upstream = None;
        for (addr, identity) in endpoints.iter().take(MAX_CONNECT_ATTEMPTS) {
            let Some(identity) = identity else { continue };
            match open_tunnel(&self.ctx, &svid, *addr, identity, Some(source.ip), None).await {
                Ok(opened) => {
                    upstream = Some((*addr, opened));
                    break;
                }
                Err(e) => {
                    tracing::debug!(service = %key, endpoint = %addr, error = %e, "opaque TCP: endpoint unreachable; trying another");
                }
            }
        }
        let Some((addr, (tunnel, lease))) = upstream else {
            connections(&key, "connect_failed");
            tracing::warn!(service = %key, port, tried = endpoints.len().min(MAX_CONNECT_ATTEMPTS), "opaque TCP: no endpoint could be reached; closing the tunnel");
            outcome.result = "connect_failed";
            return outcome;
        };
        connections(&key, "ok");
        outcome.result = "ok";
        outcome.upstream = Some(addr);
        let mut client = Counted {
            inner: client,
            received: metrics::counter!("weft_waypoint_tcp_received_bytes_total", "service" => key.clone()),
            sent: metrics::counter!("weft_waypoint_tcp_sent_bytes_total", "service" => key.clone()),
            received_bytes: 0,
            sent_bytes: 0,
        };
        let mut tunnel = tunnel;
        match tokio::io::copy_bidirectional(&mut client, &mut tunnel).await {
            Ok((up, down)) => {
                tracing::debug!(service = %key, endpoint = %addr, up, down, "opaque TCP connection done");
            }
            Err(e) => {
                tracing::debug!(service = %key, endpoint = %addr, error = %e, "opaque TCP connection ended with an error");
                outcome.error = Some(e.to_string());
            }
        }
        drop(lease);
        outcome.received_bytes = client.received_bytes;
        outcome.sent_bytes = client.sent_bytes;
        outcome
    }
}

/// How an opaque TCP connection went, for the access log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TcpOutcome {
    /// `ok` (proxied), `denied`, `no_endpoint` or `connect_failed` (as the metric's `result`).
    pub result: &'static str,
    /// The endpoint it was proxied to.
    pub upstream: Option<std::net::SocketAddr>,
    /// Bytes from the client.
    pub received_bytes: u64,
    /// Bytes to the client.
    pub sent_bytes: u64,
    /// Why the copy ended with an error (a reset, ...), when it did.
    pub error: Option<String>,
}

/// The client side of an opaque connection, counting bytes as they pass.
struct Counted<T> {
    inner: T,
    received: Counter,
    sent: Counter,
    received_bytes: u64,
    sent_bytes: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, out);
        let n = out.filled().len().saturating_sub(before);
        if n > 0 {
            self.received.increment(n as u64);
            self.received_bytes += n as u64;
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.sent.increment(*n as u64);
            self.sent_bytes += *n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
