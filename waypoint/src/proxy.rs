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
//!
//! With an access log ([`Waypoint::with_access_log`], [`serve_logged_until`]) each connection's
//! service is wrapped in the access log ([`HttpService`](crate::layers::accesslog::HttpService)), outside everything above, so the line has the
//! status the client got. [`handle_from`] records what it learns (route, source, destination,
//! request size, error flags) in the request's [`RequestContext`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::Layer;

use crate::body::{self, Response, Streaming};
use crate::config::{
    BackendConfig, BackendProtocol, Config, FilterConfig, LoadBalancerConfig, Mode,
    RateLimitConfig, RedirectConfig, RetryConfig, RouteConfig, UrlRewriteConfig,
};
use crate::error::ProxyError;
use crate::filters;
use crate::forward::Forwarder;
use crate::golden::{self, Golden, RequestBytes};
use crate::layers::accesslog::{AccessLog, HttpService};
use crate::layers::balance::{BalanceLayer, EndpointSet};
use crate::layers::circuit::ConcurrencyLimitLayer;
use crate::layers::fault::FaultLayer;
use crate::layers::headers::{HeaderModifier, HeaderModifierError, HeaderModifierLayer};
use crate::layers::ratelimit::RateLimitLayer;
use crate::layers::retry::RetryLayer;
use crate::layers::split::{WeightedBackend, WeightedSplit};
use crate::layers::timeout::{TimeoutConfig, TimeoutLayer};
use crate::layers::{ProxyService, RequestContext, Source};
use crate::mesh::forward::MeshForwarder;
use crate::mesh::{MeshContext, ServiceEndpoints};
use crate::route::{RouteError, RouteTable};
use weft_api::model::ServiceInfo;

/// The size of a request answered before its body was read.
const NO_BODY: RequestBytes = RequestBytes::Known(0);

/// How long the waypoint waits for more of a request body before it forwards the request
/// with what it has and streams the rest: the body of a unary request comes with its headers
/// or right after them, while a gRPC client or bidirectional stream, or a slow upload, goes on.
pub const STREAM_AFTER: Duration = Duration::from_millis(20);

/// The longest the waypoint reads a request body before forwarding it: a client trickling its
/// body in (one byte every 10 ms) is streamed to the endpoint after this, not held.
pub const BUFFER_AT_MOST: Duration = Duration::from_secs(1);

/// Reads `incoming` to its end, so that retries can resend the request; or, when the body
/// pauses for [`STREAM_AFTER`], outgrows `max` bytes (`maxRequestBodyBytes`) or takes longer
/// than [`BUFFER_AT_MOST`], stops there: the bytes so far, and the rest to stream
/// ([`Streaming`]; such a request is not retried).
async fn read_body<B>(mut incoming: B, max: usize) -> Result<(Bytes, Option<B>), ProxyError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    // One frame (most bodies) is kept as it is; more are copied together.
    let mut first: Option<Bytes> = None;
    let mut more = bytes::BytesMut::new();
    let take = |first: Option<Bytes>, more: bytes::BytesMut| match first {
        Some(first) if more.is_empty() => first,
        _ => more.freeze(),
    };
    let deadline = tokio::time::Instant::now() + BUFFER_AT_MOST;
    loop {
        let wait = (tokio::time::Instant::now() + STREAM_AFTER).min(deadline);
        let frame = match tokio::time::timeout_at(wait, incoming.frame()).await {
            Err(_) => return Ok((take(first, more), Some(incoming))),
            Ok(None) => return Ok((take(first, more), None)),
            Ok(Some(Err(e))) => {
                return Err(ProxyError::ClientBody {
                    reason: e.to_string(),
                });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        // Request trailers are not forwarded (as before the body streamed).
        if let Ok(data) = frame.into_data() {
            match first.take() {
                None if more.is_empty() => first = Some(data),
                kept => {
                    if let Some(kept) = kept {
                        more.extend_from_slice(&kept);
                    }
                    more.extend_from_slice(&data);
                }
            }
        }
        if incoming.is_end_stream() {
            return Ok((take(first, more), None));
        }
        let len = first.as_ref().map_or(0, Bytes::len) + more.len();
        if len > max {
            return Ok((take(first, more), Some(incoming)));
        }
    }
}

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
    /// Plain listeners: the socket address.
    address: Option<SocketAddr>,
    /// Mesh listeners: the Service (`namespace/name`) and port they are attached to.
    attach: Option<(String, u16)>,
    /// Mesh listeners: the mesh view, to name the chosen endpoint's workload in the metrics.
    mesh: Option<crate::mesh::Mesh>,
    /// Mesh listeners: `namespace/name` of the Service (the metrics' destination).
    destination: Option<Arc<str>>,
    /// The golden metrics' handles of this listener's series.
    series: Arc<crate::golden::SeriesCache>,
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

    /// The listener's name (the `listener` label of the metrics).
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn compile_backend(config: &BackendConfig, mesh: Option<&Arc<MeshContext>>) -> ProxyService {
    let name: Arc<str> = config.name.as_str().into();
    let max_connections = config.circuit_breaker.and_then(|c| c.max_connections);
    let service = match (mesh, &config.service, config.port) {
        (Some(ctx), Some(service), Some(port)) => {
            let source = ServiceEndpoints::new(
                ctx.mesh.clone(),
                format!("{}/{service}", ctx.namespace),
                port,
            );
            let set = Arc::new(EndpointSet::dynamic(
                name.clone(),
                Box::new(source),
                config.load_balancer,
                config.outlier_detection,
            ));
            ProxyService::layered(BalanceLayer::new(set).layer(MeshForwarder::new(
                ctx.clone(),
                config.protocol,
                max_connections,
            )))
        }
        _ => {
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
            ProxyService::layered(
                BalanceLayer::new(set).layer(Forwarder::new(config.protocol, max_connections)),
            )
        }
    };
    match config.circuit_breaker {
        Some(limits) => {
            ProxyService::layered(ConcurrencyLimitLayer::new(limits, name).layer(service))
        }
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
        Some(split) => ProxyService::layered(split),
        // Redirect-only routes never reach the stack.
        None => ProxyService::new(tower::service_fn(|_| async {
            Err(ProxyError::Internal("route without backends"))
        })),
    };
    let timeouts = route.timeouts.unwrap_or_default();
    if let Some(after) = timeouts.backend_request {
        service = ProxyService::layered(
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
        service = ProxyService::layered(layer.layer(service));
    }
    if let Some(after) = timeouts.request {
        let config = TimeoutConfig {
            after: after.0,
            which: crate::layers::timeout::REQUEST,
        };
        // With an attempt timeout inside, its timer enforces the request's deadline too (and
        // the retry backoff ends at it): one timer per attempt, none of its own.
        let layer = if timeouts.backend_request.is_some() {
            TimeoutLayer::recorded(config)
        } else {
            TimeoutLayer::new(config)
        };
        service = ProxyService::layered(layer.layer(service));
    }
    if let Some(fault) = route.fault {
        service = ProxyService::layered(FaultLayer::new(fault).layer(service));
    }
    if let Some(limit) = &route.rate_limit {
        let key = (listener.to_string(), name.to_string());
        let layer = match previous.limiters.get(&key) {
            Some((config, layer)) if config == limit => layer.clone(),
            _ => RateLimitLayer::new(limit, name.clone()),
        };
        next.limiters.insert(key, (limit.clone(), layer.clone()));
        service = ProxyService::layered(layer.layer(service));
    }
    let headers = HeaderModifierLayer::new(request_modifiers, response_modifiers);
    if !headers.is_empty() {
        service = ProxyService::layered(headers.layer(service));
    }
    // Outermost: the span covers the whole route stack (every retry attempt). Only when spans
    // are exported: otherwise the waypoint passes trace context through untouched.
    if crate::layers::trace::exporting() {
        service = ProxyService::layered(
            crate::layers::trace::TraceLayer::for_route(listener, &name, route).layer(service),
        );
    }
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
    compile_in(config, version, previous, None)
}

/// [`compile_carrying`] in mesh mode when `mesh` is set (Service listeners and backends).
fn compile_in(
    config: &Config,
    version: u64,
    previous: &Carried,
    mesh: Option<&Arc<MeshContext>>,
) -> Result<(Vec<CompiledListener>, Carried), ProxyBuildError> {
    config.validate_for(if mesh.is_some() {
        Mode::Mesh
    } else {
        Mode::Standalone
    })?;
    let mut next = Carried::default();
    for backend in &config.backends {
        let service = match previous.backends.get(&backend.name) {
            Some((old, service)) if old == backend => service.clone(),
            _ => compile_backend(backend, mesh),
        };
        next.backends
            .insert(backend.name.clone(), (backend.clone(), service));
    }
    let mut listeners = Vec::new();
    for listener in &config.listeners {
        let attach = match (mesh, &listener.service, listener.port) {
            (Some(ctx), Some(service), Some(port)) => {
                Some((format!("{}/{service}", ctx.namespace), service, port))
            }
            _ => None,
        };
        // Routes attached to a Service also match the Service's own host names.
        let routes_for_table: std::borrow::Cow<'_, [RouteConfig]> = match (&attach, mesh) {
            (Some((_, service, _)), Some(ctx)) => {
                let names = crate::mesh::service_hostnames(service, &ctx.namespace);
                listener
                    .routes
                    .iter()
                    .map(|route| {
                        let mut route = route.clone();
                        if !route.hostnames.is_empty() {
                            for name in &names {
                                if !route.hostnames.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                                    route.hostnames.push(name.clone());
                                }
                            }
                        }
                        route
                    })
                    .collect::<Vec<_>>()
                    .into()
            }
            _ => listener.routes.as_slice().into(),
        };
        let table =
            RouteTable::compile(&routes_for_table).map_err(|source| ProxyBuildError::Route {
                listener: listener.name.clone(),
                source,
            })?;
        let routes = listener
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| compile_route(&listener.name, i, route, previous, &mut next))
            .collect::<Result<_, _>>()?;
        let address = match (&listener.address, &attach) {
            (Some(address), _) => Some(
                address
                    .parse()
                    .map_err(|_| ProxyBuildError::ListenerChanged(listener.name.clone()))?,
            ),
            (None, Some(_)) => None,
            (None, None) => return Err(ProxyBuildError::ListenerChanged(listener.name.clone())),
        };
        listeners.push(CompiledListener {
            name: listener.name.as_str().into(),
            address,
            mesh: attach.as_ref().and(mesh).map(|ctx| ctx.mesh.clone()),
            destination: attach.as_ref().map(|(key, _, _)| Arc::from(key.as_str())),
            series: Arc::default(),
            attach: attach.map(|(key, _, port)| (key, port)),
            version,
            table,
            routes,
            max_body: config.max_request_body_bytes,
        });
    }
    Ok((listeners, next))
}

/// The implicit listener of a Service port with no listener attached: one route, any host and
/// path, to the Service itself (its ready endpoints through HBONE), so that binding a Service
/// to the waypoint never breaks it. The backend speaks HTTP/2 when the port's `appProtocol`
/// says so (`http2`, `grpc`, `kubernetes.io/h2c`), else HTTP/1.1.
fn default_listener(
    ctx: &Arc<MeshContext>,
    service: &ServiceInfo,
    port: u16,
    version: u64,
    max_body: usize,
) -> CompiledListener {
    let key = service.key();
    let name: Arc<str> = format!("{key}:{port}").into();
    let protocol = match service
        .ports
        .iter()
        .find(|p| p.port == port)
        .map(|p| p.app_protocol.to_ascii_lowercase())
        .as_deref()
    {
        Some("http2" | "grpc" | "h2c" | "kubernetes.io/h2c") => BackendProtocol::Http2,
        _ => BackendProtocol::Http1,
    };
    let set = Arc::new(EndpointSet::dynamic(
        name.clone(),
        Box::new(ServiceEndpoints::new(ctx.mesh.clone(), key.clone(), port)),
        LoadBalancerConfig::default(),
        None,
    ));
    let backend = ProxyService::layered(BalanceLayer::new(set).layer(MeshForwarder::new(
        ctx.clone(),
        protocol,
        None,
    )));
    let split = WeightedSplit::new(vec![WeightedBackend {
        name: name.clone(),
        weight: 1,
        service: backend,
    }])
    .map(ProxyService::new)
    .unwrap_or_else(|| {
        ProxyService::new(tower::service_fn(|_| async {
            Err(ProxyError::Internal("default route without backend"))
        }))
    });
    let table = RouteTable::compile(&[RouteConfig::default()]).unwrap_or_else(|e| {
        // A route without matches and hostnames always compiles.
        tracing::error!(error = %e, "the default route did not compile");
        RouteTable::empty()
    });
    CompiledListener {
        name,
        address: None,
        destination: Some(Arc::from(key.as_str())),
        attach: Some((key, port)),
        mesh: Some(ctx.mesh.clone()),
        series: Arc::default(),
        version,
        table,
        routes: vec![CompiledRoute {
            name: "default".into(),
            redirect: None,
            rewrite: None,
            service: split,
        }],
        max_body,
    }
}

/// The current routes of a listener, swapped atomically on reload.
pub type SharedListener = Arc<RwLock<Arc<CompiledListener>>>;

/// Listeners attached to Service ports, by (`namespace/name`, port).
type Attached = HashMap<(String, u16), Arc<CompiledListener>>;

/// A running set of listeners whose routes can be reloaded.
pub struct Waypoint {
    listeners: Vec<SharedListener>,
    version: std::sync::atomic::AtomicU64,
    carried: std::sync::Mutex<Carried>,
    /// Mesh mode.
    mesh: Option<Arc<MeshContext>>,
    /// Mesh mode: the configured listeners attached to Service ports (swapped on reload).
    attached: RwLock<Arc<Attached>>,
    /// Mesh mode: implicit default listeners of Service ports without one, made on first use.
    defaults: std::sync::Mutex<Attached>,
    max_body: std::sync::atomic::AtomicUsize,
    /// Where each request's access log line goes (`None`: off).
    access_log: Option<AccessLog>,
}

impl Waypoint {
    /// Compiles `config` (version 1), standalone.
    pub fn new(config: &Config) -> Result<Waypoint, ProxyBuildError> {
        Self::build(config, None)
    }

    /// Compiles `config` (version 1) in mesh mode: listeners may attach to Service ports (served
    /// by [`crate::mesh::server`]) and backends may be Services of the mesh.
    pub fn new_mesh(config: &Config, mesh: Arc<MeshContext>) -> Result<Waypoint, ProxyBuildError> {
        Self::build(config, Some(mesh))
    }

    fn build(config: &Config, mesh: Option<Arc<MeshContext>>) -> Result<Waypoint, ProxyBuildError> {
        let (listeners, carried) = compile_in(config, 1, &Carried::default(), mesh.as_ref())?;
        let (attached, plain): (Vec<_>, Vec<_>) =
            listeners.into_iter().partition(|l| l.attach.is_some());
        Ok(Waypoint {
            listeners: plain
                .into_iter()
                .map(|l| Arc::new(RwLock::new(Arc::new(l))))
                .collect(),
            version: std::sync::atomic::AtomicU64::new(1),
            carried: std::sync::Mutex::new(carried),
            mesh,
            attached: RwLock::new(Arc::new(index_attached(attached))),
            defaults: std::sync::Mutex::new(HashMap::new()),
            max_body: std::sync::atomic::AtomicUsize::new(config.max_request_body_bytes),
            access_log: None,
        })
    }

    /// Writes an access log line per request to `log` (plain listeners served with
    /// [`serve_logged_until`] and HBONE tunnels).
    pub fn with_access_log(mut self, log: Option<AccessLog>) -> Self {
        self.access_log = log;
        self
    }

    /// The access log in use, if any.
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.as_ref()
    }

    /// Mesh mode's context (`None` standalone).
    pub fn mesh(&self) -> Option<&Arc<MeshContext>> {
        self.mesh.as_ref()
    }

    /// The listener serving `service`'s port `port` right now: the one attached in the config,
    /// else the implicit default route to the Service.
    pub fn mesh_listener(&self, service: &ServiceInfo, port: u16) -> Arc<CompiledListener> {
        let key = (service.key(), port);
        let attached = match self.attached.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some(listener) = attached.get(&key) {
            return listener.clone();
        }
        let mut defaults = match self.defaults.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let max_body = self.max_body.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(listener) = defaults.get(&key)
            && listener.max_body == max_body
        {
            return listener.clone();
        }
        let Some(ctx) = &self.mesh else {
            // Not reachable: only the mesh server asks, and it needs mesh mode.
            return Arc::new(CompiledListener {
                name: "unattached".into(),
                address: None,
                attach: None,
                mesh: None,
                destination: None,
                series: Arc::default(),
                version: 0,
                table: RouteTable::empty(),
                routes: Vec::new(),
                max_body,
            });
        };
        // Forget Services that left the mesh.
        let view = ctx.mesh.current();
        defaults.retain(|(service, _), _| view.service(service).is_some());
        let version = self.version.load(std::sync::atomic::Ordering::SeqCst);
        let listener = Arc::new(default_listener(ctx, service, port, version, max_body));
        defaults.insert(key, listener.clone());
        listener
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
        let (compiled, next) = compile_in(config, version, &carried, self.mesh.as_ref())?;
        let (attached, compiled): (Vec<_>, Vec<_>) =
            compiled.into_iter().partition(|l| l.attach.is_some());
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
        match self.attached.write() {
            Ok(mut current) => *current = Arc::new(index_attached(attached)),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(index_attached(attached)),
        }
        self.max_body.store(
            config.max_request_body_bytes,
            std::sync::atomic::Ordering::Relaxed,
        );
        *carried = next;
        self.version
            .store(version, std::sync::atomic::Ordering::SeqCst);
        Ok(version)
    }

    /// Binds every listener's address.
    pub async fn bind(&self) -> Result<Vec<(TcpListener, SharedListener)>, ProxyBuildError> {
        let mut bound = Vec::new();
        for (mut copies, listener) in self.bind_copies(1)? {
            let Some(socket) = copies.pop() else {
                continue;
            };
            let address = socket.local_addr().ok();
            let socket = TcpListener::from_std(socket).map_err(|source| ProxyBuildError::Bind {
                listener: current(&listener).name.to_string(),
                address: address.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            })?;
            bound.push((socket, listener));
        }
        Ok(bound)
    }

    /// Like [`Waypoint::bind`], `copies` sockets per listener (`SO_REUSEPORT` when more than
    /// one: one per worker thread, see [`crate::workers`]), not yet tied to a runtime.
    pub fn bind_copies(
        &self,
        copies: usize,
    ) -> Result<Vec<(Vec<std::net::TcpListener>, SharedListener)>, ProxyBuildError> {
        let mut bound = Vec::new();
        for slot in &self.listeners {
            let (name, address) = {
                let current = current(slot);
                match current.address {
                    Some(address) => (current.name.to_string(), address),
                    None => continue,
                }
            };
            let sockets = crate::workers::listen(address, copies).map_err(|source| {
                ProxyBuildError::Bind {
                    listener: name,
                    address,
                    source,
                }
            })?;
            bound.push((sockets, slot.clone()));
        }
        Ok(bound)
    }

    /// The listeners' current compiled routes.
    pub fn listeners(&self) -> Vec<Arc<CompiledListener>> {
        self.listeners.iter().map(current).collect()
    }
}

fn index_attached(listeners: Vec<CompiledListener>) -> Attached {
    listeners
        .into_iter()
        .filter_map(|l| l.attach.clone().map(|key| (key, Arc::new(l))))
        .collect()
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
    serve_logged_until(socket, listener, None, shutdown, drain).await
}

/// How long accepting waits after a failure (out of file descriptors, ...) before it retries.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection on `socket`; failures (named `what` in the log) are retried after
/// [`ACCEPT_BACKOFF`]. Cancel-safe.
pub(crate) async fn accept(
    socket: &TcpListener,
    what: &str,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match socket.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(error = %e, what, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Like [`serve_until`], writing an access log line per request to `log` when given.
pub async fn serve_logged_until(
    socket: TcpListener,
    listener: SharedListener,
    log: Option<AccessLog>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = accept(&socket, "listener") => accepted,
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let listener = listener.clone();
        let watcher = graceful.watcher();
        let log = log.clone();
        tokio::spawn(async move {
            let service = HttpService::new(log, move |request| {
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
    handle_from(listener, peer, None, request).await
}

/// Serves one request with `listener`'s routes; `source` is who sent it when known (mesh mode),
/// handed to the layers as a [`Source`] extension and to the metrics.
pub async fn handle_from(
    listener: Arc<CompiledListener>,
    peer: SocketAddr,
    source: Option<Source>,
    request: http::Request<Incoming>,
) -> Result<Response, Infallible> {
    let start = Instant::now();
    // The access log layer puts the context in; without it nothing reads the trace id.
    let logged = crate::layers::context_of(&request).cloned();
    let logging = logged.is_some();
    let context = logged.unwrap_or_default();
    // Mesh listeners (attached to a Service) have its shared name: no allocation per request.
    if let Some(destination) = &listener.destination {
        context.set_destination(destination.clone());
    }
    context.set_peer(peer);
    if let Some(source) = &source {
        context.set_source(source.clone());
    }
    let who = Who::of(source.as_ref());
    let (parts, incoming) = request.into_parts();
    if logging
        && !crate::layers::trace::exporting()
        && let Some(trace_id) = crate::layers::trace::incoming_trace_id(&parts.headers)
    {
        context.set_trace_id(trace_id);
    }
    if parts.method == http::Method::CONNECT || parts.headers.contains_key(http::header::UPGRADE) {
        let response = body::text_response(
            http::StatusCode::NOT_IMPLEMENTED,
            "the waypoint does not proxy CONNECT or protocol upgrades (WebSocket) yet; send this traffic around the waypoint (L4)\n",
        );
        return Ok(finish(
            &listener, &NO_ROUTE, &context, response, start, &who, NO_BODY,
        ));
    }
    // L7 authorization, before routing: a policy is about the Service, whichever route.
    if let (Some((service, port)), Some(mesh)) = (&listener.attach, &listener.mesh) {
        let decision = crate::layers::authz::Authorizer::check_request(
            &mesh.current(),
            service,
            *port,
            source.as_ref(),
            &parts,
        );
        if !decision.allowed {
            context.flag("denied");
            let response = crate::layers::authz::forbidden(&decision);
            return Ok(finish(
                &listener, &NO_ROUTE, &context, response, start, &who, NO_BODY,
            ));
        }
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
        return Ok(finish(
            &listener, &NO_ROUTE, &context, response, start, &who, NO_BODY,
        ));
    };
    let route = &listener.routes[matched.route];
    context.set_route(route.name.clone());
    if let Some(config) = &route.redirect {
        let response = filters::redirect(config, &parts, matched.matched_prefix_len)
            .unwrap_or_else(|e| {
                body::text_response(http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
            });
        return Ok(finish(
            &listener,
            &route.name,
            &context,
            response,
            start,
            &who,
            NO_BODY,
        ));
    }
    // No body (most GETs): nothing to wait for, no timer to arm.
    let body = if http_body::Body::is_end_stream(&incoming) {
        Ok((Bytes::new(), None))
    } else {
        read_body(incoming, listener.max_body).await
    };
    let mut request_bytes = NO_BODY;
    let response = match body {
        Err(error) => error.into_response(),
        Ok((bytes, rest)) => {
            context.set_request_bytes(bytes.len() as u64);
            request_bytes = RequestBytes::Known(bytes.len() as u64);
            let mut request = http::Request::from_parts(parts, bytes);
            if let Some(rest) = rest {
                // Counted in the context as the rest goes out (`body::UpstreamBody`).
                request_bytes = RequestBytes::Counted(context.clone());
                request.extensions_mut().insert(Streaming::new(rest));
            }
            match route
                .rewrite
                .as_ref()
                .map(|r| filters::rewrite(r, &mut request, matched.matched_prefix_len))
            {
                Some(Err(e)) => {
                    body::text_response(http::StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
                }
                _ => {
                    // Room for what the waypoint adds (x-forwarded-for, x-forwarded-proto,
                    // x-weft-attempt): one growth of the map instead of one per header (hyper
                    // sizes it to the headers it parsed). Fails only past http's limit of
                    // 32,768 headers, far above hyper's (then the inserts grow it as before).
                    let _ = request.headers_mut().try_reserve(3);
                    forwarded_headers(request.headers_mut(), peer);
                    // Everything the layers need travels in the one context (peer, source,
                    // deadlines): one extension to insert and to copy per attempt.
                    request.extensions_mut().insert(context.clone());
                    match route.service.call_shared(request).await {
                        Ok(response) => response,
                        Err(error) => {
                            tracing::debug!(route = %route.name, %error, "request failed");
                            if let Some(flag) = error.flag() {
                                context.flag(flag);
                            }
                            error.into_response()
                        }
                    }
                }
            }
        }
    };
    Ok(finish(
        &listener,
        &route.name,
        &context,
        response,
        start,
        &who,
        request_bytes,
    ))
}

/// Appends the client to `x-forwarded-for` and sets `x-forwarded-proto` when absent (one
/// lookup per header).
fn forwarded_headers(headers: &mut http::HeaderMap, peer: SocketAddr) {
    const XFF: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
    const XFP: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
    match headers.entry(XFF) {
        http::header::Entry::Occupied(mut entry) => {
            let appended = entry.get().to_str().ok().and_then(|previous| {
                http::HeaderValue::from_str(&format!("{previous}, {}", peer.ip())).ok()
            });
            entry.insert(appended.unwrap_or_else(|| client_address_value(peer.ip())));
        }
        http::header::Entry::Vacant(entry) => {
            entry.insert(client_address_value(peer.ip()));
        }
    }
    headers
        .entry(XFP)
        .or_insert(http::HeaderValue::from_static("http"));
}

/// `ip` as a header value. The last one is kept per thread: a connection's requests (and, on
/// a node, most requests) come from the same address, so it is formatted once, not per request.
fn client_address_value(ip: std::net::IpAddr) -> http::HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::IpAddr, http::HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((cached, value)) = last.as_ref()
            && *cached == ip
        {
            return value.clone();
        }
        // An address is printable ASCII: always a valid value.
        let value = http::HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        *last = Some((ip, value.clone()));
        value
    })
}

/// The `route` label when no route matched.
static NO_ROUTE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

/// Who sent a request, for the metrics.
struct Who {
    principal: Option<Arc<str>>,
    workload: Option<Arc<str>>,
}

impl Who {
    fn of(source: Option<&Source>) -> Who {
        Who {
            principal: source
                .map(|s| s.principal.clone())
                .filter(|p| !p.is_empty()),
            workload: source.and_then(|s| s.workload.clone()),
        }
    }
}

/// `response` with the request's golden signals recorded when it ends.
fn finish(
    listener: &CompiledListener,
    route: &Arc<str>,
    context: &RequestContext,
    response: Response,
    start: Instant,
    who: &Who,
    request_bytes: RequestBytes,
) -> Response {
    let destination_workload = match (&listener.mesh, context.endpoint()) {
        (Some(mesh), Some(endpoint)) => mesh.current().workload_at(endpoint.ip()).cloned(),
        _ => None,
    };
    let golden = Golden {
        listener: listener.name.clone(),
        route: route.clone(),
        backend: context.backend(),
        source_principal: who.principal.clone(),
        source_workload: who.workload.clone(),
        destination_service: listener.destination.clone(),
        destination_workload,
    };
    golden::observe(
        response,
        golden,
        request_bytes,
        start,
        listener.series.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    type Item = Result<http_body::Frame<Bytes>, String>;
    type Frames = tokio::sync::mpsc::Sender<Item>;
    type Fed = http_body_util::StreamBody<tokio_stream::wrappers::ReceiverStream<Item>>;

    /// A request body fed frame by frame through the returned sender.
    fn body() -> (Frames, Fed) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        (tx, http_body_util::StreamBody::new(stream))
    }

    async fn feed(frames: &Frames, text: &'static str) {
        frames
            .send(Ok(http_body::Frame::data(Bytes::from_static(
                text.as_bytes(),
            ))))
            .await
            .expect("send");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_is_buffered_whole() {
        let (frames, incoming) = body();
        feed(&frames, "one ").await;
        feed(&frames, "two").await;
        drop(frames);
        let (bytes, rest) = read_body(incoming, 1024).await.expect("read");
        assert_eq!(bytes, "one two");
        assert!(rest.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_pauses_outgrows_the_buffer_or_trickles_streams_the_rest() {
        // Pauses: what came so far, and the rest to stream.
        let (frames, incoming) = body();
        feed(&frames, "first message").await;
        let (bytes, rest) = read_body(incoming, 1024).await.expect("read");
        assert_eq!(bytes, "first message");
        let mut rest = rest.expect("the rest streams");
        feed(&frames, "second").await;
        let frame = rest.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "second");
        // Larger than the buffer (8 bytes): forwarded once it is exceeded.
        let (frames, incoming) = body();
        feed(&frames, "0123").await;
        feed(&frames, "45678").await;
        feed(&frames, "9").await;
        let (bytes, rest) = read_body(incoming, 8).await.expect("read");
        assert_eq!(bytes, "012345678");
        assert!(rest.is_some());
        // A byte every 10 ms: never a 20 ms pause, streamed after a second.
        let (frames, incoming) = body();
        let trickle = tokio::spawn(async move {
            for _ in 0..500 {
                feed(&frames, "x").await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let started = tokio::time::Instant::now();
        let (bytes, rest) = read_body(incoming, 1024).await.expect("read");
        assert!(rest.is_some());
        let took = started.elapsed();
        assert!(
            took >= BUFFER_AT_MOST && took < BUFFER_AT_MOST + STREAM_AFTER,
            "{took:?}"
        );
        assert!((90..=110).contains(&bytes.len()), "{}", bytes.len());
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_the_client_breaks_off_is_a_client_error() {
        let (frames, incoming) = body();
        feed(&frames, "part").await;
        frames.send(Err("reset".into())).await.expect("send");
        let error = read_body(incoming, 1024).await.expect_err("broken");
        assert!(matches!(error, ProxyError::ClientBody { .. }), "{error:?}");
        assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_client_is_appended_to_x_forwarded_for() {
        let peer: SocketAddr = "10.0.0.1:4000".parse().expect("addr");
        let mut fresh = http::HeaderMap::new();
        forwarded_headers(&mut fresh, peer);
        assert_eq!(fresh["x-forwarded-for"], "10.0.0.1");
        assert_eq!(fresh["x-forwarded-proto"], "http");
        let mut forwarded = http::HeaderMap::new();
        forwarded.insert("x-forwarded-for", http::HeaderValue::from_static("1.2.3.4"));
        forwarded.insert("x-forwarded-proto", http::HeaderValue::from_static("https"));
        forwarded_headers(&mut forwarded, peer);
        assert_eq!(forwarded["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(forwarded["x-forwarded-proto"], "https");
        // A value that is not text is replaced by the client.
        let mut opaque = http::HeaderMap::new();
        opaque.insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff").expect("value"),
        );
        forwarded_headers(&mut opaque, peer);
        assert_eq!(opaque["x-forwarded-for"], "10.0.0.1");
    }
}
