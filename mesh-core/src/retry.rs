//! Bounds on retries, shared by the agent (which enforces them) and the
//! federation (which explains them in `meshctl weights explain`).
//!
//! Retries that cross to another cluster are what turns a regional outage
//! into a storm on the surviving region: every request to the lost region
//! comes back as one more request to the others. Each agent therefore
//! keeps, per destination service, a budget for them (as Linkerd budgets
//! all retries): over a sliding window, at most [`CROSS_CLUSTER_RATIO`] of
//! its requests to the service, plus [`CROSS_CLUSTER_MIN_PER_SECOND`] per
//! second so that a quiet service can still fail over. A short failover
//! (until outlier detection and the federation's weights move the traffic)
//! fits in what the window saved up; a lasting one is cut to the ratio.

use std::time::Duration;

/// Share of a service's requests that may be retried in another cluster.
pub const CROSS_CLUSTER_RATIO: f64 = 0.2;
/// Cross-cluster retries always allowed per second, whatever the ratio.
pub const CROSS_CLUSTER_MIN_PER_SECOND: u32 = 10;
/// The window the ratio is measured over.
pub const CROSS_CLUSTER_WINDOW: Duration = Duration::from_secs(10);

/// Envoy's retry budget defaults (DestinationRule `retryBudget`).
pub const BUDGET_PERCENT: f64 = 20.0;
/// Envoy's `min_retry_concurrency` default.
pub const BUDGET_MIN_CONCURRENCY: u32 = 3;

/// Envoy's base back-off between retries, when `retries.backoff` is unset.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// The cross-cluster budget in words, as `meshctl weights explain` shows it.
pub fn cross_cluster_explained() -> String {
    format!(
        "retries that cross to another cluster: at most {:.0}% of each agent's requests to the service over {} s, plus {} per second",
        CROSS_CLUSTER_RATIO * 100.0,
        CROSS_CLUSTER_WINDOW.as_secs(),
        CROSS_CLUSTER_MIN_PER_SECOND
    )
}
