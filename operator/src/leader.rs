//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Every replica tries to acquire the Lease; the holder renews it every `renew_every`, the
//! others take it over once it has not been renewed for `lease_duration`. The holder gives up
//! leading when it could not renew within `renew_deadline` (shorter than `lease_duration`, as
//! client-go's leader election does), so it has stopped before anyone else may start. Writes are
//! server-side applies carrying the observed `resourceVersion`, so two replicas racing for an
//! expired Lease cannot both win: the API server answers the loser 409 Conflict.

use crate::{FIELD_MANAGER, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PostParams};
use std::time::Duration;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews, and others retry.
    pub renew_every: Duration,
    /// The holder stops leading when its last successful renewal is this old; must be
    /// shorter than `lease_duration` (about two thirds of it) so two leaders never overlap.
    pub renew_deadline: Duration,
}

impl LeaseConfig {
    /// Settings for a Lease valid for `lease_duration`: renewed every fifth of it, given up
    /// after two thirds of it without a renewal.
    pub fn new(name: String, identity: String, lease_duration: Duration) -> Self {
        LeaseConfig {
            name,
            identity,
            lease_duration,
            renew_every: lease_duration / 5,
            renew_deadline: lease_duration * 2 / 3,
        }
    }
}

/// A Lease-based lock.
pub struct LeaseLock {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    /// A lock on `cfg.name` through `api` (namespaced to the operator's namespace).
    pub fn new(api: Api<Lease>, cfg: LeaseConfig) -> Self {
        LeaseLock { api, cfg }
    }

    /// Settings of this lock.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// Acquires or renews the Lease; true when this replica holds it afterwards.
    pub async fn try_acquire(&self) -> Result<bool> {
        let now = Timestamp::now();
        let duration_secs = i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(15);
        let me = self.cfg.identity.clone();
        let Some(current) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            return match self.api.create(&pp, &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(me.as_str());
        let held_for = SignedDuration::from_secs(i64::from(
            spec.lease_duration_seconds.unwrap_or(duration_secs),
        ));
        let expired = spec.renew_time.as_ref().is_none_or(|r| now >= r.0 + held_for);
        if !(mine || holder.is_none() || expired) {
            return Ok(false);
        }
        let spec = LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: if mine { spec.acquire_time.clone() } else { Some(MicroTime(now)) },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
            ..Default::default()
        };
        self.write(&current, spec).await
    }

    /// Gives the Lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&self) -> Result<()> {
        let Some(current) = self.api.get_opt(&self.cfg.name).await? else { return Ok(()) };
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        let spec = LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            renew_time: spec.renew_time,
            acquire_time: spec.acquire_time,
            lease_transitions: spec.lease_transitions,
            ..Default::default()
        };
        self.write(&current, spec).await.map(|_| ())
    }

    /// Applies `spec` only if the Lease is still at `current`'s resourceVersion; false when
    /// another replica wrote it first (409).
    async fn write(&self, current: &Lease, spec: LeaseSpec) -> Result<bool> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.cfg.name.clone()),
                resource_version: current.metadata.resource_version.clone(),
                ..Default::default()
            },
            spec: Some(spec),
        };
        match self.api.patch(&self.cfg.name, &crate::apply::params(), &Patch::Apply(&lease)).await {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
