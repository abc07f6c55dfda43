//! The gateway end to end on loopback: real federation, real TLS (rustls and
//! openssl) through SNI passthrough, every refusal, timeouts, half-close,
//! retries and static stability.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_test::tcp::{dead_addr, Echo};
use mesh_test::tls::{TestCa, TlsEcho};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::{
    federation, federation_flags, metrics, rejections, start, start_fed, start_flags, PATIENCE, SNI,
};

fn endpoint(
    cluster: &str,
    svc: &str,
    id: &str,
    addr: SocketAddr,
    health: api::Health,
) -> api::Endpoint {
    api::Endpoint {
        id: id.into(),
        service: Some(api::ServiceKey {
            namespace: "default".into(),
            name: svc.into(),
        }),
        cluster: cluster.into(),
        address: addr.ip().to_string(),
        ports: vec![api::Port {
            name: "tls".into(),
            number: u32::from(addr.port()),
            protocol: "tcp".into(),
            ..Default::default()
        }],
        labels: [("version".to_string(), "v1".to_string())].into(),
        locality: Some(api::Locality {
            region: "us-east".into(),
            zone: "us-east-1a".into(),
        }),
        health: health as i32,
        identity: String::new(),
    }
}

async fn registration(
    fed: &federation::app::Bound,
) -> RegistrationClient<tonic::transport::Channel> {
    let mut reg = RegistrationClient::new(support::admin(fed).await);
    for (c, region) in [("c1", "us-east"), ("c2", "eu-west")] {
        reg.register_cluster(api::RegisterClusterRequest {
            cluster: Some(api::ClusterInfo {
                name: c.into(),
                locality: Some(api::Locality {
                    region: region.into(),
                    zone: format!("{region}-1a"),
                }),
                network: c.into(),
                gateway_addresses: vec![],
                trust_domain: "cluster.local".into(),
                allow_local_endpoints: true,
                endpoint_networks: Vec::new(),
            }),
        })
        .await
        .unwrap();
    }
    reg
}

async fn add_endpoint(
    reg: &mut RegistrationClient<tonic::transport::Channel>,
    svc: &str,
    id: &str,
    addr: SocketAddr,
    health: api::Health,
) {
    let endpoint = Some(endpoint("c1", svc, id, addr, health));
    reg.register_endpoint(api::RegisterEndpointRequest { endpoint })
        .await
        .unwrap();
}

async fn export(reg: &mut RegistrationClient<tonic::transport::Channel>, svc: &str) {
    reg.set_export(api::SetExportRequest {
        service: Some(api::ServiceKey {
            namespace: "default".into(),
            name: svc.into(),
        }),
        cluster: "c1".into(),
        exported: true,
    })
    .await
    .unwrap();
}

async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends `bytes`, then reads until the gateway closes: what came back.
async fn refused_bytes(gw: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    support::refused_bytes_with(gw, bytes, false).await
}

fn hello(name: &str) -> Vec<u8> {
    mesh_test::tls::client_hello(name)
}

/// A rustls client with a client certificate completes mTLS through the
/// gateway with a backend that requires and verifies that certificate; the
/// route comes live from the federation.
#[tokio::test]
async fn mtls_end_to_end_through_the_gateway() {
    let ca = TestCa::new();
    let backend_leaf = ca.issue(
        &["reviews.default.svc.cluster.local"],
        Some("spiffe://cluster.local/ns/default/sa/reviews"),
    );
    let backend = TlsEcho::start(ca.server_config(&backend_leaf)).await;
    let fed = federation().await;
    let mut reg = registration(&fed).await;
    add_endpoint(
        &mut reg,
        "reviews",
        "r1",
        backend.addr,
        api::Health::Healthy,
    )
    .await;
    export(&mut reg, "reviews").await;
    let gw = start_fed(&fed, &["--drain-deadline", "500ms"]).await;
    let sni = format!(
        "outbound_.{}_._.reviews.default.svc.cluster.local",
        backend.addr.port()
    );
    mesh_test::assert_eventually!(gw.routes.load().route(&sni).is_ok(), PATIENCE);
    assert_eq!(http_status(gw.admin.unwrap(), "/ready").await, 200);

    let client_leaf = ca.issue(
        &["ratings.default.svc.cluster.local"],
        Some("spiffe://cluster.local/ns/default/sa/ratings"),
    );
    let connector = tokio_rustls::TlsConnector::from(
        ca.client_config(&client_leaf, "reviews.default.svc.cluster.local"),
    );
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let mut tls = connector
        .connect(sni.clone().try_into().unwrap(), tcp)
        .await
        .expect("mTLS through the gateway");
    tls.write_all(b"hello through the gateway").await.unwrap();
    let mut buf = [0u8; 25];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello through the gateway");
    drop(tls);

    // The backend saw the SNI and the client's own certificate: TLS was end to end.
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0.as_deref(), Some(sni.as_str()));
    assert_eq!(seen[0].1, client_leaf.chain[0].to_vec());

    let m = metrics(&gw).await;
    assert!(m.contains("fedmesh_gateway_connections_total{service=\"default/reviews\",source_cluster=\"unknown\",destination_cluster=\"c1\"} 1"), "{m}");
    let up = m
        .lines()
        .find(|l| l.starts_with("fedmesh_gateway_bytes_total") && l.contains("upstream"))
        .unwrap();
    assert!(
        up.rsplit(' ').next().unwrap().parse::<u64>().unwrap() > 25,
        "{up}"
    );

    // The federation lists the gateway as a subscriber that ACKed a version.
    let mut admin = mesh_api::v1::admin_client::AdminClient::new(support::admin(&fed).await);
    mesh_test::assert_eventually!(
        {
            let st = admin
                .get_status(api::GetStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            st.subscribers.iter().any(|s| {
                s.kind == api::NodeKind::Gateway as i32
                    && s.acked_version > 0
                    && s.acked_version == s.sent_version
            })
        },
        PATIENCE
    );

    // Static stability: the federation goes away; the gateway keeps routing.
    fed.shutdown(Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let mut tls = connector
        .connect(sni.try_into().unwrap(), tcp)
        .await
        .expect("still routing without the federation");
    tls.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    tls.read_exact(&mut one).await.unwrap();
    assert_eq!(
        gw.drain().await,
        1,
        "the open connection is closed at the drain deadline"
    );
}

/// `openssl s_client` through the gateway verifies the backend's chain and completes.
#[tokio::test]
async fn openssl_s_client_through_the_gateway() {
    let ca = TestCa::new();
    let leaf = ca.issue(&["reviews.default.svc.cluster.local"], None);
    let backend = TlsEcho::start(ca.server_config(&leaf)).await;
    let gw = start(&["--route", &format!("{SNI}={}", backend.addr)]).await;
    let dir = tempfile::tempdir().unwrap();
    let client = ca.issue(
        &["client"],
        Some("spiffe://cluster.local/ns/default/sa/client"),
    );
    for (n, c) in [
        ("ca.pem", &ca.pem),
        ("client.pem", &client.cert_pem),
        ("client.key", &client.key_pem),
    ] {
        std::fs::write(dir.path().join(n), c).unwrap();
    }
    let addr = gw.addr.to_string();
    let d = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr,
                "-servername",
                SNI,
                "-verify_return_error",
                "-verify_hostname",
                "reviews.default.svc.cluster.local",
            ])
            .arg("-CAfile")
            .arg(d.join("ca.pem"))
            .arg("-cert")
            .arg(d.join("client.pem"))
            .arg("-key")
            .arg(d.join("client.key"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl (Debian openssl) runs");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"ping-through-gateway\n").unwrap();
        // s_client quits at end of input: give the echo time to come back first.
        std::thread::sleep(Duration::from_secs(1));
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ping-through-gateway"),
        "the echo came back: {stdout}"
    );
    assert_eq!(
        backend.seen.lock().unwrap()[0].1,
        client.chain[0].to_vec(),
        "the backend verified openssl's client certificate"
    );
}

/// Every refusal closes the connection without a byte and is counted by reason.
#[tokio::test]
async fn every_refusal_is_silent_and_counted() {
    let fed = federation().await;
    let mut reg = registration(&fed).await;
    let live = Echo::start(b"").await;
    add_endpoint(&mut reg, "private", "p1", live.addr, api::Health::Healthy).await;
    add_endpoint(&mut reg, "sick", "s1", live.addr, api::Health::Unhealthy).await;
    export(&mut reg, "sick").await;
    let dead = dead_addr();
    add_endpoint(&mut reg, "gone", "g1", dead, api::Health::Healthy).await;
    export(&mut reg, "gone").await;
    let gw = start_fed(
        &fed,
        &["--handshake-timeout", "300ms", "--max-client-hello", "1024"],
    )
    .await;
    mesh_test::assert_eventually!(gw.routes.load().len() == 2, PATIENCE);

    let svc =
        |name: &str, port: u16| format!("outbound_.{port}_._.{name}.default.svc.cluster.local");
    let mut too_large = vec![22, 3, 1, 0x10, 0, 1, 0, 0x20, 0];
    too_large.resize(64, 0);
    let mut server_hello = vec![22, 3, 3, 0, 4, 2, 0, 0, 0];
    server_hello.truncate(9);
    let mut malformed = hello(SNI);
    malformed[9] = 0x02; // legacy_version becomes 0x0203... then corrupt lengths
    malformed.truncate(malformed.len() - 3);
    let len = u16::try_from(malformed.len() - 5).unwrap().to_be_bytes();
    malformed[3..5].copy_from_slice(&len);
    let hs_len = u32::try_from(malformed.len() - 9).unwrap().to_be_bytes();
    malformed[6..9].copy_from_slice(&hs_len[1..]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "not_tls",
            b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n".to_vec(),
        ),
        ("not_client_hello", server_hello),
        ("malformed_hello", malformed),
        ("hello_too_large", too_large),
        (
            "no_sni",
            std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/testdata/openssl-nosni.bin"
            ))
            .unwrap(),
        ),
        ("malformed_sni", hello("www.example.com")),
        ("unknown_service", hello(&svc("ratings", 9080))),
        ("not_exported", hello(&svc("private", live.addr.port()))),
        ("no_healthy_endpoint", hello(&svc("sick", live.addr.port()))),
        ("connect_failed", hello(&svc("gone", dead.port()))),
    ];
    for (reason, bytes) in &cases {
        let before = rejections(&metrics(&gw).await, reason);
        let got = refused_bytes(gw.addr, bytes).await;
        assert!(
            got.is_empty(),
            "{reason}: the gateway sent {} bytes",
            got.len()
        );
        let after = rejections(&metrics(&gw).await, reason);
        assert_eq!(after, before + 1, "{reason} is counted");
    }

    // Slowloris: a hello trickled too slowly is cut at the handshake deadline.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&[22, 3, 1]).await.unwrap();
    let mut out = Vec::new();
    let t = tokio::time::Instant::now();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.is_empty());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(rejections(&metrics(&gw).await, "handshake_timeout"), 1);

    // A client that gives up mid-hello.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&hello(SNI)[..20]).await.unwrap();
    drop(s);
    mesh_test::assert_eventually!(
        rejections(&metrics(&gw).await, "client_closed") == 1,
        PATIENCE
    );
}

#[tokio::test]
async fn connection_and_rate_limits() {
    let echo = Echo::start(b"").await;
    let gw = start(&[
        "--route",
        &format!("{SNI}={}", echo.addr),
        "--max-connections",
        "1",
        "--handshake-timeout",
        "5s",
    ])
    .await;
    // One connection held mid-handshake takes the only slot.
    let mut held = TcpStream::connect(gw.addr).await.unwrap();
    held.write_all(&[22]).await.unwrap();
    mesh_test::assert_eventually!(gw.open_connections() == 1, PATIENCE);
    assert!(refused_bytes(gw.addr, &hello(SNI)).await.is_empty());
    assert_eq!(rejections(&metrics(&gw).await, "connection_limit"), 1);
    drop(held);

    let gw2 = start(&[
        "--route",
        &format!("{SNI}={}", echo.addr),
        "--rate-limit-per-source",
        "1",
    ])
    .await;
    let mut refused = 0;
    for _ in 0..8 {
        let mut s = TcpStream::connect(gw2.addr).await.unwrap();
        s.write_all(&hello(SNI)).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
            .await
            .unwrap();
        if out.is_empty() {
            refused += 1;
        }
    }
    assert!(
        refused >= 5,
        "a 1/s limit refuses most of 8 quick connections, refused {refused}"
    );
    assert_eq!(rejections(&metrics(&gw2).await, "rate_limited"), refused);
}

/// Sends a hello from `source` and reads to the end: what came back (empty
/// when the gateway refused the connection).
async fn served_from(source: &str, gw: SocketAddr) -> Vec<u8> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(gw).await.unwrap();
    s.write_all(&hello(SNI)).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .unwrap();
    out
}

/// One source address cannot hold every slot: it gets its share
/// (`--max-connections-per-source`) while another address is served.
#[tokio::test]
async fn one_source_cannot_hold_every_connection() {
    let echo = Echo::start(b"").await;
    let gw = start(&[
        "--route",
        &format!("{SNI}={}", echo.addr),
        "--max-connections-per-source",
        "2",
        "--handshake-timeout",
        "5s",
    ])
    .await;
    // 127.0.0.3 holds two connections mid-handshake...
    let mut held = Vec::new();
    for _ in 0..2 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(gw.addr).await.unwrap();
        s.write_all(&[22]).await.unwrap();
        held.push(s);
    }
    mesh_test::assert_eventually!(gw.open_connections() == 2, PATIENCE);
    // ...so its third is closed at accept, without a byte,
    assert!(served_from("127.0.0.3", gw.addr).await.is_empty());
    assert_eq!(
        rejections(&metrics(&gw).await, "source_connection_limit"),
        1
    );
    // while another source is served.
    assert!(!served_from("127.0.0.4", gw.addr).await.is_empty());
    // Its slots come back when its connections close.
    drop(held);
    mesh_test::assert_eventually!(gw.open_connections() == 0, PATIENCE);
    assert!(!served_from("127.0.0.3", gw.addr).await.is_empty());
    assert_eq!(
        rejections(&metrics(&gw).await, "source_connection_limit"),
        1
    );
}

/// The value of a plain gauge in a scrape.
fn gauge(m: &str, name: &str) -> u64 {
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// Half-open handshakes hold at most `--max-handshake-memory` of ClientHello
/// buffers, however many connections there are: clients that announce the
/// largest hello and send a few bytes of it fill the budget, the next one is
/// refused (`handshake_memory`), a client with a real hello is still served,
/// and the budget comes back when they go.
#[tokio::test]
async fn half_open_handshakes_hold_bounded_memory() {
    let echo = Echo::start(b"").await;
    let gw = start(&[
        "--route",
        &format!("{SNI}={}", echo.addr),
        "--max-client-hello",
        "16384",
        "--max-handshake-memory",
        "40000",
        "--handshake-timeout",
        "20s",
    ])
    .await;
    // A handshake record of 16,000 bytes announced, 6 of them sent.
    let announce = || async {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&[22, 3, 1, 0x3e, 0x80, 1, 0, 0x3e, 0x7c, 3, 3])
            .await
            .unwrap();
        s
    };
    let held = vec![announce().await, announce().await];
    // Two buffers of about 16 KB, less the first KiB each.
    mesh_test::assert_eventually!(
        gauge(
            &metrics(&gw).await,
            "fedmesh_gateway_handshake_memory_bytes"
        ) >= 2 * 14_900,
        PATIENCE
    );
    // A third would pass the budget: refused, closed without a byte.
    let mut third = announce().await;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(PATIENCE, third.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the third half-open hello is closed");
    assert_eq!(rejections(&metrics(&gw).await, "handshake_memory"), 1);
    // A real hello fits in its first KiB: served meanwhile.
    assert!(!served_from("127.0.0.5", gw.addr).await.is_empty());
    // The budget comes back when the half-open ones leave.
    drop(held);
    mesh_test::assert_eventually!(
        gauge(
            &metrics(&gw).await,
            "fedmesh_gateway_handshake_memory_bytes"
        ) == 0,
        PATIENCE
    );
    let _again = (announce().await, announce().await);
    mesh_test::assert_eventually!(
        gauge(
            &metrics(&gw).await,
            "fedmesh_gateway_handshake_memory_bytes"
        ) >= 2 * 14_900,
        PATIENCE
    );
    assert_eq!(rejections(&metrics(&gw).await, "handshake_memory"), 1);
}

/// Bytes pass both ways; a client FIN reaches the backend as a FIN while the
/// backend can still answer (half-close); the backend's FIN then ends it.
#[tokio::test]
async fn splice_passes_half_close() {
    let echo = Echo::start(b"|bye").await;
    let gw = start(&["--route", &format!("{SNI}={}", echo.addr)]).await;
    let h = hello(SNI);
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&h).await.unwrap();
    s.write_all(b"payload").await.unwrap();
    s.shutdown().await.unwrap(); // FIN: we are done sending, still reading
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let mut want = h.clone();
    want.extend_from_slice(b"payload|bye");
    assert_eq!(
        out, want,
        "the hello is replayed untouched, the payload echoed, then the backend's own last words"
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let echo = Echo::start(b"").await;
    let gw = start(&[
        "--route",
        &format!("{SNI}={}", echo.addr),
        "--idle-timeout",
        "1s",
    ])
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&hello(SNI)).await.unwrap();
    let mut echoed = vec![0u8; hello(SNI).len()];
    s.read_exact(&mut echoed).await.unwrap();
    // Activity keeps it open past the idle timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(b"k").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
    }
    // ...silence closes it.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    mesh_test::assert_eventually!(gw.open_connections() == 0, PATIENCE);
}

/// A dead endpoint beside a live one: every connection still succeeds (the
/// connect is retried on another endpoint).
#[tokio::test]
async fn connect_failures_are_retried_on_another_endpoint() {
    let echo = Echo::start(b"").await;
    let dead = dead_addr();
    let gw = start(&[
        "--route",
        &format!("{SNI}={dead},{}", echo.addr),
        "--lb",
        "round-robin",
    ])
    .await;
    for _ in 0..12 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let h = hello(SNI);
        s.write_all(&h).await.unwrap();
        let mut back = vec![0u8; h.len()];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, h);
    }
    assert_eq!(rejections(&metrics(&gw).await, "connect_failed"), 0);
}

/// A gateway restarted while the federation is down routes from its state file.
#[tokio::test]
async fn restart_without_the_federation_uses_the_state_file() {
    let echo = Echo::start(b"").await;
    let fed = federation().await;
    let mut reg = registration(&fed).await;
    add_endpoint(&mut reg, "reviews", "r1", echo.addr, api::Health::Healthy).await;
    export(&mut reg, "reviews").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("gateway.state");
    let flags = federation_flags(&fed, "c1").await;
    let gw = start_flags(&flags, &["--state-file", state.to_str().unwrap()]).await;
    let sni = format!(
        "outbound_.{}_._.reviews.default.svc.cluster.local",
        echo.addr.port()
    );
    mesh_test::assert_eventually!(gw.routes.load().route(&sni).is_ok(), PATIENCE);
    mesh_test::assert_eventually!(state.exists(), PATIENCE);
    gw.drain().await;
    fed.shutdown(Duration::from_secs(1)).await.unwrap();

    let gw = start_flags(&flags, &["--state-file", state.to_str().unwrap()]).await;
    mesh_test::assert_eventually!(gw.routes.load().route(&sni).is_ok(), PATIENCE);
    assert_eq!(
        http_status(gw.admin.unwrap(), "/ready").await,
        200,
        "ready from the saved state"
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let h = hello(&sni);
    s.write_all(&h).await.unwrap();
    let mut back = vec![0u8; h.len()];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, h);
}
