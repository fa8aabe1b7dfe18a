//! Writes: every change the operator makes to an object is a server-side apply under
//! [`FIELD_MANAGER`](crate::FIELD_MANAGER), forced (the operator owns what it applies).

use crate::{Error, FIELD_MANAGER, Result};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::fmt::Debug;

/// Patch parameters of every apply.
pub fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Server-side applies a typed object (its name is taken from the object).
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = obj.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
    Ok(api.patch(&name, &params(), &Patch::Apply(obj)).await?)
}

/// Server-side applies `status` to the status subresource of a custom resource.
pub async fn apply_status<K>(api: &Api<K>, name: &str, status: &impl Serialize) -> Result<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
        "status": status,
    });
    Ok(api.patch_status(name, &params(), &Patch::Apply(&body)).await?)
}

/// Server-side applies the operator's finalizers of an object (an empty list removes them).
pub async fn apply_finalizers<K>(api: &Api<K>, name: &str, finalizers: &[&str]) -> Result<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name, "finalizers": finalizers },
    });
    Ok(api.patch(name, &params(), &Patch::Apply(&body)).await?)
}

/// Deletes an object if it exists (background propagation); true when it was there.
pub async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// An API for a kind the operator does not link types for (CNPG `Cluster`, `ServiceMonitor`).
pub fn dynamic_api(
    client: &Client,
    ns: &str,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Server-side applies an untyped object (JSON with apiVersion, kind and metadata.name).
pub async fn apply_value(api: &Api<DynamicObject>, obj: &Value) -> Result<DynamicObject> {
    let name = obj["metadata"]["name"].as_str().ok_or(Error::MissingField("metadata.name"))?;
    Ok(api.patch(name, &params(), &Patch::Apply(obj)).await?)
}

/// Whether the API server serves `plural` in `group_version` (a CRD is installed).
pub async fn served(client: &Client, group_version: &str, plural: &str) -> Result<bool> {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == plural)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
