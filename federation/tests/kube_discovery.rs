//! Kubernetes discovery (`--kube-discovery`) against a **test double** of
//! the Kubernetes API server (`mesh_test::kube::KubeApi`: no API server can
//! run here; the double speaks its wire format: lists, watch streams with
//! bookmarks, `410 Expired`, cut connections, RBAC `403`s). It serves a
//! recorded k3s cluster (its API server's JSON, byte for byte:
//! `mesh-test/fixtures/kube/recorded/k3s/`) and the `bookinfo` fixtures,
//! written in `kubectl get -o json` shape (`mesh-test/fixtures/kube/`). The federation is real, on the embedded
//! registry, and talks to the double with the real `kube` client.
//!
//! It follows the API: the exported Service's endpoints with their zones,
//! identities, subsets and protocols; the cluster's gateway from the
//! east-west gateway's LoadBalancer Service; an EndpointSlice update; a
//! Pod with the agent sidecar left to its agent; a
//! Node relabelled to a new zone; a ServiceExport created and deleted;
//! changes made while its watches were expired (a relist: nothing lost,
//! nothing doubled) or cut (a re-watch); an export withdrawn. And it
//! refuses to start, naming the resource, when its RBAC grant is short.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::config::Config;
use federation::kube_discovery::{DiscoveryConfig, DEFAULT_EXPORT_LABEL};
use federation::registry::{self, Entry, KeyRef};
use mesh_core::endpoint::{Endpoint, Health, Protocol};
use mesh_core::name::ClusterName;
use mesh_test::kube::{fixture, KubeApi};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const CLUSTER: &str = "k8s-eu-1";
const V1: &str = "reviews-v1-5b8c9d7f4d-h2x9k";
const V3: &str = "reviews-v3-7d4f6b9c8f-q8m3z";
const V2: &str = "reviews-v2-8c6d5f7b9a-k3v8n";
const RATINGS: &str = "ratings-v1-6c5d7f8b9c-p4t7w";
const NS: Option<&str> = Some("bookinfo");

/// What the registry holds for the cluster: endpoints by `service/id`, the
/// exported services, and the cluster's gateway addresses.
struct Seen {
    eps: BTreeMap<String, Endpoint>,
    exports: Vec<String>,
    gateways: Vec<String>,
}

async fn registry(fed: &federation::app::Bound) -> Seen {
    let range = fed.store.range(registry::ROOT).await.unwrap();
    let mut seen = Seen {
        eps: BTreeMap::new(),
        exports: Vec::new(),
        gateways: Vec::new(),
    };
    for kv in range.kvs {
        match registry::decode(&kv.key, &kv.value) {
            (KeyRef::Endpoint(k), Entry::Endpoint(e)) if k.cluster.as_str() == CLUSTER => {
                assert!(
                    seen.eps
                        .insert(format!("{}/{}", e.service.name, e.id), e)
                        .is_none(),
                    "an endpoint twice"
                );
            }
            (KeyRef::Export(s, c), _) if c.as_str() == CLUSTER => seen.exports.push(s.to_string()),
            (KeyRef::Cluster(c), Entry::Cluster(info)) if c.as_str() == CLUSTER => {
                seen.gateways = info.gateways.iter().map(ToString::to_string).collect();
            }
            _ => {}
        }
    }
    seen
}

async fn eventually<F>(what: &str, fed: &federation::app::Bound, ok: F)
where
    F: Fn(&Seen) -> bool,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = registry(fed).await;
        if ok(&seen) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not seen within 20 s; endpoints {:#?}, exports {:?}",
            seen.eps.keys().collect::<Vec<_>>(),
            seen.exports
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn config(api: &KubeApi) -> Config {
    let mut cfg = Config::embedded("127.0.0.1:0".parse().unwrap());
    cfg.discovery = Some(DiscoveryConfig {
        cluster: ClusterName::new(CLUSTER).unwrap(),
        kubeconfig: Some(api.kubeconfig().to_path_buf()),
        export_label: DEFAULT_EXPORT_LABEL.into(),
        gateway_service: ("fedmesh-system".into(), "fedmesh-eastwest-gateway".into()),
    });
    cfg
}

/// LISTs (not watches) of a collection received so far.
fn lists(api: &KubeApi, path: &str) -> usize {
    api.received_for(path)
        .iter()
        .filter(|r| !r.is_watch())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_the_api_through_changes_a_relist_and_a_cut() {
    mesh_test::trace_init();
    let api = KubeApi::with_fixtures().await;
    // The east-west gateway's LoadBalancer Service, as the cloud's
    // controller leaves it.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "fedmesh-eastwest-gateway", "namespace": "fedmesh-system"},
        "spec": {"type": "LoadBalancer", "selector": {"app": "fedmesh-eastwest-gateway"},
            "ports": [{"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
                      {"name": "tls", "port": 15443, "targetPort": 15443, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.20", "ipMode": "VIP"}]}}
    }));
    // Start-up waits for the first lists, so the state is there at once.
    let fed = federation::app::build(&config(&api)).await.unwrap();
    let seen = registry(&fed).await;
    assert_eq!(
        seen.exports,
        ["bookinfo/reviews"],
        "`ratings` has no export label and no ServiceExport"
    );
    assert_eq!(seen.gateways, ["203.0.113.20:15443"]);
    let (v1, v3) = (format!("reviews/{V1}"), format!("reviews/{V3}"));
    assert_eq!(
        seen.eps.keys().collect::<Vec<_>>(),
        [&v1, &v3],
        "one endpoint per Pod"
    );
    let e = &seen.eps[&v1];
    assert_eq!(e.address.to_string(), "10.244.1.12");
    assert_eq!(e.locality.to_string(), "eu-west-1/eu-west-1a");
    assert_eq!(e.health, Health::Healthy);
    assert_eq!(
        e.identity.as_ref().unwrap().to_string(),
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    );
    assert_eq!(e.labels["version"], "v1");
    assert_eq!(e.labels["fedmesh.io/source"], "kubernetes");
    let ports: Vec<_> = e
        .ports
        .iter()
        .map(|p| (p.name.as_deref(), p.number.get(), p.protocol, p.target))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("http"), 9080, Protocol::Http, None),
            (Some("grpc"), 9090, Protocol::Grpc, None)
        ],
        "ports from the Service, protocols from appProtocol"
    );
    let e3 = &seen.eps[&v3];
    assert_eq!(e3.locality.to_string(), "eu-west-1/eu-west-1b");
    assert_eq!(e3.labels["version"], "v3");

    // An EndpointSlice update: v3 terminating, still serving; and a new
    // Pod, v2, carrying the agent as a sidecar: its agent registers it, so
    // discovery leaves it out.
    let mut v2 = fixture("pod-reviews-v1.json");
    v2["metadata"]["name"] = json!(V2);
    v2["metadata"]["labels"]["version"] = json!("v2");
    v2["status"]["podIP"] = json!("10.244.1.14");
    v2["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "fedmesh-agent", "image": "ghcr.io/fedmesh/fedmesh:0.1.0"}));
    api.apply(v2);
    let mut slice = api
        .get("discovery.k8s.io/v1", "EndpointSlice", NS, "reviews-x7k2p")
        .unwrap();
    slice["endpoints"][1]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    let mut e2 = slice["endpoints"][0].clone();
    e2["addresses"] = json!(["10.244.1.14"]);
    e2["targetRef"]["name"] = json!(V2);
    e2["targetRef"]["uid"] = json!("3f0c9a52-7b1e-4d2a-9c8e-2b5d7e1f4a60");
    slice["endpoints"].as_array_mut().unwrap().push(e2);
    api.apply(slice);
    eventually("v3 draining", &fed, |s| {
        s.eps.get(&v3).is_some_and(|e| e.health == Health::Draining)
    })
    .await;
    let meshed = format!("reviews/{V2}");
    eventually("the meshed v2 left to its agent", &fed, |s| {
        !s.eps.contains_key(&meshed) && s.eps.len() == 2
    })
    .await;

    // An operator bounds the cluster's endpoint addresses (`meshctl
    // cluster add --endpoint-network`); a new gateway address from
    // Kubernetes keeps that.
    let name = ClusterName::new(CLUSTER).unwrap();
    let reg = federation::registry::Registry::new(fed.store.clone());
    let mut info = reg.get_cluster(&name).await.unwrap().unwrap();
    info.endpoint_networks = vec!["10.244.0.0/16".parse().unwrap()];
    reg.put_cluster(&info).await.unwrap();
    let mut gw = api
        .get(
            "v1",
            "Service",
            Some("fedmesh-system"),
            "fedmesh-eastwest-gateway",
        )
        .unwrap();
    gw["status"]["loadBalancer"]["ingress"][0]["ip"] = json!("203.0.113.21");
    api.apply(gw);
    eventually("the new gateway address", &fed, |s| {
        s.gateways == ["203.0.113.21:15443"]
    })
    .await;
    let info = reg.get_cluster(&name).await.unwrap().unwrap();
    assert_eq!(
        info.endpoint_networks,
        vec!["10.244.0.0/16".parse().unwrap()],
        "the operator's networks survive discovery's update"
    );

    // A node relabelled to a new zone moves its endpoints.
    let mut node = api.get("v1", "Node", None, "node-a").unwrap();
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-west-1c");
    api.apply(node);
    eventually("v1 in eu-west-1c", &fed, |s| {
        s.eps
            .get(&v1)
            .is_some_and(|e| e.locality.to_string() == "eu-west-1/eu-west-1c")
    })
    .await;

    // A ServiceExport (the Multi-Cluster Services API) exports `ratings`.
    let mut export = fixture("serviceexport-reviews.json");
    export["metadata"] = json!({"name": "ratings", "namespace": "bookinfo"});
    api.apply(export);
    let ratings = format!("ratings/{RATINGS}");
    eventually("ratings exported by its ServiceExport", &fed, |s| {
        s.exports == ["bookinfo/ratings", "bookinfo/reviews"] && s.eps.contains_key(&ratings)
    })
    .await;

    // The history is compacted and every watch ends with 410 Expired; then,
    // while the watchers relist, v3 goes away, `ratings`' ServiceExport is
    // deleted and a new exported Service appears.
    let slice_lists = lists(&api, "/apis/discovery.k8s.io/v1/endpointslices");
    let export_lists = lists(&api, "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports");
    api.expire_watches();
    let mut slice = api
        .get("discovery.k8s.io/v1", "EndpointSlice", NS, "reviews-x7k2p")
        .unwrap();
    slice["endpoints"].as_array_mut().unwrap().truncate(1);
    api.apply(slice);
    api.delete("v1", "Pod", NS, V3).unwrap();
    api.delete(
        "multicluster.x-k8s.io/v1alpha1",
        "ServiceExport",
        NS,
        "ratings",
    )
    .unwrap();
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "details", "namespace": "bookinfo",
            "labels": {"app": "details"}, "annotations": {"fedmesh.io/export": "true"}},
        "spec": {"type": "ClusterIP", "selector": {"app": "details"},
            "ports": [{"name": "http", "port": 9080, "targetPort": 9080, "protocol": "TCP"}]}
    }));
    api.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "details-5h7k2", "namespace": "bookinfo",
            "labels": {"kubernetes.io/service-name": "details",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.2.40"], "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node-b", "zone": "eu-west-1b"}],
        "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]
    }));
    eventually("the state after the relist", &fed, |s| {
        s.eps.keys().collect::<Vec<_>>() == ["details/10-244-2-40", v1.as_str()]
            && s.exports == ["bookinfo/details", "bookinfo/reviews"]
    })
    .await;
    assert!(
        lists(&api, "/apis/discovery.k8s.io/v1/endpointslices") > slice_lists
            && lists(&api, "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports") > export_lists,
        "no relist after the 410: {:#?}",
        api.received()
    );
    assert!(
        api.received()
            .iter()
            .any(|r| r.is_watch() && r.param("allowWatchBookmarks").as_deref() == Some("true")),
        "the watchers asked for no bookmarks"
    );

    // Every watch is cut mid-stream; a change made meanwhile still arrives.
    api.drop_watches();
    let mut node = api.get("v1", "Node", None, "node-b").unwrap();
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-west-1c");
    api.apply(node);
    eventually("details in eu-west-1c after the cut", &fed, |s| {
        s.eps
            .get("details/10-244-2-40")
            .is_some_and(|e| e.locality.to_string() == "eu-west-1/eu-west-1c")
    })
    .await;

    // The export label goes from `reviews` (in the same update its `http`
    // port becomes 9081, still served by the pods' 9080, so the test knows
    // when the update is in): its ServiceExport still exports it. The
    // ServiceExport goes too: it is withdrawn.
    let mut reviews = api.get("v1", "Service", NS, "reviews").unwrap();
    reviews["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("fedmesh.io/export");
    reviews["spec"]["ports"][0]["port"] = json!(9081);
    api.apply(reviews);
    eventually("reviews' http port as 9081 to 9080", &fed, |s| {
        s.eps.get(&v1).is_some_and(|e| {
            (e.ports[0].number.get(), e.ports[0].target.map(|t| t.get())) == (9081, Some(9080))
        })
    })
    .await;
    assert_eq!(
        registry(&fed).await.exports,
        ["bookinfo/details", "bookinfo/reviews"],
        "the ServiceExport exports it without the label"
    );
    api.delete(
        "multicluster.x-k8s.io/v1alpha1",
        "ServiceExport",
        NS,
        "reviews",
    )
    .unwrap();
    eventually("reviews withdrawn", &fed, |s| {
        s.exports == ["bookinfo/details"] && s.eps.len() == 1
    })
    .await;

    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}

/// A recorded cluster: the Node, Services, Pods and EndpointSlices a k3s
/// cluster's API server returned (`mesh-test/fixtures/kube/recorded/k3s/`,
/// byte for byte; SOURCES.md there), served by the double as recorded. The
/// operator then does what it takes to export from such a cluster, as with
/// `kubectl label`: the export label on two Services, the topology labels
/// on the Node (k3s on a VM sets none), and the EndpointSlice controller
/// marks the not-ready Pod ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_reads_a_recorded_k3s_cluster() {
    const NODE: &str = "c9b7eea91";
    const BACKEND: &str = "backend-api-service/backend-api-75fb46b7bd-xtkrh";
    const MEM1: &str = "memory-test-service/memory-hungry-app-59c695fbfb-4vnq4";
    const MEM2: &str = "memory-test-service/memory-hungry-app-59c695fbfb-xsvn8";
    const DEFAULT: Option<&str> = Some("default");
    mesh_test::trace_init();
    let api = KubeApi::start().await;
    api.load_recorded_k3s();
    let mut cfg = config(&api);
    // The cluster's recorded LoadBalancer Service (k3s's traefik, its
    // ingress the node's address) stands in for the east-west gateway's.
    if let Some(d) = cfg.discovery.as_mut() {
        d.gateway_service = ("kube-system".into(), "traefik".into());
    }
    let fed = federation::app::build(&cfg).await.unwrap();
    let seen = registry(&fed).await;
    assert!(
        seen.exports.is_empty() && seen.eps.is_empty(),
        "nothing carries the export label: {:?} {:?}",
        seen.exports,
        seen.eps.keys()
    );

    // `kubectl label svc backend-api-service memory-test-service fedmesh.io/export=true`
    for svc in ["backend-api-service", "memory-test-service"] {
        let mut s = api.get("v1", "Service", DEFAULT, svc).unwrap();
        s["metadata"]["labels"] = json!({"fedmesh.io/export": "true"});
        api.apply(s);
    }
    eventually("both Services exported", &fed, |s| {
        s.exports == ["default/backend-api-service", "default/memory-test-service"]
    })
    .await;
    let seen = registry(&fed).await;
    assert!(
        seen.eps.is_empty() && seen.gateways.is_empty(),
        "no Node has topology labels: no locality, so no endpoint and no cluster record: {:?} {:?}",
        seen.eps.keys(),
        seen.gateways
    );

    // `kubectl label node c9b7eea91 topology.kubernetes.io/region=eu-central topology.kubernetes.io/zone=eu-central-1a`
    let mut node = api.get("v1", "Node", None, NODE).unwrap();
    node["metadata"]["labels"]["topology.kubernetes.io/region"] = json!("eu-central");
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-central-1a");
    api.apply(node);
    eventually("the exported Services' endpoints", &fed, |s| {
        s.eps.keys().collect::<Vec<_>>() == [BACKEND, MEM1, MEM2]
    })
    .await;
    let seen = registry(&fed).await;
    assert_eq!(
        seen.gateways,
        ["10.0.0.11:80"],
        "traefik's LoadBalancer ingress on its first port (it has no `tls` port)"
    );
    let m = &seen.eps[MEM1];
    assert_eq!(m.address.to_string(), "10.42.0.14");
    assert_eq!(seen.eps[MEM2].address.to_string(), "10.42.0.15");
    assert_eq!(m.locality.to_string(), "eu-central/eu-central-1a");
    assert_eq!(m.health, Health::Healthy);
    assert_eq!(
        m.identity.as_ref().unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(m.labels["app"], "memory-test", "the Pod's labels");
    let ports: Vec<_> = m
        .ports
        .iter()
        .map(|p| (p.number.get(), p.protocol, p.target.map(|t| t.get())))
        .collect();
    assert_eq!(
        ports,
        [(80, Protocol::Tcp, Some(8080))],
        "the Service's port 80 to the Pods' 8080, unnamed: TCP"
    );
    let b = &seen.eps[BACKEND];
    assert_eq!(b.address.to_string(), "10.42.0.16");
    assert_eq!(
        b.health,
        Health::Unhealthy,
        "recorded not ready and not serving"
    );

    // The Pod becomes ready: the EndpointSlice controller updates its slice.
    let mut slice = api
        .get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            DEFAULT,
            "backend-api-service-jfx42",
        )
        .unwrap();
    slice["endpoints"][0]["conditions"] =
        json!({"ready": true, "serving": true, "terminating": false});
    api.apply(slice);
    eventually("backend-api ready", &fed, |s| {
        s.eps
            .get(BACKEND)
            .is_some_and(|e| e.health == Health::Healthy)
    })
    .await;

    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}

/// Without the Multi-Cluster Services CRD, Services are exported by label
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_serviceexport_crd_the_label_exports() {
    mesh_test::trace_init();
    let api = KubeApi::with_fixtures().await;
    api.remove_resource("multicluster.x-k8s.io", "serviceexports");
    let fed = federation::app::build(&config(&api)).await.unwrap();
    let seen = registry(&fed).await;
    assert_eq!(seen.exports, ["bookinfo/reviews"]);
    assert_eq!(seen.eps.len(), 2);
    assert!(
        seen.gateways.is_empty(),
        "no east-west gateway Service: no gateway address"
    );
    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}

/// A federation whose ClusterRole may not list EndpointSlices refuses to
/// start at once, with the API server's reason; nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_rbac_grant_is_refused_at_start_naming_the_resource() {
    mesh_test::trace_init();
    let api = KubeApi::with_fixtures().await;
    api.set_federation_rules(Some(&[
        ("list", "", "services"),
        ("watch", "", "services"),
        ("list", "", "pods"),
        ("watch", "", "pods"),
        ("list", "", "nodes"),
        ("watch", "", "nodes"),
        ("list", "multicluster.x-k8s.io", "serviceexports"),
        ("watch", "multicluster.x-k8s.io", "serviceexports"),
    ]));
    let err = match federation::app::build(&config(&api)).await {
        Ok(_) => panic!("started without the right to list endpointslices"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("endpointslices.discovery.k8s.io is forbidden")
            && err.contains("cannot list resource \"endpointslices\""),
        "{err}"
    );
}
