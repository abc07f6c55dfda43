//! Per-link connection options on loopback: `proxy-v2` (a PROXY protocol v2
//! header before the client's bytes) and `from=IP` (the source address the
//! target sees). 127.0.0.0/8 is all local on Linux, so 127.0.0.2 can be bound.

// Test code: a panic is a failure with a location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mesh_core::proxy_protocol::{read_v2, Header, DEFAULT_MAX_LEN};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use wan_relay::control::Client;
use wan_relay::{Change, LinkOptions, LinkSpec, Relay, RelayConfig};

/// What a target saw on its first connection.
struct Seen {
    peer: SocketAddr,
    /// The header, if the target expected one.
    header: Option<Header>,
    /// When the header was read.
    header_at: Option<Instant>,
    /// Every byte after the header, up to the client's EOF.
    rest: Vec<u8>,
    /// When the first byte after the header arrived.
    rest_at: Option<Instant>,
}

/// A plain TCP listener that takes one connection, reads a PROXY header
/// first if `expect_header`, then everything up to EOF.
async fn target(expect_header: bool) -> (SocketAddr, oneshot::Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, peer) = l.accept().await.unwrap();
        let (header, header_at) = if expect_header {
            let h = read_v2(&mut s, DEFAULT_MAX_LEN).await.unwrap();
            (Some(h), Some(Instant::now()))
        } else {
            (None, None)
        };
        let mut rest = Vec::new();
        let mut rest_at = None;
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            rest_at.get_or_insert_with(Instant::now);
            rest.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(Seen {
            peer,
            header,
            header_at,
            rest,
            rest_at,
        });
    });
    (addr, rx)
}

async fn start(spec: &str, control: bool) -> Relay {
    Relay::start_with(RelayConfig {
        links: vec![spec.parse().unwrap()],
        control: control.then(|| "127.0.0.1:0".parse().unwrap()),
        ..RelayConfig::default()
    })
    .await
    .unwrap()
}

/// Connects to link `name`, sends `payload`, half-closes; the client's
/// local address.
async fn send(relay: &Relay, name: &str, payload: &[u8]) -> (TcpStream, SocketAddr) {
    let mut s = connect(relay, name).await;
    let local = s.local_addr().unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    (s, local)
}

const PAYLOAD: &[u8] = b"\x16\x03\x01 a ClientHello, say, and more";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_header_names_the_client_then_its_bytes_follow_unchanged() {
    within(30, async {
        let (addr, seen) = target(true).await;
        let relay = start(&format!("p=127.0.0.1:0->{addr},proxy-v2"), true).await;
        let link = relay.link("p").unwrap();
        assert!(link.proxy_protocol());
        let (_s, client) = send(&relay, "p", PAYLOAD).await;
        let seen = seen.await.unwrap();
        let h = seen.header.unwrap();
        assert_eq!(h.source, Some(client), "the client's own address");
        assert_eq!(
            h.destination,
            Some(link.addr()),
            "the link's listen address"
        );
        assert_eq!(seen.rest, PAYLOAD);
        // Only the client's bytes are counted.
        mesh_test::assert_eventually!(
            link.counters().bytes_to_target == PAYLOAD.len() as u64,
            Duration::from_secs(10)
        );

        // The control API shows the options.
        let ctl = Client::new(relay.control_addr().unwrap());
        let st = ctl.get("p").await.unwrap();
        assert!(st.proxy_protocol);
        assert_eq!(st.source, None);
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["proxy_protocol"], true);
        assert!(json["source"].is_null(), "{json}");
        relay.shutdown().await;
    })
    .await;
}

/// The header is written at once, not delayed with the client's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_is_not_impaired() {
    within(30, async {
        let (addr, seen) = target(true).await;
        let relay = start(&format!("p=127.0.0.1:0->{addr},proxy-v2"), false).await;
        let delay = Duration::from_millis(1500);
        relay
            .link("p")
            .unwrap()
            .set(&Change::new().delay(delay))
            .unwrap();
        let t0 = Instant::now();
        let (_s, client) = send(&relay, "p", PAYLOAD).await;
        let seen = seen.await.unwrap();
        assert_eq!(seen.header.unwrap().source, Some(client));
        assert_eq!(seen.rest, PAYLOAD);
        let header_after = seen.header_at.unwrap() - t0;
        let bytes_after = seen.rest_at.unwrap() - t0;
        assert!(bytes_after >= delay, "client bytes after {bytes_after:?}");
        assert!(
            header_after < delay,
            "the header took {header_after:?}, as long as the {delay:?} delay"
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_sets_the_source_address_the_target_sees() {
    within(30, async {
        let (addr, seen) = target(false).await;
        let relay = start(&format!("f=127.0.0.1:0->{addr},from=127.0.0.2"), true).await;
        let link = relay.link("f").unwrap();
        assert_eq!(link.source(), Some(IpAddr::from([127, 0, 0, 2])));
        assert!(!link.proxy_protocol());
        let _s = send(&relay, "f", PAYLOAD).await;
        let seen = seen.await.unwrap();
        assert_eq!(seen.peer.ip(), IpAddr::from([127, 0, 0, 2]));
        assert_eq!(seen.rest, PAYLOAD, "no header without proxy-v2");
        let st = Client::new(relay.control_addr().unwrap())
            .get("f")
            .await
            .unwrap();
        assert_eq!(st.source, Some(IpAddr::from([127, 0, 0, 2])));
        assert!(!st.proxy_protocol);
        assert_eq!(serde_json::to_value(&st).unwrap()["source"], "127.0.0.2");
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_and_proxy_v2_together() {
    within(30, async {
        let (addr, seen) = target(true).await;
        let relay = start(
            &format!("fp=127.0.0.1:0->{addr},proxy-v2,from=127.0.0.3"),
            false,
        )
        .await;
        assert_eq!(
            relay.link("fp").unwrap().status().source,
            Some(IpAddr::from([127, 0, 0, 3]))
        );
        let (_s, client) = send(&relay, "fp", PAYLOAD).await;
        let seen = seen.await.unwrap();
        assert_eq!(seen.peer.ip(), IpAddr::from([127, 0, 0, 3]));
        assert_eq!(seen.header.unwrap().source, Some(client));
        assert_eq!(seen.rest, PAYLOAD);
        relay.shutdown().await;
    })
    .await;
}

/// Without options a link is what it always was: no header, the system's
/// source address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_options_nothing_changes() {
    within(30, async {
        let (addr, seen) = target(false).await;
        let relay = start(&format!("plain=127.0.0.1:0->{addr}"), false).await;
        let link = relay.link("plain").unwrap();
        assert_eq!(link.source(), None);
        assert!(!link.proxy_protocol());
        let _s = send(&relay, "plain", PAYLOAD).await;
        let seen = seen.await.unwrap();
        assert_eq!(seen.peer.ip(), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(seen.rest, PAYLOAD, "the first byte is the client's");
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_be_bound_fails_the_start() {
    within(30, async {
        let echo = echo_server().await;
        // TEST-NET-1: not an address of this host.
        let e = Relay::start_with(RelayConfig {
            links: vec![format!("x=127.0.0.1:0->{echo},from=192.0.2.1")
                .parse()
                .unwrap()],
            ..RelayConfig::default()
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("link x: cannot bind from=192.0.2.1"), "{e}");
        // A source of the other family, given through the builder.
        let spec = LinkSpec::new("y", "127.0.0.1:0".parse().unwrap(), echo)
            .unwrap()
            .with_source("::1".parse().unwrap());
        let e = wan_relay::Link::bind(&spec, LinkOptions::default(), Default::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("from=::1 is IPv6"), "{e}");
    })
    .await;
}
