//! Distributed tracing: W3C trace context in, a server span per request, trace context out, and
//! the spans exported over OTLP/gRPC.
//!
//! Per request, [`TraceLayer`]:
//!
//! 1. extracts `traceparent` / `tracestate` from the request (W3C Trace Context, opentelemetry's
//!    `TraceContextPropagator`); an absent or malformed `traceparent` starts a new trace;
//! 2. starts a server span named `<METHOD> <route>` (the route's configured name, else its path
//!    template, else `unrouted`) as the child of the incoming context, with the OpenTelemetry
//!    HTTP server attributes (`http.request.method`, `url.path`, `url.scheme`, `http.route`,
//!    `server.address`, `server.port`, `network.protocol.version`, `client.address`,
//!    `user_agent.original`) and Weft's (`weft.listener`, `weft.route`,
//!    `weft.source.principal` when the request carries a [`super::Source`]);
//! 3. replaces `traceparent` / `tracestate` on the forwarded request with the waypoint's span
//!    as parent, so the backend's span is a child of the waypoint's;
//! 4. when the response headers arrive, records `http.response.status_code` and
//!    `weft.backend` (the backend the weighted split chose, from the request's
//!    [`RequestContext`]) and sets the span status to error on 5xx (with `error.type`), and
//!    ends the span. A request whose client goes away ends its span without a status code.
//!
//! Sampling is decided by the tracer provider ([`Tracing`]): parent-based (an incoming
//! `traceparent` decides with its sampled flag), new traces sampled at the configured ratio.
//! Unsampled requests still get their own span id in the forwarded `traceparent` (flag `00`),
//! so the trace stays connected wherever a later hop samples.
//!
//! [`Tracing`] builds the tracer provider: resource `service.name` (`weft-waypoint` by
//! default), `k8s.namespace.name` and `weft.waypoint` when known, and, when an OTLP endpoint
//! is configured, a batch span processor over the OTLP/gRPC (tonic) exporter. The batch
//! processor runs on its own thread behind a bounded queue (spans beyond it are dropped), so
//! an unreachable or slow collector never blocks a request; export failures are logged (at most
//! one warning per [`ERROR_LOG_INTERVAL`], and once when exports work again).
//! [`Tracing::shutdown`] flushes what is queued (the binary calls it after draining on
//! SIGTERM).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
};
use tower::{Layer, Service, ServiceExt};

use super::{BoxFuture, Inner, ProxyResult, RequestContext, context_of};
use crate::body::Request;
use crate::config::{PathMatchType, RouteConfig};
use crate::error::ProxyError;

/// The instrumentation scope of the waypoint's spans.
pub const SCOPE: &str = "weft-waypoint";

/// Default `service.name` of the exported spans.
pub const DEFAULT_SERVICE_NAME: &str = "weft-waypoint";

/// At most one export-failure warning per this interval.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// What [`TraceLayer`] knows about the route it wraps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// `weft.listener`.
    pub listener: Option<Arc<str>>,
    /// `weft.route`: the route's name (configured, or the generated `<listener>/<index>`);
    /// `None` for requests no route matched.
    pub route: Option<Arc<str>>,
    /// Whether `route` is the configured name (it then names the span); a generated name does
    /// not, the path template does.
    pub named: bool,
    /// `http.route`: the path template of the route's matches when they share one
    /// (`Exact` as is, `PathPrefix /api` as `/api/*`, a regular expression as is).
    pub path_template: Option<Arc<str>>,
}

impl TraceConfig {
    /// The config of the route `name` (configured or generated) of `listener`.
    pub fn for_route(listener: &str, name: &Arc<str>, route: &RouteConfig) -> TraceConfig {
        TraceConfig {
            listener: Some(listener.into()),
            route: Some(name.clone()),
            named: route.name.is_some(),
            path_template: path_template(route).map(Into::into),
        }
    }

    /// The span name for a request with `method`: `<METHOD> <route>`, where route is the
    /// configured route name, else the path template, else `unrouted`.
    pub fn span_name(&self, method: &str) -> String {
        let target = match (&self.route, self.named, &self.path_template) {
            (Some(route), true, _) => route.as_ref(),
            (_, _, Some(template)) => template.as_ref(),
            (Some(route), false, None) => route.as_ref(),
            (None, _, None) => "unrouted",
        };
        format!("{method} {target}")
    }
}

/// The path template shared by every match of `route`, if they share one.
fn path_template(route: &RouteConfig) -> Option<String> {
    let template = |m: Option<&crate::config::PathMatch>| match m {
        None => "/*".to_string(),
        Some(p) => match p.kind {
            PathMatchType::Exact | PathMatchType::RegularExpression => p.value.clone(),
            PathMatchType::PathPrefix => format!("{}/*", p.value.trim_end_matches('/')),
        },
    };
    let mut templates = route.matches.iter().map(|m| template(m.path.as_ref()));
    let Some(first) = templates.next() else {
        return Some(template(None));
    };
    templates.all(|t| t == first).then_some(first)
}

/// The methods OpenTelemetry's HTTP conventions know; others are recorded as `_OTHER`.
fn known_method(method: &http::Method) -> Option<&'static str> {
    Some(match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::CONNECT => "CONNECT",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::TRACE => "TRACE",
        http::Method::PATCH => "PATCH",
        _ => return None,
    })
}

fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// Reads propagation headers from an [`http::HeaderMap`].
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes propagation headers into an [`http::HeaderMap`].
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Traces the requests of a route: see the module documentation.
#[derive(Clone)]
pub struct TraceLayer {
    config: Arc<TraceConfig>,
    tracer: Arc<BoxedTracer>,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for TraceLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TraceLayer {
    /// A layer with the process's tracer (installed by [`Tracing::install`]; without it spans
    /// are not recorded and the incoming trace context is forwarded as it came).
    pub fn new(config: TraceConfig) -> TraceLayer {
        TraceLayer::with_tracer(config, opentelemetry::global::tracer(SCOPE))
    }

    /// A layer recording with `tracer`.
    pub fn with_tracer(config: TraceConfig, tracer: BoxedTracer) -> TraceLayer {
        TraceLayer {
            config: Arc::new(config),
            tracer: Arc::new(tracer),
            propagator: TraceContextPropagator::new(),
        }
    }

    /// The layer of the route `name` of `listener`, with the process's tracer.
    pub fn for_route(listener: &str, name: &Arc<str>, route: &RouteConfig) -> TraceLayer {
        TraceLayer::new(TraceConfig::for_route(listener, name, route))
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    layer: TraceLayer,
}

impl<S: Inner> Service<Request> for Trace<S> {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let inner = self.inner.clone();
        let TraceLayer {
            config,
            tracer,
            propagator,
        } = &self.layer;
        let parent = propagator.extract(&HeaderExtractor(request.headers()));
        let method = known_method(request.method());
        let mut attributes = Vec::with_capacity(14);
        attributes.push(KeyValue::new(
            "http.request.method",
            method.unwrap_or("_OTHER"),
        ));
        if method.is_none() {
            attributes.push(KeyValue::new(
                "http.request.method_original",
                request.method().as_str().to_string(),
            ));
        }
        attributes.push(KeyValue::new("url.path", request.uri().path().to_string()));
        attributes.push(KeyValue::new("url.scheme", "http"));
        attributes.push(KeyValue::new(
            "network.protocol.version",
            protocol_version(request.version()),
        ));
        let host = request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .or_else(|| request.uri().authority().cloned());
        if let Some(host) = host {
            attributes.push(KeyValue::new(
                "server.address",
                host.host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            ));
            if let Some(port) = host.port_u16() {
                attributes.push(KeyValue::new("server.port", i64::from(port)));
            }
        }
        let context = context_of(&request);
        if let Some(peer) = context.and_then(RequestContext::peer) {
            attributes.push(KeyValue::new("client.address", peer.ip().to_string()));
        }
        if let Some(agent) = request
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(KeyValue::new("user_agent.original", agent.to_string()));
        }
        if let Some(template) = &config.path_template {
            attributes.push(KeyValue::new("http.route", template.to_string()));
        }
        if let Some(listener) = &config.listener {
            attributes.push(KeyValue::new("weft.listener", listener.to_string()));
        }
        if let Some(route) = &config.route {
            attributes.push(KeyValue::new("weft.route", route.to_string()));
        }
        if let Some(source) = context.and_then(RequestContext::source) {
            attributes.push(KeyValue::new(
                "weft.source.principal",
                source.principal.to_string(),
            ));
        }
        let builder = tracer
            .span_builder(config.span_name(method.unwrap_or("HTTP")))
            .with_kind(SpanKind::Server)
            .with_attributes(attributes);
        let span = tracer.build_with_context(builder, &parent);
        let context = parent.with_span(span);
        // Whatever came in is replaced by the waypoint's own context (or dropped when there is
        // none, as with a malformed `traceparent` and no tracer).
        request.headers_mut().remove(TRACEPARENT);
        request.headers_mut().remove(TRACESTATE);
        propagator.inject_context(&context, &mut HeaderInjector(request.headers_mut()));
        // The propagator writes `tracestate` even when it is empty.
        if request
            .headers()
            .get(TRACESTATE)
            .is_some_and(|v| v.is_empty())
        {
            request.headers_mut().remove(TRACESTATE);
        }
        let request_context = context_of(&request).cloned();
        if let Some(request_context) = &request_context
            && context.span().span_context().is_valid()
        {
            request_context.set_trace_id(context.span().span_context().trace_id().to_string());
        }
        Box::pin(async move {
            let result = inner.oneshot(request).await;
            let span = context.span();
            let status = match &result {
                Ok(response) => response.status(),
                Err(error) => error.status(),
            };
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            if let Some(backend) = request_context.as_ref().and_then(RequestContext::backend) {
                span.set_attribute(KeyValue::new("weft.backend", backend.to_string()));
            }
            if status.is_server_error() {
                span.set_attribute(KeyValue::new("error.type", status.as_str().to_string()));
                span.set_status(match &result {
                    Err(error) => Status::error(error.to_string()),
                    Ok(_) => Status::error(""),
                });
            }
            span.end();
            result
        })
    }
}

/// Whether the process exports spans ([`Tracing::install`] with an OTLP endpoint).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported. Without an exporter routes get no [`TraceLayer`]: the waypoint
/// is transparent to tracing (the incoming `traceparent`/`tracestate` pass unchanged, so the
/// backend's span is the caller's child, with no unexported span in between) and spends
/// nothing on spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The trace id of a well-formed W3C `traceparent` in `headers` (version 00 layout, not all
/// zeros), for the access log when the waypoint records no span of its own.
pub fn incoming_trace_id(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(TRACEPARENT)?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, trace, span, _flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(trace, 32) && hex(span, 16) && trace.bytes().any(|b| b != b'0')).then(|| trace.to_string())
}

/// How [`Tracing`] builds the tracer provider.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// OTLP/gRPC collector, `http://host:port`; `None`: no exporter (context is still
    /// propagated with the waypoint's span ids).
    pub otlp_endpoint: Option<String>,
    /// Share of new traces (requests without a sampled parent decision) sampled, 0 to 1.
    pub sampling: f64,
    /// `service.name` of the resource.
    pub service_name: String,
    /// `k8s.namespace.name` of the resource, when known.
    pub namespace: Option<String>,
    /// `weft.waypoint` (the waypoint's name) of the resource, when known.
    pub waypoint: Option<String>,
    /// How long spans wait in the batch processor before being exported.
    pub scheduled_delay: Duration,
    /// Limit on one export call (then it fails and is logged).
    pub export_timeout: Duration,
}

impl Default for TracingSettings {
    fn default() -> Self {
        TracingSettings {
            otlp_endpoint: None,
            sampling: 1.0,
            service_name: DEFAULT_SERVICE_NAME.to_string(),
            namespace: None,
            waypoint: None,
            scheduled_delay: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
        }
    }
}

/// The binary's tracing flags (flattened into its arguments).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct TraceArgs {
    /// OTLP/gRPC collector the spans are exported to, `http://HOST:PORT` (e.g.
    /// http://otel-collector.observability:4317). Unset: nothing is exported; trace context is
    /// still propagated.
    #[arg(long, env = "WEFT_WAYPOINT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled (requests without a `traceparent`), 0 to 1; requests with
    /// one follow its sampled flag.
    #[arg(long, env = "WEFT_WAYPOINT_TRACE_SAMPLING", default_value_t = 1.0)]
    pub trace_sampling: f64,
    /// `service.name` of the exported spans.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_TRACE_SERVICE_NAME",
        default_value = DEFAULT_SERVICE_NAME
    )]
    pub trace_service_name: String,
    /// `k8s.namespace.name` of the exported spans (the waypoint's namespace).
    #[arg(long, env = "WEFT_WAYPOINT_TRACE_NAMESPACE")]
    pub trace_namespace: Option<String>,
    /// `weft.waypoint` of the exported spans (the waypoint's name).
    #[arg(long, env = "WEFT_WAYPOINT_TRACE_WAYPOINT_NAME")]
    pub trace_waypoint_name: Option<String>,
    /// How long finished spans wait to be exported in a batch (Gateway API duration, e.g.
    /// `5s`, `200ms`); shorter means fresher traces and more export calls.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_TRACE_BATCH_DELAY",
        default_value = "5s",
        value_parser = crate::duration::GatewayDuration::parse
    )]
    pub trace_batch_delay: crate::duration::GatewayDuration,
}

impl TraceArgs {
    /// The settings these flags describe (default export timeout).
    pub fn settings(&self) -> TracingSettings {
        TracingSettings {
            otlp_endpoint: self.otlp_endpoint.clone().filter(|e| !e.is_empty()),
            sampling: self.trace_sampling,
            service_name: self.trace_service_name.clone(),
            namespace: self.trace_namespace.clone(),
            waypoint: self.trace_waypoint_name.clone(),
            scheduled_delay: self.trace_batch_delay.0,
            ..TracingSettings::default()
        }
    }
}

/// Tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    /// The sampling ratio is not between 0 and 1.
    #[error(
        "trace sampling ratio {0} is out of range; pass a number from 0 to 1 (--trace-sampling)"
    )]
    Sampling(f64),
    /// The endpoint is not `http://host:port`.
    #[error(
        "OTLP endpoint `{0}` is not a plaintext gRPC URL; pass http://HOST:PORT (--otlp-endpoint), e.g. http://otel-collector:4317"
    )]
    Endpoint(String),
    /// The exporter could not be built.
    #[error("building the OTLP exporter for `{endpoint}`: {source}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The process's tracer provider; flush it with [`Tracing::shutdown`] before exiting.
#[derive(Debug, Clone)]
pub struct Tracing {
    provider: SdkTracerProvider,
    exporter: Option<Arc<ExportHealth>>,
}

impl Tracing {
    /// Builds the tracer provider of `settings` (must run inside a Tokio runtime when an
    /// endpoint is set: the exporter's channel lives on it).
    pub fn new(settings: &TracingSettings) -> Result<Tracing, TracingError> {
        if !(0.0..=1.0).contains(&settings.sampling) {
            return Err(TracingError::Sampling(settings.sampling));
        }
        let mut resource =
            Resource::builder_empty().with_service_name(settings.service_name.clone());
        if let Some(namespace) = &settings.namespace {
            resource =
                resource.with_attribute(KeyValue::new("k8s.namespace.name", namespace.clone()));
        }
        if let Some(waypoint) = &settings.waypoint {
            resource = resource.with_attribute(KeyValue::new("weft.waypoint", waypoint.clone()));
        }
        let mut builder = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sampling,
            ))))
            .with_resource(resource.build());
        let mut exporter = None;
        if let Some(endpoint) = &settings.otlp_endpoint {
            let uri: http::Uri = endpoint
                .parse()
                .map_err(|_| TracingError::Endpoint(endpoint.clone()))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(TracingError::Endpoint(endpoint.clone()));
            }
            use opentelemetry_otlp::WithExportConfig;
            let otlp = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(settings.export_timeout)
                .build()
                .map_err(|source| TracingError::Exporter {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            let logging = LoggingExporter::new(otlp, endpoint.clone());
            exporter = Some(logging.health.clone());
            builder = builder.with_span_processor(
                BatchSpanProcessor::builder(logging)
                    .with_batch_config(
                        BatchConfigBuilder::default()
                            .with_scheduled_delay(settings.scheduled_delay)
                            .build(),
                    )
                    .build(),
            );
        }
        Ok(Tracing {
            provider: builder.build(),
            exporter,
        })
    }

    /// [`Tracing::new`], then makes it the process's tracer provider (what [`TraceLayer::new`]
    /// records with). Install it before compiling the routes.
    pub fn install(settings: &TracingSettings) -> Result<Tracing, TracingError> {
        let tracing = Tracing::new(settings)?;
        opentelemetry::global::set_tracer_provider(tracing.provider.clone());
        EXPORTING.store(tracing.exporter.is_some(), Ordering::Relaxed);
        Ok(tracing)
    }

    /// A tracer of this provider, for [`TraceLayer::with_tracer`].
    pub fn tracer(&self) -> BoxedTracer {
        use opentelemetry::trace::TracerProvider as _;
        BoxedTracer::new(Box::new(self.provider.tracer(SCOPE)))
    }

    /// Export calls that failed so far (0 without an exporter).
    pub fn export_failures(&self) -> u64 {
        self.exporter
            .as_ref()
            .map_or(0, |h| h.failures.load(Ordering::Relaxed))
    }

    /// Exports the spans still queued and stops the exporter, waiting at most `timeout`.
    /// Failures are logged.
    pub async fn shutdown(self, timeout: Duration) {
        let provider = self.provider;
        // The batch processor's thread exports through a channel driven by this runtime:
        // wait for it off the runtime's worker threads.
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(1), done).await {
            Ok(Ok(Ok(()))) => tracing::debug!("trace exporter flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing spans at shutdown failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing spans at shutdown failed"),
            Err(_) => tracing::warn!(?timeout, "flushing spans at shutdown timed out"),
        }
    }
}

/// Export failures seen by a [`LoggingExporter`].
#[derive(Debug, Default)]
struct ExportHealth {
    failures: AtomicU64,
    /// When the last warning was logged, and failures since then not logged.
    log: Mutex<(Option<Instant>, u64)>,
}

/// Wraps an exporter to log its failures (rate limited) instead of only returning them.
#[derive(Debug)]
struct LoggingExporter<E> {
    inner: E,
    endpoint: String,
    health: Arc<ExportHealth>,
}

impl<E> LoggingExporter<E> {
    fn new(inner: E, endpoint: String) -> Self {
        LoggingExporter {
            inner,
            endpoint,
            health: Arc::default(),
        }
    }

    fn record(&self, result: &OTelSdkResult, spans: usize) {
        let Ok(mut log) = self.health.log.lock() else {
            return;
        };
        match result {
            Ok(()) => {
                if log.0.take().is_some() {
                    tracing::info!(endpoint = %self.endpoint, "exporting spans works again");
                }
                log.1 = 0;
            }
            Err(error) => {
                self.health.failures.fetch_add(1, Ordering::Relaxed);
                let due = log.0.is_none_or(|at| at.elapsed() >= ERROR_LOG_INTERVAL);
                if due {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        %error,
                        spans,
                        failures_not_logged = log.1,
                        "exporting spans failed; they are dropped (check --otlp-endpoint and the collector)"
                    );
                    *log = (Some(Instant::now()), 0);
                } else {
                    log.1 += 1;
                }
            }
        }
    }
}

impl<E: SpanExporter> SpanExporter for LoggingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        self.record(&result, spans);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::text_response;
    use crate::layers::ProxyService;
    use crate::layers::testing::request;
    use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    /// A provider exporting synchronously into memory, and its exporter.
    fn memory(sampling: f64) -> (SdkTracerProvider, InMemorySpanExporter) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                sampling,
            ))))
            .with_simple_exporter(exporter.clone())
            .build();
        (provider, exporter)
    }

    fn named_route() -> TraceConfig {
        TraceConfig {
            listener: Some("web".into()),
            route: Some("api".into()),
            named: true,
            path_template: Some("/api/*".into()),
        }
    }

    /// A backend answering `status`, recording the request headers it got and choosing
    /// backend `b` in the request context.
    fn backend(status: u16, seen: Arc<Mutex<Vec<http::HeaderMap>>>) -> ProxyService {
        ProxyService::new(tower::service_fn(move |request: Request| {
            seen.lock().expect("lock").push(request.headers().clone());
            if let Some(context) = request.extensions().get::<RequestContext>() {
                context.set_backend("b".into());
            }
            async move {
                Ok::<_, ProxyError>(text_response(
                    http::StatusCode::from_u16(status).expect("status"),
                    "x",
                ))
            }
        }))
    }

    async fn call(
        provider: &SdkTracerProvider,
        config: TraceConfig,
        status: u16,
        request: Request,
    ) -> (http::StatusCode, http::HeaderMap) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tracer = BoxedTracer::new(Box::new(provider.tracer("test")));
        let service = TraceLayer::with_tracer(config, tracer).layer(backend(status, seen.clone()));
        let response = service.oneshot(request).await.expect("response");
        let headers = seen.lock().expect("lock").pop().expect("backend called");
        (response.status(), headers)
    }

    /// `(version, trace id, parent id, flags)` of a `traceparent`.
    fn parse(traceparent: &http::HeaderValue) -> (String, String, String, String) {
        let text = traceparent.to_str().expect("ascii");
        let parts: Vec<&str> = text.split('-').collect();
        assert_eq!(parts.len(), 4, "{text}");
        (
            parts[0].into(),
            parts[1].into(),
            parts[2].into(),
            parts[3].into(),
        )
    }

    fn attribute(span: &SpanData, key: &str) -> Option<opentelemetry::Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.clone())
    }

    fn incoming(path: &str, flags: &str) -> Request {
        let mut request = request(path);
        request.headers_mut().insert(
            TRACEPARENT,
            http::HeaderValue::from_str(&format!("00-{TRACE}-{PARENT}-{flags}")).expect("value"),
        );
        request
            .headers_mut()
            .insert(TRACESTATE, http::HeaderValue::from_static("vendor=abc"));
        request
    }

    #[tokio::test]
    async fn continues_the_incoming_trace_and_parents_the_backend() {
        let (provider, exporter) = memory(1.0);
        let (status, forwarded) =
            call(&provider, named_route(), 200, incoming("/api/users", "01")).await;
        assert_eq!(status, 200);
        let spans = exporter.get_finished_spans().expect("spans");
        assert_eq!(spans.len(), 1);
        let span = &spans[0];
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from_hex(TRACE).expect("hex")
        );
        assert_eq!(span.parent_span_id, SpanId::from_hex(PARENT).expect("hex"));
        assert!(span.parent_span_is_remote);
        assert_eq!(span.span_kind, SpanKind::Server);
        let (version, trace, parent, flags) = parse(&forwarded[TRACEPARENT]);
        assert_eq!(version, "00");
        assert_eq!(trace, TRACE);
        assert_eq!(parent, span.span_context.span_id().to_string());
        assert_ne!(
            parent, PARENT,
            "the backend's parent is the waypoint's span"
        );
        assert_eq!(flags, "01");
        assert_eq!(forwarded[TRACESTATE], "vendor=abc");
    }

    #[tokio::test]
    async fn starts_a_new_trace_without_or_with_a_malformed_traceparent() {
        let (provider, exporter) = memory(1.0);
        let (_, plain) = call(&provider, named_route(), 200, request("/api")).await;
        let mut malformed = request("/api");
        malformed
            .headers_mut()
            .insert(TRACEPARENT, http::HeaderValue::from_static("00-zz-yy-01"));
        malformed
            .headers_mut()
            .insert(TRACESTATE, http::HeaderValue::from_static("junk=1"));
        let (_, replaced) = call(&provider, named_route(), 200, malformed).await;
        let spans = exporter.get_finished_spans().expect("spans");
        assert_eq!(spans.len(), 2);
        for (span, forwarded) in spans.iter().zip([plain, replaced]) {
            assert_eq!(span.parent_span_id, SpanId::INVALID, "a root span");
            let (_, trace, parent, flags) = parse(&forwarded[TRACEPARENT]);
            assert_eq!(trace, span.span_context.trace_id().to_string());
            assert_eq!(parent, span.span_context.span_id().to_string());
            assert_eq!(flags, "01");
            assert!(!forwarded.contains_key(TRACESTATE));
        }
        assert_ne!(
            spans[0].span_context.trace_id(),
            spans[1].span_context.trace_id()
        );
    }

    #[tokio::test]
    async fn names_spans_and_records_http_attributes() {
        let (provider, exporter) = memory(1.0);
        let mut request = http::Request::builder()
            .method("POST")
            .uri("/api/users/7")
            .header("host", "shop.example:8080")
            .header("user-agent", "curl/8")
            .version(http::Version::HTTP_2)
            .body(bytes::Bytes::new())
            .expect("request");
        let context = RequestContext::default();
        context.set_peer("10.0.0.9:40000".parse().expect("addr"));
        context.set_source(super::super::Source {
            principal: "spiffe://cluster.local/ns/a/sa/web".into(),
            ip: "10.0.0.9".parse().expect("ip"),
            workload: None,
        });
        request.extensions_mut().insert(context);
        call(&provider, named_route(), 201, request).await;
        let unnamed = TraceConfig {
            listener: Some("web".into()),
            route: Some("web/0".into()),
            named: false,
            path_template: Some("/v1/*".into()),
        };
        let mut brew = crate::layers::testing::request("/v1");
        *brew.method_mut() = http::Method::from_bytes(b"BREW").expect("method");
        call(&provider, unnamed, 200, brew).await;
        call(
            &provider,
            TraceConfig::default(),
            200,
            crate::layers::testing::request("/x"),
        )
        .await;
        let spans = exporter.get_finished_spans().expect("spans");
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names, ["POST api", "HTTP /v1/*", "GET unrouted"]);
        let span = &spans[0];
        for (key, value) in [
            ("http.request.method", "POST"),
            ("url.path", "/api/users/7"),
            ("url.scheme", "http"),
            ("http.route", "/api/*"),
            ("server.address", "shop.example"),
            ("network.protocol.version", "2"),
            ("client.address", "10.0.0.9"),
            ("user_agent.original", "curl/8"),
            ("weft.listener", "web"),
            ("weft.route", "api"),
            ("weft.backend", "b"),
            (
                "weft.source.principal",
                "spiffe://cluster.local/ns/a/sa/web",
            ),
        ] {
            assert_eq!(
                attribute(span, key),
                Some(opentelemetry::Value::from(value.to_string())),
                "{key}"
            );
        }
        assert_eq!(
            attribute(span, "http.response.status_code"),
            Some(opentelemetry::Value::I64(201))
        );
        assert_eq!(
            attribute(span, "server.port"),
            Some(opentelemetry::Value::I64(8080))
        );
        assert_eq!(span.status, Status::Unset);
        assert_eq!(
            attribute(&spans[1], "http.request.method"),
            Some(opentelemetry::Value::from("_OTHER"))
        );
        assert_eq!(
            attribute(&spans[1], "http.request.method_original"),
            Some(opentelemetry::Value::from("BREW".to_string()))
        );
        assert_eq!(attribute(&spans[2], "weft.route"), None);
        assert_eq!(attribute(&spans[2], "weft.source.principal"), None);
    }

    #[tokio::test]
    async fn server_errors_set_the_error_status_client_errors_do_not() {
        let (provider, exporter) = memory(1.0);
        call(&provider, named_route(), 503, request("/api")).await;
        call(&provider, named_route(), 404, request("/api")).await;
        let failing = TraceLayer::with_tracer(
            named_route(),
            BoxedTracer::new(Box::new(provider.tracer("test"))),
        )
        .layer(ProxyService::new(tower::service_fn(|_: Request| async {
            Err::<crate::body::Response, _>(ProxyError::Timeout {
                after: Duration::from_secs(1),
                which: "timeouts.request",
            })
        })));
        assert!(failing.oneshot(request("/api")).await.is_err());
        let spans = exporter.get_finished_spans().expect("spans");
        assert_eq!(spans.len(), 3);
        assert!(
            matches!(spans[0].status, Status::Error { .. }),
            "{:?}",
            spans[0].status
        );
        assert_eq!(
            attribute(&spans[0], "error.type"),
            Some(opentelemetry::Value::from("503".to_string()))
        );
        assert_eq!(spans[1].status, Status::Unset);
        assert_eq!(attribute(&spans[1], "error.type"), None);
        match &spans[2].status {
            Status::Error { description } => {
                assert!(description.contains("timeouts.request"), "{description}")
            }
            other => panic!("expected an error status, got {other:?}"),
        }
        assert_eq!(
            attribute(&spans[2], "http.response.status_code"),
            Some(opentelemetry::Value::I64(504))
        );
    }

    #[tokio::test]
    async fn sampling_follows_the_parent_and_the_root_ratio() {
        // An unsampled parent: no span exported, the context still flows (flag 00).
        let (provider, exporter) = memory(1.0);
        let (_, forwarded) = call(&provider, named_route(), 200, incoming("/api", "00")).await;
        assert!(exporter.get_finished_spans().expect("spans").is_empty());
        let (_, trace, parent, flags) = parse(&forwarded[TRACEPARENT]);
        assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "00"));
        assert_ne!(parent, PARENT);
        // Ratio 0: new traces are not sampled, sampled parents still are.
        let (provider, exporter) = memory(0.0);
        let (_, root) = call(&provider, named_route(), 200, request("/api")).await;
        assert_eq!(parse(&root[TRACEPARENT]).3, "00");
        assert!(exporter.get_finished_spans().expect("spans").is_empty());
        call(&provider, named_route(), 200, incoming("/api", "01")).await;
        assert_eq!(exporter.get_finished_spans().expect("spans").len(), 1);
    }

    #[tokio::test]
    async fn without_a_tracer_the_incoming_context_passes_through() {
        let layer = TraceLayer::with_tracer(
            named_route(),
            BoxedTracer::new(Box::new(opentelemetry::trace::noop::NoopTracer::new())),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let service = layer.layer(backend(200, seen.clone()));
        service
            .oneshot(incoming("/api", "01"))
            .await
            .expect("response");
        let forwarded = seen.lock().expect("lock").pop().expect("called");
        assert_eq!(
            forwarded[TRACEPARENT],
            format!("00-{TRACE}-{PARENT}-01").as_str()
        );
    }

    #[test]
    fn trace_ids_of_incoming_traceparents() {
        let id = |v: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(TRACEPARENT, v.parse().expect("value"));
            incoming_trace_id(&headers)
        };
        assert_eq!(
            id(&format!("00-{TRACE}-{PARENT}-01")).as_deref(),
            Some(TRACE)
        );
        assert_eq!(id(&format!("00-{}-{PARENT}-01", "0".repeat(32))), None);
        assert_eq!(
            id(&format!("00-{}-{PARENT}-01", TRACE.to_uppercase())),
            None
        );
        assert_eq!(id(&format!("00-{TRACE}-01")), None);
        assert_eq!(id("garbage"), None);
        assert_eq!(incoming_trace_id(&http::HeaderMap::new()), None);
    }

    #[test]
    fn path_templates_of_routes() {
        let route = |yaml: &str| -> RouteConfig { serde_yaml::from_str(yaml).expect("route") };
        assert_eq!(path_template(&route("backendRefs: []")), Some("/*".into()));
        assert_eq!(
            path_template(&route(
                "matches: [{path: {type: PathPrefix, value: /api/}}, {path: {type: PathPrefix, value: /api}, method: GET}]"
            )),
            Some("/api/*".into())
        );
        assert_eq!(
            path_template(&route("matches: [{path: {type: Exact, value: /health}}]")),
            Some("/health".into())
        );
        assert_eq!(
            path_template(&route(
                "matches: [{path: {type: Exact, value: /a}}, {path: {type: Exact, value: /b}}]"
            )),
            None
        );
        let config = TraceConfig::for_route(
            "web",
            &"web/3".into(),
            &route("matches: [{path: {type: Exact, value: /a}}, {path: {type: Exact, value: /b}}]"),
        );
        assert_eq!(config.span_name("GET"), "GET web/3");
    }

    #[test]
    fn flags_map_to_settings() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            trace: TraceArgs,
        }
        let defaults = Cli::try_parse_from(["w"])
            .expect("defaults")
            .trace
            .settings();
        assert_eq!(defaults.otlp_endpoint, None);
        assert_eq!(defaults.sampling, 1.0);
        assert_eq!(defaults.service_name, "weft-waypoint");
        let set = Cli::try_parse_from([
            "w",
            "--otlp-endpoint",
            "http://collector:4317",
            "--trace-sampling",
            "0.25",
            "--trace-service-name",
            "shop-waypoint",
            "--trace-namespace",
            "shop",
            "--trace-waypoint-name",
            "waypoint",
        ])
        .expect("flags")
        .trace
        .settings();
        assert_eq!(set.otlp_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(set.sampling, 0.25);
        assert_eq!(set.service_name, "shop-waypoint");
        assert_eq!(set.namespace.as_deref(), Some("shop"));
        assert_eq!(set.waypoint.as_deref(), Some("waypoint"));
    }

    #[test]
    fn settings_are_validated() {
        let bad_ratio = TracingSettings {
            sampling: 1.5,
            ..TracingSettings::default()
        };
        assert!(matches!(
            Tracing::new(&bad_ratio),
            Err(TracingError::Sampling(_))
        ));
        for endpoint in ["localhost:4317", "https://collector:4317", "not a url"] {
            let settings = TracingSettings {
                otlp_endpoint: Some(endpoint.into()),
                ..TracingSettings::default()
            };
            assert!(
                matches!(Tracing::new(&settings), Err(TracingError::Endpoint(_))),
                "{endpoint}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_collector_neither_fails_nor_blocks_requests() {
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let tracing = Tracing::new(&TracingSettings {
            otlp_endpoint: Some(format!("http://127.0.0.1:{port}")),
            scheduled_delay: Duration::from_millis(20),
            export_timeout: Duration::from_secs(1),
            ..TracingSettings::default()
        })
        .expect("tracing");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let service =
            TraceLayer::with_tracer(named_route(), tracing.tracer()).layer(backend(200, seen));
        let started = Instant::now();
        for _ in 0..20 {
            let response = service
                .clone()
                .oneshot(request("/api"))
                .await
                .expect("response");
            assert_eq!(response.status(), 200);
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while tracing.export_failures() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(tracing.export_failures() > 0, "the failed export was seen");
        let started = Instant::now();
        tracing.shutdown(Duration::from_secs(2)).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
}
