//! Identity benchmark (issue 5): full TLS 1.3 handshakes per second on the
//! agent's inbound listener against a plain rustls server in the same run,
//! and CSRs signed per second through the federation's Identity API against
//! rcgen signing the same leaf in-process.
//!
//! `cargo bench -p fedmesh-benches --bench handshake`
//! Knobs: FEDMESH_BENCH_SECS (5: seconds per measured row),
//! FEDMESH_BENCH_ROUNDS (3), FEDMESH_BENCH_CONCURRENCY (32 clients or calls
//! in flight). `tests/smoke.rs` runs it for a fraction of a second.
//!
//! Handshakes: a real agent (`mesh_agent::app::build`, certificates from
//! files made by a test CA, registered with an in-process federation on a
//! memory store, a tiny HTTP backend behind it) and a plain tokio-rustls
//! server with the same certificate, key, client-certificate requirement
//! (WebPkiClientVerifier, same CA) and ALPN (`h2`, `http/1.1`). Both servers
//! run on one tokio runtime (2 workers); the clients on another (2 workers)
//! in the same process: the agent is built by the same code as its binary,
//! and nothing differs between the two rows but the server code. Each of the
//! client tasks loops: TCP connect, full TLS 1.3 handshake presenting a
//! client certificate (one ClientConfig with `Resumption::disabled()`, ALPN
//! `http/1.1`), close_notify, then read to the server's close_notify. TLS
//! 1.3 client auth completes on the server after the client's last flight;
//! reading to the server's clean close proves the server accepted the
//! certificate (a refusal arrives as an alert), so a counted handshake is one
//! both ends finished. Rows are interleaved, agent then plain, in each round.
//!
//! CSRs: a reusable join token from the Admin API, a pool of P-256 keys and
//! CSRs for its identity made beforehand (signed in turn), then
//! `SignCertificate` calls in flight for the duration over one HTTP/2
//! channel. The baseline, interleaved per round: the same work without gRPC,
//! token or audit: parse and verify the CSR, sign a leaf with the CA's leaf
//! parameters under a P-256 intermediate (rcgen), PEM-encode the chain, on
//! as many threads as cores. Then 50 calls one at a time, for latency.
//!
//! Beside each rate: the CPU time per operation of the side measured (the
//! servers' runtime threads; the signing threads for raw rcgen) and of the
//! client runtime, read from `/proc/self/task/*/schedstat`, and the share of
//! the machine's CPU that stayed idle or was stolen during the row (from
//! `/proc/stat`). On a shared, busy machine the CPU cost per handshake or
//! signature moves less than the rate does.

// A benchmark: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::identity_client::IdentityClient;
use mesh_api::v1::registration_client::RegistrationClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What to run.
pub(crate) struct Opts {
    /// Measured time of each row in each round.
    pub(crate) secs: Duration,
    /// Unmeasured time against each server before the first round.
    pub(crate) warmup: Duration,
    pub(crate) rounds: usize,
    /// Client tasks (handshakes) and calls in flight (CSRs).
    pub(crate) concurrency: usize,
    /// CSRs made beforehand and signed in turn.
    pub(crate) csr_pool: usize,
    /// SignCertificate calls made one at a time to time them.
    pub(crate) latency_calls: usize,
}

/// Per-round rates, and the printed table.
#[allow(dead_code)] // the bench prints `text`; tests/smoke.rs reads the rates
pub(crate) struct Report {
    pub(crate) agent: Vec<Figure>,
    pub(crate) plain: Vec<Figure>,
    pub(crate) grpc: Vec<Figure>,
    pub(crate) raw: Vec<Figure>,
    /// Failed handshakes or calls (0 unless something is broken).
    pub(crate) errors: u64,
    /// SignCertificate latency one call at a time: median and max.
    pub(crate) latency: (Duration, Duration),
    pub(crate) text: String,
}

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const TRUST_DOMAIN: &str = "cluster.local";
const SERVER_NAME: &str = "bench.default.svc.cluster.local";
/// The agent's identity (its certificate names no DNS name: clients check
/// the chain, then this SPIFFE ID, as agents do).
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/bench";
const CSR_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/bench-csr";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Everything the servers' runtime holds for the run.
struct Servers {
    _fed: federation::app::Bound,
    /// The federation's API as an admin.
    admin: mesh_node::fed::Target,
    /// The federation's API with its CA and no client certificate, as a
    /// node enrolling.
    enroll: mesh_node::fed::Target,
    agent: mesh_agent::app::Bound,
    plain: SocketAddr,
    _backend: mesh_test::http::Backend,
    _dir: tempfile::TempDir,
}

/// The federation, the agent in front of a backend, and the plain rustls
/// server, with the same server certificate; returns the client config too.
async fn start_servers() -> anyhow::Result<(Servers, Arc<rustls::ClientConfig>)> {
    // The test CA is the federation's plug-in root: its per-cluster
    // intermediate signs the agent's certificate, and the clients' leaves
    // chain to the same root.
    let ca = mesh_test::tls::TestCa::new();
    let dir = tempfile::tempdir()?;
    let write = |name: &str, body: &str| -> anyhow::Result<PathBuf> {
        let p = dir.path().join(name);
        std::fs::write(&p, body)?;
        Ok(p)
    };
    let ca_pem = write("ca.pem", &ca.pem)?;
    let ca_key = write("ca-key.pem", &ca.key_pem)?;
    let mut cfg = federation::config::Config::embedded(([127, 0, 0, 1], 0).into());
    cfg.ca.plug_in = Some((ca_pem.clone(), ca_key));
    // The bench measures signing, not the API's limits: every enrollment
    // here comes from one address.
    cfg.security.limits.anonymous_rate_per_address = 0;
    cfg.security.limits.in_flight_per_principal = 4096;
    let store = Arc::new(federation::store::memory::MemoryStore::new());
    let fed = federation::app::serve(&cfg, store).await?;
    fed.shared.wait_synced().await;
    let admin = mesh_node::fed::Target::from_context(
        &fed.operator_context("bench-admin", &[federation::auth::Role::Admin])
            .await?,
    )?;
    let enroll = mesh_node::fed::Target {
        url: fed.url(),
        tls: Some(mesh_node::fed::FedTls::new(Some(&ca.pem), None)?),
    };
    let url = fed.url();
    RegistrationClient::new(admin.channel().await?)
        .register_cluster(api::RegisterClusterRequest {
            cluster: Some(api::ClusterInfo {
                name: "c1".into(),
                locality: Some(api::Locality {
                    region: "us-east".into(),
                    zone: "us-east-1a".into(),
                }),
                network: "n1".into(),
                gateway_addresses: vec![],
                trust_domain: TRUST_DOMAIN.into(),
                allow_local_endpoints: true,
                ..Default::default()
            }),
        })
        .await?;

    // The agent's certificate from the federation's CA (c1's intermediate),
    // what it shows callers and the federation alike.
    let server_leaf = fed.node_context("c1", SERVER_ID).await?;
    let cert_pem = write("bench.pem", &server_leaf.client_certificate_data)?;
    let key_pem = write("bench.key", &server_leaf.client_key_data)?;

    let backend = mesh_test::http::Backend::start("bench").await;
    let args: Vec<String> = [
        "fedmesh-agent",
        "--cluster",
        "c1",
        "--region",
        "us-east",
        "--zone",
        "us-east-1a",
        "--service",
        "bench",
        "--app",
        &backend.addr.to_string(),
        "--port",
        "8080",
        "--federation",
        &url,
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--cert",
        cert_pem.to_str().expect("UTF-8 path"),
        "--key",
        key_pem.to_str().expect("UTF-8 path"),
        "--ca",
        ca_pem.to_str().expect("UTF-8 path"),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let agent_cfg = {
        use clap::Parser;
        let a = mesh_agent::config::Args::try_parse_from(args)?;
        mesh_agent::config::Config::from_args(&a)
            .map_err(|e| anyhow::anyhow!("agent config: {}", e.join("; ")))?
    };
    let agent = mesh_agent::app::build(&agent_cfg).await?;

    // The plain server reads the same files the agent was given.
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&cert_pem)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&key_pem)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca_pem)? {
        roots.add(c?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()?;
    let mut server_cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    server_cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let plain = plain_server(Arc::new(server_cfg)).await?;

    // Clients: a workload certificate of the same CA, no resumption.
    let client_leaf = ca.issue(
        &["client.default.svc.cluster.local"],
        Some("spiffe://cluster.local/ns/default/sa/client"),
    );
    let mut client = (*ca.client_config(&client_leaf, SERVER_ID)).clone();
    client.resumption = rustls::client::Resumption::disabled();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];

    Ok((
        Servers {
            _fed: fed,
            admin,
            enroll,
            agent,
            plain,
            _backend: backend,
            _dir: dir,
        },
        Arc::new(client),
    ))
}

/// A tokio-rustls server: handshake, read to the client's close, close.
async fn plain_server(cfg: Arc<rustls::ServerConfig>) -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// One full handshake, both ends finished, then a clean close.
async fn handshake(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    name: &ServerName<'static>,
) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name.clone(), tcp).await?;
    let version = tls.get_ref().1.protocol_version();
    anyhow::ensure!(
        version == Some(rustls::ProtocolVersion::TLSv1_3),
        "negotiated {version:?}, not TLS 1.3"
    );
    tls.shutdown().await?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await? {
        0 => Ok(()),
        n => anyhow::bail!("{n} unexpected bytes from the server"),
    }
}

/// Operations done in one row: how many, how many failed (and the first
/// failure), over how long.
#[derive(Default)]
struct Row {
    ok: u64,
    err: u64,
    first: Option<String>,
    elapsed: Duration,
    /// CPU time of threads that ended with the row, measured by themselves.
    cpu: Option<Duration>,
}

impl Row {
    fn add(&mut self, (ok, err, first): (u64, u64, Option<String>)) {
        self.ok += ok;
        self.err += err;
        if self.first.is_none() {
            self.first = first;
        }
    }
}

/// `conc` clients handshaking with `addr` for `dur`.
async fn handshakes(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    conc: usize,
    dur: Duration,
) -> Row {
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let name = ServerName::try_from(SERVER_NAME).expect("a DNS name");
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (connector, name) = (connector.clone(), name.clone());
            tokio::spawn(async move {
                let (mut ok, mut err, mut first) = (0u64, 0u64, None);
                while Instant::now() < deadline {
                    match handshake(addr, &connector, &name).await {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            err += 1;
                            first.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                (ok, err, first)
            })
        })
        .collect();
    let mut row = Row::default();
    for t in tasks {
        row.add(t.await.expect("client task"));
    }
    row.elapsed = start.elapsed();
    row
}

/// The CA's signer, as the federation makes it: a P-256 root (path length
/// 1) and a P-256 intermediate under it (path length 0).
struct Intermediate {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert_pem: String,
}

fn ca_params(cn: &str, path_len: u8) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, TRUST_DOMAIN);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(300)).into();
    p.not_after = (now + Duration::from_secs(365 * 86400)).into();
    p.use_authority_key_identifier_extension = true;
    p
}

fn intermediate() -> Intermediate {
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("root key");
    let root_p = ca_params("bench root CA", 1);
    let root = rcgen::Issuer::new(root_p, root_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let p = ca_params("bench intermediate CA (c1)", 0);
    let cert = p.signed_by(&key, &root).expect("sign the intermediate");
    Intermediate {
        cert_pem: cert.pem(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

/// What `SignCertificate` does after the credential check, without gRPC,
/// token or audit: parse and verify the CSR, check its one URI SAN, sign a
/// 24 h leaf with the CA's leaf parameters, PEM-encode the chain.
fn sign_raw(ca: &Intermediate, csr_pem: &str) -> String {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("a valid CSR");
    let uris: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            rcgen::SanType::URI(u) => Some(u.as_str().to_string()),
            _ => None,
        })
        .collect();
    assert!(csr.params.subject_alt_names.len() == 1 && uris[0] == CSR_IDENTITY);
    let now = SystemTime::now();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    p.subject_alt_names = vec![rcgen::SanType::URI(
        CSR_IDENTITY.try_into().expect("SPIFFE URI"),
    )];
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, TRUST_DOMAIN);
    p.not_before = (now - Duration::from_secs(300)).into();
    p.not_after = (now + Duration::from_secs(24 * 3600)).into();
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let leaf = rcgen::CertificateSigningRequestParams {
        params: p,
        public_key: csr.public_key,
    }
    .signed_by(&ca.issuer)
    .expect("sign the leaf");
    format!("{}{}", leaf.pem(), ca.cert_pem)
}

/// `n` P-256 keys and CSRs naming the benchmark identity.
fn csr_pool(n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let key =
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CSR params");
            p.subject_alt_names = vec![rcgen::SanType::URI(
                CSR_IDENTITY.try_into().expect("SPIFFE URI"),
            )];
            p.serialize_request(&key)
                .expect("CSR")
                .pem()
                .expect("CSR PEM")
        })
        .collect()
}

/// `conc` SignCertificate calls in flight for `dur`.
async fn grpc_signing(
    fed: &mesh_node::fed::Target,
    token: &str,
    csrs: Arc<Vec<String>>,
    conc: usize,
    dur: Duration,
) -> anyhow::Result<Row> {
    // Enrollment over TLS, as a node does: the federation's CA, no client
    // certificate.
    let channel = fed.channel().await?;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let mut client = IdentityClient::new(channel.clone());
            let (csrs, next, token) = (csrs.clone(), next.clone(), token.to_string());
            tokio::spawn(async move {
                let (mut ok, mut err, mut first) = (0u64, 0u64, None);
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize % csrs.len();
                    let r = client
                        .sign_certificate(api::SignCertificateRequest {
                            csr_pem: csrs[i].clone(),
                            cluster: "c1".into(),
                            credential: Some(api::sign_certificate_request::Credential::JoinToken(
                                token.clone(),
                            )),
                            ttl_seconds: 0,
                        })
                        .await;
                    match r {
                        Ok(resp) if resp.get_ref().identity == CSR_IDENTITY => ok += 1,
                        Ok(resp) => {
                            err += 1;
                            first.get_or_insert_with(|| {
                                format!("signed for {}", resp.get_ref().identity)
                            });
                        }
                        Err(e) => {
                            err += 1;
                            first.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                (ok, err, first)
            })
        })
        .collect();
    let mut row = Row::default();
    for t in tasks {
        row.add(t.await?);
    }
    row.elapsed = start.elapsed();
    Ok(row)
}

/// `n` SignCertificate calls one after the other: each one's latency.
async fn grpc_latency(
    fed: &mesh_node::fed::Target,
    token: &str,
    csrs: &[String],
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut client = IdentityClient::new(fed.channel().await?);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        client
            .sign_certificate(api::SignCertificateRequest {
                csr_pem: csrs[i % csrs.len()].clone(),
                cluster: "c1".into(),
                credential: Some(api::sign_certificate_request::Credential::JoinToken(
                    token.to_string(),
                )),
                ttl_seconds: 0,
            })
            .await?;
        out.push(start.elapsed());
    }
    out.sort();
    Ok(out)
}

/// [`sign_raw`] on `threads` threads named `bench-raw` for `dur`.
fn raw_signing(ca: &Intermediate, csrs: &[String], threads: usize, dur: Duration) -> Row {
    let start = Instant::now();
    let deadline = start + dur;
    let next = AtomicU64::new(0);
    let (ok, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                std::thread::Builder::new()
                    .name("bench-raw".into())
                    .spawn_scoped(s, || {
                        let before = thread_cpu();
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            let i = next.fetch_add(1, Ordering::Relaxed) as usize % csrs.len();
                            std::hint::black_box(sign_raw(ca, &csrs[i]));
                            n += 1;
                        }
                        (n, thread_cpu().saturating_sub(before))
                    })
                    .expect("spawn a signing thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("signing thread"))
            .fold((0u64, Duration::ZERO), |(n, c), (m, d)| (n + m, c + d))
    });
    Row {
        ok,
        elapsed: start.elapsed(),
        cpu: Some(cpu),
        ..Row::default()
    }
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    schedstat(std::path::Path::new("/proc/thread-self/schedstat"))
}

/// The first field of a schedstat file: nanoseconds on a CPU.
fn schedstat(path: &std::path::Path) -> Duration {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// CPU time used so far by this process's threads whose name starts with
/// `prefix` (scheduler statistics, nanoseconds; threads that have exited
/// are not counted, so measure around work whose threads stay).
fn cpu_of(prefix: &str) -> Duration {
    let mut ns = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let named =
            std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim_end().starts_with(prefix));
        if !named {
            continue;
        }
        if let Some(n) = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            ns += n;
        }
    }
    Duration::from_nanos(ns)
}

/// A row's rate and the CPU its measured side spent per operation.
#[derive(Clone, Copy)]
pub(crate) struct Figure {
    /// Operations per second.
    pub(crate) rate: f64,
    /// CPU microseconds per operation of the side measured (the servers'
    /// threads for handshakes and SignCertificate, the signing threads for
    /// raw rcgen).
    pub(crate) cpu_us: f64,
    /// CPU microseconds per operation of the client runtime's threads.
    pub(crate) client_cpu_us: f64,
    /// Share of the whole machine's CPU time left idle during the row, in
    /// percent: near 0 when the row was bound by CPU (ours or others').
    pub(crate) idle_pct: f64,
    /// Share of the machine's CPU time the hypervisor took (steal), in
    /// percent; it counts in the CPU time per operation.
    pub(crate) steal_pct: f64,
}

/// Runs `f` and returns its row with the CPU `threads` spent meanwhile.
fn measured(
    threads: &str,
    f: impl FnOnce() -> anyhow::Result<Row>,
) -> anyhow::Result<(Row, Figure)> {
    let (before, client_before) = (cpu_of(threads), cpu_of("bench-client"));
    let machine_before = machine_jiffies();
    let row = f()?;
    let machine_after = machine_jiffies();
    let cpu = row
        .cpu
        .unwrap_or_else(|| cpu_of(threads).saturating_sub(before));
    let client = cpu_of("bench-client").saturating_sub(client_before);
    let per_op = |d: Duration| d.as_secs_f64() * 1e6 / (row.ok.max(1) as f64);
    let fig = Figure {
        rate: row.ok as f64 / row.elapsed.as_secs_f64(),
        cpu_us: per_op(cpu),
        client_cpu_us: per_op(client),
        idle_pct: machine_after.share(&machine_before, |m| m.idle),
        steal_pct: machine_after.share(&machine_before, |m| m.steal),
    };
    Ok((row, fig))
}

/// The machine's CPU time so far, from /proc/stat (clock ticks).
struct Machine {
    /// Idle and iowait.
    idle: u64,
    steal: u64,
    total: u64,
}

impl Machine {
    /// The share of the time since `before` that `part` took, in percent.
    fn share(&self, before: &Self, part: impl Fn(&Self) -> u64) -> f64 {
        let total = self.total.saturating_sub(before.total) as f64;
        if total > 0.0 {
            100.0 * part(self).saturating_sub(part(before)) as f64 / total
        } else {
            f64::NAN
        }
    }
}

fn machine_jiffies() -> Machine {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu  user nice system idle iowait irq softirq steal guest guest_nice
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Machine {
        idle: at(3) + at(4),
        steal: at(7),
        total: f.iter().take(8).sum(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().take(3).collect();
            (f.len() == 3).then(|| f.join(" "))
        })
        .unwrap_or_else(|| "?".into())
}

/// Prints one comparison: per round, the candidate and baseline rates,
/// their ratio, the CPU per operation of each and its ratio; then medians.
fn table(t: &mut String, title: &str, names: (&str, &str), cand: &[Figure], base: &[Figure]) {
    let _ = writeln!(t, "\n{title}");
    let _ = writeln!(
        t,
        "{:<8} {:>14} {:>14} {:>8}   {:>14} {:>14} {:>8}",
        "round",
        format!("{}/s", names.0),
        format!("{}/s", names.1),
        "ratio",
        format!("{} CPU us", names.0),
        format!("{} CPU us", names.1),
        "ratio"
    );
    let line = |t: &mut String, label: &str, c: Figure, b: Figure, rr: f64, cr: f64| {
        let _ = writeln!(
            t,
            "{label:<8} {:>14.0} {:>14.0} {rr:>8.3}   {:>14.1} {:>14.1} {cr:>8.3}",
            c.rate, b.rate, c.cpu_us, b.cpu_us
        );
    };
    for (i, (c, b)) in cand.iter().zip(base).enumerate() {
        line(
            t,
            &(i + 1).to_string(),
            *c,
            *b,
            c.rate / b.rate,
            c.cpu_us / b.cpu_us,
        );
    }
    let med = |f: &dyn Fn(&Figure, &Figure) -> f64| {
        fedmesh_benches::median(
            &cand
                .iter()
                .zip(base)
                .map(|(c, b)| f(c, b))
                .collect::<Vec<_>>(),
        )
    };
    line(
        t,
        "median",
        Figure {
            rate: med(&|c, _| c.rate),
            cpu_us: med(&|c, _| c.cpu_us),
            client_cpu_us: med(&|c, _| c.client_cpu_us),
            idle_pct: med(&|c, _| c.idle_pct),
            steal_pct: med(&|c, _| c.steal_pct),
        },
        Figure {
            rate: med(&|_, b| b.rate),
            cpu_us: med(&|_, b| b.cpu_us),
            client_cpu_us: med(&|_, b| b.client_cpu_us),
            idle_pct: med(&|_, b| b.idle_pct),
            steal_pct: med(&|_, b| b.steal_pct),
        },
        med(&|c, b| c.rate / b.rate),
        med(&|c, b| c.cpu_us / b.cpu_us),
    );
    let _ = writeln!(
        t,
        "client runtime CPU us per operation, median: {:.1} ({}), {:.1} ({})",
        med(&|c, _| c.client_cpu_us),
        names.0,
        med(&|_, b| b.client_cpu_us),
        names.1
    );
}

/// Runs both benchmarks; prints progress to stderr.
pub(crate) fn run(o: &Opts) -> anyhow::Result<Report> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = loadavg();
    let server_rt = runtime("bench-server");
    let client_rt = runtime("bench-client");
    let (servers, client_cfg) = server_rt.block_on(start_servers())?;
    let (agent_addr, plain_addr) = (servers.agent.inbound, servers.plain);
    let mut errors = 0u64;
    let mut note = |what: &str, row: &Row| {
        if row.err > 0 {
            errors += row.err;
            eprintln!(
                "{what}: {} failed, first: {}",
                row.err,
                row.first.as_deref().unwrap_or_default()
            );
        }
    };
    // Per-row detail, printed as it comes and kept for the results file.
    let mut log = String::new();
    let mut progress = |line: String| {
        eprintln!("{line}");
        log.push_str(&line);
        log.push('\n');
    };
    let row_text = |name: &str, f: &Figure| {
        format!(
            "{name} {:>6.0}/s, {:>6.1} us CPU/op (client {:>5.1}), machine idle {:>4.1}% steal {:>4.1}%",
            f.rate, f.cpu_us, f.client_cpu_us, f.idle_pct, f.steal_pct
        )
    };
    let hs = |addr: SocketAddr, dur: Duration| {
        measured("bench-server", || {
            Ok(client_rt.block_on(handshakes(addr, client_cfg.clone(), o.concurrency, dur)))
        })
    };

    // --- handshakes, agent then plain in each round ---
    for (name, addr) in [("agent", agent_addr), ("plain", plain_addr)] {
        let (row, _) = hs(addr, o.warmup)?;
        note(&format!("warm-up {name}"), &row);
    }
    let (mut agent, mut plain) = (Vec::new(), Vec::new());
    for round in 1..=o.rounds {
        let (row, a) = hs(agent_addr, o.secs)?;
        note(&format!("round {round} agent"), &row);
        let (row, p) = hs(plain_addr, o.secs)?;
        note(&format!("round {round} plain"), &row);
        progress(format!(
            "round {round}: {}; {}",
            row_text("agent", &a),
            row_text("plain", &p)
        ));
        agent.push(a);
        plain.push(p);
    }

    // --- CSR signing, SignCertificate then raw rcgen in each round ---
    let enroll = servers.enroll.clone();
    let admin_fed = servers.admin.clone();
    let token = client_rt.block_on(async {
        let mut admin = AdminClient::new(admin_fed.channel().await?);
        let r = admin
            .create_join_token(api::CreateJoinTokenRequest {
                cluster: "c1".into(),
                namespace: "default".into(),
                service_account: "bench-csr".into(),
                ttl_seconds: 3600,
                reusable: true,
                ..Default::default()
            })
            .await?;
        anyhow::Ok(r.into_inner().token)
    })?;
    let csrs = Arc::new(csr_pool(o.csr_pool));
    let ca = intermediate();
    let grpc_row = |dur: Duration| {
        measured("bench-server", || {
            client_rt.block_on(grpc_signing(
                &enroll,
                &token,
                csrs.clone(),
                o.concurrency,
                dur,
            ))
        })
    };
    let raw_row = |dur: Duration| measured("bench-raw", || Ok(raw_signing(&ca, &csrs, cores, dur)));
    // Warm-up: the federation makes c1's intermediate on first use.
    let (row, _) = grpc_row(o.warmup)?;
    note("warm-up SignCertificate", &row);
    raw_row(o.warmup)?;
    let (mut grpc, mut raw) = (Vec::new(), Vec::new());
    for round in 1..=o.rounds {
        let (row, g) = grpc_row(o.secs)?;
        note(&format!("round {round} SignCertificate"), &row);
        let (_, r) = raw_row(o.secs)?;
        progress(format!(
            "round {round}: {}; {}",
            row_text("gRPC", &g),
            row_text("rcgen", &r)
        ));
        grpc.push(g);
        raw.push(r);
    }

    let lat = client_rt.block_on(grpc_latency(&enroll, &token, &csrs, o.latency_calls.max(1)))?;
    let latency = (lat[lat.len() / 2], lat[lat.len() - 1]);

    // --- the table ---
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# handshake bench: {} rounds x {:.1} s per row, interleaved; {} clients / calls in flight",
        o.rounds,
        o.secs.as_secs_f64(),
        o.concurrency
    );
    let _ = writeln!(
        t,
        "# machine: {cores} cores; load average before {load_before}, after {}",
        loadavg()
    );
    t.push_str(&log);
    table(
        &mut t,
        "full TLS 1.3 handshakes (mTLS, no resumption); CPU: the server's threads per handshake",
        ("agent", "plain"),
        &agent,
        &plain,
    );
    table(
        &mut t,
        "CSRs signed (P-256 leaf, 24 h); CPU: the federation's threads / the signing threads per CSR",
        ("gRPC", "rcgen"),
        &grpc,
        &raw,
    );
    let _ = writeln!(
        t,
        "SignCertificate one call at a time ({} calls): median {:.2} ms, max {:.2} ms",
        lat.len(),
        latency.0.as_secs_f64() * 1e3,
        latency.1.as_secs_f64() * 1e3
    );
    let _ = writeln!(t, "errors: {errors}");

    {
        let _in_runtime = server_rt.enter();
        drop(servers);
    }
    client_rt.shutdown_timeout(Duration::from_secs(1));
    server_rt.shutdown_timeout(Duration::from_secs(1));
    Ok(Report {
        agent,
        plain,
        grpc,
        raw,
        errors,
        latency,
        text: t,
    })
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and
    // must not run the measurement.
    if !std::env::args().any(|a| a == "--bench") {
        println!("handshake bench: run with `cargo bench -p fedmesh-benches --bench handshake`");
        return Ok(());
    }
    let o = Opts {
        secs: Duration::from_secs(knob("FEDMESH_BENCH_SECS", 5) as u64),
        warmup: Duration::from_secs(1),
        rounds: knob("FEDMESH_BENCH_ROUNDS", 3),
        concurrency: knob("FEDMESH_BENCH_CONCURRENCY", 32),
        csr_pool: 1024,
        latency_calls: 50,
    };
    let r = run(&o)?;
    println!();
    print!("{}", r.text);
    fedmesh_benches::write_report("handshake", &r.text)?;
    anyhow::ensure!(r.errors == 0, "{} handshakes or calls failed", r.errors);
    Ok(())
}
