//! A mesh on loopback for agent tests: a real federation (embedded
//! registry), real certificates from a test CA, real agents built by the same
//! code as the binary, real HTTP backends.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_agent::app::Bound;
use mesh_agent::config::{Args, Config};
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_core::name::Namespace;
use mesh_core::service::ServiceKey;
use mesh_test::tls::TestCa;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpStream;

/// The federation, the CA and a scratch directory for PEM files. The CA is
/// the federation's plug-in root: certificates it issues directly are valid
/// data-plane peers, and the federation's per-cluster intermediates under it
/// sign what agents show the federation.
pub struct Mesh {
    pub fed: federation::app::Bound,
    pub url: String,
    pub ca: TestCa,
    pub dir: tempfile::TempDir,
    /// The federation's roots (the test CA, unless a test took the plug-in
    /// root away), PEM: agents' `--ca`, and `--federation-ca`.
    pub ca_path: PathBuf,
    ca_key_path: PathBuf,
    /// An admin's credential for the federation's API.
    admin: std::sync::Mutex<mesh_node::fed::Target>,
}

/// A cluster to register.
pub struct ClusterSpec<'a> {
    pub name: &'a str,
    pub region: &'a str,
    pub zone: &'a str,
    pub network: &'a str,
    pub gateways: Vec<String>,
}

impl Mesh {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1").await
    }

    /// A mesh whose federation listens on `ip` (loopback, or an address of
    /// a namespace the test created).
    pub async fn start_on(ip: &str) -> Self {
        Self::start_with(ip, |_| {}).await
    }

    /// A mesh whose federation's configuration `tune` adjusts.
    pub async fn start_with(ip: &str, tune: impl FnOnce(&mut federation::config::Config)) -> Self {
        mesh_test::trace_init();
        let listen = std::net::SocketAddr::new(ip.parse().unwrap(), 0);
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca.pem).unwrap();
        let ca_key = dir.path().join("ca-key.pem");
        std::fs::write(&ca_key, &ca.key_pem).unwrap();
        let mut cfg = federation::config::Config::embedded(listen);
        cfg.ca.plug_in = Some((ca_path.clone(), ca_key.clone()));
        cfg.security.tls_sans.push(ip.to_string());
        tune(&mut cfg);
        let fed = federation::app::build(&cfg).await.unwrap();
        std::fs::write(&ca_path, fed.ca.bundle_pem()).unwrap();
        let url = fed.url();
        let admin_ctx = fed
            .operator_context("test-admin", &[federation::auth::Role::Admin])
            .await
            .unwrap();
        let admin = mesh_node::fed::Target::from_context(&admin_ctx).unwrap();
        // The same admin as a meshctl configuration, for tests that run it.
        let mut file = mesh_core::client_config::ClientConfig::default();
        file.upsert(admin_ctx);
        file.save(&dir.path().join("meshctl.yaml")).unwrap();
        Self {
            fed,
            url,
            ca,
            dir,
            ca_path,
            ca_key_path: ca_key,
            admin: std::sync::Mutex::new(admin),
        }
    }

    /// The configuration of a federation replica of this mesh (same CA)
    /// listening on `listen`.
    pub fn replica_config(&self, listen: SocketAddr) -> federation::config::Config {
        let mut cfg = federation::config::Config::embedded(listen);
        cfg.ca.plug_in = Some((self.ca_path.clone(), self.ca_key_path.clone()));
        cfg
    }

    /// A `meshctl` configuration whose context is an admin of this mesh.
    pub fn meshctl_config(&self) -> PathBuf {
        self.dir.path().join("meshctl.yaml")
    }

    /// A channel to the federation's API as an admin (who keeps the CA
    /// bundle current across a root rotation).
    pub async fn admin(&self) -> tonic::transport::Channel {
        let admin = self.admin.lock().unwrap().clone();
        if let Some(tls) = &admin.tls {
            tls.set_roots(&self.fed.ca.bundle_pem()).unwrap();
        }
        admin.channel().await.unwrap()
    }

    /// A new admin certificate, under the root the CA signs with now (what
    /// an operator does after a rotation's reissue stage).
    pub async fn renew_admin(&self) {
        let ctx = self
            .fed
            .operator_context("test-admin", &[federation::auth::Role::Admin])
            .await
            .unwrap();
        *self.admin.lock().unwrap() = mesh_node::fed::Target::from_context(&ctx).unwrap();
    }

    /// A mesh with one cluster, c1 in us-east / us-east-1a, network n1.
    pub async fn one_cluster_on(ip: &str) -> Self {
        let m = Self::start_on(ip).await;
        m.add_c1().await;
        m
    }

    /// [`Mesh::one_cluster_on`] loopback, with the federation's
    /// configuration adjusted by `tune`.
    pub async fn one_cluster_with(tune: impl FnOnce(&mut federation::config::Config)) -> Self {
        let m = Self::start_with("127.0.0.1", tune).await;
        m.add_c1().await;
        m
    }

    /// Registers c1 in us-east-1a, network n1, without a gateway.
    async fn add_c1(&self) {
        self.cluster(ClusterSpec {
            name: "c1",
            region: "us-east",
            zone: "us-east-1a",
            network: "n1",
            gateways: vec![],
        })
        .await;
    }

    /// An agent in c1 (us-east-1a) for `service`, with extra flags.
    pub async fn c1_agent(
        &self,
        service: &str,
        app: SocketAddr,
        port: u16,
        extra: &[&str],
    ) -> Bound {
        let mut a = self.args("c1", "us-east", "us-east-1a", service, app, port);
        a.extend(extra.iter().map(ToString::to_string));
        self.agent(a).await
    }

    pub async fn cluster(&self, c: ClusterSpec<'_>) {
        let mut reg = RegistrationClient::new(self.admin().await);
        reg.register_cluster(api::RegisterClusterRequest {
            cluster: Some(api::ClusterInfo {
                name: c.name.into(),
                locality: Some(api::Locality {
                    region: c.region.into(),
                    zone: c.zone.into(),
                }),
                network: c.network.into(),
                gateway_addresses: c.gateways,
                trust_domain: "cluster.local".into(),
                allow_local_endpoints: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }

    /// Cluster `name` (eu-west) on its own `network`, reached only through
    /// its east-west gateway: the gateway, started here with `extra` flags
    /// and following this federation, and the cluster registered with it.
    pub async fn remote_cluster(
        &self,
        name: &str,
        network: &str,
        extra: &[&str],
    ) -> gateway::app::Bound {
        let gw = self.gateway(name, "127.0.0.1:0", extra).await;
        self.cluster(ClusterSpec {
            name,
            region: "eu-west",
            zone: "eu-west-1a",
            network,
            gateways: vec![gw.addr.to_string()],
        })
        .await;
        gw
    }

    /// An east-west gateway of `cluster` listening on `listen`, following
    /// this federation (with its own join token), started with `extra`
    /// flags; the cluster is not registered.
    pub async fn gateway(
        &self,
        cluster: &str,
        listen: &str,
        extra: &[&str],
    ) -> gateway::app::Bound {
        let token = self.gateway_token(cluster).await;
        let mut args = vec![
            "fedmesh-gateway",
            "--join-token",
            &token,
            "--cluster",
            cluster,
            "--listen",
            listen,
            "--access-log",
            "off",
            "--drain-deadline",
            "1s",
            "--federation",
            &self.url,
        ];
        args.extend_from_slice(extra);
        let cfg = gateway::config::Config::from_args(
            &<gateway::config::Args as clap::Parser>::try_parse_from(args).unwrap(),
        )
        .unwrap();
        gateway::app::build(&cfg, &tokio::runtime::Handle::current())
            .await
            .unwrap()
    }

    /// A join token for `cluster`'s gateway.
    pub async fn gateway_token(&self, cluster: &str) -> String {
        AdminClient::new(self.admin().await)
            .create_join_token(api::CreateJoinTokenRequest {
                cluster: cluster.into(),
                namespace: "fedmesh-system".into(),
                service_account: "fedmesh-gateway".into(),
                ttl_seconds: 600,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Exports `default/<service>` from `cluster` (through its gateway).
    pub async fn export(&self, service: &str, cluster: &str) {
        RegistrationClient::new(self.admin().await)
            .set_export(api::SetExportRequest {
                service: Some(api::ServiceKey {
                    namespace: "default".into(),
                    name: service.into(),
                }),
                cluster: cluster.into(),
                exported: true,
            })
            .await
            .unwrap();
    }

    /// Certificate and key files for a workload identity in `cluster`,
    /// signed by the federation's intermediate for that cluster (under the
    /// test CA): what an agent shows peers and the federation alike.
    pub fn certs(&self, cluster: &str, ns: &str, sa: &str) -> (PathBuf, PathBuf) {
        let id = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
        let ctx = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(self.fed.node_context(cluster, &id))
        })
        .unwrap();
        let cert = self
            .dir
            .path()
            .join(format!("{cluster}-{ns}-{sa}-{}.pem", fastrand::u32(..)));
        let key = cert.with_extension("key");
        std::fs::write(&cert, &ctx.client_certificate_data).unwrap();
        std::fs::write(&key, &ctx.client_key_data).unwrap();
        (cert, key)
    }

    /// The flags of an agent for `service` in `cluster`, mTLS, all ports picked by the OS.
    pub fn args(
        &self,
        cluster: &str,
        region: &str,
        zone: &str,
        service: &str,
        app: SocketAddr,
        port: u16,
    ) -> Vec<String> {
        let (cert, key) = self.certs(cluster, "default", service);
        [
            "fedmesh-agent",
            "--cluster",
            cluster,
            "--region",
            region,
            "--zone",
            zone,
            "--service",
            service,
            "--app",
            &app.to_string(),
            "--port",
            &port.to_string(),
            "--federation",
            &self.url,
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--ca",
            self.ca_path.to_str().unwrap(),
            "--probe-interval",
            "100ms",
            "--drain-deadline",
            "2s",
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    pub async fn agent(&self, args: Vec<String>) -> Bound {
        use clap::Parser;
        let cfg = Config::from_args(&Args::try_parse_from(args).unwrap()).unwrap();
        mesh_agent::app::build(&cfg).await.unwrap()
    }

    /// Applies YAML through the federation's admin API, as `meshctl apply` does.
    pub async fn apply(&self, yaml: &str) -> Result<api::ApplyPoliciesResponse, tonic::Status> {
        let ns = Namespace::new("default").unwrap();
        let parsed = mesh_core::policy::parse_yaml("test.yaml", yaml, &ns)
            .unwrap_or_else(|e| panic!("test YAML invalid: {e:?}"));
        let documents = parsed
            .documents
            .iter()
            .map(|d| {
                let (kind, ns, name) = d.key();
                api::PolicyDocument {
                    r#ref: Some(api::PolicyRef {
                        kind: kind.as_str().into(),
                        namespace: ns.to_string(),
                        name: name.into(),
                    }),
                    json: d.to_json().to_string(),
                    revision: 0,
                }
            })
            .collect();
        let mut admin = AdminClient::new(self.admin().await);
        admin
            .apply_policies(api::ApplyPoliciesRequest {
                source: "test.yaml".into(),
                documents,
                dry_run: false,
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Waits until `agent` sees `n` healthy endpoints of `service` (in default).
pub async fn wait_endpoints(agent: &Bound, service: &str, n: usize) {
    let svc: ServiceKey = format!("default/{service}").parse().unwrap();
    mesh_test::assert_eventually!(
        agent
            .table
            .load()
            .endpoints(&svc, None, None, true)
            .map_or(0, |r| r.endpoints.len())
            == n,
        Duration::from_secs(15)
    );
}

/// Waits until `agent` runs a config at least as new as `version`.
pub async fn wait_version(agent: &Bound, version: i64) {
    mesh_test::assert_eventually!(
        agent.table.load().version >= version,
        Duration::from_secs(15)
    );
}

/// A response as tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, n: &str) -> &str {
        self.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// One HTTP/1.1 request to the agent's outbound listener, `Host: host`.
pub async fn get(outbound: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(outbound, "GET", host, path, headers, Bytes::new(), false).await
}

/// One request, HTTP/1.1 or HTTP/2 prior knowledge (h2c).
pub async fn send(
    outbound: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    h2: bool,
) -> Reply {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(tcp);
    let mut b = http::Request::builder().method(method);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = if h2 {
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = b
            .uri(format!("http://{host}{path}"))
            .version(http::Version::HTTP_2)
            .body(Full::new(body))
            .unwrap();
        s.send_request(req).await.unwrap()
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = b
            .uri(path)
            .header("host", host)
            .body(Full::new(body))
            .unwrap();
        s.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Counts replies by `x-backend` over `n` requests.
pub async fn spread(
    outbound: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for _ in 0..n {
        let r = get(outbound, host, path, headers).await;
        let k = if r.status == 200 {
            r.header("x-backend").to_string()
        } else {
            format!("status {}", r.status)
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// Drains agents; each must finish without cutting a connection.
pub async fn stop(agents: Vec<Bound>) {
    for a in agents {
        let addr = a.inbound;
        assert!(
            !a.drain().await,
            "agent {addr} had to cut connections while draining"
        );
    }
}

/// Sums a metric's samples on the agent's admin listener.
pub async fn scrape(a: &mesh_agent::app::Bound, name: &str) -> f64 {
    let admin = a.admin.unwrap();
    let r = get(admin, "admin", "/metrics", &[]).await;
    r.body
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Agent flags for mTLS from a join token instead of certificate files.
pub fn with_token(mut args: Vec<String>, token: &str) -> Vec<String> {
    for flag in ["--cert", "--key", "--ca"] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args.drain(i..i + 2);
    }
    args.extend(["--join-token".into(), token.into()]);
    args
}

pub async fn join_token(m: &Mesh, sa: &str) -> String {
    mesh_api::v1::admin_client::AdminClient::new(m.admin().await)
        .create_join_token(mesh_api::v1::CreateJoinTokenRequest {
            cluster: "c1".into(),
            namespace: "default".into(),
            service_account: sa.into(),
            ttl_seconds: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// An agent in c1 enrolled with a fresh single-use join token for `service`.
pub async fn enrolled(
    m: &Mesh,
    service: &str,
    app: std::net::SocketAddr,
    port: u16,
) -> mesh_agent::app::Bound {
    let t = join_token(m, service).await;
    m.agent(with_token(
        m.args("c1", "us-east", "us-east-1a", service, app, port),
        &t,
    ))
    .await
}

/// Registers, as an admin, a healthy endpoint `id` of `default/<service>`
/// in `cluster` served by the agent whose inbound listener is `inbound`
/// (for an agent whose certificate the federation does not take).
pub async fn register_by_hand(
    m: &Mesh,
    cluster: &str,
    service: &str,
    id: &str,
    inbound: SocketAddr,
) {
    RegistrationClient::new(m.admin().await)
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(api::Endpoint {
                id: id.into(),
                service: Some(api::ServiceKey {
                    namespace: "default".into(),
                    name: service.into(),
                }),
                cluster: cluster.into(),
                address: inbound.ip().to_string(),
                ports: vec![api::Port {
                    name: "http".into(),
                    number: 9080,
                    protocol: "http".into(),
                    target_port: u32::from(inbound.port()),
                }],
                labels: Default::default(),
                locality: Some(api::Locality {
                    region: "us-east".into(),
                    zone: "us-east-1a".into(),
                }),
                health: api::Health::Healthy as i32,
                identity: format!("spiffe://cluster.local/ns/default/sa/{service}"),
            }),
        })
        .await
        .unwrap();
}
