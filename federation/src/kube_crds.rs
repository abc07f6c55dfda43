//! Policy as Kubernetes custom resources (`--watch-crds`): the federation
//! watches the Istio-shaped kinds and fedmesh's `TrafficWeights` in its
//! cluster and feeds every change through the same validation and atomic
//! apply as `meshctl apply` (the Admin API's `ApplyPolicies`, called in
//! process), deletions through `DeletePolicies`.
//!
//! The outcome is written back where `kubectl` shows it: an `Accepted`
//! condition in the resource's status (`True` with the revision, or `False`
//! with the validation errors), and for a refusal a `Warning` Event on the
//! resource. Status writes do not change a resource's `generation`, so they
//! are not applied again.
//!
//! A resource deleted while its watch was broken is deleted from the
//! registry when the watch relists (the watcher's restart shows what is
//! gone). One deleted while this replica was not running stays in the
//! registry until deleted with `meshctl delete`: the registry is shared by
//! every cluster's federation, so a replica cannot tell another cluster's
//! documents from stale ones of its own.

use k8s_openapi::api::core::v1::{Event as K8sEvent, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use mesh_api::v1 as api;
use mesh_api::v1::admin_server::Admin as _;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tracing::{info, warn};

/// The custom resources watched: (group, version, kind, plural). Istio's
/// kinds at their `v1` (the CRDs serve `v1beta1`/`v1alpha3` as well; the
/// API server converts).
pub const KINDS: &[(&str, &str, &str, &str)] = &[
    (
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    ("networking.istio.io", "v1", "Sidecar", "sidecars"),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "security.istio.io",
        "v1",
        "RequestAuthentication",
        "requestauthentications",
    ),
    ("fedmesh.io", "v1", "TrafficWeights", "trafficweights"),
];

/// Who writes the Events.
const COMPONENT: &str = "fedmesh-federation";

/// The document `meshctl apply` would send for this resource: its
/// `apiVersion`, `kind`, `metadata` (name, namespace) and `spec`; the
/// status and the server's metadata are not policy.
pub fn document(obj: &DynamicObject, ar: &ApiResource) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "metadata": {
            "name": obj.name_any(),
            "namespace": obj.namespace().unwrap_or_else(|| "default".into()),
        },
        "spec": obj.data.get("spec").cloned().unwrap_or(serde_json::Value::Null),
    })
}

type Ref = (String, String); // (namespace, name)

/// One kind's watch.
struct Kind {
    ar: ApiResource,
    client: kube::Client,
    admin: Arc<crate::grpc::admin::AdminService>,
    cluster: String,
    /// Applied resources and the generation applied.
    applied: BTreeMap<Ref, i64>,
    /// Seen since the watch (re)started listing.
    listing: Option<BTreeSet<Ref>>,
    /// Not applied for a reason other than what they say (the registry
    /// out of reach, a conflict): tried again every [`RETRY`].
    retry: BTreeMap<Ref, DynamicObject>,
}

/// How often resources not applied for a transient reason are tried again.
pub const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl Kind {
    fn policy_ref(&self, r: &Ref) -> api::PolicyRef {
        api::PolicyRef {
            kind: self.ar.kind.clone(),
            namespace: r.0.clone(),
            name: r.1.clone(),
        }
    }

    /// A resource added or changed (`retrying`: tried again by the timer).
    async fn applied(&mut self, obj: DynamicObject, retrying: bool) {
        let r: Ref = (
            obj.namespace().unwrap_or_else(|| "default".into()),
            obj.name_any(),
        );
        if let Some(seen) = &mut self.listing {
            seen.insert(r.clone());
        }
        let generation = obj.metadata.generation.unwrap_or(0);
        if self.applied.get(&r) == Some(&generation) {
            return; // a status write, or a relist of what is applied
        }
        if !retrying {
            if let Some(waiting) = self.retry.get_mut(&r) {
                if waiting.metadata.generation == obj.metadata.generation {
                    // Our own status write on a resource waiting for its
                    // retry: the timer tries it, not every write.
                    *waiting = obj;
                    return;
                }
            }
        }
        let doc = document(&obj, &self.ar);
        let source = format!(
            "Kubernetes {} {}/{} in {}",
            self.ar.kind, r.0, r.1, self.cluster
        );
        let req = api::ApplyPoliciesRequest {
            source: source.clone(),
            documents: vec![api::PolicyDocument {
                r#ref: Some(self.policy_ref(&r)),
                json: doc.to_string(),
                revision: 0,
            }],
            dry_run: false,
        };
        let outcome = self.admin.apply_policies(tonic::Request::new(req)).await;
        let (ok, reason, message) = match &outcome {
            Ok(resp) => {
                let resp = resp.get_ref();
                let action = resp
                    .changes
                    .first()
                    .map_or("unchanged", |c| c.action.as_str());
                (
                    true,
                    "Applied",
                    format!(
                        "{action} in the fedmesh registry at revision {}",
                        resp.revision
                    ),
                )
            }
            Err(s) => (
                false,
                if s.code() == tonic::Code::InvalidArgument {
                    "Invalid"
                } else {
                    "NotApplied"
                },
                s.message().to_string(),
            ),
        };
        let failed_before = self.retry.remove(&r).is_some();
        if ok {
            info!(%source, "{message}");
            self.applied.insert(r.clone(), generation);
        } else {
            warn!(%source, "refused: {message}");
            if reason == "Invalid" {
                // Refused for what it says: not retried until it changes;
                // the version applied before (if any) stays in effect.
                self.applied.insert(r.clone(), generation);
            } else {
                self.retry.insert(r.clone(), obj.clone());
            }
            if retrying && failed_before {
                return; // still failing: its Event and status are written
            }
            self.event(&obj, reason, &message).await;
        }
        self.status(&r, ok, reason, &message, generation).await;
    }

    async fn deleted(&mut self, r: Ref) {
        self.applied.remove(&r);
        self.retry.remove(&r);
        let req = api::DeletePoliciesRequest {
            refs: vec![self.policy_ref(&r)],
        };
        match self.admin.delete_policies(tonic::Request::new(req)).await {
            Ok(_) => info!(kind = %self.ar.kind, "{}/{} deleted from the registry", r.0, r.1),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => warn!(kind = %self.ar.kind, "deleting {}/{}: {}", r.0, r.1, s.message()),
        }
    }

    async fn status(&self, r: &Ref, ok: bool, reason: &str, message: &str, generation: i64) {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &r.0, &self.ar);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let patch = serde_json::json!({
            "status": {
                "conditions": [{
                    "type": "Accepted",
                    "status": if ok { "True" } else { "False" },
                    "reason": reason,
                    "message": message,
                    "observedGeneration": generation,
                    "lastTransitionTime": now,
                }]
            }
        });
        if let Err(e) = api
            .patch_status(&r.1, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(kind = %self.ar.kind, "status of {}/{}: {e}", r.0, r.1);
        }
    }

    async fn event(&self, obj: &DynamicObject, reason: &str, message: &str) {
        let ns = obj.namespace().unwrap_or_else(|| "default".into());
        let now = k8s_openapi::jiff::Timestamp::now();
        let name = obj.name_any();
        let ev = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some(self.ar.api_version.clone()),
                kind: Some(self.ar.kind.clone()),
                name: Some(name),
                namespace: Some(ns.clone()),
                uid: obj.metadata.uid.clone(),
                resource_version: obj.metadata.resource_version.clone(),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.chars().take(1024).collect()),
            type_: Some("Warning".into()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
            action: Some("Apply".into()),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some(self.cluster.clone()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some(COMPONENT.into()),
                host: None,
            }),
            ..Default::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            warn!("an Event for {} {}: {e}", self.ar.kind, obj.name_any());
        }
    }

    async fn run(mut self) {
        use futures::StreamExt as _;
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &self.ar);
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ev = tokio::select! {
                ev = stream.next() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = retry.tick(), if !self.retry.is_empty() => {
                    let again: Vec<DynamicObject> = self.retry.values().cloned().collect();
                    for o in again {
                        self.applied(o, true).await;
                    }
                    continue;
                }
            };
            match ev {
                Ok(watcher::Event::Init) => self.listing = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => {
                    self.applied(o, false).await;
                }
                Ok(watcher::Event::InitDone) => {
                    // What was applied and is not listed any more was
                    // deleted while the watch was broken.
                    let seen = self.listing.take().unwrap_or_default();
                    let gone: Vec<Ref> = self
                        .applied
                        .keys()
                        .chain(self.retry.keys())
                        .filter(|r| !seen.contains(*r))
                        .cloned()
                        .collect();
                    for r in gone {
                        self.deleted(r).await;
                    }
                }
                Ok(watcher::Event::Delete(o)) => {
                    let r = (
                        o.namespace().unwrap_or_else(|| "default".into()),
                        o.name_any(),
                    );
                    self.deleted(r).await;
                }
                Err(e) => warn!(kind = %self.ar.kind, "Kubernetes watch failed (relisting): {e}"),
            }
        }
    }
}

/// The running watches.
pub struct Crds {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Crds {
    /// Starts one watch per kind whose CRD is installed. A kind whose CRD
    /// is not (`404`) is logged and not watched (installing it later needs
    /// a restart); a kind the federation may not list (`401`/`403`: its
    /// RBAC grant) fails the start with the API server's message.
    pub async fn start(
        client: &kube::Client,
        admin: Arc<crate::grpc::admin::AdminService>,
        cluster: &str,
    ) -> anyhow::Result<Self> {
        let mut kinds = Vec::new();
        for (g, v, k, plural) in KINDS {
            let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), plural);
            let probe: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            match probe.list_metadata(&ListParams::default().limit(1)).await {
                Ok(_) => kinds.push(ar),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    info!("the {k} CRD ({plural}.{g}) is not installed: {k} resources are not watched");
                }
                Err(kube::Error::Api(s)) => anyhow::bail!(
                    "the Kubernetes API refused to list {plural}.{g}: {} ({})",
                    s.message,
                    s.code
                ),
                Err(e) => anyhow::bail!("listing {plural}.{g}: {e}"),
            }
        }
        let tasks = kinds
            .into_iter()
            .map(|ar| {
                let kind = Kind {
                    ar,
                    client: client.clone(),
                    admin: admin.clone(),
                    cluster: cluster.to_string(),
                    applied: BTreeMap::new(),
                    listing: None,
                    retry: BTreeMap::new(),
                };
                tokio::spawn(kind.run())
            })
            .collect();
        Ok(Self { tasks })
    }

    /// How many kinds are watched.
    pub fn watched(&self) -> usize {
        self.tasks.len()
    }
}

impl Drop for Crds {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A VirtualService as the API server serves it (server metadata and a
    /// status included) becomes the document `meshctl apply` would send:
    /// it validates, and the server's fields and the status are gone.
    #[test]
    fn a_custom_resource_becomes_the_applied_document() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {
                "name": "reviews", "namespace": "shop", "uid": "6f1c2a4e-0000-4000-8000-000000000001",
                "resourceVersion": "4711", "generation": 3,
                "creationTimestamp": "2026-11-20T10:00:00Z",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}
            },
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}]},
            "status": {"conditions": [{"type": "Accepted", "status": "True"}]}
        }))
        .unwrap();
        let (g, v, k, p) = KINDS[0];
        let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), p);
        let doc = document(&obj, &ar);
        assert_eq!(
            doc["metadata"],
            serde_json::json!({"name": "reviews", "namespace": "shop"})
        );
        assert!(doc.get("status").is_none());
        let parsed = mesh_core::policy::Document::from_json(&doc).unwrap();
        assert_eq!(parsed.kind.as_str(), "VirtualService");
        assert_eq!(
            (parsed.name.as_str(), parsed.namespace.as_str()),
            ("reviews", "shop")
        );
    }
}
