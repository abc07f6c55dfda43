//! IP networks (`10.0.0.0/8`): the sources a gateway takes PROXY headers
//! from, the networks a cluster's endpoints may have addresses in.

use std::net::IpAddr;

/// An IP network, `ADDR/PREFIX`: the addresses whose first `PREFIX` bits
/// are `ADDR`'s. Parsed from `10.0.0.0/8`, `2001:db8::/32`, or a bare IP (a
/// network of one address); host bits must be zero.
///
/// ```
/// use mesh_core::cidr::Cidr;
/// let net: Cidr = "10.0.0.0/8".parse().unwrap();
/// assert!(net.contains([10, 1, 2, 3].into()));
/// assert!(!net.contains([11, 0, 0, 1].into()));
/// // An IPv4-mapped IPv6 peer (a dual-stack listener's) is its IPv4 address.
/// assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
/// // And an IPv4-mapped network is its IPv4 network.
/// let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
/// assert_eq!(mapped.to_string(), "10.0.0.0/8");
/// assert!(mapped.contains([10, 9, 9, 9].into()));
/// assert_eq!("198.18.1.2".parse::<Cidr>().unwrap().to_string(), "198.18.1.2/32");
/// assert!("10.1.0.0/8".parse::<Cidr>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network `addr/prefix`; refused if the prefix is longer than the
    /// address or `addr` has bits set past it. An IPv4-mapped IPv6 network
    /// (`::ffff:10.0.0.0/104`) is the IPv4 network it maps, as its
    /// addresses are in [`Cidr::contains`].
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), 96..=128) = (v6.to_ipv4_mapped(), prefix) {
                return Self::new(IpAddr::V4(v4), prefix - 96);
            }
        }
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(format!(
                "prefix length {prefix} is over {bits}, the length of the address"
            ));
        }
        let net = Self { addr, prefix };
        let base = net.base();
        if base != addr {
            return Err(format!(
                "{addr} has bits set past the prefix (did you mean {base}/{prefix}?)"
            ));
        }
        Ok(net)
    }

    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the network. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) counts as the IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }

    /// The address with the bits past the prefix cleared.
    fn base(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from(std::net::Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from(std::net::Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const EXPECTED: &str = "expected a network ADDR/PREFIX (10.0.0.0/8) or an IP address";
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address ({EXPECTED})"))?;
        let prefix = match prefix {
            None if addr.is_ipv4() => 32,
            None => 128,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("prefix length {p:?} is not a number ({EXPECTED})"))?,
        };
        Self::new(addr, prefix)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}
