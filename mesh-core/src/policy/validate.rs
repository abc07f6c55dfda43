//! Semantic validation shared by the three kinds: the issue collector and the
//! checks Istio applies in several places (hosts, labels, ports, durations,
//! percentages, header names, `exportTo`, gateway names).
//!
//! Rules follow istio `pkg/config/validation` (`validation.go`, `virtualservice.go`,
//! `agent/validation.go`); where fedmesh is stricter or laxer, the check says so.

use super::common::{HeaderOperations, Headers, Percent, PolicyDuration, StringMatch};
use crate::name::check_label;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One problem at one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Issue {
    pub(crate) path: String,
    pub(crate) reason: String,
}

/// Collects errors and warnings while validating one document.
pub(crate) struct Ctx<'a> {
    /// Namespace of the document (for `.` in `exportTo` and Sidecar hosts).
    pub(crate) namespace: &'a str,
    pub(crate) errors: Vec<Issue>,
    pub(crate) warnings: Vec<Issue>,
}

/// Reason given for recognised fields fedmesh does not act on.
pub(crate) const NOT_ACTED_ON: &str =
    "recognised Istio field, accepted but not acted on by fedmesh";

impl<'a> Ctx<'a> {
    pub(crate) fn new(namespace: &'a str) -> Self {
        Self {
            namespace,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(Issue {
            path: path.into(),
            reason: reason.into(),
        });
    }

    pub(crate) fn warn(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.warnings.push(Issue {
            path: path.into(),
            reason: reason.into(),
        });
    }

    pub(crate) fn not_acted_on(&mut self, path: impl Into<String>) {
        self.warn(path, NOT_ACTED_ON);
    }

    /// Istio `ValidateDuration`: at least 1ms, whole milliseconds.
    pub(crate) fn duration(&mut self, path: &str, d: Option<&PolicyDuration>) {
        let Some(d) = d else { return };
        if d.get() < Duration::from_millis(1) {
            self.error(path, format!("must be at least 1ms, got {d}"));
        } else if d.get().subsec_nanos() % 1_000_000 != 0 {
            self.error(
                path,
                format!("must be a whole number of milliseconds, got {d}"),
            );
        }
    }

    /// `0 <= value <= 100`.
    pub(crate) fn percent_int(&mut self, path: &str, v: Option<i32>) {
        if let Some(v) = v {
            if !(0..=100).contains(&v) {
                self.error(path, format!("must be between 0 and 100, got {v}"));
            }
        }
    }

    /// `v >= 0` for an Istio `int32` count.
    pub(crate) fn non_negative(&mut self, path: &str, v: Option<i32>) {
        if let Some(v) = v {
            if v < 0 {
                self.error(path, format!("must be >= 0, got {v}"));
            }
        }
    }

    /// A `Percent` in `[0, 100]`. With `fault`, Istio's `validatePercentage`
    /// also refuses values between 0 and 0.0001 (below Envoy's resolution).
    pub(crate) fn percentage(&mut self, path: &str, p: Option<&Percent>, fault: bool) {
        let Some(p) = p else { return };
        let v = p.value;
        if !(0.0..=100.0).contains(&v) {
            self.error(
                format!("{path}.value"),
                format!("must be between 0 and 100, got {v}"),
            );
        } else if fault && v > 0.0 && v < 0.0001 {
            self.error(
                format!("{path}.value"),
                format!("must be 0 or at least 0.0001, got {v}"),
            );
        }
    }

    /// A port number 1 to 65535.
    pub(crate) fn port(&mut self, path: &str, n: u32) {
        if !(1..=65535).contains(&n) {
            self.error(path, format!("must be a port 1 to 65535, got {n}"));
        }
    }

    /// Kubernetes label keys and values (Istio `labels.Instance.Validate`).
    pub(crate) fn labels(&mut self, path: &str, labels: &BTreeMap<String, String>) {
        for (k, v) in labels {
            if let Err(r) = check_label_key(k) {
                self.error(
                    format!("{path}.{k}"),
                    format!("invalid label key {k:?}: {r}"),
                );
            }
            if let Err(r) = check_label_value(v) {
                self.error(
                    format!("{path}.{k}"),
                    format!("invalid label value {v:?}: {r}"),
                );
            }
        }
    }

    /// `exportTo` entries (Istio `validateExportTo`): `.`, `*` or a namespace,
    /// no duplicates, `*` alone; a DestinationRule with a workload selector
    /// may export only to its own namespace.
    pub(crate) fn export_to(&mut self, path: &str, list: &[String], dr_with_selector: bool) {
        let mut seen = BTreeSet::new();
        for (i, e) in list.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let key = if e == "." { self.namespace } else { e.as_str() };
            if !seen.insert(key.to_string()) {
                self.error(p, format!("duplicate exportTo entry {e:?}"));
                continue;
            }
            if e == "~" {
                self.error(
                    p,
                    "exportTo ~ (none) is not allowed for Istio configuration objects",
                );
            } else if e != "." && e != "*" && check_label(e).is_err() {
                self.error(
                    p,
                    format!("invalid exportTo entry {e:?}: use ., * or a namespace name"),
                );
            }
        }
        if seen.contains("*") && list.len() > 1 {
            self.error(
                path,
                "cannot mix public (*) with other exportTo entries: * already exports everywhere",
            );
        }
        if dr_with_selector && !list.is_empty() {
            if !seen.contains(self.namespace) {
                self.error(
                    path,
                    "a DestinationRule with a workloadSelector cannot be exported beyond its own namespace",
                );
            } else if seen.len() > 1 {
                self.error(
                    path,
                    "a DestinationRule with a workloadSelector cannot have several exportTo entries",
                );
            }
        }
    }

    /// Gateway references (Istio `validateGatewayNames`): `mesh`, `name`,
    /// legacy `name.namespace`, or `namespace/name`.
    pub(crate) fn gateway_names(&mut self, path: &str, names: &[String]) {
        for (i, g) in names.iter().enumerate() {
            let p = format!("{path}[{i}]");
            match g.split_once('/') {
                None => {
                    if let Err(r) = check_fqdn(g) {
                        self.error(p, format!("invalid gateway name {g:?}: {r}"));
                    } else if g.contains('.') {
                        self.warn(
                            p,
                            format!("legacy gateway name format {g:?}; prefer <namespace>/<name>"),
                        );
                    }
                }
                Some((ns, name)) => {
                    if ns.is_empty() || name.is_empty() {
                        self.error(p, "gateway namespace and name must not be empty");
                    } else if !is_dns1123_label(ns) {
                        self.error(p, format!("invalid gateway namespace {ns:?}"));
                    } else if !is_dns1123_label(name) {
                        self.error(p, format!("invalid gateway name {name:?}"));
                    }
                }
            }
        }
    }

    /// Istio `validateStringMatch` in its context: a regex must not be empty,
    /// and a prefix must not be empty unless `allow_empty_prefix` (only `uri`).
    pub(crate) fn string_match(&mut self, path: &str, m: &StringMatch, allow_empty_prefix: bool) {
        match m {
            StringMatch::Prefix(p) if p.is_empty() && !allow_empty_prefix => {
                self.error(path, "prefix must not be empty")
            }
            StringMatch::Regex(r) if r.as_str().is_empty() => {
                self.error(path, "regex must not be empty")
            }
            _ => {}
        }
    }

    /// Header manipulation rules (Istio `validateHTTPRoute` header loops).
    pub(crate) fn header_ops(&mut self, path: &str, h: Option<&Headers>) {
        let Some(h) = h else { return };
        if let Some(req) = &h.request {
            self.header_op_set(&format!("{path}.request"), req, true);
        }
        if let Some(resp) = &h.response {
            self.header_op_set(&format!("{path}.response"), resp, false);
        }
    }

    fn header_op_set(&mut self, path: &str, ops: &HeaderOperations, request: bool) {
        for (field, map) in [("set", &ops.set), ("add", &ops.add)] {
            for (name, value) in map {
                let p = format!("{path}.{field}.{name}");
                // A request may set the authority (validated separately); nothing
                // else that Envoy manages (`:`-prefixed, `host`) may be written.
                let check = if request {
                    check_header_write_with_authority(name)
                } else {
                    check_header_write(name)
                };
                if let Err(r) = check {
                    self.error(&p, r);
                }
                if let Err(r) = check_header_value(value) {
                    self.error(&p, r);
                }
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            if let Err(r) = check_header_write(name) {
                self.error(format!("{path}.remove[{i}]"), r);
            }
        }
    }
}

// === host names ===

/// Istio `labels.IsDNS1123Label`: 1 to 63 letters (either case), digits and
/// `-`, starting and ending with a letter or digit.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Istio `labels.IsWildcardDNS1123Label`: a label, or `*`, or `*` / `*-`
/// followed by a label.
fn is_wildcard_label(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let rest = s
        .strip_prefix("*-")
        .or_else(|| s.strip_prefix('*'))
        .unwrap_or(s);
    rest.len() <= 63 && s.len() <= 63 && is_dns1123_label(rest)
}

/// Istio `ValidateDNS1123Labels` on the part after an optional first label.
fn check_dns_labels(domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let tld = parts[parts.len() - 1];
    if !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("top-level domain {tld:?} cannot be all-numeric"));
    }
    for (i, label) in parts.iter().enumerate() {
        // A trailing dot (`istio.io.`) is allowed.
        if i == parts.len() - 1 && label.is_empty() {
            return Ok(());
        }
        if !is_dns1123_label(label) {
            return Err(format!("label {label:?} is not a DNS-1123 label"));
        }
    }
    Ok(())
}

fn check_dns_preconditions(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 255 {
        return Err(format!(
            "is too long: {} characters, at most 255",
            name.len()
        ));
    }
    Ok(())
}

/// Istio `ValidateWildcardDomain`: a DNS name whose first label may be a wildcard.
pub(crate) fn check_wildcard_domain(host: &str) -> Result<(), String> {
    check_dns_preconditions(host)?;
    let (first, rest) = match host.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (host, None),
    };
    if !is_wildcard_label(first) {
        return Err(format!("label {first:?} is not a DNS-1123 label"));
    }
    match rest {
        Some(r) => check_dns_labels(r),
        None => Ok(()),
    }
}

/// Istio `ValidateFQDN`.
pub(crate) fn check_fqdn(name: &str) -> Result<(), String> {
    check_dns_preconditions(name)?;
    check_dns_labels(name)
}

/// Whether two host patterns overlap (Istio `host.Name.Matches` for the
/// duplicate-host check): equal, or one is a wildcard covering the other.
pub(crate) fn hosts_overlap(a: &str, b: &str) -> bool {
    host_matches(a, b) || host_matches(b, a)
}

/// Whether `host` (possibly itself a wildcard) is covered by `pattern`:
/// `*` covers everything, `*.example.com` covers any name ending in
/// `.example.com`, otherwise names compare ASCII-case-insensitively.
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        // `*.example.com` covers names ending in `.example.com`, and narrower
        // wildcards such as `*.a.example.com`; `*` covers everything.
        Some(suffix) => {
            let host = host.strip_prefix('*').unwrap_or(host);
            ends_with_ignore_case(host, suffix)
        }
        None => !host.starts_with('*') && pattern.eq_ignore_ascii_case(host),
    }
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

// === labels ===

/// Kubernetes label key: optional DNS-subdomain prefix and `/`, then a
/// qualified name of at most 63 characters.
pub(crate) fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 || p.split('.').any(|l| !is_dns1123_label(l)) {
            return Err("prefix must be a DNS subdomain of at most 253 characters".into());
        }
    }
    if name.is_empty() || name.len() > 63 || !is_qualified_name(name) {
        return Err(
            "name must be 1 to 63 characters: letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
                .into(),
        );
    }
    Ok(())
}

/// Kubernetes label value: empty, or a qualified name of at most 63 characters.
pub(crate) fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    if v.len() > 63 || !is_qualified_name(v) {
        return Err(
            "must be at most 63 characters: letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
                .into(),
        );
    }
    Ok(())
}

fn is_qualified_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

// === headers ===

/// RFC 7230 `tchar`, as Istio's `validHeaderNameRegex`.
pub(crate) fn is_header_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Pseudo-headers a match may name (RFC 7540 section 8.1.2.3).
pub(crate) const PSEUDO_HEADERS: [&str; 5] =
    [":method", ":scheme", ":authority", ":path", ":status"];

fn is_internal_header(name: &str) -> bool {
    name.starts_with(':') || name.eq_ignore_ascii_case("host")
}

pub(crate) fn is_authority_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

fn check_header_write_with_authority(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name must not be empty".into());
    }
    if is_internal_header(name) && !is_authority_header(name) {
        return Err(format!(
            "header {name:?} cannot be modified: ':' prefix is reserved"
        ));
    }
    Ok(())
}

fn check_header_write(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name must not be empty".into());
    }
    if name.eq_ignore_ascii_case("host") {
        return Err(format!("header {name:?} cannot be modified here"));
    }
    if is_internal_header(name) {
        return Err(format!(
            "header {name:?} cannot be modified: ':' prefix is reserved"
        ));
    }
    Ok(())
}

/// Envoy refuses control characters other than tab in header values.
fn check_header_value(v: &str) -> Result<(), String> {
    if v.chars()
        .any(|c| (c.is_control() && c != '\t') || c == '\u{7f}')
    {
        return Err(format!(
            "header value {:?} contains a control character",
            super::common::truncate(v, 40)
        ));
    }
    Ok(())
}

/// An IP address, or a CIDR block (Istio `ValidateIPSubnet`).
pub(crate) fn check_ip_subnet(s: &str) -> Result<(), String> {
    let bad = || format!("{s:?} is not an IP address or CIDR block");
    match s.split_once('/') {
        None => s.parse::<std::net::IpAddr>().map(|_| ()).map_err(|_| bad()),
        Some((ip, len)) => {
            let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            match len.parse::<u8>() {
                Ok(l) if l <= max && len.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
                _ => Err(bad()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_domains() {
        for ok in [
            "reviews",
            "reviews.prod.svc.cluster.local",
            "*.example.com",
            "*",
            "*-foo.example.com",
            "Example.COM",
            "istio.io.",
        ] {
            assert!(check_wildcard_domain(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            "foo.*.com",
            "-a.com",
            "a_b.com",
            "10.0.0.1",
            "foo*.com",
        ] {
            assert!(check_wildcard_domain(bad).is_err(), "{bad}");
        }
        assert!(check_wildcard_domain(&"a".repeat(256)).is_err());
    }

    #[test]
    fn host_wildcards() {
        assert!(host_matches("*", "anything.example.com"));
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(host_matches("*.example.com", "A.Example.COM"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "aexample.com"));
        assert!(host_matches("reviews", "Reviews"));
        assert!(!host_matches("reviews", "reviews.default"));
        assert!(host_matches("*.com", "*.example.com"));
        assert!(hosts_overlap("*.example.com", "a.example.com"));
        assert!(hosts_overlap("a.example.com", "*.example.com"));
        assert!(!hosts_overlap("a.example.com", "b.example.com"));
    }

    #[test]
    fn label_rules() {
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("app.kubernetes.io/name").is_ok());
        assert!(check_label_key("Version_1.x").is_ok());
        assert!(check_label_key("").is_err());
        assert!(check_label_key("/a").is_err());
        assert!(check_label_key("a/").is_err());
        assert!(check_label_key("-a").is_err());
        assert!(check_label_key(&"a".repeat(64)).is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("v1").is_ok());
        assert!(check_label_value("v1 ").is_err());
        assert!(check_label_value("*").is_err());
    }

    #[test]
    fn subnets() {
        for ok in ["10.0.0.1", "10.0.0.0/8", "2001:db8::/32", "::1"] {
            assert!(check_ip_subnet(ok).is_ok(), "{ok}");
        }
        for bad in ["10.0.0.0/33", "10.0.0", "a/8", "10.0.0.0/+8", "::/129"] {
            assert!(check_ip_subnet(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        let mut c = Ctx::new("default");
        c.duration("a", Some(&PolicyDuration(Duration::from_millis(1))));
        c.duration("b", Some(&PolicyDuration(Duration::ZERO)));
        c.duration("c", Some(&PolicyDuration(Duration::from_micros(1500))));
        c.duration("d", Some(&PolicyDuration(Duration::from_micros(500))));
        let got: Vec<String> = c
            .errors
            .iter()
            .map(|i| format!("{}: {}", i.path, i.reason))
            .collect();
        assert_eq!(
            got,
            [
                "b: must be at least 1ms, got 0s",
                "c: must be a whole number of milliseconds, got 1500us",
                "d: must be at least 1ms, got 500us",
            ]
        );
    }
}
