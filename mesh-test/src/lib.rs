//! Test support for fedmesh: a real etcd on loopback, a TCP relay that can be
//! cut to simulate a partition, free ports and quiet logging.
//!
//! Nothing here is a fake of a named part: [`etcd::EtcdFixture`] runs the real
//! `etcd` binary.

pub mod etcd;
pub mod relay;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// A loopback port nobody listens on right now (the OS picks it).
///
/// Only for programs that must be told a port before they bind (etcd); our
/// own servers bind `127.0.0.1:0` and report the address they got.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    l.local_addr().expect("local addr").port()
}

/// Installs a test subscriber once: quiet unless `RUST_LOG` says otherwise.
pub fn trace_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `cond` every 20 ms until it is true or `patience` runs out.
/// Returns whether it became true.
pub async fn eventually<F, Fut>(patience: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that an async condition becomes true within `patience` (default 10 s).
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr) => {
        $crate::assert_eventually!($cond, std::time::Duration::from_secs(10))
    };
    ($cond:expr, $patience:expr) => {
        assert!(
            $crate::eventually($patience, || async { $cond }).await,
            "condition did not become true within {:?}: {}",
            $patience,
            stringify!($cond)
        )
    };
}

/// Is something accepting TCP connections on `addr`?
pub fn is_listening(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
