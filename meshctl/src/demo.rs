//! The demo mesh, in this process: the federation (embedded registry, or
//! etcd), and for each of four clusters in three regions an east-west
//! gateway and three applications (`frontend`, `reviews`, `ratings`), each
//! with its agent and a certificate from the federation's CA through a join
//! token. Every cluster is its own network: calls between clusters go
//! through the gateways with end-to-end mTLS.
//!
//! A WAN relay ([`wan_relay`]) stands on the paths a drill breaks: in front
//! of every gateway (what other clusters dial) and between each cluster's
//! proxies and the federation. A small control API stops, starts and
//! black-holes gateways and makes applications fail. [`Demo::topology`]
//! describes it all for `meshctl drill run`.
//!
//! On loopback (the default) every cluster shares this process's network.
//! With [`Options::netns`] each cluster has a network namespace of its own
//! and the relay joins the regions with real delay ([`crate::netns`]).

use crate::drill::topology::{Cluster, Topology};
use crate::Error;
use bytes::Bytes;
use federation::config::{Args as FedArgs, Config};
use http_body_util::Full;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::registration_client::RegistrationClient;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
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
    /// The federation's API address (with `netns`, its port is taken on
    /// the WAN namespace's address).
    pub listen: String,
    /// `embedded` (on disk, in a directory removed when the demo ends),
    /// `memory`, or an etcd URL.
    pub registry: String,
    /// Every cluster in a network namespace of its own, regions joined by
    /// the WAN relay (root only; see [`crate::netns`]).
    pub netns: bool,
}

/// A running demo mesh.
pub struct Demo {
    /// The federation.
    pub federation: federation::app::Bound,
    /// Its URL (`https://`).
    pub url: String,
    /// The demo's admin: an operator certificate the demo's federation
    /// signed, with the CA bundle (`meshctl demo` saves it as the context
    /// `demo`).
    pub admin: mesh_core::client_config::Context,
    /// The same, ready to call with.
    pub fed: crate::client::Fed,
    /// The WAN relay.
    pub relay: wan_relay::Relay,
    /// Each cluster's frontend agent's outbound listener.
    pub frontends: Vec<(&'static str, SocketAddr)>,
    /// Each cluster's gateway's admin listener (`/metrics`), where it has
    /// one (with `netns`).
    pub gateway_admins: Vec<(&'static str, SocketAddr)>,
    /// Each sample application's own address, by cluster and service (with
    /// `netns`, behind inbound capture: a call to it reaches its agent).
    pub apps: Vec<(&'static str, &'static str, SocketAddr)>,
    topology: Topology,
    state: Arc<State>,
    agents: Vec<mesh_agent::app::Bound>,
    stop_apps: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The namespaces, deleted last.
    network: Option<crate::netns::Network>,
    /// The embedded registry's data directory, removed with the demo.
    _data: Option<tempfile::TempDir>,
}

/// Where a cluster's (or the WAN's) parts run: a runtime whose sockets are
/// in that network, and the address its listeners bind there.
#[derive(Clone)]
struct Place {
    handle: Handle,
    ip: IpAddr,
}

impl Place {
    /// Runs `f` there and waits for its outcome.
    async fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, Error> {
        self.handle
            .spawn(f)
            .await
            .map_err(|e| Error::Other(anyhow::anyhow!("a task of the demo ended badly: {e}")))
    }
}

/// How a cluster's gateway is black-holed.
enum Hole {
    /// Its relay link drops everything (loopback: every caller comes
    /// through it).
    Relay { control: SocketAddr, link: String },
    /// An iptables DROP on its port in its namespace.
    Netns(String),
}

/// A cluster as the control API sees it.
struct ClusterState {
    place: Place,
    gateway_config: gateway::config::Config,
    gateway: Option<gateway::app::Bound>,
    hole: Hole,
}

/// What the control API changes.
struct State {
    clusters: Mutex<BTreeMap<String, ClusterState>>,
    /// Per (cluster, service): the application answers 503 while set.
    failing: BTreeMap<(String, String), Arc<AtomicBool>>,
}

/// A tiny HTTP application on `ip`: answers every request with its name
/// and cluster (header `x-cluster`), or 503 while `failing`, until `stop`.
async fn sample_app(
    ip: IpAddr,
    cluster: &'static str,
    service: &'static str,
    failing: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind((ip, 0)).await?;
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
    ip: IpAddr,
) -> Vec<String> {
    let any = SocketAddr::from((ip, 0)).to_string();
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
        &any,
        "--inbound",
        &any,
        "--admin",
        &any,
        "--join-token",
        token,
        "--id",
        &format!("{service}-{cluster}"),
        "--probe-interval",
        "1s",
        // Each agent's measured capacity, for the guardrails: what the
        // demo's own load at --rate 100 and a drill's together stay under.
        "--capacity",
        "1000",
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

fn gateway_config(
    name: &str,
    listen: SocketAddr,
    url: &str,
    extra: &[String],
) -> Result<gateway::config::Config, Error> {
    use clap::Parser;
    let mut args: Vec<String> = [
        "fedmesh-gateway",
        "--cluster",
        name,
        "--listen",
        &listen.to_string(),
        "--federation",
        url,
        "--access-log",
        "off",
        "--probe-interval",
        "1s",
        "--drain-deadline",
        "2s",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    args.extend_from_slice(extra);
    gateway::config::Config::from_args(
        &gateway::config::Args::try_parse_from(args).map_err(|e| Error::Usage(e.to_string()))?,
    )
    .map_err(|errs| Error::Usage(errs.join("; ")))
}

fn relay_error(e: impl std::fmt::Display) -> Error {
    Error::Other(anyhow::anyhow!("the WAN relay: {e}"))
}

/// Where each cluster's gateway listens and is listed, and how the relay
/// stands in front of it: the part of the mesh that differs between
/// loopback and namespaces.
struct Layout {
    /// The federation's and the relay's place.
    wan: Place,
    /// Per cluster (in [`CLUSTERS`] order).
    places: Vec<Place>,
    /// The relay's control API address.
    relay_control: SocketAddr,
    /// Per cluster: the gateway's listen address.
    gateway_listen: Vec<SocketAddr>,
    /// Per cluster: extra gateway flags.
    gateway_extra: Vec<Vec<String>>,
    /// Per cluster: where a cluster's link to the federation listens.
    federation_link_listen: Vec<SocketAddr>,
    /// Per cluster, its gateway's loopback port, held (loopback only) until
    /// that gateway binds it.
    held: Vec<Option<std::net::TcpListener>>,
}

impl Layout {
    fn loopback() -> Result<Self, Error> {
        let here = Place {
            handle: Handle::current(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let mut held = Vec::new();
        let mut gateway_listen = Vec::new();
        for _ in CLUSTERS {
            let (port, l) = reserve_port()?;
            held.push(Some(l));
            gateway_listen.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        Ok(Self {
            wan: here.clone(),
            places: vec![here; CLUSTERS.len()],
            relay_control: ([127, 0, 0, 1], 0).into(),
            gateway_listen,
            gateway_extra: vec![Vec::new(); CLUSTERS.len()],
            federation_link_listen: vec![([127, 0, 0, 1], 0).into(); CLUSTERS.len()],
            held,
        })
    }

    fn netns(net: &crate::netns::Network) -> Result<Self, Error> {
        use crate::netns::{bridge_ip, relay_source_ip, GATEWAY_ADMIN_PORT, WAN_IP};
        let wan = net
            .wan
            .as_ref()
            .ok_or_else(|| Error::Other(anyhow::anyhow!("no WAN namespace runtime")))?;
        Ok(Self {
            wan: Place {
                handle: wan.handle().clone(),
                ip: IpAddr::V4(WAN_IP),
            },
            places: net
                .clusters
                .iter()
                .zip(&net.runtimes)
                .map(|(c, rt)| Place {
                    handle: rt.handle().clone(),
                    ip: IpAddr::V4(c.ip),
                })
                .collect(),
            relay_control: (WAN_IP, 0).into(),
            gateway_listen: net
                .clusters
                .iter()
                .map(crate::netns::ClusterNet::gateway)
                .collect(),
            gateway_extra: net
                .clusters
                .iter()
                .map(|c| {
                    vec![
                        "--admin".into(),
                        SocketAddr::from((c.ip, GATEWAY_ADMIN_PORT)).to_string(),
                        "--proxy-protocol-from".into(),
                        format!("{}/32", relay_source_ip(c.region_index)),
                    ]
                })
                .collect(),
            federation_link_listen: net
                .clusters
                .iter()
                .map(|c| SocketAddr::from((bridge_ip(c.region_index), 0)))
                .collect(),
            held: Vec::new(),
        })
    }
}

impl Demo {
    /// Starts the whole mesh; `progress` gets a line per step.
    #[allow(clippy::too_many_lines)]
    pub async fn start(opts: &Options, progress: impl Fn(String)) -> Result<Self, Error> {
        use clap::Parser;
        // Every input is checked before anything is made.
        let fed_listen = if opts.netns {
            let port = opts
                .listen
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "invalid --listen {:?}: expected IP:PORT",
                        opts.listen
                    ))
                })?;
            format!("{}:{port}", crate::netns::WAN_IP)
        } else {
            opts.listen.clone()
        };
        let network = if opts.netns {
            let pairs: Vec<(&str, &str)> = CLUSTERS.iter().map(|(n, r, _)| (*n, *r)).collect();
            let plan = crate::netns::plan(&pairs);
            Some(tokio::task::block_in_place(|| {
                crate::netns::Network::create(plan, &progress)
            })?)
        } else {
            None
        };
        let mut layout = match &network {
            Some(net) => Layout::netns(net)?,
            None => Layout::loopback()?,
        };
        // The federation is reached at its own address and through each
        // cluster's relay link: its certificate names them all.
        let mut sans: Vec<String> = layout
            .federation_link_listen
            .iter()
            .map(|a| a.ip().to_string())
            .collect();
        if let Some((host, _)) = fed_listen.rsplit_once(':') {
            sans.push(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            );
        }
        sans.sort();
        sans.dedup();
        let data = match opts.registry.as_str() {
            "embedded" => Some(
                tempfile::Builder::new()
                    .prefix("fedmesh-demo-")
                    .tempdir()
                    .map_err(|e| Error::Other(anyhow::anyhow!("the demo's data directory: {e}")))?,
            ),
            _ => None,
        };
        let sans = sans.join(",");
        let mut fed_args = vec![
            "meshctl-demo",
            "--tls-san",
            &sans,
            "--listen",
            &fed_listen,
            "--registry",
            &opts.registry,
            "--leader-ttl",
            "3s",
            "--weights-interval",
            "500ms",
            "--log-format",
            "text",
        ];
        let data_dir = data
            .as_ref()
            .map(|d| d.path().to_string_lossy().into_owned());
        if let Some(d) = &data_dir {
            fed_args.extend(["--data-dir", d]);
        }
        let fed_args =
            FedArgs::try_parse_from(fed_args).map_err(|e| Error::Usage(e.to_string()))?;
        let cfg = Config::from_args(&fed_args).map_err(|errs| Error::Usage(errs.join("; ")))?;
        let fed = layout
            .wan
            .run(async move { federation::app::build(&cfg).await })
            .await??;
        let url = fed.url();
        fed.shared.wait_synced().await;
        let mut admin = fed
            .operator_context("demo-admin", &[federation::auth::Role::Admin])
            .await?;
        admin.name = "demo".into();
        let creds = crate::client::Fed::from_context(&admin, None);
        progress(match &data_dir {
            Some(d) => format!("federation listening on {url} (registry: embedded, in {d})"),
            None => format!(
                "federation listening on {url} (registry: {})",
                opts.registry
            ),
        });

        // The relay: each cluster's link to the federation, and the links
        // callers reach gateways through (loopback: one in front of each
        // gateway; namespaces: one per calling region and gateway, with
        // that pair's WAN delay).
        let mut specs = Vec::new();
        let mut baseline = BTreeMap::new();
        let mut gateway_links: Vec<Vec<String>> = vec![Vec::new(); CLUSTERS.len()];
        for (i, (name, region, _)) in CLUSTERS.iter().enumerate() {
            specs.push(
                wan_relay::LinkSpec::new(
                    &format!("fed-{name}"),
                    layout.federation_link_listen[i],
                    fed.addr,
                )
                .map_err(relay_error)?,
            );
            match &network {
                None => {
                    let link = format!("gw-{name}");
                    specs.push(
                        wan_relay::LinkSpec::new(
                            &link,
                            ([127, 0, 0, 1], 0).into(),
                            layout.gateway_listen[i],
                        )
                        .map_err(relay_error)?,
                    );
                    gateway_links[i].push(link);
                }
                Some(net) => {
                    let to = &net.clusters[i];
                    let mut from_regions: Vec<&crate::netns::ClusterNet> = Vec::new();
                    for c in &net.clusters {
                        if c.region != *region && !from_regions.iter().any(|f| f.region == c.region)
                        {
                            from_regions.push(c);
                        }
                    }
                    for from in from_regions {
                        let link = format!("gw-{name}.from-{}", from.region);
                        specs.push(
                            wan_relay::LinkSpec::new(
                                &link,
                                (crate::netns::bridge_ip(from.region_index), 0).into(),
                                to.gateway(),
                            )
                            .map_err(relay_error)?
                            .with_source(IpAddr::V4(crate::netns::relay_source_ip(to.region_index)))
                            .with_proxy_protocol(true),
                        );
                        baseline.insert(
                            link.clone(),
                            crate::netns::wan_between(&from.region, region),
                        );
                        gateway_links[i].push(link);
                    }
                }
            }
        }
        let relay_control = layout.relay_control;
        let relay = layout
            .wan
            .run(async move { wan_relay::Relay::start(specs, Some(relay_control)).await })
            .await?
            .map_err(relay_error)?;
        let mut impaired = BTreeMap::new();
        for (link, change) in &baseline {
            let l = relay
                .link(link)
                .ok_or_else(|| relay_error(format!("link {link} missing")))?;
            let now = l.set(change).map_err(relay_error)?;
            impaired.insert(link.clone(), now);
        }
        let link = |name: String| -> Result<SocketAddr, Error> {
            relay
                .link(&name)
                .map(wan_relay::Link::addr)
                .ok_or_else(|| relay_error(format!("link {name} missing")))
        };
        if let Some(net) = &network {
            // Callers in other regions reach a gateway through their
            // region's link to it.
            for (i, to) in net.clusters.iter().enumerate() {
                for from in &net.clusters {
                    if from.region == to.region {
                        continue;
                    }
                    let via = link(format!("gw-{}.from-{}", CLUSTERS[i].0, from.region))?;
                    tokio::task::block_in_place(|| net.divert(from, to, via))?;
                }
            }
        }
        let relay_control = relay
            .control_addr()
            .ok_or_else(|| Error::Other(anyhow::anyhow!("the relay has no control API")))?;

        let ch = crate::client::connect(&creds).await?;
        let mut admin_api = AdminClient::new(ch.clone());
        let (stop_apps, stop_rx) = watch::channel(false);
        let mut states = BTreeMap::new();
        let mut failing = BTreeMap::new();
        let mut agents = Vec::new();
        let mut frontends = Vec::new();
        let mut gateway_admins = Vec::new();
        let mut apps = Vec::new();
        let mut clusters = Vec::new();
        let mut tasks = Vec::new();
        let total = CLUSTERS.len();
        for (i, (name, region, zone)) in CLUSTERS.iter().enumerate() {
            let place = layout.places[i].clone();
            // This cluster's view of the federation: through its link.
            let fed_url = format!("https://{}", link(format!("fed-{name}"))?);
            // The gateway restarts with the same token (the control API's
            // kill and start): a reusable one, for the demo's day.
            let gateway_token = admin_api
                .create_join_token(api::CreateJoinTokenRequest {
                    cluster: (*name).into(),
                    namespace: "fedmesh-system".into(),
                    service_account: "fedmesh-gateway".into(),
                    ttl_seconds: 24 * 3600,
                    reusable: true,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .token;
            let mut extra = layout.gateway_extra[i].clone();
            extra.extend(["--join-token".to_string(), gateway_token]);
            let gw_cfg = gateway_config(name, layout.gateway_listen[i], &fed_url, &extra)?;
            // Its gateway takes its port now, not before: an agent of an
            // earlier cluster binding port 0 could be given it meanwhile.
            if let Some(h) = layout.held.get_mut(i) {
                drop(h.take());
            }
            let gw = {
                let cfg = gw_cfg.clone();
                place
                    .run(async move { gateway::app::build(&cfg, &Handle::current()).await })
                    .await??
            };
            if let Some(a) = gw.admin {
                gateway_admins.push((*name, a));
            }
            let listed = match &network {
                None => link(format!("gw-{name}"))?,
                Some(net) => net.clusters[i].gateway(),
            };
            let mut reg = {
                let link = creds.with_url(&fed_url);
                place
                    .run(async move {
                        crate::client::connect(&link)
                            .await
                            .map(RegistrationClient::new)
                    })
                    .await??
            };
            let resp = reg
                .register_cluster(api::RegisterClusterRequest {
                    cluster: Some(api::ClusterInfo {
                        name: (*name).into(),
                        locality: Some(api::Locality {
                            region: (*region).into(),
                            zone: (*zone).into(),
                        }),
                        network: format!("net-{name}"),
                        gateway_addresses: vec![listed.to_string()],
                        trust_domain: "cluster.local".into(),
                        // Every application of the loopback demo is on 127.0.0.1.
                        allow_local_endpoints: network.is_none(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            let every = Duration::from_secs(u64::from(resp.heartbeat_interval_seconds.max(1)));
            let hole = match &network {
                None => Hole::Relay {
                    control: relay_control,
                    link: format!("gw-{name}"),
                },
                Some(net) => Hole::Netns(net.clusters[i].namespace.clone()),
            };
            let mut frontend = None;
            for (service, port) in SERVICES {
                let fail = Arc::new(AtomicBool::new(false));
                failing.insert(((*name).to_string(), (*service).to_string()), fail.clone());
                let app = {
                    let stop = stop_rx.clone();
                    place
                        .run(sample_app(
                            // In its namespace, as in a Pod: on the Pod's
                            // address, behind inbound capture (below).
                            if network.is_some() {
                                place.ip
                            } else {
                                IpAddr::V4(Ipv4Addr::LOCALHOST)
                            },
                            name,
                            service,
                            fail,
                            stop,
                        ))
                        .await?
                        .map_err(|e| Error::Other(anyhow::anyhow!("a sample application: {e}")))?
                };
                let token = admin_api
                    .create_join_token(api::CreateJoinTokenRequest {
                        cluster: (*name).into(),
                        namespace: "default".into(),
                        service_account: (*service).into(),
                        ttl_seconds: 600,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .token;
                let a = mesh_agent::config::Config::from_args(
                    &mesh_agent::config::Args::try_parse_from(agent_args(
                        &fed_url, name, region, zone, service, app, *port, &token, place.ip,
                    ))
                    .map_err(|e| Error::Usage(e.to_string()))?,
                )
                .map_err(|errs| Error::Usage(errs.join("; ")))?;
                let bound = place
                    .run(async move { mesh_agent::app::build(&a).await })
                    .await??;
                if let Some(net) = &network {
                    crate::netns::capture_inbound(
                        &net.clusters[i].namespace,
                        app,
                        bound.inbound.port(),
                    )
                    .map_err(|e| Error::Other(anyhow::anyhow!("inbound capture: {e}")))?;
                }
                apps.push((*name, *service, app));
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
                gateway_links: gateway_links[i].clone(),
                federation_link: format!("fed-{name}"),
            });
            // Heartbeats from the cluster's own network, through its link
            // (a partitioned cluster's stop, as they would).
            tasks.push(place.handle.spawn(heartbeat_loop(name, reg, every)));
            states.insert(
                (*name).to_string(),
                ClusterState {
                    place,
                    gateway_config: gw_cfg,
                    gateway: Some(gw),
                    hole,
                },
            );
            progress(format!(
                "[{}/{total}] cluster {name} ({region}/{zone}): gateway {} (listed as {listed}), reviews, ratings and frontend with their agents",
                i + 1,
                layout.gateway_listen[i],
            ));
        }
        let state = Arc::new(State {
            clusters: Mutex::new(states),
            failing,
        });
        let control_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Other(e.into()))?;
        let control = control_listener
            .local_addr()
            .map_err(|e| Error::Other(e.into()))?;
        tasks.push(tokio::spawn(serve_control(control_listener, state.clone())));
        Ok(Self {
            topology: Topology {
                federation: url.clone(),
                relay: relay_control,
                control,
                clusters,
                baseline: impaired,
                netns: network.as_ref().map(|n| {
                    n.clusters
                        .iter()
                        .map(|c| (c.name.clone(), c.namespace.clone()))
                        .collect()
                }),
            },
            federation: fed,
            url,
            admin,
            fed: creds,
            relay,
            frontends,
            gateway_admins,
            apps,
            state,
            agents,
            stop_apps,
            tasks,
            network,
            _data: data,
        })
    }

    /// What `meshctl drill run` needs to act on it.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Stops everything it started: agents drain, then the applications,
    /// gateways and the relay stop, then the federation; last, the
    /// namespaces (with everything in them) are deleted.
    pub async fn stop(mut self) -> Result<(), Error> {
        for t in &self.tasks {
            t.abort();
        }
        for a in self.agents {
            a.drain().await;
        }
        self.stop_apps.send_replace(true);
        let clusters = std::mem::take(&mut *self.state.clusters.lock().await);
        for (_, c) in clusters {
            if let Some(g) = c.gateway {
                g.drain().await;
            }
        }
        self.relay.shutdown().await;
        let outcome = self.federation.shutdown(Duration::from_secs(2)).await;
        if let Some(net) = self.network.take() {
            tokio::task::block_in_place(|| drop(net));
        }
        outcome?;
        Ok(())
    }
}

/// A cluster's heartbeats, through its own link to the federation.
async fn heartbeat_loop(
    name: &'static str,
    mut reg: RegistrationClient<tonic::transport::Channel>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let beat = reg.heartbeat(api::HeartbeatRequest {
            cluster: name.into(),
        });
        if let Ok(Err(e)) = tokio::time::timeout(every, beat).await {
            tracing::debug!(cluster = %name, "heartbeat failed: {}", e.message());
        }
    }
}

/// The control API: `POST /gateways/CLUSTER/kill|start|blackhole|restore`,
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

/// Black-holes (or restores) a cluster's gateway.
async fn hole(h: &Hole, on: bool) -> Result<(), String> {
    match h {
        Hole::Relay { control, link } => {
            let mode = if on {
                wan_relay::Mode::Blackhole
            } else {
                wan_relay::Mode::Pass
            };
            wan_relay::control::Client::new(*control)
                .set(link, &wan_relay::Change::new().mode(mode))
                .await
                .map(|_| ())
                .map_err(|e| format!("the WAN relay: {e}"))
        }
        Hole::Netns(ns) => {
            let ns = ns.clone();
            tokio::task::spawn_blocking(move || crate::netns::blackhole(&ns, on))
                .await
                .map_err(|e| e.to_string())?
        }
    }
}

async fn control(state: &State, path: &str) -> (u16, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["gateways", cluster, verb] => {
            let mut clusters = state.clusters.lock().await;
            let Some(c) = clusters.get_mut(*cluster) else {
                return (404, format!("no cluster {cluster}\n"));
            };
            match *verb {
                "kill" => match c.gateway.take() {
                    Some(g) => {
                        g.kill().await;
                        (200, format!("gateway of {cluster} killed\n"))
                    }
                    None => (409, format!("the gateway of {cluster} is not running\n")),
                },
                "start" => {
                    if c.gateway.is_some() {
                        return (409, format!("the gateway of {cluster} is running\n"));
                    }
                    let cfg = c.gateway_config.clone();
                    let built = c
                        .place
                        .run(async move { gateway::app::build(&cfg, &Handle::current()).await })
                        .await;
                    match built {
                        Ok(Ok(g)) => {
                            c.gateway = Some(g);
                            (200, format!("gateway of {cluster} started\n"))
                        }
                        Ok(Err(e)) => (
                            500,
                            format!("the gateway of {cluster} did not start: {e:#}\n"),
                        ),
                        Err(e) => (
                            500,
                            format!("the gateway of {cluster} did not start: {e}\n"),
                        ),
                    }
                }
                "blackhole" | "restore" => match hole(&c.hole, *verb == "blackhole").await {
                    Ok(()) if *verb == "blackhole" => {
                        (200, format!("gateway of {cluster} black-holed\n"))
                    }
                    Ok(()) => (200, format!("gateway of {cluster} reachable\n")),
                    Err(e) => (500, format!("{verb} {cluster}: {e}\n")),
                },
                other => (
                    404,
                    format!("unknown action {other:?} (kill, start, blackhole or restore)\n"),
                ),
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
