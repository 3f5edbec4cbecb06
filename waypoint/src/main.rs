//! `weft-waypoint`: loads a YAML config and serves it. SIGHUP reloads the config file (routes
//! and backends; listeners must stay the same); SIGTERM drains open connections and exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use weft_waypoint::config::Config;
use weft_waypoint::proxy::{Waypoint, serve_until};

/// Weft waypoint: a per-namespace L7 proxy.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// YAML config file (listeners, routes, backends).
    #[arg(long, env = "WEFT_WAYPOINT_CONFIG")]
    config: PathBuf,
    /// Address serving Prometheus metrics on /metrics.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_METRICS_ADDRESS",
        default_value = "127.0.0.1:15090"
    )]
    metrics_address: SocketAddr,
    /// Tracing: OTLP export, sampling, resource attributes.
    #[command(flatten)]
    trace: weft_waypoint::layers::trace::TraceArgs,
    /// On SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, env = "WEFT_WAYPOINT_DRAIN_SECONDS", default_value_t = 10)]
    drain_seconds: u64,
    /// Only validate the config and exit.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let config = Config::from_file(&args.config)?;
    if args.check {
        println!("{}: valid", args.config.display());
        return Ok(());
    }
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("weft_waypoint_request_duration_seconds".into()),
            weft_waypoint::metrics::DURATION_BUCKETS,
        )
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    weft_waypoint::metrics::describe();
    // Before the routes are compiled: their trace layers record with this provider.
    let traces = weft_waypoint::layers::trace::Tracing::install(&args.trace.settings())?;

    let waypoint = Arc::new(Waypoint::new(&config)?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let drain = std::time::Duration::from_secs(args.drain_seconds);
    let mut servers = Vec::new();
    for (socket, listener) in waypoint.bind().await? {
        tracing::info!(address = %socket.local_addr()?, "listening");
        let mut stopped = stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        servers.push(tokio::spawn(serve_until(socket, listener, shutdown, drain)));
    }
    let metrics_socket = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| {
            format!(
                "binding the metrics address {}; free the port or pass --metrics-address",
                args.metrics_address
            )
        })?;
    tokio::spawn(serve_metrics(metrics_socket, prometheus));

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                match Config::from_file(&args.config).map_err(anyhow::Error::from).and_then(|c| Ok(waypoint.reload(&c)?)) {
                    Ok(version) => tracing::info!(version, "config reloaded"),
                    Err(e) => tracing::error!(error = %e, "config reload failed; keeping the running config"),
                }
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!(
        ?drain,
        "shutting down: no new connections, draining open ones"
    );
    let _ = stop.send(true);
    for server in servers {
        let _ = server.await;
    }
    traces.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}

async fn serve_metrics(socket: tokio::net::TcpListener, prometheus: PrometheusHandle) {
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            continue;
        };
        let prometheus = prometheus.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let prometheus = prometheus.clone();
                    async move {
                        let (status, text) = match request.uri().path() {
                            "/metrics" => (http::StatusCode::OK, prometheus.render()),
                            "/ready" => (http::StatusCode::OK, "ready\n".to_string()),
                            _ => (
                                http::StatusCode::NOT_FOUND,
                                "not found; try /metrics or /ready\n".to_string(),
                            ),
                        };
                        let mut response = http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(text))
                                .map_err(|never| match never {})
                                .boxed(),
                        );
                        *response.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
