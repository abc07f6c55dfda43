//! Resolves the DNS names of remote clusters' gateways with hickory-resolver,
//! so that connections from those gateways' addresses are attributed to
//! their cluster. Answers are refreshed when their TTL runs out; when DNS
//! fails, the last good answer stays in force (retried every few seconds).

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Shortest refresh interval, whatever the TTL says (a TTL of 0 must not
/// make us query in a loop).
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest: an address change is noticed within this even with long TTLs.
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// Retry interval after a failed lookup.
const RETRY: Duration = Duration::from_secs(5);

struct Entry {
    ips: Vec<IpAddr>,
    refresh_at: Instant,
}

/// A caching resolver of gateway host names.
pub struct PeerResolver {
    resolver: TokioResolver,
    cache: HashMap<String, Entry>,
}

impl PeerResolver {
    /// Uses the system's resolver configuration (/etc/resolv.conf), or only
    /// `server` when given.
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
            resolver: builder.build()?,
            cache: HashMap::new(),
        })
    }

    /// Is `host` due for a lookup?
    pub fn due(&self, host: &str) -> bool {
        self.cache
            .get(host)
            .is_none_or(|e| Instant::now() >= e.refresh_at)
    }

    /// Looks `host` up if due. Returns the addresses now in force: the
    /// fresh answer, or the last good one when the lookup fails; `None` if
    /// there has never been an answer.
    pub async fn resolve(&mut self, host: &str) -> Option<Vec<IpAddr>> {
        if !self.due(host) {
            return self.cache.get(host).map(|e| e.ips.clone());
        }
        match self.resolver.lookup_ip(host).await {
            Ok(answer) => {
                let mut ips: Vec<IpAddr> = answer.iter().collect();
                ips.sort();
                let ttl = answer
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                let refresh_at = Instant::now() + ttl.clamp(MIN_REFRESH, MAX_REFRESH);
                debug!(host, ?ips, ?ttl, "resolved gateway address");
                self.cache.insert(
                    host.to_string(),
                    Entry {
                        ips: ips.clone(),
                        refresh_at,
                    },
                );
                Some(ips)
            }
            Err(e) => {
                let retry = Instant::now() + RETRY;
                match self.cache.get_mut(host) {
                    Some(last) => {
                        warn!(host, error = %e, kept = ?last.ips, "gateway DNS lookup failed; keeping the last good answer");
                        last.refresh_at = retry;
                        Some(last.ips.clone())
                    }
                    None => {
                        warn!(host, error = %e, "gateway DNS lookup failed");
                        self.cache.insert(
                            host.to_string(),
                            Entry {
                                ips: Vec::new(),
                                refresh_at: retry,
                            },
                        );
                        None
                    }
                }
            }
        }
    }
}
