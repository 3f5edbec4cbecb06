//! HTTP connections to endpoints, kept open between requests: the pool under both forwarders
//! ([`crate::forward::Forwarder`] over plain TCP, [`crate::mesh::forward::MeshForwarder`]
//! through HBONE tunnels).
//!
//! * One map of idle connections per worker thread ([`crate::workers`]): a connection's task
//!   runs on the worker that opened it, and only that worker sends on it, so no request hops
//!   threads and workers never contend for a lock. Under `circuitBreaker.maxConnections` a
//!   backend has one map for all workers: separate maps would keep connections idle that a
//!   busy worker could not use while the limit makes it wait.
//! * An HTTP/1.1 connection comes back when its response body has ended (the body is
//!   [`Watched`]), last in first out; an HTTP/2 connection stays in the pool while requests
//!   share it.
//! * A request that finds no connection opens one. Under `maxConnections`, while every slot is
//!   taken it closes the idle HTTP/1.1 connection unused the longest (another endpoint's: one
//!   of its own would have been used; at most one per request) and waits for whichever comes
//!   first, a slot or a connection coming back, for at most [`CONNECTION_WAIT`].
//! * HTTP/2 requests for a key that has no connection while one is being opened for it wait
//!   for that one instead of all opening their own (if it fails, each then tries on its own;
//!   if its request goes away, one of them takes over). All waiting for a connection, here
//!   and under `maxConnections`, ends within [`CONNECTION_WAIT`].
//! * A pooled connection found closed before the request went out is replaced by a new one
//!   once; connections unused for [`IDLE_TIMEOUT`] are closed (swept every 10 s, by a task
//!   that ends with the pool).
//!
//! It replaces hyper-util's pooled client, whose per-request work (a task spawned per
//! response to return the connection, SipHash of the endpoint's authority byte by byte, a
//! boxed future) was a fifth of the waypoint's instructions per request.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::body::{End, UpstreamBody, Watch, Watched};

use crate::config::BackendProtocol;

/// An HTTP connection unused for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait for a connection slot under `maxConnections` before the request fails.
pub const CONNECTION_WAIT: Duration = Duration::from_secs(3);
/// Idle HTTP/1.1 connections kept per key; more are closed.
const MAX_IDLE_PER_KEY: usize = 64;
/// How often idle connections are swept (on use).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The sending half of an HTTP connection.
pub enum Sender {
    /// HTTP/1.1: one request at a time.
    H1(http1::SendRequest<UpstreamBody>),
    /// HTTP/2: shared by concurrent requests.
    H2(http2::SendRequest<UpstreamBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends `request`. When the connection turned out closed before the request was written,
    /// the error gives the request back for another connection.
    async fn send(
        &mut self,
        request: http::Request<UpstreamBody>,
    ) -> Result<http::Response<Incoming>, SendError> {
        let sent = match self {
            Sender::H1(s) => match s.ready().await {
                Ok(()) => s.try_send_request(request).await,
                Err(e) => return Err(SendError::NotSent(Box::new(request), e)),
            },
            Sender::H2(s) => match s.ready().await {
                Ok(()) => s.try_send_request(request).await,
                Err(e) => return Err(SendError::NotSent(Box::new(request), e)),
            },
        };
        sent.map_err(|mut e| match e.take_message() {
            Some(request) => SendError::NotSent(Box::new(request), e.into_error()),
            None => SendError::Failed(e.into_error()),
        })
    }
}

/// Why [`Sender::send`] failed.
enum SendError {
    /// The connection was closed before the request went out: the request, untouched.
    NotSent(Box<http::Request<UpstreamBody>>, hyper::Error),
    /// The request was (maybe partly) sent and failed.
    Failed(hyper::Error),
}

/// Why a request could not be sent.
#[derive(Debug)]
pub enum PoolError {
    /// `circuitBreaker.maxConnections` connections stayed open and busy for
    /// [`CONNECTION_WAIT`].
    Limit(usize),
    /// No connection could be opened: what failed, for the operator, and (from
    /// [`Pool::send`]) the request, which never left, so another endpoint may take it.
    Connect(String, Option<Box<http::Request<UpstreamBody>>>),
    /// The request failed on its connection (reset, closed, malformed response).
    Upstream(hyper::Error),
}

/// Starts HTTP (`protocol`) on `io` and spawns the connection's task on the current worker;
/// the task keeps `hold` (a connection slot, a tunnel's lease) until the connection ends.
pub async fn start<I, H>(io: I, protocol: BackendProtocol, hold: H) -> Result<Sender, hyper::Error>
where
    I: Read + Write + Unpin + Send + 'static,
    H: Send + 'static,
{
    match protocol {
        BackendProtocol::Http1 => {
            let (sender, connection) = http1::handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTP/1.1 connection to an endpoint ended");
                }
                drop(hold);
            });
            Ok(Sender::H1(sender))
        }
        BackendProtocol::Http2 => {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTP/2 connection to an endpoint ended");
                }
                drop(hold);
            });
            Ok(Sender::H2(sender))
        }
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

struct Shard<K> {
    by_key: HashMap<K, Vec<Idle>, foldhash::fast::RandomState>,
    /// HTTP/2: keys a connection is being opened for.
    connecting: HashMap<K, Arc<Opening>, foldhash::fast::RandomState>,
    swept: Instant,
}

/// An HTTP/2 connection being opened by one request, waited for by others.
#[derive(Default)]
struct Opening {
    /// Signalled when the attempt ends.
    ended: Arc<Notify>,
    /// Whether it failed (set before `ended` is signalled); not set when its request went
    /// away before the end.
    failed: AtomicBool,
}

/// The `maxConnections` bound: a slot per open connection.
struct Slots {
    semaphore: Arc<Semaphore>,
    max: usize,
    /// Signalled when a connection comes back, for requests waiting on a slot.
    returned: Notify,
}

/// `shard`, locked (a panic while it was held leaves nothing half-done: lists of senders).
fn lock<K>(shard: &Mutex<Shard<K>>) -> MutexGuard<'_, Shard<K>> {
    match shard.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// What a pool's connections are keyed by.
pub trait Key: Hash + Eq + Clone + Send + Sync + Unpin + 'static {}

impl<K: Hash + Eq + Clone + Send + Sync + Unpin + 'static> Key for K {}

/// Idle connections by key (what a connection is for: its endpoint, and in mesh mode the
/// identity it must present and the client the tunnel names).
pub struct Pool<K> {
    shards: Box<[Mutex<Shard<K>>]>,
    slots: Option<Slots>,
    idle_timeout: Duration,
    /// HTTP/2: concurrent requests share a connection, so those finding none while one is
    /// being opened for their key wait for it instead of opening their own.
    multiplexed: bool,
}

impl<K> std::fmt::Debug for Pool<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("shards", &self.shards.len())
            .field("max_connections", &self.slots.as_ref().map(|s| s.max))
            .finish()
    }
}

impl<K: Key> Pool<K> {
    /// A pool of `protocol` connections holding at most `max_connections` open (unbounded
    /// when `None`).
    pub fn new(protocol: BackendProtocol, max_connections: Option<usize>) -> Arc<Self> {
        Self::with_idle_timeout(protocol, max_connections, IDLE_TIMEOUT)
    }

    /// Like [`Pool::new`], closing connections unused for `idle_timeout`: on use, and from a
    /// task on the current runtime (when there is one) that sweeps every `idle_timeout / 2`
    /// (at most every 10 s) for as long as the pool exists.
    pub fn with_idle_timeout(
        protocol: BackendProtocol,
        max_connections: Option<usize>,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let shards = if max_connections.is_some() {
            1
        } else {
            crate::workers::count().max(1)
        };
        let pool = Arc::new(Pool {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        by_key: HashMap::default(),
                        connecting: HashMap::default(),
                        swept: Instant::now(),
                    })
                })
                .collect(),
            slots: max_connections.map(|max| Slots {
                semaphore: Arc::new(Semaphore::new(max)),
                max,
                returned: Notify::new(),
            }),
            idle_timeout,
            multiplexed: protocol == BackendProtocol::Http2,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pool = Arc::downgrade(&pool);
            let every = (idle_timeout / 2).clamp(Duration::from_millis(1), SWEEP_EVERY);
            runtime.spawn(async move {
                let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Some(pool) = pool.upgrade() else {
                        return;
                    };
                    let now = Instant::now();
                    for shard in &pool.shards {
                        pool.sweep(&mut lock(shard), now);
                    }
                }
            });
        }
        pool
    }

    /// Drops closed connections and those unused for the idle timeout.
    fn sweep(&self, shard: &mut Shard<K>, now: Instant) {
        shard.swept = now;
        for list in shard.by_key.values_mut() {
            list.retain(|idle| {
                !idle.sender.is_closed()
                    && now.saturating_duration_since(idle.since) < self.idle_timeout
            });
        }
        shard.by_key.retain(|_, list| !list.is_empty());
    }

    /// The current worker's shard.
    fn shard_index(&self) -> usize {
        crate::workers::current() % self.shards.len()
    }

    /// The current worker's idle connections.
    fn shard(&self) -> MutexGuard<'_, Shard<K>> {
        lock(&self.shards[self.shard_index()])
    }

    /// A pooled connection for `key`, if one is open.
    fn checkout(&self, key: &K) -> Option<Sender> {
        self.checkout_from(&mut self.shard(), key)
    }

    /// [`Pool::checkout`] from a shard already locked.
    fn checkout_from(&self, shard: &mut Shard<K>, key: &K) -> Option<Sender> {
        let now = Instant::now();
        if now.saturating_duration_since(shard.swept) > SWEEP_EVERY {
            self.sweep(shard, now);
        }
        let list = shard.by_key.get_mut(key)?;
        loop {
            let last = list.last_mut()?;
            if last.sender.is_closed() {
                list.pop();
                continue;
            }
            return match &last.sender {
                // HTTP/2 multiplexes: the connection stays in the pool for others.
                Sender::H2(s) => {
                    last.since = now;
                    Some(Sender::H2(s.clone()))
                }
                Sender::H1(_) => list.pop().map(|idle| idle.sender),
            };
        }
    }

    /// Closes the idle HTTP/1.1 connection to another key unused the longest, so that its
    /// slot goes to a request for `key` instead of the whole `maxConnections` staying with
    /// idle connections; but returns a connection for `key` (unless `fresh`) if one came back
    /// since the request looked. HTTP/2 connections are left alone: the pool cannot tell
    /// whether requests still share one.
    fn close_oldest_idle(&self, key: &K, fresh: bool) -> Evicted {
        let mut shard = self.shard();
        if !fresh && let Some(sender) = self.checkout_from(&mut shard, key) {
            return Evicted::Reused(sender);
        }
        let oldest = shard
            .by_key
            .iter()
            .filter(|(other, _)| *other != key)
            .filter_map(|(key, list)| {
                let (at, idle) = list
                    .iter()
                    .enumerate()
                    // Closed connections hold no slot: not candidates.
                    .filter(|(_, idle)| {
                        matches!(idle.sender, Sender::H1(_)) && !idle.sender.is_closed()
                    })
                    .min_by_key(|(_, idle)| idle.since)?;
                Some((idle.since, key.clone(), at))
            })
            .min_by_key(|(since, _, _)| *since);
        let Some((_, key, at)) = oldest else {
            return Evicted::Nothing;
        };
        if let Some(list) = shard.by_key.get_mut(&key) {
            list.remove(at);
            if list.is_empty() {
                shard.by_key.remove(&key);
            }
        }
        tracing::debug!("maxConnections reached: closed the oldest idle connection");
        Evicted::Closed
    }

    /// Takes back an HTTP/1.1 connection whose response has ended, or a new HTTP/2 one.
    fn checkin(&self, key: K, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        {
            let mut shard = self.shard();
            let list = shard.by_key.entry(key).or_default();
            if list.len() < MAX_IDLE_PER_KEY {
                list.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
        if let Some(slots) = &self.slots {
            slots.returned.notify_waiters();
        }
    }

    /// HTTP/2, no connection pooled for `key`: waits (until `deadline`) for a connection
    /// being opened for it by another request, or marks `key` as being connected by this one.
    async fn join_connect(&self, key: &K, deadline: Instant) -> Joined<'_, K> {
        let index = self.shard_index();
        loop {
            let (opening, ended) = {
                let mut shard = lock(&self.shards[index]);
                if let Some(sender) = self.checkout_from(&mut shard, key) {
                    return Joined::Pooled(sender);
                }
                match shard.connecting.get(key) {
                    // Made under the lock: the attempt's end cannot come in between.
                    Some(opening) => (opening.clone(), opening.ended.clone().notified_owned()),
                    None => {
                        shard.connecting.insert(key.clone(), Arc::default());
                        return Joined::Connecting(Connecting {
                            pool: self,
                            index,
                            key: key.clone(),
                            failed: false,
                        });
                    }
                }
            };
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                // Taking too long: this request tries on its own (a slot wait ends at once).
                return Joined::Alone;
            }
            if opening.failed.load(Ordering::Acquire) {
                // That attempt failed: each waiter tries on its own rather than queueing
                // behind failing attempts one after another.
                return match self.checkout(key) {
                    Some(sender) => Joined::Pooled(sender),
                    None => Joined::Alone,
                };
            }
            // It succeeded (the connection is pooled) or its request went away (one of the
            // waiters takes over): look again.
        }
    }

    /// A connection for `key` (and whether it was pooled): a pooled one unless `fresh`, else
    /// one from `connect`, given the connection's slot under `maxConnections`.
    async fn acquire<C, F>(
        &self,
        key: &K,
        fresh: bool,
        connect: &C,
    ) -> Result<(Sender, bool), PoolError>
    where
        C: Fn(Option<OwnedSemaphorePermit>) -> F,
        F: Future<Output = Result<Sender, String>>,
    {
        let pooled = |pool: &Self| if fresh { None } else { pool.checkout(key) };
        if let Some(sender) = pooled(self) {
            return Ok((sender, true));
        }
        // One bound for all the waiting below.
        let deadline = Instant::now() + CONNECTION_WAIT;
        // Until this request's attempt ends, other HTTP/2 requests for `key` wait for it.
        let mut connecting = None;
        if self.multiplexed && !fresh {
            match self.join_connect(key, deadline).await {
                Joined::Pooled(sender) => return Ok((sender, true)),
                Joined::Connecting(marker) => connecting = Some(marker),
                Joined::Alone => {}
            }
        }
        let permit = match &self.slots {
            None => None,
            Some(slots) => {
                // At most one idle connection closed per request: one slot is all it needs
                // (another closed before that one's slot is free would be churn).
                let mut closed_one = false;
                loop {
                    // Registered before looking, so a connection coming back in between is
                    // not missed.
                    let returned = slots.returned.notified();
                    tokio::pin!(returned);
                    returned.as_mut().enable();
                    if let Some(sender) = pooled(self) {
                        return Ok((sender, true));
                    }
                    if let Ok(permit) = slots.semaphore.clone().try_acquire_owned() {
                        break Some(permit);
                    }
                    // Every slot is taken. An idle connection to another endpoint gives its
                    // slot up (its task ends, freeing the slot this request waits on below),
                    // unless one for `key` came back meanwhile.
                    if !closed_one {
                        match self.close_oldest_idle(key, fresh) {
                            Evicted::Reused(sender) => return Ok((sender, true)),
                            Evicted::Closed => closed_one = true,
                            Evicted::Nothing => {}
                        }
                    }
                    tokio::select! {
                        permit = slots.semaphore.clone().acquire_owned() => match permit {
                            Ok(permit) => break Some(permit),
                            Err(_) => return Err(PoolError::Limit(slots.max)),
                        },
                        () = &mut returned => {}
                        () = tokio::time::sleep_until(deadline) => return Err(PoolError::Limit(slots.max)),
                    }
                }
            }
        };
        let sender = match connect(permit).await {
            Ok(sender) => sender,
            Err(e) => {
                if let Some(connecting) = &mut connecting {
                    connecting.failed = true;
                }
                return Err(PoolError::Connect(e, None));
            }
        };
        // A new HTTP/2 connection is shared at once, not after its first response: requests
        // arriving meanwhile use it instead of opening more.
        if let Sender::H2(s) = &sender {
            self.checkin(key.clone(), Sender::H2(s.clone()));
        }
        Ok((sender, false))
    }

    /// Sends `request` on a connection for `key` (see the module docs), opening one with
    /// `connect` when none is pooled. The response body returns an HTTP/1.1 connection to the
    /// pool when it ends.
    pub async fn send<C, F>(
        self: &Arc<Self>,
        key: K,
        mut request: http::Request<UpstreamBody>,
        connect: C,
    ) -> Result<http::Response<crate::body::Body>, PoolError>
    where
        C: Fn(Option<OwnedSemaphorePermit>) -> F,
        F: Future<Output = Result<Sender, String>>,
    {
        // A streamed body may still be going out when the response has ended (an endpoint
        // that answers before reading the whole upload): its HTTP/1.1 connection is not given
        // back to the pool, where the next request would wait behind the upload.
        let streamed = request.body().is_streamed();
        let mut fresh = false;
        loop {
            let (mut sender, reused) = match self.acquire(&key, fresh, &connect).await {
                Ok(acquired) => acquired,
                Err(PoolError::Connect(reason, _)) => {
                    return Err(PoolError::Connect(reason, Some(Box::new(request))));
                }
                Err(e) => return Err(e),
            };
            match sender.send(request).await {
                Ok(response) => {
                    return Ok(match sender {
                        Sender::H1(_) if streamed => response.map(BodyExt::boxed),
                        Sender::H1(_) => response.map(|body| {
                            let back = GiveBack {
                                pool: self.clone(),
                                key,
                                sender,
                            };
                            Watched::ending_if_empty(body, back).boxed()
                        }),
                        // In the pool already (a new one since it connected).
                        Sender::H2(_) => response.map(BodyExt::boxed),
                    });
                }
                // A pooled connection closed before the request went out: once more on a
                // new one.
                Err(SendError::NotSent(back, e)) if reused => {
                    tracing::debug!(error = %e, "pooled connection closed; retrying on a new one");
                    request = *back;
                    fresh = true;
                }
                Err(SendError::NotSent(_, e) | SendError::Failed(e)) => {
                    return Err(PoolError::Upstream(e));
                }
            }
        }
    }
}

/// What [`Pool::close_oldest_idle`] did.
enum Evicted {
    /// Found a connection for the request's own key instead.
    Reused(Sender),
    /// Closed another key's idle connection: its slot comes free when its task ends.
    Closed,
    /// Found nothing idle to close.
    Nothing,
}

/// What [`Pool::join_connect`] found.
enum Joined<'a, K: Key> {
    /// A connection (another request's attempt succeeded).
    Pooled(Sender),
    /// Nothing: this request opens the connection, others wait for it.
    Connecting(Connecting<'a, K>),
    /// Nothing, after waiting for another request's attempt: this request opens its own.
    Alone,
}

/// Marks a connection to `key` as being opened; when dropped (the attempt ended, or its
/// request was), wakes the requests waiting for it.
struct Connecting<'a, K: Key> {
    pool: &'a Pool<K>,
    index: usize,
    key: K,
    /// The attempt failed.
    failed: bool,
}

impl<K: Key> Drop for Connecting<'_, K> {
    fn drop(&mut self) {
        let opening = lock(&self.pool.shards[self.index])
            .connecting
            .remove(&self.key);
        if let Some(opening) = opening {
            opening.failed.store(self.failed, Ordering::Release);
            opening.ended.notify_waiters();
        }
    }
}

/// Returns an HTTP/1.1 connection to the pool when its response body ends (see
/// [`crate::body::Watched`]). A body that failed or was dropped before its end drops the
/// connection (it still carries the rest of the response, or is broken).
struct GiveBack<K: Key> {
    pool: Arc<Pool<K>>,
    key: K,
    sender: Sender,
}

impl<K: Key> Watch for GiveBack<K> {
    fn end(self, how: End) {
        if how == End::Complete {
            self.pool.checkin(self.key, self.sender);
        }
    }
}
