//! The gateway's federation client: subscribes to Discovery, turns the
//! snapshot and deltas into routing tables, ACKs each version (or NACKs it
//! with the reason, keeping what it could apply), and reconnects with
//! backoff. Between connections it keeps routing from its last table, and it
//! saves that state to a file so a restart without the federation routes too.

use crate::route::{Builder, Table};
use arc_swap::ArcSwap;
use mesh_api::v1 as api;
use mesh_api::v1::discovery_client::DiscoveryClient;
use mesh_api::v1::discovery_request::Request as Req;
use mesh_core::cluster::ClusterInfo;
use mesh_core::convert::FromApi;
use mesh_core::endpoint::{Endpoint, EndpointKey};
use mesh_core::name::ClusterName;
use mesh_core::service::ServiceKey;
use prost::Message;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Reconnect backoff: first and maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The state file is rewritten at most this often.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Snapshots can be large (100k endpoints is ~15 MiB in chunks of ~300 KiB);
/// this bounds one message.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// A running Discovery client.
pub struct Client {
    url: String,
    node_id: String,
    cluster: ClusterName,
    builder: Builder,
    routes: Arc<ArcSwap<Table>>,
    /// Set once a table from the federation (or the state file) is in place.
    ready: Arc<AtomicBool>,
    state_file: Option<PathBuf>,
    dirty: bool,
    last_save: Instant,
    /// DNS server for gateway names (`None`: the system's).
    dns_server: Option<std::net::SocketAddr>,
    resolver: Option<crate::resolve::PeerResolver>,
}

impl Client {
    /// A client of the federation at `url` for this gateway.
    pub fn new(
        url: String,
        cluster: ClusterName,
        builder: Builder,
        routes: Arc<ArcSwap<Table>>,
        ready: Arc<AtomicBool>,
        state_file: Option<PathBuf>,
    ) -> Self {
        let node_id = format!("gateway~{cluster}~{}", std::process::id());
        Self {
            url,
            node_id,
            cluster,
            builder,
            routes,
            ready,
            state_file,
            dirty: false,
            last_save: Instant::now(),
            dns_server: None,
            resolver: None,
        }
    }

    /// Resolves remote gateways' DNS names with this server instead of the system's.
    pub fn with_dns_server(mut self, server: Option<std::net::SocketAddr>) -> Self {
        self.dns_server = server;
        self
    }

    /// Loads the state file (if any), then follows the federation forever.
    pub async fn run(mut self) {
        match crate::resolve::PeerResolver::new(self.dns_server) {
            Ok(r) => self.resolver = Some(r),
            Err(e) => warn!("no DNS resolver for gateway names: {e:#}"),
        }
        self.load_state();
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            match self.session().await {
                Ok(()) => {
                    warn!(url = %self.url, "federation closed the discovery stream; reconnecting")
                }
                Err(e) => {
                    warn!(url = %self.url, "discovery: {e:#}; keeping the last routing table")
                }
            }
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn load_state(&mut self) {
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
                let mut touched = BTreeSet::new();
                self.builder.reset();
                let version = snap.version;
                let errors = self.apply(snap, &mut touched);
                self.publish(version, &touched);
                info!(path = %path.display(), version, skipped = errors.len(), routes = self.routes.load().len(),
                    "routing from the saved state until the federation answers");
            }
            Err(e) => warn!(path = %path.display(), "ignoring an unreadable state file: {e}"),
        }
    }

    async fn session(&mut self) -> anyhow::Result<()> {
        let ch = tonic::transport::Endpoint::from_shared(self.url.clone())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_keepalive(Some(Duration::from_secs(10)))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let mut client = DiscoveryClient::new(ch).max_decoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel(16);
        tx.send(request(Req::Subscribe(api::Subscribe {
            node_id: self.node_id.clone(),
            cluster: self.cluster.to_string(),
            kind: api::NodeKind::Gateway as i32,
        })))
        .await?;
        let mut stream = client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        info!(url = %self.url, "subscribed to the federation");
        let mut touched = BTreeSet::new();
        let mut errors = Vec::new();
        let mut tick = tokio::time::interval(SAVE_EVERY);
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = tick.tick() => {
                    if self.refresh_dns().await {
                        self.publish(self.builder.table().version, &BTreeSet::new());
                    }
                    self.save_if_due();
                    continue;
                }
            };
            let Some(msg) = msg else { return Ok(()) };
            let version = msg.version;
            let chunk = msg.snapshot;
            if chunk.as_ref().is_some_and(|c| c.index == 0) {
                // A new snapshot replaces everything; the old table keeps
                // serving until the last chunk is in.
                self.builder.reset();
                touched.clear();
                errors.clear();
            }
            errors.extend(self.apply(msg, &mut touched));
            if chunk.as_ref().is_some_and(|c| !c.last) {
                continue;
            }
            self.refresh_dns().await;
            self.publish(version, &touched);
            touched.clear();
            let answer = if errors.is_empty() {
                Req::Ack(api::Ack { version })
            } else {
                let reason = format!(
                    "{} invalid item(s) skipped: {}",
                    errors.len(),
                    errors
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                warn!(version, %reason, "applied a config version partly");
                Req::Nack(api::Nack { version, reason })
            };
            errors.clear();
            tx.send(request(answer)).await?;
        }
    }

    /// Applies one message to the builder; returns what could not be converted.
    fn apply(
        &mut self,
        msg: api::DiscoveryResponse,
        touched: &mut BTreeSet<ServiceKey>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for c in msg.clusters {
            match c.info.map(|i| ClusterInfo::from_api(i, "cluster")) {
                Some(Ok(info)) => self.builder.upsert_cluster(info),
                Some(Err(e)) => errors.push(e.to_string()),
                None => errors.push("cluster: is required".into()),
            }
        }
        for name in msg.removed_clusters {
            if let Ok(n) = ClusterName::new(&name) {
                self.builder.remove_cluster(&n);
            }
        }
        for e in msg.endpoints {
            match Endpoint::from_api(e, "endpoint") {
                Ok(ep) => touched.extend(self.builder.upsert_endpoint(ep)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        for r in msg.removed_endpoints {
            match EndpointKey::from_api(r, "removed_endpoint") {
                Ok(k) => touched.extend(self.builder.remove_endpoint(&k)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        for x in msg.exports {
            let svc = x.service.map(|s| ServiceKey::from_api(s, "export.service"));
            match (svc, ClusterName::new(&x.cluster)) {
                (Some(Ok(s)), Ok(c)) => touched.extend(self.builder.set_export(s, &c, x.exported)),
                (Some(Err(e)), _) => errors.push(e.to_string()),
                (None, _) => errors.push("export.service: is required".into()),
                (_, Err(e)) => errors.push(format!("export.cluster: {e}")),
            }
        }
        errors
    }

    fn publish(&mut self, version: i64, touched: &BTreeSet<ServiceKey>) {
        for s in touched {
            self.builder.rebuild(s);
        }
        self.builder.set_version(version);
        self.routes.store(Arc::new(self.builder.table()));
        self.ready.store(true, Ordering::Release);
        self.dirty = true;
        self.save_if_due();
    }

    /// Re-resolves the gateway names that are due; returns whether peers changed.
    async fn refresh_dns(&mut self) -> bool {
        let Some(resolver) = self.resolver.as_mut() else {
            return false;
        };
        let mut changed = false;
        for (cluster, host) in self.builder.dns_gateways() {
            if !resolver.due(&host) {
                continue;
            }
            if let Some(ips) = resolver.resolve(&host).await {
                changed |= self.builder.set_dns_peer(&host, &cluster, ips);
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

fn request(r: Req) -> api::DiscoveryRequest {
    api::DiscoveryRequest { request: Some(r) }
}
