//! Builds and runs a federation replica: the registry store, the sync loop
//! and the gRPC API. Used by `main.rs` and by the tests.

use crate::config::{Config, RegistrySpec};
use crate::grpc::admin::AdminService;
use crate::grpc::discovery::{DiscoveryService, Subscribers};
use crate::grpc::identity::IdentityService;
use crate::grpc::registration::RegistrationService;
use crate::registry::Registry;
use crate::state::Shared;
use crate::store::etcd::EtcdStore;
use crate::store::memory::MemoryStore;
use crate::store::Store;
use anyhow::Context;
use mesh_api::v1::admin_server::AdminServer;
use mesh_api::v1::discovery_server::DiscoveryServer;
use mesh_api::v1::identity_server::IdentityServer;
use mesh_api::v1::registration_server::RegistrationServer;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Largest gRPC message accepted or sent. Requests are small; a snapshot
/// chunk is ~300 KiB. 16 MiB leaves room without inviting abuse.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// A running replica.
pub struct Bound {
    /// The address the API actually listens on.
    pub addr: SocketAddr,
    /// The served state (tests read it).
    pub shared: Arc<Shared>,
    /// The store under the registry.
    pub store: Arc<dyn Store>,
    /// This replica's view of the leader election.
    pub election: crate::leader::Election,
    stop_election: tokio::sync::watch::Sender<bool>,
    election_task: JoinHandle<()>,
    weights_task: JoinHandle<()>,
    /// Fired to stop the server gracefully.
    shutdown: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    sync: JoinHandle<()>,
    /// Kubernetes discovery, when configured.
    discovery: Option<crate::kube_discovery::Discovery>,
    /// Custom-resource watches, when configured.
    crds: Option<crate::kube_crds::Crds>,
}

/// Opens the registry named by `spec` (over TLS when `tls` is given).
pub async fn open_store(
    spec: &RegistrySpec,
    tls: Option<&crate::store::etcd::EtcdTls>,
) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match spec {
        RegistrySpec::Memory => Arc::new(MemoryStore::new()),
        RegistrySpec::Etcd(eps) => Arc::new(
            EtcdStore::connect_with(eps, tls)
                .await
                .context("etcd client")?,
        ),
    })
}

/// Opens the registry, binds the API and starts serving.
pub async fn build(cfg: &Config) -> anyhow::Result<Bound> {
    let store = open_store(&cfg.registry, cfg.etcd_tls.as_ref()).await?;
    serve(cfg, store).await
}

/// Starts serving over an already opened store.
pub async fn serve(cfg: &Config, store: Arc<dyn Store>) -> anyhow::Result<Bound> {
    // Bind first: a taken port fails start-up before anything else runs.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("bind the API on {}", cfg.listen))?;
    let addr = listener.local_addr().context("local address")?;

    let ca = Arc::new(
        crate::ca::Ca::start(&cfg.ca, store.clone())
            .await
            .context("start the mesh CA")?,
    );
    let shared = Shared::new(store.kind());
    {
        let shared = shared.clone();
        ca.follow(Arc::new(move || shared.read().trust().map(|(rec, _)| rec)));
    }
    let sync = tokio::spawn(
        crate::sync::run(store.clone(), shared.clone())
            .instrument(tracing::info_span!("sync", registry = store.kind())),
    );
    let (stop_election, stop_rx) = tokio::sync::watch::channel(false);
    let (election, election_task) =
        crate::leader::start(store.clone(), cfg.replica.clone(), cfg.leader_ttl, stop_rx);
    let weights_task = tokio::spawn(
        crate::weights::run(
            shared.clone(),
            election.clone(),
            cfg.weights_interval,
            store.clone(),
        )
        .instrument(tracing::info_span!("weights")),
    );
    let subscribers = Arc::new(Subscribers::default());
    let registration = RegistrationService::new(
        Registry::new(store.clone()),
        shared.clone(),
        cfg.heartbeat_ttl,
        cfg.replica.clone(),
    );
    let admin = Arc::new(
        AdminService::new(
            shared.clone(),
            subscribers.clone(),
            Registry::new(store.clone()),
            ca.clone(),
        )
        .with_election(&cfg.replica, election.clone()),
    );
    let (tx, rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(
            RegistrationServer::new(registration)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            DiscoveryServer::new(DiscoveryService::new(shared.clone(), subscribers.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            AdminServer::from_arc(admin.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        );
    let router = router.add_service(mesh_api::v1::traffic_server::TrafficServer::new(
        crate::grpc::traffic::TrafficService::new(shared.clone(), store.clone()),
    ));
    let router = router.add_service(
        IdentityServer::new(IdentityService::new(
            ca,
            store.clone(),
            crate::kube_auth::KubeAuth::connect(&cfg.kube).await?,
        ))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE),
    );
    // Kubernetes discovery: once its caches listed, before the API serves,
    // so that the first subscribers see the cluster's services.
    let discovery = match &cfg.discovery {
        Some(d) => Some(
            crate::kube_discovery::Discovery::start(
                d.clone(),
                cfg.ca.trust_domain.clone(),
                Registry::new(store.clone()),
                cfg.heartbeat_ttl,
                cfg.replica.clone(),
            )
            .await
            .with_context(|| format!("Kubernetes discovery of cluster {}", d.cluster))?,
        ),
        None => None,
    };
    // Policy as custom resources, through the Admin API's apply.
    let crds = match (&cfg.discovery, cfg.watch_crds) {
        (Some(d), true) => {
            let client = crate::kube_discovery::client(d.kubeconfig.as_deref())
                .await
                .context("Kubernetes client for --watch-crds")?;
            Some(
                crate::kube_crds::Crds::start(&client, admin.clone(), d.cluster.as_str())
                    .await
                    .context("--watch-crds")?,
            )
        }
        _ => None,
    };
    let server = tokio::spawn(
        router
            // TCP_NODELAY on accepted connections: without it a unary call
            // waits for the peer's delayed ACK (~40 ms on Linux).
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = rx.await;
                },
            )
            .in_current_span(),
    );
    Ok(Bound {
        addr,
        shared,
        store,
        election,
        stop_election,
        election_task,
        weights_task,
        shutdown: tx,
        server,
        sync,
        discovery,
        crds,
    })
}

impl Bound {
    /// Ends discovery streams (UNAVAILABLE: reconnect), stops accepting,
    /// lets in-flight calls finish up to `grace`, stops the sync loop.
    pub async fn shutdown(self, grace: std::time::Duration) -> anyhow::Result<()> {
        drop(self.crds);
        drop(self.discovery);
        self.shared.close();
        // Hand the lead over now rather than after the lease TTL.
        let _ = self.stop_election.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.election_task).await;
        let _ = self.shutdown.send(());
        let mut server = self.server;
        let result = match tokio::time::timeout(grace, &mut server).await {
            Ok(joined) => joined.context("server task")?.context("gRPC server"),
            Err(_) => {
                tracing::warn!(?grace, "grace period over; closing remaining streams");
                server.abort();
                Ok(())
            }
        };
        self.sync.abort();
        self.weights_task.abort();
        result
    }
}
