//! The floor of a hyper-based HTTP/1.1 reverse proxy: the least a proxy built on hyper can
//! do per request, as a reference for `cargo xtask bench waypoint`.
//!
//! Each downstream connection gets one upstream connection of its own (no pool, no routing,
//! no timeouts, no metrics, no headers touched): hyper's server codec in, hyper's client codec
//! out, the client connection in a task of its own on the same thread. `threads` current-thread runtimes each accept on their
//! own `SO_REUSEPORT` listener (thread per core, nothing shared).
//!
//! `cargo run --release -p weft-waypoint --example hyper_floor -- LISTEN UPSTREAM [THREADS [pool]]`

use std::net::SocketAddr;

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

mod floor;

/// Like [`connection`], through hyper-util's pooled client (shared by the thread's connections).
async fn pooled(
    downstream: TcpStream,
    upstream: SocketAddr,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Incoming,
    >,
) -> anyhow::Result<()> {
    downstream.set_nodelay(true)?;
    let uri: http::Uri = format!("http://{upstream}").parse()?;
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        let client = client.clone();
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = request.uri().path_and_query().cloned();
        async move {
            *request.uri_mut() = http::Uri::from_parts(parts)?;
            anyhow::Ok(client.request(request).await?)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(downstream), service)
        .await?;
    Ok(())
}

async fn connection(downstream: TcpStream, upstream: SocketAddr) -> anyhow::Result<()> {
    let up = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connecting to {upstream}"))?;
    up.set_nodelay(true)?;
    downstream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(up))
        .await
        .context("upstream handshake")?;
    let sender = std::rc::Rc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(request).await
        }
    });
    // The upstream connection runs as a task of its own, as the waypoint's do: one task
    // driving both codecs (a `select!`) polls both on every wake-up, ~2,900 instructions per
    // request more (callgrind, nginx backend; ~3,100 with the benchmark's).
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            eprintln!("upstream: {e:#}");
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(downstream), service)
        .await
        .context("downstream")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = floor::args("usage: hyper_floor LISTEN UPSTREAM [THREADS [pool]]")?;
    let pool = args.option.as_deref() == Some("pool");
    let (listen, upstream) = (args.listen, args.upstream);
    floor::on_threads(args.threads, move || {
        let runtime = floor::runtime()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let listener = floor::reuseport_listener(listen)?;
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.set_nodelay(true);
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build(http);
            loop {
                let (stream, _) = listener.accept().await?;
                let client = client.clone();
                tokio::task::spawn_local(async move {
                    let r = if pool {
                        pooled(stream, upstream, client).await
                    } else {
                        connection(stream, upstream).await
                    };
                    if let Err(e) = r {
                        eprintln!("{e:#}");
                    }
                });
            }
        })
    })
}
