//! Shared state handed to every request and connection.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{auth::Auth, config::Config, hub::Hub, metrics::Metrics, store::Store};

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
    /// The Socket.IO endpoints.
    pub sio: crate::sio::Endpoints,
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
    /// Asks the other nodes for their view (the admin console).
    pub admin_http: reqwest::Client,
}
