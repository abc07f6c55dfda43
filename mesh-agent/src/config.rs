//! Configuration of `fedmesh-agent`: flags (or `FEDMESH_*` variables)
//! parsed into a typed [`Config`], or every problem at once.

use clap::Parser;
use mesh_core::endpoint::Protocol;
use mesh_core::flag::{check_url, parse_addr, parse_log_format, parse_positive_duration};
use mesh_core::identity::Identity;
use mesh_core::locality::Locality;
use mesh_core::name::{
    ClusterName, EndpointId, Namespace, Region, ServiceAccount, ServiceName, TrustDomain, Zone,
};
use mesh_core::service::ServiceKey;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU16, NonZeroU32};
use std::path::PathBuf;
use std::time::Duration;

/// Command-line flags as given, before validation.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fedmesh-agent",
    version,
    about = "fedmesh agent: the sidecar data plane beside a workload"
)]
pub struct Args {
    /// Cluster the workload runs in.
    #[arg(long, env = "FEDMESH_CLUSTER")]
    pub cluster: String,
    /// Region of the workload.
    #[arg(long, env = "FEDMESH_REGION")]
    pub region: String,
    /// Zone of the workload.
    #[arg(long, env = "FEDMESH_ZONE")]
    pub zone: String,
    /// Namespace of the workload's service.
    #[arg(long, env = "FEDMESH_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Name of the workload's service.
    #[arg(long, env = "FEDMESH_SERVICE")]
    pub service: String,
    /// Address of the local application (`IP:PORT`).
    #[arg(long, env = "FEDMESH_APP")]
    pub app: String,
    /// The service port this workload serves (what callers address, e.g.
    /// `reviews:9080`); defaults to the application's port.
    #[arg(long, env = "FEDMESH_PORT")]
    pub port: Option<u16>,
    /// Application protocol of that port: `http`, `http2`, `grpc` or `tcp`.
    #[arg(long, env = "FEDMESH_PROTOCOL", default_value = "http")]
    pub protocol: String,
    /// Federation API URL.
    #[arg(
        long,
        env = "FEDMESH_FEDERATION",
        default_value = "https://127.0.0.1:15010"
    )]
    pub federation: String,
    /// Outbound listener: the application sends its requests here.
    #[arg(long, env = "FEDMESH_OUTBOUND", default_value = "127.0.0.1:15001")]
    pub outbound: String,
    /// How outbound traffic arrives: `explicit` (the application addresses
    /// the listener) or `transparent` (iptables REDIRECT; the destination
    /// comes from SO_ORIGINAL_DST).
    #[arg(long, env = "FEDMESH_CAPTURE", default_value = "explicit")]
    pub capture: String,
    /// Inbound listener: mTLS from other agents and gateways.
    #[arg(long, env = "FEDMESH_INBOUND", default_value = "127.0.0.1:15006")]
    pub inbound: String,
    /// Admin listener (`/metrics`, `/healthz`, `/ready`); `off` disables it.
    #[arg(long, env = "FEDMESH_ADMIN", default_value = "127.0.0.1:15020")]
    pub admin: String,
    /// IP address registered for this endpoint; defaults to the inbound
    /// listener's (127.0.0.1 when it listens on every address).
    #[arg(long, env = "FEDMESH_ADDRESS")]
    pub address: Option<String>,
    /// Endpoint id, unique within (service, cluster); defaults to `<service>-<pid>`.
    #[arg(long, env = "FEDMESH_ID")]
    pub id: Option<String>,
    /// Workload labels, `key=value`, repeatable (subsets select on them).
    #[arg(long = "label", env = "FEDMESH_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Service account of the workload (its SPIFFE identity); defaults to the service name.
    #[arg(long, env = "FEDMESH_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// SPIFFE trust domain.
    #[arg(long, env = "FEDMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Certificate chain (PEM) this agent presents for mTLS.
    #[arg(long, env = "FEDMESH_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of that certificate.
    #[arg(long, env = "FEDMESH_KEY")]
    pub key: Option<PathBuf>,
    /// Trust anchors (PEM) for peers' certificates.
    #[arg(long, env = "FEDMESH_CA")]
    pub ca: Option<PathBuf>,
    /// Extra trust anchors (PEM) for fetching RequestAuthentication JWKS
    /// (`jwksUri: https://...`), besides the webpki roots.
    #[arg(long, env = "FEDMESH_JWKS_CA")]
    pub jwks_ca: Option<PathBuf>,
    /// File keeping the last config from the federation, read at start: an
    /// agent restarted while the federation is away serves from it (until
    /// the federation answers).
    #[arg(long, env = "FEDMESH_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// A state file older than this is not used.
    #[arg(long, env = "FEDMESH_STATE_MAX_AGE", default_value = "24h")]
    pub state_max_age: String,
    /// DNS server (`IP:PORT`) for the names of remote clusters' gateways;
    /// default: the system's resolver.
    #[arg(long, env = "FEDMESH_DNS_SERVER")]
    pub dns_server: Option<String>,
    /// The CA bundle (PEM) the federation's certificate is checked against
    /// (what a Kubernetes ConfigMap would mount). Without it: the root hash
    /// the join token carries, else --ca.
    #[arg(long, env = "FEDMESH_FEDERATION_CA")]
    pub federation_ca: Option<PathBuf>,
    /// A join token (`meshctl token create`): the agent makes its key, and
    /// the federation's CA signs its certificate. Instead of --cert/--key/--ca.
    #[arg(long, env = "FEDMESH_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// A Kubernetes ServiceAccount token file (a projected token for the
    /// federation's audience): the federation checks it with the cluster's
    /// TokenReview API and its CA signs the agent's certificate. Read again
    /// whenever the agent must enroll anew. Instead of --cert/--key/--ca.
    #[arg(long, env = "FEDMESH_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// Talk to other agents in plaintext instead of mTLS (local experiments
    /// only; nothing can reach this agent through a gateway). With
    /// --join-token or --kube-token-file, the certificate it enrolls for
    /// serves its calls to the federation only.
    #[arg(long, env = "FEDMESH_PLAINTEXT")]
    pub plaintext: bool,
    /// HTTP path of the application's readiness probe; without it the probe
    /// is a TCP connect to the application.
    #[arg(long, env = "FEDMESH_READINESS_PATH")]
    pub readiness_path: Option<String>,
    /// How often the application is probed.
    #[arg(long, env = "FEDMESH_PROBE_INTERVAL", default_value = "2s")]
    pub probe_interval: String,
    /// Requests per second this workload can serve, reported to the
    /// federation for rebalancing and capacity guardrails (0: not known).
    #[arg(long, env = "FEDMESH_CAPACITY", default_value = "0")]
    pub capacity: String,
    /// How often the agent reports its load to the federation.
    #[arg(long, env = "FEDMESH_LOAD_REPORT_INTERVAL", default_value = "5s")]
    pub load_report_interval: String,
    /// Token bucket per destination service: `SERVICE=N/s` (or `/m`),
    /// `*=N/s` for every other service. Repeatable.
    #[arg(
        long = "outbound-rate-limit",
        env = "FEDMESH_OUTBOUND_RATE_LIMIT",
        value_delimiter = ','
    )]
    pub outbound_rate_limits: Vec<String>,
    /// Token bucket per caller identity on the inbound side:
    /// `spiffe://TD/ns/NS/sa/SA=N/s`, `*=N/s` for every other caller. Repeatable.
    #[arg(
        long = "inbound-rate-limit",
        env = "FEDMESH_INBOUND_RATE_LIMIT",
        value_delimiter = ','
    )]
    pub inbound_rate_limits: Vec<String>,
    /// Deadline for in-flight requests after SIGTERM.
    #[arg(long, env = "FEDMESH_DRAIN_DEADLINE", default_value = "10s")]
    pub drain_deadline: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FEDMESH_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Worker threads (default: the cores this process may run on). With
    /// one, the agent runs on a single-threaded event loop, as Linkerd's
    /// proxy does by default: no cross-thread wake-ups or work stealing.
    #[arg(long, env = "FEDMESH_THREADS")]
    pub threads: Option<usize>,
    /// OTLP/gRPC endpoint spans are exported to (`http://127.0.0.1:4317`);
    /// without it no span is made (trace headers are still passed on).
    #[arg(long, env = "FEDMESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled, 0 to 1; a request whose parent is
    /// sampled (or not) follows its parent.
    #[arg(long, env = "FEDMESH_TRACE_SAMPLING", default_value = "1.0")]
    pub trace_sampling: String,
}

/// How outbound traffic reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// The application sends to the outbound listener (Host header or proxy form).
    Explicit,
    /// iptables REDIRECT; SO_ORIGINAL_DST gives the destination.
    Transparent,
}

/// mTLS material, or plaintext by explicit choice.
#[derive(Debug, Clone, serde::Serialize)]
pub enum Tls {
    /// Files for mTLS.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
        /// Trust anchors.
        ca: PathBuf,
    },
    /// A certificate from the federation's CA, for a join token.
    JoinToken(#[serde(skip)] String),
    /// A certificate from the federation's CA, for the Kubernetes
    /// ServiceAccount token in this file.
    KubernetesToken(PathBuf),
    /// `--plaintext`.
    Plaintext,
}

/// A token-bucket rate: `per_second` sustained, bursts of the same size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rate {
    /// Requests per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
}

/// Rate limits keyed by a name, with an optional default for every other name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Limits<K: Ord> {
    /// Per key.
    pub by_key: BTreeMap<K, Rate>,
    /// For any other key (`*=`).
    pub default: Option<Rate>,
}

/// Everything the agent needs to start.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Cluster of the workload.
    pub cluster: ClusterName,
    /// Locality of the workload.
    pub locality: Locality,
    /// The workload's service.
    pub service: ServiceKey,
    /// The local application.
    pub app: SocketAddr,
    /// The service port callers address.
    pub port: NonZeroU16,
    /// Its protocol.
    pub protocol: Protocol,
    /// Federation API URL.
    pub federation: String,
    /// `--plaintext`: no mTLS between agents (a token's certificate, if
    /// any, is for the federation only).
    pub plaintext: bool,
    /// How the federation is trusted, and the certificate the agent shows
    /// it (set at enrollment and renewal). `None` for an `http://` URL.
    #[serde(skip)]
    pub federation_tls: Option<std::sync::Arc<mesh_node::fed::FedTls>>,
    /// Outbound listener.
    pub outbound: SocketAddr,
    /// Outbound capture mode.
    pub capture: Capture,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// Admin listener.
    pub admin: Option<SocketAddr>,
    /// Registered address.
    pub address: IpAddr,
    /// Endpoint id.
    pub id: EndpointId,
    /// Workload labels.
    pub labels: BTreeMap<String, String>,
    /// The workload's SPIFFE identity.
    pub identity: Identity,
    /// mTLS or plaintext.
    pub tls: Tls,
    /// `--jwks-ca`: extra trust anchors for JWKS over HTTPS.
    pub jwks_ca: Option<PathBuf>,
    /// Where the last config is kept, and how old it may be when read.
    pub state_file: Option<PathBuf>,
    /// `--state-max-age`.
    pub state_max_age: Duration,
    /// `--dns-server`: where gateway names are resolved (default: the system's resolver).
    pub dns_server: Option<SocketAddr>,
    /// The certificates of `jwks_ca`, read when the flags were checked.
    #[serde(skip)]
    pub jwks_roots: Vec<CertificateDer<'static>>,
    /// Readiness probe path (HTTP), or a TCP probe.
    pub readiness_path: Option<String>,
    /// Probe period.
    pub probe_interval: Duration,
    /// Requests per second the workload can serve (0: not known).
    pub capacity: f64,
    /// Load report period.
    pub load_report_interval: Duration,
    /// Per destination service.
    pub outbound_limits: Limits<ServiceKey>,
    /// Per caller identity.
    pub inbound_limits: Limits<Identity>,
    /// Drain deadline.
    pub drain_deadline: Duration,
    /// Logs as JSON lines.
    pub log_json: bool,
    /// Worker threads of the runtime (1: a current-thread runtime).
    pub threads: usize,
    /// OTLP/gRPC endpoint for spans; none: no span is made.
    pub otlp_endpoint: Option<String>,
    /// Ratio of new traces sampled (parent-based).
    pub trace_sampling: f64,
}

/// Parses `N/s` or `N/m`.
fn parse_rate(s: &str) -> Result<Rate, String> {
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("rate {s:?}: expected N/s or N/m"))?;
    let count = n
        .trim()
        .parse::<NonZeroU32>()
        .map_err(|_| format!("rate {s:?}: {n:?} is not a positive whole number"))?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        u => return Err(format!("rate {s:?}: unit {u:?} is not s or m")),
    };
    Ok(Rate { count, per })
}

fn parse_limits<K: Ord>(
    flag: &str,
    items: &[String],
    key: impl Fn(&str) -> Result<K, String>,
    errs: &mut Vec<String>,
) -> Limits<K> {
    let mut out = Limits {
        by_key: BTreeMap::new(),
        default: None,
    };
    for item in items.iter().filter(|s| !s.trim().is_empty()) {
        let Some((k, r)) = item.rsplit_once('=') else {
            errs.push(format!("invalid {flag} {item:?}: expected KEY=N/s"));
            continue;
        };
        let rate = match parse_rate(r) {
            Ok(r) => r,
            Err(e) => {
                errs.push(format!("invalid {flag} {item:?}: {e}"));
                continue;
            }
        };
        if k.trim() == "*" {
            out.default = Some(rate);
            continue;
        }
        match key(k.trim()) {
            Ok(k) => {
                out.by_key.insert(k, rate);
            }
            Err(e) => errs.push(format!("invalid {flag} {item:?}: {e}")),
        }
    }
    out
}

/// The certificates of a `--jwks-ca` PEM file: at least one, each one a
/// usable trust anchor.
fn read_jwks_ca(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        roots
            .add(c.clone())
            .map_err(|e| format!("certificate {}: {e}", i + 1))?;
    }
    Ok(certs)
}

impl Config {
    /// Validates every flag and reports all problems, each naming its flag.
    pub fn from_args(a: &Args) -> Result<Self, Vec<String>> {
        let mut errs = Vec::new();
        macro_rules! name {
            ($t:ty, $flag:literal, $v:expr) => {
                <$t>::new($v)
                    .map_err(|e| errs.push(format!("invalid {}: {e}", $flag)))
                    .ok()
            };
        }
        let cluster = name!(ClusterName, "--cluster", &a.cluster);
        let region = name!(Region, "--region", &a.region);
        let zone = name!(Zone, "--zone", &a.zone);
        let namespace = name!(Namespace, "--namespace", &a.namespace);
        let service = name!(ServiceName, "--service", &a.service);
        let trust_domain = name!(TrustDomain, "--trust-domain", &a.trust_domain);
        let sa_name = a
            .service_account
            .clone()
            .unwrap_or_else(|| a.service.clone());
        let service_account = name!(ServiceAccount, "--service-account", &sa_name);
        let app = parse_addr("--app", &a.app, &mut errs);
        let outbound = parse_addr("--outbound", &a.outbound, &mut errs);
        let inbound = parse_addr("--inbound", &a.inbound, &mut errs);
        let dns_server = a
            .dns_server
            .as_deref()
            .and_then(|s| parse_addr("--dns-server", s, &mut errs));
        let admin = if a.admin == "off" {
            Some(None)
        } else {
            parse_addr("--admin", &a.admin, &mut errs).map(Some)
        };
        let port = match (a.port, app) {
            (Some(p), _) => NonZeroU16::new(p).or_else(|| {
                errs.push("invalid --port 0: must be 1 to 65535".into());
                None
            }),
            (None, Some(app)) => NonZeroU16::new(app.port()).or_else(|| {
                errs.push("invalid --app: port 0".into());
                None
            }),
            (None, None) => None,
        };
        let protocol = Protocol::parse(&a.protocol).or_else(|| {
            errs.push(format!(
                "invalid --protocol {:?}: expected http, http2, grpc or tcp",
                a.protocol
            ));
            None
        });
        let capture = match a.capture.as_str() {
            "explicit" => Capture::Explicit,
            "transparent" => Capture::Transparent,
            other => {
                errs.push(format!(
                    "invalid --capture {other:?}: expected explicit or transparent"
                ));
                Capture::Explicit
            }
        };
        let address = match (&a.address, inbound) {
            (Some(s), _) => s
                .parse::<IpAddr>()
                .map_err(|e| errs.push(format!("invalid --address {s:?}: {e}")))
                .ok(),
            (None, Some(i)) if i.ip().is_unspecified() => Some(IpAddr::from([127, 0, 0, 1])),
            (None, Some(i)) => Some(i.ip()),
            (None, None) => None,
        };
        let id_text =
            a.id.clone()
                .unwrap_or_else(|| format!("{}-{}", a.service, std::process::id()));
        let id = name!(EndpointId, "--id", &id_text);
        let mut labels = BTreeMap::new();
        for l in a.labels.iter().filter(|l| !l.is_empty()) {
            match l.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    labels.insert(k.to_string(), v.to_string());
                }
                _ => errs.push(format!("invalid --label {l:?}: expected key=value")),
            }
        }
        let join = match (&a.join_token, &a.kube_token_file) {
            (Some(t), Some(_)) => {
                errs.push(
                    "--join-token and --kube-token-file are two ways to enroll: give one".into(),
                );
                Some(Ok(t))
            }
            (Some(t), None) => Some(Ok(t)),
            (None, Some(f)) => Some(Err(f)),
            (None, None) => None,
        };
        // --plaintext with a token: the data plane in plain text, the
        // token's certificate for the federation only.
        let data_plaintext = a.plaintext;
        let plaintext = a.plaintext && join.is_none();
        let tls = match (&a.cert, &a.key, &a.ca, plaintext, join) {
            (None, None, None, false, Some(Err(f))) => match std::fs::read_to_string(f) {
                Ok(t) if !t.trim().is_empty() => Some(Tls::KubernetesToken(f.clone())),
                Ok(_) => {
                    errs.push(format!(
                        "invalid --kube-token-file {}: the file is empty",
                        f.display()
                    ));
                    None
                }
                Err(e) => {
                    errs.push(format!("invalid --kube-token-file {}: {e}", f.display()));
                    None
                }
            },
            (Some(cert), Some(key), Some(ca), false, None) => Some(Tls::Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            (None, None, None, false, Some(Ok(t))) if !t.trim().is_empty() => {
                Some(Tls::JoinToken(t.trim().to_string()))
            }
            (None, None, None, true, None) => Some(Tls::Plaintext),
            (_, _, _, true, _) => {
                errs.push("--plaintext cannot be combined with --cert, --key or --ca".into());
                None
            }
            (_, _, _, false, Some(_)) => {
                errs.push(
                    "--join-token and --kube-token-file replace --cert, --key and --ca: give one or the other".into(),
                );
                None
            }
            _ => {
                errs.push(
                    "mTLS needs --join-token, --kube-token-file, or all of --cert, --key and --ca (or --plaintext for local experiments)"
                        .into(),
                );
                None
            }
        };
        if let Some(p) = &a.readiness_path {
            if !p.starts_with('/') {
                errs.push(format!("invalid --readiness-path {p:?}: must start with /"));
            }
        }
        let probe_interval =
            parse_positive_duration("--probe-interval", &a.probe_interval, &mut errs)
                .unwrap_or(Duration::from_secs(1));
        let drain_deadline =
            parse_positive_duration("--drain-deadline", &a.drain_deadline, &mut errs)
                .unwrap_or(Duration::from_secs(1));
        let state_max_age = parse_positive_duration("--state-max-age", &a.state_max_age, &mut errs)
            .unwrap_or(Duration::from_secs(24 * 3600));
        let load_report_interval =
            parse_positive_duration("--load-report-interval", &a.load_report_interval, &mut errs)
                .unwrap_or(Duration::from_secs(5));
        let capacity = match a.capacity.trim().parse::<f64>() {
            Ok(c) if c.is_finite() && c >= 0.0 => c,
            _ => {
                errs.push(format!(
                    "invalid --capacity {:?}: requests per second, a number >= 0",
                    a.capacity
                ));
                0.0
            }
        };
        let outbound_limits = parse_limits(
            "--outbound-rate-limit",
            &a.outbound_rate_limits,
            |k| ServiceKey::parse_with_default(k, namespace.as_ref()).map_err(|e| e.to_string()),
            &mut errs,
        );
        let inbound_limits = parse_limits(
            "--inbound-rate-limit",
            &a.inbound_rate_limits,
            |k| k.parse::<Identity>().map_err(|e| e.to_string()),
            &mut errs,
        );
        let federation = check_url(&a.federation).map_err(|e| errs.push(e)).ok();
        let federation_tls = match (&federation, &tls) {
            (Some(url), Some(t)) if url.starts_with("https://") => {
                federation_trust(a, t).map_err(|e| errs.push(e)).ok()
            }
            _ => None,
        };
        let log_json = parse_log_format(&a.log_format, &mut errs);
        let threads = mesh_core::flag::parse_threads(a.threads, &mut errs);
        let otlp_endpoint = a.otlp_endpoint.as_deref().and_then(|u| {
            check_url(u)
                .map_err(|_| {
                    errs.push(format!(
                        "invalid --otlp-endpoint {u:?}: expected http://HOST:PORT"
                    ));
                })
                .ok()
        });
        let trace_sampling = match a.trace_sampling.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            _ => {
                errs.push(format!(
                    "invalid --trace-sampling {:?}: a ratio from 0 to 1",
                    a.trace_sampling
                ));
                1.0
            }
        };
        let jwks_roots = match &a.jwks_ca {
            Some(path) => read_jwks_ca(path).unwrap_or_else(|e| {
                errs.push(format!("invalid --jwks-ca {}: {e}", path.display()));
                Vec::new()
            }),
            None => Vec::new(),
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        let identity = match (&trust_domain, &namespace, &service_account) {
            (Some(td), Some(ns), Some(sa)) => Identity {
                trust_domain: td.clone(),
                namespace: ns.clone(),
                service_account: sa.clone(),
            },
            _ => return Err(errs),
        };
        match (
            cluster, region, zone, namespace, service, app, federation, outbound, inbound, admin,
            address, id, port, protocol, tls,
        ) {
            (
                Some(cluster),
                Some(region),
                Some(zone),
                Some(ns),
                Some(svc),
                Some(app),
                Some(federation),
                Some(outbound),
                Some(inbound),
                Some(admin),
                Some(address),
                Some(id),
                Some(port),
                Some(protocol),
                Some(tls),
            ) => Ok(Self {
                cluster,
                locality: Locality { region, zone },
                service: ServiceKey::new(ns, svc),
                app,
                port,
                protocol,
                federation,
                plaintext: data_plaintext,
                federation_tls,
                outbound,
                capture,
                inbound,
                admin,
                address,
                id,
                labels,
                identity,
                tls,
                jwks_ca: a.jwks_ca.clone(),
                state_file: a.state_file.clone(),
                state_max_age,
                dns_server,
                jwks_roots,
                readiness_path: a.readiness_path.clone(),
                probe_interval,
                capacity,
                load_report_interval,
                outbound_limits,
                inbound_limits,
                drain_deadline,
                log_json,
                threads,
                otlp_endpoint,
                trace_sampling,
            }),
            _ => Err(errs),
        }
    }
}

/// How the agent checks the federation: `--federation-ca`, else the root
/// hash its join token carries, else the mesh's anchors in `--ca`. With
/// `--cert/--key`, the agent shows that certificate to the federation.
fn federation_trust(a: &Args, tls: &Tls) -> Result<std::sync::Arc<mesh_node::fed::FedTls>, String> {
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| format!("invalid {flag} {}: {e}", p.display()))
    };
    let fed = match (&a.federation_ca, tls) {
        (Some(p), Tls::JoinToken(_) | Tls::KubernetesToken(_) | Tls::Files { .. }) => {
            mesh_node::fed::FedTls::new(Some(&read("--federation-ca", p)?), None)
                .map_err(|e| format!("invalid --federation-ca {}: {e:#}", p.display()))?
        }
        (None, Tls::JoinToken(t)) => match mesh_node::enroll::pinned_root(t) {
            Some(pin) => mesh_node::fed::FedTls::new(None, Some(pin)).map_err(|e| format!("{e:#}"))?,
            None => {
                return Err("--join-token: this token carries no root hash to check the federation with; give --federation-ca FILE".into())
            }
        },
        (None, Tls::Files { ca, .. }) => {
            mesh_node::fed::FedTls::new(Some(&read("--ca", ca)?), None)
                .map_err(|e| format!("invalid --ca {}: {e:#}", ca.display()))?
        }
        (_, Tls::Plaintext) => {
            return Err("--plaintext leaves the agent without a certificate, and an https:// federation serves only mesh nodes: enroll with --join-token or --kube-token-file, or give --cert/--key/--ca".into())
        }
        (None, Tls::KubernetesToken(_)) => {
            return Err("an https:// --federation needs --federation-ca FILE (its CA bundle)".into())
        }
    };
    if let Tls::Files { cert, key, .. } = tls {
        fed.set_client_pem(&read("--cert", cert)?, &read("--key", key)?)
            .map_err(|e| format!("--cert/--key: {e:#}"))?;
    }
    Ok(fed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Config, Vec<String>> {
        let mut v = vec![
            "fedmesh-agent",
            "--cluster",
            "c1",
            "--region",
            "us-east",
            "--zone",
            "us-east-1a",
            "--service",
            "reviews",
            "--app",
            "127.0.0.1:18080",
        ];
        // A federation on loopback without TLS (--insecure-plaintext), so
        // that these flags need no CA bundle; the https default is below.
        if !extra.contains(&"--federation") {
            v.extend_from_slice(&["--federation", "http://127.0.0.1:15010"]);
        }
        v.extend_from_slice(extra);
        Config::from_args(&Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn the_federation_is_https_by_default_and_needs_its_ca() {
        let mut v = vec![
            "fedmesh-agent",
            "--cluster",
            "c1",
            "--region",
            "r",
            "--zone",
            "z",
            "--service",
            "reviews",
            "--app",
            "127.0.0.1:18080",
        ];
        let e = Config::from_args(&Args::try_parse_from(v.clone()).unwrap())
            .unwrap_err()
            .join("\n");
        assert!(
            e.contains("mTLS needs --join-token, --kube-token-file"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "eyJhbGciOi.x.y\n").unwrap();
        let mut kube = v.clone();
        kube.extend_from_slice(&["--kube-token-file", token.to_str().unwrap()]);
        let e = Config::from_args(&Args::try_parse_from(kube).unwrap())
            .unwrap_err()
            .join("\n");
        assert!(
            e.contains("an https:// --federation needs --federation-ca"),
            "{e}"
        );
        v.extend_from_slice(&["--plaintext"]);
        let e = Config::from_args(&Args::try_parse_from(v).unwrap())
            .unwrap_err()
            .join("\n");
        assert!(
            e.contains("--plaintext leaves the agent without a certificate"),
            "{e}"
        );
    }

    #[test]
    fn defaults_and_derived_values() {
        let c = args(&["--plaintext"]).unwrap();
        assert_eq!(
            c.port.get(),
            18080,
            "the service port defaults to the app's"
        );
        assert_eq!(c.protocol, Protocol::Http);
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
        assert_eq!(c.address, IpAddr::from([127, 0, 0, 1]));
        assert!(matches!(c.tls, Tls::Plaintext));
        assert_eq!(c.capture, Capture::Explicit);
    }

    #[test]
    fn a_kubernetes_token_file_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("fedmesh-kube-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, empty) = (dir.join("token"), dir.join("empty"));
        std::fs::write(&good, "eyJhbGciOi.x.y\n").unwrap();
        std::fs::write(&empty, "  \n").unwrap();
        let c = args(&["--kube-token-file", good.to_str().unwrap()]).unwrap();
        assert!(matches!(&c.tls, Tls::KubernetesToken(p) if *p == good));
        let err = |a: &[&str]| args(a).unwrap_err().join("\n");
        assert!(err(&["--kube-token-file", empty.to_str().unwrap()]).contains("the file is empty"));
        assert!(err(&["--kube-token-file", "/nonexistent/token"])
            .contains("invalid --kube-token-file /nonexistent/token"));
        assert!(err(&[
            "--kube-token-file",
            good.to_str().unwrap(),
            "--join-token",
            "fmjt_x"
        ])
        .contains("two ways to enroll"));
        // A token with --plaintext: the certificate is for the federation only.
        let c = args(&["--kube-token-file", good.to_str().unwrap(), "--plaintext"]).unwrap();
        assert!(c.plaintext && matches!(&c.tls, Tls::KubernetesToken(p) if *p == good));
        assert!(err(&["--cert", "c.pem", "--plaintext"]).contains("--plaintext cannot be combined"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rate_limits_parse_per_key_and_default() {
        let c = args(&[
            "--plaintext",
            "--outbound-rate-limit",
            "ratings=10/s,*=600/m",
            "--inbound-rate-limit",
            "spiffe://cluster.local/ns/default/sa/frontend=5/s",
        ])
        .unwrap();
        let ratings: ServiceKey = "default/ratings".parse().unwrap();
        assert_eq!(c.outbound_limits.by_key[&ratings].count.get(), 10);
        let d = c.outbound_limits.default.unwrap();
        assert_eq!((d.count.get(), d.per), (600, Duration::from_secs(60)));
        assert_eq!(c.inbound_limits.by_key.len(), 1);
        assert!(c.inbound_limits.default.is_none());
    }

    #[test]
    fn jwks_ca_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = mesh_test::tls::TestCa::new();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, &ca.pem).unwrap();
        let c = args(&["--plaintext", "--jwks-ca", good.to_str().unwrap()]).unwrap();
        assert_eq!(c.jwks_roots, vec![ca.cert.clone()]);
        assert!(args(&["--plaintext"]).unwrap().jwks_roots.is_empty());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        for (path, want) in [
            (empty, "no certificate in it"),
            (dir.path().join("missing.pem"), "invalid --jwks-ca"),
        ] {
            let errs = args(&["--plaintext", "--jwks-ca", path.to_str().unwrap()]).unwrap_err();
            let all = errs.join("\n");
            assert!(
                all.contains(&format!("invalid --jwks-ca {}", path.display()))
                    && all.contains(want),
                "{all}"
            );
        }
    }

    #[test]
    fn every_bad_flag_is_named() {
        let errs = args(&[
            "--protocol",
            "udp",
            "--capture",
            "magic",
            "--label",
            "novalue",
            "--outbound-rate-limit",
            "ratings=0/s",
            "--inbound-rate-limit",
            "frontend=5/s",
            "--probe-interval",
            "soon",
            "--readiness-path",
            "healthz",
        ])
        .unwrap_err();
        let all = errs.join("\n");
        for want in [
            "invalid --protocol \"udp\"",
            "invalid --capture \"magic\"",
            "invalid --label \"novalue\"",
            "invalid --outbound-rate-limit \"ratings=0/s\"",
            "invalid --inbound-rate-limit \"frontend=5/s\"",
            "invalid --probe-interval",
            "invalid --readiness-path \"healthz\"",
            "mTLS needs --join-token, --kube-token-file, or all of --cert, --key and --ca",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }
}
