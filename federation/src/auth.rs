//! Who may call the federation's API, and what for.
//!
//! Every connection is authenticated once, at its TLS handshake
//! ([`crate::tls`]): the client certificate, verified against the mesh's
//! trust bundle, makes its [`Principal`]: a node (an agent or a gateway) of
//! the cluster whose intermediate issued the certificate, an operator named
//! by a certificate the root issued for them, or nobody. Every call is then
//! authorized here, by the RPC's full path, before any handler runs:
//! [`rule`] names what each RPC needs, and an RPC it does not list is refused
//! to everyone, so a new RPC cannot ship unguarded. Handlers narrow further
//! with the [`Caller`] this layer puts in the request's extensions: a node
//! acts only for its own cluster and identity.
//!
//! Operators' roles are role bindings kept in the registry
//! (`/fedmesh/v1/rbac/operators/<name>`), changed through the API and
//! audited; they are read at each call (the last ones read serve while the
//! registry is away), so removing a role takes effect at once.

use crate::store::Store;
use mesh_core::identity::Identity;
use mesh_core::name::ClusterName;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::Status;

/// Registry prefix of operators' role bindings.
pub const ROLES_PREFIX: &str = "/fedmesh/v1/rbac/operators/";

/// The path of the SPIFFE ID of an operator, below the trust domain:
/// `spiffe://<td>/fedmesh/operator/<name>`.
pub const OPERATOR_PATH: &str = "/fedmesh/operator/";

/// The service account gateways run as: a node certificate for
/// `ns/fedmesh-system/sa/fedmesh-gateway` is its cluster's gateway.
pub const GATEWAY_NAMESPACE: &str = "fedmesh-system";
/// See [`GATEWAY_NAMESPACE`].
pub const GATEWAY_SERVICE_ACCOUNT: &str = "fedmesh-gateway";

/// Longest reason a client may attach to a change it makes.
pub const MAX_REASON: usize = 256;

/// Longest operator name.
const MAX_OPERATOR_NAME: usize = 63;

/// An operator's role. Each includes `viewer`; `admin` includes all.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads: clusters, services, endpoints, status, weights, policies, trust.
    Viewer,
    /// Weights, drain, undrain, drills.
    Operator,
    /// Apply and delete policy.
    PolicyAdmin,
    /// Join tokens, operator enrollment, trust rotation, the audit log.
    SecurityAdmin,
    /// Everything, including clusters and role bindings.
    Admin,
}

impl Role {
    /// Every role, in order.
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Operator,
        Role::PolicyAdmin,
        Role::SecurityAdmin,
        Role::Admin,
    ];

    /// Its name on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::PolicyAdmin => "policy-admin",
            Role::SecurityAdmin => "security-admin",
            Role::Admin => "admin",
        }
    }

    /// Whether holding `self` grants what `need` grants.
    pub fn grants(self, need: Role) -> bool {
        self == need || self == Role::Admin || need == Role::Viewer
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role {:?}: expected one of {}",
                    s.chars().take(40).collect::<String>(),
                    Role::ALL.map(Role::as_str).join(", ")
                )
            })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks an operator's name: 1 to 63 characters of `a-z 0-9 - . _ @`,
/// starting with a letter or digit.
pub fn check_operator_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_OPERATOR_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._@".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid operator name {:?}: 1 to {MAX_OPERATOR_NAME} characters of a-z, 0-9, '-', '.', '_', '@', starting with a letter or digit",
            name.chars().take(80).collect::<String>()
        ))
    }
}

/// The SPIFFE ID of operator `name` in trust domain `td`.
pub fn operator_id(td: &str, name: &str) -> String {
    format!("spiffe://{td}{OPERATOR_PATH}{name}")
}

/// Who is calling, as the TLS handshake established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No client certificate: may only enroll.
    Anonymous,
    /// An agent or a gateway: its cluster is the one whose intermediate
    /// issued its certificate, its identity the certificate's SPIFFE ID.
    Node {
        /// The cluster.
        cluster: ClusterName,
        /// The workload's identity.
        identity: Identity,
    },
    /// An operator, by the name in the certificate the root issued them.
    Operator {
        /// Their name.
        name: String,
    },
    /// `--insecure-plaintext`: no TLS, so no one can be told apart; every
    /// caller (on loopback only) acts as an admin.
    Insecure,
    /// The federation itself, calling its own services in process (its
    /// Kubernetes custom-resource watch).
    Internal,
}

impl Principal {
    /// Whether this node is its cluster's east-west gateway.
    pub fn is_gateway(&self) -> bool {
        matches!(self, Principal::Node { identity, .. }
            if identity.namespace.as_str() == GATEWAY_NAMESPACE
                && identity.service_account.as_str() == GATEWAY_SERVICE_ACCOUNT)
    }

    /// `anonymous`, `workload`, `gateway`, `operator` or `insecure`: the
    /// label of metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::Node { .. } if self.is_gateway() => "gateway",
            Principal::Node { .. } => "workload",
            Principal::Operator { .. } => "operator",
            Principal::Insecure => "insecure",
            Principal::Internal => "federation",
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("anonymous"),
            Principal::Node { cluster, identity } => {
                write!(f, "{} {identity} (cluster {cluster})", self.kind())
            }
            Principal::Operator { name } => write!(f, "operator {name}"),
            Principal::Insecure => f.write_str("insecure-plaintext caller"),
            Principal::Internal => f.write_str("the federation"),
        }
    }
}

/// What the server knows of a connection: tonic puts it in every request's
/// extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// Who it authenticated as.
    pub principal: Principal,
}

/// The authorized caller of one request, for handlers that narrow further.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who.
    pub principal: Principal,
    /// An operator's roles at the time of the call.
    pub roles: BTreeSet<Role>,
}

impl Caller {
    /// The caller of a request: put there by [`AuthzLayer`]; a request that
    /// did not pass through it (an in-process call) is the federation's own.
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::internal)
    }

    /// The federation itself (its Kubernetes watches, its tests' direct calls).
    pub fn internal() -> Caller {
        Caller {
            principal: Principal::Internal,
            roles: BTreeSet::from([Role::Admin]),
        }
    }

    /// Who, as the audit log names them.
    pub fn actor(&self) -> String {
        match &self.principal {
            Principal::Node { identity, .. } => identity.to_string(),
            Principal::Operator { name } => format!("operator:{name}"),
            Principal::Anonymous => "anonymous".into(),
            Principal::Insecure => "insecure-plaintext".into(),
            Principal::Internal => "federation".into(),
        }
    }

    /// Who acted, for the audit log and the records a change leaves
    /// (`set_by`): the authenticated principal, with the client's reason
    /// when it gave one (at most [`MAX_REASON`] characters, refused beyond:
    /// a client names no one but itself).
    pub fn actor_with(&self, reason: &str, field: &str) -> Result<String, Status> {
        let n = reason.chars().count();
        if n > MAX_REASON {
            return Err(Status::invalid_argument(format!(
                "{field}: a reason of at most {MAX_REASON} characters, got {n}"
            )));
        }
        let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
        Ok(if reason.trim().is_empty() {
            self.actor()
        } else {
            format!("{} ({})", self.actor(), reason.trim())
        })
    }

    /// Refuses a node acting for another cluster than its own. Operators
    /// and the insecure caller pass (their rule let them in).
    pub fn require_cluster(&self, cluster: &ClusterName, field: &str) -> Result<(), Status> {
        match &self.principal {
            Principal::Node { cluster: own, .. } if own != cluster => {
                Err(Status::permission_denied(format!(
                    "{field}: a node of cluster {own} may not act for cluster {cluster}"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Refuses a node naming another identity than its certificate's.
    pub fn require_identity(&self, identity: &Identity, field: &str) -> Result<(), Status> {
        match &self.principal {
            Principal::Node { identity: own, .. } if own != identity => {
                Err(Status::permission_denied(format!(
                    "{field}: {own} may not act for identity {identity}"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether this caller holds `role` (operators by their bindings).
    pub fn has(&self, role: Role) -> bool {
        matches!(self.principal, Principal::Insecure | Principal::Internal)
            || self.roles.iter().any(|r| r.grants(role))
    }
}

/// What an RPC needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone: enrollment, whose request carries its own credential (a join
    /// token, a Kubernetes token, or proof of the certificate it renews).
    Enrollment,
    /// An operator holding this role.
    Role(Role),
    /// A node (agent or gateway); the handler checks its cluster and identity.
    Node,
    /// A node, or an operator holding this role.
    NodeOr(Role),
    /// Anyone the handshake authenticated (a node, an operator without
    /// roles): who am I.
    Authenticated,
}

/// What each RPC needs, by its full path. `None`: the RPC is unknown here
/// and refused to everyone.
pub fn rule(path: &str) -> Option<Need> {
    use Need::{Enrollment, Node, NodeOr};
    use Role::{Admin, Operator, PolicyAdmin, SecurityAdmin, Viewer};
    let role = Need::Role;
    let (service, method) = path.strip_prefix("/fedmesh.v1.")?.split_once('/')?;
    Some(match (service, method) {
        ("Identity", "SignCertificate") => Enrollment,
        ("Discovery", "Subscribe") => Node,
        ("Registration", "RegisterCluster" | "RemoveCluster") => role(Admin),
        ("Registration", "Heartbeat") => NodeOr(Admin),
        // Nodes for themselves; an admin for what it registers by hand
        // (a VM's endpoint, an external service).
        (
            "Registration",
            "RegisterEndpoint" | "RenewEndpoint" | "DeregisterEndpoint" | "ReportLoad"
            | "ReportProbes",
        ) => NodeOr(Admin),
        ("Registration", "SetExport") => NodeOr(Operator),
        (
            "Admin",
            "ListClusters" | "ListServices" | "ListEndpoints" | "GetStatus" | "ListPolicies"
            | "GetTrust",
        ) => role(Viewer),
        ("Admin", "WhoAmI") => Need::Authenticated,
        ("Admin", "ApplyPolicies" | "DeletePolicies") => role(PolicyAdmin),
        ("Admin", "CreateJoinToken" | "CreateOperatorToken" | "ListAudit" | "RotateTrust") => {
            role(SecurityAdmin)
        }
        ("Admin", "ListRoleBindings") => role(SecurityAdmin),
        ("Admin", "SetRoleBinding") => role(Admin),
        ("Traffic", "GetWeights" | "ExplainWeights" | "GetRollout") => role(Viewer),
        ("Traffic", "SetWeights" | "ClearWeights" | "Drain") => role(Operator),
        _ => return None,
    })
}

/// An operator's stored role binding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Binding {
    /// The roles held.
    pub roles: BTreeSet<Role>,
    /// Who set them last.
    pub set_by: String,
    /// When, Unix ms.
    pub set_unix_ms: i64,
}

/// Reads operators' role bindings, keeping the last ones read for when the
/// registry is away (static stability, as the rest of the API).
pub struct Roles {
    store: Arc<dyn Store>,
    last: Mutex<HashMap<String, BTreeSet<Role>>>,
}

impl Roles {
    /// Bindings in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// The roles of operator `name` (none when unbound).
    pub async fn of(&self, name: &str) -> Result<BTreeSet<Role>, Status> {
        match self.store.get(&format!("{ROLES_PREFIX}{name}")).await {
            Ok(kv) => {
                let roles = kv
                    .and_then(|kv| serde_json::from_slice::<Binding>(&kv.value).ok())
                    .map(|b| b.roles)
                    .unwrap_or_default();
                self.lock().insert(name.to_string(), roles.clone());
                Ok(roles)
            }
            Err(e) => self.lock().get(name).cloned().ok_or_else(|| {
                Status::unavailable(format!(
                    "cannot read the role bindings of operator {name}: {e}"
                ))
            }),
        }
    }

    /// Sets (`Some`) or removes (empty) the binding of `name`.
    pub async fn set(
        &self,
        name: &str,
        roles: BTreeSet<Role>,
        by: &str,
    ) -> Result<i64, crate::store::Error> {
        let key = format!("{ROLES_PREFIX}{name}");
        let rev = if roles.is_empty() {
            self.store.delete(&key).await?.unwrap_or(0)
        } else {
            let b = Binding {
                roles: roles.clone(),
                set_by: by.to_string(),
                set_unix_ms: crate::registry::now_unix_ms(),
            };
            let value =
                serde_json::to_vec(&b).map_err(|e| crate::store::Error::Backend(e.to_string()))?;
            self.store.put(&key, value, None).await?
        };
        self.lock().insert(name.to_string(), roles);
        Ok(rev)
    }

    /// Every binding, by operator name.
    pub async fn list(&self) -> Result<Vec<(String, Binding)>, crate::store::Error> {
        let r = self.store.range(ROLES_PREFIX).await?;
        Ok(r.kvs
            .iter()
            .filter_map(|kv| {
                let name = kv.key.strip_prefix(ROLES_PREFIX)?.to_string();
                let b = serde_json::from_slice::<Binding>(&kv.value).ok()?;
                Some((name, b))
            })
            .collect())
    }

    /// The registry they are kept in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeSet<Role>>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The decision for one call.
async fn authorize(roles: &Roles, path: &str, peer: Option<&Peer>) -> Result<Caller, Status> {
    let principal = peer.map_or(Principal::Anonymous, |p| p.principal.clone());
    let Some(need) = rule(path) else {
        return Err(Status::permission_denied(format!(
            "{path}: no authorization rule for this method; nobody may call it"
        )));
    };
    let held = match &principal {
        Principal::Operator { name } => roles.of(name).await?,
        Principal::Insecure => BTreeSet::from([Role::Admin]),
        _ => BTreeSet::new(),
    };
    let caller = Caller {
        principal,
        roles: held,
    };
    if matches!(caller.principal, Principal::Insecure | Principal::Internal)
        || need == Need::Enrollment
    {
        return Ok(caller);
    }
    let node = matches!(caller.principal, Principal::Node { .. });
    let ok = match need {
        Need::Enrollment => true,
        Need::Node => node,
        Need::Role(r) => caller.has(r),
        Need::NodeOr(r) => node || caller.has(r),
        Need::Authenticated => !matches!(caller.principal, Principal::Anonymous),
    };
    if ok {
        return Ok(caller);
    }
    let wanted = match need {
        Need::Node => "a workload or gateway certificate of the mesh".to_string(),
        Need::Role(r) => format!("an operator with role {r}"),
        Need::NodeOr(r) => {
            format!("a workload or gateway certificate, or an operator with role {r}")
        }
        Need::Authenticated => "a client certificate of the mesh".to_string(),
        Need::Enrollment => String::new(),
    };
    Err(match &caller.principal {
        Principal::Anonymous => Status::unauthenticated(format!(
            "{path} needs {wanted}; this call presented no client certificate (run `meshctl login`, or give the node its mesh certificate)"
        )),
        p => Status::permission_denied(format!("{path} needs {wanted}; {p} has {}", held_text(&caller))),
    })
}

fn held_text(c: &Caller) -> String {
    if c.roles.is_empty() {
        "no role".into()
    } else {
        format!(
            "role {}",
            c.roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Counts calls by RPC, outcome and principal kind (the admin port's
/// `/metrics`).
pub type CallObserver = Arc<dyn Fn(&str, tonic::Code, &'static str) + Send + Sync>;

/// How much load one caller, and all callers, may put on the API. Rates are
/// per second with bursts of twice that; `0` turns a rate off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Calls per second per authenticated principal.
    pub rate_per_principal: u32,
    /// Anonymous calls (enrollment) per second per source address.
    pub anonymous_rate_per_address: u32,
    /// Unary calls in flight at once, all callers (more wait).
    pub in_flight: usize,
    /// Unary calls in flight at once per principal (more are refused).
    pub in_flight_per_principal: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate_per_principal: 500,
            anonymous_rate_per_address: 50,
            in_flight: 256,
            in_flight_per_principal: 64,
        }
    }
}

/// How long a call waits for a slot among everyone's before it is refused.
const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The limiters behind [`Limits`].
struct Guard {
    limits: Limits,
    rates: Option<governor::DefaultKeyedRateLimiter<String>>,
    anonymous: Option<governor::DefaultKeyedRateLimiter<String>>,
    slots: Arc<tokio::sync::Semaphore>,
    per_principal: Mutex<HashMap<String, usize>>,
    checks: std::sync::atomic::AtomicU64,
}

fn keyed(per_second: u32) -> Option<governor::DefaultKeyedRateLimiter<String>> {
    let rate = std::num::NonZeroU32::new(per_second)?;
    let burst = std::num::NonZeroU32::new(per_second.saturating_mul(2)).unwrap_or(rate);
    Some(governor::RateLimiter::keyed(
        governor::Quota::per_second(rate).allow_burst(burst),
    ))
}

/// A call's hold on its principal's in-flight count.
struct InFlight {
    guard: Arc<Guard>,
    key: String,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self
            .guard
            .per_principal
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Guard {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            rates: keyed(limits.rate_per_principal),
            anonymous: keyed(limits.anonymous_rate_per_address),
            slots: Arc::new(tokio::sync::Semaphore::new(limits.in_flight.max(1))),
            per_principal: Mutex::new(HashMap::new()),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The key a principal's limits are counted under.
    fn key(peer: Option<&Peer>, principal: &Principal) -> Option<String> {
        Some(match principal {
            Principal::Anonymous => format!(
                "address:{}",
                peer.and_then(|p| p.remote)
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default()
            ),
            Principal::Node { cluster, identity } => format!("node:{cluster}/{identity}"),
            Principal::Operator { name } => format!("operator:{name}"),
            Principal::Insecure | Principal::Internal => return None,
        })
    }

    /// Refuses a call over its principal's rate.
    fn rate(&self, key: &str, anonymous: bool) -> Result<(), Status> {
        if self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 4096
            == 4095
        {
            for l in [&self.rates, &self.anonymous].into_iter().flatten() {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
        let (limiter, per_second) = if anonymous {
            (&self.anonymous, self.limits.anonymous_rate_per_address)
        } else {
            (&self.rates, self.limits.rate_per_principal)
        };
        match limiter.as_ref().map(|l| l.check_key(&key.to_string())) {
            Some(Err(_)) => Err(Status::resource_exhausted(format!(
                "rate limit: at most {per_second} calls per second for {key}; slow down and retry"
            ))),
            _ => Ok(()),
        }
    }

    /// A slot for a unary call: its principal's (refused beyond the
    /// limit), then everyone's (waited for, up to [`IN_FLIGHT_WAIT`]).
    async fn slot(self: &Arc<Self>, key: &str) -> Result<InFlight, Status> {
        {
            let mut m = self.per_principal.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(key.to_string()).or_insert(0);
            if *n >= self.limits.in_flight_per_principal {
                let limit = self.limits.in_flight_per_principal;
                if *n == 0 {
                    m.remove(key);
                }
                return Err(Status::resource_exhausted(format!(
                    "{key} has {limit} calls in flight already, the most one caller may"
                )));
            }
            *n += 1;
        }
        let undo = |g: &Arc<Self>| {
            let mut m = g.per_principal.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(key);
                }
            }
        };
        match tokio::time::timeout(IN_FLIGHT_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(InFlight {
                guard: self.clone(),
                key: key.to_string(),
                _slot: permit,
            }),
            _ => {
                undo(self);
                Err(Status::unavailable(
                    "the federation is busy: every call slot stayed taken; retry",
                ))
            }
        }
    }
}

/// The tower layer that authorizes every call before it reaches a service,
/// and bounds the load each caller may put on it.
#[derive(Clone)]
pub struct AuthzLayer {
    roles: Arc<Roles>,
    observe: Option<CallObserver>,
    guard: Arc<Guard>,
}

impl AuthzLayer {
    /// Authorizes with the bindings in `roles` within `limits`; `observe`
    /// counts every call by RPC, code and principal kind.
    pub fn new(roles: Arc<Roles>, limits: Limits, observe: Option<CallObserver>) -> Self {
        Self {
            roles,
            observe,
            guard: Arc::new(Guard::new(limits)),
        }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthzLayer`] makes.
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let peer = req.extensions().get::<Peer>().cloned();
            let admitted = match authorize(&layer.roles, &path, peer.as_ref()).await {
                Ok(caller) => admit(&layer.guard, &path, peer.as_ref(), caller).await,
                Err(status) => Err(status),
            };
            match admitted {
                Ok((caller, slot)) => {
                    let kind = caller.principal.kind();
                    req.extensions_mut().insert(caller);
                    let resp = inner.call(req).await?;
                    drop(slot);
                    if let Some(o) = &layer.observe {
                        o(&path, grpc_code(&resp), kind);
                    }
                    Ok(resp)
                }
                Err(status) => {
                    let kind = peer.map_or("anonymous", |p| p.principal.kind());
                    tracing::info!(
                        rpc = %path,
                        principal = kind,
                        remote = ?req.extensions().get::<Peer>().and_then(|p| p.remote),
                        code = ?status.code(),
                        "call refused: {}",
                        status.message()
                    );
                    if let Some(o) = &layer.observe {
                        o(&path, status.code(), kind);
                    }
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// The limits of an authorized call: its principal's rate, then a slot
/// (unary calls; a Discovery stream is bounded by its connection's streams).
async fn admit(
    guard: &Arc<Guard>,
    path: &str,
    peer: Option<&Peer>,
    caller: Caller,
) -> Result<(Caller, Option<InFlight>), Status> {
    let Some(key) = Guard::key(peer, &caller.principal) else {
        return Ok((caller, None));
    };
    guard.rate(&key, caller.principal == Principal::Anonymous)?;
    if path == "/fedmesh.v1.Discovery/Subscribe" {
        return Ok((caller, None));
    }
    let slot = guard.slot(&key).await?;
    Ok((caller, Some(slot)))
}

/// The status a response carries in its headers (a unary error, or a
/// stream refused before its first message); OK otherwise: a streaming
/// call's final status is in its trailers, which this layer does not wait for.
fn grpc_code(resp: &http::Response<tonic::body::Body>) -> tonic::Code {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_viewer_and_admin_includes_all() {
        for r in Role::ALL {
            assert!(r.grants(Role::Viewer), "{r}");
            assert!(Role::Admin.grants(r), "{r}");
        }
        assert!(!Role::Operator.grants(Role::PolicyAdmin));
        assert!(!Role::PolicyAdmin.grants(Role::SecurityAdmin));
        assert!(!Role::SecurityAdmin.grants(Role::Admin));
        assert!(!Role::Viewer.grants(Role::Operator));
    }

    #[test]
    fn unknown_methods_have_no_rule() {
        assert_eq!(rule("/fedmesh.v1.Admin/Nope"), None);
        assert_eq!(rule("/other.Admin/ListClusters"), None);
        assert_eq!(rule("/fedmesh.v1.Admin"), None);
        assert_eq!(
            rule("/fedmesh.v1.Admin/ListClusters"),
            Some(Need::Role(Role::Viewer))
        );
    }

    #[tokio::test]
    async fn a_principal_holds_at_most_its_share_of_slots() {
        let g = Arc::new(Guard::new(Limits {
            in_flight_per_principal: 2,
            ..Limits::default()
        }));
        let a = g.slot("operator:a").await.unwrap();
        let _b = g.slot("operator:a").await.unwrap();
        let s = g.slot("operator:a").await.err().unwrap();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(
            s.message().contains("operator:a has 2 calls in flight"),
            "{s:?}"
        );
        // Another principal is not held back; a freed slot is taken again.
        let _c = g.slot("operator:c").await.unwrap();
        drop(a);
        let _d = g.slot("operator:a").await.unwrap();
        drop((_b, _d, _c));
        assert!(
            g.per_principal.lock().unwrap().is_empty(),
            "counts are dropped at zero"
        );
    }

    #[test]
    fn operator_names_are_checked() {
        assert!(check_operator_name("alice").is_ok());
        assert!(check_operator_name("ops.bob@example").is_ok());
        for bad in ["", "Alice", "-x", "a/b", &"a".repeat(64)] {
            assert!(check_operator_name(bad).is_err(), "{bad}");
        }
    }
}
