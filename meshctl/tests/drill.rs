//! Every shipped drill (`scenarios/*.yaml`), three times shorter, against
//! the demo mesh run in this process: real federation, gateways, agents,
//! applications and WAN relay on loopback. Each must pass its own SLOs,
//! and the report must show what the drill did.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshctl::demo::{Demo, Options};
use meshctl::drill::report::{self, Report};
use meshctl::drill::run::{self, Options as RunOptions};
use meshctl::drill::scenario::Scenario;
use std::time::Duration;

/// Scenario times are divided by this in the test suite.
const SHORTEN: u32 = 3;

fn scenario(name: &str) -> Scenario {
    let path = format!("{}/../scenarios/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    Scenario::parse(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .shortened(SHORTEN)
}

async fn drill(demo: &Demo, name: &str) -> Report {
    let s = scenario(name);
    let limit = s.load.duration + Duration::from_secs(60);
    let r = tokio::time::timeout(
        limit,
        run::run(
            demo.topology(),
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
    assert!(r.sent > 0);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_drill_passes_against_the_demo() {
    let demo = Demo::start(
        &Options {
            listen: "127.0.0.1:0".into(),
            registry: "memory".into(),
            netns: false,
        },
        |l| eprintln!("{l}"),
    )
    .await
    .unwrap();
    // Every frontend reaches reviews before the drills begin.
    for (c, addr) in &demo.frontends {
        mesh_test::assert_eventually!(
            reqwest_like(*addr, "reviews.default:9080").await,
            Duration::from_secs(30)
        );
        eprintln!("{c}: frontend answers");
    }

    // A scenario naming a cluster the topology lacks changes nothing.
    let mut bad = scenario("blackhole-gateway");
    bad.steps[1].action = meshctl::drill::scenario::Action::BlackholeGateway {
        cluster: "mars-1".into(),
    };
    let opts = RunOptions {
        fed: Some(demo.fed.clone()),
        ..RunOptions::default()
    };
    let err = run::run(demo.topology(), &bad, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no cluster \"mars-1\""), "{err}");

    let r = drill(&demo, "blackhole-gateway").await;
    let f = &r.faults[0];
    assert_eq!(f.step, "blackholeGateway eu-west-1");
    assert!(f.time_to_shift_ms < 5000.0, "{f:?}");
    assert!(
        f.weights_off_ms.is_some(),
        "the federation never moved weights off eu-west-1: {f:?}"
    );

    // Its timeline, as a trace in a real OTLP collector: the drill's span
    // with its steps, the fault's span under it with what followed.
    let rotel = mesh_test::otlp::Rotel::start().await;
    let id = meshctl::drill::trace::export(&r, &rotel.url())
        .await
        .unwrap();
    let spans = rotel
        .wait_for("the drill's timeline", |s| {
            s.iter().any(|x| x.name == "drill blackhole-gateway")
                && s.iter()
                    .any(|x| x.name == "fault blackholeGateway eu-west-1")
        })
        .await;
    let root = spans
        .iter()
        .find(|s| s.name == "drill blackhole-gateway")
        .unwrap();
    let fault = spans
        .iter()
        .find(|s| s.name == "fault blackholeGateway eu-west-1")
        .unwrap();
    assert!(root.trace.eq_ignore_ascii_case(&id), "{root:?} vs {id}");
    assert_eq!(fault.trace, root.trace);
    assert_eq!(fault.parent, root.id);
    assert!(
        root.events.iter().filter(|e| *e == "step").count() >= 4,
        "{root:?}"
    );
    for e in ["first_impact", "weights_off", "shifted", "repaired"] {
        assert!(
            fault.events.iter().any(|x| x == e),
            "{e} missing: {fault:?}"
        );
    }
    assert_eq!(root.attr("fedmesh.drill.outcome"), Some("passed"));

    let r = drill(&demo, "canary-weight-shift").await;
    let served = &r.hosts["reviews.default:9080"].served_by;
    assert!(
        served.contains_key("us-east-1") && served.contains_key("us-west-1"),
        "{served:?}"
    );
    assert_eq!(r.failed, 0);

    let r = drill(&demo, "single-service-failure").await;
    let ratings = &r.hosts["ratings.default:9080"];
    assert_eq!(ratings.failed, 0);
    assert!(ratings.served_by.contains_key("us-east-1"), "{ratings:?}");

    let r = drill(&demo, "etcd-partition").await;
    assert_eq!(r.failed, 0);

    let r = drill(&demo, "region-outage").await;
    assert!(r.success_rate >= 99.9);

    a_breached_abort_condition_stops_the_drill_and_restores(&demo).await;

    let url = demo.url.clone();
    demo.stop().await.unwrap();
    let addr = url.trim_start_matches("https://").parse().unwrap();
    assert!(
        !mesh_test::is_listening(addr),
        "the federation still listens"
    );
}

/// A drill whose abort condition trips: the `meshctl` binary stops the
/// load and the faults at once, restores what the drill changed (the failed
/// service healed, the weights cleared), reports ABORTED with the breach and
/// exits with its own code (4).
async fn a_breached_abort_condition_stops_the_drill_and_restores(demo: &Demo) {
    let dir = tempfile::tempdir().unwrap();
    let topology = dir.path().join("topology.json");
    demo.topology().write(&topology).unwrap();
    let config = dir.path().join("config.yaml");
    let mut file = mesh_core::client_config::ClientConfig::default();
    file.upsert(demo.admin.clone());
    file.save(&config).unwrap();
    // All of us-east-2's reviews traffic to us-east-1; then reviews fails
    // everywhere, so nothing can hide it: the success rate falls under the
    // abort bound within the window, long before the load's 60 s.
    let scenario = dir.path().join("abort.yaml");
    std::fs::write(
        &scenario,
        r#"apiVersion: fedmesh.io/v1
kind: Drill
metadata: {name: abort-on-breach}
spec:
  load: {hosts: [reviews.default:9080], from: [us-east-2], rate: 20, duration: 60s, timeout: 2s}
  steps:
    - at: 0s
      setWeights: {service: default/reviews, weights: {us-east-1: 100}}
    - at: 3s
      failService: {cluster: us-east-1, service: reviews}
    - at: 3s
      failService: {cluster: us-east-2, service: reviews}
    - at: 3s
      failService: {cluster: us-west-1, service: reviews}
    - at: 3s
      failService: {cluster: eu-west-1, service: reviews}
  abort: {successRateBelow: 90, window: 2s}
  slo: {successRate: 99}
"#,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking({
        let (scenario, topology, config) = (scenario.clone(), topology.clone(), config.clone());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
                .arg("drill")
                .arg("run")
                .arg(&scenario)
                .arg("--topology")
                .arg(&topology)
                .env("FEDMESH_CONFIG", &config)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{stdout}\n{stderr}");
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stdout.contains("drill abort-on-breach: ABORTED (success rate"),
        "{stdout}"
    );
    assert!(stderr.contains("is below 90%"), "{stderr}");
    // Stopped early: well before the load's 60 s.
    assert!(started.elapsed() < Duration::from_secs(45), "{stdout}");
    // Restored, last first: the services healed, then the weights cleared.
    let heal = stderr.find("cleanup: healService").expect(&stderr);
    let clear = stderr.find("cleanup: clearWeights").expect(&stderr);
    assert!(heal < clear, "{stderr}");
    let got = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(["weights", "get", "reviews", "-o", "json"])
            .env("FEDMESH_CONFIG", &config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert!(v["configured"].is_null(), "weights left behind: {v}");
    // Each frontend's calls stay in its own cluster (locality): they all
    // succeed again, so every reviews was healed.
    for (c, local) in &demo.frontends {
        for _ in 0..10 {
            assert!(reqwest_like(*local, "reviews.default:9080").await, "{c}");
        }
    }
}

/// One request through a frontend agent: did it succeed?
async fn reqwest_like(frontend: std::net::SocketAddr, host: &str) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(frontend).await else {
        return false;
    };
    let Ok((mut tx, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    tx.send_request(req)
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// The demo's federation on a 3-member etcd cluster (every member given):
/// a drill passes there as on the embedded registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_passes_on_a_three_member_etcd_cluster() {
    let etcd = tokio::task::spawn_blocking(|| mesh_test::etcd::EtcdCluster::start(3))
        .await
        .unwrap();
    let members: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("http://").to_string())
        .collect();
    let demo = Demo::start(
        &Options {
            listen: "127.0.0.1:0".into(),
            registry: format!("etcd://{}", members.join(",")),
            netns: false,
        },
        |l| eprintln!("{l}"),
    )
    .await
    .unwrap();
    for (c, addr) in &demo.frontends {
        mesh_test::assert_eventually!(
            reqwest_like(*addr, "reviews.default:9080").await,
            Duration::from_secs(30)
        );
        eprintln!("{c}: frontend answers");
    }
    let r = drill(&demo, "blackhole-gateway").await;
    assert!(r.faults[0].weights_off_ms.is_some(), "{:?}", r.faults[0]);
    demo.stop().await.unwrap();
}
