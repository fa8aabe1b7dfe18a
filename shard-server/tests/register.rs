//! `Constellation.Register` against the built binary, on both stores: a device's token goes
//! only to that device, registrations are rate-limited per client address, and `MAX_DEVICES`
//! refuses new devices.

mod common;

use common::{Shard, delta, pattern, register, register_request, sync_request};
use std::collections::BTreeMap;
use tonic::Code;

fn outcomes(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

async fn another_device_cannot_obtain_a_token(shard: Shard) {
    let mut c = shard.client().await;
    let victim = register(&mut c, "tv-victim").await;
    let attacker = register(&mut c, "tv-attacker").await;
    c.sync(sync_request("tv-victim", Some(&victim), delta(1, vec![pattern(1, 0.9)])))
        .await
        .expect("victim syncs");

    let forged = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for (name, token, want) in [
        ("no token", None, "needs its token"),
        ("a forged token", Some(forged), "does not match"),
        ("another device's token", Some(attacker.as_str()), "does not match"),
    ] {
        let err = c.register(register_request("tv-victim", token)).await.expect_err(name);
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        assert!(err.message().contains(want), "{name}: {}", err.message());
        assert!(!format!("{err:?}").contains(&victim), "{name}: the answer leaks the token");
    }
    // Ids with a NUL or another control character are refused whole (a NUL fails Postgres
    // `text`), so no such device exists to fail a group commit later.
    for bad in ["tv-\u{0}", "tv\n2", "\u{7f}"] {
        let err = c.register(register_request(bad, None)).await.expect_err(bad);
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(err.message().contains("device_id holds a control character"), "{err:?}");
    }
    // Without a token the attacker cannot sync as the victim either.
    let err = c
        .sync(sync_request("tv-victim", Some(&attacker), delta(2, vec![pattern(2, 0.9)])))
        .await
        .expect_err("sync with another device's token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // The device itself, with its token (a re-install that kept it): the same token back.
    let again = c
        .register(register_request("tv-victim", Some(&victim)))
        .await
        .expect("re-register with own token")
        .into_inner();
    assert_eq!(again.device_token, victim);
    assert_eq!(again.region, "eu");
    // A new id still registers without a token.
    register(&mut c, "tv-new").await;
    // Nothing of the victim's changed: its next version applies on top of version 1.
    let r = c
        .sync(sync_request("tv-victim", Some(&victim), delta(2, vec![])))
        .await
        .expect("victim syncs again")
        .into_inner();
    assert_eq!((r.acknowledged_version, r.replayed), (2, false));
    assert_eq!(shard.stats()["devices_total"], 3);
    assert_eq!(
        shard.outcomes("register"),
        outcomes(&[("invalid_argument", 3.0), ("ok", 4.0), ("unauthenticated", 3.0)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_another_device_cannot_obtain_a_token() {
    let dir = tempfile::tempdir().expect("tmp");
    another_device_cannot_obtain_a_token(Shard::start(dir.path(), None, &[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_another_device_cannot_obtain_a_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = common::fresh_db().await;
    another_device_cannot_obtain_a_token(Shard::start(dir.path(), Some(&url), &[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_rate_limited_per_client_address() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(
        dir.path(),
        None,
        &[("REGISTER_RATE_BURST", "3"), ("REGISTER_RATE_PER_MINUTE", "1")],
    );
    let mut c = shard.client().await;
    let first = register(&mut c, "tv-0").await;
    for id in ["tv-1", "tv-2"] {
        register(&mut c, id).await;
    }
    let err = c.register(register_request("tv-3", None)).await.expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("registration rate limit"), "{}", err.message());
    // The limit is checked before anything else, so it holds for a device's own token too.
    let err = c.register(register_request("tv-0", Some(&first))).await.expect_err("limited");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Syncs are not registrations: registered devices keep syncing.
    c.sync(sync_request("tv-0", Some(&first), delta(1, vec![]))).await.expect("sync");
    assert_eq!(shard.stats()["devices_total"], 3, "the refused device was not created");
    assert_eq!(shard.outcomes("register"), outcomes(&[("ok", 3.0), ("resource_exhausted", 2.0)]));
}

async fn max_devices_refuses_a_new_device(shard: Shard) {
    let mut c = shard.client().await;
    let a = register(&mut c, "tv-a").await;
    register(&mut c, "tv-b").await;
    let err = c.register(register_request("tv-c", None)).await.expect_err("third device");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("full"), "{}", err.message());
    // Registered devices are unaffected.
    c.register(register_request("tv-a", Some(&a))).await.expect("existing device");
    c.sync(sync_request("tv-a", Some(&a), delta(1, vec![pattern(1, 0.9)]))).await.expect("sync");
    assert_eq!(shard.stats()["devices_total"], 2);
    assert_eq!(shard.outcomes("register"), outcomes(&[("ok", 3.0), ("resource_exhausted", 1.0)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_max_devices_refuses_a_third_device() {
    let dir = tempfile::tempdir().expect("tmp");
    max_devices_refuses_a_new_device(Shard::start(dir.path(), None, &[("MAX_DEVICES", "2")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_max_devices_refuses_a_third_device() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = common::fresh_db().await;
    let shard = Shard::start(dir.path(), Some(&url), &[("MAX_DEVICES", "2")]);
    max_devices_refuses_a_new_device(shard).await;
}
