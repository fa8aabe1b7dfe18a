//! `Shard`: one constellation of shard servers plus its Postgres.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a shard.
// kube's `printcolumn(...)` repeats `type_ = ...` by design; clippy reads that as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "omega.exogenesis.io",
    version = "v1alpha1",
    kind = "Shard",
    namespaced,
    shortname = "shd",
    category = "omega",
    status = "ShardStatus",
    derive = "PartialEq",
    doc = "A shard: a StatefulSet of omega-shard servers, its Postgres, Services and policies.",
    scale(
        spec_replicas_path = ".spec.replicas.min",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "ShardID", type_ = "integer", json_path = ".spec.shardId"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Devices", type_ = "integer", json_path = ".status.activeDevices"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ShardSpec {
    /// `SHARD_ID` of the servers; immutable (devices and stored patterns are keyed by it).
    #[schemars(range(min = 0, max = 4294967295_i64))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("shardId is immutable"))]
    pub shard_id: i64,
    /// `REGION` of the servers, also the region of the trends they publish.
    #[serde(default = "default_region")]
    #[schemars(length(min = 1, max = 63))]
    pub region: String,
    /// `MAX_DEVICES`: registrations the shard accepts.
    #[serde(default = "default_max_devices")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_devices: i64,
    /// Replica bounds; the autoscaler chooses within them.
    #[serde(default)]
    pub replicas: ReplicaRange,
    /// Autoscaling targets and stabilisation windows.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    /// Container image of `omega-shard`.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Compute resources of each shard server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the shard's database comes from.
    #[serde(default)]
    pub postgres: PostgresSpec,
    /// HNSW index parameters of the pattern table (`HNSW_M`, `HNSW_EF_CONSTRUCTION`).
    #[serde(default)]
    pub hnsw: HnswSpec,
    /// How devices reach the shard: type of the device-facing Service.
    #[serde(default)]
    pub service_type: DeviceServiceType,
    /// `RUST_LOG` of the servers.
    #[serde(default = "default_log_level")]
    #[schemars(length(min = 1, max = 256))]
    pub log_level: String,
    /// Create a Prometheus Operator `ServiceMonitor` when that CRD is installed.
    #[serde(default = "default_true")]
    pub service_monitor: bool,
    /// Scheduled backups of the database (`managed` and `cloudnativepg` modes); none when
    /// unset. The `BackupScheduled` condition says whether they are set up, or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
}

/// Scheduled backups: a `pg_dump` CronJob writing to a volume for `managed`, CloudNativePG
/// `ScheduledBackup`s for `cloudnativepg` (docs/operations.md, "Backup and restore").
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// When to back up: a cron expression of 5 fields or a nickname (`@daily`), in UTC.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(crate::crd::CRON_SHAPE_RULE).message("backup.schedule must be a cron expression of 5 fields (minute hour day-of-month month day-of-week) or one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"))]
    pub schedule: String,
    /// Days a backup is kept. `managed`: older dumps are deleted after each new one (the
    /// newest is always kept); `cloudnativepg` with `barmanObjectStore`: the Cluster's
    /// `retentionPolicy`. Volume snapshots are kept until their Backup objects are deleted.
    #[serde(default = "default_retention_days")]
    #[schemars(range(min = 1, max = 3650))]
    pub retention_days: i32,
    /// `managed`: size of the volume holding the dumps (a Kubernetes quantity).
    #[serde(default = "default_storage")]
    #[schemars(length(min = 1, max = 32), pattern(STORAGE_PATTERN))]
    pub storage: String,
    /// `managed`: StorageClass of that volume; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// `cloudnativepg`: how CloudNativePG backs up (required in that mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudnativepg: Option<CnpgBackupSpec>,
}

/// How CloudNativePG backs a shard's Cluster up.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CnpgBackupSpec {
    /// `volumeSnapshot` (needs `volumeSnapshotClass`) or `barmanObjectStore` (needs
    /// `destinationPath` and `s3CredentialsSecret`).
    pub method: CnpgBackupMethod,
    /// VolumeSnapshotClass of the snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub volume_snapshot_class: Option<String>,
    /// Object store URL of the base backups and WAL archive (`s3://bucket/path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub destination_path: Option<String>,
    /// Secret with `ACCESS_KEY_ID` and `ACCESS_SECRET_KEY` for the object store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub s3_credentials_secret: Option<String>,
}

/// CloudNativePG backup method.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum CnpgBackupMethod {
    /// CSI volume snapshots of the instances' volumes.
    VolumeSnapshot,
    /// Base backups and WAL archiving to an object store (point-in-time recovery).
    BarmanObjectStore,
}

/// Replica bounds of the constellation StatefulSet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("replicas.min must not exceed replicas.max"))]
pub struct ReplicaRange {
    /// Fewest servers (also the scale subresource's `spec.replicas`).
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    /// Most servers.
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
}

impl Default for ReplicaRange {
    fn default() -> Self {
        ReplicaRange { min: 1, max: 3 }
    }
}

/// Autoscaling targets and windows (the seeds' HPA behaviour).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Let the operator change replicas within `[min, max]`; when false it keeps `min`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Successful syncs per second one server should carry.
    #[serde(default = "default_target_sps")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub target_syncs_per_second_per_pod: i32,
    /// Open device connections one server should carry.
    #[serde(default = "default_target_conns")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub target_connections_per_pod: i32,
    /// A scale-up must have been recommended for this long.
    #[serde(default = "default_up_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,
    /// A scale-down must have been recommended for this long.
    #[serde(default = "default_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        AutoscalingSpec {
            enabled: true,
            target_syncs_per_second_per_pod: default_target_sps(),
            target_connections_per_pod: default_target_conns(),
            scale_up_stabilization_seconds: default_up_window(),
            scale_down_stabilization_seconds: default_down_window(),
        }
    }
}

/// Where the database comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'external' || has(self.externalSecretRef)").message("postgres.externalSecretRef is required when mode is external"))]
pub struct PostgresSpec {
    /// `managed`, `cloudnativepg` or `external`; immutable: switching would strand the old
    /// database's objects and data (delete and re-create the Shard to move a database).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("postgres.mode is immutable: the old database would be stranded; delete and re-create the Shard to change it"))]
    pub mode: PostgresMode,
    /// Postgres instances; `cloudnativepg` runs this many (one primary, the rest replicas).
    /// `managed` always runs one primary and reports a larger value in its status message.
    #[serde(default = "default_instances")]
    #[schemars(range(min = 1, max = 9))]
    pub instances: i32,
    /// Size of each instance's volume: a positive Kubernetes quantity (`10Gi`, `500M`).
    #[serde(default = "default_storage")]
    #[schemars(length(min = 1, max = 32), pattern(STORAGE_PATTERN))]
    pub storage: String,
    /// StorageClass of the volumes; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Postgres image: a pgvector-enabled image for `managed` (default
    /// `pgvector/pgvector:pg16`), a CloudNativePG operand image for `cloudnativepg` (default
    /// `ghcr.io/cloudnative-pg/postgresql:16`, which ships pgvector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Secret holding the connection URI, for `external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_secret_ref: Option<SecretKeyRef>,
    /// What happens to database volumes when the Shard is deleted.
    #[serde(default)]
    pub volume_policy: VolumePolicy,
}

impl Default for PostgresSpec {
    fn default() -> Self {
        PostgresSpec {
            mode: PostgresMode::default(),
            instances: default_instances(),
            storage: default_storage(),
            storage_class: None,
            image: None,
            external_secret_ref: None,
            volume_policy: VolumePolicy::default(),
        }
    }
}

/// A positive quantity in the forms volume sizes take (a number with an optional binary or
/// decimal suffix); the API server would refuse anything else in the PVC the operator makes.
pub const STORAGE_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// Database provisioning mode.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PostgresMode {
    /// A StatefulSet + headless Service run by the operator.
    #[default]
    Managed,
    /// A `postgresql.cnpg.io/v1` Cluster (needs the CloudNativePG operator).
    Cloudnativepg,
    /// An existing database named by a Secret.
    External,
}

/// Key of a Secret in the Shard's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding a `postgres://` URI.
    #[serde(default = "default_uri_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Fate of the database volumes (and the Secrets their data depends on) on deletion.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VolumePolicy {
    /// Keep PVCs, the password Secret and the device-token Secret (orphaned, labelled).
    #[default]
    Retain,
    /// Delete them with the Shard.
    Delete,
}

/// HNSW index parameters.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HnswSpec {
    /// Links per node.
    #[serde(default = "default_hnsw_m")]
    #[schemars(range(min = 2, max = 100))]
    pub m: i32,
    /// Candidate list size while building.
    #[serde(default = "default_hnsw_ef")]
    #[schemars(range(min = 4, max = 1000))]
    pub ef_construction: i32,
}

impl Default for HnswSpec {
    fn default() -> Self {
        HnswSpec { m: default_hnsw_m(), ef_construction: default_hnsw_ef() }
    }
}

/// Type of the device-facing Service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceServiceType {
    /// In-cluster only (put an Ingress or gateway in front).
    #[default]
    ClusterIP,
    /// A cloud load balancer.
    LoadBalancer,
    /// A port on every node.
    NodePort,
}

impl DeviceServiceType {
    /// The Service `spec.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceServiceType::ClusterIP => "ClusterIP",
            DeviceServiceType::LoadBalancer => "LoadBalancer",
            DeviceServiceType::NodePort => "NodePort",
        }
    }
}

/// Observed state of a shard.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// `Provisioning`, `Running`, `Degraded` or `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ShardPhase>,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas the operator asks for.
    #[serde(default)]
    pub replicas: i32,
    /// Servers passing `/ready`.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Devices that synced in the last 15 minutes, summed over servers.
    #[serde(default)]
    pub active_devices: i64,
    /// Syncs per second, summed over servers.
    #[serde(default)]
    pub syncs_per_second: f64,
    /// Where to reach the shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<ShardEndpoints>,
    /// Label selector of the servers (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Autoscaler memory, kept here so it survives operator restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<AutoscalerState>,
}

/// Lifecycle phase of a shard.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardPhase {
    /// Objects created, servers or database not ready yet.
    Provisioning,
    /// Servers are serving (the Ready condition says whether all wanted ones are).
    Running,
    /// The spec cannot be satisfied as it stands; see the Degraded condition.
    Degraded,
    /// Being deleted in order.
    Terminating,
}

/// In-cluster addresses of a shard.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShardEndpoints {
    /// Device-facing gRPC (`Constellation`).
    pub grpc: String,
    /// `ShardAdmin` gRPC, used by federation Jobs.
    pub admin: String,
    /// REST admin (`/health`, `/api/v1/stats`).
    pub rest: String,
}

/// What the autoscaler remembers between reconciles.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerState {
    /// Recommendations, one entry each time the recommended count changed (oldest first).
    #[serde(default)]
    pub recommendations: Vec<TimedReplicas>,
    /// Replica changes made, for the rate limits (oldest first).
    #[serde(default)]
    pub scale_events: Vec<TimedReplicas>,
}

/// A replica count at a time (a recommendation, or a change of `delta` pods).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TimedReplicas {
    /// When.
    pub at: Time,
    /// Replicas (for a recommendation) or the signed change (for a scale event).
    pub replicas: i32,
}

fn default_region() -> String {
    "local".into()
}
fn default_max_devices() -> i64 {
    4_000_000
}
fn default_image() -> String {
    "ghcr.io/exogenesis/omega-shard:0.1.0".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_true() -> bool {
    true
}
fn default_target_sps() -> i32 {
    100
}
fn default_target_conns() -> i32 {
    5000
}
fn default_up_window() -> i32 {
    60
}
fn default_down_window() -> i32 {
    300
}
fn default_instances() -> i32 {
    3
}
fn default_storage() -> String {
    "10Gi".into()
}
fn default_retention_days() -> i32 {
    7
}
fn default_uri_key() -> String {
    "uri".into()
}
fn default_hnsw_m() -> i32 {
    16
}
fn default_hnsw_ef() -> i32 {
    64
}
