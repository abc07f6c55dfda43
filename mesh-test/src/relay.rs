//! [`TcpRelay`]: a loopback TCP relay in front of a real server, which a test
//! can cut (close every relayed connection and refuse new ones), black-hole
//! (keep connections open and let nothing through) and restore.
//! It puts a partition between two real processes without touching either.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{copy_bidirectional, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A relay from a loopback port to `target`. Stops when dropped.
pub struct TcpRelay {
    addr: SocketAddr,
    /// [`PASS`], [`CUT`] or [`BLACKHOLE`]. Connection tasks watch it.
    state: Arc<watch::Sender<u8>>,
    task: tokio::task::JoinHandle<()>,
}

const PASS: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;

/// Reads and drops whatever comes, until the relay passes again or cuts.
async fn swallow(inbound: &mut TcpStream, rx: &mut watch::Receiver<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            r = inbound.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
            _ = rx.wait_for(|s| *s == CUT) => return,
        }
    }
}

impl TcpRelay {
    /// Listens on `127.0.0.1:0` and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, _) = watch::channel(PASS);
        let state = Arc::new(tx);
        let state2 = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let now = *state2.borrow();
                if now == CUT {
                    drop(inbound); // partitioned: connection closed at once
                    continue;
                }
                let mut rx = state2.subscribe();
                tokio::spawn(async move {
                    if now == BLACKHOLE {
                        // Accepted, then silence: nothing reaches the target.
                        swallow(&mut inbound, &mut rx).await;
                        return;
                    }
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let blackholed = tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => false,
                        r = rx.wait_for(|s| *s != PASS) => r.is_ok_and(|s| *s == BLACKHOLE),
                    };
                    if blackholed {
                        drop(outbound);
                        swallow(&mut inbound, &mut rx).await;
                    }
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The relay's own address: point the client here.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.state.send_replace(CUT);
    }

    /// Black-holes: connections stay open (new ones are accepted) but
    /// nothing goes through, either way, and nothing is closed: a link
    /// whose packets vanish.
    pub fn blackhole(&self) {
        self.state.send_replace(BLACKHOLE);
    }

    /// Relays again.
    pub fn restore(&self) {
        self.state.send_replace(PASS);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.state.send_replace(CUT);
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
