//! A lab with node agents: writes the mesh configuration, starts one `weft-agent` per node
//! (inside the node's network namespace, as a DaemonSet pod with host networking would run),
//! and reads what the agents report (admin API, JSON access logs).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::{Lab, Node, Pod};
use crate::net::tcp_connect_in;

/// Admin address of every agent, inside its node's network namespace.
pub const AGENT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);

/// Errors from running agents. Each says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(
        "binary not found at {0}: build it first (`cargo build -p weft-agent -p weft-controller --bins`; `cargo xtask test` does this) or set WEFT_AGENT_BIN / WEFT_CONTROLLER_BIN"
    )]
    NoAgentBinary(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("agent on {node} exited early ({status}); last log lines:\n{log}")]
    AgentExited {
        node: String,
        status: String,
        log: String,
    },
    #[error("agent on {node} not ready after {after:?}; last log lines:\n{log}")]
    NotReady {
        node: String,
        after: Duration,
        log: String,
    },
    #[error("admin request {path} to the agent on {node} failed: {detail}")]
    Admin {
        node: String,
        path: String,
        detail: String,
    },
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// Path of the agent binary: `$WEFT_AGENT_BIN`, else next to the running test or xtask binary
/// (`target/<profile>/weft-agent`).
pub fn agent_binary() -> Result<PathBuf, MeshError> {
    find_binary("weft-agent", "WEFT_AGENT_BIN")
}

/// Path of the controller binary: `$WEFT_CONTROLLER_BIN`, else next to the running binary.
pub fn controller_binary() -> Result<PathBuf, MeshError> {
    find_binary("weft-controller", "WEFT_CONTROLLER_BIN")
}

/// Path of the waypoint binary: `$WEFT_WAYPOINT_BIN`, else next to the running binary.
pub fn waypoint_binary() -> Result<PathBuf, MeshError> {
    find_binary("weft-waypoint", "WEFT_WAYPOINT_BIN")
}

fn find_binary(name: &str, env: &str) -> Result<PathBuf, MeshError> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(MeshError::NoAgentBinary(p))
        };
    }
    let exe = std::env::current_exe().map_err(io("locating the running binary"))?;
    // target/<profile>/deps/<test>-<hash> or target/<profile>/xtask
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        candidates.push(dir.join(name));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| MeshError::NoAgentBinary(candidates.first().cloned().unwrap_or_default()))
}

/// A namespace in the generated configuration.
#[derive(Clone, Debug)]
pub struct NamespaceSpec {
    pub name: String,
    pub meshed: bool,
    /// More labels (e.g. `weft.dev/use-waypoint`).
    pub labels: BTreeMap<String, String>,
}

/// A workload in the generated configuration, placed on a lab pod.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub pod: Pod,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl WorkloadSpec {
    pub fn new(name: &str, namespace: &str, pod: &Pod) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            service_account: name.into(),
            pod: pod.clone(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// The mesh configuration every agent reads (the local-config stand-in for the control plane).
#[derive(Clone, Debug, Default)]
pub struct MeshConfig {
    pub namespaces: Vec<NamespaceSpec>,
    pub workloads: Vec<WorkloadSpec>,
    /// More documents, as written (e.g. Services).
    pub raw: Vec<serde_json::Value>,
}

impl MeshConfig {
    pub fn namespace(mut self, name: &str, meshed: bool) -> Self {
        self.namespaces.push(NamespaceSpec {
            name: name.into(),
            meshed,
            labels: BTreeMap::new(),
        });
        self
    }

    /// Adds a label to a namespace declared with [`MeshConfig::namespace`].
    pub fn label_namespace(mut self, namespace: &str, key: &str, value: &str) -> Self {
        for ns in &mut self.namespaces {
            if ns.name == namespace {
                ns.labels.insert(key.into(), value.into());
            }
        }
        self
    }

    pub fn workload(mut self, w: WorkloadSpec) -> Self {
        self.workloads.push(w);
        self
    }

    /// Sets whether a namespace is meshed.
    pub fn set_meshed(&mut self, namespace: &str, meshed: bool) {
        for ns in &mut self.namespaces {
            if ns.name == namespace {
                ns.meshed = meshed;
            }
        }
    }

    /// The configuration as multi-document YAML.
    pub fn to_yaml(&self) -> String {
        let mut docs = Vec::new();
        for ns in &self.namespaces {
            let mut labels: serde_json::Map<String, serde_json::Value> = ns
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect();
            if ns.meshed {
                labels.insert(
                    weft_api::labels::MESH.into(),
                    weft_api::labels::MESH_ENABLED.into(),
                );
            }
            docs.push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns.name, "labels": labels},
            }));
        }
        for w in &self.workloads {
            docs.push(serde_json::json!({
                "apiVersion": weft_api::resource::API_VERSION,
                "kind": "Workload",
                "metadata": {
                    "name": w.name,
                    "namespace": w.namespace,
                    "labels": w.labels,
                    "annotations": w.annotations,
                },
                "spec": {
                    "serviceAccount": w.service_account,
                    "node": format!("n{}", w.pod.node_index),
                    "ips": [w.pod.ip4.to_string(), w.pod.ip6.to_string()],
                    "netns": w.pod.netns_path().display().to_string(),
                },
            }));
        }
        docs.extend(self.raw.iter().cloned());
        // JSON is YAML: one document per object.
        docs.iter()
            .map(|d| format!("---\n{d}\n"))
            .collect::<String>()
    }
}

/// Sum of the series of `name` in Prometheus text whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// One running agent.
pub struct AgentProcess {
    pub node: Node,
    child: Child,
    log_path: PathBuf,
}

impl AgentProcess {
    /// Starts `weft-agent` in the node's network namespace with JSON logs to
    /// `<dir>/agent-<node>.log`.
    pub fn start(
        node: &Node,
        config: &Path,
        dir: &Path,
        extra: &[&str],
    ) -> Result<Self, MeshError> {
        let source = ["--config".to_string(), config.display().to_string()];
        Self::start_with_source(node, &source, dir, extra)
    }

    /// Starts `weft-agent` with explicit configuration-source arguments (`--config FILE`, or
    /// `--controller URL --controller-ca ...`). The log file is appended to, so a restarted
    /// agent's lines follow the previous ones.
    pub fn start_with_source(
        node: &Node,
        source: &[String],
        dir: &Path,
        extra: &[&str],
    ) -> Result<Self, MeshError> {
        let bin = agent_binary()?;
        let log_path = dir.join(format!("agent-{}.log", node.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("creating {}", log_path.display())))?;
        let err = log.try_clone().map_err(io("cloning a log handle"))?;
        let mut cmd = node.command(&bin);
        cmd.arg("--node")
            .arg(&node.name)
            .args(source)
            .arg("--admin-addr")
            .arg(AGENT_ADMIN.to_string())
            .arg("--log-format")
            .arg("json")
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", bin.display())))?;
        Ok(Self {
            node: node.clone(),
            child,
            log_path,
        })
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), MeshError> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(MeshError::AgentExited {
                    node: self.node.name.clone(),
                    status: status.to_string(),
                    log: self.log_tail(20),
                });
            }
            if let Ok((200, _)) = self.get("/ready") {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(MeshError::NotReady {
                    node: self.node.name.clone(),
                    after: timeout,
                    log: self.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A GET on the admin endpoint: `(status, body)`.
    pub fn get(&self, path: &str) -> Result<(u16, String), MeshError> {
        let err = |detail: String| MeshError::Admin {
            node: self.node.name.clone(),
            path: path.into(),
            detail,
        };
        let ns = self.node.netns()?;
        let mut s = tcp_connect_in(&ns, AGENT_ADMIN, Duration::from_secs(2))
            .map_err(|e| err(e.to_string()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| err(e.to_string()))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").map_err(|e| err(e.to_string()))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| err(format!("malformed response {text:?}")))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| err(format!("no status in {head:?}")))?;
        Ok((status, body.to_string()))
    }

    /// A GET returning JSON.
    pub fn get_json(&self, path: &str) -> Result<Value, MeshError> {
        let (status, body) = self.get(path)?;
        if status != 200 {
            return Err(MeshError::Admin {
                node: self.node.name.clone(),
                path: path.into(),
                detail: format!("status {status}: {body}"),
            });
        }
        serde_json::from_str(&body).map_err(|e| MeshError::Admin {
            node: self.node.name.clone(),
            path: path.into(),
            detail: format!("bad JSON ({e}): {body}"),
        })
    }

    /// Recent capture decisions (`/debug/capture` events).
    pub fn capture_events(&self) -> Result<Vec<Value>, MeshError> {
        let v = self.get_json("/debug/capture?limit=4096")?;
        Ok(v["events"].as_array().cloned().unwrap_or_default())
    }

    /// Kernel decision counter for `(program, verdict)`.
    pub fn decision_count(&self, program: &str, verdict: &str) -> Result<u64, MeshError> {
        let v = self.get_json("/debug/capture?limit=0")?;
        Ok(v["decisions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["program"] == program && d["verdict"] == verdict)
            .filter_map(|d| d["count"].as_u64())
            .sum())
    }

    /// Every JSON log line the agent wrote so far.
    pub fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Access-log lines (target `weft::access`).
    pub fn access_log(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["target"] == "weft::access")
            .collect()
    }

    /// The last `n` lines of the agent's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Sends SIGTERM and returns at once (graceful drain).
    pub fn terminate(&self) {
        sigterm(&self.child);
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.get("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// Sum of every series of `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics_text(), name, labels)
    }

    /// SIGTERM, then wait (SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) {
        sigterm(&self.child);
        let start = Instant::now();
        while start.elapsed() < grace {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    /// SIGKILL (a crash, as far as the kernel is concerned), then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop(Duration::from_secs(2));
        }
    }
}

/// Polls `f` until it returns `Some`, or fails with `what` after `timeout`.
/// Sends SIGTERM to `child` and returns at once.
pub fn sigterm(child: &std::process::Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
}

pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A lab with a configuration directory and one agent per node.
pub struct MeshLab {
    pub agents: Vec<AgentProcess>,
    /// The controller (controller mode only), on node 1.
    pub controller: Option<ControllerProcess>,
    pub config: MeshConfig,
    config_path: PathBuf,
    dir: PathBuf,
    extra_agent_args: Vec<String>,
    /// Extra controller arguments (see [`MeshLab::set_controller_args`]).
    controller_args: Vec<String>,
    /// Dropped last (fields drop in order): agents stop before the namespaces go.
    pub lab: Lab,
}

impl MeshLab {
    /// Writes `config` and starts one agent per node (with `extra` arguments), waiting until
    /// each is ready.
    pub fn start(lab: Lab, config: MeshConfig, extra: &[&str]) -> Result<Self, MeshError> {
        let dir = std::env::temp_dir().join(format!("weft-{}", lab.run_id()));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let config_path = dir.join("mesh.yaml");
        let mut mesh = Self {
            agents: Vec::new(),
            controller: None,
            config,
            config_path,
            dir,
            extra_agent_args: extra.iter().map(|s| s.to_string()).collect(),
            controller_args: Vec::new(),
            lab,
        };
        mesh.write_config()?;
        for node in mesh.lab.nodes().to_vec() {
            let agent = AgentProcess::start(&node, &mesh.config_path, &mesh.dir, extra)?;
            mesh.agents.push(agent);
        }
        for a in &mut mesh.agents {
            a.wait_ready(Duration::from_secs(20))?;
        }
        Ok(mesh)
    }

    /// Controller mode: writes `config` into a directory the controller (on node 1) follows,
    /// generates per-node bootstrap tokens, and starts one agent per node streaming from it.
    pub fn start_with_controller(
        lab: Lab,
        config: MeshConfig,
        extra: &[&str],
    ) -> Result<Self, MeshError> {
        let dir = std::env::temp_dir().join(format!("weft-{}", lab.run_id()));
        let config_dir = dir.join("config");
        std::fs::create_dir_all(&config_dir)
            .map_err(io(format!("creating {}", config_dir.display())))?;
        let mut tokens = String::new();
        for node in lab.nodes() {
            let token = random_token()?;
            tokens.push_str(&format!("{}: \"{token}\"\n", node.name));
            let path = dir.join(format!("token-{}", node.name));
            std::fs::write(&path, &token).map_err(io(format!("writing {}", path.display())))?;
        }
        let tokens_path = dir.join("tokens.yaml");
        std::fs::write(&tokens_path, tokens)
            .map_err(io(format!("writing {}", tokens_path.display())))?;
        let mut mesh = Self {
            agents: Vec::new(),
            controller: None,
            config,
            config_path: config_dir.join("mesh.yaml"),
            dir,
            extra_agent_args: extra.iter().map(|s| s.to_string()).collect(),
            controller_args: Vec::new(),
            lab,
        };
        mesh.write_config()?;
        mesh.start_controller()?;
        for i in 0..mesh.lab.nodes().len() {
            let node = mesh.lab.node(i).clone();
            let agent =
                AgentProcess::start_with_source(&node, &mesh.agent_source(i), &mesh.dir, extra)?;
            mesh.agents.push(agent);
        }
        for a in &mut mesh.agents {
            a.wait_ready(Duration::from_secs(20))?;
        }
        Ok(mesh)
    }

    /// Starts (or restarts) the controller on node 1 and waits until it listens.
    pub fn start_controller(&mut self) -> Result<(), MeshError> {
        let node = self.lab.node(0).clone();
        let mut c = ControllerProcess::start(
            &node,
            self.config_path.parent().unwrap_or(&self.dir),
            &self.dir.join("controller"),
            &self.dir.join("tokens.yaml"),
            &self.dir,
            &self.controller_args,
        )?;
        c.wait_listening(Duration::from_secs(20))?;
        self.controller = Some(c);
        Ok(())
    }

    /// Extra arguments for the controller from its next (re)start on, e.g.
    /// `--require-node-certificates` or `--node-cert-ttl 60`.
    pub fn set_controller_args(&mut self, args: &[&str]) {
        self.controller_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// Kills the controller (SIGKILL), as an outage would.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
    }

    /// The configuration-source arguments of node `i`'s agent.
    pub fn agent_source(&self, i: usize) -> Vec<String> {
        let node = self.lab.node(i);
        if self.controller.is_none() && !self.dir.join("tokens.yaml").exists() {
            return vec!["--config".into(), self.config_path.display().to_string()];
        }
        let controller = self.lab.node(0);
        vec![
            "--controller".into(),
            format!("https://{}:{CONTROLLER_PORT}", controller.ip4),
            "--controller-ca".into(),
            self.dir.join("controller/ca.pem").display().to_string(),
            "--bootstrap-token-file".into(),
            self.dir
                .join(format!("token-{}", node.name))
                .display()
                .to_string(),
            "--state-dir".into(),
            self.dir
                .join(format!("agent-state-{}", node.name))
                .display()
                .to_string(),
        ]
    }

    /// Kills node `i`'s agent and starts a new one (same arguments), waiting until ready.
    pub fn restart_agent(&mut self, i: usize) -> Result<(), MeshError> {
        self.agents[i].kill();
        let node = self.lab.node(i).clone();
        let extra: Vec<&str> = self.extra_agent_args.iter().map(String::as_str).collect();
        let mut a =
            AgentProcess::start_with_source(&node, &self.agent_source(i), &self.dir, &extra)?;
        a.wait_ready(Duration::from_secs(20))?;
        self.agents[i] = a;
        Ok(())
    }

    /// Rewrites the configuration file atomically (agents pick it up on their next poll).
    pub fn write_config(&self) -> Result<(), MeshError> {
        let tmp = self.dir.join("mesh.yaml.tmp");
        std::fs::write(&tmp, self.config.to_yaml())
            .map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &self.config_path)
            .map_err(io(format!("replacing {}", self.config_path.display())))
    }

    /// The agent of node `i` (0-based).
    pub fn agent(&self, i: usize) -> &AgentProcess {
        &self.agents[i]
    }

    /// Directory with the configuration and agent logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Waits until every agent has applied the current configuration (its `applied` counter
    /// moved past `before`) — `before` from [`MeshLab::applied_counts`].
    pub fn wait_applied(&self, before: &[u64], timeout: Duration) -> Result<(), String> {
        for (a, b) in self.agents.iter().zip(before) {
            wait_for(
                timeout,
                &format!("agent {} to apply the new configuration", a.node.name),
                || {
                    let v = a.get_json("/config_dump").ok()?;
                    (v["config"]["applied"].as_u64()? > *b).then_some(())
                },
            )?;
        }
        Ok(())
    }

    /// Each agent's `applied` counter.
    pub fn applied_counts(&self) -> Vec<u64> {
        self.agents
            .iter()
            .map(|a| {
                a.get_json("/config_dump")
                    .ok()
                    .and_then(|v| v["config"]["applied"].as_u64())
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        if let Some(c) = &mut self.controller {
            c.kill();
        }
        for a in &mut self.agents {
            a.stop(Duration::from_secs(2));
        }
        if std::env::var_os("WEFT_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Port of the controller's config stream in the lab (on node 1's fabric address).
pub const CONTROLLER_PORT: u16 = 15010;

fn random_token() -> Result<String, MeshError> {
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io("reading /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The controller, running in node 1's network namespace (as a host-network pod would).
pub struct ControllerProcess {
    pub node: Node,
    child: Child,
    log_path: PathBuf,
}

impl ControllerProcess {
    /// Starts `weft-controller --config-dir <config_dir>` listening on the node's fabric
    /// address, port [`CONTROLLER_PORT`], with `extra` arguments.
    pub fn start(
        node: &Node,
        config_dir: &Path,
        state_dir: &Path,
        tokens: &Path,
        dir: &Path,
        extra: &[String],
    ) -> Result<Self, MeshError> {
        let bin = controller_binary()?;
        let log_path = dir.join("controller.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("creating {}", log_path.display())))?;
        let err = log.try_clone().map_err(io("cloning a log handle"))?;
        let child = node
            .command(&bin)
            .arg("--config-dir")
            .arg(config_dir)
            .arg("--listen")
            .arg(format!("{}:{CONTROLLER_PORT}", node.ip4))
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--tls-san")
            .arg(node.ip4.to_string())
            .arg("--bootstrap-tokens")
            .arg(tokens)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {}", bin.display())))?;
        Ok(Self {
            node: node.clone(),
            child,
            log_path,
        })
    }

    /// Waits until the controller accepts connections.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<(), MeshError> {
        let addr = SocketAddr::new(std::net::IpAddr::V4(self.node.ip4), CONTROLLER_PORT);
        let ns = self.node.netns()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(MeshError::AgentExited {
                    node: format!("{} (controller)", self.node.name),
                    status: status.to_string(),
                    log: self.log_text(),
                });
            }
            if tcp_connect_in(&ns, addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(MeshError::NotReady {
                    node: format!("{} (controller)", self.node.name),
                    after: timeout,
                    log: self.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the controller logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
