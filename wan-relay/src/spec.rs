//! [`LinkSpec`]: a link's name, listen address and target, from
//! `NAME=LISTEN->TARGET`.

use std::net::SocketAddr;

/// Longest link name accepted.
pub const MAX_NAME_LEN: usize = 63;

/// What a link is: its name, where it listens and where it relays to.
///
/// ```
/// let spec: wan_relay::LinkSpec = "eu-to-us=198.18.1.1:15443->198.18.2.10:15443".parse().unwrap();
/// assert_eq!(spec.name(), "eu-to-us");
/// assert_eq!(spec.target().port(), 15443);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    name: String,
    listen: SocketAddr,
    target: SocketAddr,
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

    /// Parses `NAME=LISTEN->TARGET`, both addresses `IP:PORT` (`[IPv6]:PORT`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| InvalidSpec {
            spec: s.to_string(),
            reason,
        };
        let (name, addrs) = s
            .split_once('=')
            .ok_or_else(|| err("missing '=' (expected NAME=LISTEN->TARGET)".to_string()))?;
        check_name(name).map_err(err)?;
        let (listen, target) = addrs
            .split_once("->")
            .ok_or_else(|| err("missing '->' (expected NAME=LISTEN->TARGET)".to_string()))?;
        let listen: SocketAddr = listen
            .parse()
            .map_err(|e| err(format!("LISTEN {listen:?}: {e} (expected IP:PORT)")))?;
        let target: SocketAddr = target
            .parse()
            .map_err(|e| err(format!("TARGET {target:?}: {e} (expected IP:PORT)")))?;
        if target.port() == 0 {
            return Err(err(format!("TARGET {target}: port 0")));
        }
        Ok(Self {
            name: name.to_string(),
            listen,
            target,
        })
    }
}

impl std::fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}->{}", self.name, self.listen, self.target)
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
        ] {
            let e = bad.parse::<LinkSpec>().unwrap_err().to_string();
            assert!(e.contains(part), "{bad}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(LinkSpec::new(&"x".repeat(64), ([0; 4], 0).into(), ([0; 4], 1).into()).is_err());
    }
}
