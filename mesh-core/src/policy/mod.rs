//! Istio traffic policy — `VirtualService`, `DestinationRule`, `Sidecar` — as
//! users write it (kubectl-exported YAML included), parsed and validated into
//! typed documents. Pure code: the agent and federation call it.
//!
//! Also the `security.istio.io` (`v1beta1`, `v1`) kinds `AuthorizationPolicy`
//! (with its evaluation, [`authorize`]) and `PeerAuthentication` (with
//! [`effective_mode`]); what they accept and warn about is documented in
//! [`AuthorizationPolicy`] and [`PeerAuthentication`]'s modules.
//!
//! And fedmesh's own kind, `TrafficWeights` (`fedmesh.io/v1`, see
//! [`TrafficWeights`]): how a service's traffic is spread over clusters and
//! regions, read by the federation's weight engine.
//!
//! Field names and semantics are Istio's (`networking.istio.io` `v1alpha3`,
//! `v1beta1` and `v1`, which share one schema). Validation follows istio
//! `pkg/config/validation`; each error names the file, the document, the
//! resource and the field path:
//!
//! ```text
//! bookinfo.yaml: document 1 (VirtualService default/reviews): spec.http[0].retries.attempts: must be >= 0, got -1
//! ```
//!
//! ```
//! use mesh_core::name::Namespace;
//! use mesh_core::policy::{parse_yaml, Kind};
//!
//! let yaml = "
//! apiVersion: networking.istio.io/v1
//! kind: DestinationRule
//! metadata: {name: reviews}
//! spec:
//!   host: reviews
//!   subsets:
//!   - {name: v1, labels: {version: v1}}
//! ";
//! let ns = Namespace::new("default").unwrap();
//! let parsed = parse_yaml("dr.yaml", yaml, &ns).unwrap();
//! assert_eq!(parsed.documents[0].key(), (Kind::DestinationRule, &ns, "reviews"));
//!
//! let errs = parse_yaml("dr.yaml", &yaml.replace("name: v1", "name: v_1"), &ns).unwrap_err();
//! assert_eq!(
//!     errs[0].to_string(),
//!     "dr.yaml: document 1 (DestinationRule default/reviews): spec.subsets[0].name: \
//!      invalid subset name \"v_1\": must contain only lowercase letters, digits and '-' (RFC 1123 label)"
//! );
//! ```
//!
//! # What is accepted
//!
//! - Every field of the three kinds in Istio's v1 CRD schema. Unknown fields
//!   (top level, `metadata`, anywhere in `spec`) are errors naming the field
//!   and listing the expected ones.
//! - `metadata.name` (required, RFC 1123 subdomain), `metadata.namespace`
//!   (default: the caller's), `labels`, `annotations`, and the fields the API
//!   server adds (`uid`, `resourceVersion`, `generation`, `creationTimestamp`,
//!   `managedFields`, `selfLink`, `finalizers`, `ownerReferences`,
//!   `generateName`, `deletionTimestamp`, `deletionGracePeriodSeconds`),
//!   which are ignored, as is a top-level `status`. Only name and namespace are
//!   kept ([`Document::to_json`]).
//! - Durations in Istio's string form (`"1.5s"`, `"500ms"`); counts as YAML
//!   integers (`"3"` or `3.5` is a type error).
//! - `field: null`, meaning unset as in Kubernetes.
//! - A kubectl `List` (`apiVersion: v1`, `kind: List`, as `kubectl get … -o
//!   yaml` prints several resources): its `items` are read as documents, and
//!   their error paths start with `items[i]`.
//! - Empty documents (`---` alone) are skipped; YAML anchors and merge keys work.
//!
//! # Istio rules worth knowing
//!
//! - Weights are relative (Istio >= 1.15): each must be >= 0, a destination
//!   gets `weight / sum`, a lone destination gets everything, and several
//!   destinations must not all weigh 0. Weights above 100 are accepted.
//! - Durations must be at least 1ms and whole milliseconds (`ValidateDuration`),
//!   except `connectionPool.tcp.idleTimeout` (`0s` disables it) and
//!   `httpCookie.ttl`; `corsPolicy.maxAge` must be whole seconds.
//! - Outlier detection defaults: see [`OutlierDetection::effective`].
//!
//! # What is accepted but only warns ([`PolicyWarning`])
//!
//! Recognised Istio fields fedmesh does not act on:
//!
//! - VirtualService: `tls` routes, `gateways` other than `mesh`,
//!   `http[].redirect`, `directResponse`, `delegate`, `corsPolicy`,
//!   `rewrite.uriRegexRewrite`,
//!   `retries.retryIgnorePreviousHosts`, `tcp[].match[].sourceSubnet`;
//! - DestinationRule: `tunnel`, `proxyProtocol`, `retryBudget.budgetInterval`,
//!   `loadBalancer.warmup`, `backendUtilization`, `zoneAwareLbSetting`,
//!   `consistentHash.httpCookie.attributes`, `connectionPool.http.http2KeepAlive`,
//!   `outlierDetection.outlierDetectionHttpErrorCodes`, `tls.caCrl`;
//! - Sidecar: `ingress` listeners, `outboundTrafficPolicy.egressProxy`.
//!
//! Also warned, as Istio warns: deprecated `mirrorPercent`,
//! `outlierDetection.consecutiveErrors` (deprecated; read as the gateway-error threshold when no current threshold is set),
//! `consistentHash.minimumRingSize`, `corsPolicy.allowOrigin`; an abort
//! without a status; uppercase header names in matches; legacy
//! `name.namespace` gateway names; duplicate Sidecar egress hosts; failover
//! without outlier detection; a Sidecar selector without labels.
//!
//! # What is refused although the CRD schema has it
//!
//! As Istio's validation refuses them: `fault.delay.exponentialDelay`,
//! `fault.abort.http2Error`, Sidecar `port.targetPort`, JWT-claim header
//! matches (`@request.auth.claims…`) outside gateways. fedmesh is stricter
//! than Istio on: VirtualServices without hosts (delegates), a fault delay
//! without `fixedDelay`, a `consistentHash` without exactly one hash key,
//! duplicate `portLevelSettings` ports, and subset names, which must be
//! lowercase RFC 1123 labels like every fedmesh [`SubsetName`](crate::name::SubsetName).

mod authorization;
mod common;
mod destination_rule;
mod peer_authentication;
mod request;
mod request_authentication;
mod retry;
mod sidecar;
mod traffic_weights;
mod validate;
mod virtual_service;
mod yaml;

pub use authorization::{
    authorize, istio_match, Action, AuthorizationPolicy, AuthzRequest, Condition, Decision,
    ExtensionProvider, Operation, PolicyTargetReference, Rule, RuleFrom, RuleTo, Source,
    DEFAULT_ROOT_NAMESPACE,
};
pub use common::{
    Destination, HeaderMatch, HeaderOperations, Headers, MatchRegex, Percent, PolicyDuration,
    PortSelector, StringMatch, MAX_REGEX_LEN,
};
pub use destination_rule::{
    outlier_defaults, ClientTLSSettings, ConnectionPoolSettings, ConsistentHashLB, CookieAttribute,
    DestinationRule, EffectiveOutlierDetection, H2UpgradePolicy, HTTPCookie, HTTPSettings, HashKey,
    Http2KeepAlive, LoadBalancerSettings, LocalityDistribute, LocalityFailover,
    LocalityLoadBalancerSetting, MagLev, OutlierDetection, PortTrafficPolicy, ProxyProtocol,
    ProxyProtocolVersion, RetryBudget, RingHash, SimpleLB, Subset, TCPSettings, TLSmode,
    TcpKeepalive, TrafficPolicy, TunnelSettings, WarmupConfiguration, WorkloadMatchSelector,
};
pub use peer_authentication::{effective_mode, MtlsMode, PeerAuthentication, PeerMtls};
pub use request::RequestAttrs;
pub use request_authentication::{JwtHeader, JwtRule, RequestAuthentication};
pub use retry::{RetryOn, RetryPolicy, DEFAULT_RETRY_ON};
pub use sidecar::{
    select_sidecar, CaptureMode, IstioEgressListener, IstioIngressListener, OutboundMode,
    OutboundTrafficPolicy, Sidecar, SidecarPort, WorkloadSelector,
};
pub use traffic_weights::{
    RebalanceSettings, StaleEffective, StaleSettings, TrafficWeights, WeightsBy,
    DEFAULT_REBALANCE_FLOOR, DEFAULT_REBALANCE_INTERVAL, DEFAULT_REBALANCE_MAX_STEP,
    DEFAULT_REBALANCE_TOLERANCE, DEFAULT_SLOW_START, DEFAULT_WITHDRAW_AFTER, FEDMESH_API_VERSIONS,
    MAX_WEIGHT, MIN_REBALANCE_INTERVAL,
};
pub use virtual_service::{
    Abort, CorsPolicy, Delay, Delegate, DerivePort, HTTPBody, HTTPDirectResponse,
    HTTPFaultInjection, HTTPMatchRequest, HTTPMirrorPolicy, HTTPRedirect, HTTPRetry, HTTPRewrite,
    HTTPRoute, HTTPRouteDestination, L4MatchAttributes, RegexRewrite, RouteDestination, TCPRoute,
    TLSMatchAttributes, TLSRoute, UnmatchedPreflights, VirtualService, DEFAULT_RETRY_ATTEMPTS,
    GRPC_STATUSES, MESH_GATEWAY,
};

use crate::name::{check_dns_name, Namespace};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use validate::{Ctx, Issue};

/// The `apiVersion`s accepted: Istio serves the same schema under all three.
pub const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];

/// The `apiVersion`s accepted for the `security.istio.io` kinds
/// ([`Kind::AuthorizationPolicy`], [`Kind::PeerAuthentication`]).
pub const SECURITY_API_VERSIONS: [&str; 2] = ["security.istio.io/v1beta1", "security.istio.io/v1"];

/// File name used in errors from [`Document::from_json`].
pub const STORED_FILE: &str = "<stored>";

// === Kind ===

/// The policy kinds fedmesh reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// Routing rules.
    VirtualService,
    /// Destination policies and subsets.
    DestinationRule,
    /// Sidecar scoping.
    Sidecar,
    /// Access control (`security.istio.io`).
    AuthorizationPolicy,
    /// Inbound mTLS mode (`security.istio.io`).
    PeerAuthentication,
    /// JWT validation (`security.istio.io`).
    RequestAuthentication,
    /// fedmesh's cross-cluster traffic spread (`fedmesh.io/v1`).
    TrafficWeights,
}

impl Kind {
    /// All kinds.
    pub const ALL: [Kind; 7] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Sidecar,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
        Kind::TrafficWeights,
    ];

    /// The kind as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VirtualService => "VirtualService",
            Self::DestinationRule => "DestinationRule",
            Self::Sidecar => "Sidecar",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::RequestAuthentication => "RequestAuthentication",
            Self::TrafficWeights => "TrafficWeights",
        }
    }

    /// The `apiVersion`s this kind may be written with: [`API_VERSIONS`] for
    /// the `networking.istio.io` kinds, [`SECURITY_API_VERSIONS`] for the
    /// `security.istio.io` ones, [`FEDMESH_API_VERSIONS`] for `TrafficWeights`.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Self::VirtualService | Self::DestinationRule | Self::Sidecar => &API_VERSIONS,
            Self::AuthorizationPolicy | Self::PeerAuthentication | Self::RequestAuthentication => {
                &SECURITY_API_VERSIONS
            }
            Self::TrafficWeights => &FEDMESH_API_VERSIONS,
        }
    }
}

/// A kind fedmesh does not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsupported kind {0:?}: expected one of VirtualService, DestinationRule, Sidecar, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, TrafficWeights")]
pub struct UnknownKind(pub String);

impl std::str::FromStr for Kind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, UnknownKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.chars().take(80).collect()))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === Document ===

/// One validated policy resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Its kind.
    pub kind: Kind,
    /// One of [`API_VERSIONS`], as written.
    pub api_version: String,
    /// `metadata.name` (RFC 1123 subdomain).
    pub name: String,
    /// `metadata.namespace`, or the default namespace given to [`parse_yaml`].
    pub namespace: Namespace,
    /// The validated spec.
    pub spec: Spec,
}

/// The spec of a [`Document`], by kind.
// Specs are parsed once per configuration change and kept in snapshots, not
// moved on a hot path; boxing would only add an indirection to every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// A VirtualService spec.
    VirtualService(VirtualService),
    /// A DestinationRule spec.
    DestinationRule(DestinationRule),
    /// A Sidecar spec.
    Sidecar(Sidecar),
    /// An AuthorizationPolicy spec.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A PeerAuthentication spec.
    PeerAuthentication(PeerAuthentication),
    /// A RequestAuthentication spec.
    RequestAuthentication(RequestAuthentication),
    /// A TrafficWeights spec.
    TrafficWeights(TrafficWeights),
}

impl Spec {
    /// The kind of this spec.
    pub fn kind(&self) -> Kind {
        match self {
            Self::VirtualService(_) => Kind::VirtualService,
            Self::DestinationRule(_) => Kind::DestinationRule,
            Self::Sidecar(_) => Kind::Sidecar,
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Self::PeerAuthentication(_) => Kind::PeerAuthentication,
            Self::RequestAuthentication(_) => Kind::RequestAuthentication,
            Self::TrafficWeights(_) => Kind::TrafficWeights,
        }
    }

    fn to_json(&self) -> Json {
        let v = match self {
            Self::VirtualService(s) => serde_json::to_value(s),
            Self::DestinationRule(s) => serde_json::to_value(s),
            Self::Sidecar(s) => serde_json::to_value(s),
            Self::AuthorizationPolicy(s) => serde_json::to_value(s),
            Self::PeerAuthentication(s) => serde_json::to_value(s),
            Self::RequestAuthentication(s) => serde_json::to_value(s),
            Self::TrafficWeights(s) => serde_json::to_value(s),
        };
        // Invariant: the policy types have string keys only, and validation
        // refused non-finite numbers, so JSON can represent every value.
        v.expect("validated policy specs serialize to JSON")
    }
}

impl Document {
    /// The canonical storage form: `apiVersion`, `kind`, `metadata` (name and
    /// namespace only) and `spec`, with Istio field names and unset fields
    /// omitted. [`Document::from_json`] reads it back to an equal document.
    pub fn to_json(&self) -> Json {
        serde_json::json!({
            "apiVersion": self.api_version,
            "kind": self.kind.as_str(),
            "metadata": {"name": self.name, "namespace": self.namespace.as_str()},
            "spec": self.spec.to_json(),
        })
    }

    /// Reads a document from JSON, with the same validation as YAML (errors
    /// name the file `<stored>`, document 1). `metadata.namespace` is required.
    // The error is returned once per refused stored document, never on a hot
    // path; its size (owned strings for every location part) does not matter.
    #[allow(clippy::result_large_err)]
    pub fn from_json(v: &Json) -> Result<Document, PolicyError> {
        let d = decode(v, None);
        match d.result {
            Ok((doc, _warnings)) => Ok(doc),
            Err(mut issues) => {
                let loc = Location {
                    file: STORED_FILE.to_string(),
                    document: 1,
                    kind: d.kind,
                    namespace: d.namespace,
                    name: d.name,
                };
                Err(loc.error(issues.swap_remove(0)))
            }
        }
    }

    /// The identity of the resource: two documents with the same key are the same resource.
    pub fn key(&self) -> (Kind, &Namespace, &str) {
        (self.kind, &self.namespace, &self.name)
    }
    /// The services a routing document concerns, as FQDNs
    /// (`name.ns.svc.cluster.local`; short names are relative to the
    /// document's namespace): a VirtualService's hosts, a DestinationRule's
    /// or TrafficWeights' host; none for a Sidecar, AuthorizationPolicy,
    /// PeerAuthentication or RequestAuthentication.
    pub fn hosts(&self) -> Vec<String> {
        let fqdn = |h: &str| -> String {
            let h = h.to_ascii_lowercase();
            match h.split('.').count() {
                1 => format!("{h}.{}.svc.cluster.local", self.namespace),
                2 => format!("{h}.svc.cluster.local"),
                _ => h,
            }
        };
        match &self.spec {
            Spec::VirtualService(vs) => vs.hosts.iter().map(|h| fqdn(h)).collect(),
            Spec::DestinationRule(dr) => vec![fqdn(&dr.host)],
            Spec::TrafficWeights(tw) => vec![fqdn(&tw.host)],
            Spec::Sidecar(_)
            | Spec::AuthorizationPolicy(_)
            | Spec::PeerAuthentication(_)
            | Spec::RequestAuthentication(_) => Vec::new(),
        }
    }
}

// === errors and warnings ===

/// A refused document, with where and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// File name as given to [`parse_yaml`] (`<stored>` for [`Document::from_json`]).
    pub file: String,
    /// 1-based position of the document in the file.
    pub document: usize,
    /// `kind` as written, when it is a string.
    pub kind: Option<String>,
    /// Namespace of the resource (written or default), when known.
    pub namespace: Option<String>,
    /// `metadata.name` as written, when it is a string.
    pub name: Option<String>,
    /// Dotted path of the offending field, e.g. `spec.http[0].retries.attempts`;
    /// empty when the document as a whole is refused (e.g. a YAML syntax error).
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

/// A recognised field that is accepted but not acted on, or a deprecation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyWarning {
    /// File name as given to [`parse_yaml`].
    pub file: String,
    /// 1-based position of the document in the file.
    pub document: usize,
    /// `kind` of the document.
    pub kind: Option<String>,
    /// Namespace of the resource.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: Option<String>,
    /// Dotted path of the field.
    pub path: String,
    /// What the warning is about.
    pub reason: String,
}

/// The common text of errors and warnings:
/// `{file}: document {n} ({kind} {namespace}/{name}): {path}: {reason}`.
struct Located<'a> {
    file: &'a str,
    document: usize,
    kind: Option<&'a str>,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    path: &'a str,
    reason: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        let qualified = match (self.namespace, self.name) {
            (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
            (None, Some(n)) => Some(n.to_string()),
            _ => None,
        };
        match (self.kind, qualified) {
            (Some(k), Some(n)) => write!(f, " ({k} {n})")?,
            (Some(k), None) => write!(f, " ({k})")?,
            (None, Some(n)) => write!(f, " ({n})")?,
            (None, None) => {}
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Located {
            file: &self.file,
            document: self.document,
            kind: self.kind.as_deref(),
            namespace: self.namespace.as_deref(),
            name: self.name.as_deref(),
            path: &self.path,
            reason: &self.reason,
        }
        .fmt(f)
    }
}

impl std::error::Error for PolicyError {}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Located {
            file: &self.file,
            document: self.document,
            kind: self.kind.as_deref(),
            namespace: self.namespace.as_deref(),
            name: self.name.as_deref(),
            path: &self.path,
            reason: &self.reason,
        }
        .fmt(f)
    }
}

/// Where a document is, shared by its errors and warnings.
#[derive(Clone)]
struct Location {
    file: String,
    document: usize,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

impl Location {
    fn error(&self, issue: Issue) -> PolicyError {
        PolicyError {
            file: self.file.clone(),
            document: self.document,
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            path: issue.path,
            reason: issue.reason,
        }
    }

    fn warning(&self, issue: Issue) -> PolicyWarning {
        PolicyWarning {
            file: self.file.clone(),
            document: self.document,
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            path: issue.path,
            reason: issue.reason,
        }
    }
}

// === parsing ===

/// The documents of a valid file, and warnings about them.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    /// The documents, in file order (empty documents skipped).
    pub documents: Vec<Document>,
    /// Accepted-but-not-acted-on fields and deprecations.
    pub warnings: Vec<PolicyWarning>,
}

/// Parses a multi-document YAML file of policy documents of every [`Kind`]
/// (a kubectl `List` of them counts as one document; paths in its errors
/// start with `items[i]`). All or nothing: either every document is valid, or `Err` with
/// every error found — at least one per bad document (a YAML syntax or type
/// error stops that document), all semantic errors of documents whose types
/// were right, and an error on each document repeating an earlier
/// (kind, namespace, name). Documents without a namespace get `default_namespace`.
pub fn parse_yaml(
    file: &str,
    text: &str,
    default_namespace: &Namespace,
) -> Result<Parsed, Vec<PolicyError>> {
    let mut documents = Vec::new();
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<(Kind, Namespace, String), usize> = HashMap::new();
    let chunks = yaml::split(text);
    if chunks.len() > yaml::MAX_DOCUMENTS {
        return Err(vec![Location {
            file: file.to_string(),
            document: yaml::MAX_DOCUMENTS + 1,
            kind: None,
            namespace: None,
            name: None,
        }
        .error(Issue {
            path: String::new(),
            reason: format!(
                "{} documents: at most {} in one file; split it",
                chunks.len(),
                yaml::MAX_DOCUMENTS
            ),
        })]);
    }
    for chunk in chunks {
        let loc = Location {
            file: file.to_string(),
            document: chunk.number,
            kind: None,
            namespace: None,
            name: None,
        };
        if let Err(reason) = chunk.check_depth() {
            errors.push(loc.error(Issue {
                path: String::new(),
                reason: format!("invalid YAML: {reason}"),
            }));
            continue;
        }
        let value = match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&chunk.text)
            .and_then(|mut v| v.apply_merge().map(|()| v))
        {
            Ok(serde_yaml_ng::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(loc.error(Issue {
                    path: String::new(),
                    reason: format!("invalid YAML: {}", chunk.locate(&e)),
                }));
                continue;
            }
        };
        let json = match yaml::to_json(value.clone(), "") {
            Ok(j) => j,
            Err((path, reason)) => {
                let mut loc = loc.clone();
                let text =
                    |v: Option<&serde_yaml_ng::Value>| v.and_then(|v| v.as_str()).map(String::from);
                let meta = value.get("metadata");
                loc.kind = text(value.get("kind"));
                loc.name = text(meta.and_then(|m| m.get("name")));
                loc.namespace = text(meta.and_then(|m| m.get("namespace")))
                    .or_else(|| loc.name.as_ref().map(|_| default_namespace.to_string()));
                errors.push(loc.error(Issue { path, reason }));
                continue;
            }
        };
        let items = match list_items(json) {
            Ok(items) => items,
            Err(i) => {
                errors.push(loc.error(i));
                continue;
            }
        };
        for (prefix, item) in items {
            let d = decode(&item, Some(default_namespace));
            let mut loc = loc.clone();
            loc.kind = d.kind;
            loc.namespace = d.namespace;
            loc.name = d.name;
            let under = |mut i: Issue| {
                if !prefix.is_empty() {
                    i.path = if i.path.is_empty() {
                        prefix.clone()
                    } else {
                        format!("{prefix}.{}", i.path)
                    };
                }
                i
            };
            match d.result {
                Err(issues) => errors.extend(issues.into_iter().map(|i| loc.error(under(i)))),
                Ok((doc, w)) => {
                    let key = (doc.kind, doc.namespace.clone(), doc.name.clone());
                    if let Some(first) = seen.get(&key) {
                        errors.push(loc.error(under(Issue {
                            path: "metadata.name".into(),
                            reason: format!(
                                "duplicate {} {}/{}: already defined in document {first}",
                                doc.kind, doc.namespace, doc.name
                            ),
                        })));
                        continue;
                    }
                    seen.insert(key, chunk.number);
                    warnings.extend(w.into_iter().map(|i| loc.warning(under(i))));
                    documents.push(doc);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(Parsed {
            documents,
            warnings,
        })
    } else {
        Err(errors)
    }
}

/// The resources of a document: itself, or the `items` of a kubectl `List`
/// (`apiVersion: v1`, `kind: List`, as `kubectl get … -o yaml` prints several
/// resources), each with its path prefix.
fn list_items(json: Json) -> Result<Vec<(String, Json)>, Issue> {
    let is_list = json.get("kind").and_then(Json::as_str) == Some("List")
        && json.get("apiVersion").and_then(Json::as_str) == Some("v1");
    if !is_list {
        return Ok(vec![(String::new(), json)]);
    }
    let Json::Object(mut obj) = json else {
        return Ok(Vec::new());
    };
    for key in obj.keys() {
        if !["apiVersion", "kind", "metadata", "items"].contains(&key.as_str()) {
            return Err(issue(
                key.as_str(),
                format!("unknown field `{key}`, expected one of `apiVersion`, `kind`, `metadata`, `items`"),
            ));
        }
    }
    match obj.remove("items") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, item)| (format!("items[{i}]"), item))
            .collect()),
        Some(other) => Err(issue(
            "items",
            format!("must be a sequence, got {}", json_kind(&other)),
        )),
    }
}

/// `metadata` as users and the API server write it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    // Written by the API server or kubectl: accepted and ignored.
    #[serde(default, rename = "generateName")]
    _generate_name: Option<IgnoredAny>,
    #[serde(default, rename = "uid")]
    _uid: Option<IgnoredAny>,
    #[serde(default, rename = "resourceVersion")]
    _resource_version: Option<IgnoredAny>,
    #[serde(default, rename = "generation")]
    _generation: Option<IgnoredAny>,
    #[serde(default, rename = "creationTimestamp")]
    _creation_timestamp: Option<IgnoredAny>,
    #[serde(default, rename = "deletionTimestamp")]
    _deletion_timestamp: Option<IgnoredAny>,
    #[serde(default, rename = "deletionGracePeriodSeconds")]
    _deletion_grace_period_seconds: Option<IgnoredAny>,
    #[serde(default, rename = "managedFields")]
    _managed_fields: Option<IgnoredAny>,
    #[serde(default, rename = "selfLink")]
    _self_link: Option<IgnoredAny>,
    #[serde(default, rename = "finalizers")]
    _finalizers: Option<IgnoredAny>,
    #[serde(default, rename = "ownerReferences")]
    _owner_references: Option<IgnoredAny>,
}

const TOP_LEVEL: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

/// A document decoded as far as possible.
struct Decoded {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    result: Result<(Document, Vec<Issue>), Vec<Issue>>,
}

fn issue(path: impl Into<String>, reason: impl Into<String>) -> Issue {
    Issue {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Decodes and validates one document. `default_ns` `None` requires `metadata.namespace`.
fn decode(v: &Json, default_ns: Option<&Namespace>) -> Decoded {
    let mut errors = Vec::new();
    let mut out = Decoded {
        kind: None,
        namespace: default_ns.map(|n| n.to_string()),
        name: None,
        result: Err(Vec::new()),
    };
    let Some(obj) = v.as_object() else {
        out.result = Err(vec![issue(
            "",
            format!("a document must be a mapping, got {}", json_kind(v)),
        )]);
        return out;
    };
    for key in obj.keys() {
        if !TOP_LEVEL.contains(&key.as_str()) {
            errors.push(issue(
                key.as_str(),
                format!(
                    "unknown field `{key}`, expected one of {}",
                    TOP_LEVEL.map(|k| format!("`{k}`")).join(", ")
                ),
            ));
        }
    }

    // kind and apiVersion
    let kinds = Kind::ALL.map(Kind::as_str).join(", ");
    let kind = match obj.get("kind") {
        None | Some(Json::Null) => {
            errors.push(issue("kind", format!("is required: one of {kinds}")));
            None
        }
        Some(Json::String(s)) => {
            out.kind = Some(s.clone());
            match s.parse::<Kind>() {
                Ok(k) => Some(k),
                Err(e) => {
                    errors.push(issue("kind", e.to_string()));
                    None
                }
            }
        }
        Some(other) => {
            errors.push(issue(
                "kind",
                format!("must be a string, got {}", json_kind(other)),
            ));
            None
        }
    };
    // A known kind takes its own group's versions; otherwise any is accepted.
    let accepted: Vec<&str> = match kind {
        Some(k) => k.api_versions().to_vec(),
        None => API_VERSIONS
            .iter()
            .chain(&SECURITY_API_VERSIONS)
            .chain(&FEDMESH_API_VERSIONS)
            .copied()
            .collect(),
    };
    let versions = accepted.join(", ");
    let api_version = match obj.get("apiVersion") {
        None | Some(Json::Null) => {
            errors.push(issue(
                "apiVersion",
                format!("is required: one of {versions}"),
            ));
            None
        }
        Some(Json::String(s)) if accepted.contains(&s.as_str()) => Some(s.clone()),
        Some(Json::String(s)) => {
            errors.push(issue(
                "apiVersion",
                format!(
                    "unsupported apiVersion {:?}: expected one of {versions}",
                    common::truncate(s, 80)
                ),
            ));
            None
        }
        Some(other) => {
            errors.push(issue(
                "apiVersion",
                format!("must be a string, got {}", json_kind(other)),
            ));
            None
        }
    };

    // metadata: name and namespace as written give errors their context,
    // even when metadata itself is refused.
    if let Some(m) = obj.get("metadata") {
        if let Some(n) = m.get("name").and_then(Json::as_str) {
            out.name = Some(n.to_string());
        }
        if let Some(ns) = m.get("namespace").and_then(Json::as_str) {
            out.namespace = Some(ns.to_string());
        }
    }
    let mut name = None;
    let mut namespace = default_ns.cloned();
    match obj.get("metadata") {
        None | Some(Json::Null) => errors.push(issue("metadata", "is required")),
        Some(m) => match serde_path_to_error::deserialize::<_, RawMetadata>(m) {
            Err(e) => errors.push(serde_issue("metadata", &e)),
            Ok(meta) => {
                // Typed so that a wrong type is refused, but not kept.
                let _ = (meta.labels, meta.annotations);
                match meta.namespace {
                    Some(ns) => match Namespace::new(&ns) {
                        Ok(n) => namespace = Some(n),
                        Err(e) => errors.push(issue("metadata.namespace", e.to_string())),
                    },
                    None if default_ns.is_none() => {
                        errors.push(issue("metadata.namespace", "is required"));
                    }
                    None => {}
                }
                match meta.name {
                    None => errors.push(issue(
                        "metadata.name",
                        if meta._generate_name.is_some() {
                            "is required (generateName is not supported)"
                        } else {
                            "is required"
                        },
                    )),
                    Some(n) => match check_dns_name(&n) {
                        Ok(()) => name = Some(n),
                        Err(r) => errors.push(issue(
                            "metadata.name",
                            format!("invalid name {:?}: {r}", common::truncate(&n, 80)),
                        )),
                    },
                }
            }
        },
    }

    // spec: decoded whenever the kind is known, to report its errors too.
    let mut warnings = Vec::new();
    let mut spec = None;
    if let Some(kind) = kind {
        match obj.get("spec") {
            None | Some(Json::Null) => errors.push(issue("spec", "is required")),
            Some(s) => {
                let ns_text = namespace
                    .as_ref()
                    .map_or("default", |n| n.as_str())
                    .to_string();
                let mut ctx = Ctx::new(&ns_text);
                let decoded = match kind {
                    Kind::VirtualService => decode_spec::<VirtualService>(s).map(|vs| {
                        vs.validate(&mut ctx);
                        Spec::VirtualService(vs)
                    }),
                    Kind::DestinationRule => decode_spec::<DestinationRule>(s).map(|dr| {
                        dr.validate(&mut ctx);
                        Spec::DestinationRule(dr)
                    }),
                    Kind::Sidecar => decode_spec::<Sidecar>(s).map(|sc| {
                        sc.validate(&mut ctx);
                        Spec::Sidecar(sc)
                    }),
                    Kind::AuthorizationPolicy => decode_spec::<AuthorizationPolicy>(s).map(|ap| {
                        ap.validate(&mut ctx);
                        Spec::AuthorizationPolicy(ap)
                    }),
                    Kind::PeerAuthentication => decode_spec::<PeerAuthentication>(s).map(|pa| {
                        pa.validate(&mut ctx);
                        Spec::PeerAuthentication(pa)
                    }),
                    Kind::RequestAuthentication => {
                        decode_spec::<RequestAuthentication>(s).map(|ra| {
                            ra.validate(&mut ctx);
                            Spec::RequestAuthentication(ra)
                        })
                    }
                    Kind::TrafficWeights => decode_spec::<TrafficWeights>(s).map(|tw| {
                        tw.validate(&mut ctx);
                        Spec::TrafficWeights(tw)
                    }),
                };
                match decoded {
                    Err(i) => errors.push(i),
                    Ok(s) => {
                        errors.append(&mut ctx.errors);
                        warnings = ctx.warnings;
                        spec = Some(s);
                    }
                }
            }
        }
    }

    out.result = match (kind, api_version, name, namespace, spec) {
        (Some(kind), Some(api_version), Some(name), Some(namespace), Some(spec))
            if errors.is_empty() =>
        {
            Ok((
                Document {
                    kind,
                    api_version,
                    name,
                    namespace,
                    spec,
                },
                warnings,
            ))
        }
        _ => Err(errors),
    };
    out
}

fn decode_spec<T: serde::de::DeserializeOwned>(v: &Json) -> Result<T, Issue> {
    let v = without_nulls(v);
    serde_path_to_error::deserialize::<_, T>(&v).map_err(|e| serde_issue("spec", &e))
}

/// Drops mapping entries whose value is `null`: Kubernetes and protobuf JSON
/// treat `field: null` as unset, while serde would refuse it for lists and maps.
fn without_nulls(v: &Json) -> Json {
    match v {
        Json::Object(m) => Json::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Json::Array(a) => Json::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// An error from serde, at its path under `root`.
fn serde_issue(root: &str, e: &serde_path_to_error::Error<serde_json::Error>) -> Issue {
    let path = e.path().to_string();
    let path = if path == "." || path.is_empty() {
        root.to_string()
    } else {
        format!("{root}.{path}")
    };
    issue(path, e.inner().to_string())
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a sequence",
        Json::Object(_) => "a mapping",
    }
}
