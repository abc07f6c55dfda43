//! The federation against a real etcd serving TLS with client-certificate
//! authentication (`--client-cert-auth`), as the Helm chart and kustomize
//! base connect it (`--etcd-ca`, `--etcd-cert`, `--etcd-key` from a
//! Secret): with the right files it serves and its writes land in etcd;
//! without a client certificate, or with a CA that did not sign etcd's
//! certificate, it refuses to start and says why.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::store::etcd::{EtcdStore, EtcdTls};
use federation::store::Store as _;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_test::etcd::EtcdFixture;
use mesh_test::process::Proc;
use mesh_test::tls::TestCa;
use std::time::Duration;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-federation");

fn registry(fx: &EtcdFixture) -> String {
    format!("etcd://{}", fx.client_addr())
}

#[tokio::test]
async fn serves_over_tls_with_a_client_certificate() {
    let ca = TestCa::new();
    let (fx, files) = EtcdFixture::start_tls(&ca);
    let (ca_f, cert, key) = (
        files.ca.to_str().unwrap(),
        files.cert.to_str().unwrap(),
        files.key.to_str().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin_config = dir.path().join("admin.yaml");
    let mut p = Proc::spawn(
        BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--registry",
            &registry(&fx),
            "--etcd-ca",
            ca_f,
            "--etcd-cert",
            cert,
            "--etcd-key",
            key,
            "--bootstrap-admin",
            admin_config.to_str().unwrap(),
        ],
    );
    let line = p.wait_for_line("listening on", Duration::from_secs(30));
    let addr = line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let ctx = common::context_at(&admin_config);
    assert_eq!(ctx.server, format!("https://{addr}"));
    let ch = common::channel(&ctx).await;
    // The replica serves before its first sync with etcd ends.
    let mut admin = AdminClient::new(ch.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = admin
            .get_status(api::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.registry_reachable {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "etcd over TLS never became reachable: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    RegistrationClient::new(ch)
        .register_cluster(api::RegisterClusterRequest {
            cluster: Some(api::ClusterInfo {
                name: "tls-1".into(),
                locality: Some(api::Locality {
                    region: "eu-west".into(),
                    zone: "eu-west-1a".into(),
                }),
                network: "net-tls-1".into(),
                gateway_addresses: vec!["192.0.2.10:15443".into()],
                trust_domain: "cluster.local".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // The write is in etcd, read back over TLS by another client.
    let tls = EtcdTls {
        ca: files.ca.clone(),
        cert: Some(files.cert.clone()),
        key: Some(files.key.clone()),
    };
    let store = EtcdStore::connect_with(&[format!("http://{}", fx.client_addr())], Some(&tls))
        .await
        .unwrap();
    let kv = store
        .get("/fedmesh/v1/clusters/tls-1")
        .await
        .unwrap()
        .expect("the cluster is stored in etcd");
    assert!(String::from_utf8_lossy(&kv.value).contains("eu-west-1a"));
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(10)).success());
}

/// Starts the binary with `extra` flags and returns its output once it
/// exited (it must exit, unsuccessfully).
fn refused(fx: &EtcdFixture, extra: &[&str]) -> String {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    let reg = registry(fx);
    args.extend_from_slice(&["--registry", &reg]);
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(BIN, &args);
    let status = p.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "started with {extra:?}:\n{}", p.output());
    p.output()
}

#[tokio::test]
async fn refuses_without_the_right_certificates() {
    let ca = TestCa::new();
    let (fx, files) = EtcdFixture::start_tls(&ca);
    let ca_f = files.ca.to_str().unwrap();
    // No client certificate: etcd's client-cert-auth turns it away.
    let out = refused(&fx, &["--etcd-ca", ca_f]);
    eprintln!("no client certificate:\n{out}");
    assert!(out.contains("etcd"), "{out}");
    // A CA that did not sign etcd's certificate.
    let other = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong-ca.crt");
    std::fs::write(&wrong, &other.pem).unwrap();
    let out = refused(
        &fx,
        &[
            "--etcd-ca",
            wrong.to_str().unwrap(),
            "--etcd-cert",
            files.cert.to_str().unwrap(),
            "--etcd-key",
            files.key.to_str().unwrap(),
        ],
    );
    assert!(out.contains("etcd"), "{out}");
    // Plain gRPC to a TLS-only etcd.
    let out = refused(&fx, &[]);
    assert!(out.contains("etcd"), "{out}");
    // Flags that cannot work are refused before anything is tried, each
    // named.
    let out = refused(&fx, &["--etcd-cert", files.cert.to_str().unwrap()]);
    assert!(
        out.contains("--etcd-cert and --etcd-key go together") && out.contains("need --etcd-ca"),
        "{out}"
    );
    let out = refused(
        &fx,
        &[
            "--etcd-ca",
            files.key.to_str().unwrap(),
            "--etcd-cert",
            files.cert.to_str().unwrap(),
            "--etcd-key",
            "/nonexistent/client.key",
        ],
    );
    assert!(
        out.contains("invalid --etcd-ca") && out.contains("not a PEM certificate"),
        "{out}"
    );
    assert!(
        out.contains("invalid --etcd-key /nonexistent/client.key"),
        "{out}"
    );
}
