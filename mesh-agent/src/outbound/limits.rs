//! Admission: the DestinationRule's `connectionPool.http.http2MaxRequests`, requests in
//! flight to one destination (until their response headers), over which
//! Envoy answers 503 at once; and the `active` gauge a request holds.

use super::*;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::sync::Mutex;

/// A request counted in flight to its destination until dropped.
pub(super) struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Admits one more request to `dest` if fewer than `max` are in flight.
pub(super) fn admit(
    counts: &Mutex<HashMap<DestKey, Arc<AtomicUsize>>>,
    dest: &Dest,
    max: usize,
) -> Option<Admitted> {
    let n = counts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry((dest.service.clone(), dest.subset.clone()))
        .or_default()
        .clone();
    if n.fetch_add(1, Ordering::AcqRel) >= max {
        n.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    Some(Admitted(n))
}

/// The answer to a request [`admit`] turned away.
pub(super) fn overflow(svc: &ServiceKey) -> Response<Body> {
    body::local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        Reason::Overflow,
        &format!("{svc}: too many requests in flight (connectionPool.http.http2MaxRequests)"),
    )
}

/// A request counted in the `active` gauge of its labels until dropped.
pub(super) struct Active(Gauge);

impl Active {
    pub(super) fn of(family: &Family<ServiceLabels, Gauge>, labels: &ServiceLabels) -> Self {
        let g = family.get_or_create(labels).clone();
        g.inc();
        Self(g)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::RETRY_AFTER;

    fn dest(subset: Option<&str>) -> Dest {
        Dest {
            service: "default/reviews".parse().unwrap_or_else(|e| panic!("{e}")),
            subset: subset.map(str::to_string),
            port: None,
            weight: 100,
            request_headers: Default::default(),
            response_headers: Default::default(),
        }
    }

    #[test]
    fn at_most_max_requests_are_admitted_per_destination_and_a_finished_one_frees_its_place() {
        let counts = Mutex::default();
        let (v1, v2) = (dest(Some("v1")), dest(Some("v2")));
        let a = admit(&counts, &v1, 2);
        let b = admit(&counts, &v1, 2);
        assert!(a.is_some() && b.is_some());
        assert!(admit(&counts, &v1, 2).is_none(), "a third in flight");
        assert!(
            admit(&counts, &v2, 2).is_some(),
            "another subset counts apart"
        );
        drop(a);
        assert!(admit(&counts, &v1, 2).is_some(), "one finished, one more");
        assert!(
            admit(&Mutex::default(), &v1, 0).is_none(),
            "max 0 admits none"
        );
    }

    #[test]
    fn refusals_answer_with_their_status_reason_and_retry_after() {
        let svc: ServiceKey = "default/reviews".parse().unwrap_or_else(|e| panic!("{e}"));
        let r = crate::ratelimit::refused(&svc, Duration::from_millis(1500));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(Reason::of(&r), Some(Reason::RateLimited));
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        let r = overflow(&svc);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Reason::of(&r), Some(Reason::Overflow));
    }

    #[test]
    fn the_active_gauge_counts_a_request_while_it_lasts() {
        let family = Family::<ServiceLabels, Gauge>::default();
        let labels = ServiceLabels {
            direction: "outbound",
            service: "default/reviews".into(),
        };
        let a = Active::of(&family, &labels);
        let b = Active::of(&family, &labels);
        assert_eq!(family.get_or_create(&labels).get(), 2);
        drop(a);
        drop(b);
        assert_eq!(family.get_or_create(&labels).get(), 0);
    }
}
