//! The innermost service: sends a request to the [`SelectedEndpoint`] over a pooled hyper
//! client (plain TCP; HTTP/1.1, or HTTP/2 with prior knowledge) and streams the response back.

use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{HeaderValue, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::Service;

use crate::body::Request;
use crate::config::BackendProtocol;
use crate::connect::{LimitedConnector, is_max_connections};
use crate::error::ProxyError;
use crate::layers::{BoxFuture, ProxyResult, SelectedEndpoint};

/// How long opening a TCP connection to an endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Headers that describe one hop and are never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names instead of eight lookups.
    if !headers
        .keys()
        .any(|name| name == header::TE || HOP_BY_HOP.contains(name))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `te: trailers` is the only TE value allowed in HTTP/2, and what gRPC sends.
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
}

/// Forwards requests to the endpoint chosen by the balancer.
#[derive(Clone, Debug)]
pub struct Forwarder {
    /// One pool per worker thread ([`crate::workers`]): a connection is driven by the runtime
    /// that opened it, so a worker only ever uses its own (one shared pool under
    /// `maxConnections`).
    clients: std::sync::Arc<[Client<LimitedConnector, Full<Bytes>>]>,
    protocol: BackendProtocol,
}

impl Forwarder {
    /// A forwarder with its own connection pool speaking `protocol`, holding at most
    /// `max_connections` connections open (unbounded when `None`).
    pub fn new(protocol: BackendProtocol, max_connections: Option<usize>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(Duration::from_secs(90));
        if protocol == BackendProtocol::Http2 {
            builder.http2_only(true);
        }
        let connector = LimitedConnector::new(connector, max_connections);
        // Under a connection limit one pool for all workers: separate pools would keep idle
        // connections a busy worker could not use while the limit makes it wait.
        let pools = if max_connections.is_some() {
            1
        } else {
            crate::workers::count()
        };
        Forwarder {
            clients: (0..pools)
                .map(|_| builder.build(connector.clone()))
                .collect(),
            protocol,
        }
    }
}

impl Service<Request> for Forwarder {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let client = self.clients[crate::workers::current() % self.clients.len()].clone();
        let protocol = self.protocol;
        Box::pin(async move {
            let Some(target) = request.extensions_mut().remove::<SelectedEndpoint>() else {
                return Err(ProxyError::Internal(
                    "the forwarder ran without a selected endpoint",
                ));
            };
            let (mut parts, body) = request.into_parts();
            // HTTP/2 clients send the host as :authority; HTTP/1.1 endpoints need a Host header.
            if !parts.headers.contains_key(header::HOST)
                && let Some(authority) = parts.uri.authority()
                && let Ok(value) = HeaderValue::from_str(authority.as_str())
            {
                parts.headers.insert(header::HOST, value);
            }
            strip_hop_by_hop(&mut parts.headers);
            parts.uri = upstream_uri(&target, &parts.uri)?;
            parts.version = match protocol {
                BackendProtocol::Http1 => Version::HTTP_11,
                BackendProtocol::Http2 => Version::HTTP_2,
            };
            // For HTTP/2 endpoints the :authority is the endpoint's address (the client connects
            // by URI); the original host travels in the Host header, which HTTP/2 allows.
            let upstream = http::Request::from_parts(parts, Full::new(body));
            match client.request(upstream).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Ok(http::Response::from_parts(parts, body.boxed()))
                }
                Err(e) if let Some(max) = is_max_connections(&e) => {
                    Err(ProxyError::ConnectionLimit {
                        backend: target.backend.to_string(),
                        max,
                    })
                }
                Err(e) if e.is_connect() => Err(ProxyError::Connect {
                    backend: target.backend.to_string(),
                    endpoint: target.addr,
                    reason: error_chain(&e),
                }),
                Err(e) => Err(ProxyError::Upstream {
                    backend: target.backend.to_string(),
                    endpoint: target.addr,
                    reason: error_chain(&e),
                }),
            }
        })
    }
}

/// `http://<endpoint><path and query of original>`, from parts (no formatting, no parsing).
fn upstream_uri(target: &SelectedEndpoint, original: &Uri) -> Result<Uri, ProxyError> {
    const BAD: ProxyError = ProxyError::Internal("could not build the upstream URI");
    let authority = match &target.authority {
        Some(authority) => authority.clone(),
        None => {
            http::uri::Authority::try_from(target.addr.to_string().as_str()).map_err(|_| BAD)?
        }
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        original
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
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
            let uri = upstream_uri(&target, &Uri::from_static("/a/b?c=d")).expect("uri");
            assert_eq!(uri, "http://10.1.2.3:8080/a/b?c=d");
            let uri =
                upstream_uri(&target, &Uri::from_static("http://shop.example/x")).expect("uri");
            assert_eq!(uri, "http://10.1.2.3:8080/x");
            let uri = upstream_uri(&target, &Uri::from_static("*")).expect("uri");
            assert_eq!(uri.path(), "*");
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
