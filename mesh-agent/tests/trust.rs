//! Trust: the refusals of the mTLS listeners (expired, not yet valid,
//! another trust domain, no certificate, no SPIFFE ID, another CA), and a
//! staged root rotation under steady traffic with real agents enrolled with
//! the federation's CA.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_test::http::Backend;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use support::{enrolled, send, stop, wait_endpoints, ClusterSpec, Mesh};

/// An HTTP/1.1 GET over TLS with `cfg` straight to an agent's inbound
/// listener: the status line, or the error that ended the connection.
async fn over_tls(
    inbound: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let name =
        rustls::pki_types::ServerName::try_from("frontend.default.svc.cluster.local").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // TLS 1.3: the server judges the client's certificate after the client
    // considers the handshake done; its verdict arrives with the first read.
    s.write_all(b"GET / HTTP/1.1\r\nHost: frontend:8080\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await {
        Ok(Ok(_)) if !out.is_empty() => Ok(String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()),
        Ok(Ok(_)) => Err("closed without an answer".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer within 10 s".into()),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config trusting `ca` that presents no certificate.
fn anonymous(ca: &mesh_test::tls::TestCa) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_listener_refuses_every_bad_client_certificate() {
    let m = Mesh::start().await;
    m.cluster(ClusterSpec {
        name: "c1",
        region: "us-east",
        zone: "us-east-1a",
        network: "n1",
        gateways: vec![],
    })
    .await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "frontend", 1).await;
    let dns = ["caller.default.svc.cluster.local"];
    let spiffe = Some("spiffe://cluster.local/ns/default/sa/caller");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let verify_as = "spiffe://cluster.local/ns/default/sa/frontend";

    // The control: a good certificate is served.
    let good = m.ca.issue(&dns, spiffe);
    let r = over_tls(frontend.inbound, m.ca.client_config(&good, verify_as)).await;
    assert_eq!(r.as_deref(), Ok("HTTP/1.1 200 OK"), "{r:?}");
    assert_eq!(app.requests(), 1);

    let stranger = mesh_test::tls::TestCa::new();
    let cases: Vec<(&str, Arc<rustls::ClientConfig>)> = vec![
        ("no client certificate", anonymous(&m.ca)),
        (
            "a certificate from another CA",
            // Verifies the server against the mesh CA, presents the stranger's leaf.
            {
                let leaf = stranger.issue(&dns, spiffe);
                let mut roots = rustls::RootCertStore::empty();
                roots.add(m.ca.cert.clone()).unwrap();
                Arc::new(
                    rustls::ClientConfig::builder_with_provider(provider())
                        .with_safe_default_protocol_versions()
                        .unwrap()
                        .with_root_certificates(roots)
                        .with_client_auth_cert(
                            leaf.chain.clone(),
                            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
                        )
                        .unwrap(),
                )
            },
        ),
        (
            "an expired certificate",
            m.ca.client_config(
                &m.ca.issue_valid(&dns, spiffe, now - 48 * hour, now - hour),
                verify_as,
            ),
        ),
        (
            "a certificate not valid yet",
            m.ca.client_config(
                &m.ca.issue_valid(&dns, spiffe, now + hour, now + 48 * hour),
                verify_as,
            ),
        ),
        (
            "another trust domain",
            m.ca.client_config(
                &m.ca
                    .issue(&dns, Some("spiffe://evil.example/ns/default/sa/caller")),
                verify_as,
            ),
        ),
        (
            "no SPIFFE ID",
            m.ca.client_config(&m.ca.issue(&dns, None), verify_as),
        ),
    ];
    for (what, cfg) in cases {
        let r = over_tls(frontend.inbound, cfg).await;
        assert!(r.is_err(), "{what}: must be refused, got {r:?}");
    }
    assert_eq!(
        app.requests(),
        1,
        "no refused caller may reach the application"
    );
    stop(vec![frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_of_another_trust_domain_is_refused() {
    let m = Mesh::start().await;
    m.cluster(ClusterSpec {
        name: "c1",
        region: "us-east",
        zone: "us-east-1a",
        network: "n1",
        gateways: vec![],
    })
    .await;
    // reviews holds a certificate from the mesh CA, for another trust domain.
    let b = Backend::start("reviews").await;
    let leaf = m.ca.issue(
        &["reviews.default.svc.cluster.local"],
        Some("spiffe://evil.example/ns/default/sa/reviews"),
    );
    let (cert, key) = (m.dir.path().join("evil.pem"), m.dir.path().join("evil.key"));
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let mut args = m.args("c1", "us-east", "us-east-1a", "reviews", b.addr, 9080);
    for (flag, v) in [("--cert", &cert), ("--key", &key)] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = v.display().to_string();
    }
    let reviews = m.agent(args).await;
    // Its certificate is no mesh node's, so the federation does not take
    // its registration; an admin lists it as reviews (what a stolen or
    // mistaken registration would look like to callers).
    support::register_by_hand(&m, "c1", "reviews", "evil", reviews.inbound).await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let r = support::get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body
            .contains("server identity spiffe://evil.example/ns/default/sa/reviews is not of trust domain cluster.local"),
        "{}",
        r.body
    );
    assert_eq!(b.requests(), 0);
    stop(vec![reviews, frontend]).await;
}

async fn trust(m: &Mesh) -> api::TrustStatus {
    AdminClient::new(m.admin().await)
        .get_trust(api::GetTrustRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn rotate(m: &Mesh, stage: api::RotationStage) -> Result<api::TrustStatus, tonic::Status> {
    AdminClient::new(m.admin().await)
        .rotate_trust(api::RotateTrustRequest {
            stage: stage as i32,
            force: false,
            actor: "test".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Waits (up to 30 s) until `done` holds for the trust status.
async fn until(m: &Mesh, what: &str, done: impl Fn(&api::TrustStatus) -> bool) -> api::TrustStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = trust(m).await;
        if done(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 30 s: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Requests to reviews through `outbound`, HTTP/1.1 and HTTP/2 in turn,
/// every `pause`, until `stop`: how many succeeded and how the others failed.
fn steady_load(
    outbound: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let h2 = ok % 2 == 0;
            let r = send(
                outbound,
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
                failed.push(format!("{} {}", r.status, r.body));
            }
            tokio::time::sleep(pause).await;
        }
        (ok, failed)
    })
}

/// A certificate for `sa` from the federation's CA, signed now (under the
/// signing root), with its key: a client certificate as an agent holds it.
async fn ca_issued(m: &Mesh, sa: &str) -> Arc<rustls::ClientConfig> {
    let token = support::join_token(m, sa).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .try_into()
            .unwrap(),
    )];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let r = api::identity_client::IdentityClient::new(m.admin().await)
        .sign_certificate(api::SignCertificateRequest {
            csr_pem: csr,
            cluster: "c1".into(),
            credential: Some(api::sign_certificate_request::Credential::JoinToken(token)),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> =
        rustls::pki_types::CertificateDer::pem_slice_iter(r.certificate_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    // The test checks the client side of the server's verdict only: any
    // server certificate is accepted here.
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_client_auth_cert(
                chain,
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
    )
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_in_stages_under_steady_traffic_without_a_failed_request() {
    // A root the federation made (a plug-in root's successor needs a seal key).
    let m = Mesh::one_cluster_with(|c| c.ca.plug_in = None).await;
    m.fed.shared.wait_synced().await;
    let b = Backend::start("reviews-1").await;
    let reviews = enrolled(&m, "reviews", b.addr, 9080).await;
    let app = Backend::start("frontend").await;
    let frontend = enrolled(&m, "frontend", app.addr, 8080).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    // Every request on a new agent-to-agent connection: a full mTLS
    // handshake each time, so every stage is exercised by real handshakes.
    m.apply(
        r"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      http: {maxRequestsPerConnection: 1}
",
    )
    .await
    .unwrap();
    let first = until(&m, "both agents report their certificate's root", |st| {
        st.subscribers.len() == 2
            && st
                .subscribers
                .iter()
                .all(|s| s.bundle_current && s.certificate_root_sha256 == st.signing_root_sha256)
    })
    .await;
    assert_eq!(first.stage, "steady");
    let old_root = first.signing_root_sha256.clone();
    // A workload certificate under the old root, for the checks below.
    let old_client = ca_issued(&m, "legacy").await;

    // Steady traffic, HTTP/1.1 and HTTP/2, until the rotation is over.
    let stop_flag = Arc::new(AtomicBool::new(false));
    let load = steady_load(
        frontend.outbound,
        stop_flag.clone(),
        Duration::from_millis(10),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Out of order: refused, naming the stages.
    let e = rotate(&m, api::RotationStage::Remove).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("at stage steady"), "{}", e.message());

    // 1. Add: both roots trusted, the old one still signs.
    let st = rotate(&m, api::RotationStage::Add).await.unwrap();
    assert_eq!((st.stage.as_str(), st.roots.len()), ("added", 2));
    assert_eq!(st.signing_root_sha256, old_root);
    let new_root = st.roots.iter().find(|r| !r.signing).unwrap().sha256.clone();
    until(&m, "every agent acknowledges the two-root bundle", |st| {
        st.subscribers.iter().all(|s| s.bundle_current)
    })
    .await;

    // 2. Reissue: the new root signs and the agents renew at once.
    let st = rotate(&m, api::RotationStage::Reissue).await.unwrap();
    assert_eq!(
        (st.stage.as_str(), st.signing_root_sha256.as_str()),
        ("reissuing", new_root.as_str())
    );
    until(
        &m,
        "every agent holds a certificate under the new root",
        |st| {
            st.subscribers
                .iter()
                .all(|s| s.bundle_current && s.certificate_root_sha256 == new_root)
        },
    )
    .await;
    // Both roots are still trusted: a certificate under the old root is served.
    let r = over_tls(reviews.inbound, old_client.clone()).await;
    assert_eq!(
        r.as_deref(),
        Ok("HTTP/1.1 200 OK"),
        "old root during the rotation: {r:?}"
    );
    let new_client = ca_issued(&m, "fresh").await;
    // The operator's own certificate is under the old root: they log in
    // again before it goes.
    m.renew_admin().await;

    // 3. Remove: only the new root is left.
    let st = rotate(&m, api::RotationStage::Remove).await.unwrap();
    assert_eq!((st.stage.as_str(), st.roots.len()), ("steady", 1));
    assert_eq!(st.roots[0].sha256, new_root);
    until(&m, "every agent acknowledges the final bundle", |st| {
        st.subscribers.iter().all(|s| s.bundle_current)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_flag.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 50, "only {ok} requests went through");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rotation: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed.first()
    );

    // The old root is no longer trusted; the new one is.
    let r = over_tls(reviews.inbound, old_client).await;
    assert!(
        r.is_err(),
        "a certificate under the removed root must be refused: {r:?}"
    );
    let r = over_tls(reviews.inbound, new_client).await;
    assert_eq!(r.as_deref(), Ok("HTTP/1.1 200 OK"), "{r:?}");

    // Every stage is in the audit log.
    let audit = AdminClient::new(m.admin().await)
        .list_audit(api::ListAuditRequest {
            since_unix_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rotations: Vec<_> = audit
        .entries
        .iter()
        .filter(|e| e.action == "rotate")
        .collect();
    assert_eq!(rotations.len(), 3, "{rotations:?}");
    stop(vec![reviews, frontend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_enroll_with_kubernetes_service_account_tokens() {
    // The federation checks tokens of c1 with the (double of the) cluster's
    // TokenReview API.
    let kube = mesh_test::kube::KubeApi::start().await;
    let kubeconfig = kube.kubeconfig().to_path_buf();
    let m = Mesh::one_cluster_with(|c| {
        c.kube.clusters.insert(
            mesh_core::name::ClusterName::new("c1").unwrap(),
            Some(kubeconfig),
        );
    })
    .await;
    m.fed.shared.wait_synced().await;
    // Projected tokens, as the kubelet writes them into the pods.
    let token_file = |sa: &str| {
        let p = m.dir.path().join(format!("{sa}.token"));
        std::fs::write(&p, kube.service_account_token("default", sa, &["fedmesh"])).unwrap();
        p
    };
    let with_kube_token = |mut args: Vec<String>, file: &std::path::Path| {
        for flag in ["--cert", "--key", "--ca"] {
            let i = args.iter().position(|a| a == flag).unwrap();
            args.drain(i..i + 2);
        }
        args.extend([
            "--kube-token-file".into(),
            file.display().to_string(),
            // The federation's CA bundle, as a ConfigMap would mount it.
            "--federation-ca".into(),
            m.ca_path.display().to_string(),
        ]);
        args
    };
    let b = Backend::start("reviews-1").await;
    let reviews = m
        .agent(with_kube_token(
            m.args("c1", "us-east", "us-east-1a", "reviews", b.addr, 9080),
            &token_file("reviews"),
        ))
        .await;
    let app = Backend::start("frontend").await;
    let frontend = m
        .agent(with_kube_token(
            m.args("c1", "us-east", "us-east-1a", "frontend", app.addr, 8080),
            &token_file("frontend"),
        ))
        .await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let r = support::get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-seen-xfcc"),
        "By=spiffe://cluster.local/ns/default/sa/reviews;URI=spiffe://cluster.local/ns/default/sa/frontend"
    );
    // A token of another service account cannot claim this one's identity.
    use clap::Parser;
    let args = with_kube_token(
        m.args("c1", "us-east", "us-east-1a", "frontend", app.addr, 8080),
        &token_file("ratings"),
    );
    let cfg = mesh_agent::config::Config::from_args(
        &mesh_agent::config::Args::try_parse_from(args).unwrap(),
    )
    .unwrap();
    let err = mesh_agent::app::build(&cfg).await.err().unwrap();
    assert!(format!("{err:#}").contains("sa/ratings"), "{err:#}");
    stop(vec![reviews, frontend]).await;
}

/// Steady traffic between two enrolled agents while c1's intermediate CA
/// reaches its renewal point (short lifetimes: 30 s, renewed with 10 s
/// left): a new intermediate is made, the agents' certificates move to it
/// as they renew, certificates of the old one keep working (on the data
/// path and at the federation's API), and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusters_intermediate_renews_before_expiry_without_a_failed_request() {
    let m = Mesh::one_cluster_with(|c| c.ca.intermediate_ttl = Duration::from_secs(30)).await;
    m.fed.shared.wait_synced().await;
    let b = Backend::start("reviews-1").await;
    let reviews = enrolled(&m, "reviews", b.addr, 9080).await;
    let app = Backend::start("frontend").await;
    let frontend = enrolled(&m, "frontend", app.addr, 8080).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    let first = trust(&m).await;
    let c1 = |st: &api::TrustStatus| {
        st.intermediates
            .iter()
            .find(|i| i.cluster == "c1")
            .cloned()
            .unwrap()
    };
    let old = c1(&first);
    assert_eq!(
        old.renew_after_unix_ms,
        old.not_after_unix_ms - 10_000,
        "renewed with a third of its life left: {old:?}"
    );
    let stop_flag = Arc::new(AtomicBool::new(false));
    let load = steady_load(
        frontend.outbound,
        stop_flag.clone(),
        Duration::from_millis(20),
    );
    // Leaves never outlive their intermediate, so a leaf ending after the
    // old intermediate was issued by the new one.
    let old_end_s = old.not_after_unix_ms / 1000;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = support::scrape(&reviews, "fedmesh_agent_certificate_not_after").await;
        let f = support::scrape(&frontend, "fedmesh_agent_certificate_not_after").await;
        #[allow(clippy::cast_precision_loss)]
        if r > old_end_s as f64 && f > old_end_s as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agents' certificates never moved to a new intermediate (ends {r}, {f}; old intermediate ends {old_end_s})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let now = trust(&m).await;
    let new = c1(&now);
    assert!(
        new.not_after_unix_ms > old.not_after_unix_ms,
        "{old:?} -> {new:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_flag.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 100, "only {ok} requests went through");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the intermediate's renewal: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed.first()
    );
    stop(vec![reviews, frontend]).await;
}

/// Three federation replicas on one etcd, agents spread across them (one
/// through a balancer, as behind a Kubernetes Service): every replica shows
/// every replica's workloads; a rotation stage waits for a workload of
/// another replica; a replica that dies leaves no rows behind once its
/// lease lapses, and its agent is served by another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_etcd_see_every_workload_and_rotation_waits_for_all() {
    use futures::StreamExt as _;
    let fx = tokio::task::spawn_blocking(mesh_test::etcd::EtcdFixture::start)
        .await
        .unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("seal.key");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(&key, federation::ca::hex_encode(&[5; 32])).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let tune = |c: &mut federation::config::Config, name: &str| {
        c.registry = federation::config::RegistrySpec::Etcd(vec![fx.endpoint()]);
        c.ca.plug_in = None;
        c.ca.key_file = Some(key.clone());
        c.replica = name.into();
        c.heartbeat_ttl = Duration::from_secs(3);
    };
    let m = Mesh::start_with("127.0.0.1", |c| tune(c, "fed-a")).await;
    m.cluster(ClusterSpec {
        name: "c1",
        region: "us-east",
        zone: "us-east-1a",
        network: "n1",
        gateways: vec![],
    })
    .await;
    let replica = |name: &str| {
        let mut c = m.replica_config("127.0.0.1:0".parse().unwrap());
        tune(&mut c, name);
        c
    };
    let fed_b = federation::app::build(&replica("fed-b")).await.unwrap();
    let fed_c = federation::app::build(&replica("fed-c")).await.unwrap();
    let service = mesh_test::relay::Balancer::start(vec![fed_b.addr, fed_c.addr])
        .await
        .unwrap();

    let rb = Backend::start("reviews-1").await;
    let reviews = enrolled(&m, "reviews", rb.addr, 9080).await;
    let fa = Backend::start("frontend").await;
    let token = support::join_token(&m, "frontend").await;
    let mut args = support::with_token(
        m.args("c1", "us-east", "us-east-1a", "frontend", fa.addr, 8080),
        &token,
    );
    let i = args.iter().position(|a| a == "--federation").unwrap();
    args[i + 1] = format!("https://{}", service.addr());
    let frontend = m.agent(args).await;
    wait_endpoints(&frontend, "reviews", 1).await;

    // Replica a sees both agents, the frontend as replica b's or c's.
    let st = until(
        &m,
        "replica a lists both agents, each with its replica",
        |st| {
            let on = |r: &str| st.subscribers.iter().filter(|s| s.replica == r).count();
            st.subscribers.len() == 2
                && on("fed-a") == 1
                && on("fed-b") + on("fed-c") == 1
                && st.subscribers.iter().all(|s| {
                    s.bundle_current && s.certificate_root_sha256 == st.signing_root_sha256
                })
        },
    )
    .await;
    assert!(st.intermediates.iter().any(|i| i.cluster == "c1"), "{st:?}");
    let home = st
        .subscribers
        .iter()
        .find(|s| s.replica != "fed-a")
        .unwrap()
        .replica
        .clone();
    let status = AdminClient::new(m.admin().await)
        .get_status(api::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status
            .subscribers
            .iter()
            .any(|s| s.replica == home && s.acked_version > 0),
        "meshctl status on replica a shows {home}'s agent: {status:?}"
    );

    // A workload on replica b that never acknowledges.
    let stalled_ctx = fed_b
        .node_context("c1", "spiffe://cluster.local/ns/default/sa/stalled")
        .await
        .unwrap();
    let ch = mesh_node::fed::Target::from_context(&stalled_ctx)
        .unwrap()
        .channel()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: "stalled".into(),
            cluster: "c1".into(),
            kind: api::NodeKind::Agent as i32,
            namespace: "default".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stalled = api::discovery_client::DiscoveryClient::new(ch)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(
        stalled.next().await.is_some(),
        "the stalled subscriber is served"
    );
    until(&m, "replica a lists replica b's stalled workload", |st| {
        st.subscribers
            .iter()
            .any(|s| s.node_id == "stalled" && s.replica == "fed-b")
    })
    .await;

    // Add, then reissue: refused while the workload on replica b lags.
    rotate(&m, api::RotationStage::Add).await.unwrap();
    until(&m, "the agents acknowledge the two-root bundle", |st| {
        st.subscribers
            .iter()
            .filter(|s| s.node_id != "stalled")
            .all(|s| s.bundle_current)
    })
    .await;
    let e = rotate(&m, api::RotationStage::Reissue).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("stalled has not acknowledged the bundle"),
        "{}",
        e.message()
    );
    drop(stalled);
    drop(tx);
    until(&m, "the stalled workload is gone from every list", |st| {
        !st.subscribers.iter().any(|s| s.node_id == "stalled")
    })
    .await;
    let st = rotate(&m, api::RotationStage::Reissue).await.unwrap();
    assert_eq!(st.stage, "reissuing");

    // The frontend's replica dies: its rows lapse with its lease; the
    // frontend is served by the other one (the balancer's next target) and
    // renews there.
    let (dead, survivor, other) = if home == "fed-b" {
        (fed_b, fed_c, "fed-c")
    } else {
        (fed_c, fed_b, "fed-b")
    };
    dead.shutdown(Duration::from_millis(100)).await.unwrap();
    until(
        &m,
        "the dead replica's rows lapsed; the frontend is on the other",
        |st| {
            !st.subscribers.iter().any(|s| s.replica == home)
                && st.subscribers.iter().any(|s| {
                    s.replica == other && s.certificate_root_sha256 == st.signing_root_sha256
                })
        },
    )
    .await;
    let r = support::get(frontend.outbound, "reviews:9080", "/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    stop(vec![reviews, frontend]).await;
    survivor.shutdown(Duration::from_secs(1)).await.unwrap();
}
