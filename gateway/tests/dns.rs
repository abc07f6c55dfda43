//! Remote gateways named by DNS: resolved with hickory against a real DNS
//! server (dnsmasq on a loopback port), refreshed when the TTL runs out, and
//! the last good answer kept when DNS fails. The resolved addresses name the
//! peer cluster of connections coming from them.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_test::dns::Dnsmasq;
use mesh_test::tcp::Echo;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod support;

const PATIENCE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn gateway_names_resolve_with_ttl_and_keep_the_last_good_answer() {
    mesh_test::trace_init();
    let mut dns = Dnsmasq::start(&[("gw.c2.fedmesh.test", "127.0.0.9")]);

    let fed = support::federation().await;
    let mut reg = RegistrationClient::new(support::admin(&fed).await);
    for (c, gw) in [
        ("c1", "127.0.0.1:15443"),
        ("c2", "gw.c2.fedmesh.test:15443"),
    ] {
        reg.register_cluster(api::RegisterClusterRequest {
            cluster: Some(api::ClusterInfo {
                name: c.into(),
                locality: Some(api::Locality {
                    region: "r".into(),
                    zone: "z".into(),
                }),
                network: c.into(),
                gateway_addresses: vec![gw.into()],
                trust_domain: "cluster.local".into(),
                allow_local_endpoints: true,
                endpoint_networks: Vec::new(),
            }),
        })
        .await
        .unwrap();
    }
    let echo = Echo::start(b"").await;
    reg.register_endpoint(api::RegisterEndpointRequest {
        endpoint: Some(api::Endpoint {
            id: "r1".into(),
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            cluster: "c1".into(),
            address: "127.0.0.1".into(),
            ports: vec![api::Port {
                name: String::new(),
                number: u32::from(echo.addr.port()),
                protocol: String::new(),
                ..Default::default()
            }],
            locality: Some(api::Locality {
                region: "r".into(),
                zone: "z".into(),
            }),
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

    let gw = support::start_fed(&fed, &["--dns-server", &dns.addr().to_string()]).await;
    let peer = |ip: &str| {
        gw.routes
            .load()
            .peer(ip.parse().unwrap())
            .map(ToString::to_string)
    };
    mesh_test::assert_eventually!(peer("127.0.0.9").as_deref() == Some("c2"), PATIENCE);

    // A connection from the c2 gateway's address is counted as from c2.
    let sni = format!(
        "outbound_.{}_._.reviews.default.svc.cluster.local",
        echo.addr.port()
    );
    let hello = mesh_test::tls::client_hello(&sni);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new("127.0.0.9".parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    let mut s = sock.connect(gw.addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let mut out = Vec::new();
    s.shutdown().await.unwrap();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert_eq!(out, hello, "routed and echoed");
    let mut m = tokio::net::TcpStream::connect(gw.admin.unwrap())
        .await
        .unwrap();
    m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).await.unwrap();
    assert!(
        text.contains(
            "fedmesh_gateway_connections_total{service=\"default/reviews\",source_cluster=\"c2\",destination_cluster=\"c1\"} 1"
        ),
        "{text}"
    );

    // The name moves: after the 1 s TTL the gateway follows.
    dns.set(&[("gw.c2.fedmesh.test", "127.0.0.10")]);
    mesh_test::assert_eventually!(peer("127.0.0.10").as_deref() == Some("c2"), PATIENCE);
    assert_eq!(peer("127.0.0.9"), None, "the old address is no longer c2's");

    // DNS goes away: the last good answer stays.
    drop(dns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(peer("127.0.0.10").as_deref(), Some("c2"));
}
