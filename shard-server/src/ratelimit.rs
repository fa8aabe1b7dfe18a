//! Per-device rate limit: a token bucket per device, in memory.
//!
//! Devices sync every 5-15 minutes, so the default limit (120/min, burst 20) only stops a
//! device stuck in a retry loop. Buckets live in 16 independently locked shards; a shard that
//! grows past its share forgets devices whose bucket has refilled (they are idle).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 16;
const MAX_PER_SHARD: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by device id.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
}

impl RateLimiter {
    /// `per_minute` sustained, `burst` back to back.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        RateLimiter {
            per_sec: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token for `device`; false when the device is over its limit.
    pub fn allow(&self, device: &str, now: Instant) -> bool {
        let idx = shard_of(device);
        let mut map = match self.shards[idx].lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() >= MAX_PER_SHARD && !map.contains_key(device) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst
            });
        }
        let b = map.entry(device.to_owned()).or_insert(Bucket { tokens: self.burst, at: now });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_sec;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl RateLimiter {
    /// True while `key` has a token left, without taking it (a cheap check before work whose
    /// failure would then [`RateLimiter::allow`] one away).
    pub fn has_tokens(&self, key: &str, now: Instant) -> bool {
        let map = match self.shards[shard_of(key)].lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(key).is_none_or(|b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.per_sec >= 1.0
        })
    }
}

fn shard_of(device: &str) -> usize {
    // FNV-1a: cheap and good enough to spread device ids.
    let mut h: u32 = 0x811c_9dc5;
    for b in device.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_device() {
        let rl = RateLimiter::new(60, 3);
        let t = Instant::now();
        assert!((0..3).all(|_| rl.allow("a", t)));
        assert!(!rl.allow("a", t));
        assert!(rl.allow("b", t), "other devices are independent");
        assert!(!rl.allow("a", t + Duration::from_millis(500)));
        assert!(rl.allow("a", t + Duration::from_millis(1600)));
    }

    #[test]
    fn has_tokens_looks_without_taking() {
        let rl = RateLimiter::new(60, 2);
        let t = Instant::now();
        assert!(rl.has_tokens("a", t), "an unknown key has its burst");
        assert!(rl.allow("a", t) && rl.has_tokens("a", t) && rl.has_tokens("a", t));
        assert!(rl.allow("a", t));
        assert!(!rl.has_tokens("a", t));
        assert!(rl.has_tokens("a", t + Duration::from_millis(1100)), "refilled");
    }
}
