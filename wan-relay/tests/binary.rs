//! The `fedmesh-wan-relay` binary: flag errors, the lines it prints, a
//! relayed request and a clean exit on SIGTERM.

// Test code: a panic is a failure with a location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use mesh_test::process::{assert_usage_error, Proc, Stream};
use std::net::SocketAddr;
use std::time::Duration;
use wan_relay::control::Client;
use wan_relay::{Change, Mode};

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-wan-relay");

#[test]
fn bad_flags_exit_64_naming_the_bad_part() {
    let good = "a=127.0.0.1:0->127.0.0.1:80";
    for (args, wants) in [
        (
            vec!["--link", "no-equals-sign", "--control", "127.0.0.1:0"],
            vec!["fedmesh-wan-relay: ", "\"no-equals-sign\"", "missing '='"],
        ),
        (
            vec!["--link", "a=127.0.0.1:0->somehost:80"],
            vec!["\"a=127.0.0.1:0->somehost:80\"", "TARGET \"somehost:80\""],
        ),
        (
            vec!["--link", "a b=127.0.0.1:0->127.0.0.1:80"],
            vec!["NAME \"a b\" contains ' '"],
        ),
        (
            vec!["--link", good, "--loss", "1.5"],
            vec!["--loss", "between 0 and 1"],
        ),
        (
            vec!["--link", good, "--delay", "30"],
            vec!["--delay", "missing unit"],
        ),
        (
            vec!["--link", good, "--mode", "drop"],
            vec!["--mode", "\"drop\""],
        ),
        (
            vec!["--link", good, "--link", "a=127.0.0.1:0->127.0.0.1:81"],
            vec!["given twice"],
        ),
        (
            vec!["--link", "a=127.0.0.1:0->127.0.0.1:80,proxy-v1"],
            vec![
                "--link \"a=127.0.0.1:0->127.0.0.1:80,proxy-v1\"",
                "unknown option \"proxy-v1\" (expected from=IP or proxy-v2)",
            ],
        ),
        (
            vec!["--link", "a=127.0.0.1:0->127.0.0.1:80,from=::1"],
            vec!["from=::1 is IPv6, the target 127.0.0.1:80 is IPv4"],
        ),
        (
            vec!["--link", good, "--control", "nowhere"],
            vec!["--control", "\"nowhere\""],
        ),
        // Every problem at once.
        (
            vec!["--link", "x", "--jitter", "-1s", "--rate-mbps", "fast"],
            vec!["--link \"x\"", "--jitter", "--rate-mbps \"fast\""],
        ),
    ] {
        assert_usage_error(BIN, &args, &wants);
    }
    // No link at all: clap's own usage error, naming the flag.
    let mut p = Proc::spawn(BIN, &[]);
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    assert!(p.output().contains("--link"), "{}", p.output());
}

fn addr_after(line: &str, marker: &str) -> SocketAddr {
    let rest = &line[line.find(marker).unwrap() + marker.len()..];
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_prints_its_addresses_and_stops_on_sigterm() {
    within(60, async {
        let echo = echo_server().await;
        let r1 = format!("r1=127.0.0.1:0->{echo}");
        let r2 = format!("r2=127.0.0.1:0->{echo}");
        let args = [
            "--link",
            &r1,
            "--link",
            &r2,
            "--control",
            "127.0.0.1:0",
            "--delay",
            "5ms",
        ];
        let (mut p, l1, l2, ctl) = tokio::task::block_in_place(|| {
            let mut p = Proc::spawn(BIN, &args);
            let patience = Duration::from_secs(30);
            let l1 = p.wait_for_line("link r1 listening on ", patience);
            let l2 = p.wait_for_line("link r2 listening on ", patience);
            let ctl = p.wait_for_line("control listening on ", patience);
            (p, l1, l2, ctl)
        });
        for line in [&l1, &l2, &ctl] {
            assert!(
                p.seen.contains(&(Stream::Stdout, line.clone())),
                "{line:?} not on stdout"
            );
        }
        assert!(l1.ends_with(&format!(" -> {echo}")), "{l1}");
        let l1 = addr_after(&l1, "listening on ");
        let l2 = addr_after(&l2, "listening on ");
        let ctl = addr_after(&ctl, "listening on ");

        let mut s = tokio::net::TcpStream::connect(l1).await.unwrap();
        let t = rtt(&mut s, b"through the binary").await;
        assert!(t >= Duration::from_millis(10), "{t:?}");

        let client = Client::new(ctl);
        let r2 = client.get("r2").await.unwrap();
        assert_eq!(r2.listen, l2);
        assert_eq!(r2.impairment.delay, Duration::from_millis(5));
        client
            .set("r1", &Change::new().mode(Mode::Cut))
            .await
            .unwrap();
        assert!(is_closed(&mut s, b"", 10).await);

        let status = tokio::task::block_in_place(|| {
            p.signal("TERM");
            p.wait_exit(Duration::from_secs(20))
        });
        assert!(
            status.success(),
            "exit after SIGTERM: {status:?}; output:\n{}",
            p.output()
        );
        assert!(!p.output().contains("panicked"), "{}", p.output());
    })
    .await;
}
