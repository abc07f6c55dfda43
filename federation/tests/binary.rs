//! The `fedmesh-federation` binary: starts, serves, stops on SIGTERM, refuses bad flags.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_test::process::Proc;
use std::time::Duration;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-federation");

#[tokio::test]
async fn serves_then_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let admin_config = dir.path().join("admin.yaml");
    let mut p = Proc::spawn(
        BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--registry",
            "memory",
            "--bootstrap-admin",
            admin_config.to_str().unwrap(),
        ],
    );
    let addr = common::listening_addr(&mut p);
    let ctx = common::context_at(&admin_config);
    assert_eq!(ctx.server, format!("https://{addr}"));
    let mut admin = AdminClient::new(common::channel(&ctx).await);
    // The replica serves before its first sync with the registry ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = admin
            .get_status(api::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.registry, "memory");
        if st.registry_reachable {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the memory registry never became reachable: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?}; output:\n{}", p.output());
    assert!(
        !mesh_test::is_listening(addr.parse().unwrap()),
        "the port is released"
    );
}

#[test]
fn bad_flags_exit_64_naming_each_flag() {
    mesh_test::process::assert_usage_error(
        BIN,
        &[
            "--listen",
            "here",
            "--registry",
            "consul://x:1",
            "--heartbeat-ttl",
            "5",
        ],
        &[
            "fedmesh-federation: invalid --listen \"here\"",
            "invalid --registry \"consul://x:1\"",
            "invalid --heartbeat-ttl: invalid duration \"5\"",
        ],
    );
}

#[test]
fn a_taken_port_fails_startup() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let mut p = Proc::spawn(BIN, &["--listen", &addr]);
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    assert!(
        p.output().contains(&format!("bind the API on {addr}")),
        "{}",
        p.output()
    );
}

/// Starts the binary on the embedded registry in `data`, writing the first
/// admin's configuration to `admin`; returns it with its API address.
fn start_embedded(data: &std::path::Path, admin: &std::path::Path) -> (Proc, String) {
    let mut p = Proc::spawn(
        BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--bootstrap-admin",
            admin.to_str().unwrap(),
        ],
    );
    let addr = common::listening_addr(&mut p);
    (p, addr)
}

fn csr(uri: &str) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::URI(uri.try_into().unwrap()));
    (p.serialize_request(&key).unwrap().pem().unwrap(), key)
}

fn enroll(token: &str, csr_pem: &str) -> api::SignCertificateRequest {
    api::SignCertificateRequest {
        csr_pem: csr_pem.into(),
        cluster: "c1".into(),
        credential: Some(api::sign_certificate_request::Credential::JoinToken(
            token.into(),
        )),
        ttl_seconds: 0,
    }
}

/// The default registry is on disk: a federation killed with SIGKILL while
/// it acknowledges writes restarts with every acknowledged write, the same
/// CA root, its policies (a DENY among them), weights and tokens (spent ones
/// stay spent), and a workload certificate issued before renews after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_registry_keeps_every_acknowledged_write_through_kill_9() {
    use mesh_api::v1::identity_client::IdentityClient;
    use mesh_api::v1::registration_client::RegistrationClient;
    use mesh_api::v1::traffic_client::TrafficClient;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin_cfg = dir.path().join("admin.yaml");
    let (mut p, _) = start_embedded(&data, &admin_cfg);
    let chan = common::channel(&common::context_at(&admin_cfg)).await;
    let mut admin = AdminClient::new(chan.clone());
    let mut reg = RegistrationClient::new(chan.clone());
    let mut traffic = TrafficClient::new(chan.clone());
    let mut identity = IdentityClient::new(common::anonymous_at(&admin_cfg).await);

    let root = admin
        .get_trust(api::GetTrustRequest {})
        .await
        .unwrap()
        .into_inner()
        .signing_root_sha256;
    reg.register_cluster(api::RegisterClusterRequest {
        cluster: Some(common::cluster_info("c1")),
    })
    .await
    .unwrap();
    let deny = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-admin", "namespace": "default"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}
    });
    admin
        .apply_policies(api::ApplyPoliciesRequest {
            source: "deny.yaml".into(),
            documents: vec![api::PolicyDocument {
                r#ref: Some(api::PolicyRef {
                    kind: "AuthorizationPolicy".into(),
                    namespace: "default".into(),
                    name: "deny-admin".into(),
                }),
                json: deny.to_string(),
                revision: 0,
            }],
            dry_run: false,
        })
        .await
        .unwrap();
    let service = api::ServiceKey {
        namespace: "default".into(),
        name: "reviews".into(),
    };
    reg.register_endpoint(api::RegisterEndpointRequest {
        endpoint: Some(common::reviews_endpoint("c1", 0)),
    })
    .await
    .unwrap();
    traffic
        .set_weights(api::SetWeightsRequest {
            service: Some(service.clone()),
            by: "cluster".into(),
            weights: [("c1".to_string(), 100)].into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let token = |single: bool| api::CreateJoinTokenRequest {
        cluster: "c1".into(),
        namespace: "default".into(),
        service_account: "reviews".into(),
        ttl_seconds: 3600,
        reusable: !single,
        ..Default::default()
    };
    let unused = admin
        .create_join_token(token(false))
        .await
        .unwrap()
        .into_inner()
        .token;
    let spent = admin
        .create_join_token(token(true))
        .await
        .unwrap()
        .into_inner()
        .token;
    let reviews = "spiffe://cluster.local/ns/default/sa/reviews";
    let (pem, key) = csr(reviews);
    let issued = identity
        .sign_certificate(enroll(&spent, &pem))
        .await
        .unwrap()
        .into_inner();

    // Writes go on, one at a time, each counted once acknowledged, until
    // the federation is killed under them.
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let acked = acked.clone();
        let mut reg = reg.clone();
        tokio::spawn(async move {
            for i in 0..100_000 {
                let req = api::RegisterEndpointRequest {
                    endpoint: Some(common::reviews_endpoint("c1", i)),
                };
                if reg.register_endpoint(req).await.is_err() {
                    return;
                }
                acked.store(i + 1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    mesh_test::assert_eventually!(
        acked.load(std::sync::atomic::Ordering::SeqCst) >= 40,
        Duration::from_secs(30)
    );
    p.signal("KILL");
    let _ = p.wait_exit(Duration::from_secs(10));
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .unwrap()
        .unwrap();
    let acked = acked.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("{acked} registrations acknowledged before SIGKILL");

    let (mut p, _) = start_embedded(&data, &admin_cfg);
    let chan = common::channel(&common::context_at(&admin_cfg)).await;
    let mut admin = AdminClient::new(chan.clone());
    let mut traffic = TrafficClient::new(chan.clone());
    let mut identity = IdentityClient::new(common::anonymous_at(&admin_cfg).await);
    let trust = admin
        .get_trust(api::GetTrustRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(trust.signing_root_sha256, root, "the CA root survives");
    let eps = admin
        .list_endpoints(api::ListEndpointsRequest {
            service: Some(service.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    let ids: std::collections::HashSet<_> = eps.iter().map(|e| e.id.clone()).collect();
    let lost: Vec<_> = (0..acked)
        .filter(|i| !ids.contains(&format!("r{i}")))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged, then lost: {lost:?} of {acked}"
    );
    let policies = admin
        .list_policies(api::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .documents;
    assert!(
        policies
            .iter()
            .any(|d| d.r#ref.as_ref().is_some_and(|r| r.name == "deny-admin")),
        "the DENY policy survives: {policies:?}"
    );
    let w = traffic
        .get_weights(api::GetWeightsRequest {
            service: Some(service),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        w.configured.map(|c| c.weights),
        Some([("c1".to_string(), 100)].into()),
        "the weights survive"
    );
    // Tokens: the unused one enrolls, the spent one stays spent.
    let (pem2, _) = csr(reviews);
    identity
        .sign_certificate(enroll(&unused, &pem2))
        .await
        .unwrap();
    let s = identity
        .sign_certificate(enroll(&spent, &pem2))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("already used"), "{s:?}");
    // The certificate issued before the restart renews after it.
    {
        use rcgen::SigningKey as _;
        let (csr_pem, _) = csr(reviews);
        let signature = key.sign(csr_pem.as_bytes()).unwrap();
        let renewed = identity
            .sign_certificate(api::SignCertificateRequest {
                csr_pem,
                cluster: "c1".into(),
                credential: Some(api::sign_certificate_request::Credential::Renewal(
                    api::Renewal {
                        chain_pem: issued.certificate_chain_pem.clone(),
                        signature,
                    },
                )),
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(renewed.trust_bundle_pem, issued.trust_bundle_pem);
    }
    p.signal("TERM");
    assert!(
        p.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        p.output()
    );
}
