//! Admin: read-only views for operators.

use super::invalid;
use crate::grpc::discovery::Subscribers;
use crate::state::Shared;
use mesh_api::v1 as api;
use mesh_api::v1::admin_server::Admin;
use mesh_core::convert::required_from_api;
use mesh_core::service::ServiceKey;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The Admin service.
pub struct AdminService {
    shared: Arc<Shared>,
    subscribers: Arc<Subscribers>,
}

impl AdminService {
    /// A service reading `shared`.
    pub fn new(shared: Arc<Shared>, subscribers: Arc<Subscribers>) -> Self {
        Self {
            shared,
            subscribers,
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_clusters(
        &self,
        _: Request<api::ListClustersRequest>,
    ) -> Result<Response<api::ListClustersResponse>, Status> {
        let st = self.shared.read();
        Ok(Response::new(api::ListClustersResponse {
            clusters: st.clusters(),
            revision: st.revision(),
        }))
    }

    async fn list_services(
        &self,
        _: Request<api::ListServicesRequest>,
    ) -> Result<Response<api::ListServicesResponse>, Status> {
        let st = self.shared.read();
        Ok(Response::new(api::ListServicesResponse {
            services: st.services(),
            revision: st.revision(),
        }))
    }

    async fn list_endpoints(
        &self,
        req: Request<api::ListEndpointsRequest>,
    ) -> Result<Response<api::ListEndpointsResponse>, Status> {
        let svc: ServiceKey =
            required_from_api("", "service", req.into_inner().service).map_err(|e| invalid(&e))?;
        let st = self.shared.read();
        if !st.has_service(&svc) {
            return Err(Status::not_found(format!(
                "service {svc} has no endpoints and is not exported"
            )));
        }
        Ok(Response::new(api::ListEndpointsResponse {
            endpoints: st.endpoints_of(&svc).map(Into::into).collect(),
            revision: st.revision(),
        }))
    }

    async fn get_status(
        &self,
        _: Request<api::GetStatusRequest>,
    ) -> Result<Response<api::GetStatusResponse>, Status> {
        let health = self.shared.health();
        let st = self.shared.read();
        Ok(Response::new(api::GetStatusResponse {
            registry: self.shared.kind().to_string(),
            registry_reachable: health.reachable,
            degraded_reason: health.reason,
            revision: st.revision(),
            invalid_entries: st
                .invalid()
                .iter()
                .map(|(k, r)| api::InvalidEntry {
                    key: k.clone(),
                    reason: r.clone(),
                })
                .collect(),
            subscribers: self
                .subscribers
                .list()
                .into_iter()
                .map(|s| api::Subscriber {
                    node_id: s.node_id,
                    cluster: s.cluster,
                    kind: s.kind,
                    sent_version: s.sent_version,
                    acked_version: s.acked_version,
                    nack_version: s.nack.as_ref().map_or(0, |n| n.0),
                    nack_reason: s.nack.map(|n| n.1).unwrap_or_default(),
                })
                .collect(),
        }))
    }
}
