//! What the benchmark floors (`hyper_floor`, `httparse_floor`) share: their arguments, their
//! threads (each runs its own current-thread runtime) and their listeners (one `SO_REUSEPORT`
//! socket per thread, the kernel spreading connections over them).

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;

/// `LISTEN UPSTREAM [THREADS [OPTION]]`.
pub struct Args {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub threads: usize,
    /// The word after THREADS, if any.
    pub option: Option<String>,
}

/// The command line's arguments; `usage` names the program and its option.
pub fn args(usage: &str) -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    Ok(Args {
        listen: args
            .next()
            .context(usage.to_string())?
            .parse()
            .context(usage.to_string())?,
        upstream: args
            .next()
            .context(usage.to_string())?
            .parse()
            .context(usage.to_string())?,
        threads: args
            .next()
            .map_or(Ok(1), |t| t.parse())
            .context(usage.to_string())?,
        option: args.next(),
    })
}

/// Runs `work` on `threads` threads of its own until one fails.
pub fn on_threads<F>(threads: usize, work: F) -> anyhow::Result<()>
where
    F: Fn() -> anyhow::Result<()> + Send + Clone + 'static,
{
    let workers: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(work.clone()))
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    Ok(())
}

/// A current-thread runtime, for one of the threads.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// This thread's listener on `addr` (`SO_REUSEPORT`).
pub fn reuseport_listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(1024)?)
}
