//! `cargo xtask`: Weft's developer commands (lab, and later setup, demo, bench, ci, codegen).
//!
//! Each top-level subcommand lives in its own module with its own clap `Subcommand` or `Args`
//! type and a `run` function; `main` only dispatches.

mod lab;

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
    /// Simulated multi-node cluster on this machine, built from network namespaces (root).
    #[command(subcommand)]
    Lab(lab::LabCommand),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Lab(cmd) => lab::run(cmd),
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
