//! Replicas as one control plane: each replica records its Discovery
//! subscribers (what they ACKed, the root of their certificate) in the
//! registry under a lease of its own, so `meshctl status` and trust-rotation
//! gating on any replica see every replica's workloads. A replica that dies
//! stops renewing its lease; its rows expire with it, and its subscribers
//! reconnect to another replica, which records them there.
//!
//! Rows are written only on a shared registry (etcd): on the embedded
//! registry there is one replica, which serves the rows from memory.

use crate::grpc::discovery::{SubscriberInfo, Subscribers};
use crate::store::{LeaseId, Store};
use futures::StreamExt as _;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Where the rows live: `PREFIX<replica>/<connection id>`.
pub const PREFIX: &str = "/fedmesh/v1/subscribers/";

/// How often a replica writes what changed among its subscribers: the
/// delay before another replica sees an ACK.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(500);

/// Writes in flight at once while publishing.
const PARALLEL_WRITES: usize = 32;

/// One subscriber of one replica, as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubscriberRow {
    /// Node id it gave.
    pub node_id: String,
    /// Its cluster.
    pub cluster: String,
    /// Agent, gateway or CLI (the API's `NodeKind`).
    pub kind: i32,
    /// Last version sent.
    pub sent_version: i64,
    /// Last version ACKed.
    pub acked_version: i64,
    /// When it last ACKed (Unix ms).
    pub acked_unix_ms: i64,
    /// Last NACK's version (0: none).
    #[serde(default)]
    pub nack_version: i64,
    /// Last NACK's reason.
    #[serde(default)]
    pub nack_reason: String,
    /// The root its own certificate chains to.
    #[serde(default)]
    pub certificate_root: String,
}

impl From<&SubscriberInfo> for SubscriberRow {
    fn from(s: &SubscriberInfo) -> Self {
        Self {
            node_id: s.node_id.clone(),
            cluster: s.cluster.clone(),
            kind: s.kind,
            sent_version: s.sent_version,
            acked_version: s.acked_version,
            acked_unix_ms: s.acked_unix_ms,
            nack_version: s.nack.as_ref().map_or(0, |n| n.0),
            nack_reason: s.nack.as_ref().map(|n| n.1.clone()).unwrap_or_default(),
            certificate_root: s.certificate_root.clone(),
        }
    }
}

/// A replica name as a registry key segment: anything but letters, digits,
/// `.`, `_` and `-` becomes `_` (at most 253 characters).
pub fn key_segment(replica: &str) -> String {
    let s: String = replica
        .chars()
        .take(253)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

fn row_key(replica: &str, id: u64) -> String {
    format!("{PREFIX}{replica}/{id}")
}

/// Publishes `subscribers` as `replica`'s rows, under a lease of `ttl`
/// renewed every third of it, until the task is dropped. A lost lease (the
/// registry was away longer than `ttl`) is granted anew and every row
/// written again.
pub async fn publish(
    store: Arc<dyn Store>,
    replica: String,
    subscribers: Arc<Subscribers>,
    ttl: Duration,
) {
    let replica = key_segment(&replica);
    loop {
        let lease = match store.grant_lease(ttl).await {
            Ok(l) => l,
            Err(e) => {
                debug!("subscriber rows: no lease yet: {e}");
                tokio::time::sleep(PUBLISH_INTERVAL).await;
                continue;
            }
        };
        info!(%replica, lease = format!("{:x}", lease.0), "publishing this replica's subscribers");
        run(&store, &replica, &subscribers, lease, ttl).await;
    }
}

/// A row's ACKed version and ACK time change with every config version;
/// such a change alone is written at most this often per row (a new row, a
/// NACK or a new certificate root at once). Bounds the registry writes of a
/// replica with many subscribers under config churn.
pub const ROW_REFRESH: Duration = Duration::from_secs(5);

/// Does `new` differ from `old` in what must be seen at once?
fn urgent(old: &SubscriberRow, new: &SubscriberRow) -> bool {
    old.node_id != new.node_id
        || old.cluster != new.cluster
        || old.kind != new.kind
        || old.certificate_root != new.certificate_root
        || old.nack_version != new.nack_version
        || old.nack_reason != new.nack_reason
}

/// Publishes under `lease` until it is lost. The lease is renewed by a task
/// of its own, so slow writes never let it lapse.
async fn run(
    store: &Arc<dyn Store>,
    replica: &str,
    subscribers: &Subscribers,
    lease: LeaseId,
    ttl: Duration,
) {
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        // The store outlives this task: it is aborted below.
        let lost = lost.clone();
        let renew_every = (ttl / 3).max(PUBLISH_INTERVAL);
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(renew_every).await;
                match store.keep_alive(lease).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        lost.store(true, std::sync::atomic::Ordering::Release);
                        return;
                    }
                    Err(e) => debug!("subscriber rows: renewal failed: {e}"),
                }
            }
        })
    };
    let _stop_renewer = AbortOnDrop(renewer);
    let store: &dyn Store = &**store;
    let mut published: HashMap<u64, (SubscriberRow, tokio::time::Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if lost.load(std::sync::atomic::Ordering::Acquire) {
            warn!(%replica, "the subscriber rows' lease expired; writing them again under a new one");
            return;
        }
        let now_at = tokio::time::Instant::now();
        let now: HashMap<u64, SubscriberRow> = subscribers
            .snapshot()
            .iter()
            .map(|(id, s)| (*id, SubscriberRow::from(s)))
            .collect();
        let puts: Vec<(u64, SubscriberRow)> = now
            .iter()
            .filter(|(id, row)| match published.get(id) {
                None => true,
                Some((old, _)) if old == *row => false,
                Some((old, at)) => urgent(old, row) || now_at - *at >= ROW_REFRESH,
            })
            .map(|(id, row)| (*id, row.clone()))
            .collect();
        let gone: Vec<u64> = published
            .keys()
            .filter(|id| !now.contains_key(id))
            .copied()
            .collect();
        let writes = futures::stream::iter(puts.into_iter().map(|(id, row)| async move {
            let value = serde_json::to_vec(&row).unwrap_or_default();
            (
                id,
                Some(row),
                store.put(&row_key(replica, id), value, Some(lease)).await,
            )
        }))
        .buffer_unordered(PARALLEL_WRITES)
        .collect::<Vec<_>>()
        .await;
        let deletes = futures::stream::iter(gone.into_iter().map(|id| async move {
            (
                id,
                None,
                store.delete(&row_key(replica, id)).await.map(|_| 0),
            )
        }))
        .buffer_unordered(PARALLEL_WRITES)
        .collect::<Vec<_>>()
        .await;
        for (id, row, result) in writes.into_iter().chain(deletes) {
            match (result, row) {
                (Ok(_), Some(row)) => {
                    published.insert(id, (row, now_at));
                }
                (Ok(_), None) => {
                    published.remove(&id);
                }
                (Err(crate::store::Error::LeaseNotFound(_)), _) => {
                    warn!(%replica, "the subscriber rows' lease is gone; writing them again under a new one");
                    return;
                }
                (Err(e), _) => debug!("subscriber row {id}: {e}"),
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
