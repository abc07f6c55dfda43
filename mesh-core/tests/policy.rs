#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Istio policy files: the good ones parse and round-trip through storage;
//! each bad one is refused with exactly the expected errors.

use mesh_core::name::Namespace;
use mesh_core::policy::{
    parse_yaml, Document, HeaderMatch, Kind, Parsed, PolicyError, SimpleLB, Spec, StringMatch,
};
use proptest::prelude::*;
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

fn good(name: &str) -> Parsed {
    match parse_yaml(name, &read(name), &ns("default")) {
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

/// Asserts the errors of `bad/<name>`, each written without the common
/// `bad/<name>: ` prefix.
fn assert_bad(name: &str, want: &[&str]) {
    let file = format!("bad/{name}");
    let got = errors_of(&file, &read(&file));
    let want: Vec<String> = want.iter().map(|w| format!("{file}: {w}")).collect();
    assert_eq!(
        got,
        want,
        "\ngot:\n{}\nwant:\n{}",
        got.join("\n"),
        want.join("\n")
    );
}

fn vs(d: &Document) -> &mesh_core::policy::VirtualService {
    match &d.spec {
        Spec::VirtualService(v) => v,
        other => panic!("not a VirtualService: {other:?}"),
    }
}

fn dr(d: &Document) -> &mesh_core::policy::DestinationRule {
    match &d.spec {
        Spec::DestinationRule(v) => v,
        other => panic!("not a DestinationRule: {other:?}"),
    }
}

const GOOD: [&str; 7] = [
    "bookinfo-reviews.yaml",
    "destination-rule-full.yaml",
    "sidecar.yaml",
    "kubectl-export.yaml",
    "all-versions.yaml",
    "route-features.yaml",
    "warnings.yaml",
];

// === good files ===

#[test]
fn good_files_parse() {
    let counts: Vec<(usize, usize)> = GOOD
        .iter()
        .map(|f| {
            let p = good(f);
            (p.documents.len(), p.warnings.len())
        })
        .collect();
    // Warnings name fields the agent does not act on (connection pool
    // details, client TLS, exportTo, tcp routes).
    assert_eq!(
        counts,
        [(2, 0), (1, 7), (1, 0), (3, 0), (9, 2), (1, 1), (3, 10)]
    );
}

#[test]
fn bookinfo_reviews() {
    let p = good("bookinfo-reviews.yaml");
    let [vs_doc, dr_doc] = &p.documents[..] else {
        panic!("two documents")
    };
    assert_eq!(
        vs_doc.key(),
        (Kind::VirtualService, &ns("default"), "reviews")
    );
    assert_eq!(vs_doc.api_version, "networking.istio.io/v1alpha3");
    let v = vs(vs_doc);
    assert_eq!(v.hosts, ["reviews"]);
    let jason = &v.http[0];
    assert_eq!(
        jason.r#match[0].headers["end-user"],
        HeaderMatch::Match(StringMatch::Exact("jason".into()))
    );
    assert_eq!(jason.route[0].destination.subset.as_deref(), Some("v2"));
    let split = &v.http[1];
    let weights: Vec<(Option<&str>, Option<i32>)> = split
        .route
        .iter()
        .map(|d| (d.destination.subset.as_deref(), d.weight))
        .collect();
    assert_eq!(
        weights,
        [
            (Some("v1"), Some(50)),
            (Some("v2"), Some(25)),
            (Some("v3"), Some(25))
        ]
    );
    assert_eq!(split.timeout.unwrap().get(), Duration::from_secs(10));
    let retries = split.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, Some(3));
    assert_eq!(
        retries.per_try_timeout.unwrap().get(),
        Duration::from_secs(2)
    );
    let on = retries.effective_retry_on();
    assert!(on.on_status(503) && !on.on_status(500) && on.on_connect_failure());

    let d = dr(dr_doc);
    let names: Vec<&str> = d.subsets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["v1", "v2", "v3"]);
    assert_eq!(d.subset("v2").unwrap().labels["version"], "v2");
}

#[test]
fn destination_rule_full() {
    let p = good("destination-rule-full.yaml");
    let doc = &p.documents[0];
    assert_eq!(doc.key(), (Kind::DestinationRule, &ns("prod"), "ratings"));
    let d = dr(doc);
    let tp = d.traffic_policy.as_ref().unwrap();
    let od = tp.outlier_detection.as_ref().unwrap().effective();
    assert_eq!(od.consecutive_5xx, Some(7));
    assert_eq!(od.consecutive_gateway_errors, Some(3));
    assert_eq!(od.interval, Duration::from_secs(300));
    assert_eq!(od.base_ejection_time, Duration::from_secs(900));
    assert_eq!(od.max_ejection_percent, 50);
    let ch = tp
        .load_balancer
        .as_ref()
        .unwrap()
        .consistent_hash
        .as_ref()
        .unwrap();
    assert_eq!(ch.key(), Some(mesh_core::policy::HashKey::Header("x-user")));
    let pool = tp.connection_pool.as_ref().unwrap();
    assert_eq!(pool.tcp.as_ref().unwrap().max_connections, Some(100));
    assert_eq!(
        pool.tcp.as_ref().unwrap().connect_timeout.unwrap().get(),
        Duration::from_millis(30)
    );

    // Subset v2 overrides the load balancer and pool, inherits the rest.
    let v2 = d.policy_for(Some("v2"), Some(9080));
    assert_eq!(v2.load_balancer.unwrap().simple, Some(SimpleLB::RoundRobin));
    assert_eq!(
        v2.connection_pool.unwrap().tcp.unwrap().max_connections,
        Some(10)
    );
    assert!(v2.outlier_detection.is_some() && v2.tls.is_some());
    // Port 9443 has port-level settings: they replace the top level.
    let p9443 = d.policy_for(Some("v1"), Some(9443));
    assert_eq!(
        p9443.load_balancer.unwrap().simple,
        Some(SimpleLB::LeastRequest)
    );
    assert_eq!(p9443.connection_pool, None);
    assert_eq!(p9443.outlier_detection, None);
}

#[test]
fn sidecar_file() {
    let p = good("sidecar.yaml");
    let Spec::Sidecar(s) = &p.documents[0].spec else {
        panic!("sidecar")
    };
    assert!(s.allows("prod", "reviews.prod.svc.cluster.local", "shop"));
    assert!(s.allows("shop", "cart.shop.svc.cluster.local", "shop"));
    assert!(s.allows("anywhere", "storage.googleapis.com", "shop"));
    assert!(!s.allows("prod", "ratings.prod.svc.cluster.local", "shop"));
    assert!(!s.allows("legacy", "old.legacy.svc.cluster.local", "shop"));
}

#[test]
fn kubectl_export_and_list() {
    let p = good("kubectl-export.yaml");
    let keys: Vec<(Kind, String, String)> = p
        .documents
        .iter()
        .map(|d| (d.kind, d.namespace.to_string(), d.name.clone()))
        .collect();
    assert_eq!(
        keys,
        [
            (Kind::VirtualService, "default".into(), "ratings".into()),
            (Kind::DestinationRule, "default".into(), "ratings".into()),
            (Kind::Sidecar, "default".into(), "default".into()),
        ]
    );
    // Only name and namespace survive from metadata; status is dropped.
    let stored = p.documents[0].to_json();
    assert_eq!(
        stored,
        serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "ratings", "namespace": "default"},
            "spec": {
                "hosts": ["ratings"],
                "http": [{"route": [{"destination": {"host": "ratings", "subset": "v1"}}]}]
            }
        })
    );
}

#[test]
fn every_api_version() {
    let p = good("all-versions.yaml");
    let got: Vec<(Kind, &str)> = p
        .documents
        .iter()
        .map(|d| (d.kind, d.api_version.rsplit('/').next().unwrap()))
        .collect();
    let mut want = Vec::new();
    for kind in [Kind::VirtualService, Kind::DestinationRule, Kind::Sidecar] {
        for v in ["v1alpha3", "v1beta1", "v1"] {
            want.push((kind, v));
        }
    }
    assert_eq!(got, want);
}

#[test]
fn route_features() {
    let p = good("route-features.yaml");
    let v = vs(&p.documents[0]);
    let faulty = &v.http[0];
    let fault = faulty.fault.as_ref().unwrap();
    assert_eq!(fault.delay.as_ref().unwrap().fraction(), 0.001);
    assert_eq!(fault.abort.as_ref().unwrap().fraction(), 0.125);
    let m = &faulty.r#match[0];
    assert_eq!(m.headers["x-present"], HeaderMatch::Present);
    assert_eq!(m.without_headers["x-skip"], HeaderMatch::Present);
    assert_eq!(m.port, Some(9080));

    let legacy = &v.http[1];
    assert_eq!(
        legacy
            .fault
            .as_ref()
            .unwrap()
            .delay
            .as_ref()
            .unwrap()
            .fraction(),
        0.2
    );
    assert_eq!(
        legacy
            .fault
            .as_ref()
            .unwrap()
            .delay
            .as_ref()
            .unwrap()
            .fixed_delay
            .unwrap()
            .get(),
        Duration::from_millis(1500)
    );
    assert_eq!(legacy.mirror_fraction(), 0.3);
    // Relative weights 1:3.
    let to_v3 = (0..4)
        .filter(|roll| {
            legacy
                .pick_destination(*roll)
                .unwrap()
                .destination
                .subset
                .as_deref()
                == Some("v3")
        })
        .count();
    assert_eq!(to_v3, 3);

    let grpc = &v.http[2];
    let abort = grpc.fault.as_ref().unwrap().abort.as_ref().unwrap();
    assert_eq!(abort.grpc_code(), Some(14));
    assert_eq!(abort.fraction(), 1.0);
    assert_eq!(grpc.mirrors[0].fraction(), 0.5);
    let on = grpc.retries.as_ref().unwrap().effective_retry_on();
    assert!(on.on_grpc_status(14) && on.on_grpc_status(1) && on.on_status(503));
    assert!(!on.on_status(502));
}

#[test]
fn warnings_name_unacted_fields() {
    let p = good("warnings.yaml");
    let got: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    let na = "recognised Istio field, accepted but not acted on by fedmesh";
    let vs = "warnings.yaml: document 1 (VirtualService default/edge)";
    let want = [
        format!("{vs}: spec.gateways[1]: gateway \"istio-system/ingress\" is not acted on: fedmesh applies only the `mesh` routes"),
        format!("{vs}: spec.http[0].redirect: {na}"),
        format!("{vs}: spec.http[1].directResponse: {na}"),
        format!("{vs}: spec.http[2].corsPolicy: {na}"),
        format!("{vs}: spec.http[2].mirrorPercent: deprecated: use mirrorPercentage"),
        format!("{vs}: spec.http[2].rewrite.uriRegexRewrite: {na}"),
        format!("{vs}: spec.tls[0]: {na}"),
        "warnings.yaml: document 2 (DestinationRule default/edge): spec.trafficPolicy.outlierDetection.consecutiveErrors: deprecated: read as consecutiveGatewayErrors (5xx not counted) unless consecutive5xxErrors or consecutiveGatewayErrors is set; use those".to_string(),
        format!("warnings.yaml: document 2 (DestinationRule default/edge): spec.trafficPolicy.tunnel: {na}"),
        format!("warnings.yaml: document 3 (Sidecar default/edge): spec.ingress[0]: {na}"),
    ];
    assert_eq!(got, want);
    let w = &p.warnings[1];
    assert_eq!(
        (
            w.file.as_str(),
            w.document,
            w.kind.as_deref(),
            w.name.as_deref(),
            w.path.as_str()
        ),
        (
            "warnings.yaml",
            1,
            Some("VirtualService"),
            Some("edge"),
            "spec.http[0].redirect"
        )
    );
}

// === storage round trip ===

#[test]
fn round_trip_through_storage() {
    for f in GOOD {
        for doc in good(f).documents {
            let stored = doc.to_json();
            let back =
                Document::from_json(&stored).unwrap_or_else(|e| panic!("{f}: {}: {e}", doc.name));
            assert_eq!(back, doc, "{f}: {}", doc.name);
            // Stable: storing again gives the same JSON.
            assert_eq!(back.to_json(), stored, "{f}: {}", doc.name);
            // The stored form is itself valid YAML input.
            let text = serde_json::to_string_pretty(&stored).unwrap();
            let again = parse_yaml("stored.json", &text, &ns("elsewhere")).unwrap();
            assert_eq!(
                again.documents,
                std::slice::from_ref(&doc),
                "{f}: {}",
                doc.name
            );
        }
    }
}

#[test]
fn from_json_validates_like_yaml() {
    let mut v = good("bookinfo-reviews.yaml").documents[0].to_json();
    v["spec"]["http"][1]["retries"]["attempts"] = serde_json::json!(-1);
    let e = Document::from_json(&v).unwrap_err();
    assert_eq!(
        e.to_string(),
        "<stored>: document 1 (VirtualService default/reviews): spec.http[1].retries.attempts: must be >= 0, got -1"
    );
    assert_eq!(
        e,
        PolicyError {
            file: "<stored>".into(),
            document: 1,
            kind: Some("VirtualService".into()),
            namespace: Some("default".into()),
            name: Some("reviews".into()),
            path: "spec.http[1].retries.attempts".into(),
            reason: "must be >= 0, got -1".into(),
        }
    );

    let mut v = good("bookinfo-reviews.yaml").documents[0].to_json();
    v["metadata"].as_object_mut().unwrap().remove("namespace");
    let e = Document::from_json(&v).unwrap_err();
    assert_eq!(
        e.to_string(),
        "<stored>: document 1 (VirtualService reviews): metadata.namespace: is required"
    );

    let mut v = good("bookinfo-reviews.yaml").documents[0].to_json();
    v["spec"]["http"][0]["route"][0]["destination"]["hots"] = serde_json::json!("x");
    let e = Document::from_json(&v).unwrap_err();
    assert_eq!(
        e.to_string(),
        "<stored>: document 1 (VirtualService default/reviews): spec.http[0].route[0].destination.hots: unknown field `hots`, expected one of `host`, `subset`, `port`"
    );
}

// === refusals ===

#[test]
fn the_display_format() {
    let yaml = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    retries: {attempts: -1}
";
    assert_eq!(
        errors_of("f.yaml", yaml),
        ["f.yaml: document 1 (VirtualService default/reviews): spec.http[0].retries.attempts: must be >= 0, got -1"]
    );
}

#[test]
fn unknown_fields() {
    assert_bad(
        "unknown-fields.yaml",
        &[
            "document 1 (VirtualService default/reviews): specs: unknown field `specs`, expected one of `apiVersion`, `kind`, `metadata`, `spec`, `status`",
            "document 1 (VirtualService default/reviews): spec: is required",
            "document 2 (VirtualService default/ratings): spec.http[0].retries.attemps: unknown field `attemps`, expected one of `attempts`, `perTryTimeout`, `retryOn`, `retryRemoteLocalities`, `retryIgnorePreviousHosts`, `backoff`",
            "document 3 (DestinationRule default/ratings): metadata.lables: unknown field `lables`, expected one of `name`, `namespace`, `labels`, `annotations`, `generateName`, `uid`, `resourceVersion`, `generation`, `creationTimestamp`, `deletionTimestamp`, `deletionGracePeriodSeconds`, `managedFields`, `selfLink`, `finalizers`, `ownerReferences`",
            "document 3 (DestinationRule default/ratings): spec.trafficPolicy.outlierDetection.consecutive5xxError: unknown field `consecutive5xxError`, expected one of `splitExternalLocalOriginErrors`, `consecutiveLocalOriginFailures`, `consecutiveGatewayErrors`, `consecutive5xxErrors`, `consecutiveErrors`, `interval`, `baseEjectionTime`, `maxEjectionPercent`, `minHealthPercent`, `outlierDetectionHttpErrorCodes`",
        ],
    );
}

#[test]
fn wrong_types() {
    assert_bad(
        "wrong-types.yaml",
        &[
            "document 1 (VirtualService default/quoted): spec.http[0].retries.attempts: invalid type: string \"3\", expected i32",
            "document 2 (VirtualService default/fraction): spec.http[0].retries.attempts: invalid type: floating point `3.5`, expected i32",
            "document 3 (VirtualService default/huge): spec.http[0].route[0].weight: invalid value: integer `3000000000`, expected i32",
            "document 4 (DestinationRule default/enum): spec.trafficPolicy.loadBalancer.simple: unknown variant `FASTEST`, expected one of `UNSPECIFIED`, `LEAST_CONN`, `RANDOM`, `PASSTHROUGH`, `ROUND_ROBIN`, `LEAST_REQUEST`",
            "document 5 (Sidecar default/hosts-not-a-list): spec.egress[0].hosts: invalid type: string \"./*\", expected a sequence",
        ],
    );
}

#[test]
fn out_of_range() {
    // Note weight 150 on the second destination is accepted: since Istio
    // 1.15 weights are relative, only negative weights are refused.
    assert_bad(
        "out-of-range.yaml",
        &[
            "document 1 (VirtualService default/reviews): spec.http[0].fault.delay.percent: must be between 0 and 100, got 120",
            "document 1 (VirtualService default/reviews): spec.http[0].fault.abort.percentage.value: must be between 0 and 100, got 101",
            "document 1 (VirtualService default/reviews): spec.http[0].fault.abort.httpStatus: must be an HTTP status 200 to 599, got 700",
            "document 1 (VirtualService default/reviews): spec.http[0].mirrorPercentage.value: must be between 0 and 100, got -5",
            "document 1 (VirtualService default/reviews): spec.http[0].retries.attempts: must be >= 0, got -1",
            "document 1 (VirtualService default/reviews): spec.http[0].route[0].destination.port.number: must be a port 1 to 65535, got 70000",
            "document 1 (VirtualService default/reviews): spec.http[0].route[0].weight: must be >= 0, got -10",
            "document 2 (DestinationRule default/reviews): spec.trafficPolicy.outlierDetection.consecutiveErrors: must be >= 0, got -2",
            "document 2 (DestinationRule default/reviews): spec.trafficPolicy.outlierDetection.maxEjectionPercent: must be between 0 and 100, got 120",
            "document 2 (DestinationRule default/reviews): spec.trafficPolicy.outlierDetection.minHealthPercent: must be between 0 and 100, got -1",
            "document 2 (DestinationRule default/reviews): spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests: must be >= 0, got -1",
            "document 2 (DestinationRule default/reviews): spec.trafficPolicy.connectionPool.http.maxRetries: must be >= 0, got -3",
            "document 2 (DestinationRule default/reviews): spec.trafficPolicy.connectionPool.tcp.maxConnections: must be >= 0, got -1",
        ],
    );
}

#[test]
fn weights_above_100_are_relative() {
    let yaml = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 150
    - destination: {host: reviews, subset: v2}
      weight: 50
";
    let p = parse_yaml("w.yaml", yaml, &ns("default")).unwrap();
    let route = &vs(&p.documents[0]).http[0];
    let to_v1 = (0..200)
        .filter(|r| {
            route
                .pick_destination(*r)
                .unwrap()
                .destination
                .subset
                .as_deref()
                == Some("v1")
        })
        .count();
    assert_eq!(to_v1, 150);
}

#[test]
fn durations() {
    assert_bad(
        "durations.yaml",
        &[
            "document 1 (VirtualService default/no-unit): spec.http[0].timeout: invalid duration \"10\": missing unit (use ns, us, ms, s, m or h)",
            "document 2 (VirtualService default/negative): spec.http[0].retries.perTryTimeout: invalid duration \"-1s\": must not be negative",
            "document 3 (DestinationRule default/bad-unit): spec.trafficPolicy.outlierDetection.interval: invalid duration \"1x\": unknown unit (use ns, us, ms, s, m or h)",
            "document 4 (VirtualService default/number): spec.http[0].timeout: invalid type: integer `10`, expected a duration string such as \"1.5s\"",
            "document 5 (VirtualService default/too-small): spec.http[0].fault.delay.fixedDelay: must be a whole number of milliseconds, got 1500us",
            "document 5 (VirtualService default/too-small): spec.http[0].timeout: must be at least 1ms, got 0s",
        ],
    );
}

#[test]
fn regexes() {
    assert_bad(
        "regex.yaml",
        &[
            "document 1 (VirtualService default/uri): spec.http[0].match[0].uri: invalid regex \"/api/(v1|v2\": unclosed group",
            "document 2 (VirtualService default/header): spec.http[0].match[0].headers.x-user: invalid regex \"*admin\": repetition operator missing expression",
        ],
    );
}

#[test]
fn string_matches() {
    assert_bad(
        "string-match.yaml",
        &[
            "document 1 (VirtualService default/two): spec.http[0].match[0].uri: must set only one of exact, prefix or regex, got exact and prefix",
            "document 2 (VirtualService default/none): spec.http[0].match[0].method: must set one of exact, prefix or regex",
            "document 3 (VirtualService default/empty-prefix): spec.http[0].match[0].headers.end-user: prefix must not be empty",
        ],
    );
}

#[test]
fn subsets() {
    assert_bad(
        "subsets.yaml",
        &[
            "document 1 (DestinationRule default/reviews): spec.subsets[2].name: duplicate subset name \"v1\" (first defined at spec.subsets[0])",
            "document 1 (DestinationRule default/reviews): spec.subsets[3].name: invalid subset name \"V4\": must contain only lowercase letters, digits and '-' (RFC 1123 label)",
        ],
    );
}

#[test]
fn weights_summing_to_zero() {
    let why = "weights sum to 0: with more than one destination, at least one weight must be positive (weights are relative)";
    assert_bad(
        "weights.yaml",
        &[
            &format!("document 1 (VirtualService default/reviews): spec.http[0].route: {why}"),
            &format!("document 1 (VirtualService default/reviews): spec.tcp[0].route: {why}"),
        ],
    );
}

#[test]
fn duplicate_resources() {
    assert_bad(
        "duplicates.yaml",
        &["document 4 (VirtualService default/reviews): metadata.name: duplicate VirtualService default/reviews: already defined in document 1"],
    );
}

#[test]
fn kinds_and_versions() {
    assert_bad(
        "kinds.yaml",
        &[
            "document 1 (VirtualService default/future): apiVersion: unsupported apiVersion \"networking.istio.io/v2\": expected one of networking.istio.io/v1alpha3, networking.istio.io/v1beta1, networking.istio.io/v1",
            "document 1 (VirtualService default/future): spec: at least one of http, tcp or tls routes is required",
            "document 2 (default/kindless): kind: is required: one of VirtualService, DestinationRule, Sidecar, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, TrafficWeights",
            "document 2 (default/kindless): apiVersion: is required: one of networking.istio.io/v1alpha3, networking.istio.io/v1beta1, networking.istio.io/v1, security.istio.io/v1beta1, security.istio.io/v1, fedmesh.io/v1",
            "document 3 (Gateway default/ingress): kind: unsupported kind \"Gateway\": expected one of VirtualService, DestinationRule, Sidecar, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, TrafficWeights",
            "document 4 (ConfigMap default/settings): data: unknown field `data`, expected one of `apiVersion`, `kind`, `metadata`, `spec`, `status`",
            "document 4 (ConfigMap default/settings): kind: unsupported kind \"ConfigMap\": expected one of VirtualService, DestinationRule, Sidecar, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, TrafficWeights",
            "document 4 (ConfigMap default/settings): apiVersion: unsupported apiVersion \"v1\": expected one of networking.istio.io/v1alpha3, networking.istio.io/v1beta1, networking.istio.io/v1, security.istio.io/v1beta1, security.istio.io/v1, fedmesh.io/v1",
            "document 5: a document must be a mapping, got a sequence",
        ],
    );
}

#[test]
fn yaml_syntax_errors_have_lines_and_do_not_stop_the_file() {
    assert_bad(
        "syntax.yaml",
        &[
            "document 2: invalid YAML: did not find expected ',' or ']' at line 15 column 7, while parsing a flow sequence at line 14 column 10",
            "document 3 (DestinationRule default/after): spec.host: invalid host \"\": must not be empty",
            "document 4: invalid YAML: metadata: duplicate entry with key \"name\" at line 26 column 3",
        ],
    );
}

#[test]
fn every_error_of_a_file_is_reported() {
    let vs = "document 1 (VirtualService Prod/Reviews)";
    let sc = "document 2 (Sidecar default/scope)";
    let label = "must contain only lowercase letters, digits and '-' (RFC 1123 label)";
    assert_bad(
        "many-errors.yaml",
        &[
            &format!("{vs}: metadata.namespace: invalid namespace \"Prod\": {label}"),
            &format!("{vs}: metadata.name: invalid name \"Reviews\": {label}"),
            &format!("{vs}: spec.hosts: at least one host is required (delegate VirtualServices without hosts are not supported)"),
            &format!("{vs}: spec.http[0]: must set one of route, redirect, directResponse or delegate"),
            &format!("{vs}: spec.http[0].match[0].headers.bad header: \"bad header\" is not a valid header name"),
            &format!("{vs}: spec.http[0].match[0].sourceNamespace: invalid namespace \"Not_A_Label\": {label}"),
            &format!("{vs}: spec.http[0].retries.attempts: retry settings are configured but attempts is 0 (retries disabled): set attempts"),
            &format!("{vs}: spec.http[1].route: cannot be combined with redirect"),
            &format!("{vs}: spec.http[1].route[0].destination.host: destination host must not be *"),
            &format!("{vs}: spec.http[1].route[1].destination.subset: invalid subset name \"v_1\": {label}"),
            &format!("{vs}: spec.http[1].timeout: must be at least 1ms, got 100us"),
            &format!("{vs}: spec.exportTo: cannot mix public (*) with other exportTo entries: * already exports everywhere"),
            &format!("{sc}: spec.egress[0]: the egress listener without a port must be the last one"),
            &format!("{sc}: spec.egress[0].hosts: at least one host is required"),
            &format!("{sc}: spec.egress[1].port.protocol: unsupported protocol \"HTTPX\": use one of TCP, UDP, GRPC, GRPC-WEB, HTTP, HTTP_PROXY, HTTP2, HTTPS, TLS, MONGO, REDIS, MYSQL"),
            &format!("{sc}: spec.egress[1].port.targetPort: targetPort has no effect on Sidecars (Istio refuses it too)"),
            &format!("{sc}: spec.egress[1].hosts[0]: host \"reviews\" must be of the form namespace/dnsName"),
            &format!("{sc}: spec.egress[1].hosts[1]: host \"prod/reviews\": short name \"reviews\" is not allowed: use a fully qualified name such as reviews.prod.svc.cluster.local"),
            &format!("{sc}: spec.egress[2].port.number: port 8080 is used by another egress listener"),
        ],
    );
}

#[test]
fn retry_on() {
    assert_bad(
        "retry-on.yaml",
        &["document 1 (VirtualService default/reviews): spec.http[0].retries.retryOn: \"bogus\" is not a retry policy: use an HTTP status code 100 to 599 or one of 5xx, gateway-error, reset, reset-before-request, connect-failure, envoy-ratelimited, retriable-4xx, refused-stream, retriable-status-codes, retriable-headers, http3-post-connect-failure, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable"],
    );
}

#[test]
fn destination_rule_rules() {
    let dr = "document 1 (DestinationRule default/reviews)";
    let tp = "spec.trafficPolicy";
    assert_bad(
        "destination-rule.yaml",
        &[
            &format!("{dr}: {tp}.loadBalancer: must set only one of simple, consistentHash or backendUtilization, got simple and consistentHash"),
            &format!("{dr}: {tp}.loadBalancer.consistentHash: must set exactly one hash key (httpHeaderName, httpCookie, useSourceIp: true or httpQueryParameterName), got httpHeaderName and useSourceIp"),
            &format!("{dr}: {tp}.loadBalancer.consistentHash.maglev.tableSize: must be a prime number, got 1000"),
            &format!("{dr}: {tp}.tls.clientCertificate: is required for MUTUAL"),
            &format!("{dr}: {tp}.tls.privateKey: is required for MUTUAL"),
            &format!("{dr}: {tp}.portLevelSettings[1].port.number: port 9080 already has settings at {tp}.portLevelSettings[0]"),
            &format!("{dr}: {tp}.portLevelSettings[2].port.number: must be a port 1 to 65535, got 0"),
            &format!("{dr}: {tp}.portLevelSettings[3].port: is required"),
            &format!("{dr}: spec.subsets[0].trafficPolicy: must set at least one field"),
        ],
    );
}

#[test]
fn list_items_carry_their_index() {
    let yaml = "
apiVersion: v1
kind: List
items:
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: a}
  spec: {host: a}
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: b}
  spec: {host: 'b..c'}
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: a}
  spec: {host: a}
";
    assert_eq!(
        errors_of("l.yaml", yaml),
        [
            "l.yaml: document 1 (DestinationRule default/b): items[1].spec.host: invalid host \"b..c\": label \"\" is not a DNS-1123 label",
            "l.yaml: document 1 (DestinationRule default/a): items[2].metadata.name: duplicate DestinationRule default/a: already defined in document 1",
        ]
    );
    let bad_list = "apiVersion: v1\nkind: List\nitems: {}\nextra: 1\n";
    assert_eq!(
        errors_of("l.yaml", bad_list),
        ["l.yaml: document 1: extra: unknown field `extra`, expected one of `apiVersion`, `kind`, `metadata`, `items`"]
    );
}

#[test]
fn small_refusals() {
    let head = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {host: r}\n";
    for (extra, want) in [
        (
            "    fault: {delay: {percentage: {value: 5}}}\n",
            "spec.http[0].fault.delay: fixedDelay is required",
        ),
        (
            "    fault: {delay: {exponentialDelay: 1s}}\n",
            "spec.http[0].fault.delay.exponentialDelay: exponential delays are not supported (Istio refuses them too): use fixedDelay",
        ),
        (
            "    fault: {abort: {http2Error: REFUSED_STREAM}}\n",
            "spec.http[0].fault.abort.http2Error: HTTP/2 error aborts are not supported (Istio refuses them too): use httpStatus or grpcStatus",
        ),
        (
            "    fault: {abort: {grpcStatus: NOPE}}\n",
            "spec.http[0].fault.abort.grpcStatus: unknown gRPC status \"NOPE\": use one of OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED",
        ),
        (
            "    fault: {}\n",
            "spec.http[0].fault: must set delay, abort or both",
        ),
        (
            "    fault: {abort: {httpStatus: 503, percentage: {value: 0.00001}}}\n",
            "spec.http[0].fault.abort.percentage.value: must be 0 or at least 0.0001, got 0.00001",
        ),
        (
            "    mirror: {host: m}\n    mirrors: [{destination: {host: n}}]\n",
            "spec.http[0].mirrors: cannot be combined with mirror",
        ),
        (
            "    mirror: {host: m}\n    mirrorPercent: 150\n",
            "spec.http[0].mirrorPercent: must be between 0 and 100, got 150",
        ),
        (
            "    rewrite: {authority: a}\n    headers: {request: {set: {host: b}}}\n",
            "spec.http[0].headers.request.set.host: authority is already set to \"a\"; it cannot also be set to \"b\"",
        ),
        (
            "    headers: {response: {set: {':status': '200'}}}\n",
            "spec.http[0].headers.response.set.:status: header \":status\" cannot be modified: ':' prefix is reserved",
        ),
        (
            "    match: [{headers: {'@request.auth.claims.group': {exact: admin}}}]\n",
            "spec.http[0].match[0].headers.@request.auth.claims.group: JWT claim based routing is only supported for gateways, and fedmesh has none",
        ),
        (
            "    retries: {attempts: 1, retryOn: '5xx, reset'}\n",
            "spec.http[0].retries.retryOn: \" reset\" is not a retry policy: use an HTTP status code 100 to 599 or one of 5xx, gateway-error, reset, reset-before-request, connect-failure, envoy-ratelimited, retriable-4xx, refused-stream, retriable-status-codes, retriable-headers, http3-post-connect-failure, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable",
        ),
    ] {
        let yaml = format!("{head}{extra}");
        assert_eq!(
            errors_of("s.yaml", &yaml),
            [format!("s.yaml: document 1 (VirtualService default/r): {want}")],
            "{extra}"
        );
    }
}

#[test]
fn tags_and_non_finite_numbers() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [!secret r]\n";
    assert_eq!(
        errors_of("t.yaml", yaml),
        ["t.yaml: document 1 (VirtualService default/r): spec.hosts[0]: YAML tags are not supported, got !secret"]
    );
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    mirror: {host: m}\n    mirrorPercentage: {value: .nan}\n";
    assert_eq!(
        errors_of("n.yaml", yaml),
        ["n.yaml: document 1 (VirtualService default/r): spec.http[0].mirrorPercentage.value: .nan is not a finite number"]
    );
}

#[test]
fn empty_files_and_documents() {
    for text in ["", "\n", "# nothing\n", "---\n", "---\n---\n...\n"] {
        let p = parse_yaml("e.yaml", text, &ns("default")).unwrap();
        assert!(p.documents.is_empty() && p.warnings.is_empty(), "{text:?}");
    }
}

#[test]
fn null_means_unset() {
    let yaml = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, creationTimestamp: null}
spec:
  hosts: [r]
  gateways: null
  http:
  - route: [{destination: {host: r, subset: null}}]
    retries: null
    match: null
";
    let p = parse_yaml("n.yaml", yaml, &ns("default")).unwrap();
    let route = &vs(&p.documents[0]).http[0];
    assert!(route.retries.is_none() && route.r#match.is_empty());
    assert!(route.route[0].destination.subset.is_none());
    // A null inside a list is still a type error.
    let yaml = yaml.replace("hosts: [r]", "hosts: [null]");
    assert_eq!(
        errors_of("n.yaml", &yaml),
        ["n.yaml: document 1 (VirtualService default/r): spec.hosts[0]: invalid type: null, expected a string"]
    );
}

#[test]
fn anchors_and_merge_keys() {
    let yaml = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: &v1 {version: v1, app: reviews}
  - name: v1-canary
    labels:
      <<: *v1
      track: canary
";
    let p = parse_yaml("a.yaml", yaml, &ns("default")).unwrap();
    let d = dr(&p.documents[0]);
    assert_eq!(d.subsets[1].labels.len(), 3);
    assert_eq!(d.subsets[1].labels["version"], "v1");
}

#[test]
fn kind_strings() {
    for k in [Kind::VirtualService, Kind::DestinationRule, Kind::Sidecar] {
        assert_eq!(k.as_str().parse::<Kind>().unwrap(), k);
        assert_eq!(k.to_string(), k.as_str());
        assert_eq!(
            serde_json::to_value(k).unwrap(),
            serde_json::json!(k.as_str())
        );
    }
    assert_eq!(
        "Gateway".parse::<Kind>().unwrap_err().to_string(),
        "unsupported kind \"Gateway\": expected one of VirtualService, DestinationRule, Sidecar, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, TrafficWeights"
    );
}

// === robustness ===

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary YAML-ish text never panics the parser.
    #[test]
    fn arbitrary_text_never_panics(text in "[-a-zA-Z0-9:{}\\[\\],.#&*!|>'\"/~%@?<= \n\t]{0,300}") {
        let _ = parse_yaml("p.yaml", &text, &ns("default"));
    }

    /// Good files with a few bytes changed never panic, and errors always name the file.
    #[test]
    fn mutated_good_files_never_panic(
        file in 0..GOOD.len(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), "[-a-z0-9:{}\\[\\] \n\"*.]{0,3}"), 1..6),
    ) {
        let mut text = read(GOOD[file]);
        for (at, insert) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            let end = (i + insert.len().min(2)).min(text.len());
            let end = (end..=text.len()).find(|e| text.is_char_boundary(*e)).unwrap_or(text.len());
            text.replace_range(i..end, &insert);
        }
        if let Err(errs) = parse_yaml("m.yaml", &text, &ns("default")) {
            prop_assert!(!errs.is_empty());
            for e in errs {
                prop_assert!(e.to_string().starts_with("m.yaml: document "), "{}", e);
            }
        }
    }

    /// Every accepted document round-trips through storage.
    #[test]
    fn accepted_documents_round_trip(
        attempts in 0..10i32,
        weights in proptest::collection::vec(0..1000i32, 1..4),
        timeout_ms in 1..100_000u64,
        pct in 0.0..=100.0f64,
    ) {
        let mut yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [r]\n  http:\n  - timeout: {timeout_ms}ms\n    retries: {{attempts: {attempts}}}\n    mirror: {{host: m}}\n    mirrorPercentage: {{value: {pct:?}}}\n    route:\n"
        );
        for (i, w) in weights.iter().enumerate() {
            yaml.push_str(&format!("    - destination: {{host: r, subset: s{i}}}\n      weight: {w}\n"));
        }
        let sum: i32 = weights.iter().sum();
        match parse_yaml("r.yaml", &yaml, &ns("default")) {
            Ok(p) => {
                prop_assert!(weights.len() == 1 || sum > 0);
                let doc = &p.documents[0];
                let back = Document::from_json(&doc.to_json()).unwrap();
                prop_assert_eq!(&back, doc);
            }
            Err(errs) => {
                prop_assert!(weights.len() > 1 && sum == 0, "{:?}", errs);
            }
        }
    }
}

/// Hostile files get a bounded, named refusal instead of minutes and
/// gigabytes: 240 KB of `---` lines, 400 KB of nested flow sequences.
#[test]
fn document_count_and_nesting_are_bounded() {
    let many = "---\n".repeat(60_000);
    let e = errors_of("many.yaml", &many);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("60000 documents: at most 10000 in one file"),
        "{e:?}"
    );
    let deep = format!("a: {}", "[".repeat(200_000));
    let e = errors_of("deep.yaml", &deep);
    assert!(
        e[0].contains("flow collections nested deeper than 64 levels"),
        "{e:?}"
    );
    // Brackets in quoted scalars and comments are not nesting.
    let quoted = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r # {}\nspec:\n  hosts: [\"{}\"]\n",
        "[".repeat(100),
        "[".repeat(100)
    );
    let e = errors_of("quoted.yaml", &quoted);
    assert!(!e.iter().any(|e| e.contains("nested deeper")), "{e:?}");
    // Many empty documents, then a bad one: its line is the file's.
    let text = format!("{}a: [1,\n", "---\n".repeat(9_000));
    let e = errors_of("late.yaml", &text);
    assert!(e[0].contains("document 9000"), "{e:?}");
    // Line 9001 holds `a: [1,`; the parser stops at the end, line 9002.
    assert!(e[0].contains("at line 9002 column 1"), "{e:?}");
}
