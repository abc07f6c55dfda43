//! Configuration of `fedmesh-federation`: flags (or their `FEDMESH_*`
//! environment variables) parsed into a typed [`Config`], or every problem at once.

use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;

/// Command-line flags as given, before validation.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fedmesh-federation",
    version,
    about = "fedmesh control plane: global endpoint registry and config push"
)]
pub struct Args {
    /// Address for the gRPC API (registration, discovery, admin).
    #[arg(long, env = "FEDMESH_LISTEN", default_value = "127.0.0.1:15010")]
    pub listen: String,
    /// Address of the admin listener: `/metrics`, `/healthz`, `/ready`
    /// (ready while the registry is reachable). Off unless given.
    #[arg(long, env = "FEDMESH_ADMIN")]
    pub admin: Option<String>,
    /// Registry backend: `embedded` (on disk in --data-dir),
    /// `etcd://HOST:PORT[,HOST:PORT...]`, or `memory` (for tests: everything
    /// is lost at exit).
    #[arg(long, env = "FEDMESH_REGISTRY", default_value = "embedded")]
    pub registry: String,
    /// Where the embedded registry keeps its state (and, without
    /// --ca-key-file, the key sealing the CA's keys). Default:
    /// `$STATE_DIRECTORY`, else `/var/lib/fedmesh` as root, else
    /// `$XDG_STATE_HOME/fedmesh` (`~/.local/state/fedmesh`).
    #[arg(long, env = "FEDMESH_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Heartbeat time-to-live: a cluster silent this long becomes `unknown`.
    #[arg(long, env = "FEDMESH_HEARTBEAT_TTL", default_value = "10s")]
    pub heartbeat_ttl: String,
    /// How long an endpoint whose workload stopped renewing its lease stays
    /// listed (unhealthy, out of rotation) before it is deleted. Its lease
    /// TTL is the heartbeat TTL.
    #[arg(long, env = "FEDMESH_ENDPOINT_GC_AFTER", default_value = "10m")]
    pub endpoint_gc_after: String,
    /// Name of this replica, recorded with the heartbeats it holds.
    #[arg(long, env = "FEDMESH_REPLICA")]
    pub replica: Option<String>,
    /// Lease TTL of the elected leader: a dead leader is replaced within it.
    #[arg(long, env = "FEDMESH_LEADER_TTL", default_value = "10s")]
    pub leader_ttl: String,
    /// How often the leader recomputes the global weights at least (it also
    /// does shortly after every change).
    #[arg(long, env = "FEDMESH_WEIGHTS_INTERVAL", default_value = "1s")]
    pub weights_interval: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FEDMESH_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// SPIFFE trust domain of the mesh's identities.
    #[arg(long, env = "FEDMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Key (32 bytes, raw or 64 hex characters) that seals the CA's keys in
    /// the registry; without it (and without --ca-cert) the root lives in
    /// this process only.
    #[arg(long, env = "FEDMESH_CA_KEY_FILE")]
    pub ca_key_file: Option<std::path::PathBuf>,
    /// A plug-in root certificate (PEM), with --ca-key.
    #[arg(long, env = "FEDMESH_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// The plug-in root's private key (PEM).
    #[arg(long, env = "FEDMESH_CA_KEY")]
    pub ca_key: Option<std::path::PathBuf>,
    /// Lifetime of workload certificates (1m to 168h).
    #[arg(long, env = "FEDMESH_CERT_TTL", default_value = "24h")]
    pub cert_ttl: String,
    /// Lifetime of the clusters' intermediate CAs (at least 3 times
    /// --cert-ttl, at most 87600h); each is replaced with a third of it
    /// left, and certificates it issued stay valid.
    #[arg(long, env = "FEDMESH_INTERMEDIATE_TTL", default_value = "8760h")]
    pub intermediate_ttl: String,
    /// A Kubernetes cluster whose ServiceAccount tokens this federation
    /// checks with TokenReview: `NAME=KUBECONFIG`, or `NAME` alone for the
    /// inferred configuration (in-cluster service account, else
    /// KUBECONFIG). Repeatable (comma-separated in the variable).
    #[arg(
        long = "kube-cluster",
        value_name = "NAME[=KUBECONFIG]",
        env = "FEDMESH_KUBE_CLUSTERS",
        value_delimiter = ','
    )]
    pub kube_cluster: Vec<String>,
    /// The audience a workload's projected ServiceAccount token must be for.
    #[arg(long, env = "FEDMESH_KUBE_TOKEN_AUDIENCE", default_value = crate::kube_auth::DEFAULT_AUDIENCE)]
    pub kube_token_audience: String,
    /// Discover this Kubernetes cluster's Services, EndpointSlices, Pods
    /// and Nodes and publish the exported services as cluster CLUSTER
    /// (`CLUSTER` alone: the in-cluster configuration; `CLUSTER=KUBECONFIG`:
    /// that kubeconfig).
    #[arg(
        long,
        env = "FEDMESH_KUBE_DISCOVERY",
        value_name = "CLUSTER[=KUBECONFIG]"
    )]
    pub kube_discovery: Option<String>,
    /// Label or annotation whose value `"true"` exports a Service (a
    /// ServiceExport object does too).
    #[arg(long, env = "FEDMESH_EXPORT_LABEL", default_value = crate::kube_discovery::DEFAULT_EXPORT_LABEL)]
    pub export_label: String,
    /// Watch the Istio kinds and fedmesh's TrafficWeights as custom
    /// resources in the `--kube-discovery` cluster and apply them as
    /// `meshctl apply` does.
    #[arg(long, env = "FEDMESH_WATCH_CRDS")]
    pub watch_crds: bool,
    /// `NAMESPACE/NAME` of the east-west gateway's LoadBalancer Service,
    /// whose ingress addresses are the cluster's gateway addresses.
    #[arg(long, env = "FEDMESH_GATEWAY_SERVICE", default_value = crate::kube_discovery::DEFAULT_GATEWAY_SERVICE)]
    pub gateway_service: String,
    /// CA certificate (PEM) etcd's serving certificate is checked against;
    /// turns on TLS to etcd.
    #[arg(long, env = "FEDMESH_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) presented to etcd (its
    /// `--client-cert-auth`); needs `--etcd-key` and `--etcd-ca`.
    #[arg(long, env = "FEDMESH_ETCD_CERT")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "FEDMESH_ETCD_KEY")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// Serve the API without TLS and without authentication: every caller
    /// acts as an admin. For a local experiment only: refused unless
    /// --listen is a loopback address.
    #[arg(long, env = "FEDMESH_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// A DNS name or IP address the API is reached by, added to the
    /// federation's serving certificate (which always names localhost and
    /// the loopback addresses). Repeatable (comma-separated in the variable).
    #[arg(long = "tls-san", env = "FEDMESH_TLS_SANS", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// Serve the sidecar-injection webhook (HTTPS, the API's certificate,
    /// path /inject) on this address; needs --inject-template. The
    /// Kubernetes API server calls it for the Pods of namespaces labelled
    /// fedmesh.io/inject=enabled (the chart's MutatingWebhookConfiguration).
    #[arg(long, env = "FEDMESH_INJECT_LISTEN")]
    pub inject_listen: Option<String>,
    /// The sidecar the webhook adds: the `patch.yaml` of the chart's
    /// fedmesh-sidecar-injector ConfigMap (a Deployment patch whose
    /// spec.template.spec has initContainers, containers and volumes).
    #[arg(long, env = "FEDMESH_INJECT_TEMPLATE")]
    pub inject_template: Option<std::path::PathBuf>,
    /// Write a `meshctl` configuration for the first admin here at start
    /// (an operator certificate for `--bootstrap-admin-name` with the admin
    /// role, its key, the CA bundle and the API's URL), mode 0600, as k3s
    /// writes its first kubeconfig.
    #[arg(long, env = "FEDMESH_BOOTSTRAP_ADMIN")]
    pub bootstrap_admin: Option<std::path::PathBuf>,
    /// The operator name of that first admin.
    #[arg(long, env = "FEDMESH_BOOTSTRAP_ADMIN_NAME", default_value = "admin")]
    pub bootstrap_admin_name: String,
    /// The URL written into the bootstrap configuration (default:
    /// https://<listen address>).
    #[arg(long, env = "FEDMESH_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Lifetime of operators' client certificates.
    #[arg(long, env = "FEDMESH_OPERATOR_CERT_TTL", default_value = "12h")]
    pub operator_cert_ttl: String,
    /// Longest lifetime a join or operator token may be given.
    #[arg(long, env = "FEDMESH_MAX_TOKEN_TTL", default_value = "24h")]
    pub max_token_ttl: String,
    /// Most audit entries kept (the oldest go first).
    #[arg(long, env = "FEDMESH_AUDIT_MAX_ENTRIES", default_value_t = 10_000)]
    pub audit_max_entries: usize,
    /// Audit entries older than this go.
    #[arg(long, env = "FEDMESH_AUDIT_MAX_AGE", default_value = "720h")]
    pub audit_max_age: String,
    /// API calls per second per authenticated principal (bursts of twice
    /// that); 0: no limit.
    #[arg(long, env = "FEDMESH_API_RATE", default_value_t = 500)]
    pub api_rate: u32,
    /// Anonymous calls (enrollment) per second per source address; 0: no limit.
    #[arg(long, env = "FEDMESH_ENROLL_RATE", default_value_t = 50)]
    pub enroll_rate: u32,
    /// Unary API calls in flight at once, all callers.
    #[arg(long, env = "FEDMESH_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,
    /// Unary API calls in flight at once per principal.
    #[arg(long, env = "FEDMESH_MAX_IN_FLIGHT_PER_CALLER", default_value_t = 64)]
    pub max_in_flight_per_caller: usize,
    /// Open API connections at most (more wait in the kernel's backlog).
    #[arg(long, env = "FEDMESH_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
}

/// How the API is secured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApiSecurity {
    /// `--insecure-plaintext`: no TLS, every caller an admin (loopback only).
    pub insecure_plaintext: bool,
    /// Extra names on the serving certificate.
    pub tls_sans: Vec<String>,
    /// Where to write the first admin's `meshctl` configuration.
    pub bootstrap_admin: Option<std::path::PathBuf>,
    /// That admin's operator name.
    pub bootstrap_admin_name: String,
    /// The URL written there.
    pub advertise_url: Option<String>,
    /// Operators' certificate lifetime.
    pub operator_cert_ttl: Duration,
    /// Tokens' longest lifetime.
    pub max_token_ttl: Duration,
    /// How much of the audit log is kept.
    pub audit: crate::audit::Retention,
    /// Load each caller and all callers may put on the API.
    pub limits: crate::auth::Limits,
    /// Open API connections at most.
    pub max_connections: usize,
}

impl Default for ApiSecurity {
    fn default() -> Self {
        Self {
            insecure_plaintext: false,
            tls_sans: Vec::new(),
            bootstrap_admin: None,
            bootstrap_admin_name: "admin".into(),
            advertise_url: None,
            operator_cert_ttl: Duration::from_secs(12 * 3600),
            max_token_ttl: Duration::from_secs(24 * 3600),
            audit: crate::audit::Retention::default(),
            limits: crate::auth::Limits::default(),
            max_connections: 4096,
        }
    }
}

/// Where the registry lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum RegistrySpec {
    /// The embedded store, durable in this data directory.
    Embedded(std::path::PathBuf),
    /// The embedded store in this process's memory only (tests).
    Memory,
    /// etcd, at these client endpoints (`http://host:port`).
    Etcd(Vec<String>),
}

/// Everything the federation needs to start. Built only through [`Config::from_args`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Address for the gRPC API.
    pub listen: SocketAddr,
    /// The admin listener, if any.
    pub admin: Option<SocketAddr>,
    /// Registry backend.
    pub registry: RegistrySpec,
    /// Heartbeat TTL. 10 s by default: a cluster heartbeats every TTL/3, so
    /// two lost heartbeats in a row are tolerated before it turns unknown.
    pub heartbeat_ttl: Duration,
    /// A lapsed endpoint is deleted after this.
    pub endpoint_gc_after: Duration,
    /// Replica name.
    pub replica: String,
    /// Leader lease TTL.
    pub leader_ttl: Duration,
    /// Weights recompute interval.
    pub weights_interval: Duration,
    /// Logs as JSON lines.
    pub log_json: bool,
    /// The mesh CA.
    pub ca: crate::ca::CaConfig,
    /// Kubernetes token checking (TokenReview), by cluster.
    pub kube: crate::kube_auth::KubeAuthConfig,
    /// TLS to etcd.
    pub etcd_tls: Option<crate::store::etcd::EtcdTls>,
    /// Kubernetes discovery.
    pub discovery: Option<crate::kube_discovery::DiscoveryConfig>,
    /// Watch policy custom resources in that cluster.
    pub watch_crds: bool,
    /// TLS and who may call.
    pub security: ApiSecurity,
    /// The sidecar-injection webhook, if served.
    pub inject: Option<InjectConfig>,
}

/// `--inject-listen` and `--inject-template`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InjectConfig {
    /// Where the webhook listens.
    pub listen: SocketAddr,
    /// The template's file.
    pub template_path: std::path::PathBuf,
    /// The template, read and checked at start.
    #[serde(skip)]
    pub template: std::sync::Arc<crate::inject::Template>,
}

/// Shortest heartbeat TTL: etcd grants leases of at least about 2 s anyway
/// (1.5 x its election timeout), and shorter would be noise.
const MIN_HEARTBEAT_TTL: Duration = Duration::from_secs(2);

impl Config {
    /// Validates every flag and reports all problems, each naming its flag.
    pub fn from_args(a: &Args) -> Result<Self, Vec<String>> {
        let mut errs = Vec::new();
        let listen = mesh_core::flag::parse_addr("--listen", &a.listen, &mut errs);
        let admin = a
            .admin
            .as_deref()
            .and_then(|s| mesh_core::flag::parse_addr("--admin", s, &mut errs));
        let registry = parse_registry(&a.registry, a.data_dir.as_deref())
            .map_err(|e| errs.push(e))
            .ok();
        let heartbeat_ttl = match mesh_core::duration::parse(&a.heartbeat_ttl) {
            Ok(d) if d < MIN_HEARTBEAT_TTL => {
                errs.push(format!(
                    "invalid --heartbeat-ttl {:?}: must be at least 2s",
                    a.heartbeat_ttl
                ));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                errs.push(format!("invalid --heartbeat-ttl: {e}"));
                None
            }
        };
        let endpoint_gc_after = mesh_core::flag::parse_positive_duration(
            "--endpoint-gc-after",
            &a.endpoint_gc_after,
            &mut errs,
        )
        .unwrap_or(Duration::from_secs(600));
        let log_json = mesh_core::flag::parse_log_format(&a.log_format, &mut errs);
        let weights_interval = mesh_core::flag::parse_positive_duration(
            "--weights-interval",
            &a.weights_interval,
            &mut errs,
        )
        .unwrap_or(crate::weights::DEFAULT_INTERVAL);
        let leader_ttl = match mesh_core::duration::parse(&a.leader_ttl) {
            Ok(d) if d >= MIN_HEARTBEAT_TTL => d,
            Ok(_) => {
                errs.push(format!(
                    "invalid --leader-ttl {:?}: must be at least 2s",
                    a.leader_ttl
                ));
                MIN_HEARTBEAT_TTL
            }
            Err(e) => {
                errs.push(format!("invalid --leader-ttl: {e}"));
                MIN_HEARTBEAT_TTL
            }
        };
        let replica = a
            .replica
            .clone()
            .unwrap_or_else(|| format!("federation-{}", std::process::id()));
        if let Err(e) = mesh_core::name::TrustDomain::new(&a.trust_domain) {
            errs.push(format!("invalid --trust-domain: {e}"));
        }
        let plug_in = match (&a.ca_cert, &a.ca_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                errs.push("--ca-cert and --ca-key go together".into());
                None
            }
        };
        let leaf_ttl = match mesh_core::duration::parse(&a.cert_ttl) {
            Ok(d) if (crate::ca::MIN_LEAF_TTL..=crate::ca::MAX_LEAF_TTL).contains(&d) => d,
            Ok(_) => {
                errs.push(format!(
                    "invalid --cert-ttl {:?}: must be from 1m to 168h (7 days)",
                    a.cert_ttl
                ));
                crate::ca::MIN_LEAF_TTL
            }
            Err(e) => {
                errs.push(format!("invalid --cert-ttl: {e}"));
                crate::ca::MIN_LEAF_TTL
            }
        };
        let intermediate_ttl = match mesh_core::duration::parse(&a.intermediate_ttl) {
            Ok(d) if d >= leaf_ttl * 3 && d <= crate::ca::MAX_INTERMEDIATE_TTL => d,
            Ok(_) => {
                errs.push(format!(
                    "invalid --intermediate-ttl {:?}: must be from 3 times --cert-ttl ({}) to 87600h (10 years)",
                    a.intermediate_ttl,
                    short_duration(leaf_ttl * 3)
                ));
                crate::ca::MAX_INTERMEDIATE_TTL
            }
            Err(e) => {
                errs.push(format!("invalid --intermediate-ttl: {e}"));
                crate::ca::MAX_INTERMEDIATE_TTL
            }
        };
        let kube = parse_kube(&a.kube_cluster, &a.kube_token_audience, &mut errs);
        let etcd_tls = parse_etcd_tls(a, registry.as_ref(), &mut errs);
        let discovery = parse_discovery(a, &mut errs);
        if a.watch_crds && a.kube_discovery.is_none() {
            errs.push("--watch-crds needs --kube-discovery CLUSTER (the cluster whose resources are watched)".into());
        }
        let security = parse_security(a, listen, &mut errs);
        // The embedded registry keeps its CA sealed with a key of its own in
        // the data directory, unless one is given (with a plug-in root too:
        // its cluster intermediates are sealed).
        let own_key = match (&registry, &a.ca_key_file) {
            (Some(RegistrySpec::Embedded(dir)), None) => Some(dir.join(crate::ca::SEAL_KEY_FILE)),
            _ => None,
        };
        let ca = crate::ca::CaConfig {
            trust_domain: a.trust_domain.clone(),
            make_key_file: own_key.is_some(),
            key_file: own_key.or_else(|| a.ca_key_file.clone()),
            plug_in,
            leaf_ttl,
            intermediate_ttl,
        };
        let inject = parse_inject(a, &mut errs);
        match (listen, registry, heartbeat_ttl) {
            (Some(listen), Some(registry), Some(heartbeat_ttl)) if errs.is_empty() => Ok(Self {
                listen,
                admin,
                registry,
                heartbeat_ttl,
                endpoint_gc_after,
                replica,
                leader_ttl,
                weights_interval,
                log_json,
                ca,
                kube,
                etcd_tls,
                discovery,
                watch_crds: a.watch_crds,
                security,
                inject,
            }),
            _ => Err(errs),
        }
    }
}

impl Config {
    /// The defaults on `listen` with the registry in memory (tests,
    /// benchmarks); the values `fedmesh-federation --listen ADDR --registry
    /// memory` gets.
    pub fn embedded(listen: SocketAddr) -> Self {
        Self {
            listen,
            admin: None,
            registry: RegistrySpec::Memory,
            heartbeat_ttl: std::time::Duration::from_secs(10),
            endpoint_gc_after: std::time::Duration::from_secs(600),
            replica: format!("federation-{}", std::process::id()),
            leader_ttl: crate::leader::DEFAULT_TTL,
            weights_interval: crate::weights::DEFAULT_INTERVAL,
            log_json: false,
            ca: crate::ca::CaConfig {
                trust_domain: "cluster.local".into(),
                leaf_ttl: std::time::Duration::from_secs(24 * 3600),
                ..Default::default()
            },
            kube: crate::kube_auth::KubeAuthConfig::default(),
            etcd_tls: None,
            discovery: None,
            watch_crds: false,
            security: ApiSecurity::default(),
            inject: None,
        }
    }

    /// [`Config::embedded`] with `--insecure-plaintext`: no TLS, every
    /// caller an admin (loopback only).
    pub fn embedded_insecure(listen: SocketAddr) -> Self {
        let mut c = Self::embedded(listen);
        c.security.insecure_plaintext = true;
        c
    }
}

/// `d` as hours, minutes or seconds, whichever is exact.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// `n`, or 1 with an error naming `flag` when it is 0.
fn positive(flag: &str, n: usize, errs: &mut Vec<String>) -> usize {
    if n == 0 {
        errs.push(format!("invalid {flag} 0: at least 1"));
        1
    } else {
        n
    }
}

/// `--inject-listen` with `--inject-template`, both or neither.
fn parse_inject(a: &Args, errs: &mut Vec<String>) -> Option<InjectConfig> {
    match (&a.inject_listen, &a.inject_template) {
        (None, None) => None,
        (Some(_), None) => {
            errs.push("--inject-listen needs --inject-template (the sidecar to add)".into());
            None
        }
        (None, Some(_)) => {
            errs.push("--inject-template needs --inject-listen (where the webhook listens)".into());
            None
        }
        (Some(listen), Some(path)) => {
            if a.insecure_plaintext {
                errs.push(
                    "--inject-listen needs TLS: it cannot go with --insecure-plaintext".into(),
                );
            }
            let listen = mesh_core::flag::parse_addr("--inject-listen", listen, errs);
            let template = crate::inject::Template::load(path)
                .map_err(|e| errs.push(format!("invalid {e:#}")))
                .ok();
            Some(InjectConfig {
                listen: listen?,
                template_path: path.clone(),
                template: std::sync::Arc::new(template?),
            })
        }
    }
}

/// `--insecure-plaintext`, `--tls-san`, `--bootstrap-admin*`, the TTLs, the limits.
fn parse_security(a: &Args, listen: Option<SocketAddr>, errs: &mut Vec<String>) -> ApiSecurity {
    let d = ApiSecurity::default();
    if a.insecure_plaintext {
        if let Some(l) = listen {
            if let Err(e) = crate::tls::check_plaintext_listen(l) {
                errs.push(e);
            }
        }
        if a.bootstrap_admin.is_some() {
            errs.push("--bootstrap-admin needs TLS: it cannot go with --insecure-plaintext".into());
        }
    }
    if let Err(e) = crate::tls::subject_alt_names(&a.tls_san) {
        errs.push(e);
    }
    if let Err(e) = crate::auth::check_operator_name(&a.bootstrap_admin_name) {
        errs.push(format!("invalid --bootstrap-admin-name: {e}"));
    }
    if let Some(u) = &a.advertise_url {
        if !u.starts_with("https://") {
            errs.push(format!(
                "invalid --advertise-url {u:?}: expected https://HOST:PORT"
            ));
        }
    }
    let ttl = |flag: &str, v: &str, min: Duration, errs: &mut Vec<String>| {
        match mesh_core::duration::parse(v) {
            Ok(t) if t >= min => Some(t),
            Ok(_) => {
                errs.push(format!(
                    "invalid {flag} {v:?}: must be at least {}s",
                    min.as_secs()
                ));
                None
            }
            Err(e) => {
                errs.push(format!("invalid {flag}: {e}"));
                None
            }
        }
    };
    ApiSecurity {
        insecure_plaintext: a.insecure_plaintext,
        tls_sans: a.tls_san.clone(),
        bootstrap_admin: a.bootstrap_admin.clone(),
        bootstrap_admin_name: a.bootstrap_admin_name.clone(),
        advertise_url: a.advertise_url.clone(),
        operator_cert_ttl: ttl(
            "--operator-cert-ttl",
            &a.operator_cert_ttl,
            crate::ca::MIN_LEAF_TTL,
            errs,
        )
        .unwrap_or(d.operator_cert_ttl),
        max_token_ttl: ttl(
            "--max-token-ttl",
            &a.max_token_ttl,
            Duration::from_secs(1),
            errs,
        )
        .unwrap_or(d.max_token_ttl),
        audit: crate::audit::Retention {
            max_entries: if a.audit_max_entries == 0 {
                errs.push("invalid --audit-max-entries 0: keep at least one entry".into());
                d.audit.max_entries
            } else {
                a.audit_max_entries
            },
            max_age: ttl(
                "--audit-max-age",
                &a.audit_max_age,
                Duration::from_secs(60),
                errs,
            )
            .unwrap_or(d.audit.max_age),
        },
        limits: crate::auth::Limits {
            rate_per_principal: a.api_rate,
            anonymous_rate_per_address: a.enroll_rate,
            in_flight: positive("--max-in-flight", a.max_in_flight, errs),
            in_flight_per_principal: positive(
                "--max-in-flight-per-caller",
                a.max_in_flight_per_caller,
                errs,
            ),
        },
        max_connections: positive("--max-connections", a.max_connections, errs),
    }
}

/// `--kube-discovery CLUSTER[=KUBECONFIG]`, `--export-label`,
/// `--gateway-service NAMESPACE/NAME`.
fn parse_discovery(
    a: &Args,
    errs: &mut Vec<String>,
) -> Option<crate::kube_discovery::DiscoveryConfig> {
    let v = a.kube_discovery.as_deref()?;
    let before = errs.len();
    let (name, kubeconfig) = match v.split_once('=') {
        Some((n, p)) => (n, Some(std::path::PathBuf::from(p))),
        None => (v, None),
    };
    let cluster = mesh_core::name::ClusterName::new(name)
        .map_err(|e| errs.push(format!("invalid --kube-discovery {v:?}: {e}")))
        .ok();
    if let Some(p) = &kubeconfig {
        if p.as_os_str().is_empty() {
            errs.push(format!(
                "invalid --kube-discovery {v:?}: empty kubeconfig path (give CLUSTER alone for the in-cluster configuration)"
            ));
        } else if let Err(e) = std::fs::metadata(p) {
            errs.push(format!(
                "invalid --kube-discovery {v:?}: cannot read the kubeconfig: {e}"
            ));
        }
    }
    let label_ok = !a.export_label.is_empty()
        && a.export_label.len() <= 253
        && a.export_label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
    if !label_ok {
        errs.push(format!(
            "invalid --export-label {:?}: expected a Kubernetes label key such as fedmesh.io/export",
            a.export_label
        ));
    }
    let gateway_service = match a.gateway_service.split_once('/') {
        Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {
            (ns.to_string(), n.to_string())
        }
        _ => {
            errs.push(format!(
                "invalid --gateway-service {:?}: expected NAMESPACE/NAME",
                a.gateway_service
            ));
            (String::new(), String::new())
        }
    };
    if errs.len() > before {
        return None;
    }
    Some(crate::kube_discovery::DiscoveryConfig {
        cluster: cluster?,
        kubeconfig,
        export_label: a.export_label.clone(),
        gateway_service,
    })
}

/// `--etcd-ca`, `--etcd-cert`, `--etcd-key`: all readable PEM, the pair
/// together, the CA with them, and only with an etcd registry.
fn parse_etcd_tls(
    a: &Args,
    registry: Option<&RegistrySpec>,
    errs: &mut Vec<String>,
) -> Option<crate::store::etcd::EtcdTls> {
    let given = a.etcd_ca.is_some() || a.etcd_cert.is_some() || a.etcd_key.is_some();
    if !given {
        return None;
    }
    let before = errs.len();
    if matches!(
        registry,
        Some(RegistrySpec::Memory | RegistrySpec::Embedded(_))
    ) {
        errs.push("--etcd-ca/--etcd-cert/--etcd-key need --registry etcd://...".into());
    }
    if a.etcd_cert.is_some() != a.etcd_key.is_some() {
        errs.push("--etcd-cert and --etcd-key go together: give both or neither".into());
    }
    if a.etcd_ca.is_none() {
        errs.push(
            "--etcd-cert/--etcd-key need --etcd-ca (the CA etcd's certificate is checked against)"
                .into(),
        );
    }
    for (flag, path, what) in [
        ("--etcd-ca", &a.etcd_ca, "CERTIFICATE"),
        ("--etcd-cert", &a.etcd_cert, "CERTIFICATE"),
        ("--etcd-key", &a.etcd_key, "PRIVATE KEY"),
    ] {
        if let Some(p) = path {
            match std::fs::read_to_string(p) {
                Ok(text) if text.contains("-----BEGIN") && text.contains(what) => {}
                Ok(_) => errs.push(format!(
                    "invalid {flag} {}: not a PEM {}",
                    p.display(),
                    what.to_lowercase()
                )),
                Err(e) => errs.push(format!("invalid {flag} {}: {e}", p.display())),
            }
        }
    }
    if errs.len() > before {
        return None;
    }
    Some(crate::store::etcd::EtcdTls {
        ca: a.etcd_ca.clone()?,
        cert: a.etcd_cert.clone(),
        key: a.etcd_key.clone(),
    })
}

/// `--kube-cluster NAME[=KUBECONFIG]` (each name once, each kubeconfig
/// readable) and `--kube-token-audience`.
fn parse_kube(
    clusters: &[String],
    audience: &str,
    errs: &mut Vec<String>,
) -> crate::kube_auth::KubeAuthConfig {
    let mut kube = crate::kube_auth::KubeAuthConfig {
        audience: audience.to_string(),
        ..Default::default()
    };
    if audience.is_empty() || audience.chars().any(char::is_whitespace) {
        errs.push(format!(
            "invalid --kube-token-audience {audience:?}: must be non-empty, without spaces"
        ));
    }
    for v in clusters {
        let (name, path) = match v.split_once('=') {
            Some((n, p)) => (n, Some(p)),
            None => (v.as_str(), None),
        };
        let name = match mesh_core::name::ClusterName::new(name) {
            Ok(n) => n,
            Err(e) => {
                errs.push(format!("invalid --kube-cluster {v:?}: {e}"));
                continue;
            }
        };
        let path = match path {
            None => None,
            Some("") => {
                errs.push(format!(
                    "invalid --kube-cluster {v:?}: empty kubeconfig path (give NAME alone for the inferred configuration)"
                ));
                continue;
            }
            Some(p) => {
                let p = std::path::PathBuf::from(p);
                if let Err(e) = kube::config::Kubeconfig::read_from(&p) {
                    errs.push(format!(
                        "invalid --kube-cluster {v:?}: cannot read the kubeconfig: {e}"
                    ));
                    continue;
                }
                Some(p)
            }
        };
        if kube.clusters.insert(name.clone(), path).is_some() {
            errs.push(format!(
                "invalid --kube-cluster: cluster {name} is given twice"
            ));
        }
    }
    kube
}

/// The embedded registry's directory when `--data-dir` is not given.
pub fn default_data_dir() -> Option<std::path::PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("STATE_DIRECTORY") {
        // systemd's StateDirectory= (the first, if several).
        let first = d.to_string_lossy().split(':').next().map(String::from)?;
        return Some(first.into());
    }
    if is_root() {
        return Some("/var/lib/fedmesh".into());
    }
    if let Some(d) = env("XDG_STATE_HOME") {
        return Some(std::path::PathBuf::from(d).join("fedmesh"));
    }
    env("HOME").map(|h| std::path::PathBuf::from(h).join(".local/state/fedmesh"))
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // Our own /proc entry is owned by our effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn parse_registry(s: &str, data_dir: Option<&std::path::Path>) -> Result<RegistrySpec, String> {
    if s == "embedded" {
        return match data_dir
            .map(std::path::Path::to_path_buf)
            .or_else(default_data_dir)
        {
            Some(d) if d.as_os_str().is_empty() => Err("invalid --data-dir \"\": empty".into()),
            Some(d) => Ok(RegistrySpec::Embedded(d)),
            None => Err("--registry embedded needs --data-dir (no $HOME to default to)".into()),
        };
    }
    if data_dir.is_some() {
        return Err(format!("--data-dir is for --registry embedded, not {s:?}"));
    }
    if s == "memory" {
        return Ok(RegistrySpec::Memory);
    }
    let Some(rest) = s.strip_prefix("etcd://") else {
        return Err(format!(
            "invalid --registry {s:?}: expected embedded, memory or etcd://HOST:PORT[,HOST:PORT]"
        ));
    };
    let mut eps = Vec::new();
    for hp in rest.split(',') {
        let ok = hp.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !ok {
            return Err(format!("invalid --registry {s:?}: {hp:?} is not HOST:PORT"));
        }
        eps.push(format!("http://{hp}"));
    }
    Ok(RegistrySpec::Etcd(eps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Config, Vec<String>> {
        let mut v = vec!["fedmesh-federation"];
        v.extend_from_slice(args);
        Config::from_args(&Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn embedded_matches_the_flag_defaults() {
        let flags = load(&["--listen", "127.0.0.1:0", "--registry", "memory"]).unwrap();
        let embedded = Config::embedded("127.0.0.1:0".parse().unwrap());
        assert_eq!(
            serde_json::to_value(&flags).unwrap()["heartbeat_ttl"],
            serde_json::to_value(&embedded).unwrap()["heartbeat_ttl"]
        );
        assert_eq!(
            (flags.registry, flags.listen),
            (embedded.registry, embedded.listen)
        );
    }

    #[test]
    fn registry_forms() {
        assert_eq!(
            load(&["--data-dir", "/srv/fm"]).unwrap().registry,
            RegistrySpec::Embedded("/srv/fm".into()),
            "the default is the durable embedded registry"
        );
        assert_eq!(
            load(&["--registry", "memory"]).unwrap().registry,
            RegistrySpec::Memory
        );
        assert_eq!(
            load(&["--registry", "memory", "--data-dir", "/srv/fm"]).unwrap_err(),
            ["--data-dir is for --registry embedded, not \"memory\""]
        );
        assert_eq!(
            load(&["--registry", "etcd://127.0.0.1:2379,[::1]:2379"])
                .unwrap()
                .registry,
            RegistrySpec::Etcd(vec![
                "http://127.0.0.1:2379".into(),
                "http://[::1]:2379".into()
            ])
        );
    }

    #[test]
    fn every_error_is_reported_with_its_flag() {
        let errs = load(&[
            "--listen",
            "nowhere",
            "--registry",
            "etcd://host",
            "--heartbeat-ttl",
            "1s",
            "--log-format",
            "xml",
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].starts_with("invalid --listen \"nowhere\""));
        assert!(errs[1].contains("\"host\" is not HOST:PORT"));
        assert!(errs[2].contains("--heartbeat-ttl \"1s\": must be at least 2s"));
        assert!(errs[3].contains("--log-format \"xml\""));
        let errs = load(&["--cert-ttl", "24h", "--intermediate-ttl", "48h"]).unwrap_err();
        assert_eq!(
            errs,
            ["invalid --intermediate-ttl \"48h\": must be from 3 times --cert-ttl (72h) to 87600h (10 years)"]
        );
        assert!(load(&["--cert-ttl", "1h", "--intermediate-ttl", "3h"]).is_ok());
        for ttl in ["30s", "169h", "8760h"] {
            let errs = load(&["--cert-ttl", ttl]).unwrap_err();
            assert!(
                errs[0].contains("must be from 1m to 168h (7 days)"),
                "{ttl}: {errs:?}"
            );
        }
        assert!(load(&["--cert-ttl", "168h"]).is_ok());
        let errs = load(&["--registry", "redis://x:1", "--heartbeat-ttl", "soon"]).unwrap_err();
        assert!(errs[0].contains("expected embedded, memory or etcd://"));
        assert!(errs[1].contains("invalid duration \"soon\""));
    }

    #[test]
    fn kube_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("c2.kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: https://127.0.0.1:6443\n",
        )
        .unwrap();
        let kc_arg = format!("c2={}", kc.display());
        let cfg = load(&["--kube-cluster", "c1", "--kube-cluster", &kc_arg]).unwrap();
        assert_eq!(
            serde_json::to_value(&cfg).unwrap()["kube"]["clusters"]["c1"],
            serde_json::Value::Null
        );
        assert_eq!(cfg.kube.audience, "fedmesh");
        assert_eq!(
            cfg.kube.clusters.into_iter().collect::<Vec<_>>(),
            vec![
                (mesh_core::name::ClusterName::new("c1").unwrap(), None),
                (mesh_core::name::ClusterName::new("c2").unwrap(), Some(kc)),
            ]
        );
        assert!(load(&[]).unwrap().kube.clusters.is_empty());
        let cfg = load(&["--kube-token-audience", "mesh.example.com"]).unwrap();
        assert_eq!(cfg.kube.audience, "mesh.example.com");

        let missing = dir.path().join("nope");
        let missing_arg = format!("c3={}", missing.display());
        let errs = load(&[
            "--kube-cluster",
            "Bad_Name",
            "--kube-cluster",
            &missing_arg,
            "--kube-cluster",
            "c1",
            "--kube-cluster",
            "c1=",
            "--kube-cluster",
            "c1",
            "--kube-token-audience",
            "",
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(
            errs[0].contains("invalid --kube-token-audience \"\""),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("invalid --kube-cluster \"Bad_Name\": invalid cluster name"),
            "{errs:?}"
        );
        assert!(
            errs[2].contains(&format!(
                "invalid --kube-cluster {missing_arg:?}: cannot read the kubeconfig"
            )),
            "{errs:?}"
        );
        assert!(errs[3].contains("empty kubeconfig path"), "{errs:?}");
        assert!(errs[4].contains("cluster c1 is given twice"), "{errs:?}");
    }

    #[test]
    fn etcd_tls_needs_an_etcd_registry() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let errs = load(&["--etcd-ca", ca.to_str().unwrap()]).unwrap_err();
        assert_eq!(
            errs,
            ["--etcd-ca/--etcd-cert/--etcd-key need --registry etcd://..."]
        );
        let ok = load(&[
            "--registry",
            "etcd://127.0.0.1:2379",
            "--etcd-ca",
            ca.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(ok.etcd_tls.unwrap().ca, ca);
    }
}
