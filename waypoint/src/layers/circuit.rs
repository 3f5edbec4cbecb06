//! Circuit breaking.
//!
//! * [`EndpointCircuit`]: the per-endpoint outlier detection state machine. Closed, it counts
//!   consecutive 5xx (and resets) and consecutive connect failures; at a threshold it opens
//!   (the endpoint is ejected) for `baseEjectionTime x ejections` (capped by
//!   `maxEjectionTime`). Once that time has passed the next request is a half-open probe: a
//!   success closes the circuit, a failure opens it again for longer. Every transition counts
//!   `weft_waypoint_circuit_transitions_total{backend, endpoint, from, to}`. The balancer
//!   ([`super::balance`]) consults it to skip ejected endpoints.
//! * [`ConcurrencyLimitLayer`]: per-backend limits on concurrent and pending requests
//!   (`circuitBreaker`); beyond both, requests fail at once with 503.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::{BoxFuture, Inner, ProxyResult};
use crate::body::Request;
use crate::config::{CircuitBreakerConfig, OutlierDetectionConfig};
use crate::error::ProxyError;

/// The state of an endpoint's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Traffic flows; failures are counted.
    Closed,
    /// The endpoint is ejected until the deadline.
    Open,
    /// One probe request is allowed through.
    HalfOpen,
}

impl CircuitState {
    fn label(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        }
    }
}

/// How an attempt to an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A 5xx response, or the connection broke.
    Failure5xx,
    /// The connection could not be opened.
    ConnectFailure,
    /// The caller gave up (e.g. a timeout) before the outcome was known.
    Cancelled,
}

/// Admission to an endpoint, returned by [`EndpointCircuit::try_acquire`] and handed back to
/// [`EndpointCircuit::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    probe: bool,
}

/// Outlier detection state machine of one endpoint.
#[derive(Debug)]
pub struct EndpointCircuit {
    config: OutlierDetectionConfig,
    backend: Arc<str>,
    endpoint: SocketAddr,
    state: CircuitState,
    consecutive_5xx: u32,
    consecutive_connect: u32,
    ejections: u32,
    open_until: Instant,
    probe_in_flight: bool,
}

impl EndpointCircuit {
    /// A closed circuit.
    pub fn new(config: OutlierDetectionConfig, backend: Arc<str>, endpoint: SocketAddr) -> Self {
        EndpointCircuit {
            config,
            backend,
            endpoint,
            state: CircuitState::Closed,
            consecutive_5xx: 0,
            consecutive_connect: 0,
            ejections: 0,
            open_until: Instant::now(),
            probe_in_flight: false,
        }
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Whether a request could be admitted now (no side effect).
    pub fn is_available(&self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::Open => now >= self.open_until,
            CircuitState::HalfOpen => !self.probe_in_flight,
        }
    }

    /// Whether the ejection is over and a half-open probe should be sent now.
    pub fn wants_probe(&self, now: Instant) -> bool {
        self.state == CircuitState::Open && now >= self.open_until
    }

    /// Admits a request, turning an expired ejection into a half-open probe.
    pub fn try_acquire(&mut self, now: Instant) -> Option<Ticket> {
        match self.state {
            CircuitState::Closed => Some(Ticket { probe: false }),
            CircuitState::Open if now >= self.open_until => {
                self.transition(CircuitState::HalfOpen);
                self.probe_in_flight = true;
                Some(Ticket { probe: true })
            }
            CircuitState::HalfOpen if !self.probe_in_flight => {
                self.probe_in_flight = true;
                Some(Ticket { probe: true })
            }
            CircuitState::Open | CircuitState::HalfOpen => None,
        }
    }

    /// Records how an admitted request ended.
    pub fn record(&mut self, ticket: Ticket, outcome: Outcome, now: Instant) {
        self.record_limited(ticket, outcome, now, true);
    }

    /// Like [`EndpointCircuit::record`]; when `may_eject` is false (the backend already has
    /// `maxEjectionPercent` of its endpoints ejected) a closed circuit keeps counting failures
    /// but does not open, so it opens on the next failure once ejecting is allowed again.
    pub fn record_limited(
        &mut self,
        ticket: Ticket,
        outcome: Outcome,
        now: Instant,
        may_eject: bool,
    ) {
        match (self.state, ticket.probe) {
            (CircuitState::HalfOpen, true) => {
                self.probe_in_flight = false;
                if outcome == Outcome::Success {
                    self.ejections = 0;
                    self.consecutive_5xx = 0;
                    self.consecutive_connect = 0;
                    self.transition(CircuitState::Closed);
                } else {
                    self.eject(now);
                }
            }
            (CircuitState::Closed, _) => match outcome {
                Outcome::Success => {
                    self.consecutive_5xx = 0;
                    self.consecutive_connect = 0;
                }
                Outcome::Failure5xx => {
                    self.consecutive_5xx += 1;
                    if may_eject
                        && self.config.consecutive_5xx > 0
                        && self.consecutive_5xx >= self.config.consecutive_5xx
                    {
                        self.eject(now);
                    }
                }
                Outcome::ConnectFailure => {
                    self.consecutive_connect += 1;
                    if may_eject
                        && self.config.consecutive_connect_failures > 0
                        && self.consecutive_connect >= self.config.consecutive_connect_failures
                    {
                        self.eject(now);
                    }
                }
                Outcome::Cancelled => {}
            },
            // Requests admitted before an ejection finishing late: already accounted for.
            _ => {}
        }
    }

    fn eject(&mut self, now: Instant) {
        self.ejections = self.ejections.saturating_add(1);
        let length = self
            .config
            .base_ejection_time
            .0
            .saturating_mul(self.ejections)
            .min(self.config.max_ejection_time.0);
        self.open_until = now + length;
        self.consecutive_5xx = 0;
        self.consecutive_connect = 0;
        self.transition(CircuitState::Open);
    }

    fn transition(&mut self, to: CircuitState) {
        let from = self.state;
        self.state = to;
        tracing::info!(backend = %self.backend, endpoint = %self.endpoint, from = from.label(), to = to.label(), "endpoint circuit transition");
        metrics::counter!(
            "weft_waypoint_circuit_transitions_total",
            "backend" => self.backend.to_string(),
            "endpoint" => self.endpoint.to_string(),
            "from" => from.label(),
            "to" => to.label(),
        )
        .increment(1);
    }

    /// Time left in the current ejection (zero unless open).
    pub fn ejected_for(&self, now: Instant) -> Duration {
        if self.state == CircuitState::Open {
            self.open_until.saturating_duration_since(now)
        } else {
            Duration::ZERO
        }
    }
}

/// Limits a backend's concurrent requests, with a bounded queue of pending ones.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer {
    limits: Arc<Limits>,
}

#[derive(Debug)]
struct Limits {
    backend: Arc<str>,
    config: CircuitBreakerConfig,
    semaphore: Arc<Semaphore>,
    pending: AtomicUsize,
}

impl ConcurrencyLimitLayer {
    /// A layer enforcing `config` for `backend` (shared by the services it builds).
    pub fn new(config: CircuitBreakerConfig, backend: Arc<str>) -> Self {
        ConcurrencyLimitLayer {
            limits: Arc::new(Limits {
                backend,
                config,
                semaphore: Arc::new(Semaphore::new(config.max_concurrent_requests)),
                pending: AtomicUsize::new(0),
            }),
        }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;
    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// The service of [`ConcurrencyLimitLayer`].
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    limits: Arc<Limits>,
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<S: Inner> Service<Request> for ConcurrencyLimit<S> {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let inner = self.inner.clone();
        let limits = self.limits.clone();
        Box::pin(async move {
            let overflow = || {
                metrics::counter!("weft_waypoint_circuit_overflow_total", "backend" => limits.backend.to_string()).increment(1);
                ProxyError::Overflow {
                    backend: limits.backend.to_string(),
                    max_concurrent: limits.config.max_concurrent_requests,
                    max_pending: limits.config.max_pending_requests,
                }
            };
            let permit = match limits.semaphore.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let queued = limits.pending.fetch_add(1, Ordering::SeqCst);
                    let guard = PendingGuard(&limits.pending);
                    if queued >= limits.config.max_pending_requests {
                        drop(guard);
                        return Err(overflow());
                    }
                    let permit = limits
                        .semaphore
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| ProxyError::Internal("backend semaphore closed"))?;
                    drop(guard);
                    permit
                }
            };
            // The slot is held until the response body ends, so long streams count.
            let response = inner.oneshot(request).await?;
            Ok(crate::body::guarded(response, permit))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::GatewayDuration;
    use crate::layers::ProxyService;
    use crate::layers::testing::request;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    fn config() -> OutlierDetectionConfig {
        OutlierDetectionConfig {
            consecutive_5xx: 3,
            consecutive_connect_failures: 2,
            base_ejection_time: GatewayDuration(Duration::from_secs(10)),
            max_ejection_time: GatewayDuration(Duration::from_secs(25)),
            max_ejection_percent: 100,
            panic_threshold: 0,
        }
    }

    fn circuit() -> EndpointCircuit {
        EndpointCircuit::new(config(), "b".into(), SocketAddr::from(([127, 0, 0, 1], 80)))
    }

    #[tokio::test(start_paused = true)]
    async fn closed_open_half_open_closed() {
        let mut c = circuit();
        let now = Instant::now();
        for _ in 0..2 {
            let t = c.try_acquire(now).expect("closed admits");
            c.record(t, Outcome::Failure5xx, now);
        }
        // A success in between resets the count.
        let t = c.try_acquire(now).expect("closed");
        c.record(t, Outcome::Success, now);
        for _ in 0..3 {
            let t = c.try_acquire(now).expect("closed admits");
            c.record(t, Outcome::Failure5xx, now);
        }
        assert_eq!(c.state(), CircuitState::Open);
        assert!(!c.is_available(now + Duration::from_secs(9)));
        assert!(c.try_acquire(now + Duration::from_secs(9)).is_none());
        let later = now + Duration::from_secs(10);
        assert!(c.is_available(later));
        let probe = c.try_acquire(later).expect("probe");
        assert_eq!(c.state(), CircuitState::HalfOpen);
        assert!(c.try_acquire(later).is_none(), "one probe at a time");
        c.record(probe, Outcome::Success, later);
        assert_eq!(c.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_longer_up_to_max() {
        let mut c = circuit();
        let mut now = Instant::now();
        for _ in 0..2 {
            let t = c.try_acquire(now).expect("closed");
            c.record(t, Outcome::ConnectFailure, now);
        }
        assert_eq!(c.ejected_for(now), Duration::from_secs(10));
        now += Duration::from_secs(10);
        let probe = c.try_acquire(now).expect("probe");
        c.record(probe, Outcome::ConnectFailure, now);
        assert_eq!(c.state(), CircuitState::Open);
        assert_eq!(c.ejected_for(now), Duration::from_secs(20));
        now += Duration::from_secs(20);
        let probe = c.try_acquire(now).expect("probe");
        c.record(probe, Outcome::Cancelled, now);
        assert_eq!(
            c.ejected_for(now),
            Duration::from_secs(25),
            "capped by maxEjectionTime"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn late_results_of_earlier_requests_do_not_close_the_circuit() {
        let mut c = circuit();
        let now = Instant::now();
        let early = c.try_acquire(now).expect("closed");
        for _ in 0..3 {
            let t = c.try_acquire(now).expect("closed");
            c.record(t, Outcome::Failure5xx, now);
        }
        let later = now + Duration::from_secs(10);
        let _probe = c.try_acquire(later).expect("probe");
        c.record(early, Outcome::Success, later);
        assert_eq!(c.state(), CircuitState::HalfOpen);
    }

    #[test]
    fn transitions_are_counted() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let mut c = circuit();
            let now = Instant::now();
            for _ in 0..3 {
                let t = c.try_acquire(now).expect("closed");
                c.record(t, Outcome::Failure5xx, now);
            }
            let later = now + Duration::from_secs(10);
            let probe = c.try_acquire(later).expect("probe");
            c.record(probe, Outcome::Success, later);
        });
        let mut transitions = Vec::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            if key.key().name() == "weft_waypoint_circuit_transitions_total" {
                let labels: std::collections::HashMap<_, _> = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_string(), l.value().to_string()))
                    .collect();
                assert_eq!(value, DebugValue::Counter(1));
                transitions.push((labels["from"].clone(), labels["to"].clone()));
            }
        }
        transitions.sort();
        assert_eq!(
            transitions,
            vec![
                ("closed".to_string(), "open".to_string()),
                ("half-open".to_string(), "closed".to_string()),
                ("open".to_string(), "half-open".to_string()),
            ]
        );
    }

    #[tokio::test]
    async fn a_streaming_response_holds_its_slot_until_the_body_ends() {
        let service = ConcurrencyLimitLayer::new(
            CircuitBreakerConfig {
                max_concurrent_requests: 1,
                max_pending_requests: 0,
                max_connections: None,
            },
            "b".into(),
        )
        .layer(crate::layers::testing::status_service(
            200,
            Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        ));
        let streaming = service.clone().oneshot(request("/")).await.expect("first");
        let err = service
            .clone()
            .oneshot(request("/"))
            .await
            .expect_err("slot still taken by the body");
        assert!(matches!(err, ProxyError::Overflow { .. }), "{err}");
        http_body_util::BodyExt::collect(streaming.into_body())
            .await
            .expect("body");
        service
            .oneshot(request("/"))
            .await
            .expect("slot released at the end of the body");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limit_queues_then_overflows() {
        let slow = ProxyService::new(tower::service_fn(|_| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, ProxyError>(crate::body::text_response(http::StatusCode::OK, "x"))
        }));
        let service = ConcurrencyLimitLayer::new(
            CircuitBreakerConfig {
                max_concurrent_requests: 2,
                max_pending_requests: 1,
                max_connections: None,
            },
            "b".into(),
        )
        .layer(slow);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let service = service.clone();
            tasks.push(tokio::spawn(service.oneshot(request("/"))));
            tokio::task::yield_now().await;
        }
        let start = Instant::now();
        let mut ok = 0;
        let mut overflow = 0;
        for task in tasks {
            match task.await.expect("join") {
                Ok(_) => ok += 1,
                Err(ProxyError::Overflow { .. }) => overflow += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!((ok, overflow), (3, 1), "2 run, 1 waits, 1 overflows");
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "the pending one ran after a slot freed"
        );
    }
}
