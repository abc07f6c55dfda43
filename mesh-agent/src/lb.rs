//! Choosing an endpoint: a priority (Envoy's priority load over the
//! priorities [`crate::locality`] assigned), a locality within it, then the
//! load-balancing algorithm, skipping endpoints that outlier detection
//! ejected and those a retry has already tried. A retry with
//! `retryRemoteLocalities` moves on to a priority not yet tried.

use crate::locality::PerPriority;
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

/// Whether something answers: an address, whatever service it is reached
/// for (a remote gateway carries many), or one host (an address and a
/// server name). Something that refused or timed out a connection is out
/// for a while (1 s, doubling with each failure after it came back, at
/// most 30 s); one a probe found silent while requests waited on it is out
/// too, and the attempts waiting on it are told at once
/// ([`AddrHealth::watch`]).
#[derive(Debug)]
pub struct AddrHealth {
    failing_until_ms: AtomicU64,
    failures: AtomicU32,
    probing: std::sync::atomic::AtomicBool,
    probed_ok_ms: AtomicU64,
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Default for AddrHealth {
    fn default() -> Self {
        Self {
            failing_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
            probed_ok_ms: AtomicU64::new(0),
            epoch: tokio::sync::watch::channel(0).0,
        }
    }
}

/// How long an address stays out after its first failure in a row.
const ADDR_OUT: u64 = 1_000;
/// At most.
const ADDR_OUT_MAX: u64 = 30_000;
/// An address a probe found answering is not probed again for this long.
const PROBE_QUIET_MS: u64 = 1_000;

impl AddrHealth {
    /// Is the address out now?
    pub fn is_failing(&self) -> bool {
        let until = self.failing_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// It refused or timed out a connection: out for a while. Failures
    /// while it is already out do not lengthen the time (many requests see
    /// one outage); a failure after it came back does.
    pub fn out(&self) {
        if self.is_failing() {
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(5);
        let ms = (ADDR_OUT << n).min(ADDR_OUT_MAX);
        self.failing_until_ms
            .store(now_ms().saturating_add(ms), Ordering::Relaxed);
    }

    /// A probe found it silent: out, and every attempt waiting on it is
    /// told (requests on connections that answer are not: a refused
    /// connect while draining leaves them be).
    pub fn silent(&self) {
        self.out();
        self.epoch.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// It answered.
    pub fn answered(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.failing_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Changes when the address is found not answering.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// The right to probe the address now: one probe at a time, none soon
    /// after one that found it answering.
    pub fn try_probe(self: &Arc<Self>) -> Option<ProbeGuard> {
        let ok = self.probed_ok_ms.load(Ordering::Relaxed);
        if ok != 0 && now_ms().saturating_sub(ok) < PROBE_QUIET_MS {
            return None;
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(ProbeGuard(self.clone()))
    }
}

/// Held while a probe runs.
pub struct ProbeGuard(Arc<AddrHealth>);

impl ProbeGuard {
    /// The probe found it answering.
    pub fn answered(self) {
        self.0.probed_ok_ms.store(now_ms(), Ordering::Relaxed);
        self.0.answered();
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

/// What the agent tracks of one upstream host across config versions:
/// requests in flight, consecutive errors, ejection.
#[derive(Debug, Default)]
pub struct HostStats {
    /// Whether its address answers (shared by every host at the address).
    pub addr: Arc<AddrHealth>,
    /// Whether something answers for its server name at the address.
    pub own: Arc<AddrHealth>,
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

impl Outcome {
    /// What a response's status says of its host.
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Outcome::GatewayError,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Success,
        }
    }
}

impl HostStats {
    /// Ejected, or it or its address out: not to be used while anything
    /// else is.
    pub fn unusable(&self) -> bool {
        self.is_ejected() || self.addr.is_failing() || self.own.is_failing()
    }

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

/// Hosts whose statistics are kept at most.
const MAX_HOSTS: usize = 65_536;

/// A host: the address connected to and the server name sent.
type HostKey = (SocketAddr, Option<Arc<str>>);

/// Host statistics that outlive config versions, by host key, and the
/// health of each address.
#[derive(Default)]
pub struct Hosts {
    map: Mutex<HostMaps>,
    /// Bumped each time the statistics start over: what was taken before
    /// is no longer shared with what is taken after.
    generation: AtomicU64,
}

#[derive(Default)]
struct HostMaps {
    hosts: std::collections::HashMap<HostKey, Arc<HostStats>>,
    addrs: std::collections::HashMap<SocketAddr, Arc<AddrHealth>>,
}

impl Hosts {
    /// Which start of the statistics [`Hosts::get_all`] hands out now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The stats of hosts (addresses with the server name used to reach
    /// them), under one lock.
    pub fn get_all<'a>(
        &self,
        hosts: impl IntoIterator<Item = (SocketAddr, Option<&'a Arc<str>>)>,
    ) -> Vec<Arc<HostStats>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let HostMaps { hosts: h, addrs } = &mut *map;
        // Bounded: hosts come and go (endpoints, DNS answers); past the
        // bound the statistics start over.
        if h.len() > MAX_HOSTS {
            h.clear();
            addrs.clear();
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        hosts
            .into_iter()
            .map(|(addr, sni)| {
                h.entry((addr, sni.cloned()))
                    .or_insert_with(|| {
                        Arc::new(HostStats {
                            addr: addrs.entry(addr).or_default().clone(),
                            ..HostStats::default()
                        })
                    })
                    .clone()
            })
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
    /// Priority (Envoy's): 0 first; the next take what the first cannot.
    pub tier: u8,
    /// Locality group within the priority, and its weight
    /// ([`crate::locality`]).
    pub group: u16,
    /// The group's weight.
    pub weight: u32,
    /// Its stats.
    pub stats: Arc<HostStats>,
}

/// How load spreads over priorities and localities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Locality-weighted within a priority.
    pub weighted: bool,
    /// Panic threshold, percent.
    pub panic_threshold: f64,
}

impl Default for Spread {
    fn default() -> Self {
        Self {
            weighted: false,
            panic_threshold: crate::locality::DEFAULT_PANIC,
        }
    }
}

/// Picks a candidate, as Envoy does: a priority by its load (each takes
/// what its usable hosts allow, with the 1.4 overprovisioning factor; the
/// rest spills to the next), then within it a locality by weight when
/// `spread.weighted`, then a host by `alg`. Usable means not ejected, not
/// `tried` by an earlier attempt, and not in `leave_tiers` (a retry with
/// `retryRemoteLocalities`). A priority in panic sends to all its hosts.
/// When nothing is usable anywhere, ejection and then "tried" are ignored
/// (total panic) and the nearest priority takes the request.
pub fn pick<'a, T>(
    cands: &'a [Candidate<T>],
    alg: Algorithm,
    tried: &[SocketAddr],
    leave_tiers: &[u8],
    rr: &AtomicUsize,
    spread: &Spread,
) -> Option<&'a Candidate<T>> {
    if cands.is_empty() {
        return None;
    }
    // Health: ejected hosts and silent addresses count against their
    // priority; hosts an earlier attempt tried do not (Envoy's retry host
    // predicate: the retry takes another host of the priority drawn, and
    // moves on only when none is left there).
    let healthy = |c: &Candidate<T>| !c.stats.unusable() && !leave_tiers.contains(&c.tier);
    let usable = |c: &Candidate<T>| healthy(c) && !tried.contains(&c.key);
    let mut tiers: PerPriority<u8> = cands.iter().map(|c| c.tier).collect();
    tiers.sort_unstable();
    tiers.dedup();
    let counts: PerPriority<(u32, u32)> = tiers
        .iter()
        .map(|t| {
            cands
                .iter()
                .filter(|c| c.tier == *t)
                .fold((0, 0), |(h, n), c| (h + u32::from(healthy(c)), n + 1))
        })
        .collect();
    let (load, panic) = crate::locality::priority_load(&counts, spread.panic_threshold);
    let Some(mut i) = draw_priority(&load, alg) else {
        return fallback(cands, alg, tried, rr);
    };
    // Every healthy host of the priority drawn tried already: the next
    // priority with one not tried takes the retry.
    if !panic[i] && !cands.iter().any(|c| c.tier == tiers[i] && usable(c)) {
        match (i + 1..tiers.len()).find(|j| cands.iter().any(|c| c.tier == tiers[*j] && usable(c)))
        {
            Some(j) => i = j,
            None => return fallback(cands, alg, tried, rr),
        }
    }
    let tier = tiers[i];
    let in_panic = panic[i];
    let ok = |c: &Candidate<T>| c.tier == tier && (in_panic || usable(c));
    if let Algorithm::Hash(h, kind) = alg {
        // The table over the whole priority, usable or not: an ejected or
        // tried endpoint's keys walk on to the next usable one, and the
        // others stay where they are.
        let all: Vec<&Candidate<T>> = cands.iter().filter(|c| c.tier == tier).collect();
        let keys: Vec<SocketAddr> = all.iter().map(|x| x.key).collect();
        let t = tables().get(kind, &keys);
        return t
            .pick_usable(h, |i| all.get(i).is_some_and(|c| ok(c)))
            .and_then(|i| all.get(i).copied())
            .or_else(|| fallback(cands, alg, tried, rr));
    }
    let mut pool: Pool<'_, T> = cands.iter().filter(|c| ok(c)).collect();
    if spread.weighted && !in_panic {
        // A locality by its effective weight (scaled by its health).
        let mut groups: PerPriority<(u16, u32, u32, u32)> = PerPriority::new(); // group, weight, usable, total
        for c in cands.iter().filter(|c| c.tier == tier) {
            match groups.iter_mut().find(|g| g.0 == c.group) {
                Some(g) => {
                    g.2 += u32::from(healthy(c));
                    g.3 += 1;
                }
                None => groups.push((c.group, c.weight, u32::from(healthy(c)), 1)),
            }
        }
        let eff: PerPriority<f64> = groups
            .iter()
            .map(|g| crate::locality::effective_weight(g.1, g.2, g.3))
            .collect();
        let total: f64 = eff.iter().sum();
        if total > 0.0 {
            let mut r = fastrand::f64() * total;
            let mut chosen = groups[groups.len() - 1].0;
            for (g, e) in groups.iter().zip(&eff) {
                if r < *e {
                    chosen = g.0;
                    break;
                }
                r -= e;
            }
            // (All of that locality tried already: the priority's others.)
            if pool.iter().any(|c| c.group == chosen) {
                pool.retain(|c| c.group == chosen);
            }
        }
    }
    if pool.is_empty() {
        return fallback(cands, alg, tried, rr);
    }
    Some(choose(&pool, alg, rr))
}

/// The candidates a pick chooses among: on the stack for up to 16.
type Pool<'a, T> = smallvec::SmallVec<[&'a Candidate<T>; 16]>;

/// Consistent-hash tables of the host lists in use.
fn tables() -> &'static crate::hashring::Tables {
    static TABLES: std::sync::OnceLock<crate::hashring::Tables> = std::sync::OnceLock::new();
    TABLES.get_or_init(Default::default)
}

/// The priority a request goes to, by the loads (percent): at random, or
/// by the request's hash when hashing (as Envoy does). `None` when no
/// priority has load.
fn draw_priority(load: &[u32], alg: Algorithm) -> Option<usize> {
    if load.iter().all(|l| *l == 0) {
        return None;
    }
    let r = match alg {
        Algorithm::Hash(h, _) => u32::try_from(h % 100).unwrap_or(0) + 1,
        _ => fastrand::u32(1..=100),
    };
    let mut acc = 0;
    for (i, l) in load.iter().enumerate() {
        acc += l;
        if r <= acc {
            return Some(i);
        }
    }
    load.iter().rposition(|l| *l > 0)
}

/// Nothing usable: ignore ejection (and addresses out), then what was
/// tried, and send to the nearest priority of what is left.
fn fallback<'a, T>(
    cands: &'a [Candidate<T>],
    alg: Algorithm,
    tried: &[SocketAddr],
    rr: &AtomicUsize,
) -> Option<&'a Candidate<T>> {
    type Filter<'f, T> = &'f dyn Fn(&Candidate<T>) -> bool;
    let filters: [Filter<'_, T>; 2] = [&|c| !tried.contains(&c.key), &|_| true];
    for f in filters {
        let Some(best) = cands.iter().filter(|c| f(c)).map(|c| c.tier).min() else {
            continue;
        };
        let tier: Pool<'_, T> = cands.iter().filter(|c| c.tier == best && f(c)).collect();
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
        Algorithm::Hash(h, kind) => {
            let keys: Vec<SocketAddr> = c.iter().map(|x| x.key).collect();
            c.get(tables().get(kind, &keys).pick(h))
                .copied()
                .unwrap_or(c[0])
        }
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

    fn cands(tiers: &[u8]) -> Vec<Candidate<u8>> {
        tiers
            .iter()
            .enumerate()
            .map(|(i, t)| Candidate {
                item: *t,
                key: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                tier: *t,
                group: u16::from(*t),
                weight: 1,
                stats: Arc::default(),
            })
            .collect()
    }

    /// Which tier `n` picks land in.
    fn tiers_of(
        c: &[Candidate<u8>],
        tried: &[SocketAddr],
        leave: &[u8],
        n: usize,
    ) -> HashMap<u8, usize> {
        let rr = AtomicUsize::new(0);
        let mut got = HashMap::new();
        for _ in 0..n {
            let p = pick(c, Algorithm::Random, tried, leave, &rr, &Spread::default()).unwrap();
            *got.entry(p.tier).or_insert(0) += 1;
        }
        got
    }

    #[test]
    fn a_healthy_first_priority_takes_everything_and_spills_by_its_health() {
        let c = cands(&[2, 1, 0, 0]);
        assert_eq!(tiers_of(&c, &[], &[], 200).get(&0), Some(&200));
        // A retry takes the other host of the priority (the host it tried
        // stays healthy: Envoy's retry host predicate, not a spill).
        let first = c[2].key;
        let rr = AtomicUsize::new(0);
        for _ in 0..50 {
            let p = pick(
                &c,
                Algorithm::Random,
                &[first],
                &[],
                &rr,
                &Spread::default(),
            )
            .unwrap();
            assert_eq!(p.key, c[3].key);
        }
        // Both tried: the next priority.
        assert_eq!(tiers_of(&c, &[first, c[3].key], &[], 50).get(&1), Some(&50));
        // retryRemoteLocalities: priority 0 left for the next one.
        assert_eq!(tiers_of(&c, &[first], &[0], 50).get(&1), Some(&50));
        // An ejected host does count against its priority: half of
        // priority 0 out, 70% stay (overprovisioning 1.4), 30% spill on.
        let o = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 100,
        };
        assert!(c[2].stats.record(Outcome::ServerError, Some(&o), 0, 4));
        let got = tiers_of(&c, &[], &[], 4000);
        let share =
            |t| f64::from(u32::try_from(got.get(&t).copied().unwrap_or(0)).unwrap()) / 4000.0;
        assert!((share(0) - 0.7).abs() < 0.04, "{got:?}");
        assert!((share(1) - 0.3).abs() < 0.04, "{got:?}");
        assert_eq!(
            got.get(&2),
            None,
            "priority 1 is healthy enough for the rest"
        );
    }

    #[test]
    fn ejected_hosts_count_against_their_priority_and_none_left_means_all() {
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
        for _ in 0..50 {
            // Never the ejected host.
            let p = pick(&c, Algorithm::RoundRobin, &[], &[], &rr, &Spread::default()).unwrap();
            assert_ne!(p.key, c[0].key);
        }
        c[1].stats.record(Outcome::GatewayError, Some(&o), 1, 3);
        c[1].stats.record(Outcome::GatewayError, Some(&o), 1, 3);
        // Priority 0 empty of usable hosts: priority 1 takes everything.
        assert_eq!(tiers_of(&c, &[], &[], 50).get(&1), Some(&50));
        c[2].stats.record(Outcome::GatewayError, Some(&o), 2, 3);
        c[2].stats.record(Outcome::GatewayError, Some(&o), 2, 3);
        // Nothing usable anywhere: the nearest priority, ejection ignored.
        assert_eq!(tiers_of(&c, &[], &[], 50).get(&0), Some(&50));
    }

    #[test]
    fn localities_within_a_priority_are_weighed_by_health() {
        // One priority, two localities: x (weight 1, half its hosts
        // ejected) and y (weight 2): Envoy's 26/74.
        let mut c = cands(&[0, 0, 0, 0]);
        for (i, x) in c.iter_mut().enumerate() {
            x.group = u16::from(i >= 2);
            x.weight = if i >= 2 { 2 } else { 1 };
        }
        let o = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 100,
        };
        assert!(c[0].stats.record(Outcome::ServerError, Some(&o), 0, 4));
        let rr = AtomicUsize::new(0);
        let weighted = Spread {
            weighted: true,
            panic_threshold: 0.0,
        };
        let n = 6000;
        let x = (0..n)
            .filter(|_| {
                pick(&c, Algorithm::Random, &[], &[], &rr, &weighted)
                    .unwrap()
                    .group
                    == 0
            })
            .count();
        let share = f64::from(u32::try_from(x).unwrap()) / f64::from(n);
        assert!((share - 0.259).abs() < 0.03, "{share}");
    }

    #[test]
    fn a_silent_address_puts_every_host_at_it_out_and_tells_its_waiters() {
        let hosts = Hosts::default();
        let addr = SocketAddr::from(([10, 0, 0, 1], 15443));
        let (a, b): (Arc<str>, Arc<str>) = ("reviews".into(), "ratings".into());
        let other = SocketAddr::from(([10, 0, 0, 2], 15443));
        let got = hosts.get_all([(addr, Some(&a)), (addr, Some(&b)), (other, Some(&a))]);
        let waiting = got[1].addr.watch();
        // A refused connect puts the address out but tells no one: requests
        // on connections that answer carry on.
        got[0].addr.out();
        assert!(got[0].unusable() && got[1].unusable() && !got[2].unusable());
        assert!(!waiting.has_changed().unwrap());
        // Failures during the outage do not lengthen it.
        for _ in 0..10 {
            got[0].addr.out();
        }
        assert_eq!(got[0].addr.failures.load(Ordering::Relaxed), 1);
        // A probe finding it silent tells everyone waiting on it.
        got[0].addr.silent();
        assert!(waiting.has_changed().unwrap());
        got[1].addr.answered();
        assert!(!got[0].unusable());
        // One server name silent: that host only.
        got[0].own.silent();
        assert!(got[0].unusable() && !got[1].unusable());
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
                .entry(
                    pick(&c, Algorithm::RoundRobin, &[], &[], &rr, &Spread::default())
                        .unwrap()
                        .key,
                )
                .or_default() += 1;
        }
        assert!(seen.values().all(|n| *n == 100), "{seen:?}");
        // Least request avoids the busy host.
        c[0].stats.active.store(100, Ordering::Relaxed);
        for _ in 0..100 {
            assert_ne!(
                pick(
                    &c,
                    Algorithm::LeastRequest,
                    &[],
                    &[],
                    &rr,
                    &Spread::default()
                )
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
                        pick(c, alg, &[], &[], &rr, &Spread::default()).unwrap().key
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
            let retry = pick(&c, alg, &[c[0].key], &[], &rr, &Spread::default())
                .unwrap()
                .key;
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
