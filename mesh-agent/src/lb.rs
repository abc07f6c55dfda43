//! Choosing an endpoint: locality first, then the load-balancing algorithm,
//! skipping endpoints that outlier detection ejected and those a retry has
//! already tried.
//!
//! Locality tiers, best first: the caller's zone, the caller's region, any
//! other region. The best tier with a usable endpoint takes the request; a
//! retry with `retryRemoteLocalities` moves on to a tier not yet tried.

use mesh_core::locality::Locality;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How to choose among the endpoints of one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// In turn.
    RoundRobin,
    /// The less loaded of two random picks (Istio's default).
    LeastRequest,
    /// Uniformly at random.
    Random,
    /// Consistent hashing of a request key ([`crate::hashring`]): the same
    /// key keeps the same endpoint while it is usable, and about 1/n of the
    /// keys move when an endpoint comes or goes.
    Hash(u64, crate::hashring::Kind),
}

/// Locality tier of an endpoint seen from the caller: 0 same zone, 1 same
/// region, 2 elsewhere.
pub fn tier(me: &Locality, ep: &Locality) -> u8 {
    if me.region != ep.region {
        2
    } else if me.zone != ep.zone {
        1
    } else {
        0
    }
}

/// What the agent tracks of one upstream host across config versions:
/// requests in flight, consecutive errors, ejection.
#[derive(Debug, Default)]
pub struct HostStats {
    /// Requests in flight.
    pub active: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Times ejected so far (the ejection time grows with it).
    ejections: AtomicU32,
    /// Ejected until this many milliseconds after [`epoch`]; 0: not ejected.
    ejected_until_ms: AtomicU64,
}

/// Milliseconds since the process's first use of this clock.
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let e = *EPOCH.get_or_init(Instant::now);
    u64::try_from(e.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Outlier detection settings in effect for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive 5xx responses (and connect failures) that eject; 0: off.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and connect failures) that eject; 0: off.
    pub consecutive_gateway: u32,
    /// Ejection time for the first ejection; the n-th lasts n times this.
    pub base_ejection: Duration,
    /// Most of a destination's hosts ejected at once, in percent.
    pub max_ejection_percent: u32,
}

/// The result of one attempt, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any status below 500.
    Success,
    /// 500, 501, 505..: a server error.
    ServerError,
    /// 502, 503, 504, or no connection / a reset: the gateway errors.
    GatewayError,
}

impl HostStats {
    /// Is the host ejected now?
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Records an outcome; returns true when it ejects the host.
    /// `ejected_now`/`hosts` bound the ejection by `max_ejection_percent`.
    pub fn record(
        &self,
        outcome: Outcome,
        o: Option<&Outlier>,
        ejected_now: usize,
        hosts: usize,
    ) -> bool {
        match outcome {
            Outcome::Success => {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                return false;
            }
            Outcome::ServerError => {
                self.consecutive_5xx.fetch_add(1, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
            }
            Outcome::GatewayError => {
                self.consecutive_5xx.fetch_add(1, Ordering::Relaxed);
                self.consecutive_gateway.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(o) = o else { return false };
        let c5 = self.consecutive_5xx.load(Ordering::Relaxed);
        let cg = self.consecutive_gateway.load(Ordering::Relaxed);
        let trips = (o.consecutive_5xx > 0 && c5 >= o.consecutive_5xx)
            || (o.consecutive_gateway > 0 && cg >= o.consecutive_gateway);
        if !trips || self.is_ejected() {
            return false;
        }
        // Envoy's rule: eject only while fewer than max% are out, and always
        // allow at least one ejection when the percentage allows any.
        let allowed = hosts * o.max_ejection_percent as usize / 100;
        let allowed = if o.max_ejection_percent > 0 {
            allowed.max(1)
        } else {
            0
        };
        if ejected_now >= allowed {
            return false;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let ms = u64::try_from(o.base_ejection.as_millis()).unwrap_or(u64::MAX);
        self.ejected_until_ms.store(
            now_ms().saturating_add(ms.saturating_mul(u64::from(n))),
            Ordering::Relaxed,
        );
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        true
    }

    /// Times this host has been ejected.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }
}

/// A host: the address connected to and the server name sent.
type HostKey = (SocketAddr, Option<Arc<str>>);

/// Host statistics that outlive config versions, by host key.
#[derive(Default)]
pub struct Hosts {
    map: Mutex<std::collections::HashMap<HostKey, Arc<HostStats>>>,
}

impl Hosts {
    /// The stats of hosts (addresses with the server name used to reach
    /// them), under one lock: once per request, not once per endpoint.
    pub fn get_all<'a>(
        &self,
        hosts: impl IntoIterator<Item = (SocketAddr, Option<&'a Arc<str>>)>,
    ) -> Vec<Arc<HostStats>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .into_iter()
            .map(|(addr, sni)| map.entry((addr, sni.cloned())).or_default().clone())
            .collect()
    }
}

/// One endpoint a request may go to.
#[derive(Debug, Clone)]
pub struct Candidate<T> {
    /// What the caller needs to send to it.
    pub item: T,
    /// Stable identity for hashing and for "already tried".
    pub key: SocketAddr,
    /// Locality tier.
    pub tier: u8,
    /// Its stats.
    pub stats: Arc<HostStats>,
}

/// Picks a candidate. `tried` are the keys earlier attempts used;
/// `tried_tiers` their tiers when a retry should leave them
/// (`retryRemoteLocalities`). Ejected and tried candidates are avoided while
/// any other remains; if every candidate is ejected, ejection is ignored
/// (Envoy's panic threshold in its simplest form).
pub fn pick<'a, T>(
    cands: &'a [Candidate<T>],
    alg: Algorithm,
    tried: &[SocketAddr],
    leave_tiers: &[u8],
    rr: &AtomicUsize,
) -> Option<&'a Candidate<T>> {
    if cands.is_empty() {
        return None;
    }
    type Filter<'f, T> = &'f dyn Fn(&Candidate<T>) -> bool;
    let filters: [Filter<'_, T>; 4] = [
        &|c| !c.stats.is_ejected() && !tried.contains(&c.key) && !leave_tiers.contains(&c.tier),
        &|c| !c.stats.is_ejected() && !tried.contains(&c.key),
        &|c| !c.stats.is_ejected(),
        &|_| true,
    ];
    for f in filters {
        let Some(best) = cands.iter().filter(|c| f(c)).map(|c| c.tier).min() else {
            continue;
        };
        if let Algorithm::Hash(h, kind) = alg {
            // The table over the whole tier, usable or not: an ejected or
            // tried endpoint's keys walk on to the next usable one, and
            // the others stay where they are.
            static TABLES: std::sync::OnceLock<crate::hashring::Tables> =
                std::sync::OnceLock::new();
            let tier: Vec<&Candidate<T>> = cands.iter().filter(|c| c.tier == best).collect();
            let keys: Vec<SocketAddr> = tier.iter().map(|x| x.key).collect();
            let t = TABLES.get_or_init(Default::default).get(kind, &keys);
            if let Some(i) = t.pick_usable(h, |i| tier.get(i).is_some_and(|c| f(c))) {
                return tier.get(i).copied();
            }
            continue;
        }
        let tier: Vec<&Candidate<T>> = cands.iter().filter(|c| c.tier == best && f(c)).collect();
        return Some(choose(&tier, alg, rr));
    }
    None
}

fn choose<'a, T>(c: &[&'a Candidate<T>], alg: Algorithm, rr: &AtomicUsize) -> &'a Candidate<T> {
    let n = c.len();
    match alg {
        _ if n == 1 => c[0],
        Algorithm::RoundRobin => c[rr.fetch_add(1, Ordering::Relaxed) % n],
        Algorithm::Random => c[fastrand::usize(..n)],
        Algorithm::LeastRequest => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            let (x, y) = (c[a], c[b]);
            if y.stats.active.load(Ordering::Relaxed) < x.stats.active.load(Ordering::Relaxed) {
                y
            } else {
                x
            }
        }
        // Hashing is chosen in `pick`, over the whole tier.
        Algorithm::Hash(..) => c[0],
    }
}

/// Hashes a request attribute for [`Algorithm::Hash`]: xxHash64, as Envoy
/// hashes a header, so every agent maps a key alike.
pub fn hash_key(v: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(v, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn loc(r: &str, z: &str) -> Locality {
        Locality {
            region: r.parse().unwrap(),
            zone: z.parse().unwrap(),
        }
    }

    fn cands(tiers: &[u8]) -> Vec<Candidate<u8>> {
        tiers
            .iter()
            .enumerate()
            .map(|(i, t)| Candidate {
                item: *t,
                key: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                tier: *t,
                stats: Arc::default(),
            })
            .collect()
    }

    #[test]
    fn tiers_follow_zone_then_region() {
        let me = loc("us-east", "us-east-1a");
        assert_eq!(tier(&me, &loc("us-east", "us-east-1a")), 0);
        assert_eq!(tier(&me, &loc("us-east", "us-east-1b")), 1);
        assert_eq!(tier(&me, &loc("eu-west", "us-east-1a")), 2);
    }

    #[test]
    fn the_best_tier_takes_everything_and_retries_move_on() {
        let c = cands(&[2, 1, 0, 0]);
        let rr = AtomicUsize::new(0);
        for _ in 0..50 {
            assert_eq!(
                pick(&c, Algorithm::LeastRequest, &[], &[], &rr)
                    .unwrap()
                    .tier,
                0
            );
        }
        // A retry avoids the host it tried, staying in the tier.
        let first = c[2].key;
        for _ in 0..20 {
            let p = pick(&c, Algorithm::Random, &[first], &[], &rr).unwrap();
            assert_eq!(p.key, c[3].key);
        }
        // retryRemoteLocalities: leave tier 0 for the next one.
        let p = pick(&c, Algorithm::Random, &[first], &[0], &rr).unwrap();
        assert_eq!(p.tier, 1);
    }

    #[test]
    fn ejected_hosts_are_skipped_until_none_is_left() {
        let c = cands(&[0, 0, 1]);
        let o = Outlier {
            consecutive_5xx: 2,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 100,
        };
        assert!(!c[0].stats.record(Outcome::ServerError, Some(&o), 0, 3));
        assert!(c[0].stats.record(Outcome::ServerError, Some(&o), 0, 3));
        assert!(c[0].stats.is_ejected());
        let rr = AtomicUsize::new(0);
        for _ in 0..20 {
            assert_eq!(
                pick(&c, Algorithm::RoundRobin, &[], &[], &rr).unwrap().key,
                c[1].key
            );
        }
        c[1].stats.record(Outcome::GatewayError, Some(&o), 1, 3);
        c[1].stats.record(Outcome::GatewayError, Some(&o), 1, 3);
        // Zone empty of usable hosts: the region tier takes over.
        assert_eq!(
            pick(&c, Algorithm::RoundRobin, &[], &[], &rr).unwrap().tier,
            1
        );
    }

    #[test]
    fn max_ejection_percent_bounds_ejections() {
        let s = HostStats::default();
        let o = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
        };
        // 10% of 10 hosts is one; one is out already.
        assert!(!s.record(Outcome::ServerError, Some(&o), 1, 10));
        assert!(s.record(Outcome::ServerError, Some(&o), 0, 10));
        assert_eq!(s.ejections(), 1);
    }

    #[test]
    fn a_success_resets_the_count() {
        let s = HostStats::default();
        let o = Outlier {
            consecutive_5xx: 2,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(1),
            max_ejection_percent: 100,
        };
        s.record(Outcome::ServerError, Some(&o), 0, 2);
        s.record(Outcome::Success, Some(&o), 0, 2);
        assert!(!s.record(Outcome::ServerError, Some(&o), 0, 2));
    }

    #[test]
    fn round_robin_and_least_request_spread_load() {
        let c = cands(&[0, 0, 0]);
        let rr = AtomicUsize::new(0);
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..300 {
            *seen
                .entry(pick(&c, Algorithm::RoundRobin, &[], &[], &rr).unwrap().key)
                .or_default() += 1;
        }
        assert!(seen.values().all(|n| *n == 100), "{seen:?}");
        // Least request avoids the busy host.
        c[0].stats.active.store(100, Ordering::Relaxed);
        for _ in 0..100 {
            assert_ne!(
                pick(&c, Algorithm::LeastRequest, &[], &[], &rr)
                    .unwrap()
                    .key,
                c[0].key
            );
        }
    }

    #[test]
    fn hashing_is_sticky_and_moves_only_the_lost_keys() {
        let rr = AtomicUsize::new(0);
        for kind in [
            crate::hashring::Kind::default(),
            crate::hashring::Kind::Maglev { table_size: 65_537 },
        ] {
            let c = cands(&[0, 0, 0, 0]);
            let owners = |c: &[Candidate<u8>]| -> Vec<SocketAddr> {
                (0..400u64)
                    .map(|k| {
                        let alg = Algorithm::Hash(hash_key(&k.to_le_bytes()), kind);
                        pick(c, alg, &[], &[], &rr).unwrap().key
                    })
                    .collect()
            };
            let before = owners(&c);
            assert_eq!(before, owners(&c), "{kind:?}");
            // Every endpoint holds some keys.
            assert!(c.iter().all(|x| before.contains(&x.key)), "{kind:?}");
            // c[3] ejected: its keys move, no other does; readmitted, they
            // come back.
            let o = Outlier {
                consecutive_5xx: 1,
                consecutive_gateway: 0,
                base_ejection: Duration::from_secs(30),
                max_ejection_percent: 100,
            };
            assert!(c[3].stats.record(Outcome::ServerError, Some(&o), 0, 4));
            let during = owners(&c);
            for (b, d) in before.iter().zip(&during) {
                assert_ne!(*d, c[3].key);
                if *b != c[3].key {
                    assert_eq!(b, d, "{kind:?}: a key of a healthy endpoint moved");
                }
            }
            // A retry leaves the host it tried for the next on the table.
            let k = before.iter().position(|b| *b == c[0].key).unwrap() as u64;
            let alg = Algorithm::Hash(hash_key(&k.to_le_bytes()), kind);
            let retry = pick(&c, alg, &[c[0].key], &[], &rr).unwrap().key;
            assert!(retry != c[0].key && retry != c[3].key, "{kind:?}");
            // Readmitted (its ejection over): the same table, the same owners.
            let mut back = c.clone();
            back[3].stats = Arc::default();
            assert_eq!(
                owners(&back),
                before,
                "{kind:?}: keys not back after the ejection"
            );
        }
    }
}
