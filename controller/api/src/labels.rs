//! Every label and annotation Weft reads. Documented in docs/configuration.md.

/// Namespace label: `enabled` puts the namespace's pods in the mesh. On a pod: `disabled` opts
/// that one pod out (its traffic is never captured).
pub const MESH: &str = "weft.dev/mesh";
/// Value of [`MESH`] that enrols a namespace.
pub const MESH_ENABLED: &str = "enabled";
/// Value of [`MESH`] that opts a pod out.
pub const MESH_DISABLED: &str = "disabled";

/// Pod annotation: comma-separated destination ports never captured on the way out
/// (e.g. `"5432,6379"`).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "weft.dev/exclude-outbound-ports";
/// Pod annotation: comma-separated local ports never captured on the way in (e.g. `"9090"`).
pub const EXCLUDE_INBOUND_PORTS: &str = "weft.dev/exclude-inbound-ports";
/// Pod annotation: comma-separated destination CIDRs never captured on the way out
/// (e.g. `"203.0.113.0/24,2001:db8::/32"`).
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "weft.dev/exclude-outbound-cidrs";
/// Pod annotation: comma-separated source CIDRs whose connections are never captured on the way
/// in (e.g. `"198.18.0.0/15"`).
pub const EXCLUDE_INBOUND_CIDRS: &str = "weft.dev/exclude-inbound-cidrs";

/// Namespace label or pod annotation: `strict` refuses plaintext arriving from outside the mesh
/// at the workload (only mutual-TLS tunnels from other meshed workloads get in); `permissive`
/// (the default) lets it through. A pod annotation overrides its namespace's label.
pub const MTLS: &str = "weft.dev/mtls";
/// Value of [`MTLS`]: refuse plaintext.
pub const MTLS_STRICT: &str = "strict";
/// Value of [`MTLS`]: accept plaintext from outside the mesh (the default).
pub const MTLS_PERMISSIVE: &str = "permissive";

/// Namespace or Service label: the name of the waypoint (the waypoint's Service, in the same
/// namespace) that traffic to the namespace's services — or to this one service — goes
/// through. On a Service, [`USE_WAYPOINT_NONE`] opts it out of its namespace's waypoint.
pub const USE_WAYPOINT: &str = "weft.dev/use-waypoint";
/// Value of [`USE_WAYPOINT`] on a Service: never through a waypoint.
pub const USE_WAYPOINT_NONE: &str = "none";
/// Pod and Service label set by `weftctl waypoint deploy`: this pod is a waypoint (the node
/// agent never captures its traffic: it speaks HBONE itself), this Service is a waypoint's (it
/// is never itself bound to a waypoint). The value is the waypoint's name.
pub const WAYPOINT: &str = "weft.dev/waypoint";

/// Whether `v` is a DNS-1123 label (a Kubernetes object name such as a Service or a
/// namespace): 1-63 lowercase letters, digits and `-`, not starting or ending with `-`.
pub fn is_dns_label(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-')
}
