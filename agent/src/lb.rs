//! Latency-aware endpoint choice for Service VIPs: power of two choices over a cost that is the
//! EWMA of connect latency times (outstanding connections + 1), as in Finagle/Linkerd's
//! "P2C + peak EWMA" family. An endpoint never measured costs nothing, so new endpoints are tried
//! soon; a failed connect counts as a slow one. The average decays toward zero while an
//! endpoint is not measured (time constant [`DECAY`]), so an endpoint that failed once is tried
//! again later instead of being avoided for ever.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng as _;

/// Weight of a new sample in the moving average.
const ALPHA: f64 = 0.3;
/// What a failed connect counts as.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// Time constant of the average's decay while an endpoint is not measured.
pub const DECAY: Duration = Duration::from_secs(10);

/// Nanoseconds since the first use (a shared monotonic epoch).
fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

#[derive(Default)]
struct Stats {
    /// EWMA of connect latency, nanoseconds (f64 bits).
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated ([`now_ns`]).
    updated_ns: AtomicU64,
    outstanding: AtomicU64,
}

impl Stats {
    /// The average as of `now`, decayed for the time since it was measured.
    fn ewma_at(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let age = now.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        ewma * (-age / DECAY.as_nanos() as f64).exp()
    }

    fn cost(&self) -> f64 {
        (self.ewma_at(now_ns()) + 1.0) * (self.outstanding.load(Ordering::Relaxed) as f64 + 1.0)
    }

    fn observe(&self, latency: Duration) {
        let sample = latency.as_nanos() as f64;
        let now = now_ns();
        let old = self.ewma_at(now);
        let next = if old == 0.0 {
            sample
        } else {
            ALPHA * sample + (1.0 - ALPHA) * old
        };
        // Racing observers may lose a sample; the average stays an average.
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
        self.updated_ns.store(now, Ordering::Relaxed);
    }
}

/// Per-endpoint statistics, shared by every connection of the agent.
#[derive(Default)]
pub struct Balancer {
    stats: Mutex<HashMap<IpAddr, Arc<Stats>>>,
}

/// One connection's claim on an endpoint: counted as outstanding until dropped.
pub struct Pick {
    pub ip: IpAddr,
    stats: Arc<Stats>,
}

impl Pick {
    /// Records how long the connection took to establish (or [`FAILURE_PENALTY`]).
    pub fn observe(&self, latency: Duration) {
        self.stats.observe(latency);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.stats.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    fn stats(&self, ip: IpAddr) -> Arc<Stats> {
        let mut m = match self.stats.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(ip).or_default().clone()
    }

    /// Picks one of `candidates` (none: `None`).
    pub fn pick(&self, candidates: &[IpAddr]) -> Option<Pick> {
        let ip = match candidates {
            [] => return None,
            [one] => *one,
            _ => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..candidates.len());
                let mut b = rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (ia, ib) = (candidates[a], candidates[b]);
                if self.stats(ia).cost() <= self.stats(ib).cost() {
                    ia
                } else {
                    ib
                }
            }
        };
        let stats = self.stats(ip);
        stats.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Pick { ip, stats })
    }

    /// Forgets endpoints no longer in any service.
    pub fn retain(&self, keep: impl Fn(&IpAddr) -> bool) {
        let mut m = match self.stats.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.retain(|ip, s| keep(ip) || s.outstanding.load(Ordering::Relaxed) > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn slow_endpoints_get_less_traffic_and_every_endpoint_is_used() {
        let lb = Balancer::default();
        let (fast, slow) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let c = [fast, slow];
        lb.pick(&[fast])
            .expect("pick")
            .observe(Duration::from_micros(100));
        lb.pick(&[slow])
            .expect("pick")
            .observe(Duration::from_millis(20));
        let mut n_fast = 0;
        for _ in 0..1000 {
            let p = lb.pick(&c).expect("pick");
            if p.ip == fast {
                n_fast += 1;
            }
        }
        // With two endpoints P2C compares both every time: the fast one always wins.
        assert_eq!(n_fast, 1000);
    }

    #[test]
    fn a_failed_endpoint_is_forgiven_as_its_penalty_decays() {
        let s = Stats::default();
        s.observe(FAILURE_PENALTY);
        let t0 = s.updated_ns.load(Ordering::Relaxed);
        let fresh = s.ewma_at(t0);
        let later = s.ewma_at(t0 + 5 * DECAY.as_nanos() as u64);
        assert!((fresh - 1e9).abs() < 1.0, "{fresh}");
        assert!(later < fresh / 100.0, "{later}");
    }

    #[test]
    fn outstanding_connections_spread_load() {
        let lb = Balancer::default();
        let c = [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")];
        let held: Vec<Pick> = (0..300).filter_map(|_| lb.pick(&c)).collect();
        for e in c {
            let n = held.iter().filter(|p| p.ip == e).count();
            assert!((60..=140).contains(&n), "{e}: {n} of 300");
        }
        drop(held);
        assert!(lb.pick(&[]).is_none());
    }
}
