//! Configuration of `fedmesh-agent`: flags (or `FEDMESH_*` variables)
//! parsed into a typed [`Config`], or every problem at once.

use clap::Parser;
use mesh_core::flag::{check_url, parse_addr, parse_log_format};
use mesh_core::locality::Locality;
use mesh_core::name::{ClusterName, Namespace, Region, ServiceName, Zone};
use mesh_core::service::ServiceKey;
use std::net::SocketAddr;

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
    /// Address of the local application.
    #[arg(long, env = "FEDMESH_APP")]
    pub app: String,
    /// Federation API URL.
    #[arg(
        long,
        env = "FEDMESH_FEDERATION",
        default_value = "http://127.0.0.1:15010"
    )]
    pub federation: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FEDMESH_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
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
    /// Federation API URL.
    pub federation: String,
    /// Logs as JSON lines.
    pub log_json: bool,
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
        let app = parse_addr("--app", &a.app, &mut errs);
        let federation = check_url(&a.federation).map_err(|e| errs.push(e)).ok();
        let log_json = parse_log_format(&a.log_format, &mut errs);
        match (cluster, region, zone, namespace, service, app, federation) {
            (
                Some(cluster),
                Some(region),
                Some(zone),
                Some(ns),
                Some(svc),
                Some(app),
                Some(federation),
            ) if errs.is_empty() => Ok(Self {
                cluster,
                locality: Locality { region, zone },
                service: ServiceKey::new(ns, svc),
                app,
                federation,
                log_json,
            }),
            _ => Err(errs),
        }
    }
}
