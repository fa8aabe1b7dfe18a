//! The operator's real controllers, in process, against the fake API server.

use crate::fake::Fake;
use crate::support::*;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use omega_operator::crd::{FederationRound, Shard};
use serde_json::{Value, json};
use std::time::Duration;

fn shard(name: &str, shard_id: i64, extra: Value) -> Shard {
    let mut spec = json!({
        "shardId": shard_id,
        "region": "eu-test",
        "replicas": {"min": 1, "max": 6},
        "autoscaling": {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0},
        "image": "omega-shard:test",
    });
    json_patch::merge(&mut spec, &extra);
    serde_json::from_value(json!({
        "apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "Shard",
        "metadata": {"name": name, "labels": {"tier": "prod"}}, "spec": spec,
    }))
    .unwrap()
}

fn phase(fake: &Fake, group: &str, plural: &str, ns: &str, name: &str) -> Option<String> {
    fake.get(group, plural, ns, name)?["status"]["phase"].as_str().map(String::from)
}

async fn running(fake: &Fake, ns: &str, name: &str) -> Value {
    fake.wait_for(30, &format!("shard {name} Running and Ready"), |f| {
        let s = f.get("omega.exogenesis.io", "shards", ns, name)?;
        (s["status"]["phase"] == json!("Running")
            && condition(&s, "Ready")?["status"] == json!("True"))
        .then_some(s)
    })
    .await
}

/// What the operator did about one object tree (`name` and its children `name-*`) over a
/// window: its reconciles, its requests naming the tree, and how many of those changed
/// something (a new resourceVersion).
#[derive(Debug)]
struct Activity {
    reconciles: usize,
    requests: usize,
    changes: usize,
}

/// Watches the operator for `window` and reports its activity about `name`'s tree.
/// `reconcile_marker` is the one request every reconcile of that object makes.
async fn activity(
    fake: &Fake,
    ns: &str,
    name: &str,
    reconcile_marker: (&str, &str),
    window: Duration,
) -> Activity {
    let in_tree = |n: &str| n == name || n.starts_with(&format!("{name}-"));
    let start = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let store = fake.store.lock().unwrap();
    let requests: Vec<_> = store
        .requests
        .iter()
        .filter(|r| r.user == crate::fake::OPERATOR && r.at >= start && r.namespace == ns)
        .filter(|r| r.resource != "events" && in_tree(&r.name))
        .collect();
    let changes = requests.iter().filter(|r| r.changed).count();
    Activity {
        reconciles: requests
            .iter()
            .filter(|r| (r.verb.as_str(), r.name.as_str()) == reconcile_marker)
            .count(),
        requests: requests.len(),
        changes,
    }
}

/// Asserts that a Degraded object is retried with backoff and left alone in between: over 6 s
/// (test backoff 0.5 s doubling to 4 s) a handful of reconciles, each a bounded number of
/// requests, none of which changes anything. A hot loop (a write that changes the object
/// every reconcile, or a requeue without backoff) fails every part of it.
async fn assert_backs_off(fake: &Fake, ns: &str, name: &str, marker: (&str, &str)) {
    let a = activity(fake, ns, name, marker, Duration::from_secs(6)).await;
    assert!((1..=5).contains(&a.reconciles), "{name}: {a:?} in 6 s");
    // +1: a reconcile may straddle the start of the window.
    assert!(a.requests <= 20 * (a.reconciles + 1), "{name}: {a:?}");
    assert_eq!(a.changes, 0, "{name}: a Degraded object is not rewritten: {a:?}");
}

fn round(name: &str, spec: Value) -> FederationRound {
    serde_json::from_value(json!({
        "apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "FederationRound",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

async fn degraded(fake: &Fake, plural: &str, ns: &str, name: &str, reason: &str) -> Value {
    fake.wait_for(30, &format!("{name} Degraded/{reason}"), |f| {
        let o = f.get("omega.exogenesis.io", plural, ns, name)?;
        let c = condition(&o, "Degraded")?;
        (c["reason"] == json!(reason) && c["status"] == json!("True")).then_some(o)
    })
    .await
}

fn warned(fake: &Fake, ns: &str, name: &str, reason: &str) -> bool {
    events_for(fake, ns, name).iter().any(|(t, r)| t == "Warning" && r == reason)
}

#[tokio::test]
async fn shard_lifecycle_create_ready_scale_delete() {
    let fake = Fake::start().await;
    install_crds(&fake);
    namespace(&fake, "tv");
    let stats = Stats::start(&fake).await;
    foreign_crd(&fake, "monitoring.coreos.com", "ServiceMonitor", "servicemonitors");
    let op = start_operator(&fake, None, "op-a");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "tv");
    shards.create(&PostParams::default(), &shard("eu1", 1, json!({}))).await.unwrap();

    // Resources created, pods ready, status Ready.
    let s = running(&fake, "tv", "eu1").await;
    assert_eq!(s["status"]["endpoints"]["admin"], json!("http://eu1-admin.tv.svc:50052"));
    assert_eq!(s["metadata"]["finalizers"], json!(["omega.exogenesis.io/ordered-cleanup"]));
    for (group, plural, name) in [
        ("apps", "statefulsets", "eu1"),
        ("apps", "statefulsets", "eu1-postgres"),
        ("", "services", "eu1"),
        ("", "services", "eu1-admin"),
        ("", "services", "eu1-headless"),
        ("", "services", "eu1-postgres"),
        ("", "secrets", "eu1-postgres"),
        ("", "secrets", "eu1-device-token"),
        ("policy", "poddisruptionbudgets", "eu1"),
        ("networking.k8s.io", "networkpolicies", "eu1"),
        ("networking.k8s.io", "networkpolicies", "eu1-postgres"),
    ] {
        let o = fake
            .get(group, plural, "tv", name)
            .unwrap_or_else(|| panic!("{plural}/{name} missing"));
        assert_eq!(o["metadata"]["ownerReferences"][0]["kind"], json!("Shard"), "{plural}/{name}");
    }
    let monitor =
        fake.get("monitoring.coreos.com", "servicemonitors", "tv", "eu1").expect("ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], json!("metrics"));
    let password =
        fake.get("", "secrets", "tv", "eu1-postgres").unwrap()["data"]["password"].clone();
    // Stats are read from the pods: 1 pod × 40 active devices.
    fake.wait_for(10, "activeDevices from pod stats", |f| {
        (f.get("omega.exogenesis.io", "shards", "tv", "eu1")?["status"]["activeDevices"]
            == json!(40))
        .then_some(())
    })
    .await;

    // Steady load: the load is read every 0.5 s, but status is not rewritten (nothing changed).
    let window = Duration::from_secs(5);
    let a = activity(&fake, "tv", "eu1", ("get", "eu1-device-token"), window).await;
    assert!(a.reconciles >= 2, "the load is still read: {a:?}");
    let status_writes = fake
        .operator_requests()
        .iter()
        .filter(|r| r.resource == "shards/status" && r.at.elapsed() < window)
        .count();
    assert_eq!(status_writes, 0, "steady load rewrites no status");

    // Load rises: 250 syncs/s on one server with a target of 100 → 3 servers.
    stats.set(250.0, 100);
    fake.wait_for(20, "scale up to 3", |f| {
        let s = f.get("omega.exogenesis.io", "shards", "tv", "eu1")?;
        (s["status"]["replicas"] == json!(3) && s["status"]["readyReplicas"] == json!(3))
            .then_some(())
    })
    .await;
    assert_eq!(
        fake.get("apps", "statefulsets", "tv", "eu1").unwrap()["spec"]["replicas"],
        json!(3)
    );
    assert!(events_for(&fake, "tv", "eu1").iter().any(|(t, r)| t == "Normal" && r == "ScaledUp"));

    // Load falls: back to one server (down at most max(50 %, 2 pods) per minute).
    stats.set(20.0, 100);
    fake.wait_for(20, "scale down to 1", |f| {
        (f.get("omega.exogenesis.io", "shards", "tv", "eu1")?["status"]["replicas"] == json!(1))
            .then_some(())
    })
    .await;
    assert!(events_for(&fake, "tv", "eu1").iter().any(|(_, r)| r == "ScaledDown"));
    assert_eq!(
        fake.get("", "secrets", "tv", "eu1-postgres").unwrap()["data"]["password"],
        password,
        "password is stable"
    );

    // Every write of the operator to objects it manages is a server-side apply by one manager.
    for w in fake.writes() {
        let by_test = w.verb == "POST" && w.plural == "shards";
        if by_test || w.plural == "events" || w.plural == "leases" || w.verb == "DELETE" {
            continue;
        }
        assert!(w.content_type.starts_with("application/apply-patch"), "{w:?}");
        assert_eq!(w.field_manager.as_deref(), Some("omega-operator"), "{w:?}");
    }

    assert!(
        fake.writes().iter().any(|w| w.plural == "shards" && w.subresource == "status"),
        "status goes through the status subresource"
    );

    // Delete: finalizer orders the teardown, then everything owned is collected.
    shards.delete("eu1", &DeleteParams::default()).await.unwrap();
    fake.wait_for(30, "shard gone", |f| {
        f.get("omega.exogenesis.io", "shards", "tv", "eu1").is_none().then_some(())
    })
    .await;
    let deletes: Vec<String> = fake
        .writes()
        .into_iter()
        .filter(|w| w.verb == "DELETE" && w.plural == "statefulsets")
        .map(|w| w.name)
        .collect();
    let first = |n: &str| deletes.iter().position(|d| d == n).unwrap();
    assert!(
        first("eu1") < first("eu1-postgres"),
        "servers are stopped before the database: {deletes:?}"
    );
    for (group, plural) in [
        ("apps", "statefulsets"),
        ("", "pods"),
        ("", "services"),
        ("policy", "poddisruptionbudgets"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        assert!(fake.list(group, plural, "tv").is_empty(), "{plural} left behind");
    }
    // volumePolicy Retain: the volume and the Secrets its data needs stay, orphaned.
    assert_eq!(fake.list("", "persistentvolumeclaims", "tv").len(), 1);
    let secret = fake.get("", "secrets", "tv", "eu1-postgres").expect("password Secret retained");
    assert!(secret["metadata"]["ownerReferences"].as_array().is_none_or(|o| o.is_empty()));
    assert!(fake.get("", "secrets", "tv", "eu1-device-token").is_some());
    crate::rbac::check(&fake, "lifecycle");
    op.abort();
}

#[tokio::test]
async fn scheduled_backups_follow_the_spec() {
    let fake = Fake::start().await;
    install_crds(&fake);
    foreign_crd(&fake, "postgresql.cnpg.io", "Cluster", "clusters");
    foreign_crd(&fake, "postgresql.cnpg.io", "ScheduledBackup", "scheduledbackups");
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, Some("default"), "op-backup");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    let backup_condition = |f: &Fake, name: &str| {
        let s = f.get("omega.exogenesis.io", "shards", "default", name)?;
        let c = condition(&s, "BackupScheduled")?;
        Some((c["status"].as_str()?.to_string(), c["reason"].as_str()?.to_string()))
    };

    // managed: a pg_dump CronJob on a volume of its own.
    let managed = json!({"backup": {"schedule": "0 2 * * *", "retentionDays": 3}});
    shards.create(&PostParams::default(), &shard("b1", 11, managed)).await.unwrap();
    running(&fake, "default", "b1").await;
    fake.wait_for(30, "b1's CronJob", |f| {
        let cj = f.get("batch", "cronjobs", "default", "b1-backup")?;
        (backup_condition(f, "b1")? == ("True".into(), "Scheduled".into())).then_some(cj)
    })
    .await;
    let cj = fake.get("batch", "cronjobs", "default", "b1-backup").unwrap();
    assert_eq!(cj["spec"]["schedule"], json!("0 2 * * *"));
    let volume = fake.get("", "persistentvolumeclaims", "default", "b1-backup").expect("volume");
    assert!(volume["metadata"]["ownerReferences"].is_null(), "{volume}");

    // A schedule of the right shape that is no schedule: the condition says why, the
    // CronJob goes, the dumps' volume stays, the servers keep running.
    let bad = json!({"spec": {"backup": {"schedule": "61 * * * *"}}});
    shards.patch("b1", &PatchParams::default(), &Patch::Merge(&bad)).await.unwrap();
    fake.wait_for(30, "b1 InvalidBackupSchedule", |f| {
        (backup_condition(f, "b1")? == ("False".into(), "InvalidBackupSchedule".into())
            && f.get("batch", "cronjobs", "default", "b1-backup").is_none())
        .then_some(())
    })
    .await;
    assert!(fake.get("", "persistentvolumeclaims", "default", "b1-backup").is_some());
    assert!(warned(&fake, "default", "b1", "InvalidBackupSchedule"));
    assert_eq!(
        phase(&fake, "omega.exogenesis.io", "shards", "default", "b1").as_deref(),
        Some("Running")
    );

    // cloudnativepg: the Cluster's backup section and a ScheduledBackup (seconds first).
    let cnpg = json!({"postgres": {"mode": "cloudnativepg"}, "backup": {"schedule": "0 3 * * *",
        "cloudnativepg": {"method": "volumeSnapshot", "volumeSnapshotClass": "csi-snap"}}});
    shards.create(&PostParams::default(), &shard("b2", 12, cnpg)).await.unwrap();
    let sb = fake
        .wait_for(30, "b2's ScheduledBackup", |f| {
            f.get("postgresql.cnpg.io", "scheduledbackups", "default", "b2-backup")
        })
        .await;
    assert_eq!(sb["spec"]["schedule"], json!("0 0 3 * * *"));
    assert_eq!(sb["spec"]["cluster"]["name"], json!("b2-postgres"));
    let cluster = fake.get("postgresql.cnpg.io", "clusters", "default", "b2-postgres").unwrap();
    assert_eq!(cluster["spec"]["backup"]["volumeSnapshot"]["className"], json!("csi-snap"));
    fake.wait_for(30, "b2 BackupScheduled", |f| {
        (backup_condition(f, "b2")?.0 == "True").then_some(())
    })
    .await;

    // Backups switched off: the schedule goes.
    let off = json!({"spec": {"backup": null}});
    shards.patch("b2", &PatchParams::default(), &Patch::Merge(&off)).await.unwrap();
    fake.wait_for(30, "b2's ScheduledBackup gone", |f| {
        (f.get("postgresql.cnpg.io", "scheduledbackups", "default", "b2-backup").is_none()
            && backup_condition(f, "b2")? == ("False".into(), "NotConfigured".into()))
            .then_some(())
    })
    .await;
    crate::rbac::check(&fake, "backup");
    op.abort();
}

#[tokio::test]
async fn delete_policy_removes_volumes_and_secrets() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, Some("default"), "op-b");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    shards
        .create(
            &PostParams::default(),
            &shard("d1", 2, json!({"postgres": {"volumePolicy": "Delete"}})),
        )
        .await
        .unwrap();
    running(&fake, "default", "d1").await;
    assert_eq!(fake.list("", "persistentvolumeclaims", "default").len(), 1);
    // A volume the StatefulSet controller does not remove (made before the retention policy,
    // or on a cluster without it): the finalizer deletes it by label.
    let labels = fake.get("", "persistentvolumeclaims", "default", "data-d1-postgres-0").unwrap()
        ["metadata"]["labels"]
        .clone();
    fake.create(
        "",
        "persistentvolumeclaims",
        "default",
        json!({"metadata": {"name": "data-d1-postgres-1", "labels": labels}, "spec": {}}),
    );
    shards.delete("d1", &DeleteParams::default()).await.unwrap();
    // Every Secret of the Shard goes; the namespace's admin credential is shared with the
    // other Shards of the namespace and stays.
    fake.wait_for(30, "everything gone", |f| {
        let secrets: Vec<Value> = f.list("", "secrets", "default");
        (f.get("omega.exogenesis.io", "shards", "default", "d1").is_none()
            && f.list("", "persistentvolumeclaims", "default").is_empty()
            && secrets.len() == 1
            && secrets[0]["metadata"]["name"] == json!("omega-shard-admin"))
        .then_some(())
    })
    .await;
    crate::rbac::check(&fake, "delete_policy");
    op.abort();
}

#[tokio::test]
async fn unsatisfiable_specs_degrade_with_backoff_and_recover() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, None, "op-c");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    shards
        .create(
            &PostParams::default(),
            &shard(
                "ext",
                3,
                json!({"postgres": {"mode": "external", "externalSecretRef": {"name": "db-url"}}}),
            ),
        )
        .await
        .unwrap();
    shards
        .create(
            &PostParams::default(),
            &shard("cnpg", 4, json!({"postgres": {"mode": "cloudnativepg"}})),
        )
        .await
        .unwrap();
    shards
        .create(
            &PostParams::default(),
            &shard("badimg", 5, json!({"image": "registry.invalid/does-not-exist:1"})),
        )
        .await
        .unwrap();

    for (name, reason) in [
        ("ext", "SecretNotFound"),
        ("cnpg", "CloudNativePGNotInstalled"),
        ("badimg", "ImagePullBackOff"),
    ] {
        let s = fake
            .wait_for(20, &format!("{name} Degraded/{reason}"), |f| {
                let s = f.get("omega.exogenesis.io", "shards", "default", name)?;
                (condition(&s, "Degraded")?["reason"] == json!(reason)).then_some(s)
            })
            .await;
        assert_eq!(s["status"]["phase"], json!("Degraded"), "{name}");
        assert_eq!(condition(&s, "Degraded").unwrap()["status"], json!("True"));
        assert_eq!(condition(&s, "Ready").unwrap()["status"], json!("False"));
        assert!(
            events_for(&fake, "default", name).iter().any(|(t, r)| t == "Warning" && r == reason),
            "{name}: event"
        );
    }
    assert!(
        fake.get("apps", "statefulsets", "default", "ext").is_none(),
        "no servers without a database"
    );

    // No hot loop: each Degraded shard is retried with backoff, and nothing is rewritten.
    tokio::join!(
        assert_backs_off(&fake, "default", "ext", ("get", "ext-device-token")),
        assert_backs_off(&fake, "default", "cnpg", ("get", "cnpg-device-token")),
        assert_backs_off(&fake, "default", "badimg", ("get", "badimg-device-token")),
    );
    let metrics = op.metrics().await;
    for reason in ["SecretNotFound", "CloudNativePGNotInstalled", "ImagePullBackOff"] {
        let line = format!("omega_operator_degraded{{controller=\"shard\",reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }

    // Fix the causes: the Secret appears, CNPG gets installed.
    fake.create(
        "",
        "secrets",
        "default",
        json!({"metadata": {"name": "db-url"}, "data": {"uri": "cG9zdGdyZXM6Ly94"}}),
    );
    foreign_crd(&fake, "postgresql.cnpg.io", "Cluster", "clusters");
    running(&fake, "default", "ext").await;
    running(&fake, "default", "cnpg").await;
    let cluster = fake
        .get("postgresql.cnpg.io", "clusters", "default", "cnpg-postgres")
        .expect("CNPG Cluster");
    assert_eq!(cluster["spec"]["instances"], json!(3));
    let sts = fake.get("apps", "statefulsets", "default", "cnpg").unwrap();
    let env = &sts["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(env.as_array().unwrap().iter().any(|e| e["name"] == json!("DATABASE_READ_URLS")));
    // Recovered shards are no longer counted as Degraded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while op.metrics().await.contains("reason=\"SecretNotFound\"") {
        assert!(tokio::time::Instant::now() < deadline, "{}", op.metrics().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Deleting a cloudnativepg Shard deletes its Cluster (after the servers).
    shards.delete("cnpg", &DeleteParams::default()).await.unwrap();
    fake.wait_for(30, "cnpg shard and Cluster gone", |f| {
        (f.get("omega.exogenesis.io", "shards", "default", "cnpg").is_none()
            && f.get("postgresql.cnpg.io", "clusters", "default", "cnpg-postgres").is_none())
        .then_some(())
    })
    .await;
    crate::rbac::check(&fake, "unsatisfiable");
    op.abort();
}

#[tokio::test]
async fn api_rejections_and_bad_selectors_degrade_with_the_reason_and_back_off() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, None, "op-rej");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");

    // The CRD cannot check a core ResourceRequirements' quantities; the API server refuses the
    // StatefulSet generated from it, and the operator says so.
    let bad = shard("badres", 6, json!({"resources": {"limits": {"memory": "lots"}}}));
    shards.create(&PostParams::default(), &bad).await.unwrap();
    let s = degraded(&fake, "shards", "default", "badres", "ApplyFailed").await;
    assert_eq!(s["status"]["phase"], json!("Degraded"));
    let message = condition(&s, "Degraded").unwrap()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("StatefulSet in version \"v1\" cannot be handled as a StatefulSet")
            && message.contains("quantities must match the regular expression"),
        "{message}"
    );
    assert_eq!(condition(&s, "Progressing").unwrap()["status"], json!("False"));
    assert!(warned(&fake, "default", "badres", "ApplyFailed"));
    assert_backs_off(&fake, "default", "badres", ("get", "badres-device-token")).await;

    // A selector the schema lets through but that cannot be parsed.
    let rounds: Api<FederationRound> = Api::namespaced(fake.client(), "default");
    let sel = json!({"shardSelector": {"matchExpressions": [{"key": "tier", "operator": "Like", "values": ["prod"]}]}});
    rounds.create(&PostParams::default(), &round("badsel", sel)).await.unwrap();
    let r = degraded(&fake, "federationrounds", "default", "badsel", "InvalidSelector").await;
    let message = condition(&r, "Degraded").unwrap()["message"].as_str().unwrap().to_string();
    assert!(message.contains("shardSelector cannot be parsed"), "{message}");
    assert_eq!(r["status"]["phase"], json!("Pending"));
    assert!(warned(&fake, "default", "badsel", "InvalidSelector"));
    // Resolving shards is what a round does first: count its lists of Shards.
    let a = activity(&fake, "default", "badsel", ("patch", "badsel"), Duration::from_secs(6)).await;
    let lists = fake
        .operator_requests()
        .iter()
        .filter(|q| {
            q.resource == "shards" && q.verb == "list" && q.at.elapsed() < Duration::from_secs(6)
        })
        .count();
    assert_eq!(a.changes, 0, "{a:?}");
    assert!(lists <= 6, "{lists} shard lists in 6 s: no backoff");

    // Failures are counted by kind, Degraded objects by reason.
    let metrics = op.metrics().await;
    for line in [
        r#"omega_operator_degraded{controller="shard",reason="ApplyFailed"} 1"#,
        r#"omega_operator_degraded{controller="federationround",reason="InvalidSelector"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    assert!(
        metrics.contains(r#"omega_operator_reconcile_failures_total{controller="shard",error="rejected"}"#)
            && metrics.contains(r#"omega_operator_reconcile_failures_total{controller="federationround",error="unsatisfiable"}"#),
        "{metrics}"
    );

    // A storage size the CRD's pattern refuses never reaches the operator.
    let err = shards
        .create(
            &PostParams::default(),
            &shard("badpvc", 7, json!({"postgres": {"storage": "ten gigs"}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422 && s.message.contains("spec.postgres.storage in body should match")),
        "{err:?}"
    );

    // Fixing the spec recovers.
    let patch = json!({"spec": {"resources": {"limits": {"memory": "512Mi"}}}});
    shards.patch("badres", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    running(&fake, "default", "badres").await;
    op.abort();
}

#[tokio::test]
async fn a_database_that_cannot_pull_its_image_degrades_the_shard() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, None, "op-pg");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    let spec = json!({"postgres": {"image": "registry.invalid/pgvector-does-not-exist:16"}});
    shards.create(&PostParams::default(), &shard("pgpull", 8, spec)).await.unwrap();
    let s = degraded(&fake, "shards", "default", "pgpull", "ImagePullBackOff").await;
    let message = condition(&s, "Degraded").unwrap()["message"].as_str().unwrap().to_string();
    assert!(message.starts_with("database: "), "{message}");
    assert_eq!(condition(&s, "Ready").unwrap()["status"], json!("False"));
    assert!(warned(&fake, "default", "pgpull", "ImagePullBackOff"));
    // The servers themselves start: once their readiness and load are in status, nothing
    // changes any more while the database stays stuck.
    fake.wait_for(30, "servers ready and read", |f| {
        let s = f.get("omega.exogenesis.io", "shards", "default", "pgpull")?;
        (s["status"]["readyReplicas"] == json!(1) && s["status"]["activeDevices"] == json!(40))
            .then_some(())
    })
    .await;
    assert_backs_off(&fake, "default", "pgpull", ("get", "pgpull-device-token")).await;
    op.abort();
}

#[tokio::test]
async fn losing_the_lease_stops_reconciling() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, None, "op-lost");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    shards.create(&PostParams::default(), &shard("before", 50, json!({}))).await.unwrap();
    running(&fake, "default", "before").await;

    // Another replica writes itself into the Lease (as after a network partition).
    {
        let mut store = fake.store.lock().unwrap();
        let t = store.find("coordination.k8s.io", "leases").cloned().unwrap();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        store
            .update(
                &t,
                "default",
                "omega-operator",
                "",
                crate::fake::store::Change::Merge(
                    json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "leaseDurationSeconds": 60}}),
                ),
            )
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !op.handle.is_finished() {
        assert!(tokio::time::Instant::now() < deadline, "the deposed leader keeps running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = op.handle.await.unwrap();
    assert!(matches!(result, Err(omega_operator::Error::Runtime(_))), "{result:?}");

    // Nothing reconciles any more: a new Shard gets no finalizer, status or children.
    let seen = fake.operator_requests().len();
    shards.create(&PostParams::default(), &shard("after", 51, json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = fake.get("omega.exogenesis.io", "shards", "default", "after").unwrap();
    assert!(s["metadata"]["finalizers"].is_null() && s["status"].is_null(), "{s}");
    assert!(fake.get("apps", "statefulsets", "default", "after").is_none());
    assert_eq!(fake.operator_requests().len(), seen, "no request after stepping down");
    let lease = fake.get("coordination.k8s.io", "leases", "default", "omega-operator").unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"],
        json!("intruder"),
        "a deposed leader releases nothing"
    );
}

#[tokio::test]
async fn a_namespaced_operator_leaves_other_namespaces_alone() {
    let fake = Fake::start().await;
    install_crds(&fake);
    namespace(&fake, "tv");
    namespace(&fake, "other");
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, Some("tv"), "op-ns");
    Api::<Shard>::namespaced(fake.client(), "other")
        .create(&PostParams::default(), &shard("outside", 60, json!({})))
        .await
        .unwrap();
    Api::<Shard>::namespaced(fake.client(), "tv")
        .create(&PostParams::default(), &shard("inside", 61, json!({})))
        .await
        .unwrap();
    running(&fake, "tv", "inside").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = fake.get("omega.exogenesis.io", "shards", "other", "outside").unwrap();
    assert!(s["metadata"]["finalizers"].is_null(), "{s}");
    assert!(s["status"].is_null(), "{s}");
    for (group, plural) in
        [("apps", "statefulsets"), ("", "secrets"), ("", "services"), ("", "pods")]
    {
        assert!(fake.list(group, plural, "other").is_empty(), "{plural} created in other");
    }
    assert!(
        fake.operator_requests().iter().all(|r| r.namespace != "other"),
        "the operator asked about a namespace it does not watch"
    );
    op.abort();
}

#[tokio::test]
async fn federation_round_runs_to_succeeded_then_ttl_deletes_it() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, None, "op-d");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    shards.create(&PostParams::default(), &shard("a", 10, json!({}))).await.unwrap();
    shards.create(&PostParams::default(), &shard("b", 11, json!({}))).await.unwrap();
    let rounds: Api<FederationRound> = Api::namespaced(fake.client(), "default");
    let fr: FederationRound = serde_json::from_value(json!({
        "apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "FederationRound",
        "metadata": {"name": "r1"},
        "spec": {"shardSelector": {"matchLabels": {"tier": "prod"}}, "minSources": 5, "ttlSecondsAfterFinished": 3,
                 "privacy": {"epsilon": 2.0, "delta": 0.00001}},
    }))
    .unwrap();
    rounds.create(&PostParams::default(), &fr).await.unwrap();

    let done = fake
        .wait_for(40, "round Succeeded", |f| {
            let r = f.get("omega.exogenesis.io", "federationrounds", "default", "r1")?;
            (r["status"]["phase"] == json!("Succeeded")).then_some(r)
        })
        .await;
    let st = &done["status"];
    assert_eq!(
        (
            st["patternsAggregated"].clone(),
            st["trendsDetected"].clone(),
            st["shardsCompleted"].clone()
        ),
        (json!(17), json!(4), json!(2))
    );
    assert!(st["message"].as_str().unwrap().starts_with("succeeded: 17 pattern(s)"), "{st}");
    assert!(st["startedAt"].is_string() && st["finishedAt"].is_string());
    let job = fake.get("batch", "jobs", "default", "r1-federate").expect("job");
    let args: Vec<String> =
        serde_json::from_value(job["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap();
    let joined = args.join(" ");
    assert!(
        joined
            .contains("--shards http://a-admin.default.svc:50052,http://b-admin.default.svc:50052"),
        "{joined}"
    );
    assert!(
        joined.contains("--min-sources 5") && joined.contains("--epsilon 2 --delta 0.00001"),
        "{joined}"
    );
    assert!(joined.ends_with("--summary-file /dev/termination-log"), "{joined}");
    // The Job presents the shards' admin credential: the namespace's Secret the Shard
    // reconciler created, which the shard pods read too.
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["env"],
        json!([{"name": "ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "omega-shard-admin", "key": "ADMIN_TOKEN"}}}]),
        "{container}"
    );
    let admin = fake.get("", "secrets", "default", "omega-shard-admin").expect("admin Secret");
    assert!(admin["data"]["ADMIN_TOKEN"].as_str().is_some_and(|t| t.len() >= 32), "{admin}");
    assert!(admin["metadata"]["ownerReferences"].is_null(), "shared by the namespace's shards");
    let pods_env =
        fake.get("apps", "statefulsets", "default", "a").expect("sts")["spec"]["template"]["spec"]
            ["containers"][0]["env"]
            .clone();
    assert!(
        pods_env.as_array().unwrap().iter().any(|e| e["name"] == json!("ADMIN_TOKEN")
            && e["valueFrom"]["secretKeyRef"]["name"] == json!("omega-shard-admin")),
        "{pods_env}"
    );
    assert!(events_for(&fake, "default", "r1").iter().any(|(_, r)| r == "RoundSucceeded"));

    // TTL: the round and (by owner reference) its Job go away.
    fake.wait_for(20, "round deleted after TTL", |f| {
        (f.get("omega.exogenesis.io", "federationrounds", "default", "r1").is_none()
            && f.get("batch", "jobs", "default", "r1-federate").is_none())
        .then_some(())
    })
    .await;
    crate::rbac::check(&fake, "round");
    op.abort();
}

#[tokio::test]
async fn failed_round_is_reported_and_never_blocks_shards() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    fake.behaviour.lock().unwrap().job = Box::new(|_| {
        crate::fake::controllers::JobRun {
        exit_code: 1,
        message: r#"{"round_id":"x","outcome":"failed","shards_total":1,"shards_completed":0,"shards_failed":[{"endpoint":"http://f1-admin.default.svc:50052","error":"unavailable"}],"patterns_in":0,"groups":0,"patterns_aggregated":0,"groups_suppressed":0,"trends_detected":0,"global_version":0,"privacy":null,"already_published":false,"duration_ms":3,"message":"no shard reachable"}"#.into(),
    }
    });
    let op = start_operator(&fake, None, "op-e");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    shards.create(&PostParams::default(), &shard("f1", 20, json!({}))).await.unwrap();
    let rounds: Api<FederationRound> = Api::namespaced(fake.client(), "default");
    let fr: FederationRound = serde_json::from_value(json!({
        "apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "FederationRound", "metadata": {"name": "bad"}, "spec": {},
    }))
    .unwrap();
    rounds.create(&PostParams::default(), &fr).await.unwrap();
    let r = fake
        .wait_for(30, "round Failed", |f| {
            let r = f.get("omega.exogenesis.io", "federationrounds", "default", "bad")?;
            (r["status"]["phase"] == json!("Failed")).then_some(r)
        })
        .await;
    let msg = r["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no shard reachable")
            && msg.contains("f1-admin.default.svc:50052: unavailable"),
        "{msg}"
    );
    assert_eq!(condition(&r, "Degraded").unwrap()["status"], json!("True"));
    assert!(
        events_for(&fake, "default", "bad")
            .iter()
            .any(|(t, r)| t == "Warning" && r == "RoundFailed")
    );

    // The shard still reconciles: a spec change (more replicas) goes through.
    let mut s = shards.get("f1").await.unwrap();
    s.spec.replicas.min = 2;
    s.metadata.managed_fields = None;
    shards.replace("f1", &PostParams::default(), &s).await.unwrap();
    fake.wait_for(20, "shard scaled to new min", |f| {
        (f.get("apps", "statefulsets", "default", "f1")?["spec"]["replicas"] == json!(2))
            .then_some(())
    })
    .await;
    assert_eq!(
        phase(&fake, "omega.exogenesis.io", "federationrounds", "default", "bad").as_deref(),
        Some("Failed")
    );
    op.abort();
}

#[tokio::test]
async fn leader_election_lets_one_replica_work() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let a = start_operator(&fake, None, "op-1");
    let lease = fake
        .wait_for(10, "lease", |f| {
            f.get("coordination.k8s.io", "leases", "default", "omega-operator")
        })
        .await;
    let first = lease["spec"]["holderIdentity"].as_str().unwrap().to_string();
    assert_eq!(first, "op-1");
    let b = start_operator(&fake, None, "op-2");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holder = fake.get("coordination.k8s.io", "leases", "default", "omega-operator").unwrap()["spec"]["holderIdentity"].clone();
    assert_eq!(holder, json!("op-1"), "the standby does not steal a live lease");
    // The leader dies without releasing: the standby takes over after the lease expires.
    a.abort();
    fake.wait_for(15, "standby takes over", |f| {
        let l = f.get("coordination.k8s.io", "leases", "default", "omega-operator")?;
        (l["spec"]["holderIdentity"] == json!("op-2") && l["spec"]["leaseTransitions"] == json!(1))
            .then_some(())
    })
    .await;
    b.abort();
}

#[tokio::test]
async fn scheduled_round_spawns_children_and_keeps_history() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, None, "op-f");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    shards.create(&PostParams::default(), &shard("s1", 30, json!({}))).await.unwrap();
    running(&fake, "default", "s1").await;
    // Created (as far as the schedule knows) ten minutes ago: a run is due now.
    let created = (chrono::Utc::now() - chrono::Duration::minutes(10))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let rounds: Api<FederationRound> = Api::namespaced(fake.client(), "default");
    let fr: FederationRound = serde_json::from_value(json!({
        "apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "FederationRound",
        "metadata": {"name": "every-minute", "annotations": {crate::fake::store::BACKDATE: created}},
        "spec": {"schedule": "* * * * *", "historyLimit": 1},
    }))
    .unwrap();
    rounds.create(&PostParams::default(), &fr).await.unwrap();

    let parent = fake
        .wait_for(20, "parent Scheduled with a child", |f| {
            let p = f.get("omega.exogenesis.io", "federationrounds", "default", "every-minute")?;
            (p["status"]["phase"] == json!("Scheduled")
                && p["status"]["lastScheduleTime"].is_string())
            .then_some(p)
        })
        .await;
    assert!(parent["status"]["nextScheduleTime"].is_string());
    let children: Vec<Value> = fake
        .list("omega.exogenesis.io", "federationrounds", "default")
        .into_iter()
        .filter(|r| r["metadata"]["labels"]["omega.exogenesis.io/parent"] == json!("every-minute"))
        .collect();
    assert_eq!(children.len(), 1, "only the latest missed run is made");
    let child = &children[0];
    assert_eq!(child["metadata"]["ownerReferences"][0]["name"], json!("every-minute"));
    assert!(child["spec"]["schedule"].is_null(), "children do not schedule");
    let name = child["metadata"]["name"].as_str().unwrap().to_string();
    fake.wait_for(30, "child Succeeded", |f| {
        (f.get("omega.exogenesis.io", "federationrounds", "default", &name)?["status"]["phase"]
            == json!("Succeeded"))
        .then_some(())
    })
    .await;
    assert!(events_for(&fake, "default", "every-minute").iter().any(|(_, r)| r == "RoundSpawned"));
    // Deleting the parent collects its children (owner references).
    rounds.delete("every-minute", &DeleteParams::default()).await.unwrap();
    fake.wait_for(10, "children collected", |f| {
        f.list("omega.exogenesis.io", "federationrounds", "default").is_empty().then_some(())
    })
    .await;
    crate::rbac::check(&fake, "scheduled");
    op.abort();
}

fn children_of(fake: &Fake, parent: &str) -> Vec<Value> {
    fake.list("omega.exogenesis.io", "federationrounds", "default")
        .into_iter()
        .filter(|r| r["metadata"]["labels"]["omega.exogenesis.io/parent"] == json!(parent))
        .collect()
}

#[tokio::test]
async fn a_run_due_while_the_child_still_runs_is_skipped() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let _stats = Stats::start(&fake).await;
    let op = start_operator(&fake, None, "op-skip");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    shards.create(&PostParams::default(), &shard("s2", 31, json!({}))).await.unwrap();
    running(&fake, "default", "s2").await;
    let created = (chrono::Utc::now() - chrono::Duration::minutes(10))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // The federate image cannot be pulled: the child round stays Running.
    let fr: FederationRound = serde_json::from_value(json!({
        "apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "FederationRound",
        "metadata": {"name": "busy", "annotations": {crate::fake::store::BACKDATE: created}},
        "spec": {"schedule": "* * * * *", "image": "registry.invalid/federate-does-not-exist:1"},
    }))
    .unwrap();
    let rounds: Api<FederationRound> = Api::namespaced(fake.client(), "default");
    rounds.create(&PostParams::default(), &fr).await.unwrap();
    let child = fake
        .wait_for(30, "a child", |f| {
            children_of(f, "busy").first()?["metadata"]["name"].as_str().map(String::from)
        })
        .await;
    let c = degraded(&fake, "federationrounds", "default", &child, "ImagePullBackOff").await;
    assert_eq!(c["status"]["phase"], json!("Running"));

    // The stuck Job is polled with growing gaps (backoff: 0.5 s doubling to 4 s in tests), not
    // at a fixed rate. Gaps under 200 ms are reconciles triggered by watch events.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let job = format!("{child}-federate");
    let polls: Vec<std::time::Instant> = fake
        .operator_requests()
        .iter()
        .filter(|r| r.verb == "get" && r.resource == "jobs" && r.name == job)
        .map(|r| r.at)
        .collect();
    let gaps: Vec<Duration> = polls
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|g| *g >= Duration::from_millis(200))
        .collect();
    assert!(gaps.len() >= 3, "{gaps:?}");
    assert!(
        gaps.windows(2).all(|g| g[1] + Duration::from_millis(300) >= g[0]),
        "gaps shrink: {gaps:?}"
    );
    assert!(*gaps.last().unwrap() >= gaps[0] * 2, "gaps do not grow: {gaps:?}");

    // The clock cannot be moved here; moving the last handled run back is the same to the
    // parent as the next run falling due.
    {
        let mut store = fake.store.lock().unwrap();
        let t = store.find("omega.exogenesis.io", "federationrounds").cloned().unwrap();
        let earlier = (chrono::Utc::now() - chrono::Duration::minutes(5))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        store
            .update(
                &t,
                "default",
                "busy",
                "status",
                crate::fake::store::Change::Merge(json!({"status": {"lastScheduleTime": earlier}})),
            )
            .unwrap();
    }
    fake.changed.notify_waiters();
    fake.wait_for(20, "RunSkipped", |f| {
        events_for(f, "default", "busy")
            .iter()
            .any(|(t, r)| t == "Warning" && r == "RunSkipped")
            .then_some(())
    })
    .await;
    assert_eq!(children_of(&fake, "busy").len(), 1, "never two children at once");
    op.abort();
}

#[tokio::test]
async fn a_schedule_keeps_only_its_history_limit_of_finished_children() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let op = start_operator(&fake, None, "op-hist");
    let rounds: Api<FederationRound> = Api::namespaced(fake.client(), "default");
    // Yearly: no run falls due during the test; only the history is handled.
    let parent = rounds
        .create(
            &PostParams::default(),
            &round("yearly", json!({"schedule": "@yearly", "historyLimit": 2})),
        )
        .await
        .unwrap();
    let uid = parent.metadata.uid.clone().unwrap();
    // Three finished children of earlier runs, oldest first.
    for (i, hours) in [3, 2, 1].into_iter().enumerate() {
        let created = (chrono::Utc::now() - chrono::Duration::hours(hours))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let name = format!("yearly-old{i}");
        fake.create(
            "omega.exogenesis.io",
            "federationrounds",
            "default",
            json!({"metadata": {"name": name,
                "labels": {"omega.exogenesis.io/parent": "yearly"},
                "annotations": {crate::fake::store::BACKDATE: created},
                "ownerReferences": [{"apiVersion": "omega.exogenesis.io/v1alpha1", "kind": "FederationRound",
                    "name": "yearly", "uid": uid, "controller": true}]},
                "spec": {}}),
        );
        let mut store = fake.store.lock().unwrap();
        let t = store.find("omega.exogenesis.io", "federationrounds").cloned().unwrap();
        store
            .update(
                &t,
                "default",
                &name,
                "status",
                crate::fake::store::Change::Merge(
                    json!({"status": {"phase": "Succeeded", "message": format!("run {i}")}}),
                ),
            )
            .unwrap();
    }
    fake.changed.notify_waiters();
    fake.wait_for(30, "history pruned to 2", |f| {
        let names: Vec<String> = children_of(f, "yearly")
            .iter()
            .filter_map(|c| c["metadata"]["name"].as_str().map(String::from))
            .collect();
        (names == ["yearly-old1", "yearly-old2"]).then_some(())
    })
    .await;
    let p = fake.get("omega.exogenesis.io", "federationrounds", "default", "yearly").unwrap();
    assert_eq!(p["status"]["message"], json!("last round Succeeded: run 2"));
    op.abort();
}

#[tokio::test]
async fn an_invalid_schedule_is_refused_or_degrades() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let op = start_operator(&fake, None, "op-cron");
    let rounds: Api<FederationRound> = Api::namespaced(fake.client(), "default");
    // Not the shape of a cron expression: the CRD's CEL rule refuses it.
    let err = rounds
        .create(&PostParams::default(), &round("words", json!({"schedule": "every hour"})))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422 && s.message.contains("schedule must be a cron expression of 5 fields")),
        "{err:?}"
    );
    // The right shape, but hour 25: Degraded/InvalidSchedule, a Warning, backoff, no child.
    rounds
        .create(&PostParams::default(), &round("hour25", json!({"schedule": "0 25 * * *"})))
        .await
        .unwrap();
    let r = degraded(&fake, "federationrounds", "default", "hour25", "InvalidSchedule").await;
    let message = condition(&r, "Degraded").unwrap()["message"].as_str().unwrap().to_string();
    assert!(message.contains("invalid schedule \"0 25 * * *\""), "{message}");
    assert!(warned(&fake, "default", "hour25", "InvalidSchedule"));
    let a = activity(&fake, "default", "hour25", ("list", ""), Duration::from_secs(4)).await;
    assert_eq!(a.changes, 0, "{a:?}");
    assert!(children_of(&fake, "hour25").is_empty());
    let metrics = op.metrics().await;
    assert!(
        metrics.contains(
            r#"omega_operator_degraded{controller="federationround",reason="InvalidSchedule"} 1"#
        ),
        "{metrics}"
    );
    op.abort();
}

#[tokio::test]
async fn fake_api_server_semantics() {
    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};
    let fake = Fake::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(fake.client(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "a"}, "data": {"k": "1"}})).unwrap();
    let created = cms.create(&PostParams::default(), &cm).await.unwrap();
    let rv0 = created.metadata.resource_version.clone().unwrap();

    // Watch from the create's resourceVersion sees later writes.
    let mut events = cms.watch(&WatchParams::default(), &rv0).await.unwrap().boxed();

    // resourceVersion moves on every write; a stale replace is a 409.
    let mut updated = created.clone();
    updated.data = Some([("k".to_string(), "2".to_string())].into());
    let after = cms.replace("a", &PostParams::default(), &updated).await.unwrap();
    assert_ne!(after.metadata.resource_version, created.metadata.resource_version);
    match cms.replace("a", &PostParams::default(), &updated).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 409),
        other => panic!("stale replace: {other:?}"),
    }
    // Creating twice is a 409 too; a missing object a 404.
    assert!(
        matches!(cms.create(&PostParams::default(), &cm).await, Err(kube::Error::Api(s)) if s.code == 409)
    );
    assert!(matches!(cms.get("nope").await, Err(kube::Error::Api(s)) if s.code == 404));

    // Server-side apply merges with what other managers set; re-applying the same is a no-op.
    let pp = PatchParams::apply("me").force();
    let applied = cms
        .patch(
            "a",
            &pp,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"x": "y"}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.as_ref().unwrap().get("k").map(String::as_str), Some("2"));
    let again = cms
        .patch(
            "a",
            &pp,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"x": "y"}})),
        )
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version, applied.metadata.resource_version);

    let first = tokio::time::timeout(Duration::from_secs(5), events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first, WatchEvent::Modified(_)), "{first:?}");

    // Owner-reference garbage collection.
    let owner_uid = after.metadata.uid.clone().unwrap();
    let dep: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "b", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "a", "uid": owner_uid}]}}))
        .unwrap();
    cms.create(&PostParams::default(), &dep).await.unwrap();
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(
        matches!(cms.get("b").await, Err(kube::Error::Api(s)) if s.code == 404),
        "dependent collected"
    );

    // Finalizers hold deletion until removed.
    let held: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "c", "finalizers": ["x/y"]}})).unwrap();
    cms.create(&PostParams::default(), &held).await.unwrap();
    cms.delete("c", &DeleteParams::default()).await.unwrap();
    assert!(cms.get("c").await.unwrap().metadata.deletion_timestamp.is_some());
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(matches!(cms.get("c").await, Err(kube::Error::Api(s)) if s.code == 404));
}

#[tokio::test]
async fn autoscaler_memory_survives_an_operator_restart() {
    let fake = Fake::start().await;
    install_crds(&fake);
    let stats = Stats::start(&fake).await;
    let first = start_operator(&fake, None, "op-g");
    let shards: Api<Shard> = Api::namespaced(fake.client(), "default");
    let spec = json!({"autoscaling": {"scaleUpStabilizationSeconds": 120, "scaleDownStabilizationSeconds": 300}});
    shards.create(&PostParams::default(), &shard("mem", 40, spec)).await.unwrap();
    running(&fake, "default", "mem").await;
    fake.wait_for(20, "recommendation of 1 recorded", |f| {
        let s = f.get("omega.exogenesis.io", "shards", "default", "mem")?;
        (s["status"]["autoscaler"]["recommendations"][0]["replicas"] == json!(1)).then_some(())
    })
    .await;

    // Load rises: 3 servers recommended, but the 120 s window holds the scale-up.
    stats.set(300.0, 100);
    let history = fake
        .wait_for(20, "recommendation of 3 recorded", |f| {
            let s = f.get("omega.exogenesis.io", "shards", "default", "mem")?;
            let recs = s["status"]["autoscaler"]["recommendations"].as_array()?.clone();
            (recs.last()?["replicas"] == json!(3)).then_some(recs)
        })
        .await;
    assert_eq!(history[0]["replicas"], json!(1), "the older recommendation is kept: {history:?}");

    // A new leader reads the same memory and keeps holding.
    first.abort();
    fake.store.lock().unwrap().objects.retain(|k, _| k.plural != "leases");
    let second = start_operator(&fake, None, "op-h");
    fake.wait_for(20, "new leader", |f| {
        let l = f.get("coordination.k8s.io", "leases", "default", "omega-operator")?;
        (l["spec"]["holderIdentity"] == json!("op-h")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = fake.get("omega.exogenesis.io", "shards", "default", "mem").unwrap();
    assert_eq!(s["status"]["replicas"], json!(1), "still stabilising after the restart");
    assert_eq!(s["status"]["autoscaler"]["recommendations"][0], history[0]);
    second.abort();
}
