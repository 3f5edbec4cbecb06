//! The proxy: compiles a [`Config`] into per-listener route tables and service stacks, and
//! serves HTTP/1.1 and HTTP/2 (prior knowledge) on TCP listeners.
//!
//! Per request: route lookup -> `RequestRedirect` / `URLRewrite` filters -> the route's stack
//! (header modifiers -> rate limit -> fault -> `timeouts.request` -> retry ->
//! `timeouts.backendRequest` -> weighted backend choice) -> the backend's stack (concurrency
//! limit -> p2c endpoint choice with outlier detection -> forwarder) -> response. Each request
//! counts `weft_waypoint_requests_total{listener, route, backend, code}` and observes
//! `weft_waypoint_request_duration_seconds{listener, route, backend, code}`.
//!
//! Requests reach the backend with `x-forwarded-for` (the client appended) and
//! `x-forwarded-proto`, and `x-weft-attempt` when the route retries.
//!
//! Backends are shared by every route and listener of a config version, so their limits,
//! latency statistics and circuits are per backend, not per route.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

use crate::body::{self, Response};
use crate::config::{
    BackendConfig, Config, FilterConfig, RateLimitConfig, RedirectConfig, RetryConfig, RouteConfig,
    UrlRewriteConfig,
};
use crate::error::ProxyError;
use crate::filters;
use crate::forward::Forwarder;
use crate::layers::balance::{BalanceLayer, EndpointSet};
use crate::layers::circuit::ConcurrencyLimitLayer;
use crate::layers::fault::FaultLayer;
use crate::layers::headers::{HeaderModifier, HeaderModifierError, HeaderModifierLayer};
use crate::layers::ratelimit::RateLimitLayer;
use crate::layers::retry::RetryLayer;
use crate::layers::split::{WeightedBackend, WeightedSplit};
use crate::layers::timeout::{TimeoutConfig, TimeoutLayer};
use crate::layers::{PeerAddr, ProxyService, RequestContext};
use crate::route::{RouteError, RouteTable};

/// Longest time a client may take to send its request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A config that validated but could not be compiled, or a listener that could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyBuildError {
    /// Validation failed.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A route table could not be compiled.
    #[error("listener `{listener}`: {source}")]
    Route {
        /// The listener.
        listener: String,
        /// The cause.
        source: RouteError,
    },
    /// A header modifier could not be compiled.
    #[error("listener `{listener}` route `{route}`: {source}")]
    Headers {
        /// The listener.
        listener: String,
        /// The route.
        route: String,
        /// The cause.
        source: HeaderModifierError,
    },
    /// A listener could not bind its address.
    #[error(
        "listener `{listener}` could not bind {address}: {source}; free the port or change the listener's address"
    )]
    Bind {
        /// The listener.
        listener: String,
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A listener of the new config does not exist in the running one.
    #[error(
        "listener `{0}` is not running: reloads can change routes and backends but not add listeners or change addresses; restart the waypoint"
    )]
    ListenerChanged(String),
}

/// A route compiled for serving.
struct CompiledRoute {
    name: Arc<str>,
    redirect: Option<RedirectConfig>,
    rewrite: Option<UrlRewriteConfig>,
    service: ProxyService,
}

/// One listener's routes for one config version.
pub struct CompiledListener {
    name: Arc<str>,
    address: SocketAddr,
    version: u64,
    table: RouteTable,
    routes: Vec<CompiledRoute>,
    max_body: usize,
}

impl CompiledListener {
    /// The config version this was compiled from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The route table.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }
}

fn compile_backend(config: &BackendConfig) -> ProxyService {
    let name: Arc<str> = config.name.as_str().into();
    // Validation guarantees the endpoints parse.
    let addrs: Vec<SocketAddr> = config
        .endpoints
        .iter()
        .filter_map(|e| e.parse().ok())
        .collect();
    let set = Arc::new(EndpointSet::new(
        name.clone(),
        &addrs,
        config.load_balancer,
        config.outlier_detection,
    ));
    let service = ProxyService::new(BalanceLayer::new(set).layer(Forwarder::new(
        config.protocol,
        config.circuit_breaker.and_then(|c| c.max_connections),
    )));
    match config.circuit_breaker {
        Some(limits) => ProxyService::new(ConcurrencyLimitLayer::new(limits, name).layer(service)),
        None => service,
    }
}

/// State kept from one config version to the next where the config did not change: backends
/// (connection pools, latency statistics, circuits, limits), rate-limit buckets and retry
/// budgets. Without it a reload would un-eject failing endpoints and refill every bucket.
#[derive(Default, Clone)]
pub struct Carried {
    backends: HashMap<String, (BackendConfig, ProxyService)>,
    limiters: HashMap<(String, String), (RateLimitConfig, RateLimitLayer)>,
    retries: HashMap<(String, String), (RetryConfig, RetryLayer)>,
}

fn compile_route(
    listener: &str,
    index: usize,
    route: &RouteConfig,
    previous: &Carried,
    next: &mut Carried,
) -> Result<CompiledRoute, ProxyBuildError> {
    let name: Arc<str> = route
        .name
        .clone()
        .unwrap_or_else(|| format!("{listener}/{index}"))
        .into();
    let header_error = |source| ProxyBuildError::Headers {
        listener: listener.to_string(),
        route: name.to_string(),
        source,
    };
    let mut request_modifiers = Vec::new();
    let mut response_modifiers = Vec::new();
    let mut redirect = None;
    let mut rewrite = None;
    for filter in &route.filters {
        match filter {
            FilterConfig::RequestHeaderModifier {
                request_header_modifier,
            } => request_modifiers
                .push(HeaderModifier::new(request_header_modifier).map_err(header_error)?),
            FilterConfig::ResponseHeaderModifier {
                response_header_modifier,
            } => response_modifiers
                .push(HeaderModifier::new(response_header_modifier).map_err(header_error)?),
            FilterConfig::UrlRewrite { url_rewrite } => rewrite = Some(url_rewrite.clone()),
            FilterConfig::RequestRedirect { request_redirect } => {
                redirect = Some(request_redirect.clone())
            }
        }
    }

    let weighted: Vec<WeightedBackend> = route
        .backend_refs
        .iter()
        .filter_map(|r| {
            next.backends
                .get(&r.name)
                .map(|(_, service)| WeightedBackend {
                    name: r.name.as_str().into(),
                    weight: r.weight,
                    service: service.clone(),
                })
        })
        .collect();
    let mut service = match WeightedSplit::new(weighted) {
        Some(split) => ProxyService::new(split),
        // Redirect-only routes never reach the stack.
        None => ProxyService::new(tower::service_fn(|_| async {
            Err(ProxyError::Internal("route without backends"))
        })),
    };
    let timeouts = route.timeouts.unwrap_or_default();
    if let Some(after) = timeouts.backend_request {
        service = ProxyService::new(
            TimeoutLayer::new(TimeoutConfig {
                after: after.0,
                which: crate::layers::timeout::BACKEND_REQUEST,
            })
            .layer(service),
        );
    }
    if let Some(retry) = &route.retry
        && retry.attempts > 1
    {
        let key = (listener.to_string(), name.to_string());
        let layer = match previous.retries.get(&key) {
            Some((config, layer)) if config == retry => layer.clone(),
            _ => RetryLayer::new(retry.clone(), name.clone()),
        };
        next.retries.insert(key, (retry.clone(), layer.clone()));
        service = ProxyService::new(layer.layer(service));
    }
    if let Some(after) = timeouts.request {
        service = ProxyService::new(
            TimeoutLayer::new(TimeoutConfig {
                after: after.0,
                which: crate::layers::timeout::REQUEST,
            })
            .layer(service),
        );
    }
    if let Some(fault) = route.fault {
        service = ProxyService::new(FaultLayer::new(fault).layer(service));
    }
    if let Some(limit) = &route.rate_limit {
        let key = (listener.to_string(), name.to_string());
        let layer = match previous.limiters.get(&key) {
            Some((config, layer)) if config == limit => layer.clone(),
            _ => RateLimitLayer::new(limit, name.clone()),
        };
        next.limiters.insert(key, (limit.clone(), layer.clone()));
        service = ProxyService::new(layer.layer(service));
    }
    let headers = HeaderModifierLayer::new(request_modifiers, response_modifiers);
    if !headers.is_empty() {
        service = ProxyService::new(headers.layer(service));
    }
    // Outermost: the span covers the whole route stack (every retry attempt).
    service = ProxyService::new(
        crate::layers::trace::TraceLayer::for_route(listener, &name, route).layer(service),
    );
    Ok(CompiledRoute {
        name,
        redirect,
        rewrite,
        service,
    })
}

/// Compiles a validated config into one [`CompiledListener`] per listener.
pub fn compile(config: &Config, version: u64) -> Result<Vec<CompiledListener>, ProxyBuildError> {
    compile_carrying(config, version, &Carried::default()).map(|(listeners, _)| listeners)
}

/// Like [`compile`], reusing the state of `previous` for backends, rate limits and retry
/// budgets whose config is unchanged; returns the state to carry to the next version.
pub fn compile_carrying(
    config: &Config,
    version: u64,
    previous: &Carried,
) -> Result<(Vec<CompiledListener>, Carried), ProxyBuildError> {
    config.validate()?;
    let mut next = Carried::default();
    for backend in &config.backends {
        let service = match previous.backends.get(&backend.name) {
            Some((old, service)) if old == backend => service.clone(),
            _ => compile_backend(backend),
        };
        next.backends
            .insert(backend.name.clone(), (backend.clone(), service));
    }
    let mut listeners = Vec::new();
    for listener in &config.listeners {
        let table =
            RouteTable::compile(&listener.routes).map_err(|source| ProxyBuildError::Route {
                listener: listener.name.clone(),
                source,
            })?;
        let routes = listener
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| compile_route(&listener.name, i, route, previous, &mut next))
            .collect::<Result<_, _>>()?;
        let address = listener
            .address
            .parse()
            .map_err(|_| ProxyBuildError::ListenerChanged(listener.name.clone()))?;
        listeners.push(CompiledListener {
            name: listener.name.as_str().into(),
            address,
            version,
            table,
            routes,
            max_body: config.max_request_body_bytes,
        });
    }
    Ok((listeners, next))
}

/// The current routes of a listener, swapped atomically on reload.
pub type SharedListener = Arc<RwLock<Arc<CompiledListener>>>;

/// A running set of listeners whose routes can be reloaded.
pub struct Waypoint {
    listeners: Vec<SharedListener>,
    version: std::sync::atomic::AtomicU64,
    carried: std::sync::Mutex<Carried>,
}

impl Waypoint {
    /// Compiles `config` (version 1).
    pub fn new(config: &Config) -> Result<Waypoint, ProxyBuildError> {
        let (listeners, carried) = compile_carrying(config, 1, &Carried::default())?;
        Ok(Waypoint {
            listeners: listeners
                .into_iter()
                .map(|l| Arc::new(RwLock::new(Arc::new(l))))
                .collect(),
            version: std::sync::atomic::AtomicU64::new(1),
            carried: std::sync::Mutex::new(carried),
        })
    }

    /// Compiles `config` as the next version and swaps every listener's routes. In-flight
    /// requests finish on the old version. Listener names and addresses must not change.
    /// Backends, rate limits and retry budgets whose config did not change keep their state
    /// (pools, circuits, latency statistics, buckets).
    pub fn reload(&self, config: &Config) -> Result<u64, ProxyBuildError> {
        // One reload at a time; a failed one leaves the carried state as it was.
        let mut carried = match self.carried.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let version = self.version.load(std::sync::atomic::Ordering::SeqCst) + 1;
        let (compiled, next) = compile_carrying(config, version, &carried)?;
        let mut swaps = Vec::new();
        for new in compiled {
            let slot = self
                .listeners
                .iter()
                .find(|slot| {
                    slot.read()
                        .is_ok_and(|l| l.name == new.name && l.address == new.address)
                })
                .ok_or_else(|| ProxyBuildError::ListenerChanged(new.name.to_string()))?;
            swaps.push((slot, new));
        }
        for (slot, new) in swaps {
            if let Ok(mut current) = slot.write() {
                *current = Arc::new(new);
            }
        }
        *carried = next;
        self.version
            .store(version, std::sync::atomic::Ordering::SeqCst);
        Ok(version)
    }

    /// Binds every listener's address.
    pub async fn bind(&self) -> Result<Vec<(TcpListener, SharedListener)>, ProxyBuildError> {
        let mut bound = Vec::new();
        for slot in &self.listeners {
            let (name, address) = {
                let current = current(slot);
                (current.name.to_string(), current.address)
            };
            let socket =
                TcpListener::bind(address)
                    .await
                    .map_err(|source| ProxyBuildError::Bind {
                        listener: name,
                        address,
                        source,
                    })?;
            bound.push((socket, slot.clone()));
        }
        Ok(bound)
    }

    /// The listeners' current compiled routes.
    pub fn listeners(&self) -> Vec<Arc<CompiledListener>> {
        self.listeners.iter().map(current).collect()
    }
}

fn current(slot: &SharedListener) -> Arc<CompiledListener> {
    match slot.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// Accepts connections on `socket` forever, serving HTTP/1.1 and HTTP/2 with `listener`'s
/// current routes.
pub async fn serve(socket: TcpListener, listener: SharedListener) {
    serve_until(socket, listener, std::future::pending(), Duration::ZERO).await
}

/// Like [`serve`] until `shutdown` completes; then stops accepting, asks open connections to
/// finish (HTTP/1.1 after the response in flight, HTTP/2 with GOAWAY) and waits up to `drain`
/// for them.
pub async fn serve_until(
    socket: TcpListener,
    listener: SharedListener,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let listener = listener.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let routes = current(&listener);
                handle(routes, peer, request)
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // The timer makes hyper enforce its HTTP/1 header read timeout (30 s).
            builder.http1().timer(TokioTimer::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(socket);
    let open = graceful.count();
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open,
            ?drain,
            "connections still open after the drain timeout; closing them"
        );
    }
}

/// Serves one request with `listener`'s routes.
pub async fn handle(
    listener: Arc<CompiledListener>,
    peer: SocketAddr,
    request: http::Request<Incoming>,
) -> Result<Response, Infallible> {
    let start = Instant::now();
    let (parts, incoming) = request.into_parts();
    if parts.method == http::Method::CONNECT || parts.headers.contains_key(http::header::UPGRADE) {
        let response = body::text_response(
            http::StatusCode::NOT_IMPLEMENTED,
            "the waypoint does not proxy CONNECT or protocol upgrades (WebSocket) yet; send this traffic around the waypoint (L4)\n",
        );
        record(&listener.name, "", "", response.status(), start);
        return Ok(response);
    }
    let Some(matched) = listener.table.lookup(&parts) else {
        let response = body::text_response(
            http::StatusCode::NOT_FOUND,
            format!(
                "no route matched {} {}{} on listener `{}`; add a route whose hostnames and matches cover this request\n",
                parts.method,
                crate::route::request_host(&parts),
                parts.uri.path(),
                listener.name
            ),
        );
        record(&listener.name, "", "", response.status(), start);
        return Ok(response);
    };
    let route = &listener.routes[matched.route];
    if let Some(config) = &route.redirect {
        let response = filters::redirect(config, &parts, matched.matched_prefix_len)
            .unwrap_or_else(|e| {
                body::text_response(http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
            });
        record(&listener.name, &route.name, "", response.status(), start);
        return Ok(response);
    }
    let context = RequestContext::default();
    let body = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(incoming, listener.max_body).collect(),
    )
    .await;
    let response = match body {
        Err(_) => ProxyError::ClientTimeout {
            after: BODY_READ_TIMEOUT,
        }
        .into_response(),
        Ok(Err(e)) => {
            let error = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ProxyError::BodyTooLarge {
                    limit: listener.max_body,
                }
            } else {
                ProxyError::ClientBody {
                    reason: e.to_string(),
                }
            };
            error.into_response()
        }
        Ok(Ok(collected)) => {
            let mut request = http::Request::from_parts(parts, collected.to_bytes());
            match route
                .rewrite
                .as_ref()
                .map(|r| filters::rewrite(r, &mut request, matched.matched_prefix_len))
            {
                Some(Err(e)) => {
                    body::text_response(http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
                }
                _ => {
                    forwarded_headers(request.headers_mut(), peer);
                    request.extensions_mut().insert(PeerAddr(peer));
                    request.extensions_mut().insert(context.clone());
                    match route.service.clone().oneshot(request).await {
                        Ok(response) => response,
                        Err(error) => {
                            tracing::debug!(route = %route.name, %error, "request failed");
                            error.into_response()
                        }
                    }
                }
            }
        }
    };
    let backend = context.backend();
    record(
        &listener.name,
        &route.name,
        backend.as_deref().unwrap_or(""),
        response.status(),
        start,
    );
    Ok(response)
}

/// Appends the client to `x-forwarded-for` and sets `x-forwarded-proto` when absent.
fn forwarded_headers(headers: &mut http::HeaderMap, peer: SocketAddr) {
    const XFF: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
    const XFP: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
    let ip = peer.ip().to_string();
    let value = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {ip}"),
        None => ip,
    };
    if let Ok(value) = http::HeaderValue::from_str(&value) {
        headers.insert(XFF, value);
    }
    if !headers.contains_key(&XFP) {
        headers.insert(XFP, http::HeaderValue::from_static("http"));
    }
}

fn record(listener: &str, route: &str, backend: &str, status: http::StatusCode, start: Instant) {
    tracing::debug!(
        target: "weft_waypoint::access",
        listener,
        route,
        backend,
        code = status.as_u16(),
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    let labels = [
        ("listener", listener.to_string()),
        ("route", route.to_string()),
        ("backend", backend.to_string()),
        ("code", status.as_u16().to_string()),
    ];
    metrics::counter!("weft_waypoint_requests_total", &labels).increment(1);
    metrics::histogram!("weft_waypoint_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
}
