//! `cargo xtask bench waypoint`: the waypoint against nginx as a plain reverse proxy, same
//! backend, same load, on loopback.
//!
//! Backend: the small keep-alive HTTP/1.1 responder of `bench l4` (2-byte body). nginx
//! (Debian package, installed on first use): 2 worker processes, an upstream keep-alive pool,
//! access log off. Waypoint (release build): a route matching every path, request and
//! per-attempt timeouts, retries with a budget, golden metrics recorded (as in production),
//! access log off (as nginx's). References: `waypoint/examples/hyper_floor.rs` on 1 and 2
//! threads, the least a hyper-based proxy does per request; `waypoint/examples/httparse_floor.rs`
//! on 2 threads, the least a tokio-based proxy with a codec of its own (httparse) does.
//!
//! Load: wrk -t2 -c16 for `--seconds` (default 5) per proxy. The five proxies run side by side
//! for the whole benchmark; each of `--rounds` rounds (default 3) loads them one at a time, in
//! an order rotated by one per round, so that drift in the shared machine's speed does not
//! always favour the same proxy. Reported per proxy, as the median over the rounds (each round
//! is kept in `runs`): req/s, p50 and p99 latency, RSS after the run (all processes), CPU
//! cores used per 1,000 req/s; and the waypoint's req/s over nginx's, round by round.
//!
//! `--instructions`: nginx (one worker, no master), the waypoint and both floors (one worker
//! or thread each, like nginx's single worker here) run again under callgrind (Debian `valgrind`), loaded by h2load (Debian
//! `nghttp2-client`) with a fixed number of requests after a warm-up; reported: user-space
//! instructions per request. Unlike req/s on a shared 2-CPU machine, it is the same from run
//! to run within ~1 %.

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
const FLOOR_2T_PORT: u16 = 18084;
const HTTPARSE_FLOOR_PORT: u16 = 18085;

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
    // Errors would make a proxy look faster than it is.
    if let Some(line) = out
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses") || l.contains("Socket errors"))
    {
        bail!(
            "{name} answered with errors under load ({}): its numbers would be meaningless; \
             check its output or run it by hand on port {port}",
            line.trim()
        );
    }
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

/// The median of `values` (0 when empty).
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The keys [`measure`] reports.
const KEYS: [&str; 5] = ["rps", "p50_us", "p99_us", "rss_mb", "cpu_per_1k_rps"];

/// One object with the median of each key over `runs`, and the runs themselves.
fn summary(runs: Vec<Value>) -> Value {
    let mut out = serde_json::Map::new();
    for key in KEYS {
        out.insert(
            key.to_string(),
            json!(median(
                runs.iter().filter_map(|r| r[key].as_f64()).collect()
            )),
        );
    }
    out.insert("runs".to_string(), Value::Array(runs));
    Value::Object(out)
}

/// A proxy under comparison, running for the whole benchmark.
struct Contender {
    key: &'static str,
    port: u16,
    process: Proc,
    runs: Vec<Value>,
    /// The fixed-rate runs ([`fixed_rate`]).
    fixed: Vec<Value>,
}

/// Starts `command` (listening on `port`) as the contender `key`.
fn contender(key: &'static str, port: u16, command: &mut Command) -> anyhow::Result<Contender> {
    let process = Proc(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {key} ({:?})", command.get_program()))?,
    );
    wait_port(port).with_context(|| format!("{key} did not come up"))?;
    Ok(Contender {
        key,
        port,
        process,
        runs: Vec::new(),
        fixed: Vec::new(),
    })
}

/// The nginx config: a plain reverse proxy on `port` with an upstream keep-alive pool, no
/// access log; `workers` worker processes (1: no master process, for callgrind).
fn nginx_config(dir: &std::path::Path, port: u16, workers: u32) -> String {
    let master = if workers == 1 {
        "master_process off;\n"
    } else {
        ""
    };
    format!(
        "worker_processes {workers};\n{master}daemon off;\npid {dir}/nginx-{port}.pid;\nerror_log {dir}/nginx-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
         \x20 upstream backend {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 64; }}\n\
         \x20 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backend;\n\
         \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        dir = dir.display()
    )
}

/// Connections of the fixed-rate runs, as many as wrk's.
const FIXED_RATE_CONNECTIONS: usize = 16;

/// The latency of the proxy at `port` under `rate` requests per second, open loop
/// ([`crate::openloop`]), for `secs`.
fn fixed_rate(name: &str, port: u16, rate: u32, secs: u64) -> anyhow::Result<Value> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let m = crate::openloop::run(
        addr,
        "/api/items",
        rate,
        FIXED_RATE_CONNECTIONS,
        std::time::Duration::from_secs(secs),
    )
    .with_context(|| format!("{name} at {rate} req/s"))?;
    if m.errors > 0 {
        bail!(
            "{name} answered {} request(s) with errors at {rate} req/s: its latency would be \
             meaningless; check its output or run it by hand on port {port}",
            m.errors
        );
    }
    if m.achieved_rps < f64::from(rate) * 0.95 {
        eprintln!(
            "warning: {name} answered {:.0} of {rate} req/s: saturated at this rate, so its \
             latency here includes queueing; choose a lower --fixed-rate",
            m.achieved_rps
        );
    }
    Ok(json!({
        "achieved_rps": m.achieved_rps,
        "p50_us": m.p50_us,
        "p99_us": m.p99_us,
        "p999_us": m.p999_us,
    }))
}

/// The keys [`fixed_rate`] reports.
const FIXED_KEYS: [&str; 4] = ["achieved_rps", "p50_us", "p99_us", "p999_us"];

/// Runs the comparison: `rounds` rounds of `seconds` of load per proxy, then as many rounds at
/// `fixed_rate` req/s (`None`: half of nginx's median req/s; `Some(0)`: none) and, with
/// `count_instructions`, the instruction counts.
pub fn run(
    seconds: u64,
    rounds: u32,
    json_out: bool,
    count_instructions: bool,
    fixed_rate_rps: Option<u32>,
) -> anyhow::Result<()> {
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
        "--example",
        "httparse_floor",
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
        FLOOR_2T_PORT,
        HTTPARSE_FLOOR_PORT,
    ] {
        ensure_free(port)?;
    }
    let _backend = HttpServer::start(&NetNs::current()?, BACKEND_PORT)?;

    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(&nginx_conf, nginx_config(&dir, NGINX_PORT, 2))?;
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
    let waypoint_command = || {
        let mut command = Command::new(target.join("release/weft-waypoint"));
        command
            .arg("--config")
            .arg(&waypoint_conf)
            .args([
                "--metrics-address",
                &format!("127.0.0.1:{WAYPOINT_METRICS_PORT}"),
            ])
            // Like nginx's `access_log off` (the waypoint logs to stdout by default).
            .args(["--access-log", "off"]);
        command
    };
    // References: the least any hyper-based proxy does per request
    // (waypoint/examples/hyper_floor.rs), on 1 and 2 threads, and the least a proxy with a
    // codec of its own does (waypoint/examples/httparse_floor.rs).
    let floor_command = |example: &str, port: u16, threads: u32| {
        let mut command = Command::new(target.join("release/examples").join(example));
        command.args([
            format!("127.0.0.1:{port}"),
            format!("127.0.0.1:{BACKEND_PORT}"),
            threads.to_string(),
        ]);
        command
    };

    // All five run side by side; each round loads them one at a time, in an order rotated by
    // one per round, so that no proxy always goes first (the machine's noise drifts).
    let mut contenders = vec![
        contender(
            "nginx",
            NGINX_PORT,
            Command::new("nginx").arg("-c").arg(&nginx_conf),
        )?,
        contender("waypoint", WAYPOINT_PORT, &mut waypoint_command())?,
        contender(
            "hyper_floor_1t",
            FLOOR_PORT,
            &mut floor_command("hyper_floor", FLOOR_PORT, 1),
        )?,
        contender(
            "hyper_floor_2t",
            FLOOR_2T_PORT,
            &mut floor_command("hyper_floor", FLOOR_2T_PORT, 2),
        )?,
        contender(
            "httparse_floor",
            HTTPARSE_FLOOR_PORT,
            &mut floor_command("httparse_floor", HTTPARSE_FLOOR_PORT, 2),
        )?,
    ];
    let count = contenders.len();
    for round in 0..rounds as usize {
        for i in 0..count {
            let c = &mut contenders[(round + i) % count];
            let run = measure(c.key, c.port, c.process.0.id(), seconds)?;
            c.runs.push(run);
        }
    }
    // Below saturation: latency of the proxy rather than of a machine at full load, open loop.
    let rate = fixed_rate_rps.unwrap_or_else(|| {
        let nginx = median(
            contenders[0]
                .runs
                .iter()
                .filter_map(|r| r["rps"].as_f64())
                .collect(),
        );
        ((nginx / 2.0 / 1000.0).floor() * 1000.0).max(1000.0) as u32
    });
    if rate > 0 {
        for round in 0..rounds as usize {
            for i in 0..count {
                let c = &mut contenders[(round + i) % count];
                let run = fixed_rate(c.key, c.port, rate, seconds)?;
                c.fixed.push(run);
            }
        }
    }
    let ratios: Vec<f64> = contenders[0]
        .runs
        .iter()
        .zip(&contenders[1].runs)
        .map(|(n, w)| w["rps"].as_f64().unwrap_or(0.0) / n["rps"].as_f64().unwrap_or(0.0).max(1e-9))
        .collect();
    let mut results = serde_json::Map::new();
    for c in contenders {
        let mut entry = summary(c.runs);
        if rate > 0
            && let Value::Object(entry) = &mut entry
        {
            let mut fixed = serde_json::Map::new();
            fixed.insert("rps".to_string(), json!(rate));
            for key in FIXED_KEYS {
                let values = c.fixed.iter().filter_map(|r| r[key].as_f64()).collect();
                fixed.insert(key.to_string(), json!(median(values)));
            }
            fixed.insert("runs".to_string(), Value::Array(c.fixed));
            entry.insert("fixed_rate".to_string(), Value::Object(fixed));
        }
        results.insert(c.key.to_string(), entry);
        // `c.process` is dropped here: the proxy is stopped before the callgrind runs.
    }

    if count_instructions {
        let one_worker_nginx = dir.join("nginx-1.conf");
        std::fs::write(&one_worker_nginx, nginx_config(&dir, NGINX_PORT, 1))?;
        let mut nginx = Command::new("nginx");
        nginx.arg("-c").arg(&one_worker_nginx);
        let mut waypoint = waypoint_command();
        waypoint.args(["--worker-threads", "1"]);
        let counted = [
            ("nginx", NGINX_PORT, nginx),
            ("waypoint", WAYPOINT_PORT, waypoint),
            (
                "hyper_floor_1t",
                FLOOR_PORT,
                floor_command("hyper_floor", FLOOR_PORT, 1),
            ),
            (
                "httparse_floor",
                HTTPARSE_FLOOR_PORT,
                floor_command("httparse_floor", HTTPARSE_FLOOR_PORT, 1),
            ),
        ];
        for (key, port, mut command) in counted {
            let n = instructions(&mut command, port, &dir)?;
            if let Some(Value::Object(entry)) = results.get_mut(key) {
                entry.insert("instructions_per_request".to_string(), json!(n));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    results.insert("rounds".to_string(), json!(rounds));
    results.insert("waypoint_to_nginx_rps".to_string(), json!(ratios));
    let results = Value::Object(results);
    if json_out {
        println!("{results}");
        return Ok(());
    }
    println!(
        "\nwaypoint vs nginx (reverse proxy), wrk -t2 -c16 for {seconds} s each, loopback, same backend; \
         median of {rounds} round(s), each proxy in turn:"
    );
    println!(
        "{:<22} {:>12} {:>12} {:>14} {:>14} {:>17}",
        "", "nginx", "waypoint", "hyper floor 1t", "hyper floor 2t", "httparse floor"
    );
    let columns = [
        "nginx",
        "waypoint",
        "hyper_floor_1t",
        "hyper_floor_2t",
        "httparse_floor",
    ];
    let mut rows: Vec<(&str, &str)> = vec![
        ("req/s", "rps"),
        ("p50 (µs)", "p50_us"),
        ("p99 (µs)", "p99_us"),
        ("RSS (MB)", "rss_mb"),
        ("cores per 1k req/s", "cpu_per_1k_rps"),
    ];
    if count_instructions {
        rows.push(("instructions/request", "instructions_per_request"));
    }
    let fixed_rows = [
        ("p50 (µs) at rate", "p50_us"),
        ("p99 (µs) at rate", "p99_us"),
        ("p99.9 (µs) at rate", "p999_us"),
        ("req/s answered", "achieved_rps"),
    ];
    let fixed_rows = if rate > 0 { &fixed_rows[..] } else { &[] };
    let rows = rows
        .into_iter()
        .map(|(label, key)| (label, None, key))
        .chain(
            fixed_rows
                .iter()
                .map(|(label, key)| (*label, Some("fixed_rate"), *key)),
        );
    for (label, within, key) in rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| {
                let value = match within {
                    Some(group) => &results[c][group][key],
                    None => &results[c][key],
                };
                value
                    .as_f64()
                    .map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
            })
            .collect();
        println!(
            "{label:<22} {:>12} {:>12} {:>14} {:>14} {:>17}",
            cells[0], cells[1], cells[2], cells[3], cells[4]
        );
    }
    let ratios: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!("waypoint/nginx req/s by round: {}", ratios.join(" "));
    if rate > 0 {
        println!(
            "\"at rate\": {rate} req/s open loop over {FIXED_RATE_CONNECTIONS} connections for {seconds} s \
             each (latency from its release by the pacer, queueing on its connection included), median of {rounds} round(s)"
        );
    }
    Ok(())
}
