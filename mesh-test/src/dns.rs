//! A real DNS server for tests: dnsmasq on a loopback port, answering only
//! the records the test gives it (every address of a name, with a 1 s TTL),
//! changed in place by rewriting its hosts file and sending SIGHUP.

use crate::process::Proc;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// dnsmasq with its own hosts file. Killed on drop.
pub struct Dnsmasq {
    proc: Proc,
    hosts: PathBuf,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

const PATIENCE: Duration = Duration::from_secs(10);

impl Dnsmasq {
    /// Starts dnsmasq answering `records` (name, IP; a name given several
    /// times has several addresses), once it has read them.
    pub fn start(records: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let hosts = dir.path().join("hosts");
        write_hosts(&hosts, records);
        // dnsmasq binds UDP and TCP: a port free for both, tried a few times.
        for _ in 0..5 {
            let port = crate::free_port();
            if std::net::UdpSocket::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            let mut proc = Proc::spawn(
                "dnsmasq",
                &[
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file=",
                    "--local-ttl=1",
                    "--user=root",
                    "--log-facility=-",
                    &format!("--port={port}"),
                    &format!("--addn-hosts={}", hosts.display()),
                ],
            );
            // It logs "read FILE" once its sockets are bound and the file read.
            let read = format!("read {}", hosts.display());
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                proc.wait_for_line(&read, PATIENCE)
            }))
            .is_ok()
            {
                return Self {
                    proc,
                    hosts,
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    _dir: dir,
                };
            }
        }
        panic!("dnsmasq did not start (Debian dnsmasq-base; scripts/deps.sh installs it)");
    }

    /// Where it answers (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the records; returns once dnsmasq has read them.
    pub fn set(&mut self, records: &[(&str, &str)]) {
        write_hosts(&self.hosts, records);
        self.proc.signal("HUP");
        self.proc
            .wait_for_line(&format!("read {}", self.hosts.display()), PATIENCE);
    }
}

fn write_hosts(path: &std::path::Path, records: &[(&str, &str)]) {
    let text: String = records
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect();
    std::fs::write(path, text).expect("write the hosts file");
}
