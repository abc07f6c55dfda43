//! The data path: accept, read the ClientHello (and keep it), route on its
//! server name, connect to a local endpoint, replay the hello, splice.
//!
//! A refused connection is closed with no byte sent: a scanner learns
//! nothing about which services exist. Every connection, routed or not,
//! ends in one JSON access-log line (written from a guard's `Drop`, so also
//! when its task is cancelled) and in the metrics.
//!
//! A connection from a `--proxy-protocol-from` network (an L4 load balancer
//! or relay in front of the gateway) must start with a PROXY protocol v2
//! header, read before the ClientHello under the same deadline. Its source
//! address then stands for the peer: in the access log, the peer-cluster
//! lookup (the `source_cluster` label) and the connection span. The
//! per-source rate limit, applied at accept before any byte is read, stays
//! keyed by the TCP peer. Other peers are never parsed for a header, and
//! may each hold at most `--max-connections-per-source` connections (a
//! relay's peer is exempt: many sources share its address).

use crate::config::{Balance, Cidr, Config};
use crate::hello::{self, HelloError, Peek};
use crate::metrics::{ByteLabels, ConnLabels, Direction, Metrics, Reject};
use crate::route::{Backends, NoRoute, Table};
use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use mesh_core::proxy_protocol;
use prometheus_client::metrics::counter::Counter;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// First size of a ClientHello buffer. Real hellos are 250 to 600 bytes
/// (see testdata/); post-quantum ones about 1.8 KiB and grow it once.
const HELLO_BUF: usize = 1024;
/// Splice buffers start at 1 KiB, so an idle connection holds 2 KiB, and
/// grow 4x after each read that fills them, up to 64 KiB for bulk transfers.
const COPY_BUF_MIN: usize = 1024;
const COPY_BUF_MAX: usize = 64 * 1024;
/// Endpoints tried per connection before giving up (Envoy's default
/// connect retry is 1 retry; we try up to 3 distinct endpoints).
const CONNECT_ATTEMPTS: usize = 3;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// Largest PROXY header accepted after its 16 fixed bytes: addresses and
/// TLVs (AWS NLB's are a few dozen bytes).
const PROXY_HEADER_MAX: usize = proxy_protocol::DEFAULT_MAX_LEN;

/// The bytes ClientHello buffers hold beyond the first [`HELLO_BUF`] of
/// each, across connections (`--max-handshake-memory`): what half-open
/// handshakes can make the gateway hold is bounded by this, not by the
/// number of connections times the largest hello.
pub struct HelloBudget {
    used: std::sync::atomic::AtomicUsize,
    max: usize,
    /// Follows `used`, for `/metrics`.
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl HelloBudget {
    /// A budget of `max` bytes, reported on `gauge`.
    pub fn new(max: usize, gauge: prometheus_client::metrics::gauge::Gauge) -> Arc<Self> {
        Arc::new(Self {
            used: std::sync::atomic::AtomicUsize::new(0),
            max,
            gauge,
        })
    }

    fn report(&self) {
        self.gauge
            .set(i64::try_from(self.used.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// One buffer's share of the [`HelloBudget`]; given back when dropped.
struct Reservation {
    budget: Arc<HelloBudget>,
    bytes: usize,
}

impl Reservation {
    /// Reserves what a buffer of `len` bytes needs beyond [`HELLO_BUF`];
    /// false if the budget has not that much left.
    fn grow_to(&mut self, len: usize) -> bool {
        let want = len.saturating_sub(HELLO_BUF);
        if want <= self.bytes {
            return true;
        }
        let extra = want - self.bytes;
        let max = self.budget.max;
        let ok = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + extra <= max).then_some(u + extra)
            })
            .is_ok();
        if ok {
            self.bytes = want;
            self.budget.report();
        }
        ok
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.budget.report();
        }
    }
}

/// A ClientHello's bytes with their share of the budget (none for a hello
/// that fits in its first [`HELLO_BUF`], as real ones do).
struct HelloBuf {
    bytes: Vec<u8>,
    _held: Option<Reservation>,
}

/// Open connections by source address, for the per-source cap.
#[derive(Default)]
struct PerSource {
    open: std::sync::Mutex<std::collections::HashMap<IpAddr, u32>>,
}

/// One connection counted against its source; uncounted when dropped.
struct SourceSlot {
    counts: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    /// A slot for `ip` if it holds fewer than `max` connections.
    fn take(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<SourceSlot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self
            .counts
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // The map holds only sources with connections open.
                open.remove(&self.ip);
            }
        }
    }
}

/// What a connection needs from the gateway; shared by all connections.
pub struct Proxy {
    routes: Arc<ArcSwap<Table>>,
    metrics: Arc<Metrics>,
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Connections one source may hold, and what each holds.
    per_source: Option<(u32, Arc<PerSource>)>,
    /// One permit per open connection; all permits back means drained.
    pub conns: Arc<Semaphore>,
    max_connections: u32,
    handshake_timeout: Duration,
    /// Peers that must send a PROXY protocol v2 header first.
    proxy_protocol_from: Vec<Cidr>,
    max_client_hello: usize,
    /// ClientHello buffers' budget.
    pub hello_budget: Arc<HelloBudget>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    balance: Balance,
    access_log: bool,
    /// Connection spans, when exported.
    pub tracing: Option<crate::trace::Tracing>,
    /// This gateway's cluster: every connection's destination.
    cluster: String,
}

impl Proxy {
    /// A proxy routing by `routes`.
    pub fn new(cfg: &Config, routes: Arc<ArcSwap<Table>>, metrics: Arc<Metrics>) -> Self {
        let hello_budget =
            HelloBudget::new(cfg.max_handshake_memory, metrics.handshake_memory.clone());
        let max =
            u32::try_from(cfg.max_connections.min(Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        Self {
            routes,
            metrics,
            limiter: cfg
                .rate_limit_per_source
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
            per_source: cfg
                .max_connections_per_source
                .map(|n| (n.get(), Arc::new(PerSource::default()))),
            conns: Arc::new(Semaphore::new(max as usize)),
            max_connections: max,
            handshake_timeout: cfg.handshake_timeout,
            proxy_protocol_from: cfg.proxy_protocol_from.clone(),
            max_client_hello: cfg.max_client_hello,
            hello_budget,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            balance: cfg.balance,
            access_log: cfg.access_log,
            tracing: None,
            cluster: cfg.cluster.to_string(),
        }
    }

    /// Accepts until `stop` turns true; connections close when `force` does.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        mut stop: watch::Receiver<bool>,
        force: watch::Receiver<bool>,
    ) {
        let mut since_gc = Instant::now();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            if let Some(l) = &self.limiter {
                if l.check_key(&peer.ip()).is_err() {
                    self.refuse(peer, Reject::RateLimited);
                    continue;
                }
                // The limiter keeps a cell per source address; forget idle ones now and then.
                if since_gc.elapsed() > Duration::from_secs(60) {
                    l.retain_recent();
                    since_gc = Instant::now();
                }
            }
            // A relay's peers are many sources behind one address: its
            // share is the whole gateway's.
            let slot = match &self.per_source {
                Some((max, counts)) if !self.must_send_proxy_header(peer.ip()) => {
                    match counts.take(peer.ip(), *max) {
                        Some(s) => Some(s),
                        None => {
                            self.refuse(peer, Reject::SourceConnectionLimit);
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                self.refuse(peer, Reject::ConnectionLimit);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let force = force.clone();
            tokio::spawn(async move {
                let _slot = slot;
                this.serve(stream, peer, permit, force).await;
            });
        }
    }

    /// Counts and logs a connection refused at accept (it is dropped, i.e. closed).
    fn refuse(&self, peer: SocketAddr, r: Reject) {
        self.rejected(
            AccessLog::new(peer, self.metrics.clone(), self.access_log),
            r,
        );
    }

    /// Open connections now.
    pub fn open(&self) -> u32 {
        self.max_connections - u32::try_from(self.conns.available_permits()).unwrap_or(0)
    }

    /// Whether `ip` must send a PROXY protocol header first.
    fn must_send_proxy_header(&self, ip: IpAddr) -> bool {
        self.proxy_protocol_from.iter().any(|n| n.contains(ip))
    }

    async fn serve(
        &self,
        mut client: TcpStream,
        mut peer: SocketAddr,
        _permit: OwnedSemaphorePermit,
        mut force: watch::Receiver<bool>,
    ) {
        let mut log = AccessLog::open(peer, self.metrics.clone(), self.access_log);
        let accepted_at = self.tracing.as_ref().map(|_| std::time::SystemTime::now());
        // One deadline for the PROXY header (if any) and the ClientHello.
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        if self.must_send_proxy_header(peer.ip()) {
            let header = tokio::select! {
                h = tokio::time::timeout_at(deadline, proxy_protocol::read_v2(&mut client, PROXY_HEADER_MAX)) => h,
                _ = force.wait_for(|f| *f) => return log.close("drained"),
            };
            match header {
                Err(_) => return self.rejected(log, Reject::HandshakeTimeout),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "connection refused: no valid PROXY protocol v2 header");
                    let r = match e {
                        // Connected and closed without a byte (a TCP health
                        // check), or reset: as a client leaving mid-hello.
                        proxy_protocol::Error::Truncated { got: 0, .. }
                        | proxy_protocol::Error::Io(_) => Reject::ClientClosed,
                        _ => Reject::ProxyProtocol,
                    };
                    return self.rejected(log, r);
                }
                // LOCAL, or no TCP addresses: the relay's own connection.
                Ok(Ok(h)) => {
                    if let Some(source) = h.source {
                        log.via = Some(peer);
                        log.peer = source;
                        peer = source;
                    }
                }
            }
        }
        let hello = tokio::select! {
            h = tokio::time::timeout_at(deadline, read_hello(&mut client, self.max_client_hello, &self.hello_budget)) => h,
            _ = force.wait_for(|f| *f) => return log.close("drained"),
        };
        let (buf, server_name) = match hello {
            Err(_) => return self.rejected(log, Reject::HandshakeTimeout),
            Ok(Err(r)) => return self.rejected(log, r),
            Ok(Ok(h)) => h,
        };
        let Some(server_name) = server_name else {
            return self.rejected(log, Reject::NoSni);
        };
        let table = self.routes.load();
        let routed = table.route(&server_name);
        log.sni = Some(server_name);
        let (backends, sni) = match routed {
            Ok(r) => r,
            Err(e) => {
                let r = match e {
                    NoRoute::MalformedSni => Reject::MalformedSni,
                    NoRoute::UnknownService => Reject::UnknownService,
                    NoRoute::NotExported => Reject::NotExported,
                    NoRoute::NoHealthyEndpoint => Reject::NoHealthyEndpoint,
                };
                return self.rejected(log, r);
            }
        };
        log.service = Some(backends.service.clone());
        let peer_cluster = table
            .peer(peer.ip())
            .map_or_else(|| "unknown".to_string(), ToString::to_string);
        drop(table);
        let mut span = match (&self.tracing, accepted_at) {
            (Some(t), Some(at)) => Some(t.connection(
                at,
                log.sni.as_deref().unwrap_or_default(),
                peer,
                &peer_cluster,
                backends.service.as_ref(),
            )),
            _ => None,
        };
        let subset = sni
            .as_ref()
            .and_then(|s| s.subset.as_ref())
            .map(|s| s.as_str().to_string());
        let (idx, upstream) = match self.connect(&backends, subset.as_deref()).await {
            Ok(c) => c,
            Err(r) => {
                if let Some(s) = span {
                    s.end("connect_failed", 0, 0, true);
                }
                return self.rejected(log, r);
            }
        };
        let backend = &backends.endpoints[idx];
        if let Some(s) = &mut span {
            s.endpoint(backend.addr);
        }
        log.endpoint = Some(backend.addr);
        let service = backends.service.to_string();
        self.metrics
            .connections
            .get_or_create(&ConnLabels {
                service: service.clone(),
                source_cluster: peer_cluster.clone(),
                destination_cluster: self.cluster.clone(),
            })
            .inc();
        let counter = |direction| {
            self.metrics
                .bytes
                .get_or_create(&ByteLabels {
                    service: service.clone(),
                    source_cluster: peer_cluster.clone(),
                    destination_cluster: self.cluster.clone(),
                    direction,
                })
                .clone()
        };
        let (up, down) = (counter(Direction::Upstream), counter(Direction::Downstream));
        backend.stats.active.fetch_add(1, Ordering::Relaxed);
        let outcome = splice(client, upstream, buf, self.idle_timeout, force, &up, &down).await;
        backend.stats.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(s) = span {
            s.end(outcome.reason, outcome.up, outcome.down, false);
        }
        log.up = outcome.up;
        log.down = outcome.down;
        log.close(outcome.reason);
    }

    /// Counts a refusal and writes its access-log line (the only place either happens).
    fn rejected(&self, log: AccessLog, r: Reject) {
        self.metrics.reject(r);
        drop(log.rejected(r));
    }

    /// Connects to an endpoint of `backends` (in `subset`), trying up to
    /// [`CONNECT_ATTEMPTS`] distinct ones and recording failures for ejection.
    async fn connect(
        &self,
        backends: &Backends,
        subset: Option<&str>,
    ) -> Result<(usize, TcpStream), Reject> {
        let cands = backends
            .candidates(subset)
            .ok_or(Reject::NoHealthyEndpoint)?;
        let mut tried = 0u64;
        for _ in 0..CONNECT_ATTEMPTS {
            let Some(i) = backends.pick(&cands, self.balance, tried) else {
                break;
            };
            if i < 64 {
                tried |= 1 << i;
            }
            let b = &backends.endpoints[i];
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(b.addr)).await {
                Ok(Ok(s)) => {
                    b.stats.success();
                    let _ = s.set_nodelay(true);
                    return Ok((i, s));
                }
                Ok(Err(e)) => {
                    debug!(endpoint = %b.addr, error = %e, "connect failed; trying another endpoint")
                }
                Err(_) => debug!(endpoint = %b.addr, "connect timed out; trying another endpoint"),
            }
            if b.stats.failure() {
                warn!(endpoint = %b.addr, service = %backends.service, "endpoint ejected after repeated connect failures");
            }
        }
        Err(Reject::ConnectFailed)
    }
}

/// Reads until the ClientHello is complete. Returns every byte read (to
/// replay) and the server name.
async fn read_hello(
    s: &mut TcpStream,
    max: usize,
    budget: &Arc<HelloBudget>,
) -> Result<(HelloBuf, Option<String>), Reject> {
    let mut buf = Vec::with_capacity(HELLO_BUF);
    // Taken at the first growth: the common hello never touches the budget.
    let mut held: Option<Reservation> = None;
    loop {
        match hello::parse(&buf, max) {
            Ok(Peek::Done(h)) => {
                return Ok((
                    HelloBuf {
                        bytes: buf,
                        _held: held,
                    },
                    h.server_name,
                ))
            }
            Ok(Peek::NeedMore(n)) => {
                // Record headers add at most 5 bytes per record; a client
                // sending tiny records cannot make us buffer more than this.
                if buf.len() + n > 2 * max {
                    return Err(Reject::HelloTooLarge);
                }
                if buf.capacity() < buf.len() + n {
                    // Doubling, so a hello in tiny records costs a few
                    // reallocations and reads, not one per record.
                    let target = (buf.len() + n).max(2 * buf.capacity()).min(2 * max);
                    let r = held.get_or_insert_with(|| Reservation {
                        budget: budget.clone(),
                        bytes: 0,
                    });
                    if !r.grow_to(target) {
                        return Err(Reject::HandshakeMemory);
                    }
                    buf.reserve_exact(target - buf.len());
                }
            }
            Err(HelloError::NotTls) => return Err(Reject::NotTls),
            Err(HelloError::NotClientHello) => return Err(Reject::NotClientHello),
            Err(HelloError::TooLarge) => return Err(Reject::HelloTooLarge),
            Err(HelloError::Malformed(_)) => return Err(Reject::MalformedHello),
        }
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(Reject::ClientClosed),
            Ok(_) => {}
        }
    }
}

/// How a spliced connection ended.
struct Outcome {
    up: u64,
    down: u64,
    reason: &'static str,
}

/// Replays `first` to the upstream, then copies both ways until both sides
/// have closed (a FIN is passed on as a FIN: half-close), either side
/// resets, nothing moves for `idle`, or `force` turns true.
///
/// The reply direction runs in a task of its own: a reply from the endpoint
/// wakes only that copy loop, not the whole connection's `select!`.
async fn splice(
    client: TcpStream,
    upstream: TcpStream,
    first: HelloBuf,
    idle: Duration,
    mut force: watch::Receiver<bool>,
    up: &Counter,
    down: &Counter,
) -> Outcome {
    let start = Instant::now();
    let io = Arc::new(Activity::default());
    let (cr, cw) = client.into_split();
    let (ur, mut uw) = upstream.into_split();
    let replayed = first.bytes.len() as u64;
    let write = uw.write_all(&first.bytes).await;
    // The hello buffer is not needed past the replay: free it (and give its
    // share of the budget back) now rather than hold it for the
    // connection's lifetime.
    drop(first);
    if write.is_err() {
        return Outcome {
            up: 0,
            down: 0,
            reason: "upstream_reset",
        };
    }
    up.inc_by(replayed);
    io.up.store(replayed, Ordering::Relaxed);
    let reply_io = io.clone();
    let reply_ctr = down.clone();
    let mut reply = tokio::spawn(async move {
        pump(
            ur,
            cw,
            &reply_io.last,
            start,
            &reply_ctr,
            &reply_io.down,
            "upstream_reset",
        )
        .await
    });
    let request = pump(cr, uw, &io.last, start, up, &io.up, "client_reset");
    tokio::pin!(request);
    let idle = idle_watch(&io.last, start, idle);
    tokio::pin!(idle);
    let (mut request_done, mut reply_done) = (false, false);
    let reason = loop {
        tokio::select! {
            r = &mut request, if !request_done => match r {
                Ok(()) if reply_done => break "done",
                Ok(()) => request_done = true,
                Err(why) => break why,
            },
            r = &mut reply, if !reply_done => match r {
                Ok(Ok(())) if request_done => break "done",
                Ok(Ok(())) => reply_done = true,
                Ok(Err(why)) => break why,
                Err(_) => break "cancelled",
            },
            () = &mut idle => break "idle_timeout",
            _ = force.wait_for(|f| *f) => break "drained",
        }
    };
    reply.abort();
    Outcome {
        up: io.up.load(Ordering::Relaxed),
        down: io.down.load(Ordering::Relaxed),
        reason,
    }
}

/// Activity of one spliced connection, shared by its two copy loops.
#[derive(Default)]
struct Activity {
    /// Milliseconds from the splice's start to the last byte either way.
    last: AtomicU64,
    /// Bytes client to endpoint (the replayed hello included).
    up: AtomicU64,
    /// Bytes endpoint to client.
    down: AtomicU64,
}

/// Copies one direction; at EOF shuts down the other side's write half.
async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    last: &AtomicU64,
    start: Instant,
    ctr: &Counter,
    total: &AtomicU64,
    on_error: &'static str,
) -> Result<(), &'static str> {
    let mut buf = vec![0u8; COPY_BUF_MIN];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => {
                // Half-close: pass the FIN on and keep the other direction open.
                let _ = w.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
            Err(_) => return Err(on_error),
        };
        if w.write_all(&buf[..n]).await.is_err() {
            return Err(if on_error == "client_reset" {
                "upstream_reset"
            } else {
                "client_reset"
            });
        }
        ctr.inc_by(n as u64);
        total.fetch_add(n as u64, Ordering::Relaxed);
        last.store(
            u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if n == buf.len() && buf.len() < COPY_BUF_MAX {
            buf.resize((buf.len() * 4).min(COPY_BUF_MAX), 0);
        }
    }
}

/// Completes once nothing has moved either way for `idle`.
async fn idle_watch(last: &AtomicU64, start: Instant, idle: Duration) {
    loop {
        let last_ms = last.load(Ordering::Relaxed);
        let deadline = start + Duration::from_millis(last_ms) + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
        if last.load(Ordering::Relaxed) == last_ms {
            return;
        }
    }
}

/// One access-log line per connection, written when dropped.
struct AccessLog {
    start: Instant,
    /// The client: the TCP peer, or the source its PROXY header named.
    peer: SocketAddr,
    /// The TCP peer, when a PROXY header replaced it.
    via: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    enabled: bool,
    /// The active gauge was incremented for this connection.
    counted: bool,
    sni: Option<String>,
    service: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    up: u64,
    down: u64,
    reject: Option<Reject>,
    reason: Option<&'static str>,
}

impl AccessLog {
    fn new(peer: SocketAddr, metrics: Arc<Metrics>, enabled: bool) -> Self {
        Self {
            start: Instant::now(),
            peer,
            via: None,
            metrics,
            enabled,
            counted: false,
            sni: None,
            service: None,
            endpoint: None,
            up: 0,
            down: 0,
            reject: None,
            reason: None,
        }
    }

    /// The guard of an accepted connection: counted in the active gauge until dropped.
    fn open(peer: SocketAddr, metrics: Arc<Metrics>, enabled: bool) -> Self {
        metrics.active.inc();
        let mut log = Self::new(peer, metrics, enabled);
        log.counted = true;
        log
    }

    fn rejected(mut self, r: Reject) -> Self {
        self.reject = Some(r);
        self
    }

    fn close(mut self, reason: &'static str) {
        self.reason = Some(reason);
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if self.counted {
            self.metrics.active.dec();
        }
        if !self.enabled {
            return;
        }
        let reason = match (self.reject, self.reason) {
            (Some(r), _) => r.as_str(),
            (None, Some(r)) => r,
            (None, None) => "cancelled",
        };
        let line = serde_json::json!({
            "source": self.peer.to_string(),
            "via": self.via.map(|v| v.to_string()),
            "sni": self.sni,
            "service": self.service.as_deref(),
            "endpoint": self.endpoint.map(|e| e.to_string()),
            "bytes_up": self.up,
            "bytes_down": self.down,
            "duration_ms": self.start.elapsed().as_secs_f64() * 1000.0,
            "close": reason,
            "rejected": self.reject.is_some(),
        });
        println!("{line}");
    }
}
