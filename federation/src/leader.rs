//! Leader election through the registry: one replica computes the global
//! weights, every replica serves them.
//!
//! A replica leads while it holds [`LEADER_KEY`], created attached to a
//! lease it keeps alive. The key's revision at creation is the term's
//! **fencing token**: every write the leader makes goes through
//! [`Election::write`], a transaction that commits only while the leader key
//! still has that revision. A leader that lost its lease (partitioned,
//! paused, too slow to renew) and does not know it yet cannot write: its
//! token no longer matches, so two leaders' writes never interleave.
//!
//! A leader steps down by itself when it cannot renew for two thirds of the
//! lease TTL, before the lease can expire under it; the others watch the key
//! and try to take it as soon as it is gone. On a clean shutdown the leader
//! revokes its lease, so the next one takes over at once instead of after
//! the TTL. With the embedded registry the single replica leads.

use crate::store::{CasOutcome, Expect, Guard, Revision, Store, TxnOutcome, TxnWrite, WatchEvent};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// The registry key the leader holds.
pub const LEADER_KEY: &str = "/fedmesh/v1/leader";

/// Default lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Between attempts after a registry error.
const RETRY: Duration = Duration::from_millis(500);

/// One replica's term as leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// The leader key's revision: the fencing token of every write.
    pub token: Revision,
    /// Who leads.
    pub replica: String,
}

/// The leader key's value.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LeaderRecord {
    /// The replica's name.
    pub replica: String,
    /// When it took the lead (Unix ms).
    pub since_unix_ms: i64,
}

/// Why a leader's write did not land.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This replica does not lead (any more).
    #[error("this replica does not lead: {0}")]
    NotLeader(String),
    /// A condition of the write failed (the leader key's is reported as
    /// NotLeader).
    #[error("conflict on {0}")]
    Conflict(String),
    /// The registry failed.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

/// A replica's view of the election.
#[derive(Clone)]
pub struct Election {
    store: Arc<dyn Store>,
    term: watch::Receiver<Option<Term>>,
}

impl Election {
    /// The term this replica leads in, if it leads.
    pub fn term(&self) -> Option<Term> {
        self.term.borrow().clone()
    }

    /// Changes of leadership.
    pub fn watch(&self) -> watch::Receiver<Option<Term>> {
        self.term.clone()
    }

    /// Writes `writes` in one transaction fenced by `term`'s token: nothing
    /// lands unless the leader key still has that revision.
    pub async fn write(&self, term: &Term, writes: Vec<TxnWrite>) -> Result<Revision, WriteError> {
        let guard = Guard {
            key: LEADER_KEY.to_string(),
            expect: Expect::ModRevision(term.token),
        };
        match self.store.transact_guarded(vec![guard], writes).await? {
            TxnOutcome::Committed(rev) => Ok(rev),
            TxnOutcome::Conflict { key, current } if key == LEADER_KEY => {
                let now = current
                    .and_then(|kv| serde_json::from_slice::<LeaderRecord>(&kv.value).ok())
                    .map_or_else(|| "nobody".to_string(), |r| r.replica);
                Err(WriteError::NotLeader(format!(
                    "term {} is over; the leader is {now}",
                    term.token
                )))
            }
            TxnOutcome::Conflict { key, .. } => Err(WriteError::Conflict(key)),
        }
    }
}

/// Runs the election for `replica` until `stop` fires; returns the election
/// view at once (the work goes on in a task).
pub fn start(
    store: Arc<dyn Store>,
    replica: String,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) -> (Election, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let election = Election {
        store: store.clone(),
        term: rx,
    };
    let task = tokio::spawn(async move {
        campaign(store, replica, ttl, &tx, &mut stop).await;
        tx.send_replace(None);
    });
    (election, task)
}

async fn campaign(
    store: Arc<dyn Store>,
    replica: String,
    ttl: Duration,
    tx: &watch::Sender<Option<Term>>,
    stop: &mut watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let lease = match store.grant_lease(ttl).await {
            Ok(l) => l,
            Err(e) => {
                warn!("election: cannot get a lease: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let record = LeaderRecord {
            replica: replica.clone(),
            since_unix_ms: crate::registry::now_unix_ms(),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        match store.create_leased(LEADER_KEY, value, lease).await {
            Ok(CasOutcome::Swapped(token)) => {
                info!(replica = %replica, token, "leading");
                tx.send_replace(Some(Term {
                    token,
                    replica: replica.clone(),
                }));
                let stopping = tokio::select! {
                    () = hold(&*store, lease, ttl) => false,
                    _ = stop.wait_for(|s| *s) => true,
                };
                tx.send_replace(None);
                if stopping {
                    info!(replica = %replica, token, "stopping: handing the lead over");
                } else {
                    warn!(replica = %replica, token, "no longer leading");
                }
                // The next leader need not wait for the TTL.
                let _ = tokio::time::timeout(RETRY, store.revoke_lease(lease)).await;
            }
            Ok(CasOutcome::Conflict(current)) => {
                let _ = store.revoke_lease(lease).await;
                if let Some(kv) = current {
                    tokio::select! {
                        () = wait_for_release(&*store, kv.mod_revision, ttl) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                }
            }
            Err(e) => {
                let _ = store.revoke_lease(lease).await;
                warn!("election: {e}");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Keeps the lease alive; returns when it is lost, or when it could not be
/// renewed for two thirds of its TTL (it may be gone without our knowing).
async fn hold(store: &dyn Store, lease: crate::store::LeaseId, ttl: Duration) {
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 4).await;
        match tokio::time::timeout(ttl / 4, store.keep_alive(lease)).await {
            Ok(Ok(Some(_))) => renewed = Instant::now(),
            Ok(Ok(None)) => {
                warn!("election: the leader lease is gone");
                return;
            }
            Ok(Err(e)) if renewed.elapsed() < ttl * 2 / 3 => {
                warn!("election: cannot renew the leader lease yet: {e}");
            }
            Err(_) if renewed.elapsed() < ttl * 2 / 3 => {
                warn!("election: renewing the leader lease timed out");
            }
            _ => {
                warn!(
                    "election: could not renew the leader lease for 2/3 of its TTL; stepping down"
                );
                return;
            }
        }
    }
}

/// Waits until the leader key written at `rev` is gone (deleted or
/// expired), or for a TTL at most: then the caller tries again.
async fn wait_for_release(store: &dyn Store, rev: Revision, ttl: Duration) {
    let Ok(mut w) = store.watch(LEADER_KEY, rev + 1).await else {
        tokio::time::sleep(RETRY).await;
        return;
    };
    let deadline = tokio::time::sleep(ttl);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return,
            ev = w.next() => match ev {
                Some(WatchEvent::Events(evs))
                    if evs.iter().any(|e| matches!(e, crate::store::Event::Delete { key, .. } if key == LEADER_KEY)) => return,
                Some(WatchEvent::Compacted { .. }) | None => return,
                Some(_) => {}
            },
        }
    }
}
