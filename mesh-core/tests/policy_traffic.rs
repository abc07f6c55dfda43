#![allow(clippy::unwrap_used, clippy::expect_used)]
//! fedmesh's own `TrafficWeights` (`fedmesh.io/v1`): the good file parses to
//! the expected values and defaults, and round-trips through storage; the bad
//! one is refused with every error, each naming its field path.

use mesh_core::name::Namespace;
use mesh_core::policy::{parse_yaml, Document, Kind, Parsed, Spec, StaleEffective, TrafficWeights};
use std::collections::BTreeMap;
use std::time::Duration;

fn ns(s: &str) -> Namespace {
    Namespace::new(s).unwrap()
}

fn read(name: &str) -> String {
    let path = format!(
        "{}/tests/testdata/policy/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn good(name: &str, text: &str) -> Parsed {
    match parse_yaml(name, text, &ns("default")) {
        Ok(p) => p,
        Err(errs) => panic!(
            "{name} refused:\n{}",
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

fn errors_of(file: &str, text: &str) -> Vec<String> {
    match parse_yaml(file, text, &ns("default")) {
        Ok(p) => panic!("{file} accepted: {p:#?}"),
        Err(errs) => errs.iter().map(ToString::to_string).collect(),
    }
}

fn tw(d: &Document) -> &TrafficWeights {
    match &d.spec {
        Spec::TrafficWeights(t) => t,
        other => panic!("not a TrafficWeights: {other:?}"),
    }
}

fn map(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
    entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn full_document_parses_with_its_values_and_defaults() {
    let p = good("traffic-weights.yaml", &read("traffic-weights.yaml"));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let [reviews, ratings, details] = &p.documents[..] else {
        panic!("three documents")
    };

    assert_eq!(
        reviews.key(),
        (Kind::TrafficWeights, &ns("default"), "reviews")
    );
    assert_eq!(reviews.api_version, "fedmesh.io/v1");
    assert_eq!(reviews.hosts(), ["reviews.default.svc.cluster.local"]);
    let t = tw(reviews);
    assert_eq!(t.service(), "reviews");
    assert_eq!(
        t.weights_by_cluster(),
        Some(&map(&[
            ("us-east-1", 70),
            ("eu-west-1", 30),
            ("ap-south-1", 0)
        ]))
    );
    assert_eq!(t.weights_by_region(), None);
    assert_eq!(t.failover(), ["us-west", "eu-west"]);
    assert_eq!(t.rebalance_effective(), None);
    assert_eq!(t.slow_start_effective(), Duration::from_secs(45));
    assert_eq!(t.stale_effective(), StaleEffective::KeepLastKnown);

    // Unset rebalance fields take their defaults; 0s disables slow start.
    assert_eq!(
        ratings.key(),
        (Kind::TrafficWeights, &ns("shop"), "ratings")
    );
    assert_eq!(ratings.hosts(), ["ratings.shop.svc.cluster.local"]);
    let t = tw(ratings);
    assert_eq!(t.service(), "ratings");
    assert_eq!(t.weights_by_cluster(), None);
    assert_eq!(t.weights_by_region(), None);
    assert!(t.failover().is_empty());
    assert_eq!(
        t.rebalance_effective(),
        Some((0.2, 0.1, 0.05, Duration::from_secs(60)))
    );
    assert_eq!(t.slow_start_effective(), Duration::ZERO);
    assert_eq!(
        t.stale_effective(),
        StaleEffective::WithdrawAfter(Duration::from_millis(1500))
    );

    // Only the host: every default.
    assert_eq!(
        details.key(),
        (Kind::TrafficWeights, &ns("default"), "details")
    );
    assert_eq!(details.hosts(), ["details.default.svc.cluster.local"]);
    let t = tw(details);
    assert_eq!(t.rebalance_effective(), None);
    assert_eq!(t.slow_start_effective(), Duration::from_secs(30));
    assert_eq!(
        t.stale_effective(),
        StaleEffective::WithdrawAfter(Duration::from_secs(30))
    );
}

#[test]
fn regions_and_rebalance_defaults() {
    let yaml = "
apiVersion: fedmesh.io/v1
kind: TrafficWeights
metadata: {name: reviews}
spec:
  host: reviews
  weights:
    regions: {us-east: 70, eu-west: 30}
";
    let p = good("r.yaml", yaml);
    let t = tw(&p.documents[0]);
    assert_eq!(t.weights_by_cluster(), None);
    assert_eq!(
        t.weights_by_region(),
        Some(&map(&[("us-east", 70), ("eu-west", 30)]))
    );

    let yaml = "
apiVersion: fedmesh.io/v1
kind: TrafficWeights
metadata: {name: reviews}
spec:
  host: reviews
  rebalance: {}
";
    let p = good("r.yaml", yaml);
    assert_eq!(
        tw(&p.documents[0]).rebalance_effective(),
        Some((0.1, 0.1, 0.05, Duration::from_secs(10)))
    );
}

#[test]
fn round_trip_through_storage() {
    let p = good("traffic-weights.yaml", &read("traffic-weights.yaml"));
    for doc in p.documents {
        let stored = doc.to_json();
        let back = Document::from_json(&stored).unwrap_or_else(|e| panic!("{}: {e}", doc.name));
        assert_eq!(back, doc, "{}", doc.name);
        assert_eq!(back.to_json(), stored, "{}", doc.name);
        // The stored form is itself valid input.
        let text = serde_json::to_string_pretty(&stored).unwrap();
        let again = parse_yaml("stored.json", &text, &ns("elsewhere")).unwrap();
        assert_eq!(again.documents, std::slice::from_ref(&doc), "{}", doc.name);
    }
    // The canonical form: fedmesh's field names, unset fields left out.
    let p = good("traffic-weights.yaml", &read("traffic-weights.yaml"));
    assert_eq!(
        p.documents[0].to_json(),
        serde_json::json!({
            "apiVersion": "fedmesh.io/v1",
            "kind": "TrafficWeights",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {
                "host": "reviews",
                "weights": {"clusters": {"ap-south-1": 0, "eu-west-1": 30, "us-east-1": 70}},
                "failover": ["us-west", "eu-west"],
                "slowStart": "45s",
                "stale": {"keepLastKnown": true}
            }
        })
    );
    assert_eq!(
        p.documents[1].to_json()["spec"],
        serde_json::json!({
            "host": "ratings.shop.svc.cluster.local",
            "rebalance": {"tolerance": 0.2, "interval": "60s"},
            "slowStart": "0s",
            "stale": {"withdrawAfter": "1500ms"}
        })
    );
}

#[test]
fn bad_file_names_every_error() {
    let file = "bad/traffic-weights.yaml";
    let got = errors_of(file, &read(file));
    let label = "must contain only lowercase letters, digits and '-' (RFC 1123 label)";
    let d1 = "document 1 (TrafficWeights default/reviews)";
    let d2 = "document 2 (TrafficWeights default/zero)";
    let d3 = "document 3 (TrafficWeights default/empty)";
    let d4 = "document 4 (TrafficWeights default/wrong-group)";
    let d5 = "document 5 (TrafficWeights default/typo)";
    let d6 = "document 6 (TrafficWeights default/negative)";
    let want: Vec<String> = [
        format!("{d1}: spec.host: host \"reviews.prod\" is in namespace prod: a TrafficWeights applies only to services of its own namespace (default)"),
        format!("{d1}: spec.weights: must set only one of clusters or regions, got clusters and regions"),
        format!("{d1}: spec.weights.clusters.Bad_Name: invalid cluster name \"Bad_Name\": {label}"),
        format!("{d1}: spec.weights.clusters.us-east-1: weight must be between 0 and 10000, got 20000"),
        format!("{d1}: spec.weights.regions: must name at least one region"),
        format!("{d1}: spec.failover[1]: invalid region \"Not_A_Region\": {label}"),
        format!("{d1}: spec.failover[2]: duplicate region \"us-west\" (first at spec.failover[0])"),
        format!("{d1}: spec.rebalance.tolerance: must be greater than 0 and less than 1, got 1"),
        format!("{d1}: spec.rebalance.maxStep: must be greater than 0 and at most 1, got 0"),
        format!("{d1}: spec.rebalance.floor: must be at least 0 and less than 1, got -0.1"),
        format!("{d1}: spec.rebalance.interval: must be at least 1s, got 500ms"),
        format!("{d1}: spec.stale: must set only one of keepLastKnown or withdrawAfter, got keepLastKnown and withdrawAfter"),
        format!("{d1}: spec.stale.keepLastKnown: must be true when set (omit stale for the default: withdraw after 30s)"),
        format!("{d1}: spec.stale.withdrawAfter: must be greater than 0, got 0s"),
        format!("{d2}: spec.host: is required"),
        format!("{d2}: spec.weights.regions: at least one weight must be greater than 0"),
        format!("{d2}: spec.rebalance.maxStep: must be greater than 0 and at most 1, got 1.5"),
        format!("{d2}: spec.rebalance.floor: must be at least 0 and less than 1, got 1"),
        format!("{d2}: spec.stale: must set one of keepLastKnown: true or withdrawAfter"),
        format!("{d3}: spec.host: invalid host \"*.default\": wildcards are not allowed: name one service"),
        format!("{d3}: spec.weights: must set one of clusters or regions"),
        format!("{d4}: apiVersion: unsupported apiVersion \"networking.istio.io/v1\": expected one of fedmesh.io/v1"),
        format!("{d5}: spec.slowstart: unknown field `slowstart`, expected one of `host`, `weights`, `failover`, `rebalance`, `slowStart`, `stale`"),
        format!("{d6}: spec.weights.clusters.c1: invalid value: integer `-1`, expected u32"),
    ]
    .iter()
    .map(|w| format!("{file}: {w}"))
    .collect();
    assert_eq!(
        got,
        want,
        "\ngot:\n{}\nwant:\n{}",
        got.join("\n"),
        want.join("\n")
    );
}

#[test]
fn rebalance_with_weights_warns() {
    let yaml = "
apiVersion: fedmesh.io/v1
kind: TrafficWeights
metadata: {name: reviews}
spec:
  host: reviews
  weights:
    clusters: {c1: 1}
  rebalance: {tolerance: 0.2}
";
    let p = good("w.yaml", yaml);
    let got: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        ["w.yaml: document 1 (TrafficWeights default/reviews): spec.rebalance: rebalancing applies only without operator weights; it is ignored while weights are set"]
    );
    // Accepted all the same, with both kept.
    let t = tw(&p.documents[0]);
    assert_eq!(t.weights_by_cluster(), Some(&map(&[("c1", 1)])));
    assert!(t.rebalance_effective().is_some());
}

#[test]
fn host_forms() {
    let doc = |host: &str, namespace: &str| {
        format!(
            "apiVersion: fedmesh.io/v1\nkind: TrafficWeights\nmetadata: {{name: r, namespace: {namespace}}}\nspec:\n  host: {host}\n"
        )
    };
    for host in ["reviews", "reviews.prod", "reviews.prod.svc.cluster.local"] {
        let p = good("h.yaml", &doc(host, "prod"));
        assert_eq!(
            p.documents[0].hosts(),
            ["reviews.prod.svc.cluster.local"],
            "{host}"
        );
    }
    for (host, reason) in [
        ("reviews.example.com", "invalid host \"reviews.example.com\": must be a service of the document's namespace: name, name.namespace or name.namespace.svc.cluster.local"),
        ("Reviews", "invalid host \"Reviews\": must contain only lowercase letters, digits and '-' (RFC 1123 label)"),
        ("reviews.default", "host \"reviews.default\" is in namespace default: a TrafficWeights applies only to services of its own namespace (prod)"),
    ] {
        assert_eq!(
            errors_of("h.yaml", &doc(host, "prod")),
            [format!("h.yaml: document 1 (TrafficWeights prod/r): spec.host: {reason}")],
            "{host}"
        );
    }
}

#[test]
fn kind_and_version() {
    assert_eq!(
        "TrafficWeights".parse::<Kind>().unwrap(),
        Kind::TrafficWeights
    );
    assert_eq!(Kind::TrafficWeights.to_string(), "TrafficWeights");
    assert_eq!(Kind::TrafficWeights.api_versions(), ["fedmesh.io/v1"]);
    assert!(Kind::ALL.contains(&Kind::TrafficWeights));
    // An Istio kind written with fedmesh's group is refused too.
    let yaml =
        "apiVersion: fedmesh.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec: {host: r}\n";
    assert_eq!(
        errors_of("k.yaml", yaml),
        ["k.yaml: document 1 (DestinationRule default/r): apiVersion: unsupported apiVersion \"fedmesh.io/v1\": expected one of networking.istio.io/v1alpha3, networking.istio.io/v1beta1, networking.istio.io/v1"]
    );
}
