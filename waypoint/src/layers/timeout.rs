//! Timeouts until the response headers: `timeouts.request` around the whole request (retries
//! included) and `timeouts.backendRequest` around each attempt. A timeout answers 504.

use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use super::{BoxFuture, Deadline, Inner, ProxyResult, context_of};
use crate::body::Request;
use crate::error::ProxyError;

/// [`TimeoutConfig::which`] of the whole-request timeout.
pub const REQUEST: &str = "timeouts.request";
/// [`TimeoutConfig::which`] of the per-attempt timeout.
pub const BACKEND_REQUEST: &str = "timeouts.backendRequest";

/// Config of one timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutConfig {
    /// Time allowed until the response headers.
    pub after: Duration,
    /// Which config field this is, for the error message.
    pub which: &'static str,
}

/// Fails with [`ProxyError::Timeout`] when the inner service takes longer than the limit.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    config: TimeoutConfig,
}

impl TimeoutLayer {
    /// A layer applying `config`.
    pub fn new(config: TimeoutConfig) -> Self {
        TimeoutLayer { config }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            config: self.config,
        }
    }
}

/// The service of [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    config: TimeoutConfig,
}

impl<S: Inner> Service<Request> for Timeout<S> {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let TimeoutConfig { after, which } = self.config;
        let at = tokio::time::Instant::now() + after;
        if let Some(context) = context_of(&request) {
            context.set_deadline(Deadline { at, after, which });
        }
        // Always ready (see the module docs): called now, no clone of the inner service.
        let future = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(at, future).await {
                Ok(result) => result,
                Err(_) => Err(ProxyError::Timeout { after, which }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use crate::layers::RequestContext;
    use crate::layers::testing::request;
    use tower::ServiceExt;

    fn slow(delay: Duration) -> crate::layers::ProxyService {
        crate::layers::ProxyService::new(tower::service_fn(move |_| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, ProxyError>(body::text_response(http::StatusCode::OK, "done"))
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn slow_inner_times_out_with_504() {
        let layer = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_millis(100),
            which: "timeouts.request",
        });
        let err = layer
            .layer(slow(Duration::from_secs(1)))
            .oneshot(request("/"))
            .await
            .expect_err("timeout");
        assert_eq!(err.status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert!(err.to_string().contains("timeouts.request"), "{err}");
    }

    /// A request with a context, as the proxy makes them.
    fn with_context() -> (Request, RequestContext) {
        let context = RequestContext::default();
        let mut request = request("/");
        request.extensions_mut().insert(context.clone());
        (request, context)
    }

    #[tokio::test(start_paused = true)]
    async fn the_earliest_deadline_is_published_to_inner_layers() {
        let seen =
            crate::layers::ProxyService::new(tower::service_fn(|request: Request| async move {
                let deadline = context_of(&request)
                    .and_then(RequestContext::deadline)
                    .expect("deadline");
                Ok::<_, ProxyError>(body::text_response(http::StatusCode::OK, deadline.which))
            }));
        let outer = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_secs(5),
            which: REQUEST,
        });
        let inner = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_secs(1),
            which: BACKEND_REQUEST,
        });
        for service in [
            crate::layers::ProxyService::layered(outer.layer(inner.layer(seen.clone()))),
            // A later timeout inside does not hide an earlier one outside.
            crate::layers::ProxyService::layered(inner.layer(outer.layer(seen))),
        ] {
            let response = service.oneshot(with_context().0).await.expect("ok");
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(body.as_ref(), b"timeouts.backendRequest");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_replaces_the_last_attempts_deadline() {
        let (first, context) = with_context();
        let request_timeout = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_secs(5),
            which: REQUEST,
        });
        let attempt = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_secs(1),
            which: BACKEND_REQUEST,
        });
        let start = tokio::time::Instant::now();
        let fast = slow(Duration::from_millis(10));
        request_timeout
            .layer(attempt.layer(fast.clone()))
            .oneshot(first)
            .await
            .expect("first attempt");
        // Two seconds later (the first attempt's deadline is past), a second attempt.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut second = request("/");
        second.extensions_mut().insert(context.clone());
        attempt
            .layer(fast)
            .oneshot(second)
            .await
            .expect("second attempt");
        let deadline = context.deadline().expect("deadline");
        assert_eq!(deadline.which, BACKEND_REQUEST);
        assert_eq!(
            deadline.at,
            start + Duration::from_secs(2) + Duration::from_millis(10) + Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fast_inner_passes() {
        let layer = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_millis(100),
            which: "timeouts.request",
        });
        let response = layer
            .layer(slow(Duration::from_millis(10)))
            .oneshot(request("/"))
            .await
            .expect("ok");
        assert_eq!(response.status(), http::StatusCode::OK);
    }
}
