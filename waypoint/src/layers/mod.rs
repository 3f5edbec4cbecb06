//! The L7 features as tower layers. Each works on buffered requests ([`crate::body::Request`])
//! and streaming responses ([`crate::body::Response`]) with [`ProxyError`] as error type, has
//! its own config type, and is tested against an in-memory `tower::service_fn`.
//!
//! Every service here is "always ready": `poll_ready` returns ready and `call` clones the inner
//! service and drives it with `oneshot`, so they compose freely and can be boxed into a
//! `BoxCloneSyncService` shared by every connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::error::ProxyError;

pub mod balance;
pub mod circuit;
pub mod fault;
pub mod headers;
pub mod ratelimit;
pub mod retry;
pub mod split;
pub mod timeout;
pub mod trace;

/// The boxed future every layer returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The result every layer produces.
pub type ProxyResult = Result<crate::body::Response, ProxyError>;

/// A boxed, cloneable, shareable service: what a route or a backend compiles to.
pub type ProxyService =
    tower::util::BoxCloneSyncService<crate::body::Request, crate::body::Response, ProxyError>;

/// Request extension: the client's socket address (the rate limiter's default source key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Request extension: the endpoint the balancer picked, read by the forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedEndpoint {
    /// The backend's name.
    pub backend: Arc<str>,
    /// The endpoint.
    pub addr: SocketAddr,
    /// The SPIFFE ID the endpoint must present (mesh endpoints, reached through HBONE).
    pub identity: Option<Arc<str>>,
}

/// Request extension: who sent the request, when the waypoint knows it (mesh mode: the peer
/// of the HBONE connection the request arrived in). Kept for metrics, the per-source rate
/// limit and, later, L7 authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The SPIFFE ID of the client's certificate (the source pod's identity).
    pub principal: Arc<str>,
    /// The original client address (`Forwarded: for=` of the CONNECT, else the tunnel's peer).
    pub ip: std::net::IpAddr,
    /// `namespace/name` of the workload with that address in the mesh view, when known.
    pub workload: Option<Arc<str>>,
}

/// Request extension: the earliest timeout the request is under, set by
/// [`timeout::TimeoutLayer`]. The balancer enforces it itself, so that an endpoint that does
/// not answer in time counts as failing for outlier detection (instead of its attempt being
/// dropped unnoticed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// When the timeout fires.
    pub at: tokio::time::Instant,
    /// Its configured length, for the error message.
    pub after: std::time::Duration,
    /// Which timeout it is (`timeouts.request` or `timeouts.backendRequest`).
    pub which: &'static str,
}

/// Request extension shared by all attempts of one request: which backend served it last,
/// for the golden metrics.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    backend: Arc<Mutex<Option<Arc<str>>>>,
    endpoint: Arc<Mutex<Option<std::net::SocketAddr>>>,
}

impl RequestContext {
    /// Records the endpoint the balancer chose (the last attempt's wins).
    pub fn set_endpoint(&self, endpoint: std::net::SocketAddr) {
        if let Ok(mut slot) = self.endpoint.lock() {
            *slot = Some(endpoint);
        }
    }

    /// The endpoint chosen by the last attempt, if any.
    pub fn endpoint(&self) -> Option<std::net::SocketAddr> {
        self.endpoint.lock().ok().and_then(|slot| *slot)
    }

    /// Records the backend the weighted split chose.
    pub fn set_backend(&self, backend: Arc<str>) {
        if let Ok(mut slot) = self.backend.lock() {
            *slot = Some(backend);
        }
    }

    /// The backend chosen by the last attempt, if any.
    pub fn backend(&self) -> Option<Arc<str>> {
        self.backend.lock().ok().and_then(|slot| slot.clone())
    }
}

/// Bounds every layer puts on its inner service.
pub trait Inner:
    tower::Service<
        crate::body::Request,
        Response = crate::body::Response,
        Error = ProxyError,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Inner for S where
    S: tower::Service<
            crate::body::Request,
            Response = crate::body::Response,
            Error = ProxyError,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

#[cfg(test)]
pub(crate) mod testing {
    //! In-memory services for the layer tests.
    use super::*;
    use crate::body;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A request for `path`.
    pub fn request(path: &str) -> crate::body::Request {
        http::Request::builder()
            .uri(path)
            .body(Bytes::new())
            .expect("request")
    }

    /// A service answering `status` and counting calls.
    pub fn status_service(status: u16, calls: Arc<AtomicUsize>) -> ProxyService {
        ProxyService::new(tower::service_fn(move |_req: crate::body::Request| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, ProxyError>(body::text_response(
                    http::StatusCode::from_u16(status).expect("status"),
                    "x",
                ))
            }
        }))
    }
}
