//! `deploy/local`'s topology (`meshctl demo --netns`), as root: every
//! cluster in a network namespace this test's demo creates, regions joined
//! only through the WAN relay with real delay, iptables for black holes.
//!
//! It checks that a start with a namespace in the way changes nothing, that
//! a start failing after the network was made leaves nothing behind, that
//! cross-region calls pay the WAN's delay and are attributed to the calling
//! cluster by the far gateway (PROXY protocol from the relay), that the
//! black-hole and partition drills pass against it, and that stopping
//! removes every namespace, interface and route it made.
//!
//! Without root, or without `ip`/`iptables`, it fails naming what is
//! missing, unless `FEDMESH_SKIP_ROOT_TESTS=1` asks to skip it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshctl::demo::{Demo, Options};
use meshctl::drill::report;
use meshctl::drill::run::{self, Options as RunOptions};
use meshctl::drill::scenario::Scenario;
use meshctl::netns;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

fn root_or_skip() -> bool {
    let uid = Command::new("id").arg("-u").output().unwrap();
    let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    if !root {
        assert!(
            std::env::var("FEDMESH_SKIP_ROOT_TESTS").as_deref() == Ok("1"),
            "the netns topology needs root (FEDMESH_SKIP_ROOT_TESTS=1 skips it)"
        );
        eprintln!("skipped: not root and FEDMESH_SKIP_ROOT_TESTS=1");
    }
    root
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What is left of ours in the root namespace: namespaces, the host link,
/// the route.
fn leftovers() -> Vec<String> {
    let mut v = netns::existing();
    if std::path::Path::new(&format!("/sys/class/net/{}", netns::HOST_IF)).exists() {
        v.push(netns::HOST_IF.into());
    }
    if sh("ip route show 198.18.0.0/16").contains("198.18.0.0/16") {
        v.push("route 198.18.0.0/16".into());
    }
    v
}

/// Removes whatever is left even when an assertion fails (what
/// `deploy/local/down.sh` does).
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in netns::existing() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", netns::HOST_IF])
            .output();
    }
}

fn options(registry: &str) -> Options {
    Options {
        listen: "127.0.0.1:0".into(),
        registry: registry.into(),
        netns: true,
    }
}

/// One request through a frontend agent: which cluster answered, and how
/// long it took.
async fn call(frontend: SocketAddr, host: &str) -> Option<(String, Duration)> {
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(frontend).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let cluster = resp.headers().get("x-cluster")?.to_str().ok()?.to_string();
    Some((cluster, start.elapsed()))
}

async fn metrics(admin: SocketAddr) -> String {
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "gateway")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    use http_body_util::BodyExt as _;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

fn scenario(name: &str) -> Scenario {
    let path = format!("{}/../scenarios/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    Scenario::parse(&std::fs::read_to_string(&path).unwrap())
        .unwrap()
        .shortened(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_topology_serves_across_regions_runs_drills_and_cleans_up() {
    if !root_or_skip() {
        return;
    }
    assert!(
        leftovers().is_empty(),
        "a local topology is up already: {:?}",
        leftovers()
    );
    let _cleanup = Cleanup;

    // A namespace of ours in the way: refused, and left as it was.
    assert!(Command::new("ip")
        .args(["netns", "add", netns::WAN_NS])
        .status()
        .unwrap()
        .success());
    let err = Demo::start(&options("memory"), |_| {})
        .await
        .err()
        .expect("a start over an existing namespace must be refused")
        .to_string();
    assert!(
        err.contains("fedmesh-wan already exist") && err.contains("down.sh"),
        "{err}"
    );
    assert_eq!(leftovers(), vec![netns::WAN_NS.to_string()]);
    assert!(Command::new("ip")
        .args(["netns", "del", netns::WAN_NS])
        .status()
        .unwrap()
        .success());

    // A start that fails once the network is made (the federation's etcd
    // does not answer) removes all of it.
    let err = Demo::start(&options("etcd://127.0.0.1:1"), |_| {})
        .await
        .err()
        .expect("a federation without its etcd must not start")
        .to_string();
    eprintln!("failed start, as it should: {err}");
    assert!(leftovers().is_empty(), "left behind: {:?}", leftovers());

    let demo = Demo::start(&options("memory"), |l| eprintln!("{l}"))
        .await
        .unwrap();
    let topo = demo.topology().clone();
    let ns = topo.netns.clone().unwrap();
    assert_eq!(ns["eu-west-1"], "fedmesh-eu-west-1");
    for c in &topo.clusters {
        assert!(c.frontend.ip().to_string().starts_with("198.18."), "{c:?}");
    }
    // The regions are joined only through the relay: the WAN namespace
    // forwards nothing from one region's bridge to another's.
    let eu = topo.cluster("eu-west-1").unwrap().frontend;
    let us2 = topo.cluster("us-east-2").unwrap().frontend;
    let inside = netns::NsRuntime::start("fedmesh-us-east-1").unwrap();
    let dial = |to: SocketAddr| {
        inside.handle().spawn(async move {
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(to))
                .await
                .is_ok_and(|c| c.is_ok())
        })
    };
    assert!(
        dial(us2).await.unwrap(),
        "us-east-1 cannot reach us-east-2 on its own region's bridge"
    );
    assert!(
        !dial(eu).await.unwrap(),
        "us-east-1 reached eu-west-1 around the relay"
    );
    drop(inside);

    for (c, addr) in &demo.frontends {
        mesh_test::assert_eventually!(
            call(*addr, "reviews.default:9080").await.is_some(),
            Duration::from_secs(30)
        );
        eprintln!("{c}: frontend answers");
    }

    // us-east-1 -> eu-west-1 only: the calls pay the Atlantic's 30 ms each
    // way, and the far gateway names the caller.
    let ch = meshctl::client::connect(&demo.fed).await.unwrap();
    let mut traffic = mesh_api::v1::traffic_client::TrafficClient::new(ch);
    traffic
        .set_weights(mesh_api::v1::SetWeightsRequest {
            service: Some(mesh_api::v1::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            by: "cluster".into(),
            weights: [("eu-west-1".to_string(), 100)].into_iter().collect(),
            actor: "netns test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let us_east_1 = demo
        .frontends
        .iter()
        .find(|(c, _)| *c == "us-east-1")
        .unwrap()
        .1;
    mesh_test::assert_eventually!(
        call(us_east_1, "reviews.default:9080")
            .await
            .is_some_and(|(c, _)| c == "eu-west-1"),
        Duration::from_secs(20)
    );
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let (c, took) = call(us_east_1, "reviews.default:9080").await.unwrap();
        assert_eq!(c, "eu-west-1");
        fastest = fastest.min(took);
    }
    // A round trip across the relay is at least 2 x 30 ms less the jitter.
    assert!(
        fastest >= Duration::from_millis(55),
        "us-east-1 -> eu-west-1 took only {fastest:?}: the WAN delay is missing"
    );
    eprintln!("us-east-1 -> eu-west-1: fastest of 5 calls {fastest:?}");
    let gw = demo
        .gateway_admins
        .iter()
        .find(|(c, _)| *c == "eu-west-1")
        .unwrap()
        .1;
    let m = metrics(gw).await;
    let routed: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("fedmesh_gateway_connections_total{"))
        .collect();
    assert!(
        routed
            .iter()
            .any(|l| l.contains("source_cluster=\"us-east-1\"")),
        "the eu-west-1 gateway does not name us-east-1 as a source:\n{}",
        routed.join("\n")
    );
    assert!(
        !routed
            .iter()
            .any(|l| l.contains("source_cluster=\"unknown\"")),
        "{}",
        routed.join("\n")
    );
    traffic
        .clear_weights(mesh_api::v1::ClearWeightsRequest {
            service: Some(mesh_api::v1::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            actor: "netns test".into(),
        })
        .await
        .unwrap();

    // Inbound capture, as in a Pod: a plaintext call straight to us-east-2's
    // reviews application from us-east-1's namespace is redirected to the
    // application's agent (the REDIRECT rule counts it), which answers.
    let app = demo
        .apps
        .iter()
        .find(|(c, s, _)| *c == "us-east-2" && *s == "reviews")
        .unwrap()
        .2;
    let inside = netns::NsRuntime::start("fedmesh-us-east-1").unwrap();
    let status = inside
        .handle()
        .spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(app).await.ok()?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
                .await
                .ok()?
                .ok()?;
            String::from_utf8_lossy(&out)
                .lines()
                .next()
                .map(str::to_string)
        })
        .await
        .unwrap();
    drop(inside);
    assert_eq!(
        status.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "direct call to {app}"
    );
    let counted = sh("ip netns exec fedmesh-us-east-2 iptables -t nat -L PREROUTING -v -n -x");
    let rule = counted
        .lines()
        .find(|l| l.contains(&format!("dpt:{}", app.port())) && l.contains("redir ports"))
        .unwrap_or_else(|| panic!("no inbound capture rule for {app}:\n{counted}"));
    let packets: u64 = rule.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        packets > 0,
        "the direct call went around the agent:\n{counted}"
    );

    // The black hole is an iptables DROP in eu-west-1's namespace; the
    // partition cuts us-west's relay links to the federation.
    for name in ["blackhole-gateway", "etcd-partition"] {
        let s = scenario(name);
        let limit = s.load.duration + Duration::from_secs(60);
        let r = tokio::time::timeout(
            limit,
            run::run(
                &topo,
                &s,
                &RunOptions {
                    progress: true,
                    fed: Some(demo.fed.clone()),
                },
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} did not end within {limit:?}"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("{}", report::text(&r));
        assert!(r.passed(), "{name} did not pass:\n{}", report::text(&r));
        if name == "blackhole-gateway" {
            assert!(r.faults[0].time_to_shift_ms < 5000.0, "{:?}", r.faults[0]);
        } else {
            assert_eq!(r.failed, 0);
        }
    }
    // The drill took its DROP rule out again.
    assert!(
        !sh("ip netns exec fedmesh-eu-west-1 iptables -S INPUT").contains("DROP"),
        "the black hole's rule is still there"
    );

    demo.stop().await.unwrap();
    assert!(leftovers().is_empty(), "left behind: {:?}", leftovers());
}
