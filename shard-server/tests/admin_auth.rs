//! `ShardAdmin` needs credentials, against the built binary: with `ADMIN_TOKEN` set, every
//! call without it (or with another token) is UNAUTHENTICATED and changes nothing; the
//! federation runner presents it; the admin port binds loopback by default and refuses to
//! listen elsewhere without a token.

mod common;

use common::{Shard, delta, pattern, register, run_to_exit, sync_request};
use omega_protocol::pb;
use omega_protocol::pb::shard_admin_client::ShardAdminClient;
use std::time::Duration;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;

const TOKEN: &str = "admin-token-0123456789abcdef";

async fn admin(shard: &Shard) -> ShardAdminClient<Channel> {
    ShardAdminClient::new(common::channel(&format!("http://127.0.0.1:{}", shard.admin)).await)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd)
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("hdr"));
    }
    req
}

fn publish(round: &str, version: u64) -> pb::PublishGlobalRequest {
    pb::PublishGlobalRequest {
        round_id: round.into(),
        global_version: version,
        model_id: omega_protocol::DEFAULT_MODEL_ID.into(),
        patterns: vec![],
        trends: vec![pb::TrendSignal {
            target: Some(pb::trend_signal::Target::ContentId("injected".into())),
            score: 1e9,
            region: String::new(),
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_without_the_token_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let shard = Shard::start(dir.path(), None, &[("ADMIN_TOKEN", TOKEN)]);
    let mut c = shard.client().await;
    let t = register(&mut c, "tv-1").await;
    c.sync(sync_request("tv-1", Some(&t), delta(1, vec![pattern(1, 0.9)]))).await.expect("sync");
    let mut a = admin(&shard).await;

    for (name, token) in [("no token", None), ("wrong token", Some("admin-token-0123456789abcdeX"))]
    {
        let export = pb::ExportPatternsRequest { min_quality: 0.0, ..Default::default() };
        let err = a.export_patterns(with_token(export, token)).await.expect_err(name);
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        let err = a.publish_global(with_token(publish("evil", u64::MAX), token)).await;
        assert_eq!(err.expect_err(name).code(), Code::Unauthenticated, "{name}");
        let err = a.stats(with_token(pb::StatsRequest {}, token)).await.expect_err(name);
        assert_eq!(err.code(), Code::Unauthenticated, "{name}");
    }
    // Nothing was published: devices see no trend and version 0.
    let g = c
        .sync(sync_request("tv-1", Some(&t), delta(2, vec![])))
        .await
        .expect("sync")
        .into_inner()
        .global
        .expect("global");
    assert_eq!((g.global_version, g.trending.len()), (0, 0));

    // With the token, the same calls work.
    let stats = a.stats(with_token(pb::StatsRequest {}, Some(TOKEN))).await.expect("stats");
    assert_eq!(stats.into_inner().devices_total, 1);
    let export = pb::ExportPatternsRequest { min_quality: 0.0, ..Default::default() };
    let mut stream =
        a.export_patterns(with_token(export, Some(TOKEN))).await.expect("export").into_inner();
    let batch = stream.message().await.expect("batch").expect("one batch");
    assert_eq!(batch.patterns.len(), 1);

    // The federation runner presents ADMIN_TOKEN (and fails cleanly without it).
    let url = format!("http://127.0.0.1:{}", shard.admin);
    let mut args = omega_shard::federation::FederateArgs::new("r-auth", vec![url]);
    args.timeout_secs = 5;
    args.attempts = 1;
    args.min_sources = 1;
    let metrics = omega_shard::federation::FederationMetrics::default();
    let failed = omega_shard::federation::run(&args, &metrics).await;
    assert_eq!(failed.outcome, omega_protocol::admin::RoundOutcome::Failed, "{failed:?}");
    args.admin_token = Some(TOKEN.into());
    let done = omega_shard::federation::run(&args, &metrics).await;
    assert_eq!(done.outcome, omega_protocol::admin::RoundOutcome::Succeeded, "{done:?}");
    assert_eq!(done.shards_completed, 1);

    // Even with the token, a version past what both stores keep is refused, and an
    // accepted publish never wraps the version.
    let err = a.publish_global(with_token(publish("big", u64::MAX), Some(TOKEN))).await;
    assert_eq!(err.expect_err("u64::MAX").code(), Code::InvalidArgument);
    let top = i64::MAX as u64;
    let ok = a.publish_global(with_token(publish("top", top), Some(TOKEN))).await.expect("top");
    assert_eq!(ok.into_inner().global_version, top);
    let err = a.publish_global(with_token(publish("past-top", 0), Some(TOKEN))).await;
    assert_eq!(err.expect_err("past the top").code(), Code::FailedPrecondition);
}

#[test]
fn the_admin_port_needs_a_token_to_listen_beyond_loopback() {
    let timeout = Duration::from_secs(30);
    let (status, stderr) = run_to_exit(&["serve"], &[("ADMIN_GRPC_ADDR", "0.0.0.0:0")], timeout);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ADMIN_TOKEN") && stderr.contains("loopback"), "{stderr}");
    let (status, stderr) = run_to_exit(
        &["serve"],
        &[("ADMIN_GRPC_ADDR", "0.0.0.0:0"), ("ADMIN_TOKEN", "short")],
        timeout,
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ADMIN_TOKEN: must be at least 16 bytes"), "{stderr}");
}
