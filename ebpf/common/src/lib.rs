//! Types shared by Weft's kernel programs and the node agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and is the exact
//! layout of an eBPF map key, map value or ring-buffer event. Addresses are
//! always 16 bytes in network byte order: IPv4 is stored v4-mapped
//! (`::ffff:a.b.c.d`) so one key type serves both families.
#![no_std]

/// The agent's outbound listener inside every enrolled pod's network namespace.
pub const PORT_OUTBOUND: u16 = 15001;
/// The agent's inbound (plaintext) listener inside every enrolled pod's network namespace.
pub const PORT_INBOUND: u16 = 15006;
/// Reserved for the agent's HBONE (mTLS tunnel) listener inside every enrolled pod's network
/// namespace (the tunnel is not built yet; capture already leaves the port alone).
pub const PORT_HBONE: u16 = 15008;

/// Default socket mark the agent sets on its own upstream sockets; marked sockets are never
/// captured. Configurable with `weft-agent --socket-mark`.
pub const DEFAULT_SOCKET_MARK: u32 = 0x0057_4546; // "WEF"

/// `PodInfo::flags`: the pod has an IPv4 address.
pub const POD_HAS_IP4: u32 = 1;
/// `PodInfo::flags`: the pod has an IPv6 address.
pub const POD_HAS_IP6: u32 = 1 << 1;
/// `PodInfo::flags`: the pod opted out of capture (`weft.dev/mesh=disabled`).
pub const POD_OPTED_OUT: u32 = 1 << 2;

/// `Config::flags`: also emit ring-buffer events for connections of pods that are not
/// enrolled (every connect on the node; counters are kept either way).
pub const CONFIG_TRACE_UNENROLLED: u32 = 1;

/// Direction of a capture exclusion.
pub const DIR_OUTBOUND: u8 = 0;
/// Direction of a capture exclusion.
pub const DIR_INBOUND: u8 = 1;

/// Maximum entries of the original-destination maps.
pub const ORIG_DST_MAX_ENTRIES: u32 = 65_536;
/// Maximum number of enrolled pods per node.
pub const MAX_PODS: u32 = 4_096;
/// Maximum number of port exclusions per node.
pub const MAX_PORT_EXCLUSIONS: u32 = 16_384;
/// Maximum number of CIDR exclusions per node.
pub const MAX_CIDR_EXCLUSIONS: u32 = 16_384;
/// Size of the capture event ring buffer in bytes (a power of two, multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Number of slots in the per-CPU counter array: `program * VERDICTS + verdict`.
pub const COUNTER_SLOTS: u32 = PROGRAMS * VERDICTS;

/// Map names, shared so the agent and the programs cannot drift apart.
pub mod maps {
    /// netns cookie (u64) -> [`super::PodInfo`].
    pub const NETNS_PODS: &str = "NETNS_PODS";
    /// [`super::IpKey`] -> [`super::IpPod`] (sk_lookup: destination address -> pod).
    pub const IP_PODS: &str = "IP_PODS";
    /// pod id (u32) -> the pod's inbound listener socket (sk_lookup target).
    pub const POD_SOCKETS: &str = "POD_SOCKETS";
    /// [`super::PortKey`] -> u8 (present = excluded).
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// LPM trie of [`super::CidrKey`] -> u8 (present = excluded).
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    /// socket cookie (u64) -> [`super::OrigDst`], written by connect4/6.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// [`super::TupleKey`] -> [`super::OrigDst`], moved there by sock_ops once established.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// index 0 -> [`super::Config`].
    pub const CONFIG: &str = "CONFIG";
    /// Per-CPU u64 counters, indexed by `program * VERDICTS + verdict`.
    pub const COUNTERS: &str = "COUNTERS";
    /// Ring buffer of [`super::CaptureEvent`].
    pub const EVENTS: &str = "EVENTS";
}

/// Program names (function names in the object file).
pub mod programs {
    pub const CONNECT4: &str = "weft_connect4";
    pub const CONNECT6: &str = "weft_connect6";
    pub const SOCK_OPS: &str = "weft_sock_ops";
    pub const SK_LOOKUP: &str = "weft_sk_lookup";
}

/// Which program made a capture decision.
pub const PROG_CONNECT4: u8 = 0;
pub const PROG_CONNECT6: u8 = 1;
pub const PROG_SK_LOOKUP: u8 = 2;
/// Number of programs that make capture decisions.
pub const PROGRAMS: u32 = 3;

/// Capture verdicts. Stable numbers: they are map indices and event fields.
pub mod verdict {
    /// The connection was steered to the agent.
    pub const REDIRECTED: u8 = 0;
    /// The socket's network namespace (or the destination address) is not an enrolled pod.
    pub const NOT_ENROLLED: u8 = 1;
    /// The pod opted out with `weft.dev/mesh=disabled`.
    pub const OPTED_OUT: u8 = 2;
    /// The port is excluded for this pod and direction.
    pub const EXCLUDED_PORT: u8 = 3;
    /// The peer address is in an excluded CIDR for this pod and direction.
    pub const EXCLUDED_CIDR: u8 = 4;
    /// The socket carries the agent's mark (the agent's own upstream connection).
    pub const AGENT_SOCKET: u8 = 5;
    /// The destination is one of the agent's own ports.
    pub const AGENT_PORT: u8 = 6;
    /// Loopback destination (in-pod localhost traffic is never captured).
    pub const LOOPBACK: u8 = 7;
    /// Not TCP.
    pub const NOT_TCP: u8 = 8;
    /// sk_lookup: the connection comes from the pod's own address (the agent delivering to the
    /// application, or the application calling itself).
    pub const SELF: u8 = 9;
    /// sk_lookup: no inbound listener is registered for the pod.
    pub const NO_LISTENER: u8 = 10;
    /// connect4/6: the pod has no address of the socket's family to redirect to.
    pub const NO_ADDRESS: u8 = 11;
    /// A map update failed; the connection was passed through uncaptured.
    pub const ERROR: u8 = 12;

    /// Human-readable names, indexed by verdict. Used in metrics labels and the admin API.
    pub const NAMES: [&str; super::VERDICTS as usize] = [
        "redirected",
        "not_enrolled",
        "opted_out",
        "excluded_port",
        "excluded_cidr",
        "agent_socket",
        "agent_port",
        "loopback",
        "not_tcp",
        "self",
        "no_listener",
        "no_address",
        "error",
        "unused13",
        "unused14",
        "unused15",
    ];
}
/// Number of verdict slots reserved per program.
pub const VERDICTS: u32 = 16;

/// A 16-byte address in network byte order (IPv4 v4-mapped).
pub type Addr = [u32; 4];

/// Value of `NETNS_PODS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// The agent's id for the pod (key of `POD_SOCKETS`, exclusion maps).
    pub pod_id: u32,
    /// `POD_*` flags.
    pub flags: u32,
    /// The pod's IPv4 address, network byte order.
    pub ip4: u32,
    /// The pod's IPv6 address, network byte order.
    pub ip6: Addr,
}

/// Key of `IP_PODS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub addr: Addr,
}

/// Value of `IP_PODS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpPod {
    pub pod_id: u32,
    /// `POD_*` flags (only `POD_OPTED_OUT` is read).
    pub flags: u32,
}

/// Key of `EXCLUDED_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub pod_id: u32,
    /// Port in host byte order.
    pub port: u16,
    /// `DIR_OUTBOUND` or `DIR_INBOUND`.
    pub direction: u8,
    pub _pad: u8,
}

/// Data part of an `EXCLUDED_CIDRS` LPM-trie key. The trie matches bit by bit from the first
/// byte, so the prefix length of an entry is `64 + address prefix` (IPv6) or
/// `64 + 96 + address prefix` (IPv4, stored v4-mapped): the pod id and direction always match
/// exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrKey {
    /// Pod id, big-endian so the trie compares it bytewise.
    pub pod_id_be: u32,
    /// Direction (`DIR_*`) as big-endian u32.
    pub direction_be: u32,
    pub addr: Addr,
}

/// Number of fixed (always fully matched) bits at the start of a [`CidrKey`].
pub const CIDR_KEY_FIXED_BITS: u32 = 64;

/// Original destination of a captured outbound connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: u16,
    pub pod_id: u32,
}

/// Key of `ORIG_BY_TUPLE`: the client side of a captured connection, as the agent sees it as
/// the peer of the accepted socket, scoped by network namespace (every pod has its own
/// 127.0.0.1, so the address alone is ambiguous).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns_cookie: u64,
    pub addr: Addr,
    /// Port in host byte order.
    pub port: u32,
    pub _pad: u32,
}

/// Value of `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Socket mark of the agent's own sockets.
    pub agent_mark: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
}

/// A capture decision, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureEvent {
    /// `bpf_ktime_get_ns()` (monotonic, since boot).
    pub ktime_ns: u64,
    /// Network namespace cookie of the socket (0 for sk_lookup, which has none).
    pub netns_cookie: u64,
    /// Destination address as the application asked for it.
    pub dst: Addr,
    /// Source address (known to sk_lookup only; zero for connect4/6).
    pub src: Addr,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// Source port, host byte order (sk_lookup only).
    pub src_port: u16,
    /// Pod id, or `u32::MAX` when no pod matched.
    pub pod_id: u32,
    /// `PROG_*`.
    pub program: u8,
    /// `verdict::*`.
    pub verdict: u8,
    pub _pad: [u8; 6],
}

/// Converts an IPv4 address in network byte order (as read from a kernel context) into the
/// v4-mapped 16-byte form.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> Addr {
    [0, 0, 0x0000_ffff_u32.to_be(), ip4_be]
}

/// Whether a 16-byte network-order address is v4-mapped.
#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0x0000_ffff_u32.to_be()
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: every type is repr(C), Copy, has no padding holes the kernel could read
    // uninitialised (explicit `_pad` fields), and any bit pattern is valid.
    unsafe impl aya::Pod for PodInfo {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for IpPod {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for CaptureEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<PodInfo>(), 4 + 4 + 4 + 16);
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(size_of::<IpPod>(), 8);
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<CidrKey>(), 24);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<TupleKey>(), 32);
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(
            size_of::<CaptureEvent>(),
            8 + 8 + 16 + 16 + 2 + 2 + 4 + 1 + 1 + 6
        );
    }

    #[test]
    fn v4_mapped_is_network_order() {
        let ip = u32::from_ne_bytes([198, 18, 1, 2]);
        let a = v4_mapped(ip);
        let mut bytes = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 1, 2]
        );
        assert!(is_v4_mapped(&a));
    }

    #[test]
    fn verdict_names_cover_every_verdict() {
        assert_eq!(verdict::NAMES[verdict::ERROR as usize], "error");
        assert_eq!(verdict::NAMES[verdict::REDIRECTED as usize], "redirected");
    }
}
