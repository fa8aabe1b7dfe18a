//! Mock controllers of the fake cluster: what the StatefulSet controller, the kubelet, the
//! Job controller and CloudNativePG would do, reduced to what the operator observes.
//! - StatefulSets get pods `<sts>-<i>` (owned, labelled from the template) and PVCs from their
//!   claim templates; pods become Ready with IP 127.0.0.1 unless the image name contains
//!   `does-not-exist` (then `ImagePullBackOff`); the REST port named `http` can be redirected
//!   to an in-test stats server; StatefulSet status counts ready pods.
//! - Jobs get one pod that terminates at once with the termination message a test hook
//!   writes (by default a succeeded `RoundSummary` for the round id and shards in its args).
//! - CNPG Clusters (when that CRD was installed) report all instances ready.

use super::store::{Change, Store};
use serde_json::{Value, json};

/// What a Job's pod did.
pub struct JobRun {
    pub exit_code: i32,
    pub message: String,
}

/// Runs a federate Job: from the container args to the pod's outcome.
pub type JobHook = Box<dyn Fn(&[String]) -> JobRun + Send>;

/// Knobs tests turn.
pub struct Behaviour {
    /// Pods pass readiness.
    pub pods_ready: bool,
    /// Port that pods' `http` container port is rewritten to (the in-test stats server).
    pub stats_port: Option<u16>,
    /// Runs a federate Job: from the container args to the pod's outcome.
    pub job: JobHook,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour { pods_ready: true, stats_port: None, job: Box::new(default_job) }
    }
}

/// A succeeded round over the shards given in `--shards`.
pub fn default_job(args: &[String]) -> JobRun {
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_default()
    };
    let shards = arg("--shards").split(',').filter(|s| !s.is_empty()).count() as u32;
    let summary = omega_protocol::admin::RoundSummary {
        round_id: arg("--round-id"),
        outcome: omega_protocol::admin::RoundOutcome::Succeeded,
        shards_total: shards,
        shards_completed: shards,
        shards_failed: vec![],
        patterns_in: 120,
        groups: 30,
        patterns_aggregated: 17,
        collaborative_vectors: 17,
        groups_suppressed: 13,
        trends_detected: 4,
        global_version: 1,
        privacy: None,
        already_published: false,
        duration_ms: 42,
        message: None,
    };
    JobRun { exit_code: 0, message: serde_json::to_string(&summary).expect("summary") }
}

fn owner(obj: &Value) -> Value {
    json!({
        "apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
    })
}

fn owned_by(obj: &Value, owner: &Value) -> bool {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|r| r.iter().any(|o| o["uid"] == owner["metadata"]["uid"]))
}

fn stuck(pod_spec: &Value) -> bool {
    pod_spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["image"].as_str().is_some_and(|i| i.contains("does-not-exist")))
}

fn pod_status(spec: &Value, ready: bool, phase: &str, state: Value) -> Value {
    let statuses: Vec<Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": ready, "restartCount": 0, "state": state}))
        .collect();
    json!({
        "phase": phase,
        "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        "containerStatuses": statuses,
    })
}

/// One pass of every mock controller.
pub fn tick(store: &mut Store, b: &Behaviour) {
    statefulsets(store, b);
    jobs(store, b);
    cnpg(store);
}

fn statefulsets(store: &mut Store, b: &Behaviour) {
    let (Some(sts_t), Some(pod_t), Some(pvc_t)) = (
        store.find("apps", "statefulsets").cloned(),
        store.find("", "pods").cloned(),
        store.find("", "persistentvolumeclaims").cloned(),
    ) else {
        return;
    };
    for sts in store.list(&sts_t, "") {
        let ns = sts["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let name = sts["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if sts["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        let replicas = sts["spec"]["replicas"].as_i64().unwrap_or(1);
        let template = &sts["spec"]["template"];
        let retention = sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"]
            .as_str()
            .unwrap_or("Retain");
        for i in 0..replicas {
            let pod_name = format!("{name}-{i}");
            for claim in sts["spec"]["volumeClaimTemplates"].as_array().into_iter().flatten() {
                let pvc_name =
                    format!("{}-{pod_name}", claim["metadata"]["name"].as_str().unwrap_or("data"));
                if store.get(&pvc_t, &ns, &pvc_name).is_none() {
                    let mut meta = json!({"name": pvc_name, "labels": claim["metadata"]["labels"]});
                    if retention == "Delete" {
                        meta["ownerReferences"] = json!([owner(&sts)]);
                    }
                    let _ = store.create(&pvc_t, &ns, json!({"metadata": meta, "spec": claim["spec"], "status": {"phase": "Bound"}}));
                }
            }
            if store.get(&pod_t, &ns, &pod_name).is_none() {
                let mut spec = template["spec"].clone();
                if let Some(port) = b.stats_port {
                    for c in spec["containers"].as_array_mut().into_iter().flatten() {
                        for p in c["ports"].as_array_mut().into_iter().flatten() {
                            if p["name"] == json!("http") {
                                p["containerPort"] = json!(port);
                            }
                        }
                    }
                }
                let mut labels = template["metadata"]["labels"].clone();
                labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
                let pod = json!({"metadata": {"name": pod_name, "labels": labels, "ownerReferences": [owner(&sts)]}, "spec": spec});
                let _ = store.create(&pod_t, &ns, pod);
            }
            if let Some(pod) = store.get(&pod_t, &ns, &pod_name).cloned() {
                let blocked = stuck(&pod["spec"]);
                let ready = b.pods_ready && !blocked;
                let state = if blocked {
                    json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image: not found"}})
                } else {
                    json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}})
                };
                let status = pod_status(
                    &pod["spec"],
                    ready,
                    if blocked { "Pending" } else { "Running" },
                    state,
                );
                let _ = store.update(
                    &pod_t,
                    &ns,
                    &pod_name,
                    "status",
                    Change::Merge(json!({"status": status})),
                );
            }
        }
        let pods: Vec<Value> =
            store.list(&pod_t, &ns).into_iter().filter(|p| owned_by(p, &sts)).collect();
        for p in &pods {
            let ordinal = p["metadata"]["name"]
                .as_str()
                .and_then(|n| n.rsplit('-').next())
                .and_then(|o| o.parse::<i64>().ok());
            if ordinal.is_some_and(|o| o >= replicas) {
                let _ = store.delete(
                    &pod_t,
                    &ns,
                    p["metadata"]["name"].as_str().unwrap_or_default(),
                    false,
                );
            }
        }
        let pods: Vec<Value> =
            store.list(&pod_t, &ns).into_iter().filter(|p| owned_by(p, &sts)).collect();
        let ready =
            pods.iter().filter(|p| p["status"]["conditions"][0]["status"] == json!("True")).count();
        let status = json!({
            "replicas": pods.len(), "readyReplicas": ready, "availableReplicas": ready,
            "currentReplicas": pods.len(), "updatedReplicas": pods.len(),
            "observedGeneration": sts["metadata"]["generation"],
        });
        let _ =
            store.update(&sts_t, &ns, &name, "status", Change::Merge(json!({"status": status})));
    }
}

fn jobs(store: &mut Store, b: &Behaviour) {
    let (Some(job_t), Some(pod_t)) =
        (store.find("batch", "jobs").cloned(), store.find("", "pods").cloned())
    else {
        return;
    };
    for job in store.list(&job_t, "") {
        if job["status"]["succeeded"].as_i64().unwrap_or(0) > 0
            || job["status"]["failed"].as_i64().unwrap_or(0) > 0
        {
            continue;
        }
        let ns = job["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let name = job["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let pod_name = format!("{name}-run");
        let spec = job["spec"]["template"]["spec"].clone();
        if store.get(&pod_t, &ns, &pod_name).is_none() {
            let mut labels = job["spec"]["template"]["metadata"]["labels"].clone();
            labels["job-name"] = json!(name);
            labels["batch.kubernetes.io/job-name"] = json!(name);
            let _ = store.create(&pod_t, &ns, json!({"metadata": {"name": pod_name, "labels": labels, "ownerReferences": [owner(&job)]}, "spec": spec}));
        }
        if stuck(&spec) {
            let status = pod_status(
                &spec,
                false,
                "Pending",
                json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}),
            );
            let _ = store.update(
                &pod_t,
                &ns,
                &pod_name,
                "status",
                Change::Merge(json!({"status": status})),
            );
            let _ = store.update(
                &job_t,
                &ns,
                &name,
                "status",
                Change::Merge(json!({"status": {"active": 1}})),
            );
            continue;
        }
        let args: Vec<String> = spec["containers"][0]["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        let run = (b.job)(&args);
        let ok = run.exit_code == 0;
        let state = json!({"terminated": {"exitCode": run.exit_code, "reason": if ok { "Completed" } else { "Error" }, "message": run.message}});
        let status = pod_status(&spec, false, if ok { "Succeeded" } else { "Failed" }, state);
        let _ = store.update(
            &pod_t,
            &ns,
            &pod_name,
            "status",
            Change::Merge(json!({"status": status})),
        );
        let job_status = if ok {
            json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        } else {
            json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
        };
        let _ = store.update(
            &job_t,
            &ns,
            &name,
            "status",
            Change::Merge(json!({"status": job_status})),
        );
    }
}

fn cnpg(store: &mut Store) {
    let (Some(t), Some(secret_t)) =
        (store.find("postgresql.cnpg.io", "clusters").cloned(), store.find("", "secrets").cloned())
    else {
        return;
    };
    for c in store.list(&t, "") {
        let ns = c["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let name = c["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let app = format!("{name}-app");
        if store.get(&secret_t, &ns, &app).is_none() {
            use base64::Engine as _;
            let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
            let uri = format!("postgres://omega:pw@{name}-rw.{ns}.svc:5432/omega");
            let _ = store.create(
                &secret_t,
                &ns,
                json!({"metadata": {"name": app, "ownerReferences": [owner(&c)]},
                "data": {"username": enc("omega"), "password": enc("pw"), "uri": enc(&uri)}}),
            );
        }
        let status = json!({"instances": c["spec"]["instances"], "readyInstances": c["spec"]["instances"], "phase": "Cluster in healthy state"});
        let _ = store.update(&t, &ns, &name, "status", Change::Merge(json!({"status": status})));
    }
}
