//! A node's certificate from the federation's CA, for its calls to the
//! federation: enrollment with a join token or a Kubernetes token (the key
//! is made here and never leaves), then renewal at half life by proof of
//! possession, as agents renew theirs. Used by the gateway; the agent has
//! its own, which also feeds its data-plane mTLS.

use crate::fed::{FedTls, Target};
use anyhow::Context as _;
use mesh_api::v1 as api;
use mesh_api::v1::sign_certificate_request::Credential;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

/// How long enrollment waits for an unreachable federation.
const PATIENCE: Duration = Duration::from_secs(30);
/// Between failed renewals.
const RETRY: Duration = Duration::from_secs(5);

/// What to enroll as.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The federation.
    pub target: Target,
    /// The node's cluster (its intermediate signs).
    pub cluster: String,
    /// The SPIFFE ID to ask for.
    pub identity: String,
}

/// A certificate held, with its key.
pub struct Held {
    key: rcgen::KeyPair,
    chain_pem: String,
    issued: SystemTime,
    not_after: SystemTime,
}

fn csr(identity: &str, key: &rcgen::KeyPair) -> anyhow::Result<String> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).context("CSR parameters")?;
    p.subject_alt_names = vec![rcgen::SanType::URI(
        identity
            .to_string()
            .try_into()
            .context("the SPIFFE ID as a URI")?,
    )];
    p.serialize_request(key)
        .context("make the CSR")?
        .pem()
        .context("CSR to PEM")
}

async fn sign(
    e: &Enrollment,
    key: rcgen::KeyPair,
    csr_pem: String,
    credential: Credential,
    patience: Duration,
) -> anyhow::Result<Held> {
    let req = api::SignCertificateRequest {
        csr_pem,
        cluster: e.cluster.clone(),
        credential: Some(credential),
        ttl_seconds: 0,
    };
    let deadline = tokio::time::Instant::now() + patience;
    let resp = loop {
        let attempt = async {
            let ch = e
                .target
                .channel()
                .await
                .map_err(|err| tonic::Status::unavailable(format!("{err:#}")))?;
            api::identity_client::IdentityClient::new(ch)
                .sign_certificate(req.clone())
                .await
        };
        match attempt.await {
            Ok(r) => break r.into_inner(),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                ) && tokio::time::Instant::now() < deadline =>
            {
                warn!(federation = %e.target.url, "waiting for the federation to sign a certificate: {}", s.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => anyhow::bail!(
                "the federation refused a certificate for {}: {}",
                e.identity,
                s.message()
            ),
        }
    };
    let chain: Vec<CertificateDer<'static>> =
        crate::fed::parse_certs(&resp.certificate_chain_pem).context("the signed chain")?;
    if let Some(tls) = &e.target.tls {
        tls.set_roots(&resp.trust_bundle_pem)?;
        tls.set_client(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))?;
    }
    info!(identity = %resp.identity, not_after_unix_ms = resp.not_after_unix_ms, "certificate for the federation issued");
    Ok(Held {
        key,
        chain_pem: resp.certificate_chain_pem,
        issued: SystemTime::now(),
        not_after: UNIX_EPOCH
            + Duration::from_millis(u64::try_from(resp.not_after_unix_ms).unwrap_or(0)),
    })
}

/// Enrolls with `credential`; retries while the federation is unreachable.
pub async fn enroll(e: &Enrollment, credential: Credential) -> anyhow::Result<Held> {
    let key = rcgen::KeyPair::generate().context("generate a key pair")?;
    let csr = csr(&e.identity, &key)?;
    sign(e, key, csr, credential, PATIENCE).await
}

/// Renews at half life (a new key, proven with the one in use) for the
/// node's life; once expired, enrolls again with `again` if it can give a
/// credential (a Kubernetes token file is read anew).
pub async fn keep_renewed(
    e: Enrollment,
    mut held: Held,
    again: Arc<dyn Fn() -> Option<Credential> + Send + Sync>,
) {
    use rcgen::SigningKey as _;
    let half = |h: &Held| h.not_after.duration_since(h.issued).unwrap_or_default() / 2;
    let mut due = held.issued + half(&held);
    loop {
        tokio::time::sleep(due.duration_since(SystemTime::now()).unwrap_or_default()).await;
        let next = async {
            let key = rcgen::KeyPair::generate().context("generate a key pair")?;
            let csr = csr(&e.identity, &key)?;
            let cred = if held.not_after > SystemTime::now() {
                let signature = held
                    .key
                    .sign(csr.as_bytes())
                    .context("sign the renewal proof")?;
                Credential::Renewal(api::Renewal {
                    chain_pem: held.chain_pem.clone(),
                    signature,
                })
            } else {
                again().context(
                    "the certificate expired and there is no credential to enroll with again",
                )?
            };
            sign(&e, key, csr, cred, Duration::ZERO).await
        };
        match next.await {
            Ok(h) => {
                info!(identity = %e.identity, "certificate for the federation renewed");
                held = h;
                due = held.issued + half(&held);
            }
            Err(err) => {
                warn!("renewing the certificate for the federation failed, retrying: {err:#}");
                due = SystemTime::now() + RETRY;
            }
        }
    }
}

/// The trust for an `https://` federation from a node's flags: the CA
/// bundle file, else the root hash the join token carries.
pub fn trust(ca_pem: Option<&str>, token: Option<&str>) -> anyhow::Result<Arc<FedTls>> {
    match (ca_pem, token.and_then(pinned_root)) {
        (Some(pem), _) => FedTls::new(Some(pem), None),
        (None, Some(pin)) => FedTls::new(None, Some(pin)),
        (None, None) => anyhow::bail!(
            "nothing to check the federation's certificate with: give --federation-ca FILE, or a join token that carries the root's hash"
        ),
    }
}

/// The root SHA-256 a token carries (`fmjt_<sha256>_<secret>`).
pub fn pinned_root(token: &str) -> Option<&str> {
    let rest = token
        .strip_prefix("fmjt_")
        .or_else(|| token.strip_prefix("fmot_"))?;
    let (pin, _) = rest.split_once('_')?;
    (pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit())).then_some(pin)
}
