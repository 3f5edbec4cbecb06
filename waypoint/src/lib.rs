//! # weft-waypoint
//!
//! Weft's waypoint: a per-namespace L7 proxy (issue #6), configured from a YAML file and, in
//! mesh mode, from the controller (Services bound to it, their endpoints and identities,
//! HTTPRoutes/GRPCRoutes, AuthorizationPolicies); it terminates HBONE (mTLS on port 15008) and
//! sends through HBONE to the chosen endpoint. User documentation: docs/waypoint.md.
//!
//! ## What exists
//!
//! * **Config** ([`config`]): listeners with Gateway API HTTPRoute-style routes (`hostnames`,
//!   `matches` on path `Exact` / `PathPrefix` / `RegularExpression`, exact headers, exact query
//!   parameters and method; `filters` `RequestHeaderModifier`, `ResponseHeaderModifier`,
//!   `URLRewrite`, `RequestRedirect`; weighted `backendRefs`; `timeouts.request` and
//!   `timeouts.backendRequest`), Weft extensions per route (`retry`, `fault`, `rateLimit`) and
//!   per backend (`circuitBreaker`, `outlierDetection`, `loadBalancer`, `protocol`). Validation
//!   reports every problem with its field path (`listeners[0].routes[2].retry.attempts: ...`).
//! * **Route table** ([`route`]): compiled once per config version, Gateway API precedence
//!   (hostname specificity, then exact > longest prefix > regex, then method, header count,
//!   query count, declaration order).
//! * **L7 layers** ([`layers`]), each a tower layer with its config and unit tests:
//!   * [`layers::timeout`]: `timeouts.request` / `timeouts.backendRequest` (504); the deadline
//!     is published so the balancer charges a timed-out endpoint.
//!   * [`layers::retry`]: attempts, exponential backoff with full jitter, `retryOn`
//!     (connect-failure, reset, 5xx, 503, gRPC codes), a sliding-window retry budget;
//!     `x-weft-attempt` on each attempt.
//!   * [`layers::fault`]: delay and abort on a percentage of requests.
//!   * [`layers::ratelimit`]: token buckets per route and per source identity (header or peer
//!     IP, memory bounded), 429 with `Retry-After`.
//!   * [`layers::circuit`]: per-endpoint outlier detection (closed -> open -> half-open ->
//!     closed, `weft_waypoint_circuit_transitions_total`, growing ejections,
//!     `maxEjectionPercent`, Envoy's panic threshold) and per-backend concurrent/pending
//!     request limits (held until the response body ends);
//!     `maxConnections` is enforced by the backend's connection pool ([`pool`]).
//!   * [`layers::headers`]: request/response header modifiers.
//!   * [`layers::split`]: weighted backend choice.
//!   * [`layers::balance`]: power of two choices over a peak EWMA of latency (decaying while
//!     unmeasured) times requests in flight, skipping ejected endpoints, probing recovered ones.
//!   * [`layers::accesslog`]: one JSON line per request (`--access-log off|stdout|PATH`,
//!     stdout by default), outermost on each connection, through a bounded queue to a writer
//!     thread (lines dropped and counted when the sink is slow).
//! * **Mesh mode** ([`mesh`]): HBONE termination, Services as listeners and backends; per
//!   tunnel, protocol selection ([`mesh::detect`]: the port's `appProtocol`, else the first
//!   bytes within `--protocol-detect-timeout`) and an opaque TCP fallback ([`mesh::tcp`])
//!   through HBONE to an endpoint.
//! * **Proxy** ([`proxy`]): hyper server (HTTP/1.1 and HTTP/2 prior knowledge through the
//!   hyper-util auto builder) per listener; a pooled hyper client per backend (HTTP/1.1 or h2c);
//!   404 naming the request when no route matches; `x-forwarded-for` / `x-forwarded-proto`;
//!   a 30 s limit on reading request headers; request bodies buffered, or streamed when they
//!   go on ([`proxy::STREAM_AFTER`]); golden metrics
//!   `weft_waypoint_requests_total` and `weft_waypoint_request_duration_seconds` by listener,
//!   route, backend and code ([`metrics`]); config reload (`Waypoint::reload`, SIGHUP in the
//!   binary) that swaps compiled routes atomically and keeps the state (pools, circuits,
//!   buckets, budgets) of what did not change; graceful drain
//!   ([`proxy::serve_until`], SIGTERM in the binary).
//! * **Binary** `weft-waypoint --config waypoint.yaml [--metrics-address 127.0.0.1:15090]
//!   [--shutdown-delay-seconds 0] [--drain-seconds 10] [--check]`: serves the listeners,
//!   Prometheus metrics on `/metrics`, readiness on `/ready`.
//!   `waypoint.example.yaml` shows every field.
//!
//! Tests: unit tests next to each module (layers against `tower::service_fn`, paused time);
//! `tests/proxy.rs` runs the proxy between real loopback clients and backends (routing, split
//! ratios, retries, timeouts, rate limits, faults, HTTP/2, filters, connection limits, reload,
//! drain); `tests/metrics.rs` checks the golden metrics; `tests/binary.rs` the binary.
//!
//! * **Workers** ([`workers`]): thread per core, `SO_REUSEPORT` sockets and pools per worker.
//!
//! ## What does not exist yet
//!
//! * Success-rate (statistical) outlier ejection; only consecutive failures eject.
//! * Retries of streamed requests: a request body that goes on arriving (pauses for
//!   [`proxy::STREAM_AFTER`]) or outgrows `maxRequestBodyBytes` is forwarded as it comes and
//!   not retried (only its connect failure goes to another endpoint), and the rest of its body
//!   has no idle limit of its own. Timeouts cover the time to the response headers, not the
//!   bodies. Upgrades (WebSocket) and CONNECT are answered 501.
//! * Header/query matches other than `Exact` (query parameters are percent-decoded first);
//!   `RequestMirror`; DNS names as endpoints (only `ip:port`).

pub mod body;
pub mod config;
pub mod duration;
pub mod error;
pub mod filters;
pub mod forward;
pub mod golden;
pub mod layers;
pub mod mesh;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod route;
pub mod workers;
