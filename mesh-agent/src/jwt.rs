//! RequestAuthentication: JWTs checked at the destination's agent. A token
//! is looked for where the rules say (default `Authorization: Bearer` and
//! the `access_token` query parameter); a request without one passes, a
//! request with one that no rule validates is refused with 401.
//!
//! An issuer's keys come inline (`jwks`), from a file (`jwksUri: file://`,
//! read when the config changes) or over HTTPS (`jwksUri: https://`) through
//! the agent's [`JwksCache`]: one entry per URI, shared by every rule and
//! config version naming it, fetched as soon as a config names it, refreshed
//! on the server's `Cache-Control: max-age` (clamped to 5 min..24 h, 20 min
//! without one), refetched early (at most once per 30 s) for a token whose
//! `kid` it lacks, and keeping the last good keys when a refetch fails.

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{DecodingKey, Validation};
use mesh_core::policy as pol;
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Refresh interval when the JWKS server gives no `max-age` (Istio's default).
const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Shortest refresh interval, whatever `max-age` says.
const MIN_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Longest refresh interval, whatever `max-age` says.
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Requests trigger at most one fetch of a URI in this time (a token with
/// an unknown `kid`, or keys never fetched successfully).
const REQUEST_REFETCH: Duration = Duration::from_secs(30);
/// One fetch: connect, TLS, request and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS body accepted.
const MAX_BODY: usize = 1 << 20;
/// Clock skew allowed on `exp`, `nbf` and `iat`: Envoy jwt_authn's
/// `clock_skew_seconds` default.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// First retry after a failed fetch; doubles up to [`MIN_REFRESH`].
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// One issuer's rule, ready to check tokens.
#[derive(Debug, Clone)]
pub struct Rule {
    issuer: String,
    audiences: Vec<String>,
    keys: Keys,
    headers: Vec<(String, String)>,
    params: Vec<String>,
    output_payload_to_header: Option<String>,
    forward_original_token: bool,
}

/// Where a rule's keys are.
#[derive(Debug, Clone)]
enum Keys {
    /// Inline or from a file.
    Static(Arc<JwkSet>),
    /// Over HTTPS, through the cache.
    Remote(Arc<Entry>),
    /// None to be had, and why: every token of this issuer is refused.
    Missing(String),
}

impl Rule {
    /// Compiles a rule: parses inline keys, reads a `file://` JWKS now, and
    /// has `cache` fetch an `https://` one (in the background).
    pub fn new(r: &pol::JwtRule, cache: &JwksCache) -> Self {
        let keys = match (&r.jwks, &r.jwks_uri) {
            (Some(j), _) => match parse_jwks(j.as_bytes()) {
                Ok(k) => Keys::Static(Arc::new(k)),
                Err(e) => Keys::Missing(format!("jwks: {e:#}")),
            },
            (None, Some(u)) if u.starts_with("https://") => Keys::Remote(cache.entry(u)),
            (None, Some(u)) => match u.strip_prefix("file://") {
                Some(path) => match read_jwks_file(path) {
                    Ok(k) => Keys::Static(Arc::new(k)),
                    Err(e) => Keys::Missing(format!("jwksUri {u}: {e:#}")),
                },
                None if u.starts_with("http://") => Keys::Missing(format!(
                    "jwksUri {u}: plain http JWKS are never fetched; use https://"
                )),
                None => Keys::Missing(format!(
                    "jwksUri {u}: only https:// and file:// JWKS are supported"
                )),
            },
            (None, None) => Keys::Missing("neither jwks nor jwksUri is set".into()),
        };
        if let Keys::Missing(why) = &keys {
            warn!(issuer = %r.issuer, %why, "no usable JWKS for this issuer; its tokens are refused");
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

    /// The token's claims if it is this rule's issuer's and valid. Waits
    /// for the issuer's JWKS when it has not been fetched yet, or lacks the
    /// token's `kid` (bounded by the fetch timeout).
    async fn verify(&self, token: &str) -> Result<serde_json::Value, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let (keys, note) = match &self.keys {
            Keys::Static(k) => (k.clone(), None),
            Keys::Remote(e) => e
                .keys_for(header.kid.as_deref())
                .await
                .map_err(|why| format!("no keys for issuer {}: {why}", self.issuer))?,
            Keys::Missing(why) => return Err(format!("no keys for issuer {}: {why}", self.issuer)),
        };
        let candidates: Vec<&Jwk> = match &header.kid {
            Some(kid) => keys.find(kid).into_iter().collect(),
            None => keys.keys.iter().collect(),
        };
        // As Envoy's jwt_authn: `exp` and `nbf` honoured when present with
        // the clock skew, `aud` required when the rule names audiences.
        let mut validation = Validation::new(header.alg);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[self.issuer.as_str()]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
            validation.set_required_spec_claims(&["iss"]);
        } else {
            validation.set_audience(&self.audiences);
            validation.set_required_spec_claims(&["iss", "aud"]);
        }
        let mut last = match &header.kid {
            Some(kid) => format!("no key with kid {kid:?} in the JWKS of {}", self.issuer),
            None => "no key matches the token".to_string(),
        };
        if let Some(n) = note {
            last = format!("{last} ({n})");
        }
        for jwk in candidates {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
                Ok(d) => return check_times(d.claims),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

/// The time claims as Envoy's jwt_authn reads them: `exp`, `nbf` and `iat`,
/// when present, must be non-negative numbers (a string or a negative
/// `exp` is refused, never read as "no expiry"), and hold with the clock
/// skew. jsonwebtoken checks `exp` and `nbf` only when it can read them as
/// unsigned integers, so every form is checked here too.
fn check_times(claims: serde_json::Value) -> Result<serde_json::Value, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let skew = CLOCK_SKEW.as_secs_f64();
    for (name, ok, why) in [
        (
            "exp",
            (|t: f64, now: f64, skew: f64| t + skew > now) as fn(f64, f64, f64) -> bool,
            "ExpiredSignature: the token has expired (exp)",
        ),
        (
            "nbf",
            |t, now, skew| t - skew <= now,
            "ImmatureSignature: the token is not valid yet (nbf)",
        ),
        (
            "iat",
            |t, now, skew| t - skew <= now,
            "the token is issued in the future (iat)",
        ),
    ] {
        let Some(v) = claims.get(name) else { continue };
        let Some(t) = v.as_f64().filter(|t| t.is_finite() && *t >= 0.0) else {
            return Err(format!("{name} is not a number of seconds since 1970"));
        };
        if !ok(t, now, skew) {
            return Err(why.into());
        }
    }
    Ok(claims)
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
/// `Ok(Some(claims))` with a valid one (after applying the rule's
/// `outputPayloadToHeader` and `forwardOriginalToken`; AuthorizationPolicy
/// reads the principal `iss/sub` and the claims from them), `Err(why)`
/// otherwise. Waits (at most about the JWKS fetch timeout) when the
/// issuer's keys are being fetched.
pub async fn authenticate(
    rules: &[Rule],
    parts: &mut http::request::Parts,
) -> Result<Option<serde_json::Value>, String> {
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
        match r.verify(&token).await {
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
                return Ok(Some(claims));
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

/// A JWKS document's usable keys: those jsonwebtoken understands (others,
/// e.g. of an unknown `kty`, are skipped); an error without any.
fn parse_jwks(body: &[u8]) -> anyhow::Result<JwkSet> {
    let doc: serde_json::Value = serde_json::from_slice(body).context("not JSON")?;
    let Some(raw) = doc.get("keys").and_then(serde_json::Value::as_array) else {
        anyhow::bail!("not a JWKS: no \"keys\" array");
    };
    let keys: Vec<Jwk> = raw
        .iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .filter(|k| DecodingKey::from_jwk(k).is_ok())
        .collect();
    if keys.is_empty() {
        anyhow::bail!("no usable key among its {} keys", raw.len());
    }
    Ok(JwkSet { keys })
}

/// Reads a `file://` JWKS, at most [`MAX_BODY`] bytes (a policy may name
/// any path, `/dev/zero` included).
fn read_jwks_file(path: &str) -> anyhow::Result<JwkSet> {
    use std::io::Read as _;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BODY as u64 + 1).read_to_end(&mut text))
        .with_context(|| format!("read {path}"))?;
    if text.len() > MAX_BODY {
        anyhow::bail!("{path}: larger than {MAX_BODY} bytes");
    }
    parse_jwks(&text)
}

/// How long fetched keys are used before the next refresh: the answer's
/// `Cache-Control` `max-age` clamped to 5 min..24 h, 20 min without one.
fn refresh_interval(cache_control: Option<&str>) -> Duration {
    let max_age = cache_control.and_then(|v| {
        v.split(',').find_map(|d| {
            let (k, v) = d.split_once('=')?;
            if !k.trim().eq_ignore_ascii_case("max-age") {
                return None;
            }
            let v = v.trim().trim_matches('"');
            match v.parse::<u64>() {
                Ok(s) => Some(s),
                // Digits too many for u64: as long as can be.
                Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => Some(u64::MAX),
                Err(_) => None,
            }
        })
    });
    match max_age {
        Some(s) => Duration::from_secs(s).clamp(MIN_REFRESH, MAX_REFRESH),
        None => DEFAULT_REFRESH,
    }
}

/// The retry delay after `failures` consecutive failed fetches.
fn retry_after(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1)))
        .min(MIN_REFRESH)
}

/// JWKS fetched over HTTPS, cached per URI for the whole agent: every rule
/// (of every config version) naming a URI shares its entry, which lives as
/// long as some rule names it.
#[derive(Debug, Clone)]
pub struct JwksCache {
    tls: Result<Arc<rustls::ClientConfig>, String>,
    entries: Arc<Mutex<HashMap<String, Weak<Entry>>>>,
}

impl JwksCache {
    /// A cache whose fetches trust the webpki roots and `extra`
    /// (`--jwks-ca`).
    pub fn new(extra: &[CertificateDer<'static>]) -> Self {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let (_, ignored) = roots.add_parsable_certificates(extra.iter().cloned());
        if ignored > 0 {
            warn!(
                ignored,
                "some --jwks-ca certificates are not usable trust anchors"
            );
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
        .map_err(|e| format!("TLS client for JWKS fetches: {e}"));
        Self {
            tls,
            entries: Arc::default(),
        }
    }

    /// The entry of `uri`; a new one starts fetching at once (in the
    /// background, when a runtime is there).
    fn entry(&self, uri: &str) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get(uri).and_then(Weak::upgrade) {
            return e;
        }
        entries.retain(|_, e| e.strong_count() > 0);
        let e = Arc::new(Entry {
            uri: uri.to_string(),
            tls: self.tls.clone(),
            state: Mutex::new(State {
                keys: None,
                error: None,
                attempts: 0,
                failures: 0,
                next_refresh: Instant::now(),
                last_request_fetch: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        });
        entries.insert(uri.to_string(), Arc::downgrade(&e));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(refresh_forever(Arc::downgrade(&e)));
            }
            Err(_) => debug!(%uri, "no runtime: JWKS fetched on first use"),
        }
        e
    }
}

/// One URI's keys.
#[derive(Debug)]
struct Entry {
    uri: String,
    tls: Result<Arc<rustls::ClientConfig>, String>,
    state: Mutex<State>,
    /// Held while fetching: one fetch at a time, and a request can wait
    /// for the one under way.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct State {
    /// The last good keys.
    keys: Option<Arc<JwkSet>>,
    /// Why the last fetch failed (cleared by a success).
    error: Option<String>,
    /// Fetches finished, good or not.
    attempts: u64,
    /// Fetches failed in a row.
    failures: u32,
    /// When the background task fetches next.
    next_refresh: Instant,
    /// When a request last triggered a fetch.
    last_request_fetch: Option<Instant>,
}

/// Who asks for a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The background refresh.
    Schedule,
    /// A request (keys never fetched, or an unknown `kid`): rate-limited.
    Request,
}

impl Entry {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keys for a token with `kid`, with a note on the last failed fetch
    /// when the keys in use are older than it. Fetches (or waits for the
    /// fetch under way) when there are no keys yet or `kid` is not among
    /// them, at most once per [`REQUEST_REFETCH`] unless nothing was ever
    /// fetched.
    async fn keys_for(
        self: &Arc<Self>,
        kid: Option<&str>,
    ) -> Result<(Arc<JwkSet>, Option<String>), String> {
        let seen = {
            let s = self.state();
            match &s.keys {
                Some(k) if kid.is_none_or(|kid| k.find(kid).is_some()) => {
                    return Ok((k.clone(), None));
                }
                // An unknown kid, and a refetch too recent: no wait.
                Some(k) if s.request_fetch_too_soon() => {
                    return Ok((k.clone(), s.error.clone()));
                }
                _ => s.attempts,
            }
        };
        // The fetch runs as its own task: it finishes (and is cached) even
        // if this request gives up or goes away.
        let me = self.clone();
        let fetch = tokio::spawn(async move { me.fetch_if(seen, Trigger::Request).await });
        if tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), fetch)
            .await
            .is_err()
        {
            debug!(uri = %self.uri, "gave up waiting for the JWKS fetch");
        }
        let s = self.state();
        match (&s.keys, &s.error) {
            (Some(k), e) => Ok((k.clone(), e.clone())),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err(format!("JWKS {}: not fetched yet", self.uri)),
        }
    }

    /// Fetches unless another fetch finished since the caller saw
    /// `seen` attempts (then this waits for that one instead), or a
    /// request-triggered fetch is rate-limited.
    async fn fetch_if(&self, seen: u64, trigger: Trigger) {
        let _one_at_a_time = self.fetching.lock().await;
        {
            let mut s = self.state();
            if s.attempts != seen {
                return;
            }
            if trigger == Trigger::Request && s.attempts > 0 {
                if s.request_fetch_too_soon() {
                    return;
                }
                s.last_request_fetch = Some(Instant::now());
            }
        }
        let result = fetch(&self.tls, &self.uri).await;
        let now = Instant::now();
        let mut s = self.state();
        s.attempts += 1;
        match result {
            Ok((keys, ttl)) => {
                info!(uri = %self.uri, keys = keys.keys.len(), refresh_in = ?ttl, ?trigger, "JWKS fetched");
                s.keys = Some(Arc::new(keys));
                s.error = None;
                s.failures = 0;
                s.next_refresh = now + ttl;
            }
            Err(e) => {
                let why = format!("{e:#}");
                s.failures = s.failures.saturating_add(1);
                let retry = retry_after(s.failures);
                s.next_refresh = now + retry;
                if s.keys.is_some() {
                    warn!(uri = %self.uri, error = %why, retry_in = ?retry, "JWKS refetch failed; keeping the last good keys");
                } else {
                    warn!(uri = %self.uri, error = %why, retry_in = ?retry, "JWKS fetch failed; tokens of its issuer are refused until one succeeds");
                }
                s.error = Some(why);
            }
        }
    }
}

impl State {
    fn request_fetch_too_soon(&self) -> bool {
        self.last_request_fetch
            .is_some_and(|t| t.elapsed() < REQUEST_REFETCH)
    }
}

/// Fetches an entry now, then whenever its keys are due, until no rule
/// names it any more.
async fn refresh_forever(entry: Weak<Entry>) {
    // The first fetch is this task's unless a request already made one.
    let mut seen = Some(0);
    loop {
        let due = {
            let Some(e) = entry.upgrade() else {
                return;
            };
            let due = e.state().next_refresh;
            if due <= Instant::now() {
                let at = seen.take().unwrap_or_else(|| e.state().attempts);
                e.fetch_if(at, Trigger::Schedule).await;
                continue;
            }
            due
        };
        tokio::time::sleep_until(due).await;
    }
}

/// Ends a spawned task when dropped (a fetch given up).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// GETs a JWKS over HTTPS within [`FETCH_TIMEOUT`]: its usable keys and how
/// long to keep them. Every error names the URI and what went wrong.
async fn fetch(
    tls: &Result<Arc<rustls::ClientConfig>, String>,
    uri: &str,
) -> anyhow::Result<(JwkSet, Duration)> {
    let result = match tls {
        Ok(tls) => match tokio::time::timeout(FETCH_TIMEOUT, get(tls.clone(), uri)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "no answer within {}s",
                FETCH_TIMEOUT.as_secs()
            )),
        },
        Err(e) => Err(anyhow::anyhow!("{e}")),
    };
    result.with_context(|| format!("JWKS {uri}"))
}

async fn get(tls: Arc<rustls::ClientConfig>, uri: &str) -> anyhow::Result<(JwkSet, Duration)> {
    use http::header;
    let u: http::Uri = uri.parse().context("not a URI")?;
    if u.scheme_str() != Some("https") {
        anyhow::bail!("only https:// is fetched");
    }
    let authority = u.authority().context("no host")?.clone();
    let host = authority.host();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(443);
    let name = ServerName::try_from(bare.to_string())
        .with_context(|| format!("{bare:?} is not a server name"))?;
    let tcp = tokio::net::TcpStream::connect((bare, port))
        .await
        .with_context(|| format!("connect to {authority}"))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {authority}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = http::Request::get(u.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority.as_str())
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "fedmesh-agent")
        .body(http_body_util::Empty::<Bytes>::new())
        .context("build the request")?;
    let resp = send.send_request(req).await.context("send the request")?;
    let status = resp.status();
    if status != http::StatusCode::OK {
        anyhow::bail!("answered HTTP {status}, not 200");
    }
    let too_long = || format!("body larger than {MAX_BODY} bytes");
    if resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        anyhow::bail!(too_long());
    }
    let cache_control = resp
        .headers()
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let ttl = refresh_interval(Some(cache_control.as_str()).filter(|c| !c.is_empty()));
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                anyhow::anyhow!(too_long())
            } else {
                anyhow::anyhow!("read the body: {e}")
            }
        })?
        .to_bytes();
    let keys = parse_jwks(&body)?;
    Ok((keys, ttl))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn max_age_is_read_and_clamped() {
        let min = |m: u64| Duration::from_secs(m * 60);
        assert_eq!(refresh_interval(None), min(20), "no header: Istio's 20 min");
        assert_eq!(refresh_interval(Some("public")), min(20), "no max-age");
        assert_eq!(refresh_interval(Some("max-age=3600")), min(60));
        assert_eq!(
            refresh_interval(Some("public, MAX-AGE=\"900\", must-revalidate")),
            min(15),
            "case, quotes and other directives"
        );
        assert_eq!(refresh_interval(Some("max-age=0")), min(5), "clamped up");
        assert_eq!(refresh_interval(Some("no-store, max-age=10")), min(5));
        assert_eq!(
            refresh_interval(Some("max-age=604800")),
            min(24 * 60),
            "clamped down"
        );
        assert_eq!(
            refresh_interval(Some("max-age=99999999999999999999999")),
            min(24 * 60),
            "too many digits: the longest"
        );
        assert_eq!(
            refresh_interval(Some("s-maxage=60, max-age=600")),
            min(10),
            "s-maxage is not max-age"
        );
        assert_eq!(refresh_interval(Some("max-age=soon")), min(20), "junk");
        assert_eq!(refresh_interval(Some("max-age=-5")), min(20), "negative");
    }

    #[test]
    fn retries_back_off_up_to_the_shortest_refresh() {
        assert_eq!(retry_after(1), Duration::from_secs(1));
        assert_eq!(retry_after(2), Duration::from_secs(2));
        assert_eq!(retry_after(5), Duration::from_secs(16));
        assert_eq!(retry_after(40), MIN_REFRESH);
        assert_eq!(retry_after(u32::MAX), MIN_REFRESH);
    }

    #[test]
    fn jwks_parsing_skips_unusable_keys_and_names_problems() {
        let ec = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "a",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"});
        let odd = serde_json::json!({"kty": "OKP?", "kid": "b"});
        let k = parse_jwks(
            serde_json::json!({"keys": [odd, ec]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(k.keys.len(), 1);
        assert!(k.find("a").is_some());
        for (body, want) in [
            ("{", "not JSON"),
            ("{\"k\": 1}", "no \"keys\" array"),
            (
                "{\"keys\": [{\"kty\": \"nope\"}]}",
                "no usable key among its 1 keys",
            ),
        ] {
            let e = format!("{:#}", parse_jwks(body.as_bytes()).unwrap_err());
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn unsupported_jwks_uris_are_refused_with_a_reason() {
        let cache = JwksCache::new(&[]);
        for (uri, want) in [
            ("http://keys.example/jwks", "plain http"),
            ("ftp://keys.example/jwks", "only https:// and file://"),
            (
                "file:///nonexistent/jwks.json",
                "read /nonexistent/jwks.json",
            ),
            // Any path may be named: an endless one is read up to the bound.
            ("file:///dev/zero", "larger than 1048576 bytes"),
        ] {
            let r = Rule::new(
                &pol::JwtRule {
                    issuer: "https://a.example".into(),
                    jwks_uri: Some(uri.into()),
                    ..Default::default()
                },
                &cache,
            );
            match &r.keys {
                Keys::Missing(why) => assert!(why.contains(want), "{uri}: {why}"),
                k => panic!("{uri}: {k:?}"),
            }
        }
    }

    /// The tokens Envoy's jwt_authn refuses (and some it takes), against a
    /// rule with `audiences: [api]` and one without audiences.
    #[tokio::test]
    async fn tokens_are_judged_as_envoy_jwt_authn_does() {
        use base64::Engine as _;
        let key = rcgen::KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]})
        .to_string();
        let signer =
            jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let sign = |claims: serde_json::Value| {
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            h.kid = Some("k1".into());
            jsonwebtoken::encode(&h, &claims, &signer).unwrap()
        };
        let cache = JwksCache::new(&[]);
        let rule = |aud: &[&str]| {
            Rule::new(
                &pol::JwtRule {
                    issuer: "https://issuer.example".into(),
                    audiences: aud.iter().map(ToString::to_string).collect(),
                    jwks: Some(jwks.clone()),
                    ..Default::default()
                },
                &cache,
            )
        };
        let (with_aud, without_aud) = (rule(&["api"]), rule(&[]));
        #[allow(clippy::cast_possible_wrap)]
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let iss = "https://issuer.example";
        let cases = [
            // (what, claims, with audiences [api], without audiences)
            (
                "valid",
                serde_json::json!({"iss": iss, "sub": "u", "aud": "api", "exp": now + 600}),
                None,
                None,
            ),
            (
                "aud in a list",
                serde_json::json!({"iss": iss, "aud": ["x", "api"]}),
                None,
                None,
            ),
            (
                "no exp (Envoy takes it)",
                serde_json::json!({"iss": iss, "aud": "api"}),
                None,
                None,
            ),
            (
                "no aud",
                serde_json::json!({"iss": iss, "exp": now + 600}),
                Some("aud"),
                None,
            ),
            (
                "another aud",
                serde_json::json!({"iss": iss, "aud": "web"}),
                Some("InvalidAudience"),
                None,
            ),
            (
                "expired",
                serde_json::json!({"iss": iss, "aud": "api", "exp": now - 3600}),
                Some("ExpiredSignature"),
                Some("ExpiredSignature"),
            ),
            (
                "expired within the skew",
                serde_json::json!({"iss": iss, "aud": "api", "exp": now - 30}),
                None,
                None,
            ),
            (
                "nbf an hour ahead",
                serde_json::json!({"iss": iss, "aud": "api", "nbf": now + 3600}),
                Some("ImmatureSignature"),
                Some("ImmatureSignature"),
            ),
            (
                "nbf within the skew",
                serde_json::json!({"iss": iss, "aud": "api", "nbf": now + 30}),
                None,
                None,
            ),
            (
                "iat an hour ahead",
                serde_json::json!({"iss": iss, "aud": "api", "iat": now + 3600}),
                Some("issued in the future"),
                Some("issued in the future"),
            ),
            (
                "iat not a number",
                serde_json::json!({"iss": iss, "aud": "api", "iat": "soon"}),
                Some("not a number"),
                Some("not a number"),
            ),
            // Found by the jwt_header fuzz target: jsonwebtoken skipped an
            // `exp` or `nbf` it could not read as an unsigned integer.
            (
                "exp a string",
                serde_json::json!({"iss": iss, "aud": "api", "exp": "never"}),
                Some("exp is not a number"),
                Some("exp is not a number"),
            ),
            (
                "exp negative",
                serde_json::json!({"iss": iss, "aud": "api", "exp": -5}),
                Some("exp is not a number"),
                Some("exp is not a number"),
            ),
            (
                "exp a fraction in the past",
                serde_json::json!({"iss": iss, "aud": "api", "exp": (now as f64) - 3600.5}),
                Some("ExpiredSignature"),
                Some("ExpiredSignature"),
            ),
            (
                "nbf a string",
                serde_json::json!({"iss": iss, "aud": "api", "nbf": "now"}),
                Some("nbf is not a number"),
                Some("nbf is not a number"),
            ),
            (
                "nbf a fraction an hour ahead",
                serde_json::json!({"iss": iss, "aud": "api", "nbf": (now as f64) + 3600.5}),
                Some("ImmatureSignature"),
                Some("ImmatureSignature"),
            ),
            (
                "another issuer",
                serde_json::json!({"iss": "https://evil.example", "aud": "api"}),
                Some("InvalidIssuer"),
                Some("InvalidIssuer"),
            ),
        ];
        for (what, claims, want_aud, want_plain) in cases {
            let t = sign(claims);
            for (r, want) in [(&with_aud, want_aud), (&without_aud, want_plain)] {
                let got = r.verify(&t).await;
                match (want, &got) {
                    (None, Ok(_)) => {}
                    (Some(w), Err(e)) => assert!(e.contains(w), "{what}: {e} (wanted {w})"),
                    _ => panic!(
                        "{what} (audiences {:?}): {got:?}, wanted {want:?}",
                        r.audiences
                    ),
                }
            }
        }
        // A token not signed by the issuer's key.
        let other = rcgen::KeyPair::generate().unwrap();
        let forged = {
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            h.kid = Some("k1".into());
            let k =
                jsonwebtoken::EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
            jsonwebtoken::encode(&h, &serde_json::json!({"iss": iss, "aud": "api"}), &k).unwrap()
        };
        assert!(with_aud
            .verify(&forged)
            .await
            .unwrap_err()
            .contains("InvalidSignature"));
    }

    #[tokio::test]
    async fn rules_naming_one_uri_share_its_entry() {
        let cache = JwksCache::new(&[]);
        let rule = |iss: &str| pol::JwtRule {
            issuer: iss.into(),
            // Nothing listens there: the fetch fails at once.
            jwks_uri: Some("https://127.0.0.1:9/jwks.json".into()),
            ..Default::default()
        };
        let a = Rule::new(&rule("https://a.example"), &cache);
        let b = Rule::new(&rule("https://b.example"), &cache);
        let (Keys::Remote(ea), Keys::Remote(eb)) = (&a.keys, &b.keys) else {
            panic!("{a:?} {b:?}");
        };
        assert!(Arc::ptr_eq(ea, eb));
        let err = ea.keys_for(Some("k")).await.unwrap_err();
        assert!(
            err.contains("JWKS https://127.0.0.1:9/jwks.json: connect to 127.0.0.1:9"),
            "{err}"
        );
        drop((a, b));
        let again = Rule::new(&rule("https://a.example"), &cache);
        assert!(matches!(again.keys, Keys::Remote(_)));
        assert_eq!(
            cache.entries.lock().unwrap().len(),
            1,
            "dead entries are dropped"
        );
    }
}
