//! Data-plane probes: every interval the gateway checks the other
//! clusters' gateways and, through each, every service that cluster
//! exports, and reports what it found to the federation. The leader then
//! fails a service over alone when it is dead behind a healthy gateway, and
//! changes only the probing cluster's weights when the partition is seen
//! from there alone.
//!
//! A gateway is reachable when it accepts a TCP connection. A service is
//! reachable through it when a TLS ClientHello with the service's SNI gets
//! an answer: the remote gateway routed it to an endpoint whose agent
//! answered (a gateway refusing an SNI closes without a byte). The probe
//! never completes a handshake and holds no certificate.

use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_core::cluster::{gateway_socket_addrs, ClusterInfo, GatewayAddress};
use mesh_core::name::ClusterName;
use mesh_core::service::ServiceKey;
use mesh_core::sni::SniName;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

/// Connect timeout of a probe.
const CONNECT: Duration = Duration::from_secs(1);
/// How long a service probe waits for the first byte back.
const ANSWER: Duration = Duration::from_secs(2);
/// Probes in flight at once.
const CONCURRENCY: usize = 16;

/// What the gateway knows of the other clusters, from Discovery.
#[derive(Debug, Default)]
pub struct View {
    gateways: BTreeMap<ClusterName, Vec<GatewayAddress>>,
    exports: BTreeSet<(ServiceKey, ClusterName)>,
    ports: BTreeMap<(ServiceKey, ClusterName), u16>,
}

/// Shared between the Discovery sink and the prober.
pub type SharedView = Arc<Mutex<View>>;

impl View {
    /// A cluster's info: every gateway address of it is probed, names as
    /// they resolve.
    pub fn cluster(&mut self, own: &ClusterName, c: &ClusterInfo) {
        if &c.name == own || c.gateways.is_empty() {
            self.gateways.remove(&c.name);
            return;
        }
        self.gateways.insert(c.name.clone(), c.gateways.clone());
    }

    /// A cluster removed.
    pub fn remove_cluster(&mut self, c: &ClusterName) {
        self.gateways.remove(c);
    }

    /// An export added or withdrawn.
    pub fn export(&mut self, svc: ServiceKey, c: ClusterName, exported: bool) {
        if exported {
            self.exports.insert((svc, c));
        } else {
            self.exports.remove(&(svc, c));
        }
    }

    /// A service's port in a cluster (the first an endpoint lists).
    pub fn port(&mut self, svc: &ServiceKey, c: &ClusterName, port: u16) {
        self.ports.entry((svc.clone(), c.clone())).or_insert(port);
    }

    /// Forgets everything (a new snapshot).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A ClientHello for `sni`, as a TLS client would send it.
fn client_hello(sni: &str) -> Option<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).ok()?;
    let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).ok()?;
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).ok()?;
    }
    Some(out)
}

async fn gateway_up(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

async fn service_up(addr: SocketAddr, sni: &str) -> bool {
    let Some(hello) = client_hello(sni) else {
        return false;
    };
    let Ok(Ok(mut s)) = tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    if s.write_all(&hello).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(
        tokio::time::timeout(ANSWER, s.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// One round: every other cluster's gateway addresses (a cluster whose
/// gateway is a name never answered yet is left out: nothing is known of
/// it), and every service it exports. A gateway is reachable when any of
/// its addresses is; a service when it answers through any reachable one.
pub async fn round(view: &SharedView, dns: Option<&mesh_node::dns::Dns>) -> Vec<api::ProbeResult> {
    let answers = dns.map(mesh_node::dns::Dns::answers);
    let (gateways, targets) = {
        let v = view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gateways: BTreeMap<ClusterName, Vec<SocketAddr>> = v
            .gateways
            .iter()
            .map(|(c, gws)| {
                let addrs =
                    gateway_socket_addrs(gws, |n| answers.as_ref().and_then(|a| a.get(n).cloned()));
                (c.clone(), addrs)
            })
            .filter(|(_, a)| !a.is_empty())
            .collect();
        let targets: Vec<(ClusterName, ServiceKey, String)> = v
            .exports
            .iter()
            .filter_map(|(svc, c)| {
                gateways.get(c)?;
                let port = NonZeroU16::new(*v.ports.get(&(svc.clone(), c.clone()))?)?;
                let sni = SniName::new(svc.clone(), port, None).encode();
                Some((c.clone(), svc.clone(), sni))
            })
            .collect();
        (gateways, targets)
    };
    let mut results: BTreeMap<ClusterName, api::ProbeResult> = BTreeMap::new();
    let mut up: BTreeMap<ClusterName, Vec<SocketAddr>> = BTreeMap::new();
    for (c, addrs) in &gateways {
        let checks = addrs
            .iter()
            .map(|a| async move { (*a, gateway_up(*a).await) });
        let reachable: Vec<SocketAddr> = futures::future::join_all(checks)
            .await
            .into_iter()
            .filter_map(|(a, ok)| ok.then_some(a))
            .collect();
        results.insert(
            c.clone(),
            api::ProbeResult {
                cluster: c.to_string(),
                gateway_reachable: !reachable.is_empty(),
                ..Default::default()
            },
        );
        up.insert(c.clone(), reachable);
    }
    for chunk in targets.chunks(CONCURRENCY) {
        let checks = chunk.iter().map(|(c, svc, sni)| {
            let addrs = up.get(c).cloned().unwrap_or_default();
            async move {
                let mut ok = false;
                for a in addrs {
                    if service_up(a, sni).await {
                        ok = true;
                        break;
                    }
                }
                (c.clone(), svc.clone(), ok)
            }
        });
        for (c, svc, up) in futures::future::join_all(checks).await {
            let Some(r) = results.get_mut(&c) else {
                continue;
            };
            if up {
                r.reachable_services += 1;
            } else if r.gateway_reachable {
                r.unreachable_services.push((&svc).into());
            }
        }
    }
    results.into_values().collect()
}

/// Probes every `interval` and reports, until the task is aborted.
pub async fn run(
    fed: mesh_node::fed::Target,
    cluster: ClusterName,
    view: SharedView,
    dns: Option<mesh_node::dns::Dns>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<RegistrationClient<tonic::transport::Channel>> = None;
    let mut last: Option<Vec<api::ProbeResult>> = None;
    loop {
        tick.tick().await;
        let results = round(&view, dns.as_ref()).await;
        if last.as_ref() != Some(&results) {
            for r in &results {
                if !r.gateway_reachable || !r.unreachable_services.is_empty() {
                    info!(cluster = %r.cluster, gateway = r.gateway_reachable, unreachable = r.unreachable_services.len(), "probe: cluster not fully reachable");
                }
            }
            last = Some(results.clone());
        }
        if client.is_none() {
            client = fed.channel().await.ok().map(RegistrationClient::new);
        }
        let Some(c) = client.as_mut() else { continue };
        let req = api::ReportProbesRequest {
            from_cluster: cluster.to_string(),
            results,
        };
        if let Err(s) = c.report_probes(req).await {
            debug!(code = ?s.code(), "probe report not taken: {}", s.message());
            // Unauthenticated: the connection was made before this node
            // had its certificate; the next one presents it.
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Unauthenticated
            ) {
                client = None;
            }
        }
    }
}
