//! `meshctl token create` and `meshctl audit` against a real federation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{admin_config, args};

/// meshctl as the admin of `cfg`.
async fn meshctl(cfg: &std::path::Path, args: Vec<String>) -> (i32, String, String) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    common::meshctl(cfg, &a).await
}

#[tokio::test]
async fn tokens_are_created_and_audited() {
    let fed = federation::app::build(&federation::config::Config::embedded(
        ([127, 0, 0, 1], 0).into(),
    ))
    .await
    .unwrap();
    fed.shared.wait_synced().await;
    let (_dir, cfg) = admin_config(&fed).await;
    let url = fed.url();

    let (code, out, err) = meshctl(
        &cfg,
        args(
            &url,
            &[
                "token",
                "create",
                "--cluster",
                "c1",
                "--service-account",
                "reviews",
                "--ttl",
                "10m",
                "-o",
                "json",
            ],
        ),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = &rows[0];
    assert!(row["token"].as_str().unwrap().starts_with("fmjt_"), "{out}");
    assert_eq!(
        row["identity"],
        "spiffe://cluster.local/ns/default/sa/reviews"
    );

    // Table form; then the audit log shows both creations, not the secrets.
    let (code, out, _) = meshctl(
        &cfg,
        args(
            &url,
            &[
                "token",
                "create",
                "--cluster",
                "c1",
                "-n",
                "shop",
                "--service-account",
                "cart",
            ],
        ),
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.starts_with("TOKEN"), "{out}");
    assert!(
        out.contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{out}"
    );
    let (code, out, _) = meshctl(&cfg, args(&url, &["audit"])).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("TIME"), "{out}");
    assert_eq!(
        lines.iter().filter(|l| l.contains("token_create")).count(),
        2,
        "{out}"
    );
    assert!(
        !out.contains("fmjt_"),
        "the audit log must not hold secrets: {out}"
    );
    let (_, out, _) = meshctl(&cfg, args(&url, &["audit", "--since", "1h", "-o", "json"])).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Policy changes are audited too, each document by name.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("dr.yaml");
    std::fs::write(
        &f,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec: {host: reviews}\n",
    )
    .unwrap();
    let f = f.display().to_string();
    assert_eq!(meshctl(&cfg, args(&url, &["apply", "-f", &f])).await.0, 0);
    assert_eq!(meshctl(&cfg, args(&url, &["delete", "-f", &f])).await.0, 0);
    let (_, out, _) = meshctl(&cfg, args(&url, &["audit", "-o", "json"])).await;
    let entries: serde_json::Value = serde_json::from_str(&out).unwrap();
    let policy: Vec<(String, String)> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("policy_"))
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        policy,
        vec![
            (
                "policy_apply".to_string(),
                "DestinationRule default/reviews".to_string()
            ),
            (
                "policy_delete".to_string(),
                "DestinationRule default/reviews".to_string()
            ),
        ]
    );

    // Refusals: a bad service account, a bad duration.
    let (code, _, err) = meshctl(
        &cfg,
        args(
            &url,
            &[
                "token",
                "create",
                "--cluster",
                "c1",
                "--service-account",
                "Bad_SA",
            ],
        ),
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("service_account: invalid service account \"Bad_SA\""),
        "{err}"
    );
    let (code, _, err) = meshctl(
        &cfg,
        args(
            &url,
            &[
                "token",
                "create",
                "--cluster",
                "c1",
                "--service-account",
                "x",
                "--ttl",
                "soon",
            ],
        ),
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("invalid --ttl"), "{err}");
    fed.shutdown(std::time::Duration::from_secs(1))
        .await
        .unwrap();
}

/// A workload on the Discovery stream that acknowledges every version half
/// a second late and, like an agent enrolled with the CA, reports a
/// certificate under the signing root of the last bundle it received.
async fn slow_workload(fed: &federation::app::Bound) -> tokio::task::JoinHandle<()> {
    use mesh_api::v1 as api;
    // An agent of c1: a node certificate from the CA.
    let ch = mesh_node::fed::Target::from_context(
        &fed.node_context("c1", "spiffe://cluster.local/ns/default/sa/slow")
            .await
            .unwrap(),
    )
    .unwrap()
    .channel()
    .await
    .unwrap();
    tokio::spawn(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(api::DiscoveryRequest {
            request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
                node_id: "agent~c1~slow".into(),
                cluster: "c1".into(),
                kind: api::NodeKind::Agent as i32,
                namespace: "default".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut stream = api::discovery_client::DiscoveryClient::new(ch)
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut root = String::new();
        while let Ok(Some(msg)) = stream.message().await {
            if let Some(t) = &msg.trust {
                root.clone_from(&t.signing_root_sha256);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let ack = api::Ack {
                version: msg.version,
                certificate_root_sha256: root.clone(),
            };
            if tx
                .send(api::DiscoveryRequest {
                    request: Some(api::discovery_request::Request::Ack(ack)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

#[tokio::test]
async fn trust_rotate_runs_every_stage_and_waits_for_the_workloads() {
    let fed = federation::app::build(&federation::config::Config::embedded(
        ([127, 0, 0, 1], 0).into(),
    ))
    .await
    .unwrap();
    fed.shared.wait_synced().await;
    let (_dir, cfg) = admin_config(&fed).await;
    let url = fed.url();
    let workload = slow_workload(&fed).await;

    let (code, out, err) = meshctl(&cfg, args(&url, &["trust", "status", "-o", "json"])).await;
    assert_eq!(code, 0, "{err}");
    let before: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(before["stage"], "steady", "{out}");
    let old_root = before["roots"][0]["sha256"].as_str().unwrap().to_string();
    let inter = &before["intermediates"][0];
    assert_eq!(inter["cluster"], "c1", "{out}");
    assert!(
        inter["renew_after"].as_str().unwrap() < inter["not_after"].as_str().unwrap(),
        "{out}"
    );
    assert!(
        before["workloads"][0]["replica"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{out}"
    );
    let (_, table, _) = meshctl(&cfg, args(&url, &["trust", "status"])).await;
    assert!(
        table.contains("INTERMEDIATE") && table.lines().any(|l| l.starts_with("c1 ")),
        "c1's intermediate is listed: {table}"
    );

    // Out of order: refused on stderr, exit 1, nothing changed.
    let (code, out, err) =
        meshctl(&cfg, args(&url, &["trust", "rotate", "--stage", "remove"])).await;
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("at stage steady"), "{err}");

    let (code, out, err) = meshctl(&cfg, args(&url, &["trust", "rotate", "-o", "json"])).await;
    assert_eq!(code, 0, "{err}");
    let stages: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = stages
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["add", "reissue", "remove"], "{out}");
    for s in stages.as_array().unwrap() {
        assert_eq!(s["workloads"], "1/1", "{out}");
    }
    // Progress went to stderr, including the wait for the slow workload.
    assert!(
        err.contains("[1/3] add: 0/1 workloads trusting the new root"),
        "{err}"
    );
    assert!(
        err.contains("[2/3] reissue: 1/1 workloads with a certificate under the new root"),
        "{err}"
    );

    let (code, out, _) = meshctl(&cfg, args(&url, &["trust", "status"])).await;
    assert_eq!(code, 0);
    assert!(out.contains("stage steady"), "{out}");
    assert!(out.contains("agent~c1~slow"), "{out}");
    assert!(out.contains("REPLICA"), "{out}");
    assert!(
        !out.contains(&old_root[..16]),
        "the old root is gone: {out}"
    );
    let (_, out, _) = meshctl(&cfg, args(&url, &["audit", "-o", "json"])).await;
    let rotations = serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rotate")
        .count();
    assert_eq!(rotations, 3, "{out}");
    workload.abort();
    fed.shutdown(std::time::Duration::from_secs(1))
        .await
        .unwrap();
}
