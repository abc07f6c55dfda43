//! The mesh CA through the federation's gRPC API: join tokens, CSR signing,
//! refusals (each audited), the root kept sealed in a real etcd and shared by
//! replicas, and a plug-in root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::app::{self, Bound};
use federation::config::Config;
use federation::store::etcd::EtcdStore;
use federation::store::memory::MemoryStore;
use federation::store::Store;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::identity_client::IdentityClient;
use mesh_test::etcd::EtcdFixture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

mod common;

fn config(ca: federation::ca::CaConfig) -> Config {
    let mut c = Config::embedded(([127, 0, 0, 1], 0).into());
    c.ca = ca;
    c
}

fn ca_cfg() -> federation::ca::CaConfig {
    federation::ca::CaConfig {
        trust_domain: "cluster.local".into(),
        leaf_ttl: Duration::from_secs(3600),
        ..Default::default()
    }
}

async fn start(cfg: &Config, store: Arc<dyn Store>) -> Bound {
    mesh_test::trace_init();
    app::serve(cfg, store).await.unwrap()
}

async fn token(b: &Bound, cluster: &str, sa: &str, ttl: u32, single_use: bool) -> String {
    let mut admin = AdminClient::new(common::admin(b).await);
    b.shared.wait_synced().await;
    admin
        .create_join_token(api::CreateJoinTokenRequest {
            cluster: cluster.into(),
            namespace: "default".into(),
            service_account: sa.into(),
            ttl_seconds: ttl,
            reusable: !single_use,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// A CSR with these URI SANs (and DNS names), and its key.
fn csr(uris: &[&str], dns: &[&str]) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(dns.iter().map(ToString::to_string).collect::<Vec<_>>())
            .unwrap();
    for u in uris {
        p.subject_alt_names
            .push(rcgen::SanType::URI((*u).try_into().unwrap()));
    }
    (p.serialize_request(&key).unwrap().pem().unwrap(), key)
}

async fn sign(
    b: &Bound,
    cluster: &str,
    token: &str,
    csr_pem: &str,
) -> Result<api::SignCertificateResponse, tonic::Status> {
    let mut c = IdentityClient::new(common::anonymous(b).await);
    c.sign_certificate(api::SignCertificateRequest {
        csr_pem: csr_pem.into(),
        cluster: cluster.into(),
        credential: Some(api::sign_certificate_request::Credential::JoinToken(
            token.into(),
        )),
        ttl_seconds: 0,
    })
    .await
    .map(tonic::Response::into_inner)
}

const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// Verifies a chain as a TLS peer would: to the bundle's roots, for client
/// authentication.
fn verify(resp: &api::SignCertificateResponse) -> Result<(), String> {
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
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn leaf_uris(resp: &api::SignCertificateResponse) -> Vec<String> {
    let der = CertificateDer::pem_slice_iter(resp.certificate_chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect()
}

async fn audit(b: &Bound) -> Vec<api::AuditEntry> {
    AdminClient::new(common::admin(b).await)
        .list_audit(api::ListAuditRequest {
            since_unix_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

#[tokio::test]
async fn a_join_token_gets_a_verifiable_spiffe_certificate() {
    let b = start(&config(ca_cfg()), Arc::new(MemoryStore::new())).await;
    let t = token(&b, "c1", "reviews", 600, false).await;
    let (pem, _key) = csr(&[REVIEWS], &[]);
    let resp = sign(&b, "c1", &t, &pem).await.unwrap();
    assert_eq!(resp.identity, REVIEWS);
    verify(&resp).unwrap();
    assert_eq!(leaf_uris(&resp), vec![format!("URI({REVIEWS})")]);
    let now = federation::registry::now_unix_ms();
    let left = resp.not_after_unix_ms - now;
    assert!(
        (3_500_000..=3_600_000).contains(&left),
        "{left} ms left, ttl 1h"
    );
    // A reusable token signs again (renewal), with the same intermediate.
    let (pem2, _) = csr(&[REVIEWS], &[]);
    let again = sign(&b, "c1", &t, &pem2).await.unwrap();
    let inter = |r: &api::SignCertificateResponse| {
        r.certificate_chain_pem
            .split("-----END CERTIFICATE-----")
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(inter(&resp), inter(&again));
    let a = audit(&b).await;
    assert_eq!(
        a.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        vec!["token_create", "issue", "issue"]
    );
    assert!(a.iter().all(|e| e.subject == REVIEWS), "{a:?}");
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn refusals_name_the_reason_and_are_audited() {
    let b = start(&config(ca_cfg()), Arc::new(MemoryStore::new())).await;
    let t = token(&b, "c1", "reviews", 600, false).await;
    let (good, _) = csr(&[REVIEWS], &[]);

    // Asking for another identity than the token grants.
    let (other, _) = csr(&["spiffe://cluster.local/ns/default/sa/admin"], &[]);
    let e = sign(&b, "c1", &t, &other).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("asks for spiffe://cluster.local/ns/default/sa/admin"),
        "{}",
        e.message()
    );
    // Extra names beside the SPIFFE ID; no SAN at all; garbage.
    let (extra, _) = csr(&[REVIEWS], &["evil.example.com"]);
    let e = sign(&b, "c1", &t, &extra).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("exactly one URI SAN"),
        "{}",
        e.message()
    );
    let (none, _) = csr(&[], &[]);
    assert_eq!(
        sign(&b, "c1", &t, &none).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let e = sign(
        &b,
        "c1",
        &t,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("csr_pem:"), "{}", e.message());
    // Another cluster, an unknown token.
    let e = sign(&b, "c2", &t, &good).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("is for cluster c1, not c2"),
        "{}",
        e.message()
    );
    let e = sign(&b, "c1", "fmjt_nope", &good).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Single use: the second use is refused.
    let once = token(&b, "c1", "reviews", 600, true).await;
    sign(&b, "c1", &once, &good).await.unwrap();
    let e = sign(&b, "c1", &once, &good).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("unknown, expired or already used"));
    // A bad CSR does not use up a single-use token.
    let once = token(&b, "c1", "reviews", 600, true).await;
    sign(&b, "c1", &once, &other).await.unwrap_err();
    sign(&b, "c1", &once, &good).await.unwrap();

    // Expired.
    let short = token(&b, "c1", "reviews", 1, false).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sign(&b, "c1", &short, &good).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let refusals = audit(&b)
        .await
        .into_iter()
        .filter(|e| e.action == "refuse")
        .count();
    assert_eq!(refusals, 9, "every refusal is audited");
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

fn key_file(dir: &tempfile::TempDir, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.path().join(format!("ca-key-{byte}"));
    std::fs::write(&p, federation::ca::hex_encode(&[byte; 32])).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[tokio::test]
async fn the_root_is_sealed_in_etcd_and_shared_by_replicas() {
    let fx = EtcdFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ca = ca_cfg();
    ca.key_file = Some(key_file(&dir, 7));
    let store = || async {
        Arc::new(EtcdStore::connect(&[fx.endpoint()]).await.unwrap()) as Arc<dyn Store>
    };
    let a = start(&config(ca.clone()), store().await).await;
    let b = start(&config(ca.clone()), store().await).await;
    let ta = token(&a, "c1", "reviews", 600, false).await;
    let (pem, _) = csr(&[REVIEWS], &[]);
    let ra = sign(&a, "c1", &ta, &pem).await.unwrap();
    let rb = sign(&b, "c1", &ta, &pem).await.unwrap();
    assert_eq!(
        ra.trust_bundle_pem, rb.trust_bundle_pem,
        "one root for every replica"
    );
    verify(&rb).unwrap();

    // At rest: no private key in the clear under /fedmesh/v1/ca/.
    let kvs = store().await.range("/fedmesh/v1/ca/").await.unwrap().kvs;
    assert!(kvs.len() >= 2, "root and the c1 intermediate");
    for kv in &kvs {
        let v = String::from_utf8_lossy(&kv.value);
        assert!(!v.contains("PRIVATE KEY"), "{} holds a clear key", kv.key);
    }
    // A restart keeps the root; a wrong key cannot open it.
    a.shutdown(Duration::from_secs(1)).await.unwrap();
    let a2 = start(&config(ca.clone()), store().await).await;
    let t2 = token(&a2, "c1", "reviews", 600, false).await;
    assert_eq!(
        sign(&a2, "c1", &t2, &pem).await.unwrap().trust_bundle_pem,
        ra.trust_bundle_pem
    );
    // A key file others may read is refused, naming the mode.
    let mut open = ca.clone();
    let readable = key_file(&dir, 8);
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    open.key_file = Some(readable);
    let err = app::serve(&config(open), store().await)
        .await
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("mode 0644 lets other users read or write it"),
        "{err:#}"
    );
    let mut wrong = ca.clone();
    wrong.key_file = Some(key_file(&dir, 9));
    let err = app::serve(&config(wrong), store().await)
        .await
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("cannot unseal the CA key"),
        "{err:#}"
    );
    a2.shutdown(Duration::from_secs(1)).await.unwrap();
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// A sealed CA key opens only on the record it was sealed for: one
/// cluster's intermediate copied onto another cluster's key (by someone with
/// write access to the registry, not the seal key) is refused, not used to
/// sign that cluster's workloads.
#[tokio::test]
async fn a_sealed_key_copied_onto_another_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = ca_cfg();
    ca.key_file = Some(key_file(&dir, 7));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = start(&config(ca.clone()), store.clone()).await;
    let t1 = token(&a, "c1", "reviews", 600, false).await;
    let (pem, _) = csr(&[REVIEWS], &[]);
    sign(&a, "c1", &t1, &pem).await.unwrap();
    let t2 = token(&a, "c2", "reviews", 600, false).await;
    a.shutdown(Duration::from_secs(1)).await.unwrap();

    let prefix = federation::ca::INTERMEDIATE_PREFIX;
    let kvs = store.range(prefix).await.unwrap().kvs;
    let c1 = kvs.iter().find(|kv| kv.key.ends_with("/c1")).unwrap();
    let c2_key = format!("{}c2", c1.key.trim_end_matches("c1"));
    store.put(&c2_key, c1.value.clone(), None).await.unwrap();

    // A fresh replica (nothing cached) meets the copied record.
    let b = start(&config(ca.clone()), store.clone()).await;
    let err = sign(&b, "c2", &t2, &pem).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("sealed for another record"),
        "{}",
        err.message()
    );
    // c1's own record still opens where it belongs.
    let t1b = token(&b, "c1", "reviews", 600, false).await;
    sign(&b, "c1", &t1b, &pem).await.unwrap();
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn a_plug_in_root_signs_the_intermediates() {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "corp root");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let root = p.self_signed(&root_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("root.pem"), dir.path().join("root.key"));
    std::fs::write(&cert, root.pem()).unwrap();
    std::fs::write(&key, root_key.serialize_pem()).unwrap();
    let mut ca = ca_cfg();
    ca.plug_in = Some((cert, key));
    let b = start(&config(ca), Arc::new(MemoryStore::new())).await;
    let t = token(&b, "c1", "reviews", 600, false).await;
    let (pem, _) = csr(&[REVIEWS], &[]);
    let r = sign(&b, "c1", &t, &pem).await.unwrap();
    assert_eq!(r.trust_bundle_pem, root.pem());
    verify(&r).unwrap();
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// A renewal request: a fresh key's CSR, signed by the key in use.
fn renewal(
    chain_pem: &str,
    old_key: &rcgen::KeyPair,
) -> (api::SignCertificateRequest, rcgen::KeyPair) {
    use rcgen::SigningKey as _;
    let (csr_pem, key) = csr(&[REVIEWS], &[]);
    let signature = old_key.sign(csr_pem.as_bytes()).unwrap();
    (
        api::SignCertificateRequest {
            csr_pem,
            cluster: "c1".into(),
            credential: Some(api::sign_certificate_request::Credential::Renewal(
                api::Renewal {
                    chain_pem: chain_pem.into(),
                    signature,
                },
            )),
            ttl_seconds: 0,
        },
        key,
    )
}

#[tokio::test]
async fn a_certificate_in_use_renews_itself_and_nothing_else_does() {
    let b = start(&config(ca_cfg()), Arc::new(MemoryStore::new())).await;
    let t = token(&b, "c1", "reviews", 600, true).await;
    let (pem, key) = csr(&[REVIEWS], &[]);
    let first = sign(&b, "c1", &t, &pem).await.unwrap();
    let mut c = IdentityClient::new(common::anonymous(&b).await);

    // The single-use token is gone, but the certificate renews itself,
    // and the renewed one renews in turn.
    let (req, key2) = renewal(&first.certificate_chain_pem, &key);
    let second = c.sign_certificate(req).await.unwrap().into_inner();
    assert_eq!(second.identity, REVIEWS);
    verify(&second).unwrap();
    assert_ne!(second.certificate_chain_pem, first.certificate_chain_pem);
    let (req, _) = renewal(&second.certificate_chain_pem, &key2);
    c.sign_certificate(req).await.unwrap();

    // Refused: a proof signed by another key; a chain for another cluster;
    // a CSR asking for another identity than the chain carries.
    let stranger = rcgen::KeyPair::generate().unwrap();
    let (req, _) = renewal(&first.certificate_chain_pem, &stranger);
    let e = c.sign_certificate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("not the certificate key's"),
        "{}",
        e.message()
    );
    let (mut req, _) = renewal(&first.certificate_chain_pem, &key);
    req.cluster = "c2".into();
    let e = c.sign_certificate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("not issued for cluster c2"),
        "{}",
        e.message()
    );
    {
        use rcgen::SigningKey as _;
        let (csr_pem, _) = csr(&["spiffe://cluster.local/ns/default/sa/admin"], &[]);
        let signature = key.sign(csr_pem.as_bytes()).unwrap();
        let e = c
            .sign_certificate(api::SignCertificateRequest {
                csr_pem,
                cluster: "c1".into(),
                credential: Some(api::sign_certificate_request::Credential::Renewal(
                    api::Renewal {
                        chain_pem: first.certificate_chain_pem.clone(),
                        signature,
                    },
                )),
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let issued = audit(&b)
        .await
        .iter()
        .filter(|e| e.action == "issue")
        .count();
    assert_eq!(issued, 3);
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

async fn rotate(
    b: &Bound,
    stage: api::RotationStage,
    force: bool,
) -> Result<api::TrustStatus, tonic::Status> {
    AdminClient::new(common::admin(b).await)
        .rotate_trust(api::RotateTrustRequest {
            stage: stage as i32,
            force,
            actor: "test".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn trust(b: &Bound) -> api::TrustStatus {
    AdminClient::new(common::admin(b).await)
        .get_trust(api::GetTrustRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Waits (up to 10 s) until replica `b` serves a bundle of `roots` roots.
async fn until_roots(b: &Bound, roots: usize, signing: &str) -> api::TrustStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = trust(b).await;
        if st.roots.len() == roots && (signing.is_empty() || st.signing_root_sha256 == signing) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica never saw {roots} roots: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_root_rotation_is_sealed_in_etcd_and_followed_by_every_replica() {
    let fx = EtcdFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ca = ca_cfg();
    ca.key_file = Some(key_file(&dir, 7));
    let store = || async {
        Arc::new(EtcdStore::connect(&[fx.endpoint()]).await.unwrap()) as Arc<dyn Store>
    };
    let a = start(&config(ca.clone()), store().await).await;
    let b = start(&config(ca.clone()), store().await).await;
    let t = token(&a, "c1", "reviews", 600, false).await;
    let (pem, key) = csr(&[REVIEWS], &[]);
    let before = sign(&b, "c1", &t, &pem).await.unwrap();
    let old_root = before.root_sha256.clone();
    assert_eq!(trust(&a).await.signing_root_sha256, old_root);

    // Add through replica a; replica b follows through the registry.
    let st = rotate(&a, api::RotationStage::Add, false).await.unwrap();
    assert_eq!(st.stage, "added");
    let new_root = st.roots.iter().find(|r| !r.signing).unwrap().sha256.clone();
    let st_b = until_roots(&b, 2, &old_root).await;
    assert_eq!(st_b.stage, "added");
    let mid = sign(&b, "c1", &t, &pem).await.unwrap();
    assert_eq!(mid.root_sha256, old_root, "the old root still signs");
    assert_eq!(
        CertificateDer::pem_slice_iter(mid.trust_bundle_pem.as_bytes()).count(),
        2,
        "both roots are in the bundle"
    );

    // Reissue: replica b signs under the new root, and a certificate
    // under the old root renews (into the new one).
    rotate(&a, api::RotationStage::Reissue, false)
        .await
        .unwrap();
    until_roots(&b, 2, &new_root).await;
    let (req, key2) = renewal(&before.certificate_chain_pem, &key);
    let renewed = IdentityClient::new(common::anonymous(&b).await)
        .sign_certificate(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.root_sha256, new_root);
    verify(&renewed).unwrap();

    // Remove: the old root is gone; its certificates no longer renew.
    let st = rotate(&a, api::RotationStage::Remove, false).await.unwrap();
    assert_eq!((st.stage.as_str(), st.roots.len()), ("steady", 1));
    until_roots(&b, 1, &new_root).await;
    let (req, _) = renewal(&before.certificate_chain_pem, &key);
    let e = IdentityClient::new(common::anonymous(&b).await)
        .sign_certificate(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let (req, _) = renewal(&renewed.certificate_chain_pem, &key2);
    IdentityClient::new(common::anonymous(&b).await)
        .sign_certificate(req)
        .await
        .unwrap();

    // At rest nothing is in the clear; a restart keeps the new root.
    for kv in store().await.range("/fedmesh/v1/ca/").await.unwrap().kvs {
        let v = String::from_utf8_lossy(&kv.value);
        assert!(!v.contains("PRIVATE KEY"), "{} holds a clear key", kv.key);
    }
    a.shutdown(Duration::from_secs(1)).await.unwrap();
    let a2 = start(&config(ca.clone()), store().await).await;
    assert_eq!(trust(&a2).await.signing_root_sha256, new_root);
    let t2 = token(&a2, "c1", "reviews", 600, false).await;
    assert_eq!(
        sign(&a2, "c1", &t2, &pem).await.unwrap().root_sha256,
        new_root
    );
    let rotations: Vec<_> = audit(&a2)
        .await
        .into_iter()
        .filter(|e| e.action == "rotate")
        .collect();
    assert_eq!(rotations.len(), 3, "{rotations:?}");
    a2.shutdown(Duration::from_secs(1)).await.unwrap();
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn rotation_stages_are_refused_out_of_order_or_while_a_workload_lags() {
    use futures::StreamExt as _;
    let b = start(&config(ca_cfg()), Arc::new(MemoryStore::new())).await;
    b.shared.wait_synced().await;
    // An agent that takes its snapshot, acknowledges it, then stalls.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: "agent~c1~stalled".into(),
            cluster: "c1".into(),
            kind: api::NodeKind::Agent as i32,
            namespace: "default".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream =
        api::discovery_client::DiscoveryClient::new(common::workload(&b, "c1", "stalled").await)
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
    let snap = stream.next().await.unwrap().unwrap();
    assert!(snap.trust.is_some(), "the snapshot carries the bundle");
    let old_root = snap.trust.unwrap().signing_root_sha256;
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Ack(api::Ack {
            version: snap.version,
            certificate_root_sha256: old_root.clone(),
        })),
    })
    .await
    .unwrap();

    let e = rotate(&b, api::RotationStage::Reissue, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("the rotation is at stage steady, and this step follows stage added"),
        "{}",
        e.message()
    );
    let e = rotate(&b, api::RotationStage::Unspecified, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    rotate(&b, api::RotationStage::Add, false).await.unwrap();
    // The stalled agent gets the new bundle but never acknowledges it.
    let delta = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        CertificateDer::pem_slice_iter(delta.trust.unwrap().roots_pem.as_bytes()).count(),
        2
    );
    let e = rotate(&b, api::RotationStage::Reissue, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("agent~c1~stalled has not acknowledged the bundle with the new root"),
        "{}",
        e.message()
    );
    assert_eq!(
        trust(&b).await.stage,
        "added",
        "a refused step changes nothing"
    );

    // --force goes past it, and says so in the audit log.
    let st = rotate(&b, api::RotationStage::Reissue, true).await.unwrap();
    assert_eq!(st.stage, "reissuing");
    // The agent still holds a certificate under the old root: no removal.
    let e = rotate(&b, api::RotationStage::Remove, false)
        .await
        .unwrap_err();
    assert!(
        e.message().contains(&format!(
            "agent~c1~stalled still holds a certificate under root {}",
            &old_root[..16]
        )),
        "{}",
        e.message()
    );
    let forced: Vec<_> = audit(&b)
        .await
        .into_iter()
        .filter(|e| e.action == "rotate" && e.detail.contains("forced past 1 workloads"))
        .collect();
    assert_eq!(forced.len(), 1);
    drop(tx);
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn a_plug_in_root_without_a_key_file_is_not_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&root_key).unwrap();
    let (c, k) = (dir.path().join("root.pem"), dir.path().join("root.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, root_key.serialize_pem()).unwrap();
    let mut ca = ca_cfg();
    ca.plug_in = Some((c, k));
    let b = start(&config(ca), Arc::new(MemoryStore::new())).await;
    b.shared.wait_synced().await;
    let e = rotate(&b, api::RotationStage::Add, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("--ca-key-file"), "{}", e.message());
    assert_eq!(trust(&b).await.origin, "plug-in");
    b.shutdown(Duration::from_secs(1)).await.unwrap();
}
