//! Why the agent answered a request itself instead of the upstream: one
//! enum for the `x-fedmesh-reason` response header, the `reason` label of
//! `fedmesh_agent_requests_total` and the `fedmesh.reason` span attribute.

use http::header::HeaderValue;
use http::{Response, StatusCode};
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A local answer's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// AuthorizationPolicy refused the request (403).
    Denied,
    /// RequestAuthentication found an invalid token (401).
    JwtInvalid,
    /// A local rate limit refused it (429).
    RateLimited,
    /// The application did not answer (503).
    AppUnavailable,
    /// The host names no service of the mesh (502).
    UnknownService,
    /// No route of the VirtualService matches, or it has no destination.
    NoRoute,
    /// The destination has no usable endpoint (503).
    NoHealthyEndpoint,
    /// No connection could be made to the endpoint (503).
    UpstreamConnectFailure,
    /// The connection was reset or stopped answering (503).
    UpstreamReset,
    /// No response within the route's timeout (504).
    UpstreamTimeout,
    /// A fault injection aborted it.
    FaultAbort,
    /// A connection pool limit refused it (503).
    Overflow,
    /// The request could not be read (400).
    BadRequest,
    /// The Sidecar's egress hosts leave the destination out (502).
    EgressDenied,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 14] = [
        Reason::Denied,
        Reason::JwtInvalid,
        Reason::RateLimited,
        Reason::AppUnavailable,
        Reason::UnknownService,
        Reason::NoRoute,
        Reason::NoHealthyEndpoint,
        Reason::UpstreamConnectFailure,
        Reason::UpstreamReset,
        Reason::UpstreamTimeout,
        Reason::FaultAbort,
        Reason::Overflow,
        Reason::BadRequest,
        Reason::EgressDenied,
    ];

    /// The name in headers, labels and spans.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Denied => "denied",
            Reason::JwtInvalid => "jwt_invalid",
            Reason::RateLimited => "rate_limited",
            Reason::AppUnavailable => "app_unavailable",
            Reason::UnknownService => "unknown_service",
            Reason::NoRoute => "no_route",
            Reason::NoHealthyEndpoint => "no_healthy_endpoint",
            Reason::UpstreamConnectFailure => "upstream_connect_failure",
            Reason::UpstreamReset => "upstream_reset",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::FaultAbort => "fault_abort",
            Reason::Overflow => "overflow",
            Reason::BadRequest => "bad_request",
            Reason::EgressDenied => "egress_denied",
        }
    }

    /// The reason a name spells, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The reason a response carries (`x-fedmesh-reason`: this agent's
    /// answer, or a peer agent's passed on).
    pub fn of<B>(r: &Response<B>) -> Option<Self> {
        r.headers()
            .get(crate::body::REASON)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
    }

    /// As a header value.
    pub const fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }

    /// The status an attempt that failed for this reason answers with.
    pub fn attempt_status(self) -> StatusCode {
        match self {
            Reason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_reads_back_from_its_name_and_its_header() {
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            let resp = Response::builder()
                .header(crate::body::REASON, r.header())
                .body(())
                .unwrap_or_default();
            assert_eq!(Reason::of(&resp), Some(r));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len(), "two reasons share a name");
        assert_eq!(Reason::parse("teapot"), None);
        assert_eq!(Reason::of(&Response::new(())), None);
    }

    #[test]
    fn a_failed_attempt_answers_504_for_a_timeout_and_503_otherwise() {
        assert_eq!(
            Reason::UpstreamTimeout.attempt_status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        for r in [
            Reason::UpstreamReset,
            Reason::UpstreamConnectFailure,
            Reason::Overflow,
        ] {
            assert_eq!(r.attempt_status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}
