//! Prometheus metrics of the agent, under the `fedmesh_agent_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label value: shared, so that a request's labels are reference counts
/// taken on names computed once (per table version, per connection), never
/// strings built per request.
pub type Label = std::sync::Arc<str>;

/// One request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// Destination service (`ns/name`).
    pub service: Label,
    /// HTTP status code sent to the caller.
    pub code: u16,
    /// Why the agent answered itself (`x-fedmesh-reason`), or empty.
    pub reason: Option<crate::reason::Reason>,
    /// The calling cluster: this agent's for outbound; for inbound, the
    /// cluster the caller's certificate names, else the one its agent
    /// said, else `external` (a caller outside the mesh).
    pub source_cluster: Label,
    /// The cluster that answered: the chosen endpoint's for outbound
    /// (`none` when the agent answered itself); this agent's for inbound.
    pub destination_cluster: Label,
}

impl RequestLabels {
    /// A request's labels: its latency's, with its outcome.
    pub fn of(l: LatencyLabels, code: u16, reason: Option<crate::reason::Reason>) -> Self {
        Self {
            direction: l.direction,
            service: l.service,
            code,
            reason,
            source_cluster: l.source_cluster,
            destination_cluster: l.destination_cluster,
        }
    }
}

/// Request header carrying the calling agent's cluster to the destination
/// agent (read from mTLS callers only).
pub const SOURCE_CLUSTER_HEADER: &str = "x-fedmesh-source-cluster";

/// A request's latency labels: the request's without its outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// Destination service (`ns/name`).
    pub service: Label,
    /// The calling cluster, as in [`RequestLabels`].
    pub source_cluster: Label,
    /// The cluster that answered, as in [`RequestLabels`].
    pub destination_cluster: Label,
}

/// Labels naming a direction and a service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// Destination service (`ns/name`).
    pub service: Label,
}

/// Labels of a retry a budget refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// Destination service (`ns/name`).
    pub service: Label,
    /// `retry_budget` (DestinationRule `retryBudget`) or `cross_cluster`.
    pub budget: &'static str,
}

/// Labels of an injected fault.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    /// Destination service.
    pub service: Label,
    /// `delay` or `abort`.
    pub kind: &'static str,
}

/// Labels of a rate-limited request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `outbound` (per destination service) or `inbound` (per caller identity).
    pub direction: &'static str,
    /// The bucket's key: the service, or the caller's identity.
    pub key: Label,
}

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the agent exports.
pub struct Metrics {
    /// Requests answered, by outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response headers, in seconds.
    pub latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    /// Retries made (attempts after the first).
    pub retries: Family<ServiceLabels, Counter>,
    /// Addresses found silent (a probe got no handshake while requests
    /// waited on them).
    pub addresses_silent: Counter,
    /// Retries not made because a budget refused them.
    pub retries_denied: Family<BudgetLabels, Counter>,
    /// Upstream connect failures.
    pub connect_errors: Family<ServiceLabels, Counter>,
    /// Endpoints ejected by outlier detection.
    pub ejections: Family<ServiceLabels, Counter>,
    /// Requests refused by a rate limit.
    pub rate_limited: Family<LimitLabels, Counter>,
    /// Faults injected.
    pub faults: Family<FaultLabels, Counter>,
    /// Mirrored requests sent.
    pub mirrored: Family<ServiceLabels, Counter>,
    /// Version of the config in use.
    pub config_version: Gauge,
    /// Requests in flight.
    pub active: Family<ServiceLabels, Gauge>,
    /// Connections accepted by the inbound listener (mTLS handshakes done).
    pub inbound_connections: Counter,
    /// Inbound connections refused or closed by policy: TCP connections
    /// AuthorizationPolicy denies, plaintext ones a change to STRICT ends.
    pub inbound_connections_denied: Counter,
    /// End of validity of the certificate in use (Unix seconds); 0 with
    /// certificate files, whose lifetime the agent does not track.
    pub certificate_not_after: Gauge,
    /// Certificates renewed.
    pub certificate_renewals: Counter,
    /// Requests served and sent, for the load reports to the federation.
    pub load: Load,
}

/// Requests counted for load reports: served (inbound) and sent, by
/// destination service (outbound).
#[derive(Default)]
pub struct Load {
    /// Requests the workload served.
    pub inbound: std::sync::atomic::AtomicU64,
    outbound: std::sync::RwLock<
        std::collections::HashMap<String, std::sync::Arc<std::sync::atomic::AtomicU64>>,
    >,
}

impl std::fmt::Debug for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Load").finish_non_exhaustive()
    }
}

impl Load {
    /// One request sent to `service` (`ns/name`).
    pub fn sent(&self, service: &str) {
        use std::sync::atomic::Ordering;
        if let Some(c) = self
            .outbound
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
        {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.outbound
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(service.to_string())
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Requests sent so far, by service.
    pub fn sent_totals(&self) -> Vec<(String, u64)> {
        use std::sync::atomic::Ordering;
        self.outbound
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `reg`.
    pub fn new(reg: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency as fn() -> Histogram),
            retries: Family::default(),
            retries_denied: Family::default(),
            addresses_silent: Counter::default(),
            connect_errors: Family::default(),
            ejections: Family::default(),
            rate_limited: Family::default(),
            faults: Family::default(),
            mirrored: Family::default(),
            config_version: Gauge::default(),
            active: Family::default(),
            inbound_connections: Counter::default(),
            inbound_connections_denied: Counter::default(),
            certificate_not_after: Gauge::default(),
            certificate_renewals: Counter::default(),
            load: Load::default(),
        };
        let r = reg.sub_registry_with_prefix("fedmesh_agent");
        r.register("requests", "Requests answered", m.requests.clone());
        r.register(
            "request_duration_seconds",
            "Time to response headers",
            m.latency.clone(),
        );
        r.register("retries", "Retries made", m.retries.clone());
        r.register(
            "upstream_addresses_silent",
            "Upstream addresses found silent: requests waited on them and a probe got no handshake; out for every service behind them",
            m.addresses_silent.clone(),
        );
        r.register(
            "retries_denied",
            "Retries not made: a retry budget (retryBudget, or the cross-cluster one) refused them",
            m.retries_denied.clone(),
        );
        r.register(
            "upstream_connect_errors",
            "Upstream connect failures",
            m.connect_errors.clone(),
        );
        r.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by a rate limit",
            m.rate_limited.clone(),
        );
        r.register("faults_injected", "Faults injected", m.faults.clone());
        r.register("mirrored", "Mirrored requests sent", m.mirrored.clone());
        r.register(
            "config_version",
            "Version of the config in use",
            m.config_version.clone(),
        );
        r.register("active_requests", "Requests in flight", m.active.clone());
        r.register(
            "certificate_not_after_seconds",
            "End of validity of the certificate in use (Unix seconds)",
            m.certificate_not_after.clone(),
        );
        r.register(
            "certificate_renewals",
            "Certificates renewed",
            m.certificate_renewals.clone(),
        );
        r.register(
            "inbound_connections",
            "Connections accepted by the inbound listener",
            m.inbound_connections.clone(),
        );
        r.register(
            "inbound_connections_denied",
            "Inbound connections refused or closed by policy (TCP AuthorizationPolicy, STRICT)",
            m.inbound_connections_denied.clone(),
        );
        m
    }
}
