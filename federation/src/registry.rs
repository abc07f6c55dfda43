//! The global endpoint registry: fedmesh's key layout and JSON values on top
//! of a [`Store`].
//!
//! ```text
//! /fedmesh/v1/clusters/<cluster>                       ClusterInfo
//! /fedmesh/v1/heartbeats/<cluster>                     Heartbeat, bound to the cluster's lease
//! /fedmesh/v1/endpoints/<ns>/<service>/<cluster>/<id>  Endpoint (with `lease_ttl_ms` when leased)
//! /fedmesh/v1/endpoint-leases/<ns>/<service>/<cluster>/<id>  EndpointLease, bound to the endpoint's lease
//! /fedmesh/v1/exports/<ns>/<service>/<cluster>         Export
//! /fedmesh/v1/policy/<kind>/<ns>/<name>                policy documents (compare-and-swap)
//! ```
//!
//! Values are JSON, readable with `etcdctl get --prefix /fedmesh/`. A value
//! that does not decode, or whose key and content disagree, is an
//! [`Entry::Invalid`]: callers skip it and say which key it was.

use crate::store::{self, CasOutcome, Expect, KeyValue, LeaseId, Revision, Store};
use mesh_api::v1 as api;
use mesh_core::cluster::ClusterInfo;
use mesh_core::convert::FieldError;
use mesh_core::endpoint::{Endpoint, EndpointKey};
use mesh_core::name::{ClusterName, EndpointId, Namespace, ServiceName};
use mesh_core::policy::{Document, Kind};
use mesh_core::service::ServiceKey;
use std::sync::Arc;
use std::time::Duration;

/// Root of every fedmesh key.
pub const ROOT: &str = "/fedmesh/v1/";

/// Key of a cluster's info.
pub fn cluster_key(c: &ClusterName) -> String {
    format!("{ROOT}clusters/{c}")
}

/// Key of a cluster's heartbeat.
pub fn heartbeat_key(c: &ClusterName) -> String {
    format!("{ROOT}heartbeats/{c}")
}

/// Key of an endpoint.
pub fn endpoint_key(k: &EndpointKey) -> String {
    format!(
        "{ROOT}endpoints/{}/{}/{}/{}",
        k.service.namespace, k.service.name, k.cluster, k.id
    )
}

/// Key of an endpoint's lease: present while the workload renews it.
pub fn endpoint_lease_key(k: &EndpointKey) -> String {
    format!(
        "{ROOT}endpoint-leases/{}/{}/{}/{}",
        k.service.namespace, k.service.name, k.cluster, k.id
    )
}

/// Key of a service's export from a cluster.
pub fn export_key(s: &ServiceKey, c: &ClusterName) -> String {
    format!("{ROOT}exports/{}/{}/{c}", s.namespace, s.name)
}

/// Key of a policy document.
pub fn policy_key(kind: &str, ns: &Namespace, name: &str) -> String {
    format!("{ROOT}policy/{kind}/{ns}/{name}")
}

/// Names a policy document: `/policy/<kind>/<ns>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// The kind, as Istio spells it.
    pub kind: Kind,
    /// The document's namespace.
    pub namespace: Namespace,
    /// The document's name.
    pub name: String,
}

impl PolicyKey {
    /// The key of `doc`.
    pub fn of(doc: &Document) -> Self {
        let (kind, namespace, name) = doc.key();
        Self {
            kind,
            namespace: namespace.clone(),
            name: name.to_string(),
        }
    }

    /// The registry key.
    pub fn key(&self) -> String {
        policy_key(self.kind.as_str(), &self.namespace, &self.name)
    }

    /// Parses a wire reference, naming the field (`field.kind`, ...) on refusal.
    pub fn from_api(r: &api::PolicyRef, field: &str) -> Result<Self, FieldError> {
        let kind = r
            .kind
            .parse::<Kind>()
            .map_err(|e| FieldError::new(format!("{field}.kind"), format!("{e}")))?;
        let namespace = Namespace::new(&r.namespace)
            .map_err(|e| FieldError::new(format!("{field}.namespace"), e.to_string()))?;
        if r.name.is_empty() || r.name.len() > 253 || r.name.contains('/') {
            return Err(FieldError::new(
                format!("{field}.name"),
                format!("{:?} is not a valid name", r.name),
            ));
        }
        Ok(Self {
            kind,
            namespace,
            name: r.name.clone(),
        })
    }
}

impl From<&PolicyKey> for api::PolicyRef {
    fn from(k: &PolicyKey) -> Self {
        Self {
            kind: k.kind.as_str().to_string(),
            namespace: k.namespace.to_string(),
            name: k.name.clone(),
        }
    }
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// A stored policy document, validated, in canonical JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPolicy {
    /// Its key.
    pub key: PolicyKey,
    /// The canonical JSON ([`Document::to_json`]).
    pub json: Arc<str>,
}

/// Value of a heartbeat key: who holds it and since when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    /// The cluster.
    pub cluster: ClusterName,
    /// Unix time in milliseconds when this lease's heartbeat started.
    pub since_unix_ms: i64,
    /// The federation replica that holds the lease.
    #[serde(default)]
    pub replica: String,
}

/// Value of an endpoint lease key: since when the lease is held, by which
/// replica.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointLease {
    /// Unix time in milliseconds when this lease started.
    pub since_unix_ms: i64,
    /// The federation replica that granted it.
    #[serde(default)]
    pub replica: String,
}

/// The lease an endpoint value says it lives on: its TTL in milliseconds,
/// or `None` for an endpoint without one (registered by an operator or by
/// Kubernetes discovery).
pub fn endpoint_lease_ttl_ms(value: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Marker {
        #[serde(default)]
        lease_ttl_ms: Option<u64>,
    }
    serde_json::from_slice::<Marker>(value)
        .ok()
        .and_then(|m| m.lease_ttl_ms)
        .filter(|t| *t > 0)
}

/// Value of an export key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Export {
    /// The exported service.
    pub service: ServiceKey,
    /// The exporting cluster.
    pub cluster: ClusterName,
}

/// A decoded registry entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// `/clusters/<cluster>`.
    Cluster(ClusterInfo),
    /// `/heartbeats/<cluster>`.
    Heartbeat(Heartbeat),
    /// `/endpoints/...`.
    Endpoint(Endpoint),
    /// `/exports/...`.
    Export(Export),
    /// `/policy/<kind>/...` of a kind this version knows.
    Policy(StoredPolicy),
    /// `/ca/trust`: the trust bundle (with the roots' sealed keys).
    Trust(std::sync::Arc<crate::trust::TrustRecord>),
    /// `/weights/<ns>/<service>`: the leader's weights.
    Weights(ServiceKey, std::sync::Arc<crate::traffic::ComputedWeights>),
    /// `/traffic/<ns>/<service>`: operator weights.
    Override(ServiceKey, crate::traffic::TrafficOverride),
    /// `/drain/<cluster>`.
    Drain(ClusterName, crate::traffic::Drain),
    /// `/load/<ns>/<service>/<cluster>/<id>`.
    Load(EndpointKey, crate::traffic::LoadReport),
    /// `/endpoint-leases/<ns>/<service>/<cluster>/<id>`.
    EndpointLease(EndpointKey, EndpointLease),
    /// `/probes/<cluster>`.
    Probes(ClusterName, crate::traffic::ProbeReport),
    /// `/subscribers/<replica>/<id>`: a replica's Discovery subscriber.
    Subscriber(String, String, crate::replicas::SubscriberRow),
    /// A key under [`ROOT`] that this version does not interpret (weights,
    /// audit, policy kinds it does not know, ...): kept out of the discovery state.
    Other,
    /// A value that could not be decoded.
    Invalid {
        /// Why.
        reason: String,
    },
}

/// What a key names, from its path alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyRef {
    /// A cluster's info.
    Cluster(ClusterName),
    /// A cluster's heartbeat.
    Heartbeat(ClusterName),
    /// An endpoint.
    Endpoint(EndpointKey),
    /// An export.
    Export(ServiceKey, ClusterName),
    /// A policy document.
    Policy(PolicyKey),
    /// The trust record.
    Trust,
    /// A service's computed weights.
    Weights(ServiceKey),
    /// A service's operator weights.
    Override(ServiceKey),
    /// A drained cluster.
    Drain(ClusterName),
    /// An endpoint's load report.
    Load(EndpointKey),
    /// An endpoint's lease.
    EndpointLease(EndpointKey),
    /// A gateway's probe report.
    Probes(ClusterName),
    /// A replica's subscriber: replica, connection id.
    Subscriber(String, String),
    /// Any other key.
    Other,
}

/// Parses a key's path. Errors say what part is wrong.
pub fn parse_key(key: &str) -> Result<KeyRef, String> {
    let Some(rest) = key.strip_prefix(ROOT) else {
        return Ok(KeyRef::Other);
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let e = |x: mesh_core::name::InvalidName| format!("key {key:?}: {x}");
    Ok(match parts.as_slice() {
        ["clusters", c] => KeyRef::Cluster(ClusterName::new(c).map_err(e)?),
        ["heartbeats", c] => KeyRef::Heartbeat(ClusterName::new(c).map_err(e)?),
        ["endpoints", ns, svc, c, id] => KeyRef::Endpoint(EndpointKey {
            service: ServiceKey::new(
                Namespace::new(ns).map_err(e)?,
                ServiceName::new(svc).map_err(e)?,
            ),
            cluster: ClusterName::new(c).map_err(e)?,
            id: EndpointId::new(id).map_err(e)?,
        }),
        ["exports", ns, svc, c] => KeyRef::Export(
            ServiceKey::new(
                Namespace::new(ns).map_err(e)?,
                ServiceName::new(svc).map_err(e)?,
            ),
            ClusterName::new(c).map_err(e)?,
        ),
        ["policy", kind, ns, name] => match kind.parse::<Kind>() {
            Ok(kind) if !name.is_empty() => KeyRef::Policy(PolicyKey {
                kind,
                namespace: Namespace::new(ns).map_err(e)?,
                name: (*name).to_string(),
            }),
            Ok(_) => return Err(format!("key {key:?} has an empty name")),
            // A kind a newer version writes: not ours to interpret.
            Err(_) => KeyRef::Other,
        },
        ["ca", "trust"] => KeyRef::Trust,
        ["weights", ns, svc] => KeyRef::Weights(ServiceKey::new(
            Namespace::new(ns).map_err(e)?,
            ServiceName::new(svc).map_err(e)?,
        )),
        ["traffic", ns, svc] => KeyRef::Override(ServiceKey::new(
            Namespace::new(ns).map_err(e)?,
            ServiceName::new(svc).map_err(e)?,
        )),
        ["drain", c] => KeyRef::Drain(ClusterName::new(c).map_err(e)?),
        ["probes", c] => KeyRef::Probes(ClusterName::new(c).map_err(e)?),
        ["endpoint-leases", ns, svc, c, id] => KeyRef::EndpointLease(EndpointKey {
            service: ServiceKey::new(
                Namespace::new(ns).map_err(e)?,
                ServiceName::new(svc).map_err(e)?,
            ),
            cluster: ClusterName::new(c).map_err(e)?,
            id: EndpointId::new(id).map_err(e)?,
        }),
        ["load", ns, svc, c, id] => KeyRef::Load(EndpointKey {
            service: ServiceKey::new(
                Namespace::new(ns).map_err(e)?,
                ServiceName::new(svc).map_err(e)?,
            ),
            cluster: ClusterName::new(c).map_err(e)?,
            id: EndpointId::new(id).map_err(e)?,
        }),
        ["subscribers", replica, id]
            if !replica.is_empty()
                && *replica == crate::replicas::key_segment(replica)
                && !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_digit()) =>
        {
            KeyRef::Subscriber((*replica).to_string(), (*id).to_string())
        }
        ["clusters" | "heartbeats" | "endpoints" | "endpoint-leases" | "exports" | "weights"
        | "traffic" | "drain" | "subscribers", ..] => {
            return Err(format!("key {key:?} does not have the layout of its kind"));
        }
        _ => KeyRef::Other,
    })
}

/// Registry key of an endpoint's load report.
pub fn load_key(k: &EndpointKey) -> String {
    format!(
        "{}{}/{}/{}/{}",
        crate::traffic::LOAD_PREFIX,
        k.service.namespace,
        k.service.name,
        k.cluster,
        k.id
    )
}

/// Decodes a key and its value into an [`Entry`], checking that they agree.
pub fn decode(key: &str, value: &[u8]) -> (KeyRef, Entry) {
    let r = match parse_key(key) {
        Ok(r) => r,
        Err(reason) => return (KeyRef::Other, Entry::Invalid { reason }),
    };
    let entry = match &r {
        KeyRef::Cluster(name) => match serde_json::from_slice::<ClusterInfo>(value) {
            Ok(c) if &c.name == name => Entry::Cluster(c),
            Ok(c) => invalid(format!(
                "name {:?} in the value does not match the key",
                c.name.as_str()
            )),
            Err(e) => invalid(format!("not a valid ClusterInfo: {e}")),
        },
        KeyRef::Heartbeat(name) => match serde_json::from_slice::<Heartbeat>(value) {
            Ok(h) if &h.cluster == name => Entry::Heartbeat(h),
            Ok(_) => invalid("cluster in the value does not match the key".into()),
            Err(e) => invalid(format!("not a valid Heartbeat: {e}")),
        },
        KeyRef::Endpoint(k) => match serde_json::from_slice::<Endpoint>(value) {
            Ok(ep) if &ep.key() != k => {
                invalid("service, cluster or id in the value does not match the key".into())
            }
            Ok(ep) => match ep.validate("endpoint") {
                Ok(()) => Entry::Endpoint(ep),
                Err(e) => invalid(e.to_string()),
            },
            Err(e) => invalid(format!("not a valid Endpoint: {e}")),
        },
        KeyRef::Export(svc, c) => match serde_json::from_slice::<Export>(value) {
            Ok(x) if &x.service == svc && &x.cluster == c => Entry::Export(x),
            Ok(_) => invalid("service or cluster in the value does not match the key".into()),
            Err(e) => invalid(format!("not a valid Export: {e}")),
        },
        KeyRef::Policy(k) => decode_policy(k, value),
        KeyRef::Weights(k) => match crate::traffic::decode("ComputedWeights", value) {
            Ok(w) => Entry::Weights(k.clone(), std::sync::Arc::new(w)),
            Err(e) => invalid(e),
        },
        KeyRef::Override(k) => match crate::traffic::decode("TrafficOverride", value) {
            Ok(o) => Entry::Override(k.clone(), o),
            Err(e) => invalid(e),
        },
        KeyRef::Probes(c) => match crate::traffic::decode("ProbeReport", value) {
            Ok(p) => Entry::Probes(c.clone(), p),
            Err(e) => invalid(e),
        },
        KeyRef::Load(k) => match crate::traffic::decode("LoadReport", value) {
            Ok(l) => Entry::Load(k.clone(), l),
            Err(e) => invalid(e),
        },
        KeyRef::EndpointLease(k) => match serde_json::from_slice::<EndpointLease>(value) {
            Ok(l) => Entry::EndpointLease(k.clone(), l),
            Err(e) => invalid(format!("not a valid EndpointLease: {e}")),
        },
        KeyRef::Drain(c) => match crate::traffic::decode("Drain", value) {
            Ok(d) => Entry::Drain(c.clone(), d),
            Err(e) => invalid(e),
        },
        KeyRef::Subscriber(replica, id) => {
            match serde_json::from_slice::<crate::replicas::SubscriberRow>(value) {
                Ok(row) => Entry::Subscriber(replica.clone(), id.clone(), row),
                Err(e) => invalid(format!("not a valid SubscriberRow: {e}")),
            }
        }
        KeyRef::Trust => match crate::trust::TrustRecord::decode(value) {
            Ok(t) => Entry::Trust(std::sync::Arc::new(t)),
            Err(e) => invalid(e),
        },
        KeyRef::Other => Entry::Other,
    };
    (r, entry)
}

fn decode_policy(k: &PolicyKey, value: &[u8]) -> Entry {
    let v: serde_json::Value = match serde_json::from_slice(value) {
        Ok(v) => v,
        Err(e) => return invalid(format!("not valid JSON: {e}")),
    };
    match Document::from_json(&v) {
        Ok(doc) if &PolicyKey::of(&doc) != k => invalid(format!(
            "the value is {}, which does not match the key",
            PolicyKey::of(&doc)
        )),
        Ok(doc) => Entry::Policy(StoredPolicy {
            key: k.clone(),
            json: doc.to_json().to_string().into(),
        }),
        Err(e) => invalid(format!("not a valid {}: {e}", k.kind.as_str())),
    }
}

fn invalid(reason: String) -> Entry {
    Entry::Invalid { reason }
}

/// An endpoint's JSON with its lease TTL beside its fields.
fn leased_json(ep: &Endpoint, ttl: Duration) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Leased<'a> {
        #[serde(flatten)]
        ep: &'a Endpoint,
        lease_ttl_ms: u64,
    }
    to_json(&Leased {
        ep,
        lease_ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Our value types are plain data (strings, numbers, maps with string
    // keys): serializing them cannot fail.
    serde_json::to_vec(v).expect("registry values serialize to JSON")
}

/// Typed writes to the registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
}

impl Registry {
    /// A registry over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Writes a cluster's info.
    pub async fn put_cluster(&self, c: &ClusterInfo) -> store::Result<Revision> {
        self.store
            .put(&cluster_key(&c.name), to_json(c), None)
            .await
    }

    /// Starts a heartbeat for `cluster`: a new lease with `ttl` and the
    /// heartbeat key bound to it.
    pub async fn start_heartbeat(
        &self,
        cluster: &ClusterName,
        ttl: Duration,
        replica: &str,
    ) -> store::Result<LeaseId> {
        let lease = self.store.grant_lease(ttl).await?;
        let hb = Heartbeat {
            cluster: cluster.clone(),
            since_unix_ms: now_unix_ms(),
            replica: replica.to_string(),
        };
        self.store
            .put(&heartbeat_key(cluster), to_json(&hb), Some(lease))
            .await?;
        Ok(lease)
    }

    /// Writes an endpoint.
    pub async fn put_endpoint(&self, ep: &Endpoint) -> store::Result<Revision> {
        self.store
            .put(&endpoint_key(&ep.key()), to_json(ep), None)
            .await
    }

    /// Writes an endpoint that lives on a lease of `ttl` (see
    /// [`Registry::start_endpoint_lease`]).
    pub async fn put_leased_endpoint(
        &self,
        ep: &Endpoint,
        ttl: Duration,
    ) -> store::Result<Revision> {
        self.store
            .put(&endpoint_key(&ep.key()), leased_json(ep, ttl), None)
            .await
    }

    /// Rewrites a leased endpoint's health if it is still at revision `at`
    /// (so a registration racing with it wins). `false` on a conflict.
    pub async fn mark_lapsed_endpoint(
        &self,
        ep: &Endpoint,
        ttl: Duration,
        at: Revision,
    ) -> store::Result<bool> {
        let out = self
            .store
            .compare_and_swap(
                &endpoint_key(&ep.key()),
                Expect::ModRevision(at),
                Some(leased_json(ep, ttl)),
            )
            .await?;
        Ok(matches!(out, CasOutcome::Swapped(_)))
    }

    /// Deletes an endpoint if it is still at revision `at`, with its load
    /// report. `false` on a conflict.
    pub async fn delete_endpoint_at(&self, k: &EndpointKey, at: Revision) -> store::Result<bool> {
        let out = self
            .store
            .compare_and_swap(&endpoint_key(k), Expect::ModRevision(at), None)
            .await?;
        if !matches!(out, CasOutcome::Swapped(_)) {
            return Ok(false);
        }
        // Its lease key went with its lease (that is why it is deleted);
        // one written since belongs to a registration racing with this.
        self.store.delete(&load_key(k)).await?;
        Ok(true)
    }

    /// Binds an endpoint's lease key to `lease` (a lease just renewed), or
    /// to a new lease with `ttl` when there is none; the lease.
    pub async fn hold_endpoint_lease(
        &self,
        k: &EndpointKey,
        lease: Option<LeaseId>,
        ttl: Duration,
        replica: &str,
    ) -> store::Result<LeaseId> {
        let lease = match lease {
            Some(l) => l,
            None => self.store.grant_lease(ttl).await?,
        };
        let l = EndpointLease {
            since_unix_ms: now_unix_ms(),
            replica: replica.to_string(),
        };
        self.store
            .put(&endpoint_lease_key(k), to_json(&l), Some(lease))
            .await?;
        Ok(lease)
    }

    /// The lease an endpoint's lease key is bound to, if the key is there.
    pub async fn endpoint_lease(&self, k: &EndpointKey) -> store::Result<Option<LeaseId>> {
        Ok(self
            .store
            .get(&endpoint_lease_key(k))
            .await?
            .filter(|kv| kv.lease != 0)
            .map(|kv| LeaseId(kv.lease)))
    }

    /// Deletes an endpoint; `None` if it was absent.
    pub async fn delete_endpoint(&self, k: &EndpointKey) -> store::Result<Option<Revision>> {
        let rev = self.store.delete(&endpoint_key(k)).await?;
        // Its load report and lease go with it (revoking the lease deletes
        // its key).
        self.store.delete(&load_key(k)).await?;
        if let Some(l) = self.endpoint_lease(k).await? {
            match self.store.revoke_lease(l).await {
                Ok(()) | Err(store::Error::LeaseNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.store.delete(&endpoint_lease_key(k)).await?;
        Ok(rev)
    }

    /// Deletes a cluster's info, heartbeat, drain and probe report (not its
    /// endpoints or exports).
    pub async fn delete_cluster(&self, c: &ClusterName) -> store::Result<Option<Revision>> {
        self.store.delete(&heartbeat_key(c)).await?;
        self.store
            .delete(&format!("{}{c}", crate::traffic::DRAIN_PREFIX))
            .await?;
        self.store
            .delete(&format!("{}{c}", crate::traffic::PROBES_PREFIX))
            .await?;
        self.store.delete(&cluster_key(c)).await
    }

    /// A cluster's stored info, if it decodes.
    pub async fn get_cluster(&self, c: &ClusterName) -> store::Result<Option<ClusterInfo>> {
        Ok(self
            .store
            .get(&cluster_key(c))
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }

    /// Stores a gateway's probe report.
    pub async fn put_probes(
        &self,
        from: &ClusterName,
        report: &crate::traffic::ProbeReport,
    ) -> store::Result<Revision> {
        self.store
            .put(
                &format!("{}{from}", crate::traffic::PROBES_PREFIX),
                to_json(report),
                None,
            )
            .await
    }

    /// Stores an endpoint's load report.
    pub async fn put_load(
        &self,
        k: &EndpointKey,
        report: &crate::traffic::LoadReport,
    ) -> store::Result<Revision> {
        self.store.put(&load_key(k), to_json(report), None).await
    }

    /// Marks a service exported from a cluster, or withdraws the export.
    pub async fn set_export(
        &self,
        svc: &ServiceKey,
        cluster: &ClusterName,
        exported: bool,
    ) -> store::Result<Option<Revision>> {
        let key = export_key(svc, cluster);
        if exported {
            let x = Export {
                service: svc.clone(),
                cluster: cluster.clone(),
            };
            self.store.put(&key, to_json(&x), None).await.map(Some)
        } else {
            self.store.delete(&key).await
        }
    }

    /// Writes a policy document only if the stored one is still at `expect`
    /// (compare-and-swap), so concurrent editors cannot overwrite each other.
    pub async fn put_policy(
        &self,
        kind: &str,
        ns: &Namespace,
        name: &str,
        expect: Expect,
        doc: &serde_json::Value,
    ) -> store::Result<CasOutcome> {
        self.store
            .compare_and_swap(&policy_key(kind, ns, name), expect, Some(to_json(doc)))
            .await
    }

    /// Reads a policy document with its revision.
    pub async fn get_policy(
        &self,
        kind: &str,
        ns: &Namespace,
        name: &str,
    ) -> store::Result<Option<KeyValue>> {
        self.store.get(&policy_key(kind, ns, name)).await
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip_and_mismatches_are_invalid() {
        let ep: Endpoint = serde_json::from_value(serde_json::json!({
            "id": "r1", "service": {"namespace": "default", "name": "reviews"}, "cluster": "c1",
            "address": "10.0.0.1", "ports": [{"number": 9080, "protocol": "http"}],
            "locality": {"region": "us-east", "zone": "us-east-1a"}
        }))
        .unwrap();
        let key = endpoint_key(&ep.key());
        assert_eq!(key, "/fedmesh/v1/endpoints/default/reviews/c1/r1");
        assert_eq!(decode(&key, &to_json(&ep)).1, Entry::Endpoint(ep.clone()));
        let (_, e) = decode("/fedmesh/v1/endpoints/default/reviews/c2/r1", &to_json(&ep));
        assert!(
            matches!(e, Entry::Invalid { reason } if reason.contains("does not match the key"))
        );
        let (_, e) = decode(&key, b"{not json");
        assert!(
            matches!(e, Entry::Invalid { reason } if reason.starts_with("not a valid Endpoint"))
        );
        let (_, e) = decode("/fedmesh/v1/endpoints/default/reviews", b"{}");
        assert!(matches!(e, Entry::Invalid { reason } if reason.contains("layout")));
        let (_, e) = decode("/fedmesh/v1/clusters/Bad_Name", b"{}");
        assert!(matches!(e, Entry::Invalid { reason } if reason.contains("invalid cluster name")));
        let (_, e) = decode("/fedmesh/v1/policy/VirtualService/default/x", b"{}");
        assert!(
            matches!(&e, Entry::Invalid { reason } if reason.starts_with("not a valid VirtualService")),
            "{e:?}"
        );
        assert_eq!(
            decode("/fedmesh/v1/policy/FutureKind/default/x", b"{}").1,
            Entry::Other
        );
        let vs = serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}
        });
        let (r, e) = decode(
            "/fedmesh/v1/policy/VirtualService/default/reviews",
            vs.to_string().as_bytes(),
        );
        assert!(matches!(r, KeyRef::Policy(_)));
        assert!(matches!(e, Entry::Policy(_)), "{e:?}");
        let (_, e) = decode(
            "/fedmesh/v1/policy/VirtualService/other/reviews",
            vs.to_string().as_bytes(),
        );
        assert!(
            matches!(&e, Entry::Invalid { reason } if reason.contains("does not match the key")),
            "{e:?}"
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever is written under /fedmesh/, decoding never panics.
        #[test]
        fn decode_never_panics(
            kind in prop_oneof!["clusters", "heartbeats", "endpoints", "exports", "policy", "\\PC{0,8}"],
            rest in "[a-z0-9/._-]{0,40}|\\PC{0,40}",
            value in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let key = format!("{ROOT}{kind}/{rest}");
            let _ = decode(&key, &value);
        }

        /// Near-valid JSON endpoint values never panic either.
        #[test]
        fn decode_json_shapes_never_panic(
            port in any::<i64>(), addr in "\\PC{0,20}", id in "\\PC{0,20}",
        ) {
            let v = serde_json::json!({
                "id": id, "service": {"namespace": "default", "name": "r"}, "cluster": "c1",
                "address": addr, "ports": [{"number": port}],
                "locality": {"region": "r", "zone": "z"}
            });
            let _ = decode("/fedmesh/v1/endpoints/default/r/c1/x", v.to_string().as_bytes());
        }
    }
}
