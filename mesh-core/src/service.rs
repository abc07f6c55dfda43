//! Services, named the Kubernetes way: a namespace and a name.

use crate::name::{InvalidName, Namespace, ServiceName};
use std::fmt;

/// Identifies a service across the mesh.
///
/// ```
/// use mesh_core::service::ServiceKey;
/// let k: ServiceKey = "default/reviews".parse().unwrap();
/// assert_eq!(k, "reviews.default".parse().unwrap());
/// assert_eq!(k.to_string(), "default/reviews");
/// assert_eq!(k.host(), "reviews.default.svc.cluster.local");
/// ```
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ServiceKey {
    /// Namespace of the service.
    pub namespace: Namespace,
    /// Name of the service within its namespace.
    pub name: ServiceName,
}

/// Why a service reference could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseServiceError {
    /// One of the parts is not a valid name.
    #[error(transparent)]
    Name(#[from] InvalidName),
    /// The text has no namespace and none was given as default.
    #[error("service {0:?} has no namespace: write namespace/name or name.namespace")]
    NoNamespace(String),
    /// The text has too many parts.
    #[error(
        "service {0:?} is not of the form namespace/name or name.namespace[.svc.cluster.local]"
    )]
    Malformed(String),
}

impl ServiceKey {
    /// Builds a key from validated parts.
    pub fn new(namespace: Namespace, name: ServiceName) -> Self {
        Self { namespace, name }
    }

    /// The service's cluster-local host name, `name.namespace.svc.cluster.local`.
    pub fn host(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// Parses `namespace/name`, `name.namespace`, `name.namespace.svc.cluster.local`,
    /// or a bare `name`, which takes `default_ns` when one is given.
    pub fn parse_with_default(
        s: &str,
        default_ns: Option<&Namespace>,
    ) -> Result<Self, ParseServiceError> {
        if let Some((ns, name)) = s.split_once('/') {
            return Ok(Self::new(Namespace::new(ns)?, ServiceName::new(name)?));
        }
        let trimmed = s.strip_suffix(".svc.cluster.local").unwrap_or(s);
        let parts: Vec<&str> = trimmed.split('.').collect();
        match parts.as_slice() {
            [name] => match default_ns {
                Some(ns) => Ok(Self::new(ns.clone(), ServiceName::new(name)?)),
                None => Err(ParseServiceError::NoNamespace(s.to_string())),
            },
            [name, ns] => Ok(Self::new(Namespace::new(ns)?, ServiceName::new(name)?)),
            _ => Err(ParseServiceError::Malformed(s.chars().take(80).collect())),
        }
    }
}

impl std::str::FromStr for ServiceKey {
    type Err = ParseServiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_with_default(s, None)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        let k: ServiceKey = "default/reviews".parse().unwrap();
        assert_eq!(k.namespace.as_str(), "default");
        assert_eq!(k.name.as_str(), "reviews");
        assert_eq!("reviews.default".parse::<ServiceKey>().unwrap(), k);
        assert_eq!(
            "reviews.default.svc.cluster.local"
                .parse::<ServiceKey>()
                .unwrap(),
            k
        );
        let ns = Namespace::new("default").unwrap();
        assert_eq!(
            ServiceKey::parse_with_default("reviews", Some(&ns)).unwrap(),
            k
        );
        assert!(matches!(
            "reviews".parse::<ServiceKey>(),
            Err(ParseServiceError::NoNamespace(_))
        ));
        assert!(matches!(
            "a.b.c".parse::<ServiceKey>(),
            Err(ParseServiceError::Malformed(_))
        ));
        let e = "default/Reviews".parse::<ServiceKey>().unwrap_err();
        assert!(e.to_string().contains("invalid service name"), "{e}");
    }
}
