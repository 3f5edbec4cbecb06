//! `weftctl`: the Weft command line (docs/weftctl.md).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_controller::weftctl::{self, Binding, Waypoint};

/// Weft's command line.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current context).
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Waypoints: the per-namespace L7 proxies.
    #[command(subcommand)]
    Waypoint(WaypointCmd),
}

#[derive(Debug, Subcommand)]
enum WaypointCmd {
    /// Deploys (or updates) a waypoint and binds it (server-side apply, field manager weftctl).
    Deploy {
        /// Namespace of the waypoint.
        #[arg(short = 'n', long)]
        namespace: String,
        /// Name of the waypoint (its Deployment, Service and ServiceAccount).
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Container image of weft-waypoint.
        #[arg(long, default_value = concat!("ghcr.io/weft-mesh/weft-waypoint:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Replicas of the Deployment.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        replicas: u32,
        /// What it serves: `namespace` (label the namespace), `service:<name>` (label one
        /// Service) or `none` (deploy only).
        #[arg(long = "for", default_value = "namespace")]
        binding: Binding,
        /// Print the objects as YAML and change nothing (needs no cluster).
        #[arg(long)]
        dry_run: bool,
    },
    /// Removes a waypoint's objects (those weftctl created) and every binding to it.
    Delete {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
    },
    /// Lists waypoints.
    List {
        /// One namespace (default: all).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
}

async fn client(cli: &Cli) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options).await?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration found: set KUBECONFIG or --kubeconfig, or use --dry-run to print the objects",
        )?,
    };
    Ok(kube::Client::try_from(config)?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Waypoint(WaypointCmd::Deploy {
            namespace,
            name,
            image,
            replicas,
            binding,
            dry_run,
        }) => {
            let w = Waypoint {
                namespace: namespace.clone(),
                name: name.clone(),
                image: image.clone(),
                replicas: *replicas,
                binding: binding.clone(),
            };
            w.validate()?;
            if *dry_run {
                print!("{}", w.yaml()?);
                return Ok(());
            }
            let c = client(&cli).await?;
            if !weftctl::namespace_meshed(&c, namespace).await? {
                eprintln!(
                    "warning: namespace {namespace} is not labelled weft.dev/mesh=enabled: the waypoint only receives traffic from meshed clients"
                );
            }
            weftctl::deploy(&c, &w).await?;
            println!("waypoint {namespace}/{name} deployed");
        }
        Command::Waypoint(WaypointCmd::Delete { namespace, name }) => {
            let c = client(&cli).await?;
            for r in weftctl::delete(&c, namespace, name).await? {
                println!("removed {r}");
            }
        }
        Command::Waypoint(WaypointCmd::List { namespace }) => {
            let c = client(&cli).await?;
            println!("{:<20} {:<20} {:<8} BOUND", "NAMESPACE", "NAME", "READY");
            for r in weftctl::list(&c, namespace.as_deref()).await? {
                println!(
                    "{:<20} {:<20} {:<8} {}",
                    r.namespace,
                    r.name,
                    format!("{}/{}", r.ready, r.desired),
                    r.bound
                );
            }
        }
    }
    Ok(())
}
