//! Room and user naming rules, shared by broker and clients.
//!
//! A room name is `[namespace:]name`. The namespace selects per-namespace
//! options in the broker. Direct-message rooms are `dm:<a>:<b>` with the two
//! user names sorted, and are the only names with two colons.

use thiserror::Error;

/// Maximum length of a room name in bytes.
pub const MAX_ROOM_LEN: usize = 128;
/// Maximum length of a user name in bytes.
pub const MAX_USER_LEN: usize = 32;
/// Namespace of direct-message rooms.
pub const DM_NAMESPACE: &str = "dm";
/// Sender name of messages published through the server API.
pub const SERVER_SENDER: &str = "server";
/// User names nobody may register or hold a token for, in any letter case:
/// the broker's own sender names, present and planned, so a message from
/// one of them is always the system's.
pub const RESERVED_USERS: &[&str] = &[SERVER_SENDER, "system", "shoal", "admin", "root"];

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// Empty name.
    #[error("name is empty")]
    Empty,
    /// Longer than the limit.
    #[error("name is longer than {0} bytes")]
    TooLong(usize),
    /// A character outside the allowed set.
    #[error("name contains a character outside [A-Za-z0-9_.-]")]
    BadChar,
    /// More than one `:` or an empty namespace part.
    #[error("room name must be `name` or `namespace:name`")]
    BadNamespace,
    /// `.` or `..` (path-like names that tools and URLs mangle).
    #[error("`.` and `..` are not valid names")]
    Dots,
    /// A name reserved for the system (see [`RESERVED_USERS`]).
    #[error("this name is reserved")]
    Reserved,
    /// A `dm:` room that is not `dm:<a>:<b>` with sorted, distinct users.
    #[error("direct-message rooms are `dm:<a>:<b>` with a < b; send with `to` instead")]
    BadDm,
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Validate a user name: 1 to 32 bytes of `[A-Za-z0-9_.-]`, not `.` or
/// `..`, not one of [`RESERVED_USERS`] in any letter case.
///
/// User names are unique regardless of letter case (`Alice` and `alice`
/// are one account; see [`user_key`]).
pub fn validate_user(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_USER_LEN {
        return Err(NameError::TooLong(MAX_USER_LEN));
    }
    if !name.bytes().all(is_name_char) {
        return Err(NameError::BadChar);
    }
    if name == "." || name == ".." {
        return Err(NameError::Dots);
    }
    if RESERVED_USERS.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// The key that makes user names unique: the name in lower case. User
/// names are ASCII (`[A-Za-z0-9_.-]`), so no Unicode normalisation is
/// needed: look-alike letters cannot occur.
pub fn user_key(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// A validated room name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomName<'a> {
    /// The whole name.
    pub full: &'a str,
    /// Namespace part (before the first `:`), or `""`.
    pub namespace: &'a str,
    /// For a DM room, the two users in sorted order.
    pub dm: Option<(&'a str, &'a str)>,
}

impl<'a> RoomName<'a> {
    /// Parse and validate a room name.
    pub fn parse(full: &'a str) -> Result<Self, NameError> {
        if full.is_empty() {
            return Err(NameError::Empty);
        }
        if full.len() > MAX_ROOM_LEN {
            return Err(NameError::TooLong(MAX_ROOM_LEN));
        }
        if !full.bytes().all(|b| is_name_char(b) || b == b':') {
            return Err(NameError::BadChar);
        }
        let mut parts = full.split(':');
        let first = parts.next().unwrap_or_default();
        let second = parts.next();
        let third = parts.next();
        let rest = parts.next();
        match (second, third, rest) {
            (None, _, _) => Ok(RoomName {
                full,
                namespace: "",
                dm: None,
            }),
            (Some(name), None, _) => {
                if first.is_empty() || name.is_empty() || first == DM_NAMESPACE {
                    return Err(if first == DM_NAMESPACE {
                        NameError::BadDm
                    } else {
                        NameError::BadNamespace
                    });
                }
                Ok(RoomName {
                    full,
                    namespace: first,
                    dm: None,
                })
            }
            (Some(a), Some(b), None) if first == DM_NAMESPACE => {
                validate_user(a).map_err(|_| NameError::BadDm)?;
                validate_user(b).map_err(|_| NameError::BadDm)?;
                if a >= b {
                    return Err(NameError::BadDm);
                }
                Ok(RoomName {
                    full,
                    namespace: DM_NAMESPACE,
                    dm: Some((a, b)),
                })
            }
            _ => Err(NameError::BadNamespace),
        }
    }

    /// True if `user` is one of the two parties of this DM room.
    pub fn dm_allows(&self, user: &str) -> bool {
        matches!(self.dm, Some((a, b)) if a == user || b == user)
    }
}

/// Name of the direct-message room between two users.
pub fn dm_room(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("{DM_NAMESPACE}:{x}:{y}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms() {
        assert_eq!(RoomName::parse("lobby").map(|r| r.namespace), Ok(""));
        assert_eq!(RoomName::parse("news:eu").map(|r| r.namespace), Ok("news"));
        assert_eq!(RoomName::parse(""), Err(NameError::Empty));
        assert_eq!(RoomName::parse("a b"), Err(NameError::BadChar));
        assert_eq!(RoomName::parse("a\u{0}"), Err(NameError::BadChar));
        assert_eq!(RoomName::parse("é"), Err(NameError::BadChar));
        assert_eq!(RoomName::parse(":x"), Err(NameError::BadNamespace));
        assert_eq!(RoomName::parse("x:"), Err(NameError::BadNamespace));
        assert_eq!(RoomName::parse("a:b:c"), Err(NameError::BadNamespace));
        assert_eq!(
            RoomName::parse(&"x".repeat(129)),
            Err(NameError::TooLong(128))
        );
    }

    #[test]
    fn dms() {
        let r = RoomName::parse("dm:alice:bob").expect("valid dm");
        assert_eq!(r.dm, Some(("alice", "bob")));
        assert!(r.dm_allows("alice") && r.dm_allows("bob") && !r.dm_allows("carol"));
        assert_eq!(RoomName::parse("dm:bob:alice"), Err(NameError::BadDm));
        assert_eq!(RoomName::parse("dm:bob:bob"), Err(NameError::BadDm));
        assert_eq!(RoomName::parse("dm:x"), Err(NameError::BadDm));
        assert_eq!(dm_room("bob", "alice"), "dm:alice:bob");
    }

    #[test]
    fn users() {
        assert!(validate_user("alice_1.x-y").is_ok());
        assert_eq!(validate_user(""), Err(NameError::Empty));
        assert_eq!(validate_user("a:b"), Err(NameError::BadChar));
        assert_eq!(validate_user(&"a".repeat(33)), Err(NameError::TooLong(32)));
        assert_eq!(validate_user("."), Err(NameError::Dots));
        assert_eq!(validate_user(".."), Err(NameError::Dots));
        assert!(validate_user("...").is_ok() && validate_user(".a").is_ok());
        for r in ["server", "Server", "SYSTEM", "shoal", "Admin", "root"] {
            assert_eq!(validate_user(r), Err(NameError::Reserved), "{r}");
        }
        assert_eq!(user_key("AlIce"), user_key("alice"));
    }
}
