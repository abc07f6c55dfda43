//! `DestinationRule`: what happens to traffic once routed to a host — load
//! balancing, connection pools, outlier detection, TLS, subsets (Istio
//! `networking/v1/destination_rule.proto`).

use super::common::{is_false, PolicyDuration, PortSelector};
use super::validate::{check_fqdn, check_wildcard_domain, Ctx};
use crate::name::check_label;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Policies for one host and its subsets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRule {
    /// The service host (short names are relative to the namespace).
    pub host: String,
    /// Policy for all of the host's traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named groups of endpoints, selected by labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Namespaces the rule is visible to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// Workloads (clients) the rule applies to; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadMatchSelector>,
}

/// A `matchLabels` selector (Istio `type.v1beta1.WorkloadSelector`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadMatchSelector {
    /// Labels a workload must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// A named subset of the host's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    /// Name (RFC 1123 label), referenced by `destination.subset`.
    pub name: String,
    /// Labels an endpoint must have to belong to the subset; empty selects all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Overrides of the top-level policy for this subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Traffic policy: each part applies as a whole (see [`DestinationRule::policy_for`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Load balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of failing endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Upstream TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTLSSettings>,
    /// Per-port overrides, replacing the four settings above for that port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Tunnelling (HTTP CONNECT/POST): not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelSettings>,
    /// PROXY protocol to upstreams: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Retry budget: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

/// Policy for one port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    /// The port (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
    /// Load balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of failing endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Upstream TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTLSSettings>,
}

/// Load-balancing settings: `simple` or `consistentHash`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    /// A standard algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLB>,
    /// Session affinity by hashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHashLB>,
    /// Locality-aware routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<LocalityLoadBalancerSetting>,
    /// Slow start window for new endpoints (deprecated in Istio for `warmup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_duration_secs: Option<PolicyDuration>,
    /// Slow start: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<WarmupConfiguration>,
    /// ORCA-based balancing: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_utilization: Option<serde_json::Value>,
    /// Zone-aware balancing: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_aware_lb_setting: Option<serde_json::Value>,
}

/// Standard load-balancing algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLB {
    /// Let the proxy choose (Istio: LEAST_REQUEST).
    Unspecified,
    /// Deprecated alias of LEAST_REQUEST.
    LeastConn,
    /// Random endpoint.
    Random,
    /// Forward to the original destination address.
    Passthrough,
    /// Round robin.
    RoundRobin,
    /// Fewest outstanding requests among two random picks.
    LeastRequest,
}

/// Consistent hashing: exactly one hash key, and optionally the ring kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashLB {
    /// Hash on this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    /// Hash on this cookie (generated if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HTTPCookie>,
    /// Hash on the source IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_source_ip: Option<bool>,
    /// Hash on this query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_query_parameter_name: Option<String>,
    /// Ring hash (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<RingHash>,
    /// Maglev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<MagLev>,
    /// Deprecated: use `ringHash.minimumRingSize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<u64>,
}

/// The hash key of a [`ConsistentHashLB`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashKey<'a> {
    /// A header value.
    Header(&'a str),
    /// A cookie.
    Cookie(&'a HTTPCookie),
    /// The source IP.
    SourceIp,
    /// A query parameter.
    QueryParameter(&'a str),
}

impl ConsistentHashLB {
    /// The hash key, if exactly one is set (validation guarantees it).
    pub fn key(&self) -> Option<HashKey<'_>> {
        let keys = self.keys();
        match keys.as_slice() {
            [k] => Some(*k),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<HashKey<'_>> {
        let mut keys = Vec::new();
        if let Some(h) = &self.http_header_name {
            keys.push(HashKey::Header(h));
        }
        if let Some(c) = &self.http_cookie {
            keys.push(HashKey::Cookie(c));
        }
        if self.use_source_ip == Some(true) {
            keys.push(HashKey::SourceIp);
        }
        if let Some(q) = &self.http_query_parameter_name {
            keys.push(HashKey::QueryParameter(q));
        }
        keys
    }
}

/// A hash cookie.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPCookie {
    /// Cookie name.
    pub name: String,
    /// Cookie path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Lifetime of a generated cookie (0s: session cookie).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<PolicyDuration>,
    /// Extra cookie attributes: not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<CookieAttribute>,
}

/// A cookie attribute.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieAttribute {
    /// Attribute name.
    #[serde(default)]
    pub name: String,
    /// Attribute value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Ring hash settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    /// Minimum ring size (Envoy default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<u64>,
}

/// Maglev settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MagLev {
    /// Table size: a prime below 5000011.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u64>,
}

/// Locality-aware load balancing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLoadBalancerSetting {
    /// Weighted distribution from a locality to others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribute: Vec<LocalityDistribute>,
    /// Region failover order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<LocalityFailover>,
    /// Labels ordering failover priority.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_priority: Vec<String>,
    /// Enables locality-aware balancing (default per mesh config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// Traffic from `from` is spread over `to` with weights summing to 100.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityDistribute {
    /// Source locality `region/zone/subzone`, possibly with a trailing `*`.
    #[serde(default)]
    pub from: String,
    /// Destination locality to weight (1 to 100).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub to: BTreeMap<String, u32>,
}

/// When `from` (a region) has no healthy endpoints, use `to`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityFailover {
    /// Failing region.
    #[serde(default)]
    pub from: String,
    /// Region to fail over to.
    #[serde(default)]
    pub to: String,
}

/// Slow start (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmupConfiguration {
    /// Length of the warmup window (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<PolicyDuration>,
    /// Starting share of traffic, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_percent: Option<f64>,
    /// Curve of the ramp, > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggression: Option<f64>,
}

/// Connection pool limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    /// TCP-level limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TCPSettings>,
    /// HTTP-level limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HTTPSettings>,
}

/// TCP connection pool limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TCPSettings {
    /// Maximum connections to a host (Envoy default 2^32-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i32>,
    /// Connect timeout (Istio default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<PolicyDuration>,
    /// TCP keepalive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Maximum lifetime of a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<PolicyDuration>,
    /// Idle timeout (`0s` disables it; Istio default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<PolicyDuration>,
}

/// TCP keepalive settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    /// Unanswered probes before the connection is dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
    /// Idle time before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<PolicyDuration>,
    /// Interval between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<PolicyDuration>,
}

/// HTTP connection pool limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HTTPSettings {
    /// Maximum queued requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<i32>,
    /// Maximum active requests to a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<i32>,
    /// Requests per connection before it is closed (0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<i32>,
    /// Maximum concurrent retries to the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<i32>,
    /// Idle timeout of upstream connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<PolicyDuration>,
    /// Whether HTTP/1.1 is upgraded to HTTP/2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// Use the client's protocol upstream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub use_client_protocol: bool,
    /// Maximum concurrent streams per HTTP/2 connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<i32>,
    /// HTTP/2 keepalive pings: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_keep_alive: Option<Http2KeepAlive>,
}

/// HTTP/2 upgrade policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// Mesh default.
    Default,
    /// Never upgrade.
    DoNotUpgrade,
    /// Upgrade to HTTP/2.
    Upgrade,
}

/// HTTP/2 keepalive pings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Http2KeepAlive {
    /// Ping interval (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<PolicyDuration>,
    /// Ping timeout (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<PolicyDuration>,
}

/// Outlier detection: eject endpoints after consecutive errors.
/// See [`OutlierDetection::effective`] for defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Count local-origin failures (connect errors, timeouts) separately.
    #[serde(default, skip_serializing_if = "is_false")]
    pub split_external_local_origin_errors: bool,
    /// Local-origin failures before ejection (with the split; default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<u32>,
    /// 502/503/504 (and connection failures) before ejection; absent or 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// 5xx (and connection failures) before ejection; default 5, 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<u32>,
    /// Deprecated and ignored by Istio since 1.7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_errors: Option<i32>,
    /// Time between ejection sweeps (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<PolicyDuration>,
    /// Minimum ejection time, multiplied by the number of ejections (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<PolicyDuration>,
    /// Maximum share of endpoints ejected, percent (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i32>,
    /// Detection is disabled below this share of healthy endpoints (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Option<i32>,
    /// HTTP statuses counted as errors instead of 5xx: not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outlier_detection_http_error_codes: Vec<u32>,
}

/// Outlier detection with Istio's (Envoy's) defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectiveOutlierDetection {
    /// Consecutive 5xx threshold; `None` when disabled.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive gateway-error threshold; `None` when disabled.
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive local-origin failure threshold, only with the split.
    pub consecutive_local_origin_failures: Option<u32>,
    /// Time between sweeps.
    pub interval: Duration,
    /// Base ejection time.
    pub base_ejection_time: Duration,
    /// Maximum percent of endpoints ejected.
    pub max_ejection_percent: u32,
    /// Healthy percent below which detection stops (0: never).
    pub min_health_percent: u32,
}

/// Envoy's outlier-detection defaults, which Istio leaves in place
/// (`cluster_traffic_policy.go` `applyOutlierDetection`; Envoy `outlier_detection.proto`).
pub mod outlier_defaults {
    use std::time::Duration;
    /// `consecutive_5xx` (enforced 100%).
    pub const CONSECUTIVE_5XX: u32 = 5;
    /// `consecutive_local_origin_failure` (enforced 100% with the split).
    pub const CONSECUTIVE_LOCAL_ORIGIN_FAILURES: u32 = 5;
    /// `interval`.
    pub const INTERVAL: Duration = Duration::from_secs(10);
    /// `base_ejection_time`.
    pub const BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
    /// `max_ejection_percent`.
    pub const MAX_EJECTION_PERCENT: u32 = 10;
}

impl OutlierDetection {
    /// Applies Istio's translation and Envoy's defaults:
    ///
    /// - `consecutive5xxErrors`: absent → 5; 0 → disabled.
    /// - `consecutiveGatewayErrors`: absent or 0 → disabled (Envoy does not
    ///   enforce it by default).
    /// - `consecutiveErrors` (legacy): when neither `consecutive5xxErrors` nor
    ///   `consecutiveGatewayErrors` is set, it is the gateway-error threshold
    ///   and 5xx counting is off, which is what it meant when users wrote it
    ///   (Istio before 1.7; later Istio ignores it, istio/istio#24087).
    ///   Validation warns that it is deprecated.
    /// - `interval` 10s, `baseEjectionTime` 30s, `maxEjectionPercent` 10 when
    ///   absent or 0 (Istio cannot tell 0 from unset), `minHealthPercent` 0.
    /// - local-origin failures count only with `splitExternalLocalOriginErrors`
    ///   (threshold default 5).
    pub fn effective(&self) -> EffectiveOutlierDetection {
        use outlier_defaults as d;
        let nonzero = |v: Option<u32>| v.filter(|n| *n > 0);
        let legacy = self
            .consecutive_errors
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .filter(|_| {
                self.consecutive_5xx_errors.is_none() && self.consecutive_gateway_errors.is_none()
            });
        EffectiveOutlierDetection {
            consecutive_5xx: match (self.consecutive_5xx_errors, legacy) {
                (_, Some(_)) => None,
                (None, None) => Some(d::CONSECUTIVE_5XX),
                (v, None) => nonzero(v),
            },
            consecutive_gateway_errors: legacy.or(nonzero(self.consecutive_gateway_errors)),
            consecutive_local_origin_failures: self.split_external_local_origin_errors.then(|| {
                nonzero(self.consecutive_local_origin_failures)
                    .unwrap_or(d::CONSECUTIVE_LOCAL_ORIGIN_FAILURES)
            }),
            interval: self.interval.map_or(d::INTERVAL, PolicyDuration::get),
            base_ejection_time: self
                .base_ejection_time
                .map_or(d::BASE_EJECTION_TIME, PolicyDuration::get),
            max_ejection_percent: self
                .max_ejection_percent
                .and_then(|p| u32::try_from(p).ok())
                .filter(|p| *p > 0)
                .unwrap_or(d::MAX_EJECTION_PERCENT),
            min_health_percent: self
                .min_health_percent
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
        }
    }
}

/// Upstream TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTLSSettings {
    /// TLS mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TLSmode>,
    /// Client certificate file (MUTUAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    /// Client key file (MUTUAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// CA bundle file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// Secret holding the certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// Accepted server SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// SNI to send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Skip server certificate verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
    /// Certificate revocation list file: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
}

/// Upstream TLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(clippy::upper_case_acronyms)]
pub enum TLSmode {
    /// Plain text.
    Disable,
    /// TLS, server authenticated.
    Simple,
    /// Mutual TLS with the given certificates.
    Mutual,
    /// Mutual TLS with mesh identities.
    IstioMutual,
}

/// Tunnel settings (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelSettings {
    /// `CONNECT` or `POST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Tunnel target host.
    #[serde(default)]
    pub target_host: String,
    /// Tunnel target port.
    #[serde(default)]
    pub target_port: u32,
}

/// PROXY protocol settings (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyProtocol {
    /// `V1` or `V2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<ProxyProtocolVersion>,
}

/// PROXY protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyProtocolVersion {
    /// Text header.
    V1,
    /// Binary header.
    V2,
}

/// Retry budget: retries in flight at most `percent` of the requests in
/// flight to the destination, and at least `minRetryConcurrency` (Envoy's).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Share of active requests that may be retries, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Retries always allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retry_concurrency: Option<u32>,
    /// Window of the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_interval: Option<PolicyDuration>,
}

// === helpers ===

impl DestinationRule {
    /// The subset with this name.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy that applies to traffic for `subset` on `port`, merged as
    /// Istio does (`util.MergeSubsetTrafficPolicy`):
    ///
    /// 1. Start from the top-level policy; if it has `portLevelSettings` for
    ///    `port`, that entry *replaces* load balancer, connection pool, outlier
    ///    detection and TLS (fields it omits fall back to defaults, not to the
    ///    top level; tunnel and proxy protocol are dropped).
    /// 2. The subset's policy, resolved for `port` the same way, overrides each
    ///    of those four settings it sets (all four when it has an entry for the
    ///    port), and tunnel/proxy protocol/retry budget when set.
    ///
    /// The result has no `portLevelSettings`. Unknown subsets contribute
    /// nothing; with `port` `None`, port-level settings are not consulted.
    pub fn policy_for(&self, subset: Option<&str>, port: Option<u16>) -> TrafficPolicy {
        let top = self
            .traffic_policy
            .as_ref()
            .map(|tp| resolve_port(tp, port).0);
        let sub = subset
            .and_then(|name| self.subset(name))
            .and_then(|s| s.traffic_policy.as_ref())
            .map(|tp| resolve_port(tp, port));
        match (top, sub) {
            (None, None) => TrafficPolicy::default(),
            (Some(t), None) => t,
            (None, Some((s, _))) => s,
            (Some(mut merged), Some((s, port_level))) => {
                if s.connection_pool.is_some() || port_level {
                    merged.connection_pool = s.connection_pool;
                }
                if s.outlier_detection.is_some() || port_level {
                    merged.outlier_detection = s.outlier_detection;
                }
                if s.load_balancer.is_some() || port_level {
                    merged.load_balancer = s.load_balancer;
                }
                if s.tls.is_some() || port_level {
                    merged.tls = s.tls;
                }
                if s.tunnel.is_some() {
                    merged.tunnel = s.tunnel;
                }
                if s.proxy_protocol.is_some() {
                    merged.proxy_protocol = s.proxy_protocol;
                }
                if s.retry_budget.is_some() {
                    merged.retry_budget = s.retry_budget;
                }
                merged
            }
        }
    }
}

/// Istio `GetPortLevelTrafficPolicy`: the port entry as a whole policy, or the
/// policy without its port-level settings. `true` when a port entry was used.
fn resolve_port(tp: &TrafficPolicy, port: Option<u16>) -> (TrafficPolicy, bool) {
    let entry = port.and_then(|p| {
        tp.port_level_settings
            .iter()
            .find(|s| s.port.is_some_and(|sel| sel.number == u32::from(p)))
    });
    match entry {
        Some(e) => (
            TrafficPolicy {
                load_balancer: e.load_balancer.clone(),
                connection_pool: e.connection_pool.clone(),
                outlier_detection: e.outlier_detection.clone(),
                tls: e.tls.clone(),
                ..TrafficPolicy::default()
            },
            true,
        ),
        None => (
            TrafficPolicy {
                port_level_settings: Vec::new(),
                ..tp.clone()
            },
            false,
        ),
    }
}

impl Subset {
    /// Whether an endpoint with these labels belongs to the subset: it has
    /// every subset label with the same value (no labels: every endpoint).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

// === validation ===

impl DestinationRule {
    pub(crate) fn validate(&self, c: &mut Ctx<'_>) {
        if let Err(r) = check_wildcard_domain(&self.host) {
            c.error("spec.host", format!("invalid host {:?}: {r}", self.host));
        }
        if let Some(tp) = &self.traffic_policy {
            validate_traffic_policy(c, "spec.trafficPolicy", tp);
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, s) in self.subsets.iter().enumerate() {
            let p = format!("spec.subsets[{i}]");
            if let Err(r) = check_label(&s.name) {
                c.error(
                    format!("{p}.name"),
                    format!("invalid subset name {:?}: {r}", s.name),
                );
            }
            if let Some(first) = seen.insert(&s.name, i) {
                seen.insert(&s.name, first);
                c.error(
                    format!("{p}.name"),
                    format!(
                        "duplicate subset name {:?} (first defined at spec.subsets[{first}])",
                        s.name
                    ),
                );
            }
            c.labels(&format!("{p}.labels"), &s.labels);
            if let Some(tp) = &s.traffic_policy {
                validate_traffic_policy(c, &format!("{p}.trafficPolicy"), tp);
            }
        }
        c.export_to(
            "spec.exportTo",
            &self.export_to,
            self.workload_selector.is_some(),
        );
        if !self.export_to.is_empty() {
            c.not_acted_on("spec.exportTo");
        }
        if self.workload_selector.is_some() {
            c.not_acted_on("spec.workloadSelector");
        }
        if let Some(ws) = &self.workload_selector {
            let p = "spec.workloadSelector.matchLabels";
            for (k, v) in &ws.match_labels {
                if k.contains('*') || v.contains('*') {
                    c.error(format!("{p}.{k}"), "wildcards are not allowed in selectors");
                }
            }
            c.labels(p, &ws.match_labels);
        }
    }
}

fn validate_traffic_policy(c: &mut Ctx<'_>, path: &str, tp: &TrafficPolicy) {
    if *tp == TrafficPolicy::default() {
        c.error(path, "must set at least one field");
        return;
    }
    if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
        c.error(path, "tunnel and proxyProtocol cannot both be set");
    }
    validate_policy_parts(
        c,
        path,
        tp.outlier_detection.as_ref(),
        tp.connection_pool.as_ref(),
        tp.load_balancer.as_ref(),
        tp.tls.as_ref(),
    );
    let mut ports = BTreeMap::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let p = format!("{path}.portLevelSettings[{i}]");
        match pl.port {
            None => c.error(format!("{p}.port"), "is required"),
            Some(sel) => {
                c.port(&format!("{p}.port.number"), sel.number);
                if let Some(first) = ports.insert(sel.number, i) {
                    ports.insert(sel.number, first);
                    c.error(
                        format!("{p}.port.number"),
                        format!(
                            "port {} already has settings at {path}.portLevelSettings[{first}]",
                            sel.number
                        ),
                    );
                }
            }
        }
        if pl.outlier_detection.is_none()
            && pl.connection_pool.is_none()
            && pl.load_balancer.is_none()
            && pl.tls.is_none()
        {
            c.error(
                &p,
                "must set at least one of loadBalancer, connectionPool, outlierDetection or tls",
            );
        } else {
            validate_policy_parts(
                c,
                &p,
                pl.outlier_detection.as_ref(),
                pl.connection_pool.as_ref(),
                pl.load_balancer.as_ref(),
                pl.tls.as_ref(),
            );
        }
    }
    if let Some(t) = &tp.tunnel {
        let p = format!("{path}.tunnel");
        c.not_acted_on(&p);
        if let Some(proto) = &t.protocol {
            if proto != "CONNECT" && proto != "POST" {
                c.error(
                    format!("{p}.protocol"),
                    format!("must be CONNECT or POST, got {proto:?}"),
                );
            }
        }
        if check_fqdn(&t.target_host).is_err() && t.target_host.parse::<std::net::IpAddr>().is_err()
        {
            c.error(
                format!("{p}.targetHost"),
                format!("{:?} is not a DNS name or IP address", t.target_host),
            );
        }
        c.port(&format!("{p}.targetPort"), t.target_port);
    }
    if tp.proxy_protocol.is_some() {
        c.not_acted_on(format!("{path}.proxyProtocol"));
    }
    if let Some(rb) = &tp.retry_budget {
        let p = format!("{path}.retryBudget");
        // Envoy's budget counts retries in flight, with no window.
        if rb.budget_interval.is_some() {
            c.not_acted_on(format!("{p}.budgetInterval"));
        }
        if let Some(v) = rb.percent {
            if !(0.0..=100.0).contains(&v) {
                c.error(
                    format!("{p}.percent"),
                    format!("must be between 0 and 100, got {v}"),
                );
            }
        }
    }
}

fn validate_policy_parts(
    c: &mut Ctx<'_>,
    path: &str,
    od: Option<&OutlierDetection>,
    cp: Option<&ConnectionPoolSettings>,
    lb: Option<&LoadBalancerSettings>,
    tls: Option<&ClientTLSSettings>,
) {
    if let Some(od) = od {
        validate_outlier(c, &format!("{path}.outlierDetection"), od);
    }
    if let Some(cp) = cp {
        validate_connection_pool(c, &format!("{path}.connectionPool"), cp);
    }
    if let Some(lb) = lb {
        validate_load_balancer(c, &format!("{path}.loadBalancer"), lb, od.is_some());
    }
    if let Some(t) = tls {
        validate_tls(c, &format!("{path}.tls"), t);
    }
}

/// Istio `validateOutlierDetection`.
fn validate_outlier(c: &mut Ctx<'_>, path: &str, od: &OutlierDetection) {
    c.duration(
        &format!("{path}.baseEjectionTime"),
        od.base_ejection_time.as_ref(),
    );
    c.duration(&format!("{path}.interval"), od.interval.as_ref());
    if let Some(n) = od.consecutive_errors {
        let p = format!("{path}.consecutiveErrors");
        if n < 0 {
            c.error(&p, format!("must be >= 0, got {n}"));
        } else if n != 0 {
            c.warn(
                &p,
                "deprecated: read as consecutiveGatewayErrors (5xx not counted) unless consecutive5xxErrors or consecutiveGatewayErrors is set; use those",
            );
        }
    }
    if !od.split_external_local_origin_errors
        && od.consecutive_local_origin_failures.unwrap_or(0) > 0
    {
        c.error(
            format!("{path}.consecutiveLocalOriginFailures"),
            "requires splitExternalLocalOriginErrors: true",
        );
    }
    c.percent_int(
        &format!("{path}.maxEjectionPercent"),
        od.max_ejection_percent,
    );
    c.percent_int(&format!("{path}.minHealthPercent"), od.min_health_percent);
    if !od.outlier_detection_http_error_codes.is_empty() {
        let p = format!("{path}.outlierDetectionHttpErrorCodes");
        c.not_acted_on(&p);
        for (i, code) in od.outlier_detection_http_error_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                c.error(
                    format!("{p}[{i}]"),
                    format!("must be an HTTP status 100 to 599, got {code}"),
                );
            }
        }
    }
}

/// Istio `validateConnectionPool`.
pub(crate) fn validate_connection_pool(c: &mut Ctx<'_>, path: &str, cp: &ConnectionPoolSettings) {
    if cp.tcp.is_none() && cp.http.is_none() {
        c.error(path, "must set tcp or http");
        return;
    }
    // What the agent enforces: tcp.maxConnections, tcp.connectTimeout,
    // http.http1MaxPendingRequests, http.http2MaxRequests,
    // http.maxRequestsPerConnection. The rest is said.
    if let Some(t) = &cp.tcp {
        let p = format!("{path}.tcp");
        for (field, set) in [
            ("tcpKeepalive", t.tcp_keepalive.is_some()),
            ("maxConnectionDuration", t.max_connection_duration.is_some()),
            ("idleTimeout", t.idle_timeout.is_some()),
        ] {
            if set {
                c.not_acted_on(format!("{p}.{field}"));
            }
        }
    }
    if let Some(h) = &cp.http {
        let p = format!("{path}.http");
        for (field, set) in [
            ("maxRetries", h.max_retries.is_some()),
            ("idleTimeout", h.idle_timeout.is_some()),
            ("h2UpgradePolicy", h.h2_upgrade_policy.is_some()),
            ("useClientProtocol", h.use_client_protocol),
            ("maxConcurrentStreams", h.max_concurrent_streams.is_some()),
        ] {
            if set {
                c.not_acted_on(format!("{p}.{field}"));
            }
        }
        for (field, v) in [
            ("http1MaxPendingRequests", h.http1_max_pending_requests),
            ("http2MaxRequests", h.http2_max_requests),
            ("maxRequestsPerConnection", h.max_requests_per_connection),
            ("maxRetries", h.max_retries),
            ("maxConcurrentStreams", h.max_concurrent_streams),
        ] {
            c.non_negative(&format!("{p}.{field}"), v);
        }
        c.duration(&format!("{p}.idleTimeout"), h.idle_timeout.as_ref());
        if h.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade) && h.use_client_protocol {
            c.error(
                format!("{p}.useClientProtocol"),
                "must not be true when h2UpgradePolicy is UPGRADE",
            );
        }
        if let Some(ka) = &h.http2_keep_alive {
            let kp = format!("{p}.http2KeepAlive");
            c.not_acted_on(&kp);
            for (field, d) in [("interval", &ka.interval), ("timeout", &ka.timeout)] {
                match d {
                    None => c.error(format!("{kp}.{field}"), "is required"),
                    Some(d) => c.duration(&format!("{kp}.{field}"), Some(d)),
                }
            }
        }
    }
    if let Some(t) = &cp.tcp {
        let p = format!("{path}.tcp");
        c.non_negative(&format!("{p}.maxConnections"), t.max_connections);
        c.duration(&format!("{p}.connectTimeout"), t.connect_timeout.as_ref());
        c.duration(
            &format!("{p}.maxConnectionDuration"),
            t.max_connection_duration.as_ref(),
        );
        // `0s` disables the idle timeout.
        if let Some(d) = t.idle_timeout.filter(|d| d.get().as_millis() != 0) {
            c.duration(&format!("{p}.idleTimeout"), Some(&d));
        }
        if let Some(ka) = &t.tcp_keepalive {
            c.duration(&format!("{p}.tcpKeepalive.time"), ka.time.as_ref());
            c.duration(&format!("{p}.tcpKeepalive.interval"), ka.interval.as_ref());
        }
    }
}

/// Istio `validateLoadBalancer` and the CRD's one-of rules.
fn validate_load_balancer(
    c: &mut Ctx<'_>,
    path: &str,
    lb: &LoadBalancerSettings,
    has_outlier: bool,
) {
    let kinds = [
        ("simple", lb.simple.is_some()),
        ("consistentHash", lb.consistent_hash.is_some()),
        ("backendUtilization", lb.backend_utilization.is_some()),
    ];
    let set: Vec<&str> = kinds.iter().filter(|(_, s)| *s).map(|(k, _)| *k).collect();
    if set.len() > 1 {
        c.error(
            path,
            format!(
                "must set only one of simple, consistentHash or backendUtilization, got {}",
                set.join(" and ")
            ),
        );
    }
    if let Some(ch) = &lb.consistent_hash {
        let p = format!("{path}.consistentHash");
        let keys = ch.keys();
        if keys.len() != 1 {
            let names: Vec<&str> = [
                ("httpHeaderName", ch.http_header_name.is_some()),
                ("httpCookie", ch.http_cookie.is_some()),
                ("useSourceIp", ch.use_source_ip == Some(true)),
                (
                    "httpQueryParameterName",
                    ch.http_query_parameter_name.is_some(),
                ),
            ]
            .iter()
            .filter(|(_, s)| *s)
            .map(|(k, _)| *k)
            .collect();
            let got = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(" and ")
            };
            c.error(
                &p,
                format!(
                    "must set exactly one hash key (httpHeaderName, httpCookie, useSourceIp: true or httpQueryParameterName), got {got}"
                ),
            );
        }
        if let Some(h) = &ch.http_header_name {
            if !super::validate::is_header_token(h) {
                c.error(
                    format!("{p}.httpHeaderName"),
                    format!("{h:?} is not a valid header name"),
                );
            }
        }
        if let Some(cookie) = &ch.http_cookie {
            let cp = format!("{p}.httpCookie");
            if cookie.name.is_empty() {
                c.error(format!("{cp}.name"), "is required");
            }
            if !cookie.attributes.is_empty() {
                c.not_acted_on(format!("{cp}.attributes"));
                let mut names = BTreeSet::new();
                for (i, a) in cookie.attributes.iter().enumerate() {
                    if a.name.is_empty() {
                        c.error(format!("{cp}.attributes[{i}].name"), "must not be empty");
                    } else if !names.insert(&a.name) {
                        c.error(
                            format!("{cp}.attributes[{i}].name"),
                            format!("duplicate cookie attribute {:?}", a.name),
                        );
                    }
                }
            }
        }
        if ch.minimum_ring_size.is_some_and(|n| n != 0) {
            if ch.ring_hash.is_some() || ch.maglev.is_some() {
                c.error(
                    format!("{p}.minimumRingSize"),
                    "cannot be combined with ringHash or maglev",
                );
            } else {
                c.warn(
                    format!("{p}.minimumRingSize"),
                    "deprecated: use ringHash.minimumRingSize",
                );
            }
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            c.error(&p, "must set only one of ringHash or maglev");
        }
        if let Some(m) = &ch.maglev {
            let mp = format!("{p}.maglev.tableSize");
            match m.table_size {
                None | Some(0) => c.error(mp, "is required"),
                Some(n) if n >= 5_000_011 => {
                    c.error(mp, format!("must be less than 5000011, got {n}"))
                }
                Some(n) if !is_prime(n) => c.error(mp, format!("must be a prime number, got {n}")),
                Some(_) => {}
            }
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        validate_locality(c, &format!("{path}.localityLbSetting"), l, has_outlier);
    }
    if lb.locality_lb_setting.is_some() && lb.zone_aware_lb_setting.is_some() {
        c.error(
            path,
            "must set only one of localityLbSetting or zoneAwareLbSetting",
        );
    }
    c.duration(
        &format!("{path}.warmupDurationSecs"),
        lb.warmup_duration_secs.as_ref(),
    );
    if let Some(w) = &lb.warmup {
        let p = format!("{path}.warmup");
        c.not_acted_on(&p);
        match &w.duration {
            None => c.error(format!("{p}.duration"), "is required"),
            Some(d) => c.duration(&format!("{p}.duration"), Some(d)),
        }
        if let Some(m) = w.minimum_percent {
            if !(0.0..=100.0).contains(&m) {
                c.error(
                    format!("{p}.minimumPercent"),
                    format!("must be between 0 and 100, got {m}"),
                );
            }
        }
        if let Some(a) = w.aggression {
            if a.is_nan() || a <= 0.0 {
                c.error(
                    format!("{p}.aggression"),
                    format!("must be greater than 0, got {a}"),
                );
            }
        }
    }
    if lb.backend_utilization.is_some() {
        c.not_acted_on(format!("{path}.backendUtilization"));
    }
    if lb.zone_aware_lb_setting.is_some() {
        c.not_acted_on(format!("{path}.zoneAwareLbSetting"));
    }
}

/// Envoy's primality check for the maglev table size.
fn is_prime(x: u64) -> bool {
    if x < 2 {
        return false;
    }
    if x < 4 {
        return true;
    }
    if x.is_multiple_of(2) {
        return false;
    }
    let mut f = 3;
    while f * f <= x {
        if x.is_multiple_of(f) {
            return false;
        }
        f += 2;
    }
    true
}

/// Istio `ValidateLocalityLbSetting`.
fn validate_locality(
    c: &mut Ctx<'_>,
    path: &str,
    l: &LocalityLoadBalancerSetting,
    has_outlier: bool,
) {
    if !l.distribute.is_empty() && !l.failover.is_empty() {
        c.error(path, "distribute and failover cannot both be set");
        return;
    }
    if !l.failover.is_empty() {
        for (i, label) in l.failover_priority.iter().enumerate() {
            if matches!(
                label.as_str(),
                "topology.kubernetes.io/region"
                    | "topology.kubernetes.io/zone"
                    | "topology.istio.io/subzone"
            ) {
                c.error(
                    format!("{path}.failoverPriority[{i}]"),
                    format!("cannot use topology label {label:?} together with failover"),
                );
            }
        }
    }
    for (i, d) in l.distribute.iter().enumerate() {
        let p = format!("{path}.distribute[{i}]");
        check_locality(c, &format!("{p}.from"), &d.from);
        let mut total: u64 = 0;
        for (loc, w) in &d.to {
            if !(1..=100).contains(w) {
                c.error(
                    format!("{p}.to.{loc}"),
                    format!("weight must be 1 to 100, got {w}"),
                );
            }
            total += u64::from(*w);
            check_locality(c, &format!("{p}.to.{loc}"), loc);
        }
        if total != 100 {
            c.error(
                format!("{p}.to"),
                format!("weights must sum to 100, got {total}"),
            );
        }
    }
    if (!l.failover.is_empty() || !l.failover_priority.is_empty()) && !has_outlier {
        c.warn(path, "failover needs outlierDetection to take effect");
    }
    for (i, f) in l.failover.iter().enumerate() {
        let p = format!("{path}.failover[{i}]");
        if f.from == f.to {
            c.error(&p, "from and to must be different regions");
        }
        if f.from.contains('/') || f.to.contains('/') {
            c.error(&p, "failover names regions only (no zone)");
        }
        if f.from.contains('*') || f.to.contains('*') {
            c.error(&p, "failover regions cannot contain '*'");
        }
    }
}

/// `region/zone/subzone`, where `*` may only be a whole, last segment.
fn check_locality(c: &mut Ctx<'_>, path: &str, loc: &str) {
    let parts: Vec<&str> = loc.split('/').collect();
    let bad = loc.is_empty()
        || parts.len() > 3
        || parts
            .iter()
            .enumerate()
            .any(|(i, p)| p.is_empty() || (p.contains('*') && (*p != "*" || i != parts.len() - 1)));
    if bad {
        c.error(
            path,
            format!(
                "invalid locality {loc:?}: use region/zone/subzone, with * only as the last part"
            ),
        );
    }
}

/// Istio `agent.ValidateTLS`.
fn validate_tls(c: &mut Ctx<'_>, path: &str, t: &ClientTLSSettings) {
    // Mesh traffic is always mTLS between agents; origination settings for
    // other upstreams are not used.
    c.not_acted_on(path);
    let mode = t.mode;
    if t.ca_crl.is_some() {
        c.not_acted_on(format!("{path}.caCrl"));
    }
    if t.insecure_skip_verify == Some(true) {
        if mode == Some(TLSmode::Simple)
            && (t.ca_certificates.is_some()
                || t.credential_name.is_some()
                || !t.subject_alt_names.is_empty())
        {
            c.error(
                path,
                "cannot set caCertificates, credentialName or subjectAltNames with insecureSkipVerify: true",
            );
        }
        if mode == Some(TLSmode::Mutual)
            && (t.ca_certificates.is_some() || !t.subject_alt_names.is_empty())
        {
            c.error(
                path,
                "cannot set caCertificates or subjectAltNames with insecureSkipVerify: true",
            );
        }
    }
    let simple_or_mutual = matches!(mode, Some(TLSmode::Simple | TLSmode::Mutual));
    if simple_or_mutual && t.credential_name.is_some() {
        if t.client_certificate.is_some()
            || t.ca_certificates.is_some()
            || t.private_key.is_some()
            || t.ca_crl.is_some()
        {
            c.error(
                path,
                "cannot set clientCertificate, privateKey, caCertificates or caCrl with credentialName",
            );
        }
        return;
    }
    if mode == Some(TLSmode::Mutual) {
        if t.client_certificate.is_none() {
            c.error(
                format!("{path}.clientCertificate"),
                "is required for MUTUAL",
            );
        }
        if t.private_key.is_none() {
            c.error(format!("{path}.privateKey"), "is required for MUTUAL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max: i32) -> ConnectionPoolSettings {
        ConnectionPoolSettings {
            tcp: Some(TCPSettings {
                max_connections: Some(max),
                ..TCPSettings::default()
            }),
            http: None,
        }
    }

    fn lb(simple: SimpleLB) -> LoadBalancerSettings {
        LoadBalancerSettings {
            simple: Some(simple),
            ..LoadBalancerSettings::default()
        }
    }

    fn port(n: u32, tp: TrafficPolicy) -> PortTrafficPolicy {
        PortTrafficPolicy {
            port: Some(PortSelector { number: n }),
            load_balancer: tp.load_balancer,
            connection_pool: tp.connection_pool,
            outlier_detection: tp.outlier_detection,
            tls: tp.tls,
        }
    }

    fn rule() -> DestinationRule {
        DestinationRule {
            host: "reviews".into(),
            traffic_policy: Some(TrafficPolicy {
                load_balancer: Some(lb(SimpleLB::RoundRobin)),
                connection_pool: Some(pool(100)),
                tls: Some(ClientTLSSettings {
                    mode: Some(TLSmode::IstioMutual),
                    ..ClientTLSSettings::default()
                }),
                port_level_settings: vec![port(
                    9080,
                    TrafficPolicy {
                        load_balancer: Some(lb(SimpleLB::Random)),
                        ..TrafficPolicy::default()
                    },
                )],
                ..TrafficPolicy::default()
            }),
            subsets: vec![
                Subset {
                    name: "v1".into(),
                    labels: [("version".to_string(), "v1".to_string())].into(),
                    traffic_policy: None,
                },
                Subset {
                    name: "v2".into(),
                    labels: [("version".to_string(), "v2".to_string())].into(),
                    traffic_policy: Some(TrafficPolicy {
                        connection_pool: Some(pool(5)),
                        port_level_settings: vec![port(
                            9443,
                            TrafficPolicy {
                                load_balancer: Some(lb(SimpleLB::LeastRequest)),
                                ..TrafficPolicy::default()
                            },
                        )],
                        ..TrafficPolicy::default()
                    }),
                },
            ],
            ..DestinationRule::default()
        }
    }

    #[test]
    fn top_level_only() {
        let p = rule().policy_for(None, None);
        assert_eq!(p.load_balancer, Some(lb(SimpleLB::RoundRobin)));
        assert_eq!(p.connection_pool, Some(pool(100)));
        assert!(p.port_level_settings.is_empty());
        // A subset without a policy inherits the top level.
        assert_eq!(rule().policy_for(Some("v1"), None), p);
        // So does an unknown subset.
        assert_eq!(rule().policy_for(Some("nope"), None), p);
    }

    #[test]
    fn port_level_replaces_whole_settings() {
        let p = rule().policy_for(None, Some(9080));
        assert_eq!(p.load_balancer, Some(lb(SimpleLB::Random)));
        // Not inherited from the top level: port-level settings replace.
        assert_eq!(p.connection_pool, None);
        assert_eq!(p.tls, None);
        // Another port uses the top level.
        let other = rule().policy_for(None, Some(8080));
        assert_eq!(other.load_balancer, Some(lb(SimpleLB::RoundRobin)));
    }

    #[test]
    fn subset_overrides_top_level_fields_it_sets() {
        let p = rule().policy_for(Some("v2"), None);
        assert_eq!(p.connection_pool, Some(pool(5)), "subset wins");
        assert_eq!(p.load_balancer, Some(lb(SimpleLB::RoundRobin)), "inherited");
        assert_eq!(p.tls.unwrap().mode, Some(TLSmode::IstioMutual), "inherited");
    }

    #[test]
    fn subset_with_top_level_port_settings() {
        // Top level has port 9080 settings; the subset sets a pool but no 9080 entry.
        let p = rule().policy_for(Some("v2"), Some(9080));
        assert_eq!(
            p.load_balancer,
            Some(lb(SimpleLB::Random)),
            "top-level port entry"
        );
        assert_eq!(p.connection_pool, Some(pool(5)), "subset field");
        assert_eq!(p.tls, None, "dropped by the top-level port entry");
    }

    #[test]
    fn subset_port_level_replaces_everything() {
        let p = rule().policy_for(Some("v2"), Some(9443));
        assert_eq!(p.load_balancer, Some(lb(SimpleLB::LeastRequest)));
        assert_eq!(
            p.connection_pool, None,
            "subset port entry replaces the pool too"
        );
        assert_eq!(p.tls, None);
    }

    #[test]
    fn no_policy_at_all() {
        let r = DestinationRule {
            host: "x".into(),
            ..DestinationRule::default()
        };
        assert_eq!(r.policy_for(Some("v1"), Some(80)), TrafficPolicy::default());
        let mut r = rule();
        r.traffic_policy = None;
        assert_eq!(
            r.policy_for(Some("v2"), None).connection_pool,
            Some(pool(5))
        );
    }

    #[test]
    fn subsets_select_by_labels() {
        let r = rule();
        let v1 = r.subset("v1").unwrap();
        let labels: BTreeMap<String, String> = [("version", "v1"), ("app", "reviews")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        assert!(v1.selects(&labels));
        assert!(!r.subset("v2").unwrap().selects(&labels));
        assert!(!v1.selects(&BTreeMap::new()));
        let all = Subset {
            name: "all".into(),
            ..Subset::default()
        };
        assert!(all.selects(&BTreeMap::new()));
        assert!(r.subset("v3").is_none());
    }

    #[test]
    fn outlier_defaults() {
        let e = OutlierDetection::default().effective();
        assert_eq!(
            e,
            EffectiveOutlierDetection {
                consecutive_5xx: Some(5),
                consecutive_gateway_errors: None,
                consecutive_local_origin_failures: None,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 10,
                min_health_percent: 0,
            }
        );
        let od = OutlierDetection {
            consecutive_5xx_errors: Some(0),
            consecutive_gateway_errors: Some(3),
            interval: Some(PolicyDuration(Duration::from_secs(1))),
            base_ejection_time: Some(PolicyDuration(Duration::from_secs(180))),
            max_ejection_percent: Some(100),
            min_health_percent: Some(50),
            split_external_local_origin_errors: true,
            ..OutlierDetection::default()
        };
        let e = od.effective();
        assert_eq!(e.consecutive_5xx, None, "0 disables");
        assert_eq!(e.consecutive_gateway_errors, Some(3));
        assert_eq!(e.consecutive_local_origin_failures, Some(5));
        assert_eq!(e.interval, Duration::from_secs(1));
        assert_eq!(e.base_ejection_time, Duration::from_secs(180));
        assert_eq!(e.max_ejection_percent, 100);
        assert_eq!(e.min_health_percent, 50);

        // Legacy consecutiveErrors: the gateway-error threshold, 5xx off...
        let legacy = OutlierDetection {
            consecutive_errors: Some(2),
            ..OutlierDetection::default()
        };
        assert_eq!(legacy.effective().consecutive_gateway_errors, Some(2));
        assert_eq!(legacy.effective().consecutive_5xx, None);
        // ...unless a current field is set: then it is ignored.
        let both = OutlierDetection {
            consecutive_errors: Some(2),
            consecutive_5xx_errors: Some(7),
            ..OutlierDetection::default()
        };
        assert_eq!(both.effective().consecutive_5xx, Some(7));
        assert_eq!(both.effective().consecutive_gateway_errors, None);
        // maxEjectionPercent 0 is indistinguishable from unset in Istio: default.
        let zero = OutlierDetection {
            max_ejection_percent: Some(0),
            ..OutlierDetection::default()
        };
        assert_eq!(zero.effective().max_ejection_percent, 10);
    }

    #[test]
    fn hash_keys() {
        let ch = ConsistentHashLB {
            http_header_name: Some("x-user".into()),
            ..ConsistentHashLB::default()
        };
        assert_eq!(ch.key(), Some(HashKey::Header("x-user")));
        let none = ConsistentHashLB {
            use_source_ip: Some(false),
            ..ConsistentHashLB::default()
        };
        assert_eq!(none.key(), None);
        let two = ConsistentHashLB {
            use_source_ip: Some(true),
            http_query_parameter_name: Some("u".into()),
            ..ConsistentHashLB::default()
        };
        assert_eq!(two.key(), None);
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(2) && is_prime(3));
        assert!(!is_prime(1) && !is_prime(65536) && !is_prime(9));
    }
}
