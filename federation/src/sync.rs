//! Keeps [`Shared`] in step with the registry: a full read, then a watch
//! from the next revision. A watch that loses its connection resumes by
//! itself (the store's job); one whose history was compacted away ends, and
//! we read everything again and publish the difference.

use crate::registry::ROOT;
use crate::state::Shared;
use crate::store::{Store, WatchEvent};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// Backoff between failed full reads: first and maximum. The maximum bounds
/// how stale the federation stays after the registry returns.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Runs until the task is aborted.
pub async fn run(store: Arc<dyn Store>, shared: Arc<Shared>) {
    let mut backoff = RETRY_MIN;
    loop {
        let range = match store.range(ROOT).await {
            Ok(r) => r,
            Err(e) => {
                shared.set_degraded(e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        backoff = RETRY_MIN;
        let from = range.revision + 1;
        shared.reload(&range);
        shared.set_reachable();
        debug!(
            revision = range.revision,
            keys = range.kvs.len(),
            "registry read in full"
        );
        let mut watch = match store.watch(ROOT, from).await {
            Ok(w) => w,
            Err(e) => {
                shared.set_degraded(e.to_string());
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        while let Some(ev) = watch.next().await {
            match ev {
                WatchEvent::Events(evs) => shared.apply(&evs),
                WatchEvent::Disconnected { reason } => shared.set_degraded(reason),
                WatchEvent::Reconnected => shared.set_reachable(),
                WatchEvent::Compacted { compact_revision } => {
                    warn!(
                        compact_revision,
                        revision = shared.read().revision(),
                        "registry history compacted past our revision; reading it in full again"
                    );
                    break;
                }
            }
        }
    }
}
