//! Builds and runs an agent: binds its listeners, subscribes to the
//! federation, registers the workload, and drains on request. Used by
//! `main.rs` and by the tests.

use crate::config::{Capture, Config, Tls};
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::pool::Pool;
use crate::ratelimit::Limiter;
use crate::register::{self, Probe};
use crate::table::{Sink, Table};
use crate::tls::MeshTls;
use anyhow::Context as _;
use arc_swap::ArcSwap;
use mesh_api::v1 as api;
use mesh_core::endpoint::{Endpoint, Health, Port};
use mesh_node::admin::Admin;
use mesh_node::discovery::Subscription;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Connect timeout to upstreams when no DestinationRule sets one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running agent.
pub struct Bound {
    /// Outbound listener address.
    pub outbound: SocketAddr,
    /// Inbound listener address.
    pub inbound: SocketAddr,
    /// Admin listener address.
    pub admin: Option<SocketAddr>,
    /// The routing table in use (tests read it).
    pub table: Arc<ArcSwap<Table>>,
    /// Health of the workload as the probe last saw it.
    pub health: watch::Receiver<Health>,
    stop: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    listeners: Vec<JoinHandle<bool>>,
    background: Vec<JoinHandle<()>>,
    registrar: JoinHandle<()>,
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Binds everything and starts serving.
pub async fn build(cfg: &Config) -> anyhow::Result<Bound> {
    let table = Arc::new(ArcSwap::from_pointee(Table::empty(cfg)));
    // A server must hold an identity the federation lists for the service
    // the connection is for, read from the config in use at the handshake.
    let expect: crate::tls::ExpectedIdentities = {
        let table = table.clone();
        Arc::new(move |sni: &str| table.load().identities_for_sni(sni))
    };
    let mut renewal = None;
    let tls: Option<crate::tls::SharedTls> =
        match &cfg.tls {
            Tls::Files { cert, key, ca } => Some(Arc::new(ArcSwap::from_pointee(
                MeshTls::from_files(cert, key, ca, Some(expect), &cfg.identity.trust_domain)?,
            ))),
            Tls::JoinToken(_) | Tls::KubernetesToken(_) => {
                let cred = crate::tls::credential(&cfg.tls)?.context("a token credential")?;
                let enrolled = crate::tls::enroll(cfg, cred, Some(expect.clone())).await?;
                let shared = Arc::new(ArcSwap::from_pointee(enrolled.tls.clone()));
                renewal = Some((enrolled, shared.clone(), expect));
                Some(shared)
            }
            Tls::Plaintext => None,
        };
    // --plaintext with a token: the certificate serves the federation link only.
    let tls = if cfg.plaintext { None } else { tls };
    let outbound_l = tokio::net::TcpListener::bind(cfg.outbound)
        .await
        .with_context(|| format!("bind the outbound listener on {}", cfg.outbound))?;
    let inbound_l = tokio::net::TcpListener::bind(cfg.inbound)
        .await
        .with_context(|| format!("bind the inbound listener on {}", cfg.inbound))?;
    let admin_l = match cfg.admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("bind the admin listener on {a}"))?,
        ),
        None => None,
    };
    let outbound_addr = outbound_l.local_addr()?;
    let inbound_addr = inbound_l.local_addr()?;
    let admin_addr = admin_l.as_ref().map(|l| l.local_addr()).transpose()?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));
    let (stop, stop_rx) = watch::channel(false);

    let mut background = Vec::new();
    let mut trust = crate::tls::TrustLink::default();
    if let Some((enrolled, shared, expect)) = renewal {
        let (link, bundles) = crate::tls::TrustLink::new();
        trust = link.clone();
        background.push(tokio::spawn(crate::tls::manage(
            cfg.clone(),
            enrolled,
            shared,
            Some(expect),
            metrics.clone(),
            link,
            bundles,
        )));
    }
    if let Some(l) = admin_l {
        let admin = Arc::new(Admin {
            registry,
            ready: ready.clone(),
            not_ready: "no config from the federation yet",
            draining: draining.clone(),
        });
        background.push(tokio::spawn(admin.serve(l)));
    }
    let mut sink = Sink::new(cfg, table.clone(), ready.clone(), metrics.clone()).with_trust(trust);
    // Remote clusters' gateways known by name are resolved beside the
    // Discovery stream, so their answers follow while the federation is away.
    match mesh_node::dns::Dns::new(cfg.dns_server) {
        Ok(dns) => {
            background.push(tokio::spawn(dns.clone().run()));
            sink = sink.with_dns(dns);
        }
        Err(e) => warn!("no DNS resolver for gateway names (clusters known only by a gateway name are unreachable): {e:#}"),
    }
    let changes = sink.changes();
    sink.load_state().await;
    let sub = Subscription {
        url: cfg.federation.clone(),
        tls: cfg.federation_tls.clone(),
        subscribe: api::Subscribe {
            node_id: format!("agent~{}~{}", cfg.cluster, cfg.id),
            cluster: cfg.cluster.to_string(),
            kind: api::NodeKind::Agent as i32,
            namespace: cfg.service.namespace.to_string(),
            labels: cfg.labels.clone().into_iter().collect(),
        },
        tick: Duration::from_secs(1),
    };
    background.push(tokio::spawn(async move {
        mesh_node::discovery::run(sub, &mut sink).await;
    }));

    let provider = match &cfg.otlp_endpoint {
        Some(url) => Some(
            crate::trace::provider(
                url,
                cfg.service.name.as_str(),
                cfg.trace_sampling,
                vec![
                    opentelemetry::KeyValue::new(
                        "service.namespace",
                        cfg.service.namespace.to_string(),
                    ),
                    opentelemetry::KeyValue::new("service.instance.id", cfg.id.to_string()),
                    opentelemetry::KeyValue::new("fedmesh.cluster", cfg.cluster.to_string()),
                ],
            )
            .with_context(|| format!("OTLP exporter for {url}"))?,
        ),
        None => None,
    };
    let tracer = provider
        .as_ref()
        .map(|p| crate::trace::Tracer::new(p, cfg.cluster.to_string()));
    let outbound = Arc::new(Outbound {
        namespace: cfg.service.namespace.clone(),
        table: table.clone(),
        pool: Pool::new(tls.clone(), CONNECT_TIMEOUT).marking_upstream(tracer.is_some()),
        hosts: crate::lb::Hosts::default(),
        limiter: Limiter::new(&cfg.outbound_limits),
        metrics: metrics.clone(),
        rr: AtomicUsize::new(0),
        tls: tls.is_some(),
        labels: cfg.labels.clone(),
        inflight: std::sync::Mutex::default(),
        tracer: tracer.clone(),
        budgets: Default::default(),
    });
    let inbound = Arc::new(Inbound {
        app: cfg.app,
        protocol: cfg.protocol,
        identity: cfg.identity.clone(),
        tls,
        pool: Pool::new(None, CONNECT_TIMEOUT),
        limiter: Limiter::new(&cfg.inbound_limits),
        metrics: metrics.clone(),
        service: cfg.service.to_string().into(),
        port: cfg.port.get(),
        table: table.clone(),
        tracer,
        changes,
    });
    let limiters = (outbound.clone(), inbound.clone());
    background.push(tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(60));
        loop {
            t.tick().await;
            limiters.0.limiter.shrink();
            limiters.1.limiter.shrink();
        }
    }));
    let transparent = cfg.capture == Capture::Transparent;
    let listeners = vec![
        tokio::spawn(outbound.run(outbound_l, stop_rx.clone(), cfg.drain_deadline, transparent)),
        tokio::spawn(inbound.run(inbound_l, stop_rx.clone(), cfg.drain_deadline)),
    ];

    let endpoint = Endpoint {
        id: cfg.id.clone(),
        service: cfg.service.clone(),
        cluster: cfg.cluster.clone(),
        address: cfg.address,
        ports: vec![Port {
            name: Some(cfg.protocol.as_str().to_string()),
            number: cfg.port,
            protocol: cfg.protocol,
            target: std::num::NonZeroU16::new(inbound_addr.port()),
        }],
        labels: cfg.labels.clone(),
        locality: cfg.locality.clone(),
        health: Health::Unhealthy,
        identity: Some(cfg.identity.clone()),
    };
    let probe = match &cfg.readiness_path {
        Some(path) => Probe::Http {
            addr: cfg.app,
            path: path.clone(),
        },
        None => Probe::Tcp(cfg.app),
    };
    let fed = mesh_node::fed::Target {
        url: cfg.federation.clone(),
        tls: cfg.federation_tls.clone(),
    };
    background.push(tokio::spawn(crate::load::run(
        fed.clone(),
        endpoint.key(),
        cfg.capacity,
        cfg.load_report_interval,
        metrics.clone(),
        stop_rx.clone(),
    )));
    let (health_tx, health) = watch::channel(Health::Unhealthy);
    let registrar = tokio::spawn(register::run(
        fed,
        endpoint,
        probe,
        cfg.probe_interval,
        health_tx,
        stop_rx,
    ));
    info!(outbound = %outbound_addr, inbound = %inbound_addr, admin = ?admin_addr, "agent listening");
    Ok(Bound {
        outbound: outbound_addr,
        inbound: inbound_addr,
        admin: admin_addr,
        table,
        health,
        stop,
        draining,
        listeners,
        background,
        registrar,
        provider,
    })
}

impl Bound {
    /// Drains: `/ready` turns 503, the endpoint is deregistered, listeners
    /// close, requests in flight finish up to the drain deadline. Returns
    /// whether some connections had to be cut.
    pub async fn drain(self) -> bool {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        self.stop.send_replace(true);
        let _ = self.registrar.await;
        let mut forced = false;
        for l in self.listeners {
            match l.await {
                Ok(f) => forced |= f,
                Err(e) => warn!("listener task: {e}"),
            }
        }
        for b in self.background {
            b.abort();
        }
        // The spans of the drained requests are flushed.
        if let Some(p) = self.provider {
            crate::trace::shutdown(p).await;
        }
        forced
    }
}
