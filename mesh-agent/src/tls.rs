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
use mesh_core::name::TrustDomain;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
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
        trust_domain: &TrustDomain,
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
        Self::new(chain, key, roots, expect, trust_domain)
    }

    /// Builds the configurations from parsed material. Peers must chain to
    /// `roots` and carry a SPIFFE ID of `trust_domain`.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
        expect: Option<ExpectedIdentities>,
        trust_domain: &TrustDomain,
    ) -> anyhow::Result<Self> {
        let roots = Arc::new(roots);
        let client_verifier = Arc::new(MeshClientVerifier {
            inner: rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider(),
            )
            .build()
            .context("client certificate verifier")?,
            trust_domain: trust_domain.clone(),
        });
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
            trust_domain: trust_domain.clone(),
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
    trust_domain: TrustDomain,
}

/// The SPIFFE ID of a verified peer certificate, refused unless it is of
/// the mesh's trust domain.
fn spiffe_of(
    cert: &CertificateDer<'_>,
    td: &TrustDomain,
    who: &str,
) -> Result<Identity, rustls::Error> {
    match peer_identity(cert) {
        Some(id) if id.trust_domain == *td => Ok(id),
        Some(id) => Err(rustls::Error::General(format!(
            "{who} identity {id} is not of trust domain {td}"
        ))),
        None => Err(rustls::Error::General(format!(
            "{who} certificate has no SPIFFE identity"
        ))),
    }
}

/// webpki's client verifier, then the SPIFFE ID and its trust domain.
struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl std::fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClientVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_of(end_entity, &self.trust_domain, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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
        let id = spiffe_of(end_entity, &self.trust_domain, "server")?;
        let (Some(expect), ServerName::DnsName(name)) = (&self.expect, server_name) else {
            return Ok(ServerCertVerified::assertion());
        };
        match expect(name.as_ref()) {
            Some(allowed) if !allowed.contains(&id) => Err(rustls::Error::General(format!(
                "server identity {id} is not one the federation lists for {}",
                name.as_ref()
            ))),
            _ => Ok(ServerCertVerified::assertion()),
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
    chain: Vec<CertificateDer<'static>>,
    /// The trust anchors the configurations use, PEM.
    roots_pem: String,
    /// The root the chain leads to (SHA-256 hex).
    root_sha256: String,
    issued: std::time::SystemTime,
    not_after: std::time::SystemTime,
}

impl Enrolled {
    /// The same certificate with other trust anchors.
    fn with_roots(
        &mut self,
        roots_pem: &str,
        cfg: &crate::config::Config,
        expect: Option<ExpectedIdentities>,
    ) -> anyhow::Result<()> {
        let der = PrivateKeyDer::Pkcs8(self.key.serialize_der().into());
        self.tls = MeshTls::new(
            self.chain.clone(),
            der,
            parse_roots(roots_pem)?,
            expect,
            &cfg.identity.trust_domain,
        )?;
        roots_pem.clone_into(&mut self.roots_pem);
        Ok(())
    }
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
/// The trust anchors are the response's bundle, or `roots_pem` (the bundle
/// Discovery brought last, which may be newer).
async fn request(
    cfg: &crate::config::Config,
    key: rcgen::KeyPair,
    csr_pem: String,
    credential: mesh_api::v1::sign_certificate_request::Credential,
    patience: std::time::Duration,
    expect: Option<ExpectedIdentities>,
    roots_pem: Option<&str>,
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
            let ch = mesh_node::fed::channel(&cfg.federation, cfg.federation_tls.as_ref(), |e| {
                e.connect_timeout(std::time::Duration::from_secs(2))
                    .timeout(std::time::Duration::from_secs(10))
            })
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
            let mut c = api::identity_client::IdentityClient::new(ch);
            c.sign_certificate(req.clone()).await
        };
        match attempt.await {
            Ok(r) => break r.into_inner(),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                ) && tokio::time::Instant::now() < deadline =>
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
    let roots_pem = roots_pem.unwrap_or(&resp.trust_bundle_pem).to_string();
    let roots = parse_roots(&roots_pem)?;
    let not_after = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(resp.not_after_unix_ms).unwrap_or(0));
    tracing::info!(identity = %resp.identity, not_after_unix_ms = resp.not_after_unix_ms, root = %resp.root_sha256, "certificate issued by the federation");
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    if let Some(fed) = &cfg.federation_tls {
        // From now on the federation is checked against the mesh's roots
        // and knows this agent by its certificate.
        fed.set_roots(&roots_pem)?;
        fed.set_client(chain.clone(), der.clone_key())?;
    }
    Ok(Enrolled {
        tls: MeshTls::new(
            chain.clone(),
            der,
            roots,
            expect,
            &cfg.identity.trust_domain,
        )?,
        key,
        chain_pem: resp.certificate_chain_pem,
        chain,
        roots_pem,
        root_sha256: resp.root_sha256,
        issued: std::time::SystemTime::now(),
        not_after,
    })
}

/// Gets a certificate from the federation's CA with a join token or a
/// Kubernetes ServiceAccount token: the key is made here and never leaves;
/// the CA signs a CSR naming this workload's SPIFFE ID. Retries while the
/// federation is unreachable; a refusal (bad token, wrong identity) fails at
/// once with the CA's reason.
pub async fn enroll(
    cfg: &crate::config::Config,
    credential: mesh_api::v1::sign_certificate_request::Credential,
    expect: Option<ExpectedIdentities>,
) -> anyhow::Result<Enrolled> {
    let key = rcgen::KeyPair::generate().context("generate a key pair")?;
    let csr = csr_for(cfg, &key)?;
    request(cfg, key, csr, credential, ENROLL_PATIENCE, expect, None).await
}

/// The credential an agent enrolls with, read now (a projected Kubernetes
/// token is rotated by the kubelet: read it each time).
pub fn credential(
    tls: &crate::config::Tls,
) -> anyhow::Result<Option<mesh_api::v1::sign_certificate_request::Credential>> {
    use mesh_api::v1::sign_certificate_request::Credential;
    Ok(match tls {
        crate::config::Tls::JoinToken(t) => Some(Credential::JoinToken(t.clone())),
        crate::config::Tls::KubernetesToken(f) => Some(Credential::KubernetesToken(
            std::fs::read_to_string(f)
                .with_context(|| format!("read the Kubernetes token {}", f.display()))?
                .trim()
                .to_string(),
        )),
        crate::config::Tls::Files { .. } | crate::config::Tls::Plaintext => None,
    })
}

/// When to renew: at half the certificate's life, +-10% drawn uniformly,
/// so that a fleet started together does not renew together.
fn renewal_time(e: &Enrolled) -> std::time::SystemTime {
    let half = e.not_after.duration_since(e.issued).unwrap_or_default() / 2;
    let j = fastrand::f64() * 0.2 - 0.1;
    let offset = half.mul_f64(j.abs());
    if j >= 0.0 {
        e.issued + half + offset
    } else {
        e.issued + (half - offset)
    }
}

/// One renewal: a new key, proven with the certificate in use.
async fn renew_once(
    cfg: &crate::config::Config,
    current: &Enrolled,
    expect: Option<ExpectedIdentities>,
    roots_pem: Option<&str>,
) -> anyhow::Result<Enrolled> {
    use rcgen::SigningKey as _;
    let key = rcgen::KeyPair::generate().context("generate a key pair")?;
    let csr = csr_for(cfg, &key)?;
    let signature = current
        .key
        .sign(csr.as_bytes())
        .context("sign the renewal proof")?;
    let cred = mesh_api::v1::sign_certificate_request::Credential::Renewal(mesh_api::v1::Renewal {
        chain_pem: current.chain_pem.clone(),
        signature,
    });
    request(
        cfg,
        key,
        csr,
        cred,
        std::time::Duration::ZERO,
        expect,
        roots_pem,
    )
    .await
}

/// Looks after a certificate from the federation's CA for the agent's life.
///
/// * It renews at half life, proving the identity with the certificate in
///   use.
/// * A trust bundle from Discovery replaces the trust anchors (the
///   certificate stays): during a root rotation both roots are trusted.
/// * When the bundle names another signing root than the one the
///   certificate chains to, it renews at once (the reissue stage).
///
/// New configurations are swapped in whole: connections open keep their
/// session, new connections and handshakes use the new material. The link
/// reports the certificate's root for the federation's rotation checks.
pub async fn manage(
    cfg: crate::config::Config,
    mut current: Enrolled,
    shared: SharedTls,
    expect: Option<ExpectedIdentities>,
    metrics: Arc<crate::metrics::Metrics>,
    link: TrustLink,
    mut bundles: tokio::sync::watch::Receiver<Option<mesh_api::v1::TrustBundle>>,
) {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    };
    metrics.certificate_not_after.set(unix(current.not_after));
    link.set_certificate_root(&current.root_sha256);
    let mut bundle: Option<mesh_api::v1::TrustBundle> = None;
    let mut due = renewal_time(&current);
    let mut listening = true;
    loop {
        let wait = due
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {
                let roots = bundle.as_ref().map(|b| b.roots_pem.as_str());
                match renew_once(&cfg, &current, expect.clone(), roots).await {
                    Ok(next) => {
                        shared.store(Arc::new(next.tls.clone()));
                        metrics.certificate_not_after.set(unix(next.not_after));
                        metrics.certificate_renewals.inc();
                        link.set_certificate_root(&next.root_sha256);
                        tracing::info!(identity = %cfg.identity, root = %next.root_sha256, "certificate renewed");
                        current = next;
                        due = renewal_time(&current);
                        if bundle.as_ref().is_some_and(|b| needs_reissue(b, &current)) {
                            // The replica that signed has not seen the new
                            // signing root yet: ask again shortly.
                            due = std::time::SystemTime::now() + RENEW_RETRY;
                        }
                    }
                    Err(e) if current.not_after <= std::time::SystemTime::now() => {
                        // Too late to prove anything with it: enroll anew,
                        // if the credential can be used again.
                        tracing::warn!("certificate expired before it could be renewed ({e:#}); enrolling anew");
                        let again = match credential(&cfg.tls) {
                            Ok(Some(c @ mesh_api::v1::sign_certificate_request::Credential::KubernetesToken(_))) => {
                                let key = rcgen::KeyPair::generate().context("generate a key pair");
                                match key.and_then(|k| Ok((csr_for(&cfg, &k)?, k))) {
                                    Ok((csr, key)) => request(&cfg, key, csr, c, std::time::Duration::ZERO, expect.clone(), bundle.as_ref().map(|b| b.roots_pem.as_str())).await,
                                    Err(e) => Err(e),
                                }
                            }
                            Ok(_) => Err(anyhow::anyhow!("a join token is single-use or short-lived; give the agent a new one")),
                            Err(e) => Err(e),
                        };
                        match again {
                            Ok(next) => {
                                shared.store(Arc::new(next.tls.clone()));
                                metrics.certificate_not_after.set(unix(next.not_after));
                                link.set_certificate_root(&next.root_sha256);
                                tracing::info!(identity = %cfg.identity, "enrolled anew");
                                current = next;
                                due = renewal_time(&current);
                            }
                            Err(e) => {
                                tracing::warn!("enrolling anew failed, retrying: {e:#}");
                                due = std::time::SystemTime::now() + RENEW_RETRY;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!("certificate renewal failed, retrying: {e:#}");
                        due = std::time::SystemTime::now() + RENEW_RETRY;
                    }
                }
            }
            changed = bundles.changed(), if listening => {
                if changed.is_err() {
                    listening = false;
                    continue;
                }
                let Some(b) = bundles.borrow_and_update().clone() else { continue };
                if b.roots_pem != current.roots_pem {
                    if let Some(fed) = &cfg.federation_tls {
                        if let Err(e) = fed.set_roots(&b.roots_pem) {
                            tracing::warn!("trust bundle not applied to the federation link: {e:#}");
                        }
                    }
                    match current.with_roots(&b.roots_pem, &cfg, expect.clone()) {
                        Ok(()) => {
                            shared.store(Arc::new(current.tls.clone()));
                            tracing::info!(roots = parse_roots(&b.roots_pem).map_or(0, |r| r.len()), signing = %b.signing_root_sha256, "trust bundle updated");
                        }
                        Err(e) => tracing::warn!("trust bundle from the federation not applied: {e:#}"),
                    }
                }
                if needs_reissue(&b, &current) {
                    // A moment's jitter keeps a fleet from renewing in one burst.
                    let soon = std::time::SystemTime::now()
                        + std::time::Duration::from_millis(fastrand::u64(0..500));
                    due = due.min(soon);
                    tracing::info!(signing = %b.signing_root_sha256, "the CA signs under a new root; renewing now");
                }
                bundle = Some(b);
            }
        }
    }
}

/// The CA signs under another root than the certificate's.
fn needs_reissue(b: &mesh_api::v1::TrustBundle, e: &Enrolled) -> bool {
    !b.signing_root_sha256.is_empty()
        && !e.root_sha256.is_empty()
        && b.signing_root_sha256 != e.root_sha256
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
