//! The audit log: certificate issuance, refusals, token creation, role
//! bindings, weights, drains, rotations, under
//! `/fedmesh/v1/audit/<unix-ms>-<random>` so a range read is in time order.
//!
//! Who acted is the authenticated principal ([`crate::auth::Caller::actor`]),
//! never a name the client sent. Every field is bounded ([`MAX_FIELD`]), so an
//! entry is at most a few KiB whatever a request carried, and the log is
//! kept to a count and an age ([`Retention`]): a flood of changes cannot
//! fill the registry nor make the log unreadable.

use crate::ca::hex_encode;
use crate::store::Store;
use ring::rand::{SecureRandom, SystemRandom};
use std::time::Duration;
use tracing::{info, warn};

/// Registry prefix of audit entries.
pub const PREFIX: &str = "/fedmesh/v1/audit/";

/// Longest text kept of one field of an entry (characters); longer text is
/// cut and marked.
pub const MAX_FIELD: usize = 1024;

/// Most entries one page of `ListAudit` returns.
pub const MAX_PAGE: usize = 1000;

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// When, Unix ms.
    pub unix_ms: i64,
    /// `issue`, `refuse`, `token_create`, ...
    pub action: String,
    /// Who acted: the authenticated principal (empty in entries written
    /// before principals were recorded).
    #[serde(default)]
    pub actor: String,
    /// Who or what it concerns (a SPIFFE ID, a cluster).
    pub subject: String,
    /// Details: why, for how long, by which credential.
    pub detail: String,
}

/// How much of the log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Retention {
    /// Most entries kept; the oldest go first.
    pub max_entries: usize,
    /// Entries older than this go.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// `s` cut to [`MAX_FIELD`] characters (marked when cut), without control
/// characters.
fn bounded(s: &str) -> String {
    let n = s.chars().count();
    let mut out: String = s
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FIELD)
        .collect();
    if n > MAX_FIELD {
        out.push_str(&format!("… ({} characters cut)", n - MAX_FIELD));
    }
    out
}

/// Appends an entry. An audit write that fails is logged, and the caller
/// carries on: the registry being away must not stop certificate renewal.
pub async fn record(store: &dyn Store, action: &str, subject: &str, detail: &str) {
    record_by(store, action, "", subject, detail).await;
}

/// [`record`] naming who acted.
pub async fn record_by(store: &dyn Store, action: &str, actor: &str, subject: &str, detail: &str) {
    let unix_ms = crate::registry::now_unix_ms();
    let mut r = [0u8; 4];
    let _ = SystemRandom::new().fill(&mut r);
    let e = Entry {
        unix_ms,
        action: bounded(action),
        actor: bounded(actor),
        subject: bounded(subject),
        detail: bounded(detail),
    };
    let key = format!("{PREFIX}{unix_ms:013}-{}", hex_encode(&r));
    let value = serde_json::to_vec(&e).unwrap_or_default();
    if let Err(err) = store.put(&key, value, None).await {
        warn!(action, subject = %e.subject, "audit entry not written: {err}");
    }
}

/// A page of entries at or after `since` (Unix ms), oldest first, starting
/// after the key `after` (a previous page's token); at most `limit`. Returns
/// the entries and the token of the next page, if any.
pub async fn list(
    store: &dyn Store,
    since: i64,
    after: &str,
    limit: usize,
) -> Result<(Vec<Entry>, Option<String>), crate::store::Error> {
    let limit = limit.clamp(1, MAX_PAGE);
    let r = store.range(PREFIX).await?;
    let mut out = Vec::new();
    let mut last = None;
    for kv in r
        .kvs
        .iter()
        .filter(|kv| after.is_empty() || kv.key.as_str() > after)
    {
        let Ok(e) = serde_json::from_slice::<Entry>(&kv.value) else {
            continue;
        };
        if e.unix_ms < since {
            continue;
        }
        if out.len() == limit {
            return Ok((out, last));
        }
        last = Some(kv.key.clone());
        out.push(e);
    }
    Ok((out, None))
}

/// Deletes what `keep` does not keep: entries beyond its count (oldest
/// first) and older than its age. Returns how many went.
pub async fn prune(store: &dyn Store, keep: Retention) -> Result<usize, crate::store::Error> {
    let r = store.range(PREFIX).await?;
    let oldest_kept = crate::registry::now_unix_ms()
        .saturating_sub(i64::try_from(keep.max_age.as_millis()).unwrap_or(i64::MAX));
    let excess = r.kvs.len().saturating_sub(keep.max_entries);
    let mut gone = 0;
    for (i, kv) in r.kvs.iter().enumerate() {
        let at = kv
            .key
            .strip_prefix(PREFIX)
            .and_then(|k| k.split('-').next())
            .and_then(|ms| ms.parse::<i64>().ok())
            .unwrap_or(0);
        if i < excess || at < oldest_kept {
            store.delete(&kv.key).await?;
            gone += 1;
        } else {
            break;
        }
    }
    Ok(gone)
}

/// Keeps the log within `keep` while this replica leads (one replica prunes).
pub async fn keep_within(
    store: std::sync::Arc<dyn Store>,
    election: crate::leader::Election,
    keep: Retention,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if election.term().is_none() {
            continue;
        }
        match prune(&*store, keep).await {
            Ok(0) => {}
            Ok(n) => info!(entries = n, "audit log pruned to its retention"),
            Err(e) => warn!("audit log not pruned: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_bounded_and_marked() {
        assert_eq!(bounded("short"), "short");
        let long = "x".repeat(MAX_FIELD + 10);
        let b = bounded(&long);
        assert!(b.ends_with("(10 characters cut)"), "{b}");
        assert_eq!(b.chars().filter(|c| *c == 'x').count(), MAX_FIELD);
        assert_eq!(bounded("a\nb\u{7}c"), "abc");
    }
}
