//! `AuthorizationPolicy`: which requests a workload accepts (Istio
//! `security/v1/authorization.proto`), and its evaluation ([`authorize`]).
//!
//! # Evaluation, as Istio
//!
//! 1. If any `DENY` policy matches the request: denied.
//! 2. Else if no `ALLOW` policy applies to the workload: allowed.
//! 3. Else if any `ALLOW` policy matches: allowed; otherwise denied.
//!
//! A policy matches when any of its rules matches; a rule matches when every
//! field of it matches: `from` (any source), `to` (any operation), `when`
//! (every condition). An `ALLOW` policy without rules matches nothing
//! (`spec: {}` denies everything); a rule `{}` matches everything.
//! `AUDIT` and `CUSTOM` policies are parsed, warned about, and ignored.
//!
//! String fields (principals, namespaces, hosts, paths, methods, when values)
//! use Istio's matching: exact, prefix `abc*`, suffix `*abc`, presence `*`
//! (any non-empty value). Principals are written without `spiffe://`
//! (`cluster.local/ns/default/sa/sleep`) and compared to the source SPIFFE ID
//! with that scheme stripped. Hosts compare ignoring ASCII case.
//!
//! # What fedmesh does not act on
//!
//! Fields fedmesh cannot evaluate warn when parsed, and a source or condition
//! using them **never matches**: an `ALLOW` rule with them allows nothing and a
//! `DENY` rule with them denies nothing. These are `remoteIpBlocks`,
//! `notRemoteIpBlocks` (no original client address in fedmesh), and `when`
//! keys other than `request.headers[<name>]`, `source.namespace`,
//! `source.principal`, `source.ip`, `source.cluster`, `destination.port`,
//! `request.auth.principal`, `request.auth.audiences`,
//! `request.auth.presenter` and `request.auth.claims[<name>]...`.
//!
//! `requestPrincipals` and the `request.auth.*` keys read the JWT a
//! `RequestAuthentication` validated: the principal is `<iss>/<sub>`; a claim
//! holding a list matches when any of its items does, as in Istio.
//!
//! `source.cluster` is a fedmesh extension: the name of the cluster the
//! request comes from. Policies with `targetRef`/`targetRefs` attach to
//! gateways or waypoints, never to sidecars: [`AuthorizationPolicy::selects`]
//! is false for them.

use super::destination_rule::WorkloadMatchSelector;
use super::validate::{check_ip_subnet, Ctx};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The namespace whose policies apply mesh-wide, unless configured otherwise.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Access control for the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// Workloads this applies to; absent: every workload of the namespace
    /// (of the mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadMatchSelector>,
    /// Gateway/waypoint attachment: parsed, not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Gateway/waypoint attachments: parsed, not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// The rules; see the module documentation for how they match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// What a match means (default `ALLOW`).
    #[serde(default, skip_serializing_if = "Action::is_allow")]
    pub action: Action,
    /// External authorizer for `CUSTOM`: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
}

/// A reference to a Kubernetes resource the policy attaches to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group, e.g. `gateway.networking.k8s.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind, e.g. `Gateway`.
    #[serde(default)]
    pub kind: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace (must be the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The `CUSTOM` action's provider.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    /// Name of an extension provider of the mesh config.
    #[serde(default)]
    pub name: String,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow matching requests (once any ALLOW policy applies, others are denied).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Audit matching requests: not acted on.
    Audit,
    /// Delegate to an external authorizer: not acted on.
    Custom,
}

impl Action {
    fn is_allow(&self) -> bool {
        *self == Action::Allow
    }
}

/// One rule: `from` AND `to` AND `when`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources; any may match. Empty: any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    /// Operations; any may match. Empty: any operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    /// Conditions; all must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// A `from` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// The source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// Source attributes; every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Source {
    /// Peer identities, without `spiffe://`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals: not acted on (never match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Source workload namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Source (peer) IPs or CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs (X-Forwarded-For): not acted on (never match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// A `to` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    /// The operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// Request attributes; every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Operation {
    /// Host (authority) values, compared ignoring case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings (`"8080"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Paths without query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// A `when` condition: `key` has one of `values` and none of `notValues`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Attribute, e.g. `request.headers[x-user]`, `source.cluster`.
    #[serde(default)]
    pub key: String,
    /// Accepted values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Refused values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

// === the request ===

/// What authorization looks at in a request. Implemented by the data plane.
pub trait AuthzRequest {
    /// Peer SPIFFE ID, e.g. `spiffe://cluster.local/ns/default/sa/frontend`;
    /// `None` without mTLS.
    fn source_principal(&self) -> Option<&str>;
    /// Namespace of the source workload, if known.
    fn source_namespace(&self) -> Option<&str>;
    /// Cluster of the source workload, if known.
    fn source_cluster(&self) -> Option<&str>;
    /// Peer IP address, if known.
    fn source_ip(&self) -> Option<IpAddr>;
    /// HTTP method.
    fn method(&self) -> &str;
    /// Path without the query string.
    fn path(&self) -> &str;
    /// Host (authority) as sent.
    fn host(&self) -> &str;
    /// Destination port.
    fn destination_port(&self) -> u16;
    /// A header value, by name compared ignoring ASCII case.
    fn header(&self, name: &str) -> Option<&str>;
    /// The validated JWT's claims, when the request carried one.
    fn jwt_claims(&self) -> Option<&serde_json::Value> {
        None
    }
    /// A TCP connection rather than an HTTP request: HTTP-only fields
    /// (request principals, hosts, methods, paths, `request.*` conditions)
    /// cannot be known. As Istio documents for TCP, an ALLOW rule holding
    /// any of them never matches, and a DENY rule is applied without them.
    fn is_tcp(&self) -> bool {
        false
    }
}

/// `<iss>/<sub>` of the request's validated JWT.
fn request_principal(req: &dyn AuthzRequest) -> Option<String> {
    let c = req.jwt_claims()?;
    let s = |k: &str| c.get(k).and_then(serde_json::Value::as_str).unwrap_or("");
    Some(format!("{}/{}", s("iss"), s("sub")))
}

/// The string values of a claim (a list's string items), found by the path
/// of names in `request.auth.claims[a][b]`.
fn claim_values(req: &dyn AuthzRequest, path: &[&str]) -> Vec<String> {
    let Some(mut v) = req.jwt_claims() else {
        return Vec::new();
    };
    for p in path {
        match v.get(*p) {
            Some(next) => v = next,
            None => return Vec::new(),
        }
    }
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(ToString::to_string))
            .collect(),
        serde_json::Value::Bool(b) => vec![b.to_string()],
        serde_json::Value::Number(n) => vec![n.to_string()],
        _ => Vec::new(),
    }
}

/// A field over several values: set values must match one of them, and no
/// not-value may match any.
fn multi_field(values: &[String], not_values: &[String], have: &[String]) -> bool {
    let any = |list: &[String]| have.iter().any(|h| list.iter().any(|p| istio_match(p, h)));
    (values.is_empty() || any(values)) && !any(not_values)
}

/// The names in `request.auth.claims[a][b]`.
fn claims_path(key: &str) -> Option<Vec<&str>> {
    let rest = key.strip_prefix("request.auth.claims")?;
    let mut out = Vec::new();
    let mut r = rest;
    while !r.is_empty() {
        let inner = r.strip_prefix('[')?;
        let end = inner.find(']')?;
        let name = &inner[..end];
        if name.is_empty() {
            return None;
        }
        out.push(name);
        r = &inner[end + 1..];
    }
    (!out.is_empty()).then_some(out)
}

/// The outcome of [`authorize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The deciding policy, `namespace/name`, when one decided.
    pub policy: Option<String>,
    /// Why, for logs and denial bodies.
    pub reason: String,
}

/// Evaluates the policies that apply to a workload (see
/// [`AuthorizationPolicy::selects`]) against a request, in Istio's order
/// (module documentation). Each policy comes with its `namespace/name`, which
/// names it in the [`Decision`].
pub fn authorize(policies: &[(&str, &AuthorizationPolicy)], req: &dyn AuthzRequest) -> Decision {
    if let Some((name, _)) = policies
        .iter()
        .find(|(_, p)| p.action == Action::Deny && p.matches(req))
    {
        return Decision {
            allowed: false,
            policy: Some((*name).to_string()),
            reason: format!("denied by DENY policy {name}"),
        };
    }
    let mut allows = policies
        .iter()
        .filter(|(_, p)| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Decision {
            allowed: true,
            policy: None,
            reason: "no ALLOW policy applies".into(),
        };
    }
    match allows.find(|(_, p)| p.matches(req)) {
        Some((name, _)) => Decision {
            allowed: true,
            policy: Some((*name).to_string()),
            reason: format!("allowed by ALLOW policy {name}"),
        },
        None => Decision {
            allowed: false,
            policy: None,
            reason: "no ALLOW policy matched".into(),
        },
    }
}

// === matching ===

/// Istio string matching: `*` any non-empty value, `abc*` prefix, `*abc`
/// suffix, otherwise exact.
pub fn istio_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

fn istio_match_ignore_case(pattern: &str, value: &str) -> bool {
    istio_match(&pattern.to_ascii_lowercase(), &value.to_ascii_lowercase())
}

/// `values` (when non-empty) must contain a match for `v`, and `not_values`
/// none. A missing attribute matches no value.
fn field(
    values: &[String],
    not_values: &[String],
    v: Option<&str>,
    m: fn(&str, &str) -> bool,
) -> bool {
    let any = |list: &[String]| v.is_some_and(|v| list.iter().any(|p| m(p, v)));
    (values.is_empty() || any(values)) && !any(not_values)
}

fn ip_in(block: &str, ip: IpAddr) -> bool {
    let (net, len) = match block.split_once('/') {
        Some((n, l)) => (n, l.parse::<u32>().ok()),
        None => (block, None),
    };
    let Ok(net) = net.parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

fn ip_field(blocks: &[String], not_blocks: &[String], ip: Option<IpAddr>) -> bool {
    let any = |list: &[String]| ip.is_some_and(|ip| list.iter().any(|b| ip_in(b, ip)));
    (blocks.is_empty() || any(blocks)) && !any(not_blocks)
}

fn principal(req: &dyn AuthzRequest) -> Option<&str> {
    req.source_principal()
        .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
}

impl Source {
    /// Whether the request's source has every set attribute.
    pub fn matches(&self, req: &dyn AuthzRequest) -> bool {
        let unsupported =
            !self.remote_ip_blocks.is_empty() || !self.not_remote_ip_blocks.is_empty();
        !unsupported
            && field(
                &self.request_principals,
                &self.not_request_principals,
                request_principal(req).as_deref(),
                istio_match,
            )
            && field(
                &self.principals,
                &self.not_principals,
                principal(req),
                istio_match,
            )
            && field(
                &self.namespaces,
                &self.not_namespaces,
                req.source_namespace(),
                istio_match,
            )
            && ip_field(&self.ip_blocks, &self.not_ip_blocks, req.source_ip())
    }
}

impl Operation {
    /// Whether the request has every set attribute.
    pub fn matches(&self, req: &dyn AuthzRequest) -> bool {
        let port = req.destination_port().to_string();
        field(
            &self.hosts,
            &self.not_hosts,
            Some(req.host()),
            istio_match_ignore_case,
        ) && field(&self.ports, &self.not_ports, Some(&port), |a, b| a == b)
            && field(
                &self.methods,
                &self.not_methods,
                Some(req.method()),
                istio_match,
            )
            && field(&self.paths, &self.not_paths, Some(req.path()), istio_match)
    }
}

/// The header name of a `request.headers[<name>]` key.
fn header_key(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")?.strip_suffix(']')
}

/// `when` keys fedmesh evaluates (besides `request.headers[...]` and
/// `request.auth.claims[...]`).
const ACTED_ON_KEYS: [&str; 8] = [
    "source.namespace",
    "source.principal",
    "source.ip",
    "source.cluster",
    "destination.port",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
];

/// `when` keys Istio knows (`security.ValidateAttribute`), plus
/// `source.cluster`; prefixes end in `[` or `.`.
const KNOWN_KEYS: [&str; 13] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.cluster",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "experimental.envoy.filters.",
];

impl Condition {
    /// Whether the request meets the condition; always false for keys fedmesh
    /// does not act on.
    pub fn matches(&self, req: &dyn AuthzRequest) -> bool {
        let (vs, nvs) = (&self.values, &self.not_values);
        if let Some(name) = header_key(&self.key) {
            return field(vs, nvs, req.header(name), istio_match);
        }
        match self.key.as_str() {
            "source.namespace" => field(vs, nvs, req.source_namespace(), istio_match),
            "source.principal" => field(vs, nvs, principal(req), istio_match),
            "source.cluster" => field(vs, nvs, req.source_cluster(), istio_match),
            "source.ip" => ip_field(vs, nvs, req.source_ip()),
            "destination.port" => {
                let port = req.destination_port().to_string();
                field(vs, nvs, Some(&port), |a, b| a == b)
            }
            "request.auth.principal" => {
                field(vs, nvs, request_principal(req).as_deref(), istio_match)
            }
            "request.auth.audiences" => multi_field(vs, nvs, &claim_values(req, &["aud"])),
            "request.auth.presenter" => multi_field(vs, nvs, &claim_values(req, &["azp"])),
            k => match claims_path(k) {
                Some(path) => multi_field(vs, nvs, &claim_values(req, &path)),
                None => false,
            },
        }
    }
}

/// A `when` key only an HTTP request has.
fn http_only_key(key: &str) -> bool {
    key.starts_with("request.")
}

impl Source {
    fn has_http_fields(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }
}

impl Operation {
    fn has_http_fields(&self) -> bool {
        !self.hosts.is_empty()
            || !self.not_hosts.is_empty()
            || !self.methods.is_empty()
            || !self.not_methods.is_empty()
            || !self.paths.is_empty()
            || !self.not_paths.is_empty()
    }
}

impl Rule {
    /// Does the rule look at anything only an HTTP request has?
    pub fn has_http_fields(&self) -> bool {
        self.from
            .iter()
            .filter_map(|f| f.source.as_ref())
            .any(Source::has_http_fields)
            || self
                .to
                .iter()
                .filter_map(|t| t.operation.as_ref())
                .any(Operation::has_http_fields)
            || self.when.iter().any(|c| http_only_key(&c.key))
    }

    /// The rule with its HTTP-only fields removed (what a DENY rule means
    /// for a TCP connection).
    pub fn without_http(&self) -> Rule {
        let mut r = self.clone();
        for s in r.from.iter_mut().filter_map(|f| f.source.as_mut()) {
            s.request_principals.clear();
            s.not_request_principals.clear();
        }
        for o in r.to.iter_mut().filter_map(|t| t.operation.as_mut()) {
            o.hosts.clear();
            o.not_hosts.clear();
            o.methods.clear();
            o.not_methods.clear();
            o.paths.clear();
            o.not_paths.clear();
        }
        r.when.retain(|c| !http_only_key(&c.key));
        r
    }

    /// `from` (any) AND `to` (any) AND `when` (all).
    pub fn matches(&self, req: &dyn AuthzRequest) -> bool {
        (self.from.is_empty()
            || self
                .from
                .iter()
                .any(|f| f.source.as_ref().is_none_or(|s| s.matches(req))))
            && (self.to.is_empty()
                || self
                    .to
                    .iter()
                    .any(|t| t.operation.as_ref().is_none_or(|o| o.matches(req))))
            && self.when.iter().all(|c| c.matches(req))
    }
}

impl AuthorizationPolicy {
    /// Whether any rule matches (none without rules). On TCP (see
    /// [`AuthzRequest::is_tcp`]) an ALLOW rule with HTTP-only fields never
    /// matches and a DENY rule is read without them.
    pub fn matches(&self, req: &dyn AuthzRequest) -> bool {
        if !req.is_tcp() {
            return self.rules.iter().any(|r| r.matches(req));
        }
        match self.action {
            Action::Deny => self.rules.iter().any(|r| r.without_http().matches(req)),
            _ => self
                .rules
                .iter()
                .any(|r| !r.has_http_fields() && r.matches(req)),
        }
    }

    /// Whether this policy, in `policy_namespace`, applies to a sidecar
    /// workload of `workload_namespace` with `workload_labels`: a policy of
    /// the root namespace (usually [`DEFAULT_ROOT_NAMESPACE`]) applies
    /// mesh-wide, one of the workload's namespace applies to it; in both
    /// cases the selector, if any, must match the labels. Policies with
    /// `targetRef(s)` never apply to sidecars.
    pub fn selects(
        &self,
        policy_namespace: &str,
        root_namespace: &str,
        workload_namespace: &str,
        workload_labels: &BTreeMap<String, String>,
    ) -> bool {
        if self.target_ref.is_some() || !self.target_refs.is_empty() {
            return false;
        }
        (policy_namespace == root_namespace || policy_namespace == workload_namespace)
            && selector_matches(self.selector.as_ref(), workload_labels)
    }
}

/// A `matchLabels` selector matches when every label is present and equal;
/// no selector matches everything.
pub(crate) fn selector_matches(
    s: Option<&WorkloadMatchSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    s.is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

// === validation ===

pub(crate) fn validate_selector(c: &mut Ctx<'_>, s: Option<&WorkloadMatchSelector>) {
    if let Some(s) = s {
        c.labels("spec.selector.matchLabels", &s.match_labels);
        for (k, v) in &s.match_labels {
            if k.contains('*') || v.contains('*') {
                c.error(
                    format!("spec.selector.matchLabels.{k}"),
                    "wildcards are not allowed in selectors",
                );
            }
        }
    }
}

fn non_empty(c: &mut Ctx<'_>, path: &str, list: &[String]) {
    for (i, v) in list.iter().enumerate() {
        if v.is_empty() {
            c.error(format!("{path}[{i}]"), "must not be empty");
        }
    }
}

fn port_strings(c: &mut Ctx<'_>, path: &str, list: &[String]) {
    for (i, v) in list.iter().enumerate() {
        match v.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) && !v.starts_with('+') => {}
            _ => c.error(
                format!("{path}[{i}]"),
                format!("must be a port 1 to 65535, got {v:?}"),
            ),
        }
    }
}

fn ip_blocks(c: &mut Ctx<'_>, path: &str, list: &[String]) {
    for (i, v) in list.iter().enumerate() {
        if let Err(r) = check_ip_subnet(v) {
            c.error(format!("{path}[{i}]"), r);
        }
    }
}

fn paths(c: &mut Ctx<'_>, path: &str, list: &[String]) {
    for (i, v) in list.iter().enumerate() {
        if !(v.starts_with('/') || v.starts_with('*')) {
            c.error(
                format!("{path}[{i}]"),
                format!("must start with `/` or be a `*` pattern, got {v:?}"),
            );
        }
    }
}

fn methods(c: &mut Ctx<'_>, path: &str, list: &[String]) {
    non_empty(c, path, list);
    for (i, v) in list.iter().enumerate() {
        if *v != v.to_ascii_uppercase() {
            c.warn(
                format!("{path}[{i}]"),
                format!("method {v:?} is not uppercase: HTTP methods are case-sensitive"),
            );
        }
    }
}

impl AuthorizationPolicy {
    /// Istio `ValidateAuthorizationPolicy`, plus fedmesh's not-acted-on warnings.
    pub(crate) fn validate(&self, c: &mut Ctx<'_>) {
        validate_selector(c, self.selector.as_ref());
        if self.target_ref.is_some() && !self.target_refs.is_empty() {
            c.error(
                "spec.targetRef",
                "only one of targetRef and targetRefs may be set",
            );
        }
        if self.selector.is_some() && (self.target_ref.is_some() || !self.target_refs.is_empty()) {
            c.error(
                "spec.selector",
                "only one of selector and targetRef(s) may be set",
            );
        }
        if self.target_ref.is_some() {
            c.not_acted_on("spec.targetRef");
        }
        if !self.target_refs.is_empty() {
            c.not_acted_on("spec.targetRefs");
        }
        match self.action {
            Action::Custom => {
                c.not_acted_on("spec.action");
                if self.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
                    c.error("spec.provider.name", "is required with action CUSTOM");
                }
            }
            Action::Audit => c.not_acted_on("spec.action"),
            Action::Allow | Action::Deny => {
                if self.provider.is_some() {
                    c.error("spec.provider", "is only allowed with action CUSTOM");
                }
            }
        }
        if self.action == Action::Deny && self.rules.is_empty() {
            c.warn(
                "spec.rules",
                "a DENY policy without rules matches nothing; use `rules: [{}]` to deny everything",
            );
        }
        for (i, r) in self.rules.iter().enumerate() {
            let p = format!("spec.rules[{i}]");
            for (j, f) in r.from.iter().enumerate() {
                let fp = format!("{p}.from[{j}].source");
                let Some(s) = &f.source else {
                    c.error(fp, "is required");
                    continue;
                };
                // (field, values, acted on, IP blocks)
                let all = [
                    ("principals", &s.principals, true, false),
                    ("notPrincipals", &s.not_principals, true, false),
                    ("requestPrincipals", &s.request_principals, true, false),
                    (
                        "notRequestPrincipals",
                        &s.not_request_principals,
                        true,
                        false,
                    ),
                    ("namespaces", &s.namespaces, true, false),
                    ("notNamespaces", &s.not_namespaces, true, false),
                    ("ipBlocks", &s.ip_blocks, true, true),
                    ("notIpBlocks", &s.not_ip_blocks, true, true),
                    ("remoteIpBlocks", &s.remote_ip_blocks, false, true),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks, false, true),
                ];
                if all.iter().all(|(_, l, _, _)| l.is_empty()) {
                    c.error(&fp, "must set at least one field");
                }
                for (name, list, acted, ip) in all {
                    let lp = format!("{fp}.{name}");
                    if !ip {
                        non_empty(c, &lp, list);
                    }
                    if !acted && !list.is_empty() {
                        c.warn(
                            &lp,
                            "recognised Istio field, not acted on by fedmesh: this source never matches",
                        );
                    }
                    if ip {
                        ip_blocks(c, &lp, list);
                    }
                }
            }
            for (j, t) in r.to.iter().enumerate() {
                let tp = format!("{p}.to[{j}].operation");
                let Some(o) = &t.operation else {
                    c.error(tp, "is required");
                    continue;
                };
                if [
                    &o.hosts,
                    &o.not_hosts,
                    &o.ports,
                    &o.not_ports,
                    &o.methods,
                    &o.not_methods,
                    &o.paths,
                    &o.not_paths,
                ]
                .iter()
                .all(|l| l.is_empty())
                {
                    c.error(&tp, "must set at least one field");
                }
                non_empty(c, &format!("{tp}.hosts"), &o.hosts);
                non_empty(c, &format!("{tp}.notHosts"), &o.not_hosts);
                port_strings(c, &format!("{tp}.ports"), &o.ports);
                port_strings(c, &format!("{tp}.notPorts"), &o.not_ports);
                methods(c, &format!("{tp}.methods"), &o.methods);
                methods(c, &format!("{tp}.notMethods"), &o.not_methods);
                paths(c, &format!("{tp}.paths"), &o.paths);
                paths(c, &format!("{tp}.notPaths"), &o.not_paths);
            }
            for (j, w) in r.when.iter().enumerate() {
                validate_condition(c, &format!("{p}.when[{j}]"), w);
            }
        }
    }
}

fn validate_condition(c: &mut Ctx<'_>, p: &str, w: &Condition) {
    if w.key.is_empty() {
        c.error(format!("{p}.key"), "is required");
    }
    if w.values.is_empty() && w.not_values.is_empty() {
        c.error(p, "values or notValues is required");
    }
    if w.key.is_empty() {
        return;
    }
    let header = header_key(&w.key);
    let known = header.is_some_and(|h| !h.is_empty())
        || KNOWN_KEYS.iter().any(|k| {
            if k.ends_with('[') || k.ends_with('.') {
                w.key.starts_with(k) && w.key.len() > k.len()
            } else {
                w.key == *k
            }
        });
    if !known {
        c.error(format!("{p}.key"), format!("unknown attribute {:?}", w.key));
        return;
    }
    if w.key.starts_with("request.auth.claims") && claims_path(&w.key).is_none() {
        c.error(
            format!("{p}.key"),
            format!(
                "{:?}: a claim is named as request.auth.claims[name], nested as [a][b]",
                w.key
            ),
        );
        return;
    }
    if header.is_none() && !ACTED_ON_KEYS.contains(&w.key.as_str()) && claims_path(&w.key).is_none()
    {
        c.warn(
            format!("{p}.key"),
            format!(
                "{:?} is not acted on by fedmesh: this condition never matches",
                w.key
            ),
        );
    }
    let values = w.values.iter().chain(&w.not_values);
    match w.key.as_str() {
        "source.ip" => {
            for v in values {
                if let Err(r) = check_ip_subnet(v) {
                    c.error(format!("{p}.values"), r);
                }
            }
        }
        "destination.port" => {
            for v in values {
                if !matches!(v.parse::<u32>(), Ok(1..=65535)) {
                    c.error(
                        format!("{p}.values"),
                        format!("must be a port 1 to 65535, got {v:?}"),
                    );
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_string_matching() {
        assert!(istio_match("*", "x"));
        assert!(!istio_match("*", ""));
        assert!(istio_match("/api/*", "/api/v1"));
        assert!(istio_match("*/info", "/a/info"));
        assert!(!istio_match("/api", "/api/v1"));
    }

    #[test]
    fn cidr() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(ip_in("10.0.0.0/8", ip("10.1.2.3")));
        assert!(!ip_in("10.0.0.0/8", ip("11.1.2.3")));
        assert!(ip_in("10.1.2.3", ip("10.1.2.3")));
        assert!(ip_in("0.0.0.0/0", ip("1.2.3.4")));
        assert!(ip_in("fd00::/8", ip("fd12::1")));
        assert!(!ip_in("fd00::/8", ip("10.0.0.1")));
    }

    /// A TCP connection from `frontend` in `default`, to port 9000.
    struct Tcp;
    impl AuthzRequest for Tcp {
        fn source_principal(&self) -> Option<&str> {
            Some("spiffe://cluster.local/ns/default/sa/frontend")
        }
        fn source_namespace(&self) -> Option<&str> {
            Some("default")
        }
        fn source_cluster(&self) -> Option<&str> {
            Some("c1")
        }
        fn source_ip(&self) -> Option<IpAddr> {
            "10.0.0.9".parse().ok()
        }
        fn method(&self) -> &str {
            ""
        }
        fn path(&self) -> &str {
            ""
        }
        fn host(&self) -> &str {
            ""
        }
        fn destination_port(&self) -> u16 {
            9000
        }
        fn header(&self, _: &str) -> Option<&str> {
            None
        }
        fn is_tcp(&self) -> bool {
            true
        }
    }

    fn policy(yaml: &str) -> AuthorizationPolicy {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    /// Istio's "Authorization on TCP traffic": L4 fields decide; an ALLOW
    /// rule naming methods, paths, hosts, request principals or `request.*`
    /// keys never matches a TCP connection; a DENY rule applies without them.
    #[test]
    fn tcp_connections_are_judged_on_l4_fields_as_istio_does() {
        let cases = [
            // (policy spec, does it match the TCP connection?)
            ("action: ALLOW\nrules: [{from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]}]", true),
            ("action: ALLOW\nrules: [{from: [{source: {namespaces: [prod]}}]}]", false),
            ("action: ALLOW\nrules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}], to: [{operation: {ports: ['9000']}}]}]", true),
            ("action: ALLOW\nrules: [{to: [{operation: {ports: ['9001']}}]}]", false),
            ("action: ALLOW\nrules: [{when: [{key: source.cluster, values: [c1]}]}]", true),
            // HTTP-only fields in ALLOW: the rule never matches...
            ("action: ALLOW\nrules: [{to: [{operation: {methods: [GET]}}]}]", false),
            ("action: ALLOW\nrules: [{from: [{source: {principals: ['*'], requestPrincipals: ['*']}}]}]", false),
            ("action: ALLOW\nrules: [{when: [{key: 'request.headers[x-user]', values: [a]}]}]", false),
            // ...but another rule of the policy still can.
            ("action: ALLOW\nrules: [{to: [{operation: {paths: [/a]}}]}, {from: [{source: {namespaces: [default]}}]}]", true),
            // HTTP-only fields in DENY are dropped: the rest decides.
            ("action: DENY\nrules: [{to: [{operation: {methods: [GET], ports: ['9000']}}]}]", true),
            ("action: DENY\nrules: [{to: [{operation: {paths: [/admin], ports: ['9001']}}]}]", false),
            ("action: DENY\nrules: [{from: [{source: {requestPrincipals: ['*']}}], when: [{key: 'request.auth.claims[group]', values: [x]}]}]", true),
            ("action: DENY\nrules: [{from: [{source: {notNamespaces: [default]}}], to: [{operation: {methods: [POST]}}]}]", false),
        ];
        for (spec, want) in cases {
            let p = policy(spec);
            assert_eq!(p.matches(&Tcp), want, "{spec}");
        }
    }
}
