//! Calling a federation under test over its TLS API, as the principal a
//! test needs: an admin or another operator, a node of a cluster, or nobody.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use federation::app::Bound;
use federation::auth::Role;
use mesh_core::client_config::Context;
use mesh_node::fed::Target;
use tonic::transport::Channel;

/// A channel presenting `ctx`'s credential.
pub async fn channel(ctx: &Context) -> Channel {
    Target::from_context(ctx).unwrap().channel().await.unwrap()
}

/// An operator holding `roles`.
pub async fn operator(b: &Bound, name: &str, roles: &[Role]) -> Channel {
    channel(&b.operator_context(name, roles).await.unwrap()).await
}

/// An admin.
pub async fn admin(b: &Bound) -> Channel {
    operator(b, "test-admin", &[Role::Admin]).await
}

/// A node (agent or gateway) of `cluster` with the SPIFFE ID `identity`.
pub async fn node(b: &Bound, cluster: &str, identity: &str) -> Channel {
    channel(&b.node_context(cluster, identity).await.unwrap()).await
}

/// A workload `default/<sa>` of `cluster`.
pub async fn workload(b: &Bound, cluster: &str, sa: &str) -> Channel {
    node(
        b,
        cluster,
        &format!("spiffe://cluster.local/ns/default/sa/{sa}"),
    )
    .await
}

/// The gateway of `cluster`.
pub async fn gateway(b: &Bound, cluster: &str) -> Channel {
    node(
        b,
        cluster,
        "spiffe://cluster.local/ns/fedmesh-system/sa/fedmesh-gateway",
    )
    .await
}

/// TLS with the federation's CA and no client certificate.
pub async fn anonymous(b: &Bound) -> Channel {
    let mut ctx = b.operator_context("unused", &[]).await.unwrap();
    ctx.client_certificate_data.clear();
    ctx.client_key_data.clear();
    channel(&ctx).await
}

/// The current context of a `meshctl` configuration a binary wrote
/// (`--bootstrap-admin`).
pub fn context_at(path: &std::path::Path) -> Context {
    mesh_core::client_config::ClientConfig::load(path)
        .unwrap()
        .context(None)
        .unwrap()
        .clone()
}

/// A channel with no client certificate that trusts the root in the
/// configuration at `path`.
pub async fn anonymous_at(path: &std::path::Path) -> Channel {
    let mut ctx = context_at(path);
    ctx.client_certificate_data.clear();
    ctx.client_key_data.clear();
    channel(&ctx).await
}

/// A cluster in us-west-1a, network `net-<name>`, gateway 10.1.0.1:15443.
pub fn cluster_info(name: &str) -> mesh_api::v1::ClusterInfo {
    mesh_api::v1::ClusterInfo {
        name: name.into(),
        network: format!("net-{name}"),
        gateway_addresses: vec!["10.1.0.1:15443".into()],
        trust_domain: "cluster.local".into(),
        locality: Some(mesh_api::v1::Locality {
            region: "us-west".into(),
            zone: "us-west-1a".into(),
        }),
        ..Default::default()
    }
}

/// Endpoint `r<i>` of default/reviews in `cluster`, healthy, at 10.0.x.y:9080.
pub fn reviews_endpoint(cluster: &str, i: usize) -> mesh_api::v1::Endpoint {
    use mesh_api::v1 as api;
    api::Endpoint {
        service: Some(api::ServiceKey {
            namespace: "default".into(),
            name: "reviews".into(),
        }),
        cluster: cluster.into(),
        id: format!("r{i}"),
        address: format!("10.0.{}.{}", (i / 250) % 250, i % 250 + 1),
        ports: vec![api::Port {
            name: "http".into(),
            number: 9080,
            protocol: "http".into(),
            ..Default::default()
        }],
        health: api::Health::Healthy as i32,
        locality: Some(api::Locality {
            region: "us-west".into(),
            zone: "us-west-1a".into(),
        }),
        ..Default::default()
    }
}

/// Waits for the binary's "listening on ADDR" line; returns ADDR.
pub fn listening_addr(p: &mut mesh_test::process::Proc) -> String {
    let line = p.wait_for_line("listening on", std::time::Duration::from_secs(20));
    line.rsplit("listening on ")
        .next()
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string()
}
