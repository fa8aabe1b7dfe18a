//! Starting a throwaway `omega-shard` for a one-command load run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `omega-shard serve`, killed on drop.
#[derive(Debug)]
pub struct SpawnedShard {
    child: Child,
    /// `http://127.0.0.1:PORT` of `Constellation`.
    pub grpc_url: String,
    /// `127.0.0.1:PORT` of the REST API.
    pub rest_addr: String,
    _data: tempfile::TempDir,
}

impl SpawnedShard {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedShard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound and released; good enough for tests and tools).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `N` distinct free loopback ports: all bound at once, so the OS cannot hand one out twice.
pub fn free_ports<const N: usize>() -> std::io::Result<[u16; N]> {
    let held =
        (0..N).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&held) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

/// `omega-shard` next to the running executable (`target/<profile>/`), if present.
pub fn sibling_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("omega-shard"), dir.join("../omega-shard")].into_iter().find(|p| p.is_file())
}

/// Starts `bin serve` on free loopback ports with a fresh data directory, the given
/// database (or the embedded store), no effective rate limits (per device and per client
/// address for registrations), and waits until it answers. A port that another process takes
/// between choosing and binding makes the server exit at once: it is then started again on
/// new ports (three attempts).
pub fn spawn(bin: &Path, database_url: Option<&str>) -> std::io::Result<SpawnedShard> {
    let mut last = None;
    for _ in 0..3 {
        match spawn_once(bin, database_url)? {
            Ok(shard) => return Ok(shard),
            Err(status) => last = Some(status),
        }
    }
    Err(std::io::Error::other(format!(
        "omega-shard exited at start three times (last: {})",
        last.map_or_else(String::new, |s| s.to_string())
    )))
}

fn spawn_once(
    bin: &Path,
    database_url: Option<&str>,
) -> std::io::Result<Result<SpawnedShard, std::process::ExitStatus>> {
    let data = tempfile::tempdir()?;
    let [g, a, r, m] = free_ports()?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .env("GRPC_ADDR", format!("127.0.0.1:{g}"))
        .env("ADMIN_GRPC_ADDR", format!("127.0.0.1:{a}"))
        .env("REST_ADDR", format!("127.0.0.1:{r}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{m}"))
        .env("DATA_DIR", data.path())
        .env("RATE_LIMIT_PER_MINUTE", "1000000")
        .env("RATE_LIMIT_BURST", "1000000")
        .env("REGISTER_RATE_PER_MINUTE", "1000000")
        .env("REGISTER_RATE_BURST", "1000000")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd.env_remove("DATABASE_URL").env_remove("POSTGRES_URL");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url).env("OMEGA_DEVICE_SECRET", "omega-load-secret-0123456789");
    }
    let child = cmd.spawn()?;
    let mut shard = SpawnedShard {
        child,
        grpc_url: format!("http://127.0.0.1:{g}"),
        rest_addr: format!("127.0.0.1:{r}"),
        _data: data,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if http_get(&shard.rest_addr, "/ready").is_ok_and(|(code, _)| code == 200) {
            return Ok(Ok(shard));
        }
        if let Some(status) = shard.child.try_wait()? {
            return Ok(Err(status));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "omega-shard did not become ready in 60 s",
    ))
}

/// A minimal HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}
