//! Every Redis key and channel Shoal uses, in one place. A room's keys
//! and its sharded channel share the hash tag `{room}`, so a Redis Cluster
//! keeps a room on one shard (and one slot, as scripts require) and
//! spreads rooms over shards. Cluster-wide state shares the tag `{@}`
//! (`@` cannot occur in room names).
//!
//! - `shoal:{room}:seq`: the last assigned seq;
//! - `shoal:{room}:ann`: with `--redis-wait-replicas`, the last announced
//!   (replicated and published) seq;
//! - `shoal:{room}:log`: the hot history, a stream, entry id `<seq>-0`,
//!   field `r` = record;
//! - `shoal:{room}:cid:<user>\0<cid>`: `<seq>:<ts>` of a publish with a
//!   client message id, for the idempotency window;
//! - `shoal:{room}:presence`: user -> the presence holders (node
//!   processes) where the user is in the room;
//! - channel `shoal:{room}`: the room's messages and events; channel
//!   `shoal:{@user}`: a user's direct messages; channel `shoal:{@}`:
//!   cluster-wide announcements;
//! - `shoal:{@}:revoked` (jti -> `exp user`), `shoal:{@}:users` (known
//!   user names);
//! - `shoal:node:<holder>`: a node process's presence lease;
//! - `shoal:rate:<user>:<second>`: a user's publishes in one second;
//! - `shoal:archive` (log key -> newest seq to archive) and
//!   `shoal:archive:lock` (the archiver's lock).

/// The last assigned seq of a room.
pub fn seq_key(room: &str) -> String {
    format!("shoal:{{{room}}}:seq")
}

/// The last announced seq of a room (`--redis-wait-replicas`).
pub fn announced_key(room: &str) -> String {
    format!("shoal:{{{room}}}:ann")
}

/// A room's hot history.
pub fn log_key(room: &str) -> String {
    format!("shoal:{{{room}}}:log")
}

/// The room of a hot-history key.
pub fn room_of_log(log: &str) -> Option<&str> {
    log.strip_prefix("shoal:{")?.strip_suffix("}:log")
}

/// A publish's client message id in a room.
pub fn cid_key(room: &str, user: &str, cid: &str) -> String {
    format!("shoal:{{{room}}}:cid:{user}\0{cid}")
}

/// A room's presence hash.
pub fn presence_key(room: &str) -> String {
    format!("shoal:{{{room}}}:presence")
}

/// A room's (or `@user`'s, or `@`'s) sharded channel.
pub fn channel(room: &str) -> String {
    format!("shoal:{{{room}}}")
}

/// The room of a channel name, if it is one of ours.
pub fn channel_room(ch: &[u8]) -> Option<&str> {
    std::str::from_utf8(ch)
        .ok()?
        .strip_prefix("shoal:{")?
        .strip_suffix('}')
}

/// A presence holder's lease.
pub fn lease_key(holder: &str) -> String {
    format!("shoal:node:{holder}")
}

/// A user's publishes in second `sec`.
pub fn rate_key(user: &str, sec: u64) -> String {
    format!("shoal:rate:{user}:{sec}")
}

/// Cluster-wide revocations (same slot as the global channel).
pub const REVOKED_KEY: &str = "shoal:{@}:revoked";
/// User names known to the cluster.
pub const USERS_KEY: &str = "shoal:{@}:users";
/// Live nodes' admin addresses: node -> "<expiry ms> <url>".
pub const NODES_KEY: &str = "shoal:{@}:nodes";
/// Rooms waiting for the archiver: log key -> newest seq.
pub const ARCHIVE_KEY: &str = "shoal:archive";
/// The archiver's lock.
pub const ARCHIVE_LOCK_KEY: &str = "shoal:archive:lock";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_keys_share_its_hash_tag() {
        assert_eq!(seq_key("a:b"), "shoal:{a:b}:seq");
        assert_eq!(log_key("lobby"), "shoal:{lobby}:log");
        assert_eq!(room_of_log(&log_key("dm:a:b")), Some("dm:a:b"));
        assert_eq!(room_of_log("shoal:{x}:seq"), None);
        assert_eq!(channel_room(channel("dm:a:b").as_bytes()), Some("dm:a:b"));
        assert_eq!(channel_room(b"other"), None);
        assert_eq!(cid_key("r", "u", "c"), "shoal:{r}:cid:u\0c");
    }
}
