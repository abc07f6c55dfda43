//! The `fedmesh-gateway` binary: parses its configuration, logs, exits cleanly on SIGTERM, refuses bad flags.

use mesh_test::process::{assert_clean_sigterm, assert_usage_error};

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-gateway");

#[test]
fn starts_and_exits_cleanly_on_sigterm() {
    let out = assert_clean_sigterm(
        BIN,
        &[
            "--cluster",
            "c1",
            "--listen",
            "127.0.0.1:15443",
            "--federation",
            "http://127.0.0.1:15010",
        ],
        "gateway started",
    );
    assert!(out.contains("gateway stopped"), "{out}");
}

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
