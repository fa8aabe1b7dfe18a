//! The device token lifecycle against the built binary: a key rotation run as
//! docs/operations.md's runbook says (old key → both keys → new key only) while devices keep
//! syncing without registering again; revocation; enrolment secrets.

mod common;

use common::{Shard, delta, pattern, register_request, sync_request};
use omega_protocol::pb::constellation_client::ConstellationClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

const OLD: &str = "2026a:old-token-key-0123456789abcdef";
const NEW: &str = "2026b:new-token-key-0123456789abcdef";

/// A device as the device library behaves: it keeps the newest token it was given.
struct Device {
    id: String,
    token: String,
    version: u64,
}

impl Device {
    /// One sync pushing one pattern; takes a renewed token. Returns whether it was renewed.
    async fn sync(&mut self, c: &mut ConstellationClient<Channel>) -> Result<bool, tonic::Status> {
        self.version += 1;
        let seed = self.version * 1000 + self.id.len() as u64;
        let req = sync_request(
            &self.id,
            Some(&self.token),
            delta(self.version, vec![pattern(seed, 0.9)]),
        );
        let resp = c.sync(req).await?.into_inner();
        assert_eq!(resp.acknowledged_version, self.version, "{}", self.id);
        if resp.renewed_token.is_empty() {
            return Ok(false);
        }
        self.token = resp.renewed_token;
        Ok(true)
    }
}

fn write(path: &Path, text: &str) {
    // Written aside and renamed, as a Secret volume update swaps files whole.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Syncs every device until each has a token of key `kid` (the reload takes up to
/// `RELOAD_INTERVAL_SECS`); every sync on the way must succeed.
async fn sync_until_all_on(
    devices: &mut [Device],
    c: &mut ConstellationClient<Channel>,
    kid: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for d in devices.iter_mut() {
            d.sync(c).await.expect("devices keep syncing during the rotation");
        }
        if devices.iter().all(|d| d.token.starts_with(&format!("{kid}."))) {
            return;
        }
        assert!(Instant::now() < deadline, "devices were not moved to key {kid} in 20 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_keeps_every_device_syncing_without_registering_again() {
    let dir = tempfile::tempdir().expect("tmp");
    let keys = dir.path().join("token-keys");
    write(&keys, &format!("# current first\n{OLD}\n"));
    let keys_s = keys.to_str().expect("utf8");
    let env = [
        ("TOKEN_KEYS_FILE", keys_s),
        ("RELOAD_INTERVAL_SECS", "1"),
        ("RATE_LIMIT_BURST", "1000"),
        ("DRAIN_DELAY_SECS", "0"),
    ];
    let data = dir.path().join("data");
    let mut shard = Shard::start(&data, None, &env);
    let mut c = shard.client().await;

    // Step 0: devices registered under the old key.
    let mut devices = Vec::new();
    for i in 0..5 {
        let id = format!("tv-rot-{i}");
        let token = c.register(register_request(&id, None)).await.expect("register").into_inner();
        assert!(token.device_token.starts_with("2026a."), "{}", token.device_token);
        devices.push(Device { id, token: token.device_token, version: 0 });
    }
    for d in &mut devices {
        assert!(!d.sync(&mut c).await.expect("sync"), "a fresh token is not renewed");
    }
    // A device that will sleep through the whole rotation.
    let sleeper_id = "tv-rot-asleep";
    let sleeper =
        c.register(register_request(sleeper_id, None)).await.expect("register").into_inner();

    // Step 1: the new key first, the old one still accepted. Every device is renewed at its
    // next sync, the old tokens keep working meanwhile.
    write(&keys, &format!("{NEW}\n{OLD}\n"));
    sync_until_all_on(&mut devices, &mut c, "2026b").await;
    let fresh = c.register(register_request("tv-rot-new", None)).await.expect("register");
    assert!(fresh.into_inner().device_token.starts_with("2026b."));

    // Step 2: the old key retired. Renewed devices go on; the sleeper's old token is refused
    // (it re-enrols as the runbook says), as is a renewed token replayed with the old key.
    write(&keys, &format!("{NEW}\n"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req =
            sync_request(sleeper_id, Some(&sleeper.device_token), delta(1, vec![pattern(7, 0.9)]));
        match c.sync(req).await {
            Err(s) if s.code() == Code::Unauthenticated => {
                assert!(s.message().contains("retired key"), "{}", s.message());
                break;
            }
            other => {
                assert!(other.is_ok(), "{other:?}");
                assert!(Instant::now() < deadline, "the old key was never retired");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    for d in &mut devices {
        assert!(!d.sync(&mut c).await.expect("sync with the new key only"));
    }

    // A restart with the key ring given inline keeps accepting the same tokens.
    drop(c);
    shard.signal("-TERM");
    shard.wait_exit(Duration::from_secs(30)).await;
    let inline = NEW.to_string();
    shard.spawn(&[("TOKEN_KEYS", inline.as_str()), ("RATE_LIMIT_BURST", "1000")]);
    let mut c = shard.client().await;
    for d in &mut devices {
        assert!(!d.sync(&mut c).await.expect("sync after the restart"));
    }
    let stats = shard.stats();
    assert_eq!(stats["devices_total"], 7, "nobody registered again: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_refused_within_a_reload_and_cannot_re_register() {
    let dir = tempfile::tempdir().expect("tmp");
    let list = dir.path().join("revoked");
    write(&list, "# none yet\n");
    let env =
        [("REVOKED_DEVICES_FILE", list.to_str().expect("utf8")), ("RELOAD_INTERVAL_SECS", "1")];
    let shard = Shard::start(&dir.path().join("data"), None, &env);
    let mut c = shard.client().await;
    let t = c.register(register_request("tv-stolen", None)).await.expect("register");
    let mut stolen =
        Device { id: "tv-stolen".into(), token: t.into_inner().device_token, version: 0 };
    let t = c.register(register_request("tv-honest", None)).await.expect("register");
    let mut honest =
        Device { id: "tv-honest".into(), token: t.into_inner().device_token, version: 0 };
    stolen.sync(&mut c).await.expect("sync before revocation");

    write(&list, "tv-stolen\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match stolen.sync(&mut c).await {
            Err(s) => break s,
            Ok(_) => {
                assert!(Instant::now() < deadline, "revocation not applied in 20 s");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("revoked"), "{}", refused.message());
    let again = c.register(register_request("tv-stolen", Some(&stolen.token))).await;
    assert_eq!(again.expect_err("revoked").code(), Code::Unauthenticated);
    honest.sync(&mut c).await.expect("other devices are not affected");

    // Taken off the list, the device syncs again with the token it holds.
    write(&list, "\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while stolen.sync(&mut c).await.is_err() {
        assert!(Instant::now() < deadline, "un-revocation not applied in 20 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_enrolment_secrets_a_new_device_needs_one_and_nothing_is_stored_without() {
    let dir = tempfile::tempdir().expect("tmp");
    let env = [("ENROLLMENT_SECRETS", "vendor-a-secret-0123456789,vendor-b-secret-0123456789")];
    let shard = Shard::start(dir.path(), None, &env);
    let mut c = shard.client().await;
    let with = |secret: &str| {
        let mut r = register_request("tv-enrol", None);
        r.get_mut().enrollment_secret = secret.into();
        r
    };
    for bad in ["", "vendor-a-secret-012345678", "guess"] {
        let err = c.register(with(bad)).await.expect_err("refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{bad:?}: {err:?}");
    }
    assert_eq!(shard.stats()["devices_total"], 0, "nothing stored");
    let reg = c.register(with("vendor-b-secret-0123456789")).await.expect("enrolled").into_inner();
    // Re-registering with its own token needs no secret.
    let again = c.register(register_request("tv-enrol", Some(&reg.device_token))).await;
    assert!(again.is_ok(), "{again:?}");
    let r =
        c.sync(sync_request("tv-enrol", Some(&reg.device_token), delta(1, vec![pattern(1, 0.9)])));
    assert!(r.await.is_ok());
    assert_eq!(shard.stats()["devices_total"], 1);
}
