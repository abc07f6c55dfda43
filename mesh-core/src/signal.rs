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
