//! Fault injection: delay and/or abort a percentage of requests (delay first, as Envoy does).

use std::sync::Arc;
use std::task::{Context, Poll};

use rand::Rng;
use tower::{Layer, Service, ServiceExt};

use super::{BoxFuture, Inner, ProxyResult};
use crate::body::{Request, text_response};
use crate::config::FaultConfig;
use crate::error::ProxyError;

/// Injects the faults of a [`FaultConfig`].
#[derive(Debug, Clone)]
pub struct FaultLayer {
    config: Arc<FaultConfig>,
}

impl FaultLayer {
    /// A layer injecting `config`'s faults.
    pub fn new(config: FaultConfig) -> Self {
        FaultLayer {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;
    fn layer(&self, inner: S) -> Fault<S> {
        Fault {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service of [`FaultLayer`].
#[derive(Debug, Clone)]
pub struct Fault<S> {
    inner: S,
    config: Arc<FaultConfig>,
}

fn hit(percentage: f64) -> bool {
    percentage >= 100.0 || (percentage > 0.0 && rand::rng().random::<f64>() * 100.0 < percentage)
}

impl<S: Inner> Service<Request> for Fault<S> {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let inner = self.inner.clone();
        let config = self.config.clone();
        Box::pin(async move {
            if let Some(delay) = config.delay
                && hit(delay.percentage)
            {
                metrics::counter!("weft_waypoint_faults_total", "kind" => "delay").increment(1);
                tokio::time::sleep(delay.fixed_delay.0).await;
            }
            if let Some(abort) = config.abort
                && hit(abort.percentage)
            {
                metrics::counter!("weft_waypoint_faults_total", "kind" => "abort").increment(1);
                if let Some(context) = super::context_of(&request) {
                    context.flag("fault_abort");
                }
                let mut response = match abort.grpc_status {
                    Some(grpc) => grpc_abort(grpc),
                    None => {
                        let status = abort
                            .http_status
                            .and_then(|s| http::StatusCode::from_u16(s).ok())
                            .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
                        text_response(
                            status,
                            format!(
                                "fault injected by the route's fault.abort ({}% of requests answer {}); remove fault.abort to stop it\n",
                                abort.percentage,
                                status.as_u16()
                            ),
                        )
                    }
                };
                response
                    .headers_mut()
                    .insert("x-weft-fault", http::HeaderValue::from_static("abort"));
                return Ok(response);
            }
            inner.oneshot(request).await
        })
    }
}

/// A trailers-only gRPC answer with status `grpc`: HTTP 200, `grpc-status`, `grpc-message`,
/// no message.
fn grpc_abort(grpc: u32) -> crate::body::Response {
    let mut response = http::Response::new(crate::body::full(bytes::Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from(grpc));
    headers.insert(
        "grpc-message",
        http::HeaderValue::from_static(
            "fault injected by the route's fault.abort; remove fault.abort to stop it",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AbortFault, DelayFault};
    use crate::duration::GatewayDuration;
    use crate::layers::testing::{request, status_service};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn full_abort_never_calls_inner() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = FaultLayer::new(FaultConfig {
            delay: None,
            abort: Some(AbortFault {
                http_status: Some(418),
                grpc_status: None,
                percentage: 100.0,
            }),
        });
        let response = layer
            .layer(status_service(200, calls.clone()))
            .oneshot(request("/"))
            .await
            .expect("response");
        assert_eq!(response.status(), 418);
        assert_eq!(response.headers()["x-weft-fault"], "abort");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_grpc_abort_is_a_trailers_only_grpc_answer() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = FaultLayer::new(FaultConfig {
            delay: None,
            abort: Some(AbortFault {
                http_status: None,
                grpc_status: Some(14),
                percentage: 100.0,
            }),
        });
        let response = layer
            .layer(status_service(200, calls.clone()))
            .oneshot(request("/shop.Greeter/SayHello"))
            .await
            .expect("response");
        assert_eq!(response.status(), 200, "gRPC errors travel in grpc-status");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(response.headers()["grpc-status"], "14");
        assert!(response.headers().contains_key("grpc-message"));
        assert_eq!(response.headers()["x-weft-fault"], "abort");
        assert!(
            http_body::Body::is_end_stream(response.body()),
            "no message"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn partial_abort_hits_about_the_percentage() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = FaultLayer::new(FaultConfig {
            delay: None,
            abort: Some(AbortFault {
                http_status: Some(503),
                grpc_status: None,
                percentage: 30.0,
            }),
        });
        let service = layer.layer(status_service(200, calls.clone()));
        let mut aborted = 0;
        for _ in 0..2000 {
            if service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("response")
                .status()
                == 503
            {
                aborted += 1;
            }
        }
        assert!(
            (500..700).contains(&aborted),
            "30% of 2000 is 600, got {aborted}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2000 - aborted);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_postpones_the_request() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = FaultLayer::new(FaultConfig {
            delay: Some(DelayFault {
                fixed_delay: GatewayDuration(Duration::from_secs(2)),
                percentage: 100.0,
            }),
            abort: None,
        });
        let start = tokio::time::Instant::now();
        let response = layer
            .layer(status_service(200, calls.clone()))
            .oneshot(request("/"))
            .await
            .expect("response");
        assert_eq!(response.status(), 200);
        assert!(start.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test]
    async fn zero_percent_is_a_no_op() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = FaultLayer::new(FaultConfig {
            delay: None,
            abort: Some(AbortFault {
                http_status: Some(503),
                grpc_status: None,
                percentage: 0.0,
            }),
        });
        let service = layer.layer(status_service(200, calls.clone()));
        for _ in 0..100 {
            assert_eq!(
                service
                    .clone()
                    .oneshot(request("/"))
                    .await
                    .expect("response")
                    .status(),
                200
            );
        }
    }
}
