//! Endpoint choice within a backend: power of two choices over a peak-sensitive EWMA of
//! latency, weighted by requests in flight (cost = ewma x (in_flight + 1)). Endpoints ejected by
//! outlier detection ([`super::circuit::EndpointCircuit`]) are skipped; their outcomes feed it.
//! A request the forwarder hands back because no connection to its endpoint could be opened
//! ([`ProxyError::Connect`] with `unsent`) goes to another endpoint not tried yet, at most
//! [`MAX_CONNECT_FAILOVERS`] times.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::circuit::{CircuitState, EndpointCircuit, Outcome, Ticket};
use super::{BoxFuture, Inner, ProxyResult, SelectedEndpoint, context_of};
use crate::body::Request;
use crate::config::{LoadBalancerConfig, OutlierDetectionConfig};
use crate::error::ProxyError;

/// What a failed connect counts as in an endpoint's latency average.
pub const CONNECT_FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// How many other endpoints a request tries when no connection to its endpoint could be
/// opened (it never left, so this is safe for any method), before the connect failure is the
/// answer.
pub const MAX_CONNECT_FAILOVERS: usize = 2;

#[derive(Debug)]
struct Ewma {
    nanos: f64,
    updated: Instant,
}

/// One endpoint with its load statistics and circuit.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    /// `addr` as a URI authority, made once (the forwarder's upstream URI).
    authority: Option<http::uri::Authority>,
    /// The SPIFFE ID the endpoint must present (mesh backends, reached through HBONE).
    identity: Option<Arc<str>>,
    ewma: Mutex<Ewma>,
    in_flight: AtomicUsize,
    circuit: Option<Mutex<EndpointCircuit>>,
}

impl Endpoint {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The SPIFFE ID the endpoint must present, for mesh endpoints.
    pub fn identity(&self) -> Option<&Arc<str>> {
        self.identity.as_ref()
    }

    /// Requests in flight to the endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The state of the endpoint's circuit (`None` without outlier detection).
    pub fn circuit_state(&self) -> Option<CircuitState> {
        self.circuit
            .as_ref()
            .and_then(|c| c.lock().ok().map(|c| c.state()))
    }

    /// Load estimate: the latency average, decayed toward zero for the time since the last
    /// measurement (so an endpoint that lost every pairing is tried again and re-measured),
    /// times the requests in flight plus one.
    fn cost(&self, now: Instant, decay: Duration) -> f64 {
        let ewma = self
            .ewma
            .lock()
            .map(|e| e.nanos * decay_weight(now.saturating_duration_since(e.updated), decay))
            .unwrap_or(f64::MAX);
        ewma * (self.in_flight.load(Ordering::Relaxed) as f64 + 1.0)
    }

    fn observe(&self, rtt: Duration, decay: Duration) {
        if let Ok(mut ewma) = self.ewma.lock() {
            let now = Instant::now();
            let rtt = rtt.as_nanos() as f64;
            let w = decay_weight(now.saturating_duration_since(ewma.updated), decay);
            if rtt > ewma.nanos * w {
                // Peak sensitive: a slow response counts at once.
                ewma.nanos = rtt;
            } else {
                ewma.nanos = ewma.nanos * w + rtt * (1.0 - w);
            }
            ewma.updated = now;
        }
    }
}

/// Weight of the old estimate after `elapsed`: `exp(-elapsed / decay)`.
fn decay_weight(elapsed: Duration, decay: Duration) -> f64 {
    (-elapsed.as_secs_f64() / decay.as_secs_f64()).exp()
}

/// Where a backend's endpoints come from when they change at run time (mesh backends: the
/// ready endpoints of a Service in the current mesh view).
pub trait EndpointSource: Send + Sync + std::fmt::Debug + 'static {
    /// Changes whenever [`EndpointSource::resolve`] may answer differently.
    fn version(&self) -> u64;
    /// The endpoints now: address and, for mesh endpoints, the SPIFFE ID they must present.
    fn resolve(&self) -> Vec<(SocketAddr, Option<Arc<str>>)>;
}

/// The endpoint list in force; replaced whole when the source changes.
pub type Endpoints = Arc<Vec<Arc<Endpoint>>>;

/// A backend's endpoints, shared by every route that uses the backend.
#[derive(Debug)]
pub struct EndpointSet {
    backend: Arc<str>,
    endpoints: RwLock<Endpoints>,
    lb: LoadBalancerConfig,
    outlier: Option<OutlierDetectionConfig>,
    decay: Duration,
    max_ejection_percent: u32,
    panic_threshold: u32,
    source: Option<Box<dyn EndpointSource>>,
    /// The source version `endpoints` was built from.
    synced: AtomicU64,
    /// One re-sync at a time.
    syncing: Mutex<()>,
}

impl EndpointSet {
    /// Endpoints of `backend`, with outlier detection when `outlier` is set.
    pub fn new(
        backend: Arc<str>,
        addrs: &[SocketAddr],
        lb: LoadBalancerConfig,
        outlier: Option<OutlierDetectionConfig>,
    ) -> Self {
        let mut set = Self::empty(backend, lb, outlier, None);
        let list: Vec<_> = addrs.iter().map(|&a| (a, None)).collect();
        set.endpoints = RwLock::new(Arc::new(set.build(&list, &[])));
        set
    }

    /// Endpoints that follow `source`: re-read whenever its version changes (checked on every
    /// request). Endpoints that stay keep their latency statistics and circuits.
    pub fn dynamic(
        backend: Arc<str>,
        source: Box<dyn EndpointSource>,
        lb: LoadBalancerConfig,
        outlier: Option<OutlierDetectionConfig>,
    ) -> Self {
        let set = Self::empty(backend, lb, outlier, Some(source));
        set.sync();
        set
    }

    fn empty(
        backend: Arc<str>,
        lb: LoadBalancerConfig,
        outlier: Option<OutlierDetectionConfig>,
        source: Option<Box<dyn EndpointSource>>,
    ) -> Self {
        EndpointSet {
            backend,
            endpoints: RwLock::new(Arc::new(Vec::new())),
            lb,
            outlier,
            decay: lb.decay.0.max(Duration::from_millis(1)),
            max_ejection_percent: outlier.map_or(100, |o| o.max_ejection_percent),
            panic_threshold: outlier.map_or(0, |o| o.panic_threshold),
            source,
            synced: AtomicU64::new(u64::MAX),
            syncing: Mutex::new(()),
        }
    }

    /// Endpoints for `list`, reusing those of `old` with the same address and identity.
    fn build(
        &self,
        list: &[(SocketAddr, Option<Arc<str>>)],
        old: &[Arc<Endpoint>],
    ) -> Vec<Arc<Endpoint>> {
        let now = Instant::now();
        list.iter()
            .map(|(addr, identity)| {
                if let Some(kept) = old
                    .iter()
                    .find(|e| e.addr == *addr && e.identity == *identity)
                {
                    return kept.clone();
                }
                Arc::new(Endpoint {
                    addr: *addr,
                    authority: http::uri::Authority::try_from(addr.to_string().as_str()).ok(),
                    identity: identity.clone(),
                    ewma: Mutex::new(Ewma {
                        nanos: self.lb.initial_latency.0.as_nanos() as f64,
                        updated: now,
                    }),
                    in_flight: AtomicUsize::new(0),
                    circuit: self
                        .outlier
                        .map(|o| Mutex::new(EndpointCircuit::new(o, self.backend.clone(), *addr))),
                })
            })
            .collect()
    }

    /// Re-reads the source if its version changed.
    fn sync(&self) {
        let Some(source) = &self.source else {
            return;
        };
        let version = source.version();
        if self.synced.load(Ordering::Acquire) == version {
            return;
        }
        let Ok(_one) = self.syncing.lock() else {
            return;
        };
        if self.synced.load(Ordering::Acquire) == version {
            return;
        }
        let list = source.resolve();
        // Not `self.endpoints()`: it syncs, and `syncing` is held here (not reentrant).
        let old = match self.endpoints.read() {
            Ok(list) => list.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let next = Arc::new(self.build(&list, &old));
        tracing::debug!(backend = %self.backend, endpoints = next.len(), "backend endpoints updated");
        match self.endpoints.write() {
            Ok(mut slot) => *slot = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        self.synced.store(version, Ordering::Release);
    }

    /// Whether one more endpoint (other than `index`) may be ejected under
    /// `maxEjectionPercent`: at least one always may, as in Envoy.
    fn may_eject(&self, endpoints: &[Arc<Endpoint>], index: usize) -> bool {
        let ejected = endpoints
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                *i != index
                    && e.circuit
                        .as_ref()
                        .is_some_and(|c| c.lock().is_ok_and(|c| c.state() == CircuitState::Open))
            })
            .count();
        let allowed = (endpoints.len() * self.max_ejection_percent as usize / 100).max(1);
        ejected < allowed
    }

    /// The endpoints in force (after picking up any change of the source).
    pub fn endpoints(&self) -> Endpoints {
        self.sync();
        match self.endpoints.read() {
            Ok(list) => list.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn available(endpoint: &Endpoint, now: Instant) -> bool {
        endpoint
            .circuit
            .as_ref()
            .is_none_or(|c| c.lock().map(|c| c.is_available(now)).unwrap_or(false))
    }

    /// Picks an endpoint with p2c, other than those in `skip` (tried already), and admits the
    /// request through its circuit.
    fn choose(
        &self,
        endpoints: &[Arc<Endpoint>],
        skip: &[usize],
    ) -> Option<(usize, Option<Ticket>)> {
        let now = Instant::now();
        // An endpoint whose ejection expired gets the next request as its probe: left to p2c,
        // its stale latency could keep it from ever being tried, and so ejected for good.
        for (index, endpoint) in endpoints.iter().enumerate() {
            if !skip.contains(&index)
                && let Some(circuit) = &endpoint.circuit
                && let Ok(mut circuit) = circuit.lock()
                && circuit.wants_probe(now)
                && let Some(ticket) = circuit.try_acquire(now)
            {
                return Some((index, Some(ticket)));
            }
        }
        // Without allocating: count the endpoints in service, then find the two drawn.
        let in_service = (0..endpoints.len())
            .filter(|i| Self::available(&endpoints[*i], now))
            .count();
        // Panic mode (as in Envoy): with too few endpoints in service, ejections would overload
        // the rest or refuse everything (a single-endpoint backend); spread over all instead.
        // Decided over all endpoints: those already tried are not out of service.
        let panic = in_service * 100 < self.panic_threshold as usize * endpoints.len();
        if panic {
            metrics::counter!("weft_waypoint_panic_routing_total", "backend" => self.backend.to_string()).increment(1);
        }
        // The candidates: not tried yet, and in service (any, in panic mode).
        let candidate =
            |i: &usize| !skip.contains(i) && (panic || Self::available(&endpoints[*i], now));
        let n = if skip.is_empty() && !panic {
            in_service
        } else {
            (0..endpoints.len()).filter(candidate).count()
        };
        let nth = |k: usize| (0..endpoints.len()).filter(candidate).nth(k);
        let order: [Option<usize>; 2] = match n {
            0 => return None,
            1 => [nth(0), None],
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (Some(a), Some(b)) = (nth(a), nth(b)) else {
                    return None;
                };
                if endpoints[b].cost(now, self.decay) < endpoints[a].cost(now, self.decay) {
                    [Some(b), Some(a)]
                } else {
                    [Some(a), Some(b)]
                }
            }
        };
        // The loser is the fallback if the winner's probe slot was just taken by another request.
        for index in order.into_iter().flatten() {
            if panic {
                // Outcomes are not recorded: the circuits keep their own schedule.
                return Some((index, None));
            }
            match &endpoints[index].circuit {
                None => return Some((index, None)),
                Some(circuit) => {
                    if let Some(ticket) = circuit.lock().ok().and_then(|mut c| c.try_acquire(now)) {
                        return Some((index, Some(ticket)));
                    }
                }
            }
        }
        None
    }
}

/// Spreads requests over a backend's endpoints; the inner service forwards to the
/// [`SelectedEndpoint`] found in the request's extensions.
#[derive(Debug, Clone)]
pub struct BalanceLayer {
    set: Arc<EndpointSet>,
}

impl BalanceLayer {
    /// A layer over `set`.
    pub fn new(set: Arc<EndpointSet>) -> Self {
        BalanceLayer { set }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Balance<S> {
        Balance {
            inner,
            set: self.set.clone(),
        }
    }
}

/// The service of [`BalanceLayer`].
#[derive(Debug, Clone)]
pub struct Balance<S> {
    inner: S,
    set: Arc<EndpointSet>,
}

/// Keeps `in_flight` right and reports an attempt dropped before its end to the circuit: as a
/// failure when its deadline had passed (a timeout outside fired), else as cancelled.
struct InFlight {
    set: Arc<EndpointSet>,
    /// The list the endpoint was chosen from (for `maxEjectionPercent`).
    endpoints: Endpoints,
    index: usize,
    ticket: Option<Ticket>,
    /// When the attempt started (the latency EWMA).
    start: Instant,
    /// The earliest timeout the request is under (from its [`RequestContext`]).
    ///
    /// [`RequestContext`]: crate::layers::RequestContext
    deadline: Option<tokio::time::Instant>,
    finished: bool,
}

impl InFlight {
    fn record(&mut self, outcome: Outcome) {
        if let Some(ticket) = self.ticket.take()
            && let Some(circuit) = &self.endpoints[self.index].circuit
        {
            let may_eject = self.set.may_eject(&self.endpoints, self.index);
            if let Ok(mut circuit) = circuit.lock() {
                circuit.record_limited(ticket, outcome, Instant::now(), may_eject);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            // The timeout layers arm the only timer: the endpoint is charged with the timeout
            // here, when the expired attempt is dropped, without a second timer per attempt.
            if self
                .deadline
                .is_some_and(|at| tokio::time::Instant::now() >= at)
            {
                self.endpoints[self.index].observe(self.start.elapsed(), self.set.decay);
                self.record(Outcome::Failure5xx);
            } else {
                self.record(Outcome::Cancelled);
            }
        }
        self.endpoints[self.index]
            .in_flight
            .fetch_sub(1, Ordering::SeqCst);
    }
}

impl<S: Inner> Service<Request> for Balance<S> {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let set = self.set.clone();
        let endpoints = set.endpoints();
        let Some((index, ticket)) = set.choose(&endpoints, &[]) else {
            let backend = set.backend.to_string();
            let none = endpoints.is_empty();
            return Box::pin(async move {
                Err(if none {
                    ProxyError::NoEndpoints { backend }
                } else {
                    ProxyError::NoHealthyEndpoint { backend }
                })
            });
        };
        let mut guard = InFlight::start(&set, &endpoints, index, ticket, &mut request);
        // Always ready (see the module docs): called now, no clone of the inner service.
        let mut future = self.inner.call(request);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            // The endpoints tried, in order; `tried[..=failovers]` are taken.
            let mut tried = [index; MAX_CONNECT_FAILOVERS + 1];
            let mut failovers = 0;
            loop {
                let result = future.await;
                guard.finish(&result);
                let (backend, endpoint, reason, unsent) = match result {
                    Err(ProxyError::Connect {
                        backend,
                        endpoint,
                        reason,
                        unsent: Some(unsent),
                    }) => (backend, endpoint, reason, unsent),
                    other => return other,
                };
                // The request never left: another endpoint may take it, whatever its method.
                let next = (failovers < MAX_CONNECT_FAILOVERS)
                    .then(|| set.choose(&endpoints, &tried[..=failovers]))
                    .flatten();
                let Some((index, ticket)) = next else {
                    return Err(ProxyError::Connect {
                        backend,
                        endpoint,
                        reason,
                        unsent: None,
                    });
                };
                failovers += 1;
                tried[failovers] = index;
                tracing::debug!(%backend, %endpoint, %reason, next = %endpoints[index].addr, "could not connect; the request goes to another endpoint");
                metrics::counter!("weft_waypoint_connect_failovers_total", "backend" => backend)
                    .increment(1);
                let mut request = *unsent.0;
                guard = InFlight::start(&set, &endpoints, index, ticket, &mut request);
                future = inner.call(request);
            }
        })
    }
}

impl InFlight {
    /// Counts an attempt to `endpoints[index]` in flight and records the choice for the
    /// forwarder ([`SelectedEndpoint`]).
    fn start(
        set: &Arc<EndpointSet>,
        endpoints: &Endpoints,
        index: usize,
        ticket: Option<Ticket>,
        request: &mut Request,
    ) -> InFlight {
        let endpoint = &endpoints[index];
        endpoint.in_flight.fetch_add(1, Ordering::SeqCst);
        let selected = SelectedEndpoint {
            backend: set.backend.clone(),
            addr: endpoint.addr,
            authority: endpoint.authority.clone(),
            identity: endpoint.identity.clone(),
        };
        // In the context when there is one: no extension to insert (and remove) per attempt.
        let deadline = match context_of(request) {
            Some(context) => context.select(selected).map(|d| d.at),
            None => {
                request.extensions_mut().insert(selected);
                None
            }
        };
        InFlight {
            set: set.clone(),
            endpoints: endpoints.clone(),
            index,
            ticket,
            start: Instant::now(),
            deadline,
            finished: false,
        }
    }

    /// Records the attempt's `result` in the endpoint's latency average and circuit.
    fn finish(&mut self, result: &ProxyResult) {
        let outcome = match result {
            Ok(response) if response.status().is_server_error() => Outcome::Failure5xx,
            Ok(_) => Outcome::Success,
            Err(ProxyError::Connect { .. }) => Outcome::ConnectFailure,
            // Our own limit, not the endpoint's fault.
            Err(ProxyError::ConnectionLimit { .. }) => Outcome::Cancelled,
            Err(_) => Outcome::Failure5xx,
        };
        // A failed connect is fast: counted as its latency, a dead endpoint would look like
        // the best one and draw most requests (without outlier detection, until the endpoint
        // leaves the backend). It counts as a slow answer instead, and the decay brings the
        // endpoint back to be tried again later.
        let latency = if outcome == Outcome::ConnectFailure {
            CONNECT_FAILURE_PENALTY
        } else {
            self.start.elapsed()
        };
        self.endpoints[self.index].observe(latency, self.set.decay);
        self.finished = true;
        self.record(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::GatewayDuration;
    use crate::layers::ProxyService;
    use crate::layers::testing::{request, request_in_context};
    use std::collections::HashMap;
    use tower::ServiceExt;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Answers after `latency[port]`, with `status[port]`, counting calls per port.
    fn fake(
        latency: HashMap<u16, Duration>,
        status: HashMap<u16, u16>,
        calls: Arc<Mutex<HashMap<u16, usize>>>,
    ) -> ProxyService {
        ProxyService::new(tower::service_fn(move |mut request: Request| {
            let port = crate::layers::take_selected(&mut request)
                .map(|e| e.addr.port())
                .unwrap_or(0);
            *calls.lock().expect("lock").entry(port).or_default() += 1;
            let delay = latency.get(&port).copied().unwrap_or_default();
            let code = status.get(&port).copied().unwrap_or(200);
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, ProxyError>(crate::body::text_response(
                    http::StatusCode::from_u16(code).expect("status"),
                    "x",
                ))
            }
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_fast_endpoint() {
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1), addr(2), addr(3)],
            LoadBalancerConfig::default(),
            None,
        ));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let latency = HashMap::from([
            (1, Duration::from_millis(50)),
            (2, Duration::from_millis(2)),
            (3, Duration::from_millis(50)),
        ]);
        let service = BalanceLayer::new(set).layer(fake(latency, HashMap::new(), calls.clone()));
        for _ in 0..300 {
            service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("response");
        }
        let calls = calls.lock().expect("lock");
        let fast = calls.get(&2).copied().unwrap_or(0);
        // p2c picks the fast endpoint whenever it is one of the two candidates: 2/3 of the
        // time, 200 expected (sigma ~8), against 100 for a random choice.
        assert!(fast > 160, "fast endpoint got {fast} of 300: {calls:?}");
    }

    /// Endpoints whose port is in `refusing` fail to connect (handing the request back when
    /// `hand_back`); the others answer `ok` in 1 ms. Every attempt is logged as (request path,
    /// port).
    fn refusing(
        refusing: &'static [u16],
        hand_back: bool,
        log: Arc<Mutex<Vec<(String, u16)>>>,
    ) -> ProxyService {
        ProxyService::new(tower::service_fn(move |mut request: Request| {
            let endpoint = crate::layers::take_selected(&mut request).map(|e| e.addr);
            let port = endpoint.map_or(0, |a| a.port());
            log.lock()
                .expect("lock")
                .push((request.uri().path().to_string(), port));
            async move {
                match endpoint {
                    Some(endpoint) if refusing.contains(&port) => Err(ProxyError::Connect {
                        backend: "b".into(),
                        endpoint,
                        reason: "connection refused".into(),
                        unsent: hand_back.then(|| crate::error::Unsent(Box::new(request))),
                    }),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        Ok(crate::body::text_response(http::StatusCode::OK, "ok"))
                    }
                }
            }
        }))
    }

    fn set_of(ports: &[u16]) -> Arc<EndpointSet> {
        let addrs: Vec<_> = ports.iter().map(|p| addr(*p)).collect();
        Arc::new(EndpointSet::new(
            "b".into(),
            &addrs,
            LoadBalancerConfig::default(),
            None,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_could_not_connect_goes_to_another_endpoint() {
        // Two of three endpoints refuse connections: at most two failovers reach the third.
        let log = Arc::new(Mutex::new(Vec::new()));
        let service =
            BalanceLayer::new(set_of(&[1, 2, 3])).layer(refusing(&[1, 2], true, log.clone()));
        // The first attempts: at first all three cost the same; once a refusing endpoint has
        // failed it costs more, and is still drawn when p2c pairs it with the other one.
        let answers: Vec<_> = (0..30)
            .map(|i| {
                tokio::spawn(
                    service
                        .clone()
                        .oneshot(request_in_context(&format!("/{i}"))),
                )
            })
            .collect();
        for (i, answer) in answers.into_iter().enumerate() {
            let response = answer
                .await
                .expect("task")
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(response.status(), 200, "request {i}");
        }
        let log = log.lock().expect("lock");
        let failed = log.iter().filter(|(_, port)| *port != 3).count();
        assert!(
            failed >= 1,
            "the refusing endpoints drew none of 30 first attempts"
        );
        // Each request reached endpoint 3 once, and no endpoint twice.
        for i in 0..30 {
            let path = format!("/{i}");
            let mut ports: Vec<u16> = log
                .iter()
                .filter(|(p, _)| *p == path)
                .map(|(_, port)| *port)
                .collect();
            assert_eq!(ports.last(), Some(&3), "{path}: {ports:?}");
            ports.sort_unstable();
            ports.dedup();
            assert_eq!(
                ports.len(),
                log.iter().filter(|(p, _)| *p == path).count(),
                "{path} went to an endpoint twice"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failover_tries_at_most_two_more_endpoints_then_answers_the_failure() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let service = BalanceLayer::new(set_of(&[1, 2, 3, 4])).layer(refusing(
            &[1, 2, 3, 4],
            true,
            log.clone(),
        ));
        let error = service
            .oneshot(request_in_context("/x"))
            .await
            .expect_err("every endpoint refuses");
        assert!(
            matches!(error, ProxyError::Connect { unsent: None, .. }),
            "{error:?}"
        );
        assert_eq!(log.lock().expect("lock").len(), 1 + MAX_CONNECT_FAILOVERS);
    }

    #[tokio::test(start_paused = true)]
    async fn no_failover_for_a_request_that_may_have_left_or_without_another_endpoint() {
        // The forwarder did not hand the request back (it may have gone out): one attempt.
        let log = Arc::new(Mutex::new(Vec::new()));
        let service =
            BalanceLayer::new(set_of(&[1, 2])).layer(refusing(&[1, 2], false, log.clone()));
        service
            .oneshot(request_in_context("/x"))
            .await
            .expect_err("refused");
        assert_eq!(log.lock().expect("lock").len(), 1);
        // A single endpoint: nothing else to try.
        let log = Arc::new(Mutex::new(Vec::new()));
        let service = BalanceLayer::new(set_of(&[1])).layer(refusing(&[1], true, log.clone()));
        let error = service
            .oneshot(request_in_context("/x"))
            .await
            .expect_err("refused");
        assert!(matches!(error, ProxyError::Connect { .. }), "{error:?}");
        assert_eq!(log.lock().expect("lock").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_refusing_connections_is_avoided_not_preferred() {
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1), addr(2)],
            LoadBalancerConfig::default(),
            None,
        ));
        // Endpoint 1 refuses every connection at once; endpoint 2 answers in 5 ms.
        let service = {
            ProxyService::new(tower::service_fn(move |mut request: Request| {
                let endpoint = crate::layers::take_selected(&mut request).map(|e| e.addr);
                let port = endpoint.map_or(0, |a| a.port());
                async move {
                    match endpoint {
                        Some(endpoint) if port == 1 => Err(ProxyError::Connect {
                            backend: "b".into(),
                            endpoint,
                            reason: "connection refused".into(),
                            unsent: None,
                        }),
                        _ => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok(crate::body::text_response(http::StatusCode::OK, "x"))
                        }
                    }
                }
            }))
        };
        let service = BalanceLayer::new(set).layer(service);
        let mut failed = 0;
        for _ in 0..100 {
            if service.clone().oneshot(request("/")).await.is_err() {
                failed += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // One refusal makes endpoint 1 cost as much as a 1 s answer: over the next second of
        // requests it loses every pairing with the 5 ms endpoint (its cost decays for ~70 s
        // before it is tried again). Counted as its near-zero latency, it won them all.
        assert!(
            failed <= 2,
            "{failed} of 100 requests went to the refusing endpoint"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unmeasured_slow_endpoint_is_tried_again_after_decay() {
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1), addr(2)],
            LoadBalancerConfig::default(),
            None,
        ));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let slow_then_fast = {
            let calls = calls.clone();
            let start = Instant::now();
            ProxyService::new(tower::service_fn(move |mut request: Request| {
                let port = crate::layers::take_selected(&mut request)
                    .map(|e| e.addr.port())
                    .unwrap_or(0);
                *calls.lock().expect("lock").entry(port).or_default() += 1;
                // Endpoint 1 is slow for the first minute, then as fast as endpoint 2.
                let delay = if port == 1 && start.elapsed() < Duration::from_secs(60) {
                    Duration::from_millis(500)
                } else {
                    Duration::from_millis(5)
                };
                async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, ProxyError>(crate::body::text_response(http::StatusCode::OK, "x"))
                }
            }))
        };
        let service = BalanceLayer::new(set).layer(slow_then_fast);
        for _ in 0..20 {
            service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("response");
        }
        let slow_before = calls.lock().expect("lock").get(&1).copied().unwrap_or(0);
        assert!(
            slow_before <= 1,
            "the slow endpoint is avoided: {slow_before}"
        );
        tokio::time::advance(Duration::from_secs(120)).await;
        for _ in 0..200 {
            service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("response");
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        let slow_after = calls.lock().expect("lock").get(&1).copied().unwrap_or(0) - slow_before;
        assert!(
            slow_after >= 40,
            "the recovered endpoint gets traffic again: {slow_after} of 200"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_load_spreads_concurrent_requests() {
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1), addr(2)],
            LoadBalancerConfig::default(),
            None,
        ));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let latency = HashMap::from([
            (1, Duration::from_millis(10)),
            (2, Duration::from_millis(10)),
        ]);
        let service =
            BalanceLayer::new(set.clone()).layer(fake(latency, HashMap::new(), calls.clone()));
        let tasks: Vec<_> = (0..10)
            .map(|_| tokio::spawn(service.clone().oneshot(request("/"))))
            .collect();
        for task in tasks {
            task.await.expect("join").expect("response");
        }
        let calls = calls.lock().expect("lock");
        assert_eq!(
            calls.get(&1).copied().unwrap_or(0) + calls.get(&2).copied().unwrap_or(0),
            10
        );
        assert!(
            calls.get(&1).copied().unwrap_or(0) >= 3 && calls.get(&2).copied().unwrap_or(0) >= 3,
            "{calls:?}"
        );
        assert!(
            set.endpoints()
                .iter()
                .all(|e| e.in_flight.load(Ordering::SeqCst) == 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failing_endpoint_is_ejected_then_probed_back() {
        let outlier = OutlierDetectionConfig {
            consecutive_5xx: 2,
            consecutive_connect_failures: 2,
            base_ejection_time: GatewayDuration(Duration::from_secs(5)),
            max_ejection_time: GatewayDuration(Duration::from_secs(50)),
            max_ejection_percent: 100,
            panic_threshold: 0,
        };
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1), addr(2)],
            LoadBalancerConfig::default(),
            Some(outlier),
        ));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let service = BalanceLayer::new(set.clone()).layer(fake(
            HashMap::new(),
            HashMap::from([(1, 500)]),
            calls.clone(),
        ));
        for _ in 0..50 {
            service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("response");
        }
        let bad_calls = calls.lock().expect("lock").get(&1).copied().unwrap_or(0);
        assert_eq!(bad_calls, 2, "ejected after 2 consecutive 5xx");
        let state = |i: usize| {
            set.endpoints()[i]
                .circuit
                .as_ref()
                .expect("circuit")
                .lock()
                .expect("lock")
                .state()
        };
        assert_eq!(state(0), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..50 {
            service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("response");
        }
        assert_eq!(
            calls.lock().expect("lock").get(&1).copied().unwrap_or(0),
            3,
            "exactly one half-open probe"
        );
        assert_eq!(state(0), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_that_never_answers_is_ejected_by_timeouts() {
        use crate::layers::timeout::{TimeoutConfig, TimeoutLayer};
        // Threshold 1: p2c alone steers away from the slow endpoint after its first timeout
        // (peak EWMA); this isolates the ejection.
        let outlier = OutlierDetectionConfig {
            consecutive_5xx: 1,
            ..OutlierDetectionConfig::default()
        };
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1), addr(2)],
            LoadBalancerConfig::default(),
            Some(outlier),
        ));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let black_hole = HashMap::from([(1, Duration::from_secs(3600))]);
        let balanced = ProxyService::new(BalanceLayer::new(set.clone()).layer(fake(
            black_hole,
            HashMap::new(),
            calls.clone(),
        )));
        let service = TimeoutLayer::new(TimeoutConfig {
            after: Duration::from_millis(100),
            which: "timeouts.backendRequest",
        })
        .layer(balanced);
        let mut timeouts = 0;
        for _ in 0..40 {
            // The deadline reaches the balancer in the request's context.
            let request = crate::layers::testing::request_in_context("/");
            match service.clone().oneshot(request).await {
                Ok(_) => {}
                Err(ProxyError::Timeout { which, .. }) => {
                    assert_eq!(which, "timeouts.backendRequest");
                    timeouts += 1;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(timeouts, 1, "the first timeout ejects the black hole");
        let endpoints = set.endpoints();
        let circuit = endpoints[0].circuit.as_ref().expect("circuit");
        assert_eq!(circuit.lock().expect("lock").state(), CircuitState::Open);
        assert!(
            set.endpoints()
                .iter()
                .all(|e| e.in_flight.load(Ordering::SeqCst) == 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_keeps_endpoints_in_service() {
        let outlier = OutlierDetectionConfig {
            consecutive_5xx: 1,
            max_ejection_percent: 50,
            ..OutlierDetectionConfig::default()
        };
        let addrs: Vec<_> = (1..=4).map(addr).collect();
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &addrs,
            LoadBalancerConfig::default(),
            Some(outlier),
        ));
        // Every endpoint fails: only half of them may be ejected.
        let all_fail = (1..=4).map(|p| (p, 503)).collect();
        let service = BalanceLayer::new(set.clone()).layer(fake(
            HashMap::new(),
            all_fail,
            Arc::new(Mutex::new(HashMap::new())),
        ));
        for _ in 0..50 {
            let response = service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("never all ejected");
            assert_eq!(response.status(), 503);
        }
        let open = set
            .endpoints()
            .iter()
            .filter(|e| {
                e.circuit
                    .as_ref()
                    .expect("circuit")
                    .lock()
                    .expect("lock")
                    .state()
                    == CircuitState::Open
            })
            .count();
        assert_eq!(open, 2);
    }

    #[test]
    fn endpoints_already_tried_do_not_count_as_out_of_service() {
        use metrics_util::debugging::DebuggingRecorder;
        // Three endpoints in service, panic threshold 50 %: after two failovers the third is
        // chosen through its circuit (a ticket), not in panic mode.
        let outlier = OutlierDetectionConfig {
            panic_threshold: 50,
            ..OutlierDetectionConfig::default()
        };
        let set = EndpointSet::new(
            "b".into(),
            &[addr(1), addr(2), addr(3)],
            LoadBalancerConfig::default(),
            Some(outlier),
        );
        let endpoints = set.endpoints();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (third, none) = metrics::with_local_recorder(&recorder, || {
            (
                set.choose(&endpoints, &[0, 1]),
                set.choose(&endpoints, &[0, 1, 2]),
            )
        });
        let (index, ticket) = third.expect("the untried endpoint");
        assert_eq!(index, 2);
        assert!(ticket.is_some(), "chosen in panic mode");
        assert!(none.is_none(), "every endpoint tried");
        assert!(
            snapshotter.snapshot().into_vec().is_empty(),
            "panic routing counted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn panic_mode_keeps_a_lone_ejected_endpoint_in_service() {
        let outlier = OutlierDetectionConfig {
            consecutive_5xx: 1,
            ..OutlierDetectionConfig::default()
        };
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1)],
            LoadBalancerConfig::default(),
            Some(outlier),
        ));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let service = BalanceLayer::new(set.clone()).layer(fake(
            HashMap::new(),
            HashMap::from([(1, 503)]),
            calls.clone(),
        ));
        for _ in 0..5 {
            assert_eq!(
                service
                    .clone()
                    .oneshot(request("/"))
                    .await
                    .expect("panic routing")
                    .status(),
                503
            );
        }
        assert_eq!(calls.lock().expect("lock").get(&1).copied(), Some(5));
        let endpoints = set.endpoints();
        let circuit = endpoints[0].circuit.as_ref().expect("circuit");
        assert_eq!(
            circuit.lock().expect("lock").state(),
            CircuitState::Open,
            "still ejected, just not refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn all_ejected_is_no_healthy_endpoint() {
        let outlier = OutlierDetectionConfig {
            consecutive_5xx: 1,
            max_ejection_percent: 100,
            panic_threshold: 0,
            ..OutlierDetectionConfig::default()
        };
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1)],
            LoadBalancerConfig::default(),
            Some(outlier),
        ));
        let service = BalanceLayer::new(set).layer(fake(
            HashMap::new(),
            HashMap::from([(1, 503)]),
            Arc::new(Mutex::new(HashMap::new())),
        ));
        assert_eq!(
            service
                .clone()
                .oneshot(request("/"))
                .await
                .expect("response")
                .status(),
            503
        );
        let err = service.oneshot(request("/")).await.expect_err("ejected");
        assert!(matches!(err, ProxyError::NoHealthyEndpoint { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_reopens_the_circuit() {
        let outlier = OutlierDetectionConfig {
            consecutive_5xx: 1,
            base_ejection_time: GatewayDuration(Duration::from_secs(1)),
            ..OutlierDetectionConfig::default()
        };
        let set = Arc::new(EndpointSet::new(
            "b".into(),
            &[addr(1)],
            LoadBalancerConfig::default(),
            Some(outlier),
        ));
        let service = BalanceLayer::new(set.clone()).layer(fake(
            HashMap::from([(1, Duration::from_secs(10))]),
            HashMap::from([(1, 500)]),
            Arc::new(Mutex::new(HashMap::new())),
        ));
        service
            .clone()
            .oneshot(request("/"))
            .await
            .expect("response");
        tokio::time::advance(Duration::from_secs(1)).await;
        // The probe is dropped by a timeout: the circuit must not stay half-open forever.
        let _ = tokio::time::timeout(
            Duration::from_millis(10),
            service.clone().oneshot(request("/")),
        )
        .await;
        let endpoints = set.endpoints();
        let circuit = endpoints[0].circuit.as_ref().expect("circuit");
        assert_eq!(circuit.lock().expect("lock").state(), CircuitState::Open);
        assert_eq!(set.endpoints()[0].in_flight.load(Ordering::SeqCst), 0);
    }
}
