//! Conversions between the wire contract (`mesh_api::v1`) and domain types.
//!
//! Every inbound conversion validates and names the offending field with a
//! dotted path (`endpoint.service.namespace`), so that a service can answer
//! INVALID_ARGUMENT with a useful message. Outbound conversions cannot fail.

use crate::cluster::{ClusterInfo, GatewayAddress};
pub use crate::endpoint::FieldError;
use crate::endpoint::{Endpoint, EndpointKey, Health, Port, Protocol};
use crate::identity::Identity;
use crate::locality::Locality;
use crate::name::{
    ClusterName, EndpointId, Namespace, Network, Region, ServiceName, TrustDomain, Zone,
};
use crate::service::ServiceKey;
use mesh_api::v1 as api;
use std::num::NonZeroU16;

/// Converts a wire message into a domain value, validating it.
pub trait FromApi<A>: Sized {
    /// Converts `a`; errors name fields relative to `path`.
    fn from_api(a: A, path: &str) -> Result<Self, FieldError>;
}

fn named<T, E: std::fmt::Display>(
    path: &str,
    field: &str,
    r: Result<T, E>,
) -> Result<T, FieldError> {
    r.map_err(|e| FieldError::new(join(path, field), e.to_string()))
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn required<T>(path: &str, field: &str, v: Option<T>) -> Result<T, FieldError> {
    v.ok_or_else(|| FieldError::new(join(path, field), "is required"))
}

impl FromApi<api::Locality> for Locality {
    fn from_api(a: api::Locality, path: &str) -> Result<Self, FieldError> {
        Ok(Self {
            region: named(path, "region", Region::new(&a.region))?,
            zone: named(path, "zone", Zone::new(&a.zone))?,
        })
    }
}

impl FromApi<api::ServiceKey> for ServiceKey {
    fn from_api(a: api::ServiceKey, path: &str) -> Result<Self, FieldError> {
        Ok(Self::new(
            named(path, "namespace", Namespace::new(&a.namespace))?,
            named(path, "name", ServiceName::new(&a.name))?,
        ))
    }
}

impl FromApi<api::ClusterInfo> for ClusterInfo {
    fn from_api(a: api::ClusterInfo, path: &str) -> Result<Self, FieldError> {
        let loc_path = join(path, "locality");
        let locality = Locality::from_api(required(path, "locality", a.locality)?, &loc_path)?;
        let gateways = a
            .gateway_addresses
            .iter()
            .enumerate()
            .map(|(i, g)| {
                named(
                    path,
                    &format!("gateway_addresses[{i}]"),
                    g.parse::<GatewayAddress>(),
                )
            })
            .collect::<Result<_, _>>()?;
        if a.endpoint_networks.len() > 64 {
            return Err(FieldError::new(
                join(path, "endpoint_networks"),
                format!("at most 64 networks, got {}", a.endpoint_networks.len()),
            ));
        }
        let endpoint_networks = a
            .endpoint_networks
            .iter()
            .enumerate()
            .map(|(i, n)| {
                n.parse::<crate::cidr::Cidr>()
                    .map_err(|e| FieldError::new(join(path, &format!("endpoint_networks[{i}]")), e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: named(path, "name", ClusterName::new(&a.name))?,
            locality,
            network: named(path, "network", Network::new(&a.network))?,
            gateways,
            trust_domain: named(path, "trust_domain", TrustDomain::new(&a.trust_domain))?,
            allow_local_endpoints: a.allow_local_endpoints,
            endpoint_networks,
        })
    }
}

impl FromApi<api::Endpoint> for Endpoint {
    fn from_api(a: api::Endpoint, path: &str) -> Result<Self, FieldError> {
        let svc_path = join(path, "service");
        let service = ServiceKey::from_api(required(path, "service", a.service)?, &svc_path)?;
        let loc_path = join(path, "locality");
        let locality = Locality::from_api(required(path, "locality", a.locality)?, &loc_path)?;
        let mut ports = Vec::with_capacity(a.ports.len());
        for (i, p) in a.ports.into_iter().enumerate() {
            let pp = join(path, &format!("ports[{i}]"));
            let number = u16::try_from(p.number)
                .ok()
                .and_then(NonZeroU16::new)
                .ok_or_else(|| {
                    FieldError::new(
                        format!("{pp}.number"),
                        format!("{} is not a port 1 to 65535", p.number),
                    )
                })?;
            let protocol = Protocol::parse(&p.protocol).ok_or_else(|| {
                FieldError::new(
                    format!("{pp}.protocol"),
                    format!("{:?} is not one of tcp, http, http2, grpc", p.protocol),
                )
            })?;
            let target =
                match p.target_port {
                    0 => None,
                    t => Some(u16::try_from(t).ok().and_then(NonZeroU16::new).ok_or_else(
                        || {
                            FieldError::new(
                                format!("{pp}.target_port"),
                                format!("{t} is not a port 1 to 65535"),
                            )
                        },
                    )?),
                };
            ports.push(Port {
                name: (!p.name.is_empty()).then_some(p.name),
                number,
                protocol,
                target,
            });
        }
        let health = match api::Health::try_from(a.health) {
            Ok(api::Health::Unspecified | api::Health::Healthy) => Health::Healthy,
            Ok(api::Health::Unhealthy) => Health::Unhealthy,
            Ok(api::Health::Draining) => Health::Draining,
            Err(_) => {
                return Err(FieldError::new(
                    join(path, "health"),
                    format!("unknown health value {}", a.health),
                ))
            }
        };
        let identity = if a.identity.is_empty() {
            None
        } else {
            Some(named(path, "identity", a.identity.parse::<Identity>())?)
        };
        let ep = Self {
            id: named(path, "id", EndpointId::new(&a.id))?,
            service,
            cluster: named(path, "cluster", ClusterName::new(&a.cluster))?,
            address: named(path, "address", a.address.parse::<std::net::IpAddr>())?,
            ports,
            labels: a.labels.into_iter().collect(),
            locality,
            health,
            identity,
        };
        ep.validate(path)?;
        Ok(ep)
    }
}

impl FromApi<api::EndpointRef> for EndpointKey {
    fn from_api(a: api::EndpointRef, path: &str) -> Result<Self, FieldError> {
        let svc_path = join(path, "service");
        Ok(Self {
            service: ServiceKey::from_api(required(path, "service", a.service)?, &svc_path)?,
            cluster: named(path, "cluster", ClusterName::new(&a.cluster))?,
            id: named(path, "id", EndpointId::new(&a.id))?,
        })
    }
}

/// Converts an optional sub-message that must be present.
pub fn required_from_api<A, T: FromApi<A>>(
    path: &str,
    field: &str,
    a: Option<A>,
) -> Result<T, FieldError> {
    let p = join(path, field);
    T::from_api(required(path, field, a)?, &p)
}

// === outbound ===

impl From<&Locality> for api::Locality {
    fn from(l: &Locality) -> Self {
        Self {
            region: l.region.to_string(),
            zone: l.zone.to_string(),
        }
    }
}

impl From<&ServiceKey> for api::ServiceKey {
    fn from(k: &ServiceKey) -> Self {
        Self {
            namespace: k.namespace.to_string(),
            name: k.name.to_string(),
        }
    }
}

impl From<&ClusterInfo> for api::ClusterInfo {
    fn from(c: &ClusterInfo) -> Self {
        Self {
            name: c.name.to_string(),
            locality: Some((&c.locality).into()),
            network: c.network.to_string(),
            gateway_addresses: c.gateways.iter().map(ToString::to_string).collect(),
            trust_domain: c.trust_domain.to_string(),
            allow_local_endpoints: c.allow_local_endpoints,
            endpoint_networks: c
                .endpoint_networks
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }
}

impl From<Health> for api::Health {
    fn from(h: Health) -> Self {
        match h {
            Health::Healthy => Self::Healthy,
            Health::Unhealthy => Self::Unhealthy,
            Health::Draining => Self::Draining,
        }
    }
}

impl From<&Endpoint> for api::Endpoint {
    fn from(e: &Endpoint) -> Self {
        Self {
            id: e.id.to_string(),
            service: Some((&e.service).into()),
            cluster: e.cluster.to_string(),
            address: e.address.to_string(),
            ports: e
                .ports
                .iter()
                .map(|p| api::Port {
                    name: p.name.clone().unwrap_or_default(),
                    number: u32::from(p.number.get()),
                    protocol: p.protocol.as_str().to_string(),
                    target_port: p.target.map_or(0, |t| u32::from(t.get())),
                })
                .collect(),
            labels: e
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            locality: Some((&e.locality).into()),
            health: api::Health::from(e.health) as i32,
            identity: e
                .identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }
}

impl From<&EndpointKey> for api::EndpointRef {
    fn from(k: &EndpointKey) -> Self {
        Self {
            service: Some((&k.service).into()),
            cluster: k.cluster.to_string(),
            id: k.id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> api::Endpoint {
        api::Endpoint {
            id: "reviews-v1-abc".into(),
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            cluster: "c1".into(),
            address: "10.0.0.7".into(),
            ports: vec![api::Port {
                name: "http".into(),
                number: 9080,
                protocol: "http".into(),
                ..Default::default()
            }],
            labels: [("version".to_string(), "v1".to_string())].into(),
            locality: Some(api::Locality {
                region: "us-east".into(),
                zone: "us-east-1a".into(),
            }),
            health: api::Health::Healthy as i32,
            identity: "spiffe://cluster.local/ns/default/sa/reviews".into(),
        }
    }

    #[test]
    fn endpoint_roundtrip() {
        let core = Endpoint::from_api(good(), "endpoint").unwrap();
        let back = api::Endpoint::from(&core);
        assert_eq!(back, good());
    }

    #[test]
    fn endpoint_errors_name_the_field() {
        type Mutation = Box<dyn Fn(&mut api::Endpoint)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|e| e.service = None),
                "endpoint.service: is required",
            ),
            (
                Box::new(|e| e.service.as_mut().unwrap().namespace = "Bad NS".into()),
                "endpoint.service.namespace: invalid namespace",
            ),
            (
                Box::new(|e| e.address = "10.0.0".into()),
                "endpoint.address:",
            ),
            (
                Box::new(|e| e.address = "0.0.0.0".into()),
                "endpoint.address: 0.0.0.0 is not a unicast address",
            ),
            (
                Box::new(|e| e.ports[0].number = 70000),
                "endpoint.ports[0].number: 70000 is not a port",
            ),
            (
                Box::new(|e| e.ports.clear()),
                "endpoint.ports: at least one port",
            ),
            (
                Box::new(|e| e.ports.push(e.ports[0].clone())),
                "endpoint.ports[1].number: port 9080 is listed twice",
            ),
            (
                Box::new(|e| e.ports[0].protocol = "udp".into()),
                "endpoint.ports[0].protocol",
            ),
            (
                Box::new(|e| e.locality.as_mut().unwrap().zone = String::new()),
                "endpoint.locality.zone: invalid zone",
            ),
            (
                Box::new(|e| e.identity = "spiffe://x".into()),
                "endpoint.identity: invalid SPIFFE ID",
            ),
            (
                Box::new(|e| e.health = 42),
                "endpoint.health: unknown health value 42",
            ),
            (
                Box::new(|e| e.cluster = String::new()),
                "endpoint.cluster: invalid cluster name",
            ),
        ];
        for (mutate, want) in cases {
            let mut e = good();
            mutate(&mut e);
            let err = Endpoint::from_api(e, "endpoint").unwrap_err().to_string();
            assert!(err.starts_with(want), "got {err:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn cluster_errors_name_the_field() {
        let ok = api::ClusterInfo {
            name: "c1".into(),
            locality: Some(api::Locality {
                region: "us-east".into(),
                zone: "us-east-1a".into(),
            }),
            network: "net1".into(),
            gateway_addresses: vec!["127.0.0.1:15443".into(), "gw.example.com:15443".into()],
            trust_domain: "cluster.local".into(),
            ..Default::default()
        };
        let core = ClusterInfo::from_api(ok.clone(), "cluster").unwrap();
        assert_eq!(api::ClusterInfo::from(&core), ok);
        let mut bad = ok.clone();
        bad.gateway_addresses[1] = "gw.example.com".into();
        let err = ClusterInfo::from_api(bad, "cluster")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cluster.gateway_addresses[1]: invalid gateway address"),
            "{err}"
        );
        let mut bad = ok;
        bad.locality = None;
        let err = ClusterInfo::from_api(bad, "cluster")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "cluster.locality: is required");
    }
}
