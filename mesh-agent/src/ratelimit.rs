//! Local token buckets (governor): one per configured key, and one per other
//! key at the default rate. Over the limit, the caller learns how long to
//! wait, which becomes the `Retry-After` of a 429.

use crate::config::{Limits, Rate};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// The answer to a request the rate limit for `key` refused, `wait` before
/// a token is back (429, `Retry-After` in whole seconds).
pub fn refused(key: &dyn std::fmt::Display, wait: Duration) -> http::Response<crate::body::Body> {
    let mut r = crate::body::local_reply(
        http::StatusCode::TOO_MANY_REQUESTS,
        crate::reason::Reason::RateLimited,
        &format!("rate limit for {key} exceeded"),
    );
    r.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_after_secs(wait)),
    );
    r
}

/// Rate limiters keyed by destination service or caller identity.
pub struct Limiter<K: Hash + Eq + Clone> {
    by_key: HashMap<K, DefaultDirectRateLimiter>,
    default: Option<DefaultKeyedRateLimiter<K>>,
    clock: DefaultClock,
}

fn quota(r: Rate) -> Quota {
    // `count` requests per `per`, in bursts of up to `count`.
    let period = r.per / r.count.get();
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(r.count))
        .allow_burst(r.count)
}

impl<K: Hash + Eq + Clone + Ord> Limiter<K> {
    /// Limiters for `limits`.
    pub fn new(limits: &Limits<K>) -> Self {
        Self {
            by_key: limits
                .by_key
                .iter()
                .map(|(k, r)| (k.clone(), RateLimiter::direct(quota(*r))))
                .collect(),
            default: limits.default.map(|r| RateLimiter::keyed(quota(r))),
            clock: DefaultClock::default(),
        }
    }

    /// Is anything limited at all?
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty() && self.default.is_none()
    }

    /// Takes a token for `k`; `Err(wait)` when the bucket is empty.
    pub fn check(&self, k: &K) -> Result<(), Duration> {
        let r = match (self.by_key.get(k), &self.default) {
            (Some(l), _) => l.check(),
            (None, Some(l)) => l.check_key(k),
            (None, None) => return Ok(()),
        };
        r.map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets idle keys of the default bucket.
    pub fn shrink(&self) {
        if let Some(l) = &self.default {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// `Retry-After` in whole seconds, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::num::NonZeroU32;

    fn rate(n: u32) -> Rate {
        Rate {
            count: NonZeroU32::new(n).unwrap(),
            per: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_burst_passes_then_the_bucket_refuses_with_a_wait() {
        let l = Limiter::new(&Limits {
            by_key: BTreeMap::from([("a".to_string(), rate(3))]),
            default: Some(rate(1)),
        });
        for _ in 0..3 {
            assert!(l.check(&"a".to_string()).is_ok());
        }
        let wait = l.check(&"a".to_string()).unwrap_err();
        assert!(wait <= Duration::from_millis(334), "{wait:?}");
        assert_eq!(retry_after_secs(wait), 1);
        // Other keys each get their own default bucket.
        assert!(l.check(&"b".to_string()).is_ok());
        assert!(l.check(&"b".to_string()).is_err());
        assert!(l.check(&"c".to_string()).is_ok());
    }

    #[test]
    fn without_a_default_unknown_keys_pass() {
        let l = Limiter::new(&Limits {
            by_key: BTreeMap::from([("a".to_string(), rate(1))]),
            default: None,
        });
        for _ in 0..100 {
            assert!(l.check(&"z".to_string()).is_ok());
        }
    }
}
