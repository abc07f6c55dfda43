//! Leader election on a real etcd: one leader among replica processes; a
//! leader killed with SIGKILL is replaced within the lease TTL; a leader
//! cut off from etcd is fenced out (its writes never land once another
//! leads, and no two leaders' writes interleave); a leader that stops hands
//! over at once; the embedded registry's single replica leads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::leader::{self, LeaderRecord, LEADER_KEY};
use federation::store::etcd::EtcdStore;
use federation::store::{Store, TxnWrite, WatchEvent};
use futures::StreamExt;
use mesh_test::etcd::EtcdFixture;
use mesh_test::process::Proc;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-federation");

async fn holder(store: &dyn Store) -> Option<String> {
    let kv = store.get(LEADER_KEY).await.unwrap()?;
    Some(
        serde_json::from_slice::<LeaderRecord>(&kv.value)
            .unwrap()
            .replica,
    )
}

/// Waits (bounded) for a leader other than `not`.
async fn leader_other_than(store: &dyn Store, not: Option<&str>, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(h) = holder(store).await {
            if Some(h.as_str()) != not {
                return h;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new leader within {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_killed_leader_is_replaced_within_the_lease_ttl() {
    let fx = EtcdFixture::start();
    let store = EtcdStore::connect(&[fx.endpoint()]).await.unwrap();
    let registry = format!("etcd://{}", fx.client_addr());
    let ttl = Duration::from_secs(3);
    let mut procs: Vec<(String, Proc)> = ["r1", "r2", "r3"]
        .iter()
        .map(|r| {
            let p = Proc::spawn(
                BIN,
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--registry",
                    &registry,
                    "--replica",
                    r,
                    "--leader-ttl",
                    "3s",
                ],
            );
            ((*r).to_string(), p)
        })
        .collect();
    let first = leader_other_than(&store, None, Duration::from_secs(20)).await;
    // Exactly one leads: the others say they follow, and keep following.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(holder(&store).await.as_deref(), Some(first.as_str()));

    let i = procs.iter().position(|(r, _)| *r == first).unwrap();
    let (_, mut dead) = procs.remove(i);
    dead.signal("KILL");
    let killed = Instant::now();
    dead.wait_exit(Duration::from_secs(5));
    let second = leader_other_than(&store, Some(&first), ttl + Duration::from_secs(3)).await;
    let took = killed.elapsed();
    // The lease lapses after the TTL (etcd checks expiry every 500 ms); the
    // watchers take the key at once.
    assert!(
        took <= ttl + Duration::from_millis(1500),
        "{second} took over after {took:?}, TTL {ttl:?}"
    );
    assert!(procs.iter().any(|(r, _)| *r == second));

    // A clean stop hands over at once, without waiting for the TTL.
    let i = procs.iter().position(|(r, _)| *r == second).unwrap();
    let (_, mut leaving) = procs.remove(i);
    leaving.signal("TERM");
    let stopped = Instant::now();
    let third = leader_other_than(&store, Some(&second), ttl + Duration::from_secs(3)).await;
    assert!(
        stopped.elapsed() < ttl,
        "{third} took over {:?} after a clean stop",
        stopped.elapsed()
    );
    leaving.wait_exit(Duration::from_secs(10));
    for (_, mut p) in procs {
        p.signal("TERM");
        p.wait_exit(Duration::from_secs(10));
    }
}

#[tokio::test]
async fn a_leader_cut_off_from_etcd_is_fenced_out() {
    mesh_test::trace_init();
    let fx = EtcdFixture::start();
    let relay = mesh_test::relay::TcpRelay::start(fx.client_addr())
        .await
        .unwrap();
    let direct: Arc<dyn Store> = Arc::new(EtcdStore::connect(&[fx.endpoint()]).await.unwrap());
    let behind_relay: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&[format!("http://{}", relay.addr())])
            .await
            .unwrap(),
    );
    let ttl = Duration::from_secs(2);
    let (_stop_a, stop_rx) = tokio::sync::watch::channel(false);
    let (a, _ta) = leader::start(behind_relay.clone(), "a".into(), ttl, stop_rx);
    // a leads first.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.term().is_none() {
        assert!(Instant::now() < deadline, "a never led");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_stop_b, stop_rx) = tokio::sync::watch::channel(false);
    let (b, _tb) = leader::start(direct.clone(), "b".into(), ttl, stop_rx);

    // Both write a log entry every 20 ms while they think they lead.
    let writer = |e: leader::Election, who: &'static str| {
        tokio::spawn(async move {
            let mut n = 0u32;
            let mut stale_refused = 0u32;
            let mut last_term = None;
            for _ in 0..400 {
                let term = e.term().or_else(|| last_term.clone());
                if let Some(t) = &term {
                    n += 1;
                    let w = TxnWrite {
                        key: "/fedmesh/v1/test/log".into(),
                        expect: None,
                        value: Some(format!("{who} {} {n}", t.token).into_bytes()),
                    };
                    // Also with a term it no longer holds: the fence refuses.
                    if let Err(leader::WriteError::NotLeader(_)) = e.write(t, vec![w]).await {
                        stale_refused += 1;
                    }
                }
                if e.term().is_some() {
                    last_term = e.term();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stale_refused
        })
    };
    let mut log = direct.watch("/fedmesh/v1/test/log", 1).await.unwrap();
    let wa = writer(a.clone(), "a");
    let wb = writer(b.clone(), "b");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Partition a from etcd: it cannot renew, b takes over after the TTL.
    relay.cut();
    let took_over = leader_other_than(&*direct, Some("a"), ttl * 3).await;
    assert_eq!(took_over, "b");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Heal: a comes back with its old term in hand; its writes are refused.
    relay.restore();
    let refused_a = wa.await.unwrap();
    let _ = wb.await.unwrap();
    assert!(
        refused_a > 0,
        "a's writes with its old term were never refused"
    );
    assert!(a.term().is_none(), "a knows it no longer leads");

    // The log in etcd: a's entries, then b's, never mixed.
    let mut writers = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            ev = log.next() => match ev {
                Some(WatchEvent::Events(evs)) => {
                    for e in evs {
                        if let federation::store::Event::Put(kv) = e {
                            let v = String::from_utf8(kv.value).unwrap();
                            writers.push(v.split(' ').next().unwrap().to_string());
                        }
                    }
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    let switches = writers.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(writers.first().is_some_and(|w| w == "a"), "{writers:?}");
    assert!(writers.last().is_some_and(|w| w == "b"), "{writers:?}");
    assert_eq!(switches, 1, "leaders' writes interleaved: {writers:?}");
}

#[tokio::test]
async fn the_embedded_registrys_single_replica_leads() {
    let fed = federation::app::build(&federation::config::Config::embedded(
        ([127, 0, 0, 1], 0).into(),
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fed.election.term().is_none() {
        assert!(
            Instant::now() < deadline,
            "the single replica does not lead"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = mesh_api::v1::admin_client::AdminClient::new(common::admin(&fed).await)
        .get_status(mesh_api::v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.leading);
    assert_eq!(st.leader, st.replica);
    fed.shutdown(Duration::from_secs(1)).await.unwrap();
}
