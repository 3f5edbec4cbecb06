//! The kernel side of capture, as the agent sees it: loading and attaching the eBPF programs,
//! writing the maps that say which pods are enrolled and what they exclude, recovering original
//! destinations, and reading capture decisions back.
//!
//! Nothing here is pinned: every program, link and map lives exactly as long as the agent
//! process holds its file descriptors, so an agent that exits (or crashes) leaves nothing
//! attached, and a restarted agent starts from a clean slate.

use std::collections::HashMap as StdHashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf, SockHash};
use aya::programs::links::CgroupAttachMode;
use aya::programs::sk_lookup::SkLookupLinkId;
use aya::programs::{CgroupSockAddr, ProgramError, SkLookup, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};
use ipnet::IpNet;
use weft_api::Exclusions;
use weft_ebpf_common::{
    self as common, Addr, CidrKey, Config, IpKey, IpPod, OrigDst, PodInfo, PortKey, TupleKey,
};
use weft_netns::NetNs;

/// The compiled kernel programs, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));

/// Errors from loading, attaching and map updates. Each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "loading the eBPF object failed: {0} (the agent needs CAP_BPF/CAP_SYS_ADMIN and a kernel with BTF, 5.15+)"
    )]
    Load(#[from] EbpfError),
    #[error("program {name} is missing from the eBPF object (agent built against other programs?)")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object (agent built against other programs?)")]
    MissingMap { name: &'static str },
    #[error("map {name} has an unexpected type or layout: {source}")]
    MapType {
        name: &'static str,
        source: MapError,
    },
    #[error("loading program {name} into the kernel failed: {source}")]
    ProgramLoad {
        name: &'static str,
        source: ProgramError,
    },
    #[error(
        "attaching {name} to {target} failed: {source} (is cgroup v2 mounted there? another agent's programs do not conflict)"
    )]
    Attach {
        name: &'static str,
        target: String,
        source: ProgramError,
    },
    #[error("no cgroup v2 mount found in /proc/self/mountinfo; mount one or pass --cgroup-root")]
    NoCgroup2,
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup { path: PathBuf, source: io::Error },
    #[error("updating map {map} for pod {pod}: {source}")]
    MapUpdate {
        map: &'static str,
        pod: String,
        source: MapError,
    },
    #[error("attaching sk_lookup to pod {pod}'s network namespace failed: {source}")]
    SkLookupAttach { pod: String, source: ProgramError },
}

/// Everything a map update needs to know about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCapture {
    pub pod_id: u32,
    /// `namespace/name`, for errors and events.
    pub name: String,
    pub netns_cookie: u64,
    pub ip4: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub opted_out: bool,
    pub exclusions: Exclusions,
}

/// A capture decision read from the ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent(pub common::CaptureEvent);

/// Handles on the loaded programs and maps.
pub struct Capture {
    ebpf: Ebpf,
    netns_pods: HashMap<MapData, u64, PodInfo>,
    ip_pods: HashMap<MapData, IpKey, IpPod>,
    pod_sockets: SockHash<MapData, u32>,
    excluded_ports: HashMap<MapData, PortKey, u8>,
    excluded_cidrs: LpmTrie<MapData, CidrKey, u8>,
    counters: PerCpuArray<MapData, u64>,
    sk_lookup_links: StdHashMap<u32, SkLookupLinkId>,
    cgroup: PathBuf,
}

/// The original-destination map, shared with the data path (lookups happen per connection).
pub struct OrigDstMap(Mutex<HashMap<MapData, TupleKey, OrigDst>>);

/// Options for [`Capture::load`].
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// cgroup v2 directory to attach connect4/6 and sock_ops to (the root, normally).
    pub cgroup_root: Option<PathBuf>,
    /// Socket mark of the agent's own sockets.
    pub socket_mark: u32,
    /// Emit ring-buffer events for non-enrolled connects too.
    pub trace_unenrolled: bool,
    /// Kernel-side log level for aya-log (0 off .. 5 trace).
    pub ebpf_log_level: u8,
}

/// The ring buffer of capture decisions.
pub type EventRing = RingBuf<MapData>;

/// Reader of the programs' aya-log messages.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// What [`Capture::load`] hands out: the control handle, the data-path original-destination
/// map, the decision ring buffer and the kernel log reader (if the object logs).
pub struct Loaded {
    pub capture: Capture,
    pub orig: OrigDstMap,
    pub events: EventRing,
    pub logger: Option<KernelLogger>,
}

impl Capture {
    /// Loads the embedded object, attaches connect4/6 and sock_ops at the cgroup root, and
    /// returns the capture handle, the original-destination map, the event ring and the
    /// kernel log reader.
    pub fn load(opts: &CaptureOptions) -> Result<Loaded, CaptureError> {
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &opts.ebpf_log_level, false)
            .load(EBPF_OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "kernel-side logging unavailable");
                None
            }
        };
        let cgroup = match &opts.cgroup_root {
            Some(p) => p.clone(),
            None => find_cgroup2_mount()?.ok_or(CaptureError::NoCgroup2)?,
        };
        let cgroup_file = File::open(&cgroup).map_err(|source| CaptureError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;

        // Configuration first, so the programs never run with a zero mark. (Maps are only
        // borrowed until every program is loaded: a taken and dropped map would close the fd
        // the programs still refer to.)
        {
            let name = common::maps::CONFIG;
            let map = ebpf
                .map_mut(name)
                .ok_or(CaptureError::MissingMap { name })?;
            let mut config: Array<_, Config> =
                Array::try_from(map).map_err(|source| CaptureError::MapType { name, source })?;
            let flags = if opts.trace_unenrolled {
                common::CONFIG_TRACE_UNENROLLED
            } else {
                0
            };
            config
                .set(
                    0,
                    Config {
                        agent_mark: opts.socket_mark,
                        flags,
                    },
                    0,
                )
                .map_err(|source| CaptureError::MapType {
                    name: common::maps::CONFIG,
                    source,
                })?;
        }

        for name in [common::programs::CONNECT4, common::programs::CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| CaptureError::ProgramLoad { name, source })?;
            prog.attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|source| CaptureError::Attach {
                    name,
                    target: cgroup.display().to_string(),
                    source,
                })?;
        }
        {
            let name = common::programs::SOCK_OPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| CaptureError::ProgramLoad { name, source })?;
            prog.attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|source| CaptureError::Attach {
                    name,
                    target: cgroup.display().to_string(),
                    source,
                })?;
        }
        {
            let name = common::programs::SK_LOOKUP;
            let prog: &mut SkLookup = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| CaptureError::ProgramLoad { name, source })?;
        }

        let orig = OrigDstMap(Mutex::new(take_map(
            &mut ebpf,
            common::maps::ORIG_BY_TUPLE,
        )?));
        let events: EventRing = take_map(&mut ebpf, common::maps::EVENTS)?;
        let capture = Self {
            netns_pods: take_map(&mut ebpf, common::maps::NETNS_PODS)?,
            ip_pods: take_map(&mut ebpf, common::maps::IP_PODS)?,
            pod_sockets: take_map(&mut ebpf, common::maps::POD_SOCKETS)?,
            excluded_ports: take_map(&mut ebpf, common::maps::EXCLUDED_PORTS)?,
            excluded_cidrs: take_map(&mut ebpf, common::maps::EXCLUDED_CIDRS)?,
            counters: take_map(&mut ebpf, common::maps::COUNTERS)?,
            sk_lookup_links: StdHashMap::new(),
            ebpf,
            cgroup,
        };
        Ok(Loaded {
            capture,
            orig,
            events,
            logger,
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Writes (or rewrites) a pod's entries: flags, addresses and exclusions. Capture for the
    /// pod starts (or changes) the moment this returns.
    pub fn upsert_pod(
        &mut self,
        pod: &PodCapture,
        previous: Option<&PodCapture>,
    ) -> Result<(), CaptureError> {
        let mut flags = 0;
        if pod.ip4.is_some() {
            flags |= common::POD_HAS_IP4;
        }
        if pod.ip6.is_some() {
            flags |= common::POD_HAS_IP6;
        }
        if pod.opted_out {
            flags |= common::POD_OPTED_OUT;
        }
        let upd = |map: &'static str, pod: &PodCapture| {
            let name = pod.name.clone();
            move |source| CaptureError::MapUpdate {
                map,
                pod: name,
                source,
            }
        };
        // Exclusions before the pod entry, so a new pod never runs without them. On an update
        // the new set is written first and only entries no longer wanted are removed after, so
        // there is no window without exclusions.
        for (ports, dir) in [
            (&pod.exclusions.outbound_ports, common::DIR_OUTBOUND),
            (&pod.exclusions.inbound_ports, common::DIR_INBOUND),
        ] {
            for port in ports {
                self.excluded_ports
                    .insert(port_key(pod.pod_id, *port, dir), 1, 0)
                    .map_err(upd(common::maps::EXCLUDED_PORTS, pod))?;
            }
        }
        for (cidrs, dir) in [
            (&pod.exclusions.outbound_cidrs, common::DIR_OUTBOUND),
            (&pod.exclusions.inbound_cidrs, common::DIR_INBOUND),
        ] {
            for cidr in cidrs {
                self.excluded_cidrs
                    .insert(&cidr_key(pod.pod_id, cidr, dir), 1, 0)
                    .map_err(upd(common::maps::EXCLUDED_CIDRS, pod))?;
            }
        }
        if let Some(prev) = previous {
            let stale = Exclusions {
                outbound_ports: minus(
                    &prev.exclusions.outbound_ports,
                    &pod.exclusions.outbound_ports,
                ),
                inbound_ports: minus(
                    &prev.exclusions.inbound_ports,
                    &pod.exclusions.inbound_ports,
                ),
                outbound_cidrs: minus(
                    &prev.exclusions.outbound_cidrs,
                    &pod.exclusions.outbound_cidrs,
                ),
                inbound_cidrs: minus(
                    &prev.exclusions.inbound_cidrs,
                    &pod.exclusions.inbound_cidrs,
                ),
            };
            self.remove_exclusions(&PodCapture {
                exclusions: stale,
                ..prev.clone()
            });
        }
        let info = PodInfo {
            pod_id: pod.pod_id,
            flags,
            ip4: pod.ip4.map(|a| u32::from_ne_bytes(a.octets())).unwrap_or(0),
            ip6: pod.ip6.map(|a| addr_of(IpAddr::V6(a))).unwrap_or([0; 4]),
        };
        for ip in pod_ips(pod) {
            self.ip_pods
                .insert(
                    IpKey { addr: addr_of(ip) },
                    IpPod {
                        pod_id: pod.pod_id,
                        flags,
                    },
                    0,
                )
                .map_err(upd(common::maps::IP_PODS, pod))?;
        }
        self.netns_pods
            .insert(pod.netns_cookie, info, 0)
            .map_err(upd(common::maps::NETNS_PODS, pod))?;
        Ok(())
    }

    /// Registers the pod's inbound listener and attaches sk_lookup to its network namespace.
    pub fn attach_inbound(
        &mut self,
        pod: &PodCapture,
        netns: &NetNs,
        listener: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        self.pod_sockets
            .insert(pod.pod_id, listener.as_raw_fd(), 0)
            .map_err(|source| CaptureError::MapUpdate {
                map: common::maps::POD_SOCKETS,
                pod: pod.name.clone(),
                source,
            })?;
        if self.sk_lookup_links.contains_key(&pod.pod_id) {
            return Ok(());
        }
        let prog: &mut SkLookup = program(&mut self.ebpf, common::programs::SK_LOOKUP)?;
        let link =
            prog.attach(netns.fd().as_fd())
                .map_err(|source| CaptureError::SkLookupAttach {
                    pod: pod.name.clone(),
                    source,
                })?;
        self.sk_lookup_links.insert(pod.pod_id, link);
        Ok(())
    }

    /// Removes every trace of a pod: capture stops at once (map entries first), then the
    /// sk_lookup link is detached.
    pub fn remove_pod(&mut self, pod: &PodCapture) {
        let _ = self.netns_pods.remove(&pod.netns_cookie);
        for ip in pod_ips(pod) {
            let _ = self.ip_pods.remove(&IpKey { addr: addr_of(ip) });
        }
        self.remove_exclusions(pod);
        let _ = self.pod_sockets.remove(&pod.pod_id);
        if let Some(link) = self.sk_lookup_links.remove(&pod.pod_id)
            && let Ok(prog) = program::<SkLookup>(&mut self.ebpf, common::programs::SK_LOOKUP)
            && let Err(e) = prog.detach(link)
        {
            tracing::warn!(pod = %pod.name, error = %e, "detaching sk_lookup failed");
        }
    }

    fn remove_exclusions(&mut self, pod: &PodCapture) {
        for (ports, dir) in [
            (&pod.exclusions.outbound_ports, common::DIR_OUTBOUND),
            (&pod.exclusions.inbound_ports, common::DIR_INBOUND),
        ] {
            for port in ports {
                let _ = self
                    .excluded_ports
                    .remove(&port_key(pod.pod_id, *port, dir));
            }
        }
        for (cidrs, dir) in [
            (&pod.exclusions.outbound_cidrs, common::DIR_OUTBOUND),
            (&pod.exclusions.inbound_cidrs, common::DIR_INBOUND),
        ] {
            for cidr in cidrs {
                let _ = self.excluded_cidrs.remove(&cidr_key(pod.pod_id, cidr, dir));
            }
        }
    }

    /// Sums the per-CPU decision counters: `(program, verdict, count)` for every non-zero slot.
    pub fn decision_counts(&self) -> Vec<(u8, u8, u64)> {
        let mut out = Vec::new();
        for slot in 0..common::COUNTER_SLOTS {
            if let Ok(values) = self.counters.get(&slot, 0) {
                let total: u64 = values.iter().sum();
                if total > 0 {
                    out.push((
                        (slot / common::VERDICTS) as u8,
                        (slot % common::VERDICTS) as u8,
                        total,
                    ));
                }
            }
        }
        out
    }

    /// Number of entries in the pod maps (for leak checks and /config_dump).
    pub fn map_sizes(&self) -> StdHashMap<&'static str, usize> {
        let mut m = StdHashMap::new();
        m.insert(common::maps::NETNS_PODS, self.netns_pods.keys().count());
        m.insert(common::maps::IP_PODS, self.ip_pods.keys().count());
        m.insert(
            common::maps::EXCLUDED_PORTS,
            self.excluded_ports.keys().count(),
        );
        m.insert(
            common::maps::EXCLUDED_CIDRS,
            self.excluded_cidrs.keys().count(),
        );
        m
    }
}

impl OrigDstMap {
    /// Takes (looks up and deletes) the original destination of a captured connection, given
    /// the pod's netns cookie and the accepted socket's peer address.
    pub fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<(SocketAddr, u32)> {
        let key = TupleKey {
            netns_cookie,
            addr: addr_of(peer.ip()),
            port: u32::from(peer.port()),
            _pad: 0,
        };
        let mut map = match self.0.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some((SocketAddr::new(ip_of(&orig.addr), orig.port), orig.pod_id))
    }

    /// Number of entries (for leak checks).
    pub fn len(&self) -> usize {
        match self.0.lock() {
            Ok(m) => m.keys().count(),
            Err(poisoned) => poisoned.into_inner().keys().count(),
        }
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn minus<T: PartialEq + Clone>(a: &[T], b: &[T]) -> Vec<T> {
    a.iter().filter(|x| !b.contains(x)).cloned().collect()
}

/// Parses a ring-buffer record.
pub fn parse_event(bytes: &[u8]) -> Option<common::CaptureEvent> {
    if bytes.len() < std::mem::size_of::<common::CaptureEvent>() {
        return None;
    }
    // SAFETY: length checked; CaptureEvent is plain old data valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<common::CaptureEvent>()) })
}

fn pod_ips(pod: &PodCapture) -> impl Iterator<Item = IpAddr> {
    pod.ip4
        .map(IpAddr::V4)
        .into_iter()
        .chain(pod.ip6.map(IpAddr::V6))
}

fn port_key(pod_id: u32, port: u16, direction: u8) -> PortKey {
    PortKey {
        pod_id,
        port,
        direction,
        _pad: 0,
    }
}

fn cidr_key(pod_id: u32, cidr: &IpNet, direction: u8) -> Key<CidrKey> {
    let (addr, prefix) = match cidr {
        IpNet::V4(n) => (
            addr_of(IpAddr::V4(n.network())),
            96 + u32::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (addr_of(IpAddr::V6(n.network())), u32::from(n.prefix_len())),
    };
    Key::new(
        common::CIDR_KEY_FIXED_BITS + prefix,
        CidrKey {
            pod_id_be: pod_id.to_be(),
            direction_be: u32::from(direction).to_be(),
            addr,
        },
    )
}

/// An address in the kernel's 16-byte network-order form (IPv4 v4-mapped).
pub fn addr_of(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    let o = v6.octets();
    let mut out = [0u32; 4];
    for (i, w) in out.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
    }
    out
}

/// The inverse of [`addr_of`]: v4-mapped addresses come back as IPv4.
pub fn ip_of(addr: &Addr) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o).to_canonical()
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, CaptureError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(CaptureError::MissingMap { name })?;
    M::try_from(map).map_err(|source| CaptureError::MapType { name, source })
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(CaptureError::MissingProgram { name })?;
    prog.try_into()
        .map_err(|source| CaptureError::ProgramLoad { name, source })
}

/// Finds the cgroup v2 mount point from /proc/self/mountinfo.
pub fn find_cgroup2_mount() -> Result<Option<PathBuf>, CaptureError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
        CaptureError::OpenCgroup {
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        }
    })?;
    Ok(parse_cgroup2_mount(&text))
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // Fields: id parent major:minor root mount-point options [optional...] - fstype source superopts
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let text = "30 23 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n\
                    32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("garbage\n"), None);
    }

    #[test]
    fn addresses_round_trip() {
        for ip in ["198.18.1.11", "fd77:6566:1::b", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(ip_of(&addr_of(ip)), ip);
        }
        let a = addr_of("198.18.1.11".parse().expect("ip"));
        assert_eq!(a, common::v4_mapped(u32::from_ne_bytes([198, 18, 1, 11])));
    }

    #[test]
    fn cidr_keys_cover_fixed_bits_and_prefix() {
        let k = cidr_key(7, &"10.0.0.0/8".parse().expect("cidr"), common::DIR_INBOUND);
        let prefix = k.prefix_len();
        assert_eq!(prefix, 64 + 96 + 8);
        let k = cidr_key(
            7,
            &"2001:db8::/32".parse().expect("cidr"),
            common::DIR_OUTBOUND,
        );
        assert_eq!(k.prefix_len(), 64 + 32);
    }

    #[test]
    fn short_events_are_rejected() {
        assert!(parse_event(&[0u8; 8]).is_none());
        let n = std::mem::size_of::<common::CaptureEvent>();
        assert!(parse_event(&vec![0u8; n]).is_some());
    }
}
