//! `--proxy-protocol-from`: the gateway behind an L4 relay or load balancer
//! that sends a PROXY protocol v2 header. From a trusted network the header
//! is mandatory and its source address stands for the client (access log,
//! `source_cluster`); from anywhere else no header is read, and one sent is
//! just not TLS.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_core::proxy_protocol::{encode_v2, encode_v2_local, SIGNATURE};
use mesh_test::process::{Proc, Stream};
use mesh_test::tcp::Echo;
use mesh_test::tls::{TestCa, TlsEcho};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-gateway");
mod support;
use support::{metrics, rejections, start, PATIENCE, SNI};
/// The client the relay in front of the gateway speaks for.
const CLIENT: &str = "198.51.100.7:40000";

fn connections(m: &str, service: &str, source_cluster: &str) -> u64 {
    let key = format!(
        "fedmesh_gateway_connections_total{{service=\"{service}\",source_cluster=\"{source_cluster}\",destination_cluster=\"c1\"}} "
    );
    m.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn header(src: &str, gw: SocketAddr) -> Vec<u8> {
    encode_v2(src.parse().unwrap(), gw)
}

fn hello() -> Vec<u8> {
    mesh_test::tls::client_hello(SNI)
}

/// Sends `bytes` and half-closes, then reads until the gateway closes: what
/// came back (nothing, for a refusal).
async fn refused_bytes(gw: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    support::refused_bytes_with(gw, bytes, true).await
}

/// Sends `prefix` and a ClientHello through a gateway routing to an echo
/// server: `(the hello sent, the echo of what reached the endpoint)`.
async fn routed(gw: SocketAddr, prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut s = TcpStream::connect(gw).await.unwrap();
    let h = hello();
    s.write_all(&[prefix, &h].concat()).await.unwrap();
    let mut back = vec![0u8; h.len()];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut back))
        .await
        .expect("the endpoint answers")
        .expect("routed");
    (h, back)
}

async fn register_cluster(
    reg: &mut RegistrationClient<tonic::transport::Channel>,
    name: &str,
    gateways: &[&str],
) {
    reg.register_cluster(api::RegisterClusterRequest {
        cluster: Some(api::ClusterInfo {
            name: name.into(),
            locality: Some(api::Locality {
                region: format!("{name}-region"),
                zone: format!("{name}-zone"),
            }),
            network: name.into(),
            gateway_addresses: gateways.iter().map(|g| g.to_string()).collect(),
            trust_domain: "cluster.local".into(),
            allow_local_endpoints: true,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

/// (a) A trusted relay's header names the client: mTLS works end to end
/// after it, and the connection is attributed to the cluster owning the
/// client's address (here c2's gateway), not to the relay (`unknown`).
#[tokio::test]
async fn trusted_header_source_is_the_client_and_names_its_cluster() {
    let ca = TestCa::new();
    let backend_leaf = ca.issue(
        &["reviews.default.svc.cluster.local"],
        Some("spiffe://cluster.local/ns/default/sa/reviews"),
    );
    let backend = TlsEcho::start(ca.server_config(&backend_leaf)).await;
    let fed = support::federation().await;
    let mut reg = RegistrationClient::new(support::admin(&fed).await);
    register_cluster(&mut reg, "c1", &[]).await;
    // The client's address is c2's gateway.
    register_cluster(&mut reg, "c2", &["198.51.100.7:15443"]).await;
    reg.register_endpoint(api::RegisterEndpointRequest {
        endpoint: Some(api::Endpoint {
            id: "r1".into(),
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            cluster: "c1".into(),
            address: backend.addr.ip().to_string(),
            ports: vec![api::Port {
                name: "tls".into(),
                number: u32::from(backend.addr.port()),
                protocol: "tcp".into(),
                ..Default::default()
            }],
            locality: Some(api::Locality {
                region: "c1-region".into(),
                zone: "c1-zone".into(),
            }),
            health: api::Health::Healthy as i32,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    reg.set_export(api::SetExportRequest {
        service: Some(api::ServiceKey {
            namespace: "default".into(),
            name: "reviews".into(),
        }),
        cluster: "c1".into(),
        exported: true,
    })
    .await
    .unwrap();
    let gw = support::start_fed(&fed, &["--proxy-protocol-from", "127.0.0.1/32"]).await;
    let sni = format!(
        "outbound_.{}_._.reviews.default.svc.cluster.local",
        backend.addr.port()
    );
    let client_ip = CLIENT.parse::<SocketAddr>().unwrap().ip();
    mesh_test::assert_eventually!(
        gw.routes.load().route(&sni).is_ok()
            && gw.routes.load().peer(client_ip).map(|c| c.as_str()) == Some("c2"),
        PATIENCE
    );

    let client_leaf = ca.issue(
        &["ratings.default.svc.cluster.local"],
        Some("spiffe://cluster.local/ns/default/sa/ratings"),
    );
    let connector = tokio_rustls::TlsConnector::from(
        ca.client_config(&client_leaf, "reviews.default.svc.cluster.local"),
    );
    let mtls = |prefix: Vec<u8>| {
        let connector = connector.clone();
        let sni = sni.clone();
        let addr = gw.addr;
        async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(&prefix).await.unwrap();
            let mut tls = connector
                .connect(sni.try_into().unwrap(), tcp)
                .await
                .expect("mTLS through the gateway after the PROXY header");
            tls.write_all(b"hello via a relay").await.unwrap();
            let mut buf = [0u8; 17];
            tls.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hello via a relay");
        }
    };
    mtls(header(CLIENT, gw.addr)).await;
    // The backend saw the client's own handshake: the header stopped at the gateway.
    assert_eq!(
        backend.seen.lock().unwrap()[0].1,
        client_leaf.chain[0].to_vec()
    );
    mesh_test::assert_eventually!(
        connections(&metrics(&gw).await, "default/reviews", "c2") == 1,
        PATIENCE
    );
    // A source no cluster owns, and a LOCAL header (the TCP peer stays): unknown.
    mtls(header("203.0.113.9:1234", gw.addr)).await;
    mtls(encode_v2_local()).await;
    mesh_test::assert_eventually!(
        connections(&metrics(&gw).await, "default/reviews", "unknown") == 2,
        PATIENCE
    );
    let m = metrics(&gw).await;
    assert_eq!(connections(&m, "default/reviews", "c2"), 1, "{m}");
    assert_eq!(rejections(&m, "proxy_protocol"), 0, "{m}");
    gw.kill().await;
    fed.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// (b) A trusted source must send the header: a bare ClientHello, or a
/// version 1 (text) header, is refused, silently, as `proxy_protocol`.
#[tokio::test]
async fn trusted_source_without_a_v2_header_is_refused() {
    let echo = Echo::start(b"").await;
    let gw = start(&[
        "--route",
        &format!("{SNI}={}", echo.addr),
        "--proxy-protocol-from",
        "127.0.0.0/8",
    ])
    .await;
    assert!(refused_bytes(gw.addr, &hello()).await.is_empty());
    assert_eq!(rejections(&metrics(&gw).await, "proxy_protocol"), 1);
    let v1 = [
        &b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 15443\r\n"[..],
        &hello(),
    ]
    .concat();
    assert!(refused_bytes(gw.addr, &v1).await.is_empty());
    let m = metrics(&gw).await;
    assert_eq!(rejections(&m, "proxy_protocol"), 2, "{m}");
    assert_eq!(rejections(&m, "not_tls"), 0, "{m}");
}

/// (c) Garbage and truncated headers are refused, without a panic, and the
/// gateway serves the next good connection; the header never reaches the
/// endpoint. One deadline covers the header and the hello.
#[tokio::test]
async fn bad_headers_are_refused_and_the_next_connection_works() {
    let echo = Echo::start(b"").await;
    let gw = start(&[
        "--route",
        &format!("{SNI}={}", echo.addr),
        "--proxy-protocol-from",
        "127.0.0.1/32",
        "--handshake-timeout",
        "1s",
    ])
    .await;
    let good = header(CLIENT, gw.addr);
    let with_hello = |mut h: Vec<u8>| {
        h.extend_from_slice(&hello());
        h
    };
    let mut bad_version = good.clone();
    bad_version[12] = 0x11;
    let mut bad_command = good.clone();
    bad_command[12] = 0x2f;
    let mut bad_family = good.clone();
    bad_family[13] = 0x51;
    let mut too_long = good.clone();
    too_long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let mut too_short = good.clone();
    too_short[14..16].copy_from_slice(&4u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\xff garbage, not a header".to_vec()),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n".to_vec()),
        ("version", with_hello(bad_version)),
        ("command", with_hello(bad_command)),
        ("family", with_hello(bad_family)),
        ("too long", with_hello(too_long)),
        ("too short for TCP4", with_hello(too_short)),
        // Cut short, then the client closes.
        ("truncated fixed part", SIGNATURE[..7].to_vec()),
        ("truncated addresses", good[..20].to_vec()),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let got = refused_bytes(gw.addr, bytes).await;
        assert!(
            got.is_empty(),
            "{what}: the gateway sent {} bytes",
            got.len()
        );
        mesh_test::assert_eventually!(
            rejections(&metrics(&gw).await, "proxy_protocol") == i as u64 + 1,
            PATIENCE
        );
        // Still serving: the endpoint gets the hello, not the header.
        let (sent, reached) = routed(gw.addr, &good).await;
        assert_eq!(reached, sent, "after {what}");
    }

    // Connected and closed without a byte (a TCP health check): client_closed.
    drop(TcpStream::connect(gw.addr).await.unwrap());
    mesh_test::assert_eventually!(
        rejections(&metrics(&gw).await, "client_closed") == 1,
        PATIENCE
    );

    // One deadline: a header at 0.6 s and a hello at 1.2 s miss the 1 s
    // handshake timeout, though each alone would be in time.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(&good).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = s.write_all(&hello()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(out.is_empty());
    mesh_test::assert_eventually!(
        rejections(&metrics(&gw).await, "handshake_timeout") == 1,
        PATIENCE
    );
    let m = metrics(&gw).await;
    assert_eq!(rejections(&m, "proxy_protocol"), cases.len() as u64, "{m}");
}

/// (d) An untrusted peer is never parsed for a header: one it sends is not
/// TLS, as before, while its plain TLS connections work.
#[tokio::test]
async fn untrusted_source_header_is_not_tls() {
    let echo = Echo::start(b"").await;
    let gw = start(&[
        "--route",
        &format!("{SNI}={}", echo.addr),
        "--proxy-protocol-from",
        "10.0.0.0/8",
    ])
    .await;
    let h = header(CLIENT, gw.addr);
    assert!(refused_bytes(gw.addr, &[h, hello()].concat())
        .await
        .is_empty());
    let (sent, reached) = routed(gw.addr, b"").await;
    assert_eq!(reached, sent);
    let m = metrics(&gw).await;
    assert_eq!(rejections(&m, "not_tls"), 1, "{m}");
    assert_eq!(rejections(&m, "proxy_protocol"), 0, "{m}");
    assert_eq!(connections(&m, SNI, "unknown"), 1, "{m}");
}

/// What a user sees: the binary's access log names the client from the
/// header as `source`, and the relay as `via`.
#[tokio::test]
async fn access_log_names_the_proxied_client() {
    let echo = Echo::start(b"").await;
    let route = format!("{SNI}={}", echo.addr);
    let mut p = Proc::spawn(
        BIN,
        &[
            "--cluster",
            "c1",
            "--listen",
            "127.0.0.1:0",
            "--route",
            &route,
            "--threads",
            "1",
            "--proxy-protocol-from",
            "127.0.0.1",
        ],
    );
    let line = p.wait_for_line("gateway listening on", Duration::from_secs(20));
    let addr: SocketAddr = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let mut s = TcpStream::connect(addr).await.unwrap();
    let relay = s.local_addr().unwrap();
    let h = hello();
    s.write_all(&[header(CLIENT, addr), h.clone()].concat())
        .await
        .unwrap();
    let mut back = vec![0u8; h.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, h, "the endpoint got the hello without the header");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    // And one without the header.
    let refused_from = {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let local = s.local_addr().unwrap();
        s.write_all(&h).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        local
    };

    let json = |needle: &str, p: &mut Proc| -> serde_json::Value {
        let l = p.wait_for_line(needle, PATIENCE);
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("access log line is JSON ({e}): {l}"))
    };
    let routed = json(&format!("\"source\":\"{CLIENT}\""), &mut p);
    assert_eq!(routed["via"], relay.to_string());
    assert_eq!(routed["rejected"], false);
    assert_eq!(routed["close"], "done");
    assert_eq!(routed["sni"], SNI);
    let refused = json(&format!("\"source\":\"{refused_from}\""), &mut p);
    assert_eq!(refused["close"], "proxy_protocol");
    assert_eq!(refused["rejected"], true);
    assert!(refused["via"].is_null());

    p.signal("TERM");
    let st = tokio::task::spawn_blocking(move || {
        let st = p.wait_exit(Duration::from_secs(15));
        (st, p)
    })
    .await
    .unwrap();
    assert!(st.0.success(), "{:?}\n{}", st.0, st.1.output());
    assert!(st
        .1
        .seen
        .iter()
        .all(|(s, l)| *s == Stream::Stderr || !l.contains("panicked")));
}
