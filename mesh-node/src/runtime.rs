//! The data plane's tokio runtime, as `--threads` asks for it.

/// One thread: a current-thread runtime, an event loop with no
/// work-stealing bookkeeping on every wake-up (measured in
/// benches/sni-passthrough.sh and benches/mesh-mtls.sh); more: a
/// multi-threaded runtime of that many workers, named `name`.
pub fn build(threads: usize, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()
    }
}
