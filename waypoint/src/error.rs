//! Errors raised while proxying a request, and their mapping to HTTP responses.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

use crate::body::{self, Body};

/// A failure of one proxied request. Every variant maps to a status code through
/// [`ProxyError::status`]; [`ProxyError::into_response`] turns it into the answer to the client.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The TCP connection to the endpoint could not be opened.
    #[error(
        "could not connect to endpoint {endpoint} of backend `{backend}`: {reason}; check that the endpoint listens and that the waypoint can reach it"
    )]
    Connect {
        /// Backend the endpoint belongs to.
        backend: String,
        /// The endpoint.
        endpoint: SocketAddr,
        /// The connector's error.
        reason: String,
        /// The request, when it never left: the balancer hands it to another endpoint.
        unsent: Option<Unsent>,
    },
    /// The connection broke, or the endpoint answered with something that is not HTTP.
    #[error(
        "endpoint {endpoint} of backend `{backend}` reset the request or broke the protocol: {reason}; check the endpoint's logs and that it speaks the configured protocol"
    )]
    Upstream {
        /// Backend the endpoint belongs to.
        backend: String,
        /// The endpoint.
        endpoint: SocketAddr,
        /// The client's error.
        reason: String,
    },
    /// No response headers within the configured timeout.
    #[error(
        "upstream timed out after {after:?} ({which}); raise the route's {which} if the backend is legitimately slow"
    )]
    Timeout {
        /// The timeout that fired.
        after: Duration,
        /// Which timeout: `timeouts.request` or `timeouts.backendRequest`.
        which: &'static str,
    },
    /// Every endpoint of the backend is ejected by outlier detection (or the backend has none).
    #[error(
        "no healthy endpoint in backend `{backend}`: all are ejected by outlier detection; fix the endpoints or wait for the half-open probe after outlierDetection.baseEjectionTime"
    )]
    NoHealthyEndpoint {
        /// The backend.
        backend: String,
    },
    /// The backend has no endpoints right now (a mesh backend whose Service has no ready
    /// endpoint in the mesh view).
    #[error(
        "backend `{backend}` has no endpoints: its Service has no ready endpoint in the mesh view (check the Service's selector and its pods' readiness)"
    )]
    NoEndpoints {
        /// The backend.
        backend: String,
    },
    /// The backend's circuit breaker limits (concurrent and pending requests) are exhausted.
    #[error(
        "backend `{backend}` is overloaded: {max_concurrent} concurrent and {max_pending} pending requests already; raise circuitBreaker.maxConcurrentRequests / maxPendingRequests or add endpoints"
    )]
    Overflow {
        /// The backend.
        backend: String,
        /// circuitBreaker.maxConcurrentRequests.
        max_concurrent: usize,
        /// circuitBreaker.maxPendingRequests.
        max_pending: usize,
    },
    /// Every connection allowed by `circuitBreaker.maxConnections` stayed busy.
    #[error(
        "backend `{backend}` has all {max} connections allowed by circuitBreaker.maxConnections busy; raise maxConnections or add endpoints"
    )]
    ConnectionLimit {
        /// The backend.
        backend: String,
        /// circuitBreaker.maxConnections.
        max: usize,
    },
    /// The request body could not be read from the client.
    #[error(
        "could not read the request body from the client: {reason}; the client closed or broke the stream"
    )]
    ClientBody {
        /// The underlying error.
        reason: String,
    },
    /// A bug: a layer below the backend choice ran without the data it needs.
    #[error("internal error: {0}; this is a waypoint bug, please report it")]
    Internal(&'static str),
}

/// A request that never left the waypoint because no connection to its endpoint could be
/// opened; sending it elsewhere is safe whatever its method
/// ([`crate::layers::balance`]'s connect failover).
pub struct Unsent(pub Box<body::Request>);

impl std::fmt::Debug for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Unsent({} {})", self.0.method(), self.0.uri())
    }
}

impl ProxyError {
    /// The status code answered to the client for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect { .. }
            | ProxyError::NoHealthyEndpoint { .. }
            | ProxyError::NoEndpoints { .. }
            | ProxyError::Overflow { .. }
            | ProxyError::ConnectionLimit { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The access log flag of this error (`timeout`, `no_healthy_upstream`, `overflow`,
    /// `upstream_connect_failure`, `upstream_reset`), if any.
    pub fn flag(&self) -> Option<&'static str> {
        match self {
            ProxyError::Timeout { .. } => Some("timeout"),
            ProxyError::NoHealthyEndpoint { .. } | ProxyError::NoEndpoints { .. } => {
                Some("no_healthy_upstream")
            }
            ProxyError::Overflow { .. } | ProxyError::ConnectionLimit { .. } => Some("overflow"),
            ProxyError::Connect { .. } => Some("upstream_connect_failure"),
            ProxyError::Upstream { .. } => Some("upstream_reset"),
            ProxyError::ClientBody { .. } | ProxyError::Internal(_) => None,
        }
    }

    /// The answer to the client: the status of [`ProxyError::status`] and the message as body.
    pub fn into_response(self) -> http::Response<Body> {
        let status = self.status();
        body::text_response(status, format!("{self}\n"))
    }
}
