//! Process signals: the one place binaries learn that they should stop.

/// Why the process is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SIGTERM: drain gracefully.
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// Completes on the first SIGTERM or SIGINT.
///
/// Fails only if the signal handlers cannot be installed, which happens at
/// startup; callers should treat that as fatal.
pub async fn shutdown() -> std::io::Result<Shutdown> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => Shutdown::Terminate,
        _ = int.recv() => Shutdown::Interrupt,
    })
}

/// Blocks until SIGTERM or SIGINT on a small runtime of its own, for binaries
/// that have nothing else to run yet. Exit 0 on a signal, 1 if the handlers
/// cannot be installed.
pub fn block_until_shutdown(component: &str) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("{component}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(shutdown()) {
        Ok(sig) => {
            tracing::info!(?sig, "{component} stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{component}: cannot install signal handlers: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
