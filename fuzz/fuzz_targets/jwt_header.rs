//! Fuzzes the agent's JWT path before and through signature checking
//! (`mesh_agent::jwt::authenticate` with rules compiled by
//! `mesh_agent::jwt::Rule::new` from inline JWKS): finding the token in the
//! request, splitting it, base64url-decoding the payload for its issuer,
//! parsing the header, picking the key by `kid` and `alg`, verifying, and
//! checking the claims.
//!
//! Input: a control byte, then by its low 2 bits
//! - 0: the token itself;
//! - 1: header JSON, 0x00, claims JSON, 0x00, signature bytes, base64url-encoded here;
//! - 2: header JSON, 0x00, claims JSON, signed here with the HMAC key the
//!   control byte's bit 2 picks (`hs`: HS256, `hs512`: HS512), so that the
//!   claim checks after the signature are reached;
//! - 3: a JWKS document for a rule of its own, then a token signed with `hs`.
//!
//! Bit 3 puts the token in `x-jwt-assertion` (the second rule's header)
//! instead of `Authorization: Bearer`.
//!
//! Properties: never a panic, never a wait (static keys); a request with a
//! readable token is never let through as tokenless; a token accepted is
//! signed with an HMAC key of the JWKS under an HS* `alg` (the fuzzer has no
//! private key: an accepted RS*/ES*/EdDSA token would be a forgery), its
//! `iss` is the rule's, its audience one of the rule's, its `exp`/`nbf`/`iat`
//! within the clock skew; the payload header and token removal happen.
#![no_main]

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use mesh_agent::jwt::{authenticate, JwksCache, Rule};
use mesh_core::policy::{JwtHeader, JwtRule};
use std::future::Future;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

const ISSUER: &str = "https://issuer.example";
const OTHER_ISSUER: &str = "https://other.example";
const AUDIENCE: &str = "fedmesh";
const HS: &[u8] = b"fedmesh-fuzz-hs256-secret-0123456789abcdef";
const HS512: &[u8] = b"fedmesh-fuzz-hs512-secret-0123456789abcdef-0123456789abcdef";
const RSA_N: &str = "uLfJ9tJkLuKyR8yPGDwluq-MefFLGRNHm1y0JX1S-h-K17H199_sboVjLlo6j-r35kecKMUD0YmRrmFt-8ZkySN3sh9JHX7Yriwf5ntu8DUfgONI9Glft2YAgtYLA6iJBLFIdN2zFuqB7Ywe5KXUIOIMWLL5kVI89vX09GBPOQ51tNVMx6he9bu2ZHwOjmEh-VE7FepAaN02iP1qQMiZ67RK9eXX8lTfsuYld6TVRrQkRIv2CCikKI7lZ7PnkIHjNMRarAWtaMMtglIyNRcGVQgkQxJjEkC3CFmgfv--5DYX56HU7htfGUbe4hU3Cs9U9_CJ4a-3mBsYhGYhEBCXZw";
const EC_X: &str = "cOicuMUsm5QarYP3EJKGpVfplio5-vjIivh44DGJxFw";
const EC_Y: &str = "K1lMA1rSeTfOrK9Emhr3jYXPTnJfpLiz8RIS3r_l5ms";
const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

/// Lenient base64url (padding or not, any trailing bits) for the checks.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

fn jwks() -> String {
    serde_json::json!({"keys": [
        {"kty": "oct", "kid": "hs", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(HS)},
        {"kty": "oct", "kid": "hs512", "alg": "HS512", "k": URL_SAFE_NO_PAD.encode(HS512)},
        {"kty": "RSA", "kid": "rsa", "alg": "RS256", "n": RSA_N, "e": "AQAB"},
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": EC_X, "y": EC_Y},
        {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": ED_X},
    ]})
    .to_string()
}

fn rule_a() -> JwtRule {
    JwtRule {
        issuer: ISSUER.into(),
        jwks: Some(jwks()),
        output_payload_to_header: Some("x-jwt-payload".into()),
        ..Default::default()
    }
}

fn rule_b() -> JwtRule {
    JwtRule {
        issuer: OTHER_ISSUER.into(),
        audiences: vec![AUDIENCE.into(), "other".into()],
        jwks: Some(jwks()),
        from_headers: vec![JwtHeader { name: "x-jwt-assertion".into(), ..Default::default() }],
        forward_original_token: true,
        ..Default::default()
    }
}

fn cache() -> &'static JwksCache {
    static C: OnceLock<JwksCache> = OnceLock::new();
    C.get_or_init(|| JwksCache::new(&[]))
}

fn rules() -> &'static [Rule] {
    static R: OnceLock<Vec<Rule>> = OnceLock::new();
    R.get_or_init(|| vec![Rule::new(&rule_a(), cache()), Rule::new(&rule_b(), cache())])
}

fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("authenticate waited with static keys"),
    }
}

fn hmac(alg: ring::hmac::Algorithm, key: &[u8], msg: &[u8]) -> Vec<u8> {
    ring::hmac::sign(&ring::hmac::Key::new(alg, key), msg).as_ref().to_vec()
}

fn sign(h: &[u8], c: &[u8], hs512: bool) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(h), URL_SAFE_NO_PAD.encode(c));
    let sig = if hs512 { hmac(ring::hmac::HMAC_SHA512, HS512, input.as_bytes()) } else { hmac(ring::hmac::HMAC_SHA256, HS, input.as_bytes()) };
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// An accepted token must carry an HMAC of one of our secrets under its `alg`.
fn check_signature(token: &str) {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        panic!("accepted a token that is not three parts: {token:?}");
    };
    // The `alg` the verifier read (its header parser skips what it does not
    // need, e.g. a lone surrogate escape in another field).
    let header = jsonwebtoken::decode_header(token).expect("accepted token's header");
    let alg = match header.alg {
        jsonwebtoken::Algorithm::HS256 => ring::hmac::HMAC_SHA256,
        jsonwebtoken::Algorithm::HS384 => ring::hmac::HMAC_SHA384,
        jsonwebtoken::Algorithm::HS512 => ring::hmac::HMAC_SHA512,
        other => panic!("accepted a token with alg {other:?} without its private key: {token:?}"),
    };
    let sig = LENIENT.decode(s).expect("signature base64");
    let input = format!("{h}.{p}");
    assert!(
        [HS, HS512].iter().any(|k| hmac(alg, k, input.as_bytes()) == sig),
        "accepted a token whose signature is no HMAC of ours: {token:?}"
    );
}

fn check_claims(claims: &serde_json::Value, second_rule: bool) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let iss = claims.get("iss").and_then(|v| v.as_str());
    assert_eq!(iss, Some(if second_rule { OTHER_ISSUER } else { ISSUER }), "{claims}");
    if second_rule {
        let ok = |v: &serde_json::Value| v.as_str().is_some_and(|a| a == AUDIENCE || a == "other");
        let aud = claims.get("aud").expect("aud required");
        assert!(ok(aud) || aud.as_array().is_some_and(|a| a.iter().any(ok)), "aud {aud}");
    }
    if let Some(exp) = claims.get("exp") {
        assert!(exp.as_f64().is_some_and(|e| e + 61.0 > now), "exp {exp}");
    }
    if let Some(nbf) = claims.get("nbf") {
        assert!(nbf.as_f64().is_some_and(|n| n - 61.0 < now), "nbf {nbf}");
    }
    if let Some(iat) = claims.get("iat") {
        assert!(iat.as_f64().is_some_and(|i| i - 61.0 < now), "iat {iat}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let mut three = rest.splitn(3, |b| *b == 0);
    let (a, b, c) = (three.next().unwrap_or_default(), three.next().unwrap_or_default(), three.next().unwrap_or_default());
    let own_rules;
    let (rules, token): (&[Rule], String) = match ctl & 3 {
        0 => (rules(), String::from_utf8_lossy(rest).into_owned()),
        1 => (rules(), format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(a), URL_SAFE_NO_PAD.encode(b), URL_SAFE_NO_PAD.encode(c))),
        2 => (rules(), sign(a, b, ctl & 4 != 0)),
        _ => {
            // A JWKS of the input's own: parsed, its keys made, then used.
            let r = JwtRule { issuer: ISSUER.into(), jwks: Some(String::from_utf8_lossy(a).into_owned()), ..Default::default() };
            own_rules = [Rule::new(&r, cache())];
            let claims = format!(r#"{{"iss":"{ISSUER}","sub":"fuzz","exp":4102444800}}"#);
            let header = String::from_utf8_lossy(b);
            let header = if header.is_empty() { r#"{"alg":"HS256","kid":"hs"}"# } else { &header };
            (&own_rules[..], sign(header.as_bytes(), claims.as_bytes(), false))
        }
    };
    // The second rule reads its own header; a rule of the input's own reads the default one.
    let second = ctl & 8 != 0 && ctl & 3 != 3;
    let (name, value) = if second { ("x-jwt-assertion", token.clone()) } else { ("authorization", format!("Bearer {token}")) };
    let Ok(value) = http::HeaderValue::from_str(&value) else { return };
    let (mut parts, ()) = http::Request::builder().uri("/reviews/1").header(name, value).body(()).expect("request").into_parts();
    let readable = parts.headers.get(name).is_some_and(|v| v.to_str().is_ok());

    let result = now(authenticate(rules, &mut parts));
    match &result {
        Ok(None) => assert!(!readable, "a request with a token passed as tokenless"),
        Ok(Some(claims)) => {
            let own = ctl & 3 == 3;
            if !own {
                check_signature(token.trim());
            }
            check_claims(claims, second && !own);
            if !second && !own {
                // Rule A: the payload goes to its header, the token is removed.
                let p = parts.headers.get("x-jwt-payload").expect("payload header");
                let p: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p.as_bytes()).expect("base64")).expect("json");
                // The claims as JSON again (a number may come back 1 ulp off
                // through f64, so keys and the issuer are compared).
                let keys = |v: &serde_json::Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
                assert_eq!(keys(&p), keys(claims));
                assert_eq!(p.get("iss"), claims.get("iss"));
                assert!(parts.headers.get("authorization").is_none(), "token forwarded");
            }
        }
        Err(why) => assert!(!why.is_empty()),
    }
});
