//! The `fedmesh-gateway` binary: parses its configuration, logs, exits cleanly on SIGTERM, refuses bad flags.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_test::process::Proc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-gateway");

#[test]
fn starts_and_exits_cleanly_on_sigterm() {
    let mut p = Proc::spawn(
        BIN,
        &[
            "--cluster",
            "c1",
            "--listen",
            "127.0.0.1:15443",
            "--federation",
            "http://127.0.0.1:15010",
        ],
    );
    p.wait_for_line("gateway started", Duration::from_secs(20));
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?}; output:\n{}", p.output());
    assert!(p.output().contains("stopped"), "{}", p.output());
}

#[test]
fn bad_flags_exit_64_naming_each_flag() {
    let mut p = Proc::spawn(
        BIN,
        &[
            "--cluster",
            "C 1",
            "--listen",
            "nope",
            "--federation",
            "127.0.0.1",
        ],
    );
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(64), "{}", p.output());
    let out = p.output();
    for want in [
        "invalid --cluster",
        "invalid --listen \"nope\"",
        "invalid --federation \"127.0.0.1\"",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("panicked"), "{out}");
}
