//! Metric names and help texts.

/// Buckets of `weft_waypoint_request_duration_seconds`: 100 µs to 60 s (a waypoint adds a
/// few hundred µs, so p50 needs sub-millisecond buckets; p99.9 of slow backends needs seconds).
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Buckets of `weft_waypoint_request_bytes` and `weft_waypoint_response_bytes`: 0 B to 64 MiB.
pub const SIZE_BUCKETS: &[f64] = &[
    0.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// Registers help texts for every metric the waypoint exports.
pub fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        "weft_waypoint_requests_total",
        "Requests answered, counted when the response ends: reporter=\"waypoint\", listener, route, backend (empty when none was chosen), code, grpc_status, source and destination workload/namespace, source_principal, destination_service."
    );
    describe_histogram!(
        "weft_waypoint_request_duration_seconds",
        "Time from request headers to the end of the response, seconds (same labels as weft_waypoint_requests_total)."
    );
    describe_histogram!(
        "weft_waypoint_request_bytes",
        "Request body size, bytes (same labels as weft_waypoint_requests_total)."
    );
    describe_histogram!(
        "weft_waypoint_response_bytes",
        "Response body size as sent to the client, bytes (same labels as weft_waypoint_requests_total)."
    );
    describe_counter!("weft_waypoint_retries_total", "Retries sent, by route.");
    describe_counter!(
        "weft_waypoint_retry_budget_exhausted_total",
        "Retries skipped because the route's retry budget was spent."
    );
    describe_counter!(
        "weft_waypoint_faults_total",
        "Faults injected, by kind (delay, abort)."
    );
    describe_counter!(
        "weft_waypoint_rate_limited_total",
        "Requests answered 429, by route and limit (rateLimit.route, rateLimit.perSource)."
    );
    describe_counter!(
        "weft_waypoint_circuit_transitions_total",
        "Outlier detection state changes of an endpoint, by backend, endpoint, from and to (closed, open, half-open)."
    );
    describe_counter!(
        "weft_waypoint_circuit_overflow_total",
        "Requests refused because a backend's circuitBreaker limits were full."
    );
    describe_counter!(
        "weft_waypoint_protocol_detected_total",
        "Mesh tunnels by protocol (http1, http2, tcp) and how it was chosen (declared, detected, timeout)."
    );
    describe_counter!(
        "weft_waypoint_tcp_connections_total",
        "Opaque TCP connections by Service and result (ok, no_endpoint, connect_failed, denied)."
    );
    describe_counter!(
        "weft_waypoint_tcp_received_bytes_total",
        "Opaque TCP bytes received from clients (toward the Service), by Service."
    );
    describe_counter!(
        "weft_waypoint_tcp_sent_bytes_total",
        "Opaque TCP bytes sent to clients (from the Service), by Service."
    );
    describe_counter!(
        "weft_waypoint_hbone_tls_config_builds_total",
        "HBONE TLS server configs built (once per certificate generation and trust bundle)."
    );
    describe_counter!(
        "weft_waypoint_access_log_dropped_total",
        "Access log lines dropped because the sink was slower than the traffic."
    );
}
