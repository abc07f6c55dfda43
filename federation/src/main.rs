//! `fedmesh-federation`: parse flags, build the replica, run until SIGTERM or SIGINT.

use clap::Parser;
use federation::config::{Args, Config};
use std::process::ExitCode;
use std::time::Duration;

/// How long in-flight calls may run after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::from_args(&args) {
        Ok(c) => c,
        Err(errs) => return mesh_core::flag::usage_exit("fedmesh-federation", &errs),
    };
    mesh_core::log::init("info", cfg.log_json);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fedmesh-federation: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let bound = federation::app::build(&cfg).await?;
    let signals = mesh_core::signal::listen()?;
    tracing::info!(addr = %bound.addr, registry = ?cfg.registry, "listening on {}", bound.addr);
    let sig = signals.wait().await;
    tracing::info!(?sig, "shutting down");
    bound.shutdown(SHUTDOWN_GRACE).await
}
