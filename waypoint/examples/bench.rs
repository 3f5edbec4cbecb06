//! Rough overhead measurement: an in-process backend, the waypoint in front, and concurrent
//! HTTP/1.1 clients for a few seconds, direct then through the proxy.
//!
//! `cargo run --release -p weft-waypoint --example bench -- [connections] [seconds]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_waypoint::config::Config;
use weft_waypoint::proxy::{Waypoint, serve};

async fn backend() -> anyhow::Result<SocketAddr> {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Requests per second and latency percentiles (p50, p99) against `target`.
async fn load(
    target: SocketAddr,
    connections: usize,
    length: Duration,
) -> (f64, Duration, Duration) {
    let deadline = Instant::now() + length;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            tokio::spawn(async move {
                let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    let Ok(request) = http::Request::get(format!("http://{target}/bench"))
                        .body(Full::new(Bytes::new()))
                    else {
                        break;
                    };
                    let Ok(response) = client.request(request).await else {
                        continue;
                    };
                    if response.into_body().collect().await.is_ok() {
                        latencies.push(start.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    all.sort();
    let pick = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (
        all.len() as f64 / length.as_secs_f64(),
        pick(0.5),
        pick(0.99),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let length = Duration::from_secs(seconds);
    let target = backend().await?;
    let config = Config::from_yaml(&format!(
        r#"
listeners:
  - name: bench
    address: 127.0.0.1:0
    routes:
      - matches: [{{ path: {{ type: PathPrefix, value: /bench }} }}]
        backendRefs: [{{ name: b }}]
        timeouts: {{ request: 5s }}
        retry: {{ attempts: 2 }}
backends:
  - name: b
    endpoints: ["{target}"]
    outlierDetection: {{}}
"#
    ))?;
    let waypoint = Waypoint::new(&config)?;
    let (socket, listener) = waypoint.bind().await?.remove(0);
    let proxy = socket.local_addr()?;
    tokio::spawn(serve(socket, listener));

    for (name, addr) in [("direct", target), ("waypoint", proxy)] {
        let (rps, p50, p99) = load(addr, connections, length).await;
        println!(
            "{name:>9}: {rps:>9.0} req/s  p50 {p50:>10.1?}  p99 {p99:>10.1?}  ({connections} connections, {seconds} s)"
        );
    }
    Ok(())
}
