//! The network under `meshctl demo --netns` (what `deploy/local/up.sh`
//! runs): every cluster in a network namespace of its own, the regions'
//! bridges and the WAN relay in one more, addresses from the benchmarking
//! range 198.18.0.0/15. Needs root.
//!
//! ```text
//!  root namespace          fedmesh-wan                         fedmesh-<cluster>
//!  fedmesh0 198.19.255.1 ── host0 198.19.255.2 (federation, relay control)
//!  route 198.18.0.0/16      br-us-east 198.18.1.1, relay source .2 ── eth0 198.18.1.10 (us-east-1)
//!                                                                  ── eth0 198.18.1.11 (us-east-2)
//!                           br-us-west 198.18.2.1, .2            ── eth0 198.18.2.10 (us-west-1)
//!                           br-eu-west 198.18.3.1, .2            ── eth0 198.18.3.10 (eu-west-1)
//! ```
//!
//! Clusters of a region share its bridge and reach each other directly.
//! Between regions the WAN namespace forwards nothing: a cluster's
//! connections to another region's gateway are turned (iptables DNAT in
//! the caller's namespace) to a link of the WAN relay for that region pair,
//! which adds the pair's delay, jitter and loss, connects from the
//! region's relay address and tells the gateway who the caller was with a
//! PROXY protocol v2 header (the gateway trusts it from that address only).
//! Each cluster reaches the federation through a relay link of its own,
//! which a drill cuts to partition it. A black hole is an iptables DROP in
//! the gateway's namespace.
//!
//! The processes of a cluster are tasks on a runtime whose thread entered
//! its namespace ([`NsRuntime`]): every socket they open is in it.
//! Everything made here (namespaces, their interfaces, addresses, routes
//! and iptables rules) goes with the namespaces, which [`Network`] deletes
//! when dropped — also after a failed start — and `deploy/local/down.sh`
//! deletes after a crash.

use crate::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::process::Command;
use std::time::Duration;
use tokio::runtime::Handle;

/// The namespace of the regions' bridges, the relay and the federation.
pub const WAN_NS: &str = "fedmesh-wan";
/// The root namespace's end of its link to [`WAN_NS`].
pub const HOST_IF: &str = "fedmesh0";
const WAN_HOST_IF: &str = "host0";
/// The root namespace's address on that link.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// The WAN namespace's address on it: the federation and the relay's
/// control API listen here.
pub const WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
/// Every gateway's port, as Istio's east-west gateways.
pub const GATEWAY_PORT: u16 = 15443;
/// Every gateway's admin port (`/metrics`), as Istio's status port.
pub const GATEWAY_ADMIN_PORT: u16 = 15021;

/// A cluster's namespace.
pub fn namespace(cluster: &str) -> String {
    format!("fedmesh-{cluster}")
}

/// The third octet of a region's /24 (1, 2, ...), by order of first
/// appearance.
fn region_index(regions: &[&str], region: &str) -> Option<u8> {
    regions
        .iter()
        .position(|r| *r == region)
        .and_then(|i| u8::try_from(i + 1).ok())
}

/// A region's bridge address: the clusters' default gateway, where the
/// relay's links for callers of that region listen.
pub fn bridge_ip(region: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, region, 1)
}

/// The address the relay connects from into a region: the only source
/// that region's gateways take a PROXY protocol header from.
pub fn relay_source_ip(region: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, region, 2)
}

/// One cluster's place in the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNet {
    /// The cluster.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its region's index (third octet).
    pub region_index: u8,
    /// Its namespace.
    pub namespace: String,
    /// Its address (on `eth0`).
    pub ip: Ipv4Addr,
}

impl ClusterNet {
    /// Where its gateway listens (the address the federation lists).
    pub fn gateway(&self) -> SocketAddr {
        (self.ip, GATEWAY_PORT).into()
    }
}

/// The addresses of every cluster of `clusters` (name, region), in order.
pub fn plan(clusters: &[(&str, &str)]) -> Vec<ClusterNet> {
    let mut regions: Vec<&str> = Vec::new();
    for (_, r) in clusters {
        if !regions.contains(r) {
            regions.push(r);
        }
    }
    let mut next_host = std::collections::BTreeMap::<u8, u8>::new();
    clusters
        .iter()
        .filter_map(|(name, region)| {
            let idx = region_index(&regions, region)?;
            let host = next_host.entry(idx).or_insert(10);
            let ip = Ipv4Addr::new(198, 18, idx, *host);
            *host += 1;
            Some(ClusterNet {
                name: (*name).to_string(),
                region: (*region).to_string(),
                region_index: idx,
                namespace: namespace(name),
                ip,
            })
        })
        .collect()
}

/// The WAN between two regions: one-way delay, jitter and loss. Between
/// the US regions 15 ms each way (30 ms round trip), between the US and
/// Europe 30 ms each way with 0.1% of chunks lost (each lost chunk waits
/// one 200 ms retransmission timeout).
pub fn wan_between(a: &str, b: &str) -> wan_relay::Change {
    let us = |r: &str| r.starts_with("us-");
    if us(a) && us(b) {
        wan_relay::Change::new()
            .delay(Duration::from_millis(15))
            .jitter(Duration::from_millis(1))
    } else {
        wan_relay::Change::new()
            .delay(Duration::from_millis(30))
            .jitter(Duration::from_millis(2))
            .loss(0.001)
    }
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command inside namespace `ns`.
pub fn exec(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    run(&v)
}

/// Namespaces of ours that exist now (a topology up, or left by a crash).
pub fn existing() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("fedmesh-"))
                .collect()
        })
        .unwrap_or_default()
}

/// What the netns topology needs before it changes anything: root, `ip`
/// and `iptables`, and none of its namespaces or interfaces in the way.
pub fn preflight(clusters: &[ClusterNet]) -> Result<(), Error> {
    let fail = |m: String| Err(Error::Usage(m));
    match Command::new("id").arg("-u").output() {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {}
        _ => return fail("--netns needs root (network namespaces, veth, iptables)".into()),
    }
    for tool in ["ip", "iptables"] {
        let found = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return fail(format!(
                "--netns needs `{tool}` (Debian: apt-get install iproute2 iptables)"
            ));
        }
    }
    let mut ours: Vec<String> = clusters.iter().map(|c| c.namespace.clone()).collect();
    ours.push(WAN_NS.into());
    let taken: Vec<String> = existing()
        .into_iter()
        .filter(|n| ours.contains(n))
        .collect();
    if !taken.is_empty() {
        return fail(format!(
            "network namespaces {} already exist: a local topology is up, or one crashed \
             (deploy/local/down.sh removes them); nothing was changed",
            taken.join(", ")
        ));
    }
    if std::path::Path::new(&format!("/sys/class/net/{HOST_IF}")).exists() {
        return fail(format!(
            "interface {HOST_IF} already exists (deploy/local/down.sh removes it); nothing was changed"
        ));
    }
    Ok(())
}

/// A thread inside a network namespace running a tokio runtime: the
/// sockets of every task spawned on [`NsRuntime::handle`] are in that
/// namespace (as are the threads it starts, which inherit it).
pub struct NsRuntime {
    handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    /// Starts the thread, enters `ns` and builds the runtime.
    pub fn start(ns: &str) -> Result<Self, Error> {
        let path = format!("/var/run/netns/{ns}");
        let file = std::fs::File::open(&path)
            .map_err(|e| Error::Other(anyhow::anyhow!("cannot open {path}: {e}")))?;
        let (ready, wait) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let name = ns.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("netns {ns}"))
            .spawn(move || {
                let entered = rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| format!("cannot enter the network namespace {name}: {e}"));
                let rt = entered.and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("a runtime in {name}: {e}"))
                });
                match rt {
                    Ok(rt) => {
                        let _ = ready.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                        rt.shutdown_timeout(Duration::from_secs(2));
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::Other(e.into()))?;
        let handle = wait
            .recv()
            .map_err(|e| Error::Other(e.into()))?
            .map_err(|e| Error::Other(anyhow::anyhow!(e)))?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where to spawn tasks that must live in the namespace.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The network made for one topology: its namespaces' runtimes, and the
/// namespaces themselves, deleted (with everything in them) on drop.
pub struct Network {
    /// Per cluster, in plan order.
    pub clusters: Vec<ClusterNet>,
    /// Runtime in [`WAN_NS`].
    pub wan: Option<NsRuntime>,
    /// Runtime per cluster, in plan order.
    pub runtimes: Vec<NsRuntime>,
    namespaces: Vec<String>,
}

impl Network {
    /// Makes the namespaces, links, bridges, addresses, routes and the
    /// WAN's forwarding rules, and a runtime in each namespace. On any
    /// failure what was made is removed before the error returns.
    pub fn create(clusters: Vec<ClusterNet>, progress: &dyn Fn(String)) -> Result<Self, Error> {
        preflight(&clusters)?;
        let mut net = Self {
            clusters,
            wan: None,
            runtimes: Vec::new(),
            namespaces: Vec::new(),
        };
        net.build(progress)
            .map_err(|e| Error::Other(anyhow::anyhow!("setting up the network: {e}")))?;
        net.wan = Some(NsRuntime::start(WAN_NS)?);
        for c in &net.clusters {
            net.runtimes.push(NsRuntime::start(&c.namespace)?);
        }
        Ok(net)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        run(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        run(&["ip", "-n", name, "link", "set", "lo", "up"])
    }

    fn build(&mut self, progress: &dyn Fn(String)) -> Result<(), String> {
        self.add_ns(WAN_NS)?;
        let w = |args: &[&str]| {
            let mut v = vec!["ip", "-n", WAN_NS];
            v.extend_from_slice(args);
            run(&v)
        };
        // The operator's way in: a veth from the root namespace.
        run(&[
            "ip",
            "link",
            "add",
            HOST_IF,
            "type",
            "veth",
            "peer",
            "name",
            WAN_HOST_IF,
            "netns",
            WAN_NS,
        ])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_IP}/30"),
            "dev",
            HOST_IF,
        ])?;
        run(&["ip", "link", "set", HOST_IF, "up"])?;
        w(&["addr", "add", &format!("{WAN_IP}/30"), "dev", WAN_HOST_IF])?;
        w(&["link", "set", WAN_HOST_IF, "up"])?;
        run(&[
            "ip",
            "route",
            "add",
            "198.18.0.0/16",
            "via",
            &WAN_IP.to_string(),
            "dev",
            HOST_IF,
        ])?;
        exec(WAN_NS, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // The WAN forwards between the operator and the clusters, and
        // within a region's bridge; never from one region to another (that
        // goes through the relay).
        let ipt = |args: &[&str]| {
            let mut v = vec!["iptables", "-w"];
            v.extend_from_slice(args);
            exec(WAN_NS, &v)
        };
        ipt(&["-P", "FORWARD", "DROP"])?;
        ipt(&["-A", "FORWARD", "-i", WAN_HOST_IF, "-j", "ACCEPT"])?;
        ipt(&["-A", "FORWARD", "-o", WAN_HOST_IF, "-j", "ACCEPT"])?;
        let mut bridges: Vec<(u8, String)> = Vec::new();
        for c in &self.clusters {
            if !bridges.iter().any(|(i, _)| *i == c.region_index) {
                let br = format!("br-{}", c.region);
                let br: String = br.chars().take(15).collect();
                w(&["link", "add", &br, "type", "bridge"])?;
                w(&[
                    "addr",
                    "add",
                    &format!("{}/24", bridge_ip(c.region_index)),
                    "dev",
                    &br,
                ])?;
                w(&[
                    "addr",
                    "add",
                    &format!("{}/24", relay_source_ip(c.region_index)),
                    "dev",
                    &br,
                ])?;
                w(&["link", "set", &br, "up"])?;
                ipt(&["-A", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"])?;
                bridges.push((c.region_index, br));
            }
        }
        let clusters = self.clusters.clone();
        for (i, c) in clusters.iter().enumerate() {
            self.add_ns(&c.namespace)?;
            let port: String = format!("v-{}", c.name).chars().take(15).collect();
            let br = bridges
                .iter()
                .find(|(i, _)| *i == c.region_index)
                .map(|(_, b)| b.clone())
                .ok_or("no bridge")?;
            w(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &c.namespace,
            ])?;
            w(&["link", "set", &port, "master", &br])?;
            w(&["link", "set", &port, "up"])?;
            let n = |args: &[&str]| {
                let mut v = vec!["ip", "-n", c.namespace.as_str()];
                v.extend_from_slice(args);
                run(&v)
            };
            n(&["addr", "add", &format!("{}/24", c.ip), "dev", "eth0"])?;
            n(&["link", "set", "eth0", "up"])?;
            n(&[
                "route",
                "add",
                "default",
                "via",
                &bridge_ip(c.region_index).to_string(),
            ])?;
            progress(format!(
                "[{}/{}] namespace {} ({}): {} on {br}",
                i + 1,
                clusters.len(),
                c.namespace,
                c.region,
                c.ip
            ));
        }
        Ok(())
    }

    /// Turns cluster `from`'s connections to `to`'s gateway to `via` (a
    /// relay link in the WAN namespace).
    pub fn divert(&self, from: &ClusterNet, to: &ClusterNet, via: SocketAddr) -> Result<(), Error> {
        exec(
            &from.namespace,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                &to.ip.to_string(),
                "--dport",
                &GATEWAY_PORT.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &via.to_string(),
            ],
        )
        .map_err(|e| Error::Other(anyhow::anyhow!(e)))
    }

    /// The runtime of cluster `name`.
    pub fn runtime(&self, name: &str) -> Option<&NsRuntime> {
        self.clusters
            .iter()
            .position(|c| c.name == name)
            .and_then(|i| self.runtimes.get(i))
    }
}

/// Inbound capture, as the sidecar template's init container does it: TCP
/// arriving in `ns` for the application at `app` goes to the agent's inbound
/// listener on port `inbound` (the agent's own connections to the
/// application are made inside the namespace and are not redirected).
pub fn capture_inbound(ns: &str, app: SocketAddr, inbound: u16) -> Result<(), String> {
    exec(
        ns,
        &[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-d",
            &app.ip().to_string(),
            "--dport",
            &app.port().to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            &inbound.to_string(),
        ],
    )
}

/// Drops (or adds back) every packet to `ns`'s gateway port: a black hole,
/// no reset.
pub fn blackhole(ns: &str, on: bool) -> Result<(), String> {
    let rule = [
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &GATEWAY_PORT.to_string(),
        "-j",
        "DROP",
    ]
    .map(str::to_string);
    let present = {
        let mut v = vec!["iptables", "-w", "-C"];
        v.extend(rule.iter().map(String::as_str));
        exec(ns, &v).is_ok()
    };
    if present == on {
        return Ok(());
    }
    let mut v = vec!["iptables", "-w", if on { "-I" } else { "-D" }];
    v.extend(rule.iter().map(String::as_str));
    exec(ns, &v)
}

impl Drop for Network {
    fn drop(&mut self) {
        // The runtimes' threads hold the namespaces: stop them first.
        self.runtimes.clear();
        self.wan = None;
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                tracing::warn!("{e}");
            }
        }
        // Gone with the WAN namespace's end of it; in case it is not.
        if std::path::Path::new(&format!("/sys/class/net/{HOST_IF}")).exists() {
            let _ = run(&["ip", "link", "del", HOST_IF]);
        }
    }
}

/// The address a cluster's listeners bind.
pub fn ip_of(c: &ClusterNet) -> IpAddr {
    IpAddr::V4(c.ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_numbers_regions_and_hosts() {
        let p = plan(&[
            ("us-east-1", "us-east"),
            ("us-east-2", "us-east"),
            ("us-west-1", "us-west"),
            ("eu-west-1", "eu-west"),
        ]);
        let ips: Vec<String> = p.iter().map(|c| c.ip.to_string()).collect();
        assert_eq!(
            ips,
            ["198.18.1.10", "198.18.1.11", "198.18.2.10", "198.18.3.10"]
        );
        assert_eq!(p[3].namespace, "fedmesh-eu-west-1");
        assert_eq!(p[3].gateway(), "198.18.3.10:15443".parse().unwrap());
        assert_eq!(relay_source_ip(3).to_string(), "198.18.3.2");
    }

    #[test]
    fn the_wan_is_slower_across_the_atlantic() {
        let us = wan_between("us-east", "us-west").delay.unwrap();
        let eu = wan_between("us-east", "eu-west").delay.unwrap();
        assert!(eu > us, "{eu:?} {us:?}");
        assert_eq!(eu, Duration::from_millis(30));
    }
}
