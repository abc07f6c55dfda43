#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tracing across clusters, checked on a real OTLP collector: rotel
//! (`scripts/deps.sh` puts it at `.deps/rotel-agent`; `$ROTEL_AGENT`
//! overrides), which prints every span it receives.

mod support;

use mesh_test::http::Backend;
use mesh_test::otlp::{Rotel, Span};
use support::{get, wait_endpoints, wait_version, Mesh};

/// rotel-agent as a child process, killed (by its PID) when dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_both_agents_and_the_gateway_hop() {
    let rotel = Rotel::start().await;
    let otlp = rotel.url();
    let m = Mesh::one_cluster_on("127.0.0.1").await;
    // c2 is on another network: only its east-west gateway is reachable.
    let gw = m
        .remote_cluster("c2", "n2", &["--otlp-endpoint", &otlp])
        .await;
    let b = Backend::start("reviews-eu").await;
    let mut ra = m.args("c2", "eu-west", "eu-west-1a", "reviews", b.addr, 9080);
    ra.extend(["--otlp-endpoint".to_string(), otlp.clone()]);
    let reviews = m.agent(ra).await;
    m.export("reviews", "c2").await;
    let app = Backend::start("frontend").await;
    let frontend = m
        .c1_agent("frontend", app.addr, 8080, &["--otlp-endpoint", &otlp])
        .await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: reviews}}]
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    mesh_test::assert_eventually!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status
            == 200
    );

    // W3C from the application.
    let (t1, p1) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let tp = format!("00-{t1}-{p1}-01");
    let r = get(
        frontend.outbound,
        "reviews:9080",
        "/w3c",
        &[("traceparent", &tp)],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // B3 (single header) from the application.
    let (t2, s2) = ("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1");
    let b3 = format!("{t2}-{s2}-1");
    let r = get(frontend.outbound, "reviews:9080", "/b3", &[("b3", &b3)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // A failure the agent retries.
    let t3 = "0af7651916cd43dd8448eb211c80319c";
    b.fail_next(1);
    let tp3 = format!("00-{t3}-b7ad6b7169203331-01");
    let r = get(
        frontend.outbound,
        "reviews:9080",
        "/retry",
        &[("traceparent", &tp3)],
    )
    .await;
    assert_eq!(r.status, 200, "retried past the failure: {r:?}");

    let seen = b.seen();
    let at = |p: &str| {
        seen.iter()
            .rev()
            .find(|s| s.path == p)
            .unwrap_or_else(|| panic!("the backend never saw {p}"))
            .clone()
    };
    let w3c = at("/w3c");
    let request_id = w3c
        .header("x-request-id")
        .expect("x-request-id generated")
        .to_string();
    assert_eq!(request_id.len(), 36, "a UUID: {request_id}");
    let backend_tp = w3c.header("traceparent").unwrap().to_string();
    assert!(backend_tp.starts_with(&format!("00-{t1}-")), "{backend_tp}");
    let b3_seen = at("/b3");
    assert!(
        b3_seen.header("b3").unwrap().starts_with(t2),
        "B3 is passed on in its own form: {:?}",
        b3_seen.headers
    );
    assert!(b3_seen.header("traceparent").unwrap().contains(t2));

    // A local reviews that fails: ejected at its first 503, the retry fails
    // over to c2 through its gateway. Both decisions are span events.
    let local = Backend::start("reviews-local").await;
    let local_agent = m.c1_agent("reviews", local.addr, 9080, &[]).await;
    wait_endpoints(&frontend, "reviews", 2).await;
    let applied = m
        .apply(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}
"#,
        )
        .await
        .unwrap();
    wait_version(&frontend, applied.revision).await;
    // Locality first: the local endpoint answers while it is healthy.
    mesh_test::assert_eventually!(get(frontend.outbound, "reviews:9080", "/", &[])
        .await
        .body
        .contains("reviews-local"));
    local.fail_next(1);
    let t4 = "5b8efff798038103d269b633813fc60c";
    let r = get(
        frontend.outbound,
        "reviews:9080",
        "/failover",
        &[("traceparent", &format!("00-{t4}-eee19b7ec3c1b174-01"))],
    )
    .await;
    assert_eq!(r.status, 200, "failed over past the local failure: {r:?}");
    assert!(r.body.contains("reviews-eu"), "answered by c2: {r:?}");
    let spans = rotel
        .wait_for("the failover's client span", |s| {
            s.iter()
                .any(|x| x.trace == t4 && x.kind == "SPAN_KIND_CLIENT" && x.service == "frontend")
        })
        .await;
    let failed_over = spans
        .iter()
        .find(|x| x.trace == t4 && x.kind == "SPAN_KIND_CLIENT" && x.service == "frontend")
        .unwrap();
    for e in ["ejection", "retry", "failover"] {
        assert!(
            failed_over.events.iter().any(|x| x == e),
            "no {e} event: {failed_over:?}"
        );
    }
    // Pooled connections close as the agents drain, which ends the gateway's
    // connection spans; draining flushes every exporter.
    support::stop(vec![frontend, reviews, local_agent]).await;
    gw.drain().await;

    let spans = rotel
        .wait_for(
            "both agents' spans of all three traces and a gateway span",
            |s| {
                let n = |t: &str| {
                    s.iter()
                        .filter(|x| x.trace == t && !x.id.is_empty())
                        .count()
                };
                n(t1) >= 2
                    && n(t2) >= 2
                    && n(t3) >= 2
                    && s.iter().any(|x| x.service == "fedmesh-gateway")
            },
        )
        .await;
    let find = |t: &str, kind: &str, svc: &str| -> Span {
        spans
            .iter()
            .find(|s| s.trace == t && s.kind == kind && s.service == svc)
            .unwrap_or_else(|| panic!("no {kind} span of {svc} in trace {t}: {spans:#?}"))
            .clone()
    };
    let client = find(t1, "SPAN_KIND_CLIENT", "frontend");
    let server = find(t1, "SPAN_KIND_SERVER", "reviews");
    assert_eq!(client.parent, p1, "the application's span is the parent");
    assert_eq!(
        server.parent, client.id,
        "the outbound span is the inbound's parent"
    );
    assert!(
        backend_tp.contains(&server.id),
        "the application's parent is the inbound span: {backend_tp} vs {server:?}"
    );
    assert_eq!(client.name, "reviews.default:9080");
    for s in [&client, &server] {
        assert_eq!(
            s.attr("http.request.header.x-request-id"),
            Some(request_id.as_str()),
            "{s:?}"
        );
        assert_eq!(s.attr("http.request.method"), Some("GET"));
        assert_eq!(s.attr("url.path"), Some("/w3c"));
        assert_eq!(s.attr("http.response.status_code"), Some("200"));
    }
    assert_eq!(client.attr("fedmesh.source_cluster"), Some("c1"));
    assert_eq!(client.attr("fedmesh.destination_cluster"), Some("c2"));
    assert_eq!(server.attr("fedmesh.destination_cluster"), Some("c2"));
    // (The inbound side knows the caller's cluster only from a mesh-CA
    // certificate naming it; these test certificates do not.)
    assert_eq!(
        server.attr("fedmesh.peer_identity"),
        Some("spiffe://cluster.local/ns/default/sa/frontend")
    );
    let hop = client
        .attr("fedmesh.gateway")
        .expect("the gateway hop is named");
    let local = client
        .attr("fedmesh.upstream.local_address")
        .expect("the connection's local address");
    // The gateway's connection span carries the same address as its client.
    let conn = spans
        .iter()
        .find(|s| s.service == "fedmesh-gateway" && s.attr("fedmesh.client") == Some(local))
        .unwrap_or_else(|| {
            panic!("no gateway span for the connection from {local} (hop {hop}): {spans:#?}")
        });
    assert!(conn.name.starts_with("gateway "), "{conn:?}");
    assert_eq!(conn.kind, "SPAN_KIND_SERVER");
    assert_eq!(conn.attr("fedmesh.source_cluster"), Some("c1"));
    assert!(
        conn.attr("fedmesh.destination_endpoint").is_some(),
        "{conn:?}"
    );
    assert_eq!(
        conn.attr("tls.server_name"),
        client.attr("tls.client.server_name")
    );

    // B3 input joins the same trace.
    let b3_client = find(t2, "SPAN_KIND_CLIENT", "frontend");
    assert_eq!(b3_client.parent, s2);
    let b3_server = find(t2, "SPAN_KIND_SERVER", "reviews");
    assert_eq!(b3_server.parent, b3_client.id);

    // The retry is an event of the outbound span.
    let retried = find(t3, "SPAN_KIND_CLIENT", "frontend");
    assert!(retried.events.iter().any(|e| e == "retry"), "{retried:?}");

    drop(rotel);
}
