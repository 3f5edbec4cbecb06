//! An OTLP/gRPC trace receiver for lab tests: a real tonic `TraceService` listening inside a
//! namespace, keeping every span it is sent (ids as lowercase hex, attributes as strings).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use weft_netns::NetNs;

use crate::grpc::ServerThread;
use crate::net::tcp_listen_in;

/// One exported span.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, empty for a root span.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// OTLP span kind (2 = server, 3 = client).
    pub kind: i32,
    /// Span attributes.
    pub attributes: HashMap<String, String>,
    /// Resource attributes (`service.name`, ...).
    pub resource: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| strings(&r.attributes))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: span.kind,
                        attributes: strings(&span.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
        match self.0.lock() {
            Ok(mut spans) => spans.extend(received),
            Err(poisoned) => poisoned.into_inner().extend(received),
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

/// The receiver: serves on its own thread until dropped.
pub struct OtlpReceiver {
    store: Store,
    _thread: ServerThread,
}

impl OtlpReceiver {
    /// Listens on `addr` inside `ns` (e.g. `127.0.0.1:4317` in a pod).
    pub fn start(ns: &NetNs, addr: SocketAddr) -> io::Result<Self> {
        let listener = tcp_listen_in(ns, addr)?;
        let store = Store::default();
        let service = TraceServiceServer::new(store.clone());
        let thread = ServerThread::spawn(
            format!("otlp-receiver-{addr}"),
            listener,
            move |listener, stopped| async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await;
            },
        )?;
        Ok(Self {
            store,
            _thread: thread,
        })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        match self.store.0.lock() {
            Ok(spans) => spans.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}
