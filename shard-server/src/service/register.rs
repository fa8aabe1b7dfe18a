//! Registration.
//!
//! A registration is checked per client address against `REGISTER_RATE_*` first. A new
//! device id gets its token (after its enrolment secret, when `ENROLLMENT_SECRETS` is set); an
//! id that is registered already gets a fresh one only when the request carries a valid
//! token of that id, since a token is derived from the id and the key alone and would
//! otherwise be handed to anyone who names the id. A revoked id gets nothing.

use super::{Service, ServiceError};
use omega_protocol::pb;
use omega_protocol::validate;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;
use tracing::Instrument as _;

/// Default sync interval bounds handed to devices at registration.
pub const SYNC_INTERVAL_SECS: (u32, u32) = (300, 900);

/// A registration as a transport decoded it.
#[derive(Debug, Clone)]
pub struct RegisterInput {
    /// The request message.
    pub request: pb::RegisterRequest,
    /// The bearer token it carried, if any.
    pub token: Option<String>,
    /// The client's address, if the transport knows it.
    pub peer: Option<SocketAddr>,
}

/// The key registrations are rate-limited by: the client's IPv4 address, or its IPv6 /64
/// (one subscriber usually holds a whole /64, so single addresses would cost nothing to vary).
pub fn peer_key(addr: Option<SocketAddr>) -> String {
    match addr.map(|a| a.ip().to_canonical()) {
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(IpAddr::V4(v4)) => v4.to_string(),
        None => "unknown".into(),
    }
}

impl Service {
    /// Registers a device (or re-issues its token to a holder of that token).
    #[tracing::instrument(name = "register", skip_all, fields(trace_id = tracing::field::Empty))]
    pub async fn register(
        &self,
        input: RegisterInput,
    ) -> Result<pb::RegisterResponse, ServiceError> {
        omega_telemetry::record_trace_id(&tracing::Span::current());
        let st = &self.state;
        self.check_draining()?;
        if !st.register_limiter.allow(&peer_key(input.peer), Instant::now()) {
            return Err(ServiceError::RateLimited(
                "registration rate limit exceeded for this client address; retry later",
            ));
        }
        let r = input.request;
        tracing::info_span!("validate").in_scope(|| validate::check_register(&r))?;
        let now_secs = crate::clock::now_secs();
        // A device re-registering with a valid token that is not due for renewal gets that
        // same token back (a re-install keeps its credential).
        let mut kept_token = None;
        if let Some(t) = &input.token {
            match st.tokens.check(&r.device_id, t, now_secs) {
                Ok(accepted) if !accepted.renew => kept_token = Some(t.clone()),
                Ok(_) => {}
                Err(e) => {
                    st.auth_failures.allow(&peer_key(input.peer), Instant::now());
                    return Err(ServiceError::Unauthenticated(e.to_string()));
                }
            }
        }
        if st.tokens.is_revoked(&r.device_id) {
            return Err(ServiceError::Unauthenticated(
                crate::tokens::TokenError::Revoked.to_string(),
            ));
        }
        // Enrolment guards new ids only: a device re-registering shows its own token.
        if input.token.is_none()
            && let Some(enrollment) = &st.enrollment
            && !enrollment.verify(&r.enrollment_secret)
        {
            st.auth_failures.allow(&peer_key(input.peer), Instant::now());
            return Err(ServiceError::Forbidden(
                "registering a new device needs a valid enrollment_secret (vendor-issued)",
            ));
        }
        let region = if r.region.is_empty() { st.settings.region.clone() } else { r.region };
        let reg = st
            .store
            .register(&r.device_id, &region, st.settings.max_devices, crate::clock::now_ms())
            .instrument(tracing::info_span!("store.register"))
            .await?;
        // Tokens are keyed on the id alone: handing one out again for an existing id
        // would let anyone who knows (or guesses) a device id act as that device.
        if !reg.created && input.token.is_none() {
            return Err(ServiceError::Unauthenticated(
                "device_id is already registered: registering it again needs its token in \
                 `authorization: Bearer <token>`"
                    .into(),
            ));
        }
        if reg.created {
            tracing::debug!(region = %reg.region, "device registered");
        }
        Ok(pb::RegisterResponse {
            device_token: kept_token.unwrap_or_else(|| st.tokens.issue(&r.device_id, now_secs)),
            shard_id: st.settings.shard_id,
            region: reg.region,
            model_id: st.settings.model_id.clone(),
            sync_interval_min_secs: SYNC_INTERVAL_SECS.0,
            sync_interval_max_secs: SYNC_INTERVAL_SECS.1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::peer_key;

    #[test]
    fn registrations_are_limited_per_ipv4_address_and_per_ipv6_64() {
        let key = |a: &str| peer_key(Some(a.parse().expect("addr")));
        assert_eq!(key("203.0.113.7:4000"), "203.0.113.7");
        assert_eq!(key("203.0.113.7:4000"), key("203.0.113.7:5000"), "ports do not matter");
        assert_ne!(key("203.0.113.7:1"), key("203.0.113.8:1"));
        assert_eq!(key("[2001:db8:1:2:aaaa::1]:1"), "2001:db8:1:2::/64");
        assert_eq!(key("[2001:db8:1:2:aaaa::1]:1"), key("[2001:db8:1:2:ffff::9]:1"));
        assert_ne!(key("[2001:db8:1:2::1]:1"), key("[2001:db8:1:3::1]:1"));
        assert_eq!(key("[::ffff:198.51.100.4]:1"), "198.51.100.4", "IPv4-mapped is IPv4");
        assert_eq!(peer_key(None), "unknown");
    }
}
