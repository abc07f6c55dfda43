//! Admin: operators' views, and policy changes (validated here again: the
//! federation never trusts that its client validated).

use super::{invalid, store_status};
use crate::grpc::discovery::Subscribers;
use crate::registry::{PolicyKey, Registry};
use crate::state::{policy_doc, Shared};
use crate::store::{Expect, TxnOutcome, TxnWrite};
use mesh_api::v1 as api;
use mesh_api::v1::admin_server::Admin;
use mesh_core::convert::required_from_api;
use mesh_core::policy::{Document, PolicyError};
use mesh_core::service::ServiceKey;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The Admin service.
pub struct AdminService {
    shared: Arc<Shared>,
    subscribers: Arc<Subscribers>,
    registry: Registry,
    trust_domain: mesh_core::name::TrustDomain,
    ca: Arc<crate::ca::Ca>,
    election: Option<crate::leader::Election>,
    replica: String,
    roles: Arc<crate::auth::Roles>,
    max_token_ttl: Duration,
}

/// Times an apply re-reads and retries when another writer changed one of
/// its documents between its read and its write.
const APPLY_ATTEMPTS: usize = 3;

/// How long a write waits for this replica's state to show it, so that a
/// `list` right after an `apply` sees the change.
const READ_YOUR_WRITES: Duration = Duration::from_secs(5);

impl AdminService {
    /// A service reading `shared` and writing policy through `registry`.
    pub fn new(
        shared: Arc<Shared>,
        subscribers: Arc<Subscribers>,
        registry: Registry,
        ca: Arc<crate::ca::Ca>,
    ) -> Self {
        let roles = Arc::new(crate::auth::Roles::new(registry.store().clone()));
        Self {
            shared,
            subscribers,
            registry,
            trust_domain: ca.trust_domain().clone(),
            ca,
            election: None,
            replica: String::new(),
            roles,
            max_token_ttl: crate::config::ApiSecurity::default().max_token_ttl,
        }
    }

    /// Role bindings read and written through `roles`; tokens live at most
    /// `max_token_ttl`.
    pub fn with_security(
        mut self,
        roles: Arc<crate::auth::Roles>,
        max_token_ttl: Duration,
    ) -> Self {
        self.roles = roles;
        self.max_token_ttl = max_token_ttl;
        self
    }

    /// A token's lifetime: `0` is an hour; more than the ceiling is refused.
    fn token_ttl(&self, seconds: u32) -> Result<Duration, Status> {
        let ttl = match seconds {
            0 => Duration::from_secs(3600).min(self.max_token_ttl),
            s => Duration::from_secs(u64::from(s)),
        };
        if ttl > self.max_token_ttl {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds: {seconds} is longer than this federation allows for a token ({}s, --max-token-ttl)",
                self.max_token_ttl.as_secs()
            )));
        }
        Ok(ttl)
    }

    /// Reports the election in the status.
    pub fn with_election(mut self, replica: &str, election: crate::leader::Election) -> Self {
        self.replica = replica.to_string();
        self.election = Some(election);
        self
    }

    /// The trust record in force and who of this replica's subscribers is
    /// caught up with it.
    async fn trust_status(&self) -> api::TrustStatus {
        // Read first: the state is not held across the registry read.
        let intermediates = self.ca.intermediate_infos().await.unwrap_or_else(|e| {
            tracing::debug!("intermediates not listed: {e}");
            Vec::new()
        });
        let st = self.shared.read();
        let (rec, revision) = match st.trust() {
            Some((rec, rev)) => (rec, rev),
            None => (self.ca.record(), 0),
        };
        let mine = crate::replicas::key_segment(&self.replica);
        let local = self
            .subscribers
            .list()
            .into_iter()
            .filter(|s| s.kind != api::NodeKind::Cli as i32)
            .map(|s| api::TrustSubscriber {
                bundle_current: s.acked_version >= revision,
                node_id: s.node_id,
                cluster: s.cluster,
                kind: s.kind,
                certificate_root_sha256: s.certificate_root,
                replica: mine.clone(),
            });
        // Other replicas' workloads, as they recorded them in the registry.
        let remote = st
            .replica_subscribers()
            .filter(|(r, row)| *r != mine && row.kind != api::NodeKind::Cli as i32)
            .map(|(r, row)| api::TrustSubscriber {
                bundle_current: row.acked_version >= revision,
                node_id: row.node_id.clone(),
                cluster: row.cluster.clone(),
                kind: row.kind,
                certificate_root_sha256: row.certificate_root.clone(),
                replica: r.to_string(),
            });
        api::TrustStatus {
            roots: rec.root_infos(),
            signing_root_sha256: rec.signing.clone(),
            revision,
            stage: rec.stage().as_str().to_string(),
            origin: self.ca.origin.to_string(),
            subscribers: local.chain(remote).collect(),
            intermediates,
        }
    }

    fn require_reachable(&self) -> Result<(), Status> {
        let h = self.shared.health();
        if h.reachable {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "registry unreachable ({}); the federation serves its last known state and refuses writes until it is back",
                h.reason
            )))
        }
    }
}

/// Validates the documents of an apply; every error, one per line.
fn validate(req: &api::ApplyPoliciesRequest) -> Result<Vec<(PolicyKey, String)>, Status> {
    let source = if req.source.is_empty() {
        "<request>"
    } else {
        req.source.as_str()
    };
    if req.documents.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{source}: no documents to apply"
        )));
    }
    if req.documents.len() > crate::store::MAX_TXN_OPS {
        return Err(Status::invalid_argument(format!(
            "{source}: {} documents; one apply takes at most {} (split the file)",
            req.documents.len(),
            crate::store::MAX_TXN_OPS
        )));
    }
    let mut errors: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, d) in req.documents.iter().enumerate() {
        let at = |e: &PolicyError| {
            let mut e = e.clone();
            e.file = source.to_string();
            e.document = i + 1;
            e.to_string()
        };
        let v: serde_json::Value = match serde_json::from_str(&d.json) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{source}: document {}: not valid JSON: {e}", i + 1));
                continue;
            }
        };
        let doc = match Document::from_json(&v) {
            Ok(doc) => doc,
            Err(e) => {
                errors.push(at(&e));
                continue;
            }
        };
        let key = PolicyKey::of(&doc);
        if let Some(r) = &d.r#ref {
            if api::PolicyRef::from(&key) != *r {
                errors.push(format!(
                    "{source}: document {}: ref {}/{}/{} does not match the document ({key})",
                    i + 1,
                    r.kind,
                    r.namespace,
                    r.name
                ));
                continue;
            }
        }
        if !seen.insert(key.clone()) {
            errors.push(format!(
                "{source}: document {} ({key}): appears twice in one apply",
                i + 1
            ));
            continue;
        }
        out.push((key, doc.to_json().to_string()));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Status::invalid_argument(errors.join("\n")))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_trust(
        &self,
        _req: Request<api::GetTrustRequest>,
    ) -> Result<Response<api::TrustStatus>, Status> {
        Ok(Response::new(self.trust_status().await))
    }

    async fn rotate_trust(
        &self,
        req: Request<api::RotateTrustRequest>,
    ) -> Result<Response<api::TrustStatus>, Status> {
        use crate::ca::RotationStep;
        let caller = crate::auth::Caller::of(&req);
        let req = req.into_inner();
        let step = match api::RotationStage::try_from(req.stage) {
            Ok(api::RotationStage::Add) => RotationStep::Add,
            Ok(api::RotationStage::Reissue) => RotationStep::Reissue,
            Ok(api::RotationStage::Remove) => RotationStep::Remove,
            _ => {
                return Err(Status::invalid_argument(
                    "stage: must be one of add, reissue, remove",
                ))
            }
        };
        self.require_reachable()?;
        step.check(self.ca.record().stage())
            .map_err(|e| crate::ca::status(&e))?;
        let before = self.trust_status().await;
        let late = laggards(&before, step);
        if !late.is_empty() && !req.force {
            return Err(Status::failed_precondition(format!(
                "the previous stage has not reached every workload ({} of {}): {}; wait, or pass --force",
                late.len(),
                before.subscribers.len(),
                late.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            )));
        }
        let (rec, rev) = self
            .ca
            .rotate(step)
            .await
            .map_err(|e| crate::ca::status(&e))?;
        let actor = caller.actor_with(&req.actor, "actor")?;
        let mut detail = format!(
            "step {step:?}: stage {}, signing root {}, roots {}",
            rec.stage().as_str(),
            rec.signing,
            rec.fingerprints().join(", ")
        );
        if !late.is_empty() {
            detail.push_str(&format!(
                " (forced past {} workloads not caught up)",
                late.len()
            ));
        }
        crate::audit::record_by(&**self.registry.store(), "rotate", &actor, "trust", &detail).await;
        self.shared.wait_for(rev, READ_YOUR_WRITES).await;
        Ok(Response::new(self.trust_status().await))
    }

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

    async fn apply_policies(
        &self,
        req: Request<api::ApplyPoliciesRequest>,
    ) -> Result<Response<api::ApplyPoliciesResponse>, Status> {
        let actor = crate::auth::Caller::of(&req).actor();
        let req = req.into_inner();
        let docs = validate(&req)?;
        if !req.dry_run {
            self.require_reachable()?;
        }
        let store = self.registry.store();
        for _ in 0..APPLY_ATTEMPTS {
            let mut changes = Vec::with_capacity(docs.len());
            let mut writes = Vec::new();
            for (key, json) in &docs {
                let current = store.get(&key.key()).await.map_err(|e| store_status(&e))?;
                let action = match &current {
                    None => "created",
                    Some(kv) if canonical(&kv.value).as_deref() == Some(json.as_str()) => {
                        "unchanged"
                    }
                    Some(_) => "configured",
                };
                if action != "unchanged" {
                    writes.push(TxnWrite {
                        key: key.key(),
                        expect: Some(
                            current
                                .as_ref()
                                .map_or(Expect::Absent, |kv| Expect::ModRevision(kv.mod_revision)),
                        ),
                        value: Some(json.clone().into_bytes()),
                    });
                }
                changes.push(api::PolicyChange {
                    r#ref: Some(key.into()),
                    action: action.into(),
                });
            }
            if req.dry_run || writes.is_empty() {
                return Ok(Response::new(api::ApplyPoliciesResponse {
                    revision: 0,
                    changes,
                }));
            }
            match store.transact(writes).await.map_err(|e| store_status(&e))? {
                TxnOutcome::Committed(rev) => {
                    self.shared.wait_for(rev, READ_YOUR_WRITES).await;
                    tracing::info!(source = %req.source, revision = rev, documents = docs.len(), "policies applied");
                    for c in changes.iter().filter(|c| c.action != "unchanged") {
                        let r = c.r#ref.clone().unwrap_or_default();
                        crate::audit::record_by(
                            &**store,
                            "policy_apply",
                            &actor,
                            &format!("{} {}/{}", r.kind, r.namespace, r.name),
                            &format!("{} from {} at revision {rev}", c.action, req.source),
                        )
                        .await;
                    }
                    return Ok(Response::new(api::ApplyPoliciesResponse {
                        revision: rev,
                        changes,
                    }));
                }
                TxnOutcome::Conflict { key, .. } => {
                    tracing::info!(%key, "policy changed by another writer during apply; retrying");
                }
            }
        }
        Err(Status::aborted(
            "other writers kept changing these documents; nothing was applied, try again",
        ))
    }

    async fn list_policies(
        &self,
        req: Request<api::ListPoliciesRequest>,
    ) -> Result<Response<api::ListPoliciesResponse>, Status> {
        let req = req.into_inner();
        if !req.kind.is_empty() {
            req.kind
                .parse::<mesh_core::policy::Kind>()
                .map_err(|e| Status::invalid_argument(format!("kind: {e}")))?;
        }
        let st = self.shared.read();
        let documents = st
            .policies()
            .iter()
            .filter(|(k, _)| req.kind.is_empty() || k.kind.as_str() == req.kind)
            .filter(|(k, _)| req.namespace.is_empty() || k.namespace.as_str() == req.namespace)
            .map(|(k, p)| policy_doc(k, p))
            .collect();
        Ok(Response::new(api::ListPoliciesResponse {
            documents,
            revision: st.revision(),
        }))
    }

    async fn delete_policies(
        &self,
        req: Request<api::DeletePoliciesRequest>,
    ) -> Result<Response<api::DeletePoliciesResponse>, Status> {
        let actor = crate::auth::Caller::of(&req).actor();
        let req = req.into_inner();
        if req.refs.is_empty() {
            return Err(Status::invalid_argument("refs: nothing to delete"));
        }
        if req.refs.len() > crate::store::MAX_TXN_OPS {
            return Err(Status::invalid_argument(format!(
                "refs: {} documents; one delete takes at most {} (split it)",
                req.refs.len(),
                crate::store::MAX_TXN_OPS
            )));
        }
        let keys = req
            .refs
            .iter()
            .enumerate()
            .map(|(i, r)| PolicyKey::from_api(r, &format!("refs[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&e))?;
        let mut seen = BTreeSet::new();
        for (i, k) in keys.iter().enumerate() {
            if !seen.insert(k) {
                return Err(Status::invalid_argument(format!(
                    "refs[{i}]: {k} is named twice"
                )));
            }
        }
        self.require_reachable()?;
        let store = self.registry.store();
        let mut writes = Vec::new();
        let mut missing = Vec::new();
        for k in &keys {
            match store.get(&k.key()).await.map_err(|e| store_status(&e))? {
                Some(kv) => writes.push(TxnWrite {
                    key: k.key(),
                    expect: Some(Expect::ModRevision(kv.mod_revision)),
                    value: None,
                }),
                None => missing.push(k.to_string()),
            }
        }
        if !missing.is_empty() {
            return Err(Status::not_found(format!(
                "not found, nothing deleted: {}",
                missing.join(", ")
            )));
        }
        match store.transact(writes).await.map_err(|e| store_status(&e))? {
            TxnOutcome::Committed(rev) => {
                self.shared.wait_for(rev, READ_YOUR_WRITES).await;
                for k in &keys {
                    crate::audit::record_by(
                        &**store,
                        "policy_delete",
                        &actor,
                        &k.to_string(),
                        &format!("deleted at revision {rev}"),
                    )
                    .await;
                }
                Ok(Response::new(api::DeletePoliciesResponse { revision: rev }))
            }
            TxnOutcome::Conflict { key, .. } => Err(Status::aborted(format!(
                "{key} changed while deleting; nothing was deleted, try again"
            ))),
        }
    }

    async fn create_join_token(
        &self,
        req: Request<api::CreateJoinTokenRequest>,
    ) -> Result<Response<api::CreateJoinTokenResponse>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let req = req.into_inner();
        let cluster = super::cluster_field(&req.cluster, "cluster")?;
        let namespace = mesh_core::name::Namespace::new(&req.namespace)
            .map_err(|e| Status::invalid_argument(format!("namespace: {e}")))?;
        let service_account = mesh_core::name::ServiceAccount::new(&req.service_account)
            .map_err(|e| Status::invalid_argument(format!("service_account: {e}")))?;
        let ttl = self.token_ttl(req.ttl_seconds)?;
        self.require_reachable()?;
        let identity = mesh_core::identity::Identity {
            trust_domain: self.trust_domain.clone(),
            namespace,
            service_account,
        };
        let expires_unix_ms = crate::registry::now_unix_ms()
            .saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let grant = crate::tokens::Grant {
            cluster,
            identity: identity.clone(),
            expires_unix_ms,
            single_use: !req.reusable,
        };
        let store = self.registry.store();
        let root = self.ca.serving_root();
        let token = crate::tokens::create(&**store, &grant, ttl, &root)
            .await
            .map_err(|e| store_status(&e))?;
        crate::audit::record_by(
            &**store,
            "token_create",
            &caller.actor(),
            &identity.to_string(),
            &format!(
                "cluster {}, {}, valid {}s",
                grant.cluster,
                if grant.single_use {
                    "single use"
                } else {
                    "reusable"
                },
                ttl.as_secs()
            ),
        )
        .await;
        Ok(Response::new(api::CreateJoinTokenResponse {
            token,
            expires_unix_ms,
            identity: identity.to_string(),
            root_sha256: root,
        }))
    }

    async fn create_operator_token(
        &self,
        req: Request<api::CreateOperatorTokenRequest>,
    ) -> Result<Response<api::CreateOperatorTokenResponse>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let req = req.into_inner();
        crate::auth::check_operator_name(&req.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let ttl = self.token_ttl(req.ttl_seconds)?;
        self.require_reachable()?;
        let expires_unix_ms = crate::registry::now_unix_ms()
            .saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let grant = crate::tokens::OperatorGrant {
            name: req.name.clone(),
            expires_unix_ms,
            created_by: caller.actor(),
        };
        let store = self.registry.store();
        let root = self.ca.serving_root();
        let token = crate::tokens::create_operator(&**store, &grant, ttl, &root)
            .await
            .map_err(|e| store_status(&e))?;
        let identity = crate::auth::operator_id(self.trust_domain.as_str(), &req.name);
        crate::audit::record_by(
            &**store,
            "operator_token_create",
            &caller.actor(),
            &identity,
            &format!("single use, valid {}s", ttl.as_secs()),
        )
        .await;
        Ok(Response::new(api::CreateOperatorTokenResponse {
            token,
            expires_unix_ms,
            identity,
            root_sha256: root,
        }))
    }

    async fn set_role_binding(
        &self,
        req: Request<api::SetRoleBindingRequest>,
    ) -> Result<Response<api::RoleBinding>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let req = req.into_inner();
        crate::auth::check_operator_name(&req.operator)
            .map_err(|e| Status::invalid_argument(format!("operator: {e}")))?;
        if req.roles.len() > crate::auth::Role::ALL.len() {
            return Err(Status::invalid_argument(format!(
                "roles: {} given; there are {} roles",
                req.roles.len(),
                crate::auth::Role::ALL.len()
            )));
        }
        let mut roles = BTreeSet::new();
        for (i, r) in req.roles.iter().enumerate() {
            roles.insert(
                r.parse::<crate::auth::Role>()
                    .map_err(|e| Status::invalid_argument(format!("roles[{i}]: {e}")))?,
            );
        }
        self.require_reachable()?;
        let by = caller.actor();
        self.roles
            .set(&req.operator, roles.clone(), &by)
            .await
            .map_err(|e| store_status(&e))?;
        let names: Vec<String> = roles.iter().map(|r| r.as_str().to_string()).collect();
        crate::audit::record_by(
            &**self.registry.store(),
            "role_binding",
            &by,
            &format!("operator:{}", req.operator),
            &format!(
                "roles {}",
                if names.is_empty() {
                    "removed".to_string()
                } else {
                    names.join(", ")
                }
            ),
        )
        .await;
        Ok(Response::new(api::RoleBinding {
            operator: req.operator,
            roles: names,
            set_by: by,
            set_unix_ms: crate::registry::now_unix_ms(),
        }))
    }

    async fn list_role_bindings(
        &self,
        _: Request<api::ListRoleBindingsRequest>,
    ) -> Result<Response<api::ListRoleBindingsResponse>, Status> {
        let bindings = self
            .roles
            .list()
            .await
            .map_err(|e| store_status(&e))?
            .into_iter()
            .map(|(operator, b)| api::RoleBinding {
                operator,
                roles: b.roles.iter().map(|r| r.as_str().to_string()).collect(),
                set_by: b.set_by,
                set_unix_ms: b.set_unix_ms,
            })
            .collect();
        Ok(Response::new(api::ListRoleBindingsResponse { bindings }))
    }

    async fn who_am_i(
        &self,
        req: Request<api::WhoAmIRequest>,
    ) -> Result<Response<api::WhoAmIResponse>, Status> {
        use crate::auth::Principal;
        let caller = crate::auth::Caller::of(&req);
        let (name, cluster) = match &caller.principal {
            Principal::Node { cluster, identity } => (identity.to_string(), cluster.to_string()),
            Principal::Operator { name } => (name.clone(), String::new()),
            Principal::Anonymous | Principal::Insecure | Principal::Internal => {
                (String::new(), String::new())
            }
        };
        Ok(Response::new(api::WhoAmIResponse {
            kind: caller.principal.kind().to_string(),
            name,
            cluster,
            roles: caller
                .roles
                .iter()
                .map(|r| r.as_str().to_string())
                .collect(),
        }))
    }

    async fn list_audit(
        &self,
        req: Request<api::ListAuditRequest>,
    ) -> Result<Response<api::ListAuditResponse>, Status> {
        let req = req.into_inner();
        if req.page_token.len() > 128 {
            return Err(Status::invalid_argument(format!(
                "page_token: at most 128 characters, got {}",
                req.page_token.len()
            )));
        }
        let limit = match req.limit {
            0 => 100,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let (entries, next) = crate::audit::list(
            &**self.registry.store(),
            req.since_unix_ms,
            &req.page_token,
            limit,
        )
        .await
        .map_err(|e| store_status(&e))?;
        Ok(Response::new(api::ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|e| api::AuditEntry {
                    unix_ms: e.unix_ms,
                    action: e.action,
                    subject: e.subject,
                    detail: e.detail,
                    actor: e.actor,
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_status(
        &self,
        _: Request<api::GetStatusRequest>,
    ) -> Result<Response<api::GetStatusResponse>, Status> {
        let leader = match tokio::time::timeout(
            Duration::from_secs(2),
            self.registry.store().get(crate::leader::LEADER_KEY),
        )
        .await
        {
            Ok(Ok(Some(kv))) => serde_json::from_slice::<crate::leader::LeaderRecord>(&kv.value)
                .map(|r| r.replica)
                .unwrap_or_default(),
            _ => String::new(),
        };
        let term = self
            .election
            .as_ref()
            .and_then(crate::leader::Election::term);
        let health = self.shared.health();
        let st = self.shared.read();
        Ok(Response::new(api::GetStatusResponse {
            leader,
            leading: term.is_some(),
            replica: self.replica.clone(),
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
            subscribers: super::discovery::all_subscribers(&self.subscribers, &self.replica, &st),
        }))
    }
}

/// The canonical JSON of a stored policy value, if it is one.
fn canonical(value: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    Document::from_json(&v)
        .ok()
        .map(|d| d.to_json().to_string())
}

/// Who is not yet where the next rotation step needs them: every
/// subscriber must hold the current bundle before the signing root changes,
/// and every certificate must chain to the signing root before the old root
/// goes.
fn laggards(st: &api::TrustStatus, step: crate::ca::RotationStep) -> Vec<String> {
    use crate::ca::RotationStep;
    st.subscribers
        .iter()
        .filter_map(|s| match step {
            RotationStep::Add => None,
            RotationStep::Reissue if !s.bundle_current => Some(format!(
                "{} has not acknowledged the bundle with the new root",
                s.node_id
            )),
            RotationStep::Remove
                if !s.certificate_root_sha256.is_empty()
                    && s.certificate_root_sha256 != st.signing_root_sha256 =>
            {
                Some(format!(
                    "{} still holds a certificate under root {}",
                    s.node_id,
                    s.certificate_root_sha256.get(..16).unwrap_or_default()
                ))
            }
            RotationStep::Remove if !s.bundle_current => Some(format!(
                "{} has not acknowledged the current bundle",
                s.node_id
            )),
            _ => None,
        })
        .collect()
}
