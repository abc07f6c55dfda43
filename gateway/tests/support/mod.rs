//! What the gateway's integration tests share: a gateway on loopback with
//! static flags, its metrics, and connections that expect a refusal.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use clap::Parser;
use gateway::app::{self, Bound};
use gateway::config::{Args, Config};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The routing name of `reviews.default:9080` (no subset).
pub const SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";
/// How long a test waits for what should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A gateway config for cluster `c1` on loopback (admin on, access log
/// off), plus `extra` flags.
pub fn config(extra: &[&str]) -> Config {
    let mut v = vec![
        "fedmesh-gateway",
        "--cluster",
        "c1",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--access-log",
        "off",
    ];
    v.extend_from_slice(extra);
    Config::from_args(&Args::try_parse_from(v).unwrap()).unwrap()
}

/// A gateway started in this process with [`config`].
pub async fn start(extra: &[&str]) -> Bound {
    mesh_test::trace_init();
    app::build(&config(extra), &tokio::runtime::Handle::current())
        .await
        .unwrap()
}

/// Its `/metrics` text.
pub async fn metrics(gw: &Bound) -> String {
    let mut s = TcpStream::connect(gw.admin.unwrap()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Rejections counted for `reason`.
pub fn rejections(m: &str, reason: &str) -> u64 {
    let key = format!("fedmesh_gateway_rejections_total{{reason=\"{reason}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Sends `bytes` (half-closing after them when `half_close`), then reads
/// until the gateway closes: what came back (nothing, for a refusal).
pub async fn refused_bytes_with(gw: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(gw).await.unwrap();
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let r = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("the gateway closes the connection");
    if r.is_err() {
        out.clear(); // a reset: nothing was received either
    }
    out
}

/// A federation on loopback (embedded registry, TLS).
pub async fn federation() -> federation::app::Bound {
    mesh_test::trace_init();
    federation::app::build(&federation::config::Config::embedded(
        ([127, 0, 0, 1], 0).into(),
    ))
    .await
    .unwrap()
}

/// A channel to `fed`'s API as an admin.
pub async fn admin(fed: &federation::app::Bound) -> tonic::transport::Channel {
    let ctx = fed
        .operator_context("test-admin", &[federation::auth::Role::Admin])
        .await
        .unwrap();
    mesh_node::fed::Target::from_context(&ctx)
        .unwrap()
        .channel()
        .await
        .unwrap()
}

/// The flags that point a gateway of `cluster` at `fed`: its URL and a
/// join token for the gateway's identity (reusable: some tests restart it).
pub async fn federation_flags(fed: &federation::app::Bound, cluster: &str) -> Vec<String> {
    let token = mesh_api::v1::admin_client::AdminClient::new(admin(fed).await)
        .create_join_token(mesh_api::v1::CreateJoinTokenRequest {
            cluster: cluster.into(),
            namespace: "fedmesh-system".into(),
            service_account: "fedmesh-gateway".into(),
            ttl_seconds: 600,
            reusable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    vec![
        "--federation".into(),
        fed.url(),
        "--join-token".into(),
        token,
    ]
}

/// A gateway of `c1` following `fed`, plus `extra` flags.
pub async fn start_fed(fed: &federation::app::Bound, extra: &[&str]) -> Bound {
    let flags = federation_flags(fed, "c1").await;
    start_flags(&flags, extra).await
}

/// A gateway started with `flags` (owned, e.g. [`federation_flags`]) and `extra`.
pub async fn start_flags(flags: &[String], extra: &[&str]) -> Bound {
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    start(&all).await
}
