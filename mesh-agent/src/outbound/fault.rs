//! Fault injection (the route's `fault`): a delay, then an abort, each
//! applied to its fraction of requests.

use super::*;
use crate::route::Fault;

/// The route's fault for one request: a delay drawn for it is waited out,
/// then an abort drawn for it answers (`None`: the request goes on).
/// `count` hears of each fault injected (`delay`, `abort`).
pub(super) async fn inject(
    f: &Fault,
    mut count: impl FnMut(&'static str),
) -> Option<Response<Body>> {
    if let Some((d, frac)) = f.delay {
        if fastrand::f64() < frac {
            count("delay");
            tokio::time::sleep(d).await;
        }
    }
    let (a, frac) = f.abort?;
    (fastrand::f64() < frac).then(|| {
        count("abort");
        abort_reply(a)
    })
}

impl Outbound {
    pub(super) fn count_fault(&self, svc: &ServiceKey, kind: &'static str) {
        self.metrics
            .faults
            .get_or_create(&FaultLabels {
                service: svc.to_string().into(),
                kind,
            })
            .inc();
    }
}

pub(super) fn abort_reply(a: Abort) -> Response<Body> {
    match a {
        Abort::Http(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            body::local_reply(status, Reason::FaultAbort, "fault filter abort")
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
            h.insert(body::REASON, Reason::FaultAbort.header());
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_delay_is_waited_out_then_an_abort_answers() {
        let f = Fault {
            delay: Some((Duration::from_secs(7), 1.0)),
            abort: Some((Abort::Http(418), 1.0)),
        };
        let mut seen = Vec::new();
        let start = tokio::time::Instant::now();
        let r = inject(&f, |k| seen.push(k)).await.map(|r| r.status());
        assert_eq!(r, Some(StatusCode::IM_A_TEAPOT));
        assert!(start.elapsed() >= Duration::from_secs(7));
        assert_eq!(seen, ["delay", "abort"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fraction_of_zero_injects_nothing() {
        let f = Fault {
            delay: Some((Duration::from_secs(7), 0.0)),
            abort: Some((Abort::Http(500), 0.0)),
        };
        let start = tokio::time::Instant::now();
        let mut n = 0;
        for _ in 0..100 {
            assert!(inject(&f, |_| n += 1).await.is_none());
        }
        assert_eq!(n, 0);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn aborts_answer_http_or_grpc_with_the_reason() {
        let r = abort_reply(Abort::Http(503));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Reason::of(&r), Some(Reason::FaultAbort));
        // Not a status: 503, as Envoy answers.
        assert_eq!(
            abort_reply(Abort::Http(42)).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let r = abort_reply(Abort::Grpc(14));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[http::header::CONTENT_TYPE], "application/grpc");
        assert_eq!(Reason::of(&r), Some(Reason::FaultAbort));
    }
}
