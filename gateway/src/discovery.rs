//! The gateway's federation client: subscribes to Discovery, turns the
//! snapshot and deltas into routing tables, ACKs each version (or NACKs it
//! with the reason, keeping what it could apply), and reconnects with
//! backoff. Between connections it keeps routing from its last table, and it
//! saves that state to a file so a restart without the federation routes too.

use crate::route::{Builder, Table};
use arc_swap::ArcSwap;
use mesh_api::v1 as api;
use mesh_core::cluster::ClusterInfo;
use mesh_core::convert::FromApi;
use mesh_core::endpoint::{Endpoint, EndpointKey};
use mesh_core::name::ClusterName;
use mesh_core::service::ServiceKey;
use mesh_node::discovery::{Sink, Subscription};
use prost::Message;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The state file is rewritten at most this often; DNS names are re-checked
/// as often.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// The gateway's [`Sink`]: a route-table builder, published by swapping the table.
pub struct Client {
    target: mesh_node::fed::Target,
    node_id: String,
    cluster: ClusterName,
    builder: Builder,
    routes: Arc<ArcSwap<Table>>,
    /// Set once a table from the federation (or the state file) is in place.
    ready: Arc<AtomicBool>,
    state_file: Option<PathBuf>,
    dirty: bool,
    last_save: Instant,
    /// Resolves other clusters' gateway names (shared with the prober).
    dns: Option<mesh_node::dns::Dns>,
    /// Services touched since the last publish.
    touched: BTreeSet<ServiceKey>,
    /// Version of the table published last.
    version: i64,
    /// What the prober needs of the other clusters.
    probes: crate::probe::SharedView,
}

impl Client {
    /// A client of the federation at `url` for this gateway.
    pub fn new(
        target: mesh_node::fed::Target,
        cluster: ClusterName,
        builder: Builder,
        routes: Arc<ArcSwap<Table>>,
        ready: Arc<AtomicBool>,
        state_file: Option<PathBuf>,
    ) -> Self {
        let node_id = format!("gateway~{cluster}~{}", std::process::id());
        Self {
            target,
            node_id,
            cluster,
            builder,
            routes,
            ready,
            state_file,
            dirty: false,
            last_save: Instant::now(),
            dns: None,
            touched: BTreeSet::new(),
            version: 0,
            probes: crate::probe::SharedView::default(),
        }
    }

    /// The view of the other clusters the prober reads.
    pub fn probe_view(&self) -> crate::probe::SharedView {
        self.probes.clone()
    }

    /// Resolves remote gateways' DNS names with `dns` (whose task the
    /// caller runs).
    pub fn with_dns(mut self, dns: Option<mesh_node::dns::Dns>) -> Self {
        self.dns = dns;
        self
    }

    /// Loads the state file (if any), then follows the federation forever.
    pub async fn run(mut self) {
        self.load_state().await;
        let sub = Subscription {
            url: self.target.url.clone(),
            tls: self.target.tls.clone(),
            subscribe: api::Subscribe {
                node_id: self.node_id.clone(),
                cluster: self.cluster.to_string(),
                kind: api::NodeKind::Gateway as i32,
                ..Default::default()
            },
            tick: SAVE_EVERY,
        };
        mesh_node::discovery::run(sub, &mut self).await;
    }

    async fn load_state(&mut self) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(path = %path.display(), "cannot read the state file: {e}");
                return;
            }
        };
        match api::DiscoveryResponse::decode(bytes.as_slice()) {
            Ok(snap) => {
                self.reset();
                let version = snap.version;
                let errors = self.apply(snap);
                self.publish(version).await;
                info!(path = %path.display(), version, skipped = errors.len(), routes = self.routes.load().len(),
                    "routing from the saved state until the federation answers");
            }
            Err(e) => warn!(path = %path.display(), "ignoring an unreadable state file: {e}"),
        }
    }

    fn rebuild(&mut self, version: i64) {
        for s in std::mem::take(&mut self.touched) {
            self.builder.rebuild(&s);
        }
        self.builder.set_version(version);
        self.version = version;
        self.routes.store(Arc::new(self.builder.table()));
        self.ready.store(true, Ordering::Release);
        self.dirty = true;
        self.save_if_due();
    }

    /// Asks the resolver for the gateway names known now, and takes its
    /// answers in force as peers; returns whether peers changed. Never
    /// waits on DNS.
    fn refresh_dns(&mut self) -> bool {
        let Some(dns) = &self.dns else {
            return false;
        };
        let names = self.builder.dns_gateways();
        dns.want(names.iter().map(|(_, h)| h.clone()));
        let mut changed = false;
        for (cluster, host) in names {
            if let Some(ips) = dns.ips(&host) {
                changed |= self.builder.set_dns_peer(&host, &cluster, ips.to_vec());
            }
        }
        changed
    }

    fn save_if_due(&mut self) {
        if !self.dirty || self.last_save.elapsed() < SAVE_EVERY {
            return;
        }
        let Some(path) = &self.state_file else { return };
        let bytes = self.builder.to_snapshot().encode_to_vec();
        // Write then rename, so a crash never leaves half a file.
        let tmp = path.with_extension("tmp");
        let r = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            warn!(path = %path.display(), "cannot save the routing state: {e}");
        }
        self.dirty = false;
        self.last_save = Instant::now();
    }
}

impl Client {
    fn probe(&self) -> std::sync::MutexGuard<'_, crate::probe::View> {
        self.probes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Sink for Client {
    fn reset(&mut self) {
        // A new snapshot replaces everything; the old table keeps serving
        // until the last chunk is in.
        self.builder.reset();
        self.touched.clear();
        self.probe().clear();
    }

    fn apply(&mut self, msg: api::DiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        if let (Some(trust), Some(tls)) = (&msg.trust, &self.target.tls) {
            // The federation's own certificate follows a root rotation: its
            // link trusts what the mesh trusts.
            if let Err(e) = tls.set_roots(&trust.roots_pem) {
                errors.push(format!("trust: {e:#}"));
            }
        }
        for c in msg.clusters {
            match c.info.map(|i| ClusterInfo::from_api(i, "cluster")) {
                Some(Ok(info)) => {
                    self.probe().cluster(&self.cluster, &info);
                    self.builder.upsert_cluster(info);
                }
                Some(Err(e)) => errors.push(e.to_string()),
                None => errors.push("cluster: is required".into()),
            }
        }
        for name in msg.removed_clusters {
            if let Ok(n) = ClusterName::new(&name) {
                self.probe().remove_cluster(&n);
                self.builder.remove_cluster(&n);
            }
        }
        for e in msg.endpoints {
            match Endpoint::from_api(e, "endpoint") {
                Ok(ep) => {
                    if let Some(p) = ep.ports.first() {
                        self.probe().port(&ep.service, &ep.cluster, p.number.get());
                    }
                    self.touched.extend(self.builder.upsert_endpoint(ep));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        for r in msg.removed_endpoints {
            match EndpointKey::from_api(r, "removed_endpoint") {
                Ok(k) => self.touched.extend(self.builder.remove_endpoint(&k)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        for x in msg.exports {
            let svc = x.service.map(|s| ServiceKey::from_api(s, "export.service"));
            match (svc, ClusterName::new(&x.cluster)) {
                (Some(Ok(s)), Ok(c)) => {
                    self.probe().export(s.clone(), c.clone(), x.exported);
                    self.touched
                        .extend(self.builder.set_export(s, &c, x.exported));
                }
                (Some(Err(e)), _) => errors.push(e.to_string()),
                (None, _) => errors.push("export.service: is required".into()),
                (_, Err(e)) => errors.push(format!("export.cluster: {e}")),
            }
        }
        errors
    }

    async fn publish(&mut self, version: i64) {
        self.refresh_dns();
        self.rebuild(version);
    }

    async fn tick(&mut self) -> bool {
        let changed = self.refresh_dns();
        self.save_if_due();
        changed
    }

    fn version(&self) -> i64 {
        self.version
    }
}
