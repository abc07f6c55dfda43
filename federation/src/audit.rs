//! The audit log: certificate issuance, refusals, token creation, under
//! `/fedmesh/v1/audit/<unix-ms>-<random>` so a range read is in time order.

use crate::ca::hex_encode;
use crate::store::Store;
use ring::rand::{SecureRandom, SystemRandom};
use tracing::warn;

/// Registry prefix of audit entries.
pub const PREFIX: &str = "/fedmesh/v1/audit/";

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// When, Unix ms.
    pub unix_ms: i64,
    /// `issue`, `refuse`, `token_create`, ...
    pub action: String,
    /// Who or what it concerns (a SPIFFE ID, a cluster).
    pub subject: String,
    /// Details: why, for how long, by which credential.
    pub detail: String,
}

/// Appends an entry. An audit write that fails is logged, and the caller
/// carries on: the registry being away must not stop certificate renewal.
pub async fn record(store: &dyn Store, action: &str, subject: &str, detail: &str) {
    let unix_ms = crate::registry::now_unix_ms();
    let mut r = [0u8; 4];
    let _ = SystemRandom::new().fill(&mut r);
    let e = Entry {
        unix_ms,
        action: action.into(),
        subject: subject.into(),
        detail: detail.into(),
    };
    let key = format!("{PREFIX}{unix_ms:013}-{}", hex_encode(&r));
    let value = serde_json::to_vec(&e).unwrap_or_default();
    if let Err(err) = store.put(&key, value, None).await {
        warn!(action, subject, detail, "audit entry not written: {err}");
    }
}

/// Entries at or after `since` (Unix ms), oldest first.
pub async fn list(store: &dyn Store, since: i64) -> Result<Vec<Entry>, crate::store::Error> {
    let r = store.range(PREFIX).await?;
    Ok(r.kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Entry>(&kv.value).ok())
        .filter(|e| e.unix_ms >= since)
        .collect())
}
