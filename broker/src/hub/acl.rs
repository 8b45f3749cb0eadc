//! Who may do what in a room: its owner, roles, bans and mutes, and
//! whether it is private (PROTOCOL.md §5b).
//!
//! Rules:
//! - A room nobody created is open, as rooms always were: anyone may join
//!   and publish; it has no moderators. `create` gives it an owner, and
//!   `private` makes it members only.
//! - The access rules change only through the room's moderation entries,
//!   applied by [`Acl::apply`] in log order when a node delivers them (so
//!   every node holds the same rules at the same seq) and by the stores in
//!   the same order with the same effect (so they survive restarts).
//! - A request is checked against the rules as this node holds them
//!   ([`Acl::may_act`], [`Acl::may_join`], [`Acl::may_publish`]) before it
//!   is sequenced; an entry that a race made pointless (a ban of someone
//!   promoted meanwhile) still applies as written: moderation is about
//!   people and is checked when asked for.
//! - Bounded: a private room lists its members (at most the namespace's
//!   `max_members` are asked for by invites; the list is what the store
//!   holds); bans and mutes expire lazily (an expired one is as good as
//!   none and is dropped when next looked at).

use std::{collections::HashMap, sync::Arc};

use shoal_proto::{
    entry::{ModAction, Role},
    ErrorCode, EventKind,
};

use super::HubError;

/// The access rules of one room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// Members only.
    pub private: bool,
    /// Its owner (None: never created, an open room).
    pub owner: Option<Arc<str>>,
    /// Topic.
    pub topic: String,
    /// Display name ("": none).
    pub title: String,
    /// Roles below owner: admins, and a private room's members.
    pub roles: HashMap<Arc<str>, Role>,
    /// Banned users and when their ban ends (None: never).
    pub bans: HashMap<Arc<str>, Option<u64>>,
    /// Muted users and when their mute ends (None: when unmuted).
    pub mutes: HashMap<Arc<str>, Option<u64>>,
}

impl From<crate::store::AclRecord> for Acl {
    fn from(r: crate::store::AclRecord) -> Self {
        Acl {
            private: r.private,
            owner: Some(r.owner.into()),
            topic: r.topic,
            title: r.title,
            roles: r.roles.into_iter().map(|(u, r)| (u.into(), r)).collect(),
            bans: r.bans.into_iter().map(|(u, t)| (u.into(), t)).collect(),
            mutes: r.mutes.into_iter().map(|(u, t)| (u.into(), t)).collect(),
        }
    }
}

fn refused(code: ErrorCode, msg: impl Into<String>) -> HubError {
    HubError::new(code, msg)
}

fn active(until: Option<u64>, now: u64) -> bool {
    until.is_none_or(|u| u > now)
}

impl Acl {
    /// The role of `user` (the owner's is [`Role::Owner`]).
    pub fn role(&self, user: &str) -> Option<Role> {
        if self.owner.as_deref() == Some(user) {
            return Some(Role::Owner);
        }
        self.roles.get(user).copied()
    }

    /// Whether the room was created (has an owner).
    pub fn created(&self) -> bool {
        self.owner.is_some()
    }

    /// May `user` join a room of a namespace with `open` rooms (and read)?
    /// An uncreated room of a closed namespace does not exist; banned
    /// users may not; a private room admits its members only.
    pub fn may_enter(&self, open: bool, user: &str, now: u64) -> Result<(), HubError> {
        if !open && !self.created() {
            return Err(refused(
                ErrorCode::NotFound,
                "no such room in this namespace (rooms here are created first)",
            ));
        }
        self.may_join(user, false, now)
    }

    /// May `user` join (and read)? Banned users may not; a private room
    /// admits its members only. Server admins (`admin`) always may.
    pub fn may_join(&self, user: &str, admin: bool, now: u64) -> Result<(), HubError> {
        if admin {
            return Ok(());
        }
        if self.bans.get(user).is_some_and(|u| active(*u, now)) {
            return Err(refused(
                ErrorCode::Forbidden,
                "you are banned from this room",
            ));
        }
        if self.private && self.role(user).is_none() {
            return Err(refused(
                ErrorCode::Forbidden,
                "a private room: members only (ask for an invite)",
            ));
        }
        Ok(())
    }

    /// May `user` publish (a message, an edit, a reaction)?
    pub fn may_publish(&self, user: &str, now: u64) -> Result<(), HubError> {
        if self.mutes.get(user).is_some_and(|u| active(*u, now)) {
            return Err(refused(ErrorCode::Forbidden, "you are muted in this room"));
        }
        Ok(())
    }

    /// May `actor` (a server admin if `admin`) do moderation `kind` with
    /// `what`? Owners may do everything; admins all but roles and
    /// ownership, and only to members below them.
    pub fn may_act(
        &self,
        actor: &str,
        admin: bool,
        kind: EventKind,
        what: &ModAction,
    ) -> Result<(), HubError> {
        if !self.created() {
            return Err(refused(
                ErrorCode::NotFound,
                "this room has no owner: create it first",
            ));
        }
        let mine = if admin {
            Role::Owner
        } else {
            self.role(actor).unwrap_or(Role::Member)
        };
        let needs = match kind {
            EventKind::Role | EventKind::Owner => Role::Owner,
            _ => Role::Admin,
        };
        if mine < needs {
            return Err(refused(
                ErrorCode::Forbidden,
                format!("only the room's {} may {}", needs.name(), kind.name()),
            ));
        }
        if kind == EventKind::Topic {
            return Ok(());
        }
        let Some(user) = what.user.as_deref() else {
            return Err(refused(
                ErrorCode::BadRequest,
                format!("{} needs `user`", kind.name()),
            ));
        };
        let theirs = self.role(user);
        match kind {
            EventKind::Kick | EventKind::Ban | EventKind::Mute
                if admin && theirs == Some(Role::Owner) =>
            {
                Err(refused(
                    ErrorCode::Conflict,
                    format!(
                        "the owner cannot be {}ed; transfer the room first",
                        kind.name()
                    ),
                ))
            }
            EventKind::Owner if theirs == Some(Role::Owner) => Err(refused(
                ErrorCode::Conflict,
                format!("{user} owns the room already"),
            )),
            EventKind::Role if what.role.is_none_or(|r| r == Role::Owner) => Err(refused(
                ErrorCode::BadRequest,
                "role must be `admin` or `member` (`owner` transfers ownership)",
            )),
            EventKind::Role if theirs == Some(Role::Owner) => Err(refused(
                ErrorCode::Conflict,
                "the owner's role changes only by transferring ownership",
            )),
            // Admins act on members, not on each other or the owner.
            _ if !admin && kind != EventKind::Owner && theirs.is_some_and(|r| r >= mine) => {
                Err(refused(
                    ErrorCode::Forbidden,
                    format!("{user} is {} here too", theirs.map_or("", Role::name)),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Apply a moderation entry by `from` (rules in the module docs).
    pub fn apply(&mut self, kind: EventKind, from: &str, what: &ModAction) {
        let user: Option<Arc<str>> = what.user.as_deref().map(Arc::from);
        match (kind, user) {
            (EventKind::Create, _) if self.owner.is_none() => {
                self.owner = Some(from.into());
                self.private = what.private.unwrap_or(false);
                self.topic = what.topic.clone().unwrap_or_default();
                self.title = what.title.clone().unwrap_or_default();
            }
            // What the action names changes; the rest stays.
            (EventKind::Topic, _) => {
                if let Some(t) = &what.topic {
                    self.topic = t.clone();
                }
                if let Some(t) = &what.title {
                    self.title = t.clone();
                }
            }
            (EventKind::Invite, Some(u)) => {
                if self.role(&u).is_none() {
                    self.roles.insert(u.clone(), Role::Member);
                }
                self.bans.remove(&u);
            }
            (EventKind::Kick | EventKind::Ban, Some(u)) if self.role(&u) != Some(Role::Owner) => {
                self.roles.remove(&u);
                if kind == EventKind::Ban {
                    self.bans.insert(u, what.until);
                }
            }
            (EventKind::Unban, Some(u)) => {
                self.bans.remove(&u);
            }
            (EventKind::Mute, Some(u)) if self.role(&u) != Some(Role::Owner) => {
                self.mutes.insert(u, what.until);
            }
            (EventKind::Unmute, Some(u)) => {
                self.mutes.remove(&u);
            }
            (EventKind::Role, Some(u)) if self.role(&u) != Some(Role::Owner) => {
                if let Some(r) = what.role.filter(|r| *r != Role::Owner) {
                    self.roles.insert(u, r);
                }
            }
            (EventKind::Owner, Some(u)) => {
                if let Some(old) = self.owner.replace(u.clone()) {
                    self.roles.insert(old, Role::Admin);
                }
                self.roles.remove(&u);
                self.bans.remove(&u);
                self.mutes.remove(&u);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(user: &str) -> ModAction {
        ModAction {
            user: Some(user.into()),
            ..Default::default()
        }
    }

    fn created(private: bool) -> Acl {
        let mut a = Acl::default();
        a.apply(
            EventKind::Create,
            "olive",
            &ModAction {
                private: Some(private),
                topic: Some("t".into()),
                ..Default::default()
            },
        );
        a
    }

    #[test]
    fn an_uncreated_room_is_open_and_unmoderated() {
        let a = Acl::default();
        assert!(a.may_join("anyone", false, 0).is_ok());
        assert!(a.may_publish("anyone", 0).is_ok());
        assert_eq!(
            a.may_act("anyone", false, EventKind::Kick, &act("x"))
                .err()
                .map(|e| e.code),
            Some(ErrorCode::NotFound)
        );
    }

    #[test]
    fn private_rooms_admit_members_and_bans_keep_people_out() {
        let mut a = created(true);
        assert_eq!(a.role("olive"), Some(Role::Owner));
        assert!(a.may_join("olive", false, 0).is_ok());
        assert!(a.may_join("bob", false, 0).is_err());
        assert!(a.may_join("bob", true, 0).is_ok(), "server admins");
        a.apply(EventKind::Invite, "olive", &act("bob"));
        assert!(a.may_join("bob", false, 0).is_ok());
        a.apply(EventKind::Kick, "olive", &act("bob"));
        assert!(a.may_join("bob", false, 0).is_err(), "kicked: invite again");
        a.apply(EventKind::Invite, "olive", &act("bob"));
        a.apply(
            EventKind::Ban,
            "olive",
            &ModAction {
                user: Some("bob".into()),
                until: Some(100),
                ..Default::default()
            },
        );
        assert!(a.may_join("bob", false, 50).is_err());
        // The ban ended, but he is no member any more.
        assert!(a.may_join("bob", false, 150).is_err());
        a.apply(EventKind::Invite, "olive", &act("bob"));
        assert!(
            a.may_join("bob", false, 50).is_ok(),
            "an invite lifts a ban"
        );
        // The owner cannot be kicked or banned.
        a.apply(EventKind::Ban, "bob", &act("olive"));
        assert_eq!(a.role("olive"), Some(Role::Owner));
        assert!(!a.bans.contains_key("olive"));
    }

    #[test]
    fn mutes_stop_publishing_until_they_end() {
        let mut a = created(false);
        a.apply(
            EventKind::Mute,
            "olive",
            &ModAction {
                user: Some("bob".into()),
                until: Some(100),
                ..Default::default()
            },
        );
        assert!(a.may_publish("bob", 99).is_err());
        assert!(a.may_publish("bob", 100).is_ok());
        assert!(a.may_join("bob", false, 0).is_ok(), "muted users read");
        a.apply(EventKind::Mute, "olive", &act("carl"));
        assert!(a.may_publish("carl", u64::MAX - 1).is_err());
        a.apply(EventKind::Unmute, "olive", &act("carl"));
        assert!(a.may_publish("carl", 0).is_ok());
    }

    #[test]
    fn who_may_moderate_whom() {
        let mut a = created(true);
        for u in ["ada", "bob", "cy"] {
            a.apply(EventKind::Invite, "olive", &act(u));
        }
        let role = |r| ModAction {
            user: Some("ada".into()),
            role: Some(r),
            ..Default::default()
        };
        // Only the owner changes roles.
        assert!(a
            .may_act("bob", false, EventKind::Role, &role(Role::Admin))
            .is_err());
        assert!(a
            .may_act("olive", false, EventKind::Role, &role(Role::Admin))
            .is_ok());
        assert!(a
            .may_act("olive", false, EventKind::Role, &role(Role::Owner))
            .is_err());
        a.apply(EventKind::Role, "olive", &role(Role::Admin));
        // Admins act on members, not on admins or the owner.
        assert!(a
            .may_act("ada", false, EventKind::Kick, &act("bob"))
            .is_ok());
        assert!(a
            .may_act("ada", false, EventKind::Kick, &act("olive"))
            .is_err());
        assert!(a
            .may_act("bob", false, EventKind::Kick, &act("cy"))
            .is_err());
        assert!(a
            .may_act("ada", false, EventKind::Topic, &ModAction::default())
            .is_ok());
        assert!(a
            .may_act("ada", false, EventKind::Owner, &act("bob"))
            .is_err());
        // A server admin may do anything.
        assert!(a
            .may_act("root-ish", true, EventKind::Kick, &act("ada"))
            .is_ok());
        // Transfer: the old owner becomes an admin.
        a.apply(EventKind::Owner, "olive", &act("bob"));
        assert_eq!(
            (a.role("bob"), a.role("olive")),
            (Some(Role::Owner), Some(Role::Admin))
        );
        assert!(a
            .may_act("olive", false, EventKind::Kick, &act("bob"))
            .is_err());
        // Kick needs a user.
        assert_eq!(
            a.may_act("bob", false, EventKind::Kick, &ModAction::default())
                .err()
                .map(|e| e.code),
            Some(ErrorCode::BadRequest)
        );
    }
}
