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
    /// Its endpoints may have loopback or link-local addresses (a mesh on
    /// one machine); refused otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_local_endpoints: bool,
    /// When not empty, its endpoints' addresses must be in one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_networks: Vec<crate::cidr::Cidr>,
}

impl ClusterInfo {
    /// Whether an endpoint of this cluster may have address `ip`: never
    /// unspecified or multicast; loopback and link-local only where the
    /// cluster allows local endpoints; inside its endpoint networks when it
    /// names some. The error says why, naming the cluster.
    pub fn admits(&self, ip: IpAddr) -> Result<(), String> {
        let ip = ip.to_canonical();
        let local = ip.is_loopback()
            || match ip {
                IpAddr::V4(v4) => v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
            };
        let this_network = matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 0);
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || this_network || broadcast {
            return Err(format!("{ip} is not a host's address"));
        }
        if local && !self.allow_local_endpoints {
            return Err(format!(
                "{ip} is a loopback or link-local address, and cluster {} does not allow local endpoints (`meshctl cluster add --allow-local-endpoints`, for a mesh on one machine)",
                self.name
            ));
        }

        if !self.endpoint_networks.is_empty()
            && !self.endpoint_networks.iter().any(|n| n.contains(ip))
        {
            return Err(format!(
                "{ip} is outside cluster {}'s endpoint networks ({})",
                self.name,
                self.endpoint_networks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(())
    }
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
        // Digits only: `u16::from_str` also takes a sign ("+443").
        let port: u16 = Some(port)
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| InvalidName::new(KIND, s, "port must be 1 to 65535"))?;
        // An IP address is never filed as a DNS name (it would come back as
        // an IP from its own text).
        if host.parse::<std::net::IpAddr>().is_ok() {
            return Err(InvalidName::new(
                KIND,
                s,
                "an IPv6 address goes in brackets: [address]:port",
            ));
        }
        check_dns_name(host).map_err(|r| InvalidName::new(KIND, s, r))?;
        Ok(Self {
            host: GatewayHost::Dns(host.to_string()),
            port,
        })
    }
}

/// Every address of a cluster's gateways: the literal ones, and those
/// `resolve` gives for each DNS name (nothing for a name never answered),
/// sorted, without repeats.
pub fn gateway_socket_addrs<'a>(
    gateways: &'a [GatewayAddress],
    resolve: impl Fn(&'a str) -> Option<std::sync::Arc<[IpAddr]>>,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(gateways.len());
    for g in gateways {
        match &g.host {
            GatewayHost::Ip(ip) => out.push(SocketAddr::new(*ip, g.port)),
            GatewayHost::Dns(name) => {
                if let Some(ips) = resolve(name) {
                    out.extend(ips.iter().map(|ip| SocketAddr::new(*ip, g.port)));
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
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

#[cfg(test)]
mod admits_tests {
    use super::*;

    #[test]
    fn every_gateway_address_literal_and_resolved_is_used() {
        let gws: Vec<GatewayAddress> =
            ["gw.b.example:15443", "10.0.0.9:15443", "gw.never.example:1"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        let ips: std::sync::Arc<[IpAddr]> =
            vec!["10.0.0.2".parse().unwrap(), "10.0.0.9".parse().unwrap()].into();
        let got = gateway_socket_addrs(&gws, |n| (n == "gw.b.example").then(|| ips.clone()));
        let want: Vec<SocketAddr> = ["10.0.0.2:15443", "10.0.0.9:15443"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Sorted, the repeated address once, the unanswered name nothing.
        assert_eq!(got, want);
        assert!(gateway_socket_addrs(&gws[2..], |_| None).is_empty());
    }

    #[test]
    fn an_unbracketed_ipv6_address_is_named_as_such() {
        let e = "::1:443".parse::<GatewayAddress>().unwrap_err().to_string();
        assert!(e.contains("an IPv6 address goes in brackets"), "{e}");
    }

    /// Found by the `registry_value` fuzz target: "1.2.3.4:+443" was taken
    /// as a DNS name with port 443, and came back from its own text as an IP.
    #[test]
    fn gateway_addresses_take_digit_ports_and_ips_as_ips() {
        for bad in [
            "1.2.3.4:+443",
            "gw.example:+443",
            "gw.example:-1",
            "gw.example:",
            "[::1]:+443",
        ] {
            assert!(bad.parse::<GatewayAddress>().is_err(), "{bad}");
        }
        for good in ["1.2.3.4:443", "[::1]:15443", "gw.example:15443"] {
            let a: GatewayAddress = good.parse().unwrap();
            assert_eq!(a.to_string(), good);
            assert_eq!(a.to_string().parse::<GatewayAddress>().unwrap(), a);
        }
    }

    fn cluster(allow_local: bool, networks: &[&str]) -> ClusterInfo {
        ClusterInfo {
            name: ClusterName::new("c1").unwrap(),
            locality: Locality {
                region: crate::name::Region::new("r").unwrap(),
                zone: crate::name::Zone::new("z").unwrap(),
            },
            network: Network::new("n").unwrap(),
            gateways: Vec::new(),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            allow_local_endpoints: allow_local,
            endpoint_networks: networks.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn local_addresses_only_where_allowed_and_networks_bound_the_rest() {
        let strict = cluster(false, &[]);
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            let e = strict.admits(ip.parse().unwrap()).unwrap_err();
            assert!(e.contains("does not allow local endpoints"), "{ip}: {e}");
        }
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "::",
            "224.0.0.1",
            "ff02::1",
        ] {
            assert!(strict.admits(ip.parse().unwrap()).is_err(), "{ip}");
            assert!(
                cluster(true, &[]).admits(ip.parse().unwrap()).is_err(),
                "{ip}"
            );
        }
        assert!(strict.admits("10.1.2.3".parse().unwrap()).is_ok());
        assert!(cluster(true, &[])
            .admits("127.0.0.1".parse().unwrap())
            .is_ok());
        let bounded = cluster(false, &["10.8.0.0/16", "2001:db8::/32"]);
        assert!(bounded.admits("10.8.1.2".parse().unwrap()).is_ok());
        assert!(bounded.admits("2001:db8::7".parse().unwrap()).is_ok());
        let e = bounded.admits("10.9.0.1".parse().unwrap()).unwrap_err();
        assert!(
            e.contains("outside cluster c1's endpoint networks (10.8.0.0/16, 2001:db8::/32)"),
            "{e}"
        );
    }
}
