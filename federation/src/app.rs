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

/// Largest gRPC message sent. A snapshot chunk is ~300 KiB; 16 MiB leaves
/// room.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest request accepted by the Admin service (an apply of up to 128
/// policy documents).
const MAX_ADMIN_REQUEST: usize = 4 * 1024 * 1024;
/// Largest request of the Registration and Discovery services (an
/// endpoint, a load or probe report, an ACK).
const MAX_NODE_REQUEST: usize = 256 * 1024;
/// Largest request of Identity and Traffic (a CSR with a chain; weights).
const MAX_SMALL_REQUEST: usize = 64 * 1024;
/// Streams one API connection may have open at once.
const MAX_STREAMS: u32 = 256;

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
    leases_task: JoinHandle<()>,
    /// Publishes this replica's subscribers (shared registries).
    replicas_task: Option<JoinHandle<()>>,
    /// Fired to stop the server gracefully.
    shutdown: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    sync: JoinHandle<()>,
    /// The mesh CA (tests mint credentials with it).
    pub ca: Arc<crate::ca::Ca>,
    /// Operators' role bindings.
    pub roles: Arc<crate::auth::Roles>,
    /// Where the admin listener is bound, if any.
    pub admin: Option<SocketAddr>,
    /// Where the injection webhook is bound, if any.
    pub inject: Option<SocketAddr>,
    /// The federation's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    admin_tasks: Vec<JoinHandle<()>>,
    /// The API's TLS; `None` with `--insecure-plaintext`.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    tls_task: Option<JoinHandle<()>>,
    audit_task: JoinHandle<()>,
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
        RegistrySpec::Embedded(dir) => Arc::new(
            MemoryStore::open(dir)
                .with_context(|| format!("open the embedded registry in {}", dir.display()))?,
        ),
        RegistrySpec::Memory => {
            tracing::warn!("--registry memory: the registry lives in this process only and everything in it (the CA root, policies, weights, tokens) is lost at exit; for tests, never in production");
            Arc::new(MemoryStore::new())
        }
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
    let admin_listener = match cfg.admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("bind the admin listener on {a}"))?,
        ),
        None => None,
    };
    let inject_listener = match &cfg.inject {
        Some(i) => Some(
            tokio::net::TcpListener::bind(i.listen)
                .await
                .with_context(|| format!("bind the injection webhook on {}", i.listen))?,
        ),
        None => None,
    };
    let inject_addr = inject_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()
        .context("webhook address")?;
    let admin_addr = admin_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()
        .context("admin address")?;
    let mut prom = prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::Metrics::register(&mut prom);

    let ca = Arc::new(
        crate::ca::Ca::start(&cfg.ca, store.clone())
            .await
            .context("start the mesh CA")?,
    );
    let roles = Arc::new(crate::auth::Roles::new(store.clone()));
    let tls = if cfg.security.insecure_plaintext {
        crate::tls::check_plaintext_listen(addr).map_err(anyhow::Error::msg)?;
        tracing::warn!(%addr, "--insecure-plaintext: the API is served WITHOUT TLS and WITHOUT authentication; every caller is an admin. Loopback only; never in production");
        None
    } else {
        let sans =
            crate::tls::subject_alt_names(&cfg.security.tls_sans).map_err(anyhow::Error::msg)?;
        Some(crate::tls::ServerTls::new(ca.clone(), sans).context("the API's TLS")?)
    };
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
    let leases_task = tokio::spawn(
        crate::leases::reap(
            shared.clone(),
            Registry::new(store.clone()),
            election.clone(),
            cfg.endpoint_gc_after,
        )
        .instrument(tracing::info_span!("leases")),
    );
    let subscribers = Arc::new(Subscribers::default());
    // On a shared registry, every replica's subscribers are visible to all.
    let replicas_task = (store.kind() == "etcd").then(|| {
        tokio::spawn(
            crate::replicas::publish(
                store.clone(),
                cfg.replica.clone(),
                subscribers.clone(),
                cfg.heartbeat_ttl,
            )
            .instrument(tracing::info_span!("replicas")),
        )
    });
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
        .with_election(&cfg.replica, election.clone())
        .with_security(roles.clone(), cfg.security.max_token_ttl),
    );
    let (tx, rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        // A connection's streams are bounded (h2), and so is each call's
        // message (per service, below).
        .max_concurrent_streams(Some(MAX_STREAMS))
        .layer(crate::auth::AuthzLayer::new(
            roles.clone(),
            cfg.security.limits,
            Some(metrics.observer()),
        ))
        .add_service(
            RegistrationServer::new(registration)
                .max_decoding_message_size(MAX_NODE_REQUEST)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            DiscoveryServer::new(DiscoveryService::new(shared.clone(), subscribers.clone()))
                .max_decoding_message_size(MAX_NODE_REQUEST)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            AdminServer::from_arc(admin.clone())
                .max_decoding_message_size(MAX_ADMIN_REQUEST)
                .max_encoding_message_size(MAX_MESSAGE),
        );
    let router = router.add_service(
        mesh_api::v1::traffic_server::TrafficServer::new(
            crate::grpc::traffic::TrafficService::new(shared.clone(), store.clone())
                .with_subscribers(subscribers.clone(), &cfg.replica),
        )
        .max_decoding_message_size(MAX_SMALL_REQUEST)
        .max_encoding_message_size(MAX_MESSAGE),
    );
    let router = router.add_service(
        IdentityServer::new(
            IdentityService::new(
                ca.clone(),
                store.clone(),
                crate::kube_auth::KubeAuth::connect(&cfg.kube).await?,
            )
            .with_operator_ttl(cfg.security.operator_cert_ttl)
            .with_roles(roles.clone()),
        )
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
    if let Some(path) = &cfg.security.bootstrap_admin {
        let url = cfg.security.advertise_url.clone().unwrap_or_else(|| {
            // A wildcard listen address is no name to dial: loopback
            // (the file is for this host; --advertise-url for others).
            let ip = if addr.ip().is_unspecified() {
                if addr.is_ipv4() {
                    std::net::IpAddr::from([127, 0, 0, 1])
                } else {
                    std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
                }
            } else {
                addr.ip()
            };
            format!("https://{}", std::net::SocketAddr::new(ip, addr.port()))
        });
        write_bootstrap_admin(&ca, &roles, &cfg.security, path, &url)
            .await
            .with_context(|| format!("--bootstrap-admin {}", path.display()))?;
    }
    let tls_task = tls.clone().map(|t| tokio::spawn(t.run()));
    let mut admin_tasks = Vec::new();
    if let (Some(l), Some(a), Some(i), Some(tls)) =
        (inject_listener, inject_addr, &cfg.inject, &tls)
    {
        tracing::info!(template = %i.template_path.display(), "sidecar-injection webhook listening on {a}");
        admin_tasks.push(tokio::spawn(crate::inject::serve(
            l,
            tls.clone(),
            i.template.clone(),
            metrics.clone(),
        )));
    }
    {
        // Ready while the registry answers; the gauges follow the state.
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (shared, subs, m, r, ca) = (
            shared.clone(),
            subscribers.clone(),
            metrics.clone(),
            ready.clone(),
            ca.clone(),
        );
        admin_tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            for n in 0u64.. {
                tick.tick().await;
                // The CA's expiries every 5 s (they change at renewals and
                // when a cluster's first certificate is signed).
                if n % 10 == 0 {
                    if let Ok(inters) = ca.intermediate_infos().await {
                        m.set_ca(&ca.record().root_infos(), &inters);
                    }
                }
                let h = shared.health();
                let up = h.reachable && h.synced;
                r.store(up, std::sync::atomic::Ordering::Release);
                m.registry_reachable
                    .set(i64::from(shared.health().reachable));
                m.subscribers
                    .set(i64::try_from(subs.list().len()).unwrap_or(i64::MAX));
            }
        }));
        if let Some(l) = admin_listener {
            let admin = Arc::new(mesh_node::admin::Admin {
                registry: prom,
                ready,
                not_ready: "the registry is unreachable (or not read yet)",
                draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            });
            admin_tasks.push(tokio::spawn(admin.serve(l)));
        }
    }
    let audit_task = tokio::spawn(crate::audit::keep_within(
        store.clone(),
        election.clone(),
        cfg.security.audit,
    ));
    let server = tokio::spawn(
        router
            // TLS (or plain text on loopback), TCP_NODELAY, the principal
            // of each connection: see crate::tls.
            .serve_with_incoming_shutdown(
                crate::tls::incoming(listener, tls.clone(), cfg.security.max_connections),
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
        leases_task,
        replicas_task,
        shutdown: tx,
        server,
        sync,
        ca,
        roles,
        tls,
        tls_task,
        audit_task,
        admin: admin_addr,
        inject: inject_addr,
        metrics,
        admin_tasks,
        discovery,
        crds,
    })
}

/// An operator's credential signed here: the key is made in this process
/// and returned with the chain (the bootstrap admin, the local demo).
pub fn mint_operator(
    ca: &crate::ca::Ca,
    name: &str,
    ttl: std::time::Duration,
) -> anyhow::Result<(crate::ca::Issued, String)> {
    crate::auth::check_operator_name(name).map_err(anyhow::Error::msg)?;
    let key = rcgen::KeyPair::generate().context("generate a key")?;
    let issued = ca
        .sign_direct(
            &key,
            &crate::auth::operator_id(ca.trust_domain().as_str(), name),
            &[],
            ttl,
            true,
        )
        .context("sign the operator's certificate")?;
    Ok((issued, key.serialize_pem()))
}

/// A node's credential signed here (tests, and nodes started in-process):
/// a certificate for `identity` from the intermediate of `cluster`, and its
/// key, PEM.
pub async fn mint_node(
    ca: &crate::ca::Ca,
    cluster: &mesh_core::name::ClusterName,
    identity: &mesh_core::identity::Identity,
) -> anyhow::Result<(crate::ca::Issued, String)> {
    let key = rcgen::KeyPair::generate().context("generate a key")?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).context("CSR")?;
    p.subject_alt_names = vec![rcgen::SanType::URI(
        identity.to_string().try_into().context("SPIFFE ID")?,
    )];
    let csr = p
        .serialize_request(&key)
        .context("CSR")?
        .pem()
        .context("CSR")?;
    let issued = ca
        .sign(cluster, &csr, identity, None)
        .await
        .context("sign the node's certificate")?;
    Ok((issued, key.serialize_pem()))
}

impl Bound {
    /// A credential for operator `name`, bound to `roles` now, as a
    /// `meshctl` context named after them (the demo's admin; tests).
    pub async fn operator_context(
        &self,
        name: &str,
        roles: &[crate::auth::Role],
    ) -> anyhow::Result<mesh_core::client_config::Context> {
        let (issued, key_pem) =
            mint_operator(&self.ca, name, std::time::Duration::from_secs(24 * 3600))?;
        self.roles
            .set(name, roles.iter().copied().collect(), "in-process")
            .await
            .context("bind the roles")?;
        Ok(mesh_core::client_config::Context {
            name: name.to_string(),
            server: self.url(),
            certificate_authority_data: issued.bundle_pem,
            client_certificate_data: issued.chain_pem,
            client_key_data: key_pem,
        })
    }

    /// A credential for a node (agent or gateway) of `cluster` with
    /// `identity` (`spiffe://...`), as a context.
    pub async fn node_context(
        &self,
        cluster: &str,
        identity: &str,
    ) -> anyhow::Result<mesh_core::client_config::Context> {
        let c = mesh_core::name::ClusterName::new(cluster).context("cluster")?;
        let id: mesh_core::identity::Identity = identity.parse().context("identity")?;
        let (issued, key_pem) = mint_node(&self.ca, &c, &id).await?;
        Ok(mesh_core::client_config::Context {
            name: format!("{cluster}/{id}"),
            server: self.url(),
            certificate_authority_data: issued.bundle_pem,
            client_certificate_data: issued.chain_pem,
            client_key_data: key_pem,
        })
    }
}

/// Binds the admin role to the bootstrap admin and writes their `meshctl`
/// configuration (context `fedmesh`) to `path`, mode 0600.
async fn write_bootstrap_admin(
    ca: &crate::ca::Ca,
    roles: &crate::auth::Roles,
    sec: &crate::config::ApiSecurity,
    path: &std::path::Path,
    url: &str,
) -> anyhow::Result<()> {
    let name = &sec.bootstrap_admin_name;
    let (issued, key_pem) = mint_operator(ca, name, sec.operator_cert_ttl)?;
    let mut held = roles
        .of(name)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    if !held.contains(&crate::auth::Role::Admin) {
        held.insert(crate::auth::Role::Admin);
        roles
            .set(name, held, "bootstrap")
            .await
            .context("bind the admin role")?;
        crate::audit::record_by(
            &**roles.store(),
            "role_binding",
            "bootstrap",
            &format!("operator:{name}"),
            "roles admin",
        )
        .await;
    }
    let mut file =
        mesh_core::client_config::ClientConfig::load(path).map_err(anyhow::Error::msg)?;
    file.upsert(mesh_core::client_config::Context {
        name: "fedmesh".into(),
        server: url.to_string(),
        certificate_authority_data: issued.bundle_pem.clone(),
        client_certificate_data: issued.chain_pem,
        client_key_data: key_pem,
    });
    file.save(path).map_err(anyhow::Error::msg)?;
    tracing::info!(path = %path.display(), operator = %name, "wrote the first admin's meshctl configuration");
    Ok(())
}

impl Bound {
    /// The API's URL: `https://` unless `--insecure-plaintext`.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

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
        self.leases_task.abort();
        // Not revoked: the rows expire with the lease, as when a replica dies.
        if let Some(t) = self.replicas_task {
            t.abort();
        }
        if let Some(t) = self.tls_task {
            t.abort();
        }
        self.audit_task.abort();
        for t in self.admin_tasks {
            t.abort();
        }
        result
    }
}
