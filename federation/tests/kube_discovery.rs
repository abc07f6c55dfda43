//! Kubernetes discovery (`--kube-discovery`) against a **test double** of the
//! API server's list and watch (`mesh_test::kube_watch`: Service,
//! EndpointSlice, Pod and Node JSON, watch streams with bookmarks, `410
//! Gone` after a compaction; no Kubernetes API server can run here). The
//! federation is real, on the embedded registry.
//!
//! It follows the API: the exported Service's endpoints with their zones,
//! identities and subsets; an EndpointSlice update; a Node relabelled to a
//! new zone; changes made while its watches were expired (a relist: nothing
//! lost, nothing doubled); and an export withdrawn.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::config::Config;
use federation::kube_discovery::{DiscoveryConfig, DEFAULT_EXPORT_LABEL};
use federation::registry::{self, Entry, KeyRef};
use mesh_core::endpoint::{Endpoint, Health};
use mesh_core::name::ClusterName;
use mesh_test::kube_watch::KubeWatchApi;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const CLUSTER: &str = "k8s-eu-1";
const V1: &str = "reviews-v1-6c9b7d8f5d-x2k4p";
const V2: &str = "reviews-v2-7f4d9b6c8e-q7m9z";

/// The cluster's endpoints in the registry, by id, and its exports.
async fn registry(fed: &federation::app::Bound) -> (BTreeMap<String, Endpoint>, Vec<String>) {
    let range = fed.store.range(registry::ROOT).await.unwrap();
    let mut eps = BTreeMap::new();
    let mut exports = Vec::new();
    for kv in range.kvs {
        match registry::decode(&kv.key, &kv.value) {
            (KeyRef::Endpoint(k), Entry::Endpoint(e)) if k.cluster.as_str() == CLUSTER => {
                assert!(
                    eps.insert(format!("{}/{}", e.service.name, e.id), e)
                        .is_none(),
                    "an endpoint twice"
                );
            }
            (KeyRef::Export(s, c), _) if c.as_str() == CLUSTER => exports.push(s.to_string()),
            _ => {}
        }
    }
    (eps, exports)
}

async fn eventually<F>(what: &str, fed: &federation::app::Bound, ok: F)
where
    F: Fn(&BTreeMap<String, Endpoint>, &[String]) -> bool,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (eps, exports) = registry(fed).await;
        if ok(&eps, &exports) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not seen within 20 s; endpoints {:#?}, exports {exports:?}",
            eps.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_the_api_through_changes_and_a_relist() {
    mesh_test::trace_init();
    let api = KubeWatchApi::start().await;
    let mut cfg = Config::embedded("127.0.0.1:0".parse().unwrap());
    cfg.discovery = Some(DiscoveryConfig {
        cluster: ClusterName::new(CLUSTER).unwrap(),
        kubeconfig: Some(api.kubeconfig()),
        export_label: DEFAULT_EXPORT_LABEL.into(),
        gateway_service: ("fedmesh-system".into(), "fedmesh-eastwest-gateway".into()),
    });
    // Start-up waits for the first lists, so the state is there at once.
    let fed = federation::app::build(&cfg).await.unwrap();
    let (eps, exports) = registry(&fed).await;
    assert_eq!(exports, ["shop/reviews"], "`internal` has no export label");
    assert_eq!(eps.len(), 2, "{:?}", eps.keys());
    let v1 = &eps[&format!("reviews/{V1}")];
    assert_eq!(v1.address.to_string(), "10.244.0.17");
    assert_eq!(v1.locality.to_string(), "eu-west-1/eu-west-1a");
    assert_eq!(v1.health, Health::Healthy);
    assert_eq!(
        v1.identity.as_ref().unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/bookinfo-reviews"
    );
    assert_eq!(v1.labels["version"], "v1");
    assert_eq!(
        (
            v1.ports[0].number.get(),
            v1.ports[0].target.map(|t| t.get())
        ),
        (9080, Some(8080))
    );
    assert_eq!(
        eps[&format!("reviews/{V2}")].locality.to_string(),
        "eu-west-1/eu-west-1b"
    );

    // An EndpointSlice update: v2 terminating, still serving.
    let mut slice = api
        .get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "shop",
            "reviews-8wq2d",
        )
        .unwrap();
    slice["endpoints"][1]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    api.apply(slice);
    let v2 = format!("reviews/{V2}");
    eventually("v2 draining", &fed, |eps, _| {
        eps.get(&v2).is_some_and(|e| e.health == Health::Draining)
    })
    .await;

    // A node relabelled to a new zone moves its endpoints.
    let mut node = api.get("v1", "Node", "", "node-a").unwrap();
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-west-1c");
    api.apply(node);
    let v1 = format!("reviews/{V1}");
    eventually("v1 in eu-west-1c", &fed, |eps, _| {
        eps.get(&v1)
            .is_some_and(|e| e.locality.to_string() == "eu-west-1/eu-west-1c")
    })
    .await;

    // The history is compacted (watches end with 410 Gone) and, before the
    // watchers relist, v2 goes away and a new exported service appears.
    let lists_before = api
        .received()
        .iter()
        .filter(|r| {
            r.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices") && !r.contains("watch=")
        })
        .count();
    api.expire();
    let mut slice = api
        .get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "shop",
            "reviews-8wq2d",
        )
        .unwrap();
    slice["endpoints"].as_array_mut().unwrap().truncate(1);
    api.apply(slice);
    api.delete("v1", "Pod", "shop", V2);
    let mut internal = api.get("v1", "Service", "shop", "internal").unwrap();
    internal["metadata"]["annotations"] = json!({"fedmesh.io/export": "true"});
    api.apply(internal);
    api.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "internal-5h7k2", "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "internal",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.40"], "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node-b", "zone": "eu-west-1b"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }));
    eventually("the state after the relist", &fed, |eps, exports| {
        eps.len() == 2
            && eps.contains_key(&v1)
            && eps.contains_key("internal/10-244-1-40")
            && exports.len() == 2
    })
    .await;
    let lists_after = api
        .received()
        .iter()
        .filter(|r| {
            r.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices") && !r.contains("watch=")
        })
        .count();
    assert!(
        lists_after > lists_before,
        "no relist after the 410: {:#?}",
        api.received()
    );
    assert!(
        api.received()
            .iter()
            .any(|r| r.contains("watch=") && r.contains("allowWatchBookmarks=true")),
        "the watchers asked for no bookmarks"
    );

    // The export label goes: the service and its endpoints are withdrawn.
    let mut reviews = api.get("v1", "Service", "shop", "reviews").unwrap();
    reviews["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("fedmesh.io/export");
    api.apply(reviews);
    eventually("reviews withdrawn", &fed, |eps, exports| {
        exports == ["shop/internal"] && eps.len() == 1
    })
    .await;

    fed.shutdown(Duration::from_secs(2)).await.unwrap();
}
