//! [`TcpRelay`]: a loopback TCP relay in front of a real server, which a test
//! can cut (close every relayed connection and refuse new ones) and restore.
//! It puts a partition between two real processes without touching either.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A relay from a loopback port to `target`. Stops when dropped.
pub struct TcpRelay {
    addr: SocketAddr,
    /// `true` while cut. Connection tasks watch it and close when it flips.
    cut: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpRelay {
    /// Listens on `127.0.0.1:0` and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, _) = watch::channel(false);
        let cut = Arc::new(tx);
        let cut2 = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *cut2.borrow() {
                    drop(inbound); // partitioned: connection closed at once
                    continue;
                }
                let mut rx = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Ok(Self { addr, cut, task })
    }

    /// The relay's own address: point the client here.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Relays again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.task.abort();
    }
}

/// A loopback TCP balancer in front of several servers, as a Kubernetes
/// Service is: each new connection goes to the next target (round robin)
/// that accepts it; a target that refuses is skipped. Stops when dropped.
pub struct Balancer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Listens on `127.0.0.1:0` and spreads connections over `targets`.
    pub async fn start(targets: Vec<SocketAddr>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let targets = Arc::new(targets);
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let first = next;
                next = next.wrapping_add(1);
                let targets = targets.clone();
                tokio::spawn(async move {
                    for i in 0..targets.len() {
                        let t = targets[(first + i) % targets.len()];
                        if let Ok(mut outbound) = TcpStream::connect(t).await {
                            let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// The balancer's address: point clients here.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
