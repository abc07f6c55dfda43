//! [`EtcdFixture`]: a real etcd on a free loopback port in a temporary directory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long etcd may take to answer /health after start. A cold start on a
/// loaded 2-core machine takes about a second; 30 s is for a very busy CI.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// A running etcd, killed (by PID) when dropped. Its data directory survives
/// [`EtcdFixture::stop`], so [`EtcdFixture::restart`] brings the same data back.
pub struct EtcdFixture {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    bin: PathBuf,
    /// With TLS: a client certificate etcd accepts, for the health check.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Files of an etcd serving TLS with client-certificate authentication
/// ([`EtcdFixture::start_tls`]): the CA, and a client certificate and key
/// it signed.
pub struct EtcdTlsFiles {
    /// The CA certificate (PEM file).
    pub ca: PathBuf,
    /// A client certificate etcd accepts (PEM file).
    pub cert: PathBuf,
    /// Its key (PEM file).
    pub key: PathBuf,
}

/// Finds the etcd binary: `$FEDMESH_ETCD_BIN`, then `etcd` on `PATH`.
pub fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("FEDMESH_ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("etcd");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err("the etcd binary was not found on PATH (set FEDMESH_ETCD_BIN, or run scripts/test.sh, which \
         installs Debian's etcd-server)"
        .to_string())
}

impl EtcdFixture {
    /// Starts etcd and waits until it serves. Panics with a clear message
    /// when the binary is missing or etcd does not come up.
    pub fn start() -> Self {
        let bin = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("fedmesh-etcd-")
            .tempdir()
            .expect("create a temp dir for etcd");
        let mut fx = Self {
            child: None,
            dir,
            client_port: crate::free_port(),
            peer_port: crate::free_port(),
            bin,
            tls: None,
        };
        fx.spawn();
        fx
    }

    /// Starts etcd serving clients over TLS with a certificate from `ca`
    /// (for `127.0.0.1`) and requiring a client certificate signed by `ca`
    /// (`--client-cert-auth`). Returns the fixture and the files a client
    /// needs.
    pub fn start_tls(ca: &crate::tls::TestCa) -> (Self, EtcdTlsFiles) {
        let bin = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("fedmesh-etcd-")
            .tempdir()
            .expect("create a temp dir for etcd");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write a TLS file for etcd");
            p
        };
        let server = ca.issue(&["127.0.0.1", "localhost"], None);
        let client = ca.issue(&["fedmesh-federation"], None);
        write("server.crt", &server.cert_pem);
        write("server.key", &server.key_pem);
        let files = EtcdTlsFiles {
            ca: write("ca.crt", &ca.pem),
            cert: write("client.crt", &client.cert_pem),
            key: write("client.key", &client.key_pem),
        };
        let mut fx = Self {
            child: None,
            dir,
            client_port: crate::free_port(),
            peer_port: crate::free_port(),
            bin,
            tls: Some(ca.client_config(&client, "127.0.0.1")),
        };
        fx.spawn();
        (fx, files)
    }

    fn spawn(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log file");
        let mut cmd = Command::new(&self.bin);
        if self.tls.is_some() {
            let d = self.dir.path();
            cmd.arg(format!("--cert-file={}", d.join("server.crt").display()))
                .arg(format!("--key-file={}", d.join("server.key").display()))
                .arg(format!("--trusted-ca-file={}", d.join("ca.crt").display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name=fedmesh-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=fedmesh-test={peer}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_PATIENCE;
        while Instant::now() < deadline {
            if self.healthy() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "etcd exited during start-up ({status}); log:\n{}",
                        self.log()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd did not become healthy within {START_PATIENCE:?}; log:\n{}",
            self.log()
        );
    }

    fn healthy(&self) -> bool {
        let addr = self.client_addr();
        let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let mut body = String::new();
        match &self.tls {
            None => {
                let mut s = s;
                if s.write_all(req.as_bytes()).is_err() {
                    return false;
                }
                let _ = s.read_to_string(&mut body);
            }
            Some(cfg) => {
                let Ok(conn) = rustls::ClientConnection::new(
                    cfg.clone(),
                    rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                ) else {
                    return false;
                };
                let mut tls = rustls::StreamOwned::new(conn, s);
                if tls.write_all(req.as_bytes()).is_err() {
                    return false;
                }
                let _ = tls.read_to_string(&mut body);
            }
        }
        body.contains("\"health\":\"true\"")
    }

    /// The client address, `127.0.0.1:<port>`.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The client endpoint as etcd-client takes it: `http://127.0.0.1:<port>`
    /// (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The etcd log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills etcd, keeping its data directory.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for EtcdFixture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A cluster of etcd members on free loopback ports, each in its own data
/// directory, every member killed (by PID) when dropped. Members can be
/// killed one by one; the leader is found with etcd's own status call.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `n` members (`n` >= 1) and waits until every one reports
    /// healthy (a leader is elected). Panics with the logs otherwise.
    pub fn start(n: usize) -> Self {
        let bin = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("fedmesh-etcd-cluster-")
            .tempdir()
            .expect("create a temp dir for the etcd cluster");
        let members: Vec<Member> = (0..n.max(1))
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: crate::free_port(),
                peer_port: crate::free_port(),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self { members, dir };
        for m in &mut c.members {
            let client = format!("http://127.0.0.1:{}", m.client_port);
            let peer = format!("http://127.0.0.1:{}", m.peer_port);
            let log = std::fs::File::create(c.dir.path().join(format!("{}.log", m.name)))
                .expect("etcd log file");
            let child = Command::new(&bin)
                .arg(format!("--name={}", m.name))
                .arg(format!(
                    "--data-dir={}",
                    c.dir.path().join(&m.name).display()
                ))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=fedmesh-test")
                // Loopback: elections in well under a second.
                .arg("--heartbeat-interval=50")
                .arg("--election-timeout=500")
                .arg("--log-level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap_or_else(|e| panic!("failed to start {}: {e}", bin.display()));
            m.child = Some(child);
        }
        let deadline = Instant::now() + START_PATIENCE;
        while Instant::now() < deadline {
            if (0..c.members.len()).all(|i| c.status(i).is_some_and(|s| s.leader != 0)) {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the etcd cluster did not elect a leader within {START_PATIENCE:?}; logs:\n{}",
            c.logs()
        );
    }

    /// Every member's client endpoint (`http://127.0.0.1:<port>`), killed
    /// ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The client endpoints of the members still running.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Member `i`'s view: its id and the leader's (0: none), from etcd's
    /// Maintenance/Status (through its JSON gateway).
    fn status(&self, i: usize) -> Option<MemberStatus> {
        let m = self.members.get(i)?;
        m.child.as_ref()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], m.client_port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let body = "{}";
        let req = format!(
            "POST /v3/maintenance/status HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let json = out.split("\r\n\r\n").nth(1)?;
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        let id = |x: &serde_json::Value| -> u64 {
            x.as_str()
                .and_then(|s| s.parse().ok())
                .or_else(|| x.as_u64())
                .unwrap_or(0)
        };
        Some(MemberStatus {
            member: id(&v["header"]["member_id"]),
            leader: id(&v["leader"]),
        })
    }

    /// The index of the member that leads now, as the running members agree.
    pub fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            let Some(st) = self.status(i) else { continue };
            if st.leader != 0 && st.member == st.leader {
                return Some(i);
            }
        }
        None
    }

    /// Waits (up to 30 s) until a running member leads; returns its index.
    pub fn wait_leader(&self) -> usize {
        let deadline = Instant::now() + START_PATIENCE;
        while Instant::now() < deadline {
            if let Some(i) = self.leader() {
                return i;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no etcd member leads; logs:\n{}", self.logs());
    }

    /// Kills member `i` with SIGKILL (its data stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members.get_mut(i).and_then(|m| m.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every member's log so far.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                format!("--- {} ---\n{log}", m.name)
            })
            .collect()
    }
}

struct MemberStatus {
    member: u64,
    leader: u64,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
