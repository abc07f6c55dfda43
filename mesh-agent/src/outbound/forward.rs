//! Forwarding: the attempts of one request, each to an endpoint the load
//! balancer picks, within the route's timeout, retried as its retry policy
//! and the retry budgets allow, given up early when the host is found
//! silent.

use super::*;
use tokio::time::Instant;

/// The outcome of one attempt.
pub(super) enum Attempt {
    Response(Response<Incoming>),
    Failed(Reason, String),
}

/// What follows an attempt.
enum Next {
    /// The caller's answer.
    Answer(Answer),
    /// Another attempt, for this cause; this answer if none may follow.
    Retry(Answer, Cause),
}

/// A response for the caller, with the cluster that answered it (`None`
/// when the agent answers itself).
struct Answer(Response<Body>, Option<Label>);

impl Answer {
    /// The response; the metrics are told which cluster answered it.
    fn give(self, seen: &mut Seen) -> Response<Body> {
        seen.answered_by = self.1;
        self.0
    }
}

/// Why an attempt is retried.
#[derive(Clone, Copy)]
enum Cause {
    /// The upstream answered this status, which the retry policy retries.
    Status(u16),
    /// The attempt failed so.
    Failed(Reason),
}

/// A request's body, for each attempt.
pub(super) enum Payload {
    /// Kept whole: every attempt sends it again.
    Replay(Bytes),
    /// Streamed on: one attempt only.
    Stream(Option<Incoming>),
}

impl Payload {
    fn for_attempt(&mut self) -> Body {
        match self {
            Payload::Replay(b) => body::full(b.clone()),
            Payload::Stream(s) => s.take().map_or_else(body::empty, body::incoming),
        }
    }
}

/// One request on its way to a destination, as routing left it.
pub(super) struct Call<'a> {
    pub(super) table: &'a Table,
    pub(super) route: &'a Route,
    pub(super) dest: &'a Dest,
    /// The service the request named.
    pub(super) svc: &'a ServiceKey,
    /// The port its host named.
    pub(super) port: Option<u16>,
    pub(super) parts: Parts,
    pub(super) payload: Payload,
    pub(super) downstream_h2: bool,
    pub(super) peer: SocketAddr,
}

/// What the attempts of one request share.
struct Ctx<'a> {
    sel: &'a Selection,
    route: &'a Route,
    svc: &'a ServiceKey,
    labels: &'a ServiceLabels,
}

impl Outbound {
    /// Sends the request, attempt after attempt within its route's timeout
    /// and retry policy and the retry budgets; answers the caller.
    pub(super) async fn forward(
        &self,
        call: Call<'_>,
        span: &mut ReqSpan,
        seen: &mut Seen,
    ) -> Response<Body> {
        let Call {
            table,
            route,
            dest,
            svc,
            port,
            parts,
            mut payload,
            downstream_h2,
            peer,
        } = call;
        let Some(sel) = self.candidates(table, dest, port, &parts, peer) else {
            let what = dest.subset.as_ref().map_or_else(
                || dest.service.to_string(),
                |s| format!("{} subset {s}", dest.service),
            );
            return body::local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::NoHealthyEndpoint,
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
        // connectionPool.http.http2MaxRequests, counted only where a limit
        // is set: no shared lock on the way otherwise.
        let _inflight = match sel.prep.policy.max_requests {
            Some(max) => match limits::admit(&self.inflight, dest, max) {
                Some(guard) => Some(guard),
                None => return limits::overflow(svc),
            },
            None => None,
        };
        let _active = limits::Active::of(&self.metrics.active, &labels);
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
        let deadline = route.timeout.map(|t| Instant::now() + t);
        let max_attempts = match payload {
            Payload::Replay(_) => 1 + route.retries.attempts,
            Payload::Stream(_) => 1,
        };
        let ctx = Ctx {
            sel: &sel,
            route,
            svc,
            labels: &labels,
        };
        let mut tried: smallvec::SmallVec<[SocketAddr; 4]> = smallvec::SmallVec::new();
        let mut tried_tiers: smallvec::SmallVec<[u8; 4]> = smallvec::SmallVec::new();
        let mut last: Option<Answer> = None;
        let mut previous: Option<&ClusterName> = None;
        for attempt in 0..max_attempts {
            if attempt > 0 {
                let wait = retry::backoff(route.retries.backoff, attempt, deadline, Instant::now());
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
                let cross = previous.is_some_and(|p| *p != c.item.cluster);
                let refused =
                    match retry::refused(&budget, cross, sel.prep.policy.retry_budget.as_ref()) {
                        Ok(token) => {
                            _retry = token;
                            None
                        }
                        Err(which) => Some(which),
                    };
                if let Some(which) = refused {
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
            let mut req = build_request(
                clone_parts(&parts),
                &authority,
                target.proto,
                payload.for_attempt(),
            );
            if let Some(v) = table.cluster_header() {
                req.headers_mut()
                    .insert(crate::metrics::SOURCE_CLUSTER_HEADER, v.clone());
            }
            let limit = retry::attempt_limit(deadline, route.retries.per_try, Instant::now());
            let result = self
                .attempt(c, &target, req, sel.prep.policy.pool, limit)
                .await;
            let more = attempt + 1 < max_attempts && !retry::deadline_passed(deadline);
            let next = match result {
                Attempt::Response(resp) => self.answered(&ctx, c, resp, more, span),
                Attempt::Failed(reason, why) => {
                    let retriable = retry::retries_failure(
                        reason,
                        &route.retries.on,
                        route.retries.per_try.is_some(),
                        deadline,
                    );
                    self.failed(&ctx, c, attempt, reason, &why, retriable && more, span)
                }
            };
            match next {
                Next::Answer(a) => return a.give(seen),
                Next::Retry(a, cause) => {
                    span.event("retry", || {
                        let mut v = vec![KeyValue::new("fedmesh.attempt", i64::from(attempt))];
                        v.push(match cause {
                            Cause::Status(s) => {
                                KeyValue::new("http.response.status_code", i64::from(s))
                            }
                            Cause::Failed(r) => KeyValue::new("fedmesh.reason", r.as_str()),
                        });
                        v
                    });
                    last = Some(a);
                }
            }
        }
        match last {
            Some(a) => a.give(seen),
            None => body::local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::NoHealthyEndpoint,
                &format!("{svc}: no endpoint left to try"),
            ),
        }
    }

    /// One attempt: `req` to `c` until `limit`, given up at once as a reset
    /// if its address is found silent meanwhile (by this attempt's probe or
    /// another's). The host's health hears of the outcome.
    async fn attempt(
        &self,
        c: &Candidate<ResolvedEndpoint>,
        target: &Target,
        req: Request<Body>,
        pool: crate::pool::Limits,
        limit: Option<Instant>,
    ) -> Attempt {
        c.stats.active.fetch_add(1, Ordering::Relaxed);
        let send = self.pool.send(target, req, pool);
        let (addr_health, own_health) = (c.stats.addr.clone(), c.stats.own.clone());
        let silenced = (addr_health.watch(), own_health.watch());
        let answer = async {
            match limit {
                Some(l) => match tokio::time::timeout_at(l, send).await {
                    Ok(r) => r.map_or_else(classify, Attempt::Response),
                    Err(_) => {
                        Attempt::Failed(Reason::UpstreamTimeout, "no response in time".into())
                    }
                },
                None => send.await.map_or_else(classify, Attempt::Response),
            }
        };
        let result = tokio::select! {
            biased;
            r = answer => r,
            () = self.silent(&c.stats, silenced, c.key, target.sni.clone()) => {
                // Its pooled connections stopped answering too.
                self.pool.evict(target);
                Attempt::Failed(
                    Reason::UpstreamReset,
                    format!("{} stopped answering (a probe found it silent)", c.key),
                )
            }
        };
        match &result {
            Attempt::Response(_) => {
                addr_health.answered();
                own_health.answered();
            }
            Attempt::Failed(Reason::UpstreamConnectFailure, why) if why.ends_with(NO_TCP) => {
                addr_health.out();
            }
            Attempt::Failed(Reason::UpstreamConnectFailure, why) if why.ends_with(NO_TLS) => {
                own_health.out();
            }
            Attempt::Failed(..) => {}
        }
        c.stats.active.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// An attempt `c` answered: outlier detection hears of its status; the
    /// response goes to the caller, or, when the retry policy retries its
    /// status and `more` attempts may follow, waits for the next.
    fn answered(
        &self,
        ctx: &Ctx<'_>,
        c: &Candidate<ResolvedEndpoint>,
        resp: Response<Incoming>,
        more: bool,
        span: &mut ReqSpan,
    ) -> Next {
        let status = resp.status().as_u16();
        self.record(ctx, c, lb::Outcome::of_status(status), span);
        if span.recording() {
            span.attrs(|| upstream_attrs(c, resp.extensions().get::<crate::pool::Upstream>()));
        }
        let retry = retry::retries_response(&ctx.route.retries.on, status, resp.headers());
        let (mut p, b) = resp.into_parts();
        body::strip_hop_by_hop(&mut p.headers);
        let answer = Answer(
            Response::from_parts(p, body::incoming(b)),
            Some(c.item.cluster_label.clone()),
        );
        if retry && more {
            Next::Retry(answer, Cause::Status(status))
        } else {
            Next::Answer(answer)
        }
    }

    /// An attempt to `c` failed for `reason`: counted, outlier detection
    /// hears of it (an overflow is this agent's, not the host's), and the
    /// caller's answer is made of it, retried when `retry`.
    #[allow(clippy::too_many_arguments)]
    fn failed(
        &self,
        ctx: &Ctx<'_>,
        c: &Candidate<ResolvedEndpoint>,
        attempt: u32,
        reason: Reason,
        why: &str,
        retry: bool,
        span: &mut ReqSpan,
    ) -> Next {
        if reason == Reason::UpstreamConnectFailure {
            self.metrics.connect_errors.get_or_create(ctx.labels).inc();
        }
        if reason != Reason::Overflow {
            self.record(ctx, c, lb::Outcome::GatewayError, span);
        }
        span.event("attempt_failed", || {
            vec![
                KeyValue::new("fedmesh.attempt", i64::from(attempt)),
                KeyValue::new("fedmesh.reason", reason.as_str()),
                KeyValue::new("net.peer.address", c.key.to_string()),
            ]
        });
        debug!(svc = %ctx.svc, target = %c.key, %reason, %why, attempt, "attempt failed");
        let reply = Answer(
            body::local_reply(
                reason.attempt_status(),
                reason,
                &format!("{}: {why}", ctx.svc),
            ),
            None,
        );
        if retry {
            Next::Retry(reply, Cause::Failed(reason))
        } else {
            Next::Answer(reply)
        }
    }

    /// Outlier detection hears of one outcome of `c`; an ejection is
    /// logged, counted and marked on the span.
    fn record(
        &self,
        ctx: &Ctx<'_>,
        c: &Candidate<ResolvedEndpoint>,
        outcome: lb::Outcome,
        span: &mut ReqSpan,
    ) {
        let cands = ctx.sel.cands();
        let ejected_now = cands.iter().filter(|x| x.stats.is_ejected()).count();
        if c.stats.record(
            outcome,
            ctx.sel.prep.policy.outlier.as_ref(),
            ejected_now,
            cands.len(),
        ) {
            self.eject(ctx.labels, c.key);
            span.event("ejection", || {
                vec![KeyValue::new("net.peer.address", c.key.to_string())]
            });
        }
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
    pub(super) async fn silent(
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
        } => Attempt::Failed(Reason::UpstreamConnectFailure, format!("{e}{NO_TCP}")),
        SendError::Connect {
            phase: crate::pool::Phase::TlsSilent,
            ..
        } => Attempt::Failed(Reason::UpstreamConnectFailure, format!("{e}{NO_TLS}")),
        SendError::Connect { .. } => Attempt::Failed(Reason::UpstreamConnectFailure, e.to_string()),
        SendError::Overflow(_) => Attempt::Failed(Reason::Overflow, e.to_string()),
        SendError::Reset(_) => Attempt::Failed(Reason::UpstreamReset, e.to_string()),
    }
}

pub(super) fn clone_parts(p: &Parts) -> Parts {
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
pub(super) fn build_request(
    mut parts: Parts,
    authority: &str,
    proto: Proto,
    b: Body,
) -> Request<Body> {
    match proto {
        Proto::H1 => {
            parts.version = Version::HTTP_11;
            if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                parts.uri = origin_form(&parts.uri);
            }
            // The Host the request came with is kept as it is.
            let mut hosts = parts.headers.get_all(HOST).iter();
            let kept = hosts
                .next()
                .is_some_and(|h| h.as_bytes() == authority.as_bytes())
                && hosts.next().is_none();
            if !kept {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_errors_become_reasons_and_say_what_did_not_answer() {
        let addr: SocketAddr = ([127, 0, 0, 1], 9).into();
        let connect = |phase| SendError::Connect {
            addr,
            phase,
            reason: "refused".into(),
        };
        let reason = |a: Attempt| match a {
            Attempt::Failed(r, why) => (r, why),
            Attempt::Response(_) => panic!("a failure"),
        };
        let (r, why) = reason(classify(connect(crate::pool::Phase::Tcp)));
        assert_eq!(r, Reason::UpstreamConnectFailure);
        assert!(why.ends_with(NO_TCP), "{why}");
        let (r, why) = reason(classify(connect(crate::pool::Phase::TlsSilent)));
        assert_eq!(r, Reason::UpstreamConnectFailure);
        assert!(why.ends_with(NO_TLS), "{why}");
        assert_eq!(
            reason(classify(SendError::Overflow(addr))).0,
            Reason::Overflow
        );
        assert_eq!(
            reason(classify(SendError::Reset("gone".into()))).0,
            Reason::UpstreamReset
        );
    }

    #[test]
    fn http1_goes_out_in_origin_form_with_its_host_and_http2_in_absolute_form() {
        let (parts, ()) = Request::get("http://reviews.default:9080/a?b=1")
            .header(HOST, "reviews.default:9080")
            .body(())
            .unwrap_or_default()
            .into_parts();
        let h1 = build_request(
            clone_parts(&parts),
            "reviews.default:9080",
            Proto::H1,
            body::empty(),
        );
        assert_eq!(h1.uri(), "/a?b=1");
        assert_eq!(h1.version(), Version::HTTP_11);
        assert_eq!(h1.headers()[HOST], "reviews.default:9080");
        let other = build_request(clone_parts(&parts), "ratings", Proto::H1, body::empty());
        assert_eq!(other.headers()[HOST], "ratings");
        // Two Host headers, even the right ones, leave as one.
        let mut twice = clone_parts(&parts);
        twice
            .headers
            .append(HOST, HeaderValue::from_static("reviews.default:9080"));
        let one = build_request(twice, "reviews.default:9080", Proto::H1, body::empty());
        assert_eq!(one.headers().get_all(HOST).iter().count(), 1);
        let h2 = build_request(parts, "reviews.default:9080", Proto::H2, body::empty());
        assert_eq!(h2.uri(), "http://reviews.default:9080/a?b=1");
        assert_eq!(h2.version(), Version::HTTP_2);
        assert!(h2.headers().get(HOST).is_none());
        assert_eq!(origin_form(&"http://x/".parse().unwrap_or_default()), "/");
    }
}
