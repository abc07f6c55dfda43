//! `fedmesh-agent`: parse flags, build the agent, drain on SIGTERM or SIGINT.

use clap::Parser;
use mesh_agent::config::{Args, Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match Config::from_args(&Args::parse()) {
        Ok(c) => c,
        Err(errs) => return mesh_core::flag::usage_exit("fedmesh-agent", &errs),
    };
    mesh_core::log::init("info", cfg.log_json);
    let rt = match mesh_node::runtime::build(cfg.threads, "agent") {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let bound = mesh_agent::app::build(&cfg).await?;
        // Caught before "started" is said: a SIGTERM sent on that word drains.
        let signals = mesh_core::signal::listen()?;
        tracing::info!(cluster = %cfg.cluster, service = %cfg.service, locality = %cfg.locality,
            app = %cfg.app, federation = %cfg.federation, "agent started");
        let sig = signals.wait().await;
        tracing::info!(?sig, "agent draining");
        let forced = bound.drain().await;
        tracing::info!(forced, "agent stopped");
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
