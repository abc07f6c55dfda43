//! `fedmesh-gateway`: parse flags, log, run until SIGTERM or SIGINT.

use clap::Parser;
use gateway::config::{Args, Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match Config::from_args(&Args::parse()) {
        Ok(c) => c,
        Err(errs) => return mesh_core::flag::usage_exit("fedmesh-gateway", &errs),
    };
    mesh_core::log::init("info", cfg.log_json);
    tracing::info!(cluster = %cfg.cluster, listen = %cfg.listen, federation = %cfg.federation,
        "gateway started (configuration only: the SNI data path is not built yet)");
    mesh_core::signal::block_until_shutdown("gateway")
}
