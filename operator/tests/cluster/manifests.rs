//! Every file in crds/ and examples/, every generated object and every rendered chart
//! template parses as the typed object it claims to be; CRDs do not drift; the schema and CEL
//! rules refuse invalid specs with clear messages.

use crate::fake::schema;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::DynamicObject;
use omega_operator::crd::{FederationRound, Shard};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    v.sort();
    v
}

/// Parses a manifest as the typed object its kind names.
fn typed(doc: &Value) -> Result<(), String> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let r = match kind {
        "Shard" => serde_json::from_value::<Shard>(doc.clone()).map(|_| ()),
        "FederationRound" => serde_json::from_value::<FederationRound>(doc.clone()).map(|_| ()),
        "CustomResourceDefinition" => {
            serde_json::from_value::<CustomResourceDefinition>(doc.clone()).map(|_| ())
        }
        "Deployment" => serde_json::from_value::<Deployment>(doc.clone()).map(|_| ()),
        "Service" => serde_json::from_value::<Service>(doc.clone()).map(|_| ()),
        "ServiceAccount" => serde_json::from_value::<ServiceAccount>(doc.clone()).map(|_| ()),
        "ClusterRole" => serde_json::from_value::<ClusterRole>(doc.clone()).map(|_| ()),
        "ClusterRoleBinding" => {
            serde_json::from_value::<ClusterRoleBinding>(doc.clone()).map(|_| ())
        }
        "Role" => serde_json::from_value::<Role>(doc.clone()).map(|_| ()),
        "RoleBinding" => serde_json::from_value::<RoleBinding>(doc.clone()).map(|_| ()),
        "ServiceMonitor" | "Cluster" => {
            serde_json::from_value::<DynamicObject>(doc.clone()).map(|_| ())
        }
        other => return Err(format!("unexpected kind {other:?}")),
    };
    r.map_err(|e| format!("{kind}: {e}"))
}

#[test]
fn crds_on_disk_match_the_types() {
    for dir in ["crds", "charts/omega/crds"] {
        for (file, crd) in omega_operator::crd::all() {
            let want = omega_operator::crd::to_yaml(&crd).unwrap();
            let have = std::fs::read_to_string(repo().join(dir).join(file)).unwrap_or_default();
            assert!(
                have == want,
                "{dir}/{file} is stale: run `cargo run -p omega-operator -- crdgen`"
            );
        }
    }
}

#[test]
fn crd_and_example_files_parse_as_typed_objects() {
    let mut seen = 0;
    for dir in ["crds", "examples", "e2e/k8s"] {
        for f in files(&repo().join(dir)) {
            for doc in yaml_docs(&std::fs::read_to_string(&f).unwrap()) {
                typed(&doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                seen += 1;
            }
        }
    }
    assert!(seen >= 7, "{seen} documents");
}

fn schema_of(crd: &CustomResourceDefinition) -> Value {
    serde_json::to_value(
        crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap(),
    )
    .unwrap()
}

/// What the API server would say about `obj` (after defaulting and pruning).
fn admit(crd: &CustomResourceDefinition, obj: &Value, old: Option<&Value>) -> Vec<String> {
    let s = schema_of(crd);
    let obj = schema::default_and_prune(&s, obj);
    let mut errors = schema::validate(&s, &obj);
    if errors.is_empty() {
        errors = schema::cel(&s, &obj, old.map(|o| schema::default_and_prune(&s, o)).as_ref());
    }
    errors
}

#[test]
fn examples_pass_the_schema_and_cel_rules() {
    for f in files(&repo().join("examples")) {
        for doc in yaml_docs(&std::fs::read_to_string(&f).unwrap()) {
            let crd =
                if doc["kind"] == json!("Shard") { Shard::crd() } else { FederationRound::crd() };
            assert_eq!(admit(&crd, &doc, None), Vec::<String>::new(), "{}", f.display());
        }
    }
    let prod: Value =
        yaml_docs(&std::fs::read_to_string(repo().join("examples/shard-production.yaml")).unwrap())
            [0]
        .clone();
    assert_eq!(
        (prod["spec"]["replicas"]["min"].clone(), prod["spec"]["postgres"]["instances"].clone()),
        (json!(10), json!(3))
    );
}

#[test]
fn invalid_specs_are_refused_with_clear_messages() {
    let shard = |spec: Value| json!({"apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "Shard", "metadata": {"name": "s"}, "spec": spec});
    let round = |spec: Value| json!({"apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "FederationRound", "metadata": {"name": "r"}, "spec": spec});
    let cases: Vec<(&str, CustomResourceDefinition, Value, &str)> = vec![
        (
            "min > max",
            Shard::crd(),
            shard(json!({"shardId": 1, "replicas": {"min": 4, "max": 2}})),
            "replicas.min must not exceed replicas.max",
        ),
        ("missing shardId", Shard::crd(), shard(json!({})), "spec.shardId: Required value"),
        (
            "negative shardId",
            Shard::crd(),
            shard(json!({"shardId": -3})),
            "greater than or equal to 0",
        ),
        (
            "zero replicas",
            Shard::crd(),
            shard(json!({"shardId": 1, "replicas": {"min": 0, "max": 2}})),
            "spec.replicas.min",
        ),
        (
            "unknown mode",
            Shard::crd(),
            shard(json!({"shardId": 1, "postgres": {"mode": "mysql"}})),
            "supported values: \"managed\", \"cloudnativepg\", \"external\"",
        ),
        (
            "external without secret",
            Shard::crd(),
            shard(json!({"shardId": 1, "postgres": {"mode": "external"}})),
            "externalSecretRef is required",
        ),
        (
            "too many instances",
            Shard::crd(),
            shard(json!({"shardId": 1, "postgres": {"instances": 12}})),
            "less than or equal to 9",
        ),
        (
            "bad service type",
            Shard::crd(),
            shard(json!({"shardId": 1, "serviceType": "Ingress"})),
            "Unsupported value",
        ),
        (
            "min quality above 1",
            FederationRound::crd(),
            round(json!({"minQuality": 1.5})),
            "spec.minQuality",
        ),
        (
            "zero sources",
            FederationRound::crd(),
            round(json!({"minSources": 0})),
            "spec.minSources",
        ),
        (
            "delta of 1",
            FederationRound::crd(),
            round(json!({"privacy": {"epsilon": 1.0, "delta": 1.0}})),
            "privacy.delta must be below 1",
        ),
        (
            "no epsilon",
            FederationRound::crd(),
            round(json!({"privacy": {"delta": 0.1}})),
            "epsilon: Required value",
        ),
    ];
    for (name, crd, obj, message) in cases {
        let errors = admit(&crd, &obj, None);
        assert!(errors.iter().any(|e| e.contains(message)), "{name}: {errors:?}");
    }
    // Transition rule: shardId cannot change, other fields can.
    let old = shard(json!({"shardId": 1}));
    let errors = admit(&Shard::crd(), &shard(json!({"shardId": 2})), Some(&old));
    assert!(errors.iter().any(|e| e.contains("shardId is immutable")), "{errors:?}");
    assert!(
        admit(&Shard::crd(), &shard(json!({"shardId": 1, "region": "eu"})), Some(&old)).is_empty()
    );
}

#[test]
fn the_crd_yaml_carries_the_cel_rules_and_subresources() {
    let text =
        std::fs::read_to_string(repo().join("crds/shards.omega.exogenesis.io.yaml")).unwrap();
    for needle in [
        "rule: self == oldSelf",
        "rule: self.min <= self.max",
        "specReplicasPath: .spec.replicas.min",
        "shortNames:\n    - shd",
        "status: {}",
    ] {
        assert!(text.contains(needle), "missing {needle:?}");
    }
    let text =
        std::fs::read_to_string(repo().join("crds/federationrounds.omega.exogenesis.io.yaml"))
            .unwrap();
    assert!(text.contains("- fr") && text.contains("privacy.delta must be below 1"));
}

fn render(values: Value) -> Option<Value> {
    let out = std::process::Command::new("python3")
        .arg(repo().join("charts/omega/ci/render.py"))
        .arg(repo().join("charts/omega"))
        .arg(values.to_string())
        .output()
        .ok()?;
    if out.status.code() == Some(3) {
        eprintln!(
            "chart: SKIPPED helm lint/render — {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    assert!(out.status.success(), "render.py: {}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn rendered_docs(r: &Value) -> Vec<Value> {
    r["manifests"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|t| yaml_docs(t.as_str().unwrap()))
        .collect()
}

#[test]
fn chart_lints_renders_and_grants_what_the_operator_uses() {
    // Without helm-python-sdk, at least the chart's own files must parse.
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("charts/omega/Chart.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(chart["name"], json!("omega"));
    let _: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("charts/omega/values.yaml")).unwrap(),
    )
    .unwrap();
    let Some(r) = render(json!({})) else { return };
    assert_eq!(r["lint"]["errors"], json!([]), "{}", r["lint"]);
    assert!(
        r["lint"]["messages"].as_array().unwrap().iter().all(|m| m["severity"].as_i64() < Some(2)),
        "{}",
        r["lint"]
    );
    let docs = rendered_docs(&r);
    for d in &docs {
        typed(d).unwrap_or_else(|e| panic!("{e}"));
    }
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let crds: Vec<String> = r["crds"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(crds.len(), 2, "{crds:?}");

    // The operator Deployment: non-root, read-only, no capabilities, the label NetworkPolicies admit.
    let dep: Deployment = serde_json::from_value(
        docs.iter().find(|d| d["kind"] == json!("Deployment")).unwrap().clone(),
    )
    .unwrap();
    let pod = dep.spec.unwrap().template;
    assert_eq!(pod.metadata.unwrap().labels.unwrap()["app.kubernetes.io/name"], "omega-operator");
    let c = &pod.spec.unwrap().containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!((sc.read_only_root_filesystem, sc.run_as_non_root), (Some(true), Some(true)));
    assert_eq!(c.args.clone().unwrap(), vec!["run".to_string()]);

    // Least privilege, but enough: every (group, resource, verb) the reconcilers use is granted.
    let role: ClusterRole = serde_json::from_value(
        docs.iter().find(|d| d["kind"] == json!("ClusterRole")).unwrap().clone(),
    )
    .unwrap();
    let rules = role.rules.unwrap();
    let granted = |g: &str, res: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|x| x == g)
                && r.resources.iter().flatten().any(|x| x == res)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    let needed = [
        ("omega.exogenesis.io", "shards", &["get", "list", "watch", "patch"][..]),
        ("omega.exogenesis.io", "shards/status", &["patch"][..]),
        (
            "omega.exogenesis.io",
            "federationrounds",
            &["get", "list", "watch", "create", "patch", "delete"][..],
        ),
        ("omega.exogenesis.io", "federationrounds/status", &["patch"][..]),
        ("apps", "statefulsets", &["get", "list", "watch", "create", "patch", "delete"][..]),
        ("", "services", &["create", "patch"][..]),
        ("", "secrets", &["get", "create", "patch"][..]),
        ("", "pods", &["list", "watch"][..]),
        ("", "persistentvolumeclaims", &["list", "deletecollection"][..]),
        ("policy", "poddisruptionbudgets", &["create", "patch"][..]),
        ("networking.k8s.io", "networkpolicies", &["create", "patch"][..]),
        ("batch", "jobs", &["get", "list", "watch", "create", "patch"][..]),
        ("events.k8s.io", "events", &["create", "patch"][..]),
        ("postgresql.cnpg.io", "clusters", &["get", "create", "patch", "delete"][..]),
        ("monitoring.coreos.com", "servicemonitors", &["create", "patch"][..]),
    ];
    for (g, res, verbs) in needed {
        for v in verbs {
            assert!(granted(g, res, v), "{v} {res}.{g} not granted");
        }
    }
    assert!(
        !rules
            .iter()
            .any(|r| r.verbs.iter().any(|v| v == "*")
                || r.resources.iter().flatten().any(|x| x == "*")),
        "no wildcards"
    );

    // values.schema.json refuses bad values with the path and the constraint.
    let bad = std::process::Command::new("python3")
        .arg(repo().join("charts/omega/ci/render.py"))
        .arg(repo().join("charts/omega"))
        .arg(json!({"logFormat": "xml"}).to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("'/logFormat': value must be one of"), "{err}");

    // Namespace-scoped install: a Role in the watched namespace instead of a ClusterRole.
    let scoped =
        render(json!({"watchNamespace": "tv", "serviceMonitor": {"enabled": true}})).unwrap();
    let docs = rendered_docs(&scoped);
    assert!(!docs.iter().any(|d| d["kind"] == json!("ClusterRole")));
    assert!(
        docs.iter()
            .any(|d| d["kind"] == json!("Role") && d["metadata"]["namespace"] == json!("tv"))
    );
    assert!(docs.iter().any(|d| d["kind"] == json!("ServiceMonitor")));
    let dep = docs.iter().find(|d| d["kind"] == json!("Deployment")).unwrap();
    let env = dep["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["name"] == json!("WATCH_NAMESPACE") && e["value"] == json!("tv")));
}
