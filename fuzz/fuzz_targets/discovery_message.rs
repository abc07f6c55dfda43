//! Fuzzes the Discovery protocol on the receiving side: bytes are
//! prost-decoded as `mesh_api::v1::DiscoveryResponse`s and handed, as
//! `mesh_node::discovery` does on a stream (reset on the first snapshot
//! chunk, apply, publish at the last chunk or after a delta), to both real
//! sinks: the agent's (`mesh_agent::table::Sink`: endpoints, clusters,
//! policy documents, weights, trust bundle into a routing table) and the
//! gateway's (`gateway::discovery::Client`: route table, the same path as
//! its saved state file). The tables built are then queried. The same bytes
//! are also decoded as a `DiscoveryRequest` (what the federation reads).
//!
//! Input: a control byte, then either one message (control bit 0 clear) or
//! length-delimited messages (set).
//!
//! Properties: never a panic; decoded messages re-encode to the same
//! message; every endpoint, endpoint reference and cluster the sinks accept
//! (`mesh_core::convert::FromApi`) converts back to a wire message that
//! converts to the same value; every refused item is reported once at most.
#![no_main]

use arc_swap::ArcSwap;
use clap::Parser as _;
use libfuzzer_sys::fuzz_target;
use mesh_api::v1 as api;
use mesh_core::cluster::ClusterInfo;
use mesh_core::convert::FromApi;
use mesh_core::endpoint::{Endpoint, EndpointKey};
use mesh_core::name::ClusterName;
use mesh_core::service::ServiceKey;
use mesh_node::discovery::Sink as _;
use prost::Message as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

/// Runs a future that never waits (no DNS resolver, no state file).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("publish waited"),
    }
}

fn agent_config() -> &'static mesh_agent::config::Config {
    static CFG: OnceLock<mesh_agent::config::Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let args = mesh_agent::config::Args::try_parse_from([
            "fedmesh-agent", "--cluster", "c1", "--region", "us-east", "--zone", "us-east-1a",
            "--namespace", "default", "--service", "productpage", "--app", "127.0.0.1:9080",
            "--plaintext", "--federation", "http://127.0.0.1:15010",
        ])
        .expect("agent flags");
        mesh_agent::config::Config::from_args(&args).expect("agent config")
    })
}

struct Agent {
    sink: mesh_agent::table::Sink,
    table: Arc<ArcSwap<mesh_agent::table::Table>>,
}

fn agent() -> Agent {
    let cfg = agent_config();
    let table = Arc::new(ArcSwap::from_pointee(mesh_agent::table::Table::empty(cfg)));
    let metrics = Arc::new(mesh_agent::metrics::Metrics::new(&mut prometheus_client::registry::Registry::default()));
    let (trust, _rx) = mesh_agent::tls::TrustLink::new();
    let sink = mesh_agent::table::Sink::new(cfg, table.clone(), Arc::new(AtomicBool::new(false)), metrics)
        .with_trust(trust);
    Agent { sink, table }
}

struct Gateway {
    client: gateway::discovery::Client,
    table: Arc<ArcSwap<gateway::route::Table>>,
}

fn gateway() -> Gateway {
    let c1 = ClusterName::new("c1").expect("cluster name");
    let table = Arc::new(ArcSwap::from_pointee(gateway::route::Table::default()));
    let builder = gateway::route::Builder::new(c1.clone(), &Default::default());
    let target = mesh_node::fed::Target { url: "https://127.0.0.1:15010".into(), tls: None };
    let client = gateway::discovery::Client::new(target, c1, builder, table.clone(), Arc::new(AtomicBool::new(false)), None);
    Gateway { client, table }
}

/// A request as the agent's router sees it.
struct Req(u16);

impl mesh_core::policy::RequestAttrs for Req {
    fn method(&self) -> &str { "GET" }
    fn path(&self) -> &str { "/reviews/1" }
    fn authority(&self) -> &str { "reviews:9080" }
    fn header(&self, name: &str) -> Option<&str> { (name == "end-user").then_some("jason") }
    fn query_param(&self, _: &str) -> Option<&str> { None }
    fn port(&self) -> u16 { self.0 }
}

impl mesh_core::policy::AuthzRequest for Req {
    fn source_principal(&self) -> Option<&str> { Some("spiffe://cluster.local/ns/default/sa/productpage") }
    fn source_namespace(&self) -> Option<&str> { Some("default") }
    fn source_cluster(&self) -> Option<&str> { Some("c2") }
    fn source_ip(&self) -> Option<IpAddr> { Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))) }
    fn method(&self) -> &str { "GET" }
    fn path(&self) -> &str { "/reviews/1" }
    fn host(&self) -> &str { "reviews" }
    fn destination_port(&self) -> u16 { self.0 }
    fn header(&self, _: &str) -> Option<&str> { None }
}

/// What the sinks' conversions accept converts back to itself.
fn check_conversions(msg: &api::DiscoveryResponse, services: &mut Vec<(ServiceKey, u16)>) {
    for c in &msg.clusters {
        if let Some(Ok(info)) = c.info.clone().map(|i| ClusterInfo::from_api(i, "cluster")) {
            let back = ClusterInfo::from_api(api::ClusterInfo::from(&info), "cluster");
            assert_eq!(back.as_ref(), Ok(&info), "cluster does not round-trip");
        }
    }
    for e in &msg.endpoints {
        if let Ok(ep) = Endpoint::from_api(e.clone(), "endpoint") {
            let back = Endpoint::from_api(api::Endpoint::from(&ep), "endpoint");
            assert_eq!(back.as_ref(), Ok(&ep), "endpoint does not round-trip");
            if services.len() < 8 {
                let port = ep.ports.first().map_or(80, |p| p.number.get());
                services.push((ep.service.clone(), port));
            }
        }
    }
    for r in &msg.removed_endpoints {
        if let Ok(k) = EndpointKey::from_api(r.clone(), "removed_endpoint") {
            let back = EndpointKey::from_api(api::EndpointRef::from(&k), "removed_endpoint");
            assert_eq!(back.as_ref(), Ok(&k));
        }
    }
}

fn items(m: &api::DiscoveryResponse) -> usize {
    usize::from(m.trust.is_some())
        + m.clusters.len()
        + m.endpoints.len()
        + m.removed_endpoints.len()
        + m.exports.len()
        + m.policies.len()
        + m.weights.len()
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, mut bytes)) = data.split_first() else { return };

    // The federation's side: a subscriber's requests.
    if let Ok(req) = api::DiscoveryRequest::decode(bytes) {
        assert_eq!(api::DiscoveryRequest::decode(req.encode_to_vec().as_slice()).ok(), Some(req.clone()));
        if let Some(api::discovery_request::Request::Subscribe(s)) = req.request {
            let _ = (ClusterName::new(&s.cluster), mesh_core::name::Namespace::new(&s.namespace));
        }
    }

    let mut msgs = Vec::new();
    if ctl & 1 == 0 {
        match api::DiscoveryResponse::decode(bytes) {
            Ok(m) => msgs.push(m),
            Err(_) => return,
        }
    } else {
        while !bytes.is_empty() && msgs.len() < 16 {
            match api::DiscoveryResponse::decode_length_delimited(&mut bytes) {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
    }
    if msgs.is_empty() {
        return;
    }

    let mut agent = agent();
    let mut gw = gateway();
    let mut services = Vec::new();
    for msg in msgs {
        let again = api::DiscoveryResponse::decode(msg.encode_to_vec().as_slice());
        assert_eq!(again.as_ref().ok(), Some(&msg), "re-encoded message differs");
        check_conversions(&msg, &mut services);
        let (version, chunk, n) = (msg.version, msg.snapshot, items(&msg));
        if chunk.is_some_and(|c| c.index == 0) {
            agent.sink.reset();
            gw.client.reset();
        }
        let errors = agent.sink.apply(msg.clone());
        assert!(errors.len() <= n, "{} errors for {n} items", errors.len());
        if !errors.is_empty() {
            assert!(!mesh_node::discovery::nack_reason(&errors).is_empty());
        }
        let errors = gw.client.apply(msg);
        assert!(errors.len() <= n, "{} errors for {n} items", errors.len());
        if chunk.is_some_and(|c| !c.last) {
            continue;
        }
        now(agent.sink.publish(version));
        now(gw.client.publish(version));
    }

    // Query what was built, as a request would.
    let t = agent.table.load();
    let _ = (t.allow_any(), t.jwt_rules().len(), t.mtls_mode(9080));
    let _ = t.authorize(&Req(9080));
    for (s, port) in &services {
        let _ = (t.knows(s), t.egress_allows(s), t.weights(s));
        if let Some(route) = t.route_for(s, Some(*port), &Req(*port)) {
            let _ = format!("{route:?}");
        }
        let _ = t.endpoints(s, None, Some(*port), true);
        let _ = t.endpoints(s, Some("v1"), None, false);
        let _ = t.policy(s, None, *port);
        let _ = t.mtls_mode(*port);
        let _ = t.authorize(&Req(*port));
        let sni = mesh_core::sni::SniName::new(s.clone(), std::num::NonZeroU16::new(*port).unwrap_or(std::num::NonZeroU16::MIN), None).encode();
        let _ = t.identities_for_sni(&sni);
        let g = gw.table.load();
        let _ = (g.route(&sni).is_ok(), g.len());
    }
});
