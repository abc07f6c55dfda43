//! The embedded store: etcd's data model in one process.
//!
//! One mutex guards the key map, the event history and the leases; it is never
//! held across an `.await`. Watchers are cursors into the history: a watcher
//! that falls behind the retained history gets [`WatchEvent::Compacted`], the
//! same answer etcd gives, so callers have one recovery path.
//!
//! Opened on a data directory ([`MemoryStore::open`]), it is durable: every
//! write is in its [`disk::Journal`] (redb, fsync'd) before it is
//! acknowledged, and a restart finds every acknowledged key, its revisions
//! and its leases. A failed disk write stops the store (every later call
//! fails `Unavailable`), as etcd stops on a failed fsync: memory and disk
//! never disagree about what was acknowledged.

use super::disk::{self, Journal};
use super::{
    CasOutcome, Error, Event, Expect, Guard, KeyValue, LeaseId, Range, Result, Revision, Store,
    TxnOutcome, TxnWrite, Watch, WatchEvent,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// History kept for watchers, in events. etcd keeps history until a
/// compaction; we compact automatically past this many events, which at
/// ~300 bytes an event bounds the history near 300 MiB at worst while letting a
/// watcher fall a full 100k-endpoint resync behind without losing its place.
pub const DEFAULT_HISTORY_LIMIT: usize = 1_000_000;

/// How often expired leases are reaped. etcd checks every 500 ms; we match it
/// so lease lapses behave alike on both backends.
const LEASE_REAP_INTERVAL: Duration = Duration::from_millis(500);

/// Most events a watcher takes per batch, so one slow consumer cannot make
/// another wait on a huge copy under the lock.
const WATCH_BATCH: usize = 4096;

/// The embedded store. Cheap to clone; clones share the data.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Latest revision, for waking watchers.
    revision: watch::Sender<Revision>,
    /// Writes wait for the disk: off the async workers where the runtime allows.
    durable: bool,
}

struct State {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    /// Events in revision order, none older than `compact_rev`.
    history: VecDeque<Event>,
    /// Oldest revision a watch may start from (etcd's compact revision).
    compact_rev: Revision,
    history_limit: usize,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    /// The disk under a durable store, with what the current write changed.
    journal: Option<Journal>,
    changes: disk::Changes,
    /// Why the store stopped (a failed disk write), if it did.
    failed: Option<String>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

impl MemoryStore {
    /// An empty store with the default history limit. Must be called inside a
    /// tokio runtime: it spawns the lease reaper, which stops with the store.
    pub fn new() -> Self {
        Self::with_history_limit(DEFAULT_HISTORY_LIMIT)
    }

    /// An empty store that keeps at most `limit` events of history.
    pub fn with_history_limit(limit: usize) -> Self {
        Self::from_state(State {
            revision: 1, // etcd starts at revision 1 with an empty store
            kvs: BTreeMap::new(),
            history: VecDeque::new(),
            compact_rev: 0,
            history_limit: limit.max(1),
            leases: HashMap::new(),
            next_lease: 0x1000,
            journal: None,
            changes: disk::Changes::default(),
            failed: None,
        })
    }

    /// The durable store in `dir` (created if missing): what it held when
    /// last stopped, however it stopped. Must be called inside a tokio
    /// runtime. Fails if the directory cannot be used or another process
    /// has it open.
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        let (journal, loaded) = Journal::open(dir).map_err(Error::Unavailable)?;
        let now = Instant::now();
        let mut leases: HashMap<i64, Lease> = loaded
            .leases
            .into_iter()
            .map(|(id, ttl)| {
                let lease = Lease {
                    ttl,
                    deadline: now + ttl,
                    keys: HashSet::new(),
                };
                (id, lease)
            })
            .collect();
        for kv in loaded.kvs.values().filter(|kv| kv.lease != 0) {
            if let Some(l) = leases.get_mut(&kv.lease) {
                l.keys.insert(kv.key.clone());
            }
        }
        tracing::info!(
            path = %journal.path().display(),
            revision = loaded.revision,
            keys = loaded.kvs.len(),
            leases = leases.len(),
            "embedded registry opened"
        );
        Ok(Self::from_state(State {
            revision: loaded.revision,
            kvs: loaded.kvs,
            history: VecDeque::new(),
            // History is not kept across a restart: a watch may start at the
            // next revision, as after an etcd compaction.
            compact_rev: loaded.revision + 1,
            history_limit: DEFAULT_HISTORY_LIMIT,
            leases,
            next_lease: loaded.next_lease,
            journal: Some(journal),
            changes: disk::Changes::default(),
            failed: None,
        }))
    }

    fn from_state(state: State) -> Self {
        let rev = state.revision;
        let durable = state.journal.is_some();
        let (tx, _) = watch::channel(rev);
        let inner = Arc::new(Shared {
            state: Mutex::new(state),
            revision: tx,
            durable,
        });
        tokio::spawn(reap_leases(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Is every write on disk before it is acknowledged?
    pub fn is_durable(&self) -> bool {
        self.inner.durable
    }

    /// Runs one write: `f` changes the state, then the journal records the
    /// change (durable stores) before the caller hears of it. The disk wait
    /// happens off the async workers when the runtime has several.
    fn write<R>(&self, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
        let run = || {
            let mut st = self.lock();
            st.check()?;
            let r = f(&mut st)?;
            st.flush()?;
            Ok(r)
        };
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if self.inner.durable && multi {
            tokio::task::block_in_place(run)
        } else {
            run()
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }

    fn notify(&self, rev: Revision) {
        self.inner.revision.send_replace(rev);
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent data (every mutation is
    // completed before any call that could panic), so poisoning is ignored.
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    /// Refuses every call once a disk write failed.
    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(Error::Unavailable(format!(
                "the embedded registry stopped after a failed disk write ({why}); restart the federation"
            ))),
            None => Ok(()),
        }
    }

    /// Puts this write's changes on disk (durable stores).
    fn flush(&mut self) -> Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if self.changes.is_empty() {
            return Ok(());
        }
        let changes = std::mem::take(&mut self.changes);
        let leases = &self.leases;
        let ttl = |id: i64| leases.get(&id).map(|l| l.ttl);
        if let Err(e) = journal.commit(&changes, self.revision, self.next_lease, &self.kvs, &ttl) {
            tracing::error!(error = %e, "embedded registry write failed; the registry stops");
            self.failed = Some(e);
            return self.check();
        }
        Ok(())
    }

    fn touched(&mut self, key: &str) {
        if self.journal.is_some() {
            self.changes.keys.insert(key.to_string());
        }
    }

    fn touched_lease(&mut self, id: i64) {
        if self.journal.is_some() {
            self.changes.leases.insert(id);
        }
    }

    fn record(&mut self, ev: Event) {
        self.history.push_back(ev);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compact_rev = old.revision() + 1;
            }
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: i64) -> Revision {
        self.revision += 1;
        let rev = self.revision;
        self.put_at(key, value, lease, rev);
        rev
    }

    /// Writes `key` at `rev`, which the caller has already made current.
    fn put_at(&mut self, key: &str, value: Vec<u8>, lease: i64, rev: Revision) {
        let create_revision = match self.kvs.get(key) {
            Some(old) => {
                if old.lease != 0 && old.lease != lease {
                    if let Some(l) = self.leases.get_mut(&old.lease) {
                        l.keys.remove(key);
                    }
                }
                old.create_revision
            }
            None => rev,
        };
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision: rev,
            lease,
        };
        if lease != 0 {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.insert(key.to_string());
            }
        }
        self.kvs.insert(key.to_string(), kv.clone());
        self.touched(key);
        self.record(Event::Put(kv));
    }

    fn delete(&mut self, key: &str) -> Option<Revision> {
        if !self.kvs.contains_key(key) {
            return None;
        }
        self.revision += 1;
        let rev = self.revision;
        self.delete_at(key, rev);
        Some(rev)
    }

    /// Deletes `key` (present) at `rev`, which the caller has already made current.
    fn delete_at(&mut self, key: &str, rev: Revision) {
        let Some(old) = self.kvs.remove(key) else {
            return;
        };
        if old.lease != 0 {
            if let Some(l) = self.leases.get_mut(&old.lease) {
                l.keys.remove(key);
            }
        }
        self.touched(key);
        self.record(Event::Delete {
            key: key.to_string(),
            mod_revision: rev,
        });
    }

    fn expire(&mut self, id: i64) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        self.touched_lease(id);
        let mut keys: Vec<_> = lease.keys.into_iter().collect();
        keys.sort();
        for k in keys {
            self.delete(&k);
        }
        true
    }

    /// Events after `cursor` (exclusive) under `prefix`, and the revision read up to.
    fn events_after(
        &self,
        cursor: Revision,
        prefix: &str,
    ) -> Result<(Vec<Event>, Revision), Revision> {
        if cursor + 1 < self.compact_rev {
            return Err(self.compact_rev);
        }
        let start = self.history.partition_point(|e| e.revision() <= cursor);
        let mut out = Vec::new();
        let mut upto = cursor;
        for ev in self.history.range(start..) {
            upto = ev.revision();
            if ev.key().starts_with(prefix) {
                out.push(ev.clone());
                if out.len() >= WATCH_BATCH {
                    break;
                }
            }
        }
        Ok((out, upto))
    }
}

async fn reap_leases(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(LEASE_REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let rev = {
            let mut st = lock(&shared);
            // A stopped store expires nothing more (and writes nothing).
            if st.failed.is_some() {
                continue;
            }
            let expired: Vec<i64> = st
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                st.expire(id);
            }
            if let Err(e) = st.flush() {
                tracing::error!(error = %e, "lease expiry not written");
            }
            st.revision
        };
        shared.revision.send_if_modified(|r| {
            let changed = *r != rev;
            *r = rev;
            changed
        });
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        if self.inner.durable {
            "embedded"
        } else {
            "memory"
        }
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let st = self.lock();
        st.check()?;
        Ok(st.kvs.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<Range> {
        let st = self.lock();
        st.check()?;
        let kvs = st
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok(Range {
            kvs,
            revision: st.revision,
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let rev = self.write(|st| {
            let lease = match lease {
                Some(LeaseId(id)) if !st.leases.contains_key(&id) => {
                    return Err(Error::LeaseNotFound(id))
                }
                Some(LeaseId(id)) => id,
                None => 0,
            };
            Ok(st.put(key, value, lease))
        })?;
        self.notify(rev);
        Ok(rev)
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>> {
        let rev = self.write(|st| Ok(st.delete(key)))?;
        if let Some(rev) = rev {
            self.notify(rev);
        }
        Ok(rev)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Option<Vec<u8>>,
    ) -> Result<CasOutcome> {
        let out = self.write(|st| {
            let current = st.kvs.get(key);
            if !super::holds(expect, current) {
                return Ok(CasOutcome::Conflict(current.cloned()));
            }
            Ok(CasOutcome::Swapped(match value {
                Some(v) => {
                    let lease = current.map_or(0, |kv| kv.lease);
                    st.put(key, v, lease)
                }
                // A delete of an absent key under `Absent` changes nothing;
                // etcd's txn still succeeds and reports the current revision.
                None => st.delete(key).unwrap_or(st.revision),
            }))
        })?;
        if let CasOutcome::Swapped(rev) = out {
            self.notify(rev);
        }
        Ok(out)
    }

    async fn transact_guarded(
        &self,
        guards: Vec<Guard>,
        writes: Vec<TxnWrite>,
    ) -> Result<TxnOutcome> {
        super::check_txn(&writes)?;
        let out = self.write(|st| {
            for g in &guards {
                let current = st.kvs.get(&g.key);
                if !super::holds(g.expect, current) {
                    return Ok(TxnOutcome::Conflict {
                        key: g.key.clone(),
                        current: current.cloned(),
                    });
                }
            }
            for w in &writes {
                if let Some(expect) = w.expect {
                    let current = st.kvs.get(&w.key);
                    if !super::holds(expect, current) {
                        return Ok(TxnOutcome::Conflict {
                            key: w.key.clone(),
                            current: current.cloned(),
                        });
                    }
                }
            }
            // Like etcd: a transaction that changes nothing takes no revision.
            let changes = writes
                .iter()
                .any(|w| w.value.is_some() || st.kvs.contains_key(&w.key));
            if !changes {
                return Ok(TxnOutcome::Committed(st.revision));
            }
            st.revision += 1;
            let rev = st.revision;
            for w in writes {
                match w.value {
                    Some(v) => {
                        // Detach any lease from the key first, as etcd's put does.
                        if let Some(old) = st.kvs.get(&w.key).map(|kv| kv.lease) {
                            if let Some(l) = st.leases.get_mut(&old) {
                                l.keys.remove(&w.key);
                            }
                        }
                        st.put_at(&w.key, v, 0, rev);
                    }
                    None => st.delete_at(&w.key, rev),
                }
            }
            Ok(TxnOutcome::Committed(rev))
        })?;
        if let TxnOutcome::Committed(rev) = out {
            self.notify(rev);
        }
        Ok(out)
    }

    async fn create_leased(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<CasOutcome> {
        let out = self.write(|st| {
            if !st.leases.contains_key(&lease.0) {
                return Err(Error::LeaseNotFound(lease.0));
            }
            if let Some(kv) = st.kvs.get(key) {
                return Ok(CasOutcome::Conflict(Some(kv.clone())));
            }
            Ok(CasOutcome::Swapped(st.put(key, value, lease.0)))
        })?;
        if let CasOutcome::Swapped(rev) = out {
            self.notify(rev);
        }
        Ok(out)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = ttl.max(Duration::from_secs(1));
        self.write(|st| {
            st.next_lease += 1;
            let id = st.next_lease;
            st.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: HashSet::new(),
                },
            );
            st.touched_lease(id);
            Ok(LeaseId(id))
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>> {
        // A renewal moves a deadline, which the journal does not keep (leases
        // get a full TTL at start): nothing to write.
        let mut st = self.lock();
        st.check()?;
        Ok(st.leases.get_mut(&lease.0).map(|l| {
            l.deadline = Instant::now() + l.ttl;
            l.ttl
        }))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let rev = self.write(|st| {
            if !st.expire(lease.0) {
                return Err(Error::LeaseNotFound(lease.0));
            }
            Ok(st.revision)
        })?;
        self.notify(rev);
        Ok(())
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch> {
        self.lock().check()?;
        let shared = self.inner.clone();
        let rx = shared.revision.subscribe();
        let prefix = prefix.to_string();
        // The cursor is the last revision already delivered (or skipped).
        // As in etcd, a start revision of 0 or less means "from now on".
        let cursor = if from <= 0 {
            self.lock().revision
        } else {
            from - 1
        };
        let stream = futures::stream::unfold(
            (shared, rx, prefix, cursor, false),
            |(shared, mut rx, prefix, mut cursor, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let read = {
                        let st = lock(&shared);
                        // A stopped store delivers nothing more: its last
                        // write may not be on disk.
                        if let Err(e) = st.check() {
                            return Some((
                                WatchEvent::Disconnected {
                                    reason: e.to_string(),
                                },
                                (shared.clone(), rx, prefix, cursor, true),
                            ));
                        }
                        st.events_after(cursor, &prefix)
                    };
                    match read {
                        Err(compact_revision) => {
                            return Some((
                                WatchEvent::Compacted { compact_revision },
                                (shared, rx, prefix, cursor, true),
                            ));
                        }
                        Ok((events, upto)) => {
                            cursor = upto;
                            if !events.is_empty() {
                                return Some((
                                    WatchEvent::Events(events),
                                    (shared, rx, prefix, cursor, false),
                                ));
                            }
                        }
                    }
                    // Nothing new for us: wait for the next write. The store
                    // holds the sender, so this only fails once it is dropped.
                    if *rx.borrow_and_update() <= cursor && rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let mut st = self.lock();
        if revision > st.revision {
            return Err(Error::Backend(format!(
                "cannot compact to {revision}: beyond the current revision {}",
                st.revision
            )));
        }
        if revision <= st.compact_rev {
            return Err(Error::Compacted {
                requested: revision,
                compact_revision: st.compact_rev,
            });
        }
        let drop = st.history.partition_point(|e| e.revision() < revision);
        st.history.drain(..drop);
        st.compact_rev = revision;
        Ok(())
    }
}
