//! Agents on loopback with a real federation, real mTLS and real HTTP
//! backends: routing by Istio policy, locality, retries, timeouts, faults,
//! rate limits, live config and static stability.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use mesh_test::http::Backend;
use std::time::Duration;
use support::{
    enrolled, get, join_token, scrape, send, spread, stop, wait_endpoints, wait_version,
    with_token, ClusterSpec, Mesh,
};

/// One cluster: c1 in us-east-1a.
async fn one_cluster() -> Mesh {
    Mesh::one_cluster_on("127.0.0.1").await
}

/// reviews v1 and v2 (one endpoint each, labelled `version`) and a frontend.
async fn two_versions(
    m: &Mesh,
    v1: &Backend,
    v2: &Backend,
) -> (
    mesh_agent::app::Bound,
    mesh_agent::app::Bound,
    mesh_agent::app::Bound,
) {
    let r1 = m
        .c1_agent(
            "reviews",
            v1.addr,
            9080,
            &["--label", "version=v1", "--id", "r1"],
        )
        .await;
    let r2 = m
        .c1_agent(
            "reviews",
            v2.addr,
            9080,
            &["--label", "version=v2", "--id", "r2"],
        )
        .await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 2).await;
    (r1, r2, frontend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_travel_over_mtls_with_the_callers_identity() {
    let m = one_cluster().await;
    let backend = Backend::start("reviews-1").await;
    let reviews = m.c1_agent("reviews", backend.addr, 9080, &[]).await;
    let front_app = Backend::start("frontend").await;
    let frontend = m
        .agent(m.args(
            "c1",
            "us-east",
            "us-east-1a",
            "frontend",
            front_app.addr,
            8080,
        ))
        .await;
    wait_endpoints(&frontend, "reviews", 1).await;

    let r = get(frontend.outbound, "reviews:9080", "/books/1", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-backend"), "reviews-1");
    assert!(r.body.contains("GET /books/1 HTTP/1.1"), "{}", r.body);
    // The application behind the inbound agent learns who called, from the
    // caller's certificate.
    assert_eq!(
        r.header("x-seen-xfcc"),
        "By=spiffe://cluster.local/ns/default/sa/reviews;URI=spiffe://cluster.local/ns/default/sa/frontend"
    );
    assert_eq!(r.header("x-seen-host"), "reviews:9080");

    // HTTP/2 from the application (h2c) arrives as HTTP/2.
    let r = send(
        frontend.outbound,
        "POST",
        "reviews.default.svc.cluster.local:9080",
        "/echo",
        &[],
        bytes::Bytes::from_static(b"hello"),
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("POST /echo HTTP/2.0"), "{}", r.body);
    assert_eq!(backend.seen().last().unwrap().body, b"hello");

    // The agent as an HTTP proxy: absolute-form request target.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(frontend.outbound)
            .await
            .unwrap();
        s.write_all(b"GET http://reviews.default:9080/proxied HTTP/1.1\r\nHost: reviews.default:9080\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("reviews-1 GET /proxied HTTP/1.1"), "{out}");
    }

    // A caller forging the identity header gets it replaced.
    let r = get(
        frontend.outbound,
        "reviews:9080",
        "/",
        &[("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/sa/y")],
    )
    .await;
    assert!(!r.header("x-seen-xfcc").contains("evil"), "{r:?}");
    stop(vec![reviews, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_reason() {
    let m = one_cluster().await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "frontend", 1).await;
    let r = get(frontend.outbound, "nosuch.default:80", "/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-fedmesh-reason"), "unknown_service");
    assert!(
        r.body.contains("no service nosuch.default:80"),
        "{}",
        r.body
    );

    // The inbound listener refuses a client without a mesh certificate.
    let stranger = mesh_test::tls::TestCa::new();
    let leaf = stranger.issue(&["x"], Some("spiffe://cluster.local/ns/default/sa/x"));
    let cfg =
        m.ca.client_config(&leaf, "spiffe://cluster.local/ns/default/sa/frontend");
    let tcp = tokio::net::TcpStream::connect(frontend.inbound)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("x").unwrap();
    let r = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await;
    let refused = match r {
        Err(_) => true,
        Ok(mut s) => {
            // TLS 1.3: the server's refusal arrives with the first read.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let mut buf = [0u8; 16];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a certificate from another CA must be refused");
    assert_eq!(app.requests(), 0);
    frontend.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_routes_by_header_and_weight_to_subsets() {
    let m = one_cluster().await;
    let v1 = Backend::start("reviews-v1").await;
    let v2 = Backend::start("reviews-v2").await;
    let (r1, r2, frontend) = two_versions(&m, &v1, &v2).await;

    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v2}
      weight: 20
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;

    let jason = spread(
        frontend.outbound,
        "reviews:9080",
        "/",
        &[("end-user", "jason")],
        20,
    )
    .await;
    assert_eq!(jason.get("reviews-v2"), Some(&20), "{jason:?}");
    let n = 400;
    let all = spread(frontend.outbound, "reviews:9080", "/", &[], n).await;
    let v2_share = *all.get("reviews-v2").unwrap_or(&0) as f64 / n as f64;
    // 20% expected; binomial sd at n=400 is 2%: +-7% is over 3 sd.
    assert!((0.13..=0.27).contains(&v2_share), "{all:?}");
    assert_eq!(all.values().sum::<usize>(), n);

    // A subset nobody defined: 503 naming it.
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v9}
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-fedmesh-reason"), "no_healthy_endpoint");
    assert!(r.body.contains("subset v9"), "{}", r.body);
    stop(vec![r1, r2, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_move_to_another_endpoint_and_timeouts_answer_504() {
    let m = one_cluster().await;
    let b1 = Backend::start("ratings-1").await;
    let b2 = Backend::start("ratings-2").await;
    let mut a1 = m.args("c1", "us-east", "us-east-1a", "ratings", b1.addr, 9080);
    a1.extend(["--id".into(), "r1".into()]);
    let mut a2 = m.args("c1", "us-east", "us-east-1a", "ratings", b2.addr, 9080);
    a2.extend(["--id".into(), "r2".into()]);
    let (r1, r2) = (m.agent(a1).await, m.agent(a2).await);
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "ratings", 2).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /sleep}}]
    timeout: 300ms
    retries: {attempts: 0}
    route: [{destination: {host: ratings}}]
  - retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}
    route: [{destination: {host: ratings}}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;

    // Every request succeeds although one backend fails its next 5 requests:
    // each failure is retried on the other endpoint.
    b1.fail_next(5);
    for _ in 0..20 {
        let r = get(frontend.outbound, "ratings:9080", "/", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // Both failing: 1 try + 3 retries, then the caller sees the 503.
    b1.fail_next(100);
    b2.fail_next(100);
    let before = b1.requests() + b2.requests();
    let r = get(frontend.outbound, "ratings:9080", "/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(b1.requests() + b2.requests() - before, 4);
    b1.fail_next(0);
    b2.fail_next(0);

    // The route's timeout: 504 after ~300 ms although the backend takes 3 s.
    let t = std::time::Instant::now();
    let r = get(frontend.outbound, "ratings:9080", "/sleep/3000", &[]).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-fedmesh-reason"), "upstream_timeout");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let r = get(frontend.outbound, "ratings:9080", "/sleep/10", &[]).await;
    assert_eq!(r.status, 200);
    stop(vec![r1, r2, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_by_percentage() {
    let m = one_cluster().await;
    let b = Backend::start("details-1").await;
    let details = m.c1_agent("details", b.addr, 9080, &[]).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "details", 1).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: details}
spec:
  hosts: [details.default.svc.cluster.local]
  http:
  - match: [{uri: {exact: /abort}}]
    fault:
      abort: {httpStatus: 418, percentage: {value: 100}}
    route: [{destination: {host: details}}]
  - match: [{uri: {exact: /half}}]
    fault:
      abort: {httpStatus: 500, percentage: {value: 50}}
    retries: {attempts: 0}
    route: [{destination: {host: details}}]
  - match: [{uri: {exact: /delay}}]
    fault:
      delay: {fixedDelay: 400ms, percent: 100}
    route: [{destination: {host: details}}]
  - route: [{destination: {host: details}}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;

    let before = b.requests();
    let r = get(frontend.outbound, "details:9080", "/abort", &[]).await;
    assert_eq!(r.status, 418);
    assert_eq!(r.header("x-fedmesh-reason"), "fault_abort");
    assert_eq!(
        b.requests(),
        before,
        "an aborted request never reaches the backend"
    );

    let half = spread(frontend.outbound, "details:9080", "/half", &[], 200).await;
    let aborted = *half.get("status 500").unwrap_or(&0);
    // 50%: binomial sd at 200 is ~7: 100 +- 35.
    assert!((65..=135).contains(&aborted), "{half:?}");

    // The legacy integer `percent` of a delay.
    let t = std::time::Instant::now();
    let r = get(frontend.outbound, "details:9080", "/delay", &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    stop(vec![details, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let m = one_cluster().await;
    let b = Backend::start("ratings-1").await;
    let mut ra = m.args("c1", "us-east", "us-east-1a", "ratings", b.addr, 9080);
    ra.extend([
        "--inbound-rate-limit".into(),
        "spiffe://cluster.local/ns/default/sa/frontend=3/m".into(),
    ]);
    let ratings = m.agent(ra).await;
    let app = Backend::start("frontend").await;
    let mut fa = m.args("c1", "us-east", "us-east-1a", "frontend", app.addr, 8080);
    fa.extend(["--outbound-rate-limit".into(), "details=2/m".into()]);
    let frontend = m.agent(fa).await;
    let d = Backend::start("details-1").await;
    let details = m.c1_agent("details", d.addr, 9080, &[]).await;
    wait_endpoints(&frontend, "ratings", 1).await;
    wait_endpoints(&frontend, "details", 1).await;

    // Inbound, per caller identity: three per minute for frontend.
    let codes: Vec<u16> = futures_codes(&frontend, "ratings:9080", 5).await;
    assert_eq!(codes, vec![200, 200, 200, 429, 429]);
    let r = get(frontend.outbound, "ratings:9080", "/", &[]).await;
    assert_eq!(r.header("x-fedmesh-reason"), "rate_limited");
    let wait: u64 = r.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(b.requests(), 3);

    // Outbound, per destination service: two per minute to details; the
    // third never leaves the caller's agent.
    let codes: Vec<u16> = futures_codes(&frontend, "details:9080", 3).await;
    assert_eq!(codes, vec![200, 200, 429]);
    assert_eq!(d.requests(), 2);
    // Counted, by direction and key.
    assert_eq!(
        scrape(
            &frontend,
            "fedmesh_agent_rate_limited_total{direction=\"outbound\""
        )
        .await,
        1.0
    );
    assert_eq!(
        scrape(
            &ratings,
            "fedmesh_agent_rate_limited_total{direction=\"inbound\""
        )
        .await,
        3.0
    );
    stop(vec![ratings, details, frontend]).await;
}

async fn futures_codes(a: &mesh_agent::app::Bound, host: &str, n: usize) -> Vec<u16> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(get(a.outbound, host, "/", &[]).await.status);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_prefers_the_zone_then_the_region_and_retries_leave_it() {
    let m = Mesh::start().await;
    for (name, zone) in [("c1", "us-east-1a"), ("c2", "us-east-1b")] {
        m.cluster(ClusterSpec {
            name,
            region: "us-east",
            zone,
            network: "n1",
            gateways: vec![],
        })
        .await;
    }
    m.cluster(ClusterSpec {
        name: "c3",
        region: "eu-west",
        zone: "eu-west-1a",
        network: "n1",
        gateways: vec![],
    })
    .await;
    let same_zone = Backend::start("zone").await;
    let same_region = Backend::start("region").await;
    let far = Backend::start("far").await;
    let mut agents = Vec::new();
    for (cluster, region, zone, b) in [
        ("c1", "us-east", "us-east-1a", &same_zone),
        ("c2", "us-east", "us-east-1b", &same_region),
        ("c3", "eu-west", "eu-west-1a", &far),
    ] {
        agents.push(
            m.agent(m.args(cluster, region, zone, "ratings", b.addr, 9080))
                .await,
        );
    }
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "ratings", 3).await;

    let s = spread(frontend.outbound, "ratings:9080", "/", &[], 30).await;
    assert_eq!(s.get("zone"), Some(&30), "{s:?}");

    // The zone's endpoint fails: with retryRemoteLocalities the retry goes
    // to the next locality, the region.
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - retries: {attempts: 2, retryOn: 5xx, retryRemoteLocalities: true}
    route: [{destination: {host: ratings}}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    same_zone.fail_next(1000);
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], 20).await;
    assert_eq!(s.get("region"), Some(&20), "{s:?}");

    // The zone's agent goes away entirely: the region takes over; then the
    // region's too: the far region.
    let zone_agent = agents.remove(0);
    zone_agent.drain().await;
    wait_endpoints(&frontend, "ratings", 2).await;
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], 10).await;
    assert_eq!(s.get("region"), Some(&10), "{s:?}");
    let region_agent = agents.remove(0);
    region_agent.drain().await;
    wait_endpoints(&frontend, "ratings", 1).await;
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], 10).await;
    assert_eq!(s.get("far"), Some(&10), "{s:?}");
    for a in agents {
        a.drain().await;
    }
    frontend.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_keep_requests_in_flight_and_the_last_config_outlives_the_federation() {
    let m = one_cluster().await;
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    let (r1, r2, frontend) = two_versions(&m, &v1, &v2).await;
    let to = |subset: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route: [{{destination: {{host: reviews, subset: {subset}}}}}]
"#
        )
    };
    let applied = m.apply(&to("v1")).await.unwrap();
    wait_version(&frontend, applied.revision).await;

    // A slow request in flight on v1 while the route moves to v2.
    let out = frontend.outbound;
    let slow = tokio::spawn(async move { get(out, "reviews:9080", "/sleep/800", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let applied = m.apply(&to("v2")).await.unwrap();
    wait_version(&frontend, applied.revision).await;
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.header("x-backend")), (200, "v1"), "{r:?}");
    let s = spread(frontend.outbound, "reviews:9080", "/", &[], 10).await;
    assert_eq!(s.get("v2"), Some(&10), "{s:?}");

    // The federation goes away: the agent keeps routing by its last config.
    m.fed.shutdown(Duration::from_secs(1)).await.unwrap();
    let s = spread(frontend.outbound, "reviews:9080", "/", &[], 10).await;
    assert_eq!(s.get("v2"), Some(&10), "{s:?}");
    stop(vec![r1, r2, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_network_is_reached_through_its_gateway_with_end_to_end_mtls() {
    let m = one_cluster().await;
    // c3 is on another network: only its east-west gateway is reachable.
    let gw = m.remote_cluster("c3", "n3", &[]).await;
    let b = Backend::start("reviews-eu").await;
    let reviews = m
        .agent(m.args("c3", "eu-west", "eu-west-1a", "reviews", b.addr, 9080))
        .await;
    m.export("reviews", "c3").await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let target = frontend
        .table
        .load()
        .endpoints(&"default/reviews".parse().unwrap(), None, None, true)
        .unwrap();
    assert_eq!(target.endpoints[0].addr, gw.addr, "through the gateway");

    // The gateway routes on the SNI without decrypting; the reviews agent
    // still sees the frontend's certificate.
    mesh_test::assert_eventually!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status
            == 200
    );
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.header("x-backend"), "reviews-eu");
    assert!(
        r.header("x-seen-xfcc")
            .ends_with("URI=spiffe://cluster.local/ns/default/sa/frontend"),
        "{r:?}"
    );
    stop(vec![reviews, frontend]).await;
    gw.drain().await;
}

/// Connections a gateway accepted, from its metrics.
async fn gateway_connections(gw: &gateway::app::Bound) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.admin.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("fedmesh_gateway_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A remote cluster whose gateway is known only by a DNS name (a
/// LoadBalancer's hostname, as AWS NLBs give): the agent resolves it
/// against a real DNS server (dnsmasq), reaches the service through it,
/// uses every address the name has, and follows the name when it moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_known_by_a_gateway_name_is_reached_and_traffic_follows_the_name() {
    let mut dns = mesh_test::dns::Dnsmasq::start(&[("gw.c3.fedmesh.test", "127.0.0.2")]);
    let m = one_cluster().await;
    // Two gateways of c3 on one port, on two loopback addresses.
    let a = m
        .gateway("c3", "127.0.0.2:0", &["--admin", "127.0.0.1:0"])
        .await;
    let port = a.addr.port();
    let b = m
        .gateway(
            "c3",
            &format!("127.0.0.3:{port}"),
            &["--admin", "127.0.0.1:0"],
        )
        .await;
    m.cluster(ClusterSpec {
        name: "c3",
        region: "eu-west",
        zone: "eu-west-1a",
        network: "n3",
        gateways: vec![format!("gw.c3.fedmesh.test:{port}")],
    })
    .await;
    let backend = Backend::start("reviews-eu").await;
    let reviews = m
        .agent(m.args("c3", "eu-west", "eu-west-1a", "reviews", backend.addr, 9080))
        .await;
    m.export("reviews", "c3").await;
    let app = Backend::start("frontend").await;
    let dns_addr = dns.addr().to_string();
    let frontend = m
        .c1_agent("frontend", app.addr, 8080, &["--dns-server", &dns_addr])
        .await;
    let svc: mesh_core::service::ServiceKey = "default/reviews".parse().unwrap();
    let addrs = |f: &mesh_agent::app::Bound| -> Vec<std::net::SocketAddr> {
        let mut v: Vec<_> = f
            .table
            .load()
            .endpoints(&svc, None, None, true)
            .map(|r| r.endpoints.iter().map(|e| e.addr).collect())
            .unwrap_or_default();
        v.sort();
        v.dedup();
        v
    };
    let at = |ip: [u8; 4]| std::net::SocketAddr::from((ip, port));
    mesh_test::assert_eventually!(addrs(&frontend) == vec![at([127, 0, 0, 2])]);
    // Once the gateway has the route (it follows the federation too).
    mesh_test::assert_eventually!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status
            == 200
    );
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-backend"), "reviews-eu");
    assert!(
        r.header("x-seen-xfcc")
            .ends_with("URI=spiffe://cluster.local/ns/default/sa/frontend"),
        "{r:?}"
    );
    assert!(gateway_connections(&a).await >= 1.0);

    // Two addresses: both are used.
    dns.set(&[
        ("gw.c3.fedmesh.test", "127.0.0.2"),
        ("gw.c3.fedmesh.test", "127.0.0.3"),
    ]);
    mesh_test::assert_eventually!(addrs(&frontend) == vec![at([127, 0, 0, 2]), at([127, 0, 0, 3])]);
    let before = (gateway_connections(&a).await, gateway_connections(&b).await);
    // Each address is its own upstream (a pooled connection each).
    for _ in 0..40 {
        let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(
        gateway_connections(&b).await > before.1,
        "the second address got nothing"
    );

    // The name moves to the second gateway alone; the first goes away:
    // traffic follows.
    dns.set(&[("gw.c3.fedmesh.test", "127.0.0.3")]);
    mesh_test::assert_eventually!(addrs(&frontend) == vec![at([127, 0, 0, 3])]);
    a.drain().await;
    for _ in 0..10 {
        let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-backend"), "reviews-eu");
    }
    stop(vec![reviews, frontend]).await;
    b.drain().await;
}

/// Operator weights sending all of `svc`'s traffic to `cluster`, once the
/// federation knows the service and the cluster has a healthy endpoint of
/// it (the agents register as they start).
async fn set_weights(m: &Mesh, svc: &str, cluster: &str) {
    let mut traffic = mesh_api::v1::traffic_client::TrafficClient::new(m.admin().await);
    let req = mesh_api::v1::SetWeightsRequest {
        service: Some(mesh_api::v1::ServiceKey {
            namespace: "default".into(),
            name: svc.into(),
        }),
        by: "cluster".into(),
        weights: [(cluster.to_string(), 100)].into(),
        ..Default::default()
    };
    mesh_test::assert_eventually!(
        traffic.set_weights(req.clone()).await.is_ok(),
        Duration::from_secs(15)
    );
}

/// A region failing under load (its application answers 503; its agents
/// and gateways answer, so nothing takes it out of rotation), with the
/// weights still sending everything there: every request fails there first
/// and, with retries, would come back as one more request to the surviving
/// region. The cross-cluster retry budget bounds those extra requests to
/// 20% of the requests plus 10 a second; the rest fail fast instead of
/// piling onto the survivor. (A region whose gateways go silent or refuse
/// is taken out of rotation instead: see the black-hole test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_into_the_surviving_region_stay_within_the_cross_cluster_budget() {
    let m = one_cluster().await;
    for (name, region, zone) in [
        ("c2", "us-west", "us-west-1a"),
        ("c3", "eu-west", "eu-west-1a"),
    ] {
        m.cluster(ClusterSpec {
            name,
            region,
            zone,
            network: "n1",
            gateways: vec![],
        })
        .await;
    }
    // c2's reviews fails every request.
    let failing = Backend::start("reviews-c2").await;
    failing.fail_next(1_000_000);
    let r2 = m
        .agent(m.args("c2", "us-west", "us-west-1a", "reviews", failing.addr, 9080))
        .await;
    let survivor = Backend::start("reviews-c3").await;
    let r3 = m
        .agent(m.args(
            "c3",
            "eu-west",
            "eu-west-1a",
            "reviews",
            survivor.addr,
            9080,
        ))
        .await;
    set_weights(&m, "reviews", "c2").await;
    let applied = m
        .apply(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    retries: {attempts: 3, retryOn: 5xx, backoff: 1ms}
",
        )
        .await
        .unwrap();
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 2).await;
    wait_version(&frontend, applied.revision).await;
    let svc: mesh_core::service::ServiceKey = "default/reviews".parse().unwrap();
    mesh_test::assert_eventually!(frontend
        .table
        .load()
        .weights(&svc)
        .is_some_and(|w| w.iter().any(|(c, v)| c.as_str() == "c2" && *v == 10_000)));

    let n = 200usize;
    let started = std::time::Instant::now();
    let mut ok = 0usize;
    for _ in 0..n {
        let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
        if r.status == 200 {
            assert_eq!(r.header("x-backend"), "reviews-c3");
            ok += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64().ceil().min(10.0);
    let extra = survivor.requests();
    // Every success is a retry that crossed; without the budget all 200
    // would have.
    assert_eq!(extra, ok, "the survivor got only the retries");
    #[allow(clippy::cast_precision_loss)]
    let bound = 0.2 * n as f64 + 10.0 * seconds;
    #[allow(clippy::cast_precision_loss)]
    let got = extra as f64;
    assert!(
        got <= bound,
        "{extra} retries crossed in {seconds} s; the budget is {bound}"
    );
    assert!(extra >= 20, "the budget lets a share through: {extra}");
    let denied = support::scrape(
        &frontend,
        "fedmesh_agent_retries_denied_total{service=\"default/reviews\",budget=\"cross_cluster\"}",
    )
    .await;
    #[allow(clippy::cast_precision_loss)]
    let refused = (n - ok) as f64;
    assert_eq!(denied, refused, "each failed request had its retry refused");
    stop(vec![r2, r3, frontend]).await;
}

/// Locality inside one cluster, as Istio documents it: without outlier
/// detection none (load spreads over both zones); with it, the caller's
/// zone first, spilling to the other zone as its hosts are ejected
/// (Envoy's overprovisioning, not all-or-nothing); `distribute` weighs the
/// zones as told; `enabled: false` turns it off again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_inside_a_cluster_follows_the_destination_rule() {
    let m = one_cluster().await;
    let mut backends = Vec::new();
    let mut agents = Vec::new();
    // Two endpoints in the caller's zone, two in the other zone of c1.
    for (i, zone) in ["us-east-1a", "us-east-1a", "us-east-1b", "us-east-1b"]
        .iter()
        .enumerate()
    {
        let b = Backend::start(zone).await;
        let mut args = m.args("c1", "us-east", zone, "ratings", b.addr, 9080);
        args.extend(["--id".to_string(), format!("ratings-{i}")]);
        agents.push(m.agent(args).await);
        backends.push(b);
    }
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "ratings", 4).await;
    let share = |s: &std::collections::BTreeMap<String, usize>, k: &str, n: usize| {
        f64::from(u32::try_from(s.get(k).copied().unwrap_or(0)).unwrap())
            / f64::from(u32::try_from(n).unwrap())
    };
    let within = |got: f64, want: f64, n: usize| {
        let sd = (want * (1.0 - want) / f64::from(u32::try_from(n).unwrap())).sqrt();
        (got - want).abs() <= 4.5 * sd.max(0.01)
    };

    // No DestinationRule: no locality (Istio's failover needs outlier detection).
    let n = 400;
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], n).await;
    assert!(within(share(&s, "us-east-1b", n), 0.5, n), "{s:?}");

    // Outlier detection: the caller's zone takes everything.
    let dr = |extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
{extra}"
        )
    };
    let applied = m.apply(&dr("")).await.unwrap();
    wait_version(&frontend, applied.revision).await;
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], 100).await;
    assert_eq!(s.get("us-east-1a"), Some(&100), "{s:?}");

    // One of the zone's two hosts fails and is ejected: the zone is half
    // healthy, so it keeps 70% (1.4 x 50%) and 30% spills to the other zone.
    backends[0].fail_next(1);
    let ejections =
        "fedmesh_agent_outlier_ejections_total{direction=\"outbound\",service=\"default/ratings\"}";
    for _ in 0..200 {
        if scrape(&frontend, ejections).await >= 1.0 {
            break;
        }
        get(frontend.outbound, "ratings:9080", "/", &[]).await;
    }
    assert_eq!(scrape(&frontend, ejections).await, 1.0);
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], n).await;
    assert!(within(share(&s, "us-east-1b", n), 0.3, n), "{s:?}");

    // distribute: 20% stays in the zone, 80% goes to the other.
    let applied = m
        .apply(&dr("    loadBalancer:
      localityLbSetting:
        distribute:
        - from: us-east/us-east-1a/*
          to: {us-east/us-east-1a/*: 20, us-east/us-east-1b/*: 80}
"))
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], n).await;
    // The ejected host stays out: its zone's weight is scaled by its health
    // (20 * min(1, 1.4 * 1/2) = 14 against 80).
    assert!(within(share(&s, "us-east-1b", n), 80.0 / 94.0, n), "{s:?}");

    // enabled: false: no locality, even with outlier detection; the
    // ejected host still gets nothing.
    let applied = m
        .apply(&dr("    loadBalancer:
      localityLbSetting: {enabled: false}
"))
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], n).await;
    assert!(within(share(&s, "us-east-1b", n), 2.0 / 3.0, n), "{s:?}");
    agents.push(frontend);
    stop(agents).await;
}

/// A gateway whose packets vanish (no reset, no refusal) while the
/// federation's weights still send everything there: a request waiting on
/// it does not wait out its 30 s per-try timeout. After a moment without
/// an answer the agent probes the gateway (TCP and TLS handshakes), finds
/// it silent, gives the waiting attempts up as resets and retries them in
/// the next cluster; the gateway is then out for that service, so the
/// next request does not try it at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_gateway_is_found_silent_and_left() {
    let m = one_cluster().await;
    let gw = m.gateway("c3", "127.0.0.1:0", &[]).await;
    let relay = mesh_test::relay::TcpRelay::start(gw.addr).await.unwrap();
    m.cluster(ClusterSpec {
        name: "c3",
        region: "eu-west",
        zone: "eu-west-1a",
        network: "n3",
        gateways: vec![relay.addr().to_string()],
    })
    .await;
    let mut agents = Vec::new();
    let mut backends = Vec::new();
    for svc in ["reviews", "ratings"] {
        for (c, r, z) in [
            ("c3", "eu-west", "eu-west-1a"),
            ("c1", "us-east", "us-east-1a"),
        ] {
            let b = Backend::start(&format!("{svc}-{c}")).await;
            let mut args = m.args(c, r, z, svc, b.addr, 9080);
            args.extend(["--id".to_string(), format!("{svc}-{c}")]);
            agents.push(m.agent(args).await);
            backends.push(b);
        }
        m.export(svc, "c3").await;
        set_weights(&m, svc, "c3").await;
    }
    let applied = m
        .apply(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - retries: {attempts: 2, perTryTimeout: 30s, retryOn: reset}
    timeout: 60s
    route: [{destination: {host: reviews}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - retries: {attempts: 2, perTryTimeout: 30s, retryOn: reset}
    timeout: 60s
    route: [{destination: {host: ratings}}]
",
        )
        .await
        .unwrap();
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 2).await;
    wait_endpoints(&frontend, "ratings", 2).await;
    wait_version(&frontend, applied.revision).await;
    for svc in ["reviews", "ratings"] {
        let host = format!("{svc}:9080");
        let want = format!("{svc}-c3");
        mesh_test::assert_eventually!(
            get(frontend.outbound, &host, "/", &[])
                .await
                .header("x-backend")
                == want
        );
    }

    let reviews_retries =
        "fedmesh_agent_retries_total{direction=\"outbound\",service=\"default/reviews\"}";
    relay.blackhole();
    // Bounded well above the probe's second, far below the 30 s per try.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        get(frontend.outbound, "reviews:9080", "/", &[]),
    )
    .await
    .expect("the request waited on the black-holed gateway");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-backend"), "reviews-c1");
    assert_eq!(
        scrape(&frontend, "fedmesh_agent_upstream_addresses_silent_total").await,
        1.0
    );
    // Another service through the same gateway: its request too is found
    // silent (the relay completes TCP handshakes, so the silence is the
    // TLS handshake's, for each server name) and answered from c1.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        get(frontend.outbound, "ratings:9080", "/", &[]),
    )
    .await
    .expect("ratings waited on the black-holed gateway");
    assert_eq!(r.header("x-backend"), "ratings-c1");
    assert_eq!(
        scrape(&frontend, "fedmesh_agent_upstream_addresses_silent_total").await,
        2.0
    );
    // Once found silent, reviews does not try the gateway again for now.
    let before = scrape(&frontend, reviews_retries).await;
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.header("x-backend"), "reviews-c1");
    assert_eq!(
        scrape(&frontend, reviews_retries).await,
        before,
        "reviews tried the silent gateway"
    );
    agents.push(frontend);
    stop(agents).await;
    gw.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_limits_what_the_agent_receives() {
    let m = one_cluster().await;
    let rb = Backend::start("reviews-1").await;
    let tb = Backend::start("ratings-1").await;
    let reviews = m.c1_agent("reviews", rb.addr, 9080, &[]).await;
    let ratings = m.c1_agent("ratings", tb.addr, 9080, &[]).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "ratings", 1).await;
    assert_eq!(
        get(frontend.outbound, "ratings:9080", "/", &[])
            .await
            .status,
        200
    );

    // frontend may only reach reviews: ratings' endpoints and routing
    // documents are no longer sent to it at all.
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  egress:
  - hosts: ["./reviews.default.svc.cluster.local"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http: [{route: [{destination: {host: ratings}}]}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    let svc =
        |n: &str| -> mesh_core::service::ServiceKey { format!("default/{n}").parse().unwrap() };
    let t = frontend.table.load();
    assert!(!t.knows(&svc("ratings")), "ratings must not be received");
    assert!(t.knows(&svc("reviews")));
    let r = get(frontend.outbound, "ratings:9080", "/", &[]).await;
    assert_eq!(
        (r.status, r.header("x-fedmesh-reason")),
        (502, "unknown_service")
    );
    assert_eq!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status,
        200
    );
    drop(t);

    // Widen the Sidecar: ratings comes back.
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  egress:
  - hosts: ["./*"]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    mesh_test::assert_eventually!(frontend.table.load().knows(&svc("ratings")));
    assert_eq!(
        get(frontend.outbound, "ratings:9080", "/", &[])
            .await
            .status,
        200
    );
    stop(vec![reviews, ratings, frontend]).await;
}

/// Three reviews endpoints in one zone, their backends, and a frontend.
async fn three_reviews(
    m: &Mesh,
) -> (
    Vec<Backend>,
    Vec<mesh_agent::app::Bound>,
    mesh_agent::app::Bound,
) {
    let mut backends = Vec::new();
    let mut agents = Vec::new();
    for i in 1..=3 {
        let b = Backend::start(&format!("reviews-{i}")).await;
        let mut a = m.args("c1", "us-east", "us-east-1a", "reviews", b.addr, 9080);
        a.extend(["--id".into(), format!("r{i}")]);
        agents.push(m.agent(a).await);
        backends.push(b);
    }
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 3).await;
    (backends, agents, frontend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint_for_a_while() {
    let m = one_cluster().await;
    let (backends, agents, frontend) = three_reviews(&m).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 1s
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{retries: {attempts: 0}, route: [{destination: {host: reviews}}]}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    backends[0].fail_next(1000);
    // Round robin: reviews-1 answers 503 twice, then is ejected; after that
    // every request succeeds on the two others.
    let s = spread(frontend.outbound, "reviews:9080", "/", &[], 30).await;
    assert_eq!(s.get("status 503"), Some(&2), "{s:?}");
    let seen_before = backends[0].requests();
    let s = spread(frontend.outbound, "reviews:9080", "/", &[], 20).await;
    assert_eq!(s.get("status 503"), None, "{s:?}");
    assert_eq!(
        backends[0].requests(),
        seen_before,
        "ejected host got traffic"
    );
    // The ejection ends after baseEjectionTime; the host is tried again
    // (fails twice more and is ejected for 2 s: the time grows).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s = spread(frontend.outbound, "reviews:9080", "/", &[], 12).await;
    assert_eq!(s.get("status 503"), Some(&2), "{s:?}");
    let ejections = scrape(&frontend, "fedmesh_agent_outlier_ejections_total").await;
    assert_eq!(ejections, 2.0);
    let mut all = agents;
    all.push(frontend);
    stop(all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_user_on_one_endpoint() {
    let m = one_cluster().await;
    let (_backends, agents, frontend) = three_reviews(&m).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    let mut owners = std::collections::BTreeSet::new();
    for user in ["ann", "bob", "cid", "dee", "eve", "fay", "gus", "hal"] {
        let s = spread(
            frontend.outbound,
            "reviews:9080",
            "/",
            &[("x-user", user)],
            8,
        )
        .await;
        assert_eq!(s.len(), 1, "{user} moved between endpoints: {s:?}");
        owners.extend(s.into_keys());
    }
    assert!(
        owners.len() >= 2,
        "eight users all on one endpoint: {owners:?}"
    );
    let mut all = agents;
    all.push(frontend);
    stop(all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_sends_a_copy_and_answers_from_the_primary() {
    let m = one_cluster().await;
    let primary = Backend::start("reviews-1").await;
    let shadow = Backend::start("reviews-shadow").await;
    let a1 = m.c1_agent("reviews", primary.addr, 9080, &[]).await;
    let a2 = m
        .agent(m.args(
            "c1",
            "us-east",
            "us-east-1a",
            "reviews-next",
            shadow.addr,
            9080,
        ))
        .await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews-next", 1).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    mirror: {host: reviews-next}
    mirrorPercentage: {value: 100}
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    for _ in 0..5 {
        let r = send(
            frontend.outbound,
            "POST",
            "reviews:9080",
            "/order",
            &[],
            bytes::Bytes::from_static(b"book"),
            false,
        )
        .await;
        assert_eq!((r.status, r.header("x-backend")), (200, "reviews-1"));
    }
    mesh_test::assert_eventually!(shadow.requests() == 5);
    let seen = shadow.seen();
    assert!(seen.iter().all(|s| s.body == b"book" && s.path == "/order"));
    // Istio marks mirrored requests by suffixing the host with -shadow.
    assert_eq!(seen[0].header("host"), Some("reviews-shadow:9080"));
    assert_eq!(primary.requests(), 5);
    stop(vec![a1, a2, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unready_application_is_taken_out_of_rotation() {
    let m = one_cluster().await;
    let b1 = Backend::start("ratings-1").await;
    let b2 = Backend::start("ratings-2").await;
    let mut a1 = m.args("c1", "us-east", "us-east-1a", "ratings", b1.addr, 9080);
    a1.extend([
        "--id".into(),
        "r1".into(),
        "--readiness-path".into(),
        "/status/200".into(),
    ]);
    let mut a2 = m.args("c1", "us-east", "us-east-1a", "ratings", b2.addr, 9080);
    a2.extend([
        "--id".into(),
        "r2".into(),
        "--readiness-path".into(),
        "/ready-or-not".into(),
    ]);
    let r1 = m.agent(a1).await;
    let r2 = m.agent(a2).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "ratings", 2).await;
    // ratings-2's probe path starts failing: its endpoint turns unhealthy
    // in the registry and callers stop choosing it.
    b2.fail_next(usize::MAX);
    wait_endpoints(&frontend, "ratings", 1).await;
    assert_eq!(*r2.health.borrow(), mesh_core::endpoint::Health::Unhealthy);
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], 10).await;
    assert_eq!(s.get("ratings-1"), Some(&10), "{s:?}");
    // Ready again: back in rotation.
    b2.fail_next(0);
    wait_endpoints(&frontend, "ratings", 2).await;
    stop(vec![r1, r2, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_pool_limits_overflow_with_503() {
    let m = one_cluster().await;
    let b = Backend::start("slow").await;
    let slow = m.c1_agent("slow", b.addr, 9080, &[]).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "slow", 1).await;
    // One connection, one request may wait for it: of four at once, two are
    // served (one after the other), two overflow.
    let v = burst(
        &m,
        &frontend,
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: slow}
spec:
  host: slow
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: slow}
spec:
  hosts: [slow]
  http: [{retries: {attempts: 0}, route: [{destination: {host: slow}}]}]
"#,
    )
    .await;
    assert_eq!(
        v,
        vec![
            (200, String::new()),
            (200, String::new()),
            (503, "overflow".into()),
            (503, "overflow".into())
        ]
    );
    // Three requests in flight at most.
    let v = burst(
        &m,
        &frontend,
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: slow}
spec:
  host: slow
  trafficPolicy:
    connectionPool:
      http: {http2MaxRequests: 3}
"#,
    )
    .await;
    assert_eq!(v.iter().filter(|(c, _)| *c == 200).count(), 3, "{v:?}");
    assert_eq!(v.last().unwrap(), &(503, "overflow".to_string()));
    stop(vec![slow, frontend]).await;
}

/// Applies `yaml`, then sends four slow requests at once; their sorted
/// (status, reason) pairs.
async fn burst(m: &Mesh, frontend: &mesh_agent::app::Bound, yaml: &str) -> Vec<(u16, String)> {
    let applied = m.apply(yaml).await.unwrap();
    wait_version(frontend, applied.revision).await;
    let out = frontend.outbound;
    let calls: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { get(out, "slow:9080", "/sleep/600", &[]).await }))
        .collect();
    let mut v = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        v.push((r.status, r.header("x-fedmesh-reason").to_string()));
    }
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_consecutive_errors_ejects_on_gateway_errors() {
    let m = one_cluster().await;
    let (backends, agents, frontend) = three_reviews(&m).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutiveErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{retries: {attempts: 0}, route: [{destination: {host: reviews}}]}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    backends[1].fail_next(1000);
    let s = spread(frontend.outbound, "reviews:9080", "/", &[], 30).await;
    assert_eq!(s.get("status 503"), Some(&2), "{s:?}");
    assert_eq!(s.get("reviews-2"), None, "{s:?}");
    let mut all = agents;
    all.push(frontend);
    stop(all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_reused() {
    let m = one_cluster().await;
    let b = Backend::start("reviews-1").await;
    let reviews = m.c1_agent("reviews", b.addr, 9080, &[]).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    // 50 requests, each on a new connection from the application: the
    // agents reuse one mTLS connection between them and one to the app.
    for _ in 0..50 {
        assert_eq!(
            get(frontend.outbound, "reviews:9080", "/", &[])
                .await
                .status,
            200
        );
    }
    for _ in 0..10 {
        let r = send(
            frontend.outbound,
            "GET",
            "reviews:9080",
            "/",
            &[],
            bytes::Bytes::new(),
            true,
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let handshakes = scrape(&reviews, "fedmesh_agent_inbound_connections_total").await;
    assert!(
        handshakes <= 2.0,
        "{handshakes} mTLS connections for 60 requests"
    );
    assert!(
        b.connections() <= 2,
        "{} app connections for 60 requests",
        b.connections()
    );
    assert_eq!(b.requests(), 60);
    stop(vec![reviews, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_when_the_federation_comes_back() {
    let mut m = one_cluster().await;
    let v1 = Backend::start("v1").await;
    let mut a1 = m.args("c1", "us-east", "us-east-1a", "reviews", v1.addr, 9080);
    a1.extend(["--label".into(), "version=v1".into()]);
    let r1 = m.agent(a1).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;

    // The federation goes away and comes back on the same address over the
    // same registry; meanwhile the agent serves its last config.
    let addr = m.fed.addr;
    let store = m.fed.store.clone();
    let (elsewhere, same) = (
        m.replica_config(([127, 0, 0, 1], 0).into()),
        m.replica_config(addr),
    );
    let fed = std::mem::replace(
        &mut m.fed,
        federation::app::serve(&elsewhere, store.clone())
            .await
            .unwrap(),
    );
    fed.shutdown(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status,
        200
    );
    let stand_in = std::mem::replace(
        &mut m.fed,
        federation::app::serve(&same, store).await.unwrap(),
    );
    stand_in.shutdown(Duration::from_secs(1)).await.unwrap();

    // A change made after the restart reaches the agent: it reconnected.
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews}}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    assert_eq!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status,
        418
    );
    stop(vec![r1, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_and_header_edits_reach_the_backend_and_the_caller() {
    let m = one_cluster().await;
    let b = Backend::start("details-1").await;
    let details = m.c1_agent("details", b.addr, 9080, &[]).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "details", 1).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details}
spec:
  hosts: [details]
  http:
  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/, authority: details-internal}
    headers:
      request: {set: {x-route: v1}, remove: [x-drop-me]}
      response: {add: {x-served-by: fedmesh}}
    route:
    - destination: {host: details}
      headers:
        request: {add: {x-dest: details}}
        response: {set: {x-dest-seen: "yes"}}
  - route: [{destination: {host: details}}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    let r = get(
        frontend.outbound,
        "details:9080",
        "/v1/books/7?lang=en",
        &[("x-drop-me", "1")],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // The prefix the request matched is replaced; the query stays.
    assert!(r.body.contains("GET /api/books/7?lang=en"), "{}", r.body);
    assert_eq!(r.header("x-seen-host"), "details-internal");
    assert_eq!(r.header("x-served-by"), "fedmesh");
    assert_eq!(r.header("x-dest-seen"), "yes");
    let seen = b.seen().pop().unwrap();
    assert_eq!(seen.header("x-route"), Some("v1"));
    assert_eq!(seen.header("x-dest"), Some("details"));
    assert_eq!(seen.header("x-drop-me"), None);
    // The other route: untouched.
    let r = get(frontend.outbound, "details:9080", "/v2/x", &[]).await;
    assert!(r.body.contains("GET /v2/x"), "{}", r.body);
    assert_eq!(r.header("x-served-by"), "");
    stop(vec![details, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_enrolled_with_join_tokens_talk_mtls_with_ca_issued_identities() {
    let m = one_cluster().await;
    m.fed.shared.wait_synced().await;
    let b = Backend::start("reviews-1").await;
    let reviews = enrolled(&m, "reviews", b.addr, 9080).await;
    let app = Backend::start("frontend").await;
    let frontend = enrolled(&m, "frontend", app.addr, 8080).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-seen-xfcc"),
        "By=spiffe://cluster.local/ns/default/sa/reviews;URI=spiffe://cluster.local/ns/default/sa/frontend"
    );

    // A single-use token: a second agent cannot start with it.
    use clap::Parser;
    let t = join_token(&m, "frontend").await;
    let third = m
        .agent(with_token(
            m.args("c1", "us-east", "us-east-1a", "frontend", app.addr, 8080),
            &t,
        ))
        .await;
    let args = with_token(
        m.args("c1", "us-east", "us-east-1a", "frontend", app.addr, 8080),
        &t,
    );
    let cfg = mesh_agent::config::Config::from_args(
        &mesh_agent::config::Args::try_parse_from(args).unwrap(),
    )
    .unwrap();
    let err = mesh_agent::app::build(&cfg).await.err().unwrap();
    assert!(
        format!("{err:#}").contains("refused a certificate for spiffe://cluster.local/ns/default/sa/frontend: token unknown, expired or already used"),
        "{err:#}"
    );
    stop(vec![reviews, frontend, third]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_an_identity_the_federation_does_not_list_is_refused() {
    let m = one_cluster().await;
    // An impostor is listed as reviews (identity .../sa/reviews in the
    // registry) but holds a certificate for .../sa/evil from the same CA.
    // The federation refuses its own registration (its identity is not the
    // endpoint's); the listing stands for a stale or mistaken one an admin
    // made.
    let b = Backend::start("impostor").await;
    let mut args = m.args("c1", "us-east", "us-east-1a", "reviews", b.addr, 9080);
    let (cert, key) = m.certs("c1", "default", "evil");
    for (flag, v) in [("--cert", cert), ("--key", key)] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = v.display().to_string();
    }
    let impostor = m.agent(args).await;
    support::register_by_hand(&m, "c1", "reviews", "impostor", impostor.inbound).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-fedmesh-reason"), "upstream_connect_failure");
    assert!(r.body.contains("server identity spiffe://cluster.local/ns/default/sa/evil is not one the federation lists"), "{}", r.body);
    assert_eq!(b.requests(), 0, "no request may reach an impostor");
    // The genuine endpoint joins: requests go there, never to the impostor.
    let real = Backend::start("reviews-real").await;
    let genuine = m
        .c1_agent("reviews", real.addr, 9080, &["--id", "real"])
        .await;
    wait_endpoints(&frontend, "reviews", 2).await;
    let s = spread(frontend.outbound, "reviews:9080", "/", &[], 10).await;
    assert_eq!(s.get("reviews-real"), Some(&10), "{s:?}");
    assert_eq!(b.requests(), 0);
    stop(vec![impostor, genuine, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_at_half_life_under_load_without_a_failed_request() {
    // One-minute certificates: renewed about 30 s after issue.
    let m = Mesh::one_cluster_with(|c| c.ca.leaf_ttl = Duration::from_secs(60)).await;
    m.fed.shared.wait_synced().await;
    let b = Backend::start("reviews-1").await;
    let reviews = enrolled(&m, "reviews", b.addr, 9080).await;
    let app = Backend::start("frontend").await;
    let frontend = enrolled(&m, "frontend", app.addr, 8080).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let before = scrape(&reviews, "fedmesh_agent_certificate_not_after_seconds").await;
    assert!(before > 0.0);

    // Steady requests, half on new connections from the app, until both
    // agents have renewed and a while after.
    let (mut ok, mut failed) = (0u32, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(50);
    let mut renewed_at = None;
    while tokio::time::Instant::now() < deadline {
        let h2 = ok % 2 == 0;
        let r = send(
            frontend.outbound,
            "GET",
            "reviews:9080",
            "/",
            &[],
            bytes::Bytes::new(),
            h2,
        )
        .await;
        if r.status == 200 {
            ok += 1;
        } else {
            failed.push(r);
        }
        if renewed_at.is_none()
            && scrape(&reviews, "fedmesh_agent_certificate_renewals_total").await >= 1.0
            && scrape(&frontend, "fedmesh_agent_certificate_renewals_total").await >= 1.0
        {
            renewed_at = Some(tokio::time::Instant::now());
        }
        if renewed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(renewed_at.is_some(), "no renewal within 50 s");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed.first()
    );
    let after = scrape(&reviews, "fedmesh_agent_certificate_not_after_seconds").await;
    assert!(
        after > before,
        "the renewed certificate must outlive the first"
    );
    stop(vec![reviews, frontend]).await;
}

/// A plaintext HTTP/1.1 request straight to an agent's inbound listener;
/// the response's status line, or "" when the connection is closed on it.
async fn plaintext_status(inbound: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nHost: reviews:9080\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_allow_and_deny_with_istio_semantics() {
    let m = one_cluster().await;
    let b = Backend::start("reviews-1").await;
    let reviews = m.c1_agent("reviews", b.addr, 9080, &[]).await;
    let fa = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", fa.addr, 8080, &[]).await;
    let ra = Backend::start("ratings").await;
    let ratings = m.c1_agent("ratings", ra.addr, 8081, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    wait_endpoints(&ratings, "reviews", 1).await;
    let applied = m
        .apply(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-readers}
spec:
  selector: {matchLabels: {}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/frontend"]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: block-header}
spec:
  action: DENY
  rules:
  - when: [{key: "request.headers[x-block]", values: ["yes"]}]
"#,
        )
        .await
        .unwrap();
    wait_version(&reviews, applied.revision).await;
    let ok = get(frontend.outbound, "reviews:9080", "/api/books", &[]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    // Not the allowed operation, or not the allowed caller: 403, counted.
    let r = get(frontend.outbound, "reviews:9080", "/admin", &[]).await;
    assert_eq!((r.status, r.header("x-fedmesh-reason")), (403, "denied"));
    assert!(r.body.contains("no ALLOW policy matched"), "{}", r.body);
    let r = get(ratings.outbound, "reviews:9080", "/api/books", &[]).await;
    assert_eq!(r.status, 403);
    // DENY before ALLOW.
    let r = get(
        frontend.outbound,
        "reviews:9080",
        "/api/books",
        &[("x-block", "yes")],
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(
        r.body
            .contains("denied by DENY policy default/block-header"),
        "{}",
        r.body
    );
    assert_eq!(b.requests(), 1, "denied requests never reach the app");
    // Plaintext has no principal: not allowed either.
    assert!(plaintext_status(reviews.inbound)
        .await
        .starts_with("HTTP/1.1 403"));
    let denied = "fedmesh_agent_requests_total{direction=\"inbound\",service=\"default/reviews\",code=\"403\",reason=\"denied\",";
    assert_eq!(scrape(&reviews, denied).await, 4.0);
    // Three from agents of c1, one from outside the mesh.
    assert_eq!(
        scrape(
            &reviews,
            &format!("{denied}source_cluster=\"c1\",destination_cluster=\"c1\"}}")
        )
        .await,
        3.0
    );
    assert_eq!(
        scrape(
            &reviews,
            &format!("{denied}source_cluster=\"external\",destination_cluster=\"c1\"}}")
        )
        .await,
        1.0
    );
    stop(vec![reviews, frontend, ratings]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_strict_refuses_plaintext_permissive_takes_both() {
    let m = one_cluster().await;
    let b = Backend::start("reviews-1").await;
    let reviews = m.c1_agent("reviews", b.addr, 9080, &[]).await;
    let fa = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", fa.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    // Istio's default, PERMISSIVE: plaintext and mTLS on the same port.
    assert_eq!(plaintext_status(reviews.inbound).await, "HTTP/1.1 200 OK");
    assert_eq!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status,
        200
    );
    let applied = m
        .apply(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#,
        )
        .await
        .unwrap();
    wait_version(&reviews, applied.revision).await;
    assert_eq!(
        plaintext_status(reviews.inbound).await,
        "",
        "STRICT closes plaintext"
    );
    assert_eq!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status,
        200
    );
    // A namespace policy overrides the mesh's.
    let applied = m
        .apply(
            r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default}
spec: {mtls: {mode: PERMISSIVE}}
"#,
        )
        .await
        .unwrap();
    wait_version(&reviews, applied.revision).await;
    assert_eq!(plaintext_status(reviews.inbound).await, "HTTP/1.1 200 OK");
    stop(vec![reviews, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_by_source_cluster_reads_the_issuing_intermediate() {
    let m = Mesh::one_cluster_on("127.0.0.1").await;
    m.cluster(ClusterSpec {
        name: "c2",
        region: "us-east",
        zone: "us-east-1b",
        network: "n1",
        gateways: vec![],
    })
    .await;
    m.fed.shared.wait_synced().await;
    let b = Backend::start("reviews-1").await;
    let reviews = enrolled(&m, "reviews", b.addr, 9080).await;
    let app = Backend::start("frontend").await;
    let frontend = enrolled(&m, "frontend", app.addr, 8080).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let deny = |cluster: &str| {
        format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-cluster}}
spec:
  action: DENY
  rules: [{{when: [{{key: source.cluster, values: ["{cluster}"]}}]}}]
"#
        )
    };
    // frontend's certificate was signed by c1's intermediate.
    let applied = m.apply(&deny("c1")).await.unwrap();
    wait_version(&reviews, applied.revision).await;
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 403, "{r:?}");
    let applied = m.apply(&deny("c2")).await.unwrap();
    wait_version(&reviews, applied.revision).await;
    assert_eq!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status,
        200
    );
    stop(vec![reviews, frontend]).await;
}

/// An ES256 signer and its public JWK.
fn es256(kid: &str) -> (jsonwebtoken::EncodingKey, serde_json::Value) {
    use base64::Engine as _;
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    });
    (
        jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        jwk,
    )
}

/// An RS256 signer (openssl-made key) and its public JWK.
fn rs256(dir: &std::path::Path, kid: &str) -> (jsonwebtoken::EncodingKey, serde_json::Value) {
    use base64::Engine as _;
    let pem = dir.join(format!("{kid}.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["genrsa", "-out", pem.to_str().unwrap(), "2048"])
        .output()
        .unwrap();
    assert!(ok.status.success());
    let out = std::process::Command::new("openssl")
        .args(["rsa", "-in", pem.to_str().unwrap(), "-noout", "-modulus"])
        .output()
        .unwrap();
    let hex = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("Modulus=")
        .to_string();
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let jwk = serde_json::json!({
        "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "e": "AQAB",
        "n": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n),
    });
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&pem).unwrap()).unwrap();
    (key, jwk)
}

fn token(
    alg: jsonwebtoken::Algorithm,
    kid: &str,
    key: &jsonwebtoken::EncodingKey,
    claims: serde_json::Value,
) -> String {
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_checks_jwts_es256_and_rs256() {
    use base64::Engine as _;
    let m = one_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let (ec, ec_jwk) = es256("ec1");
    let (rsa, rsa_jwk) = rs256(dir.path(), "rsa1");
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(
        &jwks_file,
        serde_json::json!({"keys": [rsa_jwk]}).to_string(),
    )
    .unwrap();
    let b = Backend::start("reviews-1").await;
    let reviews = m.c1_agent("reviews", b.addr, 9080, &[]).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let yaml = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt}}
spec:
  jwtRules:
  - issuer: https://ec.example
    audiences: [reviews]
    jwks: '{ec_jwks}'
    outputPayloadToHeader: x-jwt-payload
  - issuer: https://rsa.example
    jwksUri: file://{file}
    forwardOriginalToken: true
"#,
        ec_jwks = serde_json::json!({"keys": [ec_jwk]}),
        file = jwks_file.display()
    );
    let applied = m.apply(&yaml).await.unwrap();
    wait_version(&reviews, applied.revision).await;
    let now = federation::registry::now_unix_ms() / 1000;
    let ec_claims = |aud: &str, exp: i64| serde_json::json!({"iss": "https://ec.example", "sub": "alice", "aud": aud, "exp": exp});
    let call = |t: String| {
        let out = frontend.outbound;
        async move {
            get(
                out,
                "reviews:9080",
                "/",
                &[("authorization", &format!("Bearer {t}"))],
            )
            .await
        }
    };

    // No token: passes (RequestAuthentication alone requires none).
    assert_eq!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status,
        200
    );
    // ES256, right issuer and audience: the app gets the payload, not the token.
    let r = call(token(
        jsonwebtoken::Algorithm::ES256,
        "ec1",
        &ec,
        ec_claims("reviews", now + 600),
    ))
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = b.seen().pop().unwrap();
    assert_eq!(
        seen.header("authorization"),
        None,
        "the token is not forwarded by default"
    );
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seen.header("x-jwt-payload").unwrap())
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(claims["sub"], "alice");
    // RS256 from a JWKS file, forwarded as asked; also as a query parameter.
    let rt = token(
        jsonwebtoken::Algorithm::RS256,
        "rsa1",
        &rsa,
        serde_json::json!({"iss": "https://rsa.example", "sub": "bob", "exp": now + 600}),
    );
    let r = call(rt.clone()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(b
        .seen()
        .pop()
        .unwrap()
        .header("authorization")
        .unwrap()
        .ends_with(&rt));
    let r = get(
        frontend.outbound,
        "reviews:9080",
        &format!("/?access_token={rt}"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    // Refused with 401: expired, wrong audience, another key, unknown issuer, garbage.
    let (other, _) = es256("ec1");
    for (t, why) in [
        (
            token(
                jsonwebtoken::Algorithm::ES256,
                "ec1",
                &ec,
                ec_claims("reviews", now - 600),
            ),
            "ExpiredSignature",
        ),
        (
            token(
                jsonwebtoken::Algorithm::ES256,
                "ec1",
                &ec,
                ec_claims("ratings", now + 600),
            ),
            "InvalidAudience",
        ),
        (
            token(
                jsonwebtoken::Algorithm::ES256,
                "ec1",
                &other,
                ec_claims("reviews", now + 600),
            ),
            "InvalidSignature",
        ),
        (
            token(
                jsonwebtoken::Algorithm::ES256,
                "ec1",
                &ec,
                serde_json::json!({"iss": "https://evil.example", "exp": now + 600}),
            ),
            "",
        ),
        ("not.a.jwt".to_string(), "malformed token"),
    ] {
        let before = b.requests();
        let r = call(t).await;
        assert_eq!(
            (r.status, r.header("x-fedmesh-reason")),
            (401, "jwt_invalid"),
            "{r:?}"
        );
        assert!(r.body.contains(why), "{why}: {}", r.body);
        assert_eq!(
            b.requests(),
            before,
            "a refused token never reaches the app"
        );
    }

    // Requiring a JWT: Istio's pattern, an ALLOW with requestPrincipals,
    // and a claim condition. No token: 403; alice from ec: allowed; bob
    // from rsa: valid token, but not an allowed principal.
    let applied = m
        .apply(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt}
spec:
  action: ALLOW
  rules:
  - from: [{source: {requestPrincipals: ["https://ec.example/*"]}}]
    when: [{key: request.auth.audiences, values: [reviews]}]
"#,
        )
        .await
        .unwrap();
    wait_version(&reviews, applied.revision).await;
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(
        (r.status, r.header("x-fedmesh-reason")),
        (403, "denied"),
        "{r:?}"
    );
    let r = call(token(
        jsonwebtoken::Algorithm::ES256,
        "ec1",
        &ec,
        ec_claims("reviews", now + 600),
    ))
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = call(rt.clone()).await;
    assert_eq!(r.status, 403, "{r:?}");
    stop(vec![reviews, frontend]).await;
}

/// An agent killed with SIGKILL cannot deregister: its endpoint used to
/// stay healthy forever. Now it lives on a lease the agent renews, and
/// callers stop choosing it within the lease's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_endpoint_leaves_rotation_within_its_lease() {
    let m = Mesh::one_cluster_with(|c| c.heartbeat_ttl = Duration::from_secs(2)).await;
    let b1 = Backend::start("ratings-1").await;
    let b2 = Backend::start("ratings-2").await;
    let mut a1 = m.args("c1", "us-east", "us-east-1a", "ratings", b1.addr, 9080);
    a1.extend(["--id".into(), "r1".into()]);
    let r1 = m.agent(a1).await;
    // ratings-2's agent is a real process, enrolled with a join token.
    let t = join_token(&m, "ratings").await;
    let mut a2 = with_token(
        m.args("c1", "us-east", "us-east-1a", "ratings", b2.addr, 9080),
        &t,
    );
    a2.extend(["--id".into(), "r2".into()]);
    let a2: Vec<&str> = a2[1..].iter().map(String::as_str).collect();
    let mut killed = mesh_test::process::Proc::spawn(env!("CARGO_BIN_EXE_fedmesh-agent"), &a2);
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "ratings", 2).await;
    killed.signal("KILL");
    killed.wait_exit(Duration::from_secs(10));
    // Out of rotation once the lease lapses (2 s) and the leader sweeps.
    wait_endpoints(&frontend, "ratings", 1).await;
    let s = spread(frontend.outbound, "ratings:9080", "/", &[], 10).await;
    assert_eq!(s.get("ratings-1"), Some(&10), "{s:?}");
    stop(vec![r1, frontend]).await;
}

/// A TCP connection over mTLS (no ALPN: opaque TCP) straight to an agent's
/// inbound listener, as workload `sa` of `default`.
async fn tcp_as(
    m: &Mesh,
    inbound: std::net::SocketAddr,
    sa: &str,
    server_sa: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tcp_offering(m, inbound, sa, server_sa, &[]).await
}

/// [`tcp_as`], offering these ALPN protocols.
async fn tcp_offering(
    m: &Mesh,
    inbound: std::net::SocketAddr,
    sa: &str,
    server_sa: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let leaf = m.ca.issue(
        &[],
        Some(&format!("spiffe://cluster.local/ns/default/sa/{sa}")),
    );
    let mut cfg = (*m.ca.client_config(
        &leaf,
        &format!("spiffe://cluster.local/ns/default/sa/{server_sa}"),
    ))
    .clone();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let cfg = std::sync::Arc::new(cfg);
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("db").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Sends `ping`, half-closes, and returns what came back before the close
/// ("" when the agent refused the connection).
async fn tcp_exchange(m: &Mesh, inbound: std::net::SocketAddr, sa: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tcp_as(m, inbound, sa, "db").await;
    let _ = s.write_all(b"ping").await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Is the connection closed by the other side within `patience`?
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, patience: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// AuthorizationPolicy on an opaque TCP port: L4 attributes decide; an
/// ALLOW rule with HTTP-only fields never matches and a DENY rule applies
/// without them (Istio's documented semantics); a new DENY closes an open
/// connection it refuses after the policy drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ports_meet_authorization_policy_and_changes_reach_open_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = one_cluster().await;
    let echo = mesh_test::tcp::Echo::start(b"-bye").await;
    let db = m
        .c1_agent("db", echo.addr, 9000, &["--protocol", "tcp"])
        .await;
    assert_eq!(tcp_exchange(&m, db.inbound, "frontend").await, "ping-bye");
    let policy = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: db}}\nspec:\n{spec}\n"
        )
    };
    let apply = |spec: String| {
        let m = &m;
        let db = &db;
        async move {
            let applied = m.apply(&spec).await.unwrap();
            wait_version(db, applied.revision).await;
        }
    };
    // ALLOW by principal: the named caller only.
    apply(policy(
        "  action: ALLOW\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}], to: [{operation: {ports: ['9000']}}]}]",
    ))
    .await;
    assert_eq!(tcp_exchange(&m, db.inbound, "frontend").await, "ping-bye");
    assert_eq!(tcp_exchange(&m, db.inbound, "intruder").await, "");
    // ALLOW holding an HTTP-only field: never matches a TCP connection.
    apply(policy(
        "  action: ALLOW\n  rules: [{from: [{source: {principals: ['*']}}], to: [{operation: {methods: [GET]}}]}]",
    ))
    .await;
    assert_eq!(tcp_exchange(&m, db.inbound, "frontend").await, "");
    // DENY holding an HTTP-only field: applied without it.
    apply(policy(
        "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/intruder]}}], to: [{operation: {paths: [/admin]}}]}]",
    ))
    .await;
    assert_eq!(tcp_exchange(&m, db.inbound, "frontend").await, "ping-bye");
    assert_eq!(tcp_exchange(&m, db.inbound, "intruder").await, "");
    // Offering HTTP in ALPN does not turn the TCP port into an HTTP one
    // (where the DENY's paths would be read, and miss).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tcp_offering(&m, db.inbound, "intruder", "db", &[b"http/1.1", b"h2"]).await;
        let _ = s
            .write_all(b"POST / HTTP/1.1\r\nHost: db\r\nContent-Length: 4\r\n\r\nping")
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }

    // An open connection a new DENY refuses is closed after the drain.
    let mut open = tcp_as(&m, db.inbound, "frontend", "db").await;
    open.write_all(b"a").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"a", "the connection works before the change");
    apply(policy(
        "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]}]",
    ))
    .await;
    assert!(
        closed_within(
            &mut open,
            mesh_agent::inbound::POLICY_DRAIN + Duration::from_secs(5)
        )
        .await,
        "a TCP connection the new DENY refuses stays open"
    );
    assert_eq!(tcp_exchange(&m, db.inbound, "frontend").await, "");
    // Every refusal counted: intruder three times, frontend three times
    // (two new connections refused, one open connection closed).
    assert_eq!(
        scrape(&db, "fedmesh_agent_inbound_connections_denied_total").await,
        6.0
    );
    stop(vec![db]).await;
}

/// HTTP/1.1 keep-alive over one plaintext connection: the status line of
/// each answer, `None` once the agent closed it.
struct KeepAlive(tokio::net::TcpStream);

impl KeepAlive {
    async fn get(&mut self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET {path} HTTP/1.1\r\nHost: reviews:9080\r\n\r\n");
        self.0.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.0.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = self.0.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        head.lines().next().map(str::to_string)
    }
}

/// Policy changes reach connections already open: a new DENY applies to
/// the next request on a kept-alive connection, and a change to STRICT
/// closes a plaintext connection that PERMISSIVE had let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_reach_kept_alive_connections() {
    let m = one_cluster().await;
    let b = Backend::start("reviews-1").await;
    let reviews = m.c1_agent("reviews", b.addr, 9080, &[]).await;
    let mut conn = KeepAlive(
        tokio::net::TcpStream::connect(reviews.inbound)
            .await
            .unwrap(),
    );
    assert_eq!(
        conn.get("/secret").await.as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    let applied = m
        .apply(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-secret}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/secret]}}]}]
"#,
        )
        .await
        .unwrap();
    wait_version(&reviews, applied.revision).await;
    assert_eq!(
        conn.get("/secret").await.as_deref(),
        Some("HTTP/1.1 403 Forbidden"),
        "the next request on the same connection meets the new DENY"
    );
    assert_eq!(conn.get("/open").await.as_deref(), Some("HTTP/1.1 200 OK"));
    let applied = m
        .apply(
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#,
        )
        .await
        .unwrap();
    wait_version(&reviews, applied.revision).await;
    assert!(
        closed_within(
            &mut conn.0,
            mesh_agent::inbound::POLICY_DRAIN + Duration::from_secs(5)
        )
        .await,
        "a plaintext connection stays open after STRICT"
    );
    assert_eq!(
        scrape(&reviews, "fedmesh_agent_inbound_connections_denied_total").await,
        1.0
    );
    stop(vec![reviews]).await;
}

/// An agent restarted while the federation is away serves from its state
/// file (routes, endpoints, policies, weights) until the federation
/// answers; a file older than `--state-max-age` is not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_from_its_state_file_while_the_federation_is_away() {
    let m = one_cluster().await;
    let b = Backend::start("reviews-1").await;
    let reviews = m.c1_agent("reviews", b.addr, 9080, &[]).await;
    let app = Backend::start("frontend").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent.state");
    let state_arg = state.to_str().unwrap().to_string();
    let frontend = m
        .c1_agent("frontend", app.addr, 8080, &["--state-file", &state_arg])
        .await;
    wait_endpoints(&frontend, "reviews", 1).await;
    // A header route, so the saved policy is seen to work too.
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {x-user: {exact: blocked}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    mesh_test::assert_eventually!(
        std::fs::metadata(&state)
            .is_ok_and(|m| m.modified().unwrap().elapsed().unwrap() < Duration::from_secs(30))
            && frontend.table.load().version >= applied.revision,
        Duration::from_secs(10)
    );
    // Let the last change reach the file (written at most once a second).
    let saved_version = frontend.table.load().version;
    mesh_test::assert_eventually!(
        mesh_agent::table::read_state_file(&state).is_ok_and(|s| s.version >= saved_version),
        Duration::from_secs(10)
    );
    frontend.drain().await;

    // Restarted, pointed at a federation that is not there.
    let away = format!("https://{}", mesh_test::tcp::dead_addr());
    let restart = |extra: &[&str]| {
        let mut args = m.args("c1", "us-east", "us-east-1a", "frontend", app.addr, 8080);
        let i = args.iter().position(|a| a == "--federation").unwrap();
        args[i + 1] = away.clone();
        args.extend(["--state-file".to_string(), state_arg.clone()]);
        args.extend(extra.iter().map(ToString::to_string));
        args
    };
    // What the file holds now (later versions may have reached it too).
    let file_version = mesh_agent::table::read_state_file(&state).unwrap().version;
    assert!(file_version >= saved_version);
    let frontend = m.agent(restart(&[])).await;
    assert_eq!(
        frontend.table.load().version,
        file_version,
        "serves the saved config"
    );
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-backend"), "reviews-1");
    let r = get(
        frontend.outbound,
        "reviews:9080",
        "/",
        &[("x-user", "blocked")],
    )
    .await;
    assert_eq!(r.status, 418, "the saved VirtualService applies: {r:?}");
    frontend.drain().await;

    // Too old a file is not used: the agent waits for the federation.
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&state)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let frontend = m.agent(restart(&["--state-max-age", "1h"])).await;
    assert_eq!(
        frontend.table.load().version,
        0,
        "a stale file is not served"
    );
    let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_ne!(r.status, 200, "{r:?}");
    frontend.drain().await;

    // A torn file (cut short, as a crash mid-write could leave it) is
    // refused whole, not served in part.
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    assert!(mesh_agent::table::read_state_file(&state).is_err());
    let frontend = m.agent(restart(&[])).await;
    assert_eq!(
        frontend.table.load().version,
        0,
        "a torn file is not served"
    );
    frontend.drain().await;
    stop(vec![reviews]).await;
}

/// A table version resolves each host spelling and prepares each
/// destination once, for every request after; distinct destinations stay
/// apart; spellings the application chooses are kept only while short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_prepared_once_per_table_version() {
    let m = one_cluster().await;
    let app = Backend::start("reviews").await;
    let agent = m.c1_agent("reviews", app.addr, 9080, &[]).await;
    wait_endpoints(&agent, "reviews", 1).await;
    let table = agent.table.load_full();
    let svc: mesh_core::service::ServiceKey = "default/reviews".parse().unwrap();

    let a = table
        .named("reviews.default:9080")
        .expect("a known service");
    let b = table.named("reviews.default:9080").unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b), "resolved once");
    assert_eq!((a.service.clone(), a.port), (svc.clone(), Some(9080)));
    assert!(a.direct.is_some(), "no VirtualService: the direct route");
    let bare = table.named("reviews").unwrap();
    assert_eq!((bare.service.clone(), bare.port), (svc.clone(), None));
    assert!(table.named("nosuch.default:9080").is_none());
    // A long spelling of a known service resolves, and is not kept.
    let long = format!("reviews.default:{}9080", "0".repeat(400));
    let l1 = table.named(&long).unwrap();
    let l2 = table.named(&long).unwrap();
    assert_eq!(l1.port, Some(9080));
    assert!(!std::sync::Arc::ptr_eq(&l1, &l2), "not kept");

    let hosts = mesh_agent::lb::Hosts::default();
    let p1 = table
        .prepared(&hosts, &svc, None, Some(9080), true)
        .unwrap();
    let p2 = table
        .prepared(&hosts, &svc, None, Some(9080), true)
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&p1, &p2), "prepared once");
    assert_eq!(&*p1.label, "default/reviews");
    let cands = p1.candidates(p1.draw());
    assert_eq!(cands.len(), 1);
    assert_eq!(cands[0].item.cluster.as_str(), "c1");
    let plain = table
        .prepared(&hosts, &svc, None, Some(9080), false)
        .unwrap();
    assert!(
        !std::sync::Arc::ptr_eq(&p1, &plain),
        "TLS and plaintext apart"
    );
    assert!(plain.candidates(0)[0].item.sni.is_none());
    assert!(
        table.prepared(&hosts, &svc, None, Some(1), true).is_none(),
        "no such port"
    );
    assert!(
        table
            .prepared(&hosts, &svc, Some("v9"), Some(9080), true)
            .is_none(),
        "no such subset"
    );
    agent.drain().await;
}
