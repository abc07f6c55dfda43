//! The mesh's trust bundle as the registry keeps it: every root workloads
//! trust, and the one the CA signs under now.
//!
//! One value at [`TRUST_KEY`] holds the roots (certificates, and their keys
//! sealed by the CA) and the signing root's fingerprint. It travels through
//! the registry: every replica signs under the root it names and sends its
//! public part ([`TrustRecord::bundle`]) to every agent with its Discovery
//! state. A root rotation moves it through three stages, each one write:
//! [`Stage::Steady`] (one root) → add a root → [`Stage::Added`] (two roots,
//! the old one signing) → reissue → [`Stage::Reissuing`] (the new one
//! signing, the old one still trusted) → remove → steady again.

use mesh_api::v1 as api;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Registry key of the trust record.
pub const TRUST_KEY: &str = "/fedmesh/v1/ca/trust";

/// Most roots a record may hold: the old and the new during a rotation.
pub const MAX_ROOTS: usize = 2;

/// One trusted root.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredRoot {
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// Its key's PEM, sealed by the CA (hex of nonce || ciphertext); absent
    /// for a plug-in root, whose key every replica reads from its files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sealed: Option<String>,
}

/// The stored value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrustRecord {
    /// Oldest first.
    pub roots: Vec<StoredRoot>,
    /// SHA-256 (hex) of the signing root's certificate.
    pub signing: String,
}

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// One root, signing.
    Steady,
    /// A second, newer root is trusted; the older one still signs.
    Added,
    /// The newer root signs; the older one is still trusted.
    Reissuing,
}

impl Stage {
    /// The name `meshctl trust` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Added => "added",
            Self::Reissuing => "reissuing",
        }
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::ca::hex_encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The DER of the one certificate in `pem`.
pub fn cert_der(pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))
}

/// SHA-256 (hex) of the certificate in `pem`.
pub fn fingerprint(pem: &str) -> Result<String, String> {
    Ok(sha256_hex(cert_der(pem)?.as_ref()))
}

impl TrustRecord {
    /// A record of one root, signing.
    pub fn single(root: StoredRoot) -> Result<Self, String> {
        let signing = fingerprint(&root.cert_pem)?;
        Ok(Self {
            roots: vec![root],
            signing,
        })
    }

    /// Decodes and checks a stored value: one or two roots, each a
    /// certificate, the signing one among them.
    pub fn decode(value: &[u8]) -> Result<Self, String> {
        let r: Self =
            serde_json::from_slice(value).map_err(|e| format!("not a valid trust record: {e}"))?;
        if r.roots.is_empty() || r.roots.len() > MAX_ROOTS {
            return Err(format!(
                "roots: holds {} roots; a trust record holds 1 or {MAX_ROOTS}",
                r.roots.len()
            ));
        }
        let mut fps = Vec::new();
        for (i, root) in r.roots.iter().enumerate() {
            let fp =
                fingerprint(&root.cert_pem).map_err(|e| format!("roots[{i}].cert_pem: {e}"))?;
            if fps.contains(&fp) {
                return Err(format!("roots[{i}]: the same root is listed twice"));
            }
            fps.push(fp);
        }
        if !fps.contains(&r.signing) {
            return Err(format!("signing: {} is not one of the roots", r.signing));
        }
        Ok(r)
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Fingerprints of the roots, oldest first.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|r| fingerprint(&r.cert_pem).unwrap_or_default())
            .collect()
    }

    /// The signing root.
    pub fn signing_root(&self) -> Option<&StoredRoot> {
        self.roots
            .iter()
            .find(|r| fingerprint(&r.cert_pem).is_ok_and(|f| f == self.signing))
    }

    /// Every root's certificate, PEM, concatenated.
    pub fn bundle_pem(&self) -> String {
        self.roots.iter().map(|r| r.cert_pem.as_str()).collect()
    }

    /// What workloads receive: certificates only, never keys.
    pub fn bundle(&self) -> api::TrustBundle {
        api::TrustBundle {
            roots_pem: self.bundle_pem(),
            signing_root_sha256: self.signing.clone(),
        }
    }

    /// Where a rotation stands.
    pub fn stage(&self) -> Stage {
        match self.fingerprints().as_slice() {
            [_, newer] if *newer == self.signing => Stage::Reissuing,
            [_, _] => Stage::Added,
            _ => Stage::Steady,
        }
    }

    /// The roots as operators see them.
    pub fn root_infos(&self) -> Vec<api::RootInfo> {
        self.roots
            .iter()
            .map(|r| {
                let sha256 = fingerprint(&r.cert_pem).unwrap_or_default();
                let (subject, not_after_unix_ms) = cert_der(&r.cert_pem)
                    .ok()
                    .and_then(|der| {
                        let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
                        Some((
                            c.subject().to_string(),
                            c.validity().not_after.timestamp().saturating_mul(1000),
                        ))
                    })
                    .unwrap_or_default();
                api::RootInfo {
                    signing: sha256 == self.signing,
                    sha256,
                    subject,
                    not_after_unix_ms,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(cn: &str) -> StoredRoot {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut p =
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        StoredRoot {
            cert_pem: cert.pem(),
            key_sealed: Some("00".into()),
        }
    }

    #[test]
    fn stages_follow_the_roots_and_the_signer() {
        let (a, b) = (root("a"), root("b"));
        let mut r = TrustRecord::single(a.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.stage(), Stage::Steady);
        r.roots.push(b.clone());
        assert_eq!(r.stage(), Stage::Added);
        r.signing = fingerprint(&b.cert_pem).unwrap_or_default();
        assert_eq!(r.stage(), Stage::Reissuing);
        let back = TrustRecord::decode(&r.encode()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, r);
        assert_eq!(
            back.bundle().roots_pem,
            format!("{}{}", a.cert_pem, b.cert_pem)
        );
        assert!(back.root_infos()[1].signing && !back.root_infos()[0].signing);
        assert!(back.root_infos()[0].subject.contains("CN=a"));
    }

    #[test]
    fn bad_records_are_refused_with_the_reason() {
        let a = root("a");
        let err = |v: serde_json::Value| {
            TrustRecord::decode(v.to_string().as_bytes()).expect_err("must be refused")
        };
        assert!(err(serde_json::json!({"roots": [], "signing": "x"})).contains("holds 0 roots"));
        assert!(
            err(serde_json::json!({"roots": [{"cert_pem": "junk"}], "signing": "x"}))
                .starts_with("roots[0].cert_pem")
        );
        assert!(err(serde_json::json!({"roots": [a, a], "signing": "x"})).contains("twice"));
        assert!(err(serde_json::json!({"roots": [a], "signing": "x"}))
            .contains("signing: x is not one of the roots"));
        assert!(TrustRecord::decode(b"{").is_err());
    }
}
