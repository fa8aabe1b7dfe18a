//! State shared by the reconcilers: the client, event recorder, metrics, settings, per-object
//! retry counters (for backoff) and the HTTP client that reads shard servers' stats.

use crate::metrics::Metrics;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Operator settings (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Namespace the operator runs in (`POD_NAMESPACE`): the shards' NetworkPolicies admit the
    /// operator's pods from this namespace only.
    pub operator_namespace: String,
    /// How often a Shard's load is read and the autoscaler runs.
    pub stats_interval: Duration,
    /// Timeout of one `/api/v1/stats` request.
    pub stats_timeout: Duration,
    /// First retry delay after a failure or an unsatisfiable spec.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: None,
            operator_namespace: "default".into(),
            stats_interval: Duration::from_secs(15),
            stats_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events (events.k8s.io/v1).
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub settings: Settings,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    retries: Mutex<HashMap<String, u32>>,
    // When each Shard's load was last read. Kept in memory, not in status: writing the time
    // into status would rewrite every Shard every `stats_interval` even under steady load.
    evaluated: Mutex<HashMap<String, Instant>>,
}

impl Context {
    /// A context for `client`; `instance` names this replica in Events.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        settings: Settings,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter { controller: crate::FIELD_MANAGER.into(), instance };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            retries: Mutex::new(HashMap::new()),
            evaluated: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key`'s load is due to be read again (`stats_interval` after the last read);
    /// when it is, records now as the last read.
    pub fn evaluation_due(&self, key: &str) -> bool {
        let mut map = self.evaluated.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let due =
            map.get(key).is_none_or(|t| now.duration_since(*t) >= self.settings.stats_interval);
        if due {
            map.insert(key.to_string(), now);
        }
        due
    }

    /// Forgets per-object memory of `key` (its object is gone).
    pub fn forget(&self, key: &str) {
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        self.evaluated.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Next retry delay for `key` (exponential from `backoff_base`, capped), counting this try.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut map = self.retries.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(self.settings.backoff_base, self.settings.backoff_max, *n)
    }

    /// Forgets failures of `key` after a good reconcile.
    pub fn reset_backoff(&self, key: &str) {
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Publishes an Event about `reference`; failures to publish are logged, never fatal.
    pub async fn event(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        warning: bool,
        reason: &str,
        action: &str,
        note: impl Into<String>,
    ) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(truncate(note.into(), 1000)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }

    /// GETs `url` and returns the body (used for shard servers' `/api/v1/stats`).
    pub async fn http_get(&self, url: &str) -> Result<Bytes, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let fut = self.http.get(uri);
        let resp = tokio::time::timeout(self.settings.stats_timeout, fut)
            .await
            .map_err(|_| format!("{url}: timed out"))?
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let body = tokio::time::timeout(self.settings.stats_timeout, resp.into_body().collect())
            .await
            .map_err(|_| format!("{url}: body timed out"))?
            .map_err(|e| format!("{url}: {e}"))?;
        Ok(body.to_bytes())
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// `base * 2^(n-1)`, capped at `max`.
pub fn backoff_delay(base: Duration, max: Duration, n: u32) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(16));
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (b, m) = (Duration::from_secs(5), Duration::from_secs(300));
        let got: Vec<u64> = (1..=9).map(|n| backoff_delay(b, m, n).as_secs()).collect();
        assert_eq!(got, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff_delay(b, m, u32::MAX), m);
    }

    #[test]
    fn notes_are_cut_on_a_char_boundary() {
        assert_eq!(truncate("ééé".into(), 3), "é");
    }
}
