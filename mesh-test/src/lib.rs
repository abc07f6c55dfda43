//! Test support for fedmesh: a real etcd on loopback, a TCP relay that can be
//! cut to simulate a partition, free ports and quiet logging.
//!
//! Nothing here is a fake of a named part: [`etcd::EtcdFixture`] runs the real
//! `etcd` binary. The one exception says so: [`kube::KubeApi`] is a test
//! double of the Kubernetes API server's TokenReview endpoint, speaking its
//! wire format (no API server can run here).

pub mod dns;
pub mod etcd;
pub mod http;
pub mod kube;
pub mod otlp;
pub mod process;
pub mod relay;
pub mod tcp;
pub mod tls;

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

/// Asserts that a condition (which may `.await`) becomes true within
/// `patience` (default 10 s), polling every 20 ms. Use sparingly: prefer
/// waiting on the event itself.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr) => {
        $crate::assert_eventually!($cond, std::time::Duration::from_secs(10))
    };
    ($cond:expr, $patience:expr) => {{
        let patience: std::time::Duration = $patience;
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if $cond {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "condition did not become true within {:?}: {}",
                    patience,
                    stringify!($cond)
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

/// Is something accepting TCP connections on `addr`?
pub fn is_listening(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
