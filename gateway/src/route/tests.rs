use super::*;
use mesh_api::v1 as api;
use mesh_core::convert::FromApi;

// A test fixture: one argument per field it varies.
#[allow(clippy::too_many_arguments)]
fn ep(
    cluster: &str,
    ns: &str,
    svc: &str,
    id: &str,
    ip: &str,
    ports: &[u32],
    version: &str,
    health: api::Health,
) -> Endpoint {
    Endpoint::from_api(
        api::Endpoint {
            id: id.into(),
            service: Some(api::ServiceKey {
                namespace: ns.into(),
                name: svc.into(),
            }),
            cluster: cluster.into(),
            address: ip.into(),
            ports: ports
                .iter()
                .map(|p| api::Port {
                    name: String::new(),
                    number: *p,
                    protocol: "tcp".into(),
                    ..Default::default()
                })
                .collect(),
            labels: [("version".to_string(), version.to_string())].into(),
            locality: Some(api::Locality {
                region: "r".into(),
                zone: "z".into(),
            }),
            health: health as i32,
            identity: String::new(),
        },
        "endpoint",
    )
    .unwrap()
}

fn key(ns: &str, name: &str) -> ServiceKey {
    format!("{ns}/{name}").parse().unwrap()
}

fn cluster_info(name: &str, allow_local: bool) -> ClusterInfo {
    ClusterInfo::from_api(
        api::ClusterInfo {
            name: name.into(),
            locality: Some(api::Locality {
                region: "r".into(),
                zone: "z".into(),
            }),
            network: "n1".into(),
            trust_domain: "cluster.local".into(),
            allow_local_endpoints: allow_local,
            ..Default::default()
        },
        "cluster",
    )
    .unwrap()
}

/// The gateway of c1, which knows its own cluster.
fn builder() -> Builder {
    let mut b = Builder::new("c1".parse().unwrap(), &BTreeMap::new());
    b.upsert_cluster(cluster_info("c1", false));
    b
}

#[test]
fn an_endpoint_at_a_local_address_routes_only_where_the_cluster_allows_it() {
    // An endpoint at the gateway's own loopback would make it a relay into
    // its host (the SSRF of issue 15).
    let mut b = builder();
    apply(
        &mut b,
        ep(
            "c1",
            "default",
            "admin",
            "a1",
            "127.0.0.1",
            &[8080],
            "v1",
            api::Health::Healthy,
        ),
    );
    export(&mut b, "default", "admin");
    let sni = "outbound_.8080_._.admin.default.svc.cluster.local";
    let backends = |b: &Builder| b.table().route(sni).unwrap().0.endpoints.len();
    // Known and exported, but with no endpoint to connect to.
    assert_eq!(backends(&b), 0, "loopback routed");
    apply(
        &mut b,
        ep(
            "c1",
            "default",
            "admin",
            "a2",
            "169.254.169.254",
            &[8080],
            "v1",
            api::Health::Healthy,
        ),
    );
    assert_eq!(backends(&b), 0, "link-local routed");
    // A cluster that allows local endpoints (a mesh on one machine) routes them.
    b.upsert_cluster(cluster_info("c1", true));
    assert_eq!(backends(&b), 2);
    // And taking the permission back takes them out of rotation.
    b.upsert_cluster(cluster_info("c1", false));
    assert_eq!(backends(&b), 0);
    // As does the cluster's removal.
    b.upsert_cluster(cluster_info("c1", true));
    assert_eq!(backends(&b), 2);
    b.remove_cluster(&"c1".parse().unwrap());
    assert_eq!(backends(&b), 0);
}

fn apply(b: &mut Builder, e: Endpoint) {
    if let Some(s) = b.upsert_endpoint(e) {
        b.rebuild(&s);
    }
}

fn export(b: &mut Builder, ns: &str, name: &str) {
    if let Some(s) = b.set_export(key(ns, name), &"c1".parse().unwrap(), true) {
        b.rebuild(&s);
    }
}

#[test]
fn only_exported_local_services_route() {
    let mut b = builder();
    apply(
        &mut b,
        ep(
            "c1",
            "default",
            "reviews",
            "r1",
            "10.0.0.1",
            &[9080],
            "v1",
            api::Health::Healthy,
        ),
    );
    apply(
        &mut b,
        ep(
            "c1",
            "default",
            "reviews",
            "r2",
            "10.0.0.2",
            &[9080],
            "v2",
            api::Health::Healthy,
        ),
    );
    apply(
        &mut b,
        ep(
            "c2",
            "default",
            "reviews",
            "x1",
            "10.9.0.1",
            &[9080],
            "v1",
            api::Health::Healthy,
        ),
    );
    let t = b.table();
    assert_eq!(
        t.route("outbound_.9080_._.reviews.default.svc.cluster.local")
            .err(),
        Some(NoRoute::NotExported)
    );
    export(&mut b, "default", "reviews");
    let t = b.table();
    let (be, sni) = t
        .route("outbound_.9080_._.reviews.default.svc.cluster.local")
        .unwrap();
    assert_eq!(sni.unwrap().port.get(), 9080);
    let addrs: Vec<_> = be.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(
        addrs,
        ["10.0.0.1:9080", "10.0.0.2:9080"],
        "local endpoints only"
    );
    assert_eq!(&*be.service, "default/reviews");
    // Case does not matter in DNS names.
    assert!(t
        .route("OUTBOUND_.9080_._.REVIEWS.default.svc.cluster.local")
        .is_ok());
    // Subsets select by version label.
    match be.candidates(Some("v2")) {
        Some(Candidates::Some(v)) => assert_eq!(v, &[1]),
        other => panic!("{other:?}"),
    }
    assert!(be.candidates(Some("v9")).is_none());
    // Refusals.
    assert_eq!(
        t.route("outbound_.9081_._.reviews.default.svc.cluster.local")
            .err(),
        Some(NoRoute::UnknownService)
    );
    assert_eq!(
        t.route("outbound_.9080_._.ratings.default.svc.cluster.local")
            .err(),
        Some(NoRoute::UnknownService)
    );
    assert_eq!(
        t.route("reviews.default.svc.cluster.local").err(),
        Some(NoRoute::MalformedSni)
    );
    assert_eq!(t.route("").err(), Some(NoRoute::MalformedSni));
    // The remote endpoint's address is a known peer.
    assert_eq!(
        t.peer("10.9.0.1".parse().unwrap()).map(ClusterName::as_str),
        Some("c2")
    );
    assert_eq!(
        t.peer("10.0.0.1".parse().unwrap()),
        None,
        "local endpoints are not peers"
    );
}

#[test]
fn unhealthy_endpoints_do_not_route_and_removal_withdraws() {
    let mut b = builder();
    export(&mut b, "default", "reviews");
    apply(
        &mut b,
        ep(
            "c1",
            "default",
            "reviews",
            "r1",
            "10.0.0.1",
            &[9080],
            "v1",
            api::Health::Unhealthy,
        ),
    );
    let (be, _) = b
        .table()
        .route("outbound_.9080_._.reviews.default.svc.cluster.local")
        .unwrap();
    assert!(be.candidates(None).is_none(), "no healthy endpoint");
    apply(
        &mut b,
        ep(
            "c1",
            "default",
            "reviews",
            "r1",
            "10.0.0.1",
            &[9080],
            "v1",
            api::Health::Healthy,
        ),
    );
    assert!(b
        .table()
        .route("outbound_.9080_._.reviews.default.svc.cluster.local")
        .is_ok());
    let k = b.endpoints.keys().next().unwrap().clone();
    let s = b.remove_endpoint(&k).unwrap();
    b.rebuild(&s);
    assert_eq!(
        b.table()
            .route("outbound_.9080_._.reviews.default.svc.cluster.local")
            .err(),
        Some(NoRoute::UnknownService)
    );
}

#[test]
fn ten_thousand_services_by_five_ports() {
    let mut b = builder();
    let ports = [80, 443, 8080, 9080, 15000];
    for i in 0..10_000u32 {
        let name = format!("svc-{i}");
        let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, (i & 0xff).max(1));
        b.upsert_endpoint(ep(
            "c1",
            "ns",
            &name,
            "e1",
            &ip,
            &ports,
            "v1",
            api::Health::Healthy,
        ));
        b.set_export(key("ns", &name), &"c1".parse().unwrap(), true);
        b.rebuild(&key("ns", &name));
    }
    let before = b.table();
    assert_eq!(before.len(), 50_000);
    for i in (0..10_000).step_by(997) {
        for p in ports {
            let (be, _) = before
                .route(&format!("outbound_.{p}_._.svc-{i}.ns.svc.cluster.local"))
                .unwrap();
            assert_eq!(u32::from(be.endpoints[0].addr.port()), p);
        }
    }
    // A delta touches one service: the new snapshot differs there only, and
    // the old snapshot (still held by open connections) is unchanged.
    b.upsert_endpoint(ep(
        "c1",
        "ns",
        "svc-42",
        "e2",
        "10.200.0.1",
        &ports,
        "v2",
        api::Health::Healthy,
    ));
    b.rebuild(&key("ns", "svc-42"));
    let after = b.table();
    assert_eq!(after.len(), 50_000);
    let sni = "outbound_.80_._.svc-42.ns.svc.cluster.local";
    assert_eq!(after.route(sni).unwrap().0.endpoints.len(), 2);
    assert_eq!(before.route(sni).unwrap().0.endpoints.len(), 1);
    let other = "outbound_.80_._.svc-43.ns.svc.cluster.local";
    assert!(
        Arc::ptr_eq(
            &after.route(other).unwrap().0,
            &before.route(other).unwrap().0
        ),
        "untouched routes are shared"
    );
}

fn backends(n: usize) -> Backends {
    let eps = (0..n)
        .map(|i| {
            (
                Backend {
                    addr: SocketAddr::from(([127, 0, 0, 1], 1000 + u16::try_from(i).unwrap())),
                    stats: Arc::default(),
                },
                None,
            )
        })
        .collect();
    Backends::new(Arc::from("t"), eps)
}

#[test]
fn least_request_prefers_the_less_loaded() {
    let b = backends(2);
    b.endpoints[0].stats.active.store(10, Ordering::Relaxed);
    let c = b.candidates(None).unwrap();
    for _ in 0..50 {
        assert_eq!(b.pick(&c, Balance::LeastRequest, 0), Some(1));
    }
    // With many endpoints, load spreads: every endpoint gets picked.
    let b = backends(5);
    let c = b.candidates(None).unwrap();
    let mut seen = HashSet::new();
    for _ in 0..500 {
        let i = b.pick(&c, Balance::LeastRequest, 0).unwrap();
        seen.insert(i);
    }
    assert_eq!(seen.len(), 5);
}

#[test]
fn round_robin_cycles_and_retries_skip_tried() {
    let b = backends(3);
    let c = b.candidates(None).unwrap();
    let picks: Vec<_> = (0..6)
        .map(|_| b.pick(&c, Balance::RoundRobin, 0).unwrap())
        .collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    assert_eq!(b.pick(&c, Balance::LeastRequest, 0b011), Some(2));
    assert_eq!(
        b.pick(&c, Balance::LeastRequest, 0b111),
        None,
        "every endpoint tried"
    );
}

#[test]
fn repeated_failures_eject_and_all_ejected_means_ignore_ejection() {
    let b = backends(2);
    let c = b.candidates(None).unwrap();
    for i in 1..EJECT_AFTER {
        assert!(
            !b.endpoints[0].stats.failure(),
            "failure {i} does not eject"
        );
    }
    assert!(b.endpoints[0].stats.failure());
    assert!(b.endpoints[0].stats.ejected());
    for _ in 0..20 {
        assert_eq!(
            b.pick(&c, Balance::LeastRequest, 0),
            Some(1),
            "the ejected endpoint is skipped"
        );
    }
    for _ in 0..EJECT_AFTER {
        b.endpoints[1].stats.failure();
    }
    assert!(
        b.pick(&c, Balance::LeastRequest, 0).is_some(),
        "all ejected: try anyway"
    );
    // A success resets the failure count.
    b.endpoints[0].stats.failure();
    b.endpoints[0].stats.success();
    assert_eq!(b.endpoints[0].stats.failures.load(Ordering::Relaxed), 0);
}

#[test]
fn static_routes_match_exactly() {
    let mut statics = BTreeMap::new();
    statics.insert(
        "svc-a.mesh.local".to_string(),
        vec!["127.0.0.1:18401".parse().unwrap()],
    );
    let b = Builder::new("c1".parse().unwrap(), &statics);
    let t = b.table();
    let (be, sni) = t.route("SVC-A.mesh.local").unwrap();
    assert!(sni.is_none());
    assert_eq!(be.endpoints[0].addr.port(), 18401);
    assert_eq!(
        t.route("svc-b.mesh.local").err(),
        Some(NoRoute::MalformedSni)
    );
}
