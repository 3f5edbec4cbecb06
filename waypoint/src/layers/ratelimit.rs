//! Local rate limiting with token buckets: one per route and/or one per source identity (the
//! client's SPIFFE ID in mesh mode, else an identity header when configured, else the peer
//! IP). A request without a
//! token is answered 429 with `Retry-After` (whole seconds, at least 1).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderName;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::{BoxFuture, Inner, ProxyResult, RequestContext, context_of};
use crate::body::{Request, text_response};
use crate::config::{RateLimitConfig, TokenBucketConfig};
use crate::error::ProxyError;

/// Source buckets kept before idle (full) ones are dropped.
const MAX_SOURCES: usize = 65_536;

/// The bucket shared by new sources while [`MAX_SOURCES`] active ones are tracked.
const OVERFLOW_KEY: &str = "\u{0}overflow";

/// A token bucket: `capacity` tokens, refilled continuously at `refill_per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(config: TokenBucketConfig, now: Instant) -> Self {
        let capacity = f64::from(config.capacity);
        TokenBucket {
            capacity,
            refill_per_second: config.refill_per_second,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.refill_per_second).min(self.capacity);
        self.last = now;
    }

    /// Takes a token, or tells how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.refill_per_second,
            ))
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// Per-source limit: bucket config, identity header, buckets by source.
type PerSourceBuckets = (
    TokenBucketConfig,
    Option<HeaderName>,
    Mutex<HashMap<String, TokenBucket>>,
);

/// The per-source key other than the peer address: the authenticated principal (mesh mode:
/// the SPIFFE ID of the HBONE peer's certificate), else the identity header when configured.
/// A principal wins over the header, which any client can set.
fn source_key(request: &Request, header: Option<&HeaderName>) -> Option<String> {
    if let Some(source) = context_of(request).and_then(RequestContext::source) {
        return Some(source.principal.to_string());
    }
    header
        .and_then(|h| request.headers().get(h))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[derive(Debug)]
struct Limiter {
    max_sources: usize,
    route_name: Arc<str>,
    route: Option<Mutex<TokenBucket>>,
    per_source: Option<PerSourceBuckets>,
}

impl Limiter {
    fn check(&self, request: &Request) -> Result<(), (Duration, &'static str)> {
        let now = Instant::now();
        let max_sources = self.max_sources;
        if let Some((config, header, buckets)) = &self.per_source {
            let key = source_key(request, header.as_ref())
                .or_else(|| {
                    context_of(request)
                        .and_then(RequestContext::peer)
                        .map(|p| p.ip().to_string())
                })
                .unwrap_or_default();
            if let Ok(mut buckets) = buckets.lock() {
                let mut key = key;
                if buckets.len() >= max_sources && !buckets.contains_key(&key) {
                    // Idle sources (full buckets) are equivalent to new ones: drop them.
                    buckets.retain(|_, bucket| !bucket.is_full(now));
                    if buckets.len() >= max_sources {
                        // Still full of active sources: new ones share one bucket, so that
                        // made-up identities cannot grow memory without bound.
                        key = OVERFLOW_KEY.to_string();
                    }
                }
                let bucket = buckets
                    .entry(key)
                    .or_insert_with(|| TokenBucket::new(*config, now));
                bucket
                    .try_take(now)
                    .map_err(|wait| (wait, "rateLimit.perSource"))?;
            }
        }
        if let Some(bucket) = &self.route
            && let Ok(mut bucket) = bucket.lock()
        {
            bucket
                .try_take(now)
                .map_err(|wait| (wait, "rateLimit.route"))?;
        }
        Ok(())
    }
}

/// Applies a route's [`RateLimitConfig`]; the buckets are shared by the services it builds.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

impl RateLimitLayer {
    /// A layer with fresh (full) buckets for `route`.
    pub fn new(config: &RateLimitConfig, route: Arc<str>) -> Self {
        let now = Instant::now();
        let per_source = config.per_source.as_ref().map(|p| {
            let bucket = TokenBucketConfig {
                capacity: p.capacity,
                refill_per_second: p.refill_per_second,
            };
            let header = p
                .identity_header
                .as_ref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok());
            (bucket, header, Mutex::new(HashMap::new()))
        });
        RateLimitLayer {
            limiter: Arc::new(Limiter {
                max_sources: MAX_SOURCES,
                route_name: route,
                route: config.route.map(|c| Mutex::new(TokenBucket::new(c, now))),
                per_source,
            }),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S: Inner> Service<Request> for RateLimit<S> {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.limiter.check(&request) {
            Ok(()) => Box::pin(self.inner.clone().oneshot(request)),
            Err((wait, which)) => {
                if let Some(context) = context_of(&request) {
                    context.flag("rate_limited");
                }
                let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
                metrics::counter!("weft_waypoint_rate_limited_total", "route" => self.limiter.route_name.to_string(), "limit" => which)
                    .increment(1);
                let mut response = text_response(
                    http::StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "rate limit exceeded ({which} of route {}); retry after {seconds}s or raise the route's {which}.capacity / refillPerSecond\n",
                        self.limiter.route_name
                    ),
                );
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PerSourceLimit;
    use crate::layers::testing::{request, status_service};
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    async fn status(
        service: &RateLimit<crate::layers::ProxyService>,
        request: Request,
    ) -> (u16, Option<String>) {
        let response = service.clone().oneshot(request).await.expect("response");
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .map(|v| v.to_str().expect("ascii").to_string());
        (response.status().as_u16(), retry_after)
    }

    #[test]
    fn bucket_refills_over_time() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(
            TokenBucketConfig {
                capacity: 2,
                refill_per_second: 4.0,
            },
            start,
        );
        assert!(bucket.try_take(start).is_ok());
        assert!(bucket.try_take(start).is_ok());
        let wait = bucket.try_take(start).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(250));
        assert!(bucket.try_take(start + Duration::from_millis(250)).is_ok());
        // Never more than the capacity, however long the idle time.
        let later = start + Duration::from_secs(60);
        assert!(
            bucket.try_take(later).is_ok()
                && bucket.try_take(later).is_ok()
                && bucket.try_take(later).is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn route_bucket_answers_429_with_retry_after() {
        let config = RateLimitConfig {
            route: Some(TokenBucketConfig {
                capacity: 3,
                refill_per_second: 0.5,
            }),
            per_source: None,
        };
        let service = RateLimitLayer::new(&config, "r".into())
            .layer(status_service(200, Arc::new(AtomicUsize::new(0))));
        for _ in 0..3 {
            assert_eq!(status(&service, request("/")).await, (200, None));
        }
        assert_eq!(
            status(&service, request("/")).await,
            (429, Some("2".into()))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(status(&service, request("/")).await.0, 200);
    }

    #[tokio::test(start_paused = true)]
    async fn source_count_is_bounded() {
        let config = RateLimitConfig {
            route: None,
            per_source: Some(PerSourceLimit {
                capacity: 1,
                refill_per_second: 0.001,
                identity_header: Some("x-id".into()),
            }),
        };
        let mut layer = RateLimitLayer::new(&config, "r".into());
        Arc::get_mut(&mut layer.limiter)
            .expect("unshared")
            .max_sources = 3;
        let service = layer.layer(status_service(200, Arc::new(AtomicUsize::new(0))));
        let with_id = |id: usize| {
            let mut r = request("/");
            r.headers_mut().insert("x-id", http::HeaderValue::from(id));
            r
        };
        for id in 0..3 {
            assert_eq!(status(&service, with_id(id)).await.0, 200);
        }
        // Three active sources tracked: newcomers share the overflow bucket.
        assert_eq!(status(&service, with_id(100)).await.0, 200);
        assert_eq!(status(&service, with_id(101)).await.0, 429);
        let tracked = service
            .limiter
            .per_source
            .as_ref()
            .map(|(_, _, b)| b.lock().expect("lock").len());
        assert_eq!(
            tracked,
            Some(4),
            "the three sources plus the shared overflow bucket"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_source_buckets_are_independent() {
        let config = RateLimitConfig {
            route: None,
            per_source: Some(PerSourceLimit {
                capacity: 1,
                refill_per_second: 1.0,
                identity_header: Some("x-id".into()),
            }),
        };
        let service = RateLimitLayer::new(&config, "r".into())
            .layer(status_service(200, Arc::new(AtomicUsize::new(0))));
        let with_id = |id: &str| {
            let mut r = request("/");
            r.headers_mut()
                .insert("x-id", http::HeaderValue::from_str(id).expect("value"));
            r
        };
        let from_peer = |port: u16, ip: [u8; 4]| {
            let mut r = request("/");
            let context = RequestContext::default();
            context.set_peer(SocketAddr::from((ip, port)));
            r.extensions_mut().insert(context);
            r
        };
        assert_eq!(status(&service, with_id("a")).await.0, 200);
        assert_eq!(status(&service, with_id("a")).await.0, 429);
        assert_eq!(status(&service, with_id("b")).await.0, 200);
        // Without the header the peer IP (not the port) is the key.
        assert_eq!(
            status(&service, from_peer(1000, [10, 0, 0, 1])).await.0,
            200
        );
        assert_eq!(
            status(&service, from_peer(1001, [10, 0, 0, 1])).await.0,
            429
        );
        assert_eq!(
            status(&service, from_peer(1000, [10, 0, 0, 2])).await.0,
            200
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_source_buckets_key_on_the_principal_first() {
        let config = RateLimitConfig {
            route: None,
            per_source: Some(PerSourceLimit {
                capacity: 1,
                refill_per_second: 1.0,
                identity_header: Some("x-id".into()),
            }),
        };
        let service = RateLimitLayer::new(&config, "r".into())
            .layer(status_service(200, Arc::new(AtomicUsize::new(0))));
        let from = |principal: &str, ip: [u8; 4], header: &str| {
            let mut r = request("/");
            r.headers_mut()
                .insert("x-id", http::HeaderValue::from_str(header).expect("value"));
            let context = RequestContext::default();
            context.set_peer(SocketAddr::from((ip, 1000)));
            context.set_source(crate::layers::Source {
                principal: principal.into(),
                ip: std::net::IpAddr::from(ip),
                workload: None,
            });
            r.extensions_mut().insert(context);
            r
        };
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let api = "spiffe://cluster.local/ns/shop/sa/api";
        assert_eq!(
            status(&service, from(web, [10, 0, 0, 1], "h1")).await.0,
            200
        );
        // Same principal, other address and header: same bucket.
        assert_eq!(
            status(&service, from(web, [10, 0, 0, 2], "h2")).await.0,
            429
        );
        // Other principal, same address and header: its own bucket.
        assert_eq!(
            status(&service, from(api, [10, 0, 0, 1], "h1")).await.0,
            200
        );
    }
}
