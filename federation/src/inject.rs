//! Sidecar injection: the mutating admission webhook the Kubernetes API
//! server calls for every Pod created in a namespace labelled
//! `fedmesh.io/inject=enabled` (the webhook configuration's
//! `namespaceSelector`, in the chart), as istiod serves Istio's.
//!
//! The webhook adds the agent's sidecar as the chart renders it (the
//! `fedmesh-sidecar-injector` ConfigMap, `--inject-template`): the agent
//! container, the capture init container and the projected ServiceAccount
//! token volume. What is specific to a Pod (its service name, its
//! application's port) is read from the Pod here and written into the patch.
//!
//! A Pod is left as it is, with a warning the API server shows to whoever
//! created it, when it cannot be meshed: no service name, no port, host
//! networking, a port or volume the sidecar needs already taken. It is left
//! alone silently when it opts out (`fedmesh.io/inject: "false"`, as an
//! annotation or a label) or already has the sidecar (never twice: a
//! reinvocation, or a Pod whose template was injected by hand).
//!
//! Reviewing is a pure function of the template and the request: nothing is
//! stored, nothing is read from the registry, so the endpoint needs no
//! caller identity (the API server presents none) and gives none away.

use crate::tls::ServerTls;
use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// The webhook's path (the chart's `clientConfig.service.path`).
pub const PATH: &str = "/inject";
/// Largest AdmissionReview read: the API server's own limit on a request
/// body is 3 MiB, and a review carries the object once (`oldObject` is
/// null on CREATE).
pub const MAX_BODY: usize = 3 << 20;
/// Connections served at once; the API server keeps a few open.
const MAX_CONNECTIONS: usize = 64;
/// Reviews read and parsed at once (a parsed review is several times its
/// body); the others wait, their bodies held back by flow control.
const MAX_REVIEWS: usize = 2;
/// A connection is closed gracefully at this age (the API server opens a
/// new one; an idle caller loses its slot).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// HTTP/2 streams per connection, and the flow-control windows: what a
/// connection may send before its body is read.
const H2_STREAMS: u32 = 4;
const H2_STREAM_WINDOW: u32 = 64 << 10;
const H2_CONNECTION_WINDOW: u32 = 256 << 10;
/// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
const MAX_HEADERS: u32 = 64 << 10;
/// A TLS handshake, a request's headers and its body each get this long.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Annotation (or label) whose value `"false"` keeps a Pod out.
pub const INJECT_KEY: &str = "fedmesh.io/inject";
/// Annotation the webhook writes on the Pods it injects.
pub const STATUS_KEY: &str = "fedmesh.io/status";
/// The application's port, which the capture and the agent's `--app` use.
pub const APP_PORT_KEY: &str = "fedmesh.io/app-port";
/// The sidecar's container and init container names.
pub const AGENT_CONTAINER: &str = "fedmesh-agent";
/// The capture init container.
pub const INIT_CONTAINER: &str = "fedmesh-init";
/// Ports the sidecar listens on in the Pod (outbound, inbound, admin).
const AGENT_PORTS: [u16; 3] = [15001, 15006, 15020];

/// What the webhook adds to a Pod: the chart's sidecar template.
#[derive(Debug, Clone)]
pub struct Template {
    init_containers: Vec<Value>,
    containers: Vec<Value>,
    volumes: Vec<Value>,
}

impl Template {
    /// Reads the template from the `fedmesh-sidecar-injector` ConfigMap's
    /// `patch.yaml`: a Deployment whose `spec.template.spec` holds
    /// `initContainers`, `containers` and `volumes`.
    pub fn parse(yaml: &str) -> Result<Self, String> {
        let doc: Value = serde_yaml_ng::from_str(yaml).map_err(|e| format!("not YAML: {e}"))?;
        let spec = doc
            .pointer("/spec/template/spec")
            .and_then(Value::as_object)
            .ok_or("no spec.template.spec (a Deployment patch, as the chart renders it)")?;
        let list = |key: &str| -> Result<Vec<Value>, String> {
            match spec.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        if item.get("name").and_then(Value::as_str).is_none() {
                            return Err(format!("spec.template.spec.{key}[{i}] has no name"));
                        }
                    }
                    Ok(items.clone())
                }
                Some(_) => Err(format!("spec.template.spec.{key} is not a list")),
            }
        };
        let t = Self {
            init_containers: list("initContainers")?,
            containers: list("containers")?,
            volumes: list("volumes")?,
        };
        if !t
            .containers
            .iter()
            .any(|c| name(c) == Some(AGENT_CONTAINER))
        {
            return Err(format!(
                "spec.template.spec.containers has no container named {AGENT_CONTAINER}"
            ));
        }
        Ok(t)
    }

    /// [`Template::parse`] of a file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--inject-template {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("--inject-template {}: {e}", path.display()))
    }
}

fn name(v: &Value) -> Option<&str> {
    v.get("name").and_then(Value::as_str)
}

/// What the webhook decided for one Pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The JSON Patch (RFC 6902) adding the sidecar.
    Injected(Vec<Value>),
    /// Left as it is, on purpose: it opted out or has the sidecar already.
    Left(&'static str),
    /// Left as it is because it cannot be meshed; the reason is sent back
    /// to the API server as a warning.
    Skipped(String),
}

impl Outcome {
    /// The metric label and log field.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Injected(_) => "injected",
            Outcome::Left(_) => "left",
            Outcome::Skipped(_) => "skipped",
        }
    }
}

/// A review that could not be answered: the API server applies the
/// webhook's failure policy.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

/// Answers one AdmissionReview (v1) request body.
pub fn review(t: &Template, body: &[u8]) -> Result<(Value, Outcome), BadReview> {
    let bad = |m: &str| BadReview(m.to_string());
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| BadReview(format!("the body is not JSON: {e}")))?;
    if doc.get("apiVersion").and_then(Value::as_str) != Some("admission.k8s.io/v1")
        || doc.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return Err(bad(
            "not an admission.k8s.io/v1 AdmissionReview (admissionReviewVersions must be [v1])",
        ));
    }
    let req = doc
        .get("request")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("the AdmissionReview has no request"))?;
    let uid = req
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| bad("request.uid is missing"))?;
    let is_pod = req.get("kind").is_some_and(|k| {
        k.get("group").and_then(Value::as_str) == Some("")
            && k.get("version").and_then(Value::as_str) == Some("v1")
            && k.get("kind").and_then(Value::as_str) == Some("Pod")
    });
    let create = req.get("operation").and_then(Value::as_str) == Some("CREATE");
    let subresource = req
        .get("subResource")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    let outcome = if !is_pod || !create || subresource {
        Outcome::Left("not the creation of a Pod")
    } else {
        let pod = req
            .get("object")
            .filter(|o| o.is_object())
            .ok_or_else(|| bad("request.object is missing"))?;
        mutate(t, pod)
    };
    let mut response = Map::new();
    response.insert("uid".into(), json!(uid));
    response.insert("allowed".into(), json!(true));
    match &outcome {
        Outcome::Injected(patch) => {
            let bytes = serde_json::to_vec(patch).map_err(|e| BadReview(e.to_string()))?;
            response.insert("patchType".into(), json!("JSONPatch"));
            response.insert(
                "patch".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
        Outcome::Skipped(why) => {
            response.insert(
                "warnings".into(),
                json!([format!("fedmesh: sidecar not injected: {why}")]),
            );
        }
        Outcome::Left(_) => {}
    }
    Ok((
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": Value::Object(response),
        }),
        outcome,
    ))
}

/// The JSON Pointer token of a map key (RFC 6901).
fn token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn str_at<'a>(pod: &'a Value, path: &str) -> Option<&'a str> {
    pod.pointer(path).and_then(Value::as_str)
}

/// The decision and the patch for one Pod.
pub fn mutate(t: &Template, pod: &Value) -> Outcome {
    let meta_key = |map: &str, key: &str| str_at(pod, &format!("/metadata/{map}/{}", token(key)));
    if meta_key("annotations", INJECT_KEY) == Some("false")
        || meta_key("labels", INJECT_KEY) == Some("false")
    {
        return Outcome::Left("opted out");
    }
    let spec = pod.get("spec");
    let names = |key: &str| -> Vec<&str> {
        spec.and_then(|s| s.get(key))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(name).collect())
            .unwrap_or_default()
    };
    let (containers, inits, volumes) = (
        names("containers"),
        names("initContainers"),
        names("volumes"),
    );
    // The agent as an app container or as a native sidecar (an init
    // container with restartPolicy Always), or the capture: injected.
    if meta_key("annotations", STATUS_KEY).is_some()
        || containers.contains(&AGENT_CONTAINER)
        || inits.contains(&AGENT_CONTAINER)
        || inits.contains(&INIT_CONTAINER)
    {
        return Outcome::Left("has the sidecar already");
    }
    if containers.is_empty() {
        return Outcome::Skipped("the Pod has no containers".into());
    }
    // Container names are unique across a Pod's lists: the API server
    // would refuse a patched Pod that repeats one.
    let taken: Vec<&str> = containers
        .iter()
        .chain(&inits)
        .copied()
        .chain(names("ephemeralContainers"))
        .collect();
    if let Some(c) = t
        .init_containers
        .iter()
        .chain(&t.containers)
        .filter_map(name)
        .find(|c| taken.contains(c))
    {
        return Outcome::Skipped(format!(
            "the Pod already has a container named {c}, a name the sidecar needs"
        ));
    }
    // A Job's Pod ends when its containers do; the agent never does.
    if let Some(p @ ("Never" | "OnFailure")) = spec
        .and_then(|s| s.get("restartPolicy"))
        .and_then(Value::as_str)
    {
        return Outcome::Skipped(format!(
            "restartPolicy {p} (a Job's Pod): the agent would keep it from completing; opt it out with the annotation {INJECT_KEY}: \"false\""
        ));
    }
    if spec
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Outcome::Skipped(
            "the Pod uses the host's network (hostNetwork: true): capturing its traffic would capture the node's".into(),
        );
    }
    // The service the workload serves, as the chart's example names it.
    let Some(service) = meta_key("labels", "app.kubernetes.io/name")
        .or_else(|| meta_key("labels", "app"))
        .filter(|s| !s.is_empty())
    else {
        return Outcome::Skipped(
            "no service name: label the Pod app.kubernetes.io/name (or app) with its Service's name".into(),
        );
    };
    if let Err(e) = mesh_core::name::check_label(service) {
        return Outcome::Skipped(format!("service name {:?}: {e}", short(service)));
    }
    // The application's port: the annotation, else the first TCP port the
    // Pod's containers declare.
    let (port, port_given) = match meta_key("annotations", APP_PORT_KEY) {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => (n, true),
            _ => {
                return Outcome::Skipped(format!(
                    "annotation {APP_PORT_KEY}: {:?} is not a port number (1-65535)",
                    short(p)
                ))
            }
        },
        None => match first_tcp_port(pod) {
            Some(n) => (n, false),
            None => {
                return Outcome::Skipped(format!(
                    "no application port: the Pod's containers declare no TCP containerPort; annotate it {APP_PORT_KEY}"
                ))
            }
        },
    };
    if AGENT_PORTS.contains(&port) {
        return Outcome::Skipped(format!(
            "the application's port {port} is one the agent listens on ({AGENT_PORTS:?})"
        ));
    }
    if let Some(v) = t
        .volumes
        .iter()
        .filter_map(name)
        .find(|v| volumes.contains(v))
    {
        return Outcome::Skipped(format!("the Pod already has a volume named {v}"));
    }

    let mut patch = Vec::new();
    let mut notes = Map::new();
    notes.insert(STATUS_KEY.into(), json!("injected"));
    if !port_given {
        notes.insert(APP_PORT_KEY.into(), json!(port.to_string()));
    }
    if pod
        .pointer("/metadata/annotations")
        .is_some_and(Value::is_object)
    {
        for (k, v) in notes {
            patch.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", token(&k)), "value": v}));
        }
    } else {
        patch.push(json!({"op": "add", "path": "/metadata/annotations", "value": notes}));
    }
    let mut add_all = |key: &str, items: Vec<Value>| {
        if items.is_empty() {
            return;
        }
        if spec.and_then(|s| s.get(key)).is_some_and(Value::is_array) {
            for item in items {
                patch.push(json!({"op": "add", "path": format!("/spec/{key}/-"), "value": item}));
            }
        } else {
            patch.push(json!({"op": "add", "path": format!("/spec/{key}"), "value": items}));
        }
    };
    // After the application's own init containers: theirs run unmeshed and
    // before the capture, so one that fetches something still reaches it.
    add_all("initContainers", t.init_containers.clone());
    let sidecars = t
        .containers
        .iter()
        .cloned()
        .map(|mut c| {
            if name(&c) == Some(AGENT_CONTAINER) {
                set_env(&mut c, "FEDMESH_SERVICE", service);
            }
            c
        })
        .collect();
    add_all("containers", sidecars);
    add_all("volumes", t.volumes.clone());
    Outcome::Injected(patch)
}

/// A caller's value as it is echoed in a warning or a log: its first 64
/// characters.
fn short(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// The first TCP `containerPort` of the Pod's containers, in order.
fn first_tcp_port(pod: &Value) -> Option<u16> {
    pod.pointer("/spec/containers")?
        .as_array()?
        .iter()
        .filter_map(|c| c.get("ports").and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP")
        .filter_map(|p| p.get("containerPort").and_then(Value::as_u64))
        .find_map(|n| u16::try_from(n).ok().filter(|n| *n > 0))
}

/// Sets a container's environment variable to a literal value (replacing
/// the template's downward-API reference).
fn set_env(container: &mut Value, var: &str, value: &str) {
    let entry = json!({"name": var, "value": value});
    let Some(c) = container.as_object_mut() else {
        return;
    };
    let env = c.entry("env").or_insert_with(|| json!([]));
    if let Some(list) = env.as_array_mut() {
        match list.iter_mut().find(|e| name(e) == Some(var)) {
            Some(e) => *e = entry,
            None => list.push(entry),
        }
    }
}

/// Counts of reviews by outcome, for `/metrics`.
pub trait Observe: Send + Sync {
    /// One review answered (`injected`, `left`, `skipped`) or refused (`invalid`).
    fn reviewed(&self, outcome: &'static str);
}

/// Serves the webhook over HTTPS (HTTP/2 or HTTP/1.1, by ALPN) with the
/// federation's serving certificate, without asking for a client
/// certificate, until the task is aborted.
///
/// Bounded for callers nobody authenticated (see the constants): a few
/// connections, each closed (gracefully) at an age, a few streams each with
/// small flow-control windows, so unread bodies stay small; reviews read
/// and parsed one or two at a time, off the async workers.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    template: Arc<Template>,
    observe: Arc<dyn Observe>,
) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let reviews = Arc::new(Semaphore::new(MAX_REVIEWS));
    loop {
        let Ok(permit) = open.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!("webhook accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (tls, template, observe, reviews) = (
            tls.clone(),
            template.clone(),
            observe.clone(),
            reviews.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.webhook_config());
            let stream = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%remote, "webhook TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "webhook TLS handshake timed out");
                    return;
                }
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (template, observe, reviews) =
                    (template.clone(), observe.clone(), reviews.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        handle(req, template, &*observe, &reviews).await,
                    )
                }
            });
            let io = TokioIo::new(stream);
            // Served until done, or until MAX_CONNECTION_AGE: then closed
            // gracefully (HTTP/2: GOAWAY, the streams in flight finish),
            // and dropped IO_TIMEOUT later whatever the peer does.
            macro_rules! aged {
                ($conn:expr) => {{
                    let conn = $conn;
                    tokio::pin!(conn);
                    let r = tokio::select! {
                        r = conn.as_mut() => r,
                        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {
                            conn.as_mut().graceful_shutdown();
                            tokio::time::timeout(IO_TIMEOUT, conn.as_mut())
                                .await
                                .unwrap_or(Ok(()))
                        }
                    };
                    if let Err(e) = r {
                        debug!(%remote, "webhook connection ended: {e}");
                    }
                }};
            }
            if h2 {
                aged!(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .max_concurrent_streams(H2_STREAMS)
                        .initial_stream_window_size(H2_STREAM_WINDOW)
                        .initial_connection_window_size(H2_CONNECTION_WINDOW)
                        .max_header_list_size(MAX_HEADERS)
                        .serve_connection(io, svc)
                );
            } else {
                aged!(hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(IO_TIMEOUT)
                    .max_buf_size(MAX_HEADERS as usize)
                    .serve_connection(io, svc));
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    template: Arc<Template>,
    observe: &dyn Observe,
    reviews: &Semaphore,
) -> Response<Full<Bytes>> {
    // The body first, bounded, whatever the route: an answer sent before
    // the request is read resets an HTTP/2 stream, which clients report
    // as a protocol error instead of the status. Read (and parsed) under a
    // permit: the others wait with their bodies unread.
    let (path, method) = (req.uri().path().to_string(), req.method().clone());
    let body = Limited::new(req.into_body(), MAX_BODY);
    let read = async {
        let permit = reviews.acquire().await;
        (body.collect().await, permit)
    };
    let (bytes, _permit) = match tokio::time::timeout(IO_TIMEOUT, read).await {
        Ok((Ok(b), permit)) => (b.to_bytes(), permit),
        Ok((Err(e), _)) => {
            observe.reviewed("invalid");
            let (status, why) = if e.is::<http_body_util::LengthLimitError>() {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the AdmissionReview is larger than {MAX_BODY} bytes"),
                )
            } else {
                (StatusCode::BAD_REQUEST, format!("reading the body: {e}"))
            };
            return text(status, why + "\n");
        }
        Err(_) => {
            observe.reviewed("invalid");
            return text(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {IO_TIMEOUT:?}\n"),
            );
        }
    };
    if path != PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found; the webhook is at {PATH}\n"),
        );
    }
    if method != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{PATH} takes a POSTed AdmissionReview\n"),
        );
    }
    // Parsing megabytes of JSON is CPU work: off the async workers.
    let reviewed = tokio::task::spawn_blocking(move || review(&template, &bytes))
        .await
        .unwrap_or_else(|e| Err(BadReview(format!("the review failed: {e}"))));
    match reviewed {
        Ok((answer, outcome)) => {
            observe.reviewed(outcome.label());
            match &outcome {
                Outcome::Skipped(why) => info!(why = %why, "sidecar not injected"),
                o => debug!(outcome = o.label(), "admission reviewed"),
            }
            let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => {
            observe.reviewed("invalid");
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: fedmesh-sidecar}
spec:
  template:
    spec:
      initContainers:
        - name: fedmesh-init
          image: fedmesh-agent:1
      containers:
        - name: fedmesh-agent
          image: fedmesh-agent:1
          env:
            - name: FEDMESH_SERVICE
              valueFrom: {fieldRef: {fieldPath: "metadata.labels['app.kubernetes.io/name']"}}
      volumes:
        - name: fedmesh-federation-access
          emptyDir: {}
"#;

    fn t() -> Template {
        Template::parse(TEMPLATE).unwrap()
    }

    fn pod(meta: Value, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
    }

    fn app() -> Value {
        json!({"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 9080}]}]})
    }

    fn patch_of(o: Outcome) -> Vec<Value> {
        match o {
            Outcome::Injected(p) => p,
            o => panic!("not injected: {o:?}"),
        }
    }

    #[test]
    fn a_template_without_the_agent_is_refused_by_name() {
        let e = Template::parse("spec: {template: {spec: {containers: [{name: x}]}}}").unwrap_err();
        assert!(e.contains("fedmesh-agent"), "{e}");
        let e = Template::parse("spec: {}").unwrap_err();
        assert!(e.contains("spec.template.spec"), "{e}");
        let e =
            Template::parse("spec: {template: {spec: {containers: [{image: x}]}}}").unwrap_err();
        assert!(e.contains("containers[0] has no name"), "{e}");
    }

    #[test]
    fn the_sidecar_is_added_with_the_pods_own_service_and_port() {
        let p = patch_of(mutate(
            &t(),
            &pod(json!({"labels": {"app": "reviews"}}), app()),
        ));
        let paths: Vec<&str> = p.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations",
                "/spec/initContainers",
                "/spec/containers/-",
                "/spec/volumes"
            ]
        );
        assert_eq!(p[0]["value"][APP_PORT_KEY], "9080");
        assert_eq!(p[0]["value"][STATUS_KEY], "injected");
        let env = p[2]["value"]["env"].as_array().unwrap();
        assert_eq!(
            env,
            &vec![json!({"name": "FEDMESH_SERVICE", "value": "reviews"})]
        );
    }

    #[test]
    fn existing_lists_and_annotations_are_appended_to_not_replaced() {
        let mut spec = app();
        spec["initContainers"] = json!([{"name": "migrate", "image": "m:1"}]);
        spec["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        let meta = json!({"labels": {"app.kubernetes.io/name": "ratings"},
                          "annotations": {"fedmesh.io/app-port": "8080", "a/b~c": "x"}});
        let p = patch_of(mutate(&t(), &pod(meta, spec)));
        let paths: Vec<&str> = p.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations/fedmesh.io~1status",
                "/spec/initContainers/-",
                "/spec/containers/-",
                "/spec/volumes/-"
            ]
        );
    }

    #[test]
    fn opted_out_and_injected_pods_are_left_alone() {
        for meta in [
            json!({"labels": {"app": "r"}, "annotations": {"fedmesh.io/inject": "false"}}),
            json!({"labels": {"app": "r", "fedmesh.io/inject": "false"}}),
            json!({"labels": {"app": "r"}, "annotations": {"fedmesh.io/status": "injected"}}),
        ] {
            assert!(matches!(mutate(&t(), &pod(meta, app())), Outcome::Left(_)));
        }
        let mut spec = app();
        spec["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "fedmesh-agent", "image": "x"}));
        assert_eq!(
            mutate(&t(), &pod(json!({"labels": {"app": "r"}}), spec)),
            Outcome::Left("has the sidecar already")
        );
        // The agent as a native sidecar (an init container) counts too.
        let mut native = app();
        native["initContainers"] =
            json!([{"name": "fedmesh-agent", "image": "x", "restartPolicy": "Always"}]);
        assert_eq!(
            mutate(&t(), &pod(json!({"labels": {"app": "r"}}), native)),
            Outcome::Left("has the sidecar already")
        );
    }

    #[test]
    fn pods_that_cannot_be_meshed_are_skipped_with_the_reason() {
        let skipped = |meta: Value, spec: Value| match mutate(&t(), &pod(meta, spec)) {
            Outcome::Skipped(w) => w,
            o => panic!("{o:?}"),
        };
        assert!(skipped(json!({}), app()).contains("no service name"));
        assert!(skipped(
            json!({"labels": {"app": "r"}}),
            json!({"containers": [{"name": "a"}]})
        )
        .contains("no application port"));
        let w = skipped(
            json!({"labels": {"app": "r"}, "annotations": {"fedmesh.io/app-port": "http"}}),
            app(),
        );
        assert!(w.contains("\"http\" is not a port number"), "{w}");
        let mut host = app();
        host["hostNetwork"] = json!(true);
        assert!(skipped(json!({"labels": {"app": "r"}}), host).contains("hostNetwork"));
        let mut vol = app();
        vol["volumes"] = json!([{"name": "fedmesh-federation-access", "emptyDir": {}}]);
        assert!(skipped(json!({"labels": {"app": "r"}}), vol).contains("fedmesh-federation-access"));
        let w = skipped(
            json!({"labels": {"app": "r"}, "annotations": {"fedmesh.io/app-port": "15006"}}),
            app(),
        );
        assert!(w.contains("15006"), "{w}");
        let w = skipped(json!({"labels": {"app": "Not_A_Name"}}), app());
        assert!(w.contains("Not_A_Name"), "{w}");
        let w = skipped(json!({"labels": {"app": "x".repeat(100_000)}}), app());
        assert!(
            w.len() < 200,
            "a caller's value is echoed shortened: {} bytes",
            w.len()
        );
        let mut job = app();
        job["restartPolicy"] = json!("OnFailure");
        assert!(skipped(json!({"labels": {"app": "r"}}), job).contains("restartPolicy OnFailure"));
        let mut named = app();
        named["containers"][0]["name"] = json!("fedmesh-init");
        let w = skipped(json!({"labels": {"app": "r"}}), named);
        assert!(w.contains("container named fedmesh-init"), "{w}");
    }

    #[test]
    fn reviews_that_are_not_v1_pod_creations_are_refused_or_passed() {
        let e = review(&t(), b"{").unwrap_err();
        assert!(e.0.contains("not JSON"), "{e}");
        let v1beta1 = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                             "request": {"uid": "1"}});
        let e = review(&t(), v1beta1.to_string().as_bytes()).unwrap_err();
        assert!(e.0.contains("admission.k8s.io/v1"), "{e}");
        let no_uid =
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}});
        assert!(review(&t(), no_uid.to_string().as_bytes())
            .unwrap_err()
            .0
            .contains("uid"));
        let update = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "UPDATE", "object": pod(json!({"labels": {"app": "r"}}), app())}});
        let (answer, outcome) = review(&t(), update.to_string().as_bytes()).unwrap();
        assert!(matches!(outcome, Outcome::Left(_)));
        assert_eq!(answer["response"], json!({"uid": "u1", "allowed": true}));
    }
}
