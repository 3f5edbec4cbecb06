//! Metric descriptions. Every metric is documented in docs/metrics.md.

/// Registers help texts for every metric the agent exports.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "weft_capture_decisions_total",
        "Capture decisions made by the kernel programs, by program and verdict (read from per-CPU counters at scrape time)."
    );
    describe_counter!(
        "weft_capture_events_total",
        "Capture decisions reported through the event ring buffer, by program and verdict."
    );
    describe_counter!(
        "weft_tcp_connections_opened_total",
        "Captured connections the agent started forwarding, by direction."
    );
    describe_counter!(
        "weft_tcp_connections_closed_total",
        "Forwarded connections that ended, by direction and close reason (eof, reset, error)."
    );
    describe_counter!(
        "weft_tcp_sent_bytes_total",
        "Bytes forwarded from the connection's initiator to its destination, by direction."
    );
    describe_counter!(
        "weft_tcp_received_bytes_total",
        "Bytes forwarded from the destination back to the initiator, by direction."
    );
    describe_counter!(
        "weft_connections_rejected_total",
        "Captured connections refused before forwarding, by direction and reason."
    );
    describe_counter!(
        "weft_accept_errors_total",
        "Errors accepting captured connections (e.g. out of file descriptors), by direction."
    );
    describe_counter!(
        "weft_config_rejected_total",
        "Configurations rejected as invalid (the last good one stays in force)."
    );
    describe_counter!(
        "weft_controller_reconnects_total",
        "Times the config stream to the controller ended and the agent scheduled a reconnect."
    );
    describe_gauge!(
        "weft_certificate_expiry_timestamp_seconds",
        "Expiry of the current workload certificate, Unix seconds, by SPIFFE identity."
    );
    describe_counter!(
        "weft_certificate_renewals_total",
        "Workload certificate renewals, by result (ok, error)."
    );
    describe_gauge!(
        "weft_enrolled_pods",
        "Pods currently enrolled on this node."
    );
    describe_gauge!(
        "weft_enrolment_errors",
        "Pods that should be enrolled but are not (see /config_dump for why)."
    );
}
