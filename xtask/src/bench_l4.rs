//! `cargo xtask bench l4`: the same workloads directly and through the mesh, in the lab.
//!
//! Mesh path: `shop/web` (node 1) -> `shop/api` (node 2), both meshed: node 1's agent carries
//! the connection in an HBONE tunnel (HTTP/2 CONNECT over mutual TLS 1.3) to node 2's agent,
//! which delivers it. Direct path: `legacy/batch` (node 1) -> `legacy/db` (node 2), same nodes
//! and links, no capture. Release binaries; the controller runs (it issues the certificates)
//! but is idle during the measurements.
//!
//! Workloads, each run on both paths with the same tools and durations:
//! * throughput over one TCP connection: iperf3 (`throughput_gbps`);
//! * HTTP latency over one keep-alive connection: wrk -c1 (`c1_p50_us`, `c1_p99_us`);
//! * HTTP req/s and p99 over 16 keep-alive connections: wrk -c16 (`c16_rps`, `c16_p99_us`);
//! * new connections per second: wrk with `Connection: close` (`conn_per_s`);
//! * each agent's RSS after the load and CPU time per 1,000 requests of the -c16 run;
//! * the floor: the -c1 latency through two minimal plain-TCP relays on the direct path (one
//!   in the client's namespace, one in the server's, like the two agents; `relay_floor`).
//!
//! The HTTP server is a small keep-alive HTTP/1.1 responder on tokio inside the destination
//! pod (2-byte body), the same for both paths.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_netns::NetNs;

use crate::setup;

const HTTP_PORT: u16 = 8088;
const IPERF_PORT: u16 = 5201;

/// Options of the L4 benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct L4Args {
    /// Seconds per load run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
    pub seconds: u64,
    /// Also profile both agents with `perf` during an extra one-connection run through the mesh
    /// and print where their CPU time goes.
    #[arg(long)]
    pub perf: bool,
}

/// A tiny HTTP/1.1 server on its own runtime, listening inside a namespace.
pub(crate) struct HttpServer {
    rt: Option<tokio::runtime::Runtime>,
}

impl HttpServer {
    pub(crate) fn start(ns: &NetNs, port: u16) -> anyhow::Result<Self> {
        let sock = ns.run(|| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))??;
        sock.set_reuse_address(true)?;
        sock.set_nonblocking(true)?;
        sock.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        sock.listen(4096)?;
        let std_listener: std::net::TcpListener = sock.into();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                return;
            };
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_http(s));
            }
        });
        Ok(Self { rt: Some(rt) })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn serve_http(mut s: tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 8192];
    let mut have = 0usize;
    loop {
        // One request: everything up to the blank line (wrk sends no bodies).
        let end = loop {
            if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if have == buf.len() {
                return;
            }
            match s.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
        };
        let close = String::from_utf8_lossy(&buf[..end])
            .to_ascii_lowercase()
            .contains("connection: close");
        let resp: &[u8] = if close {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        };
        if s.write_all(resp).await.is_err() || close {
            return;
        }
        buf.copy_within(end..have, 0);
        have -= end;
    }
}

/// The floor of any two-proxy design: a minimal plain-TCP relay (one thread, one
/// current-thread runtime, `copy_bidirectional`, TCP_NODELAY) entered into a namespace for good.
/// Two of them on the path, like the two agents, give the latency no user-space proxy pair
/// can beat on this machine; the mesh's extra latency beyond it is what TLS, HTTP/2 and Weft
/// add.
struct Relay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(ns: &NetNs, listen: SocketAddr, to: SocketAddr) -> anyhow::Result<Self> {
        let ns = NetNs::open(ns.path())?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name(format!("relay-{listen}"))
            .spawn(move || {
                let run = || -> anyhow::Result<tokio::runtime::Runtime> {
                    ns.enter()?;
                    Ok(tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?)
                };
                let rt = match run() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(listen).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("bind {listen}: {e}")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    loop {
                        tokio::select! {
                            _ = &mut stopped => return,
                            accepted = listener.accept() => {
                                let Ok((mut a, _)) = accepted else { continue };
                                tokio::spawn(async move {
                                    let Ok(mut b) = tokio::net::TcpStream::connect(to).await else {
                                        return;
                                    };
                                    let _ = a.set_nodelay(true);
                                    let _ = b.set_nodelay(true);
                                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                                });
                            }
                        }
                    }
                });
            })?;
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => bail!("relay {listen} -> {to}: {e}"),
            Err(_) => bail!("relay {listen} -> {to} did not start"),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// c1 latency (p50, p99 µs) from `client_ns` through two plain relays: one in the client's
/// namespace, one in the server's (like the two agents), to the HTTP server.
fn relay_floor(
    client: &NetNs,
    client_ns: &str,
    server: &NetNs,
    server_ip: IpAddr,
    secs: u64,
) -> anyhow::Result<(f64, f64)> {
    const R1: u16 = 18001;
    const R2: u16 = 18002;
    let _r2 = Relay::start(
        server,
        SocketAddr::new(IpAddr::from([0, 0, 0, 0]), R2),
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), HTTP_PORT),
    )?;
    let _r1 = Relay::start(
        client,
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), R1),
        SocketAddr::new(server_ip, R2),
    )?;
    let url = format!("http://127.0.0.1:{R1}/");
    let (_, p50, p99, _) = parse_wrk(&in_netns(
        client_ns,
        &[
            "wrk",
            "-t1",
            "-c1",
            "-d",
            &format!("{secs}s"),
            "--latency",
            &url,
        ],
    )?)?;
    Ok((p50, p99))
}

/// `ip netns exec <ns> <cmd...>`, returning stdout.
fn in_netns(ns: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .with_context(|| format!("running {cmd:?} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} in {ns} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs wrk in the current network namespace; its stdout.
pub(crate) fn wrk(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("wrk")
        .args(args)
        .output()
        .context("running wrk (install it with `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "wrk {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A wrk duration (`812.00us`, `1.20ms`, `2.00s`) in microseconds.
fn wrk_us(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * mult)
}

/// (requests/s, p50 µs, p99 µs, total requests) from wrk's `--latency` output.
pub(crate) fn parse_wrk(out: &str) -> anyhow::Result<(f64, f64, f64, f64)> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut total = None;
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = wrk_us(v),
            ["99%", v] => p99 = wrk_us(v),
            [n, "requests", "in", ..] => total = n.parse().ok(),
            _ => {}
        }
    }
    match (rps, p50, p99, total) {
        (Some(r), Some(a), Some(b), Some(t)) => Ok((r, a, b, t)),
        _ => bail!("cannot read wrk's output:\n{out}"),
    }
}

/// CPU time (user + system) of a process, milliseconds.
pub(crate) fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`; utime and stime are fields 14 and 15 (1-based).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) * 1000.0 / hz.max(1.0)
}

pub(crate) fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

struct PathResult {
    throughput_gbps: f64,
    c1_p50_us: f64,
    c1_p99_us: f64,
    c16_rps: f64,
    c16_p99_us: f64,
    c16_requests: f64,
    conn_per_s: f64,
}

impl PathResult {
    fn json(&self) -> Value {
        json!({
            "throughput_gbps": self.throughput_gbps,
            "c1_p50_us": self.c1_p50_us,
            "c1_p99_us": self.c1_p99_us,
            "c16_rps": self.c16_rps,
            "c16_p99_us": self.c16_p99_us,
            "conn_per_s": self.conn_per_s,
        })
    }
}

/// Runs every workload from `client_ns` against `server_ip`. `cpu` is called around the -c16
/// run and returns the agents' CPU milliseconds so far.
fn measure(
    client_ns: &str,
    server_ns: &str,
    server_ip: IpAddr,
    secs: u64,
    mut on_c16: impl FnMut(bool),
) -> anyhow::Result<PathResult> {
    let d = format!("{secs}s");
    // iperf3: one connection, `secs` seconds; the server serves one test and exits.
    let mut server = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-p"])
        .arg(IPERF_PORT.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 (install it with `cargo xtask setup`)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = in_netns(
        client_ns,
        &[
            "iperf3",
            "-J",
            "-c",
            &server_ip.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_str(&out?).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no received throughput")?;
    let url = format!("http://{server_ip}:{HTTP_PORT}/");
    let (_, c1_p50, c1_p99, _) = parse_wrk(&in_netns(
        client_ns,
        &["wrk", "-t1", "-c1", "-d", &d, "--latency", &url],
    )?)?;
    on_c16(true);
    let (c16_rps, _, c16_p99, c16_requests) = parse_wrk(&in_netns(
        client_ns,
        &["wrk", "-t2", "-c16", "-d", &d, "--latency", &url],
    )?)?;
    on_c16(false);
    let (conn_per_s, _, _, _) = parse_wrk(&in_netns(
        client_ns,
        &[
            "wrk",
            "-t1",
            "-c8",
            "-d",
            &d,
            "--latency",
            "-H",
            "Connection: close",
            &url,
        ],
    )?)?;
    Ok(PathResult {
        throughput_gbps: bps / 1e9,
        c1_p50_us: c1_p50,
        c1_p99_us: c1_p99,
        c16_rps,
        c16_p99_us: c16_p99,
        c16_requests,
        conn_per_s,
    })
}

pub fn run(args: L4Args, json_out: bool) -> anyhow::Result<()> {
    setup::prepare_lab("the benchmark")?;
    setup::build_mesh_binaries(true)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from("target"),
        std::path::PathBuf::from,
    );
    // SAFETY: single-threaded at this point; the variables are read by the lab harness.
    unsafe {
        std::env::set_var("WEFT_AGENT_BIN", target.join("release/weft-agent"));
        std::env::set_var(
            "WEFT_CONTROLLER_BIN",
            target.join("release/weft-controller"),
        );
    }
    let w = crate::demo::world(&[], &[], true)?;
    let lab = &w.mesh.lab;
    let (web, api, batch, db) = (lab.pod(0, 0), lab.pod(1, 0), lab.pod(0, 1), lab.pod(1, 1));
    let _s1 = HttpServer::start(&api.netns()?, HTTP_PORT)?;
    let _s2 = HttpServer::start(&db.netns()?, HTTP_PORT)?;
    let pids = [w.mesh.agent(0).pid(), w.mesh.agent(1).pid()];
    let ns_name = |p: &weft_tests::Pod| {
        p.netns_path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    // Warm-up: certificates, pooled tunnel, caches.
    let warm = format!("http://{}:{HTTP_PORT}/", api.ip4);
    in_netns(&ns_name(web), &["wrk", "-t1", "-c4", "-d1s", &warm])?;

    let direct = measure(
        &ns_name(batch),
        &ns_name(db),
        IpAddr::V4(db.ip4),
        args.seconds,
        |_| {},
    )?;
    let mut cpu_before = [0.0; 2];
    let mut cpu_used = [0.0; 2];
    let mesh = measure(
        &ns_name(web),
        &ns_name(api),
        IpAddr::V4(api.ip4),
        args.seconds,
        |start| {
            for (i, pid) in pids.iter().enumerate() {
                if start {
                    cpu_before[i] = cpu_ms(*pid);
                } else {
                    cpu_used[i] = cpu_ms(*pid) - cpu_before[i];
                }
            }
        },
    )?;
    let rss = [rss_mb(pids[0]), rss_mb(pids[1])];
    let (relay_p50, relay_p99) = relay_floor(
        &batch.netns()?,
        &ns_name(batch),
        &db.netns()?,
        IpAddr::V4(db.ip4),
        args.seconds,
    )?;
    let relay = json!({"c1_p50_us": relay_p50, "c1_p99_us": relay_p99});
    if args.perf {
        profile(
            &ns_name(web),
            IpAddr::V4(api.ip4),
            pids,
            args.seconds,
            w.mesh.dir(),
        )?;
    }
    let per_1k = |i: usize| cpu_used[i] / (mesh.c16_requests / 1000.0).max(1e-9);
    let agent = json!({
        "rss_mb": rss[0].max(rss[1]),
        "cpu_ms_per_1k_req": per_1k(0).max(per_1k(1)),
        "source": {"rss_mb": rss[0], "cpu_ms_per_1k_req": per_1k(0)},
        "destination": {"rss_mb": rss[1], "cpu_ms_per_1k_req": per_1k(1)},
    });
    if json_out {
        println!(
            "{}",
            json!({"direct": direct.json(), "mesh": mesh.json(), "agent": agent, "relay_floor": relay})
        );
        return Ok(());
    }
    println!(
        "\nL4 benchmark, {} s per run, same lab path direct vs. through the mesh (mTLS):",
        args.seconds
    );
    println!(
        "{:<22} {:>12} {:>12} {:>10}",
        "", "direct", "mesh", "mesh/direct"
    );
    let rows = [
        (
            "throughput (Gbit/s)",
            direct.throughput_gbps,
            mesh.throughput_gbps,
        ),
        ("c1 p50 (µs)", direct.c1_p50_us, mesh.c1_p50_us),
        ("c1 p99 (µs)", direct.c1_p99_us, mesh.c1_p99_us),
        ("c16 req/s", direct.c16_rps, mesh.c16_rps),
        ("c16 p99 (µs)", direct.c16_p99_us, mesh.c16_p99_us),
        ("new conn/s", direct.conn_per_s, mesh.conn_per_s),
    ];
    for (name, d, m) in rows {
        println!("{name:<22} {d:>12.2} {m:>12.2} {:>10.2}", m / d.max(1e-9));
    }
    println!(
        "two plain TCP relays (the floor of any two-proxy path): c1 p50 {relay_p50:.0} µs, p99 {relay_p99:.0} µs"
    );
    println!(
        "added latency at one connection: {:.1} µs p50\nagents: RSS {:.1} / {:.1} MB, CPU {:.1} / {:.1} ms per 1,000 requests (source / destination)",
        mesh.c1_p50_us - direct.c1_p50_us,
        rss[0],
        rss[1],
        per_1k(0),
        per_1k(1)
    );
    Ok(())
}

/// `perf record` on both agents during a one-connection wrk run, then the top symbols.
fn profile(
    client_ns: &str,
    server_ip: IpAddr,
    pids: [u32; 2],
    secs: u64,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let mut recs = Vec::new();
    for (i, pid) in pids.iter().enumerate() {
        let out = dir.join(format!("perf-agent{}.data", i + 1));
        let child = Command::new("perf")
            .args(["record", "-F", "2000", "-g", "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting perf (Debian package linux-perf)")?;
        recs.push((child, out));
    }
    std::thread::sleep(Duration::from_millis(500));
    let url = format!("http://{server_ip}:{HTTP_PORT}/");
    in_netns(
        client_ns,
        &["wrk", "-t1", "-c1", "-d", &format!("{secs}s"), &url],
    )?;
    for (child, out) in recs.iter_mut() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let _ = child.wait();
        for (sort, limit) in [("dso", "0.5"), ("sym", "0.7")] {
            let report = Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--percent-limit",
                    limit,
                    "--sort",
                    sort,
                    "-g",
                    "none",
                    "-i",
                ])
                .arg(&*out)
                .output()
                .context("perf report")?;
            println!(
                "\n== perf: {} by {sort} (self time, >= {limit}%) ==",
                out.display()
            );
            for line in String::from_utf8_lossy(&report.stdout)
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .take(30)
            {
                println!("{line}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 5s test @ http://198.18.2.11:8088/\n  1 threads and 1 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency    81.33us   20.11us   1.20ms   90.00%\n  Latency Distribution\n     50%   78.00us\n     75%   85.00us\n     90%   95.00us\n     99%    1.20ms\n  60000 requests in 5.00s, 4.00MB read\nRequests/sec:  12000.50\nTransfer/sec:    800.00KB\n";
        let (rps, p50, p99, total) = parse_wrk(out).expect("parse");
        assert_eq!((rps, p50, p99, total), (12000.5, 78.0, 1200.0, 60000.0));
        assert!(parse_wrk("garbage").is_err());
    }
}
