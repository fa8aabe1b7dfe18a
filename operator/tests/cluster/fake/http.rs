//! HTTP front of the fake API server: discovery, CRUD, patch flavours, subresources, watch.

use super::Fake;
use super::store::{ApiError, Change, Store, Write};
use super::types::ResourceType;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Response, StatusCode, Uri};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

fn error(e: ApiError) -> Response<Body> {
    respond(e.code, &e.to_status())
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| {
            q.split('&')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (decode(k), decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=b,c!=d,e in (f,g),!h,i` against labels.
pub fn selector_matches(selector: &str, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(|v| v.as_str());
    let mut parts = vec![];
    let mut depth = 0;
    let mut cur = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).all(|p| {
        if let Some((k, vals)) = p.split_once(" notin ") {
            let vals: Vec<&str> = vals
                .trim_matches(|c| c == '(' || c == ')' || c == ' ')
                .split(',')
                .map(str::trim)
                .collect();
            return get(k.trim()).is_none_or(|v| !vals.contains(&v));
        }
        if let Some((k, vals)) = p.split_once(" in ") {
            let vals: Vec<&str> = vals
                .trim_matches(|c| c == '(' || c == ')' || c == ' ')
                .split(',')
                .map(str::trim)
                .collect();
            return get(k.trim()).is_some_and(|v| vals.contains(&v));
        }
        if let Some((k, v)) = p.split_once("!=") {
            return get(k.trim()) != Some(v.trim());
        }
        if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
            return get(k.trim()) == Some(v.trim());
        }
        if let Some(k) = p.strip_prefix('!') {
            return get(k.trim()).is_none();
        }
        get(p).is_some()
    })
}

fn field_matches(selector: &str, obj: &Value) -> bool {
    selector.split(',').filter(|p| !p.is_empty()).all(|p| {
        let (k, v, neg) = match p.split_once("!=") {
            Some((k, v)) => (k, v, true),
            None => match p.split_once("==").or_else(|| p.split_once('=')) {
                Some((k, v)) => (k, v, false),
                None => return true,
            },
        };
        let mut cur = obj;
        for seg in k.split('.') {
            cur = &cur[seg];
        }
        (cur.as_str() == Some(v)) != neg
    })
}

struct Target {
    rtype: ResourceType,
    namespace: String,
    name: Option<String>,
    sub: String,
}

fn parse_path(store: &Store, path: &str) -> Option<Result<Target, ApiError>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    if rest.is_empty() {
        return None;
    }
    let lookup = |plural: &str| -> Result<ResourceType, ApiError> {
        store
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({plural}.{group})"),
                )
            })
    };
    let t = match rest {
        ["namespaces", ns, plural, more @ ..] if !plural.is_empty() => {
            lookup(plural).map(|rt| Target {
                rtype: rt,
                namespace: ns.to_string(),
                name: more.first().map(|s| s.to_string()),
                sub: more.get(1).map(|s| s.to_string()).unwrap_or_default(),
            })
        }
        [plural, more @ ..] => lookup(plural).map(|rt| Target {
            rtype: rt,
            namespace: String::new(),
            name: more.first().map(|s| s.to_string()),
            sub: more.get(1).map(|s| s.to_string()).unwrap_or_default(),
        }),
        [] => return None,
    };
    Some(t)
}

fn discovery(store: &Store, path: &str) -> Option<Value> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let groups = || {
        let mut gv: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in store.types.iter().filter(|t| !t.group.is_empty()) {
            let vs = gv.entry(t.group.clone()).or_default();
            if !vs.contains(&t.version) {
                vs.push(t.version.clone());
            }
        }
        gv
    };
    let resources = |group: &str, version: &str| -> Value {
        let list: Vec<Value> = store
            .types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .flat_map(|t| t.discovery_entry())
            .collect();
        let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    };
    match segs.as_slice() {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
        ["api", "v1"] => Some(resources("", "v1")),
        ["apis"] => {
            let list: Vec<Value> = groups()
                .into_iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}))
        }
        ["apis", g] => groups().get(*g).map(|vs| {
            let versions: Vec<Value> = vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": versions, "preferredVersion": versions[0]})
        }),
        ["apis", g, v] => groups().get(*g).filter(|vs| vs.iter().any(|x| x == v)).map(|_| resources(g, v)),
        ["version"] => Some(json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-omega-fake", "platform": "linux/amd64"})),
        _ => None,
    }
}

/// Just enough OpenAPI v3 for kubectl: every group-version lists a PATCH operation per kind
/// that accepts `fieldValidation`, so kubectl leaves validation to the (fake) server, which
/// applies the CRD schemas and CEL rules.
fn openapi(store: &Store, path: &str) -> Option<Value> {
    let mut gvs: BTreeMap<String, Vec<&ResourceType>> = BTreeMap::new();
    for t in &store.types {
        let gv = if t.group.is_empty() {
            format!("api/{}", t.version)
        } else {
            format!("apis/{}/{}", t.group, t.version)
        };
        gvs.entry(gv).or_default().push(t);
    }
    if path == "/openapi/v3" {
        let paths: serde_json::Map<String, Value> = gvs
            .keys()
            .map(|gv| {
                (
                    gv.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={}", store.rv)}),
                )
            })
            .collect();
        return Some(json!({"paths": paths}));
    }
    let gv = path.strip_prefix("/openapi/v3/")?;
    let types = gvs.get(gv)?;
    let mut paths = serde_json::Map::new();
    for t in types {
        let scope = if t.namespaced { "/namespaces/{namespace}" } else { "" };
        let op = json!({
            "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(format!("/{gv}{scope}/{}/{{name}}", t.plural), json!({"patch": op}));
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes (omega fake)", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": {}}}),
    )
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    if ct.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::new(400, "BadRequest", format!("yaml: {e}")))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, "BadRequest", format!("json: {e}")))
    }
}

fn age(ts: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(ts) else { return "<unknown>".into() };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Server-side printing (`kubectl get`): a meta.k8s.io/v1 Table with the CRD's printer columns.
fn table(t: &ResourceType, items: &[Value], rv: u64) -> Value {
    let mut defs = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}),
    ];
    let columns: Vec<(String, String, String)> = if t.columns.is_empty() {
        vec![("Age".into(), "date".into(), ".metadata.creationTimestamp".into())]
    } else {
        t.columns.clone()
    };
    for (name, ty, _) in &columns {
        defs.push(
            json!({"name": name, "type": ty, "format": "", "description": "", "priority": 0}),
        );
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for (_, ty, path) in &columns {
                let v = path.trim_start_matches('.').split('.').fold(o, |v, s| &v[s]).clone();
                cells.push(match (ty.as_str(), v.as_str()) {
                    ("date", Some(ts)) => json!(age(ts)),
                    _ => v,
                });
            }
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": defs, "rows": rows})
}

fn scale_of(t: &ResourceType, obj: &Value) -> Option<Value> {
    let (spec_path, status_path, sel_path) = t.scale.clone()?;
    let at = |p: &str| p.split('.').fold(obj, |v, s| &v[s]).clone();
    Some(json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"], "resourceVersion": obj["metadata"]["resourceVersion"]},
        "spec": {"replicas": at(&spec_path)},
        "status": {"replicas": at(&status_path).as_i64().unwrap_or(0), "selector": sel_path.map(|p| at(&p)).unwrap_or(Value::Null)},
    }))
}

fn set_path(obj: &mut Value, path: &str, v: Value) {
    let mut cur = obj;
    for seg in path.split('.') {
        if !cur.is_object() {
            *cur = json!({});
        }
        cur = &mut cur[seg];
    }
    *cur = v;
}

/// Every request.
pub async fn handle(
    fake: Fake,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let path = uri.path().to_string();
    let q = query(&uri);
    let target = {
        let store = fake.store.lock().expect("store");
        if method == Method::GET
            && let Some(d) = discovery(&store, &path)
        {
            return respond(200, &d);
        }
        if path.starts_with("/openapi/") {
            return match openapi(&store, &path) {
                Some(doc) => respond(200, &doc),
                None => error(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )),
            };
        }
        match parse_path(&store, &path) {
            Some(Ok(t)) => t,
            Some(Err(e)) => return error(e),
            None => {
                return error(ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({path})"),
                ));
            }
        }
    };
    let ns = if target.rtype.namespaced { target.namespace.clone() } else { String::new() };
    let recorded = record(&fake, &method, &headers, &target, &ns, &q);

    if method == Method::GET
        && target.name.is_none()
        && matches!(q.get("watch").map(String::as_str), Some("true" | "1"))
    {
        return watch(fake, target.rtype, ns, q);
    }

    let body = match parse_body(&headers, &body) {
        Ok(b) => b,
        Err(e) => return error(e),
    };
    let mut store = fake.store.lock().expect("store");
    let rv_before = store.rv;
    if method != Method::GET {
        store.writes.push(Write {
            verb: method.to_string(),
            plural: target.rtype.plural.clone(),
            name: target.name.clone().unwrap_or_default(),
            subresource: target.sub.clone(),
            content_type: headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            field_manager: q.get("fieldManager").cloned(),
        });
    }
    let t = target.rtype.clone();
    if q.get("fieldValidation").map(String::as_str) == Some("Strict")
        && matches!(method, Method::POST | Method::PUT | Method::PATCH)
        && target.sub.is_empty()
        && let Some(schema) = &t.schema
    {
        let unknown = super::schema::unknown_fields(schema, &body);
        if !unknown.is_empty() {
            let list: Vec<String> =
                unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
            return error(ApiError::new(
                400,
                "BadRequest",
                format!("strict decoding error: {}", list.join(", ")),
            ));
        }
    }
    let wants_table =
        headers.get("accept").and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=Table"));
    let result = match (&method, &target.name) {
        (&Method::GET, None) => {
            let label = q.get("labelSelector").cloned().unwrap_or_default();
            let field = q.get("fieldSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = store
                .list(&t, &ns)
                .into_iter()
                .filter(|o| {
                    selector_matches(&label, &o["metadata"]["labels"]) && field_matches(&field, o)
                })
                .collect();
            if wants_table {
                return respond(200, &table(&t, &items, store.rv));
            }
            Ok((
                200,
                json!({
                    "apiVersion": t.api_version(), "kind": format!("{}List", t.kind),
                    "metadata": {"resourceVersion": store.rv.to_string()}, "items": items,
                }),
            ))
        }
        (&Method::GET, Some(name)) => match store.get(&t, &ns, name) {
            None => Err(ApiError::not_found(&t, name)),
            Some(o) if target.sub == "scale" => {
                scale_of(&t, o).map(|s| (200, s)).ok_or_else(|| ApiError::not_found(&t, name))
            }
            Some(o) if wants_table => Ok((200, table(&t, std::slice::from_ref(o), store.rv))),
            Some(o) => Ok((200, o.clone())),
        },
        (&Method::POST, None) => store.create(&t, &ns, body).map(|o| (201, o)),
        (&Method::PUT, Some(name))
            if target.sub == "scale" || target.sub == "status" || target.sub.is_empty() =>
        {
            if target.sub == "scale" {
                scale_write(&mut store, &t, &ns, name, body["spec"]["replicas"].clone())
            } else {
                store.update(&t, &ns, name, &target.sub, Change::Replace(body)).map(|o| (200, o))
            }
        }
        (&Method::PATCH, Some(name)) => {
            let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
            if target.sub == "scale" {
                scale_write(&mut store, &t, &ns, name, body["spec"]["replicas"].clone())
            } else {
                let change = if ct.starts_with("application/apply-patch") {
                    match q.get("fieldManager") {
                        Some(m) => Ok(Change::Apply { manager: m.clone(), config: body }),
                        None => Err(ApiError::new(
                            400,
                            "BadRequest",
                            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                        )),
                    }
                } else if ct.starts_with("application/json-patch") {
                    Ok(Change::Json(body))
                } else {
                    Ok(Change::Merge(body))
                };
                change.and_then(|c| store.update(&t, &ns, name, &target.sub, c)).map(|o| (200, o))
            }
        }
        (&Method::DELETE, Some(name)) => {
            let orphan = q.get("propagationPolicy").map(String::as_str) == Some("Orphan")
                || body["propagationPolicy"] == json!("Orphan");
            store.delete(&t, &ns, name, orphan).map(|o| (200, o))
        }
        (&Method::DELETE, None) => {
            let label = q.get("labelSelector").cloned().unwrap_or_default();
            let names: Vec<String> = store
                .list(&t, &ns)
                .into_iter()
                .filter(|o| selector_matches(&label, &o["metadata"]["labels"]))
                .filter_map(|o| o["metadata"]["name"].as_str().map(String::from))
                .collect();
            let mut items = vec![];
            for n in names {
                if let Ok(o) = store.delete(&t, &ns, &n, false) {
                    items.push(o);
                }
            }
            Ok((
                200,
                json!({"apiVersion": t.api_version(), "kind": format!("{}List", t.kind), "metadata": {}, "items": items}),
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    };
    if store.rv != rv_before {
        for i in recorded {
            if let Some(r) = store.requests.get_mut(i) {
                r.changed = true;
            }
        }
    }
    drop(store);
    fake.changed.notify_waiters();
    match result {
        Ok((code, v)) => respond(code, &v),
        Err(e) => error(e),
    }
}

/// Logs the request as RBAC would authorize it (who, verb, resource), plus `create` for a
/// server-side apply that creates its object: the real server checks both.
fn record(
    fake: &Fake,
    method: &Method,
    headers: &HeaderMap,
    target: &Target,
    ns: &str,
    q: &BTreeMap<String, String>,
) -> Vec<usize> {
    let user = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let named = target.name.is_some();
    let verb = match *method {
        Method::GET
            if !named && matches!(q.get("watch").map(String::as_str), Some("true" | "1")) =>
        {
            "watch"
        }
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    };
    let resource = if target.sub.is_empty() {
        target.rtype.plural.clone()
    } else {
        format!("{}/{}", target.rtype.plural, target.sub)
    };
    let mut store = fake.store.lock().expect("store");
    let creates = *method == Method::PATCH
        && target.sub.is_empty()
        && headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/apply-patch"))
        && target.name.as_deref().is_some_and(|n| store.get(&target.rtype, ns, n).is_none());
    let mut pushed = vec![];
    let mut push = |verb: &str| {
        pushed.push(store.requests.len());
        store.requests.push(super::store::Request {
            at: std::time::Instant::now(),
            user: user.clone(),
            verb: verb.to_string(),
            group: target.rtype.group.clone(),
            resource: resource.clone(),
            namespace: ns.to_string(),
            name: target.name.clone().unwrap_or_default(),
            changed: false,
        });
    };
    push(verb);
    if creates {
        push("create");
    }
    pushed
}

fn scale_write(
    store: &mut Store,
    t: &ResourceType,
    ns: &str,
    name: &str,
    replicas: Value,
) -> Result<(u16, Value), ApiError> {
    let (spec_path, _, _) = t.scale.clone().ok_or_else(|| ApiError::not_found(t, name))?;
    let mut patch = json!({});
    set_path(&mut patch, &spec_path, replicas);
    let o = store.update(t, ns, name, "", Change::Merge(patch))?;
    Ok((200, scale_of(t, &o).unwrap_or(o)))
}

fn watch(fake: Fake, t: ResourceType, ns: String, q: BTreeMap<String, String>) -> Response<Body> {
    let label = q.get("labelSelector").cloned().unwrap_or_default();
    let timeout = q.get("timeoutSeconds").and_then(|s| s.parse::<u64>().ok()).unwrap_or(300);
    let from: Option<u64> =
        q.get("resourceVersion").and_then(|s| s.parse().ok()).filter(|rv| *rv > 0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut cursor = {
            let store = fake.store.lock().expect("store");
            match from {
                Some(rv) => rv,
                None => {
                    // No resourceVersion: start with ADDED for what exists now.
                    for o in store.list(&t, &ns) {
                        if selector_matches(&label, &o["metadata"]["labels"]) {
                            let line = format!("{}\n", json!({"type": "ADDED", "object": o}));
                            if tx.try_send(Ok(Bytes::from(line))).is_err() {
                                return;
                            }
                        }
                    }
                    store.rv
                }
            }
        };
        loop {
            let notified = fake.changed.notified();
            let events = fake.store.lock().expect("store").events_after(&t, &ns, cursor);
            for e in events {
                cursor = e.rv;
                if !selector_matches(&label, &e.object["metadata"]["labels"]) {
                    continue;
                }
                let line = format!("{}\n", json!({"type": e.type_, "object": e.object}));
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = tx.closed() => return,
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}
