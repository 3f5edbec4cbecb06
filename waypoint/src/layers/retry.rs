//! Retries with exponential backoff (full jitter) and a retry budget.
//!
//! The budget is shared by every request of a route: over a sliding window, retries may not
//! exceed `ratio` times the requests plus `minRetriesPerSecond` per second of window. This keeps
//! retries from multiplying the load on a backend that is already failing.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::{BoxFuture, Inner, ProxyResult, RequestContext, context_of};
use crate::body::{Request, clone_request, clone_without_extensions};
use crate::config::{RetryBudgetConfig, RetryConfig, RetryOn};
use crate::error::ProxyError;

const SLOTS: usize = 10;

/// Request header telling the endpoint which attempt this is (1 for the first).
pub const ATTEMPT_HEADER: http::HeaderName = http::HeaderName::from_static("x-weft-attempt");

/// The [`ATTEMPT_HEADER`] value for `attempt`: static (no allocation) for the usual few.
fn attempt_value(attempt: u32) -> http::HeaderValue {
    const STATIC: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match STATIC.get(attempt as usize) {
        Some(text) => http::HeaderValue::from_static(text),
        None => http::HeaderValue::from(attempt),
    }
}

/// A sliding-window retry budget (10 slots over the window).
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    /// A slot's length in nanoseconds (at least 1).
    slot_nanos: u64,
    start: Instant,
    slots: Mutex<[(u64, u64, u64); SLOTS]>,
}

impl RetryBudget {
    /// A budget with `config`.
    pub fn new(config: &RetryBudgetConfig) -> Self {
        let window = config.window.0.max(Duration::from_secs(1));
        RetryBudget {
            ratio: config.ratio,
            reserve: f64::from(config.min_retries_per_second) * window.as_secs_f64(),
            slot_nanos: u64::try_from((window / SLOTS as u32).as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            start: Instant::now(),
            slots: Mutex::new([(u64::MAX, 0, 0); SLOTS]),
        }
    }

    fn with_slots<T>(&self, f: impl FnOnce(&mut [(u64, u64, u64); SLOTS], u64) -> T) -> Option<T> {
        // u64 arithmetic: a u128 division costs a library call per request.
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let epoch = elapsed / self.slot_nanos;
        let mut slots = self.slots.lock().ok()?;
        let slot = &mut slots[(epoch % SLOTS as u64) as usize];
        if slot.0 != epoch {
            *slot = (epoch, 0, 0);
        }
        Some(f(&mut slots, epoch))
    }

    /// Counts one original request.
    pub fn deposit(&self) {
        self.with_slots(|slots, epoch| slots[(epoch % SLOTS as u64) as usize].1 += 1);
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        let (ratio, reserve) = (self.ratio, self.reserve);
        self.with_slots(|slots, epoch| {
            let live = |s: &&(u64, u64, u64)| s.0 != u64::MAX && s.0 + SLOTS as u64 > epoch;
            let requests: u64 = slots.iter().filter(live).map(|s| s.1).sum();
            let retries: u64 = slots.iter().filter(live).map(|s| s.2).sum();
            let allowed = ratio * requests as f64 + reserve;
            if (retries as f64) + 1.0 <= allowed {
                slots[(epoch % SLOTS as u64) as usize].2 += 1;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }
}

/// Whether `result` of an attempt is worth retrying under `retry_on`.
pub fn is_retryable(result: &ProxyResult, retry_on: &[RetryOn]) -> bool {
    match result {
        Ok(response) => {
            let status = response.status().as_u16();
            if retry_on.contains(&RetryOn::Status(status)) {
                return true;
            }
            if status >= 500 && retry_on.contains(&RetryOn::Status5xx) {
                return true;
            }
            // Most routes retry no gRPC status: no header lookup for them.
            if !retry_on.iter().any(RetryOn::is_grpc) {
                return false;
            }
            let grpc = response
                .headers()
                .get(crate::body::GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u8>().ok());
            match grpc {
                Some(1) => retry_on.contains(&RetryOn::GrpcCancelled),
                Some(4) => retry_on.contains(&RetryOn::GrpcDeadlineExceeded),
                Some(8) => retry_on.contains(&RetryOn::GrpcResourceExhausted),
                Some(13) => retry_on.contains(&RetryOn::GrpcInternal),
                Some(14) => retry_on.contains(&RetryOn::GrpcUnavailable),
                _ => false,
            }
        }
        // A failure on the backend's side also matches the status the waypoint answers it
        // with (503, 504, ...), as an HTTPRoute's `retry.codes` expects.
        Err(error)
            if is_backend_failure(error)
                && retry_on.contains(&RetryOn::Status(error.status().as_u16())) =>
        {
            true
        }
        Err(ProxyError::Connect { .. }) => retry_on.contains(&RetryOn::ConnectFailure),
        Err(ProxyError::Upstream { .. }) => {
            retry_on.contains(&RetryOn::Reset) || retry_on.contains(&RetryOn::Status5xx)
        }
        // Per-attempt timeouts count as gateway errors (as in Envoy's `5xx`).
        // ... but not once the whole request's time is up.
        Err(ProxyError::Timeout { which, .. }) => {
            *which != super::timeout::REQUEST
                && (retry_on.contains(&RetryOn::Status5xx)
                    || retry_on.contains(&RetryOn::AttemptTimeout))
        }
        Err(
            ProxyError::NoHealthyEndpoint { .. }
            | ProxyError::NoEndpoints { .. }
            | ProxyError::Overflow { .. }
            | ProxyError::ConnectionLimit { .. },
        ) => retry_on.contains(&RetryOn::Status5xx),
        Err(ProxyError::ClientBody { .. } | ProxyError::Internal(_)) => false,
    }
}

/// Whether `error` is the backend's side failing (not the client's, and not the whole request
/// running out of time).
fn is_backend_failure(error: &ProxyError) -> bool {
    match error {
        ProxyError::Connect { .. }
        | ProxyError::Upstream { .. }
        | ProxyError::NoHealthyEndpoint { .. }
        | ProxyError::NoEndpoints { .. }
        | ProxyError::Overflow { .. }
        | ProxyError::ConnectionLimit { .. } => true,
        ProxyError::Timeout { which, .. } => *which != super::timeout::REQUEST,
        _ => false,
    }
}

/// The backoff before retry number `retry` (1-based): `min` plus a random time in
/// `[0, min(max, base * 2^(retry-1)) - min]` (full jitter above the floor).
pub fn backoff(config: &RetryConfig, retry: u32) -> Duration {
    let floor = config.backoff.min.map_or(Duration::ZERO, |m| m.0);
    let ceiling = config
        .backoff
        .base
        .0
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
        .min(config.backoff.max.0);
    let spread = ceiling.saturating_sub(floor);
    if spread.is_zero() {
        return floor;
    }
    let nanos = rand::rng().random_range(0..=spread.as_nanos().min(u128::from(u64::MAX)) as u64);
    floor + Duration::from_nanos(nanos)
}

/// The request kept for the attempts after the first. When its only extension is its
/// [`RequestContext`] (as in the proxy), the first attempt takes the extensions themselves and
/// the context is kept beside the request, put back into each later attempt: no copy of the
/// extension map per request, only per retry.
struct Kept {
    request: Request,
    context: Option<RequestContext>,
}

impl Kept {
    /// The first attempt and what is kept for the others.
    fn split(mut request: Request) -> (Request, Kept) {
        let mut first = clone_without_extensions(&request);
        let context = if request.extensions().len() == 1 {
            context_of(&request).cloned()
        } else {
            None
        };
        if context.is_some() {
            *first.extensions_mut() = std::mem::take(request.extensions_mut());
        } else {
            *first.extensions_mut() = request.extensions().clone();
        }
        (first, Kept { request, context })
    }

    /// The request's context.
    fn context(&self) -> Option<&RequestContext> {
        self.context.as_ref().or_else(|| context_of(&self.request))
    }

    /// A copy for another attempt.
    fn copy(&self) -> Request {
        let mut copy = clone_request(&self.request);
        if let Some(context) = &self.context {
            copy.extensions_mut().insert(context.clone());
        }
        copy
    }

    /// The kept request itself, for the last attempt.
    fn into_request(self) -> Request {
        let mut request = self.request;
        if let Some(context) = self.context {
            request.extensions_mut().insert(context);
        }
        request
    }
}

/// Retries failed attempts per [`RetryConfig`], within a [`RetryBudget`]. Cloning it (once
/// per request) is one reference count.
#[derive(Debug, Clone)]
pub struct RetryLayer(Arc<Shared>);

/// What every request of a [`RetryLayer`] shares.
#[derive(Debug)]
struct Shared {
    config: RetryConfig,
    budget: RetryBudget,
    route: Arc<str>,
}

impl RetryLayer {
    /// A layer for `route` with its own budget.
    pub fn new(config: RetryConfig, route: Arc<str>) -> Self {
        let budget = RetryBudget::new(&config.budget);
        RetryLayer(Arc::new(Shared {
            config,
            budget,
            route,
        }))
    }

    /// The layer's budget (shared by the services it builds).
    pub fn budget(&self) -> &RetryBudget {
        &self.0.budget
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S: Inner> Service<Request> for Retry<S> {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let shared = self.layer.0.clone();
        shared.budget.deposit();
        // Set before any copy (later attempts replace it): the copy's header map has no room
        // to spare.
        let mut request = request;
        request
            .headers_mut()
            .insert(ATTEMPT_HEADER, attempt_value(1));
        // The first attempt is sent now (always ready, see the module docs); the request is
        // kept (and the inner service cloned) only when there can be a second: not for a
        // streamed request, whose body's rest can be sent only once.
        let once = shared.config.attempts <= 1
            || request
                .extensions()
                .get::<crate::body::Streaming>()
                .is_some();
        let (first, mut later) = if once {
            (self.inner.call(request), None)
        } else {
            let (first, kept) = Kept::split(request);
            (self.inner.call(first), Some((self.inner.clone(), kept)))
        };
        Box::pin(async move {
            let Shared {
                config,
                budget,
                route,
            } = &*shared;
            let mut result = first.await;
            let mut attempt = 1;
            loop {
                let Some((inner, request)) = later.as_mut() else {
                    return result;
                };
                if attempt >= config.attempts || !is_retryable(&result, &config.retry_on) {
                    return result;
                }
                // The backoff ends at the request's deadline: past it, the request has timed
                // out (its timeout layer arms no timer of its own when attempts have one), and
                // no retry happens, so none is taken from the budget or counted.
                let wake = Instant::now() + backoff(config, attempt);
                let late = request
                    .context()
                    .and_then(|c| c.request_deadline())
                    .filter(|deadline| deadline.at <= wake);
                if let Some(deadline) = late {
                    drop(result);
                    tokio::time::sleep_until(deadline.at).await;
                    return Err(ProxyError::Timeout {
                        after: deadline.after,
                        which: deadline.which,
                    });
                }
                if !budget.try_withdraw() {
                    metrics::counter!("weft_waypoint_retry_budget_exhausted_total", "route" => route.to_string()).increment(1);
                    return result;
                }
                metrics::counter!("weft_waypoint_retries_total", "route" => route.to_string())
                    .increment(1);
                drop(result);
                tokio::time::sleep_until(wake).await;
                attempt += 1;
                result = if attempt >= config.attempts {
                    // The last attempt takes the kept request itself.
                    match later.take() {
                        Some((inner, kept)) => {
                            let mut request = kept.into_request();
                            request
                                .headers_mut()
                                .insert(ATTEMPT_HEADER, attempt_value(attempt));
                            inner.oneshot(request).await
                        }
                        None => return Err(ProxyError::Internal("retry without a request")),
                    }
                } else {
                    let mut copy = request.copy();
                    copy.headers_mut()
                        .insert(ATTEMPT_HEADER, attempt_value(attempt));
                    inner.clone().oneshot(copy).await
                };
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::GatewayDuration;
    use crate::layers::ProxyService;
    use crate::layers::testing::{request, status_service};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config(attempts: u32, ratio: f64, min: u32) -> RetryConfig {
        RetryConfig {
            attempts,
            backoff: crate::config::BackoffConfig {
                base: GatewayDuration(Duration::from_millis(10)),
                max: GatewayDuration(Duration::from_millis(40)),
                min: None,
            },
            retry_on: vec![RetryOn::ConnectFailure, RetryOn::Status(503)],
            budget: RetryBudgetConfig {
                ratio,
                min_retries_per_second: min,
                window: GatewayDuration(Duration::from_secs(10)),
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_503_until_success() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let seen = attempts.clone();
        let flaky = ProxyService::new(tower::service_fn(move |request: Request| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            seen.lock().expect("lock").push(
                request.headers()[ATTEMPT_HEADER]
                    .to_str()
                    .expect("ascii")
                    .to_string(),
            );
            async move {
                let status = if n < 2 {
                    http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    http::StatusCode::OK
                };
                Ok::<_, ProxyError>(crate::body::text_response(status, "x"))
            }
        }));
        let service = RetryLayer::new(config(3, 1.0, 10), "r".into()).layer(flaky);
        let response = service.oneshot(request("/")).await.expect("response");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(*attempts.lock().expect("lock"), ["1", "2", "3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_carries_the_requests_context_and_other_extensions() {
        #[derive(Clone, Debug, PartialEq)]
        struct Mark(u8);
        for with_other in [false, true] {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let record = seen.clone();
            let context = RequestContext::default();
            let shared = context.clone();
            let failing = ProxyService::new(tower::service_fn(move |request: Request| {
                let same = context_of(&request).is_some_and(|c| {
                    c.set_route("r".into());
                    shared.facts().route.as_deref() == Some("r")
                });
                record
                    .lock()
                    .expect("lock")
                    .push((same, request.extensions().get::<Mark>().cloned()));
                async move {
                    Ok::<_, ProxyError>(crate::body::text_response(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        "x",
                    ))
                }
            }));
            let mut sent = request("/");
            sent.extensions_mut().insert(context.clone());
            if with_other {
                sent.extensions_mut().insert(Mark(7));
            }
            let service = RetryLayer::new(config(3, 1.0, 10), "r".into()).layer(failing);
            let response = service.oneshot(sent).await.expect("response");
            assert_eq!(response.status(), 503);
            let mark = with_other.then_some(Mark(7));
            assert_eq!(*seen.lock().expect("lock"), vec![(true, mark); 3]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_ends_at_the_requests_deadline() {
        let mut slow_backoff = config(5, 1.0, 10);
        let second = GatewayDuration(Duration::from_secs(1));
        slow_backoff.backoff = crate::config::BackoffConfig {
            base: second,
            max: second,
            min: Some(second),
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let service =
            crate::layers::timeout::TimeoutLayer::recorded(crate::layers::timeout::TimeoutConfig {
                after: Duration::from_millis(100),
                which: crate::layers::timeout::REQUEST,
            })
            .layer(ProxyService::layered(
                RetryLayer::new(slow_backoff, "r".into()).layer(status_service(503, calls.clone())),
            ));
        let start = Instant::now();
        let err = service
            .oneshot(crate::layers::testing::request_in_context("/"))
            .await
            .expect_err("timed out");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert!(
            matches!(
                err,
                ProxyError::Timeout {
                    which: crate::layers::timeout::REQUEST,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no attempt after the deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_attempts_and_ignores_other_statuses() {
        let calls = Arc::new(AtomicUsize::new(0));
        let service = RetryLayer::new(config(3, 1.0, 10), "r".into())
            .layer(status_service(503, calls.clone()));
        assert_eq!(
            service
                .oneshot(request("/"))
                .await
                .expect("response")
                .status(),
            503
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = Arc::new(AtomicUsize::new(0));
        let service = RetryLayer::new(config(3, 1.0, 10), "r".into())
            .layer(status_service(500, calls.clone()));
        assert_eq!(
            service
                .oneshot(request("/"))
                .await
                .expect("response")
                .status(),
            500
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "500 is not in retryOn");
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_are_retried() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let refusing = ProxyService::new(tower::service_fn(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                Err::<crate::body::Response, _>(ProxyError::Connect {
                    backend: "b".into(),
                    endpoint: SocketAddr::from(([127, 0, 0, 1], 1)),
                    reason: "refused".into(),
                    unsent: None,
                })
            }
        }));
        let service = RetryLayer::new(config(4, 1.0, 10), "r".into()).layer(refusing);
        let err = service
            .oneshot(request("/"))
            .await
            .expect_err("still failing");
        assert!(matches!(err, ProxyError::Connect { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_to_ratio_of_requests() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RetryLayer::new(config(3, 0.2, 0), "r".into());
        let service = layer.layer(status_service(503, calls.clone()));
        for _ in 0..100 {
            service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("response");
        }
        let retries = calls.load(Ordering::SeqCst) - 100;
        // Without a budget 100 requests x 2 retries = 200; the budget allows 20% of requests.
        assert!(
            retries <= 20,
            "retries {retries} exceed 20% of 100 requests"
        );
        assert!(
            retries >= 15,
            "retries {retries}: the budget should still allow some"
        );
    }

    #[test]
    fn attempt_values_are_the_numbers() {
        for attempt in [0u32, 1, 2, 9, 10, 11, 250] {
            assert_eq!(attempt_value(attempt), attempt.to_string().as_str());
        }
    }

    #[test]
    fn budget_reserve_allows_low_traffic_retries() {
        let budget = RetryBudget::new(&RetryBudgetConfig {
            ratio: 0.1,
            min_retries_per_second: 1,
            window: GatewayDuration(Duration::from_secs(10)),
        });
        budget.deposit();
        let granted = (0..20).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 10, "0.1 * 1 request + 1/s * 10 s = 10.1 retries");
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let config = config(5, 1.0, 1);
        for retry in 1..=6 {
            let ceiling =
                Duration::from_millis(10 * (1 << (retry - 1))).min(Duration::from_millis(40));
            for _ in 0..50 {
                assert!(backoff(&config, retry) <= ceiling);
            }
        }
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| backoff(&config, 3)).collect();
        assert!(distinct.len() > 1, "jitter varies the backoff");
    }

    #[test]
    fn the_backoff_never_goes_below_its_floor() {
        let mut config = config(5, 1.0, 1);
        config.backoff.min = Some(GatewayDuration(Duration::from_millis(25)));
        for retry in 1..=6 {
            for _ in 0..50 {
                let wait = backoff(&config, retry);
                assert!(wait >= Duration::from_millis(25), "{wait:?}");
                assert!(wait <= Duration::from_millis(40), "{wait:?}");
            }
        }
        // A floor above the cap wins: never earlier than asked.
        config.backoff.min = Some(GatewayDuration(Duration::from_millis(100)));
        assert_eq!(backoff(&config, 1), Duration::from_millis(100));
    }

    #[test]
    fn status_codes_match_responses_and_the_waypoints_own_answers() {
        let response = |code: u16| -> ProxyResult {
            let status = http::StatusCode::from_u16(code).expect("status");
            Ok(crate::body::text_response(status, ""))
        };
        let on = [RetryOn::Status(502), RetryOn::Status(504)];
        assert!(is_retryable(&response(502), &on));
        assert!(!is_retryable(&response(503), &on));
        assert!(!is_retryable(&response(500), &on));
        // An attempt that timed out is answered 504: retried. The whole request timing out is not.
        let attempt = ProxyError::Timeout {
            which: super::super::timeout::BACKEND_REQUEST,
            after: Duration::from_millis(5),
        };
        assert!(is_retryable(&Err(attempt), &on));
        let whole = ProxyError::Timeout {
            which: super::super::timeout::REQUEST,
            after: Duration::from_millis(5),
        };
        assert!(!is_retryable(&Err(whole), &on));
        let attempt = || ProxyError::Timeout {
            which: super::super::timeout::BACKEND_REQUEST,
            after: Duration::from_millis(5),
        };
        assert!(is_retryable(&Err(attempt()), &[RetryOn::AttemptTimeout]));
        assert!(!is_retryable(&Err(attempt()), &[RetryOn::Reset]));
        // A refused connection is answered 503: retried under 503, not under 502 alone.
        let refused = || ProxyError::Connect {
            backend: "b".into(),
            endpoint: "127.0.0.1:1".parse().expect("addr"),
            reason: "refused".into(),
            unsent: None,
        };
        assert!(!is_retryable(&Err(refused()), &on));
        assert!(is_retryable(&Err(refused()), &[RetryOn::Status(503)]));
        // Client-side failures never are.
        let client = ProxyError::ClientBody {
            reason: "reset".into(),
        };
        assert!(!is_retryable(&Err(client), &[RetryOn::Status(400)]));
    }

    #[test]
    fn retry_conditions_parse_by_name_and_code() {
        let parsed: Vec<RetryOn> = serde_yaml::from_str(
            "[connect-failure, reset, attempt-timeout, 5xx, \"503\", 429, unavailable]",
        )
        .expect("parse");
        assert_eq!(
            parsed,
            [
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::AttemptTimeout,
                RetryOn::Status5xx,
                RetryOn::Status(503),
                RetryOn::Status(429),
                RetryOn::GrpcUnavailable
            ]
        );
        for (bad, says) in [
            ("[600]", "400-599"),
            ("[\"302\"]", "400-599"),
            ("[retry-me]", "`retry-me` is not a retry condition"),
        ] {
            let err = serde_yaml::from_str::<Vec<RetryOn>>(bad).expect_err(bad);
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
        let back = serde_yaml::to_string(&parsed).expect("serialize");
        assert_eq!(
            serde_yaml::from_str::<Vec<RetryOn>>(&back).expect("again"),
            parsed
        );
    }

    #[test]
    fn grpc_codes_are_classified() {
        let mut response = crate::body::text_response(http::StatusCode::OK, "");
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("14"));
        let result: ProxyResult = Ok(response);
        assert!(is_retryable(&result, &[RetryOn::GrpcUnavailable]));
        assert!(!is_retryable(
            &result,
            &[RetryOn::GrpcInternal, RetryOn::Status5xx]
        ));
    }
}
