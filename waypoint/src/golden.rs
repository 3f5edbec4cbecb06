//! Golden signals of every request: counted when its response ends (or is abandoned), so that
//! the gRPC status (trailers), the response size and the full duration are known.
//!
//! Series: `weft_waypoint_requests_total`, `weft_waypoint_request_duration_seconds`,
//! `weft_waypoint_request_bytes` and `weft_waypoint_response_bytes`, all with the labels of
//! [`Golden`] (documented in docs/metrics.md).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::body::{Body, Response};

/// What the metrics say about a request, known when its response starts.
#[derive(Debug, Clone, Default)]
pub struct Golden {
    /// The listener.
    pub listener: String,
    /// The route (empty when none matched).
    pub route: String,
    /// The backend (empty when none was chosen).
    pub backend: String,
    /// `namespace/name` of the client workload, `unknown` when not known.
    pub source_workload: String,
    /// The client workload's namespace, `unknown` when not known.
    pub source_namespace: String,
    /// The client's SPIFFE ID, `unknown` when not known (plain listeners).
    pub source_principal: String,
    /// `<name>.<namespace>.svc.cluster.local` of the Service the listener serves, `unknown`
    /// for plain listeners.
    pub destination_service: String,
    /// `namespace/name` of the endpoint's workload, `unknown` when not known.
    pub destination_workload: String,
    /// The endpoint workload's namespace (else the Service's), `unknown` when not known.
    pub destination_namespace: String,
    /// Request body size in bytes.
    pub request_bytes: u64,
}

/// `unknown` for an empty label value.
pub fn or_unknown(v: &str) -> String {
    if v.is_empty() {
        "unknown".to_string()
    } else {
        v.to_string()
    }
}

/// The namespace of `namespace/name`, `unknown` when there is none.
pub fn namespace_of(workload: &str) -> String {
    match workload.split_once('/') {
        Some((ns, _)) if !ns.is_empty() => ns.to_string(),
        _ => "unknown".to_string(),
    }
}

/// `response` whose body records the request's golden signals when it ends or is dropped.
pub fn observe(response: Response, golden: Golden, start: Instant) -> Response {
    let grpc_status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let code = response.status().as_u16();
    response.map(|inner| {
        Observed {
            inner,
            state: Some(State {
                golden,
                start,
                code,
                grpc_status,
                response_bytes: 0,
            }),
        }
        .boxed()
    })
}

struct State {
    golden: Golden,
    start: Instant,
    code: u16,
    grpc_status: Option<String>,
    response_bytes: u64,
}

impl State {
    fn record(self) {
        let g = self.golden;
        let labels = [
            ("reporter", "waypoint".to_string()),
            ("listener", g.listener),
            ("route", g.route),
            ("backend", g.backend),
            ("code", self.code.to_string()),
            ("grpc_status", self.grpc_status.unwrap_or_default()),
            ("source_workload", g.source_workload),
            ("source_namespace", g.source_namespace),
            ("source_principal", g.source_principal),
            ("destination_service", g.destination_service),
            ("destination_workload", g.destination_workload),
            ("destination_namespace", g.destination_namespace),
        ];
        tracing::debug!(
            target: "weft_waypoint::access",
            listener = %labels[1].1,
            route = %labels[2].1,
            backend = %labels[3].1,
            code = self.code,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        metrics::counter!("weft_waypoint_requests_total", &labels).increment(1);
        metrics::histogram!("weft_waypoint_request_duration_seconds", &labels)
            .record(self.start.elapsed().as_secs_f64());
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::histogram!("weft_waypoint_request_bytes", &labels)
                .record(g.request_bytes as f64);
            metrics::histogram!("weft_waypoint_response_bytes", &labels)
                .record(self.response_bytes as f64);
        }
    }
}

/// A response body that counts its bytes, reads `grpc-status` from its trailers and records
/// the request once, at its end (or when dropped before it: the client went away).
struct Observed {
    inner: Body,
    state: Option<State>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(state) = this.state.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        state.response_bytes += data.len() as u64;
                    } else if let Some(status) = frame
                        .trailers_ref()
                        .and_then(|t| t.get("grpc-status"))
                        .and_then(|v| v.to_str().ok())
                    {
                        state.grpc_status = Some(status.to_string());
                    }
                }
                if this.inner.is_end_stream()
                    && let Some(state) = this.state.take()
                {
                    state.record();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(state) = this.state.take() {
                    state.record();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state.record();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    fn golden() -> Golden {
        Golden {
            listener: "l".into(),
            route: "r".into(),
            backend: "b".into(),
            source_workload: "shop/web".into(),
            source_namespace: "shop".into(),
            source_principal: "spiffe://td/ns/shop/sa/web".into(),
            destination_service: "api.shop.svc.cluster.local".into(),
            destination_workload: "shop/api-1".into(),
            destination_namespace: "shop".into(),
            request_bytes: 3,
        }
    }

    #[test]
    fn names() {
        assert_eq!(namespace_of("shop/web"), "shop");
        assert_eq!(namespace_of(""), "unknown");
        assert_eq!(or_unknown(""), "unknown");
        assert_eq!(or_unknown("x"), "x");
    }

    #[test]
    fn records_once_at_the_end_with_sizes_and_grpc_status_from_trailers() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                let body = http_body_util::Full::new(Bytes::from_static(b"hello"))
                    .map_err(|never| match never {})
                    .with_trailers(async move { Some(Ok(trailers)) })
                    .boxed();
                let response = observe(http::Response::new(body), golden(), Instant::now());
                let collected = response.into_body().collect().await.expect("body");
                assert_eq!(collected.to_bytes().as_ref(), b"hello");
            });
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let count = |name: &str| {
            snapshot
                .iter()
                .filter(|(k, ..)| k.key().name() == name)
                .collect::<Vec<_>>()
        };
        let requests = count("weft_waypoint_requests_total");
        assert_eq!(requests.len(), 1, "{snapshot:?}");
        let (key, _, _, value) = requests[0];
        assert!(matches!(value, DebugValue::Counter(1)), "{value:?}");
        let label = |name: &str| {
            key.key()
                .labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_string())
        };
        assert_eq!(label("grpc_status").as_deref(), Some("14"));
        assert_eq!(label("reporter").as_deref(), Some("waypoint"));
        assert_eq!(label("code").as_deref(), Some("200"));
        let sizes = count("weft_waypoint_response_bytes");
        assert!(
            matches!(&sizes[0].3, DebugValue::Histogram(v) if v.len() == 1 && v[0].into_inner() == 5.0),
            "{sizes:?}"
        );
        let sizes = count("weft_waypoint_request_bytes");
        assert!(
            matches!(&sizes[0].3, DebugValue::Histogram(v) if v[0].into_inner() == 3.0),
            "{sizes:?}"
        );
    }

    #[test]
    fn a_dropped_body_is_recorded_once() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let response = observe(
                crate::body::text_response(http::StatusCode::NOT_FOUND, "nope"),
                golden(),
                Instant::now(),
            );
            drop(response);
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let requests: Vec<_> = snapshot
            .iter()
            .filter(|(k, ..)| k.key().name() == "weft_waypoint_requests_total")
            .collect();
        assert_eq!(requests.len(), 1);
        assert!(matches!(requests[0].3, DebugValue::Counter(1)));
    }
}
