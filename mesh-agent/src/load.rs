//! Load reports: every interval the agent tells the federation how many
//! requests per second its workload served and can serve, and how many it
//! sent to each service. The federation's leader rebalances traffic on them
//! and checks operator weights against the capacity.

use crate::metrics::Metrics;
use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_core::endpoint::EndpointKey;
use mesh_core::service::ServiceKey;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::debug;

/// Reports until `stop`.
pub async fn run(
    fed: mesh_node::fed::Target,
    endpoint: EndpointKey,
    capacity: f64,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut client: Option<RegistrationClient<tonic::transport::Channel>> = None;
    let mut last_in = metrics.load.inbound.load(Ordering::Relaxed);
    let mut last_out: HashMap<String, u64> = metrics.load.sent_totals().into_iter().collect();
    let mut since = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let secs = since.elapsed().as_secs_f64().max(0.001);
        since = Instant::now();
        let now_in = metrics.load.inbound.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        let inbound_qps = now_in.saturating_sub(last_in) as f64 / secs;
        last_in = now_in;
        let mut outbound = Vec::new();
        for (svc, n) in metrics.load.sent_totals() {
            let before = last_out.insert(svc.clone(), n).unwrap_or(0);
            // Only mesh services: requests for unknown hosts are not load.
            if let Ok(k) = svc.parse::<ServiceKey>() {
                #[allow(clippy::cast_precision_loss)]
                outbound.push(api::OutboundLoad {
                    service: Some((&k).into()),
                    qps: n.saturating_sub(before) as f64 / secs,
                });
            }
        }
        let req = api::ReportLoadRequest {
            endpoint: Some((&endpoint).into()),
            inbound_qps,
            capacity_qps: capacity,
            outbound,
        };
        if client.is_none() {
            client = fed.channel().await.ok().map(RegistrationClient::new);
        }
        let Some(c) = client.as_mut() else { continue };
        if let Err(s) = c.report_load(req).await {
            // Not registered yet, or the federation is away: the next
            // report says it again.
            debug!(code = ?s.code(), "load report not taken: {}", s.message());
            // Unauthenticated: the connection was made before this node
            // had its certificate; the next one presents it.
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Unauthenticated
            ) {
                client = None;
            }
        }
    }
}
