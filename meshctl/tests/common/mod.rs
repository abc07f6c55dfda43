//! What the meshctl binary's tests share: a federation on loopback, a
//! configuration with an admin's context, and running meshctl with it.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_meshctl");

pub async fn federation() -> federation::app::Bound {
    federation::app::build(&federation::config::Config::embedded(
        ([127, 0, 0, 1], 0).into(),
    ))
    .await
    .unwrap()
}

/// A meshctl configuration (in a directory of its own) whose current
/// context is an admin of `fed`.
pub async fn admin_config(fed: &federation::app::Bound) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let mut file = mesh_core::client_config::ClientConfig::default();
    file.upsert(
        fed.operator_context("test-admin", &[federation::auth::Role::Admin])
            .await
            .unwrap(),
    );
    file.save(&path).unwrap();
    (dir, path)
}

/// Runs meshctl with the configuration `config` off the async runtime's
/// threads; returns (exit code, stdout, stderr).
pub async fn meshctl(config: &Path, args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .args(&args)
            .env("FEDMESH_CONFIG", &config)
            .env_remove("FEDMESH_FEDERATION")
            .env_remove("FEDMESH_CONTEXT")
            .output()
            .expect("run meshctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// `meshctl` with `rest` after `--federation url`.
pub fn args(url: &str, rest: &[&str]) -> Vec<String> {
    let mut v = vec!["--federation".to_string(), url.to_string()];
    v.extend(rest.iter().map(ToString::to_string));
    v
}
