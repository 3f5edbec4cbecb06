//! `cargo xtask test` (the README's test command) and `cargo xtask lint` (fmt, clippy, deny).
//!
//! The eBPF crate is never built for the host: every command names its packages.

use anyhow::bail;

use crate::setup::{self, SetupArgs, cargo, run_cmd};

/// Host packages (everything but the eBPF crate, which only builds for bpfel).
pub const HOST_PACKAGES: &[&str] = &[
    "weft-ebpf-common",
    "weft-netns",
    "weft-tunnel",
    "weft-api",
    "weft-controller",
    "weft-agent",
    "weft-waypoint",
    "weft-tests",
    "xtask",
];

fn with_packages(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for p in HOST_PACKAGES {
        cmd.args(["-p", p]);
    }
    cmd
}

/// Installs what is missing, builds the agent binary the lab tests start, and runs every test.
pub fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::run(SetupArgs { ci: false })?;
    if !setup::is_root() {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!(
                "the test suite must run as root in CI (lab tests create network namespaces and load eBPF programs)"
            );
        }
        eprintln!(
            "warning: not root: the lab and capture tests will be skipped (run as root for the full suite)"
        );
    }
    crate::setup::build_mesh_binaries(false)?;
    run_cmd(with_packages(cargo().arg("test")).arg("--").args(extra))?;
    Ok(())
}

/// Formatting, lints and dependency policy.
pub fn lint() -> anyhow::Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--check"]))?;
    crate::codegen::run(true)?;
    // One clippy run over the host packages, all targets.
    run_cmd(with_packages(cargo().arg("clippy")).args(["--all-targets", "--", "-D", "warnings"]))?;
    // Advisories need the advisory database from the network, which CI does not have.
    run_cmd(std::process::Command::new("cargo-deny").args([
        "--all-features",
        "check",
        "bans",
        "licenses",
        "sources",
    ]))?;
    Ok(())
}
