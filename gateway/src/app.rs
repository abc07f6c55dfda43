//! Builds and runs a gateway: the TLS listener (data plane), the admin
//! listener and the federation client (control plane). Used by `main.rs`
//! and the tests.

use crate::config::Config;
use crate::discovery;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::route::{Builder, Table};
use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_node::admin::Admin;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// A running gateway.
pub struct Bound {
    /// Where the TLS listener is bound.
    pub addr: SocketAddr,
    /// Where the admin listener is bound.
    pub admin: Option<SocketAddr>,
    /// The routing table in force.
    pub routes: Arc<ArcSwap<Table>>,
    proxy: Arc<Proxy>,
    /// Stops the accept loop.
    stop: watch::Sender<bool>,
    /// Closes open connections.
    force: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    drain_deadline: Duration,
    accept: JoinHandle<()>,
    control: Vec<JoinHandle<()>>,
    tracing: Option<crate::trace::Tracing>,
}

/// Binds the listeners and starts serving. Data-plane tasks run on the
/// caller's runtime; control-plane tasks (admin, federation client) on `control`.
pub async fn build(cfg: &Config, control: &Handle) -> anyhow::Result<Bound> {
    // Bind everything first: a taken port fails start-up before anything runs.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("bind the gateway listener on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let admin_listener = match cfg.admin {
        Some(a) => {
            let l = std::net::TcpListener::bind(a)
                .with_context(|| format!("bind the admin listener on {a}"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let admin_addr = admin_listener
        .as_ref()
        .map(std::net::TcpListener::local_addr)
        .transpose()?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let builder = Builder::new(cfg.cluster.clone(), &cfg.routes);
    let routes = Arc::new(ArcSwap::from_pointee(builder.table()));
    // Static routes alone make a gateway ready; with a federation, the first table does.
    let ready = Arc::new(AtomicBool::new(cfg.federation.is_none()));
    let draining = Arc::new(AtomicBool::new(false));

    let mut control_tasks = Vec::new();
    if let Some(l) = admin_listener {
        let admin = Arc::new(Admin {
            registry,
            ready: ready.clone(),
            not_ready: "no routes yet",
            draining: draining.clone(),
        });
        control_tasks.push(control.spawn(async move {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => admin.serve(l).await,
                Err(e) => warn!("admin listener: {e}"),
            }
        }));
    }
    if let Some(url) = &cfg.federation {
        let target = mesh_node::fed::Target {
            url: url.clone(),
            tls: cfg.federation_auth.as_ref().map(|a| a.tls.clone()),
        };
        if let Some(auth) = &cfg.federation_auth {
            let e = mesh_node::enroll::Enrollment {
                target: target.clone(),
                cluster: cfg.cluster.to_string(),
                identity: auth.identity.clone(),
            };
            // In the background: a gateway restarted while the federation
            // is away routes from its state file meanwhile (static stability).
            let credential = auth.credential.clone();
            control_tasks.push(control.spawn(async move {
                let held = loop {
                    let attempt = match credential.read() {
                        Ok(c) => mesh_node::enroll::enroll(&e, c).await,
                        Err(err) => Err(err),
                    };
                    match attempt {
                        Ok(h) => break h,
                        Err(err) => {
                            warn!("cannot enroll with the federation yet, retrying in 5s: {err:#}");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    }
                };
                // A join token is single use: only a Kubernetes token enrolls again.
                let again: Arc<
                    dyn Fn() -> Option<mesh_api::v1::sign_certificate_request::Credential>
                        + Send
                        + Sync,
                > = Arc::new(move || match &credential {
                    crate::config::Credential::KubernetesToken(_) => credential.read().ok(),
                    crate::config::Credential::JoinToken(_) => None,
                });
                mesh_node::enroll::keep_renewed(e, held, again).await;
            }));
        }
        // Other clusters' gateways known by name: resolved in a task of
        // their own, for attributing connections and for the probes.
        let dns = match mesh_node::dns::Dns::new(cfg.dns_server) {
            Ok(d) => {
                control_tasks.push(control.spawn(d.clone().run()));
                Some(d)
            }
            Err(e) => {
                tracing::warn!("no DNS resolver for gateway names: {e:#}");
                None
            }
        };
        let client = discovery::Client::new(
            target.clone(),
            cfg.cluster.clone(),
            builder,
            routes.clone(),
            ready.clone(),
            cfg.state_file.clone(),
        )
        .with_dns(dns.clone());
        let view = client.probe_view();
        control_tasks.push(control.spawn(client.run()));
        // Like every control task, the prober ends when the gateway drains.
        // The gateway keeps its cluster live (a cluster an operator added
        // with `meshctl cluster add` has nothing else to).
        control_tasks.push(control.spawn(mesh_node::fed::heartbeat(
            target.clone(),
            cfg.cluster.to_string(),
        )));
        control_tasks.push(control.spawn(crate::probe::run(
            target,
            cfg.cluster.clone(),
            view,
            dns,
            cfg.probe_interval,
        )));
    }

    let tracing = match &cfg.otlp_endpoint {
        Some(url) => {
            // The exporter runs on the control runtime, off the data plane.
            let _rt = control.enter();
            Some(
                crate::trace::Tracing::new(url, cfg.cluster.as_str())
                    .with_context(|| format!("OTLP exporter for {url}"))?,
            )
        }
        None => None,
    };
    let mut proxy = Proxy::new(cfg, routes.clone(), metrics);
    proxy.tracing = tracing.clone();
    let proxy = Arc::new(proxy);
    let (stop, stop_rx) = watch::channel(false);
    let (force, force_rx) = watch::channel(false);
    let accept = tokio::spawn(proxy.clone().run(listener, stop_rx, force_rx));
    Ok(Bound {
        addr,
        admin: admin_addr,
        routes,
        proxy,
        stop,
        force,
        draining,
        drain_deadline: cfg.drain_deadline,
        accept,
        control: control_tasks,
        tracing,
    })
}

impl Bound {
    /// Connections open now.
    pub fn open_connections(&self) -> u32 {
        self.proxy.open()
    }

    /// Drains: stops accepting at once (and reports unready), lets open
    /// connections finish up to the drain deadline, then closes the rest.
    /// Returns how many had to be closed.
    pub async fn drain(self) -> u32 {
        self.draining.store(true, Ordering::Release);
        self.stop.send_replace(true);
        let _ = self.accept.await;
        let open = self.proxy.open();
        info!(open, deadline = ?self.drain_deadline, "draining: no new connections");
        let drained = tokio::time::timeout(self.drain_deadline, wait_closed(&self.proxy))
            .await
            .is_ok();
        let mut forced = 0;
        if !drained {
            forced = self.proxy.open();
            warn!(
                forced,
                "drain deadline passed; closing the remaining connections"
            );
            self.force.send_replace(true);
            // Connections select on `force` and end promptly.
            let _ = tokio::time::timeout(Duration::from_secs(5), wait_closed(&self.proxy)).await;
        }
        for t in self.control {
            t.abort();
        }
        // The connection spans are flushed.
        if let Some(t) = self.tracing {
            t.shutdown().await;
        }
        forced
    }
}

impl Bound {
    /// Stops at once, as a crashed gateway would: no new connection is
    /// accepted and every open one is closed now, without a drain.
    pub async fn kill(self) {
        self.draining.store(true, Ordering::Release);
        self.stop.send_replace(true);
        self.force.send_replace(true);
        let _ = self.accept.await;
        for t in self.control {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), wait_closed(&self.proxy)).await;
        if let Some(t) = self.tracing {
            t.shutdown().await;
        }
    }
}

/// Completes when no connection is open.
async fn wait_closed(p: &Proxy) {
    while p.open() > 0 {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
