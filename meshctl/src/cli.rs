//! Command-line surface.

use clap::{Parser, Subcommand, ValueEnum};

/// Operate a fedmesh federation.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version)]
pub struct Cli {
    /// Federation API address (`http://HOST:PORT`; the scheme may be omitted).
    #[arg(
        long,
        global = true,
        env = "FEDMESH_FEDERATION",
        default_value = "http://127.0.0.1:15010"
    )]
    pub federation: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Clusters with their locality and liveness.
    Clusters,
    /// Services with the clusters they run in.
    Services,
    /// Endpoints of one service (`namespace/name`, `name.namespace`, or `name` in `default`).
    Endpoints {
        /// The service.
        service: String,
    },
    /// The federation's own state: registry health, revision, invalid entries, subscribers.
    Status,
    /// Run a local mesh on the embedded registry until Ctrl-C.
    Demo(crate::cmd::demo::DemoArgs),
}
