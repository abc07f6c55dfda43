//! Command-line surface.

use clap::{Parser, Subcommand, ValueEnum};

/// Operate a fedmesh federation.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version)]
pub struct Cli {
    /// Federation API URL (`https://HOST:PORT`; the scheme may be
    /// omitted). Default: the context's server.
    #[arg(long, global = true, env = "FEDMESH_FEDERATION")]
    pub federation: Option<String>,
    /// The context of the meshctl configuration to use (default: its
    /// current context). The configuration is `$FEDMESH_CONFIG`, else
    /// `$XDG_CONFIG_HOME/fedmesh/config.yaml`, else `~/.config/fedmesh/config.yaml`.
    #[arg(long, global = true, env = "FEDMESH_CONTEXT")]
    pub context: Option<String>,
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
    /// Check policy files (Istio's VirtualService, DestinationRule, Sidecar,
    /// AuthorizationPolicy, PeerAuthentication, RequestAuthentication, and
    /// fedmesh's TrafficWeights) without applying them: every error with its
    /// file, document and field path.
    Validate(crate::cmd::policy::FileArgs),
    /// Validate policy files and store them in the federation, all documents
    /// in one transaction or none.
    Apply {
        /// Files and what to do with them.
        #[command(flatten)]
        files: crate::cmd::policy::FileArgs,
        /// Validate on the federation and print what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Policy documents stored in the federation.
    Get {
        /// Kind, e.g. `VirtualService`; all kinds when omitted.
        kind: Option<String>,
        /// Name of one document (needs a kind).
        name: Option<String>,
        /// Namespace; all namespaces when omitted.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Delete the policy documents named in files, in one transaction.
    Delete(crate::cmd::policy::FileArgs),
    /// Join tokens for workloads outside Kubernetes (VMs, local runs).
    Token {
        /// What to do.
        #[command(subcommand)]
        command: crate::cmd::identity::TokenCommand,
    },
    /// The audit log: certificates issued and refused, tokens created.
    Audit {
        /// Only entries newer than this (e.g. `1h`).
        #[arg(long)]
        since: Option<String>,
        /// Most entries shown (one page; at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Where the previous page ended (printed after a full page).
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Global traffic weights of a service: set, get, explain, clear.
    Weights {
        /// What to do.
        #[command(subcommand)]
        command: crate::cmd::weights::WeightsCommand,
    },
    /// Take a cluster out of every service's traffic (guarded: refused if a
    /// service would be left with no healthy cluster, unless --force).
    Drain {
        /// The cluster.
        cluster: String,
        /// Past the guardrail (audited).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: crate::cmd::rollout::Wait,
    },
    /// Bring a drained cluster back (with slow start).
    Undrain {
        /// The cluster.
        cluster: String,
        #[command(flatten)]
        wait: crate::cmd::rollout::Wait,
    },
    /// The mesh's trust bundle, and staged root rotation.
    Trust {
        /// What to do.
        #[command(subcommand)]
        command: crate::cmd::trust::TrustCommand,
    },
    /// Get an operator certificate with a token from your admin (the key
    /// is made here and never leaves), and save it as a context.
    Login(crate::cmd::auth::LoginArgs),
    /// Operators: enrollment tokens and role bindings.
    Operator {
        /// What to do.
        #[command(subcommand)]
        command: crate::cmd::auth::OperatorCommand,
    },
    /// Who the federation takes you for, and your roles.
    Whoami,
    /// Clusters: add or change one (its locality, network and gateways).
    Cluster {
        /// What to do.
        #[command(subcommand)]
        command: crate::cmd::auth::ClusterCommand,
    },
    /// Run a local mesh on the embedded registry until Ctrl-C.
    Demo(crate::cmd::demo::DemoArgs),
    /// Failover drills: run or validate a scenario (`scenarios/*.yaml`).
    Drill {
        /// What to do.
        #[command(subcommand)]
        command: crate::cmd::drill::DrillCommand,
    },
}
