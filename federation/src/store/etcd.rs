//! The etcd backend: the registry in a real etcd cluster (v3 API through etcd-client).
//!
//! Watches survive a dropped connection: the watch task re-creates the etcd
//! watch from the revision after the last event it delivered, reporting the
//! gap as [`WatchEvent::Disconnected`] / [`WatchEvent::Reconnected`]. When etcd
//! says the revision is compacted, the watch ends with [`WatchEvent::Compacted`]
//! and the caller resyncs.

use super::{
    CasOutcome, Error, Event, Expect, Guard, KeyValue, LeaseId, Range, Result, Revision, Store,
    TxnOutcome, TxnWrite, Watch, WatchEvent,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// How long one etcd request may take before the registry counts as
/// unavailable. etcd answers in milliseconds when healthy; 5 s rides out a
/// leader election (etcd's default election timeout is 1 s) without stalling
/// callers for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect timeout per attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keepalive so a silently dead etcd is noticed in about 6 s.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Backoff between attempts to re-establish a watch: first and maximum.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);
/// Watch events buffered per watcher before the watch task waits.
const WATCH_BUFFER: usize = 256;
/// TLS to etcd: the CA its certificate is checked against, and the
/// client certificate and key for its client-certificate authentication.
/// Paths: the files are read when connecting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EtcdTls {
    /// CA certificate (PEM).
    pub ca: std::path::PathBuf,
    /// Client certificate (PEM).
    pub cert: Option<std::path::PathBuf>,
    /// Its key (PEM).
    pub key: Option<std::path::PathBuf>,
}

impl EtcdTls {
    fn options(&self) -> std::result::Result<etcd_client::TlsOptions, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let mut o = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?));
        if let (Some(c), Some(k)) = (&self.cert, &self.key) {
            o = o.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
        }
        Ok(o)
    }
}

/// Keys per page of a range read. gRPC refuses messages over 4 MiB by
/// default, and a 100k-endpoint registry is ~40 MiB of JSON: reads go page
/// by page. Registry values are under 1 KiB; 500 keys leave room for policy
/// documents of several KiB.
const RANGE_PAGE: i64 = 500;

/// A store in etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    /// Keys per page of a range read.
    page: i64,
}

impl EtcdStore {
    /// Creates a client for `endpoints` (`host:port` or `http://host:port`).
    ///
    /// This does not wait for etcd to answer: a federation starts while etcd
    /// is down and serves once it comes up.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        Self::connect_with(endpoints, None).await
    }

    /// [`EtcdStore::connect`], over TLS when `tls` is given (the endpoints
    /// become `https://`).
    pub async fn connect_with(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let mut endpoints = endpoints.to_vec();
        if let Some(t) = tls {
            opts = opts.with_tls(t.options().map_err(Error::Unavailable)?);
            for e in &mut endpoints {
                if let Some(rest) = e.strip_prefix("http://") {
                    *e = format!("https://{rest}");
                }
            }
        }
        let endpoints = &endpoints[..];
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|e| Error::Unavailable(format!("etcd at {}: {e}", endpoints.join(","))))?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
            page: RANGE_PAGE,
        })
    }

    /// Reads ranges `page` keys at a time (tests use small pages).
    pub fn with_page_size(mut self, page: usize) -> Self {
        self.page = i64::try_from(page.max(1)).unwrap_or(RANGE_PAGE);
        self
    }

    /// The etcd endpoints this store talks to.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn client(&self) -> Client {
        self.client.clone()
    }
}

fn classify(e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown => Error::Unavailable(format!("etcd: {}", s.message())),
            tonic::Code::OutOfRange if s.message().contains("compacted") => {
                Error::Backend(s.message().to_string())
            }
            _ => Error::Backend(format!("etcd: {} ({:?})", s.message(), s.code())),
        },
        E::TransportError(t) => Error::Unavailable(format!("etcd: {t}")),
        E::IoError(io) => Error::Unavailable(format!("etcd: {io}")),
        other => Error::Backend(format!("etcd: {other}")),
    }
}

/// The end of the key range holding every key that starts with `prefix`
/// (etcd's convention: the prefix with its last byte below 0xff incremented).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn kv_from(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map_or(0, etcd_client::ResponseHeader::revision)
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.client().get(key, None).await.map_err(classify)?;
        Ok(resp.kvs().first().map(kv_from))
    }

    async fn range(&self, prefix: &str) -> Result<Range> {
        // Page through the prefix. Every page after the first reads at the
        // first page's revision, so the result is one consistent snapshot.
        let end = prefix_end(prefix.as_bytes());
        let mut start = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(self.page);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self
                .client()
                .get(start.clone(), Some(opts))
                .await
                .map_err(classify)?;
            if revision == 0 {
                revision = header_revision(resp.header());
            }
            kvs.extend(resp.kvs().iter().map(kv_from));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0); // the next key after `last`
                }
                _ => break,
            }
        }
        Ok(Range { kvs, revision })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
        match self.client().put(key, value, opts).await {
            Ok(resp) => Ok(header_revision(resp.header())),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Err(Error::LeaseNotFound(lease.map_or(0, |l| l.0)))
            }
            Err(e) => Err(classify(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>> {
        let resp = self.client().delete(key, None).await.map_err(classify)?;
        Ok((resp.deleted() > 0).then(|| header_revision(resp.header())))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Option<Vec<u8>>,
    ) -> Result<CasOutcome> {
        let cmp = match expect {
            Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
            Expect::ModRevision(r) => Compare::mod_revision(key, CompareOp::Equal, r),
        };
        // Keep the key's lease on overwrite, as the embedded store does. etcd
        // refuses ignore_lease for a key that does not exist, so only an
        // overwrite asks for it.
        let op = match (value, expect) {
            (Some(v), Expect::Absent) => TxnOp::put(key, v, None),
            (Some(v), Expect::ModRevision(_)) => {
                TxnOp::put(key, v, Some(PutOptions::new().with_ignore_lease()))
            }
            (None, _) => TxnOp::delete(key, None),
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([op])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.client().txn(txn).await.map_err(classify)?;
        if resp.succeeded() {
            return Ok(CasOutcome::Swapped(header_revision(resp.header())));
        }
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => Some(g.kvs().first().map(kv_from)),
            _ => None,
        });
        Ok(CasOutcome::Conflict(current.flatten()))
    }

    async fn transact_guarded(
        &self,
        guards: Vec<Guard>,
        writes: Vec<TxnWrite>,
    ) -> Result<TxnOutcome> {
        super::check_txn(&writes)?;
        let compare = |key: &str, e: Expect| match e {
            Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
            Expect::ModRevision(r) => Compare::mod_revision(key, CompareOp::Equal, r),
        };
        let compares: Vec<Compare> = guards
            .iter()
            .map(|g| compare(g.key.as_str(), g.expect))
            .chain(
                writes
                    .iter()
                    .filter_map(|w| w.expect.map(|e| compare(w.key.as_str(), e))),
            )
            .collect();
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|w| match &w.value {
                Some(v) => TxnOp::put(w.key.as_str(), v.clone(), None),
                None => TxnOp::delete(w.key.as_str(), None),
            })
            .collect();
        // Every checked key, guards first, with its condition.
        let checked: Vec<(&str, Expect)> = guards
            .iter()
            .map(|g| (g.key.as_str(), g.expect))
            .chain(
                writes
                    .iter()
                    .filter_map(|w| w.expect.map(|e| (w.key.as_str(), e))),
            )
            .collect();
        let reads: Vec<TxnOp> = checked.iter().map(|(k, _)| TxnOp::get(*k, None)).collect();
        let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
        let resp = self.client().txn(txn).await.map_err(classify)?;
        if resp.succeeded() {
            return Ok(TxnOutcome::Committed(header_revision(resp.header())));
        }
        // The reads come back in the order of `checked`: the first whose
        // condition does not hold is the conflict.
        let currents = resp.op_responses().into_iter().map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(kv_from),
            _ => None,
        });
        for ((key, expect), current) in checked.iter().zip(currents) {
            if !super::holds(*expect, current.as_ref()) {
                return Ok(TxnOutcome::Conflict {
                    key: (*key).to_string(),
                    current,
                });
            }
        }
        // A key changed back between the compare and the read: still a conflict.
        let key = checked
            .first()
            .map(|(k, _)| (*k).to_string())
            .unwrap_or_default();
        Ok(TxnOutcome::Conflict { key, current: None })
    }

    async fn create_leased(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<CasOutcome> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease.0)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.client().txn(txn).await.map_err(|e| {
            let err = classify(e);
            match &err {
                Error::Backend(m) if m.contains("lease not found") => Error::LeaseNotFound(lease.0),
                _ => err,
            }
        })?;
        if resp.succeeded() {
            return Ok(CasOutcome::Swapped(header_revision(resp.header())));
        }
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => Some(g.kvs().first().map(kv_from)),
            _ => None,
        });
        Ok(CasOutcome::Conflict(current.flatten()))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self
            .client()
            .lease_grant(secs, None)
            .await
            .map_err(classify)?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>> {
        let not_found = |e: &etcd_client::Error| e.to_string().contains("lease not found");
        let (mut keeper, mut stream) = match self.client().lease_keep_alive(lease.0).await {
            Ok(k) => k,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(classify(e)),
        };
        keeper.keep_alive().await.map_err(classify)?;
        let resp = match stream.message().await {
            Ok(r) => r,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(classify(e)),
        };
        Ok(resp.and_then(|r| {
            let ttl = r.ttl();
            // etcd answers TTL 0 (or less) for a lease it no longer has.
            (ttl > 0).then(|| Duration::from_secs(u64::try_from(ttl).unwrap_or(0)))
        }))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        match self.client().lease_revoke(lease.0).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Err(Error::LeaseNotFound(lease.0))
            }
            Err(e) => Err(classify(e)),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let client = self.client();
        let prefix = prefix.to_string();
        tokio::spawn(watch_task(client, prefix, from, tx));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.client().compact(revision, None).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {
                Err(Error::Compacted {
                    requested: revision,
                    compact_revision: revision,
                })
            }
            Err(e) => Err(classify(e)),
        }
    }
}

/// Keeps one logical watch alive across reconnects until the receiver is dropped.
async fn watch_task(
    mut client: Client,
    prefix: String,
    from: Revision,
    tx: mpsc::Sender<WatchEvent>,
) {
    // `next` is the first revision not yet delivered. 0 means "from now",
    // which is pinned to a real revision by the first response.
    let mut next = from.max(0);
    let mut backoff = WATCH_RETRY_MIN;
    let mut disconnected = false;
    loop {
        let mut opts = WatchOptions::new().with_prefix().with_progress_notify();
        if next > 0 {
            opts = opts.with_start_revision(next);
        }
        let outcome = tokio::select! {
            r = client.watch(prefix.as_str(), Some(opts)) => r,
            () = tx.closed() => return,
        };
        let mut stream = match outcome {
            Ok(w) => w,
            Err(e) => {
                let reason = classify(e).to_string();
                if !disconnected {
                    disconnected = true;
                    if tx.send(WatchEvent::Disconnected { reason }).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = tx.closed() => return,
                }
                backoff = (backoff * 2).min(WATCH_RETRY_MAX);
                continue;
            }
        };
        let reason = loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                () = tx.closed() => return,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => break "watch stream closed by etcd".to_string(),
                Err(e) => break classify(e).to_string(),
            };
            if resp.compact_revision() > 0 {
                let _ = tx
                    .send(WatchEvent::Compacted {
                        compact_revision: resp.compact_revision(),
                    })
                    .await;
                return;
            }
            if resp.canceled() {
                break format!("watch canceled by etcd: {}", resp.cancel_reason());
            }
            if disconnected {
                disconnected = false;
                backoff = WATCH_RETRY_MIN;
                debug!(%prefix, next, "etcd watch re-established");
                if tx.send(WatchEvent::Reconnected).await.is_err() {
                    return;
                }
            }
            if next == 0 {
                next = header_revision(resp.header()) + 1;
            }
            let events: Vec<Event> = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    Some(match ev.event_type() {
                        EventType::Put => Event::Put(kv_from(kv)),
                        EventType::Delete => Event::Delete {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                            mod_revision: kv.mod_revision(),
                        },
                    })
                })
                .collect();
            if let Some(last) = events.last() {
                next = last.revision() + 1;
                if tx.send(WatchEvent::Events(events)).await.is_err() {
                    return;
                }
            }
        };
        warn!(%prefix, next, %reason, "etcd watch lost; re-establishing from the next revision");
        if !disconnected {
            disconnected = true;
            if tx.send(WatchEvent::Disconnected { reason }).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = tx.closed() => return,
        }
        backoff = (backoff * 2).min(WATCH_RETRY_MAX);
    }
}
