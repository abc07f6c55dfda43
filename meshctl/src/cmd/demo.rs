//! `meshctl demo`: a live multi-region mesh on one machine, no root, no
//! etcd (unless `--etcd`).
//!
//! It starts, in this process: the federation (embedded registry), and for
//! each of four clusters in three regions an east-west gateway, a `reviews`
//! backend and a `frontend` with their agents (certificates from the
//! federation's CA through join tokens). Every cluster is its own network,
//! so calls between clusters go through the gateways with end-to-end mTLS.
//! Each frontend calls `reviews` at a steady rate through its agent; a live
//! view shows, per calling cluster, requests per second, success rate, p99
//! and where the calls went. `meshctl weights set reviews ...` from another
//! terminal moves the split as you watch. Ctrl-C stops everything.

use crate::cli::Format;
use crate::demo::{Demo, Options, CLUSTERS};
use crate::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Flags of `meshctl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Address for the demo federation's API.
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub listen: String,
    /// Use etcd (`etcd://HOST:PORT[,...]`) instead of the embedded registry.
    #[arg(long)]
    pub etcd: Option<String>,
    /// Requests per second each frontend sends to `reviews`.
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// Where to write the topology `meshctl drill run` acts on (default:
    /// `$XDG_RUNTIME_DIR/fedmesh/topology.json`, else in the temporary
    /// directory).
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// Put every cluster in a network namespace of its own, with the WAN
    /// relay's delay and loss between regions (needs root; what
    /// `deploy/local/up.sh` runs). The federation listens on 198.19.255.2
    /// at `--listen`'s port.
    #[arg(long)]
    pub netns: bool,
}

/// One call to `reviews` through the frontend agent's outbound listener:
/// the cluster that answered, or `None` on failure.
async fn call(outbound: SocketAddr) -> Option<String> {
    let tcp = tokio::net::TcpStream::connect(outbound).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/")
        .header("host", "reviews.default:9080")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tx.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let cluster = resp
        .headers()
        .get("x-cluster")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)?;
    resp.into_body().collect().await.ok()?;
    Some(cluster)
}

/// What one frontend saw in the current second.
#[derive(Default)]
struct Window {
    ok: u64,
    failed: u64,
    latencies_ms: Vec<f64>,
    by_cluster: BTreeMap<String, u64>,
}

type Stats = Arc<Mutex<BTreeMap<&'static str, Window>>>;

/// Sends `rate` requests per second from `from` until `stop`.
async fn load(
    from: &'static str,
    outbound: SocketAddr,
    rate: u32,
    stats: Stats,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let stats = stats.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(5), call(outbound))
                .await
                .ok()
                .flatten();
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            let mut s = stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let w = s.entry(from).or_default();
            match r {
                Some(c) => {
                    w.ok += 1;
                    w.latencies_ms.push(ms);
                    *w.by_cluster.entry(c).or_default() += 1;
                }
                None => w.failed += 1,
            }
        });
    }
}

/// The live view: once a second, per calling cluster.
fn render(stats: &Stats, elapsed: f64, tty: bool) {
    let windows = std::mem::take(
        &mut *stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut rows = Vec::new();
    for (from, _, _) in CLUSTERS {
        let Some(mut w) = windows.get(from).map(|w| Window {
            ok: w.ok,
            failed: w.failed,
            latencies_ms: w.latencies_ms.clone(),
            by_cluster: w.by_cluster.clone(),
        }) else {
            rows.push(vec![
                (*from).to_string(),
                "0".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
            continue;
        };
        let total = w.ok + w.failed;
        w.latencies_ms.sort_by(f64::total_cmp);
        let p99 = w
            .latencies_ms
            .get(((w.latencies_ms.len() as f64) * 0.99).ceil() as usize)
            .or(w.latencies_ms.last())
            .copied()
            .unwrap_or(0.0);
        #[allow(clippy::cast_precision_loss)]
        let split = w
            .by_cluster
            .iter()
            .map(|(c, n)| format!("{c} {:.0}%", *n as f64 * 100.0 / w.ok.max(1) as f64))
            .collect::<Vec<_>>()
            .join("  ");
        #[allow(clippy::cast_precision_loss)]
        rows.push(vec![
            (*from).to_string(),
            format!("{:.0}", total as f64 / elapsed),
            format!("{:.1}%", w.ok as f64 * 100.0 / total.max(1) as f64),
            format!("{p99:.1} ms"),
            split,
        ]);
    }
    let table = crate::output::table(&["FROM", "REQ/S", "SUCCESS", "P99", "SERVED BY"], &rows);
    if tty {
        print!("\x1b[2J\x1b[H");
        println!("fedmesh demo: frontend -> reviews, every second (Ctrl-C stops)\n");
        print!("{table}");
        println!("\ntry: meshctl weights set reviews us-east-1=50,eu-west-1=50   |   meshctl drain us-east-1");
    } else {
        for line in table.lines().skip(1) {
            println!("live {line}");
        }
    }
}

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(args: &DemoArgs, _fmt: Format) -> Result<(), Error> {
    let registry = match &args.etcd {
        None => "embedded".to_string(),
        Some(u) if u.starts_with("etcd://") => u.clone(),
        Some(u) => format!("etcd://{}", u.trim_start_matches("http://")),
    };
    let demo = Demo::start(
        &Options {
            listen: args.listen.clone(),
            registry: registry.clone(),
            netns: args.netns,
        },
        |line| println!("{line}"),
    )
    .await?;
    let url = demo.url.clone();
    let topology = args
        .topology
        .clone()
        .unwrap_or_else(crate::drill::topology::Topology::default_path);
    demo.topology()
        .write(&topology)
        .map_err(|e| Error::Other(anyhow::anyhow!(e)))?;
    println!("topology for drills written to {}", topology.display());
    // The demo's admin credential, as the context every command below uses.
    let config = mesh_core::client_config::ClientConfig::default_path().ok_or_else(|| {
        Error::Usage("no place for the meshctl configuration: set FEDMESH_CONFIG or HOME".into())
    })?;
    let mut file = mesh_core::client_config::ClientConfig::load(&config).map_err(Error::Usage)?;
    let previous = file.current_context.clone();
    file.upsert(demo.admin.clone());
    file.save(&config).map_err(Error::Usage)?;
    println!(
        "meshctl context \"demo\" (TLS, the demo's admin certificate) written to {} and made current{}",
        config.display(),
        if previous.is_empty() || previous == "demo" {
            String::new()
        } else {
            format!(" (it was {previous:?})")
        }
    );
    println!();
    println!("The mesh is up at {url}. In another terminal:");
    println!("  meshctl weights get reviews");
    println!("  meshctl weights set reviews us-east-1=50,eu-west-1=50");
    println!("  meshctl drain us-west-1");
    println!("  meshctl status");
    println!(
        "  meshctl drill run scenarios/blackhole-gateway.yaml --topology {}",
        topology.display()
    );
    // Caught before it is offered: a Ctrl-C right after the line stops cleanly.
    let signals = mesh_core::signal::listen().map_err(|e| Error::Other(e.into()))?;
    println!("Ctrl-C stops the demo.");

    let (stop_load, load_rx) = watch::channel(false);
    let stats: Stats = Arc::default();
    for (from, outbound) in &demo.frontends {
        tokio::spawn(load(
            from,
            *outbound,
            args.rate,
            stats.clone(),
            load_rx.clone(),
        ));
    }
    let view = async {
        let tty = std::io::stdout().is_terminal();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last = Instant::now();
        loop {
            tick.tick().await;
            render(&stats, last.elapsed().as_secs_f64(), tty);
            last = Instant::now();
        }
    };
    let outcome = tokio::select! {
        () = view => Ok(()),
        _ = signals.wait() => Ok(()),
    };
    println!("stopping the demo");
    stop_load.send_replace(true);
    let _ = std::fs::remove_file(&topology);
    demo.stop().await?;
    outcome
}
