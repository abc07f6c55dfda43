//! The control API (HTTP/1.1, JSON) and its typed [`Client`].
//!
//! | request | response |
//! |---|---|
//! | `GET /links` | 200 `{"links":{"NAME":LINK,...}}` |
//! | `GET /links/NAME` | 200 `LINK`; 404 if no such link |
//! | `PUT /links/NAME` with a change | 200 `LINK` after the change; 400, 404 |
//! | `PUT /links` with `{"links":["a","b"], ...change}` | 200 `{"links":{"a":LINK,"b":LINK}}`; 400, 404: all or nothing |
//!
//! `LINK` is a [`LinkStatus`]:
//! `{"name":"eu-to-us","listen":"198.18.1.1:15443","target":"198.18.2.10:15443",
//! "source":"198.18.2.1","proxy_protocol":true,
//! "impairment":{"delay_ms":30,"jitter_ms":5,"loss":0.01,"rto_ms":200,"rate_mbps":0.0,"mode":"pass"},
//! "options":{"max_in_flight":4194304,"read_buffer":16384,"connect_timeout_ms":10000},
//! "counters":{"accepted":3,"active":1,"refused":0,"reset":0,"errors":0,"bytes_to_target":512,
//! "bytes_to_client":2048,"bytes_discarded":0,"in_flight_to_target":0,"in_flight_to_client":0,"peak_in_flight":2048}}`
//! (`source` is `null` for a link without `from=`; both fields are fixed at
//! start, a change cannot set them).
//!
//! A change is a JSON object of impairment fields, each optional:
//! `{"delay_ms":30,"jitter_ms":5,"loss":0.01,"rto_ms":200,"rate_mbps":100,"mode":"blackhole"}`
//! (durations in milliseconds, integer or fractional; `mode` one of `pass`,
//! `cut`, `blackhole`). An unknown field, a wrong type or an out-of-range
//! value is refused with 400. Every error is `{"error":"MESSAGE"}`; a 400's
//! message starts with the field's name (`"loss: must be between 0 and 1, got 1.5"`).

use crate::impairment::{Change, InvalidChange};
use crate::link::{LinkStatus, Shared};
use crate::relay::{self, SetError};
use crate::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Largest request body the server reads, and the client sends.
pub const MAX_REQUEST_BODY: usize = 64 << 10;

/// Largest response body the client reads.
pub const MAX_RESPONSE_BODY: usize = 16 << 20;

/// `GET /links` and `PUT /links`: links by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Links {
    /// The links, by name.
    pub links: BTreeMap<String, LinkStatus>,
}

type Map = BTreeMap<String, Arc<Shared>>;

/// The running control API.
#[derive(Debug)]
pub(crate) struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    pub(crate) async fn start(addr: SocketAddr, links: Map) -> Result<Server, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::ControlListen { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| Error::ControlListen { addr, source })?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, Arc::new(links), stopped));
        tracing::info!(addr = %bound, "control API listening");
        Ok(Server {
            addr: bound,
            stop,
            task,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) async fn shutdown(self) {
        drop(self.stop);
        if let Err(e) = self.task.await {
            tracing::warn!("control API task ended badly: {e}");
        }
    }
}

async fn serve(listener: TcpListener, links: Arc<Map>, mut stopped: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let links = links.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let links = links.clone();
                            async move { Ok::<_, std::convert::Infallible>(handle(&links, req).await) }
                        });
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await
                        {
                            tracing::debug!("control connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

fn respond(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = match serde_json::to_vec(body) {
        Ok(mut b) => {
            b.push(b'\n');
            b
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode: {e}"),
            )
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    let body = format!("{}\n", json!({ "error": message }));
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn not_found(name: &str) -> Response<Full<Bytes>> {
    error(StatusCode::NOT_FOUND, format!("no link named {name:?}"))
}

fn bad_request(e: &InvalidChange) -> Response<Full<Bytes>> {
    error(StatusCode::BAD_REQUEST, e.to_string())
}

fn method_not_allowed(method: &Method) -> Response<Full<Bytes>> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed (use GET or PUT)"),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("GET, PUT"));
    r
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Full<Bytes>>> {
    let body = Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("body: cannot read (at most {MAX_REQUEST_BODY} bytes): {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("body: invalid JSON: {e}")))
}

async fn handle(links: &Map, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let name = match path.trim_end_matches('/') {
        "/links" => None,
        p => match p.strip_prefix("/links/") {
            Some(n) if !n.is_empty() && !n.contains('/') => Some(n.to_string()),
            _ => return error(StatusCode::NOT_FOUND, format!("no such path {path:?}")),
        },
    };
    match (method, name) {
        (Method::GET, None) => respond(
            StatusCode::OK,
            &Links {
                links: links.iter().map(|(n, l)| (n.clone(), l.status())).collect(),
            },
        ),
        (Method::GET, Some(name)) => match links.get(&name) {
            Some(l) => respond(StatusCode::OK, &l.status()),
            None => not_found(&name),
        },
        (Method::PUT, Some(name)) => {
            let Some(link) = links.get(&name) else {
                return not_found(&name);
            };
            let body = match read_json(req).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            let change = match Change::from_json(&body) {
                Ok(c) => c,
                Err(e) => return bad_request(&e),
            };
            match link.set(&change) {
                Ok(_) => respond(StatusCode::OK, &link.status()),
                Err(e) => bad_request(&e),
            }
        }
        (Method::PUT, None) => {
            let body = match read_json(req).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            let (names, change) = match parse_many(&body) {
                Ok(x) => x,
                Err(e) => return bad_request(&e),
            };
            match relay::set_many(|n| links.get(n), &names, &change) {
                Ok(changed) => respond(
                    StatusCode::OK,
                    &Links {
                        links: changed
                            .into_iter()
                            .map(|l| {
                                let s = l.status();
                                (s.name.clone(), s)
                            })
                            .collect(),
                    },
                ),
                Err(SetError::Invalid(e)) => bad_request(&e),
                Err(e @ SetError::UnknownLinks(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
            }
        }
        (m, _) => method_not_allowed(&m),
    }
}

/// Reads `{"links":[names], ...change}`.
fn parse_many(body: &Value) -> Result<(Vec<String>, Change), InvalidChange> {
    let Value::Object(map) = body else {
        return Err(InvalidChange::new("body", "expected a JSON object"));
    };
    let names = match map.get("links") {
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(InvalidChange::new(
                    "links",
                    format!("expected link names (strings), got {other}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => {
            return Err(InvalidChange::new("links", "must name at least one link"))
        }
        Some(other) => {
            return Err(InvalidChange::new(
                "links",
                format!("expected an array of link names, got {other}"),
            ))
        }
        None => {
            return Err(InvalidChange::new(
                "links",
                "missing (expected an array of link names)",
            ))
        }
    };
    let change = Change::from_json_map(map, &["links"])?;
    Ok((names, change))
}

/// Why a [`Client`] call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The request did not complete (connect, I/O, HTTP or timeout).
    #[error("wan-relay control {addr}: {message}")]
    Transport {
        /// The control API's address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
    /// The server answered with an error status.
    #[error("wan-relay control {addr}: HTTP {status}: {message}")]
    Status {
        /// The control API's address.
        addr: SocketAddr,
        /// The HTTP status (400 for an invalid change, 404 for an unknown link).
        status: u16,
        /// The server's error message.
        message: String,
    },
    /// The server's answer could not be decoded.
    #[error("wan-relay control {addr}: unexpected response: {message}")]
    Decode {
        /// The control API's address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// A typed client of the control API: one HTTP/1.1 connection per call.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
}

impl Client {
    /// A client of the control API at `addr`, with a 10 s timeout per call.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            timeout: Duration::from_secs(10),
        }
    }

    /// The same client with another timeout per call.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Every link (`GET /links`).
    pub async fn list(&self) -> Result<BTreeMap<String, LinkStatus>, ClientError> {
        let links: Links = self.call(Method::GET, "/links", None).await?;
        Ok(links.links)
    }

    /// One link (`GET /links/NAME`).
    pub async fn get(&self, name: &str) -> Result<LinkStatus, ClientError> {
        self.call(Method::GET, &format!("/links/{name}"), None)
            .await
    }

    /// Changes one link (`PUT /links/NAME`); returns it after the change.
    pub async fn set(&self, name: &str, change: &Change) -> Result<LinkStatus, ClientError> {
        let body = Value::Object(change.to_json());
        self.call(Method::PUT, &format!("/links/{name}"), Some(body))
            .await
    }

    /// Changes several links at once, all or nothing (`PUT /links`);
    /// returns them after the change.
    pub async fn set_many<S: AsRef<str>>(
        &self,
        names: &[S],
        change: &Change,
    ) -> Result<BTreeMap<String, LinkStatus>, ClientError> {
        let mut body = change.to_json();
        body.insert(
            "links".to_string(),
            Value::from(names.iter().map(|n| n.as_ref()).collect::<Vec<_>>()),
        );
        let links: Links = self
            .call(Method::PUT, "/links", Some(Value::Object(body)))
            .await?;
        Ok(links.links)
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ClientError> {
        let addr = self.addr;
        let transport = |message: String| ClientError::Transport { addr, message };
        let (status, bytes) = tokio::time::timeout(self.timeout, self.request(method, path, body))
            .await
            .map_err(|_| transport(format!("no answer within {:?}", self.timeout)))??;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(ClientError::Status {
                addr,
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            addr,
            message: e.to_string(),
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let addr = self.addr;
        let transport = |message: String| ClientError::Transport { addr, message };
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| transport(format!("cannot connect: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(format!("HTTP handshake: {e}")))?;
        // Ends by itself once `sender` is dropped.
        let conn = tokio::spawn(conn);
        let body = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| transport(format!("cannot build the request: {e}")))?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| transport(format!("request: {e}")))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
                .collect()
                .await
                .map_err(|e| transport(format!("response body: {e}")))?
                .to_bytes();
            Ok((status, bytes))
        }
        .await;
        drop(sender);
        if result.is_err() {
            conn.abort();
        }
        result
    }
}
