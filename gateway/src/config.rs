//! Configuration of `fedmesh-gateway`: flags (or `FEDMESH_*` variables)
//! parsed into a typed [`Config`], or every problem at once.

use clap::Parser;
use mesh_core::flag::{check_url, parse_addr, parse_log_format};
use mesh_core::name::ClusterName;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Command-line flags as given, before validation.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fedmesh-gateway",
    version,
    about = "fedmesh east-west gateway: SNI-routed mTLS passthrough"
)]
pub struct Args {
    /// Name of the cluster this gateway serves.
    #[arg(long, env = "FEDMESH_CLUSTER")]
    pub cluster: String,
    /// Address for TLS connections from other clusters.
    #[arg(long, env = "FEDMESH_LISTEN", default_value = "0.0.0.0:15443")]
    pub listen: String,
    /// Federation API URL; routes come live from its Discovery stream.
    #[arg(long, env = "FEDMESH_FEDERATION")]
    pub federation: Option<String>,
    /// A join token (`meshctl token create --gateway`) for the gateway's
    /// identity, `spiffe://<td>/ns/fedmesh-system/sa/fedmesh-gateway`: the
    /// gateway makes its key and the federation's CA signs its certificate,
    /// which it shows the federation (never its data plane).
    #[arg(long, env = "FEDMESH_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// A Kubernetes ServiceAccount token file to enroll with instead.
    #[arg(long, env = "FEDMESH_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// The CA bundle (PEM) the federation's certificate is checked against;
    /// without it, the root hash the join token carries.
    #[arg(long, env = "FEDMESH_FEDERATION_CA")]
    pub federation_ca: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "FEDMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Static route `SERVER_NAME=IP:PORT[,IP:PORT...]`, beside (or instead of) the federation's.
    #[arg(long = "route", value_name = "NAME=ADDRS")]
    pub routes: Vec<String>,
    /// Address for /metrics, /healthz and /ready.
    #[arg(long, env = "FEDMESH_ADMIN")]
    pub admin: Option<String>,
    /// Data-plane worker threads (default: one per core).
    #[arg(long, env = "FEDMESH_THREADS")]
    pub threads: Option<usize>,
    /// Most connections open at once; more are closed at accept.
    #[arg(long, default_value_t = 65_536)]
    pub max_connections: usize,
    /// New connections per second allowed from one source address (0: no limit).
    #[arg(long, default_value_t = 5_000)]
    pub rate_limit_per_source: u32,
    /// Connections one source address may hold open at once (0: no limit;
    /// not applied to --proxy-protocol-from peers, which carry many sources).
    #[arg(long, default_value_t = 2_048)]
    pub max_connections_per_source: u32,
    /// Time a client has to send its whole ClientHello (and its PROXY header, if one is required).
    #[arg(long, default_value = "10s")]
    pub handshake_timeout: String,
    /// Network (`10.0.0.0/8`, `198.18.1.2/32`, or an IP) of L4 load balancers or relays in front of
    /// the gateway; each connection from it must start with a PROXY protocol v2 header, whose
    /// source address then stands for the client (repeatable).
    #[arg(long = "proxy-protocol-from", value_name = "CIDR")]
    pub proxy_protocol_from: Vec<String>,
    /// Largest ClientHello accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_client_hello: usize,
    /// Most bytes all ClientHello buffers may hold beyond the first KiB of
    /// each (half-open handshakes, and hellos not yet passed on); a
    /// handshake that needs more is refused (`handshake_memory`).
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_handshake_memory: usize,
    /// Time to connect to an endpoint before trying another.
    #[arg(long, default_value = "2s")]
    pub connect_timeout: String,
    /// A connection with no bytes either way for this long is closed.
    #[arg(long, default_value = "1h")]
    pub idle_timeout: String,
    /// After SIGTERM, how long open connections may continue before they are closed.
    #[arg(long, default_value = "30s")]
    pub drain_deadline: String,
    /// How often the other clusters' gateways, and the services they export,
    /// are probed and the results reported to the federation.
    #[arg(long, env = "FEDMESH_PROBE_INTERVAL", default_value = "5s")]
    pub probe_interval: String,
    /// Endpoint choice: `least-request` (power of two choices) or `round-robin`.
    #[arg(long, default_value = "least-request")]
    pub lb: String,
    /// File keeping the last routing state, read at start when the federation is away.
    #[arg(long, env = "FEDMESH_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// DNS server (`IP:PORT`) for remote gateways' names; default: the system's resolver.
    #[arg(long, env = "FEDMESH_DNS_SERVER")]
    pub dns_server: Option<String>,
    /// Access log: `stdout` (one JSON line per connection) or `off`.
    #[arg(long, default_value = "stdout")]
    pub access_log: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FEDMESH_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// OTLP/gRPC endpoint (`http://127.0.0.1:4317`) the connection spans
    /// are exported to; without it none is made.
    #[arg(long, env = "FEDMESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// How an endpoint is chosen among the healthy ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Balance {
    /// Two random endpoints, the one with fewer open connections (Envoy's default).
    LeastRequest,
    /// Each in turn.
    RoundRobin,
}

/// How the gateway gets its certificate for the federation, and trusts it.
#[derive(Clone)]
pub struct FederationAuth {
    /// Trust and the client certificate, once enrolled.
    pub tls: std::sync::Arc<mesh_node::fed::FedTls>,
    /// The gateway's SPIFFE ID.
    pub identity: String,
    /// A join token, or a Kubernetes token file read at each enrollment.
    pub credential: Credential,
}

/// What the gateway enrolls with.
#[derive(Debug, Clone)]
pub enum Credential {
    /// `--join-token`.
    JoinToken(String),
    /// `--kube-token-file`.
    KubernetesToken(PathBuf),
}

impl std::fmt::Debug for FederationAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationAuth")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn federation_auth(a: &Args) -> Result<FederationAuth, String> {
    let credential = match (&a.join_token, &a.kube_token_file) {
        (Some(t), None) if !t.trim().is_empty() => Credential::JoinToken(t.trim().to_string()),
        (None, Some(f)) => Credential::KubernetesToken(f.clone()),
        (Some(_), Some(_)) => {
            return Err("--join-token and --kube-token-file are two ways to enroll: give one".into())
        }
        _ => {
            return Err("an https:// --federation needs the gateway's credential: --join-token or --kube-token-file".into())
        }
    };
    let ca = match &a.federation_ca {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("invalid --federation-ca {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let token = match &credential {
        Credential::JoinToken(t) => Some(t.as_str()),
        Credential::KubernetesToken(_) => None,
    };
    let tls = mesh_node::enroll::trust(ca.as_deref(), token).map_err(|e| format!("{e:#}"))?;
    mesh_core::name::TrustDomain::new(&a.trust_domain)
        .map_err(|e| format!("invalid --trust-domain: {e}"))?;
    Ok(FederationAuth {
        tls,
        identity: format!(
            "spiffe://{}/ns/fedmesh-system/sa/fedmesh-gateway",
            a.trust_domain
        ),
        credential,
    })
}

impl Credential {
    /// The credential as the federation takes it, read now.
    pub fn read(&self) -> anyhow::Result<mesh_api::v1::sign_certificate_request::Credential> {
        use mesh_api::v1::sign_certificate_request::Credential as C;
        Ok(match self {
            Credential::JoinToken(t) => C::JoinToken(t.clone()),
            Credential::KubernetesToken(f) => C::KubernetesToken(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("read the Kubernetes token {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
        })
    }
}

/// Everything the gateway needs to start. Built only through [`Config::from_args`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// The cluster served.
    pub cluster: ClusterName,
    /// TLS listener address.
    pub listen: SocketAddr,
    /// Federation API URL.
    pub federation: Option<String>,
    /// How the gateway enrolls and trusts an `https://` federation.
    #[serde(skip)]
    pub federation_auth: Option<FederationAuth>,
    /// Static routes: server name to endpoint addresses.
    pub routes: BTreeMap<String, Vec<SocketAddr>>,
    /// Admin listener address.
    pub admin: Option<SocketAddr>,
    /// Data-plane worker threads.
    pub threads: usize,
    /// Most open connections. 65,536 by default: far above what one core
    /// splices, low enough that a flood cannot exhaust file descriptors
    /// (raise `ulimit -n` to match).
    pub max_connections: usize,
    /// New connections per second per source address; `None` for no limit.
    /// 5,000/s by default: a whole remote cluster's agents reconnecting at
    /// once stay under it, a single misbehaving client does not.
    pub rate_limit_per_source: Option<std::num::NonZeroU32>,
    /// Connections one source address may hold open; `None` for no limit.
    /// 2,048 by default (1/32 of `max_connections`): one address cannot
    /// take every slot while a cluster's agents still fit.
    pub max_connections_per_source: Option<std::num::NonZeroU32>,
    /// ClientHello deadline. 10 s as Envoy's listener filter timeout (15 s)
    /// rounded down: real clients send it in one round trip. From a
    /// [`proxy_protocol_from`](Self::proxy_protocol_from) source, one
    /// deadline covers the PROXY header and the ClientHello.
    pub handshake_timeout: Duration,
    /// Sources that must send a PROXY protocol v2 header first; its source
    /// address then stands for the connection's peer (in the access log,
    /// the peer cluster and the connection span). Empty by default: no
    /// source is trusted, no header is read.
    pub proxy_protocol_from: Vec<Cidr>,
    /// Largest ClientHello. 16 KiB: one full TLS record; today's largest
    /// hellos (post-quantum key shares, ECH) are under 3 KiB.
    pub max_client_hello: usize,
    /// Budget of ClientHello buffers beyond the first KiB of each. 32 MiB:
    /// 1,000 largest hellos at once; real hellos fit in the first KiB.
    pub max_handshake_memory: usize,
    /// Connect deadline per endpoint attempt. 2 s: local endpoints answer in
    /// microseconds; a silent one is better skipped for the next.
    pub connect_timeout: Duration,
    /// Idle deadline. 1 h as Envoy's tcp_proxy default.
    pub idle_timeout: Duration,
    /// Drain deadline after SIGTERM.
    pub drain_deadline: Duration,
    /// Data-plane probe period.
    pub probe_interval: Duration,
    /// Endpoint choice.
    pub balance: Balance,
    /// Where the last routing state is kept.
    pub state_file: Option<PathBuf>,
    /// DNS server for remote gateways' names.
    pub dns_server: Option<SocketAddr>,
    /// Write one JSON access-log line per connection to stdout.
    pub access_log: bool,
    /// Logs as JSON lines.
    pub log_json: bool,
    /// OTLP/gRPC endpoint for connection spans.
    pub otlp_endpoint: Option<String>,
}

impl Config {
    /// Validates every flag and reports all problems, each naming its flag.
    pub fn from_args(a: &Args) -> Result<Self, Vec<String>> {
        let mut errs = Vec::new();
        let cluster = ClusterName::new(&a.cluster)
            .map_err(|e| errs.push(format!("invalid --cluster: {e}")))
            .ok();
        let listen = parse_addr("--listen", &a.listen, &mut errs);
        let admin = a
            .admin
            .as_deref()
            .and_then(|s| parse_addr("--admin", s, &mut errs));
        let dns_server = a
            .dns_server
            .as_deref()
            .and_then(|s| parse_addr("--dns-server", s, &mut errs));
        let federation = a
            .federation
            .as_deref()
            .and_then(|u| check_url(u).map_err(|e| errs.push(e)).ok());
        let federation_auth = match &federation {
            Some(u) if u.starts_with("https://") => {
                federation_auth(a).map_err(|e| errs.push(e)).ok()
            }
            _ => None,
        };
        let mut routes = BTreeMap::new();
        for r in &a.routes {
            match parse_route(r) {
                Ok((name, addrs)) => {
                    if routes.insert(name.clone(), addrs).is_some() {
                        errs.push(format!("invalid --route {r:?}: {name} is routed twice"));
                    }
                }
                Err(e) => errs.push(e),
            }
        }
        if a.federation.is_none() && a.routes.is_empty() {
            errs.push("no routes: give --federation URL, or at least one --route NAME=ADDR".into());
        }
        let mut duration =
            |flag: &str, v: &str| mesh_core::flag::parse_positive_duration(flag, v, &mut errs);
        let handshake_timeout = duration("--handshake-timeout", &a.handshake_timeout);
        let connect_timeout = duration("--connect-timeout", &a.connect_timeout);
        let idle_timeout = duration("--idle-timeout", &a.idle_timeout);
        let drain_deadline = duration("--drain-deadline", &a.drain_deadline);
        let probe_interval =
            duration("--probe-interval", &a.probe_interval).unwrap_or(Duration::from_secs(5));
        let threads = mesh_core::flag::parse_threads(a.threads, &mut errs);
        if a.max_connections == 0 {
            errs.push("invalid --max-connections 0: must be at least 1".into());
        }
        if a.max_handshake_memory < 2 * a.max_client_hello {
            errs.push(format!(
                "invalid --max-handshake-memory {}: must hold at least one largest ClientHello (2 x --max-client-hello = {} bytes)",
                a.max_handshake_memory,
                2 * a.max_client_hello
            ));
        }
        if !(512..=1 << 20).contains(&a.max_client_hello) {
            errs.push(format!(
                "invalid --max-client-hello {}: must be 512 to 1048576 bytes",
                a.max_client_hello
            ));
        }
        let balance = match a.lb.as_str() {
            "least-request" => Balance::LeastRequest,
            "round-robin" => Balance::RoundRobin,
            other => {
                errs.push(format!(
                    "invalid --lb {other:?}: expected least-request or round-robin"
                ));
                Balance::LeastRequest
            }
        };
        let proxy_protocol_from = a
            .proxy_protocol_from
            .iter()
            .filter_map(|v| {
                v.parse::<Cidr>()
                    .map_err(|e| errs.push(format!("invalid --proxy-protocol-from {v:?}: {e}")))
                    .ok()
            })
            .collect();
        let access_log = match a.access_log.as_str() {
            "stdout" => true,
            "off" => false,
            other => {
                errs.push(format!(
                    "invalid --access-log {other:?}: expected stdout or off"
                ));
                false
            }
        };
        let log_json = parse_log_format(&a.log_format, &mut errs);
        let otlp_endpoint = a.otlp_endpoint.as_deref().and_then(|u| {
            check_url(u)
                .map_err(|_| {
                    errs.push(format!(
                        "invalid --otlp-endpoint {u:?}: expected http://HOST:PORT"
                    ));
                })
                .ok()
        });
        match (
            cluster,
            listen,
            handshake_timeout,
            connect_timeout,
            idle_timeout,
            drain_deadline,
        ) {
            (
                Some(cluster),
                Some(listen),
                Some(handshake_timeout),
                Some(connect_timeout),
                Some(idle_timeout),
                Some(drain_deadline),
            ) if errs.is_empty() => Ok(Self {
                cluster,
                listen,
                federation,
                federation_auth,
                routes,
                admin,
                threads,
                max_connections: a.max_connections,
                rate_limit_per_source: std::num::NonZeroU32::new(a.rate_limit_per_source),
                max_connections_per_source: std::num::NonZeroU32::new(a.max_connections_per_source),
                handshake_timeout,
                proxy_protocol_from,
                max_client_hello: a.max_client_hello,
                max_handshake_memory: a.max_handshake_memory,
                connect_timeout,
                idle_timeout,
                drain_deadline,
                probe_interval,
                balance,
                state_file: a.state_file.clone(),
                dns_server,
                access_log,
                log_json,
                otlp_endpoint,
            }),
            _ => Err(errs),
        }
    }
}

pub use mesh_core::cidr::Cidr;

/// Parses `NAME=IP:PORT[,IP:PORT...]`.
fn parse_route(r: &str) -> Result<(String, Vec<SocketAddr>), String> {
    let (name, addrs) = r.split_once('=').ok_or_else(|| {
        format!("invalid --route {r:?}: expected SERVER_NAME=IP:PORT[,IP:PORT...]")
    })?;
    let name = name.to_ascii_lowercase();
    mesh_core::name::check_dns_name(&name.replace('_', "x"))
        .map_err(|e| format!("invalid --route {r:?}: server name {e}"))?;
    let addrs = addrs
        .split(',')
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("invalid --route {r:?}: {a:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Config, Vec<String>> {
        let mut v = vec!["fedmesh-gateway"];
        v.extend_from_slice(args);
        Config::from_args(&Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn all_errors_named() {
        let errs = load(&[
            "--cluster",
            "C_1",
            "--listen",
            "x",
            "--federation",
            "ftp://a",
            "--admin",
            "1.2.3.4",
            "--route",
            "svc=nowhere",
            "--idle-timeout",
            "0s",
            "--lb",
            "random",
            "--max-client-hello",
            "10",
            "--proxy-protocol-from",
            "10.0.0.0/8",
            "--proxy-protocol-from",
            "10.0.0.0/33",
        ])
        .unwrap_err();
        let want = [
            "invalid --cluster: invalid cluster name \"C_1\"",
            "invalid --listen \"x\"",
            "invalid --admin \"1.2.3.4\"",
            "invalid --federation \"ftp://a\"",
            "invalid --route \"svc=nowhere\"",
            "invalid --idle-timeout \"0s\": must be more than 0",
            "invalid --max-client-hello 10",
            "invalid --lb \"random\"",
            "invalid --proxy-protocol-from \"10.0.0.0/33\": prefix length 33 is over 32",
        ];
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
        for (e, w) in errs.iter().zip(want) {
            assert!(e.starts_with(w), "{e:?} should start with {w:?}");
        }
        let errs = load(&["--cluster", "c1"]).unwrap_err();
        assert!(errs[0].starts_with("no routes"), "{errs:?}");
        let errs = load(&[
            "--cluster",
            "c1",
            "--route",
            "a.b=127.0.0.1:1",
            "--max-handshake-memory",
            "1000",
        ])
        .unwrap_err();
        assert_eq!(
            errs,
            ["invalid --max-handshake-memory 1000: must hold at least one largest ClientHello (2 x --max-client-hello = 32768 bytes)"]
        );
    }

    #[test]
    fn static_routes() {
        let c = load(&[
            "--cluster",
            "c1",
            "--route",
            "svc-a.mesh.local=127.0.0.1:1,127.0.0.1:2",
            "--route",
            "OUTBOUND_.80_._.r.default.svc.cluster.local=[::1]:3",
            "--rate-limit-per-source",
            "0",
        ])
        .unwrap();
        assert_eq!(c.routes["svc-a.mesh.local"].len(), 2);
        assert!(c
            .routes
            .contains_key("outbound_.80_._.r.default.svc.cluster.local"));
        assert_eq!(c.rate_limit_per_source, None);
        assert!(
            c.proxy_protocol_from.is_empty(),
            "no source is trusted by default"
        );
        let errs = load(&[
            "--cluster",
            "c1",
            "--route",
            "a=127.0.0.1:1",
            "--route",
            "a=127.0.0.1:2",
        ])
        .unwrap_err();
        assert!(errs[0].contains("routed twice"), "{errs:?}");
    }

    #[test]
    fn proxy_protocol_sources() {
        let c = load(&[
            "--cluster",
            "c1",
            "--route",
            "a=127.0.0.1:1",
            "--proxy-protocol-from",
            "198.18.1.2/32",
            "--proxy-protocol-from",
            "10.0.0.0/8",
            "--proxy-protocol-from",
            "2001:db8::/32",
            "--proxy-protocol-from",
            "192.0.2.7",
        ])
        .unwrap();
        let nets: Vec<String> = c
            .proxy_protocol_from
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            nets,
            [
                "198.18.1.2/32",
                "10.0.0.0/8",
                "2001:db8::/32",
                "192.0.2.7/32"
            ]
        );
        let trusted = |ip: &str| {
            c.proxy_protocol_from
                .iter()
                .any(|n| n.contains(ip.parse().unwrap()))
        };
        for ip in [
            "198.18.1.2",
            "10.0.0.0",
            "10.255.255.255",
            "::ffff:10.1.2.3",
            "2001:db8:ffff::1",
            "192.0.2.7",
        ] {
            assert!(trusted(ip), "{ip}");
        }
        for ip in [
            "198.18.1.3",
            "11.0.0.0",
            "9.255.255.255",
            "2001:db9::1",
            "::1",
            "127.0.0.1",
            "::a00:1",
        ] {
            assert!(!trusted(ip), "{ip}");
        }
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains([203, 0, 113, 9].into()));
        assert!(!all.contains("2001:db8::1".parse().unwrap()));
        assert!("::/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));

        for (bad, want) in [
            ("10.0.0.0/33", "prefix length 33 is over 32"),
            ("::/129", "prefix length 129 is over 128"),
            ("10.1.0.0/8", "did you mean 10.0.0.0/8?"),
            ("10.0.0.0/", "prefix length \"\" is not a number"),
            ("10.0.0.0/+8", "prefix length \"+8\" is not a number"),
            ("10.0.0.0/x", "prefix length \"x\" is not a number"),
            (
                "gateway.example/32",
                "\"gateway.example\" is not an IP address",
            ),
            ("", "\"\" is not an IP address"),
            ("10.0.0.0:80", "is not an IP address"),
        ] {
            let errs = load(&[
                "--cluster",
                "c1",
                "--route",
                "a=127.0.0.1:1",
                "--proxy-protocol-from",
                bad,
            ])
            .unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            let prefix = format!("invalid --proxy-protocol-from {bad:?}: ");
            assert!(errs[0].starts_with(&prefix), "{errs:?}");
            assert!(
                errs[0].contains(want),
                "{bad}: {errs:?} should say {want:?}"
            );
        }
    }
}
