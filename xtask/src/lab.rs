//! `cargo xtask lab up|down|status`: a lab that outlives the command, for manual testing.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Instant;

use anyhow::Context as _;
use clap::Subcommand;
use weft_tests::{Lab, LabSpec, LabStatus, Node, Pod};

/// `cargo xtask lab ...`
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create a lab and leave it running; prints its namespaces and addresses.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = LabSpec::default().nodes)]
        nodes: usize,
        /// Number of pods on each node.
        #[arg(long, default_value_t = LabSpec::default().pods_per_node)]
        pods: usize,
    },
    /// Remove one lab, or with no run id every lab on this machine (all `weft-*` namespaces,
    /// lab cgroups and state files, including labs of running tests).
    Down {
        /// The lab to remove (see `cargo xtask lab status`).
        run_id: Option<String>,
    },
    /// List the labs on this machine.
    Status,
}

/// Runs a `cargo xtask lab` subcommand.
pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up { nodes, pods } => up(LabSpec {
            nodes,
            pods_per_node: pods,
        }),
        LabCommand::Down { run_id } => down(run_id.as_deref()),
        LabCommand::Status => status(),
    }
}

fn up(spec: LabSpec) -> anyhow::Result<()> {
    let started = Instant::now();
    let lab = Lab::up(spec).context("lab up failed")?;
    let elapsed = started.elapsed();
    let pods: Vec<Pod> = lab.pods().cloned().collect();
    let table = render_table(lab.nodes(), &pods);
    let fabric = lab.fabric_netns().to_owned();
    let cgroup = lab.cgroup().display().to_string();
    let id = lab.keep();
    let mut out = format!(
        "lab {id} is up ({} nodes x {} pods, {} ms)\n\n{table}\n",
        spec.nodes,
        spec.pods_per_node,
        elapsed.as_millis()
    );
    let _ = writeln!(
        out,
        "fabric netns: {fabric} (bridge br0; capture with `ip netns exec {fabric} tcpdump -ni br0`)"
    );
    let _ = writeln!(out, "cgroups:      {cgroup}/<pod>\n");
    if let Some(ns) = pods.first().map(|p| &p.netns) {
        let _ = writeln!(
            out,
            "run a command in a pod:  ip netns exec {ns} <cmd>     (e.g. `ip netns exec {ns} ip addr`)"
        );
    }
    let _ = writeln!(
        out,
        "remove it:               cargo xtask lab down {id}   (or every lab: cargo xtask lab down)"
    );
    emit(&out)
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn down(run_id: Option<&str>) -> anyhow::Result<()> {
    let removed = match run_id {
        Some(id) => Lab::down(id).with_context(|| format!("lab down {id} failed"))?,
        None => Lab::down_all().context("lab down failed")?,
    };
    let mut out = String::new();
    if removed.is_empty() {
        out.push_str("no lab resources found\n");
    }
    for item in &removed {
        let _ = writeln!(out, "removed {item}");
    }
    emit(&out)
}

fn status() -> anyhow::Result<()> {
    let labs = Lab::status().context("lab status failed")?;
    emit(&render_status(&labs))
}

fn render_table(nodes: &[Node], pods: &[Pod]) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "KIND".into(),
        "NAME".into(),
        "NETNS".into(),
        "IPV4".into(),
        "IPV6".into(),
    ]];
    for n in nodes {
        rows.push([
            "node".into(),
            n.name.clone(),
            n.netns.clone(),
            n.ip4.to_string(),
            n.ip6.to_string(),
        ]);
        for p in pods.iter().filter(|p| p.node_index == n.index) {
            rows.push([
                "pod".into(),
                p.name.clone(),
                p.netns.clone(),
                p.ip4.to_string(),
                p.ip6.to_string(),
            ]);
        }
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn render_status(labs: &[LabStatus]) -> String {
    if labs.is_empty() {
        return "no labs\n".to_owned();
    }
    let mut out = String::new();
    for lab in labs {
        let how = if lab.kept() {
            "kept"
        } else {
            "no state file: owned by a running test, or leaked"
        };
        let health = if lab.is_complete() {
            "complete".to_owned()
        } else if lab.netns.is_empty() {
            "no namespaces".to_owned()
        } else {
            format!("missing {}", lab.missing_netns.join(", "))
        };
        let _ = writeln!(
            out,
            "lab {} ({how}; {} nodes, {} pods; {health})",
            lab.run_id,
            lab.nodes.len(),
            lab.pods.len()
        );
        if let Some(cg) = &lab.cgroup {
            let _ = writeln!(out, "  cgroup {}", cg.display());
        }
        for line in render_table(&lab.nodes, &lab.pods).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LabStatus {
        LabStatus {
            run_id: "abc123".into(),
            nodes: vec![Node {
                index: 1,
                name: "n1".into(),
                netns: "weft-abc123-n1".into(),
                ip4: "198.19.0.1".parse().expect("ip"),
                ip6: "fd77:6566:ff::1".parse().expect("ip"),
            }],
            pods: vec![Pod {
                node_index: 1,
                index: 1,
                name: "n1p1".into(),
                netns: "weft-abc123-n1p1".into(),
                ip4: "198.18.1.11".parse().expect("ip"),
                ip6: "fd77:6566:1::b".parse().expect("ip"),
                cgroup: "/cg/weft-abc123/n1p1".into(),
            }],
            netns: vec!["weft-abc123-n1".into(), "weft-abc123-n1p1".into()],
            missing_netns: vec!["weft-abc123-fab".into()],
            ..LabStatus::default()
        }
    }

    #[test]
    fn table_lists_pods_under_their_node() {
        let s = sample();
        let table = render_table(&s.nodes, &s.pods);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("KIND"), "{table}");
        assert!(lines[1].contains("weft-abc123-n1 ") && lines[1].contains("198.19.0.1"));
        assert!(lines[2].contains("n1p1") && lines[2].contains("fd77:6566:1::b"));
    }

    #[test]
    fn status_says_what_is_missing() {
        let out = render_status(&[sample()]);
        assert!(out.contains("lab abc123"), "{out}");
        assert!(out.contains("missing weft-abc123-fab"), "{out}");
        assert_eq!(render_status(&[]), "no labs\n");
    }
}
