//! The weight engine: for every service and every calling cluster, how much
//! of the traffic each destination cluster gets.
//!
//! A pure function of its inputs ([`Inputs`]) and of what it carried from
//! the previous interval ([`Memory`]): no sockets, no clock (time is an
//! input), so it is tested with a simulator in virtual time.
//!
//! The rules (DESIGN.md, "Global traffic semantics"):
//!
//! * **Health** of a service in a cluster, as seen from the calling
//!   cluster: its ready endpoints over its endpoints, zero when the cluster
//!   is drained, when the caller's gateway probes find it (or the service
//!   behind it) unreachable, or when the cluster's heartbeat lapsed and the
//!   service's stale policy has withdrawn it. A cluster coming back (or
//!   undrained) is ramped up over the slow-start window.
//! * **Operator weights** (by cluster or by region) split traffic among the
//!   healthy clusters; an unhealthy cluster's share is redistributed to the
//!   others in proportion to theirs.
//! * Without them, **locality priorities**: the caller's own cluster, then
//!   the other clusters of its region, then the other regions in the
//!   service's failover order (then the rest, by name). A level whose
//!   healthy fraction is `h` takes `min(1, 1.4 h)` of what is left and the
//!   rest spills to the next level (Envoy's overprovisioning factor); when
//!   every level together cannot take it all, the levels' shares are scaled
//!   up to the whole.
//! * **Rebalancing** (when the service's policy asks for it) keeps
//!   utilization (QPS over capacity) within a tolerance across the active
//!   clusters: a cluster above the mean admits less of the traffic its
//!   locality would send it (the rest spills), one below admits more back,
//!   by at most a bounded step per interval, with hysteresis (start
//!   correcting outside the tolerance, stop inside half of it) and a floor.
//! * When no cluster is healthy, traffic goes to every cluster with
//!   endpoints, in proportion to them (panic mode): something may answer.
//!
//! Weights are integers in parts of [`TOTAL`] that sum exactly to it.

use mesh_core::name::{ClusterName, Region};
use mesh_core::service::ServiceKey;
use std::collections::{BTreeMap, BTreeSet};

/// The whole, in weight units (basis points).
pub const TOTAL: u32 = 10_000;

/// Envoy's overprovisioning factor: a level at 1/1.4 of its health still
/// takes all of its traffic.
pub const OVERPROVISIONING: f64 = 1.4;

/// A cluster as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterIn {
    /// Its region.
    pub region: Region,
    /// Since when its heartbeat has lapsed (virtual ms); `None`: live.
    pub unknown_since_ms: Option<u64>,
    /// Drained by an operator: no traffic.
    pub drained: bool,
}

/// A service in one cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceAt {
    /// Registered endpoints.
    pub endpoints: u32,
    /// Ready endpoints.
    pub ready: u32,
    /// Inbound requests per second, as the cluster's agents report them.
    pub qps: f64,
    /// Requests per second the cluster can serve (0: not reported).
    pub capacity: f64,
}

/// Operator weights.
#[derive(Debug, Clone, PartialEq)]
pub enum OperatorWeights {
    /// By cluster.
    Clusters(BTreeMap<ClusterName, u32>),
    /// By region: a region's share goes to its clusters in proportion to
    /// their ready endpoints.
    Regions(BTreeMap<Region, u32>),
}

/// What happens to a cluster whose heartbeat lapsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Keep routing to it as last known (its endpoints are kept).
    KeepLastKnown,
    /// Withdraw it after this long (ms).
    WithdrawAfterMs(u64),
}

/// The default stale policy: withdraw after 30 s, finite by design.
pub const DEFAULT_STALE: Stale = Stale::WithdrawAfterMs(30_000);

/// Rebalancing bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebalance {
    /// Utilization may differ from the mean by this fraction (0.1: ±10%).
    pub tolerance: f64,
    /// Most an admission moves in one interval.
    pub max_step: f64,
    /// Least admission of an active cluster.
    pub floor: f64,
    /// Admissions move at most once per interval (ms): load reports need
    /// time to show the last move.
    pub interval_ms: u64,
}

impl Default for Rebalance {
    fn default() -> Self {
        Self {
            tolerance: 0.1,
            max_step: 0.1,
            floor: 0.05,
            interval_ms: 10_000,
        }
    }
}

/// A service's traffic policy (fedmesh.io/v1 `TrafficWeights`, and the
/// operator's `meshctl weights set`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Operator weights, if any.
    pub weights: Option<OperatorWeights>,
    /// Regions in failover order.
    pub failover: Vec<Region>,
    /// Rebalancing, if on.
    pub rebalance: Option<Rebalance>,
    /// For clusters whose heartbeat lapsed.
    pub stale: Stale,
    /// A cluster coming back is ramped up over this long (ms); 0: at once.
    pub slow_start_ms: u64,
    /// Set from a TrafficWeights document (the first one for a service wins).
    pub from_document: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            weights: None,
            failover: Vec::new(),
            rebalance: None,
            stale: DEFAULT_STALE,
            slow_start_ms: 30_000,
            from_document: false,
        }
    }
}

/// A service: where it runs and its policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceIn {
    /// The clusters it has endpoints in.
    pub clusters: BTreeMap<ClusterName, ServiceAt>,
    /// Its policy.
    pub policy: Policy,
}

/// Everything the engine reads.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Virtual time (ms).
    pub now_ms: u64,
    /// Every cluster.
    pub clusters: BTreeMap<ClusterName, ClusterIn>,
    /// Every service.
    pub services: BTreeMap<ServiceKey, ServiceIn>,
    /// Probe failures: (probing cluster, probed cluster, the service
    /// probed through it or `None` for the gateway itself).
    pub unreachable: BTreeSet<(ClusterName, ClusterName, Option<ServiceKey>)>,
}

/// What the engine carries from one interval to the next, per (service,
/// cluster).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Memory {
    slots: BTreeMap<ServiceKey, BTreeMap<ClusterName, Slot>>,
    /// When each service's admissions last moved (ms).
    rebalanced: BTreeMap<ServiceKey, u64>,
}

/// What the engine remembers of a service in a cluster; carried in the
/// stored weights so that any replica can explain them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    /// When it last became healthy (for slow start); `None`: unhealthy.
    pub healthy_since_ms: Option<u64>,
    /// Share of its locality traffic it admits (rebalancing).
    pub admission: f64,
    /// Rebalancing is correcting it (hysteresis).
    pub correcting: bool,
}

impl Memory {
    /// What it remembers of `service`, by cluster.
    pub fn export(&self, service: &ServiceKey) -> BTreeMap<ClusterName, Slot> {
        self.slots.get(service).cloned().unwrap_or_default()
    }

    /// Takes `slots` back for `service` (from stored weights).
    pub fn import(&mut self, service: &ServiceKey, slots: BTreeMap<ClusterName, Slot>) {
        self.slots.insert(service.clone(), slots);
    }

    fn slot(&self, service: &ServiceKey, c: &ClusterName) -> Option<&Slot> {
        self.slots.get(service)?.get(c)
    }

    fn slot_mut(&mut self, service: &ServiceKey, c: &ClusterName) -> Option<&mut Slot> {
        self.slots.get_mut(service)?.get_mut(c)
    }
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            healthy_since_ms: None,
            admission: 1.0,
            correcting: false,
        }
    }
}

/// The weights of one service for one calling cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// Destination clusters and their weights (summing to [`TOTAL`];
    /// clusters with no traffic are left out).
    pub weights: BTreeMap<ClusterName, u32>,
    /// Why each number is what it is, a line per reason.
    pub explain: Vec<String>,
}

/// The engine's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Per service, per calling cluster.
    pub services: BTreeMap<ServiceKey, BTreeMap<ClusterName, Split>>,
}

/// One interval: updates `memory` and returns the table (without
/// explanations: [`explain`] makes them for one service on demand).
pub fn compute(inputs: &Inputs, memory: &mut Memory) -> Table {
    let mut table = Table::default();
    // Forget what no longer exists.
    memory.slots.retain(|s, per| {
        let Some(svc) = inputs.services.get(s) else {
            return false;
        };
        per.retain(|c, _| svc.clusters.contains_key(c));
        true
    });
    memory
        .rebalanced
        .retain(|s, _| inputs.services.contains_key(s));
    for (key, svc) in &inputs.services {
        update_memory(key, svc, inputs, memory);
        let mut per_caller = BTreeMap::new();
        for (caller, at) in &inputs.clusters {
            per_caller.insert(
                caller.clone(),
                split(key, svc, caller, at, inputs, memory, false),
            );
        }
        table.services.insert(key.clone(), per_caller);
    }
    table
}

/// The weights of `service` for every calling cluster, with why each number
/// is what it is, from `memory` as it stands (nothing is updated).
pub fn explain(
    inputs: &Inputs,
    memory: &Memory,
    service: &ServiceKey,
) -> BTreeMap<ClusterName, Split> {
    let Some(svc) = inputs.services.get(service) else {
        return BTreeMap::new();
    };
    inputs
        .clusters
        .iter()
        .map(|(caller, at)| {
            (
                caller.clone(),
                split(service, svc, caller, at, inputs, memory, true),
            )
        })
        .collect()
}

/// Why a cluster is unhealthy (formatted only when explaining).
enum Unhealthy<'a> {
    NotRegistered,
    Drained,
    Withdrawn { ago_s: u64, after_s: u64 },
    NotReady { ready: u32, endpoints: u32 },
    GatewayUnreachable(&'a ClusterName),
    ServiceUnreachable(&'a ClusterName),
}

impl std::fmt::Display for Unhealthy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotRegistered => write!(f, "not a registered cluster"),
            Self::Drained => write!(f, "drained"),
            Self::Withdrawn { ago_s, after_s } => write!(
                f,
                "heartbeat lapsed {ago_s} s ago; withdrawn after {after_s} s"
            ),
            Self::NotReady { ready, endpoints } => {
                write!(f, "{ready}/{endpoints} endpoints ready")
            }
            Self::GatewayUnreachable(from) => {
                write!(f, "its gateway is unreachable from {from}")
            }
            Self::ServiceUnreachable(from) => {
                write!(f, "the service is unreachable from {from}")
            }
        }
    }
}

/// Health of `c` for service `key` seen from `caller`, 0..=1, before slow
/// start and admission; with the reason when it is 0.
fn health<'a>(
    key: &ServiceKey,
    svc: &ServiceIn,
    c: &ClusterName,
    at: &ServiceAt,
    caller: Option<&'a ClusterName>,
    inputs: &Inputs,
) -> (f64, Option<Unhealthy<'a>>) {
    let Some(cl) = inputs.clusters.get(c) else {
        return (0.0, Some(Unhealthy::NotRegistered));
    };
    if cl.drained {
        return (0.0, Some(Unhealthy::Drained));
    }
    if let Some(since) = cl.unknown_since_ms {
        if let Stale::WithdrawAfterMs(after) = svc.policy.stale {
            let ago = inputs.now_ms.saturating_sub(since);
            if ago >= after {
                return (
                    0.0,
                    Some(Unhealthy::Withdrawn {
                        ago_s: ago / 1000,
                        after_s: after / 1000,
                    }),
                );
            }
        }
    }
    if at.endpoints == 0 || at.ready == 0 {
        return (
            0.0,
            Some(Unhealthy::NotReady {
                ready: at.ready,
                endpoints: at.endpoints,
            }),
        );
    }
    if let Some(from) = caller.filter(|_| !inputs.unreachable.is_empty()) {
        if inputs
            .unreachable
            .contains(&(from.clone(), c.clone(), None))
        {
            return (0.0, Some(Unhealthy::GatewayUnreachable(from)));
        }
        if inputs
            .unreachable
            .contains(&(from.clone(), c.clone(), Some(key.clone())))
        {
            return (0.0, Some(Unhealthy::ServiceUnreachable(from)));
        }
    }
    (f64::from(at.ready) / f64::from(at.endpoints), None)
}

/// Slow start and rebalancing state, once per interval per service.
fn update_memory(key: &ServiceKey, svc: &ServiceIn, inputs: &Inputs, memory: &mut Memory) {
    for (c, at) in &svc.clusters {
        let (h, _) = health(key, svc, c, at, None, inputs);
        // Slow start is for a cluster coming back: one seen for the first
        // time (a new service, a new cluster, a leader taking over without
        // memory) has been healthy for as long as anyone knows.
        let slot = memory
            .slots
            .entry(key.clone())
            .or_default()
            .entry(c.clone())
            .or_insert_with(|| Slot {
                healthy_since_ms: (h > 0.0).then_some(0),
                ..Slot::default()
            });
        match (h > 0.0, slot.healthy_since_ms) {
            (true, None) => slot.healthy_since_ms = Some(inputs.now_ms),
            (false, Some(_)) => {
                slot.healthy_since_ms = None;
                slot.admission = 1.0;
                slot.correcting = false;
            }
            _ => {}
        }
    }
    let Some(rb) = svc
        .policy
        .rebalance
        .filter(|_| svc.policy.weights.is_none())
    else {
        for c in svc.clusters.keys() {
            if let Some(s) = memory.slot_mut(key, c) {
                s.admission = 1.0;
                s.correcting = false;
            }
        }
        return;
    };
    // Utilization of the active clusters that report a capacity.
    let active: Vec<(&ClusterName, f64)> = svc
        .clusters
        .iter()
        .filter(|(c, at)| {
            at.capacity > 0.0
                && memory
                    .slot(key, c)
                    .is_some_and(|s| s.healthy_since_ms.is_some())
        })
        .map(|(c, at)| (c, at.qps / at.capacity))
        .collect();
    let (qps, cap) = svc
        .clusters
        .iter()
        .filter(|(c, _)| active.iter().any(|(a, _)| a == c))
        .fold((0.0, 0.0), |(q, k), (_, at)| (q + at.qps, k + at.capacity));
    if active.len() < 2 || cap <= 0.0 || qps <= 0.0 {
        return;
    }
    match memory.rebalanced.get(key) {
        Some(last) if inputs.now_ms.saturating_sub(*last) < rb.interval_ms => return,
        _ => {
            memory.rebalanced.insert(key.clone(), inputs.now_ms);
        }
    }
    let mean = qps / cap;
    for (c, u) in active {
        let Some(slot) = memory.slot_mut(key, c) else {
            continue;
        };
        let dev = u / mean - 1.0;
        if dev.abs() > rb.tolerance {
            slot.correcting = true;
        } else if dev.abs() < rb.tolerance / 2.0 {
            slot.correcting = false;
        }
        if !slot.correcting {
            continue;
        }
        // Toward the admission that would bring it to the mean, bounded.
        let target = if u > 0.0 {
            slot.admission * mean / u
        } else {
            1.0
        };
        let next = target.clamp(slot.admission - rb.max_step, slot.admission + rb.max_step);
        slot.admission = next.clamp(rb.floor, 1.0);
    }
}

/// One cluster's standing for one caller.
struct Candidate<'a> {
    name: &'a ClusterName,
    region: &'a Region,
    endpoints: f64,
    /// Ready fraction (0 when unhealthy): overprovisioned.
    health: f64,
    /// Slow start times admission: scales its traffic directly.
    factor: f64,
    why: Vec<String>,
}

impl Candidate<'_> {
    fn healthy(&self) -> bool {
        self.health > 0.0 && self.factor > 0.0
    }
}

fn candidates<'a>(
    key: &ServiceKey,
    svc: &'a ServiceIn,
    caller: &ClusterName,
    inputs: &'a Inputs,
    memory: &Memory,
    with_reasons: bool,
) -> Vec<Candidate<'a>> {
    let mut out = Vec::new();
    for (c, at) in &svc.clusters {
        let Some(cl) = inputs.clusters.get(c) else {
            continue;
        };
        let (h, reason) = health(key, svc, c, at, Some(caller), inputs);
        let mut why = Vec::new();
        let mut factor = 1.0;
        if with_reasons {
            match reason {
                Some(r) => why.push(format!("unhealthy: {r}")),
                None => why.push(format!("{}/{} endpoints ready", at.ready, at.endpoints)),
            }
        }
        let slot = memory.slot(key, c);
        if h > 0.0 {
            if let Some(since) = slot.and_then(|s| s.healthy_since_ms) {
                let window = svc.policy.slow_start_ms;
                let age = inputs.now_ms.saturating_sub(since);
                if window > 0 && age < window {
                    #[allow(clippy::cast_precision_loss)]
                    let ramp = (age as f64 / window as f64).max(0.1);
                    factor *= ramp;
                    if with_reasons {
                        why.push(format!("slow start: {:.0}% of its share", ramp * 100.0));
                    }
                }
            }
            if let Some(a) = slot.map(|s| s.admission).filter(|a| *a < 1.0) {
                factor *= a;
                if with_reasons {
                    why.push(format!(
                        "rebalancing: admits {:.0}% (utilization {:.2})",
                        a * 100.0,
                        if at.capacity > 0.0 {
                            at.qps / at.capacity
                        } else {
                            0.0
                        }
                    ));
                }
            }
        }
        out.push(Candidate {
            name: c,
            region: &cl.region,
            endpoints: f64::from(at.endpoints.max(1)),
            health: h,
            factor,
            why,
        });
    }
    out
}

fn split(
    key: &ServiceKey,
    svc: &ServiceIn,
    caller: &ClusterName,
    caller_at: &ClusterIn,
    inputs: &Inputs,
    memory: &Memory,
    with_reasons: bool,
) -> Split {
    let cands = candidates(key, svc, caller, inputs, memory, with_reasons);
    if cands.is_empty() {
        return Split {
            weights: BTreeMap::new(),
            explain: vec!["no cluster has endpoints of the service".into()],
        };
    }
    let mut explain = Vec::new();
    let shares: Vec<f64> = if !cands.iter().any(Candidate::healthy) {
        explain.push(
            "no cluster is healthy: every cluster with endpoints gets traffic in proportion to them (panic mode)".into(),
        );
        cands.iter().map(|c| c.endpoints).collect()
    } else if let Some(w) = operator_shares(svc, &cands, &mut explain, with_reasons) {
        w
    } else {
        locality_shares(svc, caller, caller_at, &cands, &mut explain, with_reasons)
    };
    let weights = round(&cands, &shares);
    if !with_reasons {
        return Split {
            weights,
            explain: Vec::new(),
        };
    }
    for c in &cands {
        let w = weights.get(c.name).copied().unwrap_or(0);
        explain.push(format!(
            "{}: {:.2}% ({})",
            c.name,
            f64::from(w) / f64::from(TOTAL) * 100.0,
            c.why.join("; ")
        ));
    }
    Split { weights, explain }
}

/// Operator weights over the candidates, an unhealthy cluster's share going
/// to the others in proportion; `None` when there are none, or none of the
/// weighted clusters is healthy (locality decides then).
fn operator_shares(
    svc: &ServiceIn,
    cands: &[Candidate<'_>],
    explain: &mut Vec<String>,
    say: bool,
) -> Option<Vec<f64>> {
    let weights = svc.policy.weights.as_ref()?;
    let base: Vec<f64> = match weights {
        OperatorWeights::Clusters(w) => cands
            .iter()
            .map(|c| f64::from(w.get(c.name).copied().unwrap_or(0)))
            .collect(),
        OperatorWeights::Regions(w) => {
            // A region's share, split among its clusters by ready endpoints.
            let mut in_region: BTreeMap<&Region, f64> = BTreeMap::new();
            for c in cands {
                *in_region.entry(c.region).or_default() += c.endpoints;
            }
            cands
                .iter()
                .map(|c| {
                    let r = f64::from(w.get(c.region).copied().unwrap_or(0));
                    r * c.endpoints / in_region.get(c.region).copied().unwrap_or(1.0)
                })
                .collect()
        }
    };
    let shares: Vec<f64> = base
        .iter()
        .zip(cands)
        .map(|(b, c)| b * (OVERPROVISIONING * c.health).min(1.0) * c.factor)
        .collect();
    if shares.iter().sum::<f64>() <= 0.0 {
        if !say {
            return None;
        }
        explain.push(
            "operator weights are set, but no weighted cluster is healthy: locality decides".into(),
        );
        return None;
    }
    if !say {
        return Some(shares);
    }
    let lost: f64 = base.iter().sum::<f64>() - shares.iter().sum::<f64>();
    explain.push(match weights {
        OperatorWeights::Clusters(w) => format!("operator weights by cluster: {}", list(w)),
        OperatorWeights::Regions(w) => format!("operator weights by region: {}", list(w)),
    });
    if lost > 0.0 {
        explain.push(
            "the share of unhealthy or ramping clusters goes to the others in proportion to theirs"
                .into(),
        );
    }
    Some(shares)
}

fn list<K: std::fmt::Display>(w: &BTreeMap<K, u32>) -> String {
    w.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Locality priorities with the overprovisioning rule.
fn locality_shares(
    svc: &ServiceIn,
    caller: &ClusterName,
    caller_at: &ClusterIn,
    cands: &[Candidate<'_>],
    explain: &mut Vec<String>,
    say: bool,
) -> Vec<f64> {
    // Levels: the caller's cluster; its region's others; then regions in
    // failover order; then the rest by name.
    let mut order: Vec<&Region> = vec![&caller_at.region];
    for r in &svc.policy.failover {
        if !order.contains(&r) {
            order.push(r);
        }
    }
    let regions: BTreeSet<&Region> = cands.iter().map(|c| c.region).collect();
    for r in regions {
        if !order.contains(&r) {
            order.push(r);
        }
    }
    let mut levels: Vec<(String, Vec<usize>)> = Vec::new();
    let own: Vec<usize> = (0..cands.len())
        .filter(|i| cands[*i].name == caller)
        .collect();
    if !own.is_empty() {
        levels.push((format!("its own cluster {caller}"), own));
    }
    for (n, r) in order.iter().enumerate() {
        let members: Vec<usize> = (0..cands.len())
            .filter(|i| cands[*i].region == *r && cands[*i].name != caller)
            .collect();
        if !members.is_empty() {
            let what = if n == 0 {
                format!("its region {r}")
            } else {
                format!("region {r}")
            };
            levels.push((what, members));
        }
    }
    let mut takes = Vec::with_capacity(levels.len());
    let mut left = 1.0_f64;
    for (what, members) in &levels {
        let total: f64 = members.iter().map(|i| cands[*i].endpoints).sum();
        let healthy: f64 = members
            .iter()
            .map(|i| cands[*i].endpoints * cands[*i].health)
            .sum();
        let weighted: f64 = members
            .iter()
            .map(|i| cands[*i].endpoints * cands[*i].health * cands[*i].factor)
            .sum();
        let h = if total > 0.0 { healthy / total } else { 0.0 };
        // Slow start and admission scale the level's take directly; health
        // is overprovisioned.
        let f = if healthy > 0.0 {
            weighted / healthy
        } else {
            0.0
        };
        let take = ((OVERPROVISIONING * h).min(1.0) * f).min(left);
        if say && (take > 0.0 || h > 0.0) {
            explain.push(format!(
                "level {}: {what}, healthy {:.0}%{}, takes {:.1}% of the traffic",
                takes.len(),
                h * 100.0,
                if f < 1.0 {
                    format!(", admitting {:.0}%", f * 100.0)
                } else {
                    String::new()
                },
                take * 100.0
            ));
        }
        takes.push(take);
        left -= take;
    }
    let sum: f64 = takes.iter().sum();
    if left > 1e-9 && sum > 0.0 {
        if say {
            explain.push(format!(
                "the levels can take only {:.1}% together: scaled up to the whole",
                sum * 100.0
            ));
        }
        for t in &mut takes {
            *t /= sum;
        }
    }
    let mut shares = vec![0.0; cands.len()];
    for ((_, members), take) in levels.iter().zip(takes) {
        let part = |i: usize| cands[i].endpoints * cands[i].health * cands[i].factor;
        let weighted: f64 = members.iter().map(|i| part(*i)).sum();
        if weighted <= 0.0 {
            continue;
        }
        for i in members {
            shares[*i] = take * part(*i) / weighted;
        }
    }
    shares
}

/// Shares to integer weights summing exactly to [`TOTAL`] (largest
/// remainder); zero weights are left out.
fn round(cands: &[Candidate<'_>], shares: &[f64]) -> BTreeMap<ClusterName, u32> {
    let sum: f64 = shares.iter().sum();
    if sum <= 0.0 {
        return BTreeMap::new();
    }
    let exact: Vec<f64> = shares.iter().map(|s| s / sum * f64::from(TOTAL)).collect();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let mut ints: Vec<u32> = exact.iter().map(|e| e.floor() as u32).collect();
    let given: u32 = ints.iter().sum();
    let mut order: Vec<usize> = (0..exact.len()).filter(|i| shares[*i] > 0.0).collect();
    order.sort_by(|a, b| {
        let ra = exact[*a] - exact[*a].floor();
        let rb = exact[*b] - exact[*b].floor();
        rb.total_cmp(&ra).then(a.cmp(b))
    });
    for i in order
        .iter()
        .cycle()
        .take(TOTAL.saturating_sub(given) as usize)
    {
        ints[*i] += 1;
    }
    cands
        .iter()
        .zip(ints)
        .filter(|(_, w)| *w > 0)
        .map(|(c, w)| (c.name.clone(), w))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
