#![allow(clippy::unwrap_used, clippy::expect_used)]
//! RequestAuthentication with `jwksUri: https://...`: a real HTTPS JWKS
//! server on loopback (certificate from a test CA the agent trusts through
//! `--jwks-ca`), real agents, real tokens. The keys are fetched when the
//! config is applied, cached, refetched for an unknown `kid`, kept when the
//! server goes away; a TLS failure or an error status refuses the tokens,
//! naming why.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use mesh_agent::app::Bound;
use mesh_test::http::Backend;
use mesh_test::tls::TestCa;
use rustls::pki_types::PrivateKeyDer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{get, stop, wait_endpoints, wait_version, Mesh, Reply};
use tokio::net::TcpListener;

const ISSUER: &str = "https://issuer.example";

/// An ES256 signer and its public JWK.
fn es256(kid: &str) -> (jsonwebtoken::EncodingKey, serde_json::Value) {
    use base64::Engine as _;
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    });
    (
        jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        jwk,
    )
}

/// A token of [`ISSUER`] signed with `key` under `kid`, valid for 10 minutes.
fn token(kid: &str, key: &jsonwebtoken::EncodingKey) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(kid.into());
    let claims = serde_json::json!({"iss": ISSUER, "sub": "alice", "exp": now + 600});
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

/// What the JWKS server answers.
#[derive(Clone)]
struct Answer {
    status: u16,
    jwks: serde_json::Value,
    delay: Duration,
}

impl Answer {
    fn keys(keys: &[&serde_json::Value]) -> Self {
        Self {
            status: 200,
            jwks: serde_json::json!({ "keys": keys }),
            delay: Duration::ZERO,
        }
    }
}

/// An HTTPS JWKS server on loopback that counts the fetches it answers.
struct JwksServer {
    addr: SocketAddr,
    uri: String,
    fetches: Arc<AtomicUsize>,
    answer: Arc<Mutex<Answer>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// Serves `answer` with a certificate for 127.0.0.1 issued by `ca`.
    async fn start(ca: &TestCa, answer: Answer) -> Self {
        let leaf = ca.issue(&["127.0.0.1"], None);
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            leaf.chain.clone(),
            PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let fetches = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(Mutex::new(answer));
        let (f, a) = (fetches.clone(), answer.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (acceptor, f, a) = (acceptor.clone(), f.clone(), a.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends here.
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        let (f, a) = (f.clone(), a.clone());
                        async move {
                            let a = a.lock().unwrap().clone();
                            f.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(a.delay).await;
                            http::Response::builder()
                                .status(a.status)
                                .header("content-type", "application/json")
                                .header("cache-control", "public, max-age=3600")
                                .body(Full::new(Bytes::from(a.jwks.to_string())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            uri: format!("https://{addr}/jwks.json"),
            fetches,
            answer,
            task,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn set(&self, change: impl FnOnce(&mut Answer)) {
        change(&mut self.answer.lock().unwrap());
    }

    /// Stops listening: connections are refused from now on.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let addr = self.addr;
        mesh_test::assert_eventually!(!mesh_test::is_listening(addr), Duration::from_secs(5));
    }
}

/// A mesh where reviews (app=reviews, `--jwks-ca` = `jwks_ca`) accepts
/// tokens of [`ISSUER`] with keys from `uri`, and frontend calls it.
struct Setup {
    mesh: Mesh,
    reviews: Bound,
    frontend: Bound,
    backend: Backend,
    _app: Backend,
}

impl Setup {
    async fn start(uri: &str, jwks_ca: &TestCa) -> Self {
        let mesh = Mesh::one_cluster_on("127.0.0.1").await;
        let ca_file = mesh.dir.path().join("jwks-ca.pem");
        std::fs::write(&ca_file, &jwks_ca.pem).unwrap();
        let backend = Backend::start("reviews-1").await;
        let reviews = mesh
            .c1_agent(
                "reviews",
                backend.addr,
                9080,
                &[
                    "--label",
                    "app=reviews",
                    "--jwks-ca",
                    ca_file.to_str().unwrap(),
                ],
            )
            .await;
        let app = Backend::start("frontend").await;
        let frontend = mesh.c1_agent("frontend", app.addr, 8080, &[]).await;
        wait_endpoints(&frontend, "reviews", 1).await;
        // Only reviews checks tokens: the count of fetches is its own.
        let yaml = format!(
            r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  jwtRules:
  - issuer: {ISSUER}
    jwksUri: {uri}
"#
        );
        let ns = mesh_core::name::Namespace::new("default").unwrap();
        let parsed = mesh_core::policy::parse_yaml("jwt.yaml", &yaml, &ns).unwrap();
        assert!(
            parsed.warnings.is_empty(),
            "https is not warned: {:?}",
            parsed.warnings
        );
        let applied = mesh.apply(&yaml).await.unwrap();
        wait_version(&reviews, applied.revision).await;
        Self {
            mesh,
            reviews,
            frontend,
            backend,
            _app: app,
        }
    }

    /// frontend → reviews with `token` as a bearer token, within 15 s.
    async fn call(&self, token: &str) -> Reply {
        let auth = format!("Bearer {token}");
        tokio::time::timeout(
            Duration::from_secs(15),
            get(
                self.frontend.outbound,
                "reviews:9080",
                "/",
                &[("authorization", auth.as_str())],
            ),
        )
        .await
        .expect("an answer within 15 s")
    }

    /// Asserts `token` is refused with 401 and a reason containing each of
    /// `why`, without reaching the application.
    async fn refused(&self, token: &str, why: &[&str]) {
        let before = self.backend.requests();
        let r = self.call(token).await;
        assert_eq!(
            (r.status, r.header("x-fedmesh-reason")),
            (401, "jwt_invalid"),
            "{r:?}"
        );
        for w in why {
            assert!(r.body.contains(w), "{w:?} not in {:?}", r.body);
        }
        assert_eq!(self.backend.requests(), before, "reached the app: {r:?}");
    }

    async fn accepted(&self, token: &str) {
        let r = self.call(token).await;
        assert_eq!(
            (r.status, r.header("x-backend")),
            (200, "reviews-1"),
            "{r:?}"
        );
    }

    async fn stop(self) {
        let _mesh = self.mesh;
        stop(vec![self.reviews, self.frontend]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_jwks_is_fetched_on_apply_cached_and_rotated() {
    let ca = TestCa::new();
    let (k1, jwk1) = es256("k1");
    // The first answer is slow: the first token must wait for it.
    let mut first = Answer::keys(&[&jwk1]);
    first.delay = Duration::from_secs(2);
    let server = JwksServer::start(&ca, first).await;
    let s = Setup::start(&server.uri, &ca).await;

    // Fetching starts with the config, before any token comes.
    mesh_test::assert_eventually!(server.fetches() == 1, Duration::from_secs(10));
    server.set(|a| a.delay = Duration::ZERO);
    // The first token waits for the fetch under way rather than failing.
    s.accepted(&token("k1", &k1)).await;
    assert_eq!(
        server.fetches(),
        1,
        "the request waited for the fetch under way"
    );

    // Cached: every rule and request use the one fetch.
    for _ in 0..20 {
        s.accepted(&token("k1", &k1)).await;
    }
    assert_eq!(server.fetches(), 1, "the keys are cached");

    // Rotation: the server now publishes k2 only; a k2 token refetches.
    let (k2, jwk2) = es256("k2");
    server.set(|a| *a = Answer::keys(&[&jwk2]));
    s.accepted(&token("k2", &k2)).await;
    assert_eq!(server.fetches(), 2, "an unknown kid refetches");
    s.accepted(&token("k2", &k2)).await;

    // k1 left the refreshed set; unknown kids refetch at most once per 30 s.
    s.refused(&token("k1", &k1), &["no key with kid \"k1\""])
        .await;
    let (k3, _) = es256("k3");
    s.refused(&token("k3", &k3), &["no key with kid \"k3\""])
        .await;
    assert_eq!(server.fetches(), 2, "no refetch within 30 s of the last");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_jwks_server_gone_keeps_the_last_good_keys() {
    let ca = TestCa::new();
    let (k1, jwk1) = es256("k1");
    let server = JwksServer::start(&ca, Answer::keys(&[&jwk1])).await;
    let uri = server.uri.clone();
    let s = Setup::start(&uri, &ca).await;
    s.accepted(&token("k1", &k1)).await;
    assert_eq!(server.fetches(), 1);

    server.stop().await;
    // An unknown kid makes the agent refetch, which fails: the token is
    // refused, naming the failure...
    let (k9, _) = es256("k9");
    s.refused(
        &token("k9", &k9),
        &[
            "no key with kid \"k9\"",
            &format!("JWKS {uri}"),
            "connect to",
        ],
    )
    .await;
    // ... and the last good keys go on serving.
    for _ in 0..5 {
        s.accepted(&token("k1", &k1)).await;
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_jwks_from_an_untrusted_ca_refuses_tokens_naming_tls() {
    let trusted = TestCa::new();
    let other = TestCa::new();
    let (k1, jwk1) = es256("k1");
    let server = JwksServer::start(&other, Answer::keys(&[&jwk1])).await;
    let s = Setup::start(&server.uri, &trusted).await;
    s.refused(
        &token("k1", &k1),
        &[
            &format!("no keys for issuer {ISSUER}"),
            &format!("JWKS {}", server.uri),
            "TLS handshake",
            "invalid peer certificate",
        ],
    )
    .await;
    assert_eq!(
        server.fetches(),
        0,
        "no request crossed the failed handshake"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_jwks_error_status_refuses_tokens_naming_it() {
    let ca = TestCa::new();
    let (k1, jwk1) = es256("k1");
    let mut answer = Answer::keys(&[&jwk1]);
    answer.status = 500;
    let server = JwksServer::start(&ca, answer).await;
    let s = Setup::start(&server.uri, &ca).await;
    s.refused(
        &token("k1", &k1),
        &[&format!("JWKS {}", server.uri), "HTTP 500"],
    )
    .await;
    assert!(server.fetches() >= 1);
    s.stop().await;
}
