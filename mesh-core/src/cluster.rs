//! Clusters: what a cluster tells the federation about itself.

use crate::locality::Locality;
use crate::name::{check_dns_name, ClusterName, InvalidName, Network, TrustDomain};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Everything the mesh knows about a cluster.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterInfo {
    /// Cluster name, unique in the mesh.
    pub name: ClusterName,
    /// Region and zone of the cluster.
    pub locality: Locality,
    /// Network of the cluster's pods.
    pub network: Network,
    /// Addresses of the cluster's east-west gateways.
    #[serde(default)]
    pub gateways: Vec<GatewayAddress>,
    /// SPIFFE trust domain of the cluster's workloads.
    pub trust_domain: TrustDomain,
}

/// Host of a gateway address: an IP address or a DNS name (resolved by the gateway's peers).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayHost {
    /// A literal IP address.
    Ip(IpAddr),
    /// A DNS name.
    Dns(String),
}

/// A gateway address, `host:port` (IPv6 in brackets).
///
/// ```
/// use mesh_core::cluster::GatewayAddress;
/// let a: GatewayAddress = "gw.us-east.example.com:15443".parse().unwrap();
/// assert_eq!(a.port, 15443);
/// let b: GatewayAddress = "[::1]:15443".parse().unwrap();
/// assert_eq!(b.to_string(), "[::1]:15443");
/// assert!("gw:0".parse::<GatewayAddress>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayAddress {
    /// Where the gateway is.
    pub host: GatewayHost,
    /// Its TLS port.
    pub port: u16,
}

impl std::str::FromStr for GatewayAddress {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        const KIND: &str = "gateway address";
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(InvalidName::new(KIND, s, "port must be 1 to 65535"));
            }
            return Ok(Self {
                host: GatewayHost::Ip(sa.ip()),
                port: sa.port(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| InvalidName::new(KIND, s, "expected host:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| InvalidName::new(KIND, s, "port must be 1 to 65535"))?;
        check_dns_name(host).map_err(|r| InvalidName::new(KIND, s, r))?;
        Ok(Self {
            host: GatewayHost::Dns(host.to_string()),
            port,
        })
    }
}

impl TryFrom<String> for GatewayAddress {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, InvalidName> {
        s.parse()
    }
}

impl From<GatewayAddress> for String {
    fn from(a: GatewayAddress) -> String {
        a.to_string()
    }
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            GatewayHost::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            GatewayHost::Dns(h) => write!(f, "{h}:{}", self.port),
        }
    }
}
