//! The L7 features as tower layers. Each works on buffered requests ([`crate::body::Request`])
//! and streaming responses ([`crate::body::Response`]) with [`ProxyError`] as error type, has
//! its own config type, and is tested against an in-memory `tower::service_fn`.
//!
//! Every service here is "always ready": `poll_ready` returns ready, so they compose freely and
//! can be boxed into a `BoxCloneSyncService` shared by every connection. A layer that calls its
//! inner service once, at once (timeout, balance, header modifiers) calls it from its own
//! `call` without `poll_ready` (that contract holds for every inner service here) and without
//! cloning it; one that calls later or more than once (retry, fault delay, limits) clones it and
//! drives the clone with `oneshot`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::error::ProxyError;

pub mod accesslog;
pub mod authz;
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

/// A shared, cloneable service: what a route or a backend compiles to. Like tower's
/// `BoxCloneSyncService`, except that
/// * cloning it is a reference count, not a copy of the whole layer stack into new boxes (a
///   route's service is cloned for every request);
/// * a service whose future is already a [`BoxFuture`] (every layer here) is built with
///   [`ProxyService::layered`] and its futures are not boxed a second time.
///
/// A call clones the layer it wraps (its fields are reference counts and the next
/// `ProxyService`) and calls the clone, so every service here must be "always ready" (see the
/// module docs): `poll_ready` is not forwarded.
pub struct ProxyService(Arc<dyn ErasedService>);

trait ErasedService: Send + Sync {
    fn call(&self, request: crate::body::Request) -> BoxFuture<ProxyResult>;
}

/// A service with any future, boxed per call.
struct Boxing<S>(S);

/// A service whose future is a [`BoxFuture`] already.
struct Boxed<S>(S);

impl<S: Inner> ErasedService for Boxing<S> {
    fn call(&self, request: crate::body::Request) -> BoxFuture<ProxyResult> {
        Box::pin(self.0.clone().call(request))
    }
}

impl<S> ErasedService for Boxed<S>
where
    S: Inner + tower::Service<crate::body::Request, Future = BoxFuture<ProxyResult>>,
{
    fn call(&self, request: crate::body::Request) -> BoxFuture<ProxyResult> {
        self.0.clone().call(request)
    }
}

impl ProxyService {
    /// Wraps `service` (its futures are boxed on each call). It must be always ready.
    pub fn new<S: Inner>(service: S) -> Self {
        ProxyService(Arc::new(Boxing(service)))
    }

    /// Wraps `service`, whose futures are boxed already (the layers of this module).
    pub fn layered<S>(service: S) -> Self
    where
        S: Inner + tower::Service<crate::body::Request, Future = BoxFuture<ProxyResult>>,
    {
        ProxyService(Arc::new(Boxed(service)))
    }

    /// Calls the service without `&mut` (and without a clone of this handle).
    pub fn call_shared(&self, request: crate::body::Request) -> BoxFuture<ProxyResult> {
        self.0.call(request)
    }
}

impl Clone for ProxyService {
    fn clone(&self) -> Self {
        ProxyService(self.0.clone())
    }
}

impl std::fmt::Debug for ProxyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyService")
    }
}

impl tower::Service<crate::body::Request> for ProxyService {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: crate::body::Request) -> Self::Future {
        self.0.call(request)
    }
}

/// The endpoint the balancer picked, read by the forwarder: in the request's
/// [`RequestContext`] (or, for a request without one, as a request extension); see
/// [`take_selected`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedEndpoint {
    /// The backend's name.
    pub backend: Arc<str>,
    /// The endpoint.
    pub addr: SocketAddr,
    /// `addr` as a URI authority when the balancer made it already (else the forwarder does).
    pub authority: Option<http::uri::Authority>,
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

/// A timeout the request is under, recorded in its [`RequestContext`] by
/// [`timeout::TimeoutLayer`]. When the timeout fires it drops the attempt; the balancer then
/// sees its attempt dropped at or after the earliest deadline and counts the endpoint as
/// failing for outlier detection (instead of the attempt going unnoticed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// When the timeout fires.
    pub at: tokio::time::Instant,
    /// Its configured length, for the error message.
    pub after: std::time::Duration,
    /// Which timeout it is (`timeouts.request` or `timeouts.backendRequest`).
    pub which: &'static str,
}

/// Request extension shared by all attempts of one request: which backend served it last, for
/// the golden metrics, and what the access log reports (route, endpoint, attempts, flags, trace
/// id, source, destination). The access log layer inserts it; [`crate::proxy::handle_from`]
/// makes one when absent.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    facts: Arc<Mutex<RequestFacts>>,
}

/// What the layers learned about one request (see [`RequestContext`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFacts {
    /// The route that matched.
    pub route: Option<Arc<str>>,
    /// The backend the weighted split chose last.
    pub backend: Option<Arc<str>>,
    /// The endpoint the balancer picked last.
    pub endpoint: Option<SocketAddr>,
    /// How many times the balancer picked an endpoint (attempts; retries are this minus one).
    pub attempts: u32,
    /// Why the answer is not the backend's: `timeout`, `rate_limited`, `fault_abort`,
    /// `no_healthy_upstream`, `overflow`, `upstream_connect_failure`, `upstream_reset`,
    /// `denied`, ...
    pub flags: Vec<&'static str>,
    /// The W3C trace id of the request's span.
    pub trace_id: Option<String>,
    /// Bytes of the request body: buffered, plus those of a streamed rest sent so far.
    pub request_bytes: u64,
    /// Who sent it (mesh mode).
    pub source: Option<Source>,
    /// The client's address as the waypoint saw it (the peer; in mesh mode the original
    /// client, port 0).
    pub peer: Option<SocketAddr>,
    /// The Service (`namespace/name`) it was sent to (mesh mode).
    pub destination: Option<Arc<str>>,
    /// The timeouts it is under: `timeouts.request`, then the current attempt's
    /// `timeouts.backendRequest` (each attempt replaces it).
    pub deadlines: [Option<Deadline>; 2],
    /// The endpoint the current attempt goes to, until the forwarder takes it.
    pub selected: Option<SelectedEndpoint>,
}

impl RequestFacts {
    /// The earliest of the timeouts the request is under.
    fn earliest_deadline(&self) -> Option<Deadline> {
        self.deadlines
            .iter()
            .flatten()
            .min_by_key(|d| d.at)
            .copied()
    }
}

impl RequestContext {
    fn with<T>(&self, f: impl FnOnce(&mut RequestFacts) -> T) -> T {
        match self.facts.lock() {
            Ok(mut facts) => f(&mut facts),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// The endpoint chosen by the last attempt, if any.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.with(|f| f.endpoint)
    }

    /// Records the backend the weighted split chose.
    pub fn set_backend(&self, backend: Arc<str>) {
        self.with(|f| f.backend = Some(backend));
    }

    /// The backend chosen by the last attempt, if any.
    pub fn backend(&self) -> Option<Arc<str>> {
        self.with(|f| f.backend.clone())
    }

    /// Records the matched route.
    pub fn set_route(&self, route: Arc<str>) {
        self.with(|f| f.route = Some(route));
    }

    /// Records an attempt to `selected` for the forwarder ([`take_selected`]), in one lock
    /// with the earliest deadline the attempt is under, which it returns.
    pub fn select(&self, selected: SelectedEndpoint) -> Option<Deadline> {
        self.with(|f| {
            f.endpoint = Some(selected.addr);
            f.attempts += 1;
            f.selected = Some(selected);
            f.earliest_deadline()
        })
    }

    /// Adds `flag` (once).
    pub fn flag(&self, flag: &'static str) {
        self.with(|f| {
            if !f.flags.contains(&flag) {
                f.flags.push(flag);
            }
        });
    }

    /// Records the trace id.
    pub fn set_trace_id(&self, trace_id: String) {
        self.with(|f| f.trace_id = Some(trace_id));
    }

    /// Records the request body's size.
    pub fn set_request_bytes(&self, bytes: u64) {
        self.with(|f| f.request_bytes = bytes);
    }

    /// Adds `bytes` of a streamed request body as they go out.
    pub fn add_request_bytes(&self, bytes: u64) {
        self.with(|f| f.request_bytes += bytes);
    }

    /// The request body bytes counted so far.
    pub fn request_bytes(&self) -> u64 {
        self.with(|f| f.request_bytes)
    }

    /// Records the sender.
    pub fn set_source(&self, source: Source) {
        self.with(|f| f.source = Some(source));
    }

    /// Records the client's address.
    pub fn set_peer(&self, peer: SocketAddr) {
        self.with(|f| f.peer = Some(peer));
    }

    /// Records the destination Service.
    pub fn set_destination(&self, service: Arc<str>) {
        self.with(|f| f.destination = Some(service));
    }

    /// The client's address, when recorded.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.with(|f| f.peer)
    }

    /// Who sent it, when known (mesh mode).
    pub fn source(&self) -> Option<Source> {
        self.with(|f| f.source.clone())
    }

    /// Records a timeout the request is under (replacing the last one of the same kind) and
    /// returns the earliest one in force.
    pub fn set_deadline(&self, deadline: Deadline) -> Deadline {
        let slot = usize::from(deadline.which == timeout::BACKEND_REQUEST);
        self.with(|f| {
            f.deadlines[slot] = Some(deadline);
            f.earliest_deadline().unwrap_or(deadline)
        })
    }

    /// The whole request's deadline (`timeouts.request`), when it has one.
    pub fn request_deadline(&self) -> Option<Deadline> {
        self.with(|f| f.deadlines[0])
    }

    /// The earliest timeout the request is under.
    pub fn deadline(&self) -> Option<Deadline> {
        self.with(|f| f.earliest_deadline())
    }

    /// Everything recorded so far.
    pub fn facts(&self) -> RequestFacts {
        self.with(|f| f.clone())
    }
}

/// The endpoint the balancer picked for `request`'s current attempt ([`SelectedEndpoint`]),
/// taken out of its context (or extensions), once.
pub fn take_selected<B>(request: &mut http::Request<B>) -> Option<SelectedEndpoint> {
    context_of(request)
        .and_then(|context| context.with(|f| f.selected.take()))
        .or_else(|| request.extensions_mut().remove::<SelectedEndpoint>())
}

/// The request's [`RequestContext`] (every request has one in the proxy; the layer unit tests
/// may leave it out).
pub fn context_of<B>(request: &http::Request<B>) -> Option<&RequestContext> {
    request.extensions().get::<RequestContext>()
}

/// Bounds every layer puts on its inner service.
pub trait Inner:
    tower::Service<
        crate::body::Request,
        Response = crate::body::Response,
        Error = ProxyError,
        Future: Send + 'static,
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

    /// A request for `path` with its [`RequestContext`], as the proxy makes them.
    pub fn request_in_context(path: &str) -> crate::body::Request {
        let mut request = request(path);
        request.extensions_mut().insert(RequestContext::default());
        request
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
