//! The `weft-waypoint` binary: config check, serving, metrics endpoint.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{backend, get};

const BIN: &str = env!("CARGO_BIN_EXE_weft-waypoint");

fn free_port() -> std::net::SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

/// Sends `SIG<name>` to process `pid`.
fn signal(name: &str, pid: &str) {
    assert!(
        Command::new("kill")
            .args([&format!("-{name}"), pid])
            .status()
            .expect("kill")
            .success()
    );
}

/// Whether `path` on `listen` answers `status` within 5 s (polled every 50 ms).
async fn answers_within_5s(listen: std::net::SocketAddr, path: &str, status: u16) -> bool {
    for _ in 0..100 {
        if get(listen, path).await.status == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// `path` fetched on 30 new connections (the kernel spreads them over the workers' sockets:
/// one that nobody accepted on would hang about a third of them), each within 5 s.
async fn thirty_connections(listen: std::net::SocketAddr, path: &str) -> Vec<common::Answer> {
    let mut answers = Vec::new();
    for _ in 0..30 {
        let answer = tokio::time::timeout(Duration::from_secs(5), get(listen, path))
            .await
            .expect("every connection is answered");
        answers.push(answer);
    }
    answers
}

/// Waits (at most 5 s) until the binary accepts connections on `listen` and `metrics`.
async fn wait_listening(listen: std::net::SocketAddr, metrics: std::net::SocketAddr) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(listen).await.is_ok()
            && tokio::net::TcpStream::connect(metrics).await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the binary did not listen within 5 s");
}

/// A listener on `listen` with one route, `all`, to backend `a` at `a`.
fn one_route(listen: std::net::SocketAddr, a: std::net::SocketAddr) -> String {
    format!(
        r#"
listeners:
  - name: web
    address: {listen}
    routes:
      - name: all
        backendRefs: [{{ name: a }}]
backends:
  - name: a
    endpoints: ["{a}"]
"#
    )
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("weft-waypoint-{}-{name}.yaml", std::process::id()));
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn check_reports_every_problem_with_its_field_path() {
    let path = write_config(
        "bad",
        r#"
listeners:
  - name: web
    address: nowhere
    routes:
      - backendRefs: [{ name: missing }]
        retry: { attempts: 20 }
"#,
    );
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "listeners[0].address",
        "listeners[0].routes[0].backendRefs[0].name",
        "listeners[0].routes[0].retry.attempts",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected} missing from:\n{stderr}"
        );
    }
    let _ = std::fs::remove_file(path);
}

struct Child(std::process::Child);

impl Child {
    /// The binary serving the config file `path`, metrics on `metrics`, with `extra` flags.
    fn start(path: &std::path::Path, metrics: std::net::SocketAddr, extra: &[&str]) -> Self {
        Child(
            Command::new(BIN)
                .arg("--config")
                .arg(path)
                .arg("--metrics-address")
                .arg(metrics.to_string())
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the binary"),
        )
    }

    /// The exit status, if the process exits within 5 s.
    async fn exit_within_5s(&mut self) -> Option<std::process::ExitStatus> {
        for _ in 0..100 {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serves_the_config_and_exports_metrics() {
    let a = backend("a").await;
    let (listen, metrics) = (free_port(), free_port());
    let path = write_config("good", &one_route(listen, a.addr));
    let mut child = Child::start(
        &path,
        metrics,
        // Thread per core: three SO_REUSEPORT sockets on one address.
        &["--worker-threads", "3", "--config-check-seconds", "1"],
    );
    wait_listening(listen, metrics).await;
    // Every worker answers (the kernel spreads new connections over their sockets: one that
    // nobody accepted on would hang about a third of these).
    for answer in thirty_connections(listen, "/hello").await {
        assert_eq!(answer.body, "a");
    }
    let exported = get(metrics, "/metrics").await.body;
    assert!(
        exported.contains("weft_waypoint_requests_total"),
        "{exported}"
    );
    assert!(exported.contains("route=\"all\""), "{exported}");

    // SIGHUP reloads the file: a new route answers 418 through a fault.
    let b = backend("b").await;
    std::fs::write(
        &path,
        format!(
            r#"
listeners:
  - name: web
    address: {listen}
    routes:
      - name: all
        backendRefs: [{{ name: a }}]
      - name: teapot
        matches: [{{ path: {{ type: Exact, value: /teapot }} }}]
        backendRefs: [{{ name: b }}]
        fault: {{ abort: {{ httpStatus: 418, percentage: 100 }} }}
backends:
  - name: a
    endpoints: ["{}"]
  - name: b
    endpoints: ["{}"]
"#,
            a.addr, b.addr
        ),
    )
    .expect("rewrite config");
    let pid = child.0.id().to_string();
    signal("HUP", &pid);
    assert!(
        answers_within_5s(listen, "/teapot", 418).await,
        "SIGHUP did not reload the config"
    );
    assert_eq!(get(listen, "/hello").await.body, "a");
    // ... on every worker.
    for answer in thirty_connections(listen, "/teapot").await {
        assert_eq!(answer.status, 418);
    }
    // A broken file is refused and the running config stays.
    std::fs::write(&path, "listeners: [").expect("rewrite config");
    signal("HUP", &pid);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(listen, "/teapot").await.status, 418);

    // Without SIGHUP: a changed file is noticed (as a ConfigMap volume changes in place).
    std::fs::write(
        &path,
        format!(
            r#"
listeners:
  - name: web
    address: {listen}
    routes:
      - name: all
        backendRefs: [{{ name: a }}]
        fault: {{ abort: {{ httpStatus: 429, percentage: 100 }} }}
backends:
  - name: a
    endpoints: ["{}"]
"#,
            a.addr
        ),
    )
    .expect("rewrite config");
    assert!(
        answers_within_5s(listen, "/hello", 429).await,
        "the changed file was not reloaded within 5 s"
    );

    // SIGTERM: drain and exit cleanly.
    signal("TERM", &pid);
    let exited = child.exit_within_5s().await;
    assert!(
        exited.is_some_and(|s| s.success()),
        "exit after SIGTERM: {exited:?}"
    );
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn sigterm_keeps_serving_through_the_shutdown_delay_while_not_ready() {
    let a = backend("a").await;
    let (listen, metrics) = (free_port(), free_port());
    let path = write_config("delay", &one_route(listen, a.addr));
    let mut child = Child::start(
        &path,
        metrics,
        // A delay far longer than the test: only the second SIGTERM ends it.
        &[
            "--worker-threads",
            "2",
            "--shutdown-delay-seconds",
            "60",
            "--drain-seconds",
            "1",
        ],
    );
    wait_listening(listen, metrics).await;
    assert_eq!(get(metrics, "/ready").await.status, 200);
    assert_eq!(get(listen, "/hello").await.body, "a");

    let pid = child.0.id().to_string();
    signal("TERM", &pid);
    // Not ready at once, so that Kubernetes takes the pod out of the Service's endpoints...
    assert!(
        answers_within_5s(metrics, "/ready", 503).await,
        "/ready still answers 200 after SIGTERM"
    );
    let why = get(metrics, "/ready").await.body;
    assert!(why.contains("shutting down"), "{why}");
    // ... while new connections (clients that have not yet seen the change) are still served,
    // on every worker.
    for answer in thirty_connections(listen, "/hello").await {
        assert_eq!(answer.body, "a");
    }
    assert!(child.0.try_wait().expect("wait").is_none(), "exited early");

    // A second SIGTERM cuts the delay short: drain (1 s) and exit.
    signal("TERM", &pid);
    let exited = child.exit_within_5s().await;
    assert!(
        exited.is_some_and(|s| s.success()),
        "exit within 5 s of the second SIGTERM: {exited:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "the listener is closed"
    );
    let _ = std::fs::remove_file(path);
}
