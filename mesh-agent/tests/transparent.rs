//! Transparent capture, as root: an application in a network namespace this
//! test creates dials an endpoint's address; iptables REDIRECT (inside the
//! namespace only) hands the connection to the `fedmesh-agent` binary running
//! there with `--capture transparent`, which reads SO_ORIGINAL_DST and routes
//! it over mTLS to the destination's agent on the host side of a veth pair.
//!
//! Everything the test creates (namespace, veth, iptables rules with the
//! namespace, the agent process by PID) is removed at the end, also when an
//! assertion fails. Without root, or without `ip`/`iptables`, it says so and
//! passes nothing off as tested: it fails, naming what is missing, unless
//! `FEDMESH_SKIP_ROOT_TESTS=1` asks to skip it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use mesh_test::http::Backend;
use mesh_test::process::Proc;
use std::process::Command;
use std::time::Duration;
use support::Mesh;

const AGENT: &str = env!("CARGO_BIN_EXE_fedmesh-agent");

fn run(cmd: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("{}: {e}", cmd.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace joined to the host by a veth pair; deleted on drop (which
/// takes its iptables rules and the namespace's end of the pair with it).
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn create(name: &str, host_ip: &str, ns_ip: &str) -> Result<Self, String> {
        let host_if = format!("{name}h");
        let ns = Self {
            name: name.to_string(),
            host_if: host_if.clone(),
        };
        let peer = format!("{name}n");
        run(&["ip", "netns", "add", name])?;
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ])?;
        run(&["ip", "link", "set", &peer, "netns", name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        run(&[
            "ip",
            "-n",
            name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &peer,
        ])?;
        run(&["ip", "-n", name, "link", "set", &peer, "up"])?;
        run(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec(&self, cmd: &[&str]) -> Result<(), String> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(cmd);
        run(&v)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

fn root_tools() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("needs root".into());
    }
    for t in ["ip", "iptables", "curl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {t} || test -x /usr/sbin/{t}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(format!("needs {t} (scripts/deps.sh installs it)"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_connections_are_routed_by_their_original_destination() {
    if let Err(why) = root_tools() {
        if std::env::var("FEDMESH_SKIP_ROOT_TESTS").is_ok_and(|v| v == "1") {
            eprintln!("skipped: {why}");
            return;
        }
        panic!("transparent capture test {why}; set FEDMESH_SKIP_ROOT_TESTS=1 to skip it");
    }
    // Addresses of the veth pair this test creates (benchmarking range,
    // never routed): host side .1, namespace side .2.
    let id = std::process::id() % 60;
    let host_ip = format!("198.18.{}.1", 100 + id);
    let ns_ip = format!("198.18.{}.2", 100 + id);
    let ns = Netns::create(&format!("fmt{}", std::process::id()), &host_ip, &ns_ip).unwrap();

    let m = Mesh::one_cluster_on(&host_ip).await;
    // The destination: an agent and its app on the host side of the veth.
    let backend = Backend::start_on("reviews-1", &host_ip).await;
    let mut args = m.args("c1", "us-east", "us-east-1a", "reviews", backend.addr, 9080);
    for (flag, v) in [
        ("--inbound", format!("{host_ip}:0")),
        ("--outbound", format!("{host_ip}:0")),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = v;
    }
    let reviews = m.agent(args).await;
    // An opaque TCP service too: an echo server behind an agent.
    let echo = mesh_test::tcp::Echo::start(b"-bye").await;
    let mut args = m.args("c1", "us-east", "us-east-1a", "db", echo.addr, 9000);
    for (flag, v) in [
        ("--inbound", format!("{host_ip}:0")),
        ("--outbound", format!("{host_ip}:0")),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = v;
    }
    args.extend(["--protocol".into(), "tcp".into()]);
    let db = m.agent(args).await;

    // The caller's agent, the real binary, inside the namespace.
    let mut args = m.args(
        "c1",
        "us-east",
        "us-east-1a",
        "frontend",
        format!("{ns_ip}:8080").parse().unwrap(),
        8080,
    );
    args.remove(0);
    for (flag, v) in [
        ("--inbound", format!("{ns_ip}:15006")),
        ("--outbound", "127.0.0.1:15001".to_string()),
        ("--admin", "127.0.0.1:15020".to_string()),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = v;
    }
    args.extend(["--capture".into(), "transparent".into()]);
    let mut full = vec![
        "netns".to_string(),
        "exec".into(),
        ns.name.clone(),
        AGENT.into(),
    ];
    full.extend(args);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    let mut agent = Proc::spawn("ip", &refs);
    agent.wait_for_line("agent listening", Duration::from_secs(20));

    // Capture: only the application's connections to port 9080 of the
    // endpoint address; the agent's own traffic goes to other ports.
    for port in ["9080", "9000"] {
        ns.exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &host_ip,
            "--dport",
            port,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ])
        .unwrap();
    }

    // The application dials the endpoint's address; it never knew the agent.
    let url = format!("http://{host_ip}:9080/books/7");
    let mut last;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "curl", "-s", "-m", "5", "-D", "-", &url,
            ])
            .output()
            .unwrap();
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.contains("x-backend: reviews-1") || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        last.contains("x-backend: reviews-1"),
        "{last}\nagent log:\n{}",
        agent.output()
    );
    assert!(last.contains("GET /books/7"), "{last}");
    // It went through both agents: mTLS with the caller's identity.
    assert!(
        last.contains("URI=spiffe://cluster.local/ns/default/sa/frontend"),
        "{last}"
    );

    // Opaque TCP: bytes both ways and the half-close, through both agents.
    let script = format!(
        "import socket; s=socket.create_connection(('{host_ip}', 9000), timeout=5); \
         s.sendall(b'ping'); s.shutdown(socket.SHUT_WR); d=b''\n\
while True:\n    c=s.recv(100)\n    if not c: break\n    d+=c\nprint(d.decode())"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", &script])
        .output()
        .unwrap();
    let rules = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables", "-t", "nat", "-S"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ping-bye",
        "{}\nrules:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&rules.stdout),
        agent.output()
    );

    agent.signal("TERM");
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    reviews.drain().await;
    db.drain().await;
}
