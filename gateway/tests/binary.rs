//! The `fedmesh-gateway` binary: refuses bad flags, logs one JSON access-log
//! line per connection on stdout, and drains on SIGTERM: no new connections,
//! open ones continue until the drain deadline, then close; exit 0.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_test::process::{assert_usage_error, Proc, Stream};
use mesh_test::tcp::Echo;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-gateway");
const SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";

#[test]
fn bad_flags_exit_64_naming_each_flag() {
    assert_usage_error(
        BIN,
        &[
            "--cluster",
            "C 1",
            "--listen",
            "nope",
            "--federation",
            "127.0.0.1",
        ],
        &[
            "invalid --cluster",
            "invalid --listen \"nope\"",
            "invalid --federation \"127.0.0.1\"",
        ],
    );
}

fn hello() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/openssl-tls13.bin"
    ))
    .unwrap()
}

#[tokio::test]
async fn drains_on_sigterm_and_logs_each_connection() {
    let echo = Echo::start(b"").await;
    let route = format!("{SNI}={}", echo.addr);
    let mut p = Proc::spawn(
        BIN,
        &[
            "--cluster",
            "c1",
            "--listen",
            "127.0.0.1:0",
            "--route",
            &route,
            "--drain-deadline",
            "1s",
            "--threads",
            "1",
        ],
    );
    let line = p.wait_for_line("gateway listening on", Duration::from_secs(20));
    let addr: std::net::SocketAddr = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // A refused connection and a routed one.
    let mut bad = TcpStream::connect(addr).await.unwrap();
    bad.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    bad.read_to_end(&mut out).await.unwrap();
    let mut open = TcpStream::connect(addr).await.unwrap();
    let h = hello();
    open.write_all(&h).await.unwrap();
    let mut back = vec![0u8; h.len()];
    open.read_exact(&mut back).await.unwrap();

    p.signal("TERM");
    p.wait_for_line("gateway draining", Duration::from_secs(10));
    // New connections are refused once the listener is closed...
    mesh_test::assert_eventually!(
        TcpStream::connect(addr).await.is_err(),
        Duration::from_secs(5)
    );
    // ...while the open one still works until the deadline.
    open.write_all(b"still here").await.unwrap();
    let mut b = [0u8; 10];
    open.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"still here");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let st = p.wait_exit(Duration::from_secs(15));
        (st, p)
    })
    .await
    .unwrap();
    let (st, p) = status;
    assert!(st.success(), "{st:?}\n{}", p.output());
    assert!(p.output().contains("forced=1"), "{}", p.output());

    let logs: Vec<serde_json::Value> = p
        .seen
        .iter()
        .filter(|(s, _)| *s == Stream::Stdout)
        .map(|(_, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("access log line is JSON ({e}): {l}"))
        })
        .collect();
    assert_eq!(logs.len(), 2, "{logs:#?}");
    let refused = logs.iter().find(|l| l["rejected"] == true).unwrap();
    assert_eq!(refused["close"], "not_tls");
    assert_eq!(refused["bytes_down"], 0);
    let routed = logs.iter().find(|l| l["rejected"] == false).unwrap();
    assert_eq!(routed["sni"], SNI);
    assert_eq!(routed["service"], SNI);
    assert_eq!(routed["endpoint"], echo.addr.to_string());
    assert_eq!(routed["close"], "drained");
    assert_eq!(routed["bytes_up"], u64::try_from(h.len() + 10).unwrap());
    assert_eq!(routed["bytes_down"], u64::try_from(h.len() + 10).unwrap());
    assert!(routed["duration_ms"].as_f64().unwrap() >= 1000.0);
    assert!(routed["source"].as_str().unwrap().starts_with("127.0.0.1:"));
}
