//! `cargo xtask bench control-plane`: the real Discovery service (TLS gRPC on loopback) with
//! `--workloads` workloads spread over `--agents` nodes, one real client stream per node, all
//! in one process.
//!
//! Reports: time until every agent has its full view; for single-workload changes, the time
//! until the affected agent has the update (p50/p99), bytes on the wire per change, how many
//! other agents were woken (should be zero); and the process RSS (controller and the 1,000
//! clients together: an upper bound for the controller).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use weft_api::wire::pb::{self, agent_message, discovery_client::DiscoveryClient};
use weft_api::{CaptureSettings, MeshState, WorkloadInfo};
use weft_controller::server::{Auth, Authenticator, DiscoveryService};
use weft_controller::view::Views;

/// Sizes of the simulated cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlPlaneArgs {
    /// Workloads in the cluster.
    #[arg(long, default_value_t = 10_000)]
    pub workloads: usize,
    /// Agent streams (nodes).
    #[arg(long, default_value_t = 1_000)]
    pub agents: usize,
    /// Single-workload changes to time.
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
}

struct Received {
    node: usize,
    at: Instant,
    bytes: usize,
    sync: bool,
    upserts: usize,
}

fn state(workloads: usize, agents: usize, rev: &HashMap<usize, usize>) -> MeshState {
    let mut s = MeshState::default();
    s.namespaces.insert("bench".into(), true);
    for i in 0..workloads {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("app".to_string(), format!("app-{}", i % 100));
        if let Some(r) = rev.get(&i) {
            labels.insert("rev".to_string(), r.to_string());
        }
        let w = WorkloadInfo {
            name: format!("w{i}"),
            namespace: "bench".into(),
            service_account: format!("sa-{}", i % 50),
            node: format!("node-{}", i % agents),
            ip4: Some(Ipv4Addr::from(0x0a00_0000 + i as u32)),
            ip6: None,
            netns: format!("/run/netns/w{i}").into(),
            labels,
            capture: CaptureSettings {
                namespace_meshed: true,
                ..Default::default()
            },
        };
        s.workloads.insert(w.key(), w);
    }
    s
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

pub fn run(args: ControlPlaneArgs, json: bool) -> anyhow::Result<()> {
    if args.agents == 0 || args.workloads < args.agents {
        bail!("need at least one agent and at least one workload per agent");
    }
    // The controller code runs inside this process: measure an optimised build.
    if cfg!(debug_assertions) {
        let mut cmd = crate::setup::cargo();
        cmd.args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "xtask",
            "--",
            "bench",
            "control-plane",
        ])
        .args(["--workloads", &args.workloads.to_string()])
        .args(["--agents", &args.agents.to_string()])
        .args(["--changes", &args.changes.to_string()]);
        if json {
            cmd.arg("--json");
        }
        return crate::setup::run_cmd(&mut cmd);
    }
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args, json))
}

async fn bench(args: ControlPlaneArgs, json: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("weft-cp-bench-{}", std::process::id()));
    let tls = weft_controller::tls::load_or_generate(&dir, &[])?;
    let ca = std::fs::read(dir.join("ca.pem"))?;
    let rss_start = rss_mb();

    let mut revs = HashMap::new();
    let views = Arc::new(Views::default());
    let (ready_tx, ready_rx) = watch::channel(false);
    views.apply(Arc::new(state(args.workloads, args.agents, &revs)));
    ready_tx.send_replace(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let service = DiscoveryService::new(
        views.clone(),
        ready_rx,
        Authenticator::new(Auth::Insecure, "cluster.local"),
    );
    let server = Server::builder()
        .tls_config(
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
        )?
        .add_service(pb::discovery_server::DiscoveryServer::new(service))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let (tx, mut rx) = mpsc::unbounded_channel::<Received>();
    let started = Instant::now();
    for node in 0..args.agents {
        let tx = tx.clone();
        let ca = ca.clone();
        tokio::spawn(async move {
            if let Err(e) = agent(node, addr, ca, tx).await {
                eprintln!("agent {node}: {e:#}");
            }
        });
    }
    let mut synced = 0;
    let mut full_bytes = 0usize;
    while synced < args.agents {
        let r = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .context("agents did not all sync within 60 s")?
            .context("all agents failed")?;
        if r.sync {
            synced += 1;
            full_bytes += r.bytes;
        }
    }
    let full_push = started.elapsed();
    let rss_synced = rss_mb();

    let mut latencies = Vec::new();
    let mut change_bytes = Vec::new();
    let mut woken_others = 0usize;
    for c in 0..args.changes {
        let k = (c * 7919) % args.workloads;
        revs.insert(k, c);
        let next = Arc::new(state(args.workloads, args.agents, &revs));
        let target = k % args.agents;
        let t = Instant::now();
        views.apply(next);
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("a change did not arrive within 10 s")?
                .context("agents gone")?;
            if r.node == target && r.upserts > 0 {
                latencies.push(r.at.duration_since(t).as_secs_f64() * 1e3);
                change_bytes.push(r.bytes as f64);
                break;
            }
            woken_others += 1;
        }
    }
    // Anything else that arrived means an unaffected agent was sent something.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while rx.try_recv().is_ok() {
        woken_others += 1;
    }
    let (p50, p99) = (pct(&mut latencies, 0.5), pct(&mut latencies, 0.99));
    let bytes_change = pct(&mut change_bytes, 0.5);
    let rss_end = rss_mb();
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "workloads": args.workloads, "agents": args.agents,
                "full_push_s": full_push.as_secs_f64(), "full_push_bytes": full_bytes,
                "change_p50_ms": p50, "change_p99_ms": p99, "bytes_per_change": bytes_change,
                "unaffected_agents_woken": woken_others,
                "rss_mb_start": rss_start, "rss_mb_synced": rss_synced, "rss_mb_end": rss_end,
            })
        );
    } else {
        println!(
            "control plane: {} workloads, {} agent streams (TLS gRPC on loopback, one process)",
            args.workloads, args.agents
        );
        println!(
            "  full push to every agent: {:.3} s ({} bytes in sync messages)",
            full_push.as_secs_f64(),
            full_bytes
        );
        println!(
            "  one workload change -> affected agent: p50 {p50:.2} ms, p99 {p99:.2} ms over {} changes",
            args.changes
        );
        println!("  bytes on the wire per change: {bytes_change:.0} (protobuf message)");
        println!("  messages to unaffected agents: {woken_others}");
        println!(
            "  process RSS (controller + all clients): start {rss_start:.1} MB, synced {rss_synced:.1} MB, end {rss_end:.1} MB"
        );
    }
    Ok(())
}

async fn agent(
    node: usize,
    addr: SocketAddr,
    ca: Vec<u8>,
    tx: mpsc::UnboundedSender<Received>,
) -> anyhow::Result<()> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(weft_controller::tls::SERVER_NAME),
        )?
        .connect()
        .await?;
    let mut client = DiscoveryClient::new(channel);
    let (out, out_rx) = mpsc::channel(8);
    out.send(pb::AgentMessage {
        msg: Some(agent_message::Msg::Hello(pb::Hello {
            node: format!("node-{node}"),
            known: Default::default(),
            agent_version: "bench".into(),
        })),
    })
    .await?;
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    while let Some(msg) = inbound.message().await? {
        let at = Instant::now();
        let _ = tx.send(Received {
            node,
            at,
            bytes: msg.encoded_len(),
            sync: msg.sync,
            upserts: msg.upserts.len(),
        });
        out.send(pb::AgentMessage {
            msg: Some(agent_message::Msg::Ack(pb::Ack {
                nonce: msg.nonce,
                error: String::new(),
            })),
        })
        .await?;
    }
    Ok(())
}
