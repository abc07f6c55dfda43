//! Istio's locality load balancing, as Envoy applies it: which priority
//! each endpoint gets (DestinationRule `localityLbSetting`: `failover`,
//! `failoverPriority`, `distribute`, `enabled`), and how much traffic each
//! priority takes given how many of its hosts are usable (Envoy's priority
//! load with the 1.4 overprovisioning factor, and its panic threshold).
//!
//! What Istio does, and so what this does:
//!
//! - Locality only matters once the DestinationRule has `outlierDetection`
//!   (or `distribute`): without it every endpoint is priority 0 and load is
//!   spread over all of them, as Istio's failover requires outlier
//!   detection. `enabled: false` turns locality off altogether.
//! - With outlier detection: priority 0 is the proxy's zone, 1 its region,
//!   2 other regions; a `failover` rule for the proxy's region puts its
//!   target region before the others. `failoverPriority` labels order
//!   endpoints instead (alone), or first (with `failover`, whose tiers then
//!   order within). Priorities are renumbered without gaps, as Istio sends
//!   them to Envoy.
//! - `distribute`: every endpoint at priority 0, localities weighted as the
//!   first rule matching the proxy says; unlisted localities get nothing.
//! - Envoy: priority `i` is healthy to `min(100, 140 * healthy / total)`
//!   percent; the first priorities take what their health allows and the
//!   rest spills to the next ones. A priority under the panic threshold
//!   sends to all of its hosts.
//!
//! One deliberate difference: when no host is usable anywhere, Envoy with
//! a panic threshold of 0 fails the request; the agent sends to all hosts
//! ("total panic"), as it always has, since a host ejected by outlier
//! detection may answer.

use mesh_core::locality::Locality;
use mesh_core::policy::LocalityLoadBalancerSetting;
use std::collections::BTreeMap;

/// Envoy's overprovisioning factor, in percent.
pub const OVERPROVISIONING: u64 = 140;

/// Envoy's default panic threshold (percent), used without outlier detection.
pub const DEFAULT_PANIC: f64 = 50.0;

/// Istio's topology labels, as `failoverPriority` names them.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Region label.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Cluster label.
pub const CLUSTER_LABEL: &str = "topology.istio.io/cluster";

/// How endpoints are placed, compiled from a DestinationRule.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// No locality: everything at priority 0, hosts weighed alike.
    Off,
    /// Failover tiers (Istio's default once outlier detection is on).
    Failover {
        /// `failover`: (from region, to region), first match wins.
        rules: Vec<(String, String)>,
        /// `failoverPriority`: label key, and the value that must match
        /// instead of the proxy's (`key=value`).
        labels: Vec<(String, Option<String>)>,
    },
    /// `distribute`: (from pattern, [(to pattern, weight)]).
    Distribute(Vec<(String, Vec<(String, u32)>)>),
}

/// The locality policy of one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Placement.
    pub mode: Mode,
    /// Locality-weighted balancing inside a priority (Envoy's
    /// `locality_weighted_lb_config`): on for `distribute` and for explicit
    /// `failover`/`failoverPriority` lists, off in the default tiers.
    pub weighted: bool,
    /// Panic threshold, percent: `minHealthPercent` with outlier detection
    /// (0 by default, no panic), Envoy's 50 without.
    pub panic_threshold: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Off,
            weighted: false,
            panic_threshold: DEFAULT_PANIC,
        }
    }
}

impl Policy {
    /// Istio's `GetEffectiveLbSetting` and `ApplyLocalityLoadBalancer`:
    /// from the DestinationRule's setting (absent: the mesh default,
    /// enabled) and its outlier detection (`min_health_percent` when set).
    pub fn compile(setting: Option<&LocalityLoadBalancerSetting>, outlier: Option<f64>) -> Self {
        let panic_threshold = outlier.unwrap_or(DEFAULT_PANIC);
        let off = Self {
            mode: Mode::Off,
            weighted: false,
            panic_threshold,
        };
        let s = match setting {
            Some(s) if s.enabled == Some(false) => return off,
            Some(s) => s.clone(),
            None => LocalityLoadBalancerSetting::default(),
        };
        if !s.distribute.is_empty() {
            return Self {
                mode: Mode::Distribute(
                    s.distribute
                        .iter()
                        .map(|d| {
                            (
                                d.from.clone(),
                                d.to.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                            )
                        })
                        .collect(),
                ),
                weighted: true,
                panic_threshold,
            };
        }
        if outlier.is_none() {
            // Failover needs outlier detection (Istio: a no-op without).
            return off;
        }
        let labels = s
            .failover_priority
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) if !v.contains('=') => (k.to_string(), Some(v.to_string())),
                _ => (l.clone(), None),
            })
            .collect::<Vec<_>>();
        Self {
            weighted: !s.failover.is_empty() || !labels.is_empty(),
            mode: Mode::Failover {
                rules: s
                    .failover
                    .iter()
                    .map(|f| (f.from.clone(), f.to.clone()))
                    .collect(),
                labels,
            },
            panic_threshold,
        }
    }
}

/// Where an endpoint (or the proxy) is: its locality and its labels, with
/// Istio's topology labels added.
#[derive(Debug, Clone)]
pub struct Site<'a> {
    /// Region and zone.
    pub locality: &'a Locality,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Its cluster.
    pub cluster: &'a str,
    /// Its network.
    pub network: &'a str,
}

impl Site<'_> {
    /// A label, the topology ones included (absent: empty, as Istio
    /// compares them).
    fn label(&self, key: &str) -> &str {
        match key {
            REGION_LABEL => self.locality.region.as_str(),
            ZONE_LABEL => self.locality.zone.as_str(),
            CLUSTER_LABEL => self.cluster,
            NETWORK_LABEL if !self.labels.contains_key(NETWORK_LABEL) => self.network,
            _ => self.labels.get(key).map_or("", String::as_str),
        }
    }
}

/// Where one endpoint goes: its priority (0 first) and its locality group
/// with the group's weight, or nowhere (`distribute` left it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Envoy priority, compacted.
    pub priority: u8,
    /// Locality group (endpoints of one locality at one priority).
    pub group: u16,
    /// The group's weight (locality-weighted balancing).
    pub weight: u32,
}

/// Does `loc` match a `region/zone/subzone` pattern (`*` a wildcard, a
/// missing part anything)? Subzones are not modelled: a subzone part
/// matches only `*` or empty.
pub fn matches(loc: &Locality, pattern: &str) -> bool {
    let mut parts = pattern.split('/');
    let r = parts.next().unwrap_or("");
    let z = parts.next().unwrap_or("");
    let s = parts.next().unwrap_or("");
    (r == "*" || loc.region.as_str() == r)
        && (z.is_empty() || z == "*" || loc.zone.as_str() == z)
        && (s.is_empty() || s == "*")
}

/// Istio's raw failover tier of `ep` seen from `me`: 0 same zone, 1 same
/// region (2 in Istio's numbering, which has a subzone tier between),
/// then the failover target region, then the rest.
fn tier(me: &Locality, ep: &Locality, rules: &[(String, String)]) -> u64 {
    if me.region != ep.region {
        match rules.iter().find(|(from, _)| from == me.region.as_str()) {
            Some((_, to)) if ep.region.as_str() != to => 4,
            _ => 3,
        }
    } else if me.zone == ep.zone {
        0
    } else {
        2
    }
}

/// Istio's `failoverPriority` rank of `ep`: 0 when every label matches the
/// proxy's (or the given value), `n - j` when the `j`-th is the first that
/// does not; a network mismatch in first place adds `n` and goes on.
fn label_rank(me: &Site<'_>, ep: &Site<'_>, labels: &[(String, Option<String>)]) -> u64 {
    let n = labels.len() as u64;
    let mut adjust = 0;
    for (j, (key, value)) in labels.iter().enumerate() {
        let want = value.as_deref().unwrap_or_else(|| me.label(key));
        if want != ep.label(key) {
            if j == 0 && key == NETWORK_LABEL && value.is_none() {
                adjust = n;
                continue;
            }
            return n - j as u64 + adjust;
        }
    }
    adjust
}

/// Places `eps` as Istio and Envoy would for a proxy at `me`.
pub fn place(policy: &Policy, me: &Site<'_>, eps: &[Site<'_>]) -> Vec<Option<Placement>> {
    // (raw priority, locality) per endpoint; None: left out.
    let raw: Vec<Option<u64>> = match &policy.mode {
        Mode::Off => vec![Some(0); eps.len()],
        // `failoverPriority` alone ranks by labels only; with `failover`
        // (or with neither: the default tiers) the tiers order within.
        Mode::Failover { rules, labels } if rules.is_empty() && !labels.is_empty() => eps
            .iter()
            .map(|e| Some(label_rank(me, e, labels)))
            .collect(),
        Mode::Failover { rules, labels } => eps
            .iter()
            .map(|e| Some(5 * label_rank(me, e, labels) + tier(me.locality, e.locality, rules)))
            .collect(),
        Mode::Distribute(rules) => {
            // Only a rule matching the proxy applies; none: weights as they are.
            match rules.iter().find(|(from, _)| matches(me.locality, from)) {
                None => vec![Some(0); eps.len()],
                Some((_, to)) => eps
                    .iter()
                    .map(|e| to.iter().any(|(p, _)| matches(e.locality, p)).then_some(0))
                    .collect(),
            }
        }
    };
    // Compacted: distinct values in order, renumbered 0, 1, ...
    let mut levels: Vec<u64> = raw.iter().flatten().copied().collect();
    levels.sort_unstable();
    levels.dedup();
    // Groups: one per (priority, locality).
    let mut groups: BTreeMap<(u8, &Locality), (u16, u32)> = BTreeMap::new();
    let prio: Vec<Option<u8>> = raw
        .iter()
        .map(|r| {
            r.and_then(|r| levels.binary_search(&r).ok())
                .map(|i| u8::try_from(i).unwrap_or(u8::MAX))
        })
        .collect();
    for (p, e) in prio.iter().zip(eps) {
        if let Some(p) = p {
            let next = u16::try_from(groups.len()).unwrap_or(u16::MAX);
            groups.entry((*p, e.locality)).or_insert((next, 0)).1 += 1;
        }
    }
    // Weights: the endpoint count, or `distribute`'s share of it.
    let mut weight: BTreeMap<(u8, &Locality), u32> =
        groups.iter().map(|(k, (_, n))| (*k, *n)).collect();
    if let Mode::Distribute(rules) = &policy.mode {
        if let Some((_, to)) = rules.iter().find(|(from, _)| matches(me.locality, from)) {
            let mut unclaimed: Vec<(u8, &Locality)> = weight.keys().copied().collect();
            for (pattern, w) in to {
                let (mine, rest): (Vec<_>, Vec<_>) = unclaimed
                    .into_iter()
                    .partition(|(_, l)| matches(l, pattern));
                unclaimed = rest;
                let total: u64 = mine.iter().map(|k| u64::from(weight[k])).sum();
                for k in mine {
                    let g = u64::from(weight[&k]);
                    let v = (g * u64::from(*w)).div_ceil(total.max(1));
                    weight.insert(k, u32::try_from(v).unwrap_or(u32::MAX));
                }
            }
        }
    }
    prio.iter()
        .zip(eps)
        .map(|(p, e)| {
            let p = (*p)?;
            let (group, _) = groups[&(p, e.locality)];
            Some(Placement {
                priority: p,
                group,
                weight: weight[&(p, e.locality)],
            })
        })
        .collect()
}

/// Envoy's priority load: for each priority's (healthy, total) hosts, the
/// percent of requests it takes, and whether it is in panic. All zero when
/// no host is healthy anywhere.
pub fn priority_load(
    counts: &[(u32, u32)],
    panic_threshold: f64,
) -> (PerPriority<u32>, PerPriority<bool>) {
    let health: PerPriority<u64> = counts
        .iter()
        .map(|(h, t)| {
            if *t == 0 {
                0
            } else {
                (OVERPROVISIONING * u64::from(*h) / u64::from(*t)).min(100)
            }
        })
        .collect();
    let nta = health.iter().sum::<u64>().min(100);
    let mut load: PerPriority<u32> = smallvec::smallvec![0; counts.len()];
    if nta == 0 {
        return (load, smallvec::smallvec![false; counts.len()]);
    }
    let mut rem: u64 = 100;
    for (l, h) in load.iter_mut().zip(&health) {
        let v = (h * 100 / nta).min(rem);
        *l = u32::try_from(v).unwrap_or(100);
        rem -= v;
    }
    if let Some(first) = health.iter().position(|h| *h > 0) {
        load[first] += u32::try_from(rem).unwrap_or(0);
    }
    let panic: PerPriority<bool> = counts
        .iter()
        .map(|(h, t)| {
            nta < 100 && {
                let pct = if *t == 0 {
                    0.0
                } else {
                    100.0 * f64::from(*h) / f64::from(*t)
                };
                pct < panic_threshold
            }
        })
        .collect();
    if panic.iter().all(|p| *p) {
        // Total panic: by host count, to every host.
        let all: u64 = counts.iter().map(|(_, t)| u64::from(*t)).sum();
        let mut load: PerPriority<u32> = counts
            .iter()
            .map(|(_, t)| u32::try_from(100 * u64::from(*t) / all.max(1)).unwrap_or(0))
            .collect();
        let given: u32 = load.iter().sum();
        if let Some(first) = counts.iter().position(|(_, t)| *t > 0) {
            load[first] += 100 - given;
        }
        return (load, panic);
    }
    (load, panic)
}

/// One value per priority: on the stack for the few priorities a
/// destination has, so that picking an endpoint allocates nothing.
pub type PerPriority<T> = smallvec::SmallVec<[T; 8]>;

/// Envoy's effective locality weight: the weight scaled by the group's
/// health (with overprovisioning), 0 with no healthy host.
pub fn effective_weight(weight: u32, healthy: u32, total: u32) -> f64 {
    if total == 0 || healthy == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let of = OVERPROVISIONING as f64 / 100.0;
    f64::from(weight) * (of * f64::from(healthy) / f64::from(total)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(r: &str, z: &str) -> Locality {
        Locality {
            region: r.parse().unwrap(),
            zone: z.parse().unwrap(),
        }
    }

    #[test]
    fn envoys_priority_load_examples() {
        // From Envoy's docs and load_balancer_impl.cc (floors included).
        assert_eq!(priority_load(&[(5, 10), (10, 10)], 0.0).0[..], [70, 30]);
        assert_eq!(priority_load(&[(2, 3), (1, 3)], 0.0).0[..], [93, 7]);
        assert_eq!(
            priority_load(&[(2, 10), (2, 10), (2, 10)], 0.0).0[..],
            [34, 33, 33]
        );
        let (load, panic) = priority_load(&[(1, 10), (6, 10)], 50.0);
        assert_eq!(load[..], [15, 85]);
        assert_eq!(panic[..], [true, false]);
        // Everyone under the threshold: total panic, by host count.
        let (load, panic) = priority_load(&[(2, 10), (2, 10), (2, 10)], 50.0);
        assert_eq!(load[..], [34, 33, 33]);
        assert!(panic.iter().all(|p| *p));
        // Healthy enough: no spill.
        assert_eq!(priority_load(&[(8, 10), (10, 10)], 50.0).0[..], [100, 0]);
        assert_eq!(priority_load(&[(0, 4), (0, 2)], 0.0).0[..], [0, 0]);
        // Locality weights: 1 at half health vs 2 healthy (Envoy's 26/74).
        let (x, y) = (effective_weight(1, 1, 2), effective_weight(2, 2, 2));
        assert!((x / (x + y) - 0.259).abs() < 0.001);
    }

    #[test]
    fn failover_tiers_and_rules_are_compacted_as_istio_sends_them() {
        let me_loc = loc("r1", "z1");
        let labels = BTreeMap::new();
        let site = |l: &'static Locality| Site {
            locality: l,
            labels: &labels,
            cluster: "c",
            network: "n",
        };
        let me = Site {
            locality: &me_loc,
            labels: &labels,
            cluster: "c",
            network: "n",
        };
        let locs: &'static [Locality] = Box::leak(Box::new([
            loc("r1", "z1"),
            loc("r1", "z2"),
            loc("r2", "z9"),
            loc("r3", "z1"),
        ]));
        let eps: Vec<Site<'_>> = locs.iter().map(site).collect();
        let od = Some(0.0);
        let prio = |p: &Policy| -> Vec<u8> {
            place(p, &me, &eps)
                .iter()
                .map(|x| x.unwrap().priority)
                .collect()
        };
        let rule = LocalityLoadBalancerSetting {
            failover: vec![mesh_core::policy::LocalityFailover {
                from: "r1".into(),
                to: "r2".into(),
            }],
            ..Default::default()
        };
        // Raw 0, 2, 3, 4 -> 0, 1, 2, 3.
        assert_eq!(prio(&Policy::compile(Some(&rule), od)), [0, 1, 2, 3]);
        // No rule: other regions share a tier.
        assert_eq!(prio(&Policy::compile(None, od)), [0, 1, 2, 2]);
        // No outlier detection, or disabled: no locality at all.
        assert_eq!(prio(&Policy::compile(Some(&rule), None)), [0, 0, 0, 0]);
        let off = LocalityLoadBalancerSetting {
            enabled: Some(false),
            ..Default::default()
        };
        assert_eq!(prio(&Policy::compile(Some(&off), od)), [0, 0, 0, 0]);
        assert!(!Policy::compile(None, od).weighted);
        assert!(Policy::compile(Some(&rule), od).weighted);
    }

    #[test]
    fn distribute_weighs_listed_localities_and_drops_the_rest() {
        // Istio's example: 80 to r1/z1/*, 20 to r2/*; r3 gets nothing.
        let me_loc = loc("r1", "z1");
        let labels = BTreeMap::new();
        let locs = [
            loc("r1", "z1"),
            loc("r1", "z1"),
            loc("r1", "z1"),
            loc("r2", "z3"),
            loc("r2", "z3"),
            loc("r3", "z4"),
        ];
        let eps: Vec<Site<'_>> = locs
            .iter()
            .map(|l| Site {
                locality: l,
                labels: &labels,
                cluster: "c",
                network: "n",
            })
            .collect();
        let me = Site {
            locality: &me_loc,
            labels: &labels,
            cluster: "c",
            network: "n",
        };
        let s = LocalityLoadBalancerSetting {
            distribute: vec![mesh_core::policy::LocalityDistribute {
                from: "r1/z1/*".into(),
                to: [("r1/z1/*".to_string(), 80), ("r2/*".to_string(), 20)].into(),
            }],
            ..Default::default()
        };
        let p = place(&Policy::compile(Some(&s), None), &me, &eps);
        let w: Vec<Option<u32>> = p.iter().map(|x| x.map(|x| x.weight)).collect();
        assert_eq!(w, [Some(80), Some(80), Some(80), Some(20), Some(20), None]);
        assert!(p.iter().flatten().all(|x| x.priority == 0));
    }
}
