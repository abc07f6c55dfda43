//! The routing table: which local endpoints serve a server name.
//!
//! A [`Table`] is an immutable snapshot read once per connection (one
//! `ArcSwap` load, one hash lookup). It is built by [`Builder`] from the
//! federation's view of the mesh; persistent maps (`imbl`) make publishing a
//! new snapshot after a delta cost only the entries the delta touched.
//!
//! Only services exported from this cluster get routes. A subset in the SNI
//! selects the endpoints labelled `version: <subset>` (Istio's convention
//! for subsets; DestinationRule subsets arrive with the agent's policy work).

use crate::config::Balance;
use mesh_core::cluster::ClusterInfo;
use mesh_core::endpoint::{Endpoint, EndpointKey, Health};
use mesh_core::name::ClusterName;
use mesh_core::service::ServiceKey;
use mesh_core::sni::SniName;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Consecutive connect failures that eject an endpoint (Envoy's
/// consecutive_5xx default is 5; connect failures are its TCP analogue).
const EJECT_AFTER: u32 = 5;
/// First ejection time; each further ejection of the same endpoint adds as
/// much again, up to [`MAX_EJECTION`] (Envoy: base 30 s, max 300 s).
const BASE_EJECTION: Duration = Duration::from_secs(30);
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Live counters of one endpoint, shared by every snapshot that lists it.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Connections open to it now.
    pub active: AtomicU32,
    /// Connect failures since the last success.
    failures: AtomicU32,
    /// Times it has been ejected.
    ejections: AtomicU32,
    /// Until when it is ejected, in ms since [`epoch`]; 0 when not.
    ejected_until_ms: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl EndpointStats {
    /// Is it ejected now?
    pub fn ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Records a successful connect.
    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Records a failed connect; returns true if this failure ejected it.
    pub fn failure(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < EJECT_AFTER {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        let k = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let d = (BASE_EJECTION * k).min(MAX_EJECTION);
        let until = now_ms() + u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        true
    }
}

/// One endpoint a route can send to.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Its live counters.
    pub stats: Arc<EndpointStats>,
}

/// The endpoints behind one route.
#[derive(Debug)]
pub struct Backends {
    /// Label for logs and metrics: `namespace/name` or the static server name.
    pub service: Arc<str>,
    /// Healthy endpoints, in a stable order.
    pub endpoints: Vec<Backend>,
    /// Endpoint indexes by their `version` label, for subsets.
    by_version: HashMap<String, Vec<usize>>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

impl Backends {
    fn new(service: Arc<str>, endpoints: Vec<(Backend, Option<String>)>) -> Self {
        let mut by_version: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, (_, v)) in endpoints.iter().enumerate() {
            if let Some(v) = v {
                by_version.entry(v.clone()).or_default().push(i);
            }
        }
        Self {
            service,
            endpoints: endpoints.into_iter().map(|(b, _)| b).collect(),
            by_version,
            next: AtomicUsize::new(0),
        }
    }

    /// Indexes of the endpoints in `subset` (all when `None`); `None` when
    /// the subset has no endpoint.
    pub fn candidates(&self, subset: Option<&str>) -> Option<Candidates<'_>> {
        match subset {
            None if !self.endpoints.is_empty() => Some(Candidates::All(self.endpoints.len())),
            None => None,
            Some(s) => self.by_version.get(s).map(|v| Candidates::Some(v)),
        }
    }

    /// Picks an endpoint among `c`, skipping `tried` (a bit set of indexes
    /// below 64; beyond that, retries may repeat) and ejected endpoints
    /// unless every candidate is ejected (then ejection is ignored, as
    /// Envoy's panic threshold does, rather than failing every connection).
    pub fn pick(&self, c: &Candidates<'_>, balance: Balance, tried: u64) -> Option<usize> {
        let n = c.len();
        let untried = |i: usize| i >= 64 || tried & (1 << i) == 0;
        let usable = |i: usize| untried(i) && !self.endpoints[i].stats.ejected();
        // Fast path, every first attempt without ejections: no allocation.
        if tried == 0 && n > 0 {
            let pick = match balance {
                Balance::RoundRobin => c.get(self.next.fetch_add(1, Ordering::Relaxed) % n),
                Balance::LeastRequest if n == 1 => c.get(0),
                Balance::LeastRequest => {
                    let (a, b) = two_distinct(n);
                    self.less_loaded(c.get(a), c.get(b))
                }
            };
            if !self.endpoints[pick].stats.ejected() {
                return Some(pick);
            }
        }
        let mut pool: Vec<usize> = (0..n).map(|k| c.get(k)).filter(|&i| usable(i)).collect();
        if pool.is_empty() {
            // Every candidate is ejected: ignore ejection rather than refuse
            // all traffic (Envoy's panic threshold does the same).
            pool = (0..n).map(|k| c.get(k)).filter(|&i| untried(i)).collect();
        }
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            len => Some(match balance {
                Balance::RoundRobin => pool[self.next.fetch_add(1, Ordering::Relaxed) % len],
                Balance::LeastRequest => {
                    let (a, b) = two_distinct(len);
                    self.less_loaded(pool[a], pool[b])
                }
            }),
        }
    }

    /// Of two endpoints, the one with fewer open connections (the first on a tie).
    fn less_loaded(&self, a: usize, b: usize) -> usize {
        let load = |i: usize| self.endpoints[i].stats.active.load(Ordering::Relaxed);
        if load(b) < load(a) {
            b
        } else {
            a
        }
    }
}

/// Two distinct random indexes below `n` (n >= 2): power of two choices.
fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    (a, b)
}

/// The endpoints a connection may use: all, or a subset's indexes.
#[derive(Debug)]
pub enum Candidates<'a> {
    /// Every endpoint, `0..n`.
    All(usize),
    /// These indexes.
    Some(&'a [usize]),
}

impl Candidates<'_> {
    fn len(&self) -> usize {
        match self {
            Self::All(n) => *n,
            Self::Some(v) => v.len(),
        }
    }

    fn get(&self, k: usize) -> usize {
        match self {
            Self::All(_) => k,
            Self::Some(v) => v[k],
        }
    }
}

/// Why a server name has no route. Each is counted and closes the
/// connection with no bytes sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// The name is neither a static route nor an AUTO_PASSTHROUGH name.
    MalformedSni,
    /// No such service here.
    UnknownService,
    /// The service runs here but is not exported.
    NotExported,
    /// The service (or subset) has no healthy endpoint on that port.
    NoHealthyEndpoint,
}

/// A routing snapshot.
#[derive(Clone, Default)]
pub struct Table {
    /// Version (registry revision) the snapshot reflects; 0 for static only.
    pub version: i64,
    services: imbl::HashMap<(ServiceKey, u16), Arc<Backends>>,
    /// Local services that are not exported (told apart only for the count).
    unexported: imbl::HashSet<ServiceKey>,
    statics: Arc<HashMap<String, Arc<Backends>>>,
    /// Which cluster a source address belongs to (its endpoints and gateways).
    peers: imbl::HashMap<IpAddr, ClusterName>,
}

impl Table {
    /// Finds the endpoints for a server name.
    pub fn route(&self, server_name: &str) -> Result<(Arc<Backends>, Option<SniName>), NoRoute> {
        let lower;
        let name = if server_name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = server_name.to_ascii_lowercase();
            lower.as_str()
        } else {
            server_name
        };
        if let Some(b) = self.statics.get(name) {
            return Ok((b.clone(), None));
        }
        let sni = SniName::decode(name).map_err(|_| NoRoute::MalformedSni)?;
        match self.services.get(&(sni.service.clone(), sni.port.get())) {
            Some(b) => Ok((b.clone(), Some(sni))),
            None if self.unexported.contains(&sni.service) => Err(NoRoute::NotExported),
            None => Err(NoRoute::UnknownService),
        }
    }

    /// The cluster `ip` belongs to, if known.
    pub fn peer(&self, ip: IpAddr) -> Option<&ClusterName> {
        self.peers.get(&ip)
    }

    /// Number of (service, port) routes.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// No service routes?
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// Builds tables from the federation's view, applying deltas in place.
pub struct Builder {
    cluster: ClusterName,
    table: Table,
    /// Every endpoint of the mesh (for peers), by key.
    endpoints: HashMap<EndpointKey, Endpoint>,
    /// This cluster's endpoints by service.
    local: HashMap<ServiceKey, BTreeMap<EndpointKey, Endpoint>>,
    exports: HashSet<ServiceKey>,
    ports: HashMap<ServiceKey, Vec<u16>>,
    clusters: HashMap<ClusterName, ClusterInfo>,
    stats: HashMap<SocketAddr, Arc<EndpointStats>>,
    /// Addresses each DNS gateway host resolved to, as last set.
    dns_peers: HashMap<String, Vec<IpAddr>>,
}

impl Builder {
    /// A builder for `cluster` with these static routes.
    pub fn new(cluster: ClusterName, statics: &BTreeMap<String, Vec<SocketAddr>>) -> Self {
        let mut stats: HashMap<SocketAddr, Arc<EndpointStats>> = HashMap::new();
        let statics = statics
            .iter()
            .map(|(name, addrs)| {
                let eps = addrs
                    .iter()
                    .map(|a| {
                        let s: Arc<EndpointStats> = stats.entry(*a).or_default().clone();
                        (Backend { addr: *a, stats: s }, None)
                    })
                    .collect();
                (
                    name.clone(),
                    Arc::new(Backends::new(Arc::from(name.as_str()), eps)),
                )
            })
            .collect();
        Self {
            cluster,
            table: Table {
                statics: Arc::new(statics),
                ..Table::default()
            },
            endpoints: HashMap::new(),
            local: HashMap::new(),
            exports: HashSet::new(),
            ports: HashMap::new(),
            clusters: HashMap::new(),
            stats,
            dns_peers: HashMap::new(),
        }
    }

    /// The current snapshot (cheap: persistent maps share structure).
    pub fn table(&self) -> Table {
        self.table.clone()
    }

    /// Forgets everything learned from the federation (a snapshot follows).
    pub fn reset(&mut self) {
        let statics = self.table.statics.clone();
        self.table = Table {
            statics,
            ..Table::default()
        };
        self.endpoints.clear();
        self.local.clear();
        self.exports.clear();
        self.ports.clear();
        self.clusters.clear();
        self.dns_peers.clear();
    }

    /// Sets the version of the next snapshot.
    pub fn set_version(&mut self, v: i64) {
        self.table.version = v;
    }

    /// Adds or replaces a cluster (its gateway IPs become peers of it).
    pub fn upsert_cluster(&mut self, c: ClusterInfo) {
        if let Some(old) = self.clusters.get(&c.name) {
            for ip in gateway_ips(old) {
                self.table.peers.remove(&ip);
            }
        }
        for ip in gateway_ips(&c) {
            self.table.peers.insert(ip, c.name.clone());
        }
        let own = c.name == self.cluster;
        self.clusters.insert(c.name.clone(), c);
        if own {
            self.rebuild_local();
        }
    }

    /// Rebuilds every local service: which endpoints are admitted may have
    /// changed with the gateway's own cluster.
    fn rebuild_local(&mut self) {
        let local: Vec<ServiceKey> = self.local.keys().cloned().collect();
        for svc in &local {
            self.rebuild(svc);
        }
    }

    /// Removes a cluster.
    pub fn remove_cluster(&mut self, name: &ClusterName) {
        if let Some(old) = self.clusters.remove(name) {
            for ip in gateway_ips(&old) {
                self.table.peers.remove(&ip);
            }
        }
        if *name == self.cluster {
            // Without its cluster's rules, no local endpoint is admitted.
            self.rebuild_local();
        }
    }

    /// Gateway host names of remote clusters that need DNS, with their cluster.
    pub fn dns_gateways(&self) -> Vec<(ClusterName, String)> {
        let mut v: Vec<(ClusterName, String)> = self
            .clusters
            .values()
            .filter(|c| c.name != self.cluster)
            .flat_map(|c| {
                c.gateways.iter().filter_map(|g| match &g.host {
                    mesh_core::cluster::GatewayHost::Dns(h) => Some((c.name.clone(), h.clone())),
                    mesh_core::cluster::GatewayHost::Ip(_) => None,
                })
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Records what a gateway host name of `cluster` resolves to; returns
    /// whether the peers changed.
    pub fn set_dns_peer(
        &mut self,
        host: &str,
        cluster: &ClusterName,
        mut ips: Vec<IpAddr>,
    ) -> bool {
        ips.sort();
        if self.dns_peers.get(host) == Some(&ips) {
            return false;
        }
        for old in self.dns_peers.remove(host).unwrap_or_default() {
            if self.table.peers.get(&old) == Some(cluster) {
                self.table.peers.remove(&old);
            }
        }
        for ip in &ips {
            self.table.peers.insert(*ip, cluster.clone());
        }
        self.dns_peers.insert(host.to_string(), ips);
        true
    }

    /// Adds or replaces an endpoint; returns the service to rebuild, if local.
    pub fn upsert_endpoint(&mut self, ep: Endpoint) -> Option<ServiceKey> {
        let key = ep.key();
        if let Some(old) = self.endpoints.remove(&key) {
            self.table.peers.remove(&old.address);
        }
        if ep.cluster != self.cluster {
            self.table.peers.insert(ep.address, ep.cluster.clone());
        }
        let local = ep.cluster == self.cluster;
        let svc = ep.service.clone();
        if local {
            self.local
                .entry(svc.clone())
                .or_default()
                .insert(key.clone(), ep.clone());
        }
        self.endpoints.insert(key, ep);
        local.then_some(svc)
    }

    /// Removes an endpoint; returns the service to rebuild, if local.
    pub fn remove_endpoint(&mut self, key: &EndpointKey) -> Option<ServiceKey> {
        let old = self.endpoints.remove(key)?;
        self.table.peers.remove(&old.address);
        if old.cluster != self.cluster {
            return None;
        }
        if let Some(m) = self.local.get_mut(&key.service) {
            m.remove(key);
            if m.is_empty() {
                self.local.remove(&key.service);
            }
        }
        Some(key.service.clone())
    }

    /// Records an export change; returns the service to rebuild, if local.
    pub fn set_export(
        &mut self,
        svc: ServiceKey,
        cluster: &ClusterName,
        exported: bool,
    ) -> Option<ServiceKey> {
        if cluster != &self.cluster {
            return None;
        }
        if exported {
            self.exports.insert(svc.clone());
        } else {
            self.exports.remove(&svc);
        }
        Some(svc)
    }

    /// Rebuilds the routes of one local service from its endpoints.
    pub fn rebuild(&mut self, svc: &ServiceKey) {
        for port in self.ports.remove(svc).unwrap_or_default() {
            self.table.services.remove(&(svc.clone(), port));
        }
        self.table.unexported.remove(svc);
        let Some(eps) = self.local.get(svc) else {
            return;
        };
        if !self.exports.contains(svc) {
            self.table.unexported.insert(svc.clone());
            return;
        }
        let label: Arc<str> = Arc::from(svc.to_string());
        let mut by_port: BTreeMap<u16, Vec<(Backend, Option<String>)>> = BTreeMap::new();
        // Only addresses this cluster's endpoints may have: never, say, the
        // gateway's own loopback unless the cluster allows local endpoints.
        let own = self.clusters.get(&self.cluster);
        let admitted = |e: &&Endpoint| own.is_some_and(|c| c.admits(e.address).is_ok());
        for ep in eps
            .values()
            .filter(|e| e.health == Health::Healthy)
            .filter(admitted)
        {
            for p in &ep.ports {
                // Connect where the endpoint takes the port (its agent's inbound
                // listener when it has one); route by the service port.
                let addr = SocketAddr::new(ep.address, p.connect_port());
                let stats = self.stats.entry(addr).or_default().clone();
                by_port
                    .entry(p.number.get())
                    .or_default()
                    .push((Backend { addr, stats }, ep.labels.get("version").cloned()));
            }
        }
        // A port whose endpoints are all unhealthy keeps a route with none,
        // so it is refused as "no healthy endpoint", not "unknown".
        for ep in eps.values() {
            for p in &ep.ports {
                by_port.entry(p.number.get()).or_default();
            }
        }
        let ports: Vec<u16> = by_port.keys().copied().collect();
        for (port, backends) in by_port {
            self.table.services.insert(
                (svc.clone(), port),
                Arc::new(Backends::new(label.clone(), backends)),
            );
        }
        self.ports.insert(svc.clone(), ports);
    }
}

impl Builder {
    /// Everything learned from the federation, as one snapshot message (for
    /// the state file).
    pub fn to_snapshot(&self) -> mesh_api::v1::DiscoveryResponse {
        use mesh_api::v1 as api;
        api::DiscoveryResponse {
            version: self.table.version,
            snapshot: Some(api::SnapshotChunk {
                index: 0,
                last: true,
            }),
            clusters: self
                .clusters
                .values()
                .map(|c| api::ClusterState {
                    info: Some(c.into()),
                    ..Default::default()
                })
                .collect(),
            endpoints: self.endpoints.values().map(Into::into).collect(),
            exports: self
                .exports
                .iter()
                .map(|s| api::ExportChange {
                    service: Some(s.into()),
                    cluster: self.cluster.to_string(),
                    exported: true,
                })
                .collect(),
            ..Default::default()
        }
    }
}

fn gateway_ips(c: &ClusterInfo) -> Vec<IpAddr> {
    c.gateways
        .iter()
        .filter_map(|g| match g.host {
            mesh_core::cluster::GatewayHost::Ip(ip) => Some(ip),
            mesh_core::cluster::GatewayHost::Dns(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
