//! `cargo xtask`: Weft's developer commands (setup, demo, test, lint, bench, lab).
//!
//! Each top-level subcommand lives in its own module with its own clap `Subcommand` or `Args`
//! type and a `run` function; `main` only dispatches.

mod bench;
mod bench_control_plane;
mod bench_l4;
mod bench_waypoint;
mod ci;
mod codegen;
#[cfg(test)]
mod dashboards;
mod demo;
mod lab;
mod openloop;
mod setup;

use clap::{Parser, Subcommand};

/// Weft's build, lab, demo and benchmark helpers.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what a fresh machine lacks: the pinned nightly with rust-src, bpf-linker,
    /// Debian packages (and with --ci: rustfmt, clippy, cargo-deny).
    Setup(setup::SetupArgs),
    /// Two-node demo mesh: meshed and unmeshed pods, traffic, and what was captured (root).
    Demo,
    /// The whole test suite: setup, build the agent, run every test (root for the lab tests).
    Test {
        /// Arguments passed to the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// cargo fmt --check, clippy -D warnings on the host crates, cargo deny.
    Lint,
    /// Regenerate checked-in generated files (the CRD manifests); --check fails if one is stale (CI).
    Codegen {
        /// Write nothing; fail when a generated file is missing or stale.
        #[arg(long)]
        check: bool,
    },
    /// Benchmarks (not tests): `cargo xtask bench capture|l4|waypoint|control-plane [--json]` (root).
    Bench(bench::BenchArgs),
    /// Simulated multi-node cluster on this machine, built from network namespaces (root).
    #[command(subcommand)]
    Lab(lab::LabCommand),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Lab(cmd) => lab::run(cmd),
        Command::Setup(args) => setup::run(args),
        Command::Demo => demo::run(),
        Command::Test { args } => ci::test(&args),
        Command::Lint => ci::lint(),
        Command::Bench(args) => bench::run(args),
        Command::Codegen { check } => codegen::run(check),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn lab_up_takes_sizes() {
        let cli = Cli::try_parse_from(["cargo xtask", "lab", "up", "--nodes", "3", "--pods", "1"])
            .expect("parse");
        let Command::Lab(lab::LabCommand::Up { nodes, pods }) = cli.command else {
            panic!("not lab up: {cli:?}");
        };
        assert_eq!((nodes, pods), (3, 1));
        let cli = Cli::try_parse_from(["cargo xtask", "lab", "up"]).expect("parse");
        let Command::Lab(lab::LabCommand::Up { nodes, pods }) = cli.command else {
            panic!("not lab up: {cli:?}");
        };
        assert_eq!((nodes, pods), (2, 2));
        assert!(Cli::try_parse_from(["cargo xtask", "lab", "down"]).is_ok());
        assert!(Cli::try_parse_from(["cargo xtask", "lab", "status"]).is_ok());
    }
}
