//! Embedded SQLite store (WAL mode) in the data directory.
//!
//! rusqlite is synchronous, so every call runs on the blocking pool behind
//! one connection mutex; SQLite serialises writers anyway, and the hot
//! message path does not touch this store.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use super::{Store, StoreError, UserRecord};

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many ran.
const MIGRATIONS: &[&str] = &["CREATE TABLE users (
        name TEXT PRIMARY KEY NOT NULL,
        password_hash TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE revoked_tokens (
        jti TEXT PRIMARY KEY NOT NULL,
        exp INTEGER NOT NULL
    );"];

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Open (creating if needed) `<dir>/shoal.db` and run migrations.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("shoal.db");
        let conn =
            Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            conn.execute_batch(m)
                .with_context(|| format!("migration {}", i + 1))?;
            conn.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock()))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(&self, name: &str, password_hash: &str) -> Result<(), StoreError> {
        let (name, hash) = (name.to_string(), password_hash.to_string());
        self.with(move |c| {
            match c.execute(
                "INSERT INTO users (name, password_hash, created_ms) VALUES (?1, ?2, ?3)",
                params![name, hash, crate::auth::now_ms() as i64],
            ) {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::Conflict)
                }
                Err(e) => Err(unavailable(e)),
            }
        })
        .await
    }

    async fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT password_hash FROM users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare_cached("SELECT name, created_ms FROM users ORDER BY name")
                .map_err(unavailable)?;
            let rows = st
                .query_map([], |r| {
                    Ok(UserRecord {
                        name: r.get(0)?,
                        created_ms: r.get::<_, i64>(1)? as u64,
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }

    async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError> {
        let jti = jti.to_string();
        self.with(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO revoked_tokens (jti, exp) VALUES (?1, ?2)",
                params![jti, exp as i64],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn revoked(&self, now: u64) -> Result<Vec<String>, StoreError> {
        self.with(move |c| {
            c.execute("DELETE FROM revoked_tokens WHERE exp < ?1", [now as i64])
                .map_err(unavailable)?;
            let mut st = c
                .prepare_cached("SELECT jti FROM revoked_tokens")
                .map_err(unavailable)?;
            let rows = st.query_map([], |r| r.get(0)).map_err(unavailable)?;
            rows.collect::<Result<Vec<String>, _>>()
                .map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn users_and_revocations_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(dir.path()).expect("open");
        s.create_user("alice", "h1").await.expect("create");
        assert!(matches!(
            s.create_user("alice", "h2").await,
            Err(StoreError::Conflict)
        ));
        s.revoke("j1", 100).await.expect("revoke");
        s.revoke("j2", 10).await.expect("revoke");
        drop(s);
        let s = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(
            s.password_hash("alice").await.expect("q"),
            Some("h1".into())
        );
        assert_eq!(s.password_hash("nobody").await.expect("q"), None);
        assert_eq!(s.list_users().await.expect("q").len(), 1);
        assert_eq!(s.revoked(50).await.expect("q"), vec!["j1".to_string()]);
    }
}
