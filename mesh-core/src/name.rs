//! Validated names: every name that crosses a crate boundary is one of these
//! newtypes, so a bad value is refused once, at the edge, with a message that
//! says what kind of name it was and why it is wrong.

use std::fmt;
use std::sync::Arc;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
#[non_exhaustive]
pub struct InvalidName {
    /// What the name was meant to be, e.g. `"cluster name"`.
    pub kind: &'static str,
    /// The refused value (truncated to 80 characters).
    pub value: String,
    /// Why it was refused.
    pub reason: &'static str,
}

impl InvalidName {
    pub(crate) fn new(kind: &'static str, value: &str, reason: &'static str) -> Self {
        let value = value.chars().take(80).collect();
        Self {
            kind,
            value,
            reason,
        }
    }
}

/// Longest DNS label (RFC 1035 section 2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest DNS name in text form without the trailing dot (RFC 1035: 255 octets on the wire).
pub const MAX_DNS_NAME_LEN: usize = 253;

/// Checks an RFC 1123 label as Kubernetes uses it: 1 to 63 characters of
/// lowercase ASCII letters, digits and `-`, starting and ending with a letter or digit.
pub fn check_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > MAX_LABEL_LEN {
        return Err("must be at most 63 characters (RFC 1123 label)");
    }
    let b = s.as_bytes();
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err("must contain only lowercase letters, digits and '-' (RFC 1123 label)");
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Err("must start and end with a letter or digit (RFC 1123 label)");
    }
    Ok(())
}

/// Checks a DNS name: dot-separated RFC 1123 labels, at most 253 characters.
pub fn check_dns_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > MAX_DNS_NAME_LEN {
        return Err("must be at most 253 characters (DNS name)");
    }
    for label in s.split('.') {
        check_label(label)?;
    }
    Ok(())
}

macro_rules! label_name {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl AsRef<str>) -> Result<Self, InvalidName> {
                let s = s.as_ref();
                $check(s).map_err(|reason| InvalidName::new($kind, s, reason))?;
                Ok(Self(Arc::from(s)))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.to_string()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    };
}

label_name!(
    /// Name of a cluster, unique in the mesh (RFC 1123 label).
    ClusterName,
    "cluster name",
    check_label
);
label_name!(
    /// A region, e.g. `us-east` (RFC 1123 label).
    Region,
    "region",
    check_label
);
label_name!(
    /// A zone within a region, e.g. `us-east-1a` (RFC 1123 label).
    Zone,
    "zone",
    check_label
);
label_name!(
    /// A Kubernetes namespace (RFC 1123 label).
    Namespace,
    "namespace",
    check_label
);
label_name!(
    /// A service name (RFC 1123 label).
    ServiceName,
    "service name",
    check_label
);
label_name!(
    /// A named subset of a service's endpoints (RFC 1123 label), as in a DestinationRule.
    SubsetName,
    "subset name",
    check_label
);
label_name!(
    /// A network: clusters on the same network reach each other's endpoints directly.
    Network,
    "network",
    check_label
);
label_name!(
    /// A SPIFFE trust domain, e.g. `cluster.local` (DNS name).
    TrustDomain,
    "trust domain",
    check_dns_name
);
label_name!(
    /// A Kubernetes ServiceAccount name (DNS name): the workload part of a SPIFFE identity.
    ServiceAccount,
    "service account",
    check_dns_name
);
label_name!(
    /// Identifier of an endpoint within its service and cluster, e.g. a pod name (DNS name).
    EndpointId,
    "endpoint id",
    check_dns_name
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(ClusterName::new("us-east-1").is_ok());
        assert!(ClusterName::new("a").is_ok());
        assert!(ClusterName::new("a".repeat(63)).is_ok());
        let e = ClusterName::new("a".repeat(64)).unwrap_err();
        assert!(e.to_string().contains("at most 63"), "{e}");
        let e = ClusterName::new("US-East").unwrap_err();
        assert_eq!(e.kind, "cluster name");
        assert!(e.to_string().contains("lowercase"), "{e}");
        assert!(ClusterName::new("-a").is_err());
        assert!(ClusterName::new("a-").is_err());
        assert!(ClusterName::new("").is_err());
        assert!(ClusterName::new("a.b").is_err());
        assert!(Region::new("é").is_err());
    }

    #[test]
    fn dns_names() {
        assert!(TrustDomain::new("cluster.local").is_ok());
        assert!(TrustDomain::new("a..b").is_err());
        assert!(TrustDomain::new(".a").is_err());
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(TrustDomain::new(&long).is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: ClusterName = serde_json::from_str("\"c1\"").unwrap();
        assert_eq!(ok.as_str(), "c1");
        let err = serde_json::from_str::<ClusterName>("\"C 1\"").unwrap_err();
        assert!(err.to_string().contains("invalid cluster name"), "{err}");
    }
}
