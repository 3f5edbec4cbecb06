//! Timeouts until the response headers: `timeouts.request` around the whole request (retries
//! included) and `timeouts.backendRequest` around each attempt. A timeout answers 504.

use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use super::{BoxFuture, Deadline, Inner, ProxyResult};
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

    fn call(&mut self, mut request: Request) -> Self::Future {
        let TimeoutConfig { after, which } = self.config;
        let at = tokio::time::Instant::now() + after;
        if request
            .extensions()
            .get::<Deadline>()
            .is_none_or(|d| at < d.at)
        {
            request
                .extensions_mut()
                .insert(Deadline { at, after, which });
        }
        // Always ready (see the module docs): called now, no clone of the inner service.
        let future = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(after, future).await {
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

    #[tokio::test(start_paused = true)]
    async fn the_earliest_deadline_is_published_to_inner_layers() {
        let seen =
            crate::layers::ProxyService::new(tower::service_fn(|request: Request| async move {
                let deadline = request
                    .extensions()
                    .get::<Deadline>()
                    .copied()
                    .expect("deadline");
                Ok::<_, ProxyError>(body::text_response(http::StatusCode::OK, deadline.which))
            }));
        let outer = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_secs(5),
            which: "timeouts.request",
        });
        let inner = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_secs(1),
            which: "timeouts.backendRequest",
        });
        let response = outer
            .layer(inner.layer(seen.clone()))
            .oneshot(request("/"))
            .await
            .expect("ok");
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body.as_ref(), b"timeouts.backendRequest");
        // A later inner timeout does not replace an earlier outer one.
        let response = inner
            .layer(outer.layer(seen))
            .oneshot(request("/"))
            .await
            .expect("ok");
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body.as_ref(), b"timeouts.backendRequest");
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
