//! Small TCP helpers for end-to-end tests: sockets created inside a network namespace, and an
//! echo server that tells each client how it saw the connection.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life,
//! so these helpers only switch namespace (with [`NetNs::run`]) for the `socket()` call; binding,
//! connecting and all I/O then happen from the caller's own namespace.

#![warn(missing_docs)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use weft_netns::NetNs;

/// How long [`TestServer`] threads wait in `poll`/`read` before looking at the stop flag again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Bound on a [`TestServer`] write, so that a client that never reads cannot wedge `Drop`.
const SERVER_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Read timeout [`ask`] installs when the stream has none, so a broken path fails the test
/// instead of hanging it.
const ASK_DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest hello line [`read_hello`] accepts.
const MAX_HELLO_LEN: usize = 1024;

/// Creates a TCP socket in the calling thread's namespace: close-on-exec, and IPv6-only for
/// IPv6 addresses so that v4 and v6 listeners on the same port never shadow each other.
fn tcp_socket(addr: &SocketAddr) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    Ok(sock)
}

fn netns_error(e: weft_netns::NetNsError) -> io::Error {
    io::Error::other(e)
}

/// Binds `sock` to `addr` with SO_REUSEADDR and listens.
fn bind_listen(sock: Socket, addr: SocketAddr) -> io::Result<TcpListener> {
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    Ok(sock.into())
}

/// Listens on `addr` in the calling thread's own namespace (no `setns`, so no root needed).
#[cfg(test)]
fn tcp_listen(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_listen(tcp_socket(&addr)?, addr)
}

/// Listens on `addr` inside network namespace `ns`: the socket is created in `ns` (with
/// SO_REUSEADDR, and IPv6-only for v6 addresses) and stays there, whichever thread uses it.
/// Port 0 picks a free port: read it with `local_addr()`.
pub fn tcp_listen_in(ns: &NetNs, addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = ns.run(|| tcp_socket(&addr)).map_err(netns_error)??;
    bind_listen(sock, addr)
}

/// Connects to `addr` from inside network namespace `ns`, giving up after `timeout`.
pub fn tcp_connect_in(ns: &NetNs, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = ns.run(|| tcp_socket(&addr)).map_err(netns_error)??;
    sock.connect_timeout(&addr.into(), timeout)?;
    sock.set_tcp_nodelay(true)?;
    Ok(sock.into())
}

/// The line of JSON a [`TestServer`] sends first on every connection:
/// `{"peer":"ip:port","local":"ip:port"}` (IPv6 as `[ip]:port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// The client's address as the server saw it (after any NAT or proxying).
    pub peer: SocketAddr,
    /// The server-side address of the connection (the address the client actually reached).
    pub local: SocketAddr,
}

/// An echo server for end-to-end tests, on a background thread.
///
/// For each connection it first writes one line of JSON ([`ServerHello`]), then echoes
/// everything it reads until the client closes its sending side (EOF), then closes. Dropping
/// the server stops accepting, ends open connections and joins every thread it started.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server listening on `addr` inside network namespace `ns` (port 0 picks a free
    /// port: see [`TestServer::local_addr`]).
    pub fn start(ns: &NetNs, addr: SocketAddr) -> io::Result<Self> {
        Self::from_listener(tcp_listen_in(ns, addr)?)
    }

    /// Serves connections from an existing listener (which can live in any namespace).
    pub fn from_listener(listener: TcpListener) -> io::Result<Self> {
        Self::with_handler(listener, Arc::new(serve))
    }

    /// A minimal HTTP/1.1 server in `ns` for waypoint tests: every request is answered `200`
    /// with the body `<name> <method> <path> xff=<x-forwarded-for or -> hdr=<x-* request
    /// headers and `traceparent` as k=v, sorted, comma-separated>` and `Connection: close`. Paths that change the answer: `/status/<code>...` (that code),
    /// `/fail-on/<name>/...` (500 from the server called `<name>` only), `/sleep/<ms>/...`
    /// (answered after `ms` milliseconds, at most 10 s).
    pub fn http(ns: &NetNs, addr: SocketAddr, name: &str) -> io::Result<Self> {
        let name = name.to_string();
        Self::with_handler(
            tcp_listen_in(ns, addr)?,
            Arc::new(move |stream, _peer, _stop| serve_http(stream, &name)),
        )
    }

    fn with_handler(listener: TcpListener, handler: Handler) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name(format!("test-server-{addr}"))
            .spawn({
                let stop = Arc::clone(&stop);
                let accepted = Arc::clone(&accepted);
                move || accept_loop(&listener, &stop, &accepted, &handler)
            })?;
        Ok(Self {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// The address the server listens on (with the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the server has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("test server {}: accept thread panicked", self.addr);
        }
    }
}

/// Serves one accepted connection until it ends or the server stops.
type Handler = Arc<dyn Fn(TcpStream, SocketAddr, &AtomicBool) -> io::Result<()> + Send + Sync>;

fn accept_loop(
    listener: &TcpListener,
    stop: &Arc<AtomicBool>,
    accepted: &AtomicUsize,
    handler: &Handler,
) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                let stop = Arc::clone(stop);
                let handler = Arc::clone(handler);
                let spawned = std::thread::Builder::new()
                    .name(format!("test-conn-{peer}"))
                    .spawn(move || {
                        if let Err(e) = handler(stream, peer, &stop) {
                            eprintln!("test server: connection from {peer}: {e}");
                        }
                    });
                match spawned {
                    Ok(handle) => conns.push(handle),
                    Err(e) => eprintln!("test server: cannot start a connection thread: {e}"),
                }
                conns.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(listener),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // ECONNABORTED and friends: the next connection may be fine.
                eprintln!("test server: accept: {e}");
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }
    for handle in conns {
        if handle.join().is_err() {
            eprintln!("test server: a connection thread panicked");
        }
    }
}

/// Waits until the listener has a connection to accept, for at most [`POLL_INTERVAL`].
fn wait_readable(listener: &TcpListener) {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = POLL_INTERVAL.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// One HTTP/1.1 request, answered and closed (see [`TestServer::http`]).
fn serve_http(mut stream: TcpStream, name: &str) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SERVER_WRITE_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_WRITE_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or("?").to_string();
    let path = first.next().unwrap_or("?").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let xff = headers
        .iter()
        .find(|(k, _)| k == "x-forwarded-for")
        .map_or("-".to_string(), |(_, v)| v.clone());
    let mut echoed: Vec<String> = headers
        .iter()
        .filter(|(k, _)| (k.starts_with("x-") && k != "x-forwarded-for") || k == "traceparent")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    echoed.sort();
    let mut code: u16 = path
        .strip_prefix("/status/")
        .and_then(|c| c.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(200);
    // `/fail-on/<name>/...`: only the server called <name> answers 500.
    if path
        .strip_prefix("/fail-on/")
        .and_then(|r| r.split('/').next())
        .is_some_and(|n| n == name)
    {
        code = 500;
    }
    // `/sleep/<ms>/...`: answer after that long (at most 10 s).
    if let Some(ms) = path
        .strip_prefix("/sleep/")
        .and_then(|r| r.split('/').next())
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms.min(10_000)));
    }
    let body = format!("{name} {method} {path} xff={xff} hdr={}", echoed.join(","));
    let reply = format!(
        "HTTP/1.1 {code} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes())?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

fn serve(mut stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) -> io::Result<()> {
    // accept(2) does not inherit O_NONBLOCK on Linux, but be explicit.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_write_timeout(Some(SERVER_WRITE_TIMEOUT))?;
    let hello = ServerHello {
        peer,
        local: stream.local_addr()?,
    };
    let mut line = serde_json::to_vec(&hello).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => stream.write_all(&buf[..n])?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    // The client may already be gone; nothing left to report then.
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads the [`ServerHello`] line a [`TestServer`] sends first. Reads byte by byte, so nothing
/// after the newline is consumed.
pub fn read_hello(stream: &mut impl Read) -> io::Result<ServerHello> {
    let mut line = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before the server hello line (got {:?})",
                        String::from_utf8_lossy(&line)
                    ),
                ));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_HELLO_LEN {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("server hello line longer than {MAX_HELLO_LEN} bytes"),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    serde_json::from_slice(&line).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "bad server hello line {:?}: {e}",
                String::from_utf8_lossy(&line)
            ),
        )
    })
}

/// One exchange with a [`TestServer`]: reads the hello line, sends `payload`, closes the
/// sending side and reads the echo until the server closes. Returns the hello and the echoed
/// bytes. If the stream has no read timeout, installs one of 10 s so a broken path fails
/// instead of hanging.
pub fn ask(stream: &mut TcpStream, payload: &[u8]) -> io::Result<(ServerHello, Vec<u8>)> {
    if stream.read_timeout()?.is_none() {
        stream.set_read_timeout(Some(ASK_DEFAULT_TIMEOUT))?;
    }
    let hello = read_hello(stream)?;
    stream.write_all(payload)?;
    stream.shutdown(Shutdown::Write)?;
    let mut echoed = Vec::with_capacity(payload.len());
    stream.read_to_end(&mut echoed)?;
    Ok((hello, echoed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn loopback_server(ip: IpAddr) -> TestServer {
        let listener = tcp_listen(SocketAddr::new(ip, 0)).expect("listen");
        TestServer::from_listener(listener).expect("server")
    }

    #[test]
    fn echo_server_says_hello_and_echoes_over_v4() {
        let server = loopback_server(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut stream = TcpStream::connect(server.local_addr()).expect("connect");
        let client = stream.local_addr().expect("client addr");
        let payload = vec![7u8; 100_000];
        let (hello, echoed) = ask(&mut stream, &payload).expect("ask");
        assert_eq!(hello.peer, client);
        assert_eq!(hello.local, server.local_addr());
        assert_eq!(echoed, payload);
        assert_eq!(server.accepted(), 1);
    }

    #[test]
    fn echo_server_works_over_v6_and_serves_several_clients() {
        let listener = match tcp_listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: no IPv6 loopback here: {e}");
                return;
            }
        };
        let server = TestServer::from_listener(listener).expect("server");
        let mut streams: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(server.local_addr()).expect("connect"))
            .collect();
        for (i, stream) in streams.iter_mut().enumerate() {
            let msg = format!("hello {i}");
            let (hello, echoed) = ask(stream, msg.as_bytes()).expect("ask");
            assert!(hello.peer.is_ipv6());
            assert_eq!(echoed, msg.as_bytes());
        }
        assert_eq!(server.accepted(), 3);
    }

    #[test]
    fn hello_line_is_the_documented_json() {
        let hello = ServerHello {
            peer: "198.18.1.11:40000".parse().expect("addr"),
            local: "[fd77:6566:2::b]:8080".parse().expect("addr"),
        };
        let json = serde_json::to_string(&hello).expect("json");
        assert_eq!(
            json,
            r#"{"peer":"198.18.1.11:40000","local":"[fd77:6566:2::b]:8080"}"#
        );
    }

    #[test]
    fn read_hello_leaves_the_rest_unread() {
        let mut input: &[u8] = b"{\"peer\":\"1.2.3.4:5\",\"local\":\"6.7.8.9:10\"}\nrest";
        let hello = read_hello(&mut input).expect("hello");
        assert_eq!(hello.peer, "1.2.3.4:5".parse().expect("addr"));
        assert_eq!(input, b"rest");
    }

    #[test]
    fn read_hello_rejects_garbage_and_eof() {
        let mut garbage: &[u8] = b"not json\n";
        let err = read_hello(&mut garbage).expect_err("garbage");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut short: &[u8] = b"{\"peer\"";
        let err = read_hello(&mut short).expect_err("eof");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let long = vec![b'x'; MAX_HELLO_LEN + 10];
        let err = read_hello(&mut long.as_slice()).expect_err("long");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn dropping_the_server_ends_idle_connections_promptly() {
        let server = loopback_server(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut stream = TcpStream::connect(server.local_addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        read_hello(&mut stream).expect("hello");
        let started = std::time::Instant::now();
        drop(server);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "drop took too long"
        );
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("closed cleanly");
        assert!(rest.is_empty());
    }

    #[test]
    fn v6_listener_is_v6_only() {
        let Ok(listener) = tcp_listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)) else {
            eprintln!("skipping: no IPv6 here");
            return;
        };
        let port = listener.local_addr().expect("addr").port();
        // With dual-stack off, the same port is still free for IPv4.
        let v4 = tcp_listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
        assert!(v4.is_ok(), "{v4:?}");
    }
}
