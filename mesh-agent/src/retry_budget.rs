//! Retry budgets, per destination service:
//!
//! - DestinationRule `retryBudget`, as Envoy's: retries in flight at most
//!   `percent` of the requests in flight to the service, and always at
//!   least `minRetryConcurrency`;
//! - retries that cross to another cluster, always (see
//!   [`mesh_core::retry`]): at most a share of the requests over a sliding
//!   window, plus a few per second.
//!
//! A retry the budget refuses is not made: the caller gets the failure the
//! last attempt had.

use mesh_core::retry::{CROSS_CLUSTER_MIN_PER_SECOND, CROSS_CLUSTER_RATIO, CROSS_CLUSTER_WINDOW};
use mesh_core::service::ServiceKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Services whose budgets are kept at most; past it they start over.
const MAX_SERVICES: usize = 4096;

/// Seconds of the sliding window, one bucket each.
const BUCKETS: usize = CROSS_CLUSTER_WINDOW.as_secs() as usize;

/// DestinationRule `retryBudget` in effect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Retries in flight as a percentage of requests in flight.
    pub percent: f64,
    /// Retries in flight always allowed.
    pub min_concurrency: u32,
}

/// Requests and cross-cluster retries per second over the window.
#[derive(Debug, Default)]
struct Window {
    /// (second since the budget's start, requests, cross-cluster retries).
    buckets: [(u64, u32, u32); BUCKETS],
}

impl Window {
    fn slot(&mut self, now: u64) -> &mut (u64, u32, u32) {
        let b = &mut self.buckets[usize::try_from(now).unwrap_or(0) % BUCKETS];
        if b.0 != now {
            *b = (now, 0, 0);
        }
        b
    }

    fn totals(&self, now: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| now.saturating_sub(b.0) < BUCKETS as u64 && b.0 <= now)
            .fold((0, 0), |(r, x), b| (r + u64::from(b.1), x + u64::from(b.2)))
    }
}

/// One service's budgets.
#[derive(Debug)]
pub struct ServiceBudget {
    start: Instant,
    active: AtomicU32,
    retries: AtomicU32,
    window: Mutex<Window>,
}

impl Default for ServiceBudget {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            active: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            window: Mutex::default(),
        }
    }
}

/// Held while a request (or a retry) is in flight.
pub struct InFlight {
    counter: Arc<ServiceBudget>,
    retry: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = if self.retry {
            &self.counter.retries
        } else {
            &self.counter.active
        };
        c.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServiceBudget {
    fn second(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// A request begins: counted in flight (until the guard drops) and in
    /// the window.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        let now = self.second();
        self.window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slot(now)
            .1 += 1;
        InFlight {
            counter: self.clone(),
            retry: false,
        }
    }

    /// May a retry go out under `budget` (Envoy's rule)? If so it is
    /// counted in flight until the guard drops.
    pub fn retry(self: &Arc<Self>, budget: &Budget) -> Option<InFlight> {
        let active = f64::from(self.active.load(Ordering::Relaxed));
        let allowed = (active * budget.percent / 100.0)
            .floor()
            .max(f64::from(budget.min_concurrency));
        let now = self.retries.fetch_add(1, Ordering::Relaxed);
        if f64::from(now) >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight {
            counter: self.clone(),
            retry: true,
        })
    }

    /// May a retry cross to another cluster now? Counted if so.
    pub fn cross_cluster(&self) -> bool {
        let now = self.second();
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let (requests, crossed) = w.totals(now);
        // The minimum accrues over the part of the window already lived.
        let lived = (now + 1).min(BUCKETS as u64);
        #[allow(clippy::cast_precision_loss)]
        let allowed = CROSS_CLUSTER_RATIO * requests as f64
            + f64::from(CROSS_CLUSTER_MIN_PER_SECOND) * lived as f64;
        #[allow(clippy::cast_precision_loss)]
        if crossed as f64 >= allowed {
            return false;
        }
        w.slot(now).2 += 1;
        true
    }
}

/// Budgets by destination service.
#[derive(Default)]
pub struct Budgets {
    map: Mutex<HashMap<ServiceKey, Arc<ServiceBudget>>>,
}

impl Budgets {
    /// The budget of `svc`.
    pub fn of(&self, svc: &ServiceKey) -> Arc<ServiceBudget> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = map.get(svc) {
            return b.clone();
        }
        if map.len() >= MAX_SERVICES {
            map.clear();
        }
        map.entry(svc.clone()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_in_flight_stay_within_envoys_budget() {
        let b = Arc::new(ServiceBudget::default());
        let budget = Budget {
            percent: 20.0,
            min_concurrency: 3,
        };
        let reqs: Vec<InFlight> = (0..50).map(|_| b.request()).collect();
        // 20% of 50 in flight: 10 retries at once, no more.
        let retries: Vec<InFlight> = (0..10).map(|_| b.retry(&budget).unwrap()).collect();
        assert!(b.retry(&budget).is_none());
        drop(retries.into_iter().next());
        assert!(b.retry(&budget).is_some(), "one back when one ends");
        drop(reqs);
        // Few requests: the minimum concurrency still allows 3.
        let b = Arc::new(ServiceBudget::default());
        let _r = b.request();
        let held: Vec<InFlight> = (0..3).map(|_| b.retry(&budget).unwrap()).collect();
        assert!(b.retry(&budget).is_none());
        drop(held);
    }

    #[test]
    fn cross_cluster_retries_are_a_share_of_requests_plus_a_floor() {
        let b = Arc::new(ServiceBudget::default());
        // Within the first second: 100 requests allow 20% + 10.
        for _ in 0..100 {
            drop(b.request());
        }
        let allowed = (0..200).filter(|_| b.cross_cluster()).count();
        assert_eq!(allowed, 30);
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let mut w = Window::default();
        w.slot(0).1 += 5;
        w.slot(3).2 += 2;
        assert_eq!(w.totals(3), (5, 2));
        assert_eq!(w.totals(9), (5, 2));
        assert_eq!(w.totals(10), (0, 2), "second 0 has left the window");
        // A bucket reused for a later second starts empty.
        w.slot(13).1 += 1;
        assert_eq!(w.totals(13), (1, 0));
    }
}
