//! `Sidecar`: which services a workload's proxy can reach, and how it listens
//! (Istio `networking/v1/sidecar.proto`).

use super::common::Destination;
use super::destination_rule::{validate_connection_pool, ConnectionPoolSettings};
use super::validate::{check_wildcard_domain, host_matches, is_dns1123_label, Ctx};
use super::virtual_service::validate_destination;
use crate::name::check_label;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Proxy configuration for the workloads of a namespace (or those selected).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sidecar {
    /// Workloads this applies to; absent means the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// Inbound listeners: not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IstioIngressListener>,
    /// Outbound listeners and the hosts they expose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<IstioEgressListener>,
    /// What to do with traffic to hosts outside the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Limits on inbound connections to the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_connection_pool: Option<ConnectionPoolSettings>,
}

/// A `labels` selector (Istio `networking.WorkloadSelector`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// An inbound listener (parsed, not acted on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioIngressListener {
    /// Port to listen on.
    pub port: SidecarPort,
    /// Address to bind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// How traffic reaches the listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_mode: Option<CaptureMode>,
    /// Where to forward, e.g. `127.0.0.1:8080`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_endpoint: Option<String>,
    /// Server TLS settings (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<serde_json::Value>,
    /// Per-port inbound connection limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
}

/// An outbound listener and the hosts it exposes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioEgressListener {
    /// Port of the listener; absent: a catch-all, which must be the last listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<SidecarPort>,
    /// Address to bind (an IP, or `unix://path` with port 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// How traffic reaches the listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_mode: Option<CaptureMode>,
    /// Exposed hosts, `namespace/dnsName` (see [`Sidecar::allows`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// A listener port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarPort {
    /// Port number (0 with a unix socket bind).
    #[serde(default)]
    pub number: u32,
    /// Protocol, e.g. `HTTP`, `TCP`, `GRPC` (case-insensitive); empty: detect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Port name (RFC 1123 label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Refused, as by Istio: it has no effect on Sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// How traffic is captured to a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CaptureMode {
    /// The environment's default.
    Default,
    /// iptables redirection.
    Iptables,
    /// No capture: the application addresses the listener.
    None,
}

/// Outbound traffic policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    /// `REGISTRY_ONLY` or `ALLOW_ANY` (the mesh default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<OutboundMode>,
    /// Proxy for unknown destinations with `ALLOW_ANY`: not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<Destination>,
}

/// Whether unknown destinations are reachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Only hosts in the registry (and allowed by egress).
    RegistryOnly,
    /// Unknown hosts pass through.
    AllowAny,
}

/// Protocols Istio knows for ports (`protocol.Parse`, case-insensitive).
const PROTOCOLS: [&str; 12] = [
    "TCP",
    "UDP",
    "GRPC",
    "GRPC-WEB",
    "HTTP",
    "HTTP_PROXY",
    "HTTP2",
    "HTTPS",
    "TLS",
    "MONGO",
    "REDIS",
    "MYSQL",
];

// === helpers ===

/// One parsed egress host entry.
struct HostEntry<'a> {
    exclude: bool,
    /// `*`, or a namespace name (`.` already resolved).
    namespace: &'a str,
    dns_name: &'a str,
}

fn parse_host<'a>(entry: &'a str, own_namespace: &'a str) -> Option<HostEntry<'a>> {
    let (ns, dns_name) = entry.split_once('/')?;
    let (exclude, ns) = match ns.strip_prefix('~') {
        // A bare `~` is the wildcard namespace in an exclusion: `~/*` trims everything.
        Some("") => (true, "*"),
        Some(rest) => (true, rest),
        None => (false, ns),
    };
    let namespace = if ns == "." { own_namespace } else { ns };
    Some(HostEntry {
        exclude,
        namespace,
        dns_name,
    })
}

impl IstioEgressListener {
    /// Whether this listener exposes `host` of `namespace` to a sidecar in
    /// `own_namespace`: some entry imports it and no `~` entry excludes it.
    pub fn allows(&self, namespace: &str, host: &str, own_namespace: &str) -> bool {
        let mut imported = false;
        for h in &self.hosts {
            let Some(e) = parse_host(h, own_namespace) else {
                continue;
            };
            if (e.namespace == "*" || e.namespace == namespace) && host_matches(e.dns_name, host) {
                if e.exclude {
                    return false;
                }
                imported = true;
            }
        }
        imported
    }
}

impl Sidecar {
    /// Whether a workload governed by this Sidecar, in `own_namespace`, may
    /// reach service `host` (an FQDN) of `namespace`, following Istio's egress
    /// host rules:
    ///
    /// - each entry is `namespace/dnsName`; the namespace is `*` (any), `.`
    ///   (the Sidecar's own), or a name; the dnsName is `*` (every host), an
    ///   FQDN, or `*.suffix` (hosts ending in `.suffix`); compared ignoring case;
    /// - `~` before the namespace excludes instead (`~ns/*`, or `~/host` for
    ///   all namespaces); `~/*` alone exposes nothing;
    /// - a host is allowed when some listener imports it and does not exclude it.
    ///
    /// Without egress listeners, Istio's default applies: every host.
    pub fn allows(&self, namespace: &str, host: &str, own_namespace: &str) -> bool {
        self.egress.is_empty()
            || self
                .egress
                .iter()
                .any(|l| l.allows(namespace, host, own_namespace))
    }
}

// === validation ===

impl Sidecar {
    /// Istio `ValidateSidecar`.
    pub(crate) fn validate(&self, c: &mut Ctx<'_>) {
        if let Some(ws) = &self.workload_selector {
            let p = "spec.workloadSelector.labels";
            if ws.labels.is_empty() {
                c.warn(
                    "spec.workloadSelector",
                    "workload selector without labels: applies to every workload in the namespace",
                );
            }
            for (k, v) in &ws.labels {
                if k.is_empty() {
                    c.error(p, "empty label keys are not allowed in selectors");
                }
                if k.contains('*') || v.contains('*') {
                    c.error(format!("{p}.{k}"), "wildcards are not allowed in selectors");
                }
            }
        }
        if self.egress.is_empty()
            && self.ingress.is_empty()
            && self.outbound_traffic_policy.is_none()
            && self.inbound_connection_pool.is_none()
        {
            c.error(
                "spec",
                "empty configuration: set egress, ingress, outboundTrafficPolicy or inboundConnectionPool",
            );
            return;
        }
        let mut ports = BTreeSet::new();
        for (i, l) in self.ingress.iter().enumerate() {
            let p = format!("spec.ingress[{i}]");
            c.not_acted_on(&p);
            validate_port(c, &format!("{p}.port"), &l.port);
            c.port(&format!("{p}.port.number"), l.port.number);
            if !ports.insert(l.port.number) {
                c.error(
                    format!("{p}.port.number"),
                    format!("port {} is used by another ingress listener", l.port.number),
                );
            }
            if let Some(b) = &l.bind {
                if b.parse::<std::net::IpAddr>().is_err() {
                    c.error(format!("{p}.bind"), format!("{b:?} is not an IP address"));
                }
            }
            if let Some(cp) = &l.connection_pool {
                validate_connection_pool(c, &format!("{p}.connectionPool"), cp);
            }
        }
        if let Some(cp) = &self.inbound_connection_pool {
            validate_connection_pool(c, "spec.inboundConnectionPool", cp);
        }
        let mut ports = BTreeSet::new();
        let mut sockets = BTreeSet::new();
        let mut catch_all = false;
        for (i, l) in self.egress.iter().enumerate() {
            let p = format!("spec.egress[{i}]");
            match &l.port {
                None => {
                    if catch_all {
                        c.error(&p, "only one egress listener may omit the port");
                    } else if i != self.egress.len() - 1 {
                        c.error(
                            &p,
                            "the egress listener without a port must be the last one",
                        );
                    }
                    catch_all = true;
                }
                Some(port) => {
                    validate_port(c, &format!("{p}.port"), port);
                    let bind = l.bind.as_deref().unwrap_or("");
                    if port.number == 0 {
                        match bind.strip_prefix("unix://") {
                            Some(path) if !path.is_empty() => {
                                if !sockets.insert(bind.to_string()) {
                                    c.error(
                                        format!("{p}.bind"),
                                        format!("unix socket {bind:?} is used by another listener"),
                                    );
                                }
                            }
                            _ => c.error(
                                format!("{p}.bind"),
                                "a listener with port 0 needs a unix:///path bind",
                            ),
                        }
                        if matches!(l.capture_mode, Some(CaptureMode::Iptables)) {
                            c.error(
                                format!("{p}.captureMode"),
                                "must be DEFAULT or NONE for unix socket listeners",
                            );
                        }
                    } else {
                        c.port(&format!("{p}.port.number"), port.number);
                        if !bind.is_empty() && bind.parse::<std::net::IpAddr>().is_err() {
                            c.error(
                                format!("{p}.bind"),
                                format!("{bind:?} is not an IP address"),
                            );
                        }
                        if !ports.insert(port.number) {
                            c.error(
                                format!("{p}.port.number"),
                                format!("port {} is used by another egress listener", port.number),
                            );
                        }
                    }
                }
            }
            if l.hosts.is_empty() {
                c.error(format!("{p}.hosts"), "at least one host is required");
            }
            let mut seen = BTreeSet::new();
            for (j, h) in l.hosts.iter().enumerate() {
                let hp = format!("{p}.hosts[{j}]");
                if let Err(r) = check_egress_host(h) {
                    c.error(&hp, r);
                } else if !seen.insert(h.as_str()) {
                    c.warn(&hp, format!("duplicate egress host {h:?}"));
                }
            }
        }
        if let Some(otp) = &self.outbound_traffic_policy {
            if let Some(ep) = &otp.egress_proxy {
                let p = "spec.outboundTrafficPolicy.egressProxy";
                c.not_acted_on(p);
                if otp.mode != Some(OutboundMode::AllowAny) {
                    c.error(p, "requires mode: ALLOW_ANY");
                }
                validate_destination(c, p, ep);
                if ep.port.is_none() {
                    c.error(format!("{p}.port"), "is required");
                }
            }
        }
    }
}

fn validate_port(c: &mut Ctx<'_>, path: &str, port: &SidecarPort) {
    if let Some(name) = &port.name {
        if check_label(name).is_err() {
            c.error(
                format!("{path}.name"),
                format!("invalid port name {name:?}"),
            );
        }
    }
    if let Some(proto) = &port.protocol {
        if !proto.is_empty() && !PROTOCOLS.iter().any(|p| p.eq_ignore_ascii_case(proto)) {
            c.error(
                format!("{path}.protocol"),
                format!(
                    "unsupported protocol {proto:?}: use one of {}",
                    PROTOCOLS.join(", ")
                ),
            );
        }
    }
    if port.target_port.is_some_and(|t| t > 0) {
        c.error(
            format!("{path}.targetPort"),
            "targetPort has no effect on Sidecars (Istio refuses it too)",
        );
    }
}

/// Istio `ValidateNamespaceSlashWildcardHostname` for sidecars.
fn check_egress_host(h: &str) -> Result<(), String> {
    let Some((ns, name)) = h.split_once('/') else {
        return Err(format!("host {h:?} must be of the form namespace/dnsName"));
    };
    if ns.is_empty() || name.is_empty() {
        return Err(format!(
            "host {h:?}: namespace and dnsName must not be empty"
        ));
    }
    let bare = ns.strip_prefix('~').unwrap_or(ns);
    if !(bare.is_empty() || bare == "*" || bare == "." || is_dns1123_label(bare)) {
        return Err(format!(
            "host {h:?}: invalid namespace {ns:?}: use *, ., a namespace name, or ~ before one to exclude it"
        ));
    }
    if name != "*" && !name.contains('.') {
        return Err(format!(
            "host {h:?}: short name {name:?} is not allowed: use a fully qualified name such as {name}.{}.svc.cluster.local",
            if bare.is_empty() || bare == "*" || bare == "." { "<namespace>" } else { bare }
        ));
    }
    check_wildcard_domain(name).map_err(|r| format!("host {h:?}: invalid dnsName: {r}"))?;
    if name.contains('*') && name != "*" && !name.starts_with("*.") {
        return Err(format!(
            "host {h:?}: partial wildcard {name:?} is not allowed"
        ));
    }
    Ok(())
}

/// The Sidecar that governs a workload, as Istio chooses it: among the
/// Sidecars of the workload's namespace, one whose `workloadSelector`
/// matches the workload's labels, else the one without a selector (the
/// namespace default); ties go to the first in the given order.
pub fn select_sidecar<'a>(
    sidecars: impl IntoIterator<Item = &'a Sidecar>,
    labels: &BTreeMap<String, String>,
) -> Option<&'a Sidecar> {
    let mut default = None;
    for sc in sidecars {
        match &sc.workload_selector {
            Some(sel) if sel.labels.iter().all(|(k, v)| labels.get(k) == Some(v)) => {
                return Some(sc);
            }
            Some(_) => {}
            None => {
                default.get_or_insert(sc);
            }
        }
    }
    default
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(hosts: &[&[&str]]) -> Sidecar {
        Sidecar {
            egress: hosts
                .iter()
                .map(|hs| IstioEgressListener {
                    hosts: hs.iter().map(|h| h.to_string()).collect(),
                    ..IstioEgressListener::default()
                })
                .collect(),
            ..Sidecar::default()
        }
    }

    const SVC: &str = "reviews.prod.svc.cluster.local";

    #[test]
    fn namespaces() {
        let s = sidecar(&[&["./*", "istio-system/*"]]);
        assert!(s.allows("shop", "cart.shop.svc.cluster.local", "shop"));
        assert!(s.allows(
            "istio-system",
            "istiod.istio-system.svc.cluster.local",
            "shop"
        ));
        assert!(!s.allows("prod", SVC, "shop"));

        let any = sidecar(&[&["*/*"]]);
        assert!(any.allows("prod", SVC, "shop"));
        let named = sidecar(&[&["prod/*"]]);
        assert!(named.allows("prod", SVC, "shop"));
        assert!(!named.allows("dev", "reviews.dev.svc.cluster.local", "shop"));
    }

    #[test]
    fn dns_names() {
        let s = sidecar(&[&["*/reviews.prod.svc.cluster.local", "*/*.example.com"]]);
        assert!(s.allows("prod", SVC, "shop"));
        assert!(s.allows("prod", "Reviews.Prod.svc.cluster.local", "shop"));
        assert!(!s.allows("prod", "ratings.prod.svc.cluster.local", "shop"));
        assert!(s.allows("ext", "api.example.com", "shop"));
        assert!(s.allows("ext", "a.b.example.com", "shop"));
        assert!(!s.allows("ext", "example.com", "shop"));
        assert!(!s.allows("ext", "badexample.com", "shop"));
    }

    #[test]
    fn exclusions_and_none() {
        let s = sidecar(&[&["*/*", "~prod/*"]]);
        assert!(!s.allows("prod", SVC, "shop"));
        assert!(s.allows("dev", "reviews.dev.svc.cluster.local", "shop"));
        let s = sidecar(&[&["*/*", "~/*.example.com"]]);
        assert!(!s.allows("ext", "api.example.com", "shop"));
        assert!(s.allows("prod", SVC, "shop"));
        let s = sidecar(&[&["*/*", "~./*"]]);
        assert!(!s.allows("shop", "cart.shop.svc.cluster.local", "shop"));
        let none = sidecar(&[&["~/*"]]);
        assert!(!none.allows("prod", SVC, "shop"));
        assert!(!none.allows("shop", "cart.shop.svc.cluster.local", "shop"));
    }

    #[test]
    fn listeners_union_and_default() {
        let s = sidecar(&[&["prod/*"], &["dev/*"]]);
        assert!(s.allows("prod", SVC, "shop"));
        assert!(s.allows("dev", "reviews.dev.svc.cluster.local", "shop"));
        assert!(!s.allows("qa", "reviews.qa.svc.cluster.local", "shop"));
        assert!(Sidecar::default().allows("qa", "x.qa.svc.cluster.local", "shop"));
    }

    #[test]
    fn host_syntax() {
        for ok in [
            "./*",
            "*/*",
            "~/*",
            "~prod/*",
            "istio-system/*",
            "*/api.example.com",
            "prod/*.example.com",
            "./reviews.prod.svc.cluster.local",
        ] {
            assert!(check_egress_host(ok).is_ok(), "{ok}");
        }
        for (bad, want) in [
            ("reviews", "must be of the form namespace/dnsName"),
            ("prod/", "must not be empty"),
            ("/x.com", "must not be empty"),
            ("Pr_od/*", "invalid namespace"),
            ("prod/reviews", "short name \"reviews\" is not allowed"),
            ("prod/foo*.example.com", "invalid dnsName"),
            ("prod/a.*.com", "invalid dnsName"),
        ] {
            let e = check_egress_host(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
