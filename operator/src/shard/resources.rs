//! Desired objects of a Shard: pure functions from the spec (and a few observed facts passed
//! in) to typed Kubernetes objects. The reconciler applies them by server-side apply.
//!
//! Names, for a Shard `s`:
//! - `s` — constellation StatefulSet, device-facing Service (gRPC 50051), PDB, NetworkPolicy
//! - `s-admin` — Service for `ShardAdmin` gRPC 50052 and REST 8080 (federation Jobs, operator)
//! - `s-headless` — headless Service of the StatefulSet (stable pod DNS, metrics scraping)
//! - `s-device-token` — Secret with `OMEGA_DEVICE_SECRET`
//! - `s-postgres` — database (StatefulSet + headless Service + password Secret, or CNPG Cluster)

use super::postgres::Database;
use crate::crd::{DeviceServiceType, PostgresMode, Shard};
use crate::{Error, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, SeccompProfile, Secret, SecretKeySelector, SecurityContext, Service, ServicePort,
    ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Device-facing gRPC (`Constellation`).
pub const GRPC_PORT: i32 = 50051;
/// `ShardAdmin` gRPC.
pub const ADMIN_PORT: i32 = 50052;
/// REST admin: `/health`, `/ready`, `/live`, `/api/v1/stats`.
pub const REST_PORT: i32 = 8080;
/// Name of the namespace's `ShardAdmin` credential Secret ([`admin_secret`]).
pub const ADMIN_SECRET: &str = "omega-shard-admin";
/// Key of the token in [`ADMIN_SECRET`].
pub const ADMIN_TOKEN_KEY: &str = "ADMIN_TOKEN";
/// Prometheus `/metrics`.
pub const METRICS_PORT: i32 = 9090;
/// Postgres.
pub const PG_PORT: i32 = 5432;
/// Name of the REST container port; the autoscaler reads each pod's stats on it.
pub const REST_PORT_NAME: &str = "http";
/// Database and role the shard uses.
pub const PG_DATABASE: &str = "omega";
/// Label key naming the Shard an object belongs to.
pub const SHARD_LABEL: &str = "omega.exogenesis.io/shard";
/// Label key and value federation Job pods carry (the NetworkPolicies admit them).
pub const ROLE_LABEL: &str = "omega.exogenesis.io/role";
/// See [`ROLE_LABEL`].
pub const ROLE_FEDERATION: &str = "federation";
/// Label the operator's own pods carry (set by the Helm chart).
pub const OPERATOR_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "omega-operator");
/// UID/GID of the shard server (distroless `nonroot`).
pub const SHARD_UID: i64 = 65532;
/// Default image of `managed` Postgres.
pub const PGVECTOR_IMAGE: &str = "pgvector/pgvector:pg16";
/// Default operand image of `cloudnativepg` (includes pgvector).
pub const CNPG_IMAGE: &str = "ghcr.io/cloudnative-pg/postgresql:16";
/// UID/GID of `postgres` in the official (and pgvector) images.
pub const POSTGRES_UID: i64 = 999;
/// Seconds a shard keeps its listeners open after SIGTERM while `/ready` answers 503 and new
/// requests get UNAVAILABLE (`DRAIN_DELAY_SECS`): endpoints and load balancers stop sending
/// devices to the pod before its ports close. Set explicitly so that the grace period below
/// never depends on a server default that could change.
pub const DRAIN_DELAY_SECS: i64 = 5;
/// Seconds the shard then waits for in-flight requests (`DRAIN_TIMEOUT_SECS`).
pub const DRAIN_TIMEOUT_SECS: i64 = 20;
/// Room past both for flushing the store and exiting before the kubelet's SIGKILL, which
/// would cut the flush short.
pub const SHUTDOWN_MARGIN_SECS: i64 = 10;
/// `terminationGracePeriodSeconds` of a constellation pod. The server handles SIGTERM itself
/// (drain, then flush), so no preStop hook is needed: the grace period only has to outlast it.
pub const TERMINATION_GRACE_SECS: i64 =
    DRAIN_DELAY_SECS + DRAIN_TIMEOUT_SECS + SHUTDOWN_MARGIN_SECS;

/// Names of everything a Shard owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The Shard; also the StatefulSet, device Service, PDB and NetworkPolicy.
    pub shard: String,
    /// `ShardAdmin` + REST Service.
    pub admin: String,
    /// Headless Service of the constellation.
    pub headless: String,
    /// Device-token Secret.
    pub device_token: String,
    /// Database StatefulSet / Service / CNPG Cluster.
    pub postgres: String,
    /// Managed database password Secret.
    pub postgres_secret: String,
    /// NetworkPolicy of the database pods.
    pub postgres_policy: String,
}

impl Names {
    /// Names for a Shard called `shard`.
    pub fn new(shard: &str) -> Self {
        Names {
            shard: shard.to_string(),
            admin: format!("{shard}-admin"),
            headless: format!("{shard}-headless"),
            device_token: format!("{shard}-device-token"),
            postgres: format!("{shard}-postgres"),
            postgres_secret: format!("{shard}-postgres"),
            postgres_policy: format!("{shard}-postgres"),
        }
    }
}

/// What a Shard's objects have in common (name, namespace, owner, labels).
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Object names.
    pub names: Names,
    /// Namespace of the Shard and all its objects.
    pub namespace: String,
    /// Controller owner reference to the Shard.
    pub owner: OwnerReference,
}

impl Ctx {
    /// Context of a Shard read from the API server.
    pub fn of(shard: &Shard) -> Result<Self> {
        Ok(Ctx {
            names: Names::new(&shard.name_any()),
            namespace: shard.namespace().ok_or(Error::MissingField("metadata.namespace"))?,
            owner: shard.controller_owner_ref(&()).ok_or(Error::MissingField("metadata.uid"))?,
        })
    }

    pub(super) fn meta(&self, name: &str, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// Labels of every object of a component (`constellation`, `postgres`, `secrets`…).
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut l = self.selector(component);
        l.insert("app.kubernetes.io/managed-by".into(), "omega-operator".into());
        l.insert("app.kubernetes.io/part-of".into(), "omega".into());
        l.insert(SHARD_LABEL.into(), self.names.shard.clone());
        l
    }

    /// The stable subset used in selectors.
    pub fn selector(&self, component: &str) -> BTreeMap<String, String> {
        let name = if component == "postgres" { "omega-postgres" } else { "omega-shard" };
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), name.to_string()),
            ("app.kubernetes.io/instance".to_string(), self.names.shard.clone()),
            ("app.kubernetes.io/component".to_string(), component.to_string()),
        ])
    }

    /// `key=value,…` selector of the constellation pods (status `selector`, stats lookup).
    pub fn selector_string(&self, component: &str) -> String {
        self.selector(component)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub(super) fn svc_host(&self, name: &str) -> String {
        format!("{name}.{}.svc", self.namespace)
    }

    /// `ShardAdmin` endpoint, as `omega-shard federate --shards` takes it.
    pub fn admin_endpoint(&self) -> String {
        format!("http://{}:{ADMIN_PORT}", self.svc_host(&self.names.admin))
    }
    /// Device-facing endpoint.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}:{GRPC_PORT}", self.svc_host(&self.names.shard))
    }
    /// REST admin endpoint.
    pub fn rest_endpoint(&self) -> String {
        format!("http://{}:{REST_PORT}", self.svc_host(&self.names.admin))
    }
}

pub(super) fn key_ref(name: &str, key: &str) -> SecretKeySelector {
    SecretKeySelector { name: name.to_string(), key: key.to_string(), optional: None }
}

pub(super) fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

pub(super) fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(key_ref(secret, key)),
            ..Default::default()
        }),
    }
}

pub(super) fn named_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

pub(super) fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(REST_PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// Non-root, read-only root filesystem, no privilege escalation, no capabilities.
pub fn restricted_container_security(uid: i64) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

pub(super) fn pod_security(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

pub(super) fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

pub(super) fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), ..Default::default() }
}

fn spread(cx: &Ctx, component: &str) -> (Affinity, Vec<TopologySpreadConstraint>) {
    let selector =
        LabelSelector { match_labels: Some(cx.selector(component)), match_expressions: None };
    let affinity = Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(selector.clone()),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let zones = TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "topology.kubernetes.io/zone".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(selector),
        ..Default::default()
    };
    (affinity, vec![zones])
}

/// The constellation StatefulSet running `omega-shard serve`.
pub fn constellation(
    shard: &Shard,
    cx: &Ctx,
    replicas: i32,
    db: &Database,
    device_secret: &str,
) -> StatefulSet {
    let s = &shard.spec;
    let mut envs = vec![
        env("SHARD_ID", &s.shard_id.to_string()),
        env("REGION", &s.region),
        env("MAX_DEVICES", &s.max_devices.to_string()),
        EnvVar {
            name: "DATABASE_URL".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(db.url.clone()),
                ..Default::default()
            }),
        },
    ];
    envs.extend(db.read_env.iter().cloned());
    envs.extend([
        secret_env("OMEGA_DEVICE_SECRET", device_secret, "OMEGA_DEVICE_SECRET"),
        admin_token_env(),
        env("GRPC_ADDR", &format!("0.0.0.0:{GRPC_PORT}")),
        env("ADMIN_GRPC_ADDR", &format!("0.0.0.0:{ADMIN_PORT}")),
        env("REST_ADDR", &format!("0.0.0.0:{REST_PORT}")),
        env("METRICS_ADDR", &format!("0.0.0.0:{METRICS_PORT}")),
        env("RUST_LOG", &s.log_level),
        env("LOG_FORMAT", "json"),
        env("DATA_DIR", "/data"),
        env("HNSW_M", &s.hnsw.m.to_string()),
        env("HNSW_EF_CONSTRUCTION", &s.hnsw.ef_construction.to_string()),
        env("DRAIN_DELAY_SECS", &DRAIN_DELAY_SECS.to_string()),
        env("DRAIN_TIMEOUT_SECS", &DRAIN_TIMEOUT_SECS.to_string()),
    ]);
    let (affinity, spread) = spread(cx, "constellation");
    let container = Container {
        name: "shard".into(),
        image: Some(s.image.clone()),
        args: Some(vec!["serve".into()]),
        env: Some(envs),
        ports: Some(vec![
            named_port("grpc", GRPC_PORT),
            named_port("admin", ADMIN_PORT),
            named_port(REST_PORT_NAME, REST_PORT),
            named_port("metrics", METRICS_PORT),
        ]),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        // Migrations run at start-up: give them up to 5 minutes before liveness applies.
        startup_probe: Some(http_probe("/live", 5, 60)),
        resources: s.resources.clone(),
        security_context: Some(restricted_container_security(SHARD_UID)),
        volume_mounts: Some(vec![mount("tmp", "/tmp"), mount("data", "/data")]),
        ..Default::default()
    };
    StatefulSet {
        metadata: cx.meta(&cx.names.shard, "constellation"),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(cx.names.headless.clone()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(cx.selector("constellation")),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(cx.labels("constellation")),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    security_context: Some(pod_security(SHARD_UID)),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECS),
                    affinity: Some(affinity),
                    topology_spread_constraints: Some(spread),
                    volumes: Some(vec![empty_dir("tmp"), empty_dir("data")]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// Device-facing, admin and headless Services.
pub fn services(shard: &Shard, cx: &Ctx) -> Vec<Service> {
    let sel = Some(cx.selector("constellation"));
    let device = Service {
        metadata: cx.meta(&cx.names.shard, "constellation"),
        spec: Some(ServiceSpec {
            type_: Some(shard.spec.service_type.as_str().into()),
            selector: sel.clone(),
            ports: Some(vec![service_port("grpc", GRPC_PORT)]),
            ..Default::default()
        }),
        status: None,
    };
    let admin = Service {
        metadata: cx.meta(&cx.names.admin, "constellation"),
        spec: Some(ServiceSpec {
            type_: Some(DeviceServiceType::ClusterIP.as_str().into()),
            selector: sel.clone(),
            ports: Some(vec![
                service_port("admin", ADMIN_PORT),
                service_port(REST_PORT_NAME, REST_PORT),
            ]),
            ..Default::default()
        }),
        status: None,
    };
    let headless = Service {
        metadata: cx.meta(&cx.names.headless, "constellation"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: sel,
            ports: Some(vec![
                service_port("grpc", GRPC_PORT),
                service_port("admin", ADMIN_PORT),
                service_port(REST_PORT_NAME, REST_PORT),
                service_port("metrics", METRICS_PORT),
            ]),
            ..Default::default()
        }),
        status: None,
    };
    vec![device, admin, headless]
}

/// At most one server down for voluntary disruptions.
pub fn disruption_budget(cx: &Ctx) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: cx.meta(&cx.names.shard, "constellation"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(cx.selector("constellation")),
                match_expressions: None,
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Label every namespace carries with its own name (set by the API server since 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Peers allowed to reach admin and database ports: the operator (its pods in its own
/// namespace only: a pod labelled like the operator elsewhere is not trusted), this
/// namespace's federation Jobs, and the shard's own servers.
fn trusted_peers(cx: &Ctx, operator_namespace: &str) -> Vec<NetworkPolicyPeer> {
    let pods = |labels: BTreeMap<String, String>| LabelSelector {
        match_labels: Some(labels),
        match_expressions: None,
    };
    vec![
        NetworkPolicyPeer {
            namespace_selector: Some(pods(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_string(),
                operator_namespace.to_string(),
            )]))),
            pod_selector: Some(pods(BTreeMap::from([(
                OPERATOR_POD_LABEL.0.to_string(),
                OPERATOR_POD_LABEL.1.to_string(),
            )]))),
            ip_block: None,
        },
        NetworkPolicyPeer {
            pod_selector: Some(pods(BTreeMap::from([(
                ROLE_LABEL.to_string(),
                ROLE_FEDERATION.to_string(),
            )]))),
            ..Default::default()
        },
        NetworkPolicyPeer {
            pod_selector: Some(pods(cx.selector("constellation"))),
            ..Default::default()
        },
    ]
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        end_port: None,
    }
}

/// NetworkPolicies: device gRPC and metrics open; admin gRPC, REST and the database only from
/// trusted peers (`operator_namespace` is where the operator's pods run).
pub fn network_policies(shard: &Shard, cx: &Ctx, operator_namespace: &str) -> Vec<NetworkPolicy> {
    let servers = NetworkPolicy {
        metadata: cx.meta(&cx.names.shard, "constellation"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(cx.selector("constellation")),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![tcp(GRPC_PORT), tcp(METRICS_PORT)]),
                    from: None,
                },
                NetworkPolicyIngressRule {
                    ports: Some(vec![tcp(ADMIN_PORT), tcp(REST_PORT)]),
                    from: Some(trusted_peers(cx, operator_namespace)),
                },
            ]),
            egress: None,
        }),
    };
    let mut out = vec![servers];
    let mut db_rules = vec![NetworkPolicyIngressRule {
        ports: Some(vec![tcp(PG_PORT)]),
        from: Some(trusted_peers(cx, operator_namespace)),
    }];
    let db_selector = match shard.spec.postgres.mode {
        PostgresMode::External => return out,
        PostgresMode::Managed => {
            // The backup CronJob's pods dump the database.
            if shard.spec.backup.is_some()
                && let Some(from) = db_rules[0].from.as_mut()
            {
                from.push(NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(cx.selector("backup")),
                        match_expressions: None,
                    }),
                    ..Default::default()
                });
            }
            cx.selector("postgres")
        }
        PostgresMode::Cloudnativepg => {
            let own = BTreeMap::from([("cnpg.io/cluster".to_string(), cx.names.postgres.clone())]);
            // Replication between instances, and the CNPG operator's status probes (port 8000).
            db_rules.push(NetworkPolicyIngressRule {
                ports: Some(vec![tcp(PG_PORT)]),
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(own.clone()),
                        match_expressions: None,
                    }),
                    ..Default::default()
                }]),
            });
            db_rules.push(NetworkPolicyIngressRule { ports: Some(vec![tcp(8000)]), from: None });
            own
        }
    };
    out.push(NetworkPolicy {
        metadata: cx.meta(&cx.names.postgres_policy, "postgres"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(db_selector),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(db_rules),
            egress: None,
        }),
    });
    out
}

/// A Secret of the Shard holding `data`; `owned` is false when the Shard is being deleted
/// with `volumePolicy: Retain` (the Secret is orphaned so retained volumes stay usable).
pub fn secret(cx: &Ctx, name: &str, data: BTreeMap<String, ByteString>, owned: bool) -> Secret {
    let mut metadata = cx.meta(name, "secrets");
    if !owned {
        metadata.owner_references = None;
    }
    Secret { metadata, data: Some(data), type_: Some("Opaque".into()), ..Default::default() }
}

/// The namespace's `ShardAdmin` credential: one bearer token shared by every Shard of the
/// namespace and the federation Jobs that call them (a round spans the namespace's shards).
/// It has no owner: deleting one Shard must not revoke the others' credential.
pub fn admin_secret(namespace: &str, token: ByteString) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(ADMIN_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), "omega-operator".to_string()),
                ("app.kubernetes.io/part-of".to_string(), "omega".to_string()),
                ("app.kubernetes.io/component".to_string(), "admin-credential".to_string()),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(ADMIN_TOKEN_KEY.to_string(), token)])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// `ADMIN_TOKEN` from the namespace's admin Secret, for shard pods and federation Jobs.
pub fn admin_token_env() -> EnvVar {
    secret_env("ADMIN_TOKEN", ADMIN_SECRET, ADMIN_TOKEN_KEY)
}

/// A Prometheus Operator `ServiceMonitor` scraping every server's `metrics` port.
pub fn service_monitor(cx: &Ctx) -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": cx.meta(&cx.names.shard, "constellation"),
        "spec": {
            // job="omega-shard" for every Shard, as the alert rules expect.
            "jobLabel": "app.kubernetes.io/name",
            "selector": { "matchLabels": cx.selector("constellation") },
            "endpoints": [{ "port": "metrics", "path": "/metrics", "interval": "30s" }],
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{PostgresSpec, SecretKeyRef, ShardSpec, VolumePolicy};
    use crate::shard::postgres::*;

    pub(crate) fn shard(mode: PostgresMode) -> Shard {
        let mut s = Shard::new(
            "eu1",
            serde_json::from_value::<ShardSpec>(json!({"shardId": 7, "region": "eu-west"}))
                .unwrap(),
        );
        s.metadata.namespace = Some("tv".into());
        s.metadata.uid = Some("uid-1".into());
        s.spec.postgres = PostgresSpec {
            mode,
            external_secret_ref: (mode == PostgresMode::External)
                .then(|| SecretKeyRef { name: "db".into(), key: "url".into() }),
            ..PostgresSpec::default()
        };
        s
    }

    fn container(sts: &StatefulSet) -> &Container {
        &sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
    }

    fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
        c.env.as_ref().unwrap().iter().find(|e| e.name == name)
    }

    #[test]
    fn constellation_runs_serve_with_the_design_env_and_ports() {
        let s = shard(PostgresMode::Managed);
        let cx = Ctx::of(&s).unwrap();
        let sts = constellation(&s, &cx, 3, &database(&s, &cx), &cx.names.device_token);
        assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(3));
        let c = container(&sts);
        assert_eq!(c.args.as_deref(), Some(&["serve".to_string()][..]));
        for (name, value) in [
            ("SHARD_ID", "7"),
            ("REGION", "eu-west"),
            ("MAX_DEVICES", "4000000"),
            ("GRPC_ADDR", "0.0.0.0:50051"),
            ("ADMIN_GRPC_ADDR", "0.0.0.0:50052"),
            ("REST_ADDR", "0.0.0.0:8080"),
            ("METRICS_ADDR", "0.0.0.0:9090"),
            ("RUST_LOG", "info"),
            ("LOG_FORMAT", "json"),
            ("DRAIN_DELAY_SECS", "5"),
            ("DRAIN_TIMEOUT_SECS", "20"),
        ] {
            assert_eq!(env_value(c, name).and_then(|e| e.value.as_deref()), Some(value), "{name}");
        }
        let db = env_value(c, "DATABASE_URL")
            .unwrap()
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((db.name.as_str(), db.key.as_str()), ("eu1-postgres", "uri"));
        let token = env_value(c, "OMEGA_DEVICE_SECRET").unwrap().value_from.as_ref().unwrap();
        assert_eq!(token.secret_key_ref.as_ref().unwrap().name, "eu1-device-token");
        let ports: Vec<i32> = c.ports.as_ref().unwrap().iter().map(|p| p.container_port).collect();
        assert_eq!(ports, [50051, 50052, 8080, 9090]);
        let path = |p: &Option<Probe>| {
            p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap()
        };
        assert_eq!(path(&c.readiness_probe), "/ready");
        assert_eq!(path(&c.liveness_probe), "/live");
        assert!(c.startup_probe.is_some());
    }

    /// The kubelet sends SIGKILL after `terminationGracePeriodSeconds`: it must outlast the
    /// shard's whole drain (delay + timeout, read back from the env it is given) with room to
    /// flush, or in-flight syncs and the store flush are cut short. SIGTERM is handled by the
    /// server, so no preStop hook delays it further.
    #[test]
    fn termination_grace_outlasts_the_shard_drain() {
        let s = shard(PostgresMode::Managed);
        let cx = Ctx::of(&s).unwrap();
        let sts = constellation(&s, &cx, 2, &database(&s, &cx), "t");
        let c = container(&sts);
        let secs = |name: &str| -> i64 {
            env_value(c, name).and_then(|e| e.value.as_deref()).unwrap().parse().unwrap()
        };
        let (delay, timeout) = (secs("DRAIN_DELAY_SECS"), secs("DRAIN_TIMEOUT_SECS"));
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let grace = pod.termination_grace_period_seconds.unwrap();
        for (what, got, want) in [
            ("drain delay", delay, 5),
            ("drain timeout", timeout, 20),
            ("grace period", grace, 35),
            ("margin past the drain", grace - delay - timeout, SHUTDOWN_MARGIN_SECS),
        ] {
            assert_eq!(got, want, "{what}");
        }
        assert!(grace > delay + timeout, "grace {grace} s <= drain {} s", delay + timeout);
        // The drain delay covers at least one readiness probe period, so a probe sees the 503.
        let ready_period = c.readiness_probe.as_ref().unwrap().period_seconds.unwrap();
        assert!(
            delay >= i64::from(ready_period),
            "delay {delay} s < probe period {ready_period} s"
        );
        assert!(c.lifecycle.is_none(), "no preStop: the server handles SIGTERM");
    }

    #[test]
    fn every_container_is_locked_down() {
        let s = shard(PostgresMode::Managed);
        let cx = Ctx::of(&s).unwrap();
        for sts in
            [constellation(&s, &cx, 1, &database(&s, &cx), "t"), postgres_statefulset(&s, &cx)]
        {
            let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
            for c in &pod.containers {
                let sc = c.security_context.as_ref().unwrap();
                assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
                assert_eq!(sc.allow_privilege_escalation, Some(false));
                assert_eq!(
                    sc.capabilities.as_ref().unwrap().drop.as_deref(),
                    Some(&["ALL".to_string()][..])
                );
            }
        }
    }

    #[test]
    fn spread_across_nodes_and_zones() {
        let s = shard(PostgresMode::Managed);
        let cx = Ctx::of(&s).unwrap();
        let sts = constellation(&s, &cx, 3, &database(&s, &cx), "t");
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let anti = pod.affinity.unwrap().pod_anti_affinity.unwrap();
        assert_eq!(
            anti.preferred_during_scheduling_ignored_during_execution.unwrap()[0]
                .pod_affinity_term
                .topology_key,
            "kubernetes.io/hostname"
        );
        assert_eq!(
            pod.topology_spread_constraints.unwrap()[0].topology_key,
            "topology.kubernetes.io/zone"
        );
    }

    #[test]
    fn everything_is_owned_by_the_shard() {
        let s = shard(PostgresMode::Managed);
        let cx = Ctx::of(&s).unwrap();
        let owners = |m: &ObjectMeta| m.owner_references.clone().unwrap_or_default();
        let mut metas: Vec<ObjectMeta> =
            services(&s, &cx).into_iter().map(|o| o.metadata).collect();
        metas.extend(network_policies(&s, &cx, "omega-system").into_iter().map(|o| o.metadata));
        metas.push(disruption_budget(&cx).metadata);
        metas.push(postgres_service(&cx).metadata);
        metas.push(postgres_statefulset(&s, &cx).metadata);
        metas.push(secret(&cx, "x", BTreeMap::new(), true).metadata);
        for m in metas {
            let o = owners(&m);
            assert_eq!(o.len(), 1, "{:?}", m.name);
            assert_eq!(
                (o[0].kind.as_str(), o[0].uid.as_str(), o[0].controller),
                ("Shard", "uid-1", Some(true))
            );
        }
        assert!(secret(&cx, "x", BTreeMap::new(), false).metadata.owner_references.is_none());
        let cluster = cnpg_cluster(&s, &cx);
        assert_eq!(cluster["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    }

    #[test]
    fn database_wiring_by_mode() {
        let cases = [
            (PostgresMode::Managed, "eu1-postgres", "uri", false),
            (PostgresMode::Cloudnativepg, "eu1-postgres-app", "uri", true),
            (PostgresMode::External, "db", "url", false),
        ];
        for (mode, name, key, read) in cases {
            let s = shard(mode);
            let db = database(&s, &Ctx::of(&s).unwrap());
            assert_eq!((db.url.name.as_str(), db.url.key.as_str()), (name, key), "{mode:?}");
            assert_eq!(
                db.read_env.iter().any(|e| e.name == "DATABASE_READ_URLS"),
                read,
                "{mode:?}"
            );
        }
    }

    #[test]
    fn network_policies_restrict_admin_and_database() {
        let s = shard(PostgresMode::Managed);
        let cx = Ctx::of(&s).unwrap();
        let policies = network_policies(&s, &cx, "omega-system");
        assert_eq!(policies.len(), 2);
        let rules = policies[0].spec.as_ref().unwrap().ingress.clone().unwrap();
        // Open rule: only device gRPC and metrics.
        let open: Vec<_> = rules
            .iter()
            .filter(|r| r.from.is_none())
            .flat_map(|r| r.ports.clone().unwrap())
            .collect();
        assert_eq!(open, vec![tcp(GRPC_PORT), tcp(METRICS_PORT)]);
        let admin = rules.iter().find(|r| r.from.is_some()).unwrap();
        assert_eq!(admin.ports.clone().unwrap(), vec![tcp(ADMIN_PORT), tcp(REST_PORT)]);
        assert_eq!(admin.from.as_ref().unwrap().len(), 3);
        let db = policies[1].spec.as_ref().unwrap().ingress.clone().unwrap();
        assert!(db.iter().all(|r| r.from.is_some()), "database has no open rule");
        assert_eq!(network_policies(&shard(PostgresMode::External), &cx, "x").len(), 1);
        // The operator is trusted in its own namespace only, never in any namespace.
        for rule in admin.from.iter().chain(db.iter().flat_map(|r| r.from.iter())) {
            for peer in rule {
                let Some(ns) = &peer.namespace_selector else { continue };
                let labels = ns.match_labels.clone().unwrap_or_default();
                assert_eq!(
                    labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
                    Some("omega-system"),
                    "{peer:?}"
                );
                assert!(ns.match_expressions.is_none());
            }
        }
    }

    #[test]
    fn managed_database_secret_and_volume_policy() {
        let mut s = shard(PostgresMode::Managed);
        let cx = Ctx::of(&s).unwrap();
        let data = postgres_secret_data(&cx, "pw");
        assert_eq!(data["uri"].0, b"postgres://omega:pw@eu1-postgres.tv.svc:5432/omega");
        let policy = |s: &Shard| {
            postgres_statefulset(s, &cx)
                .spec
                .unwrap()
                .persistent_volume_claim_retention_policy
                .unwrap()
                .when_deleted
        };
        assert_eq!(policy(&s).as_deref(), Some("Retain"));
        s.spec.postgres.volume_policy = VolumePolicy::Delete;
        assert_eq!(policy(&s).as_deref(), Some("Delete"));
    }

    #[test]
    fn generated_objects_round_trip_as_their_typed_objects() {
        use kube::api::DynamicObject;
        fn round_trip<
            T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
        >(
            o: &T,
        ) {
            let v = serde_json::to_value(o).unwrap();
            assert!(v["apiVersion"].is_string() && v["kind"].is_string(), "{v}");
            assert_eq!(&serde_json::from_value::<T>(v).unwrap(), o);
        }
        for mode in [PostgresMode::Managed, PostgresMode::Cloudnativepg, PostgresMode::External] {
            let s = shard(mode);
            let cx = Ctx::of(&s).unwrap();
            round_trip(&constellation(&s, &cx, 2, &database(&s, &cx), "t"));
            round_trip(&postgres_statefulset(&s, &cx));
            round_trip(&postgres_service(&cx));
            round_trip(&disruption_budget(&cx));
            round_trip(&secret(&cx, "x", postgres_secret_data(&cx, "pw"), true));
            services(&s, &cx).iter().for_each(round_trip);
            network_policies(&s, &cx, "omega-system").iter().for_each(round_trip);
            for v in [cnpg_cluster(&s, &cx), service_monitor(&cx)] {
                let d: DynamicObject = serde_json::from_value(v.clone()).unwrap();
                assert_eq!(d.metadata.owner_references.unwrap()[0].uid, "uid-1");
                assert!(
                    v["apiVersion"].is_string() && v["kind"].is_string() && v["spec"].is_object()
                );
            }
        }
    }

    #[test]
    fn postgres_images_default_by_mode() {
        let managed = shard(PostgresMode::Managed);
        let cx = Ctx::of(&managed).unwrap();
        let sts = postgres_statefulset(&managed, &cx);
        assert_eq!(container(&sts).image.as_deref(), Some(PGVECTOR_IMAGE));
        let cnpg = shard(PostgresMode::Cloudnativepg);
        assert_eq!(cnpg_cluster(&cnpg, &cx)["spec"]["imageName"], CNPG_IMAGE);
        let mut custom = cnpg.clone();
        custom.spec.postgres.image = Some("registry.local/pg:16".into());
        assert_eq!(cnpg_cluster(&custom, &cx)["spec"]["imageName"], "registry.local/pg:16");
    }

    #[test]
    fn endpoints_follow_the_architecture_contract() {
        let s = shard(PostgresMode::Managed);
        let cx = Ctx::of(&s).unwrap();
        assert_eq!(cx.admin_endpoint(), "http://eu1-admin.tv.svc:50052");
        assert_eq!(cx.grpc_endpoint(), "http://eu1.tv.svc:50051");
    }
}
