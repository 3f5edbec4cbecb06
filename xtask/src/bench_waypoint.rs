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

/// Runs the comparison with `seconds` of load per proxy.
pub fn run(seconds: u64, json_out: bool) -> anyhow::Result<()> {
    setup::ensure_debian(&["nginx", "wrk"])?;
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
    let waypoint = {
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
    let _ = std::fs::remove_dir_all(&dir);
    let [floor1, floor2] =
        <[Value; 2]>::try_from(floors).map_err(|_| anyhow::anyhow!("two floor runs"))?;
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
    Ok(())
}
