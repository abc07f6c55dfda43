//! The demo mesh, in this process: the federation (embedded registry, or
//! etcd), and for each of four clusters in three regions an east-west
//! gateway and three applications (`frontend`, `reviews`, `ratings`), each
//! with its agent and a certificate from the federation's CA through a join
//! token. Every cluster is its own network: calls between clusters go
//! through the gateways with end-to-end mTLS.
//!
//! A WAN relay ([`wan_relay`]) stands on the paths a drill breaks: in front
//! of every gateway (what other clusters dial) and between each cluster's
//! proxies and the federation. A small control API stops and starts
//! gateways and makes applications fail. [`Demo::topology`] describes it
//! all for `meshctl drill run`.

use crate::drill::topology::{Cluster, Topology};
use crate::Error;
use bytes::Bytes;
use federation::config::{Args as FedArgs, Config};
use http_body_util::Full;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::registration_client::RegistrationClient;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};

/// The sample topology: two clusters in us-east, one each in us-west and eu-west.
pub const CLUSTERS: &[(&str, &str, &str)] = &[
    ("us-east-1", "us-east", "us-east-1a"),
    ("us-east-2", "us-east", "us-east-1b"),
    ("us-west-1", "us-west", "us-west-2a"),
    ("eu-west-1", "eu-west", "eu-west-1a"),
];

/// The applications of each cluster, with their ports; `frontend` calls the
/// others.
pub const SERVICES: &[(&str, u16)] = &[("reviews", 9080), ("ratings", 9080), ("frontend", 8080)];

/// How to start the demo.
#[derive(Debug, Clone)]
pub struct Options {
    /// The federation's API address.
    pub listen: String,
    /// `memory`, or an etcd URL.
    pub registry: String,
}

/// A running demo mesh.
pub struct Demo {
    /// The federation.
    pub federation: federation::app::Bound,
    /// Its URL.
    pub url: String,
    /// The WAN relay.
    pub relay: wan_relay::Relay,
    /// Each cluster's frontend agent's outbound listener.
    pub frontends: Vec<(&'static str, SocketAddr)>,
    topology: Topology,
    state: Arc<State>,
    agents: Vec<mesh_agent::app::Bound>,
    stop_apps: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the control API changes.
struct State {
    /// Per cluster: its gateway's config (for a restart) and the gateway,
    /// while it runs.
    gateways: Mutex<BTreeMap<String, (gateway::config::Config, Option<gateway::app::Bound>)>>,
    /// Per (cluster, service): the application answers 503 while set.
    failing: BTreeMap<(String, String), Arc<AtomicBool>>,
}

/// A tiny HTTP application: answers every request with its name and
/// cluster (header `x-cluster`), or 503 while `failing`, until `stop`.
async fn sample_app(
    cluster: &'static str,
    service: &'static str,
    failing: Arc<AtomicBool>,
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
            let failing = failing.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let failing = failing.load(Ordering::Relaxed);
                    async move {
                        let (status, body) = if failing {
                            (503, format!("{service} in {cluster} is failing (drill)\n"))
                        } else {
                            (200, format!("{service} in {cluster}\n"))
                        };
                        http::Response::builder()
                            .status(status)
                            .header("x-cluster", cluster)
                            .body(Full::new(Bytes::from(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
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

/// A loopback port for a listener that must keep its address across
/// restarts (a gateway's), held until the returned listener is dropped so
/// that nothing else in this process is given it meanwhile.
fn reserve_port() -> Result<(u16, std::net::TcpListener), Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Other(anyhow::anyhow!("no free loopback port: {e}")))?;
    let port = l
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Other(e.into()))?;
    Ok((port, l))
}

fn gateway_config(name: &str, port: u16, url: &str) -> Result<gateway::config::Config, Error> {
    use clap::Parser;
    gateway::config::Config::from_args(
        &gateway::config::Args::try_parse_from([
            "fedmesh-gateway",
            "--cluster",
            name,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--federation",
            url,
            "--access-log",
            "off",
            "--probe-interval",
            "1s",
            "--drain-deadline",
            "2s",
        ])
        .map_err(|e| Error::Usage(e.to_string()))?,
    )
    .map_err(|errs| Error::Usage(errs.join("; ")))
}

impl Demo {
    /// Starts the whole mesh; `progress` gets a line per cluster started.
    #[allow(clippy::too_many_lines)]
    pub async fn start(opts: &Options, progress: impl Fn(String)) -> Result<Self, Error> {
        use clap::Parser;
        let fed_args = FedArgs::try_parse_from([
            "meshctl-demo",
            "--listen",
            &opts.listen,
            "--registry",
            &opts.registry,
            "--leader-ttl",
            "3s",
            "--weights-interval",
            "500ms",
            "--log-format",
            "text",
        ])
        .map_err(|e| Error::Usage(e.to_string()))?;
        let cfg = Config::from_args(&fed_args).map_err(|errs| Error::Usage(errs.join("; ")))?;
        let fed = federation::app::build(&cfg).await?;
        let url = format!("http://{}", fed.addr);
        fed.shared.wait_synced().await;
        progress(format!(
            "federation listening on {url} (registry: {})",
            opts.registry
        ));

        // The relay: a link in front of each gateway (on ports chosen now,
        // kept across restarts) and one from each cluster to the federation.
        let mut gw_ports = BTreeMap::new();
        let mut held = Vec::new();
        let mut specs = Vec::new();
        for (name, _, _) in CLUSTERS {
            let (port, listener) = reserve_port()?;
            held.push(listener);
            gw_ports.insert(*name, port);
            for (link, target) in [
                (
                    format!("gw-{name}"),
                    SocketAddr::from(([127, 0, 0, 1], port)),
                ),
                (format!("fed-{name}"), fed.addr),
            ] {
                specs.push(
                    wan_relay::LinkSpec::new(&link, ([127, 0, 0, 1], 0).into(), target)
                        .map_err(|e| Error::Other(e.into()))?,
                );
            }
        }
        let relay = wan_relay::Relay::start(specs, Some(([127, 0, 0, 1], 0).into()))
            .await
            .map_err(|e| Error::Other(anyhow::anyhow!("the WAN relay: {e}")))?;
        // The gateways take their ports now.
        drop(held);
        let link = |name: String| -> Result<SocketAddr, Error> {
            relay
                .link(&name)
                .map(wan_relay::Link::addr)
                .ok_or_else(|| Error::Other(anyhow::anyhow!("relay link {name} missing")))
        };

        let ch = crate::client::connect(&url).await?;
        let mut admin = AdminClient::new(ch.clone());
        let (stop_apps, stop_rx) = watch::channel(false);
        let mut gateways = BTreeMap::new();
        let mut failing = BTreeMap::new();
        let mut agents = Vec::new();
        let mut frontends = Vec::new();
        let mut clusters = Vec::new();
        let mut heartbeats = Vec::new();
        let mut interval = Duration::from_secs(3);
        let total = CLUSTERS.len();
        for (i, (name, region, zone)) in CLUSTERS.iter().enumerate() {
            // This cluster's view of the federation: through its link.
            let fed_url = format!("http://{}", link(format!("fed-{name}"))?);
            let gw_cfg = gateway_config(name, gw_ports[name], &fed_url)?;
            let gw = gateway::app::build(&gw_cfg, &tokio::runtime::Handle::current()).await?;
            let mut reg = RegistrationClient::new(crate::client::connect(&fed_url).await?);
            let resp = reg
                .register_cluster(api::RegisterClusterRequest {
                    cluster: Some(api::ClusterInfo {
                        name: (*name).into(),
                        locality: Some(api::Locality {
                            region: (*region).into(),
                            zone: (*zone).into(),
                        }),
                        network: format!("net-{name}"),
                        gateway_addresses: vec![link(format!("gw-{name}"))?.to_string()],
                        trust_domain: "cluster.local".into(),
                    }),
                })
                .await?
                .into_inner();
            interval = Duration::from_secs(u64::from(resp.heartbeat_interval_seconds.max(1)));
            gateways.insert((*name).to_string(), (gw_cfg, Some(gw)));
            let mut frontend = None;
            for (service, port) in SERVICES {
                let fail = Arc::new(AtomicBool::new(false));
                failing.insert(((*name).to_string(), (*service).to_string()), fail.clone());
                let app = sample_app(name, service, fail, stop_rx.clone())
                    .await
                    .map_err(|e| Error::Other(anyhow::anyhow!("a sample application: {e}")))?;
                let token = admin
                    .create_join_token(api::CreateJoinTokenRequest {
                        cluster: (*name).into(),
                        namespace: "default".into(),
                        service_account: (*service).into(),
                        ttl_seconds: 600,
                        single_use: true,
                    })
                    .await?
                    .into_inner()
                    .token;
                let a = mesh_agent::config::Config::from_args(
                    &mesh_agent::config::Args::try_parse_from(agent_args(
                        &fed_url, name, region, zone, service, app, *port, &token,
                    ))
                    .map_err(|e| Error::Usage(e.to_string()))?,
                )
                .map_err(|errs| Error::Usage(errs.join("; ")))?;
                let bound = mesh_agent::app::build(&a).await?;
                if *service == "frontend" {
                    frontends.push((*name, bound.outbound));
                    frontend = Some(bound.outbound);
                } else {
                    reg.set_export(api::SetExportRequest {
                        service: Some(api::ServiceKey {
                            namespace: "default".into(),
                            name: (*service).into(),
                        }),
                        cluster: (*name).into(),
                        exported: true,
                    })
                    .await?;
                }
                agents.push(bound);
            }
            clusters.push(Cluster {
                name: (*name).into(),
                region: (*region).into(),
                zone: (*zone).into(),
                frontend: frontend.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
                gateway_link: format!("gw-{name}"),
                federation_link: format!("fed-{name}"),
            });
            heartbeats.push((*name, reg));
            progress(format!(
                "[{}/{total}] cluster {name} ({region}/{zone}): gateway {} (relayed at {}), reviews, ratings and frontend with their agents",
                i + 1,
                gw_ports[name],
                link(format!("gw-{name}"))?,
            ));
        }
        let state = Arc::new(State {
            gateways: Mutex::new(gateways),
            failing,
        });
        let control_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Other(e.into()))?;
        let control = control_listener
            .local_addr()
            .map_err(|e| Error::Other(e.into()))?;
        let relay_control = relay
            .control_addr()
            .ok_or_else(|| Error::Other(anyhow::anyhow!("the relay has no control API")))?;
        let tasks = vec![
            tokio::spawn(serve_control(control_listener, state.clone())),
            tokio::spawn(heartbeat_loop(heartbeats, interval)),
        ];
        Ok(Self {
            topology: Topology {
                federation: url.clone(),
                relay: relay_control,
                control,
                clusters,
            },
            federation: fed,
            url,
            relay,
            frontends,
            state,
            agents,
            stop_apps,
            tasks,
        })
    }

    /// What `meshctl drill run` needs to act on it.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Stops everything it started: agents drain, then the applications,
    /// gateways and the relay stop, then the federation.
    pub async fn stop(self) -> Result<(), Error> {
        for t in &self.tasks {
            t.abort();
        }
        for a in self.agents {
            a.drain().await;
        }
        self.stop_apps.send_replace(true);
        let gateways = std::mem::take(&mut *self.state.gateways.lock().await);
        for (_, (_, g)) in gateways {
            if let Some(g) = g {
                g.drain().await;
            }
        }
        self.relay.shutdown().await;
        self.federation.shutdown(Duration::from_secs(2)).await?;
        Ok(())
    }
}

/// Heartbeats of every cluster, each through its own link to the
/// federation (a partitioned cluster's heartbeats stop, as they would).
async fn heartbeat_loop(
    mut clusters: Vec<(&'static str, RegistrationClient<tonic::transport::Channel>)>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for (name, reg) in &mut clusters {
            let beat = reg.heartbeat(api::HeartbeatRequest {
                cluster: (*name).into(),
            });
            if let Ok(Err(e)) = tokio::time::timeout(every, beat).await {
                tracing::debug!(cluster = %name, "heartbeat failed: {}", e.message());
            }
        }
    }
}

/// The control API: `POST /gateways/CLUSTER/kill|start`,
/// `POST /services/CLUSTER/SERVICE/fail|heal`.
async fn serve_control(l: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let (status, body) = if req.method() == http::Method::POST {
                            control(&state, req.uri().path()).await
                        } else {
                            (405, "only POST\n".to_string())
                        };
                        http::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn control(state: &State, path: &str) -> (u16, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["gateways", cluster, verb] => {
            let mut gws = state.gateways.lock().await;
            let Some((cfg, running)) = gws.get_mut(*cluster) else {
                return (404, format!("no cluster {cluster}\n"));
            };
            match *verb {
                "kill" => match running.take() {
                    Some(g) => {
                        g.kill().await;
                        (200, format!("gateway of {cluster} killed\n"))
                    }
                    None => (409, format!("the gateway of {cluster} is not running\n")),
                },
                "start" => {
                    if running.is_some() {
                        return (409, format!("the gateway of {cluster} is running\n"));
                    }
                    match gateway::app::build(cfg, &tokio::runtime::Handle::current()).await {
                        Ok(g) => {
                            *running = Some(g);
                            (200, format!("gateway of {cluster} started\n"))
                        }
                        Err(e) => (
                            500,
                            format!("the gateway of {cluster} did not start: {e:#}\n"),
                        ),
                    }
                }
                other => (404, format!("unknown action {other:?} (kill or start)\n")),
            }
        }
        ["services", cluster, service, verb] => {
            let Some(flag) = state
                .failing
                .get(&((*cluster).to_string(), (*service).to_string()))
            else {
                return (404, format!("no service {service} in {cluster}\n"));
            };
            match *verb {
                "fail" => {
                    flag.store(true, Ordering::Relaxed);
                    (200, format!("{service} in {cluster} fails\n"))
                }
                "heal" => {
                    flag.store(false, Ordering::Relaxed);
                    (200, format!("{service} in {cluster} answers\n"))
                }
                other => (404, format!("unknown action {other:?} (fail or heal)\n")),
            }
        }
        _ => (404, format!("no such control: {path}\n")),
    }
}
