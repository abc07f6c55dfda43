//! The federation's view of the registry: what it serves to subscribers and
//! operators, kept current by [`crate::sync`] and readable while the registry
//! is away (static stability).
//!
//! [`State`] is plain data with pure transitions (apply an event, reload a
//! whole range) that report which names they touched; [`Shared`] wraps it for
//! concurrent use and broadcasts one delta per applied batch.

use crate::registry::{self, Entry, Heartbeat, KeyRef, PolicyKey, StoredPolicy};
use crate::store::{Event, Range, Revision};
use mesh_api::v1 as api;
use mesh_core::cluster::ClusterInfo;
use mesh_core::endpoint::{Endpoint, EndpointKey, Health};
use mesh_core::name::ClusterName;
use mesh_core::service::ServiceKey;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::{broadcast, watch};
use tracing::{error, info, warn};

/// Endpoints per snapshot message. At ~150 bytes an endpoint this keeps a
/// message near 300 KiB, far below gRPC's 4 MiB default limit, while a
/// 100k-endpoint snapshot is still only 50 messages.
pub const SNAPSHOT_CHUNK: usize = 2000;

/// Services' weights per snapshot message: a gateway's message carries
/// every calling cluster's row (20 clusters: ~2 MB at 250 services).
pub const WEIGHTS_CHUNK: usize = 250;

/// Deltas buffered for slow subscribers; one that falls further behind gets a
/// fresh snapshot instead.
const DELTA_BUFFER: usize = 1024;

/// The names a transition touched. The delta is read from the state after
/// the transition, so a name touched twice in one batch is sent once, as it is now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    /// Clusters whose info or liveness may have changed.
    pub clusters: BTreeSet<ClusterName>,
    /// Endpoints upserted or removed.
    pub endpoints: BTreeSet<EndpointKey>,
    /// Exports added or withdrawn.
    pub exports: BTreeSet<(ServiceKey, ClusterName)>,
    /// Policy documents written or deleted.
    pub policies: BTreeSet<PolicyKey>,
    /// The trust bundle changed.
    pub trust: bool,
    /// Services whose computed weights changed.
    pub weights: BTreeSet<ServiceKey>,
    /// Operator weights or drains changed (the leader recomputes).
    pub traffic: bool,
}

impl Touched {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
            && self.endpoints.is_empty()
            && self.exports.is_empty()
            && self.policies.is_empty()
            && !self.trust
            && self.weights.is_empty()
            && !self.traffic
    }
}

/// A policy document in the state: canonical JSON and the revision of its
/// last change.
#[derive(Debug, Clone)]
pub struct PolicyEntry {
    /// Canonical JSON.
    pub json: Arc<str>,
    /// Mod revision.
    pub revision: Revision,
}

/// A leased endpoint whose workload stopped renewing its lease.
#[derive(Debug, Clone)]
pub struct LapsedEndpoint {
    /// The endpoint as stored.
    pub endpoint: Endpoint,
    /// Its lease TTL in milliseconds.
    pub ttl_ms: u64,
    /// Mod revision of its value.
    pub revision: Revision,
    /// Since when its lease is gone (Unix ms); `None` when this replica
    /// found it gone in its first read of the registry.
    pub since_unix_ms: Option<i64>,
}

/// The decoded registry.
#[derive(Debug)]
pub struct State {
    revision: Revision,
    /// Mod revision of every key we interpret, valid or not: a reload diffs against it.
    seen: HashMap<String, Revision>,
    clusters: BTreeMap<ClusterName, ClusterInfo>,
    heartbeats: BTreeMap<ClusterName, Heartbeat>,
    /// When each cluster was last seen to lose its heartbeat (Unix ms).
    unknown_since: HashMap<ClusterName, i64>,
    endpoints: BTreeMap<EndpointKey, Endpoint>,
    /// Endpoints that live on a lease, with its TTL in milliseconds.
    leased: BTreeMap<EndpointKey, u64>,
    /// Endpoints whose lease key is present (their workload renews it).
    alive: BTreeSet<EndpointKey>,
    /// When each endpoint's lease key was last seen to go (Unix ms).
    lapsed_since: HashMap<EndpointKey, i64>,
    exports: BTreeSet<(ServiceKey, ClusterName)>,
    policies: BTreeMap<PolicyKey, PolicyEntry>,
    /// The trust record and the revision of its last change.
    trust: Option<(Arc<crate::trust::TrustRecord>, Revision)>,
    weights: BTreeMap<ServiceKey, Arc<crate::traffic::ComputedWeights>>,
    overrides: BTreeMap<ServiceKey, (crate::traffic::TrafficOverride, Revision)>,
    drains: BTreeMap<ClusterName, crate::traffic::Drain>,
    /// Revision of the last change (set or removal) of each service's
    /// operator weights; a service's entry goes with its computed weights.
    override_changed: BTreeMap<ServiceKey, Revision>,
    /// Revision of the last drain or undrain.
    drain_changed: Revision,
    /// Revision at which each service's computed weights first carried
    /// their current `basis` (later rewrites, slow start's steps, do not
    /// move it).
    weights_revision: BTreeMap<ServiceKey, Revision>,
    loads: BTreeMap<EndpointKey, crate::traffic::LoadReport>,
    probes: BTreeMap<ClusterName, crate::traffic::ProbeReport>,
    /// Every replica's Discovery subscribers, by (replica, connection id).
    subscribers: BTreeMap<(String, String), crate::replicas::SubscriberRow>,
    /// Keys whose values could not be decoded, with the reason.
    invalid: BTreeMap<String, String>,
    /// When this replica started: the "unknown since" of a cluster that never
    /// had a heartbeat while we watched.
    started_unix_ms: i64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            revision: 0,
            seen: HashMap::new(),
            clusters: BTreeMap::new(),
            heartbeats: BTreeMap::new(),
            unknown_since: HashMap::new(),
            endpoints: BTreeMap::new(),
            leased: BTreeMap::new(),
            alive: BTreeSet::new(),
            lapsed_since: HashMap::new(),
            exports: BTreeSet::new(),
            policies: BTreeMap::new(),
            trust: None,
            weights: BTreeMap::new(),
            overrides: BTreeMap::new(),
            drains: BTreeMap::new(),
            override_changed: BTreeMap::new(),
            drain_changed: 0,
            weights_revision: BTreeMap::new(),
            loads: BTreeMap::new(),
            probes: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            invalid: BTreeMap::new(),
            started_unix_ms: registry::now_unix_ms(),
        }
    }
}

impl State {
    /// Revision of the registry this state reflects.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Applies a batch of watch events.
    pub fn apply(&mut self, events: &[Event]) -> Touched {
        let mut t = Touched::default();
        for ev in events {
            match ev {
                Event::Put(kv) => self.put(&kv.key, &kv.value, kv.mod_revision, &mut t),
                Event::Delete { key, mod_revision } => self.delete(key, *mod_revision, &mut t),
            }
            self.revision = self.revision.max(ev.revision());
        }
        t
    }

    /// Replaces the state with a full read of the registry, as a diff: keys
    /// gone from `range` are deleted, new or changed ones are put.
    pub fn reload(&mut self, range: &Range) -> Touched {
        let mut t = Touched::default();
        let fresh: HashMap<&str, Revision> = range
            .kvs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.mod_revision))
            .collect();
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|k| !fresh.contains_key(k.as_str()))
            .cloned()
            .collect();
        for k in gone {
            self.delete(&k, range.revision, &mut t);
        }
        for kv in &range.kvs {
            if self.seen.get(&kv.key) != Some(&kv.mod_revision) {
                self.put(&kv.key, &kv.value, kv.mod_revision, &mut t);
            }
        }
        self.revision = range.revision;
        t
    }

    fn put(&mut self, key: &str, value: &[u8], rev: Revision, t: &mut Touched) {
        let (kref, entry) = registry::decode(key, value);
        if matches!(entry, Entry::Other) {
            return;
        }
        self.seen.insert(key.to_string(), rev);
        if let Entry::Invalid { reason } = entry {
            // A bad value counts as absent: every replica then agrees on the
            // state whatever order it saw the writes in.
            error!(%key, %reason, "skipping malformed registry value");
            self.remove(&kref, rev, t);
            self.invalid.insert(key.to_string(), reason);
            return;
        }
        self.invalid.remove(key);
        match entry {
            Entry::Cluster(c) => {
                t.clusters.insert(c.name.clone());
                self.clusters.insert(c.name.clone(), c);
            }
            Entry::Heartbeat(h) => {
                t.clusters.insert(h.cluster.clone());
                self.unknown_since.remove(&h.cluster);
                self.heartbeats.insert(h.cluster.clone(), h);
            }
            Entry::Endpoint(ep) => {
                let k = ep.key();
                t.endpoints.insert(k.clone());
                match registry::endpoint_lease_ttl_ms(value) {
                    Some(ttl) => {
                        // Written without its lease key (a registration
                        // racing with the leader's sweep): lapsed from now.
                        // In the first read of the registry that is not
                        // seen, only found (see `lapsed_endpoints`).
                        if !self.alive.contains(&k) && self.revision > 0 {
                            self.lapsed_since
                                .entry(k.clone())
                                .or_insert_with(registry::now_unix_ms);
                        }
                        self.leased.insert(k.clone(), ttl);
                    }
                    None => {
                        self.leased.remove(&k);
                        self.lapsed_since.remove(&k);
                    }
                }
                self.endpoints.insert(k, ep);
            }
            Entry::EndpointLease(k, _) => {
                self.lapsed_since.remove(&k);
                self.alive.insert(k);
            }
            Entry::Export(x) => {
                let k = (x.service, x.cluster);
                t.exports.insert(k.clone());
                self.exports.insert(k);
            }
            Entry::Policy(StoredPolicy { key, json }) => {
                t.policies.insert(key.clone());
                self.policies.insert(
                    key,
                    PolicyEntry {
                        json,
                        revision: rev,
                    },
                );
            }
            Entry::Trust(rec) => {
                t.trust = true;
                self.trust = Some((rec, rev));
            }
            Entry::Weights(k, w) => {
                t.weights.insert(k.clone());
                if self.weights.get(&k).is_none_or(|old| old.basis < w.basis) {
                    self.weights_revision.insert(k.clone(), rev);
                }
                self.weights.insert(k, w);
            }
            Entry::Override(k, o) => {
                t.traffic = true;
                self.override_changed.insert(k.clone(), rev);
                self.overrides.insert(k, (o, rev));
            }
            Entry::Drain(c, d) => {
                t.traffic = true;
                self.drain_changed = self.drain_changed.max(rev);
                self.drains.insert(c, d);
            }
            Entry::Load(k, l) => {
                self.loads.insert(k, l);
            }
            Entry::Probes(c, p) => {
                if self.probes.get(&c).map(|o| &o.clusters) != Some(&p.clusters) {
                    t.traffic = true;
                }
                self.probes.insert(c, p);
            }
            Entry::Subscriber(replica, id, row) => {
                self.subscribers.insert((replica, id), row);
            }
            Entry::Other | Entry::Invalid { .. } => {}
        }
    }

    fn delete(&mut self, key: &str, rev: Revision, t: &mut Touched) {
        self.seen.remove(key);
        self.invalid.remove(key);
        if let Ok(kref) = registry::parse_key(key) {
            self.remove(&kref, rev, t);
        }
    }

    fn remove(&mut self, kref: &KeyRef, rev: Revision, t: &mut Touched) {
        match kref {
            KeyRef::Cluster(c) => {
                if self.clusters.remove(c).is_some() {
                    t.clusters.insert(c.clone());
                }
            }
            KeyRef::Heartbeat(c) => {
                if self.heartbeats.remove(c).is_some() {
                    // Liveness is separate from data: the cluster stays, unknown.
                    info!(cluster = %c, "cluster heartbeat lapsed; cluster is now unknown");
                    self.unknown_since
                        .insert(c.clone(), registry::now_unix_ms());
                    t.clusters.insert(c.clone());
                }
            }
            KeyRef::Endpoint(k) => {
                self.leased.remove(k);
                self.lapsed_since.remove(k);
                if self.endpoints.remove(k).is_some() {
                    t.endpoints.insert(k.clone());
                }
            }
            KeyRef::EndpointLease(k) => {
                if self.alive.remove(k) && self.endpoints.contains_key(k) {
                    info!(endpoint = %k, "endpoint lease lapsed: its workload stopped renewing it");
                    self.lapsed_since.insert(k.clone(), registry::now_unix_ms());
                }
            }
            KeyRef::Export(s, c) => {
                let k = (s.clone(), c.clone());
                if self.exports.remove(&k) {
                    t.exports.insert(k);
                }
            }
            KeyRef::Policy(k) => {
                if self.policies.remove(k).is_some() {
                    t.policies.insert(k.clone());
                }
            }
            // Workloads keep the bundle they have: a missing record is an
            // operator's mistake, not a reason to trust nothing.
            KeyRef::Trust => {
                if self.trust.take().is_some() {
                    warn!("the trust record was deleted from the registry; workloads keep their last bundle");
                }
            }
            KeyRef::Weights(k) => {
                self.weights_revision.remove(k);
                if !self.overrides.contains_key(k) {
                    self.override_changed.remove(k);
                }
                if self.weights.remove(k).is_some() {
                    t.weights.insert(k.clone());
                }
            }
            KeyRef::Override(k) => {
                if self.overrides.remove(k).is_some() {
                    t.traffic = true;
                    self.override_changed.insert(k.clone(), rev);
                }
            }
            KeyRef::Drain(c) => {
                if self.drains.remove(c).is_some() {
                    t.traffic = true;
                    self.drain_changed = self.drain_changed.max(rev);
                }
            }
            KeyRef::Load(k) => {
                self.loads.remove(k);
            }
            KeyRef::Probes(c) => {
                if self.probes.remove(c).is_some() {
                    t.traffic = true;
                }
            }
            KeyRef::Subscriber(replica, id) => {
                self.subscribers.remove(&(replica.clone(), id.clone()));
            }
            KeyRef::Other => {}
        }
    }

    /// Computed weights by service.
    pub fn weights(&self) -> &BTreeMap<ServiceKey, Arc<crate::traffic::ComputedWeights>> {
        &self.weights
    }

    /// Revision of the last operator change that bears on `service`'s
    /// weights: its own weights set or cleared, or any drain or undrain.
    pub fn operator_revision(&self, service: &ServiceKey) -> Revision {
        self.override_changed
            .get(service)
            .copied()
            .unwrap_or(0)
            .max(self.drain_changed)
    }

    /// Revision of the last operator change of any service's weights.
    pub fn last_operator_revision(&self) -> Revision {
        self.override_changed
            .values()
            .copied()
            .max()
            .unwrap_or(0)
            .max(self.drain_changed)
    }

    /// Registry revision at which a service's computed weights first
    /// reflected the operator change they reflect now (0: none).
    pub fn weights_revision(&self, service: &ServiceKey) -> Revision {
        self.weights_revision.get(service).copied().unwrap_or(0)
    }

    /// Operator weights by service, with the revision of their setting.
    pub fn overrides(&self) -> &BTreeMap<ServiceKey, (crate::traffic::TrafficOverride, Revision)> {
        &self.overrides
    }

    /// Gateways' probe reports, by probing cluster.
    pub fn probes(&self) -> &BTreeMap<ClusterName, crate::traffic::ProbeReport> {
        &self.probes
    }

    /// Endpoints' load reports.
    pub fn loads(&self) -> &BTreeMap<EndpointKey, crate::traffic::LoadReport> {
        &self.loads
    }

    /// Drained clusters.
    pub fn drains(&self) -> &BTreeMap<ClusterName, crate::traffic::Drain> {
        &self.drains
    }

    /// Every cluster's info.
    pub fn cluster_infos(&self) -> &BTreeMap<ClusterName, ClusterInfo> {
        &self.clusters
    }

    /// When a cluster's heartbeat lapsed (Unix ms), or `None` while live.
    pub fn unknown_since(&self, c: &ClusterName) -> Option<i64> {
        if self.heartbeats.contains_key(c) {
            return None;
        }
        Some(
            self.unknown_since
                .get(c)
                .copied()
                .unwrap_or(self.started_unix_ms),
        )
    }

    /// The services `c` exports.
    pub fn exports_of_cluster(&self, c: &ClusterName) -> Vec<ServiceKey> {
        self.exports
            .iter()
            .filter(|(_, x)| x == c)
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Is the endpoint's lease key present (its workload renews it)?
    pub fn endpoint_alive(&self, k: &EndpointKey) -> bool {
        self.alive.contains(k)
    }

    /// Leased endpoints whose lease is not held, with their TTL, the
    /// revision of their value and since when (Unix ms) the lease is gone
    /// when this replica saw it go.
    pub fn lapsed_endpoints(&self) -> Vec<LapsedEndpoint> {
        self.leased
            .iter()
            .filter(|(k, _)| !self.alive.contains(*k))
            .filter_map(|(k, ttl)| {
                let ep = self.endpoints.get(k)?;
                Some(LapsedEndpoint {
                    endpoint: ep.clone(),
                    ttl_ms: *ttl,
                    revision: *self.seen.get(&registry::endpoint_key(k))?,
                    since_unix_ms: self.lapsed_since.get(k).copied(),
                })
            })
            .collect()
    }

    /// Every endpoint.
    pub fn all_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    /// The Discovery subscribers every replica recorded, with the replica
    /// (its key segment) serving each.
    pub fn replica_subscribers(
        &self,
    ) -> impl Iterator<Item = (&str, &crate::replicas::SubscriberRow)> + '_ {
        self.subscribers
            .iter()
            .map(|((replica, _), row)| (replica.as_str(), row))
    }

    /// The trust record and the revision of its last change.
    pub fn trust(&self) -> Option<(Arc<crate::trust::TrustRecord>, Revision)> {
        self.trust.clone()
    }

    /// Is `c` registered?
    pub fn has_cluster(&self, c: &ClusterName) -> bool {
        self.clusters.contains_key(c)
    }

    /// A cluster with its liveness.
    pub fn cluster_state(&self, c: &ClusterInfo) -> api::ClusterState {
        let (liveness, since) = match self.heartbeats.get(&c.name) {
            Some(h) => (api::Liveness::Live, h.since_unix_ms),
            None => (
                api::Liveness::Unknown,
                self.unknown_since
                    .get(&c.name)
                    .copied()
                    .unwrap_or(self.started_unix_ms),
            ),
        };
        api::ClusterState {
            info: Some(c.into()),
            liveness: liveness as i32,
            since_unix_ms: since,
        }
    }

    /// Every cluster with its liveness, by name.
    pub fn clusters(&self) -> Vec<api::ClusterState> {
        self.clusters
            .values()
            .map(|c| self.cluster_state(c))
            .collect()
    }

    /// Every service that has endpoints or exports, by key.
    pub fn services(&self) -> Vec<api::ServiceState> {
        #[derive(Default)]
        struct Acc {
            clusters: BTreeSet<ClusterName>,
            exported: BTreeSet<ClusterName>,
            total: u32,
            healthy: u32,
        }
        let mut m: BTreeMap<&ServiceKey, Acc> = BTreeMap::new();
        for ep in self.endpoints.values() {
            let a = m.entry(&ep.service).or_default();
            a.clusters.insert(ep.cluster.clone());
            a.total += 1;
            if ep.health == Health::Healthy {
                a.healthy += 1;
            }
        }
        for (s, c) in &self.exports {
            m.entry(s).or_default().exported.insert(c.clone());
        }
        m.into_iter()
            .map(|(k, a)| api::ServiceState {
                key: Some(k.into()),
                clusters: a.clusters.iter().map(ToString::to_string).collect(),
                exported_from: a.exported.iter().map(ToString::to_string).collect(),
                endpoints: a.total,
                healthy_endpoints: a.healthy,
            })
            .collect()
    }

    /// Is `s` known (endpoints or exports)?
    pub fn has_service(&self, s: &ServiceKey) -> bool {
        self.endpoints_of(s).next().is_some() || self.exports.iter().any(|(x, _)| x == s)
    }

    /// One endpoint, by its key.
    pub fn endpoint(&self, k: &EndpointKey) -> Option<&Endpoint> {
        self.endpoints.get(k)
    }

    /// The endpoints of one service, by cluster then id.
    pub fn endpoints_of<'a>(
        &'a self,
        s: &'a ServiceKey,
    ) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints
            .range(EndpointKeyBound::from(s))
            .map(|(_, e)| e)
            .take_while(move |e| &e.service == s)
    }

    /// Policy documents, by kind, namespace and name.
    pub fn policies(&self) -> &BTreeMap<PolicyKey, PolicyEntry> {
        &self.policies
    }

    /// Keys that could not be decoded, with the reason.
    pub fn invalid(&self) -> &BTreeMap<String, String> {
        &self.invalid
    }

    /// Number of endpoints.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// The delta for `t`, read from the current state.
    pub fn delta(&self, t: &Touched) -> api::DiscoveryResponse {
        let mut r = api::DiscoveryResponse {
            version: self.revision,
            ..Default::default()
        };
        for c in &t.clusters {
            match self.clusters.get(c) {
                Some(info) => r.clusters.push(self.cluster_state(info)),
                None => r.removed_clusters.push(c.to_string()),
            }
        }
        for k in &t.endpoints {
            match self.endpoints.get(k) {
                Some(ep) => r.endpoints.push(ep.into()),
                None => r.removed_endpoints.push(k.into()),
            }
        }
        for (s, c) in &t.exports {
            r.exports.push(api::ExportChange {
                service: Some(s.into()),
                cluster: c.to_string(),
                exported: self.exports.contains(&(s.clone(), c.clone())),
            });
        }
        for k in &t.policies {
            match self.policies.get(k) {
                Some(p) => r.policies.push(policy_doc(k, p)),
                None => r.removed_policies.push(k.into()),
            }
        }
        if t.trust {
            r.trust = self.trust.as_ref().map(|(rec, _)| rec.bundle());
        }
        for k in &t.weights {
            match self.weights.get(k) {
                Some(w) => r.weights.push(weights_msg(k, w)),
                None => r.removed_weights.push(k.into()),
            }
        }
        r
    }

    /// The whole state as snapshot messages: clusters, exports, policies
    /// and trust in the first, endpoints [`SNAPSHOT_CHUNK`] at a time, then
    /// weights [`WEIGHTS_CHUNK`] services at a time.
    pub fn snapshot(&self) -> Vec<api::DiscoveryResponse> {
        let mut chunks = Vec::with_capacity(
            2 + self.endpoints.len() / SNAPSHOT_CHUNK + self.weights.len() / WEIGHTS_CHUNK,
        );
        let mut first = api::DiscoveryResponse {
            version: self.revision,
            clusters: self.clusters(),
            exports: self
                .exports
                .iter()
                .map(|(s, c)| api::ExportChange {
                    service: Some(s.into()),
                    cluster: c.to_string(),
                    exported: true,
                })
                .collect(),
            policies: self
                .policies
                .iter()
                .map(|(k, p)| policy_doc(k, p))
                .collect(),
            trust: self.trust.as_ref().map(|(rec, _)| rec.bundle()),
            ..Default::default()
        };
        let mut eps = self.endpoints.values().peekable();
        first.endpoints = eps.by_ref().take(SNAPSHOT_CHUNK).map(Into::into).collect();
        chunks.push(first);
        while eps.peek().is_some() {
            chunks.push(api::DiscoveryResponse {
                version: self.revision,
                endpoints: eps.by_ref().take(SNAPSHOT_CHUNK).map(Into::into).collect(),
                ..Default::default()
            });
        }
        let mut weights = self.weights.iter().peekable();
        while weights.peek().is_some() {
            chunks.push(api::DiscoveryResponse {
                version: self.revision,
                weights: weights
                    .by_ref()
                    .take(WEIGHTS_CHUNK)
                    .map(|(k, w)| weights_msg(k, w))
                    .collect(),
                ..Default::default()
            });
        }
        let n = chunks.len();
        for (i, c) in chunks.iter_mut().enumerate() {
            c.snapshot = Some(api::SnapshotChunk {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                last: i + 1 == n,
            });
        }
        chunks
    }
}

/// The wire form of a service's computed weights.
pub fn weights_msg(k: &ServiceKey, w: &crate::traffic::ComputedWeights) -> api::ServiceWeights {
    api::ServiceWeights {
        service: Some(k.into()),
        callers: w
            .callers
            .iter()
            .map(|(caller, ws)| api::CallerWeights {
                caller: caller.clone(),
                weights: ws.iter().map(|(c, v)| (c.clone(), *v)).collect(),
            })
            .collect(),
    }
}

/// The wire form of a stored policy document.
pub fn policy_doc(k: &PolicyKey, p: &PolicyEntry) -> api::PolicyDocument {
    api::PolicyDocument {
        r#ref: Some(k.into()),
        json: p.json.to_string(),
        revision: p.revision,
    }
}

/// The smallest endpoint key of a service, to start a range scan there.
struct EndpointKeyBound;

impl EndpointKeyBound {
    fn from(s: &ServiceKey) -> std::ops::RangeFrom<EndpointKey> {
        // "0" sorts before every RFC 1123 label ('-' cannot start one), so
        // (s, "0", "0") is at or before every endpoint of s.
        EndpointKey {
            service: s.clone(),
            cluster: "0".parse().expect("\"0\" is a valid cluster name"),
            id: "0".parse().expect("\"0\" is a valid endpoint id"),
        }..
    }
}

/// Is the registry reachable, as the sync loop last saw it?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHealth {
    /// A full read has completed at least once.
    pub synced: bool,
    /// False while the registry is unreachable.
    pub reachable: bool,
    /// Why it is unreachable.
    pub reason: String,
}

/// [`State`] shared between the sync loop and the API handlers.
pub struct Shared {
    state: RwLock<State>,
    /// One message per applied batch. Sent while the write lock is held, so a
    /// subscriber that snapshots under the read lock and then subscribes can
    /// neither miss a delta nor see one twice.
    deltas: broadcast::Sender<Arc<api::DiscoveryResponse>>,
    /// Revision of the state, for read-your-writes waits.
    revision: watch::Sender<Revision>,
    health: watch::Sender<RegistryHealth>,
    /// Set once when the replica shuts down: subscribers end their streams.
    closing: watch::Sender<bool>,
    /// "memory" or "etcd".
    kind: &'static str,
    /// The snapshot of the current state, made for the first subscriber
    /// that needed it and shared by the next ones until the state changes:
    /// a thousand agents reconnecting at once must not make a thousand
    /// copies of a large registry.
    snapshot: Mutex<Option<Snapshot>>,
}

/// Snapshot messages, shared by every subscriber of one state.
pub type Snapshot = Arc<[api::DiscoveryResponse]>;

impl Shared {
    /// An empty view of a registry of `kind`.
    pub fn new(kind: &'static str) -> Arc<Self> {
        let (deltas, _) = broadcast::channel(DELTA_BUFFER);
        let (revision, _) = watch::channel(0);
        let (health, _) = watch::channel(RegistryHealth {
            synced: false,
            reachable: false,
            reason: "not yet synced".into(),
        });
        Arc::new(Self {
            state: RwLock::new(State::default()),
            deltas,
            revision,
            health,
            closing: watch::channel(false).0,
            snapshot: Mutex::new(None),
            kind,
        })
    }

    /// Registry kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Reads the state. Do not hold across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Snapshot and a delta subscription, taken atomically.
    pub fn subscribe(&self) -> (Snapshot, broadcast::Receiver<Arc<api::DiscoveryResponse>>) {
        let st = self.read();
        let rx = self.deltas.subscribe();
        // Under the read lock: the state cannot change (and the cache cannot
        // be cleared) until the snapshot is taken.
        let mut cached = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = cached.get_or_insert_with(|| st.snapshot().into()).clone();
        (snapshot, rx)
    }

    /// Applies watch events and broadcasts the delta.
    pub fn apply(&self, events: &[Event]) {
        let mut st = self.write();
        let t = st.apply(events);
        self.publish(&st, &t);
    }

    /// Applies a full read and broadcasts the difference.
    pub fn reload(&self, range: &Range) {
        let mut st = self.write();
        let t = st.reload(range);
        self.publish(&st, &t);
    }

    fn publish(&self, st: &State, t: &Touched) {
        // Called with the write lock held: the next subscriber snapshots the
        // new state.
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if !t.is_empty() {
            let _ = self.deltas.send(Arc::new(st.delta(t)));
        }
        self.revision.send_replace(st.revision());
    }

    /// The state's revision as it moves.
    pub fn revisions(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    /// Waits until the state reflects `rev`, up to `patience`. Returns whether it does.
    pub async fn wait_for(&self, rev: Revision, patience: std::time::Duration) -> bool {
        let mut rx = self.revision.subscribe();
        let reached = tokio::time::timeout(patience, rx.wait_for(|r| *r >= rev)).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// Records that the registry answered.
    pub fn set_reachable(&self) {
        self.health.send_if_modified(|h| {
            let changed = !h.synced || !h.reachable;
            if changed && h.synced {
                info!("registry reachable again");
            }
            *h = RegistryHealth {
                synced: true,
                reachable: true,
                reason: String::new(),
            };
            changed
        });
    }

    /// Records that the registry is unreachable: we keep serving the last state.
    pub fn set_degraded(&self, reason: String) {
        self.health.send_if_modified(|h| {
            if h.reachable || h.reason != reason {
                warn!(%reason, "registry unreachable; serving the last known state");
                h.reachable = false;
                h.reason = reason;
                return true;
            }
            false
        });
    }

    /// Current registry health.
    pub fn health(&self) -> RegistryHealth {
        self.health.borrow().clone()
    }

    /// Tells every subscriber stream to end: the replica is shutting down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once [`Shared::close`] has been called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Waits until the first full read has completed.
    pub async fn wait_synced(&self) {
        let mut rx = self.health.subscribe();
        let _ = rx.wait_for(|h| h.synced).await;
    }
}
