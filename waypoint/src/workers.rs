//! Thread per core: the binary runs `--worker-threads` current-thread runtimes, each accepting
//! on its own `SO_REUSEPORT` copy of every listening socket (the kernel spreads connections
//! over them) and each sending to backends through its own connection pools, so a request
//! never hops between threads. State that must be common (compiled routes, circuits, budgets,
//! buckets, metrics) is shared and synchronised as before.
//!
//! Library users (tests) that do not call [`set_count`] get one worker: everything behaves as
//! on a single runtime.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNT: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Sets how many workers the process runs (before any backend is built: pools are sized by it).
pub fn set_count(n: usize) {
    COUNT.store(n.max(1), Ordering::Relaxed);
}

/// How many workers the process runs.
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Marks the calling thread as worker `index`.
pub fn enter(index: usize) {
    CURRENT.with(|c| c.set(index));
}

/// The calling thread's worker index (0 outside worker threads).
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// `copies` sockets listening on `address`; with more than one, each with `SO_REUSEPORT` so
/// that the kernel spreads incoming connections over them. Non-blocking, ready for
/// `tokio::net::TcpListener::from_std` on any runtime.
pub fn listen(address: SocketAddr, copies: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let copies = copies.max(1);
    let mut sockets = Vec::with_capacity(copies);
    for _ in 0..copies {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        if copies > 1 {
            socket.set_reuse_port(true)?;
        }
        if address.is_ipv6() {
            // `[::]` also accepts IPv4 (as `TcpListener::bind` does on Linux by default).
            socket.set_only_v6(false)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&address.into())?;
        socket.listen(1024)?;
        sockets.push(socket.into());
    }
    Ok(sockets)
}

/// How often [`keep_timer_armed`] wakes.
pub const TIMER_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// Keeps a timer due within [`TIMER_TICK`] on this worker's runtime, forever.
///
/// Tokio's timer driver writes to the runtime's eventfd whenever a timer is armed that is due
/// before every pending one, or while none is pending. A worker that went idle between two
/// requests had none, so the first timeout of the next request cost a `write(2)` and an extra
/// `epoll_wait(2)`: measured 0.35 `write`s per request under load. With this tick pending,
/// request timeouts (longer than the tick) never come first, and those syscalls are gone; the
/// price is 20 wake-ups per second per worker.
pub async fn keep_timer_armed() {
    loop {
        tokio::time::sleep(TIMER_TICK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_share_the_port_and_the_first_takes_an_ephemeral_one() {
        let first = listen("127.0.0.1:0".parse().expect("addr"), 1).expect("listen");
        let port = first[0].local_addr().expect("addr").port();
        assert_ne!(port, 0);
        // Without SO_REUSEPORT on the first, a second bind to its port fails (no hijack).
        assert!(listen(SocketAddr::from(([127, 0, 0, 1], port)), 2).is_err());
        let pair = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let free = pair.local_addr().expect("addr");
        drop(pair);
        let two = listen(free, 2).expect("two copies on one port");
        assert_eq!(two.len(), 2);
        assert_eq!(two[1].local_addr().expect("addr"), free);
    }

    #[test]
    fn the_worker_index_is_per_thread() {
        enter(3);
        assert_eq!(current(), 3);
        let other = std::thread::spawn(current).join().expect("thread");
        assert_eq!(other, 0);
    }
}
