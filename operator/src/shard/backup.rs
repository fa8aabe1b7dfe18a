//! Scheduled backups of a Shard's database from `spec.backup` (pure): for `managed`, a
//! CronJob running `pg_dump` (`pg_backup.sh`) into a volume of its own; for `cloudnativepg`,
//! the Cluster's `backup` section and a CloudNativePG `ScheduledBackup`. A spec that cannot
//! be honoured becomes the reason and message of the `BackupScheduled` condition.

use super::resources::{
    Ctx, PGVECTOR_IMAGE, POSTGRES_UID, empty_dir, env, mount, pod_security,
    restricted_container_security, secret_env,
};
use crate::crd::{BackupSpec, CnpgBackupMethod, PostgresMode, Shard};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PodSpec, PodTemplateSpec, Volume, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The script the managed mode's CronJob runs (also run by the restore test).
pub const BACKUP_SCRIPT: &str = include_str!("pg_backup.sh");
/// Where the CronJob mounts the backup volume.
pub const BACKUP_DIR: &str = "/backups";
/// Condition type saying whether the backups are set up.
pub const BACKUP_SCHEDULED: &str = "BackupScheduled";

/// The objects that schedule a Shard's backups.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// `managed`: the dumps' volume (no owner: it outlives the Shard unless `volumePolicy`
    /// is `Delete`) and the CronJob.
    Managed {
        /// The backup volume.
        volume: Box<PersistentVolumeClaim>,
        /// The `pg_dump` CronJob.
        cron_job: Box<CronJob>,
    },
    /// `cloudnativepg`: the Cluster's `spec.backup` and the `ScheduledBackup`.
    Cnpg {
        /// Merged into the Cluster as `spec.backup`.
        cluster_backup: Value,
        /// The `postgresql.cnpg.io/v1` ScheduledBackup.
        scheduled: Value,
    },
}

/// Why `spec.backup` cannot be honoured: `(reason, message)` of the condition.
pub type Invalid = (&'static str, String);

/// The backup objects of a Shard: `Ok(None)` without `spec.backup`.
pub fn plan(shard: &Shard, cx: &Ctx) -> Result<Option<Plan>, Invalid> {
    let Some(b) = &shard.spec.backup else { return Ok(None) };
    crate::round::schedule::parse(&b.schedule)
        .map_err(|e| ("InvalidBackupSchedule", format!("backup.schedule: {e}")))?;
    match shard.spec.postgres.mode {
        PostgresMode::External => Err((
            "BackupUnsupported",
            "backup is for managed and cloudnativepg databases: back an external database up where it is run".into(),
        )),
        PostgresMode::Managed => {
            if b.cloudnativepg.is_some() {
                return Err((
                    "InvalidBackupSpec",
                    "backup.cloudnativepg is for postgres.mode cloudnativepg".into(),
                ));
            }
            Ok(Some(Plan::Managed {
                volume: Box::new(volume(b, cx)),
                cron_job: Box::new(cron_job(shard, b, cx)),
            }))
        }
        PostgresMode::Cloudnativepg => cnpg(b, cx).map(Some),
    }
}

/// A one-line description for the condition's message when the plan is applied.
pub fn describe(plan: &Plan, b: &BackupSpec) -> String {
    match plan {
        Plan::Managed { cron_job, .. } => format!(
            "pg_dump CronJob {} at {:?} (UTC), dumps kept {} days",
            cron_job.metadata.name.as_deref().unwrap_or_default(),
            b.schedule,
            b.retention_days
        ),
        Plan::Cnpg { scheduled, .. } => format!(
            "ScheduledBackup {} ({}) at {:?} (UTC)",
            scheduled["metadata"]["name"].as_str().unwrap_or_default(),
            scheduled["spec"]["method"].as_str().unwrap_or_default(),
            b.schedule
        ),
    }
}

/// Name of the CronJob, its volume and the ScheduledBackup.
pub fn name(cx: &Ctx) -> String {
    format!("{}-backup", cx.names.shard)
}

fn volume(b: &BackupSpec, cx: &Ctx) -> PersistentVolumeClaim {
    // Labelled as the database's volumes and not owned, so `volumePolicy` decides its fate
    // with theirs.
    let mut metadata = cx.meta(&name(cx), "postgres");
    metadata.owner_references = None;
    PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: b.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(b.storage.clone()))])),
                limits: None,
            }),
            ..Default::default()
        }),
        status: None,
    }
}

fn cron_job(shard: &Shard, b: &BackupSpec, cx: &Ctx) -> CronJob {
    let image = shard.spec.postgres.image.clone().unwrap_or_else(|| PGVECTOR_IMAGE.into());
    let pod = PodSpec {
        containers: vec![Container {
            name: "backup".into(),
            image: Some(image),
            command: Some(vec!["sh".into(), "-c".into(), BACKUP_SCRIPT.into()]),
            env: Some(vec![
                secret_env("DATABASE_URL", &cx.names.postgres_secret, "uri"),
                env("BACKUP_DIR", BACKUP_DIR),
                env("RETENTION_DAYS", &b.retention_days.to_string()),
            ]),
            security_context: Some(restricted_container_security(POSTGRES_UID)),
            volume_mounts: Some(vec![mount("backups", BACKUP_DIR), mount("tmp", "/tmp")]),
            ..Default::default()
        }],
        restart_policy: Some("OnFailure".into()),
        security_context: Some(pod_security(POSTGRES_UID)),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        volumes: Some(vec![
            Volume {
                name: "backups".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: name(cx),
                    read_only: None,
                }),
                ..Default::default()
            },
            empty_dir("tmp"),
        ]),
        ..Default::default()
    };
    CronJob {
        metadata: cx.meta(&name(cx), "backup"),
        spec: Some(CronJobSpec {
            schedule: b.schedule.clone(),
            time_zone: Some("Etc/UTC".into()),
            // Two dumps at once would only compete for the same database and volume.
            concurrency_policy: Some("Forbid".into()),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(cx.labels("backup")),
                    ..Default::default()
                }),
                spec: Some(JobSpec {
                    backoff_limit: Some(2),
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(cx.labels("backup")),
                            ..Default::default()
                        }),
                        spec: Some(pod),
                    },
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn cnpg(b: &BackupSpec, cx: &Ctx) -> Result<Plan, Invalid> {
    let invalid = |m: &str| ("InvalidBackupSpec", m.to_string());
    let c = b.cloudnativepg.as_ref().ok_or_else(|| {
        invalid("backup.cloudnativepg (method and its target) is required with postgres.mode cloudnativepg")
    })?;
    let (method, cluster_backup) = match c.method {
        CnpgBackupMethod::VolumeSnapshot => {
            let class = c.volume_snapshot_class.as_ref().ok_or_else(|| {
                invalid("backup.cloudnativepg.volumeSnapshotClass is required with method volumeSnapshot")
            })?;
            ("volumeSnapshot", json!({"volumeSnapshot": {"className": class}}))
        }
        CnpgBackupMethod::BarmanObjectStore => {
            let (Some(path), Some(secret)) = (&c.destination_path, &c.s3_credentials_secret) else {
                return Err(invalid(
                    "backup.cloudnativepg.destinationPath and s3CredentialsSecret are required with method barmanObjectStore",
                ));
            };
            let key = |k: &str| json!({"name": secret, "key": k});
            (
                "barmanObjectStore",
                json!({
                    "retentionPolicy": format!("{}d", b.retention_days),
                    "barmanObjectStore": {
                        "destinationPath": path,
                        "s3Credentials": {
                            "accessKeyId": key("ACCESS_KEY_ID"),
                            "secretAccessKey": key("ACCESS_SECRET_KEY"),
                        },
                    },
                }),
            )
        }
    };
    let scheduled = json!({
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "ScheduledBackup",
        "metadata": cx.meta(&name(cx), "backup"),
        "spec": {
            "schedule": with_seconds(&b.schedule),
            "cluster": {"name": cx.names.postgres},
            "method": method,
            // Each Backup is owned by the ScheduledBackup: deleting the Shard deletes them.
            "backupOwnerReference": "self",
            "immediate": true,
        },
    });
    Ok(Plan::Cnpg { cluster_backup, scheduled })
}

/// CloudNativePG's schedules have a leading seconds field: a 5-field expression or a
/// nickname in its 6-field form.
pub fn with_seconds(schedule: &str) -> String {
    let s = schedule.trim();
    match s {
        "@yearly" | "@annually" => "0 0 0 1 1 *".into(),
        "@monthly" => "0 0 0 1 * *".into(),
        "@weekly" => "0 0 0 * * 0".into(),
        "@daily" | "@midnight" => "0 0 0 * * *".into(),
        "@hourly" => "0 0 * * * *".into(),
        _ => format!("0 {}", s.split_whitespace().collect::<Vec<_>>().join(" ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::resources::tests::shard;

    fn with_backup(mode: PostgresMode, backup: Value) -> (Shard, Ctx) {
        let mut s = shard(mode);
        s.spec.backup = Some(serde_json::from_value(backup).unwrap());
        let cx = Ctx::of(&s).unwrap();
        (s, cx)
    }

    #[test]
    fn invalid_specs_become_the_condition_reason() {
        let snapshot = json!({"method": "volumeSnapshot", "volumeSnapshotClass": "csi"});
        let cases = [
            (PostgresMode::Managed, json!({"schedule": "61 * * * *"}), "InvalidBackupSchedule"),
            (
                PostgresMode::Managed,
                json!({"schedule": "0 2 * * *", "cloudnativepg": snapshot}),
                "InvalidBackupSpec",
            ),
            (PostgresMode::External, json!({"schedule": "0 2 * * *"}), "BackupUnsupported"),
            (PostgresMode::Cloudnativepg, json!({"schedule": "@daily"}), "InvalidBackupSpec"),
            (
                PostgresMode::Cloudnativepg,
                json!({"schedule": "@daily", "cloudnativepg": {"method": "volumeSnapshot"}}),
                "InvalidBackupSpec",
            ),
            (
                PostgresMode::Cloudnativepg,
                json!({"schedule": "@daily", "cloudnativepg": {"method": "barmanObjectStore", "destinationPath": "s3://b/omega"}}),
                "InvalidBackupSpec",
            ),
        ];
        for (mode, spec, reason) in cases {
            let (s, cx) = with_backup(mode, spec.clone());
            let err = plan(&s, &cx).expect_err(&spec.to_string());
            assert_eq!(err.0, reason, "{spec}: {}", err.1);
            assert!(!err.1.is_empty());
        }
        let s = shard(PostgresMode::Managed);
        assert_eq!(plan(&s, &Ctx::of(&s).unwrap()), Ok(None));
    }

    #[test]
    fn managed_backups_are_a_pg_dump_cron_job_on_an_unowned_volume() {
        let spec = json!({"schedule": "30 2 * * *", "retentionDays": 14, "storage": "20Gi", "storageClass": "fast"});
        let (s, cx) = with_backup(PostgresMode::Managed, spec);
        let Some(Plan::Managed { volume, cron_job }) = plan(&s, &cx).unwrap() else {
            panic!("a managed plan")
        };
        // The volume outlives the Shard unless volumePolicy Delete removes it with the
        // database volumes (same labels).
        assert_eq!(volume.metadata.name.as_deref(), Some("eu1-backup"));
        assert!(volume.metadata.owner_references.is_none());
        assert_eq!(volume.metadata.labels, Some(cx.labels("postgres")));
        let vspec = volume.spec.clone().unwrap();
        assert_eq!(vspec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(vspec.resources.unwrap().requests.unwrap()["storage"], Quantity("20Gi".into()));

        let c = cron_job.spec.clone().unwrap();
        assert_eq!((c.schedule.as_str(), c.time_zone.as_deref()), ("30 2 * * *", Some("Etc/UTC")));
        assert_eq!(c.concurrency_policy.as_deref(), Some("Forbid"));
        let pod = c.job_template.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some(PGVECTOR_IMAGE));
        assert_eq!(
            container.command.as_deref(),
            Some(&["sh".to_string(), "-c".into(), BACKUP_SCRIPT.into()][..])
        );
        let env: BTreeMap<_, _> =
            container.env.iter().flatten().map(|e| (e.name.as_str(), e)).collect();
        assert_eq!(env["RETENTION_DAYS"].value.as_deref(), Some("14"));
        assert_eq!(env["BACKUP_DIR"].value.as_deref(), Some(BACKUP_DIR));
        let secret = env["DATABASE_URL"].value_from.as_ref().unwrap().secret_key_ref.as_ref();
        assert_eq!(
            secret.map(|s| (s.name.as_str(), s.key.as_str())),
            Some(("eu1-postgres", "uri"))
        );
        assert_eq!(
            container.security_context.as_ref().unwrap().read_only_root_filesystem,
            Some(true)
        );
        let claim = pod.volumes.unwrap()[0].persistent_volume_claim.clone().unwrap();
        assert_eq!(claim.claim_name, "eu1-backup");
    }

    #[test]
    fn cloudnativepg_backups_are_a_scheduled_backup_and_the_clusters_backup_section() {
        let cases = [
            (
                json!({"schedule": "0 3 * * 1-5", "cloudnativepg": {"method": "volumeSnapshot", "volumeSnapshotClass": "csi-snap"}}),
                "volumeSnapshot",
                "0 0 3 * * 1-5",
                json!({"volumeSnapshot": {"className": "csi-snap"}}),
            ),
            (
                json!({"schedule": "@daily", "retentionDays": 30, "cloudnativepg": {"method": "barmanObjectStore", "destinationPath": "s3://b/omega", "s3CredentialsSecret": "s3"}}),
                "barmanObjectStore",
                "0 0 0 * * *",
                json!({"retentionPolicy": "30d", "barmanObjectStore": {"destinationPath": "s3://b/omega",
                    "s3Credentials": {"accessKeyId": {"name": "s3", "key": "ACCESS_KEY_ID"},
                        "secretAccessKey": {"name": "s3", "key": "ACCESS_SECRET_KEY"}}}}),
            ),
        ];
        for (spec, method, schedule, section) in cases {
            let (s, cx) = with_backup(PostgresMode::Cloudnativepg, spec);
            let Some(Plan::Cnpg { cluster_backup, scheduled }) = plan(&s, &cx).unwrap() else {
                panic!("a CloudNativePG plan")
            };
            assert_eq!(cluster_backup, section);
            assert_eq!(scheduled["kind"], "ScheduledBackup");
            assert_eq!(scheduled["metadata"]["name"], "eu1-backup");
            assert_eq!(
                scheduled["spec"],
                json!({"schedule": schedule, "cluster": {"name": "eu1-postgres"}, "method": method,
                    "backupOwnerReference": "self", "immediate": true})
            );
            // The Cluster carries the section.
            let cluster = crate::shard::postgres::cnpg_cluster(&s, &cx);
            assert_eq!(cluster["spec"]["backup"], section);
        }
    }

    #[test]
    fn schedules_gain_cloudnativepgs_seconds_field() {
        for (five, six) in [
            ("0 2 * * *", "0 0 2 * * *"),
            ("*/15  *  * * *", "0 */15 * * * *"),
            ("@hourly", "0 0 * * * *"),
            ("@weekly", "0 0 0 * * 0"),
            ("@monthly", "0 0 0 1 * *"),
            ("@annually", "0 0 0 1 1 *"),
            ("@midnight", "0 0 0 * * *"),
        ] {
            assert_eq!(with_seconds(five), six, "{five}");
        }
    }
}
