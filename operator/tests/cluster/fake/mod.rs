//! A stateful fake Kubernetes API server on loopback, good enough for the operator's real
//! `Controller`s, the real `omega-operator` binary and the real `kubectl`.
//!
//! Supports: discovery (`/api`, `/apis`, group versions, `/version`) and just enough OpenAPI v3
//! for kubectl to leave validation to the server (`fieldValidation=Strict` refuses unknown
//! fields), objects per kind and namespace, a resourceVersion bumped on every write and 409 on
//! stale ones, create / get / list (label and field selectors) / replace / delete /
//! deletecollection, merge, strategic-merge (as merge), JSON and server-side-apply patches, the
//! status and scale subresources, CRD registration with defaulting, pruning, structural
//! validation (types, ranges, lengths, enums, patterns) and CEL rules, the decoding of
//! built-in objects' quantities (400 like the real server), finalizers, owner-reference
//! garbage collection, watches with resourceVersion resume, Table printing, a log of every
//! request by client token (for the RBAC audit), and mock controllers (`controllers.rs`).

pub mod controllers;
pub mod http;
pub mod schema;
pub mod store;
pub mod types;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::Store;
use tokio::sync::Notify;

/// Bearer token of the operator under test.
pub const OPERATOR: &str = "operator";

/// A running fake API server.
#[derive(Clone)]
pub struct Fake {
    pub store: Arc<Mutex<Store>>,
    pub changed: Arc<Notify>,
    pub behaviour: Arc<Mutex<controllers::Behaviour>>,
    pub addr: SocketAddr,
}

impl Fake {
    /// Starts the server and its mock controllers on a free loopback port.
    pub async fn start() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let fake = Fake {
            store: Arc::new(Mutex::new(Store::new())),
            changed: Arc::new(Notify::new()),
            behaviour: Arc::new(Mutex::new(controllers::Behaviour::default())),
            addr: listener.local_addr().expect("addr"),
        };
        let f = fake.clone();
        let app = axum::Router::new().fallback(move |method, uri, headers, body| {
            http::handle(f.clone(), method, uri, headers, body)
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                {
                    let b = f.behaviour.lock().expect("behaviour");
                    let mut s = f.store.lock().expect("store");
                    controllers::tick(&mut s, &b);
                }
                f.changed.notify_waiters();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client talking to the fake (as the test: token `fake`).
    pub fn client(&self) -> kube::Client {
        self.client_as("fake")
    }

    /// A kube client with the operator's token, so its requests can be told from the test's.
    pub fn operator_client(&self) -> kube::Client {
        self.client_as(OPERATOR)
    }

    fn client_as(&self, token: &str) -> kube::Client {
        let mut cfg = kube::Config::new(self.url().parse().expect("url"));
        cfg.default_namespace = "default".into();
        cfg.auth_info.token = Some(token.to_string().into());
        kube::Client::try_from(cfg).expect("client")
    }

    /// Writes a kubeconfig for kubectl (token `fake`).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        self.kubeconfig_as(dir, "fake")
    }

    /// Writes a kubeconfig with `token` as the user's bearer token.
    pub fn kubeconfig_as(&self, dir: &Path, token: &str) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{token}"));
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(&path, yaml).expect("kubeconfig");
        path
    }

    /// An object, if present.
    pub fn get(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let s = self.store.lock().expect("store");
        let t = s.find(group, plural)?.clone();
        s.get(&t, ns, name).cloned()
    }

    /// Objects of a type in a namespace.
    pub fn list(&self, group: &str, plural: &str, ns: &str) -> Vec<Value> {
        let s = self.store.lock().expect("store");
        match s.find(group, plural).cloned() {
            Some(t) => s.list(&t, ns),
            None => vec![],
        }
    }

    /// Requests the operator made so far.
    pub fn operator_requests(&self) -> Vec<store::Request> {
        self.store
            .lock()
            .expect("store")
            .requests
            .iter()
            .filter(|r| r.user == OPERATOR)
            .cloned()
            .collect()
    }

    /// Writes received so far.
    pub fn writes(&self) -> Vec<store::Write> {
        self.store.lock().expect("store").writes.clone()
    }

    /// Creates an object directly (test setup).
    pub fn create(&self, group: &str, plural: &str, ns: &str, obj: Value) -> Value {
        let mut s = self.store.lock().expect("store");
        let t = s.find(group, plural).cloned().expect("type");
        let o = s.create(&t, ns, obj).expect("create");
        drop(s);
        self.changed.notify_waiters();
        o
    }

    /// Polls `check` until it returns Some, or panics after `secs` with `what`.
    pub async fn wait_for<T>(
        &self,
        secs: u64,
        what: &str,
        mut check: impl FnMut(&Fake) -> Option<T>,
    ) -> T {
        // Generous under load (CI shares two cores with other test binaries); quick when it works.
        let secs = secs.max(60);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = check(self) {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("timed out after {secs}s waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
