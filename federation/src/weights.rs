//! The leader's loop: reads the replica's state, runs the weight engine and
//! writes the weights that changed, fenced by its term. Every replica then
//! sees them through its registry watch and pushes them to its agents.
//!
//! It recomputes shortly after the state changes (endpoints, liveness,
//! operator weights, drains) and at least every interval (slow start ramps
//! and stale clusters are matters of time). The engine's memory (slow start,
//! rebalancing) is kept while leading, stored with the weights, and taken
//! back by the next leader.

use crate::engine::{self, ClusterIn, Inputs, Memory, OperatorWeights, ServiceAt};
use crate::leader::{Election, Term, WriteError};
use crate::state::{Shared, State};
use crate::store::TxnWrite;
use crate::traffic::{ComputedWeights, WeightsBy, WEIGHTS_PREFIX};
use mesh_core::endpoint::Health;
use mesh_core::name::{ClusterName, Region};
use mesh_core::service::ServiceKey;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Default recompute interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// After a state change, wait this long for the changes that come with it.
const SETTLE: Duration = Duration::from_millis(50);

/// Writes per transaction: etcd's limit, less the fencing guard.
const CHUNK: usize = crate::store::MAX_TXN_OPS - 1;

/// The registry key of a service's computed weights.
pub fn key(s: &ServiceKey) -> String {
    format!("{WEIGHTS_PREFIX}{}/{}", s.namespace, s.name)
}

/// Runs for the replica's life: computes while it leads.
pub async fn run(
    shared: Arc<Shared>,
    election: Election,
    interval: Duration,
    store: Arc<dyn crate::store::Store>,
) {
    let mut terms = election.watch();
    loop {
        let term = loop {
            if let Some(t) = terms.borrow_and_update().clone() {
                break t;
            }
            if terms.changed().await.is_err() {
                return;
            }
        };
        info!(token = term.token, "leading: computing the global weights");
        lead(&shared, &election, &term, interval, &*store).await;
    }
}

async fn lead(
    shared: &Shared,
    election: &Election,
    term: &Term,
    interval: Duration,
    store: &dyn crate::store::Store,
) {
    let mut memory = Memory::default();
    {
        // Carry on where the previous leader stopped.
        let st = shared.read();
        for (k, w) in st.weights() {
            memory.import(k, named_slots(&w.memory));
        }
    }
    let mut revisions = shared.revisions();
    let mut terms = election.watch();
    loop {
        if election.term().as_ref() != Some(term) {
            return;
        }
        let now = u64::try_from(crate::registry::now_unix_ms()).unwrap_or(0);
        let (inputs, stored, basis) = {
            let st = shared.read();
            let inputs = inputs_from(&st, now);
            let basis: BTreeMap<ServiceKey, i64> = inputs
                .services
                .keys()
                .map(|s| (s.clone(), st.operator_revision(s)))
                .collect();
            (inputs, st.weights().clone(), basis)
        };
        revert_expired(shared, election, term, store, now).await;
        // Tens of milliseconds at 10,000 services: off the async workers.
        let token = term.token;
        let work = tokio::task::spawn_blocking(move || {
            let table = engine::compute(&inputs, &mut memory);
            let writes = changes(&table, &memory, &stored, &basis, token, now);
            (memory, writes)
        });
        let writes = match work.await {
            Ok((m, writes)) => {
                memory = m;
                writes
            }
            Err(e) => {
                warn!("weights not computed: {e}");
                return;
            }
        };
        if !writes.is_empty() {
            debug!(changes = writes.len(), "writing weights");
        }
        for chunk in writes.chunks(CHUNK) {
            match election.write(term, chunk.to_vec()).await {
                Ok(_) => {}
                Err(WriteError::NotLeader(why)) => {
                    warn!("weights not written: {why}");
                    return;
                }
                Err(e) => {
                    warn!("weights not written: {e}");
                    break;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            r = revisions.changed() => {
                if r.is_err() {
                    return;
                }
                tokio::time::sleep(SETTLE).await;
                revisions.borrow_and_update();
            }
            _ = terms.changed() => {}
        }
    }
}

/// The engine's inputs from the replica's state at `now_ms` (Unix ms).
pub fn inputs_from(st: &State, now_ms: u64) -> Inputs {
    let mut inputs = Inputs {
        now_ms,
        ..Default::default()
    };
    for (name, info) in st.cluster_infos() {
        inputs.clusters.insert(
            name.clone(),
            ClusterIn {
                region: info.locality.region.clone(),
                unknown_since_ms: st
                    .unknown_since(name)
                    .map(|u| u64::try_from(u).unwrap_or(0)),
                drained: st.drains().contains_key(name),
            },
        );
    }
    for ep in st.all_endpoints() {
        let svc = inputs.services.entry(ep.service.clone()).or_default();
        let at: &mut ServiceAt = svc.clusters.entry(ep.cluster.clone()).or_default();
        at.endpoints += 1;
        if ep.health == Health::Healthy {
            at.ready += 1;
        }
    }
    // Load: what each cluster serves and can serve, from fresh reports.
    for (k, l) in st.loads() {
        if !fresh(l, now_ms) {
            continue;
        }
        if let Some(at) = inputs
            .services
            .get_mut(&k.service)
            .and_then(|s| s.clusters.get_mut(&k.cluster))
        {
            at.qps += l.inbound_qps;
            at.capacity += l.capacity_qps;
        }
    }
    // Data-plane reachability, as each cluster's gateway probed the others.
    for (from, p) in st.probes() {
        if i64::try_from(now_ms).unwrap_or(i64::MAX) - p.at_unix_ms
            > crate::traffic::PROBES_FRESH_MS
        {
            continue;
        }
        for (to, r) in &p.clusters {
            let Ok(to) = ClusterName::new(to) else {
                continue;
            };
            if !r.gateway {
                inputs.unreachable.insert((from.clone(), to.clone(), None));
            }
            for svc in &r.unreachable {
                if let Ok(s) = svc.parse::<ServiceKey>() {
                    inputs
                        .unreachable
                        .insert((from.clone(), to.clone(), Some(s)));
                }
            }
        }
    }
    // The services' TrafficWeights (the first by name wins for a service).
    for (pk, p) in st.policies() {
        if pk.kind != mesh_core::policy::Kind::TrafficWeights {
            continue;
        }
        let Some(tw) = traffic_weights(&p.json) else {
            continue;
        };
        let Ok(name) = mesh_core::name::ServiceName::new(tw.service()) else {
            continue;
        };
        let key = ServiceKey::new(pk.namespace.clone(), name);
        let Some(svc) = inputs.services.get_mut(&key) else {
            continue;
        };
        if svc.policy.from_document {
            continue;
        }
        apply_policy(&mut svc.policy, &tw);
    }
    for (k, (o, _)) in st.overrides() {
        if expired(o, now_ms) {
            continue;
        }
        let Some(svc) = inputs.services.get_mut(k) else {
            continue;
        };
        svc.policy.weights = operator_weights(o);
    }
    inputs
}

fn fresh(l: &crate::traffic::LoadReport, now_ms: u64) -> bool {
    i64::try_from(now_ms).unwrap_or(i64::MAX) - l.at_unix_ms <= crate::traffic::LOAD_FRESH_MS
}

/// Requests per second each calling cluster sends to each service, from
/// fresh load reports (what the callers' agents sent).
pub fn demand_from(st: &State, now_ms: u64) -> BTreeMap<ServiceKey, BTreeMap<ClusterName, f64>> {
    let mut out: BTreeMap<ServiceKey, BTreeMap<ClusterName, f64>> = BTreeMap::new();
    for (k, l) in st.loads() {
        if !fresh(l, now_ms) {
            continue;
        }
        for (svc, qps) in &l.outbound {
            if let Ok(s) = svc.parse::<ServiceKey>() {
                *out.entry(s)
                    .or_default()
                    .entry(k.cluster.clone())
                    .or_default() += qps;
            }
        }
    }
    out
}

fn traffic_weights(json: &str) -> Option<mesh_core::policy::TrafficWeights> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    match mesh_core::policy::Document::from_json(&v).ok()?.spec {
        mesh_core::policy::Spec::TrafficWeights(tw) => Some(tw),
        _ => None,
    }
}

/// A TrafficWeights document into the engine's policy.
fn apply_policy(p: &mut engine::Policy, tw: &mesh_core::policy::TrafficWeights) {
    p.from_document = true;
    p.weights = if let Some(w) = tw.weights_by_cluster() {
        Some(OperatorWeights::Clusters(
            w.iter()
                .filter_map(|(c, v)| Some((ClusterName::new(c).ok()?, *v)))
                .collect(),
        ))
    } else {
        tw.weights_by_region().map(|w| {
            OperatorWeights::Regions(
                w.iter()
                    .filter_map(|(r, v)| Some((Region::new(r).ok()?, *v)))
                    .collect(),
            )
        })
    };
    p.failover = tw
        .failover()
        .iter()
        .filter_map(|r| Region::new(r).ok())
        .collect();
    p.rebalance = tw
        .rebalance_effective()
        .map(|(tolerance, max_step, floor, interval)| engine::Rebalance {
            tolerance,
            max_step,
            floor,
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        });
    p.slow_start_ms = u64::try_from(tw.slow_start_effective().as_millis()).unwrap_or(u64::MAX);
    p.stale = match tw.stale_effective() {
        mesh_core::policy::StaleEffective::KeepLastKnown => engine::Stale::KeepLastKnown,
        mesh_core::policy::StaleEffective::WithdrawAfter(d) => {
            engine::Stale::WithdrawAfterMs(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        }
    };
}

/// Operator weights past their TTL: they no longer count, and the leader
/// deletes them.
pub fn expired(o: &crate::traffic::TrafficOverride, now_ms: u64) -> bool {
    o.expires_unix_ms
        .is_some_and(|e| u64::try_from(e).unwrap_or(0) <= now_ms)
}

/// The registry key of a service's operator weights.
pub fn override_key(s: &ServiceKey) -> String {
    format!(
        "{}{}/{}",
        crate::traffic::OVERRIDE_PREFIX,
        s.namespace,
        s.name
    )
}

/// Deletes expired operator weights (fenced), each audited.
async fn revert_expired(
    shared: &Shared,
    election: &Election,
    term: &Term,
    store: &dyn crate::store::Store,
    now_ms: u64,
) {
    let gone: Vec<(ServiceKey, i64)> = shared
        .read()
        .overrides()
        .iter()
        .filter(|(_, (o, _))| expired(o, now_ms))
        .map(|(k, (_, rev))| (k.clone(), *rev))
        .collect();
    for (svc, rev) in gone {
        let w = TxnWrite {
            key: override_key(&svc),
            expect: Some(crate::store::Expect::ModRevision(rev)),
            value: None,
        };
        if election.write(term, vec![w]).await.is_ok() {
            info!(service = %svc, "operator weights expired; reverted");
            crate::audit::record(
                store,
                "weights_expired",
                &svc.to_string(),
                "the TTL of the operator weights ran out; reverted",
            )
            .await;
        }
    }
}

fn operator_weights(o: &crate::traffic::TrafficOverride) -> Option<OperatorWeights> {
    Some(match o.by {
        WeightsBy::Cluster => OperatorWeights::Clusters(
            o.weights
                .iter()
                .filter_map(|(c, w)| Some((ClusterName::new(c).ok()?, *w)))
                .collect(),
        ),
        WeightsBy::Region => OperatorWeights::Regions(
            o.weights
                .iter()
                .filter_map(|(r, w)| Some((Region::new(r).ok()?, *w)))
                .collect(),
        ),
    })
}

/// The writes that bring the stored weights to `table`: services whose
/// weights or memory changed, those an operator change (`basis`: its
/// revision by service) has not reached yet, and those that are gone.
fn changes(
    table: &engine::Table,
    memory: &Memory,
    stored: &BTreeMap<ServiceKey, Arc<ComputedWeights>>,
    basis: &BTreeMap<ServiceKey, i64>,
    token: i64,
    now_ms: u64,
) -> Vec<TxnWrite> {
    let mut out = Vec::new();
    for (svc, weights) in &table.services {
        // Never behind what is stored: a replica that started after an
        // operator change (a removal leaves no record) knows less of it.
        let basis = basis
            .get(svc)
            .copied()
            .unwrap_or(0)
            .max(stored.get(svc).map_or(0, |w| w.basis));
        if stored.get(svc).is_some_and(|w| {
            w.basis >= basis
                && same_weights(table, *weights, &w.callers)
                && memory.matches(svc, &w.memory)
        }) {
            continue;
        }
        let name = |i: u32| table.clusters.get(i as usize).map(ToString::to_string);
        let callers = table
            .clusters
            .iter()
            .enumerate()
            .map(|(i, caller)| {
                let row = table
                    .row(*weights, i)
                    .iter()
                    .filter_map(|(d, w)| Some((name(*d)?, *w)))
                    .collect();
                (caller.to_string(), row)
            })
            .collect();
        let value = ComputedWeights {
            callers,
            memory: memory
                .export(svc)
                .into_iter()
                .map(|(c, s)| (c.to_string(), s))
                .collect(),
            computed_unix_ms: i64::try_from(now_ms).unwrap_or(i64::MAX),
            term: token,
            basis,
        };
        out.push(TxnWrite {
            key: key(svc),
            expect: None,
            value: Some(serde_json::to_vec(&value).unwrap_or_default()),
        });
    }
    for svc in stored.keys() {
        if !table.services.contains_key(svc) {
            out.push(TxnWrite {
                key: key(svc),
                expect: None,
                value: None,
            });
        }
    }
    out
}

/// Are the stored weights (caller -> destination -> weight, by name) those
/// of the table? Compared in place: most intervals change nothing, and
/// naming every row of every service to compare would cost more than
/// computing them.
fn same_weights(
    table: &engine::Table,
    weights: engine::ServiceTable,
    stored: &BTreeMap<String, BTreeMap<String, u32>>,
) -> bool {
    stored.len() == table.clusters.len()
        && table
            .clusters
            .iter()
            .enumerate()
            .zip(stored)
            .all(|((i, caller), (name, row))| {
                let mine = table.row(weights, i);
                caller.as_str() == name
                    && mine.len() == row.len()
                    && mine.iter().zip(row).all(|((d, w), (n, v))| {
                        w == v
                            && table
                                .clusters
                                .get(*d as usize)
                                .is_some_and(|c| c.as_str() == n)
                    })
            })
}

/// The engine's inputs and memory for `service` as this replica sees them,
/// for explaining its weights: the memory comes from the stored weights.
pub fn explain(
    st: &State,
    service: &ServiceKey,
    now_ms: u64,
) -> BTreeMap<ClusterName, engine::Split> {
    let inputs = inputs_from(st, now_ms);
    engine::explain(&inputs, &stored_memory(st, service), service)
}

/// What the engine remembered of `service` when its weights were last
/// written (slow start, rebalancing), as any replica reads it.
pub fn stored_memory(st: &State, service: &ServiceKey) -> Memory {
    let mut memory = Memory::default();
    if let Some(w) = st.weights().get(service) {
        memory.import(service, named_slots(&w.memory));
    }
    memory
}

fn named_slots(stored: &BTreeMap<String, engine::Slot>) -> BTreeMap<ClusterName, engine::Slot> {
    stored
        .iter()
        .filter_map(|(c, s)| Some((ClusterName::new(c).ok()?, s.clone())))
        .collect()
}
