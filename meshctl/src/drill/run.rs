//! Runs a scenario against a running topology: sends its load, applies its
//! steps on time, watches the federation's weights and the abort
//! condition, undoes every fault it left, and measures what happened.

use super::report::{self, Report, Sample, Stamp};
use super::scenario::{Action, Scenario};
use super::topology::Topology;
use crate::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::traffic_client::TrafficClient;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wan_relay::{Change, Mode};

/// How a drill runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Progress lines on stderr while it runs.
    pub progress: bool,
    /// The operator's credential for the topology's federation (its URL
    /// is the topology's); none: plain text.
    pub fed: Option<crate::client::Fed>,
}

/// What the runner shares with its tasks.
struct Shared {
    start: Instant,
    /// The same instant on the wall clock (Unix ms).
    started_unix_ms: i64,
    samples: Mutex<Vec<Sample>>,
    stamps: Mutex<Vec<Stamp>>,
}

impl Shared {
    fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    fn stamp(&self, kind: &str, what: String) {
        let at_ms = self.now_ms();
        self.stamps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Stamp {
                at_ms,
                kind: kind.to_string(),
                what,
            });
    }
}

/// Acts on the topology.
struct Injector<'t> {
    topo: &'t Topology,
    relay: wan_relay::control::Client,
    traffic: TrafficClient<tonic::transport::Channel>,
}

impl Injector<'_> {
    fn links(&self, to: &str, gateway: bool) -> Vec<String> {
        self.topo
            .clusters_of(to)
            .into_iter()
            .flat_map(|c| {
                if gateway {
                    c.gateway_links.clone()
                } else {
                    vec![c.federation_link.clone()]
                }
            })
            .collect()
    }

    /// Posts `/gateways/C/VERB` for every cluster `to` names.
    async fn gateways(&self, to: &str, verb: &str) -> Result<(), String> {
        for c in self.topo.clusters_of(to) {
            control(self.topo.control, &format!("/gateways/{}/{verb}", c.name)).await?;
        }
        Ok(())
    }

    async fn relay(&self, links: &[String], change: &Change) -> Result<(), String> {
        self.relay
            .set_many(links, change)
            .await
            .map(|_| ())
            .map_err(|e| format!("the WAN relay at {}: {e}", self.topo.relay))
    }

    async fn apply(&mut self, a: &Action) -> Result<(), String> {
        match a {
            Action::KillGateway { cluster } => {
                control(self.topo.control, &format!("/gateways/{cluster}/kill")).await
            }
            Action::StartGateway { cluster } => {
                control(self.topo.control, &format!("/gateways/{cluster}/start")).await
            }
            Action::BlackholeGateway { cluster } => self.gateways(cluster, "blackhole").await,
            Action::RestoreGateway { cluster } => self.gateways(cluster, "restore").await,
            Action::Partition { region } => {
                self.relay(&self.links(region, false), &Change::new().mode(Mode::Cut))
                    .await
            }
            Action::Heal { region } => {
                self.relay(&self.links(region, false), &Change::new().mode(Mode::Pass))
                    .await
            }
            Action::Latency {
                to,
                delay,
                jitter,
                loss,
            } => {
                let c = Change::new().delay(*delay).jitter(*jitter).loss(*loss);
                self.relay(&self.links(to, true), &c).await
            }
            Action::ClearLatency { to } => {
                // Back to each link's own WAN delay and loss.
                for link in self.links(to, true) {
                    let base = self.topo.baseline.get(&link);
                    let c = Change::new()
                        .delay(base.map_or(Duration::ZERO, |b| b.delay))
                        .jitter(base.map_or(Duration::ZERO, |b| b.jitter))
                        .loss(base.map_or(0.0, |b| b.loss));
                    self.relay(&[link], &c).await?;
                }
                Ok(())
            }
            Action::FailService { cluster, service } => {
                control(
                    self.topo.control,
                    &format!("/services/{cluster}/{service}/fail"),
                )
                .await
            }
            Action::HealService { cluster, service } => {
                control(
                    self.topo.control,
                    &format!("/services/{cluster}/{service}/heal"),
                )
                .await
            }
            Action::SetWeights { service, weights } => {
                let svc = service_key(service)?;
                self.traffic
                    .set_weights(api::SetWeightsRequest {
                        service: Some(svc),
                        by: "cluster".into(),
                        weights: weights.clone().into_iter().collect(),
                        actor: "meshctl drill".into(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("setWeights: {}", e.message()))
            }
            Action::ClearWeights { service } => {
                let svc = service_key(service)?;
                self.traffic
                    .clear_weights(api::ClearWeightsRequest {
                        service: Some(svc),
                        actor: "meshctl drill".into(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("clearWeights: {}", e.message()))
            }
            Action::Drain { cluster } | Action::Undrain { cluster } => self
                .traffic
                .drain(api::DrainRequest {
                    cluster: cluster.clone(),
                    undrain: matches!(a, Action::Undrain { .. }),
                    force: true,
                    actor: "meshctl drill".into(),
                })
                .await
                .map(|_| ())
                .map_err(|e| format!("{}: {}", a.kind(), e.message())),
        }
    }
}

/// What undoes `a`, if anything.
pub fn undo_of(a: &Action) -> Option<Action> {
    Some(match a {
        Action::KillGateway { cluster } => Action::StartGateway {
            cluster: cluster.clone(),
        },
        Action::BlackholeGateway { cluster } => Action::RestoreGateway {
            cluster: cluster.clone(),
        },
        Action::Partition { region } => Action::Heal {
            region: region.clone(),
        },
        Action::Latency { to, .. } => Action::ClearLatency { to: to.clone() },
        Action::FailService { cluster, service } => Action::HealService {
            cluster: cluster.clone(),
            service: service.clone(),
        },
        Action::SetWeights { service, .. } => Action::ClearWeights {
            service: service.clone(),
        },
        Action::Drain { cluster } => Action::Undrain {
            cluster: cluster.clone(),
        },
        _ => return None,
    })
}

/// `ns/name` (or `name`, in `default`) as the API's key.
fn service_key(s: &str) -> Result<api::ServiceKey, String> {
    let (ns, name) = s.split_once('/').unwrap_or(("default", s));
    if ns.is_empty() || name.is_empty() {
        return Err(format!("{s:?} is not a service (ns/name)"));
    }
    Ok(api::ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    })
}

/// The mesh service a load host (`name.ns[:port]`) calls.
pub fn service_of_host(host: &str) -> Option<(String, String)> {
    let h = host.split(':').next()?;
    let mut parts = h.split('.');
    let name = parts.next()?.to_string();
    let ns = parts.next().unwrap_or("default").to_string();
    Some((ns, name))
}

/// One POST to the topology's control API.
async fn control(addr: SocketAddr, path: &str) -> Result<(), String> {
    let fail = |e: String| format!("the topology's control API at {addr}{path}: {e}");
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| fail(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
        .await
        .map_err(|_| fail("no answer in 10 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
        .unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(fail(format!("{status}: {body}")))
    }
}

/// One request of the load through `frontend` (a frontend agent's
/// outbound listener) to `host`: the cluster that answered.
async fn call(frontend: SocketAddr, host: &str) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(frontend)
        .await
        .map_err(|e| format!("connect to the frontend agent: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let cluster = resp
        .headers()
        .get("x-cluster")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = resp.into_body().collect().await;
    match (status.is_success(), cluster) {
        (true, Some(c)) => Ok(c),
        (true, None) => Err("answer without x-cluster".into()),
        (false, _) => Err(format!("HTTP {}", status.as_u16())),
    }
}

/// Sends `rate` requests per second from `from` through `frontend`,
/// cycling through `hosts`, until `stop`.
async fn load(
    shared: Arc<Shared>,
    from: String,
    frontend: SocketAddr,
    hosts: Vec<String>,
    rate: u32,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0usize;
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let host = hosts[n % hosts.len()].clone();
        n += 1;
        let shared = shared.clone();
        let from = from.clone();
        inflight.spawn(async move {
            let start_ms = shared.now_ms();
            let r = tokio::time::timeout(timeout, call(frontend, &host))
                .await
                .unwrap_or_else(|_| Err(format!("no answer in {timeout:?}")));
            let end_ms = shared.now_ms();
            let (served_by, error) = match r {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(e)),
            };
            shared
                .samples
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Sample {
                    from,
                    host,
                    start_ms,
                    end_ms,
                    served_by,
                    error,
                });
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// Polls the federation's weights for the load's services; records when
/// a cluster's weight drops to 0 in the rows of every calling cluster of
/// the load, and when it comes back.
async fn watch_weights(
    shared: Arc<Shared>,
    mut traffic: TrafficClient<tonic::transport::Channel>,
    services: Vec<api::ServiceKey>,
    callers: Vec<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last: BTreeMap<(String, String), bool> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for svc in &services {
            let Ok(r) = traffic
                .get_weights(api::GetWeightsRequest {
                    service: Some(svc.clone()),
                })
                .await
            else {
                continue;
            };
            let r = r.into_inner();
            // A cluster takes the load's traffic if one of its callers
            // gives it weight.
            let mut takes: BTreeMap<String, bool> =
                r.regions.keys().map(|c| (c.clone(), false)).collect();
            for row in r
                .effective
                .iter()
                .filter(|row| callers.contains(&row.caller))
            {
                for (dest, w) in &row.weights {
                    if *w > 0 {
                        takes.insert(dest.clone(), true);
                    }
                }
            }
            let name = format!("{}/{}", svc.namespace, svc.name);
            for (cluster, now) in takes {
                let key = (name.clone(), cluster.clone());
                if let Some(before) = last.insert(key, now) {
                    if before != now {
                        shared.stamp(
                            if now { "weights-back" } else { "weights-off" },
                            format!("{cluster} for {name}"),
                        );
                    }
                }
            }
        }
    }
}

/// Applies and later deletes the scenario's policy documents.
async fn apply_policies(
    admin: &mut AdminClient<tonic::transport::Channel>,
    scenario: &Scenario,
) -> Result<Vec<api::PolicyRef>, Error> {
    if scenario.policies.trim().is_empty() {
        return Ok(Vec::new());
    }
    let ns = mesh_core::name::Namespace::new("default").map_err(|e| Error::Usage(e.to_string()))?;
    let parsed = mesh_core::policy::parse_yaml("spec.policies", &scenario.policies, &ns)
        .map_err(|errs| Error::Invalid(errs.iter().map(ToString::to_string).collect()))?;
    let docs: Vec<api::PolicyDocument> = parsed
        .documents
        .iter()
        .map(crate::cmd::policy::to_api)
        .collect();
    admin
        .apply_policies(api::ApplyPoliciesRequest {
            source: format!("drill {}", scenario.name),
            documents: docs.clone(),
            dry_run: false,
        })
        .await?;
    Ok(docs.into_iter().filter_map(|d| d.r#ref).collect())
}

/// Runs `scenario` on `topo`.
#[allow(clippy::too_many_lines)]
pub async fn run(topo: &Topology, scenario: &Scenario, opts: &Options) -> Result<Report, Error> {
    scenario.check(&topo.regions()).map_err(Error::Usage)?;
    let callers: Vec<&super::topology::Cluster> = if scenario.load.from.is_empty() {
        topo.clusters.iter().collect()
    } else {
        scenario
            .load
            .from
            .iter()
            .filter_map(|c| topo.cluster(c))
            .collect()
    };
    let fed = match &opts.fed {
        Some(f) => f.with_url(&topo.federation),
        None => crate::client::Fed::new(&topo.federation, None),
    };
    let ch = crate::client::connect(&fed).await?;
    let mut admin = AdminClient::new(ch.clone());
    let traffic = TrafficClient::new(ch);
    let mut inject = Injector {
        topo,
        relay: wan_relay::control::Client::new(topo.relay),
        traffic: traffic.clone(),
    };
    // The relay answers before anything is changed.
    inject
        .relay
        .list()
        .await
        .map_err(|e| Error::Status(format!("the WAN relay at {}: {e}", topo.relay)))?;
    let policies = apply_policies(&mut admin, scenario).await?;

    let shared = Arc::new(Shared {
        start: Instant::now(),
        started_unix_ms: crate::drill::unix_ms(),
        samples: Mutex::new(Vec::new()),
        stamps: Mutex::new(Vec::new()),
    });
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for c in &callers {
        tasks.spawn(load(
            shared.clone(),
            c.name.clone(),
            c.frontend,
            scenario.load.hosts.clone(),
            scenario.load.rate,
            scenario.load.timeout,
            stop_rx.clone(),
        ));
    }
    let services: Vec<api::ServiceKey> = scenario
        .load
        .hosts
        .iter()
        .filter_map(|h| service_of_host(h))
        .map(|(namespace, name)| api::ServiceKey { namespace, name })
        .collect();
    tasks.spawn(watch_weights(
        shared.clone(),
        traffic,
        services,
        callers.iter().map(|c| c.name.clone()).collect(),
        stop_rx.clone(),
    ));
    if opts.progress {
        eprintln!(
            "drill {}: {} req/s from each of {} for {:.0} s",
            scenario.name,
            scenario.load.rate,
            callers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            scenario.load.duration.as_secs_f64()
        );
    }

    // Steps on time; the abort condition checked in between.
    let mut undo: Vec<Action> = Vec::new();
    let mut aborted: Option<String> = None;
    let mut next_progress = Duration::from_secs(5);
    let mut steps = scenario.steps.iter().peekable();
    loop {
        let elapsed = shared.start.elapsed();
        if elapsed >= scenario.load.duration {
            break;
        }
        if let Some(step) = steps.next_if(|s| s.at <= elapsed) {
            let what = format!("{} {}", step.action.kind(), step.action.target());
            if opts.progress {
                eprintln!("[{:6.1}s] {what}", elapsed.as_secs_f64());
            }
            shared.stamp("step", what.clone());
            if let Err(e) = inject.apply(&step.action).await {
                aborted = Some(format!("step {what} failed: {e}"));
                break;
            }
            if let Some(u) = undo_of(&step.action) {
                undo.push(u);
            }
            if step.action.is_repair() || matches!(step.action, Action::ClearWeights { .. }) {
                undo.retain(|u| u != &step.action);
            }
            continue;
        }
        if let Some(a) = &scenario.abort {
            let now = shared.now_ms();
            let window_ms = a.window.as_secs_f64() * 1000.0;
            let (ok, all) = report::window(
                &shared
                    .samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
                now - window_ms,
                now,
            );
            #[allow(clippy::cast_precision_loss)]
            let rate = ok as f64 * 100.0 / all as f64;
            if all >= 10 && now >= window_ms && rate < a.success_rate_below {
                aborted = Some(format!(
                    "success rate {rate:.1}% over the last {:.0} s is below {}%",
                    a.window.as_secs_f64(),
                    a.success_rate_below
                ));
                break;
            }
        }
        if opts.progress && elapsed >= next_progress {
            next_progress += Duration::from_secs(5);
            let s = shared
                .samples
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let failed = s.iter().filter(|x| x.error.is_some()).count();
            eprintln!(
                "[{:6.1}s] {} requests, {} failed",
                elapsed.as_secs_f64(),
                s.len(),
                failed
            );
        }
        let until_next = steps
            .peek()
            .map_or(scenario.load.duration, |s| s.at)
            .saturating_sub(elapsed);
        tokio::time::sleep(until_next.min(Duration::from_millis(100))).await;
    }
    if let Some(why) = &aborted {
        shared.stamp("abort", why.clone());
        if opts.progress {
            eprintln!("aborting: {why}");
        }
    }
    stop.send_replace(true);
    let ended_ms = shared.now_ms();
    // What the drill broke, it mends, last first.
    let mut cleanup_errors = Vec::new();
    for u in undo.iter().rev() {
        let what = format!("{} {}", u.kind(), u.target());
        if opts.progress {
            eprintln!("cleanup: {what}");
        }
        shared.stamp("cleanup", what.clone());
        if let Err(e) = inject.apply(u).await {
            cleanup_errors.push(format!("{what}: {e}"));
        }
    }
    if !policies.is_empty() {
        if let Err(e) = admin
            .delete_policies(api::DeletePoliciesRequest { refs: policies })
            .await
        {
            cleanup_errors.push(format!("deleting the drill's policies: {}", e.message()));
        }
    }
    while tasks.join_next().await.is_some() {}
    let samples = std::mem::take(
        &mut *shared
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let stamps = std::mem::take(&mut *shared.stamps.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(report::build(
        scenario,
        topo,
        shared.started_unix_ms,
        samples,
        stamps,
        ended_ms,
        aborted,
        cleanup_errors,
    ))
}
