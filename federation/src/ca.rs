//! The mesh CA: one root, an intermediate per cluster, short-lived SPIFFE
//! leaf certificates signed from workloads' CSRs (their keys never leave
//! them).
//!
//! The root is generated on first start and kept in the registry, its key
//! sealed with AES-256-GCM under a key read from a file (`--ca-key-file`), so
//! every replica uses the same root and etcd never holds it in the clear; or
//! it is a plug-in root given as PEM files (`--ca-cert`/`--ca-key`). Without
//! either, the root lives in this process only and is gone at restart
//! (fine for the embedded registry, which is gone too).

use crate::store::{Expect, Store, TxnOutcome, TxnWrite};
use mesh_core::identity::Identity;
use mesh_core::name::{ClusterName, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ring::aead;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tracing::info;

/// Registry key of the root.
pub const ROOT_KEY: &str = "/fedmesh/v1/ca/root";
/// Registry prefix of the per-cluster intermediates.
pub const INTERMEDIATE_PREFIX: &str = "/fedmesh/v1/ca/intermediates/";

/// Root lifetime when generated here.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Intermediate lifetime.
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Shortest leaf lifetime a workload may ask for.
pub const MIN_LEAF_TTL: Duration = Duration::from_secs(60);
/// Certificates are valid from a little before they are signed, for clock skew.
const BACKDATE: Duration = Duration::from_secs(60);

/// How the CA gets its root.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CaConfig {
    /// The SPIFFE trust domain of every identity it signs.
    pub trust_domain: String,
    /// Key (32 bytes, raw or 64 hex characters) sealing CA keys in the registry.
    pub key_file: Option<PathBuf>,
    /// A plug-in root: certificate and key PEM files.
    pub plug_in: Option<(PathBuf, PathBuf)>,
    /// Default leaf lifetime.
    pub leaf_ttl: Duration,
}

/// Why the CA refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR cannot be used.
    #[error("csr_pem: {0}")]
    BadCsr(String),
    /// The CSR asks for an identity the credential does not grant.
    #[error("the CSR asks for {asked}, but the credential grants {granted}")]
    IdentityMismatch {
        /// What the CSR names.
        asked: String,
        /// What the credential allows.
        granted: String,
    },
    /// The CA cannot start or sign.
    #[error("CA: {0}")]
    Internal(String),
}

fn internal(e: impl std::fmt::Display) -> CaError {
    CaError::Internal(e.to_string())
}

/// A signed certificate for a workload.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf then intermediate, PEM.
    pub chain_pem: String,
    /// Roots to trust, PEM.
    pub bundle_pem: String,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 (hex) of the root the chain leads to.
    pub root_sha256: String,
}

/// A CA certificate with its key, as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredCa {
    cert_pem: String,
    /// The key's PEM, sealed (hex of nonce || ciphertext).
    key_sealed: String,
}

struct Signer {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// The mesh CA.
pub struct Ca {
    trust_domain: TrustDomain,
    root: Arc<Signer>,
    intermediates: Mutex<HashMap<ClusterName, Arc<Signer>>>,
    sealer: Option<Sealer>,
    store: Arc<dyn Store>,
    leaf_ttl: Duration,
    /// Where the root came from, for logs and status.
    pub origin: &'static str,
}

impl Ca {
    /// Loads the root from the registry (or the plug-in files), or makes one.
    pub async fn start(cfg: &CaConfig, store: Arc<dyn Store>) -> Result<Self, CaError> {
        let trust_domain = TrustDomain::new(&cfg.trust_domain).map_err(internal)?;
        let sealer = match &cfg.key_file {
            Some(p) => Some(Sealer::from_file(p)?),
            None => None,
        };
        let (root, origin) = match (&cfg.plug_in, &sealer) {
            (Some((cert, key)), _) => (plug_in(cert, key)?, "plug-in"),
            (None, Some(sealer)) => (
                load_or_create_root(&*store, sealer, &trust_domain).await?,
                "registry",
            ),
            (None, None) => (new_root(&trust_domain)?, "ephemeral"),
        };
        info!(origin, trust_domain = %trust_domain, "mesh CA ready");
        Ok(Self {
            trust_domain,
            root: Arc::new(root),
            intermediates: Mutex::new(HashMap::new()),
            sealer,
            store,
            leaf_ttl: if cfg.leaf_ttl.is_zero() {
                Duration::from_secs(24 * 3600)
            } else {
                cfg.leaf_ttl
            },
            origin,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots to trust, PEM.
    pub fn bundle_pem(&self) -> String {
        self.root.cert_pem.clone()
    }

    /// Signs `csr_pem` for `identity` (which the caller's credential
    /// grants), with the intermediate of `cluster`.
    pub async fn sign(
        &self,
        cluster: &ClusterName,
        csr_pem: &str,
        identity: &Identity,
        ttl: Option<Duration>,
    ) -> Result<Issued, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::IdentityMismatch {
                asked: identity.to_string(),
                granted: format!("identities of trust domain {}", self.trust_domain),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(format!("not a valid signed CSR: {e}")))?;
        let uris: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str().to_string()),
                _ => None,
            })
            .collect();
        if csr.params.subject_alt_names.len() != 1 || uris.len() != 1 {
            return Err(CaError::BadCsr(format!(
                "must name exactly one URI SAN (the SPIFFE ID) and nothing else; it names {} SANs",
                csr.params.subject_alt_names.len()
            )));
        }
        if uris[0] != identity.to_string() {
            return Err(CaError::IdentityMismatch {
                asked: uris[0].clone(),
                granted: identity.to_string(),
            });
        }
        let ttl = ttl
            .unwrap_or(self.leaf_ttl)
            .max(MIN_LEAF_TTL)
            .min(self.leaf_ttl.max(MIN_LEAF_TTL));
        let inter = self.intermediate(cluster).await?;
        let now = SystemTime::now();
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
        p.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(internal)?,
        )];
        p.distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.as_str());
        p.not_before = (now - BACKDATE).into();
        p.not_after = (now + ttl).into();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let leaf = CertificateSigningRequestParams {
            params: p,
            public_key: csr.public_key,
        }
        .signed_by(&inter.issuer)
        .map_err(internal)?;
        Ok(Issued {
            chain_pem: format!("{}{}", leaf.pem(), inter.cert_pem),
            bundle_pem: self.bundle_pem(),
            not_after: now + ttl,
            root_sha256: String::new(),
        })
    }

    /// Checks a renewal: `chain_pem` is a chain this CA issued under the
    /// intermediate of `cluster`, not expired, and `signature` is its leaf
    /// key's over `csr_pem`. Returns the identity the leaf carries.
    pub async fn verify_renewal(
        &self,
        cluster: &ClusterName,
        chain_pem: &str,
        csr_pem: &str,
        signature: &[u8],
    ) -> Result<Identity, CaError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, UnixTime};
        let refuse = |why: String| CaError::IdentityMismatch {
            asked: "renewal".into(),
            granted: why,
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| CaError::BadCsr(format!("renewal.chain_pem: {e}")))?;
        let [leaf, inter] = chain.as_slice() else {
            return Err(CaError::BadCsr(
                "renewal.chain_pem: expected the leaf and its intermediate".into(),
            ));
        };
        let ours = self.intermediate(cluster).await?;
        let ours_der =
            CertificateDer::from_pem_slice(ours.cert_pem.as_bytes()).map_err(internal)?;
        if inter.as_ref() != ours_der.as_ref() {
            return Err(refuse(format!(
                "no renewal: the chain was not issued for cluster {cluster}"
            )));
        }
        let mut roots = rustls::RootCertStore::empty();
        let root_der =
            CertificateDer::from_pem_slice(self.root.cert_pem.as_bytes()).map_err(internal)?;
        roots.add(root_der).map_err(internal)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(internal)?;
        verifier
            .verify_client_cert(leaf, std::slice::from_ref(inter), UnixTime::now())
            .map_err(|e| {
                refuse(format!(
                    "no renewal: the certificate in use does not verify: {e}"
                ))
            })?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| CaError::BadCsr(format!("renewal.chain_pem: {e}")))?;
        let spki = cert.public_key().subject_public_key.data.to_vec();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, spki)
            .verify(csr_pem.as_bytes(), signature)
            .map_err(|_| refuse("no renewal: the signature is not the certificate key's".into()))?;
        let san = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .ok_or_else(|| refuse("no renewal: the certificate names no identity".into()))?;
        san.value
            .general_names
            .iter()
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u.parse::<Identity>().ok(),
                _ => None,
            })
            .ok_or_else(|| refuse("no renewal: the certificate names no SPIFFE identity".into()))
    }

    /// The intermediate of `cluster`: cached, else from the registry, else made.
    async fn intermediate(&self, cluster: &ClusterName) -> Result<Arc<Signer>, CaError> {
        if let Some(s) = self.lock().get(cluster) {
            return Ok(s.clone());
        }
        let key = format!("{INTERMEDIATE_PREFIX}{cluster}");
        let signer = match &self.sealer {
            Some(sealer) => {
                let make = || new_intermediate(&self.root, &self.trust_domain, cluster);
                load_or_create(&*self.store, &key, sealer, make).await?
            }
            None => new_intermediate(&self.root, &self.trust_domain, cluster)?,
        };
        let signer = Arc::new(signer);
        Ok(self.lock().entry(cluster.clone()).or_insert(signer).clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClusterName, Arc<Signer>>> {
        self.intermediates.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ca_params(
    cn: &str,
    td: &TrustDomain,
    ttl: Duration,
    path_len: Option<u8>,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, td.as_str());
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + ttl).into();
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

fn new_root(td: &TrustDomain) -> Result<Signer, CaError> {
    let key = KeyPair::generate().map_err(internal)?;
    let p = ca_params(&format!("fedmesh root CA ({td})"), td, ROOT_TTL, Some(1))?;
    let cert = p.self_signed(&key).map_err(internal)?;
    Ok(Signer {
        cert_pem: cert.pem(),
        issuer: Issuer::new(p, key),
    })
}

fn new_intermediate(
    root: &Signer,
    td: &TrustDomain,
    cluster: &ClusterName,
) -> Result<Signer, CaError> {
    let key = KeyPair::generate().map_err(internal)?;
    let p = ca_params(
        &format!("fedmesh intermediate CA ({cluster})"),
        td,
        INTERMEDIATE_TTL,
        Some(0),
    )?;
    let cert = p.signed_by(&key, &root.issuer).map_err(internal)?;
    Ok(Signer {
        cert_pem: cert.pem(),
        issuer: Issuer::new(p, key),
    })
}

fn plug_in(cert: &PathBuf, key: &PathBuf) -> Result<Signer, CaError> {
    let cert_pem = std::fs::read_to_string(cert)
        .map_err(|e| internal(format!("--ca-cert {}: {e}", cert.display())))?;
    let key_pem = std::fs::read_to_string(key)
        .map_err(|e| internal(format!("--ca-key {}: {e}", key.display())))?;
    signer_from_pem(&cert_pem, &key_pem)
}

fn signer_from_pem(cert_pem: &str, key_pem: &str) -> Result<Signer, CaError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| internal(format!("CA key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
        .map_err(|e| internal(format!("CA certificate: {e}")))?;
    Ok(Signer {
        cert_pem: cert_pem.to_string(),
        issuer,
    })
}

async fn load_or_create_root(
    store: &dyn Store,
    sealer: &Sealer,
    td: &TrustDomain,
) -> Result<Signer, CaError> {
    load_or_create(store, ROOT_KEY, sealer, || new_root(td)).await
}

/// Reads a sealed CA from `key`, or makes one and stores it if the key is
/// still absent; when another replica stored one first, that one wins.
async fn load_or_create(
    store: &dyn Store,
    key: &str,
    sealer: &Sealer,
    make: impl FnOnce() -> Result<Signer, CaError>,
) -> Result<Signer, CaError> {
    if let Some(kv) = store.get(key).await.map_err(internal)? {
        return open_stored(&kv.value, sealer, key);
    }
    let made = make()?;
    let stored = StoredCa {
        cert_pem: made.cert_pem.clone(),
        key_sealed: sealer.seal(made.issuer.key().serialize_pem().as_bytes())?,
    };
    let value = serde_json::to_vec(&stored).map_err(internal)?;
    match store
        .transact(vec![TxnWrite {
            key: key.to_string(),
            expect: Some(Expect::Absent),
            value: Some(value),
        }])
        .await
        .map_err(internal)?
    {
        TxnOutcome::Committed(_) => {
            info!(%key, "created and stored a CA certificate");
            Ok(made)
        }
        TxnOutcome::Conflict {
            current: Some(kv), ..
        } => open_stored(&kv.value, sealer, key),
        TxnOutcome::Conflict { current: None, .. } => Err(internal(format!(
            "{key}: lost a creation race and found nothing"
        ))),
    }
}

fn open_stored(value: &[u8], sealer: &Sealer, key: &str) -> Result<Signer, CaError> {
    let s: StoredCa = serde_json::from_slice(value)
        .map_err(|e| internal(format!("{key}: not a stored CA: {e}")))?;
    let key_pem = sealer
        .open(&s.key_sealed)
        .map_err(|e| internal(format!("{key}: {e}")))?;
    let key_pem = String::from_utf8(key_pem).map_err(internal)?;
    signer_from_pem(&s.cert_pem, &key_pem)
}

/// AES-256-GCM sealing of CA keys at rest.
struct Sealer {
    key: aead::LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    fn from_file(p: &PathBuf) -> Result<Self, CaError> {
        let raw = std::fs::read(p)
            .map_err(|e| internal(format!("--ca-key-file {}: {e}", p.display())))?;
        let text = String::from_utf8_lossy(&raw);
        let bytes = match raw.len() {
            32 => raw.clone(),
            _ => hex_decode(text.trim())
                .filter(|b| b.len() == 32)
                .ok_or_else(|| {
                    internal(format!(
                        "--ca-key-file {}: expected 32 bytes, raw or as 64 hex characters",
                        p.display()
                    ))
                })?,
        };
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, &bytes).map_err(internal)?;
        Ok(Self {
            key: aead::LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        })
    }

    fn seal(&self, plain: &[u8]) -> Result<String, CaError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| internal("no randomness"))?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(b"fedmesh-ca"),
                &mut buf,
            )
            .map_err(|_| internal("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(hex_encode(&out))
    }

    fn open(&self, sealed: &str) -> Result<Vec<u8>, String> {
        let bytes = hex_decode(sealed).ok_or("the sealed key is not hex")?;
        if bytes.len() < aead::NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return Err("the sealed key is too short".into());
        }
        let (nonce, ct) = bytes.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(b"fedmesh-ca"), &mut buf)
            .map_err(|_| {
                "cannot unseal the CA key: wrong --ca-key-file, or the value was altered"
            })?;
        Ok(plain.to_vec())
    }
}

/// Lowercase hex.
pub fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hex to bytes; `None` for odd length or a non-hex character.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
