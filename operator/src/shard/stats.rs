//! Reading the servers' load: `GET http://<pod IP>:<http port>/api/v1/stats` on every ready
//! pod, parsed as `omega_protocol::admin::ShardStats`.

use super::resources::{REST_PORT, REST_PORT_NAME};
use crate::context::Context;
use k8s_openapi::api::core::v1::Pod;
use omega_protocol::admin::ShardStats;

/// Whether a pod's Ready condition is true.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Stats URL of a pod: its IP and the container port named `http` (8080 by default).
pub fn stats_url(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(REST_PORT_NAME))
        .map_or(REST_PORT, |p| p.container_port);
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
    Some(format!("http://{host}:{port}/api/v1/stats"))
}

/// Stats of every ready pod that answered; errors are returned alongside (one per pod).
pub async fn collect(ctx: &Context, pods: &[Pod]) -> (Vec<ShardStats>, Vec<String>) {
    let urls: Vec<String> = pods.iter().filter(|p| pod_ready(p)).filter_map(stats_url).collect();
    let results = futures::future::join_all(urls.iter().map(|u| async move {
        let body = ctx.http_get(u).await?;
        serde_json::from_slice::<ShardStats>(&body).map_err(|e| format!("{u}: {e}"))
    }))
    .await;
    let mut ok = vec![];
    let mut errors = vec![];
    for r in results {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => errors.push(e),
        }
    }
    (ok, errors)
}

/// First container waiting reason that means the pod cannot start (image pull, bad config).
pub fn stuck_reason(pods: &[Pod]) -> Option<(String, String)> {
    pods.iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| {
            w.reason.as_deref().is_some_and(|r| {
                crate::round::state::IMAGE_FAILURES.contains(&r) || r == "CrashLoopBackOff"
            })
        })
        .map(|w| (w.reason.clone().unwrap_or_default(), w.message.clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn url_uses_the_named_http_port() {
        let p = pod(json!({
            "metadata": {"name": "s-0"},
            "spec": {"containers": [{"name": "shard", "ports": [{"name": "grpc", "containerPort": 50051}, {"name": "http", "containerPort": 18080}]}]},
            "status": {"podIP": "10.0.0.5"}
        }));
        assert_eq!(stats_url(&p).as_deref(), Some("http://10.0.0.5:18080/api/v1/stats"));
        let v6 = pod(
            json!({"metadata": {"name": "s-1"}, "spec": {"containers": []}, "status": {"podIP": "fd00::1"}}),
        );
        assert_eq!(stats_url(&v6).as_deref(), Some("http://[fd00::1]:8080/api/v1/stats"));
        assert_eq!(stats_url(&pod(json!({"metadata": {"name": "x"}}))), None);
    }

    #[test]
    fn readiness_and_stuck_pods() {
        let ready = pod(
            json!({"metadata": {"name": "a"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let pulling = pod(json!({"metadata": {"name": "b"}, "status": {
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "shard", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}}]}}));
        assert!(pod_ready(&ready) && !pod_ready(&pulling));
        assert_eq!(stuck_reason(std::slice::from_ref(&ready)), None);
        assert_eq!(
            stuck_reason(&[ready, pulling]),
            Some(("ImagePullBackOff".into(), "pull access denied".into()))
        );
    }
}
