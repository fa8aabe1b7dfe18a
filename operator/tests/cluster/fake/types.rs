//! Resource types the fake API server serves: built-in kinds, plus kinds registered by
//! creating a CustomResourceDefinition.

use serde_json::{Value, json};

/// One served resource type.
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub status_subresource: bool,
    /// `(specReplicasPath, statusReplicasPath, labelSelectorPath)` without the leading dot.
    pub scale: Option<(String, String, Option<String>)>,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// openAPIV3Schema of a CRD version (validation, defaults, pruning, CEL).
    pub schema: Option<Value>,
    /// additionalPrinterColumns: (name, type, jsonPath).
    pub columns: Vec<(String, String, String)>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Has `metadata.generation` bumped on spec changes (everything but a few core kinds).
    pub fn has_generation(&self) -> bool {
        let core_without = self.group.is_empty()
            && matches!(self.kind.as_str(), "Secret" | "ConfigMap" | "Event" | "Namespace");
        let group_without = self.group == "events.k8s.io" || self.group == "coordination.k8s.io";
        !(core_without || group_without)
    }

    pub fn discovery_entry(&self) -> Vec<Value> {
        let verbs = json!([
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch"
        ]);
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.status_subresource {
            out.push(json!({"name": format!("{}/status", self.plural), "singularName": "", "namespaced": self.namespaced, "kind": self.kind, "verbs": ["get", "patch", "update"]}));
        }
        if self.scale.is_some() {
            out.push(json!({"name": format!("{}/scale", self.plural), "singularName": "", "namespaced": self.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
        }
        out
    }
}

fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    status: bool,
    short: &[&str],
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        namespaced,
        status_subresource: status,
        scale: None,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: vec![],
        schema: None,
        columns: vec![],
    }
}

/// Built-in kinds the operator, the chart and kubectl use.
pub fn builtins() -> Vec<ResourceType> {
    let mut sts = builtin("apps", "v1", "StatefulSet", "statefulsets", true, true, &["sts"]);
    sts.scale = Some(("spec.replicas".into(), "status.replicas".into(), None));
    vec![
        builtin("", "v1", "Namespace", "namespaces", false, true, &["ns"]),
        builtin("", "v1", "Pod", "pods", true, true, &["po"]),
        builtin("", "v1", "Service", "services", true, true, &["svc"]),
        builtin("", "v1", "Secret", "secrets", true, false, &[]),
        builtin("", "v1", "ConfigMap", "configmaps", true, false, &["cm"]),
        builtin("", "v1", "ServiceAccount", "serviceaccounts", true, false, &["sa"]),
        builtin("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", true, true, &["pvc"]),
        builtin("", "v1", "Event", "events", true, false, &["ev"]),
        sts,
        builtin("apps", "v1", "Deployment", "deployments", true, true, &["deploy"]),
        builtin("batch", "v1", "Job", "jobs", true, true, &[]),
        builtin("batch", "v1", "CronJob", "cronjobs", true, true, &["cj"]),
        builtin(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
            true,
            &["pdb"],
        ),
        builtin(
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
            true,
            false,
            &["netpol"],
        ),
        builtin("coordination.k8s.io", "v1", "Lease", "leases", true, false, &[]),
        builtin("events.k8s.io", "v1", "Event", "events", true, false, &["ev"]),
        builtin("rbac.authorization.k8s.io", "v1", "Role", "roles", true, false, &[]),
        builtin("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", true, false, &[]),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
            false,
            &[],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            false,
            &[],
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            true,
            &["crd", "crds"],
        ),
    ]
}

/// Resource types a CRD object declares (one per served version).
pub fn from_crd(crd: &Value) -> Vec<ResourceType> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let mut out = vec![];
    for v in spec["versions"].as_array().into_iter().flatten() {
        if v["served"] == json!(false) {
            continue;
        }
        let scale = v["subresources"]["scale"].as_object().map(|s| {
            let path = |k: &str| {
                s.get(k).and_then(|p| p.as_str()).map(|p| p.trim_start_matches('.').to_string())
            };
            (
                path("specReplicasPath").unwrap_or_default(),
                path("statusReplicasPath").unwrap_or_default(),
                path("labelSelectorPath"),
            )
        });
        out.push(ResourceType {
            group: spec["group"].as_str().unwrap_or_default().into(),
            version: v["name"].as_str().unwrap_or_default().into(),
            kind: names["kind"].as_str().unwrap_or_default().into(),
            plural: names["plural"].as_str().unwrap_or_default().into(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| names["kind"].as_str().unwrap_or_default().to_lowercase()),
            namespaced: spec["scope"] == json!("Namespaced"),
            status_subresource: v["subresources"]["status"].is_object(),
            scale,
            short_names: strs(&names["shortNames"]),
            categories: strs(&names["categories"]),
            schema: v["schema"]["openAPIV3Schema"].as_object().map(|o| Value::Object(o.clone())),
            columns: v["additionalPrinterColumns"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                    (s("name"), s("type"), s("jsonPath"))
                })
                .collect(),
        });
    }
    out
}
