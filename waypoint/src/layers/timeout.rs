//! Timeouts until the response headers: `timeouts.request` around the whole request (retries
//! included) and `timeouts.backendRequest` around each attempt. A timeout answers 504.
//!
//! One timer per attempt, not two: each timeout records its deadline in the request's
//! [`RequestContext`](super::RequestContext), and a layer's timer fires at the earliest
//! deadline in force, naming the timeout that ran out. A route with both timeouts arms only the
//! attempt's: its request timeout is [`TimeoutLayer::recorded`], enforced by the attempts'
//! timers and by the retry layer's backoff, the only waits between them.

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
    armed: bool,
}

impl TimeoutLayer {
    /// A layer applying `config` with a timer of its own.
    pub fn new(config: TimeoutConfig) -> Self {
        TimeoutLayer {
            config,
            armed: true,
        }
    }

    /// A layer that records `config`'s deadline in the request's context and arms no timer:
    /// for a request timeout whose inner layers are an attempt timeout (which fires at the
    /// earliest deadline) and retries (whose backoff ends at it). A request without a context
    /// gets a timer.
    pub fn recorded(config: TimeoutConfig) -> Self {
        TimeoutLayer {
            config,
            armed: false,
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            config: self.config,
            armed: self.armed,
        }
    }
}

/// The service of [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    config: TimeoutConfig,
    armed: bool,
}

impl<S> Service<Request> for Timeout<S>
where
    S: Inner + Service<Request, Future = BoxFuture<ProxyResult>>,
{
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let TimeoutConfig { after, which } = self.config;
        let own = Deadline {
            at: tokio::time::Instant::now() + after,
            after,
            which,
        };
        let fires = match context_of(&request) {
            Some(context) => {
                let earliest = context.set_deadline(own);
                if !self.armed {
                    // Recorded: an inner timer or the retry backoff ends the request at it.
                    return self.inner.call(request);
                }
                earliest
            }
            None => own,
        };
        // Always ready (see the module docs): called now, no clone of the inner service.
        let future = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(fires.at, future).await {
                Ok(result) => result,
                Err(_) => Err(ProxyError::Timeout {
                    after: fires.after,
                    which: fires.which,
                }),
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
    async fn a_recorded_request_timeout_is_enforced_by_the_attempts_timer() {
        let outer = TimeoutLayer::recorded(TimeoutConfig {
            after: Duration::from_millis(100),
            which: REQUEST,
        });
        let inner = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_secs(1),
            which: BACKEND_REQUEST,
        });
        let start = tokio::time::Instant::now();
        let err = crate::layers::ProxyService::layered(outer.layer(
            crate::layers::ProxyService::layered(inner.layer(slow(Duration::from_secs(5)))),
        ))
        .oneshot(with_context().0)
        .await
        .expect_err("timeout");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert!(
            matches!(err, ProxyError::Timeout { which: REQUEST, .. }),
            "{err}"
        );
        // Without a context to record it in, it arms its own timer.
        let err = outer
            .layer(slow(Duration::from_secs(5)))
            .oneshot(request("/"))
            .await
            .expect_err("timeout");
        assert!(
            matches!(err, ProxyError::Timeout { which: REQUEST, .. }),
            "{err}"
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
