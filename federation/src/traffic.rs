//! Global traffic in the registry: what operators set (weights, drains) and
//! what the leader computes (weights per calling cluster).
//!
//! ```text
//! /fedmesh/v1/traffic/<ns>/<service>   TrafficOverride: `meshctl weights set` (a lease when --ttl)
//! /fedmesh/v1/drain/<cluster>          Drain: `meshctl drain`
//! /fedmesh/v1/weights/<ns>/<service>   ComputedWeights: written by the leader only, fenced
//! ```

use crate::engine::Slot;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Computed weights.
pub const WEIGHTS_PREFIX: &str = "/fedmesh/v1/weights/";
/// Operator weights.
pub const OVERRIDE_PREFIX: &str = "/fedmesh/v1/traffic/";
/// Drained clusters.
pub const DRAIN_PREFIX: &str = "/fedmesh/v1/drain/";
/// Load reports: `<prefix><ns>/<service>/<cluster>/<endpoint id>`.
pub const LOAD_PREFIX: &str = "/fedmesh/v1/load/";

/// A report counts this long after it was made (three report intervals).
pub const LOAD_FRESH_MS: i64 = 15_000;
/// Gateways' probe reports: `<prefix><probing cluster>`.
pub const PROBES_PREFIX: &str = "/fedmesh/v1/probes/";
/// A probe report counts this long after it was made.
pub const PROBES_FRESH_MS: i64 = 10_000;

/// What a cluster's gateway found when it probed the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// By probed cluster.
    pub clusters: BTreeMap<String, ProbedCluster>,
    /// When (Unix ms).
    pub at_unix_ms: i64,
}

/// One probed cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbedCluster {
    /// Its gateway accepted a connection.
    pub gateway: bool,
    /// Exported services that did not answer through it (`ns/name`).
    #[serde(default)]
    pub unreachable: Vec<String>,
}

/// One endpoint's load, as its agent reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests per second served.
    pub inbound_qps: f64,
    /// Requests per second it can serve (0: not known).
    pub capacity_qps: f64,
    /// Requests per second its workload sent, by `namespace/service`.
    #[serde(default)]
    pub outbound: BTreeMap<String, f64>,
    /// When (Unix ms).
    pub at_unix_ms: i64,
}

/// What operator weights are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsBy {
    /// Cluster names.
    Cluster,
    /// Region names.
    Region,
}

/// `meshctl weights set`: operator weights for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficOverride {
    /// Keyed by cluster or by region.
    pub by: WeightsBy,
    /// Name to weight (relative; 0 sends nothing).
    pub weights: BTreeMap<String, u32>,
    /// Who set them.
    pub set_by: String,
    /// When (Unix ms).
    pub set_unix_ms: i64,
    /// When they revert by themselves (Unix ms), if set with a TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<i64>,
    /// Set past a guardrail with --force.
    #[serde(default)]
    pub forced: bool,
}

/// `meshctl drain`: a cluster taken out of every service's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Who drained it.
    pub by: String,
    /// Since when (Unix ms).
    pub since_unix_ms: i64,
}

/// The leader's weights for one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputedWeights {
    /// Calling cluster → destination cluster → weight (parts of
    /// [`crate::engine::TOTAL`]).
    pub callers: BTreeMap<String, BTreeMap<String, u32>>,
    /// What the engine remembers of the service per destination cluster
    /// (slow start, rebalancing), so that any replica can explain the
    /// weights.
    #[serde(default)]
    pub memory: BTreeMap<String, Slot>,
    /// When they were computed (Unix ms).
    pub computed_unix_ms: i64,
    /// The leader's fencing token.
    pub term: i64,
    /// The revision of the last operator change (weights set or cleared
    /// for the service, a drain or undrain) these weights were computed
    /// from: `meshctl ... --wait` waits for it to pass the change's.
    #[serde(default)]
    pub basis: i64,
}

/// Decodes a JSON value, naming the type when it is not one.
pub fn decode<T: serde::de::DeserializeOwned>(what: &str, value: &[u8]) -> Result<T, String> {
    serde_json::from_slice(value).map_err(|e| format!("not a valid {what}: {e}"))
}
