//! One conformance suite for both registry backends: the embedded store and a
//! real etcd started on a free loopback port. Each test runs once per backend.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::store::etcd::EtcdStore;
use federation::store::memory::MemoryStore;
use federation::store::{
    CasOutcome, Error, Event, Expect, Store, TxnOutcome, TxnWrite, WatchEvent, MAX_TXN_OPS,
};
use futures::StreamExt;
use mesh_test::etcd::EtcdFixture;
use std::sync::Arc;
use std::time::Duration;

struct Backend {
    store: Arc<dyn Store>,
    _etcd: Option<EtcdFixture>,
    _cluster: Option<mesh_test::etcd::EtcdCluster>,
    _dir: Option<tempfile::TempDir>,
}

async fn memory() -> Backend {
    Backend {
        store: Arc::new(MemoryStore::new()),
        _etcd: None,
        _cluster: None,
        _dir: None,
    }
}

/// The durable embedded store, on disk in a fresh directory.
async fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    Backend {
        store: Arc::new(MemoryStore::open(dir.path()).unwrap()),
        _etcd: None,
        _cluster: None,
        _dir: Some(dir),
    }
}

async fn etcd() -> Backend {
    let fx = EtcdFixture::start();
    let store = EtcdStore::connect(&[fx.endpoint()])
        .await
        .expect("etcd client");
    Backend {
        store: Arc::new(store),
        _etcd: Some(fx),
        _cluster: None,
        _dir: None,
    }
}

/// A 3-member etcd cluster, the client given every member.
async fn etcd3() -> Backend {
    let c = tokio::task::spawn_blocking(|| mesh_test::etcd::EtcdCluster::start(3))
        .await
        .unwrap();
    let store = EtcdStore::connect(&c.endpoints())
        .await
        .expect("etcd client");
    Backend {
        store: Arc::new(store),
        _etcd: None,
        _cluster: Some(c),
        _dir: None,
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

async fn next_events(w: &mut federation::store::Watch) -> Vec<Event> {
    loop {
        match tokio::time::timeout(PATIENCE, w.next()).await {
            Ok(Some(WatchEvent::Events(evs))) => return evs,
            Ok(Some(WatchEvent::Reconnected | WatchEvent::Disconnected { .. })) => continue,
            other => panic!("expected events, got {other:?}"),
        }
    }
}

/// Collects at least `n` events.
async fn collect(w: &mut federation::store::Watch, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(next_events(w).await);
    }
    out
}

fn put_key(ev: &Event) -> Option<(&str, &[u8])> {
    match ev {
        Event::Put(kv) => Some((kv.key.as_str(), kv.value.as_slice())),
        Event::Delete { .. } => None,
    }
}

async fn revisions_are_global_and_monotonic(b: Backend) {
    let s = b.store;
    let r1 = s.put("/t/rev/a", b"1".to_vec(), None).await.unwrap();
    let r2 = s.put("/t/rev/b", b"2".to_vec(), None).await.unwrap();
    let r3 = s.put("/t/rev/a", b"3".to_vec(), None).await.unwrap();
    assert_eq!((r2, r3), (r1 + 1, r1 + 2));
    let a = s.get("/t/rev/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"3");
    assert_eq!(
        a.create_revision, r1,
        "create revision survives an overwrite"
    );
    assert_eq!(a.mod_revision, r3);
    let range = s.range("/t/rev/").await.unwrap();
    assert_eq!(range.revision, r3);
    let keys: Vec<_> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/rev/a", "/t/rev/b"], "lexical order");
    assert!(s.range("/t/none/").await.unwrap().kvs.is_empty());
    assert_eq!(s.get("/t/rev/zzz").await.unwrap(), None);
    let d = s.delete("/t/rev/b").await.unwrap();
    assert_eq!(d, Some(r3 + 1));
    assert_eq!(
        s.delete("/t/rev/b").await.unwrap(),
        None,
        "deleting an absent key changes nothing"
    );
    assert_eq!(s.range("/t/rev/").await.unwrap().revision, r3 + 1);
}

async fn compare_and_swap(b: Backend) {
    let s = b.store;
    let k = "/t/cas/policy";
    let CasOutcome::Swapped(r1) = s
        .compare_and_swap(k, Expect::Absent, Some(b"v1".to_vec()))
        .await
        .unwrap()
    else {
        panic!("create on absent key must succeed")
    };
    // A second create loses and sees the winner.
    match s
        .compare_and_swap(k, Expect::Absent, Some(b"other".to_vec()))
        .await
        .unwrap()
    {
        CasOutcome::Conflict(Some(cur)) => {
            assert_eq!(cur.value, b"v1");
            assert_eq!(cur.mod_revision, r1);
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    // Update against a stale revision loses; against the current one wins.
    s.put("/t/cas/unrelated", b"x".to_vec(), None)
        .await
        .unwrap();
    let CasOutcome::Swapped(r2) = s
        .compare_and_swap(k, Expect::ModRevision(r1), Some(b"v2".to_vec()))
        .await
        .unwrap()
    else {
        panic!("update at the current mod revision must succeed")
    };
    assert!(matches!(
        s.compare_and_swap(k, Expect::ModRevision(r1), Some(b"v3".to_vec())).await.unwrap(),
        CasOutcome::Conflict(Some(ref cur)) if cur.value == b"v2"
    ));
    assert_eq!(
        s.get(k).await.unwrap().unwrap().value,
        b"v2",
        "a lost CAS writes nothing"
    );
    // CAS delete.
    assert!(matches!(
        s.compare_and_swap(k, Expect::ModRevision(r2), None)
            .await
            .unwrap(),
        CasOutcome::Swapped(_)
    ));
    assert_eq!(s.get(k).await.unwrap(), None);
    assert!(matches!(
        s.compare_and_swap(k, Expect::ModRevision(r2), Some(b"v4".to_vec()))
            .await
            .unwrap(),
        CasOutcome::Conflict(None)
    ));
}

async fn concurrent_cas_has_one_winner(b: Backend) {
    let s = b.store;
    let k = "/t/race/key";
    let rev = s.put(k, b"0".to_vec(), None).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.compare_and_swap(
                k,
                Expect::ModRevision(rev),
                Some(format!("w{i}").into_bytes()),
            )
            .await
            .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), CasOutcome::Swapped(_)) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

async fn watch_from_revision_then_live(b: Backend) {
    let s = b.store;
    let r1 = s.put("/t/w/a", b"1".to_vec(), None).await.unwrap();
    let r2 = s.put("/t/w/b", b"2".to_vec(), None).await.unwrap();
    s.put("/t/other/x", b"not watched".to_vec(), None)
        .await
        .unwrap();
    let r3 = s.delete("/t/w/a").await.unwrap().unwrap();
    let mut w = s.watch("/t/w/", r2).await.unwrap();
    let evs = collect(&mut w, 2).await;
    assert_eq!(put_key(&evs[0]), Some(("/t/w/b", b"2".as_slice())));
    assert_eq!(evs[0].revision(), r2);
    assert_eq!(
        evs[1],
        Event::Delete {
            key: "/t/w/a".into(),
            mod_revision: r3
        }
    );
    assert!(r1 < r2);
    // Live events follow with no gap and only under the prefix.
    s.put("/t/other/y", b"no".to_vec(), None).await.unwrap();
    let r5 = s.put("/t/w/c", b"3".to_vec(), None).await.unwrap();
    let evs = collect(&mut w, 1).await;
    assert_eq!(evs.len(), 1);
    assert_eq!(put_key(&evs[0]), Some(("/t/w/c", b"3".as_slice())));
    assert_eq!(evs[0].revision(), r5);
}

async fn watch_from_now(b: Backend) {
    let s = b.store;
    s.put("/t/now/old", b"1".to_vec(), None).await.unwrap();
    let mut w = s.watch("/t/now/", 0).await.unwrap();
    // Give etcd a moment to register the watch before writing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.put("/t/now/new", b"2".to_vec(), None).await.unwrap();
    let evs = collect(&mut w, 1).await;
    assert_eq!(put_key(&evs[0]), Some(("/t/now/new", b"2".as_slice())));
}

async fn compacted_history_ends_the_watch(b: Backend) {
    let s = b.store;
    let r1 = s.put("/t/c/a", b"1".to_vec(), None).await.unwrap();
    s.put("/t/c/a", b"2".to_vec(), None).await.unwrap();
    let r3 = s.put("/t/c/a", b"3".to_vec(), None).await.unwrap();
    s.compact(r3).await.unwrap();
    let mut w = s.watch("/t/c/", r1).await.unwrap();
    match tokio::time::timeout(PATIENCE, w.next()).await.unwrap() {
        Some(WatchEvent::Compacted { compact_revision }) => assert_eq!(compact_revision, r3),
        other => panic!("expected Compacted, got {other:?}"),
    }
    // The compact revision itself is still watchable.
    let mut w = s.watch("/t/c/", r3).await.unwrap();
    let evs = collect(&mut w, 1).await;
    assert_eq!(put_key(&evs[0]), Some(("/t/c/a", b"3".as_slice())));
    // Compacting again to an old revision is refused.
    assert!(matches!(s.compact(r1).await, Err(Error::Compacted { .. })));
}

async fn lease_keeps_and_expires(b: Backend) {
    let s = b.store;
    let ttl = Duration::from_secs(2);
    let lease = s.grant_lease(ttl).await.unwrap();
    let rev = s
        .put("/t/l/heartbeat", b"hb".to_vec(), Some(lease))
        .await
        .unwrap();
    assert_eq!(
        s.get("/t/l/heartbeat").await.unwrap().unwrap().lease,
        lease.0
    );
    let mut w = s.watch("/t/l/", rev + 1).await.unwrap();
    // Kept alive past its TTL, it stays.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let left = s.keep_alive(lease).await.unwrap();
        assert!(
            left.is_some_and(|d| d >= ttl),
            "keep-alive returns the TTL, got {left:?}"
        );
    }
    assert!(s.get("/t/l/heartbeat").await.unwrap().is_some());
    // Left alone, it expires and its key is deleted with a watch event.
    let evs = collect(&mut w, 1).await;
    assert!(
        matches!(&evs[0], Event::Delete { key, .. } if key == "/t/l/heartbeat"),
        "{evs:?}"
    );
    assert_eq!(s.get("/t/l/heartbeat").await.unwrap(), None);
    assert_eq!(
        s.keep_alive(lease).await.unwrap(),
        None,
        "an expired lease cannot be renewed"
    );
    assert!(matches!(
        s.put("/t/l/again", b"x".to_vec(), Some(lease)).await,
        Err(Error::LeaseNotFound(_))
    ));
}

async fn revoke_deletes_keys(b: Backend) {
    let s = b.store;
    let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    s.put("/t/r/a", b"1".to_vec(), Some(lease)).await.unwrap();
    s.put("/t/r/b", b"2".to_vec(), Some(lease)).await.unwrap();
    s.put("/t/r/c", b"3".to_vec(), None).await.unwrap();
    s.revoke_lease(lease).await.unwrap();
    let keys: Vec<_> = s
        .range("/t/r/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["/t/r/c"]);
    assert!(matches!(
        s.revoke_lease(lease).await,
        Err(Error::LeaseNotFound(_))
    ));
}

async fn range_larger_than_a_message(b: Backend) {
    let s = b.store;
    // 2,500 keys of 2 KiB: 5 MiB, more than gRPC's 4 MiB default message.
    let value = vec![b'x'; 2048];
    for i in 0..2500 {
        s.put(&format!("/t/big/{i:05}"), value.clone(), None)
            .await
            .unwrap();
    }
    let before = s.put("/t/big/zz-last", b"1".to_vec(), None).await.unwrap();
    let r = s.range("/t/big/").await.unwrap();
    assert_eq!(r.kvs.len(), 2501);
    assert_eq!(r.revision, before);
    assert!(
        r.kvs.windows(2).all(|w| w[0].key < w[1].key),
        "in key order, no duplicates"
    );
    assert!(
        s.range("/t/bi").await.unwrap().kvs.len() == 2501,
        "a prefix that is not a whole segment"
    );
}

/// Policy writes through the registry are compare-and-swap: two editors who
/// read the same version cannot both write; the loser sees the winner's doc.
async fn policy_writes_are_compare_and_swap(b: Backend) {
    use federation::registry::Registry;
    let reg = Registry::new(b.store);
    let ns: mesh_core::name::Namespace = "default".parse().unwrap();
    let v1 = serde_json::json!({"kind": "VirtualService", "spec": {"hosts": ["reviews"]}});
    let CasOutcome::Swapped(r1) = reg
        .put_policy("VirtualService", &ns, "reviews", Expect::Absent, &v1)
        .await
        .unwrap()
    else {
        panic!("first write of a new policy succeeds")
    };
    let stored = reg
        .get_policy("VirtualService", &ns, "reviews")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.mod_revision, r1);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&stored.value).unwrap(),
        v1
    );
    let alice = serde_json::json!({"kind": "VirtualService", "spec": {"hosts": ["reviews"], "by": "alice"}});
    let bob =
        serde_json::json!({"kind": "VirtualService", "spec": {"hosts": ["reviews"], "by": "bob"}});
    let a = reg
        .put_policy(
            "VirtualService",
            &ns,
            "reviews",
            Expect::ModRevision(r1),
            &alice,
        )
        .await
        .unwrap();
    let b = reg
        .put_policy(
            "VirtualService",
            &ns,
            "reviews",
            Expect::ModRevision(r1),
            &bob,
        )
        .await
        .unwrap();
    assert!(matches!(a, CasOutcome::Swapped(_)));
    match b {
        CasOutcome::Conflict(Some(cur)) => {
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&cur.value).unwrap(),
                alice
            );
        }
        other => panic!("bob must lose to alice, got {other:?}"),
    }
    assert!(matches!(
        reg.put_policy("VirtualService", &ns, "reviews", Expect::Absent, &bob)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(_))
    ));
}

fn w(key: &str, expect: Option<Expect>, value: Option<&str>) -> TxnWrite {
    TxnWrite {
        key: key.into(),
        expect,
        value: value.map(|v| v.as_bytes().to_vec()),
    }
}

/// A transaction writes all its keys at one revision, seen by a watcher as one
/// batch, or nothing at all when one condition fails.
async fn transactions_are_all_or_nothing(b: Backend) {
    let s = &b.store;
    let base = s.put("/t/a", b"a0".to_vec(), None).await.unwrap();
    s.put("/t/gone", b"x".to_vec(), None).await.unwrap();
    let mut watch = s.watch("/t/", base + 2).await.unwrap();

    let a = s.get("/t/a").await.unwrap().unwrap();
    let out = s
        .transact(vec![
            w(
                "/t/a",
                Some(Expect::ModRevision(a.mod_revision)),
                Some("a1"),
            ),
            w("/t/b", Some(Expect::Absent), Some("b1")),
            w("/t/c", None, Some("c1")),
            w("/t/gone", None, None),
        ])
        .await
        .unwrap();
    let TxnOutcome::Committed(rev) = out else {
        panic!("expected a commit, got {out:?}")
    };
    for (k, v) in [("/t/a", "a1"), ("/t/b", "b1"), ("/t/c", "c1")] {
        let kv = s.get(k).await.unwrap().unwrap();
        assert_eq!(kv.value, v.as_bytes(), "{k}");
        assert_eq!(
            kv.mod_revision, rev,
            "{k} written at the transaction's revision"
        );
    }
    assert!(s.get("/t/gone").await.unwrap().is_none());
    let evs = collect(&mut watch, 4).await;
    assert_eq!(evs.len(), 4, "{evs:?}");
    assert!(evs.iter().all(|e| e.revision() == rev), "{evs:?}");

    // A stale condition anywhere: nothing is written, the conflict is named.
    let out = s
        .transact(vec![
            w("/t/d", Some(Expect::Absent), Some("d1")),
            w(
                "/t/a",
                Some(Expect::ModRevision(a.mod_revision)),
                Some("a2"),
            ),
        ])
        .await
        .unwrap();
    match out {
        TxnOutcome::Conflict { key, current } => {
            assert_eq!(key, "/t/a");
            assert_eq!(current.unwrap().value, b"a1");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(s.get("/t/d").await.unwrap().is_none(), "half-applied");
    assert_eq!(s.get("/t/a").await.unwrap().unwrap().value, b"a1");

    // Refusals both backends share: too many writes, a key twice.
    let many: Vec<TxnWrite> = (0..=MAX_TXN_OPS)
        .map(|i| w(&format!("/t/many/{i}"), None, Some("v")))
        .collect();
    let err = s.transact(many).await.unwrap_err();
    assert!(err.to_string().contains("at most 128 writes"), "{err}");
    let err = s
        .transact(vec![w("/t/x", None, Some("1")), w("/t/x", None, None)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
    assert!(s.range("/t/many/").await.unwrap().kvs.is_empty());
}

async fn leased_creation_and_guarded_writes_fence_a_leader(b: Backend) {
    use federation::store::Guard;
    let s = b.store;
    let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    // The first creation wins; a second finds the first.
    let CasOutcome::Swapped(token) = s
        .create_leased("/t/leader", b"a".to_vec(), lease)
        .await
        .unwrap()
    else {
        panic!("the key was absent")
    };
    let other = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    match s
        .create_leased("/t/leader", b"b".to_vec(), other)
        .await
        .unwrap()
    {
        CasOutcome::Conflict(Some(kv)) => {
            assert_eq!((kv.value.as_slice(), kv.lease), (&b"a"[..], lease.0));
        }
        o => panic!("{o:?}"),
    }
    // Writes guarded by the token land while it holds...
    let guard = || {
        vec![Guard {
            key: "/t/leader".into(),
            expect: Expect::ModRevision(token),
        }]
    };
    assert!(matches!(
        s.transact_guarded(guard(), vec![w("/t/weights", None, Some("1"))])
            .await
            .unwrap(),
        TxnOutcome::Committed(_)
    ));
    // ...and none does once the leader key is gone (its lease revoked) and
    // another leader holds it: the old token fences the old leader out.
    s.revoke_lease(lease).await.unwrap();
    let CasOutcome::Swapped(_) = s
        .create_leased("/t/leader", b"b".to_vec(), other)
        .await
        .unwrap()
    else {
        panic!("the key was released")
    };
    match s
        .transact_guarded(guard(), vec![w("/t/weights", None, Some("2"))])
        .await
        .unwrap()
    {
        TxnOutcome::Conflict { key, current } => {
            assert_eq!(key, "/t/leader");
            assert_eq!(current.unwrap().value, b"b");
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(s.get("/t/weights").await.unwrap().unwrap().value, b"1");
    // A lease that does not exist creates nothing.
    s.revoke_lease(other).await.unwrap();
    assert!(matches!(
        s.create_leased("/t/x", b"x".to_vec(), other).await,
        Err(Error::LeaseNotFound(_))
    ));
    assert_eq!(s.get("/t/x").await.unwrap(), None);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    mesh_test::trace_init();
                    super::$name(super::memory().await).await;
                }
            )*
        }
        mod embedded_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    mesh_test::trace_init();
                    super::$name(super::embedded().await).await;
                }
            )*
        }
        mod etcd_cluster_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    mesh_test::trace_init();
                    super::$name(super::etcd3().await).await;
                }
            )*
        }
        mod etcd_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    mesh_test::trace_init();
                    super::$name(super::etcd().await).await;
                }
            )*
        }
    };
}

conformance!(
    revisions_are_global_and_monotonic,
    compare_and_swap,
    concurrent_cas_has_one_winner,
    watch_from_revision_then_live,
    watch_from_now,
    compacted_history_ends_the_watch,
    lease_keeps_and_expires,
    revoke_deletes_keys,
    range_larger_than_a_message,
    policy_writes_are_compare_and_swap,
    transactions_are_all_or_nothing,
    leased_creation_and_guarded_writes_fence_a_leader,
);

/// The embedded store on disk: reopened, it holds every acknowledged write
/// at its revisions, with its leases; history restarts at the next revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_reopens_with_every_acknowledged_write() {
    mesh_test::trace_init();
    let dir = tempfile::tempdir().unwrap();
    let (before, lease, last) = {
        let s = MemoryStore::open(dir.path()).unwrap();
        assert!(s.is_durable());
        assert_eq!(s.kind(), "embedded");
        // A second opener (another federation on the same --data-dir) is refused.
        let e = MemoryStore::open(dir.path()).err().unwrap();
        assert!(e.to_string().contains("already open"), "{e}");
        s.put("/t/d/a", b"1".to_vec(), None).await.unwrap();
        s.put("/t/d/a", b"2".to_vec(), None).await.unwrap();
        s.put("/t/d/gone", b"x".to_vec(), None).await.unwrap();
        s.delete("/t/d/gone").await.unwrap();
        let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
        s.put("/t/d/leased", b"l".to_vec(), Some(lease))
            .await
            .unwrap();
        let short = s.grant_lease(Duration::from_secs(1)).await.unwrap();
        s.put("/t/d/short", b"s".to_vec(), Some(short))
            .await
            .unwrap();
        s.revoke_lease(short).await.unwrap();
        let a = s.get("/t/d/a").await.unwrap().unwrap();
        assert!(matches!(
            s.compare_and_swap(
                "/t/d/a",
                Expect::ModRevision(a.mod_revision),
                Some(b"3".to_vec())
            )
            .await
            .unwrap(),
            CasOutcome::Swapped(_)
        ));
        let last = match s
            .transact(vec![
                TxnWrite {
                    key: "/t/d/t1".into(),
                    expect: Some(Expect::Absent),
                    value: Some(b"t".to_vec()),
                },
                TxnWrite {
                    key: "/t/d/t2".into(),
                    expect: None,
                    value: Some(b"u".to_vec()),
                },
            ])
            .await
            .unwrap()
        {
            TxnOutcome::Committed(r) => r,
            o => panic!("{o:?}"),
        };
        (s.range("/t/").await.unwrap(), lease, last)
    };
    let s = MemoryStore::open(dir.path()).unwrap();
    let after = s.range("/t/").await.unwrap();
    assert_eq!(
        after.revision, last,
        "the revision goes on from the last write"
    );
    assert_eq!(
        after.kvs, before.kvs,
        "every key, value and revision survives"
    );
    assert!(after
        .kvs
        .iter()
        .all(|kv| !kv.key.ends_with("gone") && !kv.key.ends_with("short")));
    // The lease is still there (and holds its key); revoking it deletes it.
    assert_eq!(
        s.keep_alive(lease).await.unwrap(),
        Some(Duration::from_secs(30))
    );
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(s.get("/t/d/leased").await.unwrap(), None);
    // Watches start at the next revision; older history is compacted.
    let mut w = s.watch("/t/", last).await.unwrap();
    assert!(matches!(w.next().await, Some(WatchEvent::Compacted { .. })));
    let next = s.put("/t/d/new", b"n".to_vec(), None).await.unwrap();
    let mut w = s.watch("/t/d/new", next).await.unwrap();
    assert_eq!(collect(&mut w, 1).await.len(), 1);
}

/// etcd only: paging keeps a range one consistent snapshot even when writes
/// land between pages.
#[tokio::test]
async fn etcd_paged_range_is_one_snapshot() {
    mesh_test::trace_init();
    let fx = EtcdFixture::start();
    let s = EtcdStore::connect(&[fx.endpoint()])
        .await
        .unwrap()
        .with_page_size(3);
    for i in 0..10 {
        s.put(&format!("/t/page/{i:02}"), b"v".to_vec(), None)
            .await
            .unwrap();
    }
    let writer = s.clone();
    let churn = tokio::spawn(async move {
        for i in 0..200 {
            writer
                .put(
                    &format!("/t/page/{:02}", i % 10),
                    format!("w{i}").into_bytes(),
                    None,
                )
                .await
                .unwrap();
            writer
                .put(&format!("/t/page/new-{i}"), b"n".to_vec(), None)
                .await
                .unwrap();
        }
    });
    for _ in 0..20 {
        let r = s.range("/t/page/").await.unwrap();
        // Every key comes from the same revision: none is newer than it.
        assert!(r.kvs.iter().all(|kv| kv.mod_revision <= r.revision));
        let n_new = r.kvs.iter().filter(|kv| kv.key.contains("new-")).count();
        assert_eq!(r.kvs.len(), 10 + n_new);
    }
    churn.await.unwrap();
    assert_eq!(s.range("/t/page/").await.unwrap().kvs.len(), 210);
}

/// etcd only: a watch survives etcd going away and coming back, and delivers
/// every event written around the outage, in order, with no gap.
#[tokio::test]
async fn etcd_watch_resumes_after_restart() {
    mesh_test::trace_init();
    let mut fx = EtcdFixture::start();
    let s = EtcdStore::connect(&[fx.endpoint()]).await.unwrap();
    let r1 = s.put("/t/resume/a", b"1".to_vec(), None).await.unwrap();
    let mut w = s.watch("/t/resume/", r1).await.unwrap();
    assert_eq!(collect(&mut w, 1).await.len(), 1);
    fx.stop();
    match tokio::time::timeout(Duration::from_secs(15), w.next())
        .await
        .unwrap()
    {
        Some(WatchEvent::Disconnected { reason }) => assert!(!reason.is_empty()),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    fx.restart();
    let s2 = EtcdStore::connect(&[fx.endpoint()]).await.unwrap();
    s2.put("/t/resume/b", b"2".to_vec(), None).await.unwrap();
    s2.put("/t/resume/c", b"3".to_vec(), None).await.unwrap();
    let mut got = Vec::new();
    let mut reconnected = false;
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .unwrap()
        {
            Some(WatchEvent::Events(evs)) => got.extend(evs),
            Some(WatchEvent::Reconnected) => reconnected = true,
            Some(WatchEvent::Disconnected { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(reconnected);
    let keys: Vec<_> = got.iter().map(|e| e.key().to_string()).collect();
    assert_eq!(keys, ["/t/resume/b", "/t/resume/c"]);
}
