//! Traffic: operator weights and drains (validated, guarded, audited,
//! written with compare-and-swap) and the leader's weights as operators see
//! them.

use super::store_status;
use crate::engine::{self, TOTAL};
use crate::state::{Shared, State};
use crate::store::{Expect, Store, TxnOutcome, TxnWrite};
use crate::traffic::{Drain, TrafficOverride, WeightsBy, DRAIN_PREFIX};
use crate::weights::{inputs_from, override_key};
use mesh_api::v1 as api;
use mesh_api::v1::traffic_server::Traffic;
use mesh_core::convert::FromApi;
use mesh_core::name::{ClusterName, Region};
use mesh_core::service::ServiceKey;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How long a write waits for this replica's state to show it.
const READ_YOUR_WRITES: Duration = Duration::from_secs(5);

/// The Traffic service.
pub struct TrafficService {
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    subscribers: Arc<crate::grpc::discovery::Subscribers>,
    replica: String,
}

/// Pending (and NACKing) agents named per cluster in a rollout, at most.
const PENDING_NAMED: usize = 20;
/// Characters of a NACK reason shown in a rollout.
const NACK_REASON: usize = 300;

impl TrafficService {
    /// A service reading `shared` and writing to `store`.
    pub fn new(shared: Arc<Shared>, store: Arc<dyn Store>) -> Self {
        Self {
            shared,
            store,
            subscribers: Arc::default(),
            replica: String::new(),
        }
    }

    /// Reports rollouts from this replica's subscribers (and the others').
    pub fn with_subscribers(
        mut self,
        subscribers: Arc<crate::grpc::discovery::Subscribers>,
        replica: &str,
    ) -> Self {
        self.subscribers = subscribers;
        self.replica = replica.to_string();
        self
    }

    fn require_reachable(&self) -> Result<(), Status> {
        let h = self.shared.health();
        if h.reachable {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "registry unreachable ({}); the federation refuses traffic changes until it is back",
                h.reason
            )))
        }
    }
}

fn now_ms() -> u64 {
    u64::try_from(crate::registry::now_unix_ms()).unwrap_or(0)
}

fn service_of(s: Option<api::ServiceKey>) -> Result<ServiceKey, Status> {
    let s = s.ok_or_else(|| Status::invalid_argument("service: is required"))?;
    ServiceKey::from_api(s, "service").map_err(|e| Status::invalid_argument(e.to_string()))
}

fn callers_msg(t: &BTreeMap<ClusterName, BTreeMap<ClusterName, u32>>) -> Vec<api::CallerWeights> {
    t.iter()
        .map(|(c, ws)| api::CallerWeights {
            caller: c.to_string(),
            weights: ws.iter().map(|(d, w)| (d.to_string(), *w)).collect(),
        })
        .collect()
}

/// Is `c` healthy for `svc` (ready endpoints, live, not drained)?
fn healthy(inputs: &engine::Inputs, svc: &ServiceKey, c: &ClusterName) -> bool {
    let Some(cl) = inputs.clusters.get(c) else {
        return false;
    };
    let ready = inputs
        .services
        .get(svc)
        .and_then(|s| s.clusters.get(c))
        .is_some_and(|a| a.ready > 0);
    ready && !cl.drained && cl.unknown_since_ms.is_none()
}

/// Validates operator weights against the registered clusters and regions.
fn operator_weights(
    st: &State,
    by: &str,
    weights: &BTreeMap<String, u32>,
) -> Result<(WeightsBy, engine::OperatorWeights), Status> {
    let mut errs = Vec::new();
    if weights.is_empty() {
        errs.push("weights: at least one is required".to_string());
    }
    if weights.values().all(|w| *w == 0) && !weights.is_empty() {
        errs.push("weights: at least one must be above 0".to_string());
    }
    for (k, w) in weights {
        if *w > TOTAL {
            errs.push(format!("weights.{k}: {w} is above {TOTAL}"));
        }
    }
    let regions: BTreeSet<String> = st
        .cluster_infos()
        .values()
        .map(|c| c.locality.region.to_string())
        .collect();
    let out = match by {
        "cluster" => {
            let mut m = BTreeMap::new();
            for (k, w) in weights {
                match ClusterName::new(k) {
                    Ok(c) if st.has_cluster(&c) => {
                        m.insert(c, *w);
                    }
                    Ok(_) => errs.push(format!("weights.{k}: no cluster {k} is registered")),
                    Err(e) => errs.push(format!("weights.{k}: {e}")),
                }
            }
            (WeightsBy::Cluster, engine::OperatorWeights::Clusters(m))
        }
        "region" => {
            let mut m = BTreeMap::new();
            for (k, w) in weights {
                match Region::new(k) {
                    Ok(r) if regions.contains(k) => {
                        m.insert(r, *w);
                    }
                    Ok(_) => errs.push(format!(
                        "weights.{k}: no registered cluster is in region {k} (regions: {})",
                        regions.iter().cloned().collect::<Vec<_>>().join(", ")
                    )),
                    Err(e) => errs.push(format!("weights.{k}: {e}")),
                }
            }
            (WeightsBy::Region, engine::OperatorWeights::Regions(m))
        }
        other => {
            errs.push(format!("by: must be cluster or region, got {other:?}"));
            (
                WeightsBy::Cluster,
                engine::OperatorWeights::Clusters(BTreeMap::new()),
            )
        }
    };
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(Status::invalid_argument(errs.join("; ")))
    }
}

#[tonic::async_trait]
impl Traffic for TrafficService {
    async fn get_rollout(
        &self,
        req: Request<api::GetRolloutRequest>,
    ) -> Result<Response<api::Rollout>, Status> {
        let req = req.into_inner();
        let svc = req.service.map(|s| service_of(Some(s))).transpose()?;
        if req.revision < 0 {
            return Err(Status::invalid_argument(format!(
                "revision: must be 0 or more, got {}",
                req.revision
            )));
        }
        let st = self.shared.read();
        if let Some(s) = &svc {
            if !st.has_service(s) && !st.weights().contains_key(s) {
                return Err(Status::not_found(format!("no endpoints of service {s}")));
            }
        }
        let revision = match (req.revision, &svc) {
            (0, Some(s)) => st.operator_revision(s),
            (0, None) => st.last_operator_revision(),
            (r, _) => r,
        };
        // Computed: every service the change bears on (its last operator
        // change is this one or later) has weights computed from it; the
        // version to ACK is the newest of those.
        let services: Vec<&ServiceKey> = st
            .weights()
            .keys()
            .filter(|k| svc.as_ref().is_none_or(|s| s == *k))
            .filter(|k| st.operator_revision(k) >= revision)
            .collect();
        // A service with no computed weights yet has nothing in effect.
        let computed = revision <= st.revision()
            && svc.as_ref().is_none_or(|s| st.weights().contains_key(s))
            && services
                .iter()
                .all(|s| st.weights().get(*s).is_some_and(|w| w.basis >= revision));
        let version = if computed {
            services
                .iter()
                .map(|s| st.weights_revision(s))
                .max()
                .unwrap_or(0)
                .max(revision)
        } else {
            0
        };
        // One row per agent: a replica that went away leaves its rows
        // until their lease ends while its agents reconnect elsewhere; the
        // most advanced row of a node counts.
        let mut agents: BTreeMap<String, api::Subscriber> = BTreeMap::new();
        for s in super::discovery::all_subscribers(&self.subscribers, &self.replica, &st) {
            if s.kind != api::NodeKind::Agent as i32 {
                continue;
            }
            match agents.get(&s.node_id) {
                Some(o) if o.acked_version >= s.acked_version => {}
                _ => {
                    agents.insert(s.node_id.clone(), s);
                }
            }
        }
        let mut clusters: BTreeMap<String, api::ClusterRollout> = BTreeMap::new();
        for s in agents.into_values() {
            let c = clusters
                .entry(s.cluster.clone())
                .or_insert_with(|| api::ClusterRollout {
                    cluster: s.cluster.clone(),
                    ..Default::default()
                });
            c.agents += 1;
            if computed && s.acked_version >= version {
                c.applied += 1;
            } else if computed && s.nack_version >= version && !s.nack_reason.is_empty() {
                // Named up to a bound, reasons cut short: the answer stays small.
                if c.nacked.len() < PENDING_NAMED {
                    c.nacked.push(api::AgentNack {
                        node_id: s.node_id,
                        version: s.nack_version,
                        reason: s.nack_reason.chars().take(NACK_REASON).collect(),
                    });
                } else {
                    c.more_nacked += 1;
                }
            } else if c.pending.len() < PENDING_NAMED {
                c.pending.push(s.node_id);
            }
        }
        let complete = computed && clusters.values().all(|c| c.applied == c.agents);
        Ok(Response::new(api::Rollout {
            revision,
            computed,
            version,
            clusters: clusters.into_values().collect(),
            complete,
        }))
    }

    async fn get_weights(
        &self,
        req: Request<api::GetWeightsRequest>,
    ) -> Result<Response<api::GetWeightsResponse>, Status> {
        let svc = service_of(req.into_inner().service)?;
        let st = self.shared.read();
        if !st.has_service(&svc) && !st.weights().contains_key(&svc) {
            return Err(Status::not_found(format!("no endpoints of service {svc}")));
        }
        let configured = st
            .overrides()
            .get(&svc)
            .map(|(o, rev)| api::ConfiguredWeights {
                by: match o.by {
                    WeightsBy::Cluster => "cluster",
                    WeightsBy::Region => "region",
                }
                .into(),
                weights: o.weights.clone().into_iter().collect(),
                set_by: o.set_by.clone(),
                set_unix_ms: o.set_unix_ms,
                expires_unix_ms: o.expires_unix_ms.unwrap_or(0),
                forced: o.forced,
                revision: *rev,
            });
        let (effective, computed_unix_ms) = match st.weights().get(&svc) {
            Some(w) => (
                crate::state::weights_msg(&svc, w).callers,
                w.computed_unix_ms,
            ),
            None => (Vec::new(), 0),
        };
        Ok(Response::new(api::GetWeightsResponse {
            service: Some((&svc).into()),
            configured,
            effective,
            regions: st
                .cluster_infos()
                .iter()
                .map(|(n, c)| (n.to_string(), c.locality.region.to_string()))
                .collect(),
            computed_unix_ms,
            drained: st.drains().keys().map(ToString::to_string).collect(),
        }))
    }

    async fn explain_weights(
        &self,
        req: Request<api::GetWeightsRequest>,
    ) -> Result<Response<api::ExplainWeightsResponse>, Status> {
        let svc = service_of(req.into_inner().service)?;
        let st = self.shared.read();
        if !st.has_service(&svc) {
            return Err(Status::not_found(format!("no endpoints of service {svc}")));
        }
        let splits = crate::weights::explain(&st, &svc, now_ms());
        let regions: BTreeMap<String, String> = st
            .cluster_infos()
            .iter()
            .map(|(n, c)| (n.to_string(), c.locality.region.to_string()))
            .collect();
        Ok(Response::new(api::ExplainWeightsResponse {
            callers: splits
                .into_iter()
                .map(|(c, s)| api::CallerExplain {
                    region: regions.get(c.as_str()).cloned().unwrap_or_default(),
                    caller: c.to_string(),
                    weights: s.weights.iter().map(|(d, w)| (d.to_string(), *w)).collect(),
                    // What bounds the retries these weights may cause.
                    lines: s
                        .explain
                        .into_iter()
                        .chain([mesh_core::retry::cross_cluster_explained()])
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn set_weights(
        &self,
        req: Request<api::SetWeightsRequest>,
    ) -> Result<Response<api::SetWeightsResponse>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let req = req.into_inner();
        let svc = service_of(req.service)?;
        let weights: BTreeMap<String, u32> = req.weights.into_iter().collect();
        let now = now_ms();
        // Validate and predict under the read lock; write after.
        let (by, predicted, violations, warnings, current_rev, qps) = {
            let st = self.shared.read();
            if !st.has_service(&svc) {
                return Err(Status::not_found(format!("no endpoints of service {svc}")));
            }
            let (by, ow) = operator_weights(&st, &req.by, &weights)?;
            let mut inputs = inputs_from(&st, now);
            let mut violations = Vec::new();
            let mut warnings = Vec::new();
            // Guardrail: some cluster given traffic must be healthy.
            let given: Vec<ClusterName> = inputs
                .clusters
                .iter()
                .filter(|(c, cl)| match &ow {
                    engine::OperatorWeights::Clusters(m) => m.get(*c).is_some_and(|w| *w > 0),
                    engine::OperatorWeights::Regions(m) => {
                        m.get(&cl.region).is_some_and(|w| *w > 0)
                    }
                })
                .map(|(c, _)| c.clone())
                .collect();
            if !given.iter().any(|c| healthy(&inputs, &svc, c)) {
                violations.push(format!(
                    "no cluster given traffic ({}) has a healthy endpoint of {svc}: the weights would send nothing anywhere healthy",
                    given.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ));
            }
            let capacity: BTreeMap<ClusterName, f64> = inputs
                .services
                .get(&svc)
                .map(|s| {
                    s.clusters
                        .iter()
                        .filter(|(_, a)| a.capacity > 0.0)
                        .map(|(c, a)| (c.clone(), a.capacity))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(s) = inputs.services.get_mut(&svc) {
                s.policy.weights = Some(ow);
            }
            let mut memory = crate::weights::stored_memory(&st, &svc);
            let predicted = engine::compute_service(&inputs, &mut memory, &svc);
            // Predicted load: each calling cluster's demand, split by its
            // predicted weights.
            let demand = crate::weights::demand_from(&st, now)
                .remove(&svc)
                .unwrap_or_default();
            let mut qps: BTreeMap<String, f64> = BTreeMap::new();
            for (caller, d) in &demand {
                if let Some(split) = predicted.get(caller) {
                    for (dest, w) in split {
                        *qps.entry(dest.to_string()).or_default() +=
                            d * f64::from(*w) / f64::from(TOTAL);
                    }
                }
            }
            // Guardrail: no cluster beyond its measured capacity.
            if capacity.is_empty() || demand.is_empty() {
                warnings.push(format!(
                    "no cluster reports load for {svc}: the capacity guardrail was not checked"
                ));
            }
            for (c, cap) in &capacity {
                let q = qps.get(c.as_str()).copied().unwrap_or(0.0);
                if q > *cap {
                    violations.push(format!(
                        "{c} would get {q:.0} requests/s, beyond its measured capacity of {cap:.0}"
                    ));
                }
            }
            let current_rev = st.overrides().get(&svc).map(|(_, r)| *r);
            (by, predicted, violations, warnings, current_rev, qps)
        };
        let mut warnings = warnings;
        if !violations.is_empty() && !req.force {
            return Err(Status::failed_precondition(format!(
                "refused: {}; pass --force to override (audited)",
                violations.join("; ")
            )));
        }
        warnings.extend(violations.iter().map(|v| format!("forced past: {v}")));
        let resp = |applied: bool, revision: i64, warnings: Vec<String>| api::SetWeightsResponse {
            applied,
            revision,
            predicted: callers_msg(&predicted),
            predicted_qps: qps.clone().into_iter().collect(),
            warnings,
        };
        if req.dry_run {
            return Ok(Response::new(resp(false, 0, warnings)));
        }
        self.require_reachable()?;
        // A stale --if-revision is a read-modify-write that lost a race:
        // ABORTED, as gRPC names it, so the caller reads again.
        let expect = match (req.if_revision, current_rev) {
            (0, Some(r)) => Expect::ModRevision(r),
            (0 | -1, None) => Expect::Absent,
            (-1, Some(r)) => {
                return Err(Status::aborted(format!(
                    "the weights of {svc} are already set (revision {r}); --if-revision=-1 only sets them where none are"
                )))
            }
            (n, Some(r)) if n == r => Expect::ModRevision(r),
            (n, cur) => {
                return Err(Status::aborted(format!(
                    "the weights of {svc} are at revision {}, not {n}: read them again",
                    cur.map_or_else(|| "none (unset)".to_string(), |r| r.to_string())
                )))
            }
        };
        let actor = caller.actor_with(&req.actor, "actor")?;
        let value = TrafficOverride {
            by,
            weights: weights.clone(),
            set_by: actor.clone(),
            set_unix_ms: i64::try_from(now).unwrap_or(0),
            expires_unix_ms: (req.ttl_seconds > 0).then(|| {
                i64::try_from(now + u64::from(req.ttl_seconds) * 1000).unwrap_or(i64::MAX)
            }),
            forced: !violations.is_empty(),
        };
        let outcome = self
            .store
            .transact(vec![TxnWrite {
                key: override_key(&svc),
                expect: Some(expect),
                value: Some(serde_json::to_vec(&value).unwrap_or_default()),
            }])
            .await
            .map_err(|e| store_status(&e))?;
        let rev = match outcome {
            TxnOutcome::Committed(rev) => rev,
            TxnOutcome::Conflict { current, .. } => {
                return Err(Status::aborted(format!(
                    "the weights of {svc} changed meanwhile (now at revision {}); read them again",
                    current.map_or(0, |kv| kv.mod_revision)
                )))
            }
        };
        let mut detail = format!(
            "by {}: {}",
            req.by,
            weights
                .iter()
                .map(|(k, w)| format!("{k}={w}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        if req.ttl_seconds > 0 {
            detail.push_str(&format!(", reverts after {} s", req.ttl_seconds));
        }
        if !violations.is_empty() {
            detail.push_str(&format!(" (forced past: {})", violations.join("; ")));
        }
        crate::audit::record_by(
            &*self.store,
            "weights_set",
            &actor,
            &svc.to_string(),
            &detail,
        )
        .await;
        self.shared.wait_for(rev, READ_YOUR_WRITES).await;
        Ok(Response::new(resp(true, rev, warnings)))
    }

    async fn clear_weights(
        &self,
        req: Request<api::ClearWeightsRequest>,
    ) -> Result<Response<api::SetWeightsResponse>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let req = req.into_inner();
        let svc = service_of(req.service)?;
        self.require_reachable()?;
        let rev = self
            .store
            .delete(&override_key(&svc))
            .await
            .map_err(|e| store_status(&e))?;
        let Some(rev) = rev else {
            return Ok(Response::new(api::SetWeightsResponse {
                applied: false,
                warnings: vec![format!("{svc} had no operator weights")],
                ..Default::default()
            }));
        };
        let actor = caller.actor_with(&req.actor, "actor")?;
        crate::audit::record_by(&*self.store, "weights_clear", &actor, &svc.to_string(), "").await;
        self.shared.wait_for(rev, READ_YOUR_WRITES).await;
        Ok(Response::new(api::SetWeightsResponse {
            applied: true,
            revision: rev,
            ..Default::default()
        }))
    }

    async fn drain(
        &self,
        req: Request<api::DrainRequest>,
    ) -> Result<Response<api::DrainResponse>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let req = req.into_inner();
        let cluster = super::cluster_field(&req.cluster, "cluster")?;
        let actor = caller.actor_with(&req.actor, "actor")?;
        let key = format!("{DRAIN_PREFIX}{cluster}");
        let mut stranded = Vec::new();
        {
            let st = self.shared.read();
            if !st.has_cluster(&cluster) {
                return Err(Status::not_found(format!(
                    "no cluster {cluster} is registered"
                )));
            }
            let already = st.drains().contains_key(&cluster);
            if already != req.undrain {
                return Ok(Response::new(api::DrainResponse {
                    changed: false,
                    revision: st.revision(),
                }));
            }
            if !req.undrain {
                // Guardrail: a service left with no healthy cluster.
                let inputs = inputs_from(&st, now_ms());
                for (svc, s) in &inputs.services {
                    let was = s.clusters.keys().any(|c| healthy(&inputs, svc, c));
                    let left = s
                        .clusters
                        .keys()
                        .any(|c| *c != cluster && healthy(&inputs, svc, c));
                    if was && !left {
                        stranded.push(svc.to_string());
                    }
                }
            }
        }
        if !stranded.is_empty() && !req.force {
            return Err(Status::failed_precondition(format!(
                "refused: draining {cluster} leaves no healthy cluster for {}; pass --force to override (audited)",
                stranded.join(", ")
            )));
        }
        self.require_reachable()?;
        let rev = if req.undrain {
            self.store
                .delete(&key)
                .await
                .map_err(|e| store_status(&e))?
                .unwrap_or(0)
        } else {
            let d = Drain {
                by: actor.clone(),
                since_unix_ms: crate::registry::now_unix_ms(),
            };
            self.store
                .put(&key, serde_json::to_vec(&d).unwrap_or_default(), None)
                .await
                .map_err(|e| store_status(&e))?
        };
        let (action, mut detail) = if req.undrain {
            ("undrain", "back with slow start".to_string())
        } else {
            ("drain", String::new())
        };
        if !stranded.is_empty() {
            detail.push_str(&format!(
                " (forced: leaves no healthy cluster for {})",
                stranded.join(", ")
            ));
        }
        crate::audit::record_by(&*self.store, action, &actor, cluster.as_ref(), &detail).await;
        self.shared.wait_for(rev, READ_YOUR_WRITES).await;
        Ok(Response::new(api::DrainResponse {
            changed: true,
            revision: rev,
        }))
    }
}
