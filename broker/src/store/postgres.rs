//! PostgreSQL [`Store`]: the shared database of a cluster
//! (`--store postgres --postgres-url ...`). Same behaviour as the embedded
//! SQLite store (the same conformance checks run against both), with
//! full-text search on a `tsvector` column and a GIN index.
//!
//! Search uses the `simple` text configuration (no stemming, no stop
//! words), so every language is searched alike, as in the embedded store.
//!
//! A run of messages in a batch is one multi-row insert (arrays unnested
//! by the server). Message inserts are idempotent on `(room, seq)`, so the nodes of a
//! cluster can archive the same message twice (a retry after a lost reply,
//! a catch-up sweep) without duplicating history. Migrations run at start
//! in one transaction each, recorded in `shoal_schema`, under an advisory
//! lock so nodes starting together do not race.

use async_trait::async_trait;
use deadpool_postgres::{Pool, Runtime};
use shoal_proto::{
    codec::{body_from_storage, meta_from_storage, meta_to_storage},
    entry::{ModAction, Role, Version},
    EventKind, MarkState, Meta, Receipt, StoredMsg,
};
use tokio_postgres::{types::ToSql, NoTls, Row};

use super::{
    audit_kinds, AclRecord, AdminEntry, CidEntry, FileRecord, NewMsg, OpOutcome, PageParts, Replay,
    ReplayEntry, RetentionPolicy, RoomHead, RoomSummary, Store, StoreError, TargetInfo, UserRecord,
    WriteOp,
};

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE revoked_tokens (
        jti TEXT PRIMARY KEY,
        exp BIGINT NOT NULL
    );
    CREATE TABLE rooms (
        name TEXT PRIMARY KEY,
        last_seq BIGINT NOT NULL,
        floor BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE messages (
        room TEXT NOT NULL,
        seq BIGINT NOT NULL,
        sender TEXT NOT NULL,
        ts BIGINT NOT NULL,
        body TEXT NOT NULL,
        cid TEXT,
        deleted BOOLEAN NOT NULL DEFAULT false,
        search TSVECTOR,
        PRIMARY KEY (room, seq)
    );
    CREATE INDEX messages_search ON messages USING GIN (search);
    CREATE TABLE members (
        usr TEXT NOT NULL,
        room TEXT NOT NULL,
        delivered BIGINT NOT NULL DEFAULT 0,
        read BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (usr, room)
    );
    CREATE INDEX members_by_room ON members (room, usr);
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        room TEXT NOT NULL,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        content_type TEXT NOT NULL,
        data BYTEA NOT NULL,
        created_ms BIGINT NOT NULL
    );",
    // User names are unique regardless of letter case (they are ASCII).
    // A database that already holds two spellings of one name stops the
    // migration: rename one, then start again.
    "CREATE UNIQUE INDEX users_by_key ON users (lower(name));",
    // The upload quota sums a user's files.
    "CREATE INDEX files_by_owner ON files (owner);",
    // The room log's events (shoal_proto::entry); see the SQLite store's
    // migration of the same shape.
    "ALTER TABLE messages ADD COLUMN kind TEXT,
        ADD COLUMN target BIGINT,
        ADD COLUMN reply_to BIGINT,
        ADD COLUMN meta TEXT,
        ADD COLUMN edited_ts BIGINT;
    CREATE INDEX messages_by_reply ON messages (room, reply_to) WHERE reply_to IS NOT NULL;
    CREATE TABLE edits (
        id BIGSERIAL PRIMARY KEY,
        room TEXT NOT NULL,
        seq BIGINT NOT NULL,
        ts BIGINT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX edits_by_msg ON edits (room, seq);
    CREATE TABLE reactions (
        room TEXT NOT NULL,
        seq BIGINT NOT NULL,
        usr TEXT NOT NULL,
        emoji TEXT NOT NULL,
        PRIMARY KEY (room, seq, usr, emoji)
    );
    CREATE TABLE mentions (
        usr TEXT NOT NULL,
        room TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (usr, room, seq)
    );",
    // Created rooms' access rules; see the SQLite store's migration.
    "CREATE TABLE room_acl (
        name TEXT PRIMARY KEY,
        private BOOLEAN NOT NULL,
        owner TEXT NOT NULL,
        topic TEXT NOT NULL
    );
    CREATE TABLE room_roles (
        room TEXT NOT NULL,
        usr TEXT NOT NULL,
        role TEXT NOT NULL,
        PRIMARY KEY (room, usr)
    );
    CREATE TABLE room_sanctions (
        room TEXT NOT NULL,
        usr TEXT NOT NULL,
        kind TEXT NOT NULL,
        until_ms BIGINT,
        PRIMARY KEY (room, usr, kind)
    );
    CREATE INDEX messages_by_kind ON messages (room, kind, seq) WHERE kind IS NOT NULL;",
    // A created room's display name.
    "ALTER TABLE room_acl ADD COLUMN title TEXT NOT NULL DEFAULT '';",
    // Operators' actions (the admin console).
    "CREATE TABLE admin_audit (
        id BIGSERIAL PRIMARY KEY,
        ts BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    );",
];

/// Columns of a history row: `stored`'s four, then edited_ts, meta.
const PAGE_COLUMNS: &str = "seq, sender, ts, body, edited_ts, meta";

fn page_row(r: &Row) -> (StoredMsg, Meta) {
    let mut m = stored(r);
    m.edited_ts = r.get::<_, Option<i64>>(4).map(|t| t as u64);
    (
        m,
        meta_from_storage(r.get::<_, Option<&str>>(5), None, None),
    )
}

/// PostgreSQL-backed [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Text for `to_tsvector`/`plainto_tsquery`: PostgreSQL refuses NUL in
/// text, so control characters become spaces (they separate words
/// anyway) rather than failing the batch a message travels in.
fn searchable(text: &str) -> String {
    text.replace(|c: char| c.is_control(), " ")
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn stored(r: &Row) -> StoredMsg {
    StoredMsg::new(
        r.get::<_, i64>(0) as u64,
        r.get(1),
        r.get::<_, i64>(2) as u64,
        body_from_storage(&r.get::<_, String>(3)),
    )
}

/// Apply an event entry to its target (rules in `shoal_proto::entry`).
async fn apply_event(
    tx: &deadpool_postgres::Transaction<'_>,
    m: &NewMsg,
    kind: EventKind,
    target: u64,
) -> Result<(), tokio_postgres::Error> {
    let (room, target, from) = (&*m.room, i(target), &*m.from);
    let text = m.text.as_deref().unwrap_or("");
    match kind {
        EventKind::Edit => {
            let st = tx
                .prepare_cached(
                    "SELECT body, coalesce(edited_ts, ts) FROM messages
                     WHERE room = $1 AND seq = $2 AND sender = $3 AND NOT deleted AND kind IS NULL
                     FOR UPDATE",
                )
                .await?;
            let Some(row) = tx.query_opt(&st, &[&room, &target, &from]).await? else {
                return Ok(());
            };
            let (old, old_ts): (String, i64) = (row.get(0), row.get(1));
            let st = tx
                .prepare_cached("INSERT INTO edits (room, seq, ts, body) VALUES ($1, $2, $3, $4)")
                .await?;
            tx.execute(&st, &[&room, &target, &old_ts, &old]).await?;
            let st = tx
                .prepare_cached(
                    "UPDATE messages SET body = $3, edited_ts = $4, search = to_tsvector('simple', $5)
                     WHERE room = $1 AND seq = $2",
                )
                .await?;
            tx.execute(&st, &[&room, &target, &m.body, &i(m.ts), &searchable(text)])
                .await?;
        }
        EventKind::React => {
            let st = tx
                .prepare_cached(
                    "INSERT INTO reactions (room, seq, usr, emoji)
                     SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM messages
                       WHERE room = $1 AND seq = $2 AND NOT deleted AND kind IS NULL)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            tx.execute(&st, &[&room, &target, &from, &text]).await?;
        }
        EventKind::Unreact => {
            let st = tx
                .prepare_cached(
                    "DELETE FROM reactions WHERE room = $1 AND seq = $2 AND usr = $3 AND emoji = $4",
                )
                .await?;
            tx.execute(&st, &[&room, &target, &from, &text]).await?;
        }
        EventKind::Delete => {
            // By its sender, or by the room's owner or an admin.
            let st = tx
                .prepare_cached(
                    "UPDATE messages SET deleted = true, search = NULL
                     WHERE room = $1 AND seq = $2 AND kind IS NULL AND (sender = $3 OR $3 = 'server'
                       OR $3 IN (SELECT owner FROM room_acl WHERE name = $1)
                       OR $3 IN (SELECT usr FROM room_roles WHERE room = $1 AND role = 'admin'))",
                )
                .await?;
            tx.execute(&st, &[&room, &target, &from]).await?;
        }
        // Moderation has no target message: see `apply_moderation`.
        _ => {}
    }
    Ok(())
}

/// Apply a moderation entry to the room's access rules, as
/// `hub::acl::Acl::apply` does in memory.
async fn apply_moderation(
    tx: &deadpool_postgres::Transaction<'_>,
    m: &NewMsg,
    kind: EventKind,
) -> Result<(), tokio_postgres::Error> {
    let a = ModAction::from_body(&body_from_storage(&m.body));
    let (room, from) = (&*m.room, &*m.from);
    let owner: Option<String> = tx
        .query_opt("SELECT owner FROM room_acl WHERE name = $1", &[&room])
        .await?
        .map(|r| r.get(0));
    let Some(user) = a.user.as_deref() else {
        match kind {
            EventKind::Create if owner.is_none() => {
                tx.execute(
                    "INSERT INTO room_acl (name, private, owner, topic, title)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[
                        &room,
                        &a.private.unwrap_or(false),
                        &from,
                        &a.topic.as_deref().unwrap_or(""),
                        &a.title.as_deref().unwrap_or(""),
                    ],
                )
                .await?;
                tx.execute(
                    "INSERT INTO members (usr, room) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&from, &room],
                )
                .await?;
            }
            EventKind::Topic => {
                tx.execute(
                    "UPDATE room_acl SET topic = coalesce($2, topic), title = coalesce($3, title)
                     WHERE name = $1",
                    &[&room, &a.topic, &a.title],
                )
                .await?;
            }
            _ => {}
        }
        return Ok(());
    };
    let is_owner = owner.as_deref() == Some(user);
    let until = a.until.map(i);
    match kind {
        EventKind::Invite if !is_owner => {
            tx.execute(
                "INSERT INTO room_roles (room, usr, role) VALUES ($1, $2, 'member') ON CONFLICT DO NOTHING",
                &[&room, &user],
            )
            .await?;
            // Listed in the invitee's rooms (`GET /api/rooms`).
            tx.execute(
                "INSERT INTO members (usr, room) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&user, &room],
            )
            .await?;
            tx.execute(
                "DELETE FROM room_sanctions WHERE room = $1 AND usr = $2 AND kind = 'ban'",
                &[&room, &user],
            )
            .await?;
        }
        EventKind::Kick | EventKind::Ban if !is_owner => {
            tx.execute(
                "DELETE FROM room_roles WHERE room = $1 AND usr = $2",
                &[&room, &user],
            )
            .await?;
            tx.execute(
                "DELETE FROM members WHERE room = $1 AND usr = $2",
                &[&room, &user],
            )
            .await?;
            if kind == EventKind::Ban {
                tx.execute(
                    "INSERT INTO room_sanctions (room, usr, kind, until_ms) VALUES ($1, $2, 'ban', $3)
                     ON CONFLICT (room, usr, kind) DO UPDATE SET until_ms = excluded.until_ms",
                    &[&room, &user, &until],
                )
                .await?;
            }
        }
        EventKind::Mute if !is_owner => {
            tx.execute(
                "INSERT INTO room_sanctions (room, usr, kind, until_ms) VALUES ($1, $2, 'mute', $3)
                 ON CONFLICT (room, usr, kind) DO UPDATE SET until_ms = excluded.until_ms",
                &[&room, &user, &until],
            )
            .await?;
        }
        EventKind::Unban | EventKind::Unmute => {
            let k = if kind == EventKind::Unban {
                "ban"
            } else {
                "mute"
            };
            tx.execute(
                "DELETE FROM room_sanctions WHERE room = $1 AND usr = $2 AND kind = $3",
                &[&room, &user, &k],
            )
            .await?;
        }
        EventKind::Role if !is_owner => {
            if let Some(r) = a.role.filter(|r| *r != Role::Owner) {
                tx.execute(
                    "INSERT INTO room_roles (room, usr, role) VALUES ($1, $2, $3)
                     ON CONFLICT (room, usr) DO UPDATE SET role = excluded.role",
                    &[&room, &user, &r.name()],
                )
                .await?;
            }
        }
        EventKind::Owner if owner.is_some() && !is_owner => {
            if let Some(old) = &owner {
                tx.execute(
                    "INSERT INTO room_roles (room, usr, role) VALUES ($1, $2, 'admin')
                     ON CONFLICT (room, usr) DO UPDATE SET role = 'admin'",
                    &[&room, &old],
                )
                .await?;
            }
            tx.execute(
                "DELETE FROM room_roles WHERE room = $1 AND usr = $2",
                &[&room, &user],
            )
            .await?;
            tx.execute(
                "DELETE FROM room_sanctions WHERE room = $1 AND usr = $2",
                &[&room, &user],
            )
            .await?;
            tx.execute(
                "UPDATE room_acl SET owner = $2 WHERE name = $1",
                &[&room, &user],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// History's view of a page of rows: reactions (with `viewer`'s) and
/// thread summaries of the seqs in it.
async fn assemble(
    c: &deadpool_postgres::Client,
    room: &str,
    msgs: Vec<(StoredMsg, Meta)>,
    viewer: &str,
) -> Result<Vec<StoredMsg>, tokio_postgres::Error> {
    if msgs.is_empty() {
        return Ok(vec![]);
    }
    let seqs: Vec<i64> = msgs.iter().map(|m| i(m.0.seq)).collect();
    let st = c
        .prepare_cached(
            "SELECT seq, emoji, count(*) AS n, bool_or(usr = $3) FROM reactions
             WHERE room = $1 AND seq = ANY($2)
             GROUP BY seq, emoji ORDER BY seq, n DESC, emoji",
        )
        .await?;
    let reactions = c
        .query(&st, &[&room, &seqs, &viewer])
        .await?
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0) as u64,
                r.get(1),
                r.get::<_, i64>(2) as u64,
                r.get(3),
            )
        })
        .collect();
    let st = c
        .prepare_cached(
            "SELECT reply_to, count(*), max(seq), max(ts) FROM messages
             WHERE room = $1 AND reply_to = ANY($2) AND NOT deleted AND kind IS NULL
             GROUP BY reply_to",
        )
        .await?;
    let threads = c
        .query(&st, &[&room, &seqs])
        .await?
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0) as u64,
                r.get::<_, i64>(1) as u64,
                r.get::<_, i64>(2) as u64,
                r.get::<_, i64>(3) as u64,
            )
        })
        .collect();
    Ok(PageParts {
        msgs,
        reactions,
        threads,
    }
    .assemble())
}

impl PgStore {
    /// Connect (a pool of `max_connections`) and run migrations.
    pub async fn connect(url: &str, max_connections: usize) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut cfg = deadpool_postgres::Config::new();
        cfg.url = Some(url.to_string());
        cfg.pool = Some(deadpool_postgres::PoolConfig::new(max_connections.max(1)));
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1), NoTls)
            .context("postgres pool")?;
        let store = PgStore { pool };
        store.migrate().await.context("postgres migrations")?;
        Ok(store)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        // One node migrates at a time; the lock ends with the transaction.
        tx.execute("SELECT pg_advisory_xact_lock(7262012)", &[])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS shoal_schema (version INT NOT NULL)")
            .await?;
        let version: i64 = tx
            .query_one("SELECT count(*) FROM shoal_schema", &[])
            .await?
            .get(0);
        for (n, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(m).await?;
            tx.execute("INSERT INTO shoal_schema VALUES ($1)", &[&(n as i32 + 1)])
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A page of messages (the replies to `reply_to`, if set) below
    /// `before`, newest first, in their current state for `viewer`.
    async fn page(
        &self,
        room: &str,
        reply_to: Option<u64>,
        before: Option<u64>,
        limit: usize,
        viewer: &str,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
        // Two statements rather than `reply_to IS NOT DISTINCT FROM $4`,
        // so that a thread uses its index.
        let which = if reply_to.is_some() {
            "reply_to = $4"
        } else {
            "$4::BIGINT IS NULL"
        };
        let rows = self
            .query(
                &format!(
                    "SELECT {PAGE_COLUMNS} FROM messages
                     WHERE room = $1 AND {which} AND seq < $2 AND NOT deleted AND kind IS NULL
                     ORDER BY seq DESC LIMIT $3"
                ),
                &[
                    &room,
                    &i(before.unwrap_or(u64::MAX)),
                    &(limit as i64 + 1),
                    &reply_to.map(i),
                ],
            )
            .await?;
        let mut page: Vec<_> = rows.iter().map(page_row).collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let c = self.client().await?;
        let page = assemble(&c, room, page, viewer)
            .await
            .map_err(unavailable)?;
        Ok((page, more))
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(unavailable)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let c = self.client().await?;
        let st = c.prepare_cached(sql).await.map_err(unavailable)?;
        c.query(&st, params).await.map_err(unavailable)
    }
}

async fn apply_op(
    tx: &deadpool_postgres::Transaction<'_>,
    op: &WriteOp,
) -> Result<OpOutcome, tokio_postgres::Error> {
    let changed = |n: u64| {
        if n > 0 {
            OpOutcome::Done
        } else {
            OpOutcome::Unchanged
        }
    };
    match op {
        WriteOp::Msg(m) => {
            let st = tx
                .prepare_cached(
                    "INSERT INTO messages (room, seq, sender, ts, body, cid, search, kind, target, reply_to, meta)
                     VALUES ($1, $2, $3, $4, $5, $6, to_tsvector('simple', $7), $8, $9, $10, $11)
                     ON CONFLICT (room, seq) DO NOTHING",
                )
                .await?;
            let event = m.meta.kind.zip(m.meta.target);
            let search = if m.meta.kind.is_some() {
                String::new()
            } else {
                searchable(m.text.as_deref().unwrap_or(""))
            };
            let inserted = tx
                .execute(
                    &st,
                    &[
                        &&*m.room,
                        &i(m.seq),
                        &&*m.from,
                        &i(m.ts),
                        &m.body,
                        &m.cid,
                        &search,
                        &m.meta.kind.map(EventKind::name),
                        &m.meta.target.map(i),
                        &m.meta.reply_to.as_ref().map(|r| i(r.seq)),
                        &meta_to_storage(&m.meta),
                    ],
                )
                .await?
                > 0;
            // The archiver may copy an entry twice: its effects only once.
            if inserted {
                match (m.meta.kind, event) {
                    (Some(kind), _) if kind.is_moderation() => {
                        apply_moderation(tx, m, kind).await?
                    }
                    (_, Some((kind, target))) => apply_event(tx, m, kind, target).await?,
                    _ => {}
                }
                let st = tx
                    .prepare_cached(
                        "INSERT INTO mentions (usr, room, seq) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                    )
                    .await?;
                for u in &m.meta.mentions {
                    tx.execute(&st, &[u, &&*m.room, &i(m.seq)]).await?;
                }
            }
            let st = tx
                .prepare_cached(
                    "INSERT INTO rooms (name, last_seq) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET last_seq = GREATEST(rooms.last_seq, excluded.last_seq)",
                )
                .await?;
            tx.execute(&st, &[&&*m.room, &i(m.seq)]).await?;
            if let Some((a, b)) = &m.parties {
                let st = tx
                    .prepare_cached(
                        "INSERT INTO members (usr, room) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    )
                    .await?;
                for u in [a, b] {
                    tx.execute(&st, &[&&**u, &&*m.room]).await?;
                }
            }
            Ok(OpOutcome::Done)
        }
        WriteOp::Join { room, user, max } => {
            let st = tx
                .prepare_cached(
                    "INSERT INTO members (usr, room) SELECT $1, $2
                     WHERE (SELECT count(*) FROM members WHERE usr = $1) < $3
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            if tx.execute(&st, &[&&**user, &&**room, &i(*max)]).await? > 0 {
                return Ok(OpOutcome::Done);
            }
            let st = tx
                .prepare_cached("SELECT 1 FROM members WHERE usr = $1 AND room = $2")
                .await?;
            Ok(
                if tx.query_opt(&st, &[&&**user, &&**room]).await?.is_some() {
                    OpOutcome::Unchanged
                } else {
                    OpOutcome::NotFound
                },
            )
        }
        WriteOp::Leave { room, user } => {
            let st = tx
                .prepare_cached("DELETE FROM members WHERE usr = $1 AND room = $2")
                .await?;
            Ok(changed(tx.execute(&st, &[&&**user, &&**room]).await?))
        }
        WriteOp::Mark {
            room,
            user,
            seq,
            state,
        } => {
            let st = tx
                .prepare_cached(
                    "INSERT INTO members (usr, room) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .await?;
            tx.execute(&st, &[&&**user, &&**room]).await?;
            let sql = match state {
                MarkState::Delivered => {
                    "UPDATE members SET delivered = $3
                     WHERE usr = $1 AND room = $2 AND delivered < $3"
                }
                MarkState::Read => {
                    "UPDATE members SET read = $3, delivered = GREATEST(delivered, $3)
                     WHERE usr = $1 AND room = $2 AND read < $3"
                }
            };
            let st = tx.prepare_cached(sql).await?;
            Ok(changed(
                tx.execute(&st, &[&&**user, &&**room, &i(*seq)]).await?,
            ))
        }
    }
}

/// Insert plain messages (all `WriteOp::Msg` with empty metadata) with
/// one statement per table:
/// arrays unnested server-side, idempotent on `(room, seq)`.
async fn insert_messages(
    tx: &deadpool_postgres::Transaction<'_>,
    ops: &[WriteOp],
) -> Result<(), tokio_postgres::Error> {
    let msgs: Vec<&super::NewMsg> = ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::Msg(m) => Some(m),
            _ => None,
        })
        .collect();
    let rooms: Vec<&str> = msgs.iter().map(|m| &*m.room).collect();
    let seqs: Vec<i64> = msgs.iter().map(|m| i(m.seq)).collect();
    let senders: Vec<&str> = msgs.iter().map(|m| &*m.from).collect();
    let ts: Vec<i64> = msgs.iter().map(|m| i(m.ts)).collect();
    let bodies: Vec<&str> = msgs.iter().map(|m| m.body.as_str()).collect();
    let cids: Vec<Option<&str>> = msgs.iter().map(|m| m.cid.as_deref()).collect();
    let texts: Vec<String> = msgs
        .iter()
        .map(|m| searchable(m.text.as_deref().unwrap_or("")))
        .collect();
    let st = tx
        .prepare_cached(
            "INSERT INTO messages (room, seq, sender, ts, body, cid, search)
             SELECT r, s, f, t, b, c, to_tsvector('simple', x)
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[],
                         $6::text[], $7::text[]) AS u(r, s, f, t, b, c, x)
             ON CONFLICT (room, seq) DO NOTHING",
        )
        .await?;
    tx.execute(&st, &[&rooms, &seqs, &senders, &ts, &bodies, &cids, &texts])
        .await?;
    let st = tx
        .prepare_cached(
            "INSERT INTO rooms (name, last_seq)
             SELECT r, max(s) FROM UNNEST($1::text[], $2::bigint[]) AS u(r, s) GROUP BY r
             ON CONFLICT (name) DO UPDATE SET last_seq = GREATEST(rooms.last_seq, excluded.last_seq)",
        )
        .await?;
    tx.execute(&st, &[&rooms, &seqs]).await?;
    let (mut users, mut user_rooms): (Vec<&str>, Vec<&str>) = (vec![], vec![]);
    for m in &msgs {
        if let Some((a, b)) = &m.parties {
            for u in [a, b] {
                users.push(u);
                user_rooms.push(&m.room);
            }
        }
    }
    if !users.is_empty() {
        let st = tx
            .prepare_cached(
                "INSERT INTO members (usr, room)
                 SELECT DISTINCT u, r FROM UNNEST($1::text[], $2::text[]) AS x(u, r)
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&st, &[&users, &user_rooms]).await?;
    }
    Ok(())
}

#[async_trait]
impl Store for PgStore {
    async fn create_user(&self, name: &str, password_hash: &str) -> Result<(), StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO users (name, password_hash, created_ms) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&name, &password_hash, &i(crate::clock::now_ms())],
            )
            .await
            .map_err(unavailable)?;
        if n == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn password_hash(&self, name: &str) -> Result<Option<(String, String)>, StoreError> {
        let rows = self
            .query(
                "SELECT name, password_hash FROM users WHERE lower(name) = lower($1)",
                &[&name],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    async fn remember_users(&self, names: &[String]) -> Result<(), StoreError> {
        self.query(
            "INSERT INTO users (name, password_hash, created_ms)
             SELECT n, '', $2 FROM UNNEST($1::text[]) AS u(n)
             ON CONFLICT DO NOTHING",
            &[&names, &i(crate::clock::now_ms())],
        )
        .await?;
        Ok(())
    }

    async fn user_exists(&self, name: &str) -> Result<bool, StoreError> {
        let rows = self
            .query("SELECT 1 FROM users WHERE name = $1", &[&name])
            .await?;
        Ok(!rows.is_empty())
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows = self
            .query("SELECT name, created_ms FROM users ORDER BY name", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| UserRecord {
                name: r.get(0),
                created_ms: r.get::<_, i64>(1) as u64,
            })
            .collect())
    }

    async fn unrevoke(&self, jti: &str) -> Result<(), StoreError> {
        self.query("DELETE FROM revoked_tokens WHERE jti = $1", &[&jti])
            .await
            .map(|_| ())
    }

    async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError> {
        self.query(
            "INSERT INTO revoked_tokens (jti, exp) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&jti, &i(exp)],
        )
        .await
        .map(|_| ())
    }

    async fn revoked(&self, now: u64) -> Result<Vec<(String, u64)>, StoreError> {
        self.query("DELETE FROM revoked_tokens WHERE exp < $1", &[&i(now)])
            .await?;
        let rows = self
            .query("SELECT jti, exp FROM revoked_tokens ORDER BY jti", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn room_head(&self, room: &str, cid_since_ms: u64) -> Result<RoomHead, StoreError> {
        let last = self
            .query("SELECT last_seq FROM rooms WHERE name = $1", &[&room])
            .await?;
        let cids = self
            .query(
                "SELECT sender, cid, seq, ts FROM messages
                 WHERE room = $1 AND cid IS NOT NULL AND ts >= $2
                 ORDER BY seq DESC LIMIT 4096",
                &[&room, &i(cid_since_ms)],
            )
            .await?;
        Ok(RoomHead {
            last_seq: last.first().map_or(0, |r| r.get::<_, i64>(0) as u64),
            cids: cids
                .iter()
                .map(|r| CidEntry {
                    user: r.get(0),
                    cid: r.get(1),
                    seq: r.get::<_, i64>(2) as u64,
                    ts: r.get::<_, i64>(3) as u64,
                })
                .collect(),
        })
    }

    async fn write_batch(&self, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(unavailable)?;
        let mut out = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            // A run of messages (the archiver's batches are all messages)
            // goes in as one multi-row insert; other ops one by one, in
            // order.
            let run = ops[i..]
                .iter()
                .take_while(|op| matches!(op, WriteOp::Msg(m) if m.meta.is_empty()))
                .count();
            if run > 1 {
                insert_messages(&tx, &ops[i..i + run])
                    .await
                    .map_err(unavailable)?;
                out.extend(std::iter::repeat_n(OpOutcome::Done, run));
                i += run;
            } else {
                out.push(apply_op(&tx, &ops[i]).await.map_err(unavailable)?);
                i += 1;
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(out)
    }

    async fn replay(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Replay, StoreError> {
        let floor = self
            .query("SELECT floor FROM rooms WHERE name = $1", &[&room])
            .await?;
        let rows = self
            .query(
                "SELECT seq, sender, ts, body, deleted, kind, target, meta FROM messages
                 WHERE room = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
                &[&room, &i(after), &i(upto), &(limit as i64)],
            )
            .await?;
        Ok(Replay {
            floor: floor.first().map_or(0, |r| r.get::<_, i64>(0) as u64),
            entries: rows
                .iter()
                .map(|r| {
                    let deleted: bool = r.get(4);
                    let mut msg = stored(r);
                    if deleted {
                        msg.body = shoal_proto::Body::Null;
                    }
                    let meta = meta_from_storage(
                        r.get::<_, Option<&str>>(7),
                        r.get::<_, Option<&str>>(5),
                        r.get::<_, Option<i64>>(6).map(|t| t as u64),
                    );
                    ReplayEntry { msg, deleted, meta }
                })
                .collect(),
        })
    }

    async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
        viewer: &str,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
        self.page(room, None, before, limit, viewer).await
    }

    async fn thread(
        &self,
        room: &str,
        seq: u64,
        before: Option<u64>,
        limit: usize,
        viewer: &str,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError> {
        self.page(room, Some(seq), before, limit, viewer).await
    }

    async fn admin_record(&self, e: AdminEntry) -> Result<(), StoreError> {
        self.query(
            "INSERT INTO admin_audit (ts, actor, action, detail) VALUES ($1, $2, $3, $4)",
            &[&i(e.ts), &e.actor, &e.action, &e.detail],
        )
        .await
        .map(|_| ())
    }

    async fn admin_audit(&self, limit: usize) -> Result<Vec<AdminEntry>, StoreError> {
        let rows = self
            .query(
                "SELECT ts, actor, action, detail FROM admin_audit ORDER BY id DESC LIMIT $1",
                &[&(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AdminEntry {
                ts: r.get::<_, i64>(0) as u64,
                actor: r.get(1),
                action: r.get(2),
                detail: r.get(3),
            })
            .collect())
    }

    async fn room_acl(&self, room: &str) -> Result<Option<AclRecord>, StoreError> {
        let head = self
            .query(
                "SELECT private, owner, topic, title FROM room_acl WHERE name = $1",
                &[&room],
            )
            .await?;
        let Some(h) = head.first() else {
            return Ok(None);
        };
        let roles = self
            .query("SELECT usr, role FROM room_roles WHERE room = $1", &[&room])
            .await?
            .iter()
            .filter_map(|r| Some((r.get::<_, String>(0), Role::parse(r.get::<_, &str>(1))?)))
            .collect();
        let sanctions = self
            .query(
                "SELECT usr, kind, until_ms FROM room_sanctions WHERE room = $1",
                &[&room],
            )
            .await?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get::<_, Option<i64>>(2).map(|u| u as u64),
                )
            })
            .collect();
        Ok(Some(AclRecord::new(
            h.get(0),
            h.get(1),
            (h.get(2), h.get(3)),
            roles,
            sanctions,
        )))
    }

    async fn audit(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ReplayEntry>, StoreError> {
        let rows = self
            .query(
                &format!(
                    "SELECT seq, sender, ts, body, kind, target FROM messages
                     WHERE room = $1 AND seq < $2 AND kind IN ({})
                     ORDER BY seq DESC LIMIT $3",
                    audit_kinds()
                ),
                &[&room, &i(before.unwrap_or(u64::MAX)), &(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ReplayEntry {
                msg: stored(r),
                deleted: false,
                meta: meta_from_storage(
                    None,
                    r.get::<_, Option<&str>>(4),
                    r.get::<_, Option<i64>>(5).map(|t| t as u64),
                ),
            })
            .collect())
    }

    async fn edits(&self, room: &str, seq: u64) -> Result<Vec<Version>, StoreError> {
        let rows = self
            .query(
                "SELECT ts, body FROM edits WHERE room = $1 AND seq = $2 ORDER BY ts, id",
                &[&room, &i(seq)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Version {
                ts: r.get::<_, i64>(0) as u64,
                body: body_from_storage(r.get::<_, &str>(1)),
            })
            .collect())
    }

    async fn target(
        &self,
        room: &str,
        seq: u64,
        viewer: &str,
    ) -> Result<Option<TargetInfo>, StoreError> {
        let rows = self
            .query(
                "SELECT sender, deleted, kind IS NOT NULL, body FROM messages
                 WHERE room = $1 AND seq = $2",
                &[&room, &i(seq)],
            )
            .await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let reactions = self
            .query(
                "SELECT emoji, bool_or(usr = $3) FROM reactions WHERE room = $1 AND seq = $2
                 GROUP BY emoji ORDER BY emoji",
                &[&room, &i(seq), &viewer],
            )
            .await?;
        Ok(Some(TargetInfo::new(
            r.get(0),
            r.get(1),
            r.get(2),
            body_from_storage(r.get::<_, &str>(3)),
            reactions.iter().map(|x| (x.get(0), x.get(1))).collect(),
        )))
    }

    async fn search(
        &self,
        room: &str,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredMsg>, StoreError> {
        // plainto_tsquery reads words only: operators in the input are text.
        let query = searchable(query);
        let words: Vec<&str> = query.split_whitespace().take(16).collect();
        if words.is_empty() {
            return Ok(vec![]);
        }
        let q = words.join(" ");
        let rows = self
            .query(
                "SELECT seq, sender, ts, body FROM messages,
                        plainto_tsquery('simple', $1) q
                 WHERE room = $2 AND search @@ q AND NOT deleted
                 ORDER BY ts_rank(search, q) DESC, seq DESC LIMIT $3 OFFSET $4",
                &[&q, &room, &(limit as i64), &(offset as i64)],
            )
            .await?;
        Ok(rows.iter().map(stored).collect())
    }

    async fn receipts(&self, room: &str) -> Result<Vec<Receipt>, StoreError> {
        let rows = self
            .query(
                "SELECT usr, delivered, read FROM members
                 WHERE room = $1 AND (delivered > 0 OR read > 0) ORDER BY usr",
                &[&room],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Receipt {
                user: r.get(0),
                delivered: r.get::<_, i64>(1) as u64,
                read: r.get::<_, i64>(2) as u64,
            })
            .collect())
    }

    async fn user_rooms(&self, user: &str) -> Result<Vec<RoomSummary>, StoreError> {
        let rows = self
            .query(
                "SELECT m.room, coalesce(r.last_seq, 0), m.delivered, m.read,
                    (SELECT count(*) FROM messages x WHERE x.room = m.room
                      AND x.seq > m.read AND NOT x.deleted AND x.kind IS NULL
                      AND x.sender <> m.usr),
                    (SELECT count(*) FROM mentions n JOIN messages x
                      ON x.room = n.room AND x.seq = n.seq
                      WHERE n.usr = m.usr AND n.room = m.room AND n.seq > m.read
                      AND NOT x.deleted)
                 FROM members m LEFT JOIN rooms r ON r.name = m.room
                 WHERE m.usr = $1 ORDER BY m.room",
                &[&user],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| RoomSummary {
                room: r.get(0),
                last_seq: r.get::<_, i64>(1) as u64,
                delivered: r.get::<_, i64>(2) as u64,
                read: r.get::<_, i64>(3) as u64,
                unread: r.get::<_, i64>(4) as u64,
                mentions: r.get::<_, i64>(5) as u64,
            })
            .collect())
    }

    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "SELECT 1 FROM members WHERE usr = $1 AND room = $2",
                &[&user, &room],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn put_file(&self, f: FileRecord) -> Result<(), StoreError> {
        self.query(
            "INSERT INTO files (id, room, owner, name, content_type, data, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &f.id,
                &f.room,
                &f.owner,
                &f.name,
                &f.content_type,
                &f.data,
                &i(f.created_ms),
            ],
        )
        .await
        .map(|_| ())
    }

    async fn file_usage(&self, owner: &str) -> Result<u64, StoreError> {
        let rows = self
            .query(
                "SELECT coalesce(sum(octet_length(data)), 0)::BIGINT FROM files WHERE owner = $1",
                &[&owner],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn expire_files(&self, policy: RetentionPolicy) -> Result<u64, StoreError> {
        let rooms = self.query("SELECT DISTINCT room FROM files", &[]).await?;
        let mut removed = 0u64;
        for r in rooms {
            let room: String = r.get(0);
            if let Some(min_ts) = policy(&room).and_then(|r| r.min_ts) {
                removed += self
                    .client()
                    .await?
                    .execute(
                        "DELETE FROM files WHERE room = $1 AND created_ms < $2",
                        &[&room, &i(min_ts)],
                    )
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(removed)
    }

    async fn get_file(&self, id: &str) -> Result<Option<FileRecord>, StoreError> {
        let rows = self
            .query(
                "SELECT id, room, owner, name, content_type, data, created_ms
                 FROM files WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(rows.first().map(|r| FileRecord {
            id: r.get(0),
            room: r.get(1),
            owner: r.get(2),
            name: r.get(3),
            content_type: r.get(4),
            data: r.get(5),
            created_ms: r.get::<_, i64>(6) as u64,
        }))
    }

    async fn apply_retention(&self, policy: RetentionPolicy) -> Result<u64, StoreError> {
        let rooms = self
            .query("SELECT name, last_seq, floor FROM rooms", &[])
            .await?;
        let mut removed = 0u64;
        for r in rooms {
            let (room, last, floor): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            let Some(rule) = policy(&room) else { continue };
            let mut upto = floor;
            if let Some(n) = rule.max_messages {
                upto = upto.max(last - i(n).min(last));
            }
            if let Some(min_ts) = rule.min_ts {
                let old = self
                    .query(
                        "SELECT max(seq) FROM messages WHERE room = $1 AND ts < $2",
                        &[&room, &i(min_ts)],
                    )
                    .await?;
                upto = upto.max(
                    old.first()
                        .and_then(|r| r.get::<_, Option<i64>>(0))
                        .unwrap_or(0),
                );
            }
            if upto <= floor {
                continue;
            }
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(unavailable)?;
            removed += tx
                .execute(
                    "DELETE FROM messages WHERE room = $1 AND seq <= $2",
                    &[&room, &upto],
                )
                .await
                .map_err(unavailable)?;
            for sql in [
                "DELETE FROM edits WHERE room = $1 AND seq <= $2",
                "DELETE FROM reactions WHERE room = $1 AND seq <= $2",
                "DELETE FROM mentions WHERE room = $1 AND seq <= $2",
            ] {
                tx.execute(sql, &[&room, &upto])
                    .await
                    .map_err(unavailable)?;
            }
            tx.execute(
                "UPDATE rooms SET floor = $2 WHERE name = $1 AND floor < $2",
                &[&room, &upto],
            )
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
        }
        Ok(removed)
    }
}
