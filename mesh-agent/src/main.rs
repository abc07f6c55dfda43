//! `fedmesh-agent`: parse flags, log, run until SIGTERM or SIGINT.

use clap::Parser;
use mesh_agent::config::{Args, Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match Config::from_args(&Args::parse()) {
        Ok(c) => c,
        Err(errs) => return mesh_core::flag::usage_exit("fedmesh-agent", &errs),
    };
    mesh_core::log::init("info", cfg.log_json);
    tracing::info!(cluster = %cfg.cluster, service = %cfg.service, locality = %cfg.locality, app = %cfg.app,
        federation = %cfg.federation, "agent started (configuration only: the data plane is not built yet)");
    mesh_core::signal::block_until_shutdown("agent")
}
