//! Macro benchmarks of the registry, shared by `benches/registry.rs` (which
//! prints the figures) and a smoke test that runs them small so they cannot rot.

use federation::registry::Registry;
use federation::store::{Store, WatchEvent};
use futures::{StreamExt, TryStreamExt};
use mesh_api::v1 as api;
use mesh_api::v1::discovery_client::DiscoveryClient;
use mesh_core::convert::FromApi;
use mesh_core::endpoint::Endpoint;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sample endpoint number `i` of 100k-scale runs: 100 services x 4 clusters.
pub fn endpoint(i: usize) -> Endpoint {
    let a = api::Endpoint {
        id: format!("pod-{i:06}"),
        service: Some(api::ServiceKey {
            namespace: "bench".into(),
            name: format!("svc-{:03}", i % 100),
        }),
        cluster: format!("c{}", i % 4),
        address: format!(
            "10.{}.{}.{}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            (i & 0xff).max(1)
        ),
        ports: vec![api::Port {
            name: "http".into(),
            number: 8080,
            protocol: "http".into(),
            ..Default::default()
        }],
        labels: [
            ("app".to_string(), format!("svc-{:03}", i % 100)),
            ("version".to_string(), "v1".to_string()),
        ]
        .into(),
        locality: Some(api::Locality {
            region: "us-east".into(),
            zone: "us-east-1a".into(),
        }),
        health: api::Health::Healthy as i32,
        identity: "spiffe://cluster.local/ns/bench/sa/default".into(),
    };
    Endpoint::from_api(a, "endpoint").expect("sample endpoints are valid")
}

/// `n` endpoint upserts through the registry, `concurrency` in flight.
pub async fn upserts_registry(
    store: Arc<dyn Store>,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let reg = Registry::new(store);
    let eps: Vec<Endpoint> = (0..n).map(endpoint).collect();
    let start = Instant::now();
    futures::stream::iter(eps.iter().map(|e| reg.put_endpoint(e)))
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(start.elapsed())
}

/// The same writes (same keys, same JSON bytes) straight through
/// etcd-client: what etcd itself sustains from one client.
pub async fn upserts_raw_etcd(
    client: etcd_client::Client,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let kvs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let e = endpoint(i);
            (
                federation::registry::endpoint_key(&e.key()),
                serde_json::to_vec(&e).expect("json"),
            )
        })
        .collect();
    let start = Instant::now();
    futures::stream::iter(kvs.into_iter().map(|(k, v)| {
        let mut c = client.clone();
        async move { c.put(k, v, None).await.map(|_| ()) }
    }))
    .buffer_unordered(concurrency)
    .try_for_each(|()| async { Ok(()) })
    .await?;
    Ok(start.elapsed())
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Deliveries measured.
    pub count: usize,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Worst.
    pub max_us: u64,
}

fn latency(mut v: Vec<u64>) -> Latency {
    v.sort_unstable();
    let at = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v.get(i).copied().unwrap_or(0)
    };
    Latency {
        count: v.len(),
        p50_us: at(0.5),
        p99_us: at(0.99),
        max_us: v.last().copied().unwrap_or(0),
    }
}

/// `watchers` store watches on one prefix; `puts` writes, one every `gap`;
/// the time from each write to each watcher seeing it.
pub async fn watch_fanout(
    store: Arc<dyn Store>,
    watchers: usize,
    puts: usize,
    gap: Duration,
) -> anyhow::Result<Latency> {
    let base = Instant::now();
    let prefix = "/bench/fanout/";
    let from = store.range(prefix).await?.revision + 1;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut w = store.watch(prefix, from).await?;
        let tx = tx.clone();
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = ready.send(());
            let mut seen = 0;
            while seen < puts {
                match w.next().await {
                    Some(WatchEvent::Events(evs)) => {
                        let now = base.elapsed().as_micros() as u64;
                        for ev in evs {
                            if let federation::store::Event::Put(kv) = ev {
                                let sent: u64 = std::str::from_utf8(&kv.value)
                                    .ok()
                                    .and_then(|s| s.parse().ok())
                                    .unwrap_or(now);
                                let _ = tx.send(now.saturating_sub(sent));
                                seen += 1;
                            }
                        }
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        }));
    }
    drop(tx);
    for _ in 0..watchers {
        ready_rx.recv().await;
    }
    // Let every watch register with the backend before writing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..puts {
        let sent = base.elapsed().as_micros() as u64;
        store
            .put(
                &format!("{prefix}k{i}"),
                sent.to_string().into_bytes(),
                None,
            )
            .await?;
        tokio::time::sleep(gap).await;
    }
    let mut lat = Vec::with_capacity(watchers * puts);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while lat.len() < watchers * puts {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(v)) => lat.push(v),
            _ => break,
        }
    }
    for t in tasks {
        t.abort();
    }
    anyhow::ensure!(
        lat.len() == watchers * puts,
        "only {} of {} deliveries arrived",
        lat.len(),
        watchers * puts
    );
    Ok(latency(lat))
}

/// Times a federation over `store` (already holding the endpoints):
/// its first full read, then a new subscriber's complete snapshot.
pub async fn snapshot_delivery(
    store: Arc<dyn Store>,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let start = Instant::now();
    let bound = federation::app::serve(
        &federation::config::Config::embedded(([127, 0, 0, 1], 0).into()),
        store,
    )
    .await?;
    bound.shared.wait_synced().await;
    let sync = start.elapsed();
    // A subscriber is a node of c0: a certificate from the federation's CA.
    let node = bound
        .node_context("c0", "spiffe://cluster.local/ns/default/sa/bench")
        .await?;
    let mut disc = DiscoveryClient::new(
        mesh_node::fed::Target::from_context(&node)?
            .channel()
            .await?,
    )
    .max_decoding_message_size(16 * 1024 * 1024);
    let t0 = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: "bench".into(),
            cluster: "c0".into(),
            kind: api::NodeKind::Agent as i32,
            namespace: "default".into(),
            ..Default::default()
        })),
    })
    .await?;
    let mut stream = disc
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut n = 0;
    loop {
        let m = stream
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        n += m.endpoints.len();
        if m.snapshot.as_ref().is_some_and(|s| s.last) {
            break;
        }
    }
    let took = t0.elapsed();
    drop(tx);
    bound.shutdown(Duration::from_secs(1)).await?;
    Ok((sync, took, n))
}

/// The median of `v` (the mean of the middle two for an even count); NaN
/// for none.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Writes a bench's table to `target/bench/<name>-<UTC time>.txt` (under
/// `CARGO_TARGET_DIR` when set) and says where.
pub fn write_report(name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let benches = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            benches.parent().unwrap_or(benches).join("target")
        });
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!(
        "{name}-{}.txt",
        jiff::Timestamp::now().strftime("%Y-%m-%dT%H%M")
    ));
    std::fs::write(&out, text)?;
    println!("written to {}", out.display());
    Ok(out)
}
