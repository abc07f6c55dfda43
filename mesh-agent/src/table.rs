//! The agent's view of the mesh, rebuilt from the Discovery stream: clusters,
//! endpoints by service, and the policy documents compiled into routes and
//! traffic policies. Published as one immutable [`Table`] per config
//! version: a request holds the table it started with, so a change never
//! disturbs requests in flight.

use crate::config::Config;
use crate::lb::{self, Algorithm, Outlier};
use crate::metrics::Metrics;
use crate::route::{self, Abort, Dest, DestPolicy, Fault, HeaderOps, Lb, Retries, Route};
use arc_swap::ArcSwap;
use mesh_api::v1 as api;
use mesh_core::cluster::{ClusterInfo, GatewayHost};
use mesh_core::convert::FromApi;
use mesh_core::endpoint::{Endpoint, EndpointKey, Health, Protocol};
use mesh_core::locality::Locality;
use mesh_core::name::{ClusterName, Namespace, SubsetName};
use mesh_core::policy::{self as pol, Document, Kind, RequestAttrs, Spec};
use mesh_core::service::ServiceKey;
use mesh_core::sni::SniName;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Who this agent is, for locality and Sidecar selection.
#[derive(Debug, Clone)]
struct Me {
    cluster: ClusterName,
    /// The cluster's name as a metric label.
    cluster_label: Arc<str>,
    /// The cluster's name as the `x-fedmesh-source-cluster` header value.
    cluster_header: Option<http::HeaderValue>,
    locality: Locality,
    namespace: Namespace,
    labels: BTreeMap<String, String>,
}

/// One endpoint as a request reaches it.
#[derive(Debug, Clone)]
pub struct ResolvedEndpoint {
    /// Where to connect: the endpoint's agent, or its cluster's gateway.
    pub addr: SocketAddr,
    /// TLS server name (the SNI scheme); `None` in plaintext.
    pub sni: Option<Arc<str>>,
    /// Priority seen from this agent ([`crate::locality`]), after the
    /// cluster the federation's weights chose.
    pub tier: u8,
    /// Locality group within the priority, and its weight.
    pub group: u16,
    /// The group's weight.
    pub weight: u32,
    /// Cluster of the endpoint.
    pub cluster: ClusterName,
    /// The same, as a metric label.
    pub cluster_label: Arc<str>,
    /// Reached through its cluster's east-west gateway (`addr` is the gateway's).
    pub via_gateway: bool,
}

/// The endpoints of one destination on one port.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Usable endpoints.
    pub endpoints: Vec<ResolvedEndpoint>,
    /// The port speaks HTTP/2 (http2 or grpc).
    pub h2: bool,
    /// The service port.
    pub port: u16,
    /// How load spreads over priorities and localities.
    pub spread: lb::Spread,
    /// The DestinationRule's traffic policy for this subset and port,
    /// merged once for both.
    pub policy: DestPolicy,
}

/// One published config version.
pub struct Table {
    /// Registry revision it reflects.
    pub version: i64,
    me: Me,
    clusters: HashMap<ClusterName, ClusterInfo>,
    services: HashMap<ServiceKey, Vec<Arc<Endpoint>>>,
    /// Endpoint addresses (service port and target port) by service, for
    /// transparent capture.
    by_addr: HashMap<SocketAddr, ServiceKey>,
    /// HTTP routes of the VirtualService for each host.
    routes: HashMap<ServiceKey, Arc<[Route]>>,
    rules: HashMap<ServiceKey, Arc<pol::DestinationRule>>,
    sidecar: Option<Arc<pol::Sidecar>>,
    /// AuthorizationPolicies that select this workload, by `ns/name`.
    authz: Vec<(String, pol::AuthorizationPolicy)>,
    /// PeerAuthentications of this workload's and the root namespace.
    peer_auth: Vec<(String, pol::PeerAuthentication)>,
    /// JWT rules of the RequestAuthentications that select this workload.
    jwt: Vec<crate::jwt::Rule>,
    /// The federation's weights for calls from this cluster, by service.
    weights: HashMap<ServiceKey, Arc<[(ClusterName, u32)]>>,
    /// What gateway names resolve to now (read per request: an answer that
    /// changes needs no new table).
    dns: Option<mesh_node::dns::Dns>,
    /// Host names requests spelled so far, resolved.
    named: std::sync::RwLock<HashMap<Box<str>, Arc<Named>>>,
    /// Destinations prepared by this version's requests so far.
    prepared: std::sync::RwLock<PreparedMap>,
}

/// A request's host (`Host` or `:authority`, as spelled) resolved once per
/// table version: the service and port it names, and the route straight to
/// the service when no VirtualService routes it.
pub struct Named {
    /// The service.
    pub service: ServiceKey,
    /// The port the host named, if it named one.
    pub port: Option<u16>,
    /// The route when the service has no VirtualService.
    pub direct: Option<Route>,
}

/// At most this many host spellings are kept resolved per table version.
const MAX_NAMED: usize = 1024;

/// Longer spellings are resolved each time, never kept.
const MAX_NAMED_LEN: usize = 260;

/// A destination's subset, port and transport, beside its service.
type PrepKey = (Option<String>, Option<u16>, bool);

/// The destinations prepared, by service.
type PreparedMap = HashMap<ServiceKey, Vec<(PrepKey, Arc<Prepared>)>>;

/// At most this many destinations are kept prepared per table version;
/// past it, a request to another prepares its own and drops it.
const MAX_PREPARED: usize = 1024;

/// A destination (service, subset, port) as every request of one table
/// version reaches it, prepared at its first request and kept while the
/// version lasts: its endpoints as load-balancing candidates with their
/// host statistics, ranked once per cluster the federation's weights may
/// draw, its traffic policy and its metric label. A request draws a
/// cluster and takes that ranking: no endpoint resolution, no allocation.
pub struct Prepared {
    /// The service as a metric label (`ns/name`).
    pub label: Arc<str>,
    /// The port speaks HTTP/2 (http2 or grpc).
    pub h2: bool,
    /// How load spreads over priorities and localities.
    pub spread: lb::Spread,
    /// The DestinationRule's traffic policy for this subset and port.
    pub policy: DestPolicy,
    /// The ranking without a draw (no weights, or none for the clusters
    /// present).
    undrawn: Vec<lb::Candidate<ResolvedEndpoint>>,
    /// One ranking per weighted cluster present, for the draw.
    drawn: Vec<(ClusterName, Vec<lb::Candidate<ResolvedEndpoint>>)>,
    weights: Option<Arc<[(ClusterName, u32)]>>,
    /// The DNS answers it was resolved with: newer ones make it stale.
    dns: Option<Arc<mesh_node::dns::Answers>>,
    /// The host statistics' generation it took them in: a newer one
    /// makes it stale (statistics are shared by every destination).
    hosts: u64,
}

impl Prepared {
    /// The ranking of one request: the federation's weights draw the
    /// cluster whose endpoints come first.
    pub fn draw(&self) -> usize {
        self.weights
            .as_ref()
            .and_then(|w| draw(w, |c| self.drawn.iter().any(|(d, _)| d == c)))
            .and_then(|c| self.drawn.iter().position(|(d, _)| d == c))
            .map_or(0, |i| i + 1)
    }

    /// The candidates of a ranking [`Prepared::draw`] chose.
    pub fn candidates(&self, ranking: usize) -> &[lb::Candidate<ResolvedEndpoint>] {
        match ranking.checked_sub(1).and_then(|i| self.drawn.get(i)) {
            Some((_, c)) => c,
            None => &self.undrawn,
        }
    }
}

/// Priorities per cluster rank: an endpoint's tier is
/// `rank * RANK + priority`, so that every priority of a nearer cluster
/// comes before those of a farther one.
const RANK: u8 = 16;

/// A cluster's rank seen from this agent: 0 the cluster the federation's
/// weights chose for this request; then, as fallbacks (and when no weights
/// are known yet), clusters in this zone, in this region, elsewhere.
fn cluster_rank(me: &Locality, c: &Locality, chosen: bool) -> u8 {
    if chosen {
        0
    } else if me.region != c.region {
        3
    } else if me.zone != c.zone {
        2
    } else {
        1
    }
}

/// A destination cluster drawn by `weights` among those with endpoints
/// (`present`); `None` when none of them has weight.
fn draw(
    weights: &[(ClusterName, u32)],
    present: impl Fn(&ClusterName) -> bool,
) -> Option<&ClusterName> {
    let total: u32 = weights
        .iter()
        .filter(|(c, _)| present(c))
        .map(|(_, w)| *w)
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u32(..total);
    for (c, w) in weights {
        if !present(c) {
            continue;
        }
        if r < *w {
            return Some(c);
        }
        r -= w;
    }
    None
}

impl Table {
    /// A table with nothing in it.
    pub fn empty(cfg: &Config) -> Self {
        Self {
            version: 0,
            me: Me {
                cluster: cfg.cluster.clone(),
                cluster_label: Arc::from(cfg.cluster.as_str()),
                cluster_header: http::HeaderValue::from_str(cfg.cluster.as_str()).ok(),
                locality: cfg.locality.clone(),
                namespace: cfg.service.namespace.clone(),
                labels: cfg.labels.clone(),
            },
            clusters: HashMap::new(),
            services: HashMap::new(),
            by_addr: HashMap::new(),
            routes: HashMap::new(),
            rules: HashMap::new(),
            sidecar: None,
            authz: Vec::new(),
            peer_auth: Vec::new(),
            jwt: Vec::new(),
            weights: HashMap::new(),
            dns: None,
            named: std::sync::RwLock::default(),
            prepared: std::sync::RwLock::default(),
        }
    }

    /// This agent's cluster.
    pub fn cluster(&self) -> &ClusterName {
        &self.me.cluster
    }

    /// This agent's cluster as a metric label.
    pub fn cluster_label(&self) -> &Arc<str> {
        &self.me.cluster_label
    }

    /// This agent's cluster as the `x-fedmesh-source-cluster` value.
    pub fn cluster_header(&self) -> Option<&http::HeaderValue> {
        self.me.cluster_header.as_ref()
    }

    /// The federation's weights for calls from this cluster to `s`.
    pub fn weights(&self, s: &ServiceKey) -> Option<&[(ClusterName, u32)]> {
        self.weights.get(s).map(|w| &w[..])
    }

    /// The JWT rules in force for this workload.
    pub fn jwt_rules(&self) -> &[crate::jwt::Rule] {
        &self.jwt
    }

    /// Istio's authorization for a request to this workload.
    pub fn authorize(&self, req: &dyn pol::AuthzRequest) -> pol::Decision {
        let refs: Vec<(&str, &pol::AuthorizationPolicy)> =
            self.authz.iter().map(|(n, p)| (n.as_str(), p)).collect();
        pol::authorize(&refs, req)
    }

    /// The mTLS mode PeerAuthentications set for this workload's `port`.
    pub fn mtls_mode(&self, port: u16) -> pol::MtlsMode {
        let refs: Vec<(&str, &pol::PeerAuthentication)> = self
            .peer_auth
            .iter()
            .map(|(n, p)| (n.as_str(), p))
            .collect();
        pol::effective_mode(
            &refs,
            pol::DEFAULT_ROOT_NAMESPACE,
            self.me.namespace.as_str(),
            &self.me.labels,
            port,
        )
    }

    /// Does the mesh know `s` (endpoints or a VirtualService)?
    pub fn knows(&self, s: &ServiceKey) -> bool {
        self.services.contains_key(s) || self.routes.contains_key(s)
    }

    /// The service an endpoint address belongs to.
    pub fn service_at(&self, addr: SocketAddr) -> Option<ServiceKey> {
        self.by_addr.get(&addr).cloned()
    }

    /// The service and port of an original destination whose port carries
    /// opaque TCP.
    pub fn tcp_service_at(&self, addr: SocketAddr) -> Option<(ServiceKey, u16)> {
        let svc = self.by_addr.get(&addr)?;
        let eps = self.services.get(svc)?;
        eps.iter()
            .filter(|e| e.address == addr.ip())
            .flat_map(|e| e.ports.iter())
            .find(|p| {
                (p.number.get() == addr.port() || p.connect_port() == addr.port())
                    && p.protocol == Protocol::Tcp
            })
            .map(|p| (svc.clone(), p.number.get()))
    }

    /// The identities the endpoints of the service an SNI names hold (as
    /// registered), or `None` when the name is not the mesh's SNI scheme or
    /// no endpoint lists an identity.
    pub fn identities_for_sni(&self, sni: &str) -> Option<Vec<mesh_core::identity::Identity>> {
        let name = SniName::decode(sni).ok()?;
        let eps = self.services.get(&name.service)?;
        let mut ids: Vec<mesh_core::identity::Identity> =
            eps.iter().filter_map(|e| e.identity.clone()).collect();
        ids.sort();
        ids.dedup();
        (!ids.is_empty()).then_some(ids)
    }

    /// May traffic to destinations outside the mesh pass through? Istio's
    /// default `ALLOW_ANY`, unless the Sidecar says `REGISTRY_ONLY`.
    pub fn allow_any(&self) -> bool {
        self.sidecar
            .as_ref()
            .and_then(|s| s.outbound_traffic_policy.as_ref())
            .is_none_or(|p| p.mode != Some(pol::OutboundMode::RegistryOnly))
    }

    /// Does this workload's Sidecar (if any) let it reach `s`?
    pub fn egress_allows(&self, s: &ServiceKey) -> bool {
        self.sidecar
            .as_ref()
            .is_none_or(|sc| sc.allows(s.namespace.as_str(), &s.host(), self.me.namespace.as_str()))
    }

    /// The route a request takes: the first matching route of the host's
    /// VirtualService, or straight to the service when it has none.
    /// `None`: a VirtualService exists and no route of it matches.
    pub fn route_for(
        &self,
        s: &ServiceKey,
        port: Option<u16>,
        attrs: &dyn RequestAttrs,
    ) -> Option<Cow<'_, Route>> {
        match self.routes.get(s) {
            Some(routes) => routes.iter().find(|r| r.matches(attrs)).map(Cow::Borrowed),
            None => Some(Cow::Owned(direct_route(s, port))),
        }
    }

    /// The service and port a request's host names (`reviews`,
    /// `reviews.default:9080`, `reviews.default.svc.cluster.local`; bare
    /// names in this workload's namespace), when the mesh knows it.
    /// Resolved once per spelling and table version (up to [`MAX_NAMED`]).
    pub fn named(&self, authority: &str) -> Option<Arc<Named>> {
        let full = {
            let cache = self.named.read().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = cache.get(authority) {
                return Some(n.clone());
            }
            cache.len() >= MAX_NAMED
        };
        let (host, port) = split_authority(authority);
        let service = ServiceKey::parse_with_default(host, Some(&self.me.namespace))
            .ok()
            .filter(|s| self.knows(s))?;
        let direct = (!self.routes.contains_key(&service)).then(|| direct_route(&service, port));
        let n = Arc::new(Named {
            service,
            port,
            direct,
        });
        // Kept only for spellings of a sensible length (a host name is at
        // most 253 bytes, a port 6 more): the application chooses them.
        if !full && authority.len() <= MAX_NAMED_LEN {
            let mut cache = self.named.write().unwrap_or_else(|p| p.into_inner());
            if cache.len() < MAX_NAMED {
                cache.insert(authority.into(), n.clone());
            }
        }
        Some(n)
    }

    /// The healthy endpoints of `s` (in `subset`, on `port`) as this agent
    /// reaches them: directly on its own network, through the endpoint
    /// cluster's gateway otherwise (mTLS only). `None`: no such endpoint.
    pub fn endpoints(
        &self,
        s: &ServiceKey,
        subset: Option<&str>,
        port: Option<u16>,
        tls: bool,
    ) -> Option<Resolved> {
        let dns = self.dns.as_ref().map(mesh_node::dns::Dns::answers);
        let mut r = self.unranked(s, subset, port, tls, dns.as_deref())?;
        let chosen = self
            .weights
            .get(s)
            .and_then(|w| draw(w, |c| r.endpoints.iter().any(|e| e.cluster == *c)))
            .cloned();
        for e in &mut r.endpoints {
            e.tier = self.tier(e, chosen.as_ref());
        }
        Some(r)
    }

    /// [`Table::endpoints`] prepared for every request of this version
    /// ([`Prepared`]), with `hosts`' statistics.
    pub fn prepared(
        &self,
        hosts: &lb::Hosts,
        s: &ServiceKey,
        subset: Option<&str>,
        port: Option<u16>,
        tls: bool,
    ) -> Option<Arc<Prepared>> {
        let dns = self.dns.as_ref().map(mesh_node::dns::Dns::answers);
        let generation = hosts.generation();
        let fresh = |p: &Prepared| {
            p.hosts == generation
                && match (&p.dns, &dns) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
        };
        let same = |k: &PrepKey| k.0.as_deref() == subset && k.1 == port && k.2 == tls;
        {
            let cache = self.prepared.read().unwrap_or_else(|p| p.into_inner());
            if let Some((_, p)) = cache
                .get(s)
                .and_then(|v| v.iter().find(|(k, p)| same(k) && fresh(p)))
            {
                return Some(p.clone());
            }
        }
        let r = self.unranked(s, subset, port, tls, dns.as_deref())?;
        let generation = hosts.generation();
        let stats = hosts.get_all(r.endpoints.iter().map(|e| (e.addr, e.sni.as_ref())));
        let rank = |chosen: Option<&ClusterName>| -> Vec<lb::Candidate<ResolvedEndpoint>> {
            r.endpoints
                .iter()
                .zip(&stats)
                .map(|(e, stats)| {
                    let mut e = e.clone();
                    e.tier = self.tier(&e, chosen);
                    lb::Candidate {
                        key: e.addr,
                        tier: e.tier,
                        group: e.group,
                        weight: e.weight,
                        stats: stats.clone(),
                        item: e,
                    }
                })
                .collect()
        };
        let weights = self.weights.get(s).cloned();
        let mut drawn = Vec::new();
        if let Some(w) = &weights {
            for (c, weight) in w.iter() {
                if *weight > 0 && r.endpoints.iter().any(|e| e.cluster == *c) {
                    drawn.push((c.clone(), rank(Some(c))));
                }
            }
        }
        let p = Arc::new(Prepared {
            label: Arc::from(s.to_string()),
            h2: r.h2,
            spread: r.spread,
            policy: r.policy.clone(),
            undrawn: rank(None),
            drawn,
            weights,
            dns,
            // Taken before the statistics: a start-over meanwhile makes it
            // stale at once.
            hosts: generation,
        });
        let mut cache = self.prepared.write().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = cache.get_mut(s) {
            v.retain(|(k, _)| !same(k));
        }
        let n: usize = cache.values().map(Vec::len).sum();
        if n < MAX_PREPARED {
            let entry = cache.entry(s.clone()).or_default();
            entry.push(((subset.map(str::to_string), port, tls), p.clone()));
        }
        Some(p)
    }

    /// An endpoint's tier: its cluster's rank (0 when `chosen`), then its
    /// locality priority within the cluster.
    fn tier(&self, e: &ResolvedEndpoint, chosen: Option<&ClusterName>) -> u8 {
        let rank = self.clusters.get(&e.cluster).map_or(3, |ci| {
            cluster_rank(&self.me.locality, &ci.locality, chosen == Some(&e.cluster))
        });
        rank * RANK + e.tier.min(RANK - 1)
    }

    /// The endpoints of `s` as in [`Table::endpoints`], with their locality
    /// priority alone as their tier (before the federation's draw).
    fn unranked(
        &self,
        s: &ServiceKey,
        subset: Option<&str>,
        port: Option<u16>,
        tls: bool,
        dns: Option<&mesh_node::dns::Answers>,
    ) -> Option<Resolved> {
        let eps = self.services.get(s)?;
        let selector = match subset {
            Some(name) => Some(self.rules.get(s)?.subset(name)?),
            None => None,
        };
        // The port: as asked, or the service's only one.
        let port = match port {
            Some(p) => p,
            None => {
                let mut ports: Vec<u16> = eps
                    .iter()
                    .flat_map(|e| e.ports.iter().map(|p| p.number.get()))
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                match ports.as_slice() {
                    [p] => *p,
                    _ => return None,
                }
            }
        };
        let my_network = self.clusters.get(&self.me.cluster).map(|c| &c.network);
        // The DestinationRule's policy for this subset and port, merged
        // once: the locality settings below and the policy returned.
        let tp = self
            .rules
            .get(s)
            .map(|dr| dr.policy_for(subset, Some(port)));
        let locality = crate::locality::Policy::compile(
            tp.as_ref()
                .and_then(|tp| tp.load_balancer.as_ref())
                .and_then(|lb| lb.locality_lb_setting.as_ref()),
            tp.as_ref()
                .and_then(|tp| tp.outlier_detection.as_ref())
                .map(|od| f64::from(od.effective().min_health_percent)),
        );
        let network_of = |c: &ClusterName| self.clusters.get(c).map_or("", |i| i.network.as_str());
        let me = crate::locality::Site {
            locality: &self.me.locality,
            labels: &self.me.labels,
            cluster: self.me.cluster.as_str(),
            network: network_of(&self.me.cluster),
        };
        let subset_name = subset.and_then(|n| SubsetName::new(n).ok());
        let sni: Option<Arc<str>> = NonZeroU16::new(port)
            .filter(|_| tls)
            .map(|p| Arc::from(SniName::new(s.clone(), p, subset_name.clone()).encode()));
        // Each remote cluster's gateway addresses (literal and resolved),
        // how many of its endpoints were placed on them so far, and the
        // last of them.
        let mut gateways: BTreeMap<&ClusterName, (Vec<SocketAddr>, usize, usize)> = BTreeMap::new();
        // The endpoints a request may reach: healthy, in the subset, with
        // the port, and on this network or (mTLS only) behind a gateway
        // with an address. Localities are weighed among these alone.
        let mut eligible: Vec<(&Arc<Endpoint>, &mesh_core::endpoint::Port, bool)> = Vec::new();
        for e in eps.iter().filter(|e| e.health == Health::Healthy) {
            if selector.is_some_and(|sel| !sel.selects(&e.labels)) {
                continue;
            }
            let Some(p) = e.ports.iter().find(|p| p.number.get() == port) else {
                continue;
            };
            let cluster = self.clusters.get(&e.cluster);
            let same_network = e.cluster == self.me.cluster
                || cluster.is_some_and(|c| Some(&c.network) == my_network);
            if !same_network {
                // Another network: through its cluster's gateway, which
                // needs the SNI, so mTLS only.
                let Some(c) = cluster.filter(|_| tls) else {
                    continue;
                };
                let (addrs, _, _) = gateways.entry(&e.cluster).or_insert_with(|| {
                    let addrs = mesh_core::cluster::gateway_socket_addrs(&c.gateways, |n| {
                        dns.and_then(|d| d.get(n).cloned())
                    });
                    (addrs, 0, 0)
                });
                if addrs.is_empty() {
                    continue;
                }
            }
            eligible.push((e, p, same_network));
        }
        let sites: Vec<crate::locality::Site<'_>> = eligible
            .iter()
            .map(|(e, _, _)| crate::locality::Site {
                locality: &e.locality,
                labels: &e.labels,
                cluster: e.cluster.as_str(),
                network: network_of(&e.cluster),
            })
            .collect();
        let placed = crate::locality::place(&locality, &me, &sites);
        let mut h2 = false;
        let mut out: Vec<ResolvedEndpoint> = Vec::new();
        for ((e, p, same_network), placement) in eligible.iter().zip(&placed) {
            let same_network = *same_network;
            // `distribute` leaves unlisted localities out.
            let Some(placement) = placement else { continue };
            h2 |= matches!(p.protocol, Protocol::Http2 | Protocol::Grpc);
            let addr = if same_network {
                SocketAddr::new(e.address, p.connect_port())
            } else {
                let Some((addrs, placed, _)) = gateways.get_mut(&e.cluster) else {
                    continue;
                };
                // Endpoints take the addresses in turn.
                let Some(a) = addrs.get(*placed % addrs.len().max(1)).copied() else {
                    continue;
                };
                *placed += 1;
                a
            };
            out.push(ResolvedEndpoint {
                addr,
                sni: sni.clone(),
                tier: placement.priority,
                group: placement.group,
                weight: placement.weight,
                cluster: e.cluster.clone(),
                cluster_label: Arc::from(e.cluster.as_str()),
                via_gateway: !same_network,
            });
            if !same_network {
                if let Some(g) = gateways.get_mut(&e.cluster) {
                    g.2 = out.len() - 1;
                }
            }
        }
        // Every gateway address is used: a cluster with fewer endpoints
        // than addresses gets one more entry per address left, so retries
        // and outlier detection see each address on its own.
        for (addrs, placed, last) in gateways.into_values() {
            for a in addrs.iter().skip(placed) {
                let mut extra = out[last].clone();
                extra.addr = *a;
                out.push(extra);
            }
        }
        if out.is_empty() {
            return None;
        }
        Some(Resolved {
            endpoints: out,
            h2,
            port,
            spread: lb::Spread {
                weighted: locality.weighted,
                panic_threshold: locality.panic_threshold,
            },
            policy: tp.as_ref().map(compile_policy).unwrap_or_default(),
        })
    }
}

/// Splits `host[:port]` (`[v6]:port` too).
pub fn split_authority(a: &str) -> (&str, Option<u16>) {
    match a.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || a.starts_with('[') => match p.parse() {
            Ok(p) => (h, Some(p)),
            Err(_) => (a, None),
        },
        _ => (a, None),
    }
}

/// The route straight to `s` (on `port`), with Istio's default retries:
/// a service's own when no VirtualService routes it.
fn direct_route(s: &ServiceKey, port: Option<u16>) -> Route {
    Route {
        spec: None,
        dests: vec![Dest {
            service: s.clone(),
            subset: None,
            port,
            weight: 100,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        }],
        timeout: None,
        retries: route::default_retries(),
        fault: None,
        mirror: None,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        origin: None,
    }
}

/// The table a `consistentHash` asks for: Maglev with its size, else a ring
/// with its minimum size (`ringHash.minimumRingSize`, or the deprecated
/// top-level `minimumRingSize`), Envoy's defaults where unset.
fn hash_kind(ch: Option<&pol::ConsistentHashLB>) -> crate::hashring::Kind {
    use crate::hashring::{Kind, DEFAULT_MAGLEV, DEFAULT_MIN_RING};
    let Some(ch) = ch else {
        return Kind::default();
    };
    if let Some(m) = &ch.maglev {
        return Kind::Maglev {
            table_size: m.table_size.filter(|n| *n > 0).unwrap_or(DEFAULT_MAGLEV),
        };
    }
    let min = ch
        .ring_hash
        .as_ref()
        .and_then(|r| r.minimum_ring_size)
        .or(ch.minimum_ring_size)
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_MIN_RING);
    Kind::Ring { min_size: min }
}

/// What one DestinationRule traffic policy means for the proxy.
fn compile_policy(tp: &pol::TrafficPolicy) -> DestPolicy {
    let mut p = DestPolicy::default();
    if let Some(lbs) = &tp.load_balancer {
        if let Some(key) = lbs
            .consistent_hash
            .as_ref()
            .and_then(pol::ConsistentHashLB::key)
        {
            p.hash = hash_kind(lbs.consistent_hash.as_ref());
            p.lb = match key {
                pol::HashKey::Header(h) => Lb::Header(h.to_ascii_lowercase()),
                pol::HashKey::Cookie(c) => Lb::Cookie(c.name.clone()),
                pol::HashKey::SourceIp => Lb::SourceIp,
                pol::HashKey::QueryParameter(q) => Lb::Query(q.to_string()),
            };
        } else if let Some(simple) = &lbs.simple {
            p.lb = Lb::Simple(match simple {
                pol::SimpleLB::RoundRobin => Algorithm::RoundRobin,
                pol::SimpleLB::Random => Algorithm::Random,
                // LEAST_CONN is LEAST_REQUEST in Istio; PASSTHROUGH and
                // UNSPECIFIED take the default.
                _ => Algorithm::LeastRequest,
            });
        }
    }
    if let Some(rb) = &tp.retry_budget {
        p.retry_budget = Some(crate::retry_budget::Budget {
            percent: rb.percent.unwrap_or(mesh_core::retry::BUDGET_PERCENT),
            min_concurrency: rb
                .min_retry_concurrency
                .unwrap_or(mesh_core::retry::BUDGET_MIN_CONCURRENCY),
        });
    }
    if let Some(od) = &tp.outlier_detection {
        let e = od.effective();
        p.outlier = Some(Outlier {
            consecutive_5xx: e.consecutive_5xx.unwrap_or(0),
            consecutive_gateway: e.consecutive_gateway_errors.unwrap_or(0),
            base_ejection: e.base_ejection_time,
            max_ejection_percent: e.max_ejection_percent,
        });
    }
    if let Some(cp) = &tp.connection_pool {
        if let Some(tcp) = &cp.tcp {
            if let Some(m) = tcp.max_connections.filter(|m| *m > 0) {
                p.pool.max_connections = usize::try_from(m).unwrap_or(usize::MAX);
            }
            p.pool.connect_timeout = tcp.connect_timeout.map(|d| d.0);
        }
        if let Some(http) = &cp.http {
            if let Some(m) = http
                .http1_max_pending_requests
                .filter(|m| *m > 0)
                .and_then(|m| usize::try_from(m).ok())
            {
                p.pool.max_pending = m;
            }
            p.pool.max_requests_per_connection = http
                .max_requests_per_connection
                .filter(|m| *m > 0)
                .and_then(|m| u32::try_from(m).ok());
            p.max_requests = http
                .http2_max_requests
                .filter(|m| *m > 0)
                .and_then(|m| usize::try_from(m).ok());
        }
    }
    p
}

/// Resolves a policy host (`reviews`, `reviews.default`,
/// `reviews.default.svc.cluster.local`) relative to the document's namespace.
fn host_key(host: &str, ns: &Namespace) -> Option<ServiceKey> {
    if host.contains('*') {
        return None;
    }
    ServiceKey::parse_with_default(host, Some(ns)).ok()
}

fn dest_of(d: &pol::Destination, doc_ns: &Namespace, weight: u32) -> Option<Dest> {
    Some(Dest {
        service: host_key(&d.host, doc_ns)?,
        subset: d.subset.clone(),
        port: d.port.and_then(pol::PortSelector::port),
        weight,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
    })
}

fn header_ops(h: Option<&pol::HeaderOperations>) -> HeaderOps {
    h.map(|h| HeaderOps {
        set: h.set.clone(),
        add: h.add.clone(),
        remove: h.remove.clone(),
    })
    .unwrap_or_default()
}

fn compile_routes(doc_ns: &Namespace, origin: &Arc<str>, vs: &pol::VirtualService) -> Vec<Route> {
    vs.http
        .iter()
        .map(|r| {
            // Istio's weights are relative; a lone destination takes everything.
            let dests = r
                .route
                .iter()
                .filter_map(|d| {
                    let w = u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0);
                    let mut dest = dest_of(&d.destination, doc_ns, w)?;
                    dest.request_headers =
                        header_ops(d.headers.as_ref().and_then(|h| h.request.as_ref()));
                    dest.response_headers =
                        header_ops(d.headers.as_ref().and_then(|h| h.response.as_ref()));
                    Some(dest)
                })
                .collect::<Vec<_>>();
            let retries = match &r.retries {
                Some(rt) => Retries {
                    attempts: rt.effective_attempts(),
                    per_try: rt.per_try_timeout.map(|d| d.0),
                    on: rt.effective_retry_on(),
                    remote_localities: rt.retry_remote_localities.unwrap_or(false),
                    backoff: rt
                        .backoff
                        .map_or(mesh_core::retry::DEFAULT_BACKOFF, |d| d.0),
                },
                None => route::default_retries(),
            };
            let fault = r.fault.as_ref().map(|f| Fault {
                delay: f
                    .delay
                    .as_ref()
                    .and_then(|d| d.fixed_delay.map(|fd| (fd.0, d.fraction()))),
                abort: f.abort.as_ref().and_then(|a| {
                    let kind = match (a.http_status, a.grpc_code()) {
                        (Some(code), _) => Abort::Http(u16::try_from(code).ok()?),
                        (None, Some(g)) => Abort::Grpc(g),
                        _ => return None,
                    };
                    Some((kind, a.fraction()))
                }),
            });
            // `mirror` (with mirrorPercentage), or the first of v1's `mirrors`.
            let mirror = match (&r.mirror, r.mirrors.first()) {
                (Some(m), _) => dest_of(m, doc_ns, 100).map(|d| (d, r.mirror_fraction())),
                (None, Some(m)) => dest_of(&m.destination, doc_ns, 100).map(|d| (d, m.fraction())),
                (None, None) => None,
            };
            let ops = header_ops;
            Route {
                spec: Some(Arc::new(r.clone())),
                dests,
                timeout: r.timeout.map(|d| d.0),
                retries,
                fault,
                mirror,
                request_headers: ops(r.headers.as_ref().and_then(|h| h.request.as_ref())),
                response_headers: ops(r.headers.as_ref().and_then(|h| h.response.as_ref())),
                rewrite: r
                    .rewrite
                    .as_ref()
                    .filter(|w| w.uri.is_some() || w.authority.is_some())
                    .map(|w| route::Rewrite {
                        uri: w.uri.clone(),
                        authority: w.authority.clone(),
                    }),
                origin: Some(origin.clone()),
            }
        })
        .collect()
}

/// The state file is written at most this often.
const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// An unchanged state file's time is refreshed this often while connected.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Length of the state file's trailer: the payload's SHA-256 in hex.
const DIGEST_HEX: usize = 64;

/// Reads a state file the agent wrote: the whole snapshot, its trailer
/// checked; a torn, altered or partial file is an error, never half-read.
pub fn read_state_file(path: &std::path::Path) -> Result<api::DiscoveryResponse, String> {
    use prost::Message as _;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let split = bytes
        .len()
        .checked_sub(DIGEST_HEX)
        .ok_or("shorter than its checksum")?;
    let (payload, digest) = bytes.split_at(split);
    if mesh_node::fed::sha256_hex(payload).as_bytes() != digest {
        return Err("its checksum does not match (a torn or altered file)".into());
    }
    let snap = api::DiscoveryResponse::decode(payload).map_err(|e| e.to_string())?;
    if !snap
        .snapshot
        .as_ref()
        .is_some_and(|c| c.index == 0 && c.last)
    {
        return Err("not a whole snapshot".into());
    }
    Ok(snap)
}

/// The Discovery sink of an agent: raw state in, a [`Table`] out.
pub struct Sink {
    me: Me,
    table: Arc<ArcSwap<Table>>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    clusters: HashMap<ClusterName, ClusterInfo>,
    endpoints: BTreeMap<EndpointKey, Arc<Endpoint>>,
    policies: BTreeMap<(Kind, Namespace, String), Arc<Document>>,
    version: i64,
    trust: crate::tls::TrustLink,
    weights: HashMap<ServiceKey, Arc<[(ClusterName, u32)]>>,
    jwks: crate::jwt::JwksCache,
    /// The version of each table published, for whoever must act on a
    /// change at once (open connections a new policy refuses).
    changes: tokio::sync::watch::Sender<i64>,
    /// Where the last config is kept (`--state-file`), how old it may be
    /// when read, and whether what is published is not saved yet.
    state_file: Option<std::path::PathBuf>,
    state_max_age: std::time::Duration,
    unsaved: bool,
    last_save: Option<std::time::Instant>,
    /// Resolves the gateway names of the clusters known.
    dns: Option<mesh_node::dns::Dns>,
}

impl Sink {
    /// A sink publishing into `table`.
    pub fn new(
        cfg: &Config,
        table: Arc<ArcSwap<Table>>,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            me: Table::empty(cfg).me,
            table,
            ready,
            metrics,
            clusters: HashMap::new(),
            endpoints: BTreeMap::new(),
            policies: BTreeMap::new(),
            version: 0,
            trust: crate::tls::TrustLink::default(),
            jwks: crate::jwt::JwksCache::new(&cfg.jwks_roots),
            weights: HashMap::new(),
            changes: tokio::sync::watch::channel(0).0,
            state_file: cfg.state_file.clone(),
            state_max_age: cfg.state_max_age,
            unsaved: false,
            last_save: None,
            dns: None,
        }
    }

    /// Resolves gateway names with `dns` (whose task the caller runs).
    pub fn with_dns(mut self, dns: mesh_node::dns::Dns) -> Self {
        self.dns = Some(dns);
        self
    }

    /// Serves from the state file, if there is one younger than
    /// `--state-max-age`, until the federation answers. Returns whether it did.
    pub async fn load_state(&mut self) -> bool {
        let Some(path) = self.state_file.clone() else {
            return false;
        };
        let age = match std::fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => t.elapsed().unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => {
                warn!(path = %path.display(), "cannot read the state file: {e}");
                return false;
            }
        };
        if age > self.state_max_age {
            warn!(path = %path.display(), age = ?age, max = ?self.state_max_age,
                "not serving from the state file: older than --state-max-age; waiting for the federation");
            return false;
        }
        let snap = match read_state_file(&path) {
            Ok(s) => s,
            Err(e) => {
                warn!(path = %path.display(), "ignoring an unreadable state file: {e}");
                return false;
            }
        };
        use mesh_node::discovery::Sink as _;
        self.reset();
        let version = snap.version;
        let skipped = self.apply(snap);
        self.publish(version).await;
        self.unsaved = false;
        info!(path = %path.display(), version, age = ?age, skipped = skipped.len(),
            "serving from the saved config until the federation answers");
        true
    }

    /// The state as one snapshot (what the state file holds).
    fn to_snapshot(&self) -> api::DiscoveryResponse {
        api::DiscoveryResponse {
            version: self.version,
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
            endpoints: self.endpoints.values().map(|e| (&**e).into()).collect(),
            policies: self
                .policies
                .values()
                .map(|d| {
                    let (kind, ns, name) = d.key();
                    api::PolicyDocument {
                        r#ref: Some(api::PolicyRef {
                            kind: kind.as_str().into(),
                            namespace: ns.to_string(),
                            name: name.to_string(),
                        }),
                        json: d.to_json().to_string(),
                        revision: 0,
                    }
                })
                .collect(),
            weights: self
                .weights
                .iter()
                .map(|(svc, row)| api::ServiceWeights {
                    service: Some(svc.into()),
                    callers: vec![api::CallerWeights {
                        caller: self.me.cluster.to_string(),
                        weights: row.iter().map(|(c, w)| (c.to_string(), *w)).collect(),
                    }],
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Writes the state file if the config changed and the last write is
    /// a second old: synced under a temporary name, then renamed, the
    /// directory synced, with a SHA-256 trailer (a torn or altered file is
    /// refused at start, never half-read). While the config is current and
    /// unchanged, the file's time is refreshed every minute: its age is how
    /// long the agent has been without a federation.
    fn save_if_due(&mut self) {
        use prost::Message as _;
        let Some(path) = &self.state_file else { return };
        if !self.unsaved {
            if self.last_save.is_some_and(|t| t.elapsed() >= TOUCH_EVERY) {
                let touched = std::fs::File::options()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                if let Err(e) = touched {
                    debug!(path = %path.display(), "cannot refresh the state file's time: {e}");
                }
                self.last_save = Some(std::time::Instant::now());
            }
            return;
        }
        if self.last_save.is_some_and(|t| t.elapsed() < SAVE_EVERY) {
            return;
        }
        let mut bytes = self.to_snapshot().encode_to_vec();
        let digest = mesh_node::fed::sha256_hex(&bytes);
        bytes.extend_from_slice(digest.as_bytes());
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), "cannot save the config: {e}");
        }
        self.unsaved = false;
        self.last_save = Some(std::time::Instant::now());
    }

    /// Tells of every table published from now on (its version).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<i64> {
        self.changes.subscribe()
    }

    /// Hands trust bundles from the federation to the certificate manager,
    /// and reports the root of the agent's certificate in ACKs.
    pub fn with_trust(mut self, trust: crate::tls::TrustLink) -> Self {
        self.trust = trust;
        self
    }

    fn build(&self, version: i64) -> Table {
        if let Some(dns) = &self.dns {
            dns.want(self.clusters.values().flat_map(|c| {
                c.gateways.iter().filter_map(|g| match &g.host {
                    GatewayHost::Dns(name) => Some(name.clone()),
                    GatewayHost::Ip(_) => None,
                })
            }));
        }
        let mut services: HashMap<ServiceKey, Vec<Arc<Endpoint>>> = HashMap::new();
        let mut by_addr = HashMap::new();
        for ep in self.endpoints.values() {
            services
                .entry(ep.service.clone())
                .or_default()
                .push(ep.clone());
            for p in &ep.ports {
                by_addr.insert(
                    SocketAddr::new(ep.address, p.number.get()),
                    ep.service.clone(),
                );
                by_addr.insert(
                    SocketAddr::new(ep.address, p.connect_port()),
                    ep.service.clone(),
                );
            }
        }
        let mut routes: HashMap<ServiceKey, Arc<[Route]>> = HashMap::new();
        let mut rules = HashMap::new();
        let mut sidecars: Vec<&pol::Sidecar> = Vec::new();
        let mut authz = Vec::new();
        let mut peer_auth = Vec::new();
        let mut jwt = Vec::new();
        // Documents in (kind, namespace, name) order: the first one for a host wins.
        for ((_, ns, name), doc) in &self.policies {
            let origin: Arc<str> = Arc::from(format!("{ns}/{name}"));
            match &doc.spec {
                Spec::VirtualService(vs) if !vs.applies_to_mesh() => {
                    debug!(vs = %origin, "VirtualService for gateways only; not for sidecars");
                }
                Spec::VirtualService(vs) => {
                    let compiled: Arc<[Route]> = compile_routes(ns, &origin, vs).into();
                    for h in &vs.hosts {
                        let Some(k) = host_key(h, ns) else {
                            debug!(host = %h, vs = %origin, "host is not a mesh service; skipped");
                            continue;
                        };
                        if routes.contains_key(&k) {
                            warn!(host = %k, vs = %origin, "another VirtualService already routes this host; skipped");
                            continue;
                        }
                        routes.insert(k, compiled.clone());
                    }
                }
                Spec::DestinationRule(dr) => {
                    if let Some(k) = host_key(&dr.host, ns) {
                        rules.entry(k).or_insert_with(|| Arc::new(dr.clone()));
                    }
                }
                Spec::Sidecar(sc) => {
                    if *ns == self.me.namespace {
                        sidecars.push(sc);
                    }
                }
                Spec::AuthorizationPolicy(ap) => {
                    if ap.selects(
                        ns.as_str(),
                        pol::DEFAULT_ROOT_NAMESPACE,
                        self.me.namespace.as_str(),
                        &self.me.labels,
                    ) {
                        authz.push((origin.to_string(), ap.clone()));
                    }
                }
                Spec::RequestAuthentication(ra) => {
                    if ra.selects(
                        ns.as_str(),
                        pol::DEFAULT_ROOT_NAMESPACE,
                        self.me.namespace.as_str(),
                        &self.me.labels,
                    ) {
                        jwt.extend(
                            ra.jwt_rules
                                .iter()
                                .map(|r| crate::jwt::Rule::new(r, &self.jwks)),
                        );
                    }
                }
                Spec::PeerAuthentication(pa) => {
                    if *ns == self.me.namespace || ns.as_str() == pol::DEFAULT_ROOT_NAMESPACE {
                        peer_auth.push((ns.to_string(), pa.clone()));
                    }
                }
                Spec::TrafficWeights(_) => {}
            }
        }
        Table {
            version,
            me: self.me.clone(),
            clusters: self.clusters.clone(),
            services,
            by_addr,
            routes,
            rules,
            sidecar: pol::select_sidecar(sidecars, &self.me.labels).map(|s| Arc::new(s.clone())),
            authz,
            peer_auth,
            jwt,
            weights: self.weights.clone(),
            dns: self.dns.clone(),
            named: std::sync::RwLock::default(),
            prepared: std::sync::RwLock::default(),
        }
    }
}

impl mesh_node::discovery::Sink for Sink {
    fn reset(&mut self) {
        self.clusters.clear();
        self.endpoints.clear();
        self.policies.clear();
        self.weights.clear();
    }

    fn apply(&mut self, msg: api::DiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(bundle) = msg.trust {
            if let Err(e) = self.trust.offer(bundle) {
                errors.push(format!("trust: {e}"));
            }
        }
        for c in msg.clusters {
            match c.info.map(|i| ClusterInfo::from_api(i, "cluster")) {
                Some(Ok(info)) => {
                    self.clusters.insert(info.name.clone(), info);
                }
                Some(Err(e)) => errors.push(e.to_string()),
                None => errors.push("cluster: is required".into()),
            }
        }
        for name in msg.removed_clusters {
            if let Ok(n) = ClusterName::new(&name) {
                self.clusters.remove(&n);
            }
        }
        for e in msg.endpoints {
            match Endpoint::from_api(e, "endpoint") {
                Ok(ep) => {
                    self.endpoints.insert(ep.key(), Arc::new(ep));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        for r in msg.removed_endpoints {
            match EndpointKey::from_api(r, "removed_endpoint") {
                Ok(k) => {
                    self.endpoints.remove(&k);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        for p in msg.policies {
            let parsed = serde_json::from_str::<serde_json::Value>(&p.json)
                .map_err(|e| format!("policy: not JSON: {e}"))
                .and_then(|v| Document::from_json(&v).map_err(|e| format!("policy: {e}")));
            match parsed {
                Ok(doc) => {
                    let (kind, ns, name) = doc.key();
                    self.policies
                        .insert((kind, ns.clone(), name.to_string()), Arc::new(doc));
                }
                Err(e) => errors.push(e),
            }
        }
        for w in msg.weights {
            let Some(svc) = w
                .service
                .map(|s| ServiceKey::from_api(s, "weights.service"))
            else {
                errors.push("weights.service: is required".into());
                continue;
            };
            let svc = match svc {
                Ok(s) => s,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            let mine = w
                .callers
                .into_iter()
                .find(|c| c.caller == self.me.cluster.as_str());
            match mine {
                Some(row) => {
                    let mut v: Vec<(ClusterName, u32)> = row
                        .weights
                        .into_iter()
                        .filter_map(|(c, w)| Some((ClusterName::new(&c).ok()?, w)))
                        .collect();
                    v.sort();
                    self.weights.insert(svc, v.into());
                }
                None => {
                    self.weights.remove(&svc);
                }
            }
        }
        for r in msg.removed_weights {
            if let Ok(s) = ServiceKey::from_api(r, "removed_weights") {
                self.weights.remove(&s);
            }
        }
        for r in msg.removed_policies {
            if let (Ok(kind), Ok(ns)) = (r.kind.parse::<Kind>(), Namespace::new(&r.namespace)) {
                self.policies.remove(&(kind, ns, r.name));
            }
        }
        errors
    }

    async fn publish(&mut self, version: i64) {
        let t = self.build(version);
        info!(
            version,
            services = t.services.len(),
            routes = t.routes.len(),
            rules = t.rules.len(),
            sidecar = t.sidecar.is_some(),
            "config applied"
        );
        self.table.store(Arc::new(t));
        self.changes.send_replace(version);
        self.version = version;
        self.metrics.config_version.set(version);
        self.ready.store(true, Ordering::Release);
        self.unsaved = true;
        self.save_if_due();
    }

    async fn tick(&mut self) -> bool {
        self.save_if_due();
        false
    }

    fn version(&self) -> i64 {
        self.version
    }

    fn certificate_root(&self) -> String {
        self.trust.certificate_root()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_weights_among_clusters_with_endpoints() {
        let (a, b, c) = (
            ClusterName::new("a").unwrap(),
            ClusterName::new("b").unwrap(),
            ClusterName::new("c").unwrap(),
        );
        let w = [(a.clone(), 7000), (b.clone(), 3000), (c.clone(), 0)];
        let mut got = HashMap::new();
        for _ in 0..10_000 {
            *got.entry(draw(&w, |x| [&a, &b, &c].contains(&x)).unwrap().clone())
                .or_insert(0) += 1;
        }
        let share = |k: &ClusterName| f64::from(got.get(k).copied().unwrap_or(0)) / 10_000.0;
        assert!((share(&a) - 0.7).abs() < 0.03, "{got:?}");
        assert!((share(&b) - 0.3).abs() < 0.03, "{got:?}");
        assert_eq!(share(&c), 0.0);
        // A cluster without endpoints here: its weight goes to the others.
        for _ in 0..100 {
            assert_eq!(draw(&w, |x| [&b, &c].contains(&x)), Some(&b));
        }
        // Nothing weighted is present: no choice (locality decides).
        assert_eq!(draw(&w, |x| x == &c), None);
    }

    fn traffic_policy(json: &str) -> pol::TrafficPolicy {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn destination_rules_set_the_hash_table_and_the_retry_budget() {
        let p = compile_policy(&traffic_policy(
            r#"{"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user", "maglev": {"tableSize": 1009}}}, "retryBudget": {"percent": 50}}"#,
        ));
        assert_eq!(p.lb, Lb::Header("x-user".into()));
        assert_eq!(p.hash, crate::hashring::Kind::Maglev { table_size: 1009 });
        assert_eq!(
            p.retry_budget,
            Some(crate::retry_budget::Budget {
                percent: 50.0,
                min_concurrency: 3
            })
        );
        let p = compile_policy(&traffic_policy(
            r#"{"loadBalancer": {"consistentHash": {"useSourceIp": true, "ringHash": {"minimumRingSize": 4096}}}}"#,
        ));
        assert_eq!(p.hash, crate::hashring::Kind::Ring { min_size: 4096 });
        assert_eq!(p.retry_budget, None);
        let p = compile_policy(&traffic_policy(
            r#"{"loadBalancer": {"consistentHash": {"useSourceIp": true, "minimumRingSize": 2048}}}"#,
        ));
        assert_eq!(p.hash, crate::hashring::Kind::Ring { min_size: 2048 });
    }
}
