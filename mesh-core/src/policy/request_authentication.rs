//! `RequestAuthentication`: which JWTs a workload accepts (Istio
//! `security/v1/request_authentication.proto`). A request without a token
//! passes; a request with a token no rule validates is refused (401).

use super::authorization::{selector_matches, validate_selector};
use super::common::PolicyDuration;
use super::destination_rule::WorkloadMatchSelector;
use super::validate::Ctx;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// JWT rules for the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthentication {
    /// Workloads this applies to; absent: the whole namespace (the whole mesh
    /// in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadMatchSelector>,
    /// Gateway/waypoint attachment: parsed, not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    /// Gateway/waypoint attachments: parsed, not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<serde_json::Value>,
    /// The issuers accepted and how to check their tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted issuer (Istio's `JWTRule`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// The `iss` a token must carry.
    #[serde(default)]
    pub issuer: String,
    /// Accepted `aud` values; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the signing keys are: `file:///path` (read when the config
    /// changes) or `https://...` (fetched and cached by the agents;
    /// `http://` is warned and never fetched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The signing keys inline, as a JWKS JSON document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers the token may come in; default `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token may come in; default `access_token`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Cookies: parsed, not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// Header that receives the token's payload (base64url JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the forwarded request (default: removed).
    #[serde(default, skip_serializing_if = "super::common::is_false")]
    pub forward_original_token: bool,
    /// Claims copied to headers: parsed, not acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<serde_json::Value>,
    /// JWKS fetch timeout: parsed, not acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<PolicyDuration>,
}

/// A header carrying a token, with the prefix before it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    /// Header name.
    #[serde(default)]
    pub name: String,
    /// Prefix before the token, e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

impl RequestAuthentication {
    /// Does this policy, in `policy_namespace`, apply to a workload of
    /// `workload_namespace` with `labels`? (Root namespace: every workload.)
    pub fn selects(
        &self,
        policy_namespace: &str,
        root_namespace: &str,
        workload_namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        if self.target_ref.is_some() || !self.target_refs.is_empty() {
            return false;
        }
        (policy_namespace == root_namespace || policy_namespace == workload_namespace)
            && selector_matches(self.selector.as_ref(), labels)
    }

    pub(crate) fn validate(&self, c: &mut Ctx<'_>) {
        validate_selector(c, self.selector.as_ref());
        if self.target_ref.is_some() {
            c.not_acted_on("spec.targetRef");
        }
        if !self.target_refs.is_empty() {
            c.not_acted_on("spec.targetRefs");
        }
        let mut issuers = BTreeMap::new();
        for (i, r) in self.jwt_rules.iter().enumerate() {
            let p = format!("spec.jwtRules[{i}]");
            if r.issuer.trim().is_empty() {
                c.error(format!("{p}.issuer"), "is required");
            } else if let Some(first) = issuers.insert(r.issuer.clone(), i) {
                issuers.insert(r.issuer.clone(), first);
                c.error(
                    format!("{p}.issuer"),
                    format!(
                        "issuer {:?} already has a rule at spec.jwtRules[{first}]",
                        r.issuer
                    ),
                );
            }
            match (&r.jwks, &r.jwks_uri) {
                (Some(_), Some(_)) => c.error(&p, "set only one of jwks and jwksUri"),
                (None, None) => c.error(&p, "one of jwks or jwksUri is required"),
                (Some(j), None) => {
                    let ok = serde_json::from_str::<serde_json::Value>(j)
                        .ok()
                        .is_some_and(|v| v.get("keys").is_some_and(serde_json::Value::is_array));
                    if !ok {
                        c.error(
                            format!("{p}.jwks"),
                            "must be a JWKS JSON document with a \"keys\" array",
                        );
                    }
                }
                (None, Some(u)) => {
                    // https:// is fetched and cached by the agents.
                    if u.starts_with("http://") {
                        c.warn(
                            format!("{p}.jwksUri"),
                            "plain http JWKS are never fetched (anyone on the path could swap the keys): tokens of this issuer are refused; use https://",
                        );
                    } else if !u.starts_with("https://")
                        && u.strip_prefix("file://")
                            .is_none_or(|f| !f.starts_with('/'))
                    {
                        c.error(
                            format!("{p}.jwksUri"),
                            format!("{u:?}: expected file:///absolute/path or https://..."),
                        );
                    }
                }
            }
            for (j, h) in r.from_headers.iter().enumerate() {
                if h.name.trim().is_empty() {
                    c.error(format!("{p}.fromHeaders[{j}].name"), "is required");
                }
            }
            if !r.from_cookies.is_empty() {
                c.not_acted_on(format!("{p}.fromCookies"));
            }
            if !r.output_claim_to_headers.is_empty() {
                c.not_acted_on(format!("{p}.outputClaimToHeaders"));
            }
            if r.timeout.is_some() {
                c.not_acted_on(format!("{p}.timeout"));
            }
            if let Some(h) = &r.output_payload_to_header {
                if h.is_empty()
                    || h.bytes()
                        .any(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
                {
                    c.error(
                        format!("{p}.outputPayloadToHeader"),
                        format!("{h:?} is not a header name"),
                    );
                }
            }
        }
    }
}
