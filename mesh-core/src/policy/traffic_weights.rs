//! `TrafficWeights` (`fedmesh.io/v1`): fedmesh's own policy for how a
//! service's traffic is spread over clusters and regions. The federation's
//! weight engine reads it; agents do not.
//!
//! ```yaml
//! apiVersion: fedmesh.io/v1
//! kind: TrafficWeights
//! metadata: {name: reviews, namespace: default}
//! spec:
//!   host: reviews
//!   weights:
//!     clusters: {us-east-1: 70, eu-west-1: 30}
//!   failover: [us-west, eu-west]
//!   slowStart: 30s
//!   stale: {withdrawAfter: 30s}
//! ```

use super::common::PolicyDuration;
use super::validate::Ctx;
use crate::name::{check_label, ClusterName, Region};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The `apiVersion`s accepted for [`Kind::TrafficWeights`](super::Kind::TrafficWeights).
pub const FEDMESH_API_VERSIONS: [&str; 1] = ["fedmesh.io/v1"];

/// Largest weight of one cluster or region.
pub const MAX_WEIGHT: u32 = 10_000;
/// `rebalance.tolerance` when unset.
pub const DEFAULT_REBALANCE_TOLERANCE: f64 = 0.1;
/// `rebalance.maxStep` when unset.
pub const DEFAULT_REBALANCE_MAX_STEP: f64 = 0.1;
/// `rebalance.floor` when unset.
pub const DEFAULT_REBALANCE_FLOOR: f64 = 0.05;
/// `rebalance.interval` when unset.
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest `rebalance.interval`.
pub const MIN_REBALANCE_INTERVAL: Duration = Duration::from_secs(1);
/// `slowStart` when unset.
pub const DEFAULT_SLOW_START: Duration = Duration::from_secs(30);
/// How long a cluster whose heartbeat lapsed keeps its traffic when `stale`
/// is unset.
pub const DEFAULT_WITHDRAW_AFTER: Duration = Duration::from_secs(30);

/// How one service's traffic is spread over clusters and regions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficWeights {
    /// The service, in the document's namespace: `reviews`,
    /// `reviews.<namespace>` or `reviews.<namespace>.svc.cluster.local`.
    #[serde(default)]
    pub host: String,
    /// Operator weights, by cluster or by region; absent: the engine decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightsBy>,
    /// Regions in failover order, after the caller's own region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
    /// QPS-based rebalancing: on when present (see
    /// [`TrafficWeights::rebalance_effective`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceSettings>,
    /// A recovering cluster is ramped up over this long; `0s` disables it.
    /// Default [`DEFAULT_SLOW_START`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<PolicyDuration>,
    /// What happens to a cluster whose heartbeat lapsed. Default: withdraw it
    /// after [`DEFAULT_WITHDRAW_AFTER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<StaleSettings>,
}

/// Operator weights: exactly one of `clusters` or `regions`. Each weight is
/// 0 to [`MAX_WEIGHT`], and at least one is above 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightsBy {
    /// Weights by cluster name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<BTreeMap<String, u32>>,
    /// Weights by region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<BTreeMap<String, u32>>,
}

/// Rebalancing bounds; unset fields take their defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RebalanceSettings {
    /// Utilization may differ from the mean by this fraction: `0 < x < 1`,
    /// default [`DEFAULT_REBALANCE_TOLERANCE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// Most an admission moves in one interval: `0 < x <= 1`, default
    /// [`DEFAULT_REBALANCE_MAX_STEP`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_step: Option<f64>,
    /// Least admission of an active cluster: `0 <= x < 1`, default
    /// [`DEFAULT_REBALANCE_FLOOR`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<f64>,
    /// Admissions move at most once per interval: at least 1s, default
    /// [`DEFAULT_REBALANCE_INTERVAL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<PolicyDuration>,
}

/// What happens to a cluster whose heartbeat lapsed: exactly one of
/// `keepLastKnown: true` or `withdrawAfter`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaleSettings {
    /// Keep routing to it as last known; must be `true` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last_known: Option<bool>,
    /// Withdraw it after this long (more than 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdraw_after: Option<PolicyDuration>,
}

/// The stale policy in effect ([`TrafficWeights::stale_effective`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleEffective {
    /// Keep routing to the cluster as last known.
    KeepLastKnown,
    /// Withdraw the cluster after this long.
    WithdrawAfter(Duration),
}

impl TrafficWeights {
    /// The service name: the first label of `host`.
    pub fn service(&self) -> &str {
        self.host.split('.').next().unwrap_or_default()
    }

    /// Operator weights by cluster, if set that way.
    pub fn weights_by_cluster(&self) -> Option<&BTreeMap<String, u32>> {
        self.weights.as_ref().and_then(|w| w.clusters.as_ref())
    }

    /// Operator weights by region, if set that way.
    pub fn weights_by_region(&self) -> Option<&BTreeMap<String, u32>> {
        self.weights.as_ref().and_then(|w| w.regions.as_ref())
    }

    /// Regions in failover order, after the caller's own (empty: none given).
    pub fn failover(&self) -> &[String] {
        &self.failover
    }

    /// Rebalancing with defaults filled in, as `(tolerance, max_step, floor,
    /// interval)`; `None` when `rebalance` is absent (rebalancing off).
    pub fn rebalance_effective(&self) -> Option<(f64, f64, f64, Duration)> {
        self.rebalance.as_ref().map(|r| {
            (
                r.tolerance.unwrap_or(DEFAULT_REBALANCE_TOLERANCE),
                r.max_step.unwrap_or(DEFAULT_REBALANCE_MAX_STEP),
                r.floor.unwrap_or(DEFAULT_REBALANCE_FLOOR),
                r.interval
                    .map_or(DEFAULT_REBALANCE_INTERVAL, PolicyDuration::get),
            )
        })
    }

    /// The slow-start window ([`DEFAULT_SLOW_START`] when unset;
    /// [`Duration::ZERO`]: disabled).
    pub fn slow_start_effective(&self) -> Duration {
        self.slow_start
            .map_or(DEFAULT_SLOW_START, PolicyDuration::get)
    }

    /// The stale policy in effect: withdraw after [`DEFAULT_WITHDRAW_AFTER`]
    /// when `stale` is unset.
    pub fn stale_effective(&self) -> StaleEffective {
        match &self.stale {
            Some(StaleSettings {
                keep_last_known: Some(true),
                ..
            }) => StaleEffective::KeepLastKnown,
            Some(StaleSettings {
                withdraw_after: Some(d),
                ..
            }) => StaleEffective::WithdrawAfter(d.get()),
            _ => StaleEffective::WithdrawAfter(DEFAULT_WITHDRAW_AFTER),
        }
    }
}

// === validation ===

impl TrafficWeights {
    pub(crate) fn validate(&self, c: &mut Ctx<'_>) {
        if self.host.is_empty() {
            c.error("spec.host", "is required");
        } else if let Err(r) = check_service_host(&self.host, c.namespace) {
            c.error("spec.host", r);
        }
        if let Some(w) = &self.weights {
            validate_weights(c, w);
            if self.rebalance.is_some() {
                c.warn(
                    "spec.rebalance",
                    "rebalancing applies only without operator weights; it is ignored while weights are set",
                );
            }
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, r) in self.failover.iter().enumerate() {
            let p = format!("spec.failover[{i}]");
            if let Err(e) = Region::new(r) {
                c.error(p, e.to_string());
            } else if let Some(first) = seen.get(r.as_str()) {
                c.error(
                    p,
                    format!("duplicate region {r:?} (first at spec.failover[{first}])"),
                );
            } else {
                seen.insert(r, i);
            }
        }
        if let Some(r) = &self.rebalance {
            validate_rebalance(c, r);
        }
        // slowStart: any non-negative duration (negative ones are refused
        // when decoding); 0s disables slow start.
        if let Some(s) = &self.stale {
            validate_stale(c, s);
        }
    }
}

/// A service of the document's namespace: `name`, `name.namespace` or
/// `name.namespace.svc.cluster.local`.
fn check_service_host(host: &str, namespace: &str) -> Result<(), String> {
    if host.contains('*') {
        return Err(format!(
            "invalid host {host:?}: wildcards are not allowed: name one service"
        ));
    }
    let labels: Vec<&str> = host.split('.').collect();
    let ns = match labels[..] {
        [_] => None,
        [_, ns] | [_, ns, "svc", "cluster", "local"] => Some(ns),
        _ => {
            return Err(format!(
                "invalid host {host:?}: must be a service of the document's namespace: \
                 name, name.namespace or name.namespace.svc.cluster.local"
            ))
        }
    };
    for label in &labels {
        check_label(label).map_err(|r| format!("invalid host {host:?}: {r}"))?;
    }
    match ns {
        Some(ns) if ns != namespace => Err(format!(
            "host {host:?} is in namespace {ns}: a TrafficWeights applies only to \
             services of its own namespace ({namespace})"
        )),
        _ => Ok(()),
    }
}

fn validate_weights(c: &mut Ctx<'_>, w: &WeightsBy) {
    match (&w.clusters, &w.regions) {
        (None, None) => c.error("spec.weights", "must set one of clusters or regions"),
        (Some(_), Some(_)) => c.error(
            "spec.weights",
            "must set only one of clusters or regions, got clusters and regions",
        ),
        _ => {}
    }
    if let Some(m) = &w.clusters {
        validate_weight_map(c, "spec.weights.clusters", "cluster", m, |k| {
            ClusterName::new(k).map(|_| ()).map_err(|e| e.to_string())
        });
    }
    if let Some(m) = &w.regions {
        validate_weight_map(c, "spec.weights.regions", "region", m, |k| {
            Region::new(k).map(|_| ()).map_err(|e| e.to_string())
        });
    }
}

fn validate_weight_map(
    c: &mut Ctx<'_>,
    path: &str,
    what: &str,
    m: &BTreeMap<String, u32>,
    check_key: impl Fn(&str) -> Result<(), String>,
) {
    if m.is_empty() {
        c.error(path, format!("must name at least one {what}"));
        return;
    }
    for (k, v) in m {
        let p = format!("{path}.{k}");
        if let Err(r) = check_key(k) {
            c.error(&p, r);
        }
        if *v > MAX_WEIGHT {
            c.error(
                &p,
                format!("weight must be between 0 and {MAX_WEIGHT}, got {v}"),
            );
        }
    }
    if m.values().all(|v| *v == 0) {
        c.error(path, "at least one weight must be greater than 0");
    }
}

fn validate_rebalance(c: &mut Ctx<'_>, r: &RebalanceSettings) {
    if let Some(v) = r.tolerance {
        if !(v > 0.0 && v < 1.0) {
            c.error(
                "spec.rebalance.tolerance",
                format!("must be greater than 0 and less than 1, got {v}"),
            );
        }
    }
    if let Some(v) = r.max_step {
        if !(v > 0.0 && v <= 1.0) {
            c.error(
                "spec.rebalance.maxStep",
                format!("must be greater than 0 and at most 1, got {v}"),
            );
        }
    }
    if let Some(v) = r.floor {
        if !(0.0..1.0).contains(&v) {
            c.error(
                "spec.rebalance.floor",
                format!("must be at least 0 and less than 1, got {v}"),
            );
        }
    }
    if let Some(d) = r.interval {
        if d.get() < MIN_REBALANCE_INTERVAL {
            c.error(
                "spec.rebalance.interval",
                format!("must be at least 1s, got {d}"),
            );
        }
    }
}

fn validate_stale(c: &mut Ctx<'_>, s: &StaleSettings) {
    match (s.keep_last_known, s.withdraw_after) {
        (None, None) => c.error(
            "spec.stale",
            "must set one of keepLastKnown: true or withdrawAfter",
        ),
        (Some(_), Some(_)) => c.error(
            "spec.stale",
            "must set only one of keepLastKnown or withdrawAfter, got keepLastKnown and withdrawAfter",
        ),
        _ => {}
    }
    if s.keep_last_known == Some(false) {
        c.error(
            "spec.stale.keepLastKnown",
            "must be true when set (omit stale for the default: withdraw after 30s)",
        );
    }
    if let Some(d) = s.withdraw_after {
        if d.get().is_zero() {
            c.error(
                "spec.stale.withdrawAfter",
                format!("must be greater than 0, got {d}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_hosts() {
        for ok in [
            "reviews",
            "reviews.default",
            "reviews.default.svc.cluster.local",
        ] {
            assert_eq!(check_service_host(ok, "default"), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("reviews.prod", "is in namespace prod"),
            ("reviews.prod.svc.cluster.local", "is in namespace prod"),
            ("Reviews", "lowercase"),
            ("reviews.default.svc", "must be a service"),
            ("reviews.example.com", "must be a service"),
            ("*.default", "wildcards"),
            ("a..b", "must be a service"),
            ("reviews.", "must not be empty"),
        ] {
            let e = check_service_host(bad, "default").unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults() {
        let tw = TrafficWeights {
            host: "reviews".into(),
            ..TrafficWeights::default()
        };
        assert_eq!(tw.service(), "reviews");
        assert_eq!(tw.weights_by_cluster(), None);
        assert_eq!(tw.weights_by_region(), None);
        assert!(tw.failover().is_empty());
        assert_eq!(tw.rebalance_effective(), None);
        assert_eq!(tw.slow_start_effective(), Duration::from_secs(30));
        assert_eq!(
            tw.stale_effective(),
            StaleEffective::WithdrawAfter(Duration::from_secs(30))
        );
        let on = TrafficWeights {
            rebalance: Some(RebalanceSettings::default()),
            ..tw
        };
        assert_eq!(
            on.rebalance_effective(),
            Some((0.1, 0.1, 0.05, Duration::from_secs(10)))
        );
    }
}
