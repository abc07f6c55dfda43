//! The weight engine in a deterministic simulator (virtual time, no sleeps,
//! no sockets): 3 regions of 2 clusters, demand curves, a cluster lost and
//! recovered, a region partitioned; and property tests of its invariants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::engine::{
    compute, explain, ClusterIn, Inputs, Memory, OperatorWeights, Rebalance, ServiceAt, ServiceIn,
    Table, TOTAL,
};
use mesh_core::name::{ClusterName, Region};
use mesh_core::service::ServiceKey;
use proptest::prelude::*;
use std::collections::BTreeMap;

const INTERVAL_MS: u64 = 10_000;

fn cn(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

fn reviews() -> ServiceKey {
    "default/reviews".parse().unwrap()
}

const CLUSTERS: [(&str, &str); 6] = [
    ("e1", "us-east"),
    ("e2", "us-east"),
    ("w1", "us-west"),
    ("w2", "us-west"),
    ("u1", "eu-west"),
    ("u2", "eu-west"),
];

/// A world: the engine's inputs, each calling cluster's demand and each
/// cluster's capacity, stepped in virtual time. The load a cluster reports
/// is what the weights computed one interval earlier sent it, as agents
/// would measure it.
struct Sim {
    inputs: Inputs,
    memory: Memory,
    capacity: BTreeMap<ClusterName, f64>,
    table: Table,
}

impl Sim {
    fn new(capacity: &[f64; 6], rebalance: bool) -> Self {
        let mut inputs = Inputs::default();
        let mut svc = ServiceIn::default();
        svc.policy.slow_start_ms = 60_000;
        svc.policy.failover = vec![
            Region::new("us-east").unwrap(),
            Region::new("us-west").unwrap(),
            Region::new("eu-west").unwrap(),
        ];
        if rebalance {
            svc.policy.rebalance = Some(Rebalance::default());
        }
        let mut cap = BTreeMap::new();
        for ((c, r), k) in CLUSTERS.iter().zip(capacity) {
            inputs.clusters.insert(
                cn(c),
                ClusterIn {
                    region: Region::new(r).unwrap(),
                    unknown_since_ms: None,
                    drained: false,
                },
            );
            svc.clusters.insert(
                cn(c),
                ServiceAt {
                    endpoints: 4,
                    ready: 4,
                    qps: 0.0,
                    capacity: *k,
                },
            );
            cap.insert(cn(c), *k);
        }
        inputs.services.insert(reviews(), svc);
        // Start long after every cluster became healthy.
        let mut sim = Self {
            inputs,
            memory: Memory::default(),
            capacity: cap,
            table: Table::default(),
        };
        sim.table = compute(&sim.inputs, &mut sim.memory);
        sim.inputs.now_ms = 10 * 60_000;
        sim
    }

    fn at(&mut self, c: &str) -> &mut ServiceAt {
        self.inputs
            .services
            .get_mut(&reviews())
            .unwrap()
            .clusters
            .get_mut(&cn(c))
            .unwrap()
    }

    /// One interval: report the load the current weights send, recompute.
    fn step(&mut self, demand: &BTreeMap<ClusterName, f64>) {
        let mut load: BTreeMap<ClusterName, f64> = BTreeMap::new();
        for (from, d) in demand {
            for (to, w) in &self.table.weights(&reviews(), from).unwrap() {
                *load.entry(to.clone()).or_default() += d * f64::from(*w) / f64::from(TOTAL);
            }
        }
        for (c, _) in CLUSTERS {
            let l = load.get(&cn(c)).copied().unwrap_or(0.0);
            self.at(c).qps = l;
        }
        self.inputs.now_ms += INTERVAL_MS;
        self.table = compute(&self.inputs, &mut self.memory);
    }

    fn weight(&self, from: &str, to: &str) -> u32 {
        self.table
            .weights(&reviews(), &cn(from))
            .unwrap()
            .get(&cn(to))
            .copied()
            .unwrap_or(0)
    }

    /// Each active cluster's utilization over the mean, from the last reports.
    fn deviations(&self) -> Vec<(String, f64)> {
        let svc = &self.inputs.services[&reviews()];
        let active: Vec<_> = svc.clusters.iter().filter(|(_, a)| a.ready > 0).collect();
        let q: f64 = active.iter().map(|(_, a)| a.qps).sum();
        let k: f64 = active.iter().map(|(c, _)| self.capacity[*c]).sum();
        active
            .iter()
            .map(|(c, a)| (c.to_string(), (a.qps / self.capacity[*c]) / (q / k) - 1.0))
            .collect()
    }
}

fn demand(values: [f64; 6]) -> BTreeMap<ClusterName, f64> {
    CLUSTERS
        .iter()
        .zip(values)
        .map(|((c, _), d)| (cn(c), d))
        .collect()
}

/// Demand rising in the us while it falls in the eu, and back, over an
/// hour (360 intervals): a day's curve, sped up 24 times.
fn diurnal(step: u64) -> BTreeMap<ClusterName, f64> {
    #[allow(clippy::cast_precision_loss)]
    let phase = (step as f64 / 360.0 * std::f64::consts::TAU).sin();
    let us = 900.0 + 500.0 * phase;
    let eu = 600.0 - 300.0 * phase;
    demand([us * 1.3, us * 0.7, us, us, eu, eu])
}

#[test]
fn rebalancing_converges_within_the_tolerance_and_does_not_oscillate() {
    let mut sim = Sim::new(&[1000.0, 1000.0, 1200.0, 800.0, 1000.0, 1000.0], true);
    let d = demand([1500.0, 300.0, 900.0, 900.0, 500.0, 400.0]);
    // Locality alone would run e1 at 1.5 and e2 at 0.3 of capacity.
    let mut converged_at = None;
    for i in 0..40 {
        sim.step(&d);
        let worst = sim
            .deviations()
            .iter()
            .map(|(_, x)| x.abs())
            .fold(0.0, f64::max);
        if worst <= 0.1 && converged_at.is_none() {
            converged_at = Some(i);
        }
    }
    let at = converged_at.expect("never within ±10%");
    assert!(at <= 20, "converged only after {at} intervals");
    // Settled: the weights hold still (hysteresis), interval after interval.
    let before: Vec<u32> = CLUSTERS.iter().map(|(c, _)| sim.weight("e1", c)).collect();
    for _ in 0..20 {
        sim.step(&d);
        for (c, x) in sim.deviations() {
            assert!(x.abs() <= 0.1, "{c} drifted out to {x:+.3}");
        }
    }
    let after: Vec<u32> = CLUSTERS.iter().map(|(c, _)| sim.weight("e1", c)).collect();
    assert_eq!(before, after, "settled weights must not move");
}

#[test]
fn rebalancing_follows_a_demand_curve_without_oscillating() {
    let mut sim = Sim::new(&[1000.0; 6], true);
    let mut within = 0;
    let mut reversals = BTreeMap::<String, (i64, u32)>::new();
    let mut last: BTreeMap<String, u32> = BTreeMap::new();
    for step in 0..740 {
        sim.step(&diurnal(step));
        if step >= 20 && sim.deviations().iter().all(|(_, x)| x.abs() <= 0.1) {
            within += 1;
        }
        if std::env::var_os("SIM_DEBUG").is_some() {
            let d: Vec<String> = sim
                .deviations()
                .iter()
                .map(|(c, x)| format!("{c}:{x:+.2}"))
                .collect();
            eprintln!("{step:3} {}", d.join(" "));
        }
        // Count direction reversals of e1's weight toward e2.
        let w = sim.weight("e1", "e2");
        let prev = last.insert("e1>e2".into(), w).unwrap_or(w);
        let dir = i64::from(w) - i64::from(prev);
        let e = reversals.entry("e1>e2".into()).or_insert((0, 0));
        if dir != 0 {
            if e.0 != 0 && dir.signum() != e.0.signum() {
                e.1 += 1;
            }
            e.0 = dir;
        }
    }
    // Within the tolerance most of the time after warm-up (572 of the 720
    // intervals when this was written: the simulation is deterministic), and the
    // weights turn around with the demand (about 6 times in 3 periods), not
    // at every interval.
    assert!(
        within >= 560,
        "within ±10% in only {within} of 720 intervals"
    );
    let (_, turns) = reversals["e1>e2"];
    assert!(turns <= 12, "e1's spill to e2 reversed {turns} times");
}

#[test]
fn a_lost_cluster_is_avoided_at_once_and_ramps_back_slowly() {
    let mut sim = Sim::new(&[1000.0; 6], false);
    let d = demand([800.0; 6]);
    sim.step(&d);
    assert_eq!(sim.weight("e1", "e1"), TOTAL);
    sim.at("e1").ready = 0;
    sim.step(&d);
    for (from, _) in CLUSTERS {
        assert_eq!(sim.weight(from, "e1"), 0, "{from} still sends to e1");
    }
    assert_eq!(
        sim.weight("e1", "e2"),
        TOTAL,
        "e1's callers fail over in their region"
    );
    // Back: its own callers' share grows interval by interval over the
    // 60 s slow start, never jumping straight to everything.
    sim.at("e1").ready = 4;
    let mut shares = Vec::new();
    for _ in 0..8 {
        sim.step(&d);
        shares.push(sim.weight("e1", "e1"));
    }
    assert!(shares[0] > 0 && shares[0] < TOTAL / 4, "{shares:?}");
    assert!(shares.windows(2).all(|w| w[0] <= w[1]), "{shares:?}");
    assert_eq!(*shares.last().unwrap(), TOTAL, "{shares:?}");
}

#[test]
fn a_partitioned_region_changes_only_its_own_callers_weights() {
    let mut sim = Sim::new(&[1000.0; 6], false);
    // Operator weights send everyone's traffic everywhere, so a partition shows.
    sim.inputs
        .services
        .get_mut(&reviews())
        .unwrap()
        .policy
        .weights = Some(OperatorWeights::Clusters(
        CLUSTERS.iter().map(|(c, _)| (cn(c), 1)).collect(),
    ));
    let d = demand([600.0; 6]);
    sim.step(&d);
    let before = sim.table.clone();
    // us-west's gateways cannot reach eu-west's.
    for from in ["w1", "w2"] {
        for to in ["u1", "u2"] {
            sim.inputs.unreachable.insert((cn(from), cn(to), None));
        }
    }
    sim.step(&d);
    for (from, _) in CLUSTERS {
        let old = &before.weights(&reviews(), &cn(from)).unwrap();
        let new = &sim.table.weights(&reviews(), &cn(from)).unwrap();
        if from.starts_with('w') {
            assert_eq!(new.get(&cn("u1")), None, "{from}");
            assert_eq!(new.get(&cn("u2")), None, "{from}");
            assert_eq!(new.values().sum::<u32>(), TOTAL);
        } else {
            assert_eq!(old, new, "{from} must not change");
        }
    }
}

// === properties ===

#[derive(Debug, Clone)]
struct World {
    clusters: Vec<(u32, u32, bool)>, // endpoints, ready, drained
    regions: Vec<usize>,
    unreachable: Vec<(usize, usize)>,
    weights: Option<Vec<u32>>,
}

fn world() -> impl Strategy<Value = World> {
    (1usize..7)
        .prop_flat_map(|n| {
            (
                prop::collection::vec((0u32..6, 0u32..6, prop::bool::weighted(0.15)), n),
                prop::collection::vec(0usize..3, n),
                prop::collection::vec((0..n, 0..n), 0..3),
                prop::option::of(prop::collection::vec(0u32..100, n)),
            )
        })
        .prop_map(|(cl, regions, unreachable, weights)| World {
            clusters: cl.into_iter().map(|(e, r, d)| (e, r.min(e), d)).collect(),
            regions,
            unreachable,
            weights,
        })
}

fn inputs_of(w: &World) -> Inputs {
    let mut i = Inputs {
        now_ms: 1_000_000,
        ..Default::default()
    };
    let mut svc = ServiceIn::default();
    svc.policy.slow_start_ms = 0;
    for (n, (e, r, d)) in w.clusters.iter().enumerate() {
        let c = cn(&format!("c{n}"));
        i.clusters.insert(
            c.clone(),
            ClusterIn {
                region: Region::new(format!("r{}", w.regions[n])).unwrap(),
                unknown_since_ms: None,
                drained: *d,
            },
        );
        if *e > 0 {
            svc.clusters.insert(
                c,
                ServiceAt {
                    endpoints: *e,
                    ready: *r,
                    ..Default::default()
                },
            );
        }
    }
    for (a, b) in &w.unreachable {
        i.unreachable
            .insert((cn(&format!("c{a}")), cn(&format!("c{b}")), None));
    }
    if let Some(ws) = &w.weights {
        svc.policy.weights = Some(OperatorWeights::Clusters(
            ws.iter()
                .enumerate()
                .map(|(n, v)| (cn(&format!("c{n}")), *v))
                .collect(),
        ));
    }
    i.services.insert(reviews(), svc);
    i
}

fn healthy_from(w: &World, from: usize, to: usize) -> bool {
    let (e, r, d) = w.clusters[to];
    e > 0 && r > 0 && !d && !w.unreachable.contains(&(from, to))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn weights_sum_to_the_whole_and_avoid_unhealthy_clusters(w in world()) {
        let t = compute(&inputs_of(&w), &mut Memory::default());
        let any_endpoints = w.clusters.iter().any(|(e, _, _)| *e > 0);
        for from in 0..w.clusters.len() {
            let split = t.weights(&reviews(), &cn(&format!("c{from}"))).unwrap();
            let sum: u32 = split.values().sum();
            prop_assert_eq!(sum, if any_endpoints { TOTAL } else { 0 });
            let some_healthy = (0..w.clusters.len()).any(|to| healthy_from(&w, from, to));
            if some_healthy {
                for (c, wt) in &split {
                    let to: usize = c.as_str()[1..].parse().unwrap();
                    prop_assert!(
                        healthy_from(&w, from, to) || *wt == 0,
                        "c{} sends {} to unhealthy {}", from, wt, c
                    );
                }
            }
        }
    }

    /// The fast path (callers that see the service alike share one split)
    /// and the explaining path (every caller on its own, with reasons)
    /// give the same weights.
    #[test]
    fn computed_weights_are_the_explained_ones(
        mut w in world(),
        vacant in prop::collection::vec(prop::bool::ANY, 6),
        failover in prop::collection::vec(0usize..3, 0..3),
        gateway_probe in prop::bool::ANY,
    ) {
        // Many callers without endpoints of their own: they share splits.
        for (c, v) in w.clusters.iter_mut().zip(vacant) {
            if v {
                *c = (0, 0, c.2);
            }
        }
        let mut i = inputs_of(&w);
        if let Some(svc) = i.services.get_mut(&reviews()) {
            svc.policy.failover = failover
                .iter()
                .map(|r| Region::new(format!("r{r}")).unwrap())
                .collect();
        }
        if !gateway_probe {
            // The same failures, for this service only.
            i.unreachable = i
                .unreachable
                .iter()
                .map(|(a, b, _)| (a.clone(), b.clone(), Some(reviews())))
                .collect();
        }
        let mut memory = Memory::default();
        let t = compute(&i, &mut memory);
        let explained = explain(&i, &memory, &reviews());
        prop_assert_eq!(explained.len(), w.clusters.len());
        for (caller, split) in &explained {
            let computed = t.weights(&reviews(), caller);
            prop_assert_eq!(Some(&split.weights), computed.as_ref(), "caller {}", caller);
        }
    }

    #[test]
    fn spill_grows_as_a_cluster_loses_capacity(w in world(), victim in 0usize..6) {
        let victim = victim % w.clusters.len();
        prop_assume!(w.clusters[victim].1 > 0);
        let before = compute(&inputs_of(&w), &mut Memory::default());
        let mut worse = w.clone();
        worse.clusters[victim].1 -= 1;
        let after = compute(&inputs_of(&worse), &mut Memory::default());
        let v = cn(&format!("c{victim}"));
        let slack = u32::try_from(w.clusters.len()).unwrap(); // rounding, a unit per cluster
        for from in 0..w.clusters.len() {
            let f = cn(&format!("c{from}"));
            let b = &before.weights(&reviews(), &f).unwrap();
            let a = &after.weights(&reviews(), &f).unwrap();
            let to_victim = |m: &BTreeMap<ClusterName, u32>| m.get(&v).copied().unwrap_or(0);
            let elsewhere = |m: &BTreeMap<ClusterName, u32>| m.values().sum::<u32>() - to_victim(m);
            // Unless the loss made every cluster unhealthy (panic mode).
            let still_some = (0..worse.clusters.len()).any(|to| healthy_from(&worse, from, to));
            if still_some {
                prop_assert!(to_victim(a) <= to_victim(b) + slack,
                    "c{}: victim's weight rose {} -> {}", from, to_victim(b), to_victim(a));
                prop_assert!(elsewhere(a) + slack >= elsewhere(b),
                    "c{}: spill fell {} -> {}", from, elsewhere(b), elsewhere(a));
            }
        }
    }
}
