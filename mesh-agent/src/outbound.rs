//! The outbound listener: the application's requests, routed by the
//! VirtualService of their host, balanced over endpoints by the
//! DestinationRule and locality, retried, timed out, rate limited, with
//! faults injected and traffic mirrored as configured.
//!
//! The application addresses a service explicitly (`Host: reviews.default:9080`,
//! or absolute-form as to an HTTP proxy), or its connections are redirected
//! here by iptables and the destination comes from `SO_ORIGINAL_DST`.

use crate::body::{self, Body};
use crate::inbound::reason_of;
use crate::lb::{self, Algorithm, Candidate, Outcome};
use crate::metrics::{
    FaultLabels, Label, LatencyLabels, LimitLabels, Metrics, RequestLabels, ServiceLabels,
};
use crate::pool::{Pool, Proto, SendError, Target};
use crate::ratelimit::{retry_after_secs, Limiter};
use crate::route::{self, Abort, Dest, Lb, Route};
use crate::table::{split_authority, Named, Prepared, ResolvedEndpoint, Table};
use crate::trace::ReqSpan;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, HOST, RETRY_AFTER};
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

/// The outcome of one attempt.
enum Attempt {
    Response(Response<Incoming>),
    Failed(&'static str, String),
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
        let Some(resolved) = table.endpoints(&svc, None, Some(port), self.tls) else {
            warn!(%svc, port, "no healthy endpoint for a TCP connection");
            return;
        };
        let (spread, policy) = (resolved.spread, resolved.policy);
        let cands = self.to_candidates(resolved.endpoints);
        let alg = match policy.lb {
            Lb::Simple(a) => a,
            _ => Algorithm::LeastRequest,
        };
        let mut tried = Vec::new();
        for _ in 0..3 {
            let Some(c) = lb::pick(&cands, alg, &tried, &[], &self.rr, &spread) else {
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
                reason_of(&resp),
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
                    "unknown_service",
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
        if !table.egress_allows(&svc) {
            return (
                body::local_reply(
                    StatusCode::BAD_GATEWAY,
                    "egress_denied",
                    &format!("{svc} is not among this workload's Sidecar egress hosts"),
                ),
                Some(named.clone()),
            );
        }
        if let Err(wait) = self.limiter.check(&svc) {
            self.metrics
                .rate_limited
                .get_or_create(&LimitLabels {
                    direction: "outbound",
                    key: svc.to_string().into(),
                })
                .inc();
            let mut r = body::local_reply(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                &format!("rate limit for {svc} exceeded"),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
            return (r, Some(named.clone()));
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
            None => match table.route_for(&svc, port, &attrs) {
                Some(r) => {
                    routed = r;
                    &routed
                }
                None => {
                    return (
                        body::local_reply(
                            StatusCode::NOT_FOUND,
                            "no_route",
                            &format!("no route of the VirtualService for {svc} matches"),
                        ),
                        Some(named.clone()),
                    )
                }
            },
        };
        if let Some(f) = &route.fault {
            if let Some((d, frac)) = f.delay {
                if fastrand::f64() < frac {
                    self.count_fault(&svc, "delay");
                    tokio::time::sleep(d).await;
                }
            }
            if let Some((a, frac)) = f.abort {
                if fastrand::f64() < frac {
                    self.count_fault(&svc, "abort");
                    return (abort_reply(a), Some(named.clone()));
                }
            }
        }
        let Some(dest) = route.pick_dest() else {
            return (
                body::local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_route",
                    "the route has no destination",
                ),
                Some(named.clone()),
            );
        };
        // Rewrite: the prefix this request matched on (if a prefix), or the
        // whole path; and the authority.
        if let Some(rw) = &route.rewrite {
            let matched_prefix = route
                .spec
                .as_ref()
                .and_then(|r| r.r#match.iter().find(|m| m.matches(&attrs)))
                .and_then(|m| match &m.uri {
                    Some(StringMatch::Prefix(p)) => Some(p.clone()),
                    _ => None,
                });
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str)
                .to_string();
            if let Some(new) = rw.path(&pq, matched_prefix.as_deref()) {
                if let Ok(u) = new.parse::<Uri>() {
                    parts.uri = u;
                }
            }
            if let Some(a) = &rw.authority {
                if let Ok(v) = HeaderValue::from_str(a) {
                    parts.headers.insert(HOST, v);
                }
            }
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
        let (replay, stream) = if wants_replay && fits {
            match Limited::new(body, usize::try_from(REPLAY_LIMIT).unwrap_or(usize::MAX))
                .collect()
                .await
            {
                Ok(c) => (Some(c.to_bytes()), None),
                Err(e) => {
                    return (
                        body::local_reply(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            &format!("reading the request body: {e}"),
                        ),
                        Some(named.clone()),
                    )
                }
            }
        } else {
            (None, Some(body))
        };
        if let (Some((m, frac)), Some(bytes)) = (&route.mirror, &replay) {
            if fastrand::f64() < *frac {
                self.mirror(&table, m, &parts, &authority, port, bytes.clone(), peer);
            }
        }
        let mut resp = self
            .forward(
                &table,
                &route,
                &dest,
                &svc,
                port,
                parts,
                replay,
                stream,
                downstream_h2,
                peer,
                span,
                seen,
            )
            .await;
        route.response_headers.apply(resp.headers_mut());
        dest.response_headers.apply(resp.headers_mut());
        (resp, Some(named.clone()))
    }

    fn count_fault(&self, svc: &ServiceKey, kind: &'static str) {
        self.metrics
            .faults
            .get_or_create(&FaultLabels {
                service: svc.to_string().into(),
                kind,
            })
            .inc();
    }

    /// Sends a copy to the mirror destination from a task of its own and
    /// forgets it (Istio appends `-shadow` to the host of a mirrored request).
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        self: &Arc<Self>,
        table: &Arc<Table>,
        dest: &Dest,
        parts: &Parts,
        authority: &str,
        port: Option<u16>,
        bytes: Bytes,
        peer: SocketAddr,
    ) {
        let (host, p) = split_authority(authority);
        let shadow = match p {
            Some(p) => format!("{host}-shadow:{p}"),
            None => format!("{host}-shadow"),
        };
        let parts = clone_parts(parts);
        let Some(sel) = self.candidates(table, dest, port, &parts, peer) else {
            return;
        };
        let Some(c) = lb::pick(
            sel.cands(),
            Algorithm::Random,
            &[],
            &[],
            &self.rr,
            &sel.prep.spread,
        ) else {
            return;
        };
        let target = self.target(&c.item, sel.prep.h2 || parts.version == Version::HTTP_2);
        let req = build_request(parts, &shadow, target.proto, body::full(bytes));
        let limits = sel.prep.policy.pool;
        self.metrics
            .mirrored
            .get_or_create(&ServiceLabels {
                direction: "outbound",
                service: sel.prep.label.clone(),
            })
            .inc();
        let this = self.clone();
        tokio::spawn(async move {
            match this.pool.send(&target, req, limits).await {
                Ok(resp) => {
                    // Read the answer so the connection can be reused.
                    let _ = resp.into_body().collect().await;
                }
                Err(e) => debug!("mirror: {e}"),
            }
        });
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

    /// Endpoints as the load balancer sees them, with their host statistics.
    fn to_candidates(&self, eps: Vec<ResolvedEndpoint>) -> Vec<Candidate<ResolvedEndpoint>> {
        let stats = self
            .hosts
            .get_all(eps.iter().map(|e| (e.addr, e.sni.as_ref())));
        eps.into_iter()
            .zip(stats)
            .map(|(e, stats)| Candidate {
                key: e.addr,
                tier: e.tier,
                group: e.group,
                weight: e.weight,
                stats,
                item: e,
            })
            .collect()
    }

    fn target(&self, e: &ResolvedEndpoint, h2: bool) -> Target {
        Target {
            addr: e.addr,
            sni: e.sni.clone(),
            proto: if h2 { Proto::H2 } else { Proto::H1 },
        }
    }

    /// Sends the request with retries and timeouts; answers the caller.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        table: &Table,
        route: &Route,
        dest: &Dest,
        svc: &ServiceKey,
        port: Option<u16>,
        parts: Parts,
        replay: Option<Bytes>,
        mut stream: Option<Incoming>,
        downstream_h2: bool,
        peer: SocketAddr,
        span: &mut ReqSpan,
        seen: &mut Seen,
    ) -> Response<Body> {
        let Some(sel) = self.candidates(table, dest, port, &parts, peer) else {
            let what = dest.subset.as_ref().map_or_else(
                || dest.service.to_string(),
                |s| format!("{} subset {s}", dest.service),
            );
            return body::local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_endpoint",
                &format!("{what} has no healthy endpoint on that port"),
            );
        };
        let service = if dest.service == *svc {
            sel.prep.label.clone()
        } else {
            Label::from(svc.to_string())
        };
        seen.service = Some(service.clone());
        let labels = ServiceLabels {
            direction: "outbound",
            service,
        };
        // connectionPool.http.http2MaxRequests: requests in flight to the
        // destination (until their response headers), over which Envoy
        // answers 503 at once.
        // Counted only where a limit is set: no shared lock on the way otherwise.
        let _inflight = match sel.prep.policy.max_requests {
            Some(max) => {
                let inflight = self
                    .inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry((dest.service.clone(), dest.subset.clone()))
                    .or_default()
                    .clone();
                if inflight.fetch_add(1, Ordering::AcqRel) >= max {
                    inflight.fetch_sub(1, Ordering::AcqRel);
                    return body::local_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overflow",
                        &format!(
                            "{svc}: too many requests in flight (connectionPool.http.http2MaxRequests)"
                        ),
                    );
                }
                Some(scopeguard(move || {
                    inflight.fetch_sub(1, Ordering::AcqRel);
                }))
            }
            None => None,
        };
        let active = self.metrics.active.get_or_create(&labels).clone();
        active.inc();
        let _active = scopeguard(move || {
            active.dec();
        });
        let budget = self.budgets.of(&dest.service);
        let _request = budget.request();
        let host = parts.headers.get(HOST).cloned();
        let authority: std::borrow::Cow<'_, str> = match host.as_ref().and_then(|h| h.to_str().ok())
        {
            Some(h) => h.into(),
            None => parts
                .uri
                .authority()
                .map_or_else(|| dest.service.host(), |a| a.as_str().to_string())
                .into(),
        };
        let h2 = sel.prep.h2 || downstream_h2;
        let deadline = route.timeout.map(|t| tokio::time::Instant::now() + t);
        let max_attempts = if replay.is_some() {
            1 + route.retries.attempts
        } else {
            1
        };
        let mut tried: smallvec::SmallVec<[SocketAddr; 4]> = smallvec::SmallVec::new();
        let mut tried_tiers: smallvec::SmallVec<[u8; 4]> = smallvec::SmallVec::new();
        let mut last: Option<Response<Body>> = None;
        let mut previous: Option<&ClusterName> = None;
        for attempt in 0..max_attempts.max(1) {
            if attempt > 0 {
                // Envoy's jittered exponential back-off, within the deadline.
                let mut wait = route::backoff(route.retries.backoff, attempt);
                if let Some(d) = deadline {
                    wait = wait.min(d.saturating_duration_since(tokio::time::Instant::now()));
                }
                tokio::time::sleep(wait).await;
            }
            let leave = if route.retries.remote_localities {
                tried_tiers.as_slice()
            } else {
                &[]
            };
            let Some(c) = lb::pick(
                sel.cands(),
                sel.alg,
                &tried,
                leave,
                &self.rr,
                &sel.prep.spread,
            ) else {
                break;
            };
            // A retry goes out only within the budgets: the caller gets
            // the last attempt's failure otherwise.
            let mut _retry = None;
            if attempt > 0 {
                let denied =
                    if previous.is_some_and(|p| *p != c.item.cluster) && !budget.cross_cluster() {
                        Some("cross_cluster")
                    } else if let Some(b) = &sel.prep.policy.retry_budget {
                        _retry = budget.retry(b);
                        _retry.is_none().then_some("retry_budget")
                    } else {
                        None
                    };
                if let Some(which) = denied {
                    self.metrics
                        .retries_denied
                        .get_or_create(&crate::metrics::BudgetLabels {
                            service: labels.service.clone(),
                            budget: which,
                        })
                        .inc();
                    span.event("retry_denied", || {
                        vec![KeyValue::new("fedmesh.budget", which)]
                    });
                    break;
                }
                self.metrics.retries.get_or_create(&labels).inc();
            }
            previous = Some(&c.item.cluster);
            if span.recording() {
                attempt_events(span, &sel, c, attempt, tried_tiers.last().copied());
            }
            tried.push(c.key);
            tried_tiers.push(c.tier);
            let target = self.target(&c.item, h2);
            let b = match (&replay, stream.take()) {
                (Some(bytes), _) => body::full(bytes.clone()),
                (None, Some(s)) => body::incoming(s),
                (None, None) => body::empty(),
            };
            let mut req = build_request(clone_parts(&parts), &authority, target.proto, b);
            if let Some(v) = table.cluster_header() {
                req.headers_mut()
                    .insert(crate::metrics::SOURCE_CLUSTER_HEADER, v.clone());
            }
            c.stats.active.fetch_add(1, Ordering::Relaxed);
            let send = self.pool.send(&target, req, sel.prep.policy.pool);
            let per_try = route.retries.per_try;
            let limit = match (deadline, per_try) {
                (Some(d), Some(p)) => Some(d.min(tokio::time::Instant::now() + p)),
                (Some(d), None) => Some(d),
                (None, Some(p)) => Some(tokio::time::Instant::now() + p),
                (None, None) => None,
            };
            // Waiting, the attempt also watches its address: found silent
            // (by this attempt's probe or another's), it is given up at
            // once, as a reset, and retried elsewhere.
            let (addr_health, own_health) = (c.stats.addr.clone(), c.stats.own.clone());
            let silenced = (addr_health.watch(), own_health.watch());
            let answer = async {
                match limit {
                    Some(l) => match tokio::time::timeout_at(l, send).await {
                        Ok(r) => r.map_or_else(classify, Attempt::Response),
                        Err(_) => Attempt::Failed("upstream_timeout", "no response in time".into()),
                    },
                    None => send.await.map_or_else(classify, Attempt::Response),
                }
            };
            let result = tokio::select! {
                biased;
                r = answer => r,
                () = self.silent(&c.stats, silenced, c.key, target.sni.clone()) => {
                    // Its pooled connections stopped answering too.
                    self.pool.evict(&target);
                    Attempt::Failed(
                        "upstream_reset",
                        format!("{} stopped answering (a probe found it silent)", c.key),
                    )
                }
            };
            match &result {
                Attempt::Response(_) => {
                    addr_health.answered();
                    own_health.answered();
                }
                Attempt::Failed("upstream_connect_failure", why) if why.ends_with(NO_TCP) => {
                    addr_health.out();
                }
                Attempt::Failed("upstream_connect_failure", why) if why.ends_with(NO_TLS) => {
                    own_health.out();
                }
                Attempt::Failed(..) => {}
            }
            c.stats.active.fetch_sub(1, Ordering::Relaxed);
            let ejected_now = sel.cands().iter().filter(|x| x.stats.is_ejected()).count();
            match result {
                Attempt::Response(resp) => {
                    let status = resp.status();
                    let outcome = match status.as_u16() {
                        502..=504 => Outcome::GatewayError,
                        500..=599 => Outcome::ServerError,
                        _ => Outcome::Success,
                    };
                    if c.stats.record(
                        outcome,
                        sel.prep.policy.outlier.as_ref(),
                        ejected_now,
                        sel.cands().len(),
                    ) {
                        self.eject(&labels, c.key);
                        span.event("ejection", || {
                            vec![KeyValue::new("net.peer.address", c.key.to_string())]
                        });
                    }
                    if span.recording() {
                        span.attrs(|| {
                            upstream_attrs(c, resp.extensions().get::<crate::pool::Upstream>())
                        });
                    }
                    let grpc = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u32>().ok());
                    let retry = route.retries.on.on_status(status.as_u16())
                        || grpc.is_some_and(|g| route.retries.on.on_grpc_status(g));
                    let (mut p, b) = resp.into_parts();
                    body::strip_hop_by_hop(&mut p.headers);
                    seen.answered_by = Some(c.item.cluster_label.clone());
                    let resp = Response::from_parts(p, body::incoming(b));
                    if retry && attempt + 1 < max_attempts && !deadline_passed(deadline) {
                        span.event("retry", || {
                            vec![
                                KeyValue::new("fedmesh.attempt", i64::from(attempt)),
                                KeyValue::new(
                                    "http.response.status_code",
                                    i64::from(status.as_u16()),
                                ),
                            ]
                        });
                        last = Some(resp);
                        continue;
                    }
                    return resp;
                }
                Attempt::Failed(reason, why) => {
                    if reason == "upstream_connect_failure" {
                        self.metrics.connect_errors.get_or_create(&labels).inc();
                    }
                    if reason != "overflow"
                        && c.stats.record(
                            Outcome::GatewayError,
                            sel.prep.policy.outlier.as_ref(),
                            ejected_now,
                            sel.cands().len(),
                        )
                    {
                        self.eject(&labels, c.key);
                        span.event("ejection", || {
                            vec![KeyValue::new("net.peer.address", c.key.to_string())]
                        });
                    }
                    span.event("attempt_failed", || {
                        vec![
                            KeyValue::new("fedmesh.attempt", i64::from(attempt)),
                            KeyValue::new("fedmesh.reason", reason),
                            KeyValue::new("net.peer.address", c.key.to_string()),
                        ]
                    });
                    let retriable = match reason {
                        "upstream_connect_failure" => route.retries.on.on_connect_failure(),
                        "upstream_reset" => route.retries.on.on_reset(),
                        "upstream_timeout" => per_try.is_some() && !deadline_passed(deadline),
                        _ => false,
                    };
                    debug!(%svc, target = %c.key, reason, %why, attempt, "attempt failed");
                    let status = match reason {
                        "upstream_timeout" => StatusCode::GATEWAY_TIMEOUT,
                        _ => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    let reply = body::local_reply(status, reason, &format!("{svc}: {why}"));
                    if retriable && attempt + 1 < max_attempts && !deadline_passed(deadline) {
                        span.event("retry", || {
                            vec![
                                KeyValue::new("fedmesh.attempt", i64::from(attempt)),
                                KeyValue::new("fedmesh.reason", reason),
                            ]
                        });
                        last = Some(reply);
                        continue;
                    }
                    return reply;
                }
            }
        }
        last.unwrap_or_else(|| {
            body::local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_endpoint",
                &format!("{svc}: no endpoint left to try"),
            )
        })
    }

    /// Resolves if the host is found silent while an attempt waits on it.
    /// After [`SUSPECT`] without an answer, one attempt has it probed, in a
    /// task of its own: two TCP and TLS handshakes at once, each within
    /// [`PROBE_TIMEOUT`] per step (what answers however slow the
    /// application; two, so that one lost SYN is not an outage). Both
    /// without a TCP answer: the address is silent, for every service
    /// behind it. Both connected but without a TLS answer: this host (the
    /// address for this server name) is. Every attempt waiting on what went
    /// silent hears of it.
    async fn silent(
        &self,
        stats: &Arc<lb::HostStats>,
        (mut addr_silenced, mut own_silenced): (watch::Receiver<u64>, watch::Receiver<u64>),
        addr: SocketAddr,
        sni: Option<Arc<str>>,
    ) {
        tokio::time::sleep(SUSPECT).await;
        if let Some(probe) = stats.own.try_probe() {
            let dialer = self.pool.dialer();
            let (addr_health, own_health) = (stats.addr.clone(), stats.own.clone());
            let counter = self.metrics.addresses_silent.clone();
            tokio::spawn(async move {
                let limits = crate::pool::Limits {
                    connect_timeout: Some(PROBE_TIMEOUT),
                    ..Default::default()
                };
                let dial = || dialer.dial_tcp(addr, sni.as_deref(), limits);
                let (a, b) = tokio::join!(dial(), dial());
                let phase = |r: &Result<_, SendError>| match r {
                    Ok(_) => None,
                    Err(SendError::Connect { phase, .. }) => Some(*phase),
                    Err(_) => Some(crate::pool::Phase::Answered),
                };
                use crate::pool::Phase::{Tcp, TlsSilent};
                match (phase(&a), phase(&b)) {
                    (Some(Tcp), Some(Tcp)) => {
                        warn!(%addr, "an address stopped answering (no TCP handshake); out for every service behind it");
                        counter.inc();
                        addr_health.silent();
                    }
                    (Some(Tcp | TlsSilent), Some(Tcp | TlsSilent)) => {
                        warn!(%addr, sni = ?sni, "nothing answers a TLS handshake for this server name at this address; out for it");
                        counter.inc();
                        own_health.silent();
                    }
                    _ => probe.answered(),
                }
            });
        }
        tokio::select! {
            r = addr_silenced.changed() => if r.is_err() { std::future::pending::<()>().await },
            r = own_silenced.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }

    fn eject(&self, labels: &ServiceLabels, host: SocketAddr) {
        warn!(service = %labels.service, %host, "outlier detection ejected a host");
        self.metrics.ejections.get_or_create(labels).inc();
    }
}

/// An attempt waiting this long for its response has its address probed.
const SUSPECT: Duration = Duration::from_millis(150);
/// A probe's TCP and TLS handshake must end within this: a live agent
/// behind a live gateway completes one in a few milliseconds, however slow
/// its application.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// Span events of one attempt: `attempt` for a retry, `failover` when the
/// endpoint is in a farther locality tier (or another cluster) than the
/// nearest usable one or than the previous attempt.
fn attempt_events(
    span: &mut ReqSpan,
    sel: &Selection,
    c: &Candidate<ResolvedEndpoint>,
    attempt: u32,
    prev_tier: Option<u8>,
) {
    if attempt > 0 {
        span.event("attempt", || {
            vec![
                KeyValue::new("fedmesh.attempt", i64::from(attempt)),
                KeyValue::new("net.peer.address", c.key.to_string()),
            ]
        });
    }
    let nearest = sel.cands().iter().map(|x| x.tier).min().unwrap_or(c.tier);
    let from = prev_tier.unwrap_or(nearest);
    if c.tier > from {
        span.event("failover", || {
            vec![
                KeyValue::new("fedmesh.from_tier", i64::from(from)),
                KeyValue::new("fedmesh.to_tier", i64::from(c.tier)),
                KeyValue::new("fedmesh.destination_cluster", c.item.cluster.to_string()),
                KeyValue::new("net.peer.address", c.key.to_string()),
            ]
        });
    }
}

/// Attributes of the endpoint that answered; through a gateway, the hop
/// and the connection's local address (the gateway's connection span
/// records it as `client.address`/`client.port`).
fn upstream_attrs(
    c: &Candidate<ResolvedEndpoint>,
    up: Option<&crate::pool::Upstream>,
) -> Vec<KeyValue> {
    let mut v = vec![
        KeyValue::new("server.address", c.key.ip().to_string()),
        KeyValue::new("server.port", i64::from(c.key.port())),
        KeyValue::new("fedmesh.destination_cluster", c.item.cluster.to_string()),
    ];
    if let Some(sni) = &c.item.sni {
        v.push(KeyValue::new("tls.client.server_name", sni.to_string()));
    }
    if let Some(up) = up {
        v.push(KeyValue::new(
            "fedmesh.upstream.local_address",
            up.local.to_string(),
        ));
    }
    if c.item.via_gateway {
        v.push(KeyValue::new("fedmesh.gateway", c.key.to_string()));
    }
    v
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

fn deadline_passed(d: Option<tokio::time::Instant>) -> bool {
    d.is_some_and(|d| tokio::time::Instant::now() >= d)
}

/// Ends the text of a connect failure where the address did not answer a
/// TCP handshake.
const NO_TCP: &str = " (no TCP answer)";
/// Ends the text of one where nothing answered the TLS handshake.
const NO_TLS: &str = " (no TLS answer)";

fn classify(e: SendError) -> Attempt {
    match e {
        SendError::Connect {
            phase: crate::pool::Phase::Tcp,
            ..
        } => Attempt::Failed("upstream_connect_failure", format!("{e}{NO_TCP}")),
        SendError::Connect {
            phase: crate::pool::Phase::TlsSilent,
            ..
        } => Attempt::Failed("upstream_connect_failure", format!("{e}{NO_TLS}")),
        SendError::Connect { .. } => Attempt::Failed("upstream_connect_failure", e.to_string()),
        SendError::Overflow(_) => Attempt::Failed("overflow", e.to_string()),
        SendError::Reset(_) => Attempt::Failed("upstream_reset", e.to_string()),
    }
}

fn abort_reply(a: Abort) -> Response<Body> {
    match a {
        Abort::Http(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            body::local_reply(status, "fault_abort", "fault filter abort")
        }
        Abort::Grpc(code) => {
            let mut r = Response::new(body::empty());
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            h.insert(body::REASON, HeaderValue::from_static("fault_abort"));
            r
        }
    }
}

fn clone_parts(p: &Parts) -> Parts {
    let mut b = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    let (parts, ()) = b.body(()).unwrap_or_default().into_parts();
    parts
}

/// The request as the upstream sees it: origin form with `Host` over
/// HTTP/1.1, absolute form (`:authority`) over HTTP/2.
fn build_request(mut parts: Parts, authority: &str, proto: Proto, b: Body) -> Request<Body> {
    match proto {
        Proto::H1 => {
            parts.version = Version::HTTP_11;
            if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                parts.uri = origin_form(&parts.uri);
            }
            // The Host the request came with is kept as it is.
            if parts
                .headers
                .get(HOST)
                .is_none_or(|h| h.as_bytes() != authority.as_bytes())
            {
                if let Ok(v) = HeaderValue::from_str(authority) {
                    parts.headers.insert(HOST, v);
                }
            }
        }
        Proto::H2 => {
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str);
            parts.version = Version::HTTP_2;
            parts.uri = format!("http://{authority}{pq}")
                .parse::<Uri>()
                .unwrap_or_default();
            parts.headers.remove(HOST);
        }
    }
    Request::from_parts(parts, b)
}

/// The origin form (`/path?query`) of a request target.
pub fn origin_form(u: &Uri) -> Uri {
    let mut p = http::uri::Parts::default();
    p.path_and_query = Some(
        u.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(p).unwrap_or_default()
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The size of what `f` returns, known from its type alone.
    pub(crate) fn returned_size<A, R>(_: impl Fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn the_request_future_stays_small() {
        let n = returned_size(
            |(o, r, p, d): (
                Arc<Outbound>,
                Request<Incoming>,
                SocketAddr,
                Option<SocketAddr>,
            )| { o.handle(r, p, d) },
        );
        println!("outbound: {n} bytes per request future");
        let send = returned_size(
            |(p, t, r): (&'static Pool, &'static Target, Request<Body>)| {
                p.send(t, r, crate::pool::Limits::default())
            },
        );
        let silent = returned_size(
            |(o, s, w, a): (
                &'static Outbound,
                &'static Arc<lb::HostStats>,
                (watch::Receiver<u64>, watch::Receiver<u64>),
                SocketAddr,
            )| o.silent(s, w, a, None),
        );
        println!(
            "send {send} silent {silent} span {}",
            std::mem::size_of::<ReqSpan>()
        );
    }
}
