//! The `meshctl` binary against a real federation on loopback: tables, JSON,
//! one-line errors with exit code 1, and the demo.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_test::process::Proc;
use std::time::Duration;

mod common;
use common::{admin_config, federation, meshctl, BIN};

async fn seed(fed: &federation::app::Bound) {
    let ctx = fed
        .operator_context("seeder", &[federation::auth::Role::Admin])
        .await
        .unwrap();
    let mut reg = RegistrationClient::new(
        mesh_node::fed::Target::from_context(&ctx)
            .unwrap()
            .channel()
            .await
            .unwrap(),
    );
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
            ..Default::default()
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
    let (_dir, cfg) = admin_config(&fed).await;
    let url = fed.url();
    seed(&fed).await;

    let (code, out, err) = meshctl(&cfg, &["--federation", &url, "clusters"]).await;
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

    let (code, out, _) = meshctl(&cfg, &["--federation", &url, "clusters", "-o", "json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "c1");
    assert_eq!(v[0]["liveness"], "live");
    assert_eq!(v[0]["gateways"][0], "127.0.0.1:15443");

    let (code, out, _) = meshctl(&cfg, &["--federation", &url, "services"]).await;
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
        let (code, out, err) = meshctl(
            &cfg,
            &[
                "--federation",
                &fed.addr.to_string(),
                "-o",
                "json",
                "endpoints",
                name,
            ],
        )
        .await;
        assert_eq!(code, 0, "{name}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["id"], "reviews-1");
        assert_eq!(v[0]["health"], "unhealthy");
        assert_eq!(v[0]["ports"][0], "9080/http");
        assert_eq!(v[0]["labels"]["version"], "v2");
    }

    let (code, out, _) = meshctl(&cfg, &["--federation", &url, "status", "-o", "json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["registry"], "memory");
    assert_eq!(v["registry_reachable"], true);
    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn errors_are_one_line_on_stderr_with_exit_1() {
    let fed = federation().await;
    let (_dir, cfg) = admin_config(&fed).await;
    let url = fed.url();
    let (code, out, err) = meshctl(&cfg, &["--federation", &url, "endpoints", "missing"]).await;
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err.trim(),
        "meshctl: service default/missing has no endpoints and is not exported"
    );
    let (code, _, err) = meshctl(&cfg, &["--federation", &url, "endpoints", "Bad/Name"]).await;
    assert_eq!(code, 1);
    assert_eq!(err.trim(), "meshctl: invalid namespace \"Bad\": must contain only lowercase letters, digits and '-' (RFC 1123 label)");

    // Nobody listens on a port we just released.
    let free = mesh_test::free_port();
    let (code, out, err) = meshctl(
        &cfg,
        &["--federation", &format!("127.0.0.1:{free}"), "clusters"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!(
            "meshctl: cannot reach the federation at https://127.0.0.1:{free}: "
        )),
        "{err}"
    );
    assert!(err.contains("refused"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// Without a credential meshctl says in one line what to do; with a token
/// from an admin, `meshctl login` makes a key here and saves a context
/// whose roles the federation enforces.
#[tokio::test]
async fn login_with_an_operator_token_and_roles_are_enforced() {
    let fed = federation().await;
    let (dir, admin) = admin_config(&fed).await;
    let url = fed.url();
    let bob = dir.path().join("bob.yaml");
    let (code, out, err) = meshctl(&bob, &["--federation", &url, "clusters"]).await;
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("no meshctl configuration") && err.contains("meshctl login"),
        "{err}"
    );

    let (code, out, err) = meshctl(
        &admin,
        &["operator", "add", "bob", "--role", "viewer", "-o", "json"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = v[0]["token"].as_str().unwrap().to_string();
    assert_eq!(v[0]["roles"], "viewer");
    // The token alone is enough to check the federation: it carries the root's hash.
    let (code, out, err) = meshctl(
        &bob,
        &[
            "login",
            "--federation",
            &url,
            "--token",
            &token,
            "--name",
            "lab",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v[0]["identity"],
        "spiffe://cluster.local/fedmesh/operator/bob"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&bob).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (code, out, err) = meshctl(&bob, &["whoami", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v[0]["kind"].as_str(), v[0]["name"].as_str()),
        (Some("operator"), Some("bob"))
    );
    let (code, _, err) = meshctl(&bob, &["clusters"]).await;
    assert_eq!(code, 0, "a viewer lists: {err}");
    let (code, _, err) = meshctl(&bob, &["drain", "c1"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "meshctl: permission denied: /fedmesh.v1.Traffic/Drain needs an operator with role operator; operator bob has role viewer"
    );
    // The token is spent.
    let (code, _, err) = meshctl(
        &dir.path().join("again.yaml"),
        &["login", "--federation", &url, "--token", &token],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("token unknown, expired or already used"),
        "{err}"
    );
    // An admin adds a cluster by hand; its gateway would keep it live.
    let (code, out, err) = meshctl(
        &admin,
        &[
            "cluster",
            "add",
            "c9",
            "--region",
            "eu-north",
            "--zone",
            "eu-north-1a",
            "--network",
            "n9",
            "--gateway",
            "192.0.2.9:15443",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("CLUSTER"), "{out}");
    let (code, _, err) = meshctl(
        &bob,
        &[
            "cluster",
            "add",
            "c9",
            "--region",
            "x",
            "--zone",
            "y",
            "--network",
            "z",
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("RegisterCluster needs an operator with role admin"),
        "{err}"
    );
    // And removes it; a viewer may not.
    let (code, _, err) = meshctl(&bob, &["cluster", "remove", "c9"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("RemoveCluster needs an operator with role admin"),
        "{err}"
    );
    let (code, out, err) = meshctl(&admin, &["cluster", "remove", "c9"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ENDPOINTS REMOVED"), "{out}");
    let (code, out, err) = meshctl(&admin, &["clusters", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("\"c9\""), "{out}");
    let (code, _, err) = meshctl(&admin, &["cluster", "remove", "c9"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("c9 is not registered"), "{err}");
    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}

/// The README's main job: `meshctl demo` brings up a live mesh (federation,
/// a gateway, frontend and reviews with their agents in each of four
/// clusters), serves traffic that follows `meshctl weights set` across
/// clusters through the gateways, and stops on Ctrl-C leaving nothing
/// listening.
#[tokio::test]
async fn demo_runs_live_traffic_until_interrupted() {
    // The demo writes its admin's context here; the commands below use it
    // with no flag, as from another terminal.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    let env = format!("FEDMESH_CONFIG={}", cfg.display());
    let mut p = Proc::spawn(
        "env",
        &[&env, BIN, "demo", "--listen", "127.0.0.1:0", "--rate", "10"],
    );
    let line = p.wait_for_line("federation listening on", Duration::from_secs(30));
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap()
        .to_string();
    p.wait_for_line("Ctrl-C stops the demo", Duration::from_secs(60));
    let file = mesh_core::client_config::ClientConfig::load(&cfg).unwrap();
    assert_eq!(file.current_context, "demo");
    assert_eq!(file.context(None).unwrap().server, url);
    // Locality: every frontend's calls stay in its own cluster, all succeed.
    p.wait_for_line("live us-east-1 ", Duration::from_secs(20));
    let local = p.wait_for_line("us-east-1 100%", Duration::from_secs(20));
    assert!(local.contains("100.0%"), "{local}");

    let (code, out, err) = meshctl(&cfg, &["clusters", "-o", "json"]).await;
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
    let (code, _, err) = meshctl(&cfg, &["weights", "set", "reviews", "eu-west-1=100"]).await;
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
    let addr = url.trim_start_matches("https://").parse().unwrap();
    assert!(!mesh_test::is_listening(addr), "nothing is left listening");
}
