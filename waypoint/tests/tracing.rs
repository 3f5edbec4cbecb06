//! Traces end to end on loopback: a client, the waypoint (standalone mode), a backend that
//! records the `traceparent` it receives, and an in-test OTLP/gRPC receiver the waypoint
//! exports its spans to.
//!
//! One test function: the tracer provider is process-wide, and the exporter's channel lives on
//! the runtime that built it.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use weft_waypoint::layers::trace::{Tracing, TracingSettings};

use common::{client, proxy, send};

/// A span the receiver got, with its resource's attributes.
#[derive(Debug, Clone)]
struct Received {
    span: Span,
    resource: HashMap<String, String>,
}

/// An OTLP trace receiver storing every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| strings(&r.attributes))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        span,
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn value(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn strings(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn receiver() -> (SocketAddr, Receiver) {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let addr = socket.local_addr().expect("addr");
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(socket)),
    );
    (addr, receiver)
}

/// A backend recording the `traceparent` of each request by path; `/fail` answers 500.
async fn recording_backend() -> (SocketAddr, Arc<Mutex<HashMap<String, String>>>) {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = socket.local_addr().expect("addr");
    let seen: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                continue;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let path = request
                            .uri()
                            .path_and_query()
                            .map_or("/", |p| p.as_str())
                            .to_string();
                        let traceparent = request
                            .headers()
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        record
                            .lock()
                            .expect("lock")
                            .insert(path.clone(), traceparent);
                        let status = if path.starts_with("/fail") { 500 } else { 200 };
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .expect("response"),
                            )
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn yaml(backend: SocketAddr) -> String {
    format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: api
        matches: [{{ path: {{ type: PathPrefix, value: /api }} }}]
        backendRefs: [{{ name: shop }}]
      - matches: [{{ path: {{ type: PathPrefix, value: /fail }} }}]
        backendRefs: [{{ name: shop }}]
backends:
  - name: shop
    endpoints: ["{backend}"]
"#
    )
}

/// The span of trace `trace_id`, waiting for it at most 10 s.
async fn span_of(receiver: &Receiver, trace_id: &str) -> Received {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = receiver
            .spans
            .lock()
            .expect("lock")
            .iter()
            .find(|r| hex(&r.span.trace_id) == trace_id)
        {
            return found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no span of trace {trace_id} exported within 10 s; got {:?}",
            receiver.spans.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(trace id, parent id, flags)` of a `traceparent`.
fn parse(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent `{traceparent}`");
    assert_eq!(parts[0], "00");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const FAIL_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const FAIL_PARENT: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_incoming_trace_parent_the_backend_and_reach_the_collector() {
    let (otlp, receiver) = receiver().await;
    let traces = Tracing::install(&TracingSettings {
        otlp_endpoint: Some(format!("http://{otlp}")),
        namespace: Some("shop".into()),
        waypoint: Some("shop-waypoint".into()),
        scheduled_delay: Duration::from_millis(50),
        ..TracingSettings::default()
    })
    .expect("tracing");
    let (backend, seen) = recording_backend().await;
    let proxy = proxy(&yaml(backend)).await;
    let http = client();

    // 1. An incoming trace: the waypoint's span is its child, the backend's parent.
    let incoming = format!("00-{TRACE}-{PARENT}-01");
    let answer = send(
        &http,
        proxy,
        "/api/items?id=1",
        &[("traceparent", &incoming), ("tracestate", "vendor=abc")],
    )
    .await;
    assert_eq!(answer.status, 200);
    let exported = span_of(&receiver, TRACE).await;
    let span = &exported.span;
    assert_eq!(hex(&span.parent_span_id), PARENT);
    assert_eq!(span.name, "GET api");
    assert_eq!(span.trace_state, "vendor=abc");
    let forwarded = seen.lock().expect("lock")["/api/items?id=1"].clone();
    let (trace, parent, flags) = parse(&forwarded);
    assert_eq!(trace, TRACE, "the backend continues the same trace");
    assert_eq!(
        parent,
        hex(&span.span_id),
        "the backend's parent is the waypoint's span"
    );
    assert_eq!(flags, "01");
    let attributes = strings(&span.attributes);
    for (key, expected) in [
        ("http.request.method", "GET"),
        ("url.path", "/api/items"),
        ("http.route", "/api/*"),
        ("http.response.status_code", "200"),
        ("server.address", "127.0.0.1"),
        ("network.protocol.version", "1.1"),
        ("weft.listener", "web"),
        ("weft.route", "api"),
        ("weft.backend", "shop"),
    ] {
        assert_eq!(
            attributes.get(key).map(String::as_str),
            Some(expected),
            "{key} in {attributes:?}"
        );
    }
    assert_ne!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(
        exported.resource.get("service.name").map(String::as_str),
        Some("weft-waypoint")
    );
    assert_eq!(
        exported
            .resource
            .get("k8s.namespace.name")
            .map(String::as_str),
        Some("shop")
    );
    assert_eq!(
        exported.resource.get("weft.waypoint").map(String::as_str),
        Some("shop-waypoint")
    );

    // 2. No traceparent: a new trace rooted at the waypoint.
    assert_eq!(send(&http, proxy, "/api/new", &[]).await.status, 200);
    let forwarded = seen.lock().expect("lock")["/api/new"].clone();
    let (trace, parent, _) = parse(&forwarded);
    assert_ne!(trace, TRACE);
    let root = span_of(&receiver, &trace).await.span;
    assert!(
        root.parent_span_id.is_empty() || root.parent_span_id.iter().all(|b| *b == 0),
        "a root span: {:?}",
        root.parent_span_id
    );
    assert_eq!(parent, hex(&root.span_id));

    // 3. A 5xx answer: the span's status is error; the unnamed route names it by its path.
    let incoming = format!("00-{FAIL_TRACE}-{FAIL_PARENT}-01");
    let answer = send(&http, proxy, "/fail/now", &[("traceparent", &incoming)]).await;
    assert_eq!(answer.status, 500);
    let failed = span_of(&receiver, FAIL_TRACE).await.span;
    assert_eq!(hex(&failed.parent_span_id), FAIL_PARENT);
    assert_eq!(failed.name, "GET /fail/*");
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32),
        "{:?}",
        failed.status
    );
    let attributes = strings(&failed.attributes);
    assert_eq!(
        attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("500")
    );
    assert_eq!(
        attributes.get("error.type").map(String::as_str),
        Some("500")
    );
    assert_eq!(
        attributes.get("weft.route").map(String::as_str),
        Some("web/1")
    );
    assert_eq!(traces.export_failures(), 0);

    // 4. Shutdown flushes: with an hour-long batch delay, the span of a request reaches the
    // collector only because the provider is shut down.
    let flushing = Tracing::install(&TracingSettings {
        otlp_endpoint: Some(format!("http://{otlp}")),
        scheduled_delay: Duration::from_secs(3600),
        ..TracingSettings::default()
    })
    .expect("tracing");
    let second = common::proxy(&yaml(backend)).await;
    const FLUSH_TRACE: &str = "11111111111111111111111111111111";
    let incoming = format!("00-{FLUSH_TRACE}-{PARENT}-01");
    assert_eq!(
        send(&http, second, "/api/flush", &[("traceparent", &incoming)])
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !receiver
            .spans
            .lock()
            .expect("lock")
            .iter()
            .any(|r| hex(&r.span.trace_id) == FLUSH_TRACE),
        "not exported before shutdown"
    );
    let started = Instant::now();
    flushing.shutdown(Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(
        receiver
            .spans
            .lock()
            .expect("lock")
            .iter()
            .any(|r| hex(&r.span.trace_id) == FLUSH_TRACE),
        "exported by the shutdown"
    );
    traces.shutdown(Duration::from_secs(5)).await;
}

const BIN: &str = env!("CARGO_BIN_EXE_weft-waypoint");

/// Kills the child if the test ends early.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

#[tokio::test]
async fn the_binary_exports_with_its_flags_and_flushes_on_sigterm() {
    let (otlp, receiver) = receiver().await;
    let (backend, _) = recording_backend().await;
    let (listen, metrics) = (free_port(), free_port());
    let path =
        std::env::temp_dir().join(format!("weft-waypoint-{}-tracing.yaml", std::process::id()));
    std::fs::write(
        &path,
        yaml(backend).replace("127.0.0.1:0", &listen.to_string()),
    )
    .expect("write config");
    let bad = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .args(["--metrics-address", &metrics.to_string()])
        .args(["--trace-sampling", "2"])
        .output()
        .expect("run the binary");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("--trace-sampling"), "{stderr}");

    let mut child = Child(
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .args(["--metrics-address", &metrics.to_string()])
            .args(["--otlp-endpoint", &format!("http://{otlp}")])
            .args(["--trace-service-name", "shop-waypoint"])
            .args(["--trace-namespace", "shop"])
            .args(["--trace-waypoint-name", "waypoint"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the binary"),
    );
    let mut ready = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the binary did not listen within 5 s");
    const BINARY_TRACE: &str = "22222222222222222222222222222222";
    let incoming = format!("00-{BINARY_TRACE}-{PARENT}-01");
    let answer = send(&client(), listen, "/api/bin", &[("traceparent", &incoming)]).await;
    assert_eq!(answer.status, 200);
    // The batch delay is 5 s: the span leaves now only because SIGTERM flushes it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !receiver
            .spans
            .lock()
            .expect("lock")
            .iter()
            .any(|r| hex(&r.span.trace_id) == BINARY_TRACE),
        "not exported before SIGTERM"
    );
    let pid = child.0.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = child.0.try_wait().expect("wait") {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        exited.is_some_and(|s| s.success()),
        "exit after SIGTERM: {exited:?}"
    );
    let exported = receiver
        .spans
        .lock()
        .expect("lock")
        .iter()
        .find(|r| hex(&r.span.trace_id) == BINARY_TRACE)
        .cloned()
        .expect("the span was flushed on SIGTERM");
    assert_eq!(hex(&exported.span.parent_span_id), PARENT);
    for (key, expected) in [
        ("service.name", "shop-waypoint"),
        ("k8s.namespace.name", "shop"),
        ("weft.waypoint", "waypoint"),
    ] {
        assert_eq!(
            exported.resource.get(key).map(String::as_str),
            Some(expected),
            "{key}"
        );
    }
    let _ = std::fs::remove_file(path);
}
