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

use crate::store::{CasOutcome, Expect, Store, TxnOutcome, TxnWrite};
use crate::trust::{self, Stage, StoredRoot, TrustRecord, TRUST_KEY};
use mesh_api::v1 as api;
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
use tracing::{info, warn};

/// Registry prefix of the per-cluster intermediates:
/// `<prefix><first 16 hex digits of the root's SHA-256>/<cluster>`.
pub const INTERMEDIATE_PREFIX: &str = "/fedmesh/v1/ca/intermediates/";

/// Root lifetime when generated here.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Intermediate lifetime.
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Shortest leaf lifetime a workload may ask for.
pub const MIN_LEAF_TTL: Duration = Duration::from_secs(60);
/// Longest workload certificate (`--cert-ttl`): a stolen key is good for
/// at most a week, as short-lived mesh certificates should be.
pub const MAX_LEAF_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `--intermediate-ttl`: the root's own lifetime.
pub const MAX_INTERMEDIATE_TTL: Duration = ROOT_TTL;
/// The seal key the embedded registry makes in its data directory.
pub const SEAL_KEY_FILE: &str = "ca-seal.key";
/// Certificates are valid from a little before they are signed, for clock skew.
const BACKDATE: Duration = Duration::from_secs(60);

/// How the CA gets its root.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CaConfig {
    /// The SPIFFE trust domain of every identity it signs.
    pub trust_domain: String,
    /// Key (32 bytes, raw or 64 hex characters) sealing CA keys in the registry.
    pub key_file: Option<PathBuf>,
    /// Make `key_file` (mode 0600) if it does not exist: the embedded
    /// registry's own key, in its data directory.
    pub make_key_file: bool,
    /// A plug-in root: certificate and key PEM files.
    pub plug_in: Option<(PathBuf, PathBuf)>,
    /// Default leaf lifetime.
    pub leaf_ttl: Duration,
    /// Lifetime of the clusters' intermediates (0: one year); each is
    /// replaced with a third of it left.
    pub intermediate_ttl: Duration,
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
    /// A rotation stage that cannot follow the current one.
    #[error("{0}")]
    Precondition(String),
    /// The registry cannot be reached.
    #[error("registry: {0}")]
    Unavailable(String),
    /// The CA cannot start or sign.
    #[error("CA: {0}")]
    Internal(String),
}

/// The gRPC status of a CA failure.
pub fn status(e: &CaError) -> tonic::Status {
    match e {
        CaError::BadCsr(_) => tonic::Status::invalid_argument(e.to_string()),
        CaError::IdentityMismatch { .. } => tonic::Status::permission_denied(e.to_string()),
        CaError::Precondition(_) => tonic::Status::failed_precondition(e.to_string()),
        CaError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
        CaError::Internal(_) => tonic::Status::internal(e.to_string()),
    }
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
    /// Certificates it replaced that have not expired: certificates they
    /// issued are still accepted (no key: nothing is signed with them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    previous: Vec<String>,
}

struct Signer {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The certificate's validity.
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Signer {
    fn new(cert_pem: String, issuer: Issuer<'static, KeyPair>) -> Result<Self, CaError> {
        let (not_before, not_after) = validity_of(&cert_pem)
            .ok_or_else(|| internal("a CA certificate without a readable validity"))?;
        Ok(Self {
            cert_pem,
            issuer,
            not_before,
            not_after,
        })
    }

    /// When it is replaced: with a third of its life left (its life
    /// counted from when it was made, not from its backdated start).
    fn renew_after(&self) -> SystemTime {
        let made = self.not_before + BACKDATE;
        let life = self.not_after.duration_since(made).unwrap_or_default();
        self.not_after - life / 3
    }
}

/// A certificate's `notBefore` and `notAfter`.
fn validity_of(cert_pem: &str) -> Option<(SystemTime, SystemTime)> {
    let der = trust::cert_der(cert_pem).ok()?;
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    Some((at(c.validity().not_before)?, at(c.validity().not_after)?))
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Where the trust record is read from while signing: the replica's view of
/// the registry, kept current by its sync loop (so signing goes on while the
/// registry is away).
pub type TrustView = Arc<dyn Fn() -> Option<Arc<TrustRecord>> + Send + Sync>;

/// An intermediate's place: the root's fingerprint and the cluster.
type IntermediateKey = (String, ClusterName);

/// The mesh CA.
pub struct Ca {
    trust_domain: TrustDomain,
    /// Roots' keys, by the root's fingerprint, once unsealed.
    roots: Mutex<HashMap<String, Arc<Signer>>>,
    /// Intermediates by (root fingerprint, cluster).
    intermediates: Mutex<HashMap<(String, ClusterName), Arc<Signer>>>,
    /// Intermediates' certificates (DER) by (root fingerprint, cluster),
    /// for checking clients: the current one and those it replaced that
    /// have not expired.
    intermediate_certs: Mutex<HashMap<IntermediateKey, Vec<Vec<u8>>>>,
    /// Seals keys in the registry: the key file's, or one made at start-up
    /// that lives in this process only (ephemeral).
    sealer: Sealer,
    /// A rotation stores a new root's key sealed; with an ephemeral sealer
    /// it would not survive a restart of this replica.
    durable: bool,
    plug_in: Option<(String, Arc<Signer>)>,
    /// The record as this replica last wrote or read it itself.
    own: Mutex<Arc<TrustRecord>>,
    view: Mutex<Option<TrustView>>,
    store: Arc<dyn Store>,
    leaf_ttl: Duration,
    intermediate_ttl: Duration,
    /// Where the root came from, for logs and status.
    pub origin: &'static str,
}

impl Ca {
    /// Loads the trust record from the registry (or the plug-in files), or
    /// makes a root and stores it.
    pub async fn start(cfg: &CaConfig, store: Arc<dyn Store>) -> Result<Self, CaError> {
        let trust_domain = TrustDomain::new(&cfg.trust_domain).map_err(internal)?;
        let (sealer, durable) = match &cfg.key_file {
            Some(p) => {
                if cfg.make_key_file {
                    make_key_file(p)?;
                }
                (Sealer::from_file(p)?, true)
            }
            None => (Sealer::random()?, false),
        };
        let plug_in = match &cfg.plug_in {
            Some((cert, key)) => {
                let s = plug_in(cert, key)?;
                let fp = trust::fingerprint(&s.cert_pem).map_err(internal)?;
                Some((fp, Arc::new(s)))
            }
            None => None,
        };
        let origin = match (&plug_in, durable) {
            (Some(_), _) => "plug-in",
            (None, true) => "registry",
            (None, false) => "ephemeral",
        };
        let record = match (&plug_in, durable) {
            (Some((fp, s)), _) => adopt_plug_in(&*store, fp, s).await?,
            (None, true) => load_or_create_root(&*store, &sealer, &trust_domain).await?,
            // The root lives in this process: a restart makes a new one.
            (None, false) => {
                let root = new_root(&trust_domain)?;
                let rec = TrustRecord::single(stored_root(&root, &sealer)?).map_err(internal)?;
                store
                    .put(TRUST_KEY, rec.encode(), None)
                    .await
                    .map_err(internal)?;
                rec
            }
        };
        let ca = Self {
            trust_domain,
            roots: Mutex::new(HashMap::new()),
            intermediates: Mutex::new(HashMap::new()),
            intermediate_certs: Mutex::new(HashMap::new()),
            sealer,
            durable,
            plug_in,
            own: Mutex::new(Arc::new(record)),
            view: Mutex::new(None),
            store,
            leaf_ttl: if cfg.leaf_ttl.is_zero() {
                Duration::from_secs(24 * 3600)
            } else {
                cfg.leaf_ttl
            },
            intermediate_ttl: if cfg.intermediate_ttl.is_zero() {
                INTERMEDIATE_TTL
            } else {
                cfg.intermediate_ttl
            },
            origin,
        };
        // A wrong key file fails here, at start-up, not at the first CSR.
        let rec = ca.record();
        ca.root(&rec, &rec.signing)?;
        info!(origin, trust_domain = %ca.trust_domain, signing_root = %rec.signing, roots = rec.roots.len(), "mesh CA ready");
        Ok(ca)
    }

    /// Reads the trust record from `view` from now on (the replica's state).
    pub fn follow(&self, view: TrustView) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some(view);
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust record in force: the replica's view of the registry, or
    /// what this replica last read or wrote itself before that view had one.
    pub fn record(&self) -> Arc<TrustRecord> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        view.and_then(|v| v())
            .unwrap_or_else(|| self.own.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The root the federation's own serving certificate chains to: the
    /// oldest trusted one, which every client trusts during a rotation.
    pub fn serving_root(&self) -> String {
        let rec = self.record();
        rec.fingerprints()
            .first()
            .cloned()
            .unwrap_or_else(|| rec.signing.clone())
    }

    /// The default lifetime of the leaves it signs.
    pub fn leaf_ttl(&self) -> Duration {
        self.leaf_ttl
    }

    /// The roots to trust, PEM.
    pub fn bundle_pem(&self) -> String {
        self.record().bundle_pem()
    }

    /// Signs `csr_pem` for `identity` (which the caller's credential
    /// grants), with the intermediate of `cluster` under the signing root.
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
        let rec = self.record();
        let root = self.root(&rec, &rec.signing)?;
        let inter = self.intermediate(&rec.signing, &root, cluster).await?;
        let now = SystemTime::now();
        // A leaf never outlives its intermediate.
        let not_after = (now + ttl).min(inter.not_after);
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
        p.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(internal)?,
        )];
        p.distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.as_str());
        p.not_before = (now - BACKDATE).into();
        p.not_after = not_after.into();
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
            bundle_pem: rec.bundle_pem(),
            not_after,
            root_sha256: rec.signing.clone(),
        })
    }

    /// Signs a leaf directly under the signing root (the federation's own
    /// serving certificate, an operator's client certificate): `uri` is its
    /// one URI SAN, `extra` any DNS or IP SANs; `public_key` the CSR's or a
    /// key pair made here. Returns the chain (leaf, then the root) and its
    /// end of validity.
    pub fn sign_direct(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        uri: &str,
        extra: &[SanType],
        ttl: Duration,
        client_only: bool,
    ) -> Result<Issued, CaError> {
        let rec = self.record();
        self.sign_direct_under(&rec.signing, public_key, uri, extra, ttl, client_only)
    }

    /// [`Ca::sign_direct`] under the trusted root `fp` (the federation's
    /// serving certificate stays under the oldest root until a rotation
    /// removes it: every client trusts that one).
    pub fn sign_direct_under(
        &self,
        fp: &str,
        public_key: &impl rcgen::PublicKeyData,
        uri: &str,
        extra: &[SanType],
        ttl: Duration,
        client_only: bool,
    ) -> Result<Issued, CaError> {
        let rec = self.record();
        let root = self.root(&rec, fp)?;
        let now = SystemTime::now();
        let ttl = ttl.max(MIN_LEAF_TTL);
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
        p.subject_alt_names = vec![SanType::URI(uri.to_string().try_into().map_err(internal)?)];
        p.subject_alt_names.extend(extra.iter().cloned());
        p.distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.as_str());
        p.not_before = (now - BACKDATE).into();
        p.not_after = (now + ttl).into();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = if client_only {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        };
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(public_key, &root.issuer).map_err(internal)?;
        Ok(Issued {
            chain_pem: format!("{}{}", leaf.pem(), root.cert_pem),
            bundle_pem: rec.bundle_pem(),
            not_after: now + ttl,
            root_sha256: fp.to_string(),
        })
    }

    /// Whether `der` is the intermediate this CA made for `cluster` under
    /// any root the trust record trusts (the check that a client
    /// certificate's cluster is the one its issuer names).
    pub async fn is_cluster_intermediate(
        &self,
        cluster: &ClusterName,
        der: &[u8],
    ) -> Result<bool, CaError> {
        for fp in self.record().fingerprints() {
            if self.accepts_intermediate(&fp, cluster, der).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether `der` is `cluster`'s intermediate under root `fp`, current
    /// or replaced and not expired. Known certificates are answered from
    /// memory; another is looked up in the registry (another replica may
    /// have renewed the intermediate).
    async fn accepts_intermediate(
        &self,
        fp: &str,
        cluster: &ClusterName,
        der: &[u8],
    ) -> Result<bool, CaError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let k = (fp.to_string(), cluster.clone());
        let known = |certs: &HashMap<IntermediateKey, Vec<Vec<u8>>>| {
            certs.get(&k).is_some_and(|v| v.iter().any(|c| c == der))
        };
        if known(
            &self
                .intermediate_certs
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        ) {
            return Ok(true);
        }
        // The certificates only: no need to unseal the key (a replica
        // without the seal key checks clients too).
        let key = Self::intermediate_key(fp, cluster);
        let Some(kv) = self
            .store
            .get(&key)
            .await
            .map_err(|e| CaError::Unavailable(e.to_string()))?
        else {
            return Ok(false);
        };
        let stored: StoredCa =
            serde_json::from_slice(&kv.value).map_err(|e| internal(format!("{key}: {e}")))?;
        let now = SystemTime::now();
        let mut ders = Vec::new();
        for pem in std::iter::once(&stored.cert_pem).chain(&stored.previous) {
            if validity_of(pem).is_some_and(|(_, not_after)| not_after > now) {
                ders.push(
                    CertificateDer::from_pem_slice(pem.as_bytes())
                        .map_err(internal)?
                        .to_vec(),
                );
            }
        }
        let found = ders.iter().any(|c| c == der);
        self.intermediate_certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k, ders);
        Ok(found)
    }

    /// Checks a renewal: `chain_pem` is a chain this CA issued under the
    /// intermediate of `cluster` below any root the bundle trusts (so
    /// certificates under the old root renew during a rotation), not
    /// expired, and `signature` is its leaf key's over `csr_pem`. Returns
    /// the identity the leaf carries.
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
        let rec = self.record();
        if !self
            .is_cluster_intermediate(cluster, inter.as_ref())
            .await?
        {
            return Err(refuse(format!(
                "no renewal: the chain was not issued for cluster {cluster} under a trusted root"
            )));
        }
        let mut roots = rustls::RootCertStore::empty();
        for r in &rec.roots {
            roots
                .add(trust::cert_der(&r.cert_pem).map_err(internal)?)
                .map_err(internal)?;
        }
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

    /// Checks an operator's renewal: `chain_pem` is a certificate a trusted
    /// root issued directly for `spiffe://<td>/fedmesh/operator/<name>`
    /// (with or without its root), not expired, and `signature` is its
    /// key's over `csr_pem`. Returns the operator's name.
    pub fn verify_operator_renewal(
        &self,
        chain_pem: &str,
        csr_pem: &str,
        signature: &[u8],
    ) -> Result<String, CaError> {
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
        let Some(leaf) = chain.first() else {
            return Err(CaError::BadCsr("renewal.chain_pem: no certificate".into()));
        };
        let rec = self.record();
        let mut roots = rustls::RootCertStore::empty();
        for r in &rec.roots {
            roots
                .add(trust::cert_der(&r.cert_pem).map_err(internal)?)
                .map_err(internal)?;
        }
        // Issued directly by a root: no intermediate is taken from the chain.
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(internal)?
        .verify_client_cert(leaf, &[], UnixTime::now())
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
        let prefix = format!(
            "spiffe://{}{}",
            self.trust_domain,
            crate::auth::OPERATOR_PATH
        );
        cert.subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => u
                        .strip_prefix(&prefix)
                        .filter(|name| crate::auth::check_operator_name(name).is_ok())
                        .map(str::to_string),
                    _ => None,
                })
            })
            .ok_or_else(|| refuse("no renewal: the certificate is no operator's".into()))
    }

    /// One stage of a root rotation, written with a compare-and-swap on
    /// the record as read from the registry: `Add` (steady → added) makes a
    /// new root and trusts it beside the old one, `Reissue` (added →
    /// reissuing) signs under the new root, `Remove` (reissuing → steady)
    /// drops the old root. Returns the record written and its revision.
    pub async fn rotate(&self, stage: RotationStep) -> Result<(TrustRecord, i64), CaError> {
        let kv = self
            .store
            .get(TRUST_KEY)
            .await
            .map_err(|e| CaError::Unavailable(e.to_string()))?
            .ok_or_else(|| internal(format!("{TRUST_KEY} is missing from the registry")))?;
        let current =
            TrustRecord::decode(&kv.value).map_err(|e| internal(format!("{TRUST_KEY}: {e}")))?;
        stage.check(current.stage())?;
        let mut next = current.clone();
        match stage {
            RotationStep::Add => {
                if !self.durable {
                    if self.plug_in.is_some() {
                        return Err(CaError::Precondition(
                            "cannot add a root: the new root's key must be stored sealed, and this federation has no --ca-key-file".into(),
                        ));
                    }
                    warn!("rotating an ephemeral root: the new root lives in this process only");
                }
                let root = new_root(&self.trust_domain)?;
                next.roots.push(stored_root(&root, &self.sealer)?);
                let fp = trust::fingerprint(&root.cert_pem).map_err(internal)?;
                self.roots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fp, Arc::new(root));
            }
            RotationStep::Reissue => {
                next.signing = current.fingerprints().last().cloned().unwrap_or_default();
                // It must open before anyone relies on it.
                self.root(&next, &next.signing)?;
            }
            RotationStep::Remove => {
                next.roots.retain(|r| {
                    trust::fingerprint(&r.cert_pem).is_ok_and(|f| f == current.signing)
                });
            }
        }
        let outcome = self
            .store
            .transact(vec![TxnWrite {
                key: TRUST_KEY.to_string(),
                expect: Some(Expect::ModRevision(kv.mod_revision)),
                value: Some(next.encode()),
            }])
            .await
            .map_err(|e| CaError::Unavailable(e.to_string()))?;
        match outcome {
            TxnOutcome::Committed(rev) => {
                *self.own.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(next.clone());
                info!(step = ?stage, stage = next.stage().as_str(), signing = %next.signing, "trust record rotated");
                Ok((next, rev))
            }
            TxnOutcome::Conflict { .. } => Err(CaError::Precondition(
                "the trust record changed while this step was being made (another rotation?); read it again".into(),
            )),
        }
    }

    /// The signer of the root `fp` of `rec`: cached, else unsealed.
    fn root(&self, rec: &TrustRecord, fp: &str) -> Result<Arc<Signer>, CaError> {
        if let Some(s) = self.roots.lock().unwrap_or_else(|p| p.into_inner()).get(fp) {
            return Ok(s.clone());
        }
        let stored = rec
            .roots
            .iter()
            .find(|r| trust::fingerprint(&r.cert_pem).is_ok_and(|f| f == fp))
            .ok_or_else(|| internal(format!("root {fp} is not in the trust record")))?;
        let signer = match (&stored.key_sealed, &self.plug_in) {
            (Some(sealed), _) => {
                let key_pem = self
                    .sealer
                    .open(sealed, &seal_context(TRUST_KEY, &stored.cert_pem))
                    .map_err(|e| internal(format!("{TRUST_KEY}: root {fp}: {e}")))?;
                let key_pem = String::from_utf8(key_pem).map_err(internal)?;
                signer_from_pem(&stored.cert_pem, &key_pem)?
            }
            (None, Some((pfp, s))) if pfp == fp => {
                return Ok(self
                    .roots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(fp.to_string())
                    .or_insert_with(|| s.clone())
                    .clone())
            }
            (None, _) => {
                return Err(internal(format!(
                    "root {fp} is a plug-in root whose key this replica was not given (--ca-cert/--ca-key)"
                )))
            }
        };
        Ok(self
            .roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(fp.to_string())
            .or_insert_with(|| Arc::new(signer))
            .clone())
    }

    fn intermediate_key(root_fp: &str, cluster: &ClusterName) -> String {
        format!(
            "{INTERMEDIATE_PREFIX}{}/{cluster}",
            root_fp.get(..16).unwrap_or(root_fp)
        )
    }

    /// The intermediate of `cluster` under `root`: cached, else from the
    /// registry, else made and stored; replaced (compare-and-swap, so
    /// replicas agree on one) once a third of its life is left. Certificates
    /// the old one issued stay accepted until they expire.
    async fn intermediate(
        &self,
        root_fp: &str,
        root: &Signer,
        cluster: &ClusterName,
    ) -> Result<Arc<Signer>, CaError> {
        let k = (root_fp.to_string(), cluster.clone());
        let now = SystemTime::now();
        let cached = self.lock().get(&k).cloned();
        if let Some(s) = &cached {
            if now < s.renew_after() {
                return Ok(s.clone());
            }
        }
        let key = Self::intermediate_key(root_fp, cluster);
        let make = || new_intermediate(root, &self.trust_domain, cluster, self.intermediate_ttl);
        for _ in 0..3 {
            let current = match self.store.get(&key).await {
                Ok(c) => c,
                // The registry is away: a cached one still valid keeps signing.
                Err(e) => match &cached {
                    Some(s) if now < s.not_after => {
                        warn!(%cluster, "cannot renew the intermediate now ({e}); signing with the current one");
                        return Ok(s.clone());
                    }
                    _ => return Err(CaError::Unavailable(e.to_string())),
                },
            };
            let Some(kv) = current else {
                let signer =
                    Arc::new(load_or_create(&*self.store, &key, &self.sealer, make).await?);
                self.lock().insert(k, signer.clone());
                return Ok(signer);
            };
            let stored: StoredCa = serde_json::from_slice(&kv.value)
                .map_err(|e| internal(format!("{key}: not a stored CA: {e}")))?;
            let signer = Arc::new(open_stored(&kv.value, &self.sealer, &key)?);
            if now < signer.renew_after() {
                self.lock().insert(k, signer.clone());
                return Ok(signer);
            }
            let made = make()?;
            let mut previous = vec![stored.cert_pem];
            previous.extend(stored.previous);
            previous.retain(|pem| validity_of(pem).is_some_and(|(_, not_after)| not_after > now));
            let value = serde_json::to_vec(&StoredCa {
                cert_pem: made.cert_pem.clone(),
                key_sealed: self.sealer.seal(
                    made.issuer.key().serialize_pem().as_bytes(),
                    &seal_context(&key, &made.cert_pem),
                )?,
                previous,
            })
            .map_err(internal)?;
            match self
                .store
                .compare_and_swap(&key, Expect::ModRevision(kv.mod_revision), Some(value))
                .await
                .map_err(|e| CaError::Unavailable(e.to_string()))?
            {
                CasOutcome::Swapped(_) => {
                    info!(%cluster, root = %root_fp.get(..16).unwrap_or(root_fp), not_after = ?made.not_after,
                        "renewed the cluster's intermediate CA");
                    let signer = Arc::new(made);
                    self.lock().insert(k.clone(), signer.clone());
                    self.intermediate_certs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&k);
                    return Ok(signer);
                }
                // Another replica renewed it first: use theirs.
                CasOutcome::Conflict(_) => continue,
            }
        }
        Err(CaError::Unavailable(format!(
            "{key}: changed three times while being renewed; try again"
        )))
    }

    /// Every cluster's intermediate under the roots the bundle trusts, with
    /// its end of validity and when it is renewed.
    pub async fn intermediate_infos(&self) -> Result<Vec<api::IntermediateInfo>, CaError> {
        let fps = self.record().fingerprints();
        let range = self
            .store
            .range(INTERMEDIATE_PREFIX)
            .await
            .map_err(|e| CaError::Unavailable(e.to_string()))?;
        let mut out = Vec::new();
        for kv in range.kvs {
            let Some((root16, cluster)) = kv
                .key
                .strip_prefix(INTERMEDIATE_PREFIX)
                .and_then(|r| r.split_once('/'))
            else {
                continue;
            };
            let Some(fp) = fps.iter().find(|f| f.starts_with(root16)) else {
                continue;
            };
            let Ok(stored) = serde_json::from_slice::<StoredCa>(&kv.value) else {
                continue;
            };
            let Some((not_before, not_after)) = validity_of(&stored.cert_pem) else {
                continue;
            };
            let made = not_before + BACKDATE;
            let life = not_after.duration_since(made).unwrap_or_default();
            out.push(api::IntermediateInfo {
                cluster: cluster.to_string(),
                root_sha256: fp.clone(),
                not_after_unix_ms: unix_ms(not_after),
                renew_after_unix_ms: unix_ms(not_after - life / 3),
            });
        }
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, ClusterName), Arc<Signer>>> {
        self.intermediates.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A step of a root rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    /// Trust a new root beside the signing one.
    Add,
    /// Sign under the new root.
    Reissue,
    /// Stop trusting the old root.
    Remove,
}

impl RotationStep {
    /// Refuses the step unless the rotation stands where it follows.
    pub fn check(self, at: Stage) -> Result<(), CaError> {
        let (want, what) = match self {
            Self::Add => (Stage::Steady, "add a root"),
            Self::Reissue => (Stage::Added, "sign under the new root"),
            Self::Remove => (Stage::Reissuing, "remove the old root"),
        };
        if at == want {
            return Ok(());
        }
        Err(CaError::Precondition(format!(
            "cannot {what}: the rotation is at stage {}, and this step follows stage {}",
            at.as_str(),
            want.as_str()
        )))
    }
}

fn stored_root(root: &Signer, sealer: &Sealer) -> Result<StoredRoot, CaError> {
    Ok(StoredRoot {
        cert_pem: root.cert_pem.clone(),
        key_sealed: Some(sealer.seal(
            root.issuer.key().serialize_pem().as_bytes(),
            &seal_context(TRUST_KEY, &root.cert_pem),
        )?),
    })
}

/// The trust record with a plug-in root: kept when it already trusts that
/// root (a rotation may be under way), else replaced by one naming it.
async fn adopt_plug_in(store: &dyn Store, fp: &str, root: &Signer) -> Result<TrustRecord, CaError> {
    if let Some(kv) = store.get(TRUST_KEY).await.map_err(internal)? {
        if let Ok(rec) = TrustRecord::decode(&kv.value) {
            if rec.fingerprints().iter().any(|f| f == fp) {
                return Ok(rec);
            }
        }
    }
    let rec = TrustRecord::single(StoredRoot {
        cert_pem: root.cert_pem.clone(),
        key_sealed: None,
    })
    .map_err(internal)?;
    store
        .put(TRUST_KEY, rec.encode(), None)
        .await
        .map_err(internal)?;
    Ok(rec)
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
    Signer::new(cert.pem(), Issuer::new(p, key))
}

fn new_intermediate(
    root: &Signer,
    td: &TrustDomain,
    cluster: &ClusterName,
    ttl: Duration,
) -> Result<Signer, CaError> {
    let key = KeyPair::generate().map_err(internal)?;
    // Never past the root.
    let left = root
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let p = ca_params(
        &format!("fedmesh intermediate CA ({cluster})"),
        td,
        ttl.min(left),
        Some(0),
    )?;
    let cert = p.signed_by(&key, &root.issuer).map_err(internal)?;
    Signer::new(cert.pem(), Issuer::new(p, key))
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
    Signer::new(cert_pem.to_string(), issuer)
}

/// The trust record from the registry, or a new root stored as one (the
/// first replica to start wins the compare-and-swap; the others read its).
async fn load_or_create_root(
    store: &dyn Store,
    sealer: &Sealer,
    td: &TrustDomain,
) -> Result<TrustRecord, CaError> {
    if let Some(kv) = store.get(TRUST_KEY).await.map_err(internal)? {
        return TrustRecord::decode(&kv.value).map_err(|e| internal(format!("{TRUST_KEY}: {e}")));
    }
    let root = new_root(td)?;
    let made = TrustRecord::single(stored_root(&root, sealer)?).map_err(internal)?;
    match store
        .transact(vec![TxnWrite {
            key: TRUST_KEY.to_string(),
            expect: Some(Expect::Absent),
            value: Some(made.encode()),
        }])
        .await
        .map_err(internal)?
    {
        TxnOutcome::Committed(_) => {
            info!(key = TRUST_KEY, "created and stored the mesh root");
            Ok(made)
        }
        TxnOutcome::Conflict {
            current: Some(kv), ..
        } => TrustRecord::decode(&kv.value).map_err(|e| internal(format!("{TRUST_KEY}: {e}"))),
        TxnOutcome::Conflict { current: None, .. } => Err(internal(format!(
            "{TRUST_KEY}: lost a creation race and found nothing"
        ))),
    }
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
        key_sealed: sealer.seal(
            made.issuer.key().serialize_pem().as_bytes(),
            &seal_context(key, &made.cert_pem),
        )?,
        previous: Vec::new(),
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
        .open(&s.key_sealed, &seal_context(key, &s.cert_pem))
        .map_err(|e| internal(format!("{key}: {e}")))?;
    let key_pem = String::from_utf8(key_pem).map_err(internal)?;
    signer_from_pem(&s.cert_pem, &key_pem)
}

/// Writes a new random seal key to `p` (mode 0600) unless it exists.
fn make_key_file(p: &std::path::Path) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| internal("no randomness"))?;
    if p.exists() {
        return Ok(());
    }
    let fail = |e: std::io::Error| internal(format!("seal key {}: {e}", p.display()));
    // Whole or absent, even across a crash: written and synced under a
    // temporary name, then linked in place (which fails if another start
    // made one meanwhile), and the directory synced.
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        f.write_all(hex_encode(&bytes).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(fail)?;
    }
    let linked = std::fs::hard_link(&tmp, p);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Some(dir) = p.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(fail)?;
            }
            info!(path = %p.display(), "made the key that seals the CA in the embedded registry");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(fail(e)),
    }
}

/// The prefix of a sealed value whose AAD names its record.
const SEAL_V2: &str = "v2:";
/// The AAD of values sealed before v2.
const LEGACY_AAD: &[u8] = b"fedmesh-ca";

fn bound_aad(context: &str) -> Vec<u8> {
    format!("fedmesh-ca/v2\0{context}").into_bytes()
}

/// The seal context of a CA stored at registry `key` with `cert_pem`.
fn seal_context(key: &str, cert_pem: &str) -> String {
    let fp = trust::fingerprint(cert_pem).unwrap_or_else(|_| "unparsable".into());
    format!("{key}#{fp}")
}

/// AES-256-GCM sealing of CA keys at rest.
struct Sealer {
    key: aead::LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    /// A key made now, known to this process only.
    fn random() -> Result<Self, CaError> {
        let rng = SystemRandom::new();
        let mut bytes = [0u8; 32];
        rng.fill(&mut bytes)
            .map_err(|_| internal("no randomness"))?;
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, &bytes).map_err(internal)?;
        Ok(Self {
            key: aead::LessSafeKey::new(unbound),
            rng,
        })
    }

    fn from_file(p: &PathBuf) -> Result<Self, CaError> {
        // The key opens every root sealed in the registry: no one but its
        // owner (and group, as a Kubernetes Secret with fsGroup gives) may
        // read it.
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(p)
                .map_err(|e| internal(format!("--ca-key-file {}: {e}", p.display())))?
                .permissions()
                .mode();
            if mode & 0o007 != 0 {
                return Err(internal(format!(
                    "--ca-key-file {}: mode {:04o} lets other users read or write it; chmod o-rwx it (0600 or 0640)",
                    p.display(),
                    mode & 0o7777
                )));
            }
        }
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

    /// Seals `plain` for the record `context` names (its registry key and
    /// certificate): the sealed value opens only there, so a value copied
    /// onto another record (another cluster's intermediate, another root)
    /// is refused rather than used.
    fn seal(&self, plain: &[u8], context: &str) -> Result<String, CaError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| internal("no randomness"))?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(bound_aad(context)),
                &mut buf,
            )
            .map_err(|_| internal("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{SEAL_V2}{}", hex_encode(&out)))
    }

    fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, String> {
        // Values sealed before the AAD named their record carry no version;
        // they open as they were sealed (and are sealed bound when rewritten).
        let (aad, hex) = match sealed.strip_prefix(SEAL_V2) {
            Some(rest) => (bound_aad(context), rest),
            None => {
                warn!(record = context, "a CA key sealed without its record's name (before v2); rotate the root to reseal it");
                (LEGACY_AAD.to_vec(), sealed)
            }
        };
        let bytes = hex_decode(hex).ok_or("the sealed key is not hex")?;
        if bytes.len() < aead::NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return Err("the sealed key is too short".into());
        }
        let (nonce, ct) = bytes.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(aad), &mut buf)
            .map_err(|_| {
                "cannot unseal the CA key: wrong --ca-key-file, or the value was altered or sealed for another record"
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
