//! Shared test support: echo and sink servers on loopback, a relay in
//! front of them, timing helpers.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wan_relay::{Impairment, LinkOptions, LinkSpec, Relay, RelayConfig};

/// Fails the test if `f` takes longer than `secs`.
pub async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test took more than {secs} s"))
}

/// A TCP echo server on loopback: writes back what it reads, and closes
/// its side after the client's EOF.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A server that accepts and holds connections, never reading.
pub async fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// A relay with one link per `(name, target)`, listening on loopback port 0.
pub async fn relay(links: &[(&str, SocketAddr)], options: LinkOptions) -> Relay {
    relay_with(links, options, Impairment::default(), false).await
}

/// Like [`relay`], with an initial impairment and optionally the control API.
pub async fn relay_with(
    links: &[(&str, SocketAddr)],
    options: LinkOptions,
    impairment: Impairment,
    control: bool,
) -> Relay {
    let links = links
        .iter()
        .map(|(n, t)| LinkSpec::new(n, "127.0.0.1:0".parse().unwrap(), *t).unwrap())
        .collect();
    Relay::start_with(RelayConfig {
        links,
        control: control.then(|| "127.0.0.1:0".parse().unwrap()),
        options,
        impairment,
    })
    .await
    .unwrap()
}

/// Connects to a link.
pub async fn connect(relay: &Relay, link: &str) -> TcpStream {
    let s = TcpStream::connect(relay.link(link).unwrap().addr())
        .await
        .unwrap();
    // The relay may already have reset it (an unreachable target): the
    // test reads that; the option cannot be set on a reset socket.
    let _ = s.set_nodelay(true);
    s
}

/// Sends `msg` and waits for its echo; the round-trip time.
pub async fn rtt(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let start = Instant::now();
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
    start.elapsed()
}

/// Whether the stream is closed or reset: a read returns EOF or an error
/// within `secs` (writing `probe` first, if given; a write error counts).
pub async fn is_closed(s: &mut TcpStream, probe: &[u8], secs: u64) -> bool {
    if !probe.is_empty() && s.write_all(probe).await.is_err() {
        return true;
    }
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Bytes still on their way from before: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

/// Whether nothing at all (no bytes, no EOF, no error) arrives within `ms`.
pub async fn silent_for(s: &mut TcpStream, ms: u64) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_millis(ms), s.read(&mut buf))
        .await
        .is_err()
}
