//! Shared state handed to every request and connection.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use shoal_proto::StoredMsg;

use crate::{
    auth::Auth,
    config::Config,
    hub::Hub,
    metrics::Metrics,
    store::{Store, StoreError},
};

/// Everything a handler needs.
pub struct AppState {
    /// Validated configuration.
    pub cfg: Arc<Config>,
    /// Node id.
    pub node: String,
    /// Rooms and users.
    pub hub: Arc<Hub>,
    /// Tokens and passwords.
    pub auth: Arc<Auth>,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Native TLS, when configured.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Admits handshakes at `--handshake-rate` (None: unlimited).
    pub handshake_bucket: Option<parking_lot::Mutex<crate::limiter::TokenBucket>>,
    /// Open HTTP connections, in total and per address.
    pub http_admission: Arc<crate::httpconn::HttpAdmission>,
    /// Bytes of uploads being read, one permit per byte
    /// (`--max-upload-memory`).
    pub upload_budget: Arc<Semaphore>,
    /// Which user names exist (direct messages to others are refused).
    pub directory: Arc<crate::directory::Directory>,
    /// Logins and registrations per client address.
    pub login_by_ip: crate::limiter::KeyedLimiter<std::net::IpAddr>,
    /// Login attempts per user name (lower-cased).
    pub login_by_user: crate::limiter::KeyedLimiter<String>,
    /// One permit per WebSocket connection (`--max-connections`).
    pub conn_permits: Arc<Semaphore>,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Stops the group-commit writer once connections have drained.
    pub writer_stop: CancellationToken,
}

impl AppState {
    /// True when messages live only in the cluster bus's hot history: a
    /// Redis cluster whose nodes each have their own embedded store (no
    /// shared PostgreSQL to archive into).
    pub fn history_is_hot_only(&self) -> bool {
        self.hub.bus().is_some() && self.cfg.store != crate::config::StoreKind::Postgres
    }

    /// A page of history below `before` (default: newest), newest first,
    /// and whether older messages exist: from the store, or, where
    /// messages live only in the bus, from its hot history (as far back as
    /// `--redis-stream-len`), so a room that has messages never answers an
    /// empty page.
    pub async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
        let Some(bus) = self.hub.bus().filter(|_| self.history_is_hot_only()) else {
            return self.store.history(room, before, limit).await;
        };
        let unavailable = |e: crate::bus::BusError| StoreError::Unavailable(e.to_string());
        let head = bus.head(room).await.map_err(unavailable)?;
        let upto = before.map_or(head, |b| b.saturating_sub(1).min(head));
        let after = upto.saturating_sub(limit as u64);
        let page = bus
            .replay(room, after, upto, limit)
            .await
            .map_err(unavailable)?;
        let oldest = page.entries.first().map_or(upto + 1, |e| e.msg.seq);
        let more = oldest > page.floor + 1;
        let messages = page.entries.into_iter().rev().map(|e| e.msg).collect();
        Ok((messages, more))
    }
}
