//! Self-registration: the agent publishes its workload's endpoint to the
//! federation, with the health its readiness probe of the application
//! reports, and takes it out again when it drains.

use mesh_api::v1 as api;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_core::endpoint::{Endpoint, Health};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{info, warn};

/// A probe answer must arrive within this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A registration is re-sent this often even without a change, so an entry
/// lost by the registry (restored backup, operator mistake) comes back.
const REFRESH: Duration = Duration::from_secs(30);
/// How long the agent waits for the federation when deregistering.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);

/// How the application's readiness is checked.
#[derive(Debug, Clone)]
pub enum Probe {
    /// A TCP connect to the application.
    Tcp(SocketAddr),
    /// `GET path` on the application; 2xx and 3xx are ready.
    Http {
        /// The application.
        addr: SocketAddr,
        /// The path.
        path: String,
    },
}

impl Probe {
    /// Probes once.
    pub async fn check(&self) -> Result<(), String> {
        let run = async {
            match self {
                Probe::Tcp(addr) => TcpStream::connect(addr)
                    .await
                    .map(drop)
                    .map_err(|e| format!("connect {addr}: {e}")),
                Probe::Http { addr, path } => http_probe(*addr, path).await,
            }
        };
        tokio::time::timeout(PROBE_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}")))
    }
}

/// A minimal HTTP/1.1 GET: the status line is all a probe needs.
async fn http_probe(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: fedmesh-probe\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let code = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("{path} answered {code}"))
    }
}

/// Keeps the endpoint registered with its current health until `stop`, then
/// marks it draining, waits `drain`, and deregisters it.
pub async fn run(
    fed: mesh_node::fed::Target,
    mut endpoint: Endpoint,
    probe: Probe,
    interval: Duration,
    health: watch::Sender<Health>,
    mut stop: watch::Receiver<bool>,
) {
    let mut registered: Option<(Health, tokio::time::Instant)> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::serve::stopped(&mut stop) => break,
        }
        let h = match probe.check().await {
            Ok(()) => Health::Healthy,
            Err(why) => {
                if endpoint.health == Health::Healthy || registered.is_none() {
                    warn!(%why, "application not ready");
                }
                Health::Unhealthy
            }
        };
        if h != endpoint.health {
            info!(
                from = endpoint.health.as_str(),
                to = h.as_str(),
                "workload health changed"
            );
        }
        endpoint.health = h;
        health.send_replace(h);
        let due = registered.is_none_or(|(was, at)| was != h || at.elapsed() >= REFRESH);
        if due {
            match register(&fed, &endpoint).await {
                Ok(()) => registered = Some((h, tokio::time::Instant::now())),
                Err(e) => {
                    warn!(url = %fed.url, "cannot register the endpoint yet: {e:#}");
                    registered = None;
                }
            }
        }
    }
    // Draining: callers stop picking this endpoint, then it goes.
    endpoint.health = Health::Draining;
    health.send_replace(Health::Draining);
    let key = endpoint.key();
    let done = tokio::time::timeout(DEREGISTER_TIMEOUT, async {
        let mut c = RegistrationClient::new(fed.channel().await?);
        c.deregister_endpoint(api::DeregisterEndpointRequest {
            endpoint: Some((&key).into()),
        })
        .await?;
        anyhow::Ok(())
    })
    .await;
    match done {
        Ok(Ok(())) => info!("endpoint deregistered"),
        Ok(Err(e)) => warn!("cannot deregister the endpoint: {e:#}"),
        Err(_) => warn!("federation did not answer the deregistration in time"),
    }
}

async fn register(fed: &mesh_node::fed::Target, ep: &Endpoint) -> anyhow::Result<()> {
    RegistrationClient::new(fed.channel().await?)
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(ep.into()),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(())
}
