//! The outbound listener: the application's requests, routed by the
//! VirtualService of their host, balanced over endpoints by the
//! DestinationRule and locality, retried, timed out, rate limited, with
//! faults injected and traffic mirrored as configured.
//!
//! The application addresses a service explicitly (`Host: reviews.default:9080`,
//! or absolute-form as to an HTTP proxy), or its connections are redirected
//! here by iptables and the destination comes from `SO_ORIGINAL_DST`.

use crate::body::{self, Body};
use crate::lb::{self, Algorithm, Candidate};
use crate::metrics::{
    FaultLabels, Label, LatencyLabels, LimitLabels, Metrics, RequestLabels, ServiceLabels,
};
use crate::pool::{Pool, Proto, SendError, Target};
use crate::ratelimit::Limiter;
use crate::reason::Reason;
use crate::route::{self, Abort, Dest, Lb, Route};
use crate::table::{split_authority, Named, Prepared, ResolvedEndpoint, Table};
use crate::trace::ReqSpan;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::server::graceful::GracefulShutdown;
use mesh_core::name::{ClusterName, Namespace};
use mesh_core::policy::{RequestAttrs, StringMatch};
use mesh_core::service::ServiceKey;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

mod fault;
mod forward;
mod limits;
mod mirror;
mod retry;

pub use forward::origin_form;
use forward::{build_request, clone_parts, Call, Payload};

/// Request bodies up to this size are kept so a retry or a mirror can
/// resend them; larger or unsized streaming bodies are sent once.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// The outbound proxy.
pub struct Outbound {
    /// This workload's namespace: bare host names resolve in it.
    pub namespace: Namespace,
    /// Routing state, swapped whole on every config version.
    pub table: Arc<ArcSwap<Table>>,
    /// Upstream connections.
    pub pool: Pool,
    /// Host statistics across config versions.
    pub hosts: lb::Hosts,
    /// Per destination service.
    pub limiter: Limiter<ServiceKey>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Round-robin cursor.
    pub rr: AtomicUsize,
    /// Whether to use TLS between agents.
    pub tls: bool,
    /// This workload's labels (`sourceLabels` matches them).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Requests in flight per destination (service, subset), for
    /// `http2MaxRequests`.
    pub inflight: std::sync::Mutex<std::collections::HashMap<DestKey, Arc<AtomicUsize>>>,
    /// Span export, when configured.
    pub tracer: Option<crate::trace::Tracer>,
    /// Retry budgets per destination service.
    pub budgets: crate::retry_budget::Budgets,
}

/// A destination: service and subset.
pub type DestKey = (ServiceKey, Option<String>);

/// Request attributes for VirtualService matching.
struct Attrs<'a> {
    parts: &'a Parts,
    authority: &'a str,
    port: u16,
    /// The caller is this workload: its namespace and labels.
    namespace: &'a str,
    labels: &'a std::collections::BTreeMap<String, String>,
}

impl RequestAttrs for Attrs<'_> {
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }
    fn path(&self) -> &str {
        self.parts.uri.path()
    }
    fn authority(&self) -> &str {
        self.authority
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn query_param(&self, name: &str) -> Option<&str> {
        self.parts.uri.query().and_then(|q| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then_some(v)
            })
        })
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn source_namespace(&self) -> Option<&str> {
        Some(self.namespace)
    }
    fn source_labels(&self) -> Option<&std::collections::BTreeMap<String, String>> {
        Some(self.labels)
    }
}

impl Outbound {
    /// Accepts until `stop`, then drains for up to `deadline`.
    /// `transparent`: read the original destination of each connection.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        stop: watch::Receiver<bool>,
        deadline: Duration,
        transparent: bool,
    ) -> bool {
        let graceful = GracefulShutdown::new();
        let mut stop_accept = stop.clone();
        while let Some((tcp, peer)) =
            crate::serve::accept("outbound", &listener, &mut stop_accept).await
        {
            let orig = if transparent {
                crate::transparent::original_dst(&tcp)
            } else {
                None
            };
            if let Some(o) = orig {
                let table = self.table.load_full();
                // Opaque TCP to a mesh service, or out of the mesh entirely:
                // no HTTP on this connection.
                let tcp_dest = table.tcp_service_at(o);
                if tcp_dest.is_some() || table.service_at(o).is_none() {
                    let this = self.clone();
                    tokio::spawn(async move { this.tcp(tcp, o, tcp_dest, &table).await });
                    continue;
                }
            }
            let this = self.clone();
            crate::serve::watched(
                tcp,
                move |req| this.clone().handle(req, peer, orig),
                graceful.watcher(),
            );
        }
        drop(listener);
        crate::serve::drain("outbound", stop, graceful, deadline).await
    }

    /// Carries an opaque TCP connection: over mTLS to an endpoint of the
    /// service (another endpoint if one refuses), or, for a destination
    /// outside the mesh, straight to it when the Sidecar allows any.
    async fn tcp(
        &self,
        mut client: tokio::net::TcpStream,
        orig: SocketAddr,
        dest: Option<(ServiceKey, u16)>,
        table: &Table,
    ) {
        let Some((svc, port)) = dest else {
            if !table.allow_any() {
                debug!(%orig, "REGISTRY_ONLY: closing a connection to a destination outside the mesh");
                return;
            }
            match tokio::net::TcpStream::connect(orig).await {
                Ok(mut up) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
                Err(e) => debug!(%orig, "passthrough: {e}"),
            }
            return;
        };
        if !table.egress_allows(&svc) {
            debug!(%svc, "egress denied by the Sidecar; closing");
            return;
        }
        let Some(prep) = table.prepared(&self.hosts, &svc, None, Some(port), self.tls) else {
            warn!(%svc, port, "no healthy endpoint for a TCP connection");
            return;
        };
        let (spread, policy) = (prep.spread, &prep.policy);
        let cands = prep.candidates(prep.draw());
        let alg = match policy.lb {
            Lb::Simple(a) => a,
            _ => Algorithm::LeastRequest,
        };
        let mut tried = Vec::new();
        for _ in 0..3 {
            let Some(c) = lb::pick(cands, alg, &tried, &[], &self.rr, &spread) else {
                break;
            };
            tried.push(c.key);
            match self
                .pool
                .dial_tcp(c.item.addr, c.item.sni.as_deref(), policy.pool)
                .await
            {
                Ok(mut up) => {
                    c.stats.active.fetch_add(1, Ordering::Relaxed);
                    let r = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    c.stats.active.fetch_sub(1, Ordering::Relaxed);
                    debug!(%svc, ?r, "TCP connection closed");
                    return;
                }
                Err(e) => {
                    self.metrics
                        .connect_errors
                        .get_or_create(&ServiceLabels {
                            direction: "outbound",
                            service: svc.to_string().into(),
                        })
                        .inc();
                    debug!(%svc, "TCP connect: {e}");
                }
            }
        }
        warn!(%svc, "no endpoint accepted a TCP connection");
    }

    /// Routes one request and answers it.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        orig: Option<SocketAddr>,
    ) -> Response<Body> {
        let start = Instant::now();
        let mut span = ReqSpan::start(self.tracer.as_ref(), &mut req, SpanKind::Client, || {
            "outbound".into()
        });
        let mut seen = Seen::default();
        let (resp, service) = self.route(req, peer, orig, &mut span, &mut seen).await;
        span.end(resp.status().as_u16());
        // The labels are names prepared with the table: taking them counts
        // references; only a request that never reached a destination
        // spells its service here.
        let service = seen.service.unwrap_or_else(|| {
            Label::from(service.map_or_else(|| "unknown".to_string(), |n| n.service.to_string()))
        });
        let latency = LatencyLabels {
            direction: "outbound",
            service,
            source_cluster: self.table.load().cluster_label().clone(),
            destination_cluster: seen.answered_by.unwrap_or_else(|| Label::from("none")),
        };
        self.metrics
            .latency
            .get_or_create(&latency)
            .observe(start.elapsed().as_secs_f64());
        self.metrics.load.sent(&latency.service);
        self.metrics
            .requests
            .get_or_create(&RequestLabels::of(
                latency,
                resp.status().as_u16(),
                Reason::of(&resp),
            ))
            .inc();
        resp
    }

    async fn route(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        orig: Option<SocketAddr>,
        span: &mut ReqSpan,
        seen: &mut Seen,
    ) -> (Response<Body>, Option<Arc<Named>>) {
        let table = self.table.load_full();
        let (mut parts, body) = req.into_parts();
        // The host as the request spelled it: the Host header's value is
        // shared, not copied.
        let authority_value = match parts.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => parts.headers.get(HOST).cloned(),
        };
        let authority = authority_value.as_ref().and_then(|h| h.to_str().ok());
        // Transparent capture: the original destination names the service
        // when the Host header does not.
        let found = authority.and_then(|a| table.named(a)).or_else(|| {
            orig.and_then(|o| {
                let service = table.service_at(o)?;
                Some(Arc::new(Named {
                    service,
                    port: Some(o.port()),
                    direct: None,
                }))
            })
        });
        let Some(named) = found else {
            let what = authority.unwrap_or("(no Host header)");
            return (
                body::local_reply(
                    StatusCode::BAD_GATEWAY,
                    Reason::UnknownService,
                    &format!("no service {what} in the mesh"),
                ),
                None,
            );
        };
        let (svc, port) = (&named.service, named.port);
        if span.recording() {
            span.rename(match port {
                Some(p) => format!("{}.{}:{p}", svc.name, svc.namespace),
                None => format!("{}.{}", svc.name, svc.namespace),
            });
            span.attrs(|| vec![KeyValue::new("fedmesh.service", svc.to_string())]);
        }
        if !table.egress_allows(svc) {
            return (
                body::local_reply(
                    StatusCode::BAD_GATEWAY,
                    Reason::EgressDenied,
                    &format!("{svc} is not among this workload's Sidecar egress hosts"),
                ),
                Some(named.clone()),
            );
        }
        if let Err(wait) = self.limiter.check(svc) {
            self.metrics
                .rate_limited
                .get_or_create(&LimitLabels {
                    direction: "outbound",
                    key: svc.to_string().into(),
                })
                .inc();
            return (crate::ratelimit::refused(svc, wait), Some(named.clone()));
        }
        let authority: std::borrow::Cow<'_, str> =
            authority.map_or_else(|| svc.host().into(), Into::into);
        let attrs = Attrs {
            parts: &parts,
            authority: &authority,
            port: port.unwrap_or(0),
            namespace: self.namespace.as_str(),
            labels: &self.labels,
        };
        let routed;
        let route: &Route = match &named.direct {
            Some(r) => r,
            None => match table.route_for(svc, port, &attrs) {
                Some(r) => {
                    routed = r;
                    &routed
                }
                None => {
                    return (
                        body::local_reply(
                            StatusCode::NOT_FOUND,
                            Reason::NoRoute,
                            &format!("no route of the VirtualService for {svc} matches"),
                        ),
                        Some(named.clone()),
                    )
                }
            },
        };
        if let Some(f) = &route.fault {
            // Rare: boxed, so that every request's future stays small.
            let injected = Box::pin(fault::inject(f, |kind| self.count_fault(svc, kind))).await;
            if let Some(r) = injected {
                return (r, Some(named.clone()));
            }
        }
        let Some(dest) = route.pick_dest() else {
            return (
                body::local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::NoRoute,
                    "the route has no destination",
                ),
                Some(named.clone()),
            );
        };
        if let Some(rw) = &route.rewrite {
            // The prefix this request matched on, if it matched on one.
            let matched_prefix = route
                .spec
                .as_ref()
                .and_then(|r| r.r#match.iter().find(|m| m.matches(&attrs)))
                .and_then(|m| match &m.uri {
                    Some(StringMatch::Prefix(p)) => Some(p.clone()),
                    _ => None,
                });
            rewrite(rw, matched_prefix.as_deref(), &mut parts);
        }
        let downstream_h2 = parts.version == Version::HTTP_2;
        body::strip_hop_by_hop(&mut parts.headers);
        route.request_headers.apply(&mut parts.headers);
        dest.request_headers.apply(&mut parts.headers);
        // Keep the body when a retry or a mirror may need it again.
        let wants_replay = route.retries.attempts > 0 || route.mirror.is_some();
        let fits = hyper::body::Body::size_hint(&body)
            .upper()
            .is_some_and(|n| n <= REPLAY_LIMIT);
        let payload = if wants_replay && fits {
            match Limited::new(body, usize::try_from(REPLAY_LIMIT).unwrap_or(usize::MAX))
                .collect()
                .await
            {
                Ok(c) => Payload::Replay(c.to_bytes()),
                Err(e) => {
                    return (
                        body::local_reply(
                            StatusCode::BAD_REQUEST,
                            Reason::BadRequest,
                            &format!("reading the request body: {e}"),
                        ),
                        Some(named.clone()),
                    )
                }
            }
        } else {
            Payload::Stream(Some(body))
        };
        if let (Some((m, frac)), Payload::Replay(bytes)) = (&route.mirror, &payload) {
            if fastrand::f64() < *frac {
                self.mirror(&table, m, &parts, &authority, port, bytes.clone(), peer);
            }
        }
        let call = Call {
            table: &table,
            route,
            dest,
            svc,
            port,
            parts,
            payload,
            downstream_h2,
            peer,
        };
        let mut resp = self.forward(call, span, seen).await;
        route.response_headers.apply(resp.headers_mut());
        dest.response_headers.apply(resp.headers_mut());
        (resp, Some(named.clone()))
    }

    /// The usable endpoints of a destination, with its traffic policy.
    fn candidates(
        &self,
        table: &Table,
        dest: &Dest,
        port: Option<u16>,
        parts: &Parts,
        peer: SocketAddr,
    ) -> Option<Selection> {
        let port = dest.port.or(port);
        let prep = table.prepared(
            &self.hosts,
            &dest.service,
            dest.subset.as_deref(),
            port,
            self.tls,
        )?;
        let policy = &prep.policy;
        let alg = match &policy.lb {
            Lb::Simple(a) => *a,
            Lb::Header(h) => hash_or_random(
                parts.headers.get(h.as_str()).map(HeaderValue::as_bytes),
                policy.hash,
            ),
            Lb::Cookie(name) => hash_or_random(cookie(parts, name).map(str::as_bytes), policy.hash),
            Lb::SourceIp => {
                Algorithm::Hash(lb::hash_key(peer.ip().to_string().as_bytes()), policy.hash)
            }
            Lb::Query(q) => hash_or_random(
                parts
                    .uri
                    .query()
                    .and_then(|qs| {
                        qs.split('&').find_map(|kv| {
                            kv.split_once('=').filter(|(k, _)| k == q).map(|(_, v)| v)
                        })
                    })
                    .map(str::as_bytes),
                policy.hash,
            ),
        };
        let ranking = prep.draw();
        Some(Selection { prep, ranking, alg })
    }

    fn target(&self, e: &ResolvedEndpoint, h2: bool) -> Target {
        Target {
            addr: e.addr,
            sni: e.sni.clone(),
            proto: if h2 { Proto::H2 } else { Proto::H1 },
        }
    }
}

/// Endpoints of a destination and how to choose among them, for one
/// request.
struct Selection {
    /// The destination as this table version prepared it.
    prep: Arc<Prepared>,
    /// The ranking the federation's weights drew.
    ranking: usize,
    alg: Algorithm,
}

impl Selection {
    fn cands(&self) -> &[Candidate<ResolvedEndpoint>] {
        self.prep.candidates(self.ranking)
    }
}

/// What a request's metrics take from its routing: the service's label
/// and the cluster that answered, as prepared with the table.
#[derive(Default)]
struct Seen {
    service: Option<Label>,
    answered_by: Option<Label>,
}

fn hash_or_random(v: Option<&[u8]>, kind: crate::hashring::Kind) -> Algorithm {
    v.map_or(Algorithm::Random, |v| {
        Algorithm::Hash(lb::hash_key(v), kind)
    })
}

fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Applies a route's rewrite: the path (the prefix the request matched on,
/// `matched_prefix`, or the whole path) and the authority.
fn rewrite(rw: &route::Rewrite, matched_prefix: Option<&str>, parts: &mut Parts) {
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    if let Some(u) = rw
        .path(pq, matched_prefix)
        .and_then(|new| new.parse::<Uri>().ok())
    {
        parts.uri = u;
    }
    if let Some(v) = rw
        .authority
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        parts.headers.insert(HOST, v);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The size of what `f` returns, known from its type alone.
    pub(crate) fn returned_size<A, R>(_: impl Fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_rewrite_replaces_the_matched_prefix_or_the_path_and_the_authority() {
        let (mut parts, ()) = Request::get("/v1/reviews?x=1")
            .header(HOST, "reviews")
            .body(())
            .unwrap_or_default()
            .into_parts();
        let rw = route::Rewrite {
            uri: Some("/v2".into()),
            authority: Some("ratings.default".into()),
        };
        rewrite(&rw, Some("/v1"), &mut parts);
        assert_eq!(parts.uri, "/v2/reviews?x=1");
        assert_eq!(parts.headers[HOST], "ratings.default");
        let only_path = route::Rewrite {
            uri: Some("/other".into()),
            authority: None,
        };
        rewrite(&only_path, None, &mut parts);
        assert_eq!(parts.uri, "/other?x=1");
        assert_eq!(
            parts.headers[HOST], "ratings.default",
            "the authority is kept"
        );
    }

    #[test]
    fn the_request_future_stays_small() {
        // A request's future is boxed per request (crate::serve), and the
        // rare paths inside it (connecting, waiting for a connection,
        // faults) are boxed in turn: it stays a few KB.
        let n = returned_size(
            |(o, r, p, d): (
                Arc<Outbound>,
                Request<Incoming>,
                SocketAddr,
                Option<SocketAddr>,
            )| { o.handle(r, p, d) },
        );
        println!("outbound: {n} bytes per request future");
        assert!(n <= OUTBOUND_FUTURE_MAX, "{n} bytes");
    }

    /// The bound on the outbound request future, as the test profile lays
    /// it out.
    const OUTBOUND_FUTURE_MAX: usize = 10 * 1024;
}
