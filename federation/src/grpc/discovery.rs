//! Discovery: a snapshot on subscribe, then deltas, each with the registry
//! revision as its version; the subscriber ACKs or NACKs each.

use super::cluster_field;
use crate::state::Shared;
use mesh_api::v1 as api;
use mesh_api::v1::discovery_request::Request as Req;
use mesh_api::v1::discovery_server::Discovery;
use mesh_core::policy::{select_sidecar, Document, Kind, Sidecar, Spec};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

/// Messages queued per subscriber before the sender waits. A snapshot is
/// sent chunk by chunk through this queue, so it bounds memory per slow
/// subscriber to a few chunks.
const SEND_QUEUE: usize = 2;

/// What this replica knows of one subscriber, for `meshctl status`.
#[derive(Debug, Clone, Default)]
pub struct SubscriberInfo {
    /// Node id it gave.
    pub node_id: String,
    /// Its cluster.
    pub cluster: String,
    /// Agent, gateway or CLI.
    pub kind: i32,
    /// Last version sent.
    pub sent_version: i64,
    /// Last version ACKed.
    pub acked_version: i64,
    /// Last NACK: version and reason.
    pub nack: Option<(i64, String)>,
    /// The root its own certificate chains to, as it last reported.
    pub certificate_root: String,
    /// When it last ACKed (Unix ms).
    pub acked_unix_ms: i64,
}

/// Every replica's subscribers as this one knows them: its own, live, and
/// the others' from the rows they publish in the registry.
pub fn all_subscribers(
    local: &Subscribers,
    replica: &str,
    st: &crate::state::State,
) -> Vec<api::Subscriber> {
    let mine = crate::replicas::key_segment(replica);
    let own = local.list().into_iter().map(|s| api::Subscriber {
        node_id: s.node_id,
        cluster: s.cluster,
        kind: s.kind,
        sent_version: s.sent_version,
        acked_version: s.acked_version,
        acked_unix_ms: s.acked_unix_ms,
        nack_version: s.nack.as_ref().map_or(0, |n| n.0),
        nack_reason: s.nack.map(|n| n.1).unwrap_or_default(),
        replica: mine.clone(),
    });
    let remote = st
        .replica_subscribers()
        .filter(|(r, _)| *r != mine)
        .map(|(r, row)| api::Subscriber {
            node_id: row.node_id.clone(),
            cluster: row.cluster.clone(),
            kind: row.kind,
            sent_version: row.sent_version,
            acked_version: row.acked_version,
            acked_unix_ms: row.acked_unix_ms,
            nack_version: row.nack_version,
            nack_reason: row.nack_reason.clone(),
            replica: r.to_string(),
        });
    own.chain(remote).collect()
}

/// Subscribers of this replica, by connection id.
#[derive(Default)]
pub struct Subscribers {
    next: std::sync::atomic::AtomicU64,
    map: Mutex<BTreeMap<u64, SubscriberInfo>>,
}

impl Subscribers {
    fn update(&self, id: u64, f: impl FnOnce(&mut SubscriberInfo)) {
        if let Some(s) = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            f(s);
        }
    }

    /// Everyone subscribed now, by connection id.
    pub fn snapshot(&self) -> Vec<(u64, SubscriberInfo)> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, s)| (*id, s.clone()))
            .collect()
    }

    /// Everyone subscribed now.
    pub fn list(&self) -> Vec<SubscriberInfo> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Removes a subscriber when its stream ends, however it ends.
struct SubscriberGuard {
    subs: Arc<Subscribers>,
    id: u64,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.subs
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The Discovery service.
pub struct DiscoveryService {
    shared: Arc<Shared>,
    subscribers: Arc<Subscribers>,
}

impl DiscoveryService {
    /// A service serving `shared`.
    pub fn new(shared: Arc<Shared>, subscribers: Arc<Subscribers>) -> Self {
        Self {
            shared,
            subscribers,
        }
    }
}

type ResponseStream =
    Pin<Box<dyn futures::Stream<Item = Result<api::DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type SubscribeStream = ResponseStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<api::DiscoveryRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = crate::auth::Caller::of(&req);
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("stream closed before the subscribe message")
        })?;
        let Some(Req::Subscribe(sub)) = first.request else {
            return Err(Status::invalid_argument(
                "request: the first message must be a subscribe",
            ));
        };
        if sub.node_id.is_empty() {
            return Err(Status::invalid_argument("subscribe.node_id: is required"));
        }
        let cluster = cluster_field(&sub.cluster, "subscribe.cluster")?;
        // A node is served as the cluster its certificate names.
        caller.require_cluster(&cluster, "subscribe.cluster")?;
        if let crate::auth::Principal::Node { identity, .. } = &caller.principal {
            let gateway = caller.principal.is_gateway();
            if (sub.kind == api::NodeKind::Gateway as i32) != gateway {
                return Err(Status::permission_denied(format!(
                    "subscribe.kind: {} may not subscribe as a {}",
                    caller.principal,
                    if gateway { "workload" } else { "gateway" }
                )));
            }
            if !gateway && sub.namespace != identity.namespace.as_str() {
                return Err(Status::permission_denied(format!(
                    "subscribe.namespace: {identity} may ask only for namespace {}'s view, not {:?}",
                    identity.namespace,
                    sub.namespace.chars().take(64).collect::<String>()
                )));
            }
        }
        let id = self
            .subscribers
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.subscribers
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                SubscriberInfo {
                    node_id: sub.node_id.clone(),
                    cluster: cluster.to_string(),
                    kind: sub.kind,
                    ..Default::default()
                },
            );
        let guard = SubscriberGuard {
            subs: self.subscribers.clone(),
            id,
        };
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let shared = self.shared.clone();
        let span = tracing::info_span!("subscriber", node.id = %sub.node_id, cluster = %cluster);
        let scope = Scope::new(&sub);
        tokio::spawn(serve(shared, inbound, tx, guard, scope).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Tx = mpsc::Sender<Result<api::DiscoveryResponse, Status>>;

/// What an agent's Sidecar lets it receive. Istio's Sidecar `egress.hosts`
/// scope a workload's config: endpoints and routing documents of other
/// services are not sent to it at all.
#[derive(Default)]
struct Scope {
    /// The agent's namespace; `None` for gateways and tools (everything).
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    /// The Sidecar in force, if any.
    sidecar: Option<Sidecar>,
    /// An agent's cluster: of the weights, it receives only its row.
    cluster: Option<String>,
}

impl Scope {
    fn new(sub: &api::Subscribe) -> Self {
        let agent = sub.kind == api::NodeKind::Agent as i32 && !sub.namespace.is_empty();
        Self {
            namespace: agent.then(|| sub.namespace.clone()),
            labels: sub.labels.clone().into_iter().collect(),
            sidecar: None,
            cluster: (sub.kind == api::NodeKind::Agent as i32).then(|| sub.cluster.clone()),
        }
    }

    /// Re-reads which Sidecar governs the subscriber.
    fn refresh(&mut self, shared: &Shared) {
        let Some(ns) = &self.namespace else { return };
        let st = shared.read();
        let docs: Vec<Document> = st
            .policies()
            .iter()
            .filter(|(k, _)| k.kind == Kind::Sidecar && k.namespace.as_str() == ns)
            .filter_map(|(_, p)| serde_json::from_str(&p.json).ok())
            .filter_map(|v: serde_json::Value| Document::from_json(&v).ok())
            .collect();
        let sidecars = docs.iter().filter_map(|d| match &d.spec {
            Spec::Sidecar(sc) => Some(sc),
            _ => None,
        });
        self.sidecar = select_sidecar(sidecars, &self.labels).cloned();
    }

    fn allows(&self, namespace: &str, fqdn: &str) -> bool {
        match (&self.namespace, &self.sidecar) {
            (Some(own), Some(sc)) => sc.allows(namespace, fqdn, own),
            _ => true,
        }
    }

    /// Does this change touch a Sidecar of the subscriber's namespace?
    fn affected_by(&self, r: &api::DiscoveryResponse) -> bool {
        let Some(ns) = &self.namespace else {
            return false;
        };
        let hit = |kind: &str, n: &str| kind == Kind::Sidecar.as_str() && n == ns;
        r.policies
            .iter()
            .filter_map(|p| p.r#ref.as_ref())
            .chain(r.removed_policies.iter())
            .any(|p| hit(&p.kind, &p.namespace))
    }

    /// The part of `r` the subscriber may receive.
    fn filter(&self, r: &api::DiscoveryResponse) -> api::DiscoveryResponse {
        // An agent gets only its own cluster's row of each service's
        // weights: copy that row, not every caller's (at 10,000 services x
        // 20 clusters the rows dwarf the rest of a snapshot).
        let weights = match &self.cluster {
            Some(own) => r
                .weights
                .iter()
                .map(|w| api::ServiceWeights {
                    service: w.service.clone(),
                    callers: w
                        .callers
                        .iter()
                        .filter(|c| &c.caller == own)
                        .cloned()
                        .collect(),
                })
                .collect(),
            None => r.weights.clone(),
        };
        let mut out = api::DiscoveryResponse {
            version: r.version,
            snapshot: r.snapshot,
            clusters: r.clusters.clone(),
            removed_clusters: r.removed_clusters.clone(),
            endpoints: r.endpoints.clone(),
            removed_endpoints: r.removed_endpoints.clone(),
            exports: r.exports.clone(),
            policies: r.policies.clone(),
            removed_policies: r.removed_policies.clone(),
            trust: r.trust.clone(),
            weights,
            removed_weights: r.removed_weights.clone(),
        };
        if self.sidecar.is_none() {
            return out;
        }
        out.endpoints.retain(|e| {
            e.service.as_ref().is_none_or(|s| {
                self.allows(
                    &s.namespace,
                    &format!("{}.{}.svc.cluster.local", s.name, s.namespace),
                )
            })
        });
        out.policies.retain(|p| {
            let Some(doc) = serde_json::from_str::<serde_json::Value>(&p.json)
                .ok()
                .and_then(|v| Document::from_json(&v).ok())
            else {
                return true;
            };
            match &doc.spec {
                Spec::Sidecar(_) => Some(doc.namespace.as_str()) == self.namespace.as_deref(),
                // Security policies concern workloads, not hosts: those of
                // the subscriber's namespace and the mesh-wide root namespace.
                Spec::AuthorizationPolicy(_)
                | Spec::PeerAuthentication(_)
                | Spec::RequestAuthentication(_) => {
                    Some(doc.namespace.as_str()) == self.namespace.as_deref()
                        || doc.namespace.as_str() == mesh_core::policy::DEFAULT_ROOT_NAMESPACE
                }
                _ => doc.hosts().iter().any(|h| {
                    let ns = h.split('.').nth(1).unwrap_or_default();
                    self.allows(ns, h)
                }),
            }
        });
        out
    }
}

/// Sends the snapshot, then deltas, and records ACKs and NACKs, until either side goes away.
async fn serve(
    shared: Arc<Shared>,
    mut inbound: Streaming<api::DiscoveryRequest>,
    tx: Tx,
    guard: SubscriberGuard,
    mut scope: Scope,
) {
    shared.wait_synced().await;
    let (snapshot, mut deltas) = shared.subscribe();
    scope.refresh(&shared);
    let Some(mut sent) = send_all(&tx, snapshot, &guard, &scope).await else {
        return;
    };
    debug!(version = sent, "snapshot sent");
    loop {
        tokio::select! {
            () = shared.closed() => {
                // Ends the stream so the subscriber reconnects, to another
                // replica if there is one, instead of holding shutdown open.
                let _ = tx.send(Err(Status::unavailable("federation replica is shutting down; reconnect"))).await;
                return;
            }
            d = deltas.recv() => match d {
                Ok(delta) => {
                    if delta.version <= sent {
                        continue; // already in the snapshot we sent
                    }
                    if scope.affected_by(&delta) {
                        // The subscriber's Sidecar changed: what it may see
                        // changed too. A fresh snapshot replaces its state.
                        debug!("Sidecar changed; sending a fresh snapshot in the new scope");
                        let (snapshot, rx) = shared.subscribe();
                        deltas = rx;
                        scope.refresh(&shared);
                        match send_all(&tx, snapshot, &guard, &scope).await {
                            Some(v) => sent = v,
                            None => return,
                        }
                        continue;
                    }
                    sent = delta.version;
                    if tx.send(Ok(scope.filter(&delta))).await.is_err() {
                        return;
                    }
                    guard.subs.update(guard.id, |s| s.sent_version = sent);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "subscriber fell behind; sending a fresh snapshot");
                    let (snapshot, rx) = shared.subscribe();
                    deltas = rx;
                    scope.refresh(&shared);
                    match send_all(&tx, snapshot, &guard, &scope).await {
                        Some(v) => sent = v,
                        None => return,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            m = inbound.message() => match m {
                Ok(Some(api::DiscoveryRequest { request: Some(Req::Ack(a)) })) => {
                    guard.subs.update(guard.id, |s| {
                        s.acked_version = a.version;
                        s.acked_unix_ms = crate::registry::now_unix_ms();
                        s.nack = None;
                        s.certificate_root = a.certificate_root_sha256;
                    });
                }
                Ok(Some(api::DiscoveryRequest { request: Some(Req::Nack(n)) })) => {
                    warn!(version = n.version, reason = %n.reason, "subscriber rejected a config version");
                    guard.subs.update(guard.id, |s| {
                        s.nack = Some((n.version, n.reason.clone()));
                        s.certificate_root = n.certificate_root_sha256.clone();
                    });
                }
                Ok(Some(_)) => {
                    let _ = tx.send(Err(Status::invalid_argument("request: only ack and nack may follow subscribe"))).await;
                    return;
                }
                Ok(None) | Err(_) => {
                    info!("subscriber left");
                    return;
                }
            },
        }
    }
}

/// Sends a snapshot, each message filtered for the subscriber as it goes:
/// the shared snapshot is copied a message at a time, never whole.
async fn send_all(
    tx: &Tx,
    chunks: crate::state::Snapshot,
    guard: &SubscriberGuard,
    scope: &Scope,
) -> Option<i64> {
    let version = chunks.first().map_or(0, |c| c.version);
    for c in chunks.iter() {
        tx.send(Ok(scope.filter(c))).await.ok()?;
    }
    guard.subs.update(guard.id, |s| s.sent_version = version);
    Some(version)
}
