//! The federation service end to end over real gRPC on loopback, on the
//! embedded registry and on a real etcd.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::app::{self, Bound};
use federation::config::{Args, Config};
use federation::store::etcd::EtcdStore;
use federation::store::memory::MemoryStore;
use federation::store::Store;
use futures::StreamExt;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::discovery_client::DiscoveryClient;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_test::assert_eventually;
use mesh_test::etcd::EtcdFixture;
use mesh_test::relay::TcpRelay;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

mod common;

const PATIENCE: Duration = Duration::from_secs(10);

fn config(ttl: &str) -> Config {
    use clap::Parser;
    let args = Args::try_parse_from([
        "fedmesh-federation",
        "--listen",
        "127.0.0.1:0",
        "--registry",
        "memory",
        "--heartbeat-ttl",
        ttl,
        "--admin",
        "127.0.0.1:0",
    ])
    .unwrap();
    Config::from_args(&args).unwrap()
}

struct Fed {
    bound: Bound,
    reg: RegistrationClient<Channel>,
    admin: AdminClient<Channel>,
    disc: DiscoveryClient<Channel>,
    _etcd: Option<EtcdFixture>,
}

impl Fed {
    async fn start(store: Arc<dyn Store>, ttl: &str, etcd: Option<EtcdFixture>) -> Self {
        mesh_test::trace_init();
        let bound = app::serve(&config(ttl), store).await.unwrap();
        let ch = common::admin(&bound).await;
        // Discovery serves nodes: an agent of c1 in namespace default.
        let node = common::workload(&bound, "c1", "test").await;
        Self {
            reg: RegistrationClient::new(ch.clone()),
            admin: AdminClient::new(ch),
            disc: DiscoveryClient::new(node),
            bound,
            _etcd: etcd,
        }
    }

    async fn memory(ttl: &str) -> Self {
        Self::start(Arc::new(MemoryStore::new()), ttl, None).await
    }

    async fn etcd(ttl: &str) -> Self {
        let fx = EtcdFixture::start();
        let store = EtcdStore::connect(&[fx.endpoint()]).await.unwrap();
        Self::start(Arc::new(store), ttl, Some(fx)).await
    }

    async fn clusters(&mut self) -> Vec<api::ClusterState> {
        self.admin
            .list_clusters(api::ListClustersRequest {})
            .await
            .unwrap()
            .into_inner()
            .clusters
    }

    async fn endpoints(
        &mut self,
        ns: &str,
        name: &str,
    ) -> Result<Vec<api::Endpoint>, tonic::Status> {
        self.admin
            .list_endpoints(api::ListEndpointsRequest {
                service: Some(svc(ns, name)),
            })
            .await
            .map(|r| r.into_inner().endpoints)
    }

    async fn status(&mut self) -> api::GetStatusResponse {
        self.admin
            .get_status(api::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }
}

fn svc(ns: &str, name: &str) -> api::ServiceKey {
    api::ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn cluster(name: &str, region: &str) -> api::ClusterInfo {
    api::ClusterInfo {
        name: name.into(),
        locality: Some(api::Locality {
            region: region.into(),
            zone: format!("{region}-1a"),
        }),
        network: format!("net-{name}"),
        gateway_addresses: vec!["127.0.0.1:15443".into()],
        trust_domain: "cluster.local".into(),
        ..Default::default()
    }
}

fn endpoint(cluster: &str, id: &str, ip: &str) -> api::Endpoint {
    api::Endpoint {
        id: id.into(),
        service: Some(svc("default", "reviews")),
        cluster: cluster.into(),
        address: ip.into(),
        ports: vec![api::Port {
            name: "http".into(),
            number: 9080,
            protocol: "http".into(),
            ..Default::default()
        }],
        labels: [("version".to_string(), "v1".to_string())].into(),
        locality: Some(api::Locality {
            region: "us-east".into(),
            zone: "us-east-1a".into(),
        }),
        health: api::Health::Healthy as i32,
        identity: "spiffe://cluster.local/ns/default/sa/reviews".into(),
    }
}

/// Asserts a refusal: its code, and a message starting with `prefix`.
fn assert_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, prefix: &str) {
    let e = r.expect_err("the request must be refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().starts_with(prefix),
        "got {:?}, want prefix {prefix:?}",
        e.message()
    );
}

async fn register(fed: &mut Fed, c: api::ClusterInfo) {
    fed.reg
        .register_cluster(api::RegisterClusterRequest { cluster: Some(c) })
        .await
        .unwrap();
}

async fn add(fed: &mut Fed, e: api::Endpoint) -> i64 {
    fed.reg
        .register_endpoint(api::RegisterEndpointRequest { endpoint: Some(e) })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// A discovery subscription: the request sender and the response stream.
struct Sub {
    tx: mpsc::Sender<api::DiscoveryRequest>,
    rx: tonic::Streaming<api::DiscoveryResponse>,
}

/// `GET path` on the admin listener: status and body.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

async fn subscribe(fed: &mut Fed, node: &str) -> Sub {
    let (tx, rx) = mpsc::channel(16);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: node.into(),
            cluster: "c1".into(),
            kind: api::NodeKind::Agent as i32,
            namespace: "default".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let rx = fed
        .disc
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Sub { tx, rx }
}

impl Sub {
    async fn next(&mut self) -> api::DiscoveryResponse {
        tokio::time::timeout(PATIENCE, self.rx.next())
            .await
            .expect("a discovery message in time")
            .unwrap()
            .unwrap()
    }

    /// The next delta that changes endpoints or exports: the leader's
    /// recomputed weights for an earlier change may come between.
    async fn next_change(&mut self) -> api::DiscoveryResponse {
        for _ in 0..10 {
            let d = self.next().await;
            if !(d.endpoints.is_empty() && d.removed_endpoints.is_empty() && d.exports.is_empty()) {
                return d;
            }
            assert!(
                d.clusters.is_empty() && d.snapshot.is_none(),
                "only weights may come between: {d:?}"
            );
        }
        panic!("no delta with a change in 10 messages");
    }

    /// Reads a whole snapshot (all chunks).
    async fn snapshot(&mut self) -> api::DiscoveryResponse {
        let mut all = self.next().await;
        assert_eq!(
            all.snapshot.as_ref().map(|s| s.index),
            Some(0),
            "a snapshot comes first"
        );
        while !all.snapshot.as_ref().unwrap().last {
            let c = self.next().await;
            assert_eq!(
                c.version, all.version,
                "every chunk has the snapshot's version"
            );
            all.endpoints.extend(c.endpoints);
            all.snapshot = c.snapshot;
        }
        all
    }

    async fn ack(&self, version: i64) {
        self.tx
            .send(api::DiscoveryRequest {
                request: Some(api::discovery_request::Request::Ack(api::Ack {
                    version,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
    }

    async fn nack(&self, version: i64, reason: &str) {
        self.tx
            .send(api::DiscoveryRequest {
                request: Some(api::discovery_request::Request::Nack(api::Nack {
                    version,
                    reason: reason.into(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
    }
}

// === scenarios, run on both backends ===

async fn register_list_and_discover(mut fed: Fed) {
    register(&mut fed, cluster("c1", "us-east")).await;
    register(&mut fed, cluster("c2", "eu-west")).await;
    add(&mut fed, endpoint("c1", "reviews-1", "10.0.0.1")).await;
    add(&mut fed, endpoint("c2", "reviews-2", "10.1.0.1")).await;

    let clusters = fed.clusters().await;
    let names: Vec<_> = clusters
        .iter()
        .map(|c| c.info.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["c1", "c2"]);
    assert!(clusters
        .iter()
        .all(|c| c.liveness == api::Liveness::Live as i32));
    assert_eq!(
        clusters[1]
            .info
            .as_ref()
            .unwrap()
            .locality
            .as_ref()
            .unwrap()
            .region,
        "eu-west"
    );

    let services = fed
        .admin
        .list_services(api::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].clusters, ["c1", "c2"]);
    assert_eq!(
        (services[0].endpoints, services[0].healthy_endpoints),
        (2, 2)
    );

    let eps = fed.endpoints("default", "reviews").await.unwrap();
    assert_eq!(eps.len(), 2);
    assert_eq!(
        eps[0],
        endpoint("c1", "reviews-1", "10.0.0.1"),
        "an endpoint comes back as registered"
    );
    let missing = fed.endpoints("default", "nope").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(
        missing.message().contains("default/nope"),
        "{}",
        missing.message()
    );

    // Discovery: snapshot, then deltas with growing versions.
    let mut sub = subscribe(&mut fed, "agent-1").await;
    let snap = sub.snapshot().await;
    assert_eq!(snap.clusters.len(), 2);
    assert_eq!(snap.endpoints.len(), 2);
    sub.ack(snap.version).await;

    let rev = add(&mut fed, endpoint("c1", "reviews-3", "10.0.0.3")).await;
    let d = sub.next_change().await;
    assert!(d.snapshot.is_none(), "a delta is not a snapshot");
    // At the write's revision, or later when the same batch of the watch
    // carried the audit entry of this admin's registration.
    assert!(
        d.version >= rev && d.version <= rev + 1,
        "{} vs {rev}",
        d.version
    );
    assert!(d.version > snap.version);
    assert_eq!(d.endpoints.len(), 1);
    assert_eq!(d.endpoints[0].id, "reviews-3");

    fed.reg
        .deregister_endpoint(api::DeregisterEndpointRequest {
            endpoint: Some(api::EndpointRef {
                service: Some(svc("default", "reviews")),
                cluster: "c1".into(),
                id: "reviews-1".into(),
            }),
        })
        .await
        .unwrap();
    let d2 = sub.next_change().await;
    assert!(d2.version > d.version);
    assert_eq!(d2.removed_endpoints.len(), 1);
    assert_eq!(d2.removed_endpoints[0].id, "reviews-1");
    sub.ack(d.version).await;
    sub.nack(d2.version, "route table refers to unknown subset v9")
        .await;

    fed.reg
        .set_export(api::SetExportRequest {
            service: Some(svc("default", "reviews")),
            cluster: "c2".into(),
            exported: true,
        })
        .await
        .unwrap();
    let d3 = sub.next_change().await;
    assert_eq!(d3.exports.len(), 1);
    assert!(d3.exports[0].exported);

    let want = (d.version, d2.version);
    assert_eventually!({
        let st = fed.status().await;
        st.subscribers.len() == 1
            && st.subscribers[0].node_id == "agent-1"
            && st.subscribers[0].acked_version == want.0
            && st.subscribers[0].nack_version == want.1
            && st.subscribers[0].nack_reason.contains("unknown subset")
    });
    // A subscriber that leaves is forgotten.
    drop(sub);
    assert_eventually!(fed.status().await.subscribers.is_empty());

    // On shutdown, open streams end with UNAVAILABLE so agents reconnect.
    let mut sub = subscribe(&mut fed, "agent-2").await;
    sub.snapshot().await;
    let stopping = tokio::spawn(fed.bound.shutdown(Duration::from_secs(60)));
    // Deltas already on their way (the leader's weights) may come first.
    let status = tokio::time::timeout(PATIENCE, async {
        loop {
            match sub.rx.next().await.expect("a final status") {
                Ok(_delta) => {}
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("shutting down"),
        "{}",
        status.message()
    );
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("shutdown does not wait for streams")
        .unwrap()
        .unwrap();
}

async fn invalid_requests_name_the_field(mut fed: Fed) {
    let mut bad = cluster("c1", "us-east");
    bad.locality.as_mut().unwrap().region = "US East".into();
    let r = fed
        .reg
        .register_cluster(api::RegisterClusterRequest { cluster: Some(bad) })
        .await;
    assert_refused(
        r,
        Code::InvalidArgument,
        "cluster.locality.region: invalid region \"US East\"",
    );
    let r = fed
        .reg
        .register_cluster(api::RegisterClusterRequest { cluster: None })
        .await;
    assert_refused(r, Code::InvalidArgument, "cluster: is required");
    assert!(
        fed.clusters().await.is_empty(),
        "a refused registration writes nothing"
    );

    register(&mut fed, cluster("c1", "us-east")).await;
    let mut ep = endpoint("c1", "r1", "10.0.0.1");
    ep.ports[0].number = 0;
    let r = fed
        .reg
        .register_endpoint(api::RegisterEndpointRequest { endpoint: Some(ep) })
        .await;
    assert_refused(r, Code::InvalidArgument, "endpoint.ports[0].number");
    let ghost = Some(endpoint("ghost", "r1", "10.0.0.1"));
    let r = fed
        .reg
        .register_endpoint(api::RegisterEndpointRequest { endpoint: ghost })
        .await;
    assert_refused(
        r,
        Code::FailedPrecondition,
        "endpoint.cluster: cluster ghost is not registered",
    );
    let r = fed
        .reg
        .heartbeat(api::HeartbeatRequest {
            cluster: "Bad!".into(),
        })
        .await;
    assert_refused(r, Code::InvalidArgument, "cluster: invalid cluster name");
    let r = fed
        .reg
        .heartbeat(api::HeartbeatRequest {
            cluster: "nobody".into(),
        })
        .await;
    assert_refused(
        r,
        Code::FailedPrecondition,
        "cluster: cluster nobody is not registered",
    );
    assert!(
        fed.endpoints("default", "reviews").await.is_err(),
        "nothing was written"
    );

    // Discovery refuses a first message that is not a subscribe, or lacks a node id.
    let (tx, rx) = mpsc::channel(1);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Ack(api::Ack {
            version: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let e = fed
        .disc
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("first message must be a subscribe"));
    let (tx, rx) = mpsc::channel(1);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: String::new(),
            cluster: "c1".into(),
            kind: 1,
            namespace: "default".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let e = fed
        .disc
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "subscribe.node_id: is required");
}

async fn lapsed_heartbeat_makes_cluster_unknown_and_keeps_data(mut fed: Fed) {
    register(&mut fed, cluster("c1", "us-east")).await;
    add(&mut fed, endpoint("c1", "r1", "10.0.0.1")).await;
    // Heartbeats keep it live past the TTL.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        fed.reg
            .heartbeat(api::HeartbeatRequest {
                cluster: "c1".into(),
            })
            .await
            .unwrap();
    }
    assert_eq!(fed.clusters().await[0].liveness, api::Liveness::Live as i32);
    // Silence: the lease lapses; the cluster turns unknown but stays, with its endpoints.
    let before = federation::registry::now_unix_ms();
    assert_eventually!(fed.clusters().await[0].liveness == api::Liveness::Unknown as i32);
    let c = &fed.clusters().await[0];
    assert!(c.since_unix_ms >= before, "unknown since the lapse");
    assert_eq!(
        fed.endpoints("default", "reviews").await.unwrap().len(),
        1,
        "data is never deleted by a lapse"
    );
    // A heartbeat brings it back.
    fed.reg
        .heartbeat(api::HeartbeatRequest {
            cluster: "c1".into(),
        })
        .await
        .unwrap();
    assert_eventually!(fed.clusters().await[0].liveness == api::Liveness::Live as i32);
}

/// Writes a value "by hand": with etcdctl against etcd, through the store otherwise.
async fn hand_write(fed: &Fed, key: &str, value: &str) {
    match &fed._etcd {
        Some(fx) => {
            let out = std::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &fx.endpoint(), "put", key, value])
                .output()
                .expect("etcdctl runs (Debian etcd-client)");
            assert!(
                out.status.success(),
                "etcdctl put: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => {
            fed.bound
                .store
                .put(key, value.as_bytes().to_vec(), None)
                .await
                .unwrap();
        }
    }
}

async fn malformed_values_are_skipped(mut fed: Fed) {
    register(&mut fed, cluster("c1", "us-east")).await;
    add(&mut fed, endpoint("c1", "good", "10.0.0.1")).await;
    let bad_key = "/fedmesh/v1/endpoints/default/reviews/c1/broken";
    hand_write(&fed, bad_key, "{\"id\": 42").await;
    hand_write(&fed, "/fedmesh/v1/clusters/c9", "{\"name\":\"c8\"}").await;
    add(&mut fed, endpoint("c1", "after", "10.0.0.2")).await;

    let st = fed.status().await;
    let keys: Vec<_> = st.invalid_entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["/fedmesh/v1/clusters/c9", bad_key]);
    assert!(
        st.invalid_entries[1]
            .reason
            .starts_with("not a valid Endpoint"),
        "{}",
        st.invalid_entries[1].reason
    );
    let ids: Vec<_> = fed
        .endpoints("default", "reviews")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["after", "good"], "the rest keeps working");
    assert_eq!(fed.clusters().await.len(), 1);

    // A subscriber's snapshot leaves it out too.
    let mut sub = subscribe(&mut fed, "agent-x").await;
    assert_eq!(sub.snapshot().await.endpoints.len(), 2);

    // Fixing the value by hand brings the endpoint in and clears the complaint.
    let fixed = serde_json::json!({
        "id": "broken", "service": {"namespace": "default", "name": "reviews"}, "cluster": "c1",
        "address": "10.0.0.9", "ports": [{"number": 9080}], "locality": {"region": "us-east", "zone": "us-east-1a"}
    });
    hand_write(&fed, bad_key, &fixed.to_string()).await;
    // Other deltas may come first: on a loaded machine c1's 10 s heartbeat
    // can lapse during this test, and its state change is a delta of its own.
    let d = loop {
        let d = sub.next().await;
        if !d.endpoints.is_empty() {
            break d;
        }
        assert!(d.removed_endpoints.is_empty(), "{d:?}");
    };
    assert_eq!(d.endpoints[0].id, "broken");
    assert_eventually!(fed.status().await.invalid_entries.len() == 1);
}

macro_rules! both_backends {
    ($($name:ident($ttl:literal)),* $(,)?) => {
        mod memory_backend {
            $( #[tokio::test] async fn $name() { super::$name(super::Fed::memory($ttl).await).await } )*
        }
        mod etcd_backend {
            $( #[tokio::test] async fn $name() { super::$name(super::Fed::etcd($ttl).await).await } )*
        }
    };
}

both_backends!(
    register_list_and_discover("10s"),
    invalid_requests_name_the_field("10s"),
    lapsed_heartbeat_makes_cluster_unknown_and_keeps_data("2s"),
    malformed_values_are_skipped("10s"),
);

/// etcd goes out of reach of the federation (a partition, made with a relay
/// we cut). The federation serves its last state, reports itself degraded and
/// refuses writes. Meanwhile the registry changes and is compacted; when the
/// partition heals the federation reads everything again and its subscribers
/// get the difference.
#[tokio::test]
async fn etcd_partition_degrades_then_resyncs_after_compaction() {
    mesh_test::trace_init();
    let fx = EtcdFixture::start();
    let relay = TcpRelay::start(fx.client_addr()).await.unwrap();
    let through_relay = EtcdStore::connect(&[format!("http://{}", relay.addr())])
        .await
        .unwrap();
    let direct = EtcdStore::connect(&[fx.endpoint()]).await.unwrap();
    let mut fed = Fed::start(Arc::new(through_relay), "10s", Some(fx)).await;
    register(&mut fed, cluster("c1", "us-east")).await;
    add(&mut fed, endpoint("c1", "stays", "10.0.0.1")).await;
    add(&mut fed, endpoint("c1", "goes", "10.0.0.2")).await;
    let mut sub = subscribe(&mut fed, "agent-p").await;
    let snap = sub.snapshot().await;
    assert_eq!(snap.endpoints.len(), 2);
    let st = fed.status().await;
    assert!(st.registry_reachable);
    assert_eq!(st.registry, "etcd");
    // The admin port: ready while the registry answers; calls counted by
    // RPC, code and principal kind.
    let admin_port = fed.bound.admin.unwrap();
    assert_eventually!(admin_get(admin_port, "/ready").await.0 == 200);
    let (_, metrics) = admin_get(admin_port, "/metrics").await;
    assert!(
        metrics.contains(r#"fedmesh_federation_api_calls_total{rpc="Admin/GetStatus",code="Ok",principal="operator"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("fedmesh_federation_registry_reachable 1"),
        "{metrics}"
    );
    // The CA's expiries: the root, and c1's intermediate once it signed.
    let root = fed.bound.ca.record().signing.clone();
    assert_eventually!(
        {
            let (_, m) = admin_get(admin_port, "/metrics").await;
            m.contains(&format!(
                "fedmesh_federation_ca_not_after_seconds{{kind=\"root\",root=\"{root}\",cluster=\"\"}}"
            )) && m.contains(&format!(
                "fedmesh_federation_ca_not_after_seconds{{kind=\"intermediate\",root=\"{root}\",cluster=\"c1\"}}"
            ))
        },
        Duration::from_secs(15)
    );

    relay.cut();
    assert_eventually!(
        !fed.status().await.registry_reachable,
        Duration::from_secs(20)
    );
    assert_eventually!(admin_get(admin_port, "/ready").await.0 == 503);
    let st = fed.status().await;
    assert!(!st.degraded_reason.is_empty());
    // Last state still served.
    assert_eq!(fed.endpoints("default", "reviews").await.unwrap().len(), 2);
    assert_eq!(fed.clusters().await.len(), 1);
    // Writes are refused, clearly.
    let e = fed
        .reg
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("c1", "new", "10.0.0.3")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("registry unavailable"),
        "{}",
        e.message()
    );

    // Behind the partition the registry moves on and is compacted.
    let reg = federation::registry::Registry::new(Arc::new(direct.clone()));
    let gone: mesh_core::endpoint::EndpointKey = mesh_core::convert::FromApi::from_api(
        api::EndpointRef {
            service: Some(svc("default", "reviews")),
            cluster: "c1".into(),
            id: "goes".into(),
        },
        "",
    )
    .unwrap();
    reg.delete_endpoint(&gone).await.unwrap();
    let added: mesh_core::endpoint::Endpoint =
        mesh_core::convert::FromApi::from_api(endpoint("c1", "arrived", "10.0.0.4"), "").unwrap();
    let rev = reg.put_endpoint(&added).await.unwrap();
    direct.compact(rev).await.unwrap();

    relay.restore();
    assert_eventually!(
        fed.status().await.registry_reachable,
        Duration::from_secs(20)
    );
    assert_eventually!(admin_get(admin_port, "/ready").await.0 == 200);
    assert_eventually!(
        {
            let ids: Vec<_> = fed
                .endpoints("default", "reviews")
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.id)
                .collect();
            ids == ["arrived", "stays"]
        },
        Duration::from_secs(20)
    );
    // The subscriber got the difference as deltas: one removal, one addition.
    let mut removed = Vec::new();
    let mut added = Vec::new();
    while removed.is_empty() || added.is_empty() {
        let d = sub.next().await;
        assert!(d.snapshot.is_none());
        removed.extend(d.removed_endpoints.into_iter().map(|e| e.id));
        added.extend(d.endpoints.into_iter().map(|e| e.id));
    }
    assert_eq!(removed, ["goes"]);
    assert_eq!(added, ["arrived"]);
    // And writes work again.
    add(&mut fed, endpoint("c1", "new", "10.0.0.3")).await;
}

/// A snapshot larger than one message arrives whole, in order, with `last` on the final chunk.
#[tokio::test]
async fn large_snapshot_arrives_in_chunks() {
    let mut fed = Fed::memory("10s").await;
    register(&mut fed, cluster("c1", "us-east")).await;
    let store = fed.bound.store.clone();
    let reg = federation::registry::Registry::new(store);
    let n = federation::state::SNAPSHOT_CHUNK * 2 + 7;
    let mut last = 0;
    for i in 0..n {
        let e: mesh_core::endpoint::Endpoint = mesh_core::convert::FromApi::from_api(
            endpoint(
                "c1",
                &format!("e{i:05}"),
                &format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256 + 1)
                    .replace(".256", ".1"),
            ),
            "",
        )
        .unwrap();
        last = reg.put_endpoint(&e).await.unwrap();
    }
    assert!(fed.bound.shared.wait_for(last, PATIENCE).await);
    let mut sub = subscribe(&mut fed, "big").await;
    let first = sub.next().await;
    assert_eq!(first.snapshot.as_ref().unwrap().index, 0);
    let mut total = first.endpoints.len();
    let mut chunks = 1;
    let mut with_endpoints = 1;
    let mut done = first.snapshot.unwrap().last;
    while !done {
        let c = sub.next().await;
        let s = c.snapshot.unwrap();
        assert_eq!(s.index, chunks);
        chunks += 1;
        total += c.endpoints.len();
        with_endpoints += u32::from(!c.endpoints.is_empty());
        // The service's weights, if the leader computed them already, come
        // after the endpoints, in a message of their own.
        assert!(c.endpoints.is_empty() || c.weights.is_empty());
        done = s.last;
    }
    assert_eq!(total, n);
    assert_eq!(with_endpoints, 3);
    assert!(chunks <= 4, "{chunks} chunks");
}

/// Subscribers of one state share one snapshot; a change makes the next
/// subscriber's snapshot anew, with the change in it.
#[tokio::test]
async fn subscribers_share_a_snapshot_until_the_state_changes() {
    let mut fed = Fed::memory("10s").await;
    register(&mut fed, cluster("c1", "us-east")).await;
    let rev = add(&mut fed, endpoint("c1", "a", "10.0.0.1")).await;
    assert!(fed.bound.shared.wait_for(rev, PATIENCE).await);
    let (one, _) = fed.bound.shared.subscribe();
    let (two, _) = fed.bound.shared.subscribe();
    assert!(Arc::ptr_eq(&one, &two), "the second subscriber copied it");
    let mut early = subscribe(&mut fed, "early").await;
    assert_eq!(early.snapshot().await.endpoints.len(), 1);

    let rev = add(&mut fed, endpoint("c1", "b", "10.0.0.2")).await;
    assert!(fed.bound.shared.wait_for(rev, PATIENCE).await);
    let (three, _) = fed.bound.shared.subscribe();
    assert!(!Arc::ptr_eq(&one, &three), "a stale snapshot was reused");
    let mut late = subscribe(&mut fed, "late").await;
    let ids: Vec<String> = late
        .snapshot()
        .await
        .endpoints
        .iter()
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(ids, ["a", "b"]);
}
