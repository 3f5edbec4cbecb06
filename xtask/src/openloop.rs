//! An open-loop HTTP/1.1 load generator for the benchmarks: requests go out at a fixed rate,
//! whether or not the proxy keeps up, so latency is measured below saturation and without
//! coordinated omission (a closed-loop tool like wrk sends the next request only when the last
//! one came back, so a stall delays the requests that would have seen it, and at saturation its
//! percentiles measure the machine's scheduler more than the proxy).
//!
//! A pacer thread releases each connection's requests on schedule (every `connections / rate`
//! seconds per connection, the connections staggered); each connection sends them one after
//! another on one keep-alive connection. A request's latency runs from its release to the end
//! of its response, so time spent queued behind a slow response on its connection counts, and
//! the pacer's own lateness (it sleeps in steps of [`TICK`]) does not.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How often the pacer wakes to release the requests due.
const TICK: Duration = Duration::from_micros(100);

/// What one fixed-rate run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Responses completed per second during the measured period (the rate, when the proxy
    /// keeps up).
    pub achieved_rps: f64,
    /// Latency percentiles in microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Responses that were not 2xx (a connection that fails fails the whole run).
    pub errors: u64,
}

/// `rate` requests per second of `GET path` to `addr` over `connections` keep-alive
/// connections for `duration` (after a 1 s warm-up at the same rate, not measured).
pub fn run(
    addr: SocketAddr,
    path: &str,
    rate: u32,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Measured> {
    if rate == 0 || connections == 0 {
        bail!("a fixed-rate run needs a rate and connections above 0");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the load generator's runtime")?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: weft-bench\r\n\r\n")
        .into_bytes();
    let warmup = Duration::from_secs(1);
    let mut senders = Vec::with_capacity(connections);
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (tx, rx) = mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        tasks.push(runtime.spawn(connection(addr, request.clone(), rx)));
    }
    // The pacer: connection `c` sends its `k`th request at
    // `start + (k * connections + c) / rate`.
    let interval = Duration::from_secs_f64(connections as f64 / f64::from(rate));
    let stagger = interval / connections as u32;
    let pacer = std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || {
            let start = Instant::now() + Duration::from_millis(20);
            let end = start + warmup + duration;
            let mut next: Vec<Instant> = (0..connections)
                .map(|c| start + stagger * c as u32)
                .collect();
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                for (c, due) in next.iter_mut().enumerate() {
                    while *due <= now && *due < end {
                        // Released now (the pacer's own lateness is not the proxy's); a closed
                        // channel means that connection failed, which fails the run.
                        let _ = senders[c].send(now);
                        *due += interval;
                    }
                }
                std::thread::sleep(TICK);
            }
            (start + warmup, end)
            // `senders` dropped: the connections finish what they have and return.
        })
        .context("starting the pacer thread")?;
    let results = runtime.block_on(async {
        let mut all = Vec::with_capacity(tasks.len());
        for task in tasks {
            all.push(task.await);
        }
        all
    });
    let (measured_from, end) = pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    let mut latencies = Vec::new();
    let mut completed = 0usize;
    let mut errors = 0;
    for result in results {
        match result {
            Ok(Ok(samples)) => {
                errors += samples.errors;
                for (released, finished, us) in samples.done {
                    if (measured_from..end).contains(&finished) {
                        completed += 1;
                    }
                    if released >= measured_from {
                        latencies.push(us);
                    }
                }
            }
            Ok(Err(e)) => bail!("load generator connection to {addr}: {e:#}"),
            Err(e) => bail!("load generator task: {e}"),
        }
    }
    if latencies.is_empty() {
        bail!("no request to {addr} was answered in the measured period");
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i])
    };
    Ok(Measured {
        achieved_rps: completed as f64 / duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        errors,
    })
}

/// What one connection saw: (release time, completion time, latency in µs) per answered
/// request.
struct Samples {
    done: Vec<(Instant, Instant, u32)>,
    errors: u64,
}

/// Sends one request per release received on `due`, each after the previous response.
async fn connection(
    addr: SocketAddr,
    request: Vec<u8>,
    mut due: mpsc::UnboundedReceiver<Instant>,
) -> anyhow::Result<Samples> {
    let mut stream = open(addr).await?;
    let mut samples = Samples {
        done: Vec::new(),
        errors: 0,
    };
    let mut buf = Vec::with_capacity(4096);
    while let Some(released) = due.recv().await {
        stream.write_all(&request).await?;
        let (status, close) = match read_response(&mut stream, &mut buf).await? {
            Some(answer) => answer,
            // Closed before answering (a keep-alive connection the server was done with,
            // e.g. nginx after `keepalive_requests`): once more on a new one.
            None => {
                stream = open(addr).await?;
                stream.write_all(&request).await?;
                read_response(&mut stream, &mut buf)
                    .await?
                    .context("the proxy closed a new connection without answering")?
            }
        };
        if close {
            stream = open(addr).await?;
        }
        let finished = Instant::now();
        let us = u32::try_from((finished - released).as_micros()).unwrap_or(u32::MAX);
        if (200..300).contains(&status) {
            samples.done.push((released, finished, us));
        } else {
            samples.errors += 1;
        }
    }
    Ok(samples)
}

/// A new connection to `addr`, without Nagle.
async fn open(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads one response (head and a `Content-Length` body) into `buf`: its status and whether
/// the server closes the connection after it (`Connection: close`); `None` when the connection
/// was closed (or reset) before any byte of it.
async fn read_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Option<(u16, bool)>> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let (head_end, status, length, close) = loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return Ok(None),
            Ok(0) => bail!("the proxy closed the connection mid-response"),
            Ok(n) => n,
            Err(e) => return Err(e).context("reading a response"),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
            let (status, length, close) = parse_head(head)?;
            break (end + 4, status, length, close);
        }
        if buf.len() > 64 * 1024 {
            bail!("response head larger than 64 KiB");
        }
    };
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the proxy closed the connection mid-body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Some((status, close)))
}

/// The status, `Content-Length` (0 when absent) and `Connection: close` of a response head.
fn parse_head(head: &str) -> anyhow::Result<(u16, usize, bool)> {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status line in {head:?}"))?;
    let mut length = 0;
    let mut close = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("chunked responses are not supported by the load generator");
            }
            if name.eq_ignore_ascii_case("content-length") {
                length = value
                    .trim()
                    .parse()
                    .with_context(|| format!("bad Content-Length {value:?}"))?;
            }
            if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
    }
    Ok((status, length, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed() {
        assert_eq!(
            parse_head("HTTP/1.1 200 OK\r\ncontent-length: 71\r\nX: y").expect("head"),
            (200, 71, false)
        );
        assert_eq!(
            parse_head("HTTP/1.1 204 No Content\r\nConnection: Close").expect("head"),
            (204, 0, true)
        );
        assert!(parse_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked").is_err());
        assert!(parse_head("garbage").is_err());
    }

    /// A server on loopback answering each request `ok` after `delay`; it closes a
    /// connection, without a word, after `close_after` requests on it.
    fn server(delay: Duration, close_after: usize) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut pending = Vec::new();
                    let mut served = 0;
                    loop {
                        let n = match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            std::thread::sleep(delay);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).is_err() {
                                return;
                            }
                            served += 1;
                            if served == close_after {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn a_fixed_rate_is_kept_and_a_slow_server_shows_in_the_latency() {
        // A server answering every request after 20 ms: at 30 req/s on one connection, no
        // request waits for another.
        let addr = server(Duration::from_millis(20), usize::MAX);
        let fast = run(addr, "/", 30, 1, Duration::from_secs(1)).expect("run at 30/s");
        assert!((25.0..=35.0).contains(&fast.achieved_rps), "{fast:?}");
        assert!(
            fast.p50_us >= 20_000.0 && fast.p99_us < 150_000.0,
            "{fast:?}"
        );
        assert_eq!(fast.errors, 0);
        // 100 req/s on one connection that serves 50/s: half the rate gets through, and the
        // requests wait for those before them (the backlog grows to ~50 over the second),
        // where a closed-loop tool would report 20 ms and send fewer requests.
        let slow = run(addr, "/", 100, 1, Duration::from_secs(1)).expect("run at 100/s");
        assert!((40.0..=60.0).contains(&slow.achieved_rps), "{slow:?}");
        assert!(slow.p99_us > 500_000.0, "{slow:?}");
    }

    #[test]
    fn connections_the_server_closes_are_opened_again() {
        // Closed after every 3 requests, as nginx does after `keepalive_requests`.
        let addr = server(Duration::ZERO, 3);
        let m = run(addr, "/", 200, 2, Duration::from_secs(1)).expect("run");
        assert_eq!(m.errors, 0);
        assert!((170.0..=230.0).contains(&m.achieved_rps), "{m:?}");
    }
}
