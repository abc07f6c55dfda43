//! Process signals: the one place binaries learn that they should stop.

/// Why the process is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SIGTERM: drain gracefully.
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// SIGTERM and SIGINT, caught from the moment [`listen`] returns: a binary
/// that says it is ready only after listening never dies of a signal sent
/// on that word.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// Installs the handlers for SIGTERM and SIGINT now.
///
/// Fails only if they cannot be installed, which happens at startup;
/// callers should treat that as fatal.
pub fn listen() -> std::io::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok(Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
    })
}

impl Signals {
    /// Completes on the first SIGTERM or SIGINT since [`listen`].
    pub async fn wait(mut self) -> Shutdown {
        tokio::select! {
            _ = self.term.recv() => Shutdown::Terminate,
            _ = self.int.recv() => Shutdown::Interrupt,
        }
    }
}

/// Completes on the first SIGTERM or SIGINT (from the call on).
///
/// Fails only if the signal handlers cannot be installed, which happens at
/// startup; callers should treat that as fatal.
pub async fn shutdown() -> std::io::Result<Shutdown> {
    Ok(listen()?.wait().await)
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
