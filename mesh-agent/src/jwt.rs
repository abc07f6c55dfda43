//! RequestAuthentication: JWTs checked at the destination's agent. A token
//! is looked for where the rules say (default `Authorization: Bearer` and
//! the `access_token` query parameter); a request without one passes, a
//! request with one that no rule validates is refused with 401.

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use mesh_core::policy as pol;

/// One issuer's rule, ready to check tokens.
#[derive(Debug, Clone)]
pub struct Rule {
    issuer: String,
    audiences: Vec<String>,
    /// `None`: the keys could not be had (https not fetched yet, unreadable
    /// file): every token of this issuer is refused.
    keys: Option<JwkSet>,
    headers: Vec<(String, String)>,
    params: Vec<String>,
    output_payload_to_header: Option<String>,
    forward_original_token: bool,
}

impl Rule {
    /// Compiles a rule; reads a `file://` JWKS now.
    pub fn new(r: &pol::JwtRule) -> Self {
        let keys = match (&r.jwks, &r.jwks_uri) {
            (Some(j), _) => serde_json::from_str(j).ok(),
            (None, Some(u)) => u
                .strip_prefix("file://")
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| serde_json::from_str(&t).ok()),
            (None, None) => None,
        };
        if keys.is_none() {
            tracing::warn!(issuer = %r.issuer, "no usable JWKS for this issuer; its tokens are refused");
        }
        let headers = if r.from_headers.is_empty() && r.from_params.is_empty() {
            vec![("authorization".to_string(), "Bearer ".to_string())]
        } else {
            r.from_headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.prefix.clone()))
                .collect()
        };
        let params = if r.from_headers.is_empty() && r.from_params.is_empty() {
            vec!["access_token".to_string()]
        } else {
            r.from_params.clone()
        };
        Self {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            keys,
            headers,
            params,
            output_payload_to_header: r.output_payload_to_header.clone(),
            forward_original_token: r.forward_original_token,
        }
    }

    /// The token in the request where this rule looks, with where it was.
    fn find(&self, parts: &http::request::Parts) -> Option<(String, Source)> {
        for (name, prefix) in &self.headers {
            if let Some(v) = parts
                .headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
            {
                if let Some(t) = v.strip_prefix(prefix.as_str()) {
                    return Some((t.trim().to_string(), Source::Header(name.clone())));
                }
            }
        }
        let q = parts.uri.query()?;
        for p in &self.params {
            if let Some(t) = q
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{p}=")))
            {
                return Some((t.to_string(), Source::Param));
            }
        }
        None
    }

    /// The token's claims if it is this rule's issuer's and valid.
    fn verify(&self, token: &str) -> Result<serde_json::Value, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| format!("no keys for issuer {}", self.issuer))?;
        let candidates: Vec<&jsonwebtoken::jwk::Jwk> = match &header.kid {
            Some(kid) => keys.find(kid).into_iter().collect(),
            None => keys.keys.iter().collect(),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[self.issuer.as_str()]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
        }
        validation.set_required_spec_claims(&["iss"]);
        let mut last = "no key matches the token".to_string();
        for jwk in candidates {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
                Ok(d) => return Ok(d.claims),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

/// The `iss` claim of a token, before any check.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}

enum Source {
    Header(String),
    Param,
}

/// Checks the request's token against `rules`: `Ok(None)` without a token,
/// `Ok(Some(principal))` (`iss/sub`) with a valid one (after applying the
/// rule's `outputPayloadToHeader` and `forwardOriginalToken`), `Err(why)`
/// otherwise.
pub fn authenticate(
    rules: &[Rule],
    parts: &mut http::request::Parts,
) -> Result<Option<String>, String> {
    let mut seen_token = false;
    let mut why = String::new();
    for r in rules {
        let Some((token, source)) = r.find(parts) else {
            continue;
        };
        seen_token = true;
        // Only the rule of the token's issuer judges it (read unverified,
        // then verified with that issuer's keys).
        match unverified_issuer(&token) {
            Some(iss) if iss == r.issuer => {}
            Some(iss) => {
                if why.is_empty() {
                    why = format!("no rule for issuer {iss:?}");
                }
                continue;
            }
            None => {
                why = "malformed token".into();
                continue;
            }
        }
        match r.verify(&token) {
            Ok(claims) => {
                if let Some(h) = &r.output_payload_to_header {
                    let json = serde_json::to_vec(&claims).unwrap_or_default();
                    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::from_bytes(h.as_bytes()),
                        http::HeaderValue::from_str(&b64),
                    ) {
                        parts.headers.insert(n, v);
                    }
                }
                if !r.forward_original_token {
                    if let Source::Header(name) = source {
                        parts.headers.remove(name.as_str());
                    }
                }
                let iss = claims
                    .get("iss")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default();
                let sub = claims
                    .get("sub")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default();
                return Ok(Some(format!("{iss}/{sub}")));
            }
            Err(e) => {
                why = e;
                break;
            }
        }
    }
    if seen_token {
        Err(why)
    } else {
        Ok(None)
    }
}
