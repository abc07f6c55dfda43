//! Runs the registry benchmarks small, on both backends, the handshake
//! benchmark for a fraction of a second, and the traffic benchmark at small
//! sizes, so they keep working.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::store::etcd::EtcdStore;
use federation::store::memory::MemoryStore;
use federation::store::Store;
use fedmesh_benches as b;
use mesh_test::etcd::EtcdFixture;
use std::sync::Arc;
use std::time::Duration;

// The handshake bench keeps its code in its own file; `main` goes unused here.
#[allow(dead_code)]
#[path = "../benches/handshake.rs"]
mod handshake;

// The same for the flood bench, which holds the traffic bench (its
// federation child process and helpers).
#[allow(dead_code)]
#[path = "../benches/flood.rs"]
mod flood;
use flood::traffic;

#[tokio::test]
async fn benchmarks_run_small() {
    let fx = EtcdFixture::start();
    let etcd: Arc<dyn Store> = Arc::new(EtcdStore::connect(&[fx.endpoint()]).await.unwrap());
    let raw = etcd_client::Client::connect([fx.endpoint()], None)
        .await
        .unwrap();
    let mem: Arc<dyn Store> = Arc::new(MemoryStore::new());
    b::upserts_registry(mem.clone(), 300, 8).await.unwrap();
    b::upserts_raw_etcd(raw, 300, 8).await.unwrap();
    b::upserts_registry(etcd.clone(), 300, 8).await.unwrap();
    for s in [mem.clone(), etcd.clone()] {
        let l = b::watch_fanout(s, 20, 3, Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(l.count, 60);
        assert!(l.p50_us <= l.p99_us && l.p99_us <= l.max_us);
    }
    for s in [mem, etcd] {
        let (_, _, n) = b::snapshot_delivery(s).await.unwrap();
        assert_eq!(n, 300, "every endpoint arrives in the snapshot");
    }
}

/// The handshake bench, quick: both servers take mTLS handshakes, both
/// signing paths sign, nothing fails.
#[test]
fn handshake_bench_runs_small() {
    let r = handshake::run(&handshake::Opts {
        secs: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        rounds: 1,
        concurrency: 4,
        csr_pool: 16,
        latency_calls: 2,
    })
    .unwrap();
    assert_eq!(r.errors, 0, "{}", r.text);
    for rates in [&r.agent, &r.plain, &r.grpc, &r.raw] {
        assert_eq!(rates.len(), 1);
        assert!(rates[0].rate > 0.0, "{}", r.text);
    }
    assert!(r.text.contains("median"), "{}", r.text);
    assert!(r.latency.0 > Duration::ZERO && r.latency.0 <= r.latency.1);
}

/// The traffic bench, quick: 500 services x 6 clusters, 50 agents, two
/// weight changes; every agent gets and ACKs every change, and the
/// federation binary's memory is read.
#[test]
fn traffic_bench_runs_small() {
    let r = traffic::run(&traffic::Opts {
        services: 500,
        clusters: 6,
        rounds: 3,
        agents: 50,
        channels: 2,
        changes: 2,
        sync_patience: Duration::from_secs(60),
    })
    .unwrap();
    assert_eq!(r.recompute.n, 3, "{}", r.text);
    assert!(
        r.recompute.p50 > 0.0 && r.inputs_from.p50 > 0.0,
        "{}",
        r.text
    );
    for d in [
        &r.weights_recv,
        &r.weights_ack,
        &r.endpoint_recv,
        &r.endpoint_ack,
    ] {
        assert_eq!(d.n, 100, "every agent, every change: {}", r.text);
        assert!(d.p50 <= d.p99 && d.p99 <= d.max, "{}", r.text);
    }
    assert!(
        r.weights_recv.p50 <= r.weights_ack.p50,
        "an ACK is recorded after the delta arrives: {}",
        r.text
    );
    assert_eq!(r.mem_synced, 50, "{}", r.text);
    assert!(r.mem.idle > 0.0 && r.mem.subscribers > 0.0, "{}", r.text);
    assert!(
        r.mem.agent_services >= 500 && r.mem.agent_mesh > 0.0 && r.mem.agent_empty > 0.0,
        "the agent's table had every service: {}",
        r.text
    );
    assert!(r.text.contains("full recompute"), "{}", r.text);
}

/// The flood bench, quick: a few 2 MiB requests at once, anonymous and as
/// the admin, all refused (none applied), the peaks read.
#[test]
fn flood_bench_runs_small() {
    let r = flood::run(&flood::Opts {
        calls: 4,
        mib: 2,
        rounds: 1,
    })
    .unwrap();
    let round = &r.rounds[0];
    assert!(round.idle > 0.0 && round.anonymous.peak > 0.0, "{}", r.text);
    assert_eq!(
        round.anonymous.codes.get("Unauthenticated"),
        Some(&4),
        "{}",
        r.text
    );
    assert!(!round.admin.codes.contains_key("Ok"), "{}", r.text);
    assert_eq!(round.admin.codes.values().sum::<usize>(), 4, "{}", r.text);
    assert!(r.text.contains("median"), "{}", r.text);
}
