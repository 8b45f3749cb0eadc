//! Durable state behind one trait, so a single node can use the embedded
//! database and a cluster a shared server database.
//!
//! The embedded implementation is [`sqlite::SqliteStore`].

#[doc(hidden)]
pub mod conformance;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use shoal_proto::{
    entry::{Reaction, ThreadSummary, Version},
    Body, MarkState, Meta, Receipt, StoredMsg,
};
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

/// What the store knows about a room when it is loaded into memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomHead {
    /// Highest seq stored (0: none).
    pub last_seq: u64,
    /// Recent client message ids, for idempotent retries across restarts.
    pub cids: Vec<CidEntry>,
}

/// A remembered client message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidEntry {
    /// Sender.
    pub user: String,
    /// Client message id.
    pub cid: String,
    /// Seq it was given.
    pub seq: u64,
    /// Server timestamp (ms).
    pub ts: u64,
}

/// A new message to store.
#[derive(Debug, Clone)]
pub struct NewMsg {
    /// Room name.
    pub room: Arc<str>,
    /// Seq assigned by the hub.
    pub seq: u64,
    /// Sender.
    pub from: Arc<str>,
    /// Server timestamp (ms).
    pub ts: u64,
    /// Body in storage form (`shoal_proto::codec::body_to_storage`).
    pub body: String,
    /// Searchable text, if any (a reaction event: the reaction).
    pub text: Option<String>,
    /// Client message id.
    pub cid: Option<String>,
    /// Event, reply and mention data: an event is applied to its target
    /// in the same transaction (see `shoal_proto::entry` for the rules).
    pub meta: Meta,
    /// For a DM room, both parties: they become members of the room.
    pub parties: Option<(Arc<str>, Arc<str>)>,
}

/// One write in a group-commit batch.
#[derive(Debug, Clone)]
// The large variant is the common one (every message); boxing it would
// allocate per message to shrink the rare small ones.
#[allow(clippy::large_enum_variant)]
pub enum WriteOp {
    /// Store a message.
    Msg(NewMsg),
    /// Record that `user` is a member of `room` (for `GET /api/rooms`),
    /// unless the user already has `max` memberships: outcome `NotFound`
    /// (refused), `Unchanged` (already a member) or `Done`.
    Join {
        /// Room.
        room: Arc<str>,
        /// User.
        user: Arc<str>,
        /// Most memberships a user may hold.
        max: u64,
    },
    /// Remove the membership (explicit `leave`).
    Leave {
        /// Room.
        room: Arc<str>,
        /// User.
        user: Arc<str>,
    },
    /// Raise a receipt watermark (never lowers it; `read` raises
    /// `delivered` too).
    Mark {
        /// Room.
        room: Arc<str>,
        /// User.
        user: Arc<str>,
        /// New watermark.
        seq: u64,
        /// Which one.
        state: MarkState,
    },
}

/// Result of one [`WriteOp`] in a committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpOutcome {
    /// Applied.
    Done,
    /// Nothing changed (watermark already at or above, already a member).
    Unchanged,
    /// Join: refused (the user holds the most memberships allowed).
    NotFound,
}

/// One stored entry as replayed to a rejoining client.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayEntry {
    /// The message (body is `null` when deleted).
    pub msg: StoredMsg,
    /// Soft-deleted: replayed as `deleted`, not as `msg`.
    pub deleted: bool,
    /// Event, reply and mention data.
    pub meta: Meta,
}

/// A page of replay.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Replay {
    /// Highest seq removed by retention (0: none); `since` below it is a gap.
    pub floor: u64,
    /// Entries after `since`, in seq order.
    pub entries: Vec<ReplayEntry>,
}

/// A room as listed for one of its members.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoomSummary {
    /// Room name.
    pub room: String,
    /// Highest seq in the room.
    pub last_seq: u64,
    /// The user's delivered watermark.
    pub delivered: u64,
    /// The user's read watermark.
    pub read: u64,
    /// Messages from others after the read watermark, not deleted.
    pub unread: u64,
    /// Of those, the ones that mention the user.
    pub mentions: u64,
}

/// One operator action, as the admin audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdminEntry {
    /// When (ms).
    pub ts: u64,
    /// The operator.
    pub actor: String,
    /// What (`disconnect`, `revoke`, `moderate`, `delete`).
    pub action: String,
    /// Its details (JSON text).
    pub detail: String,
}

/// A room's access rules as stored (`hub::acl::Acl` in memory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclRecord {
    /// Members only.
    pub private: bool,
    /// Owner.
    pub owner: String,
    /// Topic.
    pub topic: String,
    /// Display name.
    pub title: String,
    /// Admins, and a private room's members.
    pub roles: Vec<(String, shoal_proto::entry::Role)>,
    /// Bans (end in ms; None: for good).
    pub bans: Vec<(String, Option<u64>)>,
    /// Mutes (end in ms; None: until unmuted).
    pub mutes: Vec<(String, Option<u64>)>,
}

impl AclRecord {
    /// From stored rows: roles, and sanctions as (user, `ban`|`mute`, end).
    pub fn new(
        private: bool,
        owner: String,
        (topic, title): (String, String),
        roles: Vec<(String, shoal_proto::entry::Role)>,
        sanctions: Vec<(String, String, Option<u64>)>,
    ) -> Self {
        let (mut bans, mut mutes) = (vec![], vec![]);
        for (user, kind, until) in sanctions {
            match kind.as_str() {
                "ban" => bans.push((user, until)),
                _ => mutes.push((user, until)),
            }
        }
        AclRecord {
            private,
            owner,
            topic,
            title,
            roles,
            bans,
            mutes,
        }
    }
}

/// The kinds of entry an audit log lists (SQL list of quoted names):
/// moderation, and deletions.
pub fn audit_kinds() -> String {
    shoal_proto::EventKind::ALL
        .iter()
        .filter(|k| k.is_moderation() || **k == shoal_proto::EventKind::Delete)
        .map(|k| format!("'{}'", k.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a request about one entry (edit, react, reply, delete) needs to
/// know of it before it is sequenced.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetInfo {
    /// Sender.
    pub from: String,
    /// Deleted.
    pub deleted: bool,
    /// An event rather than a message (events cannot be targets).
    pub event: bool,
    /// Current body.
    pub body: Body,
    /// Distinct reactions on it.
    pub reactions: Vec<String>,
    /// The asking user's reactions on it.
    pub mine: Vec<String>,
}

impl TargetInfo {
    /// From what a store read: the sender, flags, body, and each distinct
    /// reaction with whether the asking user has it.
    pub fn new(
        from: String,
        deleted: bool,
        event: bool,
        body: Body,
        reactions: Vec<(String, bool)>,
    ) -> Self {
        let mine = reactions
            .iter()
            .filter(|r| r.1)
            .map(|r| r.0.clone())
            .collect();
        TargetInfo {
            from,
            deleted,
            event,
            body,
            reactions: reactions.into_iter().map(|r| r.0).collect(),
            mine,
        }
    }
}

/// Rows of a page of messages, and what is known about them, assembled
/// into [`StoredMsg`]s the same way by every store.
pub struct PageParts {
    /// Messages with body, edit time and stored metadata, in page order.
    pub msgs: Vec<(StoredMsg, Meta)>,
    /// (seq, reaction, count, whether the viewer is one of them), in
    /// seq order and, per seq, most used first.
    pub reactions: Vec<(u64, String, u64, bool)>,
    /// (seq, reply count, newest reply's seq and ts).
    pub threads: Vec<(u64, u64, u64, u64)>,
}

impl PageParts {
    /// The page as history shows it.
    pub fn assemble(self) -> Vec<StoredMsg> {
        let mut reactions: std::collections::HashMap<u64, Vec<Reaction>> = Default::default();
        for (seq, emoji, count, me) in self.reactions {
            reactions
                .entry(seq)
                .or_default()
                .push(Reaction { emoji, count, me });
        }
        let threads: std::collections::HashMap<u64, ThreadSummary> = self
            .threads
            .into_iter()
            .map(|(seq, count, last_seq, last_ts)| {
                (
                    seq,
                    ThreadSummary {
                        count,
                        last_seq,
                        last_ts,
                    },
                )
            })
            .collect();
        self.msgs
            .into_iter()
            .map(|(mut m, meta)| {
                m.reply_to = meta.reply_to;
                m.mentions = meta.mentions;
                m.reactions = reactions.remove(&m.seq).unwrap_or_default();
                m.thread = threads.get(&m.seq).cloned();
                m
            })
            .collect()
    }
}

/// Retention rule for one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many newest messages.
    pub max_messages: Option<u64>,
    /// Drop messages with a timestamp (ms) below this.
    pub min_ts: Option<u64>,
}

/// A stored attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// Opaque id (random, unguessable).
    pub id: String,
    /// Room it was posted in; only its members may fetch it.
    pub room: String,
    /// Uploader.
    pub owner: String,
    /// File name as uploaded (sanitised).
    pub name: String,
    /// Verified content type.
    pub content_type: String,
    /// Bytes.
    pub data: Vec<u8>,
    /// Upload time (ms).
    pub created_ms: u64,
}

/// Picks the retention rule of a room by name (None: keep everything).
pub type RetentionPolicy = Arc<dyn Fn(&str) -> Option<Retention> + Send + Sync>;

/// Durable state: accounts, revoked tokens, messages, memberships and
/// receipts.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Create a user; `Conflict` if the name is taken in any letter case.
    async fn create_user(&self, name: &str, password_hash: &str) -> Result<(), StoreError>;
    /// A user's name as registered and password hash, looked up
    /// regardless of letter case (names are unique that way; `Conflict`
    /// from `create_user` enforces it).
    async fn password_hash(&self, name: &str) -> Result<Option<(String, String)>, StoreError>;
    /// Record users seen with a valid token (from an external issuer, say)
    /// as accounts without a password: they can receive direct messages,
    /// and nobody can register their names. Existing names are left as
    /// they are.
    async fn remember_users(&self, names: &[String]) -> Result<(), StoreError>;
    /// Whether an account (registered or seen) named exactly `name` exists.
    async fn user_exists(&self, name: &str) -> Result<bool, StoreError>;
    /// All users, sorted by name.
    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError>;
    /// Record a revoked token id until its expiry (seconds since the epoch).
    async fn revoke(&self, jti: &str, exp: u64) -> Result<(), StoreError>;
    /// Forget a revocation (a lifted server ban).
    async fn unrevoke(&self, jti: &str) -> Result<(), StoreError>;
    /// Revoked token ids that have not expired yet.
    async fn revoked(&self, now: u64) -> Result<Vec<(String, u64)>, StoreError>;

    /// Head of a room, with client ids of messages newer than `cid_since_ms`.
    async fn room_head(&self, room: &str, cid_since_ms: u64) -> Result<RoomHead, StoreError>;
    /// Apply a batch in one transaction: all or nothing. Outcomes are in
    /// the order of `ops`.
    async fn write_batch(&self, ops: Vec<WriteOp>) -> Result<Vec<OpOutcome>, StoreError>;
    /// Stored entries with `after < seq <= upto`, in seq order, at most `limit`.
    async fn replay(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Replay, StoreError>;
    /// A page of history below `before` (default: newest), newest first,
    /// messages only (no events), without deleted ones, in their current
    /// state (latest edit, reactions with `me` for `viewer`, reply quote,
    /// thread summary); the flag says whether older ones exist.
    async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
        viewer: &str,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError>;
    /// A page of the replies to message `seq`, like [`Store::history`].
    async fn thread(
        &self,
        room: &str,
        seq: u64,
        before: Option<u64>,
        limit: usize,
        viewer: &str,
    ) -> Result<(Vec<StoredMsg>, bool), StoreError>;
    /// Record an operator's action in the admin audit log.
    async fn admin_record(&self, entry: AdminEntry) -> Result<(), StoreError>;
    /// The newest `limit` entries of the admin audit log, newest first.
    async fn admin_audit(&self, limit: usize) -> Result<Vec<AdminEntry>, StoreError>;
    /// A created room's access rules (None: never created, an open room).
    async fn room_acl(&self, room: &str) -> Result<Option<AclRecord>, StoreError>;
    /// The room's moderation entries (and deletions), newest first, below
    /// `before`: its audit log.
    async fn audit(
        &self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ReplayEntry>, StoreError>;
    /// Previous versions of an edited message, oldest first.
    async fn edits(&self, room: &str, seq: u64) -> Result<Vec<Version>, StoreError>;
    /// What is stored of entry `seq` (None: no such entry, or removed by
    /// retention), with `viewer`'s reactions on it.
    async fn target(
        &self,
        room: &str,
        seq: u64,
        viewer: &str,
    ) -> Result<Option<TargetInfo>, StoreError>;
    /// Full-text search in one room, best match first.
    async fn search(
        &self,
        room: &str,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<StoredMsg>, StoreError>;
    /// Receipt watermarks of every member of a room who has marked
    /// anything, sorted by user.
    async fn receipts(&self, room: &str) -> Result<Vec<Receipt>, StoreError>;
    /// Rooms `user` is a member of, with unread and mention counts,
    /// sorted by name.
    async fn user_rooms(&self, user: &str) -> Result<Vec<RoomSummary>, StoreError>;
    /// Whether `user` is a recorded member of `room`.
    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError>;
    /// Store an attachment.
    async fn put_file(&self, file: FileRecord) -> Result<(), StoreError>;
    /// Fetch an attachment by id.
    async fn get_file(&self, id: &str) -> Result<Option<FileRecord>, StoreError>;
    /// Bytes of attachments `owner` has stored (for the upload quota).
    async fn file_usage(&self, owner: &str) -> Result<u64, StoreError>;
    /// Delete attachments older than their room's retention age
    /// (`Retention::min_ts`); returns how many were removed.
    async fn expire_files(&self, policy: RetentionPolicy) -> Result<u64, StoreError>;
    /// Delete what retention no longer keeps; returns messages removed.
    async fn apply_retention(&self, policy: RetentionPolicy) -> Result<u64, StoreError>;
}
