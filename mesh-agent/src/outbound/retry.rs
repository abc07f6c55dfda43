//! Retry decisions: which failed attempts and which responses the route's
//! retry policy retries, the deadline each attempt runs under, the back-off
//! between attempts, and the budgets a retry must fit in.

use super::*;
use crate::retry_budget::{Budget, InFlight, ServiceBudget};
use mesh_core::policy::RetryOn;
use tokio::time::Instant;

/// Whether the route's deadline `d` has passed.
pub(super) fn deadline_passed(d: Option<Instant>) -> bool {
    d.is_some_and(|d| Instant::now() >= d)
}

/// Whether an attempt that failed for `reason` is retried (Istio's
/// `retryOn`): a connect failure with `connect-failure`, a reset with
/// `reset`, a timeout only when it was the attempt's own (`perTryTimeout`)
/// and the route's deadline still holds.
pub(super) fn retries_failure(
    reason: Reason,
    on: &RetryOn,
    per_try: bool,
    deadline: Option<Instant>,
) -> bool {
    match reason {
        Reason::UpstreamConnectFailure => on.on_connect_failure(),
        Reason::UpstreamReset => on.on_reset(),
        Reason::UpstreamTimeout => per_try && !deadline_passed(deadline),
        _ => false,
    }
}

/// Whether a response is retried: its status (`5xx`, `gateway-error`,
/// `retriable-status-codes`, ...) or its `grpc-status` is in `retryOn`.
pub(super) fn retries_response(on: &RetryOn, status: u16, headers: &http::HeaderMap) -> bool {
    on.on_status(status)
        || headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|g| on.on_grpc_status(g))
}

/// When an attempt started `now` gives up: the route's deadline or its
/// per-try timeout, whichever comes first.
pub(super) fn attempt_limit(
    deadline: Option<Instant>,
    per_try: Option<Duration>,
    now: Instant,
) -> Option<Instant> {
    match (deadline, per_try) {
        (Some(d), Some(p)) => Some(d.min(now + p)),
        (Some(d), None) => Some(d),
        (None, Some(p)) => Some(now + p),
        (None, None) => None,
    }
}

/// The wait before attempt `attempt` (1 for the first retry): Envoy's
/// jittered exponential back-off from `base`, never past the deadline.
pub(super) fn backoff(
    base: Duration,
    attempt: u32,
    deadline: Option<Instant>,
    now: Instant,
) -> Duration {
    let wait = route::backoff(base, attempt);
    deadline.map_or(wait, |d| wait.min(d.saturating_duration_since(now)))
}

/// The budgets a retry must fit in: to another cluster than the attempt
/// before it (`cross`), the destination's cross-cluster budget; always,
/// the DestinationRule's `retryBudget` when one is set. `Ok` with the
/// retry's token (held while it runs), or `Err` naming the budget that
/// refused it (`cross_cluster`, `retry_budget`).
pub(super) fn refused(
    budget: &Arc<ServiceBudget>,
    cross: bool,
    retry_budget: Option<&Budget>,
) -> Result<Option<InFlight>, &'static str> {
    if cross && !budget.cross_cluster() {
        return Err("cross_cluster");
    }
    match retry_budget {
        Some(b) => budget.retry(b).map(Some).ok_or("retry_budget"),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(s: &str) -> RetryOn {
        s.parse().unwrap_or_default()
    }

    #[test]
    fn failures_are_retried_as_retry_on_says() {
        let all = on("connect-failure,reset");
        assert!(retries_failure(
            Reason::UpstreamConnectFailure,
            &all,
            false,
            None
        ));
        assert!(retries_failure(Reason::UpstreamReset, &all, false, None));
        let none = on("503");
        assert!(!retries_failure(
            Reason::UpstreamConnectFailure,
            &none,
            false,
            None
        ));
        assert!(!retries_failure(Reason::UpstreamReset, &none, false, None));
        // What the agent decided itself is never retried.
        for r in [
            Reason::Overflow,
            Reason::NoHealthyEndpoint,
            Reason::FaultAbort,
        ] {
            assert!(!retries_failure(r, &all, true, None), "{r}");
        }
    }

    #[test]
    fn a_timeout_is_retried_only_when_it_was_the_attempts_own() {
        let on = on("connect-failure");
        let later = Some(Instant::now() + Duration::from_secs(60));
        let past = Some(Instant::now() - Duration::from_millis(1));
        assert!(retries_failure(Reason::UpstreamTimeout, &on, true, later));
        assert!(retries_failure(Reason::UpstreamTimeout, &on, true, None));
        assert!(!retries_failure(Reason::UpstreamTimeout, &on, false, later));
        assert!(!retries_failure(Reason::UpstreamTimeout, &on, true, past));
    }

    #[test]
    fn responses_are_retried_by_status_or_grpc_status() {
        let on = on("5xx,unavailable");
        let mut h = http::HeaderMap::new();
        assert!(retries_response(&on, 503, &h));
        assert!(!retries_response(&on, 404, &h));
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert!(retries_response(&on, 200, &h), "gRPC UNAVAILABLE");
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert!(!retries_response(&on, 200, &h), "gRPC NOT_FOUND");
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert!(!retries_response(&on, 200, &h));
    }

    #[test]
    fn an_attempt_ends_at_the_deadline_or_its_own_timeout_whichever_first() {
        let now = Instant::now();
        let (s1, s5) = (Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(attempt_limit(None, None, now), None);
        assert_eq!(attempt_limit(Some(now + s5), None, now), Some(now + s5));
        assert_eq!(attempt_limit(None, Some(s1), now), Some(now + s1));
        assert_eq!(attempt_limit(Some(now + s5), Some(s1), now), Some(now + s1));
        assert_eq!(attempt_limit(Some(now + s1), Some(s5), now), Some(now + s1));
    }

    #[test]
    fn the_back_off_never_waits_past_the_deadline() {
        let now = Instant::now();
        let base = Duration::from_millis(25);
        for attempt in 1..6 {
            let free = backoff(base, attempt, None, now);
            assert!(free < base * ((1 << attempt) - 1).max(1), "{free:?}");
            let capped = backoff(
                Duration::from_secs(10),
                attempt,
                Some(now + Duration::from_millis(3)),
                now,
            );
            assert!(capped <= Duration::from_millis(3), "{capped:?}");
        }
        assert_eq!(
            backoff(base, 1, Some(now), now + Duration::from_secs(1)),
            Duration::ZERO
        );
    }
}
