//! Enrollment tokens: a secret that lets a workload (a VM, a local run) obtain
//! a certificate for one identity in one cluster (a join token, `fmjt_`), or
//! an operator one client certificate (`fmot_`). The registry keeps only the
//! token's SHA-256, under a lease that expires it; a single-use token is
//! consumed by a compare-and-swap delete, so two callers cannot both use it.
//!
//! A token carries the SHA-256 of the root the federation's certificate
//! chained to when it was made: `fmjt_<root sha256>_<secret>`. A node that
//! has only the token checks the federation with it before it sends the
//! token (as kubeadm's `--discovery-token-ca-cert-hash`).

use crate::ca::hex_encode;
use crate::store::{self, Expect, Store, TxnOutcome, TxnWrite};
use mesh_core::identity::Identity;
use mesh_core::name::ClusterName;
use ring::rand::{SecureRandom, SystemRandom};
use std::time::Duration;

/// Registry prefix of join tokens (by hash).
pub const PREFIX: &str = "/fedmesh/v1/tokens/";
/// Registry prefix of operator enrollment tokens (by hash).
pub const OPERATOR_PREFIX: &str = "/fedmesh/v1/operator-tokens/";
/// Longest token accepted (a longer one is refused before it is hashed).
pub const MAX_TOKEN_LEN: usize = 256;

/// What a join token grants, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// The cluster whose intermediate signs.
    pub cluster: ClusterName,
    /// The identity a CSR may name.
    pub identity: Identity,
    /// Expiry, Unix ms.
    pub expires_unix_ms: i64,
    /// Consumed by its first use.
    pub single_use: bool,
}

/// What an operator token grants, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OperatorGrant {
    /// The operator's name.
    pub name: String,
    /// Expiry, Unix ms.
    pub expires_unix_ms: i64,
    /// Who created it.
    pub created_by: String,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Unknown, expired or already used (the same answer for all three).
    #[error("token unknown, expired or already used")]
    Invalid,
    /// The token is for another cluster.
    #[error("join token is for cluster {granted}, not {asked}")]
    WrongCluster {
        /// The token's cluster.
        granted: String,
        /// The cluster asked for.
        asked: String,
    },
    /// The registry failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

fn hash(token: &str) -> String {
    hex_encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// The root SHA-256 (hex) a token carries, if it has the current form.
pub fn pinned_root(token: &str) -> Option<&str> {
    let rest = token
        .strip_prefix("fmjt_")
        .or_else(|| token.strip_prefix("fmot_"))?;
    let (pin, _) = rest.split_once('_')?;
    (pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit())).then_some(pin)
}

async fn create_at(
    store: &dyn Store,
    prefix: &str,
    tag: &str,
    root_sha256: &str,
    value: Vec<u8>,
    ttl: Duration,
) -> Result<String, store::Error> {
    let mut raw = [0u8; 32];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| store::Error::Backend("no randomness for a token".into()))?;
    let token = format!("{tag}_{root_sha256}_{}", hex_encode(&raw));
    let lease = store.grant_lease(ttl).await?;
    store
        .put(&format!("{prefix}{}", hash(&token)), value, Some(lease))
        .await?;
    Ok(token)
}

/// Creates a join token for `grant`, valid for `ttl`, carrying the root
/// the federation's certificate chains to; returns the secret.
pub async fn create(
    store: &dyn Store,
    grant: &Grant,
    ttl: Duration,
    root_sha256: &str,
) -> Result<String, store::Error> {
    let value = serde_json::to_vec(grant).map_err(|e| store::Error::Backend(e.to_string()))?;
    create_at(store, PREFIX, "fmjt", root_sha256, value, ttl).await
}

/// Creates a single-use operator token; returns the secret.
pub async fn create_operator(
    store: &dyn Store,
    grant: &OperatorGrant,
    ttl: Duration,
    root_sha256: &str,
) -> Result<String, store::Error> {
    let value = serde_json::to_vec(grant).map_err(|e| store::Error::Backend(e.to_string()))?;
    create_at(store, OPERATOR_PREFIX, "fmot", root_sha256, value, ttl).await
}

/// A token found valid, not yet consumed.
#[derive(Debug, Clone)]
pub struct Checked<G> {
    /// What it grants.
    pub grant: G,
    single_use: bool,
    key: String,
    revision: store::Revision,
}

async fn find<G: serde::de::DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
    token: &str,
) -> Result<(G, String, store::Revision), TokenError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Invalid);
    }
    let key = format!("{prefix}{}", hash(token));
    let Some(kv) = store.get(&key).await? else {
        return Err(TokenError::Invalid);
    };
    let grant: G = serde_json::from_slice(&kv.value).map_err(|_| TokenError::Invalid)?;
    Ok((grant, key, kv.mod_revision))
}

/// Checks a join token for `cluster`. Consume it with [`consume`] once the
/// work it authorizes is done.
pub async fn check(
    store: &dyn Store,
    token: &str,
    cluster: &ClusterName,
) -> Result<Checked<Grant>, TokenError> {
    let (grant, key, revision) = find::<Grant>(store, PREFIX, token).await?;
    if grant.expires_unix_ms <= crate::registry::now_unix_ms() {
        return Err(TokenError::Invalid);
    }
    if &grant.cluster != cluster {
        return Err(TokenError::WrongCluster {
            granted: grant.cluster.to_string(),
            asked: cluster.to_string(),
        });
    }
    Ok(Checked {
        single_use: grant.single_use,
        grant,
        key,
        revision,
    })
}

/// Checks an operator token (always single use).
pub async fn check_operator(
    store: &dyn Store,
    token: &str,
) -> Result<Checked<OperatorGrant>, TokenError> {
    let (grant, key, revision) = find::<OperatorGrant>(store, OPERATOR_PREFIX, token).await?;
    if grant.expires_unix_ms <= crate::registry::now_unix_ms() {
        return Err(TokenError::Invalid);
    }
    Ok(Checked {
        grant,
        single_use: true,
        key,
        revision,
    })
}

/// Uses up a single-use token (a compare-and-swap delete: of two concurrent
/// users, one wins); a reusable one stays.
pub async fn consume<G>(store: &dyn Store, c: &Checked<G>) -> Result<(), TokenError> {
    if !c.single_use {
        return Ok(());
    }
    let out = store
        .transact(vec![TxnWrite {
            key: c.key.clone(),
            expect: Some(Expect::ModRevision(c.revision)),
            value: None,
        }])
        .await?;
    match out {
        TxnOutcome::Committed(_) => Ok(()),
        TxnOutcome::Conflict { .. } => Err(TokenError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_is_read_from_current_tokens_only() {
        let pin = "ab".repeat(32);
        assert_eq!(pinned_root(&format!("fmjt_{pin}_00ff")), Some(pin.as_str()));
        assert_eq!(pinned_root(&format!("fmot_{pin}_00ff")), Some(pin.as_str()));
        assert_eq!(pinned_root(&format!("fmjt_{}", "00".repeat(32))), None);
        assert_eq!(pinned_root("fmjt_xyz_00"), None);
        assert_eq!(pinned_root("other"), None);
    }
}
