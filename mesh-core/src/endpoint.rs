//! Endpoints: one instance of a service in one cluster.

use crate::identity::Identity;
use crate::locality::Locality;
use crate::name::{check_label, ClusterName, EndpointId};
use crate::service::ServiceKey;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroU16;

/// Application protocol spoken on a port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP (the default).
    #[default]
    Tcp,
    /// HTTP/1.1.
    Http,
    /// HTTP/2.
    Http2,
    /// gRPC over HTTP/2.
    Grpc,
}

impl Protocol {
    /// Parses the wire form: `""` and `"tcp"` are TCP.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "" | "tcp" => Self::Tcp,
            "http" => Self::Http,
            "http2" => Self::Http2,
            "grpc" => Self::Grpc,
            _ => return None,
        })
    }

    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Http2 => "http2",
            Self::Grpc => "grpc",
        }
    }
}

/// One port an endpoint serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Port {
    /// Port name, e.g. `http` (an RFC 1123 label when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number.
    pub number: NonZeroU16,
    /// Application protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where the endpoint accepts this port's traffic (its agent's inbound
    /// listener), when that is not `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<NonZeroU16>,
}

impl Port {
    /// The port to connect to: the target if set, else the number.
    pub fn connect_port(&self) -> u16 {
        self.target.unwrap_or(self.number).get()
    }
}

/// Health of an endpoint, as reported by its agent or its cluster.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Ready to serve (also what an unspecified health means, as in Istio).
    #[default]
    Healthy,
    /// Failing its readiness probe.
    Unhealthy,
    /// Finishing in-flight work; takes no new traffic.
    Draining,
}

impl Health {
    /// Lowercase name, as shown by meshctl and stored in the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Draining => "draining",
        }
    }
}

/// Identifies an endpoint in the registry: its service, cluster and id.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct EndpointKey {
    /// Service the endpoint belongs to.
    pub service: ServiceKey,
    /// Cluster the endpoint runs in.
    pub cluster: ClusterName,
    /// Identifier within (service, cluster).
    pub id: EndpointId,
}

impl std::fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.service, self.cluster, self.id)
    }
}

/// One instance of a service in one cluster.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    /// Identifier unique within (service, cluster), e.g. the pod name.
    pub id: EndpointId,
    /// Service the endpoint belongs to.
    pub service: ServiceKey,
    /// Cluster the endpoint runs in.
    pub cluster: ClusterName,
    /// IP address of the workload.
    pub address: IpAddr,
    /// Ports served; at least one, numbers unique.
    pub ports: Vec<Port>,
    /// Workload labels (used for subsets).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the endpoint runs.
    pub locality: Locality,
    /// Reported health.
    #[serde(default)]
    pub health: Health,
    /// SPIFFE identity of the workload, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
}

/// A rule an endpoint breaks, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
#[non_exhaustive]
pub struct FieldError {
    /// Dotted path of the offending field, e.g. `endpoint.ports[1].number`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FieldError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Longest label key, as Kubernetes allows: a 253-character prefix, `/`, a 63-character name.
const MAX_LABEL_KEY_LEN: usize = 317;
/// Longest label value Kubernetes allows.
const MAX_LABEL_VALUE_LEN: usize = 63;

impl Endpoint {
    /// The endpoint's registry key.
    pub fn key(&self) -> EndpointKey {
        EndpointKey {
            service: self.service.clone(),
            cluster: self.cluster.clone(),
            id: self.id.clone(),
        }
    }

    /// Checks the rules that the types alone do not enforce; `path` prefixes field names.
    pub fn validate(&self, path: &str) -> Result<(), FieldError> {
        if self.ports.is_empty() {
            return Err(FieldError::new(
                format!("{path}.ports"),
                "at least one port is required",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if !seen.insert(p.number) {
                return Err(FieldError::new(
                    format!("{path}.ports[{i}].number"),
                    format!("port {} is listed twice", p.number),
                ));
            }
            if let Some(name) = &p.name {
                check_label(name).map_err(|r| {
                    FieldError::new(format!("{path}.ports[{i}].name"), format!("{name:?} {r}"))
                })?;
            }
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > MAX_LABEL_KEY_LEN {
                return Err(FieldError::new(
                    format!("{path}.labels"),
                    format!("label key {k:?} must be 1 to {MAX_LABEL_KEY_LEN} characters"),
                ));
            }
            if v.len() > MAX_LABEL_VALUE_LEN {
                return Err(FieldError::new(
                    format!("{path}.labels[{k}]"),
                    format!("label value must be at most {MAX_LABEL_VALUE_LEN} characters"),
                ));
            }
        }
        if self.address.is_unspecified() || self.address.is_multicast() {
            return Err(FieldError::new(
                format!("{path}.address"),
                format!("{} is not a unicast address", self.address),
            ));
        }
        Ok(())
    }
}
