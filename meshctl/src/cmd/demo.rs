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
use crate::Error;
use bytes::Bytes;
use federation::config::{Args as FedArgs, Config};
use http_body_util::{BodyExt, Full};
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::registration_client::RegistrationClient;
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
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
}

/// The sample topology: two clusters in us-east, one each in us-west and eu-west.
pub const CLUSTERS: &[(&str, &str, &str)] = &[
    ("us-east-1", "us-east", "us-east-1a"),
    ("us-east-2", "us-east", "us-east-1b"),
    ("us-west-1", "us-west", "us-west-2a"),
    ("eu-west-1", "eu-west", "eu-west-1a"),
];

/// A tiny HTTP application: answers every request with its name and
/// cluster, until `stop`.
async fn sample_app(
    cluster: &'static str,
    service: &'static str,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                a = l.accept() => match a { Ok(a) => a, Err(_) => continue },
                _ = stop.wait_for(|s| *s) => return,
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let resp = http::Response::builder()
                        .header("x-cluster", cluster)
                        .body(Full::new(Bytes::from(format!("{service} in {cluster}\n"))));
                    resp
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
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

#[allow(clippy::too_many_arguments)]
fn agent_args(
    url: &str,
    cluster: &str,
    region: &str,
    zone: &str,
    service: &str,
    app: SocketAddr,
    port: u16,
    token: &str,
) -> Vec<String> {
    [
        "fedmesh-agent",
        "--cluster",
        cluster,
        "--region",
        region,
        "--zone",
        zone,
        "--service",
        service,
        "--app",
        &app.to_string(),
        "--port",
        &port.to_string(),
        "--federation",
        url,
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--join-token",
        token,
        "--id",
        &format!("{service}-{cluster}"),
        "--probe-interval",
        "1s",
        "--capacity",
        "200",
        "--load-report-interval",
        "2s",
        "--drain-deadline",
        "2s",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

/// Runs the demo until SIGINT/SIGTERM.
#[allow(clippy::too_many_lines)]
pub async fn run(args: &DemoArgs, _fmt: Format) -> Result<(), Error> {
    use clap::Parser;
    let registry = match &args.etcd {
        None => "memory".to_string(),
        Some(u) if u.starts_with("etcd://") => u.clone(),
        Some(u) => format!("etcd://{}", u.trim_start_matches("http://")),
    };
    let fed_args = FedArgs::try_parse_from([
        "meshctl-demo",
        "--listen",
        &args.listen,
        "--registry",
        &registry,
        "--leader-ttl",
        "3s",
        "--log-format",
        "text",
    ])
    .map_err(|e| Error::Usage(e.to_string()))?;
    let cfg = Config::from_args(&fed_args).map_err(|errs| Error::Usage(errs.join("; ")))?;
    let fed = federation::app::build(&cfg).await?;
    let url = format!("http://{}", fed.addr);
    println!("federation listening on {url} (registry: {registry})");
    fed.shared.wait_synced().await;
    let ch = crate::client::connect(&url).await?;
    let mut reg = RegistrationClient::new(ch.clone());
    let mut admin = AdminClient::new(ch.clone());
    // Load stops first, then the agents drain, then the applications stop.
    let (stop, stop_rx) = watch::channel(false);
    let (stop_load, load_rx) = watch::channel(false);
    let mut gateways = Vec::new();
    let mut agents = Vec::new();
    let mut frontends = Vec::new();
    let mut interval = Duration::from_secs(3);
    let total = CLUSTERS.len();
    for (i, (name, region, zone)) in CLUSTERS.iter().enumerate() {
        // The cluster's east-west gateway, then the cluster itself.
        let gw_cfg = gateway::config::Config::from_args(
            &gateway::config::Args::try_parse_from([
                "fedmesh-gateway",
                "--cluster",
                name,
                "--listen",
                "127.0.0.1:0",
                "--federation",
                &url,
                "--access-log",
                "off",
                "--probe-interval",
                "2s",
                "--drain-deadline",
                "2s",
            ])
            .map_err(|e| Error::Usage(e.to_string()))?,
        )
        .map_err(|errs| Error::Usage(errs.join("; ")))?;
        let gw = gateway::app::build(&gw_cfg, &tokio::runtime::Handle::current()).await?;
        let resp = reg
            .register_cluster(api::RegisterClusterRequest {
                cluster: Some(api::ClusterInfo {
                    name: (*name).into(),
                    locality: Some(api::Locality {
                        region: (*region).into(),
                        zone: (*zone).into(),
                    }),
                    network: format!("net-{name}"),
                    gateway_addresses: vec![gw.addr.to_string()],
                    trust_domain: "cluster.local".into(),
                }),
            })
            .await?
            .into_inner();
        interval = Duration::from_secs(u64::from(resp.heartbeat_interval_seconds.max(1)));
        gateways.push(gw);
        // reviews and frontend, each an application with its agent.
        for (service, port) in [("reviews", 9080u16), ("frontend", 8080)] {
            let app = sample_app(name, service, stop_rx.clone())
                .await
                .map_err(|e| Error::Other(anyhow::anyhow!("a sample application: {e}")))?;
            let token = admin
                .create_join_token(api::CreateJoinTokenRequest {
                    cluster: (*name).into(),
                    namespace: "default".into(),
                    service_account: service.into(),
                    ttl_seconds: 600,
                    single_use: true,
                })
                .await?
                .into_inner()
                .token;
            let a = mesh_agent::config::Config::from_args(
                &mesh_agent::config::Args::try_parse_from(agent_args(
                    &url, name, region, zone, service, app, port, &token,
                ))
                .map_err(|e| Error::Usage(e.to_string()))?,
            )
            .map_err(|errs| Error::Usage(errs.join("; ")))?;
            let bound = mesh_agent::app::build(&a).await?;
            if service == "frontend" {
                frontends.push((*name, bound.outbound));
            }
            agents.push(bound);
        }
        reg.set_export(api::SetExportRequest {
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            cluster: (*name).into(),
            exported: true,
        })
        .await?;
        println!(
            "[{}/{total}] cluster {name} ({region}/{zone}): gateway {}, reviews and frontend with their agents",
            i + 1,
            gateways.last().map(|g| g.addr.to_string()).unwrap_or_default()
        );
    }
    println!();
    println!("The mesh is up. In another terminal:");
    println!("  meshctl --federation {url} weights get reviews");
    println!("  meshctl --federation {url} weights set reviews us-east-1=50,eu-west-1=50");
    println!("  meshctl --federation {url} drain us-west-1");
    println!("Ctrl-C stops the demo.");

    let stats: Stats = Arc::default();
    for (from, outbound) in &frontends {
        tokio::spawn(load(
            from,
            *outbound,
            args.rate,
            stats.clone(),
            load_rx.clone(),
        ));
    }
    let heartbeats = heartbeat_loop(reg, interval);
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
        r = heartbeats => r,
        () = view => Ok(()),
        s = mesh_core::signal::shutdown() => s.map(|_| ()).map_err(|e| Error::Other(e.into())),
    };
    println!("stopping the demo");
    stop_load.send_replace(true);
    for a in agents {
        a.drain().await;
    }
    stop.send_replace(true);
    for g in gateways {
        g.drain().await;
    }
    fed.shutdown(Duration::from_secs(2)).await?;
    outcome
}

async fn heartbeat_loop(
    mut reg: RegistrationClient<tonic::transport::Channel>,
    every: Duration,
) -> Result<(), Error> {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for (name, _, _) in CLUSTERS {
            if let Err(e) = reg
                .heartbeat(api::HeartbeatRequest {
                    cluster: (*name).into(),
                })
                .await
            {
                tracing::warn!(cluster = name, "heartbeat failed: {}", e.message());
            }
        }
    }
}
