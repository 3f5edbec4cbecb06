//! `weft-waypoint`: loads a YAML config and serves it. SIGHUP reloads the config file (routes
//! and backends; listeners must stay the same); SIGTERM drains open connections and exits.
//!
//! With `--controller` it runs in mesh mode: it follows the controller's view of the mesh,
//! obtains its workload certificate from the controller's CA (with the node's credential) and
//! terminates HBONE on `--hbone-address`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use weft_agent::admin::ConfigStatus;
use weft_agent::discovery::{self, ControllerOptions, NodeIdentity};
use weft_agent::identity::{CertManager, GrpcCaClient, NodeCaClient, node_spiffe_id};
use weft_waypoint::config::{Config, Mode};
use weft_waypoint::layers::accesslog::{AccessLog, AccessLogTarget};
use weft_waypoint::mesh::routes::with_routes;
use weft_waypoint::mesh::server::{bind_hbone_copies, serve_hbone_until};
use weft_waypoint::mesh::{ManagedSvid, Mesh, MeshContext};
use weft_waypoint::proxy::{Waypoint, serve_logged_until};

/// Weft waypoint: a per-namespace L7 proxy.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// YAML config file (listeners, routes, backends). Required without --controller; in
    /// mesh mode optional: HTTPRoutes and GRPCRoutes from the controller add to it.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_CONFIG",
        required_unless_present = "controller"
    )]
    config: Option<PathBuf>,
    /// How often (seconds) the --config file is read again; a changed file is reloaded as on
    /// SIGHUP (a ConfigMap volume updates in place). 0: only on SIGHUP.
    #[arg(long, env = "WEFT_WAYPOINT_CONFIG_CHECK_SECONDS", default_value_t = 5)]
    config_check_seconds: u64,
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
    /// Worker threads, each with its own runtime, listening sockets (`SO_REUSEPORT`) and
    /// connection pools (default: one per CPU).
    #[arg(long, env = "WEFT_WAYPOINT_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// On SIGTERM, how long open connections may take to finish, in seconds.
    #[arg(long, env = "WEFT_WAYPOINT_DRAIN_SECONDS", default_value_t = 10)]
    drain_seconds: u64,
    /// On SIGTERM, how long (seconds) the waypoint goes on accepting connections and serving
    /// requests while `/ready` answers 503, before it stops accepting and drains: the time
    /// its clients (node agents, through the controller's view of the endpoints) take to stop
    /// sending to it. `weftctl waypoint deploy` sets 5. A second SIGTERM ends it early.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_SHUTDOWN_DELAY_SECONDS",
        default_value_t = 0
    )]
    shutdown_delay_seconds: u64,
    /// Only validate the config and exit (in mesh mode when --controller is given; nothing
    /// is contacted).
    #[arg(long)]
    check: bool,
    /// Mesh mode: the controller's config stream and CA, `https://HOST:PORT`.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_CONTROLLER",
        requires_all = ["controller_ca", "node", "namespace", "service_account"]
    )]
    controller: Option<String>,
    /// PEM CA that signed the controller's certificate (the controller writes `ca.pem` to its
    /// state directory when it generates one).
    #[arg(long, env = "WEFT_WAYPOINT_CONTROLLER_CA")]
    controller_ca: Option<PathBuf>,
    /// The node the waypoint pod runs on: the waypoint authenticates to the controller as this
    /// node, which may obtain certificates for the workloads running on it.
    #[arg(long, env = "WEFT_WAYPOINT_NODE")]
    node: Option<String>,
    /// File with the node's bootstrap token (no-cluster mode), exchanged for a node
    /// certificate; without it the controller must run with --insecure-no-auth.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_TOKEN_FILE",
        conflicts_with = "service_account_token_file"
    )]
    token_file: Option<PathBuf>,
    /// Kubernetes: the waypoint pod's projected service-account token (audience
    /// `weft-controller`), sent as the bearer credential of the config stream and of its own
    /// certificate requests (the controller checks it with a TokenReview and allows only this
    /// waypoint's identity). Re-read for every new connection to the controller.
    #[arg(long, env = "WEFT_WAYPOINT_SERVICE_ACCOUNT_TOKEN_FILE")]
    service_account_token_file: Option<PathBuf>,
    /// SPIFFE trust domain of workload identities (must match the controller's).
    #[arg(
        long,
        env = "WEFT_WAYPOINT_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// The waypoint's namespace: its identity, and where listeners' and backends' `service`
    /// names are looked up.
    #[arg(long, env = "WEFT_WAYPOINT_NAMESPACE")]
    namespace: Option<String>,
    /// The waypoint's service account: its identity is
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[arg(long, env = "WEFT_WAYPOINT_SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// Mesh mode: the waypoint's name (its Services are bound with
    /// `weft.dev/use-waypoint: <name>`); routes attached to those Services are served.
    /// Default: the service account.
    #[arg(long, env = "WEFT_WAYPOINT_NAME")]
    waypoint_name: Option<String>,
    /// Mesh mode: where HBONE (mutual TLS 1.3, HTTP/2 CONNECT) is served. The default falls
    /// back to 0.0.0.0:15008 where IPv6 is unavailable.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_HBONE_ADDRESS",
        default_value = "[::]:15008"
    )]
    hbone_address: SocketAddr,
    /// Mesh mode: where the last good mesh view is kept (served after a restart while the
    /// controller is unreachable).
    #[arg(
        long,
        env = "WEFT_WAYPOINT_STATE_DIR",
        default_value = "/var/lib/weft-waypoint"
    )]
    state_dir: PathBuf,
    /// Mesh mode: how long a tunnel to a Service port without a declared protocol
    /// (`appProtocol`) waits for the client's first bytes before it is proxied as opaque TCP
    /// (e.g. `100ms`, `1s`). Server-first protocols (MySQL, SMTP, ...) pay this wait once per
    /// connection; declare `appProtocol: tcp` on their ports to skip it.
    #[arg(
        long,
        env = "WEFT_WAYPOINT_PROTOCOL_DETECT_TIMEOUT",
        default_value = "100ms",
        value_parser = parse_duration
    )]
    protocol_detect_timeout: Duration,
    /// Access log, one JSON object per line per request: `off`, `stdout` (the default; the
    /// waypoint's own logs go to stderr) or a file path (appended to).
    #[arg(long, env = "WEFT_WAYPOINT_ACCESS_LOG", default_value = "stdout")]
    access_log: AccessLogTarget,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    weft_waypoint::duration::GatewayDuration::parse(s)
        .map(|d| d.0)
        .map_err(|e| e.to_string())
}

/// After a trust bundle change, certificates are renewed this long after the change (as the
/// agent does)...
const TRUST_BUNDLE_RENEW_SETTLE: Duration = Duration::from_secs(2);
/// ...plus a random delay up to this.
const TRUST_BUNDLE_RENEW_SPREAD: Duration = Duration::from_secs(1);

/// What mesh mode runs besides the proxy.
struct MeshRun {
    ctx: Arc<MeshContext>,
    ready: Arc<AtomicBool>,
}

/// Starts following the controller and obtaining the waypoint's certificate.
fn start_mesh(args: &Args, url: &str) -> anyhow::Result<MeshRun> {
    let (Some(ca), Some(node), Some(namespace), Some(service_account)) = (
        &args.controller_ca,
        &args.node,
        &args.namespace,
        &args.service_account,
    ) else {
        anyhow::bail!(
            "--controller needs --controller-ca, --node, --namespace and --service-account"
        );
    };
    let trust_domain: weft_tunnel::TrustDomain = args
        .trust_domain
        .parse()
        .with_context(|| format!("--trust-domain `{}`", args.trust_domain))?;
    let identity = weft_tunnel::Identity::new(trust_domain, namespace, service_account)
        .context("--namespace and --service-account must form a SPIFFE ID")?;
    let mut opts = ControllerOptions {
        url: url.to_string(),
        ca: ca.clone(),
        token_file: args
            .token_file
            .clone()
            .or_else(|| args.service_account_token_file.clone()),
        node: node.clone(),
        state_dir: args.state_dir.clone(),
        node_identity: None,
    };
    let mut node_certs = None;
    // A node bootstrap token is exchanged for a node certificate; a service-account token is
    // used as it is (the controller refuses to exchange it).
    if args.token_file.is_some() {
        let certs = CertManager::new(Arc::new(NodeCaClient::new(opts.clone())));
        opts.node_identity = Some(NodeIdentity {
            id: node_spiffe_id(&args.trust_domain, node),
            certs: certs.clone(),
        });
        node_certs = Some(certs);
    }
    let certs = CertManager::new(Arc::new(GrpcCaClient::new(opts.clone())));
    let (states_tx, states_rx) = tokio::sync::watch::channel(None);
    let status = Arc::new(std::sync::Mutex::new(ConfigStatus {
        source: url.to_string(),
        ..Default::default()
    }));
    tokio::spawn(discovery::run(opts, states_tx, status));
    let mesh = Mesh::follow(states_rx, &args.trust_domain);
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(keep_certified(
        certs.clone(),
        node_certs,
        identity.to_string(),
        mesh.clone(),
        ready.clone(),
    ));
    let svid = Arc::new(ManagedSvid::new(certs, identity.to_string()));
    tracing::info!(%identity, controller = url, "mesh mode");
    let mut ctx = MeshContext::new(namespace, mesh, svid);
    ctx.protocol_detect_timeout = args.protocol_detect_timeout;
    Ok(MeshRun {
        ctx: Arc::new(ctx),
        ready,
    })
}

/// Obtains the waypoint's certificate (retrying with backoff until it is issued; the manager
/// renews it at half-life from then on), marks the waypoint ready once it also has a mesh
/// view, and renews every certificate soon after a trust bundle change, as the agent does.
async fn keep_certified(
    certs: Arc<CertManager>,
    node_certs: Option<Arc<CertManager>>,
    identity: String,
    mesh: Mesh,
    ready: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match certs.get(&identity).await {
            Ok(cert) => {
                tracing::info!(%identity, not_after = cert.not_after, "workload certificate obtained");
                break;
            }
            Err(e) => {
                tracing::warn!(%identity, error = %e, retry_in_s = backoff.as_secs(), "cannot obtain the waypoint's certificate; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    let mut views = mesh.subscribe();
    let mut trust: Option<Vec<String>> = None;
    loop {
        let view = views.borrow_and_update().clone();
        if view.received() {
            ready.store(true, Ordering::Release);
            let pem = view.trust_pem();
            if !pem.is_empty() && trust.as_deref() != Some(pem) {
                if trust.is_some() {
                    let n = certs
                        .renew_all_soon(TRUST_BUNDLE_RENEW_SETTLE, TRUST_BUNDLE_RENEW_SPREAD)
                        + node_certs.as_ref().map_or(0, |c| {
                            c.renew_all_soon(TRUST_BUNDLE_RENEW_SETTLE, TRUST_BUNDLE_RENEW_SPREAD)
                        });
                    tracing::info!(
                        certificates = n,
                        "trust bundle changed: renewing certificates from the current CA"
                    );
                }
                trust = Some(pem.to_vec());
            }
        }
        if views.changed().await.is_err() {
            return;
        }
    }
}

/// Recompiles the waypoint when the controller's routes for its Services change (and only
/// then: views change with every endpoint).
async fn follow_routes(
    waypoint: Arc<Waypoint>,
    ctx: Arc<MeshContext>,
    file: Arc<std::sync::Mutex<Config>>,
    waypoint_key: String,
    compiled: Config,
) {
    let mut views = ctx.mesh.subscribe();
    let mut last = compiled;
    loop {
        let view = views.borrow_and_update().clone();
        let file_now = match file.lock() {
            Ok(f) => f.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let merged = with_routes(&file_now, &view, &ctx.namespace, &waypoint_key);
        if last != merged {
            match waypoint.reload(&merged) {
                Ok(version) => tracing::info!(
                    version,
                    listeners = merged.listeners.len(),
                    "routes from the controller changed; recompiled"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "the controller's routes do not compile here; keeping the running routes (check the HTTPRoute/GRPCRoute objects named in the error)"
                ),
            }
        }
        last = merged;
        if views.changed().await.is_err() {
            return;
        }
    }
}

/// One worker thread per CPU (`available_parallelism` follows the container's CPU limit), so
/// the waypoint uses the CPUs it is given. On the 2-CPU CI machine, with the load generator and
/// the backend on the same CPUs, 2 workers and 1 measured the same within the noise (41-47k
/// and 38-45k req/s: docs/waypoint.md).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

fn main() -> anyhow::Result<()> {
    // Stdout is the access log's.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let workers = args
        .worker_threads
        .unwrap_or_else(default_worker_threads)
        .max(1);
    // Thread per core: this thread is worker 0, `run` starts the others (crate::workers).
    weft_waypoint::workers::set_count(workers);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("weft-waypoint")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mode = if args.controller.is_some() {
        Mode::Mesh
    } else {
        Mode::Standalone
    };
    let config = match &args.config {
        Some(path) => Config::from_file_for(path, mode)?,
        // Mesh mode without a file: routes come from the controller only.
        None => Config::from_yaml_for("listeners: []\n", mode)?,
    };
    if args.check {
        match &args.config {
            Some(path) => println!("{}: valid", path.display()),
            None => println!("no --config: nothing to check"),
        }
        return Ok(());
    }
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("weft_waypoint_request_duration_seconds".into()),
            weft_waypoint::metrics::DURATION_BUCKETS,
        )
        .context("configuring histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Suffix("_bytes".into()),
            weft_waypoint::metrics::SIZE_BUCKETS,
        )
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    weft_agent::metrics::spawn_upkeep(prometheus.clone());
    weft_waypoint::metrics::describe();
    // Before the routes are compiled: their trace layers record with this provider.
    let traces = weft_waypoint::layers::trace::Tracing::install(&args.trace.settings())?;

    let mesh = match &args.controller {
        Some(url) => Some(start_mesh(&args, url)?),
        None => None,
    };
    // Mesh mode: the file's config plus the controller's routes for Services bound to this
    // waypoint, recompiled when either changes.
    let waypoint_key = format!(
        "{}/{}",
        args.namespace.as_deref().unwrap_or_default(),
        args.waypoint_name
            .as_deref()
            .or(args.service_account.as_deref())
            .unwrap_or_default()
    );
    let file_config = Arc::new(std::sync::Mutex::new(config.clone()));
    let access_log = AccessLog::open(&args.access_log)?;
    let (waypoint, compiled) = match &mesh {
        Some(run) => {
            let merged = with_routes(
                &config,
                &run.ctx.mesh.current(),
                &run.ctx.namespace,
                &waypoint_key,
            );
            (Waypoint::new_mesh(&merged, run.ctx.clone())?, merged)
        }
        None => (Waypoint::new(&config)?, config.clone()),
    };
    let waypoint = Arc::new(waypoint.with_access_log(access_log));
    if let Some(run) = &mesh {
        tokio::spawn(follow_routes(
            waypoint.clone(),
            run.ctx.clone(),
            file_config.clone(),
            waypoint_key.clone(),
            compiled,
        ));
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let drain = std::time::Duration::from_secs(args.drain_seconds);
    let workers = weft_waypoint::workers::count();
    let shutdown = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    // Per worker thread (index - 1): the sockets it serves; this thread is worker 0.
    let mut jobs: Vec<Vec<Job>> = (1..workers).map(|_| Vec::new()).collect();
    let mut servers = Vec::new();
    let ready = match &mesh {
        Some(run) => {
            let mut sockets = bind_hbone_copies(args.hbone_address, workers)
                .with_context(|| {
                    format!(
                        "binding the HBONE address {}; free the port or pass --hbone-address",
                        args.hbone_address
                    )
                })?
                .into_iter();
            let first =
                tokio::net::TcpListener::from_std(sockets.next().context("no HBONE socket")?)?;
            tracing::info!(address = %first.local_addr()?, workers, "HBONE listening");
            for (worker, socket) in sockets.enumerate() {
                jobs[worker].push(Job::Hbone(socket));
            }
            tokio::spawn(run.ctx.pool.clone().run_reaper());
            servers.push(tokio::spawn(serve_hbone_until(
                first,
                waypoint.clone(),
                shutdown(stopped.clone()),
                drain,
            )));
            run.ready.clone()
        }
        None => Arc::new(AtomicBool::new(true)),
    };
    for (sockets, listener) in waypoint.bind_copies(workers)? {
        let mut sockets = sockets.into_iter();
        let first =
            tokio::net::TcpListener::from_std(sockets.next().context("no listening socket")?)?;
        tracing::info!(address = %first.local_addr()?, workers, "listening");
        for (worker, socket) in sockets.enumerate() {
            jobs[worker].push(Job::Listen(socket, listener.clone()));
        }
        servers.push(tokio::spawn(serve_logged_until(
            first,
            listener,
            waypoint.access_log().cloned(),
            shutdown(stopped.clone()),
            drain,
        )));
    }
    tokio::spawn(weft_waypoint::workers::keep_timer_armed());
    let mut threads = Vec::new();
    for (i, jobs) in jobs.into_iter().enumerate() {
        let waypoint = waypoint.clone();
        let stopped = stopped.clone();
        let thread = std::thread::Builder::new()
            .name(format!("weft-waypoint-{}", i + 1))
            .spawn(move || run_worker(i + 1, jobs, waypoint, stopped, drain))
            .context("starting a worker thread")?;
        threads.push(thread);
    }
    let metrics_socket = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| {
            format!(
                "binding the metrics address {}; free the port or pass --metrics-address",
                args.metrics_address
            )
        })?;
    // Set on SIGTERM: `/ready` answers 503 from then on, whatever `ready` says (a new mesh
    // view while draining sets `ready` again).
    let draining = Arc::new(AtomicBool::new(false));
    tokio::spawn(serve_metrics(
        metrics_socket,
        prometheus,
        ready.clone(),
        draining.clone(),
    ));

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // The file as last loaded (or tried), to notice changes without SIGHUP.
    let mut loaded = args.config.as_ref().and_then(|p| std::fs::read(p).ok());
    let check_file = args.config.is_some() && args.config_check_seconds > 0;
    let mut file_check = tokio::time::interval(std::time::Duration::from_secs(
        args.config_check_seconds.max(1),
    ));
    file_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let Some(path) = &args.config else {
                    tracing::info!("SIGHUP: no --config file to reload");
                    continue;
                };
                reload_file(path, mode, &mesh, &waypoint_key, &waypoint, &file_config);
                loaded = std::fs::read(path).ok();
            }
            _ = file_check.tick(), if check_file => {
                let Some(path) = &args.config else { continue };
                let now = std::fs::read(path).ok();
                if now.is_some() && now != loaded {
                    tracing::info!(path = %path.display(), "the config file changed");
                    reload_file(path, mode, &mesh, &waypoint_key, &waypoint, &file_config);
                    loaded = now;
                }
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    draining.store(true, Ordering::Release);
    let delay = std::time::Duration::from_secs(args.shutdown_delay_seconds);
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "signal received: not ready; still serving while clients stop sending here"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = terminate.recv() => tracing::info!("second SIGTERM: shutdown delay cut short"),
            _ = tokio::signal::ctrl_c() => {}
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
    for thread in threads {
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "a worker thread failed"),
            _ => tracing::error!("a worker thread panicked"),
        }
    }
    traces.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}

/// Reloads the config file `path` (plus the controller's routes in mesh mode); a broken file
/// is logged and the running config stays.
fn reload_file(
    path: &std::path::Path,
    mode: Mode,
    mesh: &Option<MeshRun>,
    waypoint_key: &str,
    waypoint: &Waypoint,
    file_config: &std::sync::Mutex<Config>,
) {
    let result = Config::from_file_for(path, mode)
        .map_err(anyhow::Error::from)
        .and_then(|file| {
            let serving = match mesh {
                Some(run) => with_routes(
                    &file,
                    &run.ctx.mesh.current(),
                    &run.ctx.namespace,
                    waypoint_key,
                ),
                None => file.clone(),
            };
            let version = waypoint.reload(&serving)?;
            if let Ok(mut current) = file_config.lock() {
                *current = file;
            }
            Ok(version)
        });
    match result {
        Ok(version) => tracing::info!(version, "config reloaded"),
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; keeping the running config");
        }
    }
}

/// A socket a worker thread serves.
enum Job {
    /// HBONE (mesh mode).
    Hbone(std::net::TcpListener),
    /// A listener of the config.
    Listen(std::net::TcpListener, weft_waypoint::proxy::SharedListener),
}

/// Worker thread `index`: its own current-thread runtime serving `jobs` until `stopped`.
fn run_worker(
    index: usize,
    jobs: Vec<Job>,
    waypoint: Arc<Waypoint>,
    stopped: tokio::sync::watch::Receiver<bool>,
    drain: std::time::Duration,
) -> anyhow::Result<()> {
    weft_waypoint::workers::enter(index);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a worker runtime")?;
    runtime.block_on(async move {
        tokio::spawn(weft_waypoint::workers::keep_timer_armed());
        let mut servers = Vec::new();
        for job in jobs {
            let mut stopped = stopped.clone();
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            servers.push(match job {
                Job::Hbone(socket) => tokio::spawn(serve_hbone_until(
                    tokio::net::TcpListener::from_std(socket)?,
                    waypoint.clone(),
                    shutdown,
                    drain,
                )),
                Job::Listen(socket, listener) => tokio::spawn(serve_logged_until(
                    tokio::net::TcpListener::from_std(socket)?,
                    listener,
                    waypoint.access_log().cloned(),
                    shutdown,
                    drain,
                )),
            });
        }
        for server in servers {
            let _ = server.await;
        }
        anyhow::Ok(())
    })
}

async fn serve_metrics(
    socket: tokio::net::TcpListener,
    prometheus: PrometheusHandle,
    ready: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
) {
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            continue;
        };
        let prometheus = prometheus.clone();
        let ready = ready.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: http::Request<hyper::body::Incoming>| {
                    let prometheus = prometheus.clone();
                    let ready = ready.load(Ordering::Acquire);
                    let draining = draining.load(Ordering::Acquire);
                    async move {
                        let (status, text) = match request.uri().path() {
                            "/metrics" => (http::StatusCode::OK, prometheus.render()),
                            "/ready" if draining => (
                                http::StatusCode::SERVICE_UNAVAILABLE,
                                "not ready: shutting down (SIGTERM or SIGINT)\n".to_string(),
                            ),
                            "/ready" if ready => (http::StatusCode::OK, "ready\n".to_string()),
                            "/ready" => (
                                http::StatusCode::SERVICE_UNAVAILABLE,
                                "not ready: waiting for the mesh view and the workload certificate (mesh mode)\n".to_string(),
                            ),
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
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed_and_mesh_mode_needs_its_identity() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let e = Args::try_parse_from([
            "weft-waypoint",
            "--config",
            "w.yaml",
            "--controller",
            "https://10.0.0.1:15010",
        ])
        .expect_err("incomplete");
        assert!(e.to_string().contains("--namespace"), "{e}");
        let args = Args::try_parse_from([
            "weft-waypoint",
            "--config",
            "w.yaml",
            "--controller",
            "https://10.0.0.1:15010",
            "--controller-ca",
            "ca.pem",
            "--node",
            "n1",
            "--namespace",
            "shop",
            "--service-account",
            "waypoint",
        ])
        .expect("complete");
        assert_eq!(args.hbone_address, "[::]:15008".parse().expect("addr"));
        assert_eq!(args.trust_domain, "cluster.local");
        assert_eq!(args.protocol_detect_timeout, Duration::from_millis(100));
        assert_eq!(args.access_log, AccessLogTarget::Stdout);
        let args = Args::try_parse_from([
            "weft-waypoint",
            "--config",
            "w.yaml",
            "--protocol-detect-timeout",
            "1s",
            "--access-log",
            "off",
        ])
        .expect("flags");
        assert_eq!(args.protocol_detect_timeout, Duration::from_secs(1));
        assert_eq!(args.access_log, AccessLogTarget::Off);
    }
}
