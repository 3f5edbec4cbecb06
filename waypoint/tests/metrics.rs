//! Golden metrics of proxied requests (own test binary: it installs a global recorder).

mod common;

use std::collections::HashMap;

use common::{backend, data, echo_backend, exchange, fed_body, get, h1_connection, proxy};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

type Series = Vec<(String, HashMap<String, String>, DebugValue)>;

/// One snapshot (taking it drains the histograms), by metric name.
fn snapshot(snapshotter: &Snapshotter) -> Series {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            (key.key().name().to_string(), labels, value)
        })
        .collect()
}

fn series<'a>(all: &'a Series, name: &str) -> Vec<(&'a HashMap<String, String>, &'a DebugValue)> {
    all.iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, labels, value)| (labels, value))
        .collect()
}

#[tokio::test]
async fn requests_are_counted_by_code_route_and_backend() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let a = backend("a").await;
    let echo = echo_backend().await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: upload
        matches: [{{ path: {{ type: PathPrefix, value: /upload }} }}]
        backendRefs: [{{ name: echo }}]
      - name: api
        matches: [{{ path: {{ type: PathPrefix, value: /api }} }}]
        backendRefs: [{{ name: a }}]
      - name: broken
        matches: [{{ path: {{ type: PathPrefix, value: /broken }} }}]
        backendRefs: [{{ name: a }}]
        fault: {{ abort: {{ httpStatus: 500, percentage: 100 }} }}
backends:
  - name: a
    endpoints: ["{}"]
  - name: echo
    endpoints: ["{echo}"]
"#,
        a.addr
    );
    let proxy = proxy(&yaml).await;
    for _ in 0..3 {
        assert_eq!(get(proxy, "/api/x").await.status, 200);
    }
    assert_eq!(get(proxy, "/broken").await.status, 500);
    assert_eq!(get(proxy, "/nowhere").await.status, 404);
    // A streamed upload (it pauses): all of it is counted, not only what came before the pause.
    streamed_upload(proxy, &["first-", "second-", "third"]).await;

    let all = snapshot(&snapshotter);
    let counters = series(&all, "weft_waypoint_requests_total");
    let count = |route: &str, backend: &str, code: &str| {
        counters
            .iter()
            .find(|(labels, _)| {
                labels["route"] == route && labels["backend"] == backend && labels["code"] == code
            })
            .map(|(_, value)| *value)
    };
    assert_eq!(
        count("api", "a", "200"),
        Some(&DebugValue::Counter(3)),
        "{counters:?}"
    );
    // The fault answers before a backend is chosen.
    assert_eq!(
        count("broken", "", "500"),
        Some(&DebugValue::Counter(1)),
        "{counters:?}"
    );
    assert_eq!(
        count("", "", "404"),
        Some(&DebugValue::Counter(1)),
        "{counters:?}"
    );
    assert!(
        counters
            .iter()
            .all(|(labels, _)| labels["listener"] == "web")
    );

    let histograms = series(&all, "weft_waypoint_request_duration_seconds");
    let api = histograms
        .iter()
        .find(|(labels, _)| labels["route"] == "api" && labels["code"] == "200")
        .map(|(_, value)| *value);
    match api {
        Some(DebugValue::Histogram(samples)) => {
            assert_eq!(samples.len(), 3);
            assert!(
                samples
                    .iter()
                    .all(|s| s.into_inner() > 0.0 && s.into_inner() < 5.0)
            );
        }
        other => panic!("expected a histogram, got {other:?}"),
    }
    let sizes = series(&all, "weft_waypoint_request_bytes");
    let upload = sizes
        .iter()
        .find(|(labels, _)| labels["route"] == "upload")
        .map(|(_, value)| *value);
    match upload {
        Some(DebugValue::Histogram(samples)) => {
            let sizes: Vec<f64> = samples.iter().map(|s| s.into_inner()).collect();
            assert_eq!(sizes, [18.0], "the whole streamed body");
        }
        other => panic!("expected a histogram, got {other:?}"),
    }
}

/// POSTs `parts` to `/upload`, pausing longer than `STREAM_AFTER` after each, and reads the
/// echo to its end.
async fn streamed_upload(proxy: std::net::SocketAddr, parts: &[&'static str]) {
    let (frames, body) = fed_body();
    let mut sender = h1_connection(proxy).await;
    let request = http::Request::post("/upload")
        .header("host", "upload")
        .body(body)
        .expect("request");
    let parts = parts.to_vec();
    let feeder = tokio::spawn(async move {
        for part in parts {
            frames.send(data(part)).await.expect("send");
            tokio::time::sleep(weft_waypoint::proxy::STREAM_AFTER * 3).await;
        }
    });
    let (_, echoed) = exchange(&mut sender, request).await;
    feeder.await.expect("feeder");
    assert_eq!(echoed, "first-second-third");
}
