//! The Grafana dashboard in `deploy/grafana/fedmesh-clusters.json` against
//! what fedmesh really exports: the JSON parses, every panel has a title and
//! PromQL targets, and every metric and label those queries name is on the
//! `/metrics` of real agents and a real east-west gateway after real
//! cross-cluster traffic (c1 -> c3 through c3's gateway), with both clusters
//! named on every series that carries them.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../mesh-agent/tests/support/mod.rs"]
mod support;

use mesh_test::http::Backend;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use support::{get, stop, wait_endpoints, Mesh};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/fedmesh-clusters.json"
);
/// The whole mesh scenario, start to scrape to stop.
const PATIENCE: Duration = Duration::from_secs(120);
/// One scrape of one `/metrics`.
const SCRAPE_PATIENCE: Duration = Duration::from_secs(5);
const CLUSTER_LABELS: [&str; 2] = ["source_cluster", "destination_cluster"];

const FRONTEND: &str = "the c1 frontend agent";
const REVIEWS: &str = "the c3 reviews agent";
const GATEWAY: &str = "the c3 east-west gateway";

// === the dashboard ===

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD)
        .unwrap_or_else(|e| panic!("cannot read the dashboard {DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Every panel, the panels nested in rows included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(ps: &'a Value, out: &mut Vec<&'a Value>) {
        for p in ps.as_array().map(Vec::as_slice).unwrap_or_default() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// The `expr` of each of a panel's targets, trimmed (empty when missing).
fn panel_exprs(p: &Value) -> Vec<String> {
    p["targets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|t| t["expr"].as_str().unwrap_or_default().trim().to_string())
        .collect()
}

/// (panel title, expr) of every target of every panel.
fn queries(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            panel_exprs(p).into_iter().map(move |e| (title.clone(), e))
        })
        .collect()
}

/// The metric selector and the label of a `label_values(metric, label)`
/// template variable (its query as a string or as the editor's object).
fn label_values(v: &Value) -> Option<(String, String)> {
    let q = match &v["query"] {
        Value::String(s) => s.as_str(),
        q => q["query"].as_str()?,
    };
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_string(), label.trim().to_string()))
}

/// (name, metric selector, label) of every query template variable.
fn label_value_vars(d: &Value) -> Vec<(String, String, String)> {
    d["templating"]["list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let (selector, label) = label_values(v).unwrap_or_else(|| {
                panic!("variable {name}: not a label_values(metric, label) query: {v}")
            });
            (name, selector, label)
        })
        .collect()
}

// === what a PromQL expression names ===

/// Not metric names: PromQL functions and aggregations (and Grafana's
/// `label_values`). An identifier followed by `(` must be one of these.
const FUNCTIONS: &[&str] = &[
    // Aggregation operators.
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    // Functions.
    "abs",
    "absent",
    "absent_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "double_exponential_smoothing",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "info",
    "irate",
    "label_join",
    "label_replace",
    "ln",
    "log2",
    "log10",
    "minute",
    "month",
    "predict_linear",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sort_by_label",
    "sort_by_label_desc",
    "sqrt",
    "time",
    "timestamp",
    "vector",
    "year",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "quantile_over_time",
    "stddev_over_time",
    "stdvar_over_time",
    "last_over_time",
    "present_over_time",
    "mad_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "cos",
    "cosh",
    "sin",
    "sinh",
    "tan",
    "tanh",
    "deg",
    "rad",
    "pi",
    // `@ start()` / `@ end()`.
    "start",
    "end",
    // Grafana's template-variable function.
    "label_values",
];

/// Keywords introducing a label list: `by (a, b)`, `on (a)`, `group_left (c)`.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other words that are never metric names.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "le",
];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A string literal's value, escapes resolved.
    Str(String),
    /// A number or a duration (`0.99`, `5m`, `1e3`).
    Num,
    /// A Grafana variable (`$__rate_interval`, `${source_cluster}`).
    Var,
    Punct(char),
}

fn tokenize(e: &str) -> Result<Vec<Tok>, String> {
    let cs: Vec<char> = e.chars().collect();
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_cont = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            // A comment, to the end of the line.
            while i < cs.len() && cs[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let mut s = String::new();
            i += 1;
            loop {
                let Some(&d) = cs.get(i) else {
                    return Err(format!("unterminated string in {e:?}"));
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' && c != '`' {
                    let Some(&n) = cs.get(i) else {
                        return Err(format!("unterminated string in {e:?}"));
                    };
                    i += 1;
                    s.push(n);
                } else {
                    s.push(d);
                }
            }
            out.push(Tok::Str(s));
        } else if c == '$' {
            i += 1;
            if cs.get(i) == Some(&'{') {
                while i < cs.len() && cs[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < cs.len() && (cs[i].is_ascii_alphanumeric() || cs[i] == '_') {
                    i += 1;
                }
            }
            out.push(Tok::Var);
        } else if c.is_ascii_digit()
            || (c == '.' && cs.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < cs.len() && (cs[i].is_ascii_alphanumeric() || cs[i] == '_' || cs[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num);
        } else if ident_start(c) {
            let start = i;
            while i < cs.len() && ident_cont(cs[i]) {
                i += 1;
            }
            out.push(Tok::Ident(cs[start..i].iter().collect()));
        } else {
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    Ok(out)
}

/// The metric names and label names a PromQL expression refers to.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

/// Reads label matchers from just after `{`; returns the index after `}`.
fn matchers(t: &[Tok], mut i: usize, r: &mut Refs) -> Result<usize, String> {
    loop {
        match t.get(i) {
            None => return Err("unclosed {".into()),
            Some(Tok::Punct('}')) => return Ok(i + 1),
            Some(Tok::Punct(',')) => i += 1,
            Some(Tok::Ident(name)) => {
                i += 1;
                let mut op = String::new();
                while let Some(Tok::Punct(c @ ('=' | '!' | '~'))) = t.get(i) {
                    op.push(*c);
                    i += 1;
                }
                if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
                    return Err(format!("label {name}: bad matcher operator {op:?}"));
                }
                let Some(Tok::Str(value)) = t.get(i) else {
                    return Err(format!("label {name}: no string after {op}"));
                };
                i += 1;
                if name != "__name__" {
                    r.labels.insert(name.clone());
                } else if op == "=" {
                    r.metrics.insert(value.clone());
                } else {
                    return Err(format!(
                        "__name__{op}{value:?} names no single metric; this test cannot check it"
                    ));
                }
            }
            Some(other) => return Err(format!("unexpected {other:?} in label matchers")),
        }
    }
}

/// Reads a label list from just after `(`; returns the index after `)`.
fn label_list(t: &[Tok], mut i: usize, r: &mut Refs) -> Result<usize, String> {
    loop {
        match t.get(i) {
            None => return Err("unclosed label list".into()),
            Some(Tok::Punct(')')) => return Ok(i + 1),
            Some(Tok::Punct(',')) => i += 1,
            Some(Tok::Ident(l)) => {
                r.labels.insert(l.clone());
                i += 1;
            }
            Some(other) => return Err(format!("unexpected {other:?} in a label list")),
        }
    }
}

/// Every metric name (a bare identifier that is no function, keyword or
/// label, or a `__name__="..."` matcher) and every label name (in `{...}`
/// matchers and `by`/`without`/`on`/`ignoring`/`group_*` lists) of `e`.
/// Strings, numbers, durations, `[...]` ranges and Grafana variables are
/// skipped; an unknown function is an error.
fn promql_refs(e: &str) -> Result<Refs, String> {
    let t = tokenize(e)?;
    let mut r = Refs::default();
    let mut i = 0;
    while i < t.len() {
        match &t[i] {
            Tok::Punct('{') => i = matchers(&t, i + 1, &mut r)?,
            Tok::Punct('[') => {
                // A range or subquery: durations and variables only.
                let mut depth = 1;
                i += 1;
                while depth > 0 {
                    match t.get(i) {
                        None => return Err("unclosed [".into()),
                        Some(Tok::Punct('[')) => depth += 1,
                        Some(Tok::Punct(']')) => depth -= 1,
                        Some(_) => {}
                    }
                    i += 1;
                }
            }
            Tok::Ident(k) => {
                let lower = k.to_ascii_lowercase();
                let call = t.get(i + 1) == Some(&Tok::Punct('('));
                if GROUPING.contains(&lower.as_str()) {
                    i += 1;
                    if call {
                        i = label_list(&t, i + 1, &mut r)?;
                    }
                } else if call {
                    if !FUNCTIONS.contains(&lower.as_str()) {
                        return Err(format!("unknown function {k}"));
                    }
                    i += 2;
                } else if FUNCTIONS.contains(&lower.as_str()) || KEYWORDS.contains(&lower.as_str())
                {
                    // `sum by (...)`, `and`, `offset 5m`, ...
                    i += 1;
                } else {
                    r.metrics.insert(k.clone());
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    Ok(r)
}

// === what /metrics says ===

/// One sample of the text exposition format.
#[derive(Debug)]
struct Sample {
    /// The series name as exposed (`..._total`, `..._bucket`).
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses one sample line (`name{a="b",c="d"} 1`, `name 1`).
fn sample(line: &str) -> Option<Sample> {
    let end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[end..];
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (key, r) = rest.split_once("=\"")?;
            let key = key.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return None;
            }
            let mut value = String::new();
            let mut chars = r.char_indices();
            let close = loop {
                let (j, c) = chars.next()?;
                match c {
                    '\\' => {
                        let (_, n) = chars.next()?;
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                    '"' => break j,
                    c => value.push(c),
                }
            };
            labels.insert(key.to_string(), value);
            rest = &r[close + 1..];
        }
    }
    // The value; an exemplar (` # {...} 1`) may follow.
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Every sample of a scrape; the line that does not parse on failure.
fn parse_scrape(text: &str) -> Result<Vec<Sample>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| sample(l).ok_or_else(|| l.to_string()))
        .collect()
}

/// `GET /metrics` on an admin listener over loopback HTTP, bounded in time.
async fn scrape_metrics(what: &str, admin: SocketAddr) -> Vec<Sample> {
    let r = tokio::time::timeout(SCRAPE_PATIENCE, get(admin, "admin", "/metrics", &[]))
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: /metrics on {admin} did not answer within {SCRAPE_PATIENCE:?}")
        });
    assert_eq!(r.status, 200, "{what}: /metrics on {admin}: {r:?}");
    parse_scrape(&r.body)
        .unwrap_or_else(|l| panic!("{what}: unparsable /metrics line {l:?} in\n{}", r.body))
}

/// A federation with c1 (the frontend) and c3 on another network behind its
/// east-west gateway (reviews, exported); the frontend calls reviews through
/// the gateway. Returns what each of the three exports afterwards.
async fn cross_cluster_scrapes() -> Vec<(&'static str, Vec<Sample>)> {
    let m = Mesh::one_cluster_on("127.0.0.1").await;
    let gw = m
        .remote_cluster("c3", "n3", &["--admin", "127.0.0.1:0"])
        .await;
    let gw_admin = gw.admin.expect("the gateway has an admin listener");
    let b = Backend::start("reviews-c3").await;
    let reviews = m
        .agent(m.args("c3", "eu-west", "eu-west-1a", "reviews", b.addr, 9080))
        .await;
    m.export("reviews", "c3").await;
    let app = Backend::start("frontend").await;
    let frontend = m.c1_agent("frontend", app.addr, 8080, &[]).await;
    wait_endpoints(&frontend, "reviews", 1).await;
    // The gateway names a connection's source cluster by its source
    // address. Everything here is on 127.0.0.1, which is also c3's gateway
    // address: wait until the registry's frontend endpoint (c1) names it,
    // as it does once the gateway has the frontend's registration.
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    let gw_peer = || gw.routes.load().peer(loopback).map(ToString::to_string);
    mesh_test::assert_eventually!(gw_peer().as_deref() == Some("c1"), Duration::from_secs(15));

    // Cross-cluster traffic: c1 -> c3 through the gateway.
    mesh_test::assert_eventually!(
        get(frontend.outbound, "reviews:9080", "/", &[])
            .await
            .status
            == 200,
        Duration::from_secs(15)
    );
    for _ in 0..10 {
        let r = get(frontend.outbound, "reviews:9080", "/", &[]).await;
        assert_eq!(
            (r.status, r.header("x-backend")),
            (200, "reviews-c3"),
            "{r:?}"
        );
    }

    let scrapes = vec![
        (
            FRONTEND,
            scrape_metrics(FRONTEND, frontend.admin.expect("admin listener")).await,
        ),
        (
            REVIEWS,
            scrape_metrics(REVIEWS, reviews.admin.expect("admin listener")).await,
        ),
        (GATEWAY, scrape_metrics(GATEWAY, gw_admin).await),
    ];
    stop(vec![reviews, frontend]).await;
    gw.drain().await;
    scrapes
}

// === tests ===

fn set(xs: &[&str]) -> BTreeSet<String> {
    xs.iter().map(ToString::to_string).collect()
}

#[test]
fn the_promql_reader_finds_metrics_and_labels_not_functions() {
    let r = promql_refs(
        r#"sum by (source_cluster, destination_cluster) (rate(fedmesh_agent_requests_total{direction="outbound", code!~"5..", source_cluster=~"$source_cluster"}[$__rate_interval]))"#,
    )
    .unwrap();
    assert_eq!(r.metrics, set(&["fedmesh_agent_requests_total"]));
    assert_eq!(
        r.labels,
        set(&["code", "destination_cluster", "direction", "source_cluster"])
    );

    let r = promql_refs(
        "histogram_quantile(0.99, sum by (le, service) (rate(a_bucket{direction=\"outbound\"}[5m])))",
    )
    .unwrap();
    assert_eq!(r.metrics, set(&["a_bucket"]));
    assert_eq!(r.labels, set(&["direction", "le", "service"]));

    let r = promql_refs(
        "100 * sum(x) / on (s) group_left sum without(d) (irate(y[1m:10s] offset 5m)) > bool 0 or up",
    )
    .unwrap();
    assert_eq!(r.metrics, set(&["up", "x", "y"]));
    assert_eq!(r.labels, set(&["d", "s"]));

    // Upper-case keywords, colons in a recording-rule name, a brace and an
    // escaped quote inside a string.
    let r = promql_refs(r"SUM BY (a) (increase(foo:bar:rate5m{b='x\'}'}[1h]))").unwrap();
    assert_eq!(r.metrics, set(&["foo:bar:rate5m"]));
    assert_eq!(r.labels, set(&["a", "b"]));

    let r = promql_refs(r#"{__name__="via_name", job="j"}"#).unwrap();
    assert_eq!(r.metrics, set(&["via_name"]));
    assert_eq!(r.labels, set(&["job"]));

    let r = promql_refs("clamp_min(x, 0) # y{ is a comment").unwrap();
    assert_eq!(r.metrics, set(&["x"]));
    assert!(r.labels.is_empty());

    for bad in [
        "nosuchfunction(x)",
        r#"x{a="b""#,
        "x{a}",
        r#"x{a=<"b"}"#,
        "rate(x[5m)",
        r#"{__name__=~"x|y"}"#,
    ] {
        assert!(promql_refs(bad).is_err(), "{bad} was accepted");
    }
}

#[test]
fn the_exposition_reader_reads_labels_and_values() {
    let s = sample(r#"m_bucket{le="+Inf",service="default/x",reason=""} 3"#).unwrap();
    assert_eq!(s.name, "m_bucket");
    assert_eq!(s.labels["le"], "+Inf");
    assert_eq!(s.labels["service"], "default/x");
    assert_eq!(s.labels["reason"], "");
    assert!((s.value - 3.0).abs() < f64::EPSILON);
    let s = sample(r#"m{a="q\"uote,}"} 1.5 # {trace_id="t"} 1"#).unwrap();
    assert_eq!(s.labels["a"], "q\"uote,}");
    assert!((s.value - 1.5).abs() < f64::EPSILON);
    let s = sample("plain 7").unwrap();
    assert_eq!((s.name.as_str(), s.labels.len()), ("plain", 0));
    assert!(sample("m{a=\"b\"").is_none());
    assert!(
        parse_scrape("# HELP m x\n# TYPE m counter\nm_total 1\n# EOF\n")
            .unwrap()
            .iter()
            .all(|s| s.name == "m_total")
    );
}

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["uid"], "fedmesh-clusters");
    assert_eq!(d["schemaVersion"], 39);
    let vars = d["templating"]["list"]
        .as_array()
        .expect("templating.list is an array");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in CLUSTER_LABELS {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["multi"], true, "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        let (selector, label) = label_values(v)
            .unwrap_or_else(|| panic!("{name}: not a label_values(metric, label) query: {v}"));
        assert_eq!(label, name, "{name} lists the values of {label}");
        let refs = promql_refs(&selector).unwrap_or_else(|e| panic!("{name}: {e}: {selector}"));
        assert!(!refs.metrics.is_empty(), "{name}: no metric in {selector}");
    }

    let ps = panels(&d);
    assert!(!ps.is_empty(), "the dashboard has no panels");
    let mut ids = BTreeSet::new();
    for p in &ps {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.trim().is_empty(), "a panel has no title: {p}");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{title}: no numeric id"));
        assert!(ids.insert(id), "{title}: id {id} used twice");
        let g = &p["gridPos"];
        let [h, w, x, _y] = ["h", "w", "x", "y"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k} missing: {g}"))
        });
        assert!(h > 0 && w > 0 && x + w <= 24, "{title}: gridPos {g}");
        if p["type"] == "row" {
            // A row holds panels (checked themselves); it queries nothing.
            continue;
        }
        let exprs = panel_exprs(p);
        assert!(!exprs.is_empty(), "{title}: no target");
        for e in exprs {
            assert!(!e.is_empty(), "{title}: a target has no expr");
            let refs = promql_refs(&e).unwrap_or_else(|err| panic!("{title}: {err}: {e}"));
            assert!(!refs.metrics.is_empty(), "{title}: no metric in {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_queries_is_exported_with_both_clusters_named() {
    let d = dashboard();
    let queries: Vec<(String, String, Refs)> = queries(&d)
        .into_iter()
        .map(|(title, e)| {
            let refs = promql_refs(&e).unwrap_or_else(|err| panic!("{title}: {err}: {e}"));
            (title, e, refs)
        })
        .collect();
    assert!(!queries.is_empty(), "the dashboard has no queries");
    let vars = label_value_vars(&d);
    for want in CLUSTER_LABELS {
        assert!(
            vars.iter().any(|(_, _, l)| l == want),
            "no label_values(..., {want}) variable: {vars:?}"
        );
    }

    let scrapes = tokio::time::timeout(PATIENCE, cross_cluster_scrapes())
        .await
        .unwrap_or_else(|_| {
            panic!("the mesh did not start, carry traffic and stop within {PATIENCE:?}")
        });
    let all: Vec<(&str, &Sample)> = scrapes
        .iter()
        .flat_map(|(who, ss)| ss.iter().map(move |s| (*who, s)))
        .collect();
    let names: BTreeSet<&str> = all.iter().map(|(_, s)| s.name.as_str()).collect();
    let exported: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("fedmesh_"))
        .collect();

    // Every metric a panel queries is exported, with every label it uses.
    for (title, e, refs) in &queries {
        for metric in &refs.metrics {
            assert!(
                names.contains(metric.as_str()),
                "panel {title:?} queries {metric}, which no agent or gateway exports \
                 (they export {exported:?}):\n{e}"
            );
        }
        for label in &refs.labels {
            assert!(
                all.iter()
                    .any(|(_, s)| refs.metrics.contains(&s.name) && s.labels.contains_key(label)),
                "panel {title:?} uses label {label}, which no scraped sample of {:?} carries:\n{e}",
                refs.metrics
            );
        }
    }

    // The variables' label_values name real metrics and labels.
    for (var, selector, label) in &vars {
        let refs = promql_refs(selector).unwrap_or_else(|err| panic!("{var}: {err}: {selector}"));
        assert!(!refs.metrics.is_empty(), "{var}: no metric in {selector}");
        for metric in &refs.metrics {
            assert!(
                all.iter()
                    .any(|(_, s)| &s.name == metric && s.labels.contains_key(label)),
                "variable {var}: no scraped sample of {metric} carries {label} \
                 (exported: {exported:?})"
            );
        }
    }
    for label in CLUSTER_LABELS {
        for who in [FRONTEND, REVIEWS, GATEWAY] {
            assert!(
                all.iter()
                    .any(|(w, s)| *w == who && s.labels.contains_key(label)),
                "{who} exports no series with {label}"
            );
        }
    }

    // No series names an unknown or empty cluster.
    for (who, s) in &all {
        for label in CLUSTER_LABELS {
            if let Some(v) = s.labels.get(label) {
                assert!(
                    !v.is_empty() && v != "unknown",
                    "{who}: {} has {label}={v:?}: {s:?}",
                    s.name
                );
            }
        }
    }

    // The traffic did cross: c1 -> c3 on both agents and at the gateway.
    let crossed = |who: &str, name: &str| {
        all.iter().any(|(w, s)| {
            *w == who
                && s.name == name
                && s.labels.get("source_cluster").map(String::as_str) == Some("c1")
                && s.labels.get("destination_cluster").map(String::as_str) == Some("c3")
                && s.value > 0.0
        })
    };
    for (who, name) in [
        (FRONTEND, "fedmesh_agent_requests_total"),
        (REVIEWS, "fedmesh_agent_requests_total"),
        (GATEWAY, "fedmesh_gateway_connections_total"),
        (GATEWAY, "fedmesh_gateway_bytes_total"),
    ] {
        assert!(
            crossed(who, name),
            "{who}: no {name} sample with source_cluster=\"c1\", destination_cluster=\"c3\" above 0"
        );
    }
}
