//! The Kubernetes API double (`mesh_test::kube::KubeApi`) driven by the
//! real `kube` client: paginated lists, watchers and reflectors over its
//! watch streams (bookmarks, `410 Expired` and the relist it forces, a cut
//! connection and the re-watch it causes), creating Events, patching a
//! custom resource's status, RBAC denials, and the recorded objects served
//! as recorded. Everything on loopback,
//! every test bounded in time.

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Event, Node, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{reflector, watcher, WatchStreamExt as _};
use kube::{Api, ResourceExt};
use mesh_test::kube::{fixture, KubeApi, FEDERATION_USER};
use serde_json::json;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// Runs a test body with a deadline.
async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the test did not finish in 60 s");
}

/// A kube client from the double's kubeconfig, as the federation makes it.
async fn client(api: &KubeApi) -> kube::Client {
    let kc = Kubeconfig::read_from(api.kubeconfig()).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("client config");
    kube::Client::try_from(cfg).expect("client")
}

/// Waits for `cond` (polled every 20 ms) for at most 20 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A watcher running in its own task (as the federation runs them, with
/// the default backoff), its events in a channel; errors are retried.
struct Running<K> {
    rx: tokio::sync::mpsc::UnboundedReceiver<watcher::Event<K>>,
    task: tokio::task::JoinHandle<()>,
}

fn run<K>(api: Api<K>, cfg: watcher::Config) -> Running<K>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let s = watcher(api, cfg).default_backoff();
        futures::pin_mut!(s);
        while let Some(e) = s.next().await {
            if let Ok(e) = e {
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    Running { rx, task }
}

impl<K> Drop for Running<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The next event of a running watcher, within 10 s.
async fn next<K>(w: &mut Running<K>) -> watcher::Event<K> {
    tokio::time::timeout(Duration::from_secs(10), w.rx.recv())
        .await
        .expect("no watch event within 10 s")
        .expect("the watcher ended")
}

fn lists(api: &KubeApi, path: &str) -> usize {
    api.received().iter().filter(|r| r.is_list_of(path)).count()
}

#[tokio::test]
async fn lists_all_namespaces_in_pages() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        api.set_page_size(Some(1));
        let pods: Api<Pod> = Api::all(client(&api).await);

        // By hand: one item per page, continue tokens to the end.
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        let mut rvs = Vec::new();
        loop {
            let mut lp = ListParams::default().limit(500);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = pods.list(&lp).await.expect("a page of pods");
            assert_eq!(page.items.len(), 1, "page size 1");
            names.extend(page.items.iter().map(ResourceExt::name_any));
            rvs.push(page.metadata.resource_version.clone());
            token = page.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                assert_eq!(page.metadata.remaining_item_count, None);
                break;
            }
            assert!(page.metadata.remaining_item_count.is_some());
        }
        names.sort();
        assert_eq!(
            names,
            [
                "ratings-v1-6c5d7f8b9c-p4t7w",
                "reviews-v1-5b8c9d7f4d-h2x9k",
                "reviews-v3-7d4f6b9c8f-q8m3z"
            ]
        );
        assert!(
            rvs.windows(2).all(|w| w[0] == w[1]),
            "one snapshot: {rvs:?}"
        );
        assert_eq!(lists(&api, "/api/v1/pods"), 3);

        // A watcher follows the pages itself.
        let seen: Vec<Pod> = watcher(pods.clone(), watcher::Config::default())
            .default_backoff()
            .take_while(|e| futures::future::ready(!matches!(e, Ok(watcher::Event::InitDone))))
            .try_filter_map(|e| async move {
                Ok(match e {
                    watcher::Event::InitApply(p) => Some(p),
                    _ => None,
                })
            })
            .try_collect()
            .await
            .expect("the watcher's initial list");
        assert_eq!(seen.len(), 3);
        assert_eq!(lists(&api, "/api/v1/pods"), 6);

        // Selectors.
        let v1 = pods
            .list(&ListParams::default().labels("version=v1"))
            .await
            .unwrap();
        api.set_page_size(None);
        let v1_all = pods
            .list(&ListParams::default().labels("version=v1,app"))
            .await
            .unwrap();
        assert_eq!(v1.items.len(), 1, "page size 1 still applies");
        assert_eq!(v1_all.items.len(), 2);
        let one = pods
            .list(&ListParams::default().fields("metadata.name=reviews-v3-7d4f6b9c8f-q8m3z"))
            .await
            .unwrap();
        assert_eq!(one.items.len(), 1);
        let in_ns: Api<Pod> = Api::namespaced(client(&api).await, "default");
        assert!(in_ns
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty());
    })
    .await;
}

#[tokio::test]
async fn watcher_sees_fixtures_then_an_endpoint_going_unready_and_a_node_moving_zone() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        let c = client(&api).await;
        let mut slices = run(
            Api::<EndpointSlice>::all(c.clone()),
            watcher::Config::default(),
        );
        let mut nodes = run(Api::<Node>::all(c), watcher::Config::default());

        assert!(matches!(next(&mut slices).await, watcher::Event::Init));
        let mut initial = Vec::new();
        loop {
            match next(&mut slices).await {
                watcher::Event::InitApply(s) => initial.push(s.name_any()),
                watcher::Event::InitDone => break,
                e => panic!("unexpected {e:?}"),
            }
        }
        initial.sort();
        assert_eq!(initial, ["ratings-5tq9w", "reviews-x7k2p"]);
        assert!(matches!(next(&mut nodes).await, watcher::Event::Init));
        let mut zones = BTreeMap::new();
        loop {
            match next(&mut nodes).await {
                watcher::Event::InitApply(n) => {
                    zones.insert(
                        n.name_any(),
                        n.labels()["topology.kubernetes.io/zone"].clone(),
                    );
                }
                watcher::Event::InitDone => break,
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(zones["node-a"], "eu-west-1a");
        assert_eq!(zones["node-b"], "eu-west-1b");
        until("both watches open", || api.open_watches() == 2).await;

        // reviews-v3 goes unready (terminating), as the endpoint controller writes it.
        let mut s = fixture("endpointslice-reviews.json");
        s["endpoints"][1]["conditions"] =
            json!({"ready": false, "serving": false, "terminating": true});
        let stored = api.apply(s);
        match next(&mut slices).await {
            watcher::Event::Apply(s) => {
                assert_eq!(s.name_any(), "reviews-x7k2p");
                assert_eq!(
                    s.resource_version().as_deref(),
                    stored["metadata"]["resourceVersion"].as_str()
                );
                let c = &s.endpoints[1].conditions.as_ref().unwrap();
                assert_eq!(
                    (c.ready, c.serving, c.terminating),
                    (Some(false), Some(false), Some(true))
                );
                assert_eq!(s.metadata.generation, Some(4), "the fixture's 3, bumped");
            }
            e => panic!("unexpected {e:?}"),
        }

        // node-b relabelled to another zone.
        let mut n = api.get("v1", "Node", None, "node-b").unwrap();
        n["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-west-1c");
        api.apply(n);
        match next(&mut nodes).await {
            watcher::Event::Apply(n) => {
                assert_eq!(n.name_any(), "node-b");
                assert_eq!(n.labels()["topology.kubernetes.io/zone"], "eu-west-1c");
            }
            e => panic!("unexpected {e:?}"),
        }

        // A deleted slice arrives with its last state.
        api.delete(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some("bookinfo"),
            "ratings-5tq9w",
        )
        .expect("deleted");
        match next(&mut slices).await {
            watcher::Event::Delete(s) => assert_eq!(s.name_any(), "ratings-5tq9w"),
            e => panic!("unexpected {e:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn an_expired_watch_relists_and_the_reflector_ends_identical() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        let pods: Api<Pod> = Api::all(client(&api).await);
        let (store, writer) = reflector::store::<Pod>();
        let run = tokio::spawn(async move {
            let s = reflector::reflector(writer, watcher(pods, watcher::Config::default()))
                .default_backoff();
            futures::pin_mut!(s);
            while s.next().await.is_some() {}
        });
        store.wait_until_ready().await.unwrap();
        assert_eq!(store.len(), 3);
        until("the watch open", || api.open_watches() == 1).await;
        assert_eq!(lists(&api, "/api/v1/pods"), 1);

        // An outage: the watch is cut and cannot come back (RBAC) while
        // pods change and the history is compacted.
        api.set_federation_rules(Some(&[("list", "", "pods")]));
        api.drop_watches();
        until("a refused re-watch", || {
            api.received()
                .iter()
                .any(|r| r.is_watch_of("/api/v1/pods") && r.answered == 403)
        })
        .await;
        api.delete("v1", "Pod", Some("bookinfo"), "ratings-v1-6c5d7f8b9c-p4t7w")
            .expect("deleted");
        let mut added = fixture("pod-reviews-v1.json");
        added["metadata"]["name"] = json!("reviews-v2-6f8d9c7b5a-z9w2x");
        added["metadata"]["uid"] = json!(null);
        added["metadata"]["labels"]["version"] = json!("v2");
        api.apply(added);
        let mut changed = fixture("pod-reviews-v3.json");
        changed["status"]["phase"] = json!("Failed");
        api.apply(changed);
        api.expire_history();
        api.set_federation_rules(None);

        // The re-watch from the old resourceVersion gets 410, the watcher
        // lists again, and the store is the double's state.
        until("a relist", || lists(&api, "/api/v1/pods") == 2).await;
        let want: BTreeMap<String, String> = api
            .list("v1", "Pod")
            .iter()
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap().to_string(),
                    p["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
            .collect();
        until("the store to catch up", || {
            let got: BTreeMap<String, String> = store
                .state()
                .iter()
                .map(|p| (p.name_any(), p.resource_version().unwrap_or_default()))
                .collect();
            got == want && store.len() == want.len()
        })
        .await;
        assert_eq!(store.len(), 3, "no duplicates: {want:?}");
        assert!(!want.contains_key("ratings-v1-6c5d7f8b9c-p4t7w"));
        assert!(want.contains_key("reviews-v2-6f8d9c7b5a-z9w2x"));
        let failed = store
            .state()
            .into_iter()
            .find(|p| p.name_any() == "reviews-v3-7d4f6b9c8f-q8m3z")
            .unwrap();
        assert_eq!(
            failed.status.as_ref().unwrap().phase.as_deref(),
            Some("Failed")
        );

        // The request log tells the story: LIST, WATCH, refused WATCHes,
        // the WATCH answered with the ERROR, LIST again, WATCH.
        let log = api.received_for("/api/v1/pods");
        for r in &log {
            eprintln!("{} {} -> {}", r.method, r.path, r.answered);
        }
        let refused = log
            .iter()
            .rposition(|r| r.is_watch() && r.answered == 403)
            .unwrap();
        let expired = refused
            + 1
            + log[refused + 1..]
                .iter()
                .position(|r| r.is_watch() && r.answered == 200)
                .expect("the re-watch after the outage");
        assert!(log[1].is_watch());
        assert_eq!(
            log[expired].param("resourceVersion"),
            log[1].param("resourceVersion"),
            "from the resourceVersion of the first list"
        );
        let relist = log
            .iter()
            .rposition(|r| r.is_list_of("/api/v1/pods"))
            .unwrap();
        assert!(relist > expired, "the LIST follows the expired watch");
        run.abort();
    })
    .await;
}

#[tokio::test]
async fn a_cut_watch_resumes_from_its_resource_version_without_a_relist() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        let mut svcs = run(
            Api::<Service>::all(client(&api).await),
            watcher::Config::default(),
        );
        loop {
            if let watcher::Event::InitDone = next(&mut svcs).await {
                break;
            }
        }
        until("the watch open", || api.open_watches() == 1).await;
        let rv = api.resource_version();
        api.drop_watches();
        let mut s = fixture("service-ratings.json");
        s["metadata"]["labels"]["fedmesh.io/export"] = json!("true");
        api.apply(s);
        match next(&mut svcs).await {
            watcher::Event::Apply(s) => {
                assert_eq!(s.name_any(), "ratings");
                assert_eq!(s.labels()["fedmesh.io/export"], "true");
            }
            e => panic!("unexpected {e:?}"),
        }
        let log = api.received_for("/api/v1/services");
        assert_eq!(
            log.iter()
                .filter(|r| r.is_list_of("/api/v1/services"))
                .count(),
            1,
            "no relist"
        );
        let watches: Vec<_> = log.iter().filter(|r| r.is_watch()).collect();
        assert!(watches.len() >= 2, "{log:?}");
        assert_eq!(watches[1].param("resourceVersion"), Some(rv.to_string()));
    })
    .await;
}

#[tokio::test]
async fn bookmarks_arrive_periodically_and_on_demand() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        api.set_bookmark_interval(Duration::from_millis(200));
        let svcs: Api<Service> = Api::all(client(&api).await);
        let list = svcs.list(&ListParams::default()).await.unwrap();
        let rv = list.metadata.resource_version.unwrap();
        let mut stream = svcs
            .watch(&WatchParams::default(), &rv)
            .await
            .unwrap()
            .boxed();
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev {
            WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
            e => panic!("unexpected {e:?}"),
        }
        // A change, then a bookmark at its resourceVersion.
        api.set_bookmark_interval(Duration::from_secs(3600));
        let mut s = fixture("service-reviews.json");
        s["metadata"]["labels"]["tier"] = json!("backend");
        let stored = api.apply(s);
        let new_rv = stored["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        loop {
            match stream.try_next().await.unwrap().unwrap() {
                WatchEvent::Modified(s) => {
                    assert_eq!(s.resource_version().as_deref(), Some(new_rv.as_str()));
                    break;
                }
                WatchEvent::Bookmark(_) => {}
                e => panic!("unexpected {e:?}"),
            }
        }
        api.send_bookmarks();
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, new_rv),
            e => panic!("unexpected {e:?}"),
        }

        // A streaming list: ADDED for each, then the initial-events-end bookmark.
        let mut initial = svcs
            .watch(&WatchParams::default().initial_events(), "0")
            .await
            .unwrap()
            .boxed();
        let mut added = 0;
        loop {
            match initial.try_next().await.unwrap().unwrap() {
                WatchEvent::Added(_) => added += 1,
                WatchEvent::Bookmark(b) => {
                    assert_eq!(
                        b.metadata
                            .annotations
                            .get("k8s.io/initial-events-end")
                            .map(String::as_str),
                        Some("true")
                    );
                    assert_eq!(b.metadata.resource_version, new_rv);
                    break;
                }
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(added, 2);
        // And the watcher in that mode.
        let mut w = run(svcs, watcher::Config::default().streaming_lists());
        let mut seen = 0;
        loop {
            match next(&mut w).await {
                watcher::Event::Init => {}
                watcher::Event::InitApply(_) => seen += 1,
                watcher::Event::InitDone => break,
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(seen, 2);
        let streaming: Vec<_> = api
            .received()
            .into_iter()
            .filter(|r| r.param("sendInitialEvents").as_deref() == Some("true"))
            .collect();
        for r in &streaming {
            eprintln!("{} {} -> {}", r.method, r.path, r.answered);
        }
        assert_eq!(streaming.len(), 2, "Api::watch and the watcher");
    })
    .await;
}

#[tokio::test]
async fn an_expired_watch_is_an_error_event_with_the_api_servers_status() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        let svcs: Api<Service> = Api::all(client(&api).await);
        let old = api.resource_version();
        api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "bookinfo"}}));
        api.expire_history();
        let now = api.resource_version();
        let mut stream = svcs.watch(&WatchParams::default(), &old.to_string()).await.unwrap().boxed();
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Error(e) => {
                assert_eq!(e.code, 410);
                assert_eq!(e.reason, "Expired");
                assert_eq!(e.message, format!("too old resource version: {old} ({now})"));
            }
            e => panic!("unexpected {e:?}"),
        }
        assert!(stream.try_next().await.unwrap().is_none(), "the stream ends");

        // An open watch told so.
        let mut open = svcs.watch(&WatchParams::default(), &now.to_string()).await.unwrap().boxed();
        until("the watch open", || api.open_watches() == 1).await;
        api.expire_watches();
        loop {
            match open.try_next().await.unwrap().unwrap() {
                WatchEvent::Error(e) => {
                    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
                    break;
                }
                WatchEvent::Bookmark(_) => {}
                e => panic!("unexpected {e:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn events_are_created_and_custom_resource_status_patched() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        let c = client(&api).await;
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("fedmesh.io", "v1", "TrafficWeights"),
            "trafficweights",
        );
        let tw: Api<DynamicObject> = Api::namespaced_with(c.clone(), "bookinfo", &ar);
        let before = tw.get("reviews").await.unwrap();
        assert_eq!(before.metadata.generation, Some(1));
        let mut w = run(tw.clone(), watcher::Config::default());
        loop {
            if let watcher::Event::InitDone = next(&mut w).await {
                break;
            }
        }

        // The Event a refusal produces.
        let events: Api<Event> = Api::namespaced(c.clone(), "bookinfo");
        let ev = Event {
            metadata: kube::api::ObjectMeta {
                generate_name: Some("reviews.".into()),
                namespace: Some("bookinfo".into()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("fedmesh.io/v1".into()),
                kind: Some("TrafficWeights".into()),
                name: Some("reviews".into()),
                namespace: Some("bookinfo".into()),
                uid: before.metadata.uid.clone(),
                ..Default::default()
            },
            reason: Some("Invalid".into()),
            message: Some("weights must add up to 100".into()),
            type_: Some("Warning".into()),
            ..Default::default()
        };
        let created = events.create(&PostParams::default(), &ev).await.unwrap();
        assert!(created.name_any().starts_with("reviews."));
        assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
        let stored = api.events();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0]["reason"], "Invalid");
        assert_eq!(stored[0]["involvedObject"]["name"], "reviews");
        assert_eq!(api.received().last().unwrap().answered, 201);
        // In a namespace that does not exist: 404, as NamespaceLifecycle answers.
        let nowhere: Api<Event> = Api::namespaced(c.clone(), "nowhere");
        let mut elsewhere = ev.clone();
        elsewhere.metadata.namespace = None;
        match nowhere.create(&PostParams::default(), &elsewhere).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!((e.code, e.message.as_str()), (404, "namespaces \"nowhere\" not found"));
            }
            other => panic!("unexpected {other:?}"),
        }

        // The status condition.
        let patch = json!({"status": {"conditions": [{
            "type": "Accepted", "status": "False", "reason": "Invalid",
            "message": "weights must add up to 100", "observedGeneration": 1,
            "lastTransitionTime": "2025-03-11T10:00:00Z"
        }]}});
        let patched = tw
            .patch_status("reviews", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        assert_eq!(patched.data["status"]["conditions"][0]["type"], "Accepted");
        assert_eq!(patched.metadata.generation, Some(1), "a status write is no spec change");
        assert_ne!(patched.metadata.resource_version, before.metadata.resource_version);
        match next(&mut w).await {
            watcher::Event::Apply(o) => {
                assert_eq!(o.metadata.resource_version, patched.metadata.resource_version);
                assert_eq!(o.data["status"]["conditions"][0]["reason"], "Invalid");
            }
            e => panic!("unexpected {e:?}"),
        }
        let request = api.received().last().unwrap().clone();
        assert_eq!(request.method, "PATCH");
        assert_eq!(request.path_only(), "/apis/fedmesh.io/v1/namespaces/bookinfo/trafficweights/reviews/status");
        assert_eq!(request.content_type.as_deref(), Some("application/merge-patch+json"));
        // The same patch again writes nothing.
        let again = tw
            .patch_status("reviews", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        assert_eq!(again.metadata.resource_version, patched.metadata.resource_version);
        // A spec patch bumps the generation and leaves the status alone.
        let spec = tw
            .patch(
                "reviews",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"weights": {"clusters": {"eu-west-1": 50, "us-east-1": 50}}}, "status": null})),
            )
            .await
            .unwrap();
        assert_eq!(spec.metadata.generation, Some(2));
        assert_eq!(spec.data["status"]["conditions"][0]["type"], "Accepted");
        // A stale resourceVersion conflicts.
        match tw
            .patch_status(
                "reviews",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "status": {}})),
            )
            .await
        {
            Err(kube::Error::Api(e)) => assert_eq!((e.code, e.reason.as_str()), (409, "Conflict")),
            other => panic!("unexpected {other:?}"),
        }
        match tw.get("missing").await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 404);
                assert_eq!(e.message, "trafficweights.fedmesh.io \"missing\" not found");
            }
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn disallowed_resources_are_forbidden_with_the_api_servers_message() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        api.set_federation_rules(Some(&[
            ("list", "", "pods"),
            ("watch", "", "pods"),
            ("get", "fedmesh.io", "trafficweights"),
        ]));
        let c = client(&api).await;
        assert_eq!(Api::<Pod>::all(c.clone()).list(&ListParams::default()).await.unwrap().items.len(), 3);
        match Api::<Service>::all(c.clone()).list(&ListParams::default()).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 403);
                assert_eq!(e.reason, "Forbidden");
                assert_eq!(
                    e.message,
                    format!(
                        "services is forbidden: User \"{FEDERATION_USER}\" cannot list resource \"services\" \
                         in API group \"\" at the cluster scope"
                    )
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("fedmesh.io", "v1", "TrafficWeights"),
            "trafficweights",
        );
        let tw: Api<DynamicObject> = Api::namespaced_with(c.clone(), "bookinfo", &ar);
        tw.get("reviews").await.unwrap();
        match tw
            .patch_status("reviews", &PatchParams::default(), &Patch::Merge(json!({"status": {}})))
            .await
        {
            Err(kube::Error::Api(e)) => assert_eq!(
                e.message,
                format!(
                    "trafficweights.fedmesh.io \"reviews\" is forbidden: User \"{FEDERATION_USER}\" cannot patch \
                     resource \"trafficweights/status\" in API group \"fedmesh.io\" in the namespace \"bookinfo\""
                )
            ),
            other => panic!("unexpected {other:?}"),
        }
        // A CRD that is not installed: 404.
        api.set_federation_rules(None);
        api.remove_resource("multicluster.x-k8s.io", "serviceexports");
        let se = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport"),
            "serviceexports",
        );
        match Api::<DynamicObject>::all_with(c, &se).list(&ListParams::default().limit(1)).await {
            Err(kube::Error::Api(e)) => assert_eq!(e.code, 404),
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
}

/// Prints the requests a kube 4.2 watcher makes (run with `--nocapture`).
#[tokio::test]
async fn kube_request_shapes() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        api.set_page_size(Some(2));
        let pods: Api<Pod> = Api::all(client(&api).await);
        let mut w = run(pods, watcher::Config::default());
        loop {
            if let watcher::Event::InitDone = next(&mut w).await {
                break;
            }
        }
        until("the watch open", || api.open_watches() == 1).await;
        let log = api.received_for("/api/v1/pods");
        for r in &log {
            eprintln!("{} {} -> {}", r.method, r.path, r.answered);
        }
        assert!(log[0].is_list_of("/api/v1/pods"));
        assert_eq!(log[0].param("limit").as_deref(), Some("500"));
        assert!(log[1].param("continue").is_some());
        assert!(log[2].is_watch());
        assert_eq!(log[2].param("allowWatchBookmarks").as_deref(), Some("true"));
    })
    .await;
}

#[tokio::test]
async fn watches_filter_by_label_and_end_at_their_timeout() {
    bounded(async {
        let api = KubeApi::with_fixtures().await;
        let pods: Api<Pod> = Api::namespaced(client(&api).await, "bookinfo");
        let rv = api.resource_version().to_string();
        let wp = WatchParams::default()
            .labels("version=v1")
            .timeout(2)
            .disable_bookmarks();
        let mut stream = pods.watch(&wp, &rv).await.unwrap().boxed();
        until("the watch open", || api.open_watches() == 1).await;

        // reviews-v1 leaves the selection, comes back; reviews-v3 is not seen.
        let mut p = fixture("pod-reviews-v1.json");
        p["metadata"]["labels"]["version"] = json!("v9");
        api.apply(p);
        let mut p3 = fixture("pod-reviews-v3.json");
        p3["metadata"]["labels"]["tier"] = json!("x");
        api.apply(p3);
        api.apply(fixture("pod-reviews-v1.json"));
        let mut seen = Vec::new();
        let started = tokio::time::Instant::now();
        while let Some(ev) = stream.try_next().await.unwrap() {
            match ev {
                WatchEvent::Added(p) => seen.push(format!("ADDED {}", p.name_any())),
                WatchEvent::Modified(p) => seen.push(format!("MODIFIED {}", p.name_any())),
                WatchEvent::Deleted(p) => seen.push(format!(
                    "DELETED {} v={}",
                    p.name_any(),
                    p.labels()["version"]
                )),
                e => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(
            seen,
            [
                "DELETED reviews-v1-5b8c9d7f4d-h2x9k v=v1",
                "ADDED reviews-v1-5b8c9d7f4d-h2x9k"
            ]
        );
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "ended by timeoutSeconds=2: {took:?}"
        );
        assert_eq!(
            api.received()
                .last()
                .unwrap()
                .param("timeoutSeconds")
                .as_deref(),
            Some("2")
        );
    })
    .await;
}

/// The recorded k3s cluster is served as recorded: every Pod and
/// EndpointSlice in the JSON of a list equals the recording but for the
/// resourceVersion the double's store gave it (and the `kind` and
/// `apiVersion` that a list leaves out of its items).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_objects_are_served_as_recorded() {
    bounded(async {
        let api = KubeApi::start().await;
        api.load_recorded_k3s();
        let c = client(&api).await;
        let recorded = mesh_test::kube::recorded_k3s();
        let mut compared = 0;
        for (kind, path) in [
            ("Pod", "/api/v1/pods"),
            ("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices"),
        ] {
            let req = hyper::Request::get(path).body(Vec::new()).unwrap();
            let list: serde_json::Value =
                serde_json::from_str(&c.request_text(req).await.unwrap()).unwrap();
            let served = list["items"].as_array().unwrap();
            let want: Vec<_> = recorded.iter().filter(|o| o["kind"] == kind).collect();
            assert_eq!(served.len(), want.len(), "{kind}s served");
            for w in want {
                let name = &w["metadata"]["name"];
                let mut got = served
                    .iter()
                    .find(|s| &s["metadata"]["name"] == name)
                    .unwrap_or_else(|| panic!("{kind} {name} not served"))
                    .clone();
                let mut w = w.clone();
                for v in [&mut got, &mut w] {
                    let o = v.as_object_mut().unwrap();
                    o.remove("kind");
                    o.remove("apiVersion");
                    o["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .remove("resourceVersion");
                }
                assert_eq!(got, w, "{kind} {name} as recorded");
                compared += 1;
            }
        }
        assert_eq!(compared, 13 + 7);
    })
    .await;
}
