//! Matching requests against HTTP routes, with Istio's (Envoy's) semantics.

use super::common::HeaderMatch;
use super::virtual_service::{HTTPMatchRequest, HTTPRoute, VirtualService, MESH_GATEWAY};
use std::collections::BTreeMap;

/// What a route match may look at in a request. Implemented by the data plane
/// over its request type; tests implement it over a plain struct.
pub trait RequestAttrs {
    /// HTTP method, e.g. `GET`.
    fn method(&self) -> &str;
    /// Path without the query string, e.g. `/reviews/1`.
    fn path(&self) -> &str;
    /// Authority (`:authority`, or `Host` in HTTP/1), as sent.
    fn authority(&self) -> &str;
    /// A header value by name, compared ASCII-case-insensitively. Repeated
    /// headers should be joined with `,`, as Envoy does before matching.
    fn header(&self, name: &str) -> Option<&str>;
    /// A query parameter value; `Some("")` for `?key` without a value.
    fn query_param(&self, name: &str) -> Option<&str>;
    /// Destination port the request was sent to.
    fn port(&self) -> u16;
    /// URI scheme; plain-text HTTP from the application by default.
    fn scheme(&self) -> &str {
        "http"
    }
    /// Namespace of the source workload, if known.
    fn source_namespace(&self) -> Option<&str> {
        None
    }
    /// Labels of the source workload, if known.
    fn source_labels(&self) -> Option<&BTreeMap<String, String>> {
        None
    }
}

/// A header as a match sees it: pseudo-headers map to the request line.
fn header_value<'a>(r: &'a dyn RequestAttrs, name: &str) -> Option<&'a str> {
    match name {
        ":method" => Some(r.method()),
        ":path" => Some(r.path()),
        ":authority" => Some(r.authority()),
        ":scheme" => Some(r.scheme()),
        _ if name.eq_ignore_ascii_case("host") => r.header(name).or(Some(r.authority())),
        _ => r.header(name),
    }
}

/// Header keys Istio ignores in `headers` (they have their own match fields).
fn ignored_key(name: &str) -> bool {
    matches!(name, "uri" | "scheme" | "method" | "authority")
}

impl HTTPMatchRequest {
    /// Whether the request meets every condition of this match (AND):
    ///
    /// - `uri` on the path without query; `ignoreUriCase` relaxes `exact` and `prefix` only;
    /// - `scheme`, `method`, `authority` on the request line;
    /// - `headers`: each present and matching (`{}` = present); the keys
    ///   `uri`, `scheme`, `method`, `authority` are ignored, as in Istio;
    /// - `withoutHeaders`: none matches; a missing header counts as the empty
    ///   value, unless the condition is "present" (Envoy `invert_match` with
    ///   `treat_missing_header_as_empty`);
    /// - `queryParams`: each present and matching;
    /// - `port`: equal to the destination port (0 or absent: any);
    /// - `sourceNamespace`, `sourceLabels`: the source must be known and match
    ///   (Istio applies these as selectors of the client workload);
    /// - `gateways`: when set, must include `mesh`, since fedmesh applies
    ///   routes only in sidecars.
    pub fn matches(&self, r: &dyn RequestAttrs) -> bool {
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches_ignore_case(r.path())
            } else {
                u.matches(r.path())
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.scheme {
            if !m.matches(r.scheme()) {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if !m.matches(r.method()) {
                return false;
            }
        }
        if let Some(m) = &self.authority {
            if !m.matches(r.authority()) {
                return false;
            }
        }
        for (name, m) in &self.headers {
            if !ignored_key(name) && !m.matches(header_value(r, name)) {
                return false;
            }
        }
        for (name, m) in &self.without_headers {
            if ignored_key(name) {
                continue;
            }
            let v = header_value(r, name);
            let hit = match m {
                HeaderMatch::Present => v.is_some(),
                HeaderMatch::Match(sm) => sm.matches(v.unwrap_or("")),
            };
            if hit {
                return false;
            }
        }
        for (name, m) in &self.query_params {
            if !m.matches(r.query_param(name)) {
                return false;
            }
        }
        if let Some(p) = self.port.filter(|p| *p != 0) {
            if u32::from(r.port()) != p {
                return false;
            }
        }
        if let Some(ns) = &self.source_namespace {
            if r.source_namespace() != Some(ns.as_str()) {
                return false;
            }
        }
        if !self.source_labels.is_empty() {
            let Some(labels) = r.source_labels() else {
                return false;
            };
            if !self
                .source_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
            {
                return false;
            }
        }
        if !self.gateways.is_empty() && !self.gateways.iter().any(|g| g == MESH_GATEWAY) {
            return false;
        }
        true
    }
}

impl HTTPRoute {
    /// Whether the request matches this route: any of its matches (OR), or
    /// always when it has none.
    pub fn matches(&self, r: &dyn RequestAttrs) -> bool {
        self.r#match.is_empty() || self.r#match.iter().any(|m| m.matches(r))
    }
}

impl VirtualService {
    /// The first HTTP route that matches the request (Istio evaluates routes in order).
    pub fn route_for(&self, r: &dyn RequestAttrs) -> Option<&HTTPRoute> {
        self.http.iter().find(|route| route.matches(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::common::{MatchRegex, StringMatch};

    #[derive(Default)]
    struct Req {
        method: &'static str,
        path: &'static str,
        authority: &'static str,
        headers: Vec<(&'static str, &'static str)>,
        query: Vec<(&'static str, &'static str)>,
        port: u16,
        ns: Option<&'static str>,
        labels: Option<BTreeMap<String, String>>,
    }

    impl RequestAttrs for Req {
        fn method(&self) -> &str {
            self.method
        }
        fn path(&self) -> &str {
            self.path
        }
        fn authority(&self) -> &str {
            self.authority
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        }
        fn query_param(&self, name: &str) -> Option<&str> {
            self.query.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        }
        fn port(&self) -> u16 {
            self.port
        }
        fn source_namespace(&self) -> Option<&str> {
            self.ns
        }
        fn source_labels(&self) -> Option<&BTreeMap<String, String>> {
            self.labels.as_ref()
        }
    }

    fn req() -> Req {
        Req {
            method: "GET",
            path: "/reviews/1",
            authority: "reviews:9080",
            headers: vec![("end-user", "jason"), ("x-debug", "")],
            query: vec![("v", "2"), ("flag", "")],
            port: 9080,
            ..Req::default()
        }
    }

    fn exact(s: &str) -> HeaderMatch {
        HeaderMatch::Match(StringMatch::Exact(s.into()))
    }

    #[test]
    fn empty_match_matches_everything() {
        assert!(HTTPMatchRequest::default().matches(&req()));
        assert!(HTTPRoute::default().matches(&req()));
    }

    #[test]
    fn uri_and_case() {
        let mut m = HTTPMatchRequest {
            uri: Some(StringMatch::Prefix("/Reviews".into())),
            ..HTTPMatchRequest::default()
        };
        assert!(!m.matches(&req()));
        m.ignore_uri_case = true;
        assert!(m.matches(&req()));
        m.uri = Some(StringMatch::Regex(
            MatchRegex::new("/REVIEWS/[0-9]+").unwrap(),
        ));
        assert!(!m.matches(&req()), "ignoreUriCase does not apply to regex");
        m.uri = Some(StringMatch::Regex(
            MatchRegex::new("/reviews/[0-9]+").unwrap(),
        ));
        assert!(m.matches(&req()));
        m.uri = Some(StringMatch::Regex(MatchRegex::new("/reviews").unwrap()));
        assert!(!m.matches(&req()), "regex must match the whole path");
    }

    #[test]
    fn headers_and_conjunction() {
        let mut m = HTTPMatchRequest::default();
        m.headers.insert("end-user".into(), exact("jason"));
        assert!(m.matches(&req()));
        m.headers.insert("End-User".into(), exact("jason"));
        assert!(m.matches(&req()), "header names compare case-insensitively");
        m.method = Some(StringMatch::Exact("POST".into()));
        assert!(!m.matches(&req()), "conditions are AND-ed");
        m.method = None;
        m.headers.insert("end-user".into(), exact("Jason"));
        assert!(!m.matches(&req()), "header values are case-sensitive");

        let mut m = HTTPMatchRequest::default();
        m.headers.insert("x-debug".into(), HeaderMatch::Present);
        assert!(m.matches(&req()), "present with an empty value");
        m.headers.insert("x-missing".into(), HeaderMatch::Present);
        assert!(!m.matches(&req()));

        let mut m = HTTPMatchRequest::default();
        m.headers.insert("x-debug".into(), exact(""));
        assert!(m.matches(&req()), "exact empty matches an empty value");
        m.headers.insert("x-missing".into(), exact(""));
        assert!(!m.matches(&req()), "but not a missing header");

        let mut m = HTTPMatchRequest::default();
        m.headers.insert("method".into(), exact("nope"));
        assert!(
            m.matches(&req()),
            "Istio ignores the key `method` in headers"
        );

        let mut m = HTTPMatchRequest::default();
        m.headers.insert(":authority".into(), exact("reviews:9080"));
        m.headers.insert("host".into(), exact("reviews:9080"));
        m.headers.insert(":method".into(), exact("GET"));
        assert!(m.matches(&req()), "pseudo-headers map to the request line");
    }

    #[test]
    fn without_headers() {
        let mut m = HTTPMatchRequest::default();
        m.without_headers.insert("end-user".into(), exact("jason"));
        assert!(!m.matches(&req()));
        let mut m = HTTPMatchRequest::default();
        m.without_headers.insert("end-user".into(), exact("bob"));
        assert!(m.matches(&req()));
        let mut m = HTTPMatchRequest::default();
        m.without_headers.insert("x-missing".into(), exact("x"));
        assert!(m.matches(&req()), "a missing header is not `x`");
        let mut m = HTTPMatchRequest::default();
        m.without_headers.insert("x-missing".into(), exact(""));
        assert!(!m.matches(&req()), "a missing header counts as empty");
        let mut m = HTTPMatchRequest::default();
        m.without_headers
            .insert("x-debug".into(), HeaderMatch::Present);
        assert!(!m.matches(&req()));
        let mut m = HTTPMatchRequest::default();
        m.without_headers
            .insert("x-missing".into(), HeaderMatch::Present);
        assert!(m.matches(&req()));
    }

    #[test]
    fn query_port_source_gateways() {
        let mut m = HTTPMatchRequest::default();
        m.query_params.insert("v".into(), exact("2"));
        m.query_params.insert("flag".into(), exact(""));
        assert!(m.matches(&req()));
        m.query_params.insert("absent".into(), HeaderMatch::Present);
        assert!(!m.matches(&req()));

        let mut m = HTTPMatchRequest {
            port: Some(9080),
            ..HTTPMatchRequest::default()
        };
        assert!(m.matches(&req()));
        m.port = Some(80);
        assert!(!m.matches(&req()));
        m.port = Some(0);
        assert!(m.matches(&req()), "port 0 means any");

        let m = HTTPMatchRequest {
            source_namespace: Some("prod".into()),
            ..HTTPMatchRequest::default()
        };
        assert!(!m.matches(&req()), "unknown source does not match");
        let mut r = req();
        r.ns = Some("prod");
        assert!(m.matches(&r));

        let mut m = HTTPMatchRequest::default();
        m.source_labels.insert("app".into(), "productpage".into());
        assert!(!m.matches(&r));
        r.labels = Some(
            [("app", "productpage"), ("version", "v1")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
        );
        assert!(m.matches(&r));
        m.source_labels.insert("version".into(), "v2".into());
        assert!(!m.matches(&r));

        let mut m = HTTPMatchRequest {
            gateways: vec!["istio-system/ingress".into()],
            ..HTTPMatchRequest::default()
        };
        assert!(
            !m.matches(&req()),
            "a gateway-only match does not apply to sidecars"
        );
        m.gateways.push("mesh".into());
        assert!(m.matches(&req()));
    }

    #[test]
    fn routes_or_their_matches_and_pick_first() {
        let mut jason = HTTPMatchRequest::default();
        jason.headers.insert("end-user".into(), exact("jason"));
        let post = HTTPMatchRequest {
            method: Some(StringMatch::Exact("POST".into())),
            ..HTTPMatchRequest::default()
        };
        let first = HTTPRoute {
            name: Some("first".into()),
            r#match: vec![post, jason],
            ..HTTPRoute::default()
        };
        assert!(first.matches(&req()), "matches are OR-ed");
        let vs = VirtualService {
            http: vec![
                first,
                HTTPRoute {
                    name: Some("rest".into()),
                    ..HTTPRoute::default()
                },
            ],
            ..VirtualService::default()
        };
        assert_eq!(vs.route_for(&req()).unwrap().name.as_deref(), Some("first"));
        let mut other = req();
        other.headers.clear();
        assert_eq!(vs.route_for(&other).unwrap().name.as_deref(), Some("rest"));
    }
}
