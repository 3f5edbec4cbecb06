//! `weft-agent`: the node agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use weft_agent::app::{AgentConfig, ConfigSource, run};
use weft_agent::discovery::ControllerOptions;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Weft node agent: captures the TCP of this node's meshed pods with eBPF and proxies it.
#[derive(Debug, Parser)]
#[command(version, about, args_override_self = true)]
struct Args {
    /// Name of this node; the agent serves the workloads whose `spec.node` matches.
    #[arg(long, env = "WEFT_NODE")]
    node: String,
    /// Local configuration: a YAML file, or a directory of YAML files, of Namespaces and
    /// Workloads (the development stand-in for the control plane). Re-read when it changes.
    #[arg(
        long,
        env = "WEFT_CONFIG",
        required_unless_present = "controller",
        conflicts_with = "controller"
    )]
    config: Option<PathBuf>,
    /// The controller's config stream, `https://HOST:PORT`.
    #[arg(long, env = "WEFT_CONTROLLER", requires = "controller_ca")]
    controller: Option<String>,
    /// PEM CA that signed the controller's certificate (the controller writes `ca.pem` to its
    /// --state-dir when it generates one).
    #[arg(long, env = "WEFT_CONTROLLER_CA")]
    controller_ca: Option<PathBuf>,
    /// File with this node's bootstrap token (no-cluster mode), exchanged for a node
    /// certificate at startup.
    #[arg(long, env = "WEFT_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// Kubernetes mode: the agent's projected service-account token (audience
    /// `weft-controller`), exchanged for a node certificate; re-read on every use.
    #[arg(
        long,
        env = "WEFT_SERVICE_ACCOUNT_TOKEN_FILE",
        conflicts_with = "bootstrap_token_file"
    )]
    service_account_token_file: Option<PathBuf>,
    /// Where the agent keeps its last-good configuration snapshot (served while the controller
    /// is unreachable, including after a restart).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft-agent")]
    state_dir: PathBuf,
    /// Admin HTTP endpoint (/ready, /metrics, /debug/capture, /config_dump).
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Socket mark (SO_MARK) of the agent's own connections, which capture skips. Pick a value
    /// your CNI does not use. Decimal or 0x-prefixed hex.
    #[arg(long, env = "WEFT_SOCKET_MARK", default_value = "0x574546", value_parser = parse_mark)]
    socket_mark: u32,
    /// cgroup v2 directory to attach connect4/6 and sock_ops to. Default: the cgroup v2 mount
    /// point found in /proc/self/mountinfo.
    #[arg(long, env = "WEFT_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Also report not-enrolled connects in /debug/capture (every connect on the node: for
    /// debugging only; they are always counted).
    #[arg(long, env = "WEFT_TRACE_UNENROLLED")]
    trace_unenrolled: bool,
    /// Kernel-side log level (aya-log): off, error, warn, info, debug, trace.
    #[arg(long, env = "WEFT_EBPF_LOG_LEVEL", default_value = "warn", value_parser = parse_level)]
    ebpf_log_level: u8,
    /// How often to check the configuration for changes, in milliseconds.
    #[arg(long, env = "WEFT_CONFIG_POLL_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    config_poll_ms: u64,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    connect_timeout_ms: u64,
    /// Data-path worker threads. Default: 1 on nodes with at most 2 CPUs (measured better
    /// there: lower p99, higher throughput, less CPU and memory per request), else 2.
    #[arg(long, env = "WEFT_WORKER_THREADS", value_parser = clap::value_parser!(u64).range(1..=256))]
    worker_threads: Option<u64>,
    /// SPIFFE trust domain of workload identities (must match the controller's).
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Log format (access logs use the `weft::access` target).
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Plaintext connections from meshed pods to destinations outside the mesh: allow or deny.
    #[arg(
        long,
        env = "WEFT_OUTBOUND_PASSTHROUGH",
        value_enum,
        default_value = "allow"
    )]
    outbound_passthrough: Passthrough,
    /// Close live connections that a policy change no longer allows (`false`: policies apply
    /// to new connections only).
    #[arg(long, env = "WEFT_CLOSE_DENIED_CONNECTIONS", default_value_t = true, action = clap::ArgAction::Set)]
    close_denied_connections: bool,
    /// After SIGTERM, how long live connections may finish before the agent exits, in seconds.
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT_SECS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(0..=3600))]
    drain_timeout_secs: u64,
    /// Close an HBONE connection that carried no tunnel for this long, in seconds.
    #[arg(long, env = "WEFT_POOL_IDLE_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pool_idle_timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Passthrough {
    Allow,
    Deny,
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    }
    .map_err(|e| format!("`{s}` is not a 32-bit mark ({e}); e.g. 0x574546"))?;
    if v == 0 {
        return Err("the mark must not be 0 (unmarked sockets would be skipped)".into());
    }
    Ok(v)
}

fn parse_level(s: &str) -> Result<u8, String> {
    Ok(match s {
        "off" => 0,
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        _ => {
            return Err(format!(
                "`{s}` is not one of off, error, warn, info, debug, trace"
            ));
        }
    })
}

/// 1 worker on nodes with at most 2 CPUs, else 2 (the agent shares the node with its pods).
fn default_worker_threads() -> usize {
    match std::thread::available_parallelism().map(std::num::NonZero::get) {
        Ok(n) if n > 2 => 2,
        _ => 1,
    }
}

fn main() -> std::process::ExitCode {
    // At most two malloc arenas: glibc's default (8 per core) lets every data-path thread grow
    // its own heap, which costs RSS and buys nothing for a proxy's short-lived buffers.
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    let cfg = AgentConfig {
        node: args.node.clone(),
        source: match (args.config, args.controller, args.controller_ca) {
            (Some(path), _, _) => ConfigSource::Local(path),
            (None, Some(url), Some(ca)) => ConfigSource::Controller(ControllerOptions {
                url,
                ca,
                token_file: args
                    .bootstrap_token_file
                    .or(args.service_account_token_file),
                node: args.node.clone(),
                state_dir: args.state_dir,
                node_identity: None,
            }),
            _ => {
                eprintln!(
                    "weft-agent: pass --config FILE, or --controller URL with --controller-ca FILE"
                );
                return std::process::ExitCode::FAILURE;
            }
        },
        admin_addr: args.admin_addr,
        socket_mark: args.socket_mark,
        cgroup_root: args.cgroup_root,
        trace_unenrolled: args.trace_unenrolled,
        ebpf_log_level: args.ebpf_log_level,
        config_poll: Duration::from_millis(args.config_poll_ms),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        worker_threads: args
            .worker_threads
            .map_or_else(default_worker_threads, |n| n as usize),
        trust_domain: args.trust_domain,
        outbound_passthrough: matches!(args.outbound_passthrough, Passthrough::Allow),
        close_denied_connections: args.close_denied_connections,
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        pool_idle_timeout: Duration::from_secs(args.pool_idle_timeout_secs),
    };
    match run(cfg) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("weft-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_and_zero_is_refused() {
        assert_eq!(parse_mark("0x574546"), Ok(0x574546));
        assert_eq!(parse_mark("42"), Ok(42));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("0xzz").unwrap_err().contains("0xzz"));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
