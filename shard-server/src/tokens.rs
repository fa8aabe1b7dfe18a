//! Device tokens with a key id, an expiry and a revocation list.
//!
//! A token is `<kid>.<expires>.<mac>`: `kid` names the key that signed it (1 to 32 of
//! `A-Z a-z 0-9 _ -`), `expires` is a Unix time in seconds, and `mac` is
//! `base64url(HMAC-SHA256(key, "omega/v2 device token" 0 device_id 0 expires))`. The shard
//! keeps no token table: any replica holding the key accepts the token.
//!
//! - **Rotation.** The key ring is a list of `kid:secret`; the first key signs, every key is
//!   accepted. A token signed by another key than the first is renewed at its next sync.
//! - **Renewal and inactivity.** A token lives `DEVICE_EXPIRY_DAYS`; a sync presenting one
//!   older than `TOKEN_RENEW_AFTER_DAYS` gets a fresh one in `SyncResponse.renewed_token`.
//!   A device that has not synced for `DEVICE_EXPIRY_DAYS` (less at most the renewal age)
//!   holds an expired token and is refused.
//! - **Revocation.** Device ids in the revocation list are refused whatever token they show.
//! - **Legacy tokens** (`base64url(HMAC-SHA256(OMEGA_DEVICE_SECRET, device_id))`, issued
//!   before key ids existed) are accepted while `ACCEPT_LEGACY_TOKENS` is on, and always
//!   renewed.

use crate::auth::{DeviceKeys, MIN_SECRET_BYTES};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

type HmacSha256 = Hmac<Sha256>;

/// Longest key id, in bytes.
pub const MAX_KID_BYTES: usize = 32;

/// Key id of the single key used when no key ring is configured (`OMEGA_DEVICE_SECRET`).
pub const DEFAULT_KID: &str = "0";

/// Why a key ring or revocation list could not be read, or a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// A key ring line is not `kid:secret` with a valid kid and a long enough secret.
    #[error("key ring line {line}: {msg}")]
    BadKey {
        /// 1-based line (or comma-separated entry) number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// The key ring holds no key.
    #[error("the key ring holds no key")]
    NoKey,
    /// The token is not of any accepted form.
    #[error("the device token is malformed")]
    Malformed,
    /// The token names a key this shard does not hold (retired by a rotation).
    #[error("the device token was signed by a retired key; register again")]
    UnknownKey,
    /// The signature does not match the device id.
    #[error("the device token does not match device_id")]
    BadSignature,
    /// The token is past its expiry: the device was inactive too long.
    #[error("the device token expired (the device was inactive too long)")]
    Expired,
    /// The device is on the revocation list.
    #[error("this device has been revoked")]
    Revoked,
}

#[derive(Clone)]
struct TokenKey {
    kid: String,
    mac: HmacSha256,
}

/// The keys that sign and verify tokens; the first one signs.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<TokenKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("KeyRing").field("kids", &kids).finish()
    }
}

fn valid_kid(kid: &str) -> bool {
    (1..=MAX_KID_BYTES).contains(&kid.len())
        && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn keyed(secret: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    }
}

impl KeyRing {
    /// One key, `kid`, of `secret`.
    pub fn single(kid: &str, secret: &[u8]) -> Self {
        KeyRing { keys: vec![TokenKey { kid: kid.into(), mac: keyed(secret) }] }
    }

    /// Parses `kid:secret` entries, one per line or comma-separated; blank lines and lines
    /// starting with `#` are skipped. The first entry signs.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let mut keys: Vec<TokenKey> = Vec::new();
        let entries = text.lines().flat_map(|l| l.split(',')).map(str::trim);
        for (i, entry) in entries.filter(|e| !e.is_empty() && !e.starts_with('#')).enumerate() {
            let line = i + 1;
            let bad = |msg: &str| TokenError::BadKey { line, msg: msg.into() };
            let (kid, secret) = entry.split_once(':').ok_or_else(|| bad("expected kid:secret"))?;
            let (kid, secret) = (kid.trim(), secret.trim());
            if !valid_kid(kid) {
                return Err(bad("the key id must be 1 to 32 of A-Z a-z 0-9 _ -"));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(bad(&format!("the secret must be at least {MIN_SECRET_BYTES} bytes")));
            }
            if keys.iter().any(|k| k.kid == kid) {
                return Err(bad("the key id is used twice"));
            }
            keys.push(TokenKey { kid: kid.into(), mac: keyed(secret.as_bytes()) });
        }
        if keys.is_empty() {
            return Err(TokenError::NoKey);
        }
        Ok(KeyRing { keys })
    }

    /// Key ids, the signing one first.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    fn signing(&self) -> &TokenKey {
        &self.keys[0]
    }

    fn get(&self, kid: &str) -> Option<&TokenKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

fn mac_of(key: &HmacSha256, device_id: &str, expires: u64) -> HmacSha256 {
    let mut m = key.clone();
    m.update(b"omega/v2 device token\0");
    m.update(device_id.as_bytes());
    m.update(b"\0");
    m.update(expires.to_string().as_bytes());
    m
}

/// How long tokens live and when they are renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Lifetime of a token, seconds (`DEVICE_EXPIRY_DAYS`).
    pub lifetime_secs: u64,
    /// A token older than this is renewed at its next sync, seconds.
    pub renew_after_secs: u64,
    /// Legacy tokens (no key id, no expiry) are accepted, and renewed.
    pub accept_legacy: bool,
}

/// A token that passed: whether the device should get a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Signed by another key than the current one, legacy, or older than the renewal age.
    pub renew: bool,
}

/// Issues and checks device tokens; the key ring and the revocation list can be replaced
/// while serving (files reloaded on change).
pub struct DeviceTokens {
    ring: RwLock<Arc<KeyRing>>,
    revoked: RwLock<Arc<HashSet<String>>>,
    legacy: DeviceKeys,
    policy: TokenPolicy,
}

impl std::fmt::Debug for DeviceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTokens").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl DeviceTokens {
    /// Tokens of `ring`; `legacy` checks tokens issued before key ids.
    pub fn new(ring: KeyRing, legacy: DeviceKeys, policy: TokenPolicy) -> Self {
        DeviceTokens {
            ring: RwLock::new(Arc::new(ring)),
            revoked: RwLock::new(Arc::default()),
            legacy,
            policy,
        }
    }

    fn ring(&self) -> Arc<KeyRing> {
        match self.ring.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the key ring (a rotation step).
    pub fn set_ring(&self, ring: KeyRing) {
        match self.ring.write() {
            Ok(mut r) => *r = Arc::new(ring),
            Err(p) => *p.into_inner() = Arc::new(ring),
        }
    }

    /// Replaces the revocation list.
    pub fn set_revoked(&self, ids: HashSet<String>) {
        match self.revoked.write() {
            Ok(mut r) => *r = Arc::new(ids),
            Err(p) => *p.into_inner() = Arc::new(ids),
        }
    }

    /// True when `device_id` is on the revocation list.
    pub fn is_revoked(&self, device_id: &str) -> bool {
        match self.revoked.read() {
            Ok(r) => r.contains(device_id),
            Err(p) => p.into_inner().contains(device_id),
        }
    }

    /// A fresh token for `device_id`, signed by the current key, expiring a lifetime after
    /// `now_secs`.
    pub fn issue(&self, device_id: &str, now_secs: u64) -> String {
        let ring = self.ring();
        let key = ring.signing();
        let expires = now_secs.saturating_add(self.policy.lifetime_secs);
        let mac = mac_of(&key.mac, device_id, expires).finalize().into_bytes();
        format!("{}.{expires}.{}", key.kid, URL_SAFE_NO_PAD.encode(mac))
    }

    /// Checks `token` for `device_id` at `now_secs` (signature in constant time).
    pub fn check(
        &self,
        device_id: &str,
        token: &str,
        now_secs: u64,
    ) -> Result<Accepted, TokenError> {
        if self.is_revoked(device_id) {
            return Err(TokenError::Revoked);
        }
        let Some((kid, rest)) = token.split_once('.') else {
            if self.policy.accept_legacy && self.legacy.verify(device_id, token) {
                return Ok(Accepted { renew: true });
            }
            return Err(if well_formed(token) {
                TokenError::BadSignature
            } else {
                TokenError::Malformed
            });
        };
        let (expires, mac) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        if !valid_kid(kid) || expires.is_empty() || expires.len() > 20 {
            return Err(TokenError::Malformed);
        }
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let raw = URL_SAFE_NO_PAD.decode(mac).map_err(|_| TokenError::Malformed)?;
        let ring = self.ring();
        let key = ring.get(kid).ok_or(TokenError::UnknownKey)?;
        mac_of(&key.mac, device_id, expires)
            .verify_slice(&raw)
            .map_err(|_| TokenError::BadSignature)?;
        if expires <= now_secs {
            return Err(TokenError::Expired);
        }
        let issued = expires.saturating_sub(self.policy.lifetime_secs);
        let renew = kid != ring.signing().kid
            || now_secs.saturating_sub(issued) >= self.policy.renew_after_secs;
        Ok(Accepted { renew })
    }
}

/// True when `token` has the shape of a device token (either form), checked on the headers
/// before a body is read: a legacy token is 43 base64url characters (or 44 with `=`), a
/// current one `kid.expires.mac` with a 43-character mac.
pub fn well_formed(token: &str) -> bool {
    let b64 = |t: &str| {
        t.len() == 43 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    match token.split_once('.') {
        None => b64(token.strip_suffix('=').unwrap_or(token)),
        Some((kid, rest)) => match rest.split_once('.') {
            Some((exp, mac)) => {
                valid_kid(kid)
                    && (1..=20).contains(&exp.len())
                    && exp.bytes().all(|b| b.is_ascii_digit())
                    && b64(mac)
            }
            None => false,
        },
    }
}

/// Parses a revocation list: one device id per line; blank lines and `#` comments skipped.
pub fn parse_revoked(text: &str) -> HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Checks a presented enrolment secret against the configured ones, each compared through
/// a MAC so that timing tells nothing about how much of a secret matched.
#[derive(Clone)]
pub struct Enrollment {
    key: HmacSha256,
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Enrollment({} secrets)", self.digests.len())
    }
}

impl Enrollment {
    /// Accepts any of `secrets`.
    pub fn new(secrets: &[String]) -> Self {
        let key = keyed(b"omega/v1 enrollment secret");
        let digests = secrets
            .iter()
            .map(|s| {
                let mut m = key.clone();
                m.update(s.trim().as_bytes());
                m.finalize().into_bytes().into()
            })
            .collect();
        Enrollment { key, digests }
    }

    /// True when `presented` is one of the secrets.
    pub fn verify(&self, presented: &str) -> bool {
        let mut ok = false;
        for d in &self.digests {
            let mut m = self.key.clone();
            m.update(presented.as_bytes());
            ok |= m.verify_slice(d).is_ok();
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;
    const NOW: u64 = 1_800_000_000;

    fn policy() -> TokenPolicy {
        TokenPolicy { lifetime_secs: 90 * DAY, renew_after_secs: 7 * DAY, accept_legacy: true }
    }

    fn tokens(ring: &str) -> DeviceTokens {
        let legacy = DeviceKeys::new(b"legacy-root-secret-0123");
        DeviceTokens::new(KeyRing::parse(ring).expect("ring"), legacy, policy())
    }

    #[test]
    fn a_token_carries_its_key_id_and_expiry_and_verifies_only_for_its_device() {
        let t = tokens("k1:0123456789abcdef0123");
        let tok = t.issue("tv-1", NOW);
        assert!(tok.starts_with(&format!("k1.{}.", NOW + 90 * DAY)), "{tok}");
        assert!(well_formed(&tok));
        assert_eq!(t.check("tv-1", &tok, NOW), Ok(Accepted { renew: false }));
        assert_eq!(t.check("tv-2", &tok, NOW), Err(TokenError::BadSignature));
        let forged = tok.replace(&format!(".{}.", NOW + 90 * DAY), &format!(".{}.", u64::MAX));
        assert_eq!(t.check("tv-1", &forged, NOW), Err(TokenError::BadSignature));
        assert_eq!(t.check("tv-1", "k1.12.x", NOW), Err(TokenError::Malformed));
        assert_eq!(t.check("tv-1", "k1..abc", NOW), Err(TokenError::Malformed));
        assert_eq!(t.check("tv-1", "nope", NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn tokens_expire_after_the_lifetime_and_renew_after_the_renewal_age() {
        let t = tokens("k1:0123456789abcdef0123");
        let tok = t.issue("tv-1", NOW);
        assert_eq!(t.check("tv-1", &tok, NOW + 7 * DAY - 1), Ok(Accepted { renew: false }));
        assert_eq!(t.check("tv-1", &tok, NOW + 7 * DAY), Ok(Accepted { renew: true }));
        assert_eq!(t.check("tv-1", &tok, NOW + 90 * DAY - 1), Ok(Accepted { renew: true }));
        assert_eq!(t.check("tv-1", &tok, NOW + 90 * DAY), Err(TokenError::Expired));
    }

    #[test]
    fn rotation_old_key_then_both_then_new_only() {
        let t = tokens("old:0123456789abcdef-old");
        let old = t.issue("tv-1", NOW);
        t.set_ring(KeyRing::parse("new:0123456789abcdef-new\nold:0123456789abcdef-old").unwrap());
        assert_eq!(t.check("tv-1", &old, NOW), Ok(Accepted { renew: true }), "old key: renew");
        let new = t.issue("tv-1", NOW);
        assert!(new.starts_with("new."), "{new}");
        assert_eq!(t.check("tv-1", &new, NOW), Ok(Accepted { renew: false }));
        t.set_ring(KeyRing::parse("new:0123456789abcdef-new").unwrap());
        assert_eq!(t.check("tv-1", &old, NOW), Err(TokenError::UnknownKey));
        assert_eq!(t.check("tv-1", &new, NOW), Ok(Accepted { renew: false }));
    }

    #[test]
    fn revoked_devices_are_refused_whatever_their_token() {
        let t = tokens("k1:0123456789abcdef0123");
        let tok = t.issue("tv-1", NOW);
        t.set_revoked(parse_revoked("# stolen\n tv-1 \n\n"));
        assert_eq!(t.check("tv-1", &tok, NOW), Err(TokenError::Revoked));
        assert!(!t.is_revoked("tv-2"));
        t.set_revoked(HashSet::new());
        assert!(t.check("tv-1", &tok, NOW).is_ok());
    }

    #[test]
    fn legacy_tokens_pass_only_while_accepted_and_always_renew() {
        let legacy = DeviceKeys::new(b"legacy-root-secret-0123");
        let tok = legacy.token("tv-1");
        let t = tokens("k1:0123456789abcdef0123");
        assert_eq!(t.check("tv-1", &tok, NOW), Ok(Accepted { renew: true }));
        assert_eq!(t.check("tv-2", &tok, NOW), Err(TokenError::BadSignature));
        let strict = DeviceTokens::new(
            KeyRing::parse("k1:0123456789abcdef0123").unwrap(),
            legacy,
            TokenPolicy { accept_legacy: false, ..policy() },
        );
        assert_eq!(strict.check("tv-1", &tok, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn key_rings_refuse_what_cannot_work() {
        assert_eq!(KeyRing::parse("# nothing\n").unwrap_err(), TokenError::NoKey);
        for bad in
            ["k1", "k 1:0123456789abcdef", "k1:short", "a:0123456789abcdef,a:0123456789abcdefg"]
        {
            assert!(matches!(KeyRing::parse(bad), Err(TokenError::BadKey { .. })), "{bad}");
        }
        let r = KeyRing::parse("b:0123456789abcdef, a:0123456789abcdef").unwrap();
        assert_eq!(r.kids(), ["b", "a"]);
    }

    #[test]
    fn enrollment_accepts_only_configured_secrets() {
        let e = Enrollment::new(&["vendor-a-0123456789".into(), "vendor-b-0123456789".into()]);
        assert!(e.verify("vendor-a-0123456789") && e.verify("vendor-b-0123456789"));
        assert!(!e.verify("") && !e.verify("vendor-a-012345678") && !e.verify("x"));
    }
}
