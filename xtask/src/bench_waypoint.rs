//! `cargo xtask bench waypoint`: the waypoint against nginx as a plain reverse proxy, same
//! backend, same load, on loopback.
//!
//! Backend: the small keep-alive HTTP/1.1 responder of `bench l4` (2-byte body). nginx
//! (Debian package, installed on first use): 2 worker processes, an upstream keep-alive pool,
//! access log off. Waypoint (release build): a route matching every path, request and
//! per-attempt timeouts, retries with a budget, golden metrics recorded (as in production),
//! access log off (as nginx's).
//! Load: wrk -t2 -c16 for `--seconds` (default 5), each proxy in turn. Reported per proxy: req/s, p50 and
//! p99 latency, RSS after the run (all processes), CPU cores used per 1,000 req/s.
//!
//! `--instructions`: the waypoint and the hyper floor (one worker each) run again under
//! callgrind (Debian `valgrind`), loaded by h2load (Debian `nghttp2-client`) with a fixed
//! number of requests after a warm-up; reported: user-space instructions per request. Unlike
//! req/s on a shared 2-CPU machine, it is the same from run to run within ~1 %.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use weft_netns::NetNs;

use crate::bench_l4::{HttpServer, cpu_ms, parse_wrk, rss_mb};
use crate::setup;

const BACKEND_PORT: u16 = 18081;
const NGINX_PORT: u16 = 18080;
const WAYPOINT_PORT: u16 = 18082;
const WAYPOINT_METRICS_PORT: u16 = 18090;
const FLOOR_PORT: u16 = 18083;

/// A child process killed (and reaped) on drop, with its children: nginx's workers outlive a
/// killed master and would keep its port (and the CPU) otherwise.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // Children first read, then the parent killed before them: an nginx master that saw a
        // worker die would start a new one that nobody kills.
        let children: Vec<u32> = family(self.0.id()).into_iter().skip(1).collect();
        let _ = self.0.kill();
        for pid in children {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill(2) on a pid we read from our child's children list.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The process and its children (nginx workers).
fn family(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// Fails when something already listens on `port`: the numbers would be another process's.
fn ensure_free(port: u16) -> anyhow::Result<()> {
    std::net::TcpListener::bind(("127.0.0.1", port)).map(drop).with_context(|| {
        format!(
            "127.0.0.1:{port} is taken (a proxy left by an earlier run?); `ss -ltnp 'sport = :{port}'` shows who has it"
        )
    })
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on 127.0.0.1:{port} after 5 s (see the proxy's log)")
}

/// Loads the proxy at `port` and measures it (and its processes).
fn measure(name: &str, port: u16, pid: u32, secs: u64) -> anyhow::Result<Value> {
    let url = format!("http://127.0.0.1:{port}/api/items");
    // Warm-up: connection pools, caches.
    crate::bench_l4::wrk(&["-t1", "-c4", "-d1s", &url])?;
    let before: f64 = family(pid).iter().map(|p| cpu_ms(*p)).sum();
    let out = crate::bench_l4::wrk(&["-t2", "-c16", "-d", &format!("{secs}s"), "--latency", &url])?;
    let used_ms: f64 = family(pid).iter().map(|p| cpu_ms(*p)).sum::<f64>() - before;
    let rss: f64 = family(pid).iter().map(|p| rss_mb(*p)).sum();
    let (rps, p50, p99, _) = parse_wrk(&out).with_context(|| format!("{name} run"))?;
    let cores = used_ms / 1000.0 / secs as f64;
    Ok(json!({
        "rps": rps,
        "p50_us": p50,
        "p99_us": p99,
        "rss_mb": rss,
        "cpu_per_1k_rps": cores / (rps / 1000.0).max(1e-9),
    }))
}

/// Requests counted under callgrind (after as many for warm-up).
const COUNTED_REQUESTS: u64 = 20_000;

/// User-space instructions per request of `command` (a proxy listening on `port`), counted by
/// callgrind over [`COUNTED_REQUESTS`] requests of h2load (HTTP/1.1, 4 connections).
fn instructions(command: &mut Command, port: u16, dir: &std::path::Path) -> anyhow::Result<f64> {
    let out = dir.join(format!("callgrind.{port}"));
    let mut valgrind = Command::new("valgrind");
    valgrind
        .args(["--tool=callgrind", "--instr-atstart=no"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(command.get_program())
        .args(command.get_args())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let p = Proc(valgrind.spawn().context("starting valgrind")?);
    // Under callgrind start-up takes seconds: up to 6 waits of 5 s.
    let mut waited = wait_port(port);
    for _ in 0..5 {
        if waited.is_ok() {
            break;
        }
        waited = wait_port(port);
    }
    waited?;
    let url = format!("http://127.0.0.1:{port}/api/items");
    let h2load = |n: u64| -> anyhow::Result<()> {
        let output = Command::new("h2load")
            .args(["--h1", "-c4", "-t1", "-n", &n.to_string(), &url])
            .output()
            .context("running h2load (Debian package nghttp2-client)")?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !text.contains(&format!("{n} succeeded")) {
            bail!("h2load against {url} did not succeed {n} times:\n{text}");
        }
        Ok(())
    };
    let control = |what: &str| -> anyhow::Result<()> {
        let status = Command::new("callgrind_control")
            .args([what, &p.0.id().to_string()])
            .stdout(Stdio::null())
            .status()
            .context("running callgrind_control")?;
        if !status.success() {
            bail!("callgrind_control {what} failed ({status})");
        }
        Ok(())
    };
    h2load(COUNTED_REQUESTS)?;
    control("--instr=on")?;
    h2load(COUNTED_REQUESTS)?;
    control("--dump")?;
    drop(p);
    // The dump is `<out>.1`; its `summary:` (or `totals:`) line holds the instruction count.
    let dump = std::path::PathBuf::from(format!("{}.1", out.display()));
    let text = std::fs::read_to_string(&dump)
        .with_context(|| format!("reading the callgrind dump {}", dump.display()))?;
    let total: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no instruction total in {}", dump.display()))?;
    Ok(total / COUNTED_REQUESTS as f64)
}

/// Runs the comparison with `seconds` of load per proxy (and, with `count_instructions`, the
/// instruction counts).
pub fn run(seconds: u64, json_out: bool, count_instructions: bool) -> anyhow::Result<()> {
    setup::ensure_debian(&["nginx", "wrk"])?;
    if count_instructions {
        setup::ensure_debian(&["valgrind", "nghttp2-client"])?;
    }
    setup::run_cmd(setup::cargo().args([
        "build",
        "--release",
        "-p",
        "weft-waypoint",
        "--bins",
        "--example",
        "hyper_floor",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from("target"),
        std::path::PathBuf::from,
    );
    let dir = std::env::temp_dir().join(format!("weft-bench-waypoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for port in [
        BACKEND_PORT,
        NGINX_PORT,
        WAYPOINT_PORT,
        WAYPOINT_METRICS_PORT,
        FLOOR_PORT,
    ] {
        ensure_free(port)?;
    }
    let _backend = HttpServer::start(&NetNs::current()?, BACKEND_PORT)?;

    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "worker_processes 2;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             \x20 upstream backend {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 64; }}\n\
             \x20 server {{\n    listen 127.0.0.1:{NGINX_PORT};\n    location / {{\n      proxy_pass http://backend;\n\
             \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
            dir = dir.display()
        ),
    )?;
    let waypoint_conf = dir.join("waypoint.yaml");
    std::fs::write(
        &waypoint_conf,
        format!(
            "listeners:\n  - name: bench\n    address: 127.0.0.1:{WAYPOINT_PORT}\n    routes:\n\
             \x20     - name: api\n        matches: [{{ path: {{ type: PathPrefix, value: /api }} }}]\n\
             \x20       backendRefs: [{{ name: backend }}]\n\
             \x20       timeouts: {{ request: 5s, backendRequest: 1s }}\n\
             \x20       retry:\n          attempts: 2\n          backoff: {{ base: 25ms, max: 250ms }}\n\
             \x20         retryOn: [connect-failure, reset, \"503\"]\n\
             \x20         budget: {{ ratio: 0.2, minRetriesPerSecond: 5 }}\n\
             backends:\n  - name: backend\n    endpoints: [\"127.0.0.1:{BACKEND_PORT}\"]\n"
        ),
    )?;

    let nginx = {
        let p = Proc(
            Command::new("nginx")
                .arg("-c")
                .arg(&nginx_conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting nginx")?,
        );
        wait_port(NGINX_PORT)?;
        let r = measure("nginx", NGINX_PORT, p.0.id(), seconds)?;
        drop(p);
        r
    };
    let mut waypoint = {
        let p = Proc(
            Command::new(target.join("release/weft-waypoint"))
                .arg("--config")
                .arg(&waypoint_conf)
                .args([
                    "--metrics-address",
                    &format!("127.0.0.1:{WAYPOINT_METRICS_PORT}"),
                ])
                // Like nginx's `access_log off` above (the waypoint logs to stdout by default).
                .args(["--access-log", "off"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting weft-waypoint")?,
        );
        wait_port(WAYPOINT_PORT)?;
        let r = measure("waypoint", WAYPOINT_PORT, p.0.id(), seconds)?;
        drop(p);
        r
    };
    // Reference: the least any hyper-based proxy does per request (waypoint/examples/hyper_floor.rs).
    let mut floors = Vec::new();
    for threads in [1, 2] {
        let p = Proc(
            Command::new(target.join("release/examples/hyper_floor"))
                .args([
                    format!("127.0.0.1:{FLOOR_PORT}"),
                    format!("127.0.0.1:{BACKEND_PORT}"),
                    threads.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting hyper_floor")?,
        );
        wait_port(FLOOR_PORT)?;
        floors.push(measure("hyper_floor", FLOOR_PORT, p.0.id(), seconds)?);
        drop(p);
    }
    let counted = if count_instructions {
        let waypoint = instructions(
            Command::new(target.join("release/weft-waypoint"))
                .arg("--config")
                .arg(&waypoint_conf)
                .args(["--worker-threads", "1", "--access-log", "off"])
                .args([
                    "--metrics-address",
                    &format!("127.0.0.1:{WAYPOINT_METRICS_PORT}"),
                ]),
            WAYPOINT_PORT,
            &dir,
        )?;
        let floor = instructions(
            Command::new(target.join("release/examples/hyper_floor")).args([
                format!("127.0.0.1:{FLOOR_PORT}"),
                format!("127.0.0.1:{BACKEND_PORT}"),
                "1".to_string(),
            ]),
            FLOOR_PORT,
            &dir,
        )?;
        Some((waypoint, floor))
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);
    let [mut floor1, floor2] =
        <[Value; 2]>::try_from(floors).map_err(|_| anyhow::anyhow!("two floor runs"))?;
    if let Some((w, f)) = counted {
        waypoint["instructions_per_request"] = json!(w);
        floor1["instructions_per_request"] = json!(f);
    }
    if json_out {
        println!(
            "{}",
            json!({"nginx": nginx, "waypoint": waypoint, "hyper_floor_1t": floor1, "hyper_floor_2t": floor2})
        );
        return Ok(());
    }
    println!(
        "\nwaypoint vs nginx (reverse proxy), wrk -t2 -c16 for {} s each, loopback, same backend:",
        seconds
    );
    println!(
        "{:<22} {:>12} {:>12} {:>14} {:>14}",
        "", "nginx", "waypoint", "hyper floor 1t", "hyper floor 2t"
    );
    for (label, key) in [
        ("req/s", "rps"),
        ("p50 (µs)", "p50_us"),
        ("p99 (µs)", "p99_us"),
        ("RSS (MB)", "rss_mb"),
        ("cores per 1k req/s", "cpu_per_1k_rps"),
    ] {
        println!(
            "{label:<22} {:>12.3} {:>12.3} {:>14.3} {:>14.3}",
            nginx[key].as_f64().unwrap_or(0.0),
            waypoint[key].as_f64().unwrap_or(0.0),
            floor1[key].as_f64().unwrap_or(0.0),
            floor2[key].as_f64().unwrap_or(0.0)
        );
    }
    if let Some((w, f)) = counted {
        println!(
            "{:<22} {:>12} {:>12.0} {:>14.0} {:>14}",
            "instructions/request", "", w, f, ""
        );
    }
    Ok(())
}
