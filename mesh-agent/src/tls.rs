//! mTLS between agents, with rustls.
//!
//! The server side requires a client certificate from the mesh's trust
//! anchors and offers ALPN `h2` and `http/1.1`. The client side presents the
//! agent's certificate and verifies the peer's chain against the same
//! anchors. It does not compare the certificate with the SNI: the SNI is a
//! routing name (`outbound_.9080_._.reviews.default.svc.cluster.local`, as in
//! Istio), read by gateways on the way; who the peer is comes from the SPIFFE
//! URI in its certificate ([`peer_identity`]).

use anyhow::Context as _;
use mesh_core::identity::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// The identities a server may hold, by the server name (SNI) dialled:
/// `None` when the name is not a mesh service (any identity of the trust
/// anchors is accepted then).
pub type ExpectedIdentities = Arc<dyn Fn(&str) -> Option<Vec<Identity>> + Send + Sync>;

/// ALPN protocol ids.
pub const ALPN_H2: &[u8] = b"h2";
/// HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The agent's TLS configurations.
#[derive(Clone)]
pub struct MeshTls {
    /// Inbound listener.
    pub server: Arc<rustls::ServerConfig>,
    /// Outbound, offering only `h2`.
    pub client_h2: Arc<rustls::ClientConfig>,
    /// Outbound, offering only `http/1.1`.
    pub client_h1: Arc<rustls::ClientConfig>,
    /// Outbound opaque TCP: no ALPN, so the peer splices to its application.
    pub client_tcp: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl MeshTls {
    /// Loads PEM files: the certificate chain, its key and the trust anchors.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        ca: &Path,
        expect: Option<ExpectedIdentities>,
    ) -> anyhow::Result<Self> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("read certificates from {}", cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("parse certificates in {}", cert.display()))?;
        if chain.is_empty() {
            anyhow::bail!("{}: no certificate in the file", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("read the private key from {}", key.display()))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("read trust anchors from {}", ca.display()))?
        {
            let c = c.with_context(|| format!("parse trust anchors in {}", ca.display()))?;
            roots
                .add(c)
                .with_context(|| format!("add a trust anchor from {}", ca.display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!("{}: no trust anchor in the file", ca.display());
        }
        Self::new(chain, key, roots, expect)
    }

    /// Builds the configurations from parsed material.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
        expect: Option<ExpectedIdentities>,
    ) -> anyhow::Result<Self> {
        let roots = Arc::new(roots);
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .context("client certificate verifier")?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("the agent's certificate and key do not match")?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        let verifier = Arc::new(MeshVerifier {
            roots,
            algs: provider().signature_verification_algorithms,
            expect,
        });
        let client = |alpn: Option<&[u8]>| -> anyhow::Result<Arc<rustls::ClientConfig>> {
            let mut c = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .context("TLS versions")?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .context("client certificate")?;
            c.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
            Ok(Arc::new(c))
        };
        Ok(Self {
            server: Arc::new(server),
            client_h2: client(Some(ALPN_H2))?,
            client_h1: client(Some(ALPN_HTTP11))?,
            client_tcp: client(None)?,
        })
    }
}

/// Verifies a server's chain against the mesh's anchors, then that its
/// SPIFFE ID is one the federation lists for the service the SNI names (the
/// SNI itself is a routing name, never compared with the certificate).
struct MeshVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expect: Option<ExpectedIdentities>,
}

impl std::fmt::Debug for MeshVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshVerifier").finish_non_exhaustive()
    }
}

impl ServerCertVerifier for MeshVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let (Some(expect), ServerName::DnsName(name)) = (&self.expect, server_name) else {
            return Ok(ServerCertVerified::assertion());
        };
        let Some(allowed) = expect(name.as_ref()) else {
            return Ok(ServerCertVerified::assertion());
        };
        match peer_identity(end_entity) {
            Some(id) if allowed.contains(&id) => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "server identity {id} is not one the federation lists for {}",
                name.as_ref()
            ))),
            None => Err(rustls::Error::General(
                "server certificate has no SPIFFE identity".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The cluster of a peer whose certificate the mesh CA issued: the
/// per-cluster intermediate that signed it is named
/// `fedmesh intermediate CA (<cluster>)`. `None` for other issuers.
pub fn peer_cluster(chain: &[CertificateDer<'_>]) -> Option<String> {
    let (_, leaf) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let cn = leaf.issuer().iter_common_name().next()?.as_str().ok()?;
    let cluster = cn
        .strip_prefix("fedmesh intermediate CA (")?
        .strip_suffix(')')?;
    mesh_core::name::ClusterName::new(cluster)
        .ok()
        .map(|c| c.to_string())
}

/// The SPIFFE identity in a peer certificate's URI SANs, if it has one.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            u.parse::<Identity>().ok()
        }
        _ => None,
    })
}

/// The agent's TLS configurations, swapped whole when the certificate is renewed.
pub type SharedTls = Arc<arc_swap::ArcSwap<MeshTls>>;

/// How long the agent keeps asking an unreachable federation for its first
/// certificate before giving up.
const ENROLL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
/// Between failed renewal attempts.
const RENEW_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// A certificate from the federation's CA, with what renewing it needs.
pub struct Enrolled {
    /// The configurations built on it.
    pub tls: MeshTls,
    key: rcgen::KeyPair,
    chain_pem: String,
    issued: std::time::SystemTime,
    not_after: std::time::SystemTime,
}

fn csr_for(cfg: &crate::config::Config, key: &rcgen::KeyPair) -> anyhow::Result<String> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).context("CSR parameters")?;
    p.subject_alt_names = vec![rcgen::SanType::URI(
        cfg.identity
            .to_string()
            .try_into()
            .context("the SPIFFE ID as a URI")?,
    )];
    p.serialize_request(key)
        .context("make the CSR")?
        .pem()
        .context("CSR to PEM")
}

/// One signing request; retried while the federation is unreachable, up to `patience`.
async fn request(
    cfg: &crate::config::Config,
    key: rcgen::KeyPair,
    csr_pem: String,
    credential: mesh_api::v1::sign_certificate_request::Credential,
    patience: std::time::Duration,
    expect: Option<ExpectedIdentities>,
) -> anyhow::Result<Enrolled> {
    use mesh_api::v1 as api;
    let req = api::SignCertificateRequest {
        csr_pem,
        cluster: cfg.cluster.to_string(),
        credential: Some(credential),
        ttl_seconds: 0,
    };
    let deadline = tokio::time::Instant::now() + patience;
    let resp = loop {
        let attempt = async {
            let mut c = api::identity_client::IdentityClient::connect(cfg.federation.clone())
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            c.sign_certificate(req.clone()).await
        };
        match attempt.await {
            Ok(r) => break r.into_inner(),
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(federation = %cfg.federation, "waiting for the federation to sign a certificate: {}", s.message());
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(s) => anyhow::bail!(
                "the federation refused a certificate for {}: {}",
                cfg.identity,
                s.message()
            ),
        }
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(resp.certificate_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("the signed chain")?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(resp.trust_bundle_pem.as_bytes()) {
        roots
            .add(c.context("the trust bundle")?)
            .context("a trust anchor")?;
    }
    let not_after = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(resp.not_after_unix_ms).unwrap_or(0));
    tracing::info!(identity = %resp.identity, not_after_unix_ms = resp.not_after_unix_ms, "certificate issued by the federation");
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok(Enrolled {
        tls: MeshTls::new(chain, der, roots, expect)?,
        key,
        chain_pem: resp.certificate_chain_pem,
        issued: std::time::SystemTime::now(),
        not_after,
    })
}

/// Gets a certificate from the federation's CA with a join token: the key is
/// made here and never leaves; the CA signs a CSR naming this workload's
/// SPIFFE ID. Retries while the federation is unreachable; a refusal (bad
/// token, wrong identity) fails at once with the CA's reason.
pub async fn enroll(
    cfg: &crate::config::Config,
    token: &str,
    expect: Option<ExpectedIdentities>,
) -> anyhow::Result<Enrolled> {
    let key = rcgen::KeyPair::generate().context("generate a key pair")?;
    let csr = csr_for(cfg, &key)?;
    let cred = mesh_api::v1::sign_certificate_request::Credential::JoinToken(token.to_string());
    request(cfg, key, csr, cred, ENROLL_PATIENCE, expect).await
}

/// Renews the certificate at half its life (+-10%, so a fleet started
/// together does not renew together), proving the identity with the
/// certificate in use, and swaps the new configurations in: connections
/// open keep their session, new ones use the new certificate.
pub async fn renew_forever(
    cfg: crate::config::Config,
    mut current: Enrolled,
    shared: SharedTls,
    expect: Option<ExpectedIdentities>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    use rcgen::SigningKey as _;
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    };
    metrics.certificate_not_after.set(unix(current.not_after));
    loop {
        let life = current
            .not_after
            .duration_since(current.issued)
            .unwrap_or_default();
        let half = life / 2;
        // +-10% of the half life, drawn uniformly.
        let j = fastrand::f64() * 0.2 - 0.1;
        let offset = half.mul_f64(j.abs());
        let at = if j >= 0.0 {
            current.issued + half + offset
        } else {
            current.issued + (half - offset)
        };
        let wait = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        loop {
            let attempt = async {
                let key = rcgen::KeyPair::generate().context("generate a key pair")?;
                let csr = csr_for(&cfg, &key)?;
                let signature = current
                    .key
                    .sign(csr.as_bytes())
                    .context("sign the renewal proof")?;
                let cred = mesh_api::v1::sign_certificate_request::Credential::Renewal(
                    mesh_api::v1::Renewal {
                        chain_pem: current.chain_pem.clone(),
                        signature,
                    },
                );
                request(
                    &cfg,
                    key,
                    csr,
                    cred,
                    std::time::Duration::ZERO,
                    expect.clone(),
                )
                .await
            };
            match attempt.await {
                Ok(next) => {
                    shared.store(Arc::new(next.tls.clone()));
                    metrics.certificate_not_after.set(unix(next.not_after));
                    metrics.certificate_renewals.inc();
                    tracing::info!(identity = %cfg.identity, "certificate renewed");
                    current = next;
                    break;
                }
                Err(e) => {
                    tracing::warn!("certificate renewal failed, retrying: {e:#}");
                    tokio::time::sleep(RENEW_RETRY).await;
                }
            }
        }
    }
}

/// Between the Discovery sink and the certificate manager: trust bundles go
/// one way, the root of the certificate in use comes back for ACKs. The
/// default link goes nowhere (an agent with certificates from files).
#[derive(Clone, Default)]
pub struct TrustLink {
    bundles: Option<tokio::sync::watch::Sender<Option<mesh_api::v1::TrustBundle>>>,
    root: Arc<arc_swap::ArcSwap<String>>,
}

impl TrustLink {
    /// A link whose bundles the manager reads from the returned receiver.
    pub fn new() -> (
        Self,
        tokio::sync::watch::Receiver<Option<mesh_api::v1::TrustBundle>>,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (
            Self {
                bundles: Some(tx),
                root: Arc::default(),
            },
            rx,
        )
    }

    /// A bundle from the federation: checked here (it must hold at least one
    /// root, each a certificate), applied by the manager.
    pub fn offer(&self, bundle: mesh_api::v1::TrustBundle) -> anyhow::Result<()> {
        let Some(tx) = &self.bundles else {
            return Ok(());
        };
        let roots = parse_roots(&bundle.roots_pem)?;
        if roots.is_empty() {
            anyhow::bail!("the bundle holds no root");
        }
        tx.send_replace(Some(bundle));
        Ok(())
    }

    /// The root the certificate in use chains to (SHA-256 hex), or empty.
    pub fn certificate_root(&self) -> String {
        self.root.load().as_ref().clone()
    }

    fn set_certificate_root(&self, sha256: &str) {
        self.root.store(Arc::new(sha256.to_string()));
    }
}

/// Every certificate in a PEM bundle, as trust anchors.
fn parse_roots(pem: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(c.context("the trust bundle")?)
            .context("a trust anchor")?;
    }
    Ok(roots)
}
