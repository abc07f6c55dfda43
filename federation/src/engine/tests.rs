use super::*;

fn cn(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

fn rg(s: &str) -> Region {
    Region::new(s).unwrap()
}

fn svc_key() -> ServiceKey {
    "default/reviews".parse().unwrap()
}

/// us-east: e1, e2; us-west: w1; eu-west: u1. Every cluster runs reviews
/// with 4 ready endpoints.
fn mesh() -> Inputs {
    let mut i = Inputs {
        now_ms: 1_000_000,
        ..Default::default()
    };
    for (c, r) in [
        ("e1", "us-east"),
        ("e2", "us-east"),
        ("w1", "us-west"),
        ("u1", "eu-west"),
    ] {
        i.clusters.insert(
            cn(c),
            ClusterIn {
                region: rg(r),
                unknown_since_ms: None,
                drained: false,
            },
        );
    }
    let mut s = ServiceIn::default();
    s.policy.slow_start_ms = 0;
    for c in ["e1", "e2", "w1", "u1"] {
        s.clusters.insert(
            cn(c),
            ServiceAt {
                endpoints: 4,
                ready: 4,
                ..Default::default()
            },
        );
    }
    i.services.insert(svc_key(), s);
    i
}

fn svc(i: &mut Inputs) -> &mut ServiceIn {
    i.services.get_mut(&svc_key()).unwrap()
}

fn at<'a>(i: &'a mut Inputs, c: &str) -> &'a mut ServiceAt {
    svc(i).clusters.get_mut(&cn(c)).unwrap()
}

/// The weights for a caller in `from`, as (cluster, weight) pairs.
fn weights(i: &Inputs, from: &str) -> Vec<(String, u32)> {
    let t = compute(i, &mut Memory::default());
    t.weights(&svc_key(), &cn(from))
        .unwrap()
        .iter()
        .map(|(c, w)| (c.to_string(), *w))
        .collect()
}

fn w(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(c, w)| ((*c).to_string(), *w)).collect()
}

#[test]
fn a_healthy_own_cluster_takes_everything() {
    let i = mesh();
    assert_eq!(weights(&i, "e1"), w(&[("e1", 10_000)]));
    assert_eq!(weights(&i, "u1"), w(&[("u1", 10_000)]));
}

#[test]
fn a_level_at_half_health_takes_seventy_percent_and_spills_the_rest_to_its_region() {
    let mut i = mesh();
    at(&mut i, "e1").ready = 2;
    assert_eq!(weights(&i, "e1"), w(&[("e1", 7_000), ("e2", 3_000)]));
    // At 5/7 of its health or more, a level still takes everything.
    at(&mut i, "e1").endpoints = 7;
    at(&mut i, "e1").ready = 5;
    assert_eq!(weights(&i, "e1"), w(&[("e1", 10_000)]));
}

#[test]
fn a_dead_region_fails_over_in_the_configured_order() {
    let mut i = mesh();
    at(&mut i, "e1").ready = 0;
    at(&mut i, "e2").ready = 0;
    // By name, eu-west comes before us-west anyway; the order says us-west first.
    svc(&mut i).policy.failover = vec![rg("us-west"), rg("eu-west")];
    assert_eq!(weights(&i, "e1"), w(&[("w1", 10_000)]));
    svc(&mut i).policy.failover = vec![rg("eu-west")];
    assert_eq!(weights(&i, "e1"), w(&[("u1", 10_000)]));
    // The next region half healthy: 70% there, 30% further on.
    at(&mut i, "u1").ready = 2;
    assert_eq!(weights(&i, "e1"), w(&[("u1", 7_000), ("w1", 3_000)]));
}

#[test]
fn each_level_takes_at_most_what_is_left_and_short_levels_are_scaled_to_the_whole() {
    let mut i = mesh();
    for c in ["e1", "e2", "w1", "u1"] {
        at(&mut i, c).ready = 1; // 25% healthy: each level may take 35%
    }
    assert_eq!(
        weights(&i, "e1"),
        w(&[("e1", 3_500), ("e2", 3_500), ("u1", 3_000)])
    );
    for c in ["e1", "e2", "w1", "u1"] {
        at(&mut i, c).endpoints = 10; // 10%: each takes 14%, 56% in all
    }
    assert_eq!(
        weights(&i, "e1"),
        w(&[("e1", 2_500), ("e2", 2_500), ("u1", 2_500), ("w1", 2_500)])
    );
    let why = explain(&i, &Memory::default(), &svc_key())[&cn("e1")]
        .explain
        .join("\n");
    assert!(why.contains("can take only 56.0% together"), "{why}");
}

#[test]
fn operator_weights_split_and_an_unhealthy_clusters_share_is_redistributed() {
    let mut i = mesh();
    svc(&mut i).policy.weights = Some(OperatorWeights::Clusters(
        [(cn("e1"), 60), (cn("w1"), 30), (cn("u1"), 10)].into(),
    ));
    assert_eq!(
        weights(&i, "e2"),
        w(&[("e1", 6_000), ("u1", 1_000), ("w1", 3_000)])
    );
    at(&mut i, "e1").ready = 0;
    assert_eq!(weights(&i, "e2"), w(&[("u1", 2_500), ("w1", 7_500)]));
    // Every weighted cluster down: locality decides.
    for c in ["w1", "u1"] {
        at(&mut i, c).ready = 0;
    }
    assert_eq!(weights(&i, "e2"), w(&[("e2", 10_000)]));
}

#[test]
fn region_weights_go_to_a_regions_clusters_by_endpoints() {
    let mut i = mesh();
    at(&mut i, "e2").endpoints = 12;
    at(&mut i, "e2").ready = 12;
    svc(&mut i).policy.weights = Some(OperatorWeights::Regions(
        [(rg("us-east"), 80), (rg("eu-west"), 20)].into(),
    ));
    assert_eq!(
        weights(&i, "w1"),
        w(&[("e1", 2_000), ("e2", 6_000), ("u1", 2_000)])
    );
}

#[test]
fn a_drained_cluster_gets_nothing_and_the_rest_fail_over() {
    let mut i = mesh();
    i.clusters.get_mut(&cn("e1")).unwrap().drained = true;
    assert_eq!(weights(&i, "e1"), w(&[("e2", 10_000)]));
    let why = explain(&i, &Memory::default(), &svc_key())[&cn("e1")]
        .explain
        .join("\n");
    assert!(why.contains("e1: 0.00% (unhealthy: drained)"), "{why}");
}

#[test]
fn a_lapsed_heartbeat_is_kept_for_a_while_then_withdrawn_unless_kept() {
    let mut i = mesh();
    i.clusters.get_mut(&cn("e1")).unwrap().unknown_since_ms = Some(i.now_ms - 10_000);
    assert_eq!(weights(&i, "e1"), w(&[("e1", 10_000)]), "10 s: kept");
    i.clusters.get_mut(&cn("e1")).unwrap().unknown_since_ms = Some(i.now_ms - 31_000);
    assert_eq!(weights(&i, "e1"), w(&[("e2", 10_000)]), "31 s: withdrawn");
    svc(&mut i).policy.stale = Stale::KeepLastKnown;
    assert_eq!(weights(&i, "e1"), w(&[("e1", 10_000)]));
}

#[test]
fn a_partition_seen_from_one_cluster_changes_only_its_weights() {
    let mut i = mesh();
    svc(&mut i).policy.weights = Some(OperatorWeights::Clusters(
        [(cn("e1"), 50), (cn("u1"), 50)].into(),
    ));
    i.unreachable.insert((cn("w1"), cn("u1"), None));
    assert_eq!(weights(&i, "w1"), w(&[("e1", 10_000)]));
    assert_eq!(weights(&i, "e2"), w(&[("e1", 5_000), ("u1", 5_000)]));
    // A dead service behind a healthy gateway fails over alone.
    let other: ServiceKey = "default/ratings".parse().unwrap();
    i.unreachable.insert((cn("e2"), cn("u1"), Some(other)));
    assert_eq!(weights(&i, "e2"), w(&[("e1", 5_000), ("u1", 5_000)]));
    i.unreachable.insert((cn("e2"), cn("u1"), Some(svc_key())));
    assert_eq!(weights(&i, "e2"), w(&[("e1", 10_000)]));
}

#[test]
fn with_nothing_healthy_every_cluster_with_endpoints_gets_traffic() {
    let mut i = mesh();
    for c in ["e1", "e2", "w1", "u1"] {
        at(&mut i, c).ready = 0;
    }
    at(&mut i, "u1").endpoints = 8;
    assert_eq!(
        weights(&i, "e1"),
        w(&[("e1", 2_000), ("e2", 2_000), ("u1", 4_000), ("w1", 2_000)])
    );
}

#[test]
fn a_recovering_cluster_ramps_up_over_the_slow_start_window() {
    let mut i = mesh();
    svc(&mut i).policy.slow_start_ms = 60_000;
    svc(&mut i).policy.weights = Some(OperatorWeights::Clusters(
        [(cn("e1"), 50), (cn("e2"), 50)].into(),
    ));
    let mut mem = Memory::default();
    let share = |i: &Inputs, mem: &mut Memory| {
        compute(i, mem)
            .weights(&svc_key(), &cn("w1"))
            .unwrap()
            .get(&cn("e1"))
            .copied()
            .unwrap_or(0)
    };
    // Both have been healthy for long.
    i.now_ms = 0;
    share(&i, &mut mem);
    i.now_ms = 100_000;
    assert_eq!(share(&i, &mut mem), 5_000);
    // e1 goes down, comes back: 10% of its share at first, all of it after the window.
    at(&mut i, "e1").ready = 0;
    i.now_ms = 101_000;
    assert_eq!(share(&i, &mut mem), 0);
    at(&mut i, "e1").ready = 4;
    i.now_ms = 102_000;
    let first = share(&i, &mut mem);
    i.now_ms = 132_000;
    let half = share(&i, &mut mem);
    i.now_ms = 162_000;
    let full = share(&i, &mut mem);
    assert!(
        first > 0 && first < half && half < full,
        "{first} {half} {full}"
    );
    assert_eq!(full, 5_000);
}
