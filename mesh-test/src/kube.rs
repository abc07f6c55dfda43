//! [`KubeApi`]: a **test double** of a Kubernetes API server's TokenReview
//! endpoint, for testing ServiceAccount attestation where no API server can
//! run. It is not a Kubernetes API server: it serves one resource and keeps
//! its tokens in a table.
//!
//! What it replays of the real server, on the wire:
//!
//! - HTTPS on `127.0.0.1` with a certificate from its own cluster CA (a
//!   [`TestCa`]), HTTP/1.1 and HTTP/2 (ALPN);
//! - authentication of the caller by `Authorization: Bearer <token>`, then
//!   authorization: an unknown caller gets a `v1` `Status` `401
//!   Unauthorized`; a caller without RBAC permission to create
//!   `tokenreviews` gets `403 Forbidden` with the API server's message
//!   (`tokenreviews.authentication.k8s.io is forbidden: User "..." cannot
//!   create resource "tokenreviews" in API group "authentication.k8s.io" at
//!   the cluster scope`);
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` taking a
//!   `TokenReview` (`apiVersion`/`kind` checked, `400 BadRequest` otherwise,
//!   and for an empty `spec.token`), answering `201 Created` with the
//!   `TokenReview` back: `apiVersion`, `kind`, `metadata`
//!   (`{"creationTimestamp":null}`), the `spec` as sent (token included, as
//!   the real server does), and `status`;
//! - `status` as the ServiceAccount token authenticator fills it: for a
//!   known token, `authenticated: true`, the `user` (username
//!   `system:serviceaccount:<ns>:<sa>`, uid, groups `system:serviceaccounts`,
//!   `system:serviceaccounts:<ns>`, `system:authenticated`, and the
//!   `authentication.kubernetes.io/credential-id` extra) and the `audiences`
//!   (the token's audiences intersected with `spec.audiences`, or with the
//!   API server's own audience when none is asked); for a token issued for
//!   other audiences, or an unknown one, `authenticated` left out (Go's
//!   `omitempty` on false), `user: {}` and `error` as the union
//!   authenticator writes it (`[invalid bearer token, token audiences
//!   ["other"] is invalid for the target audiences ["fedmesh"]]`,
//!   `[invalid bearer token, square/go-jose: error in cryptographic
//!   primitive, token lookup failed]`);
//! - `404 NotFound` and `405 MethodNotAllowed` `Status` objects for other
//!   paths and methods.
//!
//! Tokens are made by the double ([`KubeApi::service_account_token`],
//! [`KubeApi::user_token`]) and shaped like the real projected JWTs, but
//! their signature is random: the double looks them up, it does not verify
//! them. It records every request it received ([`KubeApi::received`]) and
//! writes kubeconfig files pointing at itself ([`KubeApi::kubeconfig`]).

use crate::tls::TestCa;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::PrivateKeyDer;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

/// The path TokenReviews are created at.
pub const TOKEN_REVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The API server's own audience: what a review with no `spec.audiences`
/// is checked against (`--api-audiences`, by default the issuer).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// The user the federation's own token authenticates as.
pub const FEDERATION_USER: &str = "system:serviceaccount:fedmesh:federation";

/// The error the real API server puts in `status.error` for a token no
/// authenticator recognises.
pub const INVALID_TOKEN_ERROR: &str =
    "[invalid bearer token, square/go-jose: error in cryptographic primitive, token lookup failed]";

/// One request the double received (whatever it answered).
#[derive(Debug, Clone)]
pub struct Received {
    /// `POST`, ...
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// The HTTP status it answered.
    pub answered: u16,
}

/// Who a token the double issued stands for.
#[derive(Debug, Clone)]
struct Issued {
    username: String,
    uid: String,
    groups: Vec<String>,
    extra: Value,
    audiences: Vec<String>,
}

#[derive(Default)]
struct State {
    /// Bearer tokens of callers of the API (the federation's), by token.
    callers: HashMap<String, String>,
    /// Users allowed to create tokenreviews (RBAC).
    reviewers: HashSet<String>,
    /// Tokens to review, by token.
    tokens: HashMap<String, Issued>,
    received: Vec<Received>,
    /// Answer reviews with this HTTP error (0: don't).
    fail_with: u16,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running double; stops when dropped (its kubeconfig files go too).
pub struct KubeApi {
    /// Where it listens.
    pub addr: SocketAddr,
    ca: TestCa,
    state: Shared,
    federation_token: String,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl KubeApi {
    /// Starts a double on a free loopback port, with its own cluster CA, a
    /// caller token for the federation (user [`FEDERATION_USER`], allowed
    /// to create tokenreviews) and a kubeconfig for it.
    pub async fn start() -> Self {
        let ca = TestCa::new();
        let leaf = ca.issue(&["127.0.0.1", "localhost", "kubernetes.default.svc"], None);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(leaf.chain.clone(), PrivateKeyDer::Pkcs8(leaf.key))
            .expect("API server certificate");
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Kubernetes API double");
        let addr = l.local_addr().expect("API double address");

        let federation_token = jwt(FEDERATION_USER, &[API_AUDIENCE]);
        let state: Shared = Arc::default();
        {
            let mut s = lock(&state);
            s.callers
                .insert(federation_token.clone(), FEDERATION_USER.to_string());
            s.reviewers.insert(FEDERATION_USER.to_string());
        }
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (st, conns) = (state.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (st, acceptor) = (st.clone(), acceptor.clone());
                let conn = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
                conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(conn.abort_handle());
            }
        });
        tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(accept.abort_handle());

        let dir = tempfile::tempdir().expect("kubeconfig directory");
        let mut api = Self {
            addr,
            ca,
            state,
            federation_token,
            dir,
            kubeconfig: PathBuf::new(),
            tasks,
        };
        api.kubeconfig = api.write_kubeconfig("federation", &api.federation_token.clone());
        api
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The cluster CA's certificate (PEM): what `certificate-authority-data` holds.
    pub fn ca_pem(&self) -> &str {
        &self.ca.pem
    }

    /// A kubeconfig with the federation's credentials: this server, its CA
    /// (`certificate-authority-data`), the federation's bearer token.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The federation's own bearer token (what [`KubeApi::kubeconfig`] holds).
    pub fn federation_token(&self) -> &str {
        &self.federation_token
    }

    /// Writes a kubeconfig for this server authenticating with `token`
    /// (e.g. one the server does not know, for `401`), named `name` in the
    /// double's directory. Returns its path.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        self.write_kubeconfig_trusting(name, token, &self.ca.pem)
    }

    /// [`KubeApi::write_kubeconfig`] with `ca_pem` as the cluster CA
    /// (another CA than the server's: the client must refuse the server).
    pub fn write_kubeconfig_trusting(&self, name: &str, token: &str, ca_pem: &str) -> PathBuf {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: double\n  \
               cluster:\n    \
                 server: {server}\n    \
                 certificate-authority-data: {ca}\n\
             users:\n\
             - name: {name}\n  \
               user:\n    \
                 token: {token}\n\
             contexts:\n\
             - name: double\n  \
               context:\n    \
                 cluster: double\n    \
                 user: {name}\n\
             current-context: double\n",
            server = self.url(),
            ca = STANDARD.encode(ca_pem.as_bytes()),
        );
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    /// Grants or revokes the federation's permission to create
    /// tokenreviews (its RBAC binding): revoked, reviews answer `403`.
    pub fn set_federation_may_review(&self, allowed: bool) {
        let mut s = lock(&self.state);
        if allowed {
            s.reviewers.insert(FEDERATION_USER.to_string());
        } else {
            s.reviewers.remove(FEDERATION_USER);
        }
    }

    /// Makes authorized reviews answer the `Status` the API server sends
    /// with HTTP `code` (500 `InternalError`, 429 `TooManyRequests`, 503
    /// `ServiceUnavailable`, 504 `Timeout`); 0 answers them again.
    pub fn fail_reviews_with(&self, code: u16) {
        lock(&self.state).fail_with = code;
    }

    /// A projected ServiceAccount token for `namespace`/`service_account`,
    /// valid for `audiences` (a pod's `serviceAccountToken` volume).
    pub fn service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
    ) -> String {
        let username = format!("system:serviceaccount:{namespace}:{service_account}");
        let token = jwt(&username, audiences);
        let issued = Issued {
            username,
            uid: uid(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            extra: json!({ "authentication.kubernetes.io/credential-id": [format!("JTI={}", uid())] }),
            audiences: audiences.iter().map(ToString::to_string).collect(),
        };
        lock(&self.state).tokens.insert(token.clone(), issued);
        token
    }

    /// A token of a person, not a ServiceAccount (e.g. from an OIDC
    /// authenticator), valid for `audiences`.
    pub fn user_token(&self, username: &str, audiences: &[&str]) -> String {
        let token = jwt(username, audiences);
        let issued = Issued {
            username: username.to_string(),
            uid: String::new(),
            groups: vec!["developers".into(), "system:authenticated".into()],
            extra: Value::Null,
            audiences: audiences.iter().map(ToString::to_string).collect(),
        };
        lock(&self.state).tokens.insert(token.clone(), issued);
        token
    }

    /// Every request received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state).received.clone()
    }

    /// Stops listening and closes every open connection (the API server
    /// going down); the kubeconfig files stay.
    pub fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A token shaped like a projected ServiceAccount JWT (RS256), with a random
/// signature.
fn jwt(subject: &str, audiences: &[&str]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = json!({ "alg": "RS256", "kid": "fedmesh-test-double" });
    let claims = json!({
        "aud": audiences,
        "exp": now + 3600,
        "iat": now,
        "iss": API_AUDIENCE,
        "jti": uid(),
        "nbf": now,
        "sub": subject,
    });
    let signature: Vec<u8> = (0..256).map(|_| fastrand::u8(..)).collect();
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// A random UUID (version 4) in text form.
fn uid() -> String {
    let b: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        h(0..4),
        h(4..6),
        &h(6..8)[1..],
        8 + (b[8] & 3),
        &h(8..10)[1..],
        h(10..16)
    )
}

/// Go's `%q` of a `[]string`: `["a" "b"]`.
fn go_quoted(v: &[String]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default())
        .collect();
    format!("[{}]", items.join(" "))
}

/// A `v1` `Status` failure, as the API server writes it.
fn status(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Full<Bytes>> {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    st: Shared,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes().to_vec())
        .unwrap_or_default();
    let header = |name: hyper::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut seen = Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string()),
        authorization: header(hyper::header::AUTHORIZATION),
        content_type: header(hyper::header::CONTENT_TYPE),
        version: format!("{:?}", parts.version),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        answered: 0,
    };
    let resp = answer(&st, &parts.method, parts.uri.path(), &seen);
    seen.answered = resp.status().as_u16();
    lock(&st).received.push(seen);
    Ok(resp)
}

fn answer(st: &Shared, method: &Method, path: &str, req: &Received) -> Response<Full<Bytes>> {
    // Authentication, then authorization, then the handler: the API
    // server's filter chain.
    let user = {
        let s = lock(st);
        req.authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .and_then(|t| s.callers.get(t.trim()).cloned())
    };
    let Some(user) = user else {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            None,
        );
    };
    let path = path.trim_end_matches('/');
    if path != TOKEN_REVIEWS_PATH {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        );
    }
    if method != Method::POST {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({ "group": "authentication.k8s.io", "kind": "tokenreviews" })),
        );
    }
    if !lock(st).reviewers.contains(&user) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "tokenreviews.authentication.k8s.io is forbidden: User \"{user}\" cannot create \
                 resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope"
            ),
            Some(json!({ "group": "authentication.k8s.io", "kind": "tokenreviews" })),
        );
    }
    let fail_with = lock(st).fail_with;
    if fail_with != 0 {
        let code = StatusCode::from_u16(fail_with).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (reason, message) = match code.as_u16() {
            429 => (
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "the server was unable to return a response in the time allotted, but may still be processing the request",
            ),
            _ => (
                "InternalError",
                "Internal error occurred: the authenticator is unavailable",
            ),
        };
        return status(code, reason, message, None);
    }
    let body = &req.body;
    if !body.is_object() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body of the request was in an unknown format - accepted media types include: \
             application/json, application/yaml, application/vnd.kubernetes.protobuf",
            None,
        );
    }
    if body["apiVersion"] != "authentication.k8s.io/v1" || body["kind"] != "TokenReview" {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!(
                "the API version in the data ({}) does not match the expected API version \
                 (authentication.k8s.io/v1) or the kind ({}) is not TokenReview",
                body["apiVersion"], body["kind"]
            ),
            None,
        );
    }
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    let token = spec["token"].as_str().unwrap_or_default();
    if token.is_empty() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "token is required for TokenReview in authentication",
            None,
        );
    }
    let mut requested: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if requested.is_empty() {
        requested = vec![API_AUDIENCE.to_string()];
    }
    let issued = lock(st).tokens.get(token).cloned();
    let review_status = match issued {
        None => json!({ "user": {}, "error": INVALID_TOKEN_ERROR }),
        Some(i) => {
            let auds: Vec<String> = i
                .audiences
                .iter()
                .filter(|a| requested.contains(a))
                .cloned()
                .collect();
            if auds.is_empty() {
                json!({
                    "user": {},
                    "error": format!(
                        "[invalid bearer token, token audiences {} is invalid for the target audiences {}]",
                        go_quoted(&i.audiences),
                        go_quoted(&requested)
                    ),
                })
            } else {
                let mut user = json!({ "username": i.username, "groups": i.groups });
                if !i.uid.is_empty() {
                    user["uid"] = json!(i.uid);
                }
                if !i.extra.is_null() {
                    user["extra"] = i.extra.clone();
                }
                json!({ "authenticated": true, "user": user, "audiences": auds })
            }
        }
    };
    respond(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": { "creationTimestamp": null },
            "spec": spec,
            "status": review_status,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_quoting_and_uids() {
        assert_eq!(go_quoted(&["a".into(), "b\"c".into()]), r#"["a" "b\"c"]"#);
        let u = uid();
        assert_eq!(u.len(), 36, "{u}");
        assert_eq!(&u[14..15], "4", "{u}");
    }
}
