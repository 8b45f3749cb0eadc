//! Durable state behind one trait, so a single node can use the embedded
//! database and a cluster a shared server database.
//!
//! The embedded implementation is [`sqlite::SqliteStore`].

pub mod sqlite;

use async_trait::async_trait;
use thiserror::Error;

/// Storage failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A unique key already exists (user name taken).
    #[error("already exists")]
    Conflict,
    /// The database failed or is unreachable; callers answer 503.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// A user as listed by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// User name.
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
}

/// Durable state: accounts and revoked tokens.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Create a user; `Conflict` if the name is taken.
    async fn create_user(&self, name: &str, password_hash: &str) -> Result<(), StoreError>;
    /// Stored password hash of a user, if the user exists.
    async fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// All users, sorted by name.
    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError>;
    /// Record a revoked token id until its expiry (seconds since the epoch).
    async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError>;
    /// Revoked token ids that have not expired yet.
    async fn revoked(&self, now: u64) -> Result<Vec<String>, StoreError>;
}
