//! The `meshctl` binary against a real federation on loopback: tables, JSON,
//! one-line errors with exit code 1, and the demo.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_test::process::Proc;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_meshctl");

async fn federation() -> federation::app::Bound {
    federation::app::build(&federation::config::Config::embedded(
        ([127, 0, 0, 1], 0).into(),
    ))
    .await
    .unwrap()
}

/// Runs meshctl off the async runtime's threads; returns (exit code, stdout, stderr).
async fn meshctl(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN).args(&args).output().expect("run meshctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn seed(url: &str) {
    let mut reg = RegistrationClient::connect(url.to_string()).await.unwrap();
    reg.register_cluster(api::RegisterClusterRequest {
        cluster: Some(api::ClusterInfo {
            name: "c1".into(),
            locality: Some(api::Locality {
                region: "us-east".into(),
                zone: "us-east-1a".into(),
            }),
            network: "n1".into(),
            gateway_addresses: vec!["127.0.0.1:15443".into()],
            trust_domain: "cluster.local".into(),
        }),
    })
    .await
    .unwrap();
    reg.register_endpoint(api::RegisterEndpointRequest {
        endpoint: Some(api::Endpoint {
            id: "reviews-1".into(),
            service: Some(api::ServiceKey {
                namespace: "shop".into(),
                name: "reviews".into(),
            }),
            cluster: "c1".into(),
            address: "10.0.0.1".into(),
            ports: vec![api::Port {
                name: "http".into(),
                number: 9080,
                protocol: "http".into(),
                ..Default::default()
            }],
            labels: [("version".to_string(), "v2".to_string())].into(),
            locality: Some(api::Locality {
                region: "us-east".into(),
                zone: "us-east-1a".into(),
            }),
            health: api::Health::Unhealthy as i32,
            identity: String::new(),
        }),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn lists_as_tables_and_json() {
    let fed = federation().await;
    let url = format!("http://{}", fed.addr);
    seed(&url).await;

    let (code, out, err) = meshctl(&["--federation", &url, "clusters"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("CLUSTER") && lines[0].contains("LIVENESS"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("c1 ")
            && lines[1].contains("us-east-1a")
            && lines[1].contains("live since 20"),
        "{out}"
    );

    let (code, out, _) = meshctl(&["--federation", &url, "clusters", "-o", "json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "c1");
    assert_eq!(v[0]["liveness"], "live");
    assert_eq!(v[0]["gateways"][0], "127.0.0.1:15443");

    let (code, out, _) = meshctl(&["--federation", &url, "services"]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines().nth(1).unwrap().starts_with("shop/reviews") && out.contains("0/1"),
        "{out}"
    );

    // The service can be named three ways; the federation address without scheme works too.
    for name in [
        "shop/reviews",
        "reviews.shop",
        "reviews.shop.svc.cluster.local",
    ] {
        let (code, out, err) = meshctl(&[
            "--federation",
            &fed.addr.to_string(),
            "-o",
            "json",
            "endpoints",
            name,
        ])
        .await;
        assert_eq!(code, 0, "{name}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["id"], "reviews-1");
        assert_eq!(v[0]["health"], "unhealthy");
        assert_eq!(v[0]["ports"][0], "9080/http");
        assert_eq!(v[0]["labels"]["version"], "v2");
    }

    let (code, out, _) = meshctl(&["--federation", &url, "status", "-o", "json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["registry"], "memory");
    assert_eq!(v["registry_reachable"], true);
    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn errors_are_one_line_on_stderr_with_exit_1() {
    let fed = federation().await;
    let url = format!("http://{}", fed.addr);
    let (code, out, err) = meshctl(&["--federation", &url, "endpoints", "missing"]).await;
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err.trim(),
        "meshctl: service default/missing has no endpoints and is not exported"
    );
    let (code, _, err) = meshctl(&["--federation", &url, "endpoints", "Bad/Name"]).await;
    assert_eq!(code, 1);
    assert_eq!(err.trim(), "meshctl: invalid namespace \"Bad\": must contain only lowercase letters, digits and '-' (RFC 1123 label)");

    // Nobody listens on a port we just released.
    let free = mesh_test::free_port();
    let (code, out, err) =
        meshctl(&["--federation", &format!("127.0.0.1:{free}"), "clusters"]).await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!(
            "meshctl: cannot reach the federation at http://127.0.0.1:{free}: "
        )),
        "{err}"
    );
    assert!(err.contains("refused"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// The README's main job: `meshctl demo` brings up a live mesh (federation,
/// a gateway, frontend and reviews with their agents in each of four
/// clusters), serves traffic that follows `meshctl weights set` across
/// clusters through the gateways, and stops on Ctrl-C leaving nothing
/// listening.
#[tokio::test]
async fn demo_runs_live_traffic_until_interrupted() {
    let mut p = Proc::spawn(BIN, &["demo", "--listen", "127.0.0.1:0", "--rate", "10"]);
    let line = p.wait_for_line("federation listening on", Duration::from_secs(30));
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    p.wait_for_line("Ctrl-C stops the demo", Duration::from_secs(60));
    // Locality: every frontend's calls stay in its own cluster, all succeed.
    p.wait_for_line("live us-east-1 ", Duration::from_secs(20));
    let local = p.wait_for_line("us-east-1 100%", Duration::from_secs(20));
    assert!(local.contains("100.0%"), "{local}");

    let (code, out, err) = meshctl(&["--federation", &url, "clusters", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["eu-west-1", "us-east-1", "us-east-2", "us-west-1"]);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["liveness"] == "live"));

    // Weights move the traffic: every frontend's calls go to eu-west-1,
    // through its gateway, and succeed.
    let (code, _, err) = meshctl(&[
        "--federation",
        &url,
        "weights",
        "set",
        "reviews",
        "eu-west-1=100",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let l = p.wait_for_line("live us-west-1 ", Duration::from_secs(10));
        if l.contains("eu-west-1 100%") {
            assert!(l.contains("100.0%"), "{l}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "traffic never moved: {l}"
        );
    }

    p.signal("INT");
    let status = tokio::task::spawn_blocking(move || {
        let st = p.wait_exit(Duration::from_secs(30));
        (st, p.output())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{:?}\n{}", status.0, status.1);
    assert!(status.1.contains("stopping the demo"));
    let addr = url.trim_start_matches("http://").parse().unwrap();
    assert!(!mesh_test::is_listening(addr), "nothing is left listening");
}
