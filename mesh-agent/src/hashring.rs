//! Consistent hashing as Envoy does it, for DestinationRule
//! `consistentHash`: a ring of virtual nodes (`ringHash`, Istio's default)
//! or Maglev's lookup table (`maglev`).
//!
//! Both place hosts by the xxHash64 of their address, as Envoy does, so
//! every agent maps a key to the same host. When a host leaves, only the
//! keys it held move (ring), or about that many (Maglev); when one joins,
//! about 1/n of the keys move to it.
//!
//! Building a table costs what its size costs (65,537 slots for Maglev by
//! default): [`Tables`] keeps the tables of the host sets in use, so a
//! request only looks one up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use xxhash_rust::xxh64::xxh64;

/// Envoy's default (and Istio's) minimum ring size.
pub const DEFAULT_MIN_RING: u64 = 1024;
/// Largest ring built: a larger minimum is clamped to it. Envoy allows 8M
/// points (128 MiB, a second to build); a table is built on the request
/// path when the hosts change, so the agent keeps it to 2 MiB.
pub const MAX_RING: u64 = 128 * 1024;
/// Envoy's default Maglev table size (a prime).
pub const DEFAULT_MAGLEV: u64 = 65_537;
/// Largest Maglev table built (a prime, 512 KiB); a larger `tableSize` is
/// built at this size, so every agent still maps keys alike.
pub const MAX_MAGLEV: u64 = 131_071;
/// Table entries kept across all cached tables (about 32 MiB of rings).
const MAX_CACHED_ENTRIES: usize = 2 * 1024 * 1024;

/// Which table, and how large.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Ring hash with at least this many entries.
    Ring {
        /// `ringHash.minimumRingSize`.
        min_size: u64,
    },
    /// Maglev with this table size (a prime: validation sees to it).
    Maglev {
        /// `maglev.tableSize`.
        table_size: u64,
    },
}

impl Default for Kind {
    fn default() -> Self {
        Self::Ring {
            min_size: DEFAULT_MIN_RING,
        }
    }
}

/// A built table over a list of hosts: maps a request hash to an index
/// into that list.
#[derive(Debug)]
pub enum Table {
    /// Sorted (hash, host index) points.
    Ring(Vec<(u64, u32)>),
    /// Slot -> host index.
    Maglev(Vec<u32>),
}

impl Table {
    /// Builds the table for `hosts` (at least one).
    pub fn build(kind: Kind, hosts: &[SocketAddr]) -> Self {
        match kind {
            Kind::Ring { min_size } => Self::Ring(ring(hosts, min_size)),
            Kind::Maglev { table_size } => Self::Maglev(maglev(hosts, table_size.min(MAX_MAGLEV))),
        }
    }

    /// The host index for a request hash.
    pub fn pick(&self, hash: u64) -> usize {
        self.pick_usable(hash, |_| true).unwrap_or(0)
    }

    /// The host index for a request hash, passing over hosts that are not
    /// `usable` (ejected, or tried by an earlier attempt): the ring walks on
    /// to the next point, Maglev to the next slot. The table stays the same
    /// while hosts are ejected and come back, so only the keys of an
    /// ejected host move, and they come back with it.
    pub fn pick_usable(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            Self::Ring(points) => {
                // The first point at or after the hash, wrapping around.
                let start = points.partition_point(|(h, _)| *h < hash);
                points[start..]
                    .iter()
                    .chain(&points[..start])
                    .map(|p| p.1 as usize)
                    .find(|i| usable(*i))
            }
            Self::Maglev(slots) => {
                let n = slots.len() as u64;
                let start = usize::try_from(hash % n.max(1)).unwrap_or(0);
                slots[start..]
                    .iter()
                    .chain(&slots[..start])
                    .map(|i| *i as usize)
                    .find(|i| usable(*i))
            }
        }
    }

    /// Entries in the table (ring points or Maglev slots).
    pub fn len(&self) -> usize {
        match self {
            Self::Ring(p) => p.len(),
            Self::Maglev(s) => s.len(),
        }
    }

    /// Has the table no entries? (Never, for a host list that has one.)
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Envoy's ring: each host gets `ceil(min_size / hosts)` points (equal
/// weights), hashed from `"<address>_<i>"`, the whole sorted by hash.
/// As in Envoy, the count per host depends on the number of hosts, so a
/// host joining or leaving for good also moves some keys between the
/// others (up to about 1/n more); ejections do not rebuild the ring
/// ([`Table::pick_usable`]).
fn ring(hosts: &[SocketAddr], min_size: u64) -> Vec<(u64, u32)> {
    let n = hosts.len().max(1) as u64;
    let min_size = min_size.clamp(1, MAX_RING);
    let per_host = min_size.div_ceil(n).max(1);
    let mut points = Vec::with_capacity(usize::try_from(per_host * n).unwrap_or(0));
    for (i, h) in hosts.iter().enumerate() {
        let base = h.to_string();
        let mut key = String::with_capacity(base.len() + 8);
        for k in 0..per_host {
            key.clear();
            key.push_str(&base);
            key.push('_');
            key.push_str(&k.to_string());
            points.push((
                xxh64(key.as_bytes(), 0),
                u32::try_from(i).unwrap_or(u32::MAX),
            ));
        }
    }
    // Ties (vanishingly rare) broken by host index, so every agent agrees.
    points.sort_unstable();
    points
}

/// Maglev (Eisenbud et al., NSDI 2016) as Envoy builds it: each host walks
/// its own permutation of the slots (offset and skip from two hashes of its
/// address) and, in turn, takes its next free slot until all are taken.
fn maglev(hosts: &[SocketAddr], table_size: u64) -> Vec<u32> {
    let m = table_size.max(1);
    let size = usize::try_from(m).unwrap_or(usize::MAX);
    // Hosts take slots in the order of their addresses, not of the list,
    // so agents listing the same hosts differently build the same table.
    let mut order: Vec<(String, u32)> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.to_string(), u32::try_from(i).unwrap_or(u32::MAX)))
        .collect();
    order.sort_unstable();
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|(a, _)| {
            let offset = xxh64(a.as_bytes(), 0) % m;
            let skip = if m > 1 {
                xxh64(a.as_bytes(), 1) % (m - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();
    if perms.is_empty() {
        return vec![0; size];
    }
    let mut slots = vec![u32::MAX; size];
    let mut next = vec![0u64; perms.len()];
    let mut filled = 0usize;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            // The host's next preferred slot that is still free.
            // A prime size makes each host's walk cover every slot; should
            // a size not be prime, the walk falls back to the next free slot.
            let slot = loop {
                let c = (offset + next[i] * skip) % m;
                next[i] += 1;
                let c = usize::try_from(c).unwrap_or(0);
                if slots[c] == u32::MAX {
                    break c;
                }
                if next[i] > m {
                    break slots.iter().position(|s| *s == u32::MAX).unwrap_or(0);
                }
            };
            slots[slot] = order[i].1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    slots
}

/// Tables for the host lists in use, by kind and list. Host lists change
/// when endpoints come and go or get ejected; a few dozen entries cover an
/// agent's destinations, and the cache starts over past [`Tables::CAP`].
#[derive(Default)]
pub struct Tables {
    map: Mutex<HashMap<TableKey, Arc<Table>>>,
}

/// A table's kind and the hosts it is built over, in order.
type TableKey = (Kind, Vec<SocketAddr>);

impl Tables {
    /// Tables kept at most.
    pub const CAP: usize = 256;

    /// The table for `hosts` (built on first use).
    pub fn get(&self, kind: Kind, hosts: &[SocketAddr]) -> Arc<Table> {
        let key = (kind, hosts.to_vec());
        if let Some(t) = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return t.clone();
        }
        // Built outside the lock: a Maglev table takes a few milliseconds.
        let t = Arc::new(Table::build(kind, hosts));
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held: usize = map.values().map(|t| t.len()).sum();
        if map.len() >= Self::CAP || held + t.len() > MAX_CACHED_ENTRIES {
            map.clear();
        }
        map.entry(key).or_insert(t).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, (i / 200) as u8, (i % 200) as u8 + 1], 8080)))
            .collect()
    }

    const KEYS: u64 = 100_000;

    fn owners(kind: Kind, hs: &[SocketAddr]) -> Vec<SocketAddr> {
        let t = Table::build(kind, hs);
        (0..KEYS)
            .map(|k| hs[t.pick(xxh64(&k.to_le_bytes(), 7))])
            .collect()
    }

    fn kinds() -> [Kind; 3] {
        [
            Kind::default(),
            Kind::Ring { min_size: 4096 },
            Kind::Maglev {
                table_size: DEFAULT_MAGLEV,
            },
        ]
    }

    #[test]
    fn an_ejected_host_gives_up_exactly_its_keys_and_takes_them_back() {
        for kind in kinds() {
            for n in [3u16, 10, 25] {
                let hs = hosts(n);
                let t = Table::build(kind, &hs);
                let gone = 1usize;
                let mut held = 0;
                let mut moved = 0;
                for k in 0..KEYS {
                    let h = xxh64(&k.to_le_bytes(), 7);
                    let before = t.pick(h);
                    let after = t.pick_usable(h, |i| i != gone).unwrap();
                    assert_ne!(after, gone);
                    held += usize::from(before == gone);
                    moved += usize::from(before != after);
                }
                // Exactly the ejected host's keys move; they are about 1/n.
                assert_eq!(moved, held, "{kind:?} n={n}");
                let f = moved as f64 / KEYS as f64;
                let want = 1.0 / f64::from(n);
                assert!(
                    f > want * 0.5 && f < want * 1.6,
                    "{kind:?} n={n}: {f:.3} of the keys moved, about {want:.3} expected"
                );
                // Nothing usable: no host.
                assert_eq!(t.pick_usable(5, |_| false), None);
            }
        }
    }

    #[test]
    fn a_host_leaving_for_good_moves_about_one_in_n_keys() {
        for kind in kinds() {
            for n in [3u16, 10, 25] {
                let all = hosts(n);
                let before = owners(kind, &all);
                let gone = all[1];
                let rest: Vec<SocketAddr> = all.iter().copied().filter(|h| *h != gone).collect();
                let after = owners(kind, &rest);
                let held = before.iter().filter(|h| **h == gone).count();
                let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
                assert!(after.iter().all(|h| *h != gone));
                // Every key of the leaving host moves. Between the others,
                // Maglev moves under 1% of the keys; Envoy's ring up to
                // about 1/n more, as the others' share of points grows.
                let others = moved - held;
                let f = moved as f64 / KEYS as f64;
                let want = 1.0 / f64::from(n);
                match kind {
                    Kind::Ring { .. } => assert!(
                        f > want * 0.5 && f < want * 2.2,
                        "{kind:?} n={n}: {f:.3} of the keys moved, about {want:.3} to {:.3} expected",
                        want * 2.0
                    ),
                    Kind::Maglev { .. } => {
                        assert!(others * 100 < KEYS as usize, "{kind:?} n={n}: {others} others moved");
                        assert!(
                            f > want * 0.5 && f < want * 1.6,
                            "{kind:?} n={n}: {f:.3} of the keys moved, about {want:.3} expected"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_host_joining_takes_about_one_in_n_plus_one_keys() {
        for kind in kinds() {
            let n = 10u16;
            let all = hosts(n + 1);
            let before = owners(kind, &all[..n as usize]);
            let after = owners(kind, &all);
            let new = all[n as usize];
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let to_new = after.iter().filter(|h| **h == new).count();
            let f = to_new as f64 / KEYS as f64;
            assert!(
                f > 0.5 / 11.0 && f < 1.6 / 11.0,
                "{kind:?}: new host took {f:.3}"
            );
            let churn = (moved - to_new) as f64 / KEYS as f64;
            match kind {
                Kind::Ring { .. } => assert!(churn < 1.2 / 11.0, "{kind:?}: {churn:.3}"),
                Kind::Maglev { .. } => assert!(churn < 0.01, "{kind:?}: {churn:.3}"),
            }
        }
    }

    #[test]
    fn keys_spread_over_the_hosts() {
        let n = 10u16;
        let hs = hosts(n);
        for (kind, tolerance) in [
            // ~100 points a host: Envoy's ring is this uneven too.
            (Kind::default(), 0.45),
            (Kind::Ring { min_size: 100_000 }, 0.08),
            (
                Kind::Maglev {
                    table_size: DEFAULT_MAGLEV,
                },
                0.05,
            ),
        ] {
            let o = owners(kind, &hs);
            for h in &hs {
                let share = o.iter().filter(|x| *x == h).count() as f64 / KEYS as f64;
                assert!(
                    (share * f64::from(n) - 1.0).abs() < tolerance,
                    "{kind:?}: {h} holds {share:.3}"
                );
            }
        }
    }

    #[test]
    fn sizes_are_envoys() {
        let hs = hosts(3);
        // At least the minimum, rounded up to equal shares.
        assert_eq!(Table::build(Kind::default(), &hs).len(), 1026);
        assert_eq!(Table::build(Kind::Ring { min_size: 10 }, &hs).len(), 12);
        assert_eq!(
            Table::build(Kind::Ring { min_size: u64::MAX }, &hs[..1]).len() as u64,
            MAX_RING
        );
        assert_eq!(
            Table::build(
                Kind::Maglev {
                    table_size: 4_999_999
                },
                &hs
            )
            .len() as u64,
            MAX_MAGLEV
        );
        // A size that is not prime still fills (and ends).
        assert_eq!(Table::build(Kind::Maglev { table_size: 12 }, &hs).len(), 12);
        let t = Table::build(Kind::Maglev { table_size: 7 }, &hs);
        assert_eq!(t.len(), 7);
        // Maglev shares slots as evenly as the size allows: 3, 2, 2.
        if let Table::Maglev(slots) = &t {
            let mut c = [0; 3];
            for s in slots {
                c[*s as usize] += 1;
            }
            c.sort_unstable();
            assert_eq!(c, [2, 2, 3]);
        }
    }

    #[test]
    fn the_same_hosts_in_any_order_map_keys_alike() {
        // Hosts are placed by address, not by position: two agents that
        // list the endpoints in another order still agree.
        for kind in kinds() {
            let hs = hosts(7);
            let mut rev = hs.clone();
            rev.reverse();
            assert_eq!(owners(kind, &hs), owners(kind, &rev), "{kind:?}");
        }
    }

    #[test]
    fn the_cache_reuses_and_is_bounded() {
        let t = Tables::default();
        let hs = hosts(4);
        let a = t.get(Kind::default(), &hs);
        let b = t.get(Kind::default(), &hs);
        assert!(Arc::ptr_eq(&a, &b));
        for n in 1..=(Tables::CAP as u16 + 10) {
            t.get(Kind::Ring { min_size: 8 }, &hosts(n % 50 + 1)[..]);
            t.get(
                Kind::Ring {
                    min_size: u64::from(n),
                },
                &hs,
            );
        }
        assert!(t.map.lock().unwrap().len() <= Tables::CAP);
    }
}
