//! The innermost service: sends a request to the [`SelectedEndpoint`] on a pooled connection
//! ([`crate::pool`]; plain TCP; HTTP/1.1, or HTTP/2 with prior knowledge) and streams the
//! response back.

use std::task::{Context, Poll};
use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};
use http::{HeaderValue, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tower::Service;

use crate::body::{Request, Streaming, UpstreamBody};
use crate::config::BackendProtocol;
use crate::error::{ProxyError, Unsent};
use crate::layers::{BoxFuture, ProxyResult, SelectedEndpoint};
use crate::pool::{self, Pool, PoolError, Sender};

/// How long opening a TCP connection to an endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Headers that describe one hop and are never forwarded (RFC 9110 section 7.6.1), in the
/// order of [`strip_hop_by_hop`]'s match. A `static`, not a `const`: a `const` array is built
/// (and dropped) anew wherever it is used.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named by `Connection`.
///
/// One pass over the names finds which are present; only those are removed (most messages
/// carry `connection: keep-alive` and nothing else of the kind).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u8;
    let mut te = false;
    for name in headers.keys() {
        // By text: most names differ in length from every hop-by-hop name.
        let i = match name.as_str() {
            "connection" => 0,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "proxy-authenticate" => 3,
            "proxy-authorization" => 4,
            "transfer-encoding" => 5,
            "upgrade" => 6,
            "te" => {
                te = true;
                continue;
            }
            _ => continue,
        };
        present |= 1 << i;
    }
    if present == 0 && !te {
        return;
    }
    // Most answers: `connection: keep-alive` (or `close`) and no other hop-by-hop header.
    if present == 1
        && !te
        && headers.get_all(header::CONNECTION).iter().all(|v| {
            let v = v.as_bytes();
            v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
        })
    {
        headers.remove(header::CONNECTION);
        return;
    }
    // Options of `Connection` other than keep-alive and close name more headers of this hop
    // (no allocation when there are none).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|option| {
            !option.is_empty()
                && !option.eq_ignore_ascii_case("keep-alive")
                && !option.eq_ignore_ascii_case("close")
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    // `te: trailers` is the only TE value allowed in HTTP/2, and what gRPC sends.
    if te && headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
}

/// Forwards requests to the endpoint chosen by the balancer, on pooled connections
/// ([`crate::pool`]).
#[derive(Clone, Debug)]
pub struct Forwarder {
    pool: Arc<Pool<SocketAddr>>,
    protocol: BackendProtocol,
}

impl Forwarder {
    /// A forwarder with its own connection pool speaking `protocol`, holding at most
    /// `max_connections` connections open (unbounded when `None`).
    pub fn new(protocol: BackendProtocol, max_connections: Option<usize>) -> Self {
        Forwarder {
            pool: Pool::new(protocol, max_connections),
            protocol,
        }
    }
}

/// TCP to `addr` (at most [`CONNECT_TIMEOUT`]), then HTTP.
async fn connect(
    addr: SocketAddr,
    protocol: BackendProtocol,
    slot: Option<OwnedSemaphorePermit>,
) -> Result<Sender, String> {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(format!("TCP connect to {addr} failed: {e}")),
        Err(_) => {
            return Err(format!(
                "TCP connect to {addr} took longer than {CONNECT_TIMEOUT:?}"
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    pool::start(TokioIo::new(tcp), protocol, slot)
        .await
        .map_err(|e| format!("HTTP handshake with {addr} failed: {e}"))
}

impl Service<Request> for Forwarder {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let pool = self.pool.clone();
        let protocol = self.protocol;
        let selected = crate::layers::take_selected(&mut request);
        Box::pin(async move {
            let Some(target) = selected else {
                return Err(ProxyError::Internal(
                    "the forwarder ran without a selected endpoint",
                ));
            };
            let upstream = upstream_request(request, &target, protocol)?;
            let addr = target.addr;
            let sent = pool
                .send(addr, upstream, |slot| connect(addr, protocol, slot))
                .await;
            answer(sent, &target)
        })
    }
}

/// The endpoint's answer without its hop-by-hop headers, or why there is none, as the
/// layers see it (both forwarders).
pub(crate) fn answer(
    sent: Result<crate::body::Response, PoolError>,
    target: &SelectedEndpoint,
) -> ProxyResult {
    match sent {
        Ok(mut response) => {
            strip_hop_by_hop(response.headers_mut());
            Ok(response)
        }
        Err(PoolError::Limit(max)) => Err(ProxyError::ConnectionLimit {
            backend: target.backend.to_string(),
            max,
        }),
        Err(PoolError::Connect(reason, unsent)) => Err(ProxyError::Connect {
            backend: target.backend.to_string(),
            endpoint: target.addr,
            reason,
            unsent: unsent.map(|request| unsent_request(*request)),
        }),
        Err(PoolError::Upstream(e)) => Err(ProxyError::Upstream {
            backend: target.backend.to_string(),
            endpoint: target.addr,
            reason: error_chain(&e),
        }),
    }
}

/// `request` as it goes to `target` speaking `protocol` (both forwarders), its body in one
/// piece and without hop-by-hop headers:
/// * HTTP/1.1: the origin form (`/path?query`) and a Host header (from an HTTP/2 client's
///   `:authority`, else the endpoint's address);
/// * HTTP/2: an absolute URI whose authority (`:authority`) is the request's host (its Host
///   header or `:authority`; the endpoint's address when it has none or an invalid one), and
///   no Host header (RFC 9113 section 8.3.1: a server may refuse a Host that differs from
///   `:authority`).
pub(crate) fn upstream_request(
    request: Request,
    target: &SelectedEndpoint,
    protocol: BackendProtocol,
) -> Result<http::Request<UpstreamBody>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    // A streamed request's rest goes with it (and comes back if it never leaves).
    let rest = parts
        .extensions
        .get::<Streaming>()
        .and_then(Streaming::take);
    strip_hop_by_hop(&mut parts.headers);
    (parts.uri, parts.version) = match protocol {
        BackendProtocol::Http1 => {
            if !parts.headers.contains_key(header::HOST) {
                let value = match parts.uri.authority() {
                    Some(authority) => HeaderValue::from_str(authority.as_str()),
                    None => {
                        parts.extensions.insert(HostOfEndpoint);
                        HeaderValue::from_str(&target.addr.to_string())
                    }
                };
                if let Ok(value) = value {
                    parts.headers.insert(header::HOST, value);
                }
            }
            (origin_form(&parts.uri), Version::HTTP_11)
        }
        BackendProtocol::Http2 => {
            let host = match parts.headers.remove(header::HOST) {
                Some(host) => http::uri::Authority::try_from(host.as_bytes()).ok(),
                None => parts.uri.authority().cloned(),
            };
            if host.is_none() {
                parts.extensions.insert(HostOfEndpoint);
            }
            (upstream_uri(target, host, &parts.uri)?, Version::HTTP_2)
        }
    };
    // A streamed body of unknown length goes to an HTTP/1.1 endpoint chunked: hyper would
    // otherwise send a GET or HEAD without it (length 0).
    if rest.is_some()
        && protocol == BackendProtocol::Http1
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let counted = rest.as_ref().and_then(|_| {
        parts
            .extensions
            .get::<crate::layers::RequestContext>()
            .cloned()
    });
    Ok(http::Request::from_parts(
        parts,
        UpstreamBody::new(body, rest, counted),
    ))
}

/// Request extension: the request had no host, so [`upstream_request`] gave it its
/// endpoint's address (Host or `:authority`), which [`unsent_request`] takes back.
#[derive(Clone, Copy, Debug)]
struct HostOfEndpoint;

/// An upstream request that never left ([`PoolError::Connect`]) as the layers take it, for
/// another endpoint: its buffered body, the rest of a streamed body back in its [`Streaming`],
/// and without the host it got from the failed endpoint's address. (Hop-by-hop headers stay
/// removed; [`upstream_request`] does the rest again for the next endpoint.)
fn unsent_request(request: http::Request<UpstreamBody>) -> Unsent {
    let (mut parts, body) = request.into_parts();
    let (body, rest) = body.into_parts();
    if let (Some(rest), Some(streaming)) = (rest, parts.extensions.get::<Streaming>()) {
        streaming.put_back(rest);
    }
    if parts.extensions.remove::<HostOfEndpoint>().is_some() {
        parts.headers.remove(header::HOST);
        parts.uri = origin_form(&parts.uri);
    }
    Unsent(Box::new(http::Request::from_parts(parts, body)))
}

/// The path and query of `uri` as a request target: as they are when they start with `/` (or
/// are `*`), after a `/` when only a query is there (`http://host?q`), else `/`.
fn target_path(uri: &Uri) -> http::uri::PathAndQuery {
    use http::uri::PathAndQuery;
    match uri.path_and_query() {
        Some(path) if path.as_str().starts_with('/') || path.as_str() == "*" => path.clone(),
        Some(path) if path.as_str().starts_with('?') => {
            PathAndQuery::try_from(format!("/{}", path.as_str()))
                .unwrap_or_else(|_| PathAndQuery::from_static("/"))
        }
        _ => PathAndQuery::from_static("/"),
    }
}

/// The origin form of `uri`: its path and query ([`target_path`]).
fn origin_form(uri: &Uri) -> Uri {
    Uri::from(target_path(uri))
}

/// `http://<authority><path and query of original>`, from parts (no formatting, no
/// parsing); the authority is `host`, else the endpoint's.
fn upstream_uri(
    target: &SelectedEndpoint,
    host: Option<http::uri::Authority>,
    original: &Uri,
) -> Result<Uri, ProxyError> {
    const BAD: ProxyError = ProxyError::Internal("could not build the upstream URI");
    let authority = match (host, &target.authority) {
        (Some(host), _) => host,
        (None, Some(authority)) => authority.clone(),
        (None, None) => {
            http::uri::Authority::try_from(target.addr.to_string().as_str()).map_err(|_| BAD)?
        }
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(target_path(original));
    Uri::from_parts(parts).map_err(|_| BAD)
}

pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::CONNECTION_WAIT;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A loopback listener counting the connections it accepts, each served by `serve`.
    async fn counting_server<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (addr, connections)
    }

    /// An HTTP/1.1 server on loopback answering `ok` after `delay`, counting connections
    /// opened and (with `closed`) closed; a request with `x-close` is answered with
    /// `connection: close`.
    async fn backend_counting(
        delay: Duration,
        closed: Arc<AtomicUsize>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        counting_server(move |stream| {
            let closed = closed.clone();
            async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        let mut response = http::Response::new(Full::new(Bytes::from("ok")));
                        if request.headers().contains_key("x-close") {
                            response
                                .headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                closed.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await
    }

    async fn backend(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        backend_counting(delay, Arc::default()).await
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout_without_further_use() {
        let closed = Arc::new(AtomicUsize::new(0));
        let (addr, opened) = backend_counting(Duration::ZERO, closed.clone()).await;
        let pool =
            Pool::with_idle_timeout(BackendProtocol::Http1, None, Duration::from_millis(200));
        let request = http::Request::builder()
            .uri("/x")
            .header(header::HOST, "backend")
            .body(UpstreamBody::new(Bytes::new(), None, None))
            .expect("request");
        let response = pool
            .send(addr, request, |slot| {
                connect(addr, BackendProtocol::Http1, slot)
            })
            .await
            .expect("response");
        assert_eq!(body_of(response).await, "ok");
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert_eq!(closed.load(Ordering::SeqCst), 0, "pooled, open");
        // The sweeper closes it (bounded wait: 5 s).
        for _ in 0..100 {
            if closed.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(closed.load(Ordering::SeqCst), 1, "closed once idle");
        drop(pool);
    }

    fn to(addr: SocketAddr, headers: &[&'static str]) -> Request {
        let mut request = http::Request::builder()
            .uri("/x")
            .body(Bytes::new())
            .expect("request");
        for name in headers {
            request
                .headers_mut()
                .insert(*name, HeaderValue::from_static("1"));
        }
        request.extensions_mut().insert(SelectedEndpoint {
            backend: "b".into(),
            addr,
            authority: None,
            identity: None,
        });
        request
    }

    async fn body_of(response: crate::body::Response) -> Bytes {
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    }

    /// `n` concurrent requests to `addr` through `forwarder`, each answered `ok`.
    async fn all_ok(forwarder: &Forwarder, addr: SocketAddr, n: usize) {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let mut forwarder = forwarder.clone();
                tokio::spawn(async move {
                    let response = forwarder.call(to(addr, &[])).await.expect("response");
                    body_of(response).await
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.expect("join"), "ok");
        }
    }

    #[tokio::test]
    async fn a_request_that_could_not_connect_comes_back_for_another_endpoint() {
        // A port nobody listens on.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let other = SocketAddr::from(([127, 0, 0, 9], 8080));
        let target = |addr| SelectedEndpoint {
            backend: "b".into(),
            addr,
            authority: None,
            identity: None,
        };
        for protocol in [BackendProtocol::Http1, BackendProtocol::Http2] {
            for host in [Some("api.shop"), None] {
                let mut request = to(closed, &[]);
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = Uri::from_static("/p?q=1");
                *request.body_mut() = Bytes::from_static(b"payload");
                if let Some(host) = host {
                    request
                        .headers_mut()
                        .insert(header::HOST, HeaderValue::from_static(host));
                }
                let mut forwarder = Forwarder::new(protocol, None);
                let error = forwarder.call(request).await.expect_err("refused");
                let ProxyError::Connect {
                    unsent: Some(Unsent(back)),
                    ..
                } = error
                else {
                    panic!("{protocol:?} {host:?}: not handed back: {error:?}");
                };
                assert_eq!(back.method(), http::Method::POST);
                assert_eq!(back.body(), "payload", "{protocol:?} {host:?}");
                // Sent on to another endpoint: the client's host, else that endpoint's address
                // (not the failed one's).
                let again = upstream_request(*back, &target(other), protocol).expect("upstream");
                let expected = host.map_or(other.to_string(), str::to_string);
                let sent_host = match protocol {
                    BackendProtocol::Http1 => again
                        .headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string),
                    BackendProtocol::Http2 => again.uri().authority().map(|a| a.to_string()),
                };
                assert_eq!(sent_host, Some(expected), "{protocol:?} {host:?}");
                assert_eq!(
                    again.uri().path_and_query().map(|p| p.as_str()),
                    Some("/p?q=1")
                );
            }
        }
    }

    #[tokio::test]
    async fn connections_are_reused_once_their_response_has_ended() {
        let (addr, connections) = backend(Duration::ZERO).await;
        let mut forwarder = Forwarder::new(BackendProtocol::Http1, None);
        for _ in 0..5 {
            let response = forwarder.call(to(addr, &[])).await.expect("response");
            assert_eq!(body_of(response).await, "ok");
        }
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "one connection, reused"
        );
        // A connection the endpoint closes is not reused; the next request opens another.
        let response = forwarder.call(to(addr, &["x-close"])).await.expect("close");
        assert_eq!(body_of(response).await, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let response = forwarder.call(to(addr, &[])).await.expect("after close");
        assert_eq!(body_of(response).await, "ok");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        // A response dropped before its end takes its connection with it.
        let response = forwarder.call(to(addr, &[])).await.expect("dropped");
        drop(response);
        let response = forwarder.call(to(addr, &[])).await.expect("after drop");
        assert_eq!(body_of(response).await, "ok");
    }

    #[tokio::test]
    async fn under_max_connections_a_request_waits_for_a_connection_to_come_back() {
        let (addr, connections) = backend(Duration::from_millis(100)).await;
        let forwarder = Forwarder::new(BackendProtocol::Http1, Some(1));
        all_ok(&forwarder, addr, 3).await;
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn under_max_connections_an_idle_connection_gives_its_slot_to_another_endpoint() {
        let closed_a = Arc::new(AtomicUsize::new(0));
        let (a, opened_a) = backend_counting(Duration::ZERO, closed_a.clone()).await;
        let (b, opened_b) = backend(Duration::ZERO).await;
        let mut forwarder = Forwarder::new(BackendProtocol::Http1, Some(1));
        let response = forwarder.call(to(a, &[])).await.expect("to a");
        assert_eq!(body_of(response).await, "ok");
        // The one slot is held by the idle connection to `a`; `b` gets it without waiting for
        // the connection wait to run out (which would be a connection limit error).
        let started = tokio::time::Instant::now();
        let response = forwarder.call(to(b, &[])).await.expect("to b");
        assert_eq!(body_of(response).await, "ok");
        assert!(started.elapsed() < CONNECTION_WAIT);
        assert_eq!(opened_a.load(Ordering::SeqCst), 1);
        assert_eq!(opened_b.load(Ordering::SeqCst), 1);
        // a's server sees the close a little later (bounded wait: 5 s).
        for _ in 0..100 {
            if closed_a.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            closed_a.load(Ordering::SeqCst),
            1,
            "a's idle connection closed"
        );
        // And back: b's idle connection gives the slot to a.
        let response = forwarder.call(to(a, &[])).await.expect("to a again");
        assert_eq!(body_of(response).await, "ok");
        assert_eq!(opened_a.load(Ordering::SeqCst), 2);
    }

    /// An HTTP/2 server on loopback answering `ok` after `delay`, counting connections.
    async fn h2_backend(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        counting_server(move |stream| async move {
            let service = hyper::service::service_fn(
                move |_: http::Request<hyper::body::Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        "ok",
                    ))))
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await
    }

    #[tokio::test]
    async fn concurrent_http2_requests_share_the_connection_being_opened() {
        let (addr, connections) = h2_backend(Duration::from_millis(20)).await;
        let forwarder = Forwarder::new(BackendProtocol::Http2, None);
        let started = tokio::time::Instant::now();
        all_ok(&forwarder, addr, 10).await;
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "one shared connection"
        );
        // Woken when the connection came up, not when their wait ran out.
        assert!(started.elapsed() < CONNECTION_WAIT);
    }

    #[tokio::test]
    async fn under_max_connections_http2_requests_neither_open_more_nor_wait_out_the_bound() {
        let (addr, connections) = h2_backend(Duration::from_millis(20)).await;
        let forwarder = Forwarder::new(BackendProtocol::Http2, Some(1));
        let started = tokio::time::Instant::now();
        all_ok(&forwarder, addr, 10).await;
        all_ok(&forwarder, addr, 10).await;
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert!(started.elapsed() < CONNECTION_WAIT);
    }

    #[tokio::test]
    async fn when_the_request_opening_an_http2_connection_goes_away_one_waiter_takes_over() {
        let (addr, connections) = h2_backend(Duration::ZERO).await;
        let pool = Pool::new(BackendProtocol::Http2, None);
        let attempts = Arc::new(AtomicUsize::new(0));
        // The first attempt never ends; the others connect.
        let send = |pool: Arc<Pool<SocketAddr>>, attempts: Arc<AtomicUsize>| async move {
            let request = http::Request::builder()
                .uri(format!("http://{addr}/x"))
                .body(UpstreamBody::new(Bytes::new(), None, None))
                .expect("request");
            let connect = |slot| {
                let first = attempts.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        std::future::pending::<()>().await;
                    }
                    connect(addr, BackendProtocol::Http2, slot).await
                }
            };
            pool.send(addr, request, connect).await
        };
        let stuck = tokio::spawn(send(pool.clone(), attempts.clone()));
        for _ in 0..100 {
            if attempts.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let waiters: Vec<_> = (0..3)
            .map(|_| tokio::spawn(send(pool.clone(), attempts.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "the others wait");
        let started = tokio::time::Instant::now();
        stuck.abort();
        for waiter in waiters {
            let response = waiter.await.expect("join").expect("response");
            assert_eq!(body_of(response).await, "ok");
        }
        assert!(started.elapsed() < CONNECTION_WAIT);
        assert_eq!(attempts.load(Ordering::SeqCst), 2, "one waiter took over");
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn http2_requests_waiting_on_a_failed_connection_attempt_fail_too() {
        // A port nothing listens on: the first attempt fails, and each waiter then tries on
        // its own (and fails) instead of hanging.
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let forwarder = Forwarder::new(BackendProtocol::Http2, None);
        let started = tokio::time::Instant::now();
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let mut forwarder = forwarder.clone();
                tokio::spawn(async move { forwarder.call(to(addr, &[])).await })
            })
            .collect();
        for call in calls {
            let err = call.await.expect("join").expect_err("refused");
            assert!(matches!(err, ProxyError::Connect { .. }), "{err}");
        }
        // Woken when the attempt failed, not when their wait ran out.
        assert!(started.elapsed() < CONNECTION_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn no_slot_within_the_wait_is_a_connection_limit_error() {
        let mut forwarder = Forwarder::new(BackendProtocol::Http1, Some(0));
        let err = forwarder
            .call(to("127.0.0.1:9".parse().expect("addr"), &[]))
            .await
            .expect_err("no slot");
        assert!(
            matches!(err, ProxyError::ConnectionLimit { max: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("maxConnections"), "{err}");
    }

    #[test]
    fn requests_go_out_in_origin_form() {
        assert_eq!(
            origin_form(&Uri::from_static("http://a.example/x?y=1")),
            "/x?y=1"
        );
        assert_eq!(origin_form(&Uri::from_static("/p")), "/p");
        assert_eq!(origin_form(&Uri::from_static("http://a.example")), "/");
        // Only a query: it is kept, after a `/`.
        assert_eq!(
            origin_form(&Uri::from_static("http://a.example?y=1")),
            "/?y=1"
        );
        assert_eq!(origin_form(&Uri::from_static("*")), "*");
    }

    #[test]
    fn each_hop_by_hop_name_is_removed() {
        for name in HOP_BY_HOP.iter().chain([&header::TE]) {
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), HeaderValue::from_static("x"));
            headers.insert(header::HOST, HeaderValue::from_static("a"));
            strip_hop_by_hop(&mut headers);
            assert!(!headers.contains_key(name), "{name} kept");
            assert!(headers.contains_key(header::HOST));
        }
    }

    #[test]
    fn keep_alive_alone_removes_only_connection() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(header::HOST, HeaderValue::from_static("a"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 2);
        assert!(!headers.contains_key(header::CONNECTION));
        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn a_connection_header_naming_another_header_removes_that_one_too() {
        // Only `Connection` is a hop-by-hop name here, but one of its values names a header.
        for value in ["x-private", "Keep-Alive, x-private", "close,x-private"] {
            let mut headers = HeaderMap::new();
            headers.append(header::CONNECTION, HeaderValue::from_static("CLOSE"));
            headers.append(header::CONNECTION, HeaderValue::from_static(value));
            headers.insert("x-private", HeaderValue::from_static("1"));
            headers.insert(header::HOST, HeaderValue::from_static("a"));
            strip_hop_by_hop(&mut headers);
            assert_eq!(headers.len(), 1, "{value}: {headers:?}");
            assert!(headers.contains_key(header::HOST));
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-keep"));
        let mut grpc = HeaderMap::new();
        grpc.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut grpc);
        assert!(grpc.contains_key(header::TE));
    }

    #[test]
    fn the_upstream_uri_is_the_endpoint_and_the_original_path() {
        let addr: std::net::SocketAddr = "10.1.2.3:8080".parse().expect("addr");
        for authority in [
            None,
            Some(http::uri::Authority::from_static("10.1.2.3:8080")),
        ] {
            let target = SelectedEndpoint {
                backend: "b".into(),
                addr,
                identity: None,
                authority,
            };
            let uri = upstream_uri(&target, None, &Uri::from_static("/a/b?c=d")).expect("uri");
            assert_eq!(uri, "http://10.1.2.3:8080/a/b?c=d");
            let uri = upstream_uri(&target, None, &Uri::from_static("http://shop.example/x"))
                .expect("uri");
            assert_eq!(uri, "http://10.1.2.3:8080/x");
            let uri = upstream_uri(&target, None, &Uri::from_static("*")).expect("uri");
            assert_eq!(uri.path(), "*");
            let uri = upstream_uri(&target, None, &Uri::from_static("http://shop.example?q=1"))
                .expect("uri");
            assert_eq!(uri, "http://10.1.2.3:8080/?q=1");
        }
    }

    #[test]
    fn upstream_requests_per_protocol() {
        let target = SelectedEndpoint {
            backend: "b".into(),
            addr: "10.1.2.3:8080".parse().expect("addr"),
            identity: None,
            authority: None,
        };
        let request = |uri: &'static str, host: Option<&'static str>| {
            let mut request = http::Request::builder()
                .uri(uri)
                .header(header::CONNECTION, "keep-alive")
                .body(Bytes::new())
                .expect("request");
            if let Some(host) = host {
                request
                    .headers_mut()
                    .insert(header::HOST, HeaderValue::from_static(host));
            }
            request
        };
        // HTTP/1.1: origin form, a Host header (kept, from the URI's authority, or the
        // endpoint's), no hop-by-hop headers.
        for (uri, host, sent_host) in [
            ("/a?b=c", Some("shop.example"), "shop.example"),
            ("http://shop.example:81/a?b=c", None, "shop.example:81"),
            ("/a?b=c", None, "10.1.2.3:8080"),
        ] {
            let up =
                upstream_request(request(uri, host), &target, BackendProtocol::Http1).expect("h1");
            assert_eq!(up.uri(), "/a?b=c");
            assert_eq!(up.version(), Version::HTTP_11);
            assert_eq!(up.headers()[header::HOST], sent_host, "{uri} {host:?}");
            assert!(!up.headers().contains_key(header::CONNECTION));
        }
        // HTTP/2: the request's host as :authority, no Host header.
        for (uri, host, authority) in [
            ("/a?b=c", Some("shop.example:81"), "shop.example:81"),
            ("http://shop.example/a?b=c", None, "shop.example"),
            ("/a?b=c", None, "10.1.2.3:8080"),
            // Not a valid authority: the endpoint's instead.
            ("/a?b=c", Some("shop example"), "10.1.2.3:8080"),
        ] {
            let up =
                upstream_request(request(uri, host), &target, BackendProtocol::Http2).expect("h2");
            assert_eq!(up.version(), Version::HTTP_2);
            assert_eq!(
                up.uri().to_string(),
                format!("http://{authority}/a?b=c"),
                "{uri} {host:?}"
            );
            assert!(!up.headers().contains_key(header::HOST));
        }
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let mut request = http::Request::builder()
            .uri("/")
            .body(Bytes::new())
            .expect("request");
        request.extensions_mut().insert(SelectedEndpoint {
            backend: "b".into(),
            addr,
            authority: None,
            identity: None,
        });
        let err = tower::ServiceExt::oneshot(Forwarder::new(BackendProtocol::Http1, None), request)
            .await
            .expect_err("refused");
        assert!(matches!(err, ProxyError::Connect { .. }), "{err}");
        assert_eq!(err.status(), 503);
    }
}
