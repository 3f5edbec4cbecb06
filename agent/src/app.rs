//! Wiring: load capture, start the admin endpoint, follow the configuration, run until a
//! signal arrives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::sync::watch;
use weft_netns::NetNs;

use crate::admin::{self, AdminState, ConfigStatus};
use crate::capture::{Capture, CaptureOptions};
use crate::certstore::CertStore;
use crate::discovery::{self, ControllerOptions};
use crate::events::{self, EventLog};
use crate::identity::{CertManager, GrpcCaClient, NodeCaClient, node_spiffe_id};
use crate::pods::PodManager;
use crate::pool::Pool;
use crate::proxy::ProxyContext;
use weft_api::MeshState;
use weft_api::local::LocalConfig;

/// Agent settings (from the command line; see `main.rs`).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    pub source: ConfigSource,
    pub admin_addr: SocketAddr,
    pub socket_mark: u32,
    pub cgroup_root: Option<PathBuf>,
    pub trace_unenrolled: bool,
    pub ebpf_log_level: u8,
    pub config_poll: Duration,
    pub connect_timeout: Duration,
    pub worker_threads: usize,
    /// SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// Plaintext to destinations outside the mesh is allowed.
    pub outbound_passthrough: bool,
    /// Live connections a policy change no longer allows are closed.
    pub close_denied_connections: bool,
    /// How long live connections may finish after SIGTERM.
    pub drain_timeout: Duration,
    /// An HBONE connection that carried no tunnel this long is closed.
    pub pool_idle_timeout: Duration,
}

/// Where the agent's configuration comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// A local YAML file or directory (development; like ztunnel's local config).
    Local(PathBuf),
    /// The controller's config stream.
    Controller(ControllerOptions),
}

impl ConfigSource {
    fn describe(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::Controller(c) => c.url.clone(),
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                "weft_tcp_connection_duration_seconds".into(),
            ),
            crate::metrics::DURATION_BUCKETS,
        )
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    crate::metrics::spawn_upkeep(prometheus.clone());
    crate::metrics::describe();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads.max(1))
        .thread_name("weft-data")
        .enable_all()
        .build()
        .context("starting the data-path runtime")?;

    let crate::capture::Loaded {
        capture,
        orig,
        events: ring,
        logger,
    } = Capture::load(&CaptureOptions {
        cgroup_root: cfg.cgroup_root.clone(),
        socket_mark: cfg.socket_mark,
        trace_unenrolled: cfg.trace_unenrolled,
        ebpf_log_level: cfg.ebpf_log_level,
    })?;
    tracing::info!(node = %cfg.node, cgroup = %capture.cgroup().display(), mark = format!("{:#x}", cfg.socket_mark), "capture programs attached");
    let capture = Arc::new(Mutex::new(capture));
    let orig = Arc::new(orig);
    let events_log = Arc::new(EventLog::default());
    // With a token, the agent exchanges it for a node certificate (at startup, renewed at
    // half-life) and talks to the controller over mutual TLS with it.
    let mut source = cfg.source.clone();
    let mut node_certs = None;
    if let ConfigSource::Controller(opts) = &mut source
        && opts.token_file.is_some()
    {
        let m = CertManager::new(Arc::new(NodeCaClient::new(opts.clone())));
        opts.node_identity = Some(discovery::NodeIdentity {
            id: node_spiffe_id(&cfg.trust_domain, &cfg.node),
            certs: m.clone(),
        });
        node_certs = Some(m);
    }
    let certs = match &source {
        ConfigSource::Controller(opts) => Some(CertManager::with_store(
            Arc::new(GrpcCaClient::new(opts.clone())),
            Some(CertStore::new(opts.state_dir.join("certs"))),
        )),
        ConfigSource::Local(_) => {
            tracing::warn!(
                "local configuration: no certificate authority, so mutual TLS is off and meshed traffic travels in plaintext (use --controller for mTLS)"
            );
            None
        }
    };
    let pool = Pool::new(cfg.pool_idle_timeout);
    let ctx = Arc::new(ProxyContext {
        home: NetNs::current().context("opening the agent's own network namespace")?,
        orig: orig.clone(),
        socket_mark: cfg.socket_mark,
        connect_timeout: cfg.connect_timeout,
        view: Default::default(),
        certs: certs.clone(),
        pool: pool.clone(),
        lb: Default::default(),
        conns: Default::default(),
        passthrough: cfg.outbound_passthrough,
        draining: false.into(),
        trust_domain: cfg.trust_domain.clone(),
    });
    let conns = ctx.conns.clone();
    let pods = Arc::new(Mutex::new(PodManager::new(
        cfg.node.clone(),
        capture.clone(),
        ctx,
        events_log.clone(),
        runtime.handle().clone(),
        cfg.trust_domain.clone(),
        cfg.close_denied_connections,
    )));
    let config_status = Arc::new(Mutex::new(ConfigStatus {
        source: cfg.source.describe(),
        ..Default::default()
    }));
    let admin_state = Arc::new(AdminState {
        node: cfg.node.clone(),
        prometheus,
        capture: capture.clone(),
        events: events_log.clone(),
        pods: pods.clone(),
        config: config_status.clone(),
        ready: false.into(),
        orig,
        certs: certs.clone(),
        node_certs,
    });

    // Admin: its own thread and single-threaded runtime.
    let admin_listener = admin::bind(cfg.admin_addr).with_context(|| {
        format!(
            "binding the admin endpoint on {} (in use by another agent? pick another with --admin-addr)",
            cfg.admin_addr
        )
    })?;
    {
        let state = admin_state.clone();
        std::thread::Builder::new()
            .name("weft-admin".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "admin runtime failed to start");
                        return;
                    }
                };
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(admin_listener) {
                        Ok(l) => admin::serve(l, state).await,
                        Err(e) => tracing::error!(error = %e, "admin listener unusable"),
                    }
                });
            })
            .context("starting the admin thread")?;
    }
    tracing::info!(addr = %cfg.admin_addr, "admin endpoint listening");

    runtime.block_on(async move {
        tokio::spawn({
            let log = events_log.clone();
            async move {
                if let Err(e) = events::run(ring, log).await {
                    tracing::error!(error = %e, "capture event reader stopped");
                }
            }
        });
        if let Some(logger) = logger {
            tokio::spawn(forward_kernel_logs(logger));
        }
        tokio::spawn(pool.run_reaper());
        let (state_tx, state_rx) = watch::channel(None);
        match source {
            ConfigSource::Local(path) => {
                tokio::spawn(follow_local(
                    LocalConfig::new(path),
                    cfg.config_poll,
                    state_tx,
                    config_status.clone(),
                ));
            }
            ConfigSource::Controller(opts) => {
                tokio::spawn(discovery::run(opts, state_tx, config_status.clone()));
            }
        }
        let identities = certs.map(|c| (c, cfg.node.clone(), cfg.trust_domain.clone()));
        // A task of its own: configuration keeps applying while the agent drains (a policy
        // change still closes live connections it denies, removed pods are still unenrolled).
        let mut reconcile = tokio::spawn(reconcile_loop(
            state_rx,
            pods.clone(),
            admin_state.clone(),
            identities,
        ));
        tokio::select! {
            _ = &mut reconcile => {},
            r = shutdown_signal() => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "cannot listen for signals");
                }
            }
        }
        // Graceful drain: no new connections (outbound listeners closed, inbound ones refuse),
        // live ones may finish until the deadline.
        admin_state.ready.store(false, Ordering::Release);
        match pods.lock() {
            Ok(mut p) => p.stop_accepting(),
            Err(p) => p.into_inner().stop_accepting(),
        }
        let live = conns.len();
        if live > 0 {
            tracing::info!(live, deadline = ?cfg.drain_timeout, "draining: waiting for live connections to finish");
            let left = tokio::select! {
                left = conns.drained(cfg.drain_timeout) => left,
                r = shutdown_signal() => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "cannot listen for signals");
                    }
                    conns.len()
                }
            };
            if left > 0 {
                tracing::warn!(left, "drain deadline passed (or a second signal arrived): closing the remaining connections");
            } else {
                tracing::info!("drained: every connection finished");
            }
        }
        reconcile.abort();
        tracing::info!("shutting down: unenrolling pods");
        match pods.lock() {
            Ok(mut p) => p.clear(),
            Err(p) => p.into_inner().clear(),
        }
    });
    // Dropping the capture handle closes every program, link and map.
    drop(capture);
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// After a trust bundle change, certificates are renewed this long after the change...
const TRUST_BUNDLE_RENEW_SETTLE: Duration = Duration::from_secs(2);
/// ...plus a random delay up to this, so a node's identities do not all reach the CA at once.
const TRUST_BUNDLE_RENEW_SPREAD: Duration = Duration::from_secs(1);

/// Applies every new state, and retries failed enrolments every second. A change of the trust
/// bundle (not the first one seen) renews every held certificate within seconds.
async fn reconcile_loop(
    mut states: watch::Receiver<Option<Arc<MeshState>>>,
    pods: Arc<Mutex<PodManager>>,
    admin: Arc<AdminState>,
    identities: Option<(Arc<CertManager>, String, String)>,
) {
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last non-empty trust bundle seen.
    let mut trust_bundle: Option<Vec<String>> = None;
    loop {
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = retry.tick() => {}
        }
        let state = states.borrow_and_update().clone();
        if let Some(state) = state {
            match pods.lock() {
                Ok(mut p) => p.reconcile(&state),
                Err(p) => p.into_inner().reconcile(&state),
            }
            admin.ready.store(true, Ordering::Release);
            // Certificates for this node's meshed workloads, requested as soon as they are
            // enrolled (and retried every second until obtained).
            if let Some((certs, node, td)) = &identities {
                certs.ensure(
                    state
                        .workloads_on_node(node)
                        .filter(|w| w.capture.captured())
                        .map(|w| spiffe_id(td, &w.namespace, &w.service_account)),
                );
            }
            if !state.trust_bundle.is_empty() && trust_bundle.as_ref() != Some(&state.trust_bundle)
            {
                if trust_bundle.is_some() {
                    renew_after_trust_bundle_change(&state, identities.as_ref(), &admin);
                }
                trust_bundle = Some(state.trust_bundle.clone());
            }
        }
    }
}

/// A root rotation step: certificates from the (possibly new) CA are fetched within seconds
/// rather than at half-life. The settle delay lets every agent receive the new bundle (over its
/// own stream) before any peer presents a certificate issued under a newly added root.
fn renew_after_trust_bundle_change(
    state: &MeshState,
    identities: Option<&(Arc<CertManager>, String, String)>,
    admin: &AdminState,
) {
    let workload = identities.map_or(0, |(certs, _, _)| {
        certs.renew_all_soon(TRUST_BUNDLE_RENEW_SETTLE, TRUST_BUNDLE_RENEW_SPREAD)
    });
    // The node certificate too: once the old root is removed, the controller no longer
    // accepts one issued under it.
    let node = admin.node_certs.as_ref().map_or(0, |certs| {
        certs.renew_all_soon(TRUST_BUNDLE_RENEW_SETTLE, TRUST_BUNDLE_RENEW_SPREAD)
    });
    metrics::counter!("weft_trust_bundle_changes_total").increment(1);
    tracing::info!(
        roots = state.trust_bundle.len(),
        workload_certificates = workload,
        node_certificates = node,
        within_ms = (TRUST_BUNDLE_RENEW_SETTLE + TRUST_BUNDLE_RENEW_SPREAD).as_millis() as u64,
        "trust bundle changed: renewing every certificate from the current CA"
    );
}

pub use crate::mesh::spiffe_id;

/// Polls a local configuration file or directory.
async fn follow_local(
    source: LocalConfig,
    every: Duration,
    out: watch::Sender<Option<Arc<MeshState>>>,
    status: Arc<Mutex<ConfigStatus>>,
) {
    let mut last_text = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = source.read().and_then(|files| {
            if last_text.as_ref() == Some(&files) {
                return Ok(None);
            }
            let state = LocalConfig::parse(&files);
            last_text = Some(files);
            state.map(Some)
        });
        let mut s = match status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match result {
            Ok(Some(state)) => {
                out.send_replace(Some(Arc::new(state)));
                s.applied += 1;
                s.last_error = None;
            }
            Ok(None) => {}
            Err(e) => {
                let msg = e.to_string();
                if s.last_error.as_ref() != Some(&msg) {
                    tracing::error!(error = %msg, "configuration rejected; keeping the last good one");
                    metrics::counter!("weft_config_rejected_total").increment(1);
                }
                s.last_error = Some(msg);
            }
        }
    }
}

async fn forward_kernel_logs(logger: crate::capture::KernelLogger) {
    // SAFETY: the logger owns its ring-buffer fd, which stays open and unchanged for as long
    // as the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "kernel log reader unavailable");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!(error = %e, "kernel log reader stopped");
                return;
            }
        }
    }
}

async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
