//! The inbound listener: mTLS from other agents and gateways, then HTTP/1.1
//! or HTTP/2 to the local application, or the decrypted bytes spliced to it
//! for a TCP port.
//!
//! The caller's SPIFFE identity comes from its certificate; it keys the
//! inbound rate limit and is passed to the application in Istio's
//! `x-forwarded-client-cert` header (any such header from the caller is
//! replaced, never trusted).

use crate::body::{self, Body};
use crate::metrics::{LatencyLabels, LimitLabels, Metrics, RequestLabels, ServiceLabels};
use crate::pool::{Limits, Pool, Proto, Target};
use crate::ratelimit::Limiter;
use crate::reason::Reason;
use crate::tls::{peer_identity, SharedTls};
use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::server::graceful::GracefulShutdown;
use mesh_core::endpoint::Protocol;
use mesh_core::identity::Identity;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

/// A TLS handshake must complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an open connection a policy change refuses (plaintext under a
/// new STRICT, TCP under a new DENY) is drained before it is closed: HTTP
/// connections stop taking requests at once and close when the request in
/// flight ends; TCP ones are cut after this.
pub const POLICY_DRAIN: Duration = Duration::from_secs(5);

/// Header carrying the caller's identity to the application (Istio's name).
pub const XFCC: &str = "x-forwarded-client-cert";

/// Everything an inbound request needs.
pub struct Inbound {
    /// The application.
    pub app: SocketAddr,
    /// Its protocol.
    pub protocol: Protocol,
    /// This workload's identity (the `By=` of XFCC).
    pub identity: Identity,
    /// mTLS, or plaintext.
    pub tls: Option<SharedTls>,
    /// Connections to the application.
    pub pool: Pool,
    /// Per caller identity.
    pub limiter: Limiter<Identity>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// This workload's service, for metric labels.
    pub service: crate::metrics::Label,
    /// The service port (PeerAuthentication's port, `destination.port`).
    pub port: u16,
    /// The config in use: authorization and mTLS mode.
    pub table: Arc<arc_swap::ArcSwap<crate::table::Table>>,
    /// Span export, when configured.
    pub tracer: Option<crate::trace::Tracer>,
    /// Tells of each new config (its version): open connections are
    /// judged again.
    pub changes: watch::Receiver<i64>,
}

/// Where a connection comes from: its address and, when its certificate
/// was issued by the mesh CA, the caller's cluster (named by the issuing
/// intermediate).
#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    cluster: Option<Arc<str>>,
}

/// An mTLS caller, as every request of its connection needs it: its
/// identity, spelled once, and the `x-forwarded-client-cert` the
/// application is told.
struct Caller {
    id: Identity,
    principal: String,
    xfcc: Option<HeaderValue>,
}

/// A request as AuthorizationPolicy sees it.
struct AuthzReq<'a> {
    parts: &'a http::request::Parts,
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    cluster: Option<&'a str>,
    ip: std::net::IpAddr,
    port: u16,
    claims: Option<&'a serde_json::Value>,
}

impl mesh_core::policy::AuthzRequest for AuthzReq<'_> {
    fn source_principal(&self) -> Option<&str> {
        self.principal
    }
    fn jwt_claims(&self) -> Option<&serde_json::Value> {
        self.claims
    }
    fn source_namespace(&self) -> Option<&str> {
        self.namespace
    }
    fn source_cluster(&self) -> Option<&str> {
        self.cluster
    }
    fn source_ip(&self) -> Option<std::net::IpAddr> {
        Some(self.ip)
    }
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }
    fn path(&self) -> &str {
        self.parts.uri.path()
    }
    fn host(&self) -> &str {
        self.parts
            .uri
            .authority()
            .map(http::uri::Authority::as_str)
            .or_else(|| {
                self.parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
            })
            .unwrap_or("")
    }
    fn destination_port(&self) -> u16 {
        self.port
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A TCP connection as AuthorizationPolicy sees it: L4 attributes only.
struct TcpReq {
    principal: Option<String>,
    namespace: Option<String>,
    cluster: Option<Arc<str>>,
    ip: std::net::IpAddr,
    port: u16,
}

impl mesh_core::policy::AuthzRequest for TcpReq {
    fn source_principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }
    fn source_namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
    fn source_cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }
    fn source_ip(&self) -> Option<std::net::IpAddr> {
        Some(self.ip)
    }
    fn method(&self) -> &str {
        ""
    }
    fn path(&self) -> &str {
        ""
    }
    fn host(&self) -> &str {
        ""
    }
    fn destination_port(&self) -> u16 {
        self.port
    }
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
    fn is_tcp(&self) -> bool {
        true
    }
}

impl Inbound {
    /// Accepts until `stop`, then drains for up to `deadline`.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        stop: watch::Receiver<bool>,
        deadline: Duration,
    ) -> bool {
        let graceful = GracefulShutdown::new();
        let mut stop_accept = stop.clone();
        while let Some((tcp, peer)) =
            crate::serve::accept("inbound", &listener, &mut stop_accept).await
        {
            let this = self.clone();
            let watcher = graceful.watcher();
            let stop = stop.clone();
            tokio::spawn(async move { this.connection(tcp, peer, watcher, stop).await });
        }
        drop(listener);
        crate::serve::drain("inbound", stop, graceful, deadline).await
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        addr: SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
        stop: watch::Receiver<bool>,
    ) {
        // Changes from now on: one published while this connection is judged
        // is seen by the watch below.
        let mut changes = self.changes.clone();
        changes.borrow_and_update();
        let peer = Peer {
            addr,
            cluster: None,
        };
        let Some(tls) = self.tls.as_ref().map(|t| t.load_full()) else {
            self.metrics.inbound_connections.inc();
            let this = self.clone();
            if self.protocol == Protocol::Tcp {
                self.tcp(tcp, None, peer, false, changes).await;
                return;
            }
            crate::serve::watched(
                tcp,
                move |req| this.clone().handle(req, None, peer.clone()),
                watcher,
            );
            return;
        };
        // PeerAuthentication: STRICT takes mTLS only; PERMISSIVE (Istio's
        // default) and DISABLE take plaintext too, told apart from TLS by
        // the first byte (a TLS handshake record starts with 0x16).
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        if first[0] != 0x16 {
            if self.table.load().mtls_mode(self.port) == mesh_core::policy::MtlsMode::Strict {
                debug!(peer = %peer.addr, "plaintext refused: PeerAuthentication is STRICT");
                self.metrics.inbound_connections_denied.inc();
                return;
            }
            self.metrics.inbound_connections.inc();
            if self.protocol == Protocol::Tcp {
                self.tcp(tcp, None, peer, true, changes).await;
                return;
            }
            // A change to STRICT ends it (after the request in flight).
            let revoked = self.clone().until_strict(changes);
            let this = self.clone();
            crate::serve::watched_revocable(
                tcp,
                move |req| this.clone().handle(req, None, peer.clone()),
                watcher,
                stop,
                revoked,
                POLICY_DRAIN,
            );
            return;
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(peer = %peer.addr, "inbound TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(peer = %peer.addr, "inbound TLS handshake timed out");
                return;
            }
        };
        self.metrics.inbound_connections.inc();
        let certs = stream.get_ref().1.peer_certificates();
        let caller = certs.and_then(|c| c.first()).and_then(peer_identity);
        let peer = Peer {
            addr: peer.addr,
            cluster: certs.and_then(crate::tls::peer_cluster).map(Arc::from),
        };
        // A TCP port is served as TCP whatever ALPN the caller offered: an
        // HTTP request to it would be judged as HTTP, which TCP policy is not.
        if self.protocol == Protocol::Tcp {
            self.tcp(stream, caller, peer, false, changes).await;
            return;
        }
        let caller = caller.map(|id| {
            let principal = id.to_string();
            let xfcc = HeaderValue::try_from(format!("By={};URI={principal}", self.identity)).ok();
            Arc::new(Caller {
                id,
                principal,
                xfcc,
            })
        });
        let this = self.clone();
        crate::serve::watched(
            stream,
            move |req| this.clone().handle(req, caller.clone(), peer.clone()),
            watcher,
        );
    }

    /// Serves a TCP connection: AuthorizationPolicy on its L4 attributes
    /// decides at once, and again at each config change (a connection the
    /// new config refuses is closed after [`POLICY_DRAIN`]).
    async fn tcp<S>(
        self: &Arc<Self>,
        s: S,
        caller: Option<Identity>,
        peer: Peer,
        plaintext: bool,
        changes: watch::Receiver<i64>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let req = TcpReq {
            principal: caller.as_ref().map(ToString::to_string),
            namespace: caller.as_ref().map(|c| c.namespace.as_str().to_string()),
            cluster: peer.cluster,
            ip: peer.addr.ip(),
            port: self.port,
        };
        if let Some(why) = self.tcp_refusal(&req, plaintext) {
            warn!(caller = ?req.principal, peer = %peer.addr, reason = %why, "TCP connection denied");
            self.metrics.inbound_connections_denied.inc();
            return;
        }
        let revoked = self.clone().until_refused(req, plaintext, changes);
        splice_to_app(s, self.app, revoked).await;
    }

    /// Why the config in use refuses a TCP connection, if it does.
    fn tcp_refusal(&self, req: &TcpReq, plaintext: bool) -> Option<String> {
        let table = self.table.load();
        if plaintext && table.mtls_mode(self.port) == mesh_core::policy::MtlsMode::Strict {
            return Some("plaintext, and PeerAuthentication is STRICT".into());
        }
        let d = table.authorize(req);
        (!d.allowed).then_some(d.reason)
    }

    /// Completes when a new config refuses the connection `req`.
    async fn until_refused(
        self: Arc<Self>,
        req: TcpReq,
        plaintext: bool,
        mut changes: watch::Receiver<i64>,
    ) {
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Some(why) = self.tcp_refusal(&req, plaintext) {
                warn!(caller = ?req.principal, peer = %req.ip, reason = %why, drain = ?POLICY_DRAIN,
                    "closing a TCP connection the new config refuses");
                self.metrics.inbound_connections_denied.inc();
                return;
            }
        }
    }

    /// Completes when a new config makes this port STRICT.
    async fn until_strict(self: Arc<Self>, mut changes: watch::Receiver<i64>) {
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.table.load().mtls_mode(self.port) == mesh_core::policy::MtlsMode::Strict {
                debug!("closing a plaintext connection: PeerAuthentication is now STRICT");
                self.metrics.inbound_connections_denied.inc();
                return;
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        caller: Option<Arc<Caller>>,
        peer: Peer,
    ) -> Response<Body> {
        let start = Instant::now();
        // The calling cluster, for metrics: the caller's certificate says it
        // best; else its agent's header (mTLS callers only); else the
        // caller is outside the mesh.
        let said = req
            .headers_mut()
            .remove(crate::metrics::SOURCE_CLUSTER_HEADER)
            .filter(|_| caller.is_some());
        let source_cluster = peer.cluster.clone().unwrap_or_else(|| {
            said.as_ref()
                .and_then(|v| v.to_str().ok())
                .filter(|c| mesh_core::name::ClusterName::new(c).is_ok())
                .map_or_else(|| "external".into(), Into::into)
        });
        let mut span = crate::trace::ReqSpan::start(
            self.tracer.as_ref(),
            &mut req,
            opentelemetry::trace::SpanKind::Server,
            || format!("{}:{}", self.service, self.port),
        );
        span.attrs(|| {
            use opentelemetry::KeyValue;
            let mut v = vec![
                KeyValue::new("fedmesh.service", self.service.to_string()),
                KeyValue::new("client.address", peer.addr.ip().to_string()),
                KeyValue::new("client.port", i64::from(peer.addr.port())),
                KeyValue::new("server.address", self.app.to_string()),
            ];
            if let Some(c) = &caller {
                v.push(KeyValue::new("fedmesh.peer_identity", c.principal.clone()));
            }
            if let Some(c) = &peer.cluster {
                v.push(KeyValue::new("fedmesh.source_cluster", c.to_string()));
            }
            v
        });
        let labels = ServiceLabels {
            direction: "inbound",
            service: self.service.clone(),
        };
        let active = self.metrics.active.get_or_create(&labels).clone();
        active.inc();
        let resp = self.forward(req, caller.as_deref(), peer).await;
        active.dec();
        span.end(resp.status().as_u16());
        let latency = LatencyLabels {
            direction: "inbound",
            service: self.service.clone(),
            source_cluster,
            destination_cluster: self.table.load().cluster_label().clone(),
        };
        self.metrics
            .latency
            .get_or_create(&latency)
            .observe(start.elapsed().as_secs_f64());
        self.metrics
            .load
            .inbound
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .requests
            .get_or_create(&RequestLabels::of(
                latency,
                resp.status().as_u16(),
                crate::reason::Reason::of(&resp),
            ))
            .inc();
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        caller: Option<&Caller>,
        peer: Peer,
    ) -> Response<Body> {
        if !self.limiter.is_empty() {
            let key = caller.map_or_else(|| self.identity.clone(), |c| c.id.clone());
            if let Err(wait) = self.limiter.check(&key) {
                self.metrics
                    .rate_limited
                    .get_or_create(&LimitLabels {
                        direction: "inbound",
                        key: key.to_string().into(),
                    })
                    .inc();
                return crate::ratelimit::refused(&key, wait);
            }
        }
        let (mut parts, b) = req.into_parts();
        let table = self.table.load();
        // RequestAuthentication: a token present must be valid.
        let claims = match crate::jwt::authenticate(table.jwt_rules(), &mut parts).await {
            Ok(c) => c,
            Err(why) => {
                debug!(%why, "JWT refused");
                return body::local_reply(
                    StatusCode::UNAUTHORIZED,
                    Reason::JwtInvalid,
                    &format!("Jwt verification fails: {why}"),
                );
            }
        };
        // AuthorizationPolicy: DENY first, then ALLOW (Istio's order).
        let decision = table.authorize(&AuthzReq {
            parts: &parts,
            principal: caller.map(|c| c.principal.as_str()),
            namespace: caller.map(|c| c.id.namespace.as_str()),
            cluster: peer.cluster.as_deref(),
            ip: peer.addr.ip(),
            port: self.port,
            claims: claims.as_ref(),
        });
        if !decision.allowed {
            warn!(caller = ?caller.map(|c| &c.principal), method = %parts.method, path = %parts.uri.path(),
                policy = ?decision.policy, reason = %decision.reason, "request denied");
            return body::local_reply(
                StatusCode::FORBIDDEN,
                Reason::Denied,
                &format!("RBAC: access denied ({})", decision.reason),
            );
        }
        body::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(XFCC);
        if let Some(v) = caller.and_then(|c| c.xfcc.clone()) {
            parts.headers.insert(XFCC, v);
        }
        let proto = match self.protocol {
            Protocol::Http2 | Protocol::Grpc => Proto::H2,
            _ if parts.version == Version::HTTP_2 => Proto::H2,
            _ => Proto::H1,
        };
        // The application sees an origin-form request with a Host header.
        if proto == Proto::H1 {
            if let Some(a) = parts.uri.authority().cloned() {
                if !parts.headers.contains_key(http::header::HOST) {
                    if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                        parts.headers.insert(http::header::HOST, v);
                    }
                }
            }
            // (CONNECT's target is its authority: left as it is.)
            if parts.method != http::Method::CONNECT
                && (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
            {
                parts.uri = crate::outbound::origin_form(&parts.uri);
            }
            parts.version = Version::HTTP_11;
        } else {
            parts.version = Version::HTTP_2;
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str)
                .to_string();
            let authority = parts
                .uri
                .authority()
                .map(ToString::to_string)
                .or_else(|| {
                    parts
                        .headers
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| self.app.to_string());
            parts.uri = format!("http://{authority}{pq}")
                .parse()
                .unwrap_or_default();
        }
        let target = Target {
            addr: self.app,
            sni: None,
            proto,
        };
        let req = Request::from_parts(parts, body::incoming(b));
        match self.pool.send(&target, req, Limits::default()).await {
            Ok(resp) => {
                let (mut parts, b) = resp.into_parts();
                body::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body::incoming(b))
            }
            Err(e) => {
                warn!(app = %self.app, "application unavailable: {e}");
                body::local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::AppUnavailable,
                    &format!("the application at {} is unavailable", self.app),
                )
            }
        }
    }
}

/// Copies bytes both ways between a (decrypted) caller and the
/// application, until either side closes, or for [`POLICY_DRAIN`] more
/// once `revoked` completes.
async fn splice_to_app<S>(mut s: S, app: SocketAddr, revoked: impl std::future::Future<Output = ()>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut a = match TcpStream::connect(app).await {
        Ok(a) => a,
        Err(e) => {
            warn!(%app, "application unavailable for a TCP connection: {e}");
            return;
        }
    };
    let _ = a.set_nodelay(true);
    let copy = tokio::io::copy_bidirectional(&mut s, &mut a);
    tokio::pin!(copy);
    tokio::pin!(revoked);
    tokio::select! {
        _ = &mut copy => return,
        () = &mut revoked => {}
    }
    let _ = tokio::time::timeout(POLICY_DRAIN, copy).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::tests::returned_size;

    #[test]
    fn the_request_future_stays_small() {
        let n = returned_size(
            |(i, r, c, p): (Arc<Inbound>, Request<Incoming>, Option<Arc<Caller>>, Peer)| {
                i.handle(r, c, p)
            },
        );
        println!("inbound: {n} bytes per request future");
        assert!(n <= 5 * 1024, "{n} bytes");
    }
}
