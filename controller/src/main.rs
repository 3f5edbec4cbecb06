//! `weft-controller`: watches a directory of YAML (no-cluster mode) and streams each node's view
//! to its agent over TLS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use weft_api::local::LocalConfig;
use weft_api::wire::pb::certificates_server::CertificatesServer;
use weft_api::wire::pb::discovery_server::DiscoveryServer;
use weft_controller::ca::Ca;
use weft_controller::certs::CertificateService;
use weft_controller::server::{Auth, Authenticator, DiscoveryService, Tokens};
use weft_controller::tokenreview::TokenReviewer;
use weft_controller::{dir, source, tls, view::Views};

/// Weft controller: the mesh's control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// No-cluster mode: a directory (or file) of YAML Namespaces, Workloads and Services,
    /// re-read on change.
    #[arg(
        long,
        env = "WEFT_CONFIG_DIR",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config_dir: Option<PathBuf>,
    /// Kubernetes mode: watch the cluster (in-cluster config or KUBECONFIG).
    #[arg(long, env = "WEFT_KUBERNETES")]
    kubernetes: bool,
    /// Address of the config stream (gRPC over TLS).
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:15010")]
    listen: SocketAddr,
    /// Where the controller keeps its state (generated TLS material).
    #[arg(
        long,
        env = "WEFT_STATE_DIR",
        default_value = "/var/lib/weft-controller"
    )]
    state_dir: PathBuf,
    /// Server certificate (PEM). Default: generated on first start into --state-dir.
    #[arg(long, env = "WEFT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server key (PEM), with --tls-cert.
    #[arg(long, env = "WEFT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Extra IP addresses for the generated server certificate.
    #[arg(long = "tls-san", env = "WEFT_TLS_SAN", value_delimiter = ',')]
    tls_san: Vec<IpAddr>,
    /// Per-node bootstrap tokens: a YAML map `node: token` (no-cluster mode; Kubernetes mode
    /// reviews the agents' service-account tokens instead).
    #[arg(long, env = "WEFT_BOOTSTRAP_TOKENS", conflicts_with = "kubernetes")]
    bootstrap_tokens: Option<PathBuf>,
    /// Kubernetes mode: the service account agents run under, `<namespace>/<name>`; tokens of
    /// any other account are refused.
    #[arg(
        long,
        env = "WEFT_AGENT_SERVICE_ACCOUNT",
        default_value = weft_controller::tokenreview::DEFAULT_AGENT_SERVICE_ACCOUNT
    )]
    agent_service_account: String,
    /// Kubernetes mode: the audience agents' projected service-account tokens must carry.
    #[arg(
        long,
        env = "WEFT_TOKEN_AUDIENCE",
        default_value = weft_controller::tokenreview::DEFAULT_AUDIENCE
    )]
    token_audience: String,
    /// Kubernetes mode: the Secret holding the mesh CA, `<namespace>/<name>` (created on first
    /// start unless --ca-cert is given).
    #[arg(
        long,
        env = "WEFT_CA_SECRET",
        default_value = weft_controller::ca_secret::DEFAULT_CA_SECRET
    )]
    ca_secret: String,
    /// Lifetime of node certificates (agent -> controller mTLS), in seconds; agents renew at
    /// half-life.
    #[arg(long, env = "WEFT_NODE_CERT_TTL", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..=86_400))]
    node_cert_ttl: u64,
    /// Refuse bearer tokens on the config stream and workload-certificate requests: agents must
    /// connect with their node certificate (tokens are then only exchanged for one, SignNode).
    #[arg(long, env = "WEFT_REQUIRE_NODE_CERTIFICATES")]
    require_node_certificates: bool,
    /// Accept any agent for any node (development only).
    #[arg(long, conflicts_with = "bootstrap_tokens")]
    insecure_no_auth: bool,
    /// The mesh's SPIFFE trust domain: identities are spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of workload certificates, in seconds (agents renew at half-life).
    #[arg(long, env = "WEFT_WORKLOAD_CERT_TTL", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(60..=31_536_000))]
    workload_cert_ttl: u64,
    /// Operator-supplied intermediate CA certificate (PEM), e.g. under a corporate root.
    /// Default: a root and intermediate generated on first start into <state-dir>/ca.
    #[arg(long, env = "WEFT_CA_CERT", requires_all = ["ca_key", "trust_bundle"])]
    ca_cert: Option<PathBuf>,
    /// Key of --ca-cert (PEM).
    #[arg(long, env = "WEFT_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Roots agents trust (PEM bundle), with --ca-cert.
    #[arg(long, env = "WEFT_TRUST_BUNDLE", requires = "ca_cert")]
    trust_bundle: Option<PathBuf>,
    /// How often to check --config-dir for changes, in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    poll_ms: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-controller: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("weft-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = if args.kubernetes {
        Some(kube::Client::try_default().await.context(
            "connecting to Kubernetes (in-cluster service account, or KUBECONFIG); for no-cluster mode use --config-dir",
        )?)
    } else {
        None
    };
    let credentials = match (&args.bootstrap_tokens, args.insecure_no_auth, &client) {
        (_, true, _) => {
            tracing::warn!(
                "--insecure-no-auth: any client can claim any node's configuration; workload and node certificates are not issued in this mode; development only"
            );
            Auth::Insecure
        }
        (Some(path), false, _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading bootstrap tokens {}", path.display()))?;
            let nodes: HashMap<String, String> =
                serde_yaml::from_str(&text).with_context(|| {
                    format!("{}: expected a YAML map `node: token`", path.display())
                })?;
            if nodes.values().any(|t| t.len() < 16) {
                bail!(
                    "{}: every token must be at least 16 characters",
                    path.display()
                );
            }
            Auth::Tokens(
                Tokens::from_nodes(nodes)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            )
        }
        (None, false, Some(client)) => Auth::Kubernetes(Arc::new(
            TokenReviewer::new(
                client.clone(),
                &args.token_audience,
                &args.agent_service_account,
            )
            .context("--agent-service-account")?,
        )),
        (None, false, None) => bail!(
            "agents must authenticate: pass --bootstrap-tokens FILE (YAML `node: token`), or --insecure-no-auth for development"
        ),
    };
    let auth = Authenticator::new(credentials, args.trust_domain.clone())
        .require_node_certificates(args.require_node_certificates);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => tls::load(c, k)?,
        _ => tls::load_or_generate(&args.state_dir, &args.tls_san)?,
    };
    if let Some(ca) = &tls.ca_path {
        tracing::info!(ca = %ca.display(), "agents trust this CA with --controller-ca");
    }

    let ttl = Duration::from_secs(args.workload_cert_ttl);
    let ca = match (&args.ca_cert, &args.ca_key, &args.trust_bundle) {
        (Some(cert), Some(key), Some(bundle)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            Ca::from_pem(
                &read(cert)?,
                &read(key)?,
                weft_controller::ca::split_pem(&read(bundle)?),
                ttl,
            )
            .map_err(|e| anyhow::anyhow!("the CA in {}: {e}", cert.display()))?
        }
        _ => match &client {
            Some(client) => {
                weft_controller::ca_secret::load_or_create(client.clone(), &args.ca_secret, ttl)
                    .await?
            }
            None => Ca::load_or_generate(&args.state_dir.join("ca"), ttl)?,
        },
    };
    let ca = Arc::new(ca);

    let (state_tx, mut state_rx) = source::channel();
    let cert_service = CertificateService::new(ca.clone(), state_tx.subscribe(), auth.clone())
        .with_node_ttl(Duration::from_secs(args.node_cert_ttl));
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let views = Arc::new(Views::default());
    views.set_trust_bundle(ca.trust_bundle());
    // The source runs until the process ends; if it stops, the controller must not go on
    // serving (and authorising certificates against) a frozen state.
    let (source_done_tx, source_done) = tokio::sync::oneshot::channel::<String>();
    match (&args.config_dir, client) {
        (Some(config_dir), _) => {
            tokio::spawn(dir::run(
                LocalConfig::new(config_dir),
                Duration::from_millis(args.poll_ms),
                state_tx,
            ));
            drop(source_done_tx);
        }
        (None, None) => bail!("pass --config-dir DIR or --kubernetes"),
        (None, Some(client)) => {
            tokio::spawn(weft_controller::crd::run_status_controller(client.clone()));
            tokio::spawn(weft_controller::route_status::run_route_status_controller(
                client.clone(),
            ));
            tokio::spawn(async move {
                let why =
                    match weft_controller::k8s::run(client, state_tx, Default::default()).await {
                        Ok(()) => "the Kubernetes source ended".to_string(),
                        Err(e) => e.to_string(),
                    };
                let _ = source_done_tx.send(why);
            });
        }
    }
    {
        // Ready only once the views hold a complete state: a stream that synced an agent
        // from empty views would tell it to forget every pod.
        let views = views.clone();
        tokio::spawn(async move {
            while state_rx.changed().await.is_ok() {
                let state = state_rx.borrow_and_update().clone();
                let touched = views.apply(state);
                ready_tx.send_replace(true);
                tracing::debug!(nodes = touched.len(), "node views updated");
            }
        });
    }
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed_check = failed.clone();
    let service = DiscoveryService::new(views, ready_rx, auth);
    tracing::info!(listen = %args.listen, "config stream listening");
    Server::builder()
        .tls_config(
            // Client certificates are optional (the SignNode exchange has none yet) but, when
            // presented, must chain to the mesh CA; `Authenticator` reads the node from them.
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
                .client_ca_root(Certificate::from_pem(ca.trust_bundle().concat()))
                .client_auth_optional(true),
        )
        .context("TLS configuration")?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(DiscoveryServer::new(service))
        .add_service(CertificatesServer::new(cert_service))
        .serve_with_shutdown(args.listen, async move {
            tokio::select! {
                () = shutdown() => {}
                Ok(why) = source_done => {
                    tracing::error!(reason = %why, "the configuration source stopped; exiting so the controller is restarted");
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .await
        .with_context(|| format!("serving on {}", args.listen))?;
    if failed_check.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("the configuration source stopped");
    }
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
        // Kubernetes mode authenticates agents by TokenReview: bootstrap tokens are refused.
        let e = Args::try_parse_from([
            "weft-controller",
            "--kubernetes",
            "--bootstrap-tokens",
            "t.yaml",
        ])
        .expect_err("conflict");
        assert!(e.to_string().contains("--bootstrap-tokens"), "{e}");
        let a = Args::try_parse_from(["weft-controller", "--kubernetes"]).expect("defaults");
        assert_eq!(a.agent_service_account, "weft-system/weft-agent");
        assert_eq!(a.token_audience, "weft-controller");
        assert_eq!(a.ca_secret, "weft-system/weft-ca");
        assert_eq!(a.node_cert_ttl, 3600);
        assert!(!a.require_node_certificates);
    }
}
