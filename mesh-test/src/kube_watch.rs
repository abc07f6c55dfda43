//! [`KubeWatchApi`]: a **test double** of a Kubernetes API server's list
//! and watch, for testing watchers where no API server can run. It is not
//! a Kubernetes API server: it holds objects in memory by resource, keeps
//! one resourceVersion counter and an event history, and answers the
//! requests a client-go or kube-rs reflector makes.
//!
//! What it replays of the real server, on the wire:
//!
//! - HTTPS on `127.0.0.1` with a certificate from its own cluster CA,
//!   HTTP/1.1, bearer-token authentication (`401` `Status` otherwise);
//! - `GET /api/v1/RESOURCE` and `/apis/GROUP/VERSION/RESOURCE` (all
//!   namespaces): a `...List` with `metadata.resourceVersion` and the items
//!   without `kind`/`apiVersion`, as the server writes lists;
//! - `?watch=true&resourceVersion=RV`: a chunked stream of
//!   newline-delimited watch events `{"type":"ADDED|MODIFIED|DELETED",
//!   "object":{...}}` (objects with `kind` and `apiVersion`) for every change
//!   after RV, then live; `BOOKMARK` events carrying only
//!   `metadata.resourceVersion` when `allowWatchBookmarks=true`; the stream
//!   ends after `timeoutSeconds`;
//! - a watch from a resourceVersion older than the compacted history gets
//!   the `ERROR` event `410 Expired` ("too old resource version") and the
//!   stream ends, as after an etcd compaction; [`KubeWatchApi::expire`]
//!   compacts and ends every open watch that way, forcing a relist;
//! - `404 NotFound` `Status` for resources it does not serve (a CRD that is
//!   not installed).
//!
//! Tests change objects with [`KubeWatchApi::apply`] and
//! [`KubeWatchApi::delete`], which bump the resourceVersion and notify
//! watches. The objects come from fixtures
//! (`mesh-test/fixtures/kube-watch/*.json`) written in the shape of
//! `kubectl get -o json` output for Services, EndpointSlices, Pods and Nodes
//! (hand-written for these tests, not captured from a live cluster: none
//! can run here).

use crate::tls::TestCa;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::PrivateKeyDer;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

/// A resource the double serves: its path prefix, list kind and kind.
#[derive(Debug, Clone)]
struct Resource {
    /// `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`.
    path: String,
    api_version: String,
    kind: String,
}

/// One change, as a watch sends it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    path: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Oldest resourceVersion a watch may start from.
    compacted: u64,
    /// Per resource path: (namespace, name) -> object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Requests received: `METHOD PATH?QUERY`.
    received: Vec<String>,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running double; stopped when dropped.
pub struct KubeWatchApi {
    addr: SocketAddr,
    ca: TestCa,
    token: String,
    state: Shared,
    resources: Vec<Resource>,
    events: broadcast::Sender<Option<Change>>,
    dir: tempfile::TempDir,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

/// The resources served: core Services, Pods, Nodes; EndpointSlices.
fn resources() -> Vec<Resource> {
    [
        ("/api/v1/services", "v1", "Service"),
        ("/api/v1/pods", "v1", "Pod"),
        ("/api/v1/nodes", "v1", "Node"),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            "discovery.k8s.io/v1",
            "EndpointSlice",
        ),
    ]
    .into_iter()
    .map(|(p, v, k)| Resource {
        path: p.into(),
        api_version: v.into(),
        kind: k.into(),
    })
    .collect()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn full(s: String) -> Body {
    Full::new(Bytes::from(s)).boxed()
}

fn query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl KubeWatchApi {
    /// Starts the double with the fixtures loaded.
    pub async fn start() -> Self {
        let ca = TestCa::new();
        let leaf = ca.issue(&["127.0.0.1", "localhost"], None);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(leaf.chain.clone(), PrivateKeyDer::Pkcs8(leaf.key))
            .expect("API server certificate");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Kubernetes API double");
        let addr = l.local_addr().expect("address");
        let token = format!("fedmesh-test-{:016x}", fastrand::u64(..));
        let (events, _) = broadcast::channel(1024);
        let api = Self {
            addr,
            ca,
            token,
            state: Arc::default(),
            resources: resources(),
            events,
            dir: tempfile::tempdir().expect("kubeconfig directory"),
            tasks: Arc::default(),
        };
        for f in FIXTURES {
            let v: Value = serde_json::from_str(f).expect("fixture JSON");
            api.apply(v);
        }
        let ctx = Ctx {
            state: api.state.clone(),
            resources: api.resources.clone(),
            events: api.events.clone(),
            token: api.token.clone(),
        };
        let conns = api.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (ctx, acceptor) = (ctx.clone(), acceptor.clone());
                let conn = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let ctx = ctx.clone();
                        async move { Ok::<_, std::convert::Infallible>(ctx.handle(req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
                conns
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(conn.abort_handle());
            }
        });
        api.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(accept.abort_handle());
        api
    }

    /// A kubeconfig for this server with a token it accepts.
    pub fn kubeconfig(&self) -> PathBuf {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {ca}\nusers:\n- name: federation\n  user:\n    token: {token}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: federation\ncurrent-context: double\n",
            addr = self.addr,
            ca = STANDARD.encode(self.ca.pem.as_bytes()),
            token = self.token,
        );
        let path = self.dir.path().join("watch.kubeconfig");
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    fn resource_of(&self, obj: &Value) -> Resource {
        let (v, k) = (obj["apiVersion"].as_str(), obj["kind"].as_str());
        self.resources
            .iter()
            .find(|r| Some(r.api_version.as_str()) == v && Some(r.kind.as_str()) == k)
            .unwrap_or_else(|| panic!("the double does not serve {v:?} {k:?}"))
            .clone()
    }

    /// Creates or replaces an object (by apiVersion, kind, namespace,
    /// name): an ADDED or MODIFIED event with a new resourceVersion.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let r = self.resource_of(&obj);
        let key = (
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            obj["metadata"]["name"]
                .as_str()
                .expect("metadata.name")
                .to_string(),
        );
        let mut s = lock(&self.state);
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012x}"));
        }
        let existed = s
            .objects
            .entry(r.path.clone())
            .or_default()
            .insert(key, obj.clone())
            .is_some();
        let c = Change {
            rv,
            path: r.path,
            kind: if existed { "MODIFIED" } else { "ADDED" },
            object: obj,
        };
        s.history.push(c.clone());
        drop(s);
        let _ = self.events.send(Some(c));
        rv
    }

    /// Deletes an object: a DELETED event with its last state.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let r = self.resource_of(&json!({"apiVersion": api_version, "kind": kind}));
        let mut s = lock(&self.state);
        let Some(mut obj) = s
            .objects
            .get_mut(&r.path)
            .and_then(|m| m.remove(&(namespace.to_string(), name.to_string())))
        else {
            panic!("no {kind} {namespace}/{name} to delete");
        };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = Change {
            rv,
            path: r.path,
            kind: "DELETED",
            object: obj,
        };
        s.history.push(c.clone());
        drop(s);
        let _ = self.events.send(Some(c));
    }

    /// The current object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = self.resource_of(&json!({"apiVersion": api_version, "kind": kind}));
        lock(&self.state)
            .objects
            .get(&r.path)
            .and_then(|m| m.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }

    /// Compacts the history (as etcd does) and ends every open watch with
    /// `410 Expired`: clients must list again.
    pub fn expire(&self) {
        let mut s = lock(&self.state);
        s.compacted = s.rv + 1;
        s.history.clear();
        drop(s);
        let _ = self.events.send(None);
    }

    /// Requests received so far (`GET /api/v1/services?watch=true&...`).
    pub fn received(&self) -> Vec<String> {
        lock(&self.state).received.clone()
    }
}

impl Drop for KubeWatchApi {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            t.abort();
        }
    }
}

#[derive(Clone)]
struct Ctx {
    state: Shared,
    resources: Vec<Resource>,
    events: broadcast::Sender<Option<Change>>,
    token: String,
}

/// An object as a watch event carries it: with `kind` and `apiVersion`.
fn with_type(r: &Resource, o: &Value) -> Value {
    let mut o = o.clone();
    o["kind"] = json!(r.kind);
    o["apiVersion"] = json!(r.api_version);
    o
}

impl Ctx {
    fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let q = query(req.uri().query());
        lock(&self.state).received.push(format!(
            "{} {}{}",
            req.method(),
            path,
            req.uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        ));
        let authed = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {}", self.token));
        if !authed {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        let Some(r) = self.resources.iter().find(|r| r.path == path).cloned() else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        };
        if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
            self.watch(&r, &q)
        } else {
            self.list(&r)
        }
    }

    fn list(&self, r: &Resource) -> Response<Body> {
        let s = lock(&self.state);
        let items: Vec<Value> = s
            .objects
            .get(&r.path)
            .map(|m| {
                m.values()
                    .map(|o| {
                        let mut o = o.clone();
                        if let Some(m) = o.as_object_mut() {
                            m.remove("kind");
                            m.remove("apiVersion");
                        }
                        o
                    })
                    .collect()
            })
            .unwrap_or_default();
        let body = json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": r.api_version,
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        let mut resp = Response::new(full(body.to_string()));
        resp.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        resp
    }

    fn watch(&self, r: &Resource, q: &BTreeMap<String, String>) -> Response<Body> {
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(300), Duration::from_secs);
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(64);
        let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        let mut live = self.events.subscribe();
        let (backlog, gone, current) = {
            let s = lock(&self.state);
            let gone = from != 0 && from + 1 < s.compacted;
            let backlog: Vec<Change> = s
                .history
                .iter()
                .filter(|c| c.rv > from && c.path == r.path)
                .cloned()
                .collect();
            (backlog, gone, s.rv)
        };
        let r = r.clone();
        tokio::spawn(async move {
            if gone {
                let _ = tx
                    .send(line(json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {from} ({current})"),
                        "reason": "Expired", "code": 410}})))
                    .await;
                return;
            }
            let mut last = from;
            for c in backlog {
                last = c.rv;
                if tx
                    .send(line(
                        json!({"type": c.kind, "object": with_type(&r, &c.object)}),
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let end = tokio::time::sleep(timeout);
            tokio::pin!(end);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = &mut end => return,
                    _ = tick.tick(), if bookmarks => {
                        let rv = last.max(current);
                        let b = json!({"type": "BOOKMARK", "object": {
                            "kind": r.kind, "apiVersion": r.api_version,
                            "metadata": {"resourceVersion": rv.to_string()}}});
                        if tx.send(line(b)).await.is_err() { return; }
                    }
                    ev = live.recv() => match ev {
                        Ok(Some(c)) if c.path == r.path && c.rv > last => {
                            last = c.rv;
                            if tx.send(line(json!({"type": c.kind, "object": with_type(&r, &c.object)}))).await.is_err() {
                                return;
                            }
                        }
                        Ok(Some(_)) => {}
                        // Compacted: this watch's resourceVersion is gone.
                        Ok(None) | Err(_) => {
                            let _ = tx.send(line(json!({"type": "ERROR", "object": {
                                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": format!("too old resource version: {last}"),
                                "reason": "Expired", "code": 410}}))).await;
                            return;
                        }
                    }
                }
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// The fixtures (`kubectl get -o json` shapes, without
/// `managedFields`).
const FIXTURES: &[&str] = &[
    include_str!("../fixtures/kube-watch/node-a.json"),
    include_str!("../fixtures/kube-watch/node-b.json"),
    include_str!("../fixtures/kube-watch/service-reviews.json"),
    include_str!("../fixtures/kube-watch/service-internal.json"),
    include_str!("../fixtures/kube-watch/pod-reviews-1.json"),
    include_str!("../fixtures/kube-watch/pod-reviews-2.json"),
    include_str!("../fixtures/kube-watch/endpointslice-reviews.json"),
];
