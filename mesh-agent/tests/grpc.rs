//! gRPC through two agents over mTLS: unary calls and a bidirectional
//! stream, with a real tonic server as the application (a federation
//! replica's own Admin and Discovery services serve as a gRPC app) and a real
//! tonic client sending to the caller's agent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::discovery_client::DiscoveryClient;
use mesh_api::v1::registration_client::RegistrationClient;
use std::time::Duration;
use support::{wait_endpoints, Mesh};
use tonic::transport::{Channel, Endpoint};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_pass_through_two_agents() {
    let m = Mesh::one_cluster_on("127.0.0.1").await;
    // The gRPC application: another federation replica, standalone. It is
    // an application here, not the mesh's control plane: the agent in
    // front of it speaks plain h2 to it, so it serves without TLS
    // (--insecure-plaintext, loopback only).
    let app = federation::app::build(&federation::config::Config::embedded_insecure(
        ([127, 0, 0, 1], 0).into(),
    ))
    .await
    .unwrap();
    let mut args = m.args("c1", "us-east", "us-east-1a", "grpcapp", app.addr, 9090);
    args.extend(["--protocol".into(), "grpc".into()]);
    let server_agent = m.agent(args).await;
    let client_app = mesh_test::http::Backend::start("client").await;
    let client_agent = m
        .agent(m.args(
            "c1",
            "us-east",
            "us-east-1a",
            "client",
            client_app.addr,
            8080,
        ))
        .await;
    wait_endpoints(&client_agent, "grpcapp", 1).await;

    // The client dials its agent; the :authority names the service.
    let ch: Channel = Endpoint::from_shared(format!("http://{}", client_agent.outbound))
        .unwrap()
        .origin("http://grpcapp.default:9090".parse().unwrap())
        .connect()
        .await
        .unwrap();

    // Unary.
    let mut admin = AdminClient::new(ch.clone());
    let st = admin
        .get_status(api::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.registry, "memory");

    // Bidirectional streaming: subscribe, get the snapshot, then a delta
    // caused by a write made directly to the app.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: "grpc-test".into(),
            cluster: "c9".into(),
            kind: api::NodeKind::Cli as i32,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = DiscoveryClient::new(ch)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let snap = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(snap.snapshot.is_some_and(|c| c.last));
    let mut direct = RegistrationClient::connect(format!("http://{}", app.addr))
        .await
        .unwrap();
    direct
        .register_cluster(api::RegisterClusterRequest {
            cluster: Some(api::ClusterInfo {
                name: "c9".into(),
                locality: Some(api::Locality {
                    region: "r".into(),
                    zone: "z".into(),
                }),
                network: "n".into(),
                gateway_addresses: vec![],
                trust_domain: "cluster.local".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let delta = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delta.clusters[0].info.as_ref().unwrap().name, "c9");
    // The client side of the stream keeps working: an ACK goes up.
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Ack(api::Ack {
            version: delta.version,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    mesh_test::assert_eventually!(AdminClient::connect(format!("http://{}", app.addr))
        .await
        .unwrap()
        .get_status(api::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .subscribers
        .iter()
        .any(|s| s.node_id == "grpc-test" && s.acked_version == delta.version));
    drop(stream);
    client_agent.drain().await;
    server_agent.drain().await;
}
