//! `meshctl demo`: a federation on the embedded registry (or etcd) with a
//! sample multi-region mesh registered through the same gRPC API real
//! clusters use, kept live by heartbeats until Ctrl-C.
//!
//! Today the sample endpoints are registry records: no workloads, gateways or
//! traffic run yet (those come with the gateway, agent and demo issues).

use crate::cli::Format;
use crate::Error;
use federation::config::{Args as FedArgs, Config};
use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use std::time::Duration;
use tonic::transport::Channel;

/// Flags of `meshctl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Address for the demo federation's API.
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub listen: String,
    /// Use etcd (`etcd://HOST:PORT[,...]`) instead of the embedded registry.
    #[arg(long)]
    pub etcd: Option<String>,
}

/// The sample topology: two clusters in us-east, one each in us-west and eu-west.
pub const CLUSTERS: &[(&str, &str, &str)] = &[
    ("us-east-1", "us-east", "us-east-1a"),
    ("us-east-2", "us-east", "us-east-1b"),
    ("us-west-1", "us-west", "us-west-2a"),
    ("eu-west-1", "eu-west", "eu-west-1a"),
];

fn cluster_info(i: usize, name: &str, region: &str, zone: &str) -> api::ClusterInfo {
    api::ClusterInfo {
        name: name.into(),
        locality: Some(api::Locality {
            region: region.into(),
            zone: zone.into(),
        }),
        network: format!("net-{name}"),
        // 198.18.0.0/15 is the benchmarking range: these addresses are
        // placeholders that route nowhere.
        gateway_addresses: vec![format!("198.18.{i}.1:15443")],
        trust_domain: "cluster.local".into(),
    }
}

fn sample_endpoint(
    ci: usize,
    cluster: &str,
    region: &str,
    zone: &str,
    svc: &str,
    n: usize,
    version: &str,
) -> api::Endpoint {
    api::Endpoint {
        id: format!("{svc}-{version}-{n}"),
        service: Some(api::ServiceKey {
            namespace: "default".into(),
            name: svc.into(),
        }),
        cluster: cluster.into(),
        address: format!(
            "198.18.{ci}.{}",
            10 + n + if svc == "frontend" { 0 } else { 100 }
        ),
        ports: vec![api::Port {
            name: "http".into(),
            number: if svc == "frontend" { 8080 } else { 9080 },
            protocol: "http".into(),
            ..Default::default()
        }],
        labels: [
            ("app".to_string(), svc.to_string()),
            ("version".to_string(), version.to_string()),
        ]
        .into(),
        locality: Some(api::Locality {
            region: region.into(),
            zone: zone.into(),
        }),
        health: api::Health::Healthy as i32,
        identity: format!("spiffe://cluster.local/ns/default/sa/{svc}"),
    }
}

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(args: &DemoArgs, fmt: Format) -> Result<(), Error> {
    use clap::Parser;
    let registry = match &args.etcd {
        None => "memory".to_string(),
        Some(u) if u.starts_with("etcd://") => u.clone(),
        Some(u) => format!("etcd://{}", u.trim_start_matches("http://")),
    };
    let fed_args = FedArgs::try_parse_from([
        "meshctl-demo",
        "--listen",
        &args.listen,
        "--registry",
        &registry,
    ])
    .map_err(|e| Error::Usage(e.to_string()))?;
    let cfg = Config::from_args(&fed_args).map_err(|errs| Error::Usage(errs.join("; ")))?;
    let bound = federation::app::build(&cfg).await?;
    let url = format!("http://{}", bound.addr);
    println!("federation listening on {url} (registry: {registry})");

    let ch = crate::client::connect(&url).await?;
    let mut reg = RegistrationClient::new(ch.clone());
    let mut interval = Duration::from_secs(3);
    let total = CLUSTERS.len();
    for (i, (name, region, zone)) in CLUSTERS.iter().enumerate() {
        let resp = reg
            .register_cluster(api::RegisterClusterRequest {
                cluster: Some(cluster_info(i, name, region, zone)),
            })
            .await?
            .into_inner();
        interval = Duration::from_secs(u64::from(resp.heartbeat_interval_seconds.max(1)));
        let mut n = 0;
        for (svc, versions) in [("frontend", &["v1"][..]), ("reviews", &["v1", "v2"][..])] {
            for (k, v) in versions.iter().enumerate() {
                reg.register_endpoint(api::RegisterEndpointRequest {
                    endpoint: Some(sample_endpoint(i, name, region, zone, svc, k, v)),
                })
                .await?;
                n += 1;
            }
        }
        reg.set_export(api::SetExportRequest {
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            cluster: (*name).into(),
            exported: true,
        })
        .await?;
        println!(
            "[{}/{total}] registered cluster {name} ({region}/{zone}) with {n} endpoints",
            i + 1
        );
    }
    println!();
    crate::cmd::list::clusters(ch.clone(), fmt).await?;
    println!();
    crate::cmd::list::services(ch.clone(), fmt).await?;
    println!();
    println!("The mesh is up. In another terminal:");
    println!("  meshctl --federation {url} clusters");
    println!("  meshctl --federation {url} endpoints reviews.default -o json");
    println!("Ctrl-C stops the demo.");

    let heartbeats = heartbeat_loop(reg, interval);
    let outcome = tokio::select! {
        r = heartbeats => r,
        s = mesh_core::signal::shutdown() => s.map(|_| ()).map_err(|e| Error::Other(e.into())),
    };
    println!("stopping the demo");
    bound.shutdown(Duration::from_secs(2)).await?;
    outcome
}

async fn heartbeat_loop(
    mut reg: RegistrationClient<Channel>,
    every: Duration,
) -> Result<(), Error> {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for (name, _, _) in CLUSTERS {
            if let Err(e) = reg
                .heartbeat(api::HeartbeatRequest {
                    cluster: (*name).into(),
                })
                .await
            {
                tracing::warn!(cluster = name, "heartbeat failed: {}", e.message());
            }
        }
    }
}
