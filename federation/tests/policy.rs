//! Policy documents through the federation's Admin API, over real gRPC on
//! loopback, on the embedded registry and on a real etcd: apply (all or
//! nothing, kubectl-like actions, dry run), list, delete, what Discovery
//! subscribers receive, values written behind the federation's back, and a
//! registry that goes away.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use federation::app::{self, Bound};
use federation::config::Config;
use federation::registry::ROOT;
use federation::store::etcd::EtcdStore;
use federation::store::memory::MemoryStore;
use federation::store::Store;
use futures::StreamExt;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::discovery_client::DiscoveryClient;
use mesh_core::policy::Document;
use mesh_test::assert_eventually;
use mesh_test::etcd::EtcdFixture;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

mod common;

/// How long one awaited event may take.
const PATIENCE: Duration = Duration::from_secs(10);
/// Upper bound of one Admin call (an etcd request times out after 5 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the federation may take to notice etcd is gone (keepalive ~6 s).
const OUTAGE_PATIENCE: Duration = Duration::from_secs(25);

// === harness ===

struct Fed {
    bound: Bound,
    admin: AdminClient<Channel>,
    disc: DiscoveryClient<Channel>,
    etcd: Option<EtcdFixture>,
}

impl Fed {
    async fn start(store: Arc<dyn Store>, etcd: Option<EtcdFixture>) -> Self {
        mesh_test::trace_init();
        let cfg = Config::embedded(([127, 0, 0, 1], 0).into());
        let bound = app::serve(&cfg, store).await.unwrap();
        // Writes are refused until the first full read of the registry.
        tokio::time::timeout(PATIENCE, bound.shared.wait_synced())
            .await
            .expect("the federation reads its registry in time");
        // The single replica takes the lead (one registry write) before the
        // tests count revisions to prove that nothing else was written.
        let mut terms = bound.election.watch();
        tokio::time::timeout(PATIENCE, terms.wait_for(Option::is_some))
            .await
            .expect("the replica leads in time")
            .expect("the election runs");
        let ctx = bound
            .operator_context("policy-admin", &[federation::auth::Role::PolicyAdmin])
            .await
            .unwrap();
        let ch = mesh_node::fed::channel(
            &ctx.server,
            mesh_node::fed::Target::from_context(&ctx)
                .unwrap()
                .tls
                .as_ref(),
            |e| {
                e.connect_timeout(Duration::from_secs(5))
                    .timeout(CALL_TIMEOUT)
            },
        )
        .await
        .unwrap();
        // Discovery serves nodes: an agent of c1 in namespace default.
        let node = common::workload(&bound, "c1", "productpage").await;
        Self {
            admin: AdminClient::new(ch),
            disc: DiscoveryClient::new(node),
            bound,
            etcd,
        }
    }

    async fn memory() -> Self {
        Self::start(Arc::new(MemoryStore::new()), None).await
    }

    async fn etcd() -> Self {
        let fx = tokio::task::spawn_blocking(EtcdFixture::start)
            .await
            .unwrap();
        let store = EtcdStore::connect(&[fx.endpoint()]).await.unwrap();
        Self::start(Arc::new(store), Some(fx)).await
    }

    async fn apply_req(
        &mut self,
        req: api::ApplyPoliciesRequest,
    ) -> Result<api::ApplyPoliciesResponse, Status> {
        self.admin.apply_policies(req).await.map(|r| r.into_inner())
    }

    async fn apply(&mut self, docs: &[Value]) -> Result<api::ApplyPoliciesResponse, Status> {
        self.apply_req(request(docs, false)).await
    }

    async fn dry_run(&mut self, docs: &[Value]) -> Result<api::ApplyPoliciesResponse, Status> {
        self.apply_req(request(docs, true)).await
    }

    async fn list_filtered(
        &mut self,
        kind: &str,
        ns: &str,
    ) -> Result<Vec<api::PolicyDocument>, Status> {
        self.admin
            .list_policies(api::ListPoliciesRequest {
                kind: kind.into(),
                namespace: ns.into(),
            })
            .await
            .map(|r| r.into_inner().documents)
    }

    async fn list(&mut self) -> Vec<api::PolicyDocument> {
        self.list_filtered("", "").await.unwrap()
    }

    async fn delete(&mut self, refs: Vec<api::PolicyRef>) -> Result<i64, Status> {
        self.admin
            .delete_policies(api::DeletePoliciesRequest { refs })
            .await
            .map(|r| r.into_inner().revision)
    }

    async fn status(&mut self) -> api::GetStatusResponse {
        self.admin
            .get_status(api::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// The registry's own revision: it moves with every write, by anyone.
    async fn store_revision(&self) -> i64 {
        self.bound.store.range(ROOT).await.unwrap().revision
    }

    /// Writes a raw value under `key` behind the Admin API's back, and waits
    /// until the federation's state has seen it.
    async fn hand_write(&self, key: &str, value: &str) {
        let rev = self
            .bound
            .store
            .put(key, value.as_bytes().to_vec(), None)
            .await
            .unwrap();
        assert!(self.bound.shared.wait_for(rev, PATIENCE).await);
    }
}

// === documents ===

/// A VirtualService for host `reviews` splitting between subsets v1 and v2.
fn vs(ns: &str, name: &str, v1: i64, v2: i64) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hosts": ["reviews"],
            "http": [{
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": v1},
                    {"destination": {"host": "reviews", "subset": "v2"}, "weight": v2}
                ],
                "timeout": "5s"
            }]
        }
    })
}

/// A DestinationRule for host `reviews` with subsets v1 and v2.
fn dr(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "host": "reviews",
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}}
            ]
        }
    })
}

fn pref(kind: &str, ns: &str, name: &str) -> api::PolicyRef {
    api::PolicyRef {
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

/// The reference a client would send with `v`: read from the document itself.
fn ref_of(v: &Value) -> api::PolicyRef {
    pref(
        v["kind"].as_str().unwrap_or_default(),
        v["metadata"]["namespace"].as_str().unwrap_or_default(),
        v["metadata"]["name"].as_str().unwrap_or_default(),
    )
}

fn wire(v: &Value) -> api::PolicyDocument {
    api::PolicyDocument {
        r#ref: Some(ref_of(v)),
        json: v.to_string(),
        revision: 0,
    }
}

fn request(docs: &[Value], dry_run: bool) -> api::ApplyPoliciesRequest {
    api::ApplyPoliciesRequest {
        source: "policy.yaml".into(),
        documents: docs.iter().map(wire).collect(),
        dry_run,
    }
}

/// The canonical JSON the federation stores for `v`.
fn canonical(v: &Value) -> String {
    Document::from_json(v).unwrap().to_json().to_string()
}

/// `Kind ns/name` of a reference.
fn show(r: Option<&api::PolicyRef>) -> String {
    let r = r.expect("a reference");
    format!("{} {}/{}", r.kind, r.namespace, r.name)
}

fn changes(r: &api::ApplyPoliciesResponse) -> Vec<(String, String)> {
    r.changes
        .iter()
        .map(|c| (show(c.r#ref.as_ref()), c.action.clone()))
        .collect()
}

fn pairs(want: &[(&str, &str)]) -> Vec<(String, String)> {
    want.iter()
        .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
        .collect()
}

/// The listed documents by name, with their revision and JSON, sorted.
fn listed(docs: &[api::PolicyDocument]) -> Vec<(String, i64, String)> {
    let mut v: Vec<_> = docs
        .iter()
        .map(|d| (show(d.r#ref.as_ref()), d.revision, d.json.clone()))
        .collect();
    v.sort();
    v
}

fn names(docs: &[api::PolicyDocument]) -> Vec<String> {
    let mut v: Vec<String> = docs.iter().map(|d| show(d.r#ref.as_ref())).collect();
    v.sort();
    v
}

/// Asserts a refusal with `code` whose message contains every one of `parts`.
fn assert_refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, parts: &[&str]) -> String {
    let e = r.expect_err("the request must be refused");
    assert_eq!(e.code(), code, "{e:?}");
    for p in parts {
        assert!(
            e.message().contains(p),
            "message {:?} lacks {p:?}",
            e.message()
        );
    }
    e.message().to_string()
}

// === discovery ===

struct Sub {
    _tx: mpsc::Sender<api::DiscoveryRequest>,
    rx: tonic::Streaming<api::DiscoveryResponse>,
}

async fn subscribe(fed: &mut Fed, node: &str) -> Sub {
    let (tx, rx) = mpsc::channel(16);
    tx.send(api::DiscoveryRequest {
        request: Some(api::discovery_request::Request::Subscribe(api::Subscribe {
            node_id: node.into(),
            cluster: "c1".into(),
            kind: api::NodeKind::Agent as i32,
            namespace: "default".into(),
            labels: [("app".to_string(), "productpage".to_string())].into(),
        })),
    })
    .await
    .unwrap();
    let rx = tokio::time::timeout(PATIENCE, fed.disc.subscribe(ReceiverStream::new(rx)))
        .await
        .expect("subscribe answers in time")
        .unwrap()
        .into_inner();
    Sub { _tx: tx, rx }
}

impl Sub {
    async fn next(&mut self) -> api::DiscoveryResponse {
        tokio::time::timeout(PATIENCE, self.rx.next())
            .await
            .expect("a discovery message in time")
            .expect("the stream stays open")
            .expect("a message, not an error")
    }

    /// A whole snapshot; policies come in its first chunk.
    async fn snapshot(&mut self) -> api::DiscoveryResponse {
        let mut all = self.next().await;
        assert_eq!(all.snapshot.as_ref().map(|s| s.index), Some(0), "{all:?}");
        while !all.snapshot.as_ref().unwrap().last {
            let c = self.next().await;
            all.policies.extend(c.policies);
            all.snapshot = c.snapshot;
        }
        all
    }

    /// Deltas until one at `version` or later; every earlier one is returned too.
    async fn deltas_until(&mut self, version: i64) -> Vec<api::DiscoveryResponse> {
        let mut out = Vec::new();
        loop {
            let d = self.next().await;
            assert!(d.snapshot.is_none(), "a delta, not a snapshot: {d:?}");
            let v = d.version;
            out.push(d);
            if v >= version {
                return out;
            }
        }
    }
}

/// The keys and canonical JSON of documents as a subscriber received them,
/// each read back with the same validator the agents use.
fn received(docs: &[api::PolicyDocument]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = docs
        .iter()
        .map(|p| {
            let value: Value = serde_json::from_str(&p.json).expect("policy JSON parses");
            let doc = Document::from_json(&value).expect("a subscriber gets valid documents");
            let (kind, ns, name) = doc.key();
            let key = format!("{kind} {ns}/{name}");
            assert_eq!(key, show(p.r#ref.as_ref()), "ref and JSON agree");
            assert_eq!(
                p.json,
                doc.to_json().to_string(),
                "the JSON sent is canonical"
            );
            (key, p.json.clone())
        })
        .collect();
    v.sort();
    v
}

// === scenarios, run on both backends ===

/// Apply answers per document as kubectl does: created, then unchanged when
/// nothing would change (and nothing is written), configured for the one edited.
async fn apply_reports_created_unchanged_configured(mut fed: Fed) {
    let reviews = vs("default", "reviews", 90, 10);
    let rules = dr("default", "reviews");
    let r = fed.apply(&[reviews.clone(), rules.clone()]).await.unwrap();
    assert_eq!(
        changes(&r),
        pairs(&[
            ("VirtualService default/reviews", "created"),
            ("DestinationRule default/reviews", "created"),
        ])
    );
    assert!(r.revision > 0, "{r:?}");
    let created = r.revision;
    // Read-your-writes: the list right after shows both, at the write's revision.
    let list = fed.list().await;
    assert_eq!(
        listed(&list),
        vec![
            (
                "DestinationRule default/reviews".to_string(),
                created,
                canonical(&rules)
            ),
            (
                "VirtualService default/reviews".to_string(),
                created,
                canonical(&reviews)
            ),
        ]
    );

    // The same documents again, written differently (labels, which are not
    // kept; keys in another order): unchanged, and nothing is written.
    let before = fed.store_revision().await;
    let mut relabelled = reviews.clone();
    relabelled["metadata"]["labels"] = json!({"team": "bookinfo"});
    relabelled["metadata"]["resourceVersion"] = json!("12345");
    let reordered: Value = serde_json::from_str(&format!(
        r#"{{"spec": {}, "metadata": {}, "kind": "DestinationRule", "apiVersion": "networking.istio.io/v1beta1"}}"#,
        rules["spec"], rules["metadata"]
    ))
    .unwrap();
    let r = fed.apply(&[relabelled, reordered]).await.unwrap();
    assert_eq!(
        changes(&r),
        pairs(&[
            ("VirtualService default/reviews", "unchanged"),
            ("DestinationRule default/reviews", "unchanged"),
        ])
    );
    assert_eq!(r.revision, 0, "nothing written, no revision");
    assert_eq!(fed.store_revision().await, before, "nothing written");
    assert_eq!(listed(&fed.list().await), listed(&list));

    // One edited: only that one is configured and gets a new revision.
    let shifted = vs("default", "reviews", 50, 50);
    let r = fed.apply(&[shifted.clone(), rules.clone()]).await.unwrap();
    assert_eq!(
        changes(&r),
        pairs(&[
            ("VirtualService default/reviews", "configured"),
            ("DestinationRule default/reviews", "unchanged"),
        ])
    );
    assert!(r.revision > before, "{r:?}");
    assert_eq!(
        listed(&fed.list().await),
        vec![
            (
                "DestinationRule default/reviews".to_string(),
                created,
                canonical(&rules)
            ),
            (
                "VirtualService default/reviews".to_string(),
                r.revision,
                canonical(&shifted)
            ),
        ]
    );

    // The list filters by kind and namespace, and refuses a kind it does not know.
    let only = fed.list_filtered("DestinationRule", "").await.unwrap();
    assert_eq!(names(&only), ["DestinationRule default/reviews"]);
    assert!(fed.list_filtered("", "other").await.unwrap().is_empty());
    assert_eq!(fed.list_filtered("", "default").await.unwrap().len(), 2);
    assert_refused(
        fed.list_filtered("Gateway", "").await,
        Code::InvalidArgument,
        &[
            "kind: unsupported kind \"Gateway\"",
            "VirtualService, DestinationRule, Sidecar",
        ],
    );
}

/// One bad document refuses the whole request: the good one beside it is
/// not stored either, and the error names the document and the field.
async fn apply_is_all_or_nothing(mut fed: Fed) {
    fed.apply(&[vs("default", "reviews", 90, 10)])
        .await
        .unwrap();
    let list = listed(&fed.list().await);
    let before = fed.store_revision().await;

    let mut unknown = vs("default", "ratings", 90, 10);
    unknown["spec"]["http"][0]["timeoutz"] = json!("5s");
    let msg = assert_refused(
        fed.apply(&[dr("default", "ratings"), unknown]).await,
        Code::InvalidArgument,
        &[
            "policy.yaml: document 2 (VirtualService default/ratings): spec.http[0]",
            "unknown field `timeoutz`",
        ],
    );
    assert!(
        !msg.contains("document 1"),
        "the good document is not blamed: {msg}"
    );

    let negative = vs("default", "ratings", -1, 10);
    let msg = assert_refused(
        fed.apply(&[dr("default", "ratings"), negative]).await,
        Code::InvalidArgument,
        &["policy.yaml: document 2 (VirtualService default/ratings): spec.http[0].route[0].weight: "],
    );
    assert!(msg.contains("-1"), "{msg}");

    // Not JSON at all.
    let mut req = request(&[dr("default", "ratings")], false);
    req.documents.push(api::PolicyDocument {
        r#ref: Some(pref("VirtualService", "default", "ratings")),
        json: "{\"kind\": ".into(),
        revision: 0,
    });
    assert_refused(
        fed.apply_req(req).await,
        Code::InvalidArgument,
        &["policy.yaml: document 2: not valid JSON"],
    );

    // A document editing a stored one next to a bad one: the stored one stays as it was.
    let mut bad_dr = dr("default", "ratings");
    bad_dr["spec"]["subsets"][0]["name"] = json!("v_1");
    assert_refused(
        fed.apply(&[vs("default", "reviews", 10, 90), bad_dr]).await,
        Code::InvalidArgument,
        &["policy.yaml: document 2 (DestinationRule default/ratings): spec.subsets[0].name: invalid subset name \"v_1\""],
    );

    assert_eq!(listed(&fed.list().await), list, "nothing stored");
    assert_eq!(fed.store_revision().await, before, "nothing written");
}

/// Every bad document is reported, one line each, in document order.
async fn every_error_is_reported(mut fed: Fed) {
    let before = fed.store_revision().await;
    let mut unknown = dr("default", "ratings");
    unknown["spec"]["trafficPolicyy"] = json!({});
    let mut no_name = vs("default", "x", 1, 1);
    no_name["metadata"] = json!({"namespace": "default"});
    let msg = assert_refused(
        fed.apply(&[
            vs("default", "reviews", -5, 10),
            dr("default", "reviews"),
            unknown,
            no_name,
        ])
        .await,
        Code::InvalidArgument,
        &[],
    );
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines.len(), 3, "one line per bad document: {msg}");
    assert!(
        lines[0].starts_with(
            "policy.yaml: document 1 (VirtualService default/reviews): spec.http[0].route[0].weight: "
        ),
        "{msg}"
    );
    assert!(
        lines[1].starts_with("policy.yaml: document 3 (DestinationRule default/ratings): spec")
            && lines[1].contains("trafficPolicyy"),
        "{msg}"
    );
    assert!(
        lines[2].starts_with("policy.yaml: document 4 (VirtualService")
            && lines[2].contains("metadata.name: is required"),
        "{msg}"
    );
    assert!(fed.list().await.is_empty());
    assert_eq!(fed.store_revision().await, before);
}

/// Requests the federation refuses before looking at the registry.
async fn malformed_requests_are_refused(mut fed: Fed) {
    let before = fed.store_revision().await;

    // The reference must name the document it comes with.
    let mut req = request(&[vs("default", "reviews", 1, 1)], false);
    req.documents[0].r#ref = Some(pref("VirtualService", "default", "ratings"));
    assert_refused(
        fed.apply_req(req).await,
        Code::InvalidArgument,
        &["policy.yaml: document 1: ref VirtualService/default/ratings does not match the document (VirtualService default/reviews)"],
    );
    let mut req = request(&[dr("default", "reviews")], false);
    req.documents[0].r#ref = Some(pref("DestinationRule", "prod", "reviews"));
    assert_refused(
        fed.apply_req(req).await,
        Code::InvalidArgument,
        &["does not match the document"],
    );
    let mut req = request(&[dr("default", "reviews")], false);
    req.documents[0].r#ref = Some(pref("VirtualService", "default", "reviews"));
    assert_refused(
        fed.apply_req(req).await,
        Code::InvalidArgument,
        &["does not match the document"],
    );

    // The same resource twice, even written differently.
    assert_refused(
        fed.apply(&[
            vs("default", "reviews", 1, 1),
            dr("default", "reviews"),
            vs("default", "reviews", 2, 1),
        ])
        .await,
        Code::InvalidArgument,
        &["policy.yaml: document 3 (VirtualService default/reviews): appears twice in one apply"],
    );

    // Nothing to apply.
    assert_refused(
        fed.apply(&[]).await,
        Code::InvalidArgument,
        &["policy.yaml: no documents to apply"],
    );
    assert_refused(
        fed.apply_req(api::ApplyPoliciesRequest::default()).await,
        Code::InvalidArgument,
        &["no documents to apply"],
    );

    // More than one registry transaction holds.
    let many: Vec<Value> = (0..129)
        .map(|i| dr("default", &format!("r{i:03}")))
        .collect();
    assert_refused(
        fed.apply(&many).await,
        Code::InvalidArgument,
        &["129 documents", "at most 128"],
    );
    assert!(fed.list().await.is_empty(), "nothing stored");
    assert_eq!(fed.store_revision().await, before, "nothing written");

    // Exactly 128 is fine, in one transaction.
    let r = fed.apply(&many[..128]).await.unwrap();
    assert_eq!(r.changes.len(), 128);
    assert!(r.changes.iter().all(|c| c.action == "created"));
    let list = fed.list().await;
    assert_eq!(list.len(), 128);
    assert!(
        list.iter().all(|d| d.revision == r.revision),
        "one revision for all"
    );
}

/// A dry run validates and reports what would change, and writes nothing.
async fn dry_run_writes_nothing(mut fed: Fed) {
    let before = fed.store_revision().await;
    let r = fed
        .dry_run(&[vs("default", "reviews", 90, 10), dr("default", "reviews")])
        .await
        .unwrap();
    assert_eq!(
        changes(&r),
        pairs(&[
            ("VirtualService default/reviews", "created"),
            ("DestinationRule default/reviews", "created"),
        ])
    );
    assert_eq!(r.revision, 0);
    assert!(fed.list().await.is_empty());
    assert_eq!(fed.store_revision().await, before);

    fed.apply(&[vs("default", "reviews", 90, 10), dr("default", "reviews")])
        .await
        .unwrap();
    let list = listed(&fed.list().await);
    let before = fed.store_revision().await;
    let r = fed
        .dry_run(&[
            vs("default", "reviews", 10, 90),
            dr("default", "reviews"),
            dr("default", "ratings"),
        ])
        .await
        .unwrap();
    assert_eq!(
        changes(&r),
        pairs(&[
            ("VirtualService default/reviews", "configured"),
            ("DestinationRule default/reviews", "unchanged"),
            ("DestinationRule default/ratings", "created"),
        ])
    );
    assert_eq!(r.revision, 0);
    assert_eq!(listed(&fed.list().await), list);
    assert_eq!(fed.store_revision().await, before);

    // A dry run validates like the real thing.
    assert_refused(
        fed.dry_run(&[vs("default", "reviews", -1, 1)]).await,
        Code::InvalidArgument,
        &["document 1 (VirtualService default/reviews): spec.http[0].route[0].weight"],
    );
}

/// Delete removes the named documents in one transaction, or nothing when
/// one of them is absent.
async fn delete_is_all_or_nothing(mut fed: Fed) {
    fed.apply(&[
        vs("default", "reviews", 90, 10),
        dr("default", "reviews"),
        dr("prod", "reviews"),
    ])
    .await
    .unwrap();
    let list = listed(&fed.list().await);
    let before = fed.store_revision().await;

    let msg = assert_refused(
        fed.delete(vec![
            pref("VirtualService", "default", "reviews"),
            pref("DestinationRule", "default", "ghost"),
        ])
        .await,
        Code::NotFound,
        &["nothing deleted", "DestinationRule default/ghost"],
    );
    assert!(
        !msg.contains("VirtualService"),
        "only the absent one is named: {msg}"
    );
    // Same name, other namespace: not the same document.
    assert_refused(
        fed.delete(vec![pref("DestinationRule", "staging", "reviews")])
            .await,
        Code::NotFound,
        &["DestinationRule staging/reviews"],
    );
    assert_refused(
        fed.delete(vec![]).await,
        Code::InvalidArgument,
        &["refs: nothing to delete"],
    );
    assert_refused(
        fed.delete(vec![
            pref("VirtualService", "default", "reviews"),
            pref("Gateway", "default", "reviews"),
        ])
        .await,
        Code::InvalidArgument,
        &["refs[1].kind: unsupported kind \"Gateway\""],
    );
    assert_refused(
        fed.delete(vec![pref("VirtualService", "Default", "reviews")])
            .await,
        Code::InvalidArgument,
        &["refs[0].namespace"],
    );
    assert_eq!(listed(&fed.list().await), list, "nothing deleted");
    assert_eq!(fed.store_revision().await, before, "nothing written");

    let rev = fed
        .delete(vec![
            pref("VirtualService", "default", "reviews"),
            pref("DestinationRule", "default", "reviews"),
        ])
        .await
        .unwrap();
    assert!(rev > before);
    assert_eq!(names(&fed.list().await), ["DestinationRule prod/reviews"]);
    // One transaction: a single revision for both deletions; the only
    // writes after it are their two audit entries.
    assert_eq!(fed.store_revision().await, rev + 2);

    // Deleting again: not found, naming both.
    assert_refused(
        fed.delete(vec![
            pref("VirtualService", "default", "reviews"),
            pref("DestinationRule", "default", "reviews"),
        ])
        .await,
        Code::NotFound,
        &[
            "VirtualService default/reviews",
            "DestinationRule default/reviews",
        ],
    );
    // And applying it again creates it anew.
    let r = fed.apply(&[dr("default", "reviews")]).await.unwrap();
    assert_eq!(
        changes(&r),
        pairs(&[("DestinationRule default/reviews", "created")])
    );
}

/// An agent gets the policies in its snapshot, then a delta per change:
/// `policies` on apply, `removed_policies` on delete, canonical JSON.
async fn subscribers_receive_policies(mut fed: Fed) {
    let reviews = vs("default", "reviews", 90, 10);
    fed.apply(std::slice::from_ref(&reviews)).await.unwrap();

    let mut sub = subscribe(&mut fed, "agent-policy").await;
    let snap = sub.snapshot().await;
    assert_eq!(
        received(&snap.policies),
        vec![(
            "VirtualService default/reviews".to_string(),
            canonical(&reviews)
        )]
    );

    // Apply two: a delta carries both, at the write's revision.
    let rules = dr("default", "reviews");
    let shifted = vs("default", "reviews", 50, 50);
    let r = fed.apply(&[shifted.clone(), rules.clone()]).await.unwrap();
    let deltas = sub.deltas_until(r.revision).await;
    assert!(deltas.iter().all(|d| d.version == r.revision), "{deltas:?}");
    let got: Vec<api::PolicyDocument> = deltas.iter().flat_map(|d| d.policies.clone()).collect();
    assert_eq!(
        received(&got),
        vec![
            (
                "DestinationRule default/reviews".to_string(),
                canonical(&rules)
            ),
            (
                "VirtualService default/reviews".to_string(),
                canonical(&shifted)
            ),
        ]
    );
    assert!(got.iter().all(|p| p.revision == r.revision));
    assert!(deltas.iter().all(|d| d.removed_policies.is_empty()));

    // An apply that changes nothing sends nothing: the next delta is the next change.
    let unchanged = fed.apply(std::slice::from_ref(&shifted)).await.unwrap();
    assert_eq!(unchanged.revision, 0);
    let ratings = dr("default", "ratings");
    let r = fed.apply(std::slice::from_ref(&ratings)).await.unwrap();
    let d = sub.next().await;
    assert_eq!(
        d.version, r.revision,
        "no delta for an unchanged apply: {d:?}"
    );
    assert_eq!(
        received(&d.policies),
        vec![(
            "DestinationRule default/ratings".to_string(),
            canonical(&ratings)
        )]
    );

    // Delete: removed_policies, no documents.
    let rev = fed
        .delete(vec![
            pref("VirtualService", "default", "reviews"),
            pref("DestinationRule", "default", "ratings"),
        ])
        .await
        .unwrap();
    let deltas = sub.deltas_until(rev).await;
    let mut removed: Vec<String> = deltas
        .iter()
        .flat_map(|d| d.removed_policies.iter().map(|r| show(Some(r))))
        .collect();
    removed.sort();
    assert_eq!(
        removed,
        [
            "DestinationRule default/ratings",
            "VirtualService default/reviews"
        ]
    );
    assert!(deltas.iter().all(|d| d.policies.is_empty()), "{deltas:?}");

    // A new subscriber's snapshot has what is left.
    let mut late = subscribe(&mut fed, "agent-late").await;
    let snap = late.snapshot().await;
    assert_eq!(
        received(&snap.policies),
        vec![(
            "DestinationRule default/reviews".to_string(),
            canonical(&rules)
        )]
    );
}

/// Values written straight into the registry under policy keys that do not
/// hold a valid document are skipped: listed by GetStatus with the reason,
/// never listed as policies nor sent to subscribers.
async fn invalid_stored_policies_are_skipped(mut fed: Fed) {
    let reviews = vs("default", "reviews", 90, 10);
    fed.apply(std::slice::from_ref(&reviews)).await.unwrap();
    let mut sub = subscribe(&mut fed, "agent-invalid").await;
    assert_eq!(sub.snapshot().await.policies.len(), 1);

    let broken = format!("{ROOT}policy/VirtualService/default/broken");
    let garbage = format!("{ROOT}policy/DestinationRule/default/garbage");
    let elsewhere = format!("{ROOT}policy/VirtualService/other/reviews");
    fed.hand_write(&broken, &vs("default", "broken", -1, 1).to_string())
        .await;
    fed.hand_write(&garbage, "{not json").await;
    fed.hand_write(&elsewhere, &reviews.to_string()).await;

    let st = fed.status().await;
    let entries: Vec<(&str, &str)> = st
        .invalid_entries
        .iter()
        .map(|e| (e.key.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(entries[0].0, garbage);
    assert!(entries[0].1.starts_with("not valid JSON"), "{entries:?}");
    assert_eq!(entries[1].0, broken);
    assert!(
        entries[1].1.starts_with(
            "not a valid VirtualService: <stored>: document 1 (VirtualService default/broken): spec.http[0].route[0].weight"
        ),
        "{entries:?}"
    );
    assert_eq!(entries[2].0, elsewhere);
    assert!(
        entries[2]
            .1
            .contains("VirtualService default/reviews, which does not match the key"),
        "{entries:?}"
    );
    assert_eq!(names(&fed.list().await), ["VirtualService default/reviews"]);

    // Nothing of it reached the subscriber: its next message is the next real change.
    let r = fed.apply(&[dr("default", "reviews")]).await.unwrap();
    let d = sub.next().await;
    assert_eq!(d.version, r.revision, "{d:?}");
    assert_eq!(names(&d.policies), ["DestinationRule default/reviews"]);
    assert!(d.removed_policies.is_empty());
    // Nor a new subscriber's snapshot.
    let mut other = subscribe(&mut fed, "agent-invalid-2").await;
    assert_eq!(
        names(&other.snapshot().await.policies),
        [
            "DestinationRule default/reviews",
            "VirtualService default/reviews"
        ]
    );

    // A valid document overwritten by hand with a bad value counts as absent:
    // subscribers are told it is gone.
    let key = format!("{ROOT}policy/VirtualService/default/reviews");
    let mut bad = reviews.clone();
    bad["spec"]["hosts"] = json!([]);
    fed.hand_write(&key, &bad.to_string()).await;
    let d = sub.next().await;
    assert!(d.policies.is_empty(), "{d:?}");
    assert_eq!(
        d.removed_policies,
        [pref("VirtualService", "default", "reviews")]
    );
    assert_eq!(
        names(&fed.list().await),
        ["DestinationRule default/reviews"]
    );
    assert!(fed
        .status()
        .await
        .invalid_entries
        .iter()
        .any(|e| e.key == key && e.reason.contains("spec.hosts")));

    // Applying a valid document over it repairs it, and subscribers get it back.
    let r = fed.apply(std::slice::from_ref(&reviews)).await.unwrap();
    assert_eq!(
        changes(&r),
        pairs(&[("VirtualService default/reviews", "configured")])
    );
    let d = sub.next().await;
    assert_eq!(
        received(&d.policies),
        vec![(
            "VirtualService default/reviews".to_string(),
            canonical(&reviews)
        )]
    );
    // Deleting a bad value through the API clears the complaint.
    fed.delete(vec![pref("VirtualService", "default", "broken")])
        .await
        .unwrap();
    let st = fed.status().await;
    let keys: Vec<&str> = st.invalid_entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, [garbage.as_str(), elsewhere.as_str()]);
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fed::memory().await).await;
                }
            )*
        }
        mod etcd_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let fed = super::Fed::etcd().await;
                    super::$name(fed).await;
                }
            )*
        }
    };
}

both_backends!(
    apply_reports_created_unchanged_configured,
    apply_is_all_or_nothing,
    every_error_is_reported,
    malformed_requests_are_refused,
    dry_run_writes_nothing,
    delete_is_all_or_nothing,
    subscribers_receive_policies,
    invalid_stored_policies_are_skipped,
);

// === etcd goes away ===

/// With etcd down, writes are refused with UNAVAILABLE saying the registry is
/// unreachable, while the last state is still listed; when it is back,
/// writes work again.
#[tokio::test]
async fn etcd_down_refuses_policy_writes() {
    let mut fed = Fed::etcd().await;
    let reviews = vs("default", "reviews", 90, 10);
    fed.apply(std::slice::from_ref(&reviews)).await.unwrap();

    let mut fx = fed.etcd.take().unwrap();
    let fx_stopped = tokio::task::spawn_blocking(move || {
        fx.stop();
        fx
    });
    let mut fx = fx_stopped.await.unwrap();

    // At once, before the federation has noticed: the write fails, nothing hangs.
    let e = tokio::time::timeout(CALL_TIMEOUT, fed.apply(&[dr("default", "reviews")]))
        .await
        .expect("an answer in time")
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("registry unavailable")
            || e.message().contains("registry unreachable"),
        "{}",
        e.message()
    );

    assert_eventually!(!fed.status().await.registry_reachable, OUTAGE_PATIENCE);
    assert_refused(
        fed.apply(&[dr("default", "reviews")]).await,
        Code::Unavailable,
        &["registry unreachable", "refuses writes"],
    );
    assert_refused(
        fed.delete(vec![pref("VirtualService", "default", "reviews")])
            .await,
        Code::Unavailable,
        &["registry unreachable"],
    );
    // A dry run needs the registry too, to compare.
    let e = fed.dry_run(&[dr("default", "reviews")]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // Validation still answers first: a bad document is INVALID_ARGUMENT, not UNAVAILABLE.
    assert_refused(
        fed.apply(&[vs("default", "reviews", -1, 1)]).await,
        Code::InvalidArgument,
        &["spec.http[0].route[0].weight"],
    );
    // The last known state is still served.
    assert_eq!(
        listed(&fed.list().await)
            .into_iter()
            .map(|(k, _, j)| (k, j))
            .collect::<Vec<_>>(),
        vec![(
            "VirtualService default/reviews".to_string(),
            canonical(&reviews)
        )]
    );

    fx = tokio::task::spawn_blocking(move || {
        fx.restart();
        fx
    })
    .await
    .unwrap();
    assert_eventually!(fed.status().await.registry_reachable, OUTAGE_PATIENCE);
    let r = fed.apply(&[dr("default", "reviews")]).await.unwrap();
    assert_eq!(
        changes(&r),
        pairs(&[("DestinationRule default/reviews", "created")])
    );
    fed.etcd = Some(fx);
}

/// Deleting the same document twice in one request is refused as a bad
/// request, as apply refuses it, not an internal error.
#[tokio::test]
async fn delete_with_a_repeated_ref_is_invalid_argument() {
    let mut fed = Fed::memory().await;
    fed.apply(&[dr("default", "reviews")]).await.unwrap();
    assert_refused(
        fed.delete(vec![
            pref("DestinationRule", "default", "reviews"),
            pref("DestinationRule", "default", "reviews"),
        ])
        .await,
        Code::InvalidArgument,
        &["DestinationRule default/reviews"],
    );
    assert_eq!(fed.list().await.len(), 1);
}

/// Deleting more documents than one transaction holds is refused as a bad
/// request saying at most 128, as apply does.
#[tokio::test]
async fn delete_of_more_than_128_is_invalid_argument() {
    let mut fed = Fed::memory().await;
    let docs: Vec<Value> = (0..129)
        .map(|i| dr("default", &format!("r{i:03}")))
        .collect();
    fed.apply(&docs[..128]).await.unwrap();
    fed.apply(&docs[128..]).await.unwrap();
    assert_refused(
        fed.delete(docs.iter().map(ref_of).collect()).await,
        Code::InvalidArgument,
        &["at most 128"],
    );
    assert_eq!(fed.list().await.len(), 129);
}
