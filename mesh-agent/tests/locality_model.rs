//! Istio's locality load balancing, checked against a reference model
//! written from Istio's and Envoy's documentation and code
//! (`pilot/pkg/networking/core/loadbalancer/loadbalancer.go`, Envoy's
//! `load_balancer_impl.cc`), independently of the agent's code:
//!
//! for random meshes (endpoints in three regions and two zones, on two
//! networks, with labels, some ejected by outlier detection) and random
//! DestinationRule settings (none, `enabled: false`, outlier detection
//! with the default tiers, `failover`, `failoverPriority`, `distribute`),
//! the share of requests the agent's load balancer sends to each endpoint
//! matches the model's within sampling error.

// The model indexes priorities as Envoy's code does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

use mesh_agent::lb::{self, Algorithm, Candidate, HostStats, Outcome, Outlier, Spread};
use mesh_agent::locality::{self, Policy, Site};
use mesh_core::locality::Locality;
use mesh_core::policy::{LocalityDistribute, LocalityFailover, LocalityLoadBalancerSetting};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
struct Ep {
    region: &'static str,
    zone: &'static str,
    network: &'static str,
    version: &'static str,
    healthy: bool,
}

#[derive(Debug, Clone)]
enum Setting {
    /// No `localityLbSetting`.
    Default,
    Disabled,
    Failover(Vec<(&'static str, &'static str)>),
    Priority(Vec<&'static str>),
    Distribute(&'static str, Vec<(&'static str, u32)>),
}

#[derive(Debug, Clone)]
struct Case {
    me: (&'static str, &'static str),
    eps: Vec<Ep>,
    setting: Setting,
    /// Outlier detection with this `minHealthPercent`; `None`: none.
    outlier: Option<u32>,
}

const REGIONS: [&str; 3] = ["r1", "r2", "r3"];
const ZONES: [&str; 2] = ["z1", "z2"];

fn ep() -> impl Strategy<Value = Ep> {
    (
        prop::sample::select(&REGIONS[..]),
        prop::sample::select(&ZONES[..]),
        prop::sample::select(&["n1", "n2"][..]),
        prop::sample::select(&["v1", "v2"][..]),
        prop::bool::weighted(0.75),
    )
        .prop_map(|(region, zone, network, version, healthy)| Ep {
            region,
            zone,
            network,
            version,
            healthy,
        })
}

fn setting() -> impl Strategy<Value = Setting> {
    prop_oneof![
        Just(Setting::Default),
        Just(Setting::Disabled),
        prop::sample::subsequence(&[("r1", "r2"), ("r1", "r3"), ("r2", "r3")][..], 0..=2)
            .prop_map(Setting::Failover),
        prop::sample::subsequence(
            &[
                "topology.istio.io/network",
                "version",
                "topology.kubernetes.io/region",
                "topology.kubernetes.io/zone",
                "version=v2",
            ][..],
            1..=3
        )
        .prop_map(Setting::Priority),
        (
            prop::sample::select(&["r1/*", "r1/z1", "*", "r2/*"][..]),
            prop::sample::select(vec![
                vec![("r1/z1", 80), ("r2/*", 20)],
                vec![("r1/*", 50), ("r3/*", 50)],
                vec![("r2/z2", 100)],
                vec![("r1/z1", 60), ("r1/z2", 30), ("r3/z1", 10)],
            ])
        )
            .prop_map(|(from, to)| Setting::Distribute(from, to)),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            prop::sample::select(&REGIONS[..]),
            prop::sample::select(&ZONES[..]),
        ),
        prop::collection::vec(ep(), 1..10),
        setting(),
        prop::option::of(prop::sample::select(&[0u32, 0, 30, 60][..])),
    )
        .prop_map(|(me, eps, setting, outlier)| Case {
            me,
            eps,
            setting,
            outlier,
        })
}

// ---------------------------------------------------------------------
// The reference model: Istio's placement, then Envoy's load, as fractions.
// ---------------------------------------------------------------------

/// Istio's effective setting and whether failover is on (§1).
enum Resolved {
    None,
    Failover(Vec<(&'static str, &'static str)>, Vec<&'static str>),
    Distribute(&'static str, Vec<(&'static str, u32)>),
}

fn resolve(c: &Case) -> Resolved {
    match &c.setting {
        Setting::Disabled => Resolved::None,
        Setting::Distribute(from, to) => Resolved::Distribute(from, to.clone()),
        _ if c.outlier.is_none() => Resolved::None,
        Setting::Default => Resolved::Failover(vec![], vec![]),
        Setting::Failover(f) => Resolved::Failover(f.clone(), vec![]),
        Setting::Priority(p) => Resolved::Failover(vec![], p.clone()),
    }
}

fn pattern_matches(region: &str, zone: &str, pattern: &str) -> bool {
    let parts: Vec<&str> = pattern.split('/').collect();
    let r = parts.first().copied().unwrap_or("");
    let z = parts.get(1).copied().unwrap_or("");
    (r == "*" || r == region) && (z.is_empty() || z == "*" || z == zone)
}

fn label_of<'a>(
    region: &'a str,
    zone: &'a str,
    network: &'a str,
    version: &'a str,
    key: &str,
) -> &'a str {
    match key {
        "topology.kubernetes.io/region" => region,
        "topology.kubernetes.io/zone" => zone,
        "topology.istio.io/network" => network,
        "version" => version,
        _ => "",
    }
}

/// Each endpoint's share of requests (Random host choice).
fn model(c: &Case) -> Vec<f64> {
    let (me_r, me_z) = c.me;
    let n = c.eps.len();
    // Priority (None: no traffic) and locality weight per endpoint.
    let mut prio: Vec<Option<u64>> = vec![Some(0); n];
    let mut lw = false;
    let mut group_weight: BTreeMap<(u64, &str, &str), f64> = BTreeMap::new();
    match resolve(c) {
        Resolved::None => {}
        Resolved::Failover(rules, labels) => {
            lw = !rules.is_empty() || !labels.is_empty();
            let rule = rules.iter().find(|(from, _)| *from == me_r);
            for (i, e) in c.eps.iter().enumerate() {
                // failoverPriority (HEAD: a network mismatch first adds N).
                let big_n = labels.len() as u64;
                let mut lp = 0;
                let mut adjust = 0;
                for (j, l) in labels.iter().enumerate() {
                    let (key, want) = match l.split_once('=') {
                        Some((k, v)) => (k, v),
                        None => (*l, label_of(me_r, me_z, "n1", "v1", l)),
                    };
                    if want != label_of(e.region, e.zone, e.network, e.version, key) {
                        if j == 0 && *l == "topology.istio.io/network" {
                            adjust = big_n;
                            continue;
                        }
                        lp = big_n - j as u64;
                        break;
                    }
                }
                // failoverPriority alone: the labels only
                // (applyFailoverPriorities; applyLocalityFailover runs only
                // with a failover list or without failoverPriority).
                if !labels.is_empty() && rules.is_empty() {
                    prio[i] = Some(lp + adjust);
                    continue;
                }
                let raw = if e.region == me_r && e.zone == me_z {
                    0
                } else if e.region == me_r {
                    2
                } else {
                    match rule {
                        Some((_, to)) if e.region != *to => 4,
                        _ => 3,
                    }
                };
                prio[i] = Some(5 * (lp + adjust) + raw);
            }
        }
        Resolved::Distribute(from, to) => {
            lw = true;
            if pattern_matches(me_r, me_z, from) {
                // Groups claimed by the first matching `to` pattern (in
                // name order: the agent reads them sorted).
                let mut to = to.clone();
                to.sort();
                let mut claimed: BTreeMap<(&str, &str), usize> = BTreeMap::new();
                for (i, e) in c.eps.iter().enumerate() {
                    match to
                        .iter()
                        .position(|(p, _)| pattern_matches(e.region, e.zone, p))
                    {
                        Some(k) => {
                            claimed.entry((e.region, e.zone)).or_insert(k);
                        }
                        None => prio[i] = None,
                    }
                }
                for (k, (_, w)) in to.iter().enumerate() {
                    let mine: Vec<(&str, &str)> = claimed
                        .iter()
                        .filter(|(_, v)| **v == k)
                        .map(|(g, _)| *g)
                        .collect();
                    let count = |g: &(&str, &str)| {
                        c.eps.iter().filter(|e| (e.region, e.zone) == *g).count() as f64
                    };
                    let total: f64 = mine.iter().map(count).sum();
                    for g in mine {
                        group_weight
                            .insert((0, g.0, g.1), (count(&g) * f64::from(*w) / total).ceil());
                    }
                }
            }
        }
    }
    // Compacted priorities.
    let levels: BTreeSet<u64> = prio.iter().flatten().copied().collect();
    let levels: Vec<u64> = levels.into_iter().collect();
    let prio: Vec<Option<u64>> = prio
        .iter()
        .map(|p| p.map(|p| levels.iter().position(|l| *l == p).unwrap() as u64))
        .collect();
    // Envoy's priority load (integers), panic threshold.
    let threshold = c.outlier.map_or(50.0, f64::from);
    let k = levels.len();
    let total = |i: usize| prio.iter().filter(|p| **p == Some(i as u64)).count() as u64;
    let healthy = |i: usize| {
        prio.iter()
            .zip(&c.eps)
            .filter(|(p, e)| **p == Some(i as u64) && e.healthy)
            .count() as u64
    };
    let health: Vec<u64> = (0..k)
        .map(|i| {
            if total(i) == 0 {
                0
            } else {
                (140 * healthy(i) / total(i)).min(100)
            }
        })
        .collect();
    let nta = health.iter().sum::<u64>().min(100);
    let mut share = vec![0.0; n];
    if nta == 0 {
        // The agent's total panic: the nearest priority, every host.
        let hosts: Vec<usize> = (0..n).filter(|i| prio[*i] == Some(0)).collect();
        for i in &hosts {
            share[*i] = 1.0 / hosts.len() as f64;
        }
        return share;
    }
    let mut load = vec![0u64; k];
    let mut rem = 100;
    for i in 0..k {
        load[i] = (health[i] * 100 / nta).min(rem);
        rem -= load[i];
    }
    let first = health.iter().position(|h| *h > 0).unwrap();
    load[first] += rem;
    let panic: Vec<bool> = (0..k)
        .map(|i| nta < 100 && (100.0 * healthy(i) as f64 / total(i) as f64) < threshold)
        .collect();
    if panic.iter().all(|p| *p) {
        let all: u64 = (0..k).map(total).sum();
        for i in 0..k {
            load[i] = 100 * total(i) / all;
        }
        let given: u64 = load.iter().sum();
        load[0] += 100 - given;
    }
    for p in 0..k {
        let f = load[p] as f64 / 100.0;
        let members: Vec<usize> = (0..n).filter(|i| prio[*i] == Some(p as u64)).collect();
        if panic[p] {
            for i in &members {
                share[*i] += f / members.len() as f64;
            }
            continue;
        }
        let usable: Vec<usize> = members
            .iter()
            .copied()
            .filter(|i| c.eps[*i].healthy)
            .collect();
        if !lw {
            for i in &usable {
                share[*i] += f / usable.len() as f64;
            }
            continue;
        }
        // Locality-weighted: effective weight = weight * min(1, 1.4 h/t).
        let mut groups: BTreeMap<(&str, &str), (f64, f64, f64)> = BTreeMap::new();
        for i in &members {
            let e = &c.eps[*i];
            let w = group_weight
                .get(&(0, e.region, e.zone))
                .copied()
                .unwrap_or_else(|| {
                    members
                        .iter()
                        .filter(|j| (c.eps[**j].region, c.eps[**j].zone) == (e.region, e.zone))
                        .count() as f64
                });
            let g = groups.entry((e.region, e.zone)).or_insert((w, 0.0, 0.0));
            g.2 += 1.0;
            if e.healthy {
                g.1 += 1.0;
            }
        }
        let eff = |g: &(f64, f64, f64)| {
            if g.1 == 0.0 {
                0.0
            } else {
                g.0 * (1.4 * g.1 / g.2).min(1.0)
            }
        };
        let sum: f64 = groups.values().map(eff).sum();
        for (key, g) in &groups {
            let in_group: Vec<usize> = usable
                .iter()
                .copied()
                .filter(|i| (c.eps[*i].region, c.eps[*i].zone) == *key)
                .collect();
            for i in &in_group {
                share[*i] += f * eff(g) / sum / in_group.len() as f64;
            }
        }
    }
    share
}

// ---------------------------------------------------------------------
// The agent: its placement and its load balancer, sampled.
// ---------------------------------------------------------------------

fn agent_shares(c: &Case, draws: usize) -> Vec<f64> {
    let setting = match &c.setting {
        Setting::Default => None,
        Setting::Disabled => Some(LocalityLoadBalancerSetting {
            enabled: Some(false),
            ..Default::default()
        }),
        Setting::Failover(f) => Some(LocalityLoadBalancerSetting {
            failover: f
                .iter()
                .map(|(from, to)| LocalityFailover {
                    from: (*from).into(),
                    to: (*to).into(),
                })
                .collect(),
            ..Default::default()
        }),
        Setting::Priority(p) => Some(LocalityLoadBalancerSetting {
            failover_priority: p.iter().map(ToString::to_string).collect(),
            ..Default::default()
        }),
        Setting::Distribute(from, to) => Some(LocalityLoadBalancerSetting {
            distribute: vec![LocalityDistribute {
                from: (*from).into(),
                to: to.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
            }],
            ..Default::default()
        }),
    };
    let policy = Policy::compile(setting.as_ref(), c.outlier.map(f64::from));
    let loc = |r: &str, z: &str| Locality {
        region: r.parse().unwrap(),
        zone: z.parse().unwrap(),
    };
    let me_loc = loc(c.me.0, c.me.1);
    let me_labels: BTreeMap<String, String> = [("version".to_string(), "v1".to_string())].into();
    let me = Site {
        locality: &me_loc,
        labels: &me_labels,
        cluster: "c1",
        network: "n1",
    };
    let locs: Vec<Locality> = c.eps.iter().map(|e| loc(e.region, e.zone)).collect();
    let labels: Vec<BTreeMap<String, String>> = c
        .eps
        .iter()
        .map(|e| [("version".to_string(), e.version.to_string())].into())
        .collect();
    let sites: Vec<Site<'_>> = c
        .eps
        .iter()
        .zip(&locs)
        .zip(&labels)
        .map(|((e, l), lab)| Site {
            locality: l,
            labels: lab,
            cluster: "c1",
            network: e.network,
        })
        .collect();
    let placed = locality::place(&policy, &me, &sites);
    let eject = Outlier {
        consecutive_5xx: 1,
        consecutive_gateway: 0,
        base_ejection: Duration::from_secs(300),
        max_ejection_percent: 100,
    };
    let cands: Vec<Candidate<usize>> = placed
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let p = (*p)?;
            let stats = Arc::new(HostStats::default());
            if !c.eps[i].healthy {
                assert!(stats.record(Outcome::ServerError, Some(&eject), 0, 1));
            }
            Some(Candidate {
                item: i,
                key: SocketAddr::from(([10, 0, 0, u8::try_from(i).unwrap() + 1], 80)),
                tier: p.priority,
                group: p.group,
                weight: p.weight,
                stats,
            })
        })
        .collect();
    let spread = Spread {
        weighted: policy.weighted,
        panic_threshold: policy.panic_threshold,
    };
    let rr = AtomicUsize::new(0);
    let mut counts = vec![0usize; c.eps.len()];
    if cands.is_empty() {
        return vec![0.0; c.eps.len()];
    }
    for _ in 0..draws {
        let p = lb::pick(&cands, Algorithm::Random, &[], &[], &rr, &spread).unwrap();
        counts[p.item] += 1;
    }
    counts.iter().map(|k| *k as f64 / draws as f64).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn the_agent_spreads_load_as_istio_and_envoy_would(c in case()) {
        let want = model(&c);
        let draws = 20_000;
        let got = agent_shares(&c, draws);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            // 5 standard deviations of the sampling error, at least 0.5%.
            let sd = (w * (1.0 - w) / draws as f64).sqrt();
            prop_assert!(
                (w - g).abs() <= (5.0 * sd).max(0.005),
                "endpoint {i} {:?}: model {w:.4}, agent {g:.4}\nall model {want:?}\nall agent {got:?}",
                c.eps[i]
            );
        }
    }
}

#[test]
fn the_model_reproduces_the_documented_examples() {
    let e = |region, zone, healthy| Ep {
        region,
        zone,
        network: "n1",
        version: "v1",
        healthy,
    };
    // Istio's failover task: zone, then region, then the failover target.
    let c = Case {
        me: ("r1", "z1"),
        eps: vec![
            e("r1", "z1", false),
            e("r1", "z2", true),
            e("r2", "z1", true),
            e("r3", "z1", true),
        ],
        setting: Setting::Failover(vec![("r1", "r2")]),
        outlier: Some(0),
    };
    assert_eq!(model(&c), vec![0.0, 1.0, 0.0, 0.0]);
    // Without outlier detection, no locality: even over the healthy ones.
    let c = Case { outlier: None, ..c };
    let m = model(&c);
    assert!(m[0] == 0.0 && (m[1] - 1.0 / 3.0).abs() < 1e-9, "{m:?}");
    // Envoy's 70/30: half the zone ejected spills 30% on.
    let c = Case {
        me: ("r1", "z1"),
        eps: vec![
            e("r1", "z1", true),
            e("r1", "z1", false),
            e("r1", "z2", true),
        ],
        setting: Setting::Default,
        outlier: Some(0),
    };
    assert_eq!(model(&c), vec![0.7, 0.0, 0.3]);
}
