//! Identity: signs workload CSRs for the identity a credential grants.

use super::{cluster_field, store_status};
use crate::audit;
use crate::ca::{Ca, CaError};
use crate::store::Store;
use crate::tokens::{self, TokenError};
use mesh_api::v1 as api;
use mesh_api::v1::identity_server::Identity as IdentityApi;
use mesh_api::v1::sign_certificate_request::Credential;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// An operator's CSR: valid, naming no SAN or exactly `uri`.
fn check_operator_csr(
    csr_pem: &str,
    uri: &str,
) -> Result<rcgen::CertificateSigningRequestParams, String> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| format!("csr_pem: not a valid signed CSR: {e}"))?;
    let names_ok = match csr.params.subject_alt_names.as_slice() {
        [] => true,
        [rcgen::SanType::URI(u)] => u.as_str() == uri,
        _ => false,
    };
    if names_ok {
        Ok(csr)
    } else {
        Err(format!(
            "csr_pem: an operator's CSR names no SAN, or exactly {uri}"
        ))
    }
}

/// The Identity service.
pub struct IdentityService {
    ca: Arc<Ca>,
    store: Arc<dyn Store>,
    kube: crate::kube_auth::KubeAuth,
    operator_ttl: Duration,
    roles: Option<Arc<crate::auth::Roles>>,
}

impl IdentityService {
    /// A service signing with `ca`, checking join tokens in `store` and
    /// Kubernetes tokens with `kube`.
    pub fn new(ca: Arc<Ca>, store: Arc<dyn Store>, kube: crate::kube_auth::KubeAuth) -> Self {
        Self {
            ca,
            store,
            kube,
            operator_ttl: crate::config::ApiSecurity::default().operator_cert_ttl,
            roles: None,
        }
    }

    /// Operators' renewals need a role binding in `roles`.
    pub fn with_roles(mut self, roles: Arc<crate::auth::Roles>) -> Self {
        self.roles = Some(roles);
        self
    }

    /// Operators' certificates live `ttl`.
    pub fn with_operator_ttl(mut self, ttl: Duration) -> Self {
        self.operator_ttl = ttl;
        self
    }

    /// Renews an operator's certificate it proves it holds.
    async fn renew_operator(
        &self,
        csr_pem: &str,
        r: &api::Renewal,
    ) -> Result<Response<api::SignCertificateResponse>, Status> {
        let name = match self
            .ca
            .verify_operator_renewal(&r.chain_pem, csr_pem, &r.signature)
        {
            Ok(n) => n,
            Err(e @ CaError::BadCsr(_)) => {
                return Err(self
                    .refuse("operator renewal", Status::invalid_argument(e.to_string()))
                    .await)
            }
            Err(CaError::IdentityMismatch { granted, .. }) => {
                return Err(self
                    .refuse("operator renewal", Status::unauthenticated(granted))
                    .await)
            }
            Err(e) => return Err(crate::ca::status(&e)),
        };
        // An operator whose roles were all removed keeps no way in.
        if let Some(roles) = &self.roles {
            if roles.of(&name).await?.is_empty() {
                return Err(self
                    .refuse(
                        &crate::auth::operator_id(self.ca.trust_domain().as_str(), &name),
                        Status::permission_denied(format!(
                            "operator {name} has no role: no renewal (an admin binds roles, or creates a new login token)"
                        )),
                    )
                    .await);
            }
        }
        self.sign_operator(csr_pem, &name, "renewal").await
    }

    /// Signs an operator's client certificate for an operator token: the
    /// CSR names no SAN, or exactly the operator's SPIFFE ID.
    async fn operator(
        &self,
        csr_pem: &str,
        token: &str,
    ) -> Result<Response<api::SignCertificateResponse>, Status> {
        let checked = match tokens::check_operator(&*self.store, token).await {
            Ok(c) => c,
            Err(TokenError::Store(e)) => return Err(store_status(&e)),
            Err(e) => {
                return Err(self
                    .refuse(
                        "operator enrollment",
                        Status::unauthenticated(e.to_string()),
                    )
                    .await)
            }
        };
        let name = checked.grant.name.clone();
        let uri = crate::auth::operator_id(self.ca.trust_domain().as_str(), &name);
        // The CSR is checked before the token is spent.
        check_operator_csr(csr_pem, &uri).map_err(Status::invalid_argument)?;
        match tokens::consume(&*self.store, &checked).await {
            Ok(()) => {}
            Err(TokenError::Store(e)) => return Err(store_status(&e)),
            Err(e) => {
                return Err(self
                    .refuse(&uri, Status::unauthenticated(e.to_string()))
                    .await)
            }
        }
        self.sign_operator(csr_pem, &name, "operator token").await
    }

    /// Signs operator `name`'s certificate for the key of `csr_pem`.
    async fn sign_operator(
        &self,
        csr_pem: &str,
        name: &str,
        how: &str,
    ) -> Result<Response<api::SignCertificateResponse>, Status> {
        let uri = crate::auth::operator_id(self.ca.trust_domain().as_str(), name);
        let csr = check_operator_csr(csr_pem, &uri).map_err(Status::invalid_argument)?;
        let issued = self
            .ca
            .sign_direct(&csr.public_key, &uri, &[], self.operator_ttl, true)
            .map_err(|e| crate::ca::status(&e))?;
        let not_after_unix_ms = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        info!(operator = %name, how, not_after_unix_ms, "operator certificate issued");
        audit::record(
            &*self.store,
            "issue",
            &uri,
            &format!("{how}, valid until {not_after_unix_ms} (Unix ms)"),
        )
        .await;
        Ok(Response::new(api::SignCertificateResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle_pem: issued.bundle_pem,
            not_after_unix_ms,
            identity: uri,
            root_sha256: issued.root_sha256,
        }))
    }

    /// Signs for the ServiceAccount a Kubernetes token is (TokenReview by
    /// the cluster's API server). The token itself is never logged nor audited.
    async fn kubernetes(
        &self,
        cluster: &mesh_core::name::ClusterName,
        csr_pem: &str,
        token: &str,
        ttl_seconds: u32,
    ) -> Result<Response<api::SignCertificateResponse>, Status> {
        let identity = match self
            .kube
            .review(cluster, token, self.ca.trust_domain())
            .await
        {
            Ok(id) => id,
            Err(e) => return Err(self.refuse(&format!("cluster {cluster}"), e.status()).await),
        };
        let ttl = (ttl_seconds > 0).then(|| Duration::from_secs(u64::from(ttl_seconds)));
        let issued = match self.ca.sign(cluster, csr_pem, &identity, ttl).await {
            Ok(i) => i,
            Err(e @ (CaError::BadCsr(_) | CaError::IdentityMismatch { .. })) => {
                return Err(self
                    .refuse(&identity.to_string(), crate::ca::status(&e))
                    .await)
            }
            Err(e) => return Err(crate::ca::status(&e)),
        };
        Ok(Response::new(
            self.issued(cluster, &identity, issued, "kubernetes token")
                .await,
        ))
    }

    /// Renews a certificate the caller proves it holds (chain and key).
    async fn renew(
        &self,
        cluster: &mesh_core::name::ClusterName,
        csr_pem: &str,
        r: &api::Renewal,
        ttl_seconds: u32,
    ) -> Result<Response<api::SignCertificateResponse>, Status> {
        let identity = match self
            .ca
            .verify_renewal(cluster, &r.chain_pem, csr_pem, &r.signature)
            .await
        {
            Ok(id) => id,
            Err(
                e @ (CaError::Internal(_) | CaError::Precondition(_) | CaError::Unavailable(_)),
            ) => return Err(crate::ca::status(&e)),
            Err(e @ CaError::BadCsr(_)) => {
                return Err(self
                    .refuse(
                        &format!("cluster {cluster}"),
                        Status::invalid_argument(e.to_string()),
                    )
                    .await)
            }
            Err(CaError::IdentityMismatch { granted, .. }) => {
                return Err(self
                    .refuse(
                        &format!("cluster {cluster}"),
                        Status::unauthenticated(granted),
                    )
                    .await)
            }
        };
        let ttl = (ttl_seconds > 0).then(|| Duration::from_secs(u64::from(ttl_seconds)));
        let issued = self
            .ca
            .sign(cluster, csr_pem, &identity, ttl)
            .await
            .map_err(|e| match e {
                CaError::Internal(_) | CaError::Precondition(_) | CaError::Unavailable(_) => {
                    crate::ca::status(&e)
                }
                CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
                CaError::IdentityMismatch { .. } => Status::permission_denied(e.to_string()),
            })?;
        Ok(Response::new(
            self.issued(cluster, &identity, issued, "renewal").await,
        ))
    }

    async fn issued(
        &self,
        cluster: &mesh_core::name::ClusterName,
        identity: &mesh_core::identity::Identity,
        issued: crate::ca::Issued,
        how: &str,
    ) -> api::SignCertificateResponse {
        let not_after_unix_ms = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        info!(%identity, %cluster, how, not_after_unix_ms, "certificate issued");
        audit::record(
            &*self.store,
            "issue",
            &identity.to_string(),
            &format!("cluster {cluster}, {how}, valid until {not_after_unix_ms} (Unix ms)"),
        )
        .await;
        api::SignCertificateResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle_pem: issued.bundle_pem,
            not_after_unix_ms,
            identity: identity.to_string(),
            root_sha256: issued.root_sha256,
        }
    }

    async fn refuse(&self, subject: &str, status: Status) -> Status {
        warn!(subject, reason = %status.message(), "certificate request refused");
        audit::record(&*self.store, "refuse", subject, status.message()).await;
        status
    }
}

#[tonic::async_trait]
impl IdentityApi for IdentityService {
    async fn sign_certificate(
        &self,
        req: Request<api::SignCertificateRequest>,
    ) -> Result<Response<api::SignCertificateResponse>, Status> {
        let req = req.into_inner();
        match &req.credential {
            Some(Credential::OperatorToken(t)) => return self.operator(&req.csr_pem, t).await,
            // An operator renews by proof of possession (no cluster).
            Some(Credential::Renewal(r)) if req.cluster.is_empty() => {
                return self.renew_operator(&req.csr_pem, r).await
            }
            _ => {}
        }
        let cluster = cluster_field(&req.cluster, "cluster")?;
        let token = match req.credential {
            Some(Credential::JoinToken(t)) => t,
            Some(Credential::Renewal(r)) => {
                return self
                    .renew(&cluster, &req.csr_pem, &r, req.ttl_seconds)
                    .await
            }
            Some(Credential::KubernetesToken(t)) => {
                return self
                    .kubernetes(&cluster, &req.csr_pem, &t, req.ttl_seconds)
                    .await
            }
            Some(Credential::OperatorToken(_)) | None => {
                return Err(self
                    .refuse(
                        &format!("cluster {cluster}"),
                        Status::unauthenticated(
                            "credential: a join token or a renewal is required",
                        ),
                    )
                    .await)
            }
        };
        let checked = match tokens::check(&*self.store, &token, &cluster).await {
            Ok(c) => c,
            Err(TokenError::Store(e)) => return Err(store_status(&e)),
            Err(e) => {
                return Err(self
                    .refuse(
                        &format!("cluster {cluster}"),
                        Status::unauthenticated(e.to_string()),
                    )
                    .await)
            }
        };
        let identity = checked.grant.identity.clone();
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(req.ttl_seconds)));
        let issued = match self.ca.sign(&cluster, &req.csr_pem, &identity, ttl).await {
            Ok(i) => i,
            Err(e @ CaError::BadCsr(_)) => {
                return Err(self
                    .refuse(
                        &identity.to_string(),
                        Status::invalid_argument(e.to_string()),
                    )
                    .await)
            }
            Err(e @ CaError::IdentityMismatch { .. }) => {
                return Err(self
                    .refuse(
                        &identity.to_string(),
                        Status::permission_denied(e.to_string()),
                    )
                    .await)
            }
            Err(
                e @ (CaError::Internal(_) | CaError::Precondition(_) | CaError::Unavailable(_)),
            ) => return Err(crate::ca::status(&e)),
        };
        match tokens::consume(&*self.store, &checked).await {
            Ok(()) => {}
            Err(TokenError::Store(e)) => return Err(store_status(&e)),
            Err(e) => {
                return Err(self
                    .refuse(
                        &identity.to_string(),
                        Status::unauthenticated(e.to_string()),
                    )
                    .await)
            }
        }
        Ok(Response::new(
            self.issued(&cluster, &identity, issued, "join token").await,
        ))
    }
}
