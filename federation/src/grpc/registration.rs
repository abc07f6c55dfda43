//! Registration: clusters register and heartbeat; agents register endpoints.

use super::{cluster_field, invalid, store_status};
use crate::auth::{Caller, Principal};
use crate::registry::Registry;
use crate::state::Shared;
use crate::store::{LeaseId, Revision};
use mesh_api::v1 as api;
use mesh_api::v1::registration_server::Registration;
use mesh_core::cluster::ClusterInfo;
use mesh_core::convert::required_from_api;
use mesh_core::endpoint::{Endpoint, EndpointKey};
use mesh_core::name::ClusterName;
use mesh_core::service::ServiceKey;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use tracing::info;

/// How long a write waits to be reflected in this replica's state before it
/// answers, so that a caller can read its own writes (list, subscribe) at
/// once. The watch normally delivers in a millisecond.
const READ_YOUR_WRITES: Duration = Duration::from_secs(5);

/// The Registration service.
pub struct RegistrationService {
    registry: Registry,
    shared: Arc<Shared>,
    heartbeat_ttl: Duration,
    replica: String,
    /// The heartbeat lease this replica holds for each cluster. Held across
    /// store calls so that concurrent heartbeats of a cluster make one lease.
    leases: Mutex<HashMap<ClusterName, LeaseId>>,
}

impl RegistrationService {
    /// A service writing through `registry`.
    pub fn new(
        registry: Registry,
        shared: Arc<Shared>,
        heartbeat_ttl: Duration,
        replica: String,
    ) -> Self {
        Self {
            registry,
            shared,
            heartbeat_ttl,
            replica,
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// Renews the lease the endpoint's lease key is bound to, whichever
    /// replica granted it: that lease, or `None` when the key is gone (the
    /// lease lapsed, or the endpoint was deregistered) or its lease is.
    /// Reading the key each time (rather than remembering leases) keeps the
    /// key and the lease that is renewed the same one.
    async fn renew_lease(&self, k: &EndpointKey) -> Result<Option<LeaseId>, Status> {
        let Some(l) = self
            .registry
            .endpoint_lease(k)
            .await
            .map_err(|e| store_status(&e))?
        else {
            return Ok(None);
        };
        let held = self
            .registry
            .store()
            .keep_alive(l)
            .await
            .map_err(|e| store_status(&e))?
            .is_some();
        Ok(held.then_some(l))
    }

    async fn settle(&self, rev: Revision) {
        self.shared.wait_for(rev, READ_YOUR_WRITES).await;
    }

    fn ttl_secs(&self) -> u32 {
        u32::try_from(self.heartbeat_ttl.as_secs()).unwrap_or(u32::MAX)
    }

    /// A node may act on an endpoint of its own cluster that carries its
    /// own identity (or on one that is gone).
    fn require_owner(&self, caller: &Caller, key: &EndpointKey) -> Result<(), Status> {
        caller.require_cluster(&key.cluster, "endpoint.cluster")?;
        if let Principal::Node { identity, .. } = &caller.principal {
            let owner = self.shared.read().endpoint(key).map(|e| e.identity.clone());
            if let Some(owner) = owner {
                if owner.as_ref() != Some(identity) {
                    return Err(Status::permission_denied(format!(
                        "endpoint: {key} belongs to {}, not {identity}",
                        owner.map_or_else(|| "no identity".to_string(), |o| o.to_string())
                    )));
                }
            }
        }
        Ok(())
    }

    /// Audits a registration an operator made by hand; a node's own
    /// (routine, every few seconds) are not audited.
    async fn audit_by_operator(&self, caller: &Caller, action: &str, subject: &str, detail: &str) {
        if !matches!(caller.principal, Principal::Node { .. }) {
            crate::audit::record_by(
                &**self.registry.store(),
                action,
                &caller.actor(),
                subject,
                detail,
            )
            .await;
        }
    }

    fn require_cluster(&self, c: &ClusterName, field: &str) -> Result<(), Status> {
        if self.shared.read().has_cluster(c) {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "{field}: cluster {c} is not registered: register it first (RegisterCluster)"
            )))
        }
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register_cluster(
        &self,
        req: Request<api::RegisterClusterRequest>,
    ) -> Result<Response<api::RegisterClusterResponse>, Status> {
        let caller = Caller::of(&req);
        let info: ClusterInfo =
            required_from_api("", "cluster", req.into_inner().cluster).map_err(|e| invalid(&e))?;
        let rev = self
            .registry
            .put_cluster(&info)
            .await
            .map_err(|e| store_status(&e))?;
        let mut leases = self.leases.lock().await;
        if let Some(old) = leases.remove(&info.name) {
            // A re-registration starts a fresh heartbeat; the old lease would
            // expire anyway, revoking it just makes that immediate.
            let _ = self.registry.store().revoke_lease(old).await;
        }
        let lease = self
            .registry
            .start_heartbeat(&info.name, self.heartbeat_ttl, &self.replica)
            .await
            .map_err(|e| store_status(&e))?;
        leases.insert(info.name.clone(), lease);
        drop(leases);
        info!(cluster = %info.name, locality = %info.locality, "cluster registered");
        crate::audit::record_by(
            &**self.registry.store(),
            "cluster_register",
            &caller.actor(),
            info.name.as_str(),
            &format!(
                "locality {}, network {}, {} gateways, local endpoints {}, endpoint networks [{}]",
                info.locality,
                info.network,
                info.gateways.len(),
                if info.allow_local_endpoints {
                    "allowed"
                } else {
                    "refused"
                },
                info.endpoint_networks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .await;
        self.settle(rev).await;
        let ttl = self.ttl_secs();
        Ok(Response::new(api::RegisterClusterResponse {
            revision: rev,
            heartbeat_ttl_seconds: ttl,
            heartbeat_interval_seconds: (ttl / 3).max(1),
        }))
    }

    async fn remove_cluster(
        &self,
        req: Request<api::RemoveClusterRequest>,
    ) -> Result<Response<api::RemoveClusterResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let name = cluster_field(&req.cluster, "cluster")?;
        if !self.shared.read().has_cluster(&name) {
            return Err(Status::not_found(format!(
                "cluster: {name} is not registered"
            )));
        }
        let (endpoints, exports): (Vec<EndpointKey>, Vec<ServiceKey>) = {
            let st = self.shared.read();
            (
                st.all_endpoints()
                    .filter(|e| e.cluster == name)
                    .map(Endpoint::key)
                    .collect(),
                st.exports_of_cluster(&name),
            )
        };
        let empty = endpoints.is_empty() && exports.is_empty();
        if !empty && !req.force {
            return Err(Status::failed_precondition(format!(
                "cluster: {name} still has {} endpoints and {} exports: deregister them first, or remove them with it (force)",
                endpoints.len(),
                exports.len()
            )));
        }
        for k in &endpoints {
            self.registry
                .delete_endpoint(k)
                .await
                .map_err(|e| store_status(&e))?;
        }
        for s in &exports {
            self.registry
                .set_export(s, &name, false)
                .await
                .map_err(|e| store_status(&e))?;
        }
        if let Some(l) = self.leases.lock().await.remove(&name) {
            let _ = self.registry.store().revoke_lease(l).await;
        }
        let rev = self
            .registry
            .delete_cluster(&name)
            .await
            .map_err(|e| store_status(&e))?;
        let detail = format!(
            "{} endpoints and {} exports removed with it",
            endpoints.len(),
            exports.len()
        );
        crate::audit::record_by(
            &**self.registry.store(),
            "cluster_remove",
            &caller.actor(),
            name.as_str(),
            &detail,
        )
        .await;
        info!(cluster = %name, %detail, "cluster removed");
        if let Some(rev) = rev {
            self.settle(rev).await;
        }
        Ok(Response::new(api::RemoveClusterResponse {
            endpoints_removed: u32::try_from(endpoints.len()).unwrap_or(u32::MAX),
            exports_removed: u32::try_from(exports.len()).unwrap_or(u32::MAX),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<api::HeartbeatRequest>,
    ) -> Result<Response<api::HeartbeatResponse>, Status> {
        let caller = Caller::of(&req);
        let name = cluster_field(&req.into_inner().cluster, "cluster")?;
        caller.require_cluster(&name, "cluster")?;
        self.require_cluster(&name, "cluster")?;
        let mut leases = self.leases.lock().await;
        if let Some(lease) = leases.get(&name).copied() {
            match self.registry.store().keep_alive(lease).await {
                Ok(Some(_)) => {
                    return Ok(Response::new(api::HeartbeatResponse {
                        heartbeat_ttl_seconds: self.ttl_secs(),
                    }))
                }
                Ok(None) => {
                    info!(cluster = %name, "heartbeat lease had lapsed; starting a new one");
                }
                Err(e) => return Err(store_status(&e)),
            }
        }
        // No live lease here (it lapsed, or the cluster registered through
        // another replica, or this replica restarted): start one.
        let lease = self
            .registry
            .start_heartbeat(&name, self.heartbeat_ttl, &self.replica)
            .await
            .map_err(|e| store_status(&e))?;
        leases.insert(name, lease);
        Ok(Response::new(api::HeartbeatResponse {
            heartbeat_ttl_seconds: self.ttl_secs(),
        }))
    }

    async fn register_endpoint(
        &self,
        req: Request<api::RegisterEndpointRequest>,
    ) -> Result<Response<api::RegisterEndpointResponse>, Status> {
        let caller = Caller::of(&req);
        let ep: Endpoint = required_from_api("", "endpoint", req.into_inner().endpoint)
            .map_err(|e| invalid(&e))?;
        caller.require_cluster(&ep.cluster, "endpoint.cluster")?;
        if let Principal::Node { identity, .. } = &caller.principal {
            match &ep.identity {
                Some(id) => caller.require_identity(id, "endpoint.identity")?,
                None => {
                    return Err(Status::permission_denied(format!(
                        "endpoint.identity: must be the caller's, {identity}"
                    )))
                }
            }
        }
        // A workload may not take over another identity's endpoint key.
        self.require_owner(&caller, &ep.key())?;
        self.require_cluster(&ep.cluster, "endpoint.cluster")?;
        // An endpoint at the gateway's own loopback (or another network the
        // cluster does not use) would make its gateway a relay into it.
        if let Some(c) = self.shared.read().cluster_infos().get(&ep.cluster) {
            c.admits(ep.address)
                .map_err(|why| Status::invalid_argument(format!("endpoint.address: {why}")))?;
        }
        // A workload's own endpoint lives on a lease it renews: if the
        // workload dies, its endpoint leaves rotation within the TTL.
        let leased = matches!(caller.principal, Principal::Node { .. });
        let rev = if leased {
            let k = ep.key();
            // The lease key is written every time, bound to the lease that
            // was renewed or granted: whatever removed it meanwhile, the
            // endpoint is alive again once registered.
            let held = self.renew_lease(&k).await?;
            self.registry
                .hold_endpoint_lease(&k, held, self.heartbeat_ttl, &self.replica)
                .await
                .map_err(|e| store_status(&e))?;
            self.registry
                .put_leased_endpoint(&ep, self.heartbeat_ttl)
                .await
        } else {
            self.registry.put_endpoint(&ep).await
        }
        .map_err(|e| store_status(&e))?;
        self.audit_by_operator(
            &caller,
            "endpoint_register",
            &ep.key().to_string(),
            &format!("address {}, health {}", ep.address, ep.health.as_str()),
        )
        .await;
        self.settle(rev).await;
        Ok(Response::new(api::RegisterEndpointResponse {
            revision: rev,
            lease_ttl_seconds: if leased { self.ttl_secs() } else { 0 },
        }))
    }

    async fn renew_endpoint(
        &self,
        req: Request<api::RenewEndpointRequest>,
    ) -> Result<Response<api::RenewEndpointResponse>, Status> {
        let caller = Caller::of(&req);
        let key: EndpointKey = required_from_api("", "endpoint", req.into_inner().endpoint)
            .map_err(|e| invalid(&e))?;
        self.require_owner(&caller, &key)?;
        let (registered, alive) = {
            let st = self.shared.read();
            (st.endpoint(&key).is_some(), st.endpoint_alive(&key))
        };
        if !registered {
            return Err(Status::not_found(format!(
                "endpoint: {key} is not registered: register it again"
            )));
        }
        if !alive || self.renew_lease(&key).await?.is_none() {
            return Err(Status::not_found(format!(
                "endpoint: {key} has no live lease (it lapsed, or the endpoint was not registered by its workload): register it again"
            )));
        }
        Ok(Response::new(api::RenewEndpointResponse {
            lease_ttl_seconds: self.ttl_secs(),
        }))
    }

    async fn deregister_endpoint(
        &self,
        req: Request<api::DeregisterEndpointRequest>,
    ) -> Result<Response<api::DeregisterEndpointResponse>, Status> {
        let caller = Caller::of(&req);
        let key: EndpointKey = required_from_api("", "endpoint", req.into_inner().endpoint)
            .map_err(|e| invalid(&e))?;
        self.require_owner(&caller, &key)?;
        let rev = self
            .registry
            .delete_endpoint(&key)
            .await
            .map_err(|e| store_status(&e))?;
        self.audit_by_operator(
            &caller,
            "endpoint_deregister",
            &key.to_string(),
            if rev.is_some() { "removed" } else { "absent" },
        )
        .await;
        if let Some(rev) = rev {
            self.settle(rev).await;
        }
        Ok(Response::new(api::DeregisterEndpointResponse {
            revision: rev.unwrap_or(0),
        }))
    }

    async fn set_export(
        &self,
        req: Request<api::SetExportRequest>,
    ) -> Result<Response<api::SetExportResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let svc: ServiceKey =
            required_from_api("", "service", req.service).map_err(|e| invalid(&e))?;
        let cluster = cluster_field(&req.cluster, "cluster")?;
        caller.require_cluster(&cluster, "cluster")?;
        if let Principal::Node { identity, .. } = &caller.principal {
            // A workload exports only a service it serves in its cluster.
            let serves = self
                .shared
                .read()
                .endpoints_of(&svc)
                .any(|e| e.cluster == cluster && e.identity.as_ref() == Some(identity));
            if !serves {
                return Err(Status::permission_denied(format!(
                    "service: {identity} serves no endpoint of {svc} in cluster {cluster}, so it may not export it"
                )));
            }
        }
        self.require_cluster(&cluster, "cluster")?;
        let rev = self
            .registry
            .set_export(&svc, &cluster, req.exported)
            .await
            .map_err(|e| store_status(&e))?;
        self.audit_by_operator(
            &caller,
            "export",
            &format!("{svc} from {cluster}"),
            if req.exported {
                "exported"
            } else {
                "withdrawn"
            },
        )
        .await;
        if let Some(rev) = rev {
            self.settle(rev).await;
        }
        Ok(Response::new(api::SetExportResponse {
            revision: rev.unwrap_or(0),
        }))
    }

    async fn report_load(
        &self,
        req: Request<api::ReportLoadRequest>,
    ) -> Result<Response<api::ReportLoadResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let key: EndpointKey =
            required_from_api("", "endpoint", req.endpoint).map_err(|e| invalid(&e))?;
        self.require_owner(&caller, &key)?;
        let mut errs = Vec::new();
        for (field, v) in [
            ("inbound_qps", req.inbound_qps),
            ("capacity_qps", req.capacity_qps),
        ] {
            if !v.is_finite() || v < 0.0 {
                errs.push(format!("{field}: must be a finite number >= 0, got {v}"));
            }
        }
        let mut outbound = std::collections::BTreeMap::new();
        for (i, o) in req.outbound.into_iter().enumerate() {
            let s: Result<ServiceKey, _> =
                required_from_api("", &format!("outbound[{i}].service"), o.service);
            match s {
                Ok(s) if o.qps.is_finite() && o.qps >= 0.0 => {
                    *outbound.entry(s.to_string()).or_insert(0.0) += o.qps;
                }
                Ok(_) => errs.push(format!(
                    "outbound[{i}].qps: must be a finite number >= 0, got {}",
                    o.qps
                )),
                Err(e) => errs.push(e.to_string()),
            }
        }
        if !errs.is_empty() {
            return Err(Status::invalid_argument(errs.join("; ")));
        }
        if self.shared.read().endpoint(&key).is_none() {
            return Err(Status::not_found(format!(
                "endpoint: {key} is not registered"
            )));
        }
        let report = crate::traffic::LoadReport {
            inbound_qps: req.inbound_qps,
            capacity_qps: req.capacity_qps,
            outbound,
            at_unix_ms: crate::registry::now_unix_ms(),
        };
        let rev = self
            .registry
            .put_load(&key, &report)
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(api::ReportLoadResponse { revision: rev }))
    }

    async fn report_probes(
        &self,
        req: Request<api::ReportProbesRequest>,
    ) -> Result<Response<api::ReportProbesResponse>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let from = cluster_field(&req.from_cluster, "from_cluster")?;
        caller.require_cluster(&from, "from_cluster")?;
        if matches!(caller.principal, Principal::Node { .. }) && !caller.principal.is_gateway() {
            return Err(Status::permission_denied(format!(
                "only a gateway reports probes; {} is not one",
                caller.principal
            )));
        }
        self.require_cluster(&from, "from_cluster")?;
        let mut clusters = std::collections::BTreeMap::new();
        let mut errs = Vec::new();
        for (i, r) in req.results.into_iter().enumerate() {
            let c = match cluster_field(&r.cluster, &format!("results[{i}].cluster")) {
                Ok(c) => c,
                Err(e) => {
                    errs.push(e.message().to_string());
                    continue;
                }
            };
            let mut unreachable = Vec::new();
            for (j, s) in r.unreachable_services.into_iter().enumerate() {
                let k: Result<ServiceKey, _> = required_from_api(
                    "",
                    &format!("results[{i}].unreachable_services[{j}]"),
                    Some(s),
                );
                match k {
                    Ok(k) => unreachable.push(k.to_string()),
                    Err(e) => errs.push(e.to_string()),
                }
            }
            clusters.insert(
                c.to_string(),
                crate::traffic::ProbedCluster {
                    gateway: r.gateway_reachable,
                    unreachable,
                },
            );
        }
        if !errs.is_empty() {
            return Err(Status::invalid_argument(errs.join("; ")));
        }
        let report = crate::traffic::ProbeReport {
            clusters,
            at_unix_ms: crate::registry::now_unix_ms(),
        };
        let rev = self
            .registry
            .put_probes(&from, &report)
            .await
            .map_err(|e| store_status(&e))?;
        Ok(Response::new(api::ReportProbesResponse { revision: rev }))
    }
}
