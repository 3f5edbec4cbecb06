//! `cargo xtask bench capture`: what capture adds to connect() latency and to a short
//! request's round trip, against the same path uncaptured, in the lab.
//!
//! Captured path: `shop/web` (node 1, meshed) -> `shop/api` (node 2, meshed): the connect is
//! redirected to node 1's agent, which forwards it; node 2's agent receives it through
//! sk_lookup and delivers it. Direct path: `legacy/batch` (node 1) -> `legacy/db` (node 2),
//! same nodes, same links, no capture. Both paths forward plaintext (no mTLS yet).
//!
//! Three measurements per path, `iterations` samples each, run alternately so drift hits both:
//! * `connect`: connect() on a fresh socket until it returns;
//! * `request`: connect + 64-byte request + 64-byte echo (a short request on a new connection);
//! * `rtt`: 64-byte request/echo on an established connection.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};
use weft_netns::NetNs;

use crate::setup;

const PORT: u16 = 7000;
const MSG: usize = 64;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to benchmark.
    #[arg(value_enum)]
    pub what: Target,
    /// Samples per measurement and path.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    pub iterations: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `waypoint`: also count the user-space instructions per request of nginx, the waypoint
    /// and the hyper floor (one worker each) under callgrind: a number that does not move with
    /// the machine's noise, for comparing changes.
    #[arg(long)]
    pub instructions: bool,
    /// `waypoint`: rounds of load; each round loads every proxy once (in an order rotated per
    /// round) and the table shows the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,
    /// `waypoint`: the rate (req/s) of the fixed-rate latency runs that follow the wrk rounds
    /// (open loop, 16 connections, as many rounds); 0 skips them. Default: half of nginx's
    /// median req/s in the same run, so that every proxy runs below saturation.
    #[arg(long)]
    pub fixed_rate: Option<u32>,
    #[command(flatten)]
    pub control_plane: crate::bench_control_plane::ControlPlaneArgs,
    #[command(flatten)]
    pub l4: crate::bench_l4::L4Args,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Target {
    /// Capture overhead on connect() and short requests.
    Capture,
    /// Config streaming at scale: full push, per-change latency and bytes, RSS.
    ControlPlane,
    /// The L4 mesh against the same workloads direct: throughput, latency, req/s, conn/s,
    /// agent RSS and CPU.
    L4,
    /// The waypoint against nginx as a reverse proxy: req/s, p50/p99, RSS, CPU per 1k req/s.
    Waypoint,
}

/// An echo server (no greeting) on its own thread; stops and joins on drop.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &NetNs, port: u16) -> anyhow::Result<Self> {
        let sock = ns.run(|| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))??;
        sock.set_reuse_address(true)?;
        sock.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        sock.listen(4096)?;
        let listener: TcpListener = sock.into();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_nodelay(true);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        std::thread::spawn(move || {
                            let mut buf = [0u8; MSG];
                            while let Ok(()) = c.read_exact(&mut buf) {
                                if c.write_all(&buf).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn socket_in(ns: &NetNs) -> anyhow::Result<Socket> {
    let s = ns.run(|| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))??;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

fn timed_connect(ns: &NetNs, dst: SocketAddr) -> anyhow::Result<(Duration, TcpStream)> {
    let s = socket_in(ns)?;
    let t = Instant::now();
    s.connect(&dst.into())
        .with_context(|| format!("connect {dst}"))?;
    let d = t.elapsed();
    let stream: TcpStream = s.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok((d, stream))
}

fn ping(s: &mut TcpStream) -> anyhow::Result<()> {
    let buf = [7u8; MSG];
    s.write_all(&buf)?;
    let mut back = [0u8; MSG];
    s.read_exact(&mut back)?;
    if back != buf {
        bail!("echo mismatch");
    }
    Ok(())
}

#[derive(Default)]
struct Samples {
    connect: Vec<f64>,
    request: Vec<f64>,
    rtt: Vec<f64>,
}

fn sample(
    ns: &NetNs,
    dst: SocketAddr,
    out: &mut Samples,
    keep: &mut TcpStream,
) -> anyhow::Result<()> {
    let (d, _s) = timed_connect(ns, dst)?;
    out.connect.push(d.as_secs_f64() * 1e6);
    let t = Instant::now();
    let (_, mut s) = timed_connect(ns, dst)?;
    ping(&mut s)?;
    out.request.push(t.elapsed().as_secs_f64() * 1e6);
    let t = Instant::now();
    ping(keep)?;
    out.rtt.push(t.elapsed().as_secs_f64() * 1e6);
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx.min(v.len() - 1)]
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        Target::Capture => capture(args),
        Target::ControlPlane => crate::bench_control_plane::run(args.control_plane, args.json),
        Target::L4 => crate::bench_l4::run(args.l4, args.json),
        Target::Waypoint => crate::bench_waypoint::run(
            args.l4.seconds,
            args.rounds,
            args.json,
            args.instructions,
            args.fixed_rate,
        ),
    }
}

fn capture(args: BenchArgs) -> anyhow::Result<()> {
    setup::prepare_lab("the benchmark")?;
    // Benchmarks measure the optimised agent.
    setup::build_mesh_binaries(true)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from("target"),
        std::path::PathBuf::from,
    );
    let bin = target.join("release/weft-agent");
    // SAFETY: single-threaded at this point; the variable is read by the lab harness.
    unsafe { std::env::set_var("WEFT_AGENT_BIN", &bin) };

    let w = crate::demo::world(&[], &[], false)?;
    let lab = &w.mesh.lab;
    let (web, api, batch, db) = (lab.pod(0, 0), lab.pod(1, 0), lab.pod(0, 1), lab.pod(1, 1));
    let _e1 = Echo::start(&api.netns()?, PORT)?;
    let _e2 = Echo::start(&db.netns()?, PORT)?;
    let mesh_ns = web.netns()?;
    let direct_ns = batch.netns()?;
    let mesh_dst = SocketAddr::new(IpAddr::V4(api.ip4), PORT);
    let direct_dst = SocketAddr::new(IpAddr::V4(db.ip4), PORT);

    let (_, mut mesh_keep) = timed_connect(&mesh_ns, mesh_dst)?;
    let (_, mut direct_keep) = timed_connect(&direct_ns, direct_dst)?;
    // Warm up both paths.
    let mut scratch = Samples::default();
    for _ in 0..200 {
        sample(&mesh_ns, mesh_dst, &mut scratch, &mut mesh_keep)?;
        sample(&direct_ns, direct_dst, &mut scratch, &mut direct_keep)?;
    }
    let mut mesh = Samples::default();
    let mut direct = Samples::default();
    let started = Instant::now();
    for _ in 0..args.iterations {
        sample(&mesh_ns, mesh_dst, &mut mesh, &mut mesh_keep)?;
        sample(&direct_ns, direct_dst, &mut direct, &mut direct_keep)?;
    }
    let elapsed = started.elapsed();
    let mut rows = Vec::new();
    for (name, m, d) in [
        ("connect", &mut mesh.connect, &mut direct.connect),
        ("request", &mut mesh.request, &mut direct.request),
        ("rtt", &mut mesh.rtt, &mut direct.rtt),
    ] {
        let (m50, m99, d50, d99) = (pct(m, 0.5), pct(m, 0.99), pct(d, 0.5), pct(d, 0.99));
        rows.push((name, d50, d99, m50, m99));
    }
    if args.json {
        let mut o = serde_json::Map::new();
        for (name, d50, d99, m50, m99) in &rows {
            o.insert(
                (*name).into(),
                json!({"direct_p50_us": d50, "direct_p99_us": d99, "captured_p50_us": m50,
                       "captured_p99_us": m99, "added_p50_us": m50 - d50, "added_p99_us": m99 - d99}),
            );
        }
        o.insert("iterations".into(), json!(args.iterations));
        println!("{}", serde_json::Value::Object(o));
    } else {
        println!(
            "\ncapture overhead, {} samples per cell ({:.1}s), microseconds:",
            args.iterations,
            elapsed.as_secs_f64()
        );
        println!(
            "{:<9} {:>12} {:>12} {:>14} {:>14} {:>11} {:>11}",
            "",
            "direct p50",
            "direct p99",
            "captured p50",
            "captured p99",
            "added p50",
            "added p99"
        );
        for (name, d50, d99, m50, m99) in rows {
            println!(
                "{name:<9} {d50:>12.1} {d99:>12.1} {m50:>14.1} {m99:>14.1} {:>11.1} {:>11.1}",
                m50 - d50,
                m99 - d99
            );
        }
        println!(
            "\nconnect: until connect() returns (captured: the local agent completes the handshake)\n\
             request: connect + 64 B request + 64 B echo on a new connection\n\
             rtt:     64 B request/echo on an established connection"
        );
    }
    Ok(())
}
