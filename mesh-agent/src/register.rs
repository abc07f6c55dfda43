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
/// marks it draining, waits `drain`, and deregisters it. The federation
/// gives the endpoint a lease; it is renewed every third of its TTL, so the
/// endpoint leaves rotation soon after this agent dies.
pub async fn run(
    fed: mesh_node::fed::Target,
    mut endpoint: Endpoint,
    probe: Probe,
    interval: Duration,
    health: watch::Sender<Health>,
    mut stop: watch::Receiver<bool>,
) {
    let mut registered: Option<(Health, tokio::time::Instant)> = None;
    // When the lease is next due for renewal.
    let mut renew_at: Option<(tokio::time::Instant, Duration)> = None;
    let mut client = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let renew = async {
            match renew_at {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            () = renew => {
                let Some((_, ttl)) = renew_at else { continue };
                match renew_lease(&fed, &mut client, &endpoint).await {
                    Ok(ttl) => renew_at = Some((tokio::time::Instant::now() + ttl / 3, ttl)),
                    // Lapsed, or refused in a way a retry cannot mend (the
                    // endpoint taken away, its cluster gone): register again.
                    Err(s) if matches!(
                        s.code(),
                        tonic::Code::NotFound
                            | tonic::Code::PermissionDenied
                            | tonic::Code::FailedPrecondition
                            | tonic::Code::InvalidArgument
                    ) => {
                        warn!("the endpoint's lease is not renewed; registering it again: {}", s.message());
                        registered = None;
                        renew_at = None;
                    }
                    Err(s) => {
                        // The federation is away: try again soon, well
                        // before the lease runs out.
                        warn!(url = %fed.url, "cannot renew the endpoint's lease: {}", s.message());
                        renew_at = Some((tokio::time::Instant::now() + (ttl / 10).max(Duration::from_millis(200)), ttl));
                    }
                }
                if registered.is_some() {
                    continue;
                }
            }
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
                Ok(lease) => {
                    if registered.is_none() {
                        info!(health = h.as_str(), lease = ?lease, "endpoint registered");
                    }
                    registered = Some((h, tokio::time::Instant::now()));
                    renew_at = lease.map(|ttl| (tokio::time::Instant::now() + ttl / 3, ttl));
                }
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

/// Registers the endpoint; its lease's TTL, when it has one.
async fn register(fed: &mesh_node::fed::Target, ep: &Endpoint) -> anyhow::Result<Option<Duration>> {
    let r = RegistrationClient::new(fed.channel().await?)
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(ep.into()),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    Ok((r.lease_ttl_seconds > 0).then(|| Duration::from_secs(r.lease_ttl_seconds.into())))
}

/// Renews the endpoint's lease over `client` (connected when `None`, and
/// dropped when the connection fails); the lease's TTL.
async fn renew_lease(
    fed: &mesh_node::fed::Target,
    client: &mut Option<RegistrationClient<tonic::transport::Channel>>,
    ep: &Endpoint,
) -> Result<Duration, tonic::Status> {
    let c = match client {
        Some(c) => c,
        None => {
            let channel = fed
                .channel()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
            client.insert(RegistrationClient::new(channel))
        }
    };
    let r = c
        .renew_endpoint(api::RenewEndpointRequest {
            endpoint: Some((&ep.key()).into()),
        })
        .await;
    if let Err(s) = &r {
        if matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unauthenticated
        ) {
            *client = None;
        }
    }
    Ok(Duration::from_secs(
        r?.into_inner().lease_ttl_seconds.max(1).into(),
    ))
}
