//! Discovery through the Kubernetes API (`--kube-discovery CLUSTER`): a
//! federation replica running in a cluster learns that cluster's services
//! and publishes the exported ones to the registry, with their locality and
//! identities.
//!
//! It keeps reflectors (kube's watcher: list, then watch from the list's
//! resourceVersion, with bookmarks; a `410 Gone` or any watch error relists
//! after a backoff) of Services, EndpointSlices, Pods, Nodes, and
//! ServiceExports (`multicluster.x-k8s.io/v1alpha1`, when that CRD is
//! installed). After any change it computes the whole desired state from
//! the caches ([`desired`]) and writes the difference from what it
//! published last: endpoints put or deleted, exports set or withdrawn, the
//! cluster's record. A relist therefore converges to the API's state
//! without duplicates or losses, and a restart starts from what the
//! registry holds for the cluster.
//!
//! * A Service is exported when it has the label or annotation
//!   `fedmesh.io/export: "true"` (`--export-label`) or a ServiceExport of
//!   the same namespace and name.
//! * Its endpoints come from its EndpointSlices (`kubernetes.io/service-name`):
//!   one per address, named after the Pod (`targetRef`); `ready` is healthy,
//!   `serving` and `terminating` is draining, anything else unhealthy.
//! * Ports: the Service's port number (what callers dial) with the
//!   slice's port as the target when they differ; the protocol from
//!   `appProtocol`, else the port name's prefix (`http-`, `grpc-`, ...,
//!   Istio's convention), else TCP.
//! * Locality: the Node's `topology.kubernetes.io/region` and `zone`
//!   labels, else the slice's `zone` and the cluster's region.
//! * Identity: `spiffe://TRUST_DOMAIN/ns/NS/sa/SA` from the Pod's service
//!   account; the Pod's labels (subsets) are the endpoint's labels.
//! * The cluster: its locality is the most common among its Nodes; its
//!   gateway addresses are the LoadBalancer ingress of `--gateway-service`
//!   on its `tls` port (else its first port; 15443 if it has none). The
//!   replica heartbeats it.
//!
//! * A Pod carrying the agent as a sidecar (a container named
//!   `fedmesh-agent`) is skipped: its agent registers it with its inbound
//!   (mTLS) port.
//!
//! Endpoints it writes carry the label `fedmesh.io/source: kubernetes`;
//! endpoints of the cluster without it (agents registering themselves, VMs)
//! are left alone. The cluster's exports are Kubernetes' to decide.

use crate::registry::{self, Entry, KeyRef, Registry};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use mesh_api::v1 as api;
use mesh_core::cluster::ClusterInfo;
use mesh_core::convert::FromApi;
use mesh_core::endpoint::{Endpoint, EndpointKey};
use mesh_core::name::ClusterName;
use mesh_core::service::ServiceKey;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

/// The sidecar's container name (`deploy/`'s injection template): a Pod
/// with it is registered by its agent, not by discovery.
pub const AGENT_CONTAINER: &str = "fedmesh-agent";

/// Whether the Pod carries the agent as a sidecar (a container, or a native
/// sidecar: an init container, named [`AGENT_CONTAINER`]).
fn meshed(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == AGENT_CONTAINER)
    })
}

/// The label marking endpoints this source wrote.
pub const SOURCE_LABEL: &str = "fedmesh.io/source";
/// Its value.
pub const SOURCE: &str = "kubernetes";
/// The default export label/annotation.
pub const DEFAULT_EXPORT_LABEL: &str = "fedmesh.io/export";
/// The default east-west gateway Service.
pub const DEFAULT_GATEWAY_SERVICE: &str = "fedmesh-system/fedmesh-eastwest-gateway";
/// The gateway port when the Service names none `tls`.
const GATEWAY_PORT: i32 = 15443;
/// Changes arriving within this time are written together.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What `--kube-discovery` configures.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiscoveryConfig {
    /// The cluster published.
    pub cluster: ClusterName,
    /// Its kubeconfig; `None`: the inferred configuration (in-cluster).
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Label or annotation key whose value `"true"` exports a Service.
    pub export_label: String,
    /// `NAMESPACE/NAME` of the east-west gateway's Service.
    pub gateway_service: (String, String),
}

/// The API objects discovery reads.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Services.
    pub services: Vec<Arc<Service>>,
    /// EndpointSlices.
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Pods.
    pub pods: Vec<Arc<Pod>>,
    /// Nodes.
    pub nodes: Vec<Arc<Node>>,
    /// ServiceExports (namespace, name).
    pub exports: BTreeSet<(String, String)>,
}

/// What the registry should hold for the cluster.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Desired {
    /// The cluster's record.
    pub cluster: Option<ClusterInfo>,
    /// Its exported services' endpoints.
    pub endpoints: BTreeMap<EndpointKey, Endpoint>,
    /// Its exports.
    pub exports: BTreeSet<ServiceKey>,
    /// Objects skipped, with why (logged once per change).
    pub skipped: Vec<String>,
}

fn label<'a>(m: &'a Option<BTreeMap<String, String>>, k: &str) -> Option<&'a str> {
    m.as_ref().and_then(|m| m.get(k)).map(String::as_str)
}

/// `appProtocol`, else the port name's prefix, as Istio reads them.
fn protocol(app: Option<&str>, name: Option<&str>) -> &'static str {
    let of = |p: &str| match p {
        "http" | "http1" => Some("http"),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some("http2"),
        "grpc" | "grpc-web" => Some("grpc"),
        "tcp" | "tls" | "https" | "mongo" | "redis" | "mysql" => Some("tcp"),
        _ => None,
    };
    app.and_then(of)
        .or_else(|| name.and_then(|n| of(n.split('-').next().unwrap_or(n))))
        .unwrap_or("tcp")
}

/// The desired state from a snapshot. Pure: the tests feed it objects.
#[allow(clippy::too_many_lines)]
pub fn desired(cfg: &DiscoveryConfig, trust_domain: &str, s: &Snapshot) -> Desired {
    let mut out = Desired::default();
    let nodes: BTreeMap<&str, (Option<&str>, Option<&str>)> = s
        .nodes
        .iter()
        .map(|n| {
            let l = &n.metadata.labels;
            (
                n.metadata.name.as_deref().unwrap_or_default(),
                (
                    label(l, "topology.kubernetes.io/region"),
                    label(l, "topology.kubernetes.io/zone"),
                ),
            )
        })
        .collect();
    // The cluster's locality: the most common among its nodes.
    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (r, z) in nodes.values() {
        if let (Some(r), Some(z)) = (r, z) {
            *counts.entry((r, z)).or_default() += 1;
        }
    }
    let home = counts
        .iter()
        .max_by_key(|(k, n)| (**n, std::cmp::Reverse(**k)))
        .map(|(k, _)| *k);
    let pods: BTreeMap<(&str, &str), &Pod> = s
        .pods
        .iter()
        .map(|p| {
            (
                (
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default(),
                ),
                p.as_ref(),
            )
        })
        .collect();
    let (gw_ns, gw_name) = &cfg.gateway_service;
    let mut gateways = Vec::new();
    for svc in &s.services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        if ns == gw_ns && name == gw_name {
            let port = svc
                .spec
                .as_ref()
                .and_then(|sp| sp.ports.as_ref())
                .and_then(|ps| {
                    ps.iter()
                        .find(|p| p.name.as_deref() == Some("tls"))
                        .or(ps.first())
                })
                .map_or(GATEWAY_PORT, |p| p.port);
            for ing in svc
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
            {
                if let Some(h) = ing.ip.as_deref().or(ing.hostname.as_deref()) {
                    gateways.push(if h.contains(':') {
                        format!("[{h}]:{port}")
                    } else {
                        format!("{h}:{port}")
                    });
                }
            }
        }
    }
    let (home_region, home_zone) = home.unwrap_or(("", ""));
    if home.is_none() {
        out.skipped.push(
            "no Node carries both topology.kubernetes.io/region and zone labels: the cluster's locality is unknown"
                .into(),
        );
    }
    let info = api::ClusterInfo {
        name: cfg.cluster.to_string(),
        locality: Some(api::Locality {
            region: home_region.into(),
            zone: home_zone.into(),
        }),
        network: format!("net-{}", cfg.cluster),
        gateway_addresses: gateways,
        trust_domain: trust_domain.into(),
        ..Default::default()
    };
    match ClusterInfo::from_api(info, "cluster") {
        Ok(c) => out.cluster = Some(c),
        Err(e) => out.skipped.push(format!("cluster {}: {e}", cfg.cluster)),
    }

    // Each Service's slices, found once rather than by a scan per Service.
    let mut slices_of: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &s.slices {
        if let (Some(ns), Some(svc)) = (
            slice.metadata.namespace.as_deref(),
            label(&slice.metadata.labels, "kubernetes.io/service-name"),
        ) {
            slices_of.entry((ns, svc)).or_default().push(slice);
        }
    }
    for svc in &s.services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let marked =
            |m: &Option<BTreeMap<String, String>>| label(m, &cfg.export_label) == Some("true");
        let exported = marked(&svc.metadata.labels)
            || marked(&svc.metadata.annotations)
            || s.exports.contains(&(ns.to_string(), name.to_string()));
        if !exported {
            continue;
        }
        let key = match ServiceKey::from_api(
            api::ServiceKey {
                namespace: ns.into(),
                name: name.into(),
            },
            "service",
        ) {
            Ok(k) => k,
            Err(e) => {
                out.skipped.push(format!("Service {ns}/{name}: {e}"));
                continue;
            }
        };
        out.exports.insert(key.clone());
        let svc_ports: Vec<&k8s_openapi::api::core::v1::ServicePort> = svc
            .spec
            .as_ref()
            .and_then(|sp| sp.ports.as_ref())
            .map(|ps| ps.iter().collect())
            .unwrap_or_default();
        for slice in slices_of.get(&(ns, name)).into_iter().flatten() {
            if slice.address_type == "FQDN" {
                continue;
            }
            let mut ports = Vec::new();
            for p in slice.ports.iter().flatten() {
                let Some(target) = p.port else { continue };
                // The Service port this slice port serves: the one of the
                // same name (both unnamed for a single-port Service).
                let Some(number) = svc_ports
                    .iter()
                    .find(|sp| {
                        sp.name.as_deref().unwrap_or_default()
                            == p.name.as_deref().unwrap_or_default()
                    })
                    .map(|sp| sp.port)
                else {
                    continue;
                };
                ports.push(api::Port {
                    name: p.name.clone().unwrap_or_default(),
                    number: u32::try_from(number).unwrap_or(0),
                    protocol: protocol(p.app_protocol.as_deref(), p.name.as_deref()).into(),
                    target_port: if number == target {
                        0
                    } else {
                        u32::try_from(target).unwrap_or(0)
                    },
                });
            }
            for ep in &slice.endpoints {
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let health = if ready && !terminating {
                    api::Health::Healthy
                } else if serving && terminating {
                    api::Health::Draining
                } else {
                    api::Health::Unhealthy
                };
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|t| t.kind.as_deref() == Some("Pod"))
                    .and_then(|t| {
                        pods.get(&(
                            t.namespace.as_deref().unwrap_or(ns),
                            t.name.as_deref().unwrap_or_default(),
                        ))
                    });
                if pod.is_some_and(|p| meshed(p)) {
                    // Its agent registers it, with the agent's inbound
                    // (mTLS) port: publishing the Pod's own port too would
                    // make a second, plain-text endpoint of the same name.
                    continue;
                }
                let (region, zone) = ep
                    .node_name
                    .as_deref()
                    .and_then(|n| nodes.get(n))
                    .and_then(|(r, z)| Some(((*r)?, (*z)?)))
                    .unwrap_or((home_region, ep.zone.as_deref().unwrap_or(home_zone)));
                let mut labels: BTreeMap<String, String> = pod
                    .and_then(|p| p.metadata.labels.clone())
                    .unwrap_or_default();
                labels.insert(SOURCE_LABEL.into(), SOURCE.into());
                let identity = pod.map(|p| {
                    let sa = p
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.as_deref())
                        .unwrap_or("default");
                    format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")
                });
                for (i, addr) in ep.addresses.iter().enumerate() {
                    let base = ep
                        .target_ref
                        .as_ref()
                        .and_then(|t| t.name.clone())
                        .unwrap_or_else(|| addr.replace([':', '.'], "-"));
                    let id = if i == 0 && slice.address_type == "IPv4" {
                        base
                    } else {
                        format!("{base}-{}", addr.replace([':', '.'], "-"))
                    };
                    let a = api::Endpoint {
                        id,
                        service: Some(api::ServiceKey {
                            namespace: ns.into(),
                            name: name.into(),
                        }),
                        cluster: cfg.cluster.to_string(),
                        address: addr.clone(),
                        ports: ports.clone(),
                        labels: labels.clone().into_iter().collect(),
                        locality: Some(api::Locality {
                            region: region.into(),
                            zone: zone.into(),
                        }),
                        health: health as i32,
                        identity: identity.clone().unwrap_or_default(),
                    };
                    match Endpoint::from_api(a, "endpoint") {
                        Ok(e) => {
                            // Two slices naming one endpoint (a slice being
                            // replaced): the ready one wins.
                            let k = e.key();
                            let keep = out.endpoints.get(&k).is_some_and(|old| {
                                old.health == mesh_core::endpoint::Health::Healthy
                            });
                            if !keep {
                                out.endpoints.insert(k, e);
                            }
                        }
                        Err(e) => out.skipped.push(format!(
                            "EndpointSlice {ns}/{}: {addr}: {e}",
                            slice.metadata.name.as_deref().unwrap_or_default()
                        )),
                    }
                }
            }
        }
    }
    out
}

/// What this replica has written for the cluster.
#[derive(Default)]
struct Published {
    cluster: Option<ClusterInfo>,
    endpoints: BTreeMap<EndpointKey, Endpoint>,
    exports: BTreeSet<ServiceKey>,
}

impl Published {
    /// What the registry holds for `cluster` now (after a restart).
    async fn read(reg: &Registry, cluster: &ClusterName) -> crate::store::Result<Self> {
        let mut p = Self::default();
        let range = reg.store().range(registry::ROOT).await?;
        for kv in range.kvs {
            match registry::decode(&kv.key, &kv.value) {
                (KeyRef::Cluster(c), Entry::Cluster(info)) if &c == cluster => {
                    p.cluster = Some(info);
                }
                (KeyRef::Endpoint(k), Entry::Endpoint(e))
                    if &k.cluster == cluster
                        && e.labels.get(SOURCE_LABEL).map(String::as_str) == Some(SOURCE) =>
                {
                    p.endpoints.insert(k, e);
                }
                (KeyRef::Export(s, c), _) if &c == cluster => {
                    p.exports.insert(s);
                }
                _ => {}
            }
        }
        Ok(p)
    }

    /// Writes the difference to `want`; counts of (puts, deletes).
    async fn apply(
        &mut self,
        reg: &Registry,
        cluster: &ClusterName,
        want: &Desired,
    ) -> crate::store::Result<(usize, usize)> {
        let (mut puts, mut dels) = (0, 0);
        if let Some(c) = &want.cluster {
            if self.cluster.as_ref() != Some(c) {
                // What an operator set on the cluster (`meshctl cluster
                // add --allow-local-endpoints / --endpoint-network`) is not
                // Kubernetes' to change.
                let mut put = c.clone();
                if let Some(stored) = reg.get_cluster(&c.name).await? {
                    put.allow_local_endpoints = stored.allow_local_endpoints;
                    put.endpoint_networks = stored.endpoint_networks;
                }
                reg.put_cluster(&put).await?;
                self.cluster = Some(c.clone());
                puts += 1;
            }
        }
        for s in want.exports.difference(&self.exports.clone()) {
            reg.set_export(s, cluster, true).await?;
            self.exports.insert(s.clone());
            puts += 1;
        }
        for (k, e) in &want.endpoints {
            if self.endpoints.get(k) != Some(e) {
                reg.put_endpoint(e).await?;
                self.endpoints.insert(k.clone(), e.clone());
                puts += 1;
            }
        }
        let gone: Vec<EndpointKey> = self
            .endpoints
            .keys()
            .filter(|k| !want.endpoints.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            reg.delete_endpoint(&k).await?;
            self.endpoints.remove(&k);
            dels += 1;
        }
        let withdrawn: Vec<ServiceKey> = self.exports.difference(&want.exports).cloned().collect();
        for s in withdrawn {
            reg.set_export(&s, cluster, false).await?;
            self.exports.remove(&s);
            dels += 1;
        }
        Ok((puts, dels))
    }
}

/// The first refusal by the API server (`401`/`403`) of a watcher's list
/// or watch: start-up fails with it at once instead of waiting.
type Refusal = Arc<tokio::sync::watch::Sender<Option<String>>>;

/// The API server's message when `e` is an authentication or
/// authorization refusal (RBAC): retrying will not help.
fn refusal(e: &watcher::Error) -> Option<String> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.code == 401 || s.code == 403 =>
        {
            Some(if s.message.is_empty() {
                format!("{} ({})", s.reason, s.code)
            } else {
                s.message.clone()
            })
        }
        _ => None,
    }
}

/// Runs a reflector for `api` until the process ends, signalling `changed`
/// after every event; errors (a 410 included) back off and relist. A
/// refusal is also reported to `refused`.
fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    refused: Refusal,
    what: &'static str,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    use futures::StreamExt as _;
    let cfg = watcher::Config::default();
    tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    if let Some(m) = refusal(&e) {
                        refused.send_if_modified(|r| {
                            r.get_or_insert_with(|| format!("{what}: {m}"));
                            true
                        });
                    }
                    warn!(resource = what, "Kubernetes watch failed (relisting): {e}");
                }
            }
        }
    })
}

/// Waits until `store` has listed once; fails at once with a refusal.
async fn ready<K>(
    store: &Store<K>,
    refused: &Refusal,
    what: &str,
    wait: Duration,
) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut rx = refused.subscribe();
    tokio::select! {
        r = store.wait_until_ready() => r.map_err(|e| anyhow::anyhow!("Kubernetes {what}: {e}")),
        Ok(r) = rx.wait_for(Option::is_some) => {
            anyhow::bail!("the Kubernetes API refused the federation's {}", r.as_deref().unwrap_or_default())
        }
        () = tokio::time::sleep(wait) => {
            anyhow::bail!("Kubernetes {what} were not listed within {wait:?} (see the federation's log)")
        }
    }
}

/// Connects to the cluster's API.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// The running discovery: stops with the federation.
pub struct Discovery {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Discovery {
    /// Starts the reflectors and the writer; returns once every cache has
    /// listed once and the first state is written (so a caller sees the
    /// cluster's services), or with the error that prevented it.
    pub async fn start(
        cfg: DiscoveryConfig,
        trust_domain: String,
        reg: Registry,
        heartbeat_ttl: Duration,
        replica: String,
    ) -> anyhow::Result<Self> {
        let client = client(cfg.kubeconfig.as_deref()).await?;
        let changed = Arc::new(Notify::new());
        let refused: Refusal = Arc::new(tokio::sync::watch::channel(None).0);
        let mut tasks = Vec::new();
        let (services, w) = reflector::store::<Service>();
        tasks.push(reflect(
            Api::all(client.clone()),
            w,
            changed.clone(),
            refused.clone(),
            "services",
        ));
        let (slices, w) = reflector::store::<EndpointSlice>();
        tasks.push(reflect(
            Api::all(client.clone()),
            w,
            changed.clone(),
            refused.clone(),
            "endpointslices",
        ));
        let (pods, w) = reflector::store::<Pod>();
        tasks.push(reflect(
            Api::all(client.clone()),
            w,
            changed.clone(),
            refused.clone(),
            "pods",
        ));
        let (nodes, w) = reflector::store::<Node>();
        tasks.push(reflect(
            Api::all(client.clone()),
            w,
            changed.clone(),
            refused.clone(),
            "nodes",
        ));
        // ServiceExports, if the Multi-Cluster Services CRD is installed.
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport"),
            "serviceexports",
        );
        let exports_api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let exports: Option<Store<DynamicObject>> = match exports_api
            .list(&kube::api::ListParams::default().limit(1))
            .await
        {
            Ok(_) => {
                let w = reflector::store::Writer::new(ar.clone());
                let r = w.as_reader();
                tasks.push(reflect(
                    exports_api,
                    w,
                    changed.clone(),
                    refused.clone(),
                    "serviceexports",
                ));
                Some(r)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                info!("the ServiceExport CRD is not installed: Services are exported by label or annotation {} only", cfg.export_label);
                None
            }
            Err(kube::Error::Api(s)) => {
                anyhow::bail!("listing ServiceExports: {} ({})", s.message, s.code)
            }
            Err(e) => anyhow::bail!("listing ServiceExports: {e}"),
        };
        // On failure the tasks are dropped with `tasks`, not stopped: stop them.
        let started = async {
            let wait = Duration::from_secs(60);
            ready(&services, &refused, "services", wait).await?;
            ready(&slices, &refused, "endpointslices", wait).await?;
            ready(&pods, &refused, "pods", wait).await?;
            ready(&nodes, &refused, "nodes", wait).await?;
            if let Some(x) = &exports {
                ready(x, &refused, "serviceexports", wait).await?;
            }
            anyhow::Ok(())
        };
        if let Err(e) = started.await {
            for t in &tasks {
                t.abort();
            }
            return Err(e);
        }
        let snapshot = move || Snapshot {
            services: services.state(),
            slices: slices.state(),
            pods: pods.state(),
            nodes: nodes.state(),
            exports: exports
                .as_ref()
                .map(|x| {
                    x.state()
                        .iter()
                        .map(|o| (o.namespace().unwrap_or_default(), o.name_any()))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let mut published = Published::read(&reg, &cfg.cluster).await?;
        let first = desired(&cfg, &trust_domain, &snapshot());
        for s in &first.skipped {
            warn!("Kubernetes discovery skipped {s}");
        }
        let (p, d) = published.apply(&reg, &cfg.cluster, &first).await?;
        info!(cluster = %cfg.cluster, endpoints = first.endpoints.len(), exports = first.exports.len(), puts = p, deletes = d, "Kubernetes discovery synced");
        let lease = reg
            .start_heartbeat(&cfg.cluster, heartbeat_ttl, &replica)
            .await?;
        tasks.push(tokio::spawn(async move {
            let mut lease = lease;
            let mut beat = tokio::time::interval(heartbeat_ttl / 3);
            let mut last_skipped = first.skipped;
            loop {
                tokio::select! {
                    () = changed.notified() => {
                        // Let a burst of events settle.
                        tokio::time::sleep(DEBOUNCE).await;
                        let want = desired(&cfg, &trust_domain, &snapshot());
                        if want.skipped != last_skipped {
                            for s in &want.skipped {
                                warn!("Kubernetes discovery skipped {s}");
                            }
                            last_skipped.clone_from(&want.skipped);
                        }
                        match published.apply(&reg, &cfg.cluster, &want).await {
                            Ok((0, 0)) => {}
                            Ok((p, d)) => info!(cluster = %cfg.cluster, puts = p, deletes = d, "Kubernetes discovery wrote changes"),
                            Err(e) => {
                                warn!("Kubernetes discovery could not write to the registry (retrying): {e}");
                                changed.notify_one();
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                    _ = beat.tick() => {
                        match reg.store().keep_alive(lease).await {
                            Ok(Some(_)) => {}
                            _ => match reg.start_heartbeat(&cfg.cluster, heartbeat_ttl, &replica).await {
                                Ok(l) => lease = l,
                                Err(e) => warn!("heartbeat of {}: {e}", cfg.cluster),
                            },
                        }
                    }
                }
            }
        }));
        Ok(Self { tasks })
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn cfg() -> DiscoveryConfig {
        DiscoveryConfig {
            cluster: ClusterName::new("k8s-1").unwrap(),
            kubeconfig: None,
            export_label: DEFAULT_EXPORT_LABEL.into(),
            gateway_service: ("fedmesh-system".into(), "fedmesh-eastwest-gateway".into()),
        }
    }

    fn node(name: &str, region: &str, zone: &str) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {
                "topology.kubernetes.io/region": region, "topology.kubernetes.io/zone": zone}}}))
            .unwrap(),
        )
    }

    fn snapshot() -> Snapshot {
        let reviews: Service = serde_json::from_value(json!({
            "metadata": {"name": "reviews", "namespace": "shop", "labels": {"fedmesh.io/export": "true"}},
            "spec": {"ports": [
                {"name": "http", "port": 9080, "targetPort": 8080},
                {"name": "grpc-api", "port": 9090, "targetPort": 9090}]}
        }))
        .unwrap();
        let secret: Service = serde_json::from_value(json!({
            "metadata": {"name": "internal", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        let ratings: Service = serde_json::from_value(json!({
            "metadata": {"name": "ratings", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 9080}]}
        }))
        .unwrap();
        let gw: Service = serde_json::from_value(json!({
            "metadata": {"name": "fedmesh-eastwest-gateway", "namespace": "fedmesh-system"},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "tls", "port": 15443}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}
        }))
        .unwrap();
        let slice = |svc: &str, name: &str, eps: serde_json::Value| -> Arc<EndpointSlice> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": svc}},
                    "addressType": "IPv4",
                    "ports": [
                        {"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"},
                        {"name": "grpc-api", "port": 9090, "protocol": "TCP"}],
                    "endpoints": eps
                }))
                .unwrap(),
            )
        };
        let pod = |name: &str, sa: &str| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "shop", "labels": {"app": "reviews", "version": "v2"}},
                    "spec": {"serviceAccountName": sa, "containers": []}
                }))
                .unwrap(),
            )
        };
        Snapshot {
            services: vec![
                Arc::new(reviews),
                Arc::new(secret),
                Arc::new(ratings),
                Arc::new(gw),
            ],
            slices: vec![
                slice(
                    "reviews",
                    "reviews-abc",
                    json!([
                        {"addresses": ["10.1.0.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
                         "nodeName": "node-a", "targetRef": {"kind": "Pod", "name": "reviews-1", "namespace": "shop"}},
                        {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "serving": true, "terminating": true},
                         "nodeName": "node-b", "targetRef": {"kind": "Pod", "name": "reviews-2", "namespace": "shop"}},
                        {"addresses": ["10.1.0.7"], "conditions": {"ready": false, "serving": false, "terminating": false},
                         "zone": "eu-west-1c", "targetRef": {"kind": "Pod", "name": "reviews-3", "namespace": "shop"}}
                    ]),
                ),
                slice(
                    "internal",
                    "internal-x",
                    json!([{"addresses": ["10.1.0.9"], "conditions": {"ready": true}}]),
                ),
                slice(
                    "ratings",
                    "ratings-y",
                    json!([{"addresses": ["10.1.0.10"], "conditions": {"ready": true}, "nodeName": "node-a"}]),
                ),
            ],
            pods: vec![pod("reviews-1", "reviews"), pod("reviews-2", "reviews")],
            nodes: vec![
                node("node-a", "eu-west", "eu-west-1a"),
                node("node-b", "eu-west", "eu-west-1b"),
                node("node-c", "eu-west", "eu-west-1a"),
            ],
            exports: [("shop".to_string(), "ratings".to_string())].into(),
        }
    }

    #[test]
    fn exported_services_become_endpoints_with_locality_identity_and_health() {
        let d = desired(&cfg(), "cluster.local", &snapshot());
        assert!(d.skipped.is_empty(), "{:?}", d.skipped);
        let exports: Vec<String> = d.exports.iter().map(ToString::to_string).collect();
        // `internal` carries no label and has no ServiceExport.
        assert_eq!(exports.len(), 2, "{exports:?}");
        let c = d.cluster.unwrap();
        assert_eq!(c.locality.to_string(), "eu-west/eu-west-1a");
        assert_eq!(c.gateways.len(), 1);
        assert_eq!(c.gateways[0].to_string(), "203.0.113.10:15443");
        let by_id: BTreeMap<String, &Endpoint> = d
            .endpoints
            .values()
            .map(|e| (e.id.to_string(), e))
            .collect();
        assert_eq!(by_id.len(), 4, "{:?}", by_id.keys());
        let r1 = by_id["reviews-1"];
        assert_eq!(r1.health, mesh_core::endpoint::Health::Healthy);
        assert_eq!(r1.locality.to_string(), "eu-west/eu-west-1a");
        assert_eq!(
            r1.identity.as_ref().unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/reviews"
        );
        assert_eq!(r1.labels["version"], "v2");
        assert_eq!(r1.labels[SOURCE_LABEL], SOURCE);
        // Callers dial the Service's port; the pod listens on the slice's.
        let http = r1
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some("http"))
            .unwrap();
        assert_eq!(
            (http.number.get(), http.target.map(|t| t.get())),
            (9080, Some(8080))
        );
        assert_eq!(http.protocol.as_str(), "http");
        let grpc = r1.ports.iter().find(|p| p.number.get() == 9090).unwrap();
        assert_eq!(grpc.protocol.as_str(), "grpc");
        assert_eq!(grpc.target, None);
        assert_eq!(
            by_id["reviews-2"].health,
            mesh_core::endpoint::Health::Draining
        );
        assert_eq!(
            by_id["reviews-2"].locality.to_string(),
            "eu-west/eu-west-1b"
        );
        let r3 = by_id["reviews-3"];
        assert_eq!(r3.health, mesh_core::endpoint::Health::Unhealthy);
        // No node: the slice's zone, the cluster's region; no pod: no identity.
        assert_eq!(r3.locality.to_string(), "eu-west/eu-west-1c");
        assert!(r3.identity.is_none());
        // Exported by its ServiceExport; no pod named, so named by address.
        assert!(by_id.contains_key("10-1-0-10"), "{:?}", by_id.keys());
    }

    #[test]
    fn a_relabelled_node_moves_its_endpoints() {
        let mut s = snapshot();
        s.nodes[0] = node("node-a", "eu-west", "eu-west-1c");
        let d = desired(&cfg(), "cluster.local", &s);
        let r1 = d
            .endpoints
            .values()
            .find(|e| e.id.as_str() == "reviews-1")
            .unwrap();
        assert_eq!(r1.locality.to_string(), "eu-west/eu-west-1c");
    }

    #[test]
    fn a_pod_with_the_agent_sidecar_is_left_to_its_agent() {
        let ids = |s: &Snapshot| -> Vec<String> {
            desired(&cfg(), "cluster.local", s)
                .endpoints
                .values()
                .map(|e| e.id.to_string())
                .collect()
        };
        assert!(ids(&snapshot()).contains(&"reviews-1".to_string()));
        // A sidecar container, and a native sidecar (an init container
        // that keeps running).
        for native in [false, true] {
            let mut s = snapshot();
            let p = s
                .pods
                .iter_mut()
                .find(|p| p.metadata.name.as_deref() == Some("reviews-1"))
                .unwrap();
            let mut meshed = (**p).clone();
            let spec = meshed.spec.as_mut().unwrap();
            if native {
                spec.init_containers = Some(vec![serde_json::from_value(
                    json!({"name": AGENT_CONTAINER, "restartPolicy": "Always"}),
                )
                .unwrap()]);
            } else {
                spec.containers
                    .push(serde_json::from_value(json!({"name": AGENT_CONTAINER})).unwrap());
            }
            *p = Arc::new(meshed);
            let left = ids(&s);
            assert!(!left.contains(&"reviews-1".to_string()), "{left:?}");
            assert!(left.contains(&"reviews-2".to_string()), "{left:?}");
        }
    }

    #[tokio::test]
    async fn writes_only_the_difference_and_leaves_others_alone() {
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::memory::MemoryStore::new());
        let reg = Registry::new(store.clone());
        // An endpoint an agent registered itself in the same cluster.
        let mut own = desired(&cfg(), "cluster.local", &snapshot())
            .endpoints
            .into_values()
            .next()
            .unwrap();
        own.id = mesh_core::name::EndpointId::new("vm-1").unwrap();
        own.labels.remove(SOURCE_LABEL);
        reg.put_endpoint(&own).await.unwrap();

        let mut p = Published::read(&reg, &cfg().cluster).await.unwrap();
        assert!(p.endpoints.is_empty());
        let first = desired(&cfg(), "cluster.local", &snapshot());
        let (puts, dels) = p.apply(&reg, &cfg().cluster, &first).await.unwrap();
        assert_eq!((puts, dels), (1 + 2 + 4, 0));
        // Nothing changed: nothing written.
        assert_eq!(p.apply(&reg, &cfg().cluster, &first).await.unwrap(), (0, 0));
        // A restart reads back what it wrote.
        let mut p = Published::read(&reg, &cfg().cluster).await.unwrap();
        assert_eq!(p.endpoints.len(), 4);
        assert_eq!(p.apply(&reg, &cfg().cluster, &first).await.unwrap(), (0, 0));
        // The ServiceExport goes: ratings is withdrawn with its endpoint.
        let mut s = snapshot();
        s.exports.clear();
        let second = desired(&cfg(), "cluster.local", &s);
        assert_eq!(
            p.apply(&reg, &cfg().cluster, &second).await.unwrap(),
            (0, 2)
        );
        let left = Published::read(&reg, &cfg().cluster).await.unwrap();
        assert_eq!(left.endpoints.len(), 3);
        assert_eq!(left.exports.len(), 1);
        // The agent's own endpoint is untouched.
        assert!(store
            .get(&registry::endpoint_key(&own.key()))
            .await
            .unwrap()
            .is_some());
    }
}
