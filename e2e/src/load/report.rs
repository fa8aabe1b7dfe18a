//! Results of a load run: percentiles and the JSON `omega-load --json` prints.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// One successful sync.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Client-side latency.
    pub latency_us: u32,
    /// Request bytes on the wire (zstd + frame prefix).
    pub up: u32,
    /// Response bytes on the wire.
    pub down: u32,
    /// Similar patterns received.
    pub similar: u16,
}

/// The summary.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// Successful syncs.
    pub syncs: u64,
    /// Failed syncs.
    pub errors: u64,
    /// Failures by gRPC code.
    pub error_kinds: BTreeMap<String, u64>,
    /// Measured wall time, seconds.
    pub duration_secs: f64,
    /// Successful syncs per second.
    pub syncs_per_sec: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Median request size on the wire.
    pub bytes_up_p50: u64,
    /// Median response size on the wire.
    pub bytes_down_p50: u64,
    /// Largest response on the wire.
    pub bytes_down_max: u64,
    /// Median number of similar patterns per response.
    pub similar_p50: u64,
    /// Devices simulated.
    pub devices: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
}

fn pct<T: Copy + Ord + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Report {
    /// Summarises samples and error codes.
    pub fn build(
        samples: Vec<Sample>,
        errors: Vec<String>,
        elapsed: Duration,
        devices: usize,
        concurrency: usize,
    ) -> Self {
        let mut lat: Vec<u32> = samples.iter().map(|s| s.latency_us).collect();
        let mut up: Vec<u32> = samples.iter().map(|s| s.up).collect();
        let mut down: Vec<u32> = samples.iter().map(|s| s.down).collect();
        let mut sim: Vec<u16> = samples.iter().map(|s| s.similar).collect();
        lat.sort_unstable();
        up.sort_unstable();
        down.sort_unstable();
        sim.sort_unstable();
        let mut kinds = BTreeMap::new();
        for e in &errors {
            *kinds.entry(e.clone()).or_insert(0) += 1;
        }
        let secs = elapsed.as_secs_f64().max(1e-9);
        let ms = |us: u32| f64::from(us) / 1000.0;
        Report {
            syncs: samples.len() as u64,
            errors: errors.len() as u64,
            error_kinds: kinds,
            duration_secs: secs,
            syncs_per_sec: samples.len() as f64 / secs,
            p50_ms: ms(pct(&lat, 0.50)),
            p90_ms: ms(pct(&lat, 0.90)),
            p99_ms: ms(pct(&lat, 0.99)),
            max_ms: ms(lat.last().copied().unwrap_or(0)),
            bytes_up_p50: u64::from(pct(&up, 0.5)),
            bytes_down_p50: u64::from(pct(&down, 0.5)),
            bytes_down_max: u64::from(down.last().copied().unwrap_or(0)),
            similar_p50: u64::from(pct(&sim, 0.5)),
            devices,
            concurrency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_rates() {
        let samples: Vec<Sample> = (1..=100)
            .map(|i| Sample { latency_us: i * 1000, up: 1000, down: 5000, similar: 10 })
            .collect();
        let r = Report::build(samples, vec!["Unavailable".into()], Duration::from_secs(2), 10, 4);
        assert_eq!(r.syncs, 100);
        assert_eq!(r.syncs_per_sec, 50.0);
        assert_eq!(r.p50_ms, 51.0);
        assert_eq!(r.p99_ms, 99.0);
        assert_eq!(r.max_ms, 100.0);
        assert_eq!(r.errors, 1);
        assert_eq!(r.error_kinds["Unavailable"], 1);
        let json = serde_json::to_value(&r).expect("json");
        for k in ["syncs_per_sec", "p50_ms", "p99_ms", "errors", "bytes_up_p50", "bytes_down_p50"] {
            assert!(json.get(k).is_some(), "{k}");
        }
    }
}
