//! The lab: a simulated multi-node, Kubernetes-like cluster on one machine, built from network
//! namespaces, veth pairs, bridges and cgroups.
//!
//! ```text
//!                      fabric netns weft-<id>-fab: bridge br0 (L2 only)
//!            port n1 ───────────────┴─────────────── port n2 ...
//!               │                                       │
//!   node netns weft-<id>-n1                    node netns weft-<id>-n2
//!   eth0 198.19.0.1/24  fd77:6566:ff::1/64     eth0 198.19.0.2/24  fd77:6566:ff::2/64
//!   cni0 198.18.1.1/24  fd77:6566:1::1/64      cni0 198.18.2.1/24  fd77:6566:2::1/64
//!    ├─ port p1 ── pod netns weft-<id>-n1p1     ├─ port p1 ── pod netns weft-<id>-n2p1
//!    │             eth0 198.18.1.11 fd77:6566:1::b             eth0 198.18.2.11 fd77:6566:2::b
//!    └─ port p2 ── pod netns weft-<id>-n1p2     └─ ...
//!                  eth0 198.18.1.12 fd77:6566:1::c
//! ```
//!
//! Nodes forward (`ip_forward`, IPv6 `forwarding`) and route every other node's pod subnet via
//! that node's fabric address, as a simple routed CNI would. Pods have default routes via their
//! node's `cni0`. Each pod also gets a cgroup v2 directory `<cgroup2>/weft-<id>/n<i>p<j>`, so
//! processes can run "in the pod" ([`Pod::command`]).
//!
//! The addresses come from 198.18.0.0/15 (RFC 2544 benchmarking) and the ULA prefix
//! fd77:6566::/32; nothing is created in the root network namespace, so lab traffic never
//! leaves the machine and never touches the host's interfaces.
//!
//! Every kernel object a lab creates carries its run id (`weft-<id>-...` namespaces, the
//! `weft-<id>` cgroup); interfaces live inside the lab's own namespaces, so their short names
//! (`eth0`, `cni0`, `br0`, `n<i>`, `p<j>`) cannot collide with anything. Concurrent labs, in
//! one process or several, therefore never collide.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use weft_netns::{NetNs, NetNsError};

use crate::net::{tcp_connect_in, tcp_listen_in};

/// Prefix of every network namespace, cgroup and state file a lab creates.
pub const PREFIX: &str = "weft-";
/// Where `ip netns add` puts named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Where [`Lab::keep`] writes lab state files (`<id>.json`).
pub const STATE_DIR: &str = "/run/weft-lab";
/// Most nodes a lab can have (node `i` owns 198.18.i.0/24 and 198.19.0.i).
pub const MAX_NODES: usize = 254;
/// Most pods a node can have (pod `j` gets host number `10 + j`, at most 254).
pub const MAX_PODS_PER_NODE: usize = 244;

/// Length of a run id, in lowercase hex digits.
const RUN_ID_LEN: usize = 6;
/// First host number of pod addresses: pod `j` (1-based) is `.10 + j`.
const POD_HOST_BASE: u8 = 10;
/// Fabric segment of the IPv6 node addresses (fd77:6566:ff::i), distinct from pod subnets.
const FABRIC_V6_SEGMENT: u16 = 0xff;
/// Interface index of `eth0` in node and pod namespaces; the bridge port at the other end of
/// the veth gets `PORT_IFINDEX_BASE + i` (fabric port `n<i>`) or `PORT_IFINDEX_BASE + j` (node
/// port `p<j>`).
///
/// The two ends of a veth must have different ifindexes. Left to the kernel, both ends get
/// index 2 in their fresh namespaces, and then the kernel's linkwatch treats their carrier
/// changes as non-urgent and batches them up to a second late; until it catches up, IPv6
/// considers the link not ready and drops forwarded packets, so the first cross-node SYN of a
/// new lab was lost and connections took a second (the SYN retransmission timeout).
const ETH0_IFINDEX: usize = 10;
/// See [`ETH0_IFINDEX`].
const PORT_IFINDEX_BASE: usize = 1000;
/// How long `Lab::up` keeps retrying its connectivity check.
const VERIFY_DEADLINE: Duration = Duration::from_secs(5);
/// Timeout of one connection attempt of the connectivity check.
const VERIFY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long teardown waits for killed processes to leave a cgroup.
const CGROUP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialises `ip netns add` within this process: the first one turns /run/netns into a shared
/// mount point, and two doing that at once stack two mounts.
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

/// Errors from building, inspecting or tearing down labs. Each says what failed and what to
/// check.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The caller is not root.
    #[error(
        "must run as root to {action}: network namespaces, veths and cgroups need CAP_SYS_ADMIN and CAP_NET_ADMIN (try `sudo -E cargo ...`)"
    )]
    NotRoot {
        /// What needed root.
        action: &'static str,
    },
    /// The [`LabSpec`] is out of range.
    #[error("invalid lab spec: {0}")]
    InvalidSpec(String),
    /// A command could not be started at all.
    #[error("cannot run `{cmd}`: {source} (is iproute2 installed and `ip` on PATH?)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why it could not start.
        source: io::Error,
    },
    /// An `ip` command ran and failed.
    #[error(
        "ip command failed: `{cmd}` ({status}): {stderr} (check that the kernel has veth and bridge support, and look for leftovers with `cargo xtask lab status`){input}"
    )]
    Command {
        /// The command line.
        cmd: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr.
        stderr: String,
        /// The batch it was fed on stdin, if any, with line numbers (as `ip` reports them).
        input: String,
    },
    /// No cgroup2 filesystem is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (looked for type cgroup2 in /proc/self/mountinfo); mount one, e.g. `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    /// A cgroup operation failed.
    #[error(
        "cannot {op} cgroup {path}: {source} (is cgroup2 mounted read-write, and are you root?)"
    )]
    Cgroup {
        /// What was attempted.
        op: &'static str,
        /// The cgroup directory or file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// Writing a sysctl inside a lab namespace failed.
    #[error("cannot set sysctl {key} in network namespace {netns}: {source}")]
    Sysctl {
        /// The namespace.
        netns: String,
        /// The sysctl, dotted (`net.ipv4.ip_forward`).
        key: String,
        /// Why it failed.
        source: io::Error,
    },
    /// Opening or entering a network namespace failed.
    #[error("network namespace error: {0}")]
    NetNs(#[from] NetNsError),
    /// The lab was built but its connectivity check failed.
    #[error(
        "lab {run_id} is not connected: {from} cannot reach {to} over TCP: {source} (check bridges, routes and forwarding inside the namespaces: `ip -n <netns> addr`, `ip -n <netns> route`, `ip netns exec <netns> sysctl net.ipv4.ip_forward`; is something filtering forwarded traffic?)"
    )]
    Unreachable {
        /// The lab's run id.
        run_id: String,
        /// Where the connection came from.
        from: String,
        /// Where it was going.
        to: String,
        /// The last error.
        source: io::Error,
    },
    /// Reading or writing a lab state file failed.
    #[error("cannot {op} lab state file {path}: {source} (is /run writable? are you root?)")]
    StateFile {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// A lab state file is not what [`Lab::keep`] writes.
    #[error(
        "lab state file {path} is not valid: {source} (remove it, or run `cargo xtask lab down`)"
    )]
    StateFormat {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// Some other file system operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// A string that is not a lab run id was given where one was expected.
    #[error(
        "not a lab run id: {0:?} (run ids are 6 lowercase hex digits; list labs with `cargo xtask lab status`)"
    )]
    InvalidRunId(String),
    /// Every run id tried was already in use.
    #[error(
        "could not pick an unused lab run id after {0} attempts (too many leftover labs? see `cargo xtask lab status`, clean with `cargo xtask lab down`)"
    )]
    RunIdExhausted(usize),
    /// Teardown could not remove everything.
    #[error(
        "could not remove every lab resource: {}; removed: [{}] (check for processes still using them: `ip netns pids <netns>`, `cat <cgroup>/cgroup.procs`)",
        failures.join("; "),
        removed.join(", ")
    )]
    Cleanup {
        /// What was removed.
        removed: Vec<String>,
        /// What could not be removed, and why.
        failures: Vec<String>,
    },
}

/// The shape of a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    /// Number of nodes, 1 to [`MAX_NODES`].
    pub nodes: usize,
    /// Number of pods on each node, 0 to [`MAX_PODS_PER_NODE`].
    pub pods_per_node: usize,
}

impl Default for LabSpec {
    /// Two nodes with two pods each.
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
        }
    }
}

impl LabSpec {
    /// Checks that the spec fits the lab's address plan.
    pub fn validate(&self) -> Result<(), LabError> {
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(LabError::InvalidSpec(format!(
                "nodes must be between 1 and {MAX_NODES}, got {}",
                self.nodes
            )));
        }
        if self.pods_per_node > MAX_PODS_PER_NODE {
            return Err(LabError::InvalidSpec(format!(
                "pods_per_node must be at most {MAX_PODS_PER_NODE}, got {}",
                self.pods_per_node
            )));
        }
        Ok(())
    }
}

/// A simulated node: a network namespace with a fabric interface `eth0` and a pod bridge
/// `cni0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// 1-based node number (the `i` in `n<i>` and in the addresses). [`Lab::node`] takes a
    /// 0-based index, so `lab.node(0).index == 1`.
    pub index: usize,
    /// Short name: `n<i>`.
    pub name: String,
    /// Network namespace name: `weft-<id>-n<i>`.
    pub netns: String,
    /// Fabric IPv4 address (on `eth0`): 198.19.0.i.
    pub ip4: Ipv4Addr,
    /// Fabric IPv6 address (on `eth0`): fd77:6566:ff::i.
    pub ip6: Ipv6Addr,
}

impl Node {
    fn new(run_id: &str, index: u8) -> Self {
        Self {
            index: usize::from(index),
            name: format!("n{index}"),
            netns: format!("{PREFIX}{run_id}-n{index}"),
            ip4: node_ip4(index),
            ip6: node_ip6(index),
        }
    }

    /// The node number as a byte, for the address plan. Indices outside 1..=254 (only possible
    /// in a hand-made `Node`) map to 0.
    fn octet(&self) -> u8 {
        u8::try_from(self.index).unwrap_or(0)
    }

    /// Path of the node's network namespace (`/run/netns/<netns>`).
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// Opens the node's network namespace.
    pub fn netns(&self) -> Result<NetNs, LabError> {
        Ok(NetNs::open(self.netns_path())?)
    }

    /// A command that runs inside the node's network namespace (it joins it between fork and
    /// exec). The process stays in the caller's cgroup, so the lab's teardown does not kill
    /// it: stop it yourself.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let netns = path_cstring(&self.netns_path());
        // SAFETY: the hook only makes async-signal-safe system calls (open, setns, close) on a
        // buffer prepared before fork, and does not allocate.
        unsafe {
            cmd.pre_exec(move || enter_netns_raw(netns.as_deref()));
        }
        cmd
    }

    /// The node's pod subnet, IPv4: 198.18.i.0/24.
    pub fn pod_subnet4(&self) -> Ipv4Net {
        pod_subnet4(self.octet())
    }

    /// The node's pod subnet, IPv6: fd77:6566:i::/64.
    pub fn pod_subnet6(&self) -> Ipv6Net {
        pod_subnet6(self.octet())
    }

    /// The pods' IPv4 gateway (on `cni0`): 198.18.i.1.
    pub fn gateway4(&self) -> Ipv4Addr {
        pod_gateway4(self.octet())
    }

    /// The pods' IPv6 gateway (on `cni0`): fd77:6566:i::1.
    pub fn gateway6(&self) -> Ipv6Addr {
        pod_gateway6(self.octet())
    }
}

/// A simulated pod: a network namespace with `eth0` on its node's `cni0` bridge, and a cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// 1-based number of the node the pod runs on (same as its [`Node::index`]).
    pub node_index: usize,
    /// 1-based pod number on its node (the `j` in `n<i>p<j>`).
    pub index: usize,
    /// Short name: `n<i>p<j>`.
    pub name: String,
    /// Network namespace name: `weft-<id>-n<i>p<j>`.
    pub netns: String,
    /// IPv4 address: 198.18.i.(10+j).
    pub ip4: Ipv4Addr,
    /// IPv6 address: fd77:6566:i::(10+j), e.g. fd77:6566:1::b for pod 1 of node 1.
    pub ip6: Ipv6Addr,
    /// The pod's cgroup v2 directory: `<cgroup2>/weft-<id>/n<i>p<j>`.
    pub cgroup: PathBuf,
}

impl Pod {
    fn new(run_id: &str, node: u8, pod: u8, cgroup_root: &Path) -> Self {
        let name = format!("n{node}p{pod}");
        Self {
            node_index: usize::from(node),
            index: usize::from(pod),
            netns: format!("{PREFIX}{run_id}-{name}"),
            ip4: pod_ip4(node, pod),
            ip6: pod_ip6(node, pod),
            cgroup: cgroup_root.join(&name),
            name,
        }
    }

    /// Path of the pod's network namespace (`/run/netns/<netns>`).
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// Opens the pod's network namespace.
    pub fn netns(&self) -> Result<NetNs, LabError> {
        Ok(NetNs::open(self.netns_path())?)
    }

    /// A command that runs "in the pod": between fork and exec it joins the pod's cgroup
    /// (writes `0` to its `cgroup.procs`) and its network namespace. The lab's teardown kills
    /// it (through `cgroup.kill`). If joining fails, `spawn` returns the error.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let netns = path_cstring(&self.netns_path());
        let procs = path_cstring(&self.cgroup.join("cgroup.procs"));
        // SAFETY: the hook only makes async-signal-safe system calls (open, write, setns,
        // close) on buffers prepared before fork, and does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                join_cgroup_raw(procs.as_deref())?;
                enter_netns_raw(netns.as_deref())
            });
        }
        cmd
    }
}

// ---------------------------------------------------------------------------------------------
// Address plan and names (pure).

fn node_ip4(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, node)
}

fn node_ip6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd77,
        0x6566,
        FABRIC_V6_SEGMENT,
        0,
        0,
        0,
        0,
        u16::from(node),
    )
}

fn pod_subnet4(node: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(198, 18, node, 0), 24)
}

fn pod_subnet6(node: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(0xfd77, 0x6566, u16::from(node), 0, 0, 0, 0, 0),
        64,
    )
}

fn pod_gateway4(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node, 1)
}

fn pod_gateway6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0x6566, u16::from(node), 0, 0, 0, 0, 1)
}

fn pod_host(pod: u8) -> u8 {
    POD_HOST_BASE.saturating_add(pod)
}

fn pod_ip4(node: u8, pod: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node, pod_host(pod))
}

fn pod_ip6(node: u8, pod: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd77,
        0x6566,
        u16::from(node),
        0,
        0,
        0,
        0,
        u16::from(pod_host(pod)),
    )
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn fabric_netns_name(run_id: &str) -> String {
    format!("{PREFIX}{run_id}-fab")
}

fn cgroup_dir_name(run_id: &str) -> String {
    format!("{PREFIX}{run_id}")
}

fn state_file_path(run_id: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{run_id}.json"))
}

/// `/run/weft-lab/<id>.owner`: `<pid> <start time>` of the process whose [`Lab`] value owns
/// the run (removed when it is dropped or kept). A lab whose owner is gone was leaked by a
/// process that could not run its destructor (killed, aborted): the next [`Lab::up`] removes it.
fn owner_file_path(run_id: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{run_id}.owner"))
}

/// Start time of process `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`), to
/// tell a live owner from a recycled pid.
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// `<pid> <start>` of this process.
fn owner_record() -> String {
    let pid = std::process::id();
    format!("{pid} {}", process_start(pid).unwrap_or(0))
}

/// Whether the owner recorded in `text` is still running.
fn owner_alive(text: &str) -> bool {
    let mut parts = text.split_whitespace();
    let (Some(pid), Some(start)) = (
        parts.next().and_then(|p| p.parse::<u32>().ok()),
        parts.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        // Unreadable: keep the lab (only a proven-dead owner gets its lab removed).
        return true;
    };
    process_start(pid) == Some(start)
}

/// Removes labs whose owning process is gone (see [`owner_file_path`]); labs kept on purpose
/// (state file), labs without an owner file and labs of live processes are left alone.
/// Returns the run ids removed.
fn reap_orphans(cgroup2: Option<&Path>) -> Vec<String> {
    let Ok(files) = list_dir(Path::new(STATE_DIR), |name, _| name.ends_with(".owner")) else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for file in files {
        let Some(id) = file.strip_suffix(".owner").filter(|id| is_run_id(id)) else {
            continue;
        };
        let owner = fs::read_to_string(owner_file_path(id)).unwrap_or_default();
        if owner_alive(&owner) || state_file_path(id).exists() {
            continue;
        }
        let t = teardown_run(id, cgroup2);
        for failure in &t.failures {
            eprintln!("weft lab {id}: removing the lab its dead owner left: {failure}");
        }
        reaped.push(id.to_string());
    }
    reaped
}

/// A fresh run id: 6 lowercase hex digits mixed from the pid, the clock and a counter.
fn new_run_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let pid = u64::from(std::process::id());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let h = splitmix64(nanos ^ pid.rotate_left(32) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    format!("{:06x}", h & 0xff_ffff)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn is_run_id(s: &str) -> bool {
    s.len() == RUN_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a lab namespace name says about its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Fabric,
    Node(u8),
    Pod(u8, u8),
    Other,
}

/// Splits `weft-<id>-<member>` into the run id and the member. Names with the prefix but not
/// this shape give the part after the prefix as the id, and [`Member::Other`].
fn parse_netns_name(name: &str) -> Option<(&str, Member)> {
    let rest = name.strip_prefix(PREFIX)?;
    let Some((id, member)) = rest.split_once('-') else {
        return Some((rest, Member::Other));
    };
    Some((id, parse_member(member)))
}

fn parse_member(s: &str) -> Member {
    fn num(s: &str) -> Option<u8> {
        if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().filter(|n: &u8| (1..=254).contains(n))
    }
    if s == "fab" {
        return Member::Fabric;
    }
    let Some(rest) = s.strip_prefix('n') else {
        return Member::Other;
    };
    match rest.split_once('p') {
        None => num(rest).map_or(Member::Other, Member::Node),
        Some((n, p)) => match (num(n), num(p)) {
            (Some(n), Some(p)) if usize::from(p) <= MAX_PODS_PER_NODE => Member::Pod(n, p),
            _ => Member::Other,
        },
    }
}

/// The namespaces, nodes and pods of a lab.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    fabric: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
}

/// Lays out a (validated) spec.
fn plan(run_id: &str, spec: LabSpec, cgroup_root: &Path) -> Plan {
    let nodes: Vec<Node> = (1..=spec.nodes)
        .filter_map(|i| u8::try_from(i).ok())
        .map(|i| Node::new(run_id, i))
        .collect();
    let pods = nodes
        .iter()
        .flat_map(|n| {
            (1..=spec.pods_per_node)
                .filter_map(|j| u8::try_from(j).ok())
                .map(move |j| Pod::new(run_id, n.octet(), j, cgroup_root))
        })
        .collect();
    Plan {
        fabric: fabric_netns_name(run_id),
        nodes,
        pods,
    }
}

/// Lines for one `ip -batch -` run, in the root namespace (`netns: None`: only commands that
/// name their target namespaces) or inside `netns`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Batch {
    netns: Option<String>,
    lines: Vec<String>,
}

impl Batch {
    fn new(netns: Option<&str>) -> Self {
        Self {
            netns: netns.map(str::to_owned),
            lines: Vec::new(),
        }
    }

    fn push(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }
}

fn netns_add_batch(plan: &Plan) -> Batch {
    let mut b = Batch::new(None);
    b.push(format!("netns add {}", plan.fabric));
    for n in &plan.nodes {
        b.push(format!("netns add {}", n.netns));
    }
    for p in &plan.pods {
        b.push(format!("netns add {}", p.netns));
    }
    b
}

/// The `ip` batches that wire a lab once its namespaces exist, in dependency order. Links are
/// created straight into their namespaces, never in the root namespace.
fn wiring_batches(plan: &Plan) -> Vec<Batch> {
    let mut batches = Vec::new();

    let mut veths = Batch::new(None);
    for n in &plan.nodes {
        veths.push(format!(
            "link add eth0 netns {} index {ETH0_IFINDEX} type veth peer name {} netns {} index {}",
            n.netns,
            n.name,
            plan.fabric,
            PORT_IFINDEX_BASE + n.index
        ));
    }
    for p in &plan.pods {
        let node = node_netns_of(plan, p);
        veths.push(format!(
            "link add eth0 netns {} index {ETH0_IFINDEX} type veth peer name p{} netns {node} index {}",
            p.netns,
            p.index,
            PORT_IFINDEX_BASE + p.index
        ));
    }
    batches.push(veths);

    let mut fab = Batch::new(Some(&plan.fabric));
    fab.push("link set lo up");
    fab.push("link add br0 type bridge stp_state 0 mcast_snooping 0");
    fab.push("link set br0 up");
    for n in &plan.nodes {
        fab.push(format!("link set {} master br0", n.name));
        fab.push(format!("link set {} up", n.name));
    }
    batches.push(fab);

    for n in &plan.nodes {
        let mut b = Batch::new(Some(&n.netns));
        b.push("link set lo up");
        b.push("link add cni0 type bridge stp_state 0 mcast_snooping 0");
        b.push(format!("address add {}/24 dev cni0", n.gateway4()));
        b.push(format!("address add {}/64 dev cni0 nodad", n.gateway6()));
        b.push("link set cni0 up");
        for p in plan.pods.iter().filter(|p| p.node_index == n.index) {
            b.push(format!("link set p{} master cni0", p.index));
            b.push(format!("link set p{} up", p.index));
        }
        b.push(format!("address add {}/24 dev eth0", n.ip4));
        b.push(format!("address add {}/64 dev eth0 nodad", n.ip6));
        b.push("link set eth0 up");
        for m in plan.nodes.iter().filter(|m| m.index != n.index) {
            b.push(format!("route add {} via {}", m.pod_subnet4(), m.ip4));
            b.push(format!("route add {} via {}", m.pod_subnet6(), m.ip6));
        }
        batches.push(b);
    }

    for p in &plan.pods {
        let gw4 = pod_gateway4(u8::try_from(p.node_index).unwrap_or(0));
        let gw6 = pod_gateway6(u8::try_from(p.node_index).unwrap_or(0));
        let mut b = Batch::new(Some(&p.netns));
        b.push("link set lo up");
        b.push(format!("address add {}/24 dev eth0", p.ip4));
        b.push(format!("address add {}/64 dev eth0 nodad", p.ip6));
        b.push("link set eth0 up");
        b.push(format!("route add default via {gw4}"));
        b.push(format!("route add ::/0 via {gw6}"));
        batches.push(b);
    }
    batches
}

fn node_netns_of<'a>(plan: &'a Plan, pod: &Pod) -> &'a str {
    plan.nodes
        .iter()
        .find(|n| n.index == pod.node_index)
        .map_or("", |n| n.netns.as_str())
}

/// Sysctls set in a namespace before its interfaces are created. No duplicate address
/// detection anywhere (addresses are usable at once); the fabric is pure L2, so it gets no
/// IPv6 at all; nodes route.
fn sysctls(member: Member) -> &'static [(&'static str, &'static str)] {
    const COMMON: &[(&str, &str)] = &[
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ];
    const FABRIC: &[(&str, &str)] = &[("net.ipv6.conf.default.disable_ipv6", "1")];
    const NODE: &[(&str, &str)] = &[
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
    ];
    match member {
        Member::Fabric => FABRIC,
        Member::Node(_) => NODE,
        Member::Pod(..) | Member::Other => COMMON,
    }
}

/// Finds the cgroup2 mount point in a mountinfo text.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ').nth(4).map(unescape_mountinfo)
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> PathBuf {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, LabError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| LabError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or(LabError::NoCgroup2)
}

// ---------------------------------------------------------------------------------------------
// Root checks.

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ensure_root(action: &'static str) -> Result<(), LabError> {
    if is_root() {
        Ok(())
    } else {
        Err(LabError::NotRoot { action })
    }
}

/// Gate for tests that need root. Returns true when running as root. Otherwise, if the
/// environment variable `CI` is `true` it panics (a CI job must not silently skip them); else
/// it prints a skip message and returns false, and the test should return early:
///
/// ```no_run
/// if !weft_tests::require_root("lab_up_works") {
///     return;
/// }
/// ```
pub fn require_root(test_name: &str) -> bool {
    if is_root() {
        return true;
    }
    let why = "it needs root (euid 0) to create network namespaces, veths and cgroups";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "root-only test {test_name} cannot run: {why}; CI=true, so refusing to skip it (run the tests as root)"
        );
    }
    eprintln!(
        "skipping root-only test {test_name}: {why} (run as root to include it; with CI=true it fails instead)"
    );
    false
}

// ---------------------------------------------------------------------------------------------
// Running `ip`.

fn render_batch(lines: &[String]) -> String {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("\n  -:{}: {l}", i + 1))
        .collect()
}

/// Runs `ip [-n NETNS] -batch -` with the batch on stdin.
fn run_batch(batch: &Batch) -> Result<(), LabError> {
    if batch.lines.is_empty() {
        return Ok(());
    }
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = &batch.netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let cmd = format!("ip {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    let mut input = batch.lines.join("\n");
    input.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        // A failing `ip` stops reading and exits; its exit status and stderr tell why, so a
        // broken pipe here is not the interesting error.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(LabError::Command {
        cmd,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        input: format!("; batch was:{}", render_batch(&batch.lines)),
    })
}

// ---------------------------------------------------------------------------------------------
// pre_exec helpers: async-signal-safe, no allocation.

fn path_cstring(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_bytes()).ok()
}

fn enter_netns_raw(path: Option<&std::ffi::CStr>) -> io::Result<()> {
    let path = path.ok_or(io::ErrorKind::InvalidInput)?;
    // SAFETY: NUL-terminated path; the fd is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is an open namespace file (setns rejects anything else).
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(())
}

fn join_cgroup_raw(procs: Option<&std::ffi::CStr>) -> io::Result<()> {
    let procs = procs.ok_or(io::ErrorKind::InvalidInput)?;
    // SAFETY: NUL-terminated path; the fd is closed below.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // "0" means "the writing process".
    // SAFETY: writing one byte from a static buffer to the fd we opened.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    if n != 1 {
        return Err(err);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Teardown.

/// What a teardown removed and what it could not.
#[derive(Debug, Default)]
struct Teardown {
    removed: Vec<String>,
    failures: Vec<String>,
}

impl Teardown {
    fn into_result(self) -> Result<Vec<String>, LabError> {
        if self.failures.is_empty() {
            Ok(self.removed)
        } else {
            Err(LabError::Cleanup {
                removed: self.removed,
                failures: self.failures,
            })
        }
    }

    fn note(&mut self, result: Result<bool, LabError>, what: String) {
        match result {
            Ok(true) => self.removed.push(what),
            Ok(false) => {}
            Err(e) => self.failures.push(e.to_string()),
        }
    }
}

/// Deletes a named network namespace like `ip netns del`: detach the bind mount, unlink the
/// file. The namespace itself goes away when nothing uses it any more. Ok(false) if absent.
fn delete_netns(name: &str) -> Result<bool, LabError> {
    let path = netns_path(name);
    let Some(c) = path_cstring(&path) else {
        return Err(LabError::Io {
            op: "delete network namespace",
            path,
            source: io::ErrorKind::InvalidInput.into(),
        });
    };
    // SAFETY: NUL-terminated path.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (a half-created namespace); ENOENT: already gone.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(LabError::Io {
                op: "unmount network namespace",
                path,
                source: e,
            });
        }
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(rc == 0),
        Err(source) => Err(LabError::Io {
            op: "remove network namespace file",
            path,
            source,
        }),
    }
}

/// Names in /run/netns starting with `prefix`, sorted.
fn list_netns(prefix: &str) -> Result<Vec<String>, LabError> {
    list_dir(Path::new(NETNS_DIR), |name, _| name.starts_with(prefix))
}

/// Entry names of `dir` accepted by `keep`, sorted; an absent directory is empty.
fn list_dir(
    dir: &Path,
    keep: impl Fn(&str, &fs::DirEntry) -> bool,
) -> Result<Vec<String>, LabError> {
    let io_err = |source| LabError::Io {
        op: "list",
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err)?;
        if let Some(name) = entry.file_name().to_str()
            && keep(name, &entry)
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Lab cgroups are exactly `weft-<run id>`: never touch other `weft-*` cgroups (a real agent's,
/// say), since removing one kills its processes.
fn is_lab_cgroup(name: &str, entry: &fs::DirEntry) -> bool {
    name.strip_prefix(PREFIX).is_some_and(is_run_id) && is_dir(entry)
}

fn is_dir(entry: &fs::DirEntry) -> bool {
    entry.file_type().is_ok_and(|t| t.is_dir())
}

/// Kills every process in the cgroup tree at `dir` and removes the tree. Ok(false) if absent.
fn remove_cgroup_tree(dir: &Path) -> Result<bool, LabError> {
    if !dir.exists() {
        return Ok(false);
    }
    kill_cgroup(dir)?;
    wait_unpopulated(dir)?;
    remove_cgroup_dirs(dir)?;
    Ok(true)
}

fn kill_cgroup(dir: &Path) -> Result<(), LabError> {
    let kill = dir.join("cgroup.kill");
    match fs::write(&kill, "1") {
        Ok(()) => Ok(()),
        // Kernels before 5.14 have no cgroup.kill: signal every process ourselves.
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.exists() => kill_cgroup_procs(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LabError::Cgroup {
            op: "kill the processes of",
            path: dir.to_owned(),
            source,
        }),
    }
}

fn kill_cgroup_procs(dir: &Path) -> Result<(), LabError> {
    let procs = dir.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(|source| LabError::Cgroup {
        op: "read",
        path: procs.clone(),
        source,
    })?;
    for pid in text
        .lines()
        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        // SAFETY: sending a signal; a vanished pid just fails with ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for sub in list_dir(dir, |_, e| is_dir(e))? {
        kill_cgroup_procs(&dir.join(sub))?;
    }
    Ok(())
}

fn wait_unpopulated(dir: &Path) -> Result<(), LabError> {
    let events = dir.join("cgroup.events");
    let deadline = Instant::now() + CGROUP_DRAIN_TIMEOUT;
    loop {
        match fs::read_to_string(&events) {
            Ok(text) if text.lines().any(|l| l.trim() == "populated 0") => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(LabError::Cgroup {
                    op: "read",
                    path: events,
                    source,
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(LabError::Cgroup {
                op: "empty",
                path: dir.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "processes still running {}s after cgroup.kill (stuck in the kernel?)",
                        CGROUP_DRAIN_TIMEOUT.as_secs()
                    ),
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes a cgroup directory and its sub-cgroups, deepest first. A cgroup can stay busy for a
/// moment after its last process exited, so EBUSY is retried briefly.
fn remove_cgroup_dirs(dir: &Path) -> Result<(), LabError> {
    for sub in list_dir(dir, |_, e| is_dir(e))? {
        remove_cgroup_dirs(&dir.join(sub))?;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(LabError::Cgroup {
                    op: "remove",
                    path: dir.to_owned(),
                    source,
                });
            }
        }
    }
}

fn remove_state_file(path: &Path) -> Result<bool, LabError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(LabError::StateFile {
            op: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes everything of lab `run_id`: first its processes and cgroups (so nothing keeps the
/// namespaces busy), then every namespace named `weft-<id>-*`, then its state file.
fn teardown_run(run_id: &str, cgroup2: Option<&Path>) -> Teardown {
    let mut t = Teardown::default();
    if let Some(cg2) = cgroup2 {
        let dir = cg2.join(cgroup_dir_name(run_id));
        let what = format!("cgroup {}", dir.display());
        t.note(remove_cgroup_tree(&dir), what);
    }
    match list_netns(&format!("{PREFIX}{run_id}-")) {
        Ok(names) => {
            for name in names {
                let what = format!("netns {name}");
                t.note(delete_netns(&name), what);
            }
        }
        Err(e) => t.failures.push(e.to_string()),
    }
    let state = state_file_path(run_id);
    let what = format!("state file {}", state.display());
    t.note(remove_state_file(&state), what);
    let owner = owner_file_path(run_id);
    let what = format!("owner file {}", owner.display());
    t.note(remove_state_file(&owner), what);
    t
}

// ---------------------------------------------------------------------------------------------
// The lab.

/// What [`Lab::keep`] writes to `/run/weft-lab/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabState {
    run_id: String,
    spec: LabSpec,
    fabric_netns: String,
    cgroup: PathBuf,
    created_unix_secs: u64,
    creator_pid: u32,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
}

/// A running lab. Dropping it tears everything down (see [`Lab::up`] and [`Lab::keep`]).
#[derive(Debug)]
pub struct Lab {
    run_id: String,
    spec: LabSpec,
    cgroup2: PathBuf,
    cgroup_root: PathBuf,
    fabric: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    created: SystemTime,
    armed: bool,
}

impl Lab {
    /// Builds a lab: namespaces, links, addresses, routes, sysctls and pod cgroups, then checks
    /// that a pod on the first node reaches a pod on every other node over TCP on IPv4 and
    /// IPv6. Needs root. On any failure, removes whatever it had created before returning
    /// the error.
    pub fn up(spec: LabSpec) -> Result<Lab, LabError> {
        ensure_root("create a lab")?;
        spec.validate()?;
        let cgroup2 = cgroup2_mount()?;
        for id in reap_orphans(Some(&cgroup2)) {
            eprintln!("weft lab: removed lab {id}, left behind by a process that no longer runs");
        }
        let (run_id, cgroup_root) = claim_run_id(&cgroup2)?;
        // Before any namespace exists, so that a reaper never sees an ownerless new lab.
        if let Err(e) = fs::create_dir_all(STATE_DIR)
            .and_then(|()| fs::write(owner_file_path(&run_id), owner_record()))
        {
            eprintln!(
                "weft lab {run_id}: cannot write {}: {e}; if this process is killed, remove the lab with `cargo xtask lab down {run_id}`",
                owner_file_path(&run_id).display()
            );
        }
        let Plan {
            fabric,
            nodes,
            pods,
        } = plan(&run_id, spec, &cgroup_root);
        // From here on, dropping `lab` removes everything carrying the run id.
        let lab = Lab {
            run_id,
            spec,
            cgroup2,
            cgroup_root,
            fabric,
            nodes,
            pods,
            created: SystemTime::now(),
            armed: true,
        };
        lab.build()?;
        Ok(lab)
    }

    fn plan(&self) -> Plan {
        Plan {
            fabric: self.fabric.clone(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
        }
    }

    fn build(&self) -> Result<(), LabError> {
        let plan = self.plan();
        {
            let _guard = NETNS_ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_batch(&netns_add_batch(&plan))?;
        }
        set_sysctls(&plan.fabric, Member::Fabric)?;
        for n in &plan.nodes {
            set_sysctls(&n.netns, Member::Node(n.octet()))?;
        }
        for p in &plan.pods {
            set_sysctls(&p.netns, Member::Pod(0, 0))?;
        }
        for batch in wiring_batches(&plan) {
            run_batch(&batch)?;
        }
        for p in &plan.pods {
            fs::create_dir(&p.cgroup).map_err(|source| LabError::Cgroup {
                op: "create",
                path: p.cgroup.clone(),
                source,
            })?;
        }
        self.verify()
    }

    /// Checks TCP connectivity, IPv4 and IPv6, from the first pod to the first pod of every
    /// other node. With a single node: to its second pod, or to the node itself (the pods'
    /// gateway addresses). Without pods: from the first node to every other node.
    fn verify(&self) -> Result<(), LabError> {
        let mut targets: Vec<(&str, Vec<IpAddr>)> = Vec::new();
        let source = match self.pods.first() {
            Some(first) => {
                for p in &self.pods[1..] {
                    let other_node = p.node_index != first.node_index && p.index == 1;
                    let single_node = self.spec.nodes == 1 && p.index == 2;
                    if other_node || single_node {
                        targets.push((&p.netns, vec![p.ip4.into(), p.ip6.into()]));
                    }
                }
                if targets.is_empty() {
                    let n = &self.nodes[0];
                    targets.push((&n.netns, vec![n.gateway4().into(), n.gateway6().into()]));
                }
                &first.netns
            }
            None => {
                for n in self.nodes.iter().skip(1) {
                    targets.push((&n.netns, vec![n.ip4.into(), n.ip6.into()]));
                }
                &self.nodes[0].netns
            }
        };
        let from = NetNs::open(netns_path(source))?;
        for (to_name, ips) in targets {
            let to = NetNs::open(netns_path(to_name))?;
            for ip in ips {
                self.check_tcp(&from, source, &to, to_name, ip)?;
            }
        }
        Ok(())
    }

    fn check_tcp(
        &self,
        from: &NetNs,
        from_name: &str,
        to: &NetNs,
        to_name: &str,
        ip: IpAddr,
    ) -> Result<(), LabError> {
        let unreachable = |source| LabError::Unreachable {
            run_id: self.run_id.clone(),
            from: from_name.to_owned(),
            to: format!("{to_name} ({ip})"),
            source,
        };
        let listener = tcp_listen_in(to, SocketAddr::new(ip, 0)).map_err(unreachable)?;
        let addr = listener.local_addr().map_err(unreachable)?;
        let deadline = Instant::now() + VERIFY_DEADLINE;
        loop {
            match tcp_connect_in(from, addr, VERIFY_CONNECT_TIMEOUT) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(unreachable(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The lab's run id (6 lowercase hex digits), part of every name it creates.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The spec the lab was built from.
    pub fn spec(&self) -> LabSpec {
        self.spec
    }

    /// The nodes, in order (`nodes()[0]` is `n1`).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node by 0-based index: `node(0)` is `n1`. Panics if out of range.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Pod by 0-based node and pod index: `pod(0, 1)` is `n1p2`. Panics if out of range.
    pub fn pod(&self, node: usize, pod: usize) -> &Pod {
        assert!(
            node < self.spec.nodes && pod < self.spec.pods_per_node,
            "lab {} has {} nodes x {} pods, no pod ({node}, {pod})",
            self.run_id,
            self.spec.nodes,
            self.spec.pods_per_node
        );
        &self.pods[node * self.spec.pods_per_node + pod]
    }

    /// Every pod, node by node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter()
    }

    /// The fabric namespace's name (bridge `br0`, ports `n<i>`): the place for packet captures
    /// of node-to-node traffic.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    /// The lab's cgroup directory, `<cgroup2>/weft-<id>`, parent of every pod's cgroup.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup_root
    }

    /// Leaves the lab running after `self` is dropped (for `cargo xtask lab up`): writes the
    /// state file `/run/weft-lab/<id>.json` and returns the run id. If the state file cannot
    /// be written, says so on stderr; [`Lab::status`] and [`Lab::down_all`] still find the
    /// lab through its namespaces.
    pub fn keep(mut self) -> String {
        if let Err(e) = self.write_state() {
            eprintln!("weft lab {}: {e}", self.run_id);
        }
        // Kept on purpose: no longer tied to this process.
        let _ = fs::remove_file(owner_file_path(&self.run_id));
        self.armed = false;
        self.run_id.clone()
    }

    fn write_state(&self) -> Result<(), LabError> {
        let state = LabState {
            run_id: self.run_id.clone(),
            spec: self.spec,
            fabric_netns: self.fabric.clone(),
            cgroup: self.cgroup_root.clone(),
            created_unix_secs: self
                .created
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            creator_pid: std::process::id(),
            nodes: self.nodes.clone(),
            pods: self.pods.clone(),
        };
        let path = state_file_path(&self.run_id);
        let err = |op, source| LabError::StateFile {
            op,
            path: path.clone(),
            source,
        };
        fs::create_dir_all(STATE_DIR).map_err(|e| err("create the directory of", e))?;
        let mut json = serde_json::to_vec_pretty(&state).map_err(|e| err("encode", e.into()))?;
        json.push(b'\n');
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, json).map_err(|e| err("write", e))?;
        fs::rename(&tmp, &path).map_err(|e| err("rename into place", e))
    }

    /// Removes one lab, typically one left running with [`Lab::keep`]: kills the processes in
    /// its cgroups, removes the cgroups, its namespaces (`weft-<id>-*`) and its state file.
    /// Returns what was removed (empty if there was nothing). Idempotent. Needs root.
    pub fn down(run_id: &str) -> Result<Vec<String>, LabError> {
        if !is_run_id(run_id) {
            return Err(LabError::InvalidRunId(run_id.to_owned()));
        }
        ensure_root("remove a lab")?;
        let cgroup2 = match cgroup2_mount() {
            Ok(p) => Some(p),
            Err(LabError::NoCgroup2) => None,
            Err(e) => return Err(e),
        };
        teardown_run(run_id, cgroup2.as_deref()).into_result()
    }

    /// Removes every lab resource on the machine, whoever created it: every network namespace
    /// whose name starts with `weft-`, every lab cgroup `<cgroup2>/weft-<run id>` (killing its
    /// processes first; other `weft-*` cgroups are left alone), and every state file. Returns
    /// what was removed. Idempotent. Needs root.
    ///
    /// This also destroys labs that running tests are using.
    pub fn down_all() -> Result<Vec<String>, LabError> {
        ensure_root("remove labs")?;
        let mut t = Teardown::default();
        match cgroup2_mount() {
            Ok(cg2) => match list_dir(&cg2, is_lab_cgroup) {
                Ok(dirs) => {
                    for dir in dirs {
                        let path = cg2.join(dir);
                        let what = format!("cgroup {}", path.display());
                        t.note(remove_cgroup_tree(&path), what);
                    }
                }
                Err(e) => t.failures.push(e.to_string()),
            },
            Err(LabError::NoCgroup2) => {}
            Err(e) => t.failures.push(e.to_string()),
        }
        match list_netns(PREFIX) {
            Ok(names) => {
                for name in names {
                    let what = format!("netns {name}");
                    t.note(delete_netns(&name), what);
                }
            }
            Err(e) => t.failures.push(e.to_string()),
        }
        match list_dir(Path::new(STATE_DIR), |name, _| {
            name.ends_with(".json") || name.ends_with(".json.tmp") || name.ends_with(".owner")
        }) {
            Ok(files) => {
                for file in files {
                    let path = Path::new(STATE_DIR).join(file);
                    let what = format!("state file {}", path.display());
                    t.note(remove_state_file(&path), what);
                }
            }
            Err(e) => t.failures.push(e.to_string()),
        }
        t.into_result()
    }

    /// Labs present on the machine, found through state files, namespaces and cgroups, sorted
    /// by run id. Labs without a state file (owned by a running test, or leaked) get their
    /// nodes and pods from their namespace names. Does not need root.
    pub fn status() -> Result<Vec<LabStatus>, LabError> {
        let mut labs: BTreeMap<String, LabStatus> = BTreeMap::new();
        let cgroup2 = match cgroup2_mount() {
            Ok(p) => Some(p),
            Err(LabError::NoCgroup2) => None,
            Err(e) => return Err(e),
        };

        for file in list_dir(Path::new(STATE_DIR), |name, _| name.ends_with(".json"))? {
            let path = Path::new(STATE_DIR).join(&file);
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                // Removed since the listing: that lab is gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(LabError::StateFile {
                        op: "read",
                        path,
                        source,
                    });
                }
            };
            let state: LabState =
                serde_json::from_str(&text).map_err(|source| LabError::StateFormat {
                    path: path.clone(),
                    source,
                })?;
            let status = labs.entry(state.run_id.clone()).or_default();
            status.run_id = state.run_id;
            status.state_file = Some(path);
            status.fabric_netns = Some(state.fabric_netns);
            status.cgroup = Some(state.cgroup);
            status.nodes = state.nodes;
            status.pods = state.pods;
        }

        for name in list_netns(PREFIX)? {
            let Some((id, member)) = parse_netns_name(&name) else {
                continue;
            };
            let status = labs.entry(id.to_owned()).or_default();
            status.run_id = id.to_owned();
            status.netns.push(name.clone());
            if status.state_file.is_some() {
                continue;
            }
            let cgroup_root = cgroup2
                .as_deref()
                .map(|cg2| cg2.join(cgroup_dir_name(id)))
                .unwrap_or_default();
            match member {
                Member::Fabric => status.fabric_netns = Some(name),
                Member::Node(i) => status.nodes.push(Node::new(id, i)),
                Member::Pod(i, j) => status.pods.push(Pod::new(id, i, j, &cgroup_root)),
                Member::Other => {}
            }
        }

        if let Some(cg2) = &cgroup2 {
            for dir in list_dir(cg2, is_lab_cgroup)? {
                let id = &dir[PREFIX.len()..];
                let status = labs.entry(id.to_owned()).or_default();
                status.run_id = id.to_owned();
                status.cgroup = Some(cg2.join(&dir));
            }
        }

        let mut out: Vec<LabStatus> = labs.into_values().collect();
        for s in &mut out {
            s.nodes.sort_by_key(|n| n.index);
            s.pods.sort_by_key(|p| (p.node_index, p.index));
            s.missing_netns = s.expected_netns();
            s.missing_netns.retain(|n| !s.netns.contains(n));
            if s.state_file.is_none()
                && let Some(c) = &s.cgroup
                && !c.exists()
            {
                s.cgroup = None;
            }
        }
        Ok(out)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let t = teardown_run(&self.run_id, Some(&self.cgroup2));
        for failure in &t.failures {
            eprintln!("weft lab {}: teardown: {failure}", self.run_id);
        }
    }
}

/// Picks a fresh run id and claims it by creating its cgroup directory (mkdir is atomic, so
/// two processes cannot claim the same id). Ids whose namespaces or state file exist are
/// skipped too.
fn claim_run_id(cgroup2: &Path) -> Result<(String, PathBuf), LabError> {
    const ATTEMPTS: usize = 32;
    for _ in 0..ATTEMPTS {
        let id = new_run_id();
        if netns_path(&fabric_netns_name(&id)).exists() || state_file_path(&id).exists() {
            continue;
        }
        if !list_netns(&format!("{PREFIX}{id}-"))?.is_empty() {
            continue;
        }
        let dir = cgroup2.join(cgroup_dir_name(&id));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(LabError::Cgroup {
                    op: "create",
                    path: dir,
                    source,
                });
            }
        }
    }
    Err(LabError::RunIdExhausted(ATTEMPTS))
}

/// Writes the sysctls for `member` inside namespace `name` (from a thread switched into it:
/// `/proc/sys/net` shows the namespace of the reading thread).
fn set_sysctls(name: &str, member: Member) -> Result<(), LabError> {
    let ns = NetNs::open(netns_path(name))?;
    ns.run(|| {
        for (key, value) in sysctls(member) {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            fs::write(&path, value).map_err(|source| LabError::Sysctl {
                netns: name.to_owned(),
                key: (*key).to_owned(),
                source,
            })?;
        }
        Ok(())
    })?
}

/// A lab found on the machine by [`Lab::status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabStatus {
    /// The run id.
    pub run_id: String,
    /// The state file, for labs left running with [`Lab::keep`].
    pub state_file: Option<PathBuf>,
    /// The fabric namespace's name, if known.
    pub fabric_netns: Option<String>,
    /// The lab's cgroup directory, if it exists (or the state file names it).
    pub cgroup: Option<PathBuf>,
    /// The lab's network namespaces that exist, sorted.
    pub netns: Vec<String>,
    /// Namespaces the lab should have but does not (from the state file, or implied by the
    /// nodes and pods found).
    pub missing_netns: Vec<String>,
    /// The nodes, from the state file or the namespace names.
    pub nodes: Vec<Node>,
    /// The pods, from the state file or the namespace names.
    pub pods: Vec<Pod>,
}

impl LabStatus {
    /// True for labs left running with [`Lab::keep`] (they have a state file).
    pub fn kept(&self) -> bool {
        self.state_file.is_some()
    }

    /// True if every namespace the lab should have exists.
    pub fn is_complete(&self) -> bool {
        self.missing_netns.is_empty() && !self.netns.is_empty()
    }

    fn expected_netns(&self) -> Vec<String> {
        let mut names = vec![
            self.fabric_netns
                .clone()
                .unwrap_or_else(|| fabric_netns_name(&self.run_id)),
        ];
        names.extend(self.nodes.iter().map(|n| n.netns.clone()));
        names.extend(self.pods.iter().map(|p| p.netns.clone()));
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_six_hex_digits_and_differ() {
        let ids: Vec<String> = (0..1000).map(|_| new_run_id()).collect();
        for id in &ids {
            assert!(is_run_id(id), "{id}");
        }
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        // 1000 draws from 2^24: a collision or two is possible, more means poor mixing.
        assert!(unique.len() >= 998, "{} unique of 1000", unique.len());
    }

    #[test]
    fn run_id_shape_is_checked() {
        assert!(is_run_id("0a1b2c"));
        assert!(!is_run_id("0A1B2C"));
        assert!(!is_run_id("0a1b2"));
        assert!(!is_run_id("0a1b2cd"));
        assert!(!is_run_id("0a1b2g"));
    }

    #[test]
    fn default_spec_is_two_by_two_and_specs_are_validated() {
        assert_eq!(
            LabSpec::default(),
            LabSpec {
                nodes: 2,
                pods_per_node: 2
            }
        );
        assert!(LabSpec::default().validate().is_ok());
        let ok = |nodes, pods_per_node| {
            LabSpec {
                nodes,
                pods_per_node,
            }
            .validate()
            .is_ok()
        };
        assert!(ok(1, 0));
        assert!(ok(MAX_NODES, MAX_PODS_PER_NODE));
        assert!(!ok(0, 1));
        assert!(!ok(MAX_NODES + 1, 1));
        assert!(!ok(1, MAX_PODS_PER_NODE + 1));
        let err = LabSpec {
            nodes: 0,
            pods_per_node: 1,
        }
        .validate()
        .expect_err("zero nodes");
        assert!(err.to_string().contains("nodes must be between 1"), "{err}");
    }

    #[test]
    fn plan_names_and_addresses() {
        let cg = Path::new("/sys/fs/cgroup/unified/weft-abc123");
        let p = plan("abc123", LabSpec::default(), cg);
        assert_eq!(p.fabric, "weft-abc123-fab");
        assert_eq!(p.nodes.len(), 2);
        assert_eq!(p.pods.len(), 4);

        let n2 = &p.nodes[1];
        assert_eq!(n2.index, 2);
        assert_eq!(n2.name, "n2");
        assert_eq!(n2.netns, "weft-abc123-n2");
        assert_eq!(n2.netns_path(), Path::new("/run/netns/weft-abc123-n2"));
        assert_eq!(n2.ip4, Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(n2.ip6.to_string(), "fd77:6566:ff::2");
        assert_eq!(n2.pod_subnet4().to_string(), "198.18.2.0/24");
        assert_eq!(n2.pod_subnet6().to_string(), "fd77:6566:2::/64");
        assert_eq!(n2.gateway4().to_string(), "198.18.2.1");
        assert_eq!(n2.gateway6().to_string(), "fd77:6566:2::1");

        let n1p1 = &p.pods[0];
        assert_eq!((n1p1.node_index, n1p1.index), (1, 1));
        assert_eq!(n1p1.name, "n1p1");
        assert_eq!(n1p1.netns, "weft-abc123-n1p1");
        assert_eq!(n1p1.ip4.to_string(), "198.18.1.11");
        assert_eq!(n1p1.ip6.to_string(), "fd77:6566:1::b");
        assert_eq!(n1p1.cgroup, cg.join("n1p1"));

        let n2p2 = &p.pods[3];
        assert_eq!(n2p2.name, "n2p2");
        assert_eq!(n2p2.ip4.to_string(), "198.18.2.12");
        assert_eq!(n2p2.ip6.to_string(), "fd77:6566:2::c");
        assert!(n2.pod_subnet4().contains(&n2p2.ip4));
        assert!(n2.pod_subnet6().contains(&n2p2.ip6));
    }

    #[test]
    fn largest_plan_stays_in_range_and_unique() {
        let p = plan(
            "abc123",
            LabSpec {
                nodes: MAX_NODES,
                pods_per_node: 3,
            },
            Path::new("/cg"),
        );
        let last = p.nodes.last().expect("nodes");
        assert_eq!(last.ip4, Ipv4Addr::new(198, 19, 0, 254));
        assert_eq!(last.ip6.to_string(), "fd77:6566:ff::fe");
        // Node 254's pod subnet must not be the fabric's (segment ff).
        assert_eq!(last.pod_subnet6().to_string(), "fd77:6566:fe::/64");
        let mut ips: Vec<IpAddr> = p
            .nodes
            .iter()
            .flat_map(|n| [IpAddr::from(n.ip4), n.ip6.into(), n.gateway4().into()])
            .chain(p.pods.iter().flat_map(|p| [p.ip4.into(), p.ip6.into()]))
            .collect();
        let n = ips.len();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), n, "duplicate addresses in the plan");
        let last_pod = plan(
            "abc123",
            LabSpec {
                nodes: 1,
                pods_per_node: MAX_PODS_PER_NODE,
            },
            Path::new("/cg"),
        )
        .pods
        .pop()
        .expect("pods");
        assert_eq!(last_pod.ip4, Ipv4Addr::new(198, 18, 1, 254));
    }

    #[test]
    fn netns_names_parse_back() {
        assert_eq!(
            parse_netns_name("weft-abc123-fab"),
            Some(("abc123", Member::Fabric))
        );
        assert_eq!(
            parse_netns_name("weft-abc123-n12"),
            Some(("abc123", Member::Node(12)))
        );
        assert_eq!(
            parse_netns_name("weft-abc123-n2p7"),
            Some(("abc123", Member::Pod(2, 7)))
        );
        assert_eq!(
            parse_netns_name("weft-abc123-n0"),
            Some(("abc123", Member::Other))
        );
        assert_eq!(
            parse_netns_name("weft-abc123-n1p"),
            Some(("abc123", Member::Other))
        );
        assert_eq!(
            parse_netns_name("weft-abc123-n300"),
            Some(("abc123", Member::Other))
        );
        assert_eq!(
            parse_netns_name("weft-abc123-n01"),
            Some(("abc123", Member::Other))
        );
        assert_eq!(parse_netns_name("weft-odd"), Some(("odd", Member::Other)));
        assert_eq!(parse_netns_name("other-abc123-fab"), None);
        // Every planned name parses back to its member.
        let p = plan("abc123", LabSpec::default(), Path::new("/cg"));
        for n in &p.nodes {
            assert_eq!(
                parse_netns_name(&n.netns),
                Some(("abc123", Member::Node(n.octet())))
            );
            assert_eq!(Node::new("abc123", n.octet()), *n);
        }
        for pod in &p.pods {
            let Some((_, Member::Pod(i, j))) = parse_netns_name(&pod.netns) else {
                panic!("{} does not parse", pod.netns);
            };
            assert_eq!(Pod::new("abc123", i, j, Path::new("/cg")), *pod);
        }
    }

    #[test]
    fn batches_create_links_inside_lab_namespaces_only() {
        let p = plan("abc123", LabSpec::default(), Path::new("/cg"));
        let add = netns_add_batch(&p);
        assert_eq!(add.netns, None);
        assert_eq!(add.lines.len(), 7);
        assert!(
            add.lines
                .iter()
                .all(|l| l.starts_with("netns add weft-abc123-"))
        );

        let batches = wiring_batches(&p);
        for b in &batches {
            match &b.netns {
                Some(ns) => assert!(ns.starts_with("weft-abc123-"), "{ns}"),
                None => {
                    // Root-namespace lines must name both ends' namespaces.
                    for l in &b.lines {
                        assert!(l.starts_with("link add "), "{l}");
                        assert_eq!(l.matches(" netns weft-abc123-").count(), 2, "{l}");
                    }
                }
            }
        }
        let root = &batches[0];
        assert!(
            root.lines.contains(
                &"link add eth0 netns weft-abc123-n2 index 10 type veth peer name n2 netns weft-abc123-fab index 1002"
                    .to_owned()
            )
        );
        assert!(
            root.lines.contains(
                &"link add eth0 netns weft-abc123-n2p1 index 10 type veth peer name p1 netns weft-abc123-n2 index 1001"
                    .to_owned()
            )
        );
        let n1 = batches
            .iter()
            .find(|b| b.netns.as_deref() == Some("weft-abc123-n1"))
            .expect("n1 batch");
        assert!(
            n1.lines
                .contains(&"route add 198.18.2.0/24 via 198.19.0.2".to_owned())
        );
        assert!(
            n1.lines
                .contains(&"route add fd77:6566:2::/64 via fd77:6566:ff::2".to_owned())
        );
        assert!(
            n1.lines
                .contains(&"address add fd77:6566:1::1/64 dev cni0 nodad".to_owned())
        );
        let pod = batches
            .iter()
            .find(|b| b.netns.as_deref() == Some("weft-abc123-n2p2"))
            .expect("pod batch");
        assert!(
            pod.lines
                .contains(&"route add ::/0 via fd77:6566:2::1".to_owned())
        );
        // Every IPv6 address skips DAD.
        for b in &batches {
            for l in b.lines.iter().filter(|l| l.contains("address add fd77")) {
                assert!(l.ends_with(" nodad"), "{l}");
            }
        }
        // Both ends of every veth get distinct, explicit ifindexes (see ETH0_IFINDEX).
        for l in &root.lines {
            let words: Vec<&str> = l.split(' ').collect();
            let indexes: Vec<&str> = words
                .windows(2)
                .filter(|w| w[0] == "index")
                .map(|w| w[1])
                .collect();
            assert_eq!(indexes.len(), 2, "{l}");
            assert_ne!(indexes[0], indexes[1], "{l}");
        }
        // Interface names fit IFNAMSIZ even for the largest lab.
        let big = plan(
            "abc123",
            LabSpec {
                nodes: MAX_NODES,
                pods_per_node: MAX_PODS_PER_NODE,
            },
            Path::new("/cg"),
        );
        for n in &big.nodes {
            assert!(n.name.len() < 16);
        }
        for p in &big.pods {
            assert!(format!("p{}", p.index).len() < 16);
        }
    }

    #[test]
    fn node_namespaces_forward_and_nothing_does_dad() {
        assert!(sysctls(Member::Node(1)).contains(&("net.ipv4.ip_forward", "1")));
        assert!(sysctls(Member::Node(1)).contains(&("net.ipv6.conf.all.forwarding", "1")));
        assert!(
            !sysctls(Member::Pod(1, 1))
                .iter()
                .any(|(k, _)| k.contains("forward"))
        );
        for m in [Member::Node(1), Member::Pod(1, 1)] {
            assert!(sysctls(m).contains(&("net.ipv6.conf.default.accept_dad", "0")));
        }
    }

    #[test]
    fn cgroup2_mount_is_found_in_hybrid_and_unified_layouts() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(parse_cgroup2_mount("garbage\n\n"), None);
        assert_eq!(
            parse_cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }

    #[test]
    fn mountinfo_unescaping_leaves_odd_backslashes_alone() {
        assert_eq!(unescape_mountinfo("a\\134b"), PathBuf::from("a\\b"));
        assert_eq!(unescape_mountinfo("a\\9b"), PathBuf::from("a\\9b"));
        assert_eq!(unescape_mountinfo("end\\04"), PathBuf::from("end\\04"));
        assert_eq!(unescape_mountinfo("\\"), PathBuf::from("\\"));
    }

    #[test]
    fn errors_say_what_to_check() {
        let e = LabError::NotRoot {
            action: "create a lab",
        };
        assert!(e.to_string().contains("must run as root"), "{e}");
        let e = LabError::Command {
            cmd: "ip -n weft-abc123-n1 -batch -".into(),
            status: "exit status: 1".into(),
            stderr: "Error: Nexthop has invalid gateway.\nCommand failed -:2".into(),
            input: format!("; batch was:{}", render_batch(&["a".into(), "b".into()])),
        };
        let s = e.to_string();
        assert!(
            s.starts_with("ip command failed: `ip -n weft-abc123-n1 -batch -`"),
            "{s}"
        );
        assert!(s.contains("-:2: b"), "{s}");
        let e = LabError::Cleanup {
            removed: vec!["netns weft-abc123-n1".into()],
            failures: vec!["busy".into()],
        };
        assert!(e.to_string().contains("busy"), "{e}");
    }

    #[test]
    fn require_root_matches_euid() {
        // Only meaningful as root; as non-root it would depend on $CI.
        if is_root() {
            assert!(require_root("require_root_matches_euid"));
        }
    }

    /// Root only: a build that fails half-way leaves nothing behind once the `Lab` drops (as
    /// in `Lab::up`, which returns the error after dropping it).
    #[test]
    fn lab_failed_build_removes_what_it_created() {
        if !require_root("lab_failed_build_removes_what_it_created") {
            return;
        }
        let cgroup2 = cgroup2_mount().expect("cgroup2");
        let (run_id, cgroup_root) = claim_run_id(&cgroup2).expect("run id");
        let spec = LabSpec::default();
        let Plan {
            fabric,
            nodes,
            mut pods,
        } = plan(&run_id, spec, &cgroup_root);
        // Fault: the last pod's cgroup cannot be created (its parent does not exist), after
        // every namespace and link exists and the other pod cgroups were made.
        let last = pods.last_mut().expect("pods");
        last.cgroup = cgroup_root.join("missing").join(&last.name);
        let lab = Lab {
            run_id: run_id.clone(),
            spec,
            cgroup2,
            cgroup_root: cgroup_root.clone(),
            fabric,
            nodes,
            pods,
            created: SystemTime::now(),
            armed: true,
        };
        let err = lab.build().expect_err("build must fail");
        assert!(matches!(err, LabError::Cgroup { .. }), "{err}");
        let prefix = format!("{PREFIX}{run_id}-");
        assert_eq!(list_netns(&prefix).expect("list").len(), 7);
        assert!(cgroup_root.join("n1p1").is_dir());
        drop(lab);
        assert_eq!(list_netns(&prefix).expect("list"), Vec::<String>::new());
        assert!(!cgroup_root.exists());
    }

    #[test]
    fn status_fills_missing_netns() {
        let mut s = LabStatus {
            run_id: "abc123".into(),
            nodes: vec![Node::new("abc123", 1)],
            netns: vec!["weft-abc123-n1".into()],
            ..LabStatus::default()
        };
        s.missing_netns = s.expected_netns();
        s.missing_netns.retain(|n| !s.netns.contains(n));
        assert_eq!(s.missing_netns, vec!["weft-abc123-fab".to_owned()]);
        assert!(!s.is_complete());
        assert!(!s.kept());
    }
}
