//! `retryOn`: the conditions under which a request is retried, parsed once.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// One named retry condition, from Envoy's `x-envoy-retry-on` and
/// `x-envoy-retry-grpc-on` sets as Istio accepts them
/// (istio `pkg/config/validation/agent` `supportedRetryOnPolicies`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryPolicy {
    /// `5xx`: any 5xx response, or no response at all (reset, connect failure, refused stream).
    FiveXx,
    /// `gateway-error`: 502, 503 or 504, or no response at all.
    GatewayError,
    /// `reset`: the upstream did not respond (disconnect, reset, read timeout).
    Reset,
    /// `reset-before-request`: reset before the request was sent upstream.
    ResetBeforeRequest,
    /// `connect-failure`: the connection to the upstream failed.
    ConnectFailure,
    /// `envoy-ratelimited`: the response carries `x-envoy-ratelimited`.
    EnvoyRateLimited,
    /// `retriable-4xx`: 409 Conflict.
    Retriable4xx,
    /// `refused-stream`: the upstream reset the stream with REFUSED_STREAM.
    RefusedStream,
    /// `retriable-status-codes`: the status codes listed in the same `retryOn`.
    RetriableStatusCodes,
    /// `retriable-headers`: response headers configured elsewhere (Envoy).
    RetriableHeaders,
    /// `http3-post-connect-failure`: HTTP/3 failure after connecting.
    Http3PostConnectFailure,
    /// gRPC `cancelled` (status 1).
    Cancelled,
    /// gRPC `deadline-exceeded` (status 4).
    DeadlineExceeded,
    /// gRPC `internal` (status 13).
    Internal,
    /// gRPC `resource-exhausted` (status 8).
    ResourceExhausted,
    /// gRPC `unavailable` (status 14).
    Unavailable,
}

const POLICIES: [(&str, RetryPolicy); 16] = [
    ("5xx", RetryPolicy::FiveXx),
    ("gateway-error", RetryPolicy::GatewayError),
    ("reset", RetryPolicy::Reset),
    ("reset-before-request", RetryPolicy::ResetBeforeRequest),
    ("connect-failure", RetryPolicy::ConnectFailure),
    ("envoy-ratelimited", RetryPolicy::EnvoyRateLimited),
    ("retriable-4xx", RetryPolicy::Retriable4xx),
    ("refused-stream", RetryPolicy::RefusedStream),
    ("retriable-status-codes", RetryPolicy::RetriableStatusCodes),
    ("retriable-headers", RetryPolicy::RetriableHeaders),
    (
        "http3-post-connect-failure",
        RetryPolicy::Http3PostConnectFailure,
    ),
    ("cancelled", RetryPolicy::Cancelled),
    ("deadline-exceeded", RetryPolicy::DeadlineExceeded),
    ("internal", RetryPolicy::Internal),
    ("resource-exhausted", RetryPolicy::ResourceExhausted),
    ("unavailable", RetryPolicy::Unavailable),
];

impl RetryPolicy {
    /// The name as written in `retryOn`.
    pub fn as_str(self) -> &'static str {
        POLICIES
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("", |(n, _)| n)
    }
}

/// A parsed `retryOn` list: named policies and HTTP status codes (100 to 599).
///
/// Istio's default when `retryOn` is absent or empty is
/// `connect-failure,refused-stream,unavailable,cancelled` ([`RetryOn::default`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryOn {
    source: String,
    policies: Vec<RetryPolicy>,
    status_codes: Vec<u16>,
}

/// Istio's documented default `retryOn` (`HTTPRetry.retry_on`).
pub const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled";

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            source: String::new(),
            policies: vec![
                RetryPolicy::ConnectFailure,
                RetryPolicy::RefusedStream,
                RetryPolicy::Unavailable,
                RetryPolicy::Cancelled,
            ],
            status_codes: Vec::new(),
        }
    }
}

impl RetryOn {
    /// Parses a comma-separated list. Like Istio's validation, items are not
    /// trimmed: `"5xx, reset"` is refused. An empty string means Istio's default.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Self::default());
        }
        let mut out = Self {
            source: s.to_string(),
            policies: Vec::new(),
            status_codes: Vec::new(),
        };
        for item in s.split(',') {
            if let Some((_, p)) = POLICIES.iter().find(|(n, _)| *n == item) {
                if !out.policies.contains(p) {
                    out.policies.push(*p);
                }
            } else if let Some(code) = item
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c) && item.bytes().all(|b| b.is_ascii_digit()))
            {
                out.status_codes.push(code);
            } else {
                return Err(format!(
                    "{:?} is not a retry policy: use an HTTP status code 100 to 599 or one of {}",
                    super::common::truncate(item, 40),
                    POLICIES.map(|(n, _)| n).join(", ")
                ));
            }
        }
        Ok(out)
    }

    /// The text as written (empty for the default).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The named policies, in the order written.
    pub fn policies(&self) -> &[RetryPolicy] {
        &self.policies
    }

    /// The status codes listed (Istio adds `retriable-status-codes` for them).
    pub fn status_codes(&self) -> &[u16] {
        &self.status_codes
    }

    /// Whether `p` is listed.
    pub fn contains(&self, p: RetryPolicy) -> bool {
        self.policies.contains(&p)
    }

    fn any(&self, ps: &[RetryPolicy]) -> bool {
        ps.iter().any(|p| self.contains(*p))
    }

    /// Whether a response with this HTTP status is retried: any 5xx for `5xx`;
    /// 502, 503 and 504 for `gateway-error`; 409 for `retriable-4xx`; listed codes exactly.
    pub fn on_status(&self, status: u16) -> bool {
        (self.contains(RetryPolicy::FiveXx) && (500..=599).contains(&status))
            || (self.contains(RetryPolicy::GatewayError) && matches!(status, 502..=504))
            || (self.contains(RetryPolicy::Retriable4xx) && status == 409)
            || self.status_codes.contains(&status)
    }

    /// Whether a reset (no response: disconnect, reset, read timeout) is retried.
    /// As in Envoy, `5xx` and `gateway-error` include resets.
    pub fn on_reset(&self) -> bool {
        self.any(&[
            RetryPolicy::Reset,
            RetryPolicy::FiveXx,
            RetryPolicy::GatewayError,
        ])
    }

    /// Whether a failure to connect upstream is retried (`connect-failure`,
    /// and the policies that include resets).
    pub fn on_connect_failure(&self) -> bool {
        self.contains(RetryPolicy::ConnectFailure) || self.on_reset()
    }

    /// Whether a REFUSED_STREAM reset is retried (`refused-stream`, and the
    /// policies that include resets).
    pub fn on_refused_stream(&self) -> bool {
        self.contains(RetryPolicy::RefusedStream) || self.on_reset()
    }

    /// Whether a response carrying `x-envoy-ratelimited` is retried.
    pub fn on_envoy_ratelimited(&self) -> bool {
        self.contains(RetryPolicy::EnvoyRateLimited)
    }

    /// Whether a gRPC status (numeric code) is retried: cancelled = 1,
    /// deadline-exceeded = 4, resource-exhausted = 8, internal = 13, unavailable = 14.
    pub fn on_grpc_status(&self, code: u32) -> bool {
        let p = match code {
            1 => RetryPolicy::Cancelled,
            4 => RetryPolicy::DeadlineExceeded,
            8 => RetryPolicy::ResourceExhausted,
            13 => RetryPolicy::Internal,
            14 => RetryPolicy::Unavailable,
            _ => return false,
        };
        self.contains(p)
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.source.is_empty() {
            f.write_str(DEFAULT_RETRY_ON)
        } else {
            f.write_str(&self.source)
        }
    }
}

impl std::str::FromStr for RetryOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RetryOn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a comma-separated list of retry policies")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RetryOn, E> {
                RetryOn::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let r = RetryOn::parse("5xx").unwrap();
        assert!(r.on_status(500) && r.on_status(503) && r.on_status(599));
        assert!(!r.on_status(499) && !r.on_status(409));
        assert!(r.on_reset() && r.on_connect_failure() && r.on_refused_stream());

        let g = RetryOn::parse("gateway-error").unwrap();
        assert!(g.on_status(502) && g.on_status(503) && g.on_status(504));
        assert!(!g.on_status(500) && !g.on_status(501) && !g.on_status(505));
        assert!(g.on_reset());

        let c = RetryOn::parse("retriable-4xx,429,503").unwrap();
        assert!(c.on_status(409) && c.on_status(429) && c.on_status(503));
        assert!(!c.on_status(500) && !c.on_status(404));
        assert_eq!(c.status_codes(), &[429, 503]);
        assert!(!c.on_reset() && !c.on_connect_failure());
    }

    #[test]
    fn connection_level() {
        let r = RetryOn::parse("connect-failure").unwrap();
        assert!(r.on_connect_failure() && !r.on_reset() && !r.on_refused_stream());
        let r = RetryOn::parse("refused-stream").unwrap();
        assert!(r.on_refused_stream() && !r.on_connect_failure());
        let r = RetryOn::parse("reset").unwrap();
        assert!(r.on_reset() && r.on_connect_failure() && r.on_refused_stream());
        assert!(!r.on_status(503));
        let r = RetryOn::parse("envoy-ratelimited").unwrap();
        assert!(r.on_envoy_ratelimited() && !r.on_reset());
    }

    #[test]
    fn grpc() {
        let r =
            RetryOn::parse("cancelled,deadline-exceeded,resource-exhausted,internal,unavailable")
                .unwrap();
        for code in [1, 4, 8, 13, 14] {
            assert!(r.on_grpc_status(code), "{code}");
        }
        for code in [0, 2, 3, 5, 7, 12, 15, 16] {
            assert!(!r.on_grpc_status(code), "{code}");
        }
        let only = RetryOn::parse("unavailable").unwrap();
        assert!(only.on_grpc_status(14) && !only.on_grpc_status(1));
        assert!(
            !only.on_status(503),
            "gRPC policies do not cover HTTP statuses"
        );
    }

    #[test]
    fn default_is_istios() {
        let d = RetryOn::parse("").unwrap();
        assert_eq!(d, RetryOn::default());
        assert!(d.on_connect_failure() && d.on_refused_stream());
        assert!(d.on_grpc_status(14) && d.on_grpc_status(1));
        assert!(!d.on_status(503) && !d.on_reset());
        assert_eq!(d.to_string(), DEFAULT_RETRY_ON);
    }

    #[test]
    fn refusals_name_the_item() {
        for (text, bad) in [
            ("5xx,bogus", "\"bogus\""),
            ("5xx, reset", "\" reset\""),
            ("5xx,,reset", "\"\""),
            ("600", "\"600\""),
            ("99", "\"99\""),
            ("+503", "\"+503\""),
            ("5XX", "\"5XX\""),
        ] {
            let e = RetryOn::parse(text).unwrap_err();
            assert!(
                e.starts_with(&format!("{bad} is not a retry policy")),
                "{text}: {e}"
            );
            assert!(e.contains("gateway-error"), "{e}");
        }
    }

    #[test]
    fn round_trip() {
        let r = RetryOn::parse("gateway-error,503").unwrap();
        assert_eq!(r.as_str(), "gateway-error,503");
        let json = serde_json::to_string(&r).unwrap();
        let back: RetryOn = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(RetryPolicy::GatewayError.as_str(), "gateway-error");
    }
}
