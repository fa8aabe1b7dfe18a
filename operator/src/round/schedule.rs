//! Scheduled rounds: when a parent with a `schedule` spawns its next child.
//!
//! Like a CronJob with `concurrencyPolicy: Forbid`: a run that falls due while the previous
//! child is still unfinished is skipped, and after downtime only the latest missed run is made.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use k8s_openapi::jiff::Timestamp;

/// Parses a 5-field cron expression (or `@hourly`-style nickname), evaluated in UTC.
pub fn parse(expr: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid schedule {expr:?}: {e}"))
}

/// What the parent should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleStep {
    /// A run is due at this time: spawn a child for it.
    pub spawn: Option<Timestamp>,
    /// A run fell due while a child was active: record it as skipped.
    pub skipped: Option<Timestamp>,
    /// The next run after the ones handled now.
    pub next: Option<Timestamp>,
}

/// Decides the parent's step; `last` is the last run handled (spawned or skipped), else the
/// parent's creation time.
pub fn step(cron: &Cron, last: Timestamp, now: Timestamp, child_active: bool) -> ScheduleStep {
    let next_after = |t: Timestamp| -> Option<Timestamp> {
        let dt = chrono::DateTime::<chrono::Utc>::from_timestamp(t.as_second(), 0)?;
        let n = cron.find_next_occurrence(&dt, false).ok()?;
        Timestamp::from_second(n.timestamp()).ok()
    };
    let mut due = None;
    let mut cursor = last;
    // Walk to the latest run that is due; bounded so a long outage cannot spin.
    for _ in 0..10_000 {
        match next_after(cursor) {
            Some(n) if n <= now => {
                due = Some(n);
                cursor = n;
            }
            _ => break,
        }
    }
    let next = next_after(cursor);
    match due {
        Some(t) if child_active => ScheduleStep { spawn: None, skipped: Some(t), next },
        Some(t) => ScheduleStep { spawn: Some(t), skipped: None, next },
        None => ScheduleStep { spawn: None, skipped: None, next },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn schedule_steps() {
        let hourly = parse("0 * * * *").unwrap();
        let cases = [
            (
                "not due yet",
                "2026-01-01T10:00:00Z",
                "2026-01-01T10:30:00Z",
                false,
                None,
                None,
                "2026-01-01T11:00:00Z",
            ),
            (
                "due",
                "2026-01-01T10:00:00Z",
                "2026-01-01T11:00:05Z",
                false,
                Some("2026-01-01T11:00:00Z"),
                None,
                "2026-01-01T12:00:00Z",
            ),
            (
                "due while a child runs is skipped",
                "2026-01-01T10:00:00Z",
                "2026-01-01T11:00:05Z",
                true,
                None,
                Some("2026-01-01T11:00:00Z"),
                "2026-01-01T12:00:00Z",
            ),
            (
                "after downtime only the latest runs",
                "2026-01-01T10:00:00Z",
                "2026-01-01T15:20:00Z",
                false,
                Some("2026-01-01T15:00:00Z"),
                None,
                "2026-01-01T16:00:00Z",
            ),
            (
                "created mid-hour waits for the hour",
                "2026-01-01T10:17:00Z",
                "2026-01-01T10:59:59Z",
                false,
                None,
                None,
                "2026-01-01T11:00:00Z",
            ),
        ];
        for (name, last, now, active, spawn, skipped, next) in cases {
            let s = step(&hourly, t(last), t(now), active);
            assert_eq!(s.spawn, spawn.map(t), "{name}");
            assert_eq!(s.skipped, skipped.map(t), "{name}");
            assert_eq!(s.next, Some(t(next)), "{name}");
        }
    }

    #[test]
    fn kubernetes_cron_syntax() {
        assert!(parse("@hourly").is_ok());
        assert!(parse("*/15 * * * 1-5").is_ok());
        assert!(parse("0 0 * * * *").is_err(), "6 fields (seconds) are not Kubernetes cron");
        let e = parse("every hour").unwrap_err();
        assert!(e.contains("invalid schedule"), "{e}");
    }
}
