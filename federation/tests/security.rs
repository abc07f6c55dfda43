//! Who may call the federation: every RPC the API serves walked as an
//! anonymous caller, as a node of another cluster and as a viewer; the
//! attacks of issue 15 replayed (each one worked against the open API);
//! enrollment that checks the federation before it sends a token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{admin, anonymous, gateway, operator, workload};
use federation::app::Bound;
use federation::auth::Role;
use federation::config::Config;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::discovery_client::DiscoveryClient;
use mesh_api::v1::identity_client::IdentityClient;
use mesh_api::v1::registration_client::RegistrationClient;
use mesh_api::v1::traffic_client::TrafficClient;
use tonic::transport::Channel;
use tonic::Code;

async fn start() -> Bound {
    mesh_test::trace_init();
    federation::app::build(&Config::embedded("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap()
}

/// Every RPC path the generated services route: the paths in the
/// generated code, which is what the server dispatches on.
fn every_rpc() -> Vec<String> {
    let src = include_str!("../../mesh-api/src/gen/fedmesh.v1.rs");
    let mut paths: Vec<String> = src
        .split('"')
        .filter(|s| {
            s.starts_with("/fedmesh.v1.") && s.matches('/').count() == 2 && !s.contains(' ')
        })
        .map(str::to_string)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Calls `path` with an empty message, whatever its types: the status the
/// federation answers.
async fn call(ch: &Channel, path: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let codec: tonic_prost::ProstCodec<(), ()> = tonic_prost::ProstCodec::default();
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        grpc.unary(tonic::Request::new(()), path, codec),
    )
    .await
    {
        Ok(Ok(_)) => tonic::Status::ok(""),
        Ok(Err(s)) => s,
        Err(_) => tonic::Status::deadline_exceeded("no answer in 10 s"),
    }
}

fn is_read(path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap_or_default();
    ["List", "Get", "Explain", "WhoAmI"]
        .iter()
        .any(|p| method.starts_with(p))
        && method != "ListAudit"
        && method != "ListRoleBindings"
}

#[test]
fn every_rpc_has_an_authorization_rule() {
    let paths = every_rpc();
    assert!(paths.len() >= 25, "found only {paths:?}");
    for p in &paths {
        assert!(
            federation::auth::rule(p).is_some(),
            "{p} has no rule in federation::auth::rule: decide who may call it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_the_anonymous_another_clusters_node_and_a_viewer() {
    let b = start().await;
    let anon = anonymous(&b).await;
    let other = workload(&b, "c2", "intruder").await;
    let viewer = operator(&b, "vic", &[Role::Viewer]).await;
    for path in every_rpc() {
        let s = call(&anon, &path).await;
        if path == "/fedmesh.v1.Identity/SignCertificate" {
            // Enrollment is the one anonymous call; without a credential it signs nothing.
            assert_ne!(s.code(), Code::Ok, "{path} anonymous: {s:?}");
        } else {
            assert_eq!(s.code(), Code::Unauthenticated, "{path} anonymous: {s:?}");
            assert!(s.message().contains("meshctl login"), "{path}: {s:?}");
        }
        let s = call(&other, &path).await;
        // Asking who one is is every authenticated caller's right.
        if !path.ends_with("/WhoAmI") {
            assert_ne!(s.code(), Code::Ok, "{path} as a node of c2: {s:?}");
        }
        assert_ne!(s.code(), Code::Unauthenticated, "{path} as a node: {s:?}");
        let s = call(&viewer, &path).await;
        if is_read(&path) {
            assert!(
                !matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied),
                "{path} is a read: a viewer may call it: {s:?}"
            );
        } else if path != "/fedmesh.v1.Identity/SignCertificate" {
            assert_eq!(
                s.code(),
                Code::PermissionDenied,
                "{path} as a viewer: {s:?}"
            );
            assert!(
                s.message().contains("needs"),
                "{path}: names the right: {s:?}"
            );
        }
    }
    // A method the table does not know is refused before routing, to an admin too.
    let s = call(&admin(&b).await, "/fedmesh.v1.Admin/NoSuchMethod").await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

fn cluster(name: &str, gateway: &str) -> api::RegisterClusterRequest {
    api::RegisterClusterRequest {
        cluster: Some(api::ClusterInfo {
            name: name.into(),
            locality: Some(api::Locality {
                region: "us-west".into(),
                zone: "us-west-1a".into(),
            }),
            network: format!("net-{name}"),
            gateway_addresses: vec![gateway.into()],
            trust_domain: "cluster.local".into(),
            ..Default::default()
        }),
    }
}

fn endpoint(cluster: &str, id: &str, sa: Option<&str>) -> api::Endpoint {
    api::Endpoint {
        service: Some(api::ServiceKey {
            namespace: "default".into(),
            name: "reviews".into(),
        }),
        cluster: cluster.into(),
        id: id.into(),
        address: "10.0.0.7".into(),
        ports: vec![api::Port {
            name: "http".into(),
            number: 9080,
            protocol: "http".into(),
            ..Default::default()
        }],
        health: api::Health::Healthy as i32,
        identity: sa
            .map(|sa| format!("spiffe://cluster.local/ns/default/sa/{sa}"))
            .unwrap_or_default(),
        locality: Some(api::Locality {
            region: "us-west".into(),
            zone: "us-west-1a".into(),
        }),
        labels: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attacks_on_the_open_api_are_refused() {
    let b = start().await;
    let adm = admin(&b).await;
    RegistrationClient::new(adm.clone())
        .register_cluster(cluster("us-west-1", "10.1.0.1:15443"))
        .await
        .unwrap();
    RegistrationClient::new(adm.clone())
        .register_cluster(cluster("eu-west-1", "10.2.0.1:15443"))
        .await
        .unwrap();
    let anon = anonymous(&b).await;

    // RegisterCluster rewrote a cluster's network and gateway.
    let s = RegistrationClient::new(anon.clone())
        .register_cluster(cluster("us-west-1", "203.0.113.66:15443"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let listed = AdminClient::new(adm.clone())
        .list_clusters(api::ListClustersRequest {})
        .await
        .unwrap()
        .into_inner();
    let west = listed
        .clusters
        .iter()
        .find(|c| c.info.as_ref().unwrap().name == "us-west-1")
        .unwrap();
    assert_eq!(
        west.info.as_ref().unwrap().gateway_addresses,
        vec!["10.1.0.1:15443".to_string()]
    );
    // ...and a node of one cluster cannot change another, nor its own.
    let s = RegistrationClient::new(workload(&b, "eu-west-1", "reviews").await)
        .register_cluster(cluster("us-west-1", "203.0.113.66:15443"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // RegisterEndpoint + DeregisterEndpoint + SetWeights stole reviews' traffic.
    let s = RegistrationClient::new(anon.clone())
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("us-west-1", "evil", Some("reviews"))),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let mut reviews = RegistrationClient::new(workload(&b, "us-west-1", "reviews").await);
    reviews
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("us-west-1", "r1", Some("reviews"))),
        })
        .await
        .unwrap();
    let mut intruder = RegistrationClient::new(workload(&b, "eu-west-1", "reviews").await);
    for (what, ep) in [
        (
            "another cluster",
            endpoint("us-west-1", "evil", Some("reviews")),
        ),
        (
            "another identity",
            endpoint("eu-west-1", "evil", Some("ratings")),
        ),
        ("no identity", endpoint("eu-west-1", "evil", None)),
    ] {
        let s = intruder
            .register_endpoint(api::RegisterEndpointRequest { endpoint: Some(ep) })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
    }
    let key = api::EndpointRef {
        service: Some(api::ServiceKey {
            namespace: "default".into(),
            name: "reviews".into(),
        }),
        cluster: "us-west-1".into(),
        id: "r1".into(),
    };
    let s = intruder
        .deregister_endpoint(api::DeregisterEndpointRequest {
            endpoint: Some(key.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // Same cluster, another workload: not its endpoint either.
    let s = RegistrationClient::new(workload(&b, "us-west-1", "ratings").await)
        .deregister_endpoint(api::DeregisterEndpointRequest {
            endpoint: Some(key.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("belongs to"), "{s:?}");
    // Nor may it take the endpoint over by registering its key under its
    // own identity (which would also inherit the endpoint's lease).
    let s = RegistrationClient::new(workload(&b, "us-west-1", "ratings").await)
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("us-west-1", "r1", Some("ratings"))),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("belongs to"), "{s:?}");
    let s = TrafficClient::new(anon.clone())
        .set_weights(api::SetWeightsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = TrafficClient::new(operator(&b, "pat", &[Role::PolicyAdmin]).await)
        .set_weights(api::SetWeightsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("role operator"), "{s:?}");

    // A node reports load and probes only for itself; only a gateway probes.
    let s = intruder
        .report_probes(api::ReportProbesRequest {
            from_cluster: "eu-west-1".into(),
            results: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let mut gw = RegistrationClient::new(gateway(&b, "eu-west-1").await);
    gw.report_probes(api::ReportProbesRequest {
        from_cluster: "eu-west-1".into(),
        results: vec![],
    })
    .await
    .unwrap();
    let s = gw
        .report_probes(api::ReportProbesRequest {
            from_cluster: "us-west-1".into(),
            results: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = intruder
        .report_load(api::ReportLoadRequest {
            endpoint: Some(key.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = intruder
        .set_export(api::SetExportRequest {
            service: key.service.clone(),
            cluster: "eu-west-1".into(),
            exported: true,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    reviews
        .set_export(api::SetExportRequest {
            service: key.service.clone(),
            cluster: "us-west-1".into(),
            exported: true,
        })
        .await
        .unwrap();

    // Drain --force, DeletePolicies, RotateTrust and ListAudit were anonymous.
    let s = TrafficClient::new(anon.clone())
        .drain(api::DrainRequest {
            cluster: "us-west-1".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let mut anon_admin = AdminClient::new(anon.clone());
    let s = anon_admin
        .delete_policies(api::DeletePoliciesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = anon_admin
        .rotate_trust(api::RotateTrustRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = anon_admin
        .list_audit(api::ListAuditRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = AdminClient::new(operator(&b, "oscar", &[Role::Operator]).await)
        .rotate_trust(api::RotateTrustRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_served_as_its_certificate_names_it() {
    let b = start().await;
    RegistrationClient::new(admin(&b).await)
        .register_cluster(cluster("c1", "10.1.0.1:15443"))
        .await
        .unwrap();
    let subscribe = |cluster: &str, ns: &str, kind: api::NodeKind| api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: "n".into(),
            cluster: cluster.into(),
            kind: kind as i32,
            namespace: ns.into(),
            ..Default::default()
        })),
    };
    let open = |ch: Channel, first: api::DiscoveryRequest| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(first).await.unwrap();
        let r = DiscoveryClient::new(ch)
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        match r {
            Ok(resp) => {
                let mut s = resp.into_inner();
                s.message().await.map(|m| m.is_some())
            }
            Err(s) => Err(s),
        }
    };
    let c2 = workload(&b, "c2", "reviews").await;
    let s = open(c2, subscribe("c1", "default", api::NodeKind::Agent))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "another cluster's view: {s:?}"
    );
    let c1 = workload(&b, "c1", "reviews").await;
    let s = open(
        c1.clone(),
        subscribe("c1", "kube-system", api::NodeKind::Agent),
    )
    .await
    .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "another namespace's view: {s:?}"
    );
    let s = open(
        c1.clone(),
        subscribe("c1", "default", api::NodeKind::Gateway),
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "a gateway's view: {s:?}");
    assert!(open(c1, subscribe("c1", "default", api::NodeKind::Agent))
        .await
        .unwrap());
    // An operator is no node: the stream is for the data plane.
    let s = open(
        admin(&b).await,
        subscribe("c1", "default", api::NodeKind::Agent),
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_single_use_bounded_and_carry_the_root() {
    let b = start().await;
    let sec = operator(&b, "sam", &[Role::SecurityAdmin]).await;
    let mut admin_api = AdminClient::new(sec);
    let req = |ttl: u32| api::CreateJoinTokenRequest {
        cluster: "c1".into(),
        namespace: "default".into(),
        service_account: "reviews".into(),
        ttl_seconds: ttl,
        ..Default::default()
    };
    // TTL 4,000,000,000 s was accepted; the ceiling is 24 h.
    let s = admin_api
        .create_join_token(req(4_000_000_000))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("max-token-ttl"), "{s:?}");
    let s = AdminClient::new(operator(&b, "olga", &[Role::Operator]).await)
        .create_join_token(req(60))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let t = admin_api
        .create_join_token(req(600))
        .await
        .unwrap()
        .into_inner();
    let root = b.ca.serving_root();
    assert_eq!(t.root_sha256, root);
    assert!(t.token.starts_with(&format!("fmjt_{root}_")), "{}", t.token);
    // A node with only the token checks the federation against the root it carries.
    let tls = mesh_node::enroll::trust(None, Some(&t.token)).unwrap();
    let target = mesh_node::fed::Target {
        url: b.url(),
        tls: Some(tls),
    };
    let e = mesh_node::enroll::Enrollment {
        target: target.clone(),
        cluster: "c1".into(),
        identity: "spiffe://cluster.local/ns/default/sa/reviews".into(),
    };
    let cred = || api::sign_certificate_request::Credential::JoinToken(t.token.clone());
    mesh_node::enroll::enroll(&e, cred()).await.unwrap();
    // Enrolled: its calls are a node's now.
    let who = AdminClient::new(target.channel().await.unwrap())
        .who_am_i(api::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (who.kind.as_str(), who.name.as_str(), who.cluster.as_str()),
        (
            "workload",
            "spiffe://cluster.local/ns/default/sa/reviews",
            "c1"
        )
    );
    // Single use by default.
    let err = mesh_node::enroll::enroll(&e, cred()).await.err().unwrap();
    assert!(format!("{err:#}").contains("already used"), "{err:#}");

    // A token whose root is not the federation's: nothing is sent.
    let forged = format!("fmjt_{}_{}", "ab".repeat(32), "00".repeat(32));
    let tls = mesh_node::enroll::trust(None, Some(&forged)).unwrap();
    let err = mesh_node::fed::channel(&b.url(), Some(&tls), |e| e)
        .await
        .map(|_| ())
        .unwrap_err();
    let chain = format!("{err:?}");
    assert!(chain.contains("does not chain to the root"), "{chain}");
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

/// An operator's renewal request: a new key's CSR signed by the key in use.
fn renewal(key: &rcgen::KeyPair, chain_pem: &str) -> api::SignCertificateRequest {
    use rcgen::SigningKey as _;
    let next = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&next)
        .unwrap()
        .pem()
        .unwrap();
    let signature = key.sign(csr.as_bytes()).unwrap();
    api::SignCertificateRequest {
        csr_pem: csr,
        credential: Some(api::sign_certificate_request::Credential::Renewal(
            api::Renewal {
                chain_pem: chain_pem.into(),
                signature,
            },
        )),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_log_in_with_a_single_use_token_and_their_roles_take_effect_at_once() {
    let b = start().await;
    let adm = admin(&b).await;
    let t = AdminClient::new(adm.clone())
        .create_operator_token(api::CreateOperatorTokenRequest {
            name: "alice".into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.identity, "spiffe://cluster.local/fedmesh/operator/alice");
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let tls = mesh_node::enroll::trust(None, Some(&t.token)).unwrap();
    let ch = mesh_node::fed::channel(&b.url(), Some(&tls), |e| e)
        .await
        .unwrap();
    let sign = |csr: String| api::SignCertificateRequest {
        csr_pem: csr,
        credential: Some(api::sign_certificate_request::Credential::OperatorToken(
            t.token.clone(),
        )),
        ..Default::default()
    };
    let r = IdentityClient::new(ch.clone())
        .sign_certificate(sign(csr.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.identity, t.identity);
    let s = IdentityClient::new(ch)
        .sign_certificate(sign(csr))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "the token is spent: {s:?}");
    tls.set_client_pem(&r.certificate_chain_pem, &key.serialize_pem())
        .unwrap();
    let alice = mesh_node::fed::channel(&b.url(), Some(&tls), |e| e)
        .await
        .unwrap();
    let who =
        |ch: Channel| async move { AdminClient::new(ch).who_am_i(api::WhoAmIRequest {}).await };
    // No role yet: known, but allowed nothing beyond asking who it is.
    let me = who(alice.clone()).await.unwrap().into_inner();
    assert_eq!((me.kind.as_str(), me.name.as_str()), ("operator", "alice"));
    assert!(me.roles.is_empty(), "{me:?}");
    let s = AdminClient::new(alice.clone())
        .list_clusters(api::ListClustersRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("operator alice has no role"), "{s:?}");
    AdminClient::new(adm.clone())
        .set_role_binding(api::SetRoleBindingRequest {
            operator: "alice".into(),
            roles: vec!["viewer".into()],
        })
        .await
        .unwrap();
    let me = who(alice.clone()).await.unwrap().into_inner();
    assert_eq!((me.kind.as_str(), me.name.as_str()), ("operator", "alice"));
    assert_eq!(me.roles, vec!["viewer".to_string()]);
    // With a role, the certificate renews by proof of possession.
    let renewed = IdentityClient::new(alice.clone())
        .sign_certificate(renewal(&key, &r.certificate_chain_pem))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.identity, t.identity);
    // Bad roles are named; a security admin may not grant roles.
    let s = AdminClient::new(adm.clone())
        .set_role_binding(api::SetRoleBindingRequest {
            operator: "alice".into(),
            roles: vec!["root".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("roles[0]: unknown role \"root\""),
        "{s:?}"
    );
    let s = AdminClient::new(operator(&b, "sue", &[Role::SecurityAdmin]).await)
        .set_role_binding(api::SetRoleBindingRequest {
            operator: "sue".into(),
            roles: vec!["admin".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // Removing the role takes effect on the next call, on the same connection.
    AdminClient::new(adm.clone())
        .set_role_binding(api::SetRoleBindingRequest {
            operator: "alice".into(),
            roles: vec![],
        })
        .await
        .unwrap();
    let s = AdminClient::new(alice.clone())
        .list_clusters(api::ListClustersRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // ...and an operator without a role cannot renew its certificate.
    let s = IdentityClient::new(alice)
        .sign_certificate(renewal(&key, &r.certificate_chain_pem))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("no role"), "{s:?}");
    // The audit log names who did it, from the certificate.
    let audit = AdminClient::new(adm)
        .list_audit(api::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        audit.entries.iter().any(|e| e.action == "role_binding"
            && e.subject == "operator:alice"
            && e.actor == "operator:test-admin"),
        "{:?}",
        audit.entries
    );
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let b = start().await;
    let other = mesh_test::tls::TestCa::new();
    let leaf = other.issue(&[], Some("spiffe://cluster.local/fedmesh/operator/mallory"));
    let mut ctx = b.operator_context("unused", &[]).await.unwrap();
    ctx.client_certificate_data = leaf.cert_pem.clone();
    ctx.client_key_data = leaf.key_pem.clone();
    let target = mesh_node::fed::Target::from_context(&ctx).unwrap();
    let refused = match target.channel().await {
        Err(_) => true,
        Ok(ch) => AdminClient::new(ch)
            .who_am_i(api::WhoAmIRequest {})
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate the mesh CA did not issue got through"
    );
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

#[test]
fn insecure_plaintext_refuses_a_non_loopback_address() {
    use clap::Parser;
    let parse = |listen: &str| {
        Config::from_args(
            &federation::config::Args::try_parse_from([
                "fedmesh-federation",
                "--insecure-plaintext",
                "--listen",
                listen,
            ])
            .unwrap(),
        )
    };
    let errs = parse("0.0.0.0:15010").unwrap_err();
    assert!(errs.iter().any(|e| e.contains("loopback only")), "{errs:?}");
    assert!(parse("127.0.0.1:15010").is_ok());
    assert!(parse("[::1]:15010").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_admin_writes_a_working_private_configuration() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.yaml");
    let cfg = Config::from_args(
        &federation::config::Args::try_parse_from([
            "fedmesh-federation",
            "--listen",
            "127.0.0.1:0",
            "--registry",
            "memory",
            "--bootstrap-admin",
            path.to_str().unwrap(),
        ])
        .unwrap(),
    )
    .unwrap();
    let b = federation::app::build(&cfg).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let file = mesh_core::client_config::ClientConfig::load(&path).unwrap();
    let ctx = file.context(None).unwrap().clone();
    assert_eq!(ctx.server, b.url());
    let me = AdminClient::new(common::channel(&ctx).await)
        .who_am_i(api::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.name, "admin");
    assert_eq!(me.roles, vec!["admin".to_string()]);
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

async fn start_with(tune: impl FnOnce(&mut Config)) -> Bound {
    mesh_test::trace_init();
    let mut cfg = Config::embedded("127.0.0.1:0".parse().unwrap());
    tune(&mut cfg);
    federation::app::build(&cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_names_the_principal_and_a_flood_leaves_it_readable() {
    let b = start().await;
    b.shared.wait_synced().await;
    RegistrationClient::new(admin(&b).await)
        .register_cluster(cluster("c1", "10.1.0.1:15443"))
        .await
        .unwrap();
    let mut oscar = TrafficClient::new(operator(&b, "oscar", &[Role::Operator]).await);
    let drain = |undrain: bool, actor: String| api::DrainRequest {
        cluster: "c1".into(),
        undrain,
        force: false,
        actor,
    };
    // 1000 KiB in `actor` filled the audit log; now it is refused, and the
    // refusal does not echo it.
    for size in [1000 * 1024, 10 * 1024, 257] {
        let s = oscar
            .drain(drain(false, "x".repeat(size)))
            .await
            .unwrap_err();
        assert_ne!(s.code(), Code::Ok);
        assert!(
            s.message().len() < 300,
            "{size}: echoes the field: {} bytes",
            s.message().len()
        );
        assert!(!s.message().contains("xxxxxxxxxx"), "{size}: {s:?}");
    }
    let reason = "r".repeat(federation::auth::MAX_REASON);
    for i in 0..100 {
        oscar.drain(drain(false, reason.clone())).await.unwrap();
        oscar
            .drain(drain(true, format!("drill {i}")))
            .await
            .unwrap();
    }
    // Every entry names who acted, from the certificate, and pages through.
    let mut adm = AdminClient::new(admin(&b).await);
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let page = adm
            .list_audit(api::ListAuditRequest {
                limit: 50,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 50);
        all.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let drains: Vec<_> = all
        .iter()
        .filter(|e| e.action == "drain" || e.action == "undrain")
        .collect();
    assert_eq!(drains.len(), 200, "{}", all.len());
    assert!(drains
        .iter()
        .all(|e| e.actor.starts_with("operator:oscar") && e.subject == "c1"));
    assert!(drains
        .iter()
        .any(|e| e.actor == "operator:oscar (drill 99)"));
    let largest = all
        .iter()
        .map(|e| e.actor.len() + e.subject.len() + e.detail.len())
        .max()
        .unwrap();
    assert!(largest < 4 * 1024, "an entry of {largest} bytes");
    // Retention keeps the newest; the registry takes writes afterwards.
    let keep = federation::audit::Retention {
        max_entries: 50,
        ..Default::default()
    };
    let gone = federation::audit::prune(&*b.store, keep).await.unwrap();
    assert_eq!(gone, all.len() - 50);
    let left = adm
        .list_audit(api::ListAuditRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(left.len(), 50);
    assert_eq!(left.last(), all.last());
    oscar.drain(drain(false, String::new())).await.unwrap();
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_floods_of_calls_and_of_large_messages() {
    let b = start_with(|c| {
        c.security.limits.rate_per_principal = 5;
        c.security.limits.anonymous_rate_per_address = 5;
    })
    .await;
    // Over a principal's rate: refused, naming the limit.
    let mut viewer = AdminClient::new(operator(&b, "vera", &[Role::Viewer]).await);
    let mut limited = None;
    for _ in 0..40 {
        if let Err(s) = viewer.who_am_i(api::WhoAmIRequest {}).await {
            limited = Some(s);
            break;
        }
    }
    let s = limited.expect("40 calls at once passed a rate of 5/s");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("operator:vera"), "{s:?}");
    // Anonymous enrollment, per source address.
    let anon = anonymous(&b).await;
    let mut limited = None;
    for _ in 0..40 {
        let s = IdentityClient::new(anon.clone())
            .sign_certificate(api::SignCertificateRequest::default())
            .await
            .unwrap_err();
        if s.code() == Code::ResourceExhausted {
            limited = Some(s);
            break;
        }
    }
    assert!(
        limited.is_some(),
        "40 anonymous calls at once passed a rate of 5/s"
    );

    // 15 MiB requests were read whole; now each is refused at its length.
    let b2 = start().await;
    let anon = anonymous(&b2).await;
    let big = "A".repeat(15 * 1024 * 1024);
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let (ch, csr) = (anon.clone(), big.clone());
            tokio::spawn(async move {
                IdentityClient::new(ch)
                    .sign_certificate(api::SignCertificateRequest {
                        csr_pem: csr,
                        cluster: "c1".into(),
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    drop(big);
    for c in calls {
        let s = c.await.unwrap().unwrap_err();
        assert_ne!(s.code(), Code::Ok);
        assert!(s.message().len() < 300, "{s:?}");
    }
    // The federation still serves.
    AdminClient::new(admin(&b2).await)
        .who_am_i(api::WhoAmIRequest {})
        .await
        .unwrap();
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
    b2.shutdown(std::time::Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_at_local_addresses_or_outside_the_clusters_networks_are_refused() {
    let b = start().await;
    let mut adm = RegistrationClient::new(admin(&b).await);
    adm.register_cluster(cluster("us-west-1", "10.1.0.1:15443"))
        .await
        .unwrap();
    let mut bounded = cluster("eu-west-1", "10.2.0.1:15443");
    bounded.cluster.as_mut().unwrap().endpoint_networks = vec!["10.8.0.0/16".into()];
    adm.register_cluster(bounded).await.unwrap();
    let at = |c: &str, ip: &str| {
        let mut e = endpoint(c, "r1", Some("reviews"));
        e.address = ip.into();
        api::RegisterEndpointRequest { endpoint: Some(e) }
    };
    // An endpoint at the gateway's loopback, exported, made the gateway a
    // TCP relay into its host.
    let mut reviews = RegistrationClient::new(workload(&b, "us-west-1", "reviews").await);
    for ip in ["127.0.0.1", "169.254.169.254", "::1"] {
        let s = reviews
            .register_endpoint(at("us-west-1", ip))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{ip}: {s:?}");
        assert!(s.message().starts_with("endpoint.address: "), "{s:?}");
        assert!(
            s.message().contains("does not allow local endpoints"),
            "{s:?}"
        );
    }
    // An admin is held to the cluster's rule too.
    let s = adm
        .register_endpoint(at("us-west-1", "127.0.0.1"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    reviews
        .register_endpoint(at("us-west-1", "10.1.2.3"))
        .await
        .unwrap();
    // A cluster with endpoint networks takes addresses in them only.
    let mut eu = RegistrationClient::new(workload(&b, "eu-west-1", "reviews").await);
    let s = eu
        .register_endpoint(at("eu-west-1", "10.9.0.1"))
        .await
        .unwrap_err();
    assert!(
        s.message()
            .contains("outside cluster eu-west-1's endpoint networks"),
        "{s:?}"
    );
    eu.register_endpoint(at("eu-west-1", "10.8.0.7"))
        .await
        .unwrap();
    // A bad network is named.
    let mut bad = cluster("ap-south-1", "10.3.0.1:15443");
    bad.cluster.as_mut().unwrap().endpoint_networks = vec!["10.8.0.1/16".into()];
    let s = adm.register_cluster(bad).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains("cluster.endpoint_networks[0]"),
        "{s:?}"
    );
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

/// The health of each endpoint of default/reviews, by id, as a viewer sees it.
async fn reviews_health(adm: &Channel) -> std::collections::BTreeMap<String, i32> {
    AdminClient::new(adm.clone())
        .list_endpoints(api::ListEndpointsRequest {
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints
        .into_iter()
        .map(|e| (e.id, e.health))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workloads_endpoint_lives_on_a_lease_and_leaves_rotation_when_it_lapses() {
    endpoint_leases(None).await;
}

/// The same on etcd, whose leases are the real thing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_leases_hold_on_etcd() {
    let fx = mesh_test::etcd::EtcdFixture::start();
    endpoint_leases(Some(fx.endpoint())).await;
}

async fn endpoint_leases(etcd: Option<String>) {
    // An endpoint whose agent was SIGKILLed stayed healthy forever.
    let ttl = std::time::Duration::from_secs(2);
    let b = start_with(|c| {
        c.heartbeat_ttl = ttl;
        c.endpoint_gc_after = std::time::Duration::from_secs(3);
        if let Some(e) = etcd {
            c.registry = federation::config::RegistrySpec::Etcd(vec![e]);
        }
    })
    .await;
    let adm_ch = admin(&b).await;
    let mut adm = RegistrationClient::new(adm_ch.clone());
    adm.register_cluster(cluster("c1", "10.1.0.1:15443"))
        .await
        .unwrap();
    let mut reviews = RegistrationClient::new(workload(&b, "c1", "reviews").await);
    let r = reviews
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("c1", "r1", Some("reviews"))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.lease_ttl_seconds, 2, "a workload's endpoint has a lease");
    // What an admin registers by hand (a VM, an external service) has none.
    let r = adm
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("c1", "vm1", Some("reviews"))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.lease_ttl_seconds, 0);
    let r1 = || api::RenewEndpointRequest {
        endpoint: Some(api::EndpointRef {
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            cluster: "c1".into(),
            id: "r1".into(),
        }),
    };
    // Another workload cannot keep it alive.
    let s = RegistrationClient::new(workload(&b, "c1", "ratings").await)
        .renew_endpoint(r1())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // Renewed, it outlives its TTL twice over.
    let healthy = api::Health::Healthy as i32;
    let unhealthy = api::Health::Unhealthy as i32;
    renew_for(&mut reviews, r1(), 2 * ttl).await;
    assert_eq!(reviews_health(&adm_ch).await["r1"], healthy);
    // The workload dies: out of rotation within the TTL (and the sweep),
    // while the unleased endpoint stays.
    mesh_test::assert_eventually!(reviews_health(&adm_ch).await["r1"] == unhealthy);
    assert_eq!(reviews_health(&adm_ch).await["vm1"], healthy);
    let s = reviews.renew_endpoint(r1()).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert!(s.message().contains("register it again"), "{s:?}");
    // Deleted later.
    mesh_test::assert_eventually!(!reviews_health(&adm_ch).await.contains_key("r1"));
    assert_eq!(reviews_health(&adm_ch).await["vm1"], healthy);
    // Back: registered again, healthy at once.
    reviews
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("c1", "r1", Some("reviews"))),
        })
        .await
        .unwrap();
    assert_eq!(reviews_health(&adm_ch).await["r1"], healthy);
    reviews.renew_endpoint(r1()).await.unwrap();
    // Taken away by an admin: its lease goes with it, and a registration
    // again makes a live one (renewed past the TTL, still healthy).
    adm.deregister_endpoint(api::DeregisterEndpointRequest {
        endpoint: r1().endpoint,
    })
    .await
    .unwrap();
    let s = reviews.renew_endpoint(r1()).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    reviews
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("c1", "r1", Some("reviews"))),
        })
        .await
        .unwrap();
    renew_for(&mut reviews, r1(), 2 * ttl).await;
    assert_eq!(reviews_health(&adm_ch).await["r1"], healthy);
    // What the admin registered and removed by hand is audited with its
    // name; the workload's own registrations are routine and are not.
    let audit = AdminClient::new(adm_ch.clone())
        .list_audit(api::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let by_admin = |action: &str, subject: &str| {
        audit
            .iter()
            .any(|e| e.action == action && e.subject == subject && e.actor.starts_with("operator:"))
    };
    assert!(
        by_admin("endpoint_register", "default/reviews/c1/vm1"),
        "{audit:?}"
    );
    assert!(
        by_admin("endpoint_deregister", "default/reviews/c1/r1"),
        "{audit:?}"
    );
    assert!(
        !audit
            .iter()
            .any(|e| e.action == "endpoint_register" && e.subject.ends_with("/r1")),
        "{audit:?}"
    );
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}

/// Renews `ep`'s 2 s lease every third of it, as an agent does, for `dur`.
async fn renew_for(
    reg: &mut RegistrationClient<Channel>,
    ep: api::RenewEndpointRequest,
    dur: std::time::Duration,
) {
    let until = tokio::time::Instant::now() + dur;
    while tokio::time::Instant::now() < until {
        let r = reg.renew_endpoint(ep.clone()).await.unwrap().into_inner();
        assert_eq!(r.lease_ttl_seconds, 2);
        tokio::time::sleep(std::time::Duration::from_millis(2000 / 3)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_removes_a_cluster_and_what_it_holds_only_when_forced() {
    let b = start().await;
    let adm_ch = admin(&b).await;
    let mut adm = RegistrationClient::new(adm_ch.clone());
    adm.register_cluster(cluster("c1", "10.1.0.1:15443"))
        .await
        .unwrap();
    let mut reviews = RegistrationClient::new(workload(&b, "c1", "reviews").await);
    reviews
        .register_endpoint(api::RegisterEndpointRequest {
            endpoint: Some(endpoint("c1", "r1", Some("reviews"))),
        })
        .await
        .unwrap();
    reviews
        .set_export(api::SetExportRequest {
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
            cluster: "c1".into(),
            exported: true,
        })
        .await
        .unwrap();
    let remove = |force| api::RemoveClusterRequest {
        cluster: "c1".into(),
        force,
    };
    // Nodes may not, even of that cluster.
    let s = reviews.remove_cluster(remove(true)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = adm.remove_cluster(remove(false)).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message()
            .contains("c1 still has 1 endpoints and 1 exports"),
        "{s:?}"
    );
    let r = adm.remove_cluster(remove(true)).await.unwrap().into_inner();
    assert_eq!((r.endpoints_removed, r.exports_removed), (1, 1));
    let mut admin_api = AdminClient::new(adm_ch);
    let clusters = admin_api
        .list_clusters(api::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .clusters;
    assert!(clusters.is_empty(), "{clusters:?}");
    let s = admin_api
        .list_endpoints(api::ListEndpointsRequest {
            service: Some(api::ServiceKey {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
        })
        .await
        .unwrap_err();
    assert!(s.message().contains("has no endpoints"), "{s:?}");
    let audit = admin_api
        .list_audit(api::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        audit.iter().any(|e| e.action == "cluster_remove"
            && e.subject == "c1"
            && e.actor.starts_with("operator:")),
        "{audit:?}"
    );
    b.shutdown(std::time::Duration::from_secs(1)).await.unwrap();
}
