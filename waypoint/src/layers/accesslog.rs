//! Access log: one JSON object per line per request (`--access-log off|stdout|PATH`).
//!
//! [`AccessLogLayer`] wraps the whole per-connection service (outside routing and every route
//! layer), so it sees the final status, including the waypoint's own answers (404 without a
//! route, 429, 503, 504, ...). The line is written when the response body is done: its last
//! frame went out, it failed, or the client went away (the body dropped before its end);
//! `duration_ms` and `response_bytes` are measured then (for a client that left, the bytes
//! sent so far).
//!
//! Fields (snake_case; absent values are `null`, `grpc_status` only when present):
//!
//! | field | meaning |
//! |---|---|
//! | `start_time` | when the request headers arrived, RFC 3339 UTC with milliseconds |
//! | `duration_ms` | until the response body ended (or the client left) |
//! | `method`, `authority`, `path` | of the request as received (`path` with the query) |
//! | `protocol` | `HTTP/1.0`, `HTTP/1.1` or `HTTP/2` |
//! | `status` | the status sent to the client |
//! | `grpc_status` | from the response headers (trailers-only) or trailers |
//! | `request_bytes` | body bytes: the whole body, or for a streamed request those sent by the time the response ended (0 when refused earlier) |
//! | `response_bytes` | body bytes sent to the client, counted until the line is written |
//! | `route`, `backend`, `upstream` | matched route, backend chosen last, endpoint picked last |
//! | `retries` | endpoint attempts minus one: retries and connect failovers (0 without either) |
//! | `source_principal`, `source_workload`, `source_ip` | mesh mode: the client's SPIFFE ID, workload and address; standalone: `source_ip` only |
//! | `destination_service` | mesh mode: the Service (`namespace/name`) of the tunnel |
//! | `trace_id` | the W3C trace id of the waypoint's span (with an exporter), else of the incoming `traceparent` |
//! | `flags` | `timeout`, `rate_limited`, `fault_abort`, `no_healthy_upstream`, `overflow`, `upstream_connect_failure`, `upstream_reset`, `denied` |
//!
//! Opaque TCP connections (mesh mode) get one line each when they end, with `protocol: "TCP"`
//! and their own fields: `start_time`, `duration_ms`, `destination_service`,
//! `destination_port`, `result` (`ok`, `denied`, `no_endpoint`, `connect_failed`), `upstream`,
//! `received_bytes` (from the client), `sent_bytes` (to it), `source_principal`,
//! `source_workload`, `source_ip`, and `error` when the copy ended with one.
//!
//! Lines go through a bounded queue ([`QUEUE_LINES`]) to a writer thread; when the sink is too
//! slow and the queue is full, the line is dropped and counted in
//! `weft_waypoint_access_log_dropped_total`: the request path never waits for the sink.

use std::convert::Infallible;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use serde::Serialize;
use tower::{Layer, Service, ServiceExt};

use super::{BoxFuture, RequestContext, RequestFacts};
use crate::body::{End, GRPC_STATUS, Response, Tally, Watch, Watched};

/// Lines waiting for the writer; beyond this, lines are dropped (and counted).
pub const QUEUE_LINES: usize = 8192;

/// Where the access log goes (`--access-log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// No access log.
    Off,
    /// The process's standard output (the default, as Istio's waypoints do).
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

impl FromStr for AccessLogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("--access-log needs `off`, `stdout` or a file path".into()),
            "off" => Ok(AccessLogTarget::Off),
            "stdout" | "-" => Ok(AccessLogTarget::Stdout),
            path => Ok(AccessLogTarget::File(path.into())),
        }
    }
}

impl fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLogTarget::Off => f.write_str("off"),
            AccessLogTarget::Stdout => f.write_str("stdout"),
            AccessLogTarget::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Why the access log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The file cannot be opened for appending.
    #[error(
        "cannot open the access log file {path}: {source}; check that its directory exists and is writable, or pass --access-log stdout|off"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The writer thread cannot start.
    #[error("cannot start the access log writer thread: {0}")]
    Thread(std::io::Error),
}

/// A handle to the access log's queue (cheap to clone).
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Opens `target` (`None` when off).
    pub fn open(target: &AccessLogTarget) -> Result<Option<AccessLog>, AccessLogError> {
        let writer: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        Self::to_writer(writer, QUEUE_LINES).map(Some)
    }

    /// Lines to `writer` through a queue of `capacity` lines.
    pub fn to_writer(
        writer: Box<dyn Write + Send>,
        capacity: usize,
    ) -> Result<AccessLog, AccessLogError> {
        let (tx, rx) = sync_channel(capacity);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, writer))
            .map_err(AccessLogError::Thread)?;
        Ok(AccessLog { tx })
    }

    /// Queues `line` (without its newline); drops it when the queue is full.
    pub fn write(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("weft_waypoint_access_log_dropped_total").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {
                metrics::counter!("weft_waypoint_access_log_dropped_total").increment(1);
            }
        }
    }
}

/// The writer thread: writes lines as they come, flushing whenever the queue is empty. Ends
/// when every [`AccessLog`] is gone.
fn write_lines(rx: Receiver<String>, writer: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(writer);
    let mut failed = false;
    while let Ok(line) = rx.recv() {
        let mut result = writeln!(out, "{line}");
        while result.is_ok()
            && let Ok(line) = rx.try_recv()
        {
            result = writeln!(out, "{line}");
        }
        let result = result.and_then(|()| out.flush());
        match (&result, failed) {
            (Err(e), false) => {
                tracing::warn!(error = %e, "writing the access log failed; lines are lost until it works again");
                failed = true;
            }
            (Ok(()), true) => failed = false,
            _ => {}
        }
    }
}

/// One access log line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    /// RFC 3339.
    pub start_time: String,
    /// Milliseconds.
    pub duration_ms: f64,
    /// Request method.
    pub method: String,
    /// `:authority` or `Host`.
    pub authority: Option<String>,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'static str,
    /// Response status.
    pub status: u16,
    /// gRPC status, when the response carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Request body bytes (as buffered).
    pub request_bytes: u64,
    /// Response body bytes sent.
    pub response_bytes: u64,
    /// Matched route.
    pub route: Option<String>,
    /// Backend chosen last.
    pub backend: Option<String>,
    /// Endpoint picked last.
    pub upstream: Option<String>,
    /// Attempts minus one.
    pub retries: u32,
    /// Client SPIFFE ID.
    pub source_principal: Option<String>,
    /// Client workload.
    pub source_workload: Option<String>,
    /// Client address.
    pub source_ip: Option<String>,
    /// Destination Service.
    pub destination_service: Option<String>,
    /// W3C trace id.
    pub trace_id: Option<String>,
    /// Why the answer is not (only) the backend's.
    pub flags: Vec<&'static str>,
}

impl Entry {
    /// The JSON line (without newline).
    pub fn to_line(&self) -> String {
        json_line(self)
    }
}

/// The access log line of one opaque TCP connection (mesh mode), written when it ends.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TcpEntry {
    /// RFC 3339: when the tunnel was accepted.
    pub start_time: String,
    /// Milliseconds, until both directions were done.
    pub duration_ms: f64,
    /// Always `TCP` (HTTP lines carry `HTTP/1.1`, `HTTP/2`, ...).
    pub protocol: &'static str,
    /// The Service (`namespace/name`) of the tunnel.
    pub destination_service: String,
    /// Its port.
    pub destination_port: u16,
    /// `ok`, `denied`, `no_endpoint` or `connect_failed`.
    pub result: &'static str,
    /// The endpoint it was proxied to.
    pub upstream: Option<String>,
    /// Bytes from the client.
    pub received_bytes: u64,
    /// Bytes to the client.
    pub sent_bytes: u64,
    /// Client SPIFFE ID.
    pub source_principal: String,
    /// Client workload.
    pub source_workload: Option<String>,
    /// Client address.
    pub source_ip: String,
    /// Why the copy ended with an error, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TcpEntry {
    /// The line of a connection from `source` to `service`'s `port`, accepted at `start_time`
    /// (`start` on the monotonic clock), that went as `outcome` says.
    pub fn new(
        start_time: SystemTime,
        start: Instant,
        source: &crate::layers::Source,
        service: String,
        port: u16,
        outcome: crate::mesh::tcp::TcpOutcome,
    ) -> TcpEntry {
        TcpEntry {
            start_time: rfc3339(start_time),
            duration_ms: millis_since(start),
            protocol: "TCP",
            destination_service: service,
            destination_port: port,
            result: outcome.result,
            upstream: outcome.upstream.map(|a| a.to_string()),
            received_bytes: outcome.received_bytes,
            sent_bytes: outcome.sent_bytes,
            source_principal: source.principal.to_string(),
            source_workload: source.workload.as_deref().map(str::to_string),
            source_ip: source.ip.to_canonical().to_string(),
            error: outcome.error,
        }
    }

    /// The JSON line (without newline).
    pub fn to_line(&self) -> String {
        json_line(self)
    }
}

/// Milliseconds since `start`, to the microsecond.
fn millis_since(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// `entry` as one JSON line (without newline).
fn json_line(entry: &impl Serialize) -> String {
    serde_json::to_string(entry)
        .unwrap_or_else(|e| format!("{{\"error\":\"access log entry not serializable: {e}\"}}"))
}

/// What is known when the request arrives.
struct Started {
    start_time: SystemTime,
    start: Instant,
    method: String,
    authority: Option<String>,
    path: String,
    protocol: &'static str,
}

fn protocol_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

fn entry(
    started: &Started,
    status: u16,
    grpc_status: Option<String>,
    response_bytes: u64,
    facts: RequestFacts,
) -> Entry {
    let source = facts.source.as_ref();
    Entry {
        start_time: rfc3339(started.start_time),
        duration_ms: millis_since(started.start),
        method: started.method.clone(),
        authority: started.authority.clone(),
        path: started.path.clone(),
        protocol: started.protocol,
        status,
        grpc_status,
        request_bytes: facts.request_bytes,
        response_bytes,
        route: facts.route.as_deref().map(str::to_string),
        backend: facts.backend.as_deref().map(str::to_string),
        upstream: facts.endpoint.map(|e| e.to_string()),
        retries: facts.attempts.saturating_sub(1),
        source_principal: source.map(|s| s.principal.to_string()),
        source_workload: source.and_then(|s| s.workload.as_deref().map(str::to_string)),
        source_ip: source
            .map(|s| s.ip)
            .or(facts.peer.map(|p| p.ip()))
            .map(|ip| ip.to_canonical().to_string()),
        destination_service: facts.destination.as_deref().map(str::to_string),
        trace_id: facts.trace_id,
        flags: facts.flags,
    }
}

/// `time` as RFC 3339 in UTC with milliseconds (`2026-11-22T15:04:05.123Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Wraps a connection's service with the access log (a pass-through when `None`).
#[derive(Debug, Clone)]
pub struct AccessLogLayer {
    log: Option<AccessLog>,
}

impl AccessLogLayer {
    /// Logs to `log` (nothing when `None`).
    pub fn new(log: Option<AccessLog>) -> Self {
        AccessLogLayer { log }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLogService {
            inner,
            log: self.log.clone(),
        }
    }
}

/// hyper's per-connection service: `handler` for each request, inside the access log when one
/// is written. hyper calls it by reference, so with the log off a request costs no clone of the
/// service, no adapter and no boxed future (tower's `TowerToHyperService` clones the service
/// and drives a `oneshot` per request).
pub struct HttpService<F> {
    handler: F,
    logged: Option<AccessLogService<tower::util::ServiceFn<F>>>,
}

impl<F: Clone> HttpService<F> {
    /// Serves `handler`, logging each request to `log` when given.
    pub fn new(log: Option<AccessLog>, handler: F) -> Self {
        let logged = log.map(|log| AccessLogService {
            inner: tower::service_fn(handler.clone()),
            log: Some(log),
        });
        HttpService { handler, logged }
    }
}

pin_project_lite::pin_project! {
    /// [`HttpService`]'s future: the handler's own, or the access log's.
    #[project = HttpFutureProj]
    pub enum HttpFuture<Fut> {
        /// Without access log.
        Plain { #[pin] inner: Fut },
        /// Through the access log.
        Logged { inner: BoxFuture<Result<Response, Infallible>> },
    }
}

impl<Fut: Future<Output = Result<Response, Infallible>>> Future for HttpFuture<Fut> {
    type Output = Result<Response, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            HttpFutureProj::Plain { inner } => inner.poll(cx),
            HttpFutureProj::Logged { inner } => inner.as_mut().poll(cx),
        }
    }
}

impl<F, Fut, B> hyper::service::Service<http::Request<B>> for HttpService<F>
where
    F: Fn(http::Request<B>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response, Infallible>> + Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = HttpFuture<Fut>;

    fn call(&self, request: http::Request<B>) -> Self::Future {
        match &self.logged {
            None => HttpFuture::Plain {
                inner: (self.handler)(request),
            },
            Some(logged) => HttpFuture::Logged {
                inner: logged.clone().call(request),
            },
        }
    }
}

/// See [`AccessLogLayer`].
#[derive(Debug, Clone)]
pub struct AccessLogService<S> {
    inner: S,
    log: Option<AccessLog>,
}

impl<S, B> Service<http::Request<B>> for AccessLogService<S>
where
    S: Service<http::Request<B>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let Some(log) = self.log.clone() else {
            return Box::pin(inner.oneshot(request));
        };
        let started = Started {
            start_time: SystemTime::now(),
            start: Instant::now(),
            method: request.method().to_string(),
            authority: request
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    request
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                }),
            path: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            protocol: protocol_name(request.version()),
        };
        let context = RequestContext::default();
        request.extensions_mut().insert(context.clone());
        Box::pin(async move {
            let response = match inner.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let grpc_status = response
                .headers()
                .get(GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let status = response.status().as_u16();
            Ok(response.map(|body| {
                let pending = Pending {
                    log,
                    started,
                    status,
                    grpc_status,
                    context,
                    tally: Tally::default(),
                };
                Watched::new(body, pending).boxed()
            }))
        })
    }
}

/// What the line still needs when the body is done; it is written then (the last frame went
/// out, the body failed, or the client went away and the body was dropped).
struct Pending {
    log: AccessLog,
    started: Started,
    status: u16,
    /// From the response headers (trailers-only gRPC answers).
    grpc_status: Option<String>,
    context: RequestContext,
    tally: Tally,
}

impl Watch for Pending {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        self.tally.frame(frame);
    }

    fn end(self, _how: End) {
        let grpc_status = self
            .tally
            .grpc_status
            .map(String::from)
            .or(self.grpc_status);
        let entry = entry(
            &self.started,
            self.status,
            grpc_status,
            self.tally.bytes,
            self.context.facts(),
        );
        self.log.write(entry.to_line());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Source;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A writer collecting lines in memory.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn lines(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().expect("sink").clone()).expect("utf-8");
            text.lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect()
        }
    }

    #[test]
    fn formats_times_and_targets() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_878_245_123)),
            "2026-11-28T15:04:05.123Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z",
            "leap day"
        );
        assert_eq!("off".parse(), Ok(AccessLogTarget::Off));
        assert_eq!("stdout".parse(), Ok(AccessLogTarget::Stdout));
        assert_eq!(
            "/var/log/w.log".parse(),
            Ok(AccessLogTarget::File("/var/log/w.log".into()))
        );
        assert!("".parse::<AccessLogTarget>().is_err());
    }

    #[test]
    fn entry_is_one_json_object_with_snake_case_fields() {
        let started = Started {
            start_time: UNIX_EPOCH,
            start: Instant::now(),
            method: "POST".into(),
            authority: Some("reviews.shop:9080".into()),
            path: "/a?b=1".into(),
            protocol: "HTTP/2",
        };
        let facts = RequestFacts {
            route: Some("r1".into()),
            backend: Some("reviews".into()),
            endpoint: Some("10.0.0.1:8080".parse().expect("addr")),
            attempts: 2,
            flags: vec!["timeout"],
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            request_bytes: 5,
            source: Some(Source {
                principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
                ip: "10.0.0.7".parse().expect("ip"),
                workload: Some("shop/web-1".into()),
            }),
            destination: Some("shop/reviews".into()),
            deadlines: [None; 2],
            peer: Some("10.0.0.9:4000".parse().expect("addr")),
            selected: None,
        };
        let line = entry(&started, 504, Some("4".into()), 12, facts).to_line();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["start_time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["authority"], "reviews.shop:9080");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["protocol"], "HTTP/2");
        assert_eq!(v["status"], 504);
        assert_eq!(v["grpc_status"], "4");
        assert_eq!(v["request_bytes"], 5);
        assert_eq!(v["response_bytes"], 12);
        assert_eq!(v["route"], "r1");
        assert_eq!(v["backend"], "reviews");
        assert_eq!(v["upstream"], "10.0.0.1:8080");
        assert_eq!(v["retries"], 1);
        assert_eq!(
            v["source_principal"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(v["source_workload"], "shop/web-1");
        assert_eq!(
            v["source_ip"], "10.0.0.7",
            "the mesh source wins over the peer"
        );
        assert_eq!(v["destination_service"], "shop/reviews");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["flags"], serde_json::json!(["timeout"]));
        assert!(v["duration_ms"].is_number());

        // Absent values: null, and no grpc_status at all.
        let facts = RequestFacts {
            peer: Some("10.0.0.9:4000".parse().expect("addr")),
            ..RequestFacts::default()
        };
        let line = entry(&started, 200, None, 0, facts).to_line();
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert!(v.get("grpc_status").is_none());
        assert!(v["route"].is_null());
        assert_eq!(v["source_ip"], "10.0.0.9", "the peer without a mesh source");
        assert_eq!(v["retries"], 0);
    }

    /// The sink's lines once there are any: the writer thread writes asynchronously, so a
    /// bounded wait (5 s).
    async fn first_lines(sink: &Sink) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        for _ in 0..500 {
            lines = sink.lines();
            if !lines.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lines
    }

    #[tokio::test]
    async fn a_request_writes_one_line_when_its_body_is_done() {
        let sink = Sink::default();
        let log = AccessLog::to_writer(Box::new(sink.clone()), 16).expect("log");
        let service = AccessLogLayer::new(Some(log)).layer(tower::service_fn(
            |request: http::Request<()>| async move {
                let context = request
                    .extensions()
                    .get::<RequestContext>()
                    .cloned()
                    .expect("the layer inserts a context");
                context.set_route("r".into());
                context.flag("rate_limited");
                Ok::<_, Infallible>(crate::body::text_response(
                    http::StatusCode::TOO_MANY_REQUESTS,
                    "slow down",
                ))
            },
        ));
        let request = http::Request::builder()
            .uri("http://a.example/x")
            .body(())
            .expect("request");
        let response = service.oneshot(request).await.expect("response");
        assert!(sink.lines().is_empty(), "no line before the body is done");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"slow down");
        let lines = first_lines(&sink).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["status"], 429);
        assert_eq!(lines[0]["authority"], "a.example");
        assert_eq!(lines[0]["path"], "/x");
        assert_eq!(lines[0]["route"], "r");
        assert_eq!(lines[0]["response_bytes"], 9);
        assert_eq!(lines[0]["flags"], serde_json::json!(["rate_limited"]));
    }

    #[tokio::test]
    async fn the_hyper_service_logs_only_when_a_log_is_given() {
        use hyper::service::Service as _;
        let handler = |_request: http::Request<()>| async {
            Ok::<_, Infallible>(crate::body::text_response(http::StatusCode::ACCEPTED, "ok"))
        };
        let request = || {
            http::Request::builder()
                .uri("http://a.example/x")
                .body(())
                .expect("request")
        };
        // Off: the handler's answer, straight.
        let plain = HttpService::new(None, handler);
        let response = plain.call(request()).await.expect("response");
        assert_eq!(response.status(), http::StatusCode::ACCEPTED);
        // On: the same answer, and one line once the body is read.
        let sink = Sink::default();
        let log = AccessLog::to_writer(Box::new(sink.clone()), 16).expect("log");
        let logged = HttpService::new(Some(log), handler);
        let response = logged.call(request()).await.expect("response");
        assert_eq!(response.status(), http::StatusCode::ACCEPTED);
        response.into_body().collect().await.expect("body");
        let lines = first_lines(&sink).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["status"], 202);
        assert_eq!(lines[0]["path"], "/x");
    }

    #[test]
    fn a_full_queue_drops_lines_instead_of_blocking() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        /// A writer that says when it is called, then blocks until released.
        struct Stuck {
            entered: std::sync::mpsc::Sender<()>,
            release: std::sync::mpsc::Receiver<()>,
        }
        impl Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _ = self.entered.send(());
                let _ = self.release.recv();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let writer = Stuck {
            entered: entered_tx,
            release: release_rx,
        };
        let log = AccessLog::to_writer(Box::new(writer), 2).expect("log");
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            log.write("{\"n\":0}".into());
            // The writer thread holds line 0 and is stuck in the sink.
            entered
                .recv_timeout(Duration::from_secs(10))
                .expect("the writer reached the sink");
            // Two lines fit in the queue; the other 98 are dropped at once.
            for i in 1..=100 {
                log.write(format!("{{\"n\":{i}}}"));
            }
        });
        let dropped: u64 = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == "weft_waypoint_access_log_dropped_total")
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum();
        assert_eq!(dropped, 98);
        drop(release);
    }
}
