//! The admin HTTP endpoint (default 127.0.0.1:15000), served on its own single-threaded
//! runtime so scrapes and debug requests never compete with the data path.
//!
//! * `GET /ready` — 200 once the programs are attached and the first configuration applied.
//! * `GET /metrics` — Prometheus text format.
//! * `GET /debug/capture[?limit=N&verdict=V&pod=NS/NAME]` — recent capture decisions and the
//!   per-verdict counters.
//! * `GET /config_dump` — enrolled pods, enrolment errors, configuration status, map sizes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::capture::Capture;
use crate::events::{EventLog, program_name, verdict_name};
use crate::pods::PodManager;

/// Status of the configuration source, for `/config_dump`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ConfigStatus {
    pub source: String,
    /// Times a new configuration was applied.
    pub applied: u64,
    /// The last configuration error, if the newest configuration was rejected (the previous
    /// good one stays in force), or why the controller is unreachable.
    pub last_error: Option<String>,
    /// Controller mode: a stream is open.
    pub connected: bool,
    /// Controller mode: the current stream delivered its first (sync) update.
    pub synced: bool,
}

/// What the admin endpoint reads.
pub struct AdminState {
    pub node: String,
    pub prometheus: PrometheusHandle,
    pub capture: Arc<Mutex<Capture>>,
    pub events: Arc<EventLog>,
    pub pods: Arc<Mutex<PodManager>>,
    pub config: Arc<Mutex<ConfigStatus>>,
    pub ready: AtomicBool,
    pub orig: Arc<crate::capture::OrigDstMap>,
    /// Controller mode: workload certificates.
    pub certs: Option<Arc<crate::identity::CertManager>>,
    /// Controller mode with a token: this node's certificate for the controller.
    pub node_certs: Option<Arc<crate::identity::CertManager>>,
}

/// Serves until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    match req.uri().path() {
        "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: programs not attached or no configuration applied yet\n".into(),
                )
            }
        }
        "/metrics" => {
            refresh_kernel_counters(state);
            let mut r = text(StatusCode::OK, state.prometheus.render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/debug/capture" => {
            let limit = match query.iter().find(|(k, _)| k == "limit") {
                None => 100,
                Some((_, v)) => match v.parse::<usize>() {
                    Ok(n) => n,
                    Err(_) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            format!("limit must be a whole number, got `{v}`\n"),
                        );
                    }
                },
            };
            let verdict = query
                .iter()
                .find(|(k, _)| k == "verdict")
                .map(|(_, v)| v.clone());
            let pod = query
                .iter()
                .find(|(k, _)| k == "pod")
                .map(|(_, v)| v.clone());
            let events = state.events.recent(limit, |r| {
                verdict.as_deref().is_none_or(|v| r.verdict == v)
                    && pod.as_deref().is_none_or(|p| r.pod.as_deref() == Some(p))
            });
            let decisions: Vec<_> = lock(&state.capture)
                .decision_counts()
                .into_iter()
                .map(|(p, v, n)| json!({"program": program_name(p), "verdict": verdict_name(v), "count": n}))
                .collect();
            json_response(&json!({"node": state.node, "events": events, "decisions": decisions}))
        }
        "/config_dump" => {
            let (pods, errors) = lock(&state.pods).status();
            let services = lock(&state.pods).services();
            let policies = lock(&state.pods).policies();
            let trust_roots = lock(&state.pods).trust_roots();
            let maps = lock(&state.capture).map_sizes();
            let config = lock(&state.config).clone();
            json_response(&json!({
                "node": state.node,
                "config": config,
                "pods": pods,
                "services": services,
                "policies": policies,
                "trust_bundle_roots": trust_roots,
                "certificates": state.certs.as_ref().map(|c| c.status()).unwrap_or_default(),
                "node_certificate": state.node_certs.as_ref().and_then(|c| c.status().into_iter().next()),
                "enrolment_errors": errors,
                "maps": maps,
                "original_destinations_pending": state.orig.len(),
            }))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready, /metrics, /debug/capture, /config_dump\n".into(),
        ),
    }
}

/// Copies the kernel's per-verdict counters into the metrics registry.
fn refresh_kernel_counters(state: &AdminState) {
    for (p, v, n) in lock(&state.capture).decision_counts() {
        metrics::counter!("weft_capture_decisions_total",
            "program" => program_name(p), "verdict" => verdict_name(v))
        .absolute(n);
    }
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.replace("%2F", "/").replace("%2f", "/"))
        })
        .collect()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn json_response(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::OK, v.to_string());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Binds the admin listener (std, so the caller can report bind errors before starting).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_decodes_slashes() {
        let q = parse_query("limit=5&pod=shop%2Fweb&&verdict");
        assert_eq!(q[0], ("limit".into(), "5".into()));
        assert_eq!(q[1], ("pod".into(), "shop/web".into()));
        assert_eq!(q[2], ("verdict".into(), "".into()));
    }
}
