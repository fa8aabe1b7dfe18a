//! The federate Job of a round (pure).

use crate::crd::FederationRound;
use crate::shard::resources::{
    ROLE_FEDERATION, ROLE_LABEL, SHARD_UID, admin_token_env, restricted_container_security,
};
use crate::{Error, Result};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// Label naming the round a Job or child round belongs to.
pub const ROUND_LABEL: &str = "omega.exogenesis.io/round";
/// Where `omega-shard federate` writes its summary: the container's termination message.
pub const SUMMARY_FILE: &str = "/dev/termination-log";

/// Name of a round's Job.
pub fn job_name(round: &str) -> String {
    let mut base = round.to_string();
    base.truncate(63 - "-federate".len());
    format!("{}-federate", base.trim_end_matches('-'))
}

/// The round id: unique per round object, stable across reconciles (the shards' idempotency key).
pub fn round_id(fr: &FederationRound) -> String {
    let uid = fr.uid().unwrap_or_default();
    format!("{}.{}.{}", fr.namespace().unwrap_or_default(), fr.name_any(), &uid[..uid.len().min(8)])
}

/// Annotation a scheduled parent puts on the child it spawns: the privacy ledger (JSON) its
/// latest finished child reported, passed to the Job as `--privacy-ledger`.
pub const PRIVACY_LEDGER_ANNOTATION: &str = "omega.exogenesis.io/privacy-ledger";

/// `omega-shard federate` arguments (the contract in docs/architecture.md).
pub fn args(fr: &FederationRound, round_id: &str, endpoints: &[String]) -> Vec<String> {
    let s = &fr.spec;
    let mut a = vec![
        "federate".to_string(),
        "--round-id".into(),
        round_id.into(),
        "--shards".into(),
        endpoints.join(","),
        "--min-quality".into(),
        s.min_quality.to_string(),
        "--min-sources".into(),
        s.min_sources.to_string(),
        "--trend-decay".into(),
        s.trend_decay.to_string(),
    ];
    if let Some(p) = &s.privacy {
        a.extend([
            "--epsilon".into(),
            p.epsilon.to_string(),
            "--delta".into(),
            p.delta.to_string(),
        ]);
        if let Some(b) = p.budget_epsilon {
            a.extend(["--budget-epsilon".into(), b.to_string()]);
        }
        if let Some(d) = p.period_days {
            a.extend(["--period-days".into(), d.to_string()]);
        }
        // What earlier rounds of the schedule spent (set by the parent when it spawned this
        // round): the accounting composes across Jobs through it.
        if let Some(l) = fr.annotations().get(PRIVACY_LEDGER_ANNOTATION) {
            a.extend(["--privacy-ledger".into(), l.clone()]);
        }
    }
    if s.allow_partial {
        a.push("--allow-partial".into());
    }
    a.extend(["--summary-file".into(), SUMMARY_FILE.into()]);
    a
}

/// The Job: one attempt, bounded by `timeoutSeconds`, owned by the round.
pub fn job(fr: &FederationRound, round_id: &str, endpoints: &[String], image: &str) -> Result<Job> {
    let owner = fr.controller_owner_ref(&()).ok_or(Error::MissingField("metadata.uid"))?;
    let labels = BTreeMap::from([
        (ROLE_LABEL.to_string(), ROLE_FEDERATION.to_string()),
        (ROUND_LABEL.to_string(), fr.name_any()),
        ("app.kubernetes.io/name".to_string(), "omega-federation".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "omega-operator".to_string()),
    ]);
    let container = Container {
        name: "federate".into(),
        image: Some(image.into()),
        args: Some(args(fr, round_id, endpoints)),
        // The shards' ShardAdmin credential (the namespace's admin Secret).
        env: Some(vec![admin_token_env()]),
        termination_message_path: Some(SUMMARY_FILE.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(restricted_container_security(SHARD_UID)),
        ..Default::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(&fr.name_any())),
            namespace: fr.namespace(),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(i64::from(fr.spec.timeout_seconds)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{FederationRoundSpec, PrivacySpec};

    fn round(privacy: bool, partial: bool) -> FederationRound {
        let mut fr = FederationRound::new(
            "nightly",
            FederationRoundSpec {
                privacy: privacy.then_some(PrivacySpec {
                    epsilon: 1.5,
                    delta: 1e-6,
                    budget_epsilon: None,
                    period_days: None,
                }),
                allow_partial: partial,
                ..FederationRoundSpec::default()
            },
        );
        fr.metadata.namespace = Some("tv".into());
        fr.metadata.uid = Some("0123456789abcdef".into());
        fr
    }

    #[test]
    fn a_budget_and_the_parents_ledger_reach_the_job() {
        let mut fr = round(true, false);
        if let Some(p) = fr.spec.privacy.as_mut() {
            p.budget_epsilon = Some(8.0);
            p.period_days = Some(7);
        }
        let ledger = r#"{"days":[{"day":20000,"rho":0.1,"delta_select":1e-7,"rounds":1}]}"#;
        fr.metadata.annotations =
            Some([(PRIVACY_LEDGER_ANNOTATION.to_string(), ledger.to_string())].into());
        let a = args(&fr, "r", &["http://a-admin.tv.svc:50052".to_string()]).join(" ");
        assert!(
            a.contains(&format!(
                "--epsilon 1.5 --delta 0.000001 --budget-epsilon 8 --period-days 7 --privacy-ledger {ledger}"
            )),
            "{a}"
        );
        // Without `privacy` the ledger is not passed.
        fr.spec.privacy = None;
        let a = args(&fr, "r", &[]).join(" ");
        assert!(!a.contains("--privacy-ledger") && !a.contains("--budget-epsilon"), "{a}");
    }

    #[test]
    fn args_follow_the_federate_contract() {
        let eps = vec![
            "http://a-admin.tv.svc:50052".to_string(),
            "http://b-admin.tv.svc:50052".to_string(),
        ];
        let cases = [
            (
                false,
                false,
                "federate --round-id tv.nightly.01234567 --shards http://a-admin.tv.svc:50052,http://b-admin.tv.svc:50052 --min-quality 0.8 --min-sources 3 --trend-decay 0.95 --summary-file /dev/termination-log",
            ),
            (
                true,
                true,
                "federate --round-id tv.nightly.01234567 --shards http://a-admin.tv.svc:50052,http://b-admin.tv.svc:50052 --min-quality 0.8 --min-sources 3 --trend-decay 0.95 --epsilon 1.5 --delta 0.000001 --allow-partial --summary-file /dev/termination-log",
            ),
        ];
        for (privacy, partial, want) in cases {
            let fr = round(privacy, partial);
            assert_eq!(args(&fr, &round_id(&fr), &eps).join(" "), want);
        }
    }

    #[test]
    fn job_is_one_locked_down_attempt_reporting_through_the_termination_message() {
        let fr = round(false, false);
        let j = job(&fr, "id", &["http://a:50052".into()], "img:1").unwrap();
        assert_eq!(j.metadata.name.as_deref(), Some("nightly-federate"));
        assert_eq!(j.metadata.owner_references.as_ref().unwrap()[0].kind, "FederationRound");
        let spec = j.spec.unwrap();
        assert_eq!((spec.backoff_limit, spec.active_deadline_seconds), (Some(0), Some(900)));
        let pod = spec.template.spec.unwrap();
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(
            labels[ROLE_LABEL], ROLE_FEDERATION,
            "NetworkPolicies admit federation pods by this label"
        );
        let c = &pod.containers[0];
        assert_eq!(c.termination_message_path.as_deref(), Some(SUMMARY_FILE));
        let env = &c.env.as_ref().unwrap()[0];
        let from = env.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((env.name.as_str(), from.name.as_str()), ("ADMIN_TOKEN", "omega-shard-admin"));
        assert_eq!(c.security_context.as_ref().unwrap().read_only_root_filesystem, Some(true));
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    }

    #[test]
    fn long_names_fit_kubernetes_limits() {
        let long = "r".repeat(80);
        assert!(job_name(&long).len() <= 63);
    }
}
