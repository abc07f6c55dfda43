//! The double's object store: resources it serves, objects by (namespace,
//! name), one resourceVersion counter for everything (as etcd's revision),
//! a bounded history of changes for watches, and what a LIST needs
//! (selectors, pages, snapshots at an older resourceVersion).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// A resource the double serves, as its discovery document would list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDef {
    /// The API group (`""` for the core group).
    pub group: String,
    /// The versions served; the first is the one objects are stored in.
    /// All serve the same objects (no conversion: `apiVersion` is rewritten).
    pub versions: Vec<String>,
    /// The resource name in paths: `services`, `endpointslices`.
    pub plural: String,
    /// `Service`.
    pub kind: String,
    /// `ServiceList`.
    pub list_kind: String,
    /// Namespaced (`/namespaces/NS/PLURAL`) or cluster-scoped.
    pub namespaced: bool,
    /// A custom resource (a CRD's): its list items keep `apiVersion` and
    /// `kind`, as the API server's unstructured lists do.
    pub custom: bool,
    /// The server keeps `metadata.generation` (bumped when anything but
    /// metadata and status changes): custom resources, EndpointSlices;
    /// not Services, Pods (before 1.33), Nodes, Namespaces, Events.
    pub generation: bool,
}

impl ResourceDef {
    /// A built-in resource (`group` `""` for core).
    pub fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            versions: vec![version.into()],
            plural: plural.into(),
            kind: kind.into(),
            list_kind: format!("{kind}List"),
            namespaced,
            custom: false,
            generation: false,
        }
    }

    /// A custom resource (namespaced, with a status subresource and a
    /// generation).
    pub fn custom(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self {
            custom: true,
            generation: true,
            ..Self::builtin(group, version, plural, kind, true)
        }
    }

    /// Serves these versions too (the same objects).
    #[must_use]
    pub fn also_served_as(mut self, versions: &[&str]) -> Self {
        self.versions
            .extend(versions.iter().map(ToString::to_string));
        self
    }

    /// `v1`, `discovery.k8s.io/v1`.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// The storage `apiVersion`.
    pub fn storage_api_version(&self) -> String {
        self.api_version(&self.versions[0])
    }

    /// `services`, `endpointslices.discovery.k8s.io`: how the API server
    /// names the resource in messages.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The collection path for `version`, in `namespace` or across all.
    pub fn path(&self, version: &str, namespace: Option<&str>) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{}/{version}", self.group)
        };
        match namespace {
            Some(ns) if self.namespaced => format!("{base}/namespaces/{ns}/{}", self.plural),
            _ => format!("{base}/{}", self.plural),
        }
    }

    pub(crate) fn id(&self) -> ResId {
        (self.group.clone(), self.plural.clone())
    }
}

/// What the double serves from the start: the resources the federation
/// watches, Events and the Multi-Cluster Services, Istio and fedmesh CRDs.
pub fn default_resources() -> Vec<ResourceDef> {
    let mut slices = ResourceDef::builtin(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
    );
    slices.generation = true;
    vec![
        ResourceDef::builtin("", "v1", "namespaces", "Namespace", false),
        ResourceDef::builtin("", "v1", "nodes", "Node", false),
        ResourceDef::builtin("", "v1", "services", "Service", true),
        ResourceDef::builtin("", "v1", "pods", "Pod", true),
        ResourceDef::builtin("", "v1", "events", "Event", true),
        slices,
        ResourceDef::custom(
            "multicluster.x-k8s.io",
            "v1alpha1",
            "serviceexports",
            "ServiceExport",
        ),
        ResourceDef::custom(
            "networking.istio.io",
            "v1",
            "virtualservices",
            "VirtualService",
        )
        .also_served_as(&["v1beta1", "v1alpha3"]),
        ResourceDef::custom(
            "networking.istio.io",
            "v1",
            "destinationrules",
            "DestinationRule",
        )
        .also_served_as(&["v1beta1", "v1alpha3"]),
        ResourceDef::custom("networking.istio.io", "v1", "sidecars", "Sidecar")
            .also_served_as(&["v1beta1", "v1alpha3"]),
        ResourceDef::custom(
            "security.istio.io",
            "v1",
            "authorizationpolicies",
            "AuthorizationPolicy",
        )
        .also_served_as(&["v1beta1"]),
        ResourceDef::custom(
            "security.istio.io",
            "v1",
            "peerauthentications",
            "PeerAuthentication",
        )
        .also_served_as(&["v1beta1"]),
        ResourceDef::custom(
            "security.istio.io",
            "v1",
            "requestauthentications",
            "RequestAuthentication",
        )
        .also_served_as(&["v1beta1"]),
        {
            let mut tw =
                ResourceDef::custom("fedmesh.io", "v1", "trafficweights", "TrafficWeights");
            tw.list_kind = "TrafficWeightsList".into();
            tw
        },
    ]
}

/// (group, plural): where a resource's objects are kept.
pub(crate) type ResId = (String, String);
/// (namespace, name); namespace `""` for cluster-scoped objects.
pub(crate) type Key = (String, String);

/// A watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One write, as the history keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) res: ResId,
    pub(crate) kind: EventKind,
    /// The object after the write (for a delete: its last state, with the
    /// delete's resourceVersion).
    pub(crate) object: Value,
    /// The object before the write.
    pub(crate) prev: Option<Value>,
}

/// Why a LIST cannot be answered.
#[derive(Debug)]
pub(crate) enum ListError {
    /// `410 Expired`.
    Expired(String),
    /// `504 Timeout`: a resourceVersion the server has not reached.
    TooLarge(u64, u64),
    /// `400 BadRequest`.
    BadRequest(String),
}

/// A page of a LIST.
pub(crate) struct Page {
    pub(crate) items: Vec<Value>,
    pub(crate) rv: u64,
    pub(crate) cont: Option<String>,
    pub(crate) remaining: Option<u64>,
}

/// The parameters of a LIST.
pub(crate) struct ListReq<'a> {
    pub(crate) namespace: Option<&'a str>,
    pub(crate) labels: &'a Selector,
    pub(crate) fields: &'a Selector,
    pub(crate) limit: Option<usize>,
    pub(crate) cont: Option<&'a str>,
    pub(crate) rv: Option<&'a str>,
    pub(crate) rv_match: Option<&'a str>,
}

pub(crate) struct Store {
    pub(crate) resources: Vec<ResourceDef>,
    objects: BTreeMap<ResId, BTreeMap<Key, Value>>,
    /// The last resourceVersion given out.
    pub(crate) rv: u64,
    /// Compacted up to here: a watch or list from an older resourceVersion
    /// is `410 Expired`.
    pub(crate) floor: u64,
    history: VecDeque<Change>,
    pub(crate) history_cap: usize,
    /// The newest resourceVersion dropped from the history for its bound.
    pub(crate) evicted: u64,
    /// How many times every open watch was expired, and the
    /// resourceVersion at the last time: a watch open then ends there
    /// (nothing written later reaches it).
    pub(crate) watches_expired: (u64, u64),
    /// Most items in one LIST page, whatever `limit` asks (None: `limit`).
    pub(crate) page_size: Option<usize>,
    pub(crate) bookmark_every: Duration,
    /// Events created over HTTP, in order.
    pub(crate) events: Vec<Value>,
}

impl Store {
    pub(crate) fn new() -> Self {
        Self {
            resources: default_resources(),
            objects: BTreeMap::new(),
            rv: 0,
            floor: 0,
            history: VecDeque::new(),
            history_cap: 10_000,
            evicted: 0,
            watches_expired: (0, 0),
            page_size: None,
            bookmark_every: Duration::from_secs(1),
            events: Vec::new(),
        }
    }

    /// The resource at `group`/`version`/`plural`, if served in that version.
    pub(crate) fn resource(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Option<&ResourceDef> {
        self.resources.iter().find(|r| {
            r.group == group && r.plural == plural && r.versions.iter().any(|v| v == version)
        })
    }

    /// The resource of objects with this `apiVersion` and `kind`.
    pub(crate) fn resource_of(
        &self,
        api_version: &str,
        kind: &str,
    ) -> Option<(ResourceDef, String)> {
        let (group, version) = split_api_version(api_version);
        self.resources
            .iter()
            .find(|r| r.group == group && r.kind == kind && r.versions.iter().any(|v| v == version))
            .map(|r| (r.clone(), version.to_string()))
    }

    pub(crate) fn get(&self, res: &ResourceDef, key: &Key) -> Option<&Value> {
        self.objects.get(&res.id()).and_then(|m| m.get(key))
    }

    /// Every object of `res`, by key.
    pub(crate) fn all(&self, res: &ResourceDef) -> Vec<Value> {
        self.objects
            .get(&res.id())
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes `new` at `key` (None deletes): a new resourceVersion and a
    /// history entry, or nothing when the object is unchanged (the API
    /// server does not write no-op updates).
    pub(crate) fn commit(
        &mut self,
        res: &ResourceDef,
        key: Key,
        new: Option<Value>,
    ) -> Option<Change> {
        let slot = self.objects.entry(res.id()).or_default();
        let prev = slot.get(&key).cloned();
        let (kind, object) = match new {
            Some(mut obj) => {
                if let Some(p) = &prev {
                    if without_rv(p) == without_rv(&obj) {
                        return None;
                    }
                }
                self.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                slot.insert(key, obj.clone());
                let kind = if prev.is_some() {
                    EventKind::Modified
                } else {
                    EventKind::Added
                };
                (kind, obj)
            }
            None => {
                let mut gone = slot.remove(&key)?;
                self.rv += 1;
                gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                (EventKind::Deleted, gone)
            }
        };
        let change = Change {
            rv: self.rv,
            res: res.id(),
            kind,
            object,
            prev,
        };
        self.history.push_back(change.clone());
        while self.history.len() > self.history_cap {
            if let Some(old) = self.history.pop_front() {
                self.evicted = old.rv;
            }
        }
        Some(change)
    }

    /// Changes of `res` after `after`, oldest first; Err(oldest kept - 1)
    /// when some of them are no longer in the history.
    pub(crate) fn changes_since(&self, res: &ResId, after: u64) -> Result<Vec<Change>, u64> {
        if after < self.evicted {
            return Err(self.evicted);
        }
        Ok(self
            .history
            .iter()
            .filter(|c| c.rv > after && &c.res == res)
            .cloned()
            .collect())
    }

    /// The objects of `res` as they were at resourceVersion `at`.
    fn snapshot(&self, res: &ResourceDef, at: u64) -> Result<BTreeMap<Key, Value>, ListError> {
        if at > self.rv {
            return Err(ListError::TooLarge(at, self.rv));
        }
        if at < self.floor || at < self.evicted {
            return Err(ListError::Expired(format!(
                "too old resource version: {at} ({})",
                self.floor.max(self.evicted)
            )));
        }
        let mut m = self.objects.get(&res.id()).cloned().unwrap_or_default();
        let id = res.id();
        for c in self.history.iter().rev() {
            if c.rv <= at {
                break;
            }
            if c.res != id {
                continue;
            }
            let key = key_of(&c.object);
            match (&c.kind, &c.prev) {
                (EventKind::Added, _) | (_, None) => {
                    m.remove(&key);
                }
                (_, Some(p)) => {
                    m.insert(key, p.clone());
                }
            }
        }
        Ok(m)
    }

    /// One page of a LIST.
    pub(crate) fn list(&self, res: &ResourceDef, req: &ListReq<'_>) -> Result<Page, ListError> {
        let (at, start) = match req.cont {
            Some(token) => {
                if req.rv.is_some_and(|v| !v.is_empty()) {
                    return Err(ListError::BadRequest(
                        "specifying resource version is not allowed when using continue".into(),
                    ));
                }
                let (rv, start) = decode_continue(token).ok_or_else(|| {
                    ListError::BadRequest("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)".into())
                })?;
                if rv < self.floor || rv < self.evicted {
                    return Err(ListError::Expired(CONTINUE_EXPIRED.into()));
                }
                (rv, Some(start))
            }
            None => {
                let asked = match req.rv {
                    None | Some("") => None,
                    Some(v) => Some(v.parse::<u64>().map_err(|_| {
                        ListError::BadRequest(format!("Invalid value: \"{v}\": resourceVersion: must be a non-negative integer"))
                    })?),
                };
                match (asked, req.rv_match) {
                    (Some(n), Some("Exact")) => (n, None),
                    (None, Some(m)) if !m.is_empty() => {
                        return Err(ListError::BadRequest(format!(
                            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided ({m})"
                        )))
                    }
                    (Some(n), _) if n > self.rv => return Err(ListError::TooLarge(n, self.rv)),
                    _ => (self.rv, None),
                }
            }
        };
        let objects = if at == self.rv {
            self.objects.get(&res.id()).cloned().unwrap_or_default()
        } else {
            self.snapshot(res, at)?
        };
        let limit = match (req.limit.filter(|l| *l > 0), self.page_size) {
            (Some(l), Some(p)) => Some(l.min(p)),
            (l, None) => l,
            (None, Some(p)) => Some(p),
        };
        let mut items = Vec::new();
        let mut last: Option<Key> = None;
        let mut more = false;
        let mut remaining = 0u64;
        for (key, obj) in &objects {
            if let Some(s) = &start {
                if key_string(key) <= *s {
                    continue;
                }
            }
            if req.namespace.is_some_and(|ns| ns != key.0) {
                continue;
            }
            if !req.labels.matches_labels(obj) || !req.fields.matches_fields(obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                more = true;
                remaining += 1;
                continue;
            }
            last = Some(key.clone());
            items.push(obj.clone());
        }
        let cont = if more {
            last.map(|k| encode_continue(at, &key_string(&k)))
        } else {
            None
        };
        // The API server counts what is left only when nothing filters.
        let remaining =
            (more && req.labels.is_empty() && req.fields.is_empty()).then_some(remaining);
        Ok(Page {
            items,
            rv: at,
            cont,
            remaining,
        })
    }
}

/// The API server's message for a continue token older than the compaction.
pub(crate) const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

/// `("discovery.k8s.io", "v1")`, `("", "v1")`.
pub(crate) fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.split_once('/').unwrap_or(("", api_version))
}

/// The (namespace, name) of an object.
pub(crate) fn key_of(obj: &Value) -> Key {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// etcd's key order: `namespace/name`, or `name` for cluster-scoped.
fn key_string(k: &Key) -> String {
    if k.0.is_empty() {
        k.1.clone()
    } else {
        format!("{}/{}", k.0, k.1)
    }
}

/// The API server's continue token: base64 of
/// `{"v":"meta.k8s.io/v1","rv":N,"start":"KEY\u0000"}`.
fn encode_continue(rv: u64, last: &str) -> String {
    // Go's field order: v, rv, start.
    let start = Value::String(format!("{last}\u{0}"));
    STANDARD.encode(format!(
        r#"{{"v":"meta.k8s.io/v1","rv":{rv},"start":{start}}}"#
    ))
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    let raw = STANDARD
        .decode(token)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(token))
        .ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    if v["v"] != "meta.k8s.io/v1" {
        return None;
    }
    let rv = v["rv"].as_u64()?;
    let start = v["start"].as_str()?.trim_end_matches('\u{0}').to_string();
    Some((rv, start))
}

fn without_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    v
}

/// The object less `metadata` and `status` (what a generation counts).
pub(crate) fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// A label or field selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selector(Vec<Req>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

impl Selector {
    /// A label selector: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`,
    /// `a notin (x,y)`, comma-separated (all must hold).
    pub(crate) fn labels(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let req = if let Some(k) = part.strip_prefix('!') {
                Req::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once(" notin ") {
                Req::NotIn(
                    k.trim().into(),
                    set_values(v).ok_or_else(|| format!("unable to parse requirement: {part}"))?,
                )
            } else if let Some((k, v)) = part.split_once(" in ") {
                Req::In(
                    k.trim().into(),
                    set_values(v).ok_or_else(|| format!("unable to parse requirement: {part}"))?,
                )
            } else if part.contains(char::is_whitespace) || part.contains('(') {
                return Err(format!("unable to parse requirement: {part}"));
            } else {
                Req::Exists(part)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// A field selector: `path=value`, `path==value`, `path!=value`,
    /// comma-separated; the path is looked up in the object
    /// (`metadata.name`, `metadata.namespace`, `spec.nodeName`, ...).
    pub(crate) fn fields(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Req::Eq(k.trim().into(), v.trim().into())
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
            Req::Ne(k, v) => get(k).as_deref() != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }

    pub(crate) fn matches_labels(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.matches(|k| labels.get(k).and_then(Value::as_str).map(str::to_string))
    }

    pub(crate) fn matches_fields(&self, obj: &Value) -> bool {
        self.matches(|path| {
            let mut v = obj;
            for seg in path.split('.') {
                v = v.get(seg)?;
            }
            Some(match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            })
        })
    }
}

/// Now, as the API server writes timestamps (`2026-01-02T03:04:05Z`).
pub(crate) fn now_rfc3339() -> String {
    rfc3339(jiff::Timestamp::now().as_second().unsigned_abs())
}

/// Seconds since the epoch as RFC 3339 UTC.
pub(crate) fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors() {
        let o = json!({"metadata": {"labels": {"app": "reviews", "version": "v1"}}});
        let ok = |s: &str| Selector::labels(s).unwrap().matches_labels(&o);
        assert!(ok("app=reviews"));
        assert!(ok("app==reviews,version"));
        assert!(ok("app!=ratings"));
        assert!(ok("!missing"));
        assert!(ok("version in (v1, v2)"));
        assert!(ok("version notin (v3)"));
        assert!(ok("missing notin (v3)"));
        assert!(!ok("app=ratings"));
        assert!(!ok("missing"));
        assert!(!ok("!app"));
        assert!(ok(""));
        assert!(Selector::labels("a in b").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = json!({"metadata": {"name": "n", "namespace": "ns"}, "spec": {"nodeName": "a"}});
        let ok = |s: &str| Selector::fields(s).unwrap().matches_fields(&o);
        assert!(ok("metadata.name=n"));
        assert!(ok("metadata.name=n,metadata.namespace==ns"));
        assert!(ok("spec.nodeName!=b"));
        assert!(!ok("metadata.name=m"));
        assert!(Selector::fields("metadata.name").is_err());
    }

    #[test]
    fn merge_patches() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        merge_patch(
            &mut t,
            &json!({"a": null, "b": {"c": 4}, "l": [3], "n": "x"}),
        );
        assert_eq!(t, json!({"b": {"c": 4, "d": 3}, "l": [3], "n": "x"}));
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(42, "bookinfo/reviews");
        assert_eq!(decode_continue(&t), Some((42, "bookinfo/reviews".into())));
        assert_eq!(decode_continue("garbage"), None);
    }

    #[test]
    fn pages_and_snapshots() {
        let mut s = Store::new();
        let svc = s.resource("", "v1", "services").unwrap().clone();
        for n in ["a", "b", "c"] {
            let o = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": n, "namespace": "ns"}});
            s.commit(&svc, key_of(&o), Some(o));
        }
        let none = Selector::default();
        let req = |cont: Option<&'static str>| ListReq {
            namespace: None,
            labels: &none,
            fields: &none,
            limit: Some(2),
            cont,
            rv: None,
            rv_match: None,
        };
        let p1 = s.list(&svc, &req(None)).unwrap();
        assert_eq!(p1.items.len(), 2);
        assert_eq!(p1.remaining, Some(1));
        let token: &'static str = Box::leak(p1.cont.unwrap().into_boxed_str());
        // A write between the pages does not show in the second one.
        s.commit(&svc, ("ns".into(), "c".into()), None);
        let p2 = s.list(&svc, &req(Some(token))).unwrap();
        assert_eq!(p2.items.len(), 1);
        assert_eq!(p2.items[0]["metadata"]["name"], "c");
        assert_eq!(p2.rv, 3);
        assert!(p2.cont.is_none());
        s.floor = s.rv;
        assert!(matches!(
            s.list(&svc, &req(Some(token))),
            Err(ListError::Expired(_))
        ));
    }
}
