//! The REST side of the double: the API server's request info (verb,
//! resource, namespace, name, subresource from the path), RBAC-like
//! authorization, and GET/LIST/WATCH/POST/PATCH/PUT/DELETE on the store.

use super::store::{
    key_of, merge_patch, now_rfc3339, spec_part, Change, EventKind, Key, ListError, ListReq,
    ResourceDef, Selector,
};
use super::{lock, Shared};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

/// Response bodies: whole, or a watch stream (an error cuts the connection).
pub(crate) type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// What the test tells open watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Cut the connection mid-stream.
    Cut,
    /// End the stream as a server timeout does.
    End,
    /// Send `ERROR 410 Expired` and end.
    Expire,
    /// Send a bookmark now.
    Bookmark,
}

pub(crate) fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A `v1` `Status` failure object.
pub(crate) fn status_object(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Value {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    body
}

fn failure(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Body> {
    json_response(
        code,
        &status_object(code.as_u16(), reason, message, details),
    )
}

/// The 404 for a path that names nothing served.
pub(crate) fn not_served() -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

/// `details` as the API server fills them (empty fields left out).
fn details(name: Option<&str>, group: &str, kind: &str) -> Value {
    let mut d = json!({});
    if let Some(n) = name.filter(|n| !n.is_empty()) {
        d["name"] = json!(n);
    }
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    d["kind"] = json!(kind);
    d
}

/// The query string, decoded.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(q: Option<&str>) -> Self {
        Self(
            q.unwrap_or_default()
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space).
pub(crate) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the API server's request-info filter makes of a path.
#[derive(Debug, Clone)]
pub(crate) struct RequestInfo {
    pub(crate) verb: &'static str,
    pub(crate) group: String,
    pub(crate) version: String,
    pub(crate) resource: String,
    pub(crate) subresource: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
}

impl RequestInfo {
    /// None: not a resource path (`/version`, `/apis`, ...).
    pub(crate) fn parse(method: &Method, path: &str, q: &Query) -> Option<Self> {
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (group, version, mut rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let mut namespace = None;
        if rest.first() == Some(&"namespaces") && rest.len() > 1 {
            namespace = Some(rest[1].to_string());
            // namespaces/NAME/status and /finalize are the namespace's own
            // subresources.
            if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
                rest = &rest[2..];
            }
        }
        let (resource, name, subresource) = match rest {
            [r] => (*r, None, None),
            [r, n] => (*r, Some(n.to_string()), None),
            [r, n, s] => (*r, Some(n.to_string()), Some(s.to_string())),
            _ => return None,
        };
        let verb = match (method.as_str(), name.is_some()) {
            ("GET" | "HEAD", true) => "get",
            ("GET" | "HEAD", false) if q.flag("watch") => "watch",
            ("GET" | "HEAD", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => "unknown",
        };
        Some(Self {
            verb,
            group: group.into(),
            version: version.into(),
            resource: resource.into(),
            subresource,
            namespace,
            name,
        })
    }

    /// `services`, `trafficweights/status`.
    fn resource_path(&self) -> String {
        match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// The RBAC denial, worded as the API server's authorizer does.
    pub(crate) fn forbidden(&self, user: &str) -> Response<Body> {
        let gr = if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let target = match &self.name {
            Some(n) => format!("{gr} \"{n}\""),
            None => gr,
        };
        let scope = match &self.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        let message = format!(
            "{target} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            self.verb,
            self.resource_path(),
            self.group
        );
        failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &message,
            Some(details(self.name.as_deref(), &self.group, &self.resource)),
        )
    }

    /// Whether `rules` ((verb, group, resource), `*` for any) allow it.
    pub(crate) fn allowed_by(&self, rules: &[(String, String, String)]) -> bool {
        let res = self.resource_path();
        rules.iter().any(|(v, g, r)| {
            (v == "*" || v == self.verb)
                && (g == "*" || *g == self.group)
                && (r == "*" || *r == res)
        })
    }
}

/// An object as served in `version`: `apiVersion` and `kind` set.
pub(crate) fn render(res: &ResourceDef, version: &str, obj: &Value) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(res.api_version(version));
    o["kind"] = json!(res.kind);
    o
}

/// A list item: built-in lists leave `apiVersion` and `kind` out; custom
/// resources' (unstructured) lists keep them.
fn render_item(res: &ResourceDef, version: &str, obj: &Value) -> Value {
    let mut o = render(res, version, obj);
    if !res.custom {
        if let Some(m) = o.as_object_mut() {
            m.remove("apiVersion");
            m.remove("kind");
        }
    }
    o
}

fn not_found(res: &ResourceDef, name: &str) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", res.group_resource()),
        Some(details(Some(name), &res.group, &res.plural)),
    )
}

fn bad_request(message: &str) -> Response<Body> {
    failure(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

fn list_error(e: ListError) -> Response<Body> {
    match e {
        ListError::Expired(m) => failure(StatusCode::GONE, "Expired", &m, None),
        ListError::TooLarge(asked, current) => failure(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            &format!("Too large resource version: {asked}, current: {current}"),
            Some(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1
            })),
        ),
        ListError::BadRequest(m) => bad_request(&m),
    }
}

/// The key of the object `info` names in `res`.
fn key(res: &ResourceDef, info: &RequestInfo) -> Key {
    let name = info.name.clone().unwrap_or_default();
    if res.namespaced {
        (info.namespace.clone().unwrap_or_default(), name)
    } else {
        (String::new(), name)
    }
}

fn publish(sh: &Shared, change: Option<&Change>) {
    if let Some(c) = change {
        sh.changed.send_replace(c.rv);
    }
}

/// Serves a resource request from an authenticated, authorized caller.
pub(crate) fn serve(
    sh: &Shared,
    info: &RequestInfo,
    q: &Query,
    content_type: Option<&str>,
    body: &Value,
) -> Response<Body> {
    let res = {
        let s = lock(sh);
        s.store
            .resource(&info.group, &info.version, &info.resource)
            .cloned()
    };
    let Some(res) = res else {
        return not_served();
    };
    // A namespace in the path of a cluster-scoped resource (other than a
    // Namespace's own) names nothing.
    if !res.namespaced
        && info.namespace.is_some()
        && !(res.group.is_empty() && res.plural == "namespaces")
    {
        return not_served();
    }
    if info.subresource.as_deref().is_some_and(|s| s != "status")
        || (info.subresource.is_some() && res.group.is_empty() && res.plural == "events")
    {
        return not_served();
    }
    match info.verb {
        "list" => list(sh, &res, info, q),
        "watch" => watch(sh, &res, info, q),
        "get" => {
            let k = key(&res, info);
            let s = lock(sh);
            match s.store.get(&res, &k) {
                Some(o) => json_response(StatusCode::OK, &render(&res, &info.version, o)),
                None => not_found(&res, &k.1),
            }
        }
        "create" if info.name.is_none() => create(sh, &res, info, body),
        "patch" => patch(sh, &res, info, content_type, body),
        "update" => update(sh, &res, info, body),
        "delete" => {
            let k = key(&res, info);
            let mut s = lock(sh);
            let change = s.store.commit(&res, k.clone(), None);
            drop(s);
            publish(sh, change.as_ref());
            match change {
                Some(c) => json_response(StatusCode::OK, &render(&res, &info.version, &c.object)),
                None => not_found(&res, &k.1),
            }
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(details(None, &res.group, &res.plural)),
        ),
    }
}

fn selectors(q: &Query) -> Result<(Selector, Selector), Box<Response<Body>>> {
    let labels = Selector::labels(q.get("labelSelector").unwrap_or_default())
        .map_err(|e| Box::new(bad_request(&e)))?;
    let fields = Selector::fields(q.get("fieldSelector").unwrap_or_default())
        .map_err(|e| Box::new(bad_request(&e)))?;
    Ok((labels, fields))
}

fn list(sh: &Shared, res: &ResourceDef, info: &RequestInfo, q: &Query) -> Response<Body> {
    let (labels, fields) = match selectors(q) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let limit = match q.get("limit").filter(|l| !l.is_empty()) {
        None => None,
        Some(l) => match l.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => return bad_request(&format!("invalid limit: {l}")),
        },
    };
    let namespace = if res.namespaced {
        info.namespace.as_deref()
    } else {
        None
    };
    let req = ListReq {
        namespace,
        labels: &labels,
        fields: &fields,
        limit,
        cont: q.get("continue").filter(|c| !c.is_empty()),
        rv: q.get("resourceVersion"),
        rv_match: q.get("resourceVersionMatch"),
    };
    let page = match lock(sh).store.list(res, &req) {
        Ok(p) => p,
        Err(e) => return list_error(e),
    };
    let mut meta = json!({ "resourceVersion": page.rv.to_string() });
    if let Some(c) = page.cont {
        meta["continue"] = json!(c);
    }
    if let Some(n) = page.remaining {
        meta["remainingItemCount"] = json!(n);
    }
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|o| render_item(res, &info.version, o))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": res.list_kind,
            "apiVersion": res.api_version(&info.version),
            "metadata": meta,
            "items": items,
        }),
    )
}

/// Generates a name the way the API server does for `generateName`.
fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String = (0..5)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}

/// Checks `apiVersion`/`kind` of a body against the resource.
fn check_types(res: &ResourceDef, version: &str, body: &Value) -> Result<(), Box<Response<Body>>> {
    if !body.is_object() {
        return Err(Box::new(bad_request(
            "the body of the request was in an unknown format - accepted media types include: \
             application/json, application/yaml, application/vnd.kubernetes.protobuf",
        )));
    }
    let av = body["apiVersion"].as_str().unwrap_or_default();
    let kind = body["kind"].as_str().unwrap_or_default();
    if (!av.is_empty() && av != res.api_version(version)) || (!kind.is_empty() && kind != res.kind)
    {
        return Err(Box::new(bad_request(&format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            res.api_version(version)
        ))));
    }
    Ok(())
}

fn create(sh: &Shared, res: &ResourceDef, info: &RequestInfo, body: &Value) -> Response<Body> {
    if let Err(r) = check_types(res, &info.version, body) {
        return *r;
    }
    let mut obj = body.clone();
    let ns = if res.namespaced {
        let Some(ns) = info.namespace.clone() else {
            return failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                Some(details(None, &res.group, &res.plural)),
            );
        };
        match obj["metadata"]["namespace"].as_str() {
            Some(b) if !b.is_empty() && b != ns => {
                return bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            }
            _ => {}
        }
        obj["metadata"]["namespace"] = json!(ns);
        ns
    } else {
        String::new()
    };
    let name = match obj["metadata"]["name"].as_str().filter(|n| !n.is_empty()) {
        Some(n) => n.to_string(),
        None => match obj["metadata"]["generateName"].as_str().filter(|n| !n.is_empty()) {
            Some(p) => generate_name(p),
            None => {
                return failure(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    &format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        res.kind
                    ),
                    Some(json!({
                        "group": res.group, "kind": res.kind,
                        "causes": [{"reason": "FieldValueRequired", "message": "Required value: name or generateName is required", "field": "metadata.name"}]
                    })),
                )
            }
        },
    };
    obj["metadata"]["name"] = json!(name);
    let mut s = lock(sh);
    // The NamespaceLifecycle admission plugin.
    if res.namespaced {
        let nsres = s.store.resource("", "v1", "namespaces").cloned();
        let exists = nsres.is_some_and(|r| s.store.get(&r, &(String::new(), ns.clone())).is_some());
        if !exists {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("namespaces \"{ns}\" not found"),
                Some(details(Some(&ns), "", "namespaces")),
            );
        }
    }
    let k: Key = (ns, name.clone());
    if s.store.get(res, &k).is_some() {
        return failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", res.group_resource()),
            Some(details(Some(&name), &res.group, &res.plural)),
        );
    }
    if res.custom {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    fill_server_fields(res, &mut obj, None);
    let change = s.store.commit(res, k, Some(obj));
    if let Some(c) = &change {
        if res.group.is_empty() && res.plural == "events" {
            s.store.events.push(render(res, &info.version, &c.object));
        }
    }
    drop(s);
    publish(sh, change.as_ref());
    match change {
        Some(c) => json_response(StatusCode::CREATED, &render(res, &info.version, &c.object)),
        None => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "not written",
            None,
        ),
    }
}

/// Sets what the server owns: on create `uid`, `creationTimestamp`,
/// `generation`; on update the old values of those, the generation bumped
/// when the spec changed.
pub(crate) fn fill_server_fields(res: &ResourceDef, obj: &mut Value, prev: Option<&Value>) {
    obj["apiVersion"] = json!(res.storage_api_version());
    obj["kind"] = json!(res.kind);
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    match prev {
        None => {
            if obj["metadata"]["uid"].as_str().is_none_or(str::is_empty) {
                obj["metadata"]["uid"] = json!(super::uid());
            }
            if obj["metadata"]["creationTimestamp"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
            }
            if res.generation && obj["metadata"]["generation"].as_i64().is_none() {
                obj["metadata"]["generation"] = json!(1);
            }
        }
        Some(p) => {
            for f in ["uid", "creationTimestamp"] {
                obj["metadata"][f] = p["metadata"][f].clone();
            }
            if res.generation {
                let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
                let bumped = spec_part(p) != spec_part(obj);
                obj["metadata"]["generation"] = json!(if bumped { g + 1 } else { g });
            }
        }
    }
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.retain(|_, v| !v.is_null());
    }
}

/// `409 Conflict` when the body names another resourceVersion.
fn precondition(
    res: &ResourceDef,
    name: &str,
    body: &Value,
    current: &Value,
) -> Result<(), Box<Response<Body>>> {
    match body["metadata"]["resourceVersion"].as_str() {
        Some(rv)
            if !rv.is_empty() && Some(rv) != current["metadata"]["resourceVersion"].as_str() =>
        {
            Err(Box::new(failure(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    res.group_resource()
                ),
                Some(details(Some(name), &res.group, &res.plural)),
            )))
        }
        _ => Ok(()),
    }
}

/// The new object when `wanted` is written at `info` over `current`: the
/// status subresource takes only the status; the main resource keeps the
/// status (for resources that have the subresource) and the server's fields.
fn next_state(res: &ResourceDef, info: &RequestInfo, current: &Value, wanted: &Value) -> Value {
    if info.subresource.is_some() {
        let mut next = current.clone();
        match wanted.get("status") {
            Some(st) => next["status"] = st.clone(),
            None => {
                if let Some(m) = next.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        return next;
    }
    let mut next = wanted.clone();
    let has_status = !(res.group.is_empty() && res.plural == "events");
    if has_status {
        match current.get("status") {
            Some(st) => next["status"] = st.clone(),
            None => {
                if let Some(m) = next.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    for f in ["name", "namespace", "resourceVersion", "generation"] {
        next["metadata"][f] = current["metadata"][f].clone();
    }
    fill_server_fields(res, &mut next, Some(current));
    next
}

fn patch(
    sh: &Shared,
    res: &ResourceDef,
    info: &RequestInfo,
    content_type: Option<&str>,
    body: &Value,
) -> Response<Body> {
    let ct = content_type
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    let apply = match ct {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
        "application/apply-patch+yaml" | "application/apply-patch+json" => true,
        _ => {
            return failure(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!(
                "the body of the request was in an unknown format - accepted media types include: \
                     application/merge-patch+json, application/strategic-merge-patch+json, \
                     application/apply-patch+yaml (this double does not implement {ct})"
            ),
                None,
            )
        }
    };
    if !body.is_object() {
        return bad_request("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json");
    }
    let k = key(res, info);
    let mut s = lock(sh);
    let current = match s.store.get(res, &k).cloned() {
        Some(c) => c,
        None if apply && info.subresource.is_none() => {
            drop(s);
            let mut info = info.clone();
            info.name = None;
            let mut obj = body.clone();
            obj["metadata"]["name"] = json!(k.1);
            return create(sh, res, &info, &obj);
        }
        None => return not_found(res, &k.1),
    };
    if let Err(r) = precondition(res, &k.1, body, &current) {
        return *r;
    }
    let mut wanted = current.clone();
    merge_patch(&mut wanted, body);
    let next = next_state(res, info, &current, &wanted);
    let change = s.store.commit(res, k, Some(next));
    let out = change.as_ref().map_or(current, |c| c.object.clone());
    drop(s);
    publish(sh, change.as_ref());
    json_response(StatusCode::OK, &render(res, &info.version, &out))
}

fn update(sh: &Shared, res: &ResourceDef, info: &RequestInfo, body: &Value) -> Response<Body> {
    if let Err(r) = check_types(res, &info.version, body) {
        return *r;
    }
    let k = key(res, info);
    if body["metadata"]["name"].as_str().is_some_and(|n| n != k.1) {
        return bad_request("the name of the object does not match the name on the URL");
    }
    let mut s = lock(sh);
    let Some(current) = s.store.get(res, &k).cloned() else {
        return not_found(res, &k.1);
    };
    if let Err(r) = precondition(res, &k.1, body, &current) {
        return *r;
    }
    let next = next_state(res, info, &current, body);
    let change = s.store.commit(res, k, Some(next));
    let out = change.as_ref().map_or(current, |c| c.object.clone());
    drop(s);
    publish(sh, change.as_ref());
    json_response(StatusCode::OK, &render(res, &info.version, &out))
}

/// Where a watch starts.
enum Start {
    /// ADDED for every current object first (resourceVersion unset or
    /// `0`); with the `initial-events-end` bookmark after them when
    /// `sendInitialEvents=true`.
    Current { end_marker: bool },
    /// Every change after this resourceVersion.
    After(u64),
}

fn invalid_list_options(message: &str) -> Response<Body> {
    failure(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &format!("ListOptions.meta.k8s.io \"\" is invalid: {message}"),
        Some(json!({"group": "meta.k8s.io", "kind": "ListOptions"})),
    )
}

fn watch(sh: &Shared, res: &ResourceDef, info: &RequestInfo, q: &Query) -> Response<Body> {
    let (labels, fields) = match selectors(q) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let initial_events = q.flag("sendInitialEvents");
    let bookmarks = q.flag("allowWatchBookmarks");
    let rv_match = q.get("resourceVersionMatch").unwrap_or_default();
    if initial_events && rv_match != "NotOlderThan" {
        return invalid_list_options(
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        );
    }
    if initial_events && !bookmarks {
        return invalid_list_options(
            "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
        );
    }
    if !initial_events && !rv_match.is_empty() {
        return invalid_list_options(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        );
    }
    let rv = q.get("resourceVersion").unwrap_or_default();
    let start = match rv {
        "" | "0" => Start::Current {
            end_marker: initial_events,
        },
        v => match v.parse::<u64>() {
            Ok(n) if initial_events => {
                let current = lock(sh).store.rv;
                if n > current {
                    return list_error(ListError::TooLarge(n, current));
                }
                Start::Current { end_marker: true }
            }
            Ok(n) => Start::After(n),
            Err(_) => {
                return invalid_list_options(&format!(
                    "resourceVersion: Invalid value: \"{v}\": must be a non-negative integer"
                ))
            }
        },
    };
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let spec = WatchSpec {
        res: res.clone(),
        version: info.version.clone(),
        namespace: if res.namespaced {
            info.namespace.clone()
        } else {
            None
        },
        labels,
        fields,
        bookmarks,
    };
    // Subscribe before reading the store: no change falls in between.
    let mut changed = sh.changed.subscribe();
    let mut control = sh.control.subscribe();
    let (first, mut pos, gone, every, epoch) = {
        let s = lock(sh);
        let st = &s.store;
        let mut first = Vec::new();
        let mut gone = None;
        let pos = match start {
            Start::Current { end_marker } => {
                for o in st.all(res) {
                    if spec.selects(&o) {
                        first.push(spec.event("ADDED", &o));
                    }
                }
                if end_marker {
                    first.push(spec.bookmark(st.rv, true));
                }
                st.rv
            }
            Start::After(n) => {
                let compacted = st.floor.max(st.evicted);
                if n < compacted {
                    gone = Some(too_old(n, compacted));
                } else if n > st.rv {
                    drop(s);
                    return list_error(ListError::TooLarge(n, lock(sh).store.rv));
                }
                n
            }
        };
        (first, pos, gone, st.bookmark_every, st.watches_expired.0)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(256);
    let open = OpenWatch::new(sh);
    let sh = sh.clone();
    tokio::spawn(async move {
        let _open = open;
        let line = |v: &Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        if let Some(err) = gone {
            let _ = tx.send(line(&err)).await;
            return;
        }
        for ev in &first {
            if tx.send(line(ev)).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let every = every.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            let mut bookmark = false;
            tokio::select! {
                () = &mut end => return,
                () = tx.closed() => return,
                r = changed.changed() => if r.is_err() { return },
                _ = tick.tick(), if spec.bookmarks => bookmark = true,
                c = control.recv() => match c {
                    Ok(Control::Cut) => {
                        let _ = tx.send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "watch cut by the test (drop_watches)",
                        ))).await;
                        return;
                    }
                    Ok(Control::End) | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    // The drain below ends the watch.
                    Ok(Control::Expire) => {}
                    Ok(Control::Bookmark) => bookmark = spec.bookmarks,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                },
            }
            // Everything after `pos`, then `pos` is the store's revision;
            // if every watch was expired since this one opened, everything
            // up to then and the `410`, whatever came later.
            let drained = {
                let s = lock(&sh);
                let (n, at) = s.store.watches_expired;
                let expired = (n != epoch).then_some((at, s.store.floor));
                s.store
                    .changes_since(&spec.res.id(), pos)
                    .map(|cs| (cs, s.store.rv, expired))
            };
            let (changes, now, expired) = match drained {
                Ok(d) => d,
                Err(compacted) => {
                    let _ = tx.send(line(&too_old(pos, compacted))).await;
                    return;
                }
            };
            for c in &changes {
                if expired.is_some_and(|(at, _)| c.rv > at) {
                    break;
                }
                if let Some(ev) = spec.change(c) {
                    if tx.send(line(&ev)).await.is_err() {
                        return;
                    }
                }
            }
            if let Some((at, compacted)) = expired {
                let _ = tx.send(line(&too_old(pos.max(at), compacted))).await;
                return;
            }
            pos = now;
            if bookmark && tx.send(line(&spec.bookmark(pos, false))).await.is_err() {
                return;
            }
        }
    });
    let mut resp =
        Response::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The watch cache's answer to a watch from a compacted resourceVersion.
fn too_old(rv: u64, compacted: u64) -> Value {
    json!({
        "type": "ERROR",
        "object": status_object(410, "Expired", &format!("too old resource version: {rv} ({compacted})"), None),
    })
}

/// Counts open watch streams while alive.
struct OpenWatch(Shared);

impl OpenWatch {
    fn new(sh: &Shared) -> Self {
        sh.open_watches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(sh.clone())
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0
            .open_watches
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct WatchSpec {
    res: ResourceDef,
    version: String,
    namespace: Option<String>,
    labels: Selector,
    fields: Selector,
    bookmarks: bool,
}

impl WatchSpec {
    fn selects(&self, obj: &Value) -> bool {
        let ns_ok = self
            .namespace
            .as_deref()
            .is_none_or(|ns| key_of(obj).0 == ns);
        ns_ok && self.labels.matches_labels(obj) && self.fields.matches_fields(obj)
    }

    fn event(&self, kind: &str, obj: &Value) -> Value {
        json!({ "type": kind, "object": render(&self.res, &self.version, obj) })
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Value {
        let mut meta = json!({ "resourceVersion": rv.to_string() });
        if initial_end {
            meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        json!({
            "type": "BOOKMARK",
            "object": {
                "kind": self.res.kind,
                "apiVersion": self.res.api_version(&self.version),
                "metadata": meta,
            }
        })
    }

    /// The event a change is for this watch, as the watch cache filters:
    /// an object leaving the selection is DELETED (its previous state at
    /// the new resourceVersion), one entering it ADDED.
    fn change(&self, c: &Change) -> Option<Value> {
        let now = self.selects(&c.object);
        match c.kind {
            EventKind::Added => now.then(|| self.event("ADDED", &c.object)),
            EventKind::Deleted => now.then(|| self.event("DELETED", &c.object)),
            EventKind::Modified => {
                let before = c.prev.as_ref().is_some_and(|p| self.selects(p));
                match (before, now) {
                    (true, true) => Some(self.event(EventKind::Modified.as_str(), &c.object)),
                    (false, true) => Some(self.event("ADDED", &c.object)),
                    (true, false) => {
                        let mut p = c.prev.clone().unwrap_or_default();
                        p["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                        Some(self.event("DELETED", &p))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_info_from_paths() {
        let q = Query::parse(Some("&watch=true&labelSelector=app%3Dreviews+x"));
        assert_eq!(q.get("labelSelector"), Some("app=reviews x"));
        let i = RequestInfo::parse(&Method::GET, "/api/v1/namespaces/ns/services", &q).unwrap();
        assert_eq!(
            (i.verb, i.resource.as_str(), i.namespace.as_deref()),
            ("watch", "services", Some("ns"))
        );
        let i =
            RequestInfo::parse(&Method::GET, "/api/v1/namespaces/ns", &Query::parse(None)).unwrap();
        assert_eq!(
            (i.verb, i.resource.as_str(), i.name.as_deref()),
            ("get", "namespaces", Some("ns"))
        );
        let i = RequestInfo::parse(
            &Method::PUT,
            "/api/v1/namespaces/ns/status",
            &Query::parse(None),
        )
        .unwrap();
        assert_eq!(
            (i.resource.as_str(), i.subresource.as_deref()),
            ("namespaces", Some("status"))
        );
        let i = RequestInfo::parse(
            &Method::PATCH,
            "/apis/fedmesh.io/v1/namespaces/b/trafficweights/r/status",
            &Query::parse(None),
        )
        .unwrap();
        assert_eq!(
            (
                i.verb,
                i.group.as_str(),
                i.resource_path(),
                i.name.as_deref()
            ),
            (
                "patch",
                "fedmesh.io",
                "trafficweights/status".to_string(),
                Some("r")
            )
        );
        assert!(RequestInfo::parse(&Method::GET, "/version", &Query::parse(None)).is_none());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("a%3Db%2Cc"), "a=b,c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
