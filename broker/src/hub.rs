//! The room registry and the user registry, both sharded by name hash.
//!
//! Locks are `parking_lot` mutexes held only for in-memory work, never
//! across `.await`. Lock order is always shard -> room -> user shard; the
//! user registry never takes a room lock.
//!
//! A room's seq is assigned and its `msg` queued to every member under the
//! room's own lock, so every member sees that room's messages in seq order.
//! Queueing is a non-blocking `try_send`; a full queue closes that one
//! consumer (see `outbound`), it never blocks the publisher.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
    sync::Arc,
    time::Instant,
};

use parking_lot::Mutex;
use shoal_proto::{names::RoomName, Body, ErrorCode, ServerFrame};

use crate::{
    auth::now_ms,
    config::{NamespaceOpts, NamespaceTable, PublishPolicy},
    metrics::Metrics,
    outbound::{ConnHandle, SharedFrame},
};

/// A room.
pub struct Room {
    /// Full name.
    pub name: Arc<str>,
    /// Namespace options.
    pub opts: NamespaceOpts,
    /// For DM rooms, the two users.
    pub dm: Option<(Arc<str>, Arc<str>)>,
    state: Mutex<RoomState>,
}

#[derive(Default)]
struct RoomState {
    seq: u64,
    members: HashMap<u64, ConnHandle>,
    /// Connections per user, for presence.
    users: HashMap<Arc<str>, u32>,
}

/// A request refused by the hub.
pub type HubError = (ErrorCode, String);

type Shard<K, V> = Mutex<HashMap<K, V>>;

/// Registry of rooms and connected users.
pub struct Hub {
    rooms: Box<[Shard<Arc<str>, Arc<Room>>]>,
    users: Box<[Shard<Arc<str>, Vec<ConnHandle>>]>,
    hasher: std::hash::RandomState,
    mask: usize,
    namespaces: NamespaceTable,
    metrics: Arc<Metrics>,
}

/// What a publish produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Assigned seq.
    pub seq: u64,
    /// Server timestamp (ms).
    pub ts: u64,
    /// Connections the message was queued to.
    pub recipients: usize,
}

impl Hub {
    /// A hub with `shards` shards (rounded up to a power of two).
    pub fn new(shards: usize, namespaces: NamespaceTable, metrics: Arc<Metrics>) -> Self {
        let n = shards.max(1).next_power_of_two();
        Hub {
            rooms: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            users: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::hash::RandomState::new(),
            mask: n - 1,
            namespaces,
            metrics,
        }
    }

    fn shard<T: Hash + ?Sized>(&self, key: &T) -> usize {
        (self.hasher.hash_one(key) as usize) & self.mask
    }

    /// Options of a room's namespace.
    pub fn namespace(&self, ns: &str) -> NamespaceOpts {
        self.namespaces.get(ns)
    }

    fn get_or_create<'m>(
        &self,
        map: &'m mut HashMap<Arc<str>, Arc<Room>>,
        name: &RoomName<'_>,
    ) -> &'m Arc<Room> {
        if !map.contains_key(name.full) {
            let room = Arc::new(Room {
                name: name.full.into(),
                opts: self.namespaces.get(name.namespace),
                dm: name.dm.map(|(a, b)| (a.into(), b.into())),
                state: Mutex::new(RoomState::default()),
            });
            self.metrics.rooms.inc();
            map.insert(room.name.clone(), room);
        }
        &map[name.full]
    }

    /// Join `conn` to a room. Returns the room and its current seq.
    pub fn join(&self, conn: &ConnHandle, room: &str) -> Result<(Arc<Room>, u64), HubError> {
        let name = RoomName::parse(room)
            .map_err(|e| (ErrorCode::BadRequest, format!("room `{room}`: {e}")))?;
        if name.dm.is_some() && !name.dm_allows(&conn.user) {
            return Err((
                ErrorCode::Forbidden,
                "not a party of this direct-message room".into(),
            ));
        }
        let mut shard = self.rooms[self.shard(name.full)].lock();
        let room = self.get_or_create(&mut shard, &name).clone();
        let mut st = room.state.lock();
        if st.members.contains_key(&conn.id) {
            return Ok((room.clone(), st.seq));
        }
        if st.members.len() >= room.opts.max_members {
            return Err((ErrorCode::Conflict, "room is full".into()));
        }
        st.members.insert(conn.id, conn.clone());
        self.metrics.room_members.inc();
        let count = st.users.entry(conn.user.clone()).or_insert(0);
        *count += 1;
        if *count == 1 && room.opts.presence {
            let f = ServerFrame::Presence {
                room: room.name.to_string(),
                user: conn.user.to_string(),
                online: true,
            };
            broadcast(&st, &f, |m| m.id != conn.id, &self.metrics);
        }
        let seq = st.seq;
        drop(st);
        Ok((room, seq))
    }

    /// Remove `conn` from a room (explicit leave or disconnect).
    pub fn leave(&self, conn: &ConnHandle, room: &Arc<Room>) {
        let mut shard = self.rooms[self.shard(&*room.name)].lock();
        let mut st = room.state.lock();
        if st.members.remove(&conn.id).is_none() {
            return;
        }
        self.metrics.room_members.dec();
        let last = match st.users.get_mut(&conn.user) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            _ => {
                st.users.remove(&conn.user);
                true
            }
        };
        if last && room.opts.presence {
            let f = ServerFrame::Presence {
                room: room.name.to_string(),
                user: conn.user.to_string(),
                online: false,
            };
            broadcast(&st, &f, |_| true, &self.metrics);
        }
        // A room with history keeps its seq counter; an unused one is freed.
        if st.members.is_empty() && st.seq == 0 {
            drop(st);
            if shard.remove(&room.name).is_some() {
                self.metrics.rooms.dec();
            }
        }
    }

    /// Publish to a room the caller has joined (or from the server API).
    pub fn publish(
        &self,
        room: &Room,
        from: &str,
        body: Body,
        via_api: bool,
    ) -> Result<Published, HubError> {
        if !via_api && room.opts.publish == PublishPolicy::Api {
            return Err((
                ErrorCode::Forbidden,
                "only the server API publishes in this namespace".into(),
            ));
        }
        let started = Instant::now();
        let mut st = room.state.lock();
        st.seq += 1;
        let (seq, ts) = (st.seq, now_ms());
        let f = ServerFrame::Msg {
            room: room.name.to_string(),
            seq,
            from: from.to_string(),
            ts,
            body,
        };
        let recipients = if let Some((a, b)) = &room.dm {
            let mut shared = SharedFrame::new(&f);
            let mut n = 0;
            for u in [a, b] {
                let users = self.users[self.shard(&**u)].lock();
                for c in users.get(u).into_iter().flatten() {
                    if let Some(bytes) = shared.get(c.encoding) {
                        c.push(bytes, false);
                        n += 1;
                    }
                }
            }
            n
        } else {
            broadcast(&st, &f, |_| true, &self.metrics)
        };
        drop(st);
        self.metrics.deliveries.inc_by(recipients as u64);
        self.metrics.frames_out("msg", recipients as u64);
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(Published {
            seq,
            ts,
            recipients,
        })
    }

    /// Send a direct message from `from` to user `to`.
    pub fn publish_dm(
        &self,
        from: &str,
        to: &str,
        body: Body,
    ) -> Result<(Arc<Room>, Published), HubError> {
        shoal_proto::names::validate_user(to)
            .map_err(|e| (ErrorCode::BadRequest, format!("user `{to}`: {e}")))?;
        if from == to {
            return Err((
                ErrorCode::BadRequest,
                "cannot send a direct message to yourself".into(),
            ));
        }
        let full = shoal_proto::names::dm_room(from, to);
        let name = RoomName::parse(&full).map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
        let room = {
            let mut shard = self.rooms[self.shard(name.full)].lock();
            self.get_or_create(&mut shard, &name).clone()
        };
        let p = self.publish(&room, from, body, false)?;
        Ok((room, p))
    }

    /// Forward `typing` to the room's other users.
    pub fn typing(&self, room: &Room, conn: &ConnHandle) {
        let f = ServerFrame::Typing {
            room: room.name.to_string(),
            user: conn.user.to_string(),
        };
        let st = room.state.lock();
        broadcast(&st, &f, |m| m.user != conn.user, &self.metrics);
    }

    /// Users in a room, sorted.
    pub fn members(&self, room: &Room) -> Vec<String> {
        let st = room.state.lock();
        let mut v: Vec<String> = st.users.keys().map(|u| u.to_string()).collect();
        drop(st);
        v.sort_unstable();
        v
    }

    /// Look up an existing room.
    pub fn room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms[self.shard(name)].lock().get(name).cloned()
    }

    /// Look up or create a room by validated name (server API).
    pub fn room_or_create(&self, name: &RoomName<'_>) -> Arc<Room> {
        let mut shard = self.rooms[self.shard(name.full)].lock();
        self.get_or_create(&mut shard, name).clone()
    }

    /// Add a live connection to the user registry.
    pub fn register(&self, conn: &ConnHandle) {
        self.users[self.shard(&*conn.user)]
            .lock()
            .entry(conn.user.clone())
            .or_default()
            .push(conn.clone());
    }

    /// Remove a connection from the user registry.
    pub fn unregister(&self, conn: &ConnHandle) {
        let mut shard = self.users[self.shard(&*conn.user)].lock();
        if let Some(v) = shard.get_mut(&conn.user) {
            v.retain(|c| c.id != conn.id);
            if v.is_empty() {
                shard.remove(&conn.user);
            }
        }
    }

    /// True if the user has at least one live connection on this node.
    pub fn is_online(&self, user: &str) -> bool {
        self.users[self.shard(user)].lock().contains_key(user)
    }

    /// Close every connection of `user` that authenticated with `jti`.
    pub fn close_token(&self, user: &str, jti: &str, code: shoal_proto::CloseCode) -> usize {
        let shard = self.users[self.shard(user)].lock();
        let mut n = 0;
        for c in shard
            .get(user)
            .into_iter()
            .flatten()
            .filter(|c| &*c.jti == jti)
        {
            c.close(code);
            n += 1;
        }
        n
    }
}

/// Queue `f` to every member passing `filter`, encoding at most once per
/// encoding. Returns how many connections it was queued to.
fn broadcast(
    st: &RoomState,
    f: &ServerFrame,
    filter: impl Fn(&ConnHandle) -> bool,
    metrics: &Metrics,
) -> usize {
    let ephemeral = f.is_ephemeral();
    let mut shared = SharedFrame::new(f);
    let mut n = 0;
    for m in st.members.values().filter(|m| filter(m)) {
        if let Some(bytes) = shared.get(m.encoding) {
            m.push(bytes, ephemeral);
            n += 1;
        }
    }
    if !matches!(f, ServerFrame::Msg { .. }) {
        metrics.frames_out(f.kind(), n as u64);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::ConnCtl;
    use shoal_proto::Encoding;
    use tokio::sync::mpsc::Receiver;

    fn conn(user: &str, m: &Arc<Metrics>) -> (ConnHandle, Receiver<bytes::Bytes>) {
        ConnHandle::new(
            user.into(),
            "j".into(),
            Encoding::Json,
            64,
            Arc::new(ConnCtl::default()),
            m.clone(),
        )
    }

    fn drain(rx: &mut Receiver<bytes::Bytes>) -> Vec<ServerFrame> {
        let mut out = vec![];
        while let Ok(b) = rx.try_recv() {
            // strip the 2-byte header of small text frames
            out.push(Encoding::Json.decode_server(&b[2..]).expect("decode"));
        }
        out
    }

    #[test]
    fn seq_presence_and_cleanup() {
        let m = Arc::new(Metrics::new("t"));
        let hub = Hub::new(4, NamespaceTable::default(), m.clone());
        let (a, mut ra) = conn("alice", &m);
        let (b, mut rb) = conn("bob", &m);
        let (room, seq) = hub.join(&a, "lobby").expect("join");
        assert_eq!(seq, 0);
        hub.join(&b, "lobby").expect("join");
        assert!(matches!(
            &drain(&mut ra)[..],
            [ServerFrame::Presence { online: true, .. }]
        ));
        let p1 = hub.publish(&room, "alice", "x".into(), false).expect("pub");
        let p2 = hub.publish(&room, "bob", "y".into(), false).expect("pub");
        assert_eq!((p1.seq, p2.seq, p2.recipients), (1, 2, 2));
        let got: Vec<u64> = drain(&mut rb)
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Msg { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![1, 2]);
        hub.leave(&b, &room);
        assert!(matches!(
            drain(&mut ra).last(),
            Some(ServerFrame::Presence { online: false, .. })
        ));
        hub.leave(&a, &room);
        assert!(
            hub.room("lobby").is_some(),
            "room with history keeps its seq"
        );
        let (_r2, seq) = hub.join(&a, "lobby").expect("join");
        assert_eq!(seq, 2);
        let (tmp, _) = hub.join(&a, "empty").expect("join");
        hub.leave(&a, &tmp);
        assert!(hub.room("empty").is_none(), "unused room is freed");
    }

    #[test]
    fn dm_privacy() {
        let m = Arc::new(Metrics::new("t"));
        let hub = Hub::new(4, NamespaceTable::default(), m.clone());
        let (a, mut ra) = conn("alice", &m);
        let (b, mut rb) = conn("bob", &m);
        let (c, mut rc) = conn("carol", &m);
        for x in [&a, &b, &c] {
            hub.register(x);
        }
        let (room, p) = hub.publish_dm("alice", "bob", "hi".into()).expect("dm");
        assert_eq!(&*room.name, "dm:alice:bob");
        assert_eq!(p.recipients, 2);
        assert_eq!(drain(&mut ra).len(), 1);
        assert_eq!(drain(&mut rb).len(), 1);
        assert!(drain(&mut rc).is_empty());
        assert_eq!(
            hub.join(&c, "dm:alice:bob").err().map(|e| e.0),
            Some(ErrorCode::Forbidden)
        );
        assert!(hub.join(&b, "dm:alice:bob").is_ok());
    }
}
