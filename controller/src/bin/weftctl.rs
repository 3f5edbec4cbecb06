//! `weftctl`: the Weft command line (docs/weftctl.md). Flags only; the logic is in
//! `weft_controller::weftctl`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use weft_controller::weftctl::{self, Binding, DEFAULT_IMAGE, Format, MAX_REPLICAS, Waypoint};

/// Weft's command line.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then the in-cluster
    /// service account).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the kubeconfig's current context).
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// Debug logs on stderr (every request weftctl makes).
    #[arg(short, long, global = true)]
    verbose: bool,
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
        /// Namespace of the waypoint (must exist).
        #[arg(short = 'n', long, value_name = "NS")]
        namespace: String,
        /// Name of the waypoint: its Deployment, PodDisruptionBudget, Service and
        /// ServiceAccount.
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Container image of weft-waypoint.
        #[arg(long, default_value = DEFAULT_IMAGE)]
        image: String,
        /// Replicas of the Deployment.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REPLICAS)))]
        replicas: u32,
        /// What it serves: `namespace` (label the namespace), `service:<svc>` (label only
        /// that Service) or `none` (deploy only).
        #[arg(
            long = "for",
            default_value = "namespace",
            value_name = "namespace|service:<svc>|none"
        )]
        binding: Binding,
        /// The waypoint's YAML config file (retries, timeouts, faults, rate limits, circuit
        /// breakers for the Services it serves: docs/waypoint.md), shipped as ConfigMap
        /// `<name>-config`; the waypoint reloads it when it changes.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// Print the objects and change nothing (talks to no cluster).
        #[arg(long)]
        dry_run: bool,
        /// Print the objects in this format instead of applying them (implies --dry-run):
        /// `yaml` (a multi-document stream) or `json` (a v1 List).
        #[arg(short = 'o', long = "output", value_name = "yaml|json")]
        output: Option<Format>,
    },
    /// Removes a waypoint's objects (those weftctl created) and every binding to it.
    Delete {
        /// Namespace of the waypoint.
        #[arg(short = 'n', long, value_name = "NS")]
        namespace: String,
        /// Name of the waypoint.
        #[arg(long, default_value = "waypoint")]
        name: String,
    },
    /// Lists waypoints: namespace, name, ready/desired replicas, what is bound to it.
    List {
        /// One namespace (default: the kubeconfig context's namespace).
        #[arg(
            short = 'n',
            long,
            value_name = "NS",
            conflicts_with = "all_namespaces"
        )]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
}

async fn client(cli: &Cli) -> anyhow::Result<kube::Client> {
    Ok(weftctl::client(cli.kubeconfig.as_deref(), cli.context.as_deref()).await?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The messages already carry their causes; no backtrace for a user error.
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Errors are reported once, by `run`; -v adds kube's and weftctl's debug logs.
    let filter = if cli.verbose {
        "debug,hyper=info,hyper_util=info,tower=info"
    } else {
        "off"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .init();
    match &cli.command {
        Command::Waypoint(WaypointCmd::Deploy {
            namespace,
            name,
            image,
            replicas,
            binding,
            config,
            dry_run,
            output,
        }) => {
            let w = Waypoint {
                namespace: namespace.clone(),
                name: name.clone(),
                image: image.clone(),
                replicas: *replicas,
                binding: binding.clone(),
                config: config.as_deref().map(Waypoint::read_config).transpose()?,
            };
            w.validate()?;
            if *dry_run || output.is_some() {
                print!("{}", w.render(output.unwrap_or_default())?);
                if let Some(cmd) = w.binding_command() {
                    eprintln!("dry run, nothing applied; the binding would be: {cmd}");
                }
                return Ok(());
            }
            let c = client(&cli).await?;
            let done = weftctl::deploy(&c, &w).await?;
            if !done.meshed {
                eprintln!(
                    "warning: namespace {namespace} is not labelled weft.dev/mesh=enabled: the waypoint only receives traffic from meshed namespaces (kubectl label namespace {namespace} weft.dev/mesh=enabled)"
                );
            }
            if let Some(previous) = &done.rebound_from {
                eprintln!(
                    "warning: the binding label weft.dev/use-waypoint was `{previous}`, now `{name}`"
                );
            }
            let bound = match binding {
                Binding::Namespace => format!(", bound to namespace {namespace}"),
                Binding::Service(s) => format!(", bound to service {namespace}/{s}"),
                Binding::None => format!(
                    ", not bound (label a namespace or Service weft.dev/use-waypoint={name})"
                ),
            };
            println!("waypoint {namespace}/{name} deployed{bound}");
        }
        Command::Waypoint(WaypointCmd::Delete { namespace, name }) => {
            weftctl::check_name(namespace, "namespace")?;
            weftctl::check_name(name, "waypoint")?;
            let c = client(&cli).await?;
            let done = weftctl::delete(&c, namespace, name).await?;
            for r in &done.removed {
                println!("removed {r}");
            }
            for k in &done.kept {
                eprintln!(
                    "warning: kept {k}: not labelled app.kubernetes.io/managed-by=weftctl (delete it yourself if it is this waypoint's)"
                );
            }
            if done.removed.is_empty() && done.kept.is_empty() {
                println!("no waypoint {namespace}/{name}: nothing to remove");
            }
        }
        Command::Waypoint(WaypointCmd::List {
            namespace,
            all_namespaces,
        }) => {
            if let Some(ns) = namespace {
                weftctl::check_name(ns, "namespace")?;
            }
            let c = client(&cli).await?;
            let scope = match (namespace, all_namespaces) {
                (_, true) => None,
                (Some(ns), false) => Some(ns.clone()),
                (None, false) => Some(c.default_namespace().to_string()),
            };
            let rows = weftctl::list(&c, scope.as_deref()).await?;
            if rows.is_empty() {
                match &scope {
                    Some(ns) => eprintln!("no waypoints in namespace {ns}"),
                    None => eprintln!("no waypoints"),
                }
            } else {
                print!("{}", weftctl::table(&rows));
            }
        }
    }
    Ok(())
}
