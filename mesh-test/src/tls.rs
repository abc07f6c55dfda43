//! Real TLS for tests: a CA issuing real certificates (rcgen, ECDSA P-256),
//! a TLS echo backend that requires a client certificate from that CA and
//! records who connected, and a client config presenting a certificate.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A test certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate.
    pub cert: CertificateDer<'static>,
    /// The CA certificate in PEM.
    pub pem: String,
    /// Its key in PEM (a federation under test takes the CA as its plug-in root).
    pub key_pem: String,
}

/// A leaf certificate with its key.
pub struct Leaf {
    /// Chain: the leaf only (the CA is the trust anchor).
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key (PKCS#8 DER).
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The certificate in PEM.
    pub cert_pem: String,
    /// The key in PEM.
    pub key_pem: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestCa {
    /// A fresh CA.
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "fedmesh test CA");
        let cert = p.self_signed(&key).expect("self-sign the CA");
        let pem = cert.pem();
        let der = cert.der().clone();
        let key_pem = key.serialize_pem();
        Self {
            issuer: Issuer::new(p, key),
            cert: der,
            pem,
            key_pem,
        }
    }

    /// Issues a leaf for DNS names and an optional SPIFFE URI, usable as
    /// server and client certificate.
    pub fn issue(&self, dns: &[&str], spiffe: Option<&str>) -> Leaf {
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(24 * 3600);
        self.issue_valid(dns, spiffe, now - day, now + 365 * day)
    }

    /// [`TestCa::issue`] valid from `not_before` to `not_after` (for expired
    /// and not-yet-valid certificates).
    pub fn issue_valid(
        &self,
        dns: &[&str],
        spiffe: Option<&str>,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(dns.iter().map(ToString::to_string).collect::<Vec<_>>())
            .expect("leaf params");
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        if let Some(u) = spiffe {
            p.subject_alt_names
                .push(SanType::URI(u.try_into().expect("SPIFFE URI")));
        }
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.distinguished_name.push(
            DnType::CommonName,
            dns.first().copied().unwrap_or("workload"),
        );
        let cert = p.signed_by(&key, &self.issuer).expect("sign the leaf");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut r = rustls::RootCertStore::empty();
        r.add(self.cert.clone()).expect("add the CA");
        r
    }

    /// A client config that presents `leaf` and verifies the server chain
    /// against this CA, checking the certificate's name against `verify_as`
    /// rather than the SNI (the SNI is a routing name, as in Istio); a
    /// `spiffe://` `verify_as` is the SPIFFE ID the server must hold.
    pub fn client_config(&self, leaf: &Leaf, verify_as: &str) -> Arc<rustls::ClientConfig> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.roots()),
            provider(),
        )
        .build()
        .expect("verifier");
        let (name, spiffe) = match verify_as.strip_prefix("spiffe://") {
            // Any name: the chain is checked, then the SPIFFE ID.
            Some(_) => ("spiffe.invalid".to_string(), Some(verify_as.to_string())),
            None => (verify_as.to_string(), None),
        };
        let verifier = Arc::new(NameOverride {
            inner,
            name: ServerName::try_from(name).expect("name"),
            spiffe,
        });
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(
                leaf.chain.clone(),
                PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
            )
            .expect("client cert");
        Arc::new(cfg)
    }

    /// A server config presenting `leaf` and requiring a client certificate from this CA.
    pub fn server_config(&self, leaf: &Leaf) -> Arc<rustls::ServerConfig> {
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()),
            provider(),
        )
        .build()
        .expect("client verifier");
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(
                leaf.chain.clone(),
                PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
            )
            .expect("server cert");
        Arc::new(cfg)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// Wraps webpki's verifier, checking the chain and the name `name`
/// whatever server name the connection was opened with.
#[derive(Debug)]
struct NameOverride {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
    /// The SPIFFE ID the server must hold (its certificate names no DNS name).
    spiffe: Option<String>,
}

impl rustls::client::danger::ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let checked =
            self.inner
                .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now);
        let Some(want) = &self.spiffe else {
            return checked;
        };
        match checked {
            // The chain verified; only the (unused) name did not match.
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let holds =
            cert.subject_alternative_name()
                .ok()
                .flatten()
                .is_some_and(|san| {
                    san.value.general_names.iter().any(
                        |n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if u == want),
                    )
                });
        if holds {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!("the server is not {want}")))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One handshake a [`TlsEcho`] completed: the SNI it was reached by and the
/// client certificate (DER) it verified.
pub type Handshake = (Option<String>, Vec<u8>);

/// A TLS echo server on loopback. Each connection must present a client
/// certificate; the server records the SNI it was reached by and the
/// client's certificate, then echoes until the client closes.
pub struct TlsEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    /// (SNI, client certificate DER) of every completed handshake.
    pub seen: Arc<Mutex<Vec<Handshake>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsEcho {
    /// Starts the server with `cfg`.
    pub async fn start(cfg: Arc<rustls::ServerConfig>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let (_, conn) = tls.get_ref();
                    let sni = conn.server_name().map(ToString::to_string);
                    let cert = conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec())
                        .unwrap_or_default();
                    seen.lock().expect("lock").push((sni, cert));
                    let mut buf = [0u8; 4096];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tls.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self { addr, seen, task }
    }
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The ClientHello today's rustls sends for `server_name` (TLS 1.2 and 1.3
/// offered), as bytes on the wire.
pub fn client_hello(server_name: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string()).expect("a DNS name");
    let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("write to a Vec");
    }
    out
}
