//! The fake API server's state: objects by (group, plural, namespace, name), a global
//! resourceVersion bumped on every write, an event log for watches, the last configuration
//! each field manager applied (for server-side apply), owner-reference garbage collection,
//! and a log of every write request.

use super::schema;
use super::types::{self, ResourceType};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};

/// Identifies an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

/// A watch event in the log.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub type_: &'static str,
    pub object: Value,
}

/// One write request the server received.
#[derive(Debug, Clone)]
pub struct Write {
    pub verb: String,
    pub plural: String,
    pub name: String,
    pub subresource: String,
    pub content_type: String,
    pub field_manager: Option<String>,
}

/// One request the server received, as RBAC sees it: who, which verb, which resource.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: std::time::Instant,
    /// Bearer token of the client (`operator` for the operator under test).
    pub user: String,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    pub group: String,
    /// Plural, with `/subresource` when there is one.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// The request changed the cluster (a new resourceVersion).
    pub changed: bool,
}

/// An API error (becomes a `Status` response).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into() }
    }
    pub fn not_found(t: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{}.{} \"{name}\" not found", t.plural, t.group).replace(". \"", " \""),
        )
    }
    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

/// How a write changes an object.
pub enum Change {
    /// Full object (create / PUT).
    Replace(Value),
    /// RFC 7386 merge patch (also used for strategic merge patch: list entries are replaced).
    Merge(Value),
    /// RFC 6902 JSON patch.
    Json(Value),
    /// Server-side apply by `manager`.
    Apply { manager: String, config: Value },
}

/// Everything the fake cluster holds.
pub struct Store {
    pub types: Vec<ResourceType>,
    pub objects: BTreeMap<Key, Value>,
    pub rv: u64,
    pub log: Vec<WatchEvent>,
    applied: HashMap<(Key, String, String), Value>,
    pub writes: Vec<Write>,
    pub requests: Vec<Request>,
    uid: u64,
}

/// Annotation with which a test backdates an object's creationTimestamp.
pub const BACKDATE: &str = "fake.omega.test/creation-timestamp";

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Store {
    pub fn new() -> Self {
        let mut s = Store {
            types: types::builtins(),
            objects: BTreeMap::new(),
            rv: 1,
            log: vec![],
            applied: HashMap::new(),
            writes: vec![],
            requests: vec![],
            uid: 0,
        };
        for ns in ["default", "kube-system"] {
            let t = s.find("", "namespaces").cloned().expect("namespaces");
            s.create(
                &t,
                "",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .expect("namespace");
        }
        s
    }

    pub fn find(&self, group: &str, plural: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.group == group && t.plural == plural)
    }

    fn key(t: &ResourceType, ns: &str, name: &str) -> Key {
        Key {
            group: t.group.clone(),
            plural: t.plural.clone(),
            namespace: if t.namespaced { ns.into() } else { String::new() },
            name: name.into(),
        }
    }

    pub fn get(&self, t: &ResourceType, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&Self::key(t, ns, name))
    }

    /// Objects of a type, in one namespace or all (`ns` empty).
    pub fn list(&self, t: &ResourceType, ns: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| {
                k.group == t.group && k.plural == t.plural && (ns.is_empty() || k.namespace == ns)
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, t: &ResourceType, ns: &str, type_: &'static str, object: Value, rv: u64) {
        self.log.push(WatchEvent {
            rv,
            group: t.group.clone(),
            plural: t.plural.clone(),
            namespace: ns.into(),
            type_,
            object,
        });
    }

    /// Creates an object (POST, or SSA/patch of a missing object).
    pub fn create(
        &mut self,
        t: &ResourceType,
        ns: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if name.is_empty() {
            if let Some(prefix) = obj["metadata"]["generateName"].as_str() {
                self.uid += 1;
                obj["metadata"]["name"] = json!(format!("{prefix}{:05x}", self.uid));
            } else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let ns = if t.namespaced { ns.to_string() } else { String::new() };
        if t.namespaced {
            let ns_type = self.find("", "namespaces").cloned().expect("namespaces");
            if self.get(&ns_type, "", &ns).is_none() {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("namespaces \"{ns}\" not found"),
                ));
            }
        }
        let key = Self::key(t, &ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{}.{} \"{name}\" already exists", t.plural, t.group),
            ));
        }
        obj["apiVersion"] = json!(t.api_version());
        obj["kind"] = json!(t.kind);
        if t.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        if t.status_subresource
            && t.group != "apiextensions.k8s.io"
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        let obj = self.admit(t, obj, None)?;
        let mut obj = obj;
        self.uid += 1;
        let rv = self.bump();
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        // Tests may backdate an object (a real API server ignores client timestamps).
        let created = meta["annotations"][BACKDATE].as_str().map_or_else(now, String::from);
        meta["creationTimestamp"] = json!(created);
        meta["resourceVersion"] = json!(rv.to_string());
        if t.has_generation() {
            meta["generation"] = json!(1);
        }
        if t.kind == "CustomResourceDefinition" {
            obj["status"] = json!({
                "conditions": [{"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "", "lastTransitionTime": now()},
                               {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "", "lastTransitionTime": now()}],
                "acceptedNames": obj["spec"]["names"].clone(),
                "storedVersions": obj["spec"]["versions"].as_array().into_iter().flatten().filter(|v| v["storage"] == json!(true)).map(|v| v["name"].clone()).collect::<Vec<_>>(),
            });
            self.register_crd(&obj);
        }
        if t.kind == "Namespace" {
            obj["status"] = json!({"phase": "Active"});
        }
        self.objects.insert(key, obj.clone());
        self.emit(t, &ns, "ADDED", obj.clone(), rv);
        Ok(obj)
    }

    fn register_crd(&mut self, crd: &Value) {
        for rt in types::from_crd(crd) {
            self.types.retain(|t| !(t.group == rt.group && t.plural == rt.plural));
            self.types.push(rt);
        }
    }

    /// Defaulting, pruning and validation of custom resources (structural schema + CEL); for
    /// built-in kinds, the decoding the real server does first (quantities).
    fn admit(&self, t: &ResourceType, obj: Value, old: Option<&Value>) -> Result<Value, ApiError> {
        let Some(schema) = &t.schema else {
            // Like the real server, a quantity that does not parse fails the decoding of the
            // typed object: 400, "<Kind> in version "v1" cannot be handled as a <Kind>: …".
            if let Some(bad) = schema::invalid_quantities(&obj).first() {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!(
                        "{kind} in version \"{v}\" cannot be handled as a {kind}: {bad}",
                        kind = t.kind,
                        v = t.version
                    ),
                ));
            }
            return Ok(obj);
        };
        let obj = schema::default_and_prune(schema, &obj);
        let mut errors = schema::validate(schema, &obj);
        if errors.is_empty() {
            errors = schema::cel(schema, &obj, old);
        }
        if errors.is_empty() {
            return Ok(obj);
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        Err(ApiError::new(
            422,
            "Invalid",
            format!("{}.{} \"{name}\" is invalid: {}", t.kind, t.group, errors.join(", ")),
        ))
    }

    /// Applies a change to an existing object (or creates it for SSA). `sub` is "" or "status".
    pub fn update(
        &mut self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        sub: &str,
        change: Change,
    ) -> Result<Value, ApiError> {
        let key = Self::key(t, ns, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return match change {
                Change::Apply { manager, config } if sub.is_empty() => {
                    let created = self.create(t, ns, config.clone())?;
                    self.applied.insert((key, manager, String::new()), config);
                    Ok(created)
                }
                _ => Err(ApiError::not_found(t, name)),
            };
        };
        let (mut next, precondition) = match &change {
            Change::Replace(v) => {
                (v.clone(), v["metadata"]["resourceVersion"].as_str().map(String::from))
            }
            Change::Merge(p) => {
                let mut n = old.clone();
                json_patch::merge(&mut n, p);
                (n, p["metadata"]["resourceVersion"].as_str().map(String::from))
            }
            Change::Json(p) => {
                let ops: json_patch::Patch = serde_json::from_value(p.clone())
                    .map_err(|e| ApiError::new(400, "BadRequest", format!("json patch: {e}")))?;
                let mut n = old.clone();
                json_patch::patch(&mut n, &ops)
                    .map_err(|e| ApiError::new(422, "Invalid", format!("json patch: {e}")))?;
                (n, None)
            }
            Change::Apply { manager, config, .. } => {
                let prev = self.applied.get(&(key.clone(), manager.clone(), sub.to_string()));
                (
                    ssa_merge(&old, prev, config),
                    config["metadata"]["resourceVersion"].as_str().map(String::from),
                )
            }
        };
        if let Some(rv) = precondition
            && Some(rv.as_str()) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    t.plural, t.group
                ),
            ));
        }
        // Identity and server-owned metadata never change through writes.
        for f in
            ["name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp"]
        {
            match old["metadata"].get(f) {
                Some(v) => next["metadata"][f] = v.clone(),
                None => {
                    if let Some(m) = next["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        next["apiVersion"] = json!(t.api_version());
        next["kind"] = json!(t.kind);
        if t.status_subresource {
            if sub == "status" {
                // Only status changes through the status subresource.
                let status = next.get("status").cloned();
                next = old.clone();
                match status {
                    Some(s) => next["status"] = s,
                    None => {
                        if let Some(m) = next.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            } else {
                match old.get("status") {
                    Some(s) => next["status"] = s.clone(),
                    None => {
                        if let Some(m) = next.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
        }
        let mut next = self.admit(t, next, Some(&old))?;
        if let Change::Apply { manager, config, .. } = &change {
            self.applied.insert((key.clone(), manager.clone(), sub.to_string()), config.clone());
        }
        next["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if next == old {
            return Ok(old);
        }
        if t.has_generation() && spec_changed(&old, &next) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            next["metadata"]["generation"] = json!(g);
        }
        let rv = self.bump();
        next["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ns_key = key.namespace.clone();
        if next["metadata"]["deletionTimestamp"].is_string() && finalizers(&next).is_empty() {
            self.objects.remove(&key);
            self.emit(t, &ns_key, "DELETED", next.clone(), rv);
            self.collect_garbage(&next);
            return Ok(next);
        }
        self.objects.insert(key, next.clone());
        self.emit(t, &ns_key, "MODIFIED", next.clone(), rv);
        Ok(next)
    }

    /// DELETE: marks objects with finalizers, removes the others and collects their dependents.
    pub fn delete(
        &mut self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        orphan: bool,
    ) -> Result<Value, ApiError> {
        let key = Self::key(t, ns, name);
        let Some(mut obj) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(t, name));
        };
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if !finalizers(&obj).is_empty() {
            if !obj["metadata"]["deletionTimestamp"].is_string() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                if t.has_generation() {
                    let g = obj["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                    obj["metadata"]["generation"] = json!(g);
                }
                self.objects.insert(key.clone(), obj.clone());
                self.emit(t, &key.namespace, "MODIFIED", obj.clone(), rv);
            }
            return Ok(obj);
        }
        self.objects.remove(&key);
        self.applied.retain(|(k, _, _), _| *k != key);
        self.emit(t, &key.namespace, "DELETED", obj.clone(), rv);
        if orphan {
            self.orphan_dependents(&obj);
        } else {
            self.collect_garbage(&obj);
        }
        Ok(obj)
    }

    fn dependents(&self, owner: &Value) -> Vec<Key> {
        let uid = owner["metadata"]["uid"].as_str().unwrap_or_default();
        self.objects
            .iter()
            .filter(|(_, v)| {
                v["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["uid"] == json!(uid)))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Background cascading deletion of everything `owner` owned.
    fn collect_garbage(&mut self, owner: &Value) {
        let uid = owner["metadata"]["uid"].clone();
        for k in self.dependents(owner) {
            let Some(t) = self.find(&k.group, &k.plural).cloned() else { continue };
            let Some(obj) = self.objects.get(&k).cloned() else { continue };
            let others_alive =
                obj["metadata"]["ownerReferences"].as_array().into_iter().flatten().any(|r| {
                    r["uid"] != uid
                        && self.objects.values().any(|o| o["metadata"]["uid"] == r["uid"])
                });
            if others_alive {
                continue;
            }
            let _ = self.delete(&t, &k.namespace, &k.name, false);
        }
    }

    fn orphan_dependents(&mut self, owner: &Value) {
        let uid = owner["metadata"]["uid"].clone();
        for k in self.dependents(owner) {
            let Some(t) = self.find(&k.group, &k.plural).cloned() else { continue };
            let Some(obj) = self.objects.get(&k) else { continue };
            let refs: Vec<Value> = obj["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["uid"] != uid)
                .cloned()
                .collect();
            let _ = self.update(
                &t,
                &k.namespace,
                &k.name,
                "",
                Change::Merge(json!({"metadata": {"ownerReferences": refs}})),
            );
        }
    }

    /// Events after `rv` for a type (and namespace), for watches.
    pub fn events_after(&self, t: &ResourceType, ns: &str, rv: u64) -> Vec<WatchEvent> {
        let start = self.log.partition_point(|e| e.rv <= rv);
        self.log[start..]
            .iter()
            .filter(|e| {
                e.group == t.group && e.plural == t.plural && (ns.is_empty() || e.namespace == ns)
            })
            .cloned()
            .collect()
    }
}

fn finalizers(obj: &Value) -> Vec<Value> {
    obj["metadata"]["finalizers"].as_array().cloned().unwrap_or_default()
}

fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut m = v.as_object().cloned().unwrap_or_default();
        m.remove("metadata");
        m.remove("status");
        m
    };
    strip(old) != strip(new)
}

/// Server-side apply, approximated: the manager's newly applied configuration is merged into
/// the live object; fields it applied before and no longer applies are removed; lists of
/// objects keyed by `name`/`uid`/`type` and lists of scalars merge item by item (items other
/// managers added are kept), other lists are replaced.
pub fn ssa_merge(live: &Value, prev: Option<&Value>, applied: &Value) -> Value {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            let empty = Map::new();
            let p = prev.and_then(|p| p.as_object()).unwrap_or(&empty);
            let mut out = l.clone();
            for (k, av) in a {
                if av.is_null() {
                    out.remove(k);
                    continue;
                }
                let merged = match l.get(k) {
                    Some(lv) if lv.is_object() && av.is_object() => ssa_merge(lv, p.get(k), av),
                    Some(Value::Array(la)) if av.is_array() => merge_list(la, p.get(k), av),
                    _ => av.clone(),
                };
                out.insert(k.clone(), merged);
            }
            for k in p.keys() {
                if !a.contains_key(k) && k != "apiVersion" && k != "kind" {
                    out.remove(k);
                }
            }
            Value::Object(out)
        }
        _ => applied.clone(),
    }
}

fn item_key(v: &Value) -> Option<String> {
    match v {
        Value::Object(o) => {
            ["name", "uid", "type"].iter().find_map(|k| o.get(*k)).map(|k| k.to_string())
        }
        Value::Array(_) => None,
        other => Some(other.to_string()),
    }
}

fn merge_list(live: &[Value], prev: Option<&Value>, applied: &Value) -> Value {
    let a = applied.as_array().cloned().unwrap_or_default();
    let keyed = a.iter().chain(live.iter()).all(|v| item_key(v).is_some());
    if !keyed {
        return applied.clone();
    }
    let prev_keys: Vec<String> =
        prev.and_then(|p| p.as_array()).into_iter().flatten().filter_map(item_key).collect();
    let applied_keys: Vec<String> = a.iter().filter_map(item_key).collect();
    let mut out = a.clone();
    for v in live {
        let k = item_key(v).unwrap_or_default();
        if !prev_keys.contains(&k) && !applied_keys.contains(&k) {
            out.push(v.clone());
        }
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssa_removes_what_the_manager_stopped_applying_and_keeps_others() {
        let live =
            json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x", "mine"]}});
        let prev = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["mine"]}});
        let applied = json!({"metadata": {"labels": {"c": "3"}, "finalizers": []}});
        let out = ssa_merge(&live, Some(&prev), &applied);
        assert_eq!(out, json!({"metadata": {"labels": {"b": "2", "c": "3"}, "finalizers": ["x"]}}));
    }
}
