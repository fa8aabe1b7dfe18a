//! Helpers shared by the integration tests: Postgres databases, a running `omega-shard`
//! binary, gRPC clients and pattern builders.
#![allow(dead_code, missing_docs)]

use omega_protocol::pb;
use omega_protocol::pb::constellation_client::ConstellationClient;
use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize, quantize};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;
use uuid::Uuid;

pub const SECRET: &str = "integration-test-secret-0123456789";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Runs `scripts/pg.sh ARGS…`, returning stdout.
pub fn pg_sh(args: &[&str]) -> String {
    let out = Command::new(repo_root().join("scripts/pg.sh"))
        .args(args)
        .output()
        .expect("run scripts/pg.sh");
    assert!(
        out.status.success(),
        "scripts/pg.sh {args:?} failed (Postgres tests need it, or OMEGA_TEST_DATABASE_URL):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The test Postgres: `OMEGA_TEST_DATABASE_URL` (scripts/test.sh sets it), else one started
/// here with scripts/pg.sh (never a silent skip).
pub fn pg_base_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("OMEGA_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            // Test runners that use one process per test (nextest) start it concurrently:
            // serialise with flock when it is there. `-o`: the Postgres daemon pg.sh starts
            // must not inherit the lock, or it would hold it for as long as it runs.
            let dir = "/tmp/omega-pg-shard-tests";
            let script = repo_root().join("scripts/pg.sh");
            let locked = Command::new("flock")
                .arg("-o")
                .arg(format!("{dir}.lock"))
                .arg(&script)
                .args(["start", dir])
                .output();
            match locked {
                Ok(out) if out.status.success() => {
                    String::from_utf8_lossy(&out.stdout).trim().to_owned()
                }
                _ => pg_sh(&["start", dir]),
            }
        }
    })
    .clone()
}

pub fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

/// A new empty database on the test Postgres.
pub async fn fresh_db() -> String {
    use sqlx::Connection;
    let base = pg_base_url();
    let name = format!("omega_t_{}", Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect to test Postgres");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    with_db(&base, &name)
}

/// Waits (up to 30 s) until the merge has emptied the Postgres intake: every acknowledged
/// sync is then in `patterns`.
pub async fn wait_for_merge(url: &str) {
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pattern_intake)")
            .fetch_one(&mut db)
            .await
            .expect("intake");
        if !left {
            return;
        }
        assert!(Instant::now() < deadline, "the intake never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to 20 s) until some session of `conn`'s database waits on a lock: the moment a
/// test that holds a row lock knows the operation it started is blocked behind it. Panics
/// with `what` otherwise.
pub async fn wait_for_lock_waiter(conn: &mut sqlx::PgConnection, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut *conn)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn unit_near(axis: usize, jitter: u64) -> Vec<f32> {
    let mut v = vec![0.0f32; EMBEDDING_DIM];
    v[axis % EMBEDDING_DIM] = 1.0;
    let mut x = jitter.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *c += ((x % 1000) as f32 / 1000.0 - 0.5) * 0.02;
    }
    l2_normalize(&mut v);
    v
}

pub fn random_unit(seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    let mut v: Vec<f32> = (0..EMBEDDING_DIM)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    l2_normalize(&mut v);
    v
}

pub fn embedding(v: &[f32]) -> pb::Embedding {
    let q = quantize(v);
    pb::Embedding { values: q.to_bytes(), scale: q.scale }
}

/// The context test patterns carry: evening, weekday, a drama.
pub fn evening_drama() -> pb::PatternContext {
    pb::PatternContext { time_slot: 3, day_type: 1, content_type: 1, genres: vec!["drama".into()] }
}

pub fn pattern_with(id: Uuid, v: &[f32], rate: f32) -> pb::Pattern {
    pb::Pattern {
        id: id.as_bytes().to_vec(),
        content_id: format!("content-{}", &id.simple().to_string()[..8]),
        embedding: Some(embedding(v)),
        success_rate: rate,
        sample_count: 1,
        context: Some(evening_drama()),
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
    }
}

pub fn pattern(seed: u64, rate: f32) -> pb::Pattern {
    pattern_with(Uuid::now_v7(), &random_unit(seed), rate)
}

pub fn delta(version: u64, added: Vec<pb::Pattern>) -> pb::PatternDelta {
    pb::PatternDelta {
        added,
        local_version: version,
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        ..Default::default()
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `N` distinct free loopback ports: all bound at once, so the OS cannot hand one out twice
/// (one at a time, it may: a shard's listeners then collide with each other).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> =
        (0..N).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    std::array::from_fn(|i| held[i].local_addr().expect("addr").port())
}

/// A running `omega-shard serve`.
pub struct Shard {
    pub child: Option<Child>,
    pub grpc: u16,
    pub admin: u16,
    pub rest: u16,
    pub metrics: u16,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Where its stderr (the logs) goes; the test's own stderr when `None`.
    pub log: Option<PathBuf>,
}

impl Shard {
    /// Starts the binary with fresh ports; `data_dir` is kept across restarts.
    pub fn start(data_dir: &Path, database_url: Option<&str>, env: &[(&str, &str)]) -> Shard {
        Shard::launch(data_dir, database_url, None, env)
    }

    /// [`Shard::start`] (embedded store) with its logs appended to the file `log`.
    pub fn start_logging_to(data_dir: &Path, log: &Path, env: &[(&str, &str)]) -> Shard {
        Shard::launch(data_dir, None, Some(log), env)
    }

    fn launch(
        data_dir: &Path,
        database_url: Option<&str>,
        log: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Shard {
        let [grpc, admin, rest, metrics] = free_ports();
        let mut s = Shard {
            child: None,
            grpc,
            admin,
            rest,
            metrics,
            data_dir: data_dir.to_path_buf(),
            database_url: database_url.map(str::to_owned),
            log: log.map(Path::to_path_buf),
        };
        s.spawn(env);
        s
    }

    /// Starts the binary and waits until it is ready. A port taken by another test process
    /// between choosing it and binding it makes the server exit at once: then new ports are
    /// chosen and it is started again (the ports may change across a restart).
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        for _ in 0..3 {
            self.spawn_once(env);
            match self.wait_ready(Duration::from_secs(60)) {
                Ok(()) => return,
                Err(status) => {
                    eprintln!("omega-shard exited at start ({status}); retrying on new ports");
                    [self.grpc, self.admin, self.rest, self.metrics] = free_ports();
                }
            }
        }
        panic!("omega-shard did not start in three attempts");
    }

    fn spawn_once(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_omega-shard"));
        cmd.arg("serve")
            .env("GRPC_ADDR", format!("127.0.0.1:{}", self.grpc))
            .env("ADMIN_GRPC_ADDR", format!("127.0.0.1:{}", self.admin))
            .env("REST_ADDR", format!("127.0.0.1:{}", self.rest))
            .env("METRICS_ADDR", format!("127.0.0.1:{}", self.metrics))
            .env("DATA_DIR", &self.data_dir)
            .env("OMEGA_DEVICE_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .env_remove("DATABASE_URL")
            .env_remove("POSTGRES_URL")
            .stdout(Stdio::null())
            .stderr(match &self.log {
                Some(path) => Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .expect("log file"),
                ),
                None => Stdio::inherit(),
            });
        if let Some(u) = &self.database_url {
            cmd.env("DATABASE_URL", u);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn omega-shard"));
    }

    /// Waits for `/ready`; `Err` with the exit status when the process ended first.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.get("/ready").is_ok_and(|(c, _)| c == 200) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().expect("wait")
            {
                self.child = None;
                return Err(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("omega-shard did not become ready within {timeout:?}");
    }

    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(&format!("127.0.0.1:{}", self.rest), path)
    }

    pub fn stats(&self) -> serde_json::Value {
        let (code, body) = self.get("/api/v1/stats").expect("stats");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("stats json")
    }

    /// Value of one metric line (`name{labels}`), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) =
            http_get(&format!("127.0.0.1:{}", self.metrics), "/metrics").expect("metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Every `constellation_{what}_requests_total` series of this shard, by status label.
    pub fn outcomes(&self, what: &str) -> std::collections::BTreeMap<String, f64> {
        let (_, body) =
            http_get(&format!("127.0.0.1:{}", self.metrics), "/metrics").expect("metrics");
        let prefix = format!("constellation_{what}_requests_total{{");
        body.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let (labels, value) = rest.split_once("} ")?;
                let status = labels.split("status=\"").nth(1)?.split('"').next()?;
                Some((status.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// Waits for the process to exit (after a signal) and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("omega-shard did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().expect("kill").success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    pub async fn client(&self) -> ConstellationClient<Channel> {
        client(&self.url()).await
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned()).expect("url").connect().await.expect("connect")
}

pub async fn client(url: &str) -> ConstellationClient<Channel> {
    ConstellationClient::new(channel(url).await)
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
}

pub async fn register(c: &mut ConstellationClient<Channel>, id: &str) -> String {
    c.register(pb::RegisterRequest {
        device_id: id.into(),
        region: "eu".into(),
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        client_version: "test".into(),
        ..Default::default()
    })
    .await
    .expect("register")
    .into_inner()
    .device_token
}

/// A `Register` for `id`, carrying `token` as its bearer token when given.
pub fn register_request(id: &str, token: Option<&str>) -> tonic::Request<pb::RegisterRequest> {
    let mut r = tonic::Request::new(pb::RegisterRequest {
        device_id: id.into(),
        region: "eu".into(),
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        client_version: "test".into(),
        ..Default::default()
    });
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("header"));
    }
    r
}

/// Runs `omega-shard ARGS` with `env` (and none of the store or secret variables of the
/// test's own environment) until it exits; returns its status and stderr. Listeners get
/// free ports, in case it starts after all.
pub fn run_to_exit(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (std::process::ExitStatus, String) {
    let data = tempfile::tempdir().expect("tmp");
    let [grpc, admin, rest, metrics] = free_ports();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omega-shard"));
    cmd.args(args)
        .env("GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("ADMIN_GRPC_ADDR", format!("127.0.0.1:{admin}"))
        .env("REST_ADDR", format!("127.0.0.1:{rest}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env("DATA_DIR", data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for var in ["DATABASE_URL", "POSTGRES_URL", "OMEGA_DEVICE_SECRET", "LOG_FORMAT", "RUST_LOG"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn omega-shard");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("omega-shard {args:?} with {env:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    (status, stderr)
}

pub fn sync_request(
    device: &str,
    token: Option<&str>,
    delta: pb::PatternDelta,
) -> tonic::Request<pb::SyncRequest> {
    let mut r = tonic::Request::new(pb::SyncRequest {
        device_id: device.into(),
        delta: Some(delta),
        known_global_version: 0,
    });
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("header"));
    }
    r
}

pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}
