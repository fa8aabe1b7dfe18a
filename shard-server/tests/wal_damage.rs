//! The embedded store's log against the built binary: a damaged frame with valid frames after
//! it stops the start with an error naming the file and offset (nothing is dropped silently);
//! `omega-shard migrate --repair` keeps a copy and only then truncates; a torn tail still
//! recovers by itself; store files are private to the server's user.

mod common;

use common::{Shard, delta, pattern, register, run_to_exit, sync_request};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn only_wal(dir: &Path) -> PathBuf {
    let mut wals: Vec<PathBuf> = std::fs::read_dir(dir.join("embedded"))
        .expect("embedded dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("wal-")))
        .collect();
    assert_eq!(wals.len(), 1, "{wals:?}");
    wals.remove(0)
}

/// A shard with one device and `n` patterns, one sync each, then stopped.
async fn filled(dir: &Path, n: u64) {
    let env = [("DRAIN_DELAY_SECS", "0"), ("RATE_LIMIT_BURST", "1000")];
    let mut shard = Shard::start(dir, None, &env);
    let mut c = shard.client().await;
    let t = register(&mut c, "tv-1").await;
    for v in 1..=n {
        c.sync(sync_request("tv-1", Some(&t), delta(v, vec![pattern(v, 0.9)])))
            .await
            .expect("sync");
    }
    shard.signal("-TERM");
    assert!(shard.wait_exit(TIMEOUT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_refuses_to_open_until_repaired_with_a_backup() {
    let dir = tempfile::tempdir().expect("tmp");
    filled(dir.path(), 40).await;
    let wal = only_wal(dir.path());
    let mode = std::fs::metadata(&wal).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", wal.display());
    let mut bytes = std::fs::read(&wal).expect("read");
    let len = bytes.len();
    let mid = len / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&wal, &bytes).expect("write");

    let data = ("DATA_DIR", dir.path().to_str().expect("utf-8"));
    let (status, stderr) = run_to_exit(&["serve"], &[data], TIMEOUT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let name = wal.file_name().expect("name").to_string_lossy().into_owned();
    assert!(
        stderr.contains(&name) && stderr.contains("damaged at byte") && stderr.contains("--repair"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&wal).expect("read").len(), len, "nothing was truncated");

    let (status, stderr) = run_to_exit(&["migrate", "--repair"], &[data], TIMEOUT);
    assert!(status.success(), "{stderr}");
    let backups: Vec<PathBuf> = std::fs::read_dir(dir.path().join("embedded"))
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(std::fs::read(&backups[0]).expect("backup"), bytes, "the backup is the damaged log");
    let kept = std::fs::read(&wal).expect("read").len();
    assert!(kept > 0 && kept <= mid, "truncated at the damage: {kept} of {len}");

    let shard = Shard::start(dir.path(), None, &[]);
    let patterns = shard.stats()["patterns"].as_u64().expect("patterns");
    assert!((1..40).contains(&patterns), "{patterns} patterns after the repair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().expect("tmp");
    filled(dir.path(), 10).await;
    let wal = only_wal(dir.path());
    let len = std::fs::read(&wal).expect("read").len();
    // Half a frame: a length, a checksum and a few bytes of body, as a crash mid-write leaves.
    let mut torn = std::fs::OpenOptions::new().append(true).open(&wal).expect("open");
    std::io::Write::write_all(&mut torn, &[200, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9]).expect("append");
    drop(torn);
    let shard = Shard::start(dir.path(), None, &[]);
    assert_eq!(shard.stats()["patterns"], 10);
    assert_eq!(std::fs::read(&wal).expect("read").len(), len, "the torn tail is cut off");
}
