//! `omega-device-bench` end to end, small: every target is reported, and `--check` fails
//! exactly when one is missed.

use crate::common::require_assets;
use std::process::Command;

#[test]
fn the_benchmark_reports_its_targets_and_check_agrees() {
    require_assets();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_omega-device-bench"))
        .args(["--patterns", "300", "--queries", "20", "--catalogue", "100", "--samples", "20"])
        .args(["--intervals", "60", "--ann-sizes", "300", "--json", "--check", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run the benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("one JSON object expected ({e}):\n{stdout}\n{stderr}"));
    for key in ["embed_p50_ms", "recommend_p50_ms", "ann_search_p50_us", "open_ms"] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {report}");
    }
    assert_eq!(report["patterns_loaded"], 300);
    let compiled = report["backends_compiled"].as_array().expect("backends_compiled");
    assert!(compiled.contains(&report["backend"]), "the backend measured is compiled in: {report}");
    assert!(report["bench_exe_bytes"].as_u64().is_some_and(|b| b > 0), "{report}");
    let targets = report["targets"].as_object().expect("targets");
    let keys = ["recommend_p99_ms", "ann_recall_at_10", "open_ms", "delta_bytes_p50", "rss_mb"];
    assert_eq!(targets.len(), keys.len());
    for key in keys {
        assert!(targets[key]["pass"].is_boolean(), "{key}: {report}");
        assert_eq!(targets[key]["value"], report[key], "{key}");
    }
    let all = targets.values().all(|t| t["pass"] == true);
    assert_eq!(report["targets_met"], all);
    // Timings on a loaded debug build may miss a target; `--check` must say so by its exit.
    assert_eq!(out.status.success(), all, "exit {:?}: {stderr}", out.status);
    if !all {
        assert!(stderr.contains("targets missed"), "{stderr}");
    }
}
