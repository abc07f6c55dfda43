//! Calling the federation: over TLS, checking its certificate against the
//! mesh's roots (a bundle file, or the bundle the CA returned at
//! enrollment) or, before a node has any, against the root whose SHA-256
//! its join token carries; presenting the node's or the operator's client
//! certificate when it has one. Used by agents, gateways and `meshctl`.
//!
//! `http://` URLs connect in plain text, for a federation run with
//! `--insecure-plaintext` on loopback.

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::transport::{Channel, Endpoint, Uri};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The certificates in a PEM bundle.
pub fn parse_certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("not a PEM certificate bundle")
}

/// How a client trusts the federation and who it is to it. Roots and the
/// client certificate are swapped in place (a renewal, a rotation): the
/// next connection uses them.
pub struct FedTls {
    roots: arc_swap::ArcSwapOption<RootCertStore>,
    /// SHA-256 (hex) of a root to trust while no roots are known.
    pin: Option<String>,
    client: arc_swap::ArcSwapOption<CertifiedKey>,
}

impl std::fmt::Debug for FedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedTls")
            .field("roots", &self.roots.load().as_ref().map(|r| r.len()))
            .field("pin", &self.pin)
            .field("client", &self.client.load().is_some())
            .finish()
    }
}

impl FedTls {
    /// Trusts the roots in `roots_pem` and, while there are none, the root
    /// `pin` (SHA-256 hex). At least one of the two.
    pub fn new(roots_pem: Option<&str>, pin: Option<&str>) -> anyhow::Result<Arc<Self>> {
        let roots = match roots_pem {
            Some(pem) => Some(Arc::new(roots_from(pem)?)),
            None => None,
        };
        let pin = pin.map(|p| p.trim_start_matches("sha256:").to_ascii_lowercase());
        if let Some(p) = &pin {
            if p.len() != 64 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!("a root hash is sha256: and 64 hexadecimal digits, got {p:?}");
            }
        }
        if roots.is_none() && pin.is_none() {
            anyhow::bail!(
                "nothing to check the federation's certificate with: give its CA bundle, or a join token that carries its root's hash"
            );
        }
        Ok(Arc::new(Self {
            roots: arc_swap::ArcSwapOption::new(roots),
            pin,
            client: arc_swap::ArcSwapOption::empty(),
        }))
    }

    /// Trusts these roots from now on (the bundle the CA or Discovery gave).
    pub fn set_roots(&self, roots_pem: &str) -> anyhow::Result<()> {
        self.roots.store(Some(Arc::new(roots_from(roots_pem)?)));
        Ok(())
    }

    /// Presents this chain and key from now on.
    pub fn set_client(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> anyhow::Result<()> {
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .context("the client key")?;
        self.client
            .store(Some(Arc::new(CertifiedKey::new(chain, signing))));
        Ok(())
    }

    /// [`FedTls::set_client`] from PEM.
    pub fn set_client_pem(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let chain = parse_certs(chain_pem).context("the client certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("the client key")?;
        self.set_client(chain, key)
    }

    /// Whether a client certificate is set.
    pub fn has_client(&self) -> bool {
        self.client.load().is_some()
    }

    fn config(self: &Arc<Self>) -> anyhow::Result<rustls::ClientConfig> {
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                tls: self.clone(),
                algs: provider().signature_verification_algorithms,
            }))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    }
}

fn roots_from(pem: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(pem)? {
        roots.add(c).context("a trust anchor")?;
    }
    if roots.is_empty() {
        anyhow::bail!("the CA bundle holds no certificate");
    }
    Ok(roots)
}

#[derive(Debug)]
struct Resolver(Arc<FedTls>);

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.client.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.client.load().is_some()
    }
}

/// Checks the federation's chain and name against the roots, or, with no
/// roots yet, against the pinned root the chain must carry.
#[derive(Debug)]
struct Verifier {
    tls: Arc<FedTls>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match (self.tls.roots.load_full(), &self.tls.pin) {
            (Some(r), _) => r,
            (None, Some(pin)) => {
                let Some(root) = intermediates
                    .iter()
                    .find(|c| sha256_hex(c.as_ref()) == *pin)
                else {
                    return Err(rustls::Error::General(format!(
                        "the federation's certificate does not chain to the root sha256:{pin} the token names"
                    )));
                };
                let mut r = RootCertStore::empty();
                r.add(root.clone().into_owned())
                    .map_err(|e| rustls::Error::General(format!("the pinned root: {e}")))?;
                Arc::new(r)
            }
            (None, None) => {
                return Err(rustls::Error::General(
                    "no root to check the federation with".into(),
                ))
            }
        };
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
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

/// Dials TCP, then TLS with the configuration of the moment.
#[derive(Clone)]
struct Connector {
    tls: Arc<FedTls>,
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<Uri> for Connector {
    type Response = Io;
    type Error = anyhow::Error;
    type Future = Pin<Box<dyn Future<Output = anyhow::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<anyhow::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .context("the federation URL has no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .with_context(|| format!("connect to {host}:{port}"))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(host.clone())
                .with_context(|| format!("{host:?} is not a server name"))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(tls.config()?))
                .connect(name, tcp)
                .await
                .context("TLS handshake with the federation")?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// The endpoint for `url`. tonic, built without its own TLS, refuses an
/// `https` URI even with a connector that does TLS: it is given the same
/// authority as `http`, and [`Connector`] makes the connection TLS.
fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let plain = match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_string(),
    };
    Endpoint::from_shared(plain).with_context(|| format!("invalid federation URL {url:?}"))
}

/// A channel to the federation at `url`: TLS for `https://` (with `tls`),
/// plain text for `http://`. `tune` sets timeouts and keep-alives.
pub async fn channel(
    url: &str,
    tls: Option<&Arc<FedTls>>,
    tune: impl FnOnce(Endpoint) -> Endpoint,
) -> anyhow::Result<Channel> {
    let ep = tune(endpoint(url)?);
    if url.starts_with("https://") {
        let tls = tls.context(
            "an https:// federation needs its CA bundle or a token carrying its root's hash",
        )?;
        Ok(ep
            .connect_with_connector(Connector { tls: tls.clone() })
            .await?)
    } else if url.starts_with("http://") {
        Ok(ep.connect().await?)
    } else {
        anyhow::bail!("invalid federation URL {url:?}: expected https://HOST:PORT")
    }
}

/// [`channel`] that connects on first use.
pub fn channel_lazy(
    url: &str,
    tls: Option<&Arc<FedTls>>,
    tune: impl FnOnce(Endpoint) -> Endpoint,
) -> anyhow::Result<Channel> {
    let ep = tune(endpoint(url)?);
    if url.starts_with("https://") {
        let tls = tls.context(
            "an https:// federation needs its CA bundle or a token carrying its root's hash",
        )?;
        Ok(ep.connect_with_connector_lazy(Connector { tls: tls.clone() }))
    } else if url.starts_with("http://") {
        Ok(ep.connect_lazy())
    } else {
        anyhow::bail!("invalid federation URL {url:?}: expected https://HOST:PORT")
    }
}

/// Where the federation is and how to reach it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `https://host:port` (or `http://` on loopback with `--insecure-plaintext`).
    pub url: String,
    /// For `https://`.
    pub tls: Option<Arc<FedTls>>,
}

impl Target {
    /// The federation and credential a `meshctl` context names.
    pub fn from_context(ctx: &mesh_core::client_config::Context) -> anyhow::Result<Self> {
        let tls = if ctx.certificate_authority_data.is_empty() {
            None
        } else {
            let t = FedTls::new(Some(&ctx.certificate_authority_data), None)?;
            if !ctx.client_certificate_data.is_empty() {
                t.set_client_pem(&ctx.client_certificate_data, &ctx.client_key_data)?;
            }
            Some(t)
        };
        Ok(Self {
            url: ctx.server.clone(),
            tls,
        })
    }

    /// A channel with a connect timeout of 2 s and a request timeout of 5 s.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        channel(&self.url, self.tls.as_ref(), |e| {
            e.connect_timeout(std::time::Duration::from_secs(2))
                .timeout(std::time::Duration::from_secs(5))
        })
        .await
    }
}

/// Keeps `cluster` live in the federation for as long as this runs: a
/// heartbeat every third of the TTL the federation answers (a node speaks
/// for its own cluster; an east-west gateway does this for its cluster).
pub async fn heartbeat(target: Target, cluster: String) {
    use mesh_api::v1 as api;
    let mut client: Option<api::registration_client::RegistrationClient<Channel>> = None;
    loop {
        if client.is_none() {
            client = target
                .channel()
                .await
                .ok()
                .map(api::registration_client::RegistrationClient::new);
        }
        let mut wait = std::time::Duration::from_secs(2);
        if let Some(c) = client.as_mut() {
            match c
                .heartbeat(api::HeartbeatRequest {
                    cluster: cluster.clone(),
                })
                .await
            {
                Ok(r) => {
                    wait = std::time::Duration::from_secs(u64::from(
                        (r.into_inner().heartbeat_ttl_seconds / 3).max(1),
                    ));
                }
                Err(s) => {
                    tracing::debug!(code = ?s.code(), %cluster, "heartbeat not taken: {}", s.message());
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unauthenticated
                    ) {
                        client = None;
                    }
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}
