//! Test helpers: installing CRDs, a stand-in for shard pods' `/api/v1/stats`, starting the
//! operator in process.

use crate::fake::Fake;
use omega_operator::context::Settings;
use omega_operator::leader::LeaseConfig;
use omega_operator::run::{LeaseOptions, Options};
use omega_protocol::admin::ShardStats;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Creates the operator's CRDs in the fake.
pub fn install_crds(fake: &Fake) {
    for (_, crd) in omega_operator::crd::all() {
        fake.create(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "",
            serde_json::to_value(crd).unwrap(),
        );
    }
}

/// Creates a namespace.
pub fn namespace(fake: &Fake, name: &str) {
    fake.create("", "namespaces", "", json!({"metadata": {"name": name}}));
}

/// A minimal CRD for another operator's kind (CNPG Cluster, ServiceMonitor).
pub fn foreign_crd(fake: &Fake, group: &str, kind: &str, plural: &str) {
    fake.create(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "",
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}")},
            "spec": {"group": group, "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase()},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
        }),
    );
}

/// Stand-in for the shard pods' `/api/v1/stats`: a total load shared evenly by the ready
/// constellation pods in the fake (so scaling out lowers each pod's share, as in reality).
#[derive(Clone)]
pub struct Stats {
    total: Arc<Mutex<(f64, u64)>>,
}

impl Stats {
    pub async fn start(fake: &Fake) -> Stats {
        let total = Arc::new(Mutex::new((10.0, 100)));
        let (t, f) = (total.clone(), fake.clone());
        let app = axum::Router::new().route(
            "/api/v1/stats",
            axum::routing::get(move || {
                let (t, f) = (t.clone(), f.clone());
                async move {
                    let ready = f
                        .list("", "pods", "")
                        .iter()
                        .filter(|p| {
                            p["metadata"]["labels"]["app.kubernetes.io/component"]
                                == json!("constellation")
                        })
                        .filter(|p| p["status"]["conditions"][0]["status"] == json!("True"))
                        .count()
                        .max(1);
                    let (sps, conns) = *t.lock().unwrap();
                    axum::Json(ShardStats {
                        shard_id: 1,
                        region: "test".into(),
                        syncs_per_second: sps / ready as f64,
                        grpc_connections: conns / ready as u64,
                        devices_active: 40,
                        store: "postgres".into(),
                        ready: true,
                        ..ShardStats::default()
                    })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake.behaviour.lock().unwrap().stats_port = Some(port);
        Stats { total }
    }

    /// Total load over all pods.
    pub fn set(&self, syncs_per_second: f64, connections: u64) {
        *self.total.lock().unwrap() = (syncs_per_second, connections);
    }
}

/// Fast settings for tests.
pub fn settings(namespace: Option<&str>) -> Settings {
    Settings {
        namespace: namespace.map(String::from),
        operator_namespace: "omega-system".into(),
        stats_interval: Duration::from_millis(500),
        stats_timeout: Duration::from_secs(1),
        backoff_base: Duration::from_millis(500),
        backoff_max: Duration::from_secs(4),
    }
}

/// The operator running in this process.
pub struct Operator {
    pub handle: tokio::task::JoinHandle<omega_operator::Result<()>>,
    /// Port of its `/metrics`, `/health` and `/ready`.
    pub port: u16,
}

impl Operator {
    pub fn abort(&self) {
        self.handle.abort();
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        http_get(self.port, "/metrics").await.unwrap_or_default()
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A plain HTTP/1.1 GET on loopback; the whole response (status line, headers, body).
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    Some(buf)
}

/// Runs the operator (leader election on, both controllers) in this process, with the
/// operator's token so that its requests can be audited.
pub fn start_operator(fake: &Fake, namespace: Option<&str>, identity: &str) -> Operator {
    let client = fake.operator_client();
    let port = free_port();
    let opts = Options {
        settings: settings(namespace),
        leader_election: Some(LeaseOptions {
            namespace: "default".into(),
            lease: LeaseConfig {
                name: "omega-operator".into(),
                identity: identity.into(),
                lease_duration: Duration::from_secs(6),
                renew_every: Duration::from_secs(1),
                renew_deadline: Duration::from_secs(4),
            },
        }),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        identity: identity.into(),
    };
    Operator { handle: tokio::spawn(omega_operator::run::run(client, opts)), port }
}

/// A condition of an object's status.
pub fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == json!(type_))
}

/// Events (events.k8s.io) about an object, as (type, reason).
pub fn events_for(fake: &Fake, ns: &str, name: &str) -> Vec<(String, String)> {
    fake.list("events.k8s.io", "events", ns)
        .into_iter()
        .filter(|e| e["regarding"]["name"] == json!(name))
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}
