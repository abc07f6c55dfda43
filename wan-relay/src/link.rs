//! [`Link`]: listens on an address and relays each accepted TCP connection
//! to a target through the link's [`Impairment`].
//!
//! Each connection is one task owning both sockets. Per direction it keeps
//! a queue of `(release instant, bytes)`: a chunk read is queued with its
//! release time and written when that time comes, so a delay costs latency,
//! not throughput. A direction stops reading while its queue holds
//! [`LinkOptions::max_in_flight`] bytes or more (backpressure), so at most
//! `max_in_flight + read_buffer` bytes wait per direction and connection.
//! A FIN travels through the queue like data (half-close is kept).
//!
//! An I/O error on one side (a reset, or a write after the peer closed)
//! resets the other side; a target that cannot be reached within
//! [`LinkOptions::connect_timeout`] resets the client. The TCP handshake
//! itself is not delayed: the relay's kernel completes it at once.
//!
//! A link whose spec has a [source](LinkSpec::source) binds each connection
//! to the target to that local address (port chosen by the system). With
//! [`proxy_protocol`](LinkSpec::proxy_protocol), the relay writes a PROXY
//! protocol v2 header to the target as soon as it is connected, before
//! any byte of the client's: the client's address, and the address it
//! connected to (the link's). The header is written at once, outside the
//! impairment, and is not counted in `bytes_to_target`.

use crate::impairment::{Change, Impairment, InvalidChange, Mode};
use crate::spec::LinkSpec;
use crate::Error;
use bytes::{Buf, Bytes};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Per-link settings fixed at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkOptions {
    /// Most bytes queued per direction and connection before the relay
    /// stops reading (default 4 MiB); each queued chunk also counts 64
    /// bytes of bookkeeping. One read may exceed it by up to `read_buffer`
    /// bytes.
    pub max_in_flight: usize,
    /// Largest single read, i.e. the chunk size (default 16 KiB).
    pub read_buffer: usize,
    /// How long connecting to the target may take before the client is
    /// reset (default 10 s).
    #[serde(rename = "connect_timeout_ms", with = "crate::impairment::millis")]
    pub connect_timeout: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 4 << 20,
            read_buffer: 16 << 10,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl LinkOptions {
    /// Checks that sizes and the timeout are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_in_flight == 0 {
            return Err("max_in_flight must be at least 1 byte".to_string());
        }
        if !(1..=(16 << 20)).contains(&self.read_buffer) {
            return Err(format!(
                "read_buffer must be between 1 byte and 16 MiB, got {}",
                self.read_buffer
            ));
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > Duration::from_secs(3600) {
            return Err("connect_timeout must be more than 0 and at most 1 h".to_string());
        }
        Ok(())
    }
}

/// A snapshot of a link's counters. In JSON, these field names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Connections accepted since the start (including refused ones).
    pub accepted: u64,
    /// Connections being relayed (or held in a blackhole) now.
    pub active: u64,
    /// New connections reset at accept because the link was cut.
    pub refused: u64,
    /// Relayed connections reset because of the impairment: a cut, or a
    /// blackhole that lost bytes.
    pub reset: u64,
    /// Connections ended by an I/O error on one side, or whose target could
    /// not be reached (the other side is reset).
    pub errors: u64,
    /// Bytes written to targets (a PROXY protocol header is not counted).
    pub bytes_to_target: u64,
    /// Bytes written back to clients.
    pub bytes_to_client: u64,
    /// Bytes read and thrown away by a blackhole (or queued when it began).
    pub bytes_discarded: u64,
    /// Bytes read from clients and not yet written to targets, now.
    pub in_flight_to_target: u64,
    /// Bytes read from targets and not yet written to clients, now.
    pub in_flight_to_client: u64,
    /// The most bytes ever queued in one direction of one connection.
    pub peak_in_flight: u64,
}

#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    errors: AtomicU64,
    bytes_to_target: AtomicU64,
    bytes_to_client: AtomicU64,
    bytes_discarded: AtomicU64,
    in_flight_to_target: AtomicU64,
    in_flight_to_client: AtomicU64,
    peak_in_flight: AtomicU64,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn dec(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

impl Stats {
    fn snapshot(&self) -> Counters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            accepted: g(&self.accepted),
            active: g(&self.active),
            refused: g(&self.refused),
            reset: g(&self.reset),
            errors: g(&self.errors),
            bytes_to_target: g(&self.bytes_to_target),
            bytes_to_client: g(&self.bytes_to_client),
            bytes_discarded: g(&self.bytes_discarded),
            in_flight_to_target: g(&self.in_flight_to_target),
            in_flight_to_client: g(&self.in_flight_to_client),
            peak_in_flight: g(&self.peak_in_flight),
        }
    }
}

/// A link's state as the control API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The link's name.
    pub name: String,
    /// The address it listens on (the bound one, when the spec said port 0).
    pub listen: SocketAddr,
    /// Where it relays to.
    pub target: SocketAddr,
    /// The local address connections to the target are made from; `null`:
    /// the system's choice.
    #[serde(default)]
    pub source: Option<IpAddr>,
    /// Whether each connection to the target starts with a PROXY protocol
    /// v2 header.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The impairment now.
    pub impairment: Impairment,
    /// Its settings.
    pub options: LinkOptions,
    /// Its counters now.
    pub counters: Counters,
}

/// What a link's tasks and its handles share.
#[derive(Debug)]
pub(crate) struct Shared {
    name: String,
    addr: SocketAddr,
    target: SocketAddr,
    source: Option<IpAddr>,
    proxy_protocol: bool,
    options: LinkOptions,
    impairment: watch::Sender<Impairment>,
    stats: Stats,
    /// When the rate-limited wire is free again: `[to client, to target]`.
    wire: [Mutex<Option<std::time::Instant>>; 2],
}

impl Shared {
    pub(crate) fn impairment(&self) -> Impairment {
        *self.impairment.borrow()
    }

    /// Applies a change, or refuses it and changes nothing.
    pub(crate) fn set(&self, change: &Change) -> Result<Impairment, InvalidChange> {
        let mut result = Ok(self.impairment());
        self.impairment
            .send_if_modified(|cur| match cur.with(change) {
                Ok(new) => {
                    result = Ok(new);
                    let changed = new != *cur;
                    *cur = new;
                    changed
                }
                Err(e) => {
                    result = Err(e);
                    false
                }
            });
        if let Ok(new) = &result {
            tracing::info!(link = %self.name, impairment = ?new, "impairment set");
        }
        result
    }

    pub(crate) fn status(&self) -> LinkStatus {
        LinkStatus {
            name: self.name.clone(),
            listen: self.addr,
            target: self.target,
            source: self.source,
            proxy_protocol: self.proxy_protocol,
            impairment: self.impairment(),
            options: self.options,
            counters: self.stats.snapshot(),
        }
    }
}

/// A running link. Dropping it stops it like [`Link::shutdown`], without
/// waiting.
#[derive(Debug)]
pub struct Link {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Link {
    /// Binds the spec's listen address and starts relaying to its target.
    /// Fails if the spec's source address is not of the target's family or
    /// cannot be bound (not a local address).
    pub async fn bind(
        spec: &LinkSpec,
        options: LinkOptions,
        initial: Impairment,
    ) -> Result<Link, Error> {
        options.validate().map_err(Error::Options)?;
        initial.validate()?;
        spec.check().map_err(|e| Error::Options(e.to_string()))?;
        if let Some(ip) = spec.source() {
            // Fail now rather than on every connection.
            source_socket(ip, spec.target()).map_err(|e| {
                Error::Options(format!("link {}: cannot bind from={ip}: {e}", spec.name()))
            })?;
        }
        let listener = TcpListener::bind(spec.listen())
            .await
            .map_err(|source| Error::Listen {
                link: spec.name().to_string(),
                addr: spec.listen(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Listen {
            link: spec.name().to_string(),
            addr: spec.listen(),
            source,
        })?;
        let (impairment, _) = watch::channel(initial);
        let shared = Arc::new(Shared {
            name: spec.name().to_string(),
            addr,
            target: spec.target(),
            source: spec.source(),
            proxy_protocol: spec.proxy_protocol(),
            options,
            impairment,
            stats: Stats::default(),
            wire: Default::default(),
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stopped));
        tracing::info!(link = %shared.name, %addr, target = %shared.target, source = ?shared.source,
            proxy_protocol = shared.proxy_protocol, impairment = ?initial, "link listening");
        Ok(Link {
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address it listens on: the bound one, when the spec said port 0.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Where it relays to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// The local address connections to the target are made from, if set.
    pub fn source(&self) -> Option<IpAddr> {
        self.shared.source
    }

    /// Whether each connection to the target starts with a PROXY protocol
    /// v2 header.
    pub fn proxy_protocol(&self) -> bool {
        self.shared.proxy_protocol
    }

    /// Its settings.
    pub fn options(&self) -> LinkOptions {
        self.shared.options
    }

    /// The impairment now.
    pub fn impairment(&self) -> Impairment {
        self.shared.impairment()
    }

    /// Changes the impairment, for new and existing connections alike, from
    /// now on: chunks already queued keep their release time; a change of
    /// mode acts at once. An invalid change changes nothing.
    pub fn set(&self, change: &Change) -> Result<Impairment, InvalidChange> {
        self.shared.set(change)
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        self.shared.stats.snapshot()
    }

    /// Name, addresses, impairment, options and counters.
    pub fn status(&self) -> LinkStatus {
        self.shared.status()
    }

    /// Stops accepting, closes every connection (FIN on both sides; bytes
    /// still queued are dropped) and waits until all of that is done.
    pub async fn shutdown(mut self) {
        drop(self.stop.take());
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::warn!(link = %self.shared.name, "link task ended badly: {e}");
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((client, peer)) => {
                    inc(&shared.stats.accepted, 1);
                    if shared.impairment().mode == Mode::Cut {
                        inc(&shared.stats.refused, 1);
                        tracing::debug!(link = %shared.name, %peer, "refused (cut)");
                        reset(&client);
                        continue;
                    }
                    let _ = client.set_nodelay(true);
                    conns.spawn(serve(client, peer, shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    tracing::warn!(link = %shared.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
    tracing::info!(link = %shared.name, "link stopped");
}

/// Sets SO_LINGER 0 so that closing the socket sends RST.
fn reset(s: &TcpStream) {
    if let Err(e) = s.set_zero_linger() {
        tracing::debug!("cannot set SO_LINGER 0: {e}");
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both directions done (FIN written both ways), or the link stopped: close.
    Closed,
    /// Reset both ends because of the impairment (counted in `reset`).
    Reset,
    /// Reset both ends after an I/O error or a failed connect (counted in `errors`).
    Failed,
    /// Blackholed and both ends closed: close quietly.
    Released,
}

/// How a blackhole ended.
enum Hole {
    /// Back to pass with nothing lost.
    Resume,
    /// Back to pass after losing bytes, or cut.
    Reset,
    /// Every end that was open has closed.
    Released,
    /// The link stopped.
    Closed,
}

impl From<Hole> for End {
    fn from(h: Hole) -> Self {
        match h {
            Hole::Resume | Hole::Closed => End::Closed,
            Hole::Reset => End::Reset,
            Hole::Released => End::Released,
        }
    }
}

/// Counts the connection as active while it lives (including when its task
/// is aborted at shutdown).
struct Active<'a>(&'a Stats);

impl<'a> Active<'a> {
    fn new(stats: &'a Stats) -> Self {
        inc(&stats.active, 1);
        Self(stats)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        dec(&self.0.active, 1);
    }
}

async fn serve(mut client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let stats = &shared.stats;
    let _active = Active::new(stats);
    let mut rx = shared.impairment.subscribe();
    let mut bufs = Bufs {
        a: vec![0; shared.options.read_buffer],
        b: vec![0; shared.options.read_buffer],
    };
    let mut target = None;
    // The address the client connected to: the link's, or with a wildcard
    // listen address, the one it chose.
    let local = client.local_addr().unwrap_or(shared.addr);
    let conn = Conn { peer, local };
    let end = run(&mut client, conn, &mut target, &shared, &mut rx, &mut bufs).await;
    tracing::debug!(link = %shared.name, %peer, ?end, "connection ended");
    match end {
        End::Closed | End::Released => {}
        End::Reset | End::Failed => {
            inc(
                if end == End::Reset {
                    &stats.reset
                } else {
                    &stats.errors
                },
                1,
            );
            reset(&client);
            if let Some(t) = &target {
                reset(t);
            }
        }
    }
}

struct Bufs {
    a: Vec<u8>,
    b: Vec<u8>,
}

/// The client connection's two ends.
#[derive(Debug, Clone, Copy)]
struct Conn {
    /// The client.
    peer: SocketAddr,
    /// The relay's end (the address the client connected to).
    local: SocketAddr,
}

/// A socket for connecting to `target` from `ip`, bound to it (any port).
fn source_socket(ip: IpAddr, target: SocketAddr) -> io::Result<TcpSocket> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(ip, 0))?;
    Ok(sock)
}

/// Connects to the target (from the link's source address, if set) and
/// writes the PROXY protocol header, if the link sends one.
async fn connect_target(sh: &Shared, conn: Conn) -> io::Result<TcpStream> {
    let mut stream = match sh.source {
        None => TcpStream::connect(sh.target).await?,
        Some(ip) => {
            source_socket(ip, sh.target)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot bind from={ip}: {e}")))?
                .connect(sh.target)
                .await?
        }
    };
    let _ = stream.set_nodelay(true);
    if sh.proxy_protocol {
        let header = mesh_core::proxy_protocol::encode_v2(conn.peer, conn.local);
        stream
            .write_all(&header)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("PROXY header: {e}")))?;
    }
    Ok(stream)
}

async fn run(
    client: &mut TcpStream,
    conn: Conn,
    target: &mut Option<TcpStream>,
    sh: &Shared,
    rx: &mut watch::Receiver<Impairment>,
    bufs: &mut Bufs,
) -> End {
    // Not connected yet: wait out a blackhole (a cut is refused at accept,
    // but may begin in between).
    loop {
        let mode = rx.borrow_and_update().mode;
        match mode {
            Mode::Pass => break,
            Mode::Cut => return End::Reset,
            Mode::Blackhole => {
                match blackhole::<TcpStream, TcpStream>(sh, rx, bufs, Some(client), None, false)
                    .await
                {
                    Hole::Resume => {}
                    other => return other.into(),
                }
            }
        }
    }
    let connect = tokio::time::timeout(sh.options.connect_timeout, connect_target(sh, conn));
    tokio::pin!(connect);
    let stream = loop {
        tokio::select! {
            r = &mut connect => match r {
                Ok(Ok(s)) => break s,
                Ok(Err(e)) => {
                    tracing::debug!(link = %sh.name, target = %sh.target, "connect failed: {e}");
                    return End::Failed;
                }
                Err(_) => {
                    tracing::debug!(link = %sh.name, target = %sh.target, "connect timed out");
                    return End::Failed;
                }
            },
            r = rx.changed() => {
                if r.is_err() {
                    return End::Closed;
                }
                // A blackhole begun meanwhile is handled once connected.
                if rx.borrow().mode == Mode::Cut {
                    return End::Reset;
                }
            }
        }
    };
    let target = target.insert(stream);
    pump(client, target, sh, rx, bufs).await
}

/// What the bound charges per queued chunk on top of its bytes, so that
/// many tiny chunks cannot make the queue's bookkeeping outgrow the bound.
const CHUNK_COST: usize = 64;

/// One direction of a connection: the queue of chunks read and not yet
/// written, with their release instants. An empty chunk is a FIN.
struct Dir<'a> {
    to_target: bool,
    sh: &'a Shared,
    queue: VecDeque<(Instant, Bytes)>,
    /// Bytes queued.
    queued: usize,
    last_release: Option<std::time::Instant>,
    /// EOF read (its FIN is queued or written).
    read_done: bool,
    /// FIN written.
    write_done: bool,
}

/// What one send did.
enum Sent {
    Bytes(usize),
    Fin,
}

impl<'a> Dir<'a> {
    fn new(sh: &'a Shared, to_target: bool) -> Self {
        Self {
            to_target,
            sh,
            queue: VecDeque::new(),
            queued: 0,
            last_release: None,
            read_done: false,
            write_done: false,
        }
    }

    fn in_flight(&self) -> &AtomicU64 {
        if self.to_target {
            &self.sh.stats.in_flight_to_target
        } else {
            &self.sh.stats.in_flight_to_client
        }
    }

    /// Whether to read more: not at EOF, and the queue (bytes plus a fixed
    /// cost per chunk) under the bound.
    fn can_read(&self, bound: usize) -> bool {
        !self.read_done && self.queued + self.queue.len() * CHUNK_COST < bound
    }

    fn push(&mut self, data: &[u8], imp: &Impairment) {
        let at = {
            let wire = &self.sh.wire[usize::from(self.to_target)];
            let mut wire = wire.lock().unwrap_or_else(|e| e.into_inner());
            imp.release_at(
                std::time::Instant::now(),
                data.len(),
                &mut self.last_release,
                &mut wire,
            )
        };
        if data.is_empty() {
            self.read_done = true;
        }
        self.queue
            .push_back((Instant::from_std(at), Bytes::copy_from_slice(data)));
        self.queued += data.len();
        inc(self.in_flight(), data.len() as u64);
        self.sh
            .stats
            .peak_in_flight
            .fetch_max(self.queued as u64, Ordering::Relaxed);
    }

    fn front(&self) -> Option<(Instant, Bytes)> {
        self.queue.front().cloned()
    }

    fn sent(&mut self, sent: Sent) {
        match sent {
            Sent::Fin => {
                self.queue.pop_front();
                self.write_done = true;
            }
            Sent::Bytes(n) => {
                if let Some((_, front)) = self.queue.front_mut() {
                    if n >= front.len() {
                        self.queue.pop_front();
                    } else {
                        front.advance(n);
                    }
                }
                self.queued = self.queued.saturating_sub(n);
                dec(self.in_flight(), n as u64);
                let stats = &self.sh.stats;
                inc(
                    if self.to_target {
                        &stats.bytes_to_target
                    } else {
                        &stats.bytes_to_client
                    },
                    n as u64,
                );
            }
        }
    }

    /// Drops everything queued; true if anything (bytes or a FIN) was.
    fn drop_all(&mut self) -> bool {
        let lost = !self.queue.is_empty();
        inc(&self.sh.stats.bytes_discarded, self.queued as u64);
        dec(self.in_flight(), self.queued as u64);
        self.queue.clear();
        self.queued = 0;
        lost
    }
}

impl Drop for Dir<'_> {
    fn drop(&mut self) {
        dec(self.in_flight(), self.queued as u64);
    }
}

/// Writes the front chunk once its time has come: some of its bytes, or its FIN.
async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    front: Option<(Instant, Bytes)>,
) -> io::Result<Sent> {
    let Some((at, data)) = front else {
        return std::future::pending().await;
    };
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
    if data.is_empty() {
        w.shutdown().await?;
        return Ok(Sent::Fin);
    }
    match w.write(&data).await? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(Sent::Bytes(n)),
    }
}

async fn pump(
    a: &mut TcpStream,
    b: &mut TcpStream,
    sh: &Shared,
    rx: &mut watch::Receiver<Impairment>,
    bufs: &mut Bufs,
) -> End {
    let bound = sh.options.max_in_flight;
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let mut up = Dir::new(sh, true);
    let mut down = Dir::new(sh, false);
    // The mode may have changed while connecting.
    let mut check_mode = true;
    loop {
        if check_mode {
            check_mode = false;
            let mode = rx.borrow_and_update().mode;
            match mode {
                Mode::Pass => {}
                Mode::Cut => return End::Reset,
                Mode::Blackhole => {
                    // Chunks on the wire are lost with everything else.
                    let lost = up.drop_all() | down.drop_all();
                    let hole = blackhole(
                        sh,
                        rx,
                        bufs,
                        (!up.read_done).then_some(&mut ar),
                        (!down.read_done).then_some(&mut br),
                        lost,
                    )
                    .await;
                    match hole {
                        Hole::Resume => {}
                        other => return other.into(),
                    }
                }
            }
        }
        if up.write_done && down.write_done {
            return End::Closed;
        }
        let up_front = up.front();
        let down_front = down.front();
        let send_up = up_front.is_some();
        let send_down = down_front.is_some();
        let read_up = up.can_read(bound);
        let read_down = down.can_read(bound);
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return End::Closed;
                }
                check_mode = true;
            }
            r = ar.read(&mut bufs.a), if read_up => match r {
                Ok(n) => {
                    let imp = *rx.borrow();
                    up.push(&bufs.a[..n], &imp);
                }
                Err(e) => {
                    tracing::debug!(link = %sh.name, "client read: {e}");
                    return End::Failed;
                }
            },
            r = br.read(&mut bufs.b), if read_down => match r {
                Ok(n) => {
                    let imp = *rx.borrow();
                    down.push(&bufs.b[..n], &imp);
                }
                Err(e) => {
                    tracing::debug!(link = %sh.name, "target read: {e}");
                    return End::Failed;
                }
            },
            r = send(&mut bw, up_front), if send_up => match r {
                Ok(s) => up.sent(s),
                Err(e) => {
                    tracing::debug!(link = %sh.name, "target write: {e}");
                    return End::Failed;
                }
            },
            r = send(&mut aw, down_front), if send_down => match r {
                Ok(s) => down.sent(s),
                Err(e) => {
                    tracing::debug!(link = %sh.name, "client write: {e}");
                    return End::Failed;
                }
            },
        }
    }
}

/// Reads `r` if present; pending forever if not.
async fn read_opt<R: AsyncRead + Unpin>(
    r: &mut Option<&mut R>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Holds a connection in a blackhole: reads and discards from the ends
/// given, forwards nothing, until the mode changes or every end has closed.
/// `lost`: bytes were already lost on entry.
async fn blackhole<A, B>(
    sh: &Shared,
    rx: &mut watch::Receiver<Impairment>,
    bufs: &mut Bufs,
    mut a: Option<&mut A>,
    mut b: Option<&mut B>,
    mut lost: bool,
) -> Hole
where
    A: AsyncRead + Unpin,
    B: AsyncRead + Unpin,
{
    let open_at_entry = a.is_some() || b.is_some();
    loop {
        if open_at_entry && a.is_none() && b.is_none() {
            return Hole::Released;
        }
        tokio::select! {
            // The mode first: bytes sent after the blackhole ended are not
            // lost, even when they arrive before this task sees the change.
            biased;
            r = rx.changed() => {
                if r.is_err() {
                    return Hole::Closed;
                }
                let mode = rx.borrow_and_update().mode;
                match mode {
                    Mode::Blackhole => {}
                    Mode::Cut => return Hole::Reset,
                    Mode::Pass if lost => return Hole::Reset,
                    Mode::Pass => return Hole::Resume,
                }
            }
            r = read_opt(&mut a, &mut bufs.a) => {
                lost = true;
                match r {
                    Ok(n) if n > 0 => inc(&sh.stats.bytes_discarded, n as u64),
                    _ => a = None,
                }
            }
            r = read_opt(&mut b, &mut bufs.b) => {
                lost = true;
                match r {
                    Ok(n) if n > 0 => inc(&sh.stats.bytes_discarded, n as u64),
                    _ => b = None,
                }
            }
        }
    }
}
