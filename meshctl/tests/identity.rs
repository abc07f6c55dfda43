//! `meshctl token create` and `meshctl audit` against a real federation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_meshctl");

async fn meshctl(args: Vec<String>) -> (i32, String, String) {
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

fn args(url: &str, rest: &[&str]) -> Vec<String> {
    let mut v = vec!["--federation".to_string(), url.to_string()];
    v.extend(rest.iter().map(ToString::to_string));
    v
}

#[tokio::test]
async fn tokens_are_created_and_audited() {
    let fed = federation::app::build(&federation::config::Config::embedded(
        ([127, 0, 0, 1], 0).into(),
    ))
    .await
    .unwrap();
    fed.shared.wait_synced().await;
    let url = format!("http://{}", fed.addr);

    let (code, out, err) = meshctl(args(
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
            "--single-use",
            "-o",
            "json",
        ],
    ))
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
    let (code, out, _) = meshctl(args(
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
    ))
    .await;
    assert_eq!(code, 0);
    assert!(out.starts_with("TOKEN"), "{out}");
    assert!(
        out.contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{out}"
    );
    let (code, out, _) = meshctl(args(&url, &["audit"])).await;
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
    let (_, out, _) = meshctl(args(&url, &["audit", "--since", "1h", "-o", "json"])).await;
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
    assert_eq!(meshctl(args(&url, &["apply", "-f", &f])).await.0, 0);
    assert_eq!(meshctl(args(&url, &["delete", "-f", &f])).await.0, 0);
    let (_, out, _) = meshctl(args(&url, &["audit", "-o", "json"])).await;
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
    let (code, _, err) = meshctl(args(
        &url,
        &[
            "token",
            "create",
            "--cluster",
            "c1",
            "--service-account",
            "Bad_SA",
        ],
    ))
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("service_account: invalid service account \"Bad_SA\""),
        "{err}"
    );
    let (code, _, err) = meshctl(args(
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
    ))
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("invalid --ttl"), "{err}");
    fed.shutdown(std::time::Duration::from_secs(1))
        .await
        .unwrap();
}
