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
    /// Per service, by cluster in name order (after an interval: exactly
    /// the service's clusters, so they line up without lookups).
    slots: BTreeMap<ServiceKey, Vec<(ClusterName, Slot)>>,
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
        self.slots
            .get(service)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Takes `slots` back for `service` (from stored weights).
    pub fn import(&mut self, service: &ServiceKey, slots: BTreeMap<ClusterName, Slot>) {
        self.slots
            .insert(service.clone(), slots.into_iter().collect());
    }

    /// Does `stored` (by cluster name) hold what it remembers of `service`?
    pub fn matches(&self, service: &ServiceKey, stored: &BTreeMap<String, Slot>) -> bool {
        let mine = self.slots.get(service).map_or(&[][..], Vec::as_slice);
        mine.len() == stored.len()
            && mine
                .iter()
                .zip(stored)
                .all(|((c, a), (n, b))| c.as_str() == n && a == b)
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

/// The weights of one service for one calling cluster, with why each number
/// is what it is ([`explain`] makes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// Destination clusters and their weights (summing to [`TOTAL`];
    /// clusters with no traffic are left out).
    pub weights: BTreeMap<ClusterName, u32>,
    /// Why each number is what it is, a line per reason.
    pub explain: Vec<String>,
}

/// The engine's output: every service's weights for every calling cluster.
///
/// Clusters are referred to by their index in [`Table::clusters`], and
/// callers that see a service alike share one split: at 10,000 services x
/// 20 clusters a table of named maps would be millions of small
/// allocations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Every cluster, in name order.
    pub clusters: Vec<ClusterName>,
    /// Per service.
    pub services: BTreeMap<ServiceKey, ServiceTable>,
    /// The distinct splits, one after the other: (destination index,
    /// weight), by index, a split's weights summing to [`TOTAL`] (or none:
    /// no cluster has endpoints).
    entries: Vec<(u32, u32)>,
    /// Per service, per calling cluster (by index), its split: (start,
    /// length) in `entries`.
    spans: Vec<(u32, u32)>,
}

/// Where one service's weights are in its [`Table`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceTable {
    /// Its first calling cluster's span.
    first: u32,
}

impl Table {
    /// The weights of `service` (of this table) for the caller at index
    /// `caller`: (destination index, weight), by index.
    pub fn row(&self, service: ServiceTable, caller: usize) -> &[(u32, u32)] {
        if caller >= self.clusters.len() {
            return &[];
        }
        self.spans
            .get(service.first as usize + caller)
            .and_then(|(start, len)| {
                self.entries
                    .get(*start as usize..(*start as usize).saturating_add(*len as usize))
            })
            .unwrap_or(&[])
    }

    /// The weights of `service` for a caller in `caller`, by destination.
    pub fn weights(
        &self,
        service: &ServiceKey,
        caller: &ClusterName,
    ) -> Option<BTreeMap<ClusterName, u32>> {
        let s = self.services.get(service)?;
        let i = self.clusters.binary_search(caller).ok()?;
        Some(self.named(self.row(*s, i)))
    }

    /// The weights of `service` for every calling cluster, by name.
    pub fn callers(
        &self,
        service: &ServiceKey,
    ) -> BTreeMap<ClusterName, BTreeMap<ClusterName, u32>> {
        let Some(s) = self.services.get(service) else {
            return BTreeMap::new();
        };
        self.clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), self.named(self.row(*s, i))))
            .collect()
    }

    /// A row with names.
    pub fn named(&self, row: &[(u32, u32)]) -> BTreeMap<ClusterName, u32> {
        row.iter()
            .filter_map(|(d, w)| Some((self.clusters.get(*d as usize)?.clone(), *w)))
            .collect()
    }

    /// How many (service, calling cluster) splits the table holds.
    pub fn splits(&self) -> usize {
        self.services.len() * self.clusters.len()
    }
}

/// One interval: updates `memory` and returns the table (without
/// explanations: [`explain`] makes them for one service on demand).
pub fn compute(inputs: &Inputs, memory: &mut Memory) -> Table {
    let ix = Index::new(inputs);
    let mut scratch = Scratch::default();
    let mut table = Table {
        clusters: ix.names.iter().map(|c| (*c).clone()).collect(),
        spans: Vec::with_capacity(inputs.services.len() * ix.names.len()),
        ..Table::default()
    };
    // The memory and the services are both in key order: walk them
    // together (what the memory has of services gone is dropped).
    let mut old = std::mem::take(&mut memory.slots).into_iter().peekable();
    let mut slots = Vec::with_capacity(inputs.services.len());
    let mut services = Vec::with_capacity(inputs.services.len());
    for (key, svc) in &inputs.services {
        while old.next_if(|(k, _)| k < key).is_some() {}
        let mut per = old
            .next_if(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_default();
        ix.indices(svc, &mut scratch.idx);
        update_memory(
            key,
            svc,
            &ix,
            &scratch.idx,
            &mut per,
            &mut memory.rebalanced,
        );
        services.push((
            key.clone(),
            service_table(key, svc, &ix, &per, &mut scratch, &mut table),
        ));
        slots.push((key.clone(), per));
    }
    memory.slots = slots.into_iter().collect();
    table.services = services.into_iter().collect();
    memory
        .rebalanced
        .retain(|s, _| inputs.services.contains_key(s));
    table
}

/// [`compute`] for one service only (a dry run of a change to it): updates
/// its memory and returns its weights for every calling cluster.
pub fn compute_service(
    inputs: &Inputs,
    memory: &mut Memory,
    service: &ServiceKey,
) -> BTreeMap<ClusterName, BTreeMap<ClusterName, u32>> {
    let Some(svc) = inputs.services.get(service) else {
        return BTreeMap::new();
    };
    let ix = Index::new(inputs);
    let mut scratch = Scratch::default();
    ix.indices(svc, &mut scratch.idx);
    let per = memory.slots.entry(service.clone()).or_default();
    update_memory(service, svc, &ix, &scratch.idx, per, &mut memory.rebalanced);
    let slots = &*per;
    let mut table = Table {
        clusters: ix.names.iter().map(|c| (*c).clone()).collect(),
        ..Table::default()
    };
    let t = service_table(service, svc, &ix, slots, &mut scratch, &mut table);
    table.services.insert(service.clone(), t);
    table.callers(service)
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
    let ix = Index::new(inputs);
    let slots = memory.slots.get(service).map_or(&[][..], Vec::as_slice);
    let mut idx = Vec::new();
    ix.indices(svc, &mut idx);
    let mut base = Vec::new();
    destinations(svc, &ix, &idx, slots, &mut base);
    let failover: Vec<u32> = svc
        .policy
        .failover
        .iter()
        .filter_map(|r| ix.region(r))
        .collect();
    let mut work = Work::default();
    let mut row = Vec::new();
    (0..ix.names.len())
        .map(|caller| {
            let name = ix.names[caller].clone();
            if base.is_empty() {
                return (
                    name,
                    Split {
                        weights: BTreeMap::new(),
                        explain: vec!["no cluster has endpoints of the service".into()],
                    },
                );
            }
            let mut cands = base.clone();
            let mut probe_reason = vec![None; cands.len()];
            if ix.probing[caller] {
                for (c, r) in cands.iter_mut().zip(&mut probe_reason) {
                    *r = ix.probe(as_index(caller), c.idx, service);
                    if r.is_some() {
                        c.health = 0.0;
                    }
                }
            }
            let mut say = Say { lines: Vec::new() };
            shares(
                svc,
                &ix,
                &failover,
                as_index(caller),
                &cands,
                &mut work,
                Some(&mut say),
            );
            round(&cands, &mut work, &mut row);
            let weights: BTreeMap<ClusterName, u32> = row
                .iter()
                .map(|(d, w)| (ix.names[*d as usize].clone(), *w))
                .collect();
            for (c, probe) in cands.iter().zip(probe_reason) {
                let cname = ix.names[c.idx as usize];
                let at = svc.clusters.get(cname).cloned().unwrap_or_default();
                let mut why = Vec::new();
                let (_, reason) = base_health(svc, ix.clusters[c.idx as usize], &at, inputs.now_ms);
                match probe.or(reason) {
                    Some(r) => why.push(format!("unhealthy: {r}")),
                    None => why.push(format!("{}/{} endpoints ready", at.ready, at.endpoints)),
                }
                if c.health > 0.0 {
                    let slot = slot_of(slots, cname);
                    let (ramp, admission) = ramp_and_admission(svc, slot, inputs.now_ms);
                    if let Some(r) = ramp {
                        why.push(format!("slow start: {:.0}% of its share", r * 100.0));
                    }
                    if let Some(a) = admission {
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
                let w = weights.get(cname).copied().unwrap_or(0);
                say.lines.push(format!(
                    "{cname}: {:.2}% ({})",
                    f64::from(w) / f64::from(TOTAL) * 100.0,
                    why.join("; ")
                ));
            }
            (
                name,
                Split {
                    weights,
                    explain: say.lines,
                },
            )
        })
        .collect()
}

/// A cluster index as stored (the mesh has far fewer than 2^32 clusters).
fn as_index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// The inputs' clusters, regions and probe failures by index, made once per
/// computation so that the per-caller work compares integers, not names.
struct Index<'a> {
    now_ms: u64,
    /// Every cluster, in name order.
    names: Vec<&'a ClusterName>,
    clusters: Vec<&'a ClusterIn>,
    /// The region (index) of each cluster.
    region_of: Vec<u32>,
    /// Every region, in name order.
    regions: Vec<&'a Region>,
    /// Probe failures by (probing, probed) cluster: an index into
    /// `failures` at `probing * clusters + probed`.
    unreachable: Vec<Option<u32>>,
    failures: Vec<Unreachable<'a>>,
    /// Clusters whose gateway found something unreachable.
    probing: Vec<bool>,
}

#[derive(Default)]
struct Unreachable<'a> {
    /// The probed cluster's gateway itself.
    gateway: bool,
    /// Services behind it.
    services: Vec<&'a ServiceKey>,
}

impl<'a> Index<'a> {
    fn new(inputs: &'a Inputs) -> Self {
        let names: Vec<&ClusterName> = inputs.clusters.keys().collect();
        let clusters: Vec<&ClusterIn> = inputs.clusters.values().collect();
        let regions: Vec<&Region> = clusters
            .iter()
            .map(|c| &c.region)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let region_of = clusters
            .iter()
            .map(|c| as_index(regions.binary_search(&&c.region).unwrap_or(0)))
            .collect();
        let mut ix = Self {
            now_ms: inputs.now_ms,
            probing: vec![false; names.len()],
            unreachable: if inputs.unreachable.is_empty() {
                Vec::new()
            } else {
                vec![None; names.len() * names.len()]
            },
            failures: Vec::new(),
            names,
            clusters,
            region_of,
            regions,
        };
        for (from, to, svc) in &inputs.unreachable {
            let (Some(f), Some(t)) = (ix.cluster(from), ix.cluster(to)) else {
                continue;
            };
            let at = f as usize * ix.names.len() + t as usize;
            let i = match ix.unreachable[at] {
                Some(i) => i as usize,
                None => {
                    ix.unreachable[at] = Some(as_index(ix.failures.len()));
                    ix.failures.push(Unreachable::default());
                    ix.failures.len() - 1
                }
            };
            let u = &mut ix.failures[i];
            match svc {
                None => u.gateway = true,
                Some(s) => u.services.push(s),
            }
            ix.probing[f as usize] = true;
        }
        ix
    }

    /// The index of each of `svc`'s clusters (`None`: not registered), in
    /// its order: one walk of both sorted lists.
    fn indices(&self, svc: &ServiceIn, out: &mut Vec<Option<u32>>) {
        out.clear();
        let mut next = 0;
        for c in svc.clusters.keys() {
            let found = self.names[next..]
                .iter()
                .position(|n| *n >= c)
                .map(|p| next + p)
                .filter(|i| self.names[*i] == c);
            if let Some(i) = found {
                next = i + 1;
            }
            out.push(found.map(as_index));
        }
    }

    fn cluster(&self, c: &ClusterName) -> Option<u32> {
        self.names.binary_search(&c).ok().map(as_index)
    }

    fn region(&self, r: &Region) -> Option<u32> {
        self.regions.binary_search(&r).ok().map(as_index)
    }

    /// Why `to` is unreachable from `from` for `svc`, if it is.
    fn probe(&self, from: u32, to: u32, svc: &ServiceKey) -> Option<Unhealthy<'a>> {
        let i = (*self
            .unreachable
            .get(from as usize * self.names.len() + to as usize)?)?;
        let u = &self.failures[i as usize];
        let name = self.names[from as usize];
        if u.gateway {
            Some(Unhealthy::GatewayUnreachable(name))
        } else if u.services.contains(&svc) {
            Some(Unhealthy::ServiceUnreachable(name))
        } else {
            None
        }
    }
}

/// Why a cluster is unhealthy (formatted only when explaining).
#[derive(Clone, Copy)]
enum Unhealthy<'a> {
    Drained,
    Withdrawn { ago_s: u64, after_s: u64 },
    NotReady { ready: u32, endpoints: u32 },
    GatewayUnreachable(&'a ClusterName),
    ServiceUnreachable(&'a ClusterName),
}

impl std::fmt::Display for Unhealthy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
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

/// Health of a service in cluster `cl`, 0..=1, whoever calls (probe
/// failures are the caller's, applied after); with the reason when it is 0.
fn base_health(
    svc: &ServiceIn,
    cl: &ClusterIn,
    at: &ServiceAt,
    now_ms: u64,
) -> (f64, Option<Unhealthy<'static>>) {
    if cl.drained {
        return (0.0, Some(Unhealthy::Drained));
    }
    if let Some(since) = cl.unknown_since_ms {
        if let Stale::WithdrawAfterMs(after) = svc.policy.stale {
            let ago = now_ms.saturating_sub(since);
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
    (f64::from(at.ready) / f64::from(at.endpoints), None)
}

/// Slow start and rebalancing state, once per interval per service: `per`
/// (its slots) lined up with its clusters. `idx`: their indices
/// ([`Index::indices`]).
fn update_memory(
    key: &ServiceKey,
    svc: &ServiceIn,
    ix: &Index<'_>,
    idx: &[Option<u32>],
    per: &mut Vec<(ClusterName, Slot)>,
    rebalanced: &mut BTreeMap<ServiceKey, u64>,
) {
    let healthy = |at: &ServiceAt, i: &Option<u32>| {
        i.is_some_and(|i| base_health(svc, ix.clusters[i as usize], at, ix.now_ms).0 > 0.0)
    };
    // Usually the service is where it was: its slots line up with its
    // clusters and none is looked up.
    let mut aligned = per.len() == svc.clusters.len();
    if aligned {
        for (((c, at), i), (n, slot)) in svc.clusters.iter().zip(idx).zip(per.iter_mut()) {
            if n != c {
                aligned = false;
                break;
            }
            update_slot(slot, healthy(at, i), ix.now_ms);
        }
    }
    if !aligned {
        // Line them up: the service's clusters, each with what was
        // remembered of it. (Slots updated above are updated again: that
        // changes nothing.)
        // (Names are shared, `Arc`: cloning them allocates nothing.)
        let old = std::mem::take(per);
        *per = svc
            .clusters
            .iter()
            .zip(idx)
            .map(|((c, at), i)| {
                let h = healthy(at, i);
                // Slow start is for a cluster coming back: one seen for the
                // first time (a new service, a new cluster, a leader taking
                // over without memory) has been healthy for as long as
                // anyone knows.
                let mut slot = old.binary_search_by(|(n, _)| n.cmp(c)).map_or_else(
                    |_| Slot {
                        healthy_since_ms: h.then_some(0),
                        ..Slot::default()
                    },
                    |j| old[j].1.clone(),
                );
                update_slot(&mut slot, h, ix.now_ms);
                (c.clone(), slot)
            })
            .collect();
    }
    let Some(rb) = svc
        .policy
        .rebalance
        .filter(|_| svc.policy.weights.is_none())
    else {
        for (_, s) in per.iter_mut() {
            s.admission = 1.0;
            s.correcting = false;
        }
        return;
    };
    // Utilization of the active clusters that report a capacity (by their
    // position: the slots line up with the clusters now).
    let active: Vec<(usize, f64, f64, f64)> = svc
        .clusters
        .values()
        .zip(per.iter())
        .enumerate()
        .filter(|(_, (at, (_, s)))| at.capacity > 0.0 && s.healthy_since_ms.is_some())
        .map(|(j, (at, _))| (j, at.qps / at.capacity, at.qps, at.capacity))
        .collect();
    let (qps, cap) = active
        .iter()
        .fold((0.0, 0.0), |(q, k), (_, _, aq, ak)| (q + aq, k + ak));
    if active.len() < 2 || cap <= 0.0 || qps <= 0.0 {
        return;
    }
    match rebalanced.get(key) {
        Some(last) if ix.now_ms.saturating_sub(*last) < rb.interval_ms => return,
        _ => {
            rebalanced.insert(key.clone(), ix.now_ms);
        }
    }
    let mean = qps / cap;
    for (j, u, _, _) in active {
        let Some((_, slot)) = per.get_mut(j) else {
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

/// A slot's health history after this interval.
fn update_slot(slot: &mut Slot, healthy: bool, now_ms: u64) {
    match (healthy, slot.healthy_since_ms) {
        (true, None) => slot.healthy_since_ms = Some(now_ms),
        (false, Some(_)) => {
            slot.healthy_since_ms = None;
            slot.admission = 1.0;
            slot.correcting = false;
        }
        _ => {}
    }
}

/// Slow start's ramp (when ramping) and rebalancing's admission (when
/// below 1) of a healthy cluster.
fn ramp_and_admission(
    svc: &ServiceIn,
    slot: Option<&Slot>,
    now_ms: u64,
) -> (Option<f64>, Option<f64>) {
    let ramp = slot.and_then(|s| s.healthy_since_ms).and_then(|since| {
        let window = svc.policy.slow_start_ms;
        let age = now_ms.saturating_sub(since);
        #[allow(clippy::cast_precision_loss)]
        (window > 0 && age < window).then(|| (age as f64 / window as f64).max(0.1))
    });
    let admission = slot.map(|s| s.admission).filter(|a| *a < 1.0);
    (ramp, admission)
}

/// A destination cluster's standing, before the caller's probe failures.
#[derive(Debug, Clone, Copy)]
struct Cand {
    idx: u32,
    region: u32,
    endpoints: f64,
    /// Ready fraction (0 when unhealthy): overprovisioned.
    health: f64,
    /// Slow start times admission: scales its traffic directly.
    factor: f64,
    /// Its operator weight (0 without operator weights).
    operator: f64,
}

impl Cand {
    fn healthy(&self) -> bool {
        self.health > 0.0 && self.factor > 0.0
    }
}

fn slot_of<'s>(slots: &'s [(ClusterName, Slot)], c: &ClusterName) -> Option<&'s Slot> {
    slots
        .binary_search_by(|(n, _)| n.cmp(c))
        .ok()
        .map(|j| &slots[j].1)
}

/// The service's registered destinations, in name order, with what no
/// caller changes: health, slow start and admission, operator weight.
fn destinations(
    svc: &ServiceIn,
    ix: &Index<'_>,
    idx: &[Option<u32>],
    slots: &[(ClusterName, Slot)],
    out: &mut Vec<Cand>,
) {
    out.clear();
    // The slots usually line up with the clusters (see `update_memory`).
    let aligned = slots.len() == svc.clusters.len();
    for (j, ((c, at), i)) in svc.clusters.iter().zip(idx).enumerate() {
        let slot = match slots.get(j).filter(|(n, _)| aligned && n == c) {
            Some((_, s)) => Some(s),
            None => slot_of(slots, c),
        };
        let Some(idx) = *i else {
            continue;
        };
        let (health, _) = base_health(svc, ix.clusters[idx as usize], at, ix.now_ms);
        let (ramp, admission) = ramp_and_admission(svc, slot, ix.now_ms);
        out.push(Cand {
            idx,
            region: ix.region_of[idx as usize],
            endpoints: f64::from(at.endpoints.max(1)),
            health,
            factor: ramp.unwrap_or(1.0) * admission.unwrap_or(1.0),
            operator: 0.0,
        });
    }
    match &svc.policy.weights {
        None => {}
        Some(OperatorWeights::Clusters(w)) => {
            for c in out.iter_mut() {
                c.operator = f64::from(w.get(ix.names[c.idx as usize]).copied().unwrap_or(0));
            }
        }
        Some(OperatorWeights::Regions(w)) => {
            // A region's share, split among its clusters by endpoints.
            let mut in_region = vec![0.0; ix.regions.len()];
            for c in out.iter() {
                in_region[c.region as usize] += c.endpoints;
            }
            for c in out.iter_mut() {
                let r = f64::from(w.get(ix.regions[c.region as usize]).copied().unwrap_or(0));
                c.operator = r * c.endpoints / in_region[c.region as usize];
            }
        }
    }
}

/// Buffers reused from one split to the next.
#[derive(Default)]
struct Scratch {
    /// The service's clusters' indices.
    idx: Vec<Option<u32>>,
    base: Vec<Cand>,
    cands: Vec<Cand>,
    failover: Vec<u32>,
    /// Per region: the split a caller there shares, if made.
    by_region: Vec<Option<(u32, u32)>>,
    row: Vec<(u32, u32)>,
    work: Work,
}

#[derive(Default)]
struct Work {
    shares: Vec<f64>,
    order: Vec<u32>,
    levels: Vec<Level>,
    exact: Vec<f64>,
    ints: Vec<u32>,
    rank: Vec<usize>,
}

/// A locality level: the caller's own cluster, or a region's clusters
/// (the caller's excepted).
#[derive(Debug, Clone, Copy)]
struct Level {
    own: bool,
    region: u32,
    take: f64,
    weighted: f64,
}

impl Level {
    fn has(&self, c: &Cand, caller: u32) -> bool {
        if self.own {
            c.idx == caller
        } else {
            c.region == self.region && c.idx != caller
        }
    }
}

/// Explanation lines.
struct Say {
    lines: Vec<String>,
}

fn service_table(
    key: &ServiceKey,
    svc: &ServiceIn,
    ix: &Index<'_>,
    slots: &[(ClusterName, Slot)],
    s: &mut Scratch,
    table: &mut Table,
) -> ServiceTable {
    destinations(svc, ix, &s.idx, slots, &mut s.base);
    s.failover.clear();
    s.failover
        .extend(svc.policy.failover.iter().filter_map(|r| ix.region(r)));
    s.by_region.clear();
    s.by_region.resize(ix.regions.len(), None);
    let first = as_index(table.spans.len());
    for caller in 0..ix.names.len() {
        let ci = as_index(caller);
        let region = ix.region_of[caller] as usize;
        // A caller with no endpoints of its own and no probe failure sees
        // the service as every such caller of its region does.
        // Probe failures count only if they concern this service.
        let probing =
            ix.probing[caller] && s.base.iter().any(|c| ix.probe(ci, c.idx, key).is_some());
        let shared = !probing && !s.base.iter().any(|c| c.idx == ci);
        if shared {
            if let Some(span) = s.by_region[region] {
                table.spans.push(span);
                continue;
            }
        }
        s.row.clear();
        if let Some(own) = sole_destination(svc, &s.base, ci).filter(|_| !probing) {
            // The caller's own cluster takes everything: its level's take
            // is whole and nothing spills (the locality rule, shortened).
            s.row.push((own, TOTAL));
        } else if !s.base.is_empty() {
            s.cands.clear();
            s.cands.extend_from_slice(&s.base);
            if probing {
                for c in &mut s.cands {
                    if ix.probe(ci, c.idx, key).is_some() {
                        c.health = 0.0;
                    }
                }
            }
            shares(svc, ix, &s.failover, ci, &s.cands, &mut s.work, None);
            round(&s.cands, &mut s.work, &mut s.row);
        }
        let span = (as_index(table.entries.len()), as_index(s.row.len()));
        table.entries.extend_from_slice(&s.row);
        if shared {
            s.by_region[region] = Some(span);
        }
        table.spans.push(span);
    }
    ServiceTable { first }
}

/// The caller's own cluster when, by locality, it takes all the traffic:
/// healthy enough that overprovisioning makes it whole, not ramping or
/// admitting less, and no operator weights.
fn sole_destination(svc: &ServiceIn, cands: &[Cand], caller: u32) -> Option<u32> {
    if svc.policy.weights.is_some() {
        return None;
    }
    let own = cands.iter().find(|c| c.idx == caller)?;
    (OVERPROVISIONING * own.health >= 1.0 && own.factor >= 1.0).then_some(own.idx)
}

/// The shares of `cands` (into `w.shares`) for a caller at index `caller`.
fn shares(
    svc: &ServiceIn,
    ix: &Index<'_>,
    failover: &[u32],
    caller: u32,
    cands: &[Cand],
    w: &mut Work,
    mut say: Option<&mut Say>,
) {
    w.shares.clear();
    if !cands.iter().any(Cand::healthy) {
        if let Some(s) = say {
            s.lines.push(
                "no cluster is healthy: every cluster with endpoints gets traffic in proportion to them (panic mode)".into(),
            );
        }
        w.shares.extend(cands.iter().map(|c| c.endpoints));
        return;
    }
    if operator_shares(svc, cands, w, say.as_deref_mut()) {
        return;
    }
    locality_shares(ix, failover, caller, cands, w, say);
}

/// Operator weights over the candidates, an unhealthy cluster's share going
/// to the others in proportion; false when there are none, or none of the
/// weighted clusters is healthy (locality decides then).
fn operator_shares(svc: &ServiceIn, cands: &[Cand], w: &mut Work, say: Option<&mut Say>) -> bool {
    let Some(weights) = &svc.policy.weights else {
        return false;
    };
    w.shares.clear();
    w.shares.extend(
        cands
            .iter()
            .map(|c| c.operator * (OVERPROVISIONING * c.health).min(1.0) * c.factor),
    );
    let sum: f64 = w.shares.iter().sum();
    if sum <= 0.0 {
        w.shares.clear();
        if let Some(s) = say {
            s.lines.push(
                "operator weights are set, but no weighted cluster is healthy: locality decides"
                    .into(),
            );
        }
        return false;
    }
    let Some(s) = say else {
        return true;
    };
    let lost: f64 = cands.iter().map(|c| c.operator).sum::<f64>() - sum;
    s.lines.push(match weights {
        OperatorWeights::Clusters(w) => format!("operator weights by cluster: {}", list(w)),
        OperatorWeights::Regions(w) => format!("operator weights by region: {}", list(w)),
    });
    if lost > 0.0 {
        s.lines.push(
            "the share of unhealthy or ramping clusters goes to the others in proportion to theirs"
                .into(),
        );
    }
    true
}

fn list<K: std::fmt::Display>(w: &BTreeMap<K, u32>) -> String {
    w.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Locality priorities with the overprovisioning rule.
fn locality_shares(
    ix: &Index<'_>,
    failover: &[u32],
    caller: u32,
    cands: &[Cand],
    w: &mut Work,
    mut say: Option<&mut Say>,
) {
    // Levels: the caller's cluster; its region's others; then regions in
    // failover order; then the rest by name (region indices are in name
    // order).
    w.order.clear();
    w.order.push(ix.region_of[caller as usize]);
    for r in failover {
        if !w.order.contains(r) {
            w.order.push(*r);
        }
    }
    for r in 0..as_index(ix.regions.len()) {
        if !w.order.contains(&r) && cands.iter().any(|c| c.region == r) {
            w.order.push(r);
        }
    }
    w.levels.clear();
    if cands.iter().any(|c| c.idx == caller) {
        w.levels.push(Level {
            own: true,
            region: 0,
            take: 0.0,
            weighted: 0.0,
        });
    }
    for r in &w.order {
        if cands.iter().any(|c| c.region == *r && c.idx != caller) {
            w.levels.push(Level {
                own: false,
                region: *r,
                take: 0.0,
                weighted: 0.0,
            });
        }
    }
    let mut left = 1.0_f64;
    let mut sum = 0.0;
    for (n, level) in w.levels.iter_mut().enumerate() {
        let (mut total, mut healthy, mut weighted) = (0.0, 0.0, 0.0);
        for c in cands.iter().filter(|c| level.has(c, caller)) {
            total += c.endpoints;
            healthy += c.endpoints * c.health;
            weighted += c.endpoints * c.health * c.factor;
        }
        let h = if total > 0.0 { healthy / total } else { 0.0 };
        // Slow start and admission scale the level's take directly; health
        // is overprovisioned.
        let f = if healthy > 0.0 {
            weighted / healthy
        } else {
            0.0
        };
        let take = ((OVERPROVISIONING * h).min(1.0) * f).min(left);
        if let Some(s) = say.as_deref_mut().filter(|_| take > 0.0 || h > 0.0) {
            let what = if level.own {
                format!("its own cluster {}", ix.names[caller as usize])
            } else if level.region == ix.region_of[caller as usize] {
                format!("its region {}", ix.regions[level.region as usize])
            } else {
                format!("region {}", ix.regions[level.region as usize])
            };
            s.lines.push(format!(
                "level {n}: {what}, healthy {:.0}%{}, takes {:.1}% of the traffic",
                h * 100.0,
                if f < 1.0 {
                    format!(", admitting {:.0}%", f * 100.0)
                } else {
                    String::new()
                },
                take * 100.0
            ));
        }
        level.take = take;
        level.weighted = weighted;
        left -= take;
        sum += take;
    }
    if left > 1e-9 && sum > 0.0 {
        if let Some(s) = say {
            s.lines.push(format!(
                "the levels can take only {:.1}% together: scaled up to the whole",
                sum * 100.0
            ));
        }
        for l in &mut w.levels {
            l.take /= sum;
        }
    }
    w.shares.clear();
    w.shares.resize(cands.len(), 0.0);
    for level in w.levels.iter().filter(|l| l.weighted > 0.0) {
        for (c, share) in cands.iter().zip(w.shares.iter_mut()) {
            if level.has(c, caller) {
                *share = level.take * c.endpoints * c.health * c.factor / level.weighted;
            }
        }
    }
}

/// The shares (`w.shares`) to integer weights summing exactly to
/// [`TOTAL`] (largest remainder), into `out` as (cluster index, weight);
/// zero weights are left out.
fn round(cands: &[Cand], w: &mut Work, out: &mut Vec<(u32, u32)>) {
    out.clear();
    let shares = &w.shares;
    let sum: f64 = shares.iter().sum();
    if sum <= 0.0 {
        return;
    }
    w.exact.clear();
    w.exact
        .extend(shares.iter().map(|s| s / sum * f64::from(TOTAL)));
    w.ints.clear();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    w.ints.extend(w.exact.iter().map(|e| e.floor() as u32));
    let given: u32 = w.ints.iter().sum();
    w.rank.clear();
    w.rank
        .extend((0..w.exact.len()).filter(|i| shares[*i] > 0.0));
    let exact = &w.exact;
    w.rank.sort_by(|a, b| {
        let ra = exact[*a] - exact[*a].floor();
        let rb = exact[*b] - exact[*b].floor();
        rb.total_cmp(&ra).then(a.cmp(b))
    });
    for i in w
        .rank
        .iter()
        .cycle()
        .take(TOTAL.saturating_sub(given) as usize)
    {
        w.ints[*i] += 1;
    }
    out.extend(
        cands
            .iter()
            .zip(&w.ints)
            .filter(|(_, w)| **w > 0)
            .map(|(c, w)| (c.idx, *w)),
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
