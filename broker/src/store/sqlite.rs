//! Embedded SQLite store (WAL mode, FTS5) in the data directory.
//!
//! rusqlite is synchronous, so every call runs on the blocking pool. One
//! writer connection takes every write (SQLite serialises writers anyway;
//! the group-commit batches of `persist` make that one transaction per
//! batch), and a small pool of reader connections serves replay, history
//! and search concurrently with it, which WAL mode allows.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use shoal_proto::{codec::body_from_storage, MarkState, Receipt, StoredMsg};

use super::{
    CidEntry, FileRecord, OpOutcome, Replay, ReplayEntry, RetentionPolicy, RoomHead, RoomSummary,
    Store, StoreError, UserRecord, WriteOp,
};

/// Reader connections (replay, history, search, listings).
const READERS: usize = 4;

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE users (
        name TEXT PRIMARY KEY NOT NULL,
        password_hash TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE revoked_tokens (
        jti TEXT PRIMARY KEY NOT NULL,
        exp INTEGER NOT NULL
    );",
    // `floor`: highest seq removed by retention; a `since` below it is a gap.
    "CREATE TABLE rooms (
        name TEXT PRIMARY KEY NOT NULL,
        last_seq INTEGER NOT NULL,
        floor INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        room TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sender TEXT NOT NULL,
        ts INTEGER NOT NULL,
        body TEXT NOT NULL,
        cid TEXT,
        deleted INTEGER NOT NULL DEFAULT 0,
        UNIQUE (room, seq)
    );
    CREATE TABLE members (
        user TEXT NOT NULL,
        room TEXT NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0,
        read INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user, room)
    ) WITHOUT ROWID;
    CREATE INDEX members_by_room ON members (room, user);
    CREATE VIRTUAL TABLE messages_fts USING fts5(
        text, room UNINDEXED, tokenize = 'unicode61 remove_diacritics 2'
    );",
    "CREATE TABLE files (
        id TEXT PRIMARY KEY NOT NULL,
        room TEXT NOT NULL,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        content_type TEXT NOT NULL,
        data BLOB NOT NULL,
        created_ms INTEGER NOT NULL
    );",
    // User names are unique regardless of letter case (they are ASCII).
    // A database that already holds two spellings of one name stops the
    // migration: rename one, then start again.
    "CREATE UNIQUE INDEX users_by_key ON users (lower(name));",
    // The upload quota sums a user's files.
    "CREATE INDEX files_by_owner ON files (owner);",
];

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    readers: Arc<[Mutex<Connection>]>,
    next_reader: Arc<AtomicUsize>,
    /// Set by `checkpoint` when the WAL has grown past [`WAL_RESET_FRAMES`];
    /// the writer then resets it between two batches.
    wal_reset_due: Arc<std::sync::atomic::AtomicBool>,
    wal_reset_frames: i64,
}

/// WAL frames (4 KiB pages) after which the writer checkpoints the log
/// itself so that it can restart.
/// Passive checkpoints copy pages into the database but cannot reset a log
/// that is written to continuously, so under sustained load the WAL file
/// (and its shared-memory index, which counts as resident memory) would
/// grow without bound.
const WAL_RESET_FRAMES: i64 = 16_384;

fn open_conn(path: &Path, full_sync: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        if full_sync { "FULL" } else { "NORMAL" },
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    /// Open (creating if needed) `<dir>/shoal.db` and run migrations.
    /// `full_sync` fsyncs every commit (survives power loss).
    pub fn open(dir: &Path, full_sync: bool) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("shoal.db");
        let conn =
            open_conn(&path, full_sync).with_context(|| format!("opening {}", path.display()))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            conn.execute_batch(m)
                .with_context(|| format!("migration {}", i + 1))?;
            conn.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        // Checkpoints run from a background thread (`checkpoint`), not
        // inside whichever commit crosses the WAL threshold: an inline
        // checkpoint fsyncs the database and stalls the group commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // When the log restarts, cut the file back to 64 MiB.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        let readers = (0..READERS)
            .map(|_| open_conn(&path, full_sync).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()
            .context("opening reader connections")?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            readers: readers.into(),
            next_reader: Arc::new(AtomicUsize::new(0)),
            wal_reset_due: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            wal_reset_frames: WAL_RESET_FRAMES,
        })
    }

    /// Copy committed WAL frames into the database without blocking the
    /// writer (PASSIVE). Call periodically; returns frames checkpointed.
    pub async fn checkpoint(&self) -> Result<i64, StoreError> {
        if self.wal_reset_due.load(Ordering::Relaxed) {
            // The writer is about to checkpoint the whole log itself; a
            // checkpoint here would hold the lock it needs.
            return Ok(0);
        }
        let (log, done) = self
            .read(|c| {
                c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                })
                .map_err(unavailable)
            })
            .await?;
        if log > self.wal_reset_frames {
            self.wal_reset_due.store(true, Ordering::Relaxed);
        }
        Ok(done)
    }

    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    /// Run a read on one of the reader connections.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = self.readers.clone();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            // Prefer an idle reader; block on the round-robin one otherwise.
            for i in 0..readers.len() {
                if let Some(c) = readers[(start + i) % readers.len()].try_lock() {
                    return f(&c);
                }
            }
            f(&readers[start % readers.len()].lock())
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

/// Turn user text into an FTS5 query that can only match terms: every
/// whitespace-separated word becomes a quoted string (quotes doubled), so
/// FTS operators and column filters in the input are inert.
pub fn fts_query(q: &str) -> Option<String> {
    let terms: Vec<String> = q
        .split_whitespace()
        .take(16)
        // Control characters (NUL among them) cannot be part of a term.
        .map(|w| w.replace(|c: char| c.is_control(), ""))
        .filter(|w| !w.is_empty())
        .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

fn stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMsg> {
    Ok(StoredMsg {
        seq: r.get::<_, i64>(0)? as u64,
        from: r.get(1)?,
        ts: r.get::<_, i64>(2)? as u64,
        body: body_from_storage(&r.get::<_, String>(3)?),
    })
}

fn apply_op(tx: &rusqlite::Transaction<'_>, op: &WriteOp) -> rusqlite::Result<OpOutcome> {
    match op {
        WriteOp::Msg(m) => {
            tx.prepare_cached(
                "INSERT INTO messages (room, seq, sender, ts, body, cid) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![&*m.room, m.seq as i64, &*m.from, m.ts as i64, m.body, m.cid])?;
            if let Some(text) = &m.text {
                let id = tx.last_insert_rowid();
                tx.prepare_cached(
                    "INSERT INTO messages_fts (rowid, text, room) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![id, text, &*m.room])?;
            }
            tx.prepare_cached(
                "INSERT INTO rooms (name, last_seq) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
            )?
            .execute(params![&*m.room, m.seq as i64])?;
            if let Some((a, b)) = &m.parties {
                for u in [a, b] {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO members (user, room) VALUES (?1, ?2)",
                    )?
                    .execute(params![&**u, &*m.room])?;
                }
            }
            Ok(OpOutcome::Done)
        }
        WriteOp::Join { room, user, max } => {
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO members (user, room) SELECT ?1, ?2
                     WHERE (SELECT count(*) FROM members WHERE user = ?1) < ?3",
                )?
                .execute(params![
                    &**user,
                    &**room,
                    (*max).min(i64::MAX as u64) as i64
                ])?;
            if n > 0 {
                return Ok(OpOutcome::Done);
            }
            let member = tx
                .prepare_cached("SELECT 1 FROM members WHERE user = ?1 AND room = ?2")?
                .exists(params![&**user, &**room])?;
            Ok(if member {
                OpOutcome::Unchanged
            } else {
                OpOutcome::NotFound
            })
        }
        WriteOp::Leave { room, user } => {
            let n = tx
                .prepare_cached("DELETE FROM members WHERE user = ?1 AND room = ?2")?
                .execute(params![&**user, &**room])?;
            Ok(if n > 0 {
                OpOutcome::Done
            } else {
                OpOutcome::Unchanged
            })
        }
        WriteOp::Mark {
            room,
            user,
            seq,
            state,
        } => {
            tx.prepare_cached("INSERT OR IGNORE INTO members (user, room) VALUES (?1, ?2)")?
                .execute(params![&**user, &**room])?;
            let sql = match state {
                MarkState::Delivered => {
                    "UPDATE members SET delivered = ?3
                     WHERE user = ?1 AND room = ?2 AND delivered < ?3"
                }
                MarkState::Read => {
                    "UPDATE members SET read = ?3, delivered = max(delivered, ?3)
                     WHERE user = ?1 AND room = ?2 AND read < ?3"
                }
            };
            let n = tx
                .prepare_cached(sql)?
                .execute(params![&**user, &**room, *seq as i64])?;
            Ok(if n > 0 {
                OpOutcome::Done
            } else {
                OpOutcome::Unchanged
            })
        }
        WriteOp::Delete { room, seq, user } => {
            let id: Option<(i64, bool)> = tx
                .prepare_cached(
                    "SELECT id, deleted FROM messages WHERE room = ?1 AND seq = ?2 AND sender = ?3",
                )?
                .query_row(params![&**room, *seq as i64, &**user], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            match id {
                None => Ok(OpOutcome::NotFound),
                Some((_, true)) => Ok(OpOutcome::Unchanged),
                Some((id, false)) => {
                    tx.prepare_cached("UPDATE messages SET deleted = 1 WHERE id = ?1")?
                        .execute([id])?;
                    tx.prepare_cached("DELETE FROM messages_fts WHERE rowid = ?1")?
                        .execute([id])?;
                    Ok(OpOutcome::Done)
                }
            }
        }
    }
}

fn retention_pass(c: &mut Connection, policy: &RetentionPolicy) -> rusqlite::Result<u64> {
    let rooms: Vec<(String, i64, i64)> = {
        let mut st = c.prepare("SELECT name, last_seq, floor FROM rooms")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut removed = 0u64;
    // Short transactions, so the group-commit writer is never held up long.
    for chunk in rooms.chunks(256) {
        let tx = c.transaction()?;
        for (room, last, floor) in chunk {
            let Some(rule) = policy(room) else { continue };
            let mut upto = *floor;
            if let Some(n) = rule.max_messages {
                upto = upto.max(last - (n.min(i64::MAX as u64) as i64).min(*last));
            }
            if let Some(min_ts) = rule.min_ts {
                let old: Option<i64> = tx
                    .prepare_cached("SELECT max(seq) FROM messages WHERE room = ?1 AND ts < ?2")?
                    .query_row(params![room, min_ts as i64], |r| r.get(0))?;
                upto = upto.max(old.unwrap_or(0));
            }
            if upto <= *floor {
                continue;
            }
            tx.prepare_cached(
                "DELETE FROM messages_fts WHERE rowid IN
                 (SELECT id FROM messages WHERE room = ?1 AND seq <= ?2)",
            )?
            .execute(params![room, upto])?;
            removed += tx
                .prepare_cached("DELETE FROM messages WHERE room = ?1 AND seq <= ?2")?
                .execute(params![room, upto])? as u64;
            tx.prepare_cached("UPDATE rooms SET floor = ?2 WHERE name = ?1")?
                .execute(params![room, upto])?;
        }
        tx.commit()?;
    }
    Ok(removed)
}

fn expire_files_pass(c: &mut Connection, policy: &RetentionPolicy) -> rusqlite::Result<u64> {
    let rooms: Vec<String> = {
        let mut st = c.prepare("SELECT DISTINCT room FROM files")?;
        let rows = st.query_map([], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut removed = 0u64;
    for room in rooms {
        if let Some(min_ts) = policy(&room).and_then(|r| r.min_ts) {
            removed += c
                .prepare_cached("DELETE FROM files WHERE room = ?1 AND created_ms < ?2")?
                .execute(params![room, min_ts as i64])? as u64;
        }
    }
    Ok(removed)
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
                params![name, hash, crate::clock::now_ms() as i64],
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

    async fn password_hash(&self, name: &str) -> Result<Option<(String, String)>, StoreError> {
        let name = name.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT name, password_hash FROM users WHERE lower(name) = lower(?1)",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn remember_users(&self, names: &[String]) -> Result<(), StoreError> {
        let names = names.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(unavailable)?;
            {
                let mut st = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO users (name, password_hash, created_ms)
                         VALUES (?1, '', ?2)",
                    )
                    .map_err(unavailable)?;
                let now = crate::clock::now_ms() as i64;
                for n in &names {
                    st.execute(params![n, now]).map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn user_exists(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM users WHERE name = ?1")
                .and_then(|mut st| st.exists([name]))
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

    async fn revoked(&self, now: u64) -> Result<Vec<(String, u64)>, StoreError> {
        self.with(move |c| {
            c.execute("DELETE FROM revoked_tokens WHERE exp < ?1", [now as i64])
                .map_err(unavailable)?;
            let mut st = c
                .prepare_cached("SELECT jti, exp FROM revoked_tokens ORDER BY jti")
                .map_err(unavailable)?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<(String, u64)>, _>>()
                .map_err(unavailable)
        })
        .await
    }

    async fn room_head(&self, room: &str, cid_since_ms: u64) -> Result<RoomHead, StoreError> {
        let room = room.to_string();
        self.read(move |c| {
            let last_seq: Option<i64> = c
                .prepare_cached("SELECT last_seq FROM rooms WHERE name = ?1")
                .and_then(|mut s| s.query_row([&room], |r| r.get(0)).optional())
                .map_err(unavailable)?;
            let mut st = c
                .prepare_cached(
                    "SELECT sender, cid, seq, ts FROM messages
                     WHERE room = ?1 AND cid IS NOT NULL AND ts >= ?2
                     ORDER BY seq DESC LIMIT 4096",
                )
                .map_err(unavailable)?;
            let cids = st
                .query_map(params![room, cid_since_ms as i64], |r| {
                    Ok(CidEntry {
                        user: r.get(0)?,
                        cid: r.get(1)?,
                        seq: r.get::<_, i64>(2)? as u64,
                        ts: r.get::<_, i64>(3)? as u64,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)?;
            Ok(RoomHead {
                last_seq: last_seq.unwrap_or(0) as u64,
                cids,
            })
        })
        .await
    }

    async fn write_batch(&self, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>, StoreError> {
        let reset = self.wal_reset_due.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(unavailable)?;
            let out = ops
                .iter()
                .map(|op| apply_op(&tx, op))
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            if reset.swap(false, Ordering::Relaxed) {
                // Here, between two batches, no frame can be appended while
                // the checkpoint runs, so it can copy the whole log (the
                // background ones have done most of it); the next write
                // then restarts the log from its beginning.
                // The pragma reports (busy, log frames, frames copied); the
                // log restarts only if every frame was copied, so anything
                // less (another checkpoint held the lock) is retried after
                // the next batch.
                let done = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok(r.get::<_, i64>(0)? == 0 && r.get::<_, i64>(1)? == r.get::<_, i64>(2)?)
                });
                match done {
                    Ok(true) => {}
                    Ok(false) => reset.store(true, Ordering::Relaxed),
                    Err(e) => {
                        tracing::warn!(error = %e, "WAL checkpoint failed; retrying later");
                        reset.store(true, Ordering::Relaxed);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn replay(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Replay, StoreError> {
        let room = room.to_string();
        self.read(move |c| {
            let floor: Option<i64> = c
                .prepare_cached("SELECT floor FROM rooms WHERE name = ?1")
                .and_then(|mut s| s.query_row([&room], |r| r.get(0)).optional())
                .map_err(unavailable)?;
            let mut st = c
                .prepare_cached(
                    "SELECT seq, sender, ts, body, deleted FROM messages
                     WHERE room = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4",
                )
                .map_err(unavailable)?;
            let entries = st
                .query_map(
                    params![room, after as i64, upto as i64, limit as i64],
                    |r| {
                        let deleted: bool = r.get(4)?;
                        let mut msg = stored(r)?;
                        if deleted {
                            msg.body = shoal_proto::Body::Null;
                        }
                        Ok(ReplayEntry { msg, deleted })
                    },
                )
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)?;
            Ok(Replay {
                floor: floor.unwrap_or(0) as u64,
                entries,
            })
        })
        .await
    }

    async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
        let room = room.to_string();
        let before = before.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT seq, sender, ts, body FROM messages
                     WHERE room = ?1 AND seq < ?2 AND deleted = 0
                     ORDER BY seq DESC LIMIT ?3",
                )
                .map_err(unavailable)?;
            let mut page = st
                .query_map(params![room, before, limit as i64 + 1], stored)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)?;
            let more = page.len() > limit;
            page.truncate(limit);
            Ok((page, more))
        })
        .await
    }

    async fn search(
        &self,
        room: &str,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredMsg>, StoreError> {
        let Some(q) = fts_query(query) else {
            return Ok(vec![]);
        };
        let room = room.to_string();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT m.seq, m.sender, m.ts, m.body FROM messages_fts f
                     JOIN messages m ON m.id = f.rowid
                     WHERE messages_fts MATCH ?1 AND f.room = ?2 AND m.deleted = 0
                     ORDER BY bm25(messages_fts), m.seq DESC LIMIT ?3 OFFSET ?4",
                )
                .map_err(unavailable)?;
            st.query_map(params![q, room, limit as i64, offset as i64], stored)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(unavailable)
        })
        .await
    }

    async fn receipts(&self, room: &str) -> Result<Vec<Receipt>, StoreError> {
        let room = room.to_string();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT user, delivered, read FROM members
                     WHERE room = ?1 AND (delivered > 0 OR read > 0) ORDER BY user",
                )
                .map_err(unavailable)?;
            st.query_map([room], |r| {
                Ok(Receipt {
                    user: r.get(0)?,
                    delivered: r.get::<_, i64>(1)? as u64,
                    read: r.get::<_, i64>(2)? as u64,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(unavailable)
        })
        .await
    }

    async fn user_rooms(&self, user: &str) -> Result<Vec<RoomSummary>, StoreError> {
        let user = user.to_string();
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT m.room, coalesce(r.last_seq, 0), m.delivered, m.read,
                        (SELECT count(*) FROM messages x WHERE x.room = m.room
                          AND x.seq > m.read AND x.deleted = 0 AND x.sender <> m.user)
                     FROM members m LEFT JOIN rooms r ON r.name = m.room
                     WHERE m.user = ?1 ORDER BY m.room",
                )
                .map_err(unavailable)?;
            st.query_map([user], |r| {
                Ok(RoomSummary {
                    room: r.get(0)?,
                    last_seq: r.get::<_, i64>(1)? as u64,
                    delivered: r.get::<_, i64>(2)? as u64,
                    read: r.get::<_, i64>(3)? as u64,
                    unread: r.get::<_, i64>(4)? as u64,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(unavailable)
        })
        .await
    }

    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        let (room, user) = (room.to_string(), user.to_string());
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM members WHERE user = ?1 AND room = ?2")
                .and_then(|mut s| s.exists(params![user, room]))
                .map_err(unavailable)
        })
        .await
    }

    async fn put_file(&self, f: FileRecord) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO files (id, room, owner, name, content_type, data, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    f.id,
                    f.room,
                    f.owner,
                    f.name,
                    f.content_type,
                    f.data,
                    f.created_ms as i64
                ],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn file_usage(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = owner.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT coalesce(sum(length(data)), 0) FROM files WHERE owner = ?1",
                [owner],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(unavailable)
        })
        .await
    }

    async fn expire_files(&self, policy: RetentionPolicy) -> Result<u64, StoreError> {
        self.with(move |c| expire_files_pass(c, &policy).map_err(unavailable))
            .await
    }

    async fn get_file(&self, id: &str) -> Result<Option<FileRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT id, room, owner, name, content_type, data, created_ms FROM files WHERE id = ?1",
                [id],
                |r| {
                    Ok(FileRecord {
                        id: r.get(0)?,
                        room: r.get(1)?,
                        owner: r.get(2)?,
                        name: r.get(3)?,
                        content_type: r.get(4)?,
                        data: r.get(5)?,
                        created_ms: r.get::<_, i64>(6)? as u64,
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn apply_retention(&self, policy: RetentionPolicy) -> Result<u64, StoreError> {
        self.with(move |c| retention_pass(c, &policy).map_err(unavailable))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::msg;
    use super::*;

    #[tokio::test]
    async fn users_and_revocations_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(dir.path(), false).expect("open");
        super::super::conformance::users(&s).await;
        drop(s);
        let s = SqliteStore::open(dir.path(), false).expect("reopen");
        assert_eq!(
            s.password_hash("alice").await.expect("q"),
            Some(("alice".into(), "h1".into()))
        );
        assert_eq!(
            s.revoked(50).await.expect("q"),
            vec![("j1".to_string(), 100)]
        );
    }

    #[tokio::test]
    async fn conformance() {
        for check in 0..2 {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = SqliteStore::open(dir.path(), false).expect("open");
            match check {
                0 => super::super::conformance::messages(&s).await,
                _ => super::super::conformance::files(&s).await,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_stays_bounded_under_continuous_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteStore::open(dir.path(), false).expect("open");
        s.wal_reset_frames = 64;
        let wal = dir.path().join("shoal.db-wal");
        // Checkpoints run concurrently with a writer that never pauses, as
        // in production; only the writer-side restart can bound the log.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cp, cp_stop) = (s.clone(), stop.clone());
        let checkpoints = tokio::spawn(async move {
            while !cp_stop.load(Ordering::Relaxed) {
                let _ = cp.checkpoint().await;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        });
        let mut max_wal = 0;
        for i in 0..4000u64 {
            s.write_batch(vec![msg("w", i + 1, "alice", "some searchable words")])
                .await
                .expect("batch");
            if i % 50 == 0 {
                max_wal = max_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
            }
        }
        stop.store(true, Ordering::Relaxed);
        checkpoints.await.expect("checkpoints");
        // The file keeps its high-water mark (journal_size_limit is 64 MiB),
        // and on a starved CPU the writer may reach its reset a little late,
        // so peaks of a few MiB happen; without the reset this run grows the
        // log to ~145 MB.
        assert!(max_wal < 32 * 1024 * 1024, "WAL grew to {max_wal} bytes");
        assert_eq!(s.room_head("w", 0).await.expect("head").last_seq, 4000);
    }

    #[test]
    fn fts_query_quotes_everything() {
        assert_eq!(fts_query("  "), None);
        assert_eq!(fts_query("a \"b"), Some("\"a\" \"\"\"b\"".into()));
        assert_eq!(fts_query("a\u{0}b \u{1}"), Some("\"ab\"".into()));
    }
}
