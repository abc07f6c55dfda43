//! Configuration of `fedmesh-gateway`: flags (or `FEDMESH_*` variables)
//! parsed into a typed [`Config`], or every problem at once.

use clap::Parser;
use mesh_core::flag::{check_url, parse_addr, parse_log_format};
use mesh_core::name::ClusterName;
use std::net::SocketAddr;

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
    /// Federation API URL.
    #[arg(
        long,
        env = "FEDMESH_FEDERATION",
        default_value = "http://127.0.0.1:15010"
    )]
    pub federation: String,
    /// Address for /metrics, /healthz and /ready.
    #[arg(long, env = "FEDMESH_ADMIN")]
    pub admin: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FEDMESH_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// Everything the gateway needs to start.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// The cluster served.
    pub cluster: ClusterName,
    /// TLS listener address.
    pub listen: SocketAddr,
    /// Federation API URL (`http://` or `https://`).
    pub federation: String,
    /// Admin listener address.
    pub admin: Option<SocketAddr>,
    /// Logs as JSON lines.
    pub log_json: bool,
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
            .map(|s| parse_addr("--admin", s, &mut errs));
        let federation = check_url(&a.federation).map_err(|e| errs.push(e)).ok();
        let log_json = parse_log_format(&a.log_format, &mut errs);
        match (cluster, listen, federation) {
            (Some(cluster), Some(listen), Some(federation)) if errs.is_empty() => Ok(Self {
                cluster,
                listen,
                federation,
                admin: admin.flatten(),
                log_json,
            }),
            _ => Err(errs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_errors_named() {
        let a = Args::try_parse_from([
            "g",
            "--cluster",
            "C_1",
            "--listen",
            "x",
            "--federation",
            "ftp://a",
            "--admin",
            "1.2.3.4",
        ])
        .unwrap();
        let errs = Config::from_args(&a).unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].starts_with("invalid --cluster: invalid cluster name \"C_1\""));
        assert!(errs[1].starts_with("invalid --listen \"x\""));
        assert!(errs[2].starts_with("invalid --admin \"1.2.3.4\""));
        assert!(errs[3].starts_with("invalid --federation \"ftp://a\""));
    }
}
