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
