//! Global traffic benchmark (issue 6): the weight engine's full recompute,
//! the propagation of a weight change to subscribed agents, and the
//! federation's memory with many services and subscribers, each beside a
//! baseline measured in the same run.
//!
//! `cargo bench -p fedmesh-benches --bench traffic`
//! Knobs: FEDMESH_BENCH_SERVICES (10000) and FEDMESH_BENCH_CLUSTERS (20) for
//! the recompute and the memory; FEDMESH_BENCH_ROUNDS (30 recomputes);
//! FEDMESH_BENCH_AGENTS (1000 subscribers); FEDMESH_BENCH_CHANNELS (20
//! HTTP/2 connections they share); FEDMESH_BENCH_CHANGES (5 weight changes,
//! each followed by a baseline change); FEDMESH_BENCH_SYNC_SECS (300: how
//! long the memory figure's subscribers may take to sync, in all; the
//! figure is reported for those that did). `tests/smoke.rs` runs it small.
//!
//! 1. **Recompute**: a federation `State` built in-process (a memory store
//!    written through `Registry`, then `State::reload` of a full read) with
//!    the services spread over 4 regions of clusters, each in a varied subset
//!    of 3 to all clusters with 1-4 endpoints per cluster, some unhealthy,
//!    some with operator weights (by cluster or by region), some with load
//!    reports and rebalancing, some with a failover order, one cluster
//!    drained, a few probe failures. `weights::inputs_from` makes the
//!    engine's inputs; `engine::compute` runs on them repeatedly with the
//!    leader's carried memory, the clock advanced by one rebalancing interval
//!    each time so that rebalancing moves. Baselines in the same rounds:
//!    `inputs_from` itself (what the leader does before each recompute) and
//!    a deep clone of the inputs.
//! 2. **Propagation**: an in-process federation (memory registry, weights
//!    interval 100 ms), 20 clusters, a service with endpoints in five, and
//!    raw Discovery subscribers (kind AGENT, spread over the clusters, each
//!    on its own stream, sharing a few HTTP/2 connections) that ACK every
//!    complete snapshot and every delta. A `Traffic/SetWeights` call is timed
//!    per agent to the delta carrying the new weights in the agent's row
//!    (the leader's recompute included), and to the federation having
//!    recorded the agent's ACK of that version (`Admin/GetStatus`, polled).
//!    Baseline, interleaved: registering one more endpoint of the service (a
//!    change the leader recomputes for but that changes no weight), timed the
//!    same way to the delta carrying that endpoint.
//! 3. **Memory**: the `fedmesh-federation` binary as a child process (built
//!    by the bench with cargo if needed), its VmRSS idle, after registering
//!    the clusters and 2 endpoints for each service over the Registration
//!    API, and with the subscribers connected and synced; and a
//!    `fedmesh-agent` binary's (plain text, in one of the clusters) with the
//!    mesh empty (its baseline) and with every service in its table (its
//!    "config applied" log line counts them).

// A benchmark: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::engine::{self, Inputs, Memory, Rebalance};
use federation::registry::Registry;
use federation::state::State;
use federation::store::memory::MemoryStore;
use federation::store::Store;
use federation::traffic::{Drain, LoadReport, TrafficOverride, WeightsBy};
use futures::StreamExt;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::discovery_client::DiscoveryClient;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_api::v1::traffic_client::TrafficClient;
use mesh_core::cluster::ClusterInfo;
use mesh_core::convert::FromApi;
use mesh_core::endpoint::Endpoint;
use mesh_core::name::{ClusterName, Region};
use mesh_core::service::ServiceKey;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::hint::black_box;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// What to run.
pub(crate) struct Opts {
    /// Services and clusters of the recompute and of the memory figure.
    pub(crate) services: usize,
    pub(crate) clusters: usize,
    /// Measured recomputes (each beside its two baselines).
    pub(crate) rounds: usize,
    /// Subscribed agents (propagation and memory).
    pub(crate) agents: usize,
    /// HTTP/2 connections the agents share.
    pub(crate) channels: usize,
    /// Weight changes measured (each followed by a baseline change).
    pub(crate) changes: usize,
    /// How long the memory figure's subscribers may take to sync, in all.
    pub(crate) sync_patience: Duration,
}

/// Median, p99 and max of a set of durations, in ms.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Dist {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Dist {
    fn of(v: &[Duration]) -> Self {
        let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            if ms.is_empty() {
                return f64::NAN;
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let i = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
            ms[i]
        };
        Self {
            n: ms.len(),
            p50: rank(0.5),
            p99: rank(0.99),
            max: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Resident memory of the federation process, MB.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Mem {
    pub(crate) idle: f64,
    pub(crate) services: f64,
    pub(crate) subscribers: f64,
    /// Peak resident memory over the run (VmHWM).
    pub(crate) peak: f64,
    /// A `fedmesh-agent` subscribed to it: with the mesh empty, with every
    /// service in its table (and its peak then), and how many that was.
    pub(crate) agent_empty: f64,
    pub(crate) agent_mesh: f64,
    pub(crate) agent_peak: f64,
    pub(crate) agent_services: usize,
}

/// The figures, and the printed table.
#[allow(dead_code)] // the bench prints `text`; tests/smoke.rs reads the figures
pub(crate) struct Report {
    pub(crate) recompute: Dist,
    pub(crate) inputs_from: Dist,
    pub(crate) clone: Dist,
    /// Per agent: call to the delta carrying the change, and to its ACK recorded.
    pub(crate) weights_recv: Dist,
    pub(crate) weights_ack: Dist,
    pub(crate) endpoint_recv: Dist,
    pub(crate) endpoint_ack: Dist,
    pub(crate) mem: Mem,
    /// Subscribers of the memory figure that synced in time.
    pub(crate) mem_synced: usize,
    pub(crate) text: String,
}

pub(crate) fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

const REGIONS: [&str; 4] = ["us-east", "us-west", "eu-west", "ap-south"];
const NS: &str = "bench";

fn cluster_name(i: usize) -> String {
    format!("c{i:02}")
}

/// Region of cluster `i` of `n`: 4 regions of consecutive clusters.
fn region_of(i: usize, n: usize) -> &'static str {
    REGIONS[(i * REGIONS.len() / n.max(1)).min(REGIONS.len() - 1)]
}

fn api_cluster(i: usize, n: usize) -> api::ClusterInfo {
    let region = region_of(i, n);
    api::ClusterInfo {
        name: cluster_name(i),
        locality: Some(api::Locality {
            region: region.into(),
            zone: format!("{region}-{}", i % 3 + 1),
        }),
        network: "n1".into(),
        gateway_addresses: vec![],
        trust_domain: "cluster.local".into(),
        ..Default::default()
    }
}

fn svc_key(name: &str) -> api::ServiceKey {
    api::ServiceKey {
        namespace: NS.into(),
        name: name.into(),
    }
}

fn api_endpoint(
    service: &str,
    cluster: usize,
    clusters: usize,
    id: &str,
    ip: u32,
    healthy: bool,
) -> api::Endpoint {
    let region = region_of(cluster, clusters);
    let [_, b, c, d] = ip.to_be_bytes();
    api::Endpoint {
        id: id.into(),
        service: Some(svc_key(service)),
        cluster: cluster_name(cluster),
        address: format!("10.{b}.{c}.{}", d.max(1)),
        ports: vec![api::Port {
            name: "http".into(),
            number: 8080,
            protocol: "http".into(),
            ..Default::default()
        }],
        labels: [("app".to_string(), service.to_string())].into(),
        locality: Some(api::Locality {
            region: region.into(),
            zone: format!("{region}-{}", cluster % 3 + 1),
        }),
        health: if healthy {
            api::Health::Healthy
        } else {
            api::Health::Unhealthy
        } as i32,
        identity: format!("spiffe://cluster.local/ns/{NS}/sa/{service}"),
    }
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn now_ms() -> i64 {
    federation::registry::now_unix_ms()
}

// ===================== 1. recompute =====================

/// What the built state holds.
struct Built {
    state: State,
    now_ms: u64,
    endpoints: usize,
    /// Services with rebalancing on (set on the inputs: see `inputs`).
    rebalanced: Vec<ServiceKey>,
    /// Services with a failover order, and the order.
    failover: Vec<(ServiceKey, Vec<Region>)>,
}

/// A federation state of `services` services over `clusters` clusters,
/// written through the registry to a memory store and read back whole, as a
/// replica's sync loop does at start-up.
async fn build_state(services: usize, clusters: usize) -> anyhow::Result<Built> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let reg = Registry::new(store.clone());
    for i in 0..clusters {
        let info = ClusterInfo::from_api(api_cluster(i, clusters), "cluster")?;
        reg.put_cluster(&info).await?;
        reg.start_heartbeat(&info.name, Duration::from_secs(3600), "bench")
            .await?;
    }
    // The last cluster is drained.
    let drained = cluster_name(clusters - 1);
    store
        .put(
            &format!("{}{drained}", federation::traffic::DRAIN_PREFIX),
            serde_json::to_vec(&Drain {
                by: "bench".into(),
                since_unix_ms: now_ms(),
            })?,
            None,
        )
        .await?;
    let now = now_ms();
    let mut ip = 0u32;
    let mut endpoints = Vec::new();
    let mut loads = Vec::new();
    let mut overrides = Vec::new();
    let mut rebalanced = Vec::new();
    let mut failover = Vec::new();
    for s in 0..services {
        let name = format!("svc-{s:05}");
        let key = ServiceKey::from_api(svc_key(&name), "service")?;
        let mut rng = Rng(s as u64 * 7919 + 17);
        let k = 3 + rng.below(clusters.saturating_sub(2)); // 3..=clusters
        let start = rng.below(clusters);
        let members: Vec<usize> = (0..k.min(clusters))
            .map(|j| (start + j) % clusters)
            .collect();
        let with_load = s % 10 == 3;
        for &c in &members {
            let n = 1 + rng.below(4);
            let sick = rng.below(50);
            for e in 0..n {
                ip += 1;
                // 2% of (service, cluster) entirely unhealthy; 10% with one
                // unhealthy endpoint.
                let healthy = !(sick == 0 || (sick < 5 && e == 0));
                let id = format!("{name}-{}-{e}", cluster_name(c));
                let ep = Endpoint::from_api(
                    api_endpoint(&name, c, clusters, &id, ip, healthy),
                    "endpoint",
                )?;
                if with_load {
                    #[allow(clippy::cast_precision_loss)]
                    let qps = 20.0 + (rng.below(80) as f64);
                    loads.push((
                        ep.key(),
                        LoadReport {
                            inbound_qps: qps,
                            capacity_qps: 100.0,
                            outbound: BTreeMap::new(),
                            at_unix_ms: now,
                        },
                    ));
                }
                endpoints.push(ep);
            }
        }
        match s % 20 {
            1 => {
                let w: BTreeMap<String, u32> = members
                    .iter()
                    .take(3)
                    .zip([60, 30, 10])
                    .map(|(c, w)| (cluster_name(*c), w))
                    .collect();
                overrides.push((key.clone(), WeightsBy::Cluster, w));
            }
            2 => {
                let w: BTreeMap<String, u32> = [(REGIONS[0], 70), (REGIONS[2], 30)]
                    .into_iter()
                    .map(|(r, w)| (r.to_string(), w))
                    .collect();
                overrides.push((key.clone(), WeightsBy::Region, w));
            }
            _ => {}
        }
        if with_load {
            rebalanced.push(key.clone());
        }
        if s % 7 == 0 {
            failover.push((
                key,
                vec![Region::new(REGIONS[2])?, Region::new(REGIONS[1])?],
            ));
        }
    }
    let n_endpoints = endpoints.len();
    futures::stream::iter(endpoints.iter().map(|e| reg.put_endpoint(e)))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    futures::stream::iter(loads.iter().map(|(k, l)| reg.put_load(k, l)))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    for (key, by, weights) in overrides {
        let o = TrafficOverride {
            by,
            weights,
            set_by: "bench".into(),
            set_unix_ms: now,
            expires_unix_ms: None,
            forced: false,
        };
        store
            .put(
                &federation::weights::override_key(&key),
                serde_json::to_vec(&o)?,
                None,
            )
            .await?;
    }
    let range = store.range(federation::registry::ROOT).await?;
    let mut state = State::default();
    state.reload(&range);
    Ok(Built {
        state,
        now_ms: u64::try_from(now).unwrap_or(0),
        endpoints: n_endpoints,
        rebalanced,
        failover,
    })
}

/// The engine's inputs from the state, with what the state cannot carry
/// here set directly: rebalancing and failover orders (TrafficWeights
/// documents) and a few probe failures.
fn make_inputs(b: &Built, clusters: usize) -> anyhow::Result<Inputs> {
    let mut inputs = federation::weights::inputs_from(&b.state, b.now_ms);
    for k in &b.rebalanced {
        if let Some(s) = inputs.services.get_mut(k) {
            s.policy.rebalance = Some(Rebalance::default());
        }
    }
    for (k, order) in &b.failover {
        if let Some(s) = inputs.services.get_mut(k) {
            s.policy.failover.clone_from(order);
        }
    }
    let c = |i: usize| ClusterName::new(cluster_name(i % clusters));
    inputs.unreachable.insert((c(0)?, c(3)?, None));
    inputs.unreachable.insert((c(1)?, c(2)?, None));
    inputs.unreachable.insert((
        c(2)?,
        c(1)?,
        Some(ServiceKey::from_api(svc_key("svc-00001"), "service")?),
    ));
    Ok(inputs)
}

struct Recompute {
    compute: Vec<Duration>,
    inputs_from: Vec<Duration>,
    clone: Vec<Duration>,
    services: usize,
    endpoints: usize,
    splits: usize,
    build: Duration,
}

fn recompute(o: &Opts, rt: &tokio::runtime::Runtime) -> anyhow::Result<Recompute> {
    let t = Instant::now();
    let built = rt.block_on(build_state(o.services, o.clusters))?;
    let build = t.elapsed();
    let mut inputs = make_inputs(&built, o.clusters)?;
    eprintln!(
        "recompute: state of {} services, {} endpoints, {} clusters built in {:.1} s",
        inputs.services.len(),
        built.endpoints,
        inputs.clusters.len(),
        build.as_secs_f64()
    );
    anyhow::ensure!(
        inputs.services.len() == o.services,
        "inputs have {} services, expected {}",
        inputs.services.len(),
        o.services
    );
    let mut memory = Memory::default();
    // Warm-up: the first interval fills the memory, as a new leader's does.
    let table = engine::compute(&inputs, &mut memory);
    let splits = table.splits();
    drop(table);
    let (mut compute, mut from, mut clone) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=o.rounds {
        // One rebalancing interval later: admissions move.
        inputs.now_ms += Rebalance::default().interval_ms;
        let t = Instant::now();
        let table = engine::compute(&inputs, &mut memory);
        compute.push(t.elapsed());
        black_box(&table);
        drop(table);

        let t = Instant::now();
        let i = federation::weights::inputs_from(&built.state, built.now_ms);
        from.push(t.elapsed());
        black_box(&i);
        drop(i);

        let t = Instant::now();
        let i = inputs.clone();
        clone.push(t.elapsed());
        black_box(&i);
        drop(i);
        if round % 10 == 0 || round == o.rounds {
            eprintln!(
                "recompute round {round}: compute {:.1} ms, inputs_from {:.1} ms, clone {:.1} ms",
                compute[round - 1].as_secs_f64() * 1e3,
                from[round - 1].as_secs_f64() * 1e3,
                clone[round - 1].as_secs_f64() * 1e3
            );
        }
    }
    Ok(Recompute {
        compute,
        inputs_from: from,
        clone,
        services: inputs.services.len(),
        endpoints: built.endpoints,
        splits,
        build,
    })
}

// ===================== subscribers =====================

/// What an agent saw in one message.
struct Seen {
    agent: usize,
    at: Instant,
    version: i64,
    /// A complete snapshot (its last chunk).
    snapshot: bool,
    /// Its row of the watched service's weights, if the message had them.
    row: Option<BTreeMap<String, u32>>,
    /// Endpoints the message added or changed (deltas only).
    endpoints: Vec<String>,
    /// Endpoints in the snapshot (all chunks).
    snapshot_endpoints: usize,
}

fn node_id(i: usize, cluster: &str) -> String {
    format!("agent~{cluster}~bench-{i:04}")
}

/// A raw Discovery subscriber: subscribes as an agent of `cluster`, ACKs
/// every complete snapshot and every delta, and reports what it saw.
/// `gate` is released once its first snapshot is complete.
async fn agent(
    ch: Channel,
    i: usize,
    cluster: String,
    watched: Option<api::ServiceKey>,
    seen: mpsc::UnboundedSender<Seen>,
    gate: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let mut gate = gate;
    let (tx, rx) = mpsc::channel(16);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: node_id(i, &cluster),
            cluster,
            kind: api::NodeKind::Agent as i32,
            namespace: NS.into(),
            ..Default::default()
        })),
    })
    .await?;
    let mut stream = DiscoveryClient::new(ch)
        .max_decoding_message_size(64 * 1024 * 1024)
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut snapshot_endpoints = 0;
    while let Some(m) = stream.message().await? {
        let at = Instant::now();
        if let Some(s) = &m.snapshot {
            snapshot_endpoints += m.endpoints.len();
            if !s.last {
                continue;
            }
        }
        tx.send(api::DiscoveryRequest {
            request: Some(api::discovery_request::Request::Ack(api::Ack {
                version: m.version,
                ..Default::default()
            })),
        })
        .await?;
        let row = watched.as_ref().and_then(|w| {
            m.weights
                .iter()
                .find(|sw| sw.service.as_ref() == Some(w))
                .and_then(|sw| sw.callers.first())
                .map(|c| c.weights.iter().map(|(k, v)| (k.clone(), *v)).collect())
        });
        let snapshot = m.snapshot.is_some();
        let _ = seen.send(Seen {
            agent: i,
            at,
            version: m.version,
            snapshot,
            row,
            endpoints: if snapshot {
                Vec::new()
            } else {
                m.endpoints.iter().map(|e| e.id.clone()).collect()
            },
            snapshot_endpoints,
        });
        if snapshot {
            gate.take();
            snapshot_endpoints = 0;
        }
    }
    Ok(())
}

/// The federation's API as the bench calls it: an admin's credential for
/// registrations and reads, and node certificates (one per cluster, from
/// join tokens, as agents enroll) for the Discovery subscribers.
#[derive(Clone)]
struct Api {
    admin: mesh_node::fed::Target,
    /// The federation's CA bundle, PEM.
    ca_pem: String,
}

impl Api {
    fn from_context(ctx: &mesh_core::client_config::Context) -> anyhow::Result<Self> {
        Ok(Self {
            admin: mesh_node::fed::Target::from_context(ctx)?,
            ca_pem: ctx.certificate_authority_data.clone(),
        })
    }

    fn url(&self) -> &str {
        &self.admin.url
    }

    /// `n` admin connections.
    async fn admin_channels(&self, n: usize) -> anyhow::Result<Vec<Channel>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            out.push(self.connect(self.admin.tls.as_ref()).await?);
        }
        Ok(out)
    }

    async fn connect(&self, tls: Option<&Arc<mesh_node::fed::FedTls>>) -> anyhow::Result<Channel> {
        mesh_node::fed::channel(self.url(), tls, |e| {
            e.connect_timeout(Duration::from_secs(5))
        })
        .await
    }

    /// A join token for `sa` in namespace NS of `cluster`.
    async fn token(&self, cluster: &str, sa: &str) -> anyhow::Result<String> {
        Ok(
            AdminClient::new(self.connect(self.admin.tls.as_ref()).await?)
                .create_join_token(api::CreateJoinTokenRequest {
                    cluster: cluster.into(),
                    namespace: NS.into(),
                    service_account: sa.into(),
                    ttl_seconds: 3600,
                    reusable: true,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .token,
        )
    }

    /// For each of `clusters`, a node certificate (enrolled with a join
    /// token) and `per` connections presenting it.
    async fn node_channels(
        &self,
        clusters: usize,
        per: usize,
    ) -> anyhow::Result<Vec<Vec<Channel>>> {
        let mut out = Vec::with_capacity(clusters);
        for c in 0..clusters {
            let name = cluster_name(c);
            let tls = mesh_node::fed::FedTls::new(Some(&self.ca_pem), None)?;
            let e = mesh_node::enroll::Enrollment {
                target: mesh_node::fed::Target {
                    url: self.url().to_string(),
                    tls: Some(tls.clone()),
                },
                cluster: name.clone(),
                identity: format!("spiffe://cluster.local/ns/{NS}/sa/bench-agent"),
            };
            let token = self.token(&name, "bench-agent").await?;
            mesh_node::enroll::enroll(
                &e,
                api::sign_certificate_request::Credential::JoinToken(token),
            )
            .await?;
            let mut chans = Vec::with_capacity(per);
            for _ in 0..per.max(1) {
                chans.push(self.connect(Some(&tls)).await?);
            }
            out.push(chans);
        }
        Ok(out)
    }
}

/// Starts `n` agents spread over the clusters and the channels, at most
/// `gate` of them reading their first snapshot at once, and waits until the
/// federation has recorded every one's ACK of a snapshot, for at most
/// `patience` in all. Returns the agents' tasks, the endpoints of the first
/// snapshot an agent got, and how many agents completed a snapshot: all of
/// them, or (with `partial`) as many as did in time.
#[allow(clippy::too_many_arguments)]
async fn connect_agents(
    fed: &Api,
    o: &Opts,
    clusters: usize,
    watched: Option<api::ServiceKey>,
    seen_tx: &mpsc::UnboundedSender<Seen>,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    gate: usize,
    patience: Duration,
    partial: bool,
) -> anyhow::Result<(Vec<tokio::task::JoinHandle<()>>, usize, usize)> {
    let deadline = tokio::time::Instant::now() + patience;
    // A node is served as its cluster: the connections are the clusters'
    // (o.channels in all, at least one each).
    let chans = fed
        .node_channels(clusters, o.channels.div_ceil(clusters))
        .await?;
    let gate = Arc::new(tokio::sync::Semaphore::new(gate));
    let mut tasks = Vec::with_capacity(o.agents);
    for i in 0..o.agents {
        let Ok(permit) = tokio::time::timeout_at(deadline, gate.clone().acquire_owned()).await
        else {
            break;
        };
        let permit = permit?;
        let of_cluster = &chans[i % clusters];
        let ch = of_cluster[(i / clusters) % of_cluster.len()].clone();
        let (w, tx) = (watched.clone(), seen_tx.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = agent(ch, i, cluster_name(i % clusters), w, tx, Some(permit)).await {
                eprintln!("agent {i}: {e:#}");
            }
        }));
    }
    // Every agent's first complete snapshot...
    let mut synced = vec![false; o.agents];
    let (mut done, mut endpoints) = (0, 0);
    while done < o.agents {
        let Ok(s) = tokio::time::timeout_at(deadline, seen.recv()).await else {
            anyhow::ensure!(
                partial,
                "{} agents had no snapshot in {patience:?}",
                o.agents - done
            );
            eprintln!(
                "only {done} of {} agents completed a snapshot in {patience:?}",
                o.agents
            );
            return Ok((tasks, endpoints, done));
        };
        let s = s.ok_or_else(|| anyhow::anyhow!("agents gone"))?;
        if s.snapshot && !synced[s.agent] {
            synced[s.agent] = true;
            endpoints = s.snapshot_endpoints;
            done += 1;
        }
    }
    // ...and its ACK recorded.
    let mut admin = AdminClient::new(fed.admin_channels(1).await?.remove(0))
        .max_decoding_message_size(64 << 20);
    loop {
        let st = admin
            .get_status(api::GetStatusRequest {})
            .await?
            .into_inner();
        let acked = st
            .subscribers
            .iter()
            .filter(|s| s.node_id.starts_with("agent~") && s.acked_version > 0)
            .count();
        if acked >= o.agents {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {acked} of {} agents ACKed their snapshot in {patience:?}",
            o.agents
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((tasks, endpoints, done))
}

// ===================== 2. propagation =====================

enum Want {
    /// The agent's row of the watched service's weights equals this.
    Row(BTreeMap<String, u32>),
    /// A delta carrying this endpoint.
    Endpoint(String),
}

/// Waits until every agent has seen what it should; per agent, the time
/// from `t0`, and the version that carried it.
async fn collect(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    n: usize,
    t0: Instant,
    want: &Want,
    patience: Duration,
) -> anyhow::Result<(Vec<Duration>, i64)> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut got: Vec<Option<Duration>> = vec![None; n];
    let (mut left, mut version) = (n, 0i64);
    while left > 0 {
        let s = tokio::time::timeout_at(deadline, seen.recv())
            .await
            .map_err(|_| anyhow::anyhow!("{left} of {n} agents did not see the change in time"))?
            .ok_or_else(|| anyhow::anyhow!("agents gone"))?;
        let hit = match want {
            Want::Row(r) => s.row.as_ref() == Some(r),
            Want::Endpoint(id) => s.endpoints.iter().any(|e| e == id),
        };
        if hit && s.at >= t0 && got[s.agent].is_none() {
            got[s.agent] = Some(s.at.saturating_duration_since(t0));
            version = version.max(s.version);
            left -= 1;
        }
    }
    Ok((
        got.into_iter().map(Option::unwrap_or_default).collect(),
        version,
    ))
}

/// Polls `Admin/GetStatus` from `t0` until every agent's ACK reaches the
/// version `version` will name; per agent, when its ACK was first seen
/// recorded (at the poll's answer).
async fn poll_acks(
    mut admin: AdminClient<Channel>,
    ids: Arc<HashMap<String, usize>>,
    t0: Instant,
    mut version: watch::Receiver<i64>,
    patience: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let n = ids.len();
    // Per agent: (time, acked version) each time it moved.
    let mut hist: Vec<Vec<(Duration, i64)>> = vec![Vec::new(); n];
    loop {
        let st = admin
            .get_status(api::GetStatusRequest {})
            .await?
            .into_inner();
        let tp = t0.elapsed();
        for s in &st.subscribers {
            if let Some(&i) = ids.get(&s.node_id) {
                if hist[i].last().map(|(_, v)| *v) != Some(s.acked_version) {
                    hist[i].push((tp, s.acked_version));
                }
            }
        }
        let v = *version.borrow_and_update();
        if v > 0 && hist.iter().all(|h| h.last().is_some_and(|(_, a)| *a >= v)) {
            return Ok(hist
                .iter()
                .map(|h| h.iter().find(|(_, a)| *a >= v).map_or(tp, |(t, _)| *t))
                .collect());
        }
        anyhow::ensure!(
            tp < patience,
            "ACKs not all recorded after {patience:?} (version {v})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One timed change: `act` starts it at `t0`; returns per-agent delivery
/// and ACK times.
async fn timed<F, Fut>(
    admin: &AdminClient<Channel>,
    ids: &Arc<HashMap<String, usize>>,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    want: Want,
    act: F,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, i64)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let patience = Duration::from_secs(60);
    let (vtx, vrx) = watch::channel(0i64);
    let t0 = Instant::now();
    let poller = tokio::spawn(poll_acks(admin.clone(), ids.clone(), t0, vrx, patience));
    act().await?;
    let (recv, version) = collect(seen, ids.len(), t0, &want, patience).await?;
    vtx.send_replace(version);
    let acks = poller.await??;
    Ok((recv, acks, version))
}

struct Propagation {
    weights_recv: Vec<Duration>,
    weights_ack: Vec<Duration>,
    endpoint_recv: Vec<Duration>,
    endpoint_ack: Vec<Duration>,
    /// Per change: (weights p99 recv, ack max, endpoint p99 recv, ack max) ms.
    per_change: Vec<[f64; 4]>,
}

const WATCHED: &str = "checkout";
/// Clusters the watched service runs in, by index.
const WATCHED_IN: [usize; 5] = [0, 1, 5, 10, 15];

async fn propagation(o: &Opts, fed: &Api, clusters: usize) -> anyhow::Result<Propagation> {
    let ch = fed.admin_channels(1).await?.remove(0);
    let mut reg = RegistrationClient::new(ch.clone());
    let mut admin = AdminClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    let traffic = TrafficClient::new(ch.clone());

    // Leader first: it computes the weights.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin
        .get_status(api::GetStatusRequest {})
        .await?
        .into_inner()
        .leading
    {
        anyhow::ensure!(Instant::now() < deadline, "the federation never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut interval = 3;
    for i in 0..clusters {
        let r = reg
            .register_cluster(api::RegisterClusterRequest {
                cluster: Some(api_cluster(i, clusters)),
            })
            .await?
            .into_inner();
        interval = r.heartbeat_interval_seconds.max(1);
    }
    let heartbeats = tokio::spawn(heartbeat(reg.clone(), clusters, interval));
    let mut ip = 0;
    let present: Vec<usize> = WATCHED_IN.iter().map(|c| c % clusters).collect();
    for &c in &present {
        for e in 0..2 {
            ip += 1;
            let id = format!("{WATCHED}-{}-{e}", cluster_name(c));
            reg.register_endpoint(api::RegisterEndpointRequest {
                endpoint: Some(api_endpoint(WATCHED, c, clusters, &id, ip, true)),
            })
            .await?;
        }
    }

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (tasks, _, _) = connect_agents(
        fed,
        o,
        clusters,
        Some(svc_key(WATCHED)),
        &seen_tx,
        &mut seen,
        o.agents,
        Duration::from_secs(120),
        false,
    )
    .await?;
    eprintln!("propagation: {} agents subscribed and synced", o.agents);
    let ids: Arc<HashMap<String, usize>> = Arc::new(
        (0..o.agents)
            .map(|i| (node_id(i, &cluster_name(i % clusters)), i))
            .collect(),
    );
    let (a, b) = (cluster_name(present[0]), cluster_name(present[2]));
    let mut extra = 0usize;
    let mut out = Propagation {
        weights_recv: Vec::new(),
        weights_ack: Vec::new(),
        endpoint_recv: Vec::new(),
        endpoint_ack: Vec::new(),
        per_change: Vec::new(),
    };
    // Change 0 is a warm-up.
    for k in 0..=o.changes {
        let share: u32 = match k {
            0 => 50,
            k if k % 2 == 1 => 70,
            _ => 30,
        };
        let weights: BTreeMap<String, u32> = [(a.clone(), share), (b.clone(), 100 - share)].into();
        let want: BTreeMap<String, u32> = weights
            .iter()
            .map(|(c, w)| (c.clone(), w * engine::TOTAL / 100))
            .collect();
        let req = api::SetWeightsRequest {
            service: Some(svc_key(WATCHED)),
            by: "cluster".into(),
            weights: weights.into_iter().collect(),
            actor: "bench".into(),
            ..Default::default()
        };
        let (wr, wa, wv) = timed(&admin, &ids, &mut seen, Want::Row(want), || {
            let mut traffic = traffic.clone();
            async move {
                let r = traffic.set_weights(req).await?.into_inner();
                anyhow::ensure!(r.applied, "SetWeights not applied: {:?}", r.warnings);
                Ok(())
            }
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;

        extra += 1;
        let id = format!("{WATCHED}-extra-{extra}");
        ip += 1;
        let ep = api_endpoint(WATCHED, present[0], clusters, &id, ip, true);
        let (er, ea, ev) = timed(&admin, &ids, &mut seen, Want::Endpoint(id), || {
            let mut reg = reg.clone();
            async move {
                reg.register_endpoint(api::RegisterEndpointRequest { endpoint: Some(ep) })
                    .await?;
                Ok(())
            }
        })
        .await?;
        let (dw, dwa, de, dea) = (Dist::of(&wr), Dist::of(&wa), Dist::of(&er), Dist::of(&ea));
        eprintln!(
            "change {k}{}: weights {share}/{} (version {wv}): delivered p50 {:.1} p99 {:.1} max {:.1} ms, ACK recorded p99 {:.1} max {:.1} ms; \
             endpoint (version {ev}): delivered p50 {:.1} p99 {:.1} max {:.1} ms, ACK recorded p99 {:.1} max {:.1} ms",
            if k == 0 { " (warm-up)" } else { "" },
            100 - share,
            dw.p50, dw.p99, dw.max, dwa.p99, dwa.max,
            de.p50, de.p99, de.max, dea.p99, dea.max,
        );
        if k > 0 {
            out.weights_recv.extend(wr);
            out.weights_ack.extend(wa);
            out.endpoint_recv.extend(er);
            out.endpoint_ack.extend(ea);
            out.per_change.push([dw.p99, dwa.max, de.p99, dea.max]);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    heartbeats.abort();
    for t in tasks {
        t.abort();
    }
    Ok(out)
}

/// Keeps the clusters live.
async fn heartbeat(mut reg: RegistrationClient<Channel>, clusters: usize, every: u32) {
    loop {
        tokio::time::sleep(Duration::from_secs(u64::from(every))).await;
        for i in 0..clusters {
            let _ = reg
                .heartbeat(api::HeartbeatRequest {
                    cluster: cluster_name(i),
                })
                .await;
        }
    }
}

// ===================== 3. memory =====================

/// The federation binary, killed by its PID when dropped.
pub(crate) struct Child {
    pub(crate) child: std::process::Child,
    /// Where it listens.
    #[allow(dead_code)]
    addr: String,
    /// Its first admin's `meshctl` context.
    pub(crate) admin: mesh_core::client_config::Context,
    _dir: tempfile::TempDir,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bin` of the workspace's `package` next to this binary's profile
/// directory, built first with cargo (a no-op when it is current).
pub(crate) fn workspace_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<this binary>
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow::anyhow!("no profile directory above {}", exe.display()))?;
    let path = profile.join(bin);
    let release = profile.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."));
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-p", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    if let Some(target) = profile.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    eprintln!("memory: building {bin}: {cmd:?}");
    let status = cmd.status();
    match status {
        Ok(s) if s.success() => {}
        other if path.exists() => {
            eprintln!(
                "memory: cargo build failed ({other:?}); using the existing {} (modified {:?})",
                path.display(),
                std::fs::metadata(&path).and_then(|m| m.modified()).ok()
            );
        }
        other => anyhow::bail!("cannot build {bin}: {other:?}"),
    }
    anyhow::ensure!(path.exists(), "{} missing after the build", path.display());
    Ok(path)
}

/// A `fedmesh-agent` process subscribed to the federation (plain text), and
/// the number of services in each config it applied (from its log).
struct Agent {
    child: std::process::Child,
    applied: std::sync::mpsc::Receiver<usize>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Starts it in cluster 0 of the bench's clusters, as a sidecar of an
    /// application that is not there (its own endpoint stays unhealthy: it
    /// takes nothing from its discovery).
    async fn start(bin: &Path, fed: &Api, o: &Opts) -> anyhow::Result<Self> {
        let c = api_cluster(0, o.clusters);
        let loc = c.locality.unwrap_or_default();
        let (tx, applied) = std::sync::mpsc::channel();
        // Enrolled as an agent is: a join token that carries the root's hash.
        let token = fed.token(&c.name, "bench-agent").await?;
        let child = spawn_logging(
            bin,
            &[
                "--cluster",
                &c.name,
                "--region",
                &loc.region,
                "--zone",
                &loc.zone,
                "--service",
                "bench-agent",
                "--namespace",
                NS,
                "--app",
                "127.0.0.1:9",
                "--join-token",
                &token,
                "--federation",
                fed.url(),
                "--inbound",
                "127.0.0.1:0",
                "--outbound",
                "127.0.0.1:0",
                "--admin",
                "off",
                "--log-format",
                "json",
            ],
            move |line| {
                if !line.contains("config applied") {
                    return;
                }
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                if let Some(n) = v["fields"]["services"].as_u64() {
                    #[allow(clippy::cast_possible_truncation)]
                    let _ = tx.send(n as usize);
                }
            },
        )?;
        Ok(Self { child, applied })
    }

    /// Stops it as a pod's SIGTERM does: it drains and deregisters its
    /// endpoint (which would otherwise stay in the registry until its
    /// lease lapsed), then exits; killed after 15 s.
    fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("the agent did not stop within 15 s of SIGTERM")
    }

    /// Waits until it has applied a config with at least `services`
    /// services; returns how many.
    fn applied_at_least(&self, services: usize, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.applied.recv_timeout(left) {
                Ok(n) if n >= services => return Ok(n),
                Ok(_) => {}
                Err(_) => anyhow::bail!(
                    "the agent applied no config with {services} services in {within:?}"
                ),
            }
        }
    }
}

/// Spawns `bin` with `args` (stdin and stdout to /dev/null) and a thread
/// handing every line of its stderr (its log) to `on_line`, to the end.
fn spawn_logging(
    bin: &Path,
    args: &[&str],
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> anyhow::Result<std::process::Child> {
    let mut child = std::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
        }
    });
    Ok(child)
}

/// Starts the federation binary on a free loopback port with its first
/// admin written to a temporary file, and `extra` flags.
pub(crate) fn start_child(bin: &Path, extra: &[&str]) -> anyhow::Result<Child> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut tx = Some(tx);
    // The first admin's configuration: how the bench calls it.
    let dir = tempfile::tempdir()?;
    let admin_path = dir.path().join("admin.yaml");
    // Reads the address from the log, then keeps draining it.
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--registry",
        "memory",
        "--log-format",
        "json",
        "--bootstrap-admin",
        admin_path.to_str().unwrap_or_default(),
    ];
    args.extend_from_slice(extra);
    let child = spawn_logging(bin, &args, move |line| {
        if let Some(at) = line.find("listening on ") {
            let rest = &line[at + "listening on ".len()..];
            let addr: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            if let Some(tx) = tx.take() {
                let _ = tx.send(addr);
            }
        }
    })?;
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow::anyhow!("the federation did not say where it listens in 30 s"))?;
    let admin = mesh_core::client_config::ClientConfig::load(&admin_path)
        .map_err(anyhow::Error::msg)?
        .context(None)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no context in {}", admin_path.display()))?;
    Ok(Child {
        child,
        addr,
        admin,
        _dir: dir,
    })
}

/// VmRSS and VmHWM of `pid`, MB.
pub(crate) fn rss(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct MemRun {
    mem: Mem,
    endpoints: usize,
    /// Subscribers that completed their snapshot in time.
    synced: usize,
    register: Duration,
    subscribe: Duration,
}

async fn memory(o: &Opts, child: &Child, agent_bin: &Path) -> anyhow::Result<MemRun> {
    let pid = child.child.id();
    let fed = Api::from_context(&child.admin)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle, _) = rss(pid);
    eprintln!("memory: idle {idle:.1} MB");

    let chans = fed.admin_channels(4).await?;
    let mut reg = RegistrationClient::new(chans[0].clone());
    let mut interval = 3;
    for i in 0..o.clusters {
        interval = reg
            .register_cluster(api::RegisterClusterRequest {
                cluster: Some(api_cluster(i, o.clusters)),
            })
            .await?
            .into_inner()
            .heartbeat_interval_seconds
            .max(1);
    }
    let heartbeats = tokio::spawn(heartbeat(reg.clone(), o.clusters, interval));
    // An agent while the mesh is empty: the baseline of the agent's figure.
    // It stops (deregistering) before anything is measured of the
    // federation, which it would otherwise hold a subscription of.
    let agent = Agent::start(agent_bin, &fed, o).await?;
    agent.applied_at_least(0, Duration::from_secs(30))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (agent_empty, _) = rss(agent.child.id());
    agent.stop()?;
    eprintln!("memory: agent with an empty mesh {agent_empty:.1} MB");
    let t = Instant::now();
    let n = o.services * 2;
    let regs: Vec<RegistrationClient<Channel>> = chans
        .iter()
        .map(|c| RegistrationClient::new(c.clone()))
        .collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let mut reg = regs[i % regs.len()].clone();
            let (s, e) = (i / 2, i % 2);
            let name = format!("svc-{s:05}");
            let c = (s + e * 7) % o.clusters;
            let id = format!("{name}-{e}");
            #[allow(clippy::cast_possible_truncation)]
            let ep = api_endpoint(&name, c, o.clusters, &id, i as u32 + 1, true);
            async move {
                reg.register_endpoint(api::RegisterEndpointRequest { endpoint: Some(ep) })
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let register = t.elapsed();
    // Until the leader has computed the last service's weights.
    let mut traffic = TrafficClient::new(chans[0].clone());
    let last = svc_key(&format!("svc-{:05}", o.services - 1));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let w = traffic
            .get_weights(api::GetWeightsRequest {
                service: Some(last.clone()),
            })
            .await?
            .into_inner();
        if !w.effective.is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no weights computed in 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (services, _) = rss(pid);
    // Another agent, subscribed now: every service in its table.
    let agent = Agent::start(agent_bin, &fed, o).await?;
    let agent_services = agent.applied_at_least(o.services, Duration::from_secs(120))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (agent_mesh, agent_peak) = rss(agent.child.id());
    agent.stop()?;
    eprintln!(
        "memory: agent with {agent_services} services {agent_mesh:.1} MB, peak {agent_peak:.1} MB"
    );
    eprintln!(
        "memory: {} services, {n} endpoints registered in {:.1} s: {services:.1} MB",
        o.services,
        register.as_secs_f64()
    );

    let t = Instant::now();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (tasks, endpoints, synced) = connect_agents(
        &fed,
        o,
        o.clusters,
        None,
        &seen_tx,
        &mut seen,
        50,
        o.sync_patience,
        true,
    )
    .await?;
    let subscribe = t.elapsed();
    // Drain what the agents see meanwhile.
    let drain = tokio::spawn(async move { while seen.recv().await.is_some() {} });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (subscribers, peak) = rss(pid);
    eprintln!(
        "memory: {synced} of {} subscribers synced in {:.1} s ({endpoints} endpoints each): {subscribers:.1} MB, peak {peak:.1} MB",
        o.agents,
        subscribe.as_secs_f64()
    );
    heartbeats.abort();
    for t in tasks {
        t.abort();
    }
    drain.abort();
    Ok(MemRun {
        mem: Mem {
            idle,
            services,
            subscribers,
            peak,
            agent_empty,
            agent_mesh,
            agent_peak,
            agent_services,
        },
        endpoints,
        synced,
        register,
        subscribe,
    })
}

// ===================== the run =====================

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().take(3).collect();
            (f.len() == 3).then(|| f.join(" "))
        })
        .unwrap_or_else(|| "?".into())
}

fn dist_row(t: &mut String, name: &str, d: &Dist) {
    let _ = writeln!(
        t,
        "{name:<58} {:>6} {:>9.2} {:>9.2} {:>9.2}",
        d.n, d.p50, d.p99, d.max
    );
}

/// Runs the three measurements; progress on stderr.
pub(crate) fn run(o: &Opts) -> anyhow::Result<Report> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = loadavg();
    let server_rt = runtime("bench-server");
    let client_rt = runtime("bench-client");

    // --- 1. recompute ---
    let rc = recompute(o, &client_rt)?;
    let (recompute_d, from_d, clone_d) = (
        Dist::of(&rc.compute),
        Dist::of(&rc.inputs_from),
        Dist::of(&rc.clone),
    );

    // --- 2. propagation, on an in-process federation ---
    let fed = server_rt.block_on(async {
        let mut cfg = federation::config::Config::embedded(([127, 0, 0, 1], 0).into());
        cfg.weights_interval = Duration::from_millis(100);
        // The bench loads the registry as fast as it takes: no API rate.
        cfg.security.limits.rate_per_principal = 0;
        let fed =
            federation::app::serve(&cfg, Arc::new(MemoryStore::new()) as Arc<dyn Store>).await?;
        fed.shared.wait_synced().await;
        anyhow::Ok(fed)
    })?;
    let api = server_rt.block_on(async {
        Api::from_context(
            &fed.operator_context("bench-admin", &[federation::auth::Role::Admin])
                .await?,
        )
    })?;
    let clusters = o.clusters.max(*WATCHED_IN.iter().max().unwrap_or(&0) + 1);
    let p = client_rt.block_on(propagation(o, &api, clusters))?;
    server_rt.block_on(fed.shutdown(Duration::from_secs(1)))?;

    // --- 3. memory of the federation binary ---
    let bin = workspace_binary("federation", "fedmesh-federation")?;
    let agent_bin = workspace_binary("mesh-agent", "fedmesh-agent")?;
    // The bench loads the registry as fast as it takes.
    let child = start_child(&bin, &["--api-rate", "0"])?;
    let m = client_rt.block_on(memory(o, &child, &agent_bin));
    drop(child);
    let m = m?;

    let (wr, wa, er, ea) = (
        Dist::of(&p.weights_recv),
        Dist::of(&p.weights_ack),
        Dist::of(&p.endpoint_recv),
        Dist::of(&p.endpoint_ack),
    );

    // --- the table ---
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# traffic bench: {} services x {} clusters; {} recomputes; {} agents on {} HTTP/2 connections; {} weight changes + {} baseline changes",
        o.services, o.clusters, o.rounds, o.agents, o.channels, o.changes, o.changes
    );
    let _ = writeln!(
        t,
        "# machine: {cores} cores; load average before {load_before}, after {}",
        loadavg()
    );
    let _ = writeln!(
        t,
        "\nfull recompute: {} services, {} endpoints, {} (service, caller) splits; state built in {:.1} s",
        rc.services,
        rc.endpoints,
        rc.splits,
        rc.build.as_secs_f64()
    );
    let _ = writeln!(
        t,
        "{:<58} {:>6} {:>9} {:>9} {:>9}",
        "ms", "n", "median", "p99", "max"
    );
    dist_row(&mut t, "engine::compute (full recompute)", &recompute_d);
    dist_row(&mut t, "baseline: weights::inputs_from(&State)", &from_d);
    dist_row(&mut t, "baseline: Inputs::clone", &clone_d);
    let _ = writeln!(
        t,
        "ratio compute / inputs_from (medians): {:.2}; compute / clone: {:.2}",
        recompute_d.p50 / from_d.p50,
        recompute_d.p50 / clone_d.p50
    );
    let _ = writeln!(
        t,
        "target: full recompute < 100 ms: {} (p99 {:.1} ms)",
        if recompute_d.p99 < 100.0 {
            "met"
        } else {
            "MISSED"
        },
        recompute_d.p99
    );

    let _ = writeln!(
        t,
        "\npropagation: {} agents, per agent, ms from the call ({} changes each, over all)",
        o.agents, o.changes
    );
    let _ = writeln!(
        t,
        "{:<58} {:>6} {:>9} {:>9} {:>9}",
        "ms", "n", "p50", "p99", "max"
    );
    dist_row(&mut t, "SetWeights -> delta with the new weights", &wr);
    dist_row(&mut t, "SetWeights -> ACK recorded (GetStatus)", &wa);
    dist_row(&mut t, "baseline: RegisterEndpoint -> delta with it", &er);
    dist_row(&mut t, "baseline: RegisterEndpoint -> ACK recorded", &ea);
    let _ = writeln!(
        t,
        "ratio weights / baseline: delivered p50 {:.2}, p99 {:.2}; ACK recorded p50 {:.2}, p99 {:.2}",
        wr.p50 / er.p50,
        wr.p99 / er.p99,
        wa.p50 / ea.p50,
        wa.p99 / ea.p99
    );
    for (i, c) in p.per_change.iter().enumerate() {
        let _ = writeln!(
            t,
            "change {}: weights delivered p99 {:.1} ms, all ACKs recorded {:.1} ms; endpoint delivered p99 {:.1} ms, all ACKs {:.1} ms",
            i + 1,
            c[0],
            c[1],
            c[2],
            c[3]
        );
    }
    let _ = writeln!(
        t,
        "target: weight change ACKed by every agent, p99 < 1 s: {} (p99 {:.1} ms)",
        if wa.p99 < 1000.0 { "met" } else { "MISSED" },
        wa.p99
    );

    let mm = m.mem;
    let _ = writeln!(
        t,
        "\nfederation memory (fedmesh-federation, memory registry), VmRSS MB"
    );
    let _ = writeln!(t, "idle                                  {:>9.1}", mm.idle);
    let _ = writeln!(
        t,
        "{:<37} {:>9.1}   (+{:.2} KB per service; registered in {:.1} s)",
        format!("{} clusters, {} services x 2 ep", o.clusters, o.services),
        mm.services,
        (mm.services - mm.idle) * 1024.0 / o.services as f64,
        m.register.as_secs_f64()
    );
    let _ = writeln!(
        t,
        "{:<37} {:>9.1}   (+{:.1} KB per subscriber; {:.1} s, {} endpoints each){}",
        format!("+ {} subscribers synced", m.synced),
        mm.subscribers,
        (mm.subscribers - mm.services) * 1024.0 / m.synced.max(1) as f64,
        m.subscribe.as_secs_f64(),
        m.endpoints,
        if m.synced < o.agents {
            format!(
                "  INCOMPLETE: {} of {} synced in {:.0} s",
                m.synced,
                o.agents,
                o.sync_patience.as_secs_f64()
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(t, "peak (VmHWM)                          {:>9.1}", mm.peak);
    let _ = writeln!(
        t,
        "\nagent memory (fedmesh-agent, plain text, subscribed to that federation), VmRSS MB"
    );
    let _ = writeln!(
        t,
        "empty mesh (baseline)                 {:>9.1}",
        mm.agent_empty
    );
    let _ = writeln!(
        t,
        "{:<37} {:>9.1}   (+{:.2} KB per service; {:.2}x the baseline)",
        format!("{} services x 2 ep in its table", mm.agent_services),
        mm.agent_mesh,
        (mm.agent_mesh - mm.agent_empty) * 1024.0 / mm.agent_services.max(1) as f64,
        mm.agent_mesh / mm.agent_empty
    );
    let _ = writeln!(
        t,
        "peak (VmHWM)                          {:>9.1}",
        mm.agent_peak
    );

    drop(client_rt);
    server_rt.shutdown_timeout(Duration::from_secs(1));
    anyhow::ensure!(
        m.synced == 0 || m.endpoints == o.services * 2,
        "a subscriber's snapshot had {} endpoints, expected {}",
        m.endpoints,
        o.services * 2
    );
    Ok(Report {
        recompute: recompute_d,
        inputs_from: from_d,
        clone: clone_d,
        weights_recv: wr,
        weights_ack: wa,
        endpoint_recv: er,
        endpoint_ack: ea,
        mem: mm,
        mem_synced: m.synced,
        text: t,
    })
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and
    // must not run the measurement.
    if !std::env::args().any(|a| a == "--bench") {
        println!("traffic bench: run with `cargo bench -p fedmesh-benches --bench traffic`");
        return Ok(());
    }
    let o = Opts {
        services: knob("FEDMESH_BENCH_SERVICES", 10_000),
        clusters: knob("FEDMESH_BENCH_CLUSTERS", 20).max(3),
        rounds: knob("FEDMESH_BENCH_ROUNDS", 30).max(1),
        agents: knob("FEDMESH_BENCH_AGENTS", 1000).max(1),
        channels: knob("FEDMESH_BENCH_CHANNELS", 20).max(1),
        changes: knob("FEDMESH_BENCH_CHANGES", 5).max(1),
        sync_patience: Duration::from_secs(knob("FEDMESH_BENCH_SYNC_SECS", 300) as u64),
    };
    let r = run(&o)?;
    println!();
    print!("{}", r.text);
    fedmesh_benches::write_report("traffic", &r.text)?;
    Ok(())
}
