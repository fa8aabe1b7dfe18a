//! From observed facts to the Shard's phase and conditions (pure).

use crate::conditions::{DEGRADED, PROGRESSING, READY, Want};
use crate::crd::ShardPhase;

/// What the reconciler saw.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Facts {
    /// The spec cannot be satisfied (reason, message): missing Secret, CNPG not installed…
    pub blocked: Option<(String, String)>,
    /// Pods cannot start (reason, message): image pull failure, crash loop.
    pub stuck: Option<(String, String)>,
    /// The database reports ready.
    pub database_ready: bool,
    /// Servers wanted.
    pub wanted: i32,
    /// Servers ready.
    pub ready: i32,
    /// Extra note for the Ready condition (e.g. managed mode runs one instance).
    pub note: Option<String>,
}

/// Phase and conditions for the facts.
pub fn assess(f: &Facts) -> (ShardPhase, Vec<Want>) {
    let with_note = |m: String| match &f.note {
        Some(n) => format!("{m}; {n}"),
        None => m,
    };
    if let Some((reason, message)) = f.blocked.as_ref().or(f.stuck.as_ref()) {
        let progressing = f.blocked.is_none();
        return (
            ShardPhase::Degraded,
            vec![
                Want::no(READY, reason, message.clone()),
                Want {
                    type_: PROGRESSING,
                    status: progressing,
                    reason: reason.clone(),
                    message: message.clone(),
                },
                Want::yes(DEGRADED, reason, message.clone()),
            ],
        );
    }
    let healthy = Want::no(DEGRADED, "AsExpected", "");
    if !f.database_ready {
        return (
            ShardPhase::Provisioning,
            vec![
                Want::no(READY, "WaitingForDatabase", "the database is not ready yet"),
                Want::yes(PROGRESSING, "WaitingForDatabase", "the database is not ready yet"),
                healthy,
            ],
        );
    }
    let counts = format!("{}/{} servers ready", f.ready, f.wanted);
    if f.ready < f.wanted {
        let phase = if f.ready > 0 { ShardPhase::Running } else { ShardPhase::Provisioning };
        return (
            phase,
            vec![
                Want::no(READY, "ServersNotReady", counts.clone()),
                Want::yes(PROGRESSING, "ServersStarting", counts),
                healthy,
            ],
        );
    }
    (
        ShardPhase::Running,
        vec![
            Want::yes(READY, "AllServersReady", with_note(counts)),
            Want::no(PROGRESSING, "ReconcileComplete", ""),
            healthy,
        ],
    )
}

/// Reason of `BackupScheduled: False` once `spec.backup` was removed.
pub const NO_BACKUP: &str = "NotConfigured";

/// The `BackupScheduled` condition for a backup plan: none while backups were never asked for.
pub fn backup(
    plan: &Result<Option<super::backup::Plan>, super::backup::Invalid>,
    spec: Option<&crate::crd::BackupSpec>,
    had_condition: bool,
) -> Option<Want> {
    use super::backup::{BACKUP_SCHEDULED, describe};
    match (plan, spec) {
        (Ok(Some(p)), Some(b)) => Some(Want::yes(BACKUP_SCHEDULED, "Scheduled", describe(p, b))),
        (Err((reason, message)), _) => Some(Want::no(BACKUP_SCHEDULED, reason, message.clone())),
        _ => had_condition.then(|| Want::no(BACKUP_SCHEDULED, NO_BACKUP, "spec.backup is not set")),
    }
}

/// Reason of the Degraded condition when the API server refused a generated object.
pub const APPLY_FAILED: &str = "ApplyFailed";

/// Phase and conditions when the API server refused an object the operator generated from
/// the spec: only a spec change can help, so the Shard is Degraded and not progressing.
pub fn refused(message: &str) -> (ShardPhase, Vec<Want>) {
    let message = format!("the API server refused a generated object: {message}");
    (
        ShardPhase::Degraded,
        vec![
            Want::no(READY, APPLY_FAILED, message.clone()),
            Want::no(PROGRESSING, APPLY_FAILED, message.clone()),
            Want::yes(DEGRADED, APPLY_FAILED, message),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(w: &'a [Want], t: &str) -> &'a Want {
        w.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn phases() {
        let base = Facts { database_ready: true, wanted: 2, ready: 2, ..Facts::default() };
        let blocked = Some(("SecretNotFound".to_string(), "Secret db not found".to_string()));
        let cases = [
            ("all ready", base.clone(), ShardPhase::Running, true, false, "AllServersReady"),
            (
                "blocked",
                Facts { blocked: blocked.clone(), ..base.clone() },
                ShardPhase::Degraded,
                false,
                true,
                "SecretNotFound",
            ),
            (
                "image pull",
                Facts { stuck: Some(("ImagePullBackOff".into(), "denied".into())), ..base.clone() },
                ShardPhase::Degraded,
                false,
                true,
                "ImagePullBackOff",
            ),
            (
                "database starting",
                Facts { database_ready: false, ..base.clone() },
                ShardPhase::Provisioning,
                false,
                false,
                "WaitingForDatabase",
            ),
            (
                "no server ready",
                Facts { ready: 0, ..base.clone() },
                ShardPhase::Provisioning,
                false,
                false,
                "ServersNotReady",
            ),
            (
                "scaling up",
                Facts { ready: 1, ..base.clone() },
                ShardPhase::Running,
                false,
                false,
                "ServersNotReady",
            ),
        ];
        for (name, facts, phase, ready, degraded, reason) in cases {
            let (p, w) = assess(&facts);
            assert_eq!(p, phase, "{name}");
            assert_eq!(get(&w, READY).status, ready, "{name}");
            assert_eq!(get(&w, READY).reason, reason, "{name}");
            assert_eq!(get(&w, DEGRADED).status, degraded, "{name}");
        }
        let (_, w) = assess(&Facts { blocked, ..base });
        assert!(!get(&w, PROGRESSING).status, "a blocked spec is not progressing");
    }

    #[test]
    fn a_refused_object_degrades_with_the_servers_message() {
        let (phase, w) = refused("spec.resources.limits[memory]: Invalid value: \"lots\"");
        assert_eq!(phase, ShardPhase::Degraded);
        let d = get(&w, DEGRADED);
        assert!(d.status && d.reason == APPLY_FAILED, "{d:?}");
        assert!(d.message.contains("Invalid value: \"lots\""), "{}", d.message);
        assert!(!get(&w, READY).status && !get(&w, PROGRESSING).status);
    }
}
