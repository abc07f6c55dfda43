//! Resolves the DNS names of clusters' gateways (a LoadBalancer known by
//! hostname, as AWS NLBs are) with hickory-resolver, in a task of its own:
//! the names a node wants are looked up when their TTL runs out, every
//! address of an answer is kept, and when DNS fails the last good answer
//! stays in force (retried every few seconds). Readers never wait: they
//! read the answers in force ([`Dns::ips`]).
//!
//! The agent reaches remote clusters through these addresses; the gateway
//! probes them and attributes incoming connections with them.

use arc_swap::ArcSwap;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

/// Shortest refresh interval, whatever the TTL says (a TTL of 0 must not
/// make us query in a loop).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest: an address change is noticed within this even with long TTLs.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// Retry interval after a failed lookup.
pub const RETRY: Duration = Duration::from_secs(5);
/// Names looked up at once.
const PARALLEL: usize = 8;
/// How often an idle task checks whether anyone still holds a handle.
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// Names wanted at most (a node knows a few per cluster).
pub const MAX_NAMES: usize = 4096;

/// The answers in force, by name.
pub type Answers = HashMap<String, Arc<[IpAddr]>>;

struct Inner {
    resolver: TokioResolver,
    want: Mutex<BTreeSet<String>>,
    wake: Notify,
    answers: ArcSwap<Answers>,
    changed: watch::Sender<u64>,
}

/// A handle on the resolver task (cheap to clone).
#[derive(Clone)]
pub struct Dns {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("answers", &self.inner.answers.load().len())
            .finish()
    }
}

impl Dns {
    /// Uses the system's resolver configuration (/etc/resolv.conf), or only
    /// `server` when given. Nothing runs until [`Dns::run`] is spawned.
    pub fn new(server: Option<SocketAddr>) -> anyhow::Result<Self> {
        let mut builder = match server {
            Some(s) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                let ns = NameServerConfig::new(s.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()?,
        };
        let opts = builder.options_mut();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        Ok(Self {
            inner: Arc::new(Inner {
                resolver: builder.build()?,
                want: Mutex::new(BTreeSet::new()),
                wake: Notify::new(),
                answers: ArcSwap::default(),
                changed: watch::channel(0).0,
            }),
        })
    }

    /// The names to resolve, replacing the previous set (at most
    /// [`MAX_NAMES`]); names no longer wanted are forgotten.
    pub fn want(&self, names: impl IntoIterator<Item = String>) {
        let names: BTreeSet<String> = names.into_iter().take(MAX_NAMES).collect();
        let mut want = self
            .inner
            .want
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *want != names {
            *want = names;
            drop(want);
            self.inner.wake.notify_one();
        }
    }

    /// The addresses `name` resolves to now: the last good answer; `None`
    /// if it has never been answered (or is not wanted).
    pub fn ips(&self, name: &str) -> Option<Arc<[IpAddr]>> {
        self.inner.answers.load().get(name).cloned()
    }

    /// Every answer in force.
    pub fn answers(&self) -> Arc<Answers> {
        self.inner.answers.load_full()
    }

    /// Bumped whenever an answer changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Resolves the wanted names for as long as a handle lives elsewhere
    /// (spawn it; it ends within seconds of the last other handle's drop).
    pub async fn run(self) {
        let inner = self.inner;
        let mut due: HashMap<String, Instant> = HashMap::new();
        // Every other handle gone: nobody reads the answers any more.
        while Arc::strong_count(&inner) > 1 {
            let want = inner
                .want
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            due.retain(|n, _| want.contains(n));
            let now = Instant::now();
            let todo: Vec<String> = want
                .iter()
                .filter(|n| due.get(*n).is_none_or(|at| *at <= now))
                .cloned()
                .collect();
            let current = inner.answers.load_full();
            let mut answers: Answers = current
                .iter()
                .filter(|(n, _)| want.contains(*n))
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect();
            for chunk in todo.chunks(PARALLEL) {
                let lookups = chunk.iter().map(|n| lookup(&inner.resolver, n));
                for (name, got) in chunk.iter().zip(futures::future::join_all(lookups).await) {
                    match got {
                        Ok((ips, ttl)) => {
                            debug!(host = %name, ?ips, ?ttl, "resolved gateway address");
                            due.insert(
                                name.clone(),
                                Instant::now() + ttl.clamp(MIN_REFRESH, MAX_REFRESH),
                            );
                            answers.insert(name.clone(), ips);
                        }
                        Err(e) => {
                            match answers.get(name) {
                                Some(kept) => {
                                    warn!(host = %name, error = %e, ?kept, "gateway DNS lookup failed; keeping the last good answer")
                                }
                                None => {
                                    warn!(host = %name, error = %e, "gateway DNS lookup failed")
                                }
                            }
                            due.insert(name.clone(), Instant::now() + RETRY);
                        }
                    }
                }
            }
            if answers != *current {
                inner.answers.store(Arc::new(answers));
                inner.changed.send_modify(|v| *v += 1);
            }
            // Until the next answer runs out, new names are wanted, or a
            // while passes (to notice the handles gone).
            let next = due
                .values()
                .min()
                .copied()
                .unwrap_or_else(|| Instant::now() + MAX_REFRESH)
                .min(Instant::now() + IDLE_CHECK);
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = inner.wake.notified() => {}
            }
        }
    }
}

/// One lookup: every address (sorted), and how long the answer holds. An
/// answer with no address counts as a failure (the last good one stays).
async fn lookup(r: &TokioResolver, name: &str) -> anyhow::Result<(Arc<[IpAddr]>, Duration)> {
    // A fully qualified name: no search domains appended.
    let fqdn = format!("{name}.");
    let answer = r.lookup_ip(fqdn.as_str()).await?;
    let mut ips: Vec<IpAddr> = answer.iter().collect();
    ips.sort_unstable();
    ips.dedup();
    if ips.is_empty() {
        anyhow::bail!("no address");
    }
    let ttl = answer
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    Ok((ips.into(), ttl))
}
