//! The `fedmesh-agent` binary: parses its configuration, logs, exits cleanly on SIGTERM, refuses bad flags.

use mesh_test::process::{assert_clean_sigterm, assert_usage_error};

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-agent");

/// On a multi-threaded runtime and on the single-threaded event loop
/// (`--threads 1`) alike.
#[test]
fn starts_and_exits_cleanly_on_sigterm() {
    for threads in ["1", "2"] {
        let out = assert_clean_sigterm(
            BIN,
            &[
                "--threads",
                threads,
                "--cluster",
                "c1",
                "--region",
                "us-east",
                "--zone",
                "us-east-1a",
                "--service",
                "reviews",
                "--app",
                "127.0.0.1:9080",
                "--plaintext",
                "--outbound",
                "127.0.0.1:0",
                "--inbound",
                "127.0.0.1:0",
                "--admin",
                "off",
                "--federation",
                "http://127.0.0.1:1",
            ],
            "agent started",
        );
        assert!(out.contains("agent stopped"), "{out}");
    }
}

#[test]
fn bad_flags_exit_64_naming_each_flag() {
    assert_usage_error(
        BIN,
        &[
            "--cluster",
            "c1",
            "--region",
            "US",
            "--zone",
            "z",
            "--service",
            "r_1",
            "--app",
            "localhost",
            "--threads",
            "0",
        ],
        &[
            "invalid --region: invalid region \"US\"",
            "invalid --service: invalid service name \"r_1\"",
            "invalid --app \"localhost\"",
            "invalid --threads 0: must be 1 to 1024",
        ],
    );
}
