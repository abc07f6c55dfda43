//! `clusters`, `services`, `endpoints`, `status`: read-only views.

use crate::cli::Format;
use crate::output::{emit, rfc3339, table};
use crate::Error;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_core::name::Namespace;
use mesh_core::service::ServiceKey;
use serde::Serialize;
use tonic::transport::Channel;

/// A cluster as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct ClusterRow {
    /// Name.
    pub name: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Network.
    pub network: String,
    /// Gateway addresses.
    pub gateways: Vec<String>,
    /// Trust domain.
    pub trust_domain: String,
    /// `live` or `unknown`.
    pub liveness: String,
    /// Since when (RFC 3339).
    pub since: String,
}

fn liveness(l: i32) -> &'static str {
    match api::Liveness::try_from(l) {
        Ok(api::Liveness::Live) => "live",
        _ => "unknown",
    }
}

fn health(h: i32) -> &'static str {
    match api::Health::try_from(h) {
        Ok(api::Health::Unhealthy) => "unhealthy",
        Ok(api::Health::Draining) => "draining",
        _ => "healthy",
    }
}

/// `meshctl clusters`.
pub async fn clusters(ch: Channel, fmt: Format) -> Result<(), Error> {
    let resp = AdminClient::new(ch)
        .list_clusters(api::ListClustersRequest {})
        .await?
        .into_inner();
    let rows: Vec<ClusterRow> = resp
        .clusters
        .into_iter()
        .map(|c| {
            let info = c.info.unwrap_or_default();
            let loc = info.locality.unwrap_or_default();
            ClusterRow {
                name: info.name,
                region: loc.region,
                zone: loc.zone,
                network: info.network,
                gateways: info.gateway_addresses,
                trust_domain: info.trust_domain,
                liveness: liveness(c.liveness).to_string(),
                since: rfc3339(c.since_unix_ms),
            }
        })
        .collect();
    emit(
        fmt,
        &rows,
        &[
            "CLUSTER",
            "REGION",
            "ZONE",
            "NETWORK",
            "GATEWAYS",
            "TRUST DOMAIN",
            "LIVENESS",
        ],
        |r| {
            vec![
                r.name.clone(),
                r.region.clone(),
                r.zone.clone(),
                r.network.clone(),
                r.gateways.join(","),
                r.trust_domain.clone(),
                format!("{} since {}", r.liveness, r.since),
            ]
        },
    )
}

/// A service as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct ServiceRow {
    /// `namespace/name`.
    pub service: String,
    /// Clusters with endpoints.
    pub clusters: Vec<String>,
    /// Clusters exporting it.
    pub exported_from: Vec<String>,
    /// Endpoint count.
    pub endpoints: u32,
    /// Healthy endpoint count.
    pub healthy: u32,
}

/// `meshctl services`.
pub async fn services(ch: Channel, fmt: Format) -> Result<(), Error> {
    let resp = AdminClient::new(ch)
        .list_services(api::ListServicesRequest {})
        .await?
        .into_inner();
    let rows: Vec<ServiceRow> = resp
        .services
        .into_iter()
        .map(|s| {
            let k = s.key.unwrap_or_default();
            ServiceRow {
                service: format!("{}/{}", k.namespace, k.name),
                clusters: s.clusters,
                exported_from: s.exported_from,
                endpoints: s.endpoints,
                healthy: s.healthy_endpoints,
            }
        })
        .collect();
    let dash = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    emit(
        fmt,
        &rows,
        &["SERVICE", "CLUSTERS", "EXPORTED FROM", "HEALTHY/TOTAL"],
        |r| {
            vec![
                r.service.clone(),
                dash(&r.clusters),
                dash(&r.exported_from),
                format!("{}/{}", r.healthy, r.endpoints),
            ]
        },
    )
}

/// An endpoint as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct EndpointRow {
    /// Cluster.
    pub cluster: String,
    /// Id.
    pub id: String,
    /// IP address.
    pub address: String,
    /// Ports as `number/protocol`.
    pub ports: Vec<String>,
    /// `region/zone`.
    pub locality: String,
    /// Health.
    pub health: String,
    /// SPIFFE identity.
    pub identity: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// `meshctl endpoints SERVICE`.
pub async fn endpoints(ch: Channel, fmt: Format, service: &str) -> Result<(), Error> {
    let default_ns = Namespace::new("default").map_err(|e| Error::Other(e.into()))?;
    let key = ServiceKey::parse_with_default(service, Some(&default_ns))
        .map_err(|e| Error::Usage(e.to_string()))?;
    let resp = AdminClient::new(ch)
        .list_endpoints(api::ListEndpointsRequest {
            service: Some((&key).into()),
        })
        .await?
        .into_inner();
    let rows: Vec<EndpointRow> = resp
        .endpoints
        .into_iter()
        .map(|e| {
            let loc = e.locality.unwrap_or_default();
            EndpointRow {
                cluster: e.cluster,
                id: e.id,
                address: e.address,
                ports: e
                    .ports
                    .iter()
                    .map(|p| {
                        format!(
                            "{}/{}",
                            p.number,
                            if p.protocol.is_empty() {
                                "tcp"
                            } else {
                                &p.protocol
                            }
                        )
                    })
                    .collect(),
                locality: format!("{}/{}", loc.region, loc.zone),
                health: health(e.health).to_string(),
                identity: e.identity,
                labels: e.labels.into_iter().collect(),
            }
        })
        .collect();
    emit(
        fmt,
        &rows,
        &[
            "CLUSTER", "ENDPOINT", "ADDRESS", "PORTS", "LOCALITY", "HEALTH", "LABELS",
        ],
        |r| {
            vec![
                r.cluster.clone(),
                r.id.clone(),
                r.address.clone(),
                r.ports.join(","),
                r.locality.clone(),
                r.health.clone(),
                r.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        },
    )
}

/// The federation's status as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct StatusOut {
    /// Registry kind.
    pub registry: String,
    /// Reachable?
    pub registry_reachable: bool,
    /// Why not.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub degraded_reason: String,
    /// Revision served.
    pub revision: i64,
    /// This replica.
    pub replica: String,
    /// The replica that leads, if known.
    pub leader: String,
    /// This replica leads.
    pub leading: bool,
    /// Values skipped as malformed: key and reason.
    pub invalid_entries: Vec<(String, String)>,
    /// Subscribers.
    pub subscribers: Vec<SubscriberRow>,
    /// Whether the latest traffic change (weights, drains) is in effect:
    /// per calling cluster, how many agents run it.
    pub traffic: Option<crate::cmd::rollout::RolloutOut>,
}

/// One subscriber.
#[derive(Debug, Serialize)]
pub struct SubscriberRow {
    /// Node id.
    pub node_id: String,
    /// Cluster.
    pub cluster: String,
    /// The federation replica serving it.
    pub replica: String,
    /// Last version sent.
    pub sent_version: i64,
    /// Last version ACKed.
    pub acked_version: i64,
    /// Revisions behind the served one.
    pub behind: i64,
    /// Seconds since its last ACK (none: never).
    pub acked_seconds_ago: Option<f64>,
    /// Last NACK's reason, if the last answer was a NACK.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub nack: String,
}

/// `meshctl status`.
pub async fn status(ch: Channel, fmt: Format) -> Result<(), Error> {
    let s = AdminClient::new(ch.clone())
        .get_status(api::GetStatusRequest {})
        .await?
        .into_inner();
    // Not shown by a federation too old to say.
    let traffic = crate::cmd::rollout::get(ch, None, 0).await.ok();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let revision = s.revision;
    let out = StatusOut {
        replica: s.replica,
        leader: s.leader,
        leading: s.leading,
        registry: s.registry,
        registry_reachable: s.registry_reachable,
        degraded_reason: s.degraded_reason,
        revision: s.revision,
        invalid_entries: s
            .invalid_entries
            .into_iter()
            .map(|e| (e.key, e.reason))
            .collect(),
        subscribers: s
            .subscribers
            .into_iter()
            .map(|x| SubscriberRow {
                node_id: x.node_id,
                cluster: x.cluster,
                replica: x.replica,
                sent_version: x.sent_version,
                acked_version: x.acked_version,
                behind: (revision - x.acked_version).max(0),
                #[allow(clippy::cast_precision_loss)]
                acked_seconds_ago: (x.acked_unix_ms > 0)
                    .then(|| ((now - x.acked_unix_ms).max(0) as f64 / 100.0).round() / 10.0),
                nack: if x.nack_reason.is_empty() {
                    String::new()
                } else {
                    format!("v{}: {}", x.nack_version, x.nack_reason)
                },
            })
            .collect(),
        traffic,
    };
    if fmt == Format::Json {
        let s = serde_json::to_string_pretty(&out).map_err(|e| Error::Other(e.into()))?;
        println!("{s}");
        return Ok(());
    }
    let state = if out.registry_reachable {
        "reachable".to_string()
    } else {
        format!(
            "DEGRADED: {} (serving last known state)",
            out.degraded_reason
        )
    };
    println!("registry   {} ({state})", out.registry);
    println!("revision   {}", out.revision);
    let leader = match (out.leading, out.leader.is_empty()) {
        (true, _) => format!("{} (this replica)", out.replica),
        (false, false) => out.leader.clone(),
        (false, true) => "none known".to_string(),
    };
    println!("leader     {leader}");
    if let Some(t) = out.traffic.as_ref().filter(|t| t.revision > 0) {
        println!("traffic    revision {}, {}", t.revision, t.summary());
    }
    if !out.invalid_entries.is_empty() {
        println!("\nskipped malformed values:");
        let cells: Vec<Vec<String>> = out
            .invalid_entries
            .iter()
            .map(|(k, r)| vec![k.clone(), r.clone()])
            .collect();
        print!("{}", table(&["KEY", "REASON"], &cells));
    }
    println!();
    let cells: Vec<Vec<String>> = out
        .subscribers
        .iter()
        .map(|s| {
            vec![
                s.node_id.clone(),
                s.cluster.clone(),
                s.replica.clone(),
                s.sent_version.to_string(),
                s.acked_version.to_string(),
                s.behind.to_string(),
                s.acked_seconds_ago
                    .map_or_else(|| "never".to_string(), |a| format!("{a:.1}s ago")),
                if s.nack.is_empty() {
                    "-".into()
                } else {
                    s.nack.clone()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "SUBSCRIBER",
                "CLUSTER",
                "REPLICA",
                "SENT",
                "ACKED",
                "BEHIND",
                "LAST ACK",
                "NACK"
            ],
            &cells
        )
    );
    Ok(())
}
