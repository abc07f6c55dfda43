//! Join tokens: a secret that lets a workload (a VM, a local run) obtain a
//! certificate for one identity in one cluster. The registry keeps only the
//! token's SHA-256, under a lease that expires it; a single-use token is
//! consumed by a compare-and-swap delete, so two workloads cannot both use it.

use crate::ca::hex_encode;
use crate::store::{self, Expect, Store, TxnOutcome, TxnWrite};
use mesh_core::identity::Identity;
use mesh_core::name::ClusterName;
use ring::rand::{SecureRandom, SystemRandom};
use std::time::Duration;

/// Registry prefix of join tokens (by hash).
pub const PREFIX: &str = "/fedmesh/v1/tokens/";

/// What a token grants, as stored.
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

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Unknown, expired or already used (the same answer for all three).
    #[error("join token unknown, expired or already used")]
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

/// Creates a token for `grant`, valid for `ttl`; returns the secret.
pub async fn create(
    store: &dyn Store,
    grant: &Grant,
    ttl: Duration,
) -> Result<String, store::Error> {
    let mut raw = [0u8; 32];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| store::Error::Backend("no randomness for a token".into()))?;
    let token = format!("fmjt_{}", hex_encode(&raw));
    let lease = store.grant_lease(ttl).await?;
    let value = serde_json::to_vec(grant).map_err(|e| store::Error::Backend(e.to_string()))?;
    store
        .put(&format!("{PREFIX}{}", hash(&token)), value, Some(lease))
        .await?;
    Ok(token)
}

/// A token found valid for a cluster, not yet consumed.
#[derive(Debug, Clone)]
pub struct Checked {
    /// What it grants.
    pub grant: Grant,
    key: String,
    revision: store::Revision,
}

/// Checks `token` for `cluster`. Consume it with [`consume`] once the work it
/// authorizes is done.
pub async fn check(
    store: &dyn Store,
    token: &str,
    cluster: &ClusterName,
) -> Result<Checked, TokenError> {
    let key = format!("{PREFIX}{}", hash(token));
    let Some(kv) = store.get(&key).await? else {
        return Err(TokenError::Invalid);
    };
    let grant: Grant = serde_json::from_slice(&kv.value).map_err(|_| TokenError::Invalid)?;
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
        grant,
        key,
        revision: kv.mod_revision,
    })
}

/// Uses up a single-use token (a compare-and-swap delete: of two concurrent
/// users, one wins); a reusable one stays.
pub async fn consume(store: &dyn Store, c: &Checked) -> Result<(), TokenError> {
    if !c.grant.single_use {
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
