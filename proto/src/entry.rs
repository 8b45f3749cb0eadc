//! The room log: what a sequenced entry may be besides a plain message,
//! and the rules every reader applies to it.
//!
//! Rules (PROTOCOL.md §5a):
//! - Every change to a room's messages is itself an entry of the room's
//!   log with its own seq: an edit, a reaction added or removed, a
//!   deletion. So `join {since}` recovers all of them, in order, exactly
//!   once, with the messages: there is one sequence per room, not one per
//!   kind of change.
//! - An entry with no `kind` is a message. An entry with a `kind` is an
//!   event on the message `target` and is never shown as a message.
//! - Events are applied in seq order by the same rules everywhere (the
//!   store, every client): an edit applies only to a message, by its own
//!   sender, not deleted; a reaction toggles the (user, emoji) pair on a
//!   message not deleted; a deletion marks the message deleted. An event
//!   that breaks a rule (it lost a race with a deletion) has no effect.
//!   The broker refuses such requests before sequencing them, so this
//!   happens only under races.
//! - A reply (`reply_to`) is a message that quotes another; mentions are
//!   members named with `@name`, recognised by the broker.
//! - Moderation is in the log too (PROTOCOL.md §5b): creating a room,
//!   inviting, kicking, banning, muting, changing roles, transferring
//!   ownership, setting the topic are entries with a [`ModAction`] body and
//!   no `target`; every node applies them to the room's access rules when
//!   it delivers them, and the store keeps them as the room's audit log.

use serde::{Deserialize, Serialize};

/// Longest accepted reaction, in bytes (an emoji sequence or a short name).
pub const MAX_REACTION_LEN: usize = 32;
/// Most distinct reactions on one message.
pub const MAX_REACTIONS_PER_MESSAGE: usize = 20;
/// Most reactions one user may have on one message.
pub const MAX_REACTIONS_PER_USER: usize = 3;
/// Longest quoted preview of a replied-to message, in characters.
pub const MAX_PREVIEW_CHARS: usize = 120;
/// Most users one message may mention.
pub const MAX_MENTIONS: usize = 20;

/// What an event entry does to its target message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The sender replaced the body (the entry's body is the new one).
    Edit,
    /// A user added a reaction (the entry's body is the reaction string).
    React,
    /// A user removed a reaction (the entry's body is the reaction string).
    Unreact,
    /// The message was deleted (the entry's body is null).
    Delete,
    /// The room was created (body: `private`, `topic`; `from` owns it).
    Create,
    /// `user` may join the private room.
    Invite,
    /// `user` was removed from the room (may rejoin an open room).
    Kick,
    /// `user` was removed and may not rejoin until `until` (ms; absent:
    /// for good).
    Ban,
    /// `user`'s ban was lifted.
    Unban,
    /// `user` may read but not publish until `until` (absent: until unmuted).
    Mute,
    /// `user` may publish again.
    Unmute,
    /// `user`'s role became `role` (`admin` or `member`).
    Role,
    /// `user` owns the room now; the previous owner becomes an admin.
    Owner,
    /// The room's topic became `topic` and/or its display name `title`.
    Topic,
}

/// The roles of a created room's members, highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A member (of a private room: may join it).
    Member,
    /// May invite, kick, ban, mute members, delete any message, set the topic.
    Admin,
    /// The creator (or whoever it was transferred to): everything admins
    /// may, and changes roles and transfers ownership.
    Owner,
}

impl Role {
    /// Name as on the wire and in storage.
    pub fn name(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "member" => Role::Member,
            "admin" => Role::Admin,
            "owner" => Role::Owner,
            _ => return None,
        })
    }
}

/// Longest room topic, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Longest room display name, in bytes.
pub const MAX_TITLE_LEN: usize = 64;
/// Longest moderation reason, in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// The body of a moderation entry: who it is about and the details its
/// kind uses (the others absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModAction {
    /// The user acted on (all kinds but `create` and `topic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// End of a ban or mute, ms since the epoch (absent: no end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// The new role (`role`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The topic (`create`, `topic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The room's display name (`create`, `topic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Members only (`create`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private: Option<bool>,
    /// Why, as the moderator wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl EventKind {
    /// Name as on the wire and in storage.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Edit => "edit",
            EventKind::React => "react",
            EventKind::Unreact => "unreact",
            EventKind::Delete => "delete",
            EventKind::Create => "create",
            EventKind::Invite => "invite",
            EventKind::Kick => "kick",
            EventKind::Ban => "ban",
            EventKind::Unban => "unban",
            EventKind::Mute => "mute",
            EventKind::Unmute => "unmute",
            EventKind::Role => "role",
            EventKind::Owner => "owner",
            EventKind::Topic => "topic",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Every kind.
    pub const ALL: [EventKind; 14] = [
        EventKind::Edit,
        EventKind::React,
        EventKind::Unreact,
        EventKind::Delete,
        EventKind::Create,
        EventKind::Invite,
        EventKind::Kick,
        EventKind::Ban,
        EventKind::Unban,
        EventKind::Mute,
        EventKind::Unmute,
        EventKind::Role,
        EventKind::Owner,
        EventKind::Topic,
    ];

    /// A moderation entry (about the room or a user, not a message).
    pub fn is_moderation(self) -> bool {
        !matches!(
            self,
            EventKind::Edit | EventKind::React | EventKind::Unreact | EventKind::Delete
        )
    }

    /// The moderation action a client asks for by this name (`moderate
    /// {action}`); `create` has a frame of its own.
    pub fn action(s: &str) -> Option<Self> {
        Self::parse(s).filter(|k| k.is_moderation() && *k != EventKind::Create)
    }
}

/// The message a reply quotes, as delivered with the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyRef {
    /// Seq of the quoted message.
    pub seq: u64,
    /// Its sender.
    pub from: String,
    /// The start of its text (at most [`MAX_PREVIEW_CHARS`] characters).
    pub preview: String,
}

/// Everything a log entry carries besides seq, sender, time and body.
/// Empty for a plain message that neither replies nor mentions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Set on events; absent on messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<EventKind>,
    /// The message an event applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<u64>,
    /// The message this one replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyRef>,
    /// Members this message mentions, sorted, without repeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
}

impl Meta {
    /// True for a plain message.
    pub fn is_empty(&self) -> bool {
        self.kind.is_none()
            && self.target.is_none()
            && self.reply_to.is_none()
            && self.mentions.is_empty()
    }

    /// An event of `kind` on `target`.
    pub fn event(kind: EventKind, target: u64) -> Self {
        Meta {
            kind: Some(kind),
            target: Some(target),
            ..Meta::default()
        }
    }
}

impl ModAction {
    /// The action a moderation entry's body holds (a body of another
    /// shape reads as an empty action, which changes nothing).
    pub fn from_body(body: &crate::Body) -> Self {
        serde_json::from_value(body.clone()).unwrap_or_default()
    }

    /// As an entry body.
    pub fn to_body(&self) -> crate::Body {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// One reaction on a message, aggregated, as history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    /// The reaction string.
    pub emoji: String,
    /// How many users reacted with it.
    pub count: u64,
    /// Whether the user asking is one of them.
    #[serde(default)]
    pub me: bool,
}

/// The replies to a message, summed up in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadSummary {
    /// Replies not deleted.
    pub count: u64,
    /// Seq of the newest reply.
    pub last_seq: u64,
    /// Its timestamp (ms).
    pub last_ts: u64,
}

/// A previous version of an edited message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// When this version was written (the original time or an edit's).
    pub ts: u64,
    /// The body it had.
    pub body: crate::Body,
}

/// Why a reaction string is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReactionError {
    /// Empty, or longer than [`MAX_REACTION_LEN`] bytes.
    #[error("a reaction is 1 to {MAX_REACTION_LEN} bytes")]
    Length,
    /// Whitespace or control characters.
    #[error("a reaction has no spaces or control characters")]
    Characters,
}

/// Check a reaction string: an emoji (sequence) or a short name.
pub fn check_reaction(s: &str) -> Result<(), ReactionError> {
    if s.is_empty() || s.len() > MAX_REACTION_LEN {
        return Err(ReactionError::Length);
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ReactionError::Characters);
    }
    Ok(())
}

/// The `@name` tokens in `text`, in order of first appearance, without
/// repeats, at most `max`. A name is what user names may contain
/// (letters, digits, `_`, `.`, `-`); a trailing `.` or `-` is punctuation.
/// Whether each is a member is for the caller to decide.
pub fn mention_candidates(text: &str, max: usize) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() && out.len() < max {
        if bytes[i] == b'@' && (i == 0 || !is_name_byte(bytes[i - 1])) {
            let start = i + 1;
            let mut end = start;
            while end < bytes.len() && is_name_byte(bytes[end]) {
                end += 1;
            }
            while end > start && matches!(bytes[end - 1], b'.' | b'-') {
                end -= 1;
            }
            if end > start && end - start <= crate::names::MAX_USER_LEN {
                let name = &text[start..end];
                if !out.contains(&name) {
                    out.push(name);
                }
            }
            i = end.max(start);
        } else {
            i += 1;
        }
    }
    out
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// The preview of `text` quoted by a reply: at most [`MAX_PREVIEW_CHARS`]
/// characters, on one line.
pub fn preview(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_PREVIEW_CHARS + 1)
        .collect();
    if one_line.chars().count() > MAX_PREVIEW_CHARS {
        let mut s: String = one_line.chars().take(MAX_PREVIEW_CHARS - 1).collect();
        s.push('…');
        s
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_found_once_and_punctuation_is_not_part_of_them() {
        assert_eq!(
            mention_candidates("@bob hi @carol. and @bob, mail a@b.c @-x @", 10),
            vec!["bob", "carol", "-x"]
        );
        assert_eq!(mention_candidates("@a @b @c", 2), vec!["a", "b"]);
        assert!(mention_candidates("no mentions here", 10).is_empty());
        // Multi-byte text around mentions does not split characters.
        assert_eq!(
            mention_candidates("héllo @zoë? @ana…", 10),
            vec!["zo", "ana"]
        );
    }

    #[test]
    fn reactions_are_bounded() {
        assert!(check_reaction("👍").is_ok());
        assert!(check_reaction("+1").is_ok());
        assert_eq!(check_reaction(""), Err(ReactionError::Length));
        assert_eq!(check_reaction(&"x".repeat(33)), Err(ReactionError::Length));
        assert_eq!(check_reaction("a b"), Err(ReactionError::Characters));
        assert_eq!(check_reaction("a\u{0}"), Err(ReactionError::Characters));
    }

    #[test]
    fn previews_are_one_bounded_line() {
        assert_eq!(preview("a\nb"), "a b");
        let long = "é".repeat(500);
        let p = preview(&long);
        assert_eq!(p.chars().count(), MAX_PREVIEW_CHARS);
        assert!(p.ends_with('…'));
        assert_eq!(preview("short"), "short");
    }

    #[test]
    fn kinds_round_trip_their_names() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.name()), Some(k));
            let json = serde_json::to_string(&k).expect("json");
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
        assert_eq!(EventKind::parse("nope"), None);
        assert_eq!(EventKind::action("kick"), Some(EventKind::Kick));
        assert_eq!(EventKind::action("create"), None);
        assert_eq!(EventKind::action("edit"), None);
        assert!(Role::Owner > Role::Admin && Role::Admin > Role::Member);
    }
}
