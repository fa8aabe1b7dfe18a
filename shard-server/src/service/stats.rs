//! The shard's statistics (`/api/v1/stats`, `ShardAdmin.Stats`).

use super::Service;
use omega_protocol::admin::ShardStats;

impl Service {
    /// Current statistics, with the store's counters refreshed first.
    pub async fn stats(&self) -> ShardStats {
        self.state.refresh_counts().await;
        self.state.stats()
    }
}
