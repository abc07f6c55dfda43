//! The `fedmesh-federation` binary: starts, serves, stops on SIGTERM, refuses bad flags.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_test::process::Proc;
use std::time::Duration;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-federation");

#[tokio::test]
async fn serves_then_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let admin_config = dir.path().join("admin.yaml");
    let mut p = Proc::spawn(
        BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--registry",
            "memory",
            "--bootstrap-admin",
            admin_config.to_str().unwrap(),
        ],
    );
    let line = p.wait_for_line("listening on", Duration::from_secs(20));
    let addr = line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let ctx = common::context_at(&admin_config);
    assert_eq!(ctx.server, format!("https://{addr}"));
    let mut admin = AdminClient::new(common::channel(&ctx).await);
    // The replica serves before its first sync with the registry ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = admin
            .get_status(api::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.registry, "memory");
        if st.registry_reachable {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the memory registry never became reachable: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?}; output:\n{}", p.output());
    assert!(
        !mesh_test::is_listening(addr.parse().unwrap()),
        "the port is released"
    );
}

#[test]
fn bad_flags_exit_64_naming_each_flag() {
    mesh_test::process::assert_usage_error(
        BIN,
        &[
            "--listen",
            "here",
            "--registry",
            "consul://x:1",
            "--heartbeat-ttl",
            "5",
        ],
        &[
            "fedmesh-federation: invalid --listen \"here\"",
            "invalid --registry \"consul://x:1\"",
            "invalid --heartbeat-ttl: invalid duration \"5\"",
        ],
    );
}

#[test]
fn a_taken_port_fails_startup() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let mut p = Proc::spawn(BIN, &["--listen", &addr]);
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    assert!(
        p.output().contains(&format!("bind the API on {addr}")),
        "{}",
        p.output()
    );
}
