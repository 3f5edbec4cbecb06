//! HBONE: TCP streams carried as HTTP/2 CONNECT requests (normally over the mutual-TLS
//! connection built with [`crate::tls`]) to port 15008 of the destination.
//!
//! As on the wire for Istio's HBONE: the request is `CONNECT` with the authority set to the
//! inner destination `ip:port`; `Forwarded: for="<source>"` carries the original source and a
//! W3C `traceparent` is passed through when present. The server answers `200` and the stream
//! then carries the connection's bytes both ways; anything but CONNECT is refused with `405`,
//! and a CONNECT whose authority is not `ip:port` with `400`, each with a body that says why.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

/// The HBONE port on every meshed pod.
pub const HBONE_PORT: u16 = 15008;

/// The byte stream of one tunnelled connection.
pub type Tunnel = TokioIo<hyper::upgrade::Upgraded>;

/// Errors of the HBONE layer; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(
        "HTTP/2 handshake with the peer failed: {0} (is the peer an HBONE endpoint on port 15008?)"
    )]
    Handshake(hyper::Error),
    #[error("the HBONE connection failed: {0}")]
    Connection(hyper::Error),
    #[error("the peer refused CONNECT to {dst}: {status} {reason}")]
    Refused {
        dst: SocketAddr,
        status: StatusCode,
        reason: String,
    },
    #[error("the tunnel to {dst} could not be opened: {0}", dst = .1)]
    Upgrade(hyper::Error, SocketAddr),
    #[error("invalid request header: {0}")]
    Header(String),
}

/// What the server learns about a tunnelled connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The inner destination (the CONNECT authority).
    pub dst: SocketAddr,
    /// The original source, from `Forwarded: for=`.
    pub forwarded_for: Option<IpAddr>,
    /// W3C trace context, passed through.
    pub traceparent: Option<String>,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// Parses `Forwarded: for="<ip>"` (also unquoted and `[v6]` forms).
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    value.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        let v = v.trim_matches('"');
        let v = v
            .strip_prefix('[')
            .and_then(|x| x.split(']').next())
            .unwrap_or(v);
        v.parse().ok()
    })
}

/// Decides what to do with a request: the tunnel's parameters, or the refusal to send.
fn accept(req: &Request<hyper::body::Incoming>) -> Result<ConnectRequest, (StatusCode, String)> {
    if req.method() != Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "HBONE accepts only CONNECT requests (port 15008 is the mesh tunnel, not an HTTP server)\n".into(),
        ));
    }
    let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let dst: SocketAddr = authority.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            format!("CONNECT authority `{authority}` is not an ip:port destination\n"),
        )
    })?;
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Ok(ConnectRequest {
        dst,
        forwarded_for: header("forwarded").as_deref().and_then(parse_forwarded_for),
        traceparent: header("traceparent"),
    })
}

/// A CONNECT the server refuses, with the status and the reason sent back to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// What a server does with each CONNECT: decide (authorize, connect to the destination) before
/// answering, so a refusal reaches the client as a status with a reason; then carry the bytes.
pub trait Handler: Clone + Send + Sync + 'static {
    /// What admission hands to [`Handler::run`] (e.g. the connection to the destination).
    type Admitted: Send + 'static;
    /// Runs before the response: `Err` answers with the refusal's status and reason.
    fn admit(
        &self,
        req: ConnectRequest,
    ) -> impl Future<Output = Result<Self::Admitted, Refusal>> + Send;
    /// Runs on its own task once the tunnel is open.
    fn run(&self, admitted: Self::Admitted, tunnel: Tunnel) -> impl Future<Output = ()> + Send;
}

/// Any `Fn(ConnectRequest, Tunnel)` is a handler that admits everything.
impl<F, Fut> Handler for F
where
    F: Fn(ConnectRequest, Tunnel) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    type Admitted = ConnectRequest;

    async fn admit(&self, req: ConnectRequest) -> Result<ConnectRequest, Refusal> {
        Ok(req)
    }

    fn run(&self, admitted: ConnectRequest, tunnel: Tunnel) -> impl Future<Output = ()> + Send {
        self(admitted, tunnel)
    }
}

/// HTTP/2 flow-control windows of both ends: 1 MiB per stream is well above the
/// bandwidth-delay product of a data-centre link (10 Gbit/s x 200 µs = 250 KB), so one tunnel is
/// not held back, while a slow reader pins at most that much memory per stream; 4 MiB per
/// connection lets a few streams run at full speed at once. (4/16 MiB measured no faster in
/// `cargo xtask bench l4` and cost RSS.)
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Streams one HBONE connection carries at once.
pub const MAX_STREAMS: u32 = 100;
/// HTTP/2 PINGs on a quiet connection, so a peer that vanished (node lost, partition) is
/// noticed in seconds instead of when TCP gives up.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves HBONE on one (already authenticated) connection until the peer closes it. Every
/// CONNECT is admitted (or refused) by `handler`, then run on its own task.
pub async fn serve<I, H>(io: I, handler: H) -> Result<(), HboneError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let handler = handler.clone();
        async move {
            let conn = match accept(&req) {
                Ok(c) => c,
                Err((status, why)) => return Ok::<_, hyper::Error>(text(status, &why)),
            };
            let dst = conn.dst;
            let admitted = match handler.admit(conn).await {
                Ok(a) => a,
                Err(r) => {
                    let mut reason = r.reason;
                    reason.push('\n');
                    return Ok(text(r.status, &reason));
                }
            };
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(up) => handler.run(admitted, TokioIo::new(up)).await,
                    Err(e) => {
                        tracing::debug!(%dst, error = %e, "HBONE stream closed before it opened")
                    }
                }
            });
            Ok(Response::new(
                Empty::new().map_err(|never| match never {}).boxed(),
            ))
        }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(64 * 1024)
        .max_concurrent_streams(MAX_STREAMS)
        .serve_connection(TokioIo::new(io), svc)
        .await
        .map_err(HboneError::Connection)
}

/// One HBONE connection to a peer, carrying many tunnels (one HTTP/2 stream each).
#[derive(Clone)]
pub struct Client {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
}

impl Client {
    /// Performs the HTTP/2 handshake on an (already authenticated) connection and drives it
    /// on a background task.
    pub async fn handshake<I>(io: I) -> Result<Self, HboneError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(64 * 1024)
            .handshake(TokioIo::new(io))
            .await
            .map_err(HboneError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HBONE connection ended");
            }
        });
        Ok(Self { sender })
    }

    /// Whether the connection can still carry new tunnels.
    pub fn is_ready(&self) -> bool {
        self.sender.is_ready()
    }

    /// Whether the connection is gone (closed by either side or failed).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Opens a tunnel to `dst` (the peer's local destination).
    pub async fn connect(
        &mut self,
        dst: SocketAddr,
        forwarded_for: Option<IpAddr>,
        traceparent: Option<&str>,
    ) -> Result<Tunnel, HboneError> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(dst.to_string());
        if let Some(ip) = forwarded_for {
            let v = match ip {
                IpAddr::V4(a) => format!("for=\"{a}\""),
                IpAddr::V6(a) => format!("for=\"[{a}]\""),
            };
            req = req.header("forwarded", v);
        }
        if let Some(t) = traceparent {
            req = req.header("traceparent", t);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| HboneError::Header(e.to_string()))?;
        self.sender.ready().await.map_err(HboneError::Connection)?;
        let mut resp = self
            .sender
            .send_request(req)
            .await
            .map_err(HboneError::Connection)?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp
                .body_mut()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
                .unwrap_or_default();
            return Err(HboneError::Refused {
                dst,
                status,
                reason: body,
            });
        }
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| HboneError::Upgrade(e, dst))?;
        Ok(TokioIo::new(up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        tokio::io::duplex(64 * 1024)
    }

    /// A server whose handler echoes with a prefix naming what it was told.
    fn start_server(io: tokio::io::DuplexStream) {
        tokio::spawn(serve(io, |c: ConnectRequest, mut t: Tunnel| async move {
            let hello = format!(
                "dst={} for={} trace={}\n",
                c.dst,
                c.forwarded_for.map(|i| i.to_string()).unwrap_or_default(),
                c.traceparent.unwrap_or_default()
            );
            let _ = t.write_all(hello.as_bytes()).await;
            let mut buf = vec![0u8; 1024];
            while let Ok(n) = t.read(&mut buf).await {
                if n == 0 || t.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = t.shutdown().await;
        }));
    }

    #[tokio::test]
    async fn hbone_connect_carries_bytes_and_metadata() {
        let (c, s) = pair();
        start_server(s);
        let mut client = Client::handshake(c).await.expect("handshake");
        let dst: SocketAddr = "198.18.2.11:8080".parse().expect("addr");
        let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut t = client
            .connect(dst, Some("198.18.1.11".parse().expect("ip")), Some(trace))
            .await
            .expect("tunnel");
        t.write_all(b"ping").await.expect("write");
        t.shutdown().await.expect("half-close");
        let mut got = String::new();
        t.read_to_string(&mut got).await.expect("read");
        assert_eq!(
            got,
            format!("dst={dst} for=198.18.1.11 trace={trace}\nping")
        );
    }

    #[tokio::test]
    async fn hbone_many_tunnels_share_one_connection() {
        let (c, s) = pair();
        start_server(s);
        let client = Client::handshake(c).await.expect("handshake");
        let mut tasks = Vec::new();
        for i in 0..20u16 {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let dst: SocketAddr = format!("[fd77:6566:2::b]:{}", 9000 + i)
                    .parse()
                    .expect("addr");
                let mut t = client.connect(dst, None, None).await.expect("tunnel");
                let msg = format!("stream {i}");
                t.write_all(msg.as_bytes()).await.expect("write");
                t.shutdown().await.expect("half-close");
                let mut got = String::new();
                t.read_to_string(&mut got).await.expect("read");
                assert!(got.starts_with(&format!("dst={dst} ")), "{got}");
                assert!(got.ends_with(&msg), "{got}");
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    }

    #[tokio::test]
    async fn hbone_refuses_anything_but_connect_to_an_address() {
        let (c, s) = pair();
        start_server(s);
        // A plain GET on the tunnel port.
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(TokioIo::new(c))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("http://198.18.2.11:8080/")
            .body(Empty::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("only CONNECT"));
        // CONNECT to a name instead of an address.
        let mut client = Client { sender };
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:80")
            .body(Empty::new())
            .expect("request");
        let resp = client.sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }

    #[derive(Clone)]
    struct OnlyPort(u16);

    impl Handler for OnlyPort {
        type Admitted = ();

        async fn admit(&self, req: ConnectRequest) -> Result<(), Refusal> {
            if req.dst.port() == self.0 {
                Ok(())
            } else {
                Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!("port {} is not allowed", req.dst.port()),
                ))
            }
        }

        async fn run(&self, (): (), mut tunnel: Tunnel) {
            let _ = tunnel.write_all(b"admitted").await;
            let _ = tunnel.shutdown().await;
        }
    }

    #[tokio::test]
    async fn hbone_admission_refuses_with_status_and_reason() {
        let (c, s) = pair();
        tokio::spawn(serve(s, OnlyPort(80)));
        let mut client = Client::handshake(c).await.expect("handshake");
        match client
            .connect("198.18.2.11:81".parse().expect("addr"), None, None)
            .await
        {
            Err(HboneError::Refused { status, reason, .. }) => {
                assert_eq!(status, StatusCode::FORBIDDEN);
                assert_eq!(reason, "port 81 is not allowed");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("port 81 was admitted"),
        }
        let mut t = client
            .connect("198.18.2.11:80".parse().expect("addr"), None, None)
            .await
            .expect("admitted");
        let mut got = String::new();
        t.read_to_string(&mut got).await.expect("read");
        assert_eq!(got, "admitted");
    }

    #[test]
    fn forwarded_headers_parse() {
        assert_eq!(
            parse_forwarded_for("for=\"198.18.1.11\""),
            "198.18.1.11".parse().ok()
        );
        assert_eq!(
            parse_forwarded_for("proto=https; for=\"[fd77::1]\""),
            "fd77::1".parse().ok()
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
    }
}
