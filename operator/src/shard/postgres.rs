//! The shard's database by `postgres.mode` (pure): the managed StatefulSet, headless Service
//! and password Secret, the CloudNativePG `Cluster`, and how the servers are wired to each
//! (`DATABASE_URL`, `DATABASE_READ_URLS`).

use super::resources::{
    CNPG_IMAGE, Ctx, PG_DATABASE, PG_PORT, PGVECTOR_IMAGE, POSTGRES_UID, empty_dir, env, key_ref,
    mount, named_port, pod_security, restricted_container_security, secret_env, service_port,
};
use crate::crd::{PostgresMode, Shard, VolumePolicy};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, ExecAction, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec,
    PodTemplateSpec, Probe, SecretKeySelector, Service, ServiceSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Where the servers find their database.
#[derive(Debug, Clone, PartialEq)]
pub struct Database {
    /// `DATABASE_URL`.
    pub url: SecretKeySelector,
    /// Extra env that builds `DATABASE_READ_URLS` (CNPG read-only service).
    pub read_env: Vec<EnvVar>,
}

/// The database wiring of a spec.
pub fn database(shard: &Shard, cx: &Ctx) -> Database {
    let pg = &shard.spec.postgres;
    match pg.mode {
        PostgresMode::Managed => {
            Database { url: key_ref(&cx.names.postgres_secret, "uri"), read_env: vec![] }
        }
        PostgresMode::Cloudnativepg => {
            // CloudNativePG writes `<cluster>-app` with username, password and uri.
            let app = format!("{}-app", cx.names.postgres);
            let host = cx.svc_host(&format!("{}-ro", cx.names.postgres));
            Database {
                url: key_ref(&app, "uri"),
                read_env: vec![
                    secret_env("PG_RO_USER", &app, "username"),
                    secret_env("PG_RO_PASSWORD", &app, "password"),
                    env(
                        "DATABASE_READ_URLS",
                        &format!(
                            "postgres://$(PG_RO_USER):$(PG_RO_PASSWORD)@{host}:{PG_PORT}/{PG_DATABASE}"
                        ),
                    ),
                ],
            }
        }
        PostgresMode::External => {
            let r = pg.external_secret_ref.clone().unwrap_or_else(|| crate::crd::SecretKeyRef {
                name: String::new(),
                key: "uri".into(),
            });
            Database { url: key_ref(&r.name, &r.key), read_env: vec![] }
        }
    }
}

/// Data of the managed database Secret for a password.
pub fn postgres_secret_data(cx: &Ctx, password: &str) -> BTreeMap<String, ByteString> {
    let host = cx.svc_host(&cx.names.postgres);
    let uri = format!("postgres://{PG_DATABASE}:{password}@{host}:{PG_PORT}/{PG_DATABASE}");
    [
        ("username", PG_DATABASE),
        ("password", password),
        ("database", PG_DATABASE),
        ("host", &host),
        ("uri", &uri),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
    .collect()
}

/// Headless Service of the managed database.
pub fn postgres_service(cx: &Ctx) -> Service {
    Service {
        metadata: cx.meta(&cx.names.postgres, "postgres"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(cx.selector("postgres")),
            ports: Some(vec![service_port("postgres", PG_PORT)]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The managed database: one pgvector Postgres with a volume claim template.
pub fn postgres_statefulset(shard: &Shard, cx: &Ctx) -> StatefulSet {
    let pg = &shard.spec.postgres;
    let secret = &cx.names.postgres_secret;
    let ready = Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "pg_isready".into(),
                "-U".into(),
                PG_DATABASE.into(),
                "-d".into(),
                PG_DATABASE.into(),
            ]),
        }),
        period_seconds: Some(5),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let retention = match pg.volume_policy {
        VolumePolicy::Retain => "Retain",
        VolumePolicy::Delete => "Delete",
    };
    let mut storage = BTreeMap::new();
    storage.insert("storage".to_string(), Quantity(pg.storage.clone()));
    StatefulSet {
        metadata: cx.meta(&cx.names.postgres, "postgres"),
        spec: Some(StatefulSetSpec {
            // One primary: replication is CloudNativePG's job (see `postgres.mode`).
            replicas: Some(1),
            service_name: Some(cx.names.postgres.clone()),
            selector: LabelSelector {
                match_labels: Some(cx.selector("postgres")),
                match_expressions: None,
            },
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(retention.into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(cx.labels("postgres")),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "postgres".into(),
                        image: Some(pg.image.clone().unwrap_or_else(|| PGVECTOR_IMAGE.into())),
                        env: Some(vec![
                            secret_env("POSTGRES_USER", secret, "username"),
                            secret_env("POSTGRES_PASSWORD", secret, "password"),
                            secret_env("POSTGRES_DB", secret, "database"),
                            env("PGDATA", "/var/lib/postgresql/data/pgdata"),
                        ]),
                        ports: Some(vec![named_port("postgres", PG_PORT)]),
                        readiness_probe: Some(ready.clone()),
                        liveness_probe: Some(Probe {
                            period_seconds: Some(15),
                            failure_threshold: Some(4),
                            ..ready.clone()
                        }),
                        startup_probe: Some(Probe { failure_threshold: Some(60), ..ready }),
                        security_context: Some(restricted_container_security(POSTGRES_UID)),
                        volume_mounts: Some(vec![
                            mount("data", "/var/lib/postgresql/data"),
                            mount("run", "/var/run/postgresql"),
                            mount("tmp", "/tmp"),
                        ]),
                        ..Default::default()
                    }],
                    security_context: Some(pod_security(POSTGRES_UID)),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(60),
                    volumes: Some(vec![empty_dir("run"), empty_dir("tmp")]),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    labels: Some(cx.labels("postgres")),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: pg.storage_class.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(storage),
                        limits: None,
                    }),
                    ..Default::default()
                }),
                status: None,
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// A CloudNativePG `Cluster` (as JSON: the operator does not link CNPG's types), with the
/// `backup` section `spec.backup` asks for.
pub fn cnpg_cluster(shard: &Shard, cx: &Ctx) -> Value {
    let pg = &shard.spec.postgres;
    let mut storage = json!({ "size": pg.storage });
    if let Some(class) = &pg.storage_class {
        storage["storageClass"] = json!(class);
    }
    let mut cluster = json!({
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": cx.meta(&cx.names.postgres, "postgres"),
        "spec": {
            "instances": pg.instances,
            "imageName": pg.image.clone().unwrap_or_else(|| CNPG_IMAGE.into()),
            "storage": storage,
            "bootstrap": { "initdb": {
                "database": PG_DATABASE,
                "owner": PG_DATABASE,
                "postInitApplicationSQL": ["CREATE EXTENSION IF NOT EXISTS vector"],
            }},
        },
    });
    if let Ok(Some(super::backup::Plan::Cnpg { cluster_backup, .. })) =
        super::backup::plan(shard, cx)
    {
        cluster["spec"]["backup"] = cluster_backup;
    }
    cluster
}
