//! Weft's kernel programs.
//!
//! * `weft_connect4` / `weft_connect6` (cgroup/connect4, cgroup/connect6, attached once at the
//!   cgroup v2 root): a TCP connect from an enrolled pod's network namespace is rewritten to the
//!   agent's outbound listener on the pod's own address, port 15001. The original destination is
//!   stored by socket cookie.
//! * `weft_sock_ops` (sock_ops, same attachment): once such a connection is established, its
//!   original destination moves to a key the agent can compute from the accepted socket
//!   (netns cookie + client address); entries are deleted when the socket closes.
//! * `weft_sk_lookup` (sk_lookup, attached to each enrolled pod's network namespace): inbound TCP
//!   to the pod on any port is steered to the agent's inbound listener (15006); the accepted
//!   socket keeps the original local address and port.
//!
//! Every function returns "pass" on any internal problem: capture must never break a
//! connection it cannot handle. Every decision is counted per CPU and, except for the very
//! frequent not-enrolled case (unless asked for), reported through the `EVENTS` ring buffer.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use weft_ebpf_common::{
    Addr, CIDR_KEY_FIXED_BITS, CONFIG_TRACE_UNENROLLED, COUNTER_SLOTS, CaptureEvent, CidrKey,
    Config, DIR_INBOUND, DIR_OUTBOUND, EVENTS_RING_BYTES, IpKey, IpPod, MAX_CIDR_EXCLUSIONS,
    MAX_PODS, MAX_PORT_EXCLUSIONS, ORIG_DST_MAX_ENTRIES, OrigDst, POD_HAS_IP4, POD_HAS_IP6,
    POD_OPTED_OUT, PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND, PROG_CONNECT4, PROG_CONNECT6,
    PROG_SK_LOOKUP, PodInfo, PortKey, TupleKey, VERDICTS, is_v4_mapped, v4_mapped, verdict,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
/// cgroup/connect: let the connect proceed.
const CONNECT_ALLOW: i32 = 1;
/// sk_lookup: continue (with the assigned socket, if any).
const SK_PASS: u32 = 1;
const NO_POD: u32 = u32::MAX;

#[map(name = "NETNS_PODS")]
static NETNS_PODS: HashMap<u64, PodInfo> = HashMap::with_max_entries(MAX_PODS, 0);

#[map(name = "IP_PODS")]
static IP_PODS: HashMap<IpKey, IpPod> = HashMap::with_max_entries(MAX_PODS * 2, 0);

#[map(name = "POD_SOCKETS")]
static POD_SOCKETS: SockHash<u32> = SockHash::with_max_entries(MAX_PODS, 0);

#[map(name = "EXCLUDED_PORTS")]
static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(MAX_PORT_EXCLUSIONS, 0);

#[map(name = "EXCLUDED_CIDRS")]
static EXCLUDED_CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::with_max_entries(MAX_CIDR_EXCLUSIONS, 0);

#[map(name = "ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(ORIG_DST_MAX_ENTRIES, 0);

#[map(name = "ORIG_BY_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> =
    LruHashMap::with_max_entries(ORIG_DST_MAX_ENTRIES, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

/// A capture decision: counted always, reported as an event when `emit`.
struct Decision {
    program: u8,
    verdict: u8,
    netns_cookie: u64,
    pod_id: u32,
    dst: Addr,
    dst_port: u16,
    src: Addr,
    src_port: u16,
}

#[inline(always)]
fn record(d: &Decision, emit: bool) {
    let slot = d.program as u32 * VERDICTS + d.verdict as u32;
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // Per-CPU slot: a plain increment is race-free.
        unsafe { *c += 1 };
    }
    if !emit {
        return;
    }
    if let Some(mut e) = EVENTS.reserve::<CaptureEvent>(0) {
        e.write(CaptureEvent {
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            netns_cookie: d.netns_cookie,
            dst: d.dst,
            src: d.src,
            dst_port: d.dst_port,
            src_port: d.src_port,
            pod_id: d.pod_id,
            program: d.program,
            verdict: d.verdict,
            _pad: [0; 6],
        });
        e.submit(0);
    }
}

#[inline(always)]
fn is_loopback(addr: &Addr) -> bool {
    // ::1
    if addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1u32.to_be() {
        return true;
    }
    // 127.0.0.0/8, v4-mapped
    is_v4_mapped(addr) && (u32::from_be(addr[3]) >> 24) == 127
}

#[inline(always)]
fn is_agent_port(port: u16) -> bool {
    port == PORT_OUTBOUND || port == PORT_INBOUND || port == PORT_HBONE
}

#[inline(always)]
fn port_excluded(pod_id: u32, port: u16, direction: u8) -> bool {
    let key = PortKey {
        pod_id,
        port,
        direction,
        _pad: 0,
    };
    unsafe { EXCLUDED_PORTS.get(&key) }.is_some()
}

#[inline(always)]
fn cidr_excluded(pod_id: u32, addr: &Addr, direction: u8) -> bool {
    let key = Key::new(
        CIDR_KEY_FIXED_BITS + 128,
        CidrKey {
            pod_id_be: pod_id.to_be(),
            direction_be: (direction as u32).to_be(),
            addr: *addr,
        },
    );
    EXCLUDED_CIDRS.get(&key).is_some()
}

// ---------------------------------------------------------------------------------------------
// cgroup/connect4 and cgroup/connect6
// ---------------------------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, PROG_CONNECT4);
    CONNECT_ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, PROG_CONNECT6);
    CONNECT_ALLOW
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, program: u8) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid context for the duration of the program.
    let (ty, proto) = unsafe { ((*sa).type_, (*sa).protocol) };
    if ty != SOCK_STREAM || proto != IPPROTO_TCP {
        return;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let dst_port = u16::from_be(unsafe { (*sa).user_port } as u16);
    let dst: Addr = if program == PROG_CONNECT4 {
        v4_mapped(unsafe { (*sa).user_ip4 })
    } else {
        // Each 4-byte word separately: the verifier only allows 4-byte context reads here.
        unsafe {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        }
    };
    let mut d = Decision {
        program,
        verdict: verdict::NOT_ENROLLED,
        netns_cookie,
        pod_id: NO_POD,
        dst,
        dst_port,
        src: [0; 4],
        src_port: 0,
    };
    let cfg = config();
    // SAFETY: map values are plain data; a concurrent update can at worst give a stale pod.
    let pod = match unsafe { NETNS_PODS.get(&netns_cookie) } {
        Some(p) => *p,
        None => {
            record(&d, cfg.flags & CONFIG_TRACE_UNENROLLED != 0);
            return;
        }
    };
    d.pod_id = pod.pod_id;
    d.verdict = connect_verdict(ctx, &pod, &d, &cfg, program);
    if d.verdict != verdict::REDIRECTED {
        record(&d, true);
        return;
    }
    // Remember where the application wanted to go, then send it to the agent.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dst,
        port: dst_port,
        _pad: 0,
        pod_id: pod.pod_id,
    };
    if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        warn!(
            ctx,
            "weft: cannot record original destination; passing through"
        );
        d.verdict = verdict::ERROR;
        record(&d, true);
        return;
    }
    unsafe {
        if program == PROG_CONNECT4 {
            (*sa).user_ip4 = pod.ip4;
        } else if is_v4_mapped(&dst) {
            let mapped = v4_mapped(pod.ip4);
            (*sa).user_ip6[0] = mapped[0];
            (*sa).user_ip6[1] = mapped[1];
            (*sa).user_ip6[2] = mapped[2];
            (*sa).user_ip6[3] = mapped[3];
        } else {
            (*sa).user_ip6[0] = pod.ip6[0];
            (*sa).user_ip6[1] = pod.ip6[1];
            (*sa).user_ip6[2] = pod.ip6[2];
            (*sa).user_ip6[3] = pod.ip6[3];
        }
        (*sa).user_port = PORT_OUTBOUND.to_be() as u32;
    }
    debug!(
        ctx,
        "weft: redirected connect to port {} for pod {}", dst_port, pod.pod_id
    );
    record(&d, true);
}

/// Decides what to do with an enrolled pod's connect. Order matters: cheap, common reasons first.
#[inline(always)]
fn connect_verdict(
    ctx: &SockAddrContext,
    pod: &PodInfo,
    d: &Decision,
    cfg: &Config,
    program: u8,
) -> u8 {
    if pod.flags & POD_OPTED_OUT != 0 {
        return verdict::OPTED_OUT;
    }
    // The agent's own upstream sockets carry its mark.
    let mark = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() { 0 } else { (*sk).mark }
    };
    if cfg.agent_mark != 0 && mark == cfg.agent_mark {
        return verdict::AGENT_SOCKET;
    }
    if is_loopback(&d.dst) {
        return verdict::LOOPBACK;
    }
    if is_agent_port(d.dst_port) {
        return verdict::AGENT_PORT;
    }
    if port_excluded(pod.pod_id, d.dst_port, DIR_OUTBOUND) {
        return verdict::EXCLUDED_PORT;
    }
    if cidr_excluded(pod.pod_id, &d.dst, DIR_OUTBOUND) {
        return verdict::EXCLUDED_CIDR;
    }
    let v4 = program == PROG_CONNECT4 || is_v4_mapped(&d.dst);
    let needed = if v4 { POD_HAS_IP4 } else { POD_HAS_IP6 };
    if pod.flags & needed == 0 {
        return verdict::NO_ADDRESS;
    }
    verdict::REDIRECTED
}

// ---------------------------------------------------------------------------------------------
// sock_ops: move the original destination to a key the agent can compute, clean up on close.
// ---------------------------------------------------------------------------------------------

#[sock_ops]
pub fn weft_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    1
}

#[inline(always)]
fn try_sock_ops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Ask for state callbacks on captured sockets only, so closed or failed connects
        // delete their entries.
        if unsafe { ORIG_BY_COOKIE.get(&cookie) }.is_some()
            && ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err()
        {
            warn!(
                ctx,
                "weft: cannot enable state callbacks on a captured socket"
            );
        }
        return;
    }
    if op == BPF_SOCK_OPS_STATE_CB {
        if ctx.arg(1) != BPF_TCP_CLOSE {
            return;
        }
        let _ = ORIG_BY_COOKIE.remove(&cookie);
        if let Some(key) = tuple_key(ctx) {
            let _ = ORIG_BY_TUPLE.remove(&key);
        }
        return;
    }
    // ACTIVE_ESTABLISHED: runs before the final ACK leaves, so before the agent can accept.
    let orig = match unsafe { ORIG_BY_COOKIE.get(&cookie) } {
        Some(o) => *o,
        None => return,
    };
    if let Some(key) = tuple_key(ctx) {
        if ORIG_BY_TUPLE.insert(&key, &orig, 0).is_err() {
            warn!(
                ctx,
                "weft: cannot move original destination to its tuple key"
            );
        }
    }
    let _ = ORIG_BY_COOKIE.remove(&cookie);
}

/// The client-side address of a socket, as the agent will see it as the peer.
#[inline(always)]
fn tuple_key(ctx: &SockOpsContext) -> Option<TupleKey> {
    let ops: *const bpf_sock_ops = ctx.ops;
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    // Every field is read unconditionally, each with its own volatile load at a constant
    // offset: reads in separate branches get merged by LLVM into one load through a computed
    // context pointer, which the verifier rejects ("dereference of modified ctx ptr").
    let (ip4, ip6) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
        )
    };
    let addr = if family == AF_INET {
        v4_mapped(ip4)
    } else {
        ip6
    };
    let port = unsafe { core::ptr::read_volatile(&(*ops).local_port) };
    Some(TupleKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        port,
        _pad: 0,
    })
}

// ---------------------------------------------------------------------------------------------
// sk_lookup: steer inbound connections to the agent's inbound listener.
// ---------------------------------------------------------------------------------------------

#[sk_lookup]
pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) {
    let l = ctx.lookup;
    let (family, proto) = unsafe { ((*l).family, (*l).protocol) };
    if proto != IPPROTO_TCP {
        return;
    }
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    // Unconditional constant-offset reads (see `tuple_key`).
    let (l4, r4, l6, r6) = unsafe {
        (
            core::ptr::read_volatile(&(*l).local_ip4),
            core::ptr::read_volatile(&(*l).remote_ip4),
            [
                core::ptr::read_volatile(&(*l).local_ip6[0]),
                core::ptr::read_volatile(&(*l).local_ip6[1]),
                core::ptr::read_volatile(&(*l).local_ip6[2]),
                core::ptr::read_volatile(&(*l).local_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&(*l).remote_ip6[0]),
                core::ptr::read_volatile(&(*l).remote_ip6[1]),
                core::ptr::read_volatile(&(*l).remote_ip6[2]),
                core::ptr::read_volatile(&(*l).remote_ip6[3]),
            ],
        )
    };
    let (local, remote) = if family == AF_INET {
        (v4_mapped(l4), v4_mapped(r4))
    } else {
        (l6, r6)
    };
    let local_port = unsafe { core::ptr::read_volatile(&(*l).local_port) } as u16;
    let remote_port = u16::from_be(unsafe { core::ptr::read_volatile(&(*l).remote_port) });
    let mut d = Decision {
        program: PROG_SK_LOOKUP,
        verdict: verdict::NOT_ENROLLED,
        netns_cookie: 0,
        pod_id: NO_POD,
        dst: local,
        dst_port: local_port,
        src: remote,
        src_port: remote_port,
    };
    if is_loopback(&local) {
        d.verdict = verdict::LOOPBACK;
        record(&d, false);
        return;
    }
    let pod = match unsafe { IP_PODS.get(&IpKey { addr: local }) } {
        Some(p) => *p,
        None => {
            record(&d, config().flags & CONFIG_TRACE_UNENROLLED != 0);
            return;
        }
    };
    d.pod_id = pod.pod_id;
    // Frequent and expected: counted, not reported.
    if is_agent_port(local_port) {
        d.verdict = verdict::AGENT_PORT;
        record(&d, false);
        return;
    }
    if remote == local {
        d.verdict = verdict::SELF;
        record(&d, false);
        return;
    }
    d.verdict = if pod.flags & POD_OPTED_OUT != 0 {
        verdict::OPTED_OUT
    } else if port_excluded(pod.pod_id, local_port, DIR_INBOUND) {
        verdict::EXCLUDED_PORT
    } else if cidr_excluded(pod.pod_id, &remote, DIR_INBOUND) {
        verdict::EXCLUDED_CIDR
    } else {
        match POD_SOCKETS.redirect_sk_lookup(ctx, pod.pod_id, 0) {
            Ok(()) => verdict::REDIRECTED,
            Err(_) => verdict::NO_LISTENER,
        }
    };
    record(&d, true);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
