//! Registry benchmark: upserts per second, watch fan-out latency, and
//! snapshot delivery, on the embedded store and on a real etcd, with etcd's
//! own throughput for the same writes measured in the same run as baseline.
//!
//! `cargo bench -p fedmesh-benches --bench registry`
//! Knobs: FEDMESH_BENCH_N (100000), FEDMESH_BENCH_N_DISK (10000: the
//! embedded store on disk syncs every write), FEDMESH_BENCH_WATCHERS (1000),
//! FEDMESH_BENCH_CONCURRENCY (64), FEDMESH_BENCH_REPS (2).

use federation::store::etcd::EtcdStore;
use federation::store::memory::MemoryStore;
use federation::store::Store;
use fedmesh_benches as b;
use mesh_test::etcd::EtcdFixture;
use std::sync::Arc;
use std::time::Duration;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and
    // must not run the minutes-long measurement.
    if !std::env::args().any(|a| a == "--bench") {
        println!("registry bench: run with `cargo bench -p fedmesh-benches --bench registry`");
        return Ok(());
    }
    let n = knob("FEDMESH_BENCH_N", 100_000);
    let watchers = knob("FEDMESH_BENCH_WATCHERS", 1000);
    let conc = knob("FEDMESH_BENCH_CONCURRENCY", 64);
    let reps = knob("FEDMESH_BENCH_REPS", 2);
    let n_disk = knob("FEDMESH_BENCH_N_DISK", 10_000);
    println!("# registry bench: {n} endpoint upserts ({conc} in flight), {watchers} watchers, {reps} reps interleaved");
    println!(
        "# machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let fx = EtcdFixture::start();
    let etcd: Arc<dyn Store> = Arc::new(EtcdStore::connect(&[fx.endpoint()]).await?);
    let raw = etcd_client::Client::connect([fx.endpoint()], None).await?;

    // --- upserts, interleaved: memory, etcd raw, etcd through the registry ---
    let (mut mem, mut raw_r, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    let (mut disk, mut raw_small) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        // The durable embedded store (the default), beside etcd for the
        // same number of writes: both sync to disk before answering.
        let dir = tempfile::tempdir()?;
        let d_store: Arc<dyn Store> = Arc::new(MemoryStore::open(dir.path())?);
        let d = b::upserts_registry(d_store, n_disk, conc).await?;
        disk.push(rate(n_disk, d));
        eprintln!(
            "rep {rep}: embedded on disk      {:>10.0} upserts/s ({n_disk})",
            rate(n_disk, d)
        );
        let d = b::upserts_raw_etcd(raw.clone(), n_disk, conc).await?;
        raw_small.push(rate(n_disk, d));
        eprintln!(
            "rep {rep}: etcd raw put          {:>10.0} upserts/s ({n_disk})",
            rate(n_disk, d)
        );
        let m: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let d = b::upserts_registry(m, n, conc).await?;
        mem.push(rate(n, d));
        eprintln!(
            "rep {rep}: memory registry      {:>10.0} upserts/s",
            rate(n, d)
        );
        let d = b::upserts_raw_etcd(raw.clone(), n, conc).await?;
        raw_r.push(rate(n, d));
        eprintln!(
            "rep {rep}: etcd raw put          {:>10.0} upserts/s",
            rate(n, d)
        );
        let d = b::upserts_registry(etcd.clone(), n, conc).await?;
        ours.push(rate(n, d));
        eprintln!(
            "rep {rep}: etcd registry         {:>10.0} upserts/s",
            rate(n, d)
        );
    }
    let (mem, raw_r, ours) = (median(mem), median(raw_r), median(ours));
    let (disk, raw_small) = (median(disk), median(raw_small));
    println!();
    println!(
        "{:<34} {:>12} {:>14}",
        "upserts (median)", "per second", "vs etcd raw"
    );
    println!("{:<34} {:>12.0} {:>14}", "memory registry", mem, "-");
    println!(
        "{:<34} {:>12.0} {:>14.2}",
        format!("embedded on disk ({n_disk})"),
        disk,
        disk / raw_small
    );
    println!(
        "{:<34} {:>12.0} {:>14.2}",
        format!("etcd raw ({n_disk})"),
        raw_small,
        1.0
    );
    println!(
        "{:<34} {:>12.0} {:>14.2}",
        "etcd raw (etcd-client put)", raw_r, 1.0
    );
    println!(
        "{:<34} {:>12.0} {:>14.2}",
        "etcd registry (ours)",
        ours,
        ours / raw_r
    );
    println!(
        "targets: memory >= 200000/s: {}; etcd registry within 1.5x of raw: {} (raw/ours = {:.2})",
        if mem >= 200_000.0 { "met" } else { "MISSED" },
        if raw_r / ours <= 1.5 { "met" } else { "MISSED" },
        raw_r / ours
    );

    // --- watch fan-out ---
    println!();
    println!(
        "{:<34} {:>8} {:>10} {:>10} {:>10}",
        "watch fan-out", "deliv.", "p50 ms", "p99 ms", "max ms"
    );
    for (name, store) in [
        ("memory", Arc::new(MemoryStore::new()) as Arc<dyn Store>),
        ("etcd", etcd.clone()),
    ] {
        let l = b::watch_fanout(store, watchers, 20, Duration::from_millis(50)).await?;
        println!(
            "{:<34} {:>8} {:>10.3} {:>10.3} {:>10.3}",
            format!("{name}: {watchers} watchers x 20 puts"),
            l.count,
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.max_us as f64 / 1000.0
        );
    }

    // --- snapshot delivery: a federation over each store holding n endpoints ---
    println!();
    println!(
        "{:<34} {:>10} {:>16} {:>14}",
        "snapshot of n endpoints", "endpoints", "first read ms", "snapshot ms"
    );
    let m: Arc<dyn Store> = Arc::new(MemoryStore::new());
    b::upserts_registry(m.clone(), n, conc).await?;
    for (name, store) in [("memory", m), ("etcd", etcd.clone())] {
        let (sync, snap, got) = b::snapshot_delivery(store).await?;
        println!(
            "{:<34} {:>10} {:>16.1} {:>14.1}",
            format!("{name}: new subscriber"),
            got,
            sync.as_secs_f64() * 1000.0,
            snap.as_secs_f64() * 1000.0
        );
        anyhow::ensure!(got == n, "snapshot had {got} endpoints, expected {n}");
    }
    Ok(())
}
