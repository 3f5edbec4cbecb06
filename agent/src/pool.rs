//! The HBONE connection pool: one HTTP/2-over-mTLS connection per (source identity,
//! destination pod) pair carries many tunnels. A connection takes at most
//! [`weft_tunnel::hbone::MAX_STREAMS`] tunnels at once (then another is opened), and one that
//! carried nothing for the idle timeout is closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use weft_tunnel::hbone::{Client, MAX_STREAMS};

/// What a pooled connection is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    /// The source pod (its agent-local id): the connection is opened from its network
    /// namespace and carries its address, so pods sharing a service account never share one
    /// (the destination authorizes `ipBlocks` on that address).
    pub pod: u32,
    /// SPIFFE ID the connection authenticates as.
    pub source: String,
    /// The destination pod's address (the tunnel ends at its port 15008).
    pub destination: IpAddr,
    /// SPIFFE ID the destination must present.
    pub expected: String,
    /// Expiry of the source certificate the connection presents: a renewed certificate starts
    /// new connections (old ones idle out).
    pub generation: i64,
}

/// Use accounting shared by a pooled connection and its leases.
struct Usage {
    id: u64,
    active: AtomicUsize,
    /// Milliseconds since the pool's epoch when the last lease was released.
    released_ms: AtomicU64,
}

struct Pooled {
    client: Client,
    usage: Arc<Usage>,
}

/// A tunnel's claim on its pooled connection; released when dropped.
pub struct Lease {
    pub client: Client,
    usage: Arc<Usage>,
    epoch: Instant,
    /// Whether this lease opened a new connection.
    pub fresh: bool,
}

impl Lease {
    /// Identifies the pooled connection (for [`Pool::evict`]).
    pub fn connection_id(&self) -> u64 {
        self.usage.id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.usage
            .released_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        self.usage.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pool.
pub struct Pool {
    epoch: Instant,
    next_id: AtomicU64,
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// One connect at a time per key, so a burst of connections shares the first handshake.
    opening: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            idle_timeout,
        })
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Pooled>>> {
        match self.conns.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        }
    }

    fn try_reuse(&self, key: &PoolKey) -> Option<Lease> {
        let mut conns = self.conns();
        let list = conns.get_mut(key)?;
        list.retain(|p| !p.client.is_closed());
        let p = list
            .iter()
            .find(|p| p.usage.active.load(Ordering::Acquire) < MAX_STREAMS as usize)?;
        p.usage.active.fetch_add(1, Ordering::AcqRel);
        Some(Lease {
            client: p.client.clone(),
            usage: p.usage.clone(),
            epoch: self.epoch,
            fresh: false,
        })
    }

    /// A connection for `key`: a pooled one with room, or a new one made by `connect`.
    pub async fn get<F, Fut, E>(&self, key: &PoolKey, connect: F) -> Result<Lease, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Client, E>>,
    {
        if let Some(l) = self.try_reuse(key) {
            return Ok(l);
        }
        let gate = {
            let mut o = match self.opening.lock() {
                Ok(o) => o,
                Err(p) => p.into_inner(),
            };
            o.entry(key.clone()).or_default().clone()
        };
        let _held = gate.lock().await;
        if let Some(l) = self.try_reuse(key) {
            return Ok(l);
        }
        let client = connect().await?;
        let usage = Arc::new(Usage {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            active: AtomicUsize::new(1),
            released_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
        });
        self.conns().entry(key.clone()).or_default().push(Pooled {
            client: client.clone(),
            usage: usage.clone(),
        });
        metrics::counter!("weft_hbone_connections_opened_total").increment(1);
        self.publish();
        Ok(Lease {
            client,
            usage,
            epoch: self.epoch,
            fresh: true,
        })
    }

    /// Removes a connection that failed (it may not know it is dead yet): the next lease for
    /// the key opens a new one. Tunnels still on it keep running.
    pub fn evict(&self, key: &PoolKey, connection_id: u64) {
        if let Some(list) = self.conns().get_mut(key) {
            list.retain(|p| p.usage.id != connection_id);
        }
        self.publish();
    }

    /// Closes connections that carried no tunnel for longer than the timeout, and forgets
    /// closed ones.
    pub fn reap(&self) {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let idle_ms = self.idle_timeout.as_millis() as u64;
        {
            let mut conns = self.conns();
            for list in conns.values_mut() {
                list.retain(|p| {
                    let busy = p.usage.active.load(Ordering::Acquire) > 0;
                    let released = p.usage.released_ms.load(Ordering::Acquire);
                    !p.client.is_closed() && (busy || now_ms.saturating_sub(released) < idle_ms)
                });
            }
            conns.retain(|_, l| !l.is_empty());
        }
        let mut o = match self.opening.lock() {
            Ok(o) => o,
            Err(p) => p.into_inner(),
        };
        o.retain(|_, g| Arc::strong_count(g) > 1);
        drop(o);
        self.publish();
    }

    /// Pooled connections right now.
    pub fn size(&self) -> usize {
        self.conns().values().map(Vec::len).sum()
    }

    fn publish(&self) {
        metrics::gauge!("weft_hbone_pool_connections").set(self.size() as f64);
    }

    /// Reaps every few seconds, for as long as the pool lives.
    pub async fn run_reaper(self: Arc<Self>) {
        let every =
            (self.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.reap();
            // Hand memory freed by finished connections back to the kernel: a burst of large
            // transfers otherwise leaves the agent's RSS at its peak.
            // SAFETY: malloc_trim only walks the allocator's own free lists.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}
