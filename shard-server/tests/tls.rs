//! TLS on the device port against the built binary: a client trusting the shard's CA
//! registers and syncs; plaintext and untrusting clients get nothing through; a new
//! certificate written over the files is served to new connections without a restart.

mod common;

use common::{Shard, delta, pattern, register_request, sync_request};
use omega_protocol::pb::constellation_client::ConstellationClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A private CA and a certificate it signed for 127.0.0.1: (CA PEM, cert PEM, key PEM).
fn private_ca(name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A fresh connection to `port` trusting `ca` only.
async fn tls_client(
    port: u16,
    ca: &str,
) -> Result<ConstellationClient<Channel>, tonic::transport::Error> {
    let tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("url")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(ConstellationClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_port_speaks_tls_and_takes_a_new_certificate_without_restarting() {
    let dir = tempfile::tempdir().expect("tmp");
    let (ca1, cert1, key1) = private_ca("Omega test CA 1");
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    write(&cert_path, &cert1);
    write(&key_path, &key1);
    let env = [
        ("TLS_CERT_FILE", cert_path.to_str().expect("utf8")),
        ("TLS_KEY_FILE", key_path.to_str().expect("utf8")),
        ("RELOAD_INTERVAL_SECS", "1"),
    ];
    let shard = Shard::start(&dir.path().join("data"), None, &env);

    let mut c = tls_client(shard.grpc, &ca1).await.expect("TLS connect");
    let token = c.register(register_request("tv-tls", None)).await.expect("register").into_inner();
    let r =
        c.sync(sync_request("tv-tls", Some(&token.device_token), delta(1, vec![pattern(1, 0.9)])));
    assert_eq!(r.await.expect("sync over TLS").into_inner().acknowledged_version, 1);

    // Plaintext HTTP/2 to the TLS port gets nothing through.
    let plain =
        Endpoint::from_shared(shard.url()).expect("url").connect_timeout(Duration::from_secs(5));
    let plain = match plain.connect().await {
        Ok(ch) => {
            ConstellationClient::new(ch).register(register_request("tv-plain", None)).await.is_ok()
        }
        Err(_) => false,
    };
    assert!(!plain, "a plaintext client must not be served");
    // A client trusting another CA refuses the handshake.
    let (ca2, cert2, key2) = private_ca("Omega test CA 2");
    assert!(tls_client(shard.grpc, &ca2).await.is_err(), "untrusted certificate accepted");

    // The operator replaces the certificate (CA 2): new connections get it within a reload.
    write(&key_path, &key2);
    write(&cert_path, &cert2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c2 = loop {
        match tls_client(shard.grpc, &ca2).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "new certificate not served in 20 s: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let r =
        c2.sync(sync_request("tv-tls", Some(&token.device_token), delta(2, vec![pattern(2, 0.9)])));
    assert_eq!(
        r.await.expect("sync with the new certificate").into_inner().acknowledged_version,
        2
    );
    assert!(tls_client(shard.grpc, &ca1).await.is_err(), "the old certificate is still served");
    assert_eq!(shard.stats()["devices_total"], 1, "the plaintext attempt stored nothing");
}

#[test]
fn unusable_tls_files_stop_the_start_with_the_variable_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_, cert, _) = private_ca("a");
    let (_, _, other_key) = private_ca("b");
    let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&c, cert).expect("write");
    std::fs::write(&k, other_key).expect("write");
    let (c, k) = (c.to_str().expect("utf8"), k.to_str().expect("utf8"));
    let missing = dir.path().join("none.pem");
    let missing = missing.to_str().expect("utf8");
    for (env, want) in [
        (vec![("TLS_CERT_FILE", c), ("TLS_KEY_FILE", k)], "TLS_KEY_FILE"),
        (vec![("TLS_CERT_FILE", missing), ("TLS_KEY_FILE", k)], "TLS_CERT_FILE"),
        (vec![("TLS_CERT_FILE", c)], "tls-key-file"),
    ] {
        let mut env = env;
        env.push(("OMEGA_DEVICE_SECRET", common::SECRET));
        let (status, stderr) = common::run_to_exit(&["serve"], &env, Duration::from_secs(30));
        assert!(!status.success(), "{env:?}");
        assert!(stderr.contains(want), "{env:?}: {stderr}");
    }
}
