//! `cargo xtask demo`: a two-node lab with a meshed and an unmeshed namespace, real traffic
//! between them, and a summary of what was captured and how.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use weft_tests::mesh::{MeshConfig, MeshLab, WorkloadSpec};
use weft_tests::{Lab, LabSpec, Pod, TestServer, ask, tcp_connect_in};

use crate::setup;

/// Port every demo app listens on.
pub const APP_PORT: u16 = 8080;
/// A port the `web` workload excludes from capture (annotation).
pub const EXCLUDED_PORT: u16 = 9090;

/// The demo world: who runs where.
pub struct DemoWorld {
    pub mesh: MeshLab,
    /// Kept alive for the lifetime of the world (stopped on drop).
    _servers: Vec<TestServer>,
}

/// Builds the standard two-node world: namespace `shop` (meshed: `web` on node 1, `api` on
/// node 2) and `legacy` (not meshed: `batch` on node 1, `db` on node 2); echo servers on
/// `ports` in every pod, IPv4 and IPv6.
pub fn world(ports: &[u16], agent_args: &[&str], controller: bool) -> anyhow::Result<DemoWorld> {
    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: 2,
    })
    .context("building the lab")?;
    let mut servers = Vec::new();
    for pod in lab.pods() {
        let ns = pod.netns()?;
        for port in ports {
            for ip in ["0.0.0.0", "::"] {
                let ip: IpAddr = ip.parse()?;
                servers.push(TestServer::start(&ns, SocketAddr::new(ip, *port))?);
            }
        }
    }
    let config = MeshConfig::default()
        .namespace("shop", true)
        .namespace("legacy", false)
        .workload(WorkloadSpec::new("web", "shop", lab.pod(0, 0)).annotate(
            "weft.dev/exclude-outbound-ports",
            &EXCLUDED_PORT.to_string(),
        ))
        .workload(WorkloadSpec::new("api", "shop", lab.pod(1, 0)))
        .workload(WorkloadSpec::new("batch", "legacy", lab.pod(0, 1)))
        .workload(WorkloadSpec::new("db", "legacy", lab.pod(1, 1)));
    let mesh = if controller {
        MeshLab::start_with_controller(lab, config, agent_args)
            .context("starting the controller and the node agents")?
    } else {
        MeshLab::start(lab, config, agent_args).context("starting the node agents")?
    };
    Ok(DemoWorld {
        mesh,
        _servers: servers,
    })
}

struct Flow {
    from: (&'static str, Pod),
    to: (&'static str, Pod),
    dst: SocketAddr,
}

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    setup::prepare_lab("the demo")?;
    setup::build_mesh_binaries(false)?;
    println!(
        "\n== Building a two-node lab: weft-controller on node n1 (config directory; bootstrap tokens exchanged for node certificates, mTLS), one weft-agent per node =="
    );
    let started = Instant::now();
    let w = world(&[APP_PORT, EXCLUDED_PORT], &["--trace-unenrolled"], true)?;
    let lab = &w.mesh.lab;
    println!(
        "lab {} up with agents ready in {:.1}s (logs and config in {})",
        lab.run_id(),
        started.elapsed().as_secs_f64(),
        w.mesh.dir().display()
    );
    let (web, batch, api, db) = (
        lab.pod(0, 0).clone(),
        lab.pod(0, 1).clone(),
        lab.pod(1, 0).clone(),
        lab.pod(1, 1).clone(),
    );
    for (name, pod, meshed) in [
        ("shop/web", &web, true),
        ("shop/api", &api, true),
        ("legacy/batch", &batch, false),
        ("legacy/db", &db, false),
    ] {
        println!(
            "  {name:<13} node n{}  {:<12} {:<16} {}",
            pod.node_index,
            pod.ip4,
            pod.ip6,
            if meshed { "meshed" } else { "not meshed" }
        );
    }
    let v4 = |p: &Pod, port| SocketAddr::new(IpAddr::V4(p.ip4), port);
    let v6 = |p: &Pod, port| SocketAddr::new(IpAddr::V6(p.ip6), port);
    let flows = vec![
        Flow {
            from: ("shop/web", web.clone()),
            to: ("shop/api", api.clone()),
            dst: v4(&api, APP_PORT),
        },
        Flow {
            from: ("shop/web", web.clone()),
            to: ("shop/api", api.clone()),
            dst: v6(&api, APP_PORT),
        },
        Flow {
            from: ("shop/web", web.clone()),
            to: ("legacy/db", db.clone()),
            dst: v4(&db, APP_PORT),
        },
        Flow {
            from: ("shop/web", web.clone()),
            to: ("shop/api", api.clone()),
            dst: v4(&api, EXCLUDED_PORT),
        },
        Flow {
            from: ("legacy/batch", batch.clone()),
            to: ("shop/api", api.clone()),
            dst: v4(&api, APP_PORT),
        },
        Flow {
            from: ("legacy/batch", batch.clone()),
            to: ("legacy/db", db.clone()),
            dst: v4(&db, APP_PORT),
        },
    ];

    println!("\n== Traffic ==");
    println!(
        "{:<46} {:<20} {:<20} result",
        "flow", "outbound capture", "inbound capture"
    );
    for f in &flows {
        let ns = f.from.1.netns()?;
        let since = now_ms();
        let result = tcp_connect_in(&ns, f.dst, Duration::from_secs(5))
            .and_then(|mut s| ask(&mut s, b"ping through the mesh"));
        let result = match result {
            Ok((hello, echo)) if echo == b"ping through the mesh" => {
                format!("echo ok; app saw peer {}", hello.peer.ip())
            }
            Ok(_) => "WRONG ECHO".to_string(),
            Err(e) => format!("FAILED: {e}"),
        };
        // Give the event reader a moment (events are asynchronous).
        std::thread::sleep(Duration::from_millis(100));
        let out = verdict(
            &w.mesh,
            f.from.1.node_index - 1,
            &["connect4", "connect6"],
            f.dst,
            since,
            Some(f.from.0),
        );
        let inb = verdict(
            &w.mesh,
            f.to.1.node_index - 1,
            &["sk_lookup"],
            f.dst,
            since,
            None,
        );
        println!(
            "{:<46} {:<20} {:<20} {}",
            format!("{} -> {} {}", f.from.0, f.to.0, f.dst),
            out,
            inb,
            result
        );
    }

    println!(
        "\n== What each agent forwarded (access log; mutual_tls = carried in an HBONE tunnel, none = plaintext) =="
    );
    for a in &w.mesh.agents {
        for l in a.access_log() {
            println!(
                "  [{}] {:<8} {:<13} {:>24} -> {:<24} {:<10} sent {:>3} B, received {:>3} B, {:.2} ms, {}",
                a.node.name,
                l["direction"].as_str().unwrap_or("?"),
                l["pod"].as_str().unwrap_or("?"),
                l["src"].as_str().unwrap_or("?"),
                l["dst"].as_str().unwrap_or("?"),
                l["security"].as_str().unwrap_or("?"),
                l["bytes_sent"].as_u64().unwrap_or(0),
                l["bytes_received"].as_u64().unwrap_or(0),
                l["duration_ms"].as_f64().unwrap_or(0.0),
                l["close_reason"]
                    .as_str()
                    .unwrap_or(l["result"].as_str().unwrap_or("?")),
            );
        }
    }
    println!("\n== Kernel decision counters (all connects on the machine) ==");
    for a in &w.mesh.agents {
        let v = a.get_json("/debug/capture?limit=0")?;
        let counts: Vec<String> = v["decisions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                format!(
                    "{}/{}={}",
                    d["program"].as_str().unwrap_or("?"),
                    d["verdict"].as_str().unwrap_or("?"),
                    d["count"]
                )
            })
            .collect();
        println!("  [{}] {}", a.node.name, counts.join("  "));
    }
    control_plane_change(w, &batch, &db)?;
    println!(
        "\nTry it yourself: `cargo xtask lab up`, then see docs/development.md. Tearing the demo lab down."
    );
    Ok(())
}

/// Meshes the `legacy` namespace through the controller and shows capture following it.
fn control_plane_change(mut w: DemoWorld, batch: &Pod, db: &Pod) -> anyhow::Result<()> {
    println!("\n== Control plane: labelling namespace `legacy` weft.dev/mesh=enabled ==");
    for a in &w.mesh.agents {
        let d = a.get_json("/config_dump")?;
        println!(
            "  [{}] stream connected={} synced={} updates applied={} pods enrolled={}",
            a.node.name,
            d["config"]["connected"],
            d["config"]["synced"],
            d["config"]["applied"],
            d["pods"].as_array().map_or(0, Vec::len)
        );
    }
    w.mesh.config.set_meshed("legacy", true);
    let start = Instant::now();
    w.mesh.write_config()?;
    weft_tests::mesh::wait_for(Duration::from_secs(5), "legacy pods enrolled", || {
        let n: usize = w
            .mesh
            .agents
            .iter()
            .filter_map(|a| a.get_json("/config_dump").ok())
            .map(|d| d["pods"].as_array().map_or(0, Vec::len))
            .sum();
        (n == 4).then_some(())
    })
    .map_err(anyhow::Error::msg)?;
    println!(
        "  all four pods enrolled {:.0} ms after the file changed (controller poll + stream + kernel maps)",
        start.elapsed().as_secs_f64() * 1e3
    );
    let dst = SocketAddr::new(IpAddr::V4(db.ip4), APP_PORT);
    let since = now_ms();
    let ns = batch.netns()?;
    let mut s = tcp_connect_in(&ns, dst, Duration::from_secs(5))?;
    ask(&mut s, b"now meshed")?;
    std::thread::sleep(Duration::from_millis(100));
    println!(
        "  legacy/batch -> legacy/db {dst}: outbound {}, inbound {}",
        verdict(&w.mesh, 0, &["connect4"], dst, since, Some("legacy/batch")),
        verdict(&w.mesh, 1, &["sk_lookup"], dst, since, None)
    );
    Ok(())
}

/// The first capture decision an agent reported for `dst` since `since_ms`.
fn verdict(
    mesh: &MeshLab,
    node: usize,
    programs: &[&str],
    dst: SocketAddr,
    since_ms: u64,
    pod: Option<&str>,
) -> String {
    let events = mesh.agent(node).capture_events().unwrap_or_default();
    let hit = events.iter().find(|e: &&Value| {
        programs.iter().any(|p| e["program"] == *p)
            && e["dst"] == dst.to_string()
            && e["time_ms"].as_u64().unwrap_or(0) + 5 >= since_ms
            && (pod.is_none() || e["pod"].is_null() || e["pod"].as_str() == pod)
    });
    match hit {
        Some(e) => format!("{} (n{})", e["verdict"].as_str().unwrap_or("?"), node + 1),
        None => format!("- (n{})", node + 1),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
