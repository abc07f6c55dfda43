//! Endpoint leases: an endpoint a workload registered for itself lives on a
//! lease its agent renews (`RenewEndpoint`). When the lease lapses (the
//! agent died, or lost the federation for a whole TTL) the leader takes
//! the endpoint out of rotation by marking it unhealthy, and deletes it
//! once it has been lapsed for `--endpoint-gc-after`. A workload that comes
//! back registers again and is healthy at once.
//!
//! A leader that did not see a lease go (it found it gone when it first read
//! the registry) gives the workload one TTL from when it became leader to
//! register again, so a federation restart does not take every endpoint out
//! of rotation before the agents reconnect.
//! Both writes are compare-and-swap on the endpoint's revision: a
//! registration racing with them wins.

use crate::leader::Election;
use crate::registry::{now_unix_ms, Registry};
use crate::state::Shared;
use mesh_core::endpoint::Health;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often the leader looks for lapsed leases.
const SWEEP: Duration = Duration::from_millis(500);

/// Runs forever; acts only while this replica leads.
pub async fn reap(shared: Arc<Shared>, registry: Registry, election: Election, gc_after: Duration) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_since = None;
    loop {
        tick.tick().await;
        if election.term().is_none() {
            leading_since = None;
            continue;
        }
        let since = *leading_since.get_or_insert_with(now_unix_ms);
        if let Err(e) = sweep(&shared, &registry, gc_after, since).await {
            warn!("endpoint leases not swept: {e}");
        }
    }
}

/// One pass of a leader that has led since `leading_since` (Unix ms);
/// returns how many endpoints it marked or deleted.
pub async fn sweep(
    shared: &Shared,
    registry: &Registry,
    gc_after: Duration,
    leading_since: i64,
) -> crate::store::Result<usize> {
    let lapsed = shared.read().lapsed_endpoints();
    let now = now_unix_ms();
    let gc_ms = i64::try_from(gc_after.as_millis()).unwrap_or(i64::MAX);
    let mut acted = 0;
    for l in lapsed {
        let ttl_ms = i64::try_from(l.ttl_ms).unwrap_or(i64::MAX);
        // Not seen to go: the grace of one TTL from our lead.
        let since = l
            .since_unix_ms
            .unwrap_or_else(|| leading_since.saturating_add(ttl_ms));
        if now < since {
            continue;
        }
        let key = l.endpoint.key();
        let ttl = Duration::from_millis(l.ttl_ms);
        if now.saturating_sub(since) >= gc_ms {
            if registry.delete_endpoint_at(&key, l.revision).await? {
                info!(endpoint = %key, after = ?gc_after, "deleted an endpoint whose lease lapsed");
                acted += 1;
            }
        } else if l.endpoint.health == Health::Healthy {
            let mut ep = l.endpoint.clone();
            ep.health = Health::Unhealthy;
            if registry.mark_lapsed_endpoint(&ep, ttl, l.revision).await? {
                info!(endpoint = %key, "endpoint out of rotation: its workload stopped renewing its lease");
                acted += 1;
            }
        }
    }
    Ok(acted)
}
