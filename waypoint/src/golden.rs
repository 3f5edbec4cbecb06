//! Golden signals of every request: counted when its response ends (or is abandoned), so that
//! the gRPC status (trailers), the response size and the full duration are known.
//!
//! Series: `weft_waypoint_requests_total`, `weft_waypoint_request_duration_seconds`,
//! `weft_waypoint_request_bytes` and `weft_waypoint_response_bytes`, all with the labels of
//! [`Golden`] (documented in docs/metrics.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use metrics::{Counter, Histogram};

use crate::body::{End, GRPC_STATUS, Response, Tally, Watch, Watched};

/// What the metrics say about a request, known when its response starts. The label values
/// are derived from it once per series ([`SeriesCache`]), not per request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Golden {
    /// The listener.
    pub listener: Arc<str>,
    /// The route (empty when none matched).
    pub route: Arc<str>,
    /// The backend, when one was chosen.
    pub backend: Option<Arc<str>>,
    /// The client's SPIFFE ID (mesh mode).
    pub source_principal: Option<Arc<str>>,
    /// `namespace/name` of the client workload, when known.
    pub source_workload: Option<Arc<str>>,
    /// `namespace/name` of the Service the listener serves (mesh mode).
    pub destination_service: Option<Arc<str>>,
    /// `namespace/name` of the endpoint's workload, when known.
    pub destination_workload: Option<Arc<str>>,
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

/// One series of each golden metric for one label set.
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// A series' identity: the request's [`Golden`], its status code and gRPC status.
#[derive(Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    golden: Golden,
    code: u16,
    grpc_status: Option<Box<str>>,
}

impl SeriesKey {
    /// The label values (as docs/waypoint.md lists them).
    fn labels(&self) -> [(&'static str, String); 12] {
        let g = &self.golden;
        let opt = |v: &Option<Arc<str>>| v.as_deref().unwrap_or("").to_string();
        let source_workload = opt(&g.source_workload);
        let (destination_service, service_namespace) = match g
            .destination_service
            .as_deref()
            .and_then(|k| k.split_once('/'))
        {
            Some((ns, name)) => (format!("{name}.{ns}.svc.cluster.local"), ns.to_string()),
            None => ("unknown".to_string(), "unknown".to_string()),
        };
        let destination_workload = opt(&g.destination_workload);
        let destination_namespace = if destination_workload.is_empty() {
            service_namespace
        } else {
            namespace_of(&destination_workload)
        };
        [
            ("reporter", "waypoint".to_string()),
            ("listener", g.listener.to_string()),
            ("route", g.route.to_string()),
            ("backend", opt(&g.backend)),
            ("code", self.code.to_string()),
            (
                "grpc_status",
                self.grpc_status.as_deref().unwrap_or("").to_string(),
            ),
            ("source_namespace", namespace_of(&source_workload)),
            ("source_workload", or_unknown(&source_workload)),
            ("source_principal", or_unknown(&opt(&g.source_principal))),
            ("destination_service", destination_service),
            ("destination_workload", or_unknown(&destination_workload)),
            ("destination_namespace", destination_namespace),
        ]
    }
}

/// Most series a cache keeps before starting over (a bound on memory when labels churn, e.g.
/// workloads coming and going; the registry keeps the series themselves).
const MAX_CACHED_SERIES: usize = 4096;

/// Metric handles per label set, so a request costs a hash lookup instead of building,
/// sorting and registering twelve labels for four metrics (measured: 20 % of the waypoint's
/// CPU in the benchmark). One per compiled listener, one map per worker thread
/// ([`crate::workers`]): workers never contend for its lock or bounce its cache lines.
pub struct SeriesCache {
    series: Box<[Mutex<SeriesMap>]>,
}

/// One worker's handles by label set.
type SeriesMap = HashMap<SeriesKey, Arc<Series>, foldhash::fast::RandomState>;

impl Default for SeriesCache {
    fn default() -> Self {
        SeriesCache {
            series: (0..crate::workers::count().max(1))
                .map(|_| Mutex::default())
                .collect(),
        }
    }
}

impl std::fmt::Debug for SeriesCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeriesCache").finish_non_exhaustive()
    }
}

impl SeriesCache {
    fn series(&self, key: SeriesKey) -> Arc<Series> {
        let shard = &self.series[crate::workers::current() % self.series.len()];
        let mut map = match shard.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        if map.len() >= MAX_CACHED_SERIES {
            map.clear();
        }
        let labels = key.labels();
        let series = Arc::new(Series {
            requests: metrics::counter!("weft_waypoint_requests_total", &labels),
            duration: metrics::histogram!("weft_waypoint_request_duration_seconds", &labels),
            request_bytes: metrics::histogram!("weft_waypoint_request_bytes", &labels),
            response_bytes: metrics::histogram!("weft_waypoint_response_bytes", &labels),
        });
        map.insert(key, series.clone());
        series
    }
}

/// The size of a request's body, as the golden metrics record it.
#[derive(Debug, Clone)]
pub enum RequestBytes {
    /// Read whole before forwarding.
    Known(u64),
    /// Streamed: counted in the request's context as it goes out, read when the response ends.
    Counted(crate::layers::RequestContext),
}

impl RequestBytes {
    fn now(&self) -> u64 {
        match self {
            RequestBytes::Known(n) => *n,
            RequestBytes::Counted(context) => context.request_bytes(),
        }
    }
}

/// `response` whose body records the request's golden signals (in `cache`'s series) when it
/// ends or is dropped.
pub fn observe(
    response: Response,
    golden: Golden,
    request_bytes: RequestBytes,
    start: Instant,
    cache: Arc<SeriesCache>,
) -> Response {
    let grpc_status = response
        .headers()
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .map(Box::from);
    let code = response.status().as_u16();
    response.map(|inner| {
        let state = State {
            key: SeriesKey {
                golden,
                code,
                grpc_status,
            },
            request_bytes,
            start,
            tally: Tally::default(),
            cache,
        };
        Watched::new(inner, state).boxed()
    })
}

struct State {
    key: SeriesKey,
    request_bytes: RequestBytes,
    start: Instant,
    tally: Tally,
    cache: Arc<SeriesCache>,
}

impl State {
    #[allow(clippy::cast_precision_loss)]
    fn record(self) {
        let elapsed = self.start.elapsed().as_secs_f64();
        tracing::trace!(
            target: "weft_waypoint::access",
            listener = %self.key.golden.listener,
            route = %self.key.golden.route,
            code = self.key.code,
            duration_ms = elapsed * 1000.0,
            "request"
        );
        let series = self.cache.series(self.key);
        series.requests.increment(1);
        series.duration.record(elapsed);
        series.request_bytes.record(self.request_bytes.now() as f64);
        series.response_bytes.record(self.tally.bytes as f64);
    }
}

/// The request is recorded once, when its response body ends, fails or is dropped (the
/// client went away); a `grpc-status` in the trailers names the series.
impl Watch for State {
    fn frame(&mut self, frame: &http_body::Frame<Bytes>) {
        self.tally.frame(frame);
    }

    fn end(mut self, _how: End) {
        if let Some(status) = self.tally.grpc_status.take() {
            self.key.grpc_status = Some(status);
        }
        self.record();
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
            backend: Some("b".into()),
            source_principal: Some("spiffe://td/ns/shop/sa/web".into()),
            source_workload: Some("shop/web".into()),
            destination_service: Some("shop/api".into()),
            destination_workload: Some("shop/api-1".into()),
        }
    }

    fn cache() -> Arc<SeriesCache> {
        Arc::new(SeriesCache::default())
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
                let response = observe(
                    http::Response::new(body),
                    golden(),
                    RequestBytes::Known(3),
                    Instant::now(),
                    cache(),
                );
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
                RequestBytes::Known(0),
                Instant::now(),
                cache(),
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
