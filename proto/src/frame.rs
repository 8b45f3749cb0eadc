//! Frame types. Every frame is a map whose `"t"` field names its type; a
//! client request may carry `"id"` and the reply to it carries the same id.
//!
//! Field names are part of the protocol: MessagePack frames are encoded with
//! named keys, so both encodings have exactly the same shape.

use serde::{Deserialize, Serialize};

use crate::entry::{EventKind, Meta, Reaction, ReplyRef, ThreadSummary};

/// A message body: any JSON-compatible value (string, number, bool, null,
/// array, map with string keys). Binary MessagePack values are not accepted
/// so that every message can be relayed to JSON clients unchanged.
pub type Body = serde_json::Value;

/// Frames a client sends to the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Join a room. With `since`, the server replays what it still holds after
    /// that seq before live messages.
    Join {
        /// Request id, echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Last seq the client has seen in this room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    /// Leave a room.
    Leave {
        /// Request id, echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
    },
    /// Publish to a room (`room`) or send a direct message to a user (`to`).
    /// Exactly one of the two must be set.
    Pub {
        /// Request id, echoed in the `ack` or `error`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Target room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        /// Target user for a direct message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// Client message id, for idempotent retries.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cid: Option<String>,
        /// Message body.
        body: Body,
        /// Seq of the message this one replies to (in the same room).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
    },
    /// Replace the body of one of your own messages. Sequenced: acked with
    /// the seq of the edit event.
    Edit {
        /// Request id, echoed in the `ack` or `error`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Seq of the message.
        seq: u64,
        /// The new body.
        body: Body,
    },
    /// Add (`on`, the default) or remove a reaction on a message.
    /// Sequenced: acked with the seq of the event.
    React {
        /// Request id, echoed in the `ack` or `error`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Seq of the message.
        seq: u64,
        /// The reaction (an emoji, at most 32 bytes).
        emoji: String,
        /// True to add, false to remove.
        #[serde(default = "yes")]
        on: bool,
    },
    /// Page through the replies to a message, newest first.
    Thread {
        /// Request id, echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Seq of the message whose replies to list.
        seq: u64,
        /// Only replies with a seq below this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Page size (default 50, at most 200).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Create a room with an owner (you): `private` rooms admit members
    /// only. Sequenced: acked with the seq of the `create` entry.
    Create {
        /// Request id, echoed in the `ack` or `error`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Members only.
        #[serde(default)]
        private: bool,
        /// Topic.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        /// Display name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
    /// A moderation action in a created room (`invite`, `kick`, `ban`,
    /// `unban`, `mute`, `unmute`, `role`, `owner`, `topic`), by its owner
    /// or an admin. Sequenced: acked with the seq of its entry.
    Moderate {
        /// Request id, echoed in the `ack` or `error`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// What to do.
        action: String,
        /// Who to do it to, and the details the action takes.
        #[serde(flatten)]
        what: crate::entry::ModAction,
    },
    /// "I am typing" in a room. Forwarded, never stored.
    Typing {
        /// Request id (only echoed on error).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
    },
    /// Ask who is in a room now.
    Members {
        /// Request id, echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
    },
    /// Page back through a room's stored history, newest first.
    History {
        /// Request id, echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Only messages with a seq below this (default: the newest).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Page size (default 50, at most 200).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Move this user's delivered or read watermark in a room up to `seq`.
    Mark {
        /// Request id (only echoed on error).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Everything up to and including this seq is delivered/read.
        seq: u64,
        /// Which watermark.
        state: MarkState,
    },
    /// Soft-delete one of your own messages.
    Delete {
        /// Request id, echoed in the reply (`deleted`) or `error`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Seq of the message.
        seq: u64,
    },
    /// Application-level ping; answered with `pong`.
    Ping {
        /// Request id, echoed in the reply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

impl ClientFrame {
    /// The request id, if the client set one.
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientFrame::Join { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::Pub { id, .. }
            | ClientFrame::Typing { id, .. }
            | ClientFrame::Members { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Mark { id, .. }
            | ClientFrame::Delete { id, .. }
            | ClientFrame::Edit { id, .. }
            | ClientFrame::React { id, .. }
            | ClientFrame::Thread { id, .. }
            | ClientFrame::Create { id, .. }
            | ClientFrame::Moderate { id, .. }
            | ClientFrame::Ping { id } => *id,
        }
    }

    /// The frame type as it appears in `"t"`; used as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Join { .. } => "join",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::Pub { .. } => "pub",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Members { .. } => "members",
            ClientFrame::History { .. } => "history",
            ClientFrame::Mark { .. } => "mark",
            ClientFrame::Delete { .. } => "delete",
            ClientFrame::Edit { .. } => "edit",
            ClientFrame::React { .. } => "react",
            ClientFrame::Thread { .. } => "thread",
            ClientFrame::Create { .. } => "create",
            ClientFrame::Moderate { .. } => "moderate",
            ClientFrame::Ping { .. } => "ping",
        }
    }
}

fn yes() -> bool {
    true
}

/// Receipt state of a read/delivered watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkState {
    /// Delivered to the user's device.
    Delivered,
    /// Seen by the user.
    Read,
}

impl MarkState {
    /// Name as on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MarkState::Delivered => "delivered",
            MarkState::Read => "read",
        }
    }
}

/// One stored message, as returned by `history` and search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMsg {
    /// Per-room sequence number.
    pub seq: u64,
    /// Sender's user name.
    pub from: String,
    /// Server timestamp, milliseconds since the Unix epoch.
    pub ts: u64,
    /// Message body as the sender gave it (the latest edit's).
    pub body: Body,
    /// When it was last edited (ms), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_ts: Option<u64>,
    /// The message it replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyRef>,
    /// Members it mentions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
    /// Reactions, most used first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<Reaction>,
    /// Its replies, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<ThreadSummary>,
}

impl StoredMsg {
    /// A plain message (no edit, reply, mention, reaction or thread yet).
    pub fn new(seq: u64, from: String, ts: u64, body: Body) -> Self {
        StoredMsg {
            seq,
            from,
            ts,
            body,
            edited_ts: None,
            reply_to: None,
            mentions: Vec::new(),
            reactions: Vec::new(),
            thread: None,
        }
    }
}

/// A user's receipt watermarks in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// User name.
    pub user: String,
    /// Highest seq delivered to one of the user's devices (0: none).
    pub delivered: u64,
    /// Highest seq the user has read (0: none).
    pub read: u64,
}

/// Frames the broker sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection: who the server thinks you are and
    /// the limits that apply to you.
    Hello {
        /// Authenticated user name.
        user: String,
        /// Broker node id.
        node: String,
        /// Largest message the server accepts, in bytes.
        max_message_size: u64,
        /// Server ping interval in milliseconds.
        ping_interval_ms: u64,
    },
    /// Reply to `join`.
    Joined {
        /// Request id of the `join`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Seq of the latest message in the room at the time of joining
        /// (0 for an empty room).
        seq: u64,
    },
    /// Reply to `leave`; without `id`, you were removed from the room
    /// (`reason`: `kicked` or `banned`).
    Left {
        /// Request id of the `leave`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Why you were removed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A published message was accepted and sequenced.
    Ack {
        /// Request id of the `pub`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room the message went to (for a DM, the DM room).
        room: String,
        /// Seq assigned to the message.
        seq: u64,
        /// Server timestamp, milliseconds since the Unix epoch.
        ts: u64,
    },
    /// An entry of a room's log: a message, or (with `kind`) an event on
    /// the message `target` (see `entry`).
    Msg {
        /// Room name.
        room: String,
        /// Per-room sequence number: strictly increasing, no gaps.
        seq: u64,
        /// Sender's user name (`"server"` for messages sent through the API).
        from: String,
        /// Server timestamp, milliseconds since the Unix epoch.
        ts: u64,
        /// Message body as the sender gave it (an edit: the new body; a
        /// reaction: the reaction string; a deletion: null).
        body: Body,
        /// Absent on messages; what the event does.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<EventKind>,
        /// The message an event applies to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<u64>,
        /// The message this one replies to, quoted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<ReplyRef>,
        /// Members this message mentions.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mentions: Vec<String>,
    },
    /// Someone is typing in a room.
    Typing {
        /// Room name.
        room: String,
        /// Who is typing.
        user: String,
    },
    /// A user came online in, or went offline from, a room.
    Presence {
        /// Room name.
        room: String,
        /// User name.
        user: String,
        /// True when the user's first connection joined, false when the last left.
        online: bool,
    },
    /// Reply to `members`.
    Members {
        /// Request id of the `members`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Users with at least one connection in the room, sorted.
        users: Vec<String>,
        /// Receipt watermarks of every user who has marked anything in the
        /// room, online or not, sorted by user. Absent when empty.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        receipts: Vec<Receipt>,
    },
    /// History no longer reaches back to what `join {since}` asked for:
    /// seqs `from..=to` are gone (retention). Replay continues after `to`.
    Gap {
        /// Room name.
        room: String,
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// Reply to `history`: one page, newest first.
    History {
        /// Request id of the `history`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Messages, highest seq first; soft-deleted ones are left out.
        messages: Vec<StoredMsg>,
        /// True if older messages exist (ask again with `before` set to the
        /// last seq of this page).
        more: bool,
    },
    /// Reply to `thread`: one page of replies, newest first.
    Thread {
        /// Request id of the `thread`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Seq of the message whose replies these are.
        seq: u64,
        /// Replies, highest seq first; deleted ones are left out.
        messages: Vec<StoredMsg>,
        /// True if older replies exist.
        more: bool,
    },
    /// A user's receipt watermark moved.
    Mark {
        /// Room name.
        room: String,
        /// User whose watermark moved.
        user: String,
        /// New watermark: everything up to this seq.
        seq: u64,
        /// Which watermark.
        state: MarkState,
    },
    /// A message was soft-deleted by its sender; remove it from view.
    Deleted {
        /// Request id, when this is the reply to your own `delete`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Room name.
        room: String,
        /// Seq of the deleted message.
        seq: u64,
    },
    /// Reply to `ping`.
    Pong {
        /// Request id of the `ping`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A request failed. See `codes::ErrorCode`.
    Error {
        /// Request id of the failed request, if it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// HTTP-like error code.
        code: u16,
        /// Human-readable reason.
        message: String,
    },
}

impl ServerFrame {
    /// A log entry as delivered: a message or an event, with its metadata.
    pub fn entry(room: String, seq: u64, from: String, ts: u64, body: Body, meta: Meta) -> Self {
        let Meta {
            kind,
            target,
            reply_to,
            mentions,
        } = meta;
        ServerFrame::Msg {
            room,
            seq,
            from,
            ts,
            body,
            kind,
            target,
            reply_to,
            mentions,
        }
    }

    /// The frame type as it appears in `"t"`; used as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Hello { .. } => "hello",
            ServerFrame::Joined { .. } => "joined",
            ServerFrame::Left { .. } => "left",
            ServerFrame::Ack { .. } => "ack",
            ServerFrame::Msg { .. } => "msg",
            ServerFrame::Typing { .. } => "typing",
            ServerFrame::Presence { .. } => "presence",
            ServerFrame::Members { .. } => "members",
            ServerFrame::Gap { .. } => "gap",
            ServerFrame::History { .. } => "history",
            ServerFrame::Thread { .. } => "thread",
            ServerFrame::Mark { .. } => "mark",
            ServerFrame::Deleted { .. } => "deleted",
            ServerFrame::Pong { .. } => "pong",
            ServerFrame::Error { .. } => "error",
        }
    }

    /// Ephemeral frames may be dropped for a slow consumer; everything else
    /// is either delivered in order or the connection is closed.
    pub fn is_ephemeral(&self) -> bool {
        matches!(
            self,
            ServerFrame::Typing { .. } | ServerFrame::Presence { .. }
        )
    }

    /// Convenience constructor for an error reply.
    pub fn error(id: Option<u64>, code: crate::ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            id,
            code: code.as_u16(),
            message: message.into(),
        }
    }
}
