#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Kubernetes ServiceAccount attestation through the federation's gRPC API:
//! the federation POSTs TokenReviews with kube's client to
//! [`mesh_test::kube::KubeApi`], a double of the API server speaking its
//! wire format over HTTPS, and signs for `ns/<ns>/sa/<sa>` only what the
//! review grants. Every refusal is audited; the token never is.

use federation::app::{self, Bound};
use federation::config::Config;
use federation::store::memory::MemoryStore;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::identity_client::IdentityClient;
use mesh_core::name::ClusterName;
use mesh_test::kube::{KubeApi, FEDERATION_USER, TOKEN_REVIEWS_PATH};
use mesh_test::process::Proc;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-federation");
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
/// Bound on any one call.
const PATIENCE: Duration = Duration::from_secs(30);

fn config(audience: &str, clusters: &[(&str, Option<PathBuf>)]) -> Config {
    let mut c = Config::embedded(([127, 0, 0, 1], 0).into());
    c.ca.leaf_ttl = Duration::from_secs(3600);
    c.kube.audience = audience.into();
    for (name, path) in clusters {
        c.kube
            .clusters
            .insert(ClusterName::new(name).unwrap(), path.clone());
    }
    c
}

async fn start(cfg: &Config) -> Bound {
    mesh_test::trace_init();
    tokio::time::timeout(PATIENCE, app::serve(cfg, Arc::new(MemoryStore::new())))
        .await
        .expect("the federation starts in time")
        .unwrap()
}

/// A CSR for one URI SAN, and its key.
fn csr(uri: &str) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::URI(uri.try_into().unwrap()));
    (p.serialize_request(&key).unwrap().pem().unwrap(), key)
}

async fn sign_at(
    ch: tonic::transport::Channel,
    cluster: &str,
    token: &str,
    csr_pem: &str,
) -> Result<api::SignCertificateResponse, tonic::Status> {
    tokio::time::timeout(PATIENCE, async {
        let mut c = IdentityClient::new(ch);
        c.sign_certificate(api::SignCertificateRequest {
            csr_pem: csr_pem.into(),
            cluster: cluster.into(),
            credential: Some(api::sign_certificate_request::Credential::KubernetesToken(
                token.into(),
            )),
            ttl_seconds: 0,
        })
        .await
        .map(tonic::Response::into_inner)
    })
    .await
    .expect("SignCertificate answers in time")
}

async fn sign(
    b: &Bound,
    cluster: &str,
    token: &str,
    csr_pem: &str,
) -> Result<api::SignCertificateResponse, tonic::Status> {
    sign_at(common::anonymous(b).await, cluster, token, csr_pem).await
}

/// Verifies a chain as a TLS peer would: to the bundle's roots, for client
/// authentication; returns the leaf's URI SANs.
fn verify(resp: &api::SignCertificateResponse) -> Vec<String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(resp.certificate_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    assert_eq!(chain.len(), 2, "leaf and intermediate");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(resp.trust_bundle_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    v.verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect()
}

async fn audit(b: &Bound) -> Vec<api::AuditEntry> {
    tokio::time::timeout(PATIENCE, async {
        AdminClient::new(common::admin(b).await)
            .list_audit(api::ListAuditRequest {
                since_unix_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
    })
    .await
    .expect("the audit log is read in time")
}

fn assert_not_in_audit(entries: &[api::AuditEntry], secrets: &[&str]) {
    for e in entries {
        for s in secrets {
            assert!(
                !e.subject.contains(s) && !e.detail.contains(s) && !e.action.contains(s),
                "a token is in the audit log: {e:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_service_account_token_gets_a_certificate_for_its_account() {
    let kube = KubeApi::start().await;
    let b = start(&config(
        "fedmesh",
        &[("c1", Some(kube.kubeconfig().to_path_buf()))],
    ))
    .await;
    let token = kube.service_account_token("default", "reviews", &["fedmesh"]);
    let (pem, _key) = csr(REVIEWS);
    let resp = sign(&b, "c1", &token, &pem).await.unwrap();
    assert_eq!(resp.identity, REVIEWS);
    assert_eq!(verify(&resp), vec![format!("URI({REVIEWS})")]);

    // The federation asked as the API server expects: its own bearer token,
    // a TokenReview for the token and the federation's audience.
    let got = kube.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!((r.method.as_str(), r.answered), ("POST", 201));
    assert!(r.path.starts_with(TOKEN_REVIEWS_PATH), "{}", r.path);
    assert_eq!(
        r.authorization.as_deref(),
        Some(format!("Bearer {}", kube.federation_token()).as_str())
    );
    assert!(
        r.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json")),
        "{r:?}"
    );
    assert_eq!(r.body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(r.body["kind"], "TokenReview");
    assert_eq!(r.body["spec"]["token"], token.as_str());
    assert_eq!(r.body["spec"]["audiences"], serde_json::json!(["fedmesh"]));

    let a = audit(&b).await;
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(
        (a[0].action.as_str(), a[0].subject.as_str()),
        ("issue", REVIEWS)
    );
    assert!(
        a[0].detail.contains("cluster c1, kubernetes token"),
        "{:?}",
        a[0].detail
    );
    assert_not_in_audit(&a, &[&token]);
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn refusals_name_the_reason_are_audited_and_never_hold_the_token() {
    let kube = KubeApi::start().await;
    // c2's kubeconfig holds a token the API server does not know (expired,
    // say): the API answers 401 to the federation itself.
    let stale = kube.write_kubeconfig("stale", "eyJhbGciOiJSUzI1NiJ9.e30.c3RhbGU");
    // c3's kubeconfig trusts another CA than the API server's certificate's.
    let other_ca = mesh_test::tls::TestCa::new();
    let impostor =
        kube.write_kubeconfig_trusting("impostor", kube.federation_token(), &other_ca.pem);
    let b = start(&config(
        "fedmesh",
        &[
            ("c1", Some(kube.kubeconfig().to_path_buf())),
            ("c2", Some(stale)),
            ("c3", Some(impostor)),
        ],
    ))
    .await;
    let reviews = kube.service_account_token("default", "reviews", &["fedmesh"]);
    let (good, _) = csr(REVIEWS);
    let mut secrets = vec![reviews.clone()];
    let mut refusals = 0;

    // A CSR for another identity than the token's account.
    let (admin, _) = csr("spiffe://cluster.local/ns/default/sa/admin");
    let e = sign(&b, "c1", &reviews, &admin).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("asks for spiffe://cluster.local/ns/default/sa/admin")
            && e.message().contains(&format!("grants {REVIEWS}")),
        "{}",
        e.message()
    );

    // A token the API server does not know: its status.error.
    let forged = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImZvcmdlZCJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpyZXZpZXdzIn0.Zm9yZ2Vk";
    secrets.push(forged.into());
    let e = sign(&b, "c1", forged, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains(
            "the Kubernetes API of cluster c1 did not authenticate the token: [invalid bearer token"
        ),
        "{}",
        e.message()
    );

    // A token for another audience: the API server does not authenticate it.
    let vault = kube.service_account_token("default", "reviews", &["vault"]);
    secrets.push(vault.clone());
    let e = sign(&b, "c1", &vault, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains(
            r#"token audiences ["vault"] is invalid for the target audiences ["fedmesh"]"#
        ),
        "{}",
        e.message()
    );

    // A person's token, not a service account's.
    let alice = kube.user_token("alice@example.com", &["fedmesh"]);
    secrets.push(alice.clone());
    let e = sign(&b, "c1", &alice, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("\"alice@example.com\"'s, not a service account's"),
        "{}",
        e.message()
    );

    // An empty token; a cluster with no Kubernetes API configured.
    let e = sign(&b, "c1", "", &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = sign(&b, "c9", &reviews, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("no Kubernetes API configured") && e.message().contains("cluster c9"),
        "{}",
        e.message()
    );

    // The federation's own credentials: refused (401), not allowed (403).
    let e = sign(&b, "c2", &reviews, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains("the federation lacks permission to create tokenreviews")
            && e.message().contains("cluster c2")
            && e.message().contains("401 Unauthorized")
            && e.message()
                .contains("does not accept the federation's own credentials"),
        "{}",
        e.message()
    );
    kube.set_federation_may_review(false);
    let e = sign(&b, "c1", &reviews, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains("the federation lacks permission to create tokenreviews")
            && e.message().contains(&format!(
                "403 Forbidden: tokenreviews.authentication.k8s.io is forbidden: User \"{FEDERATION_USER}\" cannot create resource \"tokenreviews\""
            ))
            && e.message().contains("system:auth-delegator"),
        "{}",
        e.message()
    );
    // Permission back: the same token signs.
    kube.set_federation_may_review(true);

    // The API failing (500); a server the kubeconfig's CA did not certify,
    // which gets no request.
    kube.fail_reviews_with(500);
    let e = sign(&b, "c1", &reviews, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(
            "the Kubernetes API of cluster c1 is unavailable: the TokenReview was answered \
             500 InternalError: Internal error occurred"
        ),
        "{}",
        e.message()
    );
    kube.fail_reviews_with(0);
    let before = kube.received().len();
    let e = sign(&b, "c3", &reviews, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains("the Kubernetes API of cluster c3 is unavailable: ")
            && e.message().contains("invalid peer certificate"),
        "{}",
        e.message()
    );
    assert_eq!(
        kube.received().len(),
        before,
        "no request to an uncertified server"
    );
    assert_eq!(
        sign(&b, "c1", &reviews, &good).await.unwrap().identity,
        REVIEWS
    );

    // The API server down.
    kube.stop();
    let e = sign(&b, "c1", &reviews, &good).await.unwrap_err();
    refusals += 1;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains("the Kubernetes API of cluster c1 is unavailable: ")
            && e.message().contains("Connection refused"),
        "{}",
        e.message()
    );

    let a = audit(&b).await;
    assert_eq!(
        a.iter().filter(|e| e.action == "refuse").count(),
        refusals,
        "every refusal is audited: {a:?}"
    );
    assert_eq!(a.iter().filter(|e| e.action == "issue").count(), 1);
    assert!(
        a.iter().any(|e| e.action == "refuse"
            && e.subject == "cluster c1"
            && e.detail.contains("lacks permission to create tokenreviews")),
        "{a:?}"
    );
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_not_in_audit(&a, &secrets);
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn the_audience_is_the_configured_one() {
    let kube = KubeApi::start().await;
    let b = start(&config(
        "mesh.example.com",
        &[("c1", Some(kube.kubeconfig().to_path_buf()))],
    ))
    .await;
    let (pem, _) = csr("spiffe://cluster.local/ns/shop/sa/cart");
    let ok = kube.service_account_token("shop", "cart", &["mesh.example.com", "vault"]);
    let resp = sign(&b, "c1", &ok, &pem).await.unwrap();
    assert_eq!(resp.identity, "spiffe://cluster.local/ns/shop/sa/cart");
    let default_aud = kube.service_account_token("shop", "cart", &["fedmesh"]);
    let e = sign(&b, "c1", &default_aud, &pem).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("mesh.example.com"), "{}", e.message());
    let sent: Vec<_> = kube
        .received()
        .iter()
        .map(|r| r.body["spec"]["audiences"].clone())
        .collect();
    assert_eq!(sent, vec![serde_json::json!(["mesh.example.com"]); 2]);
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// `--kube-cluster NAME` alone: the configuration is inferred, here from
/// `KUBECONFIG` (given to the child only).
#[tokio::test]
async fn the_binary_infers_the_cluster_config_from_kubeconfig() {
    let kube = KubeApi::start().await;
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = format!("KUBECONFIG={}", kube.kubeconfig().display());
    let home_env = format!("HOME={}", home.path().display());
    // The first admin's configuration holds the CA bundle a pod would mount.
    let admin_config = home.path().join("admin.yaml");
    let mut p = Proc::spawn(
        "env",
        &[
            "-u",
            "KUBERNETES_SERVICE_HOST",
            &kubeconfig,
            &home_env,
            BIN,
            "--listen",
            "127.0.0.1:0",
            "--registry",
            "memory",
            "--kube-cluster",
            "c1",
            "--bootstrap-admin",
            admin_config.to_str().unwrap(),
        ],
    );
    let addr = common::listening_addr(&mut p);
    let token = kube.service_account_token("default", "reviews", &["fedmesh"]);
    let (pem, _) = csr(REVIEWS);
    let mut ctx = mesh_core::client_config::ClientConfig::load(&admin_config)
        .unwrap()
        .context(None)
        .unwrap()
        .clone();
    assert_eq!(ctx.server, format!("https://{addr}"));
    ctx.client_certificate_data.clear();
    ctx.client_key_data.clear();
    let resp = sign_at(common::channel(&ctx).await, "c1", &token, &pem)
        .await
        .unwrap();
    assert_eq!(resp.identity, REVIEWS);
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?}; output:\n{}", p.output());
    assert!(!p.output().contains(&token), "the token is in the logs");
}

#[tokio::test]
async fn nothing_to_infer_stops_start_up_naming_the_cluster() {
    let home = tempfile::tempdir().unwrap();
    let home_env = format!("HOME={}", home.path().display());
    let mut p = Proc::spawn(
        "env",
        &[
            "-u",
            "KUBECONFIG",
            "-u",
            "KUBERNETES_SERVICE_HOST",
            "-u",
            "KUBERNETES_SERVICE_PORT",
            &home_env,
            BIN,
            "--listen",
            "127.0.0.1:0",
            "--registry",
            "memory",
            "--kube-cluster",
            "c1",
        ],
    );
    let status = p.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "output:\n{}", p.output());
    assert!(
        p.output()
            .contains("--kube-cluster c1: no Kubernetes configuration to infer"),
        "{}",
        p.output()
    );
}

#[test]
fn bad_kube_flags_exit_64_naming_each() {
    mesh_test::process::assert_usage_error(
        BIN,
        &[
            "--kube-cluster",
            "Not_A_Cluster",
            "--kube-cluster",
            "c1=/nonexistent/kubeconfig",
            "--kube-token-audience",
            "",
        ],
        &[
            "invalid --kube-token-audience \"\"",
            "invalid --kube-cluster \"Not_A_Cluster\": invalid cluster name",
            "invalid --kube-cluster \"c1=/nonexistent/kubeconfig\": cannot read the kubeconfig",
        ],
    );
}
