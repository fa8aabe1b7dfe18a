//! The SQLite file: what survives a reopen, and files that must never be wiped.

use crate::brain::{evening, global};
use crate::common::{catalogue, embedder, event, items};
use omega_device::{Brain, BrainConfig, DeviceError};
use std::path::Path;

fn cfg(path: &Path) -> BrainConfig {
    BrainConfig { db_path: Some(path.to_path_buf()), ..Default::default() }
}

fn open(path: &Path) -> omega_device::Result<Brain> {
    Brain::open_shared(cfg(path), embedder(), Some(catalogue()))
}

#[test]
fn patterns_versions_outbox_and_globals_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("brain.sqlite");
    let mut b = open(&path).expect("open");
    let device = b.device_id().to_owned();
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    let d1 = b.prepare_delta().expect("delta").expect("some");
    b.acknowledge(d1.local_version).expect("ack");
    b.observe(&event("casino", 0.9, 10)).expect("observe");
    b.observe(&event("heat", 0.7, 20)).expect("observe");
    let d2 = b.prepare_delta().expect("delta").expect("some");
    b.apply_global(global(9)).expect("global");
    let recs = b.recommend(&evening(), 5).expect("recommend");
    b.close().expect("close");

    let mut b = open(&path).expect("reopen");
    assert_eq!(b.device_id(), device);
    let s = b.stats();
    assert_eq!((s.patterns, s.watched, s.local_version, s.acked_version), (2, 2, 2, 1));
    assert_eq!((s.global_patterns, s.trends, s.global_version), (1, 1, 9));
    assert_eq!(
        b.prepare_delta().expect("outbox").expect("in flight"),
        d2,
        "the retry after a reboot is identical"
    );
    assert_eq!(b.recommend(&evening(), 5).expect("recommend"), recs);
    b.acknowledge(2).expect("ack");
    drop(b); // no close: a crash after the commit

    let b = open(&path).expect("reopen after crash");
    let s = b.stats();
    assert_eq!((s.acked_version, s.delta_in_flight), (2, false));
    // The device id is bound to the file.
    drop(b);
    let other = Brain::open_shared(
        BrainConfig { device_id: Some("someone-else".into()), ..cfg(&path) },
        embedder(),
        None,
    );
    assert!(matches!(other, Err(DeviceError::State(_))));
}

#[test]
fn a_corrupt_file_is_an_error_and_is_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("brain.sqlite");
    let junk: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &junk).expect("write");
    let err = open(&path).expect_err("corrupt file");
    assert!(matches!(err, DeviceError::Database { .. }), "{err}");
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), junk, "not wiped");

    // A real database whose pages were damaged after it was written.
    let path = dir.path().join("damaged.sqlite");
    let mut b = open(&path).expect("open");
    for (i, it) in items().iter().enumerate() {
        b.observe(&event(&it.content_id, 0.9, i as i64)).expect("observe");
    }
    b.close().expect("close");
    let mut bytes = std::fs::read(&path).expect("read");
    let len = bytes.len();
    for b in &mut bytes[4096..len.min(4096 * 3)] {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).expect("write");
    let err = open(&path).expect_err("damaged file");
    assert!(matches!(err, DeviceError::Database { .. }), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), bytes, "not wiped");
}

#[test]
fn a_newer_schema_or_another_model_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("brain.sqlite");
    let mut b = open(&path).expect("open");
    b.observe(&event("heat", 0.9, 0)).expect("observe");
    b.close().expect("close");
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.pragma_update(None, "user_version", 99).expect("bump");
    }
    let before = std::fs::read(&path).expect("read");
    match open(&path) {
        Err(DeviceError::SchemaTooNew { found: 99, supported: 1, .. }) => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).expect("read"), before);
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.pragma_update(None, "user_version", 1).expect("restore");
        conn.execute("UPDATE meta SET value = 'old-model' WHERE key = 'model_id'", [])
            .expect("model");
    }
    assert!(matches!(open(&path), Err(DeviceError::ModelMismatch { .. })));
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'model_id'",
            [omega_protocol::DEFAULT_MODEL_ID],
        )
        .expect("model");
    }
    assert_eq!(open(&path).expect("intact").stats().patterns, 1, "patterns intact throughout");
    // A foreign SQLite database is not adopted either.
    let foreign = dir.path().join("foreign.sqlite");
    rusqlite::Connection::open(&foreign)
        .expect("sqlite")
        .execute_batch("CREATE TABLE x (y);")
        .expect("create");
    assert!(matches!(open(&foreign), Err(DeviceError::Database { .. })));
}

#[test]
fn brain_open_loads_its_own_model_and_caches_catalogue_embeddings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cat = dir.path().join("catalogue.json");
    std::fs::write(&cat, serde_json::to_vec(&items()).expect("json")).expect("write");
    let config = BrainConfig {
        db_path: Some(dir.path().join("b.sqlite")),
        catalogue_path: Some(cat.clone()),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut b = Brain::open(config.clone()).expect("open");
    let first = started.elapsed();
    assert_eq!(b.stats().catalogue_items, items().len());
    b.observe(&event("heat", 1.0, 0)).expect("observe");
    assert!(!b.recommend(&evening(), 3).expect("recommend").is_empty());
    b.close().expect("close");
    let started = std::time::Instant::now();
    let b = Brain::open(config.clone()).expect("reopen");
    assert!(started.elapsed() < first + std::time::Duration::from_secs(1));
    assert_eq!(b.stats().patterns, 1);
    drop(b);
    std::fs::write(&cat, b"[{\"content_id\": 1}]").expect("write");
    assert!(matches!(Brain::open(config.clone()), Err(DeviceError::Json(_))));
    let missing = BrainConfig { catalogue_path: Some(dir.path().join("none.json")), ..config };
    assert!(matches!(Brain::open(missing), Err(DeviceError::Asset { .. })));
}
