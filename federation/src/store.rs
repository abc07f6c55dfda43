//! The key-value store under the registry: etcd, or an embedded twin with the
//! same semantics (one global revision, per-key create/mod revisions, prefix
//! watches from a revision, compaction, leases, compare-and-swap).
//!
//! Only this module and its backends talk to etcd. Everything above works on
//! [`Store`] and is tested against both backends by one conformance suite.

pub mod disk;
pub mod etcd;
pub mod memory;

use futures::stream::BoxStream;
use std::time::Duration;

/// A store revision: increases by one with every write (as in etcd).
pub type Revision = i64;

/// A lease: keys attached to it are deleted when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Full key.
    pub key: String,
    /// Raw value (fedmesh writes JSON).
    pub value: Vec<u8>,
    /// Revision at which the key was created.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Lease the key is attached to; 0 for none.
    pub lease: i64,
}

/// The keys under a prefix, read at one revision.
#[derive(Debug, Clone)]
pub struct Range {
    /// Keys in lexical order.
    pub kvs: Vec<KeyValue>,
    /// The store revision the range was read at.
    pub revision: Revision,
}

/// One change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The key was created or overwritten.
    Put(KeyValue),
    /// The key was deleted (explicitly, or because its lease expired).
    Delete {
        /// Deleted key.
        key: String,
        /// Revision of the deletion.
        mod_revision: Revision,
    },
}

impl Event {
    /// The key the event concerns.
    pub fn key(&self) -> &str {
        match self {
            Self::Put(kv) => &kv.key,
            Self::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Self::Put(kv) => kv.mod_revision,
            Self::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// What a watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Changes, in revision order, with no gap since the previous batch.
    Events(Vec<Event>),
    /// The history the watch needed is compacted away: the watch has ended and
    /// the watcher must read the whole prefix again (a full resync).
    Compacted {
        /// The store's compaction revision.
        compact_revision: Revision,
    },
    /// The connection to the store broke. The watch re-establishes itself from
    /// the revision after the last event it delivered; no event is lost.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The watch is re-established after a [`WatchEvent::Disconnected`].
    Reconnected,
}

/// A stream of [`WatchEvent`]s; dropping it cancels the watch.
pub type Watch = BoxStream<'static, WatchEvent>;

/// Condition of a compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist with this mod revision.
    ModRevision(Revision),
}

/// Result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The condition held and the write was made at this revision.
    Swapped(Revision),
    /// The condition failed; nothing was written. Carries the key as it is.
    Conflict(Option<KeyValue>),
}

/// One write of a [`Store::transact`]: put (`Some`) or delete (`None`) `key`,
/// if `expect` (when given) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnWrite {
    /// The key.
    pub key: String,
    /// Condition on the key's current state; `None` writes unconditionally.
    pub expect: Option<Expect>,
    /// New value, or `None` to delete.
    pub value: Option<Vec<u8>>,
}

/// A condition a [`Store::transact_guarded`] checks on a key it does not
/// write: a fencing token, e.g. the leader key's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// The key.
    pub key: String,
    /// What must hold of it.
    pub expect: Expect,
}

/// Result of a [`Store::transact`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every condition held; every write was made at this one revision.
    Committed(Revision),
    /// A condition failed; nothing was written. Names the first key whose
    /// condition failed, as it is now.
    Conflict {
        /// The key.
        key: String,
        /// Its current value, if any.
        current: Option<KeyValue>,
    },
}

/// Most writes in one transaction: etcd's default `--max-txn-ops`. Both
/// stores refuse more, so a caller meets the limit on the embedded registry
/// too, not first in production.
pub const MAX_TXN_OPS: usize = 128;

/// Does `current` satisfy `expect`?
pub fn holds(expect: Expect, current: Option<&KeyValue>) -> bool {
    match (expect, current) {
        (Expect::Absent, None) => true,
        (Expect::ModRevision(r), Some(kv)) => kv.mod_revision == r,
        _ => false,
    }
}

/// Store failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store cannot be reached or did not answer in time.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for history that is compacted.
    #[error("revision {requested} is compacted (oldest available is {compact_revision})")]
    Compacted {
        /// Revision asked for.
        requested: Revision,
        /// The store's compaction revision.
        compact_revision: Revision,
    },
    /// The lease does not exist (never granted, expired or revoked).
    #[error("lease {0:x} not found or expired")]
    LeaseNotFound(i64),
    /// The store refused the request.
    #[error("registry request failed: {0}")]
    Backend(String),
}

/// Refuses a transaction that neither store would run.
pub fn check_txn(writes: &[TxnWrite]) -> Result<()> {
    if writes.len() > MAX_TXN_OPS {
        return Err(Error::Backend(format!(
            "a transaction takes at most {MAX_TXN_OPS} writes, got {}",
            writes.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for w in writes {
        if !seen.insert(w.key.as_str()) {
            return Err(Error::Backend(format!(
                "key {:?} appears twice in one transaction",
                w.key
            )));
        }
    }
    Ok(())
}

/// Result alias for store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A revisioned key-value store with watches and leases.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"memory"` or `"etcd"`.
    fn kind(&self) -> &'static str;

    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Reads every key under `prefix`, at one revision.
    async fn range(&self, prefix: &str) -> Result<Range>;

    /// Writes a key, optionally attached to a lease. Returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision>;

    /// Deletes a key. Returns the revision of the deletion, or `None` if the key was absent.
    async fn delete(&self, key: &str) -> Result<Option<Revision>>;

    /// Writes (`Some`) or deletes (`None`) `key` if `expect` holds, atomically.
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Option<Vec<u8>>,
    ) -> Result<CasOutcome>;

    /// Applies `writes` atomically at one revision if every condition holds,
    /// else writes nothing. A key may appear once; at most [`MAX_TXN_OPS`].
    /// Written keys carry no lease.
    async fn transact(&self, writes: Vec<TxnWrite>) -> Result<TxnOutcome> {
        self.transact_guarded(Vec::new(), writes).await
    }

    /// [`Store::transact`], also requiring every guard to hold (guards are
    /// read, not written; a failed guard is reported as the conflict).
    async fn transact_guarded(
        &self,
        guards: Vec<Guard>,
        writes: Vec<TxnWrite>,
    ) -> Result<TxnOutcome>;

    /// Creates `key` attached to `lease` if it does not exist.
    async fn create_leased(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<CasOutcome>;

    /// Grants a lease with at least `ttl` to live.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease. Returns its TTL, or `None` if it no longer exists.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>>;

    /// Revokes a lease, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Watches `prefix` from revision `from` (inclusive).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch>;

    /// Discards history before `revision`.
    async fn compact(&self, revision: Revision) -> Result<()>;
}
