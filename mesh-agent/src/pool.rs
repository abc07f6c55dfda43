//! Pooled upstream connections: HTTP/2 connections shared by every request
//! to the same target, HTTP/1.1 connections reused one request at a time.
//!
//! A [`Target`] is where bytes go (an endpoint's agent, or a remote
//! cluster's gateway) with the TLS server name to send (the SNI scheme from
//! mesh-core; `None` for plaintext) and the HTTP version. Requests to the
//! same service through the same gateway share connections.

use crate::body::Body;
use crate::tls::SharedTls;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

/// A byte stream to an upstream: TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// HTTP version spoken to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// HTTP/1.1, one request per connection at a time.
    H1,
    /// HTTP/2, multiplexed.
    H2,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// TLS server name; `None`: plaintext.
    pub sni: Option<Arc<str>>,
    /// HTTP version.
    pub proto: Proto,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: nothing was sent (retriable as `connect-failure`).
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// The target address.
        addr: SocketAddr,
        /// Why.
        reason: String,
        /// How far it got.
        phase: Phase,
    },
    /// The target is at its connection limit and no connection is free.
    #[error("connection pool of {0} is full")]
    Overflow(SocketAddr),
    /// The connection failed after the request was handed to it
    /// (retriable as `reset`).
    #[error("upstream reset: {0}")]
    Reset(String),
}

/// Where a connection attempt stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The TCP handshake failed or timed out: the address does not answer,
    /// whatever service is asked of it.
    Tcp,
    /// TCP connected but the TLS handshake got no answer in time: nothing
    /// answers for this server name behind the address.
    TlsSilent,
    /// The peer answered and refused (a TLS alert or close, an HTTP
    /// error), or the request could not be made: not a silence.
    Answered,
}

/// Connections per target and their limits.
pub struct Pool {
    tls: Option<SharedTls>,
    slots: Mutex<HashMap<Target, Slot>>,
    connect_timeout: Duration,
    /// Responses carry their connection's local address ([`Upstream`]).
    mark_upstream: bool,
}

#[derive(Default)]
struct Slot {
    /// The shared HTTP/2 connection and the requests it has carried.
    h2: Option<(http2::SendRequest<Body>, u32, Local)>,
    /// Idle HTTP/1.1 connections and the requests each has carried.
    h1: Vec<(http1::SendRequest<Body>, u32, Local)>,
    /// Open connections to the target.
    open: Arc<AtomicUsize>,
    /// Requests waiting for a connection.
    pending: Arc<AtomicUsize>,
}

/// Idle HTTP/1.1 connections kept per target.
const MAX_IDLE_H1: usize = 64;

/// Limits a caller applies to one request (from a DestinationRule's connectionPool).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open to one target (`tcp.maxConnections`).
    pub max_connections: usize,
    /// Connect timeout (`tcp.connectTimeout`).
    pub connect_timeout: Option<Duration>,
    /// Most requests waiting for a connection when all are busy
    /// (`http.http1MaxPendingRequests`).
    pub max_pending: usize,
    /// Requests one connection carries before it is retired
    /// (`http.maxRequestsPerConnection`; `None`: no limit).
    pub max_requests_per_connection: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: usize::MAX,
            connect_timeout: None,
            max_pending: usize::MAX,
            max_requests_per_connection: None,
        }
    }
}

/// How often a request waiting for a busy HTTP/1.1 connection looks again.
const PENDING_POLL: Duration = Duration::from_millis(2);

/// A connection checked out for one request, with the requests it carried
/// before this one.
enum Sender {
    H1(http1::SendRequest<Body>, u32, Local),
    H2(http2::SendRequest<Body>, Local),
}

/// The local address of a connection, when known.
type Local = Option<SocketAddr>;

/// Put in the extensions of every response [`Pool::send`] returns: the
/// local address of the connection it came on (the gateway, for a
/// connection through one, sees it as the client's address).
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    /// Local address of the upstream connection.
    pub local: SocketAddr,
}

impl Pool {
    /// A pool dialling with `tls` (`None`: plaintext targets only).
    pub fn new(tls: Option<SharedTls>, connect_timeout: Duration) -> Self {
        Self {
            tls,
            slots: Mutex::new(HashMap::new()),
            connect_timeout,
            mark_upstream: false,
        }
    }

    /// Marks each response with its connection's local address
    /// ([`Upstream`], for spans), when `on`: a response extension costs
    /// allocations every request pays otherwise.
    #[must_use]
    pub fn marking_upstream(mut self, on: bool) -> Self {
        self.mark_upstream = on;
        self
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pool dialling as this one does, with nothing in it: for a probe
    /// that outlives the request that started it.
    pub fn dialer(&self) -> Self {
        Self::new(self.tls.clone(), self.connect_timeout)
    }

    /// Forgets the pooled connections to `t` (they stopped answering);
    /// requests on them end with their own futures.
    pub fn evict(&self, t: &Target) {
        if let Some(slot) = self.slots().get_mut(t) {
            slot.h2 = None;
            slot.h1.clear();
        }
    }

    /// Open connections to `t`.
    pub fn open_connections(&self, t: &Target) -> usize {
        self.slots()
            .get(t)
            .map_or(0, |s| s.open.load(Ordering::Relaxed))
    }

    /// Sends `req` to `t` on a pooled connection, or a new one.
    pub async fn send(
        &self,
        t: &Target,
        req: Request<Body>,
        limits: Limits,
    ) -> Result<Response<Incoming>, SendError> {
        // Connecting (TCP and TLS handshakes) and waiting for a connection
        // are boxed: the request's future, which hyper keeps for every
        // connection even idle, stays the size of the pooled path.
        let sender = match self.checkout(t, limits) {
            Ok(Some(s)) => s,
            Ok(None) => Box::pin(self.connect(t, limits)).await?,
            Err(SendError::Overflow(_)) => Box::pin(self.wait_for_connection(t, limits)).await?,
            Err(e) => return Err(e),
        };
        let mut resp = match sender {
            Sender::H2(mut s, local) => s
                .send_request(req)
                .await
                .map(|r| (r, local))
                .map_err(|e| SendError::Reset(e.to_string())),
            Sender::H1(mut s, used, local) => {
                s.ready()
                    .await
                    .map_err(|e| SendError::Reset(e.to_string()))?;
                let resp = s
                    .send_request(req)
                    .await
                    .map_err(|e| SendError::Reset(e.to_string()))?;
                // Ready again once this response's body is read; checked on
                // checkout. A connection at its request limit is dropped
                // instead: it closes once this response is read.
                let used = used.saturating_add(1);
                if limits.max_requests_per_connection.is_none_or(|m| used < m) {
                    let mut slots = self.slots();
                    let slot = slots.entry(t.clone()).or_default();
                    if slot.h1.len() < MAX_IDLE_H1 {
                        slot.h1.push((s, used, local));
                    }
                }
                Ok((resp, local))
            }
        }?;
        if let Some(local) = resp.1.filter(|_| self.mark_upstream) {
            resp.0.extensions_mut().insert(Upstream { local });
        }
        Ok(resp.0)
    }

    /// Every connection to `t` is busy and no more may be opened: wait for
    /// one, as one of at most `max_pending` waiting requests, up to the
    /// connect timeout.
    async fn wait_for_connection(&self, t: &Target, limits: Limits) -> Result<Sender, SendError> {
        let pending = self.slots().entry(t.clone()).or_default().pending.clone();
        if pending.fetch_add(1, Ordering::AcqRel) >= limits.max_pending {
            pending.fetch_sub(1, Ordering::AcqRel);
            return Err(SendError::Overflow(t.addr));
        }
        let _waiting = OpenGuard(pending);
        let deadline =
            tokio::time::Instant::now() + limits.connect_timeout.unwrap_or(self.connect_timeout);
        loop {
            tokio::time::sleep(PENDING_POLL).await;
            match self.checkout(t, limits) {
                Ok(Some(s)) => return Ok(s),
                Ok(None) => return self.connect(t, limits).await,
                Err(_) if tokio::time::Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A usable pooled connection; `Err(Overflow)` when none is free and the
    /// target is at its connection limit.
    fn checkout(&self, t: &Target, limits: Limits) -> Result<Option<Sender>, SendError> {
        let mut slots = self.slots();
        let slot = slots.entry(t.clone()).or_default();
        match t.proto {
            Proto::H2 => {
                if let Some((s, used, local)) = &mut slot.h2 {
                    if !s.is_closed() {
                        *used = used.saturating_add(1);
                        let sender = Sender::H2(s.clone(), *local);
                        // At its limit the connection takes no new request;
                        // it closes when the streams on it end.
                        if limits
                            .max_requests_per_connection
                            .is_some_and(|m| *used >= m)
                        {
                            slot.h2 = None;
                        }
                        return Ok(Some(sender));
                    }
                    slot.h2 = None;
                }
            }
            Proto::H1 => {
                slot.h1.retain(|(s, _, _)| !s.is_closed());
                if let Some(i) = slot.h1.iter().position(|(s, _, _)| s.is_ready()) {
                    let (s, used, local) = slot.h1.swap_remove(i);
                    return Ok(Some(Sender::H1(s, used, local)));
                }
            }
        }
        // Reserve the connection now, so concurrent requests cannot all
        // see room for one more; `connect` takes the reservation over.
        if slot.open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            slot.open.fetch_sub(1, Ordering::AcqRel);
            return Err(SendError::Overflow(t.addr));
        }
        Ok(None)
    }

    /// A connection for opaque TCP: mTLS without ALPN (the peer splices it
    /// to its application), or plaintext. Not pooled: one per client connection.
    pub async fn dial_tcp(
        &self,
        addr: SocketAddr,
        sni: Option<&str>,
        limits: Limits,
    ) -> Result<Box<dyn Io>, SendError> {
        let err = |reason: String| SendError::Connect {
            addr,
            reason,
            phase: Phase::Answered,
        };
        let gone = |reason: String| SendError::Connect {
            addr,
            reason,
            phase: Phase::Tcp,
        };
        let silent = |reason: String| SendError::Connect {
            addr,
            reason,
            phase: Phase::TlsSilent,
        };
        let timeout = limits.connect_timeout.unwrap_or(self.connect_timeout);
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(gone(e.to_string())),
            Err(_) => return Err(gone(format!("timed out after {timeout:?}"))),
        };
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.as_ref().map(|t| t.load_full());
        match (sni, &tls) {
            (Some(sni), Some(tls)) => {
                let name = ServerName::try_from(sni.to_string())
                    .map_err(|e| err(format!("server name {sni:?}: {e}")))?;
                let s = tokio::time::timeout(
                    timeout,
                    tokio_rustls::TlsConnector::from(tls.client_tcp.clone()).connect(name, tcp),
                )
                .await
                .map_err(|_| silent(format!("TLS handshake timed out after {timeout:?}")))?
                .map_err(|e| err(format!("TLS handshake: {e}")))?;
                Ok(Box::new(s))
            }
            (Some(_), None) => Err(err("TLS target, but this agent runs in plaintext".into())),
            (None, _) => Ok(Box::new(tcp)),
        }
    }

    async fn connect(&self, t: &Target, limits: Limits) -> Result<Sender, SendError> {
        let err = |reason: String| SendError::Connect {
            addr: t.addr,
            reason,
            phase: Phase::Answered,
        };
        let gone = |reason: String| SendError::Connect {
            addr: t.addr,
            reason,
            phase: Phase::Tcp,
        };
        let silent = |reason: String| SendError::Connect {
            addr: t.addr,
            reason,
            phase: Phase::TlsSilent,
        };
        // The reservation `checkout` made; released if this fails.
        let reserved = OpenGuard(self.slots().entry(t.clone()).or_default().open.clone());
        let timeout = limits.connect_timeout.unwrap_or(self.connect_timeout);
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(t.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(gone(e.to_string())),
            Err(_) => return Err(gone(format!("timed out after {timeout:?}"))),
        };
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let open = reserved;
        let tls = self.tls.as_ref().map(|t| t.load_full());
        let sender = match (&t.sni, &tls) {
            (Some(sni), Some(tls)) => {
                let cfg = match t.proto {
                    Proto::H2 => tls.client_h2.clone(),
                    Proto::H1 => tls.client_h1.clone(),
                };
                let name = ServerName::try_from(sni.to_string())
                    .map_err(|e| err(format!("server name {sni:?}: {e}")))?;
                let stream = tokio::time::timeout(
                    timeout,
                    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
                )
                .await
                .map_err(|_| silent(format!("TLS handshake timed out after {timeout:?}")))?
                .map_err(|e| err(format!("TLS handshake: {e}")))?;
                handshake(stream, t.proto, open, local).await
            }
            (Some(_), None) => {
                return Err(err("TLS target, but this agent runs in plaintext".into()));
            }
            (None, _) => handshake(tcp, t.proto, open, local).await,
        }
        .map_err(|e| err(format!("HTTP handshake: {e}")))?;
        debug!(target = %t.addr, sni = ?t.sni, proto = ?t.proto, "connected");
        if let Sender::H2(s, local) = &sender {
            if limits.max_requests_per_connection.is_none_or(|m| m > 1) {
                self.slots().entry(t.clone()).or_default().h2 = Some((s.clone(), 1, *local));
            }
        }
        Ok(sender)
    }
}

/// Runs the HTTP handshake and spawns the connection; `guard` keeps it
/// counted as open while it lives.
async fn handshake<I>(io: I, proto: Proto, guard: OpenGuard, local: Local) -> hyper::Result<Sender>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    match proto {
        Proto::H1 => {
            let (s, conn) = http1::handshake(io).await?;
            tokio::spawn(async move {
                let _guard = guard;
                let _ = conn.await;
            });
            Ok(Sender::H1(s, 0, local))
        }
        Proto::H2 => {
            let (s, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                let _guard = guard;
                let _ = conn.await;
            });
            Ok(Sender::H2(s, local))
        }
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
