//! `VirtualService`: how requests to a host are routed (Istio
//! `networking/v1/virtual_service.proto`).

use super::common::{
    is_false, Destination, HeaderMatch, Headers, Percent, PolicyDuration, StringMatch,
};
use super::retry::RetryOn;
use super::validate::{
    check_ip_subnet, check_wildcard_domain, hosts_overlap, is_authority_header, is_header_token,
    Ctx, PSEUDO_HEADERS,
};
use crate::name::check_label;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The reserved gateway name for sidecars: a VirtualService applies to the
/// mesh when `gateways` is empty or contains `mesh`.
pub const MESH_GATEWAY: &str = "mesh";

/// Routing rules for one or more hosts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    /// Hosts the rules apply to (short names are relative to the namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Gateways and sidecars (`mesh`) that apply these routes; empty means `mesh`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// HTTP routes, evaluated in order: the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HTTPRoute>,
    /// TCP routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TCPRoute>,
    /// TLS (SNI) routes: parsed, not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TLSRoute>,
    /// Namespaces the rules are visible to (`.`, `*` or names); empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

/// One HTTP routing rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPRoute {
    /// Name, for logs and stats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions, OR-ed; empty matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub r#match: Vec<HTTPMatchRequest>,
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<HTTPRouteDestination>,
    /// Redirect instead of forwarding: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<HTTPRedirect>,
    /// Answer directly instead of forwarding: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<HTTPDirectResponse>,
    /// Delegate to another VirtualService: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<Delegate>,
    /// Rewrite the URI or authority before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HTTPRewrite>,
    /// Request timeout; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<PolicyDuration>,
    /// Retry policy; absent means Istio's default (2 attempts, [`RetryOn::default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HTTPRetry>,
    /// Fault injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HTTPFaultInjection>,
    /// Mirror traffic to this destination too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Destination>,
    /// Share of traffic mirrored to `mirror`; absent means 100%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<Percent>,
    /// Legacy integer form of `mirrorPercentage` (deprecated).
    #[serde(
        default,
        alias = "mirror_percent",
        skip_serializing_if = "Option::is_none"
    )]
    pub mirror_percent: Option<u32>,
    /// Several mirror destinations (v1 API).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<HTTPMirrorPolicy>,
    /// CORS policy: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors_policy: Option<CorsPolicy>,
    /// Header manipulation for all destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

/// Conditions on a request, AND-ed together.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPMatchRequest {
    /// Name, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Path (without query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// URI scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    /// HTTP method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// Authority (`Host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Headers that must be present and match (`{}` means present).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderMatch>,
    /// Headers that must not match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub without_headers: BTreeMap<String, HeaderMatch>,
    /// Query parameters that must be present and match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, HeaderMatch>,
    /// Destination port the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Labels the source workload must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Namespace the source workload must be in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Gateways this match applies to (overrides the VirtualService's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Match `uri` exact and prefix conditions ignoring ASCII case.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ignore_uri_case: bool,
    /// Stats prefix for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat_prefix: Option<String>,
}

/// A weighted destination of an HTTP route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPRouteDestination {
    /// Where to send the request.
    pub destination: Destination,
    /// Relative weight; absent means 0 (see [`HTTPRoute::pick_destination`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    /// Header manipulation for this destination only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

/// A redirect response (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPRedirect {
    /// Replacement path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replacement for the matched path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// Replacement authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Replacement port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derive_port: Option<DerivePort>,
    /// Replacement scheme, `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Status code, 3xx (default 301).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_code: Option<u32>,
}

/// How a redirect picks its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DerivePort {
    /// 80 for http, 443 for https.
    FromProtocolDefault,
    /// The port of the request.
    FromRequestPort,
}

/// A fixed response (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPDirectResponse {
    /// Status code, 200 to 599.
    pub status: u32,
    /// Body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<HTTPBody>,
}

/// Body of a direct response: text or base64 bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPBody {
    /// Text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string: Option<String>,
    /// Base64 body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
}

/// Reference to a delegate VirtualService (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delegate {
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its namespace (default: this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// URI and authority rewriting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPRewrite {
    /// Replaces the matched path (prefix or whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replaces the authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Regex-based rewrite: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// Regex path rewrite.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    /// Pattern (RE2).
    #[serde(default)]
    pub r#match: String,
    /// Replacement, with `\1`-style groups.
    #[serde(default)]
    pub rewrite: String,
}

/// Retry policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPRetry {
    /// Number of retries (not counting the first try); absent means 0, disabling retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// Timeout of each try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<PolicyDuration>,
    /// When to retry; absent means [`RetryOn::default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<RetryOn>,
    /// Whether retries may go to other localities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_remote_localities: Option<bool>,
    /// Whether retries avoid hosts already tried (Istio default true): not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base back-off interval between attempts (Envoy default 25ms; jittered,
    /// exponential, at most ten times the base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<PolicyDuration>,
}

/// Retries Istio configures when a route has no `retries` (`retry.go` `DefaultPolicy`).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

impl HTTPRetry {
    /// Retries allowed: `attempts`, or 0 when absent or negative.
    pub fn effective_attempts(&self) -> u32 {
        self.attempts.map_or(0, |a| u32::try_from(a).unwrap_or(0))
    }

    /// The retry conditions, Istio's default when absent.
    pub fn effective_retry_on(&self) -> RetryOn {
        self.retry_on.clone().unwrap_or_default()
    }
}

/// Fault injection: delays and/or aborts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPFaultInjection {
    /// Delay some requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    /// Abort some requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

/// A fault delay.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delay {
    /// Delay length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_delay: Option<PolicyDuration>,
    /// Refused, as Istio refuses it ("not supported yet").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponential_delay: Option<PolicyDuration>,
    /// Share of requests delayed; absent means none (or `percent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Legacy integer percentage (deprecated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i32>,
}

impl Delay {
    /// Fraction of requests to delay, in `[0, 1]`: `percentage` if set, else
    /// the legacy `percent`, else 0 (Istio: "if left unspecified, no request will be delayed").
    pub fn fraction(&self) -> f64 {
        match (self.percentage, self.percent) {
            (Some(p), _) => p.fraction(),
            (None, Some(p)) => (f64::from(p) / 100.0).clamp(0.0, 1.0),
            (None, None) => 0.0,
        }
    }
}

/// A fault abort.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Abort {
    /// HTTP status to answer with, 200 to 599.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
    /// gRPC status name to answer with, e.g. `UNAVAILABLE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Refused, as Istio refuses it ("not supported yet").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_error: Option<String>,
    /// Share of requests aborted; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

impl Abort {
    /// Fraction of requests to abort, in `[0, 1]`: `percentage`, or 0 when
    /// absent (Istio: "if not specified, no request will be aborted").
    pub fn fraction(&self) -> f64 {
        self.percentage.map_or(0.0, Percent::fraction)
    }

    /// The numeric gRPC code of `grpc_status`, if it names one.
    pub fn grpc_code(&self) -> Option<u32> {
        let name = self.grpc_status.as_deref()?;
        GRPC_STATUSES
            .iter()
            .position(|s| *s == name)
            .and_then(|i| u32::try_from(i).ok())
    }
}

/// gRPC status names, indexed by code (istio `pkg/util/grpc` `SupportedGRPCStatus`).
pub const GRPC_STATUSES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// One mirror destination (v1 API).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPMirrorPolicy {
    /// Where to mirror.
    pub destination: Destination,
    /// Share mirrored; absent means 100%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

impl HTTPMirrorPolicy {
    /// Fraction of requests mirrored, in `[0, 1]`; 1 when `percentage` is absent.
    pub fn fraction(&self) -> f64 {
        self.percentage.map_or(1.0, Percent::fraction)
    }
}

/// CORS policy (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    /// Deprecated exact origins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origin: Vec<String>,
    /// Allowed origins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<StringMatch>,
    /// Allowed methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Allowed request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// Headers the browser may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// Preflight cache lifetime (whole seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<PolicyDuration>,
    /// `Access-Control-Allow-Credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    /// `UNSPECIFIED`, `FORWARD` or `IGNORE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmatched_preflights: Option<UnmatchedPreflights>,
}

/// What to do with preflights that match no allowed origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UnmatchedPreflights {
    /// Same as `FORWARD`.
    Unspecified,
    /// Forward to the upstream.
    Forward,
    /// Do not forward.
    Ignore,
}

/// One TCP routing rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TCPRoute {
    /// Conditions, OR-ed; empty matches every connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub r#match: Vec<L4MatchAttributes>,
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
}

/// Conditions on a TCP connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4MatchAttributes {
    /// Destination IPs or CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    /// Destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Labels the source workload must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways this match applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Namespace the source workload must be in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Source IP or CIDR block (gateways only): not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_subnet: Option<String>,
}

/// A weighted destination of a TCP or TLS route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    /// Where to send the connection.
    pub destination: Destination,
    /// Relative weight; absent means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

/// One TLS (SNI) routing rule (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TLSRoute {
    /// Conditions, OR-ed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub r#match: Vec<TLSMatchAttributes>,
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
}

/// Conditions on a TLS connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TLSMatchAttributes {
    /// SNI names to match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    /// Destination IPs or CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    /// Destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Labels the source workload must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways this match applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Namespace the source workload must be in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

// === helpers ===

impl VirtualService {
    /// Whether the rules apply to sidecars: `gateways` is empty or lists `mesh`.
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }
}

impl HTTPRoute {
    /// Fraction of requests mirrored to `mirror`, in `[0, 1]`: 0 without a
    /// mirror; else `mirrorPercentage`, else the legacy `mirrorPercent`, else
    /// 100% (Istio `route.MirrorPercent`). Each entry of `mirrors` has its own
    /// [`HTTPMirrorPolicy::fraction`].
    pub fn mirror_fraction(&self) -> f64 {
        if self.mirror.is_none() {
            return 0.0;
        }
        match (self.mirror_percentage, self.mirror_percent) {
            (Some(p), _) => p.fraction(),
            (None, Some(p)) => (f64::from(p) / 100.0).clamp(0.0, 1.0),
            (None, None) => 1.0,
        }
    }

    /// Picks a destination by weight for a uniformly random `roll`.
    ///
    /// Istio's rule (since 1.15, `validateHTTPRouteDestinations`): weights are
    /// relative, each destination receives `weight / sum of weights`; a single
    /// destination receives everything whatever its weight; with several, an
    /// absent weight is 0 and validation refuses a total of 0.
    pub fn pick_destination(&self, roll: u64) -> Option<&HTTPRouteDestination> {
        pick_weighted(&self.route, roll, |d| d.weight)
    }
}

impl TCPRoute {
    /// Picks a destination by weight, as [`HTTPRoute::pick_destination`].
    pub fn pick_destination(&self, roll: u64) -> Option<&RouteDestination> {
        pick_weighted(&self.route, roll, |d| d.weight)
    }
}

fn pick_weighted<T>(items: &[T], roll: u64, weight: impl Fn(&T) -> Option<i32>) -> Option<&T> {
    if items.len() <= 1 {
        return items.first();
    }
    let w = |t: &T| u64::try_from(weight(t).unwrap_or(0)).unwrap_or(0);
    let total: u64 = items.iter().map(w).sum();
    if total == 0 {
        return items.first();
    }
    let mut point = roll % total;
    for item in items {
        let wi = w(item);
        if point < wi {
            return Some(item);
        }
        point -= wi;
    }
    items.last()
}

// === validation ===

const HTTP_METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE", "*",
];

impl VirtualService {
    pub(crate) fn validate(&self, c: &mut Ctx<'_>) {
        let mesh = self.applies_to_mesh();
        if self.hosts.is_empty() {
            c.error(
                "spec.hosts",
                "at least one host is required (delegate VirtualServices without hosts are not supported)",
            );
        }
        let mut hosts_ok = true;
        for (i, h) in self.hosts.iter().enumerate() {
            let p = format!("spec.hosts[{i}]");
            if let Err(r) = check_wildcard_domain(h) {
                if h.parse::<std::net::IpAddr>().is_err() {
                    c.error(p, format!("invalid host {h:?}: {r}"));
                    hosts_ok = false;
                }
            } else if mesh && h == "*" {
                c.error(
                    p,
                    "wildcard host * is not allowed for VirtualServices that apply to the mesh",
                );
                hosts_ok = false;
            }
        }
        if hosts_ok {
            for i in 0..self.hosts.len() {
                for j in i + 1..self.hosts.len() {
                    if hosts_overlap(&self.hosts[i], &self.hosts[j]) {
                        c.error(
                            format!("spec.hosts[{j}]"),
                            format!(
                                "duplicate host: {:?} overlaps {:?}",
                                self.hosts[j], self.hosts[i]
                            ),
                        );
                    }
                }
            }
        }
        c.gateway_names("spec.gateways", &self.gateways);
        for (i, g) in self.gateways.iter().enumerate() {
            if g != MESH_GATEWAY {
                c.warn(
                    format!("spec.gateways[{i}]"),
                    format!(
                        "gateway {g:?} is not acted on: fedmesh applies only the `mesh` routes"
                    ),
                );
            }
        }
        if self.http.is_empty() && self.tcp.is_empty() && self.tls.is_empty() {
            c.error(
                "spec",
                "at least one of http, tcp or tls routes is required",
            );
        }
        for (i, r) in self.http.iter().enumerate() {
            r.validate(c, &format!("spec.http[{i}]"), mesh);
        }
        for (i, r) in self.tcp.iter().enumerate() {
            r.validate(c, &format!("spec.tcp[{i}]"));
            // Opaque TCP goes to the original destination's service.
            c.not_acted_on(format!("spec.tcp[{i}]"));
        }
        for (i, r) in self.tls.iter().enumerate() {
            r.validate(c, &format!("spec.tls[{i}]"));
        }
        c.export_to("spec.exportTo", &self.export_to, false);
        if !self.export_to.is_empty() {
            c.not_acted_on("spec.exportTo");
        }
    }
}

impl HTTPRoute {
    fn validate(&self, c: &mut Ctx<'_>, path: &str, mesh: bool) {
        self.validate_conflicts(c, path);
        for (j, m) in self.r#match.iter().enumerate() {
            m.validate(c, &format!("{path}.match[{j}]"), mesh);
        }
        c.header_ops(&format!("{path}.headers"), self.headers.as_ref());
        if let Some(cors) = &self.cors_policy {
            cors.validate(c, &format!("{path}.corsPolicy"));
        }
        if let Some(f) = &self.fault {
            f.validate(c, &format!("{path}.fault"));
        }
        if let Some(p) = self.mirror_percent {
            let mp = format!("{path}.mirrorPercent");
            if p > 100 {
                c.error(&mp, format!("must be between 0 and 100, got {p}"));
            }
            c.warn(mp, "deprecated: use mirrorPercentage");
        }
        c.percentage(
            &format!("{path}.mirrorPercentage"),
            self.mirror_percentage.as_ref(),
            false,
        );
        if let Some(m) = &self.mirror {
            validate_destination(c, &format!("{path}.mirror"), m);
        }
        for (k, m) in self.mirrors.iter().enumerate() {
            let mp = format!("{path}.mirrors[{k}]");
            validate_destination(c, &format!("{mp}.destination"), &m.destination);
            c.percentage(&format!("{mp}.percentage"), m.percentage.as_ref(), false);
            // One mirror is sent: `mirror`, else the first of `mirrors`.
            if k > 0 || self.mirror.is_some() {
                c.not_acted_on(mp);
            }
        }
        if let Some(r) = &self.redirect {
            r.validate(c, &format!("{path}.redirect"), &self.r#match);
        }
        if let Some(d) = &self.direct_response {
            d.validate(c, &format!("{path}.directResponse"));
        }
        if self.delegate.is_some() {
            c.not_acted_on(format!("{path}.delegate"));
        }
        if let Some(r) = &self.retries {
            r.validate(c, &format!("{path}.retries"));
        }
        if let Some(r) = &self.rewrite {
            r.validate(c, &format!("{path}.rewrite"));
        }
        self.validate_authority_rewrite(c, path);
        validate_route_destinations(
            c,
            &format!("{path}.route"),
            self.route
                .iter()
                .map(|d| (&d.destination, d.weight, d.headers.as_ref())),
        );
        c.duration(&format!("{path}.timeout"), self.timeout.as_ref());
    }

    /// Istio `validateHTTPRouteConflict`.
    fn validate_conflicts(&self, c: &mut Ctx<'_>, path: &str) {
        if self.delegate.is_some() {
            if self.redirect.is_some() {
                c.error(
                    format!("{path}.redirect"),
                    "cannot be combined with delegate",
                );
            }
            if !self.route.is_empty() {
                c.error(format!("{path}.route"), "cannot be combined with delegate");
            }
        } else if self.redirect.is_some() {
            for (field, set) in [
                ("route", !self.route.is_empty()),
                ("fault", self.fault.is_some()),
                ("rewrite", self.rewrite.is_some()),
                ("directResponse", self.direct_response.is_some()),
            ] {
                if set {
                    c.error(
                        format!("{path}.{field}"),
                        "cannot be combined with redirect",
                    );
                }
            }
        } else if self.direct_response.is_some() {
            for (field, set) in [
                ("route", !self.route.is_empty()),
                ("fault", self.fault.is_some()),
                ("rewrite", self.rewrite.is_some()),
            ] {
                if set {
                    c.error(
                        format!("{path}.{field}"),
                        "cannot be combined with directResponse",
                    );
                }
            }
        } else if self.route.is_empty() {
            c.error(
                path,
                "must set one of route, redirect, directResponse or delegate",
            );
        }
        if self.mirror.is_some() && !self.mirrors.is_empty() {
            c.error(format!("{path}.mirrors"), "cannot be combined with mirror");
        }
    }

    /// Istio `validateAuthorityRewrite`: the authority is rewritten in one place only.
    fn validate_authority_rewrite(&self, c: &mut Ctx<'_>, path: &str) {
        let mut current = self.rewrite.as_ref().and_then(|r| r.authority.clone());
        let Some(req) = self.headers.as_ref().and_then(|h| h.request.as_ref()) else {
            return;
        };
        for (field, map) in [("set", &req.set), ("add", &req.add)] {
            for (k, v) in map {
                if !is_authority_header(k) {
                    continue;
                }
                if let Some(cur) = &current {
                    c.error(
                        format!("{path}.headers.request.{field}.{k}"),
                        format!(
                            "authority is already set to {cur:?}; it cannot also be set to {v:?}"
                        ),
                    );
                }
                current = Some(v.clone());
            }
        }
    }
}

impl HTTPMatchRequest {
    fn validate(&self, c: &mut Ctx<'_>, path: &str, mesh: bool) {
        for (field, map) in [
            ("headers", &self.headers),
            ("withoutHeaders", &self.without_headers),
        ] {
            for (name, m) in map {
                let p = format!("{path}.{field}.{name}");
                if name.starts_with("@request.auth.claims") {
                    if mesh {
                        c.error(
                            &p,
                            "JWT claim based routing is only supported for gateways, and fedmesh has none",
                        );
                    }
                } else if name.is_empty() {
                    c.error(&p, "header name must not be empty");
                } else if !PSEUDO_HEADERS.contains(&name.as_str()) && !is_header_token(name) {
                    c.error(&p, format!("{name:?} is not a valid header name"));
                } else if matches!(name.as_str(), "uri" | "scheme" | "method" | "authority") {
                    c.warn(
                        &p,
                        format!("header key {name:?} is ignored (as in Istio): use match.{name}"),
                    );
                } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    c.warn(
                        &p,
                        "Istio requires lowercase header names; fedmesh matches header names case-insensitively",
                    );
                }
                if let HeaderMatch::Match(sm) = m {
                    c.string_match(&p, sm, false);
                }
            }
        }
        if let Some(u) = &self.uri {
            // Envoy allows an empty path prefix; not for the others.
            c.string_match(&format!("{path}.uri"), u, true);
        }
        for (field, m) in [
            ("scheme", &self.scheme),
            ("method", &self.method),
            ("authority", &self.authority),
        ] {
            if let Some(m) = m {
                c.string_match(&format!("{path}.{field}"), m, false);
            }
        }
        for (name, m) in &self.query_params {
            if let HeaderMatch::Match(sm) = m {
                c.string_match(&format!("{path}.queryParams.{name}"), sm, false);
            }
        }
        if let Some(port) = self.port.filter(|p| *p != 0) {
            c.port(&format!("{path}.port"), port);
        }
        c.labels(&format!("{path}.sourceLabels"), &self.source_labels);
        c.gateway_names(&format!("{path}.gateways"), &self.gateways);
        if let Some(ns) = &self.source_namespace {
            if let Err(r) = check_label(ns) {
                c.error(
                    format!("{path}.sourceNamespace"),
                    format!("invalid namespace {ns:?}: {r}"),
                );
            }
        }
    }
}

/// Istio `validateDestination`.
pub(crate) fn validate_destination(c: &mut Ctx<'_>, path: &str, d: &Destination) {
    if d.host == "*" {
        c.error(format!("{path}.host"), "destination host must not be *");
    } else if let Err(r) = check_wildcard_domain(&d.host) {
        c.error(
            format!("{path}.host"),
            format!("invalid host {:?}: {r}", d.host),
        );
    }
    if let Some(s) = &d.subset {
        if let Err(r) = check_label(s) {
            c.error(
                format!("{path}.subset"),
                format!("invalid subset name {s:?}: {r}"),
            );
        }
    }
    if let Some(p) = d.port {
        c.port(&format!("{path}.port.number"), p.number);
    }
}

/// Istio `validateHTTPRouteDestinations` / `validateRouteDestinations`:
/// each weight >= 0 and, with more than one destination, a positive total.
fn validate_route_destinations<'a>(
    c: &mut Ctx<'_>,
    path: &str,
    dests: impl Iterator<Item = (&'a Destination, Option<i32>, Option<&'a Headers>)>,
) {
    let mut total: i64 = 0;
    let mut n = 0;
    for (i, (d, weight, headers)) in dests.enumerate() {
        n += 1;
        let p = format!("{path}[{i}]");
        c.header_ops(&format!("{p}.headers"), headers);
        validate_destination(c, &format!("{p}.destination"), d);
        if let Some(w) = weight {
            if w < 0 {
                c.error(format!("{p}.weight"), format!("must be >= 0, got {w}"));
            } else {
                total += i64::from(w);
            }
        }
    }
    if n > 1 && total == 0 {
        c.error(
            path,
            "weights sum to 0: with more than one destination, at least one weight must be positive (weights are relative)",
        );
    }
}

impl HTTPFaultInjection {
    fn validate(&self, c: &mut Ctx<'_>, path: &str) {
        if self.delay.is_none() && self.abort.is_none() {
            c.error(path, "must set delay, abort or both");
        }
        if let Some(d) = &self.delay {
            let p = format!("{path}.delay");
            c.percentage(&format!("{p}.percentage"), d.percentage.as_ref(), true);
            c.percent_int(&format!("{p}.percent"), d.percent);
            match (&d.fixed_delay, &d.exponential_delay) {
                (Some(_), Some(_)) => c.error(
                    format!("{p}.exponentialDelay"),
                    "cannot be combined with fixedDelay",
                ),
                (Some(f), None) => c.duration(&format!("{p}.fixedDelay"), Some(f)),
                (None, Some(_)) => c.error(
                    format!("{p}.exponentialDelay"),
                    "exponential delays are not supported (Istio refuses them too): use fixedDelay",
                ),
                (None, None) => c.error(&p, "fixedDelay is required"),
            }
        }
        if let Some(a) = &self.abort {
            let p = format!("{path}.abort");
            c.percentage(&format!("{p}.percentage"), a.percentage.as_ref(), true);
            let set = [
                a.http_status.is_some(),
                a.grpc_status.is_some(),
                a.http2_error.is_some(),
            ];
            if set.iter().filter(|s| **s).count() > 1 {
                c.error(
                    &p,
                    "must set only one of httpStatus, grpcStatus or http2Error",
                );
            }
            if let Some(s) = a.http_status {
                if !(200..=599).contains(&s) {
                    c.error(
                        format!("{p}.httpStatus"),
                        format!("must be an HTTP status 200 to 599, got {s}"),
                    );
                }
            }
            if let Some(g) = &a.grpc_status {
                if !GRPC_STATUSES.contains(&g.as_str()) {
                    c.error(
                        format!("{p}.grpcStatus"),
                        format!(
                            "unknown gRPC status {g:?}: use one of {}",
                            GRPC_STATUSES.join(", ")
                        ),
                    );
                }
            }
            if a.http2_error.is_some() {
                c.error(
                    format!("{p}.http2Error"),
                    "HTTP/2 error aborts are not supported (Istio refuses them too): use httpStatus or grpcStatus",
                );
            }
            if !set.iter().any(|s| *s) {
                c.warn(
                    &p,
                    "no httpStatus or grpcStatus: this abort does nothing (as in Istio)",
                );
            }
        }
    }
}

impl HTTPRetry {
    /// Istio `ValidateHTTPRetry`.
    fn validate(&self, c: &mut Ctx<'_>, path: &str) {
        c.non_negative(&format!("{path}.attempts"), self.attempts);
        let configured = self.per_try_timeout.is_some()
            || self
                .retry_on
                .as_ref()
                .is_some_and(|r| !r.as_str().is_empty())
            || self.retry_remote_localities.is_some();
        if self.attempts.unwrap_or(0) == 0 && configured {
            c.error(
                format!("{path}.attempts"),
                "retry settings are configured but attempts is 0 (retries disabled): set attempts",
            );
        }
        c.duration(
            &format!("{path}.perTryTimeout"),
            self.per_try_timeout.as_ref(),
        );
        if self.backoff.is_some() {
            c.duration(&format!("{path}.backoff"), self.backoff.as_ref());
        }
        if self.retry_ignore_previous_hosts.is_some() {
            c.not_acted_on(format!("{path}.retryIgnorePreviousHosts"));
        }
    }
}

impl HTTPRewrite {
    /// Istio `validateHTTPRewrite`.
    fn validate(&self, c: &mut Ctx<'_>, path: &str) {
        if self.uri.is_some() && self.uri_regex_rewrite.is_some() {
            c.error(path, "must set only one of uri or uriRegexRewrite");
        }
        if self.uri.is_none() && self.uri_regex_rewrite.is_none() && self.authority.is_none() {
            c.error(path, "must set uri, uriRegexRewrite or authority");
        }
        if let Some(rr) = &self.uri_regex_rewrite {
            let p = format!("{path}.uriRegexRewrite");
            c.not_acted_on(&p);
            if rr.r#match.is_empty() || rr.rewrite.is_empty() {
                c.error(&p, "match and rewrite are both required");
            } else if let Err(r) = super::common::MatchRegex::new(&rr.r#match) {
                c.error(format!("{p}.match"), r);
            }
        }
    }
}

impl HTTPRedirect {
    /// Istio `validateHTTPRedirect`.
    fn validate(&self, c: &mut Ctx<'_>, path: &str, matches: &[HTTPMatchRequest]) {
        c.not_acted_on(path);
        if self.uri.is_some() && self.prefix_rewrite.is_some() {
            c.error(path, "must set only one of uri or prefixRewrite");
        }
        if self.prefix_rewrite.is_some()
            && matches.iter().any(|m| {
                m.uri
                    .as_ref()
                    .is_some_and(|u| !matches!(u, StringMatch::Prefix(_)))
            })
        {
            c.error(
                format!("{path}.prefixRewrite"),
                "requires every uri match of the route to be a prefix match",
            );
        }
        if self.uri.is_none()
            && self.prefix_rewrite.is_none()
            && self.authority.is_none()
            && self.port.is_none()
            && self.derive_port.is_none()
            && self.scheme.is_none()
        {
            c.error(
                path,
                "must set uri, prefixRewrite, authority, scheme or port",
            );
        }
        if let Some(code) = self.redirect_code.filter(|c| *c != 0) {
            if !(300..=399).contains(&code) {
                c.error(
                    format!("{path}.redirectCode"),
                    format!("must be a 3xx status, got {code}"),
                );
            }
        }
        if let Some(s) = &self.scheme {
            if s != "http" && s != "https" {
                c.error(
                    format!("{path}.scheme"),
                    format!("must be http or https, got {s:?}"),
                );
            }
        }
        if self.port.is_some() && self.derive_port.is_some() {
            c.error(path, "must set only one of port or derivePort");
        }
        if let Some(p) = self.port.filter(|p| *p != 0) {
            c.port(&format!("{path}.port"), p);
        }
    }
}

impl HTTPDirectResponse {
    /// Istio `validateHTTPDirectResponse`.
    fn validate(&self, c: &mut Ctx<'_>, path: &str) {
        c.not_acted_on(path);
        if !(200..=599).contains(&self.status) {
            c.error(
                format!("{path}.status"),
                format!("must be an HTTP status 200 to 599, got {}", self.status),
            );
        }
        if let Some(b) = &self.body {
            let p = format!("{path}.body");
            if b.string.is_some() && b.bytes.is_some() {
                c.error(&p, "must set only one of string or bytes");
            }
            let size = b
                .string
                .as_ref()
                .map(String::len)
                .or_else(|| b.bytes.as_ref().map(|s| s.len() / 4 * 3))
                .unwrap_or(0);
            if size > 1024 * 1024 {
                c.error(&p, "must be smaller than 1MB");
            } else if size > 100 * 1024 {
                c.warn(
                    &p,
                    "large direct responses may impact control plane performance",
                );
            }
        }
    }
}

impl CorsPolicy {
    /// Istio `validateCORSPolicy`.
    fn validate(&self, c: &mut Ctx<'_>, path: &str) {
        c.not_acted_on(path);
        if !self.allow_origin.is_empty() {
            c.warn(
                format!("{path}.allowOrigin"),
                "deprecated: use allowOrigins",
            );
        }
        for (i, o) in self.allow_origins.iter().enumerate() {
            let p = format!("{path}.allowOrigins[{i}]");
            if o.value().is_empty() {
                c.error(&p, "an allowed origin must not be empty");
            }
        }
        for (i, m) in self.allow_methods.iter().enumerate() {
            if !HTTP_METHODS.contains(&m.as_str()) {
                c.error(
                    format!("{path}.allowMethods[{i}]"),
                    format!("{m:?} is not a supported HTTP method"),
                );
            }
        }
        for (field, list) in [
            ("allowHeaders", &self.allow_headers),
            ("exposeHeaders", &self.expose_headers),
        ] {
            for (i, h) in list.iter().enumerate() {
                if h != "*" && !is_header_token(h) {
                    c.error(
                        format!("{path}.{field}[{i}]"),
                        format!("{h:?} is not a valid header name"),
                    );
                }
            }
        }
        if let Some(m) = &self.max_age {
            let p = format!("{path}.maxAge");
            c.duration(&p, Some(m));
            if m.get().subsec_nanos() != 0 {
                c.error(p, format!("must be a whole number of seconds, got {m}"));
            }
        }
    }
}

impl TCPRoute {
    fn validate(&self, c: &mut Ctx<'_>, path: &str) {
        for (j, m) in self.r#match.iter().enumerate() {
            let p = format!("{path}.match[{j}]");
            for (k, s) in m.destination_subnets.iter().enumerate() {
                if let Err(r) = check_ip_subnet(s) {
                    c.error(format!("{p}.destinationSubnets[{k}]"), r);
                }
            }
            if let Some(port) = m.port.filter(|p| *p != 0) {
                c.port(&format!("{p}.port"), port);
            }
            c.labels(&format!("{p}.sourceLabels"), &m.source_labels);
            c.gateway_names(&format!("{p}.gateways"), &m.gateways);
            if m.source_subnet.is_some() {
                c.not_acted_on(format!("{p}.sourceSubnet"));
            }
        }
        if self.route.is_empty() {
            c.error(
                format!("{path}.route"),
                "at least one destination is required",
            );
        }
        validate_route_destinations(
            c,
            &format!("{path}.route"),
            self.route.iter().map(|d| (&d.destination, d.weight, None)),
        );
    }
}

impl TLSRoute {
    fn validate(&self, c: &mut Ctx<'_>, path: &str) {
        c.not_acted_on(path);
        if self.r#match.is_empty() {
            c.error(format!("{path}.match"), "at least one match is required");
        }
        for (j, m) in self.r#match.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                c.error(
                    format!("{path}.match[{j}].sniHosts"),
                    "at least one SNI host is required",
                );
            }
        }
        validate_route_destinations(
            c,
            &format!("{path}.route"),
            self.route.iter().map(|d| (&d.destination, d.weight, None)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str, weight: Option<i32>) -> HTTPRouteDestination {
        HTTPRouteDestination {
            destination: Destination {
                host: host.into(),
                subset: None,
                port: None,
            },
            weight,
            headers: None,
        }
    }

    #[test]
    fn weighted_pick() {
        let r = HTTPRoute {
            route: vec![dest("a", Some(25)), dest("b", Some(75))],
            ..HTTPRoute::default()
        };
        let mut counts = [0; 2];
        for roll in 0..100 {
            let d = r.pick_destination(roll).unwrap();
            counts[usize::from(d.destination.host == "b")] += 1;
        }
        assert_eq!(counts, [25, 75]);

        // Weights are relative: 1 and 3 split like 25 and 75.
        let r = HTTPRoute {
            route: vec![dest("a", Some(1)), dest("b", Some(3))],
            ..HTTPRoute::default()
        };
        let hits = (0..4).filter(|roll| r.pick_destination(*roll).unwrap().destination.host == "a");
        assert_eq!(hits.count(), 1);

        // A zero-weight destination never receives traffic.
        let r = HTTPRoute {
            route: vec![dest("a", None), dest("b", Some(10))],
            ..HTTPRoute::default()
        };
        assert!((0..50).all(|roll| r.pick_destination(roll).unwrap().destination.host == "b"));

        // A single destination takes everything, whatever its weight.
        let r = HTTPRoute {
            route: vec![dest("a", Some(0))],
            ..HTTPRoute::default()
        };
        assert_eq!(r.pick_destination(7).unwrap().destination.host, "a");
        assert!(HTTPRoute::default().pick_destination(0).is_none());
    }

    #[test]
    fn fault_fractions() {
        let d = Delay {
            percentage: Some(Percent { value: 10.0 }),
            percent: Some(50),
            ..Delay::default()
        };
        assert_eq!(d.fraction(), 0.1, "percentage wins over legacy percent");
        let d = Delay {
            percent: Some(50),
            ..Delay::default()
        };
        assert_eq!(d.fraction(), 0.5);
        assert_eq!(Delay::default().fraction(), 0.0);
        let a = Abort {
            percentage: Some(Percent { value: 100.0 }),
            ..Abort::default()
        };
        assert_eq!(a.fraction(), 1.0);
        assert_eq!(Abort::default().fraction(), 0.0);
        let g = Abort {
            grpc_status: Some("UNAVAILABLE".into()),
            ..Abort::default()
        };
        assert_eq!(g.grpc_code(), Some(14));
    }

    #[test]
    fn mirror_fractions() {
        let m = Destination {
            host: "m".into(),
            subset: None,
            port: None,
        };
        let mut r = HTTPRoute::default();
        assert_eq!(r.mirror_fraction(), 0.0, "no mirror");
        r.mirror = Some(m.clone());
        assert_eq!(r.mirror_fraction(), 1.0, "default 100%");
        r.mirror_percent = Some(30);
        assert_eq!(r.mirror_fraction(), 0.3);
        r.mirror_percentage = Some(Percent { value: 5.0 });
        assert_eq!(r.mirror_fraction(), 0.05, "mirrorPercentage wins");
        r.mirror_percentage = Some(Percent { value: 0.0 });
        assert_eq!(r.mirror_fraction(), 0.0, "explicit 0 disables");
        let p = HTTPMirrorPolicy {
            destination: m,
            percentage: None,
        };
        assert_eq!(p.fraction(), 1.0);
    }

    #[test]
    fn retry_effective() {
        let r = HTTPRetry::default();
        assert_eq!(r.effective_attempts(), 0);
        assert_eq!(r.effective_retry_on(), RetryOn::default());
        let r = HTTPRetry {
            attempts: Some(3),
            retry_on: Some(RetryOn::parse("5xx").unwrap()),
            ..HTTPRetry::default()
        };
        assert_eq!(r.effective_attempts(), 3);
        assert!(r.effective_retry_on().on_status(500));
    }
}
