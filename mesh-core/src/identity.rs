//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use crate::name::{InvalidName, Namespace, ServiceAccount, TrustDomain};
use std::fmt;

/// A workload identity in Istio's SPIFFE form.
///
/// ```
/// use mesh_core::identity::Identity;
/// let id: Identity = "spiffe://cluster.local/ns/default/sa/reviews".parse().unwrap();
/// assert_eq!(id.namespace.as_str(), "default");
/// assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/reviews");
/// ```
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Identity {
    /// Trust domain that issued the identity.
    pub trust_domain: TrustDomain,
    /// Namespace of the workload.
    pub namespace: Namespace,
    /// Service account of the workload.
    pub service_account: ServiceAccount,
}

/// Why a SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidIdentity {
    /// Not of the form `spiffe://<td>/ns/<ns>/sa/<sa>`.
    #[error("invalid SPIFFE ID {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Form(String),
    /// One of the parts is not a valid name.
    #[error("invalid SPIFFE ID: {0}")]
    Name(#[from] InvalidName),
}

impl std::str::FromStr for Identity {
    type Err = InvalidIdentity;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let form = || InvalidIdentity::Form(s.chars().take(120).collect());
        let rest = s.strip_prefix("spiffe://").ok_or_else(form)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(form());
        };
        Ok(Self {
            trust_domain: TrustDomain::new(td)?,
            namespace: Namespace::new(ns)?,
            service_account: ServiceAccount::new(sa)?,
        })
    }
}

impl TryFrom<String> for Identity {
    type Error = InvalidIdentity;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Identity> for String {
    fn from(i: Identity) -> String {
        i.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
