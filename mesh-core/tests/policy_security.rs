#![allow(clippy::unwrap_used, clippy::expect_used)]
//! security.istio.io policies: AuthorizationPolicy and PeerAuthentication
//! parse, validate, round-trip through storage, and evaluate as in Istio.

use mesh_core::name::Namespace;
use mesh_core::policy::{
    authorize, effective_mode, parse_yaml, Action, AuthorizationPolicy, AuthzRequest, Document,
    Kind, MtlsMode, Parsed, PeerAuthentication, Spec, DEFAULT_ROOT_NAMESPACE,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

fn ns(s: &str) -> Namespace {
    Namespace::new(s).unwrap()
}

fn read(name: &str) -> String {
    let path = format!(
        "{}/tests/testdata/policy/security/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parse(name: &str, text: &str) -> Parsed {
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

fn good(name: &str) -> Parsed {
    parse(name, &read(name))
}

fn ap(text: &str) -> AuthorizationPolicy {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n{text}"
    );
    match &parse("inline.yaml", &yaml).documents[0].spec {
        Spec::AuthorizationPolicy(p) => p.clone(),
        other => panic!("not an AuthorizationPolicy: {other:?}"),
    }
}

fn pa(text: &str) -> PeerAuthentication {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p}}\nspec:\n{text}"
    );
    match &parse("inline.yaml", &yaml).documents[0].spec {
        Spec::PeerAuthentication(p) => p.clone(),
        other => panic!("not a PeerAuthentication: {other:?}"),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[derive(Clone)]
struct Req {
    principal: Option<&'static str>,
    namespace: Option<&'static str>,
    cluster: Option<&'static str>,
    ip: Option<IpAddr>,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    port: u16,
    headers: Vec<(&'static str, &'static str)>,
    claims: Option<serde_json::Value>,
}

impl AuthzRequest for Req {
    fn source_principal(&self) -> Option<&str> {
        self.principal
    }
    fn source_namespace(&self) -> Option<&str> {
        self.namespace
    }
    fn source_cluster(&self) -> Option<&str> {
        self.cluster
    }
    fn source_ip(&self) -> Option<IpAddr> {
        self.ip
    }
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn host(&self) -> &str {
        self.host
    }
    fn destination_port(&self) -> u16 {
        self.port
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
    fn jwt_claims(&self) -> Option<&serde_json::Value> {
        self.claims.as_ref()
    }
}

fn req() -> Req {
    Req {
        principal: Some("spiffe://cluster.local/ns/default/sa/frontend"),
        namespace: Some("default"),
        cluster: Some("east"),
        ip: Some("10.1.2.3".parse().unwrap()),
        method: "GET",
        path: "/api/v1/users",
        host: "httpbin.foo.svc.cluster.local",
        port: 8080,
        headers: vec![("x-user", "alice")],
        claims: None,
    }
}

/// Whether `policy` alone (as ALLOW) matches the request.
fn allows(policy: &AuthorizationPolicy, r: &Req) -> bool {
    authorize(&[("foo/p", policy)], r).allowed
}

#[test]
fn istio_examples_parse() {
    let p = good("istio-examples.yaml");
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let keys: Vec<(Kind, String, String)> = p
        .documents
        .iter()
        .map(|d| (d.kind, d.namespace.to_string(), d.name.clone()))
        .collect();
    let k = |kind, n: &str, name: &str| (kind, n.to_string(), name.to_string());
    assert_eq!(
        keys,
        [
            k(Kind::AuthorizationPolicy, "foo", "allow-nothing"),
            k(Kind::AuthorizationPolicy, "foo", "deny-all"),
            k(Kind::AuthorizationPolicy, "foo", "httpbin"),
            k(Kind::AuthorizationPolicy, "foo", "deny-header"),
            k(Kind::PeerAuthentication, "istio-system", "default"),
            k(Kind::PeerAuthentication, "foo", "finance"),
        ]
    );
    for d in &p.documents {
        assert!(d.hosts().is_empty(), "{}: no hosts", d.name);
        let back = Document::from_json(&d.to_json()).unwrap();
        assert_eq!(&back, d, "round trip of {}", d.name);
    }
    let Spec::AuthorizationPolicy(httpbin) = &p.documents[2].spec else {
        panic!("not an AuthorizationPolicy")
    };
    assert_eq!(httpbin.action, Action::Allow);
    assert_eq!(
        httpbin.rules[0].from[0].source.as_ref().unwrap().principals,
        ["cluster.local/ns/default/sa/sleep"]
    );
    assert_eq!(
        p.documents[2].to_json()["spec"]["rules"][0]["to"][0]["operation"]["ports"],
        serde_json::json!(["8080"])
    );
    assert_eq!(
        p.documents[5].to_json()["spec"]["portLevelMtls"],
        serde_json::json!({"8080": {"mode": "DISABLE"}})
    );
    assert_eq!(
        "AuthorizationPolicy".parse::<Kind>(),
        Ok(Kind::AuthorizationPolicy)
    );
    assert_eq!(
        "PeerAuthentication".parse::<Kind>(),
        Ok(Kind::PeerAuthentication)
    );
}

#[test]
fn not_acted_on_fields_warn() {
    let p = good("warnings.yaml");
    let got: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    let want: Vec<String> = [
        "document 1 (AuthorizationPolicy foo/ext-authz): spec.action: recognised Istio field, accepted but not acted on by fedmesh",
        "document 1 (AuthorizationPolicy foo/ext-authz): spec.rules[0].to[0].operation.methods[0]: method \"get\" is not uppercase: HTTP methods are case-sensitive",
        "document 3 (AuthorizationPolicy foo/waypoint): spec.targetRefs: recognised Istio field, accepted but not acted on by fedmesh",
        "document 3 (AuthorizationPolicy foo/waypoint): spec.action: recognised Istio field, accepted but not acted on by fedmesh",
    ]
    .iter()
    .map(|w| format!("warnings.yaml: {w}"))
    .collect();
    assert_eq!(got, want, "\n{}", got.join("\n"));
}

#[test]
fn bad_file_names_every_error() {
    let file = "security/bad.yaml";
    let got: Vec<String> = match parse_yaml(file, &read("bad.yaml"), &ns("default")) {
        Ok(p) => panic!("accepted: {p:#?}"),
        Err(errs) => errs.iter().map(ToString::to_string).collect(),
    };
    let want: Vec<String> = [
        "document 1 (AuthorizationPolicy default/unknown-field): spec.rules[0].from[0].source.principal: unknown field `principal`, expected one of `principals`, `notPrincipals`, `requestPrincipals`, `notRequestPrincipals`, `namespaces`, `notNamespaces`, `ipBlocks`, `notIpBlocks`, `remoteIpBlocks`, `notRemoteIpBlocks`",
        "document 2 (AuthorizationPolicy default/bad-action): spec.action: unknown variant `BLOCK`, expected one of `ALLOW`, `DENY`, `AUDIT`, `CUSTOM`",
        "document 3 (AuthorizationPolicy default/semantics): spec.rules[0].from[0].source.principals[0]: must not be empty",
        "document 3 (AuthorizationPolicy default/semantics): spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block",
        "document 3 (AuthorizationPolicy default/semantics): spec.rules[0].to[0].operation.ports[0]: must be a port 1 to 65535, got \"0\"",
        "document 3 (AuthorizationPolicy default/semantics): spec.rules[0].to[0].operation.ports[1]: must be a port 1 to 65535, got \"http\"",
        "document 3 (AuthorizationPolicy default/semantics): spec.rules[0].to[0].operation.paths[0]: must start with `/` or be a `*` pattern, got \"api\"",
        "document 3 (AuthorizationPolicy default/semantics): spec.rules[0].when[0]: values or notValues is required",
        "document 3 (AuthorizationPolicy default/semantics): spec.rules[0].when[1].key: is required",
        "document 3 (AuthorizationPolicy default/semantics): spec.rules[0].when[2].key: unknown attribute \"source.pod\"",
        "document 4 (PeerAuthentication default/ports): spec.portLevelMtls: requires a selector: mesh-wide and namespace-wide policies cannot have port-level mTLS",
        "document 4 (PeerAuthentication default/ports): spec.portLevelMtls.70000: must be a port 1 to 65535, got 70000",
        "document 5 (PeerAuthentication default/mode): spec.mtls.mode: unknown variant `ON`, expected one of `UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`",
        "document 6 (PeerAuthentication default/wrong-group): apiVersion: unsupported apiVersion \"networking.istio.io/v1\": expected one of security.istio.io/v1beta1, security.istio.io/v1",
    ]
    .iter()
    .map(|w| format!("{file}: {w}"))
    .collect();
    assert_eq!(got, want, "\n{}", got.join("\n"));
}

#[test]
fn deny_beats_allow_and_allow_semantics() {
    let allow_all = ap("  rules: [{}]\n");
    let deny_all = ap("  action: DENY\n  rules: [{}]\n");
    let allow_nothing = ap("  {}\n");
    let d = authorize(
        &[("foo/allow", &allow_all), ("foo/deny", &deny_all)],
        &req(),
    );
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/deny"));
    assert_eq!(d.reason, "denied by DENY policy foo/deny");

    let d = authorize(&[], &req());
    assert!(d.allowed, "no policy: allowed");
    assert_eq!(d.policy, None);
    let deny_nothing = ap("  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n");
    assert!(
        authorize(&[("foo/d", &deny_nothing)], &req()).allowed,
        "no ALLOW policy and no DENY match: allowed"
    );
    let audit = ap("  action: AUDIT\n  rules: [{}]\n");
    assert!(
        authorize(&[("foo/a", &audit)], &req()).allowed,
        "AUDIT is ignored"
    );

    let d = authorize(&[("foo/allow-nothing", &allow_nothing)], &req());
    assert!(!d.allowed, "spec: {{}} denies everything");
    assert_eq!(d.policy, None);
    assert_eq!(d.reason, "no ALLOW policy matched");

    let d = authorize(
        &[
            ("foo/allow-nothing", &allow_nothing),
            ("foo/all", &allow_all),
        ],
        &req(),
    );
    assert!(d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/all"));
    assert_eq!(d.reason, "allowed by ALLOW policy foo/all");
}

#[test]
fn principals_and_paths_match_like_istio() {
    let from = |field: &str, v: &str| {
        ap(&format!(
            "  rules: [{{from: [{{source: {{{field}: [\"{v}\"]}}}}]}}]\n"
        ))
    };
    let r = req();
    // Principals are compared without `spiffe://`.
    assert!(allows(
        &from("principals", "cluster.local/ns/default/sa/frontend"),
        &r
    ));
    assert!(!allows(
        &from(
            "principals",
            "spiffe://cluster.local/ns/default/sa/frontend"
        ),
        &r
    ));
    assert!(
        allows(&from("principals", "cluster.local/ns/default/*"), &r),
        "prefix"
    );
    assert!(allows(&from("principals", "*/sa/frontend"), &r), "suffix");
    assert!(!allows(&from("principals", "*/sa/backend"), &r));
    assert!(allows(&from("principals", "*"), &r), "presence");
    let plaintext = Req {
        principal: None,
        ..req()
    };
    assert!(
        !allows(&from("principals", "*"), &plaintext),
        "presence needs a principal"
    );
    assert!(!allows(&from("notPrincipals", "*"), &r));
    assert!(
        allows(&from("notPrincipals", "*"), &plaintext),
        "not-presence: plain text"
    );
    assert!(allows(
        &from("notPrincipals", "cluster.local/ns/prod/*"),
        &r
    ));
    assert!(allows(&from("namespaces", "default"), &r));
    assert!(!allows(&from("notNamespaces", "def*"), &r));
    assert!(allows(&from("ipBlocks", "10.0.0.0/8"), &r));
    assert!(!allows(&from("notIpBlocks", "10.1.2.3"), &r));
    assert!(
        !allows(&from("requestPrincipals", "*"), &r),
        "presence needs a validated JWT"
    );
    let with_jwt = Req {
        claims: Some(serde_json::json!({
            "iss": "https://issuer.example", "sub": "alice",
            "aud": ["api", "web"], "azp": "cli",
            "groups": ["dev", "ops"], "nested": {"level": 3}
        })),
        ..req()
    };
    assert!(allows(&from("requestPrincipals", "*"), &with_jwt));
    assert!(allows(
        &from("requestPrincipals", "https://issuer.example/alice"),
        &with_jwt
    ));
    assert!(allows(
        &from("requestPrincipals", "https://issuer.example/*"),
        &with_jwt
    ));
    assert!(!allows(&from("requestPrincipals", "*/bob"), &with_jwt));
    assert!(!allows(&from("notRequestPrincipals", "*/alice"), &with_jwt));
    assert!(
        allows(&from("notRequestPrincipals", "*"), &r),
        "no JWT: not-presence"
    );

    let to = |field: &str, v: &str| {
        ap(&format!(
            "  rules: [{{to: [{{operation: {{{field}: [\"{v}\"]}}}}]}}]\n"
        ))
    };
    assert!(allows(&to("paths", "/api/*"), &r), "prefix");
    assert!(allows(&to("paths", "*/users"), &r), "suffix");
    assert!(allows(&to("paths", "*"), &r), "presence");
    assert!(!allows(&to("paths", "/api"), &r), "exact");
    assert!(!allows(&to("notPaths", "/api/*"), &r));
    assert!(allows(&to("methods", "GET"), &r));
    assert!(!allows(&to("methods", "POST"), &r));
    assert!(allows(&to("ports", "8080"), &r));
    assert!(!allows(&to("notPorts", "8080"), &r));
    assert!(
        allows(&to("hosts", "HTTPBIN.foo.*"), &r),
        "hosts ignore case"
    );

    // The istio.io example: principal AND GET /api/*; sources OR-ed.
    let p = good("istio-examples.yaml");
    let Spec::AuthorizationPolicy(httpbin) = &p.documents[2].spec else {
        panic!()
    };
    let sleep = Req {
        principal: Some("spiffe://cluster.local/ns/default/sa/sleep"),
        ..req()
    };
    assert!(
        !allows(httpbin, &r),
        "frontend from default is neither source"
    );
    assert!(allows(httpbin, &sleep));
    assert!(!allows(
        httpbin,
        &Req {
            method: "POST",
            ..sleep.clone()
        }
    ));
    assert!(!allows(
        httpbin,
        &Req {
            path: "/health",
            ..sleep.clone()
        }
    ));
    assert!(
        !allows(
            httpbin,
            &Req {
                cluster: Some("west"),
                ..sleep.clone()
            }
        ),
        "source.cluster"
    );
    assert!(
        allows(
            httpbin,
            &Req {
                namespace: Some("dev"),
                ..req()
            }
        ),
        "second source"
    );
}

#[test]
fn when_conditions() {
    let when = |key: &str, rest: &str| {
        ap(&format!(
            "  rules: [{{when: [{{key: \"{key}\", {rest}}}]}}]\n"
        ))
    };
    let r = req();
    assert!(allows(&when("source.cluster", "values: [east]"), &r));
    assert!(!allows(&when("source.cluster", "values: [west]"), &r));
    assert!(!allows(&when("source.cluster", "notValues: [east]"), &r));
    assert!(!allows(
        &when("source.cluster", "values: [east]"),
        &Req {
            cluster: None,
            ..req()
        }
    ));
    assert!(allows(
        &when("request.headers[x-user]", "values: [ali*]"),
        &r
    ));
    assert!(
        allows(&when("request.headers[X-User]", "values: [alice]"), &r),
        "header names ignore case"
    );
    assert!(!allows(
        &when("request.headers[x-user]", "values: [bob]"),
        &r
    ));
    assert!(
        !allows(&when("request.headers[x-other]", "values: [\"*\"]"), &r),
        "absent header"
    );
    assert!(allows(
        &when("request.headers[x-other]", "notValues: [\"*\"]"),
        &r
    ));
    assert!(allows(&when("source.namespace", "values: [default]"), &r));
    assert!(allows(
        &when("source.principal", "values: [\"*/sa/frontend\"]"),
        &r
    ));
    assert!(allows(&when("destination.port", "values: [\"8080\"]"), &r));
    assert!(allows(&when("source.ip", "values: [10.1.0.0/16]"), &r));
    assert!(
        !allows(&when("request.auth.principal", "values: [\"*\"]"), &r),
        "no JWT"
    );
    assert!(allows(
        &when("request.auth.principal", "notValues: [x]"),
        &r
    ));
    let with_jwt = Req {
        claims: Some(serde_json::json!({
            "iss": "https://issuer.example", "sub": "alice",
            "aud": ["api", "web"], "azp": "cli",
            "groups": ["dev", "ops"], "nested": {"level": 3}
        })),
        ..req()
    };
    assert!(allows(
        &when("request.auth.principal", "values: [\"*/alice\"]"),
        &with_jwt
    ));
    assert!(
        allows(&when("request.auth.audiences", "values: [web]"), &with_jwt),
        "any item of a list"
    );
    assert!(!allows(
        &when("request.auth.audiences", "notValues: [web]"),
        &with_jwt
    ));
    assert!(allows(
        &when("request.auth.presenter", "values: [cli]"),
        &with_jwt
    ));
    assert!(allows(
        &when("request.auth.claims[groups]", "values: [ops]"),
        &with_jwt
    ));
    assert!(!allows(
        &when("request.auth.claims[groups]", "values: [admin]"),
        &with_jwt
    ));
    assert!(allows(
        &when("request.auth.claims[nested][level]", "values: [\"3\"]"),
        &with_jwt
    ));
    assert!(!allows(
        &when("request.auth.claims[missing]", "values: [\"*\"]"),
        &with_jwt
    ));

    // The istio.io header DENY example.
    let p = good("istio-examples.yaml");
    let Spec::AuthorizationPolicy(deny) = &p.documents[3].spec else {
        panic!()
    };
    let blocked = Req {
        headers: vec![("x-user", "blocked-bob")],
        ..req()
    };
    let d = authorize(&[("foo/deny-header", deny)], &blocked);
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/deny-header"));
    assert!(authorize(&[("foo/deny-header", deny)], &r).allowed);
    // A not-acted-on condition makes a DENY rule not apply.
    let deny_remote =
        ap("  action: DENY\n  rules: [{when: [{key: remote.ip, values: [10.0.0.0/8]}]}]\n");
    assert!(authorize(&[("foo/j", &deny_remote)], &r).allowed);
}

#[test]
fn selection() {
    let app = labels(&[("app", "httpbin"), ("version", "v1")]);
    let other = labels(&[("app", "other")]);
    let root = DEFAULT_ROOT_NAMESPACE;
    let no_selector = ap("  action: DENY\n  rules: [{}]\n");
    let selector = ap("  selector: {matchLabels: {app: httpbin}}\n  rules: [{}]\n");
    assert!(
        no_selector.selects("istio-system", root, "foo", &app),
        "root: mesh-wide"
    );
    assert!(
        no_selector.selects("foo", root, "foo", &other),
        "namespace-wide"
    );
    assert!(
        !no_selector.selects("bar", root, "foo", &app),
        "other namespace"
    );
    assert!(
        no_selector.selects("mesh-root", "mesh-root", "foo", &app),
        "custom root"
    );
    assert!(!no_selector.selects("istio-system", "mesh-root", "foo", &app));
    assert!(selector.selects("foo", root, "foo", &app));
    assert!(!selector.selects("foo", root, "foo", &other));
    assert!(
        selector.selects("istio-system", root, "bar", &app),
        "root with selector"
    );
    assert!(!selector.selects("istio-system", root, "bar", &other));
    let waypoint = ap("  targetRefs: [{kind: Gateway, name: waypoint}]\n  rules: [{}]\n");
    assert!(
        !waypoint.selects("foo", root, "foo", &app),
        "targetRefs: not for sidecars"
    );
}

#[test]
fn peer_authentication_precedence() {
    let mesh = pa("  mtls: {mode: STRICT}\n");
    let ns_permissive = pa("  mtls: {mode: PERMISSIVE}\n");
    let ns_unset = pa("  mtls: {mode: UNSET}\n");
    let workload = pa("  selector: {matchLabels: {app: finance}}\n  mtls: {mode: UNSET}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    9090: {mode: UNSET}\n");
    let fin = labels(&[("app", "finance")]);
    let other = labels(&[("app", "other")]);
    let root = "istio-system";
    let mode = |ps: &[(&str, &PeerAuthentication)], l: &BTreeMap<String, String>, port| {
        effective_mode(ps, root, "foo", l, port)
    };
    assert_eq!(mode(&[], &fin, 80), MtlsMode::Permissive, "default");
    assert_eq!(mode(&[(root, &mesh)], &fin, 80), MtlsMode::Strict, "mesh");
    assert_eq!(
        mode(&[("bar", &ns_permissive)], &fin, 80),
        MtlsMode::Permissive,
        "other ns"
    );
    assert_eq!(
        mode(&[(root, &mesh), ("bar", &ns_permissive)], &fin, 80),
        MtlsMode::Strict
    );
    assert_eq!(
        mode(&[(root, &mesh), ("foo", &ns_permissive)], &fin, 80),
        MtlsMode::Permissive,
        "namespace beats mesh"
    );
    assert_eq!(
        mode(&[(root, &mesh), ("foo", &ns_unset)], &fin, 80),
        MtlsMode::Strict,
        "UNSET inherits from the mesh"
    );
    let all = [(root, &mesh), ("foo", &ns_permissive), ("foo", &workload)];
    assert_eq!(
        mode(&all, &fin, 8080),
        MtlsMode::Disable,
        "port level beats all"
    );
    assert_eq!(
        mode(&all, &fin, 80),
        MtlsMode::Permissive,
        "workload UNSET inherits ns"
    );
    assert_eq!(
        mode(&all, &fin, 9090),
        MtlsMode::Permissive,
        "port UNSET inherits"
    );
    assert_eq!(
        mode(&all, &other, 8080),
        MtlsMode::Permissive,
        "selector must match"
    );
    let strict_workload = pa("  selector: {matchLabels: {app: finance}}\n  mtls: {mode: STRICT}\n");
    assert_eq!(
        mode(
            &[("foo", &ns_permissive), ("foo", &strict_workload)],
            &fin,
            80
        ),
        MtlsMode::Strict,
        "workload beats namespace"
    );
    assert_eq!(
        mode(&[("bar", &strict_workload)], &fin, 80),
        MtlsMode::Permissive,
        "a selector applies in its own namespace only"
    );
}

#[test]
fn round_trip_json() {
    for name in ["istio-examples.yaml", "warnings.yaml"] {
        for d in good(name).documents {
            let j = d.to_json();
            assert_eq!(Document::from_json(&j).unwrap(), d, "{name}: {}", d.name);
            let text = serde_json::to_string(&j).unwrap();
            let again: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(Document::from_json(&again).unwrap().to_json(), j);
        }
    }
}

#[test]
fn request_authentication_rules_are_checked() {
    let good_doc = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: istio-system}
spec:
  jwtRules:
  - issuer: https://a.example
    jwks: '{"keys": []}'
    audiences: [api]
  - issuer: https://b.example
    jwksUri: https://b.example/jwks.json
  - issuer: https://c.example
    jwksUri: http://c.example/jwks.json
"#;
    let p = parse("ra.yaml", good_doc);
    assert_eq!(p.documents[0].kind, Kind::RequestAuthentication);
    let w: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    // https is fetched (no warning); plain http is accepted but warned.
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("spec.jwtRules[2].jwksUri: plain http JWKS are never fetched"),
        "{w:?}"
    );
    let back = Document::from_json(&p.documents[0].to_json()).unwrap();
    assert_eq!(back, p.documents[0]);

    let bad = r#"
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {name: bad}
spec:
  jwtRules:
  - jwks: '{"keys": []}'
  - issuer: https://x.example
  - issuer: https://y.example
    jwks: 'not json'
  - issuer: https://y.example
    jwksUri: ftp://y.example/keys
  - issuer: https://z.example
    jwks: '{"keys": []}'
    jwksUri: file:///tmp/k.json
    fromHeaders: [{name: ""}]
"#;
    let errs: Vec<String> = parse_yaml("bad.yaml", bad, &ns("default"))
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    let want = [
        "spec.jwtRules[0].issuer: is required",
        "spec.jwtRules[1]: one of jwks or jwksUri is required",
        "spec.jwtRules[2].jwks: must be a JWKS JSON document with a \"keys\" array",
        "spec.jwtRules[3].issuer: issuer \"https://y.example\" already has a rule at spec.jwtRules[2]",
        "spec.jwtRules[3].jwksUri: \"ftp://y.example/keys\": expected file:///absolute/path or https://...",
        "spec.jwtRules[4]: set only one of jwks and jwksUri",
        "spec.jwtRules[4].fromHeaders[0].name: is required",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.contains(w)),
            "missing {w:?} in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), want.len(), "{errs:#?}");
}
