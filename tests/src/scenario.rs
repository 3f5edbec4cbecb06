//! The standard end-to-end scenario shared by the lab tests: two nodes, two pods each.
//! - namespace `shop` (meshed): `web` on n1p1, `api` on n2p1
//! - namespace `legacy` (not meshed): `batch` on n1p2, `db` on n2p2
//!
//! Every pod runs echo servers on port 8080 (IPv4 and IPv6). Tests using it are serialised
//! with [`serial`]: some count programs loaded machine-wide.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;

use crate::mesh::{MeshConfig, MeshLab, WorkloadSpec, wait_for};
use crate::{Lab, LabSpec, Pod, TestServer, ask, require_root, tcp_connect_in};

static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub const PORT: u16 = 8080;
pub const T: Duration = Duration::from_secs(5);

pub struct World {
    pub mesh: MeshLab,
    _servers: Vec<TestServer>,
}

impl World {
    pub fn pod(&self, node: usize, pod: usize) -> Pod {
        self.mesh.lab.pod(node, pod).clone()
    }
    pub fn web(&self) -> Pod {
        self.pod(0, 0)
    }
    pub fn batch(&self) -> Pod {
        self.pod(0, 1)
    }
    pub fn api(&self) -> Pod {
        self.pod(1, 0)
    }
    pub fn db(&self) -> Pod {
        self.pod(1, 1)
    }
}

pub fn standard_config(lab: &Lab) -> MeshConfig {
    MeshConfig::default()
        .namespace("shop", true)
        .namespace("legacy", false)
        .workload(WorkloadSpec::new("web", "shop", lab.pod(0, 0)))
        .workload(WorkloadSpec::new("api", "shop", lab.pod(1, 0)))
        .workload(WorkloadSpec::new("batch", "legacy", lab.pod(0, 1)))
        .workload(WorkloadSpec::new("db", "legacy", lab.pod(1, 1)))
}

/// Builds the standard world with agents reading a local file; `None` when not root outside CI.
pub fn world(
    test: &str,
    extra_ports: &[u16],
    tweak: impl FnOnce(MeshConfig) -> MeshConfig,
    agent_args: &[&str],
) -> Option<World> {
    build(test, extra_ports, tweak, agent_args, false)
}

/// Builds the standard world with a controller (on node 1) streaming to the agents.
pub fn world_with_controller(
    test: &str,
    tweak: impl FnOnce(MeshConfig) -> MeshConfig,
) -> Option<World> {
    build(test, &[], tweak, &[], true)
}

/// [`world_with_controller`] with more agent arguments.
pub fn world_with_controller_args(
    test: &str,
    tweak: impl FnOnce(MeshConfig) -> MeshConfig,
    agent_args: &[&str],
) -> Option<World> {
    build(test, &[], tweak, agent_args, true)
}

fn build(
    test: &str,
    extra_ports: &[u16],
    tweak: impl FnOnce(MeshConfig) -> MeshConfig,
    agent_args: &[&str],
    controller: bool,
) -> Option<World> {
    if !require_root(test) {
        return None;
    }
    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: 2,
    })
    .expect("lab up");
    let mut servers = Vec::new();
    for pod in lab.pods() {
        let ns = pod.netns().expect("pod netns");
        for port in std::iter::once(PORT).chain(extra_ports.iter().copied()) {
            for ip in [IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)] {
                let unspecified: IpAddr = if ip.is_ipv4() {
                    "0.0.0.0".parse().expect("ip")
                } else {
                    "::".parse().expect("ip")
                };
                servers.push(
                    TestServer::start(&ns, SocketAddr::new(unspecified, port)).expect("server"),
                );
            }
        }
    }
    let config = tweak(standard_config(&lab));
    let mesh = if controller {
        let mesh = MeshLab::start_with_controller(lab, config, agent_args)
            .expect("controller and agents start");
        // Ready means configured; certificates arrive right after. Tests that then take the
        // controller away (or measure the data path) must start from a mesh that has them.
        for node in 0..mesh.agents.len() {
            // One certificate per identity of the node's captured workloads.
            let meshed = |ns: &str| {
                mesh.config
                    .namespaces
                    .iter()
                    .any(|n| n.name == ns && n.meshed)
            };
            let wanted: std::collections::BTreeSet<(String, String)> = mesh
                .config
                .workloads
                .iter()
                .filter(|w| w.pod.node_index == node + 1 && meshed(&w.namespace))
                .filter(|w| {
                    w.labels.get(weft_api::labels::MESH).map(String::as_str) != Some("disabled")
                })
                .map(|w| (w.namespace.clone(), w.service_account.clone()))
                .collect();
            wait_for(
                T,
                &format!("{} certificate(s) on node {node}", wanted.len()),
                || {
                    let dump = mesh.agent(node).get_json("/config_dump").ok()?;
                    let certs = dump["certificates"].as_array()?.clone();
                    (certs.len() >= wanted.len() && certs.iter().all(|c| c["valid"] == true))
                        .then_some(())
                },
            )
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", mesh.agent(node).log_tail(30)));
        }
        mesh
    } else {
        MeshLab::start(lab, config, agent_args).expect("agents start")
    };
    Some(World {
        mesh,
        _servers: servers,
    })
}

/// Connects from `from` to `to` and checks the echo. Returns what the server saw.
pub fn exchange(from: &Pod, to: SocketAddr) -> crate::ServerHello {
    let ns = from.netns().expect("netns");
    let mut s =
        tcp_connect_in(&ns, to, T).unwrap_or_else(|e| panic!("connect {} -> {to}: {e}", from.name));
    let payload = format!("hello from {} to {to}", from.name);
    let (hello, echo) = ask(&mut s, payload.as_bytes())
        .unwrap_or_else(|e| panic!("exchange {} -> {to}: {e}", from.name));
    assert_eq!(
        echo,
        payload.as_bytes(),
        "echo through {} -> {to}",
        from.name
    );
    hello
}

pub fn v4(p: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(p.ip4), port)
}

pub fn v6(p: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(p.ip6), port)
}

pub fn events(w: &World, node: usize) -> Vec<Value> {
    w.mesh.agent(node).capture_events().expect("capture events")
}

pub fn has_event(
    evs: &[Value],
    program: &str,
    verdict: &str,
    pod: Option<&str>,
    dst: SocketAddr,
) -> bool {
    evs.iter().any(|e| {
        e["program"] == program
            && e["verdict"] == verdict
            && pod.is_none_or(|p| e["pod"] == p)
            && e["dst"] == dst.to_string()
    })
}

pub fn wait_event(
    w: &World,
    node: usize,
    program: &str,
    verdict: &str,
    pod: Option<&str>,
    dst: SocketAddr,
) {
    wait_for(
        T,
        &format!("{program}/{verdict} event for {dst} on node {node}"),
        || has_event(&events(w, node), program, verdict, pod, dst).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}; events: {:#?}", events(w, node)));
}

pub fn access_lines(w: &World, node: usize, direction: &str, dst: SocketAddr) -> Vec<Value> {
    w.mesh
        .agent(node)
        .access_log()
        .into_iter()
        .filter(|l| l["direction"] == direction && l["dst"] == dst.to_string())
        .collect()
}

pub fn wait_access(w: &World, node: usize, direction: &str, dst: SocketAddr) -> Value {
    wait_for(
        T,
        &format!("{direction} access log for {dst} on node {node}"),
        || access_lines(w, node, direction, dst).into_iter().next(),
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(node).log_tail(30)))
}

/// Connects from `from` (workload `name`) to `dst`, checks the echo, and waits until the
/// sending node's agent reports the connect with `verdict`. Returns what the server saw.
pub fn outbound(
    w: &World,
    from: &Pod,
    name: &str,
    dst: SocketAddr,
    verdict: &str,
) -> crate::ServerHello {
    let hello = exchange(from, dst);
    let program = if dst.is_ipv4() {
        "connect4"
    } else {
        "connect6"
    };
    wait_event(w, from.node_index - 1, program, verdict, Some(name), dst);
    hello
}
