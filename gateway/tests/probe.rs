//! Data-plane probes: a gateway probes the other cluster's gateway and,
//! through it, each exported service, and reports to the federation; the
//! leader's weights then fail a dead service over alone, for the probing
//! cluster only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use gateway::config::{Args, Config};
use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_test::tls::{TestCa, TlsEcho};
use std::net::SocketAddr;
use std::time::Duration;

mod support;

async fn gateway(fed: &federation::app::Bound, cluster: &str) -> gateway::app::Bound {
    gateway_with(fed, cluster, "127.0.0.1:0", &[]).await
}

async fn gateway_with(
    fed: &federation::app::Bound,
    cluster: &str,
    listen: &str,
    extra: &[&str],
) -> gateway::app::Bound {
    let flags = support::federation_flags(fed, cluster).await;
    let mut args: Vec<&str> = vec![
        "fedmesh-gateway",
        "--cluster",
        cluster,
        "--listen",
        listen,
        "--access-log",
        "off",
        "--probe-interval",
        "200ms",
    ];
    args.extend(flags.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let cfg = Config::from_args(&Args::try_parse_from(args).unwrap()).unwrap();
    gateway::app::build(&cfg, &tokio::runtime::Handle::current())
        .await
        .unwrap()
}

fn endpoint(cluster: &str, svc: &str, addr: SocketAddr) -> api::Endpoint {
    api::Endpoint {
        id: format!("{svc}-{cluster}"),
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
        locality: Some(api::Locality {
            region: if cluster == "c1" {
                "us-east"
            } else {
                "eu-west"
            }
            .into(),
            zone: "z1".into(),
        }),
        health: api::Health::Healthy as i32,
        ..Default::default()
    }
}

/// Waits (bounded) until the federation holds a probe report from `from`
/// that satisfies `ok`.
async fn until_report(
    fed: &federation::app::Bound,
    from: &str,
    what: &str,
    ok: impl Fn(&federation::traffic::ProbeReport) -> bool,
) {
    let from = mesh_core::name::ClusterName::new(from).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if fed.shared.read().probes().get(&from).is_some_and(&ok) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {:?}",
            fed.shared.read().probes().get(&from)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn weights_from(fed: &federation::app::Bound, svc: &str, caller: &str) -> Vec<(String, u32)> {
    let key: mesh_core::service::ServiceKey = format!("default/{svc}").parse().unwrap();
    fed.shared
        .read()
        .weights()
        .get(&key)
        .and_then(|w| w.callers.get(caller).cloned())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_find_a_dead_service_behind_a_live_gateway_and_a_dead_gateway() {
    mesh_test::trace_init();
    let mut cfg = federation::config::Config::embedded(([127, 0, 0, 1], 0).into());
    cfg.weights_interval = Duration::from_millis(100);
    let fed = federation::app::build(&cfg).await.unwrap();
    fed.shared.wait_synced().await;
    let admin = support::admin(&fed).await;
    let g1 = gateway(&fed, "c1").await;
    let g2 = gateway(&fed, "c2").await;
    let mut reg = RegistrationClient::new(admin.clone());
    for (c, region, gw) in [("c1", "us-east", g1.addr), ("c2", "eu-west", g2.addr)] {
        reg.register_cluster(api::RegisterClusterRequest {
            cluster: Some(api::ClusterInfo {
                name: c.into(),
                locality: Some(api::Locality {
                    region: region.into(),
                    zone: "z1".into(),
                }),
                network: c.into(),
                gateway_addresses: vec![gw.to_string()],
                trust_domain: "cluster.local".into(),
                allow_local_endpoints: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }
    // In c2: reviews answers TLS; ratings' endpoint is registered healthy
    // but nothing listens there (its process died without deregistering).
    let ca = TestCa::new();
    let leaf = ca.issue(&["reviews.default.svc.cluster.local"], None);
    let reviews = TlsEcho::start(ca.server_config(&leaf)).await;
    let dead = mesh_test::tcp::dead_addr();
    // Both services also run in c1, so c1's callers have somewhere to go.
    let reviews_c1 = TlsEcho::start(ca.server_config(&leaf)).await;
    for (c, svc, addr) in [
        ("c2", "reviews", reviews.addr),
        ("c2", "ratings", dead),
        ("c1", "reviews", reviews_c1.addr),
        ("c1", "ratings", reviews_c1.addr),
    ] {
        reg.register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint(c, svc, addr)),
        })
        .await
        .unwrap();
    }
    for svc in ["reviews", "ratings"] {
        reg.set_export(api::SetExportRequest {
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: svc.into(),
            }),
            cluster: "c2".into(),
            exported: true,
        })
        .await
        .unwrap();
    }
    // c1's gateway: c2's gateway answers, reviews answers through it,
    // ratings does not.
    until_report(
        &fed,
        "c1",
        "ratings found dead behind a live gateway",
        |r| {
            r.clusters
                .get("c2")
                .is_some_and(|p| p.gateway && p.unreachable == vec!["default/ratings".to_string()])
        },
    )
    .await;

    // Operator weights split both services between c1 and c2. From c1,
    // ratings fails over alone; reviews keeps its split; c2's callers
    // (whose gateway sees nothing wrong) keep theirs.
    let mut traffic = api::traffic_client::TrafficClient::new(admin.clone());
    for svc in ["reviews", "ratings"] {
        traffic
            .set_weights(api::SetWeightsRequest {
                service: Some(api::ServiceKey {
                    namespace: "default".into(),
                    name: svc.into(),
                }),
                by: "cluster".into(),
                weights: [("c1".to_string(), 50), ("c2".to_string(), 50)].into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    mesh_test::assert_eventually!(
        weights_from(&fed, "ratings", "c1") == vec![("c1".to_string(), 10_000)]
            && weights_from(&fed, "reviews", "c1")
                == vec![("c1".to_string(), 5_000), ("c2".to_string(), 5_000)]
            && weights_from(&fed, "ratings", "c2")
                == vec![("c1".to_string(), 5_000), ("c2".to_string(), 5_000)],
        Duration::from_secs(10)
    );

    // c2's gateway goes away: c1 sees the whole cluster unreachable.
    g2.drain().await;
    until_report(&fed, "c1", "c2's gateway found dead", |r| {
        r.clusters.get("c2").is_some_and(|p| !p.gateway)
    })
    .await;
    mesh_test::assert_eventually!(
        weights_from(&fed, "reviews", "c1") == vec![("c1".to_string(), 10_000)],
        Duration::from_secs(10)
    );
    g1.drain().await;
    fed.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// A cluster whose gateway is known only by a DNS name (as a LoadBalancer's
/// hostname is): the other gateway resolves it against a real DNS server
/// and probes every address it answers; when the name moves to an address
/// where nothing listens the gateway is reported down, and with both
/// addresses it is up (any one answering is enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_known_by_name_is_probed_at_every_address() {
    mesh_test::trace_init();
    let mut dns = mesh_test::dns::Dnsmasq::start(&[("gw.c2.fedmesh.test", "127.0.0.2")]);
    let mut cfg = federation::config::Config::embedded(([127, 0, 0, 1], 0).into());
    cfg.weights_interval = Duration::from_millis(100);
    let fed = federation::app::build(&cfg).await.unwrap();
    fed.shared.wait_synced().await;
    let admin = support::admin(&fed).await;
    let dns_addr = dns.addr().to_string();
    let g1 = gateway_with(&fed, "c1", "127.0.0.1:0", &["--dns-server", &dns_addr]).await;
    let g2 = gateway_with(&fed, "c2", "127.0.0.2:0", &[]).await;
    let port = g2.addr.port();
    let mut reg = RegistrationClient::new(admin.clone());
    for (c, region, gw) in [
        ("c1", "us-east", g1.addr.to_string()),
        ("c2", "eu-west", format!("gw.c2.fedmesh.test:{port}")),
    ] {
        reg.register_cluster(api::RegisterClusterRequest {
            cluster: Some(api::ClusterInfo {
                name: c.into(),
                locality: Some(api::Locality {
                    region: region.into(),
                    zone: "z1".into(),
                }),
                network: c.into(),
                gateway_addresses: vec![gw],
                trust_domain: "cluster.local".into(),
                allow_local_endpoints: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }
    let ca = TestCa::new();
    let leaf = ca.issue(&["reviews.default.svc.cluster.local"], None);
    let reviews = TlsEcho::start(ca.server_config(&leaf)).await;
    reg.register_endpoint(api::RegisterEndpointRequest {
        endpoint: Some(endpoint("c2", "reviews", reviews.addr)),
    })
    .await
    .unwrap();
    reg.set_export(api::SetExportRequest {
        service: Some(api::ServiceKey {
            namespace: "default".into(),
            name: "reviews".into(),
        }),
        cluster: "c2".into(),
        exported: true,
    })
    .await
    .unwrap();
    let up = |r: &federation::traffic::ProbeReport| {
        r.clusters
            .get("c2")
            .is_some_and(|p| p.gateway && p.unreachable.is_empty())
    };
    until_report(&fed, "c1", "c2's gateway, known by name, probed", up).await;
    // The name moves where nothing listens: down.
    dns.set(&[("gw.c2.fedmesh.test", "127.0.0.5")]);
    until_report(&fed, "c1", "the new address is down", |r| {
        r.clusters.get("c2").is_some_and(|p| !p.gateway)
    })
    .await;
    // Both addresses: one answers, so the gateway and reviews are up.
    dns.set(&[
        ("gw.c2.fedmesh.test", "127.0.0.5"),
        ("gw.c2.fedmesh.test", "127.0.0.2"),
    ]);
    until_report(&fed, "c1", "one address of two answers", up).await;
    g1.drain().await;
    g2.drain().await;
}
