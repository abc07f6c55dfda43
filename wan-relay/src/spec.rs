//! [`LinkSpec`]: a link's name, listen address, target and per-link
//! options, from `NAME=LISTEN->TARGET[,from=IP][,proxy-v2]`.

use std::net::{IpAddr, SocketAddr};

/// Longest link name accepted.
pub const MAX_NAME_LEN: usize = 63;

/// What a link is: its name, where it listens and where it relays to, and
/// how it connects there: from which local address ([`LinkSpec::source`])
/// and whether it first sends a PROXY protocol v2 header
/// ([`LinkSpec::proxy_protocol`]).
///
/// ```
/// let spec: wan_relay::LinkSpec = "eu-to-us=198.18.1.1:15443->198.18.2.10:15443".parse().unwrap();
/// assert_eq!(spec.name(), "eu-to-us");
/// assert_eq!(spec.target().port(), 15443);
/// assert_eq!(spec.source(), None);
/// let spec: wan_relay::LinkSpec =
///     "eu-to-us=198.18.1.1:15443->198.18.2.10:15443,from=198.18.2.1,proxy-v2".parse().unwrap();
/// assert_eq!(spec.source(), Some([198, 18, 2, 1].into()));
/// assert!(spec.proxy_protocol());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    name: String,
    listen: SocketAddr,
    target: SocketAddr,
    source: Option<IpAddr>,
    proxy_protocol: bool,
}

/// Why a link spec was refused; the message quotes the spec and names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid link {spec:?}: {reason}")]
pub struct InvalidSpec {
    /// The refused spec (or name), as given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

impl LinkSpec {
    /// A spec from its parts. The name must be 1 to 63 characters of
    /// `A-Z a-z 0-9 . _ -` (it appears in control API paths).
    pub fn new(name: &str, listen: SocketAddr, target: SocketAddr) -> Result<Self, InvalidSpec> {
        check_name(name).map_err(|reason| InvalidSpec {
            spec: name.to_string(),
            reason,
        })?;
        Ok(Self {
            name: name.to_string(),
            listen,
            target,
            source: None,
            proxy_protocol: false,
        })
    }

    /// The same spec, connecting to the target from `ip` (port chosen by
    /// the system): the target sees `ip` as the peer. It must be a local
    /// address of the target's family; [`Link::bind`](crate::Link::bind)
    /// refuses it otherwise.
    #[must_use]
    pub fn with_source(mut self, ip: IpAddr) -> Self {
        self.source = Some(ip);
        self
    }

    /// The same spec, writing (or not) a PROXY protocol v2 header to the
    /// target at the start of each connection, naming the client and the
    /// address it connected to.
    #[must_use]
    pub fn with_proxy_protocol(mut self, on: bool) -> Self {
        self.proxy_protocol = on;
        self
    }

    /// The local address connections to the target are made from; `None`:
    /// the system's choice.
    pub fn source(&self) -> Option<IpAddr> {
        self.source
    }

    /// Whether each connection to the target starts with a PROXY protocol
    /// v2 header.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// Refuses a source of another family than the target.
    pub(crate) fn check(&self) -> Result<(), InvalidSpec> {
        check_source(self.source, self.target).map_err(|reason| InvalidSpec {
            spec: self.to_string(),
            reason,
        })
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the link listens on (port 0: any free port).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The address each accepted connection is relayed to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }
}

fn check_source(source: Option<IpAddr>, target: SocketAddr) -> Result<(), String> {
    match source {
        Some(ip) if ip.is_ipv4() != target.is_ipv4() => Err(format!(
            "from={ip} is {}, the target {target} is {}: they must be of the same family",
            family(ip),
            family(target.ip())
        )),
        _ => Ok(()),
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty NAME (expected NAME=LISTEN->TARGET)".to_string());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "NAME {name:?} is longer than {MAX_NAME_LEN} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "NAME {name:?} contains {c:?} (allowed: letters, digits, '.', '_', '-')"
        ));
    }
    Ok(())
}

impl std::str::FromStr for LinkSpec {
    type Err = InvalidSpec;

    /// Parses `NAME=LISTEN->TARGET[,from=IP][,proxy-v2]`, both addresses
    /// `IP:PORT` (`[IPv6]:PORT`), the options in any order, each at most once.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| InvalidSpec {
            spec: s.to_string(),
            reason,
        };
        let (name, addrs) = s
            .split_once('=')
            .ok_or_else(|| err("missing '=' (expected NAME=LISTEN->TARGET)".to_string()))?;
        check_name(name).map_err(err)?;
        let (listen, rest) = addrs
            .split_once("->")
            .ok_or_else(|| err("missing '->' (expected NAME=LISTEN->TARGET)".to_string()))?;
        let mut options = rest.split(',');
        let target = options.next().unwrap_or_default();
        let listen: SocketAddr = listen
            .parse()
            .map_err(|e| err(format!("LISTEN {listen:?}: {e} (expected IP:PORT)")))?;
        let target: SocketAddr = target
            .parse()
            .map_err(|e| err(format!("TARGET {target:?}: {e} (expected IP:PORT)")))?;
        if target.port() == 0 {
            return Err(err(format!("TARGET {target}: port 0")));
        }
        let mut source = None;
        let mut proxy_protocol = false;
        for opt in options {
            if let Some(ip) = opt.strip_prefix("from=") {
                if source.is_some() {
                    return Err(err("from= is given twice".to_string()));
                }
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|e| err(format!("from={ip:?}: {e} (expected from=IP)")))?;
                source = Some(ip);
            } else if opt == "proxy-v2" {
                if proxy_protocol {
                    return Err(err("proxy-v2 is given twice".to_string()));
                }
                proxy_protocol = true;
            } else {
                return Err(err(format!(
                    "unknown option {opt:?} (expected from=IP or proxy-v2)"
                )));
            }
        }
        check_source(source, target).map_err(err)?;
        Ok(Self {
            name: name.to_string(),
            listen,
            target,
            source,
            proxy_protocol,
        })
    }
}

impl std::fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}->{}", self.name, self.listen, self.target)?;
        if let Some(ip) = self.source {
            write!(f, ",from={ip}")?;
        }
        if self.proxy_protocol {
            f.write_str(",proxy-v2")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let s: LinkSpec = "eu-to-us=198.18.1.1:15443->198.18.2.10:15443"
            .parse()
            .unwrap();
        assert_eq!(s.name(), "eu-to-us");
        assert_eq!(s.listen(), "198.18.1.1:15443".parse().unwrap());
        assert_eq!(s.target(), "198.18.2.10:15443".parse().unwrap());
        assert_eq!(
            s.to_string(),
            "eu-to-us=198.18.1.1:15443->198.18.2.10:15443"
        );
        let v6: LinkSpec = "a=[::1]:0->[::1]:80".parse().unwrap();
        assert_eq!(v6.listen().port(), 0);
        assert_eq!(s.source(), None);
        assert!(!s.proxy_protocol());
    }

    #[test]
    fn options_parse_and_round_trip() {
        let s: LinkSpec = "eu-to-us=198.18.1.1:15443->198.18.2.10:15443,from=198.18.2.1,proxy-v2"
            .parse()
            .unwrap();
        assert_eq!(s.target(), "198.18.2.10:15443".parse().unwrap());
        assert_eq!(s.source(), Some("198.18.2.1".parse().unwrap()));
        assert!(s.proxy_protocol());
        assert_eq!(
            s.to_string(),
            "eu-to-us=198.18.1.1:15443->198.18.2.10:15443,from=198.18.2.1,proxy-v2"
        );
        // Any order; Display puts from= first.
        let t: LinkSpec = "eu-to-us=198.18.1.1:15443->198.18.2.10:15443,proxy-v2,from=198.18.2.1"
            .parse()
            .unwrap();
        assert_eq!(t, s);
        for text in [
            "a=127.0.0.1:0->127.0.0.1:80,proxy-v2",
            "a=127.0.0.1:0->127.0.0.1:80,from=127.0.0.2",
            "a=[::1]:0->[::1]:80,from=::1,proxy-v2",
        ] {
            let spec: LinkSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
            assert_eq!(spec.to_string().parse::<LinkSpec>().unwrap(), spec);
        }
        let built = LinkSpec::new("a", ([127, 0, 0, 1], 0).into(), ([127, 0, 0, 1], 80).into())
            .unwrap()
            .with_source([127, 0, 0, 2].into())
            .with_proxy_protocol(true);
        assert_eq!(
            built.to_string(),
            "a=127.0.0.1:0->127.0.0.1:80,from=127.0.0.2,proxy-v2"
        );
        assert!(built.check().is_ok());
        let mismatched = built.with_source("::1".parse().unwrap());
        let e = mismatched.check().unwrap_err().to_string();
        assert!(
            e.contains("from=::1 is IPv6, the target 127.0.0.1:80 is IPv4"),
            "{e}"
        );
    }

    #[test]
    fn refusals_name_the_part() {
        for (bad, part) in [
            ("nolink", "missing '='"),
            ("=1.2.3.4:1->1.2.3.4:2", "empty NAME"),
            ("a b=1.2.3.4:1->1.2.3.4:2", "contains ' '"),
            ("a/b=1.2.3.4:1->1.2.3.4:2", "contains '/'"),
            ("a=1.2.3.4:1", "missing '->'"),
            ("a=1.2.3.4->1.2.3.4:2", "LISTEN \"1.2.3.4\""),
            ("a=1.2.3.4:1->host:2", "TARGET \"host:2\""),
            ("a=1.2.3.4:1->1.2.3.4:0", "port 0"),
            (
                "a=1.2.3.4:1->1.2.3.4:2,foo",
                "unknown option \"foo\" (expected from=IP or proxy-v2)",
            ),
            ("a=1.2.3.4:1->1.2.3.4:2,", "unknown option \"\""),
            (
                "a=1.2.3.4:1->1.2.3.4:2,proxy-v1",
                "unknown option \"proxy-v1\"",
            ),
            ("a=1.2.3.4:1->1.2.3.4:2,from=host", "from=\"host\""),
            (
                "a=1.2.3.4:1->1.2.3.4:2,from=1.2.3.4:5",
                "from=\"1.2.3.4:5\"",
            ),
            ("a=1.2.3.4:1->1.2.3.4:2,from=", "from=\"\""),
            (
                "a=1.2.3.4:1->1.2.3.4:2,from=1.1.1.1,from=2.2.2.2",
                "from= is given twice",
            ),
            (
                "a=1.2.3.4:1->1.2.3.4:2,proxy-v2,proxy-v2",
                "proxy-v2 is given twice",
            ),
            (
                "a=1.2.3.4:1->1.2.3.4:2,from=::1",
                "from=::1 is IPv6, the target 1.2.3.4:2 is IPv4",
            ),
            (
                "a=[::1]:1->[::1]:2,from=127.0.0.1",
                "from=127.0.0.1 is IPv4, the target [::1]:2 is IPv6",
            ),
        ] {
            let e = bad.parse::<LinkSpec>().unwrap_err().to_string();
            assert!(e.contains(part), "{bad}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(LinkSpec::new(&"x".repeat(64), ([0; 4], 0).into(), ([0; 4], 1).into()).is_err());
    }
}
