//! Capture decisions reported by the kernel programs: read from the ring buffer, counted in
//! metrics, and kept (the most recent ones) for `GET /debug/capture`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::unix::AsyncFd;
use weft_ebpf_common::{self as common, CaptureEvent, verdict};

use crate::capture::{EventRing, ip_of, parse_event};

/// How many recent decisions the agent keeps for the admin API.
pub const RECENT_EVENTS: usize = 4096;

/// A capture decision, ready for humans and JSON.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CaptureRecord {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub program: &'static str,
    pub verdict: &'static str,
    /// `namespace/name` of the pod, when the decision concerned an enrolled pod.
    pub pod: Option<String>,
    pub netns_cookie: u64,
    /// Destination as the application asked for it.
    pub dst: SocketAddr,
    /// Source (inbound decisions only).
    pub src: Option<SocketAddr>,
}

/// Program name for a `PROG_*` value.
pub fn program_name(p: u8) -> &'static str {
    match p {
        common::PROG_CONNECT4 => "connect4",
        common::PROG_CONNECT6 => "connect6",
        common::PROG_SK_LOOKUP => "sk_lookup",
        _ => "unknown",
    }
}

/// Verdict name for a `verdict::*` value.
pub fn verdict_name(v: u8) -> &'static str {
    verdict::NAMES.get(v as usize).copied().unwrap_or("unknown")
}

/// Recent decisions plus the pod-id → name table used to label them.
#[derive(Default)]
pub struct EventLog {
    recent: Mutex<VecDeque<CaptureRecord>>,
    pod_names: RwLock<HashMap<u32, String>>,
}

impl EventLog {
    pub fn set_pod_name(&self, pod_id: u32, name: Option<String>) {
        let mut names = match self.pod_names.write() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        match name {
            Some(n) => names.insert(pod_id, n),
            None => names.remove(&pod_id),
        };
    }

    /// The most recent `limit` decisions, oldest first, optionally filtered.
    pub fn recent(
        &self,
        limit: usize,
        filter: impl Fn(&CaptureRecord) -> bool,
    ) -> Vec<CaptureRecord> {
        let recent = match self.recent.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let mut out: Vec<_> = recent
            .iter()
            .rev()
            .filter(|r| filter(r))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    fn record(&self, e: &CaptureEvent, clock: &Clock) {
        let pod = if e.pod_id == u32::MAX {
            None
        } else {
            let names = match self.pod_names.read() {
                Ok(n) => n,
                Err(p) => p.into_inner(),
            };
            Some(
                names
                    .get(&e.pod_id)
                    .cloned()
                    .unwrap_or_else(|| format!("pod#{}", e.pod_id)),
            )
        };
        let program = program_name(e.program);
        let verdict = verdict_name(e.verdict);
        metrics::counter!("weft_capture_events_total", "program" => program, "verdict" => verdict)
            .increment(1);
        let src = (e.program == common::PROG_SK_LOOKUP)
            .then(|| SocketAddr::new(ip_of(&e.src), e.src_port));
        let rec = CaptureRecord {
            time_ms: clock.wall_ms(e.ktime_ns),
            program,
            verdict,
            pod,
            netns_cookie: e.netns_cookie,
            dst: SocketAddr::new(ip_of(&e.dst), e.dst_port),
            src,
        };
        tracing::debug!(target: "weft::capture", ?rec, "capture decision");
        let mut recent = match self.recent.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(rec);
    }
}

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) into wall-clock time.
struct Clock {
    offset_ns: i128,
}

impl Clock {
    fn new() -> Self {
        let mono = monotonic_ns();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos() as i128;
        Self {
            offset_ns: wall - mono as i128,
        }
    }

    fn wall_ms(&self, ktime_ns: u64) -> u64 {
        ((ktime_ns as i128 + self.offset_ns) / 1_000_000).max(0) as u64
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads the ring buffer until the task is dropped.
pub async fn run(ring: EventRing, log: Arc<EventLog>) -> std::io::Result<()> {
    let clock = Clock::new();
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd owns the ring.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match parse_event(&item) {
                Some(e) => log.record(&e, &clock),
                None => tracing::warn!(len = item.len(), "short capture event ignored"),
            }
        }
        guard.clear_ready();
    }
}
