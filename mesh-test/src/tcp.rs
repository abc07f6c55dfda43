//! Plain TCP test servers.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A TCP server that echoes every byte; when the client half-closes it
/// writes `trailer` and closes. Stops when dropped.
pub struct Echo {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    /// Starts an echo server that ends each connection with `trailer`.
    pub async fn start(trailer: &'static [u8]) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => {
                                let _ = s.write_all(trailer).await;
                                let _ = s.shutdown().await;
                                return;
                            }
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address where nothing listens (a port just released).
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::free_port()))
}
