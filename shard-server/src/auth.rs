//! Keys derived from the shard secret (`OMEGA_DEVICE_SECRET`), the admin token, and bearer
//! parsing.
//!
//! - The export `source` uses a key *derived* from the secret, so it cannot be turned back
//!   into a device id or a token. It must stay stable for the life of the shard: rotating
//!   token keys ([`crate::tokens`]) never touches it.
//! - A legacy device token is `base64url(HMAC-SHA256(secret, device_id))`: tokens issued
//!   before key ids and expiries, still accepted (and renewed) while `ACCEPT_LEGACY_TOKENS`
//!   is on.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write;
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// Name of the generated secret under `DATA_DIR` (embedded store only).
pub const SECRET_FILE: &str = "device-secret";

/// Keys derived from the shard secret.
#[derive(Clone)]
pub struct DeviceKeys {
    token: HmacSha256,
    source: HmacSha256,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKeys(..)")
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; the error type exists only for fixed-size MACs.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    }
}

fn mac(base: &HmacSha256, data: &[u8]) -> [u8; 32] {
    let mut m = base.clone();
    m.update(data);
    m.finalize().into_bytes().into()
}

impl DeviceKeys {
    /// Keys for `secret`.
    pub fn new(secret: &[u8]) -> Self {
        let token = keyed(secret);
        let source = keyed(&mac(&token, b"omega/v1 export source key"));
        DeviceKeys { token, source }
    }

    /// The legacy bearer token of `device_id`.
    pub fn token(&self, device_id: &str) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.token, device_id.as_bytes()))
    }

    /// Checks `token` against `device_id` in constant time (padding `=` is tolerated).
    pub fn verify(&self, device_id: &str, token: &str) -> bool {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(token.trim_end_matches('=')) else {
            return false;
        };
        let mut m = self.token.clone();
        m.update(device_id.as_bytes());
        m.verify_slice(&raw).is_ok()
    }

    /// The pseudonymous export source of a device: stable within this shard, 16 bytes.
    pub fn source(&self, device_id: &str) -> Vec<u8> {
        mac(&self.source, device_id.as_bytes())[..16].to_vec()
    }
}

/// Reads `DATA_DIR/device-secret`, creating it (32 random bytes, mode 0600) on first start.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<Vec<u8>> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let raw = URL_SAFE_NO_PAD.decode(s.trim()).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not base64url: {e}", path.display()),
                )
            })?;
            if raw.len() < MIN_SECRET_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} holds fewer than {MIN_SECRET_BYTES} bytes", path.display()),
                ));
            }
            Ok(raw)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)?;
            let secret: [u8; 32] = rand::random();
            let tmp = data_dir.join(format!("{SECRET_FILE}.tmp"));
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            f.write_all(URL_SAFE_NO_PAD.encode(secret).as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename is durable only once the directory entry is.
            std::fs::File::open(data_dir)?.sync_all()?;
            Ok(secret.to_vec())
        }
        Err(e) => Err(e),
    }
}

/// The `ShardAdmin` credential (`ADMIN_TOKEN`): a bearer token shared by the shard and its
/// federation Jobs, checked in constant time.
#[derive(Clone)]
pub struct AdminToken {
    key: HmacSha256,
    expected: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// A checker accepting exactly `token`.
    pub fn new(token: &str) -> Self {
        // Both sides go through the same MAC so the comparison is of fixed-length digests,
        // in constant time, whatever the length of what a caller presents.
        let key = keyed(b"omega/v1 admin token");
        let expected = mac(&key, token.as_bytes());
        AdminToken { key, expected }
    }

    /// True when `presented` is the token.
    pub fn verify(&self, presented: &str) -> bool {
        let mut m = self.key.clone();
        m.update(presented.as_bytes());
        m.verify_slice(&self.expected).is_ok()
    }
}

/// What `ShardAdmin` admits: with a token, only requests carrying it; without one (allowed
/// only on a loopback address), every local caller.
#[derive(Debug, Clone)]
pub struct AdminGate(pub Option<AdminToken>);

impl AdminGate {
    /// The tonic interceptor: runs on the request's headers, before its body is read.
    pub fn check(&self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(token) = &self.0 else { return Ok(req) };
        let ok = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .is_some_and(|t| token.verify(t));
        if ok {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(
                "ShardAdmin needs `authorization: Bearer <ADMIN_TOKEN>`",
            ))
        }
    }
}

/// Extracts the token from an `authorization: Bearer …` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_for_their_device_and_secret() {
        let k = DeviceKeys::new(b"0123456789abcdef0123");
        let t = k.token("tv-1");
        assert!(k.verify("tv-1", &t));
        assert!(k.verify("tv-1", &format!("{t}=")));
        assert!(!k.verify("tv-2", &t));
        assert!(!k.verify("tv-1", "not base64 !"));
        assert!(!k.verify("tv-1", &t[..t.len() - 2]));
        assert!(!DeviceKeys::new(b"another secret value").verify("tv-1", &t));
    }

    #[test]
    fn token_is_base64url_of_hmac_sha256() {
        let k = DeviceKeys::new(b"key");
        let mut m = HmacSha256::new_from_slice(b"key").expect("key");
        m.update(b"dev");
        let want = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
        assert_eq!(k.token("dev"), want);
    }

    #[test]
    fn pseudonyms_are_stable_distinct_and_not_the_token() {
        let k = DeviceKeys::new(b"0123456789abcdef");
        assert_eq!(k.source("a"), k.source("a"));
        assert_ne!(k.source("a"), k.source("b"));
        assert_eq!(k.source("a").len(), 16);
        let token = URL_SAFE_NO_PAD.decode(k.token("a")).expect("b64");
        assert_ne!(&token[..16], &k.source("a")[..]);
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn admin_token_accepts_only_itself() {
        let t = AdminToken::new("0123456789abcdef-admin");
        assert!(t.verify("0123456789abcdef-admin"));
        for bad in ["", "0123456789abcdef-admi", "0123456789abcdef-admin ", "x"] {
            assert!(!t.verify(bad), "{bad:?}");
        }
        let gate = AdminGate(Some(t));
        let with = |v: &str| {
            let mut req = tonic::Request::new(());
            req.metadata_mut().insert("authorization", v.parse().unwrap());
            req
        };
        let code = |r: Result<_, tonic::Status>| r.map(|_| ()).map_err(|s| s.code());
        assert_eq!(code(gate.check(tonic::Request::new(()))), Err(tonic::Code::Unauthenticated));
        assert_eq!(code(gate.check(with("Bearer wrong"))), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            code(gate.check(with("Basic 0123456789abcdef-admin"))),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(code(gate.check(with("Bearer 0123456789abcdef-admin"))), Ok(()));
        assert_eq!(code(AdminGate(None).check(tonic::Request::new(()))), Ok(()));
    }

    #[test]
    fn generated_secret_persists() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = load_or_create_secret(dir.path()).expect("create");
        let b = load_or_create_secret(dir.path()).expect("read");
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
    }
}
