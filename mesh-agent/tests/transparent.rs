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

/// The init container's command in the sidecar template (the kustomize
/// component's; the Helm chart's must be the same rules).
fn template_rules() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let kustomize = std::fs::read_to_string(format!(
        "{root}/deploy/kustomize/components/sidecar/template/patch.yaml"
    ))
    .unwrap();
    let helm =
        std::fs::read_to_string(format!("{root}/deploy/helm/fedmesh/templates/_helpers.tpl"))
            .unwrap();
    // The folded block after `- >-` in the fedmesh-init container.
    let rules = |text: &str| -> Vec<String> {
        let start = text.find("name: fedmesh-init").unwrap();
        let block = &text[start..];
        let from = block.find("- >-").unwrap() + 4;
        block[from..]
            .lines()
            .skip(1)
            .take_while(|l| l.trim_start().starts_with("iptables"))
            .map(|l| l.trim().to_string())
            .collect()
    };
    let (k, h) = (rules(&kustomize), rules(&helm));
    assert!(k.len() >= 6, "{k:?}");
    assert_eq!(
        k, h,
        "the Helm chart's capture rules differ from the kustomize component's"
    );
    k.join(" ")
}

/// Inbound capture, as root: the sidecar template's own iptables rules run
/// in a namespace this test creates, where an application listens on the
/// Pod's address and the agent (the real binary, uid 1337, the template's
/// ports) beside it. A caller dialling the application's port directly is
/// handed to the agent: AuthorizationPolicy applies, and STRICT refuses
/// plaintext; the application still answers on loopback inside the Pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_capture_hands_direct_calls_to_the_agent() {
    if let Err(why) = root_tools() {
        if std::env::var("FEDMESH_SKIP_ROOT_TESTS").is_ok_and(|v| v == "1") {
            eprintln!("skipped: {why}");
            return;
        }
        panic!("inbound capture test {why}; set FEDMESH_SKIP_ROOT_TESTS=1 to skip it");
    }
    let rules = template_rules();
    let id = std::process::id() % 60;
    let host_ip = format!("198.19.{}.1", 100 + id);
    let ns_ip = format!("198.19.{}.2", 100 + id);
    let ns = Netns::create(&format!("fmi{}", std::process::id()), &host_ip, &ns_ip).unwrap();
    let m = Mesh::one_cluster_on(&host_ip).await;
    ns.exec(&["env", "APP_PORT=9080", "sh", "-c", &rules])
        .unwrap();

    // The application, on every address of the Pod.
    let _app = Proc::spawn(
        "ip",
        &[
            "netns",
            "exec",
            &ns.name,
            "/usr/bin/python3",
            "-m",
            "http.server",
            "9080",
            "--bind",
            "0.0.0.0",
        ],
    );
    let inside = |url: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "5",
                url,
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    mesh_test::assert_eventually!(
        inside("http://127.0.0.1:9080/") == "200",
        Duration::from_secs(20)
    );

    // The agent as the template runs it: uid 1337, inbound 15006, outbound
    // 15001 (its certificate files readable by that user).
    let mut args = m.args(
        "c1",
        "us-east",
        "us-east-1a",
        "reviews",
        "127.0.0.1:9080".parse().unwrap(),
        9080,
    );
    args.remove(0);
    for (flag, v) in [
        ("--inbound", "0.0.0.0:15006"),
        ("--outbound", "127.0.0.1:15001"),
        ("--admin", "127.0.0.1:15020"),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = v.to_string();
    }
    args.extend(["--capture".into(), "transparent".into()]);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let open = |p: &std::path::Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        open(m.dir.path(), 0o755);
        for e in std::fs::read_dir(m.dir.path()).unwrap() {
            open(&e.unwrap().path(), 0o644);
        }
    }
    let mut full = vec![
        "netns".to_string(),
        "exec".into(),
        ns.name.clone(),
        "setpriv".into(),
        "--reuid=1337".into(),
        "--regid=1337".into(),
        "--clear-groups".into(),
        AGENT.into(),
    ];
    full.extend(args);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    let mut agent = Proc::spawn("ip", &refs);
    agent.wait_for_line("agent listening", Duration::from_secs(20));

    // From outside the Pod, straight to the application's port.
    let direct = |path: &str| {
        let url = format!("http://{ns_ip}:9080{path}");
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "5",
                &url,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    m.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-secret}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/secret]}}]}]
"#,
    )
    .await
    .unwrap();
    // The DENY is the agent's answer: the application would say 404.
    mesh_test::assert_eventually!(direct("/secret") == "403", Duration::from_secs(20));
    assert_eq!(direct("/"), "200", "PERMISSIVE: served, through the agent");
    m.apply(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#,
    )
    .await
    .unwrap();
    mesh_test::assert_eventually!(direct("/") == "000", Duration::from_secs(20));
    // Inside the Pod, the application answers on loopback as before.
    assert_eq!(
        inside("http://127.0.0.1:9080/"),
        "200",
        "agent log:\n{}",
        agent.output()
    );

    agent.signal("TERM");
    assert!(
        agent.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        agent.output()
    );
}
