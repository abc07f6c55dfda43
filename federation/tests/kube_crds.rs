//! Policy as Kubernetes custom resources (`--watch-crds`) against a **test
//! double** of the Kubernetes API server (`mesh_test::kube::KubeApi`: no API
//! server can run here; the double speaks its wire format: lists, watch
//! streams, `410 Expired`, status PATCH, Events, RBAC `403`s, a CRD not
//! installed as `404`). The federation is real and talks to it with the
//! real `kube` client; the registry is the embedded one, or a real etcd
//! behind a relay the test cuts.
//!
//! What an operator sees: the `bookinfo` VirtualService, DestinationRule and
//! TrafficWeights in the registry as `meshctl apply` would put them, each
//! with `Accepted=True` in its status; an edit re-applied; an invalid
//! resource refused with a Warning Event and `Accepted=False` naming the
//! field, the version before it staying in effect; deletions, also one made
//! while the watch was broken; a CRD not installed skipped; a short RBAC
//! grant refused at start; a resource applied while the registry is out of
//! reach retried until it is back.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::app::Bound;
use federation::config::Config;
use federation::kube_discovery::{DiscoveryConfig, DEFAULT_EXPORT_LABEL};
use federation::store::etcd::EtcdStore;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_core::name::ClusterName;
use mesh_test::etcd::EtcdFixture;
use mesh_test::kube::KubeApi;
use mesh_test::relay::TcpRelay;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

mod common;

const CLUSTER: &str = "k8s-eu-1";
const NS: Option<&str> = Some("bookinfo");
const VS: &str = "networking.istio.io/v1";

fn config(api: &KubeApi) -> Config {
    let mut cfg = Config::embedded("127.0.0.1:0".parse().unwrap());
    cfg.discovery = Some(DiscoveryConfig {
        cluster: ClusterName::new(CLUSTER).unwrap(),
        kubeconfig: Some(api.kubeconfig().to_path_buf()),
        export_label: DEFAULT_EXPORT_LABEL.into(),
        gateway_service: ("fedmesh-system".into(), "fedmesh-eastwest-gateway".into()),
    });
    cfg.watch_crds = true;
    cfg
}

async fn admin(fed: &Bound) -> AdminClient<Channel> {
    AdminClient::new(common::admin(fed).await)
}

/// The registry's policies, as `meshctl get policies` lists them:
/// `Kind/namespace/name` and the document.
async fn policies(admin: &mut AdminClient<Channel>) -> Vec<(String, Value)> {
    admin
        .list_policies(api::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .documents
        .into_iter()
        .map(|d| {
            let r = d.r#ref.unwrap();
            (
                format!("{}/{}/{}", r.kind, r.namespace, r.name),
                serde_json::from_str(&d.json).unwrap(),
            )
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

fn names(p: &[(String, Value)]) -> Vec<&str> {
    p.iter().map(|(n, _)| n.as_str()).collect()
}

/// Polls `cond` every 100 ms for at most 20 s.
async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `Accepted` condition of a resource, once it has one.
fn accepted(api: &KubeApi, api_version: &str, kind: &str, name: &str) -> Option<Value> {
    let obj = api.get(api_version, kind, NS, name)?;
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

/// Waits for the `Accepted` condition to have `status` for the resource's
/// current generation; returns it.
async fn wait_accepted(
    api: &KubeApi,
    api_version: &str,
    kind: &str,
    name: &str,
    status: &str,
) -> Value {
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let generation = api
            .get(api_version, kind, NS, name)
            .map(|o| o["metadata"]["generation"].clone());
        if let Some(c) = accepted(api, api_version, kind, name) {
            if c["status"] == status && Some(&c["observedGeneration"]) == generation.as_ref() {
                return c;
            }
            last = Some(c);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{kind} {name}: Accepted={status} not written within 20 s; last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Warning Events about one resource.
fn warnings(api: &KubeApi, kind: &str, name: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| e["involvedObject"]["kind"] == kind && e["involvedObject"]["name"] == name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_resources_are_applied_refused_and_deleted_with_their_outcome_in_kubernetes() {
    mesh_test::trace_init();
    let api = KubeApi::with_fixtures().await;
    let fed = federation::app::build(&config(&api)).await.unwrap();
    let mut admin = admin(&fed).await;

    // The fixtures' three policies land, each with Accepted=True.
    until("the bookinfo policies in the registry", || {
        let mut admin = admin.clone();
        async move { policies(&mut admin).await.len() == 3 }
    })
    .await;
    let p = policies(&mut admin).await;
    assert_eq!(
        names(&p),
        [
            "DestinationRule/bookinfo/reviews",
            "TrafficWeights/bookinfo/reviews",
            "VirtualService/bookinfo/reviews"
        ]
    );
    let vs = &p[2].1;
    assert_eq!(
        vs["spec"]["http"][0]["route"][1]["destination"]["subset"],
        "v3"
    );
    assert!(
        vs["metadata"].get("annotations").is_none() && vs.get("status").is_none(),
        "the server's metadata and the status are not policy: {vs}"
    );
    for (av, kind) in [
        (VS, "VirtualService"),
        (VS, "DestinationRule"),
        ("fedmesh.io/v1", "TrafficWeights"),
    ] {
        let c = wait_accepted(&api, av, kind, "reviews", "True").await;
        assert_eq!(c["reason"], "Applied");
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .contains("in the fedmesh registry at revision"),
            "{c}"
        );
    }
    assert!(api.events().is_empty(), "no Event for accepted resources");
    // The status writes are not applied again: one apply per resource.
    let audit = admin
        .list_audit(api::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let applies: Vec<_> = audit
        .iter()
        .filter(|e| e.detail.contains("from Kubernetes"))
        .collect();
    assert_eq!(applies.len(), 3, "{applies:#?}");
    assert!(
        applies.iter().any(|e| e
            .detail
            .contains("Kubernetes VirtualService bookinfo/reviews in k8s-eu-1")),
        "{applies:#?}"
    );

    // An edit: the VirtualService shifts to 80/20; re-applied (a new
    // generation).
    let mut obj = api.get(VS, "VirtualService", NS, "reviews").unwrap();
    obj["spec"]["http"][0]["route"][0]["weight"] = json!(80);
    obj["spec"]["http"][0]["route"][1]["weight"] = json!(20);
    let generation = api.apply(obj)["metadata"]["generation"].clone();
    let c = wait_accepted(&api, VS, "VirtualService", "reviews", "True").await;
    assert_eq!(c["observedGeneration"], generation);
    let weight = |p: &[(String, Value)]| p[2].1["spec"]["http"][0]["route"][0]["weight"].clone();
    assert_eq!(weight(&policies(&mut admin).await), 80);

    // A new, invalid resource: refused with a Warning Event and
    // Accepted=False naming the field; nothing written.
    api.apply(json!({
        "apiVersion": VS, "kind": "VirtualService",
        "metadata": {"name": "ratings", "namespace": "bookinfo"},
        "spec": {"hosts": ["ratings"], "http": [{"route": [
            {"destination": {"host": "ratings"}, "weight": -5}]}]}
    }));
    let c = wait_accepted(&api, VS, "VirtualService", "ratings", "False").await;
    assert_eq!(c["reason"], "Invalid");
    let message = c["message"].as_str().unwrap();
    assert!(
        message.contains("weight") && message.contains("must be >= 0, got -5"),
        "{message}"
    );
    let ev = warnings(&api, "VirtualService", "ratings");
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(ev[0]["type"], "Warning");
    assert_eq!(ev[0]["reason"], "Invalid");
    assert_eq!(ev[0]["involvedObject"]["apiVersion"], VS);
    assert_eq!(ev[0]["involvedObject"]["namespace"], "bookinfo");
    assert_eq!(ev[0]["reportingComponent"], "fedmesh-federation");
    assert!(ev[0]["message"]
        .as_str()
        .unwrap()
        .contains("must be >= 0, got -5"));
    assert_eq!(
        policies(&mut admin).await.len(),
        3,
        "the invalid one is not written"
    );

    // An invalid edit of an applied resource: refused, and the version
    // before it stays in effect.
    let mut obj = api.get(VS, "VirtualService", NS, "reviews").unwrap();
    obj["spec"]["http"][0]["route"][0]["weight"] = json!(-1);
    let generation = api.apply(obj)["metadata"]["generation"].clone();
    let c = wait_accepted(&api, VS, "VirtualService", "reviews", "False").await;
    assert_eq!(c["observedGeneration"], generation);
    assert_eq!(warnings(&api, "VirtualService", "reviews").len(), 1);
    assert_eq!(
        weight(&policies(&mut admin).await),
        80,
        "the last accepted version"
    );

    // Fixed: accepted again, no new Event.
    let mut obj = api.get(VS, "VirtualService", NS, "reviews").unwrap();
    obj["spec"]["http"][0]["route"][0]["weight"] = json!(70);
    obj["spec"]["http"][0]["route"][1]["weight"] = json!(30);
    api.apply(obj);
    wait_accepted(&api, VS, "VirtualService", "reviews", "True").await;
    assert_eq!(weight(&policies(&mut admin).await), 70);
    assert_eq!(warnings(&api, "VirtualService", "reviews").len(), 1);

    // Deleted: gone from the registry.
    api.delete(VS, "DestinationRule", NS, "reviews").unwrap();
    until("the DestinationRule deleted", || {
        let mut admin = admin.clone();
        async move {
            names(&policies(&mut admin).await)
                == [
                    "TrafficWeights/bookinfo/reviews",
                    "VirtualService/bookinfo/reviews",
                ]
        }
    })
    .await;

    // Deleted while the watch is broken: the watches expire (410) and the
    // relists are refused (RBAC) until the TrafficWeights is deleted; the
    // relist then finds it gone and it is deleted from the registry.
    let tw_path = "/apis/fedmesh.io/v1/trafficweights";
    api.set_federation_rules(Some(&[
        ("*", "", "*"),
        ("*", "discovery.k8s.io", "*"),
        ("*", "multicluster.x-k8s.io", "*"),
        ("*", "networking.istio.io", "*"),
        ("*", "security.istio.io", "*"),
        ("patch", "fedmesh.io", "trafficweights/status"),
    ]));
    api.expire_watches();
    until("a refused relist of trafficweights", || {
        let refused = api
            .received_for(tw_path)
            .iter()
            .any(|r| r.is_list_of(tw_path) && r.answered == 403);
        async move { refused }
    })
    .await;
    api.delete("fedmesh.io/v1", "TrafficWeights", NS, "reviews")
        .unwrap();
    api.set_federation_rules(None);
    until("the TrafficWeights deleted after the relist", || {
        let mut admin = admin.clone();
        async move { names(&policies(&mut admin).await) == ["VirtualService/bookinfo/reviews"] }
    })
    .await;

    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}

/// Without Istio's CRDs only TrafficWeights are watched; a grant that may
/// not list one of the kinds is refused at start with the API's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_crds_are_skipped_and_a_short_grant_is_refused() {
    mesh_test::trace_init();
    let api = KubeApi::with_fixtures().await;
    for (group, plural) in [
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("networking.istio.io", "sidecars"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("security.istio.io", "requestauthentications"),
    ] {
        api.remove_resource(group, plural);
    }
    let fed = federation::app::build(&config(&api)).await.unwrap();
    let mut admin = admin(&fed).await;
    wait_accepted(&api, "fedmesh.io/v1", "TrafficWeights", "reviews", "True").await;
    assert_eq!(
        names(&policies(&mut admin).await),
        ["TrafficWeights/bookinfo/reviews"]
    );
    fed.shutdown(Duration::from_secs(2)).await.unwrap();

    // The ClusterRole lacks fedmesh.io: the start fails, naming it.
    api.set_federation_rules(Some(&[
        ("*", "", "*"),
        ("*", "discovery.k8s.io", "*"),
        ("*", "multicluster.x-k8s.io", "*"),
        ("*", "networking.istio.io", "*"),
        ("*", "security.istio.io", "*"),
    ]));
    let err = match federation::app::build(&config(&api)).await {
        Ok(_) => panic!("started without the right to list trafficweights"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("--watch-crds")
            && err.contains("trafficweights.fedmesh.io is forbidden")
            && err.contains("cannot list resource \"trafficweights\" in API group \"fedmesh.io\""),
        "{err}"
    );
}

/// A resource changed while the registry (etcd) is out of reach is
/// reported `Accepted=False` (`NotApplied`) with one Event, and applied
/// once the registry is back, without anything else changing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_is_retried_until_the_registry_is_back() {
    mesh_test::trace_init();
    let fx = EtcdFixture::start();
    let relay = TcpRelay::start(fx.client_addr()).await.unwrap();
    let store = EtcdStore::connect(&[format!("http://{}", relay.addr())])
        .await
        .unwrap();
    let api = KubeApi::with_fixtures().await;
    let fed = federation::app::serve(&config(&api), Arc::new(store))
        .await
        .unwrap();
    let mut admin = admin(&fed).await;
    wait_accepted(&api, VS, "VirtualService", "reviews", "True").await;

    relay.cut();
    until("the registry out of reach", || {
        let mut admin = admin.clone();
        async move {
            !admin
                .get_status(api::GetStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .registry_reachable
        }
    })
    .await;
    let mut obj = api.get(VS, "VirtualService", NS, "reviews").unwrap();
    obj["spec"]["http"][0]["route"][0]["weight"] = json!(90);
    obj["spec"]["http"][0]["route"][1]["weight"] = json!(10);
    let generation = api.apply(obj)["metadata"]["generation"].clone();
    let c = wait_accepted(&api, VS, "VirtualService", "reviews", "False").await;
    assert_eq!(c["reason"], "NotApplied");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("registry unreachable"),
        "{c}"
    );

    relay.restore();
    let c = wait_accepted(&api, VS, "VirtualService", "reviews", "True").await;
    assert_eq!(c["observedGeneration"], generation);
    let p = policies(&mut admin).await;
    let vs = p
        .iter()
        .find(|(n, _)| n == "VirtualService/bookinfo/reviews")
        .unwrap();
    assert_eq!(vs.1["spec"]["http"][0]["route"][0]["weight"], 90);
    let ev = warnings(&api, "VirtualService", "reviews");
    assert_eq!(
        ev.len(),
        1,
        "one Event for the outage, not one per retry: {ev:#?}"
    );
    assert_eq!(ev[0]["reason"], "NotApplied");
    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}

/// The ClusterRole `deploy/` ships for the federation
/// (`deploy/kustomize/base/federation-rbac.yaml`, the chart renders the
/// same), as `(verb, API group, resource)` rules.
fn shipped_rules() -> Vec<(String, String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kustomize/base/federation-rbac.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] != "ClusterRole" {
            continue;
        }
        for rule in v["rules"].as_array().unwrap() {
            let strs = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect()
            };
            for g in strs("apiGroups") {
                for r in strs("resources") {
                    for verb in strs("verbs") {
                        out.push((verb, g.clone(), r.clone()));
                    }
                }
            }
        }
    }
    assert!(!out.is_empty(), "no ClusterRole in {path}");
    out
}

/// The `(verb, API group, resource)` a request to the API needs, as the
/// RBAC authorizer sees it.
fn needs(r: &mesh_test::kube::Received) -> (String, String, String) {
    let segs: Vec<&str> = r.path_only().trim_start_matches('/').split('/').collect();
    let (group, mut rest) = match segs.as_slice() {
        ["api", _v, rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => ("?", &segs[..0]),
    };
    if rest.len() >= 3 && rest[0] == "namespaces" {
        rest = &rest[2..];
    }
    let resource = match rest {
        [res, _name, sub, ..] => format!("{res}/{sub}"),
        [res, ..] => (*res).to_string(),
        [] => String::new(),
    };
    let verb = match r.method.as_str() {
        "GET" if r.is_watch() => "watch",
        "GET" if rest.len() == 1 => "list",
        "GET" => "get",
        "POST" => "create",
        "PATCH" => "patch",
        "PUT" => "update",
        "DELETE" => "delete",
        m => m,
    };
    (verb.to_string(), group.to_string(), resource)
}

/// Under exactly the ClusterRole `deploy/` ships, discovery and every
/// policy kind work (applied, status written, a refusal's Event created)
/// with nothing refused, and every grant in it is used: it is what the
/// federation needs and no more (TokenReviews, the last grant, are
/// exercised by `kube_auth.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_cluster_role_is_enough_and_every_grant_is_used() {
    mesh_test::trace_init();
    let rules = shipped_rules();
    let api = KubeApi::with_fixtures().await;
    let refs: Vec<(&str, &str, &str)> = rules
        .iter()
        .map(|(v, g, r)| (v.as_str(), g.as_str(), r.as_str()))
        .collect();
    api.set_federation_rules(Some(&refs));
    // One resource of each kind the fixtures lack.
    let sec = "security.istio.io/v1";
    for (av, kind, spec) in [
        (
            VS,
            "Sidecar",
            json!({"egress": [{"hosts": ["./*", "istio-system/*"]}]}),
        ),
        (
            sec,
            "AuthorizationPolicy",
            json!({"selector": {"matchLabels": {"app": "reviews"}}, "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]}}]}]}),
        ),
        (
            sec,
            "PeerAuthentication",
            json!({"mtls": {"mode": "STRICT"}}),
        ),
        (
            sec,
            "RequestAuthentication",
            json!({"selector": {"matchLabels": {"app": "reviews"}},
                "jwtRules": [{"issuer": "https://accounts.example.com",
                    "jwksUri": "https://accounts.example.com/.well-known/jwks.json"}]}),
        ),
    ] {
        api.apply(json!({"apiVersion": av, "kind": kind,
            "metadata": {"name": "reviews", "namespace": "bookinfo"}, "spec": spec}));
    }
    let fed = federation::app::build(&config(&api)).await.unwrap();
    let mut admin = admin(&fed).await;
    for (av, kind) in [
        (VS, "VirtualService"),
        (VS, "DestinationRule"),
        (VS, "Sidecar"),
        (sec, "AuthorizationPolicy"),
        (sec, "PeerAuthentication"),
        (sec, "RequestAuthentication"),
        ("fedmesh.io/v1", "TrafficWeights"),
    ] {
        wait_accepted(&api, av, kind, "reviews", "True").await;
    }
    assert_eq!(policies(&mut admin).await.len(), 7);
    api.apply(json!({
        "apiVersion": VS, "kind": "VirtualService",
        "metadata": {"name": "ratings", "namespace": "bookinfo"},
        "spec": {"hosts": ["ratings"], "http": [{"route": [
            {"destination": {"host": "ratings"}, "weight": -5}]}]}
    }));
    wait_accepted(&api, VS, "VirtualService", "ratings", "False").await;
    assert_eq!(warnings(&api, "VirtualService", "ratings").len(), 1);

    let received = api.received();
    let refused: Vec<_> = received
        .iter()
        .filter(|r| r.answered == 401 || r.answered == 403)
        .map(|r| format!("{} {} -> {}", r.method, r.path, r.answered))
        .collect();
    assert!(
        refused.is_empty(),
        "refused under the shipped role: {refused:#?}"
    );
    let used: std::collections::BTreeSet<_> = received.iter().map(needs).collect();
    let unused: Vec<_> = rules
        .iter()
        .filter(|(_, _, r)| r != "tokenreviews")
        .filter(|rule| !used.contains(*rule))
        .collect();
    assert!(
        unused.is_empty(),
        "granted but never used: {unused:?}; used: {used:?}"
    );
    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}
