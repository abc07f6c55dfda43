//! `fedmesh-gateway`: parse flags, build the gateway, drain on SIGTERM.
//!
//! The data plane runs on a runtime of `--threads` workers; the admin
//! listener and the federation client on a one-thread runtime of their own,
//! so control-plane work never competes with splicing for a worker.

use clap::Parser;
use gateway::config::{Args, Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match Config::from_args(&Args::parse()) {
        Ok(c) => c,
        Err(errs) => return mesh_core::flag::usage_exit("fedmesh-gateway", &errs),
    };
    mesh_core::log::init("info", cfg.log_json);
    let control = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the control runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let data = match mesh_node::runtime::build(cfg.threads, "data") {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the data-plane runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = control.handle().clone();
    let result = data.block_on(async move {
        let bound = gateway::app::build(&cfg, &handle).await?;
        let signals = mesh_core::signal::listen()?;
        tracing::info!(cluster = %cfg.cluster, listen = %bound.addr, admin = ?bound.admin, federation = ?cfg.federation,
            static_routes = cfg.routes.len(), threads = cfg.threads, "gateway listening on {}", bound.addr);
        let sig = signals.wait().await;
        tracing::info!(?sig, "gateway draining");
        let forced = bound.drain().await;
        tracing::info!(forced, "gateway stopped");
        anyhow::Ok(())
    });
    drop(control);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
