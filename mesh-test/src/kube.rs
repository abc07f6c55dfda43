//! [`KubeApi`]: a **test double** of a Kubernetes API server, for testing
//! the federation's Kubernetes clients (ServiceAccount attestation through
//! TokenReviews; discovery and custom-resource watchers) where no API
//! server can run. **It is not a Kubernetes API server**: it has no etcd,
//! no admission chain, no schema validation, no defaulting, no
//! controllers, no discovery documents; it keeps objects in memory and
//! replays the API server's wire behaviour for the requests below, which
//! the tests make with the real `kube` client.
//!
//! # What it replays, on the wire
//!
//! Transport and authentication, for every request:
//!
//! - HTTPS on `127.0.0.1` with a certificate from its own cluster CA (a
//!   [`TestCa`]), HTTP/1.1 and HTTP/2 (ALPN), kubeconfigs pointing at it
//!   ([`KubeApi::kubeconfig`]);
//! - authentication by `Authorization: Bearer <token>` (an unknown caller
//!   gets a `v1` `Status` `401 Unauthorized`), then authorization: a
//!   caller denied gets `403 Forbidden` with the RBAC authorizer's message
//!   (`services is forbidden: User "..." cannot list resource "services"
//!   in API group "" at the cluster scope`, `... in the namespace "ns"`,
//!   `trafficweights.fedmesh.io "x" is forbidden: ... cannot patch
//!   resource "trafficweights/status" ...`) and `details`. The federation's
//!   token may do everything unless [`KubeApi::set_federation_rules`]
//!   narrows it to an allow-list.
//!
//! TokenReviews (`POST /apis/authentication.k8s.io/v1/tokenreviews`):
//!
//! - the `TokenReview` checked (`apiVersion`/`kind`, `400 BadRequest`
//!   otherwise and for an empty `spec.token`), answered `201 Created` with
//!   `apiVersion`, `kind`, `metadata` (`{"creationTimestamp":null}`), the
//!   `spec` as sent (token included, as the real server does), and `status`
//!   as the ServiceAccount token authenticator fills it: for a known token
//!   `authenticated: true`, the `user` (username
//!   `system:serviceaccount:<ns>:<sa>`, uid, groups `system:serviceaccounts`,
//!   `system:serviceaccounts:<ns>`, `system:authenticated`, the
//!   `authentication.kubernetes.io/credential-id` extra) and the `audiences`
//!   (the token's intersected with `spec.audiences`, or with the API
//!   server's own audience when none is asked); for a token issued for
//!   other audiences, or an unknown one, `authenticated` left out (Go's
//!   `omitempty` on false), `user: {}` and `error` as the union
//!   authenticator writes it (`[invalid bearer token, token audiences
//!   ["other"] is invalid for the target audiences ["fedmesh"]]`,
//!   `[invalid bearer token, square/go-jose: error in cryptographic
//!   primitive, token lookup failed]`); creating them needs its own RBAC
//!   grant ([`KubeApi::set_federation_may_review`]); `405` for other methods.
//!
//! Resources (everything else): core/v1 `namespaces`, `nodes` (cluster
//! scoped), `services`, `pods`, `events`; `discovery.k8s.io/v1`
//! `endpointslices`; the custom resources `multicluster.x-k8s.io/v1alpha1`
//! `serviceexports`, `networking.istio.io/v1` `virtualservices`,
//! `destinationrules`, `sidecars` (also served as `v1beta1`, `v1alpha3`),
//! `security.istio.io/v1` `authorizationpolicies`, `peerauthentications`,
//! `requestauthentications` (also `v1beta1`), `fedmesh.io/v1`
//! `trafficweights`; more with [`KubeApi::serve_resource`], fewer (a CRD
//! not installed: `404`) with [`KubeApi::remove_resource`]. For them:
//!
//! - one store: objects per resource by (namespace, name), a single
//!   resourceVersion counter for all writes (a string of an integer, as
//!   etcd's revision), `metadata.resourceVersion` set on every write,
//!   `uid`, `creationTimestamp` and (where the real server keeps one:
//!   custom resources, EndpointSlices) `generation` filled in on create,
//!   the generation bumped when anything but metadata and status changes;
//!   a write that changes nothing is not written (no new resourceVersion,
//!   no event), as the API server skips no-op updates;
//! - LIST (`GET /api/v1/services`, `/api/v1/namespaces/NS/services`,
//!   `/apis/GROUP/VERSION/[namespaces/NS/]PLURAL`):
//!   `{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"N"},"items":[...]}`,
//!   items of built-in resources without `kind`/`apiVersion` (as the real
//!   server's typed lists), items of custom resources with them (as its
//!   unstructured lists); `limit` + `continue` pagination with the real
//!   token format (base64 of `{"v":"meta.k8s.io/v1","rv":N,"start":"KEY\u0000"}`),
//!   every page a consistent snapshot at the first page's resourceVersion
//!   (rebuilt from the history), `remainingItemCount` when nothing filters,
//!   `410 Expired` with the API server's message for a token older than a
//!   compaction; [`KubeApi::set_page_size`] caps pages below `limit` (the
//!   real server serves `resourceVersion=0` lists from its cache, where
//!   `limit` may be ignored: the double always pages);
//!   `labelSelector` (`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`,
//!   `a notin (x,y)`), `fieldSelector` (`path=v`, `path!=v`: any dotted
//!   path of the object, e.g. `metadata.name`, `spec.nodeName`; the real
//!   server supports only a few fields per resource); `resourceVersion`
//!   unset or `0` (the latest), `N` with `resourceVersionMatch`
//!   `NotOlderThan` (the latest; `504 Timeout` "Too large resource
//!   version" for a future one) or `Exact` (the snapshot at N; `410` when
//!   compacted);
//! - WATCH (`?watch=true` or `watch=1`): a chunked `application/json`
//!   stream of newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{...}}`
//!   (objects with `kind`/`apiVersion`); from `resourceVersion=N` every
//!   change after N in order, then live changes; from `0` or unset, ADDED
//!   for every current object first; with `sendInitialEvents=true` (which
//!   needs `resourceVersionMatch=NotOlderThan` and `allowWatchBookmarks`,
//!   `422 Invalid` otherwise) those ADDED then a BOOKMARK annotated
//!   `k8s.io/initial-events-end: "true"`; with selectors, a change moving
//!   an object out of the selection is DELETED (its previous state at the
//!   new resourceVersion) and into it ADDED, as the watch cache filters;
//!   with `allowWatchBookmarks=true`, BOOKMARKs
//!   (`{"kind":"Service","apiVersion":"v1","metadata":{"resourceVersion":"N"}}`)
//!   every [`KubeApi::set_bookmark_interval`] (1 s by default) and on
//!   [`KubeApi::send_bookmarks`]; the stream ends after `timeoutSeconds`;
//! - compaction ([`KubeApi::expire_history`]): a watch from an older
//!   resourceVersion is answered `200` with one event
//!   `{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 5 (12)","reason":"Expired","code":410}}`
//!   and the stream ends, as the watch cache does; open watches go on (as
//!   etcd's do) unless [`KubeApi::expire_watches`] sends them that ERROR;
//!   [`KubeApi::drop_watches`] cuts every open watch mid-stream (the
//!   connection closes; clients watch again from their last
//!   resourceVersion), [`KubeApi::end_watches`] ends them as a timeout;
//!   the history is also bounded ([`KubeApi::set_history_limit`]);
//! - GET of one object (`.../PLURAL/NAME`), `404 NotFound` `Status`
//!   (`services "x" not found`, `details` name/group/kind) when missing;
//! - POST (create): `201` with the object; `409 AlreadyExists`; a
//!   `generateName` completed with five random characters; `404` for a
//!   namespace that does not exist (the NamespaceLifecycle admission
//!   plugin); core/v1 Events created are also kept in order
//!   ([`KubeApi::events`]); the status of a new custom resource dropped;
//! - PATCH of an object or its `/status`: `application/merge-patch+json`
//!   (RFC 7386), `application/strategic-merge-patch+json` and
//!   `application/apply-patch+yaml` (both applied as a merge patch: an
//!   approximation), `415` for JSON patch; `409 Conflict` when the patch
//!   names another `metadata.resourceVersion`; the status subresource
//!   takes only `status` (no generation bump), the main resource keeps the
//!   status and the server's metadata; `200` with the object, a MODIFIED
//!   event with a new resourceVersion when something changed; PUT
//!   (update) the same way with a whole object; DELETE: `200` with the
//!   object, a DELETED event.
//!
//! Not replayed (a test needing them needs a real API server): discovery
//! (`/api`, `/apis`, `/version`, OpenAPI), protobuf and Table encodings,
//! JSON patch, server-side apply's field management (no `managedFields`,
//! no conflicts), schema validation and defaulting, admission other than
//! NamespaceLifecycle on create, finalizers and graceful deletion,
//! `deletecollection`, per-resource watch-cache windows (the history is
//! one, shared by all resources), watch-list fallbacks and timing (the
//! real server sends bookmarks about once a minute).
//!
//! Tests write as the cluster's controllers would with [`KubeApi::apply`]
//! (create or replace: ADDED or MODIFIED), [`KubeApi::delete`] (DELETED
//! with the last state and a new resourceVersion) and read with
//! [`KubeApi::get`]; every request received is logged with its method,
//! path and query ([`KubeApi::received`]) so a test can tell a relist (a
//! second LIST) from a re-watch.
//!
//! # Fixtures
//!
//! [`KubeApi::load_recorded_k3s`] loads recorded output of a real API
//! server, byte for byte ([`RECORDED_K3S`],
//! `mesh-test/fixtures/kube/recorded/k3s/`, whose SOURCES.md says where it
//! comes from): the Node, Services, Pods and EndpointSlices of a
//! single-node k3s v1.33 cluster.
//!
//! [`KubeApi::with_fixtures`] loads `mesh-test/fixtures/kube/*.json`
//! ([`FIXTURES`]): the namespace `bookinfo`; Nodes `node-a`
//! (`topology.kubernetes.io/region` `eu-west-1`, zone `eu-west-1a`) and
//! `node-b` (zone `eu-west-1b`); the Service `reviews` (ClusterIP, ports
//! `http` 9080 and `grpc` 9090 with `appProtocol`, labelled
//! `fedmesh.io/export: "true"`) and the unexported `ratings`; their
//! EndpointSlices (endpoints with addresses, ready/serving/terminating,
//! nodeName, zone, targetRef to the Pod; ports with appProtocol; the
//! controller's labels and ownerReference); the Pods behind them
//! (`reviews-v1` on node-a, `reviews-v3` on node-b, `ratings-v1` on node-a,
//! with `serviceAccountName`, `nodeName`, `version` labels, podIP, phase
//! and conditions); the ServiceExport `reviews`; the VirtualService and
//! DestinationRule `reviews`; the TrafficWeights `reviews`. They are in the
//! shape of `kubectl get -o json` of a live cluster (no `managedFields`,
//! which kubectl hides) and were written after real recorded output, not
//! captured here (no cluster can run here):
//!
//! - Service, Node, Namespace: the `kubectl get -o json` recordings in
//!   derailed/k9s `internal/render/testdata/` (`svc.json`, `no.json`,
//!   `ns.json`) and the modern Service fields (`clusterIPs`, `ipFamilies`,
//!   `ipFamilyPolicy`, `internalTrafficPolicy`) of the Service watch event
//!   recorded from a TKE cluster in superedge/superedge
//!   `pkg/lite-apiserver/cache/cache_test.go`;
//! - EndpointSlice: the EndpointSlice watch event recorded in that same
//!   superedge test (labels, `last-change-trigger-time`, ownerReference,
//!   endpoint `conditions`/`targetRef`/`nodeName`/`zone`) and derailed/k9s
//!   `internal/render/testdata/eps.json`;
//! - Pod: derailed/k9s `internal/render/testdata/po_sidecar.json` (a kind
//!   cluster, 2024: conditions incl. `PodReadyToStartContainers`,
//!   `hostIPs`/`podIPs`, the projected `kube-api-access` volume);
//! - ServiceExport: the `kubectl describe serviceexports` output in
//!   submariner-io/submariner-website `src/content/operations/usage/_index.en.md`
//!   (status condition `Valid`);
//! - VirtualService: the `kubectl get virtualservice reviews -o yaml`
//!   output in istio/istio.io
//!   `content/en/docs/tasks/traffic-management/traffic-shifting/index.md`
//!   (50/50 between subsets `v1` and `v3`), DestinationRule after Istio's
//!   Bookinfo `destination-rule-all.yaml`;
//! - the wire shapes of lists, pages, watch events, bookmarks and the
//!   `410` from kubernetes/website `content/en/docs/reference/using-api/api-concepts.md`
//!   and the `kube-core` 4.2 request tests (the query strings a kube-rs
//!   watcher sends).
//!
//! Tokens are made by the double ([`KubeApi::service_account_token`],
//! [`KubeApi::user_token`]) and shaped like the real projected JWTs, but
//! their signature is random: the double looks them up, it does not verify
//! them.

mod fixtures;
mod rest;
mod store;

pub use fixtures::{fixture, recorded_k3s, FIXTURES, RECORDED_K3S};
pub use store::{default_resources, ResourceDef};

use crate::tls::TestCa;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rest::{Body, Control, Query, RequestInfo};
use rustls::pki_types::PrivateKeyDer;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use store::{key_of, Store};
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

/// The namespaces every cluster has.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-node-lease", "kube-public", "kube-system"];

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
    /// The HTTP status it answered (`200` for a watch: its events follow).
    pub answered: u16,
}

impl Received {
    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path
            .split_once('?')
            .map_or(self.path.as_str(), |(p, _)| p)
    }

    /// The query string as sent (without `?`; empty if none).
    pub fn query(&self) -> &str {
        self.path.split_once('?').map_or("", |(_, q)| q)
    }

    /// A query parameter, decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        Query::parse(Some(self.query()))
            .get(name)
            .map(str::to_string)
    }

    /// A `GET` with `watch=true` (or `1`).
    pub fn is_watch(&self) -> bool {
        self.method == "GET" && matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }

    /// A `GET` of a collection without `watch`: a LIST (for resource
    /// collection paths; a GET of one object has a name after the plural).
    pub fn is_list_of(&self, collection_path: &str) -> bool {
        self.method == "GET" && !self.is_watch() && self.path_only() == collection_path
    }

    /// A watch of `collection_path`.
    pub fn is_watch_of(&self, collection_path: &str) -> bool {
        self.is_watch() && self.path_only() == collection_path
    }
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

/// (verb, API group, resource[/subresource]); `*` for any.
type Rule = (String, String, String);

struct State {
    /// Bearer tokens of callers of the API (the federation's), by token.
    callers: HashMap<String, String>,
    /// Users allowed to create tokenreviews (RBAC).
    reviewers: HashSet<String>,
    /// Allow-lists of callers for the resources (none: everything).
    rules: HashMap<String, Vec<Rule>>,
    /// Tokens to review, by token.
    tokens: HashMap<String, Issued>,
    received: Vec<Received>,
    /// Answer reviews with this HTTP error (0: don't).
    fail_with: u16,
    store: Store,
}

struct Inner {
    state: Mutex<State>,
    /// The newest resourceVersion, for watches to wake up on.
    changed: tokio::sync::watch::Sender<u64>,
    /// Orders to open watches.
    control: tokio::sync::broadcast::Sender<Control>,
    open_watches: AtomicUsize,
}

type Shared = Arc<Inner>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running double; stops when dropped (its kubeconfig files go too).
pub struct KubeApi {
    /// Where it listens.
    pub addr: SocketAddr,
    ca: TestCa,
    inner: Shared,
    federation_token: String,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl KubeApi {
    /// Starts a double on a free loopback port, with its own cluster CA, a
    /// caller token for the federation (user [`FEDERATION_USER`], allowed
    /// everything, tokenreviews included) and a kubeconfig for it. The
    /// store holds the namespaces every cluster has (`default`,
    /// `kube-system`, `kube-public`, `kube-node-lease`) and nothing else.
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
        let mut state = State {
            callers: HashMap::new(),
            reviewers: HashSet::new(),
            rules: HashMap::new(),
            tokens: HashMap::new(),
            received: Vec::new(),
            fail_with: 0,
            store: Store::new(),
        };
        state
            .callers
            .insert(federation_token.clone(), FEDERATION_USER.to_string());
        state.reviewers.insert(FEDERATION_USER.to_string());
        let inner: Shared = Arc::new(Inner {
            state: Mutex::new(state),
            changed: tokio::sync::watch::channel(0).0,
            control: tokio::sync::broadcast::channel(64).0,
            open_watches: AtomicUsize::new(0),
        });
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (st, conns) = (inner.clone(), tasks.clone());
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
            inner,
            federation_token,
            dir,
            kubeconfig: PathBuf::new(),
            tasks,
        };
        api.kubeconfig = api.write_kubeconfig("federation", &api.federation_token.clone());
        for ns in SYSTEM_NAMESPACES {
            api.apply(json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": ns,
                    "labels": { "kubernetes.io/metadata.name": ns },
                },
                "spec": { "finalizers": ["kubernetes"] },
                "status": { "phase": "Active" },
            }));
        }
        api
    }

    /// [`KubeApi::start`] with the fixtures loaded ([`KubeApi::load_fixtures`]).
    pub async fn with_fixtures() -> Self {
        let api = Self::start().await;
        api.load_fixtures();
        api
    }

    /// Applies every fixture of `mesh-test/fixtures/kube/` ([`FIXTURES`]),
    /// in order: each an ADDED event.
    pub fn load_fixtures(&self) {
        for (name, _) in FIXTURES {
            self.apply(fixture(name));
        }
    }

    /// Applies every object of the recorded k3s cluster
    /// ([`recorded_k3s`]), in order: each an ADDED event. The double's
    /// store gives them its own resourceVersions; everything else is served
    /// as recorded.
    pub fn load_recorded_k3s(&self) {
        for obj in recorded_k3s() {
            self.apply(obj);
        }
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
        let mut s = lock(&self.inner);
        if allowed {
            s.reviewers.insert(FEDERATION_USER.to_string());
        } else {
            s.reviewers.remove(FEDERATION_USER);
        }
    }

    /// Narrows what the federation's token may do with the resources to an
    /// allow-list of `(verb, API group, resource)` rules, as its RBAC
    /// ClusterRole would (`*` matches any; `""` is the core group; a
    /// subresource is `trafficweights/status`; verbs `get`, `list`,
    /// `watch`, `create`, `update`, `patch`, `delete`): anything else is
    /// `403 Forbidden`. `None`: everything is allowed (the default).
    /// TokenReviews have their own grant ([`KubeApi::set_federation_may_review`]).
    pub fn set_federation_rules(&self, rules: Option<&[(&str, &str, &str)]>) {
        let mut s = lock(&self.inner);
        match rules {
            None => {
                s.rules.remove(FEDERATION_USER);
            }
            Some(r) => {
                let r = r
                    .iter()
                    .map(|(v, g, res)| (v.to_string(), g.to_string(), res.to_string()))
                    .collect();
                s.rules.insert(FEDERATION_USER.to_string(), r);
            }
        }
    }

    /// Makes authorized reviews answer the `Status` the API server sends
    /// with HTTP `code` (500 `InternalError`, 429 `TooManyRequests`, 503
    /// `ServiceUnavailable`, 504 `Timeout`); 0 answers them again.
    pub fn fail_reviews_with(&self, code: u16) {
        lock(&self.inner).fail_with = code;
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
        lock(&self.inner).tokens.insert(token.clone(), issued);
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
        lock(&self.inner).tokens.insert(token.clone(), issued);
        token
    }

    /// Every request received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner).received.clone()
    }

    /// The requests received for one path (query left out), oldest first:
    /// e.g. `/api/v1/services` for the LISTs and WATCHes of all Services.
    pub fn received_for(&self, path: &str) -> Vec<Received> {
        lock(&self.inner)
            .received
            .iter()
            .filter(|r| r.path_only() == path)
            .cloned()
            .collect()
    }

    /// Creates or replaces an object, by `apiVersion`, `kind`,
    /// `metadata.namespace` (`default` when left out for a namespaced
    /// kind) and `metadata.name`, as a controller or `kubectl apply` would:
    /// an ADDED or MODIFIED event with a new resourceVersion (nothing when
    /// it is unchanged). The object is taken whole, `status` included; the
    /// server's fields are filled in (`uid`, `creationTimestamp`,
    /// `generation` on create; kept, the generation bumped on a spec
    /// change, on replace). Returns the stored object.
    ///
    /// # Panics
    ///
    /// If the double does not serve the kind, or the object has no name.
    pub fn apply(&self, obj: Value) -> Value {
        let av = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let mut s = lock(&self.inner);
        let (res, version) = s
            .store
            .resource_of(&av, &kind)
            .unwrap_or_else(|| panic!("the Kubernetes API double does not serve {av} {kind}"));
        let mut obj = obj;
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if res.namespaced {
            if obj["metadata"]["namespace"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                obj["metadata"]["namespace"] = json!("default");
            }
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        let key = key_of(&obj);
        assert!(!key.1.is_empty(), "apply: {kind} without metadata.name");
        let prev = s.store.get(&res, &key).cloned();
        rest::fill_server_fields(&res, &mut obj, prev.as_ref());
        let change = s.store.commit(&res, key, Some(obj));
        let out = match &change {
            Some(c) => c.object.clone(),
            None => prev.unwrap_or_default(),
        };
        drop(s);
        if let Some(c) = &change {
            self.inner.changed.send_replace(c.rv);
        }
        rest::render(&res, &version, &out)
    }

    /// Deletes an object: a DELETED event with its last state and a new
    /// resourceVersion. Returns that state, or None if there was no such
    /// object.
    ///
    /// # Panics
    ///
    /// If the double does not serve the kind.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let mut s = lock(&self.inner);
        let (res, version) = s.store.resource_of(api_version, kind).unwrap_or_else(|| {
            panic!("the Kubernetes API double does not serve {api_version} {kind}")
        });
        let ns = if res.namespaced {
            namespace.unwrap_or("default").to_string()
        } else {
            String::new()
        };
        let change = s.store.commit(&res, (ns, name.to_string()), None)?;
        drop(s);
        self.inner.changed.send_replace(change.rv);
        Some(rest::render(&res, &version, &change.object))
    }

    /// The current object, as a GET in `api_version` returns it.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let s = lock(&self.inner);
        let (res, version) = s.store.resource_of(api_version, kind)?;
        let ns = if res.namespaced {
            namespace.unwrap_or("default").to_string()
        } else {
            String::new()
        };
        s.store
            .get(&res, &(ns, name.to_string()))
            .map(|o| rest::render(&res, &version, o))
    }

    /// Every object of a kind (all namespaces), by namespace and name.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let s = lock(&self.inner);
        let Some((res, version)) = s.store.resource_of(api_version, kind) else {
            return Vec::new();
        };
        s.store
            .all(&res)
            .iter()
            .map(|o| rest::render(&res, &version, o))
            .collect()
    }

    /// The core/v1 Events created over HTTP, oldest first, as stored.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.inner).store.events.clone()
    }

    /// The newest resourceVersion given out.
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner).store.rv
    }

    /// Compacts the history at the current resourceVersion, as etcd's
    /// compaction: a watch, an `Exact` list or a continue token from an
    /// older resourceVersion is then `410 Expired`. Open watches go on.
    pub fn expire_history(&self) {
        let mut s = lock(&self.inner);
        s.store.floor = s.store.rv;
    }

    /// [`KubeApi::expire_history`], and every open watch gets the `ERROR`
    /// event `410 Expired` and ends (its client must list again): after
    /// the changes made before this call, before any made after it.
    pub fn expire_watches(&self) {
        {
            let mut s = lock(&self.inner);
            s.store.floor = s.store.rv;
            s.store.watches_expired = (s.store.watches_expired.0 + 1, s.store.rv);
        }
        let _ = self.inner.control.send(Control::Expire);
    }

    /// Cuts every open watch stream mid-way (the connection closes without
    /// the end of the chunked body): clients watch again from the last
    /// resourceVersion they saw, without listing.
    pub fn drop_watches(&self) {
        let _ = self.inner.control.send(Control::Cut);
    }

    /// Ends every open watch stream cleanly, as at `timeoutSeconds`.
    pub fn end_watches(&self) {
        let _ = self.inner.control.send(Control::End);
    }

    /// Sends a BOOKMARK now on every open watch that allows them.
    pub fn send_bookmarks(&self) {
        let _ = self.inner.control.send(Control::Bookmark);
    }

    /// How often open watches that allow them get a BOOKMARK (1 s by
    /// default; for watches opened after the call).
    pub fn set_bookmark_interval(&self, every: Duration) {
        lock(&self.inner).store.bookmark_every = every;
    }

    /// Caps every LIST page at `size` items, whatever `limit` asks (a
    /// `continue` token for the rest); None: pages of `limit`.
    pub fn set_page_size(&self, size: Option<usize>) {
        lock(&self.inner).store.page_size = size.filter(|s| *s > 0);
    }

    /// Keeps at most `events` changes in the history (10 000 by default):
    /// watches that fall further behind get `410 Expired`.
    pub fn set_history_limit(&self, events: usize) {
        lock(&self.inner).store.history_cap = events.max(1);
    }

    /// Serves one more resource (or replaces the definition of one).
    pub fn serve_resource(&self, def: ResourceDef) {
        let mut s = lock(&self.inner);
        s.store
            .resources
            .retain(|r| !(r.group == def.group && r.plural == def.plural));
        s.store.resources.push(def);
    }

    /// Stops serving a resource (a CRD not installed): its paths answer
    /// `404`. Its objects stay, for [`KubeApi::serve_resource`] to bring back.
    pub fn remove_resource(&self, group: &str, plural: &str) {
        lock(&self.inner)
            .store
            .resources
            .retain(|r| !(r.group == group && r.plural == plural));
    }

    /// The resources served.
    pub fn resources(&self) -> Vec<ResourceDef> {
        lock(&self.inner).store.resources.clone()
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        self.inner.open_watches.load(Ordering::SeqCst)
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
        let _ = self.inner.control.send(Control::Cut);
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
fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    rest::json_response(
        code,
        &rest::status_object(code.as_u16(), reason, message, details),
    )
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    rest::json_response(code, body)
}

async fn handle(
    st: Shared,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
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
    let resp = answer(&st, &parts.method, &parts.uri, &seen);
    seen.answered = resp.status().as_u16();
    lock(&st).received.push(seen);
    Ok(resp)
}

fn answer(st: &Shared, method: &Method, uri: &Uri, req: &Received) -> Response<Body> {
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
    let path = uri.path().trim_end_matches('/');
    if path != TOKEN_REVIEWS_PATH {
        let q = Query::parse(uri.query());
        let Some(info) = RequestInfo::parse(method, path, &q) else {
            return rest::not_served();
        };
        let rules = lock(st).rules.get(&user).cloned();
        if rules.is_some_and(|r| !info.allowed_by(&r)) {
            return info.forbidden(&user);
        }
        return rest::serve(st, &info, &q, req.content_type.as_deref(), &req.body);
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
