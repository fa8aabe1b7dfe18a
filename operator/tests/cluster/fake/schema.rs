//! What the API server does with a custom resource's openAPIV3Schema: defaulting, pruning of
//! unknown fields, structural validation (types, required, ranges, enums, lengths) and the
//! CEL `x-kubernetes-validations` rules (evaluated with kube-cel, transition rules included).

use serde_json::{Map, Value};

/// Applies defaults and prunes unknown fields, as the apiserver does before validation.
pub fn default_and_prune(schema: &Value, obj: &Value) -> Value {
    let mut v = kube_cel::apply_defaults(schema, obj);
    prune(schema, &mut v, true);
    v
}

fn prune(schema: &Value, v: &mut Value, root: bool) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match v {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                map.retain(|k, _| {
                    props.contains_key(k)
                        || (root && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
                });
                for (k, child) in map.iter_mut() {
                    if let Some(s) = props.get(k) {
                        prune(s, child, false);
                    }
                }
            } else if let Some(add) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for child in map.values_mut() {
                    prune(add, child, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for child in items {
                    prune(s, child, false);
                }
            }
        }
        _ => {}
    }
}

/// Structural validation errors, as `path: message`.
pub fn validate(schema: &Value, obj: &Value) -> Vec<String> {
    let mut errors = vec![];
    walk(schema, obj, "", &mut errors, true);
    errors
}

fn walk(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>, root: bool) {
    let s = schema.as_object().cloned().unwrap_or_default();
    if v.is_null() {
        if s.get("nullable") != Some(&Value::Bool(true)) && !root {
            errors.push(format!("{path}: Invalid value: \"null\": must not be null"));
        }
        return;
    }
    if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        return;
    }
    let ty = s.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!(
            "{path}: Invalid value: {}: {path} in body must be of type {ty}",
            short(v)
        ));
        return;
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = s.get("minimum").and_then(|m| m.as_f64())
            && n < min
        {
            errors.push(format!("{path}: Invalid value: {}: {path} in body should be greater than or equal to {min}", short(v)));
        }
        if let Some(max) = s.get("maximum").and_then(|m| m.as_f64())
            && n > max
        {
            errors.push(format!(
                "{path}: Invalid value: {}: {path} in body should be less than or equal to {max}",
                short(v)
            ));
        }
    }
    if let Some(st) = v.as_str() {
        let len = st.chars().count() as u64;
        if let Some(min) = s.get("minLength").and_then(|m| m.as_u64())
            && len < min
        {
            errors.push(format!(
                "{path}: Invalid value: {}: {path} in body should be at least {min} chars long",
                short(v)
            ));
        }
        if let Some(max) = s.get("maxLength").and_then(|m| m.as_u64())
            && len > max
        {
            errors.push(format!("{path}: Too long: may not be more than {max} bytes"));
        }
    }
    if let (Some(st), Some(pattern)) = (v.as_str(), s.get("pattern").and_then(|p| p.as_str()))
        && !regex::Regex::new(pattern).is_ok_and(|re| re.is_match(st))
    {
        errors.push(format!(
            "{path}: Invalid value: {}: {path} in body should match '{pattern}'",
            short(v)
        ));
    }
    if let Some(allowed) = s.get("enum").and_then(|e| e.as_array())
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(short).collect();
        errors.push(format!(
            "{path}: Unsupported value: {}: supported values: {}",
            short(v),
            list.join(", ")
        ));
    }
    match v {
        Value::Object(map) => {
            for r in s.get("required").and_then(|r| r.as_array()).into_iter().flatten() {
                if let Some(k) = r.as_str()
                    && !map.contains_key(k)
                {
                    errors.push(format!("{}: Required value", join(path, k)));
                }
            }
            let props: Map<String, Value> =
                s.get("properties").and_then(|p| p.as_object()).cloned().unwrap_or_default();
            for (k, child) in map {
                if root && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(cs) = props.get(k) {
                    walk(cs, child, &join(path, k), errors, false);
                } else if let Some(add) = s.get("additionalProperties").filter(|a| a.is_object()) {
                    walk(add, child, &join(path, k), errors, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = s.get("items") {
                for (i, child) in items.iter().enumerate() {
                    walk(is, child, &format!("{path}[{i}]"), errors, false);
                }
            }
        }
        _ => {}
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() { k.to_string() } else { format!("{path}.{k}") }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 { format!("{}...", &s[..57]) } else { s }
}

/// CEL rules (with `old` for transition rules), as `path: message`.
pub fn cel(schema: &Value, obj: &Value, old: Option<&Value>) -> Vec<String> {
    match kube_cel::Validator::new().validate(schema, obj, old) {
        Ok(()) => vec![],
        Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
    }
}

/// Fields of `obj` the schema does not know (what `fieldValidation=Strict` refuses).
pub fn unknown_fields(schema: &Value, obj: &Value) -> Vec<String> {
    let mut out = vec![];
    unknown(schema, obj, "", &mut out, true);
    out
}

fn unknown(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>, root: bool) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(|p| p.as_object());
            let add = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, child) in map {
                if root && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match (props.and_then(|p| p.get(k)), add) {
                    (Some(s), _) | (None, Some(s)) => unknown(s, child, &join(path, k), out, false),
                    (None, None) if props.is_some() => out.push(join(path, k)),
                    (None, None) => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, child) in items.iter().enumerate() {
                    unknown(s, child, &format!("{path}[{i}]"), out, false);
                }
            }
        }
        _ => {}
    }
}

/// What `resource.Quantity` accepts when the server decodes a built-in object.
pub const QUANTITY: &str = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$";

/// Quantities under any `resources.{limits,requests}` (containers, volume claims) that the
/// real server could not decode, as its error says.
pub fn invalid_quantities(obj: &Value) -> Vec<String> {
    let mut out = vec![];
    quantities(obj, &mut out);
    out
}

fn quantities(v: &Value, out: &mut Vec<String>) {
    let re = regex::Regex::new(QUANTITY).expect("quantity regex");
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "resources" {
                    for part in ["limits", "requests"] {
                        for q in child
                            .get(part)
                            .and_then(|q| q.as_object())
                            .into_iter()
                            .flat_map(|q| q.values())
                        {
                            let ok = q.is_number() || q.as_str().is_some_and(|s| re.is_match(s));
                            if !ok {
                                out.push(format!(
                                    "quantities must match the regular expression '{QUANTITY}'"
                                ));
                            }
                        }
                    }
                }
                quantities(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| quantities(i, out)),
        _ => {}
    }
}
