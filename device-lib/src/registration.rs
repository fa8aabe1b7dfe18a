//! What a TV keeps of its registration with a shard: the bearer token and the shard's answer.
//!
//! A shard hands a device id's token out once: registering a known id again needs that token
//! (`authorization: Bearer …`), since the token is derived from the id alone and would
//! otherwise go to anyone who names the id. So the token is kept in the brain's database
//! ([`crate::Brain::registration`]) the moment it arrives, and a TV that reboots syncs on with
//! it instead of registering again. It is a credential: `Debug` never shows it, nothing logs
//! it, and the C API exposes only whether one is held (`has_token` in the stats).

use serde::{Deserialize, Serialize};

/// A registration held by a brain.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRegistration {
    /// The device id the token was issued for.
    pub device_id: String,
    /// The endpoint the device registered at. Another endpoint may be another shard, with
    /// another secret: there the token is presented at a new registration, not assumed.
    pub endpoint: String,
    /// Bearer token for every sync.
    pub token: String,
    /// The shard (0 when the token came from a config, not from a registration answer).
    pub shard_id: u32,
    /// The device's region on the shard.
    pub region: String,
    /// Shortest pause between syncs the shard asked for, s (0 = none).
    pub sync_interval_min_secs: u32,
    /// Longest pause between syncs the shard asked for, s (0 = none).
    pub sync_interval_max_secs: u32,
}

impl DeviceRegistration {
    /// True when this registration can stand for `device_id`: issued for it, with a token
    /// that is printable ASCII (a tampered value would fail as a header at every sync).
    pub fn usable_for(&self, device_id: &str) -> bool {
        self.device_id == device_id
            && !self.token.is_empty()
            && self.token.bytes().all(|b| b.is_ascii_graphic())
    }
}

impl std::fmt::Debug for DeviceRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRegistration")
            .field("device_id", &self.device_id)
            .field("endpoint", &self.endpoint)
            .field("token", &"<redacted>")
            .field("shard_id", &self.shard_id)
            .field("region", &self.region)
            .field("sync_interval_min_secs", &self.sync_interval_min_secs)
            .field("sync_interval_max_secs", &self.sync_interval_max_secs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(token: &str) -> DeviceRegistration {
        DeviceRegistration {
            device_id: "tv-1".into(),
            endpoint: "http://shard:50051".into(),
            token: token.into(),
            shard_id: 3,
            region: "eu".into(),
            sync_interval_min_secs: 300,
            sync_interval_max_secs: 900,
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let shown = format!("{:?}", reg("s3cr3t-token"));
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("tv-1") && shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn usable_only_for_its_device_with_a_header_safe_token() {
        let cases = [
            ("tv-1", "tok", true),
            ("tv-2", "tok", false),
            ("tv-1", "", false),
            ("tv-1", "to k", false),
            ("tv-1", "tok\n", false),
            ("tv-1", "tök", false),
        ];
        for (device, token, want) in cases {
            assert_eq!(reg(token).usable_for(device), want, "{device} / {token:?}");
        }
    }
}
