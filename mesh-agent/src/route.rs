//! The agent's compiled routing model: what a VirtualService and a
//! DestinationRule mean for one request, in types the proxy uses directly.
//! [`crate::table`] builds them from the policy documents.

use crate::lb::{Algorithm, Outlier};
use crate::pool;
use mesh_core::policy::{HTTPRoute, RequestAttrs, RetryOn};
use mesh_core::service::ServiceKey;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// One weighted destination of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct Dest {
    /// The service.
    pub service: ServiceKey,
    /// Its subset, by DestinationRule subset name.
    pub subset: Option<String>,
    /// Port; `None`: the port the caller addressed, or the service's only one.
    pub port: Option<u16>,
    /// Relative weight.
    pub weight: u32,
    /// Header edits of this destination (after the route's).
    pub request_headers: HeaderOps,
    /// Response header edits of this destination (after the route's).
    pub response_headers: HeaderOps,
}

/// Istio's `rewrite`: the matched URI prefix (or the whole path) and the authority.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rewrite {
    /// Replaces the prefix the request matched on, or the whole path.
    pub uri: Option<String>,
    /// Replaces the Host / `:authority`.
    pub authority: Option<String>,
}

impl Rewrite {
    /// The rewritten path and query of `path_and_query`, given the `uri`
    /// prefix the request matched (if it matched on a prefix).
    pub fn path(&self, path_and_query: &str, matched_prefix: Option<&str>) -> Option<String> {
        let new = self.uri.as_deref()?;
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let rest = matched_prefix
            .and_then(|p| path.strip_prefix(p))
            .unwrap_or("");
        let mut out = format!("{new}{rest}");
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

/// Retries of a route.
#[derive(Debug, Clone)]
pub struct Retries {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Timeout of each attempt.
    pub per_try: Option<Duration>,
    /// What is retried.
    pub on: RetryOn,
    /// A retry may go to another locality.
    pub remote_localities: bool,
    /// Base back-off between attempts (`retries.backoff`; Envoy's 25 ms).
    pub backoff: Duration,
}

/// How long to wait before retry `n` (1 for the first): Envoy's fully
/// jittered exponential back-off, uniform in `[0, base * (2^n - 1))`,
/// capped at ten times the base (Envoy's default maximum).
pub fn backoff(base: Duration, n: u32) -> Duration {
    let factor = (1u64 << n.min(20)) - 1;
    let ceiling = base
        .saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX))
        .min(base.saturating_mul(10));
    let ms = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(fastrand::u64(..ms))
}

/// A fault to inject.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// Delay and the fraction of requests delayed.
    pub delay: Option<(Duration, f64)>,
    /// Abort status (HTTP, or gRPC when `grpc`) and the fraction aborted.
    pub abort: Option<(Abort, f64)>,
}

/// How an aborted request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// This HTTP status.
    Http(u16),
    /// HTTP 200 with this `grpc-status` (Trailers-Only).
    Grpc(u32),
}

/// Header edits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderOps {
    /// Replace these.
    pub set: BTreeMap<String, String>,
    /// Append these.
    pub add: BTreeMap<String, String>,
    /// Remove these.
    pub remove: Vec<String>,
}

impl HeaderOps {
    /// Applies the edits.
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for n in &self.remove {
            h.remove(n.as_str());
        }
        for (k, v) in &self.set {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                h.insert(k, v);
            }
        }
        for (k, v) in &self.add {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                h.append(k, v);
            }
        }
    }

    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// One HTTP route of a VirtualService, ready to use.
#[derive(Debug, Clone)]
pub struct Route {
    /// The route as written (its `match` decides whether it applies).
    pub spec: Option<Arc<HTTPRoute>>,
    /// Where requests go.
    pub dests: Vec<Dest>,
    /// Whole-request timeout (all attempts).
    pub timeout: Option<Duration>,
    /// Retries.
    pub retries: Retries,
    /// Fault injection.
    pub fault: Option<Fault>,
    /// Mirror destination and the fraction mirrored.
    pub mirror: Option<(Dest, f64)>,
    /// Request header edits.
    pub request_headers: HeaderOps,
    /// Response header edits.
    pub response_headers: HeaderOps,
    /// URI and authority rewrite.
    pub rewrite: Option<Rewrite>,
    /// The VirtualService it came from (`ns/name`), for logs.
    pub origin: Option<Arc<str>>,
}

impl Route {
    /// Does the route apply to the request?
    pub fn matches(&self, attrs: &dyn RequestAttrs) -> bool {
        self.spec.as_ref().is_none_or(|r| r.matches(attrs))
    }

    /// Chooses a destination by weight.
    pub fn pick_dest(&self) -> Option<&Dest> {
        let total: u64 = self.dests.iter().map(|d| u64::from(d.weight)).sum();
        if total == 0 {
            return self.dests.first();
        }
        let mut x = fastrand::u64(..total);
        for d in &self.dests {
            if x < u64::from(d.weight) {
                return Some(d);
            }
            x -= u64::from(d.weight);
        }
        self.dests.last()
    }
}

/// Istio's default retry policy when a route sets none: 2 retries on
/// connect failures, refused streams, gRPC unavailable/cancelled and 503.
pub fn default_retries() -> Retries {
    Retries {
        attempts: 2,
        per_try: None,
        on: "connect-failure,refused-stream,unavailable,cancelled,503"
            .parse()
            .unwrap_or_default(),
        remote_localities: false,
        backoff: mesh_core::retry::DEFAULT_BACKOFF,
    }
}

/// The traffic policy in effect for one destination (service, subset, port).
#[derive(Debug, Clone)]
pub struct DestPolicy {
    /// Load balancing.
    pub lb: Lb,
    /// Outlier detection, when configured.
    pub outlier: Option<Outlier>,
    /// Connection pool limits.
    pub pool: pool::Limits,
    /// Most requests in flight to the destination (`http2MaxRequests`).
    pub max_requests: Option<usize>,
    /// The consistent-hash table, when `lb` hashes.
    pub hash: crate::hashring::Kind,
    /// DestinationRule `retryBudget`, when set.
    pub retry_budget: Option<crate::retry_budget::Budget>,
}

/// How an endpoint is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lb {
    /// A plain algorithm.
    Simple(Algorithm),
    /// Hash this header's value.
    Header(String),
    /// Hash this cookie's value.
    Cookie(String),
    /// Hash the caller's address.
    SourceIp,
    /// Hash this query parameter.
    Query(String),
}

impl Default for DestPolicy {
    fn default() -> Self {
        Self {
            lb: Lb::Simple(Algorithm::LeastRequest),
            outlier: None,
            hash: crate::hashring::Kind::default(),
            retry_budget: None,
            pool: pool::Limits::default(),
            max_requests: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_envoys_jittered_exponential() {
        let base = Duration::from_millis(25);
        // Envoy's docs: retry 1 in [0, 25) ms, 2 in [0, 75), 3 in [0, 175),
        // then capped at ten times the base.
        for (n, ceiling) in [(1, 25), (2, 75), (3, 175), (4, 250), (30, 250)] {
            let draws: Vec<Duration> = (0..2000).map(|_| backoff(base, n)).collect();
            let max = draws.iter().max().unwrap();
            assert!(*max < Duration::from_millis(ceiling), "retry {n}: {max:?}");
            // Spread over the range, not stuck at one end.
            let mean = draws.iter().sum::<Duration>() / 2000;
            let half = Duration::from_millis(ceiling) / 2;
            assert!(
                mean > half.mul_f64(0.8) && mean < half.mul_f64(1.2),
                "retry {n}: mean {mean:?}"
            );
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn rewrite_replaces_the_matched_prefix_or_the_whole_path() {
        let r = Rewrite {
            uri: Some("/v2".into()),
            authority: None,
        };
        assert_eq!(
            r.path("/v1/books/7?x=1", Some("/v1")).unwrap(),
            "/v2/books/7?x=1"
        );
        assert_eq!(r.path("/anything", None).unwrap(), "/v2");
        assert_eq!(r.path("/old?q", None).unwrap(), "/v2?q");
        let root = Rewrite {
            uri: Some(String::new()),
            authority: None,
        };
        assert_eq!(root.path("/api", Some("/api")).unwrap(), "/");
        assert!(Rewrite::default().path("/x", None).is_none());
    }
}
